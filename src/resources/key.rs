//! `AuthKey` and `ServiceAccountKey`: the keys themselves, and the status that the
//! lifecycle engine keeps for both.

// `printcolumn(..)` repeats `type_ = ..` by design; clippy reads that as a duplicate.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    rollout::{Retire, RolloutTarget},
    shared::{KeyDuration, Tag},
};

/// Which kind of provider a key's `providerRef` names.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ProviderKind {
    /// A `KeyProvider` in the key's own namespace.
    #[default]
    KeyProvider,
    /// A cluster-wide `ClusterKeyProvider`.
    ClusterKeyProvider,
}

/// The provider that issues this key. Like cert-manager's `issuerRef`, the kind
/// defaults to the namespaced one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct ProviderRef {
    /// `KeyProvider` (same namespace, the default) or `ClusterKeyProvider`.
    #[serde(default)]
    pub kind: ProviderKind,
    /// Name of the provider.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// When a key is renewed and how the old one is retired.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.renewBefore) && has(self.renewBeforePercentage))").message("set either rotation.renewBefore or rotation.renewBeforePercentage, not both"))]
pub struct Rotation {
    /// Renew this long before the key expires. Default: one third of the lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_before: Option<KeyDuration>,
    /// Renew when this percentage of the lifetime is left (1–99), instead of `renewBefore`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 99))]
    pub renew_before_percentage: Option<u8>,
    /// How long the previous key stays valid after the Secret switches to the new one,
    /// so that workloads reading the Secret have time to pick it up. Default: 5m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap: Option<KeyDuration>,
    /// Replace a key that was used up (one-off) or revoked out of band. Default: true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reissue_when_invalid: Option<bool>,
    /// How often the upstream is asked whether the key is still valid (providers that
    /// can tell). Default: 1h; at least 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inspect_interval: Option<KeyDuration>,
    /// When the previous key is revoked: `AfterOverlap` (default) when the overlap
    /// ends; `AfterRollout` as soon as every `rollout` target runs the new key, and at
    /// the latest when the overlap ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire: Option<Retire>,
}

/// Extra Secret content rendered from the key. `{{ key }}` is the key value; every
/// variable is listed in docs/concepts.md (Secret templates).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct SecretTemplate {
    /// Labels added to the Secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations added to the Secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Extra data keys, each a template (e.g. a `config.toml` embedding the key).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub data: BTreeMap<String, String>,
}

/// The Secret keyward writes the key into.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[x_kube(validation = Rule::new("!has(self.template) || !has(self.template.data) || !(self.key in self.template.data)").message("secret.template.data must not use the data key named in secret.key: keyward writes the key value there; pick another name for the template entry"))]
#[x_kube(validation = Rule::new("!has(self.template) || !has(self.template.data) || self.template.data.all(k, k.matches('^[-._a-zA-Z0-9]+$'))").message("secret.template.data keys may contain only letters, digits, '-', '_' and '.' (Secret data key rules)"))]
pub struct SecretSpec {
    /// Name of the Secret. Default: the key resource's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: Option<String>,
    /// Data key that holds the key value. Default: `key`.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
    /// Extra data keys, labels and annotations rendered from the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Boxed: most keys have none, and inline it kept every cached key above the
    // allocator's 1 KiB size class (see `tests::a_cached_key_fits_a_kibibyte`).
    pub template: Option<Box<SecretTemplate>>,
}

/// A field that is never serialized.
fn never<T>(_: &T) -> bool {
    true
}

fn default_secret_key() -> String {
    "key".to_owned()
}

impl Default for SecretSpec {
    fn default() -> Self {
        Self {
            name: None,
            key: default_secret_key(),
            template: None,
        }
    }
}

/// What happens upstream when the resource is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// Revoke every upstream key the resource holds (the default).
    #[default]
    Revoke,
    /// Leave upstream keys alone; only the Secret is removed.
    Retain,
}

