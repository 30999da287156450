//! `KeyProvider` and `ClusterKeyProvider`: where keys come from, with which
//! credentials, and who may mint what through them.

// `printcolumn(..)` repeats `type_ = ..` by design; clippy reads that as a duplicate.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::shared::{KeyDuration, LocalSecretRef, SecretKeyRef, Tag};

/// How builtin keys are encoded.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KeyEncoding {
    /// Letters and digits only: safe in URLs, env vars, shells and config files.
    #[default]
    Base62,
    /// RFC 4648 URL-safe base64 without padding.
    Base64url,
    /// Lower-case hexadecimal.
    Hex,
}

/// Keys minted by keyward itself from the operating system's random generator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct BuiltinProvider {
    /// Prefix in front of every key, e.g. `kw_live_`, so leaked keys are recognisable
    /// by secret scanners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = r"^[A-Za-z0-9_.-]*$"))]
    pub prefix: Option<String>,
    /// `base62` (default), `base64url` or `hex`.
    #[serde(default)]
    pub encoding: KeyEncoding,
    /// Random bytes per key: at least 32 (256 bits), the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 32, max = 128))]
    pub bytes: Option<u16>,
}

/// Tailscale OAuth client credentials (scope `auth_keys`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TailscaleOAuth {
    /// The OAuth client id (not secret).
    #[schemars(length(min = 1, max = 200))]
    pub client_id: String,
    /// The Secret key holding the OAuth client secret (`tskey-client-…`).
    pub client_secret_ref: SecretKeyRef,
}

/// Tailscale workload identity federation: keyward's own ServiceAccount token, with
/// this audience, exchanged for an API access token through a federated identity, so
/// no Tailscale secret is stored anywhere.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TailscaleWorkloadIdentity {
    /// The federated identity's client id (not secret).
    #[schemars(length(min = 1, max = 200))]
    pub client_id: String,
    /// The audience the federated identity expects (its `aud`, e.g.
    /// `api.tailscale.com/<client id>`); keyward requests its token with exactly this.
    #[schemars(length(min = 1, max = 1000))]
    pub audience: String,
}

/// Tailscale API v2 auth keys.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.apiKeySecretRef), has(self.oauth), has(self.workloadIdentity)].filter(x, x).size() == 1").message("tailscale needs exactly one credential: apiKeySecretRef (an API access token), oauth (an OAuth client) or workloadIdentity (keyward's ServiceAccount token, exchanged through a federated identity)"))]
pub struct TailscaleProvider {
    /// API base URL; `http://` is allowed for emulators and proxies.
    #[serde(rename = "apiURL", default = "default_tailscale_url")]
    #[schemars(regex(pattern = r"^https?://[^\s]+$"), length(max = 2048))]
    pub api_url: String,
    /// Tailnet name; `-` means the credential's default tailnet.
    #[serde(default = "default_tailnet")]
    #[schemars(length(min = 1, max = 253))]
    pub tailnet: String,
    /// The Secret key holding an API access token (`tskey-api-…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,
    /// An OAuth client instead of an API access token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth: Option<TailscaleOAuth>,
    /// Workload identity federation instead of a stored credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_identity: Option<TailscaleWorkloadIdentity>,
}

fn default_tailscale_url() -> String {
    "https://api.tailscale.com".to_owned()
}

fn default_tailnet() -> String {
    "-".to_owned()
}

/// Prefect Cloud service-account (bot) API keys.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrefectProvider {
    /// API base URL; `http://` is allowed for emulators and proxies.
    #[serde(rename = "apiURL", default = "default_prefect_url")]
    #[schemars(regex(pattern = r"^https?://[^\s]+$"), length(max = 2048))]
    pub api_url: String,
    /// The Prefect Cloud account id (a UUID).
    #[schemars(regex(
        pattern = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    ))]
    pub account_id: String,
    /// The Secret key holding a Prefect API key allowed to manage service accounts.
    pub api_key_secret_ref: SecretKeyRef,
}

fn default_prefect_url() -> String {
    "https://api.prefect.cloud/api".to_owned()
}

/// HTTP methods an `http` provider may use.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    #[default]
    Post,
    Put,
    Patch,
    Delete,
}

/// A GraphQL request body.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct GraphQlBody {
    /// The query or mutation document (not a template: data goes in `variables`).
    #[schemars(length(min = 1, max = 16384))]
    pub query: String,
    /// Variables, each a template that must render to one JSON value, e.g.
    /// `{"key_id": "{{ keyId }}"}` or `{{ json description }}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variables: BTreeMap<String, String>,
}

/// Where the interesting fields are in a response, as JSONPath expressions (RFC 9535,
/// e.g. `$.data.create_api_key.key`). With `items`, `id`, `description`, `expiresAt`
/// and `valid` are read from each item (`$` is the item).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResponseFields {
    /// The upstream key id, e.g. `$.data.create_api_key.id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The key value (issue only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The expiry time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Inspect: a boolean that is true while the key is valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid: Option<String>,
    /// List: the array of keys, each then read with `id` and `description`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<String>,
    /// List: where the marker-carrying description / name is in each item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Revoke / inspect: when this matches anything but `false` or `null`, the key is
    /// already gone (for APIs that say so in the body, e.g. a GraphQL error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gone: Option<String>,
}

