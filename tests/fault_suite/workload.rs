//! What users do to key resources while keyward is killed again and again, and the
//! faults the upstreams serve meanwhile. Every choice comes from a seeded generator,
//! so a seed names one schedule of operations; how it interleaves with the real
//! processes is up to the machine.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use keyward::resources::{AuthKey, ServiceAccountKey};
use keyward_emulators::Fault;
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::{Value, json};

use super::{
    rng::Rng,
    upstreams::{ADOPTED_BOT, CLIENT_TAGS, Provider, Upstreams},
};

/// Live resources the workload keeps between.
const MIN_LIVE: usize = 6;
const MAX_LIVE: usize = 14;

/// A key resource as the workload last applied it.
#[derive(Clone, Debug)]
pub struct Resource {
    pub name: String,
    pub provider: Provider,
    pub spec: Value,
    /// The `keyward.dev/rotate` annotation's value (0: not set).
    pub rotate: u32,
    /// Deletion requested (keyward releases it once its keys are revoked).
    pub deleted: bool,
    /// What the workload did to it, when (for the report of a finding).
    pub log: Vec<String>,
}

impl Resource {
    fn note(&mut self, what: &str) {
        let at = jiff::Timestamp::now().strftime("%H:%M:%S%.3f");
        self.log.push(format!("{at} {what}"));
    }

    pub fn kind(&self) -> &'static str {
        match self.provider {
            Provider::Tailscale => "AuthKey",
            _ => "ServiceAccountKey",
        }
    }

    pub fn retained(&self) -> bool {
        self.spec["deletionPolicy"] == "Retain"
    }

    fn secret(&self) -> (String, String) {
        let secret = &self.spec["secret"];
        let name = secret["name"].as_str().unwrap_or(&self.name).to_owned();
        (name, secret["key"].as_str().unwrap_or("key").to_owned())
    }

    fn adopts(&self) -> bool {
        self.spec["serviceAccount"]["create"] == false && self.provider == Provider::Prefect
    }

    fn manifest(&self) -> Value {
        let mut metadata = json!({"name": self.name});
        if self.rotate > 0 {
            metadata["annotations"] = json!({"keyward.dev/rotate": self.rotate.to_string()});
        }
        json!({"apiVersion": "keyward.dev/v1alpha1", "kind": self.kind(),
               "metadata": metadata, "spec": self.spec})
    }
}

/// What the workload did (operations the API server refused or could not answer,
/// during its restart, are counted apart and not done).
#[derive(Debug, Default)]
pub struct Counts {
    pub created: usize,
    pub edits: usize,
    pub rotate_bumps: usize,
    pub secret_edits: usize,
    pub secret_deletes: usize,
    pub deletes: usize,
    pub retained_deletes: usize,
    pub failed: usize,
}

pub struct Workload {
    rng: Rng,
    client: Client,
    ns: String,
    cluster_provider: String,
    service_accounts: Vec<String>,
    http_template: Value,
    pub resources: Vec<Resource>,
    serial: usize,
    pub counts: Counts,
}

impl Workload {
    pub fn new(seed: u64, client: Client, ns: &str, upstreams: &Upstreams) -> Self {
        Self {
            rng: Rng::new(seed),
            client,
            ns: ns.to_owned(),
            cluster_provider: upstreams.cluster_provider.clone(),
            service_accounts: upstreams.service_accounts.clone(),
            http_template: upstreams.http_key_template(),
            resources: Vec::new(),
            serial: 0,
            counts: Counts::default(),
        }
    }

    /// Two resources of each provider to start with.
    pub async fn populate(&mut self) {
        for provider in Provider::ALL.into_iter().chain(Provider::ALL) {
            self.create(provider).await;
        }
    }

    /// How long until the next operation.
    pub fn pause(&mut self) -> Duration {
        Duration::from_millis(300 + self.rng.below(1200))
    }

