//! Read your own writes: the objects this process wrote, until the watch caches have
//! caught up with them.
//!
//! A reconcile is often started by the watch event of one of keyward's own writes (the
//! Secret) while the event of the next one (the status) is still on its way, so the
//! cached key it is handed predates what keyward itself wrote a moment ago. Planning
//! from that would re-issue a key that was just issued. Guarded writes would catch it
//! (409), but only after the wasted work, and a provider that mints locally records
//! nothing before it mints. Remembering what was written, and planning from whichever
//! of the cache and the memo is newer, costs no request.
//!
//! "Newer" compares `resourceVersion`s as the integers etcd makes them; where one does
//! not parse, the cache wins (the guarded writes still protect correctness).

use std::{
    any::Any,
    collections::HashMap,
    sync::{Arc, Mutex},
};

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;

use super::ManagedKey;
use crate::{lifecycle::rollout::TargetView, secret::CachedSecret};

type Entry = (u64, Arc<dyn Any + Send + Sync>);

#[derive(Default)]
pub struct Memo {
    keys: Mutex<HashMap<String, Entry>>,
    secrets: Mutex<HashMap<String, (u64, Arc<CachedSecret>)>>,
    /// Rollout targets as this process's annotations of them answered, by target and
    /// annotation.
    targets: Mutex<HashMap<String, (u64, TargetView)>>,
    /// Keys a write of this process failed on without saying whether it went through
    /// (a 5xx, a timeout): neither the cache nor the memo can be trusted for them
    /// until they are read again.
    doubted: Mutex<std::collections::HashSet<String>>,
}

fn version(rv: Option<String>) -> Option<u64> {
    rv?.parse().ok()
}

fn id<K: ManagedKey>(key: &K) -> String {
    format!(
        "{}/{}/{}",
        K::KIND,
        key.namespace().unwrap_or_default(),
        key.name_any()
    )
}

