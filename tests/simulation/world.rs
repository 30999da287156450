//! The executor's world inside the simulation: every call to the API server or the
//! upstream is an operation that stays pending until the schedule completes it — or
//! never, when the schedule crashes the operator first. Each await point of the
//! executor is therefore a point where a schedule can interleave something else or
//! cut the reconcile off.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context as TaskContext, Poll},
};

use async_trait::async_trait;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use keyward::{
    context::{CrashPoint, Error, Result},
    lifecycle::{Note, Timing, rollout::TargetView},
    providers::{
        Capabilities, Interrupted, IssueRequest, IssuedKey, KeyApi, KeyState, ProviderError,
        SecretValue,
    },
    reconciler::{Memo, World, rollout_annotation},
    resolve::Resolution,
    resources::{AuthKey, KeyStatus, RolloutTarget},
    secret::CachedSecret,
};
use kube::ResourceExt;

use super::{
    Sim,
    model::{Refused, Workload},
};

/// One call the executor made, waiting for the schedule.
#[derive(Clone, Debug)]
pub enum Op {
    ReadKey(String),
    ReadSecret(String),
    WriteStatus(String, String, Box<KeyStatus>),
    SetFinalizers(String, String, Vec<String>),
    ApplySecret(Box<Secret>, Option<String>),
    DeleteSecret(String, String),
    Resolve(String),
    Issue(Box<IssueRequest>, bool),
    Revoke(String),
    Inspect(String),
    FindOrphans(String),
    /// Target, annotation, value.
    Annotate(RolloutTarget, String, String),
}

impl Op {
    pub fn upstream(&self) -> bool {
        matches!(
            self,
            Op::Issue(_, false) | Op::Revoke(_) | Op::Inspect(_) | Op::FindOrphans(_)
        )
    }

    /// A write whose effect a crash may or may not have let through.
    pub fn kube_write(&self) -> bool {
        matches!(
            self,
            Op::WriteStatus(..)
                | Op::SetFinalizers(..)
                | Op::ApplySecret(..)
                | Op::DeleteSecret(..)
                | Op::Annotate(..)
        )
    }
}

/// What an operation came to.
#[derive(Clone, Debug)]
pub enum Reply {
    Key(Option<AuthKey>),
    Status(std::result::Result<AuthKey, Refused>),
    Finalizers(std::result::Result<Option<AuthKey>, Refused>),
    Secret(Option<Secret>),
    Applied(Box<Secret>),
    Unit,
    /// The provider of the key: `true` mints locally.
    Resolved(bool),
    Issued(std::result::Result<(IssuedKeyFacts, String), ProviderError>),
    Upstream(std::result::Result<(), ProviderError>),
    Inspected(std::result::Result<KeyState, ProviderError>),
    Orphans(std::result::Result<Vec<String>, ProviderError>),
    Workload(Option<Workload>),
    /// The API server failed the request (a 500).
    KubeFailed,
}

#[derive(Clone, Debug)]
pub struct IssuedKeyFacts {
    pub id: String,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
}

/// An operation in flight, as the schedule sees it.
#[derive(Clone, Debug)]
pub struct Pending {
    pub instance: usize,
    pub op: Op,
    pub started: Timestamp,
    /// Set once the schedule decided the upstream is slow: the answer comes no
    /// earlier than this (a deadline error, for an issue).
    pub slow_until: Option<Timestamp>,
}

pub type Shared = Arc<Mutex<Sim>>;

/// A future that registers its operation on first poll and resolves once the
/// schedule has put a reply in.
struct OpFuture {
    sim: Shared,
    instance: usize,
    incarnation: u64,
    op: Option<Op>,
    id: Option<u64>,
}

impl Future for OpFuture {
    type Output = Reply;

