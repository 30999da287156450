//! Prefect Cloud service-account keys end to end: the real control plane, the real
//! `prefect` provider (through `DefaultFactory`, so the shared transport too), and the
//! Prefect Cloud emulator (`keyward_emulators::prefect`) as the upstream.

mod common;

use std::sync::{Arc, atomic::Ordering};

use k8s_openapi::api::core::v1::Event;
use keyward::{
    providers::DefaultFactory,
    reconciler::CrashPoint,
    resources::{AuthKey, KeyProvider, KeyStatus, ServiceAccountKey},
};
use keyward_emulators::prefect::Prefect;
use kube::{Api, api::ListParams};
use serde_json::json;

use common::{Cluster, WAIT, apply, condition, eventually};

struct Harness {
    cluster: Cluster,
    prefect: Prefect,
    /// The provider's credential, to prove it never leaks.
    admin: String,
    http: reqwest::Client,
}

common::cluster_harness!(Harness);

impl Harness {
    /// A namespace with the emulator's admin key in a Secret, a `KeyProvider` named
    /// `prefect` reading it, and a controller watching the namespace.
    async fn new(prefix: &str) -> Self {
        let cluster = Cluster::new(prefix).await;
        let prefect = Prefect::start().await;
        let admin = prefect.add_admin_key();
        apply(
            &cluster.client,
            &cluster.ns.name,
            &json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "prefect-admin"},
                "stringData": {"api-key": admin}
            }),
        )
        .await;
        cluster
            .create::<KeyProvider>(
                "prefect",
                json!({"prefect": {
                    "apiURL": prefect.api_url(),
                    "accountId": prefect.account_id(),
                    "apiKeySecretRef": {"name": "prefect-admin", "key": "api-key"}
                }}),
            )
            .await;
        let mut h = Self {
            cluster,
            prefect,
            admin,
            http: reqwest::Client::new(),
        };
        h.start();
        h
    }

    /// Starts a fresh controller (a new process: a new factory, nothing cached).
    fn start(&mut self) {
        self.cluster.start(Arc::new(DefaultFactory::default()));
    }

    fn keys(&self) -> Api<ServiceAccountKey> {
        self.api()
    }

    async fn create(&self, name: &str, spec: serde_json::Value) {
        self.cluster.create::<ServiceAccountKey>(name, spec).await;
    }

    async fn status_where(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&KeyStatus) -> bool,
    ) -> KeyStatus {
        common::status_where(&self.keys(), name, what, check).await
    }

    async fn ready(&self, name: &str) -> KeyStatus {
        self.status_where(name, "Ready=True", |s| {
            ready_reason(s).as_deref() == Some("True/Issued") && s.attempt.is_none()
        })
        .await
    }

    async fn delete_and_wait(&self, name: &str) {
        self.cluster
            .delete_and_wait::<ServiceAccountKey>(name, "the resource to be gone")
            .await;
    }

    /// Forces a rotation of `name` (`keyward.dev/rotate: "1"`) by a controller that
    /// crashes at `point`, and leaves the controller stopped.
    async fn crash_a_rotation(&mut self, name: &str, point: CrashPoint) {
        self.kill().await;
        *self.faults.point.lock().unwrap() = Some(point);
        self.start();
        self.rotate::<ServiceAccountKey>(name, "1").await;
        eventually("the crash", WAIT, || async {
            self.faults.crashed.load(Ordering::SeqCst).then_some(())
        })
        .await;
        self.kill().await;
    }

    /// What Prefect's own client does to check a key: `GET /api/me/workspaces`.
    async fn authenticates(&self, key: &str) -> bool {
        let status = self
            .http
            .get(format!("{}/me/workspaces", self.prefect.api_url()))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        assert!(status == 200 || status == 401, "unexpected HTTP {status}");
        status == 200
    }
}

