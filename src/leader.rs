//! Leader election with a `coordination.k8s.io/v1` Lease (`--leader-elect`), the
//! algorithm of client-go's leaderelection:
//!
//! - A candidate takes the Lease when it has no holder, is its own, or has expired
//!   (`renewTime + leaseDurationSeconds` is past). Every write is a replace guarded by
//!   the `resourceVersion` just read (or a create), so when two candidates race the API
//!   server accepts exactly one; the other gets a conflict and keeps waiting. Candidates
//!   retry every `retry_period`.
//! - The leader renews every `retry_period`. If no renewal succeeded for
//!   `renew_deadline`, or the Lease shows another holder, leadership is lost: the
//!   operator then exits (a standby takes over; the kubelet restarts this one as a
//!   standby), like controller-runtime. `renew_deadline < lease_duration` keeps a
//!   leader that cannot renew from reconciling once a standby may take over.
//! - On graceful shutdown the leader releases the Lease (no holder, 1s duration), so a
//!   standby takes over at its next retry instead of after the lease duration.
//!
//! Expiry compares the holder's `renewTime` with this process's clock, so node clocks
//! must agree to within `lease_duration - renew_deadline` (NTP does far better).
//! Operating it (flags, measured takeover times): docs/operating.md.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{Api, Client, ResourceExt, api::PostParams};
use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tracing::{info, warn};

/// Leader election settings; see the `keyward run` flags of the same names.
#[derive(Clone, Debug)]
pub struct Config {
    /// Name of the Lease.
    pub lease_name: String,
    /// Namespace of the Lease (the operator's).
    pub namespace: String,
    /// This candidate's identity: `POD_NAME`, else hostname and pid.
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

/// `POD_NAME` (set by the Helm chart from the downward API), else `<hostname>-<pid>`.
pub fn default_identity() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| {
            let host = hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "keyward".to_owned());
            format!("{host}-{}", std::process::id())
        })
}

/// Whether `identity` may write itself into the Lease now.
pub fn can_take(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> bool {
    let Some(spec) = spec else { return true };
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(holder) if holder == identity => true,
        Some(_) => match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(renewed), Some(seconds)) => renewed
                .0
                .checked_add(SignedDuration::from_secs(seconds.into()))
                .is_ok_and(|expiry| expiry <= now),
            // A holder without a renewal time or duration cannot prove it is alive.
            _ => true,
        },
    }
}

/// The Lease spec after `identity` takes or renews it at `now`.
pub fn claimed(
    old: Option<&LeaseSpec>,
    identity: &str,
    lease_duration: Duration,
    now: Timestamp,
) -> LeaseSpec {
    let old = old.cloned().unwrap_or_default();
    let renewing = old.holder_identity.as_deref() == Some(identity);
    let had_holder = old
        .holder_identity
        .as_deref()
        .is_some_and(|h| !h.is_empty());
    let transitions = old.lease_transitions.unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(identity.to_owned()),
        // Whole seconds, rounded up, at least 1.
        lease_duration_seconds: Some(lease_duration.as_secs_f64().ceil().max(1.0) as i32),
        acquire_time: if renewing {
            old.acquire_time.clone()
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if !renewing && had_holder {
            transitions + 1
        } else {
            transitions
        }),
        ..old
    }
}

/// The Lease spec after its holder lets go at `now`: free at once for anyone.
pub fn released(old: &LeaseSpec, now: Timestamp) -> LeaseSpec {
    LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        renew_time: Some(MicroTime(now)),
        acquire_time: None,
        ..old.clone()
    }
}

/// A candidate for the Lease.
#[derive(Clone)]
pub struct Elector {
    api: Api<Lease>,
    config: Config,
}

