//! One subject's control plane, and the measurements every subject shares: applying
//! N keys at once, waiting for quiet, deleting them all.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use futures::{StreamExt, TryStreamExt};
use jiff::Timestamp;
use keyward::control_plane::{ControlPlane, Options};
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::Value;

use crate::{
    audit::{self, Tally},
    process::{self, Process},
    report::{Latency, Wave},
    track::{self, Tracker},
};

/// How many admin requests (creates, deletes, annotations) are in flight at once.
const ADMIN_CONCURRENCY: usize = 32;

/// A fresh control plane for one subject, with the audit log on.
pub struct Cluster {
    pub plane: ControlPlane,
    pub admin: Client,
    pub audit: audit::Log,
    pub dir: PathBuf,
    /// The operator's user name in the audit log.
    pub user: String,
    /// How long without work counts as quiet.
    pub quiet: Duration,
    /// The longest any one wait may take.
    pub timeout: Duration,
}

impl Cluster {
    pub async fn start(
        dir: &Path,
        user: &str,
        quiet: Duration,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        fs::create_dir_all(dir)?;
        let (extra_apiserver_args, log) = audit::apiserver_args(dir)?;
        let plane = ControlPlane::start(Options {
            dir: None,
            extra_apiserver_args,
            ..Options::default()
        })
        .await
        .context("starting the control plane")?;
        let admin = plane.client().await?;
        Ok(Self {
            plane,
            admin,
            audit: audit::Log::new(log, &[user]),
            dir: dir.to_owned(),
            user: user.to_owned(),
            quiet,
            timeout,
        })
    }

