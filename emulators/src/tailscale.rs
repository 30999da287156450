//! The Tailscale API v2 keys endpoints, the OAuth client-credentials flow and workload
//! identity federation (the token exchange).
//!
//! Sources, checked on 2026-12-01:
//! - Tailscale's OpenAPI document (`tailscale/tailscale-client-go-v2`,
//!   `tools/openapi/spec/tailscale-v2-openapi.yaml`): base `…/api/v2`, auth as HTTP
//!   Basic (token as user name, empty password) or `Authorization: Bearer`; errors
//!   `{"message": …}`. `POST /tailnet/{tailnet}/keys` creates the `keyType` asked for,
//!   "auth" when omitted: an auth key from `capabilities` (required, `devices` may be
//!   empty), `expirySeconds` ("defaults to 90 days") and `description` ("a maximum of 50
//!   alphanumeric characters. Hyphens and spaces are also allowed"); an OAuth client
//!   (`client`: `scopes`, at least one, and `tags`, "mandatory if the scopes include
//!   devices:core or auth_keys"); a federated identity (`federated`: `scopes`, `tags`,
//!   `issuer`, "a valid and publicly reachable https:// URL", `subject`, a pattern in
//!   which `*` matches anything, and `audience`, generated when omitted). The secret
//!   (`key`) is in that answer only. `GET /tailnet/{tailnet}/keys` lists the *active*
//!   keys as full `Key` objects (`id`, `keyType` one of auth / client / api /
//!   federated, `key`, `expirySeconds`, `created`, `expires`, `revoked`, `invalid`,
//!   `capabilities`, `scopes`, `tags`, `description`, `userId` "of the user who created
//!   this key, empty for keys created by trust credentials", `audience`, `issuer`,
//!   `subject`): with a user's API access token that user's keys, its API access
//!   tokens (`api`) among them; with an OAuth client's token the tailnet's auth keys
//!   and OAuth clients; with a federated identity's token the tailnet's auth keys and
//!   federated identities; `?all=true` adds every auth key of the tailnet.
//!   `GET …/keys/{keyId}` ("a revoked (deleted) or expired key will have an `invalid`
//!   field set to true"; 404 when not found); `DELETE …/keys/{keyId}` → 200. OAuth
//!   scopes `auth_keys` / `auth_keys:read`, `oauth_keys`, `federated_keys`.
//! - `tailscale.com/client/tailscale/v2` v2.12.0 (`keys.go`, `oauth.go`,
//!   `identityfederation.go`): what the official client sends and decodes — the
//!   conformance test (`emulators/tests/tailscale_conformance.rs`) runs it against this
//!   emulator. Its `CreateKeyRequest` always sends `capabilities` with every field
//!   (`tags: null` when empty), `expirySeconds` (0 when unset) and `description`; the
//!   token exchange is `POST {baseURL}/api/v2/oauth/token-exchange` with the form fields
//!   `client_id` and `jwt`, answered `{access_token, token_type, expires_in, scope}`.
//! - KB "OAuth clients" (kb/1215): an access token expires after one hour; keys created
//!   with an OAuth token are owned by the tailnet and must carry tags the client may
//!   use. The token response `{"access_token","token_type":"Bearer","expires_in":3600,
//!   "scope","tags"}` and the form fields `client_id`, `client_secret`, `scope`, `tags`
//!   are as quoted in tailscale/tailscale#15456.
//! - The refusal of a tag the client may not use: 400
//!   `requested tags [tag:x] are invalid or not permitted` (tailscale/tailscale#8299,
//!   terraform-provider-tailscale#247 and #437). A tag is `tag:` followed by a letter,
//!   then letters, digits or dashes (KB "Tags", kb/1068).
//! - A token exchange the federated identity does not accept is answered 403
//!   `{"message":"Unauthorized"}`, whichever claim was wrong (tailscale/github-action#227,
//!   #223: "unclear error when subject isn't correct").
//! - KB "Auth keys" (kb/1085): one-off keys are revoked automatically once used; keys
//!   expire after 1–90 days when made in the admin console.
//!
//! Not documented, chosen here and kept consistent (a client must not depend on them):
//! the messages of 401 / 403 / 404 and of body-validation 400s; 400 for `expirySeconds`
//! above 90 days; 400 `requested tags [] are invalid or not permitted` for an OAuth key
//! without tags; 404 for `DELETE` of a key that is already invalid; unknown JSON fields
//! and fields of another `keyType` refused with 400 (a strict server — the real one may
//! ignore them; refusing proves keyward sends exactly the documented shape); user ids
//! `u…CNTRL`; a generated audience `api.tailscale.com/<client id>`; access tokens from
//! the exchange last an hour; OAuth clients are listed to an OAuth caller whatever its
//! scopes, but deleting one takes `oauth_keys`. Issuers at `http://127.0.0.1` are
//! accepted besides `https://` ones, so tests can federate without TLS, and the
//! emulator trusts the certificate authorities a test hands it ([`Tailscale::trust_ca`]).

mod oidc;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Form, Json, Router,
    body::Bytes,
    extract::{Path, Query, State, rejection::FormRejection, rejection::QueryRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::Engine;
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{Faults, Server, error, random_alnum};

/// The longest auth-key lifetime: 90 days.
pub const MAX_EXPIRY_SECONDS: u64 = 90 * 24 * 3600;
/// Lifetime of an access token from an OAuth client or a token exchange.
pub const ACCESS_TOKEN_SECONDS: u64 = 3600;
/// Longest key description.
pub const DESCRIPTION_MAX: usize = 50;
/// Lifetime of a user's API access token made by [`Tailscale::add_api_token`].
pub const API_TOKEN_SECONDS: u64 = 90 * 24 * 3600;

/// Who owns a key: the user (login) behind an API access token, or the tailnet (keys
/// made through a trust credential).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    User(String),
    Tailnet,
}

