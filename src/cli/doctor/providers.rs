//! Providers: each one `Ready`, or why not; and keys that cannot use a provider —
//! its own status never calls the upstream, a key's issue does, so a credential
//! the upstream refuses shows on the keys.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{Api, Client, ResourceExt, api::ListParams};

use super::{Area, Finding};
use crate::{
    cli::keys::{self, Key, ProviderName},
    resources::{ClusterKeyProvider, KeyProvider, ProviderKind, ProviderStatus},
};

/// Key conditions that say the provider, not the key, needs fixing.
const PROVIDER_REASONS: [&str; 7] = [
    "CredentialsInvalid",
    "CredentialsNotFound",
    "PermissionDenied",
    "ProviderMisconfigured",
    "ProviderNotFound",
    "AccountNotFound",
    "TailnetNotFound",
];

/// What to do about a provider reason.
pub fn provider_fix(reason: &str, kind: ProviderKind) -> String {
    let home = match kind {
        ProviderKind::KeyProvider => "in the provider's own namespace",
        ProviderKind::ClusterKeyProvider => "in the operator namespace",
    };
    match reason {
        "CredentialsNotFound" => format!("create the credential Secret the message names, {home}"),
        "CredentialsInvalid" => format!(
            "put a working credential in the Secret {home}, under the data key the provider names (create a new API token or OAuth client upstream if this one was revoked); keyward re-reads it within 10 minutes, and at once for a key it reconciles"
        ),
        "PermissionDenied" => "give the credential the permission the message names (a Tailscale OAuth client needs the auth_keys scope), or use one that has it".into(),
        "ProviderMisconfigured" | "AccountNotFound" | "TailnetNotFound" => {
            "fix the provider field the message names (`kubectl explain keyprovider.spec`)".into()
        }
        "ProviderNotFound" => "create the provider, or point the keys' spec.providerRef at one that exists".into(),
        other => format!("see {other} in docs/troubleshooting.md"),
    }
}

/// A provider as doctor sees it.
pub struct ProviderView {
    pub provider: ProviderName,
    pub generation: Option<i64>,
    pub status: Option<ProviderStatus>,
}

/// The condition of `key` that blames its provider, if any.
fn provider_blame(key: &Key) -> Option<&Condition> {
    let failing = |type_: &str, status: &str| key.condition(type_).filter(|c| c.status == status);
    failing("Ready", "False")
        .or_else(|| failing("Degraded", "True"))
        .filter(|c| PROVIDER_REASONS.contains(&c.reason.as_str()))
}

/// The verdicts on providers: each one's own status, and keys that blame a provider —
/// one that exists (credentials refused upstream) or one that does not.
pub fn provider_findings(providers: &[ProviderView], keys: &[Key]) -> Vec<Finding> {
    let mut findings = Vec::new();
    for p in providers {
        let ready = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
        let observed = p.status.as_ref().and_then(|s| s.observed_generation);
        let kind_of = p
            .status
            .as_ref()
            .and_then(|s| s.provider_type.clone())
            .unwrap_or_else(|| "unknown type".into());
        let blamed: Vec<(&Key, &Condition)> = keys
            .iter()
            .filter(|k| p.provider.serves(k))
            .filter_map(|k| provider_blame(k).map(|c| (k, c)))
            .collect();
        let finding = match ready {
            None => Finding::problem(
                Area::Providers,
                p.provider.subject(),
                "keyward has not reported on it",
                "keyward reports on every provider it watches within seconds: check the operator above, and that its --namespaces include this one",
            ),
            Some(_) if observed < p.generation => Finding::problem(
                Area::Providers,
                p.provider.subject(),
                format!(
                    "its status describes generation {}, not the current {}",
                    observed.unwrap_or_default(),
                    p.generation.unwrap_or_default()
                ),
                "keyward has not looked at the last change yet: check the operator above",
            ),
            Some(c) if c.status != "True" => Finding::problem(
                Area::Providers,
                p.provider.subject(),
                format!("not Ready, {}: {}", c.reason, c.message),
                provider_fix(&c.reason, p.provider.kind),
            ),
            Some(_) if !blamed.is_empty() => {
                let (key, c) = blamed[0];
                Finding::problem(
                    Area::Providers,
                    p.provider.subject(),
                    format!(
                        "Ready, but {} key(s) cannot use it; {} {}/{}: {}: {}",
                        blamed.len(),
                        key.kind,
                        key.namespace,
                        key.name,
                        c.reason,
                        c.message
                    ),
                    provider_fix(&c.reason, p.provider.kind),
                )
            }
            Some(c) => Finding::ok(
                Area::Providers,
                p.provider.subject(),
                format!("Ready ({kind_of}): {}", c.message),
            ),
        };
        findings.push(finding);
    }
    // Keys naming a provider that does not exist.
    let mut missing: BTreeMap<(String, String), Vec<&Key>> = BTreeMap::new();
    for key in keys {
        if !providers.iter().any(|p| p.provider.serves(key))
            && provider_blame(key).is_some_and(|c| c.reason == "ProviderNotFound")
        {
            let subject = ProviderName::of(key).subject();
            missing
                .entry((subject, key.provider.name.clone()))
                .or_default()
                .push(key);
        }
    }
    for ((subject, _), keys) in missing {
        let names: Vec<String> = keys.iter().map(|k| k.reference()).collect();
        findings.push(Finding::problem(
            Area::Providers,
            subject,
            format!("does not exist, and {} name it", names.join(", ")),
            provider_fix("ProviderNotFound", keys[0].provider.kind),
        ));
    }
    if findings.is_empty() {
        findings.push(Finding::skipped(
            Area::Providers,
            "providers",
            "no KeyProvider here and no ClusterKeyProvider: create one before any key (examples/builtin/)",
        ));
    }
    findings
}

