//! `hack/bench`: keyward at N keys on a real local control plane, beside the floor (a
//! client making only the writes a key needs) and External Secrets Operator, at the
//! same client rate. Prints Markdown for BENCHMARKS.md, which says
//! what each figure means and how it is measured.

mod audit;
mod cluster;
mod eso;
mod gate;
mod keyward;
mod process;
mod report;
mod track;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use jiff::Timestamp;
use kube::api::ApiResource;
use serde_json::{Value, json};

use crate::{
    cluster::Cluster,
    process::Process,
    report::{Deletion, Idle, Meta, Report, Restart, Wave},
    track::Tracker,
};

#[derive(Parser, Clone)]
#[command(
    name = "hack/bench",
    about = "keyward, the floor and External Secrets Operator at N keys"
)]
pub struct Args {
    /// Keys per wave.
    #[arg(long, default_value_t = 1000)]
    pub keys: usize,
    /// A quick check of the harness: 20 keys, no ESO, 5 s idle, short leases and
    /// overlaps.
    #[arg(long)]
    pub smoke: bool,
    /// Client rate limit of every operator, requests per second.
    #[arg(long, default_value_t = 50.0)]
    pub client_qps: f64,
    /// Client burst of every operator.
    #[arg(long, default_value_t = 100)]
    pub client_burst: u32,
    /// Reconciles at once, for every operator (keyward --concurrency, ESO --concurrent).
    #[arg(long, default_value_t = 4)]
    pub concurrency: u16,
    /// Emulated upstream round trip.
    #[arg(long, default_value_t = 50)]
    pub upstream_latency_ms: u64,
    /// Upstream rate limit, requests per minute; the Tailscale provider's `rateLimit`
    /// is set to the same (keyward's default budget is 600 / minute, burst 10).
    #[arg(long, default_value_t = 600)]
    pub upstream_rate_limit: u32,
    /// Upstream burst above the rate limit.
    #[arg(long, default_value_t = 60)]
    pub upstream_burst: u32,
    /// How long to watch the operators idle with N Ready keys.
    #[arg(long, default_value = "5m", value_parser = duration)]
    pub idle: Duration,
    /// How long without a request (watches and Lease renewals aside) counts as quiet.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub quiet: Duration,
    /// `rotation.overlap` of the Tailscale keys: how long after the rotation wave the
    /// old keys are revoked.
    #[arg(long, default_value = "30s")]
    pub overlap: String,
    /// Keys applied one at a time after the Tailscale wave, for latency when the client
    /// rate is not the bottleneck.
    #[arg(long, default_value_t = 100)]
    pub paced_keys: usize,
    /// Rate of the paced keys, per second (2 / s × today's ~14 requests per key stays
    /// below the default 50 QPS).
    #[arg(long, default_value_t = 2.0)]
    pub paced_rate: f64,
    /// Leave External Secrets Operator out (it is built once, ~10 minutes, on first use).
    #[arg(long)]
    pub no_eso: bool,
    /// Leave keyward's Tailscale phases out (its wave, paced keys, rotation
    /// wave and deletion): builtin keys only, for a large N in less time.
    #[arg(long)]
    pub no_tailscale: bool,
    /// Run only these subjects.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Subject>,
    /// Folder of the keyward, emulator and floor binaries (default: this binary's).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// keyward --lease-duration / --renew-deadline / --retry-period for the failover
    /// (default: keyward's own defaults; the smoke run shortens them).
    #[arg(long, num_args = 3, value_names = ["LEASE", "RENEW", "RETRY"])]
    pub lease: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Subject {
    Floor,
    Keyward,
    Eso,
}

fn duration(s: &str) -> Result<Duration, String> {
    ::keyward::resources::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration like 10s, 5m or 1m30s"))
}

impl Args {
    fn runs(&self, subject: Subject) -> bool {
        (self.only.is_empty() || self.only.contains(&subject))
            && !(subject == Subject::Eso && (self.no_eso || self.smoke))
    }

    /// The longest any one wait may take.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(600) + Duration::from_millis(500 * self.keys as u64)
    }
}

/// Where the benchmark runs: binaries, the run's folder, when it started.
pub struct Run {
    pub args: Args,
    pub bins: PathBuf,
    pub dir: PathBuf,
    started: Instant,
}

