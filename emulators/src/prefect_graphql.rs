//! The Prefect 1 (Prefect Cloud "classic") GraphQL API-key operations.
//!
//! Sources, checked on 2026-11-24:
//! - The seed (`shared/seeds/002_…`, Prefect 1 docs "API Keys"): `create_api_key(input:
//!   { user_id, name })` against `https://api.prefect.io`, `delete_api_key(input: {
//!   key_id }) { success }`, and `query { auth_api_key { id name expires_at } }`, which
//!   "never returns the value of the key itself".
//! - The Prefect 1 CLI (`PrefectHQ/prefect`, `src/prefect/cli/auth.py`, 1.x):
//!   `mutation($input: create_api_key_input!) { create_api_key(input: $input) { key } }`
//!   with `input = {name, user_id, expires_at}` (`expires_at` an ISO 8601 UTC time or
//!   null = never expires); `mutation($input: delete_api_key_input!) {
//!   delete_api_key(input: $input) { success } }` with `{key_id}`;
//!   `query { auth_api_key { id name expires_at } }` lists keys ("If you are a tenant
//!   admin, this should list all service account keys as well as keys you have
//!   created"). Keys authenticate as `Authorization: Bearer <key>`.
//! - The seed's creation example selects `{ token }` where the CLI selects `{ key }`
//!   (`token` is also the field of the older `create_api_token` mutation). The emulator
//!   answers both spellings with the key value, so a document copied from either
//!   source works; any other field is refused like an unknown field.
//!
//! Not documented, chosen here and kept consistent (a client must not depend on them):
//! `create_api_key_payload.id` (the CLI only selects `key`; an id is what
//! `delete_api_key` needs, so the payload carries it); the error messages
//! (graphql-js wording: `Cannot query field "x" on type "T".`, `Unknown argument …`);
//! every GraphQL error is HTTP 200 with an `errors` array, except authentication
//! (HTTP 401 with `errors[0].extensions.code = UNAUTHENTICATED`); `delete_api_key`
//! of an unknown id answers the error `API key not found`; only tenant admins create
//! keys for service accounts, and anyone for themselves; `expires_at` in the past is
//! refused. The emulator is strict where a GraphQL server is: unknown fields,
//! arguments, input fields and undeclared or missing variables are errors.
//!
//! The GraphQL handling is small on purpose — one operation per document, fields,
//! aliases, arguments, variables, literals (no fragments, directives or
//! subscriptions) — enough for any document a client of these three operations sends.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use jiff::Timestamp;
use serde_json::{Map, Value, json};

use crate::{Faults, Server, is_uuid, random_alnum, uuid4};

/// An API key as the emulator holds it, value included (for test assertions).
#[derive(Clone, Debug)]
pub struct ApiKey {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub value: String,
    pub created: Timestamp,
    pub created_by_id: String,
    pub expires_at: Option<Timestamp>,
    /// When it was deleted (by `delete_api_key` or [`PrefectGraphql::delete_out_of_band`]).
    pub deleted: Option<Timestamp>,
}

impl ApiKey {
    pub fn is_valid(&self, now: Timestamp) -> bool {
        self.deleted.is_none() && self.expires_at.is_none_or(|e| e > now)
    }
}

#[derive(Clone, Debug)]
struct User {
    admin: bool,
    service_account: bool,
}

#[derive(Default)]
struct Inner {
    users: BTreeMap<String, User>,
    keys: BTreeMap<String, ApiKey>,
    /// Every accepted request body, as sent.
    bodies: Vec<Value>,
}

type Shared = Arc<Mutex<Inner>>;

/// A tenant admin's credentials, registered by a test.
#[derive(Clone, Debug)]
pub struct Admin {
    pub user_id: String,
    pub key: String,
}

/// A running Prefect 1 GraphQL emulator; dropping it stops the server.
pub struct PrefectGraphql {
    server: Server,
    faults: Arc<Faults>,
    state: Shared,
}

