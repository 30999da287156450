//! Each watch streams its first state where the API server serves that (WatchList,
//! on by default from Kubernetes 1.34: tests/requests.rs checks that no watch lists on
//! the shared control plane) and lists it in pages where the server refuses it. Here an
//! API server of its own runs with WatchList off, as Kubernetes 1.33 ships, and keys
//! still become Ready.

mod common;

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use keyward::{
    control_plane::{ControlPlane, Options},
    providers::DefaultFactory,
    reconciler::NoFaults,
    resources::AuthKey,
};
use kube::{
    Api,
    api::{PostParams, WatchParams},
};
use serde_json::json;

use common::{Controller, apply, ready, requests::Requests};

#[tokio::test]
async fn without_streamed_watches_the_first_state_is_listed_and_keys_become_ready() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let plane = ControlPlane::start(Options {
        extra_apiserver_args: vec!["--feature-gates=WatchList=false".into()],
        ..Options::default()
    })
    .await
    .expect("a control plane with WatchList off");
    let admin = plane.client().await.unwrap();
    let refused = Api::<Secret>::all(admin.clone())
        .watch(&WatchParams::streaming_lists(), "0")
        .await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(s)) if s.code == 422),
        "this API server refuses a streamed watch: {:?}",
        refused.err()
    );

    let ns = "watch-list";
    let namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
    Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    let requests = Requests::default();
    let kubeconfig = std::fs::read_to_string(plane.kubeconfig()).unwrap();
    let client = requests
        .client(&kubeconfig, keyward::client::identify)
        .await;
    let controller = Controller::start(
        &client,
        ns,
        Arc::new(DefaultFactory::default()),
        Arc::new(NoFaults),
        4,
    );
    for object in [
        json!({"apiVersion": "keyward.dev/v1alpha1", "kind": "KeyProvider",
               "metadata": {"name": "keys"}, "spec": {"builtin": {}}}),
        json!({"apiVersion": "keyward.dev/v1alpha1", "kind": "AuthKey",
               "metadata": {"name": "app"},
               "spec": {"providerRef": {"kind": "KeyProvider", "name": "keys"}}}),
    ] {
        apply(&admin, ns, &object).await;
    }
    let status = ready(&Api::<AuthKey>::namespaced(admin.clone(), ns), "app").await;
    assert!(status.key_id.is_some());

    let all = requests.all();
    for resource in ["authkeys", "secrets", "keyproviders", "namespaces"] {
        let listed = all
            .iter()
            .any(|r| r.verb == "list" && r.resource == resource);
        let watched = all
            .iter()
            .any(|r| r.verb == "watch" && r.resource == resource);
        assert!(
            listed && watched,
            "{resource}: listed in pages, then watched: {all:?}"
        );
    }
    controller.kill().await;
}
