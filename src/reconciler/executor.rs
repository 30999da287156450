//! The executor: observe one key resource, ask [`lifecycle::plan`] for the next step,
//! carry it out through a [`World`], fold the result back in, and ask again until the
//! plan is done. Every decision is the planner's; this file only does I/O.
//!
//! The world is a trait so that the same executor runs against the API server and the
//! providers ([`super::KubeWorld`]) and, in the seeded simulation, against models of
//! both with a virtual clock and a crash at any await point.

use std::{collections::BTreeSet, sync::Arc};

use async_trait::async_trait;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;

use super::{FINALIZER, ManagedKey, key_view, memo::Memo};
use crate::{
    context::{CrashPoint, Error, Result},
    lifecycle::{
        self, Done, Failure, IssuedFacts, Note, Observed, ProviderView, ReadyProvider, Run, Step,
        Timing, Wake, rollout::TargetView,
    },
    providers::{
        Interrupted, IssueRequest, IssuedKey, KeyApi, ProviderError, Refusal, SecretValue,
    },
    resolve::Resolution,
    resources::{IssueAttempt, KeyStatus, RolloutTarget},
    secret::{self, CachedSecret},
};

/// Steps one reconcile may take before it gives up and retries (a plan that never
/// settles would otherwise spin).
const MAX_STEPS: usize = 64;

/// Everything the executor does outside itself.
#[async_trait]
pub trait World<K: ManagedKey>: Send + Sync {
    fn now(&self) -> Timestamp;
    /// A fresh, random attempt id.
    fn attempt_id(&self) -> String;
    fn timing(&self) -> Timing;
    /// What this process wrote, until the caches have it.
    fn memo(&self) -> &Memo;
    /// The Secret `name` in the key's namespace, from the watch cache.
    fn cached_secret(&self, key: &K, name: &str) -> Option<Arc<CachedSecret>>;
    /// The key resource from the API server (`None`: gone).
    async fn read_key(&self, key: &K) -> Result<Option<K>>;
    async fn read_secret(&self, key: &K, name: &str) -> Result<Option<Secret>>;
    /// Writes status, guarded by `key`'s `resourceVersion` (409 when stale).
    async fn write_status(&self, key: &K, status: &KeyStatus) -> Result<K>;
    /// Sets finalizers, guarded by `key`'s `resourceVersion`; `None`: the object went.
    async fn set_finalizers(&self, key: &K, finalizers: Vec<String>) -> Result<Option<K>>;
    /// Applies the Secret; with `expected`, only over that `resourceVersion` (409
    /// otherwise): a Secret changed since it was observed is not overwritten unseen.
    async fn apply_secret(
        &self,
        key: &K,
        secret: &Secret,
        expected: Option<&str>,
    ) -> Result<Secret>;
    /// Deletes the Secret `name` if its uid is still `uid`.
    async fn delete_secret(&self, key: &K, name: &str, uid: &str) -> Result<()>;
    /// The rollout target in the key's namespace, from the watch cache (`None`: no
    /// such workload).
    fn cached_target(&self, key: &K, target: &RolloutTarget) -> Option<TargetView>;
    /// Sets the key's annotation on the target's Pod template to `value`, touching
    /// nothing else; `None`: the target is gone.
    async fn annotate_target(
        &self,
        key: &K,
        target: &RolloutTarget,
        value: &str,
    ) -> Result<Option<TargetView>>;
    async fn resolve(&self, key: &K) -> Result<Resolution>;
    /// Creates a key, within the issue deadline.
    async fn issue(
        &self,
        api: &dyn KeyApi,
        request: &IssueRequest,
    ) -> Result<IssuedKey, ProviderError>;
    /// Fault injection: `Err` stops the reconcile here, like a crash.
    fn crash_at(&self, point: CrashPoint) -> Result<()>;
    /// Publishes what a committed status records (events, metrics, logs).
    async fn publish(&self, key: &K, note: &Note);
}

