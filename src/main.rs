//! The `keyward` command: the operator, and the tools around it.

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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();

    match Cli::parse().command {
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
    }
    Ok(())
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
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    let _ = std::fs::remove_file(ready);
    drop(plane);
    Ok(())
}
