//! keyward's phases, on one control plane: builtin keys (wave, restart, leader
//! failover, idle, deletion), then Tailscale keys against the emulator (wave, paced
//! keys, rotation wave, deletion).

use std::{collections::HashMap, path::PathBuf, process::Command, time::Duration};

use anyhow::Context as _;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use keyward::{
    control_plane::free_port, lifecycle::ROTATE_ANNOTATION, resources::ClusterKeyProvider,
};
use kube::Api;
use serde_json::{Value, json};

use crate::{
    AUTHKEY_API, OPERATOR_NAMESPACE, Run, authkeys, builtin_keys, client_flags,
    cluster::{self, Cluster},
    common_phases, delete_every, names, namespace,
    process::Process,
    report::{Failover, Keyward, Latency, Paced, Rotation, Tailscale, Upstream},
    track::{self, Tracker},
};

const LEASE: &str = "keyward";

/// Tailscale AuthKeys `<prefix>-00001`… in namespace `tailscale`; a short overlap, so
/// that the rotation wave's old keys are revoked within the measurement.
fn tailscale_keys(prefix: &str, n: usize, overlap: &str) -> Vec<Value> {
    (1..=n)
        .map(|i| {
            json!({
                "apiVersion": AUTHKEY_API, "kind": "AuthKey",
                "metadata": {"name": format!("{prefix}-{i:05}"), "namespace": "tailscale"},
                "spec": {
                    "providerRef": {"kind": "ClusterKeyProvider", "name": "tailscale"},
                    "reusable": true,
                    "rotation": {"overlap": overlap},
                },
            })
        })
        .collect()
}

/// The emulator process and its counters.
struct Emulator {
    process: Process,
    url: String,
    token: String,
    stats: String,
    http: reqwest::Client,
}

impl Emulator {
    async fn start(run: &Run) -> anyhow::Result<Self> {
        let a = &run.args;
        let mut command = Command::new(run.bins.join("emulator"));
        command.args([
            "tailscale".to_owned(),
            format!("--latency-ms={}", a.upstream_latency_ms),
            format!("--rate-limit={}", a.upstream_rate_limit),
            format!("--burst={}", a.upstream_burst),
        ]);
        let mut process = Process::spawn("emulator", command, &run.dir.join("emulator.log"))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let info: Value = loop {
            process.check_running()?;
            let text = std::fs::read_to_string(process.log()).unwrap_or_default();
            if let Some(line) = text.lines().next() {
                break serde_json::from_str(line).context("the emulator's first line")?;
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the emulator printed nothing in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let field = |k: &str| info[k].as_str().map(str::to_owned).context("emulator info");
        Ok(Self {
            url: field("url")?,
            token: field("apiToken")?,
            stats: field("stats")?,
            process,
            http: reqwest::Client::new(),
        })
    }

    async fn stats(&self) -> anyhow::Result<Value> {
        Ok(self.http.get(&self.stats).send().await?.json().await?)
    }

    async fn live_keys(&self) -> anyhow::Result<u64> {
        self.stats().await?["liveKeys"]
            .as_u64()
            .context("liveKeys in the emulator's stats")
    }
}

/// What reached the upstream between two stats snapshots; the peak is over the
/// seconds since `from`.
fn upstream_between(before: &Value, after: &Value, from: Timestamp) -> Upstream {
    let count = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    let peak = after["perSecond"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(second, _)| second.parse::<i64>().is_ok_and(|s| s >= from.as_second()))
        .filter_map(|(_, c)| c.as_u64())
        .max()
        .unwrap_or(0);
    Upstream {
        requests: count(after, "requests") - count(before, "requests"),
        too_many_requests: count(after, "tooManyRequests") - count(before, "tooManyRequests"),
        peak_per_second: peak,
    }
}

struct Operator<'a> {
    run: &'a Run,
    kubeconfig: PathBuf,
    dir: PathBuf,
}

impl Operator<'_> {
    /// `keyward run` (the release build) as `name`, as its own process.
    fn start(&self, name: &str, leader_elect: bool) -> anyhow::Result<Process> {
        let a = &self.run.args;
        let mut command = Command::new(self.run.bins.join("keyward"));
        command
            .args(["run", "--operator-namespace", OPERATOR_NAMESPACE])
            .args(client_flags(a))
            .args(["--concurrency", &a.concurrency.to_string()])
            .args([
                "--metrics-bind-address".to_owned(),
                format!("127.0.0.1:{}", free_port()),
            ])
            .env("KUBECONFIG", &self.kubeconfig)
            .env("POD_NAME", name)
            .env_remove("RUST_LOG");
        if leader_elect {
            command.arg("--leader-elect");
            if let [lease, renew, retry] = a.lease.as_slice() {
                command.args([
                    "--lease-duration",
                    lease,
                    "--renew-deadline",
                    renew,
                    "--retry-period",
                    retry,
                ]);
            }
        }
        Process::spawn(name, command, &self.dir.join(format!("{name}.log")))
    }
}

