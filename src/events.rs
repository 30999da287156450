//! Kubernetes Events as series, the way client-go's events library records them: the
//! first occurrence of an event on an object creates an Event; the same event again
//! (same object, type, reason and message) within six minutes of the last is the
//! same Event, its `series` counting the repeats, not one new object each.
//!
//! A *wave* — many keys doing the same thing through one provider at once, as when a
//! thousand keys are applied together or come due in the same minute — is folded the
//! same way across objects: each provider and reason has a budget of Events of their
//! own (a burst of [`WAVE_BURST`], then one every [`WAVE_REFILL`], client-go's spam
//! filter shape); beyond it a Normal event is counted in the series of one Event
//! regarding the provider, sent at most every [`WAVE_FLUSH`] rather than once per key.
//! Warnings are never folded: each stays on its own object, where on-call looks. What
//! a folded key did is in its own status (key id, revision, conditions) either way.
//!
//! Written here rather than with kube-runtime's `Recorder`, which aggregates by reason
//! alone — a second `Rotated` event within six minutes would be counted on the first
//! and keep the first's message, naming the previous key — and keeps every Event it
//! sent in memory. What is kept here is one small entry per series, dropped once the
//! series has been quiet for six minutes. A repeat is one patch of the count: keyward
//! publishes an event only with the status write that records what happened, so
//! repeats come at the pace of status writes (a failing issuance backs off to one
//! every five minutes), and client-go's 30-minute heartbeat that would batch them is
//! not needed. A wave's count not yet sent when the process stops is lost (Events are
//! best effort; status is the record).

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    sync::{Arc, Mutex},
    time::Duration,
};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    api::{
        core::v1::ObjectReference,
        events::v1::{Event, EventSeries},
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

/// How long a series stays open without a repeat (client-go's isolation window).
const ISOLATION: SignedDuration = SignedDuration::from_mins(6);

/// Events of their own a provider's wave may have at once, for one reason.
pub const WAVE_BURST: u32 = 10;
/// One more Event of its own per this long.
pub const WAVE_REFILL: SignedDuration = SignedDuration::from_secs(6);
/// A wave's count is sent at most this often.
pub const WAVE_FLUSH: Duration = Duration::from_secs(10);

/// One event, as keyward publishes it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Occurrence<'a> {
    pub warning: bool,
    pub reason: &'a str,
    pub note: &'a str,
}

/// What to send for an occurrence.
#[derive(Debug, PartialEq, Eq)]
enum Publish {
    /// A new Event of this name.
    Create(String),
    /// The Event of this name happened again: its series now counts `count`.
    Repeat { name: String, count: i32 },
}

#[derive(Debug)]
struct Open {
    name: String,
    count: i32,
    last: Timestamp,
}

/// The open series, by a digest of what makes two events the same.
#[derive(Debug, Default)]
struct Series {
    open: HashMap<u64, Open>,
    pruned: Option<Timestamp>,
}

/// A digest of the object and of `what` about it.
fn digest(regarding: &ObjectReference, what: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    (
        &regarding.uid,
        &regarding.namespace,
        &regarding.name,
        &regarding.kind,
        what,
    )
        .hash(&mut h);
    h.finish()
}

/// A new Event's name: its object's, made unique by the time.
fn event_name(regarding: &ObjectReference, now: Timestamp) -> String {
    let object = regarding.name.as_deref().unwrap_or("keyward");
    format!("{object}.{:x}", now.as_nanosecond())
}

/// Whether the once-a-minute pruning of closed entries is due (then it is done now).
fn prune_due(pruned: &mut Option<Timestamp>, now: Timestamp) -> bool {
    let due = pruned.is_none_or(|at| now.duration_since(at) > SignedDuration::from_mins(1));
    if due {
        *pruned = Some(now);
    }
    due
}

