//! One watch per resource type, shared: a reflector cache that the executor and
//! resolution read, and a fan-out of every applied or deleted object to each
//! controller it triggers.
//!
//! Written here rather than taken from kube-runtime's shared reflectors
//! (`reflect_shared` / `owns_shared_stream`, still unstable): those drop deletion
//! events, and their subscriber stalls when an object is gone from the store by the
//! time its event is read — a deleted Secret would never trigger its key.
//!
//! The cache keeps what keyward reads: `managedFields` and kubectl's
//! `last-applied-configuration` (a second copy of the object) are dropped as objects
//! arrive, so memory follows the fields keyward uses.

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

/// The annotation `kubectl apply` keeps a copy of the whole object in.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

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

    /// [`Self::start`], each object cut down further by `cut` before it is cached and
    /// fanned out: the cache then holds what keyward reads, not whole objects.
    pub async fn start_with(
        api: Api<T>,
        config: watcher::Config,
        mut cut: impl FnMut(&mut T) + Send + 'static,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Self {
        let (store, writer) = reflector::store();
        let subscribers: std::sync::Arc<Mutex<Vec<mpsc::UnboundedSender<T>>>> = Default::default();
        let fan_out = subscribers.clone();
        let events = streaming_where_served(api, config)
            .default_backoff()
            .modify(move |object| {
                trim(object);
                cut(object);
            })
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

    /// Every object in the cache now, then every one applied or deleted from now on:
    /// the trigger of a controller of this type itself, which looks at each object
    /// once when it starts.
    pub fn objects(&self) -> impl Stream<Item = Result<T, watcher::Error>> + Send + 'static {
        // Subscribed first: an object changed meanwhile comes twice, never not at all.
        let changes = self.subscribe();
        // Cloned one at a time as the controller takes them (it keeps only a
        // reference to each): a copy of the whole cache at once was the peak of a
        // restart's memory.
        let now = self.store.state().into_iter().map(|o| Ok((*o).clone()));
        futures::stream::iter(now).chain(changes)
    }
}

/// The watch, its first state streamed (`sendInitialEvents`, Kubernetes' WatchList)
/// where the server serves that, listed in pages where it refuses it.
///
/// Streamed, the first state is one request and arrives one object at a time, each
/// trimmed as it comes; listed, it is a request per 500 objects, each page decoded whole
/// with every object's `managedFields` before anything is trimmed — the peak of a
/// restart's memory at 10,000 keys. kube-runtime does not fall back by itself: on a
/// server with WatchList off (the default of Kubernetes 1.33, or turned off) its
/// streaming watch is refused as invalid, again and again. Here the first refusal
/// switches this watch to paged lists for good.
fn streaming_where_served<T>(
    api: Api<T>,
    config: watcher::Config,
) -> impl Stream<Item = watcher::Result<watcher::Event<T>>> + Send
where
    T: Resource + Clone + Debug + DeserializeOwned + Send + 'static,
    T::DynamicType: Default,
{
    let streaming = watcher(api.clone(), config.clone().streaming_lists()).boxed();
    // The paged watch's makings, until the first refusal takes them.
    let fallback = Some((api, config));
    futures::stream::unfold(
        (streaming, fallback),
        |(mut events, mut fallback)| async move {
            loop {
                match events.next().await? {
                    Err(watcher::Error::WatchStartFailed(kube::Error::Api(status)))
                        if fallback.is_some() && streaming_refused(&status) =>
                    {
                        tracing::info!(
                            resource = %T::plural(&Default::default()),
                            code = status.code,
                            "the API server does not stream a watch's first state \
                             (WatchList); listing it in pages"
                        );
                        let (api, config) = fallback.take().expect("checked above");
                        events = watcher(api, config).boxed();
                    }
                    event => return Some((event, (events, fallback))),
                }
            }
        },
    )
}

/// The answer of a server that does not serve `sendInitialEvents`: 422 Invalid
/// ("sendInitialEvents is forbidden for watch unless the WatchList feature gate is
/// enabled"), or 400 from a server that does not know the parameter's rules.
fn streaming_refused(status: &kube::core::Status) -> bool {
    matches!(status.code, 400 | 422)
}

/// Drops what keyward never reads from a cached object.
fn trim<T: Resource>(object: &mut T) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}