impl PrefectGraphql {
    pub async fn start() -> Self {
        let state: Shared = Arc::new(Mutex::new(Inner::default()));
        let faults = Faults::new();
        let router = Router::new()
            .route("/", post(graphql))
            .route("/graphql", post(graphql))
            .fallback(|| async { crate::error(StatusCode::NOT_FOUND, "not found") })
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

    /// `http://127.0.0.1:<port>`; GraphQL is served at `/` (as `https://api.prefect.io`)
    /// and at `/graphql`.
    pub fn base_url(&self) -> &str {
        self.server.base_url()
    }

    pub fn faults(&self) -> &Arc<Faults> {
        &self.faults
    }

    /// Registers a tenant admin with an API key that never expires.
    pub fn add_admin(&self) -> Admin {
        let user_id = uuid4();
        let mut state = self.lock();
        state.users.insert(
            user_id.clone(),
            User {
                admin: true,
                service_account: false,
            },
        );
        let key = new_key(&mut state, &user_id, &user_id, "admin", None);
        Admin {
            user_id,
            key: key.value,
        }
    }

    /// Registers a service account of the tenant; returns its user id.
    pub fn add_service_account(&self) -> String {
        let id = uuid4();
        self.lock().users.insert(
            id.clone(),
            User {
                admin: false,
                service_account: true,
            },
        );
        id
    }

    /// Every key ever created, deleted ones included.
    pub fn keys(&self) -> Vec<ApiKey> {
        self.lock().keys.values().cloned().collect()
    }

    pub fn key(&self, id: &str) -> Option<ApiKey> {
        self.lock().keys.get(id).cloned()
    }

    /// Keys of service accounts (not the test's admin keys) that still authenticate.
    pub fn live_service_account_keys(&self) -> Vec<ApiKey> {
        let state = self.lock();
        let now = Timestamp::now();
        state
            .keys
            .values()
            .filter(|k| k.is_valid(now) && state.users[&k.user_id].service_account)
            .cloned()
            .collect()
    }

    /// Whether `value` authenticates now.
    pub fn authenticates(&self, value: &str) -> bool {
        let now = Timestamp::now();
        self.lock()
            .keys
            .values()
            .any(|k| k.value == value && k.is_valid(now))
    }

    /// Someone deletes the key in the UI. False if it was already gone.
    pub fn delete_out_of_band(&self, id: &str) -> bool {
        match self.lock().keys.get_mut(id) {
            Some(k) if k.deleted.is_none() => {
                k.deleted = Some(Timestamp::now());
                true
            }
            _ => false,
        }
    }

    /// Every request body the GraphQL endpoint received (parsed as JSON).
    pub fn bodies(&self) -> Vec<Value> {
        self.lock().bodies.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.state.lock().unwrap()
    }
}

fn new_key(
    state: &mut Inner,
    user_id: &str,
    created_by: &str,
    name: &str,
    expires_at: Option<Timestamp>,
) -> ApiKey {
    let key = ApiKey {
        id: uuid4(),
        user_id: user_id.to_owned(),
        name: name.to_owned(),
        value: random_alnum(40),
        created: Timestamp::now(),
        created_by_id: created_by.to_owned(),
        expires_at,
        deleted: None,
    };
    state.keys.insert(key.id.clone(), key.clone());
    key
}

// ---------------------------------------------------------------------------------
// The HTTP side.

fn errors(status: StatusCode, messages: Vec<Value>) -> Response {
    (status, Json(json!({ "errors": messages }))).into_response()
}

fn message(text: impl Into<String>) -> Value {
    json!({ "message": text.into() })
}

async fn graphql(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let mut state = state.lock().unwrap();
    let now = Timestamp::now();
    let caller = token.and_then(|t| {
        state
            .keys
            .values()
            .find(|k| k.value == t && k.is_valid(now))
            .map(|k| k.user_id.clone())
    });
    let Some(caller) = caller else {
        return errors(
            StatusCode::UNAUTHORIZED,
            vec![json!({"message": "Unauthenticated", "extensions": {"code": "UNAUTHENTICATED"}})],
        );
    };
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return errors(
            StatusCode::BAD_REQUEST,
            vec![message("POST body is not valid JSON")],
        );
    };
    state.bodies.push(request.clone());
    let Some(query) = request.get("query").and_then(Value::as_str) else {
        return errors(
            StatusCode::BAD_REQUEST,
            vec![message("POST body must carry a `query` string")],
        );
    };
    let variables = match request.get("variables") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(v)) => v.clone(),
        Some(_) => {
            return errors(
                StatusCode::BAD_REQUEST,
                vec![message("`variables` must be an object")],
            );
        }
    };
    let operation = match parse(query) {
        Ok(op) => op,
        Err(e) => return errors(StatusCode::OK, vec![message(format!("Syntax Error: {e}"))]),
    };
    match execute(&mut state, &caller, &operation, &variables) {
        Ok((data, errs)) if errs.is_empty() => Json(json!({ "data": data })).into_response(),
        Ok((data, errs)) => Json(json!({ "data": data, "errors": errs })).into_response(),
        Err(errs) => errors(StatusCode::OK, errs),
    }
}

