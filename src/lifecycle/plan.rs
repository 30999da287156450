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

use std::{collections::BTreeSet, time::Duration};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{
    conditions::{set_condition, settle},
    observe::{KeyView, Note, Observed, Plan, ProviderView, ReadyProvider, SecretView, Step, Wake},
    rollout,
    schedule::{
        Renewal, after, backoff_until, ceil_second, floor_second, landing_deadline,
        next_inspection, overlap, renewal_time, send_by,
    },
    trigger::{Trigger, TriggerInput, trigger},
};
use crate::{
    providers::{IssueRequest, Refusal},
    resources::{DeletionPolicy, IssueAttempt, KeyStatus, RetiringKey},
};

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
    let provider = match &o.provider {
        ProviderView::Unresolved => return Step::Resolve,
        ProviderView::Unavailable(_) if !o.key.finalized => return Step::AddFinalizer,
        ProviderView::Unavailable(r) => {
            p.notes.push(refused_note(r));
            return finish(o, p, None);
        }
        ProviderView::Ready(ready) => ready,
    };
    if !o.key.finalized && needs_finalizer(o, provider) {
        return Step::AddFinalizer;
    }
    adopt(o, p, provider);
    in_flight(o, p, provider)
        .or_else(|| retired_secret(o, p))
        .or_else(|| inspection(o, p, provider))
        .or_else(|| rollout_step(o, p))
        .or_else(|| issuance(o, p, provider))
        .or_else(|| retirement(o, p))
        .unwrap_or_else(|| finish(o, p, Some(provider)))
}

/// Whether a delete must wait for keyward: it must unless the provider mints locally.
/// A `builtin` key exists only in its Secret, which its owner reference lets the
/// garbage collector delete with it, so it carries no finalizer (one write fewer per
/// key, and a delete that is immediate). A finalizer, once on, stays until the delete,
/// so a key that ever used an upstream provider keeps it — it is added before the
/// first upstream attempt — and still revokes what it holds there when it is deleted.
/// (An attempt in status is an upstream one: local issuance records none.)
fn needs_finalizer(o: &Observed, provider: &ReadyProvider) -> bool {
    !provider.caps.local || o.status.attempt.is_some()
}

