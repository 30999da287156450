//! `doctor`: everything that has to be true for keys to be issued, checked from the
//! user's chair, each problem printed with what to do about it.
//!
//! - CRDs: installed, Established, and the same as this binary generates.
//! - Operator: its leader Lease held and renewed within the lease duration (the same
//!   rule standbys use to take over, [`crate::leader::can_take`]); `/readyz` through
//!   the API server's service proxy when a metrics Service exists.
//! - Providers: each `Ready`, or why not; and keys that cannot use a provider.
//! - Access: the caller's RBAC for every plugin verb (SelfSubjectAccessReview, as
//!   `kubectl auth can-i` does).
//!
//! One module per area; in each, the verdicts are pure functions of what was read,
//! tested beside them.

use jiff::Timestamp;
use serde::Serialize;

use super::{
    Connection, Error, Operator,
    output::{Style, Tone, document},
};

/// `doctor [-n NS | -A]`.
#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub operator: Operator,
    /// Name of the operator's leader Lease (`keyward run --lease-name`).
    #[arg(long, default_value = "keyward")]
    pub lease_name: String,
    #[command(flatten)]
    pub connection: Connection,
}

/// What a check is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Area {
    #[serde(rename = "CRDs")]
    Crds,
    Operator,
    Providers,
    Access,
}

impl Area {
    fn title(self) -> &'static str {
        match self {
            Area::Crds => "CRDs",
            Area::Operator => "Operator",
            Area::Providers => "Providers",
            Area::Access => "Access (what you may do)",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Problem,
    /// Could not be checked, and that is not a problem in itself.
    Skipped,
}

/// One checked fact.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    pub area: Area,
    pub subject: String,
    pub verdict: Verdict,
    pub detail: String,
    /// What to do about a problem.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn ok(area: Area, subject: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            area,
            subject: subject.into(),
            verdict: Verdict::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn problem(
        area: Area,
        subject: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            area,
            subject: subject.into(),
            verdict: Verdict::Problem,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn skipped(area: Area, subject: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            area,
            subject: subject.into(),
            verdict: Verdict::Skipped,
            detail: detail.into(),
            fix: None,
        }
    }
}

mod access;
mod crds;
mod operator;
mod providers;

// ---------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------

#[derive(Serialize)]
struct Report<'a> {
    problems: usize,
    findings: &'a [Finding],
}

/// The text report: findings by area, each problem followed by its fix.
pub fn render(findings: &[Finding], style: Style) -> String {
    let mut out = String::new();
    let mut area = None;
    for f in findings {
        if area != Some(f.area) {
            if area.is_some() {
                out.push('\n');
            }
            out.push_str(&style.paint(Tone::Bold, f.area.title()));
            out.push('\n');
            area = Some(f.area);
        }
        let (word, tone) = match f.verdict {
            Verdict::Ok => ("ok", Tone::Good),
            Verdict::Problem => ("problem", Tone::Bad),
            Verdict::Skipped => ("skipped", Tone::Warn),
        };
        let padded = format!("{word:<8}");
        out.push_str(&format!(
            "  {} {}: {}\n",
            style.paint(tone, &padded),
            f.subject,
            f.detail
        ));
        if let Some(fix) = &f.fix {
            out.push_str(&format!("           fix: {fix}\n"));
        }
    }
    let problems = findings
        .iter()
        .filter(|f| f.verdict == Verdict::Problem)
        .count();
    out.push('\n');
    out.push_str(&match problems {
        0 => style.paint(Tone::Good, "No problems found."),
        1 => style.paint(Tone::Bad, "1 problem found."),
        n => style.paint(Tone::Bad, &format!("{n} problems found.")),
    });
    out.push('\n');
    out
}

pub async fn run(args: DoctorArgs) -> Result<bool, Error> {
    let (client, namespace) = args.connection.connect().await?;
    let now = Timestamp::now();
    let mut findings = crds::check(&client).await;
    findings.extend(
        operator::check(
            &client,
            &args.operator.operator_namespace,
            &args.lease_name,
            now,
        )
        .await,
    );
    findings.extend(providers::check(&client, namespace.as_deref()).await);
    findings.extend(
        access::check(
            &client,
            namespace.as_deref(),
            &args.operator.operator_namespace,
        )
        .await,
    );
    let problems = findings
        .iter()
        .filter(|f| f.verdict == Verdict::Problem)
        .count();
    match document(
        args.connection.output,
        &Report {
            problems,
            findings: &findings,
        },
    ) {
        Some(doc) => print!("{doc}"),
        None => print!("{}", render(&findings, Style::detect())),
    }
    Ok(problems == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_prints_each_fix_under_its_problem() {
        let findings = vec![
            Finding::ok(Area::Crds, "authkeys.keyward.dev", "installed and current"),
            Finding::problem(Area::Operator, "Lease kw/keyward", "no leader", "start it"),
        ];
        let text = render(&findings, Style::PLAIN);
        assert_eq!(
            text,
            "CRDs\n  ok       authkeys.keyward.dev: installed and current\n\nOperator\n  problem  Lease kw/keyward: no leader\n           fix: start it\n\n1 problem found.\n"
        );
    }
}
