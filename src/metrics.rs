//! Prometheus metrics: one process-global registry ([`global`]), served on `/metrics`
//! by [`crate::server`]. Every series is prefixed `keyward_`; labels are bounded (kind,
//! namespace and name of a key resource, provider *type*, fixed reason and operation
//! names, HTTP status codes) and never carry error text or key material.
//!
//! Every series with its meaning, and the alerts worth having: docs/operating.md.

use std::{
    collections::HashMap,
    sync::{Arc, LazyLock, Mutex},
    time::{Duration, Instant},
};

use kube::{Resource, ResourceExt};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet},
    metrics::{
        MetricType,
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Metric, Registry},
};

use crate::resources::KeyStatus;

/// Provider label when the key's provider has not been resolved (yet).
pub const UNKNOWN_PROVIDER: &str = "unknown";

/// The registry and every metric keyward records.
pub struct Metrics {
    registry: Registry,
    rotations: Family<RotationLabels, Counter>,
    revocations: Family<ProviderLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    upstream_requests: Family<UpstreamLabels, Counter>,
    upstream_duration: Family<UpstreamLabels, Histogram, fn() -> Histogram>,
    reconcile_duration: Family<ReconcileLabels, Histogram, fn() -> Histogram>,
    queue_depth: Family<KindLabels, Gauge>,
    leader: Gauge,
    /// Per key: its series and when its next requeue is due (for the queue depth).
    keys: KeySeries,
    /// Reconciles running now, per kind.
    in_flight: Mutex<HashMap<String, i64>>,
}

/// What keyward knows of one key resource.
#[derive(Debug, Default)]
struct KeyState {
    /// The provider type it last resolved to: the `provider` label of its series.
    provider: Option<&'static str>,
    /// Its status as last observed; no series until then.
    observed: Option<Observed>,
    due: Option<Instant>,
}

#[derive(Clone, Copy, Debug)]
struct Observed {
    ready: bool,
    expiry: Option<f64>,
    renewal: Option<f64>,
}

/// The per-key series (`key_ready`, `key_expiry_timestamp_seconds`,
/// `key_renewal_timestamp_seconds`), encoded from one entry per key at scrape time.
/// Kept as prometheus-client `Family`s they held a label set of four strings and a
/// gauge per series: three more hash-map entries for every upstream key, each table
/// 0.8 MiB at 4,000 keys (docs/performance.md#memory).
#[derive(Clone, Debug, Default)]
struct KeySeries(Arc<Mutex<HashMap<KeyRef, KeyState>>>);

impl KeySeries {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<KeyRef, KeyState>> {
        self.0.lock().expect("metrics lock")
    }

    /// Encodes one gauge over every observed key that `value` gives a value for.
    fn encode_gauge<V: EncodeGaugeValue>(
        keys: &HashMap<KeyRef, KeyState>,
        encoder: &mut DescriptorEncoder,
        (name, help): (&str, &str),
        value: impl Fn(&Observed) -> Option<V>,
    ) -> std::fmt::Result {
        let mut series = keys.iter().filter_map(|(key, state)| {
            let value = value(state.observed.as_ref()?)?;
            Some((key, state.provider.unwrap_or(UNKNOWN_PROVIDER), value))
        });
        // Like a Family, no descriptor while there is no series.
        let Some(first) = series.next() else {
            return Ok(());
        };
        let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (key, provider, value) in std::iter::once(first).chain(series) {
            let labels = [
                ("kind", key.kind.as_str()),
                ("namespace", key.namespace.as_str()),
                ("name", key.name.as_str()),
                ("provider", provider),
            ];
            metric.encode_family(&labels)?.encode_gauge(&value)?;
        }
        Ok(())
    }
}

impl Collector for KeySeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let keys = self.lock();
        Self::encode_gauge(&keys, &mut encoder, KEY_EXPIRY, |o| o.expiry)?;
        Self::encode_gauge(&keys, &mut encoder, KEY_RENEWAL, |o| o.renewal)?;
        Self::encode_gauge(&keys, &mut encoder, KEY_READY, |o| Some(i64::from(o.ready)))
    }
}

