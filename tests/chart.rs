//! The Helm chart (charts/keyward): `helm lint --strict`, what `helm template` renders
//! (hardened pods, exact RBAC), the values schema, `helm install` into the local control
//! plane, and the RBAC proven by running the operator binary as the chart's
//! ServiceAccount: enough to issue and delete a key, and refused everywhere else.
//!
//! Helm comes from `hack/helm` (installed once into the cache on first use).

mod common;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{Secret, ServiceAccount},
    events::v1::Event,
};
use keyward::resources::AuthKey;
use kube::{
    Api, Client,
    api::{
        DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
    },
};
use serde_json::{Value, json};

use common::{TestNamespace, eventually};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/keyward");
const NAMESPACED_VALUES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/charts/keyward/ci/namespaced-values.yaml"
);
const WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------

#[test]
fn default_values_lint_and_render_a_hardened_cluster_wide_operator() {
    helm_ok(&["lint", "--strict", CHART]);
    let objects = render("kw", "keyward-system", &[]);

    assert_eq!(
        kinds(&objects),
        [
            "ClusterRole/kw-keyward-all-namespaces",
            "ClusterRole/kw-keyward-cluster-scoped",
            "ClusterRoleBinding/kw-keyward-all-namespaces",
            "ClusterRoleBinding/kw-keyward-cluster-scoped",
            "Deployment/keyward-system/kw-keyward",
            "PodDisruptionBudget/keyward-system/kw-keyward",
            "Role/keyward-system/kw-keyward-operator",
            "Role/keyward-system/kw-keyward-token",
            "RoleBinding/keyward-system/kw-keyward-operator",
            "RoleBinding/keyward-system/kw-keyward-token",
            "Service/keyward-system/kw-keyward-metrics",
            "ServiceAccount/keyward-system/kw-keyward",
        ]
        .map(String::from)
        .into(),
        "no ServiceMonitor unless asked for"
    );

    let deployment = find(&objects, "Deployment", "kw-keyward");
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_hardened(deployment, "kw-keyward");
    let app_version = chart_app_version();
    assert_eq!(
        container(deployment)["image"],
        format!("ghcr.io/keyward/keyward:{app_version}"),
        "the image tag defaults to the chart's appVersion"
    );
    assert_eq!(
        args(deployment),
        [
            "run",
            "--operator-namespace=keyward-system",
            "--concurrency=4",
            "--log-format=json",
            "--log-level=info",
            "--client-qps=20",
            "--client-burst=40",
            "--metrics-bind-address=0.0.0.0:8080",
            "--leader-elect",
            "--lease-name=keyward",
        ],
        "no --namespaces: every namespace"
    );

    let pdb = find(&objects, "PodDisruptionBudget", "kw-keyward");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    let service = find(&objects, "Service", "kw-keyward-metrics");
    assert_eq!(service["spec"]["ports"][0]["port"], 8080);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http-metrics");
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );

    // Exactly the grants the operator needs: keys, providers, Secrets, Events and rollout
    // targets in every namespace, cluster-scoped reads, and the operator namespace's
    // credentials + Lease.
    let mut expected = namespaced_grants("*");
    expected.extend(cluster_scoped_grants());
    expected.extend(operator_namespace_grants("keyward-system", true));
    expected.extend(own_token_grant("keyward-system", "kw-keyward"));
    assert_eq!(grants(&objects, "kw-keyward", "keyward-system"), expected);
}

