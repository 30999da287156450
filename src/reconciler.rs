//! The controller for `AuthKey` and `ServiceAccountKey`: executes the decisions of
//! [`crate::lifecycle`] against the API server and the provider.
//!
//! Order of writes for a new key, and how a crash after each is recovered:
//! 1. status.attempt (marker) — crash after: the attempt is still in status; the next
//!    reconcile finds upstream keys carrying the marker and revokes them.
//! 2. upstream issue — crash after: same as 1.
//! 3. the Secret (annotated with the attempt) — crash after: the next reconcile sees
//!    the Secret carries the in-flight attempt and adopts the key from it.
//! 4. status (key id, times, revision, hash; attempt cleared).

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Debug,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::{FutureExt, StreamExt};
use jiff::Timestamp;
use k8s_openapi::{
    api::core::v1::{Namespace, Secret},
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::{
        Controller,
        controller::Action,
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        finalizer::{Event as Finalizer, finalizer},
        reflector::ObjectRef,
        watcher,
    },
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;
use tracing::{info, warn};

use crate::{
    lifecycle::{self, Observed, ROTATE_ANNOTATION, Trigger},
    metrics::{self, KeyRef},
    policy,
    providers::{
        self, IssueRequest, IssuedKey, KeyApi, KeyShape, KeyState, ProviderError, ProviderFactory,
        ResolvedProvider,
    },
    resources::{
        AuthKey, ClusterKeyProvider, DeletionPolicy, IssueAttempt, KeyDuration, KeyProvider,
        KeyProviderSpec, KeyStatus, ProviderKind, ProviderRef, RetiringKey, Rotation, SecretSpec,
        ServiceAccountKey,
    },
    secret::{self, ATTEMPT_ANNOTATION, KEY_ID_ANNOTATION},
};

/// Finalizer on every key resource: revoke upstream before the resource goes.
pub const FINALIZER: &str = "keyward.dev/revoke";
/// Field manager of every write keyward makes.
pub const MANAGER: &str = "keyward";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("{0}")]
    Provider(#[from] ProviderError),
    #[error("stopped at {0:?} (fault injection)")]
    Crashed(CrashPoint),
    #[error("{reason}: {message}")]
    NotReady {
        reason: &'static str,
        message: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

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
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            operator_namespace: "keyward-system".to_owned(),
            namespaces: Vec::new(),
            concurrency: 4,
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub factory: Arc<dyn ProviderFactory>,
    pub faults: Arc<dyn Faults>,
    pub settings: Settings,
    recorder: Recorder,
    failures: Mutex<HashMap<String, u32>>,
    issue_backoff: Mutex<HashMap<String, IssueBackoff>>,
    /// Reconciles finished (successfully or not) — lets tests know a restarted
    /// controller has looked at every key.
    pub reconciles: AtomicU64,
}

impl Context {
    pub fn new(
        client: Client,
        factory: Arc<dyn ProviderFactory>,
        faults: Arc<dyn Faults>,
        settings: Settings,
    ) -> Arc<Self> {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "keyward".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        Arc::new(Self {
            client,
            factory,
            faults,
            settings,
            recorder,
            failures: Mutex::new(HashMap::new()),
            issue_backoff: Mutex::new(HashMap::new()),
            reconciles: AtomicU64::new(0),
        })
    }

    /// How long a key must still wait before issuing again after failed issuances,
    /// unless its spec or rotate request changed since. Every failed attempt writes
    /// status, and that write alone would wake the key again at once: without this
    /// the per-key backoff would be bypassed and a refusing upstream hammered.
    fn issue_wait<K: ManagedKey>(&self, key: &K) -> Option<Duration> {
        let backoff = self.issue_backoff.lock().expect("backoff lock");
        let entry = backoff.get(&key.uid().unwrap_or_default())?;
        let unchanged = entry.generation == key.meta().generation
            && entry.rotate_request.as_ref() == key.annotations().get(ROTATE_ANNOTATION);
        let wait = entry
            .until
            .saturating_duration_since(std::time::Instant::now());
        (unchanged && !wait.is_zero()).then_some(wait)
    }

    /// Records a failed issuance: 1s, 2s, 4s … up to 5 minutes before the next one.
    fn issue_failed<K: ManagedKey>(&self, key: &K) {
        let mut backoff = self.issue_backoff.lock().expect("backoff lock");
        let entry = backoff
            .entry(key.uid().unwrap_or_default())
            .or_insert(IssueBackoff {
                failures: 0,
                until: std::time::Instant::now(),
                generation: None,
                rotate_request: None,
            });
        entry.failures = entry.failures.saturating_add(1);
        entry.until = std::time::Instant::now() + backoff_after(entry.failures);
        entry.generation = key.meta().generation;
        entry.rotate_request = key.annotations().get(ROTATE_ANNOTATION).cloned();
    }

    fn forget_failed_issuances<K: ManagedKey>(&self, key: &K) {
        self.issue_backoff
            .lock()
            .expect("backoff lock")
            .remove(&key.uid().unwrap_or_default());
    }

    fn crash_at(&self, point: CrashPoint) -> Result<()> {
        if self.faults.at(point) {
            return Err(Error::Crashed(point));
        }
        Ok(())
    }
}

/// Failed issuances of one key, and what they were tried against.
struct IssueBackoff {
    failures: u32,
    until: std::time::Instant,
    generation: Option<i64>,
    rotate_request: Option<String>,
}

/// 1s, 2s, 4s … after the n-th consecutive failure, capped at 5 minutes.
fn backoff_after(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(9)).min(Duration::from_secs(300))
}

