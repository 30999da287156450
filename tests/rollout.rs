//! Workloads that follow their keys, against the real control plane: the
//! controller-manager, the scheduler and a kwok Node make Deployments and
//! StatefulSets really roll. Each rotation annotates every `spec.rollout` target's Pod
//! template once — after the Secret changed, before the old key is revoked — and a
//! restart or a failover of the operator restarts nothing; `retire: AfterRollout`
//! revokes the old key within seconds of the last target finishing, and no later than
//! the overlap when one never does.

mod common;

use std::{
    cell::RefCell,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment, StatefulSet},
    core::v1::Secret,
};
use keyward::resources::{AuthKey, KeyProvider, KeyStatus};
use kube::{
    Api, Resource, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;
use serde_json::json;

use common::{
    Cluster, TestNamespace, WAIT, condition, eventually,
    operator::{Operator, sample, wait_for_holder},
    upstream::{Factory, Upstream},
    workloads::{
        create, deployment_rolled_out, stateful_set_rolled_out, wait_rolled_out, workload,
    },
};

/// A namespace with a `KeyProvider` named `keys` served by the in-test upstream, and
/// a controller watching it.
async fn cluster(prefix: &str) -> (Cluster, Arc<Upstream>) {
    let mut cluster = Cluster::new(prefix).await;
    cluster
        .create::<KeyProvider>("keys", json!({"builtin": {}}))
        .await;
    let upstream = Upstream::new();
    cluster.start(Arc::new(Factory(upstream.clone())));
    (cluster, upstream)
}

/// `web`, a Deployment, and `db`, a StatefulSet, of `replicas` each, rolled out.
async fn web_and_db(client: &kube::Client, ns: &str, replicas: i32) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    create(&deployments, workload("web", json!({"replicas": replicas}))).await;
    create(
        &sets,
        workload("db", json!({"replicas": replicas, "serviceName": "db"})),
    )
    .await;
    wait_rolled_out(&deployments, "web", deployment_rolled_out).await;
    wait_rolled_out(&sets, "db", stateful_set_rolled_out).await;
}

fn key_spec(rotation: serde_json::Value, rollout: &[(&str, &str)]) -> serde_json::Value {
    let targets: Vec<_> = rollout
        .iter()
        .map(|(kind, name)| json!({"kind": kind, "name": name}))
        .collect();
    json!({"providerRef": {"name": "keys"}, "expiry": "720h", "rotation": rotation,
           "rollout": targets})
}

/// The documented annotation of an AuthKey on its targets' Pod templates.
fn annotation(key: &str) -> String {
    format!("authkey.keyward.dev/{key}")
}

/// The documented value recording `revision` of the key resource `uid`.
fn record(uid: &str, revision: i64) -> String {
    let uid: String = uid.chars().filter(|c| *c != '-').take(8).collect();
    format!("{revision}.{uid}")
}

/// The key's annotation on the Pod template of a Deployment, StatefulSet or DaemonSet.
fn template_annotation<K: serde::Serialize>(w: &K, key: &str) -> Option<String> {
    let w = serde_json::to_value(w).ok()?;
    let value = &w["spec"]["template"]["metadata"]["annotations"][annotation(key)];
    value.as_str().map(str::to_owned)
}

/// Every version of one object from a watch started before the change under test.
struct History<K> {
    versions: Arc<Mutex<Vec<K>>>,
    task: tokio::task::JoinHandle<()>,
}

impl<K> History<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    async fn start(api: Api<K>, name: &str) -> Self {
        let versions: Arc<Mutex<Vec<K>>> = Arc::default();
        let seen = versions.clone();
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let task = tokio::spawn(
            watcher(api, config)
                .default_backoff()
                .applied_objects()
                .for_each(move |o| {
                    if let Ok(o) = o {
                        seen.lock().unwrap().push(o);
                    }
                    futures::future::ready(())
                }),
        );
        let history = Self { versions, task };
        eventually(&format!("the watch of {name}"), WAIT, || async {
            (!history.versions.lock().unwrap().is_empty()).then_some(())
        })
        .await;
        history
    }

    fn versions(&self) -> Vec<K> {
        self.versions.lock().unwrap().clone()
    }
}