impl Run {
    pub fn say(&self, what: &str) {
        eprintln!(
            "bench [{:>6.1} s] {what}",
            self.started.elapsed().as_secs_f64()
        );
    }
}

pub const AUTHKEY_API: &str = "keyward.dev/v1alpha1";

/// Where keyward runs: its Lease and the providers' credential Secrets.
pub const OPERATOR_NAMESPACE: &str = "keyward-system";

pub fn authkeys() -> ApiResource {
    ApiResource::erase::<::keyward::resources::AuthKey>(&())
}

/// `builtin` AuthKeys named `key-00001`… in namespace `builtin`.
pub fn builtin_keys(n: usize) -> Vec<Value> {
    (1..=n)
        .map(|i| {
            json!({
                "apiVersion": AUTHKEY_API, "kind": "AuthKey",
                "metadata": {"name": format!("key-{i:05}"), "namespace": "builtin"},
                "spec": {"providerRef": {"kind": "ClusterKeyProvider", "name": "builtin"}},
            })
        })
        .collect()
}

pub fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

pub fn names(docs: &[Value]) -> Vec<String> {
    docs.iter()
        .filter_map(|d| d["metadata"]["name"].as_str().map(str::to_owned))
        .collect()
}

/// What keyward (with builtin keys) and ESO are both put through.
pub struct CommonPhases<T> {
    pub wave: Wave,
    pub restart: Restart,
    pub idle: Idle,
    pub deletion: Deletion,
    /// What `with_ready` measured.
    pub more: T,
    /// The highest of every process's.
    pub peak_rss: u64,
}

/// N keys applied at once; a restart with N Ready keys (`start` makes the new
/// process); idle; what `with_ready` measures with them Ready (it returns the process
/// to go on with and the highest peak RSS of those it stopped); every key deleted.
/// Returns the process still running.
pub async fn common_phases<T>(
    run: &Run,
    cluster: &mut Cluster,
    (resource, namespace, docs): (&ApiResource, &str, Vec<Value>),
    mut operator: Process,
    start: impl FnOnce() -> anyhow::Result<Process>,
    with_ready: impl AsyncFnOnce(&mut Cluster, Process) -> anyhow::Result<(T, Process, u64)>,
) -> anyhow::Result<(CommonPhases<T>, Process)> {
    let who = cluster.user.clone();
    run.say(&format!("{who}: applying {} keys", docs.len()));
    let key_names = names(&docs);
    let (wave, tracker) = cluster
        .wave(resource, namespace, docs, &mut operator)
        .await?;
    run.say(&format!(
        "{who}: all Ready in {:.1} s; restarting",
        wave.took
    ));
    let first_rss = operator.peak_rss();
    let (restart, mut operator) = restart(cluster, operator, start).await?;
    run.say(&format!(
        "{who}: quiet {:.1} s after the restart; idle for {:?}",
        restart.quiet_after_start, run.args.idle
    ));
    let idle = idle(cluster, &mut operator, run.args.idle).await?;
    // After the idle phase, so that it is measured without leader election.
    let restarted_rss = operator.peak_rss();
    let (more, mut operator, more_rss) = with_ready(cluster, operator).await?;
    run.say(&format!("{who}: deleting every key"));
    let deletion = delete_every(
        cluster,
        &tracker,
        &key_names,
        &mut operator,
        None::<fn() -> std::future::Ready<anyhow::Result<bool>>>,
    )
    .await?;
    Ok((
        CommonPhases {
            wave,
            restart,
            idle,
            deletion,
            more,
            peak_rss: first_rss
                .max(restarted_rss)
                .max(more_rss)
                .max(operator.peak_rss()),
        },
        operator,
    ))
}

/// Restarts the operator: stops `old`, starts `start()`, measures until quiet.
pub async fn restart(
    cluster: &mut Cluster,
    old: Process,
    start: impl FnOnce() -> anyhow::Result<Process>,
) -> anyhow::Result<(Restart, Process)> {
    old.stop(Duration::from_secs(30)).await;
    let t0 = Timestamp::now();
    let mut new = start()?;
    let last = cluster.wait_started_and_quiet(t0, &mut [&mut new]).await?;
    let requests = cluster.tally(t0)?;
    let last_list = cluster
        .audit
        .between(&cluster.user, t0, last)
        .iter()
        .filter(|r| r.verb == "list")
        .map(|r| r.at)
        .max()
        .unwrap_or(t0);
    Ok((
        Restart {
            requests,
            quiet_after_start: cluster::seconds(t0, last),
            quiet_after_lists: cluster::seconds(last_list, last),
            cpu: new.cpu_seconds(),
            peak_rss: new.peak_rss(),
        },
        new,
    ))
}

