//! The four custom resources of `keyward.dev/v1alpha1`, as Rust types.
//!
//! These types are the single source of the CRDs in `crds/` (see [`crate::crds`]):
//! everything the API server validates at admission — enums, patterns, bounds and the
//! CEL cross-field rules — is declared here, next to the field it guards.

mod key;
mod provider;
mod rollout;
mod shared;

pub use key::*;
pub use provider::*;
pub use rollout::*;
pub use shared::*;

/// API group of every keyward resource.
pub const GROUP: &str = "keyward.dev";
/// The one served and stored version.
pub const VERSION: &str = "v1alpha1";
