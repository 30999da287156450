//! `rotate`: ask for a new key now and wait until it is in the Secret — `cmctl renew`
//! plus `kubectl wait` in one.
//!
//! The request is the `keyward.dev/rotate` annotation with a new value; keyward
//! records the value it acted on in `status.rotateRequest`. A key is rotated when
//! that record matches the annotation, the revision went up and it is Ready again.
//! Waiting watches the keys (one watch per kind), so a thousand keys cost two watch
//! streams, not a thousand polls.

use std::{
    collections::BTreeMap,
    io::{IsTerminal, Write},
    time::{Duration, Instant},
};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::runtime::WatchStreamExt;
use serde::Serialize;

use super::{
    Connection, Error,
    keys::{self, Key, KeyKind},
    output::{Format, document},
};

/// `rotate NAME… | -l SELECTOR | --all`.
#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("targets").required(true).args(["names", "selector", "all"]))]
pub struct RotateArgs {
    /// Keys to rotate: `NAME`, `ak/NAME` or `sak/NAME`.
    pub names: Vec<String>,
    /// Every key whose labels match this selector (`team=edge`).
    #[arg(short = 'l', long, conflicts_with = "names")]
    pub selector: Option<String>,
    /// Every key in the namespace (with -A: in every namespace).
    #[arg(long, conflicts_with_all = ["names", "selector"])]
    pub all: bool,
    /// Only ask for the rotation; do not wait for the new keys.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for every key to be Ready with its new key.
    #[arg(long, default_value = "2m", value_parser = duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub connection: Connection,
}

fn duration(s: &str) -> Result<Duration, String> {
    crate::resources::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration like 30s, 2m or 1m30s"))
}

/// Where a key's rotation stands.
#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    /// Ready with the new key.
    Rotated { revision: i64 },
    /// keyward is issuing the new key.
    Issuing { reason: String },
    /// A condition says why the key is not getting its new key.
    Blocked(Condition),
    /// keyward has not acted on the request yet.
    Waiting,
}

impl Progress {
    /// One line for the progress display.
    pub fn describe(&self) -> String {
        match self {
            Progress::Rotated { revision } => format!("Ready at revision {revision}"),
            Progress::Issuing { reason } => format!("issuing a new key ({reason})"),
            Progress::Blocked(c) => format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message),
            Progress::Waiting => "waiting for keyward to act on the request".into(),
        }
    }
}

/// Where `key` stands, `before` being its revision when the rotation was requested.
pub fn progress(key: &Key, before: Option<i64>) -> Progress {
    let s = &key.status;
    let condition =
        |type_: &str, status: &str| key.condition(type_).filter(|c| c.status == status).cloned();
    // The current request (ours, or one made after ours) was acted on.
    let fulfilled = s.rotate_request.is_some() && s.rotate_request == key.rotate_annotation;
    let newer = s.revision.unwrap_or(0) > before.unwrap_or(0);
    if fulfilled && newer && s.attempt.is_none() && s.is_ready() {
        return Progress::Rotated {
            revision: s.revision.unwrap_or(0),
        };
    }
    if let Some(c) = condition("Ready", "False").or_else(|| condition("Degraded", "True")) {
        return Progress::Blocked(c);
    }
    if let Some(c) = condition("Issuing", "True") {
        return Progress::Issuing { reason: c.reason };
    }
    Progress::Waiting
}

/// How a key's rotation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Outcome {
    /// Asked for, not waited on (`--no-wait`).
    Requested,
    /// Ready with its new key.
    Rotated,
    /// Not rotated within `--timeout`.
    TimedOut,
}

/// The outcome for one key, as `-o json|yaml` reports it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rotation {
    pub kind: KeyKind,
    pub namespace: String,
    pub name: String,
    /// The `keyward.dev/rotate` value set.
    pub requested: String,
    pub previous_revision: Option<i64>,
    pub revision: Option<i64>,
    pub result: Outcome,
    /// What the key was waiting on when the wait timed out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_by: Option<String>,
}

#[derive(Serialize)]
struct Rotations<'a> {
    keys: &'a [Rotation],
}

/// Where progress goes: stdout for people, stderr when stdout carries a document. On
/// a terminal a "waiting" line is redrawn in place between the progress lines.
struct ProgressOutput {
    to_stderr: bool,
    live: bool,
    started: Instant,
}

impl ProgressOutput {
    fn line(&self, text: &str) {
        // On a terminal, overwrite the waiting line.
        let clear = if self.live { "\r\x1b[K" } else { "" };
        if self.to_stderr {
            eprintln!("{clear}{text}");
        } else {
            println!("{clear}{text}");
        }
    }

