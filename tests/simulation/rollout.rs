//! Workloads that follow their keys, in the simulation. Some schedules (drawn from a
//! generator of their own, so that every other schedule stays what it was) have a
//! Deployment `web` — sometimes one whose Pods never become ready — and a StatefulSet
//! `db`, and give their keys `spec.rollout` targets (`web`, `db`, sometimes `ghost`,
//! which does not exist until a user creates it) and sometimes `retire: AfterRollout`.
//! The workloads' controller finishes a rollout some steps after the template changed.
//!
//! - I6 every template annotation a key writes records a revision whose Secret keyward
//!   had already written, and never an older one than the record it replaces — so at
//!   most one per revision; and once settled, every target records the current one.
//! - I7 a previous key (retired with an overlap) is revoked only after every target
//!   that was there from the start records a later revision — unless annotating it
//!   failed, or a user edited the key's Secret, which ends the overlap's promise — and
//!   before its overlap ended only under `AfterRollout`, once every target finished a
//!   rollout of a template with a later revision.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use keyward::{
    lifecycle::Trigger,
    reconciler::rollout_annotation,
    resources::{AuthKey, AuthKeySpec, Retire, RolloutTarget, WorkloadKind},
    secret::{KEY_ID_ANNOTATION, REVISION_ANNOTATION},
};
use kube::ResourceExt;

use super::{marker_prefix, model::ApiServer, rng::Rng};

fn target(kind: WorkloadKind, name: &str) -> RolloutTarget {
    RolloutTarget {
        kind,
        name: name.into(),
    }
}

pub fn ghost() -> RolloutTarget {
    target(WorkloadKind::Deployment, "ghost")
}

/// `(revision, uid prefix)` of an annotation value.
fn record(value: &str) -> Option<(i64, &str)> {
    let (n, uid) = value.split_once('.')?;
    Some((n.parse().ok()?, uid))
}

/// What the rollout invariants remember.
#[derive(Default)]
pub struct Ledger {
    /// `(uid prefix, revision)` of every key keyward wrote into a Secret.
    secrets: BTreeSet<(String, i64)>,
    /// The revision each key id was written into a Secret with.
    revisions: BTreeMap<String, i64>,
    /// `(target, uid prefix)` whose annotation failed with an answer.
    failed: BTreeSet<(RolloutTarget, String)>,
    /// The latest revision of each `(target, annotation)` a rollout finished with.
    rolled: BTreeMap<(RolloutTarget, String), i64>,
    /// Keys whose Secret a user edited or deleted.
    pub tampered: BTreeSet<String>,
    /// The workloads there from the start.
    initial: BTreeSet<RolloutTarget>,
}

impl Ledger {
    /// Creates the workloads of a rollout schedule (one schedule in three).
    pub fn setup(rng: &mut Rng, api: &mut ApiServer) -> Self {
        let mut ledger = Self::default();
        if !rng.chance(330) {
            return ledger;
        }
        let web = target(WorkloadKind::Deployment, "web");
        let db = target(WorkloadKind::StatefulSet, "db");
        api.create_workload(&web, rng.chance(250));
        api.create_workload(&db, false);
        ledger.initial = BTreeSet::from([web, db]);
        ledger
    }

    /// The rollout part of a key's spec, in a rollout schedule.
    pub fn spec(&self, rng: &mut Rng, spec: &mut AuthKeySpec) {
        if self.initial.is_empty() {
            return;
        }
        let candidates = self.initial.iter().cloned().chain([ghost()]);
        spec.rollout = candidates
            .zip([700, 600, 150])
            .filter(|(_, chance)| rng.chance(*chance))
            .map(|(t, _)| t)
            .collect();
        if !spec.rollout.is_empty() && rng.chance(500) {
            spec.rotation.get_or_insert_default().retire = Some(Retire::AfterRollout);
        }
    }

    pub fn secret_written(&mut self, secret: &Secret) {
        let annotations = secret.annotations();
        let revision = annotations
            .get(REVISION_ANNOTATION)
            .and_then(|r| r.parse().ok());
        let owner = super::model::owner_of(secret).map(marker_prefix);
        if let (Some(owner), Some(revision)) = (owner, revision) {
            self.secrets.insert((owner, revision));
            if let Some(id) = annotations.get(KEY_ID_ANNOTATION) {
                self.revisions.insert(id.clone(), revision);
            }
        }
    }

