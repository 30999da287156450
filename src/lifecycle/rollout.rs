//! Workloads that follow their keys. After the Secret switched to revision n, each
//! `spec.rollout` target gets one Pod-template annotation recording n, so that it rolls
//! out onto the new key while the old one is still valid; with `retire: AfterRollout`
//! the old key goes once every target has finished that rollout.
//!
//! The annotation is the only record: a target whose template already says n is never
//! written again, so an operator restart or a failover restarts nothing. Each key
//! resource has its own annotation (`<kind>.keyward.dev/<name>`), so two keys that
//! target one workload do not overwrite each other.

use std::collections::BTreeMap;

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment, StatefulSet},
    core::v1::PodTemplateSpec,
};
use sha2::{Digest, Sha256};

use super::observe::Observed;
use crate::resources::{KeyStatus, Retire, RolloutTarget};

/// The domain of every rollout annotation.
const DOMAIN: &str = "keyward.dev";

/// The longest name part of an annotation key Kubernetes accepts.
const NAME_PART: usize = 63;

/// The Pod-template annotation one key resource writes, e.g. `authkey.keyward.dev/web`.
/// A name longer than an annotation's 63-character name part keeps its first 54
/// characters and gets a digest of the whole name.
pub fn annotation_key(kind: &str, name: &str) -> String {
    let name = if name.len() <= NAME_PART {
        name.to_owned()
    } else {
        let digest: String = Sha256::digest(name.as_bytes())[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{}-{digest}", &name[..NAME_PART - 9])
    };
    format!("{}.{DOMAIN}/{name}", kind.to_lowercase())
}

/// Whether a Pod-template annotation is one a key writes (all the workload caches keep
/// of a template).
pub fn is_rollout_annotation(key: &str) -> bool {
    key.split_once('/')
        .is_some_and(|(prefix, _)| prefix.ends_with(&format!(".{DOMAIN}")))
}

/// The value recording revision `revision` of the key resource `uid`: `<n>.<uid8>`, so
/// that a key deleted and created again under the same name restarts its targets too.
pub fn annotation_value(uid: &str, revision: i64) -> String {
    format!("{revision}.{}", super::uid_prefix(uid))
}

/// `value` records a later revision of the same key resource than `revision`: the
/// status planned from is older than what keyward already wrote, and must not win.
fn later(value: &str, uid: &str, revision: i64) -> bool {
    let uid = super::uid_prefix(uid);
    value
        .split_once('.')
        .filter(|(_, u)| *u == uid)
        .and_then(|(n, _)| n.parse::<i64>().ok())
        .is_some_and(|n| n > revision)
}

/// A rollout target as the planner sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetView {
    /// The workload object's version (what the executor's read-your-own-writes
    /// compares).
    pub resource_version: Option<String>,
    /// This key's annotation on the Pod template.
    pub annotation: Option<String>,
    /// The workload's controller has rolled its current Pod template out to every
    /// replica.
    pub rolled_out: bool,
}

/// What the planner reads of a workload.
pub trait Workload: kube::Resource {
    fn template(&self) -> &PodTemplateSpec;
    /// What `kubectl rollout status` waits for: the controller saw the latest spec and
    /// every desired replica runs the latest template and is ready.
    fn rolled_out(&self) -> bool;

    fn template_annotations(&self) -> Option<&BTreeMap<String, String>> {
        self.template().metadata.as_ref()?.annotations.as_ref()
    }
}

/// The view of `workload` for the key whose annotation is `annotation`.
pub fn view<W: Workload>(workload: &W, annotation: &str) -> TargetView {
    TargetView {
        resource_version: workload.meta().resource_version.clone(),
        annotation: workload
            .template_annotations()
            .and_then(|a| a.get(annotation))
            .cloned(),
        rolled_out: workload.rolled_out(),
    }
}

fn caught_up(generation: Option<i64>, observed: Option<i64>) -> bool {
    observed.is_some() && observed >= generation
}

