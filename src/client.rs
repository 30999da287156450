//! How keyward's Kubernetes clients introduce themselves: `User-Agent: keyward/<version>`
//! on every request, so the API server's audit log, its metrics
//! (`apiserver_request_total` by client) and API priority and fairness can tell
//! keyward's requests apart. kube-rs sends no User-Agent of its own.

use http::{HeaderValue, header::USER_AGENT};

/// What every request of keyward carries as its `User-Agent`.
pub const AGENT: &str = concat!("keyward/", env!("CARGO_PKG_VERSION"));

/// `config` with keyward's `User-Agent` on every request of every client built from it
/// (the rate-limited controllers' client and the leader-election client alike).
pub fn identify(mut config: kube::Config) -> kube::Config {
    config.headers.retain(|(name, _)| *name != USER_AGENT);
    config
        .headers
        .push((USER_AGENT, HeaderValue::from_static(AGENT)));
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Answers one request with an API server's `/version` and returns the request.
    async fn one_request(listener: tokio::net::TcpListener) -> String {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "the client hung up");
            request.extend_from_slice(&buf[..n]);
        }
        let body = r#"{"major":"1","minor":"37","gitVersion":"v1.37.0","gitCommit":"","gitTreeState":"","buildDate":"","goVersion":"","compiler":"","platform":""}"#;
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(reply.as_bytes()).await.unwrap();
        String::from_utf8(request).unwrap().to_lowercase()
    }

    #[tokio::test]
    async fn every_request_names_keyward_and_its_version() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(one_request(listener));
        let mut config = kube::Config::new(url.parse().unwrap());
        config
            .headers
            .push((USER_AGENT, HeaderValue::from_static("someone-else")));
        let client = kube::client::ClientBuilder::try_from(identify(config))
            .unwrap()
            .with_layer(&crate::ratelimit::RateLimitLayer::new(10.0, 1))
            .build();
        client.apiserver_version().await.unwrap();
        let request = server.await.unwrap();
        let agents: Vec<&str> = request
            .lines()
            .filter_map(|l| l.strip_prefix("user-agent: "))
            .collect();
        assert_eq!(agents, [AGENT.to_lowercase()]);
        assert!(AGENT.starts_with("keyward/0."), "{AGENT}");
    }
}
