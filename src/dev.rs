//! `keyward dev`: the whole product on one machine, in one command — a local control
//! plane, the builtin provider, the controller in-process and the quickstart keys.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Secret;
use keyward::{
    control_plane::{ControlPlane, Options},
    providers::DefaultFactory,
    reconciler::{self, Context, NoFaults, Settings},
    resources::{AuthKey, ClusterKeyProvider, KeyStatus, ServiceAccountKey},
};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
};
use serde_json::json;

const QUICKSTART: &str = include_str!("../examples/quickstart.yaml");
const NAMESPACE: &str = "default";

pub async fn run(once: bool) -> anyhow::Result<()> {
    eprintln!("starting a local control plane (etcd + kube-apiserver; the first run builds them)…");
    let plane = ControlPlane::start(Options::default())
        .await
        .context("starting the local control plane")?;
    let client = plane.client().await?;
    eprintln!("control plane ready at {}", plane.server());

    let params = PatchParams::apply("keyward-dev").force();
    Api::<ClusterKeyProvider>::all(client.clone())
        .patch(
            "builtin",
            &params,
            &Patch::Apply(json!({
                "apiVersion": "keyward.dev/v1alpha1", "kind": "ClusterKeyProvider",
                "metadata": {"name": "builtin"},
                "spec": {"builtin": {"prefix": "kw_"}, "policy": {"namespaceSelector": {}}}
            })),
        )
        .await
        .context("creating the builtin ClusterKeyProvider")?;

    // The controller's own client, as `keyward run` builds it: it names keyward.
    let kubeconfig = kube::config::Kubeconfig::read_from(plane.kubeconfig())?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    let operator = Client::try_from(keyward::client::identify(config))?;
    let ctx = Context::new(
        operator,
        Arc::new(DefaultFactory::default()),
        Arc::new(NoFaults),
        Settings {
            operator_namespace: NAMESPACE.to_owned(),
            ..Settings::default()
        },
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(reconciler::run(ctx, async {
        let _ = stopped.await;
    }));

    let mut names = Vec::new();
    for doc in serde_saphyr::from_multiple::<serde_json::Value>(QUICKSTART)? {
        let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
        let name = doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match kind.as_str() {
            "AuthKey" => {
                Api::<AuthKey>::namespaced(client.clone(), NAMESPACE)
                    .patch(&name, &params, &Patch::Apply(&doc))
                    .await?;
            }
            "ServiceAccountKey" => {
                Api::<ServiceAccountKey>::namespaced(client.clone(), NAMESPACE)
                    .patch(&name, &params, &Patch::Apply(&doc))
                    .await?;
            }
            other => anyhow::bail!("examples/quickstart.yaml: unexpected kind {other}"),
        }
        eprintln!("applied {kind} {NAMESPACE}/{name}");
        names.push((kind, name));
    }

    eprint!("waiting for the keys to be Ready");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let mut ready = 0;
        for (kind, name) in &names {
            if is_ready(&client, kind, name).await? {
                ready += 1;
            }
        }
        if ready == names.len() {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the quickstart keys did not become Ready in 120s; see the conditions with kubectl describe"
        );
        eprint!(".");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(" done\n");

    println!("{}", table(&client, "authkeys").await?);
    println!("{}", table(&client, "serviceaccountkeys").await?);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    for secret in secrets.list(&Default::default()).await?.items {
        if secret
            .labels()
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str)
            != Some("keyward")
        {
            continue;
        }
        let keys: Vec<String> = secret.data.unwrap_or_default().into_keys().collect();
        println!(
            "Secret {NAMESPACE}/{} holds data keys: {}",
            secret.metadata.name.unwrap_or_default(),
            keys.join(", ")
        );
    }
    println!("\nexport KUBECONFIG={}", plane.kubeconfig().display());
    if once {
        println!("(--once: the control plane stops now; run without --once to explore)");
    } else {
        eprintln!("\nkeyward is running; press Ctrl-C to stop and clean up");
        tokio::signal::ctrl_c().await?;
    }
    let _ = stop.send(());
    let _ = controller.await;
    drop(plane);
    Ok(())
}

async fn is_ready(client: &Client, kind: &str, name: &str) -> anyhow::Result<bool> {
    let status: Option<KeyStatus> = match kind {
        "AuthKey" => {
            Api::<AuthKey>::namespaced(client.clone(), NAMESPACE)
                .get(name)
                .await?
                .status
        }
        _ => {
            Api::<ServiceAccountKey>::namespaced(client.clone(), NAMESPACE)
                .get(name)
                .await?
                .status
        }
    };
    Ok(status.is_some_and(|s| s.is_ready()))
}

/// What `kubectl get <plural>` shows: the API server's own Table rendering.
async fn table(client: &Client, plural: &str) -> anyhow::Result<String> {
    let request = http::Request::get(format!(
        "/apis/keyward.dev/v1alpha1/namespaces/{NAMESPACE}/{plural}"
    ))
    .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
    .body(Vec::new())?;
    let table: serde_json::Value = client.request(request).await?;
    let columns: Vec<(String, usize)> = table["columnDefinitions"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .filter(|(_, c)| c["priority"].as_i64().unwrap_or(0) == 0)
        .map(|(i, c)| (c["name"].as_str().unwrap_or_default().to_uppercase(), i))
        .collect();
    let mut rows = vec![columns.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>()];
    for row in table["rows"].as_array().into_iter().flatten() {
        rows.push(
            columns
                .iter()
                .map(|(_, i)| match &row["cells"][*i] {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => "<none>".to_owned(),
                    other => other.to_string(),
                })
                .collect(),
        );
    }
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    Ok(rows
        .iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("   ")
                .trim_end()
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n"))
}