/// An auth key as the emulator holds it, value included (for test assertions).
#[derive(Clone, Debug)]
pub struct EmulatedKey {
    pub id: String,
    pub value: String,
    pub description: String,
    pub created: Timestamp,
    pub expires: Timestamp,
    pub revoked: Option<Timestamp>,
    pub reusable: bool,
    pub ephemeral: bool,
    pub preauthorized: bool,
    pub tags: Vec<String>,
    pub owner: Owner,
    /// Devices registered with the key.
    pub uses: u32,
}

impl EmulatedKey {
    /// Not revoked, not used up, not expired at `now`.
    pub fn is_valid(&self, now: Timestamp) -> bool {
        self.revoked.is_none() && self.expires > now
    }
}

/// An OAuth client the test registered.
#[derive(Clone, Debug)]
pub struct OAuthClient {
    pub id: String,
    pub secret: String,
}

/// A federated identity: which identity tokens it exchanges for access tokens, and what
/// those may do.
#[derive(Clone, Debug)]
pub struct FederatedIdentity {
    /// The `iss` the token must carry; its discovery document is fetched.
    pub issuer: String,
    /// A pattern for `sub` (`*` matches anything).
    pub subject: String,
    /// The `aud` the token must carry.
    pub audience: String,
    pub tags: Vec<String>,
    pub scopes: Vec<String>,
}

/// A caller credential the keys endpoints list beside auth keys: an API access token
/// (`api`), an OAuth client (`client`) or a federated identity (`federated`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    pub id: String,
    pub key_type: &'static str,
    pub description: String,
    pub revoked: bool,
}

#[derive(Clone, Debug)]
struct ApiToken {
    id: String,
    login: String,
    description: String,
    created: Timestamp,
    expires: Timestamp,
    revoked: Option<Timestamp>,
}

/// An OAuth client or a federated identity.
#[derive(Clone, Debug)]
struct TrustCredential {
    /// `client` or `federated`.
    key_type: &'static str,
    /// OAuth clients only.
    secret: Option<String>,
    /// Federated identities only.
    federation: Option<FederatedIdentity>,
    tags: Vec<String>,
    scopes: Vec<String>,
    description: String,
    created: Timestamp,
    /// The login of the user who created it through the API, if one did.
    creator: Option<String>,
    revoked: Option<Timestamp>,
}

#[derive(Clone, Debug)]
struct AccessToken {
    credential: String,
    scopes: Vec<String>,
    expires: Timestamp,
}

struct Inner {
    tailnet: String,
    clock_offset: SignedDuration,
    /// Login → opaque user id.
    users: BTreeMap<String, String>,
    /// Token value → token.
    api_tokens: BTreeMap<String, ApiToken>,
    /// Client id → OAuth client or federated identity.
    trust: BTreeMap<String, TrustCredential>,
    access_tokens: BTreeMap<String, AccessToken>,
    tokens_issued: usize,
    exchanges: usize,
    exchange_refusals: Vec<String>,
    keys: BTreeMap<String, EmulatedKey>,
    create_bodies: Vec<Value>,
    list_ids_only: bool,
    credentials_named_after_keys: bool,
    /// Certificate authorities (PEM) trusted when fetching an issuer's documents.
    trusted: Vec<String>,
    http: reqwest::Client,
}

impl Inner {
    fn now(&self) -> Timestamp {
        Timestamp::now()
            .checked_add(self.clock_offset)
            .expect("clock in range")
    }

    fn user_id(&mut self, login: &str) -> String {
        self.users
            .entry(login.to_owned())
            .or_insert_with(|| format!("u{}CNTRL", random_alnum(10)))
            .clone()
    }

    fn trust_credential(&self, id: &str) -> Option<&TrustCredential> {
        self.trust.get(id).filter(|c| c.revoked.is_none())
    }
}

fn http_client(trusted: &[String]) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(10));
    for pem in trusted {
        let ca = reqwest::Certificate::from_pem(pem.as_bytes()).expect("a PEM certificate");
        builder = builder.add_root_certificate(ca);
    }
    builder
        .build()
        .expect("building the emulator's HTTP client")
}

type Shared = Arc<Mutex<Inner>>;

/// A running Tailscale API emulator; dropping it stops the server.
pub struct Tailscale {
    server: Server,
    faults: Arc<Faults>,
    state: Shared,
}

impl Tailscale {
    /// Starts an emulator for the tailnet `example.com`.
    pub async fn start() -> Self {
        let state: Shared = Arc::new(Mutex::new(Inner {
            tailnet: "example.com".to_owned(),
            clock_offset: SignedDuration::ZERO,
            users: BTreeMap::new(),
            api_tokens: BTreeMap::new(),
            trust: BTreeMap::new(),
            access_tokens: BTreeMap::new(),
            tokens_issued: 0,
            exchanges: 0,
            exchange_refusals: Vec::new(),
            keys: BTreeMap::new(),
            create_bodies: Vec::new(),
            list_ids_only: false,
            credentials_named_after_keys: false,
            trusted: Vec::new(),
            http: http_client(&[]),
        }));
        let faults = Faults::new();
        let router = Router::new()
            .route("/api/v2/oauth/token", post(token))
            .route("/api/v2/oauth/token-exchange", post(token_exchange))
            .route(
                "/api/v2/tailnet/{tailnet}/keys",
                post(create_key).get(list_keys),
            )
            .route(
                "/api/v2/tailnet/{tailnet}/keys/{id}",
                get(get_key).delete(delete_key),
            )
            .fallback(|| async { error(StatusCode::NOT_FOUND, "not found") })
            .with_state(state.clone());
        let server = Server::start(router, faults.clone())
            .await
            .expect("binding 127.0.0.1:0");
        Self {
            server,
            faults,
            state,
        }
    }

