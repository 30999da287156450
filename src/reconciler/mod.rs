//! The controllers for `AuthKey` and `ServiceAccountKey`: watches that decide when a
//! key is looked at, and an executor ([`executor`]) that carries out what
//! [`crate::lifecycle`] plans for it against the API server and the provider
//! ([`KubeWorld`]).
//!
//! How an issuance survives a crash at any point (each step is one planner step):
//! 1. status.attempt (marker, shape, rotate request, Secret, revision), written
//!    guarded by `resourceVersion` — not for a provider that mints locally.
//! 2. the upstream create, carrying the marker — crash after 1 or 2: the attempt
//!    stays in status until its create can no longer land (the landing window), then
//!    whatever upstream carries the marker is revoked and a new attempt begins.
//! 3. the Secret, annotated with the attempt — crash after: the next reconcile finds
//!    the attempt's key in the Secret and adopts it, recording what the attempt was
//!    for.
//! 4. status (key id, times, revision, hash; attempt cleared), guarded.

mod executor;
mod memo;
mod rollout;
mod watches;
mod world;

use std::{
    collections::HashMap,
    fmt::Debug,
    hash::{DefaultHasher, Hash, Hasher},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{FutureExt, Stream, StreamExt, stream::BoxStream};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::{
    Api, Resource, ResourceExt,
    core::PartialObjectMeta,
    runtime::{
        Controller,
        controller::Action,
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use serde::{Serialize, de::DeserializeOwned};
use tracing::warn;

pub use crate::context::{Context, CrashPoint, Error, Faults, MANAGER, NoFaults, Result, Settings};
pub use executor::{World, reconcile as execute};
pub use memo::Memo;
pub use rollout::Workloads;
pub use watches::Shared;
pub use world::KubeWorld;

use crate::{
    lifecycle::{self, IssuedFacts, KeyView, ROTATE_ANNOTATION, ShapeInput, Wake},
    metrics::{self, KeyRef},
    provider_status,
    providers::{KeyShape, SecretValue},
    resolve::{Caches, KeyApis},
    resources::{
        AuthKey, ClusterKeyProvider, DeletionPolicy, IssueAttempt, KeyDuration, KeyProvider,
        KeyStatus, ProviderKind, ProviderRef, RolloutTarget, Rotation, SecretSpec,
        ServiceAccountKey,
    },
    secret::{self, CachedSecret},
};

/// Finalizer on every key resource that can hold something upstream (not `builtin`):
/// revoke upstream before the resource goes.
pub const FINALIZER: &str = "keyward.dev/revoke";

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
    fn rollout(&self) -> &[RolloutTarget];
    /// A pending rotate request as the key cache keeps it (see [`cut_key`]).
    fn cached_rotate_request(&self) -> Option<&str>;
    fn cache_rotate_request(&mut self, request: Option<Box<str>>);
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
        fn rollout(&self) -> &[RolloutTarget] {
            &self.spec.rollout
        }
        fn cached_rotate_request(&self) -> Option<&str> {
            self.spec.cached_rotate_request.as_deref()
        }
        fn cache_rotate_request(&mut self, request: Option<Box<str>>) {
            self.spec.cached_rotate_request = request;
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

/// The Secret the spec names (default: the resource's name).
pub fn secret_name<K: ManagedKey>(key: &K) -> String {
    key.secret_spec()
        .name
        .clone()
        .unwrap_or_else(|| key.name_any())
}

/// The key's `keyward.dev/rotate` request, unless its status records it as handled:
/// a handled request means nothing to the planner (the trigger fires only on a value
/// the status has not recorded), so the key cache drops it (see [`cut_key`]) and the
/// planner sees the same key from the cache and from the API server.
fn rotate_request<K: ManagedKey>(key: &K) -> Option<&str> {
    let handled = key.key_status().and_then(|s| s.rotate_request.as_deref());
    key.annotations()
        .get(ROTATE_ANNOTATION)
        .map(String::as_str)
        .or(key.cached_rotate_request())
        .filter(|request| Some(*request) != handled)
}

/// What the key cache keeps of a key's labels and annotations: a pending rotate
/// request, out of the annotation map. keyward reads nothing else there, and every
/// non-empty map is a B-tree node of 544 bytes: with the rotate annotation on every
/// key of a rotation wave, 5.2 MiB at 10,000 keys. Public for the simulation, whose
/// caches cut keys the same way.
pub fn cut_key<K: ManagedKey>(key: &mut K) {
    let pending = rotate_request(key).map(Box::from);
    key.cache_rotate_request(pending);
    let meta = key.meta_mut();
    meta.labels = None;
    meta.annotations = None;
}

/// The key resource as the planner sees it.
pub fn key_view<K: ManagedKey>(key: &K) -> KeyView {
    let shape = key.shape();
    let digest = lifecycle::shape_digest(&ShapeInput {
        provider: key.provider_ref(),
        shape: &shape,
        description: key.description(),
        expiry: key.expiry(),
        secret: key.secret_spec(),
    });
    KeyView {
        uid: key.uid().unwrap_or_default(),
        generation: key.meta().generation,
        deleting: key.meta().deletion_timestamp.is_some(),
        finalized: key.finalizers().iter().any(|f| f == FINALIZER),
        rotate_request: rotate_request(key).map(str::to_owned),
        shape: digest,
        secret_name: secret_name(key),
        deletion_policy: key.deletion_policy(),
        rotation: key.rotation().cloned().unwrap_or_default(),
        key_shape: shape,
        description: key.description().map(str::to_owned),
        requested_lifetime: key.expiry().and_then(|d| d.to_std()),
        rollout: key.rollout().to_vec(),
    }
}

/// The Pod-template annotation this key writes on its rollout targets.
pub fn rollout_annotation<K: ManagedKey>(key: &K) -> String {
    lifecycle::rollout::annotation_key(K::KIND, &key.name_any())
}

/// The Secret holding the key issued for `attempt`: rendered data, the template's
/// labels and annotations, keyward's attempt annotations, the key as its owner.
fn secret_for<K: ManagedKey>(
    key: &K,
    attempt: &IssueAttempt,
    facts: &IssuedFacts,
    value: &SecretValue,
) -> Result<Secret> {
    let namespace = key.namespace().unwrap_or_default();
    let vars = secret::Variables {
        key: value,
        key_id: &facts.id,
        created_at: facts.created_at.to_string(),
        expires_at: facts.expires_at.map(|t| t.to_string()).unwrap_or_default(),
        revision: attempt.revision,
        name: &key.name_any(),
        namespace: &namespace,
    };
    let rendered = secret::render_all(key.secret_spec(), &vars).map_err(|e| Error::NotReady {
        reason: "TemplateInvalid",
        message: e.to_string(),
    })?;
    let owner = key
        .controller_owner_ref(&())
        .expect("key resources have a name and uid");
    Ok(secret::build(
        &attempt.secret_name,
        &namespace,
        owner,
        rendered,
        secret::attempt_annotations(attempt, facts),
    ))
}

/// One reconcile, as kube-runtime calls it: the executor, then when to come back.
async fn reconcile<K: ManagedKey>(key: Arc<K>, world: Arc<KubeWorld>) -> Result<Action> {
    let key_ref = KeyRef::of(&*key);
    let started = metrics::global().reconcile_started(&key_ref);
    let result = executor::reconcile(&*world, &*key).await;
    let ctx = world.ctx();
    ctx.reconciles
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // A plan that ends in "retry" failed as far as anyone watching is concerned.
    let ok = matches!(result, Ok(Wake::At(_) | Wake::Never));
    metrics::global().reconciled(&key_ref, started, ok);
    if key.meta().deletion_timestamp.is_none() {
        // The cached status; a status this reconcile wrote arrives as the next event.
        metrics::global().key_observed(&key_ref, key.key_status());
    }
    let uid = key.uid().unwrap_or_default();
    match result? {
        Wake::Retry => Err(Error::Retry(
            "an upstream or provider problem recorded in status".into(),
        )),
        Wake::Never => {
            ctx.succeeded(&uid);
            if key.meta().deletion_timestamp.is_some() {
                metrics::global().key_forgotten(&key_ref);
            }
            metrics::global().scheduled(&key_ref, None);
            Ok(Action::await_change())
        }
        Wake::At(at) => {
            ctx.succeeded(&uid);
            let wait = Duration::try_from(at.duration_since(world.now_real()))
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_millis(200));
            metrics::global().scheduled(&key_ref, Some(wait));
            Ok(Action::requeue(wait))
        }
    }
}

/// Exponential backoff per object: 1s, 2s, 4s … capped at 5 minutes.
fn error_policy<K: ManagedKey>(key: Arc<K>, error: &Error, world: Arc<KubeWorld>) -> Action {
    let wait = world.ctx().failed(&key.uid().unwrap_or_default());
    metrics::global().scheduled(&KeyRef::of(&*key), Some(wait));
    if !matches!(error, Error::Retry(_)) {
        warn!(kind = K::KIND, name = %key.name_any(), namespace = %key.namespace().unwrap_or_default(), error = %error, retry_in = ?wait, "reconcile failed");
    }
    Action::requeue(wait)
}

/// What starts a key kind's reconciles: its own objects (every one once at start,
/// then every change), its Secrets, and the providers its keys name — all from the
/// shared watches.
struct Triggers<K: ManagedKey> {
    keys: Store<K>,
    own: BoxStream<'static, Result<K, watcher::Error>>,
    secrets: BoxStream<'static, Result<CachedSecret, watcher::Error>>,
    providers: BoxStream<'static, Result<KeyProvider, watcher::Error>>,
    cluster_providers: BoxStream<'static, Result<ClusterKeyProvider, watcher::Error>>,
}

impl<K: ManagedKey> Triggers<K> {
    /// The triggers of the controller of `keys`, from the watches it shares.
    fn of(
        keys: &Shared<K>,
        (secrets, providers, cluster_providers): (
            &Shared<CachedSecret>,
            &Shared<KeyProvider>,
            &Shared<ClusterKeyProvider>,
        ),
    ) -> Self {
        Self {
            keys: keys.store.clone(),
            own: keys.objects().boxed(),
            secrets: secrets.subscribe().boxed(),
            providers: resolving(providers.subscribe(), providers.store.clone()).boxed(),
            cluster_providers: resolving(
                cluster_providers.subscribe(),
                cluster_providers.store.clone(),
            )
            .boxed(),
        }
    }
}

/// The provider events that can change what a key resolves to: a new spec
/// (generation), new labels or annotations (annotating a provider is the documented way
/// to have its credential read again), or the provider gone. A status write — the
/// provider status controller's own — cannot, and would otherwise re-plan every key
/// that names the provider, racing the caches of a wave's own writes.
///
/// The providers already cached count as seen: every key is planned from the cache
/// when the controller starts, so the status the provider status controller writes
/// at start-up must not plan every key a second time (at 10,000 keys, a second request
/// per key in the controller's queue, holding a reference to the provider).
fn resolving<P>(
    events: impl Stream<Item = Result<P, watcher::Error>> + Send + 'static,
    store: Store<P>,
) -> impl Stream<Item = Result<P, watcher::Error>> + Send + 'static
where
    P: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    let digest = |provider: &P| {
        let mut h = DefaultHasher::new();
        let meta = provider.meta();
        (&meta.generation, &meta.labels, &meta.annotations).hash(&mut h);
        h.finish()
    };
    let cached = store.state().into_iter();
    let seen: Mutex<HashMap<String, u64>> = Mutex::new(
        cached
            .map(|p| (p.uid().unwrap_or_default(), digest(&p)))
            .collect(),
    );
    events.filter(move |event| {
        let Ok(provider) = event else {
            return futures::future::ready(true);
        };
        let uid = provider.uid().unwrap_or_default();
        let present = store
            .get(&ObjectRef::from_obj(provider))
            .is_some_and(|cached| cached.uid() == provider.uid());
        let mut seen = seen.lock().expect("provider digests lock");
        let changed = if present {
            let digest = digest(provider);
            seen.insert(uid, digest) != Some(digest)
        } else {
            seen.remove(&uid);
            true
        };
        futures::future::ready(changed)
    })
}

/// Whether `key` is the watch event of this process's own last write of it. The
/// reconcile that wrote it planned on from exactly that object and scheduled what
/// comes next, so the event triggers nothing — only the metrics take note of the
/// status it carries. (The same holds for the event of keyward's own Secret write.)
/// Besides saving a reconcile, this keeps a key's status event, should it overtake
/// its Secret's, from finding the Secret missing in a cache that lags behind.
fn echo<K: ManagedKey>(world: &KubeWorld, key: &K) -> bool {
    let own = world.memo().seen(key);
    if own && key.meta().deletion_timestamp.is_none() {
        metrics::global().key_observed(&KeyRef::of(key), key.key_status());
    }
    own
}

/// Whether `key`'s watch event is of its deletion: the cache, which the event has
/// already reached, no longer holds it. A key deleted without a finalizer (`builtin`)
/// never reaches a reconcile — the controller finds it gone — so what this process
/// kept about it (metric series, memo) is dropped here.
fn gone<K: ManagedKey>(world: &KubeWorld, store: &Store<K>, key: &K) -> bool {
    let gone = store
        .get(&ObjectRef::from_obj(key))
        .is_none_or(|cached| cached.uid() != key.uid());
    if gone {
        metrics::global().key_forgotten(&KeyRef::of(key));
        world.memo().forget(key);
    }
    gone
}

/// The keys in `store` that `matches` says name a provider.
fn naming<K: ManagedKey>(
    store: &Store<K>,
    matches: impl Fn(&K, &ProviderRef) -> bool,
) -> Vec<ObjectRef<K>> {
    store
        .state()
        .into_iter()
        .filter(|k| matches(k, k.provider_ref()))
        .map(|k| ObjectRef::from_obj(&*k))
        .collect()
}

/// Runs the controller of one key kind in one namespace scope until `shutdown`
/// resolves.
async fn run_kind<K: ManagedKey>(
    world: Arc<KubeWorld>,
    triggers: Triggers<K>,
    workloads: Arc<Workloads>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let by_provider = triggers.keys.clone();
    let by_cluster_provider = triggers.keys.clone();
    let concurrency = world.ctx().settings.concurrency;
    let (keys_written, secrets_written) = (world.clone(), world.clone());
    let cached = triggers.keys.clone();
    let own = triggers.own.filter(move |event| {
        futures::future::ready(
            !matches!(event, Ok(k) if gone(&keys_written, &cached, k) || echo(&keys_written, k)),
        )
    });
    let secrets = triggers.secrets.filter(move |event| {
        let echo = matches!(event, Ok(s) if secrets_written.memo().seen_secret(s));
        futures::future::ready(!echo)
    });
    workloads
        .wake(Controller::for_stream(own, triggers.keys))
        .owns_stream(secrets)
        .watches_stream(triggers.providers, move |provider: KeyProvider| {
            let (ns, name) = (provider.namespace(), provider.name_any());
            naming(&by_provider, |k, r| {
                r.kind == ProviderKind::KeyProvider && r.name == name && k.namespace() == ns
            })
        })
        .watches_stream(
            triggers.cluster_providers,
            move |provider: ClusterKeyProvider| {
                let name = provider.name_any();
                naming(&by_cluster_provider, |_, r| {
                    r.kind == ProviderKind::ClusterKeyProvider && r.name == name
                })
            },
        )
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency))
        .graceful_shutdown_on(shutdown)
        .run(reconcile::<K>, error_policy::<K>, world)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// An `Api` of a namespaced kind in one namespace (None: all).
fn scoped<T>(ctx: &Context, namespace: Option<&str>) -> Api<T>
where
    T: Resource<Scope = kube::core::NamespaceResourceScope>,
    T::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    }
}

