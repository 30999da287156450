//! Tailscale auth keys through the Tailscale API v2.
//!
//! - `POST {apiURL}/api/v2/tailnet/{tailnet}/keys` with exactly
//!   `{"capabilities":{"devices":{"create":{"reusable","ephemeral","preauthorized",
//!   "tags"}}},"expirySeconds","description"}`; the answer carries `id`, `key` (the
//!   value, returned by this call only), `created` and `expires`.
//! - `GET …/keys/{id}`: `invalid: true` for a revoked, used-up or expired key
//!   (`revoked` holds when it was revoked); 404 when the key is gone.
//! - `GET …/keys`: `{"keys":[{"id","description"}]}` — the caller's valid keys. Orphan
//!   recovery matches the marker in the description (and reads each key when a list
//!   carries ids only, as older API versions did).
//! - `DELETE …/keys/{id}`: 200; 404 means already gone.
//! - Auth: an API access token as HTTP Basic user name with an empty password, or an
//!   OAuth client whose access tokens (`POST {apiURL}/api/v2/oauth/token`,
//!   client-credentials, scope `auth_keys`, valid one hour) are cached per provider
//!   and sent as `Authorization: Bearer`. Keys made through OAuth belong to the tailnet
//!   and must carry tags the client may use.
//!
//! Limits, from the API's own documentation: a description is at most 50 letters,
//! digits, hyphens and spaces — keyward's marker goes there as ` kw-<uid8>-<attempt>`
//! (20 characters, the `:` and `.` of keyward's marker are not allowed), leaving 29
//! for `spec.description`; `expirySeconds` defaults to 90 days, the longest lifetime.
//! keyward asks for 1–90 days, the range Tailscale documents for auth keys (the API
//! has been seen to accept shorter; Tailscale's Terraform example asks for an hour).
//!
//! Sources and the emulator the tests run against: `emulators/src/tailscale.rs`.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use jiff::Timestamp;
use reqwest::{Client, RequestBuilder, Url};
use serde::Deserialize;
use serde_json::json;

