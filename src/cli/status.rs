//! `status`: what on-call asks first — is the key ready, which key is in the Secret,
//! when it expires and renews, what is retiring, and what happened last.
//!
//! Gathering (the key resources and keyward's events) is I/O; the table and the
//! one-key view are pure functions of what was gathered, tested below.

use std::collections::HashMap;

use jiff::Timestamp;
use k8s_openapi::{
    api::core::v1::Event,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};
use kube::{Api, Client, api::ListParams};
use serde::Serialize;

use super::{
    Connection, Error,
    keys::{self, Key, KeyKind},
    output::{Style, Table, Tone, document, relative},
};
use crate::resources::{IssueAttempt, ProviderKind, RetiringKey};

/// `status [NAME] [-l SELECTOR] [-n NS | -A]`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// One key (`NAME`, `ak/NAME` or `sak/NAME`): its conditions, retiring keys and
    /// events in full. Without it: a table of every key.
    pub name: Option<String>,
    /// Only keys whose labels match this selector (`team=edge`).
    #[arg(short = 'l', long, conflicts_with = "name")]
    pub selector: Option<String>,
    #[command(flatten)]
    pub connection: Connection,
}

/// One event keyward recorded about a key.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyEvent {
    #[serde(rename = "type")]
    pub type_: String,
    pub reason: String,
    pub message: String,
    pub count: i32,
    pub last_seen: Option<Time>,
}

/// The `Ready` condition in brief.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Readiness {
    /// `True`, `False`, or `Unknown` when keyward has not reported yet.
    pub status: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// What `status` reports about one key; the table shows a part of it, the one-key
/// view and `-o json|yaml` all of it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyReport {
    pub kind: KeyKind,
    pub namespace: String,
    pub name: String,
    pub ready: Readiness,
    /// `kp/NAME` (a KeyProvider in the key's namespace) or `ckp/NAME`.
    pub provider: String,
    pub secret: String,
    pub key_id: Option<String>,
    pub revision: Option<i64>,
    pub created_at: Option<Time>,
    pub expires_at: Option<Time>,
    pub renewal_time: Option<Time>,
    pub last_inspected_at: Option<Time>,
    /// Set when the upstream said the current key no longer works.
    pub invalid: Option<String>,
    /// The issuance in flight, if any.
    pub attempt: Option<IssueAttempt>,
    pub retiring: Vec<RetiringKey>,
    pub deleting: bool,
    pub last_event: Option<KeyEvent>,
    /// Only in the one-key view.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<Condition>>,
    /// Only in the one-key view: every event keyward recorded, oldest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<KeyEvent>>,
}

impl KeyReport {
    /// The report of `key`, with its events (any order).
    pub fn new(key: &Key, mut events: Vec<KeyEvent>, detailed: bool) -> Self {
        events.sort_by_key(|e| e.last_seen.as_ref().map(|t| t.0));
        let ready = match key.condition("Ready") {
            Some(c) => Readiness {
                status: c.status.clone(),
                reason: c.reason.clone(),
                message: c.message.clone(),
            },
            None => Readiness {
                status: "Unknown".into(),
                reason: String::new(),
                message: "keyward has not reported on this key yet".into(),
            },
        };
        let s = &key.status;
        Self {
            kind: key.kind,
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            ready,
            provider: match key.provider.kind {
                ProviderKind::KeyProvider => format!("kp/{}", key.provider.name),
                ProviderKind::ClusterKeyProvider => format!("ckp/{}", key.provider.name),
            },
            secret: s.secret_name.clone().unwrap_or_else(|| key.secret.clone()),
            key_id: s.key_id.clone(),
            revision: s.revision,
            created_at: s.created_at.clone(),
            expires_at: s.expires_at.clone(),
            renewal_time: s.renewal_time.clone(),
            last_inspected_at: s.last_inspected_at.clone(),
            invalid: s.invalid.clone(),
            attempt: s.attempt.as_deref().cloned(),
            retiring: s.retiring.clone(),
            deleting: key.deleting,
            last_event: events.last().cloned(),
            conditions: detailed.then(|| s.conditions.clone()),
            events: detailed.then_some(events),
        }
    }
}

