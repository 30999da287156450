//! Emulators of the upstream key APIs keyward talks to, for tests.
//!
//! Each emulator follows its provider's published API (paths, fields, status codes)
//! and runs as a real HTTP server on `127.0.0.1:0`, so keyward's real provider code —
//! HTTP client, retries, rate limiting — is what the tests exercise. This module holds
//! the parts every emulator shares:
//!
//! - [`Server`]: the listening server; dropping it stops it.
//! - [`Faults`]: fault injection in front of every route — queued 429s (with or without
//!   `Retry-After`), 5xx responses, malformed bodies, and a response delay — and a log
//!   of every request, so tests can count what reached the upstream.
//!
//! Emulators are test support, not second products: small, strict where the real API
//! is strict, and explicit (in their docs) about what the published documentation
//! leaves open.

pub mod prefect;
pub mod prefect_graphql;
pub mod tailscale;

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

/// A running emulator. Dropping it stops the server.
pub struct Server {
    base_url: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Server {
    /// Serves `router` on a free port of 127.0.0.1, behind `faults`.
    pub async fn start(router: Router, faults: Arc<Faults>) -> std::io::Result<Self> {
        let router = router.layer(middleware::from_fn_with_state(faults, fault_layer));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let base_url = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Self {
            base_url,
            stop: Some(stop),
            task,
        })
    }

    /// `http://127.0.0.1:<port>`, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Open keep-alive connections would hold a graceful shutdown open.
        self.task.abort();
    }
}

/// One injected failure, served instead of the real response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 429 Too Many Requests, with `Retry-After: <seconds>` when given.
    TooManyRequests { retry_after: Option<u64> },
    /// A 5xx (or any) status with a `{"message"}` body.
    Status(u16),
    /// 200 with a body that is not the JSON the endpoint documents.
    MalformedBody,
    /// The request is carried out, then answered with this status instead (a gateway's
    /// 502/504 in front of an API that did the work, or the API's own 500 after it).
    StatusAfter(u16),
    /// The request is carried out, then the connection breaks before the answer.
    LostAnswer,
    /// The request is carried out after this long, whether or not its caller is still
    /// waiting (a create that lands after the caller gave up, or crashed).
    Late(Duration),
}

/// One request as the emulator saw it.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub status: u16,
    /// Whether an injected fault answered it.
    pub faulted: bool,
    pub at: Instant,
}

#[derive(Default)]
struct FaultState {
    /// Faults served in order, each to the next request whose method is `.1` (any
    /// when `None`) and whose path contains `.2`.
    queue: VecDeque<(Fault, Option<String>, Option<String>)>,
    delay: Duration,
    log: Vec<RequestRecord>,
    /// Every fault served, in order (recorded when taken: a `Late` whose caller hung
    /// up never finishes its request record).
    served: Vec<Served>,
}

/// A fault as it was served.
#[derive(Clone, Debug)]
pub struct Served {
    pub fault: Fault,
    pub method: String,
    pub path: String,
    pub at: jiff::Timestamp,
}

/// Fault injection and the request log, shared by an emulator's routes.
#[derive(Default)]
pub struct Faults {
    state: Mutex<FaultState>,
}

impl Faults {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Serves `fault` to the next `times` requests (whose path contains `path`, when
    /// given), before anything queued later.
    pub fn inject(&self, fault: Fault, times: usize, path: Option<&str>) {
        self.inject_for(fault, times, None, path);
    }

    /// [`Self::inject`], only for requests of `method` (`POST`, …) when given.
    pub fn inject_for(&self, fault: Fault, times: usize, method: Option<&str>, path: Option<&str>) {
        let mut state = self.state.lock().unwrap();
        for _ in 0..times {
            state.queue.push_back((
                fault.clone(),
                method.map(str::to_owned),
                path.map(str::to_owned),
            ));
        }
    }

    /// Faults still waiting for a request.
    pub fn pending(&self) -> usize {
        self.state.lock().unwrap().queue.len()
    }

    /// Drops every queued fault.
    pub fn clear(&self) {
        self.state.lock().unwrap().queue.clear();
    }

    /// Delays every response by `delay` (zero: no delay).
    pub fn set_delay(&self, delay: Duration) {
        self.state.lock().unwrap().delay = delay;
    }

    /// Every fault served so far, in order.
    pub fn served(&self) -> Vec<Served> {
        self.state.lock().unwrap().served.clone()
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.state.lock().unwrap().log.clone()
    }

    /// Requests whose method is `method` (any, when empty) and path contains `path`.
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .log
            .iter()
            .filter(|r| (method.is_empty() || r.method == method) && r.path.contains(path))
            .count()
    }

