//! What keyward asks of the API server, counted: the controller runs in-process on a
//! client that records every request (tests/common/requests.rs), against the real
//! control plane. A wave of new keys costs at most the writes each key needs — its
//! finalizer and attempt record (upstream providers only), its Secret, its status —
//! with the wave's events counted on one Event of the provider's beyond a burst of
//! their own; and a restart with every key Ready costs its lists and watches and
//! nothing else: no read, no write, no upstream call.

mod common;

use std::{
    collections::BTreeMap,
    sync::Arc,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use k8s_openapi::api::events::v1::Event;
use keyward::{
    events,
    providers::{DefaultFactory, ProviderFactory},
    reconciler::NoFaults,
    resources::{AuthKey, ClusterKeyProvider, KeyProvider, ServiceAccountKey},
};
use kube::{Api, Client, Resource, api::ListParams};
use serde_json::json;

use common::{
    Cluster, Controller, apply, eventually,
    requests::{Request, Requests},
    upstream::{Factory, Upstream},
};

/// Keys per wave.
const KEYS: usize = 60;

/// Requests a wave may add to what its keys need when a cache lags a write under load:
/// a Secret read afresh before trusting a missing one, a 409 and the read after it
/// (the safety reads of docs/performance.md). Seen: 1 in ~20 runs beside a compile.
const RACES: usize = 3;

/// A controller of one namespace on a recording client.
struct Recorded {
    requests: Requests,
    client: Client,
    ns: String,
    factory: Arc<dyn ProviderFactory>,
    controller: Option<Controller>,
}

impl Recorded {
    async fn new(ns: &str, factory: Arc<dyn ProviderFactory>) -> Self {
        let requests = Requests::default();
        let kubeconfig = std::fs::read_to_string(common::plane().kubeconfig()).unwrap();
        let client = requests
            .client(&kubeconfig, keyward::client::identify)
            .await;
        Self {
            requests,
            client,
            ns: ns.to_owned(),
            factory,
            controller: None,
        }
    }

    /// Starts a fresh controller and waits until each of its watches is open; the
    /// requests it made until then are forgotten, after checking that it opened one
    /// watch per resource type.
    async fn start(&mut self) -> Arc<keyward::reconciler::Context> {
        self.requests.clear();
        let controller = Controller::start(
            &self.client,
            &self.ns,
            self.factory.clone(),
            Arc::new(NoFaults),
            4,
        );
        let ctx = controller.ctx().clone();
        self.controller = Some(controller);
        let watched = [
            "authkeys",
            "serviceaccountkeys",
            "keyproviders",
            "clusterkeyproviders",
            "namespaces",
            "secrets",
            "deployments",
            "statefulsets",
            "daemonsets",
        ];
        let requests = self.requests.clone();
        let watches = eventually("a watch of every type", common::WAIT, || {
            let requests = requests.clone();
            async move {
                let watches = watches_by_resource(&requests.all());
                watched
                    .iter()
                    .all(|r| watches.contains_key(*r))
                    .then_some(watches)
            }
        })
        .await;
        assert_eq!(
            watches,
            watched.iter().map(|r| (r.to_string(), 1)).collect(),
            "one watch per resource type"
        );
        let lists: Vec<_> = requests
            .all()
            .into_iter()
            .filter(|r| r.verb == "list")
            .collect();
        assert!(
            lists.is_empty(),
            "every watch's first state streamed, none listed: {lists:?}"
        );
        ctx
    }

    async fn kill(&mut self) {
        if let Some(c) = self.controller.take() {
            c.kill().await;
        }
    }

    /// Requests other than lists and watches, and other than those `except` names.
    fn requests(&self, except: impl Fn(&Request) -> bool) -> Vec<Request> {
        self.requests
            .all()
            .into_iter()
            .filter(|r| !r.lists_or_watches() && !except(r))
            .collect()
    }
}

/// A provider status write: once per provider, not per key. Every controller looks
/// after every `ClusterKeyProvider`, so another test's may show up too.
fn provider_status(r: &Request) -> bool {
    r.write() && r.resource.ends_with("keyproviders/status")
}

fn watches_by_resource(requests: &[Request]) -> BTreeMap<String, usize> {
    let mut watches = BTreeMap::new();
    for r in requests.iter().filter(|r| r.verb == "watch") {
        *watches.entry(r.resource.clone()).or_default() += 1;
    }
    watches
}

/// Waits until `count` keys of kind `K` in `ns` are Ready with no issuance in flight.
async fn all_ready<K: keyward::reconciler::ManagedKey>(client: &Client, ns: &str, count: usize) {
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    eventually(
        &format!("{count} Ready {}s", K::KIND),
        Duration::from_secs(180),
        || async {
            let list = api.list(&ListParams::default()).await.ok()?;
            let ready = list.items.iter().filter(|k| {
                k.key_status()
                    .is_some_and(|s| s.attempt.is_none() && s.is_ready())
            });
            (ready.count() == count).then_some(())
        },
    )
    .await;
}

/// Waits until every one of `count` keys in `ns` is told of as `Issued`: by an Event
/// of its own, or in the series of the wave's Event about `provider` (in
/// `provider_ns`). Returns how many had an Event of their own.
async fn issued_events(
    client: &Client,
    ns: &str,
    (provider_ns, provider): (&str, &str),
    count: usize,
) -> usize {
    let label = format!("{count} keys told of as Issued");
    eventually(&label, common::WAIT, || async {
        let own = events_in(client, ns, "Issued")
            .await
            .iter()
            .filter(|e| regarding(e) != Some(provider))
            .count();
        let folded: i32 = events_in(client, provider_ns, "Issued")
            .await
            .iter()
            .filter(|e| regarding(e) == Some(provider))
            .map(|e| e.series.as_ref().map_or(1, |s| s.count))
            .sum();
        (own + folded as usize == count).then_some(own)
    })
    .await
}

fn regarding(e: &Event) -> Option<&str> {
    e.regarding.as_ref().and_then(|r| r.name.as_deref())
}

/// The Events in `ns` with this reason, oldest first.
async fn events_in(client: &Client, ns: &str, reason: &str) -> Vec<Event> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let mut found: Vec<Event> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect();
    found.sort_by_key(|e| e.event_time.clone().map(|t| t.0));
    found
}

