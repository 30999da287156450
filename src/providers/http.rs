//! The `http` provider: any key API described as requests in the provider resource
//! rather than coded — REST or GraphQL.
//!
//! Everything is checked when the provider is built (each reconcile, and by the
//! provider status controller): templates parse against the variables their request
//! offers, `credentials.<dataKey>` names a data key the credential Secret has, JSON
//! bodies render to JSON, JSONPath expressions parse. A mistake is a
//! [`ProviderError::Misconfigured`] naming the field, so nothing is issued through a
//! provider that cannot finish the job.
//!
//! Every request goes through the provider's shared [`super::Transport`] (request
//! budget, `Retry-After`, retries). No credential value reaches an error message:
//! messages name fields, and upstream messages are scrubbed of credential values.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use jiff::Timestamp;
use jsonpath_rust::{
    parser::{model::JpQuery, parse_json_path},
    query::js_path_process,
};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use serde_json::Value as Json;

use super::{
    Capabilities, IssueRequest, IssuedKey, KeyApi, KeyState, MarkedKey, ProviderError, Refusal,
    ResolvedProvider, SecretValue, Shared, marker_in,
};
use crate::{
    resources::{HttpMethod, HttpOperation, HttpProvider, ResponseFields},
    template::{Escape, Template, Value, Vocabulary},
};

/// Variables of the issue request.
const ISSUE_VARIABLES: &[&str] = &[
    "marker",
    "description",
    "expirySeconds",
    "expiresAt",
    "serviceAccount",
    "role",
    "scopes",
    "tags",
    "reusable",
    "ephemeral",
    "preauthorized",
];
/// Variables of the revoke and inspect requests.
const KEY_VARIABLES: &[&str] = &["keyId"];
/// Variables of the list request.
const LIST_VARIABLES: &[&str] = &["marker"];
const CREDENTIALS: &str = "credentials.";

/// A JSONPath expression, parsed, with the field it came from.
struct Path {
    field: String,
    source: String,
    query: JpQuery,
}

impl Path {
    fn parse(field: String, source: &str) -> Result<Self, ProviderError> {
        let query = parse_json_path(source).map_err(|e| {
            ProviderError::Misconfigured(format!("{field}: {source:?} is not a JSONPath: {e}"))
        })?;
        Ok(Self {
            field,
            source: source.to_owned(),
            query,
        })
    }

    /// The first match that is not `null`.
    fn first<'a>(&self, root: &'a Json) -> Option<&'a Json> {
        js_path_process(&self.query, root)
            .ok()?
            .into_iter()
            .map(|r| r.val)
            .find(|v| !v.is_null())
    }
}

#[derive(Default)]
struct Fields {
    id: Option<Path>,
    value: Option<Path>,
    expires_at: Option<Path>,
    valid: Option<Path>,
    items: Option<Path>,
    description: Option<Path>,
    gone: Option<Path>,
}

enum Body {
    None,
    Json(Template),
    GraphQl {
        query: String,
        variables: Vec<(String, Template)>,
    },
}

struct Operation {
    name: &'static str,
    method: reqwest::Method,
    url: Template,
    headers: Vec<(HeaderName, Template)>,
    body: Body,
    success: Vec<u16>,
    gone: Vec<u16>,
    fields: Fields,
}

impl Operation {
    fn field(&self, rest: &str) -> String {
        format!("http.{}.{rest}", self.name)
    }

    fn templates(&self) -> Vec<&Template> {
        let mut all = vec![&self.url];
        all.extend(self.headers.iter().map(|(_, t)| t));
        match &self.body {
            Body::None => {}
            Body::Json(t) => all.push(t),
            Body::GraphQl { variables, .. } => all.extend(variables.iter().map(|(_, t)| t)),
        }
        all
    }
}

/// What an answer meant.
enum Answer {
    /// Success, with the parsed body (`Null` when empty).
    Done(Json),
    /// The key is already gone (a gone code, or `response.gone` matched).
    Gone,
}

pub struct Http {
    display: String,
    shared: Arc<Shared>,
    /// The credential values templates use, by data key.
    credentials: BTreeMap<String, SecretValue>,
    issue: Operation,
    revoke: Option<Operation>,
    inspect: Option<Operation>,
    list: Option<Operation>,
    max_lifetime: Option<Duration>,
}

