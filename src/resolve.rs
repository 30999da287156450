//! From a key's `providerRef` to a usable key API: the provider resource, its policy
//! and its credentials. Used by the key reconciler and by the provider status
//! controller, which say the same thing about the same provider.
//!
//! Nothing here is read from the API server per key. Providers and namespace labels
//! come from the watch caches ([`Caches`]); an object missing from a cache is looked
//! up once, since the cache may lag behind an object just created. A provider's key
//! API is built once and kept ([`KeyApis`]): its credential Secret — not one of
//! keyward's own Secrets, so not watched — is read when the provider is first used,
//! when its spec changes, when the upstream refuses the credential, and whenever the
//! provider status controller looks at the provider (every 10 minutes and on every
//! change). docs/performance.md says why.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::{
    Api, Resource, ResourceExt,
    core::PartialObjectMeta,
    runtime::reflector::{ObjectRef, Store},
};

use crate::{
    context::{Context, Error, Result},
    metrics::{self, KeyRef},
    policy,
    providers::{
        self, Capabilities, Interrupted, IssueRequest, IssuedKey, KeyApi, KeyShape, KeyState,
        MarkedKey, ProviderError, Refusal, ResolvedProvider,
    },
    resources::{ClusterKeyProvider, KeyProvider, KeyProviderSpec, ProviderKind, ProviderRef},
};

/// What a key's provider comes to.
pub enum Resolution {
    /// The key API, and why the provider's policy refuses this key, if it does
    /// (policy limits what may be minted; revoking stays possible).
    Ready {
        api: Arc<dyn KeyApi>,
        policy: Option<Refusal>,
    },
    /// The provider cannot be used; the refusal says what to create or fix.
    Unavailable(Refusal),
}

/// The parts of a key resolution needs.
pub struct KeyRequest<'a> {
    pub namespace: &'a str,
    pub reference: &'a ProviderRef,
    pub shape: &'a KeyShape,
    pub lifetime: Option<std::time::Duration>,
    pub metrics: &'a KeyRef,
}

/// What resolution reads: the watch caches of the providers (`KeyProvider`s of the
/// namespaces one controller watches, every `ClusterKeyProvider`) and of the
/// namespaces' labels, and the key APIs built from them.
#[derive(Clone)]
pub struct Caches {
    pub key_providers: Store<KeyProvider>,
    pub cluster_providers: Store<ClusterKeyProvider>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub apis: Arc<KeyApis>,
}

fn unavailable(reason: &'static str, message: String) -> Resolution {
    Resolution::Unavailable(Refusal { reason, message })
}

/// A provider resource as resolution needs it, whichever kind it is.
pub struct ProviderSource {
    /// `(id, display)`, see [`provider_names`].
    pub id: String,
    pub display: String,
    /// The resource's uid: a provider deleted and created again is a new one.
    pub uid: String,
    pub spec: KeyProviderSpec,
    /// Where its credential Secret lives.
    pub credentials_namespace: String,
}

impl ProviderSource {
    pub fn of_namespaced(provider: &KeyProvider) -> Self {
        let namespace = provider.namespace().unwrap_or_default();
        let (id, display) =
            provider_names(ProviderKind::KeyProvider, &namespace, &provider.name_any());
        Self {
            id,
            display,
            uid: provider.uid().unwrap_or_default(),
            spec: provider.spec.clone(),
            credentials_namespace: namespace,
        }
    }

    pub fn of_cluster(provider: &ClusterKeyProvider, operator_namespace: &str) -> Self {
        let (id, display) =
            provider_names(ProviderKind::ClusterKeyProvider, "", &provider.name_any());
        Self {
            id,
            display,
            uid: provider.uid().unwrap_or_default(),
            spec: providers::cluster_spec(&provider.spec),
            credentials_namespace: operator_namespace.to_owned(),
        }
    }
}

/// The object `reference` names from `store`, or — when the cache does not hold it —
/// from the API server through `api`.
async fn cached_or_read<T>(
    store: &Store<T>,
    reference: ObjectRef<T>,
    api: Api<T>,
) -> Result<Option<Arc<T>>>
where
    T: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    if let Some(found) = store.get(&reference) {
        return Ok(Some(found));
    }
    Ok(api.get_opt(&reference.name).await?.map(Arc::new))
}

