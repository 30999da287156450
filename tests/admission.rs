//! The CRDs as the real API server enforces them: every example is accepted, every
//! invalid manifest in `tests/invalid/` is refused with the one message its first
//! line names, printer columns and the status subresource behave.

mod common;

use std::path::{Path, PathBuf};

use kube::{
    Api, Client,
    api::{DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
    discovery::{Scope, pinned_kind},
};
use serde_json::json;

use common::{TestNamespace, yaml_documents};

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// Creates `doc` with a server-side dry run (namespaced kinds go into `namespace`).
async fn dry_run_create(
    client: &Client,
    namespace: &str,
    doc: &serde_json::Value,
) -> Result<DynamicObject, kube::Error> {
    let object: DynamicObject = serde_json::from_value(doc.clone()).expect("a Kubernetes object");
    let types = object.types.clone().expect("apiVersion and kind");
    let gvk = GroupVersionKind::try_from(&types).expect("a valid apiVersion");
    let (resource, caps) = pinned_kind(client, &gvk).await?;
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => Api::namespaced_with(client.clone(), namespace, &resource),
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    let mut object = object;
    object.metadata.namespace = None;
    api.create(
        &PostParams {
            dry_run: true,
            ..Default::default()
        },
        &object,
    )
    .await
}

#[tokio::test]
async fn every_example_is_accepted() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client, "examples").await;
    let examples = yaml_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples"));
    assert!(!examples.is_empty());
    let mut checked = 0;
    for file in examples {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in yaml_documents(&text) {
            dry_run_create(&client, &ns.name, &doc)
                .await
                .unwrap_or_else(|e| panic!("{} was refused: {e}", file.display()));
            checked += 1;
        }
    }
    assert!(checked >= 5, "only {checked} example documents");
}

#[tokio::test]
async fn invalid_manifests_are_refused_with_their_message() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client, "invalid").await;
    let files = yaml_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid"));
    assert!(
        files.len() >= 10,
        "at least ten invalid manifests, one per rule"
    );
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let expected = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# refused: "))
            .unwrap_or_else(|| {
                panic!(
                    "{}: first line must be `# refused: <message>`",
                    file.display()
                )
            });
        let doc = yaml_documents(&text).remove(0);
        match dry_run_create(&client, &ns.name, &doc).await {
            Ok(_) => failures.push(format!("{}: accepted", file.display())),
            Err(kube::Error::Api(status))
                if status.code == 422 && status.message.contains(expected) =>
            {
                // One mistake, one message: no second, confusing one beside it (a CEL
                // rule tripping over the same malformed value, say). The API server's
                // own note that it skipped the CEL rules of an invalid object is not
                // ours to remove, and says nothing wrong.
                let causes = status.details.as_ref().map_or(0, |d| {
                    d.causes
                        .iter()
                        .filter(|c| !c.message.contains("some validation rules were not checked"))
                        .count()
                });
                if causes != 1 {
                    failures.push(format!(
                        "{}: refused with {causes} messages, want exactly one: {}",
                        file.display(),
                        status.message
                    ));
                }
            }
            Err(other) => failures.push(format!(
                "{}: refused, but not with {expected:?}: {other}",
                file.display()
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn authkey(name: &str) -> keyward::resources::AuthKey {
    serde_json::from_value(json!({
        "apiVersion": "keyward.dev/v1alpha1",
        "kind": "AuthKey",
        "metadata": {"name": name},
        "spec": {"providerRef": {"kind": "ClusterKeyProvider", "name": "builtin"}, "expiry": "720h"}
    }))
    .unwrap()
}

#[tokio::test]
async fn status_is_a_subresource() {
    use keyward::resources::AuthKey;
    let client = common::client().await;
    let ns = TestNamespace::new(&client, "status").await;
    let api: Api<AuthKey> = Api::namespaced(client.clone(), &ns.name);

    // Status sent with the main resource is dropped.
    let mut key = authkey("sub");
    key.status = Some(keyward::resources::KeyStatus {
        revision: Some(9),
        ..Default::default()
    });
    let created = api.create(&PostParams::default(), &key).await.unwrap();
    assert_eq!(created.status.and_then(|s| s.revision), None);
    let generation = created.metadata.generation;

    // Status written through /status lands, and does not bump the generation.
    let patched = api
        .patch_status(
            "sub",
            &PatchParams::apply("test").force(),
            &Patch::Apply(json!({
                "apiVersion": "keyward.dev/v1alpha1", "kind": "AuthKey",
                "status": {"revision": 2, "keyId": "k-1"}
            })),
        )
        .await
        .unwrap();
    assert_eq!(patched.status.as_ref().and_then(|s| s.revision), Some(2));
    assert_eq!(patched.metadata.generation, generation);

    // A spec change bumps the generation and keeps the status.
    let changed = api
        .patch(
            "sub",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"expiry": "360h"}})),
        )
        .await
        .unwrap();
    assert_eq!(changed.metadata.generation, generation.map(|g| g + 1));
    assert_eq!(
        changed.status.and_then(|s| s.key_id).as_deref(),
        Some("k-1")
    );
}