use super::{
    Capabilities, IssueRequest, IssuedKey, KeyApi, KeyState, ProviderError, Refusal, SecretValue,
    Shared, parse_time,
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
/// OAuth access tokens last an hour when the answer does not say.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

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

/// What a create or get answers. Unknown fields are ignored: the API may add some.
#[derive(Deserialize)]
struct KeyAnswer {
    id: String,
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
    keys: Vec<ListedKey>,
}

#[derive(Deserialize)]
struct ListedKey {
    id: String,
    #[serde(default)]
    description: Option<String>,
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

/// `application/x-www-form-urlencoded` for the token request.
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

impl Tailscale {
    /// Builds the provider from its spec and the data of its credential Secret.
    pub fn new(
        spec: &TailscaleProvider,
        display: &str,
        credentials: &BTreeMap<String, Vec<u8>>,
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
        let credential = match (&spec.api_key_secret_ref, &spec.oauth) {
            (Some(r), None) => Credential::Token(read(&r.key)?),
            (None, Some(o)) => {
                let secret = read(&o.client_secret_ref.key)?;
                Credential::OAuth {
                    fingerprint: fingerprint(&[o.client_id.as_bytes(), secret.expose().as_bytes()]),
                    client_id: o.client_id.clone(),
                    secret,
                }
            }
            _ => {
                return Err(ProviderError::Misconfigured(format!(
                    "{display}: tailscale needs exactly one of apiKeySecretRef or oauth"
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

    fn token_url(&self) -> Url {
        let mut url = self.api.clone();
        url.path_segments_mut()
            .expect("checked in new")
            .pop_if_empty()
            .extend(["oauth", "token"]);
        url
    }

    fn is_oauth(&self) -> bool {
        matches!(self.credential, Credential::OAuth { .. })
    }

    /// An OAuth access token from the provider's cache, fetched when missing, expiring
    /// or issued for a different client.
    async fn access_token(
        &self,
        client_id: &str,
        secret: &SecretValue,
        fingerprint: &str,
    ) -> Result<SecretValue, ProviderError> {
        self.shared
            .tokens
            .get(fingerprint, || async {
                let body = form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id),
                    ("client_secret", secret.expose()),
                    ("scope", "auth_keys"),
                ]);
                let url = self.token_url();
                let reply = self
                    .shared
                    .transport
                    .send("oauth token", |c: &Client| {
                        c.post(url.clone())
                            .header(
                                reqwest::header::CONTENT_TYPE,
                                "application/x-www-form-urlencoded",
                            )
                            .body(body.clone())
                    })
                    .await?;
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
            })
            .await
    }

    /// Sends an authenticated request. With OAuth, a 401 (a token revoked or expired
    /// early) discards the cached token and tries once more with a fresh one.
    async fn send(
        &self,
        operation: &'static str,
        build: impl Fn(&Client) -> RequestBuilder,
    ) -> Result<Reply, ProviderError> {
        let mut fresh = false;
        loop {
            let (reply, used) = match &self.credential {
                Credential::Token(token) => {
                    let reply = self
                        .shared
                        .transport
                        .send(operation, |c| build(c).basic_auth(token.expose(), Some("")))
                        .await?;
                    (reply, None)
                }
                Credential::OAuth {
                    client_id,
                    secret,
                    fingerprint,
                } => {
                    let token = self.access_token(client_id, secret, fingerprint).await?;
                    let reply = self
                        .shared
                        .transport
                        .send(operation, |c| build(c).bearer_auth(token.expose()))
                        .await?;
                    (reply, Some(token))
                }
            };
            if let (401, Some(refused), false) = (reply.status, &used, fresh) {
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
            400 if upstream.contains("tags") => (
                "TagNotPermitted",
                if self.is_oauth() {
                    format!(
                        "the OAuth client may not put the tags [{}] on keys: give the client these tags (or tags that own them) in the Tailscale admin console, or change spec.tags",
                        tags.join(" ")
                    )
                } else {
                    format!(
                        "the API token's user may not use the tags [{}]: check tagOwners in the tailnet policy, or change spec.tags",
                        tags.join(" ")
                    )
                },
            ),
            400 => (
                "UpstreamRefused",
                "Tailscale refused the request as invalid".to_owned(),
            ),
            401 => (
                "CredentialsInvalid",
                "Tailscale did not accept the credential: replace it in the credential Secret"
                    .to_owned(),
            ),
            403 => (
                "PermissionDenied",
                "the credential may not manage auth keys: an OAuth client needs the auth_keys scope"
                    .to_owned(),
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
        if self.is_oauth() && request.shape.tags.is_empty() {
            return Err(Refusal {
                reason: "TagsRequired",
                message: format!(
                    "{} uses an OAuth client: its keys belong to the tailnet and must carry tags; set spec.tags to tags the client may use",
                    self.display
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
        let url = self.keys_url(None);
        let reply = self.send("list keys", |c| c.get(url.clone())).await?;
        if !reply.is_success() {
            return Err(self.refusal("list keys", &reply, &[]));
        }
        let list: ListAnswer = reply.json("list keys")?;
        // A list that carries ids only (no item has a description): read each key. A
        // list with descriptions is read as is, so keys without one cost no request.
        let ids_only = list.keys.iter().all(|k| k.description.is_none());
        let mut found = Vec::new();
        for item in list.keys {
            let description = match item.description {
                None if ids_only => self.get(&item.id).await?.and_then(|k| k.description),
                d => d,
            };
            if description.as_deref().is_some_and(carries) {
                found.push(item.id);
            }
        }
        Ok(found)
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
        Tailscale::new(&spec, "KeyProvider ns/ts", &credentials, shared).unwrap()
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
            p.token_url().as_str(),
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
}
