//! The key APIs keyward issues keys through: one trait, one module per provider.
//!
//! A provider is built from the provider resource and the credentials read from its
//! Secret at that moment; `crate::resolve` keeps what was built across reconciles and
//! says when it is built again (a spec change, a refused credential, the provider
//! status controller's periodic look).

mod builtin;
mod http;
pub mod identity;
mod prefect;
pub mod tailscale;
pub mod transport;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use jiff::Timestamp;

pub use builtin::Builtin;
pub use http::Http;
pub use identity::ServiceAccount;
pub use prefect::Prefect;
pub use tailscale::Tailscale;
pub use transport::{TokenCache, Transport};

use crate::resources::{ClusterKeyProviderSpec, KeyProviderSpec, Tag};

/// A key value. It can be written into a Secret and nowhere else: no `Display`, no
/// `Serialize`, and `Debug` prints a placeholder, so it cannot reach a log line,
/// an event, a status field or an error message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(String);

impl SecretValue {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The value, for rendering into Secret data only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

/// What a key should be able to do, from the key resource's spec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyShape {
    pub reusable: bool,
    pub ephemeral: bool,
    pub preauthorized: bool,
    pub tags: Vec<Tag>,
    /// `ServiceAccountKey`: the upstream principal, whether keyward creates it, role, scopes.
    pub service_account: Option<String>,
    pub create_service_account: bool,
    pub role: Option<String>,
    pub scopes: Vec<String>,
}

/// One issuance.
#[derive(Clone, Debug, PartialEq)]
pub struct IssueRequest {
    /// Identifies the attempt upstream (description / name); how orphans are found.
    pub marker: String,
    /// The user's description, without the marker.
    pub description: Option<String>,
    /// Requested lifetime; `None` means the provider's default.
    pub lifetime: Option<Duration>,
    pub shape: KeyShape,
    /// The key this one replaces, if any: providers that rotate natively (Prefect's
    /// `rotate_api_key`) rotate it, keeping it valid for `overlap`.
    pub previous: Option<String>,
    /// How long the previous key stays valid after the switch.
    pub overlap: Duration,
}

/// A key as the provider returned it.
#[derive(Clone, Debug)]
pub struct IssuedKey {
    pub id: String,
    pub value: SecretValue,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
}

/// What the upstream says about a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    Valid,
    Expired,
    Revoked,
    UsedUp,
    /// The provider cannot tell (builtin keys have no upstream).
    Unknown,
}

/// What a provider supports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Capabilities {
    /// The longest lifetime the upstream grants.
    pub max_lifetime: Option<Duration>,
    /// The shortest lifetime the upstream grants.
    pub min_lifetime: Option<Duration>,
    /// Lifetime used when the key does not ask for one (`None`: keys do not expire).
    pub default_lifetime: Option<Duration>,
    /// The upstream can rotate a key itself (Prefect `rotate_api_key`).
    pub native_rotate: bool,
    /// Old keys keep working after a new one is issued, so overlap is possible.
    pub overlap: bool,
    /// Keys can be listed and matched by marker (orphan recovery).
    pub listing: bool,
    /// Keys can be inspected for validity.
    pub inspect: bool,
    /// Keys are minted locally and exist nowhere else (builtin): nothing upstream can
    /// be left behind, so no attempt is recorded before issuing.
    pub local: bool,
}

/// Why a provider call failed. Messages never contain key values.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// The upstream refused the request (e.g. a tag the credential may not use);
    /// retrying the same request will not help. `reason` becomes the condition reason.
    #[error("{message}")]
    Refused {
        reason: &'static str,
        message: String,
    },
    /// The upstream failed or could not be reached; retry with backoff.
    #[error("{0}")]
    Unavailable(String),
    /// The provider resource or its credentials are misconfigured.
    #[error("{0}")]
    Misconfigured(String),
}

