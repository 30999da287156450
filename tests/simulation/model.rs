//! Models of what keyward talks to, as far as its guarantees depend on them.
//!
//! The API server: objects with a `resourceVersion`, a generation that moves with the
//! spec, a status written only when the `resourceVersion` it is guarded by is
//! current (409 otherwise), deletion that waits for finalizers, owner-reference
//! garbage collection, and a watch log that each operator's cache follows with a lag.
//! The upstream: keys with markers, values returned once, and creates that may land
//! after their caller gave up (within the landing window the issuance contract
//! allows). Where a model and the real thing could differ, the cluster suite decides.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::{
    ByteString,
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{OwnerReference, Time},
};
use keyward::{
    lifecycle::rollout::TargetView,
    providers::IssueRequest,
    resources::{AuthKey, AuthKeySpec, KeyStatus, RolloutTarget},
};
use kube::ResourceExt;

/// A change every watcher sees, in order.
#[derive(Clone, Debug)]
pub enum Change {
    Key(String, Option<Box<AuthKey>>),
    Secret(String, Option<Box<Secret>>),
    Workload(RolloutTarget, Option<Box<Workload>>),
}

/// Why the model refused a write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    Conflict,
    NotFound,
}

#[derive(Default)]
pub struct ApiServer {
    rv: u64,
    uids: u64,
    pub keys: BTreeMap<String, AuthKey>,
    pub secrets: BTreeMap<String, Secret>,
    pub workloads: BTreeMap<RolloutTarget, Workload>,
    pub log: Vec<Change>,
    /// Secrets whose data a user changed (or deleted) since keyward last wrote them.
    pub tampered: BTreeMap<String, bool>,
}

impl ApiServer {
    fn bump(&mut self) -> String {
        self.rv += 1;
        self.rv.to_string()
    }

    fn uid(&mut self, prefix: &str) -> String {
        self.uids += 1;
        format!("{prefix}-{:04}-0000-0000-000000000000", self.uids)
    }

    fn log_key(&mut self, name: &str) {
        let object = self.keys.get(name).cloned().map(Box::new);
        self.log.push(Change::Key(name.to_owned(), object));
    }

    fn log_secret(&mut self, name: &str) {
        let object = self.secrets.get(name).cloned().map(Box::new);
        self.log.push(Change::Secret(name.to_owned(), object));
    }

    fn log_workload(&mut self, target: &RolloutTarget) {
        let rv = self.bump();
        if let Some(w) = self.workloads.get_mut(target) {
            w.resource_version = rv;
        }
        let object = self.workloads.get(target).cloned().map(Box::new);
        self.log.push(Change::Workload(target.clone(), object));
    }

    // --- what users do ---

    pub fn create_workload(&mut self, target: &RolloutTarget, stuck: bool) {
        let workload = Workload {
            generation: 1,
            observed: 1,
            template: BTreeMap::new(),
            stuck,
            resource_version: String::new(),
        };
        self.workloads.insert(target.clone(), workload);
        self.log_workload(target);
    }

    /// A user's own change of the Pod template (a new image): another rollout.
    pub fn redeploy(&mut self, target: &RolloutTarget) {
        if let Some(w) = self.workloads.get_mut(target) {
            w.generation += 1;
            self.log_workload(target);
        }
    }

    /// The workload's controller catches up with its template: Pods replaced, ready.
    pub fn finish_rollout(&mut self, target: &RolloutTarget) {
        if let Some(w) = self.workloads.get_mut(target) {
            w.observed = w.generation;
            self.log_workload(target);
        }
    }

    pub fn create_key(&mut self, name: &str, spec: AuthKeySpec, rotate: Option<String>) {
        let mut key = AuthKey::new(name, spec);
        let uid = self.uid("0k");
        key.metadata.uid = Some(uid);
        key.metadata.namespace = Some(super::NAMESPACE.to_owned());
        key.metadata.generation = Some(1);
        key.metadata.resource_version = Some(self.bump());
        if let Some(value) = rotate {
            key.metadata.annotations = Some(BTreeMap::from([(
                keyward::lifecycle::ROTATE_ANNOTATION.to_owned(),
                value,
            )]));
        }
        self.keys.insert(name.to_owned(), key);
        self.log_key(name);
    }

    /// Edits the spec; the generation moves only if it changed.
    pub fn edit_spec(&mut self, name: &str, edit: impl FnOnce(&mut AuthKeySpec)) -> bool {
        let rv = self.bump();
        let Some(key) = self.keys.get_mut(name) else {
            return false;
        };
        let before = key.spec.clone();
        edit(&mut key.spec);
        if key.spec == before {
            return false;
        }
        key.metadata.generation = Some(key.metadata.generation.unwrap_or(0) + 1);
        key.metadata.resource_version = Some(rv);
        self.log_key(name);
        true
    }

