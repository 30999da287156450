//! A seeded search for what scenario tests miss: keyward's real planner and executor
//! (`keyward::reconciler::execute`) driven against models of the API server and the
//! upstream (`simulation/model.rs`), with a virtual clock, watch caches that lag,
//! operator crashes at any await point (in-flight writes may or may not have gone
//! through), slow and lossy upstream answers, creates that land after their caller
//! gave up, 409s on stale writes, and users editing specs, bumping the rotate
//! annotation, editing and deleting Secrets, revoking keys in a console and deleting
//! resources while all that happens. After every step and at the end:
//!
//! - I1 every live upstream key is referenced by its resource's status (current key,
//!   retiring, or the attempt that may still land);
//! - I2 a deleted resource leaves no live upstream key (unless `Retain`), and, once
//!   garbage is collected, no Secret;
//! - I3 exactly one issuance per trigger: every new revision answers a trigger that
//!   came before its attempt started (no loop, no double issuance);
//! - I4 `Ready` for generation g ⇒ the Secret holds a live key issued for g's shape;
//! - I5 no key value in status, events or errors;
//! - I6, I7 workloads that follow their keys (`simulation/rollout.rs`): one template
//!   annotation per revision, after the Secret changed, before the old key is revoked;
//! - and at the end, every resource settled: Ready for its spec, or gone.
//!
//! Run: `cargo test --test simulation` (CI: `KEYWARD_SIM_SCHEDULES`, default 10,000).
//! A million: `KEYWARD_SIM_SCHEDULES=1000000 cargo test --release --test simulation`.
//! Replay one: `KEYWARD_SIM_SEED=<seed> cargo test --test simulation -- --nocapture`
//! prints its trace. Seeds that ever found a bug are in `REGRESSIONS` and run first.

mod model;
mod rng;
mod rollout;
mod world;

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context as TaskContext, Poll, Waker},
    time::Duration,
};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use keyward::{
    context::Result,
    lifecycle::{self, Note, Timing, Wake},
    providers::{KeyShape, ProviderError},
    resources::{
        AuthKey, AuthKeySpec, DeletionPolicy, KeyDuration, KeyStatus, ProviderKind, ProviderRef,
        RolloutTarget, Rotation, SecretSpec, Tag,
    },
    secret::KEY_ID_ANNOTATION,
};
use kube::ResourceExt;

use model::{ApiServer, Change, Landing, Upstream, UpstreamKey};
use rng::Rng;
use world::{IssuedKeyFacts, Op, Pending, Reply, Shared, SimWorld};

pub const NAMESPACE: &str = "sim";

/// Seeds that found a bug while the simulation was being written; each names what it
/// found. They run before the search in every run.
const REGRESSIONS: &[(u64, &str)] = &[
    (
        3381,
        "a Secret deleted before the cache saw keyward's own write of it was taken as present",
    ),
    (5034, "the same, on another schedule"),
    (
        747,
        "a Retain resource deleted during an issuance let go at once; the create that landed later stayed live",
    ),
    (921, "the same, on another schedule"),
];

/// A watch cache of one operator incarnation.
#[derive(Default)]
pub struct Cache {
    pub keys: BTreeMap<String, AuthKey>,
    pub secrets: BTreeMap<String, Secret>,
    pub workloads: BTreeMap<RolloutTarget, model::Workload>,
    cursor: usize,
}

pub struct Instance {
    pub alive: bool,
    pub incarnation: u64,
    pub cache: Cache,
    /// When each key is due for a reconcile (kube-runtime's queue).
    queue: BTreeMap<String, Timestamp>,
    failures: BTreeMap<String, u32>,
}

/// How often things go wrong, per mille of the operations of that kind.
#[derive(Clone, Copy)]
struct Faults {
    kube: u64,
    upstream: u64,
}

/// Everything the operations see and change.
pub struct Sim {
    pub now: Timestamp,
    pub api: ApiServer,
    pub upstream: Upstream,
    pub rng: Rng,
    pub timing: Timing,
    pub instances: Vec<Instance>,
    ops: BTreeMap<u64, Pending>,
    pub replies: BTreeMap<u64, Reply>,
    next_op: u64,
    pub notes: Vec<(String, Note)>,
    faults: Faults,
    /// A running count of everything that happens (ops, user actions, landings).
    seq: u64,
    /// When each attempt was decided (its status write, or a local mint): the
    /// sequence number and the time.
    attempt_seq: BTreeMap<String, (u64, Timestamp)>,
    values: Vec<String>,
    verbose: bool,
    /// Draws what only rollout schedules do, so that no other schedule changes.
    rollout_rng: Rng,
    rollouts: rollout::Ledger,
}

impl Sim {
    /// Prints a line of the trace when replaying (`verbose`); costs nothing otherwise.
    fn log(&self, line: impl FnOnce() -> String) {
        if self.verbose {
            println!("{} [{}] {}", self.now, self.seq, line());
        }
    }

    pub fn register(&mut self, instance: usize, incarnation: u64, op: Op) -> u64 {
        self.next_op += 1;
        self.seq += 1;
        let id = self.next_op;
        self.log(|| format!("op {id} by #{instance}.{incarnation}: {}", describe(&op)));
        let pending = Pending {
            instance,
            op,
            started: self.now,
            slow_until: None,
        };
        self.ops.insert(id, pending);
        id
    }

    /// A fresh key value, remembered so that no status, event or error may carry it.
    fn value(&mut self) -> String {
        let v = format!("v-{}", self.rng.hex(16));
        self.values.push(v.clone());
        v
    }

    /// The latest a create sent at `started` may land: the issuance contract gives
    /// the planner `started + landing window`; requests go out at most half a
    /// deadline after their attempt was recorded.
    fn latest_landing(&self, started: Timestamp) -> Timestamp {
        let slack = self.timing.issue_deadline + self.timing.issue_deadline / 2;
        lifecycle::after(started, slack.saturating_sub(Duration::from_secs(1)))
    }

    fn landing(&mut self, started: Timestamp, key: UpstreamKey) {
        let latest = self.latest_landing(started);
        let span = latest.duration_since(self.now).as_millis().max(0) as u64;
        let at = lifecycle::after(self.now, Duration::from_millis(self.rng.below(span + 1)));
        self.log(|| format!("create of {} will land at {at}", key.id));
        self.upstream.landings.push(Landing { at, key });
    }

