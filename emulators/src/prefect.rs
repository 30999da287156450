//! The Prefect Cloud REST endpoints for service accounts ("bots") and their API keys.
//!
//! Sources, checked on 2026-11-24:
//! - Prefect Cloud's OpenAPI document, as the generated clients built from it show it:
//!   base `https://api.prefect.cloud/api`, `Authorization: Bearer <api key>`;
//!   `POST /accounts/{account_id}/bots/` (`create_bot`) with `name`,
//!   `api_key_expiration` ("If `None`, the api key will not expire") and
//!   `account_role_id` ("If `None` the bot will be assigned the MEMBER role"), answering
//!   `{id, created, updated, actor_id, account_id, name, account_role_name,
//!   api_key: {id, created, name, expiration, key}}`; `GET …/bots/{id}` and
//!   `POST …/bots/filter` (`limit` default 200, `offset`, `service_accounts`) answer the
//!   same object with `api_key.masked_key` instead of `key`; `PATCH` / `DELETE
//!   …/bots/{id}`; `POST …/bots/{id}/rotate_api_key` with `api_key_expiration` (of the
//!   new key) and `old_key_expires_in_seconds` ("If not provided or provided Null, the
//!   current key will be deleted. If provided, it cannot be more than 48 hours (172800
//!   seconds) in the future."), answering like create, new key included;
//!   `GET …/bots/{id}/read_bot_api_keys` (operationId
//!   `read_bot_api_keys_api_accounts__account_id__bots__id__read_bot_api_keys_get`) →
//!   `{active_key, rotating_keys: [...]}`, each `{id, created, name, expiration,
//!   masked_key}` — the keys rotated away that still work for their grace period;
//!   `DELETE …/bots/{id}/delete_bot_api_key/{api_key_id}`.
//! - `PrefectHQ/terraform-provider-prefect` (`internal/client/service_accounts.go`,
//!   `internal/client/account_roles.go`, `internal/api/*.go`, the `service_account`
//!   resource): create answers 201, rotate 201, get and filter 200, delete 200 or 204;
//!   the bot filter body is `{"service_accounts": {"name": {"any_": [...]}}}`, the role
//!   filter `POST /accounts/{id}/account_roles/filter` with
//!   `{"account_roles": {"name": {"any_": [...]}}}` answering `[{id, name, permissions,
//!   account_id, is_system_role, created, updated}]`; a role is picked by name and its
//!   `id` sent as `account_role_id`; "The API Key is only returned on Create or when
//!   rotating the key".
//! - Prefect's own client (`prefect/client/cloud.py`): a key is checked with
//!   `GET /api/me/workspaces` ("api_healthcheck"), and 401 / 403 mean the key does not
//!   authenticate (`CloudUnauthorizedError`). Prefect Cloud's 401 body is
//!   `{"detail":"Unauthorized"}` (25 bytes, PrefectHQ/prefect#8513).
//! - FastAPI (which the Prefect API is built on) answers a body that does not validate
//!   with 422 `{"detail": [{"type", "loc", "msg"}]}`; Prefect's request models forbid
//!   extra fields (`extra="forbid"`), so a misspelled field is a 422 `extra_forbidden`.
//!
//! Not documented, chosen here and kept consistent (a client must not depend on them):
//! the `detail` texts of 403 / 404 / 409; 409 for a second bot with a name already in
//! use (the real API may allow duplicate names — keyward looks names up first either
//! way); only API keys the test registers as admin keys may manage bots (bot keys
//! authenticate, e.g. to `/api/me/workspaces`, but get 403 on account routes); another
//! account id gets 404; bot keys are `pnb_` + 36 letters and digits.

// Validation helpers return the finished error response as their `Err`, as FastAPI
// answers the first failure; the size of `Response` does not matter in an emulator.
#![allow(clippy::result_large_err)]

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use jiff::{SignedDuration, Timestamp};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::{Faults, Server, is_uuid, random_alnum, uuid4};

/// The longest time a rotated-away key may keep working: 48 hours.
pub const MAX_OLD_KEY_SECONDS: i64 = 172_800;

/// One API key as the emulator holds it, value included (for test assertions).
#[derive(Clone, Debug)]
pub struct EmulatedKey {
    pub id: String,
    pub value: String,
    pub name: String,
    pub created: Timestamp,
    pub expiration: Option<Timestamp>,
    /// Deleted (with its bot, by `delete_bot_api_key`, or rotated away without grace).
    pub deleted: bool,
    /// The bot that owns it; `None` for an admin (user) key.
    pub bot: Option<String>,
}

impl EmulatedKey {
    pub fn is_valid(&self, now: Timestamp) -> bool {
        !self.deleted && self.expiration.is_none_or(|e| e > now)
    }
}

/// One service account ("bot").
#[derive(Clone, Debug)]
pub struct EmulatedBot {
    pub id: String,
    pub name: String,
    pub created: Timestamp,
    pub updated: Timestamp,
    pub actor_id: String,
    pub role_id: String,
    /// The id of the bot's current ("active") key.
    pub active_key: String,
}

