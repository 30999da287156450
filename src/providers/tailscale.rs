//! Tailscale auth keys through the Tailscale API v2.
//!
//! - `POST {apiURL}/api/v2/tailnet/{tailnet}/keys` with exactly
//!   `{"capabilities":{"devices":{"create":{"reusable","ephemeral","preauthorized",
//!   "tags"}}},"expirySeconds","description"}` (no `keyType`: "auth" is the default);
//!   the answer carries `id`, `key` (the value, returned by this call only), `created`
//!   and `expires`.
//! - `GET …/keys/{id}`: `invalid: true` for a revoked, used-up or expired key
//!   (`revoked` holds when it was revoked); 404 when the key is gone.
//! - `GET …/keys`: the caller's active keys as full objects, and beside the auth keys
//!   the credential keyward runs on: a user's own API access tokens (`keyType: "api"`),
//!   an OAuth client's clients (`client`), a federated identity's identities
//!   (`federated`). keyward only ever considers `keyType: "auth"` — orphan recovery
//!   could otherwise revoke the very credential it authenticates with. A list that
//!   carries ids only (older API versions) is completed by reading each key.
//! - `DELETE …/keys/{id}`: 200; 404 means already gone.
//! - Auth, one of: an API access token as HTTP Basic user name with an empty password;
//!   an OAuth client whose access tokens (`POST {apiURL}/api/v2/oauth/token`,
//!   client-credentials, scope `auth_keys`, valid one hour) are cached per provider;
//!   or workload identity federation: keyward requests a token for its own
//!   ServiceAccount with the federated identity's audience (TokenRequest API) and
//!   exchanges it (`POST {apiURL}/api/v2/oauth/token-exchange`, form `client_id`,
//!   `jwt`) for an access token, cached likewise and refreshed before either token
//!   expires. Access tokens go as `Authorization: Bearer`; keys made with them belong
//!   to the tailnet and must carry tags the credential may use.
//! - Tailscale answers every refused exchange with the same `403 Unauthorized`, so the
//!   condition names the claims keyward presented and where each is configured.
//!
//! Limits, from the API's own documentation: a description is at most 50 letters,
//! digits, hyphens and spaces — keyward's marker goes there as ` kw-<uid8>-<attempt>`
//! (20 characters, the `:` and `.` of keyward's marker are not allowed), leaving 29
//! for `spec.description`; `expirySeconds` defaults to 90 days, the longest lifetime.
//! keyward asks for 1–90 days, the range Tailscale documents for auth keys (the API
//! has been seen to accept shorter; Tailscale's Terraform example asks for an hour).
//!
//! Sources and the emulator the tests run against: `emulators/src/tailscale.rs`; what
//! a user creates in Tailscale: `docs/providers/tailscale.md`.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use jiff::Timestamp;
use reqwest::{Client, RequestBuilder, Url};
use serde::Deserialize;
use serde_json::json;

use super::{
    Capabilities, IssueRequest, IssuedKey, KeyApi, KeyState, MarkedKey, ProviderError, Refusal,
    SecretValue, ServiceAccount, Shared, marker_in, parse_time,
    transport::{Reply, fingerprint},
};
use crate::resources::TailscaleProvider;

/// The longest lifetime Tailscale grants, and its default.
pub const MAX_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// The shortest lifetime keyward asks for: the 1–90 days Tailscale documents for auth
/// keys (the seed, the admin console). The API itself has been seen to accept
/// shorter; keyward keeps to the documented range.
pub const MIN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Longest description Tailscale accepts.
pub const DESCRIPTION_MAX: usize = 50;
/// Access tokens last an hour when the answer does not say.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// What keyward asks the API server for when it needs a ServiceAccount token to
/// exchange: as long as the access token it buys (the API server may shorten it).
const IDENTITY_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

enum Credential {
    /// An API access token (`tskey-api-…`).
    Token(SecretValue),
    /// An OAuth client (`tskey-client-…` secret).
    OAuth {
        client_id: String,
        secret: SecretValue,
        /// Which client the cached access token belongs to (computed once).
        fingerprint: String,
    },
    /// Workload identity federation: keyward's ServiceAccount token, exchanged.
    Federated {
        client_id: String,
        audience: String,
        identity: ServiceAccount,
        /// Which identity, audience and account the cached access token belongs to.
        fingerprint: String,
    },
}