    /// An upstream create that will not answer before the deadline; it may land.
    fn slow(&mut self, id: u64) {
        let p = self.ops[&id].clone();
        let deadline = lifecycle::after(p.started, self.timing.issue_deadline);
        self.ops.get_mut(&id).unwrap().slow_until = Some(deadline);
        if let Op::Issue(request, _) = &p.op
            && self.rng.chance(500)
        {
            let value = self.value();
            let key = self.upstream.mint(request, self.now, false, value);
            self.landing(p.started, key);
        }
        self.log(|| format!("op {id} is slow until {deadline}"));
    }

    /// Carries an operation out against the models and puts its reply in.
    fn complete(&mut self, id: u64) {
        let Some(p) = self.ops.remove(&id) else {
            return;
        };
        self.seq += 1;
        let reply = if p.slow_until.is_some() {
            Reply::Issued(Err(ProviderError::Unavailable(
                "no answer within the issue deadline".into(),
            )))
        } else {
            self.effect(&p, true)
        };
        self.log(|| format!("op {id} done: {}", reply_summary(&reply)));
        self.replies.insert(id, reply);
    }

    /// What an operation does to the models, and what it answers (`answered`: false
    /// when its caller crashed and only the effect, if any, remains).
    fn effect(&mut self, p: &Pending, answered: bool) -> Reply {
        let kube_fault = self.rng.chance(self.faults.kube);
        let up_fault = self.upstream_fault();
        match &p.op {
            Op::ReadKey(name) if !kube_fault => Reply::Key(self.api.keys.get(name).cloned()),
            Op::ReadSecret(name) if !kube_fault => {
                Reply::Secret(self.api.secrets.get(name).cloned())
            }
            Op::Resolve(name) if !kube_fault => Reply::Resolved(name == "local"),
            Op::WriteStatus(name, rv, status) if !kube_fault || self.rng.chance(500) => {
                self.check_no_values(&serde_json::to_string(status).unwrap_or_default(), "status");
                let r = self.api.write_status(name, rv, status);
                if let (Ok(_), Some(a)) = (&r, &status.attempt) {
                    let at = (self.seq, a.started_at.0);
                    self.attempt_seq.entry(a.id.clone()).or_insert(at);
                }
                if kube_fault {
                    Reply::KubeFailed
                } else {
                    Reply::Status(r)
                }
            }
            Op::SetFinalizers(name, rv, f) if !kube_fault || self.rng.chance(500) => {
                let r = self.api.set_finalizers(name, rv, f.clone());
                if kube_fault {
                    Reply::KubeFailed
                } else {
                    Reply::Finalizers(r)
                }
            }
            Op::ApplySecret(secret, expected) if !kube_fault || self.rng.chance(500) => {
                let applied = self.api.apply_secret(secret, expected.as_deref());
                if let Ok(written) = &applied {
                    self.rollouts.secret_written(written);
                }
                match applied {
                    _ if kube_fault => Reply::KubeFailed,
                    Ok(written) => Reply::Applied(Box::new(written)),
                    Err(r) => Reply::Status(Err(r)),
                }
            }
            Op::Annotate(target, annotation, value) => {
                let lands = !kube_fault || self.rng.chance(500);
                if lands {
                    self.rollouts
                        .annotating(&self.api, target, annotation, value);
                }
                let workload = lands
                    .then(|| self.api.annotate(target, annotation, value))
                    .flatten();
                if kube_fault {
                    if answered {
                        self.rollouts.annotate_failed(target, value);
                    }
                    Reply::KubeFailed
                } else {
                    Reply::Workload(workload)
                }
            }
            Op::DeleteSecret(name, uid) if !kube_fault || self.rng.chance(500) => {
                self.api.delete_secret(name, uid);
                if kube_fault {
                    Reply::KubeFailed
                } else {
                    Reply::Unit
                }
            }
            Op::Issue(request, true) => {
                let value = self.value();
                let key = self.upstream.mint(request, self.now, true, value.clone());
                if let Some(a) = request.marker.split('.').nth(1) {
                    let at = (self.seq, self.now);
                    self.attempt_seq.entry(a.to_owned()).or_insert(at);
                }
                let facts = facts(&key);
                self.upstream.land(key);
                Reply::Issued(Ok((facts, value)))
            }
            Op::Issue(request, false) => self.upstream_issue(p, request, up_fault, answered),
            Op::Revoke(id) => match up_fault {
                Some(0) => Reply::Upstream(Err(ProviderError::Unavailable("503".into()))),
                fault => {
                    self.revoking(id);
                    self.upstream.revoke(id);
                    match fault {
                        Some(_) => {
                            Reply::Upstream(Err(ProviderError::Unavailable("answer lost".into())))
                        }
                        None => Reply::Upstream(Ok(())),
                    }
                }
            },
            Op::Inspect(id) if up_fault.is_none() => {
                Reply::Inspected(Ok(match self.upstream.keys.get(id) {
                    Some(k) if !k.revoked => keyward::providers::KeyState::Valid,
                    _ => keyward::providers::KeyState::Revoked,
                }))
            }
            Op::FindOrphans(marker) if up_fault.is_none() => {
                Reply::Orphans(Ok(self.upstream.by_marker(marker)))
            }
            Op::Inspect(_) => Reply::Inspected(Err(ProviderError::Unavailable("503".into()))),
            Op::FindOrphans(_) => Reply::Orphans(Err(ProviderError::Unavailable("503".into()))),
            _ => Reply::KubeFailed,
        }
    }

    /// `None`, or which kind of upstream fault (0: before any effect, 1: after).
    fn upstream_fault(&mut self) -> Option<u64> {
        self.rng
            .chance(self.faults.upstream)
            .then(|| self.rng.below(2))
    }

    fn upstream_issue(
        &mut self,
        p: &Pending,
        request: &IssueRequest,
        fault: Option<u64>,
        answered: bool,
    ) -> Reply {
        let value = self.value();
        let key = self.upstream.mint(request, self.now, false, value.clone());
        let facts = facts(&key);
        if !answered {
            // The caller is gone: the create landed, lands later, or never arrived.
            match self.rng.below(4) {
                0 => self.upstream.land(key),
                1 => self.landing(p.started, key),
                _ => {}
            }
            return Reply::KubeFailed;
        }
        match fault {
            None => {
                self.upstream.land(key);
                Reply::Issued(Ok((facts, value)))
            }
            Some(0) => match self.rng.below(4) {
                0 => Reply::Issued(Err(ProviderError::Refused {
                    reason: "TagNotPermitted",
                    message: "requested tags are invalid or not permitted".into(),
                })),
                _ => Reply::Issued(Err(ProviderError::Unavailable(
                    "429 / 503 before the create".into(),
                ))),
            },
            Some(_) => {
                if self.rng.chance(500) {
                    self.upstream.land(key);
                } else {
                    self.landing(p.started, key);
                }
                Reply::Issued(Err(ProviderError::Unavailable(
                    "502 after the create, or the answer was lost".into(),
                )))
            }
        }
    }