/// A request a provider will not send upstream, found before anything is issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// A condition reason, e.g. `DescriptionTooLong`.
    pub reason: &'static str,
    /// What to change, naming the spec field.
    pub message: String,
}

impl From<Refusal> for ProviderError {
    fn from(r: Refusal) -> Self {
        ProviderError::Refused {
            reason: r.reason,
            message: r.message,
        }
    }
}

/// When a key issued at `from` with `lifetime` expires (`None`: it does not).
pub(crate) fn expires_after(
    from: Timestamp,
    lifetime: Option<Duration>,
) -> Result<Option<Timestamp>, ProviderError> {
    let Some(lifetime) = lifetime else {
        return Ok(None);
    };
    jiff::SignedDuration::try_from(lifetime)
        .ok()
        .and_then(|l| from.checked_add(l).ok())
        .map(Some)
        .ok_or_else(|| ProviderError::Refused {
            reason: "ExpiryOutOfRange",
            message: "spec.expiry is too long".to_owned(),
        })
}

/// An RFC 3339 time from an upstream answer; absent or unreadable is `None`.
pub(crate) fn parse_time(value: Option<&str>) -> Option<Timestamp> {
    value.and_then(|v| v.parse().ok())
}

/// An upstream key that carries a keyward marker, as an audit of upstream keys against
/// resources lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarkedKey {
    /// The key's id, as [`KeyApi::revoke`] takes it; revoking it revokes this key and
    /// nothing else. Compare it with the ids in status through [`KeyApi::same_key`].
    pub id: String,
    /// The marker (`kw:<uid8>.<attempt>`), or where the upstream has no room for one
    /// (Prefect), the name keyward gave the principal.
    pub marker: String,
    pub created_at: Option<Timestamp>,
}

/// The keyward marker (`kw:<uid8>.<attempt>`, see [`crate::lifecycle::marker`]) in
/// `text`, also in the spelling of upstreams that allow only letters, digits and
/// dashes (`kw-<uid8>-<attempt>`), normalised to `kw:<uid8>.<attempt>`.
pub fn marker_in(text: &str) -> Option<String> {
    const LEN: usize = 2 + 1 + 8 + 1 + 8;
    let bytes = text.as_bytes();
    let hex = |s: &[u8]| {
        s.iter()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    let word = |b: u8| b.is_ascii_alphanumeric();
    (0..bytes.len().saturating_sub(LEN - 1)).find_map(|at| {
        let m = &bytes[at..at + LEN];
        let bounded =
            (at == 0 || !word(bytes[at - 1])) && bytes.get(at + LEN).is_none_or(|b| !word(*b));
        let spelled = (m[2] == b':' && m[11] == b'.') || (m[2] == b'-' && m[11] == b'-');
        (bounded && m.starts_with(b"kw") && spelled && hex(&m[3..11]) && hex(&m[12..]))
            .then(|| format!("kw:{}.{}", &text[at + 3..at + 11], &text[at + 12..at + LEN]))
    })
}

/// One key API.
#[async_trait]
pub trait KeyApi: Send + Sync {
    fn capabilities(&self) -> Capabilities;
    /// Refuses a request the upstream would refuse, before anything is issued (limits
    /// the provider knows that the schema cannot check, e.g. description length next
    /// to the marker). Lifetime bounds come from [`Capabilities`] and are checked by
    /// the reconciler.
    fn check(&self, _request: &IssueRequest) -> Result<(), Refusal> {
        Ok(())
    }
    /// Creates a key carrying `request.marker` upstream.
    async fn issue(&self, request: &IssueRequest) -> Result<IssuedKey, ProviderError>;
    /// Revokes a key; a key that is already gone is success.
    async fn revoke(&self, key_id: &str) -> Result<(), ProviderError>;
    /// Asks whether a key still works.
    async fn inspect(&self, key_id: &str) -> Result<KeyState, ProviderError>;
    /// Ids of upstream keys carrying `marker` (empty when listing is unsupported).
    async fn find_by_marker(&self, marker: &str) -> Result<Vec<String>, ProviderError>;
    /// Upstream keys an interrupted issuance left behind, to be revoked. Providers
    /// whose keys carry the marker need nothing more than [`KeyApi::find_by_marker`];
    /// others (Prefect bots have only a name) decide from the attempt's shape, start
    /// time and the keys the resource still holds.
    async fn find_orphans(&self, attempt: &Interrupted<'_>) -> Result<Vec<String>, ProviderError> {
        self.find_by_marker(attempt.marker).await
    }
    /// Every upstream key the credential can see that carries a keyward marker, for an
    /// audit of upstream keys against resources (empty where the upstream cannot be
    /// listed). Never the credential keyward itself runs on.
    async fn marked_keys(&self) -> Result<Vec<MarkedKey>, ProviderError> {
        Ok(Vec::new())
    }
    /// Whether `listed` (a [`MarkedKey::id`]) and `held` (an id a resource's status
    /// holds) name the same upstream key: equal ids, unless the provider spells one
    /// key more than one way (Prefect).
    fn same_key(&self, listed: &str, held: &str) -> bool {
        listed == held
    }
}

/// An issuance that was in flight when keyward stopped (or the resource was deleted).
#[derive(Clone, Debug)]
pub struct Interrupted<'a> {
    /// The attempt's marker.
    pub marker: &'a str,
    /// The key the attempt was for.
    pub shape: &'a KeyShape,
    /// When the attempt was recorded, before the upstream call (keyward's clock).
    pub started_at: Timestamp,
    /// Keys the resource holds (current and retiring): never orphans.
    pub held: Vec<String>,
}

