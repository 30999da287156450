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
        Builtin, Capabilities, IssueRequest, IssuedKey, KeyApi, KeyState, ProviderError,
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
}

#[derive(Default)]
pub struct Upstream {
    pub keys: Mutex<BTreeMap<String, UpstreamKey>>,
    pub calls: AtomicUsize,
    pub refuse_issue: AtomicBool,
    pub refuse_revoke: AtomicBool,
    /// When each issue call arrived, refused or not.
    pub issue_calls: Mutex<Vec<std::time::Instant>>,
}

impl Upstream {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
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
        self.keys.lock().unwrap().insert(
            key.id.clone(),
            UpstreamKey {
                marker: request.marker.clone(),
                value: key.value.expose().to_owned(),
                revoked: false,
            },
        );
        Ok(key)
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
