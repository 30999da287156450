//! How providers talk to upstream key APIs: one [`Transport`] per provider resource,
//! shared by every key that uses it and kept across reconciles.
//!
//! It owns the provider's request budget (a token bucket from `spec.rateLimit`) and
//! the retry policy. A 429 pauses the whole budget until its `Retry-After` (or a
//! backoff when the header is missing), so a rotation wave of many keys waits
//! together instead of turning into a retry storm. 5xx answers and connection
//! failures are retried with jittered exponential backoff, a bounded number of times;
//! what is still failing then is returned as [`ProviderError::Unavailable`] and the
//! reconciler's own per-key backoff takes over.

use std::{
    future::Future,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::de::DeserializeOwned;
use tracing::debug;

use super::{ProviderError, SecretValue};
use crate::resources::RateLimit;

/// Attempts per request (the first one included).
const MAX_ATTEMPTS: u32 = 5;
/// First backoff; doubles per attempt, with up to half of it added as jitter.
const BASE_BACKOFF: Duration = Duration::from_millis(250);
/// No single wait inside one request is longer than this; a longer `Retry-After`
/// ends the request as `Unavailable` and the per-key backoff retries later.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// Per-request timeout (connect + answer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Default budget when the provider sets no `rateLimit`: generous for one operator,
/// well below what key APIs tolerate.
const DEFAULT_PER_MINUTE: u32 = 600;
const DEFAULT_BURST: u32 = 10;

/// An answer that is not a retryable failure: 2xx, and 4xx other than 429.
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

/// The status and body length only: a 2xx body holds a key value or a token.
impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("status", &self.status)
            .field("body_bytes", &self.body.len())
            .finish()
    }
}

impl Reply {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Parses the body. A body that does not parse is an upstream fault; the error
    /// says where parsing failed but never echoes the body, which may hold a key.
    pub fn json<T: DeserializeOwned>(&self, what: &str) -> Result<T, ProviderError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            ProviderError::Unavailable(format!(
                "malformed response to {what} (HTTP {}): {} at line {} column {}",
                self.status,
                category(&e),
                e.line(),
                e.column()
            ))
        })
    }

    /// The upstream's own error message (`{"message": …}`, or `error` /
    /// `error_description` / `detail`), trimmed, or the status code. Error bodies of
    /// key APIs describe the request, never a key value.
    pub fn message(&self) -> String {
        let parsed: Option<serde_json::Value> = serde_json::from_slice(&self.body).ok();
        let text = parsed.as_ref().and_then(|v| {
            ["message", "error_description", "detail", "error"]
                .iter()
                .find_map(|k| v.get(*k).and_then(|m| m.as_str()).map(str::to_owned))
        });
        match text {
            Some(t) => {
                let t: String = t.chars().take(300).collect();
                format!("HTTP {}: {t}", self.status)
            }
            None => format!("HTTP {}", self.status),
        }
    }
}

fn category(e: &serde_json::Error) -> &'static str {
    use serde_json::error::Category;
    match e.classify() {
        Category::Io => "I/O error",
        Category::Syntax => "not valid JSON",
        Category::Data => "unexpected fields or types",
        Category::Eof => "truncated JSON",
    }
}

/// The request budget: a token bucket, plus a pause shared by every caller after a 429.
struct Budget {
    per_second: f64,
    burst: f64,
    state: Mutex<BudgetState>,
}

struct BudgetState {
    tokens: f64,
    refilled: Instant,
    paused_until: Option<Instant>,
}

impl Budget {
    fn new(limit: Option<&RateLimit>) -> Self {
        let per_minute = limit.map_or(DEFAULT_PER_MINUTE, |l| l.requests_per_minute);
        let burst = limit.and_then(|l| l.burst).unwrap_or(DEFAULT_BURST);
        Self {
            per_second: f64::from(per_minute.max(1)) / 60.0,
            burst: f64::from(burst.max(1)),
            state: Mutex::new(BudgetState {
                tokens: f64::from(burst.max(1)),
                refilled: Instant::now(),
                paused_until: None,
            }),
        }
    }

