//! What the planner looks at and what it answers with: the observed key, its
//! Secrets and provider, what the current reconcile has done, the steps, the notes
//! worth an event, and the results the executor folds back in.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use jiff::Timestamp;

use super::{rollout::TargetView, schedule::Timing};
use crate::{
    providers::{Capabilities, IssueRequest, KeyShape, KeyState, Refusal},
    resources::{DeletionPolicy, IssueAttempt, KeyStatus, RolloutTarget, Rotation},
};

use super::trigger::Trigger;

/// The key resource as the planner needs it, whichever kind it is.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyView {
    pub uid: String,
    pub generation: Option<i64>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// keyward's finalizer is on the object.
    pub finalized: bool,
    /// Value of `keyward.dev/rotate`, if set to one the status has not recorded as
    /// handled (`status.rotateRequest`).
    pub rotate_request: Option<String>,
    /// Digest of the spec fields that shape the key and its Secret.
    pub shape: String,
    /// The Secret the spec names.
    pub secret_name: String,
    pub deletion_policy: DeletionPolicy,
    pub rotation: Rotation,
    /// What the upstream is asked for.
    pub key_shape: KeyShape,
    pub description: Option<String>,
    /// `spec.expiry`.
    pub requested_lifetime: Option<Duration>,
    /// `spec.rollout`: the workloads that restart onto each new key.
    pub rollout: Vec<RolloutTarget>,
}

/// What keyward's own annotations on a Secret say about the key in it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SecretView {
    /// The Secret object's own uid and version (what a delete and a write are
    /// guarded by).
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    /// Digest of the Secret's data.
    pub hash: String,
    /// The key resource is the Secret's controlling owner.
    pub owned: bool,
    pub attempt: Option<String>,
    pub key_id: Option<String>,
    pub revision: Option<i64>,
    pub created_at: Option<Timestamp>,
    pub expires_at: Option<Timestamp>,
    /// The attempt's shape digest, trigger reason and rotate request.
    pub shape: Option<String>,
    pub reason: Option<String>,
    pub rotate_request: Option<String>,
}

/// The provider a key names, as far as the planner is concerned.
#[derive(Clone, Debug, PartialEq)]
pub enum ProviderView {
    /// Not looked up yet in this reconcile.
    Unresolved,
    /// Missing, or its credentials or configuration are wrong: nothing upstream can be
    /// done. The reason says what to fix.
    Unavailable(Refusal),
    Ready(ReadyProvider),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ReadyProvider {
    pub caps: Capabilities,
    /// The lifetime new keys are asked for.
    pub lifetime: Option<Duration>,
    /// Why no new key may be issued now (policy, lifetime bounds, the Secret template,
    /// the provider's own check). Revoking and recovery still go ahead.
    pub refusal: Option<Refusal>,
}

/// The non-secret facts of a key just issued; its value stays with the executor.
#[derive(Clone, Debug, PartialEq)]
pub struct IssuedFacts {
    pub id: String,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
}

/// A failed issuance.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    /// Condition reason (`IssueFailed`, or the refusal's reason).
    pub reason: String,
    pub message: String,
    /// The upstream refused the request: nothing was created, nothing can land.
    pub refused: bool,
}

/// What this reconcile has done so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Run {
    /// The attempt this reconcile started (recorded in status, or for a local provider
    /// only here) and may send.
    pub attempt: Option<IssueAttempt>,
    pub issued: Option<IssuedFacts>,
    pub issue_failed: Option<Failure>,
    pub orphans_failed: Option<String>,
    /// Keys whose revocation failed in this reconcile, with the error.
    pub revoke_failed: BTreeMap<String, String>,
    pub inspected: bool,
    /// Rollout targets whose annotation failed in this reconcile, with the error.
    pub rollout_failed: BTreeMap<RolloutTarget, String>,
}

/// Everything the planner looks at.
#[derive(Clone, Debug)]
pub struct Observed {
    pub key: KeyView,
    /// Status as the API server has it (as far as keyward knows).
    pub stored: KeyStatus,
    /// Status with what this reconcile has done folded in.
    pub status: KeyStatus,
    /// Secrets by name: the one the spec names, the one status names, the attempt's,
    /// retired ones. Absent: not there (as far as the cache knows).
    pub secrets: BTreeMap<String, SecretView>,
    /// Secret names read from the API server in this reconcile, not from the cache.
    pub fresh: BTreeSet<String>,
    /// The `spec.rollout` targets, from the watch cache. Absent: no such workload.
    pub targets: BTreeMap<RolloutTarget, TargetView>,
    pub provider: ProviderView,
    pub run: Run,
    pub now: Timestamp,
    pub timing: Timing,
    /// The id a new attempt would get (random; supplied by the executor).
    pub next_attempt_id: String,
}

impl Observed {
    /// The Secrets the planner looks at: the one the spec names, the one status
    /// names, the attempt's, retired ones.
    pub fn secret_names(&self) -> BTreeSet<String> {
        let s = &self.status;
        [Some(self.key.secret_name.clone()), s.secret_name.clone()]
            .into_iter()
            .flatten()
            .chain(s.attempt.iter().map(|a| a.secret_name.clone()))
            .chain(s.retired_secrets.iter().cloned())
            .collect()
    }
}

/// When the reconciler should look at the key again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    At(Timestamp),
    /// Only when something changes.
    Never,
    /// Something failed that only retrying can fix: the controller's error backoff.
    Retry,
}

