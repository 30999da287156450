//! The `keyward` command: the operator, and the tools around it.

mod dev;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::FutureExt;

#[derive(Parser)]
#[command(
    name = "keyward",
    version,
    about = "API and auth keys as Kubernetes custom resources"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print every CRD as multi-document YAML (or write one file per CRD).
    Crds {
        /// Write `<name>.yaml` files into this folder instead of printing.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Run the operator: the controllers for AuthKey and ServiceAccountKey.
    Run(Box<RunArgs>),
    /// Try keyward on this machine: a local control plane, the builtin provider, the
    /// controller and the quickstart keys; runs until Ctrl-C.
    Dev {
        /// Exit once the quickstart keys are Ready.
        #[arg(long)]
        once: bool,
    },
    /// Run a local control plane (etcd + kube-apiserver, CRDs installed) in the
    /// foreground until interrupted; `hack/local-cluster up` starts this in the
    /// background.
    LocalCluster {
        /// Folder for certificates, data, logs and the kubeconfig.
        #[arg(long)]
        dir: PathBuf,
    },
    // `status`, `rotate`, `doctor` and `audit`: the verbs of the kubectl plugin
    // (`kubectl keyward`).
    #[command(flatten)]
    Plugin(keyward::cli::Verb),
}

/// `keyward run`: every flag is also an environment variable `KEYWARD_<FLAG>`.
#[derive(Args)]
struct RunArgs {
    /// Namespace of the operator: where ClusterKeyProvider credential Secrets and the
    /// leader Lease live.
    #[arg(
        long,
        env = "KEYWARD_OPERATOR_NAMESPACE",
        default_value = "keyward-system"
    )]
    operator_namespace: String,
    /// Watch only these namespaces, comma-separated (default: all namespaces).
    #[arg(long, env = "KEYWARD_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Reconciles running at once, per kind (and per watched namespace).
    #[arg(long, env = "KEYWARD_CONCURRENCY", default_value_t = 4)]
    concurrency: u16,
    /// Log format.
    #[arg(long, env = "KEYWARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log level or filter (`info`, `debug`, `keyward=debug,kube=info`); RUST_LOG wins
    /// when set.
    #[arg(long, env = "KEYWARD_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Requests per second to the Kubernetes API server, sustained (0: unlimited).
    #[arg(long, env = "KEYWARD_CLIENT_QPS", default_value_t = 20.0)]
    client_qps: f64,
    /// Requests to the Kubernetes API server allowed in a burst above the QPS.
    #[arg(long, env = "KEYWARD_CLIENT_BURST", default_value_t = 40)]
    client_burst: u32,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "KEYWARD_METRICS_BIND_ADDRESS",
        default_value = "0.0.0.0:8080"
    )]
    metrics_bind_address: SocketAddr,
    /// Run the controllers only while holding the leader Lease (for several replicas).
    #[arg(long, env = "KEYWARD_LEADER_ELECT")]
    leader_elect: bool,
    /// Name of the leader Lease, in the operator namespace.
    #[arg(long, env = "KEYWARD_LEASE_NAME", default_value = "keyward")]
    lease_name: String,
    /// How long a standby waits after the leader's last renewal before taking over.
    #[arg(long, env = "KEYWARD_LEASE_DURATION", default_value = "15s", value_parser = duration)]
    lease_duration: Duration,
    /// How long the leader keeps trying to renew before it gives up and exits.
    #[arg(long, env = "KEYWARD_RENEW_DEADLINE", default_value = "10s", value_parser = duration)]
    renew_deadline: Duration,
    /// How long one upstream issuance may take. An issuance cut short (a crash, a
    /// lost answer) is presumed able to land for twice this long after it started;
    /// then keyward looks for its key by marker and revokes it.
    #[arg(long, env = "KEYWARD_ISSUE_DEADLINE", default_value = "30s", value_parser = duration)]
    issue_deadline: Duration,
    /// How often candidates try to acquire, and the leader renews.
    #[arg(long, env = "KEYWARD_RETRY_PERIOD", default_value = "2s", value_parser = duration)]
    retry_period: Duration,
    /// The ServiceAccount keyward runs as, `NAME` or `NAMESPACE/NAME`, for providers that
    /// authenticate as it (Tailscale `workloadIdentity`); a bare name is in the pod's
    /// namespace (else --operator-namespace). The chart sets it from the downward API.
    #[arg(long, env = "KEYWARD_SERVICE_ACCOUNT")]
    service_account: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn duration(s: &str) -> Result<Duration, String> {
    keyward::resources::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration like 15s, 1m or 1m30s"))
}

