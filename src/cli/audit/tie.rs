//! Which resource an upstream key belongs to, and whether that resource still holds
//! it: a pure function of what the provider listed and the key resources read.
//!
//! A keyward marker (`kw:<uid8>.<attempt>`, [`crate::lifecycle::marker`]) names the
//! resource by the first 8 hex characters of its UID; a principal's name (Prefect's
//! bots carry no marker) names the `ServiceAccountKey`s of this provider whose
//! `spec.serviceAccount.name` it is. A key is an orphan only when the audit is sure:
//! its resource exists and neither holds it nor has an issuance in flight that may be
//! its, or no resource anywhere in the cluster has the marker's UID.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::Serialize;

use crate::{
    cli::keys::{Key, KeyKind, ProviderName},
    lifecycle,
    providers::{MarkedKey, marker_in},
    resources::ProviderKind,
};

/// What the audit looked at.
#[derive(Clone, Debug)]
pub struct Scope {
    /// The audited provider.
    pub provider: ProviderName,
    /// `None`: the keys of every namespace were read; otherwise only this one's (the
    /// caller may not list keys cluster-wide).
    pub listed_only: Option<String>,
}

/// Where a listed key stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum State {
    /// The resource's current key (`status.keyId`).
    Current,
    /// One of the resource's retiring keys (`status.retiring`): keyward revokes it when
    /// its overlap ends.
    Retiring,
    /// The resource has an issuance in flight this key may be the result of
    /// (`status.attempt`): keyward records it or revokes it itself.
    InFlight,
    /// Orphan: the resource exists but holds neither this key nor an attempt for it.
    NotHeld,
    /// Orphan: no resource in the cluster has the marker's UID.
    ResourceGone,
    /// The audit cannot tell (a principal no resource names, or a resource that may be
    /// in a namespace the caller cannot list): never revoked.
    Unknown,
}

impl State {
    pub fn is_orphan(self) -> bool {
        matches!(self, State::NotHeld | State::ResourceGone)
    }

    /// As the table shows it.
    pub fn label(self) -> &'static str {
        match self {
            State::Current => "current",
            State::Retiring => "retiring",
            State::InFlight => "in flight",
            State::NotHeld => "orphan: not held",
            State::ResourceGone => "orphan: resource gone",
            State::Unknown => "unknown",
        }
    }
}

/// A key resource, by name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Resource {
    pub namespace: String,
    pub kind: KeyKind,
    pub name: String,
}

impl Resource {
    fn of(key: &Key) -> Self {
        Self {
            namespace: key.namespace.clone(),
            kind: key.kind,
            name: key.name.clone(),
        }
    }
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// One listed key, tied to its resource (or not).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Tie {
    /// The upstream key id (never its value).
    pub id: String,
    /// The keyward marker, or the principal's name where the upstream has no room for
    /// one.
    pub marker: String,
    pub created_at: Option<Time>,
    /// The resource the marker names, when one exists.
    pub resource: Option<Resource>,
    pub state: State,
    pub orphan: bool,
    /// Why, in a sentence.
    pub detail: String,
}

/// Ties each listed key to its resource. `same_key(listed, held)` says whether two ids
/// name one upstream key ([`crate::providers::KeyApi::same_key`]). Sorted by resource
/// (none last), then state and creation time.
pub fn tie(
    listed: &[MarkedKey],
    keys: &[Key],
    scope: &Scope,
    same_key: &dyn Fn(&str, &str) -> bool,
) -> Vec<Tie> {
    let mut ties: Vec<Tie> = listed
        .iter()
        .map(|m| tie_one(m, keys, scope, same_key))
        .collect();
    ties.sort_by(|a, b| {
        (
            a.resource.is_none(),
            &a.resource,
            a.state,
            &a.created_at,
            &a.id,
        )
            .cmp(&(
                b.resource.is_none(),
                &b.resource,
                b.state,
                &b.created_at,
                &b.id,
            ))
    });
    ties
}

