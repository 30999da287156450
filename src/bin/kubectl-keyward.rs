//! The kubectl plugin: kubectl runs this binary for `kubectl keyward …` when it is on
//! PATH. The verbs live in [`keyward::cli`]; `keyward status|rotate|doctor|audit` are the
//! same code.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "kubectl-keyward",
    bin_name = "kubectl keyward",
    version,
    about = "Status, rotation, health checks and an upstream audit for keyward's AuthKeys and ServiceAccountKeys"
)]
struct Plugin {
    #[command(subcommand)]
    verb: keyward::cli::Verb,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let plugin = Plugin::parse();
    keyward::cli::run(plugin.verb).await.into()
}
