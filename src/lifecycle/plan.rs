//! The planner: what to do next for one key resource, given what keyward observes of
//! it and what this reconcile has done so far. The reconciler calls [`plan`], carries
//! out the one step it returns, folds the result back in with [`absorb`], and asks
//! again, until the step is [`Step::Done`].
//!
//! One step at a time keeps every upstream effect behind the write that makes it
//! recoverable: an issuance is recorded in status (a write guarded by the object's
//! `resourceVersion`) before the create is sent, so a stale cache or a concurrent
//! edit fails the write instead of issuing twice; and the finalizer goes only after
//! every key the resource holds, or may still hold, is revoked.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::{
    ROTATE_ANNOTATION,
    schedule::{
        MIN_RENEWAL_WINDOW, Renewal, Timing, after, backoff_until, ceil_second, floor_second,
        landing_deadline, next_inspection, overlap, renewal_time, send_by,
    },
    trigger::{Trigger, TriggerInput, trigger},
};
use crate::{
    providers::{Capabilities, IssueRequest, KeyShape, KeyState, Refusal},
    resources::{DeletionPolicy, IssueAttempt, IssueBackoff, KeyStatus, RetiringKey, Rotation},
};

/// The key resource as the planner needs it, whichever kind it is.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyView {
    pub uid: String,
    pub generation: Option<i64>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// keyward's finalizer is on the object.
    pub finalized: bool,
    /// Value of `keyward.dev/rotate`, if set.
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
    /// `operation` is `issue`, `revoke`, `recover` or `resolve`.
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
            Note::Failed {
                reason, message, ..
            } => (true, reason.clone(), message.clone()),
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

/// What the next step is.
pub fn plan(o: &Observed) -> Plan {
    let mut p = Plan {
        status: o.status.clone(),
        step: Step::Done(Wake::Never),
        notes: Vec::new(),
    };
    p.step = if o.key.deleting {
        plan_cleanup(o, &mut p)
    } else {
        plan_apply(o, &mut p)
    };
    p
}

fn plan_apply(o: &Observed, p: &mut Plan) -> Step {
    if !o.key.finalized {
        return Step::AddFinalizer;
    }
    let provider = match &o.provider {
        ProviderView::Unresolved => return Step::Resolve,
        ProviderView::Unavailable(r) => {
            p.notes.push(refused_note(r));
            return finish(o, p, None);
        }
        ProviderView::Ready(ready) => ready,
    };
    adopt(o, p, provider);
    in_flight(o, p, provider)
        .or_else(|| retired_secret(o, p))
        .or_else(|| inspection(o, p, provider))
        .or_else(|| issuance(o, p, provider))
        .or_else(|| retirement(o, p))
        .unwrap_or_else(|| finish(o, p, Some(provider)))
}

/// The attempt whose key may be in a Secret without status saying so yet: the one in
/// status; or, for a provider that mints locally and records nothing before, the one
/// this reconcile minted for.
fn open_attempt<'a>(o: &'a Observed, s: &'a KeyStatus, local: bool) -> Option<&'a IssueAttempt> {
    s.attempt.as_ref().or(o
        .run
        .attempt
        .as_ref()
        .filter(|a| local && s.revision.unwrap_or(0) < a.revision))
}

/// The Secret that carries the key of an issuance status does not record as done:
/// the open attempt's; or, for a local provider after a restart between the Secret
/// write and the status write, a Secret one revision ahead of status.
fn adoptable<'a>(o: &'a Observed, s: &KeyStatus, local: bool) -> Option<(&'a str, &'a SecretView)> {
    let found = |name: &str, ok: &dyn Fn(&SecretView) -> bool| {
        o.secrets
            .get_key_value(name)
            .filter(|(_, v)| v.owned && v.key_id.is_some() && ok(v))
            .map(|(n, v)| (n.as_str(), v))
    };
    if let Some(a) = open_attempt(o, s, local) {
        return found(&a.secret_name, &|v| {
            v.attempt.as_deref() == Some(a.id.as_str())
        });
    }
    if !local {
        return None;
    }
    let next = s.revision.unwrap_or(0) + 1;
    [Some(o.key.secret_name.as_str()), s.secret_name.as_deref()]
        .into_iter()
        .flatten()
        .find_map(|name| found(name, &|v| v.attempt.is_some() && v.revision == Some(next)))
}