/// The provider settings a key resolved to, whichever kind holds them.
#[derive(Clone, Debug)]
pub struct ResolvedProvider {
    /// `KeyProvider/<ns>/<name>` or `ClusterKeyProvider/<name>`: what state shared
    /// across reconciles (request budget, cached tokens) is kept under.
    pub id: String,
    /// `KeyProvider/<ns>/<name>` or `ClusterKeyProvider/<name>`, for messages.
    pub display: String,
    pub spec: KeyProviderSpec,
    /// Data of the credential Secret, when the provider type has one.
    pub credentials: BTreeMap<String, Vec<u8>>,
}

/// The cluster-scoped spec has the same fields; convert through JSON so the two stay
/// one definition as far as the engine is concerned.
pub fn cluster_spec(spec: &ClusterKeyProviderSpec) -> KeyProviderSpec {
    serde_json::from_value(serde_json::to_value(spec).expect("serializable"))
        .expect("identical fields")
}

/// Builds key APIs from resolved providers. The operator uses [`DefaultFactory`];
/// tests substitute a double of an upstream key API (the Kubernetes side stays real).
#[async_trait]
pub trait ProviderFactory: Send + Sync {
    async fn build(&self, provider: &ResolvedProvider) -> Result<Arc<dyn KeyApi>, ProviderError>;
}

/// What a provider resource keeps across reconciles: its request budget and retry
/// state, and a cached access token where the upstream uses OAuth.
pub struct Shared {
    pub transport: Transport,
    pub tokens: TokenCache,
}

/// The providers keyward ships. Keeps one [`Shared`] per provider resource, replaced
/// when the provider's spec changes.
#[derive(Default)]
pub struct DefaultFactory {
    shared: Mutex<HashMap<String, (String, Arc<Shared>)>>,
    /// keyward's own ServiceAccount, for providers that authenticate as it (Tailscale
    /// `workloadIdentity`); `None` when keyward was not told which one it runs as.
    identity: Option<ServiceAccount>,
}

impl DefaultFactory {
    /// A factory whose providers may authenticate as `identity`.
    pub fn with_identity(identity: ServiceAccount) -> Self {
        Self {
            identity: Some(identity),
            ..Self::default()
        }
    }