    pub fn set_rotate(&mut self, name: &str, value: String) {
        let rv = self.bump();
        let Some(key) = self.keys.get_mut(name) else {
            return;
        };
        key.annotations_mut()
            .insert(keyward::lifecycle::ROTATE_ANNOTATION.to_owned(), value);
        key.metadata.resource_version = Some(rv);
        self.log_key(name);
    }

    pub fn delete_key(&mut self, name: &str, now: Timestamp) {
        let rv = self.bump();
        let Some(key) = self.keys.get_mut(name) else {
            return;
        };
        if key.finalizers().is_empty() {
            self.keys.remove(name);
        } else if key.metadata.deletion_timestamp.is_none() {
            key.metadata.deletion_timestamp = Some(Time(now));
            key.metadata.resource_version = Some(rv);
        } else {
            return;
        }
        self.log_key(name);
    }

    pub fn tamper_secret(&mut self, name: &str) -> bool {
        let rv = self.bump();
        let Some(secret) = self.secrets.get_mut(name) else {
            return false;
        };
        let data = secret.data.get_or_insert_default();
        for value in data.values_mut() {
            *value = ByteString(b"hand-edited".to_vec());
        }
        secret.metadata.resource_version = Some(rv);
        self.tampered.insert(name.to_owned(), true);
        self.log_secret(name);
        true
    }

    pub fn remove_secret(&mut self, name: &str) -> bool {
        if self.secrets.remove(name).is_none() {
            return false;
        }
        self.bump();
        self.tampered.insert(name.to_owned(), true);
        self.log_secret(name);
        true
    }

