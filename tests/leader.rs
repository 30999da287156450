//! `keyward run` as the Helm chart starts it, as a real process against the real
//! control plane: the metrics and health endpoints.

mod common;

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use k8s_openapi::api::core::v1::Secret;
use keyward::resources::{AuthKey, KeyStatus};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::json;

use common::{TestNamespace, eventually};

const WAIT: Duration = Duration::from_secs(60);

/// One `keyward run` process; SIGKILLed and reaped when dropped (a failing test too).
struct Operator {
    identity: String,
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Operator {
    fn start(ns: &str, identity: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("keyward.log");
        let port = keyward::control_plane::free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_keyward"))
            .arg("run")
            .args(["--namespaces", ns, "--operator-namespace", ns])
            .args(["--metrics-bind-address", &format!("127.0.0.1:{port}")])
            .args(extra)
            .env("KUBECONFIG", common::plane().kubeconfig())
            .env("POD_NAME", identity)
            .env("RUST_LOG", "info,keyward=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting keyward run");
        Self {
            identity: identity.to_owned(),
            child,
            port,
            log,
            _dir: dir,
        }
    }

    /// Two candidates elect on a short lease: 4s, renewed every 1s, given up after 3s.
    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let response = reqwest::get(url).await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    }

    async fn metrics(&self) -> String {
        let (status, text) =
            eventually("the metrics endpoint", WAIT, || self.get("/metrics")).await;
        assert_eq!(status, 200, "{text}");
        text
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.sigkill();
        if std::thread::panicking() {
            eprintln!("--- logs of {} ---\n{}", self.identity, self.logs());
        }
    }
}

fn rustls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

async fn apply(client: &Client, ns: &str, object: serde_json::Value) {
    let name = object["metadata"]["name"].as_str().unwrap().to_owned();
    let params = PatchParams::apply("test").force();
    let result = match object["kind"].as_str().unwrap() {
        "AuthKey" => Api::<AuthKey>::namespaced(client.clone(), ns)
            .patch(&name, &params, &Patch::Apply(&object))
            .await
            .map(|_| ()),
        "KeyProvider" => Api::<keyward::resources::KeyProvider>::namespaced(client.clone(), ns)
            .patch(&name, &params, &Patch::Apply(&object))
            .await
            .map(|_| ()),
        other => panic!("unexpected kind {other}"),
    };
    result.unwrap_or_else(|e| panic!("applying {name}: {e}"));
}

async fn builtin_provider(client: &Client, ns: &str) {
    apply(
        client,
        ns,
        json!({
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
        json!({
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
    eventually(&format!("{name}: {what}"), WAIT, || {
        let api = api.clone();
        let check = &check;
        async move { api.get_opt(name).await.ok()??.status.filter(|s| check(s)) }
    })
    .await
}

/// `reportingInstance` of every event about a key: the POD_NAME of the writer.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
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
