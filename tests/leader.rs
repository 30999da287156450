//! `keyward run` as the Helm chart starts it, as real processes against the real
//! control plane: leader election between two replicas (only the leader reconciles; a
//! SIGKILLed leader is replaced within the lease duration with no key issued twice or
//! lost; SIGTERM hands over at once), the metrics and health endpoints, and
//! `--namespaces`.

mod common;

use std::time::{Duration, Instant};

use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Event, Secret},
};
use keyward::resources::{AuthKey, KeyStatus};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use serde_json::json;

use common::{
    TestNamespace, WAIT, apply, eventually,
    operator::{LEASE, Operator, holder, sample, wait_for_holder},
};

fn rustls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

async fn builtin_provider(client: &Client, ns: &str) {
    apply(
        client,
        ns,
        &json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "KeyProvider",
            "metadata": {"name": "keys"}, "spec": {"builtin": {}}
        }),
    )
    .await;
}

async fn create_key(client: &Client, ns: &str, name: &str, spec: serde_json::Value) {
    apply(
        client,
        ns,
        &json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "AuthKey",
            "metadata": {"name": name}, "spec": spec
        }),
    )
    .await;
}

fn is_ready(status: &KeyStatus) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True")
        && status.attempt.is_none()
}

async fn status_where(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    check: impl Fn(&KeyStatus) -> bool,
) -> KeyStatus {
    let api: Api<AuthKey> = Api::namespaced(client.clone(), ns);
    common::status_where(&api, name, what, check).await
}

/// `reportingInstance` of every event about a key: the POD_NAME of the writer.
async fn event_reporters(client: &Client, ns: &str) -> Vec<String> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.involved_object.kind.as_deref() == Some("AuthKey"))
        .map(|e| e.reporting_instance.unwrap_or_default())
        .collect()
}

fn key_spec() -> serde_json::Value {
    json!({"providerRef": {"name": "keys"}, "expiry": "720h", "secret": {"key": "TOKEN"}})
}

/// Every key is Ready at revision 1 — issued exactly once — with its Secret.
async fn all_issued_once(client: &Client, ns: &str, names: &[String]) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for name in names {
        let status = status_where(client, ns, name, "Ready", is_ready).await;
        assert_eq!(status.revision, Some(1), "{name} was issued more than once");
        let secret = secrets.get(name).await.unwrap();
        assert!(
            secret.data.unwrap().contains_key("TOKEN"),
            "{name}'s Secret"
        );
    }
}

#[tokio::test]
async fn a_killed_leader_is_replaced_within_the_lease_duration_and_no_key_is_issued_twice() {
    rustls();
    let client = common::client().await;
    let ns = TestNamespace::new(&client, "leader").await;
    builtin_provider(&client, &ns.name).await;

    let mut a = Operator::candidate(&ns.name, "replica-a");
    wait_for_holder(&client, &ns.name, "replica-a").await;
    let b = Operator::candidate(&ns.name, "replica-b");
    let mut names: Vec<String> = (0..3).map(|i| format!("before-{i}")).collect();
    for name in &names {
        create_key(&client, &ns.name, name, key_spec()).await;
    }
    all_issued_once(&client, &ns.name, &names).await;

    // Only the leader reconciled: every event is the leader's, and the standby (ready,
    // waiting) has not run a single reconcile.
    let reporters = event_reporters(&client, &ns.name).await;
    assert!(!reporters.is_empty());
    assert!(reporters.iter().all(|r| r == "replica-a"), "{reporters:?}");
    assert_eq!(b.get("/readyz").await.map(|r| r.0), Some(200));
    let standby = b.metrics().await;
    assert_eq!(sample(&standby, "keyward_leader"), Some(0.0), "{standby}");
    assert!(
        !standby.contains("keyward_reconcile_duration_seconds_count{"),
        "the standby reconciled:\n{standby}"
    );
    assert_eq!(
        holder(&client, &ns.name).await.as_deref(),
        Some("replica-a")
    );

    // More keys arrive around the crash: some may be mid-issuance when it hits.
    for i in 0..3 {
        let name = format!("around-{i}");
        create_key(&client, &ns.name, &name, key_spec()).await;
        names.push(name);
    }
    a.sigkill();
    let killed = Instant::now();
    wait_for_holder(&client, &ns.name, "replica-b").await;
    let takeover = killed.elapsed();
    eprintln!("takeover after SIGKILL: {takeover:?}");
    // Lease 4s after the last renewal (at most 1s before the kill) + one retry period.
    assert!(
        takeover < Duration::from_secs(4 + 1 + 2),
        "standby took {takeover:?}"
    );

    for i in 0..2 {
        let name = format!("after-{i}");
        create_key(&client, &ns.name, &name, key_spec()).await;
        names.push(name);
    }
    all_issued_once(&client, &ns.name, &names).await;
    let leader = b.metrics().await;
    assert_eq!(sample(&leader, "keyward_leader"), Some(1.0), "{leader}");
    let issued_by_b = sample(
        &leader,
        r#"keyward_rotations_total{kind="AuthKey",provider="builtin",reason="Initial"}"#,
    );
    assert!(issued_by_b.is_some_and(|n| n >= 2.0), "{leader}");
    assert!(b.logs().contains("acquired the leader lease"));
}

