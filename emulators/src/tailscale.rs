//! The Tailscale API v2 auth-key endpoints and the OAuth client-credentials flow.
//!
//! Sources, checked on 2026-11-24:
//! - Tailscale's OpenAPI document (`tailscale/tailscale-client-go-v2`,
//!   `tools/openapi/spec/tailscale-v2-openapi.yaml`, and the clients generated from
//!   it): base `…/api/v2`, auth as HTTP Basic (token as user name, empty password) or
//!   `Authorization: Bearer`; errors `{"message": …}`;
//!   `POST /tailnet/{tailnet}/keys` with `{"capabilities":{"devices":{"create":{
//!   "reusable","ephemeral","preauthorized","tags"}}},"expirySeconds","description"}`
//!   ("`expirySeconds` … defaults to 90 days if not supplied"; "`description` … a
//!   maximum of 50 alphanumeric characters. Hyphens and spaces are also allowed"; an
//!   empty `devices` object makes a single-use key without tags); the key value is
//!   returned only by that call; `GET /tailnet/{tailnet}/keys/{keyId}` ("a revoked
//!   (deleted) or expired key will have an `invalid` field set to true"; 404 when not
//!   found); `GET /tailnet/{tailnet}/keys` ("`keys` … with `id` and `description`
//!   populated"; only the caller's keys — a user token sees its user's keys, an OAuth
//!   token the tailnet's — unless `?all=true`); `DELETE /tailnet/{tailnet}/keys/{keyId}`
//!   → 200; OAuth scope `auth_keys` (write) / `auth_keys:read`.
//! - `tailscale-client-go-v2` `keys.go` (the `Key` fields: `id`, `keyType`, `key`,
//!   `description`, `created`, `expires`, `revoked`, `invalid`, `capabilities`,
//!   `userId`; its `CreateKeyRequest` always sends `expirySeconds`, 0 when unset) and
//!   `oauth.go` (tokens from `{baseURL}/api/v2/oauth/token`, client-credentials).
//! - KB "OAuth clients" (kb/1215): an access token expires after one hour; keys created
//!   with an OAuth token are owned by the tailnet and must carry tags the client may use
//!   (the OpenAPI `KeyCapabilities.tags` text). The token response
//!   `{"access_token","token_type":"Bearer","expires_in":3600,"scope","tags"}` and the
//!   form fields `client_id`, `client_secret`, `scope`, `tags` are as quoted in
//!   tailscale/tailscale#15456.
//! - The refusal of a tag the client may not use: 400
//!   `requested tags [tag:x] are invalid or not permitted` (tailscale/tailscale#8299,
//!   terraform-provider-tailscale#247 and #437).
//! - KB "Auth keys" (kb/1085): one-off keys are revoked automatically once used; keys
//!   expire after 1–90 days when made in the admin console (the API documents no
//!   minimum: Tailscale's own Terraform example asks for `expiry = 3600`).
//!
//! Not documented, chosen here and kept consistent (a client must not depend on them):
//! the messages of 401 / 403 / 404 and of body-validation 400s; 400 for
//! `expirySeconds` above 90 days; 400 `requested tags [] are invalid or not permitted`
//! for an OAuth key without tags; 404 for `DELETE` of a key that is already invalid;
//! unknown JSON fields refused with 400 (a strict server — the real one may ignore
//! them; refusing proves keyward sends exactly the documented shape).

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
/// Lifetime of an OAuth access token.
pub const ACCESS_TOKEN_SECONDS: u64 = 3600;
/// Longest key description.
pub const DESCRIPTION_MAX: usize = 50;

/// Who owns a key: the user behind an API access token, or the tailnet (OAuth).
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

#[derive(Clone, Debug)]
struct ClientConfig {
    secret: String,
    tags: Vec<String>,
    scopes: Vec<String>,
}

#[derive(Clone, Debug)]
struct AccessToken {
    client_id: String,
    scopes: Vec<String>,
    expires: Timestamp,
}

#[derive(Default)]
struct Inner {
    tailnet: String,
    clock_offset: SignedDuration,
    api_tokens: BTreeMap<String, String>,
    clients: BTreeMap<String, ClientConfig>,
    access_tokens: BTreeMap<String, AccessToken>,
    tokens_issued: usize,
    keys: BTreeMap<String, EmulatedKey>,
    create_bodies: Vec<Value>,
    list_ids_only: bool,
}