#[cfg(feature = "heap-profile")]
#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// jemalloc: most of what keyward caches is small strings and fixed-size structs,
/// which it keeps in size-class slabs without glibc's per-allocation header
/// (docs/performance.md#memory). A heap profile uses dhat's allocator instead.
#[cfg(all(not(feature = "heap-profile"), not(target_env = "msvc")))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    #[cfg(feature = "heap-profile")]
    let _profiler = dhat::Profiler::builder()
        .file_name(format!("dhat-heap-{}.json", std::process::id()))
        .build();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let (json, level) = match &cli.command {
        Command::Run(args) => (args.log_format == LogFormat::Json, args.log_level.as_str()),
        _ => (false, "info"),
    };
    let filter = match tracing_subscriber::EnvFilter::try_from_default_env() {
        Ok(filter) => filter,
        Err(_) => tracing_subscriber::EnvFilter::try_new(level)
            .with_context(|| format!("--log-level {level:?}"))?,
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        logs.json().init();
    } else {
        logs.init();
    }

    match cli.command {
        Command::Run(args) => run(*args).await?,
        Command::Crds { out_dir: None } => print!("{}", keyward::crds::all_yaml()),
        Command::Crds { out_dir: Some(dir) } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for crd in keyward::crds::all() {
                let path = dir.join(keyward::crds::file_name(&crd));
                std::fs::write(&path, keyward::crds::to_yaml(&crd))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        Command::LocalCluster { dir } => local_cluster(dir).await?,
        Command::Dev { once } => dev::run(once).await?,
        Command::Plugin(verb) => std::process::exit(keyward::cli::run(verb).await.into()),
    }
    Ok(())
}

