//! Both key kinds as one thing to list, name, patch and watch: every verb treats an
//! `AuthKey` and a `ServiceAccountKey` alike.

use futures::{Stream, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use serde::Serialize;
use serde_json::Value;

use super::Error;
use crate::{
    reconciler::ManagedKey,
    resources::{AuthKey, KeyStatus, ProviderKind, ProviderRef, ServiceAccountKey},
};

/// Which of the two key kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum KeyKind {
    AuthKey,
    ServiceAccountKey,
}

impl KeyKind {
    pub const ALL: [KeyKind; 2] = [KeyKind::AuthKey, KeyKind::ServiceAccountKey];

    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::AuthKey => "AuthKey",
            KeyKind::ServiceAccountKey => "ServiceAccountKey",
        }
    }

    /// The resource names kubectl accepts for the kind: singular, plural, short name,
    /// each optionally with the group (`ak`, `authkeys.keyward.dev`).
    pub fn from_type(word: &str) -> Option<Self> {
        let word = word.to_ascii_lowercase();
        let word = word.strip_suffix(".keyward.dev").unwrap_or(&word);
        match word {
            "authkey" | "authkeys" | "ak" => Some(KeyKind::AuthKey),
            "serviceaccountkey" | "serviceaccountkeys" | "sak" => Some(KeyKind::ServiceAccountKey),
            _ => None,
        }
    }
}

impl std::fmt::Display for KeyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One key resource, whichever its kind: what the verbs read from it.
#[derive(Clone, Debug)]
pub struct Key {
    pub kind: KeyKind,
    pub namespace: String,
    pub name: String,
    pub provider: ProviderRef,
    pub status: KeyStatus,
    pub generation: Option<i64>,
    pub uid: String,
    pub rotate_annotation: Option<String>,
    pub secret: String,
    pub deleting: bool,
    /// `ServiceAccountKey`: the upstream principal (`spec.serviceAccount.name`).
    pub service_account: Option<String>,
}

impl Key {
    /// The key of either kind, as the verbs see it.
    pub fn of<K: ManagedKey>(object: &K) -> Self {
        let meta = object.meta();
        let name = meta.name.clone().unwrap_or_default();
        Self {
            kind: KeyKind::from_type(K::KIND).expect("a key kind"),
            namespace: meta.namespace.clone().unwrap_or_default(),
            secret: object
                .secret_spec()
                .name
                .clone()
                .unwrap_or_else(|| name.clone()),
            name,
            provider: object.provider_ref().clone(),
            status: object.key_status().cloned().unwrap_or_default(),
            generation: meta.generation,
            uid: meta.uid.clone().unwrap_or_default(),
            rotate_annotation: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(crate::lifecycle::ROTATE_ANNOTATION))
                .cloned(),
            deleting: meta.deletion_timestamp.is_some(),
            service_account: object.shape().service_account,
        }
    }

    /// `authkey/edge`, as kubectl names objects.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.kind.as_str().to_ascii_lowercase(), self.name)
    }

    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// A provider resource as the verbs name it: `kp/NAMESPACE/NAME` or `ckp/NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderName {
    pub kind: ProviderKind,
    /// A `KeyProvider`'s namespace: every key that uses it lives there.
    pub namespace: Option<String>,
    pub name: String,
}

impl ProviderName {
    /// The provider `key` names.
    pub fn of(key: &Key) -> Self {
        Self {
            kind: key.provider.kind,
            namespace: (key.provider.kind == ProviderKind::KeyProvider)
                .then(|| key.namespace.clone()),
            name: key.provider.name.clone(),
        }
    }

    /// `kp/NAMESPACE/NAME` or `ckp/NAME`.
    pub fn subject(&self) -> String {
        match (self.kind, &self.namespace) {
            (ProviderKind::KeyProvider, Some(ns)) => format!("kp/{ns}/{}", self.name),
            _ => format!("ckp/{}", self.name),
        }
    }

    /// Whether `key` issues its keys through this provider.
    pub fn serves(&self, key: &Key) -> bool {
        Self::of(key) == *self
    }
}