    /// One operation, chosen at random among what users do.
    pub async fn step(&mut self) {
        let live = self.live();
        let weights = [
            if live.len() < MAX_LIVE { 3 } else { 0 },
            4,
            2,
            1,
            1,
            if live.len() > MIN_LIVE { 2 } else { 0 },
        ];
        let op = self.rng.weighted(&weights);
        if op == 0 {
            let provider = self.rng.pick(&Provider::ALL);
            return self.create(provider).await;
        }
        let i = live[self.rng.below(live.len() as u64) as usize];
        match op {
            1 => self.edit(i).await,
            2 => self.bump(i).await,
            3 => self.edit_secret(i).await,
            4 => self.delete_secret(i).await,
            _ => self.delete(i).await,
        }
    }

    fn live(&self) -> Vec<usize> {
        (0..self.resources.len())
            .filter(|i| !self.resources[*i].deleted)
            .collect()
    }

    async fn create(&mut self, provider: Provider) {
        self.serial += 1;
        let prefix = match provider {
            Provider::Tailscale => "ts",
            Provider::Prefect => "pf",
            Provider::Http => "gql",
        };
        let name = format!("{prefix}-{}", self.serial);
        let adopt =
            provider == Provider::Prefect && self.rng.chance(250) && self.adopted_bot_free().await;
        let spec = match provider {
            Provider::Tailscale => self.tailscale_spec(),
            Provider::Prefect => self.prefect_spec(&name, adopt),
            Provider::Http => self.http_spec(),
        };
        let mut resource = Resource {
            name,
            provider,
            spec,
            // GitOps: the rotate annotation is sometimes part of the manifest.
            rotate: if self.rng.chance(150) { 1 } else { 0 },
            deleted: false,
            log: Vec::new(),
        };
        if self.rng.chance(200) {
            self.serial += 1;
            resource.spec["secret"]["name"] = json!(format!("{}-s{}", resource.name, self.serial));
        }
        if self.apply(&resource).await {
            let what = format!("created (rotate {}): {}", resource.rotate, resource.spec);
            resource.note(&what);
            self.counts.created += 1;
            self.resources.push(resource);
        }
    }

    /// Whether no resource holds, or may still hold, the adopted service account.
    async fn adopted_bot_free(&self) -> bool {
        for r in self.resources.iter().filter(|r| r.adopts()) {
            if !r.deleted {
                return false;
            }
            let gone = Api::<ServiceAccountKey>::namespaced(self.client.clone(), &self.ns)
                .get_opt(&r.name)
                .await
                .map(|k| k.is_none());
            if !gone.unwrap_or(false) {
                return false;
            }
        }
        true
    }

    fn tailscale_spec(&mut self) -> Value {
        let mut spec = json!({
            "providerRef": {"kind": "ClusterKeyProvider", "name": self.cluster_provider},
            "tags": self.tags(),
            "reusable": self.rng.chance(500),
            "ephemeral": self.rng.chance(300),
            "preauthorized": self.rng.chance(300),
            "expiry": self.rng.pick(&["24h", "48h", "72h"]),
            "rotation": {"overlap": self.rng.pick(&["1s", "2s", "3s"])},
            "secret": {"key": "TS_AUTHKEY"},
        });
        self.common_fields(&mut spec);
        spec
    }

    fn prefect_spec(&mut self, name: &str, adopt: bool) -> Value {
        let mut spec = json!({
            "providerRef": {"name": "prefect"},
            "serviceAccount": if adopt {
                json!({"name": ADOPTED_BOT, "create": false})
            } else {
                json!({"name": format!("{name}-bot")})
            },
            "rotation": {"overlap": "2s"},
            "secret": {"key": "PREFECT_API_KEY"},
        });
        if !adopt {
            self.role(&mut spec);
        }
        self.expiry(&mut spec, &[None, Some("24h"), Some("720h"), Some("2m")]);
        self.common_fields(&mut spec);
        spec
    }