#[tokio::test]
async fn printer_columns_show_readiness_expiry_and_revision() {
    use keyward::resources::AuthKey;
    let client = common::client().await;
    let ns = TestNamespace::new(&client, "columns").await;
    let api: Api<AuthKey> = Api::namespaced(client.clone(), &ns.name);
    api.create(&PostParams::default(), &authkey("cols"))
        .await
        .unwrap();
    api.patch_status(
        "cols",
        &PatchParams::apply("test").force(),
        &Patch::Apply(json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "AuthKey",
            "status": {
                "revision": 4,
                "expiresAt": "2030-01-01T00:00:00Z",
                "renewalTime": "2029-12-01T00:00:00Z",
                "conditions": [{"type": "Ready", "status": "True", "reason": "Issued",
                    "message": "key issued", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
            }
        })),
    )
    .await
    .unwrap();

    let request = http::Request::get(format!(
        "/apis/keyward.dev/v1alpha1/namespaces/{}/authkeys/cols",
        ns.name
    ))
    .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
    .body(Vec::new())
    .unwrap();
    let table: serde_json::Value = client.request(request).await.unwrap();
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for wanted in [
        "Name", "Ready", "Provider", "Expires", "Renews", "Revision", "Age",
    ] {
        assert!(
            columns.contains(&wanted),
            "no {wanted} column in {columns:?}"
        );
    }
    let cells = &table["rows"][0]["cells"];
    let cell = |name: &str| &cells[columns.iter().position(|c| *c == name).unwrap()];
    assert_eq!(cell("Ready"), "True");
    assert_eq!(cell("Provider"), "builtin");
    assert_eq!(cell("Revision"), 4);
    assert_eq!(cell("Reason"), "Issued");
    // Reason is a `-o wide` column (priority 1), the others show by default.
    let priority = |name: &str| {
        table["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .map(|c| c["priority"].as_i64().unwrap_or(0))
    };
    assert_eq!(priority("Reason"), Some(1));
    assert_eq!(priority("Ready"), Some(0));
}

#[tokio::test]
async fn short_names_and_category_are_served() {
    let client = common::client().await;
    let resources = client
        .list_api_group_resources("keyward.dev/v1alpha1")
        .await
        .unwrap();
    for (plural, short) in [
        ("authkeys", "ak"),
        ("serviceaccountkeys", "sak"),
        ("keyproviders", "kp"),
        ("clusterkeyproviders", "ckp"),
    ] {
        let resource = resources
            .resources
            .iter()
            .find(|r| r.name == plural)
            .unwrap_or_else(|| panic!("{plural} is not served"));
        assert_eq!(
            resource.short_names.as_deref(),
            Some(&[short.to_owned()][..])
        );
        assert_eq!(
            resource.categories.as_deref(),
            Some(&["keyward".to_owned()][..])
        );
    }
}