/// One request of an `http` provider. Every string is a template (see docs/providers/http.md).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.body) && has(self.graphql))").message("set either body or graphql on a request, not both"))]
pub struct HttpOperation {
    /// Default: POST.
    #[serde(default)]
    pub method: HttpMethod,
    /// Request URL (a template), `http://` or `https://`.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://"))]
    pub url: String,
    /// Request headers (templates), e.g. `Authorization: Bearer {{ credentials.token }}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// A JSON body template; it must render to valid JSON (`{{ name }}` inserts JSON
    /// string content, `{{ json name }}` a JSON literal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16384))]
    pub body: Option<String>,
    /// A GraphQL body instead of `body`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graphql: Option<GraphQlBody>,
    /// Status codes that mean success. Default: any 2xx.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub success_codes: Vec<u16>,
    /// Status codes that mean "the key is already gone" (revoke / inspect). Default: 404.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub gone_codes: Vec<u16>,
    /// Fields to extract from the response.
    #[serde(default)]
    pub response: ResponseFields,
}

/// Any other key API, described as requests rather than coded.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.issue.response.id) && has(self.issue.response.value)").message("http.issue.response needs id and value: JSONPath expressions that find the key id and the key value in the issue response"))]
pub struct HttpProvider {
    /// A Secret whose data keys are available to templates as `credentials.<key>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<LocalSecretRef>,
    /// Creates a key.
    pub issue: HttpOperation,
    /// Revokes a key (omitted: keys cannot be revoked and are left to expire).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke: Option<HttpOperation>,
    /// Reads a key's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inspect: Option<HttpOperation>,
    /// Lists keys, for orphan recovery by marker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list: Option<HttpOperation>,
    /// The longest lifetime the API grants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_expiry: Option<KeyDuration>,
}

/// Who may use a provider and what they may mint through it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderPolicy {
    /// Namespaces whose keys may use this provider. On a `ClusterKeyProvider`, unset
    /// means no namespace until allowed (`{}` allows all); a `KeyProvider` serves its
    /// own namespace only, whatever this says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Tags a key may carry (unset: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub allowed_tags: Option<Vec<Tag>>,
    /// The longest expiry a key may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_expiry: Option<KeyDuration>,
    /// Whether reusable keys may be minted. Default: true.
    #[serde(default = "default_true")]
    pub allow_reusable: bool,
    /// Whether pre-approved keys may be minted. Default: true.
    #[serde(default = "default_true")]
    pub allow_preauthorized: bool,
    /// Whether ephemeral keys may be minted. Default: true.
    #[serde(default = "default_true")]
    pub allow_ephemeral: bool,
}

fn default_true() -> bool {
    true
}

/// A request budget towards the upstream API, shared by every key of the provider.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Sustained requests per minute.
    #[schemars(range(min = 1, max = 100000))]
    pub requests_per_minute: u32,
    /// Requests that may go at once after a quiet period. Default: 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub burst: Option<u32>,
}

/// Observed state of a provider.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderStatus {
    /// `Ready`, with a reason naming what is misconfigured.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Which provider type is configured (`builtin`, `tailscale`, `prefect`, `http`).
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "type")]
    pub provider_type: Option<String>,
}

/// The two provider kinds share one spec; a macro keeps them from drifting apart
/// (`CustomResource` derives one kind per struct).
macro_rules! provider_kind {
    ($spec:ident, $kind:literal, $short:literal, $doc:literal $(, $namespaced:ident)?) => {
        #[doc = $doc]
        #[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
        #[kube(
            group = "keyward.dev",
            version = "v1alpha1",
            kind = $kind,
            $($namespaced,)?
            status = "ProviderStatus",
            shortname = $short,
            category = "keyward",
            doc = $doc,
            printcolumn(name = "Type", type_ = "string", json_path = ".status.type"),
            printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
            printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason", priority = 1),
            printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
        )]
        #[serde(rename_all = "camelCase")]
        #[x_kube(validation = Rule::new("[has(self.builtin), has(self.tailscale), has(self.prefect), has(self.http)].filter(x, x).size() == 1").message("set exactly one provider type: builtin, tailscale, prefect or http"))]
        pub struct $spec {
            /// Keys minted by keyward itself.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub builtin: Option<BuiltinProvider>,
            /// Tailscale auth keys (API v2).
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub tailscale: Option<TailscaleProvider>,
            /// Prefect Cloud service-account keys.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub prefect: Option<PrefectProvider>,
            /// Any other key API, described as HTTP requests.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub http: Option<HttpProvider>,
            /// Who may use this provider and what they may mint.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub policy: Option<ProviderPolicy>,
            /// Request budget towards the upstream API.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub rate_limit: Option<RateLimit>,
        }
    };
}

provider_kind!(
    KeyProviderSpec,
    "KeyProvider",
    "kp",
    "Where a namespace's keys come from: a provider type, its settings, and credentials from a Secret in the same namespace.",
    namespaced
);

provider_kind!(
    ClusterKeyProviderSpec,
    "ClusterKeyProvider",
    "ckp",
    "Where keys come from, for every namespace its policy allows; credentials live in a Secret in the operator's namespace."
);