/// The spec of a `ServiceAccountKey` for the service account `bot`, with a rotation
/// overlap if given.
fn sa_spec(bot: &str, overlap: Option<&str>) -> serde_json::Value {
    let mut spec = json!({"providerRef": {"name": "prefect"}, "serviceAccount": {"name": bot}});
    if let Some(overlap) = overlap {
        spec["rotation"] = json!({"overlap": overlap});
    }
    spec
}

/// `"<status>/<reason>"` of the Ready condition.
fn ready_reason(status: &KeyStatus) -> Option<String> {
    condition(status, "Ready").map(|(status, reason, _)| format!("{status}/{reason}"))
}

fn ready_message(status: &KeyStatus) -> String {
    condition(status, "Ready")
        .map(|(_, _, message)| message)
        .unwrap_or_default()
}

#[tokio::test]
async fn a_created_service_account_is_issued_rotated_with_overlap_and_deleted() {
    let h = Harness::new("prefect-life").await;
    h.create(
        "agent",
        json!({
            "providerRef": {"name": "prefect"},
            "serviceAccount": {"name": "agent-bot"},
            "role": "Admin",
            "rotation": {"overlap": "10s"},
            "secret": {"key": "PREFECT_API_KEY"}
        }),
    )
    .await;
    let first = h.ready("agent").await;
    let bots = h.prefect.bots_named("agent-bot");
    assert_eq!(bots.len(), 1, "keyward created the service account");
    let bot = &bots[0];
    let key_id = first.key_id.clone().unwrap();
    assert_eq!(
        key_id,
        format!("created/{}/{}", bot.id, bot.active_key),
        "the key id names the bot and its current key"
    );
    let v1 = h.secret_value("agent", "PREFECT_API_KEY").await;
    assert_eq!(h.prefect.key(&bot.active_key).unwrap().value, v1);
    assert!(h.authenticates(&v1).await);
    let (what, create) = &h.prefect.bodies()[0];
    assert_eq!(what, "create");
    assert_eq!(create["name"], "agent-bot");
    assert!(create["api_key_expiration"].is_null(), "no expiry asked");
    assert!(
        create["account_role_id"].is_string(),
        "role looked up by name"
    );

    // Forced rotation: rotate_api_key, the old key living on for the overlap.
    h.rotate::<ServiceAccountKey>("agent", "1").await;
    let second = h
        .status_where("agent", "revision 2", |s| {
            s.revision == Some(2) && s.attempt.is_none()
        })
        .await;
    let v2 = h.secret_value("agent", "PREFECT_API_KEY").await;
    assert_ne!(v1, v2);
    assert!(
        h.authenticates(&v1).await,
        "the old key works during the overlap"
    );
    assert!(h.authenticates(&v2).await);
    assert_eq!(second.retiring.len(), 1);
    assert_eq!(second.retiring[0].key_id, key_id);
    let (what, rotate) = h.prefect.bodies().last().cloned().unwrap();
    assert_eq!(what, "rotate");
    assert_eq!(
        rotate,
        json!({"api_key_expiration": null, "old_key_expires_in_seconds": 10})
    );
    assert_eq!(
        h.prefect.bots_named("agent-bot").len(),
        1,
        "same bot, new key"
    );

    h.status_where("agent", "the overlap to end", |s| s.retiring.is_empty())
        .await;
    assert!(
        !h.authenticates(&v1).await,
        "after the overlap only the new key works"
    );
    assert!(h.authenticates(&v2).await);

    h.delete_and_wait("agent").await;
    assert!(
        h.prefect.bots_named("agent-bot").is_empty(),
        "the service account keyward created is deleted"
    );
    assert!(!h.authenticates(&v2).await);

    // No key value (issued or the provider's own) in logs, events or status.
    let events: Api<Event> = Api::namespaced(h.client.clone(), &h.ns.name);
    let notes: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.message)
        .collect();
    assert!(notes.iter().any(|n| n.contains("rotated to key created/")));
    let logs = common::captured_logs();
    for secret in [&v1, &v2, &h.admin] {
        assert!(
            !logs.contains(secret.as_str()),
            "a key value reached the logs"
        );
        assert!(notes.iter().all(|n| !n.contains(secret.as_str())));
        assert!(!format!("{second:?}").contains(secret.as_str()));
    }

    // Every upstream request was counted, by operation and status code, with no value.
    let metrics = keyward::metrics::global().encode();
    for series in [
        r#"keyward_upstream_requests_total{provider="prefect",operation="create service account",code="201"}"#,
        r#"keyward_upstream_requests_total{provider="prefect",operation="rotate key",code="201"}"#,
        r#"keyward_upstream_request_duration_seconds_count{provider="prefect",operation="create service account",code="201"}"#,
    ] {
        assert!(metrics.contains(series), "{series} missing from\n{metrics}");
    }
    for secret in [&v1, &v2, &h.admin] {
        assert!(
            !metrics.contains(secret.as_str()),
            "a key value reached the metrics"
        );
    }
}

