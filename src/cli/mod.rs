//! `kubectl keyward` — the kubectl plugin, whose verbs are also `keyward`
//! subcommands: `status`, `rotate`, `doctor` and `audit`. What each shows and the
//! decisions behind it: docs/kubectl-plugin.md.
//!
//! The plugin reads the kubeconfig as kubectl does (`--kubeconfig`, `KUBECONFIG`,
//! `--context`, the context's namespace, `-n`, `-A`). Only `audit` talks to an
//! upstream, with the provider's own credential read from its Secret; the other
//! verbs only talk to the API server.

pub mod audit;
pub mod doctor;
#[cfg(test)]
mod fixtures;
pub mod keys;
pub mod output;
pub mod rotate;
pub mod status;

use std::path::PathBuf;

use kube::config::{KubeConfigOptions, Kubeconfig};

/// The plugin's verbs.
#[derive(clap::Subcommand, Debug)]
pub enum Verb {
    /// Show keys: ready, provider, key id, expiry, renewal, revision, retiring keys and
    /// the last event; for one key, its conditions, retiring keys and events in full.
    Status(status::StatusArgs),
    /// Rotate keys now (the keyward.dev/rotate annotation) and wait until each is
    /// Ready with its new key.
    Rotate(rotate::RotateArgs),
    /// Check CRDs, the operator, providers and your access; print what to fix and
    /// exit non-zero on a problem.
    Doctor(doctor::DoctorArgs),
    /// List the upstream keys a provider's credential can see that carry keyward's
    /// marker, with the resource each belongs to and whether it still holds it;
    /// `--revoke` revokes the orphans.
    Audit(audit::AuditArgs),
}

/// How to reach the cluster and what to print, as kubectl spells it.
#[derive(clap::Args, Clone, Debug)]
pub struct Connection {
    /// Path to the kubeconfig file (default: KUBECONFIG, then ~/.kube/config, then the
    /// in-cluster account).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: the current context).
    #[arg(long)]
    pub context: Option<String>,
    /// Namespace of the keys (default: the context's namespace, else `default`).
    #[arg(short = 'n', long, conflicts_with = "all_namespaces")]
    pub namespace: Option<String>,
    /// Keys in every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = output::Format::Text)]
    pub output: output::Format,
}

/// Where keyward runs, as `keyward run --operator-namespace` says.
#[derive(clap::Args, Clone, Debug)]
pub struct Operator {
    /// Namespace of the operator (`keyward run --operator-namespace`): its leader
    /// Lease and metrics Service, and the credential Secrets of ClusterKeyProviders.
    #[arg(
        long,
        env = "KEYWARD_OPERATOR_NAMESPACE",
        default_value = "keyward-system"
    )]
    pub operator_namespace: String,
}

/// Why a verb could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("finding a Kubernetes configuration (kubeconfig or in-cluster): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("{what}: {}", api_message(.source))]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0}")]
    Usage(String),
}

/// The API server's own message for a refused request (it says who may not do
/// what), otherwise the client's error.
pub fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) if !status.message.is_empty() => status.message.clone(),
        other => other.to_string(),
    }
}

impl Connection {
    /// A client, and the namespace of the keys (`None` with `-A`).
    pub async fn connect(&self) -> Result<(kube::Client, Option<String>), Error> {
        let options = KubeConfigOptions {
            context: self.context.clone(),
            ..Default::default()
        };
        let config = match (&self.kubeconfig, &self.context) {
            (Some(path), _) => {
                kube::Config::from_custom_kubeconfig(Kubeconfig::read_from(path)?, &options).await?
            }
            (None, Some(_)) => kube::Config::from_kubeconfig(&options).await?,
            (None, None) => kube::Config::infer().await?,
        };
        let namespace = match (&self.namespace, self.all_namespaces) {
            (_, true) => None,
            (Some(ns), false) => Some(ns.clone()),
            (None, false) => Some(config.default_namespace.clone()),
        };
        let client = kube::Client::try_from(config).map_err(Error::Client)?;
        Ok((client, namespace))
    }
}

/// Runs a verb; the process exit code: 0 when all is well, 1 when a rotation timed
/// out, doctor found a problem or audit left orphans, 2 when the verb could not run.
pub async fn run(verb: Verb) -> u8 {
    let result = match verb {
        Verb::Status(args) => status::run(args).await,
        Verb::Rotate(args) => rotate::run(args).await,
        Verb::Doctor(args) => doctor::run(args).await,
        Verb::Audit(args) => audit::run(args).await,
    };
    match result {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[derive(clap::Parser)]
    struct Plugin {
        #[command(subcommand)]
        verb: super::Verb,
    }

    /// clap checks the definitions (unique argument names, valid defaults) only when
    /// it builds the command.
    #[test]
    fn every_verb_is_a_valid_command() {
        Plugin::command().debug_assert();
    }
}
