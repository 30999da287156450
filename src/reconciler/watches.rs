//! One watch per resource type, shared: a reflector cache that the executor reads,
//! and a fan-out of every applied or deleted object to each controller it triggers.
//!
//! Written here rather than taken from kube-runtime's shared reflectors
//! (`reflect_shared` / `owns_shared_stream`, still unstable): those drop deletion
//! events, and their subscriber stalls when an object is gone from the store by the
//! time its event is read — a deleted Secret would never trigger its key.

use std::{fmt::Debug, hash::Hash, sync::Mutex};

use futures::{Stream, StreamExt};
use kube::{
    Api, Resource,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

/// A watch of one resource type: its cache, and its events for every subscriber.
pub struct Shared<T: Resource + Clone + 'static>
where
    T::DynamicType: Eq + Hash + Clone,
{
    pub store: Store<T>,
    subscribers: std::sync::Arc<Mutex<Vec<mpsc::UnboundedSender<T>>>>,
}

impl<T> Shared<T>
where
    T: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    T::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    /// Starts the watch (until `shutdown`) and waits until its first list is in the
    /// cache, so that nothing is planned from an empty cache.
    pub async fn start(
        api: Api<T>,
        config: watcher::Config,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Self {
        Self::start_with(api, config, |_| {}, shutdown).await
    }

    /// [`Self::start`], each object cut down by `trim` before it is cached and fanned
    /// out: the cache then holds what keyward reads, not whole objects.
    pub async fn start_with(
        api: Api<T>,
        config: watcher::Config,
        trim: impl FnMut(&mut T) + Send + 'static,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Self {
        let (store, writer) = reflector::store();
        let subscribers: std::sync::Arc<Mutex<Vec<mpsc::UnboundedSender<T>>>> = Default::default();
        let fan_out = subscribers.clone();
        let events = watcher(api, config)
            .default_backoff()
            .modify(trim)
            .reflect(writer)
            .touched_objects()
            .for_each(move |event| {
                if let Ok(object) = event {
                    fan_out
                        .lock()
                        .expect("subscribers lock")
                        .retain(|s| s.send(object.clone()).is_ok());
                }
                futures::future::ready(())
            });
        tokio::spawn(async move {
            tokio::select! {
                _ = events => {}
                _ = shutdown => {}
            }
        });
        let _ = store.wait_until_ready().await;
        Self { store, subscribers }
    }

    /// Every object applied or deleted from now on, as a controller trigger.
    pub fn subscribe(&self) -> impl Stream<Item = Result<T, watcher::Error>> + Send + 'static {
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers.lock().expect("subscribers lock").push(tx);
        futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|object| (Ok(object), rx))
        })
    }
}