async fn lease_holder(cluster: &Cluster) -> anyhow::Result<Option<String>> {
    let leases: Api<Lease> = Api::namespaced(cluster.admin.clone(), OPERATOR_NAMESPACE);
    Ok(leases
        .get_opt(LEASE)
        .await?
        .and_then(|l| l.spec?.holder_identity))
}

async fn wait_providers_ready(cluster: &Cluster, names: &[&str]) -> anyhow::Result<()> {
    let api: Api<ClusterKeyProvider> = Api::all(cluster.admin.clone());
    for name in names {
        cluster::poll_until(
            &format!("ClusterKeyProvider {name} Ready"),
            Duration::from_secs(120),
            || async {
                Ok(api.get(name).await?.status.is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                }))
            },
        )
        .await?;
    }
    Ok(())
}

pub async fn run(run: &Run) -> anyhow::Result<Keyward> {
    let a = &run.args;
    let timeout = a.timeout();
    run.say("keyward: starting a control plane and the Tailscale emulator");
    let mut c = Cluster::start(&run.dir.join("keyward"), "keyward", a.quiet, timeout).await?;
    let emulator = Emulator::start(run).await?;
    for ns in [OPERATOR_NAMESPACE, "builtin", "tailscale"] {
        c.apply(namespace(ns)).await?;
    }
    c.apply(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "tailscale-credentials", "namespace": OPERATOR_NAMESPACE},
        "stringData": {"api-key": emulator.token},
    }))
    .await?;
    for (name, spec) in [
        ("builtin", json!({"builtin": {"prefix": "kw_"}})),
        (
            "tailscale",
            json!({"tailscale": {"apiURL": emulator.url, "tailnet": "-",
                "apiKeySecretRef": {"name": "tailscale-credentials", "key": "api-key"}}}),
        ),
    ] {
        let mut spec = spec;
        spec["policy"] = json!({"namespaceSelector": {}});
        if name == "tailscale" {
            // The provider's budget follows the emulator's limit (both 600 / min by
            // default), so a faster emulator makes a faster run.
            spec["rateLimit"] = json!({"requestsPerMinute": a.upstream_rate_limit});
        }
        c.apply(
            json!({"apiVersion": AUTHKEY_API, "kind": "ClusterKeyProvider",
            "metadata": {"name": name}, "spec": spec}),
        )
        .await?;
    }
    c.warm_up(&authkeys(), builtin_keys(1).remove(0)).await?;
    let operator = Operator {
        run,
        kubeconfig: c.kubeconfig()?,
        dir: c.dir.clone(),
    };
    let t0 = Timestamp::now();
    let mut keyward = operator.start("keyward-0", false)?;
    wait_providers_ready(&c, &["builtin", "tailscale"]).await?;
    c.wait_started_and_quiet(t0, &mut [&mut keyward]).await?;

    let (builtin, keyward) = common_phases(
        run,
        &mut c,
        (&authkeys(), "builtin", builtin_keys(a.keys)),
        keyward,
        || operator.start("keyward-1", false),
        async |c, keyward| {
            run.say("keyward: two replicas with leader election; killing the leader");
            let mut peak_rss = keyward.peak_rss();
            keyward.stop(Duration::from_secs(30)).await;
            let (failover, standby, leader_rss) = failover(c, &operator).await?;
            peak_rss = peak_rss.max(leader_rss);
            run.say(&format!(
                "keyward: took over in {:.1} s, quiet {:.1} s later",
                failover.takeover, failover.quiet_after_takeover
            ));
            Ok((failover, standby, peak_rss))
        },
    )
    .await?;
    let mut peak_rss = builtin.peak_rss;
    let tailscale = if a.no_tailscale {
        peak_rss = peak_rss.max(keyward.peak_rss());
        keyward.stop(Duration::from_secs(30)).await;
        None
    } else {
        let (phases, rss) = tailscale(run, &mut c, &emulator, keyward).await?;
        peak_rss = peak_rss.max(rss);
        Some(phases)
    };
    emulator.process.stop(Duration::from_secs(5)).await;
    Ok(Keyward {
        builtin: builtin.wave,
        restart: builtin.restart,
        failover: builtin.more,
        idle: builtin.idle,
        builtin_deletion: builtin.deletion,
        tailscale,
        peak_rss,
    })
}

