//! An in-test double of an upstream key API, with fault injection. It stands in for
//! the *key API* only; the Kubernetes side of every test is the real control plane.
//! It records every key it issued (with its marker and value) and which are revoked,
//! so tests can assert that no live key is unaccounted for.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use async_trait::async_trait;
use keyward::{
    providers::{
        Builtin, Capabilities, IssueRequest, IssuedKey, KeyApi, KeyShape, KeyState, ProviderError,
        ProviderFactory, ResolvedProvider,
    },
    reconciler::{CrashPoint, Faults},
    resources::BuiltinProvider,
};

#[derive(Clone, Debug)]
pub struct UpstreamKey {
    pub marker: String,
    pub value: String,
    pub revoked: bool,
    /// What the key was issued for.
    pub shape: KeyShape,
}

pub struct Upstream {
    pub keys: Mutex<BTreeMap<String, UpstreamKey>>,
    pub calls: AtomicUsize,
    pub refuse_issue: AtomicBool,
    pub refuse_revoke: AtomicBool,
    /// When each issue call arrived, refused or not.
    pub issue_calls: Mutex<Vec<std::time::Instant>>,
    /// While true, creates are held: they arrive, and are carried out (the key lands)
    /// only once it is false again — whether or not their caller is still waiting.
    hold: tokio::sync::watch::Sender<bool>,
    /// Creates that arrived and have not landed yet.
    pub in_flight: AtomicUsize,
    me: std::sync::Weak<Upstream>,
}

impl Upstream {
    pub fn new() -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            keys: Mutex::default(),
            calls: AtomicUsize::default(),
            refuse_issue: AtomicBool::default(),
            refuse_revoke: AtomicBool::default(),
            issue_calls: Mutex::default(),
            hold: tokio::sync::watch::channel(false).0,
            in_flight: AtomicUsize::default(),
            me: me.clone(),
        })
    }

    fn me(&self) -> Arc<Self> {
        self.me.upgrade().expect("the double outlives its calls")
    }

    /// Holds (true) or releases (false) creates.
    pub fn hold_creates(&self, hold: bool) {
        self.hold.send_replace(hold);
    }

    pub fn key(&self, id: &str) -> Option<UpstreamKey> {
        self.keys.lock().unwrap().get(id).cloned()
    }

    pub fn live(&self) -> Vec<(String, UpstreamKey)> {
        self.keys
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, k)| !k.revoked)
            .map(|(id, k)| (id.clone(), k.clone()))
            .collect()
    }

    pub fn issued(&self) -> usize {
        self.keys.lock().unwrap().len()
    }
}

#[async_trait]
impl KeyApi for Upstream {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            overlap: true,
            listing: true,
            inspect: true,
            ..Default::default()
        }
    }

    async fn issue(&self, request: &IssueRequest) -> Result<IssuedKey, ProviderError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.issue_calls
            .lock()
            .unwrap()
            .push(std::time::Instant::now());
        if self.refuse_issue.load(Ordering::SeqCst) {
            return Err(ProviderError::Unavailable("upstream answered 503".into()));
        }
        let key = Builtin::new(&BuiltinProvider::default())
            .issue(request)
            .await?;
        let record = UpstreamKey {
            marker: request.marker.clone(),
            value: key.value.expose().to_owned(),
            revoked: false,
            shape: request.shape.clone(),
        };
        // The create is carried out by the "server", not by the caller's future: a
        // caller that is dropped (a crash) does not stop it from landing.
        let mut hold = self.hold.subscribe();
        let (landed, answer) = tokio::sync::oneshot::channel();
        let upstream = self.me();
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let _ = hold.wait_for(|held| !held).await;
            upstream.keys.lock().unwrap().insert(key.id.clone(), record);
            upstream.in_flight.fetch_sub(1, Ordering::SeqCst);
            let _ = landed.send(key);
        });
        answer
            .await
            .map_err(|_| ProviderError::Unavailable("the upstream went away".into()))
    }

    async fn revoke(&self, key_id: &str) -> Result<(), ProviderError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.refuse_revoke.load(Ordering::SeqCst) {
            return Err(ProviderError::Unavailable("upstream answered 503".into()));
        }
        if let Some(k) = self.keys.lock().unwrap().get_mut(key_id) {
            k.revoked = true;
        }
        Ok(())
    }

    async fn inspect(&self, key_id: &str) -> Result<KeyState, ProviderError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(match self.key(key_id) {
            Some(k) if !k.revoked => KeyState::Valid,
            _ => KeyState::Revoked,
        })
    }

    async fn find_by_marker(&self, marker: &str) -> Result<Vec<String>, ProviderError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(self
            .live()
            .into_iter()
            .filter(|(_, k)| k.marker == marker)
            .map(|(id, _)| id)
            .collect())
    }
}

/// Hands the same double to every provider resource.
pub struct Factory(pub Arc<Upstream>);

#[async_trait]
impl ProviderFactory for Factory {
    async fn build(&self, _: &ResolvedProvider) -> Result<Arc<dyn KeyApi>, ProviderError> {
        Ok(self.0.clone())
    }
}

/// Crashes once at a chosen point.
#[derive(Default)]
pub struct CrashOnce {
    pub point: Mutex<Option<CrashPoint>>,
    pub crashed: AtomicBool,
}

impl Faults for CrashOnce {
    fn at(&self, point: CrashPoint) -> bool {
        let mut armed = self.point.lock().unwrap();
        if *armed == Some(point) {
            *armed = None;
            self.crashed.store(true, Ordering::SeqCst);
            return true;
        }
        false
    }
}
