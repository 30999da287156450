//! Quiescence and the audit. Once faults and kills stop, keyward runs until every
//! resource is settled (Ready for its generation with nothing in flight or retiring,
//! or gone); then each figure the promise is about is counted from one consistent
//! snapshot of the API server and the upstreams.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    time::{Duration, Instant},
};

use base64::Engine;
use k8s_openapi::api::core::v1::{Event, Secret};
use keyward::{
    reconciler::ManagedKey,
    resources::{AuthKey, KeyStatus, ServiceAccountKey},
    secret::{MANAGED_BY, MANAGED_BY_LABEL},
};
use kube::{Api, Client, Resource as _, ResourceExt, api::ListParams};

use super::{
    history::History,
    upstreams::{LiveKey, Provider, Upstreams, Wanted, upstream_id},
    workload::Resource,
};

/// A key resource as the API server has it, in the terms the audit needs.
#[derive(Clone, Debug)]
pub struct Present {
    pub name: String,
    uid: String,
    resource_version: String,
    provider: Option<Provider>,
    settled: bool,
    status: KeyStatus,
    secret: (String, String),
    wanted: Wanted,
    /// The digest of what the spec asks for now.
    spec_shape: String,
}

fn present<K: ManagedKey>(key: &K, upstreams: &Upstreams, wanted: Wanted) -> Present {
    let status = key.key_status().cloned().unwrap_or_default();
    let rotate = key.annotations().get("keyward.dev/rotate").cloned();
    let settled = key.meta().deletion_timestamp.is_none()
        && status.is_ready()
        && status.observed_generation == key.meta().generation
        && status.attempt.is_none()
        && status.retiring.is_empty()
        && status.retired_secrets.is_empty()
        && status.invalid.is_none()
        && (rotate.is_none() || status.rotate_request == rotate);
    Present {
        name: key.name_any(),
        uid: key.uid().unwrap_or_default(),
        resource_version: key.resource_version().unwrap_or_default(),
        provider: upstreams.provider_named(&key.provider_ref().name),
        settled,
        status,
        secret: (
            keyward::reconciler::secret_name(key),
            key.secret_spec().key.clone(),
        ),
        wanted,
        spec_shape: keyward::reconciler::key_view(key).shape,
    }
}

fn lifetime(key: &impl ManagedKey) -> Option<i64> {
    key.expiry()
        .and_then(|d| d.to_std())
        .map(|d| d.as_secs() as i64)
}

/// Every key resource in `ns`.
pub async fn list(client: &Client, ns: &str, upstreams: &Upstreams) -> kube::Result<Vec<Present>> {
    let lp = ListParams::default();
    let mut all = Vec::new();
    for k in Api::<AuthKey>::namespaced(client.clone(), ns)
        .list(&lp)
        .await?
    {
        let wanted = Wanted {
            description: k.spec.description.clone().unwrap_or_default(),
            lifetime_seconds: lifetime(&k),
            tags: k.spec.tags.iter().map(|t| t.0.clone()).collect(),
            reusable: k.spec.reusable,
            ephemeral: k.spec.ephemeral,
            preauthorized: k.spec.preauthorized,
            ..Wanted::default()
        };
        all.push(present(&k, upstreams, wanted));
    }
    for k in Api::<ServiceAccountKey>::namespaced(client.clone(), ns)
        .list(&lp)
        .await?
    {
        let account = &k.spec.service_account;
        let wanted = Wanted {
            description: k.spec.description.clone().unwrap_or_default(),
            lifetime_seconds: lifetime(&k),
            service_account: account.name.clone(),
            role: k.spec.role.clone().filter(|_| account.create),
            ..Wanted::default()
        };
        all.push(present(&k, upstreams, wanted));
    }
    Ok(all)
}

