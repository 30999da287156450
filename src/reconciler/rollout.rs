//! The executor's side of rollouts (the decisions are in [`crate::lifecycle::rollout`]):
//! one watch per workload kind a key can roll out, cached cut down to what the planner
//! reads; the annotation patch; and which keys a workload's change wakes.
//!
//! The watches run whether or not any key uses `rollout`: starting them on demand
//! would leave a key planning from a cache that is not there yet. What they cost is
//! kept small instead: a cached workload keeps its name, uid, generation, replicas,
//! keyward's own Pod-template annotations and its status counters — not its labels,
//! annotations, managed fields, Pod spec or status conditions, which make up nearly
//! all of a real Deployment.

use std::{collections::BTreeMap, fmt::Debug, sync::Arc};

use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        apps::v1::{
            DaemonSet, DaemonSetSpec, Deployment, DeploymentSpec, StatefulSet, StatefulSetSpec,
        },
        core::v1::PodTemplateSpec,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        Controller,
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use serde_json::json;

use super::{MANAGER, ManagedKey, Result, Shared};
use crate::{
    lifecycle::rollout::{self, TargetView, Workload},
    resources::{RolloutTarget, WorkloadKind},
};

/// A workload kind as keyward watches and patches it.
trait Watched:
    Workload
    + Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Debug
    + DeserializeOwned
    + serde::Serialize
    + Send
    + Sync
    + 'static
{
    const KIND: WorkloadKind;
    /// Drops everything the planner does not read.
    fn trim(&mut self);
}

fn trim_meta(meta: &ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        generation: meta.generation,
        ..Default::default()
    }
}

/// Only keyward's rollout annotations of a Pod template.
fn trim_template(template: &PodTemplateSpec) -> PodTemplateSpec {
    let annotations: BTreeMap<String, String> = template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .into_iter()
        .flatten()
        .filter(|(k, _)| rollout::is_rollout_annotation(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            annotations: Some(annotations),
            ..Default::default()
        }),
        spec: None,
    }
}

/// Each kind keeps its name, uid, generation, replicas (where it has them), keyward's
/// template annotations and its status counters.
macro_rules! watched {
    ($kind:ident, $spec:ident { $($keep:ident),* }) => {
        impl Watched for $kind {
            const KIND: WorkloadKind = WorkloadKind::$kind;
            fn trim(&mut self) {
                self.metadata = trim_meta(&self.metadata);
                self.spec = $spec {
                    $($keep: self.spec.$keep,)*
                    template: trim_template(&self.spec.template),
                    ..Default::default()
                };
                if let Some(status) = &mut self.status {
                    status.conditions = None;
                }
            }
        }
    };
}

watched!(Deployment, DeploymentSpec { replicas });
watched!(StatefulSet, StatefulSetSpec { replicas });
watched!(DaemonSet, DaemonSetSpec {});

/// The workload watches of one namespace (or all).
pub struct Workloads {
    deployments: Shared<Deployment>,
    stateful_sets: Shared<StatefulSet>,
    daemon_sets: Shared<DaemonSet>,
}

async fn watch<W: Watched>(
    client: &Client,
    namespace: Option<&str>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Shared<W> {
    let api: Api<W> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    Shared::start_with(api, watcher::Config::default(), W::trim, shutdown).await
}

impl Workloads {
    /// Starts the three watches (until `shutdown`), each once its first list is cached.
    pub async fn watch(
        client: &Client,
        namespace: Option<&str>,
        shutdown: impl Future<Output = ()> + Clone + Send + 'static,
    ) -> Arc<Self> {
        let (deployments, stateful_sets, daemon_sets) = futures::join!(
            watch(client, namespace, shutdown.clone()),
            watch(client, namespace, shutdown.clone()),
            watch(client, namespace, shutdown),
        );
        Arc::new(Self {
            deployments,
            stateful_sets,
            daemon_sets,
        })
    }

    /// The target in `namespace`, as the key whose annotation is `annotation` sees it.
    pub fn view(
        &self,
        namespace: &str,
        target: &RolloutTarget,
        annotation: &str,
    ) -> Option<TargetView> {
        fn find<W: Watched>(store: &Store<W>, ns: &str, name: &str, a: &str) -> Option<TargetView> {
            let object = store.get(&ObjectRef::new(name).within(ns))?;
            Some(rollout::view(&*object, a))
        }
        let (ns, name) = (namespace, target.name.as_str());
        match target.kind {
            WorkloadKind::Deployment => find(&self.deployments.store, ns, name, annotation),
            WorkloadKind::StatefulSet => find(&self.stateful_sets.store, ns, name, annotation),
            WorkloadKind::DaemonSet => find(&self.daemon_sets.store, ns, name, annotation),
        }
    }

    /// Wakes the keys that target a workload whenever it changes (its rollout status
    /// too).
    pub fn wake<K: ManagedKey>(&self, controller: Controller<K>) -> Controller<K> {
        let keys = controller.store();
        controller
            .watches_stream(self.deployments.subscribe(), targeting(keys.clone()))
            .watches_stream(self.stateful_sets.subscribe(), targeting(keys.clone()))
            .watches_stream(self.daemon_sets.subscribe(), targeting(keys))
    }
}

/// The keys in the workload's namespace whose `spec.rollout` names it.
fn targeting<K: ManagedKey, W: Watched>(keys: Store<K>) -> impl Fn(W) -> Vec<ObjectRef<K>> {
    move |workload| {
        let (ns, name) = (workload.namespace(), workload.name_any());
        keys.state()
            .into_iter()
            .filter(|k| {
                k.namespace() == ns
                    && k.rollout()
                        .iter()
                        .any(|t| t.kind == W::KIND && t.name == name)
            })
            .map(|k| ObjectRef::from_obj(&*k))
            .collect()
    }
}

/// Sets `annotation` on the target's Pod template with a JSON merge patch that holds
/// nothing else; `None`: there is no such workload.
pub async fn annotate(
    client: &Client,
    namespace: &str,
    target: &RolloutTarget,
    annotation: &str,
    value: &str,
) -> Result<Option<TargetView>> {
    async fn patch<W: Watched>(
        api: Api<W>,
        name: &str,
        annotation: &str,
        value: &str,
    ) -> Result<Option<TargetView>> {
        let patch =
            json!({"spec": {"template": {"metadata": {"annotations": {annotation: value}}}}});
        let params = PatchParams {
            field_manager: Some(MANAGER.to_owned()),
            ..Default::default()
        };
        match api.patch(name, &params, &Patch::Merge(patch)).await {
            Ok(workload) => Ok(Some(rollout::view(&workload, annotation))),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
    let (c, name) = (client.clone(), target.name.as_str());
    match target.kind {
        WorkloadKind::Deployment => {
            patch::<Deployment>(Api::namespaced(c, namespace), name, annotation, value).await
        }
        WorkloadKind::StatefulSet => {
            patch::<StatefulSet>(Api::namespaced(c, namespace), name, annotation, value).await
        }
        WorkloadKind::DaemonSet => {
            patch::<DaemonSet>(Api::namespaced(c, namespace), name, annotation, value).await
        }
    }
}
