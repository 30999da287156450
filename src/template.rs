//! The `{{ }}` templates of Secret templates and `http` provider requests.
//!
//! Two forms of placeholder:
//! - `{{ name }}` inserts the variable as text, escaped for where it lands: as is in
//!   Secret data, labels, annotations and request headers; percent-encoded in a
//!   request URL; as JSON string content (quotes, backslashes and control characters
//!   escaped, no surrounding quotes) in a JSON body or GraphQL variable — so
//!   `"name": "{{ description }}"` is always one JSON string, whatever the text holds.
//! - `{{ json name }}` inserts the variable as a JSON literal: a quoted string, a
//!   number, `true` / `false`, a list, or `null` when the value is absent (a key that
//!   does not expire has `expiresAt: null`).
//!
//! A template is parsed once, against the variables its place offers: an unknown
//! variable or an unclosed `{{` is an error naming the field, found before anything is
//! issued. Error messages name variables, never their values.

use std::fmt;

/// A variable's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Text(String),
    Number(i64),
    Bool(bool),
    List(Vec<String>),
    /// Absent: empty as text, `null` as JSON.
    Null,
}

impl Value {
    fn text(&self) -> String {
        match self {
            Value::Text(t) => t.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::List(l) => l.join(","),
            Value::Null => String::new(),
        }
    }

    fn json(&self) -> String {
        match self {
            Value::Text(t) => serde_json::Value::from(t.as_str()).to_string(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::List(l) => serde_json::Value::from(l.clone()).to_string(),
            Value::Null => "null".to_owned(),
        }
    }
}

/// How `{{ name }}` text is escaped where the template is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Escape {
    /// As is (Secret data, labels, annotations, headers).
    None,
    /// Percent-encoded, everything but RFC 3986 unreserved characters (URLs).
    Url,
    /// JSON string content (JSON bodies, GraphQL variables).
    JsonString,
}

/// What went wrong in a template, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateError {
    /// The field holding the template, e.g. `secret.template.data.config.toml`.
    pub field: String,
    pub problem: Problem,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// `variable` is not offered here; `known` lists what is.
    UnknownVariable { variable: String, known: String },
    /// `{{` without `}}`.
    Unclosed,
    /// `{{ }}` with nothing, or more than `json name`.
    Malformed { inside: String },
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.problem {
            Problem::UnknownVariable { variable, known } => write!(
                f,
                "{}: unknown variable {{{{ {variable} }}}}; known: {known}",
                self.field
            ),
            Problem::Unclosed => write!(f, "{}: `{{{{` without a closing `}}}}`", self.field),
            Problem::Malformed { inside } => write!(
                f,
                "{}: `{{{{ {inside} }}}}` is not a placeholder; write {{{{ name }}}} or {{{{ json name }}}}",
                self.field
            ),
        }
    }
}

impl std::error::Error for TemplateError {}

/// The variables a place offers: exact names, plus prefixes such as `credentials.`.
pub struct Vocabulary<'a> {
    pub names: &'a [&'a str],
    pub prefixes: &'a [&'a str],
}

impl Vocabulary<'_> {
    fn knows(&self, name: &str) -> bool {
        self.names.contains(&name)
            || self
                .prefixes
                .iter()
                .any(|p| name.len() > p.len() && name.starts_with(p))
    }

    fn describe(&self) -> String {
        self.names
            .iter()
            .map(|n| (*n).to_owned())
            .chain(self.prefixes.iter().map(|p| format!("{p}<dataKey>")))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Variable { name: String, json: bool },
}

/// A parsed template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    field: String,
    parts: Vec<Part>,
}