pub struct Tailscale {
    /// For messages: `KeyProvider ns/name` or `ClusterKeyProvider name`.
    display: String,
    /// `{apiURL}/api/v2/`.
    api: Url,
    tailnet: String,
    credential: Credential,
    shared: Arc<Shared>,
}

/// What a create, get or list answers for a key. Unknown fields are ignored: the API
/// may add some.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyAnswer {
    id: String,
    /// `auth`, `api`, `client` or `federated`; absent in lists of ids only.
    #[serde(default)]
    key_type: Option<String>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    created: Option<String>,
    #[serde(default)]
    expires: Option<String>,
    #[serde(default)]
    revoked: Option<String>,
    #[serde(default)]
    invalid: bool,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    capabilities: Option<CapabilitiesAnswer>,
}

impl KeyAnswer {
    fn is_auth_key(&self) -> bool {
        self.key_type.as_deref() == Some("auth")
    }
}

#[derive(Deserialize, Default)]
struct CapabilitiesAnswer {
    #[serde(default)]
    devices: Option<DevicesAnswer>,
}

#[derive(Deserialize, Default)]
struct DevicesAnswer {
    #[serde(default)]
    create: Option<CreateAnswer>,
}

#[derive(Deserialize, Default)]
struct CreateAnswer {
    #[serde(default)]
    reusable: bool,
}