    /// `http://127.0.0.1:<port>` — the `apiURL` of a provider (paths start `/api/v2`).
    pub fn base_url(&self) -> &str {
        self.server.base_url()
    }

    /// Fault injection and the request log.
    pub fn faults(&self) -> &Arc<Faults> {
        &self.faults
    }

    /// The tailnet's name (`-` also addresses it).
    pub fn tailnet(&self) -> String {
        self.lock().tailnet.clone()
    }

    /// Registers an API access token of `user` (a login) and returns it (`tskey-api-…`).
    pub fn add_api_token(&self, user: &str) -> String {
        let id = format!("k{}CNTRL", random_alnum(8));
        let token = format!("tskey-api-{id}-{}", random_alnum(24));
        let mut state = self.lock();
        state.user_id(user);
        let created = second(state.now());
        state.api_tokens.insert(
            token.clone(),
            ApiToken {
                id,
                login: user.to_owned(),
                description: String::new(),
                created,
                expires: created + SignedDuration::from_secs(API_TOKEN_SECONDS as i64),
                revoked: None,
            },
        );
        token
    }

    /// The key id of an API access token (how it appears in key lists).
    pub fn api_token_id(&self, token: &str) -> Option<String> {
        self.lock().api_tokens.get(token).map(|t| t.id.clone())
    }

    /// The opaque id the API shows for `login` (`userId`).
    pub fn user_id(&self, login: &str) -> Option<String> {
        self.lock().users.get(login).cloned()
    }

    /// Registers an OAuth client with the tags it may put on keys and its scopes.
    pub fn add_oauth_client(&self, tags: &[&str], scopes: &[&str]) -> OAuthClient {
        let id = format!("k{}CNTRL", random_alnum(10));
        let secret = format!("tskey-client-{id}-{}", random_alnum(24));
        let mut state = self.lock();
        let created = second(state.now());
        state.trust.insert(
            id.clone(),
            TrustCredential {
                key_type: "client",
                secret: Some(secret.clone()),
                federation: None,
                tags: tags.iter().map(|t| (*t).to_owned()).collect(),
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                description: String::new(),
                created,
                creator: None,
                revoked: None,
            },
        );
        OAuthClient { id, secret }
    }

    /// Registers a federated identity and returns its client id.
    pub fn add_federated_identity(&self, identity: FederatedIdentity) -> String {
        let id = format!("k{}CNTRL", random_alnum(10));
        let mut state = self.lock();
        let created = second(state.now());
        state.trust.insert(
            id.clone(),
            TrustCredential {
                key_type: "federated",
                secret: None,
                tags: identity.tags.clone(),
                scopes: identity.scopes.clone(),
                federation: Some(identity),
                description: String::new(),
                created,
                creator: None,
                revoked: None,
            },
        );
        id
    }

    /// Trusts a certificate authority (PEM) when fetching issuers' discovery documents,
    /// as the real service trusts the public ones.
    pub fn trust_ca(&self, pem: &str) {
        let mut state = self.lock();
        state.trusted.push(pem.to_owned());
        state.http = http_client(&state.trusted);
    }

    /// Every API access token, OAuth client and federated identity, revoked ones too.
    pub fn credentials(&self) -> Vec<Credential> {
        let state = self.lock();
        let tokens = state.api_tokens.values().map(|t| Credential {
            id: t.id.clone(),
            key_type: "api",
            description: t.description.clone(),
            revoked: t.revoked.is_some(),
        });
        let trust = state.trust.iter().map(|(id, c)| Credential {
            id: id.clone(),
            key_type: c.key_type,
            description: c.description.clone(),
            revoked: c.revoked.is_some(),
        });
        tokens.chain(trust).collect()
    }

    /// Sets the description of an API access token, OAuth client or federated identity
    /// (as its owner may in the admin console). False if there is none with `id`.
    pub fn describe_credential(&self, id: &str, description: &str) -> bool {
        let mut state = self.lock();
        if let Some(token) = state.api_tokens.values_mut().find(|t| t.id == id) {
            token.description = description.to_owned();
            return true;
        }
        match state.trust.get_mut(id) {
            Some(c) => {
                c.description = description.to_owned();
                true
            }
            None => false,
        }
    }

    /// Access tokens issued by the OAuth token endpoint so far.
    pub fn tokens_issued(&self) -> usize {
        self.lock().tokens_issued
    }

    /// Identity tokens exchanged for access tokens so far.
    pub fn exchanges(&self) -> usize {
        self.lock().exchanges
    }

    /// Why each refused token exchange was refused (the caller only ever sees
    /// "Unauthorized"), oldest first.
    pub fn exchange_refusals(&self) -> Vec<String> {
        self.lock().exchange_refusals.clone()
    }

    /// Whether a token exchange was refused for `why` (how its recorded reason starts:
    /// `audience`, `subject`, `issuer`, `signature`, `expiry`, `discovery`, `client`).
    pub fn exchange_refused(&self, why: &str) -> bool {
        self.lock()
            .exchange_refusals
            .iter()
            .any(|r| r.starts_with(why))
    }

