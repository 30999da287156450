//! Counting API requests by who made them: the API server's audit log.
//!
//! Every operator runs with a client certificate of its own (`keyward`,
//! `external-secrets`, `floor`), so the audit log names it on every request; the
//! benchmark's own requests (applying keys, watching them) are made as the admin and
//! never counted. One request is one audit event: `ResponseComplete`, or for a watch
//! (which stays open) `ResponseStarted`.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};

use jiff::Timestamp;
use serde_json::Value;

/// Metadata only (never request or response bodies: those hold key values).
const POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
";

/// The `kube-apiserver` flags that write the audit log into `dir`.
pub fn apiserver_args(dir: &Path) -> anyhow::Result<(Vec<String>, PathBuf)> {
    fs::create_dir_all(dir)?;
    let policy = dir.join("audit-policy.yaml");
    fs::write(&policy, POLICY)?;
    let log = dir.join("audit.log");
    Ok((
        vec![
            format!("--audit-policy-file={}", policy.display()),
            format!("--audit-log-path={}", log.display()),
            "--audit-log-format=json".into(),
            "--audit-log-mode=blocking".into(),
            "--audit-log-maxsize=0".into(),
        ],
        log,
    ))
}

/// One API request.
#[derive(Clone, Debug)]
pub struct Request {
    pub user: String,
    pub verb: String,
    /// `secrets`, `authkeys/status`, or the path of a non-resource URL (`/version`).
    pub resource: String,
    /// The object's namespace (none for cluster-scoped objects and non-resource URLs).
    pub namespace: Option<String>,
    pub at: Timestamp,
}

impl Request {
    pub fn is_write(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }

    /// Leader election renewals: counted, but not "work" when deciding quiet.
    pub fn is_lease(&self) -> bool {
        self.resource == "leases"
    }

    /// A GET of an object of one key, whose number grows with the keys: not of a
    /// non-resource URL (`/version`), not of the operator's own namespace (its Lease,
    /// a provider's credential Secret).
    pub fn is_per_key_get(&self) -> bool {
        self.verb == "get"
            && !self.resource.starts_with('/')
            && self.namespace.as_deref() != Some(crate::OPERATOR_NAMESPACE)
    }

    /// A request made once per process (or per watch timeout), whatever the number of
    /// keys: a list or watch, a non-resource URL, an object in the operator namespace.
    pub fn is_per_process(&self) -> bool {
        matches!(self.verb.as_str(), "list" | "watch")
            || self.resource.starts_with('/')
            || self.namespace.as_deref() == Some(crate::OPERATOR_NAMESPACE)
    }

    /// Requests that mean the operator is still busy: not an open watch, not a Lease.
    pub fn is_work(&self) -> bool {
        self.verb != "watch" && !self.is_lease()
    }
}

/// The audit log, read as it grows; only the operators' requests are kept.
pub struct Log {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    users: Vec<String>,
    requests: Vec<Request>,
}

impl Log {
    pub fn new(path: PathBuf, users: &[&str]) -> Self {
        Self {
            path,
            offset: 0,
            partial: Vec::new(),
            users: users.iter().map(|u| (*u).to_owned()).collect(),
            requests: Vec::new(),
        }
    }

    /// Reads what was appended since the last call.
    pub fn poll(&mut self) -> anyhow::Result<()> {
        let Ok(mut file) = fs::File::open(&self.path) else {
            return Ok(());
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        self.offset += bytes.len() as u64;
        self.partial.extend_from_slice(&bytes);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return Ok(());
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        for line in complete.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let event: Value = serde_json::from_slice(line)?;
            if let Some(request) = self.parse(&event) {
                self.requests.push(request);
            }
        }
        Ok(())
    }

    fn parse(&self, event: &Value) -> Option<Request> {
        let user = event["user"]["username"].as_str()?;
        if !self.users.iter().any(|u| u == user) {
            return None;
        }
        let verb = event["verb"].as_str()?;
        let counted = match event["stage"].as_str()? {
            "ResponseStarted" => verb == "watch",
            "ResponseComplete" => verb != "watch",
            _ => false,
        };
        if !counted {
            return None;
        }
        let object = &event["objectRef"];
        let resource = match (object["resource"].as_str(), object["subresource"].as_str()) {
            (Some(r), Some(s)) => format!("{r}/{s}"),
            (Some(r), None) => r.to_owned(),
            _ => event["requestURI"]
                .as_str()
                .unwrap_or("?")
                .split('?')
                .next()
                .unwrap_or("?")
                .to_owned(),
        };
        Some(Request {
            user: user.to_owned(),
            verb: verb.to_owned(),
            resource,
            namespace: object["namespace"].as_str().map(str::to_owned),
            at: event["requestReceivedTimestamp"].as_str()?.parse().ok()?,
        })
    }

    /// Requests by `user` received in `[from, to]`.
    pub fn between(&self, user: &str, from: Timestamp, to: Timestamp) -> Vec<&Request> {
        self.requests
            .iter()
            .filter(|r| r.user == user && r.at >= from && r.at <= to)
            .collect()
    }

    /// When `user` last did work (see [`Request::is_work`]) at or after `from`.
    pub fn last_work(&self, user: &str, from: Timestamp) -> Option<Timestamp> {
        self.requests
            .iter()
            .filter(|r| r.user == user && r.at >= from && r.is_work())
            .map(|r| r.at)
            .max()
    }
}

