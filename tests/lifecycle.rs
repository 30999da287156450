//! The key lifecycle against the real control plane: issue, Secret, status, rotation,
//! repair, delete, crash recovery, idle restarts, bad references and policy.
//! Upstream is an in-test double of a key API (tests/common/upstream.rs).

mod common;

use std::{sync::Arc, sync::atomic::Ordering, time::Duration};

use k8s_openapi::api::core::v1::{Event, Secret};
use keyward::{
    providers::{KeyApi, ProviderError, ProviderFactory, ResolvedProvider},
    reconciler::{self, CrashPoint},
    resources::{AuthKey, KeyProvider, KeyStatus},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use serde_json::json;

use common::{
    Cluster, WAIT, apply, condition, eventually,
    upstream::{Factory, Upstream},
};

struct Harness {
    cluster: Cluster,
    upstream: Arc<Upstream>,
}

common::cluster_harness!(Harness);

impl Harness {
    /// A namespace with a `KeyProvider` named `keys`, and a controller watching it.
    async fn new(prefix: &str) -> Self {
        let cluster = Cluster::new(prefix).await;
        cluster
            .create::<KeyProvider>("keys", json!({"builtin": {}}))
            .await;
        let mut h = Self {
            cluster,
            upstream: Upstream::new(),
        };
        h.start();
        h
    }

    /// Starts a fresh controller (a new process, as far as state goes).
    fn start(&mut self) {
        let factory = Arc::new(Factory(self.upstream.clone()));
        self.cluster.start(factory);
    }

    fn keys(&self) -> Api<AuthKey> {
        self.api()
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }

    async fn create(&self, name: &str, spec: serde_json::Value) {
        self.cluster.create::<AuthKey>(name, spec).await;
    }

    /// Waits until the key's status satisfies `check`.
    async fn status_where(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&KeyStatus) -> bool,
    ) -> KeyStatus {
        common::status_where(&self.keys(), name, what, check).await
    }

    /// Waits until the key resource no longer exists (finalizer released).
    async fn gone(&self, name: &str, what: &str) {
        common::gone(&self.keys(), name, what).await
    }

    async fn ready(&self, name: &str) -> KeyStatus {
        common::ready(&self.keys(), name).await
    }
}

fn spec(extra: serde_json::Value) -> serde_json::Value {
    let mut spec =
        json!({"providerRef": {"name": "keys"}, "expiry": "720h", "secret": {"key": "TOKEN"}});
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    spec
}

async fn events_text(client: &Client, ns: &str) -> String {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let list = events.list(&ListParams::default()).await.unwrap();
    serde_json::to_string(&list.items).unwrap()
}

#[tokio::test]
async fn apply_issues_a_key_into_the_secret_and_never_shows_the_value() {
    let h = Harness::new("issue").await;
    h.create("edge", spec(json!({"tags": ["tag:edge"], "secret": {"key": "TOKEN", "template": {"data": {"env": "KEY={{ key }}"}}}}))).await;
    let status = h.ready("edge").await;

    let key_id = status.key_id.clone().unwrap();
    let value = h.secret_value("edge", "TOKEN").await;
    assert_eq!(
        h.upstream.key(&key_id).unwrap().value,
        value,
        "the Secret holds the issued key"
    );
    assert_eq!(h.secret_value("edge", "env").await, format!("KEY={value}"));
    assert_eq!(status.revision, Some(1));
    assert!(
        status.created_at.is_some() && status.expires_at.is_some() && status.renewal_time.is_some()
    );
    assert!(
        status
            .secret_hash
            .as_deref()
            .unwrap()
            .starts_with("sha256:")
    );
    let key = h.keys().get("edge").await.unwrap();
    assert_eq!(status.observed_generation, key.metadata.generation);
    assert!(key.finalizers().contains(&reconciler::FINALIZER.to_owned()));
    let secret = h.secrets().get("edge").await.unwrap();
    let owner = &secret.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("AuthKey", Some(true))
    );

    // The value is nowhere but the Secret.
    let events = eventually("the Issued event", WAIT, || async {
        let text = events_text(&h.client, &h.ns.name).await;
        text.contains("Issued").then_some(text)
    })
    .await;
    assert!(
        !serde_json::to_string(&key).unwrap().contains(&value),
        "value in the key resource"
    );
    assert!(!events.contains(&value), "value in an event");
    assert!(
        !common::captured_logs().contains(&value),
        "value in the logs"
    );
    assert!(
        common::captured_logs().contains(&key_id),
        "the logs do name the key id"
    );
}