    fn waiting(&self, left: usize, total: usize) {
        if self.live {
            let secs = self.started.elapsed().as_secs();
            print!("\r\x1b[Kwaiting for {left} of {total} keys… {secs}s");
            let _ = std::io::stdout().flush();
        }
    }
}

type Id = (KeyKind, String, String);

fn id(key: &Key) -> Id {
    (key.kind, key.namespace.clone(), key.name.clone())
}

async fn targets(
    args: &RotateArgs,
    client: &kube::Client,
    namespace: Option<&str>,
) -> Result<Vec<Key>, Error> {
    if !args.names.is_empty() {
        let namespace = namespace.ok_or_else(|| {
            Error::Usage("keys are named in one namespace: use -n NAMESPACE, not -A".into())
        })?;
        let mut keys = Vec::new();
        for word in &args.names {
            keys.push(keys::get(client, namespace, word).await?);
        }
        return Ok(keys);
    }
    let keys = keys::list(client, namespace, args.selector.as_deref()).await?;
    if keys.is_empty() {
        let place =
            namespace.map_or_else(|| "any namespace".into(), |ns| format!("namespace {ns}"));
        return Err(Error::Usage(match &args.selector {
            Some(s) => format!("no AuthKey or ServiceAccountKey in {place} matches -l {s}"),
            None => format!("no AuthKey or ServiceAccountKey in {place}"),
        }));
    }
    Ok(keys)
}

pub async fn run(args: RotateArgs) -> Result<bool, Error> {
    let (client, namespace) = args.connection.connect().await?;
    let format = args.connection.output;
    let display = ProgressOutput {
        to_stderr: format != Format::Text,
        live: std::io::stdout().is_terminal() && format == Format::Text,
        started: Instant::now(),
    };
    let keys = targets(&args, &client, namespace.as_deref()).await?;
    // Unique, and readable in `kubectl describe`: when it was asked, and a nonce.
    let requested = format!(
        "{}/{}",
        Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ"),
        crate::context::random_id()
    );

    let mut rotations: BTreeMap<Id, Rotation> = BTreeMap::new();
    for key in &keys {
        if key.deleting {
            display.line(&format!("{}: being deleted, not rotated", key.reference()));
            continue;
        }
        keys::annotate_rotate(&client, key, &requested).await?;
        display.line(&format!(
            "{}: rotation requested ({} {requested}, revision {})",
            key.reference(),
            crate::lifecycle::ROTATE_ANNOTATION,
            key.status
                .revision
                .map_or_else(|| "none".into(), |r| r.to_string())
        ));
        rotations.insert(
            id(key),
            Rotation {
                kind: key.kind,
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                requested: requested.clone(),
                previous_revision: key.status.revision,
                revision: key.status.revision,
                result: Outcome::Requested,
                blocked_by: None,
            },
        );
    }

    let mut all_rotated = true;
    if !args.no_wait && !rotations.is_empty() {
        all_rotated = wait(
            &client,
            namespace.as_deref(),
            &mut rotations,
            args.timeout,
            &display,
        )
        .await;
    }
    let rotations: Vec<Rotation> = rotations.into_values().collect();
    match document(format, &Rotations { keys: &rotations }) {
        Some(doc) => print!("{doc}"),
        None => display.line(&summary(&rotations)),
    }
    Ok(all_rotated)
}

/// The last line of the text view.
fn summary(rotations: &[Rotation]) -> String {
    let count = |result| rotations.iter().filter(|r| r.result == result).count();
    let keys = |n: usize| {
        if n == 1 {
            "1 key".to_owned()
        } else {
            format!("{n} keys")
        }
    };
    let (rotated, requested, late) = (
        count(Outcome::Rotated),
        count(Outcome::Requested),
        count(Outcome::TimedOut),
    );
    if late > 0 {
        format!(
            "{} not rotated in time, {} rotated",
            keys(late),
            keys(rotated)
        )
    } else if requested > 0 {
        format!(
            "rotation requested for {}; `kubectl keyward status` shows their progress",
            keys(requested)
        )
    } else {
        format!("{} rotated", keys(rotated))
    }
}

