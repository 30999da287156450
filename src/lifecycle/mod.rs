//! The lifecycle of a key as pure decisions: given what keyward observes of one key
//! resource — spec, status, Secrets, provider, what the current reconcile has done so
//! far — and the time, [`plan`] says what to do next and why; [`absorb`] folds the
//! result back in. "When do we rotate?", "may this finalizer go?", "how long does the
//! old key overlap?", "when do we look again?" are answered here and nowhere else.
//! Nothing here does I/O, reads a clock or draws a random number: the reconciler
//! (`crate::reconciler`) carries the steps out, and the seeded simulation
//! (`tests/simulation.rs`) drives the same planner against a model of the API server
//! and the upstream.

mod absorb;
mod conditions;
mod observe;
mod plan;
pub mod rollout;
mod schedule;
mod trigger;

use serde::Serialize;

pub use absorb::absorb;
pub use conditions::set_condition;
pub use observe::{
    Done, Failure, IssuedFacts, KeyView, Note, Observed, Plan, ProviderView, ReadyProvider, Run,
    SecretView, Step, Wake,
};
pub use plan::{issue_request, plan, request_for};
pub use schedule::{
    DEFAULT_INSPECT_INTERVAL, DEFAULT_OVERLAP, MAX_BACKOFF, MIN_INSPECT_INTERVAL,
    MIN_RENEWAL_WINDOW, Renewal, Timing, after, backoff_after, backoff_until, inspect_interval,
    landing_deadline, lifetime, next_inspection, overlap, renew_before, renewal_time, send_by,
};
pub use trigger::{Trigger, TriggerInput, trigger};

use crate::{
    providers::KeyShape,
    resources::{KeyDuration, ProviderRef, SecretSpec},
};

/// The annotation that forces a rotation when its value changes.
pub const ROTATE_ANNOTATION: &str = "keyward.dev/rotate";

/// The marker that identifies one issuance upstream: short enough for Tailscale's
/// 50-character descriptions next to the user's text. `kw:` + the first 8 characters
/// of the resource UID + `.` + the attempt id.
pub fn marker(uid: &str, attempt: &str) -> String {
    format!("kw:{}.{attempt}", uid_prefix(uid))
}

/// The first 8 characters of a resource UID, without dashes: short, and unique enough
/// to tell one resource's marks from another's.
fn uid_prefix(uid: &str) -> String {
    uid.chars().filter(|c| *c != '-').take(8).collect()
}

/// The spec fields that shape a key and its Secret.
pub struct ShapeInput<'a> {
    pub provider: &'a ProviderRef,
    pub shape: &'a KeyShape,
    pub description: Option<&'a str>,
    pub expiry: Option<&'a KeyDuration>,
    pub secret: &'a SecretSpec,
}

/// Digest of everything that shapes the key and its Secret: a change rotates.
/// Rotation timing and deletion policy are deliberately not part of it.
pub fn shape_digest(input: &ShapeInput) -> String {
    let shape = input.shape;
    let value = serde_json::json!({
        "provider": input.provider,
        "reusable": shape.reusable, "ephemeral": shape.ephemeral,
        "preauthorized": shape.preauthorized, "tags": shape.tags,
        "serviceAccount": shape.service_account, "create": shape.create_service_account,
        "role": shape.role, "scopes": shape.scopes,
        "description": input.description,
        "expiry": input.expiry,
        "secret": input.secret,
    });
    // The digest of a one-entry map `shape` → the JSON, as `secret::data_hash`
    // computes it: the value stored in existing statuses, so it must not change.
    use sha2::{Digest, Sha256};
    let (name, json) = ("shape".as_bytes(), value.to_string());
    let mut hasher = Sha256::new();
    hasher.update((name.len() as u64).to_be_bytes());
    hasher.update(name);
    hasher.update((json.len() as u64).to_be_bytes());
    hasher.update(json.as_bytes());
    hasher.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Drops timestamps so "did anything change?" compares meaning, not clock.
pub fn comparable<S: Serialize>(status: &S) -> serde_json::Value {
    let mut v = serde_json::to_value(status).unwrap_or_default();
    if let Some(conditions) = v.get_mut("conditions").and_then(|c| c.as_array_mut()) {
        for c in conditions {
            if let Some(o) = c.as_object_mut() {
                o.remove("lastTransitionTime");
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_fit_a_short_description() {
        let m = marker("0b6e7c2a-1f0e-4c49-9a7e-2a8f0c1d2e3f", "deadbeef");
        assert_eq!(m, "kw:0b6e7c2a.deadbeef");
        assert!(m.len() <= 20);
    }
}