    fn shared(&self, provider: &ResolvedProvider) -> Arc<Shared> {
        let spec_digest = serde_json::to_string(&provider.spec).unwrap_or_default();
        let mut all = self.shared.lock().expect("provider state lock");
        match all.get(&provider.id) {
            Some((digest, shared)) if *digest == spec_digest => shared.clone(),
            _ => {
                let shared = Arc::new(Shared {
                    transport: Transport::new(
                        provider_type(&provider.spec),
                        provider.spec.rate_limit.as_ref(),
                    ),
                    tokens: TokenCache::default(),
                });
                all.insert(provider.id.clone(), (spec_digest, shared.clone()));
                shared
            }
        }
    }
}

#[async_trait]
impl ProviderFactory for DefaultFactory {
    async fn build(&self, provider: &ResolvedProvider) -> Result<Arc<dyn KeyApi>, ProviderError> {
        let spec = &provider.spec;
        if let Some(builtin) = &spec.builtin {
            return Ok(Arc::new(Builtin::new(builtin)));
        }
        let shared = self.shared(provider);
        if let Some(http) = &spec.http {
            return Ok(Arc::new(Http::new(http, provider, shared)?));
        }
        if let Some(prefect) = &spec.prefect {
            return Ok(Arc::new(Prefect::new(
                prefect,
                &provider.credentials,
                shared,
            )?));
        }
        if let Some(tailscale) = &spec.tailscale {
            return Ok(Arc::new(Tailscale::new(
                tailscale,
                &provider.display,
                &provider.credentials,
                self.identity.as_ref(),
                shared,
            )?));
        }
        // Admission requires exactly one type; an object stored before that rule
        // existed could still have none.
        Err(ProviderError::Misconfigured(format!(
            "{}: no provider type is set; set one of builtin, tailscale, prefect or http",
            provider.display
        )))
    }
}

/// The provider type's name, as in the spec.
pub fn provider_type(spec: &KeyProviderSpec) -> &'static str {
    if spec.builtin.is_some() {
        "builtin"
    } else if spec.tailscale.is_some() {
        "tailscale"
    } else if spec.prefect.is_some() {
        "prefect"
    } else if spec.http.is_some() {
        "http"
    } else {
        "none"
    }
}

/// The credential Secret a provider reads, if any: `(name, required data keys)`.
/// Tailscale's `workloadIdentity` has none.
pub fn credential_secret(spec: &KeyProviderSpec) -> Option<(String, Vec<String>)> {
    if let Some(t) = &spec.tailscale {
        return match (&t.api_key_secret_ref, &t.oauth) {
            (Some(r), _) => Some((r.name.clone(), vec![r.key.clone()])),
            (None, Some(o)) => Some((
                o.client_secret_ref.name.clone(),
                vec![o.client_secret_ref.key.clone()],
            )),
            _ => None,
        };
    }
    if let Some(p) = &spec.prefect {
        return Some((
            p.api_key_secret_ref.name.clone(),
            vec![p.api_key_secret_ref.key.clone()],
        ));
    }
    if let Some(h) = &spec.http {
        return h
            .credentials_secret_ref
            .as_ref()
            .map(|r| (r.name.clone(), Vec::new()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::marker_in;

    #[test]
    fn markers_are_found_in_either_spelling() {
        let m = Some("kw:0123abcd.89ef4567".to_owned());
        assert_eq!(marker_in("kw:0123abcd.89ef4567"), m);
        assert_eq!(marker_in("edge nodes kw-0123abcd-89ef4567"), m);
        assert_eq!(marker_in("agent (kw:0123abcd.89ef4567)"), m);
        for none in [
            "",
            "edge nodes",
            "kw-0123abcd-89ef456",
            "kw-0123abcd-89ef45678",
            "xkw-0123abcd-89ef4567",
            "kw-0123ABCD-89ef4567",
            "kw:0123abcd-89ef4567",
            "kw-0123abcg-89ef4567",
        ] {
            assert_eq!(marker_in(none), None, "{none:?}");
        }
    }
}
