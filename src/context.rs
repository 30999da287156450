//! What every controller shares: the client, the provider factory, settings, the
//! error type, and the guarded status write. Below both the key reconciler and the
//! provider status controller, so neither depends on the other.

use std::{
    collections::HashMap,
    fmt::Debug,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;

use crate::{
    events::Recorder,
    lifecycle::{Timing, backoff_after},
    providers::{ProviderError, ProviderFactory},
};

/// Field manager of every write keyward makes.
pub const MANAGER: &str = "keyward";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Provider(#[from] ProviderError),
    #[error("stopped at {0:?} (fault injection)")]
    Crashed(CrashPoint),
    #[error("{reason}: {message}")]
    NotReady {
        reason: &'static str,
        message: String,
    },
    /// The lifecycle says to retry (an upstream failure recorded in status).
    #[error("{0}")]
    Retry(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The API server refused a write guarded by a `resourceVersion` that is no longer
    /// current: what keyward planned from was stale.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube(kube::Error::Api(s)) if s.code == 409)
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Kube(kube::Error::Api(s)) if s.code == 404)
    }
}

/// The points of an issuance where a crash leaves different state behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CrashPoint {
    BeforeUpstream,
    AfterUpstream,
    AfterSecretWrite,
    AfterStatusWrite,
}

/// Fault injection for crash-safety tests; the operator uses [`NoFaults`].
pub trait Faults: Send + Sync {
    fn at(&self, point: CrashPoint) -> bool;
}

pub struct NoFaults;

impl Faults for NoFaults {
    fn at(&self, _: CrashPoint) -> bool {
        false
    }
}

/// Operator settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where `ClusterKeyProvider` credential Secrets live.
    pub operator_namespace: String,
    /// Watch only these namespaces (empty: all).
    pub namespaces: Vec<String>,
    /// Reconciles running at once, per kind.
    pub concurrency: u16,
    /// How long an issuance may take, and how long its create may still land after.
    pub timing: Timing,
}

impl Settings {
    /// The namespaces to run controllers for: `None` (all), or each listed one once —
    /// a namespace listed twice must not get two controllers reconciling its keys.
    pub fn watched_namespaces(&self) -> Vec<Option<String>> {
        let listed: std::collections::BTreeSet<&String> = self.namespaces.iter().collect();
        if listed.is_empty() {
            vec![None]
        } else {
            listed.into_iter().cloned().map(Some).collect()
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            operator_namespace: "keyward-system".to_owned(),
            namespaces: Vec::new(),
            concurrency: 4,
            timing: Timing::default(),
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub factory: Arc<dyn ProviderFactory>,
    pub faults: Arc<dyn Faults>,
    pub settings: Settings,
    pub recorder: Recorder,
    failures: Mutex<HashMap<String, u32>>,
    /// Reconciles finished (successfully or not) — lets tests know a restarted
    /// controller has looked at every key.
    pub reconciles: AtomicU64,
    /// Set once a fault-injected crash point fired: from then on this controller does
    /// no I/O at all, like a process that died there.
    crashed: AtomicBool,
}

impl Context {
    pub fn new(
        client: Client,
        factory: Arc<dyn ProviderFactory>,
        faults: Arc<dyn Faults>,
        settings: Settings,
    ) -> Arc<Self> {
        let recorder = Recorder::new(client.clone(), "keyward", std::env::var("POD_NAME").ok());
        Arc::new(Self {
            client,
            factory,
            faults,
            settings,
            recorder,
            failures: Mutex::new(HashMap::new()),
            reconciles: AtomicU64::new(0),
            crashed: AtomicBool::new(false),
        })
    }

    /// The next retry delay of an object whose reconcile failed: 1s, 2s, 4s … 5m.
    pub fn failed(&self, uid: &str) -> Duration {
        let mut failures = self.failures.lock().expect("failures lock");
        let n = failures.entry(uid.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        backoff_after(*n)
    }

    /// The object reconciled cleanly: its retry delay starts over.
    pub fn succeeded(&self, uid: &str) {
        self.failures.lock().expect("failures lock").remove(uid);
    }

    pub fn crash_at(&self, point: CrashPoint) -> Result<()> {
        if self.faults.at(point) {
            self.crashed.store(true, Ordering::SeqCst);
            return Err(Error::Crashed(point));
        }
        self.alive()
    }

    /// `Err` once a crash point fired (see [`Faults`]).
    pub fn alive(&self) -> Result<()> {
        if self.crashed.load(Ordering::SeqCst) {
            return Err(Error::Crashed(CrashPoint::AfterStatusWrite));
        }
        Ok(())
    }
}

/// 8 random hex characters from the OS RNG: attempt ids, rotate-request nonces.
pub fn random_id() -> String {
    let mut buf = [0u8; 4];
    getrandom::fill(&mut buf).expect("operating system RNG");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes an object's status with server-side apply (keys and providers alike). With
/// `guard`, the write carries the object's `resourceVersion` and the API server
/// refuses it (409) if the object changed since: a write that commits to an upstream
/// effect is never made on stale state.
pub async fn write_status<R, S>(api: &Api<R>, object: &R, status: &S, guard: bool) -> Result<R>
where
    R: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize,
{
    let mut metadata = json!({"name": object.name_any()});
    if guard && let Some(rv) = object.resource_version() {
        metadata["resourceVersion"] = json!(rv);
    }
    let patch = json!({
        "apiVersion": R::api_version(&()),
        "kind": R::kind(&()),
        "metadata": metadata,
        "status": status,
    });
    Ok(api
        .patch_status(
            &object.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await?)
}

/// Sets the object's finalizers, guarded by its `resourceVersion` (a merge patch
/// carrying it is refused with 409 if the object changed since). `None`: the object
/// is gone (the last finalizer of a deleted object went).
pub async fn set_finalizers<R>(
    api: &Api<R>,
    object: &R,
    finalizers: Vec<String>,
) -> Result<Option<R>>
where
    R: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let patch = json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": object.resource_version(),
    }});
    match api
        .patch(
            &object.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
    {
        Ok(o) if o.meta().deletion_timestamp.is_some() && o.finalizers().is_empty() => Ok(None),
        Ok(o) => Ok(Some(o)),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(e.into()),
    }
}
