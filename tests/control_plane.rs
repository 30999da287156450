//! The local control plane behaves like a cluster, not like a bare API server: the
//! controller-manager garbage-collects owned objects and deletes namespaces, and with
//! workloads on (the shared plane of every test binary) Deployments, StatefulSets and
//! DaemonSets roll out onto the kwok Node — Pods scheduled, Running, Ready — and roll
//! again, to completion, when their Pod template changes.

mod common;

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet},
    core::v1::{ConfigMap, Namespace, Pod, Secret},
};
use keyward::control_plane::NODE;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use serde::de::DeserializeOwned;
use serde_json::json;

use common::{
    TestNamespace, eventually,
    workloads::{
        ROLLOUT_WAIT as WAIT, create, deployment_rolled_out, stateful_set_rolled_out,
        wait_rolled_out, workload,
    },
};

#[tokio::test]
async fn deleting_an_owner_garbage_collects_what_it_owns() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client, "gc").await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let owner = create(&maps, json!({"metadata": {"name": "owner"}})).await;
    let owned = |name: &str| {
        json!({"metadata": {"name": name, "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
            "uid": owner.uid().unwrap(),
        }]}})
    };
    create(&secrets, owned("owned")).await;
    create(&secrets, json!({"metadata": {"name": "unowned"}})).await;

    maps.delete("owner", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the owned Secret to be collected", WAIT, || async {
        secrets
            .get_opt("owned")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        secrets.get_opt("unowned").await.unwrap().is_some(),
        "a Secret without that owner stays"
    );
}

#[tokio::test]
async fn deleting_a_namespace_deletes_what_is_in_it() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client, "nsdelete").await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    create(&maps, json!({"metadata": {"name": "inside"}})).await;

    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .delete(&ns.name, &DeleteParams::default())
        .await
        .unwrap();
    eventually("the namespace to be gone", WAIT, || async {
        namespaces
            .get_opt(&ns.name)
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        maps.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "nothing is left in a deleted namespace"
    );
}

async fn change_template<K>(api: &Api<K>, name: &str, revision: &str)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let patch = json!({"spec": {"template": {"metadata": {"annotations": {"example.com/revision": revision}}}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// The Pods of `app`, once every one of them is on the kwok Node, Running and Ready.
async fn running_pods(client: &Client, ns: &str, app: &str, count: usize) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = ListParams::default().labels(&format!("app={app}"));
    eventually(
        &format!("{count} Running, Ready Pods of {app}"),
        WAIT,
        || async {
            let list = pods.list(&selector).await.ok()?.items;
            let running = list.iter().all(|p| {
                let spec = p.spec.as_ref().unwrap();
                let status = p.status.as_ref();
                p.metadata.deletion_timestamp.is_none()
                    && spec.node_name.as_deref() == Some(NODE)
                    && status.and_then(|s| s.phase.as_deref()) == Some("Running")
                    && status
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            });
            (list.len() == count && running).then_some(list)
        },
    )
    .await
}

#[tokio::test]
async fn a_deployment_rolls_out_and_rolls_again_when_its_template_changes() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client, "deploy").await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns.name);
    create(&deployments, workload("web", json!({"replicas": 2}))).await;

    let first = wait_rolled_out(&deployments, "web", deployment_rolled_out).await;
    assert_eq!(first.metadata.generation, Some(1));
    let pods = running_pods(&client, &ns.name, "web", 2).await;
    let owners = |pods: &[Pod]| -> Vec<String> {
        pods.iter()
            .map(|p| p.owner_references()[0].name.clone())
            .collect()
    };
    let old_set = owners(&pods)[0].clone();
    assert!(owners(&pods).iter().all(|o| *o == old_set));

    change_template(&deployments, "web", "2").await;
    let second = wait_rolled_out(&deployments, "web", deployment_rolled_out).await;
    assert_eq!(second.metadata.generation, Some(2));
    let pods = running_pods(&client, &ns.name, "web", 2).await;
    let new_set = owners(&pods)[0].clone();
    assert_ne!(
        new_set, old_set,
        "the new template runs in a new ReplicaSet"
    );
    assert!(owners(&pods).iter().all(|o| *o == new_set));
    for pod in &pods {
        assert_eq!(pod.annotations()["example.com/revision"], "2");
    }
    let old = sets.get(&old_set).await.unwrap();
    assert_eq!(
        old.spec.replicas,
        Some(0),
        "the old ReplicaSet is scaled to 0"
    );
    let new = sets.get(&new_set).await.unwrap();
    assert_eq!(new.status.unwrap().ready_replicas, Some(2));
}

#[tokio::test]
async fn a_stateful_set_rolls_out_and_rolls_again_when_its_template_changes() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client, "sts").await;
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    create(
        &sets,
        workload("db", json!({"replicas": 2, "serviceName": "db"})),
    )
    .await;

    let first = wait_rolled_out(&sets, "db", stateful_set_rolled_out).await;
    let first_revision = first.status.unwrap().update_revision.unwrap();
    let pods = running_pods(&client, &ns.name, "db", 2).await;
    let mut names: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
    names.sort();
    assert_eq!(names, ["db-0", "db-1"]);

    change_template(&sets, "db", "2").await;
    let second = eventually("db to roll to a new revision", WAIT, || async {
        sets.get("db").await.ok().filter(|s| {
            stateful_set_rolled_out(s)
                && s.status.as_ref().unwrap().update_revision.as_deref()
                    != Some(first_revision.as_str())
        })
    })
    .await;
    let revision = second.status.unwrap().update_revision.unwrap();
    for pod in running_pods(&client, &ns.name, "db", 2).await {
        assert_eq!(pod.labels()["controller-revision-hash"], revision);
        assert_eq!(pod.annotations()["example.com/revision"], "2");
    }
}

#[tokio::test]
async fn a_daemon_set_runs_on_the_simulated_node() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client, "ds").await;
    let sets: Api<DaemonSet> = Api::namespaced(client.clone(), &ns.name);
    create(&sets, workload("agent", json!({}))).await;
    let rolled_out = |d: &DaemonSet| {
        d.status.as_ref().is_some_and(|s| {
            s.observed_generation >= d.metadata.generation
                && s.desired_number_scheduled == 1
                && s.updated_number_scheduled == Some(1)
                && s.number_ready == 1
                && s.number_available == Some(1)
        })
    };
    wait_rolled_out(&sets, "agent", rolled_out).await;
    running_pods(&client, &ns.name, "agent", 1).await;
}