    /// Makes every access token issued so far expire now.
    pub fn expire_access_tokens(&self) {
        let mut state = self.lock();
        let now = state.now();
        for token in state.access_tokens.values_mut() {
            token.expires = now;
        }
    }

    /// The emulator's clock: real time plus every [`Self::advance`], less every
    /// [`Self::rewind`].
    pub fn now(&self) -> Timestamp {
        self.lock().now()
    }

    /// Moves the emulator's clock forward (key expiry, token expiry).
    pub fn advance(&self, by: Duration) {
        let mut state = self.lock();
        state.clock_offset += SignedDuration::try_from(by).expect("duration in range");
    }

    /// Moves the emulator's clock back: keys created afterwards carry `created` and
    /// `expires` that far in the past, so a test can have a key of the shortest real
    /// lifetime (one day) expire within minutes of real time.
    pub fn rewind(&self, by: Duration) {
        let mut state = self.lock();
        state.clock_offset -= SignedDuration::try_from(by).expect("duration in range");
    }

    /// Every auth key ever created, revoked ones included.
    pub fn keys(&self) -> Vec<EmulatedKey> {
        self.lock().keys.values().cloned().collect()
    }

    pub fn key(&self, id: &str) -> Option<EmulatedKey> {
        self.lock().keys.get(id).cloned()
    }

    /// Auth keys a device could still register with.
    pub fn live_keys(&self) -> Vec<EmulatedKey> {
        let state = self.lock();
        let now = state.now();
        state
            .keys
            .values()
            .filter(|k| k.is_valid(now))
            .cloned()
            .collect()
    }

    /// A device registers with the key: a one-off key is revoked by that use.
    pub fn use_key(&self, id: &str) -> Result<(), String> {
        let mut state = self.lock();
        let now = second(state.now());
        let key = state
            .keys
            .get_mut(id)
            .ok_or_else(|| format!("no key {id}"))?;
        if !key.is_valid(now) {
            return Err(format!("key {id} is invalid"));
        }
        key.uses += 1;
        if !key.reusable {
            key.revoked = Some(now);
        }
        Ok(())
    }

    /// An admin revokes the key in the admin console. False if it was not valid.
    pub fn revoke_in_console(&self, id: &str) -> bool {
        let mut state = self.lock();
        let now = second(state.now());
        match state.keys.get_mut(id) {
            Some(key) if key.is_valid(now) => {
                key.revoked = Some(now);
                true
            }
            _ => false,
        }
    }

    /// The JSON bodies of every accepted auth-key create request, as sent.
    pub fn create_bodies(&self) -> Vec<Value> {
        self.lock().create_bodies.clone()
    }

    /// List responses carry only `id` (as the Go client's docs describe older API
    /// versions) instead of full key objects.
    pub fn set_list_ids_only(&self, ids_only: bool) {
        self.lock().list_ids_only = ids_only;
    }

    /// Every auth key created from now on also gives its description to every API
    /// access token, OAuth client and federated identity, so a test can have the
    /// caller's own credential carry an interrupted attempt's marker (whose attempt id
    /// is random) at the moment the orphan is made.
    pub fn name_credentials_after_new_keys(&self, on: bool) {
        self.lock().credentials_named_after_keys = on;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.state.lock().unwrap()
    }
}

/// Whoever a request authenticated as.
enum Caller {
    /// A user's API access token.
    User { login: String },
    /// An access token of an OAuth client or a federated identity.
    Trust {
        credential: String,
        key_type: &'static str,
        scopes: Vec<String>,
    },
}

impl Caller {
    fn owner(&self) -> Owner {
        match self {
            Caller::User { login } => Owner::User(login.clone()),
            Caller::Trust { .. } => Owner::Tailnet,
        }
    }

    /// Whether the caller holds `scope` (or `scope` `:read`, when only reading).
    fn may(&self, scope: &str, write: bool) -> bool {
        match self {
            Caller::User { .. } => true,
            Caller::Trust { scopes, .. } => scopes.iter().any(|s| {
                s == scope
                    || s == "all"
                    || (!write && (*s == format!("{scope}:read") || s == "all:read"))
            }),
        }
    }

    /// Whether the caller may see the trust credential `c` (id `id`).
    fn sees(&self, id: &str, c: &TrustCredential) -> bool {
        match self {
            Caller::User { login } => c.creator.as_deref() == Some(login.as_str()),
            Caller::Trust {
                key_type,
                credential,
                ..
            } => *key_type == c.key_type || credential == id,
        }
    }
}

fn bearer_or_basic(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(token) = value.strip_prefix("Bearer ") {
        return Some(token.trim().to_owned());
    }
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, _password) = text.split_once(':')?;
    Some(user.to_owned())
}

fn forbidden() -> Response {
    error(
        StatusCode::FORBIDDEN,
        "calling actor does not have enough permissions to perform this function",
    )
}

/// Authenticates and checks the tailnet; `Err` is the finished refusal (the size of
/// `Response` does not matter in an emulator).
#[allow(clippy::result_large_err)]
fn authenticate(state: &Inner, headers: &HeaderMap, tailnet: &str) -> Result<Caller, Response> {
    let invalid = || error(StatusCode::UNAUTHORIZED, "API token invalid");
    let token = bearer_or_basic(headers).ok_or_else(invalid)?;
    let now = state.now();
    let caller = if let Some(t) = state.api_tokens.get(&token) {
        if t.revoked.is_some() || t.expires <= now {
            return Err(invalid());
        }
        Caller::User {
            login: t.login.clone(),
        }
    } else if let Some(access) = state.access_tokens.get(&token) {
        let Some(credential) = state.trust_credential(&access.credential) else {
            return Err(invalid());
        };
        if access.expires <= now {
            return Err(error(StatusCode::UNAUTHORIZED, "API token expired"));
        }
        Caller::Trust {
            credential: access.credential.clone(),
            key_type: credential.key_type,
            scopes: access.scopes.clone(),
        }
    } else {
        return Err(invalid());
    };
    if tailnet != "-" && tailnet != state.tailnet {
        return Err(error(StatusCode::NOT_FOUND, "tailnet not found"));
    }
    Ok(caller)
}

