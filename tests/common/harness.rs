//! What the controller tests share: applying manifests, running a controller
//! in-process, and waiting on a key's status.

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Secret;
use keyward::{
    lifecycle::Timing,
    providers::ProviderFactory,
    reconciler::{self, Context, Faults, ManagedKey, Settings},
    resources::{AuthKey, ClusterKeyProvider, KeyProvider, KeyStatus, ServiceAccountKey},
};
use kube::{
    Api, Client, Resource,
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::{Value, json};

use super::{TestNamespace, eventually, upstream::CrashOnce};

/// Issuance timing of the in-process controllers: a short deadline, so that an
/// interrupted issuance is recovered within seconds (the emulators answer in
/// milliseconds unless a test delays them).
pub const TEST_TIMING: Timing = Timing {
    issue_deadline: Duration::from_secs(3),
    landing_window: Duration::from_secs(6),
};

/// How long a test waits for the controller to get somewhere.
pub const WAIT: Duration = Duration::from_secs(60);

/// Server-side applies a manifest (as field manager `test`, forced) by its `kind`; a
/// `ClusterKeyProvider` cluster-wide, everything else in `ns`.
pub async fn apply(client: &Client, ns: &str, object: &Value) {
    let kind = object["kind"].as_str().unwrap();
    let name = object["metadata"]["name"].as_str().unwrap();
    let params = PatchParams::apply("test").force();
    let patch = Patch::Apply(object);
    let c = client.clone();
    let result = match kind {
        "AuthKey" => Api::<AuthKey>::namespaced(c, ns)
            .patch(name, &params, &patch)
            .await
            .map(drop),
        "ServiceAccountKey" => Api::<ServiceAccountKey>::namespaced(c, ns)
            .patch(name, &params, &patch)
            .await
            .map(drop),
        "KeyProvider" => Api::<KeyProvider>::namespaced(c, ns)
            .patch(name, &params, &patch)
            .await
            .map(drop),
        "ClusterKeyProvider" => Api::<ClusterKeyProvider>::all(c)
            .patch(name, &params, &patch)
            .await
            .map(drop),
        "Secret" => Api::<Secret>::namespaced(c, ns)
            .patch(name, &params, &patch)
            .await
            .map(drop),
        other => panic!("unexpected kind {other}"),
    };
    result.unwrap_or_else(|e| panic!("applying {kind} {name}: {e}"));
}

/// A controller running in this process, watching one namespace (which is also its
/// operator namespace). Aborted when dropped.
pub struct Controller {
    ctx: Arc<Context>,
    task: tokio::task::JoinHandle<()>,
}

impl Controller {
    /// Starts a controller with a fresh `Context` (a new process, as far as the
    /// reconciler's state goes; what `factory` caches is kept).
    pub fn start(
        client: &Client,
        ns: &str,
        factory: Arc<dyn ProviderFactory>,
        faults: Arc<dyn Faults>,
        concurrency: u16,
    ) -> Self {
        let ctx = Context::new(
            client.clone(),
            factory,
            faults,
            Settings {
                operator_namespace: ns.to_owned(),
                namespaces: vec![ns.to_owned()],
                concurrency,
                timing: TEST_TIMING,
            },
        );
        let task = tokio::spawn(reconciler::run(ctx.clone(), futures::future::pending()));
        Self { ctx, task }
    }

    pub fn ctx(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Stops the controller abruptly, like a crash, and waits until it has stopped.
    pub async fn kill(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until the key's status satisfies `check`.
pub async fn status_where<K: ManagedKey>(
    api: &Api<K>,
    name: &str,
    what: &str,
    check: impl Fn(&KeyStatus) -> bool,
) -> KeyStatus {
    eventually(&format!("{name}: {what}"), WAIT, || {
        let check = &check;
        async move {
            let key = api.get_opt(name).await.ok()??;
            key.key_status().filter(|s| check(s)).cloned()
        }
    })
    .await
}

/// Waits until the key is Ready=True with no issuance in flight.
pub async fn ready<K: ManagedKey>(api: &Api<K>, name: &str) -> KeyStatus {
    status_where(api, name, "Ready=True", |s| {
        condition(s, "Ready").is_some_and(|c| c.0 == "True") && s.attempt.is_none()
    })
    .await
}

/// Waits until the key resource no longer exists (finalizer released).
pub async fn gone<K: ManagedKey>(api: &Api<K>, name: &str, what: &str) {
    eventually(what, WAIT, || async move {
        api.get_opt(name).await.unwrap().is_none().then_some(())
    })
    .await;
}

/// (status, reason, message) of a condition.
pub fn condition(status: &KeyStatus, type_: &str) -> Option<(String, String, String)> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// A test's namespace on the shared control plane, with (at most) one controller
/// watching it and the crash point that controller consults.
pub struct Cluster {
    /// First, so the controller stops before the namespace goes.
    controller: Option<Controller>,
    pub client: Client,
    pub ns: TestNamespace,
    pub faults: Arc<CrashOnce>,
}

impl Cluster {
    /// A fresh namespace `<prefix>-<random>`, no controller yet.
    pub async fn new(prefix: &str) -> Self {
        super::capture_logs();
        let client = super::client().await;
        let ns = TestNamespace::new(&client, prefix).await;
        Self {
            controller: None,
            client,
            ns,
            faults: Arc::new(CrashOnce::default()),
        }
    }

    /// Starts a fresh controller (a new process, as far as the reconciler's state
    /// goes; whatever `factory` caches is kept).
    pub fn start(&mut self, factory: Arc<dyn ProviderFactory>) {
        self.controller = Some(Controller::start(
            &self.client,
            &self.ns.name,
            factory,
            self.faults.clone(),
            4,
        ));
    }

    /// Stops the controller abruptly, like a crash.
    pub async fn kill(&mut self) {
        if let Some(controller) = self.controller.take() {
            controller.kill().await;
        }
    }

    pub fn ctx(&self) -> &Arc<Context> {
        self.controller
            .as_ref()
            .expect("a running controller")
            .ctx()
    }

    /// A namespaced API in the test's namespace.
    pub fn api<K: ManagedKey>(&self) -> Api<K> {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }

    /// Applies a `K` named `name` with `spec`.
    pub async fn create<K: Resource<DynamicType = ()>>(&self, name: &str, spec: Value) {
        apply(
            &self.client,
            &self.ns.name,
            &json!({
                "apiVersion": K::api_version(&()), "kind": K::kind(&()),
                "metadata": {"name": name}, "spec": spec
            }),
        )
        .await;
    }

    /// The value under `data_key` of the Secret `name`.
    pub async fn secret_value(&self, name: &str, data_key: &str) -> String {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns.name);
        let secret = secrets.get(name).await.unwrap();
        String::from_utf8(secret.data.unwrap()[data_key].0.clone()).unwrap()
    }

    /// Forces a rotation: sets the `keyward.dev/rotate` annotation to `value`.
    pub async fn rotate<K: ManagedKey>(&self, name: &str, value: &str) {
        self.api::<K>()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {"keyward.dev/rotate": value}}})),
            )
            .await
            .unwrap();
    }

    /// Deletes the key and waits until it is gone (finalizer released).
    pub async fn delete_and_wait<K: ManagedKey>(&self, name: &str, what: &str) {
        let api = self.api::<K>();
        api.delete(name, &DeleteParams::default()).await.unwrap();
        gone(&api, name, what).await;
    }
}