/// Waits (at most `bound`) until every resource is settled and Prefect's discarded
/// keys have expired; returns how long that took, or the names still unsettled.
pub async fn settle(
    client: &Client,
    ns: &str,
    upstreams: &Upstreams,
    bound: Duration,
) -> Result<Duration, Vec<String>> {
    let started = Instant::now();
    loop {
        let unsettled = match list(client, ns, upstreams).await {
            Ok(all) => {
                let mut names: Vec<String> = all
                    .into_iter()
                    .filter(|p| !p.settled)
                    .map(|p| p.name)
                    .collect();
                if upstreams.live_keys().iter().any(|k| k.discarded) {
                    names.push("(a discarded Prefect key, until it expires)".into());
                }
                names
            }
            Err(e) => vec![format!("(listing failed: {e})")],
        };
        if unsettled.is_empty() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > bound {
            return Err(unsettled);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One figure of the audit; each must be 0.
pub struct Figure {
    pub what: &'static str,
    pub count: usize,
    /// What was found, for the report.
    pub found: Vec<String>,
}

/// Counts every audit figure from one consistent snapshot: the resources listed
/// twice with the upstreams read in between, retried until no resource changed.
pub async fn audit(
    client: &Client,
    ns: &str,
    upstreams: &Upstreams,
    model: &[Resource],
    history: &History,
    logs: &str,
    metrics: &str,
) -> Vec<Figure> {
    let (resources, live) = snapshot(client, ns, upstreams).await;
    let secrets: Vec<Secret> = Api::<Secret>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}")))
        .await
        .expect("listing Secrets")
        .items;
    let events = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("listing Events")
        .items;

    let present_names: BTreeSet<&str> = resources.iter().map(|p| p.name.as_str()).collect();
    let deleted: Vec<&Resource> = model
        .iter()
        .filter(|r| !present_names.contains(r.name.as_str()))
        .collect();
    // Keys a resource deleted with `Retain` held: left alone on purpose.
    let retained: BTreeSet<String> = deleted
        .iter()
        .filter(|r| r.retained())
        .filter_map(|r| history.held.get(history.uid_of(&r.name)?))
        .flatten()
        .map(|id| upstream_id(id))
        .collect();
    // The adopted service account's own key is the user's until a resource adopts
    // the account (keyward then rotates it away, and answers for it).
    let ever_adopted = model
        .iter()
        .any(|r| r.provider == Provider::Prefect && r.spec["serviceAccount"]["create"] == false);
    let referenced: BTreeSet<(Provider, String)> = resources
        .iter()
        .filter_map(|p| Some((p.provider?, p)))
        .flat_map(|(provider, p)| {
            let s = &p.status;
            s.key_id
                .iter()
                .chain(s.retiring.iter().map(|r| &r.key_id))
                .map(move |id| (provider, upstream_id(id)))
                .collect::<Vec<_>>()
        })
        .collect();

    let mut figures = Vec::new();
    figures.push(Figure {
        what: "resources not settled",
        count: 0,
        found: resources
            .iter()
            .filter(|p| !p.settled)
            .map(|p| format!("{}: {:?}", p.name, p.status))
            .collect(),
    });
    figures.push(Figure {
        what: "live upstream keys referenced by nothing",
        count: 0,
        found: live
            .iter()
            .filter(|k| !referenced.contains(&(k.provider, k.id.clone())))
            .filter(|k| !retained.contains(&k.id))
            .filter(|k| k.id != upstreams.adopted_ui_key || ever_adopted)
            .map(|k| explain(k, history, upstreams, model))
            .collect(),
    });
    figures.push(Figure {
        what: "deleted resources with live keys",
        count: 0,
        found: deleted
            .iter()
            .filter(|r| !r.retained())
            .filter_map(|r| {
                let keys = live_keys_of(r, &live, history);
                (!keys.is_empty()).then(|| format!("{} {}: {keys:?}", r.kind(), r.name))
            })
            .collect(),
    });
    let (older_spec, not_in_secret) = ready_keys(&resources, upstreams, &secrets);
    let story_of =
        |(name, finding): (String, String)| format!("{finding}{}", story(&name, history, model));
    let older_spec: Vec<String> = older_spec.into_iter().map(story_of).collect();
    let not_in_secret: Vec<String> = not_in_secret.into_iter().map(story_of).collect();
    figures.push(Figure {
        what: "Ready resources whose key was issued for an older spec",
        count: 0,
        found: older_spec,
    });
    figures.push(Figure {
        what: "Ready resources whose Secret lacks their live key",
        count: 0,
        found: not_in_secret,
    });
    figures.push(Figure {
        what: "Secrets left behind",
        count: 0,
        found: left_behind(&resources, &secrets),
    });

    let values = Values::new(&upstreams.every_value());
    let mut statuses: Vec<&str> = history.statuses.iter().map(String::as_str).collect();
    let current: Vec<String> = resources
        .iter()
        .map(|p| serde_json::to_string(&p.status).unwrap())
        .collect();
    statuses.extend(current.iter().map(String::as_str));
    let events = serde_json::to_string(&events).unwrap();
    for (what, text) in [
        ("key values in keyward's logs", logs.to_owned()),
        ("key values in Events", events),
        ("key values in a status", statuses.join("\n")),
        ("key values in metrics", metrics.to_owned()),
    ] {
        figures.push(Figure {
            what,
            count: 0,
            found: values.found_in(&text),
        });
    }
    figures.push(Figure {
        what: "keyward panics",
        count: 0,
        found: logs
            .lines()
            .filter(|l| l.contains("panicked at"))
            .map(str::to_owned)
            .collect(),
    });
    for f in &mut figures {
        f.count = f.found.len();
    }
    figures
}

/// The resources and the live upstream keys at one moment: listed before and after
/// the upstreams are read, until no resource changed in between.
async fn snapshot(
    client: &Client,
    ns: &str,
    upstreams: &Upstreams,
) -> (Vec<Present>, Vec<LiveKey>) {
    let versions = |all: &[Present]| -> BTreeMap<String, String> {
        all.iter()
            .map(|p| (p.uid.clone(), p.resource_version.clone()))
            .collect()
    };
    for _ in 0..50 {
        let Ok(before) = list(client, ns, upstreams).await else {
            continue;
        };
        let live = upstreams.live_keys();
        let Ok(after) = list(client, ns, upstreams).await else {
            continue;
        };
        if versions(&before) == versions(&after) {
            return (after, live);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("no consistent snapshot: resources kept changing");
}

/// A live key nothing references, with what may explain it: its resource's statuses
/// as the watch saw them and the faults its upstream served shortly before it was made.
fn explain(k: &LiveKey, history: &History, upstreams: &Upstreams, model: &[Resource]) -> String {
    let name = model
        .iter()
        .find(|r| r.provider == k.provider && owner(r, history).as_deref() == Some(&*k.owner))
        .map(|r| r.name.clone());
    let faults = upstreams
        .faults()
        .into_iter()
        .find(|(p, _)| *p == k.provider)
        .map(|(_, f)| f.served())
        .unwrap_or_default();
    let window = k.created.as_second() - 15..=k.created.as_second() + 1;
    let faults: Vec<String> = faults
        .iter()
        .filter(|f| window.contains(&f.at.as_second()))
        .map(|f| {
            format!(
                "{} {:?} {} {}",
                f.at.strftime("%H:%M:%S%.3f"),
                f.fault,
                f.method,
                f.path
            )
        })
        .collect();
    format!(
        "{} key {} made {} with marker {:?}, of {name:?} (discarded: {})\n    faults served before: {faults:#?}{}",
        k.provider.name(),
        k.id,
        k.created.strftime("%H:%M:%S"),
        k.marker,
        k.discarded,
        name.as_deref()
            .map(|n| story(n, history, model))
            .unwrap_or_default(),
    )
}

/// What the workload did to the resource `name` and each status the watch saw of it.
fn story(name: &str, history: &History, model: &[Resource]) -> String {
    let ops = model
        .iter()
        .find(|r| r.name == name)
        .map(|r| r.log.join("\n      "))
        .unwrap_or_default();
    let statuses = history
        .uid_of(name)
        .and_then(|uid| history.timeline.get(uid))
        .map(|t| t.join("\n      "))
        .unwrap_or_default();
    format!("\n    what the workload did:\n      {ops}\n    its statuses:\n      {statuses}")
}

/// Whose a live key is, as [`LiveKey::owner`] says it of the keys of resource `r`: the
/// resource-uid part of the marker, or (Prefect, which has no room for a marker) the
/// service account its spec names.
fn owner(r: &Resource, history: &History) -> Option<String> {
    match r.provider {
        Provider::Prefect => r.spec["serviceAccount"]["name"].as_str().map(str::to_owned),
        _ => history
            .uid_of(&r.name)
            .map(|uid| uid.chars().filter(|c| *c != '-').take(8).collect()),
    }
}

/// The live keys attributed to a deleted resource by what they carry.
fn live_keys_of(r: &Resource, live: &[LiveKey], history: &History) -> Vec<String> {
    // An adopted service account outlives its resources; its keys are checked as
    // referenced or not.
    if r.provider == Provider::Prefect && r.spec["serviceAccount"]["create"] == false {
        return Vec::new();
    }
    let Some(owner) = owner(r, history) else {
        return Vec::new();
    };
    live.iter()
        .filter(|k| k.provider == r.provider && k.owner == owner)
        .map(|k| k.id.clone())
        .collect()
}

/// What is wrong with one resource: `(its name, what)`.
type Finding = (String, String);

/// Settled resources whose key differs from their spec (upstream, or by the shape
/// digest status records), and those whose Secret does not hold their key's value (or
/// whose key is no longer live).
fn ready_keys(
    resources: &[Present],
    upstreams: &Upstreams,
    secrets: &[Secret],
) -> (Vec<Finding>, Vec<Finding>) {
    let (mut older, mut missing) = (Vec::new(), Vec::new());
    for p in resources.iter().filter(|p| p.settled) {
        let name = p.name.clone();
        let (Some(provider), Some(key_id)) = (p.provider, p.status.key_id.as_deref()) else {
            missing.push((name, format!("{}: Ready without a key", p.name)));
            continue;
        };
        let Some(issued) = upstreams.issued(provider, key_id, &p.wanted) else {
            missing.push((name, format!("{}: key {key_id} unknown upstream", p.name)));
            continue;
        };
        let mut differences = issued.differences.clone();
        if p.status.shape.as_deref() != Some(p.spec_shape.as_str()) {
            differences.push(format!(
                "status.shape {:?}, spec {}",
                p.status.shape, p.spec_shape
            ));
        }
        if !differences.is_empty() {
            older.push((
                name.clone(),
                format!("{} (key {key_id}): {}", p.name, differences.join("; ")),
            ));
        }
        let (secret, data_key) = &p.secret;
        let value = secrets
            .iter()
            .find(|s| s.name_any() == *secret)
            .and_then(|s| s.data.as_ref()?.get(data_key).cloned());
        let holds = value.is_some_and(|v| v.0 == issued.value.as_bytes());
        if !issued.live || !holds || p.status.secret_name.as_deref() != Some(secret) {
            missing.push((
                name,
                format!(
                    "{} (key {key_id}): live {}, Secret {secret} holds it {holds}, status.secretName {:?}",
                    p.name, issued.live, p.status.secret_name
                ),
            ));
        }
    }
    (older, missing)
}

/// keyward's Secrets that are not the current Secret of a resource that exists.
fn left_behind(resources: &[Present], secrets: &[Secret]) -> Vec<String> {
    let current: HashSet<(&str, &str)> = resources
        .iter()
        .map(|p| (p.uid.as_str(), p.secret.0.as_str()))
        .collect();
    secrets
        .iter()
        .filter(|s| s.meta().deletion_timestamp.is_none())
        .filter(|s| {
            let owners = s.owner_references();
            !owners
                .iter()
                .any(|o| current.contains(&(o.uid.as_str(), s.name_any().as_str())))
        })
        .map(|s| {
            let owners: Vec<String> = s
                .owner_references()
                .iter()
                .map(|o| format!("{}/{}", o.kind, o.name))
                .collect();
            format!("Secret {} (owners {owners:?})", s.name_any())
        })
        .collect()
}

/// Every value an upstream handed out, raw and base64-encoded, to find in text. Key
/// values are made of letters, digits, `-` and `_`, so a text is cut into runs of
/// those (and, for the encoded forms, of the base64 alphabet) and each run looked up.
struct Values {
    raw: HashSet<String>,
    encoded: HashSet<String>,
}

impl Values {
    fn new(values: &[String]) -> Self {
        let b64 = base64::engine::general_purpose::STANDARD;
        Self {
            raw: values.iter().cloned().collect(),
            encoded: values.iter().map(|v| b64.encode(v)).collect(),
        }
    }

    fn found_in(&self, text: &str) -> Vec<String> {
        let raw = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        let encoded = |c: char| c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '=';
        let mut found: BTreeSet<String> = BTreeSet::new();
        for run in text.split(|c: char| !raw(c)) {
            if self.raw.contains(run) {
                found.insert(format!("{}…", &run[..12.min(run.len())]));
            }
        }
        for run in text.split(|c: char| !encoded(c)) {
            if self.encoded.contains(run) {
                found.insert(format!("(base64) {}…", &run[..12.min(run.len())]));
            }
        }
        found.into_iter().collect()
    }
}