/// What the engine needs from a key kind; `AuthKey` and `ServiceAccountKey` share
/// everything else.
pub trait ManagedKey:
    Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
    + Clone
    + Debug
    + DeserializeOwned
    + Serialize
    + Send
    + Sync
    + 'static
{
    const KIND: &'static str;
    fn provider_ref(&self) -> &ProviderRef;
    fn expiry(&self) -> Option<&KeyDuration>;
    fn rotation(&self) -> Option<&Rotation>;
    fn secret_spec(&self) -> &SecretSpec;
    fn deletion_policy(&self) -> DeletionPolicy;
    fn description(&self) -> Option<&str>;
    fn shape(&self) -> KeyShape;
    fn key_status(&self) -> Option<&KeyStatus>;
}

/// The accessors both key kinds answer from identically named spec fields.
macro_rules! shared_key_fields {
    () => {
        fn provider_ref(&self) -> &ProviderRef {
            &self.spec.provider_ref
        }
        fn expiry(&self) -> Option<&KeyDuration> {
            self.spec.expiry.as_ref()
        }
        fn rotation(&self) -> Option<&Rotation> {
            self.spec.rotation.as_ref()
        }
        fn secret_spec(&self) -> &SecretSpec {
            &self.spec.secret
        }
        fn deletion_policy(&self) -> DeletionPolicy {
            self.spec.deletion_policy
        }
        fn description(&self) -> Option<&str> {
            self.spec.description.as_deref()
        }
        fn key_status(&self) -> Option<&KeyStatus> {
            self.status.as_ref()
        }
    };
}

impl ManagedKey for AuthKey {
    const KIND: &'static str = "AuthKey";
    shared_key_fields!();
    fn shape(&self) -> KeyShape {
        KeyShape {
            reusable: self.spec.reusable,
            ephemeral: self.spec.ephemeral,
            preauthorized: self.spec.preauthorized,
            tags: self.spec.tags.clone(),
            ..Default::default()
        }
    }
}

impl ManagedKey for ServiceAccountKey {
    const KIND: &'static str = "ServiceAccountKey";
    shared_key_fields!();
    fn shape(&self) -> KeyShape {
        KeyShape {
            service_account: Some(self.spec.service_account.name.clone()),
            create_service_account: self.spec.service_account.create,
            role: self.spec.role.clone(),
            scopes: self.spec.scopes.clone(),
            ..Default::default()
        }
    }
}

/// Digest of everything that shapes the key and its Secret: a change rotates.
/// Rotation timing and deletion policy are deliberately not part of it.
fn shape_digest<K: ManagedKey>(key: &K) -> String {
    let shape = key.shape();
    let value = json!({
        "provider": key.provider_ref(),
        "reusable": shape.reusable, "ephemeral": shape.ephemeral,
        "preauthorized": shape.preauthorized, "tags": shape.tags,
        "serviceAccount": shape.service_account, "create": shape.create_service_account,
        "role": shape.role, "scopes": shape.scopes,
        "description": key.description(),
        "expiry": key.expiry(),
        "secret": key.secret_spec(),
    });
    let hash = secret::data_hash([(&"shape".to_owned(), value.to_string().as_bytes())]);
    hash.replacen("sha256:", "", 1)[..16].to_owned()
}

fn secret_name<K: ManagedKey>(key: &K) -> String {
    key.secret_spec()
        .name
        .clone()
        .unwrap_or_else(|| key.name_any())
}

fn now_time() -> Time {
    Time(Timestamp::now())
}

/// Sets a condition, keeping `lastTransitionTime` when the status did not change.
pub(crate) fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) {
    let status = if status { "True" } else { "False" }.to_owned();
    let existing = conditions.iter().position(|c| c.type_ == type_);
    let transition = match existing.map(|i| &conditions[i]) {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now_time(),
    };
    let condition = Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation: generation,
        last_transition_time: transition,
    };
    match existing {
        Some(i) => conditions[i] = condition,
        None => conditions.push(condition),
    }
}

/// Drops timestamps so "did anything change?" compares meaning, not clock.
pub(crate) fn comparable<S: Serialize>(status: &S) -> serde_json::Value {
    let mut v = serde_json::to_value(status).unwrap_or_default();
    if let Some(conditions) = v.get_mut("conditions").and_then(|c| c.as_array_mut()) {
        for c in conditions {
            if let Some(o) = c.as_object_mut() {
                o.remove("lastTransitionTime");
            }
        }
    }
    v
}