    fn http_spec(&mut self) -> Value {
        let mut spec = self.http_template.clone();
        spec["serviceAccount"]["name"] = json!(self.service_account());
        spec["rotation"]["overlap"] = json!("2s");
        spec["rotation"]["inspectInterval"] = json!(self.rng.pick(&["15s", "1h"]));
        spec["secret"]
            .as_object_mut()
            .expect("the example names its Secret")
            .remove("name");
        self.expiry(&mut spec, &[Some("720h"), Some("24h"), Some("2m")]);
        self.common_fields(&mut spec);
        spec
    }

    fn service_account(&mut self) -> String {
        let i = self.rng.below(self.service_accounts.len() as u64) as usize;
        self.service_accounts[i].clone()
    }

    /// Description and deletion policy, which every kind has.
    fn common_fields(&mut self, spec: &mut Value) {
        self.description(spec);
        if self.rng.chance(120) {
            spec["deletionPolicy"] = json!("Retain");
        }
    }

    fn tags(&mut self) -> Vec<&'static str> {
        let mut tags: Vec<&str> = CLIENT_TAGS
            .iter()
            .copied()
            .filter(|_| self.rng.chance(400))
            .collect();
        if tags.is_empty() {
            tags.push(self.rng.pick(CLIENT_TAGS));
        }
        tags
    }

    fn description(&mut self, spec: &mut Value) {
        match self
            .rng
            .pick(&["", "edge nodes", "ci runners", "k8s agent"])
        {
            "" => spec.as_object_mut().unwrap().remove("description"),
            d => spec
                .as_object_mut()
                .unwrap()
                .insert("description".into(), json!(d)),
        };
    }

    fn role(&mut self, spec: &mut Value) {
        match self.rng.pick(&["", "Member", "Admin"]) {
            "" => spec.as_object_mut().unwrap().remove("role"),
            r => spec
                .as_object_mut()
                .unwrap()
                .insert("role".into(), json!(r)),
        };
    }

    /// An expiry among `choices`, with a renewal point that fits it (`2m` keys renew
    /// within the run).
    fn expiry(&mut self, spec: &mut Value, choices: &[Option<&'static str>]) {
        let expiry = self.rng.pick(choices);
        let object = spec.as_object_mut().unwrap();
        let rotation = object
            .entry("rotation")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .unwrap();
        match expiry {
            None => {
                rotation.remove("renewBefore");
                object.remove("expiry");
            }
            Some(expiry) => {
                let renew_before = match expiry {
                    "2m" => "80s",
                    "24h" => "8h",
                    _ => "240h",
                };
                rotation.insert("renewBefore".into(), json!(renew_before));
                object.insert("expiry".into(), json!(expiry));
            }
        }
    }

    /// A spec edit: most shape the key (a new one is due), some do not.
    async fn edit(&mut self, i: usize) {
        let mut r = self.resources[i].clone();
        let edits: &[&str] = match r.provider {
            Provider::Tailscale => &[
                "tags",
                "reusable",
                "ephemeral",
                "preauthorized",
                "description",
                "expiry",
                "secret",
                "policy",
                "overlap",
            ],
            Provider::Prefect if r.adopts() => {
                &["description", "expiry", "secret", "policy", "overlap"]
            }
            Provider::Prefect => &[
                "role",
                "description",
                "expiry",
                "secret",
                "policy",
                "overlap",
            ],
            Provider::Http => &[
                "account",
                "description",
                "expiry",
                "secret",
                "policy",
                "overlap",
            ],
        };
        let spec = &mut r.spec;
        let edit = self.rng.pick(edits);
        match edit {
            "tags" => spec["tags"] = json!(self.tags()),
            flag @ ("reusable" | "ephemeral" | "preauthorized") => {
                spec[flag] = json!(!spec[flag].as_bool().unwrap_or(false));
            }
            "description" => self.description(spec),
            "expiry" => match r.provider {
                Provider::Tailscale => {
                    spec["expiry"] = json!(self.rng.pick(&["24h", "48h", "72h"]))
                }
                Provider::Prefect => {
                    self.expiry(spec, &[None, Some("24h"), Some("720h"), Some("2m")]);
                }
                Provider::Http => self.expiry(spec, &[Some("720h"), Some("24h"), Some("2m")]),
            },
            "secret" => {
                self.serial += 1;
                spec["secret"]["name"] = json!(format!("{}-s{}", r.name, self.serial));
            }
            "policy" => {
                let retained = spec["deletionPolicy"] == "Retain";
                spec["deletionPolicy"] = json!(if retained { "Revoke" } else { "Retain" });
            }
            "overlap" => spec["rotation"]["overlap"] = json!(self.rng.pick(&["1s", "2s", "3s"])),
            "role" => self.role(spec),
            "account" => {
                spec["serviceAccount"]["name"] = json!(self.service_account());
            }
            other => unreachable!("{other}"),
        }
        // Sometimes a rotate bump in the same apply.
        if self.rng.chance(150) {
            r.rotate += 1;
        }
        if self.apply(&r).await {
            r.note(&format!("edited {edit} (rotate {}): {}", r.rotate, r.spec));
            self.counts.edits += 1;
            self.resources[i] = r;
        }
    }

    async fn bump(&mut self, i: usize) {
        let mut r = self.resources[i].clone();
        r.rotate += 1;
        if self.apply(&r).await {
            r.note(&format!("rotate bumped to {}", r.rotate));
            self.counts.rotate_bumps += 1;
            self.resources[i] = r;
        }
    }

    async fn edit_secret(&mut self, i: usize) {
        let (name, key) = self.resources[i].secret();
        let patch =
            json!({"stringData": {key: format!("edited-by-the-suite-{}", self.rng.hex(8))}});
        let result = self
            .secrets()
            .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await;
        if self.done(result.map(drop)) {
            self.resources[i].note(&format!("Secret {name} edited"));
            self.counts.secret_edits += 1;
        }
    }

    async fn delete_secret(&mut self, i: usize) {
        let (name, _) = self.resources[i].secret();
        let result = self.secrets().delete(&name, &DeleteParams::default()).await;
        if self.done(result.map(drop)) {
            self.resources[i].note(&format!("Secret {name} deleted"));
            self.counts.secret_deletes += 1;
        }
    }

    async fn delete(&mut self, i: usize) {
        let r = &self.resources[i];
        let params = DeleteParams::default();
        let result = match r.provider {
            Provider::Tailscale => self
                .keys::<AuthKey>()
                .delete(&r.name, &params)
                .await
                .map(drop),
            _ => self
                .keys::<ServiceAccountKey>()
                .delete(&r.name, &params)
                .await
                .map(drop),
        };
        if self.done(result) {
            self.counts.deletes += 1;
            if self.resources[i].retained() {
                self.counts.retained_deletes += 1;
            }
            self.resources[i].deleted = true;
            self.resources[i].note("deleted");
        }
    }

    /// Server-side applies the resource's manifest; false if it did not happen.
    async fn apply(&mut self, r: &Resource) -> bool {
        let params = PatchParams::apply("fault-suite").force();
        let manifest = r.manifest();
        let patch = Patch::Apply(&manifest);
        let result = match r.provider {
            Provider::Tailscale => self
                .keys::<AuthKey>()
                .patch(&r.name, &params, &patch)
                .await
                .map(drop),
            _ => self
                .keys::<ServiceAccountKey>()
                .patch(&r.name, &params, &patch)
                .await
                .map(drop),
        };
        match result {
            Ok(()) => true,
            Err(e) => {
                eprintln!("fault suite: applying {} {}: {e}", r.kind(), r.name);
                self.counts.failed += 1;
                false
            }
        }
    }

    /// Whether an operation on a Secret or a deletion happened (a 404 did nothing).
    fn done(&mut self, result: Result<(), kube::Error>) -> bool {
        match result {
            Ok(()) => true,
            Err(kube::Error::Api(s)) if s.code == 404 => false,
            Err(_) => {
                self.counts.failed += 1;
                false
            }
        }
    }

    fn keys<K: keyward::reconciler::ManagedKey>(&self) -> Api<K> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn secrets(&self) -> Api<k8s_openapi::api::core::v1::Secret> {
        Api::namespaced(self.client.clone(), &self.ns)
    }
}

