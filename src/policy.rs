//! Provider policy: which namespaces may use a provider and what they may mint.
//! Checked before anything is issued; a refusal names the rule.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::{providers::KeyShape, resources::ProviderPolicy};

/// A refusal: the rule's name (a condition reason) and what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub rule: &'static str,
    pub message: String,
}

/// What is asked of the provider.
pub struct Request<'a> {
    pub namespace: &'a str,
    pub namespace_labels: &'a BTreeMap<String, String>,
    pub shape: &'a KeyShape,
    pub lifetime: Option<Duration>,
    /// A `ClusterKeyProvider` serves no namespace until its policy allows it.
    pub cluster_scoped: bool,
}

pub fn check(policy: Option<&ProviderPolicy>, r: &Request) -> Result<(), Violation> {
    let default = ProviderPolicy {
        allow_reusable: true,
        allow_preauthorized: true,
        allow_ephemeral: true,
        ..Default::default()
    };
    let policy = policy.unwrap_or(&default);
    if r.cluster_scoped {
        let allowed = policy
            .namespace_selector
            .as_ref()
            .is_some_and(|s| selector_matches(s, r.namespace_labels));
        if !allowed {
            return Err(Violation {
                rule: "NamespaceNotAllowed",
                message: format!(
                    "namespace {} is not allowed by the provider's spec.policy.namespaceSelector; \
                     ask the platform team to allow it, or use a KeyProvider in this namespace",
                    r.namespace
                ),
            });
        }
    }
    if let Some(allowed) = &policy.allowed_tags {
        let denied: Vec<&str> = r
            .shape
            .tags
            .iter()
            .filter(|t| !allowed.contains(t))
            .map(|t| t.0.as_str())
            .collect();
        if !denied.is_empty() {
            let allowed: Vec<&str> = allowed.iter().map(|t| t.0.as_str()).collect();
            return Err(Violation {
                rule: "TagNotAllowed",
                message: format!(
                    "tags {denied:?} are not in the provider's spec.policy.allowedTags {allowed:?}; remove them from spec.tags"
                ),
            });
        }
    }
    if let Some(max) = policy.max_expiry.as_ref().and_then(|d| d.to_std()) {
        match r.lifetime {
            Some(lifetime) if lifetime <= max => {}
            _ => {
                let max = policy
                    .max_expiry
                    .as_ref()
                    .map(|d| d.0.as_str())
                    .unwrap_or_default();
                return Err(Violation {
                    rule: "ExpiryNotAllowed",
                    message: format!(
                        "the provider's spec.policy.maxExpiry is {max}; set spec.expiry to {max} or less"
                    ),
                });
            }
        }
    }
    for (asked, allowed, what, rule) in [
        (
            r.shape.reusable,
            policy.allow_reusable,
            "reusable",
            "ReusableNotAllowed",
        ),
        (
            r.shape.preauthorized,
            policy.allow_preauthorized,
            "preauthorized",
            "PreauthorizedNotAllowed",
        ),
        (
            r.shape.ephemeral,
            policy.allow_ephemeral,
            "ephemeral",
            "EphemeralNotAllowed",
        ),
    ] {
        if asked && !allowed {
            return Err(Violation {
                rule,
                message: format!(
                    "the provider's policy does not allow {what} keys; set spec.{what} to false"
                ),
            });
        }
    }
    Ok(())
}

/// Kubernetes label-selector semantics: every `matchLabels` entry and every
/// expression must hold; an empty selector matches everything.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::Tag;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_follow_kubernetes_semantics() {
        let s = LabelSelector {
            match_labels: Some(labels(&[("team", "edge")])),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "env".into(),
                operator: "NotIn".into(),
                values: Some(vec!["prod".into()]),
            }]),
        };
        assert!(selector_matches(&s, &labels(&[("team", "edge")])));
        assert!(!selector_matches(
            &s,
            &labels(&[("team", "edge"), ("env", "prod")])
        ));
        assert!(!selector_matches(&s, &labels(&[("team", "core")])));
        assert!(selector_matches(&LabelSelector::default(), &labels(&[])));
    }

    #[test]
    fn each_rule_is_named() {
        let ns_labels = labels(&[("team", "edge")]);
        let shape = KeyShape {
            tags: vec![Tag("tag:prod".into())],
            reusable: true,
            ..Default::default()
        };
        let request = |cluster_scoped, lifetime| Request {
            namespace: "edge",
            namespace_labels: &ns_labels,
            shape: &shape,
            lifetime,
            cluster_scoped,
        };
        let rule = |p: &ProviderPolicy, r: &Request| check(Some(p), r).unwrap_err().rule;
        let open = ProviderPolicy {
            namespace_selector: Some(LabelSelector::default()),
            allow_reusable: true,
            allow_preauthorized: true,
            allow_ephemeral: true,
            ..Default::default()
        };
        assert!(check(Some(&open), &request(true, None)).is_ok());
        assert_eq!(
            check(None, &request(true, None)).unwrap_err().rule,
            "NamespaceNotAllowed",
            "a ClusterKeyProvider serves nobody until allowed"
        );
        assert!(check(None, &request(false, None)).is_ok());
        let tags = ProviderPolicy {
            allowed_tags: Some(vec![Tag("tag:edge".into())]),
            ..open.clone()
        };
        assert_eq!(rule(&tags, &request(true, None)), "TagNotAllowed");
        let expiry = ProviderPolicy {
            max_expiry: Some("24h".into()),
            ..open.clone()
        };
        assert_eq!(
            rule(
                &expiry,
                &request(true, Some(Duration::from_secs(48 * 3600)))
            ),
            "ExpiryNotAllowed"
        );
        assert!(
            check(
                Some(&expiry),
                &request(true, Some(Duration::from_secs(3600)))
            )
            .is_ok()
        );
        let no_reuse = ProviderPolicy {
            allow_reusable: false,
            ..open
        };
        assert_eq!(rule(&no_reuse, &request(true, None)), "ReusableNotAllowed");
    }
}