/// `keyward run`: the endpoints at once, then (with `--leader-elect`, once the Lease
/// is ours) the controllers until SIGTERM / Ctrl-C.
async fn run(args: RunArgs) -> anyhow::Result<()> {
    use keyward::{
        leader, metrics,
        providers::{DefaultFactory, ServiceAccount},
        ratelimit::RateLimitLayer,
        reconciler, server,
    };
    anyhow::ensure!(
        !args.leader_elect
            || (args.retry_period < args.renew_deadline
                && args.renew_deadline < args.lease_duration),
        "leader election needs --retry-period < --renew-deadline < --lease-duration"
    );
    let listener = tokio::net::TcpListener::bind(args.metrics_bind_address)
        .await
        .with_context(|| {
            format!(
                "binding --metrics-bind-address {}",
                args.metrics_bind_address
            )
        })?;
    let health = Arc::new(server::Health::default());
    tokio::spawn(server::serve(listener, health.clone()));

    // The kubeconfig from KUBECONFIG / ~/.kube/config, or the in-cluster account.
    let config = kube::Config::infer()
        .await
        .context("loading the Kubernetes configuration (KUBECONFIG or in-cluster)")?;
    let config = keyward::client::identify(config);
    // Leader election gets a client of its own, outside the request budget: a
    // backlog of reconcile traffic must never delay the renewals that keep the Lease
    // (client-go does the same).
    let lease_client =
        kube::Client::try_from(config.clone()).context("building the Kubernetes client")?;
    let client = kube::client::ClientBuilder::try_from(config)
        .context("building the Kubernetes client")?
        .with_layer(&RateLimitLayer::new(args.client_qps, args.client_burst))
        .build();
    let version = client
        .apiserver_version()
        .await
        .context("reaching the Kubernetes API server")?;
    health.set_ready();
    tracing::info!(
        version = %version.git_version,
        metrics = %args.metrics_bind_address,
        "connected to the API server"
    );

    let factory = match &args.service_account {
        Some(reference) => {
            // In a pod the namespace file names the pod's namespace.
            let pod_namespace =
                std::fs::read_to_string(keyward::providers::identity::NAMESPACE_FILE)
                    .ok()
                    .map(|ns| ns.trim().to_owned())
                    .filter(|ns| !ns.is_empty());
            let default_namespace = pod_namespace.as_deref().unwrap_or(&args.operator_namespace);
            let (namespace, name) =
                keyward::providers::identity::parse_reference(reference, default_namespace)
                    .map_err(|e| anyhow::anyhow!("--service-account {e}"))?;
            tracing::info!(%namespace, %name, "providers may authenticate as this ServiceAccount");
            DefaultFactory::with_identity(ServiceAccount::new(client.clone(), namespace, name))
        }
        None => DefaultFactory::default(),
    };
    let ctx = reconciler::Context::new(
        client.clone(),
        Arc::new(factory),
        Arc::new(reconciler::NoFaults),
        reconciler::Settings {
            operator_namespace: args.operator_namespace.clone(),
            // `--namespaces ""` (as a chart may render it) means all namespaces.
            namespaces: args
                .namespaces
                .into_iter()
                .filter(|n| !n.is_empty())
                .collect(),
            concurrency: args.concurrency,
            timing: keyward::lifecycle::Timing::with_deadline(args.issue_deadline),
        },
    );
    let shutdown = shutdown_signal().boxed().shared();
    if !args.leader_elect {
        metrics::global().set_leader(true);
        tracing::info!("keyward controllers starting");
        reconciler::run(ctx, shutdown).await;
        return Ok(());
    }

    let elector = leader::Elector::new(
        lease_client,
        leader::Config {
            lease_name: args.lease_name,
            namespace: args.operator_namespace,
            identity: leader::default_identity(),
            lease_duration: args.lease_duration,
            renew_deadline: args.renew_deadline,
            retry_period: args.retry_period,
        },
    );
    let leadership = tokio::select! {
        leadership = elector.acquire() => leadership,
        _ = shutdown.clone() => return Ok(()),
    };
    metrics::global().set_leader(true);
    tracing::info!("keyward controllers starting");
    let lost = leadership.lost();
    tokio::select! {
        // Graceful: in-flight reconciles finish before the Lease is let go.
        _ = reconciler::run(ctx, shutdown) => {
            leadership.release().await;
            Ok(())
        }
        _ = lost => {
            anyhow::bail!("lost the leader lease; exiting so that a standby takes over")
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn local_cluster(dir: PathBuf) -> anyhow::Result<()> {
    use keyward::control_plane::{ControlPlane, Options};
    let plane = ControlPlane::start(Options {
        dir: Some(dir),
        workloads: true,
        ..Options::default()
    })
    .await?;
    // `hack/local-cluster up` waits for this file: it exists only once the API server
    // is ready and the CRDs are installed.
    let pids: Vec<String> = plane.pids().iter().map(|(_, p)| p.to_string()).collect();
    let pids = pids.join(" ");
    std::fs::write(plane.dir().join("pids"), pids)?;
    let ready = plane.dir().join("ready");
    std::fs::write(&ready, plane.kubeconfig().display().to_string())?;
    tracing::info!(server = plane.server(), kubeconfig = %plane.kubeconfig().display(), "local control plane ready");
    shutdown_signal().await;
    let _ = std::fs::remove_file(ready);
    drop(plane);
    Ok(())
}
