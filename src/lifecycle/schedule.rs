//! When things happen: renewal, retirement, inspection, the landing window of an
//! issuance in flight, and the backoff after failures. Pure functions of spec, status
//! and the time they are given.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::{
    providers::{Capabilities, Refusal},
    resources::{IssueAttempt, IssueBackoff, KeyStatus, Rotation},
};

/// Default overlap: long enough for the kubelet to refresh a mounted Secret (about a
/// minute) and for a process to re-read it.
pub const DEFAULT_OVERLAP: Duration = Duration::from_secs(5 * 60);

/// Default time between two inspections of a key (providers that can tell).
pub const DEFAULT_INSPECT_INTERVAL: Duration = Duration::from_secs(3600);
/// Inspections are never more frequent than this, whatever the spec says.
pub const MIN_INSPECT_INTERVAL: Duration = Duration::from_secs(10);

/// The shortest time between issuing a key and renewing it. A configuration that
/// leaves less (`renewBefore` close to the lifetime) is refused at admission where
/// the schema can see both, and flagged by a condition where it cannot (a provider's
/// default lifetime); the key is then renewed this long after issuance, never in a
/// loop. Short on purpose: builtin keys of a few minutes are legitimate.
pub const MIN_RENEWAL_WINDOW: Duration = Duration::from_secs(10);

/// The longest wait after failed issuances.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// How long upstream requests may take, which decides how long an interrupted
/// issuance must be assumed to be still on its way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// The longest one issuance call may take (the executor gives up after it).
    pub issue_deadline: Duration,
    /// How long after an attempt started its create may still land upstream: the
    /// deadline, plus the time an upstream may still spend on a request its caller
    /// gave up on. Recovery looks for the attempt's key only after this.
    pub landing_window: Duration,
}

impl Timing {
    /// A window of twice the deadline.
    pub fn with_deadline(issue_deadline: Duration) -> Self {
        Self {
            issue_deadline,
            landing_window: issue_deadline * 2,
        }
    }
}

impl Default for Timing {
    fn default() -> Self {
        Self::with_deadline(Duration::from_secs(30))
    }
}