    fn take(&self, method: &str, path: &str) -> (Option<Fault>, Duration) {
        let mut state = self.state.lock().unwrap();
        let position = state.queue.iter().position(|(_, m, p)| {
            m.as_deref().is_none_or(|m| m == method)
                && p.as_deref().is_none_or(|p| path.contains(p))
        });
        let fault = position
            .and_then(|i| state.queue.remove(i))
            .map(|(f, _, _)| f);
        if let Some(f) = &fault {
            state.served.push(Served {
                fault: f.clone(),
                method: method.to_owned(),
                path: path.to_owned(),
                at: jiff::Timestamp::now(),
            });
        }
        (fault, state.delay)
    }

    fn record(&self, method: String, path: String, status: u16, faulted: bool) {
        self.state.lock().unwrap().log.push(RequestRecord {
            method,
            path,
            status,
            faulted,
            at: Instant::now(),
        });
    }
}

/// `{"message": …}`, the error body shape the emulated APIs share.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(serde_json::json!({ "message": message.into() })),
    )
        .into_response()
}

async fn fault_layer(State(faults): State<Arc<Faults>>, request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    let path = request.uri().path().to_owned();
    let (fault, delay) = faults.take(&method, &path);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let faulted = fault.is_some();
    let response = match fault {
        None => next.run(request).await,
        Some(Fault::TooManyRequests { retry_after }) => {
            let mut response = error(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
            if let Some(seconds) = retry_after {
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_str(&seconds.to_string()).expect("digits"),
                );
            }
            response
        }
        Some(Fault::Status(code)) => error(
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "internal server error",
        ),
        Some(Fault::MalformedBody) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            "{\"id\": \"k12",
        )
            .into_response(),
        Some(Fault::StatusAfter(code)) => {
            let _ = next.run(request).await;
            error(
                StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY),
                "bad gateway",
            )
        }
        Some(Fault::LostAnswer) => {
            let _ = next.run(request).await;
            let broken = futures::stream::once(async {
                Err::<axum::body::Bytes, _>(std::io::Error::other("connection lost"))
            });
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_LENGTH, "64")
                .body(axum::body::Body::from_stream(broken))
                .expect("a response")
        }
        Some(Fault::Late(delay)) => {
            // Detached: the work happens even if the caller hangs up meanwhile.
            let work = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                next.run(request).await
            });
            match work.await {
                Ok(response) => response,
                Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "emulator task failed"),
            }
        }
    };
    faults.record(method, path, response.status().as_u16(), faulted);
    response
}

/// Random letters and digits, from the OS RNG.
pub fn random_alnum(len: usize) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut out = String::with_capacity(len);
    while out.len() < len {
        let mut buf = [0u8; 32];
        getrandom::fill(&mut buf).expect("operating system RNG");
        for b in buf {
            // 248 = 4 × 62: rejection sampling keeps characters uniform.
            if b < 248 && out.len() < len {
                out.push(CHARS[usize::from(b % 62)] as char);
            }
        }
    }
    out
}

/// A random version-4 UUID, as Prefect's ids are (REST and GraphQL alike).
pub fn uuid4() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("operating system RNG");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Whether `s` is a UUID in its canonical 36-character form.
pub fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}
