//! One client rate for every operator: a local HTTP proxy in front of the API server
//! that admits an operator's requests through one token bucket.
//!
//! keyward and the floor send every request through one client-side bucket
//! (`--client-qps` / `--client-burst`). External Secrets Operator's same flags set the
//! rate of each client controller-runtime builds from its configuration, and each gets
//! a bucket of its own, so together they go well past it (200 requests / s at a
//! nominal 50 / 100, see BENCHMARKS.md). Its requests go through this gate, which
//! forwards them with a client limited by keyward's own [`RateLimitLayer`] — the
//! bucket keyward and the floor use, client-go's semantics: every request, a watch
//! included, waits for a token. The gate forwards with the
//! operator's own client certificate, so the audit log still names the operator, and
//! it passes headers (the User-Agent too) and bodies through unchanged.
//!
//! Written by hand because it is a few lines over `kube::Client::send`, which exists
//! for exactly this; no proxy crate limits the rate of requests rather than bytes.

use std::{convert::Infallible, path::Path};

use anyhow::Context as _;
use http_body_util::BodyExt as _;
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderMap},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use keyward::ratelimit::RateLimitLayer;
use kube::client::{Body, ClientBuilder};
use tokio::{net::TcpListener, task::JoinHandle};

/// The proxy, listening on 127.0.0.1 until dropped.
pub struct Gate {
    url: String,
    task: JoinHandle<()>,
}

impl Gate {
    /// Starts the gate for the user of `kubeconfig`, at `qps` with `burst`.
    pub async fn start(kubeconfig: &Path, qps: f64, burst: u32) -> anyhow::Result<Self> {
        let file = kube::config::Kubeconfig::read_from(kubeconfig)
            .with_context(|| format!("reading {}", kubeconfig.display()))?;
        let mut config = kube::Config::from_custom_kubeconfig(file, &Default::default()).await?;
        // A watch stays open as long as the operator asks (client-go: 5–10 minutes).
        config.read_timeout = None;
        // One client, so one bucket: its clones share the buffer the limit sits behind.
        let client = ClientBuilder::try_from(config)?
            .with_layer(&RateLimitLayer::new(qps, burst))
            .build();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let client = client.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| forward(client.clone(), request));
                    // A connection the operator closes ends here; nothing to report.
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { url, task })
    }

    /// A kubeconfig that reaches the API server through the gate (no credentials:
    /// the gate holds them).
    pub fn kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        let text = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: gate
  cluster:
    server: {}
users:
- name: gate
  user: {{}}
contexts:
- name: gate
  context: {{cluster: gate, user: gate}}
current-context: gate
",
            self.url
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    client: kube::Client,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (mut parts, body) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return Ok(bad_gateway(format!("reading the request: {e}"))),
    };
    match client
        .send(Request::from_parts(parts, Body::from(body)))
        .await
    {
        Ok(mut response) => {
            strip_hop_by_hop(response.headers_mut());
            Ok(response)
        }
        Err(e) => Ok(bad_gateway(format!("forwarding to the API server: {e}"))),
    }
}

/// Headers that belong to one connection, not to the request (RFC 9110 §7.6.1).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
        header::TRAILER,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
}

fn bad_gateway(message: String) -> Response<Body> {
    let mut response = Response::new(Body::from(message.into_bytes()));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}
