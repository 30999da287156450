//! The fault suite: keyward's first promise — no key outlives the resource that asked
//! for it, and a Ready key is one issued for the spec it reports — checked with real
//! processes against the real API server, where the seeded simulation checks the
//! logic against models.
//!
//! `keyward run` runs as a child process and is SIGKILLed at random moments, again and
//! again, while a workload creates, edits (tags, flags, description, expiry, role,
//! account, Secret name, deletion policy), rotate-bumps, deletes and re-creates
//! AuthKeys on the Tailscale emulator (through a ClusterKeyProvider) and
//! ServiceAccountKeys on the Prefect emulator and on the Prefect 1 GraphQL emulator
//! (the http provider, configured as `examples/http/prefect1-graphql.yaml`), edits and
//! deletes their Secrets, and the emulators serve faults: 429 bursts, 5xx runs, 5xx
//! answers to work that was done, lost answers, creates that land seconds after their
//! caller gave up (or was killed), slow stretches. The API server is restarted once
//! mid-run. Then faults and kills stop, keyward runs until every resource is settled,
//! and the audit counts what must be 0: live upstream keys referenced by nothing,
//! deleted resources with live keys, Ready resources whose key was issued for an older
//! spec (or whose Secret lacks it), Secrets left behind, and key values in keyward's
//! logs, in Events, in any status written during the run, in metrics.
//!
//! `KEYWARD_FAULT_KILLS` (default 25, what CI runs; at least 20), `KEYWARD_FAULT_SEED`
//! (default: from the clock; printed). A seed fixes the schedule of operations, faults,
//! kill moments and pauses; how they interleave with the processes varies from run to
//! run. The full run: `hack/fault-suite` (200 kills). keyward's log of the last run:
//! `target/tmp/fault-suite-keyward.log`.

#[path = "../common/mod.rs"]
mod common;
#[path = "../simulation/rng.rs"]
mod rng;

mod audit;
mod history;
mod operator;
mod upstreams;
mod workload;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use history::History;
use operator::Operator;
use rng::Rng;
use upstreams::{Provider, Upstreams};
use workload::{FAULT_KINDS, Injector, Workload, fault_kind};

/// keyward's `--issue-deadline`: short, so interrupted issuances are recovered (after
/// the landing window of two deadlines) many times within the run.
const ISSUE_DEADLINE: Duration = Duration::from_secs(4);
/// The longest a late create takes to land after it was sent. keyward sends a create
/// within half a deadline of recording its attempt and presumes it may land for two
/// deadlines after that: an upstream that takes up to 1.5 deadlines keeps that
/// contract. Half a second less, for the request's own way there.
const LATE_MAX: Duration = Duration::from_millis(5_500);
/// How long keyward gets to settle everything once faults and kills stop. An issuance
/// that failed many times in a row waits out its backoff (up to 5 minutes in
/// principle; in practice well under a minute).
const SETTLE_BOUND: Duration = Duration::from_secs(240);

struct Params {
    seed: u64,
    kills: usize,
}

impl Params {
    fn from_env() -> Self {
        let var = |name: &str| {
            std::env::var(name).ok().map(|v| {
                v.parse::<u64>()
                    .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number"))
            })
        };
        let kills = var("KEYWARD_FAULT_KILLS").unwrap_or(25) as usize;
        assert!(
            kills >= 20,
            "KEYWARD_FAULT_KILLS={kills}: at least 20, or the run cannot show every fault at work"
        );
        let seed = var("KEYWARD_FAULT_SEED").unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_micros() as u64
                % 1_000_000
        });
        Self { seed, kills }
    }
}

