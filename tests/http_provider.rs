//! The `http` provider end to end: the real control plane, the controller in-process
//! with the operator's own provider factory, and the Prefect 1 GraphQL emulator as
//! the upstream, configured exactly as `examples/http/prefect1-graphql.yaml`.

mod common;

use std::sync::{Arc, atomic::Ordering};

use k8s_openapi::api::core::v1::{Event, Secret};
use keyward::{
    providers::DefaultFactory,
    reconciler::CrashPoint,
    resources::{KeyProvider, KeyStatus, ServiceAccountKey},
};
use keyward_emulators::{
    Fault,
    prefect_graphql::{Admin, PrefectGraphql},
};
use kube::{
    Api,
    api::{DeleteParams, ListParams},
};
use serde_json::{Value, json};

use common::{Cluster, WAIT, eventually};

const EXAMPLE: &str = include_str!("../examples/http/prefect1-graphql.yaml");

struct Harness {
    cluster: Cluster,
    emulator: PrefectGraphql,
    admin: Admin,
    service_account: String,
}

common::cluster_harness!(Harness);

impl Harness {
    async fn new(prefix: &str) -> Self {
        let cluster = Cluster::new(prefix).await;
        let emulator = PrefectGraphql::start().await;
        let admin = emulator.add_admin();
        let service_account = emulator.add_service_account();
        Self {
            cluster,
            emulator,
            admin,
            service_account,
        }
    }

    /// Starts a fresh controller (a new process, as far as state goes).
    fn start(&mut self) {
        self.cluster.start(Arc::new(DefaultFactory::default()));
    }

    /// The example's documents, pointed at the emulator and its accounts.
    fn example(&self) -> Vec<Value> {
        let text = EXAMPLE.replace(
            "https://api.prefect.io/",
            &format!("{}/", self.emulator.base_url()),
        );
        let mut docs = common::yaml_documents(&text);
        for doc in &mut docs {
            match doc["kind"].as_str().unwrap() {
                "Secret" => doc["stringData"]["apiKey"] = json!(self.admin.key),
                "ServiceAccountKey" => {
                    doc["spec"]["serviceAccount"]["name"] = json!(self.service_account);
                }
                _ => {}
            }
        }
        docs
    }

    fn doc(&self, kind: &str) -> Value {
        self.example()
            .into_iter()
            .find(|d| d["kind"] == kind)
            .unwrap()
    }

    async fn apply(&self, object: &Value) {
        common::apply(&self.client, &self.ns.name, object).await;
    }

    /// Applies the example's Secret and provider, and its key with `key_spec` merged in.
    async fn apply_example(&self, key_spec: Value) {
        self.apply(&self.doc("Secret")).await;
        self.apply(&self.doc("KeyProvider")).await;
        let mut key = self.doc("ServiceAccountKey");
        merge(&mut key["spec"], key_spec);
        self.apply(&key).await;
    }

    fn keys(&self) -> Api<ServiceAccountKey> {
        self.api()
    }

    async fn status_where(&self, what: &str, check: impl Fn(&KeyStatus) -> bool) -> KeyStatus {
        common::status_where(&self.keys(), "prefect1-agent", what, check).await
    }

    async fn ready(&self) -> KeyStatus {
        common::ready(&self.keys(), "prefect1-agent").await
    }

    async fn secret_value(&self) -> Option<String> {
        let secret = Api::<Secret>::namespaced(self.client.clone(), &self.ns.name)
            .get_opt("prefect1-agent")
            .await
            .unwrap()?;
        Some(
            String::from_utf8(secret.data?["PREFECT__CLOUD__AGENT__AUTH_TOKEN"].0.clone()).unwrap(),
        )
    }

    /// Requests the emulator saw (the admin key's own use by the test included: none).
    fn upstream_requests(&self) -> usize {
        self.emulator.faults().requests().len()
    }