/// The watch of keyward's own Secrets (by label) in one namespace (None: all).
async fn watch_secrets(
    ctx: &Context,
    namespace: Option<&str>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Shared<CachedSecret> {
    let managed = watcher::Config::default().labels(&format!(
        "{}={}",
        secret::MANAGED_BY_LABEL,
        secret::MANAGED_BY
    ));
    Shared::start(scoped(ctx, namespace), managed, shutdown).await
}

/// Runs both key controllers and the provider status controllers until `shutdown`
/// resolves: once for all namespaces, or once per namespace of `settings.namespaces`
/// (each with its own watches and `concurrency`).
///
/// One watch per resource type and namespace scope, shared by every controller that
/// needs it: the keys of each kind, keyward's Secrets and the `KeyProvider`s per
/// scope; the `ClusterKeyProvider`s and the namespaces' metadata (their labels, for
/// a `ClusterKeyProvider`'s namespace selector) once.
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let all = watcher::Config::default();
    let (cluster_providers, namespaces) = futures::join!(
        Shared::<ClusterKeyProvider>::start(
            Api::all(ctx.client.clone()),
            all.clone(),
            shutdown.clone()
        ),
        Shared::<PartialObjectMeta<Namespace>>::start(
            Api::all(ctx.client.clone()),
            all.clone(),
            shutdown.clone()
        ),
    );
    let apis = Arc::new(KeyApis::default());
    let mut controllers = Vec::new();
    let mut provider_watches = Vec::new();
    for ns in ctx.settings.watched_namespaces() {
        let ns = ns.as_deref();
        let (secrets, providers, auth_keys, account_keys, workloads) = futures::join!(
            watch_secrets(&ctx, ns, shutdown.clone()),
            Shared::<KeyProvider>::start(scoped(&ctx, ns), all.clone(), shutdown.clone()),
            Shared::<AuthKey>::start_with(scoped(&ctx, ns), all.clone(), cut_key, shutdown.clone()),
            Shared::<ServiceAccountKey>::start_with(
                scoped(&ctx, ns),
                all.clone(),
                cut_key,
                shutdown.clone()
            ),
            Workloads::watch(&ctx.client, ns, shutdown.clone()),
        );
        let caches = Caches {
            key_providers: providers.store.clone(),
            cluster_providers: cluster_providers.store.clone(),
            namespaces: namespaces.store.clone(),
            apis: apis.clone(),
        };
        let world = Arc::new(KubeWorld::new(
            ctx.clone(),
            secrets.store.clone(),
            caches,
            workloads.clone(),
        ));
        let shared = (&secrets, &providers, &cluster_providers);
        let auth = Triggers::of(&auth_keys, shared);
        controllers
            .push(run_kind(world.clone(), auth, workloads.clone(), shutdown.clone()).boxed());
        let account = Triggers::of(&account_keys, shared);
        controllers.push(run_kind(world, account, workloads, shutdown.clone()).boxed());
        provider_watches.push(provider_status::Watch {
            trigger: providers.objects().boxed(),
            store: providers.store.clone(),
        });
    }
    let cluster_watch = provider_status::Watch {
        trigger: cluster_providers.objects().boxed(),
        store: cluster_providers.store.clone(),
    };
    futures::join!(
        futures::future::join_all(controllers),
        provider_status::run(ctx, apis, provider_watches, cluster_watch, shutdown),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector;
    use serde_json::json;

    fn provider(uid: &str, generation: i64, annotation: &str, observed: i64) -> KeyProvider {
        serde_json::from_value(json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "KeyProvider",
            "metadata": {"name": "p", "namespace": "ns", "uid": uid, "generation": generation,
                         "annotations": {"keyward.dev/reloaded": annotation}},
            "spec": {"builtin": {}},
            "status": {"observedGeneration": observed},
        }))
        .unwrap()
    }

    fn key(annotation: Option<&str>, handled: Option<&str>) -> AuthKey {
        let mut annotations = json!({"team": "a"});
        if let Some(a) = annotation {
            annotations[ROTATE_ANNOTATION] = json!(a);
        }
        serde_json::from_value(json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "AuthKey",
            "metadata": {"name": "k", "namespace": "ns", "uid": "u", "generation": 1,
                         "labels": {"app": "edge"}, "annotations": annotations},
            "spec": {"providerRef": {"kind": "KeyProvider", "name": "p"}},
            "status": {"rotateRequest": handled},
        }))
        .unwrap()
    }

    #[test]
    fn the_key_cache_keeps_no_annotations_but_a_pending_rotate_request_and_plans_the_same() {
        for (annotation, handled, kept) in [
            (None, None, None),
            (Some("r1"), None, Some("r1")),       // pending
            (Some("r2"), Some("r1"), Some("r2")), // pending, another handled before
            (Some("r1"), Some("r1"), None),       // handled: dropped
            (None, Some("r1"), None),
        ] {
            let full = key(annotation, handled);
            let mut cached = full.clone();
            cut_key(&mut cached);
            let case = format!("annotation {annotation:?}, handled {handled:?}");
            assert_eq!(key_view(&cached), key_view(&full), "{case}");
            assert_eq!(key_view(&full).rotate_request.as_deref(), kept, "{case}");
            assert_eq!(cached.meta().labels, None, "{case}");
            assert_eq!(cached.meta().annotations, None, "{case}");
            assert_eq!(cached.cached_rotate_request(), kept, "{case}");
        }
    }

    #[test]
    fn only_what_can_change_resolution_re_plans_the_keys_of_a_provider() {
        let (store, mut writer) = reflector::store();
        // Cached before the keys' controller starts.
        writer.apply_watcher_event(&watcher::Event::Apply(provider("u0", 1, "a", 0)));
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut passed = resolving(rx.map(Ok), store).boxed();
        // Each line: what the watch delivers (after the cache has it), and whether keys
        // are re-planned for it.
        for (step, (object, deleted, replan)) in [
            (provider("u0", 1, "a", 1), false, false), // start-up status of a cached one
            (provider("u0", 1, "a", 1), true, true),   // deleted
            (provider("u1", 1, "a", 0), false, true),  // first seen
            (provider("u1", 1, "a", 1), false, false), // its status written
            (provider("u1", 2, "a", 1), false, true),  // spec changed
            (provider("u1", 2, "b", 1), false, true),  // annotated: re-read credentials
            (provider("u1", 2, "b", 2), false, false), // status again
            (provider("u1", 2, "b", 2), true, true),   // deleted
            (provider("u2", 1, "b", 0), false, true),  // created again, same name
        ]
        .into_iter()
        .enumerate()
        {
            writer.apply_watcher_event(&if deleted {
                watcher::Event::Delete(object.clone())
            } else {
                watcher::Event::Apply(object.clone())
            });
            tx.unbounded_send(object).unwrap();
            let got = passed.next().now_or_never().is_some();
            assert_eq!(got, replan, "step {step}");
        }
    }
}