    /// Takes one token, or says how long to wait before asking again.
    fn try_take(&self, now: Instant) -> Result<(), Duration> {
        let mut s = self.state.lock().expect("budget lock");
        if let Some(until) = s.paused_until {
            if until > now {
                return Err(until - now);
            }
            s.paused_until = None;
        }
        let elapsed = now.saturating_duration_since(s.refilled).as_secs_f64();
        s.tokens = (s.tokens + elapsed * self.per_second).min(self.burst);
        s.refilled = now;
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - s.tokens) / self.per_second))
        }
    }

    async fn take(&self) {
        loop {
            match self.try_take(Instant::now()) {
                Ok(()) => return,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// Every caller of this provider waits until `until` (the upstream said so).
    fn pause(&self, until: Instant) {
        let mut s = self.state.lock().expect("budget lock");
        s.paused_until = Some(s.paused_until.map_or(until, |u| u.max(until)));
    }
}

/// The HTTP side of one provider resource.
pub struct Transport {
    provider: &'static str,
    client: reqwest::Client,
    budget: Budget,
}

/// What one attempt ended in.
enum Outcome {
    Done(Reply),
    Retry {
        why: String,
        retry_after: Option<Duration>,
    },
    /// Sent, answer lost, and not safe to send again (see [`Transport::send`]).
    Failed(String),
}

impl Transport {
    /// `provider` is the provider type (`tailscale`, …), used in metrics and messages.
    pub fn new(provider: &'static str, limit: Option<&RateLimit>) -> Self {
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("keyward/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("building the HTTP client");
        Self {
            provider,
            client,
            budget: Budget::new(limit),
        }
    }

    /// Sends the request `build` makes (called again for every attempt), within the
    /// budget, retrying 429 and connection failures, and 5xx for requests that may be
    /// sent again. Returns 2xx and 4xx answers for the provider to interpret.
    ///
    /// A POST or PATCH is not sent again once it reached the upstream: whether its
    /// answer was lost (a timeout, a reset) or was a 5xx — a gateway's 502 or 504 in
    /// front of a real API, or the API's own 500 after it stored the key — it may have
    /// created a key, and a second one would carry the same marker unseen. It fails
    /// instead; the issuance attempt stays recorded, and recovery finds what it made
    /// by its marker once it can no longer land. A 429 is a refusal to process, so it
    /// is waited out and sent again. Read-only POSTs (queries) use [`Self::send_query`].
    pub async fn send(
        &self,
        operation: &'static str,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<Reply, ProviderError> {
        self.send_with(operation, None, build).await
    }

    /// [`Self::send`] for a request that changes nothing upstream whatever its method
    /// (a search, a GraphQL query, an OAuth token request): it may always go again.
    pub async fn send_query(
        &self,
        operation: &'static str,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<Reply, ProviderError> {
        self.send_with(operation, Some(true), build).await
    }

    async fn send_with(
        &self,
        operation: &'static str,
        replayable: Option<bool>,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<Reply, ProviderError> {
        let mut last = String::new();
        for attempt in 0..MAX_ATTEMPTS {
            self.budget.take().await;
            let started = Instant::now();
            let outcome = match build(&self.client).build() {
                Ok(request) => {
                    let replayable = replayable.unwrap_or_else(|| {
                        !matches!(
                            *request.method(),
                            reqwest::Method::POST | reqwest::Method::PATCH
                        )
                    });
                    self.attempt(request, replayable).await
                }
                Err(e) => Outcome::Failed(format!("error: {}", transport_error(&e))),
            };
            let code = match &outcome {
                Outcome::Done(r) => r.status.to_string(),
                // "429 …", "503 …", or "error: …" for transport failures.
                Outcome::Retry { why, .. } | Outcome::Failed(why) => {
                    why.split([' ', ':']).next().unwrap_or("error").to_owned()
                }
            };
            record(self.provider, operation, &code, started.elapsed());
            match outcome {
                Outcome::Done(reply) => return Ok(reply),
                Outcome::Failed(why) => {
                    last = why;
                    break;
                }
                Outcome::Retry { why, retry_after } => {
                    let wait = retry_after.unwrap_or_else(|| backoff(attempt));
                    // The code only: an upstream message may echo request data that
                    // the http provider redacts from the returned error, not here.
                    debug!(provider = self.provider, operation, attempt, code = %code, wait = ?wait, "upstream asked to retry");
                    last = why;
                    if retry_after.is_some() {
                        // The upstream throttles the credential, not one key: every
                        // caller of this provider waits (the next `take` sleeps).
                        self.budget.pause(Instant::now() + wait);
                    }
                    if attempt + 1 == MAX_ATTEMPTS || wait > MAX_WAIT {
                        break;
                    }
                    if retry_after.is_none() {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
        Err(ProviderError::Unavailable(format!(
            "{} {operation}: {last}",
            self.provider
        )))
    }

    async fn attempt(&self, request: reqwest::Request, replayable: bool) -> Outcome {
        let lost = |why: String| {
            if replayable {
                Outcome::Retry {
                    why,
                    retry_after: None,
                }
            } else {
                Outcome::Failed(why)
            }
        };
        let response = match self.client.execute(request).await {
            Ok(r) => r,
            // Not connected: nothing was sent, any request may go again.
            Err(e) if e.is_connect() => {
                return Outcome::Retry {
                    why: format!("error: {}", transport_error(&e)),
                    retry_after: None,
                };
            }
            Err(e) => return lost(format!("error: {}", transport_error(&e))),
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let body = match response.bytes().await {
            Ok(b) => b.to_vec(),
            Err(e) => {
                return lost(format!(
                    "error: reading the answer: {}",
                    transport_error(&e)
                ));
            }
        };
        let reply = Reply { status, body };
        if status == 429 {
            return Outcome::Retry {
                why: format!("429 rate limited ({})", reply.message()),
                // Without Retry-After a 429 still pauses everyone, for one backoff.
                retry_after: Some(retry_after.unwrap_or(BASE_BACKOFF * 4)),
            };
        }
        if status >= 500 && !replayable {
            return Outcome::Failed(format!(
                "{status} upstream failure ({}); not sent again, it may have been carried out",
                reply.message()
            ));
        }
        if status >= 500 {
            return Outcome::Retry {
                why: format!("{status} upstream failure ({})", reply.message()),
                retry_after,
            };
        }
        Outcome::Done(reply)
    }
}

/// One upstream request, for metrics and debug logs.
fn record(provider: &str, operation: &str, code: &str, took: Duration) {
    crate::metrics::global().upstream_request(provider, operation, code, took.as_secs_f64());
    debug!(
        provider,
        operation,
        code,
        seconds = took.as_secs_f64(),
        "upstream request"
    );
}

/// The kind of transport failure, without URLs (they may carry credentials in
/// templated providers).
fn transport_error(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "broken response body"
    } else {
        "request failed"
    };
    match e.url() {
        // Host and port only: the authority may carry `user:password@`.
        Some(url) => {
            let host = url.host_str().unwrap_or_default();
            match url.port() {
                Some(port) => format!("{kind} ({}://{host}:{port})", url.scheme()),
                None => format!("{kind} ({}://{host})", url.scheme()),
            }
        }
        None => kind.to_owned(),
    }
}

/// `Retry-After` in seconds (the HTTP-date form is accepted as "now").
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    value
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

/// Exponential backoff from [`BASE_BACKOFF`] with up to 50% random jitter.
fn backoff(attempt: u32) -> Duration {
    let base = BASE_BACKOFF * 2u32.pow(attempt.min(6));
    let mut byte = [0u8; 1];
    let _ = getrandom::fill(&mut byte);
    base + base.mul_f64(f64::from(byte[0]) / 255.0 / 2.0)
}

/// A cached OAuth access token, refreshed before it expires and discarded when the
/// credential it came from changes.
#[derive(Default)]
pub struct TokenCache {
    cached: tokio::sync::Mutex<Option<Cached>>,
}

struct Cached {
    fingerprint: String,
    token: SecretValue,
    refresh_at: Instant,
}

impl TokenCache {
    /// The cached token for the credential with `fingerprint`, or a new one from
    /// `fetch` (which returns the token and how long it is valid). Concurrent callers
    /// wait for one fetch.
    pub async fn get<F, Fut>(
        &self,
        fingerprint: &str,
        fetch: F,
    ) -> Result<SecretValue, ProviderError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(SecretValue, Duration), ProviderError>>,
    {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref()
            && c.fingerprint == fingerprint
            && Instant::now() < c.refresh_at
        {
            return Ok(c.token.clone());
        }
        let (token, valid_for) = fetch().await?;
        // Refresh with a tenth of the lifetime (at most 5 minutes) to spare.
        let margin = (valid_for / 10).min(Duration::from_secs(300));
        *cached = Some(Cached {
            fingerprint: fingerprint.to_owned(),
            token: token.clone(),
            refresh_at: Instant::now() + valid_for.saturating_sub(margin),
        });
        Ok(token)
    }

    /// Forgets `refused` (the upstream answered 401 with it). Only that token: when
    /// several requests fail with it at once, the first caller fetches a new one and
    /// the others must not throw that away again.
    pub async fn invalidate(&self, refused: &SecretValue) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|c| c.token == *refused) {
            *cached = None;
        }
    }
}

/// A fingerprint of a credential, to notice that it changed without keeping it.
pub fn fingerprint(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_a_burst_then_paces() {
        let budget = Budget::new(Some(&RateLimit {
            requests_per_minute: 60,
            burst: Some(2),
        }));
        let now = Instant::now();
        assert!(budget.try_take(now).is_ok());
        assert!(budget.try_take(now).is_ok());
        let wait = budget.try_take(now).unwrap_err();
        assert!(wait <= Duration::from_secs(1) && wait > Duration::from_millis(900));
        assert!(budget.try_take(now + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn a_pause_holds_every_caller() {
        let budget = Budget::new(None);
        let now = Instant::now();
        budget.pause(now + Duration::from_secs(3));
        let wait = budget.try_take(now).unwrap_err();
        assert_eq!(wait, Duration::from_secs(3));
        assert!(budget.try_take(now + Duration::from_secs(3)).is_ok());
    }

    #[test]
    fn every_attempt_is_counted_in_the_metrics() {
        record("transport-test", "issue", "503", Duration::from_millis(30));
        let text = crate::metrics::global().encode();
        let series = r#"{provider="transport-test",operation="issue",code="503"}"#;
        assert!(
            text.contains(&format!("keyward_upstream_requests_total{series} 1")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "keyward_upstream_request_duration_seconds_count{series} 1"
            )),
            "{text}"
        );
    }

    #[test]
    fn retry_after_in_seconds() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn backoff_grows_with_bounded_jitter() {
        for attempt in 0..4 {
            let base = BASE_BACKOFF * 2u32.pow(attempt);
            let b = backoff(attempt);
            assert!(b >= base && b <= base + base / 2, "{attempt}: {b:?}");
        }
    }

    #[test]
    fn malformed_bodies_are_described_not_echoed() {
        let reply = Reply {
            status: 200,
            body: br#"{"key": "tskey-auth-secret"#.to_vec(),
        };
        let err = reply.json::<serde_json::Value>("create key").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("malformed response to create key"), "{text}");
        assert!(!text.contains("tskey"), "{text}");
    }

    #[test]
    fn upstream_messages_are_surfaced() {
        let reply = Reply {
            status: 400,
            body: br#"{"message": "requested tags [tag:x] are invalid or not permitted"}"#.to_vec(),
        };
        assert_eq!(
            reply.message(),
            "HTTP 400: requested tags [tag:x] are invalid or not permitted"
        );
    }

    #[tokio::test]
    async fn a_create_whose_answer_was_lost_is_not_sent_again() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::AsyncReadExt;
        let _ = rustls::crypto::ring::default_provider().install_default();
        // A server that reads each request and hangs up without answering.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://user:pw@{}/keys", listener.local_addr().unwrap());
        let accepted = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
            }
        });
        let transport = Transport::new("test", None);
        let err = transport
            .send("create key", |c| c.post(&url).body("{}"))
            .await
            .unwrap_err();
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "sent once: {err}");
        assert!(!err.to_string().contains("pw"), "{err}");
    }

    /// Finding 3 of the lifecycle-correctness work: a create answered with a 5xx was
    /// sent again, and the first key (carried out before the 5xx) was never revoked.
    #[tokio::test]
    async fn a_create_answered_with_a_5xx_is_not_sent_again_but_a_query_is() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/keys", listener.local_addr().unwrap());
        let requests = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        counter.fetch_add(1, Ordering::SeqCst);
                        let answer = "HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n";
                        let _ = socket.write_all(answer.as_bytes()).await;
                    }
                });
            }
        });
        let transport = Transport::new("test", None);
        let err = transport
            .send("create key", |c| c.post(&url).body("{}"))
            .await
            .unwrap_err();
        assert_eq!(requests.load(Ordering::SeqCst), 1, "sent once: {err}");
        assert!(err.to_string().contains("502"), "{err}");
        requests.store(0, Ordering::SeqCst);
        let _ = transport
            .send_query("find keys", |c| c.post(&url).body("{}"))
            .await
            .unwrap_err();
        assert_eq!(
            requests.load(Ordering::SeqCst),
            MAX_ATTEMPTS as usize,
            "a query is retried"
        );
    }

    #[tokio::test]
    async fn tokens_are_fetched_once_and_refetched_when_the_credential_changes() {
        let cache = TokenCache::default();
        let fetches = std::sync::atomic::AtomicU32::new(0);
        let fetch = || async {
            let n = fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok((SecretValue::new(format!("t{n}")), Duration::from_secs(3600)))
        };
        cache.get("a", fetch).await.unwrap();
        cache.get("a", fetch).await.unwrap();
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
        cache.get("b", fetch).await.unwrap();
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 2);
        let refused = cache.get("b", fetch).await.unwrap();
        cache.invalidate(&refused).await;
        let fresh = cache.get("b", fetch).await.unwrap();
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 3);
        // A second request that failed with the old token keeps the fresh one.
        cache.invalidate(&refused).await;
        assert_eq!(cache.get("b", fetch).await.unwrap(), fresh);
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 3);
    }
}