    /// A kubeconfig file for the operator's own identity (so the audit log names it).
    /// `system:masters`: RBAC decisions are not what is measured.
    pub fn kubeconfig(&self) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(format!("kubeconfig-{}", self.user));
        fs::write(
            &path,
            self.plane.kubeconfig_for(&self.user, &["system:masters"])?,
        )?;
        Ok(path)
    }

    /// Waits until the API server delivers watch events of `resource` promptly.
    ///
    /// Right after a CRD is installed its watch cache is still starting, and events
    /// reach watches opened meanwhile about two seconds late — an operator started
    /// then would look two seconds slower than it is. So before any operator runs,
    /// `probe` (an object of that kind) is created in a namespace of its own and
    /// deleted again until a fresh watch sees it within 300 ms.
    pub async fn warm_up(&self, resource: &ApiResource, probe: Value) -> anyhow::Result<()> {
        const NAMESPACE: &str = "warm-up";
        self.apply(serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": NAMESPACE}}))
            .await?;
        let tracker = Tracker::start(self.admin.clone(), resource, NAMESPACE).await?;
        for attempt in 0..60 {
            let mut probe = probe.clone();
            let name = format!("probe-{attempt}");
            probe["metadata"] = serde_json::json!({"name": name, "namespace": NAMESPACE});
            let sent = create_all(tracker.api(), vec![probe]).await?[&name];
            let seen = tracker
                .wait(
                    "the warm-up probe seen",
                    Duration::from_secs(10),
                    |seen| seen.get(&name).is_some_and(|s| s.first.is_some()),
                    |_| "not yet".into(),
                )
                .await;
            delete_all(tracker.api(), std::slice::from_ref(&name)).await?;
            let first = tracker.snapshot().get(&name).and_then(|s| s.first);
            if seen.is_ok() && first.is_some_and(|first| seconds(sent, first) < 0.3) {
                return Ok(());
            }
        }
        anyhow::bail!(
            "watch events of {} stayed late for 60 probes",
            resource.plural
        )
    }

    pub fn apiserver_cpu(&self) -> f64 {
        let pid = self
            .plane
            .pids()
            .into_iter()
            .find(|(name, _)| *name == "kube-apiserver")
            .map(|(_, pid)| pid)
            .expect("the control plane runs kube-apiserver");
        process::cpu_seconds(pid)
    }

    /// Creates (server-side applies) plain objects the operator needs.
    pub async fn apply(&self, doc: Value) -> anyhow::Result<()> {
        let (resource, namespace, name) = resource_of(&doc)?;
        let api: Api<DynamicObject> = match &namespace {
            Some(ns) => Api::namespaced_with(self.admin.clone(), ns, &resource),
            None => Api::all_with(self.admin.clone(), &resource),
        };
        api.patch(
            &name,
            &PatchParams::apply("keyward-bench").force(),
            &Patch::Apply(&doc),
        )
        .await
        .with_context(|| format!("applying {} {name}", resource.kind))?;
        Ok(())
    }

    /// Waits for a freshly started operator's first request, then until it is quiet
    /// (a process that has not yet started working is not quiet).
    pub async fn wait_started_and_quiet(
        &mut self,
        since: Timestamp,
        running: &mut [&mut Process],
    ) -> anyhow::Result<Timestamp> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            self.audit.poll()?;
            if self.audit.last_work(&self.user, since).is_some() {
                return self.wait_quiet(since, running).await;
            }
            for process in running.iter_mut() {
                process.check_running()?;
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{} made no request within {:?} of starting",
                self.user,
                self.timeout
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the operator made no request but watches and Lease renewals for
    /// [`Self::quiet`]; returns when it last worked (`since` if it never did).
    pub async fn wait_quiet(
        &mut self,
        since: Timestamp,
        running: &mut [&mut Process],
    ) -> anyhow::Result<Timestamp> {
        let timeout = self.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.audit.poll()?;
            let last = self.audit.last_work(&self.user, since).unwrap_or(since);
            let idle = Timestamp::now().duration_since(last);
            if idle.as_secs_f64() >= self.quiet.as_secs_f64() {
                return Ok(last);
            }
            for process in running.iter_mut() {
                process.check_running()?;
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{} was not quiet within {timeout:?} (still working at {last})",
                self.user
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The operator's requests from `from` until now.
    pub fn tally(&mut self, from: Timestamp) -> anyhow::Result<Tally> {
        self.audit.poll()?;
        Ok(Tally::of(&self.audit.between(
            &self.user,
            from,
            Timestamp::now(),
        )))
    }

    /// Applies `docs` all at once and measures until every key is Ready and the
    /// operator is quiet again.
    pub async fn wave(
        &mut self,
        resource: &ApiResource,
        namespace: &str,
        docs: Vec<Value>,
        operator: &mut Process,
    ) -> anyhow::Result<(Wave, Tracker)> {
        let tracker = Tracker::start(self.admin.clone(), resource, namespace).await?;
        let n = docs.len();
        let (cpu0, api0) = (operator.cpu_seconds(), self.apiserver_cpu());
        let t0 = Timestamp::now();
        let applied = create_all(tracker.api(), docs).await?;
        let names: Vec<String> = applied.keys().cloned().collect();
        let waited = tracker
            .wait(
                "every key Ready",
                self.timeout,
                |seen| track::ready_at(seen, &names, 0) == n,
                |seen| format!("{} of {n} Ready", track::ready_at(seen, &names, 0)),
            )
            .await;
        if let Err(e) = waited {
            operator.check_running()?;
            return Err(e);
        }
        let seen = tracker.snapshot();
        let ready: HashMap<&String, Timestamp> = names
            .iter()
            .filter_map(|n| Some((n, seen.get(n)?.ready?.1)))
            .collect();
        let last_ready = ready.values().max().copied().unwrap_or(t0);
        let latencies: Vec<f64> = names
            .iter()
            .map(|n| seconds(applied[n], ready[n]))
            .collect();
        self.wait_quiet(t0, &mut [operator]).await?;
        Ok((
            Wave {
                keys: n,
                took: seconds(t0, last_ready),
                latency: Latency::of(latencies),
                requests: self.tally(t0)?,
                cpu: operator.cpu_seconds() - cpu0,
                apiserver_cpu: self.apiserver_cpu() - api0,
                peak_rss: operator.peak_rss(),
            },
            tracker,
        ))
    }
}

/// Seconds from `a` to `b`.
pub fn seconds(a: Timestamp, b: Timestamp) -> f64 {
    b.duration_since(a).as_secs_f64()
}

/// Creates every object, `ADMIN_CONCURRENCY` at a time; returns when each was sent.
pub async fn create_all(
    api: &Api<DynamicObject>,
    docs: Vec<Value>,
) -> anyhow::Result<HashMap<String, Timestamp>> {
    futures::stream::iter(docs)
        .map(|doc| async move {
            let object: DynamicObject = serde_json::from_value(doc)?;
            let name = object.metadata.name.clone().unwrap_or_default();
            let at = Timestamp::now();
            api.create(&PostParams::default(), &object)
                .await
                .with_context(|| format!("creating {name}"))?;
            anyhow::Ok((name, at))
        })
        .buffer_unordered(ADMIN_CONCURRENCY)
        .try_collect()
        .await
}

/// Runs `request` for every name, `ADMIN_CONCURRENCY` at a time.
async fn for_each<'a, Fut>(
    names: &'a [String],
    request: impl Fn(&'a str) -> Fut,
) -> anyhow::Result<()>
where
    Fut: Future<Output = anyhow::Result<()>>,
{
    futures::stream::iter(names)
        .map(|name| request(name))
        .buffer_unordered(ADMIN_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Deletes every named object.
pub async fn delete_all(api: &Api<DynamicObject>, names: &[String]) -> anyhow::Result<()> {
    for_each(names, |name| async move {
        api.delete(name, &DeleteParams::default())
            .await
            .with_context(|| format!("deleting {name}"))?;
        Ok(())
    })
    .await
}

/// Merge-patches every named object with `patch`.
pub async fn patch_all(
    api: &Api<DynamicObject>,
    names: &[String],
    patch: &Value,
) -> anyhow::Result<()> {
    for_each(names, |name| async move {
        api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .with_context(|| format!("patching {name}"))?;
        Ok(())
    })
    .await
}

/// Asks `check` every 200 ms until it says yes; fails after `timeout`, naming `what`.
pub async fn poll_until<Fut>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Fut,
) -> anyhow::Result<Timestamp>
where
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await? {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{what}: not so within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(Timestamp::now())
}

/// The API resource, namespace and name of a manifest (of a kind whose plural is the
/// lower-case kind + `s`, as every kind applied here is).
fn resource_of(doc: &Value) -> anyhow::Result<(ApiResource, Option<String>, String)> {
    let api_version = doc["apiVersion"].as_str().context("apiVersion")?;
    let kind = doc["kind"].as_str().context("kind")?;
    let name = doc["metadata"]["name"].as_str().context("metadata.name")?;
    let namespace = doc["metadata"]["namespace"].as_str().map(str::to_owned);
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    // Every kind applied here has the regular plural.
    let plural = format!("{}s", kind.to_lowercase());
    Ok((
        ApiResource {
            group: group.to_owned(),
            version: version.to_owned(),
            api_version: api_version.to_owned(),
            kind: kind.to_owned(),
            plural,
        },
        namespace,
        name.to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_name_their_resource() {
        let (resource, ns, name) = resource_of(&serde_json::json!({
            "apiVersion": "generators.external-secrets.io/v1alpha1", "kind": "Password",
            "metadata": {"name": "bench", "namespace": "eso"}}))
        .unwrap();
        assert_eq!(resource.plural, "passwords");
        assert_eq!(resource.group, "generators.external-secrets.io");
        assert_eq!((ns.as_deref(), name.as_str()), (Some("eso"), "bench"));
        let (resource, ns, _) = resource_of(&serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}))
        .unwrap();
        assert_eq!(
            (resource.group.as_str(), resource.plural.as_str()),
            ("", "namespaces")
        );
        assert_eq!(ns, None);
    }
}