/// One thing to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    AddFinalizer,
    /// Look the provider up (and build its key API).
    Resolve,
    /// Read this Secret from the API server: a trigger read off the cache is confirmed
    /// before it issues, and cleanup makes sure of what it deletes.
    ReadSecret(String),
    /// Write `Plan::status`, guarded by the object's `resourceVersion`. `starts` is the
    /// attempt this write records: once it is stored, its create may be sent.
    WriteStatus {
        starts: Option<IssueAttempt>,
    },
    /// Create a key upstream for `attempt`.
    Issue {
        request: Box<IssueRequest>,
        attempt: IssueAttempt,
    },
    /// Write the key issued for `attempt` into its Secret, annotated with the attempt.
    WriteSecret(IssueAttempt),
    /// Find and revoke whatever an attempt that can no longer land left upstream.
    RevokeOrphans(IssueAttempt),
    Revoke(String),
    Inspect(String),
    /// Delete this Secret if the key resource controls it.
    DeleteSecret(String),
    /// Annotate the target's Pod template with `value` (the current revision), so that
    /// it rolls out onto the new key.
    Rollout {
        target: RolloutTarget,
        value: String,
    },
    /// Remove keyward's finalizer (guarded by `resourceVersion`).
    ReleaseFinalizer,
    Done(Wake),
}

/// Something worth an event (and a metric): decided here, published by the executor
/// once the status that records it is written.
#[derive(Clone, Debug, PartialEq)]
pub enum Note {
    Issued {
        key_id: String,
        secret: String,
        trigger: Trigger,
        previous: Option<String>,
    },
    Revoked {
        key_id: String,
        why: String,
    },
    RevokedOrphan {
        key_id: String,
        marker: String,
    },
    KeyInvalid {
        key_id: String,
        state: String,
    },
    RolledOut {
        target: String,
        revision: i64,
    },
    /// `operation` is `issue`, `revoke`, `recover`, `resolve` or `rollout`.
    Failed {
        operation: &'static str,
        reason: String,
        message: String,
    },
}

impl Note {
    /// `(warning, reason, message)` of the event.
    pub fn event(&self) -> (bool, String, String) {
        match self {
            Note::Issued {
                key_id,
                secret,
                previous: None,
                ..
            } => (
                false,
                "Issued".into(),
                format!("issued key {key_id} into Secret {secret}"),
            ),
            Note::Issued {
                key_id,
                secret,
                trigger,
                previous: Some(previous),
            } => (
                false,
                "Rotated".into(),
                format!(
                    "rotated to key {key_id} in Secret {secret} ({}); previous key {previous} retires",
                    trigger.reason()
                ),
            ),
            Note::Revoked { key_id, why } => (
                false,
                "Revoked".into(),
                format!("revoked key {key_id} ({why})"),
            ),
            Note::RevokedOrphan { key_id, marker } => (
                false,
                "RevokedOrphan".into(),
                format!(
                    "revoked upstream key {key_id}: issued by an interrupted attempt ({marker}) that never reached the Secret"
                ),
            ),
            Note::KeyInvalid { key_id, state } => (
                true,
                "KeyInvalid".into(),
                format!("the upstream reports key {key_id} as {state}"),
            ),
            Note::RolledOut { target, revision } => (
                false,
                "RolloutStarted".into(),
                format!(
                    "annotated the Pod template of {target} for revision {revision}: it rolls out onto the new key"
                ),
            ),
            Note::Failed {
                reason, message, ..
            } => (true, reason.clone(), message.clone()),
        }
    }

    /// The note of the provider's Event a wave of these is counted on (`events`), or
    /// `None` when each must keep an Event of its own (warnings, rollouts).
    pub fn wave(&self) -> Option<&'static str> {
        match self {
            Note::Issued { previous: None, .. } => Some(
                "keys issued through this provider in a wave: beyond the first few a minute, each is counted in this Event's series instead of an Event of its own; each key's status names its key",
            ),
            Note::Issued { .. } => Some(
                "keys rotated through this provider in a wave: beyond the first few a minute, each is counted in this Event's series instead of an Event of its own; each key's status names its new key",
            ),
            Note::Revoked { .. } => Some(
                "keys revoked through this provider in a wave: beyond the first few a minute, each is counted in this Event's series instead of an Event of its own",
            ),
            _ => None,
        }
    }
}

/// The next step, the status it is based on (the executor keeps it as its working
/// status), and what it noted on the way.
#[derive(Clone, Debug)]
pub struct Plan {
    pub status: KeyStatus,
    pub step: Step,
    pub notes: Vec<Note>,
}

/// What a step's result was, for [`absorb`].
#[derive(Clone, Debug, PartialEq)]
pub enum Done {
    /// A write of the key object succeeded; the executor has replaced `key`,
    /// `stored` (and `status`) with what the API server returned.
    Written,
    Resolved(ProviderView),
    SecretRead(Option<SecretView>),
    Issued(IssuedFacts),
    IssueFailed(Failure),
    SecretWritten(SecretView),
    OrphansRevoked(Vec<String>),
    OrphansFailed(String),
    Revoked,
    RevokeFailed(String),
    Inspected(Result<KeyState, String>),
    SecretDeleted,
    /// The target as the annotation left it (`None`: it is gone).
    RolledOut(Option<TargetView>),
    RolloutFailed(String),
}