/// Writes an object's status with server-side apply (keys and providers alike).
pub(crate) async fn write_status<R, S>(api: &Api<R>, object: &R, status: &S) -> Result<()>
where
    R: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize,
{
    let patch = json!({
        "apiVersion": R::api_version(&()),
        "kind": R::kind(&()),
        "status": status,
    });
    api.patch_status(
        &object.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}

async fn publish<K: ManagedKey>(
    ctx: &Context,
    key: &K,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = KubeEvent {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: reason.to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &key.object_ref(&())).await {
        warn!(error = %e, "could not publish event");
    }
}

/// Finds the provider a key names, checks policy and credentials, and builds its API.
/// Every failure is a `NotReady` whose message says what to create or fix.
async fn resolve<K: ManagedKey>(
    ctx: &Context,
    key: &K,
    lifetime: Option<Duration>,
    enforce_policy: bool,
) -> Result<Arc<dyn KeyApi>> {
    let namespace = key.namespace().unwrap_or_default();
    let reference = key.provider_ref();
    let (id, display) = provider_names(reference.kind, &namespace, &reference.name);
    let (spec, cluster, credentials_namespace) = match reference.kind {
        ProviderKind::KeyProvider => {
            let api: Api<KeyProvider> = Api::namespaced(ctx.client.clone(), &namespace);
            let provider = api.get_opt(&reference.name).await?.ok_or_else(|| Error::NotReady {
                reason: "ProviderNotFound",
                message: format!(
                    "KeyProvider {} does not exist in namespace {namespace}; create it, or point spec.providerRef at an existing provider (kind: ClusterKeyProvider for a cluster-wide one)",
                    reference.name
                ),
            })?;
            (provider.spec, false, namespace.clone())
        }
        ProviderKind::ClusterKeyProvider => {
            let api: Api<ClusterKeyProvider> = Api::all(ctx.client.clone());
            let provider = api.get_opt(&reference.name).await?.ok_or_else(|| Error::NotReady {
                reason: "ProviderNotFound",
                message: format!(
                    "ClusterKeyProvider {} does not exist; create it, or point spec.providerRef at an existing provider",
                    reference.name
                ),
            })?;
            (
                providers::cluster_spec(&provider.spec),
                true,
                ctx.settings.operator_namespace.clone(),
            )
        }
    };

    let labels = if cluster {
        let api: Api<Namespace> = Api::all(ctx.client.clone());
        api.get(&namespace).await?.labels().clone()
    } else {
        BTreeMap::new()
    };
    let shape = key.shape();
    // Policy limits what may be minted; revoking on delete only takes access away and
    // must work for a key the policy does not (or no longer) allow.
    if enforce_policy {
        policy::check(
            spec.policy.as_ref(),
            &policy::Request {
                namespace: &namespace,
                namespace_labels: &labels,
                shape: &shape,
                lifetime,
                cluster_scoped: cluster,
            },
        )
        .map_err(|v| Error::NotReady {
            reason: v.rule,
            message: format!("{display}: {}", v.message),
        })?;
    }

    metrics::global().resolved(&KeyRef::of(key), providers::provider_type(&spec));
    build_provider(ctx, id, display, spec, &credentials_namespace).await
}

/// `(id, display)` of a provider: the id keys the state kept across reconciles
/// (`KeyProvider/<ns>/<name>`), the display names it in messages.
pub(crate) fn provider_names(kind: ProviderKind, namespace: &str, name: &str) -> (String, String) {
    match kind {
        ProviderKind::KeyProvider => (
            format!("KeyProvider/{namespace}/{name}"),
            format!("KeyProvider {namespace}/{name}"),
        ),
        ProviderKind::ClusterKeyProvider => (
            format!("ClusterKeyProvider/{name}"),
            format!("ClusterKeyProvider {name}"),
        ),
    }
}

/// Reads a provider's credential Secret and builds its key API. Failures are
/// `NotReady` with `CredentialsNotFound`, `CredentialsInvalid` or
/// `ProviderMisconfigured`, each saying what to create or fix.
pub(crate) async fn build_provider(
    ctx: &Context,
    id: String,
    display: String,
    spec: KeyProviderSpec,
    credentials_namespace: &str,
) -> Result<Arc<dyn KeyApi>> {
    let mut credentials = BTreeMap::new();
    if let Some((name, required)) = providers::credential_secret(&spec) {
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), credentials_namespace);
        let found = api.get_opt(&name).await?.ok_or_else(|| Error::NotReady {
            reason: "CredentialsNotFound",
            message: format!(
                "{display} reads its credentials from Secret {credentials_namespace}/{name}, which does not exist; create it"
            ),
        })?;
        for (k, v) in found.data.unwrap_or_default() {
            credentials.insert(k, v.0);
        }
        if let Some(missing) = required.iter().find(|k| !credentials.contains_key(*k)) {
            return Err(Error::NotReady {
                reason: "CredentialsInvalid",
                message: format!(
                    "Secret {credentials_namespace}/{name} has no data key {missing}, which {display} needs"
                ),
            });
        }
    }
    let resolved = ResolvedProvider {
        id,
        display,
        spec,
        credentials,
    };
    ctx.factory
        .build(&resolved)
        .await
        .map_err(|e| Error::NotReady {
            reason: "ProviderMisconfigured",
            message: e.to_string(),
        })
}

/// The requested lifetime, or the provider's default, checked against its bounds.
fn lifetime<K: ManagedKey>(key: &K, api: Option<&dyn KeyApi>) -> Result<Option<Duration>> {
    let caps = api.map(|a| a.capabilities()).unwrap_or_default();
    let asked = key.expiry().and_then(|d| d.to_std());
    let lifetime = asked.or(caps.default_lifetime);
    if let (Some(l), Some(max)) = (lifetime, caps.max_lifetime)
        && l > max
    {
        return Err(Error::NotReady {
            reason: "ExpiryOutOfRange",
            message: format!(
                "spec.expiry asks for {}s but the provider grants at most {}s; lower spec.expiry",
                l.as_secs(),
                max.as_secs()
            ),
        });
    }
    if let (Some(l), Some(min)) = (lifetime, caps.min_lifetime)
        && l < min
    {
        return Err(Error::NotReady {
            reason: "ExpiryOutOfRange",
            message: format!(
                "spec.expiry asks for {}s but the provider needs at least {}s; raise spec.expiry",
                l.as_secs(),
                min.as_secs()
            ),
        });
    }
    Ok(lifetime)
}

