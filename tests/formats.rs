//! Each seed system reads its key in its own format. For every `examples/formats/`
//! manifest: the real control plane, the controller in-process with the operator's
//! provider factory (builtin provider), the key resource applied, and the rendered
//! Secret parsed exactly as its system reads it — TOML, JSON, environment variable
//! names. The workload snippet in the same file is checked to consume what keyward
//! wrote (every Secret reference names the key's Secret and a data key it holds).

mod common;

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::core::v1::Secret;
use keyward::{providers::DefaultFactory, reconciler::NoFaults};
use kube::Api;
use serde_json::Value;

use common::{Controller, TestNamespace, WAIT, apply, eventually};

/// What one example renders: the Secret's data, the key value, the workload documents.
struct Rendered {
    data: BTreeMap<String, String>,
    value: String,
    workloads: Vec<Value>,
}

/// Applies the example's keyward documents and returns the rendered Secret once the
/// key is Ready.
async fn render(file: &str) -> Rendered {
    let client = common::client().await;
    let ns = TestNamespace::new(&client, "formats").await;
    let controller = Controller::start(
        &client,
        &ns.name,
        Arc::new(DefaultFactory::default()),
        Arc::new(NoFaults),
        2,
    );

    let path = format!("{}/examples/formats/{file}", env!("CARGO_MANIFEST_DIR"));
    let docs = common::yaml_documents(&std::fs::read_to_string(&path).unwrap());
    let (keyward_docs, workloads): (Vec<Value>, Vec<Value>) = docs
        .into_iter()
        .partition(|d| d["apiVersion"] == "keyward.dev/v1alpha1");
    for doc in &keyward_docs {
        apply(&client, &ns.name, doc).await;
    }
    let key = keyward_docs
        .iter()
        .find(|d| d["kind"] == "AuthKey" || d["kind"] == "ServiceAccountKey")
        .expect("a key resource");
    let secret_name = key["spec"]["secret"]["name"].as_str().unwrap().to_owned();
    let data_key = key["spec"]["secret"]["key"].as_str().unwrap().to_owned();

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let secret = eventually(&format!("the Secret of {file}"), WAIT, || async {
        secrets
            .get_opt(&secret_name)
            .await
            .ok()?
            .filter(|s| s.data.is_some())
    })
    .await;
    drop(controller);
    let data: BTreeMap<String, String> = secret
        .data
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v.0).unwrap()))
        .collect();
    let value = data[&data_key].clone();
    assert!(value.len() >= 43, "a builtin key of 256 bits");

    // The workload reads exactly what keyward wrote.
    assert!(
        !workloads.is_empty(),
        "{file} shows how a workload reads the key"
    );
    let mut references = Vec::new();
    for w in &workloads {
        secret_references(w, &mut references);
    }
    assert!(
        !references.is_empty(),
        "{file}: the workload references the Secret"
    );
    for (name, key) in references {
        assert_eq!(name, secret_name, "{file}: a reference to another Secret");
        assert!(
            data.contains_key(&key),
            "{file}: no data key {key} in the Secret"
        );
    }
    Rendered {
        data,
        value,
        workloads,
    }
}

/// Every `(secret name, data key)` a manifest reads: `secretKeyRef`s and the items of
/// `secret` volumes.
fn secret_references(v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            if let Some(r) = map.get("secretKeyRef") {
                out.push((
                    r["name"].as_str().unwrap().to_owned(),
                    r["key"].as_str().unwrap().to_owned(),
                ));
            }
            if let Some(s) = map.get("secret").filter(|s| s.get("secretName").is_some()) {
                for item in s["items"]
                    .as_array()
                    .expect("volume items name the data keys")
                {
                    out.push((
                        s["secretName"].as_str().unwrap().to_owned(),
                        item["key"].as_str().unwrap().to_owned(),
                    ));
                }
            }
            map.values().for_each(|x| secret_references(x, out));
        }
        Value::Array(items) => items.iter().for_each(|x| secret_references(x, out)),
        _ => {}
    }
}

/// The environment variable `name` of the workload's containers reads `data_key`.
fn env_reads(r: &Rendered, name: &str, data_key: &str) {
    let mut found = false;
    fn walk(v: &Value, name: &str, data_key: &str, found: &mut bool) {
        match v {
            Value::Object(map) => {
                if map.get("name").and_then(Value::as_str) == Some(name)
                    && let Some(r) = map.get("valueFrom").and_then(|f| f.get("secretKeyRef"))
                {
                    assert_eq!(r["key"], data_key);
                    *found = true;
                }
                map.values().for_each(|x| walk(x, name, data_key, found));
            }
            Value::Array(items) => items.iter().for_each(|x| walk(x, name, data_key, found)),
            _ => {}
        }
    }
    for w in &r.workloads {
        walk(w, name, data_key, &mut found);
    }
    assert!(found, "the workload sets {name} from the Secret");
}

#[tokio::test]
async fn prefect_agent_env_and_config_toml() {
    let r = render("prefect-agent.yaml").await;
    assert_eq!(r.data["PREFECT__CLOUD__AGENT__AUTH_TOKEN"], r.value);
    env_reads(
        &r,
        "PREFECT__CLOUD__AGENT__AUTH_TOKEN",
        "PREFECT__CLOUD__AGENT__AUTH_TOKEN",
    );
    let config: toml::Table = r.data["config.toml"].parse().expect("valid TOML");
    assert_eq!(
        config["cloud"]["agent"]["auth_token"].as_str(),
        Some(r.value.as_str())
    );
    assert_eq!(config.len(), 1, "only the [cloud] table");
}

#[tokio::test]
async fn prefect_2_and_3_api_key_env() {
    let r = render("prefect-api-key.yaml").await;
    assert_eq!(r.data["PREFECT_API_KEY"], r.value);
    env_reads(&r, "PREFECT_API_KEY", "PREFECT_API_KEY");
}

#[tokio::test]
async fn chainlink_cre_api_key_env() {
    let r = render("chainlink-cre.yaml").await;
    assert_eq!(r.data["CRE_API_KEY"], r.value);
    env_reads(&r, "CRE_API_KEY", "CRE_API_KEY");
}

#[tokio::test]
async fn convox_auth_file_is_a_json_map_of_host_to_key() {
    let r = render("convox.yaml").await;
    let auth: BTreeMap<String, String> =
        serde_json::from_str(&r.data["auth"]).expect("a JSON object of strings");
    assert_eq!(
        auth,
        BTreeMap::from([("console.convox.com".to_owned(), r.value.clone())])
    );
    let text = serde_json::to_string(&r.workloads).unwrap();
    assert!(
        text.contains("\"mountPath\":\"/home/ci/.convox\"") && text.contains("\"path\":\"auth\""),
        "mounted as $HOME/.convox/auth"
    );
}

#[tokio::test]
async fn encore_auth_key_env_for_auth_login() {
    let r = render("encore.yaml").await;
    assert_eq!(r.data["ENCORE_AUTH_KEY"], r.value);
    env_reads(&r, "ENCORE_AUTH_KEY", "ENCORE_AUTH_KEY");
    let text = serde_json::to_string(&r.workloads).unwrap();
    assert!(text.contains("encore auth login --auth-key=\\\"$ENCORE_AUTH_KEY\\\""));
}

#[tokio::test]
async fn tailscale_authkey_env() {
    let r = render("tailscale.yaml").await;
    assert_eq!(r.data["TS_AUTHKEY"], r.value);
    env_reads(&r, "TS_AUTHKEY", "TS_AUTHKEY");
}