/// The requests of a wave that were Events: at most a burst of their own and a wave
/// flush every [`events::WAVE_FLUSH`] while the wave lasted.
fn wave_events(requests: &[Request], took: Duration) -> usize {
    let events = requests.iter().filter(|r| r.resource == "events").count();
    let flushes = (took.as_secs_f64() / events::WAVE_FLUSH.as_secs_f64()).ceil() as usize + 1;
    assert!(
        events <= events::WAVE_BURST as usize + flushes,
        "{events} Event requests in a wave of {took:?}"
    );
    events
}

/// Restarts the controller with every key Ready and checks that the new one, once it
/// has looked at every key, made no request but its lists and watches (and the
/// provider-level reads `allowed` says may happen).
async fn restart_reads_and_writes_nothing(
    recorded: &mut Recorded,
    keys: usize,
    allowed: impl Fn(&Request) -> bool,
) {
    recorded.kill().await;
    let ctx = recorded.start().await;
    eventually(
        "the restarted controller to reconcile every key",
        Duration::from_secs(120),
        || async { (ctx.reconciles.load(Ordering::SeqCst) >= keys as u64).then_some(()) },
    )
    .await;
    let per_key = recorded.requests(allowed);
    assert!(
        per_key.is_empty(),
        "a restart with {keys} Ready keys made {} requests besides its lists and watches: {:?}",
        per_key.len(),
        recorded.requests.summary()
    );
}

