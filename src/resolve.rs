//! From a key's `providerRef` to a usable key API: the provider resource, its policy
//! and its credentials. Used by the key reconciler and by the provider status
//! controller, which say the same thing about the same provider.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::{Api, ResourceExt};

use crate::{
    context::{Context, Error, Result},
    metrics::{self, KeyRef},
    policy,
    providers::{self, KeyApi, KeyShape, Refusal, ResolvedProvider},
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

fn unavailable(reason: &'static str, message: String) -> Resolution {
    Resolution::Unavailable(Refusal { reason, message })
}

/// Finds the provider a key names, checks policy and credentials, and builds its API.
pub async fn resolve(ctx: &Context, key: &KeyRequest<'_>) -> Result<Resolution> {
    let namespace = key.namespace;
    let reference = key.reference;
    let (id, display) = provider_names(reference.kind, namespace, &reference.name);
    let (spec, cluster, credentials_namespace) = match reference.kind {
        ProviderKind::KeyProvider => {
            let api: Api<KeyProvider> = Api::namespaced(ctx.client.clone(), namespace);
            let Some(provider) = api.get_opt(&reference.name).await? else {
                return Ok(unavailable(
                    "ProviderNotFound",
                    format!(
                        "KeyProvider {} does not exist in namespace {namespace}; create it, or point spec.providerRef at an existing provider (kind: ClusterKeyProvider for a cluster-wide one)",
                        reference.name
                    ),
                ));
            };
            (provider.spec, false, namespace.to_owned())
        }
        ProviderKind::ClusterKeyProvider => {
            let api: Api<ClusterKeyProvider> = Api::all(ctx.client.clone());
            let Some(provider) = api.get_opt(&reference.name).await? else {
                return Ok(unavailable(
                    "ProviderNotFound",
                    format!(
                        "ClusterKeyProvider {} does not exist; create it, or point spec.providerRef at an existing provider",
                        reference.name
                    ),
                ));
            };
            (
                providers::cluster_spec(&provider.spec),
                true,
                ctx.settings.operator_namespace.clone(),
            )
        }
    };
    let labels = if cluster && spec.policy.is_some() {
        let api: Api<Namespace> = Api::all(ctx.client.clone());
        api.get(namespace).await?.labels().clone()
    } else {
        BTreeMap::new()
    };
    let policy = policy::check(
        spec.policy.as_ref(),
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
        message: format!("{display}: {}", v.message),
    });
    metrics::global().resolved(key.metrics, providers::provider_type(&spec));
    match build_provider(ctx, id, display, spec, &credentials_namespace).await {
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

/// Reads a provider's credential Secret and builds its key API. Failures are
/// `NotReady` with `CredentialsNotFound`, `CredentialsInvalid` or
/// `ProviderMisconfigured`, each saying what to create or fix.
pub async fn build_provider(
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