/// One reconcile of one key resource; returns when to look again.
pub async fn reconcile<K: ManagedKey, W: World<K>>(world: &W, key: &K) -> Result<Wake> {
    let memo = world.memo();
    let current = if memo.doubted(key) {
        match world.read_key(key).await? {
            Some(fresh) => {
                memo.wrote(&fresh);
                fresh
            }
            None => {
                memo.forget(key);
                return Ok(Wake::Never);
            }
        }
    } else {
        memo.freshest(key)
    };
    let mut e = Execution::new(world, current);
    e.read_doubted_secrets().await?;
    for _ in 0..MAX_STEPS {
        e.o.now = world.now();
        e.o.next_attempt_id = world.attempt_id();
        let plan = lifecycle::plan(&e.o);
        e.o.status = plan.status;
        e.pending.extend(plan.notes);
        let step = plan.step;
        let done = match e.carry_out(&step).await? {
            Carried::Done(done) => *done,
            Carried::Refreshed => continue,
            Carried::Finished(wake) => {
                e.publish().await;
                if e.gone {
                    world.memo().forget(&e.current);
                }
                return Ok(wake);
            }
        };
        let notes = lifecycle::absorb(&mut e.o, &step, done);
        if matches!(step, Step::Rollout { .. }) {
            // The annotation on the workload is the record of its rollout.
            e.committed.extend(notes);
        } else {
            e.pending.extend(notes);
        }
    }
    Err(Error::Retry(format!(
        "the plan did not settle within {MAX_STEPS} steps"
    )))
}

/// What carrying out a step came to.
enum Carried {
    Done(Box<Done>),
    /// A guarded write found the object changed: re-read it, plan again.
    Refreshed,
    Finished(Wake),
}

struct Execution<'w, K: ManagedKey, W: World<K>> {
    world: &'w W,
    /// The object as last read or written: what guarded writes are guarded by.
    current: K,
    o: Observed,
    api: Option<Arc<dyn KeyApi>>,
    /// The value of the key issued in this reconcile, with its attempt id.
    value: Option<(String, SecretValue)>,
    /// Notes of what happened since the last committed write.
    pending: Vec<Note>,
    /// Notes a write has committed, to publish.
    committed: Vec<Note>,
    /// The object is gone (its last finalizer went, or a write found it deleted).
    gone: bool,
}

impl<'w, K: ManagedKey, W: World<K>> Execution<'w, K, W> {
    fn new(world: &'w W, current: K) -> Self {
        let stored = current.key_status().cloned().unwrap_or_default();
        let mut o = Observed {
            key: key_view(&current),
            status: stored.clone(),
            stored,
            secrets: Default::default(),
            fresh: BTreeSet::new(),
            targets: Default::default(),
            provider: ProviderView::Unresolved,
            run: Run::default(),
            now: world.now(),
            timing: world.timing(),
            next_attempt_id: String::new(),
        };
        observe_secrets(world, &current, &mut o);
        observe_targets(world, &current, &mut o);
        Self {
            world,
            current,
            o,
            api: None,
            value: None,
            pending: Vec::new(),
            committed: Vec::new(),
            gone: false,
        }
    }

    /// Secrets a write of this process left in doubt are read again first.
    async fn read_doubted_secrets(&mut self) -> Result<()> {
        let namespace = self.current.namespace().unwrap_or_default();
        let names: Vec<String> = self.o.secret_names().into_iter().collect();
        for name in names {
            if self.world.memo().take_secret_doubt(&namespace, &name) {
                let fresh = self.world.read_secret(&self.current, &name).await;
                let fresh =
                    fresh.inspect_err(|_| self.world.memo().doubt_secret(&namespace, &name))?;
                self.o.fresh.insert(name.clone());
                match fresh {
                    Some(s) => self
                        .o
                        .secrets
                        .insert(name, secret::view(&s, &self.o.key.uid)),
                    None => self.o.secrets.remove(&name),
                };
            }
        }
        Ok(())
    }