#[tokio::test]
async fn sigterm_releases_the_lease_so_the_standby_takes_over_at_once() {
    rustls();
    let client = common::client().await;
    let ns = TestNamespace::new(&client, "handover").await;
    builtin_provider(&client, &ns.name).await;
    // A long lease: only a release explains a quick takeover.
    let long = [
        "--leader-elect",
        "--lease-duration",
        "30s",
        "--renew-deadline",
        "20s",
        "--retry-period",
        "1s",
    ];
    let mut a = Operator::start(&ns.name, "replica-a", &long);
    wait_for_holder(&client, &ns.name, "replica-a").await;
    let b = Operator::start(&ns.name, "replica-b", &long);
    create_key(&client, &ns.name, "first", key_spec()).await;
    status_where(&client, &ns.name, "first", "Ready", is_ready).await;
    assert_eq!(b.get("/readyz").await.map(|r| r.0), Some(200));

    a.sigterm();
    let stopped = Instant::now();
    wait_for_holder(&client, &ns.name, "replica-b").await;
    let takeover = stopped.elapsed();
    eprintln!("takeover after SIGTERM: {takeover:?}");
    assert!(takeover < Duration::from_secs(5), "took {takeover:?}");
    let exit = a.child.wait().unwrap();
    assert!(exit.success(), "graceful exit: {exit:?}\n{}", a.logs());
    assert!(
        a.logs().contains("released the leader lease"),
        "{}",
        a.logs()
    );

    create_key(&client, &ns.name, "second", key_spec()).await;
    all_issued_once(&client, &ns.name, &["first".into(), "second".into()]).await;
    let reporters = event_reporters(&client, &ns.name).await;
    assert!(reporters.contains(&"replica-b".to_owned()), "{reporters:?}");
}