impl Http {
    /// Checks the whole configuration; any mistake names its field.
    pub fn new(
        spec: &HttpProvider,
        provider: &ResolvedProvider,
        shared: Arc<Shared>,
    ) -> Result<Self, ProviderError> {
        let display = provider.display.clone();
        let misconfigured = |e: ProviderError| match e {
            ProviderError::Misconfigured(m) => {
                ProviderError::Misconfigured(format!("{display}: {m}"))
            }
            other => other,
        };
        let build = |name, op: &HttpOperation, names: &[&str]| {
            operation(name, op, names).map_err(misconfigured)
        };
        let issue = build("issue", &spec.issue, ISSUE_VARIABLES)?;
        let revoke = spec
            .revoke
            .as_ref()
            .map(|op| build("revoke", op, KEY_VARIABLES))
            .transpose()?;
        let inspect = spec
            .inspect
            .as_ref()
            .map(|op| build("inspect", op, KEY_VARIABLES))
            .transpose()?;
        let list = spec
            .list
            .as_ref()
            .map(|op| build("list", op, LIST_VARIABLES))
            .transpose()?;

        let require = |op: &Operation, present: bool, what: &str, why: &str| {
            if present {
                Ok(())
            } else {
                Err(ProviderError::Misconfigured(format!(
                    "{display}: {} is required: {why}",
                    op.field(&format!("response.{what}"))
                )))
            }
        };
        require(
            &issue,
            issue.fields.id.is_some(),
            "id",
            "where the key id is",
        )?;
        require(
            &issue,
            issue.fields.value.is_some(),
            "value",
            "where the key value is",
        )?;
        if let Some(list) = &list {
            let f = &list.fields;
            require(
                list,
                f.items.is_some(),
                "items",
                "where the array of keys is",
            )?;
            require(list, f.id.is_some(), "id", "where each key's id is")?;
            require(
                list,
                f.description.is_some(),
                "description",
                "where each key's marker-carrying name or description is",
            )?;
        }
        if let Some(inspect) = &inspect
            && inspect.fields.items.is_some()
        {
            require(
                inspect,
                inspect.fields.id.is_some(),
                "id",
                "where each listed key's id is, to find the inspected key",
            )?;
        }

        // Every credential a template names must be in the Secret, as text.
        let mut credentials = BTreeMap::new();
        let operations = [
            Some(&issue),
            revoke.as_ref(),
            inspect.as_ref(),
            list.as_ref(),
        ];
        for op in operations.into_iter().flatten() {
            for template in op.templates() {
                for variable in template.variables() {
                    let Some(data_key) = variable.strip_prefix(CREDENTIALS) else {
                        continue;
                    };
                    let Some(secret) = &spec.credentials_secret_ref else {
                        return Err(ProviderError::Misconfigured(format!(
                            "{display}: {}: uses {{{{ {variable} }}}} but http.credentialsSecretRef is not set",
                            template.field()
                        )));
                    };
                    let bytes = provider.credentials.get(data_key).ok_or_else(|| {
                        ProviderError::Misconfigured(format!(
                            "{display}: {}: {{{{ {variable} }}}} names data key {data_key}, which Secret {} does not have",
                            template.field(),
                            secret.name
                        ))
                    })?;
                    let text = String::from_utf8(bytes.clone()).map_err(|_| {
                        ProviderError::Misconfigured(format!(
                            "{display}: data key {data_key} of Secret {} is not UTF-8 text",
                            secret.name
                        ))
                    })?;
                    credentials.insert(data_key.to_owned(), SecretValue::new(text));
                }
            }
        }

        Ok(Self {
            display,
            shared,
            credentials,
            issue,
            revoke,
            inspect,
            list,
            max_lifetime: spec.max_expiry.as_ref().and_then(|d| d.to_std()),
        })
    }

    /// Removes credential values from text that goes into an error message.
    fn redact(&self, text: String) -> String {
        self.credentials
            .values()
            .filter(|v| v.expose().len() >= 4)
            .fold(text, |t, v| {
                // As is, and as a URL or a JSON string (an upstream echoing a request
                // body) carries it.
                [Escape::Url, Escape::JsonString]
                    .into_iter()
                    .fold(t.replace(v.expose(), "<redacted>"), |t, escape| {
                        t.replace(&Template::escape(v.expose(), escape), "<redacted>")
                    })
            })
    }

    fn redact_error(&self, e: ProviderError) -> ProviderError {
        match e {
            ProviderError::Refused { reason, message } => ProviderError::Refused {
                reason,
                message: self.redact(message),
            },
            ProviderError::Unavailable(m) => ProviderError::Unavailable(self.redact(m)),
            ProviderError::Misconfigured(m) => ProviderError::Misconfigured(self.redact(m)),
        }
    }