#[derive(Clone, Debug)]
struct Role {
    id: String,
    name: String,
    permissions: Vec<&'static str>,
    created: Timestamp,
}

struct Inner {
    account_id: String,
    clock_offset: SignedDuration,
    admin_keys: Vec<String>,
    keys: BTreeMap<String, EmulatedKey>,
    bots: BTreeMap<String, EmulatedBot>,
    roles: Vec<Role>,
    /// Accepted bodies of create and rotate requests, as sent.
    bodies: Vec<(String, Value)>,
    /// Every bot ever created, deleted ones too, in creation order.
    history: Vec<EmulatedBot>,
}

impl Inner {
    fn now(&self) -> Timestamp {
        Timestamp::now()
            .checked_add(self.clock_offset)
            .expect("clock in range")
    }

    fn key_by_value(&self, value: &str) -> Option<&EmulatedKey> {
        self.keys.values().find(|k| k.value == value)
    }

    fn role(&self, id: &str) -> Option<&Role> {
        self.roles.iter().find(|r| r.id == id)
    }
}

type Shared = Arc<Mutex<Inner>>;

/// A running Prefect Cloud emulator; dropping it stops the server.
pub struct Prefect {
    server: Server,
    faults: Arc<Faults>,
    state: Shared,
}

impl Prefect {
    /// Starts an emulator with one account (a fresh id) and the system roles
    /// `Owner`, `Admin` and `Member`.
    pub async fn start() -> Self {
        let now = Timestamp::now();
        let role = |name: &str, permissions: Vec<&'static str>| Role {
            id: uuid4(),
            name: name.to_owned(),
            permissions,
            created: now,
        };
        let state: Shared = Arc::new(Mutex::new(Inner {
            account_id: uuid4(),
            clock_offset: SignedDuration::ZERO,
            admin_keys: Vec::new(),
            keys: BTreeMap::new(),
            bots: BTreeMap::new(),
            roles: vec![
                role("Owner", vec!["administrate:account", "manage:bots"]),
                role("Admin", vec!["manage:bots"]),
                role("Member", vec!["see:workspaces"]),
            ],
            bodies: Vec::new(),
            history: Vec::new(),
        }));
        let faults = Faults::new();
        let router = Router::new()
            .route("/api/me/workspaces", get(me_workspaces))
            .route(
                "/api/accounts/{account_id}/account_roles/filter",
                post(filter_roles),
            )
            .route("/api/accounts/{account_id}/bots/", post(create_bot))
            .route("/api/accounts/{account_id}/bots/filter", post(filter_bots))
            .route(
                "/api/accounts/{account_id}/bots/{id}",
                get(read_bot).patch(update_bot).delete(delete_bot),
            )
            .route(
                "/api/accounts/{account_id}/bots/{id}/rotate_api_key",
                post(rotate_api_key),
            )
            .route(
                "/api/accounts/{account_id}/bots/{id}/read_bot_api_keys",
                get(read_bot_api_keys),
            )
            .route(
                "/api/accounts/{account_id}/bots/{id}/delete_bot_api_key/{api_key_id}",
                delete(delete_bot_api_key),
            )
            .fallback(|| async { detail(StatusCode::NOT_FOUND, "Not Found") })
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

    /// `http://127.0.0.1:<port>/api` — the `apiURL` of a provider.
    pub fn api_url(&self) -> String {
        format!("{}/api", self.server.base_url())
    }

    /// The one account's id.
    pub fn account_id(&self) -> String {
        self.lock().account_id.clone()
    }

    /// Fault injection and the request log.
    pub fn faults(&self) -> &Arc<Faults> {
        &self.faults
    }

    /// Registers a user API key allowed to manage the account's bots; returns it.
    pub fn add_admin_key(&self) -> String {
        let value = format!("pnu_{}", random_alnum(36));
        let mut state = self.lock();
        let now = state.now();
        let id = uuid4();
        state.keys.insert(
            id.clone(),
            EmulatedKey {
                id,
                value: value.clone(),
                name: "admin".to_owned(),
                created: now,
                expiration: None,
                deleted: false,
                bot: None,
            },
        );
        state.admin_keys.push(value.clone());
        value
    }

    /// Moves the emulator's clock forward (key expiry, rotation grace periods).
    pub fn advance(&self, by: Duration) {
        let mut state = self.lock();
        state.clock_offset = state
            .clock_offset
            .checked_add(SignedDuration::try_from(by).expect("in range"))
            .expect("in range");
    }

    /// Someone creates a bot in the Prefect UI: returns `(bot id, key value)`.
    pub fn create_bot_in_ui(&self, name: &str) -> (String, String) {
        let mut state = self.lock();
        let member = state
            .roles
            .iter()
            .find(|r| r.name == "Member")
            .expect("system role")
            .id
            .clone();
        let (bot, key) = new_bot(&mut state, name, member, None);
        (bot.id, key.value)
    }