    /// I7 for a key keyward revokes (upstream, or a local key that needs no call).
    pub fn revoking(&self, key_id: &str) {
        self.rollouts.revoking(&self.api, self.now, key_id);
    }

    fn check_no_values(&mut self, text: &str, what: &str) {
        if let Some(v) = self.values.iter().find(|v| text.contains(v.as_str())) {
            panic!("I5: a key value ({v}) appears in {what}: {text}");
        }
    }
}

use keyward::providers::IssueRequest;

fn facts(key: &UpstreamKey) -> IssuedKeyFacts {
    IssuedKeyFacts {
        id: key.id.clone(),
        created_at: key.created,
        expires_at: key.expires,
    }
}

fn describe(op: &Op) -> String {
    match op {
        Op::WriteStatus(name, rv, s) => format!(
            "write status {name}@{rv} (rev {:?}, key {:?}, attempt {:?}, retiring {})",
            s.revision,
            s.key_id,
            s.attempt.as_ref().map(|a| &a.id),
            s.retiring.len()
        ),
        Op::ApplySecret(s, expected) => format!(
            "apply Secret {} over {expected:?} (attempt {:?}, {:?}, revision {:?}, key {:?})",
            s.name_any(),
            s.annotations().get("keyward.dev/attempt"),
            s.annotations().get("keyward.dev/reason"),
            s.annotations().get("keyward.dev/revision"),
            s.annotations().get("keyward.dev/key-id"),
        ),
        Op::Issue(r, local) => format!("issue {} local={local}", r.marker),
        other => format!("{other:?}").chars().take(120).collect(),
    }
}

fn reply_summary(reply: &Reply) -> String {
    match reply {
        Reply::Key(k) => format!("key {:?}", k.as_ref().map(|k| k.resource_version())),
        Reply::Status(r) => format!("status {:?}", r.as_ref().map(|k| k.resource_version())),
        Reply::Finalizers(r) => format!(
            "finalizers {:?}",
            r.as_ref().map(|k| k.as_ref().map(|k| k.resource_version()))
        ),
        Reply::Secret(s) => format!("secret {}", s.is_some()),
        Reply::Applied(_) => "applied".into(),
        Reply::Issued(r) => format!("issued {:?}", r.as_ref().map(|(f, _)| &f.id)),
        other => format!("{other:?}").chars().take(80).collect(),
    }
}

type Task = Pin<Box<dyn Future<Output = Result<Wake>> + Send>>;

/// What the schedule may do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    Complete,
    Deliver,
    Crash,
    Restart,
    User,
    Garbage,
    /// A workload's controller finishes its rollout.
    Rollout,
    Tick,
}

/// Per key resource: what the invariants need to remember.
#[derive(Default)]
struct Ledger {
    uid: String,
    policy: Option<DeletionPolicy>,
    /// Every key it was handed: in its status (current or retiring) or in a Secret
    /// keyward wrote for it. `Retain` keeps these, and only these.
    held: BTreeSet<String>,
    /// Trigger events not yet answered by a revision, by sequence number.
    triggers: Vec<u64>,
}

/// When the key `status` describes is due for renewal at the earliest, by the spec.
fn renewal_due(key: &AuthKey, status: &KeyStatus) -> Option<Timestamp> {
    let (created, expires) = (status.created_at.as_ref()?.0, status.expires_at.as_ref()?.0);
    let lifetime = Duration::try_from(expires.duration_since(created)).unwrap_or_default();
    let rotation = key.spec.rotation.clone().unwrap_or_default();
    let window = lifetime.saturating_sub(lifecycle::renew_before(lifetime, &rotation));
    let earliest = window
        .mul_f64(0.9)
        .max(lifecycle::MIN_RENEWAL_WINDOW.min(lifetime));
    Some(lifecycle::after(
        created,
        earliest.saturating_sub(Duration::from_secs(1)),
    ))
}

struct Schedule {
    sim: Shared,
    tasks: BTreeMap<(usize, String), Task>,
    /// What each operator incarnation remembers of its own writes.
    memos: BTreeMap<(usize, u64), Arc<keyward::reconciler::Memo>>,
    ledgers: BTreeMap<String, Ledger>,
    user_budget: u32,
    crash_budget: u32,
    steps: u64,
}

const START: &str = "2026-03-01T00:00:00Z";

fn spec(rng: &mut Rng, name: &str) -> (AuthKeySpec, Option<String>) {
    let local = rng.chance(400);
    let short = rng.chance(350);
    let (expiry, renew_before) = if short {
        let pairs = [("2m", "100s"), ("3m", "170s"), ("5m", "4m"), ("90s", "70s")];
        let (e, r) = pairs[rng.below(pairs.len() as u64) as usize];
        (Some(KeyDuration::from(e)), Some(KeyDuration::from(r)))
    } else {
        (Some(KeyDuration::from("24h")), None)
    };
    let rotation = Rotation {
        renew_before,
        overlap: Some(KeyDuration::from(rng.pick(&["5s", "20s", "45s"]))),
        inspect_interval: Some(KeyDuration::from("10s")),
        ..Default::default()
    };
    let spec = AuthKeySpec {
        provider_ref: ProviderRef {
            kind: ProviderKind::KeyProvider,
            name: if local { "local" } else { "upstream" }.into(),
        },
        reusable: rng.chance(500),
        ephemeral: false,
        preauthorized: false,
        tags: vec![Tag(rng.pick(&["tag:a", "tag:b"]).to_owned())],
        description: None,
        expiry,
        rotation: Some(rotation),
        secret: SecretSpec {
            name: rng.chance(300).then(|| format!("{name}-secret")),
            key: "TOKEN".into(),
            template: None,
        },
        rollout: Vec::new(),
        deletion_policy: if rng.chance(150) {
            DeletionPolicy::Retain
        } else {
            DeletionPolicy::Revoke
        },
        cached_rotate_request: None,
    };
    let rotate = rng.chance(300).then(|| "from-the-manifest".to_owned());
    (spec, rotate)
}

