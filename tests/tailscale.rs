//! The Tailscale provider end to end: the real control plane, the controller running
//! in-process with the operator's own `DefaultFactory`, and the Tailscale API emulator
//! (`emulators/src/tailscale.rs`) as the upstream, over HTTP.
//!
//! Timing: keyward asks Tailscale for 1–90 days, the documented range. Scheduled
//! rotation is observed on keys of a day (or a little more) issued by an emulator
//! whose clock runs that long minus two minutes behind: their `created` and `expires`
//! put the expiry two minutes from now, and they are renewed 105 s before it — the
//! controller plans from the times the upstream returned, as it does in production.
//! The examples' long overlaps are shortened to seconds so revocation after the
//! overlap is observed.

mod common;

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, Secret, ServiceAccount},
};
use keyward::{
    providers::{self, DefaultFactory},
    reconciler::CrashPoint,
    resources::{AuthKey, ClusterKeyProvider, KeyProvider, KeyStatus},
};
use keyward_emulators::{
    Fault,
    tailscale::{EmulatedKey, FederatedIdentity, Tailscale},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use common::{Cluster, WAIT, apply, condition, eventually};

/// The tags the emulated OAuth client may put on keys (those of the examples).
const CLIENT_TAGS: &[&str] = &["tag:edge", "tag:ci", "tag:jobs"];

enum Auth {
    /// An API access token (HTTP Basic).
    Token,
    /// An OAuth client (client credentials, Bearer access tokens).
    OAuth,
}

struct Harness {
    cluster: Cluster,
    ts: Tailscale,
    factory: Arc<DefaultFactory>,
    /// A ClusterKeyProvider of this test, deleted when the test ends.
    _cluster_provider: Option<ClusterProvider>,
}

common::cluster_harness!(Harness);

impl Harness {
    /// A namespace with a `KeyProvider` named `tailscale` pointing at a fresh emulator,
    /// and a controller watching the namespace.
    async fn new(prefix: &str, auth: Auth) -> Self {
        let cluster = Cluster::new(prefix).await;
        let (client, ns) = (&cluster.client, &cluster.ns);
        let ts = Tailscale::start().await;
        let spec = match auth {
            Auth::Token => {
                let token = ts.add_api_token("ops@example.com");
                secret(client, &ns.name, "tailscale-credentials", "api-key", &token).await;
                json!({"apiURL": ts.base_url(), "tailnet": "-",
                       "apiKeySecretRef": {"name": "tailscale-credentials", "key": "api-key"}})
            }
            Auth::OAuth => {
                let oauth = ts.add_oauth_client(CLIENT_TAGS, &["auth_keys"]);
                secret(
                    client,
                    &ns.name,
                    "tailscale-credentials",
                    "client-secret",
                    &oauth.secret,
                )
                .await;
                json!({"apiURL": ts.base_url(), "tailnet": ts.tailnet(),
                       "oauth": {"clientId": oauth.id,
                                 "clientSecretRef": {"name": "tailscale-credentials", "key": "client-secret"}}})
            }
        };
        cluster
            .create::<KeyProvider>("tailscale", json!({"tailscale": spec}))
            .await;
        let mut h = Self {
            cluster,
            ts,
            factory: Arc::new(DefaultFactory::default()),
            _cluster_provider: None,
        };
        h.start();
        h
    }

    /// Workload identity federation, with nothing stored: a namespace without any
    /// Secret; keyward's ServiceAccount `keyward` in it, allowed (as the chart allows
    /// it) to request tokens for itself and nothing else; the API server's discovery
    /// documents readable without credentials, as Tailscale must read them; the
    /// emulator trusting the local CA and holding a federated identity for that
    /// ServiceAccount; a ClusterKeyProvider `tailscale-<namespace>` using it; and a
    /// controller whose factory authenticates as the ServiceAccount.
    async fn federated(prefix: &str) -> (Self, Federation) {
        let cluster = Cluster::new(prefix).await;
        let ts = Tailscale::start().await;
        let (client, ns) = (cluster.client.clone(), cluster.ns.name.clone());
        let identity = service_account_client(&client, &ns, "keyward").await;
        let issuer = issuer_with_public_discovery(&client).await;
        let ca = std::fs::read_to_string(common::plane().dir().join("ca.crt")).unwrap();
        ts.trust_ca(&ca);
        let subject = format!("system:serviceaccount:{ns}:keyward");
        let audience = format!("api.tailscale.com/{ns}");
        let client_id = ts.add_federated_identity(FederatedIdentity {
            issuer: issuer.clone(),
            subject: subject.clone(),
            audience: audience.clone(),
            tags: CLIENT_TAGS.iter().map(|t| (*t).to_owned()).collect(),
            scopes: vec!["auth_keys".into()],
        });
        let federation = Federation {
            provider: format!("tailscale-{ns}"),
            issuer,
            subject,
            audience,
            client_id,
        };
        let mut h = Self {
            cluster,
            ts,
            factory: Arc::new(DefaultFactory::with_identity(
                providers::ServiceAccount::new(identity, ns.clone(), "keyward".into()),
            )),
            _cluster_provider: Some(ClusterProvider(federation.provider.clone())),
        };
        h.apply_federated_provider(
            &federation.provider,
            &federation.client_id,
            &federation.audience,
        )
        .await;
        h.start();
        (h, federation)
    }

    /// Applies a ClusterKeyProvider `name` with `workloadIdentity` (and no Secret),
    /// serving this test's namespace only.
    async fn apply_federated_provider(&mut self, name: &str, client_id: &str, audience: &str) {
        apply(
            &self.client,
            &self.ns.name,
            &json!({"apiVersion": "keyward.dev/v1alpha1", "kind": "ClusterKeyProvider",
                   "metadata": {"name": name},
                   "spec": {"tailscale": {"apiURL": self.ts.base_url(), "tailnet": "-",
                                          "workloadIdentity": {"clientId": client_id, "audience": audience}},
                            "policy": {"namespaceSelector": {"matchLabels": {
                                "kubernetes.io/metadata.name": self.ns.name}}}}}),
        )
        .await;
    }

    /// Starts a controller. The provider state (request budget, token cache) lives in
    /// the factory, which a restart keeps.
    fn start(&mut self) {
        self.cluster.start(self.factory.clone());
    }

    fn keys(&self) -> Api<AuthKey> {
        self.api()
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }

    async fn create(&self, name: &str, spec: Value) {
        self.cluster.create::<AuthKey>(name, spec).await;
    }

    async fn status_where(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&KeyStatus) -> bool,
    ) -> KeyStatus {
        common::status_where(&self.keys(), name, what, check).await
    }

    async fn ready(&self, name: &str) -> KeyStatus {
        common::ready(&self.keys(), name).await
    }

    async fn revision(&self, name: &str, revision: i64) -> KeyStatus {
        self.status_where(name, &format!("revision {revision}"), |s| {
            s.revision == Some(revision) && s.attempt.is_none() && s.key_id.is_some()
        })
        .await
    }

    /// Waits until the key is not Ready for a reason other than its first key being
    /// on its way (`Initial`, while the first issuance is in flight).
    async fn not_ready(&self, name: &str) -> (String, String) {
        let status = self
            .status_where(name, "Ready=False", |s| {
                condition(s, "Ready").is_some_and(|c| c.0 == "False" && c.1 != "Initial")
            })
            .await;
        let (_, reason, message) = condition(&status, "Ready").unwrap();
        (reason, message)
    }

    async fn rotate(&self, name: &str, value: &str) {
        self.cluster.rotate::<AuthKey>(name, value).await;
    }

    async fn delete(&self, name: &str) {
        self.delete_and_wait::<AuthKey>(name, &format!("{name} to be deleted"))
            .await;
    }

    /// Crashes the controller right after Tailscale created key `k`, restarts it, and
    /// waits until `k` is Ready; the key in status must then be the only live one.
    async fn recover_from_a_crash_after_create(&mut self, ids_only: bool) -> Vec<EmulatedKey> {
        self.kill().await;
        *self.faults.point.lock().unwrap() = Some(CrashPoint::AfterUpstream);
        self.start();
        self.create(
            "k",
            json!({"providerRef": {"name": "tailscale"}, "tags": ["tag:edge"], "expiry": "24h",
                   "secret": {"key": "TS_AUTHKEY"}}),
        )
        .await;
        eventually("the crash", WAIT, || async {
            self.faults.crashed.load(Ordering::SeqCst).then_some(())
        })
        .await;
        // The crashed controller may recover before it is stopped, as a restarted one
        // would: either way the outcome is the same.
        self.kill().await;
        self.start();
        let status = self.ready("k").await;
        let live = self.ts.live_keys();
        assert_eq!(
            live.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(),
            vec![status.key_id.as_deref().unwrap()],
            "ids_only={ids_only}: only the key in the Secret is live"
        );
        live
    }

    /// Requests that reached the emulator's key endpoints with `method`.
    fn key_requests(&self, method: &str) -> usize {
        self.ts.faults().count(method, "/keys")
    }
}