impl Series {
    /// Records an occurrence at `now` and says what to send.
    fn observe(
        &mut self,
        regarding: &ObjectReference,
        event: &Occurrence,
        now: Timestamp,
    ) -> Publish {
        // Closed series go at most once a minute, not on every event.
        if prune_due(&mut self.pruned, now) {
            self.open
                .retain(|_, s| now.duration_since(s.last) < ISOLATION);
        }
        let key = digest(regarding, event);
        match self.open.get_mut(&key) {
            Some(s) if now.duration_since(s.last) < ISOLATION => {
                s.count += 1;
                s.last = now;
                Publish::Repeat {
                    name: s.name.clone(),
                    count: s.count,
                }
            }
            _ => {
                let name = event_name(regarding, now);
                self.open.insert(
                    key,
                    Open {
                        name: name.clone(),
                        count: 1,
                        last: now,
                    },
                );
                Publish::Create(name)
            }
        }
    }

    /// The Event of a series is gone (Events expire, an hour by default): the next
    /// occurrence starts a new one.
    fn close(&mut self, regarding: &ObjectReference, event: &Occurrence) {
        self.open.remove(&digest(regarding, event));
    }
}

/// A provider's wave for one reason: its budget of Events of their own, and the
/// Event its folded occurrences are counted on.
#[derive(Debug)]
struct Wave {
    tokens: f64,
    refilled: Timestamp,
    /// Occurrences folded into the current wave Event, and how many of them the API
    /// server has been told of.
    folded: i32,
    sent: i32,
    /// The wave Event, once created, and its last fold.
    name: Option<String>,
    last: Timestamp,
    /// A flush is scheduled.
    flushing: bool,
}

/// What to do with an occurrence that may belong to a wave.
#[derive(Debug, PartialEq, Eq)]
enum Admit {
    /// An Event of its own.
    Own,
    /// Counted on the wave Event; `flush` says a flush must be scheduled.
    Fold { flush: bool },
}

/// What a flush sends.
#[derive(Debug, PartialEq, Eq)]
enum Flush {
    Nothing,
    Create { name: String, count: i32 },
    Repeat { name: String, count: i32 },
}

#[derive(Debug, Default)]
struct Waves {
    open: HashMap<u64, Wave>,
    pruned: Option<Timestamp>,
}

impl Waves {
    /// Takes a token for an Event of its own, or folds the occurrence.
    fn admit(&mut self, key: u64, now: Timestamp) -> Admit {
        if prune_due(&mut self.pruned, now) {
            self.open.retain(|_, w| {
                w.flushing || w.folded > w.sent || now.duration_since(w.last) < ISOLATION
            });
        }
        let w = self.open.entry(key).or_insert_with(|| Wave {
            tokens: f64::from(WAVE_BURST),
            refilled: now,
            folded: 0,
            sent: 0,
            name: None,
            last: now,
            flushing: false,
        });
        let refill = now.duration_since(w.refilled).as_secs_f64() / WAVE_REFILL.as_secs_f64();
        w.tokens = (w.tokens + refill.max(0.0)).min(f64::from(WAVE_BURST));
        w.refilled = now;
        if w.tokens >= 1.0 {
            w.tokens -= 1.0;
            return Admit::Own;
        }
        if now.duration_since(w.last) >= ISOLATION && !w.flushing {
            // The last wave Event's series is closed: this fold starts a new one.
            w.name = None;
            w.folded = 0;
            w.sent = 0;
        }
        w.folded += 1;
        w.last = now;
        let flush = !w.flushing;
        w.flushing = true;
        Admit::Fold { flush }
    }

    /// What a scheduled flush sends now; the flush is over once this says `Nothing`.
    fn flush(&mut self, key: u64, provider: &ObjectReference, now: Timestamp) -> Flush {
        let Some(w) = self.open.get_mut(&key) else {
            return Flush::Nothing;
        };
        if w.folded == w.sent {
            w.flushing = false;
            return Flush::Nothing;
        }
        w.sent = w.folded;
        match &w.name {
            Some(name) => Flush::Repeat {
                name: name.clone(),
                count: w.folded,
            },
            None => {
                let name = event_name(provider, now);
                w.name = Some(name.clone());
                Flush::Create {
                    name,
                    count: w.folded,
                }
            }
        }
    }

