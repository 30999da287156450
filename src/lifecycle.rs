//! The lifecycle decisions, as pure functions of spec, status, Secret and clock:
//! whether to issue a new key and why, when to renew, how the old key retires.
//! "When do we rotate?" is answered here and nowhere else.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::resources::{KeyStatus, Rotation};

/// Default overlap: long enough for the kubelet to refresh a mounted Secret (about a
/// minute) and for a process to re-read it.
pub const DEFAULT_OVERLAP: Duration = Duration::from_secs(5 * 60);

/// Default time between two inspections of a key (providers that can tell).
pub const DEFAULT_INSPECT_INTERVAL: Duration = Duration::from_secs(3600);
/// Inspections are never more frequent than this, whatever the spec says.
pub const MIN_INSPECT_INTERVAL: Duration = Duration::from_secs(10);

/// The annotation that forces a rotation when its value changes.
pub const ROTATE_ANNOTATION: &str = "keyward.dev/rotate";

/// Why a new key is issued. The names end up as condition reasons and event reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// No key yet.
    Initial,
    /// The spec changed in a way that shapes the key or its Secret.
    SpecChanged,
    /// `keyward.dev/rotate` got a new value.
    ForcedRotation,
    /// The Secret is gone: the key in it can no longer be vouched for.
    SecretMissing,
    /// The Secret's data was edited: the same.
    SecretMismatch,
    /// The upstream says the current key no longer works (used up, revoked in a
    /// console, expired early) and `reissueWhenInvalid` is on.
    KeyInvalid,
    /// The current key expired (keyward was not running at renewal time).
    Expired,
    /// Renewal time reached.
    Renewing,
}

impl Trigger {
    pub fn reason(self) -> &'static str {
        match self {
            Trigger::Initial => "Initial",
            Trigger::SpecChanged => "SpecChanged",
            Trigger::ForcedRotation => "ForcedRotation",
            Trigger::SecretMissing => "SecretMissing",
            Trigger::SecretMismatch => "SecretMismatch",
            Trigger::KeyInvalid => "KeyInvalid",
            Trigger::Expired => "Expired",
            Trigger::Renewing => "Renewing",
        }
    }

    /// Whether the previous key keeps working for the overlap. A key that left
    /// keyward's hands (Secret deleted or edited), stopped working or expired is
    /// revoked at once.
    pub fn retire_with_overlap(self) -> bool {
        matches!(
            self,
            Trigger::SpecChanged | Trigger::ForcedRotation | Trigger::Renewing
        )
    }
}

/// What keyward sees right now, for one key resource.
pub struct Observed<'a> {
    pub status: &'a KeyStatus,
    /// Digest of the current spec's shape.
    pub shape: &'a str,
    /// Value of `keyward.dev/rotate`, if set.
    pub rotate_request: Option<&'a str>,
    /// Digest of the Secret's data as it is now; `None` when the Secret does not exist.
    pub secret_hash: Option<&'a str>,
    /// `rotation.reissueWhenInvalid` (default true).
    pub reissue_when_invalid: bool,
    pub now: Timestamp,
}

/// Whether a new key is needed, and why. The order matters: a spec change that moves
/// the Secret must not be mistaken for a deleted Secret.
pub fn trigger(o: &Observed) -> Option<Trigger> {
    let status = o.status;
    if status.key_id.is_none() {
        return Some(Trigger::Initial);
    }
    if status.shape.as_deref() != Some(o.shape) {
        return Some(Trigger::SpecChanged);
    }
    match o.secret_hash {
        None => return Some(Trigger::SecretMissing),
        Some(hash) if status.secret_hash.as_deref() != Some(hash) => {
            return Some(Trigger::SecretMismatch);
        }
        _ => {}
    }
    if status.invalid.is_some() && o.reissue_when_invalid {
        return Some(Trigger::KeyInvalid);
    }
    if let Some(expires) = &status.expires_at
        && o.now >= expires.0
    {
        return Some(Trigger::Expired);
    }
    if o.rotate_request.is_some() && o.rotate_request != status.rotate_request.as_deref() {
        return Some(Trigger::ForcedRotation);
    }
    if let Some(renewal) = &status.renewal_time
        && o.now >= renewal.0
    {
        return Some(Trigger::Renewing);
    }
    None
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
    let interval = SignedDuration::try_from(inspect_interval(rotation)).ok()?;
    last.checked_add(interval).ok()
}