impl<K> Drop for History<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The resourceVersion of the first version for which `check` holds. Versions of one
/// etcd are its global revision: they order writes across kinds on this test plane.
fn first_version<K: Resource>(history: &[K], check: impl Fn(&K) -> bool) -> Option<u64> {
    history
        .iter()
        .find(|o| check(o))
        .and_then(|o| o.meta().resource_version.as_ref()?.parse().ok())
}

/// The distinct values the key's annotation took, in order.
fn records<K: serde::Serialize>(history: &[K], key: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for value in history.iter().filter_map(|w| template_annotation(w, key)) {
        if out.last() != Some(&value) {
            out.push(value);
        }
    }
    out
}

async fn generation<K>(api: &Api<K>, name: &str) -> i64
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    api.get(name).await.unwrap().meta().generation.unwrap()
}

/// Waits until both targets record `value` and have rolled out.
async fn rolled_out_to(client: &kube::Client, ns: &str, key: &str, value: &str) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    eventually(
        &format!("web and db rolled out to {value}"),
        WAIT,
        || async {
            let web = deployments.get("web").await.ok()?;
            let db = sets.get("db").await.ok()?;
            let done = deployment_rolled_out(&web)
                && stateful_set_rolled_out(&db)
                && template_annotation(&web, key).as_deref() == Some(value)
                && template_annotation(&db, key).as_deref() == Some(value);
            done.then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn each_rotation_annotates_every_target_once_and_a_restart_restarts_nothing() {
    let (mut h, upstream) = cluster("rollout").await;
    web_and_db(&h.client, &h.ns.name, 2).await;
    let deployments: Api<Deployment> = Api::namespaced(h.client.clone(), &h.ns.name);
    let sets: Api<StatefulSet> = Api::namespaced(h.client.clone(), &h.ns.name);
    let secrets: Api<Secret> = Api::namespaced(h.client.clone(), &h.ns.name);
    let web_history = History::start(deployments.clone(), "web").await;
    let db_history = History::start(sets.clone(), "db").await;

    let spec = key_spec(
        json!({"overlap": "20s"}),
        &[("Deployment", "web"), ("StatefulSet", "db")],
    );
    h.create::<AuthKey>("app", spec).await;
    let keys = h.api::<AuthKey>();
    common::ready(&keys, "app").await;
    let uid = keys.get("app").await.unwrap().uid().unwrap();
    let secret_history = History::start(secrets, "app").await;
    rolled_out_to(&h.client, &h.ns.name, "app", &record(&uid, 1)).await;
    assert_eq!(generation(&deployments, "web").await, 2, "one annotation");
    assert_eq!(generation(&sets, "db").await, 2, "one annotation");

    h.rotate::<AuthKey>("app", "r1").await;
    let rotated = common::status_where(&keys, "app", "revision 2", |s| {
        s.revision == Some(2) && !s.retiring.is_empty()
    })
    .await;
    let old = rotated.retiring[0].key_id.clone();
    let second = record(&uid, 2);
    // Seen annotated while the old key is still live: written before its revocation.
    eventually("both targets annotated for revision 2", WAIT, || async {
        let web = deployments.get("web").await.ok()?;
        let db = sets.get("db").await.ok()?;
        let annotated = template_annotation(&web, "app").as_deref() == Some(second.as_str())
            && template_annotation(&db, "app").as_deref() == Some(second.as_str());
        assert!(
            annotated || !upstream.key(&old).unwrap().revoked,
            "the old key was revoked before both targets were annotated"
        );
        (annotated && !upstream.key(&old).unwrap().revoked).then_some(())
    })
    .await;
    rolled_out_to(&h.client, &h.ns.name, "app", &second).await;
    eventually("the old key revoked after the overlap", WAIT, || async {
        upstream.key(&old).unwrap().revoked.then_some(())
    })
    .await;

    // After the Secret changed: the Secret's write of revision 2 precedes both
    // annotations in etcd's order.
    let secret_written = first_version(&secret_history.versions(), |s: &Secret| {
        s.annotations()
            .get("keyward.dev/revision")
            .map(String::as_str)
            == Some("2")
    })
    .expect("the Secret's revision-2 write was watched");
    for (what, annotated) in [
        (
            "web",
            first_version(&web_history.versions(), |w: &Deployment| {
                template_annotation(w, "app").as_deref() == Some(second.as_str())
            }),
        ),
        (
            "db",
            first_version(&db_history.versions(), |w: &StatefulSet| {
                template_annotation(w, "app").as_deref() == Some(second.as_str())
            }),
        ),
    ] {
        let annotated = annotated.expect("the annotation was watched");
        assert!(
            secret_written < annotated,
            "{what} annotated at {annotated}, before the Secret changed at {secret_written}"
        );
    }
    // Exactly one annotation per revision: one template change each.
    assert_eq!(
        records(&web_history.versions(), "app"),
        [record(&uid, 1), second.clone()]
    );
    assert_eq!(
        records(&db_history.versions(), "app"),
        [record(&uid, 1), second.clone()]
    );
    assert_eq!(generation(&deployments, "web").await, 3);
    assert_eq!(generation(&sets, "db").await, 3);

    // A restarted operator looks at the key and restarts nothing.
    h.kill().await;
    h.start(Arc::new(Factory(upstream.clone())));
    let ctx = h.ctx().clone();
    eventually(
        "the restarted controller reconciled the key",
        WAIT,
        || async { (ctx.reconciles.load(std::sync::atomic::Ordering::Relaxed) >= 1).then_some(()) },
    )
    .await;
    assert_eq!(generation(&deployments, "web").await, 3, "web restarted");
    assert_eq!(generation(&sets, "db").await, 3, "db restarted");
}

/// Polls the key, its targets and the old key until the old key is revoked; returns
/// when every target was first seen rolled out onto `value` (`None`: not even after
/// the revocation), when the old key was first seen revoked, and every `waitingFor`
/// the status showed.
async fn watch_retirement(
    h: &Cluster,
    upstream: &Upstream,
    old: &str,
    value: &str,
    targets: &[&str],
) -> (Option<Instant>, Instant, Vec<Vec<String>>) {
    let deployments: Api<Deployment> = Api::namespaced(h.client.clone(), &h.ns.name);
    let keys = h.api::<AuthKey>();
    let finished = RefCell::new(None);
    let waiting: RefCell<Vec<Vec<String>>> = RefCell::default();
    let revoked = eventually("the old key revoked", Duration::from_secs(120), || async {
        // Read first: targets not finished after the revocation were not finished
        // before it either.
        let revoked = upstream.key(old)?.revoked.then(Instant::now);
        let mut all = true;
        for name in targets {
            let d = deployments.get(name).await.ok()?;
            all &= deployment_rolled_out(&d)
                && template_annotation(&d, "app").as_deref() == Some(value);
        }
        if all && finished.borrow().is_none() {
            *finished.borrow_mut() = Some(revoked.unwrap_or_else(Instant::now));
        }
        let status: KeyStatus = keys.get("app").await.ok()?.status?;
        let mut waiting = waiting.borrow_mut();
        if let Some(r) = status.retiring.first()
            && waiting.last() != Some(&r.waiting_for)
        {
            waiting.push(r.waiting_for.clone());
        }
        revoked
    })
    .await;
    (finished.into_inner(), revoked, waiting.into_inner())
}

/// Creates the key `app` with `spec`, waits until it is Ready, rotates it, and waits
/// for revision 2; returns the key's uid and the id of the key that now retires.
///
/// The retiring key's id is the one revision 1 held, not read from `status.retiring`:
/// a target that rolls out within one reconcile (a DaemonSet on the simulated node
/// can) lets `AfterRollout` revoke it before a poll sees it retiring.
async fn rotated(h: &Cluster, spec: serde_json::Value) -> (String, String) {
    h.create::<AuthKey>("app", spec).await;
    let keys = h.api::<AuthKey>();
    let first = common::ready(&keys, "app").await;
    let old = first.key_id.clone().expect("a Ready key has an id");
    let uid = keys.get("app").await.unwrap().uid().unwrap();
    h.rotate::<AuthKey>("app", "r1").await;
    common::status_where(&keys, "app", "revision 2", |s| s.revision == Some(2)).await;
    (uid, old)
}

#[tokio::test]
async fn after_rollout_the_old_key_goes_within_seconds_of_the_last_target_finishing() {
    let (h, upstream) = cluster("afterrollout").await;
    let deployments: Api<Deployment> = Api::namespaced(h.client.clone(), &h.ns.name);
    for name in ["web", "api"] {
        create(&deployments, workload(name, json!({"replicas": 2}))).await;
        wait_rolled_out(&deployments, name, deployment_rolled_out).await;
    }
    // An overlap far longer than the test: only the rollout explains a revocation.
    let spec = key_spec(
        json!({"overlap": "30m", "retire": "AfterRollout"}),
        &[("Deployment", "web"), ("Deployment", "api")],
    );
    let (uid, old) = rotated(&h, spec).await;
    let keys = h.api::<AuthKey>();
    let (finished, revoked, waiting) =
        watch_retirement(&h, &upstream, &old, &record(&uid, 2), &["web", "api"]).await;

    let finished = finished.expect("revoked before every target had rolled out");
    let lag = revoked.saturating_duration_since(finished);
    eprintln!(
        "old key revoked {lag:?} after the test (polling every 100ms) saw the last target finish"
    );
    assert!(
        lag < Duration::from_secs(5),
        "revoked {lag:?} after the rollout"
    );
    assert!(
        waiting.iter().any(|w| !w.is_empty()),
        "status showed what the old key waited for: {waiting:?}"
    );
    for w in &waiting {
        assert!(
            w.iter()
                .all(|t| t == "Deployment/web" || t == "Deployment/api"),
            "{w:?}"
        );
    }
    let status =
        common::status_where(&keys, "app", "retiring emptied", |s| s.retiring.is_empty()).await;
    assert_eq!(status.revision, Some(2));
}

#[tokio::test]
async fn after_rollout_waits_out_the_overlap_for_a_target_that_never_finishes() {
    let (h, upstream) = cluster("stuck").await;
    let deployments: Api<Deployment> = Api::namespaced(h.client.clone(), &h.ns.name);
    create(&deployments, workload("web", json!({"replicas": 1}))).await;
    wait_rolled_out(&deployments, "web", deployment_rolled_out).await;
    // Its Pods never find a Node: no rollout of it ever finishes.
    let mut stuck = workload("stuck", json!({"replicas": 1}));
    stuck["spec"]["template"]["spec"]["nodeSelector"] = json!({"keyward.dev/test": "no-such-node"});
    create(&deployments, stuck).await;

    let spec = key_spec(
        json!({"overlap": "20s", "retire": "AfterRollout"}),
        &[("Deployment", "web"), ("Deployment", "stuck")],
    );
    let (uid, old) = rotated(&h, spec).await;
    let rotated_at = Instant::now();
    let (_, revoked, waiting) =
        watch_retirement(&h, &upstream, &old, &record(&uid, 2), &["web"]).await;

    let waited = revoked.saturating_duration_since(rotated_at);
    eprintln!("old key revoked {waited:?} after the rotation (overlap 20s)");
    assert!(
        waited >= Duration::from_secs(18),
        "revoked after {waited:?}, before the overlap ended"
    );
    assert!(
        waited < Duration::from_secs(30),
        "revoked only after {waited:?}"
    );
    assert_eq!(
        waiting.last().map(Vec::as_slice),
        Some(&["Deployment/stuck".to_owned()][..]),
        "status said which target it waited for: {waiting:?}"
    );
}

#[tokio::test]
async fn a_daemon_set_is_annotated_and_waited_for_too() {
    let (h, upstream) = cluster("daemonset").await;
    let sets: Api<DaemonSet> = Api::namespaced(h.client.clone(), &h.ns.name);
    create(&sets, workload("agent", json!({}))).await;
    let spec = key_spec(
        json!({"overlap": "30m", "retire": "AfterRollout"}),
        &[("DaemonSet", "agent")],
    );
    let (uid, old) = rotated(&h, spec).await;
    eventually(
        "the old key revoked once agent rolled out",
        WAIT,
        || async { upstream.key(&old)?.revoked.then_some(()) },
    )
    .await;
    let agent = sets.get("agent").await.unwrap();
    assert_eq!(template_annotation(&agent, "app"), Some(record(&uid, 2)));
    assert_eq!(
        agent.metadata.generation,
        Some(3),
        "one annotation per revision"
    );
    let status = agent.status.unwrap();
    assert_eq!(status.updated_number_scheduled, Some(1), "rolled out");
    assert_eq!(status.number_ready, 1, "rolled out");
}

#[tokio::test]
async fn a_missing_target_is_a_condition_until_it_exists_then_it_is_annotated() {
    let (h, _upstream) = cluster("missing").await;
    h.create::<AuthKey>("app", key_spec(json!({}), &[("Deployment", "late")]))
        .await;
    let keys = h.api::<AuthKey>();
    // The key itself is fine: Ready, issued once.
    let status = common::status_where(&keys, "app", "Ready, Degraded RolloutTargetNotFound", |s| {
        condition(s, "Ready").is_some_and(|c| c.0 == "True")
            && condition(s, "Degraded")
                .is_some_and(|c| c.0 == "True" && c.1 == "RolloutTargetNotFound")
    })
    .await;
    let message = condition(&status, "Degraded").unwrap().2;
    assert!(message.contains("Deployment/late"), "{message}");
    assert_eq!(status.revision, Some(1));

    let deployments: Api<Deployment> = Api::namespaced(h.client.clone(), &h.ns.name);
    create(&deployments, workload("late", json!({"replicas": 1}))).await;
    let uid = keys.get("app").await.unwrap().uid().unwrap();
    eventually("late annotated once it exists", WAIT, || async {
        let d = deployments.get("late").await.ok()?;
        (template_annotation(&d, "app") == Some(record(&uid, 1))).then_some(())
    })
    .await;
    common::status_where(&keys, "app", "no longer Degraded", |s| {
        condition(s, "Degraded").is_some_and(|c| c.0 == "False")
    })
    .await;
}

/// `keyward run --leader-elect` twice: the leader annotates, is SIGKILLed, and the new
/// leader restarts nothing until the next rotation, which it annotates once.
#[tokio::test]
async fn failing_over_the_operator_restarts_nothing() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = common::client().await;
    let ns = TestNamespace::new(&client, "rolloutfailover").await;
    common::apply(
        &client,
        &ns.name,
        &json!({"apiVersion": "keyward.dev/v1alpha1", "kind": "KeyProvider",
                "metadata": {"name": "keys"}, "spec": {"builtin": {}}}),
    )
    .await;
    web_and_db(&client, &ns.name, 1).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);

    let mut a = Operator::candidate(&ns.name, "replica-a");
    wait_for_holder(&client, &ns.name, "replica-a").await;
    let b = Operator::candidate(&ns.name, "replica-b");
    let spec = key_spec(json!({}), &[("Deployment", "web"), ("StatefulSet", "db")]);
    common::apply(
        &client,
        &ns.name,
        &json!({"apiVersion": "keyward.dev/v1alpha1", "kind": "AuthKey",
                "metadata": {"name": "app"}, "spec": spec}),
    )
    .await;
    let keys: Api<AuthKey> = Api::namespaced(client.clone(), &ns.name);
    common::ready(&keys, "app").await;
    let uid = keys.get("app").await.unwrap().uid().unwrap();
    let rotate = |value: &'static str| {
        let keys = keys.clone();
        async move {
            let patch = json!({"metadata": {"annotations": {"keyward.dev/rotate": value}}});
            keys.patch("app", &Default::default(), &kube::api::Patch::Merge(patch))
                .await
                .unwrap();
        }
    };
    rotate("r1").await;
    rolled_out_to(&client, &ns.name, "app", &record(&uid, 2)).await;
    let before = (
        generation(&deployments, "web").await,
        generation(&sets, "db").await,
    );
    assert_eq!(before, (3, 3), "revisions 1 and 2, one annotation each");

    a.sigkill();
    wait_for_holder(&client, &ns.name, "replica-b").await;
    eventually("the new leader reconciled the key", WAIT, || async {
        let text = b.metrics().await;
        let series = r#"keyward_reconcile_duration_seconds_count{kind="AuthKey",result="ok"}"#;
        sample(&text, series).filter(|n| *n >= 1.0)
    })
    .await;
    let after = (
        generation(&deployments, "web").await,
        generation(&sets, "db").await,
    );
    assert_eq!(after, before, "the failover restarted a target");

    rotate("r2").await;
    rolled_out_to(&client, &ns.name, "app", &record(&uid, 3)).await;
    let rotated = (
        generation(&deployments, "web").await,
        generation(&sets, "db").await,
    );
    assert_eq!(rotated, (4, 4), "one annotation for revision 3");
}