/// Watches the operator do nothing for `how_long`.
pub async fn idle(
    cluster: &mut Cluster,
    operator: &mut Process,
    how_long: Duration,
) -> anyhow::Result<Idle> {
    let (t0, cpu0) = (Timestamp::now(), operator.cpu_seconds());
    let end = tokio::time::Instant::now() + how_long;
    while tokio::time::Instant::now() < end {
        operator.check_running()?;
        tokio::time::sleep(Duration::from_secs(1).min(how_long)).await;
    }
    Ok(Idle {
        seconds: cluster::seconds(t0, Timestamp::now()),
        requests: cluster.tally(t0)?,
        cpu: operator.cpu_seconds() - cpu0,
    })
}

/// Deletes every key; done when every object is gone (its finalizer released) and,
/// when `upstream_done` is given, once it says every upstream key is revoked.
pub async fn delete_every<F, Fut>(
    cluster: &mut Cluster,
    tracker: &Tracker,
    names: &[String],
    operator: &mut Process,
    upstream_done: Option<F>,
) -> anyhow::Result<Deletion>
where
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let (n, timeout) = (names.len(), cluster.timeout);
    let t0 = Timestamp::now();
    cluster::delete_all(tracker.api(), names).await?;
    let gone = tracker
        .wait(
            "every key deleted",
            timeout,
            |seen| track::gone(seen, names) == n,
            |seen| format!("{} of {n} gone", track::gone(seen, names)),
        )
        .await?;
    let upstream_revoked = match upstream_done {
        Some(done) => Some(cluster::seconds(
            t0,
            cluster::poll_until("every upstream key revoked", timeout, done).await?,
        )),
        None => None,
    };
    cluster.wait_quiet(t0, &mut [operator]).await?;
    Ok(Deletion {
        keys: n,
        finalizers_released: cluster::seconds(t0, gone),
        upstream_revoked,
        requests: cluster.tally(t0)?,
    })
}

/// The floor: the same wave of builtin-looking keys, served by `floor`.
async fn floor(run: &Run) -> anyhow::Result<Wave> {
    let args = &run.args;
    run.say("floor: starting a control plane");
    let mut cluster =
        Cluster::start(&run.dir.join("floor"), "floor", args.quiet, args.timeout()).await?;
    cluster.apply(namespace("builtin")).await?;
    cluster
        .warm_up(&authkeys(), builtin_keys(1).remove(0))
        .await?;
    let kubeconfig = cluster.kubeconfig()?;
    let mut command = Command::new(run.bins.join("floor"));
    command
        .args(["--namespace", "builtin"])
        .args(client_flags(args))
        .args(["--concurrency", &args.concurrency.to_string()])
        .env("KUBECONFIG", &kubeconfig);
    let t0 = Timestamp::now();
    let mut floor = Process::spawn("floor", command, &cluster.dir.join("floor.log"))?;
    cluster
        .wait_started_and_quiet(t0, &mut [&mut floor])
        .await?;
    run.say(&format!("floor: applying {} keys", args.keys));
    let (wave, _) = cluster
        .wave(&authkeys(), "builtin", builtin_keys(args.keys), &mut floor)
        .await?;
    run.say(&format!("floor: all Ready in {:.1} s", wave.took));
    floor.stop(Duration::from_secs(5)).await;
    Ok(wave)
}