/// What a test needs to know about the federated identity [`Harness::federated`] set up.
struct Federation {
    /// The ClusterKeyProvider using it.
    provider: String,
    issuer: String,
    subject: String,
    audience: String,
    client_id: String,
}

/// A client authenticating as ServiceAccount `ns/name`, which may create tokens for
/// itself and nothing more — the chart's rule (`charts/keyward/templates/rbac.yaml`).
async fn service_account_client(admin: &Client, ns: &str, name: &str) -> Client {
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns);
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
        )
        .await
        .unwrap();
    for object in [
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": format!("{name}-token"), "namespace": ns},
               "rules": [{"apiGroups": [""], "resources": ["serviceaccounts/token"],
                          "verbs": ["create"], "resourceNames": [name]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": format!("{name}-token"), "namespace": ns},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": format!("{name}-token")},
               "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]}),
    ] {
        apply_dynamic(admin, object).await;
    }
    // The token the pod's projected volume would hold.
    let token = accounts
        .create_token_request(
            name,
            &PostParams::default(),
            &TokenRequest {
                spec: Some(TokenRequestSpec {
                    expiration_seconds: Some(3600),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .status
        .and_then(|s| s.token)
        .unwrap();
    let plane = common::plane();
    let ca = std::fs::read_to_string(plane.dir().join("ca.crt")).unwrap();
    use base64::Engine;
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: sa\n  user:\n    token: {token}\ncontexts:\n- name: sa\n  context: {{cluster: local, user: sa}}\ncurrent-context: sa\n",
        plane.server(),
        base64::engine::general_purpose::STANDARD.encode(ca),
    );
    keyward::control_plane::client_from(&kubeconfig)
        .await
        .unwrap()
}

/// The API server's service-account issuer, after letting anyone read its discovery
/// documents: Tailscale fetches them without credentials, and a self-hosted cluster
/// grants that by binding `system:service-account-issuer-discovery` (a role every API
/// server ships) to `system:unauthenticated`.
async fn issuer_with_public_discovery(admin: &Client) -> String {
    apply_dynamic(
        admin,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "keyward-test-public-oidc-discovery"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                           "name": "system:service-account-issuer-discovery"},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group",
                             "name": "system:unauthenticated"}]}),
    )
    .await;
    let request = http::Request::get("/.well-known/openid-configuration")
        .body(Vec::new())
        .unwrap();
    let discovery: Value = admin.request(request).await.unwrap();
    discovery["issuer"].as_str().unwrap().to_owned()
}