    fn poll(mut self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<Reply> {
        let shared = self.sim.clone();
        let mut sim = shared.lock().unwrap();
        match self.id {
            None => {
                let op = self.op.take().expect("an operation to register");
                let id = sim.register(self.instance, self.incarnation, op);
                drop(sim);
                self.id = Some(id);
                Poll::Pending
            }
            Some(id) => match sim.replies.remove(&id) {
                Some(reply) => Poll::Ready(reply),
                None => Poll::Pending,
            },
        }
    }
}

/// The world of one operator incarnation.
#[derive(Clone)]
pub struct SimWorld {
    pub sim: Shared,
    pub instance: usize,
    pub incarnation: u64,
    /// What this incarnation wrote (a process's memory: gone with a crash).
    pub memo: Arc<Memo>,
}

impl SimWorld {
    fn call(&self, op: Op) -> OpFuture {
        OpFuture {
            sim: self.sim.clone(),
            instance: self.instance,
            incarnation: self.incarnation,
            op: Some(op),
            id: None,
        }
    }
}

fn status_error(code: u16) -> Error {
    Error::Kube(kube::Error::Api(Box::new(kube::core::Status {
        code,
        message: format!("simulated {code}"),
        ..Default::default()
    })))
}

fn refused(r: Refused) -> Error {
    match r {
        Refused::Conflict => status_error(409),
        Refused::NotFound => status_error(404),
    }
}

#[async_trait]
impl World<AuthKey> for SimWorld {
    fn now(&self) -> Timestamp {
        self.sim.lock().unwrap().now
    }

    fn attempt_id(&self) -> String {
        self.sim.lock().unwrap().rng.hex(8)
    }

    fn timing(&self) -> Timing {
        self.sim.lock().unwrap().timing
    }

    fn memo(&self) -> &Memo {
        &self.memo
    }

    fn cached_secret(&self, _: &AuthKey, name: &str) -> Option<Arc<CachedSecret>> {
        let sim = self.sim.lock().unwrap();
        sim.instances[self.instance]
            .cache
            .secrets
            .get(name)
            .map(|s| Arc::new(CachedSecret::of(s)))
    }

    async fn read_key(&self, key: &AuthKey) -> Result<Option<AuthKey>> {
        match self.call(Op::ReadKey(key.name_any())).await {
            Reply::Key(k) => Ok(k),
            _ => Err(status_error(500)),
        }
    }

    async fn read_secret(&self, _: &AuthKey, name: &str) -> Result<Option<Secret>> {
        match self.call(Op::ReadSecret(name.to_owned())).await {
            Reply::Secret(s) => Ok(s),
            _ => Err(status_error(500)),
        }
    }

    async fn write_status(&self, key: &AuthKey, status: &KeyStatus) -> Result<AuthKey> {
        let rv = key.resource_version().unwrap_or_default();
        let op = Op::WriteStatus(key.name_any(), rv, Box::new(status.clone()));
        match self.call(op).await {
            Reply::Status(r) => r.map_err(refused),
            _ => Err(status_error(500)),
        }
    }

    async fn set_finalizers(
        &self,
        key: &AuthKey,
        finalizers: Vec<String>,
    ) -> Result<Option<AuthKey>> {
        let rv = key.resource_version().unwrap_or_default();
        match self
            .call(Op::SetFinalizers(key.name_any(), rv, finalizers))
            .await
        {
            Reply::Finalizers(r) => match r {
                Err(Refused::NotFound) => Ok(None),
                r => r.map_err(refused),
            },
            _ => Err(status_error(500)),
        }
    }

    async fn apply_secret(
        &self,
        _: &AuthKey,
        secret: &Secret,
        expected: Option<&str>,
    ) -> Result<Secret> {
        let op = Op::ApplySecret(Box::new(secret.clone()), expected.map(str::to_owned));
        match self.call(op).await {
            Reply::Applied(s) => Ok(*s),
            Reply::Status(Err(r)) => Err(refused(r)),
            _ => Err(status_error(500)),
        }
    }

    async fn delete_secret(&self, _: &AuthKey, name: &str, uid: &str) -> Result<()> {
        match self
            .call(Op::DeleteSecret(name.to_owned(), uid.to_owned()))
            .await
        {
            Reply::Unit => Ok(()),
            _ => Err(status_error(500)),
        }
    }

