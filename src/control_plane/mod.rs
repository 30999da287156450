//! A real, local Kubernetes control plane: `etcd`, `kube-apiserver` and
//! `kube-controller-manager` on 127.0.0.1, with generated certificates, ready-waited,
//! keyward's CRDs installed. With [`Options::workloads`] also `kube-scheduler` and one
//! Node that `kwok` simulates, so Pods are scheduled and become Running and Ready.
//!
//! The integration tests, `keyward dev` and `hack/local-cluster` all start it the
//! same way. The controller-manager makes it behave like a cluster rather than a bare
//! API server: owner-reference garbage collection, namespace deletion, the
//! Deployment / ReplicaSet / StatefulSet / DaemonSet / Job controllers, ServiceAccounts
//! and their tokens, CSR signing. There is no kubelet: no container ever runs; with
//! workloads on, kwok plays the kubelet of [`NODE`] at the API level, which is what
//! rollouts and readiness need. See docs/control-plane.md.
//!
//! Ports are picked free; a server that lost its port between the pick and its bind
//! (someone else took it) is started again on fresh ones, a bounded number of times.
//!
//! Processes are never leaked: a watchdog shell holds a pipe from this process, is told
//! every server's pid as it starts, and stops them all (and removes a temporary data
//! folder) when the pipe closes — whether this process exits normally, panics or is
//! killed.

mod certs;

use std::{
    fs,
    io::{Read, Seek, SeekFrom, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client, Config,
    api::PostParams,
    config::{KubeConfigOptions, Kubeconfig},
};
use tempfile::TempDir;

pub use certs::Pair;

/// The script that finds or builds the binaries; embedded so the `keyward` binary
/// works wherever it runs, and kept as a script so people can run it by hand.
const BINARIES_SCRIPT: &str = include_str!("../../hack/control-plane-binaries");

/// How long a cold server may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// How long a stopped server may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How many times a server is started on fresh ports after losing its port.
const PORT_ATTEMPTS: u32 = 5;

/// The simulated Node (with [`Options::workloads`]).
pub const NODE: &str = "kwok-node-0";

/// The annotation that puts a Node under kwok's management.
const KWOK_NODE_ANNOTATION: (&str, &str) = ("kwok.x-k8s.io/node", "fake");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("could not get the control-plane binaries: {0}")]
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
    #[error(
        "{component} found its port taken {attempts} times in a row (address already in use): \
         something on this machine takes ports as fast as they are picked; stop it or retry"
    )]
    PortsTaken {
        component: &'static str,
        attempts: u32,
    },
    #[error("{0} is not running")]
    NotRunning(String),
    #[error("the process watchdog is gone ({0}); servers would outlive this process")]
    Watchdog(std::io::Error),
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

/// Where a server's ports come from: given the server's name (`etcd`,
/// `kube-apiserver`, …), a port nobody listens on right now.
pub type PortPicker = Arc<dyn Fn(&str) -> u16 + Send + Sync>;

/// How to start a control plane.
#[derive(Default)]
pub struct Options {
    /// A folder to keep certificates, data and logs in; default: a temporary folder
    /// removed when the control plane stops.
    pub dir: Option<PathBuf>,
    /// Also run kube-scheduler and kwok with one simulated Node ([`NODE`]), so Pods
    /// are scheduled and become Running and Ready: Deployments, StatefulSets and
    /// DaemonSets roll out as in a cluster. Off by default: most tests need no Pods.
    pub workloads: bool,
    /// Where the servers' ports come from; default: [`free_port`]. A picker that
    /// hands out a taken port shows that start-up recovers from losing one.
    pub ports: Option<PortPicker>,
    /// Extra `kube-apiserver` flags, after keyward's own (e.g. an audit policy and log,
    /// as `hack/bench` uses to count requests by user).
    pub extra_apiserver_args: Vec<String>,
}

/// A running control plane. Dropping it stops every server.
pub struct ControlPlane {
    processes: Processes,
    authority: certs::Authority,
    server: String,
    kubeconfig: PathBuf,
    /// One API-server restart at a time.
    restarting: tokio::sync::Mutex<()>,
}