#[tokio::test]
async fn an_adopted_service_account_survives_delete_with_its_key_rotated_away() {
    let h = Harness::new("prefect-adopt").await;
    let (bot_id, ui_key) = h.prefect.create_bot_in_ui("shared-bot");
    h.create(
        "adopter",
        json!({
            "providerRef": {"name": "prefect"},
            "serviceAccount": {"name": "shared-bot", "create": false},
        }),
    )
    .await;
    let status = h.ready("adopter").await;
    assert!(
        status
            .key_id
            .unwrap()
            .starts_with(&format!("adopted/{bot_id}/"))
    );
    let value = h.secret_value("adopter", "key").await;
    assert!(h.authenticates(&value).await);
    assert!(
        !h.authenticates(&ui_key).await,
        "adopting rotates the bot's previous key away"
    );

    h.delete_and_wait("adopter").await;
    let bots = h.prefect.bots_named("shared-bot");
    assert_eq!(bots.len(), 1, "an adopted service account is never deleted");
    assert_eq!(bots[0].id, bot_id);
    assert!(
        !h.authenticates(&value).await,
        "the last key keyward handed out no longer works"
    );
    let (what, rotate) = h.prefect.bodies().last().cloned().unwrap();
    assert_eq!(what, "rotate");
    assert_eq!(rotate["old_key_expires_in_seconds"], 0);
}

#[tokio::test]
async fn existing_and_missing_service_accounts_are_refused_clearly() {
    let h = Harness::new("prefect-refuse").await;
    let (taken, _) = h.prefect.create_bot_in_ui("taken");
    h.create(
        "duplicate",
        json!({"providerRef": {"name": "prefect"}, "serviceAccount": {"name": "taken"}}),
    )
    .await;
    h.create(
        "missing",
        json!({"providerRef": {"name": "prefect"}, "serviceAccount": {"name": "nobody", "create": false}}),
    )
    .await;
    let duplicate = h
        .status_where("duplicate", "ServiceAccountExists and no attempt", |s| {
            // A refusal leaves no attempt to recover (a retry after the backoff
            // records a fresh one for the duration of its call).
            ready_reason(s).as_deref() == Some("False/ServiceAccountExists") && s.attempt.is_none()
        })
        .await;
    assert!(
        ready_message(&duplicate).contains("create: false"),
        "{}",
        ready_message(&duplicate)
    );
    let missing = h
        .status_where("missing", "ServiceAccountNotFound", |s| {
            ready_reason(s).as_deref() == Some("False/ServiceAccountNotFound")
        })
        .await;
    assert!(ready_message(&missing).contains("\"nobody\""));

    // Deleting them touches nothing upstream: the foreign bot stays.
    h.delete_and_wait("duplicate").await;
    h.delete_and_wait("missing").await;
    let bots = h.prefect.bots();
    assert_eq!(bots.len(), 1);
    assert_eq!(bots[0].id, taken);
}