/// Completes an issuance whose key reached its Secret: what the attempt was for (its
/// shape, rotate request, Secret) becomes the status, whatever the spec says by now.
fn adopt(o: &Observed, p: &mut Plan, provider: &ReadyProvider) {
    let local = provider.caps.local;
    let Some((name, secret)) = adoptable(o, &p.status, local) else {
        return;
    };
    let key_id = secret.key_id.clone().unwrap_or_default();
    let recorded = open_attempt(o, &p.status, local).cloned();
    let s = &mut p.status;
    let (shape, reason, rotate, revision) = match &recorded {
        Some(a) => (
            a.shape.clone(),
            a.reason.clone(),
            a.rotate_request.clone(),
            a.revision,
        ),
        None => (
            secret.shape.clone().unwrap_or_default(),
            secret.reason.clone().unwrap_or_default(),
            secret.rotate_request.clone(),
            secret.revision.unwrap_or(0),
        ),
    };
    let trigger = Trigger::from_reason(&reason);
    let previous = s.key_id.take().filter(|k| *k != key_id);
    if let Some(previous) = &previous {
        let revoke_at = if trigger.retire_with_overlap() {
            ceil_second(after(o.now, overlap(&o.key.rotation)))
        } else {
            o.now
        };
        s.retiring.push(RetiringKey {
            key_id: previous.clone(),
            revoke_at: Time(revoke_at),
            reason: trigger.reason().to_owned(),
        });
    }
    if let Some(old) = s.secret_name.take()
        && old != name
        && !s.retired_secrets.contains(&old)
    {
        s.retired_secrets.push(old);
    }
    let created = secret.created_at.unwrap_or(o.now);
    s.key_id = Some(key_id.clone());
    s.created_at = Some(Time(floor_second(created)));
    s.expires_at = secret.expires_at.map(|t| Time(floor_second(t)));
    s.revision = Some(revision.max(s.revision.unwrap_or(0) + 1));
    s.secret_hash = Some(secret.hash.clone());
    s.shape = Some(shape);
    s.secret_name = Some(name.to_owned());
    s.attempt = None;
    s.invalid = None;
    s.last_inspected_at = None;
    s.backoff = None;
    if rotate.is_some() {
        s.rotate_request = rotate;
    }
    p.notes.push(Note::Issued {
        key_id,
        secret: name.to_owned(),
        trigger,
        previous,
    });
}

/// An attempt in status: send it (ours, recorded), write its key (issued), wait while
/// its create may still land, then revoke what it left upstream.
fn in_flight(o: &Observed, p: &Plan, provider: &ReadyProvider) -> Option<Step> {
    let run = &o.run;
    let open = open_attempt(o, &p.status, provider.caps.local);
    if let (Some(a), Some(r)) = (open, &run.attempt)
        && a.id == r.id
    {
        if run.issued.is_some() {
            return Some(Step::WriteSecret(a.clone()));
        }
        // `r` is the attempt as this reconcile made it, its start to the nanosecond
        // (status keeps whole seconds).
        if run.issue_failed.is_none() && o.now <= send_by(r, &o.timing) {
            let trigger = Trigger::from_reason(&a.reason);
            return Some(Step::Issue {
                request: Box::new(issue_request(o, &p.status, a, provider, Some(trigger))),
                attempt: a.clone(),
            });
        }
    }
    let a = p.status.attempt.as_ref()?;
    if o.now < landing_deadline(a, &o.timing) || run.orphans_failed.is_some() {
        return None;
    }
    // Its key may have reached the Secret after the cache last saw it: look before
    // taking it for an orphan.
    if !o.fresh.contains(&a.secret_name) {
        return Some(Step::ReadSecret(a.secret_name.clone()));
    }
    Some(Step::RevokeOrphans(a.clone()))
}