    /// The garbage collector: Secrets whose controlling owner is gone go too.
    pub fn collect_garbage(&mut self) -> bool {
        let owners: Vec<String> = self.keys.values().filter_map(|k| k.uid()).collect();
        let orphaned: Vec<String> = self
            .secrets
            .iter()
            .filter(|(_, s)| {
                s.metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| !owners.contains(&o.uid))
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in &orphaned {
            self.secrets.remove(name);
            self.bump();
            self.log_secret(name);
        }
        !orphaned.is_empty()
    }

    // --- what keyward does ---

    pub fn write_status(
        &mut self,
        name: &str,
        rv: &str,
        status: &KeyStatus,
    ) -> Result<AuthKey, Refused> {
        let next = self.bump();
        let key = self.keys.get_mut(name).ok_or(Refused::NotFound)?;
        if key.metadata.resource_version.as_deref() != Some(rv) {
            return Err(Refused::Conflict);
        }
        key.status = Some(status.clone());
        key.metadata.resource_version = Some(next);
        let key = key.clone();
        self.log_key(name);
        Ok(key)
    }

    pub fn set_finalizers(
        &mut self,
        name: &str,
        rv: &str,
        finalizers: Vec<String>,
    ) -> Result<Option<AuthKey>, Refused> {
        let next = self.bump();
        let key = self.keys.get_mut(name).ok_or(Refused::NotFound)?;
        if key.metadata.resource_version.as_deref() != Some(rv) {
            return Err(Refused::Conflict);
        }
        key.metadata.finalizers = (!finalizers.is_empty()).then_some(finalizers);
        key.metadata.resource_version = Some(next);
        if key.metadata.deletion_timestamp.is_some() && key.finalizers().is_empty() {
            self.keys.remove(name);
            self.log_key(name);
            return Ok(None);
        }
        let key = key.clone();
        self.log_key(name);
        Ok(Some(key))
    }

    /// Server-side apply of keyward's Secret; with `expected`, only over that version.
    pub fn apply_secret(
        &mut self,
        secret: &Secret,
        expected: Option<&str>,
    ) -> Result<Secret, Refused> {
        let name = secret.name_any();
        if let Some(expected) = expected
            && self
                .secrets
                .get(&name)
                .and_then(|s| s.metadata.resource_version.as_deref())
                != Some(expected)
        {
            return Err(Refused::Conflict);
        }
        let rv = self.bump();
        let uid = match self.secrets.get(&name) {
            Some(existing) => existing.metadata.uid.clone(),
            None => Some(self.uid("0s")),
        };
        let mut written = secret.clone();
        written.metadata.uid = uid;
        written.metadata.resource_version = Some(rv);
        written.metadata.namespace = Some(super::NAMESPACE.to_owned());
        self.secrets.insert(name.clone(), written.clone());
        self.tampered.insert(name.clone(), false);
        self.log_secret(&name);
        Ok(written)
    }

    /// A merge patch of one Pod-template annotation: a new value moves the generation
    /// (a rollout), the same value changes nothing.
    pub fn annotate(&mut self, target: &RolloutTarget, key: &str, value: &str) -> Option<Workload> {
        let w = self.workloads.get_mut(target)?;
        if w.template.get(key).map(String::as_str) != Some(value) {
            w.template.insert(key.to_owned(), value.to_owned());
            w.generation += 1;
            self.log_workload(target);
        }
        self.workloads.get(target).cloned()
    }

    pub fn delete_secret(&mut self, name: &str, uid: &str) {
        if self
            .secrets
            .get(name)
            .is_some_and(|s| s.metadata.uid.as_deref() == Some(uid))
        {
            self.secrets.remove(name);
            self.bump();
            self.log_secret(name);
        }
    }

    pub fn owned_secrets(&self, uid: &str) -> Vec<String> {
        self.secrets
            .iter()
            .filter(|(_, s)| owner_of(s) == Some(uid))
            .map(|(n, _)| n.clone())
            .collect()
    }
}

pub fn owner_of(secret: &Secret) -> Option<&str> {
    secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o: &&OwnerReference| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

/// The value under `data_key`, as text.
pub fn secret_value(secret: &Secret, data_key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(data_key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// An upstream key (or a locally minted one, recorded so that the invariants can tell
/// what a Secret holds).
#[derive(Clone, Debug)]
pub struct UpstreamKey {
    pub id: String,
    pub marker: String,
    pub value: String,
    pub request: IssueRequest,
    pub created: Timestamp,
    pub expires: Option<Timestamp>,
    pub revoked: bool,
    /// Revoked "in the console", not by keyward.
    pub revoked_out_of_band: bool,
    pub local: bool,
}

impl UpstreamKey {
    pub fn live(&self) -> bool {
        !self.revoked && !self.local
    }

    /// The resource UID prefix the marker carries.
    pub fn owner_prefix(&self) -> &str {
        self.marker
            .strip_prefix("kw:")
            .and_then(|m| m.split('.').next())
            .unwrap_or("")
    }
}

/// A create that lands later than its answer (or than its caller's patience).
#[derive(Clone, Debug)]
pub struct Landing {
    pub at: Timestamp,
    pub key: UpstreamKey,
}

#[derive(Default)]
pub struct Upstream {
    pub keys: BTreeMap<String, UpstreamKey>,
    pub landings: Vec<Landing>,
    ids: u64,
}

impl Upstream {
    pub fn mint(
        &mut self,
        request: &IssueRequest,
        now: Timestamp,
        local: bool,
        value: String,
    ) -> UpstreamKey {
        self.ids += 1;
        let expires = request.lifetime.map(|l| keyward::lifecycle::after(now, l));
        UpstreamKey {
            id: format!("k{:05}", self.ids),
            marker: request.marker.clone(),
            value,
            request: request.clone(),
            created: keyward::lifecycle::after(now, std::time::Duration::ZERO),
            expires,
            revoked: false,
            revoked_out_of_band: false,
            local,
        }
    }

    pub fn land(&mut self, key: UpstreamKey) {
        self.keys.insert(key.id.clone(), key);
    }

    /// Creates whose time has come.
    pub fn land_due(&mut self, now: Timestamp) -> bool {
        let (due, later): (Vec<Landing>, Vec<Landing>) = std::mem::take(&mut self.landings)
            .into_iter()
            .partition(|l| l.at <= now);
        self.landings = later;
        let landed = !due.is_empty();
        for l in due {
            self.land(l.key);
        }
        landed
    }

    pub fn revoke(&mut self, id: &str) {
        if let Some(k) = self.keys.get_mut(id) {
            k.revoked = true;
        }
    }

    pub fn by_marker(&self, marker: &str) -> Vec<String> {
        self.keys
            .values()
            .filter(|k| k.live() && k.marker == marker)
            .map(|k| k.id.clone())
            .collect()
    }

    pub fn by_value(&self, value: &str) -> Option<&UpstreamKey> {
        self.keys.values().find(|k| k.value == value)
    }
}

/// A Deployment, StatefulSet or DaemonSet, as far as rollouts go: a generation that
/// moves with its Pod template, and a controller that catches up with it — or, for a
/// workload whose Pods never become ready, never does.
#[derive(Clone, Debug)]
pub struct Workload {
    pub generation: i64,
    pub observed: i64,
    pub template: BTreeMap<String, String>,
    pub stuck: bool,
    pub resource_version: String,
}

impl Workload {
    pub fn rolled_out(&self) -> bool {
        !self.stuck && self.observed >= self.generation
    }

    pub fn view(&self, annotation: &str) -> TargetView {
        TargetView {
            resource_version: Some(self.resource_version.clone()),
            annotation: self.template.get(annotation).cloned(),
            rolled_out: self.rolled_out(),
        }
    }
}