    async fn events(&self) -> String {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.ns.name);
        serde_json::to_string(&events.list(&ListParams::default()).await.unwrap().items).unwrap()
    }

    /// Waits for an event with this reason: keyward sends an event with the status write
    /// that records what happened, so it can land just after the status a test saw.
    async fn event(&self, reason: &str) {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.ns.name);
        eventually(&format!("a {reason} event"), WAIT, || async {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| e.reason.as_deref() == Some(reason))
                .then_some(())
        })
        .await;
    }
}

fn merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                merge(t.entry(k).or_insert(Value::Null), v);
            }
        }
        (t, p) => *t = p,
    }
}

fn ready(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    conditions.iter().find(|c| c.type_ == "Ready")
}

/// The provider's Ready condition once it says `status`.
async fn provider_ready(h: &Harness, status: &str) -> (String, String) {
    let api: Api<KeyProvider> = Api::namespaced(h.client.clone(), &h.ns.name);
    eventually(&format!("provider Ready={status}"), WAIT, || {
        let api = api.clone();
        async move {
            let p = api.get_opt("prefect1").await.ok()??;
            let c = ready(&p.status?.conditions)?.clone();
            (c.status == status).then_some((c.reason, c.message))
        }
    })
    .await
}

#[tokio::test]
async fn the_example_issues_rotates_and_revokes_through_graphql() {
    let mut h = Harness::new("http-life").await;
    // The first upstream answers are a 429 with Retry-After and a 503: the shared
    // transport waits out the 429 and sends the create again; the create answered 503
    // is not resent (it may have been carried out): the attempt is recovered by its
    // marker once it can no longer land, and the next one succeeds.
    h.emulator.faults().inject(
        Fault::TooManyRequests {
            retry_after: Some(1),
        },
        1,
        None,
    );
    h.emulator.faults().inject(Fault::Status(503), 1, None);
    h.start();
    h.apply_example(json!({"rotation": {"overlap": "2s"}}))
        .await;
    let (reason, _) = provider_ready(&h, "True").await;
    assert_eq!(reason, "Configured");

    // Issue: the Secret holds the key the emulator created, named with the marker.
    let first = h.ready().await;
    let first_id = first.key_id.clone().unwrap();
    let first_value = h.secret_value().await.unwrap();
    let statuses: Vec<u16> = h
        .emulator
        .faults()
        .requests()
        .iter()
        .map(|r| r.status)
        .take(3)
        .collect();
    assert_eq!(statuses, vec![429, 503, 200], "retried through the faults");
    assert_eq!(first.revision, Some(1), "one issuance, not three");
    let upstream = h.emulator.key(&first_id).expect("the key exists upstream");
    assert_eq!(upstream.value, first_value);
    assert_eq!(upstream.user_id, h.service_account);
    assert!(
        upstream.name.starts_with("k8s agent kw:"),
        "{}",
        upstream.name
    );
    assert!(h.emulator.authenticates(&first_value));
    let expires = upstream.expires_at.expect("expires_at was sent");
    assert_eq!(
        first.expires_at.as_ref().unwrap().0,
        expires,
        "status shows the upstream expiry"
    );
    let asked = expires.duration_since(upstream.created).as_secs();
    assert!(
        (720 * 3600 - 5..=720 * 3600 + 5).contains(&asked),
        "720h asked, got {asked}s"
    );

    // Forced rotation: a new key in the Secret; the old one revoked after the overlap.
    h.rotate::<ServiceAccountKey>("prefect1-agent", "1").await;
    let second = h
        .status_where("revision 2", |s| {
            s.revision == Some(2) && s.attempt.is_none()
        })
        .await;
    let second_id = second.key_id.clone().unwrap();
    assert_ne!(second_id, first_id);
    let second_value = h.secret_value().await.unwrap();
    assert_eq!(h.emulator.key(&second_id).unwrap().value, second_value);
    eventually("the old key deleted upstream", WAIT, || async {
        (!h.emulator.authenticates(&first_value)).then_some(())
    })
    .await;
    assert!(h.emulator.authenticates(&second_value));
    h.status_where("retiring emptied", |s| s.retiring.is_empty())
        .await;

    // Delete: the key is revoked upstream, the Secret removed, the resource gone.
    h.keys()
        .delete("prefect1-agent", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the resource gone", WAIT, || async {
        h.keys()
            .get_opt("prefect1-agent")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        h.emulator.live_service_account_keys().is_empty(),
        "every key deleted upstream"
    );
    assert!(h.emulator.key(&second_id).unwrap().deleted.is_some());
    assert_eq!(h.secret_value().await, None);

    // Neither the admin credential nor a key value reached logs or events.
    let events = h.events().await;
    let logs = common::captured_logs();
    for secret in [&h.admin.key, &first_value, &second_value] {
        assert!(!events.contains(secret.as_str()), "a secret in an event");
        assert!(!logs.contains(secret.as_str()), "a secret in the logs");
    }
    h.kill().await;
}