/// The kinds of fault the injector serves.
pub const FAULT_KINDS: [&str; 6] = [
    "429 burst",
    "5xx run",
    "5xx after the work",
    "lost answer",
    "late landing",
    "slow answers",
];

/// Which of [`FAULT_KINDS`] a served fault is.
pub fn fault_kind(fault: &Fault) -> &'static str {
    match fault {
        Fault::TooManyRequests { .. } => FAULT_KINDS[0],
        Fault::Status(_) | Fault::MalformedBody => FAULT_KINDS[1],
        Fault::StatusAfter(_) => FAULT_KINDS[2],
        Fault::LostAnswer => FAULT_KINDS[3],
        Fault::Late(_) => FAULT_KINDS[4],
    }
}

/// Queues faults on the emulators at random, a few at a time.
pub struct Injector {
    rng: Rng,
    /// The longest a late create may take to land after it was sent.
    late_max: Duration,
    slow_until: BTreeMap<Provider, Instant>,
    /// Faults queued, by kind (a queued fault may still be waiting at the end).
    pub injected: BTreeMap<&'static str, usize>,
}

impl Injector {
    pub fn new(seed: u64, late_max: Duration) -> Self {
        Self {
            rng: Rng::new(seed),
            late_max,
            slow_until: BTreeMap::new(),
            injected: BTreeMap::new(),
        }
    }