    /// Every bot that exists.
    pub fn bots(&self) -> Vec<EmulatedBot> {
        self.lock().bots.values().cloned().collect()
    }

    /// The bots named `name`.
    pub fn bots_named(&self, name: &str) -> Vec<EmulatedBot> {
        self.lock()
            .bots
            .values()
            .filter(|b| b.name == name)
            .cloned()
            .collect()
    }

    /// Every bot ever created (deleted ones too), in creation order.
    pub fn created_bots(&self) -> Vec<EmulatedBot> {
        self.lock().history.clone()
    }

    /// Every key ever made (admin keys, deleted and rotated-away keys too).
    pub fn keys(&self) -> Vec<EmulatedKey> {
        self.lock().keys.values().cloned().collect()
    }

    /// A key by id, whatever its state.
    pub fn key(&self, id: &str) -> Option<EmulatedKey> {
        self.lock().keys.get(id).cloned()
    }

    /// Whether `value` authenticates right now (what `GET /api/me/workspaces` checks).
    pub fn authenticates(&self, value: &str) -> bool {
        let state = self.lock();
        let now = state.now();
        state.key_by_value(value).is_some_and(|k| k.is_valid(now))
    }

    /// Bot keys that still authenticate, current or rotated away within their grace.
    pub fn live_bot_keys(&self) -> Vec<EmulatedKey> {
        let state = self.lock();
        let now = state.now();
        state
            .keys
            .values()
            .filter(|k| k.bot.is_some() && k.is_valid(now))
            .cloned()
            .collect()
    }

    /// `(path, body)` of every accepted create and rotate request, as sent.
    pub fn bodies(&self) -> Vec<(String, Value)> {
        self.lock().bodies.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.state.lock().unwrap()
    }
}

fn second(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).expect("in range")
}

fn new_key(state: &mut Inner, bot: &str, name: &str, expiration: Option<Timestamp>) -> EmulatedKey {
    let key = EmulatedKey {
        id: uuid4(),
        value: format!("pnb_{}", random_alnum(36)),
        name: name.to_owned(),
        created: state.now(),
        expiration,
        deleted: false,
        bot: Some(bot.to_owned()),
    };
    state.keys.insert(key.id.clone(), key.clone());
    key
}

fn new_bot(
    state: &mut Inner,
    name: &str,
    role_id: String,
    expiration: Option<Timestamp>,
) -> (EmulatedBot, EmulatedKey) {
    let id = uuid4();
    let key = new_key(state, &id, name, expiration);
    let now = state.now();
    let bot = EmulatedBot {
        id: id.clone(),
        name: name.to_owned(),
        created: now,
        updated: now,
        actor_id: uuid4(),
        role_id,
        active_key: key.id.clone(),
    };
    state.bots.insert(id, bot.clone());
    state.history.push(bot.clone());
    (bot, key)
}

/// `{"detail": "<text>"}`, FastAPI's error body.
fn detail(status: StatusCode, text: &str) -> Response {
    (status, Json(json!({ "detail": text }))).into_response()
}

/// 422 with one FastAPI validation error.
fn invalid(loc: &[&str], kind: &str, msg: &str) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({"detail": [{"type": kind, "loc": loc, "msg": msg}]})),
    )
        .into_response()
}

fn key_json(key: &EmulatedKey, with_value: bool) -> Value {
    let mut out = json!({
        "id": key.id,
        "created": key.created.to_string(),
        "name": key.name,
        "expiration": key.expiration.map(|e| e.to_string()),
    });
    if with_value {
        out["key"] = json!(key.value);
    } else {
        out["masked_key"] = json!(format!("pnb_{}", "*".repeat(8)));
    }
    out
}

