//! The three upstreams the suite runs against — the Tailscale, Prefect Cloud and
//! Prefect 1 GraphQL emulators — the providers that point keyward at them, and what
//! the audit asks of them: which keys are live and whose they are, what a key was
//! issued for, and every value any of them ever handed out.

use std::sync::Arc;

use jiff::Timestamp;
use keyward_emulators::{
    Faults,
    prefect::Prefect,
    prefect_graphql::{Admin, PrefectGraphql},
    tailscale::{OAuthClient, Tailscale},
};
use kube::Client;
use serde_json::{Value, json};

use super::common::{self, apply};

/// The tags the emulated OAuth client may put on keys.
pub const CLIENT_TAGS: &[&str] = &["tag:edge", "tag:ci", "tag:jobs"];
/// A Prefect service account made in the UI, which `create: false` keys adopt.
pub const ADOPTED_BOT: &str = "adopted-bot";
/// Keys Prefect makes only to rotate another one away live 30 seconds; keyward hands
/// out none that short (`spec.expiry` is at least a minute).
const DISCARDED_LIFETIME_SECONDS: i64 = 30;

const HTTP_EXAMPLE: &str = include_str!("../../examples/http/prefect1-graphql.yaml");

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Provider {
    Tailscale,
    Prefect,
    Http,
}

impl Provider {
    pub const ALL: [Provider; 3] = [Provider::Tailscale, Provider::Prefect, Provider::Http];

    pub fn name(self) -> &'static str {
        match self {
            Provider::Tailscale => "tailscale",
            Provider::Prefect => "prefect",
            Provider::Http => "http (GraphQL)",
        }
    }
}

/// The emulator's id of a key, from keyward's `status.keyId`: Prefect's ids are
/// `created/<bot>/<key>` or `adopted/<bot>/<key>`, the others' the upstream's own.
pub fn upstream_id(key_id: &str) -> String {
    key_id.rsplit('/').next().unwrap_or_default().to_owned()
}

/// A live upstream key.
#[derive(Clone, Debug)]
pub struct LiveKey {
    pub provider: Provider,
    /// The emulator's id.
    pub id: String,
    /// Whose it is by what it carries: the resource-uid part of its marker (Tailscale,
    /// http), or its service account's name (Prefect, which has no room for a marker).
    pub owner: String,
    /// A Prefect key made only to rotate another away (it expires on its own).
    pub discarded: bool,
    /// The marker it carries (Tailscale, http).
    pub marker: Option<String>,
    pub created: Timestamp,
}

/// What the upstream holds for one key keyward references.
pub struct Issued {
    pub value: String,
    pub live: bool,
    /// Each way the key differs from what the spec asks for.
    pub differences: Vec<String>,
}

/// What a spec asks a key to be, in the terms every upstream can be checked against.
#[derive(Clone, Debug, Default)]
pub struct Wanted {
    pub description: String,
    pub lifetime_seconds: Option<i64>,
    pub tags: Vec<String>,
    pub reusable: bool,
    pub ephemeral: bool,
    pub preauthorized: bool,
    pub service_account: String,
    /// The role of a service account keyward created, when the spec names one (an
    /// adopted one keeps its own).
    pub role: Option<String>,
}

pub struct Upstreams {
    pub tailscale: Tailscale,
    oauth: OAuthClient,
    pub prefect: Prefect,
    prefect_admin: String,
    pub graphql: PrefectGraphql,
    graphql_admin: Admin,
    /// Prefect 1 service accounts (user ids) the http keys are for.
    pub service_accounts: Vec<String>,
    /// The ClusterKeyProvider of the Tailscale keys.
    pub cluster_provider: String,
    /// The key the adopted service account was made with, in Prefect's UI: the user's,
    /// until a resource adopts the account and keyward rotates it away.
    pub adopted_ui_key: String,
}

impl Upstreams {
    pub async fn start(ns: &str) -> Self {
        let tailscale = Tailscale::start().await;
        let oauth = tailscale.add_oauth_client(CLIENT_TAGS, &["auth_keys"]);
        let prefect = Prefect::start().await;
        let prefect_admin = prefect.add_admin_key();
        let (adopted_bot, _) = prefect.create_bot_in_ui(ADOPTED_BOT);
        let adopted_ui_key = prefect
            .keys()
            .into_iter()
            .find(|k| k.bot.as_deref() == Some(adopted_bot.as_str()))
            .expect("the adopted service account's key")
            .id;
        let graphql = PrefectGraphql::start().await;
        let graphql_admin = graphql.add_admin();
        let service_accounts = (0..3).map(|_| graphql.add_service_account()).collect();
        Self {
            tailscale,
            oauth,
            prefect,
            prefect_admin,
            graphql,
            graphql_admin,
            service_accounts,
            cluster_provider: format!("tailscale-{ns}"),
            adopted_ui_key,
        }
    }