/// Finds the provider a key names, checks policy and credentials, and builds its API.
pub async fn resolve(ctx: &Context, caches: &Caches, key: &KeyRequest<'_>) -> Result<Resolution> {
    let namespace = key.namespace;
    let reference = key.reference;
    let (id, _) = provider_names(reference.kind, namespace, &reference.name);
    let source = match reference.kind {
        ProviderKind::KeyProvider => {
            let found = cached_or_read(
                &caches.key_providers,
                ObjectRef::new(&reference.name).within(namespace),
                Api::namespaced(ctx.client.clone(), namespace),
            )
            .await?;
            let Some(provider) = found else {
                caches.apis.forget(&id);
                return Ok(unavailable(
                    "ProviderNotFound",
                    format!(
                        "KeyProvider {} does not exist in namespace {namespace}; create it, or point spec.providerRef at an existing provider (kind: ClusterKeyProvider for a cluster-wide one)",
                        reference.name
                    ),
                ));
            };
            ProviderSource::of_namespaced(&provider)
        }
        ProviderKind::ClusterKeyProvider => {
            let found = cached_or_read(
                &caches.cluster_providers,
                ObjectRef::new(&reference.name),
                Api::all(ctx.client.clone()),
            )
            .await?;
            let Some(provider) = found else {
                caches.apis.forget(&id);
                return Ok(unavailable(
                    "ProviderNotFound",
                    format!(
                        "ClusterKeyProvider {} does not exist; create it, or point spec.providerRef at an existing provider",
                        reference.name
                    ),
                ));
            };
            ProviderSource::of_cluster(&provider, &ctx.settings.operator_namespace)
        }
    };
    let cluster = reference.kind == ProviderKind::ClusterKeyProvider;
    let labels = if cluster && source.spec.policy.is_some() {
        cached_or_read(
            &caches.namespaces,
            ObjectRef::new(namespace),
            Api::all(ctx.client.clone()),
        )
        .await?
        .map(|ns| ns.labels().clone())
        .unwrap_or_default()
    } else {
        BTreeMap::new()
    };
    let policy = policy::check(
        source.spec.policy.as_ref(),
        &policy::Request {
            namespace,
            namespace_labels: &labels,
            shape: key.shape,
            lifetime: key.lifetime,
            cluster_scoped: cluster,
        },
    )
    .err()
    .map(|v| Refusal {
        reason: v.rule,
        message: format!("{}: {}", source.display, v.message),
    });
    metrics::global().resolved(key.metrics, providers::provider_type(&source.spec));
    match caches.apis.kept(ctx, &source).await {
        Ok(api) => Ok(Resolution::Ready { api, policy }),
        Err(Error::NotReady { reason, message }) => Ok(unavailable(reason, message)),
        Err(e) => Err(e),
    }
}