fn bot_json(state: &Inner, bot: &EmulatedBot, key_value: bool) -> Value {
    let key = state.keys.get(&bot.active_key).expect("active key");
    json!({
        "id": bot.id,
        "created": bot.created.to_string(),
        "updated": bot.updated.to_string(),
        "actor_id": bot.actor_id,
        "account_id": state.account_id,
        "name": bot.name,
        "account_role_name": state.role(&bot.role_id).map(|r| r.name.clone()),
        "api_key": key_json(key, key_value),
    })
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Any valid key (user or bot).
fn authenticate(state: &Inner, headers: &HeaderMap) -> Result<(), Response> {
    let now = state.now();
    match bearer(headers).and_then(|v| state.key_by_value(v)) {
        Some(k) if k.is_valid(now) => Ok(()),
        _ => Err(detail(StatusCode::UNAUTHORIZED, "Unauthorized")),
    }
}

/// An admin key, and the account in the path.
fn authorize(state: &Inner, headers: &HeaderMap, account_id: &str) -> Result<(), Response> {
    authenticate(state, headers)?;
    let value = bearer(headers).unwrap_or_default();
    if !state.admin_keys.iter().any(|k| k == value) {
        return Err(detail(StatusCode::FORBIDDEN, "Forbidden"));
    }
    if !is_uuid(account_id) {
        return Err(invalid(
            &["path", "account_id"],
            "uuid_parsing",
            "Input should be a valid UUID",
        ));
    }
    if account_id != state.account_id {
        return Err(detail(StatusCode::NOT_FOUND, "Account not found."));
    }
    Ok(())
}

fn path_uuid(name: &str, value: &str) -> Result<(), Response> {
    if is_uuid(value) {
        Ok(())
    } else {
        Err(invalid(
            &["path", name],
            "uuid_parsing",
            "Input should be a valid UUID",
        ))
    }
}

/// The body as a JSON object whose fields are all in `allowed` (FastAPI with
/// `extra="forbid"`); an empty body is an empty object when `optional`.
fn object(body: &[u8], allowed: &[&str], optional: bool) -> Result<Map<String, Value>, Response> {
    if body.is_empty() {
        return if optional {
            Ok(Map::new())
        } else {
            Err(invalid(&["body"], "missing", "Field required"))
        };
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|_| invalid(&["body"], "json_invalid", "JSON decode error"))?;
    let Value::Object(map) = value else {
        return Err(invalid(
            &["body"],
            "model_attributes_type",
            "Input should be a valid dictionary or object to extract fields from",
        ));
    };
    extra_forbidden(&map, allowed, &["body"])?;
    Ok(map)
}

fn extra_forbidden(
    map: &Map<String, Value>,
    allowed: &[&str],
    at: &[&str],
) -> Result<(), Response> {
    if let Some(extra) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        let mut loc: Vec<&str> = at.to_vec();
        loc.push(extra);
        return Err(invalid(
            &loc,
            "extra_forbidden",
            "Extra inputs are not permitted",
        ));
    }
    Ok(())
}

/// An optional datetime field: absent or null → `None`.
fn datetime(map: &Map<String, Value>, field: &str) -> Result<Option<Timestamp>, Response> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => s.parse::<Timestamp>().map(Some).map_err(|_| {
            invalid(
                &["body", field],
                "datetime_from_date_parsing",
                "Input should be a valid datetime",
            )
        }),
        Some(_) => Err(invalid(
            &["body", field],
            "datetime_type",
            "Input should be a valid datetime",
        )),
    }
}

/// `{"<field>": {"any_": [..]}}`-style filters: the strings listed under `any_`.
fn any_filter(
    filter: Option<&Value>,
    at: &str,
    fields: &[&str],
) -> Result<BTreeMap<String, Vec<String>>, Response> {
    let mut out = BTreeMap::new();
    let Some(filter) = filter.filter(|v| !v.is_null()) else {
        return Ok(out);
    };
    let Value::Object(map) = filter else {
        return Err(invalid(
            &["body", at],
            "model_type",
            "Input should be an object",
        ));
    };
    extra_forbidden(map, fields, &["body", at])?;
    for (field, value) in map {
        if value.is_null() {
            continue;
        }
        let Value::Object(inner) = value else {
            return Err(invalid(
                &["body", at, field],
                "model_type",
                "Input should be an object",
            ));
        };
        extra_forbidden(inner, &["any_"], &["body", at, field])?;
        let any: Option<Vec<String>> = match inner.get("any_") {
            None | Some(Value::Null) => None,
            Some(v) => Some(serde_json::from_value(v.clone()).map_err(|_| {
                invalid(
                    &["body", at, field, "any_"],
                    "list_type",
                    "Input should be a valid list",
                )
            })?),
        };
        if let Some(any) = any {
            out.insert(field.clone(), any);
        }
    }
    Ok(out)
}

/// The body of a `POST …/filter` listing: `{<at>: {"name": {"any_": […]}, "id":
/// {"any_": […]}}, "limit": …, "offset": …}`, every part optional.
struct ListFilter {
    any: BTreeMap<String, Vec<String>>,
    limit: usize,
    offset: usize,
}

impl ListFilter {
    fn parse(body: &[u8], at: &str) -> Result<Self, Response> {
        let map = object(body, &[at, "limit", "offset"], true)?;
        let any = any_filter(map.get(at), at, &["name", "id"])?;
        let (limit, offset) = paging(&map)?;
        Ok(Self { any, limit, offset })
    }

    /// The requested page of the `items` whose name and id pass every `any_` given.
    fn select<'a, T: 'a>(
        &self,
        items: impl Iterator<Item = &'a T>,
        name_and_id: impl Fn(&T) -> (&str, &str),
    ) -> impl Iterator<Item = &'a T> {
        let passes = |field: &str, value: &str| {
            self.any
                .get(field)
                .is_none_or(|any| any.iter().any(|v| v == value))
        };
        items
            .filter(move |item| {
                let (name, id) = name_and_id(item);
                passes("name", name) && passes("id", id)
            })
            .skip(self.offset)
            .take(self.limit)
    }
}

fn paging(map: &Map<String, Value>) -> Result<(usize, usize), Response> {
    let read = |field: &str, default: u64, max: u64| match map.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_u64().filter(|n| *n <= max).ok_or_else(|| {
            invalid(
                &["body", field],
                "int_parsing",
                "Input should be a valid integer in range",
            )
        }),
    };
    Ok((
        read("limit", 200, 200)? as usize,
        read("offset", 0, u64::MAX)? as usize,
    ))
}

