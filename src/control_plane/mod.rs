//! A real, local Kubernetes control plane: `etcd` and `kube-apiserver` on free
//! 127.0.0.1 ports, with generated certificates, ready-waited, keyward's CRDs installed.
//!
//! The integration tests, `keyward dev` and `hack/local-cluster` all start it the
//! same way. There is no kubelet, scheduler or controller-manager (the envtest shape):
//! Pods never run and owner-reference garbage collection does not happen, so keyward
//! cleans up what it writes explicitly.
//!
//! Processes are never leaked: a watchdog shell holds a pipe from this process and
//! stops both servers (and removes a temporary data folder) when the pipe closes —
//! whether this process exits normally, panics or is killed.

mod certs;

use std::{
    fs,
    io::Read,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};
use tempfile::TempDir;

pub use certs::Pair;

/// The script that finds or builds the binaries; embedded so the `keyward` binary
/// works wherever it runs, and kept as a script so people can run it by hand.
const BINARIES_SCRIPT: &str = include_str!("../../hack/control-plane-binaries");

/// How long a cold API server may take to answer `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("could not get kube-apiserver and etcd: {0}")]
    Binaries(String),
    #[error("control plane I/O in {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("generating certificates: {0}")]
    Certificates(#[from] rcgen::Error),
    #[error("{component} did not become ready within {timeout:?}; last lines of its log:\n{log}")]
    NotReady {
        component: &'static str,
        timeout: Duration,
        log: String,
    },
    #[error("{component} exited during start-up ({status}); last lines of its log:\n{log}")]
    Exited {
        component: &'static str,
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("reading the generated kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("talking to the API server: {0}")]
    Kube(#[from] kube::Error),
    #[error("installing CRDs: {0}")]
    Crds(#[from] crate::crds::ApplyError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where the control plane keeps its state.
#[derive(Default)]
pub struct Options {
    /// A folder to keep certificates, data and logs in; default: a temporary folder
    /// removed when the control plane stops.
    pub dir: Option<PathBuf>,
    /// Extra `kube-apiserver` flags, after keyward's own (e.g. an audit policy and log,
    /// as `hack/bench` uses to count requests by user).
    pub extra_apiserver_args: Vec<String>,
}

/// A running control plane. Dropping it stops both servers.
pub struct ControlPlane {
    dir: PathBuf,
    _temp: Option<TempDir>,
    etcd: Child,
    apiserver: Child,
    _watchdog: Child,
    authority: certs::Authority,
    server: String,
    kubeconfig: PathBuf,
}

/// The folder holding `kube-apiserver` and `etcd`: `KUBEBUILDER_ASSETS` when set,
/// otherwise the cache that `hack/control-plane-binaries` fills (building once).
pub fn binaries() -> Result<PathBuf, Error> {
    let output = Command::new("bash")
        .arg("-c")
        .arg(BINARIES_SCRIPT)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| Error::Binaries(format!("running bash: {e}")))?;
    if !output.status.success() {
        return Err(Error::Binaries(format!(
            "hack/control-plane-binaries failed ({}); see its output above",
            output.status
        )));
    }
    let dir = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    Ok(PathBuf::from(dir))
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver, waits until the API server is ready and
    /// installs keyward's CRDs.
    pub async fn start(options: Options) -> Result<Self, Error> {
        let bin = binaries()?;
        let (dir, temp) = match options.dir {
            Some(dir) => (dir, None),
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("keyward-control-plane-")
                    .tempdir()
                    .map_err(io(Path::new("/tmp")))?;
                (temp.path().to_owned(), Some(temp))
            }
        };
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let write = |name: &str, content: &str| -> Result<PathBuf, Error> {
            let path = dir.join(name);
            fs::write(&path, content).map_err(io(&path))?;
            Ok(path)
        };

        let authority = certs::Authority::new()?;
        let ca = write("ca.crt", &authority.cert_pem())?;
        let serving = authority.serving()?;
        let serving_cert = write("apiserver.crt", &serving.cert_pem)?;
        let serving_key = write("apiserver.key", &serving.key_pem)?;
        let sa = certs::service_account_key()?;
        let sa_public = write("service-account.pub", &sa.cert_pem)?;
        let sa_key = write("service-account.key", &sa.key_pem)?;

        let etcd_port = free_port();
        let peer_port = free_port();
        let etcd_data = dir.join("etcd");
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd = spawn(
            &bin.join("etcd"),
            &[
                "--name=default".into(),
                format!("--data-dir={}", etcd_data.display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
            &dir.join("etcd.log"),
        )?;

        let port = free_port();
        let server = format!("https://127.0.0.1:{port}");
        let apiserver = spawn(
            &bin.join("kube-apiserver"),
            &[
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={port}"),
                format!("--cert-dir={}", dir.join("apiserver-certs").display()),
                format!("--tls-cert-file={}", serving_cert.display()),
                format!("--tls-private-key-file={}", serving_key.display()),
                format!("--client-ca-file={}", ca.display()),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--authorization-mode=RBAC".into(),
                format!("--service-account-issuer={server}/"),
                format!("--service-account-key-file={}", sa_public.display()),
                format!("--service-account-signing-key-file={}", sa_key.display()),
                "--allow-privileged=true".into(),
                "--disable-admission-plugins=ServiceAccount".into(),
                "--endpoint-reconciler-type=none".into(),
                "--enable-priority-and-fairness=false".into(),
            ]
            .into_iter()
            .chain(options.extra_apiserver_args)
            .collect::<Vec<_>>(),
            &dir.join("kube-apiserver.log"),
        )?;

        let watchdog = watchdog(
            &[etcd.id(), apiserver.id()],
            temp.as_ref().map(|t| t.path()),
        )?;

        let admin = authority.client("keyward-admin", &["system:masters"])?;
        let kubeconfig = write(
            "kubeconfig",
            &kubeconfig_yaml(&server, &authority.cert_pem(), "keyward-admin", &admin),
        )?;

        let mut plane = Self {
            dir,
            _temp: temp,
            etcd,
            apiserver,
            _watchdog: watchdog,
            authority,
            server,
            kubeconfig,
        };
        plane.wait_ready().await?;
        crate::crds::apply(plane.client().await?).await?;
        Ok(plane)
    }

    /// The admin kubeconfig (user `keyward-admin`, group `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The folder holding certificates, data and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Process ids of etcd and kube-apiserver.
    pub fn pids(&self) -> [u32; 2] {
        [self.etcd.id(), self.apiserver.id()]
    }

    /// A client with admin rights.
    pub async fn client(&self) -> Result<Client, Error> {
        client_from(&fs::read_to_string(&self.kubeconfig).map_err(io(&self.kubeconfig))?).await
    }

    /// A kubeconfig for another identity: a client certificate for `user` in `groups`,
    /// so RBAC is exercised for real.
    pub fn kubeconfig_for(&self, user: &str, groups: &[&str]) -> Result<String, Error> {
        let pair = self.authority.client(user, groups)?;
        Ok(kubeconfig_yaml(
            &self.server,
            &self.authority.cert_pem(),
            user,
            &pair,
        ))
    }

    async fn wait_ready(&mut self) -> Result<(), Error> {
        // A plain HTTPS probe (/readyz is public): the Kubernetes client would log
        // every not-yet-ready answer as an error.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = reqwest::Certificate::from_pem(self.authority.cert_pem().as_bytes())
            .map_err(|e| Error::Binaries(format!("local CA: {e}")))?;
        let probe = reqwest::Client::builder()
            .add_root_certificate(ca)
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| Error::Binaries(format!("readiness probe client: {e}")))?;
        let url = format!("{}/readyz", self.server);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            for (component, child, log) in [
                ("etcd", &mut self.etcd, "etcd.log"),
                ("kube-apiserver", &mut self.apiserver, "kube-apiserver.log"),
            ] {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(Error::Exited {
                        component,
                        status,
                        log: log_tail(&self.dir.join(log)),
                    });
                }
            }
            if let Ok(response) = probe.get(&url).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady {
                    component: "kube-apiserver",
                    timeout: READY_TIMEOUT,
                    log: log_tail(&self.dir.join("kube-apiserver.log")),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for child in [&mut self.apiserver, &mut self.etcd] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A client from kubeconfig YAML text.
pub async fn client_from(kubeconfig: &str) -> Result<Client, Error> {
    let kubeconfig = Kubeconfig::from_yaml(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn spawn(binary: &Path, args: &[String], log: &Path) -> Result<Child, Error> {
    let out = fs::File::create(log).map_err(io(log))?;
    let err = out.try_clone().map_err(io(log))?;
    Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(io(binary))
}

/// A shell that waits for its stdin to close, then stops `pids` and removes `dir`.
/// We hold the write end of that pipe for as long as this process lives.
fn watchdog(pids: &[u32], dir: Option<&Path>) -> Result<Child, Error> {
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    let pids = pids.join(" ");
    let script = format!(
        "read -r _; kill -TERM {pids} 2>/dev/null; for _ in 1 2 3 4 5 6 7 8 9 10; do \
         kill -0 {pids} 2>/dev/null || break; sleep 0.5; done; kill -KILL {pids} 2>/dev/null; \
         [ -n \"$1\" ] && rm -rf \"$1\"; exit 0"
    );
    let dir = dir.map(|d| d.display().to_string()).unwrap_or_default();
    Command::new("sh")
        .args(["-c", &script, "keyward-watchdog", &dir])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io(Path::new("sh")))
}

fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = fs::File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn kubeconfig_yaml(server: &str, ca_pem: &str, user: &str, pair: &Pair) -> String {
    use base64::{Engine, engine::general_purpose::STANDARD};
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: keyward-local
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: keyward-local
  context:
    cluster: keyward-local
    user: {user}
current-context: keyward-local
",
        ca = STANDARD.encode(ca_pem),
        cert = STANDARD.encode(&pair.cert_pem),
        key = STANDARD.encode(&pair.key_pem),
    )
}