#[tokio::test]
async fn a_short_lived_key_rotates_before_expiry_and_the_old_one_outlives_the_overlap() {
    let h = Harness::new("renew").await;
    h.create(
        "short",
        spec(json!({"expiry": "2m", "rotation": {"renewBefore": "105s", "overlap": "5s"}})),
    )
    .await;
    let first = h.ready("short").await;
    let old_id = first.key_id.clone().unwrap();
    let old_value = h.secret_value("short", "TOKEN").await;

    let second = h
        .status_where("short", "revision 2", |s| {
            s.revision == Some(2) && s.attempt.is_none()
        })
        .await;
    let rotated_at = jiff::Timestamp::now();
    assert!(
        rotated_at < first.expires_at.clone().unwrap().0,
        "renewed before expiry"
    );
    assert_ne!(
        h.secret_value("short", "TOKEN").await,
        old_value,
        "new value in the Secret"
    );
    assert_eq!(second.retiring.len(), 1);
    assert_eq!(second.retiring[0].key_id, old_id);
    assert!(
        !h.upstream.key(&old_id).unwrap().revoked,
        "old key still valid during the overlap"
    );

    eventually("the old key to be revoked", WAIT, || async {
        h.upstream.key(&old_id).unwrap().revoked.then_some(())
    })
    .await;
    let waited = jiff::Timestamp::now().duration_since(rotated_at);
    assert!(
        waited.as_secs_f64() >= 4.0,
        "revoked only after the overlap ({waited:?})"
    );
    h.status_where("short", "retiring emptied", |s| s.retiring.is_empty())
        .await;
}

#[tokio::test]
async fn the_rotate_annotation_and_shaping_spec_changes_rotate() {
    let h = Harness::new("force").await;
    h.create("k", spec(json!({"tags": ["tag:a"]}))).await;
    let first = h.ready("k").await;

    h.rotate::<AuthKey>("k", "2026-11-23").await;
    let second = h
        .status_where("k", "forced rotation", |s| {
            s.revision == Some(2) && s.attempt.is_none()
        })
        .await;
    assert_eq!(second.retiring[0].reason, "ForcedRotation");
    assert_ne!(second.key_id, first.key_id);

    h.create("k", spec(json!({"tags": ["tag:b"]}))).await;
    let third = h
        .status_where("k", "spec-change rotation", |s| {
            s.revision == Some(3) && s.attempt.is_none()
        })
        .await;
    assert!(third.retiring.iter().any(|r| r.reason == "SpecChanged"));

    // Rotation timing is not shape: changing it re-plans renewal without a new key.
    h.create(
        "k",
        spec(json!({"tags": ["tag:b"], "rotation": {"renewBeforePercentage": 90}})),
    )
    .await;
    let fourth = h
        .status_where("k", "new renewal time", |s| {
            s.renewal_time != third.renewal_time
        })
        .await;
    assert_eq!(fourth.revision, Some(3));
}

#[tokio::test]
async fn a_deleted_or_edited_secret_gets_a_new_key_and_the_old_one_is_revoked() {
    let h = Harness::new("repair").await;
    h.create("k", spec(json!({}))).await;
    let first = h.ready("k").await;

    h.secrets()
        .delete("k", &DeleteParams::default())
        .await
        .unwrap();
    let second = h
        .status_where("k", "reissue after delete", |s| {
            s.revision == Some(2) && s.attempt.is_none()
        })
        .await;
    assert!(h.secrets().get_opt("k").await.unwrap().is_some());
    let old = first.key_id.unwrap();
    eventually(
        "revocation of the key nobody can vouch for",
        WAIT,
        || async { h.upstream.key(&old).unwrap().revoked.then_some(()) },
    )
    .await;

    h.secrets()
        .patch(
            "k",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"TOKEN": "hand-edited"}})),
        )
        .await
        .unwrap();
    let third = h
        .status_where("k", "reissue after edit", |s| {
            s.revision == Some(3) && s.attempt.is_none()
        })
        .await;
    assert_ne!(h.secret_value("k", "TOKEN").await, "hand-edited");
    let old = second.key_id.unwrap();
    eventually("revocation of the edited-away key", WAIT, || async {
        h.upstream.key(&old).unwrap().revoked.then_some(())
    })
    .await;
    assert_eq!(
        third
            .retiring
            .iter()
            .filter(|r| r.reason == "SecretMismatch")
            .count(),
        0,
        "revoked at once, not after an overlap"
    );
}