impl Workload for Deployment {
    fn template(&self) -> &PodTemplateSpec {
        &self.spec.template
    }

    fn rolled_out(&self) -> bool {
        let want = self.spec.replicas.unwrap_or(1);
        self.status.as_ref().is_some_and(|s| {
            caught_up(self.metadata.generation, s.observed_generation)
                && s.updated_replicas.unwrap_or(0) == want
                && s.replicas.unwrap_or(0) == want
                && s.ready_replicas.unwrap_or(0) == want
        })
    }
}

impl Workload for StatefulSet {
    fn template(&self) -> &PodTemplateSpec {
        &self.spec.template
    }

    fn rolled_out(&self) -> bool {
        let want = self.spec.replicas.unwrap_or(1);
        self.status.as_ref().is_some_and(|s| {
            caught_up(self.metadata.generation, s.observed_generation)
                && s.updated_replicas.unwrap_or(0) == want
                && s.ready_replicas.unwrap_or(0) == want
                && s.update_revision.is_some()
                && s.current_revision == s.update_revision
        })
    }
}

impl Workload for DaemonSet {
    fn template(&self) -> &PodTemplateSpec {
        &self.spec.template
    }

    fn rolled_out(&self) -> bool {
        self.status.as_ref().is_some_and(|s| {
            caught_up(self.metadata.generation, s.observed_generation)
                && s.updated_number_scheduled.unwrap_or(0) == s.desired_number_scheduled
                && s.number_ready == s.desired_number_scheduled
        })
    }
}

/// The annotation value for the revision status records, once its Secret holds it —
/// also before the status that adopts it is written, so that an issuance that follows
/// at once does not skip it.
fn current(o: &Observed, s: &KeyStatus) -> Option<String> {
    let revision = s.revision?;
    let secret = o.secrets.get(s.secret_name.as_deref()?)?;
    let switched = s.secret_hash.as_deref() == Some(secret.hash.as_str());
    switched.then(|| annotation_value(&o.key.uid, revision))
}

/// The next target to annotate, and the value: one that exists, does not record the
/// current revision (nor a later one), and did not fail in this reconcile.
pub(super) fn due(o: &Observed, s: &KeyStatus) -> Option<(RolloutTarget, String)> {
    let value = current(o, s)?;
    let revision = s.revision?;
    o.key.rollout.iter().find_map(|target| {
        let view = o.targets.get(target)?;
        let recorded = view.annotation.as_deref();
        let done = recorded == Some(value.as_str())
            || recorded.is_some_and(|v| later(v, &o.key.uid, revision))
            || o.run.rollout_failed.contains_key(target);
        (!done).then(|| (target.clone(), value.clone()))
    })
}

/// With `AfterRollout`, the targets that have not finished rolling out onto the
/// current revision (a missing one never does); empty otherwise.
pub(super) fn waiting_for(o: &Observed, s: &KeyStatus) -> Vec<String> {
    if o.key.rotation.retire != Some(Retire::AfterRollout) {
        return Vec::new();
    }
    let value = current(o, s);
    o.key
        .rollout
        .iter()
        .filter(|target| {
            let view = o.targets.get(*target);
            !view.is_some_and(|v| v.rolled_out && v.annotation.is_some() && v.annotation == value)
        })
        .map(ToString::to_string)
        .collect()
}

/// With `AfterRollout`, every target runs the current revision: the previous keys
/// may go before their overlap ends.
pub(super) fn finished(o: &Observed, s: &KeyStatus) -> bool {
    o.key.rotation.retire == Some(Retire::AfterRollout)
        && !o.key.rollout.is_empty()
        && waiting_for(o, s).is_empty()
}

