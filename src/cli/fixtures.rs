//! Small constructors for the verbs' tests: a key, a condition, a time.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::keys::{Key, KeyKind};
use crate::resources::{KeyStatus, ProviderKind, ProviderRef};

pub fn time(s: &str) -> Time {
    Time(s.parse().expect("an RFC 3339 time"))
}

/// A condition that changed at 2026-01-01T00:00:00Z.
pub fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: time("2026-01-01T00:00:00Z"),
        observed_generation: Some(1),
    }
}

/// AuthKey `team/<name>` from KeyProvider `keys`, writing Secret `<name>`.
pub fn key(name: &str, status: KeyStatus) -> Key {
    Key {
        kind: KeyKind::AuthKey,
        namespace: "team".into(),
        name: name.into(),
        provider: ProviderRef {
            kind: ProviderKind::KeyProvider,
            name: "keys".into(),
        },
        status,
        generation: Some(1),
        uid: format!("uid-{name}"),
        rotate_annotation: None,
        secret: name.into(),
        deleting: false,
        service_account: None,
    }
}