#[test]
fn namespaced_values_lint_and_render_a_role_per_namespace() {
    helm_ok(&["lint", "--strict", CHART, "-f", NAMESPACED_VALUES]);
    let objects = render("kw", "keyward-system", &["-f", NAMESPACED_VALUES]);

    let kinds = kinds(&objects);
    for expected in [
        "Role/team-a/kw-keyward",
        "RoleBinding/team-a/kw-keyward",
        "Role/team-b/kw-keyward",
        "RoleBinding/team-b/kw-keyward",
        "Role/keyward-system/kw-keyward-operator",
        "ClusterRole/kw-keyward-cluster-scoped",
        "ServiceMonitor/keyward-system/kw-keyward",
    ] {
        assert!(
            kinds.contains(expected),
            "{expected} missing from {kinds:?}"
        );
    }
    assert!(
        !kinds.contains("ClusterRole/kw-keyward-all-namespaces"),
        "{kinds:?}"
    );

    // No Secret (or key) outside team-a, team-b and, read-only, keyward-system; the only
    // cluster-wide grants are ClusterKeyProviders and namespaces; no Lease without
    // leader election.
    let mut expected = namespaced_grants("team-a");
    expected.extend(namespaced_grants("team-b"));
    expected.extend(cluster_scoped_grants());
    // Events about ClusterKeyProviders go to `default`.
    expected.extend(expand(
        "default",
        &[
            ("", &["events"], &["create", "patch"]),
            ("events.k8s.io", &["events"], &["create", "patch"]),
        ],
    ));
    expected.extend(operator_namespace_grants("keyward-system", false));
    expected.extend(own_token_grant("keyward-system", "kw-keyward"));
    assert_eq!(grants(&objects, "kw-keyward", "keyward-system"), expected);

    let deployment = find(&objects, "Deployment", "kw-keyward");
    assert_hardened(deployment, "kw-keyward");
    assert_eq!(deployment["spec"]["replicas"], 1);
    let args = args(deployment);
    assert!(
        args.contains(&"--namespaces=team-a,team-b".to_owned()),
        "{args:?}"
    );
    assert!(args.contains(&"--log-level=debug".to_owned()), "{args:?}");
    assert!(args.contains(&"--log-format=text".to_owned()), "{args:?}");
    assert!(
        !args.iter().any(|a| a.starts_with("--leader-elect")),
        "{args:?}"
    );
    let pod = &deployment["spec"]["template"];
    assert_eq!(
        pod["metadata"]["annotations"]["example.com/owner"],
        "platform"
    );
    assert_eq!(pod["spec"]["priorityClassName"], "system-cluster-critical");
    assert_eq!(pod["spec"]["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(pod["spec"]["tolerations"][0]["key"], "dedicated");

    let monitor = find(&objects, "ServiceMonitor", "kw-keyward");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "http-metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
}

#[test]
fn the_values_schema_refuses_wrong_values_with_the_path() {
    let refused = |set: &str| {
        let out = helm(&["template", "kw", CHART, "--set", set]);
        assert!(!out.status.success(), "--set {set} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let message = refused("replicas=two");
    assert!(
        message.contains("at '/replicas': got string, want integer"),
        "{message}"
    );
    let message = refused("logFormat=yaml");
    assert!(
        message.contains("at '/logFormat': value must be one of 'json', 'text'"),
        "{message}"
    );
    let message = refused("namespaces={Team_A}");
    assert!(
        message.contains("at '/namespaces/0': 'Team_A' does not match pattern"),
        "{message}"
    );
    // A typo is an error, not a silently ignored value.
    let message = refused("replica=2");
    assert!(
        message.contains("additional properties 'replica' not allowed"),
        "{message}"
    );
    // Two active operators would issue every key twice.
    let message = refused("leaderElection.enabled=false");
    assert!(
        message.contains("replicas > 1 needs leaderElection.enabled=true"),
        "{message}"
    );
}

#[test]
fn replicas_are_kept_on_different_nodes_unless_told_otherwise() {
    let pod_spec = |extra: &[&str]| {
        let objects = render("kw", "keyward-system", extra);
        let deployment = find(&objects, "Deployment", "kw-keyward");
        (
            deployment["spec"]["template"]["spec"].clone(),
            deployment["spec"]["selector"]["matchLabels"].clone(),
        )
    };
    // Default: preferred, so a one-node cluster still runs both replicas.
    let (pod, selector) = pod_spec(&[]);
    let term =
        &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(term["weight"], 100);
    assert_eq!(
        term["podAffinityTerm"]["topologyKey"],
        "kubernetes.io/hostname"
    );
    assert_eq!(
        term["podAffinityTerm"]["labelSelector"]["matchLabels"],
        selector
    );

    let (pod, selector) = pod_spec(&["--set", "podAntiAffinity=hard"]);
    let term =
        &pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(term["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(term["labelSelector"]["matchLabels"], selector);

    let (pod, _) = pod_spec(&["--set", "podAntiAffinity=none"]);
    assert!(pod["affinity"].is_null(), "{}", pod["affinity"]);

    // The user's affinity replaces the default.
    let own = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ops"]}]}]}}});
    let (pod, _) = pod_spec(&["--set-json", &format!("affinity={own}")]);
    assert_eq!(pod["affinity"], own);

    let out = helm(&["template", "kw", CHART, "--set", "podAntiAffinity=always"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("at '/podAntiAffinity'"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_digest_pins_the_image() {
    let digest = format!("sha256:{}", "0123456789abcdef".repeat(4));
    let objects = render(
        "kw",
        "keyward-system",
        &[
            "--set",
            &format!("image.digest={digest}"),
            "--set",
            "image.tag=ignored",
        ],
    );
    let deployment = find(&objects, "Deployment", "kw-keyward");
    assert_eq!(
        container(deployment)["image"],
        format!("ghcr.io/keyward/keyward@{digest}")
    );
    let out = helm(&["template", "kw", CHART, "--set", "image.digest=latest"]);
    assert!(
        !out.status.success(),
        "a digest that is not sha256:<64 hex> was accepted"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("at '/image/digest'"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The NetworkPolicy: absent by default; enabled, exactly metrics in and the API
/// server, DNS and the provider APIs out — and accepted by the real API server.
#[tokio::test]
async fn the_network_policy_renders_only_when_enabled() {
    let objects = render("kw", "keyward-system", &[]);
    assert!(!objects.iter().any(|o| o["kind"] == "NetworkPolicy"));

    let enabled = ["--set", "networkPolicy.enabled=true"];
    helm_ok(&["lint", "--strict", CHART, enabled[0], enabled[1]]);
    let objects = render("kw", "keyward-system", &enabled);
    let deployment = find(&objects, "Deployment", "kw-keyward");
    let policy = find(&objects, "NetworkPolicy", "kw-keyward");
    let spec = &policy["spec"];
    assert_eq!(
        spec["podSelector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(spec["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(
        spec["ingress"],
        json!([{"ports": [{"port": 8080, "protocol": "TCP"}]}])
    );
    let egress = spec["egress"].as_array().unwrap();
    assert_eq!(egress.len(), 3, "{egress:?}");
    assert_eq!(
        egress[0],
        json!({"ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]}),
        "the API server"
    );
    assert_eq!(
        egress[1]["ports"],
        json!([{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}])
    );
    assert_eq!(
        egress[1]["to"][0]["podSelector"]["matchLabels"]["k8s-app"],
        "kube-dns"
    );
    assert_eq!(
        egress[2],
        json!({"ports": [{"port": 443, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}),
        "the provider APIs"
    );

    // Narrowed peers land where they belong.
    let objects = render(
        "kw",
        "keyward-system",
        &[
            enabled[0],
            enabled[1],
            "--set-json",
            r#"networkPolicy.metrics.from=[{"namespaceSelector":{"matchLabels":{"name":"monitoring"}}}]"#,
            "--set-json",
            r#"networkPolicy.providers.to=[{"ipBlock":{"cidr":"203.0.113.0/24"}}]"#,
        ],
    );
    let spec = &find(&objects, "NetworkPolicy", "kw-keyward")["spec"];
    assert_eq!(
        spec["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]["name"],
        "monitoring"
    );
    assert_eq!(
        spec["egress"][2]["to"],
        json!([{"ipBlock": {"cidr": "203.0.113.0/24"}}])
    );

    // The real API server accepts it as rendered.
    let client = common::client().await;
    let ns = TestNamespace::new(&client, "chart-netpol").await;
    let mut policy: k8s_openapi::api::networking::v1::NetworkPolicy =
        serde_json::from_value(find(&objects, "NetworkPolicy", "kw-keyward").clone()).unwrap();
    policy.metadata.namespace = None;
    Api::namespaced(client, &ns.name)
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &policy,
        )
        .await
        .unwrap();
}

#[test]
fn chart_crds_are_the_generated_crds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read(&p).unwrap())
            })
            .collect();
        files.sort();
        files
    };
    let generated = files(&root.join("crds"));
    let chart = files(&root.join("charts/keyward/crds"));
    assert_eq!(generated.len(), 4);
    let names = |f: &[(String, Vec<u8>)]| f.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&chart), names(&generated));
    for ((name, chart), (_, generated)) in chart.iter().zip(&generated) {
        assert!(
            chart == generated,
            "charts/keyward/crds/{name} differs from crds/{name}: run `cp crds/*.yaml charts/keyward/crds/`"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Installing
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn helm_install_creates_every_rendered_object() {
    let client = common::client().await;
    let ns = TestNamespace::new(&client, "chart-install").await;
    // The release name is unique per test: cluster-scoped RBAC objects carry it.
    let release = ns.name.clone();
    let installed = helm_ok(&[
        "install",
        &release,
        CHART,
        "--namespace",
        &ns.name,
        "--kubeconfig",
        kubeconfig(),
    ]);
    assert!(
        installed.contains("kind: KeyProvider") && installed.contains("get authkeys"),
        "NOTES.txt tells the next step:\n{installed}"
    );

    let objects = render(&release, &ns.name, &[]);
    assert!(objects.len() >= 10, "{}", objects.len());
    for object in &objects {
        let found = get_dynamic(&client, object).await;
        assert!(
            found.is_some(),
            "{} {} was rendered but not installed",
            object["kind"],
            object["metadata"]["name"]
        );
    }
    // The CRDs are there (installed by the harness; Helm skips existing ones).
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    for file in std::fs::read_dir(Path::new(CHART).join("crds")).unwrap() {
        let name = file
            .unwrap()
            .file_name()
            .to_string_lossy()
            .replace(".yaml", "");
        crds.get(&name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// Runs `keyward run` with the installed Deployment's arguments, authenticated with a
/// token of the chart's ServiceAccount (TokenRequest API), in namespaced mode.
#[tokio::test]
async fn chart_rbac_lets_the_operator_work_and_nothing_more() {
    let client = common::client().await;
    let operator_ns = TestNamespace::new(&client, "chart-op").await;
    let watched = TestNamespace::new(&client, "chart-watched").await;
    let other = TestNamespace::new(&client, "chart-other").await;
    let release = operator_ns.name.clone();
    helm_ok(&[
        "install",
        &release,
        CHART,
        "--namespace",
        &operator_ns.name,
        "--kubeconfig",
        kubeconfig(),
        "--set",
        &format!("namespaces={{{}}}", watched.name),
    ]);
    let fullname = format!("{release}-keyward");

    // The identity: a token of the chart's ServiceAccount, as the projected volume holds.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &operator_ns.name);
    let token = accounts
        .create_token_request(
            &fullname,
            &PostParams::default(),
            &TokenRequest {
                spec: Some(TokenRequestSpec {
                    expiration_seconds: Some(3607),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .expect("a token for the chart's ServiceAccount")
        .status
        .expect("token status")
        .token
        .expect("a token");
    let work = tempfile::tempdir().unwrap();
    let sa_kubeconfig = work.path().join("kubeconfig");
    std::fs::write(&sa_kubeconfig, token_kubeconfig(&token)).unwrap();

    // The command line the chart starts, from the installed Deployment.
    let deployments: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &operator_ns.name,
        &kube::discovery::ApiResource::from_gvk(&GroupVersionKind::gvk("apps", "v1", "Deployment")),
    );
    let deployment = serde_json::to_value(deployments.get(&fullname).await.unwrap()).unwrap();
    let metrics_port = keyward::control_plane::free_port();
    let chart_args = args(&deployment)
        .into_iter()
        .map(|a| match a.strip_prefix("--metrics-bind-address=") {
            Some(_) => format!("--metrics-bind-address=127.0.0.1:{metrics_port}"),
            None => a,
        })
        .collect::<Vec<_>>();
    assert!(
        chart_args.contains(&format!("--namespaces={}", watched.name)),
        "{chart_args:?}"
    );
    let (run_args, dropped) = accepted_by_binary(&chart_args);
    if !dropped.is_empty() {
        eprintln!("NOTE: this keyward binary lacks {dropped:?}; ran with {run_args:?}");
    }

    let log = work.path().join("operator.log");
    let operator = Operator::start(&run_args, &sa_kubeconfig, &log, &operator_ns.name);

    // Enough: keys are issued (Secret, status, events) and deleted (finalizer released),
    // from a KeyProvider and from a ClusterKeyProvider whose namespaceSelector needs the
    // namespace's labels.
    apply(
        &client,
        Some(&watched.name),
        json!({"apiVersion": "keyward.dev/v1alpha1", "kind": "KeyProvider",
               "metadata": {"name": "keys"}, "spec": {"builtin": {}}}),
    )
    .await;
    apply(
        &client,
        None,
        json!({"apiVersion": "keyward.dev/v1alpha1", "kind": "ClusterKeyProvider",
               "metadata": {"name": release}, "spec": {"builtin": {}, "policy": {
                   "namespaceSelector": {"matchLabels": {"keyward.dev/test": "true"}}}}}),
    )
    .await;
    let names = ["chart-key", "chart-cluster-key"];
    for (name, provider) in names.iter().zip([
        json!({"name": "keys"}),
        json!({"kind": "ClusterKeyProvider", "name": release}),
    ]) {
        apply(
            &client,
            Some(&watched.name),
            json!({"apiVersion": "keyward.dev/v1alpha1", "kind": "AuthKey",
                   "metadata": {"name": name},
                   "spec": {"providerRef": provider, "expiry": "720h"}}),
        )
        .await;
    }
    let keys: Api<AuthKey> = Api::namespaced(client.clone(), &watched.name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &watched.name);
    for name in names {
        eventually(&format!("AuthKey {name} Ready=True"), WAIT, || async {
            operator.assert_running();
            let key = keys.get(name).await.ok()?;
            let status = serde_json::to_value(key.status?).ok()?;
            let ready = status["conditions"]
                .as_array()?
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            ready.then_some(())
        })
        .await;
        let secret = secrets.get(name).await.expect("the key's Secret");
        assert!(secret.data.unwrap_or_default().contains_key("key"));
    }
    let events: Api<Event> = Api::namespaced(client.clone(), &watched.name);
    eventually("an Issued event", WAIT, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("Issued"))
            .then_some(())
    })
    .await;

    for name in names {
        keys.delete(name, &DeleteParams::default()).await.unwrap();
    }
    for name in names {
        eventually(
            &format!("AuthKey {name} and its Secret gone"),
            WAIT,
            || async {
                operator.assert_running();
                let key_gone = keys.get_opt(name).await.ok()?.is_none();
                let secret_gone = secrets.get_opt(name).await.ok()?.is_none();
                (key_gone && secret_gone).then_some(())
            },
        )
        .await;
    }

    if let Some(port) = run_args
        .iter()
        .find_map(|a| a.strip_prefix("--metrics-bind-address="))
    {
        for path in ["/healthz", "/readyz", "/metrics"] {
            let url = format!("http://{port}{path}");
            eventually(&format!("{url} answering 200"), WAIT, || async {
                let response = reqwest::get(&url).await.ok()?;
                response.status().is_success().then_some(())
            })
            .await;
        }
    }

    // Nothing more: the same identity is refused outside what the chart granted.
    let sa = keyward::control_plane::client_from(&token_kubeconfig(&token))
        .await
        .unwrap();
    let forbidden = |what: &str, result: Result<(), kube::Error>| match result {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    };
    let list = ListParams::default();
    forbidden(
        "listing Secrets in a namespace keyward does not watch",
        Api::<Secret>::namespaced(sa.clone(), &other.name)
            .list(&list)
            .await
            .map(drop),
    );
    forbidden(
        "reading a Secret in a namespace keyward does not watch",
        Api::<Secret>::namespaced(sa.clone(), &other.name)
            .get("anything")
            .await
            .map(drop),
    );
    forbidden(
        "listing Secrets cluster-wide",
        Api::<Secret>::all(sa.clone()).list(&list).await.map(drop),
    );
    forbidden(
        "listing AuthKeys in a namespace keyward does not watch",
        Api::<AuthKey>::namespaced(sa.clone(), &other.name)
            .list(&list)
            .await
            .map(drop),
    );
    forbidden(
        "writing a Secret in the operator namespace (credentials are read-only)",
        Api::<Secret>::namespaced(sa.clone(), &operator_ns.name)
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap(),
            )
            .await
            .map(drop),
    );
    forbidden(
        "creating a namespace",
        Api::<k8s_openapi::api::core::v1::Namespace>::all(sa.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": format!("{}-x", other.name)}}))
                    .unwrap(),
            )
            .await
            .map(drop),
    );
    let token_for = |account: &str| {
        let api: Api<ServiceAccount> = Api::namespaced(sa.clone(), &operator_ns.name);
        let account = account.to_owned();
        async move {
            let request = TokenRequest {
                spec: Some(TokenRequestSpec {
                    audiences: Some(vec!["api.tailscale.com/test".into()]),
                    expiration_seconds: Some(600),
                    ..Default::default()
                }),
                ..Default::default()
            };
            api.create_token_request(&account, &PostParams::default(), &request)
                .await
                .map(drop)
        }
    };
    forbidden(
        "a token for another ServiceAccount",
        token_for("default").await,
    );
    // …while what it was granted works with the same identity.
    Api::<Secret>::namespaced(sa.clone(), &operator_ns.name)
        .list(&list)
        .await
        .expect("ClusterKeyProvider credentials in the operator namespace are readable");
    token_for(&fullname)
        .await
        .expect("a token for its own ServiceAccount, with an audience (workload identity)");

    operator.assert_running();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !text.to_lowercase().contains("forbidden"),
        "the operator hit an RBAC refusal:\n{text}"
    );
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Runs `hack/helm` with its state (config, cache, data) in a folder of this test binary.
fn helm(args: &[&str]) -> std::process::Output {
    static HOME: OnceLock<tempfile::TempDir> = OnceLock::new();
    let home = HOME.get_or_init(|| tempfile::tempdir().unwrap()).path();
    Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/hack/helm"))
        .args(args)
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("running hack/helm")
}

fn helm_ok(args: &[&str]) -> String {
    let out = helm(args);
    assert!(
        out.status.success(),
        "helm {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn render(release: &str, namespace: &str, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["template", release, CHART, "--namespace", namespace];
    args.extend_from_slice(extra);
    common::yaml_documents(&helm_ok(&args))
}

fn kubeconfig() -> &'static str {
    common::plane().kubeconfig().to_str().unwrap()
}

fn chart_app_version() -> String {
    let chart = std::fs::read_to_string(Path::new(CHART).join("Chart.yaml")).unwrap();
    let chart: Value = serde_saphyr::from_str(&chart).unwrap();
    chart["appVersion"].as_str().unwrap().to_owned()
}

/// `Kind/namespace/name` (or `Kind/name`) of every object.
fn kinds(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| {
            let meta = &o["metadata"];
            match meta["namespace"].as_str() {
                Some(ns) => format!(
                    "{}/{ns}/{}",
                    o["kind"].as_str().unwrap(),
                    meta["name"].as_str().unwrap()
                ),
                None => format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap(),
                    meta["name"].as_str().unwrap()
                ),
            }
        })
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn container(deployment: &Value) -> &Value {
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 1);
    &containers[0]
}

fn args(deployment: &Value) -> Vec<String> {
    container(deployment)["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

/// The hardened pod: non-root with a fixed UID, read-only root, no capabilities, no
/// privilege escalation, RuntimeDefault seccomp, resources bounded, and the API token
/// only through an expiring projected volume where the in-cluster client looks for it.
fn assert_hardened(deployment: &Value, service_account: &str) {
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], service_account);
    assert_eq!(pod["automountServiceAccountToken"], false);
    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true);
    assert_eq!(psc["runAsUser"], 65532);
    assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault");

    let c = container(deployment);
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert!(sc["runAsUser"].as_u64().unwrap() > 0);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert!(sc["capabilities"]["add"].is_null());
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    for bound in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                !c["resources"][bound][resource].is_null(),
                "resources.{bound}.{resource} unset"
            );
        }
    }

    let env: Vec<_> = c["env"].as_array().unwrap().iter().collect();
    for (name, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        assert!(
            env.iter()
                .any(|e| e["name"] == name && e["valueFrom"]["fieldRef"]["fieldPath"] == field),
            "{name} from the downward API"
        );
    }
    assert_eq!(c["ports"][0]["name"], "http-metrics");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "http-metrics");

    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount")
        .expect("the token mounted where the in-cluster client reads it");
    assert_eq!(mount["readOnly"], true);
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let sources = volume["projected"]["sources"].as_array().unwrap();
    let token = sources
        .iter()
        .find_map(|s| s.get("serviceAccountToken"))
        .expect("a projected service account token");
    assert_eq!(token["path"], "token");
    assert!(token["expirationSeconds"].as_u64().unwrap() >= 600);
    assert!(
        sources
            .iter()
            .any(|s| s["configMap"]["name"] == "kube-root-ca.crt"
                && s["configMap"]["items"][0]["path"] == "ca.crt")
    );
    assert!(sources.iter().any(|s| {
        s["downwardAPI"]["items"][0]["path"] == "namespace"
            && s["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"] == "metadata.namespace"
    }));
}

/// One RBAC grant: (where, apiGroup, resource, verb); `where` is a namespace, or `*`
/// for a ClusterRole bound cluster-wide.
type Grant = (String, String, String, String);

fn expand(scope: &str, rules: &[(&str, &[&str], &[&str])]) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for (group, resources, verbs) in rules {
        for resource in *resources {
            for verb in *verbs {
                out.insert((
                    scope.into(),
                    (*group).into(),
                    (*resource).into(),
                    (*verb).into(),
                ));
            }
        }
    }
    out
}

/// What the controllers do in a namespace they watch (src/reconciler.rs).
fn namespaced_grants(scope: &str) -> BTreeSet<Grant> {
    const KEY_VERBS: &[&str] = &["get", "list", "watch", "patch", "update"];
    const STATUS_VERBS: &[&str] = &["get", "patch", "update"];
    const READ: &[&str] = &["get", "list", "watch"];
    const SECRET_VERBS: &[&str] = &[
        "get", "list", "watch", "create", "patch", "update", "delete",
    ];
    expand(
        scope,
        &[
            (
                "keyward.dev",
                &["authkeys", "serviceaccountkeys"],
                KEY_VERBS,
            ),
            (
                "keyward.dev",
                &["authkeys/status", "serviceaccountkeys/status"],
                STATUS_VERBS,
            ),
            (
                "keyward.dev",
                &["authkeys/finalizers", "serviceaccountkeys/finalizers"],
                &["update"],
            ),
            ("keyward.dev", &["keyproviders"], READ),
            ("keyward.dev", &["keyproviders/status"], STATUS_VERBS),
            ("", &["secrets"], SECRET_VERBS),
            ("", &["events"], &["create", "patch"]),
            ("events.k8s.io", &["events"], &["create", "patch"]),
            (
                "apps",
                &["deployments", "statefulsets", "daemonsets"],
                &["get", "list", "watch", "patch"],
            ),
        ],
    )
}

fn cluster_scoped_grants() -> BTreeSet<Grant> {
    expand(
        "*",
        &[
            (
                "keyward.dev",
                &["clusterkeyproviders"],
                &["get", "list", "watch"],
            ),
            (
                "keyward.dev",
                &["clusterkeyproviders/status"],
                &["get", "patch", "update"],
            ),
            ("", &["namespaces"], &["get", "list", "watch"]),
        ],
    )
}

fn operator_namespace_grants(namespace: &str, leader_election: bool) -> BTreeSet<Grant> {
    let mut out = expand(namespace, &[("", &["secrets"], &["get", "list", "watch"])]);
    if leader_election {
        out.extend(expand(
            namespace,
            &[(
                "coordination.k8s.io",
                &["leases"],
                &["get", "list", "watch", "create", "update", "patch"],
            )],
        ));
    }
    out
}

/// TokenRequest for the chart's own ServiceAccount and no other (workload identity
/// federation); the resource carries its resourceNames, as [`grants`] writes them.
fn own_token_grant(namespace: &str, service_account: &str) -> BTreeSet<Grant> {
    expand(
        namespace,
        &[(
            "",
            &[format!("serviceaccounts/token[{service_account}]").as_str()],
            &["create"],
        )],
    )
}

/// Every grant the rendered bindings give the ServiceAccount, after checking that no
/// rule uses a wildcard (or nonResourceURLs, which the comparison would not see), that
/// every binding names only that ServiceAccount and a rendered role, and that every
/// rendered role is bound. A rule limited to resourceNames is written
/// `resource[name,…]`.
fn grants(objects: &[Value], service_account: &str, sa_namespace: &str) -> BTreeSet<Grant> {
    let role = |kind: &str, namespace: Option<&str>, name: &str| -> &Value {
        objects
            .iter()
            .find(|o| {
                o["kind"] == kind
                    && o["metadata"]["name"] == name
                    && o["metadata"]["namespace"].as_str() == namespace
            })
            .unwrap_or_else(|| panic!("{kind} {name} is bound but not rendered"))
    };
    let mut out = BTreeSet::new();
    for binding in objects
        .iter()
        .filter(|o| o["kind"] == "RoleBinding" || o["kind"] == "ClusterRoleBinding")
    {
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": service_account, "namespace": sa_namespace}])
        );
        let namespace = binding["metadata"]["namespace"].as_str();
        let role_kind = binding["roleRef"]["kind"].as_str().unwrap();
        let role_name = binding["roleRef"]["name"].as_str().unwrap();
        let rules = match role_kind {
            "Role" => role("Role", namespace, role_name),
            _ => role("ClusterRole", None, role_name),
        }["rules"]
            .as_array()
            .unwrap();
        let scope = namespace.unwrap_or("*");
        for rule in rules {
            let list = |field: &str| -> Vec<String> {
                rule[field]
                    .as_array()
                    .unwrap_or_else(|| panic!("rule without {field}: {rule}"))
                    .iter()
                    .map(|v| v.as_str().unwrap().to_owned())
                    .collect()
            };
            assert!(rule.get("nonResourceURLs").is_none());
            let names = rule
                .get("resourceNames")
                .map(|_| format!("[{}]", list("resourceNames").join(",")))
                .unwrap_or_default();
            for group in list("apiGroups") {
                for resource in list("resources").into_iter().map(|r| r + &names) {
                    for verb in list("verbs") {
                        assert!(
                            !group.contains('*') && !resource.contains('*') && !verb.contains('*'),
                            "wildcard in {rule}"
                        );
                        out.insert((scope.into(), group.clone(), resource.clone(), verb));
                    }
                }
            }
        }
    }
    // Every role that is rendered is also bound (no dead grants).
    for object in objects
        .iter()
        .filter(|o| o["kind"] == "Role" || o["kind"] == "ClusterRole")
    {
        assert!(
            objects
                .iter()
                .any(|b| b["roleRef"]["name"] == object["metadata"]["name"]
                    && b["roleRef"]["kind"] == object["kind"]),
            "{} {} is not bound",
            object["kind"],
            object["metadata"]["name"]
        );
    }
    out
}

/// The live object for a rendered one, through discovery.
async fn get_dynamic(client: &Client, object: &Value) -> Option<DynamicObject> {
    let (group, version) = match object["apiVersion"].as_str().unwrap().split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", object["apiVersion"].as_str().unwrap()),
    };
    let gvk = GroupVersionKind::gvk(group, version, object["kind"].as_str().unwrap());
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .unwrap_or_else(|e| panic!("discovering {gvk:?}: {e}"));
    let api: Api<DynamicObject> = match caps.scope {
        kube::discovery::Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            object["metadata"]["namespace"].as_str().unwrap(),
            &resource,
        ),
        kube::discovery::Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    api.get_opt(object["metadata"]["name"].as_str().unwrap())
        .await
        .unwrap()
}

async fn apply(client: &Client, namespace: Option<&str>, object: Value) {
    let gvk = GroupVersionKind::gvk("keyward.dev", "v1alpha1", object["kind"].as_str().unwrap());
    let (resource, _) = kube::discovery::pinned_kind(client, &gvk).await.unwrap();
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let name = object["metadata"]["name"].as_str().unwrap().to_owned();
    api.patch(
        &name,
        &PatchParams::apply("chart-test").force(),
        &Patch::Apply(object),
    )
    .await
    .unwrap_or_else(|e| panic!("applying {name}: {e}"));
}

/// A kubeconfig for the local API server that authenticates with a bearer token.
fn token_kubeconfig(token: &str) -> String {
    let admin = kube::config::Kubeconfig::read_from(common::plane().kubeconfig()).unwrap();
    let cluster = admin.clusters[0].cluster.clone().unwrap();
    let doc = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": {
            "server": cluster.server,
            "certificate-authority-data": cluster.certificate_authority_data,
        }}],
        "users": [{"name": "keyward", "user": {"token": token}}],
        "contexts": [{"name": "keyward", "context": {"cluster": "local", "user": "keyward"}}],
        "current-context": "keyward",
    });
    // JSON is YAML.
    doc.to_string()
}

/// Flags of `keyward run` that the chart passes and that arrive with the operator's
/// production flags (issue 6). A binary without them runs without them (or, for
/// `--namespaces` with one namespace, with the older `--namespace`), and the test says
/// so; any other flag the binary does not know fails the test.
const ARRIVING_FLAGS: &[&str] = &[
    "--namespaces",
    "--log-level",
    "--client-qps",
    "--client-burst",
    "--metrics-bind-address",
    "--leader-elect",
    "--lease-name",
];

/// The chart's arguments that this binary accepts, and the ones it had to drop.
fn accepted_by_binary(chart_args: &[String]) -> (Vec<String>, Vec<String>) {
    let help = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["run", "--help"])
        .output()
        .expect("keyward run --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let known: BTreeSet<&str> = help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[' || c == '<')
        .filter(|w| w.starts_with("--"))
        .collect();
    let mut run = Vec::new();
    let mut dropped = Vec::new();
    for arg in chart_args {
        let flag = arg.split('=').next().unwrap();
        if !flag.starts_with("--") || known.contains(flag) {
            run.push(arg.clone());
        } else if ARRIVING_FLAGS.contains(&flag) {
            dropped.push(arg.clone());
            if flag == "--namespaces" && known.contains("--namespace") {
                let value = arg.split_once('=').unwrap().1;
                assert!(
                    !value.contains(','),
                    "the old --namespace takes one namespace"
                );
                run.push(format!("--namespace={value}"));
            }
        } else {
            panic!("the chart passes {arg}, which `keyward run` does not know:\n{help}");
        }
    }
    (run, dropped)
}

/// The operator process; killed when dropped (a failing test too).
struct Operator {
    child: std::sync::Mutex<Child>,
    log: PathBuf,
}

impl Operator {
    fn start(args: &[String], kubeconfig: &Path, log: &Path, namespace: &str) -> Self {
        let out = std::fs::File::create(log).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_keyward"));
        for (name, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEYWARD_")) {
            command.env_remove(name);
        }
        let child = command
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", "keyward-test-0")
            .env("POD_NAMESPACE", namespace)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("starting keyward run");
        Self {
            child: std::sync::Mutex::new(child),
            log: log.to_owned(),
        }
    }

    fn assert_running(&self) {
        if let Ok(Some(status)) = self.child.lock().unwrap().try_wait() {
            panic!(
                "keyward run exited ({status}):\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
        if std::thread::panicking() {
            eprintln!(
                "keyward run's log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}
