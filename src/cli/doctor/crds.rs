//! CRDs: installed, Established, and the same as this binary generates.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, Client, ResourceExt};
use serde_json::Value;

use super::{Area, Finding};

const APPLY_CRDS: &str = "apply the CRDs of this keyward version: `keyward crds | kubectl apply --server-side --force-conflicts -f -`, or `-f crds/` from its repository (Helm installs CRDs on first install only and never upgrades them)";

/// The first place where the cluster's CRD differs from this binary's, or `None`.
///
/// Group, scope and versions must be equal; the cluster may add names the API server
/// fills in (`listKind`).
pub fn crd_difference(
    expected: &CustomResourceDefinition,
    live: &CustomResourceDefinition,
) -> Option<String> {
    let expected = serde_json::to_value(&expected.spec).unwrap_or_default();
    let live = serde_json::to_value(&live.spec).unwrap_or_default();
    for (field, extras_allowed) in [
        ("group", false),
        ("scope", false),
        ("names", true),
        ("versions", false),
    ] {
        if let Some(d) = first_difference(
            &format!("spec.{field}"),
            &expected[field],
            &live[field],
            extras_allowed,
        ) {
            return Some(d);
        }
    }
    None
}

fn brief(v: &Value) -> String {
    let text = v.to_string();
    if text.chars().count() > 60 {
        format!("{}…", text.chars().take(60).collect::<String>())
    } else {
        text
    }
}

fn first_difference(path: &str, expected: &Value, live: &Value, extras: bool) -> Option<String> {
    match (expected, live) {
        (Value::Object(e), Value::Object(l)) => {
            for (k, v) in e {
                let at = format!("{path}.{k}");
                match l.get(k) {
                    None => return Some(format!("{at} is missing in the cluster")),
                    Some(w) => {
                        if let Some(d) = first_difference(&at, v, w, extras) {
                            return Some(d);
                        }
                    }
                }
            }
            if !extras && let Some(k) = l.keys().find(|k| !e.contains_key(*k)) {
                return Some(format!(
                    "{path}.{k} is in the cluster but not in this binary's CRD"
                ));
            }
            None
        }
        (Value::Array(e), Value::Array(l)) => {
            if e.len() != l.len() {
                return Some(format!(
                    "{path} has {} entries in the cluster and {} in this binary's CRD",
                    l.len(),
                    e.len()
                ));
            }
            e.iter().zip(l).enumerate().find_map(|(i, (v, w))| {
                let label = v["name"]
                    .as_str()
                    .map_or_else(|| i.to_string(), str::to_owned);
                first_difference(&format!("{path}[{label}]"), v, w, extras)
            })
        }
        (e, l) if e == l => None,
        (e, l) => Some(format!(
            "{path} is {} in the cluster and {} in this binary's CRD",
            brief(l),
            brief(e)
        )),
    }
}

fn established(crd: &CustomResourceDefinition) -> Option<&str> {
    let conditions = crd.status.as_ref()?.conditions.as_ref()?;
    let c = conditions.iter().find(|c| c.type_ == "Established")?;
    (c.status != "True").then(|| c.message.as_deref().unwrap_or("not Established"))
}

/// The verdict on one CRD: `live` is what the cluster holds (`None`: nothing).
pub fn crd_finding(
    expected: &CustomResourceDefinition,
    live: Option<&CustomResourceDefinition>,
) -> Finding {
    let name = expected.name_any();
    match live {
        None => Finding::problem(Area::Crds, name, "not installed", APPLY_CRDS),
        Some(live) => match crd_difference(expected, live) {
            Some(diff) => Finding::problem(
                Area::Crds,
                name,
                format!(
                    "differs from this binary's ({} {}): {diff}",
                    env!("CARGO_PKG_NAME"),
                    env!("CARGO_PKG_VERSION")
                ),
                APPLY_CRDS,
            ),
            None => match established(live) {
                Some(why) => Finding::problem(
                    Area::Crds,
                    name,
                    format!("not Established: {why}"),
                    "the API server has not accepted the CRD; see `kubectl describe crd` for its conditions",
                ),
                None => Finding::ok(Area::Crds, name, "installed and current"),
            },
        },
    }
}

pub(super) async fn check(client: &Client) -> Vec<Finding> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut findings = Vec::new();
    for expected in crate::crds::all() {
        let name = expected.name_any();
        findings.push(match api.get_opt(&name).await {
            Ok(live) => crd_finding(&expected, live.as_ref()),
            Err(e) => Finding::problem(
                Area::Crds,
                name,
                format!("cannot read it: {}", crate::cli::api_message(&e)),
                "reading CRDs needs get on customresourcedefinitions.apiextensions.k8s.io (cluster-wide); run doctor as a user who may, or ask a cluster admin",
            ),
        });
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::doctor::Verdict;

    #[test]
    fn a_crd_equal_to_the_generated_one_is_current() {
        for crd in crate::crds::all() {
            let mut live = crd.clone();
            // What the API server adds.
            live.spec.names.list_kind = Some(format!("{}List", crd.spec.names.kind));
            assert_eq!(crd_difference(&crd, &live), None);
            assert_eq!(crd_finding(&crd, Some(&live)).verdict, Verdict::Ok);
        }
    }

    #[test]
    fn a_stale_crd_names_the_first_difference() {
        let crd = crate::crds::all().remove(0);
        let mut live = crd.clone();
        live.spec.versions[0].additional_printer_columns = None;
        let finding = crd_finding(&crd, Some(&live));
        assert_eq!(finding.verdict, Verdict::Problem);
        assert!(
            finding.detail.contains(
                "spec.versions[v1alpha1].additionalPrinterColumns is missing in the cluster"
            ),
            "{}",
            finding.detail
        );
        assert!(finding.fix.unwrap().contains("kubectl apply --server-side"));

        let mut live = crd.clone();
        live.spec.versions[0].name = "v1alpha0".into();
        assert!(
            crd_difference(&crd, &live)
                .unwrap()
                .contains("is \"v1alpha0\" in the cluster and \"v1alpha1\"")
        );

        let missing = crd_finding(&crd, None);
        assert_eq!(
            (missing.verdict, missing.detail.as_str()),
            (Verdict::Problem, "not installed")
        );
    }
}
