//! The operator: its leader Lease held and renewed within the lease duration (the
//! rule standbys use to take over, [`crate::leader::can_take`]), and `/readyz`
//! through the API server's service proxy when a metrics Service exists.

use jiff::Timestamp;
use k8s_openapi::api::{
    coordination::v1::{Lease, LeaseSpec},
    core::v1::Service,
};
use kube::{Api, Client, ResourceExt, api::ListParams};

use super::{Area, Finding};
use crate::cli::output::relative;

/// The verdict on the leader Lease `namespace/name` at `now` (`lease`: `None` when
/// it does not exist).
pub fn lease_finding(
    namespace: &str,
    name: &str,
    lease: Option<&LeaseSpec>,
    now: Timestamp,
) -> Finding {
    let subject = format!("Lease {namespace}/{name}");
    let look = format!(
        "look at the operator's pods and logs: `kubectl -n {namespace} get pods -l app.kubernetes.io/name=keyward` and `kubectl -n {namespace} logs -l app.kubernetes.io/name=keyward`"
    );
    let Some(spec) = lease else {
        return Finding::problem(
            Area::Operator,
            subject,
            format!(
                "does not exist: no keyward with leader election has run in namespace {namespace}"
            ),
            format!(
                "install keyward with the chart, which turns leader election on (`helm install keyward charts/keyward -n {namespace} --create-namespace`), or point doctor at it with --operator-namespace and --lease-name; an operator started without --leader-elect holds no Lease, so doctor cannot see it; {look}"
            ),
        );
    };
    let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
    let renewed = spec.renew_time.as_ref().map(|t| t.0);
    let ago = renewed.map_or_else(|| "never".into(), |t| relative(t, now));
    // Free for anyone to take: the rule a standby applies (`""` is nobody's identity).
    if !crate::leader::can_take(Some(spec), "", now) {
        return Finding::ok(
            Area::Operator,
            subject,
            format!("held by {}, renewed {ago}", holder.unwrap_or_default()),
        );
    }
    let detail = match holder {
        None => format!(
            "no leader: the last one released the Lease {ago} (a clean shutdown) and no replica took it over"
        ),
        Some(h) => format!(
            "no leader: {h} last renewed the Lease {ago}, more than its {}s lease duration",
            spec.lease_duration_seconds.unwrap_or_default()
        ),
    };
    Finding::problem(
        Area::Operator,
        subject,
        format!("{detail}; keyward is not running, so no key is issued, renewed or revoked"),
        format!(
            "start the operator (`kubectl -n {namespace} scale deployment -l app.kubernetes.io/name=keyward --replicas=2`, or `helm upgrade`); {look}"
        ),
    )
}

/// How long `/readyz` may take through the service proxy.
const READYZ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The metrics Service of the operator: the chart labels it and names its port.
fn metrics_port(service: &Service) -> Option<String> {
    let ports = service.spec.as_ref()?.ports.as_ref()?;
    ports
        .iter()
        .find(|p| p.name.as_deref() == Some("http-metrics"))
        .map(|p| p.name.clone().unwrap_or_default())
}

pub(super) async fn check(
    client: &Client,
    namespace: &str,
    lease_name: &str,
    now: Timestamp,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    findings.push(match leases.get_opt(lease_name).await {
        Ok(lease) => lease_finding(
            namespace,
            lease_name,
            lease
                .as_ref()
                .map(|l| l.spec.clone().unwrap_or_default())
                .as_ref(),
            now,
        ),
        Err(e) => Finding::problem(
            Area::Operator,
            format!("Lease {namespace}/{lease_name}"),
            format!("cannot read it: {}", crate::cli::api_message(&e)),
            format!("reading the Lease needs get on leases.coordination.k8s.io in {namespace}"),
        ),
    });

    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let selector = ListParams::default().labels("app.kubernetes.io/name=keyward");
    let found = match services.list(&selector).await {
        Ok(list) => list
            .items
            .into_iter()
            .find_map(|s| metrics_port(&s).map(|p| (s.name_any(), p))),
        Err(e) => {
            findings.push(Finding::skipped(
                Area::Operator,
                "/readyz",
                format!(
                    "cannot list Services in {namespace}: {}",
                    crate::cli::api_message(&e)
                ),
            ));
            return findings;
        }
    };
    let Some((service, port)) = found else {
        findings.push(Finding::skipped(
            Area::Operator,
            "/readyz",
            format!("no metrics Service labelled app.kubernetes.io/name=keyward in {namespace}, so /readyz was not asked"),
        ));
        return findings;
    };
    let path = format!("/api/v1/namespaces/{namespace}/services/{service}:{port}/proxy/readyz");
    let request = http::Request::get(&path)
        .body(Vec::new())
        .expect("a valid request");
    let subject = format!("/readyz of Service {namespace}/{service}");
    // The proxy dials the Service's pods; without one it can hang until a TCP timeout.
    let failure = match tokio::time::timeout(READYZ_TIMEOUT, client.request_text(request)).await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(crate::cli::api_message(&e)),
        Err(_) => Some(format!("no answer within {}s", READYZ_TIMEOUT.as_secs())),
    };
    findings.push(match failure {
        None => Finding::ok(
            Area::Operator,
            subject,
            "ready (through the API server's service proxy)",
        ),
        Some(why) => Finding::problem(
            Area::Operator,
            subject,
            format!("the API server's service proxy got no ready answer: {why}"),
            format!(
                "`kubectl -n {namespace} get pods,endpointslices -l app.kubernetes.io/name=keyward`: a pod must be Ready behind the Service, and a NetworkPolicy must let the API server reach port {port}"
            ),
        ),
    });
    findings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::doctor::Verdict;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn lease(holder: Option<&str>, renewed: &str, seconds: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            renew_time: Some(MicroTime(ts(renewed))),
            lease_duration_seconds: Some(seconds),
            ..Default::default()
        }
    }

    #[test]
    fn the_lease_says_whether_an_operator_leads() {
        let now = ts("2026-01-01T00:01:00Z");
        let held = lease_finding(
            "kw",
            "keyward",
            Some(&lease(Some("pod-a"), "2026-01-01T00:00:55Z", 15)),
            now,
        );
        assert_eq!(held.verdict, Verdict::Ok);
        assert_eq!(held.detail, "held by pod-a, renewed 5s ago");

        let expired = lease_finding(
            "kw",
            "keyward",
            Some(&lease(Some("pod-a"), "2026-01-01T00:00:00Z", 15)),
            now,
        );
        assert_eq!(expired.verdict, Verdict::Problem);
        assert!(
            expired
                .detail
                .contains("pod-a last renewed the Lease 1m ago, more than its 15s"),
            "{}",
            expired.detail
        );
        assert!(expired.fix.unwrap().contains("kubectl -n kw logs"));

        let released = lease_finding(
            "kw",
            "keyward",
            Some(&lease(None, "2026-01-01T00:00:50Z", 1)),
            now,
        );
        assert!(
            released.detail.contains("released the Lease 10s ago"),
            "{}",
            released.detail
        );

        let none = lease_finding("kw", "keyward", None, now);
        assert!(none.fix.unwrap().contains("helm install keyward"));
    }
}