/// The attempt whose key may be in a Secret without status saying so yet: the one in
/// status; or, for a provider that mints locally and records nothing before, the one
/// this reconcile minted for.
fn open_attempt<'a>(o: &'a Observed, s: &'a KeyStatus, local: bool) -> Option<&'a IssueAttempt> {
    s.attempt.as_deref().or(o
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
            waiting_for: Vec::new(),
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
    Some(Step::RevokeOrphans(IssueAttempt::clone(a)))
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
pub(super) fn renewal(o: &Observed, s: &KeyStatus) -> Option<Renewal> {
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
pub(super) fn pending(o: &Observed, s: &KeyStatus) -> Option<Trigger> {
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
        s.backoff.as_deref(),
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
    p.status.attempt = Some(Box::new(attempt.clone()));
    settle(o, &mut p.status, Some(provider));
    Some(Step::WriteStatus {
        starts: Some(attempt),
    })
}

/// Annotates the next rollout target for the revision in the Secret (see [`rollout`]):
/// before a new issuance and before retirement, so that no target is left on a key
/// that is revoked before the target was told to move off it.
fn rollout_step(o: &Observed, p: &Plan) -> Option<Step> {
    let (target, value) = rollout::due(o, &p.status)?;
    Some(Step::Rollout { target, value })
}

/// Revokes retiring keys whose overlap is over — or, with `retire: AfterRollout`, as
/// soon as every rollout target runs the new key.
fn retirement(o: &Observed, p: &Plan) -> Option<Step> {
    let rolled_out = rollout::finished(o, &p.status);
    p.status
        .retiring
        .iter()
        .find(|r| {
            (rolled_out || r.revoke_at.0 <= o.now) && !o.run.revoke_failed.contains_key(&r.key_id)
        })
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
        || !o.run.rollout_failed.is_empty()
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
    let a = p.status.attempt.as_deref().cloned()?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        lifecycle::{Done, IssuedFacts, Run, absorb, schedule::Timing},
        providers::{Capabilities, KeyShape},
        resources::Rotation,
    };
    use std::collections::BTreeMap;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// A first issuance of shape-1 into Secret `k`, recorded now by an earlier run.
    fn interrupted(o: &Observed, id: &str, rotate_request: Option<&str>) -> IssueAttempt {
        IssueAttempt {
            id: id.into(),
            marker: format!("kw:0b6e7c2a.{id}"),
            reason: "Initial".into(),
            started_at: Time(o.now),
            shape: "shape-1".into(),
            rotate_request: rotate_request.map(Into::into),
            secret_name: "k".into(),
            revision: 1,
        }
    }

    fn observed(local: bool) -> Observed {
        Observed {
            key: KeyView {
                uid: "0b6e7c2a-1f0e-4c49-9a7e-2a8f0c1d2e3f".into(),
                generation: Some(1),
                deleting: false,
                finalized: true,
                rotate_request: None,
                shape: "shape-1".into(),
                secret_name: "k".into(),
                deletion_policy: DeletionPolicy::Revoke,
                rotation: Rotation::default(),
                key_shape: KeyShape::default(),
                description: None,
                requested_lifetime: Some(Duration::from_secs(86400)),
                rollout: Vec::new(),
            },
            stored: KeyStatus::default(),
            status: KeyStatus::default(),
            secrets: BTreeMap::new(),
            fresh: BTreeSet::new(),
            targets: BTreeMap::new(),
            provider: ProviderView::Ready(ReadyProvider {
                caps: Capabilities {
                    local,
                    listing: !local,
                    ..Default::default()
                },
                lifetime: Some(Duration::from_secs(86400)),
                refusal: None,
            }),
            run: Run::default(),
            now: ts("2026-03-01T00:00:00Z"),
            timing: Timing::with_deadline(Duration::from_secs(4)),
            next_attempt_id: "a1".into(),
        }
    }

    /// The Secret the executor would have written for `attempt`.
    fn written(attempt: &IssueAttempt, key_id: &str, now: Timestamp) -> SecretView {
        SecretView {
            uid: Some("s-uid".into()),
            resource_version: Some("1".into()),
            hash: format!("hash-{key_id}"),
            owned: true,
            attempt: Some(attempt.id.clone()),
            key_id: Some(key_id.into()),
            revision: Some(attempt.revision),
            created_at: Some(now),
            expires_at: Some(after(now, Duration::from_secs(86400))),
            shape: Some(attempt.shape.clone()),
            reason: Some(attempt.reason.clone()),
            rotate_request: attempt.rotate_request.clone(),
        }
    }

    /// Plans and carries out steps with ideal results until the plan is done.
    fn run_to_done(o: &mut Observed, key_id: &str) -> Vec<&'static str> {
        let mut steps = Vec::new();
        for _ in 0..20 {
            let p = plan(o);
            o.status = p.status.clone();
            let done = match &p.step {
                Step::Done(_) => return steps,
                Step::WriteStatus { .. } => {
                    o.stored = o.status.clone();
                    steps.push("WriteStatus");
                    Done::Written
                }
                Step::Issue { .. } => {
                    steps.push("Issue");
                    Done::Issued(IssuedFacts {
                        id: key_id.into(),
                        created_at: o.now,
                        expires_at: None,
                    })
                }
                Step::WriteSecret(a) => {
                    steps.push("WriteSecret");
                    Done::SecretWritten(written(a, key_id, o.now))
                }
                other => panic!("unexpected {other:?}"),
            };
            absorb(o, &p.step, done);
        }
        panic!("did not finish: {steps:?}");
    }

    #[test]
    fn a_local_key_is_minted_then_written_then_recorded() {
        let mut o = observed(true);
        assert_eq!(
            run_to_done(&mut o, "k1"),
            ["Issue", "WriteSecret", "WriteStatus"]
        );
        assert_eq!(o.stored.key_id.as_deref(), Some("k1"));
        assert!(o.stored.is_ready());
    }

    #[test]
    fn an_upstream_key_is_recorded_before_it_is_issued() {
        let mut o = observed(false);
        let steps = run_to_done(&mut o, "k1");
        assert_eq!(
            steps,
            ["WriteStatus", "Issue", "WriteSecret", "WriteStatus"]
        );
        assert!(o.stored.attempt.is_none() && o.stored.is_ready());
    }

    #[test]
    fn an_attempt_from_an_earlier_run_waits_out_its_landing_window() {
        let mut o = observed(false);
        let attempt = interrupted(&o, "old", None);
        o.status.attempt = Some(Box::new(attempt.clone()));
        // The conditions it settles to are written once.
        let settled = plan(&o);
        assert_eq!(settled.step, Step::WriteStatus { starts: None });
        o.status = settled.status;
        o.stored = o.status.clone();
        let deadline = landing_deadline(&attempt, &o.timing);
        assert_eq!(
            plan(&o).step,
            Step::Done(Wake::At(deadline)),
            "no new attempt meanwhile"
        );
        o.now = deadline;
        assert_eq!(
            plan(&o).step,
            Step::ReadSecret("k".into()),
            "the Secret is looked at first"
        );
        o.fresh.insert("k".into());
        assert_eq!(plan(&o).step, Step::RevokeOrphans(attempt));
    }

    #[test]
    fn adoption_records_what_the_attempt_was_for_and_the_newer_spec_rotates() {
        let mut o = observed(false);
        let attempt = interrupted(&o, "old", Some("r1"));
        o.status.attempt = Some(Box::new(attempt.clone()));
        o.stored = o.status.clone();
        o.secrets.insert("k".into(), written(&attempt, "k1", o.now));
        o.key.shape = "shape-2".into();
        o.key.generation = Some(2);
        let p = plan(&o);
        assert_eq!(p.status.shape.as_deref(), Some("shape-1"));
        assert_eq!(p.status.rotate_request.as_deref(), Some("r1"));
        match &p.step {
            Step::WriteStatus { starts: Some(next) } => {
                assert_eq!(next.reason, "SpecChanged");
                assert_eq!(next.shape, "shape-2");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            !p.status.is_ready(),
            "not Ready for generation 2 with a key of 1"
        );
    }

    #[test]
    fn only_a_key_that_can_hold_something_upstream_gets_a_finalizer() {
        for (local, provider, finalizer) in [
            (false, true, true),
            (true, true, false),
            // Unknown provider: kept as before, the finalizer first.
            (true, false, true),
        ] {
            let mut o = observed(local);
            o.key.finalized = false;
            if !provider {
                o.provider = ProviderView::Unavailable(Refusal {
                    reason: "ProviderNotFound",
                    message: "no such provider".into(),
                });
            }
            let step = plan(&o).step;
            assert_eq!(
                step == Step::AddFinalizer,
                finalizer,
                "local {local}, provider ready {provider}: {step:?}"
            );
        }
        // A builtin key whose status still records an upstream attempt keeps the rule.
        let mut o = observed(true);
        o.key.finalized = false;
        o.status.attempt = Some(Box::new(interrupted(&o, "x", None)));
        assert_eq!(plan(&o).step, Step::AddFinalizer);
        // And a builtin key without one is deleted by its owner's garbage collection.
        let mut o = observed(true);
        (o.key.finalized, o.key.deleting) = (false, true);
        assert_eq!(plan(&o).step, Step::Done(Wake::Never));
    }

    #[test]
    fn deletion_never_releases_the_finalizer_while_a_create_may_land() {
        let mut o = observed(false);
        o.key.deleting = true;
        o.status.attempt = Some(Box::new(interrupted(&o, "x", None)));
        o.stored = o.status.clone();
        let p = plan(&o);
        assert!(
            matches!(p.step, Step::WriteStatus { .. } | Step::Done(Wake::At(_))),
            "{:?}",
            p.step
        );
        assert!(!matches!(p.step, Step::ReleaseFinalizer));
    }

    #[test]
    fn failures_back_off_until_the_spec_changes() {
        let mut o = observed(false);
        o.status.backoff = Some(Box::new(crate::resources::IssueBackoff {
            failures: 3,
            last_failure_time: Time(o.now),
            generation: Some(1),
            rotate_request: None,
            reason: "IssueFailed".into(),
            message: "503".into(),
        }));
        o.stored = o.status.clone();
        let p = plan(&o);
        assert!(
            !matches!(p.step, Step::WriteStatus { starts: Some(_) }),
            "{:?}",
            p.step
        );
        o.key.generation = Some(2);
        assert!(matches!(
            plan(&o).step,
            Step::WriteStatus { starts: Some(_) }
        ));
    }

    #[test]
    fn a_refusal_issues_nothing_and_says_why() {
        let mut o = observed(false);
        if let ProviderView::Ready(p) = &mut o.provider {
            p.refusal = Some(Refusal {
                reason: "TagNotAllowed",
                message: "tag:x is not allowed".into(),
            });
        }
        let p = plan(&o);
        assert_eq!(p.step, Step::WriteStatus { starts: None });
        let ready = p
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "TagNotAllowed")
        );
    }
}
