//! The conditions a key's status shows (`Ready`, `Issuing`, `Degraded`), and the
//! renewal time and observed generation, settled from everything else.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::{
    ROTATE_ANNOTATION,
    observe::{Observed, ProviderView, ReadyProvider},
    plan::{pending, renewal},
    rollout,
    schedule::{MIN_RENEWAL_WINDOW, Renewal, floor_second},
    trigger::Trigger,
};
use crate::{providers::Refusal, resources::KeyStatus};

/// Renewal time, observed generation and conditions, from everything else.
pub(super) fn settle(o: &Observed, s: &mut KeyStatus, provider: Option<&ReadyProvider>) {
    let renewal = renewal(o, s);
    s.renewal_time = renewal.map(|r| Time(r.at));
    s.observed_generation = o.key.generation;
    let waiting = rollout::waiting_for(o, s);
    for r in &mut s.retiring {
        r.waiting_for.clone_from(&waiting);
    }
    let generation = o.key.generation;
    let pending = pending(o, s);
    let refusal = match (&o.provider, provider) {
        (ProviderView::Unavailable(r), _) => Some(r),
        (_, Some(p)) => p.refusal.as_ref(),
        _ => None,
    };
    let (ready, reason, message) = readiness(o, s, pending, refusal);
    set_condition(
        &mut s.conditions,
        "Ready",
        ready,
        &reason,
        &message,
        generation,
        o.now,
    );
    let (issuing, reason, message) = match (&s.attempt, &s.backoff, pending) {
        (Some(a), _, _) => (true, a.reason.clone(), "issuing a new key".to_owned()),
        (None, Some(b), Some(_)) => (false, b.reason.clone(), b.message.clone()),
        _ => (false, "Idle".into(), "no issuance in progress".into()),
    };
    set_condition(
        &mut s.conditions,
        "Issuing",
        issuing,
        &reason,
        &message,
        generation,
        o.now,
    );
    let (degraded, reason, message) = degradation(o, s, pending, renewal);
    set_condition(
        &mut s.conditions,
        "Degraded",
        degraded,
        &reason,
        &message,
        generation,
        o.now,
    );
}

fn readiness(
    o: &Observed,
    s: &KeyStatus,
    pending: Option<Trigger>,
    refusal: Option<&Refusal>,
) -> (bool, String, String) {
    let name = s.secret_name.as_deref().unwrap_or(&o.key.secret_name);
    let Some(key_id) = s.key_id.as_deref() else {
        return match (refusal, &s.backoff) {
            (Some(r), _) => (false, r.reason.to_owned(), r.message.clone()),
            (None, Some(b)) => (false, b.reason.clone(), b.message.clone()),
            (None, None) => (false, "Initial".into(), "issuing the first key".into()),
        };
    };
    if let Some(r) = refusal {
        return (false, r.reason.to_owned(), r.message.clone());
    }
    let revision = s.revision.unwrap_or(0);
    if let Some(state) = &s.invalid
        && !o.key.rotation.reissue_when_invalid.unwrap_or(true)
    {
        return (
            false,
            "KeyInvalid".into(),
            format!(
                "the upstream reports key {key_id} (revision {revision}) as {state}; \
                 rotation.reissueWhenInvalid is false, so keyward leaves it in Secret {name}: \
                 set reissueWhenInvalid to true, or annotate {ROTATE_ANNOTATION} to issue a new key"
            ),
        );
    }
    match pending {
        Some(t) if !t.current_key_stays_ready() => {
            let (reason, why) = match &s.backoff {
                Some(b) => (b.reason.clone(), b.message.clone()),
                None => (
                    t.reason().to_owned(),
                    "a new key is being issued".to_owned(),
                ),
            };
            (
                false,
                reason,
                format!(
                    "Secret {name} does not hold a key for the current spec ({}): {why}",
                    t.reason()
                ),
            )
        }
        _ => (
            true,
            "Issued".into(),
            format!("key {key_id} (revision {revision}) is in Secret {name}"),
        ),
    }
}

fn degradation(
    o: &Observed,
    s: &KeyStatus,
    pending: Option<Trigger>,
    renewal: Option<Renewal>,
) -> (bool, String, String) {
    if let Some((id, e)) = o.run.revoke_failed.iter().next() {
        return (
            true,
            "RevokeFailed".into(),
            format!("revoking key {id} failed: {e}"),
        );
    }
    if let Some(e) = &o.run.orphans_failed {
        return (
            true,
            "RecoveryFailed".into(),
            format!("revoking what an interrupted issuance left upstream failed: {e}"),
        );
    }
    if let (Some(b), Some(_)) = (&s.backoff, pending) {
        return (true, b.reason.clone(), b.message.clone());
    }
    if renewal.is_some_and(|r| r.window_too_short) {
        return (
            true,
            "RenewalWindowTooShort".into(),
            format!(
                "the renewal point (rotation.renewBefore or renewBeforePercentage) leaves less than {}s between issuing a key and renewing it; keyward renews {}s after issuance instead: lower renewBefore or lengthen expiry",
                MIN_RENEWAL_WINDOW.as_secs(),
                MIN_RENEWAL_WINDOW.as_secs()
            ),
        );
    }
    if let Some((reason, message)) = rollout::degradation(o) {
        return (true, reason, message);
    }
    (
        false,
        "AsExpected".into(),
        "all upstream calls succeeded".into(),
    )
}

/// Sets a condition, keeping `lastTransitionTime` when the status did not change.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let status = if status { "True" } else { "False" }.to_owned();
    let existing = conditions.iter().position(|c| c.type_ == type_);
    let transition = match existing.map(|i| &conditions[i]) {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(floor_second(now)),
    };
    let condition = Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation: generation,
        last_transition_time: transition,
    };
    match existing {
        Some(i) => conditions[i] = condition,
        None => conditions.push(condition),
    }
}