/// The Tailscale wave, paced keys, the rotation wave and the deletion;
/// returns them with the highest peak RSS of the keyward processes, all stopped.
async fn tailscale(
    run: &Run,
    c: &mut Cluster,
    emulator: &Emulator,
    mut keyward: Process,
) -> anyhow::Result<(Tailscale, u64)> {
    let a = &run.args;
    run.say(&format!("keyward: applying {} Tailscale keys", a.keys));
    let docs = tailscale_keys("ts", a.keys, &a.overlap);
    let ts_names = names(&docs);
    let before = emulator.stats().await?;
    let wave_start = Timestamp::now();
    let (wave, tracker) = c.wave(&authkeys(), "tailscale", docs, &mut keyward).await?;
    let upstream = upstream_between(&before, &emulator.stats().await?, wave_start);
    run.say(&format!(
        "keyward: all Ready in {:.1} s; paced keys",
        wave.took
    ));

    let paced = paced(run, c, &tracker, emulator, &mut keyward).await?;
    run.say("keyward: rotation wave");
    let mut peak_rss = keyward.peak_rss();

    let rotation = rotation(c, &tracker, emulator, &ts_names, &mut keyward).await?;
    run.say(&format!(
        "keyward: rotated in {:.1} s; deleting every Tailscale key",
        rotation.rotated
    ));

    let deletion = delete_every(
        c,
        &tracker,
        &ts_names,
        &mut keyward,
        Some(move || async move { Ok(emulator.live_keys().await? == 0) }),
    )
    .await?;
    peak_rss = peak_rss.max(keyward.peak_rss());
    keyward.stop(Duration::from_secs(30)).await;
    Ok((
        Tailscale {
            wave,
            upstream,
            paced,
            rotation,
            deletion,
        },
        peak_rss,
    ))
}

/// Keys applied one at a time, with N keys present; deleted again afterwards.
async fn paced(
    run: &Run,
    c: &mut Cluster,
    tracker: &Tracker,
    emulator: &Emulator,
    keyward: &mut Process,
) -> anyhow::Result<Paced> {
    let a = &run.args;
    let docs = tailscale_keys("paced", a.paced_keys, &a.overlap);
    let paced_names = names(&docs);
    let mut applied = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / a.paced_rate));
    for doc in docs {
        tick.tick().await;
        applied.extend(cluster::create_all(tracker.api(), vec![doc]).await?);
    }
    let n = paced_names.len();
    tracker
        .wait(
            "every paced key Ready",
            c.timeout,
            |seen| track::ready_at(seen, &paced_names, 0) == n,
            |seen| format!("{} of {n}", track::ready_at(seen, &paced_names, 0)),
        )
        .await?;
    let seen = tracker.snapshot();
    let latencies = paced_names
        .iter()
        .filter_map(|name| Some(cluster::seconds(applied[name], seen.get(name)?.ready?.1)))
        .collect();
    let live = emulator.live_keys().await?;
    delete_every(
        c,
        tracker,
        &paced_names,
        keyward,
        Some(move || async move { Ok(emulator.live_keys().await? + n as u64 <= live) }),
    )
    .await?;
    Ok(Paced {
        keys: n,
        per_second: a.paced_rate,
        latency: Latency::of(latencies),
    })
}

