//! Both key kinds as one thing to list, name, patch and watch: every verb treats an
//! `AuthKey` and a `ServiceAccountKey` alike.

use futures::{Stream, StreamExt};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use serde::Serialize;

use super::Error;
use crate::resources::{AuthKey, KeyStatus, ProviderKind, ProviderRef, ServiceAccountKey};

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
}

impl Key {
    fn new<K: kube::Resource>(
        kind: KeyKind,
        object: &K,
        provider: &ProviderRef,
        status: Option<&KeyStatus>,
        secret: Option<&str>,
    ) -> Self {
        let meta = object.meta();
        let name = meta.name.clone().unwrap_or_default();
        Self {
            kind,
            namespace: meta.namespace.clone().unwrap_or_default(),
            secret: secret.map_or_else(|| name.clone(), str::to_owned),
            name,
            provider: provider.clone(),
            status: status.cloned().unwrap_or_default(),
            generation: meta.generation,
            uid: meta.uid.clone().unwrap_or_default(),
            rotate_annotation: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(crate::lifecycle::ROTATE_ANNOTATION))
                .cloned(),
            deleting: meta.deletion_timestamp.is_some(),
        }
    }

    /// `authkey/edge`, as kubectl names objects.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.kind.as_str().to_ascii_lowercase(), self.name)
    }

    /// `KeyProvider/name` or `ClusterKeyProvider/name`.
    pub fn provider_display(&self) -> String {
        let kind = match self.provider.kind {
            ProviderKind::KeyProvider => "KeyProvider",
            ProviderKind::ClusterKeyProvider => "ClusterKeyProvider",
        };
        format!("{kind}/{}", self.provider.name)
    }

    pub fn condition(
        &self,
        type_: &str,
    ) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
        self.status.conditions.iter().find(|c| c.type_ == type_)
    }
}

impl From<&AuthKey> for Key {
    fn from(k: &AuthKey) -> Self {
        Key::new(
            KeyKind::AuthKey,
            k,
            &k.spec.provider_ref,
            k.status.as_ref(),
            k.spec.secret.name.as_deref(),
        )
    }
}

impl From<&ServiceAccountKey> for Key {
    fn from(k: &ServiceAccountKey) -> Self {
        Key::new(
            KeyKind::ServiceAccountKey,
            k,
            &k.spec.provider_ref,
            k.status.as_ref(),
            k.spec.secret.name.as_deref(),
        )
    }
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
{
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
    let context = |kind: KeyKind| {
        move |source| Error::Kube {
            what: format!("listing {kind}s in {}", where_(namespace)),
            source,
        }
    };
    let auth = api::<AuthKey>(client, namespace)
        .list(&params)
        .await
        .map_err(context(KeyKind::AuthKey))?;
    let service = api::<ServiceAccountKey>(client, namespace)
        .list(&params)
        .await
        .map_err(context(KeyKind::ServiceAccountKey))?;
    let mut keys: Vec<Key> = auth
        .items
        .iter()
        .map(Key::from)
        .chain(service.items.iter().map(Key::from))
        .collect();
    keys.sort_by(|a, b| (&a.namespace, a.kind, &a.name).cmp(&(&b.namespace, b.kind, &b.name)));
    Ok(keys)
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
        let context = |source| Error::Kube {
            what: format!("reading {kind} {namespace}/{name}"),
            source,
        };
        let key = match kind {
            KeyKind::AuthKey => api::<AuthKey>(client, Some(namespace))
                .get_opt(name)
                .await
                .map_err(context)?
                .map(|k| Key::from(&k)),
            KeyKind::ServiceAccountKey => api::<ServiceAccountKey>(client, Some(namespace))
                .get_opt(name)
                .await
                .map_err(context)?
                .map(|k| Key::from(&k)),
        };
        found.extend(key);
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

/// Sets `keyward.dev/rotate` on a key (a merge patch of that one annotation).
pub async fn annotate_rotate(client: &Client, key: &Key, value: &str) -> Result<(), Error> {
    let patch = Patch::Merge(serde_json::json!({
        "metadata": {"annotations": {crate::lifecycle::ROTATE_ANNOTATION: value}}
    }));
    let params = PatchParams::default();
    let ns = Some(key.namespace.as_str());
    let result = match key.kind {
        KeyKind::AuthKey => api::<AuthKey>(client, ns)
            .patch(&key.name, &params, &patch)
            .await
            .map(drop),
        KeyKind::ServiceAccountKey => api::<ServiceAccountKey>(client, ns)
            .patch(&key.name, &params, &patch)
            .await
            .map(drop),
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

/// Every change to keys of both kinds in `namespace` (`None`: all), starting with
/// their current state.
pub fn watch(
    client: &Client,
    namespace: Option<&str>,
    selector: Option<&str>,
) -> impl Stream<Item = Result<Key, watcher::Error>> + Send + use<> {
    let config = match selector {
        Some(s) => watcher::Config::default().labels(s),
        None => watcher::Config::default(),
    };
    let auth = watcher(api::<AuthKey>(client, namespace), config.clone())
        .applied_objects()
        .map(|k| k.map(|k| Key::from(&k)));
    let service = watcher(api::<ServiceAccountKey>(client, namespace), config)
        .applied_objects()
        .map(|k| k.map(|k| Key::from(&k)));
    futures::stream::select(auth.boxed(), service.boxed())
}