/// Finishes an issuance that was in flight when keyward stopped: adopt the key if it
/// reached the Secret, otherwise revoke whatever upstream carries the marker.
async fn recover<K: ManagedKey>(
    ctx: &Context,
    key: &K,
    api: &dyn KeyApi,
    status: &mut KeyStatus,
    secret: Option<&Secret>,
    rotation: &Rotation,
) -> Result<()> {
    let Some(attempt) = status.attempt.clone() else {
        return Ok(());
    };
    let annotations = secret.map(|s| s.annotations().clone()).unwrap_or_default();
    if annotations.get(ATTEMPT_ANNOTATION) == Some(&attempt.id) {
        let parse = |k: &str| annotations.get(k).and_then(|v| v.parse::<Timestamp>().ok());
        let created = parse(secret::CREATED_AT_ANNOTATION).unwrap_or_else(Timestamp::now);
        let expires = parse(secret::EXPIRES_AT_ANNOTATION);
        let issued = AdoptedKey {
            id: annotations
                .get(KEY_ID_ANNOTATION)
                .cloned()
                .unwrap_or_default(),
            created,
            expires,
        };
        let trigger = trigger_from_reason(&attempt.reason);
        info!(key = %key.name_any(), attempt = %attempt.id, "adopting the key an interrupted issuance wrote to the Secret");
        complete(
            key,
            status,
            &issued,
            trigger,
            secret.map(secret::secret_hash),
            rotation,
        );
        return Ok(());
    }
    let shape = key.shape();
    for orphan in api
        .find_orphans(&interrupted(&attempt, &shape, status))
        .await?
    {
        api.revoke(&orphan).await?;
        metrics::global().revoked(&KeyRef::of(key));
        publish(ctx, key, EventType::Normal, "RevokedOrphan", format!(
            "revoked upstream key {orphan}: issued by an interrupted attempt ({}) that never reached the Secret",
            attempt.marker
        ))
        .await;
    }
    status.attempt = None;
    Ok(())
}

/// What [`KeyApi::find_orphans`] needs to know about an interrupted attempt.
fn interrupted<'a>(
    attempt: &'a IssueAttempt,
    shape: &'a KeyShape,
    status: &KeyStatus,
) -> providers::Interrupted<'a> {
    providers::Interrupted {
        marker: &attempt.marker,
        shape,
        started_at: attempt.started_at.0,
        held: status
            .key_id
            .iter()
            .cloned()
            .chain(status.retiring.iter().map(|r| r.key_id.clone()))
            .collect(),
    }
}

fn trigger_from_reason(reason: &str) -> Trigger {
    [
        Trigger::Initial,
        Trigger::SpecChanged,
        Trigger::ForcedRotation,
        Trigger::SecretMissing,
        Trigger::SecretMismatch,
        Trigger::KeyInvalid,
        Trigger::Expired,
    ]
    .into_iter()
    .find(|t| t.reason() == reason)
    .unwrap_or(Trigger::Renewing)
}

/// The non-secret facts of a key, whether just issued or adopted from the Secret.
struct AdoptedKey {
    id: String,
    created: Timestamp,
    expires: Option<Timestamp>,
}

impl From<&IssuedKey> for AdoptedKey {
    fn from(k: &IssuedKey) -> Self {
        Self {
            id: k.id.clone(),
            created: k.created_at,
            expires: k.expires_at,
        }
    }
}

/// Status after a new key reached the Secret: the previous key retires (after the
/// overlap, or at once when it can no longer be vouched for).
fn complete<K: ManagedKey>(
    key: &K,
    status: &mut KeyStatus,
    issued: &AdoptedKey,
    trigger: Trigger,
    secret_hash: Option<String>,
    rotation: &Rotation,
) {
    let now = Timestamp::now();
    if let Some(previous) = status.key_id.take()
        && previous != issued.id
    {
        let revoke_at = if trigger.retire_with_overlap() {
            let overlap =
                jiff::SignedDuration::try_from(lifecycle::overlap(rotation)).unwrap_or_default();
            let at = now.checked_add(overlap).unwrap_or(now);
            // Status stores whole seconds; round up so the overlap is never cut short.
            Timestamp::from_second(at.as_second() + 1).unwrap_or(at)
        } else {
            now
        };
        status.retiring.push(RetiringKey {
            key_id: previous,
            revoke_at: Time(revoke_at),
            reason: trigger.reason().to_owned(),
        });
    }
    let revision = status.revision.unwrap_or(0) + 1;
    // Whole seconds: status times are stored that way, and computing renewal from the
    // same value before and after a round trip keeps reconciles write-free.
    let second = |t: Timestamp| Timestamp::from_second(t.as_second()).unwrap_or(t);
    status.key_id = Some(issued.id.clone());
    status.created_at = Some(Time(second(issued.created)));
    status.expires_at = issued.expires.map(|t| Time(second(t)));
    status.revision = Some(revision);
    status.secret_hash = secret_hash;
    status.shape = Some(shape_digest(key));
    status.secret_name = Some(secret_name(key));
    status.attempt = None;
    status.invalid = None;
    status.last_inspected_at = None;
    if trigger == Trigger::ForcedRotation {
        status.rotate_request = key.annotations().get(ROTATE_ANNOTATION).cloned();
    }
}

/// Whether the cached object predates the stored one — our own last status write can
/// still be on its way (a Secret event can requeue the key before the status event
/// arrives). Issuing, and revoking an attempt's orphans, are never done on stale
/// state: a stale attempt that has since been refused and cleared would have keyward
/// look for orphans it never made, and Prefect's name-based search would find a
/// service account that belongs to someone else.
async fn is_stale<K: ManagedKey>(keys: &Api<K>, key: &K) -> Result<bool> {
    let fresh = keys.get(&key.name_any()).await?;
    Ok(fresh.meta().resource_version != key.meta().resource_version)
}