/// A device / machine pre-authentication key (Tailscale, Encore style).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "keyward.dev",
    version = "v1alpha1",
    kind = "AuthKey",
    namespaced,
    status = "KeyStatus",
    shortname = "ak",
    category = "keyward",
    doc = "A device pre-authentication key, issued by a provider and kept in a Secret, rotated before it expires and revoked on delete.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Provider",
        type_ = "string",
        json_path = ".spec.providerRef.name"
    ),
    printcolumn(name = "Expires", type_ = "string", json_path = ".status.expiresAt"),
    printcolumn(name = "Renews", type_ = "string", json_path = ".status.renewalTime"),
    printcolumn(name = "Revision", type_ = "integer", json_path = ".status.revision"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.expiry) || !has(self.rotation) || !has(self.rotation.renewBefore) || !self.expiry.matches('^([0-9]+[hms])+$') || !self.rotation.renewBefore.matches('^([0-9]+[hms])+$') || duration(self.rotation.renewBefore) + duration('10s') <= duration(self.expiry)").message("rotation.renewBefore must be shorter than expiry by at least 10s: keyward renews a key that long after issuing it at the earliest, and a shorter window would renew it as soon as it is issued"))]
#[x_kube(validation = Rule::new("!has(self.expiry) || !has(self.rotation) || !has(self.rotation.renewBeforePercentage) || !self.expiry.matches('^([0-9]+[hms])+$') || duration(self.expiry).getSeconds() * (100 - self.rotation.renewBeforePercentage) >= 1000").message("rotation.renewBeforePercentage leaves less than 10s of the lifetime between issuing a key and renewing it: lower the percentage or lengthen expiry"))]
#[x_kube(validation = Rule::new("!has(self.expiry) || !has(self.rotation) || !has(self.rotation.overlap) || !self.expiry.matches('^([0-9]+[hms])+$') || !self.rotation.overlap.matches('^([0-9]+[hms])+$') || duration(self.rotation.overlap) < duration(self.expiry)").message("rotation.overlap must be shorter than expiry: the old key cannot outlive its own lifetime"))]
#[x_kube(validation = Rule::new("!has(self.expiry) || !self.expiry.matches('^([0-9]+[hms])+$') || duration(self.expiry) >= duration('1m')").message("expiry must be at least 1m"))]
#[x_kube(validation = Rule::new("!has(self.rotation) || !has(self.rotation.retire) || self.rotation.retire != 'AfterRollout' || (has(self.rollout) && size(self.rollout) > 0)").message("rotation.retire: AfterRollout needs spec.rollout targets to wait for: list the workloads that read the Secret, or use AfterOverlap"))]
pub struct AuthKeySpec {
    /// The provider that issues the key.
    pub provider_ref: ProviderRef,
    /// A reusable key authenticates many devices; false makes a one-off key.
    #[serde(default)]
    pub reusable: bool,
    /// Devices authenticated with the key are removed when they go offline.
    #[serde(default)]
    pub ephemeral: bool,
    /// Devices authenticated with the key skip manual approval.
    #[serde(default)]
    pub preauthorized: bool,
    /// ACL tags the devices get (`tag:name`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub tags: Vec<Tag>,
    /// Free text for the upstream key; keyward appends its own short marker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100))]
    pub description: Option<String>,
    /// Upstream lifetime of each key, e.g. `2160h` (90 days). Provider limits apply;
    /// default: the provider's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<KeyDuration>,
    /// When to renew, and how long the previous key overlaps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<Rotation>,
    /// The Secret the key is written into.
    #[serde(default)]
    pub secret: SecretSpec,
    /// Workloads in this namespace that restart onto each new key (their Pod template
    /// is annotated once per revision); see docs/workloads.md.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["kind".into(), "name".into()]))]
    pub rollout: Vec<RolloutTarget>,
    /// `Revoke` (default) or `Retain` upstream keys when the resource is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Not part of the API, never serialized: the value of a pending
    /// `keyward.dev/rotate` annotation, moved here by the key cache
    /// (`reconciler::cut_key`), which keeps no annotation map: each is a B-tree node
    /// of half a kilobyte, held by every key of a rotation wave until its turn.
    // Not `skip`: kube's `KubeSchema` derive copies the struct to build the schema,
    // and a field its Serialize never reads is dead code there.
    #[serde(skip_deserializing, skip_serializing_if = "never")]
    #[schemars(skip)]
    pub cached_rotate_request: Option<Box<str>>,
}

/// The upstream principal a `ServiceAccountKey` belongs to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct ServiceAccountPrincipal {
    /// Name of the upstream service account (Prefect: the bot's name).
    #[schemars(length(min = 1, max = 100))]
    pub name: String,
    /// true (default): keyward creates the service account and deletes it with the
    /// resource. false: keyward adopts an existing one and, on delete, only rotates
    /// its key away.
    #[serde(default = "default_true")]
    pub create: bool,
}