/// The `-o json|yaml` document of the table view.
#[derive(Serialize)]
struct KeyList<'a> {
    keys: &'a [KeyReport],
}

const NONE: &str = "<none>";

fn at(t: Option<&Time>, now: Timestamp) -> String {
    t.map_or_else(|| NONE.to_owned(), |t| relative(t.0, now))
}

fn ready_cell(r: &Readiness) -> (String, Tone) {
    match r.status.as_str() {
        "True" => ("True".into(), Tone::Good),
        other if r.reason.is_empty() => (other.to_owned(), Tone::Warn),
        other => (format!("{other} ({})", r.reason), Tone::Bad),
    }
}

fn event_cell(e: Option<&KeyEvent>, now: Timestamp) -> (String, Tone) {
    match e {
        None => (NONE.into(), Tone::Plain),
        Some(e) => {
            let when = e
                .last_seen
                .as_ref()
                .map(|t| format!(" {}", relative(t.0, now)))
                .unwrap_or_default();
            let tone = if e.type_ == "Warning" {
                Tone::Warn
            } else {
                Tone::Plain
            };
            (format!("{}{when}", e.reason), tone)
        }
    }
}

/// The table of many keys.
pub fn table(reports: &[KeyReport], all_namespaces: bool, now: Timestamp) -> Table {
    let mut headers = vec![
        "kind",
        "name",
        "ready",
        "provider",
        "key id",
        "expires",
        "renews",
        "revision",
        "retiring",
        "last event",
    ];
    if all_namespaces {
        headers.insert(0, "namespace");
    }
    let mut table = Table::new(&headers);
    for r in reports {
        let plain = |s: String| (s, Tone::Plain);
        let mut row = Vec::new();
        if all_namespaces {
            row.push(plain(r.namespace.clone()));
        }
        let name = if r.deleting {
            format!("{} (deleting)", r.name)
        } else {
            r.name.clone()
        };
        row.extend([
            plain(r.kind.to_string()),
            (name, Tone::Bold),
            ready_cell(&r.ready),
            plain(r.provider.clone()),
            plain(r.key_id.clone().unwrap_or_else(|| NONE.into())),
            plain(at(r.expires_at.as_ref(), now)),
            plain(at(r.renewal_time.as_ref(), now)),
            plain(r.revision.map_or_else(|| NONE.into(), |v| v.to_string())),
            plain(r.retiring.len().to_string()),
            event_cell(r.last_event.as_ref(), now),
        ]);
        table.row(row);
    }
    table
}

fn stamp(t: &Time, now: Timestamp) -> String {
    format!("{} ({})", t.0, relative(t.0, now))
}