#[tokio::test]
async fn an_overlap_above_48h_and_an_auth_key_are_refused_before_any_request() {
    let h = Harness::new("prefect-check").await;
    h.create("long", sa_spec("long-bot", Some("49h"))).await;
    h.cluster
        .create::<AuthKey>("device", json!({"providerRef": {"name": "prefect"}}))
        .await;
    let long = h
        .status_where("long", "OverlapOutOfRange", |s| {
            ready_reason(s).as_deref() == Some("False/OverlapOutOfRange")
        })
        .await;
    let message = ready_message(&long);
    assert!(
        message.contains("rotation.overlap") && message.contains("48h"),
        "{message}"
    );
    let auth_keys: Api<AuthKey> = Api::namespaced(h.client.clone(), &h.ns.name);
    let device = eventually("KindNotSupported", WAIT, || {
        let api = auth_keys.clone();
        async move {
            let key = api.get_opt("device").await.ok()??;
            key.status
                .filter(|s| ready_reason(s).as_deref() == Some("False/KindNotSupported"))
        }
    })
    .await;
    assert!(ready_message(&device).contains("ServiceAccountKey"));
    assert!(
        h.prefect.faults().requests().is_empty(),
        "nothing reached Prefect: {:?}",
        h.prefect.faults().requests()
    );
}

#[tokio::test]
async fn a_crash_after_creating_the_service_account_leaves_nothing_unaccounted_for() {
    let mut h = Harness::new("prefect-crash").await;
    *h.faults.point.lock().unwrap() = Some(CrashPoint::AfterUpstream);
    h.create("crashy", sa_spec("crash-bot", None)).await;
    eventually("the crash", WAIT, || async {
        h.faults.crashed.load(Ordering::SeqCst).then_some(())
    })
    .await;
    // The crashed controller may itself recover before the kill (the status event
    // of the attempt queues the next reconcile at once), as a restarted one would.
    h.kill().await;
    h.start();
    h.ready("crashy").await;

    let ever = h.prefect.created_bots();
    assert!(
        ever.len() >= 2,
        "the interrupted attempt's bot, then the real one"
    );
    let bots = h.prefect.bots_named("crash-bot");
    assert_eq!(bots.len(), 1, "exactly one service account is left");
    assert_ne!(bots[0].id, ever[0].id, "the orphan was deleted");
    let value = h.secret_value("crashy", "key").await;
    let live: Vec<String> = h
        .prefect
        .live_bot_keys()
        .into_iter()
        .map(|k| k.value)
        .collect();
    assert_eq!(
        live,
        vec![value],
        "the only live key is the one in the Secret"
    );
    let events: Api<Event> = Api::namespaced(h.client.clone(), &h.ns.name);
    let revoked = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .any(|e| e.reason.as_deref() == Some("RevokedOrphan"));
    assert!(revoked, "an event says the orphan was revoked");

    h.delete_and_wait("crashy").await;
    assert!(h.prefect.bots().is_empty());
}

#[tokio::test]
async fn a_crash_after_rotating_heals_without_touching_the_service_account() {
    let mut h = Harness::new("prefect-crash-rot").await;
    h.create("rotor", sa_spec("rotor-bot", Some("3s"))).await;
    h.ready("rotor").await;
    let bot = h.prefect.bots_named("rotor-bot")[0].id.clone();
    *h.faults.point.lock().unwrap() = Some(CrashPoint::AfterUpstream);
    h.rotate::<ServiceAccountKey>("rotor", "1").await;
    eventually("the crash", WAIT, || async {
        h.faults.crashed.load(Ordering::SeqCst).then_some(())
    })
    .await;
    h.kill().await;

    h.start();
    h.status_where("rotor", "the rotation done and nothing retiring", |s| {
        ready_reason(s).as_deref() == Some("True/Issued")
            && s.attempt.is_none()
            && s.retiring.is_empty()
            && s.rotate_request.as_deref() == Some("1")
    })
    .await;
    let bots = h.prefect.bots_named("rotor-bot");
    assert_eq!(bots.len(), 1);
    assert_eq!(bots[0].id, bot, "the service account was never deleted");
    let value = h.secret_value("rotor", "key").await;
    assert!(h.authenticates(&value).await);
    let live: Vec<String> = h
        .prefect
        .live_bot_keys()
        .into_iter()
        .map(|k| k.value)
        .collect();
    assert_eq!(live, vec![value], "the key nobody saw is gone");
}