/// Requests counted by `verb resource`.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub by_kind: BTreeMap<String, usize>,
    pub total: usize,
    pub writes: usize,
    /// GETs of single objects (what a restart should not make per key).
    pub gets: usize,
    /// GETs of one key's objects ([`Request::is_per_key_get`]).
    pub per_key_gets: usize,
    /// Requests made once per process, whatever N ([`Request::is_per_process`]).
    pub per_process: usize,
    pub leases: usize,
    /// Requests received in the busiest second: the client rate actually used.
    pub peak_per_second: usize,
}

impl Tally {
    pub fn of(requests: &[&Request]) -> Self {
        let mut tally = Self::default();
        let mut per_second: BTreeMap<i64, usize> = BTreeMap::new();
        for r in requests {
            *per_second.entry(r.at.as_second()).or_default() += 1;
            *tally
                .by_kind
                .entry(format!("{} {}", r.verb, r.resource))
                .or_default() += 1;
            tally.total += 1;
            tally.writes += usize::from(r.is_write());
            tally.gets += usize::from(r.verb == "get" && !r.is_lease());
            tally.per_key_gets += usize::from(r.is_per_key_get());
            tally.per_process += usize::from(r.is_per_process());
            tally.leases += usize::from(r.is_lease());
        }
        tally.peak_per_second = per_second.into_values().max().unwrap_or(0);
        tally
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(stage: &str, verb: &str, user: &str, resource: &str, sub: Option<&str>) -> Value {
        serde_json::json!({
            "stage": stage, "verb": verb, "user": {"username": user},
            "objectRef": {"resource": resource, "subresource": sub},
            "requestURI": "/api/v1/namespaces/x/secrets?watch=true",
            "requestReceivedTimestamp": "2026-12-01T10:00:00.123456Z",
        })
    }

    #[test]
    fn a_request_is_one_event_and_a_watch_counts_when_it_opens() {
        let log = Log::new(PathBuf::new(), &["keyward"]);
        let get = log
            .parse(&event(
                "ResponseComplete",
                "get",
                "keyward",
                "secrets",
                None,
            ))
            .unwrap();
        assert_eq!(
            (get.verb.as_str(), get.resource.as_str()),
            ("get", "secrets")
        );
        let status = log
            .parse(&event(
                "ResponseComplete",
                "patch",
                "keyward",
                "authkeys",
                Some("status"),
            ))
            .unwrap();
        assert_eq!(status.resource, "authkeys/status");
        assert!(status.is_write());
        assert!(
            log.parse(&event(
                "ResponseStarted",
                "watch",
                "keyward",
                "secrets",
                None
            ))
            .is_some()
        );
        assert!(
            log.parse(&event(
                "ResponseComplete",
                "watch",
                "keyward",
                "secrets",
                None
            ))
            .is_none()
        );
        assert!(
            log.parse(&event("ResponseComplete", "get", "admin", "secrets", None))
                .is_none()
        );
    }

    #[test]
    fn tallies_split_writes_gets_and_leases() {
        let log = Log::new(PathBuf::new(), &["keyward"]);
        let requests: Vec<Request> = [
            ("get", "secrets"),
            ("create", "secrets"),
            ("update", "leases"),
            ("get", "leases"),
            ("list", "authkeys"),
        ]
        .iter()
        .map(|(verb, resource)| {
            log.parse(&event("ResponseComplete", verb, "keyward", resource, None))
                .unwrap()
        })
        .collect();
        let tally = Tally::of(&requests.iter().collect::<Vec<_>>());
        assert_eq!(
            (tally.total, tally.writes, tally.gets, tally.leases),
            (5, 2, 1, 2)
        );
        assert_eq!(tally.by_kind["create secrets"], 1);
        assert_eq!(tally.peak_per_second, 5);
    }

    #[test]
    fn only_reads_of_a_keys_objects_count_as_per_key() {
        let get = |resource: &str, namespace: Option<&str>| Request {
            user: "keyward".into(),
            verb: "get".into(),
            resource: resource.into(),
            namespace: namespace.map(str::to_owned),
            at: Timestamp::UNIX_EPOCH,
        };
        assert!(get("secrets", Some("builtin")).is_per_key_get());
        assert!(get("authkeys", Some("tailscale")).is_per_key_get());
        assert!(!get("secrets", Some(crate::OPERATOR_NAMESPACE)).is_per_key_get());
        assert!(!get("/version", None).is_per_key_get());
    }

    #[test]
    fn lists_watches_version_and_the_operator_namespace_are_per_process() {
        let request = |verb: &str, resource: &str, namespace: Option<&str>| Request {
            user: "keyward".into(),
            verb: verb.into(),
            resource: resource.into(),
            namespace: namespace.map(str::to_owned),
            at: Timestamp::UNIX_EPOCH,
        };
        for per_process in [
            request("watch", "secrets", None),
            request("list", "authkeys", Some("builtin")),
            request("get", "/version", None),
            request("get", "secrets", Some(crate::OPERATOR_NAMESPACE)),
        ] {
            assert!(per_process.is_per_process(), "{per_process:?}");
        }
        for per_key in [
            request("patch", "authkeys/status", Some("builtin")),
            request("create", "events", Some("default")),
            request("get", "secrets", Some("builtin")),
        ] {
            assert!(!per_key.is_per_process(), "{per_key:?}");
        }
    }
}
