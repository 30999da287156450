//! Rendering the Secret a key lives in, and the digest that notices edits to it.
//!
//! Templates use the `{{ name }}` / `{{ json name }}` placeholders of
//! [`crate::template`], inserted as is (no escaping). The variables: `key` (the value),
//! `keyId`, `createdAt`, `expiresAt` (RFC 3339, empty — `null` with `json` — when the
//! key does not expire), `revision`, `name` and `namespace` (of the key resource). An
//! unknown variable or an unclosed `{{` is an error found before anything is issued.

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString,
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use sha2::{Digest, Sha256};

use crate::{
    lifecycle::{IssuedFacts, SecretView},
    providers::SecretValue,
    resources::{IssueAttempt, SecretSpec},
    template::{Escape, Template, Value, Vocabulary},
};

/// Annotations keyward puts on the Secret: how a crash between the Secret write and
/// the status write is recovered (the Secret says which attempt and key it holds).
pub const KEY_ID_ANNOTATION: &str = "keyward.dev/key-id";
pub const ATTEMPT_ANNOTATION: &str = "keyward.dev/attempt";
pub const REVISION_ANNOTATION: &str = "keyward.dev/revision";
pub const CREATED_AT_ANNOTATION: &str = "keyward.dev/created-at";
pub const EXPIRES_AT_ANNOTATION: &str = "keyward.dev/expires-at";
/// What the attempt was for: so that a key found in a Secret after a restart is
/// recorded as what it was issued for, not what the spec says by then.
pub const SHAPE_ANNOTATION: &str = "keyward.dev/shape";
pub const REASON_ANNOTATION: &str = "keyward.dev/reason";
pub const ROTATE_REQUEST_ANNOTATION: &str = "keyward.dev/rotate-request";
/// Label on every Secret keyward writes, so the operator watches only those.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "keyward";

/// Everything a template may refer to.
pub struct Variables<'a> {
    pub key: &'a SecretValue,
    pub key_id: &'a str,
    pub created_at: String,
    pub expires_at: String,
    pub revision: i64,
    pub name: &'a str,
    pub namespace: &'a str,
}

pub use crate::template::TemplateError;

/// The variables Secret templates offer.
const VOCABULARY: Vocabulary = Vocabulary {
    names: &[
        "key",
        "keyId",
        "createdAt",
        "expiresAt",
        "revision",
        "name",
        "namespace",
    ],
    prefixes: &[],
};

fn render(field: &str, template: &str, vars: &Variables) -> Result<String, TemplateError> {
    let template = Template::parse(&format!("secret.template.{field}"), template, &VOCABULARY)?;
    Ok(template.render(Escape::None, |name| {
        Some(match name {
            "key" => Value::Text(vars.key.expose().to_owned()),
            "keyId" => Value::Text(vars.key_id.to_owned()),
            "createdAt" => Value::Text(vars.created_at.clone()),
            "expiresAt" if vars.expires_at.is_empty() => Value::Null,
            "expiresAt" => Value::Text(vars.expires_at.clone()),
            "revision" => Value::Number(vars.revision),
            "name" => Value::Text(vars.name.to_owned()),
            "namespace" => Value::Text(vars.namespace.to_owned()),
            _ => return None,
        })
    }))
}