    async fn carry_out(&mut self, step: &Step) -> Result<Carried> {
        let world = self.world;
        let key = &self.current;
        Ok(Carried::Done(Box::new(match step {
            Step::Done(wake) => return Ok(Carried::Finished(*wake)),
            Step::AddFinalizer => {
                let mut finalizers = key.finalizers().to_vec();
                finalizers.push(FINALIZER.to_owned());
                let written = world.set_finalizers(key, finalizers).await;
                return self.written(written.map(|k| k.ok_or(Gone))).await;
            }
            Step::ReleaseFinalizer => {
                let finalizers = key.finalizers().iter().filter(|f| *f != FINALIZER).cloned();
                match world.set_finalizers(key, finalizers.collect()).await {
                    Err(e) if e.is_conflict() => return self.refresh().await,
                    Err(e) => {
                        world.memo().doubt(key);
                        return Err(e);
                    }
                    Ok(_) => {
                        self.commit();
                        self.gone = true;
                        return Ok(Carried::Finished(Wake::Never));
                    }
                }
            }
            Step::WriteStatus { starts } => {
                let written = world.write_status(key, &self.o.status).await;
                let carried = self.written(written.map(Ok)).await?;
                if starts.is_none() && matches!(carried, Carried::Done(_)) {
                    world.crash_at(CrashPoint::AfterStatusWrite)?;
                }
                return Ok(carried);
            }
            Step::Resolve => Done::Resolved(self.resolve().await?),
            Step::ReadSecret(name) => {
                let secret = world.read_secret(key, name).await?;
                Done::SecretRead(secret.map(|s| secret::view(&s, &self.o.key.uid)))
            }
            Step::Issue { request, attempt } => self.issue(request, attempt).await?,
            Step::WriteSecret(attempt) => return self.write_secret(attempt).await,
            Step::RevokeOrphans(attempt) => self.revoke_orphans(attempt).await?,
            Step::Revoke(id) => match self.api()?.revoke(id).await {
                Ok(()) => Done::Revoked,
                Err(e) => Done::RevokeFailed(e.to_string()),
            },
            Step::Inspect(id) => {
                let inspected = self.api()?.inspect(id).await;
                if let Err(e) = &inspected {
                    tracing::warn!(kind = K::KIND, name = %key.name_any(), key_id = %id, error = %e, "inspecting the key failed; trying again at the next interval");
                }
                Done::Inspected(inspected.map_err(|e| e.to_string()))
            }
            Step::DeleteSecret(name) => {
                let uid = self.o.secrets.get(name).and_then(|s| s.uid.clone());
                if let Some(uid) = uid {
                    let namespace = key.namespace().unwrap_or_default();
                    world
                        .delete_secret(key, name, &uid)
                        .await
                        .inspect_err(|_| world.memo().doubt_secret(&namespace, name))?;
                    world.memo().deleted_secret(&namespace, name);
                }
                Done::SecretDeleted
            }
            Step::Rollout { target, value } => {
                match world.annotate_target(key, target, value).await {
                    Ok(view) => {
                        if let Some(v) = &view {
                            world.memo().wrote_target(&target_id(key, target), v);
                        }
                        Done::RolledOut(view)
                    }
                    Err(Error::Kube(e)) => Done::RolloutFailed(e.to_string()),
                    Err(e) => return Err(e),
                }
            }
        })))
    }

    /// A guarded write's result: the object as written, a conflict to recover from,
    /// or the object gone.
    async fn written(&mut self, result: Result<std::result::Result<K, Gone>>) -> Result<Carried> {
        match result {
            Ok(Ok(object)) => {
                self.world.memo().wrote(&object);
                self.replace(object);
                self.commit();
                Ok(Carried::Done(Box::new(Done::Written)))
            }
            Ok(Err(Gone)) => {
                self.gone = true;
                Ok(Carried::Finished(Wake::Never))
            }
            Err(e) if e.is_conflict() => self.refresh().await,
            Err(e) if e.is_not_found() => {
                self.gone = true;
                Ok(Carried::Finished(Wake::Never))
            }
            Err(e) => {
                self.world.memo().doubt(&self.current);
                Err(e)
            }
        }
    }