/// The reconcile of one key resource (finalizer already present).
async fn apply<K: ManagedKey>(key: Arc<K>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = key.namespace().unwrap_or_default();
    let keys: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let generation = key.meta().generation;
    let original = key.key_status().cloned().unwrap_or_default();
    if original.attempt.is_some() && is_stale(&keys, &*key).await? {
        return Ok(Action::requeue(Duration::from_millis(100)));
    }
    let mut status = original.clone();
    let rotation = key.rotation().cloned().unwrap_or_default();

    let resolved = async {
        let requested = lifetime(&*key, None)?;
        let api = resolve(&ctx, &*key, requested, true).await?;
        let lifetime = lifetime(&*key, Some(api.as_ref()))?;
        secret::check_template(key.secret_spec()).map_err(|e| Error::NotReady {
            reason: "TemplateInvalid",
            message: e.to_string(),
        })?;
        // The request as it would be sent, with a marker of the real length.
        let probe = issue_request(&*key, &rotation, &status, "00000000", lifetime, None);
        api.check(&probe).map_err(|r| Error::NotReady {
            reason: r.reason,
            message: r.message,
        })?;
        Ok::<_, Error>((api, lifetime))
    }
    .await;
    let (api, lifetime) = match resolved {
        Ok(r) => r,
        Err(Error::NotReady { reason, message }) => {
            metrics::global().failed(&KeyRef::of(&*key), "resolve");
            set_condition(
                &mut status.conditions,
                "Ready",
                false,
                reason,
                &message,
                generation,
            );
            status.observed_generation = generation;
            if comparable(&status) != comparable(&original) {
                write_status(&keys, &key, &status).await?;
                publish(&ctx, &*key, EventType::Warning, reason, message.clone()).await;
            }
            return Err(Error::NotReady { reason, message });
        }
        Err(e) => return Err(e),
    };

    let name = secret_name(&*key);
    let secret = secrets.get_opt(&name).await?;
    recover(
        &ctx,
        &*key,
        api.as_ref(),
        &mut status,
        secret.as_ref(),
        &rotation,
    )
    .await?;

    inspect(&ctx, &*key, api.as_ref(), &mut status, &rotation).await;

    let shape = shape_digest(&*key);
    let current_hash = secret.as_ref().map(secret::secret_hash);
    let reissue_when_invalid = rotation.reissue_when_invalid.unwrap_or(true);
    let trigger = lifecycle::trigger(&Observed {
        status: &status,
        shape: &shape,
        rotate_request: key.annotations().get(ROTATE_ANNOTATION).map(String::as_str),
        secret_hash: current_hash.as_deref(),
        reissue_when_invalid,
        now: Timestamp::now(),
    });

    if let Some(trigger) = trigger {
        if let Some(wait) = ctx.issue_wait(&*key) {
            return Ok(Action::requeue(wait));
        }
        if is_stale(&keys, &*key).await? {
            return Ok(Action::requeue(Duration::from_millis(100)));
        }
        let issued = issue(
            &ctx,
            &*key,
            &keys,
            &secrets,
            api.as_ref(),
            &mut status,
            trigger,
            lifetime,
        )
        .await;
        match issued {
            Ok(()) => ctx.forget_failed_issuances(&*key),
            Err(Error::Provider(e)) => {
                ctx.issue_failed(&*key);
                metrics::global().failed(&KeyRef::of(&*key), "issue");
                let message = format!("issuing a key failed: {e}");
                let failure = match &e {
                    ProviderError::Refused { reason, .. } => reason,
                    _ => "IssueFailed",
                };
                // A refusal issued nothing upstream: no orphan to look for later
                // (and nothing someone else owns is mistaken for one).
                if matches!(e, ProviderError::Refused { .. }) {
                    status.attempt = None;
                }
                set_condition(
                    &mut status.conditions,
                    "Issuing",
                    false,
                    failure,
                    &message,
                    generation,
                );
                let ready = status.key_id.is_some() && status.invalid.is_none();
                let reason = if ready { "Issued" } else { failure };
                let ready_message = if ready {
                    "the previous key is still in place"
                } else {
                    &message
                };
                set_condition(
                    &mut status.conditions,
                    "Ready",
                    ready,
                    reason,
                    ready_message,
                    generation,
                );
                set_condition(
                    &mut status.conditions,
                    "Degraded",
                    true,
                    failure,
                    &message,
                    generation,
                );
                write_status(&keys, &key, &status).await?;
                publish(&ctx, &*key, EventType::Warning, failure, message).await;
                return Err(Error::Provider(e));
            }
            Err(e) => return Err(e),
        }
        // A key written to a new Secret name leaves the old Secret behind: remove it.
        if let Some(old) = original.secret_name.as_deref().filter(|old| *old != name) {
            delete_owned_secret(&secrets, old, &*key).await?;
        }
    }

    // Retire keys whose overlap is over.
    let now = Timestamp::now();
    let mut revoke_error = None;
    let mut still_retiring = Vec::new();
    for retiring in std::mem::take(&mut status.retiring) {
        if retiring.revoke_at.0 > now {
            still_retiring.push(retiring);
            continue;
        }
        match api.revoke(&retiring.key_id).await {
            Ok(()) => {
                metrics::global().revoked(&KeyRef::of(&*key));
                publish(
                    &ctx,
                    &*key,
                    EventType::Normal,
                    "Revoked",
                    format!(
                        "revoked previous key {} ({})",
                        retiring.key_id, retiring.reason
                    ),
                )
                .await;
            }
            Err(e) => {
                metrics::global().failed(&KeyRef::of(&*key), "revoke");
                revoke_error = Some(format!(
                    "revoking previous key {} failed: {e}",
                    retiring.key_id
                ));
                still_retiring.push(retiring);
            }
        }
    }
    status.retiring = still_retiring;

    // Renewal time follows the current rotation settings without re-issuing.
    if let Some(created) = status.created_at.as_ref().map(|t| t.0) {
        let seed = format!(
            "{}/{}",
            key.uid().unwrap_or_default(),
            status.revision.unwrap_or(0)
        );
        status.renewal_time = lifecycle::renewal_time(
            created,
            status.expires_at.as_ref().map(|t| t.0),
            &rotation,
            &seed,
        )
        .map(Time);
    }
    status.observed_generation = generation;
    let revision = status.revision.unwrap_or(0);
    let key_id = status.key_id.clone().unwrap_or_default();
    match status.invalid.clone() {
        Some(state) => set_condition(
            &mut status.conditions,
            "Ready",
            false,
            "KeyInvalid",
            &format!(
                "the upstream reports key {key_id} (revision {revision}) as {state}; \
                 rotation.reissueWhenInvalid is false, so keyward leaves it in Secret {name}: \
                 set reissueWhenInvalid to true, or annotate {ROTATE_ANNOTATION} to issue a new key"
            ),
            generation,
        ),
        None => set_condition(
            &mut status.conditions,
            "Ready",
            true,
            "Issued",
            &format!("key {key_id} (revision {revision}) is in Secret {name}"),
            generation,
        ),
    }
    set_condition(
        &mut status.conditions,
        "Issuing",
        false,
        "Idle",
        "no issuance in progress",
        generation,
    );
    match &revoke_error {
        Some(message) => set_condition(
            &mut status.conditions,
            "Degraded",
            true,
            "RevokeFailed",
            message,
            generation,
        ),
        None => set_condition(
            &mut status.conditions,
            "Degraded",
            false,
            "AsExpected",
            "all upstream calls succeeded",
            generation,
        ),
    }
    if comparable(&status) != comparable(&original) {
        write_status(&keys, &key, &status).await?;
        ctx.crash_at(CrashPoint::AfterStatusWrite)?;
    }
    if let Some(message) = revoke_error {
        publish(
            &ctx,
            &*key,
            EventType::Warning,
            "RevokeFailed",
            message.clone(),
        )
        .await;
        return Err(Error::Provider(ProviderError::Unavailable(message)));
    }
    let next_inspection = api
        .capabilities()
        .inspect
        .then(|| lifecycle::next_inspection(&status, &rotation))
        .flatten();
    Ok(next_wake(&*key, &status, next_inspection))
}