/// A Secret written under an earlier `secret.name`: delete it (if keyward still
/// controls it); forget it once it is gone or the spec uses that name again.
fn retired_secret(o: &Observed, p: &mut Plan) -> Option<Step> {
    let s = &mut p.status;
    let current = s.secret_name.clone();
    s.retired_secrets.retain(|name| {
        let in_use = current.as_deref() == Some(name.as_str()) || o.key.secret_name == *name;
        let gone = o.fresh.contains(name) && !o.secrets.get(name).is_some_and(|v| v.owned);
        !in_use && !gone
    });
    let name = s.retired_secrets.first()?;
    Some(match o.secrets.get(name) {
        Some(v) if v.owned => Step::DeleteSecret(name.clone()),
        _ => Step::ReadSecret(name.clone()),
    })
}

fn inspection(o: &Observed, p: &Plan, provider: &ReadyProvider) -> Option<Step> {
    if !provider.caps.inspect || o.run.inspected {
        return None;
    }
    let due = next_inspection(&p.status, &o.key.rotation)?;
    (due <= o.now).then(|| Step::Inspect(p.status.key_id.clone().unwrap_or_default()))
}

/// The renewal of the current key, if it expires.
fn renewal(o: &Observed, s: &KeyStatus) -> Option<Renewal> {
    let created = s.created_at.as_ref()?.0;
    let seed = format!("{}/{}", o.key.uid, s.revision.unwrap_or(0));
    renewal_time(
        created,
        s.expires_at.as_ref().map(|t| t.0),
        &o.key.rotation,
        &seed,
    )
}

/// What the trigger chain says now, for the status being planned.
fn pending(o: &Observed, s: &KeyStatus) -> Option<Trigger> {
    trigger(&TriggerInput {
        status: s,
        shape: &o.key.shape,
        rotate_request: o.key.rotate_request.as_deref(),
        secret_hash: o.secrets.get(&o.key.secret_name).map(|v| v.hash.as_str()),
        reissue_when_invalid: o.key.rotation.reissue_when_invalid.unwrap_or(true),
        renewal: renewal(o, s).map(|r| r.at),
        now: o.now,
    })
}

/// Until when failed issuances hold a new one back.
fn backing_off(o: &Observed, s: &KeyStatus) -> Option<Timestamp> {
    backoff_until(
        s.backoff.as_ref(),
        o.key.generation,
        o.key.rotate_request.as_deref(),
    )
    .filter(|until| *until > o.now)
}

/// Starts an issuance when a trigger holds and nothing stands in its way: record the
/// attempt first (a guarded write), or for a local provider mint at once.
fn issuance(o: &Observed, p: &mut Plan, provider: &ReadyProvider) -> Option<Step> {
    if p.status.attempt.is_some() || provider.refusal.is_some() || o.run.issue_failed.is_some() {
        return None;
    }
    let trigger = pending(o, &p.status)?;
    if backing_off(o, &p.status).is_some() {
        return None;
    }
    if trigger.reads_the_secret() && !o.fresh.contains(&o.key.secret_name) {
        return Some(Step::ReadSecret(o.key.secret_name.clone()));
    }
    let attempt = IssueAttempt {
        id: o.next_attempt_id.clone(),
        marker: super::marker(&o.key.uid, &o.next_attempt_id),
        reason: trigger.reason().to_owned(),
        started_at: Time(o.now),
        shape: o.key.shape.clone(),
        rotate_request: o.key.rotate_request.clone(),
        secret_name: o.key.secret_name.clone(),
        revision: p.status.revision.unwrap_or(0) + 1,
    };
    if provider.caps.local {
        return Some(Step::Issue {
            request: Box::new(issue_request(
                o,
                &p.status,
                &attempt,
                provider,
                Some(trigger),
            )),
            attempt,
        });
    }
    p.status.attempt = Some(attempt.clone());
    settle(o, &mut p.status, Some(provider));
    Some(Step::WriteStatus {
        starts: Some(attempt),
    })
}