    /// What was planned from is stale: read the object again. What this reconcile
    /// did upstream (a key issued, keys revoked) stays known; unwritten notes go, the
    /// next plan notes again what still holds.
    async fn refresh(&mut self) -> Result<Carried> {
        match self.world.read_key(&self.current).await? {
            None => {
                self.gone = true;
                Ok(Carried::Finished(Wake::Never))
            }
            Some(fresh) => {
                self.replace(fresh);
                self.pending.clear();
                Ok(Carried::Refreshed)
            }
        }
    }

    fn replace(&mut self, object: K) {
        // What may be issued (lifetime, policy, template, the provider's own check)
        // was decided for the spec as it was when the provider was resolved.
        if object.meta().generation != self.current.meta().generation {
            self.o.provider = ProviderView::Unresolved;
            self.api = None;
        }
        let status = object.key_status().cloned().unwrap_or_default();
        self.o.key = key_view(&object);
        self.o.stored = status.clone();
        self.o.status = status;
        self.current = object;
        observe_secrets(self.world, &self.current, &mut self.o);
        observe_targets(self.world, &self.current, &mut self.o);
    }

    fn commit(&mut self) {
        self.committed.append(&mut self.pending);
    }

    async fn publish(&mut self) {
        for note in std::mem::take(&mut self.committed) {
            self.world.publish(&self.current, &note).await;
        }
    }

    fn api(&self) -> Result<&dyn KeyApi> {
        self.api
            .as_deref()
            .ok_or_else(|| Error::Retry("the plan used the provider before resolving it".into()))
    }

    /// The provider as the planner sees it: usable or not, and whether a new key may
    /// be issued (policy, lifetime bounds, the Secret template, the provider's check).
    async fn resolve(&mut self) -> Result<ProviderView> {
        let (api, policy) = match self.world.resolve(&self.current).await? {
            Resolution::Unavailable(refusal) => return Ok(ProviderView::Unavailable(refusal)),
            Resolution::Ready { api, policy } => (api, policy),
        };
        let caps = api.capabilities();
        let lifetime = lifecycle::lifetime(self.o.key.requested_lifetime, &caps);
        let granted = lifetime.clone().ok().flatten();
        let template = secret::check_template(self.current.secret_spec())
            .err()
            .map(|e| Refusal {
                reason: "TemplateInvalid",
                message: e.to_string(),
            });
        // The request as it would be sent, with a marker of the real length.
        let marker = lifecycle::marker(&self.o.key.uid, "00000000");
        let probe = lifecycle::request_for(&self.o.key, &self.o.status, &marker, granted, None);
        let refusal = policy
            .or(lifetime.err())
            .or(template)
            .or_else(|| api.check(&probe).err());
        self.api = Some(api);
        Ok(ProviderView::Ready(ReadyProvider {
            caps,
            lifetime: granted,
            refusal,
        }))
    }

    async fn issue(&mut self, request: &IssueRequest, attempt: &IssueAttempt) -> Result<Done> {
        self.world.crash_at(CrashPoint::BeforeUpstream)?;
        let issued = self.world.issue(self.api()?, request).await;
        Ok(match issued {
            Ok(key) => {
                self.world.crash_at(CrashPoint::AfterUpstream)?;
                let facts = IssuedFacts {
                    id: key.id.clone(),
                    created_at: key.created_at,
                    expires_at: key.expires_at,
                };
                self.value = Some((attempt.id.clone(), key.value));
                Done::Issued(facts)
            }
            Err(e) => Done::IssueFailed(Failure {
                reason: match &e {
                    ProviderError::Refused { reason, .. } => (*reason).to_owned(),
                    _ => "IssueFailed".to_owned(),
                },
                message: format!("issuing a key failed: {e}"),
                refused: matches!(e, ProviderError::Refused { .. }),
            }),
        })
    }