const KEY_EXPIRY: (&str, &str) = (
    "key_expiry_timestamp_seconds",
    "When the key currently in the Secret expires (Unix seconds); absent for keys without expiry",
);
const KEY_RENEWAL: (&str, &str) = (
    "key_renewal_timestamp_seconds",
    "When keyward will renew the key (Unix seconds); absent when the key is never renewed",
);
const KEY_READY: (&str, &str) = (
    "key_ready",
    "1 when the key resource's Ready condition is True, else 0",
);

/// Identifies one key resource in the metrics.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyRef {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl KeyRef {
    pub fn of<K: Resource<DynamicType = ()>>(key: &K) -> Self {
        Self {
            kind: K::kind(&()).into_owned(),
            namespace: key.namespace().unwrap_or_default(),
            name: key.name_any(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RotationLabels {
    kind: String,
    provider: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    kind: String,
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    kind: String,
    provider: String,
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    provider: String,
    operation: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcileLabels {
    kind: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

/// 5ms … ~41s, doubling: covers both a no-op reconcile and a slow upstream.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

/// Registers `metric` and hands it back, so each metric is declared in one place.
fn register<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &GLOBAL
}

/// The help text of `keyward_queue_depth`, explained in docs/operating.md.
pub const QUEUE_DEPTH_HELP: &str = "Approximate work queue of the controller: reconciles running now plus keys whose requested requeue (renewal, end of an overlap, expiry or error retry) is already due but has not started. Watch events still waiting inside the controller runtime are not visible and not counted.";

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("keyward");
        let r = &mut registry;
        let keys = KeySeries::default();
        r.register_collector(Box::new(keys.clone()));
        Self {
            rotations: register(
                r,
                "rotations",
                "Keys issued (first issue and every rotation), by lifecycle trigger reason",
                Family::default(),
            ),
            revocations: register(
                r,
                "revocations",
                "Keys revoked upstream (retired after rotation, orphans, and on delete)",
                Family::default(),
            ),
            failures: register(
                r,
                "failures",
                "Failed operations: issue, revoke, inspect (provider calls) and resolve (finding the provider, its policy and credentials)",
                Family::default(),
            ),
            upstream_requests: register(
                r,
                "upstream_requests",
                "HTTP requests to provider APIs, by status code (`error` when no response arrived)",
                Family::default(),
            ),
            upstream_duration: register(
                r,
                "upstream_request_duration_seconds",
                "Duration of HTTP requests to provider APIs",
                Family::new_with_constructor(seconds_histogram),
            ),
            reconcile_duration: register(
                r,
                "reconcile_duration_seconds",
                "Duration of one reconcile of a key resource, by result (ok or error)",
                Family::new_with_constructor(seconds_histogram),
            ),
            queue_depth: register(r, "queue_depth", QUEUE_DEPTH_HELP, Family::default()),
            leader: register(
                r,
                "leader",
                "1 while this process runs the controllers (holds the lease, or runs without leader election), else 0",
                Gauge::default(),
            ),
            keys,
            in_flight: Mutex::new(HashMap::new()),
            registry,
        }
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        self.refresh_queue_depth();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// A key's provider resolved to this provider type (`builtin`, `tailscale`, …);
    /// later series of the key carry it as their `provider` label.
    pub fn resolved(&self, key: &KeyRef, provider: &'static str) {
        self.keys.lock().entry(key.clone()).or_default().provider = Some(provider);
    }

    fn provider(&self, key: &KeyRef) -> &'static str {
        self.keys
            .lock()
            .get(key)
            .and_then(|s| s.provider)
            .unwrap_or(UNKNOWN_PROVIDER)
    }

    /// Sets the per-key series from the key's status (readiness, expiry, renewal).
    pub fn key_observed(&self, key: &KeyRef, status: Option<&KeyStatus>) {
        let seconds = |t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
            t.map(|t| t.0.as_millisecond() as f64 / 1000.0)
        };
        let observed = Observed {
            ready: status.is_some_and(KeyStatus::is_ready),
            expiry: seconds(status.and_then(|s| s.expires_at.as_ref())),
            renewal: seconds(status.and_then(|s| s.renewal_time.as_ref())),
        };
        self.keys.lock().entry(key.clone()).or_default().observed = Some(observed);
    }

    /// The key resource is gone (finalizer released): drop its series and state.
    pub fn key_forgotten(&self, key: &KeyRef) {
        self.keys.lock().remove(key);
    }

    /// A key was issued for `reason` (a lifecycle trigger reason).
    pub fn rotated(&self, key: &KeyRef, reason: &str) {
        self.rotations
            .get_or_create(&RotationLabels {
                kind: key.kind.clone(),
                provider: self.provider(key).to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A key was revoked upstream.
    pub fn revoked(&self, key: &KeyRef) {
        self.revocations
            .get_or_create(&ProviderLabels {
                kind: key.kind.clone(),
                provider: self.provider(key).to_owned(),
            })
            .inc();
    }

    /// An operation failed: `issue`, `revoke`, `inspect` or `resolve`.
    pub fn failed(&self, key: &KeyRef, operation: &'static str) {
        self.failures
            .get_or_create(&FailureLabels {
                kind: key.kind.clone(),
                provider: self.provider(key).to_owned(),
                operation: operation.to_owned(),
            })
            .inc();
    }

    /// One HTTP request to a provider API: `code` is the HTTP status as text, or
    /// `error` when no response arrived.
    pub fn upstream_request(&self, provider: &str, operation: &str, code: &str, seconds: f64) {
        let labels = UpstreamLabels {
            provider: provider.to_owned(),
            operation: operation.to_owned(),
            code: code.to_owned(),
        };
        self.upstream_requests.get_or_create(&labels).inc();
        self.upstream_duration
            .get_or_create(&labels)
            .observe(seconds);
    }

    /// A reconcile of `key` starts; pass the returned instant to [`Self::reconciled`].
    pub fn reconcile_started(&self, key: &KeyRef) -> Instant {
        if let Some(state) = self.keys.lock().get_mut(key) {
            state.due = None;
        }
        *self
            .in_flight
            .lock()
            .unwrap()
            .entry(key.kind.clone())
            .or_default() += 1;
        Instant::now()
    }

    /// A reconcile that started at `started` ended.
    pub fn reconciled(&self, key: &KeyRef, started: Instant, ok: bool) {
        if let Some(n) = self.in_flight.lock().unwrap().get_mut(&key.kind) {
            *n -= 1;
        }
        self.reconcile_duration
            .get_or_create(&ReconcileLabels {
                kind: key.kind.clone(),
                result: if ok { "ok" } else { "error" }.to_owned(),
            })
            .observe(started.elapsed().as_secs_f64());
    }

    /// The controller will requeue `key` after `wait` (None: only on a change).
    pub fn scheduled(&self, key: &KeyRef, wait: Option<Duration>) {
        if let Some(state) = self.keys.lock().get_mut(key) {
            state.due = wait.map(|w| Instant::now() + w);
        }
    }

    /// Whether this process runs the controllers.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(leader.into());
    }

    fn refresh_queue_depth(&self) {
        let now = Instant::now();
        let mut depth: HashMap<String, i64> = HashMap::new();
        for (key, state) in self.keys.lock().iter() {
            if state.due.is_some_and(|due| due <= now) {
                *depth.entry(key.kind.clone()).or_default() += 1;
            }
        }
        for (kind, n) in self.in_flight.lock().unwrap().iter() {
            *depth.entry(kind.clone()).or_default() += n;
        }
        for (kind, n) in depth {
            self.queue_depth.get_or_create(&KindLabels { kind }).set(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> KeyRef {
        KeyRef {
            kind: "AuthKey".into(),
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    fn ready_status() -> KeyStatus {
        serde_json::from_value(serde_json::json!({
            "conditions": [{"type": "Ready", "status": "True", "reason": "Issued",
                "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "expiresAt": "2026-01-02T00:00:00Z",
            "renewalTime": "2026-01-01T16:00:00Z",
        }))
        .unwrap()
    }

    #[test]
    fn key_series_follow_the_provider_and_go_with_the_key() {
        let m = Metrics::new();
        let k = key("a");
        m.key_observed(&k, Some(&ready_status()));
        let text = m.encode();
        assert!(
            text.contains(
                r#"keyward_key_ready{kind="AuthKey",namespace="ns",name="a",provider="unknown"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"keyward_key_expiry_timestamp_seconds{kind="AuthKey",namespace="ns",name="a",provider="unknown"} 1767312000"#), "{text}");

        m.resolved(&k, "builtin");
        m.key_observed(&k, Some(&ready_status()));
        let text = m.encode();
        assert!(
            !text.contains(r#"provider="unknown""#),
            "old series removed: {text}"
        );
        assert!(text.contains(r#"keyward_key_renewal_timestamp_seconds{kind="AuthKey",namespace="ns",name="a",provider="builtin"} 1767283200"#), "{text}");

        m.key_forgotten(&k);
        let text = m.encode();
        assert!(!text.contains(r#"name="a""#), "{text}");
    }

    #[test]
    fn a_key_without_expiry_has_only_its_ready_series_and_none_before_it_is_observed() {
        let m = Metrics::new();
        let k = key("c");
        m.resolved(&k, "builtin");
        assert!(!m.encode().contains("keyward_key_"), "not observed yet");
        m.key_observed(&k, None);
        let text = m.encode();
        assert!(
            text.contains(
                r#"keyward_key_ready{kind="AuthKey",namespace="ns",name="c",provider="builtin"} 0"#
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE keyward_key_ready gauge"), "{text}");
        assert!(!text.contains("keyward_key_expiry"), "{text}");
        assert!(!text.contains("keyward_key_renewal"), "{text}");
    }

    #[test]
    fn counters_carry_the_resolved_provider_type() {
        let m = Metrics::new();
        let k = key("b");
        m.failed(&k, "resolve");
        m.resolved(&k, "builtin");
        m.rotated(&k, "ForcedRotation");
        m.revoked(&k);
        m.upstream_request("builtin", "issue", "201", 0.2);
        let text = m.encode();
        for line in [
            r#"keyward_failures_total{kind="AuthKey",provider="unknown",operation="resolve"} 1"#,
            r#"keyward_rotations_total{kind="AuthKey",provider="builtin",reason="ForcedRotation"} 1"#,
            r#"keyward_revocations_total{kind="AuthKey",provider="builtin"} 1"#,
            r#"keyward_upstream_requests_total{provider="builtin",operation="issue",code="201"} 1"#,
            r#"keyward_upstream_request_duration_seconds_count{provider="builtin",operation="issue",code="201"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn queue_depth_counts_running_and_overdue_reconciles() {
        let m = Metrics::new();
        let (a, b, c) = (key("a"), key("b"), key("c"));
        for k in [&a, &b, &c] {
            m.resolved(k, "builtin");
        }
        let running = m.reconcile_started(&a);
        m.scheduled(&b, Some(Duration::ZERO));
        m.scheduled(&c, Some(Duration::from_secs(3600)));
        assert!(
            m.encode()
                .contains(r#"keyward_queue_depth{kind="AuthKey"} 2"#)
        );
        m.reconciled(&a, running, true);
        let started = m.reconcile_started(&b);
        m.reconciled(&b, started, false);
        let text = m.encode();
        assert!(
            text.contains(r#"keyward_queue_depth{kind="AuthKey"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"keyward_reconcile_duration_seconds_count{kind="AuthKey",result="error"} 1"#
            ),
            "{text}"
        );
    }
}
