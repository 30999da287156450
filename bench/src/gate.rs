//! One client rate for every operator: a local HTTP proxy in front of the API server
//! that admits an operator's requests through one token bucket.
//!
//! keyward and the floor send every request through one client-side bucket
//! (`--client-qps` / `--client-burst`). External Secrets Operator's same flags set the
//! rate of each client controller-runtime builds from its configuration, and each gets
//! a bucket of its own, so together they go well past it (200 requests / s at a
//! nominal 50 / 100, see BENCHMARKS.md). Its requests go through this gate, which
//! holds them to one bucket of that rate, the way client-go's own limiter would:
//! every request, a watch included, waits for a token. The gate forwards with the
//! operator's own client certificate, so the audit log still names the operator, and
//! it passes headers (the User-Agent too) and bodies through unchanged.
//!
//! Written by hand because it is a few lines over `kube::Client::send`, which exists
//! for exactly this; no proxy crate limits the rate of requests rather than bytes.

use std::{convert::Infallible, path::Path, sync::Arc, time::Duration};

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
use kube::client::Body;
use tokio::{net::TcpListener, sync::Mutex, task::JoinHandle, time::Instant};

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
        let client = kube::Client::try_from(config)?;
        let bucket = Arc::new(Bucket::new(qps, burst));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (client, bucket) = (client.clone(), bucket.clone());
                tokio::spawn(async move {
                    let service =
                        service_fn(move |request| forward(client.clone(), bucket.clone(), request));
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
    bucket: Arc<Bucket>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    bucket.take().await;
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

/// A token bucket that lends: a request takes a token now and waits until it would
/// have been there (golang.org/x/time/rate's `Wait`, which client-go uses).
struct Bucket {
    per_second: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(per_second: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            per_second,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    async fn take(&self) {
        let wait = {
            let mut state = self.state.lock().await;
            let now = Instant::now();
            let (tokens, since) = *state;
            let tokens = (tokens + now.duration_since(since).as_secs_f64() * self.per_second)
                .min(self.burst)
                - 1.0;
            *state = (tokens, now);
            (tokens < 0.0).then(|| Duration::from_secs_f64(-tokens / self.per_second))
        };
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst goes at once; after it, requests are spaced at the rate.
    #[tokio::test(start_paused = true)]
    async fn the_bucket_admits_a_burst_then_the_rate() {
        let bucket = Bucket::new(10.0, 5);
        let start = Instant::now();
        for _ in 0..5 {
            bucket.take().await;
        }
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "the burst waits for nothing"
        );
        for _ in 0..10 {
            bucket.take().await;
        }
        let waited = start.elapsed().as_secs_f64();
        assert!((waited - 1.0).abs() < 0.01, "10 more at 10 / s: {waited} s");
    }
}