#[tokio::test]
async fn delete_revokes_everything_unless_retained_and_waits_out_upstream_failures() {
    let h = Harness::new("delete").await;
    h.create("gone", spec(json!({}))).await;
    h.create("kept", spec(json!({"deletionPolicy": "Retain"})))
        .await;
    h.create("stuck", spec(json!({}))).await;
    let gone = h.ready("gone").await.key_id.unwrap();
    let kept = h.ready("kept").await.key_id.unwrap();
    let stuck = h.ready("stuck").await.key_id.unwrap();

    for name in ["gone", "kept"] {
        h.keys()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    for name in ["gone", "kept"] {
        h.gone(name, "the resource to go").await;
        assert!(
            h.secrets().get_opt(name).await.unwrap().is_none(),
            "Secret {name} removed"
        );
    }
    assert!(h.upstream.key(&gone).unwrap().revoked);
    assert!(
        !h.upstream.key(&kept).unwrap().revoked,
        "Retain leaves the upstream key alone"
    );

    h.upstream.refuse_revoke.store(true, Ordering::SeqCst);
    h.keys()
        .delete("stuck", &DeleteParams::default())
        .await
        .unwrap();
    let status = h
        .status_where("stuck", "a condition saying why", |s| {
            condition(s, "Degraded").is_some_and(|c| c.0 == "True" && c.1 == "RevokeFailed")
        })
        .await;
    assert!(condition(&status, "Degraded").unwrap().2.contains("503"));
    assert!(
        h.keys()
            .get("stuck")
            .await
            .unwrap()
            .finalizers()
            .contains(&reconciler::FINALIZER.to_owned())
    );
    h.upstream.refuse_revoke.store(false, Ordering::SeqCst);
    h.gone("stuck", "deletion to finish once upstream recovers")
        .await;
    assert!(h.upstream.key(&stuck).unwrap().revoked);
}

#[tokio::test]
async fn a_crash_at_any_point_leaves_no_live_key_unaccounted_for() {
    for point in [
        CrashPoint::BeforeUpstream,
        CrashPoint::AfterUpstream,
        CrashPoint::AfterSecretWrite,
        CrashPoint::AfterStatusWrite,
    ] {
        let mut h = Harness::new("crash").await;
        h.kill().await;
        *h.faults.point.lock().unwrap() = Some(point);
        h.start();
        h.create("k", spec(json!({}))).await;
        eventually("the crash", WAIT, || async {
            h.faults.crashed.load(Ordering::SeqCst).then_some(())
        })
        .await;
        h.kill().await;
        h.start();
        let status = h.ready("k").await;

        let current = status.key_id.unwrap();
        let value = h.secret_value("k", "TOKEN").await;
        let live = h.upstream.live();
        let live_ids: Vec<&String> = live.iter().map(|(id, _)| id).collect();
        assert_eq!(
            live_ids,
            vec![&current],
            "{point:?}: only the key in the Secret is live"
        );
        assert_eq!(
            live[0].1.value, value,
            "{point:?}: the Secret holds the live key"
        );
        // How many keys were issued depends on how far the crashed controller's retry
        // got before the kill (itself a crash at an arbitrary point); what must hold is
        // that every one of them but the key in the Secret is revoked.
        assert!(h.upstream.issued() >= 1);
    }
}

#[tokio::test]
async fn restarting_with_200_ready_keys_calls_nothing_and_writes_nothing() {
    let mut h = Harness::new("idle").await;
    const KEYS: usize = 200;
    for i in 0..KEYS {
        h.create(&format!("k{i}"), spec(json!({}))).await;
    }
    let api = h.keys();
    eventually("200 Ready keys", Duration::from_secs(300), || async {
        let list = api.list(&ListParams::default()).await.ok()?;
        let ready = list.items.iter().filter(|k| {
            k.status.as_ref().is_some_and(|s| {
                s.attempt.is_none() && condition(s, "Ready").is_some_and(|c| c.0 == "True")
            })
        });
        (ready.count() == KEYS).then_some(())
    })
    .await;
    h.kill().await;

    let versions =
        |keys: Vec<AuthKey>, secrets: Vec<Secret>| -> Vec<String> {
            let mut v: Vec<String> =
                keys.iter()
                    .map(|k| format!("{}={}", k.name_any(), k.resource_version().unwrap()))
                    .chain(secrets.iter().map(|s| {
                        format!("secret/{}={}", s.name_any(), s.resource_version().unwrap())
                    }))
                    .collect();
            v.sort();
            v
        };
    let before = versions(
        api.list(&ListParams::default()).await.unwrap().items,
        h.secrets()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items,
    );
    let events_before = events_text(&h.client, &h.ns.name).await.len();
    h.upstream.calls.store(0, Ordering::SeqCst);

    h.start();
    let ctx = h.ctx().clone();
    eventually(
        "the restarted controller to reconcile every key",
        Duration::from_secs(120),
        || async { (ctx.reconciles.load(Ordering::SeqCst) >= KEYS as u64).then_some(()) },
    )
    .await;
    let after = versions(
        api.list(&ListParams::default()).await.unwrap().items,
        h.secrets()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items,
    );
    assert_eq!(
        h.upstream.calls.load(Ordering::SeqCst),
        0,
        "no upstream call"
    );
    assert_eq!(before, after, "no write to keys or Secrets");
    assert_eq!(
        events_text(&h.client, &h.ns.name).await.len(),
        events_before,
        "no new events"
    );
}

#[tokio::test]
async fn bad_references_say_what_to_create_or_fix() {
    let h = Harness::new("refs").await;
    h.create("no-provider", json!({"providerRef": {"name": "missing"}}))
        .await;
    h.create(
        "wrong-kind",
        json!({"providerRef": {"kind": "ClusterKeyProvider", "name": "keys"}}),
    )
    .await;
    apply(
        &h.client,
        &h.ns.name,
        &json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "KeyProvider", "metadata": {"name": "ts"},
            "spec": {"tailscale": {"apiKeySecretRef": {"name": "ts-credentials", "key": "api-key"}}}
        }),
    )
    .await;
    h.create("no-credentials", json!({"providerRef": {"name": "ts"}}))
        .await;

    let not_ready = |name: &'static str| {
        h.status_where(name, "Ready=False", |s| {
            condition(s, "Ready").is_some_and(|c| c.0 == "False")
        })
    };
    let (_, reason, message) = condition(&not_ready("no-provider").await, "Ready").unwrap();
    assert_eq!(reason, "ProviderNotFound");
    assert!(
        message.contains("KeyProvider missing does not exist") && message.contains("create it"),
        "{message}"
    );
    let (_, reason, message) = condition(&not_ready("wrong-kind").await, "Ready").unwrap();
    assert_eq!(reason, "ProviderNotFound");
    assert!(
        message.contains("ClusterKeyProvider keys does not exist"),
        "{message}"
    );
    let (_, reason, message) = condition(&not_ready("no-credentials").await, "Ready").unwrap();
    assert_eq!(reason, "CredentialsNotFound");
    assert!(
        message.contains(&format!("Secret {}/ts-credentials", h.ns.name))
            && message.contains("create it"),
        "{message}"
    );
    assert_eq!(h.upstream.issued(), 0);

    // The providers say the same about themselves.
    let providers: Api<KeyProvider> = Api::namespaced(h.client.clone(), &h.ns.name);
    let provider_ready = |name: &'static str| {
        let providers = providers.clone();
        eventually("provider status", WAIT, move || {
            let providers = providers.clone();
            async move {
                let status = providers.get(name).await.ok()?.status?;
                let ready = status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == "Ready")?
                    .clone();
                Some((status.provider_type?, ready))
            }
        })
    };
    let (kind, ready) = provider_ready("ts").await;
    assert_eq!(
        (kind.as_str(), ready.status.as_str()),
        ("tailscale", "False")
    );
    assert_eq!(ready.reason, "CredentialsNotFound");
    assert!(
        ready.message.contains("ts-credentials"),
        "{}",
        ready.message
    );
    let (kind, ready) = provider_ready("keys").await;
    assert_eq!((kind.as_str(), ready.status.as_str()), ("builtin", "True"));

    // A key that never issued anything is deleted without its provider.
    h.keys()
        .delete("no-provider", &DeleteParams::default())
        .await
        .unwrap();
    h.gone("no-provider", "the never-issued key to go").await;
}