    pub fn pause(&mut self) -> Duration {
        Duration::from_millis(400 + self.rng.below(1100))
    }

    pub fn step(&mut self, upstreams: &Upstreams) {
        let now = Instant::now();
        for (provider, faults) in upstreams.faults() {
            if self
                .slow_until
                .get(&provider)
                .is_some_and(|until| *until <= now)
            {
                faults.set_delay(Duration::ZERO);
                self.slow_until.remove(&provider);
            }
        }
        let (provider, faults) = upstreams.faults()[self.rng.below(3) as usize];
        if faults.pending() >= 4 {
            return;
        }
        // Creates and rotations are POSTs; Tailscale's token requests are POSTs too,
        // and its creates are the POSTs to `…/keys`.
        let creates = match provider {
            Provider::Tailscale => Some("/keys"),
            _ => None,
        };
        let kind = self.rng.weighted(&[3, 3, 2, 2, 3, 1]);
        match kind {
            0 => {
                let retry_after = self.rng.chance(700).then_some(1);
                let times = 1 + self.rng.below(4) as usize;
                faults.inject(Fault::TooManyRequests { retry_after }, times, None);
            }
            1 => {
                let code = self.rng.pick(&[500, 502, 503, 504]);
                let times = 1 + self.rng.below(4) as usize;
                faults.inject(Fault::Status(code), times, None);
            }
            2 => {
                let code = self.rng.pick(&[500, 502, 504]);
                faults.inject_for(Fault::StatusAfter(code), 1, Some("POST"), creates);
            }
            3 => faults.inject_for(Fault::LostAnswer, 1, Some("POST"), creates),
            4 => {
                let late = Duration::from_millis(
                    500 + self.rng.below(self.late_max.as_millis() as u64 - 500),
                );
                faults.inject_for(Fault::Late(late), 1, Some("POST"), creates);
            }
            _ => {
                if self.slow_until.contains_key(&provider) {
                    return;
                }
                faults.set_delay(Duration::from_millis(100 + self.rng.below(400)));
                let stretch = Duration::from_millis(2000 + self.rng.below(4000));
                self.slow_until.insert(provider, now + stretch);
            }
        }
        *self.injected.entry(FAULT_KINDS[kind]).or_default() += 1;
    }
}