/// `Degraded` for the targets: an annotation that failed, or a target that does not
/// exist (it is annotated once it does).
pub(super) fn degradation(o: &Observed) -> Option<(String, String)> {
    if let Some((target, e)) = o.run.rollout_failed.iter().next() {
        return Some((
            "RolloutFailed".into(),
            format!("annotating {target} for a rollout failed: {e}; keyward retries"),
        ));
    }
    let missing: Vec<String> = o
        .key
        .rollout
        .iter()
        .filter(|t| !o.targets.contains_key(*t))
        .map(ToString::to_string)
        .collect();
    (!missing.is_empty()).then(|| {
        (
            "RolloutTargetNotFound".into(),
            format!(
                "rollout target {} not found in this namespace: check spec.rollout; keyward annotates a target once it exists",
                missing.join(", ")
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        lifecycle::{KeyView, ProviderView, ReadyProvider, SecretView, Step, Timing, Wake, plan},
        resources::{DeletionPolicy, RetiringKey, Rotation, WorkloadKind},
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::json;

    const UID: &str = "0b6e7c2a-1f0e-4c49-9a7e-2a8f0c1d2e3f";

    fn web() -> RolloutTarget {
        RolloutTarget {
            kind: WorkloadKind::Deployment,
            name: "web".into(),
        }
    }

    fn target(annotation: Option<&str>, rolled_out: bool) -> TargetView {
        TargetView {
            resource_version: None,
            annotation: annotation.map(str::to_owned),
            rolled_out,
        }
    }

    /// A key at revision 2 (committed, in its Secret) whose revision-1 key retires at
    /// noon, with `web` as its one rollout target.
    fn observed(retire: Retire, web_view: Option<TargetView>) -> Observed {
        let now: jiff::Timestamp = "2026-03-01T11:00:00Z".parse().unwrap();
        let status = KeyStatus {
            key_id: Some("k2".into()),
            revision: Some(2),
            shape: Some("shape".into()),
            secret_name: Some("s".into()),
            secret_hash: Some("h2".into()),
            retiring: vec![RetiringKey {
                key_id: "k1".into(),
                revoke_at: Time("2026-03-01T12:00:00Z".parse().unwrap()),
                reason: "Renewing".into(),
                waiting_for: Vec::new(),
            }],
            ..Default::default()
        };
        Observed {
            key: KeyView {
                uid: UID.into(),
                generation: Some(1),
                deleting: false,
                finalized: true,
                rotate_request: None,
                shape: "shape".into(),
                secret_name: "s".into(),
                deletion_policy: DeletionPolicy::Revoke,
                rotation: Rotation {
                    retire: Some(retire),
                    ..Default::default()
                },
                key_shape: Default::default(),
                description: None,
                requested_lifetime: None,
                rollout: vec![web()],
            },
            stored: status.clone(),
            status,
            secrets: BTreeMap::from([(
                "s".to_owned(),
                SecretView {
                    hash: "h2".into(),
                    owned: true,
                    ..Default::default()
                },
            )]),
            fresh: Default::default(),
            targets: web_view.into_iter().map(|v| (web(), v)).collect(),
            provider: ProviderView::Ready(ReadyProvider {
                caps: Default::default(),
                lifetime: None,
                refusal: None,
            }),
            run: Default::default(),
            now,
            timing: Timing::default(),
            next_attempt_id: "a".into(),
        }
    }

    #[test]
    fn a_target_is_annotated_once_for_the_revision_its_secret_holds() {
        let current = "2.0b6e7c2a";
        let rollout = |o: &Observed| due(o, &o.status).map(|(t, v)| (t.to_string(), v));
        let want = Some(("Deployment/web".to_owned(), current.to_owned()));
        let old = Some(target(Some("1.0b6e7c2a"), true));
        let o = observed(Retire::AfterOverlap, old.clone());
        assert_eq!(rollout(&o), want, "annotated for revision 1");
        assert_eq!(
            plan(&o).step,
            Step::Rollout {
                target: web(),
                value: current.into()
            }
        );
        let o = observed(Retire::AfterOverlap, Some(target(None, true)));
        assert_eq!(rollout(&o), want, "never annotated");
        let o = observed(Retire::AfterOverlap, Some(target(Some(current), false)));
        assert_eq!(rollout(&o), None, "already annotated for revision 2");
        let o = observed(Retire::AfterOverlap, Some(target(Some("3.0b6e7c2a"), true)));
        assert_eq!(rollout(&o), None, "a later revision is never undone");
        let o = observed(Retire::AfterOverlap, Some(target(Some("7.ffffffff"), true)));
        assert_eq!(rollout(&o), want, "another resource of that name");

        let mut o = observed(Retire::AfterOverlap, old.clone());
        o.stored.revision = Some(1);
        assert_eq!(rollout(&o), want, "adopted, its status write still to come");
        let mut o = observed(Retire::AfterOverlap, old.clone());
        o.secrets.get_mut("s").unwrap().hash = "edited".into();
        assert_eq!(rollout(&o), None, "the Secret does not hold revision 2");
        let mut o = observed(Retire::AfterOverlap, old);
        o.run.rollout_failed.insert(web(), "forbidden".into());
        assert_eq!(rollout(&o), None, "failed in this reconcile: retried later");
        let (reason, message) = degradation(&o).unwrap();
        assert_eq!(reason, "RolloutFailed");
        assert!(message.contains("Deployment/web") && message.contains("forbidden"));
        assert_eq!(plan(&o).step, Step::WriteStatus { starts: None });
    }

    #[test]
    fn a_missing_target_is_a_condition_not_an_error() {
        let o = observed(Retire::AfterOverlap, None);
        assert_eq!(due(&o, &o.status), None);
        let (reason, message) = degradation(&o).unwrap();
        assert_eq!(reason, "RolloutTargetNotFound");
        assert!(message.contains("Deployment/web"), "{message}");
        let p = plan(&o);
        let degraded = p.status.conditions.iter().find(|c| c.type_ == "Degraded");
        assert_eq!(
            degraded.map(|c| (c.status.as_str(), c.reason.as_str())),
            Some(("True", "RolloutTargetNotFound"))
        );
        let mut written = o.clone();
        written.stored = p.status.clone();
        written.status = p.status;
        let at = "2026-03-01T12:00:00Z".parse().unwrap();
        assert_eq!(
            plan(&written).step,
            Step::Done(Wake::At(at)),
            "no retry loop"
        );
    }

    #[test]
    fn after_rollout_the_old_key_goes_once_every_target_runs_the_new_one() {
        let current = "2.0b6e7c2a";
        let cases = [
            (
                Retire::AfterRollout,
                Some(target(Some(current), true)),
                true,
                "rolled out",
            ),
            (
                Retire::AfterRollout,
                Some(target(Some(current), false)),
                false,
                "rolling",
            ),
            (
                Retire::AfterRollout,
                Some(target(Some("1.0b6e7c2a"), true)),
                false,
                "not annotated yet",
            ),
            (
                Retire::AfterRollout,
                None,
                false,
                "a missing target waits out the overlap",
            ),
            (
                Retire::AfterOverlap,
                Some(target(Some(current), true)),
                false,
                "AfterOverlap",
            ),
        ];
        for (retire, view, revoked, what) in cases {
            let o = observed(retire, view);
            assert_eq!(finished(&o, &o.status), revoked, "{what}");
            let p = plan(&o);
            assert_eq!(
                p.step == Step::Revoke("k1".into()),
                revoked,
                "{what}: {:?}",
                p.step
            );
            let waiting = waiting_for(&o, &o.status);
            let expected = retire == Retire::AfterRollout && !revoked;
            assert_eq!(!waiting.is_empty(), expected, "{what}: {waiting:?}");
        }
        let mut o = observed(Retire::AfterRollout, Some(target(Some(current), false)));
        let p = plan(&o);
        assert_eq!(p.step, Step::WriteStatus { starts: None });
        assert_eq!(
            p.status.retiring[0].waiting_for,
            ["Deployment/web"],
            "status says what the old key waits for"
        );
        o.now = "2026-03-01T12:00:00Z".parse().unwrap();
        assert_eq!(
            plan(&o).step,
            Step::Revoke("k1".into()),
            "at the latest when the overlap ends"
        );
    }

    #[test]
    fn annotation_keys_are_per_key_resource_and_valid() {
        assert_eq!(annotation_key("AuthKey", "web"), "authkey.keyward.dev/web");
        assert_eq!(
            annotation_key("ServiceAccountKey", "web"),
            "serviceaccountkey.keyward.dev/web"
        );
        let long = "a".repeat(100);
        let key = annotation_key("AuthKey", &long);
        let (_, name) = key.split_once('/').unwrap();
        assert_eq!(name.len(), 63);
        assert_ne!(key, annotation_key("AuthKey", &format!("{long}b")));
        assert!(is_rollout_annotation(&key));
        assert!(!is_rollout_annotation("keyward.dev/revision"));
        assert!(!is_rollout_annotation("example.com/revision"));
    }

    #[test]
    fn a_value_names_revision_and_resource() {
        let uid = "0b6e7c2a-1f0e-4c49-9a7e-2a8f0c1d2e3f";
        assert_eq!(annotation_value(uid, 3), "3.0b6e7c2a");
        assert!(later("4.0b6e7c2a", uid, 3));
        assert!(!later("3.0b6e7c2a", uid, 3));
        assert!(!later("9.ffffffff", uid, 3), "another resource's record");
        assert!(!later("garbage", uid, 3));
    }

    fn deployment(generation: i64, status: serde_json::Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "generation": generation},
            "spec": {"replicas": 2, "selector": {}, "template": {
                "metadata": {"annotations": {"authkey.keyward.dev/k": "2.0b6e7c2a"}}}},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn a_deployment_has_rolled_out_once_every_replica_is_updated_and_ready() {
        let done = json!({"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2});
        let cases = [
            (json!({}), false, "no status yet"),
            (done.clone(), true, "caught up, all updated and ready"),
            (
                json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2}),
                false,
                "the controller has not seen the new template",
            ),
            (
                json!({"observedGeneration": 3, "replicas": 3, "updatedReplicas": 2, "readyReplicas": 2}),
                false,
                "an old replica is still there",
            ),
            (
                json!({"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 1}),
                false,
                "a new replica is not ready",
            ),
        ];
        for (status, want, what) in cases {
            assert_eq!(deployment(3, status).rolled_out(), want, "{what}");
        }
        let v = view(&deployment(3, done), "authkey.keyward.dev/k");
        assert_eq!(v.annotation.as_deref(), Some("2.0b6e7c2a"));
        assert!(v.rolled_out);
    }

    #[test]
    fn a_stateful_set_has_rolled_out_once_its_revisions_agree() {
        let set = |status: serde_json::Value| -> StatefulSet {
            serde_json::from_value(json!({
                "metadata": {"generation": 2},
                "spec": {"replicas": 2, "selector": {}, "serviceName": "db", "template": {}},
                "status": status,
            }))
            .unwrap()
        };
        let status = |current: &str| {
            json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2,
                   "readyReplicas": 2, "currentRevision": current, "updateRevision": "db-2"})
        };
        assert!(set(status("db-2")).rolled_out());
        assert!(!set(status("db-1")).rolled_out(), "still rolling");
    }

    #[test]
    fn a_daemon_set_has_rolled_out_once_every_node_runs_it_ready() {
        let set = |updated: i32, ready: i32| -> DaemonSet {
            serde_json::from_value(json!({
                "metadata": {"generation": 1},
                "spec": {"selector": {}, "template": {}},
                "status": {"observedGeneration": 1, "currentNumberScheduled": 3,
                           "desiredNumberScheduled": 3, "numberMisscheduled": 0,
                           "numberReady": ready, "updatedNumberScheduled": updated},
            }))
            .unwrap()
        };
        assert!(set(3, 3).rolled_out());
        assert!(!set(2, 3).rolled_out());
        assert!(!set(3, 2).rolled_out());
    }
}
