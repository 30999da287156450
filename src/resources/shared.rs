//! Field types shared by several resources: durations, tags, Secret references.

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// A Go-style duration such as `720h`, `90m`, `1h30m` or `45s`.
///
/// Go's syntax (hours, minutes, seconds) because the API server's CEL `duration()`
/// understands it, so cross-field rules like "renewBefore shorter than expiry" are
/// checked at admission. Days are spelled in hours (`2160h` = 90 days), as in
/// cert-manager. Those rules first check that the value is one `duration()` can read
/// (`^([0-9]+[hms])+$`): the API server evaluates CEL rules even when a field failed
/// its pattern, and a malformed value would otherwise add a "type conversion error"
/// to the pattern's clear message.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(transparent)]
pub struct KeyDuration(pub String);

/// The admission pattern of [`KeyDuration`]: at least one of hours, minutes, seconds,
/// in that order.
pub const DURATION_PATTERN: &str = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$";

impl JsonSchema for KeyDuration {
    fn schema_name() -> Cow<'static, str> {
        "KeyDuration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A duration in hours, minutes and seconds, e.g. 720h, 90m, 1h30m, 45s (days are written in hours: 2160h = 90 days).",
            "pattern": DURATION_PATTERN,
            "minLength": 2,
            "maxLength": 32,
        })
    }

    fn inline_schema() -> bool {
        true
    }
}

impl KeyDuration {
    /// Parses the duration; `None` when it does not follow [`DURATION_PATTERN`].
    pub fn to_std(&self) -> Option<std::time::Duration> {
        parse_duration(&self.0)
    }
}

impl From<&str> for KeyDuration {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// Parses `1h30m`-style durations (hours, minutes, seconds, in that order).
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    if s.is_empty() {
        return None;
    }
    let mut total: u64 = 0;
    let mut number = String::new();
    let mut last_unit = 0; // 3 = h, 2 = m, 1 = s: units must descend
    for c in s.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let (rank, seconds) = match c {
            'h' => (3, 3600),
            'm' => (2, 60),
            's' => (1, 1),
            _ => return None,
        };
        if number.is_empty() || (last_unit != 0 && rank >= last_unit) {
            return None;
        }
        let n: u64 = number.parse().ok()?;
        total = total.checked_add(n.checked_mul(seconds)?)?;
        number.clear();
        last_unit = rank;
    }
    number
        .is_empty()
        .then_some(std::time::Duration::from_secs(total))
}

/// A Tailscale-style ACL tag, `tag:name`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(transparent)]
pub struct Tag(pub String);

/// The admission pattern of [`Tag`], as Tailscale accepts tag names.
pub const TAG_PATTERN: &str = r"^tag:[a-zA-Z][a-zA-Z0-9-]*$";

impl JsonSchema for Tag {
    fn schema_name() -> Cow<'static, str> {
        "Tag".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "An ACL tag: `tag:` followed by a letter, then letters, digits or dashes (e.g. tag:edge).",
            "pattern": TAG_PATTERN,
            "maxLength": 128,
        })
    }

    fn inline_schema() -> bool {
        true
    }
}

/// One data key of a Secret. Deliberately without a namespace: a `KeyProvider` reads
/// only from its own namespace and a `ClusterKeyProvider` only from the operator's,
/// so a reference can never reach into another team's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Data key inside the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// A whole Secret, by name (same namespace rule as [`SecretKeyRef`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct LocalSecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn parses_go_style_durations() {
        assert_eq!(
            parse_duration("720h"),
            Some(Duration::from_secs(720 * 3600))
        );
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("45s"), Some(Duration::from_secs(45)));
        assert_eq!(parse_duration("1h2m3s"), Some(Duration::from_secs(3723)));
    }

    #[test]
    fn refuses_what_the_schema_refuses() {
        for bad in ["", "h", "10", "10d", "1m1h", "1h1h", "-1h", "1.5h"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