    /// A rollout finished: every Pod runs the template's revisions.
    pub fn rolled_out(&mut self, target: &RolloutTarget, api: &ApiServer) {
        let template = api.workloads.get(target).map(|w| w.template.clone());
        for (key, value) in template.into_iter().flatten() {
            if let Some((n, _)) = record(&value) {
                let rolled = self.rolled.entry((target.clone(), key)).or_insert(n);
                *rolled = (*rolled).max(n);
            }
        }
    }

    pub fn annotate_failed(&mut self, target: &RolloutTarget, value: &str) {
        if let Some((_, uid)) = record(value) {
            self.failed.insert((target.clone(), uid.to_owned()));
        }
    }

    /// I6, as an annotation lands.
    pub fn annotating(&self, api: &ApiServer, target: &RolloutTarget, key: &str, value: &str) {
        let (revision, uid) = record(value).unwrap_or_else(|| panic!("I6: {value} is no record"));
        assert!(
            self.secrets.contains(&(uid.to_owned(), revision)),
            "I6: {target} annotated {key}={value} before any Secret held that revision"
        );
        let previous = api
            .workloads
            .get(target)
            .and_then(|w| w.template.get(key))
            .and_then(|v| record(v));
        if let Some((before, before_uid)) = previous
            && before_uid == uid
        {
            assert!(
                before <= revision,
                "I6: {target} moved back from revision {before} to {revision}"
            );
        }
    }

    /// I7, as keyward revokes `key_id`.
    pub fn revoking(&self, api: &ApiServer, now: Timestamp, key_id: &str) {
        let Some(owner) = api.keys.values().find(|k| {
            k.status
                .as_ref()
                .is_some_and(|s| s.retiring.iter().any(|r| r.key_id == key_id))
        }) else {
            return;
        };
        let status = owner.status.as_ref().unwrap();
        let entry = status.retiring.iter().find(|r| r.key_id == key_id).unwrap();
        let overlapped = Trigger::from_reason(&entry.reason).retire_with_overlap();
        if owner.metadata.deletion_timestamp.is_some() || !overlapped {
            return;
        }
        let Some(replaced) = self.revisions.get(key_id) else {
            return;
        };
        let uid = marker_prefix(&owner.uid().unwrap_or_default());
        let annotation = rollout_annotation(owner);
        let moved = |t: &RolloutTarget| {
            let w = api.workloads.get(t);
            w.and_then(|w| w.template.get(&annotation))
                .and_then(|v| record(v))
                .is_some_and(|(n, u)| u == uid && n > *replaced)
        };
        for t in owner
            .spec
            .rollout
            .iter()
            .filter(|t| self.initial.contains(*t))
        {
            let excused = self.failed.contains(&(t.clone(), uid.clone()))
                || self.tampered.contains(&owner.name_any());
            assert!(
                moved(t) || excused,
                "I7: {} revoked key {key_id} (revision {replaced}) while {t} was not told to move off it",
                owner.name_any()
            );
        }
        if now < entry.revoke_at.0 {
            let retire = owner.spec.rotation.as_ref().and_then(|r| r.retire);
            let all_done = owner.spec.rollout.iter().all(|t| {
                let rolled = self.rolled.get(&(t.clone(), annotation.clone()));
                moved(t) && rolled.is_some_and(|n| n > replaced)
            });
            assert!(
                retire == Some(Retire::AfterRollout) && !owner.spec.rollout.is_empty() && all_done,
                "I7: {} revoked key {key_id} before its overlap ended ({}) without every target rolled out",
                owner.name_any(),
                entry.revoke_at.0
            );
        }
    }
}

/// I6 at the end: every target of `key` that exists records its current revision.
pub fn annotated(api: &ApiServer, key: &AuthKey) -> bool {
    let Some(revision) = key.status.as_ref().and_then(|s| s.revision) else {
        return key.spec.rollout.is_empty();
    };
    let value =
        keyward::lifecycle::rollout::annotation_value(&key.uid().unwrap_or_default(), revision);
    let annotation = rollout_annotation(key);
    key.spec.rollout.iter().all(|t| {
        api.workloads
            .get(t)
            .is_none_or(|w| w.template.get(&annotation) == Some(&value))
    })
}