    fn cached_target(&self, key: &AuthKey, target: &RolloutTarget) -> Option<TargetView> {
        let sim = self.sim.lock().unwrap();
        let cached = sim.instances[self.instance].cache.workloads.get(target);
        cached.map(|w| w.view(&rollout_annotation(key)))
    }

    async fn annotate_target(
        &self,
        key: &AuthKey,
        target: &RolloutTarget,
        value: &str,
    ) -> Result<Option<TargetView>> {
        let annotation = rollout_annotation(key);
        let op = Op::Annotate(target.clone(), annotation.clone(), value.to_owned());
        match self.call(op).await {
            Reply::Workload(w) => Ok(w.map(|w| w.view(&annotation))),
            _ => Err(status_error(500)),
        }
    }

    async fn resolve(&self, key: &AuthKey) -> Result<Resolution> {
        match self
            .call(Op::Resolve(key.spec.provider_ref.name.clone()))
            .await
        {
            Reply::Resolved(local) => Ok(Resolution::Ready {
                api: Arc::new(SimApi {
                    world: self.clone(),
                    local,
                }),
                policy: None,
            }),
            _ => Err(status_error(500)),
        }
    }

    async fn issue(
        &self,
        api: &dyn KeyApi,
        request: &IssueRequest,
    ) -> Result<IssuedKey, ProviderError> {
        // The deadline is the schedule's to model (a slow upstream answers with it).
        api.issue(request).await
    }

    fn crash_at(&self, _: CrashPoint) -> Result<()> {
        Ok(())
    }

    async fn publish(&self, key: &AuthKey, note: &Note) {
        self.sim
            .lock()
            .unwrap()
            .notes
            .push((key.uid().unwrap_or_default(), note.clone()));
    }
}

/// The provider inside the simulation: a local minter, or the upstream model.
pub struct SimApi {
    world: SimWorld,
    local: bool,
}

#[async_trait]
impl KeyApi for SimApi {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            overlap: true,
            listing: !self.local,
            inspect: !self.local,
            local: self.local,
            ..Default::default()
        }
    }

    async fn issue(&self, request: &IssueRequest) -> std::result::Result<IssuedKey, ProviderError> {
        match self
            .world
            .call(Op::Issue(Box::new(request.clone()), self.local))
            .await
        {
            Reply::Issued(Ok((facts, value))) => Ok(IssuedKey {
                id: facts.id,
                value: SecretValue::new(value),
                created_at: facts.created_at,
                expires_at: facts.expires_at,
            }),
            Reply::Issued(Err(e)) => Err(e),
            _ => Err(ProviderError::Unavailable("simulated".into())),
        }
    }

    async fn revoke(&self, key_id: &str) -> std::result::Result<(), ProviderError> {
        if self.local {
            // No call: checked here, without an operation that would change the
            // schedule.
            self.world.sim.lock().unwrap().revoking(key_id);
            return Ok(());
        }
        match self.world.call(Op::Revoke(key_id.to_owned())).await {
            Reply::Upstream(r) => r,
            _ => Err(ProviderError::Unavailable("simulated".into())),
        }
    }

    async fn inspect(&self, key_id: &str) -> std::result::Result<KeyState, ProviderError> {
        match self.world.call(Op::Inspect(key_id.to_owned())).await {
            Reply::Inspected(r) => r,
            _ => Err(ProviderError::Unavailable("simulated".into())),
        }
    }

    async fn find_by_marker(
        &self,
        marker: &str,
    ) -> std::result::Result<Vec<String>, ProviderError> {
        if self.local {
            return Ok(Vec::new());
        }
        match self.world.call(Op::FindOrphans(marker.to_owned())).await {
            Reply::Orphans(r) => r,
            _ => Err(ProviderError::Unavailable("simulated".into())),
        }
    }

    async fn find_orphans(
        &self,
        attempt: &Interrupted<'_>,
    ) -> std::result::Result<Vec<String>, ProviderError> {
        let found = self.find_by_marker(attempt.marker).await?;
        Ok(found
            .into_iter()
            .filter(|id| !attempt.held.contains(id))
            .collect())
    }
}