impl Elector {
    pub fn new(client: Client, config: Config) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
        }
    }

    /// One attempt to take or renew the Lease: `Ok(true)` when this candidate holds it
    /// afterwards, `Ok(false)` when someone else does (or won a race for it).
    async fn try_claim(&self) -> Result<bool, kube::Error> {
        let identity = &self.config.identity;
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.config.lease_name).await?;
        let spec = current.as_ref().and_then(|l| l.spec.as_ref());
        if !can_take(spec, identity, now) {
            return Ok(false);
        }
        let spec = claimed(spec, identity, self.config.lease_duration, now);
        let result = match current {
            Some(mut lease) => {
                // Keeps metadata.resourceVersion: the API server refuses the write
                // with a conflict if anyone wrote the Lease since we read it.
                lease.spec = Some(spec);
                self.api
                    .replace(&self.config.lease_name, &PostParams::default(), &lease)
                    .await
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.lease_name.clone()),
                        ..Default::default()
                    },
                    spec: Some(spec),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
        };
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this candidate holds the Lease, then keeps renewing it.
    pub async fn acquire(self) -> Leadership {
        let (lease, identity) = (&self.config.lease_name, &self.config.identity);
        info!(%lease, namespace = %self.config.namespace, %identity, "waiting to acquire the leader lease");
        loop {
            match self.try_claim().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => warn!(%lease, error = %e, "could not read or write the leader lease"),
            }
            tokio::time::sleep(self.config.retry_period).await;
        }
        info!(%lease, %identity, "acquired the leader lease");
        let (lost_tx, lost) = watch::channel(false);
        let renewer = tokio::spawn(self.clone().renew(lost_tx));
        Leadership {
            elector: self,
            renewer,
            lost,
        }
    }

    /// Renews every retry period until a renewal deadline passes without success or
    /// another holder shows up; then reports the loss.
    async fn renew(self, lost: watch::Sender<bool>) {
        let lease = &self.config.lease_name;
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.config.retry_period).await;
            let left = self.config.renew_deadline.saturating_sub(renewed.elapsed());
            match tokio::time::timeout(left, self.try_claim()).await {
                Ok(Ok(true)) => renewed = Instant::now(),
                Ok(Ok(false)) => {
                    warn!(%lease, "another candidate holds the leader lease");
                    break;
                }
                Ok(Err(e)) => warn!(%lease, error = %e, "renewing the leader lease failed"),
                Err(_) => warn!(%lease, "renewing the leader lease timed out"),
            }
            if renewed.elapsed() >= self.config.renew_deadline {
                warn!(%lease, deadline = ?self.config.renew_deadline, "could not renew the leader lease within the renew deadline");
                break;
            }
        }
        let _ = lost.send(true);
    }
}

/// Held while this process is the leader.
pub struct Leadership {
    elector: Elector,
    renewer: JoinHandle<()>,
    lost: watch::Receiver<bool>,
}

impl Leadership {
    /// Resolves when leadership is lost; stop reconciling at once.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut lost = self.lost.clone();
        async move {
            let _ = lost.wait_for(|lost| *lost).await;
        }
    }

    /// Stops renewing and frees the Lease for a standby; call after the controllers
    /// stopped. A failure only delays the takeover to the lease's expiry.
    pub async fn release(self) {
        self.renewer.abort();
        let _ = self.renewer.await;
        let config = &self.elector.config;
        let result = async {
            let Some(mut lease) = self.elector.api.get_opt(&config.lease_name).await? else {
                return Ok(false);
            };
            let Some(spec) = lease
                .spec
                .as_ref()
                .filter(|s| s.holder_identity.as_deref() == Some(config.identity.as_str()))
            else {
                return Ok(false);
            };
            lease.spec = Some(released(spec, Timestamp::now()));
            let name = lease.name_any();
            self.elector
                .api
                .replace(&name, &PostParams::default(), &lease)
                .await
                .map(|_| true)
        }
        .await;
        match result {
            Ok(true) => info!(lease = %config.lease_name, "released the leader lease"),
            Ok(false) => {}
            Err(e) => {
                warn!(lease = %config.lease_name, error = %e, "could not release the leader lease; a standby takes over when it expires")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DURATION: Duration = Duration::from_secs(15);

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).unwrap()
    }

    #[test]
    fn a_missing_or_free_lease_can_be_taken() {
        assert!(can_take(None, "a", at(0)));
        assert!(can_take(Some(&LeaseSpec::default()), "a", at(0)));
        let freed = released(&claimed(None, "b", DURATION, at(0)), at(1));
        assert!(can_take(Some(&freed), "a", at(1)));
    }

    #[test]
    fn a_held_lease_can_be_taken_only_once_it_expired() {
        let held = claimed(None, "b", DURATION, at(0));
        assert!(!can_take(Some(&held), "a", at(0)));
        assert!(!can_take(Some(&held), "a", at(14)));
        assert!(can_take(Some(&held), "a", at(15)));
        assert!(can_take(Some(&held), "b", at(1)), "the holder renews");
    }

    #[test]
    fn claims_record_renewals_and_transitions() {
        let first = claimed(None, "a", Duration::from_millis(3500), at(0));
        assert_eq!(first.lease_duration_seconds, Some(4), "rounded up");
        assert_eq!(first.lease_transitions, Some(0));
        let renewed = claimed(Some(&first), "a", DURATION, at(5));
        assert_eq!(renewed.acquire_time, first.acquire_time);
        assert_eq!(renewed.renew_time, Some(MicroTime(at(5))));
        assert_eq!(renewed.lease_transitions, Some(0));
        let taken = claimed(Some(&renewed), "b", DURATION, at(30));
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
        assert_eq!(taken.acquire_time, Some(MicroTime(at(30))));
        assert_eq!(taken.lease_transitions, Some(1));
        let after_release = claimed(Some(&released(&taken, at(31))), "a", DURATION, at(32));
        assert_eq!(
            after_release.lease_transitions,
            Some(1),
            "a free lease is no transition"
        );
    }
}