/// The Secret content for one key: data, labels, annotations.
pub struct Rendered {
    pub data: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// Renders the data (the value under `secret.key`, plus template entries) and
/// the template's labels and annotations.
pub fn render_all(spec: &SecretSpec, vars: &Variables) -> Result<Rendered, TemplateError> {
    let none = crate::resources::SecretTemplate::default();
    let template = spec.template.as_deref().unwrap_or(&none);
    let mut data = BTreeMap::from([(spec.key.clone(), vars.key.expose().to_owned())]);
    for (k, v) in &template.data {
        data.insert(k.clone(), render(&format!("data.{k}"), v, vars)?);
    }
    let mut labels = BTreeMap::new();
    for (k, v) in &template.labels {
        labels.insert(k.clone(), render(&format!("labels.{k}"), v, vars)?);
    }
    let mut annotations = BTreeMap::new();
    for (k, v) in &template.annotations {
        annotations.insert(k.clone(), render(&format!("annotations.{k}"), v, vars)?);
    }
    Ok(Rendered {
        data,
        labels,
        annotations,
    })
}

/// Checks a template without a key: what would fail after issuing fails before it.
pub fn check_template(spec: &SecretSpec) -> Result<(), TemplateError> {
    let placeholder = SecretValue::new(String::new());
    let vars = Variables {
        key: &placeholder,
        key_id: "",
        created_at: String::new(),
        expires_at: String::new(),
        revision: 0,
        name: "",
        namespace: "",
    };
    render_all(spec, &vars).map(|_| ())
}

/// `sha256:` digest of Secret data, independent of map order.
pub fn data_hash<'a>(data: impl IntoIterator<Item = (&'a String, &'a [u8])>) -> String {
    let mut hasher = Sha256::new();
    let mut entries: Vec<_> = data.into_iter().collect();
    entries.sort();
    for (k, v) in entries {
        hasher.update((k.len() as u64).to_be_bytes());
        hasher.update(k.as_bytes());
        hasher.update((v.len() as u64).to_be_bytes());
        hasher.update(v);
    }
    let digest = hasher.finalize();
    format!(
        "sha256:{}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// The digest of a Secret as it is in the cluster.
pub fn secret_hash(secret: &Secret) -> String {
    let empty = BTreeMap::new();
    let data = secret.data.as_ref().unwrap_or(&empty);
    data_hash(data.iter().map(|(k, v)| (k, v.0.as_slice())))
}

/// keyward's annotations on a Secret that holds the key of `attempt`.
pub fn attempt_annotations(attempt: &IssueAttempt, key: &IssuedFacts) -> BTreeMap<String, String> {
    let mut annotations = BTreeMap::from([
        (KEY_ID_ANNOTATION.to_owned(), key.id.clone()),
        (ATTEMPT_ANNOTATION.to_owned(), attempt.id.clone()),
        (REVISION_ANNOTATION.to_owned(), attempt.revision.to_string()),
        (CREATED_AT_ANNOTATION.to_owned(), key.created_at.to_string()),
        (SHAPE_ANNOTATION.to_owned(), attempt.shape.clone()),
        (REASON_ANNOTATION.to_owned(), attempt.reason.clone()),
    ]);
    if let Some(expires) = key.expires_at {
        annotations.insert(EXPIRES_AT_ANNOTATION.to_owned(), expires.to_string());
    }
    if let Some(rotate) = &attempt.rotate_request {
        annotations.insert(ROTATE_REQUEST_ANNOTATION.to_owned(), rotate.clone());
    }
    annotations
}

/// What keyward's annotations on a Secret say, for the planner; `owner` is the uid of
/// the key resource looking at it.
pub fn view(secret: &Secret, owner: &str) -> SecretView {
    CachedSecret::of(secret).view(owner)
}

/// A Secret as keyward's watch cache (and its memo of its own writes) keeps it: its
/// name, version and controlling owner (what triggers the key), the digest of its
/// data and keyward's annotations, parsed — what [`view`] reads, nothing else. At
/// 10,000 keys the whole Secrets (data, labels, every annotation, each map a B-tree
/// node of its own) were the largest part of keyward's memory.
#[derive(Clone, Debug, Default)]
pub struct CachedSecret {
    pub metadata: ObjectMeta,
    /// The view with no owner: `uid` and `resource_version` come from `metadata`.
    facts: SecretView,
}

impl CachedSecret {
    pub fn of(secret: &Secret) -> Self {
        let meta = &secret.metadata;
        let annotations = meta.annotations.as_ref();
        let text = |k: &str| annotations.and_then(|a| a.get(k)).cloned();
        let controllers: Vec<OwnerReference> = meta
            .owner_references
            .iter()
            .flatten()
            .filter(|o| o.controller == Some(true))
            .cloned()
            .collect();
        Self {
            metadata: ObjectMeta {
                name: meta.name.clone(),
                namespace: meta.namespace.clone(),
                uid: meta.uid.clone(),
                resource_version: meta.resource_version.clone(),
                owner_references: (!controllers.is_empty()).then_some(controllers),
                ..Default::default()
            },
            facts: SecretView {
                hash: secret_hash(secret),
                attempt: text(ATTEMPT_ANNOTATION),
                key_id: text(KEY_ID_ANNOTATION),
                revision: text(REVISION_ANNOTATION).and_then(|v| v.parse().ok()),
                created_at: text(CREATED_AT_ANNOTATION).and_then(|v| v.parse().ok()),
                expires_at: text(EXPIRES_AT_ANNOTATION).and_then(|v| v.parse().ok()),
                shape: text(SHAPE_ANNOTATION),
                reason: text(REASON_ANNOTATION),
                rotate_request: text(ROTATE_REQUEST_ANNOTATION),
                ..Default::default()
            },
        }
    }

    /// What the Secret says, for the planner of the key resource with uid `owner`.
    pub fn view(&self, owner: &str) -> SecretView {
        let owned = self
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == owner && o.controller == Some(true));
        SecretView {
            uid: self.metadata.uid.clone(),
            resource_version: self.metadata.resource_version.clone(),
            owned,
            ..self.facts.clone()
        }
    }
}

impl From<Secret> for CachedSecret {
    fn from(secret: Secret) -> Self {
        Self::of(&secret)
    }
}

/// Read as a whole Secret, then cut: the watch's list and events decode straight
/// into what the cache keeps.
impl<'de> serde::Deserialize<'de> for CachedSecret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Secret::deserialize(d).map(Self::from)
    }
}