/// `t + d`, saturating at the end of time.
pub fn after(t: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

/// Down to the whole second: status stores times that way, and planning from the
/// same value before and after a round trip keeps reconciles write-free.
pub fn floor_second(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// Up to the next whole second, so that a wait stored in status is never cut short.
pub fn ceil_second(t: Timestamp) -> Timestamp {
    if t.subsec_nanosecond() == 0 {
        t
    } else {
        Timestamp::from_second(t.as_second() + 1).unwrap_or(t)
    }
}

/// The time between inspections of a key: `rotation.inspectInterval`, at least
/// [`MIN_INSPECT_INTERVAL`].
pub fn inspect_interval(rotation: &Rotation) -> Duration {
    rotation
        .inspect_interval
        .as_ref()
        .and_then(|d| d.to_std())
        .unwrap_or(DEFAULT_INSPECT_INTERVAL)
        .max(MIN_INSPECT_INTERVAL)
}

/// When the current key is next asked about upstream: one interval after the last
/// inspection (or after issuance). `None` when there is nothing to ask about: no key,
/// an issuance in flight, or a key already known to be invalid.
pub fn next_inspection(status: &KeyStatus, rotation: &Rotation) -> Option<Timestamp> {
    if status.key_id.is_none() || status.attempt.is_some() || status.invalid.is_some() {
        return None;
    }
    let last = status
        .last_inspected_at
        .as_ref()
        .or(status.created_at.as_ref())?
        .0;
    Some(after(last, inspect_interval(rotation)))
}

/// How long before expiry a key is renewed: `renewBefore`, or `renewBeforePercentage`
/// of the lifetime, or one third of the lifetime.
pub fn renew_before(lifetime: Duration, rotation: &Rotation) -> Duration {
    if let Some(d) = rotation.renew_before.as_ref().and_then(|d| d.to_std()) {
        return d;
    }
    if let Some(p) = rotation.renew_before_percentage {
        return lifetime * u32::from(p) / 100;
    }
    lifetime / 3
}

/// When a key is renewed, and whether the configuration left too short a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Renewal {
    pub at: Timestamp,
    /// `renewBefore` leaves less than [`MIN_RENEWAL_WINDOW`] of the lifetime: the key
    /// is renewed that long after issuance instead (or at expiry, if sooner).
    pub window_too_short: bool,
}

/// When a key is renewed: `renewBefore` ahead of expiry, moved earlier by a jitter so
/// that keys issued together do not all renew in the same second. The jitter is at
/// most a tenth of `renewBefore` and a tenth of the window between creation and that
/// point, so it never reaches creation: a renewal point close to creation stays where
/// the user put it. It is derived from `seed` (resource UID and revision), so every
/// reconcile computes the same time. Never after expiry.
pub fn renewal_time(
    created: Timestamp,
    expires: Option<Timestamp>,
    rotation: &Rotation,
    seed: &str,
) -> Option<Renewal> {
    let expires = expires?;
    let lifetime = Duration::try_from(expires.duration_since(created)).unwrap_or_default();
    let before = renew_before(lifetime, rotation);
    let window = lifetime.saturating_sub(before);
    let earliest = after(created, MIN_RENEWAL_WINDOW.min(lifetime));
    if window < MIN_RENEWAL_WINDOW {
        return Some(Renewal {
            at: earliest.min(expires),
            window_too_short: true,
        });
    }
    let jitter = (before.min(window) / 10).mul_f64(f64::from(seed_fraction(seed)));
    let point = after(created, window);
    let at = point
        .checked_sub(SignedDuration::try_from(jitter).unwrap_or_default())
        .unwrap_or(point);
    Some(Renewal {
        at: at.max(earliest).min(expires),
        window_too_short: false,
    })
}

/// A stable number in [0, 1) from a string.
fn seed_fraction(seed: &str) -> f32 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(seed.as_bytes());
    let n = u16::from_be_bytes([digest[0], digest[1]]);
    f32::from(n) / 65536.0
}

/// The overlap a rotation gives the old key.
pub fn overlap(rotation: &Rotation) -> Duration {
    rotation
        .overlap
        .as_ref()
        .and_then(|d| d.to_std())
        .unwrap_or(DEFAULT_OVERLAP)
}

/// 1s, 2s, 4s … after the n-th consecutive failure, capped at [`MAX_BACKOFF`].
pub fn backoff_after(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(9)).min(MAX_BACKOFF)
}

/// Until when an issuance must wait after failures: only while the failures were for
/// the same generation and rotate request (a change is a new request, tried at once).
pub fn backoff_until(
    backoff: Option<&IssueBackoff>,
    generation: Option<i64>,
    rotate_request: Option<&str>,
) -> Option<Timestamp> {
    let b = backoff?;
    let same = b.generation == generation && b.rotate_request.as_deref() == rotate_request;
    same.then(|| after(b.last_failure_time.0, backoff_after(b.failures)))
}

/// Until when an attempt's create may still land upstream (a second more: the
/// recorded start is rounded down to the second).
pub fn landing_deadline(attempt: &IssueAttempt, timing: &Timing) -> Timestamp {
    after(
        attempt.started_at.0,
        timing.landing_window + Duration::from_secs(1),
    )
}

/// The latest an attempt's create may be sent: half a deadline after it was
/// recorded, so that a create that went out, however slowly, still lands inside the
/// landing window. An attempt whose status write took longer is not sent; it is
/// recovered like an interrupted one.
pub fn send_by(attempt: &IssueAttempt, timing: &Timing) -> Timestamp {
    after(attempt.started_at.0, timing.issue_deadline / 2)
}

