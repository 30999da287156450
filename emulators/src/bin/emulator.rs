//! `emulator`: an upstream emulator as a process of its own, for `hack/bench` (which
//! runs keyward as a separate process too) and for trying keyward by hand.
//!
//! `emulator tailscale [--latency-ms 50] [--rate-limit 600] [--burst 60]` starts the
//! Tailscale API emulator, registers one API access token and prints one JSON line on
//! stdout — `{"url", "tailnet", "apiToken", "stats"}` — then serves until its standard
//! input closes (so it never outlives the process that started it).
//!
//! The emulator itself sits behind a small proxy in this binary, which plays the parts a
//! benchmark needs of a SaaS API: a round-trip latency (the emulator's own response
//! delay), a rate limit answered with 429 and `Retry-After` (Tailscale publishes no
//! numbers, so the limit is a flag), and a count of every request that reached the
//! upstream, per route and per second. `GET /_emulator/stats` returns those counts and
//! how many keys are still valid.

use std::{
    collections::BTreeMap,
    io::Read,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use clap::{Args, Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use keyward_emulators::{error, tailscale::Tailscale};
use serde::Serialize;

#[derive(Parser)]
#[command(name = "emulator", about = "An upstream key API emulator as a process")]
struct Cli {
    #[command(subcommand)]
    upstream: Upstream,
}

#[derive(Subcommand)]
enum Upstream {
    /// The Tailscale API v2 auth-key endpoints, with one API access token registered.
    Tailscale(Options),
}

#[derive(Args)]
struct Options {
    /// Delay before every answer, like the round trip to a SaaS API (0: none).
    #[arg(long, default_value_t = 50)]
    latency_ms: u64,
    /// Requests per minute accepted before answering 429 (0: no limit).
    #[arg(long, default_value_t = 0)]
    rate_limit: u32,
    /// Requests accepted at once, above the rate, after a quiet period.
    #[arg(long, default_value_t = 60)]
    burst: u32,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let Upstream::Tailscale(options) = Cli::parse().upstream;
    let ts = Tailscale::start().await;
    ts.faults()
        .set_delay(Duration::from_millis(options.latency_ms));
    let token = ts.add_api_token("bench@example.com");
    let front = Arc::new(Front {
        upstream: ts.base_url().to_owned(),
        client: Client::builder(TokioExecutor::new()).build_http(),
        bucket: (options.rate_limit > 0).then(|| {
            Mutex::new(Bucket::new(
                f64::from(options.rate_limit) / 60.0,
                f64::from(options.burst.max(1)),
            ))
        }),
        counts: Mutex::default(),
        ts,
    });
    let router = Router::new()
        .route("/_emulator/stats", get(stats))
        .fallback(forward)
        .with_state(front.clone());
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .unwrap_or_else(|e| panic!("binding --listen {}: {e}", options.listen));
    let url = format!("http://{}", listener.local_addr().expect("bound address"));
    println!(
        "{}",
        serde_json::json!({
            "url": url,
            "tailnet": front.ts.tailnet(),
            "apiToken": token,
            "stats": format!("{url}/_emulator/stats"),
        })
    );
    // Standard input closing means the parent is gone: stop with it.
    std::thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    });
    axum::serve(listener, router).await.expect("serving");
}

struct Front {
    upstream: String,
    client: Client<HttpConnector, Full<Bytes>>,
    bucket: Option<Mutex<Bucket>>,
    counts: Mutex<Counts>,
    ts: Tailscale,
}

/// What reached the upstream.
#[derive(Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Counts {
    requests: u64,
    too_many_requests: u64,
    /// `METHOD /path` with ids replaced by `{tailnet}` and `{id}`.
    by_route: BTreeMap<String, u64>,
    /// Requests per Unix second.
    per_second: BTreeMap<i64, u64>,
}

/// A token bucket: the upstream's rate limit.
struct Bucket {
    tokens: f64,
    per_second: f64,
    burst: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_second: f64, burst: f64) -> Self {
        Self {
            tokens: burst,
            per_second,
            burst,
            at: Instant::now(),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.per_second)
            .min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second,
            ))
        }
    }
}

/// The route a request took, without the ids that make every path different.
fn route(method: &Method, path: &str) -> String {
    let mut previous = "";
    let segments: Vec<&str> = path
        .split('/')
        .map(|segment| {
            let shown = match previous {
                "tailnet" => "{tailnet}",
                "keys" => "{id}",
                _ => segment,
            };
            previous = segment;
            shown
        })
        .collect();
    format!("{method} {}", segments.join("/"))
}

async fn forward(State(front): State<Arc<Front>>, request: Request) -> Response {
    let route = route(request.method(), request.uri().path());
    let limited = front
        .bucket
        .as_ref()
        .and_then(|bucket| bucket.lock().unwrap().take(Instant::now()).err());
    let response = match limited {
        Some(wait) => {
            let mut response = error(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
            let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_str(&seconds.to_string()).expect("digits"),
            );
            response
        }
        None => proxy(&front, request).await,
    };
    let mut counts = front.counts.lock().unwrap();
    counts.requests += 1;
    if response.status() == StatusCode::TOO_MANY_REQUESTS {
        counts.too_many_requests += 1;
    }
    *counts.by_route.entry(route).or_default() += 1;
    *counts
        .per_second
        .entry(jiff::Timestamp::now().as_second())
        .or_default() += 1;
    response
}

async fn proxy(front: &Front, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 1 << 20).await else {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut upstream = axum::http::Request::builder()
        .method(parts.method)
        .uri(format!("{}{path}", front.upstream));
    for (name, value) in &parts.headers {
        if name != header::HOST {
            upstream = upstream.header(name, value);
        }
    }
    let upstream = upstream.body(Full::new(body)).expect("a valid request");
    match front.client.request(upstream).await {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            match body.collect().await {
                Ok(body) => Response::from_parts(parts, Body::from(body.to_bytes())),
                Err(e) => error(StatusCode::BAD_GATEWAY, format!("emulator body: {e}")),
            }
        }
        Err(e) => error(StatusCode::BAD_GATEWAY, format!("emulator: {e}")),
    }
}

async fn stats(State(front): State<Arc<Front>>) -> Response {
    let live = front.ts.live_keys().len();
    let created = front.ts.keys().len();
    let counts = serde_json::to_value(&*front.counts.lock().unwrap()).expect("plain data");
    let mut body = counts;
    body["liveKeys"] = live.into();
    body["keysCreated"] = created.into();
    Json(body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_hide_ids() {
        assert_eq!(
            route(&Method::DELETE, "/api/v2/tailnet/example.com/keys/k123"),
            "DELETE /api/v2/tailnet/{tailnet}/keys/{id}"
        );
        assert_eq!(
            route(&Method::POST, "/api/v2/tailnet/-/keys"),
            "POST /api/v2/tailnet/{tailnet}/keys"
        );
        assert_eq!(
            route(&Method::POST, "/api/v2/oauth/token"),
            "POST /api/v2/oauth/token"
        );
    }

    #[test]
    fn the_bucket_refuses_above_its_rate_and_refills() {
        let start = Instant::now();
        let mut bucket = Bucket::new(2.0, 2.0);
        assert!(bucket.take(start).is_ok());
        assert!(bucket.take(start).is_ok());
        let wait = bucket.take(start).unwrap_err();
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500));
        assert!(bucket.take(start + Duration::from_millis(500)).is_ok());
        assert!(bucket.take(start + Duration::from_millis(500)).is_err());
    }
}