/// Revokes retiring keys whose overlap is over.
fn retirement(o: &Observed, p: &Plan) -> Option<Step> {
    p.status
        .retiring
        .iter()
        .find(|r| r.revoke_at.0 <= o.now && !o.run.revoke_failed.contains_key(&r.key_id))
        .map(|r| Step::Revoke(r.key_id.clone()))
}

/// The request for a new key: the spec's shape and description, the attempt's
/// marker, and the key it replaces (for providers that rotate natively, which keep
/// it valid for the overlap when the trigger leaves it one). `None` trigger: the
/// probe for [`crate::providers::KeyApi::check`], which carries the configured
/// overlap so a provider can refuse one it cannot honour before anything is issued.
pub fn issue_request(
    o: &Observed,
    status: &KeyStatus,
    attempt: &IssueAttempt,
    provider: &ReadyProvider,
    trigger: Option<Trigger>,
) -> IssueRequest {
    request_for(&o.key, status, &attempt.marker, provider.lifetime, trigger)
}

/// [`issue_request`] from the parts the executor has before planning.
pub fn request_for(
    key: &KeyView,
    status: &KeyStatus,
    marker: &str,
    lifetime: Option<Duration>,
    trigger: Option<Trigger>,
) -> IssueRequest {
    let overlap = match trigger {
        Some(t) if !t.retire_with_overlap() => Duration::ZERO,
        _ => overlap(&key.rotation),
    };
    IssueRequest {
        marker: marker.to_owned(),
        description: key.description.clone(),
        lifetime,
        shape: key.key_shape.clone(),
        previous: status.key_id.clone(),
        overlap,
    }
}

/// Nothing more to do: the status as it should be, written if it differs, then sleep
/// until the next thing is due.
fn finish(o: &Observed, p: &mut Plan, provider: Option<&ReadyProvider>) -> Step {
    if let Some(r) = provider.and_then(|p| p.refusal.as_ref()) {
        p.notes.push(refused_note(r));
    }
    settle(o, &mut p.status, provider);
    if super::comparable(&p.status) != super::comparable(&o.stored) {
        return Step::WriteStatus { starts: None };
    }
    Step::Done(wake(o, &p.status, provider))
}

/// A provider that cannot be used, or a key it may not issue: worth an event once
/// (it is published with the status that first records it).
fn refused_note(r: &Refusal) -> Note {
    Note::Failed {
        operation: "resolve",
        reason: r.reason.to_owned(),
        message: r.message.clone(),
    }
}

/// When the key must be looked at again.
fn wake(o: &Observed, s: &KeyStatus, provider: Option<&ReadyProvider>) -> Wake {
    let Some(provider) = provider else {
        return Wake::Retry;
    };
    // A refusal may go away without an event keyward watches (a namespace label, a
    // credential): look again, backing off.
    if provider.refusal.is_some()
        || !o.run.revoke_failed.is_empty()
        || o.run.orphans_failed.is_some()
    {
        return Wake::Retry;
    }
    let in_flight = s.attempt.as_ref().map(|a| landing_deadline(a, &o.timing));
    let backoff = pending(o, s).and_then(|_| backing_off(o, s));
    let inspect = provider
        .caps
        .inspect
        .then(|| next_inspection(s, &o.key.rotation))
        .flatten();
    let renewal = renewal(o, s).map(|r| r.at);
    s.retiring
        .iter()
        .map(|r| r.revoke_at.0)
        .chain(renewal)
        .chain(s.expires_at.as_ref().map(|t| t.0))
        .chain(inspect)
        .chain(in_flight)
        .chain(backoff)
        .min()
        .map_or(Wake::Never, Wake::At)
}

/// Renewal time, observed generation and conditions, from everything else.
fn settle(o: &Observed, s: &mut KeyStatus, provider: Option<&ReadyProvider>) {
    let renewal = renewal(o, s);
    s.renewal_time = renewal.map(|r| Time(r.at));
    s.observed_generation = o.key.generation;
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
    (
        false,
        "AsExpected".into(),
        "all upstream calls succeeded".into(),
    )
}

