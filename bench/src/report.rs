//! The figures, and the Markdown they are printed as (ready to paste into
//! BENCHMARKS.md): the command, the machine, the date, the versions, one table per
//! measurement, and each target of issue 11 against what was measured.

use std::{collections::BTreeSet, fmt::Write};

use crate::audit::Tally;

/// Apply → Ready, in seconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Latency {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

impl Latency {
    /// Nearest-rank percentiles.
    pub fn of(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            if samples.is_empty() {
                return 0.0;
            }
            let i = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[i - 1]
        };
        Self {
            p50: rank(0.50),
            p95: rank(0.95),
            p99: rank(0.99),
        }
    }
}

/// N keys applied at once, until all are Ready and the operator is quiet.
#[derive(Clone, Debug)]
pub struct Wave {
    pub keys: usize,
    /// First create → last key Ready, seconds.
    pub took: f64,
    pub latency: Latency,
    pub requests: Tally,
    /// Operator CPU seconds over the wave.
    pub cpu: f64,
    pub apiserver_cpu: f64,
    pub peak_rss: u64,
}

/// A new operator process with N Ready keys.
#[derive(Clone, Debug)]
pub struct Restart {
    pub requests: Tally,
    /// Process start → its last request (watches and Leases aside), seconds.
    pub quiet_after_start: f64,
    /// Its last list → its last request, seconds.
    pub quiet_after_lists: f64,
    pub cpu: f64,
    pub peak_rss: u64,
}

/// Two replicas; the leader is killed.
#[derive(Clone, Debug)]
pub struct Failover {
    /// Kill → the standby holds the Lease, seconds.
    pub takeover: f64,
    /// From the kill until quiet.
    pub requests: Tally,
    /// Takeover → the new leader's last request, seconds.
    pub quiet_after_takeover: f64,
}

#[derive(Clone, Debug)]
pub struct Idle {
    pub seconds: f64,
    pub requests: Tally,
    pub cpu: f64,
}

#[derive(Clone, Debug)]
pub struct Deletion {
    pub keys: usize,
    /// Deletes sent → every key object gone, seconds.
    pub finalizers_released: f64,
    /// Deletes sent → no valid upstream key left, seconds (upstream providers only).
    pub upstream_revoked: Option<f64>,
    pub requests: Tally,
}

/// What reached the emulated upstream during a phase.
#[derive(Clone, Copy, Debug, Default)]
pub struct Upstream {
    pub requests: u64,
    pub too_many_requests: u64,
    /// The busiest second.
    pub peak_per_second: u64,
}

#[derive(Clone, Debug)]
pub struct Rotation {
    pub keys: usize,
    /// Annotations sent → every key Ready at a new revision, seconds.
    pub rotated: f64,
    /// Annotations sent → every previous key revoked (after the overlap), seconds.
    pub old_revoked: f64,
    pub requests: Tally,
    pub upstream: Upstream,
}

/// Keys applied one by one at a steady rate, below what the client rate allows.
#[derive(Clone, Debug)]
pub struct Paced {
    pub keys: usize,
    pub per_second: f64,
    pub latency: Latency,
}

#[derive(Clone, Debug)]
pub struct Keyward {
    pub builtin: Wave,
    pub restart: Restart,
    /// With the builtin keys Ready.
    pub failover: Failover,
    pub idle: Idle,
    pub builtin_deletion: Deletion,
    /// `None` with `--no-tailscale`.
    pub tailscale: Option<Tailscale>,
    /// The highest peak RSS of every keyward process in the run.
    pub peak_rss: u64,
}

/// The phases with Tailscale keys (an upstream key API behind the emulator).
#[derive(Clone, Debug)]
pub struct Tailscale {
    pub wave: Wave,
    pub upstream: Upstream,
    pub paced: Paced,
    pub rotation: Rotation,
    pub deletion: Deletion,
}

#[derive(Clone, Debug)]
pub struct Eso {
    pub wave: Wave,
    pub restart: Restart,
    pub idle: Idle,
    pub deletion: Deletion,
    pub peak_rss: u64,
}

/// How the run was made.
#[derive(Clone, Debug)]
pub struct Meta {
    pub command: String,
    pub date: String,
    pub machine: String,
    pub versions: String,
    pub keys: usize,
    pub client_qps: f64,
    pub client_burst: u32,
    pub concurrency: u16,
    pub upstream: String,
    pub smoke: bool,
    /// The whole run, seconds.
    pub took: f64,
}