#[tokio::test]
async fn policy_refuses_before_anything_is_issued() {
    let h = Harness::new("policy").await;
    let ckp = format!("policy-{}", h.ns.name);
    apply(&h.client, &h.ns.name, &json!({
        "apiVersion": "keyward.dev/v1alpha1", "kind": "ClusterKeyProvider", "metadata": {"name": ckp},
        "spec": {"builtin": {}, "policy": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": h.ns.name}},
            "allowedTags": ["tag:edge"], "maxExpiry": "24h"
        }}
    }))
    .await;
    let other = format!("closed-{}", h.ns.name);
    apply(&h.client, &h.ns.name, &json!({
        "apiVersion": "keyward.dev/v1alpha1", "kind": "ClusterKeyProvider", "metadata": {"name": other},
        "spec": {"builtin": {}}
    }))
    .await;
    let reference = |name: &str| json!({"kind": "ClusterKeyProvider", "name": name});
    h.create(
        "ok",
        json!({"providerRef": reference(&ckp), "tags": ["tag:edge"], "expiry": "12h"}),
    )
    .await;
    h.create(
        "namespace",
        json!({"providerRef": reference(&other), "expiry": "12h"}),
    )
    .await;
    h.create(
        "tag",
        json!({"providerRef": reference(&ckp), "tags": ["tag:prod"], "expiry": "12h"}),
    )
    .await;
    h.create(
        "expiry",
        json!({"providerRef": reference(&ckp), "tags": ["tag:edge"], "expiry": "48h"}),
    )
    .await;

    h.ready("ok").await;
    let issued = h.upstream.issued();
    for (name, rule) in [
        ("namespace", "NamespaceNotAllowed"),
        ("tag", "TagNotAllowed"),
        ("expiry", "ExpiryNotAllowed"),
    ] {
        let status = h
            .status_where(name, "a policy refusal", |s| {
                condition(s, "Ready").is_some_and(|c| c.0 == "False")
            })
            .await;
        let (_, reason, message) = condition(&status, "Ready").unwrap();
        assert_eq!(reason, rule, "{name}: {message}");
        assert!(status.key_id.is_none());
    }
    assert_eq!(
        h.upstream.issued(),
        issued,
        "nothing issued upstream for refused keys"
    );

    // Tightening the policy flags the key it no longer allows (not revoked: that would
    // cut off a running workload on a policy edit).
    let ok = h.ready("ok").await.key_id.unwrap();
    apply(&h.client, &h.ns.name, &json!({
        "apiVersion": "keyward.dev/v1alpha1", "kind": "ClusterKeyProvider", "metadata": {"name": ckp},
        "spec": {"builtin": {}, "policy": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": h.ns.name}},
            "allowedTags": ["tag:core"], "maxExpiry": "24h"
        }}
    }))
    .await;
    let status = h
        .status_where("ok", "the tightened policy to flag the key", |s| {
            condition(s, "Ready").is_some_and(|c| c.0 == "False" && c.1 == "TagNotAllowed")
        })
        .await;
    assert_eq!(status.key_id.as_deref(), Some(ok.as_str()));
    assert!(!h.upstream.key(&ok).unwrap().revoked);
    assert_eq!(h.upstream.issued(), issued);

    // Revoking on delete is not a policy question: the flagged key, and a key whose
    // provider has a maxExpiry, are deleted and revoked.
    h.keys()
        .delete("ok", &DeleteParams::default())
        .await
        .unwrap();
    h.gone("ok", "the flagged key to be deleted").await;
    assert!(h.upstream.key(&ok).unwrap().revoked);
}

