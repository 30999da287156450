//! What a key's workloads are: the `spec.rollout` targets that restart onto each new
//! key, and `rotation.retire`, which can tie the old key's revocation to them.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The kinds of workload a key can roll out (`apps/v1`).
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

/// A workload in the key's own namespace that reads the key's Secret. After the Secret
/// switched to a new key, keyward annotates its Pod template once, so that it rolls out
/// onto the new key while the old one is still valid. There is no namespace field: a key
/// can only restart what is in its own namespace.
#[derive(
    Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
pub struct RolloutTarget {
    /// `Deployment`, `StatefulSet` or `DaemonSet`.
    pub kind: WorkloadKind,
    /// Name of the workload.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
}

impl fmt::Display for RolloutTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}/{}", self.kind, self.name)
    }
}

/// When the previous key is revoked after a rotation.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Retire {
    /// When the overlap ends (the default).
    #[default]
    AfterOverlap,
    /// As soon as every `rollout` target has finished rolling out onto the new key, and
    /// at the latest when the overlap ends.
    AfterRollout,
}