/// Server-side applies any object (RBAC here) as field manager `test`.
async fn apply_dynamic(client: &Client, object: Value) {
    let object: kube::api::DynamicObject = serde_json::from_value(object).unwrap();
    let types = object.types.clone().unwrap();
    let gvk = kube::api::GroupVersionKind::try_from(&types).unwrap();
    let resource = kube::api::ApiResource::from_gvk(&gvk);
    let name = object.metadata.name.clone().unwrap();
    let api: Api<kube::api::DynamicObject> = match &object.metadata.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    api.patch(
        &name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(&object),
    )
    .await
    .unwrap_or_else(|e| panic!("applying {name}: {e}"));
}

async fn secret(client: &Client, ns: &str, name: &str, key: &str, value: &str) {
    apply(
        client,
        ns,
        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
               "stringData": {key: value}}),
    )
    .await;
}

fn example(file: &str) -> Vec<Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/tailscale")
        .join(file);
    common::yaml_documents(&std::fs::read_to_string(path).unwrap())
}

/// Every example key: issued through the example ClusterKeyProvider (OAuth), each with
/// the value the emulator issued in its Secret and exactly the capabilities it asks
/// for; a forced rotation and a scheduled renewal each keep the old key valid for the
/// overlap, then revoke it; deleting the resources revokes every key. One OAuth access
/// token serves it all.
#[tokio::test]
async fn every_example_key_is_issued_rotated_and_revoked() {
    let mut h = Harness::new("ts-examples", Auth::OAuth).await;
    let started = Instant::now();
    // The examples' ClusterKeyProvider, pointed at the emulator, under a name of this
    // test's own (cluster-scoped names are shared by every test).
    let oauth = h.ts.add_oauth_client(CLIENT_TAGS, &["auth_keys"]);
    let ckp_name = format!("tailscale-{}", h.ns.name);
    for mut doc in example("cluster-key-provider.yaml") {
        match doc["kind"].as_str().unwrap() {
            "Secret" => {
                doc["metadata"]["namespace"] = json!(h.ns.name);
                doc["stringData"]["client-secret"] = json!(oauth.secret);
            }
            "ClusterKeyProvider" => {
                doc["metadata"]["name"] = json!(ckp_name);
                doc["spec"]["tailscale"]["apiURL"] = json!(h.ts.base_url());
                doc["spec"]["tailscale"]["oauth"]["clientId"] = json!(oauth.id);
            }
            other => panic!("unexpected {other}"),
        }
        apply(&h.client, &h.ns.name, &doc).await;
    }
    let _cleanup = ClusterProvider(ckp_name.clone());
    // The policy admits namespaces labelled for it.
    Api::<Namespace>::all(h.client.clone())
        .patch(
            &h.ns.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"keyward.dev/tailscale": "allowed"}}})),
        )
        .await
        .unwrap();

    let mut names = Vec::new();
    for file in [
        "reusable-key.yaml",
        "one-off-key.yaml",
        "ephemeral-key.yaml",
    ] {
        let mut doc = example(file).remove(0);
        doc["spec"]["providerRef"]["name"] = json!(ckp_name);
        doc["spec"]["rotation"]["overlap"] = json!("3s");
        let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
        h.create(&name, doc["spec"].clone()).await;
        names.push((name, doc["spec"].clone()));
    }

    let mut first = Vec::new();
    for (name, spec) in &names {
        let status = h.ready(name).await;
        let id = status.key_id.clone().unwrap();
        let upstream = h.ts.key(&id).unwrap();
        let secret_name = spec["secret"]["name"].as_str().unwrap();
        assert_eq!(
            h.secret_value(secret_name, "TS_AUTHKEY").await,
            upstream.value,
            "{name}: the Secret holds the key Tailscale issued"
        );
        assert_eq!(
            upstream.reusable,
            spec["reusable"].as_bool().unwrap_or(false),
            "{name}"
        );
        assert_eq!(
            upstream.ephemeral,
            spec["ephemeral"].as_bool().unwrap_or(false),
            "{name}"
        );
        assert_eq!(
            upstream.preauthorized,
            spec["preauthorized"].as_bool().unwrap_or(false),
            "{name}"
        );
        assert_eq!(
            upstream.tags,
            vec![spec["tags"][0].as_str().unwrap().to_owned()],
            "{name}"
        );
        let marker = status_marker(&h, name).await;
        assert_eq!(
            upstream.description,
            format!("{} {marker}", spec["description"].as_str().unwrap()),
            "{name}: the description carries keyward's marker"
        );
        let expiry = keyward::resources::KeyDuration(spec["expiry"].as_str().unwrap().into());
        assert_eq!(
            upstream.expires.duration_since(upstream.created).as_secs(),
            expiry.to_std().unwrap().as_secs() as i64,
            "{name}: the lifetime asked for"
        );
        assert_eq!(
            status.expires_at.as_ref().unwrap().0.as_second(),
            upstream.expires.as_second(),
            "{name}: status shows Tailscale's expiry"
        );
        first.push(id);
    }

    // Forced rotation: a new key, the old one valid through the overlap, then revoked.
    for (name, _) in &names {
        h.rotate(name, "2026-11-24").await;
    }
    for ((name, spec), old) in names.iter().zip(&first) {
        let second = h.revision(name, 2).await;
        let new = second.key_id.clone().unwrap();
        assert_ne!(&new, old);
        let secret_name = spec["secret"]["name"].as_str().unwrap();
        assert_eq!(
            h.secret_value(secret_name, "TS_AUTHKEY").await,
            h.ts.key(&new).unwrap().value
        );
        assert_eq!(second.retiring.len(), 1, "{name}: the old key retires");
        assert!(
            h.ts.key(old).unwrap().revoked.is_none(),
            "{name}: the old key still works during the overlap"
        );
    }
    for old in &first {
        eventually(
            "the old keys to be revoked after the overlap",
            WAIT,
            || async { h.ts.key(old).unwrap().revoked.map(|_| ()) },
        )
        .await;
    }

    // Scheduled renewal of each example, two minutes before expiry, renewed 105s before
    // it (the lifetime change itself rotates first: revision 3).
    // Keys of 25 hours (about the shortest Tailscale documents, and different from
    // every example's, so the change rotates), created by an emulator whose clock runs
    // 25 hours minus two minutes behind: they expire two minutes from now.
    h.ts.rewind(Duration::from_secs(25 * 3600 - 120));
    for (name, spec) in &names {
        let mut short = spec.clone();
        short["expiry"] = json!("25h");
        short["rotation"] = json!({"renewBefore": "105s", "overlap": "3s"});
        h.create(name, short).await;
    }
    let mut thirds = Vec::new();
    for (name, _) in &names {
        thirds.push(h.revision(name, 3).await);
    }
    // Watched together: each renewal's old key retires for only the 3s overlap.
    let renewals = names.iter().zip(&thirds).map(|((name, _), third)| {
        let old = third.key_id.clone().unwrap();
        let h = &h;
        async move {
            h.status_where(name, "a renewal retiring the revision-3 key", |s| {
                s.revision == Some(4)
                    && s.retiring
                        .iter()
                        .any(|r| r.reason == "Renewing" && r.key_id == old)
            })
            .await;
            assert!(
                h.ts.key(&old).unwrap().revoked.is_none(),
                "{name}: valid during the overlap"
            );
            eventually(
                "the renewed key to be revoked after the overlap",
                WAIT,
                || async { h.ts.key(&old).unwrap().revoked.map(|_| ()) },
            )
            .await;
            let old = h.ts.key(&old).unwrap();
            assert!(
                old.revoked.unwrap() < old.expires,
                "{name}: renewed before expiry"
            );
        }
    });
    futures::future::join_all(renewals).await;

    // One access token for every create, get, list and delete so far.
    assert_eq!(h.ts.tokens_issued(), 1, "one OAuth token for all of it");
    assert!(h.key_requests("") >= 21);

    // A restarted controller with the same factory keeps using the cached token; a
    // token the upstream no longer accepts (expired early) is replaced once.
    h.kill().await;
    h.start();
    h.ts.expire_access_tokens();
    h.rotate(&names[0].0, "again").await;
    let before = h
        .keys()
        .get(&names[0].0)
        .await
        .unwrap()
        .status
        .unwrap()
        .revision
        .unwrap();
    h.status_where(&names[0].0, "a forced rotation", |s| {
        s.revision > Some(before) && s.attempt.is_none()
    })
    .await;
    assert_eq!(h.ts.tokens_issued(), 2, "a fresh token after the 401");

    for (name, _) in &names {
        h.delete(name).await;
    }
    assert!(
        h.ts.live_keys().is_empty(),
        "deleting the resources revoked every key: {:?}",
        h.ts.live_keys().iter().map(|k| &k.id).collect::<Vec<_>>()
    );
    for (_, spec) in &names {
        let secret_name = spec["secret"]["name"].as_str().unwrap();
        assert!(h.secrets().get_opt(secret_name).await.unwrap().is_none());
    }
    // No key value, access token or client secret anywhere but the Secrets.
    let events = events_text(&h).await;
    assert!(
        events.contains("Revoked") && !events.contains("tskey-"),
        "events hold no secret"
    );
    assert!(
        !common::captured_logs().contains("tskey-"),
        "logs hold no secret"
    );
    println!(
        "examples lifecycle: {:?}, {} key requests, {} token requests",
        started.elapsed(),
        h.key_requests(""),
        h.ts.tokens_issued()
    );
}