/// Delete: adopt what reached a Secret, wait out an attempt that may still land and
/// revoke what it left, revoke every key held (unless `Retain`), delete the Secrets,
/// release the finalizer.
fn plan_cleanup(o: &Observed, p: &mut Plan) -> Step {
    if !o.key.finalized {
        return Step::Done(Wake::Never);
    }
    let upstream = match o.key.deletion_policy {
        DeletionPolicy::Revoke => revoke_all(o, p),
        DeletionPolicy::Retain => recover_retained(o, p),
    };
    if let Some(step) = upstream {
        return step;
    }
    let s = &p.status;
    let names: BTreeSet<&str> = [Some(o.key.secret_name.as_str()), s.secret_name.as_deref()]
        .into_iter()
        .flatten()
        .chain(s.attempt.iter().map(|a| a.secret_name.as_str()))
        .chain(s.retired_secrets.iter().map(String::as_str))
        .collect();
    for name in names {
        match o.secrets.get(name) {
            Some(v) if v.owned => return Step::DeleteSecret(name.to_owned()),
            None if !o.fresh.contains(name) => return Step::ReadSecret(name.to_owned()),
            _ => {}
        }
    }
    Step::ReleaseFinalizer
}

/// The upstream half of a delete: `None` once nothing is held any more.
fn revoke_all(o: &Observed, p: &mut Plan) -> Option<Step> {
    let s = &p.status;
    let holds = s.key_id.is_some() || !s.retiring.is_empty() || s.attempt.is_some();
    if !holds {
        return None;
    }
    let provider = match &o.provider {
        ProviderView::Unresolved => return Some(Step::Resolve),
        ProviderView::Unavailable(r) => {
            p.notes.push(refused_note(r));
            let message = format!(
                "cannot revoke keys on delete: {}; or set spec.deletionPolicy: Retain to let the resource go without revoking",
                r.message
            );
            return Some(cleanup_blocked(o, p, r.reason, &message, Wake::Retry));
        }
        ProviderView::Ready(ready) => ready,
    };
    if let Some(step) = recover_attempt(o, p, provider) {
        return Some(step);
    }
    let s = &p.status;
    if let Some(id) = s
        .key_id
        .iter()
        .chain(s.retiring.iter().map(|r| &r.key_id))
        .find(|id| !o.run.revoke_failed.contains_key(*id))
    {
        return Some(Step::Revoke(id.clone()));
    }
    let failed = o.run.revoke_failed.iter().next();
    let message = match (failed, &o.run.orphans_failed) {
        (Some((id, e)), _) => format!("revoking key {id} on delete failed: {e}; keyward retries"),
        (None, Some(e)) => orphans_failed(e),
        (None, None) => return None,
    };
    Some(cleanup_blocked(o, p, "RevokeFailed", &message, Wake::Retry))
}

/// The upstream half of a `Retain` delete: the keys the resource was handed stay, but
/// an interrupted issuance's key was handed to nobody, so it is recovered as on any
/// delete. With the provider unusable nothing can be done upstream, and `Retain` is
/// how a resource goes anyway.
fn recover_retained(o: &Observed, p: &mut Plan) -> Option<Step> {
    p.status.attempt.as_ref()?;
    let provider = match &o.provider {
        ProviderView::Unresolved => return Some(Step::Resolve),
        ProviderView::Unavailable(_) => return None,
        ProviderView::Ready(ready) => ready,
    };
    if let Some(step) = recover_attempt(o, p, provider) {
        return Some(step);
    }
    let message = orphans_failed(o.run.orphans_failed.as_ref()?);
    Some(cleanup_blocked(o, p, "RevokeFailed", &message, Wake::Retry))
}

fn orphans_failed(e: &str) -> String {
    format!("revoking what an interrupted issuance left upstream failed: {e}; keyward retries")
}