/// The folder holding the binaries (see `hack/control-plane-binaries`):
/// `KUBEBUILDER_ASSETS` when it holds them all, otherwise the cache that script fills
/// (building once).
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

/// A port nobody listens on right now (someone may take it before it is used).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

/// The files every server is started with.
struct Files {
    ca: PathBuf,
    ca_key: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    sa_public: PathBuf,
    sa_key: PathBuf,
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-controller-manager (and, with
    /// [`Options::workloads`], kube-scheduler and kwok with its Node), waits until each
    /// is ready and installs keyward's CRDs.
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
        let serving = authority.serving()?;
        let sa = certs::service_account_key()?;
        let files = Files {
            ca: write("ca.crt", &authority.cert_pem())?,
            ca_key: write("ca.key", &authority.key_pem())?,
            serving_cert: write("serving.crt", &serving.cert_pem)?,
            serving_key: write("serving.key", &serving.key_pem)?,
            sa_public: write("service-account.pub", &sa.cert_pem)?,
            sa_key: write("service-account.key", &sa.key_pem)?,
        };

        let processes = Processes::new(
            bin,
            dir.clone(),
            temp,
            options.ports.unwrap_or_else(|| Arc::new(|_| free_port())),
            &authority,
            options.extra_apiserver_args,
        )?;
        let started = Instant::now();
        let server = processes.start_api(&files).await?;
        let api_ready = started.elapsed();
        let kubeconfig = write(
            "kubeconfig",
            &kubeconfig_yaml(
                &server,
                &authority.cert_pem(),
                "keyward-admin",
                &authority.client("keyward-admin", &["system:masters"])?,
            ),
        )?;
        let plane = Self {
            processes,
            authority,
            server,
            kubeconfig,
            restarting: tokio::sync::Mutex::new(()),
        };
        let client = plane.client().await?;
        // Before the controller-manager: its garbage collector then knows keyward's
        // kinds from the start instead of after its next discovery resync.
        crate::crds::apply(client.clone()).await?;
        let crds_ready = started.elapsed();
        plane.start_controllers(&files, options.workloads).await?;
        if options.workloads {
            plane.start_node(&client).await?;
        }
        tracing::debug!(
            ?api_ready,
            ?crds_ready,
            all_ready = ?started.elapsed(),
            workloads = options.workloads,
            "local control plane started"
        );
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

    /// The folder holding certificates, data and logs (`<server>.log`).
    pub fn dir(&self) -> &Path {
        &self.processes.dir
    }

    /// Every running server by name (`etcd`, `kube-apiserver`, …) and process id.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.processes
            .servers()
            .iter()
            .map(|s| (s.name, s.child.id()))
            .collect()
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

    /// Stops kube-apiserver (SIGTERM, SIGKILL after a bound) and starts it again on the
    /// same port with the same flags and etcd, returning once it is ready again. Clients
    /// see the outage a real API server restart causes; every object persists.
    pub async fn restart_apiserver(&self) -> Result<(), Error> {
        let _one = self.restarting.lock().await;
        let args = self.processes.stop("kube-apiserver").await?;
        let readyz = format!("{}/readyz", self.server);
        // The port is ours: whoever took it meanwhile (an outgoing connection's
        // ephemeral port) lets go soon, so wait rather than move.
        for attempt in 1..=PORT_ATTEMPTS {
            self.processes.spawn("kube-apiserver", args.clone())?;
            match self
                .processes
                .until(&["etcd", "kube-apiserver"], "kube-apiserver", async || {
                    self.processes.answers(&readyz, "ok").await
                })
                .await
            {
                Err(Error::Exited { log, .. }) if port_taken(&log) => {
                    self.processes.forget("kube-apiserver")?;
                    tokio::time::sleep(Duration::from_millis(500) * attempt).await;
                }
                other => return other,
            }
        }
        Err(Error::PortsTaken {
            component: "kube-apiserver",
            attempts: PORT_ATTEMPTS,
        })
    }

    /// kube-controller-manager, and with `workloads` kube-scheduler too, each with its
    /// own identity, ready once each answers its health check.
    async fn start_controllers(&self, files: &Files, workloads: bool) -> Result<(), Error> {
        let mut names = vec!["kube-controller-manager"];
        if workloads {
            names.push("kube-scheduler");
        }
        for name in &names {
            // The identities the default RBAC policy grants these components.
            let user = format!("system:{name}");
            self.write_kubeconfig(name, &user, &[])?;
        }
        let dir = self.dir();
        // What both run with: their identity, and health checks over TLS on a picked
        // port with the serving certificate.
        let common = |name: &str, port: u16| -> Vec<String> {
            vec![
                format!(
                    "--kubeconfig={}",
                    dir.join(format!("{name}.kubeconfig")).display()
                ),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={port}"),
                format!("--tls-cert-file={}", files.serving_cert.display()),
                format!("--tls-private-key-file={}", files.serving_key.display()),
                "--leader-elect=false".into(),
            ]
        };
        self.processes
            .on_fresh_ports(&names, async || {
                let manager = self.processes.port("kube-controller-manager");
                let mut args = common("kube-controller-manager", manager);
                args.extend([
                    "--controllers=*".into(),
                    // Building ~40 controllers, each with its own ServiceAccount and
                    // token, takes seconds at the default 20 requests/s.
                    "--kube-api-qps=500".into(),
                    "--kube-api-burst=1000".into(),
                    "--use-service-account-credentials=true".into(),
                    format!(
                        "--service-account-private-key-file={}",
                        files.sa_key.display()
                    ),
                    format!("--root-ca-file={}", files.ca.display()),
                    // CSR signing: certificates the API server trusts, as in a cluster.
                    format!("--cluster-signing-cert-file={}", files.ca.display()),
                    format!("--cluster-signing-key-file={}", files.ca_key.display()),
                ]);
                self.processes.spawn("kube-controller-manager", args)?;
                // /healthz answers before any controller exists; the controllers' own
                // checks appear in it once they are built.
                let mut probes = vec![(
                    format!("https://127.0.0.1:{manager}/healthz?verbose"),
                    "[+]garbage-collector-controller ok",
                )];
                if workloads {
                    let scheduler = self.processes.port("kube-scheduler");
                    let args = common("kube-scheduler", scheduler);
                    self.processes.spawn("kube-scheduler", args)?;
                    probes.push((format!("https://127.0.0.1:{scheduler}/readyz"), "ok"));
                }
                for ((url, says), name) in probes.iter().zip(&names) {
                    self.processes
                        .until(&names, name, async || {
                            self.processes.answers(url, says).await
                        })
                        .await?;
                }
                Ok(())
            })
            .await
    }

    /// kwok and the Node it simulates, ready once the Node is Ready and schedulable.
    async fn start_node(&self, client: &Client) -> Result<(), Error> {
        self.write_kubeconfig("kwok", "kwok", &["system:masters"])?;
        let nodes: Api<Node> = Api::all(client.clone());
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": NODE,
                "annotations": {KWOK_NODE_ANNOTATION.0: KWOK_NODE_ANNOTATION.1},
                "labels": {
                    "kubernetes.io/hostname": NODE,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                },
            },
        }))
        .expect("a valid Node");
        nodes.create(&PostParams::default(), &node).await?;
        let dir = self.dir();
        self.processes.spawn(
            "kwok",
            vec![
                format!("--kubeconfig={}", dir.join("kwok.kubeconfig").display()),
                format!(
                    "--config={}",
                    self.processes.bin.join("kwok-stages.yaml").display()
                ),
                "--manage-all-nodes=false".into(),
                format!(
                    "--manage-nodes-with-annotation-selector={}={}",
                    KWOK_NODE_ANNOTATION.0, KWOK_NODE_ANNOTATION.1
                ),
                // Heartbeats through a Lease, as kubelets do (the stages renew it).
                "--node-lease-duration-seconds=40".into(),
                "--node-ip=127.0.0.1".into(),
                "--cidr=10.244.0.1/16".into(),
            ],
        )?;
        self.processes
            .until(&["kwok"], "kwok", async || {
                nodes.get(NODE).await.is_ok_and(|n| schedulable(&n))
            })
            .await
    }

    fn write_kubeconfig(&self, name: &str, user: &str, groups: &[&str]) -> Result<(), Error> {
        let path = self.dir().join(format!("{name}.kubeconfig"));
        let pair = self.authority.client(user, groups)?;
        let text = kubeconfig_yaml(&self.server, &self.authority.cert_pem(), user, &pair);
        fs::write(&path, text).map_err(io(&path))
    }
}