fn default_true() -> bool {
    true
}

/// An API key that belongs to a non-human principal (Prefect service-account style).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "keyward.dev",
    version = "v1alpha1",
    kind = "ServiceAccountKey",
    namespaced,
    status = "KeyStatus",
    shortname = "sak",
    category = "keyward",
    doc = "An API key of an upstream service account, issued by a provider and kept in a Secret, rotated before it expires and revoked on delete.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Provider",
        type_ = "string",
        json_path = ".spec.providerRef.name"
    ),
    printcolumn(
        name = "Account",
        type_ = "string",
        json_path = ".spec.serviceAccount.name"
    ),
    printcolumn(name = "Expires", type_ = "string", json_path = ".status.expiresAt"),
    printcolumn(name = "Renews", type_ = "string", json_path = ".status.renewalTime"),
    printcolumn(name = "Revision", type_ = "integer", json_path = ".status.revision"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.expiry) || !has(self.rotation) || !has(self.rotation.renewBefore) || !self.expiry.matches('^([0-9]+[hms])+$') || !self.rotation.renewBefore.matches('^([0-9]+[hms])+$') || duration(self.rotation.renewBefore) + duration('10s') <= duration(self.expiry)").message("rotation.renewBefore must be shorter than expiry by at least 10s: keyward renews a key that long after issuing it at the earliest, and a shorter window would renew it as soon as it is issued"))]
#[x_kube(validation = Rule::new("!has(self.expiry) || !has(self.rotation) || !has(self.rotation.renewBeforePercentage) || !self.expiry.matches('^([0-9]+[hms])+$') || duration(self.expiry).getSeconds() * (100 - self.rotation.renewBeforePercentage) >= 1000").message("rotation.renewBeforePercentage leaves less than 10s of the lifetime between issuing a key and renewing it: lower the percentage or lengthen expiry"))]
#[x_kube(validation = Rule::new("!has(self.expiry) || !has(self.rotation) || !has(self.rotation.overlap) || !self.expiry.matches('^([0-9]+[hms])+$') || !self.rotation.overlap.matches('^([0-9]+[hms])+$') || duration(self.rotation.overlap) < duration(self.expiry)").message("rotation.overlap must be shorter than expiry: the old key cannot outlive its own lifetime"))]
#[x_kube(validation = Rule::new("!has(self.expiry) || !self.expiry.matches('^([0-9]+[hms])+$') || duration(self.expiry) >= duration('1m')").message("expiry must be at least 1m"))]
#[x_kube(validation = Rule::new("!has(self.rotation) || !has(self.rotation.retire) || self.rotation.retire != 'AfterRollout' || (has(self.rollout) && size(self.rollout) > 0)").message("rotation.retire: AfterRollout needs spec.rollout targets to wait for: list the workloads that read the Secret, or use AfterOverlap"))]
pub struct ServiceAccountKeySpec {
    /// The provider that issues the key.
    pub provider_ref: ProviderRef,
    /// The upstream principal that owns the key.
    pub service_account: ServiceAccountPrincipal,
    /// Upstream role of the service account, where the provider has roles (Prefect:
    /// the account role name, e.g. `Member`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 100))]
    pub role: Option<String>,
    /// Upstream scopes of the key, where the provider has them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub scopes: Vec<String>,
    /// Free text for the upstream key; keyward appends its own short marker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100))]
    pub description: Option<String>,
    /// Upstream lifetime of each key, e.g. `720h`; default: the provider's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<KeyDuration>,
    /// When to renew, and how long the previous key overlaps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<Rotation>,
    /// The Secret the key is written into.
    #[serde(default)]
    pub secret: SecretSpec,
    /// Workloads in this namespace that restart onto each new key (their Pod template
    /// is annotated once per revision); see docs/workloads.md.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["kind".into(), "name".into()]))]
    pub rollout: Vec<RolloutTarget>,
    /// `Revoke` (default) or `Retain` upstream keys when the resource is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Not part of the API, never serialized: the value of a pending
    /// `keyward.dev/rotate` annotation, moved here by the key cache
    /// (`reconciler::cut_key`), which keeps no annotation map: each is a B-tree node
    /// of half a kilobyte, held by every key of a rotation wave until its turn.
    // Not `skip`: kube's `KubeSchema` derive copies the struct to build the schema,
    // and a field its Serialize never reads is dead code there.
    #[serde(skip_deserializing, skip_serializing_if = "never")]
    #[schemars(skip)]
    pub cached_rotate_request: Option<Box<str>>,
}