/// The request for a new key: the spec's shape and description, the marker, and the
/// key it replaces (for providers that rotate natively).
fn issue_request<K: ManagedKey>(
    key: &K,
    rotation: &Rotation,
    status: &KeyStatus,
    attempt_id: &str,
    lifetime: Option<Duration>,
    trigger: Option<Trigger>,
) -> IssueRequest {
    let overlap = match trigger {
        Some(t) if t.retire_with_overlap() => lifecycle::overlap(rotation),
        // The probe for `KeyApi::check` carries the configured overlap, so a provider
        // can refuse one it cannot honour before anything is issued.
        None => lifecycle::overlap(rotation),
        _ => Duration::ZERO,
    };
    IssueRequest {
        marker: lifecycle::marker(&key.uid().unwrap_or_default(), attempt_id),
        description: key.description().map(str::to_owned),
        lifetime,
        shape: key.shape(),
        previous: status.key_id.clone(),
        overlap,
    }
}

/// Asks the upstream whether the current key still works, when the inspect interval
/// has passed (providers that can tell). A key found unusable is marked in
/// `status.invalid`; the trigger chain decides whether it is reissued. A failed
/// inspection is logged and tried again at the next interval: it says nothing about
/// the key.
async fn inspect<K: ManagedKey>(
    ctx: &Context,
    key: &K,
    api: &dyn KeyApi,
    status: &mut KeyStatus,
    rotation: &Rotation,
) {
    if !api.capabilities().inspect {
        return;
    }
    let now = Timestamp::now();
    let (Some(due), Some(id)) = (
        lifecycle::next_inspection(status, rotation),
        status.key_id.clone(),
    ) else {
        return;
    };
    if due > now {
        return;
    }
    match api.inspect(&id).await {
        Ok(KeyState::Valid | KeyState::Unknown) => {}
        Ok(state) => {
            let state = format!("{state:?}");
            info!(kind = K::KIND, name = %key.name_any(), key_id = %id, state = %state, "upstream reports the key as no longer usable");
            publish(
                ctx,
                key,
                EventType::Warning,
                "KeyInvalid",
                format!("the upstream reports key {id} as {state}"),
            )
            .await;
            status.invalid = Some(state);
        }
        Err(e) => {
            metrics::global().failed(&KeyRef::of(key), "inspect");
            warn!(kind = K::KIND, name = %key.name_any(), key_id = %id, error = %e, "inspecting the key failed; trying again at the next interval");
        }
    }
    status.last_inspected_at = Some(Time(Timestamp::from_second(now.as_second()).unwrap_or(now)));
}