fn api<K: ManagedKey>(client: &Client, namespace: Option<&str>) -> Api<K> {
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn where_(namespace: Option<&str>) -> String {
    namespace.map_or_else(
        || "all namespaces".to_owned(),
        |ns| format!("namespace {ns}"),
    )
}

async fn list_kind<K: ManagedKey>(
    client: &Client,
    namespace: Option<&str>,
    params: &ListParams,
) -> Result<Vec<Key>, Error> {
    let list = api::<K>(client, namespace)
        .list(params)
        .await
        .map_err(|source| Error::Kube {
            what: format!("listing {}s in {}", K::KIND, where_(namespace)),
            source,
        })?;
    Ok(list.items.iter().map(Key::of).collect())
}

/// Every key of both kinds in `namespace` (`None`: all namespaces) matching the label
/// `selector`, ordered by namespace, kind and name.
pub async fn list(
    client: &Client,
    namespace: Option<&str>,
    selector: Option<&str>,
) -> Result<Vec<Key>, Error> {
    let params = match selector {
        Some(s) => ListParams::default().labels(s),
        None => ListParams::default(),
    };
    let mut keys = list_kind::<AuthKey>(client, namespace, &params).await?;
    keys.extend(list_kind::<ServiceAccountKey>(client, namespace, &params).await?);
    keys.sort_by(|a, b| (&a.namespace, a.kind, &a.name).cmp(&(&b.namespace, b.kind, &b.name)));
    Ok(keys)
}

async fn get_kind<K: ManagedKey>(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<Key>, Error> {
    let found = api::<K>(client, Some(namespace))
        .get_opt(name)
        .await
        .map_err(|source| Error::Kube {
            what: format!("reading {} {namespace}/{name}", K::KIND),
            source,
        })?;
    Ok(found.as_ref().map(Key::of))
}

/// The key a command-line word names: `NAME` (either kind; refused when both kinds
/// have one of that name) or `TYPE/NAME` (`ak/edge`, `serviceaccountkey/agent`).
pub async fn get(client: &Client, namespace: &str, word: &str) -> Result<Key, Error> {
    let (kinds, name) = match word.split_once('/') {
        Some((kind, name)) => {
            let kind = KeyKind::from_type(kind).ok_or_else(|| {
                Error::Usage(format!(
                    "{word}: {kind} is not a key kind; use authkey (ak) or serviceaccountkey (sak)"
                ))
            })?;
            (vec![kind], name)
        }
        None => (KeyKind::ALL.to_vec(), word),
    };
    let mut found = Vec::new();
    for kind in kinds {
        found.extend(match kind {
            KeyKind::AuthKey => get_kind::<AuthKey>(client, namespace, name).await?,
            KeyKind::ServiceAccountKey => {
                get_kind::<ServiceAccountKey>(client, namespace, name).await?
            }
        });
    }
    match found.len() {
        0 => Err(Error::Usage(format!(
            "no AuthKey or ServiceAccountKey named {name} in namespace {namespace}"
        ))),
        1 => Ok(found.remove(0)),
        _ => Err(Error::Usage(format!(
            "both an AuthKey and a ServiceAccountKey are named {name} in namespace {namespace}; say ak/{name} or sak/{name}"
        ))),
    }
}

async fn patch_kind<K: ManagedKey>(
    client: &Client,
    key: &Key,
    patch: &Patch<Value>,
) -> Result<(), kube::Error> {
    api::<K>(client, Some(&key.namespace))
        .patch(&key.name, &PatchParams::default(), patch)
        .await
        .map(drop)
}

/// Sets `keyward.dev/rotate` on a key (a merge patch of that one annotation).
pub async fn annotate_rotate(client: &Client, key: &Key, value: &str) -> Result<(), Error> {
    let patch = Patch::Merge(serde_json::json!({
        "metadata": {"annotations": {crate::lifecycle::ROTATE_ANNOTATION: value}}
    }));
    let result = match key.kind {
        KeyKind::AuthKey => patch_kind::<AuthKey>(client, key, &patch).await,
        KeyKind::ServiceAccountKey => patch_kind::<ServiceAccountKey>(client, key, &patch).await,
    };
    result.map_err(|source| Error::Kube {
        what: format!(
            "annotating {} in namespace {}",
            key.reference(),
            key.namespace
        ),
        source,
    })
}

fn watch_kind<K: ManagedKey>(
    client: &Client,
    namespace: Option<&str>,
) -> impl Stream<Item = Result<Key, watcher::Error>> + Send + use<K> {
    watcher(api::<K>(client, namespace), watcher::Config::default())
        .applied_objects()
        .map(|k| k.map(|k| Key::of(&k)))
}

/// Every change to keys of both kinds in `namespace` (`None`: all), starting with
/// their current state.
pub fn watch(
    client: &Client,
    namespace: Option<&str>,
) -> impl Stream<Item = Result<Key, watcher::Error>> + Send + use<> {
    futures::stream::select(
        watch_kind::<AuthKey>(client, namespace).boxed(),
        watch_kind::<ServiceAccountKey>(client, namespace).boxed(),
    )
}
