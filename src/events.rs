//! Kubernetes Events as series, the way client-go's events library records them: the
//! first occurrence of an event on an object creates an Event; the same event again
//! (same object, type, reason and message) within six minutes of the last is the
//! same Event, its `series` counting the repeats, not one new object each.
//!
//! Written here rather than with kube-runtime's `Recorder`, which aggregates by reason
//! alone — a second `Rotated` event within six minutes would be counted on the first
//! and keep the first's message, naming the previous key — and keeps every Event it
//! sent in memory. What is kept here is one small entry per series, dropped once the
//! series has been quiet for six minutes. A repeat is one patch of the count: keyward
//! publishes an event only with the status write that records what happened, so
//! repeats come at the pace of status writes (a failing issuance backs off to one
//! every five minutes), and client-go's 30-minute heartbeat that would batch them is
//! not needed.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    sync::Mutex,
};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

/// How long a series stays open without a repeat (client-go's isolation window).
const ISOLATION: SignedDuration = SignedDuration::from_mins(6);

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

fn digest(regarding: &ObjectReference, event: &Occurrence) -> u64 {
    let mut h = DefaultHasher::new();
    (
        &regarding.uid,
        &regarding.namespace,
        &regarding.name,
        &regarding.kind,
        event,
    )
        .hash(&mut h);
    h.finish()
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
        if self
            .pruned
            .is_none_or(|at| now.duration_since(at) > SignedDuration::from_mins(1))
        {
            self.open
                .retain(|_, s| now.duration_since(s.last) < ISOLATION);
            self.pruned = Some(now);
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
                let object = regarding.name.as_deref().unwrap_or("keyward");
                let name = format!("{object}.{:x}", now.as_nanosecond());
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

/// Publishes events (`events.k8s.io/v1`) as series.
pub struct Recorder {
    client: Client,
    /// `reportingController`, and `reportingInstance` (the pod, when known).
    controller: String,
    instance: String,
    series: Mutex<Series>,
}

impl Recorder {
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        Self {
            client,
            controller: controller.to_owned(),
            instance: instance.unwrap_or_else(|| controller.to_owned()),
            series: Mutex::default(),
        }
    }

    /// Publishes `event` about `regarding`: a new Event, or the count of the series it
    /// repeats.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        event: &Occurrence<'_>,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let send = self
            .series
            .lock()
            .expect("event series lock")
            .observe(regarding, event, now);
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let events: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        let name = match send {
            Publish::Create(name) => name,
            Publish::Repeat { name, count } => {
                let series =
                    json!({"series": {"count": count, "lastObservedTime": MicroTime(now)}});
                match events
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&series))
                    .await
                {
                    Err(kube::Error::Api(s)) if s.code == 404 => {
                        let mut open = self.series.lock().expect("event series lock");
                        open.close(regarding, event);
                        match open.observe(regarding, event, now) {
                            Publish::Create(name) => name,
                            Publish::Repeat { .. } => unreachable!("the series was just closed"),
                        }
                    }
                    other => return other.map(drop),
                }
            }
        };
        let object = Event {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(namespace.to_owned()),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(if event.warning { "Warning" } else { "Normal" }.to_owned()),
            reason: Some(event.reason.to_owned()),
            action: Some(event.reason.to_owned()),
            note: Some(event.note.to_owned()),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        };
        let created = events.create(&PostParams::default(), &object).await;
        if created.is_err() {
            // Not sent: the next occurrence tries a new Event again.
            self.series
                .lock()
                .expect("event series lock")
                .close(regarding, event);
        }
        created.map(drop)
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
}