// ---------------------------------------------------------------------------------
// Parsing: one operation, fields with aliases, arguments and selection sets.

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Punct(char),
    Name(String),
    Str(String),
    Int(i64),
    Dollar,
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' | '\n' | '\r' | ',' | '\u{feff}' => i += 1,
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '{' | '}' | '(' | ')' | ':' | '!' | '[' | ']' | '=' => {
                out.push(Token::Punct(c));
                i += 1;
            }
            '$' => {
                out.push(Token::Dollar);
                i += 1;
            }
            '"' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None | Some('\n') => return Err("Unterminated string.".into()),
                        Some('"') => break,
                        Some('\\') => {
                            let escaped = match chars.get(i + 1) {
                                Some('"') => '"',
                                Some('\\') => '\\',
                                Some('/') => '/',
                                Some('n') => '\n',
                                Some('t') => '\t',
                                Some('r') => '\r',
                                Some('b') => '\u{8}',
                                Some('f') => '\u{c}',
                                Some('u') => {
                                    let hex: String = chars.iter().skip(i + 2).take(4).collect();
                                    let code = u32::from_str_radix(&hex, 16)
                                        .map_err(|_| "Invalid Unicode escape sequence.")?;
                                    i += 4;
                                    char::from_u32(code)
                                        .ok_or("Invalid Unicode escape sequence.")?
                                }
                                _ => return Err("Invalid character escape sequence.".into()),
                            };
                            s.push(escaped);
                            i += 2;
                            continue;
                        }
                        Some(&other) => s.push(other),
                    }
                    i += 1;
                }
                i += 1;
                out.push(Token::Str(s));
            }
            c if c == '-' || c.is_ascii_digit() => {
                let start = i;
                i += 1;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
                let text: String = chars[start..i].iter().collect();
                out.push(Token::Int(
                    text.parse()
                        .map_err(|_| format!("Invalid number {text}."))?,
                ));
            }
            c if c == '_' || c.is_ascii_alphabetic() => {
                let start = i;
                while i < chars.len() && (chars[i] == '_' || chars[i].is_ascii_alphanumeric()) {
                    i += 1;
                }
                out.push(Token::Name(chars[start..i].iter().collect()));
            }
            other => return Err(format!("Unexpected character \"{other}\".")),
        }
    }
    Ok(out)
}

/// A literal or variable in a document.
#[derive(Clone, Debug)]
enum Input {
    Variable(String),
    Literal(Value),
    List(Vec<Input>),
    Object(Vec<(String, Input)>),
}

#[derive(Debug)]
struct Field {
    alias: Option<String>,
    name: String,
    arguments: Vec<(String, Input)>,
    selection: Vec<Field>,
}

#[derive(Debug)]
struct Operation {
    mutation: bool,
    /// `$name` → declared type, e.g. `create_api_key_input!`.
    variables: BTreeMap<String, String>,
    selection: Vec<Field>,
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Result<Token, String> {
        let t = self
            .tokens
            .get(self.at)
            .cloned()
            .ok_or("Unexpected <EOF>.")?;
        self.at += 1;
        Ok(t)
    }

