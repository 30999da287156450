//! The CRDs, generated from the Rust types in [`crate::resources`].
//!
//! `keyward crds` prints them and `crds/` holds them checked in, one file per CRD;
//! a test fails when the two drift apart. How to upgrade them in a cluster:
//! docs/operating.md.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::resources::{AuthKey, ClusterKeyProvider, KeyProvider, ServiceAccountKey};

/// Every keyward CRD, in a stable order.
pub fn all() -> Vec<CustomResourceDefinition> {
    [
        AuthKey::crd(),
        ServiceAccountKey::crd(),
        KeyProvider::crd(),
        ClusterKeyProvider::crd(),
    ]
    .into_iter()
    .map(unwrapped)
    .collect()
}

/// The CRD with every field description unwrapped. Doc comments are wrapped at the
/// source's line width and schemars keeps those line breaks, so `kubectl explain`
/// would print them as ragged lines; it wraps text itself.
fn unwrapped(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    let mut value = serde_json::to_value(&crd).expect("a CRD always serializes");
    if let Some(versions) = value["spec"]["versions"].as_array_mut() {
        for version in versions {
            join_descriptions(&mut version["schema"]["openAPIV3Schema"]);
        }
    }
    serde_json::from_value(value).expect("unwrapping descriptions keeps a valid CRD")
}

fn join_descriptions(schema: &mut serde_json::Value) {
    use serde_json::Value;
    match schema {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                match (key.as_str(), value) {
                    ("description", Value::String(text)) => *text = join_wrapped_lines(text),
                    // Values, not schemas: a `description` in them is data.
                    ("default" | "enum" | "example", _) => {}
                    (_, value) => join_descriptions(value),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(join_descriptions),
        _ => {}
    }
}

/// Joins the lines of each paragraph with a space; paragraphs (separated by a blank
/// line) stay apart.
pub fn join_wrapped_lines(text: &str) -> String {
    text.split("\n\n")
        .map(|paragraph| {
            paragraph
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("\n\n")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_lines_join_and_paragraphs_stay() {
        assert_eq!(
            join_wrapped_lines(
                "How long the previous key stays valid after the Secret switches,\nso that workloads pick it up. Default: 5m."
            ),
            "How long the previous key stays valid after the Secret switches, so that workloads pick it up. Default: 5m."
        );
        assert_eq!(
            join_wrapped_lines("One\nparagraph.\n\nAnother\none."),
            "One paragraph.\n\nAnother one."
        );
        assert_eq!(join_wrapped_lines("Single line."), "Single line.");
    }

    #[test]
    fn a_field_named_description_keeps_its_schema() {
        let crd = all().remove(0);
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let field = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["description"];
        assert_eq!(field["type"], "string", "{field}");
        assert!(field["description"].as_str().unwrap().contains("marker"));
    }
}