fn tie_one(
    m: &MarkedKey,
    keys: &[Key],
    scope: &Scope,
    same_key: &dyn Fn(&str, &str) -> bool,
) -> Tie {
    let by_marker = marker_in(&m.marker).is_some_and(|k| k == m.marker);
    let candidates: Vec<&Key> = if by_marker {
        keys.iter()
            .filter(|k| !k.uid.is_empty() && m.marker.starts_with(&lifecycle::marker(&k.uid, "")))
            .collect()
    } else {
        keys.iter()
            .filter(|k| {
                k.kind == KeyKind::ServiceAccountKey
                    && k.service_account.as_deref() == Some(m.marker.as_str())
                    && scope.provider.serves(k)
            })
            .collect()
    };
    let (state, resource, detail) = judge(m, &candidates, by_marker, scope, same_key);
    Tie {
        id: m.id.clone(),
        marker: m.marker.clone(),
        created_at: m.created_at.map(Time),
        resource,
        orphan: state.is_orphan(),
        state,
        detail,
    }
}

fn judge(
    m: &MarkedKey,
    candidates: &[&Key],
    by_marker: bool,
    scope: &Scope,
    same_key: &dyn Fn(&str, &str) -> bool,
) -> (State, Option<Resource>, String) {
    for key in candidates {
        let r = Resource::of(key);
        if key
            .status
            .key_id
            .as_deref()
            .is_some_and(|h| same_key(&m.id, h))
        {
            return (
                State::Current,
                Some(r.clone()),
                format!("{r} holds it as its current key"),
            );
        }
        if let Some(retiring) = key
            .status
            .retiring
            .iter()
            .find(|k| same_key(&m.id, &k.key_id))
        {
            let detail = format!(
                "{r} retires it; keyward revokes it at {}",
                retiring.revoke_at.0
            );
            return (State::Retiring, Some(r), detail);
        }
    }
    for key in candidates {
        let Some(attempt) = &key.status.attempt else {
            continue;
        };
        // A principal's keys carry no marker: any not yet held may be the attempt's.
        if !by_marker || attempt.marker == m.marker {
            let r = Resource::of(key);
            let detail = format!(
                "{r} is issuing (attempt {}, started {}): keyward records this key or revokes it itself",
                attempt.id, attempt.started_at.0
            );
            return (State::InFlight, Some(r), detail);
        }
    }
    let uid8 = m.marker.get(3..11).unwrap_or_default();
    let provider = scope.provider.subject();
    if let Some(key) = candidates.first() {
        let r = Resource::of(key);
        // Every key of a KeyProvider is in its namespace, which is always read; a
        // ClusterKeyProvider's may be anywhere.
        let sure = by_marker
            || scope.listed_only.is_none()
            || scope.provider.kind == ProviderKind::KeyProvider;
        let detail = if by_marker {
            format!("{r} exists but holds neither this key nor an issuance with this marker")
        } else if sure {
            format!(
                "{r} uses the service account {} but holds another key",
                m.marker
            )
        } else {
            format!(
                "{r} uses the service account {} but holds another key; a ServiceAccountKey of {provider} in a namespace you may not list could hold it",
                m.marker
            )
        };
        return (
            if sure { State::NotHeld } else { State::Unknown },
            Some(r),
            detail,
        );
    }
    let detail = match (by_marker, &scope.listed_only) {
        (true, None) => {
            format!("no AuthKey or ServiceAccountKey in the cluster has a UID starting {uid8}")
        }
        (true, Some(ns)) => format!(
            "no key in namespace {ns} has a UID starting {uid8}; you may not list keys in every namespace, so its resource may be in another"
        ),
        (false, _) => format!(
            "no ServiceAccountKey of {provider} names the service account {}, and the upstream keeps no marker on it: someone else's, or one whose resource is gone",
            m.marker
        ),
    };
    let state = if by_marker && scope.listed_only.is_none() {
        State::ResourceGone
    } else {
        State::Unknown
    };
    (state, None, detail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cli::fixtures::{key, time},
        resources::{IssueAttempt, KeyStatus, RetiringKey},
    };

    const EDGE_UID: &str = "0123abcd-1111-2222-3333-444455556666";
    const AGENT_UID: &str = "89ef0123-1111-2222-3333-444455556666";

    fn listed(id: &str, marker: &str) -> MarkedKey {
        MarkedKey {
            id: id.into(),
            marker: marker.into(),
            created_at: None,
        }
    }

    fn scope(listed_only: Option<&str>) -> Scope {
        Scope {
            provider: ProviderName {
                kind: ProviderKind::KeyProvider,
                namespace: Some("team".into()),
                name: "keys".into(),
            },
            listed_only: listed_only.map(str::to_owned),
        }
    }

    fn attempt(marker: &str) -> IssueAttempt {
        IssueAttempt {
            id: "feedf00d".into(),
            marker: marker.into(),
            reason: "Renewing".into(),
            started_at: time("2026-01-01T00:00:00Z"),
            shape: String::new(),
            rotate_request: None,
            secret_name: "edge".into(),
            revision: 3,
        }
    }

    /// AuthKey team/edge holding `k-current`, retiring `k-old`, issuing attempt
    /// `feedf00d`.
    fn edge() -> Key {
        let mut edge = key(
            "edge",
            KeyStatus {
                key_id: Some("k-current".into()),
                retiring: vec![RetiringKey {
                    key_id: "k-old".into(),
                    revoke_at: time("2026-01-01T00:10:00Z"),
                    reason: "Renewing".into(),
                    waiting_for: vec![],
                }],
                attempt: Some(Box::new(attempt("kw:0123abcd.feedf00d"))),
                ..KeyStatus::default()
            },
        );
        edge.uid = EDGE_UID.into();
        edge
    }

    fn states(ties: &[Tie]) -> Vec<(&str, State, Option<&str>)> {
        ties.iter()
            .map(|t| {
                let name = t.resource.as_ref().map(|r| r.name.as_str());
                (t.id.as_str(), t.state, name)
            })
            .collect()
    }

    fn exact(a: &str, b: &str) -> bool {
        a == b
    }

    #[test]
    fn a_marker_ties_a_key_to_the_resource_whose_uid_it_carries() {
        let keys = [edge()];
        let ties = tie(
            &[
                listed("k-current", "kw:0123abcd.00000001"),
                listed("k-old", "kw:0123abcd.00000000"),
                listed("k-landing", "kw:0123abcd.feedf00d"),
                listed("k-stray", "kw:0123abcd.0badf00d"),
                listed("k-gone", "kw:5ee8a1b2.00000001"),
            ],
            &keys,
            &scope(None),
            &exact,
        );
        assert_eq!(
            states(&ties),
            [
                ("k-current", State::Current, Some("edge")),
                ("k-old", State::Retiring, Some("edge")),
                ("k-landing", State::InFlight, Some("edge")),
                ("k-stray", State::NotHeld, Some("edge")),
                ("k-gone", State::ResourceGone, None),
            ]
        );
        let orphans: Vec<&str> = ties
            .iter()
            .filter(|t| t.orphan)
            .map(|t| t.id.as_str())
            .collect();
        assert_eq!(orphans, ["k-stray", "k-gone"]);
        assert_eq!(
            ties[3].detail,
            "AuthKey team/edge exists but holds neither this key nor an issuance with this marker"
        );
        assert_eq!(
            ties[4].detail,
            "no AuthKey or ServiceAccountKey in the cluster has a UID starting 5ee8a1b2"
        );
        assert!(
            ties[1].detail.contains("2026-01-01T00:10:00Z"),
            "{}",
            ties[1].detail
        );
    }

    #[test]
    fn a_resource_held_elsewhere_is_not_gone_when_not_every_namespace_was_read() {
        let keys = [edge()];
        let ties = tie(
            &[
                listed("k-stray", "kw:0123abcd.0badf00d"),
                listed("k-elsewhere", "kw:5ee8a1b2.00000001"),
            ],
            &keys,
            &scope(Some("team")),
            &exact,
        );
        assert_eq!(
            states(&ties),
            [
                ("k-stray", State::NotHeld, Some("edge")),
                ("k-elsewhere", State::Unknown, None),
            ]
        );
        assert!(!ties[1].orphan);
        assert!(
            ties[1].detail.contains("may be in another"),
            "{}",
            ties[1].detail
        );
    }

    #[test]
    fn a_uid_prefix_two_resources_share_is_held_if_either_holds_it() {
        let mut twin = key("twin", KeyStatus::default());
        twin.uid = "0123abcd-9999-2222-3333-444455556666".into();
        let keys = [twin, edge()];
        let ties = tie(
            &[listed("k-current", "kw:0123abcd.00000001")],
            &keys,
            &scope(None),
            &exact,
        );
        assert_eq!(states(&ties), [("k-current", State::Current, Some("edge"))]);
    }

    /// A Prefect bot: tied by name to the ServiceAccountKeys of this provider.
    #[test]
    fn a_principal_is_tied_by_name_to_the_service_account_keys_of_this_provider() {
        let sak = |name: &str, bot: &str, status: KeyStatus| {
            let mut k = key(name, status);
            k.kind = KeyKind::ServiceAccountKey;
            k.uid = AGENT_UID.into();
            k.service_account = Some(bot.into());
            k
        };
        let held = |id: &str| KeyStatus {
            key_id: Some(id.into()),
            ..KeyStatus::default()
        };
        let mut elsewhere = sak("other-team", "shared", held("created/b9/k9"));
        elsewhere.namespace = "other".into();
        let keys = [
            sak("agent", "agent", held("created/b1/k1")),
            sak(
                "busy",
                "busy",
                KeyStatus {
                    attempt: Some(Box::new(attempt("kw:89ef0123.feedf00d"))),
                    ..held("created/b2/k2")
                },
            ),
            elsewhere,
        ];
        // Prefect spells one key `created/…`, `adopted/…` or `unseen/…`.
        let same =
            |a: &str, b: &str| a.split_once('/').map(|p| p.1) == b.split_once('/').map(|p| p.1);
        let ties = tie(
            &[
                listed("unseen/b1/k1", "agent"),
                listed("unseen/b1/k0", "agent"),
                listed("unseen/b2/k3", "busy"),
                listed("unseen/b3/k4", "made-by-hand"),
                listed("unseen/b9/k8", "shared"),
            ],
            &keys,
            &scope(None),
            &same,
        );
        assert_eq!(
            states(&ties),
            [
                ("unseen/b1/k1", State::Current, Some("agent")),
                ("unseen/b1/k0", State::NotHeld, Some("agent")),
                ("unseen/b2/k3", State::InFlight, Some("busy")),
                ("unseen/b3/k4", State::Unknown, None),
                ("unseen/b9/k8", State::Unknown, None),
            ],
            "a bot no key of this provider names is never an orphan"
        );
        assert!(
            ties[3].detail.contains("someone else's"),
            "{}",
            ties[3].detail
        );
    }

    #[test]
    fn a_cluster_providers_principal_seen_in_one_namespace_is_unknown() {
        let mut agent = key("agent", KeyStatus::default());
        agent.kind = KeyKind::ServiceAccountKey;
        agent.service_account = Some("agent".into());
        agent.provider.kind = ProviderKind::ClusterKeyProvider;
        let cluster = |listed_only: Option<&str>| Scope {
            provider: ProviderName::of(&agent),
            listed_only: listed_only.map(str::to_owned),
        };
        let keys = [agent.clone()];
        let one = [listed("unseen/b1/k0", "agent")];
        assert_eq!(
            states(&tie(&one, &keys, &cluster(Some("team")), &exact)),
            [("unseen/b1/k0", State::Unknown, Some("agent"))]
        );
        assert_eq!(
            states(&tie(&one, &keys, &cluster(None), &exact)),
            [("unseen/b1/k0", State::NotHeld, Some("agent"))]
        );
        assert_eq!(cluster(None).provider.subject(), "ckp/keys");
        assert_eq!(scope(None).provider.subject(), "kp/team/keys");
    }
}