    fn lookup<'a>(
        &'a self,
        vars: &'a (dyn Fn(&str) -> Option<Value> + Sync),
    ) -> impl Fn(&str) -> Option<Value> + 'a {
        move |name: &str| match name.strip_prefix(CREDENTIALS) {
            Some(key) => self
                .credentials
                .get(key)
                .map(|v| Value::Text(v.expose().to_owned())),
            None => vars(name),
        }
    }

    /// Renders and sends one request, and says what the answer meant.
    async fn call(
        &self,
        op: &Operation,
        vars: &(dyn Fn(&str) -> Option<Value> + Sync),
    ) -> Result<Answer, ProviderError> {
        let lookup = self.lookup(vars);
        let url = op.url.render(Escape::Url, &lookup);
        let url = reqwest::Url::parse(&url).map_err(|_| {
            ProviderError::Misconfigured(format!(
                "{}: {} does not render to a valid URL",
                self.display,
                op.field("url")
            ))
        })?;
        let mut headers = HeaderMap::new();
        for (name, template) in &op.headers {
            let mut value = HeaderValue::from_str(&template.render(Escape::None, &lookup))
                .map_err(|_| {
                    ProviderError::Misconfigured(format!(
                        "{}: {} does not render to a valid header value",
                        self.display,
                        template.field()
                    ))
                })?;
            // Like reqwest's own bearer/basic auth: kept out of Debug output and of
            // HTTP/2 header compression tables.
            value.set_sensitive(template.variables().any(|v| v.starts_with(CREDENTIALS)));
            headers.insert(name.clone(), value);
        }
        let body = match &op.body {
            Body::None => None,
            Body::Json(template) => {
                let text = template.render(Escape::JsonString, &lookup);
                json_check(template.field(), &text)
                    .map_err(|m| ProviderError::Misconfigured(format!("{}: {m}", self.display)))?;
                Some(text)
            }
            Body::GraphQl { query, variables } => {
                let mut rendered = serde_json::Map::new();
                for (name, template) in variables {
                    let text = template.render(Escape::JsonString, &lookup);
                    let value = json_check(template.field(), &text).map_err(|m| {
                        ProviderError::Misconfigured(format!("{}: {m}", self.display))
                    })?;
                    rendered.insert(name.clone(), value);
                }
                Some(serde_json::json!({"query": query, "variables": rendered}).to_string())
            }
        };
        if body.is_some() && !headers.contains_key(CONTENT_TYPE) {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        let build = |client: &reqwest::Client| {
            let request = client
                .request(op.method.clone(), url.clone())
                .headers(headers.clone());
            match &body {
                Some(b) => request.body(b.clone()),
                None => request,
            }
        };
        // Inspecting and listing change nothing, whatever the method (a GraphQL query
        // is a POST): they may go again after a 5xx. Issue and revoke follow the method.
        let transport = &self.shared.transport;
        let sent = if matches!(op.name, "inspect" | "list") {
            transport.send_query(op.name, build).await
        } else {
            transport.send(op.name, build).await
        };
        let reply = sent.map_err(|e| self.redact_error(e))?;

        let status = reply.status;
        if op.gone.contains(&status) {
            return Ok(Answer::Gone);
        }
        let success = if op.success.is_empty() {
            reply.is_success()
        } else {
            op.success.contains(&status)
        };
        let parsed = if reply.body.iter().all(u8::is_ascii_whitespace) {
            Ok(Json::Null)
        } else {
            reply.json::<Json>(&format!("{} {}", self.display, op.field("request")))
        };
        if let Ok(json) = &parsed {
            if let Some(gone) = &op.fields.gone
                && gone.first(json).is_some_and(|v| v != &Json::Bool(false))
            {
                return Ok(Answer::Gone);
            }
            // GraphQL reports failures in the body, usually with HTTP 200.
            let graphql_error = matches!(op.body, Body::GraphQl { .. })
                .then(|| json.get("errors"))
                .flatten()
                .and_then(Json::as_array)
                .filter(|e| !e.is_empty())
                .map(|e| {
                    e[0].get("message")
                        .and_then(Json::as_str)
                        .unwrap_or("(no message)")
                        .chars()
                        .take(300)
                        .collect::<String>()
                });
            if let Some(message) = graphql_error {
                return Err(self.refused(op, status, &format!("GraphQL error: {message}")));
            }
        }
        if !success {
            return Err(self.refused(op, status, &reply.message()));
        }
        match parsed {
            Ok(json) => Ok(Answer::Done(json)),
            Err(e) if op.fields_needed() => Err(self.redact_error(e)),
            Err(_) => Ok(Answer::Done(Json::Null)),
        }
    }

    fn refused(&self, op: &Operation, status: u16, message: &str) -> ProviderError {
        let reason = match status {
            401 | 403 => "CredentialsInvalid",
            400..=499 | 200..=299 => "UpstreamRefused",
            _ => {
                return ProviderError::Unavailable(self.redact(format!(
                    "{}: {} answered HTTP {status}: {message}",
                    self.display,
                    op.field("request")
                )));
            }
        };
        ProviderError::Refused {
            reason,
            message: self.redact(format!(
                "{}: the upstream refused {} (HTTP {status}): {message}",
                self.display,
                op.field("request")
            )),
        }
    }

    /// The first non-null match of a configured path, or an error naming the field.
    fn extract<'a>(&self, path: &Path, root: &'a Json) -> Result<&'a Json, ProviderError> {
        path.first(root).ok_or_else(|| ProviderError::Refused {
            reason: "UnexpectedResponse",
            message: format!(
                "{}: {} ({}) matched nothing in the response",
                self.display, path.field, path.source
            ),
        })
    }

    fn extract_text(&self, path: &Path, root: &Json) -> Result<String, ProviderError> {
        match self.extract(path, root)? {
            Json::String(s) if !s.is_empty() => Ok(s.clone()),
            Json::Number(n) => Ok(n.to_string()),
            _ => Err(ProviderError::Refused {
                reason: "UnexpectedResponse",
                message: format!(
                    "{}: {} ({}) matched something that is not a non-empty string or number",
                    self.display, path.field, path.source
                ),
            }),
        }
    }

    fn extract_time(&self, path: &Path, root: &Json) -> Result<Option<Timestamp>, ProviderError> {
        match path.first(root) {
            None => Ok(None),
            Some(Json::String(s)) => {
                s.parse::<Timestamp>()
                    .map(Some)
                    .map_err(|_| ProviderError::Refused {
                        reason: "UnexpectedResponse",
                        message: format!(
                            "{}: {} ({}) is not an RFC 3339 time",
                            self.display, path.field, path.source
                        ),
                    })
            }
            Some(_) => Err(ProviderError::Refused {
                reason: "UnexpectedResponse",
                message: format!(
                    "{}: {} ({}) is not an RFC 3339 time string",
                    self.display, path.field, path.source
                ),
            }),
        }
    }

    /// The state of one key from an inspect answer (`root` is the whole answer, or
    /// the key's item of a listing).
    fn state_of(&self, fields: &Fields, root: &Json) -> Result<KeyState, ProviderError> {
        if let Some(valid) = &fields.valid {
            match valid.first(root) {
                Some(Json::Bool(true)) => {}
                Some(Json::Bool(false)) => return Ok(KeyState::Revoked),
                _ => {
                    return Err(ProviderError::Refused {
                        reason: "UnexpectedResponse",
                        message: format!(
                            "{}: {} ({}) did not match a boolean",
                            self.display, valid.field, valid.source
                        ),
                    });
                }
            }
        }
        if let Some(expires) = &fields.expires_at
            && let Some(at) = self.extract_time(expires, root)?
            && at <= Timestamp::now()
        {
            return Ok(KeyState::Expired);
        }
        Ok(KeyState::Valid)
    }
}