/// On delete: adopt an attempt's key that reached its Secret; otherwise wait until the
/// attempt's create can no longer land, then revoke what it left (`None` once there
/// is no attempt, or its recovery failed in this reconcile).
fn recover_attempt(o: &Observed, p: &mut Plan, provider: &ReadyProvider) -> Option<Step> {
    adopt(o, p, provider);
    let a = p.status.attempt.clone()?;
    let deadline = landing_deadline(&a, &o.timing);
    if o.now < deadline {
        let message = format!(
            "waiting until an interrupted issuance ({}) can no longer land upstream, then revoking what it left",
            a.marker
        );
        return Some(cleanup_blocked(
            o,
            p,
            "Revoking",
            &message,
            Wake::At(deadline),
        ));
    }
    if !o.fresh.contains(&a.secret_name) {
        return Some(Step::ReadSecret(a.secret_name.clone()));
    }
    if o.run.orphans_failed.is_none() {
        return Some(Step::RevokeOrphans(a));
    }
    None
}

/// A delete that cannot finish yet: say why in status, and wait.
fn cleanup_blocked(o: &Observed, p: &mut Plan, reason: &str, message: &str, wake: Wake) -> Step {
    let s = &mut p.status;
    let generation = o.key.generation;
    set_condition(
        &mut s.conditions,
        "Ready",
        false,
        reason,
        message,
        generation,
        o.now,
    );
    let degraded = reason != "Revoking";
    set_condition(
        &mut s.conditions,
        "Degraded",
        degraded,
        reason,
        message,
        generation,
        o.now,
    );
    if super::comparable(s) != super::comparable(&o.stored) {
        return Step::WriteStatus { starts: None };
    }
    Step::Done(wake)
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
}

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
        (Step::RevokeOrphans(attempt), Done::OrphansRevoked(ids)) => {
            if o.status
                .attempt
                .as_ref()
                .is_some_and(|a| a.id == attempt.id)
            {
                o.status.attempt = None;
            }
            notes.extend(ids.into_iter().map(|key_id| Note::RevokedOrphan {
                key_id,
                marker: attempt.marker.clone(),
            }));
        }
        (Step::RevokeOrphans(_), Done::OrphansFailed(e)) => {
            notes.push(Note::Failed {
                operation: "recover",
                reason: "RecoveryFailed".into(),
                message: format!("revoking what an interrupted issuance left upstream failed: {e}"),
            });
            o.run.orphans_failed = Some(e);
        }
        (Step::Revoke(id), Done::Revoked) => {
            let s = &mut o.status;
            let why = s
                .retiring
                .iter()
                .find(|r| r.key_id == *id)
                .map(|r| format!("previous key, {}", r.reason))
                .unwrap_or_else(|| "on delete".to_owned());
            s.retiring.retain(|r| r.key_id != *id);
            if s.key_id.as_deref() == Some(id.as_str()) {
                s.key_id = None;
            }
            notes.push(Note::Revoked {
                key_id: id.clone(),
                why,
            });
        }
        (Step::Revoke(id), Done::RevokeFailed(e)) => {
            notes.push(Note::Failed {
                operation: "revoke",
                reason: "RevokeFailed".into(),
                message: format!("revoking key {id} failed: {e}"),
            });
            o.run.revoke_failed.insert(id.clone(), e);
        }
        (Step::Inspect(id), Done::Inspected(result)) => {
            o.run.inspected = true;
            o.status.last_inspected_at = Some(Time(floor_second(o.now)));
            if let Ok(state @ (KeyState::Expired | KeyState::Revoked | KeyState::UsedUp)) = result {
                let state = format!("{state:?}");
                notes.push(Note::KeyInvalid {
                    key_id: id.clone(),
                    state: state.clone(),
                });
                o.status.invalid = Some(state);
            }
        }
        (Step::DeleteSecret(name), Done::SecretDeleted) => {
            o.fresh.insert(name.clone());
            o.secrets.remove(name);
            o.status.retired_secrets.retain(|n| n != name);
        }
        (step, done) => debug_assert!(false, "{done:?} is not a result of {step:?}"),
    }
    notes
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
    s.backoff = Some(IssueBackoff {
        failures,
        last_failure_time: Time(floor_second(o.now)),
        generation: o.key.generation,
        rotate_request: o.key.rotate_request.clone(),
        reason: failure.reason.clone(),
        message: failure.message.clone(),
    });
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