/// [`authenticate`], then the `auth_keys` scope for auth-key operations.
#[allow(clippy::result_large_err)]
fn authorize(
    state: &Inner,
    headers: &HeaderMap,
    tailnet: &str,
    write: bool,
) -> Result<Caller, Response> {
    let caller = authenticate(state, headers, tailnet)?;
    if !caller.may("auth_keys", write) {
        return Err(forbidden());
    }
    Ok(caller)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenForm {
    client_id: Option<String>,
    client_secret: Option<String>,
    grant_type: Option<String>,
    scope: Option<String>,
    tags: Option<String>,
}

#[derive(Serialize)]
struct TokenResponse {
    access_token: String,
    token_type: &'static str,
    expires_in: u64,
    scope: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    tags: String,
}

fn split_list(s: &str) -> Vec<String> {
    s.split([' ', ','])
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Issues an access token for the trust credential `credential`.
fn issue_access_token(state: &mut Inner, credential: &str, scopes: Vec<String>) -> String {
    let access_token = format!("tskey-api-k{}CNTRL-{}", random_alnum(8), random_alnum(24));
    let expires = state
        .now()
        .checked_add(SignedDuration::from_secs(ACCESS_TOKEN_SECONDS as i64))
        .expect("clock in range");
    state.access_tokens.insert(
        access_token.clone(),
        AccessToken {
            credential: credential.to_owned(),
            scopes,
            expires,
        },
    );
    access_token
}

async fn token(
    State(state): State<Shared>,
    headers: HeaderMap,
    form: Result<Form<TokenForm>, FormRejection>,
) -> Response {
    let Form(form) = match form {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    if form
        .grant_type
        .as_deref()
        .is_some_and(|g| g != "client_credentials")
    {
        return error(StatusCode::BAD_REQUEST, "unsupported grant_type");
    }
    // Client credentials in the form (Tailscale's curl examples) or as HTTP Basic
    // (RFC 6749 §2.3.1, what golang.org/x/oauth2 tries first).
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|v| {
            base64::engine::general_purpose::STANDARD
                .decode(v.trim())
                .ok()
        })
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|v| v.split_once(':').map(|(a, b)| (a.to_owned(), b.to_owned())));
    let (id, secret) = match (form.client_id, form.client_secret, basic) {
        (Some(id), Some(secret), _) => (id, secret),
        (_, _, Some(pair)) => pair,
        _ => return error(StatusCode::UNAUTHORIZED, "invalid client credentials"),
    };
    let mut state = state.lock().unwrap();
    let Some(client) = state
        .trust_credential(&id)
        .filter(|c| c.secret.as_deref() == Some(secret.as_str()))
        .cloned()
    else {
        return error(StatusCode::UNAUTHORIZED, "invalid client credentials");
    };
    let scopes = match form.scope.as_deref().map(split_list) {
        Some(asked) if !asked.is_empty() => {
            if let Some(bad) = asked
                .iter()
                .find(|s| !client.scopes.contains(s) && !client.scopes.iter().any(|c| c == "all"))
            {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("requested scope {bad} is not granted to this client"),
                );
            }
            asked
        }
        _ => client.scopes.clone(),
    };
    if let Some(bad) = form
        .tags
        .as_deref()
        .map(split_list)
        .unwrap_or_default()
        .into_iter()
        .find(|t| !client.tags.contains(t))
    {
        return error(
            StatusCode::BAD_REQUEST,
            format!("requested tags [{bad}] are invalid or not permitted"),
        );
    }
    let access_token = issue_access_token(&mut state, &id, scopes.clone());
    state.tokens_issued += 1;
    Json(TokenResponse {
        access_token,
        token_type: "Bearer",
        expires_in: ACCESS_TOKEN_SECONDS,
        scope: scopes.join(" "),
        tags: client.tags.join(" "),
    })
    .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExchangeForm {
    client_id: Option<String>,
    jwt: Option<String>,
}

/// Workload identity federation: an identity token of the federated identity's issuer,
/// subject and audience is exchanged for an access token with the identity's scopes.
/// Any mismatch gets the same opaque answer; the emulator records why.
async fn token_exchange(
    State(shared): State<Shared>,
    form: Result<Form<ExchangeForm>, FormRejection>,
) -> Response {
    let (client_id, jwt) = match form {
        Ok(Form(ExchangeForm {
            client_id: Some(id),
            jwt: Some(jwt),
        })) if !id.is_empty() && !jwt.is_empty() => (id, jwt),
        Ok(_) => return error(StatusCode::BAD_REQUEST, "client_id and jwt are required"),
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let refuse = |why: String| {
        shared.lock().unwrap().exchange_refusals.push(why);
        error(StatusCode::FORBIDDEN, "Unauthorized")
    };
    let (identity, http) = {
        let state = shared.lock().unwrap();
        let identity = state
            .trust_credential(&client_id)
            .and_then(|c| c.federation.clone());
        (identity, state.http.clone())
    };
    let Some(identity) = identity else {
        return refuse(format!(
            "client: no federated identity has client id {client_id}"
        ));
    };
    let claims =
        match oidc::verify(&http, &jwt, &identity.issuer, Timestamp::now().as_second()).await {
            Ok(claims) => claims,
            Err(why) => return refuse(why),
        };
    if !claims.audiences.contains(&identity.audience) {
        return refuse(format!(
            "audience: the token's aud {:?} does not contain {:?}",
            claims.audiences, identity.audience
        ));
    }
    if !oidc::matches(&identity.subject, &claims.subject) {
        return refuse(format!(
            "subject: the token's sub {:?} does not match {:?}",
            claims.subject, identity.subject
        ));
    }
    let mut state = shared.lock().unwrap();
    let access_token = issue_access_token(&mut state, &client_id, identity.scopes.clone());
    state.exchanges += 1;
    Json(json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": ACCESS_TOKEN_SECONDS,
        "scope": identity.scopes.join(" "),
    }))
    .into_response()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AllQuery {
    all: Option<bool>,
}

/// Every field a create may carry; which apply depends on `keyType`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CreateKeyRequest {
    key_type: Option<String>,
    description: Option<String>,
    capabilities: Option<CapabilitiesIn>,
    expiry_seconds: Option<u64>,
    scopes: Option<Vec<String>>,
    tags: Option<Vec<String>>,
    issuer: Option<String>,
    subject: Option<String>,
    audience: Option<String>,
    custom_claim_rules: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CapabilitiesIn {
    devices: DevicesIn,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevicesIn {
    create: Option<CreateIn>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CreateIn {
    reusable: Option<bool>,
    ephemeral: Option<bool>,
    preauthorized: Option<bool>,
    tags: Option<Vec<String>>,
}

/// `tag:` followed by a letter, then letters, digits or dashes.
fn valid_tag(tag: &str) -> bool {
    tag.strip_prefix("tag:").is_some_and(|name| {
        name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    })
}

fn tags_refused(tags: &[String]) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        format!(
            "requested tags [{}] are invalid or not permitted",
            tags.join(" ")
        ),
    )
}

fn second(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).expect("in range")
}

