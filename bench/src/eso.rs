//! External Secrets Operator, the comparison: one `ExternalSecret` per key, each
//! generating its value with ESO's `Password` generator into a Secret it owns, at the
//! same client rate and concurrency as keyward.
//!
//! ESO runs without leader election: controller-runtime finds its Lease namespace
//! only inside a Pod (or from a flag ESO does not expose), so there is no ESO
//! failover to compare.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;
use jiff::Timestamp;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, api::ApiResource};
use serde_json::{Value, json};

use crate::{
    Run, client_flags,
    cluster::{self, Cluster},
    common_phases,
    gate::Gate,
    namespace,
    process::Process,
    report::Eso,
};

const BUILD_SCRIPT: &str = include_str!("../../hack/external-secrets-binary");
const NAMESPACE: &str = "eso";
const GENERATORS: &str = "generators.external-secrets.io/v1alpha1";

/// The folder with `external-secrets` and `crds.yaml` (built once, then cached).
pub fn binaries() -> anyhow::Result<PathBuf> {
    let output = Command::new("bash")
        .arg("-c")
        .arg(BUILD_SCRIPT)
        .stderr(Stdio::inherit())
        .output()
        .context("running bash")?;
    anyhow::ensure!(
        output.status.success(),
        "hack/external-secrets-binary failed ({}); see its output above",
        output.status
    );
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim(),
    ))
}

fn external_secrets() -> ApiResource {
    ApiResource {
        group: "external-secrets.io".into(),
        version: "v1".into(),
        api_version: "external-secrets.io/v1".into(),
        kind: "ExternalSecret".into(),
        plural: "externalsecrets".into(),
    }
}

/// `key-00001`…: each a Secret of the same name with a generated password.
fn keys(n: usize) -> Vec<Value> {
    (1..=n)
        .map(|i| {
            let name = format!("key-{i:05}");
            json!({
                "apiVersion": "external-secrets.io/v1", "kind": "ExternalSecret",
                "metadata": {"name": name, "namespace": NAMESPACE},
                "spec": {
                    "refreshInterval": "1h",
                    "target": {"name": name, "creationPolicy": "Owner"},
                    "dataFrom": [{"sourceRef": {"generatorRef": {
                        "apiVersion": GENERATORS, "kind": "Password", "name": "bench",
                    }}}],
                },
            })
        })
        .collect()
}

async fn install_crds(cluster: &Cluster, dir: &Path) -> anyhow::Result<()> {
    let path = dir.join("crds.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let crds: Vec<CustomResourceDefinition> =
        serde_saphyr::from_multiple(&text).with_context(|| format!("{}", path.display()))?;
    let api: Api<CustomResourceDefinition> = Api::all(cluster.admin.clone());
    for crd in &crds {
        cluster.apply(serde_json::to_value(crd)?).await?;
    }
    for crd in &crds {
        let name = crd.metadata.name.as_deref().unwrap_or_default();
        cluster::poll_until(
            &format!("CRD {name} established"),
            Duration::from_secs(60),
            || async {
                Ok(api.get(name).await?.status.is_some_and(|s| {
                    s.conditions
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                }))
            },
        )
        .await?;
    }
    Ok(())
}

pub async fn run(run: &Run, dir: &Path) -> anyhow::Result<Eso> {
    let a = &run.args;
    let timeout = a.timeout();
    run.say("external-secrets: starting a control plane");
    let mut c = Cluster::start(&run.dir.join("eso"), "external-secrets", a.quiet, timeout).await?;
    install_crds(&c, dir).await?;
    c.apply(namespace(NAMESPACE)).await?;
    c.apply(json!({
        "apiVersion": GENERATORS, "kind": "Password",
        "metadata": {"name": "bench", "namespace": NAMESPACE},
        "spec": {"length": 43, "digits": 8, "symbols": 0, "noUpper": false, "allowRepeat": true},
    }))
    .await?;
    c.warm_up(&external_secrets(), keys(1).remove(0)).await?;
    // ESO's --client-qps is per client it builds; the gate makes it one budget.
    let gate = Gate::start(&c.kubeconfig()?, a.client_qps, a.client_burst).await?;
    let kubeconfig = c.dir.join("kubeconfig-external-secrets-gate");
    gate.kubeconfig(&kubeconfig)?;
    let binary = dir.join("external-secrets");
    let log_dir = c.dir.clone();
    let start = |name: &str| {
        let mut command = Command::new(&binary);
        command
            .args(["--metrics-addr=0", "--loglevel=info"])
            .args(client_flags(a))
            .args(["--concurrent", &a.concurrency.to_string()])
            .env("KUBECONFIG", &kubeconfig);
        Process::spawn(name, command, &log_dir.join(format!("{name}.log")))
    };
    let t0 = Timestamp::now();
    let mut eso = start("external-secrets-0")?;
    c.wait_started_and_quiet(t0, &mut [&mut eso]).await?;

    let (phases, eso) = common_phases(
        run,
        &mut c,
        (&external_secrets(), NAMESPACE, keys(a.keys)),
        eso,
        || start("external-secrets-1"),
        async |_, eso| Ok(((), eso, 0)),
    )
    .await?;
    eso.stop(Duration::from_secs(30)).await;
    drop(gate);
    Ok(Eso {
        wave: phases.wave,
        restart: phases.restart,
        idle: phases.idle,
        deletion: phases.deletion,
        peak_rss: phases.peak_rss,
    })
}