impl KeyStatus {
    /// Whether the `Ready` condition is `True`.
    pub fn is_ready(&self) -> bool {
        self.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    }
}

/// A previous key waiting out its overlap before it is revoked.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetiringKey {
    /// Upstream id of the key (never its value).
    pub key_id: String,
    /// When keyward revokes it.
    pub revoke_at: Time,
    /// Why it was replaced (e.g. `Renewing`, `ForcedRotation`, `SpecChanged`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// With `rotation.retire: AfterRollout`: the rollout targets that do not run the
    /// new key yet (e.g. `Deployment/web`); the key is revoked once none is left.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<String>,
}

/// An issuance in flight, recorded in status before the upstream call so that a
/// crash at any point can be recovered: the marker is carried in the upstream key's
/// description / name, and is how an orphan is found again. It also records what the
/// issuance was for, so that completing it after a restart records that, not the
/// spec as it is by then.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssueAttempt {
    /// Identifies this attempt; part of the marker.
    pub id: String,
    /// The marker written upstream (resource UID prefix + attempt id).
    pub marker: String,
    /// Why a key is being issued (e.g. `Initial`, `Renewing`, `SecretMismatch`).
    pub reason: String,
    /// When the attempt started: its upstream request cannot land later than the
    /// landing window after this.
    pub started_at: Time,
    /// Digest of the spec shape the key is issued for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub shape: String,
    /// The `keyward.dev/rotate` value the issuance answers, if the annotation was set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_request: Option<String>,
    /// The Secret the key goes into.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret_name: String,
    /// The revision the key will have.
    #[serde(default)]
    pub revision: i64,
}

/// Consecutive failed issuances: the next one waits 1s, 2s, 4s … 5m after the last,
/// unless the spec or the rotate request changed since. Kept in status so that a
/// restart or a failover does not forget it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssueBackoff {
    /// Failed issuances in a row.
    pub failures: u32,
    /// When the last one failed.
    pub last_failure_time: Time,
    /// The generation they were tried for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// The rotate request they were tried for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_request: Option<String>,
    /// Condition reason of the last failure (`IssueFailed`, or what the upstream refused).
    pub reason: String,
    /// What failed, and what to change where the upstream said.
    pub message: String,
}

/// Observed state of an `AuthKey` or `ServiceAccountKey`. Never holds a key value.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyStatus {
    /// `Ready`, `Issuing`, `Degraded`, with reasons that say what happened.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Upstream id of the current key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// When the current key was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Time>,
    /// When the current key expires upstream (absent: it does not expire).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// When keyward will renew the current key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal_time: Option<Time>,
    /// Increments with every new key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    /// `sha256:` digest of the Secret data keyward wrote, to notice edits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_hash: Option<String>,
    /// Previous keys waiting out their overlap.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retiring: Vec<RetiringKey>,
    /// The issuance in flight, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<Box<IssueAttempt>>,
    /// Digest of the spec fields that shape the key and its Secret; a change rotates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<String>,
    /// The last `keyward.dev/rotate` annotation value acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_request: Option<String>,
    /// The Secret the current key was written to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// When the upstream was last asked whether the current key is still valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_inspected_at: Option<Time>,
    /// Set when the upstream said the current key no longer works (`UsedUp`,
    /// `Revoked`, `Expired`); cleared when a new key is issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid: Option<String>,
    /// Failed issuances, while they last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Box<IssueBackoff>>,
    /// Secrets keyward wrote under an earlier `secret.name`, still to be deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired_secrets: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every cached key is one allocation of `ArcInner<AuthKey>` (two counters and the
    /// key). jemalloc's size classes step from 1 KiB to 1.25 KiB: at 10,000 keys, 8
    /// bytes over 1 KiB cost 2.4 MiB (docs/performance.md#memory).
    #[test]
    fn a_cached_key_fits_a_kibibyte() {
        let cached = 2 * std::mem::size_of::<usize>() + std::mem::size_of::<AuthKey>();
        assert!(cached <= 1024, "a cached AuthKey takes {cached} bytes");
    }
}