/// The requested lifetime, or the provider's default, checked against its bounds.
pub fn lifetime(
    requested: Option<Duration>,
    caps: &Capabilities,
) -> Result<Option<Duration>, Refusal> {
    let lifetime = requested.or(caps.default_lifetime);
    match (lifetime, caps.min_lifetime, caps.max_lifetime) {
        (Some(l), _, Some(max)) if l > max => Err(Refusal {
            reason: "ExpiryOutOfRange",
            message: format!(
                "spec.expiry asks for {}s but the provider grants at most {}s; lower spec.expiry",
                l.as_secs(),
                max.as_secs()
            ),
        }),
        (Some(l), Some(min), _) if l < min => Err(Refusal {
            reason: "ExpiryOutOfRange",
            message: format!(
                "spec.expiry asks for {}s but the provider needs at least {}s; raise spec.expiry",
                l.as_secs(),
                min.as_secs()
            ),
        }),
        _ => Ok(lifetime),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn rotation(renew_before: &str) -> Rotation {
        Rotation {
            renew_before: Some(renew_before.into()),
            ..Default::default()
        }
    }

    #[test]
    fn renewal_defaults_to_a_third_of_the_lifetime_with_bounded_jitter() {
        let created = ts("2026-01-01T00:00:00Z");
        let expires = ts("2026-01-31T00:00:00Z"); // 30 days
        let r = renewal_time(created, Some(expires), &Rotation::default(), "uid/1").unwrap();
        let before = expires.duration_since(r.at).as_secs();
        let third = 10 * 86400;
        assert!(before >= third && before <= third + third / 10, "{before}");
        assert!(!r.window_too_short);
        assert_eq!(
            r,
            renewal_time(created, Some(expires), &Rotation::default(), "uid/1").unwrap(),
            "stable across reconciles"
        );
    }

    #[test]
    fn renewal_follows_renew_before_and_percentage() {
        let created = ts("2026-01-01T00:00:00Z");
        let expires = ts("2026-01-01T10:00:00Z");
        let at = renewal_time(created, Some(expires), &rotation("1h"), "s")
            .unwrap()
            .at;
        let before = expires.duration_since(at).as_secs();
        assert!((3600..=3960).contains(&before), "{before}");
        let percentage = Rotation {
            renew_before_percentage: Some(50),
            ..Default::default()
        };
        let at = renewal_time(created, Some(expires), &percentage, "s")
            .unwrap()
            .at;
        let before = expires.duration_since(at).as_secs();
        assert!((18000..=19800).contains(&before), "{before}");
    }

    /// Finding 7: `expiry: 24h` with `renewBefore: 23h50m` (and `1h` keys with `58m`)
    /// renewed at creation, again and again. The jitter now stays inside the window.
    #[test]
    fn renew_before_close_to_the_lifetime_renews_inside_the_window_not_at_creation() {
        for (lifetime, before) in [(24 * 3600, "23h50m"), (3600, "58m"), (3600, "59m")] {
            let created = ts("2026-01-01T00:00:00Z");
            let expires = after(created, Duration::from_secs(lifetime));
            for seed in ["a", "b", "c", "d", "uid/7"] {
                let r = renewal_time(created, Some(expires), &rotation(before), seed).unwrap();
                let after_creation = r.at.duration_since(created).as_secs_f64();
                let window = lifetime as f64
                    - renew_before(Duration::from_secs(lifetime), &rotation(before)).as_secs_f64();
                assert!(
                    after_creation >= window * 0.9 && after_creation <= window,
                    "{lifetime}s/{before}: renews {after_creation}s after creation (window {window}s)"
                );
                assert!(!r.window_too_short);
            }
        }
    }

    #[test]
    fn a_window_below_the_minimum_is_flagged_and_renews_after_the_minimum() {
        let created = ts("2026-01-01T00:00:00Z");
        let expires = ts("2026-01-01T01:00:00Z");
        let r = renewal_time(created, Some(expires), &rotation("59m55s"), "s").unwrap();
        assert!(r.window_too_short);
        assert_eq!(r.at, after(created, MIN_RENEWAL_WINDOW));
        // renewBefore longer than the lifetime (a provider default shorter than it).
        let r = renewal_time(created, Some(expires), &rotation("2h"), "s").unwrap();
        assert!(r.window_too_short);
        assert_eq!(r.at, after(created, MIN_RENEWAL_WINDOW));
        // A lifetime shorter than the minimum renews at expiry: once per key.
        let short = ts("2026-01-01T00:00:05Z");
        let r = renewal_time(created, Some(short), &Rotation::default(), "s").unwrap();
        assert_eq!(r.at, short);
        assert_eq!(renewal_time(created, None, &rotation("1h"), "s"), None);
    }

    #[test]
    fn inspections_follow_the_interval_and_stop_once_the_key_is_invalid() {
        let mut status = KeyStatus {
            key_id: Some("k1".into()),
            created_at: Some(Time(ts("2026-01-01T00:00:00Z"))),
            ..Default::default()
        };
        let rotation = Rotation {
            inspect_interval: Some("10m".into()),
            ..Default::default()
        };
        assert_eq!(
            next_inspection(&status, &rotation),
            Some(ts("2026-01-01T00:10:00Z"))
        );
        status.last_inspected_at = Some(Time(ts("2026-01-01T01:00:00Z")));
        assert_eq!(
            next_inspection(&status, &rotation),
            Some(ts("2026-01-01T01:10:00Z"))
        );
        let too_often = Rotation {
            inspect_interval: Some("1s".into()),
            ..Default::default()
        };
        assert_eq!(inspect_interval(&too_often), MIN_INSPECT_INTERVAL);
        assert_eq!(
            inspect_interval(&Rotation::default()),
            DEFAULT_INSPECT_INTERVAL
        );
        status.invalid = Some("Revoked".into());
        assert_eq!(next_inspection(&status, &rotation), None);
    }

    #[test]
    fn backoff_doubles_to_a_cap_and_ends_with_a_new_request() {
        assert_eq!(backoff_after(1), Duration::from_secs(1));
        assert_eq!(backoff_after(3), Duration::from_secs(4));
        assert_eq!(backoff_after(40), MAX_BACKOFF);
        let b = IssueBackoff {
            failures: 2,
            last_failure_time: Time(ts("2026-01-01T00:00:00Z")),
            generation: Some(3),
            rotate_request: None,
            reason: "IssueFailed".into(),
            message: "503".into(),
        };
        assert_eq!(
            backoff_until(Some(&b), Some(3), None),
            Some(ts("2026-01-01T00:00:02Z"))
        );
        assert_eq!(backoff_until(Some(&b), Some(4), None), None, "spec changed");
        assert_eq!(
            backoff_until(Some(&b), Some(3), Some("x")),
            None,
            "rotate asked"
        );
    }

    #[test]
    fn lifetime_bounds_say_which_way_to_move() {
        let caps = Capabilities {
            min_lifetime: Some(Duration::from_secs(86400)),
            max_lifetime: Some(Duration::from_secs(90 * 86400)),
            default_lifetime: Some(Duration::from_secs(86400)),
            ..Default::default()
        };
        assert_eq!(lifetime(None, &caps), Ok(Some(Duration::from_secs(86400))));
        let short = lifetime(Some(Duration::from_secs(60)), &caps).unwrap_err();
        assert!(
            short.message.contains("raise spec.expiry"),
            "{}",
            short.message
        );
        let long = lifetime(Some(Duration::from_secs(91 * 86400)), &caps).unwrap_err();
        assert!(
            long.message.contains("lower spec.expiry"),
            "{}",
            long.message
        );
    }

    #[test]
    fn whole_seconds_round_the_safe_way() {
        let t = ts("2026-01-01T00:00:00.4Z");
        assert_eq!(floor_second(t), ts("2026-01-01T00:00:00Z"));
        assert_eq!(ceil_second(t), ts("2026-01-01T00:00:01Z"));
        assert_eq!(
            ceil_second(ts("2026-01-01T00:00:01Z")),
            ts("2026-01-01T00:00:01Z")
        );
    }
}
