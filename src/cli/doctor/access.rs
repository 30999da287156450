//! Access: the caller's RBAC for every plugin verb, asked with a
//! SelfSubjectAccessReview each, as `kubectl auth can-i` does.

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::{Api, Client, api::PostParams};

use super::{Area, Finding};

/// One permission a plugin verb needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permission {
    pub verb: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
    pub subresource: &'static str,
    /// `None`: cluster-scoped, or every namespace.
    pub namespace: Option<String>,
}

impl Permission {
    fn resource_name(&self) -> String {
        let mut r = self.resource.to_owned();
        if !self.group.is_empty() {
            r = format!("{r}.{}", self.group);
        }
        if !self.subresource.is_empty() {
            r = format!("{r}/{}", self.subresource);
        }
        r
    }

    /// The `kubectl auth can-i` line that asks the same question.
    pub fn can_i(&self) -> String {
        let scope = match &self.namespace {
            Some(ns) => format!(" -n {ns}"),
            None => String::new(),
        };
        format!(
            "kubectl auth can-i {} {}{scope}",
            self.verb,
            self.resource_name()
        )
    }
}

/// What each plugin verb needs, for keys in `namespace` (`None`: all namespaces).
pub fn needed(
    namespace: Option<&str>,
    operator_namespace: &str,
) -> Vec<(&'static str, Vec<Permission>)> {
    let at = |verb, group, resource, subresource, ns: Option<&str>| Permission {
        verb,
        group,
        resource,
        subresource,
        namespace: ns.map(str::to_owned),
    };
    let keys = |verb| {
        vec![
            at(verb, "keyward.dev", "authkeys", "", namespace),
            at(verb, "keyward.dev", "serviceaccountkeys", "", namespace),
        ]
    };
    let op = Some(operator_namespace);
    vec![
        (
            "status",
            [keys("list"), vec![at("list", "", "events", "", namespace)]].concat(),
        ),
        ("rotate", [keys("patch"), keys("watch")].concat()),
        (
            "doctor",
            vec![
                at(
                    "get",
                    "apiextensions.k8s.io",
                    "customresourcedefinitions",
                    "",
                    None,
                ),
                at("list", "keyward.dev", "keyproviders", "", namespace),
                at("list", "keyward.dev", "clusterkeyproviders", "", None),
                at("get", "coordination.k8s.io", "leases", "", op),
                at("list", "", "services", "", op),
                at("get", "", "services", "proxy", op),
            ],
        ),
    ]
}

/// The verdict on one verb, given which of its permissions were refused.
pub fn access_finding(verb: &str, denied: &[&Permission]) -> Finding {
    if denied.is_empty() {
        return Finding::ok(Area::Access, verb, "allowed");
    }
    let what: Vec<String> = denied
        .iter()
        .map(|p| {
            let place = p.namespace.as_ref().map_or_else(
                || " (cluster-wide)".to_owned(),
                |ns| format!(" in namespace {ns}"),
            );
            format!("{} {}{place}", p.verb, p.resource_name())
        })
        .collect();
    Finding::problem(
        Area::Access,
        verb,
        format!("you may not {}", what.join(", ")),
        format!(
            "ask a cluster admin for a Role (or ClusterRole) that grants it; check with `{}`",
            denied[0].can_i()
        ),
    )
}

async fn allowed(client: &Client, p: &Permission) -> Result<bool, kube::Error> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(p.verb.into()),
                group: Some(p.group.into()),
                resource: Some(p.resource.into()),
                subresource: (!p.subresource.is_empty()).then(|| p.subresource.into()),
                namespace: p.namespace.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

pub(super) async fn check(
    client: &Client,
    namespace: Option<&str>,
    operator_namespace: &str,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (verb, permissions) in needed(namespace, operator_namespace) {
        let mut denied = Vec::new();
        let mut failed = None;
        for p in &permissions {
            match allowed(client, p).await {
                Ok(true) => {}
                Ok(false) => denied.push(p),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        findings.push(match failed {
            Some(e) => Finding::skipped(
                Area::Access,
                verb,
                format!(
                    "could not ask the API server: {}",
                    crate::cli::api_message(&e)
                ),
            ),
            None => access_finding(verb, &denied),
        });
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::doctor::Verdict;

    #[test]
    fn access_names_the_refused_permission_and_the_can_i_line() {
        let needed = needed(Some("team"), "kw");
        let rotate = &needed.iter().find(|(v, _)| *v == "rotate").unwrap().1;
        let finding = access_finding("rotate", &[&rotate[0]]);
        assert_eq!(
            finding.detail,
            "you may not patch authkeys.keyward.dev in namespace team"
        );
        assert!(
            finding
                .fix
                .unwrap()
                .contains("kubectl auth can-i patch authkeys.keyward.dev -n team")
        );
        let doctor = &needed.iter().find(|(v, _)| *v == "doctor").unwrap().1;
        assert_eq!(
            doctor[0].can_i(),
            "kubectl auth can-i get customresourcedefinitions.apiextensions.k8s.io"
        );
        assert_eq!(
            doctor[5].can_i(),
            "kubectl auth can-i get services/proxy -n kw"
        );
        assert_eq!(access_finding("status", &[]).verdict, Verdict::Ok);
    }
}
