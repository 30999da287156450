//! The executor's world in production: the API server (reads from watch caches where
//! a cache serves, guarded writes), the providers, the clock, events and metrics.

use std::sync::Arc;

use async_trait::async_trait;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::reflector::{ObjectRef, Store},
};
use tracing::info;

use super::{ManagedKey, Workloads, World, memo::Memo, rollout, rollout_annotation};
use crate::{
    context::{self, Context, CrashPoint, MANAGER, Result},
    events::{Occurrence, WaveOf},
    lifecycle::{Note, Timing, rollout::TargetView},
    metrics::{self, KeyRef},
    providers::{IssueRequest, IssuedKey, KeyApi, ProviderError},
    resolve::{self, Caches, KeyRequest, Resolution},
    resources::{KeyStatus, ProviderKind, RolloutTarget},
    secret::CachedSecret,
};

pub struct KubeWorld {
    ctx: Arc<Context>,
    secrets: Store<CachedSecret>,
    /// What providers are resolved from.
    caches: Caches,
    workloads: Arc<Workloads>,
    memo: Memo,
}

impl KubeWorld {
    pub fn new(
        ctx: Arc<Context>,
        secrets: Store<CachedSecret>,
        caches: Caches,
        workloads: Arc<Workloads>,
    ) -> Self {
        Self {
            ctx,
            secrets,
            caches,
            workloads,
            memo: Memo::default(),
        }
    }

    pub fn ctx(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// What this process wrote, until the caches have it.
    pub fn memo(&self) -> &Memo {
        &self.memo
    }

    /// The wall clock (what kube-runtime's requeue timers run on).
    pub fn now_real(&self) -> Timestamp {
        Timestamp::now()
    }

    fn keys<K: ManagedKey>(&self, key: &K) -> Api<K> {
        Api::namespaced(
            self.ctx.client.clone(),
            &key.namespace().unwrap_or_default(),
        )
    }

    /// The cached provider object a key names, for the Events its waves are counted on.
    fn provider_object<K: ManagedKey>(&self, key: &K) -> Option<ObjectReference> {
        let reference = key.provider_ref();
        match reference.kind {
            ProviderKind::KeyProvider => self
                .caches
                .key_providers
                .get(&ObjectRef::new(&reference.name).within(&key.namespace().unwrap_or_default()))
                .map(|p| p.object_ref(&())),
            ProviderKind::ClusterKeyProvider => self
                .caches
                .cluster_providers
                .get(&ObjectRef::new(&reference.name))
                .map(|p| p.object_ref(&())),
        }
    }

    fn secrets<K: ManagedKey>(&self, key: &K) -> Api<Secret> {
        Api::namespaced(
            self.ctx.client.clone(),
            &key.namespace().unwrap_or_default(),
        )
    }
}

#[async_trait]
impl<K: ManagedKey> World<K> for KubeWorld {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }

    fn attempt_id(&self) -> String {
        context::random_id()
    }

    fn timing(&self) -> Timing {
        self.ctx.settings.timing
    }

    fn memo(&self) -> &Memo {
        &self.memo
    }

    fn cached_secret(&self, key: &K, name: &str) -> Option<Arc<CachedSecret>> {
        let namespace = key.namespace().unwrap_or_default();
        self.secrets.get(&ObjectRef::new(name).within(&namespace))
    }

    async fn read_key(&self, key: &K) -> Result<Option<K>> {
        self.ctx.alive()?;
        Ok(self.keys(key).get_opt(&key.name_any()).await?)
    }

    async fn read_secret(&self, key: &K, name: &str) -> Result<Option<Secret>> {
        self.ctx.alive()?;
        Ok(self.secrets(key).get_opt(name).await?)
    }

    async fn write_status(&self, key: &K, status: &KeyStatus) -> Result<K> {
        self.ctx.alive()?;
        context::write_status(&self.keys(key), key, status, true).await
    }

    async fn set_finalizers(&self, key: &K, finalizers: Vec<String>) -> Result<Option<K>> {
        self.ctx.alive()?;
        context::set_finalizers(&self.keys(key), key, finalizers).await
    }