#[derive(Deserialize)]
struct ListAnswer {
    #[serde(default)]
    keys: Vec<KeyAnswer>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// keyward's marker (`kw:<uid8>.<attempt>`) in the characters a Tailscale description
/// allows: anything but letters and digits becomes `-`.
pub fn upstream_marker(marker: &str) -> String {
    marker
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// The description sent upstream: the user's text, a space, the marker.
fn description(request: &IssueRequest) -> String {
    let marker = upstream_marker(&request.marker);
    match request.description.as_deref().map(str::trim) {
        Some(d) if !d.is_empty() => format!("{d} {marker}"),
        _ => marker,
    }
}

fn allowed_in_description(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == ' '
}

/// `application/x-www-form-urlencoded` for the token requests.
fn form(pairs: &[(&str, &str)]) -> String {
    let encode = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                b' ' => "+".to_owned(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// How long an access token from an exchange may be used: its own lifetime, but never
/// past the identity token it was bought with (Tailscale may tie the two together, and
/// a refresh must never need a token that already expired).
fn exchanged_token_lifetime(
    expires_in: Option<u64>,
    identity_expires: Timestamp,
    now: Timestamp,
) -> Duration {
    let own = expires_in.map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
    let identity = Duration::try_from(identity_expires.duration_since(now)).unwrap_or_default();
    own.min(identity)
}

/// The tags in Tailscale's refusal `requested tags [tag:a tag:b] are invalid or not
/// permitted`, or the tags that were asked for.
fn refused_tags(upstream: &str, asked: &[String]) -> String {
    upstream
        .split_once("requested tags [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(tags, _)| tags.trim().to_owned())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| asked.join(" "))
}

/// Whether a refusal is about the tags asked for: Tailscale's `requested tags […] are
/// invalid or not permitted`, whatever the status.
fn about_tags(status: u16, upstream: &str) -> bool {
    upstream.contains("requested tags") || (status == 400 && upstream.contains("tags"))
}

impl Tailscale {
    /// Builds the provider from its spec, the data of its credential Secret and, for
    /// `workloadIdentity`, keyward's own ServiceAccount.
    pub fn new(
        spec: &TailscaleProvider,
        display: &str,
        credentials: &BTreeMap<String, Vec<u8>>,
        identity: Option<&ServiceAccount>,
        shared: Arc<Shared>,
    ) -> Result<Self, ProviderError> {
        let read = |key: &str| -> Result<SecretValue, ProviderError> {
            let bytes = credentials.get(key).ok_or_else(|| {
                ProviderError::Misconfigured(format!(
                    "{display}: the credential Secret has no data key {key}"
                ))
            })?;
            let text = std::str::from_utf8(bytes).map_err(|_| {
                ProviderError::Misconfigured(format!(
                    "{display}: data key {key} of the credential Secret is not UTF-8 text"
                ))
            })?;
            let text = text.trim();
            if text.is_empty() {
                return Err(ProviderError::Misconfigured(format!(
                    "{display}: data key {key} of the credential Secret is empty"
                )));
            }
            Ok(SecretValue::new(text.to_owned()))
        };
        let credential = match (
            &spec.api_key_secret_ref,
            &spec.oauth,
            &spec.workload_identity,
        ) {
            (Some(r), None, None) => Credential::Token(read(&r.key)?),
            (None, Some(o), None) => {
                let secret = read(&o.client_secret_ref.key)?;
                Credential::OAuth {
                    fingerprint: fingerprint(&[o.client_id.as_bytes(), secret.expose().as_bytes()]),
                    client_id: o.client_id.clone(),
                    secret,
                }
            }
            (None, None, Some(w)) => {
                let identity = identity.cloned().ok_or_else(|| {
                    ProviderError::Misconfigured(format!(
                        "{display}: workloadIdentity authenticates as keyward's own ServiceAccount, but keyward was not told which one it runs as: run it with --service-account (the Helm chart sets it)"
                    ))
                })?;
                Credential::Federated {
                    fingerprint: fingerprint(&[
                        w.client_id.as_bytes(),
                        w.audience.as_bytes(),
                        identity.namespace.as_bytes(),
                        identity.name.as_bytes(),
                    ]),
                    client_id: w.client_id.clone(),
                    audience: w.audience.clone(),
                    identity,
                }
            }
            _ => {
                return Err(ProviderError::Misconfigured(format!(
                    "{display}: tailscale needs exactly one of apiKeySecretRef, oauth or workloadIdentity"
                )));
            }
        };
        let mut api = Url::parse(spec.api_url.trim_end_matches('/')).map_err(|e| {
            ProviderError::Misconfigured(format!("{display}: apiURL is not a URL: {e}"))
        })?;
        if !matches!(api.scheme(), "http" | "https") || api.cannot_be_a_base() {
            return Err(ProviderError::Misconfigured(format!(
                "{display}: apiURL must be an http:// or https:// URL"
            )));
        }
        api.path_segments_mut()
            .map_err(|_| ProviderError::Misconfigured(format!("{display}: apiURL has no path")))?
            .pop_if_empty()
            .extend(["api", "v2", ""]);
        Ok(Self {
            display: display.to_owned(),
            api,
            tailnet: spec.tailnet.clone(),
            credential,
            shared,
        })
    }

    /// `{apiURL}/api/v2/tailnet/{tailnet}/keys[/{id}]`, each segment escaped.
    fn keys_url(&self, id: Option<&str>) -> Url {
        let mut url = self.api.clone();
        {
            let mut segments = url.path_segments_mut().expect("checked in new");
            segments
                .pop_if_empty()
                .extend(["tailnet", self.tailnet.as_str(), "keys"]);
            if let Some(id) = id {
                segments.push(id);
            }
        }
        url
    }

    /// `{apiURL}/api/v2/oauth/<endpoint>`.
    fn oauth_url(&self, endpoint: &str) -> Url {
        let mut url = self.api.clone();
        url.path_segments_mut()
            .expect("checked in new")
            .pop_if_empty()
            .extend(["oauth", endpoint]);
        url
    }

    /// The credential a refusal should be explained for, as a user would name it.
    fn credential_kind(&self) -> &'static str {
        match self.credential {
            Credential::Token(_) => "API access token",
            Credential::OAuth { .. } => "OAuth client",
            Credential::Federated { .. } => "federated identity",
        }
    }

    /// Keys made with a trust credential (OAuth client, federated identity) belong to
    /// the tailnet and must carry tags.
    fn owned_by_tailnet(&self) -> bool {
        !matches!(self.credential, Credential::Token(_))
    }

    /// A form POST to an OAuth endpoint, through the provider's transport.
    async fn post_form(
        &self,
        operation: &'static str,
        endpoint: &str,
        body: String,
    ) -> Result<Reply, ProviderError> {
        let url = self.oauth_url(endpoint);
        self.shared
            .transport
            .send_query(operation, |c: &Client| {
                c.post(url.clone())
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    )
                    .body(body.clone())
            })
            .await
    }

    /// An OAuth client's access token: client credentials, scope `auth_keys`.
    async fn client_credentials(
        &self,
        client_id: &str,
        secret: &SecretValue,
    ) -> Result<(SecretValue, Duration), ProviderError> {
        let body = form(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_secret", secret.expose()),
            ("scope", "auth_keys"),
        ]);
        let reply = self.post_form("oauth token", "token", body).await?;
        if !reply.is_success() {
            return Err(ProviderError::Refused {
                reason: "CredentialsInvalid",
                message: format!(
                    "{}: the Tailscale OAuth token endpoint refused client {client_id} ({}); check oauth.clientId and the client secret in the credential Secret",
                    self.display,
                    reply.message()
                ),
            });
        }
        let answer: TokenAnswer = reply.json("the OAuth token request")?;
        let lifetime = answer
            .expires_in
            .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
        Ok((SecretValue::new(answer.access_token), lifetime))
    }

    /// Workload identity federation: a fresh ServiceAccount token with the federated
    /// identity's audience, exchanged for an access token.
    async fn exchange(
        &self,
        client_id: &str,
        audience: &str,
        identity: &ServiceAccount,
    ) -> Result<(SecretValue, Duration), ProviderError> {
        let token = identity
            .token(audience, IDENTITY_TOKEN_LIFETIME)
            .await
            .map_err(|e| match e {
                ProviderError::Refused { reason, message } => ProviderError::Refused {
                    reason,
                    message: format!("{}: {message}", self.display),
                },
                other => other,
            })?;
        let body = form(&[("client_id", client_id), ("jwt", token.value.expose())]);
        let reply = self
            .post_form("token exchange", "token-exchange", body)
            .await?;
        if !reply.is_success() {
            let issuer = token.issuer.as_deref().unwrap_or("(none)");
            let subject = identity.subject();
            return Err(ProviderError::Refused {
                reason: "CredentialsInvalid",
                message: format!(
                    "{}: Tailscale refused to exchange keyward's ServiceAccount token for federated identity {client_id} ({}). Tailscale does not say which claim it rejected; the token carried issuer {issuer}, subject {subject} and audience {audience}. Fix the side that differs: in Tailscale, the federated identity's issuer must be {issuer} and its subject must match {subject} (or run keyward as the ServiceAccount it names, --service-account); here, spec.tailscale.workloadIdentity.audience must be the audience the identity expects, and clientId its client id. Tailscale must also be able to fetch {}/.well-known/openid-configuration.",
                    self.display,
                    reply.message(),
                    issuer.trim_end_matches('/'),
                ),
            });
        }
        let answer: TokenAnswer = reply.json("the token exchange")?;
        let lifetime =
            exchanged_token_lifetime(answer.expires_in, token.expires_at, Timestamp::now());
        Ok((SecretValue::new(answer.access_token), lifetime))
    }

    /// The access token of a trust credential from the provider's cache; fetched when
    /// missing, expiring, or cached for another credential. `None` for an API access
    /// token, which is sent as it is.
    async fn access_token(&self) -> Result<Option<SecretValue>, ProviderError> {
        let token = match &self.credential {
            Credential::Token(_) => return Ok(None),
            Credential::OAuth {
                client_id,
                secret,
                fingerprint,
            } => {
                self.shared
                    .tokens
                    .get(fingerprint, || self.client_credentials(client_id, secret))
                    .await?
            }
            Credential::Federated {
                client_id,
                audience,
                identity,
                fingerprint,
            } => {
                self.shared
                    .tokens
                    .get(fingerprint, || self.exchange(client_id, audience, identity))
                    .await?
            }
        };
        Ok(Some(token))
    }

    /// Sends an authenticated request. With an access token, a 401 (a token revoked or
    /// expired early) discards the cached token and tries once more with a fresh one.
    async fn send(
        &self,
        operation: &'static str,
        build: impl Fn(&Client) -> RequestBuilder,
    ) -> Result<Reply, ProviderError> {
        let mut fresh = false;
        loop {
            let bearer = self.access_token().await?;
            let reply = self
                .shared
                .transport
                .send(operation, |c| match (&self.credential, &bearer) {
                    (_, Some(token)) => build(c).bearer_auth(token.expose()),
                    (Credential::Token(token), None) => {
                        build(c).basic_auth(token.expose(), Some(""))
                    }
                    (_, None) => build(c),
                })
                .await?;
            if let (401, Some(refused), false) = (reply.status, &bearer, fresh) {
                self.shared.tokens.invalidate(refused).await;
                fresh = true;
                continue;
            }
            return Ok(reply);
        }
    }

    /// A refusal for an answer that is neither success nor "gone".
    fn refusal(&self, operation: &str, reply: &Reply, tags: &[String]) -> ProviderError {
        let upstream = reply.message();
        let (reason, hint) = match reply.status {
            400 | 403 if about_tags(reply.status, &upstream) => {
                let refused = refused_tags(&upstream, tags);
                (
                    "TagNotPermitted",
                    if self.owned_by_tailnet() {
                        format!(
                            "Tailscale refused the tags [{refused}]: the {} may not put them on keys; give it these tags (or tags that own them) in the Tailscale admin console, or change spec.tags",
                            self.credential_kind()
                        )
                    } else {
                        format!(
                            "Tailscale refused the tags [{refused}]: the API token's user may not use them; check tagOwners in the tailnet policy, or change spec.tags"
                        )
                    },
                )
            }
            400 => (
                "UpstreamRefused",
                "Tailscale refused the request as invalid".to_owned(),
            ),
            401 => (
                "CredentialsInvalid",
                match self.credential {
                    Credential::Federated { .. } => {
                        "Tailscale did not accept the access token the federated identity exchanged for".to_owned()
                    }
                    _ => "Tailscale did not accept the credential: replace it in the credential Secret"
                        .to_owned(),
                },
            ),
            403 => (
                "PermissionDenied",
                format!(
                    "the {} may not manage auth keys: a trust credential needs the auth_keys scope",
                    self.credential_kind()
                ),
            ),
            404 => (
                "TailnetNotFound",
                format!(
                    "tailnet {} was not found for this credential: set tailscale.tailnet to the organization name or -",
                    self.tailnet
                ),
            ),
            _ => (
                "UpstreamRefused",
                "Tailscale refused the request".to_owned(),
            ),
        };
        ProviderError::Refused {
            reason,
            message: format!("{}: {operation}: {hint} ({upstream})", self.display),
        }
    }

    async fn get(&self, id: &str) -> Result<Option<KeyAnswer>, ProviderError> {
        let url = self.keys_url(Some(id));
        let reply = self.send("get key", |c| c.get(url.clone())).await?;
        match reply.status {
            404 => Ok(None),
            s if (200..300).contains(&s) => Ok(Some(reply.json("get key")?)),
            _ => Err(self.refusal("get key", &reply, &[])),
        }
    }

    /// The auth keys the credential lists, and nothing else: the list also carries the
    /// credential keyward authenticates with (`keyType` api, client, federated), which
    /// must never be mistaken for an orphan. Entries without a type (a list of ids
    /// only) are read one by one.
    async fn auth_keys(&self) -> Result<Vec<KeyAnswer>, ProviderError> {
        let url = self.keys_url(None);
        let reply = self.send("list keys", |c| c.get(url.clone())).await?;
        if !reply.is_success() {
            return Err(self.refusal("list keys", &reply, &[]));
        }
        let list: ListAnswer = reply.json("list keys")?;
        let mut keys = Vec::new();
        for item in list.keys {
            let item = match item.key_type {
                Some(_) => item,
                None => match self.get(&item.id).await? {
                    Some(full) => full,
                    None => continue,
                },
            };
            if item.is_auth_key() {
                keys.push(item);
            }
        }
        Ok(keys)
    }
}

#[async_trait]
impl KeyApi for Tailscale {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_lifetime: Some(MAX_LIFETIME),
            min_lifetime: Some(MIN_LIFETIME),
            default_lifetime: Some(MAX_LIFETIME),
            native_rotate: false,
            overlap: true,
            listing: true,
            inspect: true,
            local: false,
        }
    }

