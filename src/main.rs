//! The `keyward` command: the operator, and the tools around it.

mod dev;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

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
    Run {
        /// Namespace of the operator: where ClusterKeyProvider credential Secrets live.
        #[arg(
            long,
            env = "KEYWARD_OPERATOR_NAMESPACE",
            default_value = "keyward-system"
        )]
        operator_namespace: String,
        /// Watch only this namespace (default: all namespaces).
        #[arg(long, env = "KEYWARD_WATCH_NAMESPACE")]
        namespace: Option<String>,
        /// Reconciles running at once, per kind.
        #[arg(long, env = "KEYWARD_CONCURRENCY", default_value_t = 4)]
        concurrency: u16,
        /// Log format: text or json.
        #[arg(long, env = "KEYWARD_LOG_FORMAT", default_value = "text")]
        log_format: String,
    },
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let json = matches!(&cli.command, Command::Run { log_format, .. } if log_format == "json");
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    if json {
        logs.json().init();
    } else {
        logs.init();
    }

    match cli.command {
        Command::Run {
            operator_namespace,
            namespace,
            concurrency,
            ..
        } => {
            use keyward::{providers::DefaultFactory, reconciler};
            // The kubeconfig from KUBECONFIG / ~/.kube/config, or the in-cluster account.
            let client = kube::Client::try_default()
                .await
                .context("connecting to Kubernetes (KUBECONFIG or in-cluster)")?;
            let settings = reconciler::Settings {
                operator_namespace,
                namespace,
                concurrency,
            };
            let ctx = reconciler::Context::new(
                client,
                std::sync::Arc::new(DefaultFactory::default()),
                std::sync::Arc::new(reconciler::NoFaults),
                settings,
            );
            tracing::info!("keyward controllers starting");
            reconciler::run(ctx, shutdown_signal()).await;
        }
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
    }
    Ok(())
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
    let plane = ControlPlane::start(Options { dir: Some(dir) }).await?;
    // `hack/local-cluster up` waits for this file: it exists only once the API server
    // is ready and the CRDs are installed.
    let pids = plane.pids().map(|p| p.to_string()).join(" ");
    std::fs::write(plane.dir().join("pids"), pids)?;
    let ready = plane.dir().join("ready");
    std::fs::write(&ready, plane.kubeconfig().display().to_string())?;
    tracing::info!(server = plane.server(), kubeconfig = %plane.kubeconfig().display(), "local control plane ready");
    shutdown_signal().await;
    let _ = std::fs::remove_file(ready);
    drop(plane);
    Ok(())
}