/// The Secret's API type, so that the watch and the controller's owner mapping treat
/// it as one.
impl k8s_openapi::Resource for CachedSecret {
    const API_VERSION: &'static str = <Secret as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <Secret as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <Secret as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <Secret as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <Secret as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = <Secret as k8s_openapi::Resource>::Scope;
}

impl k8s_openapi::Metadata for CachedSecret {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The whole Secret object keyward applies (one server-side apply: a workload sees
/// either the old content or the new, never a mix).
pub fn build(
    name: &str,
    namespace: &str,
    owner: OwnerReference,
    rendered: Rendered,
    keyward_annotations: BTreeMap<String, String>,
) -> Secret {
    let mut labels = rendered.labels;
    labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned());
    let mut annotations = rendered.annotations;
    annotations.extend(keyward_annotations);
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(
            rendered
                .data
                .into_iter()
                .map(|(k, v)| (k, ByteString(v.into_bytes())))
                .collect(),
        ),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::SecretTemplate;

    fn vars(value: &SecretValue) -> Variables<'_> {
        Variables {
            key: value,
            key_id: "k-1",
            created_at: "2026-01-01T00:00:00Z".into(),
            expires_at: String::new(),
            revision: 3,
            name: "agent",
            namespace: "team",
        }
    }

    #[test]
    fn renders_the_value_and_template_entries() {
        let spec = SecretSpec {
            name: None,
            key: "PREFECT_API_KEY".into(),
            template: Some(Box::new(SecretTemplate {
                data: BTreeMap::from([(
                    "config.toml".into(),
                    "[cloud.agent]\nauth_token = \"{{ key }}\"\n".into(),
                )]),
                labels: BTreeMap::from([("rev".into(), "{{revision}}".into())]),
                ..Default::default()
            })),
        };
        let value = SecretValue::new("pnu_abc".into());
        let r = render_all(&spec, &vars(&value)).unwrap();
        assert_eq!(r.data["PREFECT_API_KEY"], "pnu_abc");
        assert_eq!(
            r.data["config.toml"],
            "[cloud.agent]\nauth_token = \"pnu_abc\"\n"
        );
        assert_eq!(r.labels["rev"], "3");
    }