fn secret_id(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Forgets the write under `id` if `seen` is as new or newer; whether it is that write.
fn caught_up<T>(written: &mut HashMap<String, (u64, T)>, id: String, seen: Option<u64>) -> bool {
    let Some(seen) = seen else {
        return false;
    };
    match written.get(&id) {
        Some((at, _)) if *at <= seen => {
            let own = *at == seen;
            written.remove(&id);
            own
        }
        _ => false,
    }
}

/// The newer of `cached` and what was written under `id` (by `version`). Not in the
/// cache: deleted since it was written, or not seen yet — taken as absent.
fn newer<T: Clone>(
    written: &mut HashMap<String, (u64, T)>,
    id: &str,
    cached: Option<T>,
    version_of: impl Fn(&T) -> Option<String>,
) -> Option<T> {
    let Some((at, object)) = written.get(id) else {
        return cached;
    };
    match version(version_of(cached.as_ref()?)) {
        Some(cache) if cache < *at => Some(object.clone()),
        _ => {
            written.remove(id);
            cached
        }
    }
}

impl Memo {
    /// The newer of `cached` and what this process last wrote of it.
    pub fn freshest<K: ManagedKey>(&self, cached: &K) -> K {
        let mut keys = self.keys.lock().expect("memo lock");
        let id = id(cached);
        let Some((written, object)) = keys.get(&id) else {
            return cached.clone();
        };
        match version(cached.resource_version()) {
            Some(cache) if cache < *written => object
                .downcast_ref::<K>()
                .cloned()
                .unwrap_or_else(|| cached.clone()),
            _ => {
                keys.remove(&id);
                cached.clone()
            }
        }
    }

    /// The watch delivered `seen`, so the cache holds it: what this process wrote of
    /// it up to that version is forgotten. Returns whether `seen` is exactly this
    /// process's own last write, coming back.
    pub fn seen<K: ManagedKey>(&self, seen: &K) -> bool {
        let mut keys = self.keys.lock().expect("memo lock");
        caught_up(&mut keys, id(seen), version(seen.resource_version()))
    }

    /// [`Memo::seen`] for a Secret.
    pub fn seen_secret(&self, seen: &CachedSecret) -> bool {
        let id = secret_id(&seen.namespace().unwrap_or_default(), &seen.name_any());
        let mut secrets = self.secrets.lock().expect("memo lock");
        caught_up(&mut secrets, id, version(seen.resource_version()))
    }

    /// A write of `key` failed in a way that leaves open whether it went through.
    pub fn doubt<K: ManagedKey>(&self, key: &K) {
        self.doubted.lock().expect("memo lock").insert(id(key));
    }

    /// Whether `key` must be read from the API server before planning from it.
    pub fn doubted<K: ManagedKey>(&self, key: &K) -> bool {
        self.doubted.lock().expect("memo lock").contains(&id(key))
    }

    pub fn wrote<K: ManagedKey>(&self, written: &K) {
        self.doubted.lock().expect("memo lock").remove(&id(written));
        if let Some(rv) = version(written.resource_version()) {
            let object: Arc<dyn Any + Send + Sync> = Arc::new(written.clone());
            self.keys
                .lock()
                .expect("memo lock")
                .insert(id(written), (rv, object));
        }
    }

    /// The object is gone: nothing to remember.
    pub fn forget<K: ManagedKey>(&self, key: &K) {
        self.keys.lock().expect("memo lock").remove(&id(key));
        self.doubted.lock().expect("memo lock").remove(&id(key));
    }

    /// The newer of the cached Secret and what this process last wrote of it.
    pub fn secret(
        &self,
        namespace: &str,
        name: &str,
        cached: Option<Arc<CachedSecret>>,
    ) -> Option<Arc<CachedSecret>> {
        // A trigger read off an absent Secret is confirmed by a fresh read before
        // anything is issued.
        let mut secrets = self.secrets.lock().expect("memo lock");
        newer(&mut secrets, &secret_id(namespace, name), cached, |s| {
            s.resource_version()
        })
    }

    /// The newer of the cached rollout target and what this process's annotation of
    /// it answered: a reconcile started before the cache saw the annotation does not
    /// write it again.
    pub fn target(&self, id: &str, cached: Option<TargetView>) -> Option<TargetView> {
        let mut targets = self.targets.lock().expect("memo lock");
        newer(&mut targets, id, cached, |t| t.resource_version.clone())
    }

    pub fn wrote_target(&self, id: &str, written: &TargetView) {
        if let Some(rv) = version(written.resource_version.clone()) {
            self.targets
                .lock()
                .expect("memo lock")
                .insert(id.to_owned(), (rv, written.clone()));
        }
    }

    pub fn wrote_secret(&self, written: &Secret) {
        if let Some(rv) = version(written.resource_version()) {
            let id = secret_id(
                &written.namespace().unwrap_or_default(),
                &written.name_any(),
            );
            self.secrets
                .lock()
                .expect("memo lock")
                .insert(id, (rv, Arc::new(CachedSecret::of(written))));
        }
    }

    /// A write of the Secret failed in a way that leaves open whether it went through.
    pub fn doubt_secret(&self, namespace: &str, name: &str) {
        let id = secret_id(namespace, name);
        self.secrets.lock().expect("memo lock").remove(&id);
        self.doubted.lock().expect("memo lock").insert(id);
    }

    /// Whether the Secret must be read from the API server before planning from it;
    /// asking clears the doubt (the caller reads it).
    pub fn take_secret_doubt(&self, namespace: &str, name: &str) -> bool {
        self.doubted
            .lock()
            .expect("memo lock")
            .remove(&secret_id(namespace, name))
    }

    /// The Secret was deleted: the cache, not the memo, says what is there now.
    pub fn deleted_secret(&self, namespace: &str, name: &str) {
        self.secrets
            .lock()
            .expect("memo lock")
            .remove(&secret_id(namespace, name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{AuthKey, AuthKeySpec};

    fn key(rv: &str, revision: i64) -> AuthKey {
        let mut k = AuthKey::new(
            "k",
            serde_json::from_value::<AuthKeySpec>(
                serde_json::json!({"providerRef": {"name": "p"}}),
            )
            .unwrap(),
        );
        k.metadata.namespace = Some("ns".into());
        k.metadata.resource_version = Some(rv.into());
        k.status = Some(crate::resources::KeyStatus {
            revision: Some(revision),
            ..Default::default()
        });
        k
    }

    #[test]
    fn an_older_cached_copy_yields_to_what_was_written_until_the_cache_catches_up() {
        let memo = Memo::default();
        memo.wrote(&key("12", 2));
        assert_eq!(
            memo.freshest(&key("10", 1)).status.unwrap().revision,
            Some(2)
        );
        assert_eq!(
            memo.freshest(&key("13", 3)).status.unwrap().revision,
            Some(3)
        );
        // Caught up: forgotten.
        assert_eq!(
            memo.freshest(&key("11", 1)).status.unwrap().revision,
            Some(1)
        );
    }

    #[test]
    fn the_echo_of_the_last_write_is_own_and_forgets_it() {
        let memo = Memo::default();
        memo.wrote(&key("12", 2));
        assert!(!memo.seen(&key("11", 1)), "an older version");
        assert!(memo.seen(&key("12", 2)));
        assert!(!memo.seen(&key("12", 2)), "forgotten once seen");
        memo.wrote(&key("14", 3));
        assert!(!memo.seen(&key("15", 3)), "someone wrote since");
        assert_eq!(
            memo.freshest(&key("13", 2)).status.unwrap().revision,
            Some(2),
            "nothing left to prefer over the cache"
        );
        let mut secret = Secret::default();
        secret.metadata.name = Some("s".into());
        secret.metadata.namespace = Some("ns".into());
        secret.metadata.resource_version = Some("7".into());
        assert!(!memo.seen_secret(&CachedSecret::of(&secret)));
        memo.wrote_secret(&secret);
        assert!(memo.seen_secret(&CachedSecret::of(&secret)));
        assert!(memo.secret("ns", "s", None).is_none());
    }

    #[test]
    fn a_secret_the_cache_does_not_hold_is_absent_whatever_was_written() {
        let memo = Memo::default();
        let mut secret = Secret::default();
        secret.metadata.name = Some("s".into());
        secret.metadata.namespace = Some("ns".into());
        secret.metadata.resource_version = Some("7".into());
        memo.wrote_secret(&secret);
        assert!(
            memo.secret("ns", "s", None).is_none(),
            "deleted since, or not seen yet"
        );
        let mut older = secret.clone();
        older.metadata.resource_version = Some("5".into());
        let seen = memo
            .secret("ns", "s", Some(Arc::new(CachedSecret::of(&older))))
            .unwrap();
        assert_eq!(seen.metadata.resource_version.as_deref(), Some("7"));
    }
}