pub struct Report {
    pub meta: Meta,
    pub floor: Option<Wave>,
    pub keyward: Option<Keyward>,
    pub eso: Option<Eso>,
}

fn secs(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.2} s")
    } else {
        format!("{s:.1} s")
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 {
        "–".to_owned()
    } else {
        format!("{:.2}×", a / b)
    }
}

fn per_key(count: usize, keys: usize) -> f64 {
    count as f64 / keys.max(1) as f64
}

fn requests_per_key(tally: &Tally, keys: usize) -> String {
    format!(
        "{:.1} ({:.1})",
        per_key(tally.total, keys),
        per_key(tally.writes, keys)
    )
}

fn latency(l: &Latency) -> String {
    format!("{} / {} / {}", secs(l.p50), secs(l.p95), secs(l.p99))
}

fn met(ok: bool) -> &'static str {
    if ok { "yes" } else { "no" }
}

/// One Markdown table under a heading.
struct Table {
    title: String,
    columns: Vec<String>,
    rows: Vec<Vec<String>>,
    note: Option<&'static str>,
}

impl Table {
    fn new(title: impl Into<String>, columns: &[&str]) -> Self {
        Self {
            title: title.into(),
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            rows: Vec::new(),
            note: None,
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn write(self, out: &mut String) {
        if self.rows.is_empty() {
            return;
        }
        let _ = writeln!(out, "#### {}\n", self.title);
        let _ = writeln!(out, "| {} |", self.columns.join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(self.columns.len()));
        for row in self.rows {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        if let Some(note) = self.note {
            let _ = writeln!(out, "\n{note}");
        }
        out.push('\n');
    }
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let m = &self.meta;
        let _ = writeln!(
            out,
            "### {}N = {}: client {} QPS / burst {}, concurrency {}, {}\n",
            if m.smoke { "Smoke run, " } else { "" },
            m.keys,
            m.client_qps,
            m.client_burst,
            m.concurrency,
            m.upstream
        );
        let _ = writeln!(out, "- Command: `{}`", m.command);
        let _ = writeln!(out, "- Date: {}", m.date);
        let _ = writeln!(out, "- Machine: {}", m.machine);
        let _ = writeln!(out, "- Versions: {}", m.versions);
        let _ = writeln!(out, "- The run took {:.1} minutes\n", m.took / 60.0);
        for table in [self.waves(), self.requests_by_kind(), self.restarts()] {
            table.write(&mut out);
        }
        if let Some(k) = &self.keyward {
            failover(k).write(&mut out);
        }
        if let Some(t) = self.keyward.as_ref().and_then(|k| k.tailscale.as_ref()) {
            for table in keyward_only(t) {
                table.write(&mut out);
            }
        }
        for table in [self.deletions(), self.idles(), self.targets()] {
            table.write(&mut out);
        }
        out
    }

    /// keyward's and ESO's figure of one kind, for the subjects that ran.
    fn both<'a, T>(
        &'a self,
        keyward: impl Fn(&'a Keyward) -> &'a T,
        eso: impl Fn(&'a Eso) -> &'a T,
    ) -> Vec<(&'static str, &'a T)> {
        let mut rows = Vec::new();
        if let Some(k) = &self.keyward {
            rows.push(("keyward", keyward(k)));
        }
        if let Some(e) = &self.eso {
            rows.push(("External Secrets Operator", eso(e)));
        }
        rows
    }

    fn waves(&self) -> Table {
        let mut table = Table::new(
            format!("{} keys applied at once", self.meta.keys),
            &[
                "",
                "time to all Ready",
                "× floor",
                "apply → Ready p50 / p95 / p99",
                "API requests per key (writes)",
                "peak requests / s",
                "operator CPU",
                "peak RSS",
                "API server CPU",
            ],
        );
        let floor = self.floor.as_ref().map(|f| f.took);
        let mut waves: Vec<(String, &Wave)> = Vec::new();
        if let Some(f) = &self.floor {
            waves.push(("floor (3 writes per key)".into(), f));
        }
        if let Some(k) = &self.keyward {
            waves.push(("keyward, builtin".into(), &k.builtin));
            if let Some(t) = &k.tailscale {
                waves.push((
                    format!("keyward, tailscale ({})", self.meta.upstream),
                    &t.wave,
                ));
            }
        }
        if let Some(e) = &self.eso {
            waves.push(("External Secrets Operator, Password".into(), &e.wave));
        }
        for (name, w) in waves {
            table.row(vec![
                name,
                secs(w.took),
                floor.map_or("–".to_owned(), |f| ratio(w.took, f)),
                latency(&w.latency),
                requests_per_key(&w.requests, w.keys),
                w.requests.peak_per_second.to_string(),
                secs(w.cpu),
                mib(w.peak_rss),
                secs(w.apiserver_cpu),
            ]);
        }
        if let (Some(k), Some(e)) = (&self.keyward, &self.eso) {
            let (k, e) = (&k.builtin, &e.wave);
            table.row(vec![
                "keyward builtin / ESO".into(),
                ratio(k.took, e.took),
                String::new(),
                ratio(k.latency.p50, e.latency.p50),
                ratio(k.requests.total as f64, e.requests.total as f64),
                ratio(
                    k.requests.peak_per_second as f64,
                    e.requests.peak_per_second as f64,
                ),
                ratio(k.cpu, e.cpu),
                ratio(k.peak_rss as f64, e.peak_rss as f64),
                ratio(k.apiserver_cpu, e.apiserver_cpu),
            ]);
        }
        table
    }

    fn requests_by_kind(&self) -> Table {
        let mut columns: Vec<(&str, &Tally, usize)> = Vec::new();
        if let Some(f) = &self.floor {
            columns.push(("floor", &f.requests, f.keys));
        }
        if let Some(k) = &self.keyward {
            columns.push(("keyward builtin", &k.builtin.requests, k.builtin.keys));
            if let Some(t) = &k.tailscale {
                columns.push(("keyward tailscale", &t.wave.requests, t.wave.keys));
            }
        }
        if let Some(e) = &self.eso {
            columns.push(("ESO", &e.wave.requests, e.wave.keys));
        }
        let mut names = vec!["verb resource"];
        names.extend(columns.iter().map(|c| c.0));
        let mut table = Table::new(
            "API requests per key during the wave, by verb and resource",
            &names,
        );
        let kinds: BTreeSet<&String> = columns.iter().flat_map(|c| c.1.by_kind.keys()).collect();
        for kind in kinds {
            let mut row = vec![kind.clone()];
            row.extend(columns.iter().map(|(_, t, keys)| {
                t.by_kind
                    .get(kind)
                    .map_or(String::new(), |c| format!("{:.2}", per_key(*c, *keys)))
            }));
            table.row(row);
        }
        table
    }

    fn restarts(&self) -> Table {
        let mut table = Table::new(
            format!(
                "Restart with {} Ready keys (keyward: builtin keys; a new process, the old one stopped)",
                self.meta.keys
            ),
            &[
                "",
                "requests",
                "writes",
                "GETs (per key)",
                "time until quiet",
                "after the last list",
                "CPU",
                "peak RSS",
            ],
        );
        for (name, r) in self.both(|k| &k.restart, |e| &e.restart) {
            table.row(vec![
                name.into(),
                r.requests.total.to_string(),
                r.requests.writes.to_string(),
                gets(&r.requests),
                secs(r.quiet_after_start),
                secs(r.quiet_after_lists),
                secs(r.cpu),
                mib(r.peak_rss),
            ]);
        }
        if let (Some(k), Some(e)) = (&self.keyward, &self.eso) {
            let (k, e) = (&k.restart, &e.restart);
            table.row(vec![
                "keyward / ESO".into(),
                ratio(k.requests.total as f64, e.requests.total as f64),
                String::new(),
                String::new(),
                ratio(k.quiet_after_start, e.quiet_after_start),
                String::new(),
                ratio(k.cpu, e.cpu),
                ratio(k.peak_rss as f64, e.peak_rss as f64),
            ]);
        }
        table
    }

    fn deletions(&self) -> Table {
        let mut table = Table::new(
            "Deletion of every key",
            &[
                "",
                "keys",
                "every finalizer released",
                "every upstream key revoked",
                "API requests per key (writes)",
            ],
        );
        let mut rows: Vec<(&str, &Deletion)> = Vec::new();
        if let Some(k) = &self.keyward {
            rows.push(("keyward, builtin", &k.builtin_deletion));
            if let Some(t) = &k.tailscale {
                rows.push(("keyward, tailscale", &t.deletion));
            }
        }
        if let Some(e) = &self.eso {
            rows.push(("External Secrets Operator", &e.deletion));
            table.note = Some(
                "ESO's Secrets are removed by the garbage collector (owner references), not by ESO; its row counts only what ESO itself did.",
            );
        }
        for (name, d) in rows {
            table.row(vec![
                name.into(),
                d.keys.to_string(),
                secs(d.finalizers_released),
                d.upstream_revoked.map_or("–".to_owned(), secs),
                requests_per_key(&d.requests, d.keys),
            ]);
        }
        table
    }

    fn idles(&self) -> Table {
        let mut table = Table::new(
            format!("Idle with {} Ready keys", self.meta.keys),
            &["", "duration", "requests", "of which watches", "CPU"],
        );
        for (name, i) in self.both(|k| &k.idle, |e| &e.idle) {
            let watches: usize = i
                .requests
                .by_kind
                .iter()
                .filter(|(k, _)| k.starts_with("watch "))
                .map(|(_, c)| c)
                .sum();
            table.row(vec![
                name.into(),
                secs(i.seconds),
                i.requests.total.to_string(),
                watches.to_string(),
                secs(i.cpu),
            ]);
        }
        table
    }

    fn targets(&self) -> Table {
        let mut table = Table::new("Targets (issue 11)", &["target", "measured", "met"]);
        let Some(k) = &self.keyward else {
            return table;
        };
        let n = self.meta.keys;
        let mut row = |target: &str, measured: String, ok: Option<bool>| {
            table.row(vec![
                target.into(),
                measured,
                ok.map_or("not measured here", met).into(),
            ]);
        };
        // Judged on the requests whose number grows with N; the few a process makes
        // once (lists, watches, /version, its own namespace) are shown beside.
        let per_key_of = |w: &Wave| {
            let t = &w.requests;
            let n = per_key(t.total - t.per_process, w.keys);
            (n, format!("{n:.2} (+ {} once per process)", t.per_process))
        };
        let (builtin, shown) = per_key_of(&k.builtin);
        row(
            "≤ 4 API requests per builtin key",
            shown,
            Some(builtin <= 4.0),
        );
        if let Some(t) = &k.tailscale {
            let (upstream, shown) = per_key_of(&t.wave);
            row(
                "≤ 5 API requests per upstream key",
                shown,
                Some(upstream <= 5.0),
            );
        }
        if let Some(f) = &self.floor {
            let r = k.builtin.took / f.took;
            row(
                "10,000 keys Ready within 1.3× the floor's time",
                format!("{r:.2}× at {n} keys"),
                (n >= 10_000).then_some(r <= 1.3),
            );
        }
        if let Some(e) = &self.eso {
            let throughput = e.wave.took / k.builtin.took;
            row(
                "≥ 2× ESO's throughput at equal client rate",
                format!("{throughput:.2}×"),
                Some(throughput >= 2.0),
            );
            let memory = k.peak_rss as f64 / e.peak_rss as f64;
            row(
                "≤ ½ ESO's memory",
                format!("{memory:.2}×"),
                Some(memory <= 0.5),
            );
        }
        let r = &k.restart;
        row(
            "restart: 0 writes, 0 per-key reads, quiet within 10 s of the list/watch",
            format!(
                "{} writes, {} GETs of which {} per key, quiet {} after the last list",
                r.requests.writes,
                r.requests.gets,
                r.requests.per_key_gets,
                secs(r.quiet_after_lists)
            ),
            Some(
                r.requests.writes == 0
                    && r.requests.per_key_gets == 0
                    && r.quiet_after_lists <= 10.0,
            ),
        );
        {
            let f = &k.failover;
            let writes = f.requests.writes - writes_to_leases(&f.requests);
            row(
                "failover: 0 writes, 0 per-key reads, quiet within 10 s of the list/watch",
                format!(
                    "{writes} writes besides the Lease, {} GETs of which {} per key, quiet {} after takeover",
                    f.requests.gets,
                    f.requests.per_key_gets,
                    secs(f.quiet_after_takeover)
                ),
                Some(writes == 0 && f.requests.per_key_gets == 0 && f.quiet_after_takeover <= 10.0),
            );
        }
        row(
            "peak RSS ≤ 64 MiB at 10,000 keys",
            format!("{} at {n} keys", mib(k.peak_rss)),
            (n >= 10_000).then_some(k.peak_rss <= 64 * 1024 * 1024),
        );
        if let Some(t) = &k.tailscale {
            let p = &t.paced;
            row(
                "p99 apply → Ready < 2 s at 1,000 keys, 50 ms upstream, client rate not the bottleneck",
                format!(
                    "{} ({} keys at {}/s with {n} present)",
                    secs(p.latency.p99),
                    p.keys,
                    p.per_second
                ),
                (n >= 1_000).then_some(p.latency.p99 < 2.0),
            );
        }
        if let Some(fl) = &self.floor {
            let r = k.builtin.latency.p50 / fl.latency.p50;
            row(
                "at the default client rate (20 / 40), p50 within 1.5× the floor's p50",
                format!("{r:.2}× at {} QPS", self.meta.client_qps),
                (self.meta.client_qps == 20.0).then_some(r <= 1.5),
            );
        }
        table
    }
}

/// GETs, and of them those of one key's objects (see [`Tally::per_key_gets`]).
fn gets(t: &Tally) -> String {
    format!("{} ({})", t.gets, t.per_key_gets)
}

fn writes_to_leases(t: &Tally) -> usize {
    t.by_kind
        .iter()
        .filter(|(k, _)| {
            k.ends_with(" leases") && !k.starts_with("get ") && !k.starts_with("watch ")
        })
        .map(|(_, c)| c)
        .sum()
}

/// The failover: only keyward has it (ESO runs one replica here).
fn failover(k: &Keyward) -> Table {
    let f = &k.failover;
    let mut failover = Table::new(
        format!(
            "Leader failover with {} Ready builtin keys (keyward: two replicas, the leader killed)",
            k.builtin.keys
        ),
        &[
            "takeover",
            "requests",
            "writes besides the Lease",
            "GETs (per key)",
            "Lease requests",
            "quiet after takeover",
        ],
    );
    failover.row(vec![
        secs(f.takeover),
        f.requests.total.to_string(),
        (f.requests.writes - writes_to_leases(&f.requests)).to_string(),
        gets(&f.requests),
        f.requests.leases.to_string(),
        secs(f.quiet_after_takeover),
    ]);
    failover
}

/// The upstream, the rotation wave: figures only keyward's Tailscale keys have.
fn keyward_only(k: &Tailscale) -> [Table; 2] {
    let (t, p) = (&k.upstream, &k.paced);
    let mut upstream = Table::new(
        "Upstream (Tailscale emulator)",
        &[
            "",
            "upstream requests per key",
            "429s",
            "peak upstream rate",
            "apply → Ready p50 / p95 / p99",
        ],
    );
    upstream.row(vec![
        format!("{} keys at once", k.wave.keys),
        format!("{:.2}", per_key(t.requests as usize, k.wave.keys)),
        t.too_many_requests.to_string(),
        format!("{}/s", t.peak_per_second),
        latency(&k.wave.latency),
    ]);
    upstream.row(vec![
        format!(
            "{} keys at {}/s, {} present",
            p.keys, p.per_second, k.wave.keys
        ),
        String::new(),
        String::new(),
        String::new(),
        latency(&p.latency),
    ]);

    let r = &k.rotation;
    let mut rotation = Table::new(
        format!(
            "Rotation wave: all {} keys due at once (`keyward.dev/rotate` bumped on every key)",
            r.keys
        ),
        &[
            "time to rotate all",
            "every old key revoked",
            "API requests per key (writes)",
            "upstream requests per key",
            "peak upstream rate",
            "429s",
        ],
    );
    rotation.row(vec![
        secs(r.rotated),
        secs(r.old_revoked),
        requests_per_key(&r.requests, r.keys),
        format!("{:.2}", per_key(r.upstream.requests as usize, r.keys)),
        format!("{}/s", r.upstream.peak_per_second),
        r.upstream.too_many_requests.to_string(),
    ]);
    [upstream, rotation]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let l = Latency::of((1..=100).map(f64::from).rev().collect());
        assert_eq!((l.p50, l.p95, l.p99), (50.0, 95.0, 99.0));
        let one = Latency::of(vec![3.0]);
        assert_eq!((one.p50, one.p99), (3.0, 3.0));
        assert_eq!(Latency::of(Vec::new()).p99, 0.0);
    }

    #[test]
    fn lease_writes_are_told_apart() {
        let mut t = Tally::default();
        t.by_kind.insert("update leases".into(), 3);
        t.by_kind.insert("get leases".into(), 5);
        t.by_kind.insert("patch authkeys".into(), 1);
        assert_eq!(writes_to_leases(&t), 3);
    }
}
