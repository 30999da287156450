//! Whether a key needs a new issuance, and why: an ordered chain of rules, like
//! cert-manager's trigger policies. The reason ends up in conditions and events.

use jiff::Timestamp;

use crate::resources::KeyStatus;

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
    pub const ALL: [Trigger; 8] = [
        Trigger::Initial,
        Trigger::SpecChanged,
        Trigger::ForcedRotation,
        Trigger::SecretMissing,
        Trigger::SecretMismatch,
        Trigger::KeyInvalid,
        Trigger::Expired,
        Trigger::Renewing,
    ];

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

    /// The trigger a recorded reason names (an unknown one reads as a renewal: the
    /// previous key keeps its overlap, the safe side for a workload).
    pub fn from_reason(reason: &str) -> Trigger {
        Trigger::ALL
            .into_iter()
            .find(|t| t.reason() == reason)
            .unwrap_or(Trigger::Renewing)
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

    /// Whether the key in the Secret is still the one the resource asks for while
    /// this issuance is on its way (a renewal or a forced rotation replaces a good
    /// key; every other trigger means the Secret does not hold what the spec asks).
    pub fn current_key_stays_ready(self) -> bool {
        matches!(self, Trigger::ForcedRotation | Trigger::Renewing)
    }

    /// Whether the trigger was read off the Secret, whose cached copy can lag behind
    /// keyward's own write of it: such a trigger is confirmed with a fresh read.
    pub fn reads_the_secret(self) -> bool {
        matches!(self, Trigger::SecretMissing | Trigger::SecretMismatch)
    }
}

/// What the trigger chain looks at.
pub struct TriggerInput<'a> {
    pub status: &'a KeyStatus,
    /// Digest of the current spec's shape.
    pub shape: &'a str,
    /// Value of `keyward.dev/rotate`, if set.
    pub rotate_request: Option<&'a str>,
    /// Digest of the data of the Secret the spec names; `None` when it does not exist.
    pub secret_hash: Option<&'a str>,
    /// `rotation.reissueWhenInvalid` (default true).
    pub reissue_when_invalid: bool,
    /// When the current key is due for renewal.
    pub renewal: Option<Timestamp>,
    pub now: Timestamp,
}

/// Whether a new key is needed, and why. The order matters: a spec change that moves
/// the Secret must not be mistaken for a deleted Secret.
pub fn trigger(o: &TriggerInput) -> Option<Trigger> {
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
    if let Some(renewal) = o.renewal
        && o.now >= renewal
    {
        return Some(Trigger::Renewing);
    }
    None
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
            ..Default::default()
        }
    }

    fn input<'a>(status: &'a KeyStatus, now: &str) -> TriggerInput<'a> {
        TriggerInput {
            status,
            shape: "shape",
            rotate_request: None,
            secret_hash: Some("h"),
            reissue_when_invalid: true,
            renewal: Some(ts("2026-01-20T00:00:00Z")),
            now: ts(now),
        }
    }

    #[test]
    fn nothing_is_due_while_the_key_is_fresh() {
        let status = ready_status();
        assert_eq!(trigger(&input(&status, "2026-01-10T00:00:00Z")), None);
    }

    #[test]
    fn each_trigger_in_its_place() {
        let status = ready_status();
        let fresh = "2026-01-10T00:00:00Z";
        let none = KeyStatus::default();
        let cases: Vec<(TriggerInput, Option<Trigger>, &str)> = vec![
            (input(&none, fresh), Some(Trigger::Initial), "no key"),
            (
                TriggerInput {
                    shape: "other",
                    secret_hash: None,
                    ..input(&status, fresh)
                },
                Some(Trigger::SpecChanged),
                "a spec change that moves the Secret is not a deleted Secret",
            ),
            (
                TriggerInput {
                    secret_hash: None,
                    ..input(&status, fresh)
                },
                Some(Trigger::SecretMissing),
                "Secret deleted",
            ),
            (
                TriggerInput {
                    secret_hash: Some("edited"),
                    ..input(&status, fresh)
                },
                Some(Trigger::SecretMismatch),
                "Secret edited",
            ),
            (
                TriggerInput {
                    rotate_request: Some("1"),
                    ..input(&status, fresh)
                },
                Some(Trigger::ForcedRotation),
                "rotate annotation",
            ),
            (
                input(&status, "2026-01-25T00:00:00Z"),
                Some(Trigger::Renewing),
                "renewal due",
            ),
            (
                input(&status, "2026-02-02T00:00:00Z"),
                Some(Trigger::Expired),
                "expired",
            ),
        ];
        for (case, expected, what) in cases {
            assert_eq!(trigger(&case), expected, "{what}");
        }
        let handled = KeyStatus {
            rotate_request: Some("1".into()),
            ..ready_status()
        };
        assert_eq!(
            trigger(&TriggerInput {
                rotate_request: Some("1"),
                ..input(&handled, fresh)
            }),
            None,
            "a rotate request is acted on once"
        );
        let invalid = KeyStatus {
            invalid: Some("UsedUp".into()),
            ..ready_status()
        };
        assert_eq!(trigger(&input(&invalid, fresh)), Some(Trigger::KeyInvalid));
        assert_eq!(
            trigger(&TriggerInput {
                reissue_when_invalid: false,
                ..input(&invalid, fresh)
            }),
            None,
            "an invalid key is left alone when reissueWhenInvalid is false"
        );
    }

    #[test]
    fn reasons_round_trip() {
        for t in Trigger::ALL {
            assert_eq!(Trigger::from_reason(t.reason()), t);
        }
        assert_eq!(Trigger::from_reason("Unknown"), Trigger::Renewing);
    }
}
