//! What the suite's own watch saw of the key resources while the run went on: every
//! status written (the value audit searches them all, not only the last), every key
//! id a resource ever held, and which resources had an issuance in flight.
//!
//! A watch can miss a state that lasted less than its gap (the API server restart);
//! it is a record to audit against, not the truth, and is used only where missing a
//! state can make the audit stricter, never laxer.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use keyward::{
    reconciler::ManagedKey,
    resources::{AuthKey, ServiceAccountKey},
    secret::{KEY_ID_ANNOTATION, MANAGED_BY, MANAGED_BY_LABEL},
};
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};

#[derive(Clone, Default)]
pub struct History {
    /// Every status seen, as JSON.
    pub statuses: BTreeSet<String>,
    /// Resource uid → every key id it was handed: in its status (current or retiring)
    /// or in a Secret keyward wrote for it.
    pub held: BTreeMap<String, BTreeSet<String>>,
    /// Resource uid → its name (names are never reused within a run).
    pub names: BTreeMap<String, String>,
    /// Resource uid → each status seen, summed up in a line, for the report of a finding.
    pub timeline: BTreeMap<String, Vec<String>>,
    /// Every attempt id seen in a status.
    pub attempts: BTreeSet<String>,
    /// Resource uid → whether its last seen status has an attempt.
    in_flight: BTreeMap<String, bool>,
}

impl History {
    /// Resources whose last seen status has an issuance in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.values().filter(|a| **a).count()
    }

    /// Every key id any resource ever held.
    pub fn every_held(&self) -> BTreeSet<String> {
        self.held.values().flatten().cloned().collect()
    }

    /// The uid the resource `name` had, if the watch saw it.
    pub fn uid_of(&self, name: &str) -> Option<&str> {
        self.names
            .iter()
            .find(|(_, n)| n.as_str() == name)
            .map(|(uid, _)| uid.as_str())
    }

    fn saw<K: ManagedKey>(&mut self, key: &K) {
        let uid = key.uid().unwrap_or_default();
        self.names.insert(uid.clone(), key.name_any());
        let Some(status) = key.key_status() else {
            return;
        };
        self.statuses
            .insert(serde_json::to_string(status).expect("status as JSON"));
        let held = self.held.entry(uid.clone()).or_default();
        held.extend(status.key_id.iter().cloned());
        held.extend(status.retiring.iter().map(|r| r.key_id.clone()));
        if let Some(a) = &status.attempt {
            self.attempts.insert(a.id.clone());
        }
        let retiring: Vec<&str> = status.retiring.iter().map(|r| r.key_id.as_str()).collect();
        let line = format!(
            "{} gen {:?} observed {:?} ready {} shape {:?} (spec {}) key {:?} rev {:?} retiring {retiring:?} attempt {:?}{}",
            jiff::Timestamp::now().strftime("%H:%M:%S%.3f"),
            key.meta().generation,
            status.observed_generation,
            status.is_ready(),
            status.shape,
            keyward::reconciler::key_view(key).shape,
            status.key_id,
            status.revision,
            status.attempt.as_ref().map(|a| format!(
                "{} {} since {} for shape {} rotate {:?}",
                a.id, a.reason, a.started_at.0, a.shape, a.rotate_request
            )),
            if key.meta().deletion_timestamp.is_some() {
                " deleting"
            } else {
                ""
            },
        );
        self.timeline.entry(uid.clone()).or_default().push(line);
        self.in_flight.insert(uid, status.attempt.is_some());
    }

    fn gone<K: ManagedKey>(&mut self, key: &K) {
        let uid = key.uid().unwrap_or_default();
        let line = format!("{} gone", jiff::Timestamp::now().strftime("%H:%M:%S%.3f"));
        self.timeline.entry(uid.clone()).or_default().push(line);
        self.in_flight.remove(&uid);
    }
}

/// Follows both key kinds and keyward's Secrets in `ns` into `history` until aborted.
pub fn follow(
    client: &Client,
    ns: &str,
    history: Arc<Mutex<History>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    vec![
        tokio::spawn(follow_secrets(
            Api::namespaced(client.clone(), ns),
            history.clone(),
        )),
        tokio::spawn(follow_kind::<AuthKey>(
            Api::namespaced(client.clone(), ns),
            history.clone(),
        )),
        tokio::spawn(follow_kind::<ServiceAccountKey>(
            Api::namespaced(client.clone(), ns),
            history,
        )),
    ]
}

async fn follow_kind<K: ManagedKey>(api: Api<K>, history: Arc<Mutex<History>>) {
    let events = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(events);
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(k) | watcher::Event::InitApply(k)) => {
                history.lock().unwrap().saw(&k);
            }
            Ok(watcher::Event::Delete(k)) => history.lock().unwrap().gone(&k),
            _ => {}
        }
    }
}

async fn follow_secrets(api: Api<Secret>, history: Arc<Mutex<History>>) {
    let config = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let events = watcher(api, config).default_backoff();
    futures::pin_mut!(events);
    while let Some(event) = events.next().await {
        if let Ok(watcher::Event::Apply(secret) | watcher::Event::InitApply(secret)) = event
            && let Some(key_id) = secret.annotations().get(KEY_ID_ANNOTATION)
        {
            let mut history = history.lock().unwrap();
            for owner in secret.owner_references() {
                history
                    .held
                    .entry(owner.uid.clone())
                    .or_default()
                    .insert(key_id.clone());
            }
        }
    }
}