impl Schedule {
    fn new(seed: u64, verbose: bool) -> Self {
        let mut rng = Rng::new(seed);
        let faults = Faults {
            kube: rng.pick(&[0, 10, 40]),
            upstream: rng.pick(&[0, 60, 200]),
        };
        let instances = (0..1)
            .map(|_| Instance {
                alive: true,
                incarnation: 0,
                cache: Cache::default(),
                queue: BTreeMap::new(),
                failures: BTreeMap::new(),
            })
            .collect();
        let user_budget = rng.below(8) as u32;
        let crash_budget = rng.below(5) as u32;
        let keys = 1 + rng.below(3);
        let mut sim = Sim {
            now: START.parse().unwrap(),
            api: ApiServer::default(),
            upstream: Upstream::default(),
            rng,
            timing: Timing::with_deadline(Duration::from_secs(4)),
            instances,
            ops: BTreeMap::new(),
            replies: BTreeMap::new(),
            next_op: 0,
            notes: Vec::new(),
            faults,
            seq: 0,
            attempt_seq: BTreeMap::new(),
            values: Vec::new(),
            verbose,
            rollout_rng: Rng::new(seed ^ 0x726f_6c6c_6f75_7421),
            rollouts: Default::default(),
        };
        sim.rollouts = rollout::Ledger::setup(&mut sim.rollout_rng, &mut sim.api);
        let mut ledgers = BTreeMap::new();
        for i in 0..keys {
            let name = format!("k{i}");
            let (mut spec, rotate) = spec(&mut sim.rng, &name);
            sim.rollouts.spec(&mut sim.rollout_rng, &mut spec);
            let policy = spec.deletion_policy;
            sim.api.create_key(&name, spec, rotate);
            sim.seq += 1;
            let uid = sim.api.keys[&name].uid().unwrap();
            ledgers.insert(
                name,
                Ledger {
                    uid,
                    policy: Some(policy),
                    held: BTreeSet::new(),
                    triggers: vec![sim.seq],
                },
            );
        }
        Self {
            sim: Arc::new(Mutex::new(sim)),
            tasks: BTreeMap::new(),
            memos: BTreeMap::new(),
            ledgers,
            user_budget,
            crash_budget,
            steps: 0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sim> {
        self.sim.lock().unwrap()
    }

    /// Polls every running reconcile until none moves, starting those that are due.
    fn run_tasks(&mut self) {
        loop {
            self.start_due();
            let mut moved = false;
            let names: Vec<(usize, String)> = self.tasks.keys().cloned().collect();
            for id in names {
                let before = self.lock().next_op;
                let task = self.tasks.get_mut(&id).unwrap();
                let mut cx = TaskContext::from_waker(Waker::noop());
                if let Poll::Ready(result) = task.as_mut().poll(&mut cx) {
                    self.tasks.remove(&id);
                    self.finished(id, result);
                    moved = true;
                } else if self.lock().next_op != before {
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// Starts reconciles that are due, like kube-runtime: one per key at a time,
    /// with the key as the instance's cache has it.
    fn start_due(&mut self) {
        let mut sim = self.lock();
        let now = sim.now;
        let mut starts = Vec::new();
        for (i, inst) in sim.instances.iter_mut().enumerate() {
            if !inst.alive {
                continue;
            }
            let due: Vec<String> = inst
                .queue
                .iter()
                .filter(|(n, at)| **at <= now && !self.tasks.contains_key(&(i, (*n).clone())))
                .map(|(n, _)| n.clone())
                .collect();
            for name in due {
                inst.queue.remove(&name);
                if let Some(key) = inst.cache.keys.get(&name) {
                    starts.push((i, inst.incarnation, key.clone()));
                }
            }
        }
        drop(sim);
        for (i, incarnation, key) in starts {
            let memo = self.memos.entry((i, incarnation)).or_default().clone();
            let world = SimWorld {
                sim: self.sim.clone(),
                instance: i,
                incarnation,
                memo,
            };
            let name = key.name_any();
            self.lock().log(|| {
                format!(
                    "reconcile {name} on #{i} from rv {:?}",
                    key.resource_version()
                )
            });
            let task: Task =
                Box::pin(async move { keyward::reconciler::execute(&world, &key).await });
            self.tasks.insert((i, name), task);
        }
    }

    fn finished(&mut self, (i, name): (usize, String), result: Result<Wake>) {
        let mut sim = self.lock();
        if let Err(e) = &result {
            let text = e.to_string();
            sim.check_no_values(&text, "an error");
        }
        sim.log(|| format!("reconcile {name} on #{i} ended: {result:?}"));
        let now = sim.now;
        let inst = &mut sim.instances[i];
        let due = match result {
            Ok(Wake::Never) => {
                inst.failures.remove(&name);
                None
            }
            Ok(Wake::At(at)) => {
                inst.failures.remove(&name);
                Some(at.max(lifecycle::after(now, Duration::from_millis(200))))
            }
            Ok(Wake::Retry) | Err(_) => {
                let n = inst.failures.entry(name.clone()).or_insert(0);
                *n += 1;
                Some(lifecycle::after(now, lifecycle::backoff_after(*n)))
            }
        };
        if let Some(due) = due {
            let entry = inst.queue.entry(name).or_insert(due);
            *entry = (*entry).min(due);
        }
    }

    fn candidates(&self, calm: bool) -> Vec<(Event, u64)> {
        let sim = self.lock();
        let now = sim.now;
        let mut c = Vec::new();
        if sim
            .ops
            .values()
            .any(|p| p.slow_until.is_none_or(|t| t <= now))
        {
            c.push((Event::Complete, 40));
        }
        if sim
            .instances
            .iter()
            .any(|i| i.alive && i.cache.cursor < sim.api.log.len())
        {
            c.push((Event::Deliver, if calm { 40 } else { 25 }));
        }
        if sim.instances.iter().any(|i| !i.alive) {
            c.push((Event::Restart, 10));
        }
        if !calm && self.crash_budget > 0 {
            c.push((Event::Crash, 2));
        }
        if !calm && self.user_budget > 0 {
            c.push((Event::User, 4));
        }
        if has_garbage(&sim.api) {
            c.push((Event::Garbage, 5));
        }
        if sim.api.workloads.values().any(rolling) {
            c.push((Event::Rollout, 6));
        }
        c.push((Event::Tick, if c.is_empty() { 1 } else { 3 }));
        c
    }

    fn step(&mut self, calm: bool) -> bool {
        self.run_tasks();
        self.check_step();
        let candidates = self.candidates(calm);
        let weights: Vec<u64> = candidates.iter().map(|(_, w)| *w).collect();
        let event = candidates[self.lock().rng.weighted(&weights)].0;
        self.steps += 1;
        match event {
            Event::Complete => self.complete_one(),
            Event::Deliver => self.deliver_one(),
            Event::Crash => self.crash(),
            Event::Restart => self.restart(),
            Event::User => self.user_action(),
            Event::Rollout => self.finish_rollout(),
            Event::Garbage => {
                let mut sim = self.lock();
                sim.seq += 1;
                sim.log(|| "garbage collector".into());
                sim.api.collect_garbage();
            }
            Event::Tick => return self.tick(calm),
        }
        true
    }

    fn complete_one(&mut self) {
        let mut sim = self.lock();
        let now = sim.now;
        let ready: Vec<u64> = sim
            .ops
            .iter()
            .filter(|(_, p)| p.slow_until.is_none_or(|t| t <= now))
            .map(|(id, _)| *id)
            .collect();
        let id = ready[sim.rng.below(ready.len() as u64) as usize];
        // A slow upstream: the answer waits for the deadline, the create may land.
        let slow = sim.ops[&id].op.upstream()
            && matches!(sim.ops[&id].op, Op::Issue(..))
            && sim.ops[&id].slow_until.is_none()
            && {
                let rate = sim.faults.upstream / 2;
                sim.rng.chance(rate)
            };
        if slow {
            sim.slow(id);
            return;
        }
        // Only a status write can move a revision.
        let writes_status = matches!(sim.ops[&id].op, Op::WriteStatus(..));
        let before: BTreeMap<String, Option<KeyStatus>> = if writes_status {
            sim.api
                .keys
                .iter()
                .map(|(n, k)| (n.clone(), k.status.clone()))
                .collect()
        } else {
            BTreeMap::new()
        };
        sim.complete(id);
        drop(sim);
        if writes_status {
            self.revisions(&before);
        }
    }

    fn finish_rollout(&mut self) {
        let mut sim = self.lock();
        let rolling: Vec<RolloutTarget> = sim
            .api
            .workloads
            .iter()
            .filter(|(_, w)| rolling(w))
            .map(|(t, _)| t.clone())
            .collect();
        let target = rolling[sim.rng.below(rolling.len() as u64) as usize].clone();
        sim.seq += 1;
        sim.log(|| format!("{target} finished its rollout"));
        sim.api.finish_rollout(&target);
        let Sim { rollouts, api, .. } = &mut *sim;
        rollouts.rolled_out(&target, api);
    }

    fn deliver_one(&mut self) {
        let mut sim = self.lock();
        let lagging: Vec<usize> = (0..sim.instances.len())
            .filter(|i| {
                sim.instances[*i].alive && sim.instances[*i].cache.cursor < sim.api.log.len()
            })
            .collect();
        let i = lagging[sim.rng.below(lagging.len() as u64) as usize];
        let now = sim.now;
        let change = sim.api.log[sim.instances[i].cache.cursor].clone();
        let inst = &mut sim.instances[i];
        inst.cache.cursor += 1;
        let owners = match change {
            Change::Key(name, object) => {
                match object {
                    Some(mut k) => {
                        // Cached as keyward's own watch caches it.
                        keyward::reconciler::cut_key(&mut *k);
                        inst.cache.keys.insert(name.clone(), *k)
                    }
                    None => inst.cache.keys.remove(&name),
                };
                vec![name]
            }
            Change::Workload(target, object) => {
                match object {
                    Some(w) => inst.cache.workloads.insert(target.clone(), *w),
                    None => inst.cache.workloads.remove(&target),
                };
                let keys = inst.cache.keys.values();
                keys.filter(|k| k.spec.rollout.contains(&target))
                    .map(|k| k.name_any())
                    .collect()
            }
            Change::Secret(name, object) => {
                let owner = object
                    .as_deref()
                    .or(inst.cache.secrets.get(&name))
                    .and_then(|s| s.owner_references().first().map(|o| o.name.clone()));
                match object {
                    Some(s) => inst.cache.secrets.insert(name, *s),
                    None => inst.cache.secrets.remove(&name),
                };
                owner.into_iter().collect()
            }
        };
        for name in owners {
            inst.queue.insert(name, now);
        }
    }

    /// The operator dies: reconciles stop wherever they were; writes in flight may or
    /// may not have reached the API server, creates in flight may still land.
    fn crash(&mut self) {
        self.crash_budget -= 1;
        let mut sim = self.lock();
        let i = 0;
        sim.seq += 1;
        sim.log(|| format!("CRASH #{i}"));
        let orphaned: Vec<u64> = sim
            .ops
            .iter()
            .filter(|(_, p)| p.instance == i)
            .map(|(id, _)| *id)
            .collect();
        for id in orphaned {
            let p = sim.ops.remove(&id).unwrap();
            if (p.op.kube_write() || p.op.upstream()) && sim.rng.chance(500) {
                sim.effect(&p, false);
            }
        }
        let inst = &mut sim.instances[i];
        inst.alive = false;
        inst.incarnation += 1;
        inst.cache = Cache::default();
        inst.queue.clear();
        inst.failures.clear();
        drop(sim);
        self.tasks.retain(|(instance, _), _| *instance != i);
    }

    /// A new incarnation lists everything and queues every key.
    fn restart(&mut self) {
        let mut sim = self.lock();
        let now = sim.now;
        let keys = sim.api.keys.clone();
        let secrets = sim.api.secrets.clone();
        let workloads = sim.api.workloads.clone();
        let cursor = sim.api.log.len();
        let Some(inst) = sim.instances.iter_mut().find(|i| !i.alive) else {
            return;
        };
        inst.alive = true;
        inst.queue = keys.keys().map(|k| (k.clone(), now)).collect();
        inst.cache = Cache {
            keys,
            secrets,
            workloads,
            cursor,
        };
        sim.seq += 1;
        sim.log(|| "RESTART".into());
    }

    /// Moves the clock: to the next thing due, or a little.
    fn tick(&mut self, calm: bool) -> bool {
        let mut sim = self.lock();
        let now = sim.now;
        let next = sim
            .instances
            .iter()
            .filter(|i| i.alive)
            .flat_map(|i| i.queue.values().copied())
            .chain(sim.ops.values().filter_map(|p| p.slow_until))
            .chain(sim.upstream.landings.iter().map(|l| l.at))
            .filter(|t| *t > now)
            .min();
        let idle = sim.ops.is_empty() && self.tasks.is_empty();
        let to = match next {
            Some(t) if calm || sim.rng.chance(700) => t,
            _ if idle && calm => return false,
            _ => lifecycle::after(now, Duration::from_millis(100 + sim.rng.below(3000))),
        };
        // The executor gives up on a create at its deadline: the clock stops there
        // for every create still waiting, which then answers with the deadline
        // error (and may still land).
        let deadline = sim.timing.issue_deadline;
        let cut = sim
            .ops
            .values()
            .filter(|p| matches!(p.op, Op::Issue(_, false)) && p.slow_until.is_none())
            .map(|p| lifecycle::after(p.started, deadline))
            .min();
        let to = cut.map_or(to, |cut| to.min(cut.max(now)));
        sim.now = to;
        sim.seq += 1;
        let timed_out: Vec<u64> = sim
            .ops
            .iter()
            .filter(|(_, p)| {
                matches!(p.op, Op::Issue(_, false))
                    && p.slow_until.is_none()
                    && lifecycle::after(p.started, deadline) <= to
            })
            .map(|(id, _)| *id)
            .collect();
        for id in timed_out {
            sim.slow(id);
        }
        if sim.upstream.land_due(to) {
            sim.log(|| "late creates landed".into());
        }
        true
    }

    fn user_action(&mut self) {
        self.user_budget -= 1;
        let mut sim = self.lock();
        if !sim.api.workloads.is_empty() && sim.rollout_rng.chance(250) {
            sim.seq += 1;
            return workload_action(&mut sim);
        }
        let names: Vec<String> = sim.api.keys.keys().cloned().collect();
        if names.is_empty() {
            return;
        }
        let name = names[sim.rng.below(names.len() as u64) as usize].clone();
        let now = sim.now;
        sim.seq += 1;
        let seq = sim.seq;
        let kind = sim.rng.below(8);
        let secret = sim.api.keys[&name]
            .status
            .as_ref()
            .and_then(|s| s.secret_name.clone());
        let trigger = match kind {
            0 => {
                let tag = format!("tag:{}", sim.rng.hex(2));
                sim.api.edit_spec(&name, |s| s.tags = vec![Tag(tag)])
            }
            1 => {
                let new_name = format!("{name}-moved-{}", sim.rng.hex(2));
                sim.api.edit_spec(&name, |s| s.secret.name = Some(new_name))
            }
            2 => {
                // Not a shape change: must not rotate.
                sim.api.edit_spec(&name, |s| {
                    s.rotation.get_or_insert_default().overlap = Some(KeyDuration::from("30s"))
                });
                false
            }
            3 => {
                let value = sim.rng.hex(6);
                sim.api.set_rotate(&name, value);
                true
            }
            4 => secret.is_some_and(|s| sim.api.tamper_secret(&s)),
            5 => secret.is_some_and(|s| sim.api.remove_secret(&s)),
            6 => {
                let current = sim.api.keys[&name]
                    .status
                    .as_ref()
                    .and_then(|s| s.key_id.clone());
                match current.and_then(|id| sim.upstream.keys.get_mut(&id)) {
                    Some(k) if !k.local && !k.revoked => {
                        k.revoked = true;
                        k.revoked_out_of_band = true;
                        true
                    }
                    _ => false,
                }
            }
            _ => {
                sim.api.delete_key(&name, now);
                false
            }
        };
        sim.log(|| format!("USER action {kind} on {name} (trigger: {trigger})"));
        if trigger && (kind == 4 || kind == 5) {
            sim.rollouts.tampered.insert(name.clone());
        }
        drop(sim);
        if trigger && let Some(l) = self.ledgers.get_mut(&name) {
            l.triggers.push(seq);
        }
    }

    /// I3: each new revision of a key answers a trigger that came before its attempt
    /// was decided: an event (creation, a shaping edit, a rotate request, a Secret
    /// edit or delete, a console revocation), or the previous key's renewal being due
    /// (at the earliest the spec allows: nine tenths of the window after issuance,
    /// and never sooner than the minimum window).
    fn revisions(&mut self, before: &BTreeMap<String, Option<KeyStatus>>) {
        let sim = self.sim.lock().unwrap();
        for (name, key) in &sim.api.keys {
            let revision = key.status.as_ref().and_then(|s| s.revision).unwrap_or(0);
            let previous = before.get(name).cloned().flatten().unwrap_or_default();
            if revision <= previous.revision.unwrap_or(0) {
                continue;
            }
            let ledger = self.ledgers.get_mut(name).expect("a ledger per key");
            let status = key.status.as_ref().unwrap();
            // The attempt that minted the key now in status.
            let attempt = status
                .key_id
                .as_ref()
                .and_then(|id| sim.upstream.keys.get(id))
                .and_then(|k| k.marker.split('.').nth(1).map(str::to_owned));
            let (decided, decided_at) = attempt
                .and_then(|a| sim.attempt_seq.get(&a).copied())
                .unwrap_or((sim.seq, sim.now));
            let by_event = ledger.triggers.iter().any(|t| *t < decided);
            let due = renewal_due(key, &previous);
            let by_renewal = due.is_some_and(|due| decided_at >= due);
            assert!(
                by_event || by_renewal,
                "I3: {name} reached revision {revision} without a trigger before its attempt \
                 (events {:?}, attempt decided at {decided} / {decided_at}, renewal of the \
                 previous key due {due:?})",
                ledger.triggers,
            );
            ledger.triggers.retain(|t| *t >= decided);
        }
    }

    /// I1, I2, I4 after every step.
    fn check_step(&mut self) {
        let shared = self.sim.clone();
        let sim = shared.lock().unwrap();
        for key in sim.api.keys.values() {
            let Some(ledger) = self.ledgers.get_mut(&key.name_any()) else {
                continue;
            };
            let s = key.status.clone().unwrap_or_default();
            ledger.held.extend(s.key_id);
            ledger.held.extend(s.retiring.into_iter().map(|r| r.key_id));
            ledger
                .held
                .extend(sim.api.owned_secrets(&ledger.uid).iter().filter_map(|n| {
                    sim.api.secrets[n]
                        .annotations()
                        .get(KEY_ID_ANNOTATION)
                        .cloned()
                }));
        }
        for key in sim.upstream.keys.values().filter(|k| k.live()) {
            let owner = sim
                .api
                .keys
                .values()
                .find(|k| marker_prefix(&k.uid().unwrap_or_default()) == key.owner_prefix());
            let ledger = self
                .ledgers
                .values()
                .find(|l| marker_prefix(&l.uid) == key.owner_prefix());
            let retained = ledger.is_some_and(|l| l.policy == Some(DeletionPolicy::Retain));
            let handed_out = ledger.is_some_and(|l| l.held.contains(&key.id));
            match owner {
                None if retained && handed_out => {}
                None if retained => panic!(
                    "I2: upstream key {} ({}) of a deleted Retain resource is live, but it was never handed out: Retain keeps the keys a resource held, not what an interrupted issuance left",
                    key.id, key.marker
                ),
                None => panic!("I2: upstream key {} of a deleted resource is live", key.id),
                Some(owner) => {
                    let s = owner.status.clone().unwrap_or_default();
                    let referenced = s.key_id.as_deref() == Some(key.id.as_str())
                        || s.retiring.iter().any(|r| r.key_id == key.id)
                        || s.attempt.as_ref().is_some_and(|a| a.marker == key.marker);
                    let released =
                        owner.metadata.deletion_timestamp.is_some() && retained && handed_out;
                    assert!(
                        referenced || released,
                        "I1: upstream key {} ({}) of {} is live but not in its status {s:?}",
                        key.id,
                        key.marker,
                        owner.name_any()
                    );
                }
            }
        }
        for key in sim.api.keys.values() {
            check_ready(&sim, key);
        }
    }

    /// Every key settled: Ready for its spec with nothing in flight, or gone.
    fn settled(&self) -> bool {
        let sim = self.lock();
        if !sim.ops.is_empty() || !self.tasks.is_empty() || !sim.upstream.landings.is_empty() {
            return false;
        }
        if sim
            .instances
            .iter()
            .any(|i| !i.alive || i.cache.cursor < sim.api.log.len())
        {
            return false;
        }
        if has_garbage(&sim.api) {
            return false;
        }
        sim.api.keys.values().all(|k| is_settled(&sim, k))
    }

    fn check_end(&self) {
        let sim = self.lock();
        for (name, l) in &self.ledgers {
            if !sim.api.keys.contains_key(name) {
                assert!(
                    sim.api.owned_secrets(&l.uid).is_empty(),
                    "I2: deleted {name} left a Secret"
                );
            }
        }
        for key in sim.api.keys.values() {
            let s = key.status.clone().unwrap_or_default();
            let live: Vec<&UpstreamKey> = sim
                .upstream
                .keys
                .values()
                .filter(|u| {
                    u.live() && u.owner_prefix() == marker_prefix(&key.uid().unwrap_or_default())
                })
                .collect();
            assert!(
                live.len() <= 1 + s.retiring.len(),
                "{}: {} live keys for one current and {} retiring",
                key.name_any(),
                live.len(),
                s.retiring.len()
            );
        }
        for (_, note) in &sim.notes {
            let (_, _, message) = note.event();
            if let Some(v) = sim.values.iter().find(|v| message.contains(v.as_str())) {
                panic!("I5: a key value ({v}) appears in an event: {message}");
            }
        }
    }
}

fn marker_prefix(uid: &str) -> String {
    uid.chars().filter(|c| *c != '-').take(8).collect()
}

fn has_garbage(api: &ApiServer) -> bool {
    let owners: BTreeSet<String> = api.keys.values().filter_map(|k| k.uid()).collect();
    api.secrets
        .values()
        .any(|s| model::owner_of(s).is_some_and(|o| !owners.contains(o)))
}

/// What the spec asks the upstream for, to compare with what a key was issued for.
fn asked(key: &AuthKey) -> (KeyShape, Option<Duration>, String) {
    let shape = KeyShape {
        reusable: key.spec.reusable,
        ephemeral: key.spec.ephemeral,
        preauthorized: key.spec.preauthorized,
        tags: key.spec.tags.clone(),
        ..Default::default()
    };
    let secret = key
        .spec
        .secret
        .name
        .clone()
        .unwrap_or_else(|| key.name_any());
    (
        shape,
        key.spec.expiry.as_ref().and_then(|d| d.to_std()),
        secret,
    )
}

/// I4: Ready for the current generation ⇒ the Secret keyward last wrote holds a live
/// key issued for this spec.
fn check_ready(sim: &Sim, key: &AuthKey) {
    let Some(s) = key.status.as_ref() else {
        return;
    };
    let ready = s.is_ready()
        && s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.observed_generation == key.metadata.generation);
    if !ready || key.metadata.deletion_timestamp.is_some() {
        return;
    }
    let (shape, lifetime, secret_name) = asked(key);
    let Some(name) = s.secret_name.as_ref() else {
        panic!("I4: {} is Ready without a Secret name", key.name_any());
    };
    assert_eq!(
        *name,
        secret_name,
        "I4: {} is Ready with a Secret of an older spec",
        key.name_any()
    );
    if sim.api.tampered.get(name).copied().unwrap_or(false) {
        return;
    }
    let value = sim
        .api
        .secrets
        .get(name)
        .and_then(|secret| model::secret_value(secret, "TOKEN"));
    let Some(value) = value else {
        panic!(
            "I4: {} is Ready but its Secret {name} holds no key",
            key.name_any()
        );
    };
    let issued = sim.upstream.by_value(&value).unwrap_or_else(|| {
        panic!(
            "I4: the Secret of {} holds a key nobody issued",
            key.name_any()
        )
    });
    assert!(
        !issued.revoked || issued.revoked_out_of_band,
        "I4: {} is Ready but its Secret holds revoked key {}",
        key.name_any(),
        issued.id
    );
    assert_eq!(
        (&issued.request.shape, issued.request.lifetime),
        (&shape, lifetime),
        "I4: {} is Ready for generation {:?} but holds key {} issued for another spec",
        key.name_any(),
        key.metadata.generation,
        issued.id
    );
}

fn is_settled(sim: &Sim, key: &AuthKey) -> bool {
    let Some(s) = key.status.as_ref() else {
        return false;
    };
    if key.metadata.deletion_timestamp.is_some() || s.attempt.is_some() {
        return false;
    }
    let ready = s.is_ready()
        && s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.observed_generation == key.metadata.generation);
    let rotate_done = key
        .annotations()
        .get(lifecycle::ROTATE_ANNOTATION)
        .is_none_or(|r| s.rotate_request.as_ref() == Some(r));
    let secret_ok = s
        .secret_name
        .as_ref()
        .and_then(|n| sim.api.secrets.get(n))
        .is_some_and(|secret| Some(keyward::secret::secret_hash(secret)) == s.secret_hash);
    let issued_live = s
        .key_id
        .as_ref()
        .and_then(|id| sim.upstream.keys.get(id))
        .is_some_and(|k| !k.revoked);
    ready && rotate_done && secret_ok && issued_live && rollout::annotated(&sim.api, key)
}

/// A user redeploys a workload (a rollout of its own), or creates `ghost`, a target
/// some keys name before it exists.
fn workload_action(sim: &mut Sim) {
    let ghost = rollout::ghost();
    if !sim.api.workloads.contains_key(&ghost) && sim.rollout_rng.chance(400) {
        sim.log(|| format!("USER creates {ghost}"));
        return sim.api.create_workload(&ghost, false);
    }
    let targets: Vec<RolloutTarget> = sim.api.workloads.keys().cloned().collect();
    let target = targets[sim.rollout_rng.below(targets.len() as u64) as usize].clone();
    sim.log(|| format!("USER redeploys {target}"));
    sim.api.redeploy(&target);
}

/// A workload whose controller has a rollout to finish.
fn rolling(w: &model::Workload) -> bool {
    !w.stuck && w.observed < w.generation
}

/// Runs one schedule; panics (with the seed in the message) on a violation.
fn run(seed: u64, verbose: bool) {
    let mut s = Schedule::new(seed, verbose);
    {
        let mut sim = s.lock();
        let now = sim.now;
        let keys = sim.api.keys.clone();
        let cursor = sim.api.log.len();
        let workloads = sim.api.workloads.clone();
        let inst = &mut sim.instances[0];
        inst.queue = keys.keys().map(|k| (k.clone(), now)).collect();
        inst.cache = Cache {
            keys,
            secrets: BTreeMap::new(),
            workloads,
            cursor,
        };
    }
    const CHAOS: u64 = 600;
    const LIMIT: u64 = 20_000;
    while s.steps < CHAOS {
        s.step(false);
    }
    {
        let mut sim = s.lock();
        sim.faults = Faults {
            kube: 0,
            upstream: 0,
        };
        sim.log(|| "CALM".into());
    }
    loop {
        if s.settled() {
            s.check_end();
            return;
        }
        if s.steps >= LIMIT {
            let sim = s.lock();
            let unsettled: Vec<String> = sim
                .api
                .keys
                .values()
                .filter(|k| !is_settled(&sim, k))
                .map(|k| {
                    let s = k.status.clone().unwrap_or_default();
                    let secret = s.secret_name.as_ref().and_then(|n| sim.api.secrets.get(n));
                    format!(
                        "{} {:?}: {:?}; Secret hash {:?}; key {:?}",
                        k.name_any(),
                        k.spec,
                        k.status,
                        secret.map(keyward::secret::secret_hash),
                        s.key_id
                            .as_ref()
                            .and_then(|id| sim.upstream.keys.get(id))
                            .map(|u| (u.revoked, u.revoked_out_of_band))
                    )
                })
                .collect();
            panic!("did not settle within {LIMIT} steps: {unsettled:?}");
        }
        if !s.step(true) && !s.settled() {
            let sim = s.lock();
            let unsettled: Vec<String> = sim
                .api
                .keys
                .values()
                .filter(|k| !is_settled(&sim, k))
                .map(|k| format!("{}: {:?}", k.name_any(), k.status))
                .collect();
            panic!("nothing left to do but not settled: {unsettled:?}");
        }
    }
}

fn run_reporting(seed: u64, verbose: bool) -> std::result::Result<(), String> {
    let result = std::panic::catch_unwind(|| run(seed, verbose));
    result.map_err(|e| {
        let message = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        format!(
            "seed {seed}: {message}\nreplay: KEYWARD_SIM_SEED={seed} cargo test --test simulation -- --nocapture"
        )
    })
}

/// Runs `count` schedules from `first` (and the regression seeds when asked);
/// panics with every failing seed's replay command.
fn search(first: u64, count: u64, regressions: bool) {
    let started = std::time::Instant::now();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    if regressions {
        for (seed, what) in REGRESSIONS {
            if let Err(e) = run_reporting(*seed, false) {
                failures.push(format!("regression ({what}): {e}"));
            }
        }
    }
    for seed in first..first + count {
        if let Err(e) = run_reporting(seed, false) {
            failures.push(e);
            if failures.len() >= 5 {
                break;
            }
        }
    }
    std::panic::set_hook(hook);
    println!(
        "seeds {first}..{}: {count} schedules in {:.1}s",
        first + count,
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} is a number")))
        .unwrap_or(default)
}

/// `KEYWARD_SIM_SEED`: replay that one schedule with its trace.
#[test]
fn replay() {
    if let Ok(seed) = std::env::var("KEYWARD_SIM_SEED") {
        let seed: u64 = seed.parse().expect("KEYWARD_SIM_SEED is a number");
        if let Err(e) = run_reporting(seed, true) {
            panic!("{e}");
        }
    }
}

/// The search, in two halves that run on two threads:
/// `KEYWARD_SIM_SCHEDULES` (default 10,000) from `KEYWARD_SIM_FIRST` (default 0).
#[test]
fn seeded_schedules_keep_every_invariant_first_half() {
    if std::env::var("KEYWARD_SIM_SEED").is_ok() {
        return;
    }
    let (first, count) = (
        env("KEYWARD_SIM_FIRST", 0),
        env("KEYWARD_SIM_SCHEDULES", 10_000),
    );
    search(first, count / 2, true);
}

#[test]
fn seeded_schedules_keep_every_invariant_second_half() {
    if std::env::var("KEYWARD_SIM_SEED").is_ok() {
        return;
    }
    let (first, count) = (
        env("KEYWARD_SIM_FIRST", 0),
        env("KEYWARD_SIM_SCHEDULES", 10_000),
    );
    search(first + count / 2, count - count / 2, false);
}