#[tokio::test]
async fn a_key_deleted_out_of_band_is_found_by_inspection_and_replaced() {
    let mut h = Harness::new("http-inspect").await;
    h.start();
    h.apply_example(json!({"rotation": {"inspectInterval": "10s"}}))
        .await;
    let first = h.ready().await;
    let first_id = first.key_id.clone().unwrap();
    assert!(h.emulator.delete_out_of_band(&first_id));

    let replaced = h
        .status_where("a new key after inspection", |s| {
            s.key_id.as_deref().is_some_and(|id| id != first_id) && s.attempt.is_none()
        })
        .await;
    let value = h.secret_value().await.unwrap();
    assert!(
        h.emulator.authenticates(&value),
        "the Secret holds a working key"
    );
    assert_eq!(
        h.emulator
            .key(replaced.key_id.as_deref().unwrap())
            .unwrap()
            .value,
        value
    );
    // The old key's revocation met "API key not found": gone counts as revoked.
    h.status_where("nothing left retiring", |s| s.retiring.is_empty())
        .await;
    assert_eq!(h.emulator.live_service_account_keys().len(), 1);
    h.event("KeyInvalid").await;
    h.kill().await;
}

#[tokio::test]
async fn an_orphan_of_a_crash_after_the_upstream_call_is_found_by_list_and_revoked() {
    let mut h = Harness::new("http-orphan").await;
    *h.faults.point.lock().unwrap() = Some(CrashPoint::AfterUpstream);
    h.start();
    h.apply_example(json!({})).await;
    eventually("the crash", WAIT, || async {
        h.faults.crashed.load(Ordering::SeqCst).then_some(())
    })
    .await;
    h.kill().await;
    h.start();
    let status = h.ready().await;

    let value = h.secret_value().await.unwrap();
    let live = h.emulator.live_service_account_keys();
    assert_eq!(
        live.len(),
        1,
        "only the key in the Secret is live: {live:?}"
    );
    assert_eq!(live[0].id, status.key_id.unwrap());
    assert_eq!(live[0].value, value);
    let orphans: Vec<_> = h
        .emulator
        .keys()
        .into_iter()
        .filter(|k| k.deleted.is_some())
        .collect();
    assert!(!orphans.is_empty(), "the orphan existed and was deleted");
    assert!(orphans.iter().all(|k| k.name.starts_with("k8s agent kw:")));
    h.event("RevokedOrphan").await;
    h.kill().await;
}