#[tokio::test]
async fn a_key_revoked_upstream_is_found_by_inspection_and_replaced_unless_told_not_to() {
    let h = Harness::new("inspect").await;
    let spec = |reissue: bool| {
        json!({
            "providerRef": {"name": "keys"},
            "rotation": {"inspectInterval": "10s", "reissueWhenInvalid": reissue}
        })
    };
    h.create("replaced", spec(true)).await;
    h.create("left", spec(false)).await;
    let replaced = h.ready("replaced").await;
    let left = h.ready("left").await;
    let calls = h.upstream.calls.load(Ordering::SeqCst);

    // Revoked "in the console": the upstream says so when asked.
    for id in [&replaced, &left].map(|s| s.key_id.clone().unwrap()) {
        h.upstream
            .keys
            .lock()
            .unwrap()
            .get_mut(&id)
            .unwrap()
            .revoked = true;
    }
    let renewed = h
        .status_where("replaced", "a new key after inspection", |s| {
            s.revision == Some(2) && s.attempt.is_none()
        })
        .await;
    assert_ne!(renewed.key_id, replaced.key_id);
    assert!(
        h.upstream
            .key(renewed.key_id.as_deref().unwrap())
            .is_some_and(|k| !k.revoked)
    );
    let secret = h.secret_value("replaced", "key").await;
    assert_eq!(
        secret,
        h.upstream
            .key(renewed.key_id.as_deref().unwrap())
            .unwrap()
            .value
    );

    let flagged = h
        .status_where("left", "Ready=False KeyInvalid", |s| {
            condition(s, "Ready").is_some_and(|c| c.1 == "KeyInvalid")
        })
        .await;
    let (status, _, message) = condition(&flagged, "Ready").unwrap();
    assert_eq!(status, "False");
    assert!(
        message.contains("Revoked") && message.contains("reissueWhenInvalid is false"),
        "{message}"
    );
    assert_eq!(flagged.revision, Some(1), "not reissued");
    // Inspection is low-rate: a handful of calls, not a poll loop.
    let used = h.upstream.calls.load(Ordering::SeqCst) - calls;
    assert!(used <= 8, "{used} upstream calls");
}

#[tokio::test]
async fn a_failing_upstream_is_retried_with_backoff_not_in_a_loop() {
    let h = Harness::new("backoff").await;
    h.upstream.refuse_issue.store(true, Ordering::SeqCst);
    h.create("failing", spec(json!({}))).await;
    // Every failed attempt writes status; those writes must not re-trigger issuance
    // ahead of the backoff (1s, 2s, …).
    let calls = eventually("three issue attempts", WAIT, || async {
        let calls = h.upstream.issue_calls.lock().unwrap().clone();
        (calls.len() >= 3).then_some(calls)
    })
    .await;
    let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps[0] >= Duration::from_millis(900) && gaps[1] >= Duration::from_millis(1900),
        "attempts came too close together: {gaps:?}"
    );
    let status = h
        .status_where("failing", "IssueFailed", |s| {
            condition(s, "Ready").is_some_and(|c| c.1 == "IssueFailed")
        })
        .await;
    assert_eq!(status.key_id, None);

    // Once the upstream recovers, the key is issued at the next retry.
    h.upstream.refuse_issue.store(false, Ordering::SeqCst);
    h.ready("failing").await;
}