impl Inner {
    fn now(&self) -> Timestamp {
        Timestamp::now()
            .checked_add(self.clock_offset)
            .expect("clock in range")
    }
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
            ..Inner::default()
        }));
        let faults = Faults::new();
        let router = Router::new()
            .route("/api/v2/oauth/token", post(token))
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

    /// Registers an API access token of `user` and returns it (`tskey-api-…`).
    pub fn add_api_token(&self, user: &str) -> String {
        let token = format!("tskey-api-k{}CNTRL-{}", random_alnum(8), random_alnum(24));
        self.lock()
            .api_tokens
            .insert(token.clone(), user.to_owned());
        token
    }

    /// Registers an OAuth client with the tags it may put on keys and its scopes.
    pub fn add_oauth_client(&self, tags: &[&str], scopes: &[&str]) -> OAuthClient {
        let id = format!("k{}CNTRL", random_alnum(10));
        let secret = format!("tskey-client-{id}-{}", random_alnum(24));
        self.lock().clients.insert(
            id.clone(),
            ClientConfig {
                secret: secret.clone(),
                tags: tags.iter().map(|t| (*t).to_owned()).collect(),
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            },
        );
        OAuthClient { id, secret }
    }

    /// Access tokens issued by the OAuth token endpoint so far.
    pub fn tokens_issued(&self) -> usize {
        self.lock().tokens_issued
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

    /// Every key ever created, revoked ones included.
    pub fn keys(&self) -> Vec<EmulatedKey> {
        self.lock().keys.values().cloned().collect()
    }

    pub fn key(&self, id: &str) -> Option<EmulatedKey> {
        self.lock().keys.get(id).cloned()
    }

    /// Keys a device could still register with.
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
        let now = state.now();
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
        let now = state.now();
        match state.keys.get_mut(id) {
            Some(key) if key.is_valid(now) => {
                key.revoked = Some(now);
                true
            }
            _ => false,
        }
    }

    /// The JSON bodies of every accepted create request, as sent.
    pub fn create_bodies(&self) -> Vec<Value> {
        self.lock().create_bodies.clone()
    }

    /// List responses carry only `id` (as the Go client's docs describe) instead of
    /// `id` and `description` (as the OpenAPI document does).
    pub fn set_list_ids_only(&self, ids_only: bool) {
        self.lock().list_ids_only = ids_only;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.state.lock().unwrap()
    }
}

/// Whoever a request authenticated as.
enum Caller {
    User(String),
    OAuth {
        client_id: String,
        scopes: Vec<String>,
    },
}

impl Caller {
    fn owner(&self) -> Owner {
        match self {
            Caller::User(u) => Owner::User(u.clone()),
            Caller::OAuth { .. } => Owner::Tailnet,
        }
    }