    fn check(&self, request: &IssueRequest) -> Result<(), Refusal> {
        let user = request.description.as_deref().map(str::trim).unwrap_or("");
        if let Some(bad) = user.chars().find(|c| !allowed_in_description(*c)) {
            return Err(Refusal {
                reason: "DescriptionInvalid",
                message: format!(
                    "spec.description may hold only letters, digits, hyphens and spaces for Tailscale; {bad:?} is not allowed"
                ),
            });
        }
        let full = description(request).chars().count();
        if full > DESCRIPTION_MAX {
            let marker = upstream_marker(&request.marker).chars().count();
            return Err(Refusal {
                reason: "DescriptionTooLong",
                message: format!(
                    "spec.description has {} characters; Tailscale allows {DESCRIPTION_MAX} and keyward appends a {marker}-character marker after a space, so at most {} fit: shorten spec.description",
                    user.chars().count(),
                    DESCRIPTION_MAX - marker - 1
                ),
            });
        }
        if self.owned_by_tailnet() && request.shape.tags.is_empty() {
            return Err(Refusal {
                reason: "TagsRequired",
                message: format!(
                    "{} uses an {}: its keys belong to the tailnet and must carry tags; set spec.tags to tags it may use",
                    self.display,
                    self.credential_kind()
                ),
            });
        }
        Ok(())
    }

