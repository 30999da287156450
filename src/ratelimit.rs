//! Client-side rate limit on requests to the Kubernetes API server (`--client-qps`,
//! `--client-burst`), like client-go's token bucket: up to `burst` requests at once,
//! refilled at `qps` per second. kube-rs has none built in; this is a tower layer for
//! `kube::client::ClientBuilder::with_layer`.
//!
//! A watch counts as one request when it is opened, however long it then streams.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

/// Tokens refill continuously at `qps` per second, up to `burst`. A request always
/// takes a token; when none is left it takes one from the future and waits for it,
/// so waiting requests are served in order at exactly `qps`.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    qps: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. `qps` must be positive; `burst` is at least 1.
    pub fn new(qps: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            qps,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes a token; returns how long to wait before using it (zero: now).
    pub fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.qps).min(self.burst) - 1.0;
        self.last = now;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.qps)
        }
    }
}

/// The layer: `qps` 0 (or less) disables limiting.
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    qps: f64,
    burst: u32,
}

impl RateLimitLayer {
    pub fn new(qps: f64, burst: u32) -> Self {
        Self { qps, burst }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            bucket: (self.qps > 0.0)
                .then(|| TokenBucket::new(self.qps, self.burst, Instant::now())),
            wait: None,
            granted: false,
        }
    }
}

/// The service: becomes ready once a token is granted. kube's `Client` drives it from
/// a single buffer worker, so requests queue in the buffer while it waits.
pub struct RateLimit<S> {
    inner: S,
    bucket: Option<TokenBucket>,
    wait: Option<Pin<Box<Sleep>>>,
    granted: bool,
}

impl<S, R> Service<R> for RateLimit<S>
where
    S: Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if let Some(bucket) = self.bucket.as_mut()
            && !self.granted
        {
            if self.wait.is_none() {
                let wait = bucket.take(Instant::now());
                if !wait.is_zero() {
                    self.wait = Some(Box::pin(tokio::time::sleep(wait)));
                }
            }
            if let Some(sleep) = self.wait.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.wait = None;
            }
            self.granted = true;
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        self.granted = false;
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_qps() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 3, start);
        for _ in 0..3 {
            assert_eq!(bucket.take(start), Duration::ZERO);
        }
        // The 4th and 5th wait for the refill: 100ms, then 200ms.
        assert_eq!(bucket.take(start), Duration::from_millis(100));
        assert_eq!(bucket.take(start), Duration::from_millis(200));
        // A second later the debt (2 tokens) is paid and 8 more accrued, capped at 3.
        let later = start + Duration::from_secs(1);
        assert_eq!(bucket.take(later), Duration::ZERO);
        let much_later = later + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(bucket.take(much_later), Duration::ZERO);
        }
        assert!(!bucket.take(much_later).is_zero(), "burst is the cap");
    }

    #[tokio::test(start_paused = true)]
    async fn the_layer_spaces_requests_at_qps_after_the_burst() {
        use tower::ServiceExt;
        let service =
            tower::service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>(Instant::now()) });
        let mut limited = RateLimitLayer::new(2.0, 2).layer(service);
        let start = Instant::now();
        let mut times = Vec::new();
        for _ in 0..4 {
            times.push(limited.ready().await.unwrap().call(()).await.unwrap() - start);
        }
        assert_eq!(times, [0, 0, 500, 1000].map(Duration::from_millis).to_vec());
    }

    #[tokio::test(start_paused = true)]
    async fn zero_qps_disables_the_limit() {
        use tower::ServiceExt;
        let service = tower::service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>(()) });
        let mut unlimited = RateLimitLayer::new(0.0, 1).layer(service);
        let start = Instant::now();
        for _ in 0..100 {
            unlimited.ready().await.unwrap().call(()).await.unwrap();
        }
        assert_eq!(Instant::now(), start);
    }
}