/// Waits until every key is rotated or `timeout` passes; true when all were.
async fn wait(
    client: &kube::Client,
    namespace: Option<&str>,
    rotations: &mut BTreeMap<Id, Rotation>,
    timeout: Duration,
    display: &ProgressOutput,
) -> bool {
    let total = rotations.len();
    let mut last: BTreeMap<Id, Progress> = BTreeMap::new();
    let mut stream = keys::watch(client, namespace).default_backoff().boxed();
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut watch_error: Option<String> = None;
    loop {
        let left = rotations
            .values()
            .filter(|r| r.result != Outcome::Rotated)
            .count();
        if left == 0 {
            return true;
        }
        tokio::select! {
            _ = &mut deadline => break,
            _ = tick.tick() => display.waiting(left, total),
            event = stream.next() => match event {
                None => break,
                Some(Err(e)) => {
                    let text = e.to_string();
                    if watch_error.as_ref() != Some(&text) {
                        display.line(&format!("watching keys failed (retrying): {text}"));
                        watch_error = Some(text);
                    }
                }
                Some(Ok(key)) => {
                    let Some(rotation) = rotations.get_mut(&id(&key)) else { continue };
                    if rotation.result == Outcome::Rotated {
                        continue;
                    }
                    let now = progress(&key, rotation.previous_revision);
                    rotation.revision = key.status.revision;
                    if last.get(&id(&key)) != Some(&now) {
                        let secs = display.started.elapsed().as_secs_f64();
                        display.line(&format!("{}: {} ({secs:.1}s)", key.reference(), now.describe()));
                    }
                    if let Progress::Rotated { .. } = now {
                        rotation.result = Outcome::Rotated;
                    }
                    last.insert(id(&key), now);
                }
            }
        }
    }
    for (id, rotation) in rotations.iter_mut() {
        if rotation.result == Outcome::Rotated {
            continue;
        }
        rotation.result = Outcome::TimedOut;
        let why = match last.get(id) {
            Some(p @ (Progress::Blocked(_) | Progress::Issuing { .. })) => p.describe(),
            _ => "keyward never acted on the request: is the operator running? (kubectl keyward doctor)".into(),
        };
        display.line(&format!(
            "{}/{}: not rotated within {}s: {why}",
            rotation.kind.as_str().to_ascii_lowercase(),
            rotation.name,
            timeout.as_secs()
        ));
        rotation.blocked_by = Some(why);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cli::fixtures,
        resources::{IssueAttempt, KeyStatus},
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn condition(type_: &str, status: &str, reason: &str) -> Condition {
        fixtures::condition(type_, status, reason, &format!("{reason} happened"))
    }

    fn key(annotation: &str, status: KeyStatus) -> Key {
        Key {
            rotate_annotation: Some(annotation.into()),
            ..fixtures::key("edge", status)
        }
    }

    fn status(revision: i64, acted_on: Option<&str>, conditions: Vec<Condition>) -> KeyStatus {
        KeyStatus {
            revision: Some(revision),
            rotate_request: acted_on.map(str::to_owned),
            conditions,
            ..Default::default()
        }
    }

    #[test]
    fn rotated_means_acted_on_newer_and_ready() {
        let ready = || vec![condition("Ready", "True", "Issued")];
        assert_eq!(
            progress(&key("r2", status(3, Some("r2"), ready())), Some(2)),
            Progress::Rotated { revision: 3 }
        );
        // The previous request's record is not ours.
        assert_eq!(
            progress(&key("r2", status(2, Some("r1"), ready())), Some(2)),
            Progress::Waiting
        );
        // A request made after ours and fulfilled also gave the key a new revision.
        assert_eq!(
            progress(&key("r3", status(3, Some("r3"), ready())), Some(2)),
            Progress::Rotated { revision: 3 }
        );
        // Recorded but the attempt is still being finished.
        let mut in_flight = status(3, Some("r2"), ready());
        in_flight.attempt = Some(Box::new(IssueAttempt {
            id: "a".into(),
            marker: "kw:a".into(),
            reason: "ForcedRotation".into(),
            started_at: Time(Timestamp::UNIX_EPOCH),
            shape: String::new(),
            rotate_request: Some("r3".into()),
            secret_name: "k".into(),
            revision: 3,
        }));
        assert_ne!(
            progress(&key("r2", in_flight), Some(2)),
            Progress::Rotated { revision: 3 }
        );
    }

    #[test]
    fn the_blocking_condition_is_named() {
        let refused = status(
            2,
            Some("r1"),
            vec![
                condition("Ready", "True", "Issued"),
                condition("Issuing", "False", "IssueFailed"),
                condition("Degraded", "True", "IssueFailed"),
            ],
        );
        match progress(&key("r2", refused), Some(2)) {
            Progress::Blocked(c) => assert_eq!(
                (c.type_.as_str(), c.reason.as_str()),
                ("Degraded", "IssueFailed")
            ),
            other => panic!("{other:?}"),
        }
        let not_ready = status(
            2,
            Some("r1"),
            vec![condition("Ready", "False", "ProviderNotFound")],
        );
        assert_eq!(
            progress(&key("r2", not_ready), Some(2)).describe(),
            "Ready=False ProviderNotFound: ProviderNotFound happened"
        );
        let issuing = status(
            2,
            Some("r1"),
            vec![condition("Issuing", "True", "ForcedRotation")],
        );
        assert_eq!(
            progress(&key("r2", issuing), Some(2)),
            Progress::Issuing {
                reason: "ForcedRotation".into()
            }
        );
    }
}