    async fn apply_secret(
        &self,
        key: &K,
        secret: &Secret,
        expected: Option<&str>,
    ) -> Result<Secret> {
        self.ctx.alive()?;
        let mut secret = secret.clone();
        secret.metadata.resource_version = expected.map(str::to_owned);
        Ok(self
            .secrets(key)
            .patch(
                &secret.name_any(),
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await?)
    }

    async fn delete_secret(&self, key: &K, name: &str, uid: &str) -> Result<()> {
        self.ctx.alive()?;
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match self.secrets(key).delete(name, &params).await {
            Ok(_) => Ok(()),
            // Gone already, or replaced by someone else's Secret of that name.
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn cached_target(&self, key: &K, target: &RolloutTarget) -> Option<TargetView> {
        let namespace = key.namespace().unwrap_or_default();
        self.workloads
            .view(&namespace, target, &rollout_annotation(key))
    }

    async fn annotate_target(
        &self,
        key: &K,
        target: &RolloutTarget,
        value: &str,
    ) -> Result<Option<TargetView>> {
        self.ctx.alive()?;
        let namespace = key.namespace().unwrap_or_default();
        let annotation = rollout_annotation(key);
        rollout::annotate(&self.ctx.client, &namespace, target, &annotation, value).await
    }

    async fn resolve(&self, key: &K) -> Result<Resolution> {
        self.ctx.alive()?;
        let namespace = key.namespace().unwrap_or_default();
        let shape = key.shape();
        resolve::resolve(
            &self.ctx,
            &self.caches,
            &KeyRequest {
                namespace: &namespace,
                reference: key.provider_ref(),
                shape: &shape,
                lifetime: key.expiry().and_then(|d| d.to_std()),
                metrics: &KeyRef::of(key),
            },
        )
        .await
    }

    async fn issue(
        &self,
        api: &dyn KeyApi,
        request: &IssueRequest,
    ) -> Result<IssuedKey, ProviderError> {
        let deadline = self.ctx.settings.timing.issue_deadline;
        match tokio::time::timeout(deadline, api.issue(request)).await {
            Ok(issued) => issued,
            Err(_) => Err(ProviderError::Unavailable(format!(
                "no answer within the issue deadline of {}s; the create may still land, and is recovered by its marker",
                deadline.as_secs()
            ))),
        }
    }

    fn crash_at(&self, point: CrashPoint) -> Result<()> {
        self.ctx.crash_at(point)
    }

    async fn publish(&self, key: &K, note: &Note) {
        let key_ref = KeyRef::of(key);
        match note {
            Note::Issued {
                trigger, key_id, ..
            } => {
                info!(kind = K::KIND, namespace = %key.namespace().unwrap_or_default(), name = %key.name_any(), key_id = %key_id, reason = trigger.reason(), "issued");
                metrics::global().rotated(&key_ref, trigger.reason());
            }
            Note::Revoked { key_id, .. } | Note::RevokedOrphan { key_id, .. } => {
                info!(kind = K::KIND, namespace = %key.namespace().unwrap_or_default(), name = %key.name_any(), key_id = %key_id, "revoked");
                metrics::global().revoked(&key_ref);
            }
            Note::KeyInvalid { key_id, state } => {
                info!(kind = K::KIND, name = %key.name_any(), key_id = %key_id, state = %state, "upstream reports the key as no longer usable");
            }
            Note::RolledOut { target, revision } => {
                info!(kind = K::KIND, namespace = %key.namespace().unwrap_or_default(), name = %key.name_any(), target = %target, revision, "annotated a rollout target");
            }
            Note::Failed { operation, .. } => metrics::global().failed(&key_ref, operation),
        }
        let (warning, reason, message) = note.event();
        let event = Occurrence {
            warning,
            reason: &reason,
            note: &message,
        };
        let wave = note
            .wave()
            .and_then(|note| Some((note, self.provider_object(key)?)));
        let wave = wave
            .as_ref()
            .map(|(note, provider)| WaveOf { provider, note });
        if let Err(e) = self
            .ctx
            .recorder
            .publish(&key.object_ref(&()), &event, wave)
            .await
        {
            tracing::warn!(error = %e, "could not publish event");
        }
    }
}
