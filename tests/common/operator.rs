//! `keyward run` as real processes against the shared control plane, as the Helm chart
//! starts it: the operator binary, its metrics endpoint, and the leader Lease.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};

use super::{WAIT, eventually};

pub const LEASE: &str = "keyward";

/// A lease short enough for a test to see a takeover: 4s, renewed every 1s, given up
/// after 3s.
pub const SHORT_LEASE: [&str; 6] = [
    "--lease-duration",
    "4s",
    "--renew-deadline",
    "3s",
    "--retry-period",
    "1s",
];

/// One `keyward run` process; SIGKILLed and reaped when dropped (a failing test too).
pub struct Operator {
    identity: String,
    pub child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Operator {
    pub fn start(ns: &str, identity: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("keyward.log");
        let port = keyward::control_plane::free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_keyward"))
            .arg("run")
            .args(["--namespaces", ns, "--operator-namespace", ns])
            .args(["--metrics-bind-address", &format!("127.0.0.1:{port}")])
            .args(extra)
            .env("KUBECONFIG", super::plane().kubeconfig())
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
    pub fn candidate(ns: &str, identity: &str) -> Self {
        let mut args = vec!["--leader-elect"];
        args.extend(SHORT_LEASE);
        Self::start(ns, identity, &args)
    }

    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let response = reqwest::get(url).await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    }

    pub async fn metrics(&self) -> String {
        let (status, text) =
            eventually("the metrics endpoint", WAIT, || self.get("/metrics")).await;
        assert_eq!(status, 200, "{text}");
        text
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn sigkill(&mut self) {
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

pub async fn holder(client: &Client, ns: &str) -> Option<String> {
    let lease = Api::<Lease>::namespaced(client.clone(), ns)
        .get_opt(LEASE)
        .await
        .ok()??;
    lease.spec?.holder_identity
}

pub async fn wait_for_holder(client: &Client, ns: &str, identity: &str) {
    eventually(&format!("{identity} holds the lease"), WAIT, || async {
        (holder(client, ns).await.as_deref() == Some(identity)).then_some(())
    })
    .await;
}

/// The value of the one sample whose line starts with `series` (name and labels).
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}
