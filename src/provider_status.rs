//! The controller for `KeyProvider` and `ClusterKeyProvider`: says in status whether a
//! provider is usable — its type, and `Ready` with a reason that names what to fix
//! (`CredentialsNotFound`, `CredentialsInvalid`, `ProviderMisconfigured`). It builds
//! the provider exactly as a key's reconcile would, and never calls the upstream, so
//! a provider at rest costs nothing but a periodic read of its credential Secret
//! (which is not watched: keyward does not watch every Secret in the cluster). That
//! read also renews the key API the keys use ([`KeyApis`]): a changed credential
//! reaches them within [`RECHECK`] at the latest.
//!
//! It runs on the same watches as the key controllers (one per provider kind and
//! namespace scope), handed to it as a trigger and a cache.

use std::{fmt::Debug, sync::Arc, time::Duration};

use futures::{StreamExt, stream::BoxStream};
use kube::{
    Api, Resource, ResourceExt,
    runtime::{Controller, controller::Action, reflector::Store, watcher},
};
use serde::{Serialize, de::DeserializeOwned};
use tracing::warn;

use crate::{
    context::{Context, Error, Result, write_status},
    lifecycle::{comparable, set_condition},
    providers::provider_type,
    resolve::{KeyApis, ProviderSource},
    resources::{ClusterKeyProvider, KeyProvider, ProviderStatus},
};

/// How often a provider's credentials are read again without a spec change.
pub const RECHECK: Duration = Duration::from_secs(600);

/// What the status controller needs from a provider kind.
trait ProviderResource:
    Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Serialize + Send + Sync + 'static
{
    fn provider_status(&self) -> Option<&ProviderStatus>;
    /// The provider as resolution sees it, with the same id and display name.
    fn source(&self, ctx: &Context) -> ProviderSource;
    fn api(ctx: &Context, namespace: Option<&str>) -> Api<Self>;
}

impl ProviderResource for KeyProvider {
    fn provider_status(&self) -> Option<&ProviderStatus> {
        self.status.as_ref()
    }
    fn source(&self, _: &Context) -> ProviderSource {
        ProviderSource::of_namespaced(self)
    }
    fn api(ctx: &Context, namespace: Option<&str>) -> Api<Self> {
        match namespace {
            Some(ns) => Api::namespaced(ctx.client.clone(), ns),
            None => Api::all(ctx.client.clone()),
        }
    }
}

impl ProviderResource for ClusterKeyProvider {
    fn provider_status(&self) -> Option<&ProviderStatus> {
        self.status.as_ref()
    }
    fn source(&self, ctx: &Context) -> ProviderSource {
        ProviderSource::of_cluster(self, &ctx.settings.operator_namespace)
    }
    fn api(ctx: &Context, _: Option<&str>) -> Api<Self> {
        Api::all(ctx.client.clone())
    }
}

/// What every provider reconcile shares.
struct Shared {
    ctx: Arc<Context>,
    apis: Arc<KeyApis>,
}

async fn reconcile<P: ProviderResource>(provider: Arc<P>, shared: Arc<Shared>) -> Result<Action> {
    let ctx = &shared.ctx;
    let source = provider.source(ctx);
    let kind = provider_type(&source.spec);
    let display = source.display.clone();
    let (ready, reason, message) = match shared.apis.rebuild(ctx, &source).await {
        Ok(_) => (true, "Configured", format!("{display} issues {kind} keys")),
        Err(Error::NotReady { reason, message }) => (false, reason, message),
        Err(e) => return Err(e),
    };
    let generation = provider.meta().generation;
    let original = provider.provider_status().cloned().unwrap_or_default();
    let mut status = original.clone();
    set_condition(
        &mut status.conditions,
        "Ready",
        ready,
        reason,
        &message,
        generation,
        jiff::Timestamp::now(),
    );
    status.observed_generation = generation;
    status.provider_type = Some(kind.to_owned());
    if comparable(&status) != comparable(&original) {
        let api = P::api(ctx, provider.namespace().as_deref());
        write_status(&api, &*provider, &status, false).await?;
    }
    Ok(Action::requeue(RECHECK))
}

fn error_policy<P: ProviderResource>(provider: Arc<P>, error: &Error, _: Arc<Shared>) -> Action {
    warn!(kind = %P::kind(&()), name = %provider.name_any(), error = %error, "provider status reconcile failed");
    Action::requeue(Duration::from_secs(30))
}

/// A watch of one provider kind (in one namespace scope): every provider it holds,
/// then every change, as the trigger; and its cache.
pub struct Watch<P: Resource<DynamicType = ()> + Clone + 'static> {
    pub trigger: BoxStream<'static, Result<P, watcher::Error>>,
    pub store: Store<P>,
}

async fn run_kind<P: ProviderResource>(
    shared: Arc<Shared>,
    watch: Watch<P>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    Controller::for_stream(watch.trigger, watch.store)
        .graceful_shutdown_on(shutdown)
        .run(reconcile::<P>, error_policy::<P>, shared)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// Runs the status controllers of both provider kinds until `shutdown` resolves:
/// one per namespace scope of `KeyProvider`s, one for `ClusterKeyProvider`s.
pub async fn run(
    ctx: Arc<Context>,
    apis: Arc<KeyApis>,
    namespaced: Vec<Watch<KeyProvider>>,
    cluster: Watch<ClusterKeyProvider>,
    shutdown: impl Future<Output = ()> + Clone + Send + Sync + 'static,
) {
    let shared = Arc::new(Shared { ctx, apis });
    let namespaced = namespaced
        .into_iter()
        .map(|watch| run_kind(shared.clone(), watch, shutdown.clone()));
    futures::join!(
        futures::future::join_all(namespaced),
        run_kind(shared, cluster, shutdown),
    );
}