pub(super) async fn check(client: &Client, namespace: Option<&str>) -> Vec<Finding> {
    let cannot = |what: &str, e: &kube::Error| {
        Finding::problem(
            Area::Providers,
            what.to_owned(),
            format!("cannot list them: {}", crate::cli::api_message(e)),
            format!("doctor needs list on {what}.keyward.dev"),
        )
    };
    let namespaced: Api<KeyProvider> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut views = Vec::new();
    let mut findings = Vec::new();
    match namespaced.list(&ListParams::default()).await {
        Ok(list) => views.extend(list.items.into_iter().map(|p| ProviderView {
            provider: ProviderName {
                kind: ProviderKind::KeyProvider,
                namespace: p.namespace(),
                name: p.name_any(),
            },
            generation: p.metadata.generation,
            status: p.status,
        })),
        Err(e) => findings.push(cannot("keyproviders", &e)),
    }
    match Api::<ClusterKeyProvider>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => views.extend(list.items.into_iter().map(|p| ProviderView {
            provider: ProviderName {
                kind: ProviderKind::ClusterKeyProvider,
                namespace: None,
                name: p.name_any(),
            },
            generation: p.metadata.generation,
            status: p.status,
        })),
        Err(e) => findings.push(cannot("clusterkeyproviders", &e)),
    }
    let keys = keys::list(client, namespace, None)
        .await
        .unwrap_or_default();
    findings.extend(provider_findings(&views, &keys));
    findings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cli::{
            doctor::Verdict,
            fixtures::{self, condition},
        },
        resources::KeyStatus,
    };

    fn provider(name: &str, ready: Option<Condition>) -> ProviderView {
        ProviderView {
            provider: ProviderName {
                kind: ProviderKind::KeyProvider,
                namespace: Some("team".into()),
                name: name.into(),
            },
            generation: Some(1),
            status: ready.map(|c| ProviderStatus {
                conditions: vec![c],
                observed_generation: Some(1),
                provider_type: Some("tailscale".into()),
            }),
        }
    }

    fn key(name: &str, provider: &str, ready: Condition) -> Key {
        let mut key = fixtures::key(
            name,
            KeyStatus {
                conditions: vec![ready],
                ..Default::default()
            },
        );
        key.provider.name = provider.into();
        key
    }

    #[test]
    fn providers_are_judged_by_their_status_and_by_their_keys() {
        let configured = || {
            condition(
                "Ready",
                "True",
                "Configured",
                "KeyProvider team/ts issues tailscale keys",
            )
        };
        let findings = provider_findings(
            &[
                provider("ok", Some(configured())),
                provider("ts", Some(configured())),
                provider(
                    "nosecret",
                    Some(condition(
                        "Ready",
                        "False",
                        "CredentialsNotFound",
                        "Secret team/x does not exist; create it",
                    )),
                ),
                provider("new", None),
            ],
            &[
                key("fine", "ok", condition("Ready", "True", "Issued", "key k1")),
                key(
                    "refused",
                    "ts",
                    condition(
                        "Ready",
                        "False",
                        "CredentialsInvalid",
                        "the upstream refused the credential (401)",
                    ),
                ),
                key(
                    "orphan",
                    "gone",
                    condition(
                        "Ready",
                        "False",
                        "ProviderNotFound",
                        "KeyProvider gone does not exist",
                    ),
                ),
            ],
        );
        let by = |s: &str| {
            findings
                .iter()
                .find(|f| f.subject == s)
                .unwrap_or_else(|| panic!("{s}: {findings:?}"))
        };
        assert_eq!(by("kp/team/ok").verdict, Verdict::Ok);
        let ts = by("kp/team/ts");
        assert_eq!(ts.verdict, Verdict::Problem);
        assert!(
            ts.detail
                .contains("AuthKey team/refused: CredentialsInvalid: the upstream refused"),
            "{}",
            ts.detail
        );
        assert!(
            ts.fix
                .as_ref()
                .unwrap()
                .contains("put a working credential in the Secret")
        );
        assert!(
            by("kp/team/nosecret")
                .fix
                .as_ref()
                .unwrap()
                .contains("create the credential Secret")
        );
        assert!(by("kp/team/new").detail.contains("has not reported"));
        let gone = by("kp/team/gone");
        assert!(
            gone.detail
                .contains("does not exist, and authkey/orphan name it"),
            "{}",
            gone.detail
        );
    }
}
