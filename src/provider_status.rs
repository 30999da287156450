//! The controller for `KeyProvider` and `ClusterKeyProvider`: says in status whether a
//! provider is usable — its type, and `Ready` with a reason that names what to fix
//! (`CredentialsNotFound`, `CredentialsInvalid`, `ProviderMisconfigured`). It builds
//! the provider exactly as a key's reconcile would, and never calls the upstream, so
//! a provider at rest costs nothing but a periodic read of its credential Secret
//! (which is not watched: keyward does not watch every Secret in the cluster).

use std::{fmt::Debug, sync::Arc, time::Duration};

use futures::StreamExt;
use kube::{
    Api, Resource, ResourceExt,
    runtime::{Controller, controller::Action, watcher},
};
use serde::{Serialize, de::DeserializeOwned};
use tracing::warn;

use crate::{
    context::{Context, Error, Result, write_status},
    lifecycle::{comparable, set_condition},
    providers::{self, provider_type},
    resolve::{build_provider, provider_names},
    resources::{ClusterKeyProvider, KeyProvider, KeyProviderSpec, ProviderKind, ProviderStatus},
};

/// How often a provider's credentials are looked at again without a spec change.
const RECHECK: Duration = Duration::from_secs(600);

/// What the status controller needs from a provider kind.
trait ProviderResource:
    Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Serialize + Send + Sync + 'static
{
    fn provider_spec(&self) -> KeyProviderSpec;
    fn provider_status(&self) -> Option<&ProviderStatus>;
    /// `(state id, display name)`, the same strings a key's reconcile uses.
    fn names(&self) -> (String, String);
    /// Where the credential Secret lives.
    fn credentials_namespace(&self, ctx: &Context) -> String;
    fn api(ctx: &Context, namespace: Option<&str>) -> Api<Self>;
}

impl ProviderResource for KeyProvider {
    fn provider_spec(&self) -> KeyProviderSpec {
        self.spec.clone()
    }
    fn provider_status(&self) -> Option<&ProviderStatus> {
        self.status.as_ref()
    }
    fn names(&self) -> (String, String) {
        provider_names(
            ProviderKind::KeyProvider,
            &self.namespace().unwrap_or_default(),
            &self.name_any(),
        )
    }
    fn credentials_namespace(&self, _: &Context) -> String {
        self.namespace().unwrap_or_default()
    }
    fn api(ctx: &Context, namespace: Option<&str>) -> Api<Self> {
        match namespace {
            Some(ns) => Api::namespaced(ctx.client.clone(), ns),
            None => Api::all(ctx.client.clone()),
        }
    }
}

impl ProviderResource for ClusterKeyProvider {
    fn provider_spec(&self) -> KeyProviderSpec {
        providers::cluster_spec(&self.spec)
    }
    fn provider_status(&self) -> Option<&ProviderStatus> {
        self.status.as_ref()
    }
    fn names(&self) -> (String, String) {
        provider_names(ProviderKind::ClusterKeyProvider, "", &self.name_any())
    }
    fn credentials_namespace(&self, ctx: &Context) -> String {
        ctx.settings.operator_namespace.clone()
    }
    fn api(ctx: &Context, _: Option<&str>) -> Api<Self> {
        Api::all(ctx.client.clone())
    }
}

async fn reconcile<P: ProviderResource>(provider: Arc<P>, ctx: Arc<Context>) -> Result<Action> {
    let spec = provider.provider_spec();
    let kind = provider_type(&spec);
    let (id, display) = provider.names();
    let namespace = provider.credentials_namespace(&ctx);
    let (ready, reason, message) =
        match build_provider(&ctx, id, display.clone(), spec, &namespace).await {
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
        let api = P::api(&ctx, provider.namespace().as_deref());
        write_status(&api, &*provider, &status, false).await?;
    }
    Ok(Action::requeue(RECHECK))
}

fn error_policy<P: ProviderResource>(provider: Arc<P>, error: &Error, _: Arc<Context>) -> Action {
    warn!(kind = %P::kind(&()), name = %provider.name_any(), error = %error, "provider status reconcile failed");
    Action::requeue(Duration::from_secs(30))
}

async fn run_kind<P: ProviderResource>(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let api = P::api(&ctx, namespace.as_deref());
    Controller::new(api, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(reconcile::<P>, error_policy::<P>, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// Runs the status controllers of both provider kinds until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Clone + Send + Sync + 'static,
) {
    let namespaced = ctx
        .settings
        .watched_namespaces()
        .into_iter()
        .map(|ns| run_kind::<KeyProvider>(ctx.clone(), ns, shutdown.clone()));
    futures::join!(
        futures::future::join_all(namespaced),
        run_kind::<ClusterKeyProvider>(ctx, None, shutdown),
    );
}