    /// Whether the caller may do `write` (or read) auth-key operations.
    fn may(&self, write: bool) -> bool {
        match self {
            Caller::User(_) => true,
            Caller::OAuth { scopes, .. } => scopes.iter().any(|s| {
                s == "auth_keys"
                    || s == "all"
                    || (!write && (s == "auth_keys:read" || s == "all:read"))
            }),
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

/// Authenticates, checks the tailnet and the scope; `Err` is the finished refusal
/// (the size of `Response` does not matter in an emulator).
#[allow(clippy::result_large_err)]
fn authorize(
    state: &Inner,
    headers: &HeaderMap,
    tailnet: &str,
    write: bool,
) -> Result<Caller, Response> {
    let invalid = || error(StatusCode::UNAUTHORIZED, "API token invalid");
    let token = bearer_or_basic(headers).ok_or_else(invalid)?;
    let caller = if let Some(user) = state.api_tokens.get(&token) {
        Caller::User(user.clone())
    } else if let Some(access) = state.access_tokens.get(&token) {
        if access.expires <= state.now() {
            return Err(error(StatusCode::UNAUTHORIZED, "API token expired"));
        }
        Caller::OAuth {
            client_id: access.client_id.clone(),
            scopes: access.scopes.clone(),
        }
    } else {
        return Err(invalid());
    };
    if tailnet != "-" && tailnet != state.tailnet {
        return Err(error(StatusCode::NOT_FOUND, "tailnet not found"));
    }
    if !caller.may(write) {
        return Err(error(
            StatusCode::FORBIDDEN,
            "calling actor does not have enough permissions to perform this function",
        ));
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
        .clients
        .get(&id)
        .filter(|c| c.secret == secret)
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
    let access_token = format!("tskey-api-k{}CNTRL-{}", random_alnum(8), random_alnum(24));
    let expires = state
        .now()
        .checked_add(SignedDuration::from_secs(ACCESS_TOKEN_SECONDS as i64))
        .expect("clock in range");
    state.access_tokens.insert(
        access_token.clone(),
        AccessToken {
            client_id: id,
            scopes: scopes.clone(),
            expires,
        },
    );
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

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AllQuery {
    all: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKeyRequest {
    capabilities: CapabilitiesIn,
    #[serde(rename = "expirySeconds")]
    expiry_seconds: Option<u64>,
    description: Option<String>,
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

fn valid_tag(tag: &str) -> bool {
    tag.strip_prefix("tag:").is_some_and(|name| {
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

fn second(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).expect("in range")
}

/// The documented `Key` object; `value` only in the create response.
fn key_json(key: &EmulatedKey, now: Timestamp, value: bool) -> Value {
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
        "created": key.created.to_string(),
        "expires": key.expires.to_string(),
        "capabilities": {"devices": {"create": create}},
    });
    if value {
        out["key"] = json!(key.value);
    }
    if let Owner::User(user) = &key.owner {
        out["userId"] = json!(user);
    }
    if let Some(revoked) = key.revoked {
        out["revoked"] = json!(revoked.to_string());
    }
    if !key.is_valid(now) {
        out["invalid"] = json!(true);
    }
    out
}

async fn create_key(
    State(state): State<Shared>,
    Path(tailnet): Path<String>,
    query: Result<Query<AllQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Response> {
    let mut state = state.lock().unwrap();
    let caller = authorize(&state, &headers, &tailnet, true)?;
    if let Err(e) = query {
        return Err(error(StatusCode::BAD_REQUEST, e.body_text()));
    }
    let request: CreateKeyRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("invalid request body: {e}"),
            ));
        }
    };
    let create = request.capabilities.devices.create.unwrap_or_default();
    let description = request.description.unwrap_or_default();
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
    let tags_refused = || {
        error(
            StatusCode::BAD_REQUEST,
            format!(
                "requested tags [{}] are invalid or not permitted",
                tags.join(" ")
            ),
        )
    };
    if !tags.iter().all(|t| valid_tag(t)) {
        return Err(tags_refused());
    }
    if let Caller::OAuth { client_id, .. } = &caller {
        let allowed: BTreeSet<&String> = state
            .clients
            .get(client_id)
            .map(|c| c.tags.iter().collect())
            .unwrap_or_default();
        if tags.is_empty() || !tags.iter().all(|t| allowed.contains(t)) {
            return Err(tags_refused());
        }
    }
    state
        .create_bodies
        .push(serde_json::from_slice(&body).unwrap_or(Value::Null));
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
    let body = key_json(&key, now, true);
    state.keys.insert(id, key);
    Ok(Json(body).into_response())
}

/// The key if the caller may see it.
fn visible<'a>(state: &'a Inner, caller: &Caller, id: &str) -> Option<&'a EmulatedKey> {
    state.keys.get(id).filter(|k| k.owner == caller.owner())
}

async fn get_key(
    State(state): State<Shared>,
    Path((tailnet, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let state = state.lock().unwrap();
    let caller = authorize(&state, &headers, &tailnet, false)?;
    match visible(&state, &caller, &id) {
        Some(key) => Ok(Json(key_json(key, state.now(), false)).into_response()),
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
    let keys: Vec<Value> = state
        .keys
        .values()
        .filter(|k| k.is_valid(now) && (all || k.owner == caller.owner()))
        .map(|k| {
            if state.list_ids_only {
                json!({"id": k.id})
            } else {
                json!({"id": k.id, "description": k.description})
            }
        })
        .collect();
    Ok(Json(json!({ "keys": keys })).into_response())
}

async fn delete_key(
    State(state): State<Shared>,
    Path((tailnet, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let mut state = state.lock().unwrap();
    let caller = authorize(&state, &headers, &tailnet, true)?;
    let now = state.now();
    if !visible(&state, &caller, &id).is_some_and(|k| k.is_valid(now)) {
        return Err(error(StatusCode::NOT_FOUND, "key not found"));
    }
    if let Some(key) = state.keys.get_mut(&id) {
        key.revoked = Some(now);
    }
    Ok(StatusCode::OK.into_response())
}