impl Operation {
    fn fields_needed(&self) -> bool {
        let f = &self.fields;
        f.id.is_some() || f.value.is_some() || f.items.is_some() || f.valid.is_some()
    }
}

/// Parses a rendered JSON body; the message never echoes the text.
fn json_check(field: &str, text: &str) -> Result<Json, String> {
    serde_json::from_str(text).map_err(|e| {
        format!(
            "{field} does not render to one JSON value ({} at line {} column {}); quote text placeholders (\"{{{{ name }}}}\") or use {{{{ json name }}}}",
            match e.classify() {
                serde_json::error::Category::Eof => "truncated",
                _ => "not valid JSON",
            },
            e.line(),
            e.column()
        )
    })
}

/// Parses one request of the spec against the variables it offers.
fn operation(
    name: &'static str,
    spec: &HttpOperation,
    names: &[&str],
) -> Result<Operation, ProviderError> {
    let vocabulary = Vocabulary {
        names,
        prefixes: &[CREDENTIALS],
    };
    let field = |rest: &str| format!("http.{name}.{rest}");
    let template = |f: String, text: &str| {
        Template::parse(&f, text, &vocabulary)
            .map_err(|e| ProviderError::Misconfigured(e.to_string()))
    };
    let url = template(field("url"), &spec.url)?;
    let mut headers = Vec::new();
    for (header, value) in &spec.headers {
        let header_name = HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
            ProviderError::Misconfigured(format!(
                "{}: {header:?} is not a valid header name",
                field("headers")
            ))
        })?;
        headers.push((
            header_name,
            template(field(&format!("headers.{header}")), value)?,
        ));
    }
    let sample = |n: &str| {
        Some(match n {
            "expirySeconds" => Value::Number(3600),
            "scopes" | "tags" => Value::List(vec!["sample".into()]),
            "reusable" | "ephemeral" | "preauthorized" => Value::Bool(true),
            _ => Value::Text("sample".into()),
        })
    };
    let body = match (&spec.body, &spec.graphql) {
        (Some(_), Some(_)) => {
            return Err(ProviderError::Misconfigured(format!(
                "{}: set body or graphql, not both",
                field("body")
            )));
        }
        (Some(body), None) => {
            let t = template(field("body"), body)?;
            json_check(t.field(), &t.render(Escape::JsonString, sample))
                .map_err(ProviderError::Misconfigured)?;
            Body::Json(t)
        }
        (None, Some(graphql)) => {
            let mut variables = Vec::new();
            for (var, text) in &graphql.variables {
                let t = template(field(&format!("graphql.variables.{var}")), text)?;
                json_check(t.field(), &t.render(Escape::JsonString, sample))
                    .map_err(ProviderError::Misconfigured)?;
                variables.push((var.clone(), t));
            }
            Body::GraphQl {
                query: graphql.query.clone(),
                variables,
            }
        }
        (None, None) => Body::None,
    };
    let path = |what: &str, source: &Option<String>| {
        source
            .as_deref()
            .map(|s| Path::parse(field(&format!("response.{what}")), s))
            .transpose()
    };
    let ResponseFields {
        id,
        value,
        expires_at,
        valid,
        items,
        description,
        gone,
    } = &spec.response;
    let fields = Fields {
        id: path("id", id)?,
        value: path("value", value)?,
        expires_at: path("expiresAt", expires_at)?,
        valid: path("valid", valid)?,
        items: path("items", items)?,
        description: path("description", description)?,
        gone: path("gone", gone)?,
    };
    let method = match spec.method {
        HttpMethod::Get => reqwest::Method::GET,
        HttpMethod::Post => reqwest::Method::POST,
        HttpMethod::Put => reqwest::Method::PUT,
        HttpMethod::Patch => reqwest::Method::PATCH,
        HttpMethod::Delete => reqwest::Method::DELETE,
    };
    Ok(Operation {
        name,
        method,
        url,
        headers,
        body,
        success: spec.success_codes.clone(),
        // A 404 to an issue or list request is a failure, not "already gone".
        gone: if matches!(name, "issue" | "list") {
            spec.gone_codes.clone()
        } else if spec.gone_codes.is_empty() {
            vec![404]
        } else {
            spec.gone_codes.clone()
        },
        fields,
    })
}