/// The one-key view: the facts, then conditions, retiring keys and events in full.
pub fn detail(r: &KeyReport, now: Timestamp, style: Style) -> String {
    let mut out = String::new();
    let mut field = |label: &str, value: String| {
        out.push_str(&format!("{:<12}{value}\n", format!("{label}:")));
    };
    let (ready, tone) = ready_cell(&r.ready);
    field(
        "Name",
        style.paint(Tone::Bold, &format!("{}/{}", r.namespace, r.name)),
    );
    field("Kind", r.kind.to_string());
    let mut readiness = style.paint(tone, &ready);
    if !r.ready.message.is_empty() {
        readiness.push_str(&format!(": {}", r.ready.message));
    }
    field("Ready", readiness);
    field("Provider", r.provider.clone());
    field("Secret", r.secret.clone());
    if r.deleting {
        field(
            "Deleting",
            "yes: keyward revokes its keys, then lets the resource go".into(),
        );
    }
    field("Key ID", r.key_id.clone().unwrap_or_else(|| NONE.into()));
    field(
        "Revision",
        r.revision.map_or_else(|| NONE.into(), |v| v.to_string()),
    );
    for (label, t) in [
        ("Created", &r.created_at),
        ("Expires", &r.expires_at),
        ("Renews", &r.renewal_time),
        ("Inspected", &r.last_inspected_at),
    ] {
        if let Some(t) = t {
            field(label, stamp(t, now));
        }
    }
    if let Some(state) = &r.invalid {
        field(
            "Invalid",
            format!("the upstream reports the key as {state}"),
        );
    }
    if let Some(a) = &r.attempt {
        field(
            "Issuing",
            format!(
                "attempt {} ({}), started {}, marker {}",
                a.id,
                a.reason,
                stamp(&a.started_at, now),
                a.marker
            ),
        );
    }

    out.push_str("\nConditions:\n");
    // Ready first, then Issuing and Degraded: the order they are read in.
    let mut conditions: Vec<&Condition> = r.conditions.iter().flatten().collect();
    conditions.sort_by_key(|c| {
        ["Ready", "Issuing", "Degraded"]
            .iter()
            .position(|t| *t == c.type_)
            .unwrap_or(usize::MAX)
    });
    if conditions.is_empty() {
        out.push_str("  none: keyward has not reported on this key yet\n");
    } else {
        let mut table = Table::new(&["type", "status", "reason", "since", "message"]);
        for c in conditions {
            let good = matches!(
                (c.type_.as_str(), c.status.as_str()),
                ("Ready", "True") | ("Degraded", "False") | ("Issuing", "False")
            );
            let tone = if good {
                Tone::Good
            } else if c.type_ == "Issuing" {
                Tone::Warn
            } else {
                Tone::Bad
            };
            table.row(vec![
                (c.type_.clone(), Tone::Plain),
                (c.status.clone(), tone),
                (c.reason.clone(), Tone::Plain),
                (relative(c.last_transition_time.0, now), Tone::Plain),
                (c.message.clone(), Tone::Plain),
            ]);
        }
        out.push_str(&indent(&table.render(style)));
    }

    out.push_str("\nRetiring keys:\n");
    if r.retiring.is_empty() {
        out.push_str("  none\n");
    } else {
        let mut table = Table::new(&["key id", "revoke at", "reason"]);
        for k in &r.retiring {
            table.row(vec![
                (k.key_id.clone(), Tone::Plain),
                (stamp(&k.revoke_at, now), Tone::Plain),
                (k.reason.clone(), Tone::Plain),
            ]);
        }
        out.push_str(&indent(&table.render(style)));
    }

    out.push_str("\nEvents:\n");
    let events = r.events.as_deref().unwrap_or_default();
    if events.is_empty() {
        out.push_str("  none (the API server keeps events for an hour by default)\n");
    } else {
        let mut table = Table::new(&["last seen", "type", "reason", "count", "message"]);
        for e in events {
            let tone = if e.type_ == "Warning" {
                Tone::Warn
            } else {
                Tone::Plain
            };
            table.row(vec![
                (at(e.last_seen.as_ref(), now), Tone::Plain),
                (e.type_.clone(), tone),
                (e.reason.clone(), Tone::Plain),
                (e.count.to_string(), Tone::Plain),
                (e.message.clone(), Tone::Plain),
            ]);
        }
        out.push_str(&indent(&table.render(style)));
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// An event as `status` shows it; the latest of its times is when it was last seen.
fn key_event(e: &Event) -> KeyEvent {
    let last_seen = [
        e.series
            .as_ref()
            .and_then(|s| s.last_observed_time.as_ref())
            .map(|t| t.0),
        e.last_timestamp.as_ref().map(|t| t.0),
        e.event_time.as_ref().map(|t| t.0),
        e.first_timestamp.as_ref().map(|t| t.0),
        e.metadata.creation_timestamp.as_ref().map(|t| t.0),
    ]
    .into_iter()
    .flatten()
    .max()
    .map(Time);
    KeyEvent {
        type_: e.type_.clone().unwrap_or_default(),
        reason: e.reason.clone().unwrap_or_default(),
        message: e.message.clone().unwrap_or_default(),
        count: e
            .series
            .as_ref()
            .and_then(|s| s.count)
            .or(e.count)
            .unwrap_or(1),
        last_seen,
    }
}

/// keyward's events in `namespace` (`None`: all) matching `fields`, by object uid.
async fn events(
    client: &Client,
    namespace: Option<&str>,
    fields: &str,
) -> Result<HashMap<String, Vec<KeyEvent>>, Error> {
    let api: Api<Event> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let list = api
        .list(&ListParams::default().fields(fields))
        .await
        .map_err(|source| Error::Kube {
            what: "listing events".into(),
            source,
        })?;
    let mut by_uid: HashMap<String, Vec<KeyEvent>> = HashMap::new();
    for e in &list.items {
        let uid = e.involved_object.uid.clone().unwrap_or_default();
        by_uid.entry(uid).or_default().push(key_event(e));
    }
    Ok(by_uid)
}

pub async fn run(args: StatusArgs) -> Result<bool, Error> {
    let connection = &args.connection;
    let (client, namespace) = connection.connect().await?;
    let now = Timestamp::now();
    let style = Style::detect();
    if let Some(word) = &args.name {
        let namespace = namespace.ok_or_else(|| {
            Error::Usage("a key is named in one namespace: use -n NAMESPACE, not -A".into())
        })?;
        let key = keys::get(&client, &namespace, word).await?;
        let mut by_uid = events(
            &client,
            Some(&namespace),
            &format!("involvedObject.uid={}", key.uid),
        )
        .await?;
        let report = KeyReport::new(&key, by_uid.remove(&key.uid).unwrap_or_default(), true);
        match document(connection.output, &report) {
            Some(doc) => print!("{doc}"),
            None => print!("{}", detail(&report, now, style)),
        }
        return Ok(true);
    }

    let keys = keys::list(&client, namespace.as_deref(), args.selector.as_deref()).await?;
    let mut by_uid = events(&client, namespace.as_deref(), "reportingComponent=keyward").await?;
    let reports: Vec<KeyReport> = keys
        .iter()
        .map(|k| KeyReport::new(k, by_uid.remove(&k.uid).unwrap_or_default(), false))
        .collect();
    if let Some(doc) = document(connection.output, &KeyList { keys: &reports }) {
        print!("{doc}");
    } else if reports.is_empty() {
        match &namespace {
            Some(ns) => eprintln!("No AuthKeys or ServiceAccountKeys found in namespace {ns}."),
            None => eprintln!("No AuthKeys or ServiceAccountKeys found."),
        }
    } else {
        print!(
            "{}",
            table(&reports, namespace.is_none(), now).render(style)
        );
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cli::fixtures::{condition, key, time},
        resources::KeyStatus,
    };

    fn now() -> Timestamp {
        "2026-01-01T01:00:00Z".parse().unwrap()
    }

    fn rotating() -> KeyReport {
        let status = KeyStatus {
            conditions: vec![
                condition(
                    "Ready",
                    "True",
                    "Issued",
                    "key k2 (revision 2) is in Secret edge",
                ),
                condition(
                    "Degraded",
                    "False",
                    "AsExpected",
                    "all upstream calls succeeded",
                ),
            ],
            key_id: Some("k2".into()),
            revision: Some(2),
            expires_at: Some(time("2026-01-31T01:00:00Z")),
            renewal_time: Some(time("2026-01-21T01:00:00Z")),
            retiring: vec![RetiringKey {
                key_id: "k1".into(),
                revoke_at: time("2026-01-01T01:10:00Z"),
                reason: "ForcedRotation".into(),
                waiting_for: Vec::new(),
            }],
            ..Default::default()
        };
        let event = KeyEvent {
            type_: "Normal".into(),
            reason: "Rotated".into(),
            message: "rotated to key k2 in Secret edge (ForcedRotation); previous key k1 retires"
                .into(),
            count: 1,
            last_seen: Some(time("2026-01-01T00:57:00Z")),
        };
        KeyReport::new(&key("edge", status), vec![event], true)
    }

    fn failing() -> KeyReport {
        let status = KeyStatus {
            conditions: vec![condition(
                "Ready",
                "False",
                "ProviderNotFound",
                "KeyProvider gone does not exist in namespace team; create it",
            )],
            ..Default::default()
        };
        KeyReport::new(&key("broken", status), vec![], true)
    }

    #[test]
    fn the_table_answers_the_first_questions() {
        let fresh = KeyReport::new(&key("new", KeyStatus::default()), vec![], false);
        let text = table(&[rotating(), failing(), fresh], false, now()).render(Style::PLAIN);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            [
                "KIND", "NAME", "READY", "PROVIDER", "KEY", "ID", "EXPIRES", "RENEWS", "REVISION",
                "RETIRING", "LAST", "EVENT"
            ]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            [
                "AuthKey", "edge", "True", "kp/keys", "k2", "in", "30d", "in", "20d", "2", "1",
                "Rotated", "3m", "ago"
            ]
        );
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            [
                "AuthKey",
                "broken",
                "False",
                "(ProviderNotFound)",
                "kp/keys",
                "<none>",
                "<none>",
                "<none>",
                "<none>",
                "0",
                "<none>"
            ]
        );
        assert!(lines[3].contains("Unknown"), "{}", lines[3]);
    }

    #[test]
    fn all_namespaces_adds_the_namespace_column() {
        let text = table(&[rotating()], true, now()).render(Style::PLAIN);
        assert!(text.starts_with("NAMESPACE   KIND"), "{text}");
        assert!(
            text.lines()
                .nth(1)
                .unwrap()
                .starts_with("team        AuthKey"),
            "{text}"
        );
    }

    #[test]
    fn one_key_shows_conditions_retiring_keys_and_events_in_full() {
        let text = detail(&rotating(), now(), Style::PLAIN);
        assert!(
            text.contains("Ready:      True: key k2 (revision 2) is in Secret edge\n"),
            "{text}"
        );
        assert!(
            text.contains("Expires:    2026-01-31T01:00:00Z (in 30d)\n"),
            "{text}"
        );
        assert!(text.contains("Degraded   False    AsExpected"), "{text}");
        assert!(
            text.contains("k1       2026-01-01T01:10:00Z (in 10m)   ForcedRotation"),
            "{text}"
        );
        assert!(
            text.contains(
                "rotated to key k2 in Secret edge (ForcedRotation); previous key k1 retires"
            ),
            "{text}"
        );

        let text = detail(&failing(), now(), Style::PLAIN);
        assert!(
            text.contains("Ready:      False (ProviderNotFound): KeyProvider gone does not exist in namespace team; create it\n"),
            "{text}"
        );
        assert!(text.contains("Retiring keys:\n  none\n"), "{text}");
    }

    #[test]
    fn the_document_carries_everything_and_no_conditions_in_the_list() {
        let list = KeyReport::new(&key("edge", rotating_status()), vec![], false);
        let json = serde_json::to_value(&list).unwrap();
        assert!(json.get("conditions").is_none() && json.get("events").is_none());
        let one = serde_json::to_value(rotating()).unwrap();
        assert_eq!(one["retiring"][0]["keyId"], "k1");
        assert_eq!(one["retiring"][0]["revokeAt"], "2026-01-01T01:10:00Z");
        assert_eq!(one["ready"]["reason"], "Issued");
        assert_eq!(one["events"][0]["reason"], "Rotated");
        assert_eq!(one["kind"], "AuthKey");
    }

    fn rotating_status() -> KeyStatus {
        KeyStatus {
            key_id: Some("k2".into()),
            ..Default::default()
        }
    }
}