    fn expect(&mut self, c: char) -> Result<(), String> {
        match self.next()? {
            Token::Punct(p) if p == c => Ok(()),
            other => Err(format!("Expected \"{c}\", found {other:?}.")),
        }
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(&Token::Punct(c)) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn name(&mut self) -> Result<String, String> {
        match self.next()? {
            Token::Name(n) => Ok(n),
            other => Err(format!("Expected Name, found {other:?}.")),
        }
    }

    fn type_ref(&mut self) -> Result<String, String> {
        let mut t = if self.eat('[') {
            let inner = self.type_ref()?;
            self.expect(']')?;
            format!("[{inner}]")
        } else {
            self.name()?
        };
        if self.eat('!') {
            t.push('!');
        }
        Ok(t)
    }

    fn input(&mut self) -> Result<Input, String> {
        Ok(match self.next()? {
            Token::Dollar => Input::Variable(self.name()?),
            Token::Str(s) => Input::Literal(Value::String(s)),
            Token::Int(n) => Input::Literal(json!(n)),
            Token::Name(n) => Input::Literal(match n.as_str() {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                "null" => Value::Null,
                _ => Value::String(n),
            }),
            Token::Punct('[') => {
                let mut items = Vec::new();
                while !self.eat(']') {
                    items.push(self.input()?);
                }
                Input::List(items)
            }
            Token::Punct('{') => {
                let mut fields = Vec::new();
                while !self.eat('}') {
                    let name = self.name()?;
                    self.expect(':')?;
                    fields.push((name, self.input()?));
                }
                Input::Object(fields)
            }
            other => return Err(format!("Unexpected {other:?}.")),
        })
    }

    fn selection(&mut self) -> Result<Vec<Field>, String> {
        self.expect('{')?;
        let mut fields = Vec::new();
        while !self.eat('}') {
            let first = self.name()?;
            let (alias, name) = if self.eat(':') {
                (Some(first), self.name()?)
            } else {
                (None, first)
            };
            let mut arguments = Vec::new();
            if self.eat('(') {
                while !self.eat(')') {
                    let arg = self.name()?;
                    self.expect(':')?;
                    arguments.push((arg, self.input()?));
                }
            }
            let selection = if self.peek() == Some(&Token::Punct('{')) {
                self.selection()?
            } else {
                Vec::new()
            };
            fields.push(Field {
                alias,
                name,
                arguments,
                selection,
            });
        }
        if fields.is_empty() {
            return Err("Expected Name, found \"}\".".into());
        }
        Ok(fields)
    }
}

fn parse(text: &str) -> Result<Operation, String> {
    let mut p = Parser {
        tokens: tokenize(text)?,
        at: 0,
    };
    let mut mutation = false;
    let mut variables = BTreeMap::new();
    if let Some(Token::Name(keyword)) = p.peek().cloned() {
        match keyword.as_str() {
            "query" => {}
            "mutation" => mutation = true,
            other => return Err(format!("Unexpected Name \"{other}\".")),
        }
        p.at += 1;
        if let Some(Token::Name(_)) = p.peek() {
            p.at += 1; // the operation name
        }
        if p.eat('(') {
            while !p.eat(')') {
                match p.next()? {
                    Token::Dollar => {}
                    other => return Err(format!("Expected \"$\", found {other:?}.")),
                }
                let name = p.name()?;
                p.expect(':')?;
                let t = p.type_ref()?;
                if p.eat('=') {
                    p.input()?;
                }
                variables.insert(name, t);
            }
        }
    }
    let selection = p.selection()?;
    if p.at != p.tokens.len() {
        return Err("only one operation per document is supported".into());
    }
    Ok(Operation {
        mutation,
        variables,
        selection,
    })
}

// ---------------------------------------------------------------------------------
// Execution against the emulated schema.

/// The fields of each object type the operations return.
const PAYLOAD_FIELDS: &[&str] = &["id", "key", "token"];
const SUCCESS_FIELDS: &[&str] = &["success", "error"];
const API_KEY_FIELDS: &[&str] = &[
    "id",
    "name",
    "user_id",
    "created",
    "created_by_id",
    "expires_at",
];

fn resolve_input(
    input: &Input,
    operation: &Operation,
    variables: &Map<String, Value>,
) -> Result<Value, Value> {
    Ok(match input {
        Input::Variable(name) => {
            if !operation.variables.contains_key(name) {
                return Err(message(format!("Variable \"${name}\" is not defined.")));
            }
            variables.get(name).cloned().unwrap_or(Value::Null)
        }
        Input::Literal(v) => v.clone(),
        Input::List(items) => Value::Array(
            items
                .iter()
                .map(|i| resolve_input(i, operation, variables))
                .collect::<Result<_, _>>()?,
        ),
        Input::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| Ok((k.clone(), resolve_input(v, operation, variables)?)))
                .collect::<Result<_, Value>>()?,
        ),
    })
}

