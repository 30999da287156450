//! The CRDs, generated from the Rust types in [`crate::resources`].
//!
//! `keyward crds` prints them and `crds/` holds them checked in, one file per CRD;
//! a test fails when the two drift apart.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::resources::{AuthKey, ClusterKeyProvider, KeyProvider, ServiceAccountKey};

/// Every keyward CRD, in a stable order.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        AuthKey::crd(),
        ServiceAccountKey::crd(),
        KeyProvider::crd(),
        ClusterKeyProvider::crd(),
    ]
}

/// The file under `crds/` that holds a CRD: `<plural>.<group>.yaml`.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or_default())
}

/// One CRD as a YAML document (without the `---` separator).
pub fn to_yaml(crd: &CustomResourceDefinition) -> String {
    serde_saphyr::to_string(crd).expect("a CRD always serializes")
}

/// Every CRD as one multi-document YAML stream.
pub fn all_yaml() -> String {
    all()
        .iter()
        .map(|crd| format!("---\n{}", to_yaml(crd)))
        .collect()
}

/// Why installing the CRDs failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("applying CRD: {0}")]
    Kube(#[from] kube::Error),
    #[error("CRD {0} was not Established within 30s")]
    NotEstablished(String),
}

/// Installs (or updates) every CRD with server-side apply and waits until each is
/// Established, so resources can be created right after.
pub async fn apply(client: kube::Client) -> Result<(), ApplyError> {
    use kube::{
        Api,
        api::{Patch, PatchParams},
        runtime::wait::{await_condition, conditions},
    };
    let api: Api<CustomResourceDefinition> = Api::all(client);
    let params = PatchParams::apply("keyward").force();
    let crds = all();
    for crd in &crds {
        let name = crd.metadata.name.as_deref().unwrap_or_default();
        api.patch(name, &params, &Patch::Apply(crd)).await?;
    }
    for crd in &crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let established = await_condition(api.clone(), &name, conditions::is_crd_established());
        match tokio::time::timeout(std::time::Duration::from_secs(30), established).await {
            Ok(Ok(_)) => {}
            _ => return Err(ApplyError::NotEstablished(name)),
        }
    }
    Ok(())
}