async fn events_text(h: &Harness) -> String {
    let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(h.client.clone(), &h.ns.name)
        .list(&Default::default())
        .await
        .unwrap();
    serde_json::to_string(&events.items).unwrap()
}

/// The upstream marker of the key's current attempt, from the description the emulator
/// holds for the key in status (the marker is keyward's `kw:<uid8>.<attempt>` with `:`
/// and `.` as `-`).
async fn status_marker(h: &Harness, name: &str) -> String {
    let key = h.keys().get(name).await.unwrap();
    let secret_name = key
        .spec
        .secret
        .name
        .clone()
        .unwrap_or_else(|| name.to_owned());
    let secret = h.secrets().get(&secret_name).await.unwrap();
    let attempt = secret.annotations()["keyward.dev/attempt"].clone();
    let uid: String = key
        .uid()
        .unwrap()
        .chars()
        .filter(|c| *c != '-')
        .take(8)
        .collect();
    format!("kw-{uid}-{attempt}")
}

/// Deletes a cluster-scoped provider when the test ends.
struct ClusterProvider(String);

impl Drop for ClusterProvider {
    fn drop(&mut self) {
        let name = self.0.clone();
        let _ = std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                let text = std::fs::read_to_string(common::plane().kubeconfig()).ok()?;
                let client = keyward::control_plane::client_from(&text).await.ok()?;
                Api::<ClusterKeyProvider>::all(client)
                    .delete(&name, &DeleteParams::default())
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// Scheduled rotation with an API access token (HTTP Basic): a one-day key two minutes
/// from its expiry is renewed before it expires, the old key stays valid for the overlap and is revoked
/// after it. The create body is exactly the documented shape.
#[tokio::test]
async fn a_key_is_renewed_before_expiry_and_the_old_one_outlives_the_overlap() {
    let h = Harness::new("ts-renew", Auth::Token).await;
    // A one-day key (the shortest Tailscale documents) from an emulator whose clock
    // runs a day minus two minutes behind: it expires two minutes from now.
    h.ts.rewind(Duration::from_secs(24 * 3600 - 120));
    h.create(
        "short",
        json!({"providerRef": {"name": "tailscale"}, "reusable": true, "tags": ["tag:edge"],
               "description": "short lived", "expiry": "24h",
               "rotation": {"renewBefore": "105s", "overlap": "5s"},
               "secret": {"key": "TS_AUTHKEY"}}),
    )
    .await;
    let first = h.ready("short").await;
    let old = first.key_id.clone().unwrap();
    // The provider says it is usable, without calling the upstream to say so.
    let providers: Api<KeyProvider> = Api::namespaced(h.client.clone(), &h.ns.name);
    let ready = eventually("the provider's status", WAIT, || async {
        let status = providers.get("tailscale").await.ok()?.status?;
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")?
            .clone();
        (status.provider_type.as_deref() == Some("tailscale")).then_some(ready)
    })
    .await;
    assert_eq!(ready.status, "True", "{}", ready.message);
    assert_eq!(
        h.ts.create_bodies()[0],
        json!({
            "capabilities": {"devices": {"create": {
                "reusable": true, "ephemeral": false, "preauthorized": false, "tags": ["tag:edge"]
            }}},
            "expirySeconds": 86400,
            "description": format!("short lived {}", status_marker(&h, "short").await),
        }),
        "exactly the documented body"
    );

    let second = h.revision("short", 2).await;
    let rotated_at = jiff::Timestamp::now();
    assert!(
        rotated_at < first.expires_at.clone().unwrap().0,
        "renewed before expiry"
    );
    assert_eq!(second.retiring[0].key_id, old);
    assert!(
        h.ts.key(&old).unwrap().revoked.is_none(),
        "valid during the overlap"
    );
    assert_eq!(
        h.secret_value("short", "TS_AUTHKEY").await,
        h.ts.key(second.key_id.as_deref().unwrap()).unwrap().value
    );
    eventually("the old key to be revoked", WAIT, || async {
        h.ts.key(&old).unwrap().revoked.map(|_| ())
    })
    .await;
    let waited = jiff::Timestamp::now().duration_since(rotated_at);
    assert!(
        waited.as_secs_f64() >= 4.0,
        "revoked only after the overlap ({waited:?})"
    );
}

/// Tags the OAuth client may not use are refused by Tailscale; keyward says so in the
/// condition. A key without tags through OAuth is refused before anything is sent.
#[tokio::test]
async fn a_tag_the_oauth_client_may_not_use_is_a_clear_condition() {
    let h = Harness::new("ts-tags", Auth::OAuth).await;
    h.create(
        "prod",
        json!({"providerRef": {"name": "tailscale"}, "tags": ["tag:prod"], "expiry": "24h"}),
    )
    .await;
    let (reason, message) = h.not_ready("prod").await;
    assert_eq!(reason, "TagNotPermitted", "{message}");
    assert!(
        message.contains("tag:prod")
            && message.contains("OAuth client")
            && message.contains("spec.tags"),
        "{message}"
    );
    assert!(h.ts.keys().is_empty());

    h.create(
        "untagged",
        json!({"providerRef": {"name": "tailscale"}, "expiry": "24h"}),
    )
    .await;
    let (reason, message) = h.not_ready("untagged").await;
    assert_eq!(reason, "TagsRequired", "{message}");
    assert!(message.contains("spec.tags"), "{message}");
    assert!(
        !common::captured_logs().contains("tskey-client-"),
        "no client secret in the logs"
    );
}

/// A one-off key a device used, and a reusable key revoked in the admin console, are
/// replaced at the next inspection; with `reissueWhenInvalid: false` the condition says
/// why nothing happens.
#[tokio::test]
async fn used_or_revoked_keys_are_replaced_within_the_inspect_interval() {
    let h = Harness::new("ts-inspect", Auth::Token).await;
    let spec = |reusable: bool, reissue: bool| {
        json!({"providerRef": {"name": "tailscale"}, "reusable": reusable, "expiry": "24h",
               "rotation": {"inspectInterval": "10s", "reissueWhenInvalid": reissue},
               "secret": {"key": "TS_AUTHKEY"}})
    };
    h.create("one-off", spec(false, true)).await;
    h.create("console", spec(true, true)).await;
    h.create("keep", spec(false, false)).await;
    let one_off = h.ready("one-off").await.key_id.unwrap();
    let console = h.ready("console").await.key_id.unwrap();
    let keep = h.ready("keep").await.key_id.unwrap();

    let acted = Instant::now();
    h.ts.use_key(&one_off).unwrap();
    h.ts.use_key(&keep).unwrap();
    assert!(h.ts.revoke_in_console(&console));

    let replaced = h.revision("one-off", 2).await;
    assert_ne!(replaced.key_id.as_deref(), Some(one_off.as_str()));
    assert_eq!(
        h.secret_value("one-off", "TS_AUTHKEY").await,
        h.ts.key(replaced.key_id.as_deref().unwrap()).unwrap().value,
        "a fresh one-off key for the next device"
    );
    h.revision("console", 2).await;
    let within = acted.elapsed();
    assert!(
        within < Duration::from_secs(25),
        "replaced within the interval: {within:?}"
    );

    let (reason, message) = h.not_ready("keep").await;
    assert_eq!(reason, "KeyInvalid", "{message}");
    assert!(message.contains("reissueWhenInvalid"), "{message}");
    let kept = h.keys().get("keep").await.unwrap().status.unwrap();
    assert_eq!(kept.key_id.as_deref(), Some(keep.as_str()));
    assert_eq!(kept.revision, Some(1));
}

/// A burst of 429s with Retry-After is waited out together: every key is issued, and
/// the emulator saw each create once plus one request per 429 served — no storm.
#[tokio::test]
async fn a_burst_of_429s_is_waited_out_without_a_retry_storm() {
    let h = Harness::new("ts-429", Auth::Token).await;
    const KEYS: usize = 10;
    const LIMITED: usize = 3;
    h.ts.faults().inject(
        Fault::TooManyRequests {
            retry_after: Some(1),
        },
        LIMITED,
        Some("/keys"),
    );
    let started = Instant::now();
    for i in 0..KEYS {
        h.create(
            &format!("k{i}"),
            json!({"providerRef": {"name": "tailscale"}, "expiry": "24h"}),
        )
        .await;
    }
    for i in 0..KEYS {
        h.ready(&format!("k{i}")).await;
    }
    let took = started.elapsed();
    let creates = h.key_requests("POST");
    let limited =
        h.ts.faults()
            .requests()
            .iter()
            .filter(|r| r.status == 429)
            .count();
    println!(
        "429 burst: {KEYS} keys, {creates} create requests ({limited} answered 429) in {took:?}"
    );
    assert_eq!(limited, LIMITED);
    assert_eq!(
        creates,
        KEYS + LIMITED,
        "each 429 cost exactly one request: the provider waited instead of retrying"
    );
    assert!(
        took >= Duration::from_secs(1),
        "Retry-After was honoured ({took:?})"
    );
    assert_eq!(h.ts.live_keys().len(), KEYS);
}

/// A run of 500s answering the create is retried until the key is issued — never by
/// resending a create that may have been carried out: each 500 ends the attempt's
/// request, and the next attempt comes once the first can no longer land (the landing
/// window) and its marker found nothing, with the backoff growing underneath.
#[tokio::test]
async fn a_run_of_500s_is_retried_with_backoff() {
    let h = Harness::new("ts-500", Auth::Token).await;
    h.ts.faults()
        .inject_for(Fault::Status(500), 3, Some("POST"), Some("/keys"));
    h.create(
        "k",
        json!({"providerRef": {"name": "tailscale"}, "expiry": "24h"}),
    )
    .await;
    h.ready("k").await;
    let posts: Vec<_> =
        h.ts.faults()
            .requests()
            .into_iter()
            .filter(|r| r.method == "POST")
            .collect();
    assert_eq!(posts.len(), 4, "three 500s, then success");
    let gaps: Vec<Duration> = posts.windows(2).map(|w| w[1].at - w[0].at).collect();
    println!("500 run: gaps between attempts {gaps:?}");
    let window = common::TEST_TIMING.landing_window;
    assert!(
        gaps.iter().all(|g| *g >= window),
        "no create resent before the previous one could no longer land: {gaps:?}"
    );
    let status = h.ready("k").await;
    assert_eq!(
        status.revision,
        Some(1),
        "one key for three failed attempts"
    );
    assert_eq!(h.ts.live_keys().len(), 1);
}

/// Finding 3 of the lifecycle-correctness work: a create the upstream carried out but
/// answered with a 502 (a gateway in front of the API) was sent again by the
/// transport, and the first key, carrying the same marker, was never revoked.
#[tokio::test]
async fn a_create_answered_with_a_5xx_after_it_was_carried_out_leaves_one_key() {
    let h = Harness::new("ts-502-after", Auth::Token).await;
    h.ts.faults()
        .inject_for(Fault::StatusAfter(502), 1, Some("POST"), Some("/keys"));
    h.create(
        "k",
        json!({"providerRef": {"name": "tailscale"}, "expiry": "24h"}),
    )
    .await;
    let status = h.ready("k").await;
    eventually("the key the 502 hid to be revoked", WAIT, || async {
        (h.ts.live_keys().len() == 1).then_some(())
    })
    .await;
    assert_eq!(h.ts.keys().len(), 2, "the hidden key and its replacement");
    assert_eq!(h.ts.live_keys()[0].id, status.key_id.unwrap());
}

/// A malformed answer to a create is a clear error, names no value, and leaves the
/// Secret and the current key alone.
#[tokio::test]
async fn a_malformed_answer_is_a_clear_error_and_the_secret_keeps_its_key() {
    let h = Harness::new("ts-malformed", Auth::Token).await;
    h.create(
        "k",
        json!({"providerRef": {"name": "tailscale"}, "expiry": "24h", "secret": {"key": "TS_AUTHKEY"}}),
    )
    .await;
    let first = h.ready("k").await;
    let value = h.secret_value("k", "TS_AUTHKEY").await;
    h.ts.faults()
        .inject(Fault::MalformedBody, 1000, Some("/keys"));
    h.rotate("k", "malformed").await;
    let status = h
        .status_where("k", "Degraded=True", |s| {
            condition(s, "Degraded").is_some_and(|c| c.0 == "True")
        })
        .await;
    let (_, _, message) = condition(&status, "Degraded").unwrap();
    assert!(
        message.contains("malformed response to create key"),
        "{message}"
    );
    assert!(!message.contains("tskey"), "{message}");
    assert_eq!(
        condition(&status, "Ready").unwrap().0,
        "True",
        "the old key still serves"
    );
    assert_eq!(status.key_id, first.key_id);
    assert_eq!(
        h.secret_value("k", "TS_AUTHKEY").await,
        value,
        "Secret unchanged"
    );

    h.ts.faults().clear();
    h.revision("k", 2).await;
}

/// A crash after Tailscale created a key but before the Secret was written: the
/// restarted controller lists keys, finds the marker and revokes the orphan; afterwards
/// the only live key is the one in the Secret. Run with both list shapes.
#[tokio::test]
async fn a_crash_between_create_and_secret_write_leaves_no_live_key_unaccounted_for() {
    for ids_only in [false, true] {
        let mut h = Harness::new("ts-crash", Auth::OAuth).await;
        h.ts.set_list_ids_only(ids_only);
        let live = h.recover_from_a_crash_after_create(ids_only).await;
        assert_eq!(h.secret_value("k", "TS_AUTHKEY").await, live[0].value);
        assert!(h.ts.keys().len() >= 2, "the orphan existed and was revoked");
        assert!(h.key_requests("GET") >= 1, "recovery listed the keys");
    }
}

/// Limits Tailscale would refuse are refused by keyward first, with a condition, and
/// nothing reaches the API.
#[tokio::test]
async fn expiry_and_description_limits_are_refused_before_anything_is_sent() {
    let h = Harness::new("ts-limits", Auth::Token).await;
    let spec = |extra: Value| {
        let mut spec = json!({"providerRef": {"name": "tailscale"}, "expiry": "24h"});
        spec.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        spec
    };
    h.create("long-expiry", spec(json!({"expiry": "2161h"})))
        .await;
    h.create("short-expiry", spec(json!({"expiry": "23h59m"})))
        .await;
    h.create(
        "long-description",
        spec(json!({"description": "a description of 30 characters"})),
    )
    .await;
    h.create(
        "odd-description",
        spec(json!({"description": "edge_nodes"})),
    )
    .await;
    for (name, reason, hint) in [
        ("long-expiry", "ExpiryOutOfRange", "spec.expiry"),
        ("short-expiry", "ExpiryOutOfRange", "at least 86400s"),
        ("long-description", "DescriptionTooLong", "at most 29"),
        ("odd-description", "DescriptionInvalid", "spec.description"),
    ] {
        let (got, message) = h.not_ready(name).await;
        assert_eq!(got, reason, "{name}: {message}");
        assert!(message.contains(hint), "{name}: {message}");
    }
    // The longest description that fits is accepted.
    h.create(
        "fits",
        spec(json!({"description": "a description of 29 character"})),
    )
    .await;
    let status = h.ready("fits").await;
    assert_eq!(
        h.ts.key(status.key_id.as_deref().unwrap())
            .unwrap()
            .description
            .len(),
        50
    );
    assert_eq!(h.key_requests("POST"), 1, "only the key that fits was sent");
}

/// Workload identity federation end to end, with no credential stored anywhere: the
/// ClusterKeyProvider names a federated identity and an audience; keyward requests a
/// token for its own ServiceAccount (TokenRequest, with the chart's RBAC only),
/// exchanges it, and issues, rotates and revokes keys with the access token — one
/// exchange for all of it, a new one when Tailscale no longer accepts the token.
#[tokio::test]
async fn workload_identity_issues_rotates_and_revokes_with_no_secret_stored() {
    let (mut h, federation) = Harness::federated("ts-wif").await;
    let api = h.secrets();
    let secrets = || async {
        api.list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|s| s.name_any())
            .collect::<Vec<_>>()
    };
    assert!(secrets().await.is_empty(), "no credential Secret");
    // What the provider's status reports is the factory's verdict (the status of a
    // ClusterKeyProvider is also written by the other tests' controllers, whose
    // factories know no ServiceAccount, so it is asserted here, not there).
    let spec = Api::<ClusterKeyProvider>::all(h.client.clone())
        .get(&federation.provider)
        .await
        .unwrap()
        .spec;
    let resolved = providers::ResolvedProvider {
        id: federation.provider.clone(),
        display: format!("ClusterKeyProvider {}", federation.provider),
        spec: providers::cluster_spec(&spec),
        credentials: Default::default(),
    };
    use keyward::providers::ProviderFactory;
    assert!(
        providers::credential_secret(&resolved.spec).is_none(),
        "no Secret to read"
    );
    assert!(h.factory.build(&resolved).await.is_ok(), "Ready");
    let unknown = DefaultFactory::default()
        .build(&resolved)
        .await
        .err()
        .unwrap();
    assert!(
        unknown.to_string().contains("--service-account"),
        "{unknown}"
    );

    h.create(
        "edge",
        json!({"providerRef": {"kind": "ClusterKeyProvider", "name": federation.provider},
               "reusable": true, "tags": ["tag:edge"], "expiry": "24h",
               "rotation": {"overlap": "3s"}, "secret": {"key": "TS_AUTHKEY"}}),
    )
    .await;
    let first = h.ready("edge").await;
    let old = first.key_id.clone().unwrap();
    let upstream = h.ts.key(&old).unwrap();
    assert_eq!(
        upstream.owner,
        keyward_emulators::tailscale::Owner::Tailnet,
        "made with the federated identity's access token"
    );
    assert_eq!(h.secret_value("edge", "TS_AUTHKEY").await, upstream.value);
    assert_eq!(h.ts.exchanges(), 1);
    assert_eq!(
        secrets().await,
        vec!["edge".to_owned()],
        "only the key's Secret"
    );

    h.rotate("edge", "1").await;
    let second = h.revision("edge", 2).await;
    let new = second.key_id.clone().unwrap();
    assert_ne!(new, old);
    assert_eq!(
        h.secret_value("edge", "TS_AUTHKEY").await,
        h.ts.key(&new).unwrap().value
    );
    eventually("the old key revoked after the overlap", WAIT, || async {
        h.ts.key(&old).unwrap().revoked.map(|_| ())
    })
    .await;
    assert_eq!(h.ts.exchanges(), 1, "one access token served it all");

    // A restarted controller keeps the cached access token; once Tailscale no longer
    // accepts it, a fresh ServiceAccount token is requested and exchanged.
    h.kill().await;
    h.start();
    h.ts.expire_access_tokens();
    h.rotate("edge", "2").await;
    h.revision("edge", 3).await;
    assert_eq!(h.ts.exchanges(), 2, "a new exchange after the 401");

    h.delete("edge").await;
    assert!(
        h.ts.live_keys().is_empty(),
        "deleting the resource revoked every key"
    );
    assert!(secrets().await.is_empty());
    assert!(h.ts.exchange_refusals().is_empty());
    let logs = common::captured_logs();
    assert!(
        !logs.contains("tskey-") && !logs.contains("eyJhbGciOi"),
        "no access token, key or ServiceAccount token in the logs"
    );
}

/// A federated identity that expects another audience, or trusts another subject,
/// refuses the exchange with Tailscale's opaque 403. The key says CredentialsInvalid
/// with the claims keyward presented and where each is set; fixing the audience
/// makes it Ready.
#[tokio::test]
async fn a_wrong_audience_or_subject_is_credentials_invalid_naming_what_to_fix() {
    let (mut h, federation) = Harness::federated("ts-wif-wrong").await;
    let wrong_audience = format!("{}-other", federation.audience);
    h.apply_federated_provider(&federation.provider, &federation.client_id, &wrong_audience)
        .await;
    let other_subject = format!("{}-other", federation.subject);
    let strict = h.ts.add_federated_identity(FederatedIdentity {
        issuer: federation.issuer.clone(),
        subject: other_subject.clone(),
        audience: federation.audience.clone(),
        tags: vec!["tag:edge".into()],
        scopes: vec!["auth_keys".into()],
    });
    let second = format!("{}-subject", federation.provider);
    h.apply_federated_provider(&second, &strict, &federation.audience)
        .await;
    let _second = ClusterProvider(second.clone());
    for (name, provider) in [("audience", &federation.provider), ("subject", &second)] {
        h.create(
            name,
            json!({"providerRef": {"kind": "ClusterKeyProvider", "name": provider},
                   "tags": ["tag:edge"], "expiry": "24h"}),
        )
        .await;
    }

    let (reason, message) = h.not_ready("audience").await;
    assert_eq!(reason, "CredentialsInvalid", "{message}");
    for needed in [
        format!("audience {wrong_audience}"),
        "spec.tailscale.workloadIdentity.audience".to_owned(),
        format!("issuer {}", federation.issuer),
    ] {
        assert!(
            message.contains(&needed),
            "{needed:?} missing from: {message}"
        );
    }
    let (reason, message) = h.not_ready("subject").await;
    assert_eq!(reason, "CredentialsInvalid", "{message}");
    for needed in [
        format!("subject {}", federation.subject),
        "--service-account".to_owned(),
        format!("federated identity {strict}"),
    ] {
        assert!(
            message.contains(&needed),
            "{needed:?} missing from: {message}"
        );
    }
    for why in ["audience", "subject"] {
        assert!(h.ts.exchange_refused(why), "{:?}", h.ts.exchange_refusals());
    }
    assert!(h.ts.keys().is_empty(), "nothing was issued");

    h.apply_federated_provider(
        &federation.provider,
        &federation.client_id,
        &federation.audience,
    )
    .await;
    h.ready("audience").await;
}

/// The keys list also carries the credential keyward runs on (a user's own API access
/// token, an OAuth client). Orphan recovery considers auth keys only: even when those
/// entries carry the interrupted attempt's very marker (the emulator names them after
/// every new key), only the orphaned auth key is revoked, and the credential keeps
/// working. Lists with and without types.
#[tokio::test]
async fn orphan_recovery_never_revokes_the_credential_keyward_runs_on() {
    for (auth, ids_only) in [(Auth::Token, false), (Auth::OAuth, true)] {
        let mut h = Harness::new("ts-orphan-cred", auth).await;
        h.ts.set_list_ids_only(ids_only);
        h.ts.name_credentials_after_new_keys(true);
        let live = h.recover_from_a_crash_after_create(ids_only).await;
        // Recovery lists before it issues again, so while it listed, the credentials
        // carried the orphan's marker; now they carry the current key's.
        let credentials = h.ts.credentials();
        assert!(!credentials.is_empty());
        assert!(
            credentials
                .iter()
                .all(|c| c.description == live[0].description),
            "{credentials:?}"
        );
        assert!(
            credentials.iter().all(|c| !c.revoked),
            "ids_only={ids_only}: {credentials:?}"
        );
        assert_eq!(
            h.key_requests("DELETE"),
            h.ts.keys().len() - 1,
            "one delete per orphaned auth key, none for a credential"
        );
    }
}