#[tokio::test]
async fn template_and_jsonpath_mistakes_are_refused_before_anything_is_issued() {
    let mut h = Harness::new("http-refuse").await;
    h.start();
    let provider = h.doc("KeyProvider");
    let cases: [(&str, Value, &str); 4] = [
        (
            "an unknown variable",
            json!({"issue": {"graphql": {"variables": {"input": "{\"user_id\": \"{{ serviceAcount }}\"}"}}}}),
            "http.issue.graphql.variables.input: unknown variable {{ serviceAcount }}",
        ),
        (
            "an unclosed placeholder",
            json!({"revoke": {"url": "http://127.0.0.1:1/{{ keyId"}}),
            "http.revoke.url: `{{` without a closing `}}`",
        ),
        (
            "a credential the Secret does not have",
            json!({"issue": {"headers": {"Authorization": "Bearer {{ credentials.token }}"}}}),
            "http.issue.headers.Authorization: {{ credentials.token }} names data key token, which Secret prefect1-admin does not have",
        ),
        (
            "a JSONPath that does not parse",
            json!({"issue": {"response": {"value": "$.data.create_api_key.[key"}}}),
            "http.issue.response.value: ",
        ),
    ];
    h.apply(&h.doc("Secret")).await;
    let mut first = true;
    for (what, patch, expected) in cases {
        let mut p = provider.clone();
        merge(&mut p["spec"]["http"], patch);
        h.apply(&p).await;
        let (reason, message) =
            eventually(&format!("provider refused for {what}"), WAIT, || async {
                let (reason, message) = provider_ready(&h, "False").await;
                message.contains(expected).then_some((reason, message))
            })
            .await;
        assert_eq!(reason, "ProviderMisconfigured", "{what}");
        assert!(
            message.starts_with(&format!("KeyProvider {}/prefect1: ", h.ns.name)),
            "{message}"
        );
        if first {
            h.apply(&h.doc("ServiceAccountKey")).await;
            first = false;
        }
        h.status_where(&format!("key refused for {what}"), |s| {
            ready(&s.conditions).is_some_and(|c| {
                c.status == "False"
                    && c.reason == "ProviderMisconfigured"
                    && c.message.contains(expected)
            })
        })
        .await;
    }
    // A Secret template mistake on the key is refused too, once the provider is fixed.
    let mut key = h.doc("ServiceAccountKey");
    key["spec"]["secret"]["template"] =
        json!({"data": {"config.toml": "auth_token = \"{{ token }}\""}});
    h.apply(&key).await;
    h.apply(&provider).await;
    h.status_where("key refused for its Secret template", |s| {
        ready(&s.conditions).is_some_and(|c| {
            c.reason == "TemplateInvalid"
                && c.message
                    .contains("secret.template.data.config.toml: unknown variable {{ token }}")
        })
    })
    .await;
    assert_eq!(h.upstream_requests(), 0, "nothing reached the upstream");
    assert_eq!(h.secret_value().await, None);
    h.kill().await;
}

#[tokio::test]
async fn a_jsonpath_that_matches_nothing_is_a_clear_error_and_writes_no_secret() {
    let mut h = Harness::new("http-nomatch").await;
    h.start();
    h.apply(&h.doc("Secret")).await;
    let mut provider = h.doc("KeyProvider");
    // The seed's `token` field: parses, but the answer has `key`.
    provider["spec"]["http"]["issue"]["response"]["value"] =
        json!("$.data.create_api_key.id.token");
    h.apply(&provider).await;
    h.apply(&h.doc("ServiceAccountKey")).await;
    let status = h
        .status_where("the issue error", |s| {
            ready(&s.conditions)
                .is_some_and(|c| c.status == "False" && c.reason == "UnexpectedResponse")
        })
        .await;
    let message = &ready(&status.conditions).unwrap().message;
    assert!(
        message.contains("http.issue.response.value ($.data.create_api_key.id.token) matched nothing in the response"),
        "{message}"
    );
    assert_eq!(h.secret_value().await, None, "no Secret");
    assert!(status.key_id.is_none());
    // The key it did create (the id matched) was deleted at once.
    eventually("the unusable key deleted", WAIT, || async {
        let keys = h.emulator.keys();
        (keys.len() > 1 && h.emulator.live_service_account_keys().is_empty()).then_some(())
    })
    .await;
    h.kill().await;
}
