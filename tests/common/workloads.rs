//! Workloads on the shared control plane's kwok Node: manifests, and what
//! `kubectl rollout status` waits for, written here independently of keyward's own
//! idea of it.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use kube::{Api, Resource, ResourceExt, api::PostParams};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::eventually;

/// Rollouts take a few controller round trips; a cold controller-manager first syncs
/// its informers.
pub const ROLLOUT_WAIT: Duration = Duration::from_secs(90);

pub async fn create<K>(api: &Api<K>, object: Value) -> K
where
    K: Resource + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(object).unwrap();
    api.create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("creating {}: {e}", object.name_any()))
}

/// A workload `app` with `spec` and a Pod template whose annotation
/// `example.com/revision` ("1" here) tells the rollouts apart.
pub fn workload(app: &str, mut spec: Value) -> Value {
    spec["selector"] = json!({"matchLabels": {"app": app}});
    spec["template"] = json!({
        "metadata": {"labels": {"app": app}, "annotations": {"example.com/revision": "1"}},
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
    });
    json!({"metadata": {"name": app}, "spec": spec})
}

/// What `kubectl rollout status` waits for: the controller saw the latest spec, every
/// replica runs the latest template, none of an older one is left, all available.
pub fn deployment_rolled_out(d: &Deployment) -> bool {
    let want = d.spec.replicas.unwrap_or(1);
    let Some(s) = d.status.as_ref() else {
        return false;
    };
    s.observed_generation >= d.metadata.generation
        && s.updated_replicas == Some(want)
        && s.replicas == Some(want)
        && s.ready_replicas == Some(want)
        && s.available_replicas == Some(want)
}

pub fn stateful_set_rolled_out(s: &StatefulSet) -> bool {
    let want = s.spec.replicas.unwrap_or(1);
    let Some(status) = s.status.as_ref() else {
        return false;
    };
    status.observed_generation >= s.metadata.generation
        && status.updated_replicas == Some(want)
        && status.ready_replicas == Some(want)
        && status.available_replicas == Some(want)
        && status.update_revision.is_some()
        && status.current_revision == status.update_revision
}

pub async fn wait_rolled_out<K>(api: &Api<K>, name: &str, done: fn(&K) -> bool) -> K
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    eventually(
        &format!("{name} to be rolled out"),
        ROLLOUT_WAIT,
        || async { api.get(name).await.ok().filter(done) },
    )
    .await
}