#[tokio::test]
async fn a_builtin_key_costs_two_writes_and_a_restart_with_them_ready_none() {
    let cluster = Cluster::new("requests-builtin").await;
    let (admin, ns) = (cluster.client.clone(), &cluster.ns);
    // A ClusterKeyProvider whose policy admits the test namespace by label: resolving
    // it needs the namespace's labels as well as the provider.
    let provider = format!("builtin-{}", ns.name);
    apply(
        &admin,
        &ns.name,
        &json!({
            "apiVersion": ClusterKeyProvider::api_version(&()), "kind": "ClusterKeyProvider",
            "metadata": {"name": provider},
            "spec": {"builtin": {}, "policy": {"namespaceSelector": {"matchLabels": {"keyward.dev/test": "true"}}}}
        }),
    )
    .await;
    let mut recorded = Recorded::new(&ns.name, Arc::new(DefaultFactory::default())).await;
    recorded.start().await;

    let reference = json!({"kind": "ClusterKeyProvider", "name": provider});
    let started = Instant::now();
    for i in 0..KEYS {
        let name = format!("k{i}");
        if i % 2 == 0 {
            let spec = json!({"providerRef": reference});
            cluster.create::<AuthKey>(&name, spec).await;
        } else {
            let spec =
                json!({"providerRef": reference, "serviceAccount": {"name": format!("bot-{i}")}});
            cluster.create::<ServiceAccountKey>(&name, spec).await;
        }
    }
    all_ready::<AuthKey>(&admin, &ns.name, KEYS / 2).await;
    all_ready::<ServiceAccountKey>(&admin, &ns.name, KEYS / 2).await;
    let own = issued_events(&admin, &ns.name, ("default", &provider), KEYS).await;
    assert!(
        own <= events::WAVE_BURST as usize + 2,
        "{own} keys had an Event of their own"
    );

    let summary = recorded.requests.summary();
    let per_key = recorded.requests(provider_status);
    let events = wave_events(&per_key, started.elapsed());
    let besides = per_key.len() - events;
    assert!(
        (2 * KEYS..=2 * KEYS + RACES).contains(&besides),
        "{KEYS} builtin keys: their Secrets and statuses, {besides} requests besides {events} events: {summary:?}"
    );
    let reads = per_key.iter().filter(|r| !r.write()).count();
    assert!(reads <= RACES, "no reads but a race's: {summary:?}");
    for key in per_key.iter().filter(|r| r.resource != "events") {
        assert!(
            key.resource == "secrets" || key.resource.ends_with("/status"),
            "no finalizer on a builtin key: {key:?}"
        );
    }

    restart_reads_and_writes_nothing(&mut recorded, KEYS, |_| false).await;
    recorded.kill().await;
}

#[tokio::test]
async fn an_upstream_key_costs_four_writes_and_a_restart_with_them_ready_none() {
    let cluster = Cluster::new("requests-upstream").await;
    let (admin, ns) = (cluster.client.clone(), &cluster.ns);
    apply(
        &admin,
        &ns.name,
        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "credentials"},
                "stringData": {"api-key": "tskey-api-test"}}),
    )
    .await;
    cluster
        .create::<KeyProvider>(
            "upstream",
            json!({"tailscale": {"apiKeySecretRef": {"name": "credentials", "key": "api-key"}}}),
        )
        .await;
    let upstream = Upstream::new();
    let mut recorded = Recorded::new(&ns.name, Arc::new(Factory(upstream.clone()))).await;
    recorded.start().await;

    let started = Instant::now();
    for i in 0..KEYS {
        cluster
            .create::<AuthKey>(
                &format!("k{i}"),
                json!({"providerRef": {"name": "upstream"}, "expiry": "720h"}),
            )
            .await;
    }
    all_ready::<AuthKey>(&admin, &ns.name, KEYS).await;
    issued_events(&admin, &ns.name, (&ns.name, "upstream"), KEYS).await;
    assert_eq!(upstream.issued(), KEYS, "one upstream key per resource");

    let credentials = |r: &Request| r.resource == "secrets" && r.name == "credentials";
    let summary = recorded.requests.summary();
    let reads = recorded.requests(|r| !credentials(r)).len();
    let per_key = recorded.requests(|r| credentials(r) || provider_status(r));
    let events = wave_events(&per_key, started.elapsed());
    let besides = per_key.len() - events;
    assert!(
        (4 * KEYS..=4 * KEYS + RACES).contains(&besides),
        "{KEYS} upstream keys: a finalizer, an attempt record, a Secret and a status each, {besides} requests besides {events} events: {summary:?}"
    );
    let per_key_reads = per_key.iter().filter(|r| !r.write()).count();
    assert!(
        per_key_reads <= RACES,
        "no per-key reads but a race's: {summary:?}"
    );
    assert!(
        reads <= 3,
        "the provider's credential is read for the provider, not per key: {summary:?}"
    );

    upstream.calls.store(0, Ordering::SeqCst);
    restart_reads_and_writes_nothing(&mut recorded, KEYS, credentials).await;
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 0, "no upstream call");
    recorded.kill().await;
}

