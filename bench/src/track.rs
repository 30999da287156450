//! Watching the keys as the admin: when each became Ready, at which revision, and when
//! it was gone. The operators never see these requests (they are not counted).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use jiff::Timestamp;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::Value;

/// What was seen of one key.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// When the watch first delivered the object.
    pub first: Option<Timestamp>,
    /// Highest `status.revision` seen Ready (0 when the kind has none), and since when.
    pub ready: Option<(i64, Timestamp)>,
    pub gone: Option<Timestamp>,
}

/// A watch on one kind in one namespace.
pub struct Tracker {
    api: Api<DynamicObject>,
    seen: Arc<Mutex<HashMap<String, Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Tracker {
    /// Starts watching; returns once the initial list is in.
    pub async fn start(
        client: Client,
        resource: &ApiResource,
        namespace: &str,
    ) -> anyhow::Result<Self> {
        let api: Api<DynamicObject> = Api::namespaced_with(client, namespace, resource);
        let seen: Arc<Mutex<HashMap<String, Seen>>> = Arc::default();
        let (listed, mut listed_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn({
            let seen = seen.clone();
            let api = api.clone();
            async move {
                let mut events = watcher(api, watcher::Config::default())
                    .default_backoff()
                    .boxed();
                while let Some(event) = events.next().await {
                    let Ok(event) = event else { continue };
                    let now = Timestamp::now();
                    let mut seen = seen.lock().unwrap();
                    match event {
                        watcher::Event::Apply(object) | watcher::Event::InitApply(object) => {
                            observe(&mut seen, &object, now);
                        }
                        watcher::Event::Delete(object) => {
                            if let Some(name) = object.metadata.name {
                                seen.entry(name).or_default().gone = Some(now);
                            }
                        }
                        watcher::Event::InitDone => {
                            let _ = listed.send(true);
                        }
                        watcher::Event::Init => {}
                    }
                }
            }
        });
        let listed =
            tokio::time::timeout(Duration::from_secs(60), listed_rx.wait_for(|d| *d)).await;
        anyhow::ensure!(
            matches!(listed, Ok(Ok(_))),
            "could not list {} in {namespace} within 60 s",
            resource.plural
        );
        Ok(Self { api, seen, task })
    }

    /// The watched kind in the watched namespace, as the admin.
    pub fn api(&self) -> &Api<DynamicObject> {
        &self.api
    }

    pub fn snapshot(&self) -> HashMap<String, Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the snapshot, or fails after `timeout` saying what
    /// `progress` reports.
    pub async fn wait(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&HashMap<String, Seen>) -> bool,
        progress: impl Fn(&HashMap<String, Seen>) -> String,
    ) -> anyhow::Result<Timestamp> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let seen = self.seen.lock().unwrap();
                if done(&seen) {
                    return Ok(Timestamp::now());
                }
                if tokio::time::Instant::now() > deadline {
                    anyhow::bail!("{what}: not done within {timeout:?} ({})", progress(&seen));
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn observe(seen: &mut HashMap<String, Seen>, object: &DynamicObject, now: Timestamp) {
    let Some(name) = object.metadata.name.clone() else {
        return;
    };
    let status = &object.data["status"];
    let entry = seen.entry(name).or_default();
    entry.first.get_or_insert(now);
    if is_ready(status) {
        let revision = status["revision"].as_i64().unwrap_or(0);
        if entry.ready.is_none_or(|(r, _)| revision > r) {
            entry.ready = Some((revision, now));
        }
    }
}

fn is_ready(status: &Value) -> bool {
    status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// How many of `names` are Ready at `revision` or later.
pub fn ready_at(seen: &HashMap<String, Seen>, names: &[String], revision: i64) -> usize {
    names
        .iter()
        .filter(|n| {
            seen.get(*n)
                .and_then(|s| s.ready)
                .is_some_and(|(r, _)| r >= revision)
        })
        .count()
}

pub fn gone(seen: &HashMap<String, Seen>, names: &[String]) -> usize {
    names
        .iter()
        .filter(|n| seen.get(*n).is_some_and(|s| s.gone.is_some()))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(name: &str, status: Value) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "AuthKey",
            "metadata": {"name": name}, "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn remembers_when_each_revision_first_became_ready() {
        let mut seen = HashMap::new();
        let t0: Timestamp = "2026-12-01T10:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-12-01T10:00:05Z".parse().unwrap();
        let ready = |revision| {
            serde_json::json!({"revision": revision,
                "conditions": [{"type": "Ready", "status": "True"}]})
        };
        observe(
            &mut seen,
            &object(
                "a",
                serde_json::json!({"conditions": [{"type": "Ready", "status": "False"}]}),
            ),
            t0,
        );
        assert!(seen["a"].ready.is_none());
        observe(&mut seen, &object("a", ready(1)), t0);
        observe(&mut seen, &object("a", ready(1)), t1);
        assert_eq!(seen["a"].ready, Some((1, t0)));
        observe(&mut seen, &object("a", ready(2)), t1);
        let names = vec!["a".to_owned(), "b".to_owned()];
        assert_eq!(ready_at(&seen, &names, 2), 1);
        assert_eq!(ready_at(&seen, &names, 3), 0);
    }
}
