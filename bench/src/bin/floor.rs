//! `floor`: the fewest API requests an `AuthKey` can cost, as a running client.
//!
//! One list + watch of the keys; for each key not yet Ready exactly the three writes a
//! key needs — its finalizer, its Secret, its Ready status — and no read at all. It
//! runs as a process of its own, with its own identity and keyward's client rate
//! limiter at the same QPS / burst, so `hack/bench` can state keyward's time to all
//! Ready as a ratio to what the client rate alone allows. It mints keys like the
//! builtin provider (32 random bytes) and handles nothing else: no rotation, no
//! deletion, no errors beyond logging them.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use keyward::{ratelimit::RateLimitLayer, resources::AuthKey};
use kube::{
    Api, ResourceExt,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Namespace of the keys.
    #[arg(long)]
    namespace: String,
    /// Requests per second to the API server (0: unlimited).
    #[arg(long, default_value_t = 20.0)]
    client_qps: f64,
    /// Requests allowed in a burst above the QPS.
    #[arg(long, default_value_t = 40)]
    client_burst: u32,
    /// Keys handled at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
}

const FINALIZER: &str = "keyward.dev/floor";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let config = kube::Config::infer().await.context("loading KUBECONFIG")?;
    let client = kube::client::ClientBuilder::try_from(config)?
        .with_layer(&RateLimitLayer::new(args.client_qps, args.client_burst))
        .build();
    let keys: Api<AuthKey> = Api::namespaced(client.clone(), &args.namespace);
    let secrets: Api<Secret> = Api::namespaced(client, &args.namespace);
    let done: Arc<Mutex<HashSet<String>>> = Arc::default();
    watcher(keys.clone(), watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .filter_map(|key| async move { key.ok() })
        .filter(|key| {
            let fresh = key.status.as_ref().is_none_or(|s| !s.is_ready())
                && done.lock().unwrap().insert(key.name_any());
            async move { fresh }
        })
        .for_each_concurrent(args.concurrency, |key| {
            let (keys, secrets) = (keys.clone(), secrets.clone());
            async move {
                if let Err(e) = issue(&keys, &secrets, &key).await {
                    eprintln!("{}: {e:#}", key.name_any());
                }
            }
        })
        .await;
    Ok(())
}

/// Finalizer, Secret, status: the three writes.
async fn issue(keys: &Api<AuthKey>, secrets: &Api<Secret>, key: &AuthKey) -> anyhow::Result<()> {
    let name = key.name_any();
    keys.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": [FINALIZER]}})),
    )
    .await
    .context("finalizer")?;
    let mut value = [0u8; 32];
    getrandom::fill(&mut value).map_err(|e| anyhow::anyhow!("the OS random generator: {e}"))?;
    let secret_name = key.spec.secret.name.clone().unwrap_or_else(|| name.clone());
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(secret_name),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "floor".to_owned(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        data: Some(
            [(
                key.spec.secret.key.clone(),
                ByteString(
                    value
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>()
                        .into_bytes(),
                ),
            )]
            .into(),
        ),
        ..Secret::default()
    };
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .context("Secret")?;
    let now = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second())?.to_string();
    let generation = key.metadata.generation;
    keys.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "observedGeneration": generation,
            "revision": 1,
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "Issued",
                "message": "issued by the floor client", "lastTransitionTime": now,
                "observedGeneration": generation,
            }],
        }})),
    )
    .await
    .context("status")?;
    Ok(())
}
