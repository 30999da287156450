//! Folding what a step came to back into what the planner sees next.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{
    observe::{Done, Failure, Note, Observed, SecretView, Step},
    schedule::floor_second,
};
use crate::{
    providers::KeyState,
    resources::{IssueAttempt, IssueBackoff, RolloutTarget},
};

/// Folds the result of `step` into what the planner sees next, and returns what is
/// worth noting.
pub fn absorb(o: &mut Observed, step: &Step, done: Done) -> Vec<Note> {
    let mut notes = Vec::new();
    match (step, done) {
        (Step::WriteStatus { starts }, Done::Written) => {
            if starts.is_some() {
                o.run.attempt = starts.clone();
                o.run.issued = None;
            }
        }
        (_, Done::Written) => {}
        (_, Done::Resolved(view)) => o.provider = view,
        (Step::ReadSecret(name), Done::SecretRead(view)) => {
            o.fresh.insert(name.clone());
            set_secret(o, name, view);
        }
        (Step::Issue { attempt, .. }, Done::Issued(facts)) => {
            o.run.attempt = Some(attempt.clone());
            o.run.issued = Some(facts);
        }
        (Step::Issue { attempt, .. }, Done::IssueFailed(failure)) => {
            o.run.attempt = Some(attempt.clone());
            issue_failed(o, &failure);
            notes.push(Note::Failed {
                operation: "issue",
                reason: failure.reason.clone(),
                message: failure.message.clone(),
            });
            o.run.issue_failed = Some(failure);
        }
        (Step::WriteSecret(attempt), Done::SecretWritten(view)) => {
            o.fresh.insert(attempt.secret_name.clone());
            set_secret(o, &attempt.secret_name, Some(view));
        }
        (Step::RevokeOrphans(attempt), done) => notes.extend(orphans(o, attempt, done)),
        (Step::Revoke(id), done) => notes.push(revoked(o, id, done)),
        (Step::Inspect(id), Done::Inspected(result)) => {
            notes.extend(inspected(o, id, result));
        }
        (Step::Rollout { target, .. }, done) => notes.extend(rolled_out(o, target, done)),
        (Step::DeleteSecret(name), Done::SecretDeleted) => {
            o.fresh.insert(name.clone());
            o.secrets.remove(name);
            o.status.retired_secrets.retain(|n| n != name);
        }
        (step, done) => debug_assert!(false, "{done:?} is not a result of {step:?}"),
    }
    notes
}

/// An annotation's answer: the target as it left it, or the failure, retried later.
fn rolled_out(o: &mut Observed, target: &RolloutTarget, done: Done) -> Option<Note> {
    match done {
        Done::RolledOut(Some(view)) => {
            o.targets.insert(target.clone(), view);
            Some(Note::RolledOut {
                target: target.to_string(),
                revision: o.status.revision.unwrap_or(0),
            })
        }
        Done::RolledOut(None) => {
            o.targets.remove(target);
            None
        }
        Done::RolloutFailed(e) => {
            let message = format!("annotating {target} for a rollout failed: {e}");
            o.run.rollout_failed.insert(target.clone(), e);
            Some(Note::Failed {
                operation: "rollout",
                reason: "RolloutFailed".into(),
                message,
            })
        }
        done => {
            debug_assert!(false, "{done:?} is not a result of a rollout");
            None
        }
    }
}

fn set_secret(o: &mut Observed, name: &str, view: Option<SecretView>) {
    match view {
        Some(v) => {
            o.secrets.insert(name.to_owned(), v);
        }
        None => {
            o.secrets.remove(name);
        }
    }
}

/// A failed issuance backs the next one off; a refusal issued nothing, so its
/// attempt is over (and nothing someone else owns is ever taken for its orphan).
fn issue_failed(o: &mut Observed, failure: &Failure) {
    let s = &mut o.status;
    if failure.refused {
        s.attempt = None;
    }
    let failures = s.backoff.as_ref().map_or(0, |b| b.failures) + 1;
    s.backoff = Some(Box::new(IssueBackoff {
        failures,
        last_failure_time: Time(floor_second(o.now)),
        generation: o.key.generation,
        rotate_request: o.key.rotate_request.clone(),
        reason: failure.reason.clone(),
        message: failure.message.clone(),
    }));
}

/// An attempt's orphans revoked (the attempt is over), or the search failed.
fn orphans(o: &mut Observed, attempt: &IssueAttempt, done: Done) -> Vec<Note> {
    match done {
        Done::OrphansRevoked(ids) => {
            if o.status
                .attempt
                .as_ref()
                .is_some_and(|a| a.id == attempt.id)
            {
                o.status.attempt = None;
            }
            ids.into_iter()
                .map(|key_id| Note::RevokedOrphan {
                    key_id,
                    marker: attempt.marker.clone(),
                })
                .collect()
        }
        Done::OrphansFailed(e) => {
            let note = Note::Failed {
                operation: "recover",
                reason: "RecoveryFailed".into(),
                message: format!("revoking what an interrupted issuance left upstream failed: {e}"),
            };
            o.run.orphans_failed = Some(e);
            vec![note]
        }
        other => unexpected(other),
    }
}

/// A key revoked (gone from status), or its revocation failed (kept, retried).
fn revoked(o: &mut Observed, id: &str, done: Done) -> Note {
    match done {
        Done::Revoked => {
            let s = &mut o.status;
            let why = s
                .retiring
                .iter()
                .find(|r| r.key_id == id)
                .map(|r| format!("previous key, {}", r.reason))
                .unwrap_or_else(|| "on delete".to_owned());
            s.retiring.retain(|r| r.key_id != id);
            if s.key_id.as_deref() == Some(id) {
                s.key_id = None;
            }
            Note::Revoked {
                key_id: id.to_owned(),
                why,
            }
        }
        Done::RevokeFailed(e) => {
            let note = Note::Failed {
                operation: "revoke",
                reason: "RevokeFailed".into(),
                message: format!("revoking key {id} failed: {e}"),
            };
            o.run.revoke_failed.insert(id.to_owned(), e);
            note
        }
        other => unexpected(other),
    }
}

/// What the upstream said about the current key.
fn inspected(o: &mut Observed, id: &str, result: Result<KeyState, String>) -> Option<Note> {
    o.run.inspected = true;
    o.status.last_inspected_at = Some(Time(floor_second(o.now)));
    let Ok(state @ (KeyState::Expired | KeyState::Revoked | KeyState::UsedUp)) = result else {
        return None;
    };
    let state = format!("{state:?}");
    o.status.invalid = Some(state.clone());
    Some(Note::KeyInvalid {
        key_id: id.to_owned(),
        state,
    })
}

fn unexpected<T>(done: Done) -> T {
    panic!("{done:?} is not a result of the step it answers")
}