pub fn client_flags(args: &Args) -> [String; 4] {
    [
        "--client-qps".into(),
        args.client_qps.to_string(),
        "--client-burst".into(),
        args.client_burst.to_string(),
    ]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut args = Args::parse();
    let explicit = |flag: &str| std::env::args().any(|a| a.starts_with(flag));
    if args.smoke {
        if !explicit("--keys") {
            args.keys = 20;
        }
        if !explicit("--idle") {
            args.idle = Duration::from_secs(5);
        }
        if !explicit("--quiet") {
            args.quiet = Duration::from_secs(1);
        }
        if !explicit("--overlap") {
            args.overlap = "5s".into();
        }
        if !explicit("--paced-keys") {
            args.paced_keys = 5;
        }
        if args.lease.is_empty() {
            args.lease = ["4s", "3s", "1s"].map(String::from).to_vec();
        }
    }
    anyhow::ensure!(args.keys > 0, "--keys must be at least 1");
    let bins = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this binary's folder")?
            .to_owned(),
    };
    for bin in ["keyward", "emulator", "floor"] {
        anyhow::ensure!(
            bins.join(bin).is_file(),
            "{} is missing: build with `cargo build --release --workspace --bins` (hack/bench does)",
            bins.join(bin).display()
        );
    }
    let stamp = Timestamp::now().strftime("%Y%m%d-%H%M%S").to_string();
    let dir = bins
        .parent()
        .unwrap_or(&bins)
        .join("bench")
        .join(format!("{stamp}-n{}", args.keys));
    std::fs::create_dir_all(&dir)?;
    let date = Timestamp::now().strftime("%Y-%m-%d %H:%M UTC").to_string();
    let run = Run {
        args,
        bins,
        dir,
        started: Instant::now(),
    };
    let eso_dir = if run.args.runs(Subject::Eso) {
        run.say("external-secrets: finding or building the binary");
        Some(eso::binaries()?)
    } else {
        None
    };

    let floor = match run.args.runs(Subject::Floor) {
        true => Some(floor(&run).await?),
        false => None,
    };
    let keyward = match run.args.runs(Subject::Keyward) {
        true => Some(keyward::run(&run).await?),
        false => None,
    };
    let eso = match &eso_dir {
        Some(eso_dir) => Some(eso::run(&run, eso_dir).await?),
        None => None,
    };

    let report = Report {
        meta: meta(&run, &date, eso_dir.as_deref())?,
        floor,
        keyward,
        eso,
    };
    let markdown = report.markdown();
    let out = run.dir.join("report.md");
    std::fs::write(&out, &markdown)?;
    println!("{markdown}");
    run.say(&format!("done; report in {}", out.display()));
    Ok(())
}

fn meta(run: &Run, date: &str, eso_dir: Option<&Path>) -> anyhow::Result<Meta> {
    let a = &run.args;
    let command = std::iter::once("hack/bench".to_owned())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let mut versions = vec![
        output(Command::new(run.bins.join("keyward")).arg("--version"))
            .unwrap_or_else(|| "keyward ?".into()),
        format!("commit {}", commit().unwrap_or_else(|| "?".into())),
    ];
    if let Ok(dir) = ::keyward::control_plane::binaries()
        && let Some(name) = dir.file_name()
    {
        versions.push(name.to_string_lossy().replace('-', " "));
    }
    if let Some(dir) = eso_dir.and_then(|d| d.file_name()) {
        versions.push(format!(
            "External Secrets Operator {}",
            dir.to_string_lossy()
        ));
    }
    Ok(Meta {
        command,
        date: date.to_owned(),
        machine: machine(),
        versions: versions.join(", "),
        keys: a.keys,
        client_qps: a.client_qps,
        client_burst: a.client_burst,
        concurrency: a.concurrency,
        upstream: format!(
            "upstream latency {} ms, rate limit {} / min",
            a.upstream_latency_ms, a.upstream_rate_limit
        ),
        smoke: a.smoke,
        took: run.started.elapsed().as_secs_f64(),
    })
}

fn output(command: &mut Command) -> Option<String> {
    let out = command.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn commit() -> Option<String> {
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let head = output(Command::new("git").args(["-C", repo, "rev-parse", "--short=12", "HEAD"]))?;
    let dirty = output(Command::new("git").args([
        "-C",
        repo,
        "status",
        "--porcelain",
        "--untracked-files=no",
    ]))
    .is_some_and(|s| !s.is_empty());
    Some(if dirty {
        format!("{head} + local changes")
    } else {
        head
    })
}

/// Cores, memory and CPU model, from /proc.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kib: f64 = m
                .lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some(format!("{:.1} GiB", kib / (1024.0 * 1024.0)))
        })
        .unwrap_or_else(|| "? GiB".into());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            Some(
                c.lines()
                    .find(|l| l.starts_with("model name"))?
                    .split_once(':')?
                    .1
                    .trim()
                    .to_owned(),
            )
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cores} cores, {memory}, {model}")
}