fn time(t: Timestamp) -> String {
    second(t).to_string()
}

/// The documented `Key` object of an auth key; `value` only in the create response.
fn key_json(state: &Inner, key: &EmulatedKey, now: Timestamp, value: bool) -> Value {
    let mut create = json!({
        "reusable": key.reusable,
        "ephemeral": key.ephemeral,
        "preauthorized": key.preauthorized,
    });
    if !key.tags.is_empty() {
        create["tags"] = json!(key.tags);
    }
    let mut out = json!({
        "id": key.id,
        "keyType": "auth",
        "description": key.description,
        "expirySeconds": key.expires.duration_since(key.created).as_secs(),
        "created": time(key.created),
        "expires": time(key.expires),
        "capabilities": {"devices": {"create": create}},
    });
    if value {
        out["key"] = json!(key.value);
    }
    if let Owner::User(login) = &key.owner
        && let Some(id) = state.users.get(login)
    {
        out["userId"] = json!(id);
    }
    if let Some(revoked) = key.revoked {
        out["revoked"] = json!(time(revoked));
    }
    if !key.is_valid(now) {
        out["invalid"] = json!(true);
    }
    out
}

fn api_token_json(state: &Inner, token: &ApiToken, now: Timestamp) -> Value {
    let mut out = json!({
        "id": token.id,
        "keyType": "api",
        "description": token.description,
        "expirySeconds": token.expires.duration_since(token.created).as_secs(),
        "created": time(token.created),
        "expires": time(token.expires),
        "scopes": ["all"],
    });
    if let Some(id) = state.users.get(&token.login) {
        out["userId"] = json!(id);
    }
    if let Some(revoked) = token.revoked {
        out["revoked"] = json!(time(revoked));
    }
    if token.revoked.is_some() || token.expires <= now {
        out["invalid"] = json!(true);
    }
    out
}

fn trust_json(state: &Inner, id: &str, c: &TrustCredential, secret: bool) -> Value {
    let mut out = json!({
        "id": id,
        "keyType": c.key_type,
        "description": c.description,
        "created": time(c.created),
        "scopes": c.scopes,
        "tags": c.tags,
    });
    if let Some(f) = &c.federation {
        out["issuer"] = json!(f.issuer);
        out["subject"] = json!(f.subject);
        out["audience"] = json!(f.audience);
    }
    if secret && let Some(s) = &c.secret {
        out["key"] = json!(s);
    }
    if let Some(id) = c.creator.as_ref().and_then(|l| state.users.get(l)) {
        out["userId"] = json!(id);
    }
    if let Some(revoked) = c.revoked {
        out["revoked"] = json!(time(revoked));
        out["invalid"] = json!(true);
    }
    out
}

#[allow(clippy::result_large_err)]
fn check_description(description: &str) -> Result<(), Response> {
    if description.chars().count() > DESCRIPTION_MAX {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("description must be at most {DESCRIPTION_MAX} characters"),
        ));
    }
    if !description
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ' ')
    {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "description may contain only letters, digits, hyphens and spaces",
        ));
    }
    Ok(())
}

/// Refuses fields that do not apply to the `keyType` being created.
#[allow(clippy::result_large_err)]
fn only_fields(key_type: &str, present: &[(&str, bool)]) -> Result<(), Response> {
    match present.iter().find(|(_, set)| *set) {
        Some((field, _)) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("{field} does not apply to keyType {key_type}"),
        )),
        None => Ok(()),
    }
}