/// What the kill loop did.
struct Kills {
    /// Kills while the suite's watch showed an issuance in flight.
    in_flight: usize,
    api_server_restarts: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_key_outlives_its_resource_or_its_spec_through_kills_faults_and_an_api_server_restart() {
    let params = Params::from_env();
    eprintln!(
        "fault suite: seed {seed}, {kills} kills; replay: KEYWARD_FAULT_SEED={seed} KEYWARD_FAULT_KILLS={kills} cargo test --test fault_suite -- --nocapture",
        seed = params.seed,
        kills = params.kills
    );
    let began = Instant::now();
    let client = common::client().await;
    let ns = common::TestNamespace::new(&client, "faults").await;
    let upstreams = Arc::new(Upstreams::start(&ns.name).await);
    upstreams.install(&client, &ns.name).await;
    let history = Arc::new(Mutex::new(History::default()));
    let watches = history::follow(&client, &ns.name, history.clone());
    let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fault-suite-keyward.log");
    let mut operator = Operator::new(&ns.name, ISSUE_DEADLINE, &log);
    eprintln!("fault suite: keyward's log is {}", log.display());

    // The run: the workload and the faults go on while keyward is killed K times.
    operator.ensure_running();
    let mut workload = Workload::new(
        params.seed ^ 0x5eed_0001,
        client.clone(),
        &ns.name,
        &upstreams,
    );
    workload.populate().await;
    let run_started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let driver = tokio::spawn(drive(workload, stop.clone()));
    let injector = tokio::spawn(inject(
        Injector::new(params.seed ^ 0x5eed_0002, LATE_MAX),
        upstreams.clone(),
        stop.clone(),
    ));
    let kills = kill_loop(&mut operator, &history, &params).await;
    stop.store(true, Ordering::SeqCst);
    let workload = driver.await.expect("the workload");
    let injector = injector.await.expect("the injector");
    for (_, faults) in upstreams.faults() {
        faults.clear();
        faults.set_delay(Duration::ZERO);
    }
    let run_time = run_started.elapsed();

    // Quiescence, then the audit.
    operator.ensure_running();
    let settle_started = Instant::now();
    let settled = audit::settle(&client, &ns.name, &upstreams, SETTLE_BOUND).await;
    let settle_time = settle_started.elapsed();
    let metrics = operator.metrics().await.unwrap_or_default();
    let logs = std::fs::read_to_string(operator.log()).unwrap_or_default();
    // What the watch saw until now (the audit awaits; the watch goes on meanwhile).
    let seen = history.lock().unwrap().clone();
    let figures = audit::audit(
        &client,
        &ns.name,
        &upstreams,
        &workload.resources,
        &seen,
        &logs,
        &metrics,
    )
    .await;
    for w in watches {
        w.abort();
    }

    let exercised = report(
        &params,
        &operator,
        &kills,
        &workload,
        &injector,
        &upstreams,
        &history.lock().unwrap(),
        &figures,
        [run_time, settle_time, began.elapsed()],
    );
    if let Err(unsettled) = &settled {
        panic!("not settled within {SETTLE_BOUND:?}: {unsettled:?}");
    }
    let failed: Vec<String> = figures
        .iter()
        .filter(|f| f.count > 0)
        .map(|f| format!("{}: {}\n  {}", f.what, f.count, f.found.join("\n  ")))
        .collect();
    assert!(
        failed.is_empty(),
        "seed {}: the audit found\n{}\n(keyward's log: {})",
        params.seed,
        failed.join("\n"),
        log.display()
    );
    assert_eq!(operator.kills, params.kills, "every kill happened");
    assert_eq!(kills.api_server_restarts, 1, "the API server restarted");
    assert!(
        kills.in_flight >= params.kills / 10,
        "only {} kills hit an issuance in flight",
        kills.in_flight
    );
    assert!(
        exercised.recovered >= 1,
        "no interrupted issuance was recovered"
    );
    for kind in FAULT_KINDS {
        assert!(
            exercised.served.get(kind).copied().unwrap_or(0) > 0,
            "no fault of kind {kind:?} was served"
        );
    }
}

/// The workload, one operation after another until told to stop.
async fn drive(mut workload: Workload, stop: Arc<AtomicBool>) -> Workload {
    while !stop.load(Ordering::SeqCst) {
        workload.step().await;
        tokio::time::sleep(workload.pause()).await;
    }
    workload
}

async fn inject(
    mut injector: Injector,
    upstreams: Arc<Upstreams>,
    stop: Arc<AtomicBool>,
) -> Injector {
    while !stop.load(Ordering::SeqCst) {
        injector.step(&upstreams);
        tokio::time::sleep(injector.pause()).await;
    }
    injector
}

/// Kills keyward K times; restarts the API server at the halfway kill, while the kills
/// go on.
async fn kill_loop(operator: &mut Operator, history: &Mutex<History>, params: &Params) -> Kills {
    let mut rng = Rng::new(params.seed ^ 0x5eed_0003);
    let give_up =
        Instant::now() + Duration::from_secs(12) * params.kills as u32 + Duration::from_secs(60);
    let half = params.kills / 2;
    let mut in_flight = kill(operator, history, &mut rng, half, give_up).await;
    eprintln!("fault suite: restarting the API server after kill {half}");
    let (restarted, second_half) = tokio::join!(
        common::plane().restart_apiserver(),
        kill(operator, history, &mut rng, params.kills - half, give_up)
    );
    restarted.unwrap_or_else(|e| panic!("restarting the API server: {e}"));
    in_flight += second_half;
    Kills {
        in_flight,
        api_server_restarts: 1,
    }
}

/// Until `n` more kills happened (or `give_up` passed): starts keyward, lets it run for a random while,
/// SIGKILLs it, sometimes waits a little before the next start. Returns how many kills
/// hit an issuance in flight.
async fn kill(
    operator: &mut Operator,
    history: &Mutex<History>,
    rng: &mut Rng,
    n: usize,
    give_up: Instant,
) -> usize {
    let mut in_flight = 0;
    let target = operator.kills + n;
    while operator.kills < target && Instant::now() < give_up {
        operator.ensure_running();
        let uptime = match rng.weighted(&[50, 35, 15]) {
            0 => 200 + rng.below(1_800),
            1 => 2_000 + rng.below(3_000),
            _ => 5_000 + rng.below(7_000),
        };
        tokio::time::sleep(Duration::from_millis(uptime)).await;
        let busy = history.lock().unwrap().in_flight() > 0;
        if operator.sigkill() && busy {
            in_flight += 1;
        }
        if rng.chance(400) {
            tokio::time::sleep(Duration::from_millis(100 + rng.below(2_900))).await;
        }
    }
    in_flight
}

/// What the run exercised, for the assertions that it was not vacuous.
struct Exercised {
    /// Keys the upstreams made that no resource ever held and that are revoked:
    /// interrupted issuances found by their marker (Tailscale, http).
    recovered: usize,
    served: BTreeMap<&'static str, usize>,
}

/// Prints the figures as a Markdown table (as docs/lifecycle-correctness.md shows
/// them) and the verdict.
#[allow(clippy::too_many_arguments)]
fn report(
    params: &Params,
    operator: &Operator,
    kills: &Kills,
    workload: &Workload,
    injector: &Injector,
    upstreams: &Upstreams,
    history: &History,
    figures: &[audit::Figure],
    [run, settle, total]: [Duration; 3],
) -> Exercised {
    let held: BTreeSet<String> = history
        .every_held()
        .iter()
        .map(|id| upstreams::upstream_id(id))
        .collect();
    let live: BTreeSet<String> = upstreams.live_keys().into_iter().map(|k| k.id).collect();
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |what: &str, value: String| rows.push((what.to_owned(), value));
    row("seed", params.seed.to_string());
    row("SIGKILLs of `keyward run`", operator.kills.to_string());
    row(
        "… while an issuance was in flight",
        kills.in_flight.to_string(),
    );
    row("API server restarts", kills.api_server_restarts.to_string());
    row(
        "keyward exits it was not killed for",
        format!("{} {:?}", operator.exits.len(), operator.exits),
    );
    let c = &workload.counts;
    row(
        "resources created / spec edits / rotate bumps",
        format!("{} / {} / {}", c.created, c.edits, c.rotate_bumps),
    );
    row(
        "Secret edits / Secret deletes",
        format!("{} / {}", c.secret_edits, c.secret_deletes),
    );
    row(
        "resources deleted (of which `Retain`)",
        format!("{} ({})", c.deletes, c.retained_deletes),
    );
    row(
        "workload operations the API server did not answer",
        c.failed.to_string(),
    );
    let mut recovered = 0;
    for (provider, made) in upstreams.keys_made() {
        let never_held = made
            .iter()
            .filter(|id| !held.contains(*id) && !live.contains(*id))
            .count();
        if provider != Provider::Prefect {
            recovered += never_held;
        }
        row(
            &format!(
                "{} keys made upstream (never handed out, now dead)",
                provider.name()
            ),
            format!("{} ({never_held})", made.len()),
        );
    }
    row(
        "issuance attempts recorded",
        history.attempts.len().to_string(),
    );
    let mut served: BTreeMap<&'static str, usize> = BTreeMap::new();
    for (_, faults) in upstreams.faults() {
        for fault in faults.served() {
            *served.entry(fault_kind(&fault.fault)).or_default() += 1;
        }
    }
    for kind in FAULT_KINDS {
        let injected = injector.injected.get(kind).copied().unwrap_or(0);
        let value = if kind == "slow answers" {
            format!("{injected} stretches")
        } else {
            format!(
                "{injected} queued, {} served",
                served.get(kind).copied().unwrap_or(0)
            )
        };
        row(&format!("faults: {kind}"), value);
    }
    row(
        "time: run / settle / whole test",
        format!(
            "{:.0}s / {:.0}s / {:.0}s",
            run.as_secs_f64(),
            settle.as_secs_f64(),
            total.as_secs_f64()
        ),
    );
    for f in figures {
        row(&format!("**audit: {}**", f.what), f.count.to_string());
    }
    let pass = figures.iter().all(|f| f.count == 0);
    eprintln!("\n| figure | value |\n| --- | --- |");
    for (what, value) in &rows {
        eprintln!("| {what} | {value} |");
    }
    eprintln!(
        "\nfault suite verdict: {}\n",
        if pass { "PASS" } else { "FAIL" }
    );
    // "Slow answers" change a delay; they are not served one by one.
    served.insert(
        "slow answers",
        injector.injected.get("slow answers").copied().unwrap_or(0),
    );
    Exercised { recovered, served }
}