// Regressions of the lifecycle-correctness findings (issue 10): each failed on the
// reconciler before the planner, and passes now.

/// Waits until the status describes the key's current generation and nothing is in
/// flight: the controller has looked at the latest edit.
async fn settled(h: &Harness, name: &str) -> KeyStatus {
    let generation = h.keys().get(name).await.unwrap().metadata.generation;
    h.status_where(name, "the latest generation observed", |s| {
        s.observed_generation == generation && s.attempt.is_none() && s.is_ready()
    })
    .await
}

/// Finding 1: a resource deleted while its create is in flight lost its finalizer
/// without revoking anything (cleanup returned Ok on a stale status).
#[tokio::test]
async fn a_key_deleted_during_its_issuance_leaves_nothing_behind() {
    let h = Harness::new("delete-issuing").await;
    h.upstream.hold_creates(true);
    h.create("k", spec(json!({}))).await;
    eventually("the create to arrive upstream", WAIT, || async {
        (h.upstream.in_flight.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    h.keys()
        .delete("k", &DeleteParams::default())
        .await
        .unwrap();
    h.upstream.hold_creates(false);
    h.gone("k", "the deleted key to go").await;
    assert_eq!(h.upstream.issued(), 1, "the held create landed");
    assert!(h.upstream.live().is_empty(), "{:?}", h.upstream.live());
    assert!(
        h.secrets().get_opt("k").await.unwrap().is_none(),
        "no Secret left"
    );
}

/// Finding 2: a crash while the upstream was still processing the create left a key
/// nothing referenced (recovery looked once, found nothing yet, forgot the attempt).
#[tokio::test]
async fn a_create_that_lands_after_a_crash_is_found_and_revoked() {
    let mut h = Harness::new("late-landing").await;
    h.upstream.hold_creates(true);
    h.create("k", spec(json!({}))).await;
    eventually("the create to arrive upstream", WAIT, || async {
        (h.upstream.in_flight.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    h.kill().await;
    h.start();
    // The restarted controller must not give up on the attempt before it can no
    // longer land: it lands only after that controller has looked (finished a
    // reconcile, or sent another create), well within the landing window.
    looked(&h).await;
    h.upstream.hold_creates(false);
    let status = h.ready("k").await;
    eventually("the late key to be revoked", WAIT, || async {
        (h.upstream.live().len() == 1).then_some(())
    })
    .await;
    let live = h.upstream.live();
    assert_eq!(
        live[0].0,
        status.key_id.unwrap(),
        "only the Secret's key is live"
    );
    assert_eq!(h.upstream.issued(), 2, "the late one and its replacement");
}

/// Waits until the controller started last has finished a reconcile (or sent another
/// create): a create held until then lands after it looked.
async fn looked(h: &Harness) {
    let ctx = h.ctx().clone();
    eventually("the restarted controller to look", WAIT, || async {
        (ctx.reconciles.load(Ordering::SeqCst) >= 1
            || h.upstream.in_flight.load(Ordering::SeqCst) >= 2)
            .then_some(())
    })
    .await;
}

/// Deletes `k` (of `spec`) while keyward is down and its create is held upstream; the
/// create lands only after the restarted controller has looked at the deletion. The
/// resource must go and leave no live key: the held create was handed to nobody.
async fn delete_during_issuance_across_a_restart(prefix: &str, spec: serde_json::Value) {
    let mut h = Harness::new(prefix).await;
    h.upstream.hold_creates(true);
    h.create("k", spec).await;
    eventually("the create to arrive upstream", WAIT, || async {
        (h.upstream.in_flight.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    h.kill().await;
    h.keys()
        .delete("k", &DeleteParams::default())
        .await
        .unwrap();
    h.start();
    looked(&h).await;
    h.upstream.hold_creates(false);
    h.gone("k", "the deleted key to go").await;
    eventually("the held create to land", WAIT, || async {
        (h.upstream.in_flight.load(Ordering::SeqCst) == 0).then_some(())
    })
    .await;
    assert_eq!(h.upstream.issued(), 1, "the held create landed");
    assert!(h.upstream.live().is_empty(), "{:?}", h.upstream.live());
}

/// Finding 1 across a restart (deterministic, where the test above is a race).
#[tokio::test]
async fn a_key_deleted_during_its_issuance_across_a_restart_leaves_nothing_behind() {
    delete_during_issuance_across_a_restart("delete-issuing-restart", spec(json!({}))).await;
}

/// Found by the fault suite: a `Retain` resource deleted while its issuance was in
/// flight let go at once, and the create that landed afterwards stayed live with
/// nothing referencing it. `Retain` keeps the keys a resource was handed; nobody was
/// handed that one.
#[tokio::test]
async fn a_retained_key_deleted_during_its_issuance_leaves_no_orphan() {
    delete_during_issuance_across_a_restart(
        "retain-issuing",
        spec(json!({"deletionPolicy": "Retain"})),
    )
    .await;
}

/// Found by the fault suite: a spec edit that arrived while a reconcile was under way
/// (its attempt write met a 409, and keyward read the object again) was issued with
/// what had been resolved for the spec before the edit — the old lifetime, the old
/// spec's policy check — and recorded as done for the new one.
#[tokio::test]
async fn a_spec_edit_during_a_reconcile_is_issued_as_the_edit_asks() {
    let mut h = Harness::new("edit-mid-reconcile").await;
    h.create("k", spec(json!({}))).await;
    h.ready("k").await;
    h.kill().await;
    let gate = Arc::new(GatedFactory::new(Factory(h.upstream.clone())));
    h.rotate::<AuthKey>("k", "1").await;
    h.cluster.start(gate.clone());
    eventually("a reconcile resolving the provider", WAIT, || async {
        (gate.waiting.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    h.create("k", spec(json!({"expiry": "24h"}))).await;
    gate.open.send_replace(true);
    let status = h
        .status_where("k", "Ready for the edit", |s| {
            s.is_ready()
                && s.observed_generation == Some(2)
                && s.attempt.is_none()
                && s.rotate_request.as_deref() == Some("1")
        })
        .await;
    let (created, expires) = (status.created_at.unwrap().0, status.expires_at.unwrap().0);
    let lifetime = expires.duration_since(created).as_secs();
    assert!(
        (24 * 3600 - 2..=24 * 3600 + 2).contains(&lifetime),
        "issued for {lifetime}s, the edit asks for 24h"
    );
}

/// A factory whose provider lookups never finish once the crash point fired.
struct FrozenAfterCrash {
    inner: Factory,
    faults: Arc<common::upstream::CrashOnce>,
}

#[async_trait::async_trait]
impl ProviderFactory for FrozenAfterCrash {
    async fn build(&self, provider: &ResolvedProvider) -> Result<Arc<dyn KeyApi>, ProviderError> {
        if self.faults.crashed.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.inner.build(provider).await
    }
}

/// A factory that makes each provider lookup wait until `open` is true.
struct GatedFactory {
    inner: Factory,
    open: tokio::sync::watch::Sender<bool>,
    waiting: std::sync::atomic::AtomicUsize,
}

impl GatedFactory {
    fn new(inner: Factory) -> Self {
        Self {
            inner,
            open: tokio::sync::watch::channel(false).0,
            waiting: Default::default(),
        }
    }
}

#[async_trait::async_trait]
impl ProviderFactory for GatedFactory {
    async fn build(&self, provider: &ResolvedProvider) -> Result<Arc<dyn KeyApi>, ProviderError> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _ = self.open.subscribe().wait_for(|open| *open).await;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.inner.build(provider).await
    }
}

/// Finding 4 (and 5): an interrupted issuance adopted after a restart recorded the
/// spec as it was by then, so a spec change made while the operator was down was
/// marked done with a key of the old spec; and the Secret it moved from stayed.
#[tokio::test]
async fn an_adopted_issuance_records_what_it_was_for_and_the_change_since_rotates() {
    let mut h = Harness::new("adopt-past").await;
    // The crashed controller must do nothing more before it is killed: the adoption
    // then happens after the spec change, in the restarted one.
    h.kill().await;
    h.cluster.start(Arc::new(FrozenAfterCrash {
        inner: Factory(h.upstream.clone()),
        faults: h.faults.clone(),
    }));
    h.create("k", spec(json!({"tags": ["tag:a"]}))).await;
    h.ready("k").await;
    // A spec change that moves the Secret; the issuance for it reaches the new
    // Secret, then the operator dies.
    *h.faults.point.lock().unwrap() = Some(CrashPoint::AfterSecretWrite);
    h.create(
        "k",
        spec(json!({"tags": ["tag:b"], "secret": {"name": "moved", "key": "TOKEN"}})),
    )
    .await;
    eventually("the crash", WAIT, || async {
        h.faults.crashed.load(Ordering::SeqCst).then_some(())
    })
    .await;
    h.kill().await;
    // While it is down, the spec changes again.
    h.create(
        "k",
        spec(json!({"tags": ["tag:c"], "secret": {"name": "moved", "key": "TOKEN"}})),
    )
    .await;
    h.start();
    let keys = h.keys();
    let status = common::status_where(&keys, "k", "Ready for the latest spec", |s| {
        s.is_ready() && s.revision == Some(3) && s.attempt.is_none()
    })
    .await;
    let current = h.upstream.key(status.key_id.as_deref().unwrap()).unwrap();
    assert_eq!(
        current.shape.tags,
        vec![keyward::resources::Tag("tag:c".into())],
        "the key in the Secret was issued for the spec it is Ready for"
    );
    assert_eq!(h.secret_value("moved", "TOKEN").await, current.value);
    eventually("the Secret the key moved away from to go", WAIT, || async {
        h.secrets()
            .get_opt("k")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
}

/// Finding 6: a resource created with `keyward.dev/rotate` set (the annotation lives
/// in the GitOps manifest) got a second key on the next reconcile.
#[tokio::test]
async fn the_rotate_annotation_present_at_creation_issues_once() {
    let h = Harness::new("rotate-at-create").await;
    let manifest = |rotate: &str, extra: serde_json::Value| {
        json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "AuthKey",
            "metadata": {"name": "k", "annotations": {"keyward.dev/rotate": rotate}},
            "spec": spec(extra)
        })
    };
    apply(&h.client, &h.ns.name, &manifest("2026-12-01", json!({}))).await;
    let status = h.ready("k").await;
    assert_eq!(status.rotate_request.as_deref(), Some("2026-12-01"));
    // An edit that does not shape the key: once the status describes it, the
    // controller has looked at the key after it became Ready, and found nothing due.
    apply(
        &h.client,
        &h.ns.name,
        &manifest("2026-12-01", json!({"rotation": {"overlap": "1m"}})),
    )
    .await;
    let status = settled(&h, "k").await;
    assert_eq!(
        status.revision,
        Some(1),
        "one key for the creation and its annotation"
    );
    assert_eq!(h.upstream.issued(), 1);

    // A spec edit and an annotation bump in one apply: one new key.
    apply(
        &h.client,
        &h.ns.name,
        &manifest("2026-12-02", json!({"tags": ["tag:x"]})),
    )
    .await;
    h.status_where("k", "the edit and the bump done", |s| {
        s.revision == Some(2) && s.attempt.is_none() && s.is_ready()
    })
    .await;
    apply(
        &h.client,
        &h.ns.name,
        &manifest(
            "2026-12-02",
            json!({"tags": ["tag:x"], "rotation": {"overlap": "2m"}}),
        ),
    )
    .await;
    let status = settled(&h, "k").await;
    assert_eq!(status.revision, Some(2), "one issuance per trigger");
    assert_eq!(h.upstream.issued(), 2);
}

/// Finding 7: `renewBefore` close to the lifetime rotated in a loop (the jitter put
/// the renewal before creation). A ten-second window renews once, after ~9–10s.
#[tokio::test]
async fn renew_before_close_to_the_lifetime_renews_once_per_window() {
    let h = Harness::new("renew-window").await;
    h.create(
        "k",
        spec(json!({"expiry": "10m", "rotation": {"renewBefore": "9m50s", "overlap": "1s"}})),
    )
    .await;
    let first = h.ready("k").await;
    let second = h
        .status_where("k", "revision 2", |s| {
            s.revision == Some(2) && s.attempt.is_none()
        })
        .await;
    let created = |s: &KeyStatus| s.created_at.as_ref().unwrap().0;
    let gap = created(&second).duration_since(created(&first));
    assert!(
        gap.as_secs() >= 8,
        "renewed {gap:?} after issuance; the window is 10s"
    );
    assert!(
        second.renewal_time.as_ref().unwrap().0 > created(&second),
        "the next renewal is after the new key's creation"
    );
}

/// Finding 8: the issuance backoff lived in memory, so a restart forgot it.
#[tokio::test]
async fn the_issuance_backoff_survives_a_restart() {
    let mut h = Harness::new("backoff-restart").await;
    h.upstream.refuse_issue.store(true, Ordering::SeqCst);
    h.create("k", spec(json!({}))).await;
    let before = eventually("four failed issuances", WAIT * 2, || async {
        let calls = h.upstream.issue_calls.lock().unwrap().clone();
        (calls.len() >= 4).then_some(calls)
    })
    .await;
    let status = h
        .status_where("k", "the fourth failure recorded", |s| {
            s.backoff.as_ref().is_some_and(|b| b.failures >= 4)
        })
        .await;
    let failures = status.backoff.unwrap().failures;
    h.kill().await;
    h.start();
    let after = eventually("the next issuance", WAIT * 2, || async {
        let calls = h.upstream.issue_calls.lock().unwrap().clone();
        (calls.len() > before.len()).then_some(calls)
    })
    .await;
    let gap = after[before.len()] - before[before.len() - 1];
    let backoff = keyward::lifecycle::backoff_after(failures);
    assert!(
        gap + Duration::from_secs(1) >= backoff,
        "retried {gap:?} after the last failure across a restart; the backoff is {backoff:?}"
    );
}