/// How long before expiry a key is renewed: `renewBefore`, or `renewBeforePercentage`
/// of the lifetime, or one third of the lifetime.
pub fn renew_before(lifetime: Duration, rotation: &Rotation) -> Duration {
    if let Some(d) = rotation.renew_before.as_ref().and_then(|d| d.to_std()) {
        return d.min(lifetime);
    }
    if let Some(p) = rotation.renew_before_percentage {
        return lifetime * u32::from(p) / 100;
    }
    lifetime / 3
}

/// When a key is renewed: `renewBefore` ahead of expiry, moved earlier by up to a
/// tenth of `renewBefore` so that keys issued together do not all renew at the same
/// second. The jitter is derived from `seed` (resource UID and revision), so every
/// reconcile computes the same time. Never after expiry, never before creation.
pub fn renewal_time(
    created: Timestamp,
    expires: Option<Timestamp>,
    rotation: &Rotation,
    seed: &str,
) -> Option<Timestamp> {
    let expires = expires?;
    let lifetime = expires.duration_since(created).max(SignedDuration::ZERO);
    let lifetime = Duration::try_from(lifetime).unwrap_or_default();
    let before = renew_before(lifetime, rotation);
    let jitter = before / 10;
    let fraction = f64::from(seed_fraction(seed));
    let jitter = jitter.mul_f64(fraction);
    let at = expires
        .checked_sub(SignedDuration::try_from(before + jitter).unwrap_or(SignedDuration::MAX))
        .unwrap_or(created);
    Some(at.max(created).min(expires))
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

/// The marker that identifies one issuance upstream: short enough for Tailscale's
/// 50-character descriptions next to the user's text. `kw:` + the first 8 characters
/// of the resource UID + `.` + the attempt id.
pub fn marker(uid: &str, attempt: &str) -> String {
    let uid: String = uid.chars().filter(|c| *c != '-').take(8).collect();
    format!("kw:{uid}.{attempt}")
}

/// A fresh attempt id: 8 hex characters from the OS RNG.
pub fn attempt_id() -> String {
    let mut buf = [0u8; 4];
    getrandom::fill(&mut buf).expect("operating system RNG");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn ready_status() -> KeyStatus {
        KeyStatus {
            key_id: Some("k1".into()),
            shape: Some("shape".into()),
            secret_hash: Some("h".into()),
            expires_at: Some(Time(ts("2026-02-01T00:00:00Z"))),
            renewal_time: Some(Time(ts("2026-01-20T00:00:00Z"))),
            ..Default::default()
        }
    }

    fn observe<'a>(status: &'a KeyStatus, now: &str) -> Observed<'a> {
        Observed {
            status,
            shape: "shape",
            rotate_request: None,
            secret_hash: Some("h"),
            reissue_when_invalid: true,
            now: ts(now),
        }
    }

    #[test]
    fn nothing_is_due_while_the_key_is_fresh() {
        let status = ready_status();
        assert_eq!(trigger(&observe(&status, "2026-01-10T00:00:00Z")), None);
    }

    #[test]
    fn each_trigger_in_its_place() {
        let status = ready_status();
        let fresh = "2026-01-10T00:00:00Z";
        assert_eq!(
            trigger(&observe(&KeyStatus::default(), fresh)),
            Some(Trigger::Initial)
        );
        assert_eq!(
            trigger(&Observed {
                shape: "other",
                secret_hash: None,
                ..observe(&status, fresh)
            }),
            Some(Trigger::SpecChanged),
            "a spec change that moves the Secret is not a deleted Secret"
        );
        assert_eq!(
            trigger(&Observed {
                secret_hash: None,
                ..observe(&status, fresh)
            }),
            Some(Trigger::SecretMissing)
        );
        assert_eq!(
            trigger(&Observed {
                secret_hash: Some("edited"),
                ..observe(&status, fresh)
            }),
            Some(Trigger::SecretMismatch)
        );
        assert_eq!(
            trigger(&Observed {
                rotate_request: Some("1"),
                ..observe(&status, fresh)
            }),
            Some(Trigger::ForcedRotation)
        );
        let handled = KeyStatus {
            rotate_request: Some("1".into()),
            ..ready_status()
        };
        assert_eq!(
            trigger(&Observed {
                rotate_request: Some("1"),
                ..observe(&handled, fresh)
            }),
            None,
            "a rotate request is acted on once"
        );
        assert_eq!(
            trigger(&observe(&status, "2026-01-25T00:00:00Z")),
            Some(Trigger::Renewing)
        );
        let invalid = KeyStatus {
            invalid: Some("UsedUp".into()),
            ..ready_status()
        };
        assert_eq!(
            trigger(&observe(&invalid, fresh)),
            Some(Trigger::KeyInvalid)
        );
        assert_eq!(
            trigger(&Observed {
                reissue_when_invalid: false,
                ..observe(&invalid, fresh)
            }),
            None,
            "an invalid key is left alone when reissueWhenInvalid is false"
        );
        assert_eq!(
            trigger(&observe(&status, "2026-02-02T00:00:00Z")),
            Some(Trigger::Expired)
        );
    }

    #[test]
    fn renewal_defaults_to_a_third_of_the_lifetime_with_bounded_jitter() {
        let created = ts("2026-01-01T00:00:00Z");
        let expires = ts("2026-01-31T00:00:00Z"); // 30 days
        let at = renewal_time(created, Some(expires), &Rotation::default(), "uid/1").unwrap();
        let before = expires.duration_since(at).as_secs();
        let third = 10 * 86400;
        assert!(before >= third && before <= third + third / 10, "{before}");
        assert_eq!(
            at,
            renewal_time(created, Some(expires), &Rotation::default(), "uid/1").unwrap(),
            "stable across reconciles"
        );
    }

    #[test]
    fn renewal_follows_renew_before_and_percentage() {
        let created = ts("2026-01-01T00:00:00Z");
        let expires = ts("2026-01-01T10:00:00Z");
        let rotation = Rotation {
            renew_before: Some("1h".into()),
            ..Default::default()
        };
        let at = renewal_time(created, Some(expires), &rotation, "s").unwrap();
        let before = expires.duration_since(at).as_secs();
        assert!((3600..=3960).contains(&before), "{before}");
        let rotation = Rotation {
            renew_before_percentage: Some(50),
            ..Default::default()
        };
        let at = renewal_time(created, Some(expires), &rotation, "s").unwrap();
        let before = expires.duration_since(at).as_secs();
        assert!((18000..=19800).contains(&before), "{before}");
    }

    #[test]
    fn renewal_is_never_after_expiry_nor_before_creation() {
        let created = ts("2026-01-01T00:00:00Z");
        let expires = ts("2026-01-01T00:01:00Z");
        let rotation = Rotation {
            renew_before: Some("2h".into()),
            ..Default::default()
        };
        let at = renewal_time(created, Some(expires), &rotation, "s").unwrap();
        assert!(at >= created && at <= expires);
        assert_eq!(renewal_time(created, None, &rotation, "s"), None);
    }

    #[test]
    fn inspections_follow_the_interval_and_stop_once_the_key_is_invalid() {
        let mut status = KeyStatus {
            created_at: Some(Time(ts("2026-01-01T00:00:00Z"))),
            ..ready_status()
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
    fn markers_fit_a_short_description() {
        let m = marker("0b6e7c2a-1f0e-4c49-9a7e-2a8f0c1d2e3f", "deadbeef");
        assert_eq!(m, "kw:0b6e7c2a.deadbeef");
        assert!(m.len() <= 20);
        assert_eq!(attempt_id().len(), 8);
    }
}