    async fn write_secret(&mut self, attempt: &IssueAttempt) -> Result<Carried> {
        let (Some((id, value)), Some(facts)) = (&self.value, &self.o.run.issued) else {
            return Err(Error::Retry("no key was issued for the Secret".into()));
        };
        if *id != attempt.id {
            return Err(Error::Retry(
                "the issued key belongs to another attempt".into(),
            ));
        }
        let object = super::secret_for(&self.current, attempt, facts, value)?;
        let name = &attempt.secret_name;
        let expected = self
            .o
            .secrets
            .get(name)
            .and_then(|s| s.resource_version.clone());
        let written = match self
            .world
            .apply_secret(&self.current, &object, expected.as_deref())
            .await
        {
            Ok(written) => written,
            Err(e) if e.is_conflict() => {
                // Someone wrote the Secret since it was observed: look at both again.
                let secret = self.world.read_secret(&self.current, name).await?;
                self.o.fresh.insert(name.clone());
                match secret {
                    Some(s) => self
                        .o
                        .secrets
                        .insert(name.clone(), secret::view(&s, &self.o.key.uid)),
                    None => self.o.secrets.remove(name),
                };
                return self.refresh().await;
            }
            Err(e) => {
                let namespace = self.current.namespace().unwrap_or_default();
                self.world.memo().doubt_secret(&namespace, name);
                return Err(e);
            }
        };
        self.world.memo().wrote_secret(&written);
        self.world.crash_at(CrashPoint::AfterSecretWrite)?;
        Ok(Carried::Done(Box::new(Done::SecretWritten(secret::view(
            &written,
            &self.o.key.uid,
        )))))
    }

    async fn revoke_orphans(&mut self, attempt: &IssueAttempt) -> Result<Done> {
        let api = self.api()?;
        let s = &self.o.status;
        let interrupted = Interrupted {
            marker: &attempt.marker,
            shape: &self.o.key.key_shape,
            started_at: attempt.started_at.0,
            held: s
                .key_id
                .iter()
                .cloned()
                .chain(s.retiring.iter().map(|r| r.key_id.clone()))
                .collect(),
        };
        let orphans = match api.find_orphans(&interrupted).await {
            Ok(orphans) => orphans,
            Err(e) => return Ok(Done::OrphansFailed(e.to_string())),
        };
        for orphan in &orphans {
            if let Err(e) = api.revoke(orphan).await {
                return Ok(Done::OrphansFailed(e.to_string()));
            }
        }
        Ok(Done::OrphansRevoked(orphans))
    }
}

/// A guarded write found no object: it was deleted (and its finalizers let go).
struct Gone;

/// The Secrets the planner needs to see, from the watch cache: the one the spec
/// names, the one status names, the attempt's, retired ones. A Secret read from the
/// API server in this reconcile keeps what the read said.
fn observe_secrets<K: ManagedKey, W: World<K>>(world: &W, key: &K, o: &mut Observed) {
    let names: BTreeSet<String> = o
        .secret_names()
        .into_iter()
        .filter(|n| !o.fresh.contains(n))
        .collect();
    let namespace = key.namespace().unwrap_or_default();
    for name in names {
        let cached = world.cached_secret(key, &name);
        match world.memo().secret(&namespace, &name, cached) {
            Some(found) => {
                o.secrets.insert(name, found.view(&o.key.uid));
            }
            None => {
                o.secrets.remove(&name);
            }
        }
    }
}

/// The `spec.rollout` targets, from the watch cache. A target already observed in this
/// reconcile keeps what it was seen as (an annotation's answer is fresher than the cache).
fn observe_targets<K: ManagedKey, W: World<K>>(world: &W, key: &K, o: &mut Observed) {
    let wanted = &o.key.rollout;
    o.targets.retain(|t, _| wanted.contains(t));
    for target in wanted {
        if o.targets.contains_key(target) {
            continue;
        }
        let cached = world.cached_target(key, target);
        if let Some(view) = world.memo().target(&target_id(key, target), cached) {
            o.targets.insert(target.clone(), view);
        }
    }
}

/// What the memo knows a target's annotation by: the target and the key's annotation.
fn target_id<K: ManagedKey>(key: &K, target: &RolloutTarget) -> String {
    let namespace = key.namespace().unwrap_or_default();
    format!("{namespace}/{target}/{}", super::rollout_annotation(key))
}