    #[test]
    fn json_placeholders_quote_the_value_and_null_a_missing_expiry() {
        let spec = SecretSpec {
            name: None,
            key: "api-key".into(),
            template: Some(Box::new(SecretTemplate {
                data: BTreeMap::from([(
                    "auth".into(),
                    r#"{"console.convox.com": {{ json key }}, "expires": {{json expiresAt}}}"#
                        .into(),
                )]),
                ..Default::default()
            })),
        };
        let value = SecretValue::new("a\"b".into());
        let r = render_all(&spec, &vars(&value)).unwrap();
        let auth: serde_json::Value = serde_json::from_str(&r.data["auth"]).unwrap();
        assert_eq!(auth["console.convox.com"], "a\"b");
        assert!(auth["expires"].is_null());
    }

    #[test]
    fn template_errors_name_the_field_and_never_the_value() {
        let mut spec = SecretSpec {
            template: Some(Box::new(SecretTemplate {
                data: BTreeMap::from([("x".into(), "{{ token }}".into())]),
                ..Default::default()
            })),
            ..Default::default()
        };
        let err = check_template(&spec).unwrap_err();
        assert_eq!(err.field, "secret.template.data.x");
        assert_eq!(
            err.to_string(),
            "secret.template.data.x: unknown variable {{ token }}; known: key, keyId, createdAt, expiresAt, revision, name, namespace"
        );
        spec.template.as_mut().unwrap().data = BTreeMap::from([("x".into(), "{{ key ".into())]);
        assert_eq!(
            check_template(&spec).unwrap_err().problem,
            crate::template::Problem::Unclosed
        );
    }

    #[test]
    fn the_hash_sees_every_byte_and_ignores_order() {
        let a = ("a".to_owned(), b"1".to_vec());
        let b = ("b".to_owned(), b"2".to_vec());
        let h1 = data_hash([(&a.0, &a.1[..]), (&b.0, &b.1[..])]);
        let h2 = data_hash([(&b.0, &b.1[..]), (&a.0, &a.1[..])]);
        assert_eq!(h1, h2);
        let c = ("b".to_owned(), b"3".to_vec());
        assert_ne!(h1, data_hash([(&a.0, &a.1[..]), (&c.0, &c.1[..])]));
    }

    #[test]
    fn the_cache_keeps_what_the_planner_reads_and_no_value() {
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {
                "name": "agent", "namespace": "team", "uid": "s-1", "resourceVersion": "42",
                "labels": {MANAGED_BY_LABEL: MANAGED_BY, "team": "a"},
                "annotations": {
                    ATTEMPT_ANNOTATION: "a-1", KEY_ID_ANNOTATION: "k-1",
                    REVISION_ANNOTATION: "3", CREATED_AT_ANNOTATION: "2026-01-01T00:00:00Z",
                    SHAPE_ANNOTATION: "sha256:s", REASON_ANNOTATION: "Created",
                    "someone.else/note": "kept upstream, not here"
                },
                "ownerReferences": [
                    {"apiVersion": "keyward.dev/v1alpha1", "kind": "AuthKey", "name": "agent",
                     "uid": "k-uid", "controller": true},
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "other", "uid": "c-uid"}
                ]
            },
            "data": {"key": "c2VjcmV0"}
        });
        let secret: Secret = serde_json::from_value(json.clone()).unwrap();
        let cached: CachedSecret = serde_json::from_value(json).unwrap();
        // The planner sees the same either way.
        assert_eq!(cached.view("k-uid"), view(&secret, "k-uid"));
        let seen = cached.view("k-uid");
        assert!(seen.owned && !cached.view("c-uid").owned);
        assert_eq!(seen.hash, secret_hash(&secret));
        assert_eq!(
            (
                seen.attempt.as_deref(),
                seen.revision,
                seen.resource_version.as_deref()
            ),
            (Some("a-1"), Some(3), Some("42"))
        );
        // Of the object only what triggers and guards remains (no data by type): no
        // labels or other annotations, the controlling owner alone.
        let meta = &cached.metadata;
        assert!(meta.labels.is_none() && meta.annotations.is_none());
        assert_eq!(meta.owner_references.as_ref().map(Vec::len), Some(1));
        use kube::Resource as _;
        assert_eq!(
            (
                CachedSecret::kind(&()),
                CachedSecret::plural(&()),
                CachedSecret::api_version(&())
            ),
            ("Secret".into(), "secrets".into(), "v1".into())
        );
    }
}