impl Template {
    /// Parses `text`, refusing variables `vocabulary` does not offer.
    pub fn parse(field: &str, text: &str, vocabulary: &Vocabulary) -> Result<Self, TemplateError> {
        let error = |problem| TemplateError {
            field: field.to_owned(),
            problem,
        };
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Literal(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after.find("}}").ok_or_else(|| error(Problem::Unclosed))?;
            let inside = after[..end].trim();
            let words: Vec<&str> = inside.split_whitespace().collect();
            let (name, json) = match words.as_slice() {
                [name] => (*name, false),
                ["json", name] => (*name, true),
                _ => {
                    return Err(error(Problem::Malformed {
                        inside: inside.to_owned(),
                    }));
                }
            };
            if !vocabulary.knows(name) {
                return Err(error(Problem::UnknownVariable {
                    variable: name.to_owned(),
                    known: vocabulary.describe(),
                }));
            }
            parts.push(Part::Variable {
                name: name.to_owned(),
                json,
            });
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        Ok(Self {
            field: field.to_owned(),
            parts,
        })
    }

    /// The field the template came from, for messages.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// The variables the template uses.
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Variable { name, .. } => Some(name.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// Renders with `lookup` (a variable it does not know renders as absent).
    pub fn render(&self, escape: Escape, lookup: impl Fn(&str) -> Option<Value>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Variable { name, json } => {
                    let value = lookup(name).unwrap_or(Value::Null);
                    if *json {
                        out.push_str(&value.json());
                    } else {
                        out.push_str(&escaped(&value.text(), escape));
                    }
                }
            }
        }
        out
    }
}

impl Template {
    /// `text` escaped as `{{ name }}` would insert it.
    pub fn escape(text: &str, escape: Escape) -> String {
        escaped(text, escape)
    }
}

fn escaped(text: &str, escape: Escape) -> String {
    match escape {
        Escape::None => text.to_owned(),
        Escape::JsonString => {
            let quoted = serde_json::Value::from(text).to_string();
            quoted[1..quoted.len() - 1].to_owned()
        }
        Escape::Url => {
            let mut out = String::with_capacity(text.len());
            for b in text.bytes() {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                    out.push(b as char);
                } else {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOCABULARY: Vocabulary = Vocabulary {
        names: &["description", "expiresAt", "tags", "expirySeconds"],
        prefixes: &["credentials."],
    };

    fn lookup(name: &str) -> Option<Value> {
        match name {
            "description" => Some(Value::Text("a \"quoted\"\nline kw:1".into())),
            "expiresAt" => Some(Value::Null),
            "tags" => Some(Value::List(vec!["tag:a".into(), "tag:b".into()])),
            "expirySeconds" => Some(Value::Number(3600)),
            "credentials.token" => Some(Value::Text("t/o k".into())),
            _ => None,
        }
    }

    #[test]
    fn text_is_escaped_for_its_place_and_json_is_a_literal() {
        let body = Template::parse(
            "body",
            r#"{"name": "{{ description }}", "exp": {{ json expiresAt }}, "tags": {{json tags}}, "s": {{ expirySeconds }}}"#,
            &VOCABULARY,
        )
        .unwrap();
        let rendered = body.render(Escape::JsonString, lookup);
        let parsed: serde_json::Value = serde_json::from_str(&rendered).unwrap();
        assert_eq!(parsed["name"], "a \"quoted\"\nline kw:1");
        assert!(parsed["exp"].is_null());
        assert_eq!(parsed["tags"], serde_json::json!(["tag:a", "tag:b"]));
        assert_eq!(parsed["s"], 3600);

        let url =
            Template::parse("url", "http://x/keys/{{ credentials.token }}", &VOCABULARY).unwrap();
        assert_eq!(url.render(Escape::Url, lookup), "http://x/keys/t%2Fo%20k");
        let header = Template::parse("h", "Bearer {{credentials.token}}", &VOCABULARY).unwrap();
        assert_eq!(header.render(Escape::None, lookup), "Bearer t/o k");
        assert_eq!(
            header.variables().collect::<Vec<_>>(),
            vec!["credentials.token"]
        );
    }

    #[test]
    fn errors_name_the_field_and_the_variable() {
        let err = Template::parse("http.issue.url", "x{{ token }}", &VOCABULARY).unwrap_err();
        assert_eq!(
            err.to_string(),
            "http.issue.url: unknown variable {{ token }}; known: description, expiresAt, tags, expirySeconds, credentials.<dataKey>"
        );
        let err = Template::parse("f", "{{ description ", &VOCABULARY).unwrap_err();
        assert_eq!(err.problem, Problem::Unclosed);
        let err = Template::parse("f", "{{ }}", &VOCABULARY).unwrap_err();
        assert!(matches!(err.problem, Problem::Malformed { .. }), "{err}");
        let err = Template::parse("f", "{{ credentials. }}", &VOCABULARY).unwrap_err();
        assert!(matches!(err.problem, Problem::UnknownVariable { .. }));
    }
}