/// Ready, and without the taints that keep Pods off a Node that is not.
fn schedulable(node: &Node) -> bool {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.effect == "NoSchedule"));
    ready && !tainted
}

/// A server process, and the arguments it was started with (to start it again).
struct Server {
    name: &'static str,
    args: Vec<String>,
    child: Child,
    /// Where this run's output starts in `<name>.log` (a restart appends).
    log_start: u64,
}

/// The server processes of one control plane: started, watched, stopped. Dropping it
/// kills them all.
struct Processes {
    bin: PathBuf,
    dir: PathBuf,
    ports: PortPicker,
    /// An HTTPS client trusting the local CA, for health checks: the Kubernetes client
    /// would log every not-yet-ready answer as an error.
    probe: reqwest::Client,
    servers: Mutex<Vec<Server>>,
    watchdog: Mutex<Watchdog>,
    /// `Options::extra_apiserver_args`.
    extra_api_args: Vec<String>,
    _temp: Option<TempDir>,
}

impl Processes {
    fn new(
        bin: PathBuf,
        dir: PathBuf,
        temp: Option<TempDir>,
        ports: PortPicker,
        authority: &certs::Authority,
        extra_api_args: Vec<String>,
    ) -> Result<Self, Error> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = reqwest::Certificate::from_pem(authority.cert_pem().as_bytes())
            .map_err(|e| Error::Binaries(format!("local CA: {e}")))?;
        let probe = reqwest::Client::builder()
            .add_root_certificate(ca)
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| Error::Binaries(format!("health-check client: {e}")))?;
        let watchdog = Watchdog::start(temp.as_ref().map(|t| t.path()))?;
        Ok(Self {
            bin,
            dir,
            ports,
            probe,
            servers: Mutex::new(Vec::new()),
            watchdog: Mutex::new(watchdog),
            extra_api_args,
            _temp: temp,
        })
    }

    /// etcd and kube-apiserver; returns the API server's URL once it is ready.
    async fn start_api(&self, files: &Files) -> Result<String, Error> {
        let names = ["etcd", "kube-apiserver"];
        self.on_fresh_ports(&names, async || {
            let etcd_url = format!("http://127.0.0.1:{}", self.port("etcd"));
            self.spawn(
                "etcd",
                vec![
                    "--name=default".into(),
                    format!("--data-dir={}", self.dir.join("etcd").display()),
                    format!("--listen-client-urls={etcd_url}"),
                    format!("--advertise-client-urls={etcd_url}"),
                    // No peers: the kernel picks the (unused) peer port.
                    "--listen-peer-urls=http://127.0.0.1:0".into(),
                    "--unsafe-no-fsync=true".into(),
                    "--log-level=warn".into(),
                ],
            )?;
            let port = self.port("kube-apiserver");
            let server = format!("https://127.0.0.1:{port}");
            self.spawn(
                "kube-apiserver",
                vec![
                    format!("--etcd-servers={etcd_url}"),
                    "--bind-address=127.0.0.1".into(),
                    "--advertise-address=127.0.0.1".into(),
                    format!("--secure-port={port}"),
                    format!("--cert-dir={}", self.dir.join("apiserver-certs").display()),
                    format!("--tls-cert-file={}", files.serving_cert.display()),
                    format!("--tls-private-key-file={}", files.serving_key.display()),
                    format!("--client-ca-file={}", files.ca.display()),
                    "--service-cluster-ip-range=10.0.0.0/24".into(),
                    "--authorization-mode=RBAC".into(),
                    format!("--service-account-issuer={server}/"),
                    format!("--service-account-key-file={}", files.sa_public.display()),
                    format!(
                        "--service-account-signing-key-file={}",
                        files.sa_key.display()
                    ),
                    "--allow-privileged=true".into(),
                    // Pods get no token volume and need no ServiceAccount to exist yet:
                    // no container reads one here.
                    "--disable-admission-plugins=ServiceAccount".into(),
                    "--endpoint-reconciler-type=none".into(),
                    "--enable-priority-and-fairness=false".into(),
                    // On SIGTERM, end open watches (clients re-watch) instead of
                    // waiting up to a minute for their connections to go idle.
                    "--shutdown-watch-termination-grace-period=2s".into(),
                ]
                .into_iter()
                .chain(self.extra_api_args.iter().cloned())
                .collect(),
            )?;
            let readyz = format!("{server}/readyz");
            self.until(&names, "kube-apiserver", async || {
                self.answers(&readyz, "ok").await
            })
            .await?;
            Ok(server)
        })
        .await
    }

    fn port(&self, server: &str) -> u16 {
        (self.ports)(server)
    }

    /// Runs `start` (which starts the servers `names` on picked ports and waits for
    /// them) again on fresh ports while a server exits because its port was taken
    /// between the pick and its bind.
    async fn on_fresh_ports<T>(
        &self,
        names: &[&'static str],
        mut start: impl AsyncFnMut() -> Result<T, Error>,
    ) -> Result<T, Error> {
        for _ in 1..PORT_ATTEMPTS {
            match start().await {
                Err(Error::Exited { component, log, .. }) if port_taken(&log) => {
                    tracing::debug!(
                        component,
                        "port taken before the server bound it; trying fresh ports"
                    );
                    for name in names {
                        self.forget(name)?;
                    }
                }
                other => return other,
            }
        }
        match start().await {
            Err(Error::Exited { component, log, .. }) if port_taken(&log) => {
                Err(Error::PortsTaken {
                    component,
                    attempts: PORT_ATTEMPTS,
                })
            }
            other => other,
        }
    }

    fn servers(&self) -> MutexGuard<'_, Vec<Server>> {
        self.servers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn watchdog(&self) -> MutexGuard<'_, Watchdog> {
        self.watchdog.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts `bin/<name>` with its output in `<name>.log`, under the watchdog.
    fn spawn(&self, name: &'static str, args: Vec<String>) -> Result<(), Error> {
        let log = self.dir.join(format!("{name}.log"));
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io(&log))?;
        let log_start = out.metadata().map_err(io(&log))?.len();
        let err = out.try_clone().map_err(io(&log))?;
        let binary = self.bin.join(name);
        let child = Command::new(&binary)
            .args(&args)
            // Nothing is read from the user's home (kwok would load ~/.kwok/kwok.yaml).
            .env("HOME", &self.dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io(&binary))?;
        let pid = child.id();
        self.servers().push(Server {
            name,
            args,
            child,
            log_start,
        });
        self.watchdog().watch(pid)
    }

    /// Kills `name` if it runs and forgets it.
    fn forget(&self, name: &str) -> Result<(), Error> {
        let removed: Vec<Server> = {
            let mut servers = self.servers();
            let (gone, kept) = servers.drain(..).partition(|s| s.name == name);
            *servers = kept;
            gone
        };
        for mut server in removed {
            let _ = server.child.kill();
            let _ = server.child.wait();
            self.watchdog().forget(server.child.id())?;
        }
        Ok(())
    }

    /// Stops `name` gracefully (SIGTERM; SIGKILL after [`STOP_TIMEOUT`]) and returns
    /// the arguments it ran with.
    async fn stop(&self, name: &str) -> Result<Vec<String>, Error> {
        let (pid, args) = self
            .servers()
            .iter()
            .find(|s| s.name == name)
            .map(|s| (s.child.id(), s.args.clone()))
            .ok_or_else(|| Error::NotRunning(name.to_owned()))?;
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline && self.running(name) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.forget(name)?;
        Ok(args)
    }

    fn running(&self, name: &str) -> bool {
        self.servers()
            .iter_mut()
            .any(|s| s.name == name && matches!(s.child.try_wait(), Ok(None)))
    }

    /// Waits until `ready` holds, failing as soon as one of the servers `watched`
    /// exits, or after [`READY_TIMEOUT`] (with `component`'s log).
    async fn until(
        &self,
        watched: &[&'static str],
        component: &'static str,
        mut ready: impl AsyncFnMut() -> bool,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let exited = self.servers().iter_mut().find_map(|s| {
                let status = s.child.try_wait().ok().flatten()?;
                watched.contains(&s.name).then_some((s.name, status))
            });
            if let Some((name, status)) = exited {
                return Err(Error::Exited {
                    component: name,
                    status,
                    log: self.log_tail(name),
                });
            }
            if ready().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady {
                    component,
                    timeout: READY_TIMEOUT,
                    log: self.log_tail(component),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether `url` answers 2xx with a body that contains `says`.
    async fn answers(&self, url: &str, says: &str) -> bool {
        match self.probe.get(url).send().await {
            Ok(response) if response.status().is_success() => {
                response.text().await.is_ok_and(|body| body.contains(says))
            }
            _ => false,
        }
    }

    /// The last lines `name` logged since it was last started.
    fn log_tail(&self, name: &str) -> String {
        let start = self
            .servers()
            .iter()
            .rfind(|s| s.name == name)
            .map_or(0, |s| s.log_start);
        let mut text = String::new();
        if let Ok(mut file) = fs::File::open(self.dir.join(format!("{name}.log"))) {
            let _ = file.seek(SeekFrom::Start(start));
            let _ = file.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        let servers = std::mem::take(&mut *self.servers());
        // The watchdog forgets each pid only once it is reaped: it never signals a
        // pid that might belong to someone else by then.
        for mut server in servers.into_iter().rev() {
            let _ = server.child.kill();
            let _ = server.child.wait();
            let _ = self.watchdog().forget(server.child.id());
        }
    }
}

/// Whether a server's log says it could not bind its port.
fn port_taken(log: &str) -> bool {
    log.contains("address already in use")
}

/// A shell that collects pids from its stdin (`+pid` watches, `-pid` forgets) and, when
/// stdin closes, stops every pid it still watches and removes `$1`. We hold the write
/// end of that pipe for as long as this process lives. It ignores SIGINT and SIGHUP:
/// a Ctrl-C reaches the whole foreground process group, and the watchdog must be the
/// one left to clean up.
const WATCHDOG: &str = r#"
trap '' INT HUP
pids=' '
while read -r line; do
  case $line in
    +*) pids="$pids${line#+} " ;;
    -*) keep=' '; for p in $pids; do [ "$p" = "${line#-}" ] || keep="$keep$p "; done; pids=$keep ;;
  esac
done
kill -TERM $pids 2>/dev/null
for _ in 1 2 3 4 5 6 7 8 9 10; do
  alive=''
  for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ -n "$alive" ] || break
  sleep 0.5
done
kill -KILL $pids 2>/dev/null
[ -n "$1" ] && rm -rf "$1"
exit 0
"#;

struct Watchdog {
    _shell: Child,
    pipe: ChildStdin,
}

impl Watchdog {
    fn start(dir: Option<&Path>) -> Result<Self, Error> {
        let dir = dir.map(|d| d.display().to_string()).unwrap_or_default();
        let mut shell = Command::new("sh")
            .args(["-c", WATCHDOG, "keyward-watchdog", &dir])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io(Path::new("sh")))?;
        let pipe = shell.stdin.take().expect("piped stdin");
        Ok(Self {
            _shell: shell,
            pipe,
        })
    }

    fn watch(&mut self, pid: u32) -> Result<(), Error> {
        writeln!(self.pipe, "+{pid}").map_err(Error::Watchdog)
    }

    fn forget(&mut self, pid: u32) -> Result<(), Error> {
        writeln!(self.pipe, "-{pid}").map_err(Error::Watchdog)
    }
}

/// A client from kubeconfig YAML text.
pub async fn client_from(kubeconfig: &str) -> Result<Client, Error> {
    let kubeconfig = Kubeconfig::from_yaml(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
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