async fn create_key(
    State(state): State<Shared>,
    Path(tailnet): Path<String>,
    query: Result<Query<AllQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Response> {
    let mut state = state.lock().unwrap();
    let caller = authenticate(&state, &headers, &tailnet)?;
    if let Err(e) = query {
        return Err(error(StatusCode::BAD_REQUEST, e.body_text()));
    }
    let request: CreateKeyRequest = serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    })?;
    let description = request.description.clone().unwrap_or_default();
    check_description(&description)?;
    let key_type = request
        .key_type
        .clone()
        .unwrap_or_else(|| "auth".to_owned());
    match key_type.as_str() {
        "auth" => create_auth_key(&mut state, &caller, request, description, &body),
        "client" | "federated" => {
            create_trust_credential(&mut state, &caller, &key_type, request, description)
        }
        other => Err(error(
            StatusCode::BAD_REQUEST,
            format!("keyType {other:?} is not one of auth, client, federated"),
        )),
    }
}

#[allow(clippy::result_large_err)]
fn create_auth_key(
    state: &mut Inner,
    caller: &Caller,
    request: CreateKeyRequest,
    description: String,
    body: &[u8],
) -> Result<Response, Response> {
    if !caller.may("auth_keys", true) {
        return Err(forbidden());
    }
    only_fields(
        "auth",
        &[
            ("scopes", request.scopes.is_some()),
            ("tags", request.tags.is_some()),
            ("issuer", request.issuer.is_some()),
            ("subject", request.subject.is_some()),
            ("audience", request.audience.is_some()),
            ("customClaimRules", request.custom_claim_rules.is_some()),
        ],
    )?;
    let Some(capabilities) = request.capabilities else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "capabilities.devices is required for an auth key",
        ));
    };
    let create = capabilities.devices.create.unwrap_or_default();
    let expiry = match request.expiry_seconds {
        None | Some(0) => MAX_EXPIRY_SECONDS,
        Some(s) if s > MAX_EXPIRY_SECONDS => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("expirySeconds must be at most {MAX_EXPIRY_SECONDS} (90 days)"),
            ));
        }
        Some(s) => s,
    };
    let tags = create.tags.unwrap_or_default();
    if !tags.iter().all(|t| valid_tag(t)) {
        return Err(tags_refused(&tags));
    }
    if let Caller::Trust { credential, .. } = caller {
        let allowed: BTreeSet<&String> = state
            .trust
            .get(credential)
            .map(|c| c.tags.iter().collect())
            .unwrap_or_default();
        if tags.is_empty() || !tags.iter().all(|t| allowed.contains(t)) {
            return Err(tags_refused(&tags));
        }
    }
    state
        .create_bodies
        .push(serde_json::from_slice(body).unwrap_or(Value::Null));
    let now = second(state.now());
    let id = format!("k{}CNTRL", random_alnum(12));
    let key = EmulatedKey {
        value: format!("tskey-auth-{id}-{}", random_alnum(32)),
        id: id.clone(),
        description,
        created: now,
        expires: now
            .checked_add(SignedDuration::from_secs(expiry as i64))
            .expect("in range"),
        revoked: None,
        reusable: create.reusable.unwrap_or(false),
        ephemeral: create.ephemeral.unwrap_or(false),
        preauthorized: create.preauthorized.unwrap_or(false),
        tags,
        owner: caller.owner(),
        uses: 0,
    };
    if state.credentials_named_after_keys {
        for token in state.api_tokens.values_mut() {
            token.description = key.description.clone();
        }
        for credential in state.trust.values_mut() {
            credential.description = key.description.clone();
        }
    }
    let body = key_json(state, &key, now, true);
    state.keys.insert(id, key);
    Ok(Json(body).into_response())
}

#[allow(clippy::result_large_err)]
fn create_trust_credential(
    state: &mut Inner,
    caller: &Caller,
    key_type: &str,
    request: CreateKeyRequest,
    description: String,
) -> Result<Response, Response> {
    let (key_type, scope): (&'static str, &str) = match key_type {
        "client" => ("client", "oauth_keys"),
        _ => ("federated", "federated_keys"),
    };
    if !caller.may(scope, true) {
        return Err(forbidden());
    }
    only_fields(
        key_type,
        &[
            ("capabilities", request.capabilities.is_some()),
            ("expirySeconds", request.expiry_seconds.is_some()),
        ],
    )?;
    if key_type == "client" {
        only_fields(
            key_type,
            &[
                ("issuer", request.issuer.is_some()),
                ("subject", request.subject.is_some()),
                ("audience", request.audience.is_some()),
                ("customClaimRules", request.custom_claim_rules.is_some()),
            ],
        )?;
    }
    let scopes = request.scopes.unwrap_or_default();
    if scopes.is_empty() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "at least one scope is required",
        ));
    }
    let tags = request.tags.unwrap_or_default();
    if !tags.iter().all(|t| valid_tag(t)) {
        return Err(tags_refused(&tags));
    }
    if tags.is_empty()
        && scopes
            .iter()
            .any(|s| s == "auth_keys" || s == "devices:core")
    {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "tags are required with the scopes auth_keys and devices:core",
        ));
    }
    let id = format!("k{}CNTRL", random_alnum(10));
    let federation = if key_type == "federated" {
        let issuer = request.issuer.unwrap_or_default();
        let local = issuer.starts_with("http://127.0.0.1:");
        if !(issuer.starts_with("https://") || local) || issuer.contains(char::is_whitespace) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "issuer must be a valid https:// URL",
            ));
        }
        let subject = request.subject.unwrap_or_default();
        if subject.is_empty() {
            return Err(error(StatusCode::BAD_REQUEST, "subject is required"));
        }
        Some(FederatedIdentity {
            issuer,
            subject,
            audience: request
                .audience
                .filter(|a| !a.is_empty())
                .unwrap_or_else(|| format!("api.tailscale.com/{id}")),
            tags: tags.clone(),
            scopes: scopes.clone(),
        })
    } else {
        None
    };
    let created = second(state.now());
    let credential = TrustCredential {
        key_type,
        secret: (key_type == "client").then(|| format!("tskey-client-{id}-{}", random_alnum(24))),
        federation,
        tags,
        scopes,
        description,
        created,
        creator: match caller {
            Caller::User { login } => Some(login.clone()),
            Caller::Trust { .. } => None,
        },
        revoked: None,
    };
    let body = trust_json(state, &id, &credential, true);
    state.trust.insert(id, credential);
    Ok(Json(body).into_response())
}