/// Issues a new key and writes it to the Secret, persisting the attempt first.
#[allow(clippy::too_many_arguments)]
async fn issue<K: ManagedKey>(
    ctx: &Context,
    key: &K,
    keys: &Api<K>,
    secrets: &Api<Secret>,
    api: &dyn KeyApi,
    status: &mut KeyStatus,
    trigger: Trigger,
    lifetime: Option<Duration>,
) -> Result<()> {
    let generation = key.meta().generation;
    let attempt_id = lifecycle::attempt_id();
    let marker = lifecycle::marker(&key.uid().unwrap_or_default(), &attempt_id);
    status.attempt = Some(IssueAttempt {
        id: attempt_id.clone(),
        marker: marker.clone(),
        reason: trigger.reason().to_owned(),
        started_at: now_time(),
    });
    set_condition(
        &mut status.conditions,
        "Issuing",
        true,
        trigger.reason(),
        "issuing a new key",
        generation,
    );
    write_status(keys, key, status).await?;
    ctx.crash_at(CrashPoint::BeforeUpstream)?;

    let rotation = key.rotation().cloned().unwrap_or_default();
    let request = issue_request(key, &rotation, status, &attempt_id, lifetime, Some(trigger));
    let issued = api.issue(&request).await?;
    ctx.crash_at(CrashPoint::AfterUpstream)?;

    let revision = status.revision.unwrap_or(0) + 1;
    let namespace = key.namespace().unwrap_or_default();
    let name = secret_name(key);
    let vars = secret::Variables {
        key: &issued.value,
        key_id: &issued.id,
        created_at: issued.created_at.to_string(),
        expires_at: issued.expires_at.map(|t| t.to_string()).unwrap_or_default(),
        revision,
        name: &key.name_any(),
        namespace: &namespace,
    };
    let rendered = secret::render_all(key.secret_spec(), &vars).map_err(|e| Error::NotReady {
        reason: "TemplateInvalid",
        message: e.to_string(),
    })?;
    let mut annotations = BTreeMap::from([
        (KEY_ID_ANNOTATION.to_owned(), issued.id.clone()),
        (ATTEMPT_ANNOTATION.to_owned(), attempt_id),
        (secret::REVISION_ANNOTATION.to_owned(), revision.to_string()),
        (
            secret::CREATED_AT_ANNOTATION.to_owned(),
            issued.created_at.to_string(),
        ),
    ]);
    if let Some(expires) = issued.expires_at {
        annotations.insert(
            secret::EXPIRES_AT_ANNOTATION.to_owned(),
            expires.to_string(),
        );
    }
    let owner = key
        .controller_owner_ref(&())
        .expect("key resources have a name and uid");
    let object = secret::build(&name, &namespace, owner, rendered, annotations);
    let written = secrets
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await?;
    ctx.crash_at(CrashPoint::AfterSecretWrite)?;

    let previous = status.key_id.clone();
    complete(
        key,
        status,
        &AdoptedKey::from(&issued),
        trigger,
        Some(secret::secret_hash(&written)),
        &rotation,
    );
    let (reason, note) = match previous {
        None => (
            "Issued",
            format!("issued key {} into Secret {name}", issued.id),
        ),
        Some(previous) => (
            "Rotated",
            format!(
                "rotated to key {} in Secret {name} ({}); previous key {previous} retires",
                issued.id,
                trigger.reason()
            ),
        ),
    };
    info!(kind = K::KIND, namespace = %namespace, name = %key.name_any(), key_id = %issued.id, reason = trigger.reason(), "{reason}");
    metrics::global().rotated(&KeyRef::of(key), trigger.reason());
    publish(ctx, key, EventType::Normal, reason, note).await;
    Ok(())
}