/// The Events about one key with this reason, oldest first.
async fn events_about(client: &Client, ns: &str, key: &str, reason: &str) -> Vec<Event> {
    let mut found = events_in(client, ns, reason).await;
    found.retain(|e| regarding(e) == Some(key));
    found
}

#[tokio::test]
async fn the_same_event_again_is_one_series_and_a_new_message_a_new_event() {
    let cluster = Cluster::new("requests-events").await;
    let (admin, ns) = (cluster.client.clone(), &cluster.ns);
    cluster
        .create::<KeyProvider>("upstream", json!({"builtin": {}}))
        .await;
    let upstream = Upstream::new();
    upstream.refuse_issue.store(true, Ordering::SeqCst);
    let mut recorded = Recorded::new(&ns.name, Arc::new(Factory(upstream.clone()))).await;
    recorded.start().await;
    cluster
        .create::<AuthKey>("k", json!({"providerRef": {"name": "upstream"}}))
        .await;

    // Each failed issuance (1s, 2s, 4s apart) is an event: one Event, counting them.
    let failed = eventually(
        "three failures counted on one Event",
        common::WAIT,
        || async {
            let failed = events_about(&admin, &ns.name, "k", "IssueFailed").await;
            let counted = failed.first()?.series.as_ref()?.count;
            (counted >= 3).then_some(failed)
        },
    )
    .await;
    assert_eq!(
        failed.len(),
        1,
        "one Event for the repeated failure: {failed:?}"
    );
    let creates = recorded
        .requests
        .all()
        .into_iter()
        .filter(|r| r.verb == "create" && r.resource == "events")
        .count();
    assert_eq!(creates, 1, "the repeats patched the series");

    // Two rotations in a row: each says which key it rotated to.
    upstream.refuse_issue.store(false, Ordering::SeqCst);
    let keys: Api<AuthKey> = Api::namespaced(admin.clone(), &ns.name);
    common::ready(&keys, "k").await;
    for rotation in ["1", "2"] {
        let rotate = json!({"metadata": {"annotations": {"keyward.dev/rotate": rotation}}});
        keys.patch("k", &Default::default(), &kube::api::Patch::Merge(&rotate))
            .await
            .unwrap();
        common::status_where(&keys, "k", "the rotation answered", |s| {
            s.rotate_request.as_deref() == Some(rotation) && s.attempt.is_none()
        })
        .await;
    }
    let status = keys.get("k").await.unwrap().status.unwrap();
    let rotated = eventually("two Rotated events", common::WAIT, || async {
        let rotated = events_about(&admin, &ns.name, "k", "Rotated").await;
        (rotated.len() == 2).then_some(rotated)
    })
    .await;
    let last = rotated[1].note.clone().unwrap_or_default();
    assert!(
        last.contains(status.key_id.as_deref().unwrap()),
        "the second rotation names the key it rotated to: {last}"
    );
    recorded.kill().await;
}