    /// The wave Event could not be written: the next flush creates a new one with
    /// the whole count; `stop` ends the flushes until the next fold.
    fn lost(&mut self, key: u64, stop: bool) {
        if let Some(w) = self.open.get_mut(&key) {
            w.name = None;
            w.sent = 0;
            w.flushing &= !stop;
        }
    }
}

/// Writes Events for the recorder and its wave flushes.
#[derive(Clone)]
struct Sender {
    client: Client,
    /// `reportingController`, and `reportingInstance` (the pod, when known).
    controller: String,
    instance: String,
}

/// The namespace an Event about `regarding` lives in: the object's, or `default` for a
/// cluster-scoped one (what the API server requires of an Event with an eventTime).
fn namespace_of(regarding: &ObjectReference) -> &str {
    regarding.namespace.as_deref().unwrap_or("default")
}

impl Sender {
    fn api(&self, regarding: &ObjectReference) -> Api<Event> {
        Api::namespaced(self.client.clone(), namespace_of(regarding))
    }

    /// Creates the Event `name`; a `count` of 2 or more starts it as a series.
    async fn create(
        &self,
        name: String,
        regarding: &ObjectReference,
        event: &Occurrence<'_>,
        count: i32,
        now: Timestamp,
    ) -> Result<(), kube::Error> {
        let object = Event {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(namespace_of(regarding).to_owned()),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            series: (count >= 2).then_some(EventSeries {
                count,
                last_observed_time: MicroTime(now),
            }),
            type_: Some(if event.warning { "Warning" } else { "Normal" }.to_owned()),
            reason: Some(event.reason.to_owned()),
            action: Some(event.reason.to_owned()),
            note: Some(event.note.to_owned()),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        };
        self.api(regarding)
            .create(&PostParams::default(), &object)
            .await
            .map(drop)
    }

    /// Sets the series count of the Event `name`.
    async fn repeat(
        &self,
        name: &str,
        regarding: &ObjectReference,
        count: i32,
        now: Timestamp,
    ) -> Result<(), kube::Error> {
        let series = json!({"series": {"count": count, "lastObservedTime": MicroTime(now)}});
        self.api(regarding)
            .patch(name, &PatchParams::default(), &Patch::Merge(&series))
            .await
            .map(drop)
    }
}

/// The provider a wave of an event is counted on, and the Event's note there.
pub struct WaveOf<'a> {
    pub provider: &'a ObjectReference,
    pub note: &'a str,
}

/// Publishes events (`events.k8s.io/v1`) as series.
pub struct Recorder {
    sender: Sender,
    series: Mutex<Series>,
    waves: Arc<Mutex<Waves>>,
}