/// The one `input` argument of a mutation, checked against its input type.
fn input_argument(
    field: &Field,
    operation: &Operation,
    variables: &Map<String, Value>,
    type_name: &str,
    allowed: &[&str],
    required: &[&str],
) -> Result<Map<String, Value>, Value> {
    for (arg, value) in &field.arguments {
        if arg != "input" {
            return Err(message(format!(
                "Unknown argument \"{arg}\" on field \"{}\" of type \"Mutation\".",
                field.name
            )));
        }
        if let Input::Variable(v) = value
            && let Some(declared) = operation.variables.get(v)
            && declared != &format!("{type_name}!")
            && declared != type_name
        {
            return Err(message(format!(
                "Variable \"${v}\" of type \"{declared}\" used in position expecting type \"{type_name}!\"."
            )));
        }
    }
    let Some((_, input)) = field.arguments.iter().find(|(a, _)| a == "input") else {
        return Err(message(format!(
            "Field \"{}\" argument \"input\" of type \"{type_name}!\" is required, but it was not provided.",
            field.name
        )));
    };
    let Value::Object(object) = resolve_input(input, operation, variables)? else {
        return Err(message(format!(
            "Expected value of type \"{type_name}!\", found a value that is not an object."
        )));
    };
    for key in object.keys() {
        if !allowed.contains(&key.as_str()) {
            return Err(message(format!(
                "Field \"{key}\" is not defined by type \"{type_name}\"."
            )));
        }
    }
    for key in required {
        if object.get(*key).is_none_or(Value::is_null) {
            return Err(message(format!(
                "Field \"{type_name}.{key}\" of required type is required, but it was not provided."
            )));
        }
    }
    Ok(object)
}

/// The selected fields of an object, refusing unknown ones.
fn select(
    field: &Field,
    type_name: &str,
    allowed: &[&str],
    object: &Value,
) -> Result<Value, Value> {
    if field.selection.is_empty() {
        return Err(message(format!(
            "Field \"{}\" of type \"{type_name}\" must have a selection of subfields.",
            field.name
        )));
    }
    let mut out = Map::new();
    for sub in &field.selection {
        if !sub.arguments.is_empty() || !sub.selection.is_empty() {
            return Err(message(format!(
                "Field \"{}\" on type \"{type_name}\" takes no arguments or subfields.",
                sub.name
            )));
        }
        let value = if sub.name == "__typename" {
            Value::String(type_name.to_owned())
        } else if allowed.contains(&sub.name.as_str()) {
            object.get(&sub.name).cloned().unwrap_or(Value::Null)
        } else {
            return Err(message(format!(
                "Cannot query field \"{}\" on type \"{type_name}\".",
                sub.name
            )));
        };
        out.insert(sub.alias.clone().unwrap_or_else(|| sub.name.clone()), value);
    }
    Ok(Value::Object(out))
}

fn key_json(k: &ApiKey) -> Value {
    json!({
        "id": k.id, "name": k.name, "user_id": k.user_id,
        "created": k.created.to_string(), "created_by_id": k.created_by_id,
        "expires_at": k.expires_at.map(|t| t.to_string()),
    })
}

