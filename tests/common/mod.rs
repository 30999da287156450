//! Shared integration-test harness: one real control plane per test binary, one fresh
//! namespace per test.
//!
//! The plane runs with workloads on (kube-scheduler and a kwok Node): Deployments and
//! StatefulSets a test creates really roll out, as in the cluster keyward runs in. It
//! costs each test binary about half a second of start-up.
//!
//! The control plane is started on first use from a dedicated thread (so it outlives
//! any single test's runtime) and stopped by its watchdog when the test binary exits —
//! also when a test failed or the binary was killed. Each test's namespace is deleted
//! when its guard drops, during a panic too.

#![allow(dead_code)]

mod harness;
pub mod operator;
pub mod requests;
pub mod upstream;
pub mod workloads;

/// Gives a test's `Harness { cluster: Cluster, … }` the `Cluster`'s fields and methods.
#[allow(unused_macros)]
macro_rules! cluster_harness {
    ($harness:ty) => {
        impl std::ops::Deref for $harness {
            type Target = common::Cluster;
            fn deref(&self) -> &common::Cluster {
                &self.cluster
            }
        }

        impl std::ops::DerefMut for $harness {
            fn deref_mut(&mut self) -> &mut common::Cluster {
                &mut self.cluster
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use cluster_harness;

// Not every test binary uses every helper.
#[allow(unused_imports)]
pub use harness::{
    Cluster, Controller, TEST_TIMING, WAIT, apply, condition, gone, ready, status_where,
};

use std::sync::OnceLock;

use k8s_openapi::api::core::v1::Namespace;
use keyward::control_plane::{ControlPlane, Options};
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
};

static PLANE: OnceLock<ControlPlane> = OnceLock::new();

/// The control plane of this test binary, started on first use.
pub fn plane() -> &'static ControlPlane {
    PLANE.get_or_init(|| {
        std::thread::spawn(|| {
            let _ = rustls::crypto::ring::default_provider().install_default();
            tokio::runtime::Runtime::new()
                .expect("tokio runtime")
                .block_on(ControlPlane::start(Options {
                    workloads: true,
                    ..Options::default()
                }))
                .unwrap_or_else(|e| panic!("starting the local control plane: {e}"))
        })
        .join()
        .expect("control plane start-up thread")
    })
}

/// An admin client for the shared control plane, bound to the calling test's runtime.
pub async fn client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    plane().client().await.expect("admin client")
}

/// A namespace that exists for one test and is deleted when dropped.
pub struct TestNamespace {
    pub name: String,
    kubeconfig: std::path::PathBuf,
}

impl TestNamespace {
    /// Creates `<prefix>-<random>`.
    pub async fn new(client: &Client, prefix: &str) -> Self {
        let name = format!("{prefix}-{:08x}", rand_suffix());
        let api: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"keyward.dev/test": "true"}}
        }))
        .unwrap();
        api.create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        Self {
            name,
            kubeconfig: plane().kubeconfig().to_owned(),
        }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // A runtime of its own: Drop may run while the test's runtime unwinds.
        let name = self.name.clone();
        let kubeconfig = self.kubeconfig.clone();
        let _ = std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                let text = std::fs::read_to_string(kubeconfig).ok()?;
                let client = keyward::control_plane::client_from(&text).await.ok()?;
                let api: Api<Namespace> = Api::all(client);
                api.delete(&name, &DeleteParams::default()).await.ok()
            })
        })
        .join();
    }
}

fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish() as u32
}

/// Every YAML document in a file, as JSON values (empty documents skipped).
pub fn yaml_documents(text: &str) -> Vec<serde_json::Value> {
    serde_saphyr::from_multiple::<serde_json::Value>(text)
        .unwrap_or_else(|e| panic!("parsing YAML: {e}"))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// Everything every test in this binary logged through `tracing`, for searching.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&LOGS.get_or_init(install_log_capture).lock().unwrap()).into_owned()
}

/// Installs the log capture (idempotent); call before starting a controller.
pub fn capture_logs() {
    LOGS.get_or_init(install_log_capture);
}

static LOGS: OnceLock<&'static std::sync::Mutex<Vec<u8>>> = OnceLock::new();

fn install_log_capture() -> &'static std::sync::Mutex<Vec<u8>> {
    let buffer: &'static std::sync::Mutex<Vec<u8>> =
        Box::leak(Box::new(std::sync::Mutex::new(Vec::new())));
    let writer = move || CaptureWriter(buffer);
    let _ = tracing_subscriber::fmt()
        .with_env_filter("debug,hyper=info,h2=info,rustls=info,tower=info")
        .with_writer(writer)
        .with_ansi(false)
        .try_init();
    buffer
}

struct CaptureWriter(&'static std::sync::Mutex<Vec<u8>>);

impl std::io::Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Polls `check` every 100ms until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