/// Two replicas with leader election; once quiet, the leader is killed (SIGKILL).
/// Returns the figures, the surviving replica and the killed leader's peak RSS.
async fn failover(
    c: &mut Cluster,
    operator: &Operator<'_>,
) -> anyhow::Result<(Failover, Process, u64)> {
    let timeout = c.timeout;
    let t0 = Timestamp::now();
    let mut a = operator.start("keyward-a", true)?;
    let mut b = operator.start("keyward-b", true)?;
    let deadline = tokio::time::Instant::now() + timeout;
    let holder = loop {
        a.check_running()?;
        b.check_running()?;
        if let Some(holder) = lease_holder(c).await? {
            break holder;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no leader elected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    c.wait_started_and_quiet(t0, &mut [&mut a, &mut b]).await?;
    let (leader, mut standby) = if holder == a.name { (a, b) } else { (b, a) };
    let leader_rss = leader.peak_rss();
    // The leader is gone before the clock starts: nothing it sent counts as the
    // standby's work.
    leader.kill();
    let killed = Timestamp::now();
    loop {
        standby.check_running()?;
        if lease_holder(c).await?.as_deref() == Some(standby.name.as_str()) {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the standby never took the Lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took_over = Timestamp::now();
    let last = c
        .wait_started_and_quiet(killed, &mut [&mut standby])
        .await?;
    Ok((
        Failover {
            takeover: cluster::seconds(killed, took_over),
            requests: c.tally(killed)?,
            quiet_after_takeover: cluster::seconds(took_over, last).max(0.0),
        },
        standby,
        leader_rss,
    ))
}

/// Every key due at once: `keyward.dev/rotate` bumped on all of them.
async fn rotation(
    c: &mut Cluster,
    tracker: &Tracker,
    emulator: &Emulator,
    names: &[String],
    keyward: &mut Process,
) -> anyhow::Result<Rotation> {
    let (n, timeout) = (names.len(), c.timeout);
    let seen = tracker.snapshot();
    let revisions: HashMap<&String, i64> = names
        .iter()
        .map(|name| {
            (
                name,
                seen.get(name).and_then(|s| s.ready).map_or(0, |r| r.0),
            )
        })
        .collect();
    let rotated = |seen: &HashMap<String, track::Seen>| {
        names
            .iter()
            .filter(|name| {
                seen.get(*name)
                    .and_then(|s| s.ready)
                    .is_some_and(|(r, _)| r > revisions[name])
            })
            .count()
    };
    let before = emulator.stats().await?;
    let t0 = Timestamp::now();
    let patch = json!({"metadata": {"annotations": {ROTATE_ANNOTATION: format!("bench-{}", t0.as_second())}}});
    cluster::patch_all(tracker.api(), names, &patch).await?;
    let done = tracker
        .wait(
            "every key rotated",
            timeout,
            |seen| rotated(seen) == n,
            |seen| format!("{} of {n} rotated", rotated(seen)),
        )
        .await?;
    let revoked = cluster::poll_until("every old key revoked", timeout, || async {
        Ok(emulator.live_keys().await? <= n as u64)
    })
    .await?;
    c.wait_quiet(t0, &mut [keyward]).await?;
    Ok(Rotation {
        keys: n,
        rotated: cluster::seconds(t0, done),
        old_revoked: cluster::seconds(t0, revoked),
        requests: c.tally(t0)?,
        upstream: upstream_between(&before, &emulator.stats().await?, t0),
    })
}