impl Recorder {
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        Self {
            sender: Sender {
                client,
                controller: controller.to_owned(),
                instance: instance.unwrap_or_else(|| controller.to_owned()),
            },
            series: Mutex::default(),
            waves: Arc::default(),
        }
    }

    /// Publishes `event` about `regarding`: a new Event, or the count of the series it
    /// repeats; or, for a Normal event with a `wave` beyond its provider's budget, a
    /// count on the wave's Event (sent within [`WAVE_FLUSH`]).
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        event: &Occurrence<'_>,
        wave: Option<WaveOf<'_>>,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        if let Some(wave) = wave.filter(|_| !event.warning) {
            // A wave is one provider's, one reason's, whatever the message.
            let key = digest(wave.provider, event.reason);
            let admit = self.waves.lock().expect("wave lock").admit(key, now);
            match admit {
                Admit::Own => {}
                Admit::Fold { flush: false } => return Ok(()),
                Admit::Fold { flush: true } => {
                    self.schedule_flush(key, wave, event);
                    return Ok(());
                }
            }
        }
        let send = self
            .series
            .lock()
            .expect("event series lock")
            .observe(regarding, event, now);
        let name = match send {
            Publish::Create(name) => name,
            Publish::Repeat { name, count } => {
                match self.sender.repeat(&name, regarding, count, now).await {
                    Err(kube::Error::Api(s)) if s.code == 404 => {
                        let mut open = self.series.lock().expect("event series lock");
                        open.close(regarding, event);
                        match open.observe(regarding, event, now) {
                            Publish::Create(name) => name,
                            Publish::Repeat { .. } => unreachable!("the series was just closed"),
                        }
                    }
                    other => return other,
                }
            }
        };
        let created = self.sender.create(name, regarding, event, 1, now).await;
        if created.is_err() {
            // Not sent: the next occurrence tries a new Event again.
            self.series
                .lock()
                .expect("event series lock")
                .close(regarding, event);
        }
        created
    }

    /// Sends a wave's count every [`WAVE_FLUSH`] until nothing more was folded.
    fn schedule_flush(&self, key: u64, wave: WaveOf<'_>, event: &Occurrence<'_>) {
        let (sender, waves) = (self.sender.clone(), self.waves.clone());
        let provider = wave.provider.clone();
        let (reason, note) = (event.reason.to_owned(), wave.note.to_owned());
        tokio::spawn(async move {
            let event = Occurrence {
                warning: false,
                reason: &reason,
                note: &note,
            };
            loop {
                tokio::time::sleep(WAVE_FLUSH).await;
                let now = Timestamp::now();
                let flush = waves.lock().expect("wave lock").flush(key, &provider, now);
                let sent = match flush {
                    Flush::Nothing => return,
                    Flush::Create { name, count } => {
                        sender.create(name, &provider, &event, count, now).await
                    }
                    Flush::Repeat { name, count } => {
                        sender.repeat(&name, &provider, count, now).await
                    }
                };
                match sent {
                    Ok(()) => {}
                    // The Event expired: a new one with the whole count, next flush.
                    Err(kube::Error::Api(s)) if s.code == 404 => {
                        waves.lock().expect("wave lock").lost(key, false);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, reason = %reason, "could not publish a wave's event");
                        // Retried with the whole count at the wave's next fold.
                        waves.lock().expect("wave lock").lost(key, true);
                        return;
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ObjectReference {
        ObjectReference {
            kind: Some("AuthKey".into()),
            namespace: Some("ns".into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            ..Default::default()
        }
    }

    const FAILED: Occurrence = Occurrence {
        warning: true,
        reason: "IssueFailed",
        note: "issuing a key failed: upstream answered 503",
    };

    #[test]
    fn the_same_event_again_is_counted_on_the_first_until_it_has_been_quiet_for_six_minutes() {
        let mut series = Series::default();
        let t0: Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
        let Publish::Create(name) = series.observe(&key("a"), &FAILED, t0) else {
            panic!("the first occurrence creates an Event")
        };
        for (count, minutes) in [(2, 5), (3, 10), (4, 15)] {
            let at = t0 + SignedDuration::from_mins(minutes);
            assert_eq!(
                series.observe(&key("a"), &FAILED, at),
                Publish::Repeat {
                    name: name.clone(),
                    count
                }
            );
        }
        let quiet = t0 + SignedDuration::from_mins(22);
        assert!(matches!(
            series.observe(&key("a"), &FAILED, quiet),
            Publish::Create(n) if n != name
        ));
    }

    #[test]
    fn another_object_reason_or_message_is_another_event() {
        let mut series = Series::default();
        let t0: Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
        let rotated = |note| Occurrence {
            warning: false,
            reason: "Rotated",
            note,
        };
        let mut created = 0;
        for (object, event) in [
            ("a", FAILED),
            ("b", FAILED),
            ("a", rotated("rotated to key k2")),
            ("a", rotated("rotated to key k3")),
        ] {
            if let Publish::Create(_) = series.observe(&key(object), &event, t0) {
                created += 1;
            }
        }
        assert_eq!(created, 4);
        assert!(matches!(
            series.observe(&key("a"), &rotated("rotated to key k3"), t0),
            Publish::Repeat { count: 2, .. }
        ));
    }

    #[test]
    fn quiet_series_are_forgotten() {
        let mut series = Series::default();
        let t0: Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
        for i in 0..100 {
            series.observe(&key(&format!("k{i}")), &FAILED, t0);
        }
        let later = t0 + SignedDuration::from_mins(7);
        series.observe(&key("other"), &FAILED, later);
        assert_eq!(series.open.len(), 1);
    }

    fn provider() -> ObjectReference {
        ObjectReference {
            kind: Some("ClusterKeyProvider".into()),
            name: Some("builtin".into()),
            uid: Some("uid-p".into()),
            ..Default::default()
        }
    }

    const ISSUED: Occurrence = Occurrence {
        warning: false,
        reason: "Issued",
        note: "issued key k1 into Secret s",
    };

    #[test]
    fn a_wave_has_a_burst_of_events_of_its_own_then_is_counted_on_one_event() {
        let mut waves = Waves::default();
        let key = digest(&provider(), ISSUED.reason);
        let t0: Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
        let admitted: Vec<Admit> = (0..1000).map(|_| waves.admit(key, t0)).collect();
        let own = admitted.iter().filter(|a| **a == Admit::Own).count();
        assert_eq!(own, WAVE_BURST as usize);
        assert_eq!(
            admitted
                .iter()
                .filter(|a| **a == Admit::Fold { flush: true })
                .count(),
            1,
            "one flush is scheduled for the whole wave"
        );
        assert_eq!(
            waves.flush(key, &provider(), t0),
            Flush::Create {
                name: format!("builtin.{:x}", t0.as_nanosecond()),
                count: 990
            }
        );
        assert_eq!(
            waves.flush(key, &provider(), t0),
            Flush::Nothing,
            "all sent"
        );
        // Later folds count on the same Event; the budget refills one per WAVE_REFILL.
        let t1 = t0 + SignedDuration::from_secs(60);
        let later: Vec<Admit> = (0..20).map(|_| waves.admit(key, t1)).collect();
        assert_eq!(later.iter().filter(|a| **a == Admit::Own).count(), 10);
        assert!(matches!(
            waves.flush(key, &provider(), t1),
            Flush::Repeat { count: 1000, .. }
        ));
    }

    #[test]
    fn a_trickle_within_the_refill_rate_keeps_an_event_each() {
        let mut waves = Waves::default();
        let key = digest(&provider(), ISSUED.reason);
        let t0: Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
        for i in 0..100 {
            let at = t0 + WAVE_REFILL * i;
            assert_eq!(waves.admit(key, at), Admit::Own, "occurrence {i}");
        }
    }

    #[test]
    fn a_lost_wave_event_is_created_again_with_the_whole_count() {
        let mut waves = Waves::default();
        let key = digest(&provider(), ISSUED.reason);
        let t0: Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
        for _ in 0..15 {
            waves.admit(key, t0);
        }
        assert!(matches!(
            waves.flush(key, &provider(), t0),
            Flush::Create { count: 5, .. }
        ));
        waves.lost(key, true);
        assert_eq!(waves.admit(key, t0), Admit::Fold { flush: true });
        assert!(matches!(
            waves.flush(key, &provider(), t0),
            Flush::Create { count: 6, .. }
        ));
        // A quiet wave's Event is closed: the next wave starts another.
        assert_eq!(waves.flush(key, &provider(), t0), Flush::Nothing);
        let quiet = t0 + SignedDuration::from_mins(7);
        for _ in 0..WAVE_BURST {
            assert_eq!(waves.admit(key, quiet), Admit::Own);
        }
        assert_eq!(waves.admit(key, quiet), Admit::Fold { flush: true });
        assert!(matches!(
            waves.flush(key, &provider(), quiet),
            Flush::Create { count: 1, .. }
        ));
    }
}