/// Runs the operation. `Err` is a validation failure (no data at all); `Ok` carries
/// the data and the field errors.
fn execute(
    state: &mut Inner,
    caller: &str,
    operation: &Operation,
    variables: &Map<String, Value>,
) -> Result<(Value, Vec<Value>), Vec<Value>> {
    for name in operation.variables.keys() {
        let declared = &operation.variables[name];
        if declared.ends_with('!') && variables.get(name).is_none_or(Value::is_null) {
            return Err(vec![message(format!(
                "Variable \"${name}\" of required type \"{declared}\" was not provided."
            ))]);
        }
    }
    let root = if operation.mutation {
        "Mutation"
    } else {
        "Query"
    };
    let admin = state.users.get(caller).is_some_and(|u| u.admin);
    let mut data = Map::new();
    let mut field_errors = Vec::new();
    for field in &operation.selection {
        let out = field.alias.clone().unwrap_or_else(|| field.name.clone());
        let result: Result<Value, Value> = match (operation.mutation, field.name.as_str()) {
            (true, "create_api_key") => (|| {
                let input = input_argument(
                    field,
                    operation,
                    variables,
                    "create_api_key_input",
                    &["user_id", "name", "expires_at", "default_tenant_id"],
                    &["user_id", "name"],
                )?;
                // Validate the selection before creating anything.
                select(field, "create_api_key_payload", PAYLOAD_FIELDS, &json!({}))?;
                let user_id = input["user_id"].as_str().unwrap_or_default();
                if !is_uuid(user_id) {
                    return Err(message(format!(
                        "invalid input syntax for type uuid: \"{user_id}\""
                    )));
                }
                let name = input["name"].as_str().unwrap_or_default();
                if name.trim().is_empty() {
                    return Err(message("API key name must not be empty"));
                }
                let expires_at = match input.get("expires_at") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => match s.parse::<Timestamp>() {
                        Ok(t) if t > Timestamp::now() => Some(t),
                        Ok(_) => return Err(message("expires_at must be in the future")),
                        Err(_) => {
                            return Err(message(format!(
                                "invalid input syntax for type timestamptz: \"{s}\""
                            )));
                        }
                    },
                    Some(_) => return Err(message("expires_at must be a timestamp string")),
                };
                let Some(target) = state.users.get(user_id).cloned() else {
                    return Err(message("User not found"));
                };
                if user_id != caller && !(admin && target.service_account) {
                    return Err(message(
                        "Unauthorized: only tenant admins create keys for service accounts",
                    ));
                }
                let key = new_key(state, user_id, caller, name, expires_at);
                select(
                    field,
                    "create_api_key_payload",
                    PAYLOAD_FIELDS,
                    &json!({"id": key.id, "key": key.value, "token": key.value}),
                )
            })(),
            (true, "delete_api_key") => (|| {
                let input = input_argument(
                    field,
                    operation,
                    variables,
                    "delete_api_key_input",
                    &["key_id"],
                    &["key_id"],
                )?;
                select(field, "success_payload", SUCCESS_FIELDS, &json!({}))?;
                let key_id = input["key_id"].as_str().unwrap_or_default();
                if !is_uuid(key_id) {
                    return Err(message(format!(
                        "invalid input syntax for type uuid: \"{key_id}\""
                    )));
                }
                let visible = state.keys.get(key_id).is_some_and(|k| {
                    k.deleted.is_none()
                        && (k.user_id == caller
                            || (admin && state.users[&k.user_id].service_account))
                });
                if !visible {
                    return Err(message("API key not found"));
                }
                if let Some(k) = state.keys.get_mut(key_id) {
                    k.deleted = Some(Timestamp::now());
                }
                select(
                    field,
                    "success_payload",
                    SUCCESS_FIELDS,
                    &json!({"success": true, "error": null}),
                )
            })(),
            (false, "auth_api_key") => (|| {
                if let Some((arg, _)) = field.arguments.first() {
                    return Err(message(format!(
                        "Unknown argument \"{arg}\" on field \"auth_api_key\" of type \"Query\"."
                    )));
                }
                select(field, "auth_api_key", API_KEY_FIELDS, &json!({}))?;
                let keys = state
                    .keys
                    .values()
                    .filter(|k| {
                        k.deleted.is_none()
                            && (k.user_id == caller
                                || (admin && state.users[&k.user_id].service_account))
                    })
                    .map(|k| select(field, "auth_api_key", API_KEY_FIELDS, &key_json(k)))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Value::Array(keys))
            })(),
            (_, "__typename") => Ok(Value::String(root.to_owned())),
            (_, name) => {
                return Err(vec![message(format!(
                    "Cannot query field \"{name}\" on type \"{root}\"."
                ))]);
            }
        };
        match result {
            Ok(v) => {
                data.insert(out, v);
            }
            Err(mut e) => {
                // Validation errors (unknown fields, arguments, types) fail the
                // whole request; execution errors null the field.
                let text = e["message"].as_str().unwrap_or_default().to_owned();
                let validation = [
                    "Cannot query field",
                    "Unknown argument",
                    "is not defined",
                    "used in position",
                    "is required, but",
                    "must have a selection",
                    "takes no arguments",
                    "Expected value of type",
                ]
                .iter()
                .any(|p| text.contains(p));
                if validation {
                    return Err(vec![e]);
                }
                e["path"] = json!([out.clone()]);
                data.insert(out, Value::Null);
                field_errors.push(e);
            }
        }
    }
    Ok((Value::Object(data), field_errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Client {
        http: reqwest::Client,
        url: String,
    }

    impl Client {
        async fn post(&self, key: &str, query: &str, variables: Value) -> (u16, Value) {
            let r = self
                .http
                .post(&self.url)
                .bearer_auth(key)
                .json(&json!({"query": query, "variables": variables}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json().await.unwrap())
        }
    }

    const CREATE: &str =
        "mutation($input: create_api_key_input!) { create_api_key(input: $input) { id key } }";
    const DELETE: &str =
        "mutation($input: delete_api_key_input!) { delete_api_key(input: $input) { success } }";
    const LIST: &str = "query { auth_api_key { id name expires_at } }";

    async fn setup() -> (PrefectGraphql, Client, Admin, String) {
        let emulator = PrefectGraphql::start().await;
        let admin = emulator.add_admin();
        let sa = emulator.add_service_account();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client {
            http: reqwest::Client::new(),
            url: format!("{}/", emulator.base_url()),
        };
        (emulator, client, admin, sa)
    }

    #[tokio::test]
    async fn create_list_delete_as_the_cli_does() {
        let (emulator, client, admin, sa) = setup().await;
        let (status, body) = client
            .post(&admin.key, CREATE, json!({"input": {"user_id": sa, "name": "agent kw:1", "expires_at": "2099-01-01T00:00:00+00:00"}}))
            .await;
        assert_eq!(status, 200, "{body}");
        let id = body["data"]["create_api_key"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let value = body["data"]["create_api_key"]["key"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(emulator.authenticates(&value));

        // The key itself can ask about itself; its listing never holds a value.
        let (_, listed) = client.post(&value, LIST, json!({})).await;
        assert_eq!(listed["data"]["auth_api_key"][0]["id"], id.as_str());
        assert_eq!(listed["data"]["auth_api_key"][0]["name"], "agent kw:1");
        assert!(!listed.to_string().contains(&value));
        let (_, as_admin) = client.post(&admin.key, LIST, json!(null)).await;
        assert_eq!(
            as_admin["data"]["auth_api_key"].as_array().unwrap().len(),
            2
        );

        let (_, deleted) = client
            .post(&admin.key, DELETE, json!({"input": {"key_id": id}}))
            .await;
        assert_eq!(deleted["data"]["delete_api_key"]["success"], true);
        assert!(!emulator.authenticates(&value));
        let (_, again) = client
            .post(&admin.key, DELETE, json!({"input": {"key_id": id}}))
            .await;
        assert_eq!(again["errors"][0]["message"], "API key not found");
        assert!(again["data"]["delete_api_key"].is_null());
        let (status, _) = client.post(&value, LIST, json!({})).await;
        assert_eq!(status, 401);
    }

    #[tokio::test]
    async fn inline_literals_as_the_seed_writes_them() {
        let (emulator, client, admin, sa) = setup().await;
        let query = format!(
            "mutation {{ create_api_key(input: {{ user_id: \"{sa}\", name: \"my-api-key\" }}) {{ token }} }}"
        );
        let (_, body) = client.post(&admin.key, &query, json!({})).await;
        assert!(
            body["data"]["create_api_key"]["token"].is_string(),
            "{body}"
        );
        assert_eq!(emulator.live_service_account_keys().len(), 1);
    }

    #[tokio::test]
    async fn unknown_fields_arguments_and_variables_are_refused() {
        let (emulator, client, admin, sa) = setup().await;
        let cases = [
            (
                "mutation($input: create_api_key_input!) { create_api_key(input: $input) { secret } }".to_owned(),
                json!({"input": {"user_id": sa, "name": "x"}}),
                "Cannot query field \"secret\" on type \"create_api_key_payload\".",
            ),
            (
                "mutation($input: create_api_key_input!) { create_api_key(input: $input, scope: RUNNER) { key } }".to_owned(),
                json!({"input": {"user_id": sa, "name": "x"}}),
                "Unknown argument \"scope\" on field \"create_api_key\" of type \"Mutation\".",
            ),
            (
                CREATE.to_owned(),
                json!({"input": {"user_id": sa, "name": "x", "scope": "RUNNER"}}),
                "Field \"scope\" is not defined by type \"create_api_key_input\".",
            ),
            (
                CREATE.to_owned(),
                json!({}),
                "Variable \"$input\" of required type \"create_api_key_input!\" was not provided.",
            ),
            (
                "mutation { create_api_key(input: $input) { key } }".to_owned(),
                json!({"input": {}}),
                "Variable \"$input\" is not defined.",
            ),
            (
                "query { auth_api_keys { id } }".to_owned(),
                json!({}),
                "Cannot query field \"auth_api_keys\" on type \"Query\".",
            ),
            (
                "mutation { create_api_key(input: {user_id: \"x\", name: \"n\"}) { key ".to_owned(),
                json!({}),
                "Syntax Error: Unexpected <EOF>.",
            ),
        ];
        for (query, variables, expected) in cases {
            let (status, body) = client.post(&admin.key, &query, variables).await;
            assert_eq!(status, 200);
            assert_eq!(body["errors"][0]["message"], expected, "{query}");
            assert!(body.get("data").is_none(), "{body}");
        }
        assert_eq!(emulator.keys().len(), 1, "only the admin key exists");
    }

    #[tokio::test]
    async fn only_admins_create_service_account_keys_and_auth_is_required() {
        let (emulator, client, admin, sa) = setup().await;
        let (status, body) = client.post("nope", LIST, json!({})).await;
        assert_eq!(
            (status, body["errors"][0]["extensions"]["code"].as_str()),
            (401, Some("UNAUTHENTICATED"))
        );
        let (_, body) = client
            .post(&admin.key, CREATE, json!({"input": {"user_id": sa, "name": "k", "expires_at": "2001-01-01T00:00:00Z"}}))
            .await;
        assert_eq!(
            body["errors"][0]["message"],
            "expires_at must be in the future"
        );
        let (_, body) = client
            .post(
                &admin.key,
                CREATE,
                json!({"input": {"user_id": sa, "name": "k"}}),
            )
            .await;
        let sa_key = body["data"]["create_api_key"]["key"]
            .as_str()
            .unwrap()
            .to_owned();
        let other = emulator.add_service_account();
        let (_, body) = client
            .post(
                &sa_key,
                CREATE,
                json!({"input": {"user_id": other, "name": "k"}}),
            )
            .await;
        assert!(
            body["errors"][0]["message"]
                .as_str()
                .unwrap()
                .starts_with("Unauthorized"),
            "{body}"
        );
        assert!(emulator.key(&emulator.keys()[0].id).is_some());
    }

    #[tokio::test]
    async fn faults_are_served_in_front_of_graphql() {
        let (emulator, client, admin, _) = setup().await;
        emulator.faults().inject(
            crate::Fault::TooManyRequests {
                retry_after: Some(1),
            },
            1,
            None,
        );
        let (status, _) = client.post(&admin.key, LIST, json!({})).await;
        assert_eq!(status, 429);
        let (status, _) = client.post(&admin.key, LIST, json!({})).await;
        assert_eq!(status, 200);
        assert_eq!(emulator.faults().count("POST", "/"), 2);
    }
}