/// `description` as sent upstream: the user's text, then the marker.
fn description(request: &IssueRequest) -> String {
    match request.description.as_deref().map(str::trim) {
        Some(d) if !d.is_empty() => format!("{d} {}", request.marker),
        _ => request.marker.clone(),
    }
}

#[async_trait]
impl KeyApi for Http {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_lifetime: self.max_lifetime,
            overlap: true,
            listing: self.list.is_some(),
            inspect: self.inspect.is_some(),
            ..Capabilities::default()
        }
    }

    fn check(&self, request: &IssueRequest) -> Result<(), Refusal> {
        if request.shape.create_service_account {
            return Err(Refusal {
                reason: "ServiceAccountCreationUnsupported",
                message: format!(
                    "{} (http) issues keys for existing principals only: set spec.serviceAccount.create to false",
                    self.display
                ),
            });
        }
        Ok(())
    }

    async fn issue(&self, request: &IssueRequest) -> Result<IssuedKey, ProviderError> {
        let created_at = Timestamp::now();
        let created_at = Timestamp::from_second(created_at.as_second()).unwrap_or(created_at);
        let requested_expiry = super::expires_after(created_at, request.lifetime)?;
        let shape = &request.shape;
        let description = description(request);
        let vars = |name: &str| {
            let text = |s: &Option<String>| s.clone().map_or(Value::Null, Value::Text);
            Some(match name {
                "marker" => Value::Text(request.marker.clone()),
                "description" => Value::Text(description.clone()),
                "expirySeconds" => request
                    .lifetime
                    .map_or(Value::Null, |l| Value::Number(l.as_secs() as i64)),
                "expiresAt" => requested_expiry.map_or(Value::Null, |t| Value::Text(t.to_string())),
                "serviceAccount" => text(&shape.service_account),
                "role" => text(&shape.role),
                "scopes" => Value::List(shape.scopes.clone()),
                "tags" => Value::List(shape.tags.iter().map(|t| t.0.clone()).collect()),
                "reusable" => Value::Bool(shape.reusable),
                "ephemeral" => Value::Bool(shape.ephemeral),
                "preauthorized" => Value::Bool(shape.preauthorized),
                _ => return None,
            })
        };
        let op = &self.issue;
        let json = match self.call(op, &vars).await? {
            Answer::Done(json) => json,
            Answer::Gone => {
                return Err(ProviderError::Refused {
                    reason: "UnexpectedResponse",
                    message: format!(
                        "{}: http.issue.response.gone matched the answer to an issue request",
                        self.display
                    ),
                });
            }
        };
        let f = &op.fields;
        let id = self.extract_text(f.id.as_ref().expect("checked in new"), &json)?;
        let extracted = self
            .extract_text(f.value.as_ref().expect("checked in new"), &json)
            .and_then(|value| {
                let expires_at = match &f.expires_at {
                    Some(path) => self.extract_time(path, &json)?.or(requested_expiry),
                    None => requested_expiry,
                };
                Ok((value, expires_at))
            });
        let (value, expires_at) = match extracted {
            Ok(v) => v,
            Err(e) => {
                // A key keyward cannot hand out (no usable value or expiry) must not
                // stay alive upstream.
                if let Err(revoke) = self.revoke(&id).await {
                    return Err(ProviderError::Refused {
                        reason: "UnexpectedResponse",
                        message: format!(
                            "{e}; revoking the key it created ({id}) failed too: {revoke}"
                        ),
                    });
                }
                return Err(e);
            }
        };
        Ok(IssuedKey {
            id,
            value: SecretValue::new(value),
            created_at,
            expires_at,
        })
    }

    async fn revoke(&self, key_id: &str) -> Result<(), ProviderError> {
        let Some(op) = &self.revoke else {
            // Nothing to call: the key is left to expire (documented).
            return Ok(());
        };
        let vars = |name: &str| (name == "keyId").then(|| Value::Text(key_id.to_owned()));
        match self.call(op, &vars).await? {
            Answer::Done(_) | Answer::Gone => Ok(()),
        }
    }

    async fn inspect(&self, key_id: &str) -> Result<KeyState, ProviderError> {
        let Some(op) = &self.inspect else {
            return Ok(KeyState::Unknown);
        };
        let vars = |name: &str| (name == "keyId").then(|| Value::Text(key_id.to_owned()));
        let json = match self.call(op, &vars).await? {
            Answer::Gone => return Ok(KeyState::Revoked),
            Answer::Done(json) => json,
        };
        let f = &op.fields;
        let Some(items) = &f.items else {
            return self.state_of(f, &json);
        };
        let id_path = f.id.as_ref().expect("checked in new");
        for item in list_items(self, items, &json)? {
            if id_path.first(item).is_some_and(|v| id_text(v) == key_id) {
                return self.state_of(f, item);
            }
        }
        Ok(KeyState::Revoked)
    }

    async fn find_by_marker(&self, marker: &str) -> Result<Vec<String>, ProviderError> {
        Ok(self
            .listed(marker)
            .await?
            .into_iter()
            .filter(|(_, description)| description.contains(marker))
            .map(|(id, _)| id)
            .collect())
    }

    /// With a list request: the listed keys whose description carries a marker. The
    /// request's `{{ marker }}` renders as `kw:`, the start of every marker, so an API
    /// that filters by it returns keyward's keys.
    async fn marked_keys(&self) -> Result<Vec<MarkedKey>, ProviderError> {
        Ok(self
            .listed("kw:")
            .await?
            .into_iter()
            .filter_map(|(id, description)| {
                Some(MarkedKey {
                    marker: marker_in(&description)?,
                    id,
                    created_at: None,
                })
            })
            .collect())
    }
}