async fn me_workspaces(
    State(state): State<Shared>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let state = state.lock().unwrap();
    authenticate(&state, &headers)?;
    Ok(Json(json!([{
        "account_id": state.account_id,
        "account_name": "Emulated",
        "account_handle": "emulated",
        "workspace_id": "00000000-0000-4000-8000-000000000001",
        "workspace_name": "default",
        "workspace_description": "",
        "workspace_handle": "default",
    }]))
    .into_response())
}

async fn filter_roles(
    State(state): State<Shared>,
    Path(account_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Response> {
    let state = state.lock().unwrap();
    authorize(&state, &headers, &account_id)?;
    let filter = ListFilter::parse(&body, "account_roles")?;
    let roles: Vec<Value> = filter
        .select(state.roles.iter(), |r| (&r.name, &r.id))
        .map(|r| {
            json!({
                "id": r.id,
                "created": r.created.to_string(),
                "updated": r.created.to_string(),
                "name": r.name,
                "permissions": r.permissions,
                "account_id": null,
                "is_system_role": true,
            })
        })
        .collect();
    Ok(Json(roles).into_response())
}

#[derive(Deserialize)]
struct AccountAndBot {
    account_id: String,
    id: String,
}

/// The `account_role_id` of a bot body: none (absent or null), or an existing role's.
fn account_role_id(state: &Inner, map: &Map<String, Value>) -> Result<Option<String>, Response> {
    match map.get("account_role_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) if is_uuid(id) => match state.role(id) {
            Some(_) => Ok(Some(id.clone())),
            None => Err(detail(StatusCode::NOT_FOUND, "Account role not found.")),
        },
        Some(_) => Err(invalid(
            &["body", "account_role_id"],
            "uuid_parsing",
            "Input should be a valid UUID",
        )),
    }
}

async fn create_bot(
    State(state): State<Shared>,
    Path(account_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Response> {
    let mut state = state.lock().unwrap();
    authorize(&state, &headers, &account_id)?;
    let map = object(
        &body,
        &["name", "api_key_expiration", "account_role_id"],
        false,
    )?;
    let name = match map.get("name") {
        Some(Value::String(n)) if !n.is_empty() => n.clone(),
        Some(Value::String(_)) => {
            return Err(invalid(
                &["body", "name"],
                "string_too_short",
                "String should have at least 1 character",
            ));
        }
        None => return Err(invalid(&["body", "name"], "missing", "Field required")),
        Some(_) => {
            return Err(invalid(
                &["body", "name"],
                "string_type",
                "Input should be a valid string",
            ));
        }
    };
    let expiration = datetime(&map, "api_key_expiration")?;
    let role_id = match account_role_id(&state, &map)? {
        Some(id) => id,
        None => state
            .roles
            .iter()
            .find(|r| r.name == "Member")
            .expect("system role")
            .id
            .clone(),
    };
    if state.bots.values().any(|b| b.name == name) {
        return Err(detail(
            StatusCode::CONFLICT,
            "A bot with this name already exists.",
        ));
    }
    state
        .bodies
        .push(("create".to_owned(), Value::Object(map.clone())));
    let (bot, _) = new_bot(&mut state, &name, role_id, expiration.map(second));
    let out = bot_json(&state, &bot, true);
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

async fn filter_bots(
    State(state): State<Shared>,
    Path(account_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Response> {
    let state = state.lock().unwrap();
    authorize(&state, &headers, &account_id)?;
    let filter = ListFilter::parse(&body, "service_accounts")?;
    let bots: Vec<Value> = filter
        .select(state.bots.values(), |b| (&b.name, &b.id))
        .map(|b| bot_json(&state, b, false))
        .collect();
    Ok(Json(bots).into_response())
}

/// Authorizes and finds the bot of a `…/bots/{id}…` route.
fn bot_route(
    state: &Inner,
    headers: &HeaderMap,
    path: &AccountAndBot,
) -> Result<EmulatedBot, Response> {
    authorize(state, headers, &path.account_id)?;
    path_uuid("id", &path.id)?;
    state
        .bots
        .get(&path.id)
        .cloned()
        .ok_or_else(|| detail(StatusCode::NOT_FOUND, "Bot not found."))
}

async fn read_bot(
    State(state): State<Shared>,
    Path(path): Path<AccountAndBot>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let state = state.lock().unwrap();
    let bot = bot_route(&state, &headers, &path)?;
    Ok(Json(bot_json(&state, &bot, false)).into_response())
}

/// `PATCH …/bots/{id}` with `name` and / or `account_role_id`; 204 without a body.
async fn update_bot(
    State(state): State<Shared>,
    Path(path): Path<AccountAndBot>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Response> {
    let mut state = state.lock().unwrap();
    let bot = bot_route(&state, &headers, &path)?;
    let map = object(&body, &["name", "account_role_id"], false)?;
    let name = match map.get("name") {
        None | Some(Value::Null) => None,
        Some(Value::String(n)) if !n.is_empty() => Some(n.clone()),
        Some(_) => {
            return Err(invalid(
                &["body", "name"],
                "string_type",
                "Input should be a valid string",
            ));
        }
    };
    let role = account_role_id(&state, &map)?;
    if let Some(n) = &name
        && state.bots.values().any(|b| &b.name == n && b.id != bot.id)
    {
        return Err(detail(
            StatusCode::CONFLICT,
            "A bot with this name already exists.",
        ));
    }
    state
        .bodies
        .push(("update".to_owned(), Value::Object(map.clone())));
    let now = state.now();
    let b = state.bots.get_mut(&bot.id).expect("bot");
    if let Some(n) = name {
        b.name = n;
    }
    if let Some(r) = role {
        b.role_id = r;
    }
    b.updated = now;
    Ok(StatusCode::NO_CONTENT.into_response())
}

impl Prefect {
    /// The name of a bot's account role.
    pub fn role_of(&self, bot_id: &str) -> Option<String> {
        let state = self.lock();
        let bot = state.bots.get(bot_id)?;
        state.role(&bot.role_id).map(|r| r.name.clone())
    }
}

async fn delete_bot(
    State(state): State<Shared>,
    Path(path): Path<AccountAndBot>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let mut state = state.lock().unwrap();
    let bot = bot_route(&state, &headers, &path)?;
    state.bots.remove(&bot.id);
    for key in state.keys.values_mut() {
        if key.bot.as_deref() == Some(bot.id.as_str()) {
            key.deleted = true;
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn rotate_api_key(
    State(state): State<Shared>,
    Path(path): Path<AccountAndBot>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Response> {
    let mut state = state.lock().unwrap();
    let bot = bot_route(&state, &headers, &path)?;
    let map = object(
        &body,
        &["api_key_expiration", "old_key_expires_in_seconds"],
        false,
    )?;
    let expiration = datetime(&map, "api_key_expiration")?;
    let grace = match map.get("old_key_expires_in_seconds") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_i64() {
            Some(s) if s < 0 => {
                return Err(invalid(
                    &["body", "old_key_expires_in_seconds"],
                    "greater_than_equal",
                    "Input should be greater than or equal to 0",
                ));
            }
            Some(s) if s > MAX_OLD_KEY_SECONDS => {
                return Err(invalid(
                    &["body", "old_key_expires_in_seconds"],
                    "less_than_equal",
                    "Input should be less than or equal to 172800",
                ));
            }
            Some(s) => Some(s),
            None => {
                return Err(invalid(
                    &["body", "old_key_expires_in_seconds"],
                    "int_type",
                    "Input should be a valid integer",
                ));
            }
        },
    };
    state
        .bodies
        .push(("rotate".to_owned(), Value::Object(map.clone())));
    let now = state.now();
    if let Some(old) = state.keys.get_mut(&bot.active_key) {
        match grace {
            None => old.deleted = true,
            Some(s) => {
                let until = now
                    .checked_add(SignedDuration::from_secs(s))
                    .expect("in range");
                old.expiration = Some(old.expiration.map_or(until, |e| e.min(until)));
            }
        }
    }
    let key = new_key(&mut state, &bot.id, &bot.name, expiration.map(second));
    let bot = {
        let b = state.bots.get_mut(&bot.id).expect("bot");
        b.active_key = key.id.clone();
        b.updated = now;
        b.clone()
    };
    let out = bot_json(&state, &bot, true);
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

async fn read_bot_api_keys(
    State(state): State<Shared>,
    Path(path): Path<AccountAndBot>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let state = state.lock().unwrap();
    let bot = bot_route(&state, &headers, &path)?;
    let now = state.now();
    let active = state.keys.get(&bot.active_key).expect("active key");
    let rotating: Vec<Value> = state
        .keys
        .values()
        .filter(|k| k.bot.as_deref() == Some(bot.id.as_str()) && k.id != bot.active_key)
        .filter(|k| k.is_valid(now))
        .map(|k| key_json(k, false))
        .collect();
    Ok(
        Json(json!({"active_key": key_json(active, false), "rotating_keys": rotating}))
            .into_response(),
    )
}

#[derive(Deserialize)]
struct AccountBotKey {
    account_id: String,
    id: String,
    api_key_id: String,
}

async fn delete_bot_api_key(
    State(state): State<Shared>,
    Path(path): Path<AccountBotKey>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let mut state = state.lock().unwrap();
    let route = AccountAndBot {
        account_id: path.account_id,
        id: path.id,
    };
    let bot = bot_route(&state, &headers, &route)?;
    path_uuid("api_key_id", &path.api_key_id)?;
    if path.api_key_id == bot.active_key {
        return Err(detail(
            StatusCode::BAD_REQUEST,
            "The active API key cannot be deleted; rotate it first.",
        ));
    }
    let now = state.now();
    match state.keys.get_mut(&path.api_key_id) {
        Some(k) if k.bot.as_deref() == Some(bot.id.as_str()) && k.is_valid(now) => {
            k.deleted = true;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        _ => Err(detail(StatusCode::NOT_FOUND, "API key not found.")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Fault;

    struct Client {
        http: reqwest::Client,
        base: String,
        account: String,
        admin: String,
    }

    impl Client {
        async fn new(emulator: &Prefect) -> Self {
            let _ = rustls::crypto::ring::default_provider().install_default();
            Self {
                http: reqwest::Client::new(),
                base: emulator.api_url(),
                account: emulator.account_id(),
                admin: emulator.add_admin_key(),
            }
        }

        async fn call(
            &self,
            method: reqwest::Method,
            path: &str,
            body: Option<Value>,
        ) -> (u16, Value) {
            let url = format!("{}/accounts/{}/{path}", self.base, self.account);
            let mut request = self.http.request(method, url).bearer_auth(&self.admin);
            if let Some(body) = body {
                request = request.json(&body);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let text = response.text().await.unwrap();
            (status, serde_json::from_str(&text).unwrap_or(Value::Null))
        }

        async fn me(&self, key: &str) -> u16 {
            self.http
                .get(format!("{}/me/workspaces", self.base))
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    }

    #[tokio::test]
    async fn bots_are_created_with_their_key_shown_once() {
        let emulator = Prefect::start().await;
        let c = Client::new(&emulator).await;
        let (status, roles) = c
            .call(
                reqwest::Method::POST,
                "account_roles/filter",
                Some(json!({"account_roles": {"name": {"any_": ["Admin"]}}})),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(roles.as_array().unwrap().len(), 1);
        let role_id = roles[0]["id"].as_str().unwrap().to_owned();
        let (status, bot) = c
            .call(
                reqwest::Method::POST,
                "bots/",
                Some(json!({"name": "agent", "api_key_expiration": null, "account_role_id": role_id})),
            )
            .await;
        assert_eq!(status, 201, "{bot}");
        assert_eq!(bot["account_role_name"], "Admin");
        let key = bot["api_key"]["key"].as_str().unwrap();
        assert!(key.starts_with("pnb_"));
        assert!(bot["api_key"]["expiration"].is_null());
        assert_eq!(c.me(key).await, 200);

        let id = bot["id"].as_str().unwrap();
        let (status, read) = c
            .call(reqwest::Method::GET, &format!("bots/{id}"), None)
            .await;
        assert_eq!(status, 200);
        assert!(read["api_key"].get("key").is_none());
        assert_eq!(read["api_key"]["id"], bot["api_key"]["id"]);

        let (status, found) = c
            .call(
                reqwest::Method::POST,
                "bots/filter",
                Some(json!({"service_accounts": {"name": {"any_": ["agent"]}}})),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(found.as_array().unwrap().len(), 1);
        assert!(found[0]["api_key"].get("key").is_none());

        let (status, _) = c
            .call(
                reqwest::Method::POST,
                "bots/",
                Some(json!({"name": "agent"})),
            )
            .await;
        assert_eq!(status, 409);

        let (status, _) = c
            .call(reqwest::Method::DELETE, &format!("bots/{id}"), None)
            .await;
        assert_eq!(status, 204);
        assert_eq!(c.me(key).await, 401);
        let (status, _) = c
            .call(reqwest::Method::GET, &format!("bots/{id}"), None)
            .await;
        assert_eq!(status, 404);
    }

    #[tokio::test]
    async fn unknown_fields_and_bad_values_are_refused_like_fastapi() {
        let emulator = Prefect::start().await;
        let c = Client::new(&emulator).await;
        let (status, body) = c
            .call(
                reqwest::Method::POST,
                "bots/",
                Some(json!({"name": "a", "api_key_expires": null})),
            )
            .await;
        assert_eq!(status, 422);
        assert_eq!(body["detail"][0]["type"], "extra_forbidden");
        assert_eq!(body["detail"][0]["loc"], json!(["body", "api_key_expires"]));
        let (status, _) = c
            .call(
                reqwest::Method::POST,
                "bots/",
                Some(json!({"name": "a", "api_key_expiration": "tomorrow"})),
            )
            .await;
        assert_eq!(status, 422);
        let (status, body) = c
            .call(
                reqwest::Method::POST,
                "bots/filter",
                Some(json!({"service_accounts": {"name": {"like_": "a"}}})),
            )
            .await;
        assert_eq!(status, 422, "{body}");
        let (bot, _) = emulator.create_bot_in_ui("b");
        let (status, body) = c
            .call(
                reqwest::Method::POST,
                &format!("bots/{bot}/rotate_api_key"),
                Some(json!({"api_key_expiration": null, "old_key_expires_in_seconds": 172_801})),
            )
            .await;
        assert_eq!(status, 422);
        assert_eq!(body["detail"][0]["type"], "less_than_equal");
        let (status, _) = c.call(reqwest::Method::GET, "bots/not-a-uuid", None).await;
        assert_eq!(status, 422);
        assert!(emulator.bodies().is_empty());
    }

    #[tokio::test]
    async fn rotation_keeps_the_old_key_for_its_grace_period() {
        let emulator = Prefect::start().await;
        let c = Client::new(&emulator).await;
        let (bot, first) = emulator.create_bot_in_ui("agent");
        let expiration = (Timestamp::now() + SignedDuration::from_hours(24)).to_string();
        let (status, rotated) = c
            .call(
                reqwest::Method::POST,
                &format!("bots/{bot}/rotate_api_key"),
                Some(json!({"api_key_expiration": expiration, "old_key_expires_in_seconds": 300})),
            )
            .await;
        assert_eq!(status, 201, "{rotated}");
        let second = rotated["api_key"]["key"].as_str().unwrap().to_owned();
        assert!(!rotated["api_key"]["expiration"].is_null());
        assert_eq!(
            c.me(&first).await,
            200,
            "the old key lives for its grace period"
        );
        assert_eq!(c.me(&second).await, 200);
        let (_, keys) = c
            .call(
                reqwest::Method::GET,
                &format!("bots/{bot}/read_bot_api_keys"),
                None,
            )
            .await;
        assert_eq!(keys["active_key"]["id"], rotated["api_key"]["id"]);
        assert_eq!(keys["rotating_keys"].as_array().unwrap().len(), 1);

        emulator.advance(Duration::from_secs(301));
        assert_eq!(c.me(&first).await, 401);
        assert_eq!(c.me(&second).await, 200);

        // Without a grace period the old key is deleted at once.
        let (_, third) = c
            .call(
                reqwest::Method::POST,
                &format!("bots/{bot}/rotate_api_key"),
                Some(json!({"api_key_expiration": null, "old_key_expires_in_seconds": 0})),
            )
            .await;
        assert_eq!(c.me(&second).await, 401);
        assert_eq!(c.me(third["api_key"]["key"].as_str().unwrap()).await, 200);

        // And the new key expires when asked to.
        emulator.advance(Duration::from_secs(2 * 24 * 3600));
        let (_, read) = c
            .call(reqwest::Method::GET, &format!("bots/{bot}"), None)
            .await;
        assert!(read["api_key"]["expiration"].is_null());
    }

    #[tokio::test]
    async fn a_rotating_key_can_be_deleted_but_not_the_active_one() {
        let emulator = Prefect::start().await;
        let c = Client::new(&emulator).await;
        let (bot, first) = emulator.create_bot_in_ui("agent");
        let first_id = emulator
            .live_bot_keys()
            .into_iter()
            .find(|k| k.value == first)
            .unwrap()
            .id;
        let (_, rotated) = c
            .call(
                reqwest::Method::POST,
                &format!("bots/{bot}/rotate_api_key"),
                Some(json!({"api_key_expiration": null, "old_key_expires_in_seconds": 3600})),
            )
            .await;
        let active = rotated["api_key"]["id"].as_str().unwrap();
        let path = |k: &str| format!("bots/{bot}/delete_bot_api_key/{k}");
        assert_eq!(
            c.call(reqwest::Method::DELETE, &path(active), None).await.0,
            400
        );
        assert_eq!(
            c.call(reqwest::Method::DELETE, &path(&first_id), None)
                .await
                .0,
            204
        );
        assert_eq!(c.me(&first).await, 401);
        assert_eq!(
            c.call(reqwest::Method::DELETE, &path(&first_id), None)
                .await
                .0,
            404
        );
    }

    #[tokio::test]
    async fn only_admin_keys_manage_bots_and_faults_are_served() {
        let emulator = Prefect::start().await;
        let c = Client::new(&emulator).await;
        let (_, bot_key) = emulator.create_bot_in_ui("agent");
        let url = format!("{}/accounts/{}/bots/filter", c.base, c.account);
        let status = |key: &'static str| {
            let http = c.http.clone();
            let url = url.clone();
            async move {
                http.post(url)
                    .bearer_auth(key)
                    .json(&json!({}))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }
        };
        assert_eq!(status("pnu_nope").await, 401);
        let bot_key: &'static str = Box::leak(bot_key.into_boxed_str());
        assert_eq!(status(bot_key).await, 403);
        let other = c
            .http
            .post(format!("{}/accounts/{}/bots/filter", c.base, uuid4()))
            .bearer_auth(&c.admin)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(other.status().as_u16(), 404);

        emulator.faults().inject(
            Fault::TooManyRequests {
                retry_after: Some(3),
            },
            1,
            Some("/bots/"),
        );
        let (status, _) = c
            .call(reqwest::Method::POST, "bots/", Some(json!({"name": "x"})))
            .await;
        assert_eq!(status, 429);
        assert_eq!(
            emulator
                .faults()
                .requests()
                .iter()
                .filter(|r| r.faulted)
                .count(),
            1
        );
        let (status, _) = c
            .call(reqwest::Method::POST, "bots/", Some(json!({"name": "x"})))
            .await;
        assert_eq!(status, 201);
    }
}