    /// The credential Secrets and the providers: a ClusterKeyProvider (OAuth) for
    /// Tailscale, serving `ns` only; KeyProviders for Prefect and for the http
    /// provider, the latter exactly `examples/http/prefect1-graphql.yaml`.
    pub async fn install(&self, client: &Client, ns: &str) {
        apply(
            client,
            ns,
            &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tailscale-oauth"},
                   "stringData": {"client-secret": self.oauth.secret}}),
        )
        .await;
        apply(
            client,
            ns,
            &json!({"apiVersion": "keyward.dev/v1alpha1", "kind": "ClusterKeyProvider",
                   "metadata": {"name": self.cluster_provider},
                   "spec": {"tailscale": {"apiURL": self.tailscale.base_url(), "tailnet": "-",
                                          "oauth": {"clientId": self.oauth.id,
                                                    "clientSecretRef": {"name": "tailscale-oauth", "key": "client-secret"}}},
                            "policy": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                                       "allowedTags": CLIENT_TAGS, "maxExpiry": "2160h"}}}),
        )
        .await;
        apply(
            client,
            ns,
            &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "prefect-admin"},
                   "stringData": {"api-key": self.prefect_admin}}),
        )
        .await;
        apply(
            client,
            ns,
            &json!({"apiVersion": "keyward.dev/v1alpha1", "kind": "KeyProvider",
                   "metadata": {"name": "prefect"},
                   "spec": {"prefect": {"apiURL": self.prefect.api_url(),
                                        "accountId": self.prefect.account_id(),
                                        "apiKeySecretRef": {"name": "prefect-admin", "key": "api-key"}}}}),
        )
        .await;
        for doc in self.http_example() {
            match doc["kind"].as_str() {
                Some("Secret") | Some("KeyProvider") => apply(client, ns, &doc).await,
                _ => {}
            }
        }
    }

    /// The example's documents, pointed at the emulator and its admin.
    fn http_example(&self) -> Vec<Value> {
        let text = HTTP_EXAMPLE.replace(
            "https://api.prefect.io/",
            &format!("{}/", self.graphql.base_url()),
        );
        let mut docs = common::yaml_documents(&text);
        for doc in &mut docs {
            if doc["kind"] == "Secret" {
                doc["stringData"]["apiKey"] = json!(self.graphql_admin.key);
            }
        }
        docs
    }

    /// The spec of the example's ServiceAccountKey: the template of every http key.
    pub fn http_key_template(&self) -> Value {
        self.http_example()
            .into_iter()
            .find(|d| d["kind"] == "ServiceAccountKey")
            .expect("the example has a ServiceAccountKey")["spec"]
            .clone()
    }

    /// The provider the KeyProvider / ClusterKeyProvider `name` is.
    pub fn provider_named(&self, name: &str) -> Option<Provider> {
        match name {
            "prefect" => Some(Provider::Prefect),
            "prefect1" => Some(Provider::Http),
            n if n == self.cluster_provider => Some(Provider::Tailscale),
            _ => None,
        }
    }

    pub fn faults(&self) -> [(Provider, &Arc<Faults>); 3] {
        [
            (Provider::Tailscale, self.tailscale.faults()),
            (Provider::Prefect, self.prefect.faults()),
            (Provider::Http, self.graphql.faults()),
        ]
    }

    /// Every live key keyward could have made (the test's own admin keys left out).
    pub fn live_keys(&self) -> Vec<LiveKey> {
        let marked = |provider, id: String, text: &str, created| {
            let marker = keyward::providers::marker_in(text);
            LiveKey {
                provider,
                id,
                owner: marker
                    .as_ref()
                    .map(|m| m[3..11].to_owned())
                    .unwrap_or_default(),
                discarded: false,
                marker,
                created,
            }
        };
        let mut live: Vec<LiveKey> = self
            .tailscale
            .live_keys()
            .into_iter()
            .map(|k| marked(Provider::Tailscale, k.id, &k.description, k.created))
            .collect();
        live.extend(
            self.graphql
                .live_service_account_keys()
                .into_iter()
                .map(|k| marked(Provider::Http, k.id, &k.name, k.created)),
        );
        let bots = self.prefect.bots();
        live.extend(self.prefect.live_bot_keys().into_iter().map(|k| {
            let bot = k.bot.as_deref().unwrap_or_default();
            LiveKey {
                provider: Provider::Prefect,
                owner: bots
                    .iter()
                    .find(|b| b.id == bot)
                    .map(|b| b.name.clone())
                    .unwrap_or_default(),
                discarded: k.expiration.is_some_and(|e| {
                    e.duration_since(k.created).as_secs() <= DISCARDED_LIFETIME_SECONDS
                }),
                id: k.id,
                marker: None,
                created: k.created,
            }
        }));
        live
    }

    /// The key keyward's `status.keyId` names, compared with what the spec asks.
    pub fn issued(&self, provider: Provider, key_id: &str, wanted: &Wanted) -> Option<Issued> {
        let id = upstream_id(key_id);
        let mut differences = Vec::new();
        let mut differ = |what: &str, got: &dyn std::fmt::Display, want: &dyn std::fmt::Display| {
            let (got, want) = (got.to_string(), want.to_string());
            if got != want {
                differences.push(format!("{what}: {got}, spec {want}"));
            }
        };
        let (value, live, created, expires) = match provider {
            Provider::Tailscale => {
                let k = self.tailscale.key(&id)?;
                let (mut tags, mut want_tags) = (k.tags.clone(), wanted.tags.clone());
                tags.sort();
                want_tags.sort();
                differ("tags", &tags.join(","), &want_tags.join(","));
                differ("reusable", &k.reusable, &wanted.reusable);
                differ("ephemeral", &k.ephemeral, &wanted.ephemeral);
                differ("preauthorized", &k.preauthorized, &wanted.preauthorized);
                differ(
                    "description",
                    &user_description(&k.description),
                    &wanted.description.trim(),
                );
                let live = k.is_valid(self.tailscale.now());
                (k.value, live, k.created, Some(k.expires))
            }
            Provider::Prefect => {
                let k = self.prefect.key(&id)?;
                let bot = k.bot.clone().unwrap_or_default();
                let name = self
                    .prefect
                    .bots()
                    .into_iter()
                    .find(|b| b.id == bot)
                    .map(|b| b.name);
                let name = name.unwrap_or_else(|| "(deleted)".into());
                differ("service account", &name, &wanted.service_account);
                if let Some(role) = &wanted.role {
                    differ(
                        "role",
                        &self.prefect.role_of(&bot).unwrap_or_default(),
                        role,
                    );
                }
                let live = k.is_valid(Timestamp::now());
                (k.value, live, k.created, k.expiration)
            }
            Provider::Http => {
                let k = self.graphql.key(&id)?;
                differ("service account", &k.user_id, &wanted.service_account);
                differ(
                    "description",
                    &user_description(&k.name),
                    &wanted.description.trim(),
                );
                let live = k.is_valid(Timestamp::now());
                (k.value, live, k.created, k.expires_at)
            }
        };
        // The expiry is computed when the create is sent and the key made when it
        // lands: a slow answer shortens the lifetime by its delay.
        let lifetime = expires.map(|e| e.duration_since(created).as_secs());
        let lifetime_matches = match (lifetime, wanted.lifetime_seconds) {
            (Some(got), Some(want)) => (got - want).abs() <= 15,
            (got, want) => got.is_none() && want.is_none(),
        };
        if !lifetime_matches {
            differences.push(format!(
                "lifetime: {lifetime:?}s, spec {:?}s",
                wanted.lifetime_seconds
            ));
        }
        Some(Issued {
            value,
            live,
            differences,
        })
    }

    /// Every value any upstream ever handed out, credentials included.
    pub fn every_value(&self) -> Vec<String> {
        let mut values = vec![self.oauth.secret.clone(), self.graphql_admin.key.clone()];
        values.extend(self.tailscale.keys().into_iter().map(|k| k.value));
        values.extend(self.prefect.keys().into_iter().map(|k| k.value));
        values.extend(self.graphql.keys().into_iter().map(|k| k.value));
        values
    }

    /// The id of every key each upstream made for keyward (its admin keys left out;
    /// Prefect's adopted service account's first key, made in its UI, counted).
    pub fn keys_made(&self) -> Vec<(Provider, Vec<String>)> {
        vec![
            (
                Provider::Tailscale,
                self.tailscale.keys().into_iter().map(|k| k.id).collect(),
            ),
            (
                Provider::Prefect,
                self.prefect
                    .keys()
                    .into_iter()
                    .filter(|k| k.bot.is_some())
                    .map(|k| k.id)
                    .collect(),
            ),
            (
                Provider::Http,
                self.graphql
                    .keys()
                    .into_iter()
                    .filter(|k| k.user_id != self.graphql_admin.user_id)
                    .map(|k| k.id)
                    .collect(),
            ),
        ]
    }
}

/// The user's part of a description that ends in keyward's marker.
fn user_description(text: &str) -> String {
    match text.rsplit_once(' ') {
        Some((user, marker)) if keyward::providers::marker_in(marker).is_some() => {
            user.trim().to_owned()
        }
        _ if keyward::providers::marker_in(text).is_some() => String::new(),
        _ => text.trim().to_owned(),
    }
}