    async fn issue(&self, request: &IssueRequest) -> Result<IssuedKey, ProviderError> {
        self.check(request)?;
        // The reconciler has held it to MIN_LIFETIME..=MAX_LIFETIME (capabilities).
        let lifetime = request.lifetime.unwrap_or(MAX_LIFETIME);
        let tags: Vec<String> = request.shape.tags.iter().map(|t| t.0.clone()).collect();
        let body = json!({
            "capabilities": {"devices": {"create": {
                "reusable": request.shape.reusable,
                "ephemeral": request.shape.ephemeral,
                "preauthorized": request.shape.preauthorized,
                "tags": tags,
            }}},
            "expirySeconds": lifetime.as_secs(),
            "description": description(request),
        });
        let url = self.keys_url(None);
        let reply = self
            .send("create key", |c| c.post(url.clone()).json(&body))
            .await?;
        if !reply.is_success() {
            return Err(self.refusal("create key", &reply, &tags));
        }
        let answer: KeyAnswer = reply.json("create key")?;
        let value = answer.key.filter(|k| !k.is_empty()).ok_or_else(|| {
            ProviderError::Unavailable(format!(
                "{}: create key answered without a key value (key {})",
                self.display, answer.id
            ))
        })?;
        Ok(IssuedKey {
            created_at: parse_time(answer.created.as_deref()).unwrap_or_else(Timestamp::now),
            expires_at: parse_time(answer.expires.as_deref()),
            id: answer.id,
            value: SecretValue::new(value),
        })
    }