impl Http {
    /// `(id, description)` of every key the list request answers with, `marker`
    /// rendered into it; empty without a list request.
    async fn listed(&self, marker: &str) -> Result<Vec<(String, String)>, ProviderError> {
        let Some(op) = &self.list else {
            return Ok(Vec::new());
        };
        let vars = |name: &str| (name == "marker").then(|| Value::Text(marker.to_owned()));
        let json = match self.call(op, &vars).await? {
            Answer::Gone => return Ok(Vec::new()),
            Answer::Done(json) => json,
        };
        let f = &op.fields;
        let (id_path, description_path) = (
            f.id.as_ref().expect("checked in new"),
            f.description.as_ref().expect("checked in new"),
        );
        let mut found = Vec::new();
        for item in list_items(self, f.items.as_ref().expect("checked in new"), &json)? {
            let description = description_path.first(item).and_then(Json::as_str);
            if let (Some(description), Some(id)) = (description, id_path.first(item)) {
                found.push((id_text(id), description.to_owned()));
            }
        }
        Ok(found)
    }
}

fn id_text(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The items `path` finds: one array (its elements), or each match.
fn list_items<'a>(
    http: &Http,
    path: &Path,
    root: &'a Json,
) -> Result<Vec<&'a Json>, ProviderError> {
    match path.first(root) {
        Some(Json::Array(items)) => Ok(items.iter().collect()),
        Some(_) => Ok(js_path_process(&path.query, root)
            .map(|r| r.into_iter().map(|r| r.val).collect())
            .unwrap_or_default()),
        None => Err(http.extract(path, root).expect_err("nothing matched")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        providers::{KeyShape, TokenCache, Transport},
        resources::{GraphQlBody, KeyProviderSpec, LocalSecretRef},
    };

    fn op(url: &str) -> HttpOperation {
        HttpOperation {
            method: HttpMethod::Post,
            url: url.into(),
            headers: BTreeMap::new(),
            body: None,
            graphql: None,
            success_codes: vec![],
            gone_codes: vec![],
            response: ResponseFields::default(),
        }
    }

    fn spec() -> HttpProvider {
        let mut issue = op("https://keys.example/keys");
        issue.headers.insert(
            "Authorization".into(),
            "Bearer {{ credentials.token }}".into(),
        );
        issue.body =
            Some(r#"{"name": "{{ description }}", "expires": {{ json expiresAt }}}"#.into());
        issue.response.id = Some("$.id".into());
        issue.response.value = Some("$.key".into());
        HttpProvider {
            credentials_secret_ref: Some(LocalSecretRef {
                name: "creds".into(),
            }),
            issue,
            revoke: None,
            inspect: None,
            list: None,
            max_expiry: None,
        }
    }

    fn build(http: HttpProvider) -> Result<Http, ProviderError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let provider = ResolvedProvider {
            id: "KeyProvider/ns/p".into(),
            display: "KeyProvider ns/p".into(),
            spec: KeyProviderSpec {
                builtin: None,
                tailscale: None,
                prefect: None,
                http: Some(http.clone()),
                policy: None,
                rate_limit: None,
            },
            credentials: BTreeMap::from([("token".into(), b"s3cr3t/token".to_vec())]),
        };
        let shared = Arc::new(Shared {
            transport: Transport::new("http", None),
            tokens: TokenCache::default(),
        });
        Http::new(&http, &provider, shared)
    }

    fn misconfigured(http: HttpProvider) -> String {
        match build(http) {
            Err(ProviderError::Misconfigured(m)) => m,
            Err(other) => panic!("not Misconfigured: {other}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn a_good_configuration_builds() {
        let http = build(spec()).unwrap();
        assert!(!http.capabilities().inspect && !http.capabilities().listing);
        assert_eq!(http.capabilities().max_lifetime, None);
        let mut s = spec();
        s.max_expiry = Some("48h".into());
        assert_eq!(
            build(s).unwrap().capabilities().max_lifetime,
            Some(Duration::from_secs(48 * 3600))
        );
    }

    #[test]
    fn mistakes_are_refused_naming_the_field_and_never_a_credential() {
        let mut s = spec();
        s.issue.response.value = Some("$.data[".into());
        let m = misconfigured(s);
        assert!(
            m.starts_with("KeyProvider ns/p: http.issue.response.value: "),
            "{m}"
        );

        let mut s = spec();
        s.issue.url = "https://x/{{ keyId }}".into();
        let m = misconfigured(s);
        assert!(
            m.contains("http.issue.url: unknown variable {{ keyId }}"),
            "{m}"
        );

        let mut s = spec();
        s.issue
            .headers
            .insert("X-Api".into(), "{{ credentials.missing }}".into());
        let m = misconfigured(s);
        assert!(
            m.contains(
                "http.issue.headers.X-Api: {{ credentials.missing }} names data key missing"
            ),
            "{m}"
        );

        let mut s = spec();
        s.issue.body = Some(r#"{"name": {{ description }}}"#.into());
        let m = misconfigured(s);
        assert!(
            m.contains("http.issue.body does not render to one JSON value"),
            "{m}"
        );

        let mut s = spec();
        s.revoke = Some(op("https://x/{{ keyId"));
        let m = misconfigured(s);
        assert!(
            m.contains("http.revoke.url: `{{` without a closing `}}`"),
            "{m}"
        );

        let mut s = spec();
        let mut list = op("https://x/keys");
        list.response.items = Some("$.keys".into());
        s.list = Some(list);
        let m = misconfigured(s);
        assert!(m.contains("http.list.response.id is required"), "{m}");

        let mut s = spec();
        let mut inspect = op("https://x/keys/{{ keyId }}");
        inspect.graphql = Some(GraphQlBody {
            query: "query { k }".into(),
            variables: BTreeMap::from([("id".into(), "{{ keyId }}".into())]),
        });
        s.inspect = Some(inspect);
        let m = misconfigured(s);
        assert!(
            m.contains("http.inspect.graphql.variables.id does not render"),
            "{m}"
        );
        assert!(!m.contains("s3cr3t"), "{m}");
    }

    #[test]
    fn upstream_messages_are_scrubbed_of_credentials() {
        let http = build(spec()).unwrap();
        let e = http.refused(&http.issue, 400, "token s3cr3t/token is not allowed");
        assert_eq!(
            http.redact("could not connect (https://u:s3cr3t%2Ftoken@x)".into()),
            "could not connect (https://u:<redacted>@x)"
        );
        assert_eq!(
            e.to_string(),
            "KeyProvider ns/p: the upstream refused http.issue.request (HTTP 400): token <redacted> is not allowed"
        );
    }

    #[test]
    fn service_account_creation_is_refused_before_issuing() {
        let http = build(spec()).unwrap();
        let request = IssueRequest {
            marker: "kw:1.2".into(),
            description: Some("agent".into()),
            lifetime: None,
            shape: KeyShape {
                create_service_account: true,
                ..Default::default()
            },
            previous: None,
            overlap: Duration::ZERO,
        };
        assert_eq!(
            http.check(&request).unwrap_err().reason,
            "ServiceAccountCreationUnsupported"
        );
        assert_eq!(description(&request), "agent kw:1.2");
    }

    /// A one-connection-per-request HTTP server answering `answers` in order and
    /// recording each request as `METHOD path\nheaders\n\nbody`.
    async fn serve(
        answers: Vec<(u16, &'static str)>,
    ) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            for (status, body) in answers {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = socket.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length: ")
                                    .map(|v| v.trim().parse::<usize>().unwrap())
                            })
                            .unwrap_or(0);
                        if rest.len() >= length || n == 0 {
                            log.lock().unwrap().push(format!("{head}\n\n{rest}"));
                            break;
                        }
                    }
                }
                let reply = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                socket.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        (base, seen)
    }

    /// `GET {base}/keys?q={{ marker }}`, items under `keys` with `id` and `name`.
    fn list_op(base: &str) -> HttpOperation {
        let mut list = op(&format!("{base}/keys?q={{{{ marker }}}}"));
        list.method = HttpMethod::Get;
        list.response.items = Some("$.keys".into());
        list.response.id = Some("$.id".into());
        list.response.description = Some("$.name".into());
        list
    }

    #[tokio::test]
    async fn a_rest_api_end_to_end() {
        let (base, seen) = serve(vec![
            (
                201,
                r#"{"key": {"id": 7, "secret": "v-1", "expires": "2030-01-01T00:00:00Z"}}"#,
            ),
            (404, r#"{"message": "no such key"}"#),
            (200, r#"{"state": {"active": false}}"#),
            (200, r#"{"errors": ["not graphql"], "keys": []}"#),
            (403, r#"{"message": "token s3cr3t/token may not revoke"}"#),
        ])
        .await;
        let mut s = spec();
        s.issue.url = format!("{base}/teams/{{{{ serviceAccount }}}}/keys");
        s.issue.success_codes = vec![201];
        s.issue.response = ResponseFields {
            id: Some("$.key.id".into()),
            value: Some("$.key.secret".into()),
            expires_at: Some("$.key.expires".into()),
            ..Default::default()
        };
        let mut revoke = op(&format!("{base}/keys/{{{{ keyId }}}}"));
        revoke.method = HttpMethod::Delete;
        s.revoke = Some(revoke);
        let mut inspect = op(&format!("{base}/keys/{{{{ keyId }}}}"));
        inspect.method = HttpMethod::Get;
        inspect.response.valid = Some("$.state.active".into());
        s.inspect = Some(inspect);
        s.list = Some(list_op(&base));
        let http = build(s).unwrap();

        let request = IssueRequest {
            marker: "kw:1.2".into(),
            description: Some("say \"hi\"".into()),
            lifetime: Some(Duration::from_secs(60)),
            shape: KeyShape {
                service_account: Some("a b/c".into()),
                ..Default::default()
            },
            previous: None,
            overlap: Duration::ZERO,
        };
        let issued = http.issue(&request).await.unwrap();
        assert_eq!((issued.id.as_str(), issued.value.expose()), ("7", "v-1"));
        assert_eq!(
            issued.expires_at.unwrap().to_string(),
            "2030-01-01T00:00:00Z"
        );
        // Gone (404) on revoke is success; valid=false is Revoked; a REST body's
        // `errors` is not a GraphQL failure; 403 refuses without the credential.
        http.revoke("7").await.unwrap();
        assert_eq!(http.inspect("7").await.unwrap(), KeyState::Revoked);
        assert!(http.find_by_marker("kw:1.2").await.unwrap().is_empty());
        let refused = http.revoke("7").await.unwrap_err();
        assert!(matches!(
            refused,
            ProviderError::Refused {
                reason: "CredentialsInvalid",
                ..
            }
        ));
        assert!(
            refused
                .to_string()
                .contains("token <redacted> may not revoke"),
            "{refused}"
        );

        let seen = seen.lock().unwrap().clone();
        assert!(
            seen[0].starts_with("POST /teams/a%20b%2Fc/keys "),
            "{}",
            seen[0]
        );
        assert!(
            seen[0]
                .to_ascii_lowercase()
                .contains("authorization: bearer s3cr3t/token")
        );
        let body: Json = serde_json::from_str(seen[0].split_once("\n\n").unwrap().1).unwrap();
        assert_eq!(body["name"], "say \"hi\" kw:1.2");
        assert!(body["expires"].as_str().unwrap().ends_with('Z'));
        assert!(seen[1].starts_with("DELETE /keys/7 "));
        assert!(seen[2].starts_with("GET /keys/7 "));
        assert!(seen[3].starts_with("GET /keys?q=kw%3A1.2 "), "{}", seen[3]);
    }

    #[test]
    fn inspect_states_come_from_valid_and_expiry() {
        let mut s = spec();
        let mut inspect = op("https://x/keys/{{ keyId }}");
        inspect.response.valid = Some("$.active".into());
        inspect.response.expires_at = Some("$.expires".into());
        s.inspect = Some(inspect);
        let http = build(s).unwrap();
        let f = &http.inspect.as_ref().unwrap().fields;
        let state = |j: Json| http.state_of(f, &j).unwrap();
        assert_eq!(state(serde_json::json!({"active": true})), KeyState::Valid);
        assert_eq!(
            state(serde_json::json!({"active": false})),
            KeyState::Revoked
        );
        assert_eq!(
            state(serde_json::json!({"active": true, "expires": "2001-01-01T00:00:00Z"})),
            KeyState::Expired
        );
    }

    #[tokio::test]
    async fn marked_keys_are_the_listed_keys_that_carry_a_marker() {
        let (base, seen) = serve(vec![(
            200,
            r#"{"keys": [
                {"id": 1, "name": "agent kw:0123abcd.89ef4567"},
                {"id": 2, "name": "made by hand"},
                {"id": "k3", "name": "worker kw-11112222-33334444"},
                {"id": 4}
            ]}"#,
        )])
        .await;
        let mut s = spec();
        s.list = Some(list_op(&base));
        let marked = build(s).unwrap().marked_keys().await.unwrap();
        let found: Vec<(&str, &str)> = marked
            .iter()
            .map(|m| (m.id.as_str(), m.marker.as_str()))
            .collect();
        assert_eq!(
            found,
            vec![
                ("1", "kw:0123abcd.89ef4567"),
                ("k3", "kw:11112222.33334444")
            ]
        );
        let seen = seen.lock().unwrap().clone();
        assert!(seen[0].starts_with("GET /keys?q=kw%3A "), "{}", seen[0]);
        assert!(
            build(spec())
                .unwrap()
                .marked_keys()
                .await
                .unwrap()
                .is_empty(),
            "no list request, nothing to list"
        );
    }
}