/// `(id, display)` of a provider: the id keys the state kept across reconciles
/// (`KeyProvider/<ns>/<name>`), the display names it in messages.
pub fn provider_names(kind: ProviderKind, namespace: &str, name: &str) -> (String, String) {
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

/// Key APIs built from a provider and its credentials, kept across reconciles, one
/// per provider resource. Building one reads the credential Secret; a kept one is
/// used while its provider's uid and spec stay the same and the upstream has not
/// refused its credential. One build per provider at a time: the keys that wait for
/// it use what it built.
#[derive(Default)]
pub struct KeyApis {
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Kept>>>>>,
}

struct Kept {
    /// The provider's uid and spec it was built from.
    version: String,
    api: Arc<dyn KeyApi>,
    /// The upstream refused its credential: build it again, reading the Secret.
    refused: Arc<AtomicBool>,
}

fn version_of(source: &ProviderSource) -> String {
    let spec = serde_json::to_string(&source.spec).unwrap_or_default();
    format!("{}/{}/{spec}", source.uid, source.credentials_namespace)
}

impl KeyApis {
    fn slot(&self, id: &str) -> Arc<tokio::sync::Mutex<Option<Kept>>> {
        self.slots
            .lock()
            .expect("key APIs lock")
            .entry(id.to_owned())
            .or_default()
            .clone()
    }

    /// The provider's key API: the kept one if it is still good, else a new one.
    pub async fn kept(&self, ctx: &Context, source: &ProviderSource) -> Result<Arc<dyn KeyApi>> {
        self.obtain(ctx, source, false).await
    }

    /// A new key API for the provider, its credentials read again, kept from now on.
    pub async fn rebuild(&self, ctx: &Context, source: &ProviderSource) -> Result<Arc<dyn KeyApi>> {
        self.obtain(ctx, source, true).await
    }

    /// Forgets what was kept for a provider that is gone.
    pub fn forget(&self, id: &str) {
        self.slots.lock().expect("key APIs lock").remove(id);
    }

    async fn obtain(
        &self,
        ctx: &Context,
        source: &ProviderSource,
        fresh: bool,
    ) -> Result<Arc<dyn KeyApi>> {
        let slot = self.slot(&source.id);
        let mut kept = slot.lock().await;
        let version = version_of(source);
        if !fresh
            && let Some(k) = kept.as_ref()
            && k.version == version
            && !k.refused.load(Ordering::SeqCst)
        {
            return Ok(k.api.clone());
        }
        // A provider that cannot be built now is not used from before either.
        *kept = None;
        let built = build_provider(ctx, source).await?;
        let refused = Arc::new(AtomicBool::new(false));
        let api: Arc<dyn KeyApi> = Arc::new(Watched {
            inner: built,
            refused: refused.clone(),
        });
        *kept = Some(Kept {
            version,
            api: api.clone(),
            refused,
        });
        Ok(api)
    }
}

/// Reads a provider's credential Secret and builds its key API. Failures are
/// `NotReady` with `CredentialsNotFound`, `CredentialsInvalid` or
/// `ProviderMisconfigured`, each saying what to create or fix.
/// Builds the key API of `source` (its credential read from the API server).
pub async fn build_provider(ctx: &Context, source: &ProviderSource) -> Result<Arc<dyn KeyApi>> {
    let display = &source.display;
    let credentials_namespace = &source.credentials_namespace;
    let mut credentials = BTreeMap::new();
    if let Some((name, required)) = providers::credential_secret(&source.spec) {
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
        id: source.id.clone(),
        display: display.clone(),
        spec: source.spec.clone(),
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

/// A kept key API that notices when the upstream refuses its credential (a rotated
/// or revoked API key, an OAuth client deleted), so that the next resolution builds
/// it again from the credential Secret as it is now.
struct Watched {
    inner: Arc<dyn KeyApi>,
    refused: Arc<AtomicBool>,
}

impl Watched {
    fn noted<T>(&self, result: Result<T, ProviderError>) -> Result<T, ProviderError> {
        if let Err(ProviderError::Refused {
            reason: "CredentialsInvalid",
            ..
        }) = &result
        {
            self.refused.store(true, Ordering::SeqCst);
        }
        result
    }
}

#[async_trait]
impl KeyApi for Watched {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn check(&self, request: &IssueRequest) -> Result<(), Refusal> {
        self.inner.check(request)
    }

    async fn issue(&self, request: &IssueRequest) -> Result<IssuedKey, ProviderError> {
        self.noted(self.inner.issue(request).await)
    }

    async fn revoke(&self, key_id: &str) -> Result<(), ProviderError> {
        self.noted(self.inner.revoke(key_id).await)
    }

    async fn inspect(&self, key_id: &str) -> Result<KeyState, ProviderError> {
        self.noted(self.inner.inspect(key_id).await)
    }

    async fn find_by_marker(&self, marker: &str) -> Result<Vec<String>, ProviderError> {
        self.noted(self.inner.find_by_marker(marker).await)
    }

    async fn find_orphans(&self, attempt: &Interrupted<'_>) -> Result<Vec<String>, ProviderError> {
        self.noted(self.inner.find_orphans(attempt).await)
    }

    async fn marked_keys(&self) -> Result<Vec<MarkedKey>, ProviderError> {
        self.noted(self.inner.marked_keys().await)
    }
}
