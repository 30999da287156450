//! Every request a client sends to the API server, by verb and resource: a tower
//! layer on the client a controller under test runs with, so a test can count what
//! the controller asks of the API server.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use kube::{Client, Config, client::ClientBuilder};
use tower::{Layer, Service};

/// One request: its verb as the API server's audit log names it (`get`, `list`,
/// `watch`, `create`, `patch`, `update`, `delete`), the resource (`secrets`,
/// `authkeys/status`, …), and the object's namespace and name (empty for a list).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Request {
    pub verb: &'static str,
    pub resource: String,
    pub namespace: String,
    pub name: String,
}

impl Request {
    /// The requests a watch costs: its list and the watch itself.
    pub fn lists_or_watches(&self) -> bool {
        matches!(self.verb, "list" | "watch")
    }

    pub fn write(&self) -> bool {
        matches!(self.verb, "create" | "patch" | "update" | "delete")
    }

    fn of<B>(request: &http::Request<B>) -> Self {
        let uri = request.uri();
        let watch = uri
            .query()
            .is_some_and(|q| q.split('&').any(|p| p == "watch=true"));
        // /api/v1/... or /apis/<group>/<version>/...
        let mut parts: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
        let skip = if parts.first() == Some(&"api") { 2 } else { 3 };
        parts.drain(..skip.min(parts.len()));
        let mut namespace = String::new();
        if parts.first() == Some(&"namespaces") && parts.len() > 2 {
            namespace = parts[1].to_owned();
            parts.drain(..2);
        }
        let resource = match parts.as_slice() {
            [resource, _, sub] => format!("{resource}/{sub}"),
            [resource, ..] => (*resource).to_owned(),
            [] => String::new(),
        };
        let name = parts.get(1).map(|n| (*n).to_owned()).unwrap_or_default();
        let verb = match (request.method().as_str(), name.is_empty()) {
            ("GET", true) if watch => "watch",
            ("GET", true) => "list",
            ("GET", false) => "get",
            ("POST", _) => "create",
            ("PATCH", _) => "patch",
            ("PUT", _) => "update",
            ("DELETE", _) => "delete",
            _ => "other",
        };
        Self {
            verb,
            resource,
            namespace,
            name,
        }
    }
}

/// The requests seen so far; clones share them.
#[derive(Clone, Default)]
pub struct Requests(Arc<Mutex<Vec<Request>>>);

impl Requests {
    /// A client for `kubeconfig` whose every request is recorded here; `identify`
    /// is applied to its configuration first (as keyward's own clients are built).
    pub async fn client(&self, kubeconfig: &str, identify: fn(Config) -> Config) -> Client {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(kubeconfig).unwrap();
        let config = Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        ClientBuilder::try_from(identify(config))
            .unwrap()
            .with_layer(self)
            .build()
    }

    /// Every request so far.
    pub fn all(&self) -> Vec<Request> {
        self.0.lock().unwrap().clone()
    }

    /// Forgets every request so far.
    pub fn clear(&self) {
        self.0.lock().unwrap().clear();
    }

    /// Requests so far other than lists and watches, counted by `verb resource`.
    pub fn summary(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for r in self.all().iter().filter(|r| !r.lists_or_watches()) {
            *counts
                .entry(format!("{} {}", r.verb, r.resource))
                .or_default() += 1;
        }
        counts
    }
}

impl<S> Layer<S> for Requests {
    type Service = Recorded<S>;

    fn layer(&self, inner: S) -> Recorded<S> {
        Recorded {
            inner,
            requests: self.clone(),
        }
    }
}

pub struct Recorded<S> {
    inner: S,
    requests: Requests,
}

impl<S, B> Service<http::Request<B>> for Recorded<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        self.requests.0.lock().unwrap().push(Request::of(&request));
        self.inner.call(request)
    }
}