/// The keys keyward holds for a key resource: the ones in status, as Prefect key ids.
fn held_keys(status: &KeyStatus) -> std::collections::BTreeSet<String> {
    status
        .key_id
        .iter()
        .chain(status.retiring.iter().map(|r| &r.key_id))
        .map(|id| id.rsplit('/').next().unwrap().to_owned())
        .collect()
}

/// A forced rotation interrupted at every point a crash can hit, then finished by a
/// restarted controller: the service account is never deleted, the Secret's key works,
/// the old key works through its overlap, and the bot's inventory holds no key that
/// keyward does not — an interrupted rotation's unseen key is found by listing and
/// gone at once, not left to expire with the overlap.
#[tokio::test]
async fn a_rotation_interrupted_at_any_point_is_recovered_through_the_inventory() {
    for point in [
        CrashPoint::BeforeUpstream,
        CrashPoint::AfterUpstream,
        CrashPoint::AfterSecretWrite,
        CrashPoint::AfterStatusWrite,
    ] {
        let mut h = Harness::new("prefect-interrupted").await;
        h.create("rotor", sa_spec("rotor-bot", Some("60s"))).await;
        h.ready("rotor").await;
        let bot = h.prefect.bots_named("rotor-bot")[0].id.clone();
        let old = h.secret_value("rotor", "key").await;
        h.crash_a_rotation("rotor", point).await;
        h.start();
        let status = h
            .status_where("rotor", "the rotation done", |s| {
                ready_reason(s).as_deref() == Some("True/Issued")
                    && s.attempt.is_none()
                    && s.rotate_request.as_deref() == Some("1")
                    && s.revision >= Some(2)
            })
            .await;
        let bots = h.prefect.bots_named("rotor-bot");
        assert_eq!(bots.len(), 1, "{point:?}");
        assert_eq!(
            bots[0].id, bot,
            "{point:?}: the service account was never deleted"
        );
        let value = h.secret_value("rotor", "key").await;
        assert_ne!(value, old, "{point:?}: rotated");
        assert!(h.authenticates(&value).await, "{point:?}");
        assert!(
            h.authenticates(&old).await,
            "{point:?}: the old key works through the overlap"
        );
        let live: std::collections::BTreeSet<String> = h
            .prefect
            .live_bot_keys()
            .into_iter()
            .map(|k| k.id)
            .collect();
        assert_eq!(
            live,
            held_keys(&status),
            "{point:?}: every live key of the bot is one keyward holds"
        );
    }
}

/// A resource deleted while its rotation was interrupted: the key nobody saw, the key
/// in the Secret and the service account keyward made are all gone.
#[tokio::test]
async fn deleting_during_an_interrupted_rotation_leaves_nothing() {
    let mut h = Harness::new("prefect-delete-interrupted").await;
    h.create("rotor", sa_spec("doomed-bot", Some("60s"))).await;
    h.ready("rotor").await;
    h.crash_a_rotation("rotor", CrashPoint::AfterUpstream).await;
    h.keys()
        .delete("rotor", &kube::api::DeleteParams::default())
        .await
        .unwrap();
    h.start();
    common::gone(&h.keys(), "rotor", "the resource to be gone").await;
    assert!(h.prefect.bots_named("doomed-bot").is_empty());
    assert!(
        h.prefect.live_bot_keys().is_empty(),
        "no key is left working"
    );
}
