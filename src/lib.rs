//! keyward: API and auth keys as Kubernetes custom resources.
//!
//! The library holds everything the `keyward` binary does, so integration tests and
//! `keyward dev` drive the same code as production.

pub mod cli;
pub mod client;
pub mod context;
pub mod control_plane;
pub mod crds;
pub mod events;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod policy;
pub mod provider_status;
pub mod providers;
pub mod ratelimit;
pub mod reconciler;
pub mod resolve;
pub mod resources;
pub mod secret;
pub mod server;
pub mod template;