    async fn revoke(&self, key_id: &str) -> Result<(), ProviderError> {
        let url = self.keys_url(Some(key_id));
        let reply = self.send("delete key", |c| c.delete(url.clone())).await?;
        match reply.status {
            404 => Ok(()),
            s if (200..300).contains(&s) => Ok(()),
            _ => Err(self.refusal("delete key", &reply, &[])),
        }
    }

    async fn inspect(&self, key_id: &str) -> Result<KeyState, ProviderError> {
        let Some(key) = self.get(key_id).await? else {
            return Ok(KeyState::Revoked);
        };
        let now = Timestamp::now();
        let expired = parse_time(key.expires.as_deref()).is_some_and(|e| e <= now);
        let reusable = key
            .capabilities
            .and_then(|c| c.devices)
            .and_then(|d| d.create)
            .is_some_and(|c| c.reusable);
        Ok(if key.revoked.is_some() {
            // Tailscale revokes a one-off key once a device used it; a console
            // revocation of an unused one-off key looks the same.
            if reusable {
                KeyState::Revoked
            } else {
                KeyState::UsedUp
            }
        } else if expired {
            KeyState::Expired
        } else if key.invalid {
            KeyState::Revoked
        } else {
            KeyState::Valid
        })
    }

    async fn find_by_marker(&self, marker: &str) -> Result<Vec<String>, ProviderError> {
        let wanted = upstream_marker(marker);
        let carries = |d: &str| d == wanted || d.ends_with(&format!(" {wanted}"));
        Ok(self
            .auth_keys()
            .await?
            .into_iter()
            .filter(|k| k.description.as_deref().is_some_and(carries))
            .map(|k| k.id)
            .collect())
    }