#[tokio::test]
async fn metrics_and_health_endpoints_show_the_key_lifecycle() {
    rustls();
    let client = common::client().await;
    let ns = TestNamespace::new(&client, "metrics").await;
    builtin_provider(&client, &ns.name).await;
    let op = Operator::start(&ns.name, "solo", &[]);
    assert_eq!(
        eventually("/readyz", WAIT, || async {
            op.get("/readyz").await.filter(|r| r.0 == 200)
        })
        .await
        .1,
        "ok\n"
    );
    assert_eq!(op.get("/healthz").await.map(|r| r.0), Some(200));
    assert_eq!(op.get("/nope").await.map(|r| r.0), Some(404));

    // Renews 10s (minus jitter) after issue; the old key is revoked 1s later.
    create_key(
        &client,
        &ns.name,
        "short",
        json!({"providerRef": {"name": "keys"}, "expiry": "1m",
               "rotation": {"renewBefore": "50s", "overlap": "1s"}}),
    )
    .await;
    create_key(
        &client,
        &ns.name,
        "dangling",
        json!({"providerRef": {"name": "missing"}, "expiry": "1h"}),
    )
    .await;
    status_where(&client, &ns.name, "short", "Ready", is_ready).await;
    let keys: Api<AuthKey> = Api::namespaced(client.clone(), &ns.name);
    keys.patch(
        "short",
        &PatchParams::apply("test-rotate"),
        &Patch::Apply(json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "AuthKey",
            "metadata": {"name": "short", "annotations": {"keyward.dev/rotate": "1"}}
        })),
    )
    .await
    .unwrap();
    status_where(&client, &ns.name, "short", "rotated and retired", |s| {
        is_ready(s) && s.revision >= Some(2) && s.retiring.is_empty()
    })
    .await;

    let short = r#"{kind="AuthKey",namespace="NS",name="short",provider="builtin"}"#
        .replace("NS", &ns.name);
    let dangling = r#"{kind="AuthKey",namespace="NS",name="dangling",provider="unknown"}"#
        .replace("NS", &ns.name);
    let now = jiff::Timestamp::now().as_second() as f64;
    let text = eventually("the metrics of both keys", WAIT, || async {
        let text = op.metrics().await;
        let expiry = sample(
            &text,
            &format!("keyward_key_expiry_timestamp_seconds{short}"),
        )?;
        let renewal = sample(
            &text,
            &format!("keyward_key_renewal_timestamp_seconds{short}"),
        )?;
        let revoked = sample(
            &text,
            r#"keyward_revocations_total{kind="AuthKey",provider="builtin"}"#,
        )?;
        (sample(&text, &format!("keyward_key_ready{short}")) == Some(1.0)
            && sample(&text, &format!("keyward_key_ready{dangling}")) == Some(0.0)
            && expiry > now
            && renewal > now - 60.0
            && renewal < expiry
            && revoked >= 1.0)
            .then_some(text)
    })
    .await;
    for (series, at_least) in [
        (
            r#"keyward_rotations_total{kind="AuthKey",provider="builtin",reason="Initial"}"#,
            1.0,
        ),
        (
            r#"keyward_rotations_total{kind="AuthKey",provider="builtin",reason="ForcedRotation"}"#,
            1.0,
        ),
        (
            r#"keyward_failures_total{kind="AuthKey",provider="unknown",operation="resolve"}"#,
            1.0,
        ),
        (
            r#"keyward_reconcile_duration_seconds_count{kind="AuthKey",result="ok"}"#,
            1.0,
        ),
        (
            r#"keyward_reconcile_duration_seconds_count{kind="AuthKey",result="error"}"#,
            1.0,
        ),
        (r#"keyward_queue_depth{kind="AuthKey"}"#, 0.0),
        ("keyward_leader", 1.0),
    ] {
        let value = sample(&text, series);
        assert!(
            value.is_some_and(|v| v >= at_least),
            "{series} = {value:?}, want ≥ {at_least}\n{text}"
        );
    }
    // Every documented metric is exposed; `upstream_*` appear with the first HTTP
    // request of a provider (the builtin one makes none; see the unit tests).
    for name in [
        "key_expiry_timestamp_seconds",
        "key_renewal_timestamp_seconds",
        "key_ready",
        "rotations",
        "revocations",
        "failures",
        "reconcile_duration_seconds",
        "queue_depth",
        "leader",
    ] {
        assert!(
            text.contains(&format!("# HELP keyward_{name} ")),
            "{name} missing\n{text}"
        );
    }
    let secret = Api::<Secret>::namespaced(client.clone(), &ns.name)
        .get("short")
        .await
        .unwrap();
    let value = String::from_utf8(secret.data.unwrap()["key"].0.clone()).unwrap();
    assert!(!text.contains(&value), "a key value in the metrics");

    // Deleting a key removes its series: nothing leaks.
    keys.delete("short", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the deleted key's series gone", WAIT, || async {
        let text = op.metrics().await;
        (!text.contains(r#"name="short""#)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_leader_that_sees_another_holder_stops_reconciling_and_exits() {
    rustls();
    let client = common::client().await;
    let ns = TestNamespace::new(&client, "usurped").await;
    builtin_provider(&client, &ns.name).await;
    let mut a = Operator::candidate(&ns.name, "replica-a");
    wait_for_holder(&client, &ns.name, "replica-a").await;

    // What a partitioned leader finds when it comes back: someone else took over.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    leases
        .patch(
            LEASE,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "holderIdentity": "replica-z",
                "renewTime": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
                "leaseDurationSeconds": 3600,
            }})),
        )
        .await
        .unwrap();
    let exit = eventually("the usurped leader exits", WAIT, || {
        let exited = a.child.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert_eq!(exit.code(), Some(1), "{}", a.logs());
    assert!(
        a.logs()
            .contains("another candidate holds the leader lease")
    );
    assert_eq!(
        holder(&client, &ns.name).await.as_deref(),
        Some("replica-z")
    );
}

#[tokio::test]
async fn namespaces_lists_what_is_watched() {
    rustls();
    let client = common::client().await;
    let first = TestNamespace::new(&client, "watched").await;
    let second = TestNamespace::new(&client, "watched").await;
    let other = TestNamespace::new(&client, "unwatched").await;
    for ns in [&first, &second, &other] {
        builtin_provider(&client, &ns.name).await;
        create_key(&client, &ns.name, "key", key_spec()).await;
    }
    // `--namespaces` given twice appends, as `--namespaces a,b` would; a duplicate is
    // watched once.
    let op = Operator::start(
        &first.name,
        "solo",
        &["--namespaces", &format!("{},{}", second.name, first.name)],
    );
    all_issued_once(&client, &first.name, &["key".into()]).await;
    all_issued_once(&client, &second.name, &["key".into()]).await;

    let untouched = Api::<AuthKey>::namespaced(client.clone(), &other.name)
        .get("key")
        .await
        .unwrap();
    assert!(untouched.status.is_none(), "{untouched:?}");
    assert!(untouched.metadata.finalizers.is_none(), "{untouched:?}");
    let metrics = op.metrics().await;
    assert!(!metrics.contains(&other.name), "{metrics}");
    assert_eq!(
        sample(
            &metrics,
            r#"keyward_rotations_total{kind="AuthKey",provider="builtin",reason="Initial"}"#
        ),
        Some(2.0),
        "each watched key issued once, not once per listing\n{metrics}"
    );
}