/// One entry of the keys endpoints, as the caller may see it.
enum Entry<'a> {
    Auth(&'a EmulatedKey),
    Api(&'a ApiToken),
    Trust(&'a str, &'a TrustCredential),
}

impl Entry<'_> {
    fn json(&self, state: &Inner, now: Timestamp) -> Value {
        match self {
            Entry::Auth(k) => key_json(state, k, now, false),
            Entry::Api(t) => api_token_json(state, t, now),
            Entry::Trust(id, c) => trust_json(state, id, c, false),
        }
    }

    fn active(&self, now: Timestamp) -> bool {
        match self {
            Entry::Auth(k) => k.is_valid(now),
            Entry::Api(t) => t.revoked.is_none() && t.expires > now,
            Entry::Trust(_, c) => c.revoked.is_none(),
        }
    }
}

/// The entry `id`, if the caller may see it. `None` for an auth key when the caller
/// lacks the `auth_keys` read scope.
fn visible<'a>(state: &'a Inner, caller: &Caller, id: &str) -> Option<Entry<'a>> {
    if let Some(key) = state.keys.get(id) {
        return (caller.may("auth_keys", false) && key.owner == caller.owner())
            .then_some(Entry::Auth(key));
    }
    if let Some(token) = state.api_tokens.values().find(|t| t.id == id) {
        return matches!(caller, Caller::User { login } if *login == token.login)
            .then_some(Entry::Api(token));
    }
    let (id, credential) = state.trust.get_key_value(id)?;
    caller
        .sees(id, credential)
        .then_some(Entry::Trust(id, credential))
}

async fn get_key(
    State(state): State<Shared>,
    Path((tailnet, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let state = state.lock().unwrap();
    let caller = authenticate(&state, &headers, &tailnet)?;
    match visible(&state, &caller, &id) {
        Some(entry) => Ok(Json(entry.json(&state, state.now())).into_response()),
        None => Err(error(StatusCode::NOT_FOUND, "key not found")),
    }
}

async fn list_keys(
    State(state): State<Shared>,
    Path(tailnet): Path<String>,
    query: Result<Query<AllQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let state = state.lock().unwrap();
    let caller = authorize(&state, &headers, &tailnet, false)?;
    let all = match query {
        Ok(Query(q)) => q.all.unwrap_or(false),
        Err(e) => return Err(error(StatusCode::BAD_REQUEST, e.body_text())),
    };
    let now = state.now();
    let credentials = state
        .api_tokens
        .values()
        .filter(|t| matches!(&caller, Caller::User { login } if *login == t.login))
        .map(Entry::Api)
        .chain(
            state
                .trust
                .iter()
                .filter(|(id, c)| caller.sees(id, c))
                .map(|(id, c)| Entry::Trust(id, c)),
        );
    let keys = state
        .keys
        .values()
        .filter(|k| all || k.owner == caller.owner())
        .map(Entry::Auth);
    let listed: Vec<Value> = credentials
        .chain(keys)
        .filter(|e| e.active(now))
        .map(|e| {
            let full = e.json(&state, now);
            if state.list_ids_only {
                json!({"id": full["id"]})
            } else {
                full
            }
        })
        .collect();
    Ok(Json(json!({ "keys": listed })).into_response())
}

async fn delete_key(
    State(state): State<Shared>,
    Path((tailnet, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let mut state = state.lock().unwrap();
    let caller = authenticate(&state, &headers, &tailnet)?;
    let now = second(state.now());
    let (key_type, active) = match visible(&state, &caller, &id) {
        Some(entry @ Entry::Auth(_)) => ("auth", entry.active(now)),
        Some(entry @ Entry::Api(_)) => ("api", entry.active(now)),
        Some(entry @ Entry::Trust(_, c)) => (c.key_type, entry.active(now)),
        None => return Err(error(StatusCode::NOT_FOUND, "key not found")),
    };
    let scope = match key_type {
        "auth" => "auth_keys",
        "client" => "oauth_keys",
        "federated" => "federated_keys",
        _ => "api_access_tokens",
    };
    if !caller.may(scope, true) {
        return Err(forbidden());
    }
    if !active {
        return Err(error(StatusCode::NOT_FOUND, "key not found"));
    }
    if let Some(key) = state.keys.get_mut(&id) {
        key.revoked = Some(now);
    } else if let Some(token) = state.api_tokens.values_mut().find(|t| t.id == id) {
        token.revoked = Some(now);
    } else if let Some(credential) = state.trust.get_mut(&id) {
        credential.revoked = Some(now);
    }
    Ok(StatusCode::OK.into_response())
}