    async fn marked_keys(&self) -> Result<Vec<MarkedKey>, ProviderError> {
        Ok(self
            .auth_keys()
            .await?
            .into_iter()
            .filter_map(|k| {
                let marker = marker_in(k.description.as_deref()?)?;
                Some(MarkedKey {
                    created_at: parse_time(k.created.as_deref()),
                    id: k.id,
                    marker,
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::KeyShape;

    fn request(description: Option<&str>) -> IssueRequest {
        IssueRequest {
            marker: "kw:0123abcd.89ef4567".into(),
            description: description.map(str::to_owned),
            lifetime: None,
            shape: KeyShape::default(),
            previous: None,
            overlap: Duration::ZERO,
        }
    }

    #[test]
    fn the_marker_uses_only_characters_tailscale_allows() {
        assert_eq!(
            upstream_marker("kw:0123abcd.89ef4567"),
            "kw-0123abcd-89ef4567"
        );
        assert_eq!(description(&request(None)), "kw-0123abcd-89ef4567");
        assert_eq!(
            description(&request(Some("edge nodes"))),
            "edge nodes kw-0123abcd-89ef4567"
        );
        assert!(
            description(&request(Some("edge nodes")))
                .chars()
                .all(allowed_in_description)
        );
    }

    fn provider(oauth: bool, api_url: &str, tailnet: &str) -> Tailscale {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let spec: TailscaleProvider = serde_json::from_value(if oauth {
            json!({"apiURL": api_url, "tailnet": tailnet,
                   "oauth": {"clientId": "kc", "clientSecretRef": {"name": "s", "key": "secret"}}})
        } else {
            json!({"apiURL": api_url, "tailnet": tailnet,
                   "apiKeySecretRef": {"name": "s", "key": "secret"}})
        })
        .unwrap();
        let credentials = BTreeMap::from([("secret".to_owned(), b"tskey-x\n".to_vec())]);
        let shared = Arc::new(Shared {
            transport: super::super::Transport::new("tailscale", None),
            tokens: super::super::TokenCache::default(),
        });
        Tailscale::new(&spec, "KeyProvider ns/ts", &credentials, None, shared).unwrap()
    }

    #[test]
    fn urls_keep_a_proxy_prefix_and_escape_the_tailnet() {
        let p = provider(
            false,
            "http://proxy.local:8080/tailscale/",
            "alice@example.com",
        );
        assert_eq!(
            p.keys_url(Some("k123")).as_str(),
            "http://proxy.local:8080/tailscale/api/v2/tailnet/alice@example.com/keys/k123"
        );
        assert_eq!(
            p.oauth_url("token").as_str(),
            "http://proxy.local:8080/tailscale/api/v2/oauth/token"
        );
        let p = provider(false, "https://api.tailscale.com", "a b/c");
        assert_eq!(
            p.keys_url(None).as_str(),
            "https://api.tailscale.com/api/v2/tailnet/a%20b%2Fc/keys"
        );
    }

    #[test]
    fn check_refuses_what_tailscale_would_refuse() {
        let token = provider(false, "https://api.tailscale.com", "-");
        assert_eq!(token.check(&request(Some(&"x".repeat(29)))), Ok(()));
        let long = token.check(&request(Some(&"x".repeat(30)))).unwrap_err();
        assert_eq!(long.reason, "DescriptionTooLong");
        assert!(long.message.contains("at most 29"), "{}", long.message);
        let odd = token.check(&request(Some("edge_nodes"))).unwrap_err();
        assert_eq!(odd.reason, "DescriptionInvalid");
        assert!(odd.message.contains("'_'"), "{}", odd.message);
        assert_eq!(
            token.check(&request(None)),
            Ok(()),
            "tags are optional for a user token"
        );

        let oauth = provider(true, "https://api.tailscale.com", "-");
        assert_eq!(
            oauth.check(&request(None)).unwrap_err().reason,
            "TagsRequired"
        );
        let mut tagged = request(None);
        tagged.shape.tags = vec![crate::resources::Tag("tag:edge".into())];
        assert_eq!(oauth.check(&tagged), Ok(()));
    }

    #[test]
    fn form_encoding_escapes_everything_but_unreserved() {
        assert_eq!(
            form(&[("scope", "auth_keys"), ("s", "a b&c=d/é")]),
            "scope=auth_keys&s=a+b%26c%3Dd%2F%C3%A9"
        );
    }

    #[test]
    fn an_exchanged_token_is_used_no_longer_than_the_identity_token() {
        let now: Timestamp = "2026-12-01T10:00:00Z".parse().unwrap();
        let at = |s: &str| -> Timestamp { s.parse().unwrap() };
        assert_eq!(
            exchanged_token_lifetime(Some(3600), at("2026-12-01T10:10:00Z"), now),
            Duration::from_secs(600),
            "the identity token ends first"
        );
        assert_eq!(
            exchanged_token_lifetime(Some(900), at("2026-12-01T11:00:00Z"), now),
            Duration::from_secs(900),
            "the access token ends first"
        );
        assert_eq!(
            exchanged_token_lifetime(None, at("2026-12-01T12:00:00Z"), now),
            DEFAULT_TOKEN_LIFETIME
        );
        assert_eq!(
            exchanged_token_lifetime(Some(3600), at("2026-12-01T09:00:00Z"), now),
            Duration::ZERO,
            "an identity token already expired is not used at all"
        );
    }

    #[test]
    fn a_tag_refusal_names_the_tags_tailscale_refused() {
        let asked = vec!["tag:edge".to_owned(), "tag:prod".to_owned()];
        assert_eq!(
            refused_tags(
                "HTTP 400: requested tags [tag:prod] are invalid or not permitted",
                &asked
            ),
            "tag:prod"
        );
        assert_eq!(
            refused_tags("HTTP 400: tags invalid", &asked),
            "tag:edge tag:prod"
        );
        assert!(about_tags(
            403,
            "HTTP 403: requested tags [tag:x] are invalid or not permitted"
        ));
        assert!(!about_tags(
            403,
            "HTTP 403: calling actor does not have enough permissions"
        ));

        let oauth = provider(true, "https://api.tailscale.com", "-");
        let reply = Reply {
            status: 400,
            body: br#"{"message":"requested tags [tag:prod] are invalid or not permitted"}"#
                .to_vec(),
        };
        let ProviderError::Refused { reason, message } =
            oauth.refusal("create key", &reply, &asked)
        else {
            panic!("a refusal");
        };
        assert_eq!(reason, "TagNotPermitted");
        assert!(
            message.contains("tags [tag:prod]")
                && message.contains("OAuth client")
                && message.contains("spec.tags"),
            "{message}"
        );
    }

    #[test]
    fn workload_identity_needs_keyward_to_know_its_service_account() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let spec: TailscaleProvider = serde_json::from_value(json!({
            "workloadIdentity": {"clientId": "kf", "audience": "api.tailscale.com/kf"}
        }))
        .unwrap();
        let shared = Arc::new(Shared {
            transport: super::super::Transport::new("tailscale", None),
            tokens: super::super::TokenCache::default(),
        });
        let Err(ProviderError::Misconfigured(message)) = Tailscale::new(
            &spec,
            "ClusterKeyProvider ts",
            &BTreeMap::new(),
            None,
            shared,
        ) else {
            panic!("misconfigured without an identity");
        };
        assert!(message.contains("--service-account"), "{message}");
    }

    /// The inventory for an audit: auth keys that carry a marker, each marker as
    /// keyward writes it — never the credential itself, even when its description
    /// carries a marker, and never a key made by hand. Lists with and without types.
    #[tokio::test]
    async fn marked_keys_are_the_auth_keys_that_carry_a_marker() {
        use keyward_emulators::tailscale::Tailscale as Emulator;
        let emulator = Emulator::start().await;
        let token = emulator.add_api_token("ops@example.com");
        let _ = rustls::crypto::ring::default_provider().install_default();
        let spec: TailscaleProvider = serde_json::from_value(json!({
            "apiURL": emulator.base_url(),
            "apiKeySecretRef": {"name": "s", "key": "token"}
        }))
        .unwrap();
        let credentials = BTreeMap::from([("token".to_owned(), token.as_bytes().to_vec())]);
        let shared = Arc::new(Shared {
            transport: super::super::Transport::new("tailscale", None),
            tokens: super::super::TokenCache::default(),
        });
        let api = Tailscale::new(&spec, "KeyProvider ns/ts", &credentials, None, shared).unwrap();
        let mut issued = Vec::new();
        for (marker, description) in [
            ("kw:0123abcd.89ef4567", Some("edge")),
            ("kw:0123abcd.00000001", None),
        ] {
            let mut req = request(description);
            req.marker = marker.into();
            issued.push((api.issue(&req).await.unwrap().id, marker));
        }
        let by_hand = reqwest::Client::new()
            .post(format!("{}/api/v2/tailnet/-/keys", emulator.base_url()))
            .basic_auth(&token, Some(""))
            .json(&json!({"capabilities": {"devices": {}}, "description": "made by hand"}))
            .send()
            .await
            .unwrap();
        assert!(by_hand.status().is_success());
        let own = emulator.api_token_id(&token).unwrap();
        assert!(emulator.describe_credential(&own, "kw-0123abcd-89ef4567"));

        for ids_only in [false, true] {
            emulator.set_list_ids_only(ids_only);
            let mut marked = api.marked_keys().await.unwrap();
            marked.sort_by(|a, b| a.marker.cmp(&b.marker));
            let found: Vec<(String, &str)> = marked
                .iter()
                .map(|m| (m.id.clone(), m.marker.as_str()))
                .collect();
            let mut expected: Vec<(String, &str)> = issued.clone();
            expected.sort_by(|a, b| a.1.cmp(b.1));
            assert_eq!(found, expected, "ids_only={ids_only}");
            assert!(marked.iter().all(|m| m.created_at.is_some()));
            assert_eq!(
                api.find_by_marker("kw:0123abcd.89ef4567").await.unwrap(),
                vec![issued[0].0.clone()],
                "ids_only={ids_only}: never the token that carries the same marker"
            );
        }
    }
}