/// Deletes a Secret only if this key resource controls it.
async fn delete_owned_secret<K: ManagedKey>(
    secrets: &Api<Secret>,
    name: &str,
    key: &K,
) -> Result<()> {
    let Some(found) = secrets.get_opt(name).await? else {
        return Ok(());
    };
    let uid = key.uid();
    let owned = found
        .owner_references()
        .iter()
        .any(|o| Some(&o.uid) == uid.as_ref() && o.controller == Some(true));
    if owned {
        match secrets.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Requeue exactly when something is due: renewal, the end of an overlap, expiry or
/// the next inspection.
fn next_wake<K: ManagedKey>(
    key: &K,
    status: &KeyStatus,
    next_inspection: Option<Timestamp>,
) -> Action {
    let now = Timestamp::now();
    let due = status
        .retiring
        .iter()
        .map(|r| r.revoke_at.0)
        .chain(status.renewal_time.as_ref().map(|t| t.0))
        .chain(status.expires_at.as_ref().map(|t| t.0))
        .chain(next_inspection)
        .min();
    match due {
        Some(at) => {
            let wait = at.duration_since(now);
            let wait = Duration::try_from(wait).unwrap_or(Duration::ZERO);
            let wait = wait.max(Duration::from_millis(200));
            metrics::global().scheduled(&KeyRef::of(key), Some(wait));
            Action::requeue(wait)
        }
        None => {
            metrics::global().scheduled(&KeyRef::of(key), None);
            Action::await_change()
        }
    }
}

/// Delete: revoke every key the resource holds (unless `Retain`), remove the Secret,
/// then let the finalizer go. Any upstream failure keeps the finalizer.
async fn cleanup<K: ManagedKey>(key: Arc<K>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = key.namespace().unwrap_or_default();
    let keys: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let generation = key.meta().generation;
    let original = key.key_status().cloned().unwrap_or_default();
    if original.attempt.is_some() && is_stale(&keys, &*key).await? {
        return Ok(Action::requeue(Duration::from_millis(100)));
    }
    let mut status = original.clone();
    ctx.forget_failed_issuances(&*key);

    // A key that never got as far as an upstream call holds nothing to revoke, and
    // must not need a (perhaps missing) provider to be deleted.
    let holds_keys =
        status.key_id.is_some() || !status.retiring.is_empty() || status.attempt.is_some();
    if holds_keys && key.deletion_policy() == DeletionPolicy::Revoke {
        let result = async {
            let api = match resolve(&ctx, &*key, None, false).await {
                Ok(api) => api,
                Err(Error::NotReady { reason, message }) => {
                    return Err(Error::NotReady {
                        reason,
                        message: format!("cannot revoke keys on delete: {message}; or set spec.deletionPolicy: Retain to let the resource go without revoking"),
                    });
                }
                Err(e) => return Err(e),
            };
            if let Some(attempt) = status.attempt.clone() {
                let shape = key.shape();
                for orphan in api.find_orphans(&interrupted(&attempt, &shape, &status)).await? {
                    api.revoke(&orphan).await?;
                }
                status.attempt = None;
            }
            let held: Vec<String> = status
                .key_id
                .iter()
                .cloned()
                .chain(status.retiring.iter().map(|r| r.key_id.clone()))
                .collect();
            for id in held {
                api.revoke(&id).await?;
                metrics::global().revoked(&KeyRef::of(&*key));
                status.retiring.retain(|r| r.key_id != id);
                if status.key_id.as_deref() == Some(id.as_str()) {
                    status.key_id = None;
                }
                publish(&ctx, &*key, EventType::Normal, "Revoked", format!("revoked key {id} on delete")).await;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            metrics::global().failed(
                &KeyRef::of(&*key),
                if matches!(e, Error::NotReady { .. }) {
                    "resolve"
                } else {
                    "revoke"
                },
            );
            let (reason, message) = match &e {
                Error::NotReady { reason, message } => (*reason, message.clone()),
                other => (
                    "RevokeFailed",
                    format!("revoking keys on delete failed: {other}; keyward retries"),
                ),
            };
            set_condition(
                &mut status.conditions,
                "Ready",
                false,
                reason,
                &message,
                generation,
            );
            set_condition(
                &mut status.conditions,
                "Degraded",
                true,
                reason,
                &message,
                generation,
            );
            if comparable(&status) != comparable(&original) {
                write_status(&keys, &key, &status).await?;
            }
            publish(&ctx, &*key, EventType::Warning, reason, message).await;
            return Err(e);
        }
    }
    for name in status
        .secret_name
        .iter()
        .cloned()
        .chain([secret_name(&*key)])
    {
        delete_owned_secret(&secrets, &name, &*key).await?;
    }
    metrics::global().key_forgotten(&KeyRef::of(&*key));
    Ok(Action::await_change())
}

async fn reconcile<K: ManagedKey>(key: Arc<K>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = key.namespace().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let started = metrics::global().reconcile_started(&KeyRef::of(&*key));
    let result = finalizer(&api, FINALIZER, key.clone(), |event| async {
        match event {
            Finalizer::Apply(k) => apply(k, ctx.clone()).await,
            Finalizer::Cleanup(k) => cleanup(k, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.reconciles.fetch_add(1, Ordering::Relaxed);
    metrics::global().reconciled(&KeyRef::of(&*key), started, result.is_ok());
    if key.meta().deletion_timestamp.is_none() {
        // The cached status; a status this reconcile wrote arrives as the next event.
        metrics::global().key_observed(&KeyRef::of(&*key), key.key_status());
    }
    if result.is_ok() {
        ctx.failures
            .lock()
            .unwrap()
            .remove(&key.uid().unwrap_or_default());
    }
    result
}

/// Exponential backoff per object: 1s, 2s, 4s … capped at 5 minutes.
fn error_policy<K: ManagedKey>(key: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    let uid = key.uid().unwrap_or_default();
    let mut failures = ctx.failures.lock().unwrap();
    let n = failures.entry(uid).or_insert(0);
    *n = n.saturating_add(1);
    let wait = backoff_after(*n);
    metrics::global().scheduled(&KeyRef::of(&*key), Some(wait));
    warn!(kind = K::KIND, name = %key.name_any(), namespace = %key.namespace().unwrap_or_default(), error = %error, retry_in = ?wait, "reconcile failed");
    Action::requeue(wait)
}

/// Runs the controller of one key kind in one namespace (None: all) until `shutdown`
/// resolves.
async fn run_kind<K: ManagedKey>(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (keys, secrets): (Api<K>, Api<Secret>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let managed = watcher::Config::default().labels(&format!(
        "{}={}",
        secret::MANAGED_BY_LABEL,
        secret::MANAGED_BY
    ));
    let controller = Controller::new(keys, watcher::Config::default());
    let store = controller.store();
    let store_cluster = store.clone();
    let namespaced_providers: Api<KeyProvider> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    controller
        .owns(secrets, managed)
        .watches(
            namespaced_providers,
            watcher::Config::default(),
            move |provider: KeyProvider| {
                let ns = provider.namespace();
                let name = provider.name_any();
                store
                    .state()
                    .into_iter()
                    .filter(|k| {
                        k.provider_ref().kind == ProviderKind::KeyProvider
                            && k.provider_ref().name == name
                            && k.namespace() == ns
                    })
                    .map(|k| ObjectRef::from_obj(&*k))
                    .collect::<Vec<_>>()
            },
        )
        .watches(
            Api::<ClusterKeyProvider>::all(client),
            watcher::Config::default(),
            move |provider: ClusterKeyProvider| {
                let name = provider.name_any();
                store_cluster
                    .state()
                    .into_iter()
                    .filter(|k| {
                        k.provider_ref().kind == ProviderKind::ClusterKeyProvider
                            && k.provider_ref().name == name
                    })
                    .map(|k| ObjectRef::from_obj(&*k))
                    .collect::<Vec<_>>()
            },
        )
        .with_config(
            kube::runtime::controller::Config::default().concurrency(ctx.settings.concurrency),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile::<K>, error_policy::<K>, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// The namespaces to run controllers for: `None` (all), or each listed one once — a
/// namespace listed twice must not get two controllers reconciling its keys.
pub(crate) fn watched_namespaces(settings: &Settings) -> Vec<Option<String>> {
    let listed: std::collections::BTreeSet<&String> = settings.namespaces.iter().collect();
    if listed.is_empty() {
        vec![None]
    } else {
        listed.into_iter().cloned().map(Some).collect()
    }
}

/// Runs both key controllers and the provider status controllers until `shutdown`
/// resolves: once for all namespaces, or once per namespace of `settings.namespaces`
/// (each with its own watches and `concurrency`; `ClusterKeyProvider`s are watched by
/// each).
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let controllers = watched_namespaces(&ctx.settings)
        .into_iter()
        .flat_map(|ns| {
            [
                run_kind::<AuthKey>(ctx.clone(), ns.clone(), shutdown.clone()).boxed(),
                run_kind::<ServiceAccountKey>(ctx.clone(), ns, shutdown.clone()).boxed(),
            ]
        });
    futures::join!(
        futures::future::join_all(controllers),
        crate::provider_status::run(ctx, shutdown),
    );
}
