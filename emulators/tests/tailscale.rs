//! The Tailscale emulator answers as the published API does.

use std::time::Duration;

use keyward_emulators::{Fault, tailscale::Tailscale};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

fn client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::new()
}

fn keys_url(ts: &Tailscale) -> String {
    format!("{}/api/v2/tailnet/-/keys", ts.base_url())
}

async fn create(client: &Client, ts: &Tailscale, token: &str, body: Value) -> (StatusCode, Value) {
    let response = client
        .post(keys_url(ts))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A GET with a bearer token, answered with JSON.
async fn get_json(client: &Client, url: impl reqwest::IntoUrl, token: &str) -> Value {
    let response = client.get(url).bearer_auth(token).send().await.unwrap();
    response.json().await.unwrap()
}

fn body(tags: &[&str], description: &str) -> Value {
    json!({
        "capabilities": {"devices": {"create": {
            "reusable": true, "ephemeral": false, "preauthorized": true, "tags": tags
        }}},
        "expirySeconds": 86400,
        "description": description
    })
}

async fn oauth_token(client: &Client, ts: &Tailscale, id: &str, secret: &str) -> Value {
    client
        .post(format!("{}/api/v2/oauth/token", ts.base_url()))
        .form(&[("client_id", id), ("client_secret", secret)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn create_returns_the_key_once_and_get_never_does() {
    let ts = Tailscale::start().await;
    let token = ts.add_api_token("alice@example.com");
    let client = client();
    let (status, created) = create(&client, &ts, &token, body(&["tag:edge"], "edge nodes")).await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let id = created["id"].as_str().unwrap();
    let value = created["key"].as_str().unwrap();
    assert!(value.starts_with("tskey-auth-"));
    assert_eq!(created["description"], "edge nodes");
    assert_eq!(
        created["capabilities"]["devices"]["create"],
        json!({"reusable": true, "ephemeral": false, "preauthorized": true, "tags": ["tag:edge"]})
    );
    let created_at: jiff::Timestamp = created["created"].as_str().unwrap().parse().unwrap();
    let expires: jiff::Timestamp = created["expires"].as_str().unwrap().parse().unwrap();
    assert_eq!(expires.duration_since(created_at).as_secs(), 86400);

    // Basic auth: the token as user name, empty password.
    let got: Value = client
        .get(format!("{}/{id}", keys_url(&ts)))
        .basic_auth(&token, Some(""))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["id"], id);
    assert!(got.get("key").is_none(), "the value is returned only once");
    assert!(!got.to_string().contains(value));
    assert!(got.get("invalid").is_none());

    let list: Value = get_json(&client, keys_url(&ts), &token).await;
    assert_eq!(
        list,
        json!({"keys": [{"id": id, "description": "edge nodes"}]})
    );
    ts.set_list_ids_only(true);
    let list: Value = get_json(&client, keys_url(&ts), &token).await;
    assert_eq!(list, json!({"keys": [{"id": id}]}));
}

#[tokio::test]
async fn delete_revokes_and_a_second_delete_is_404() {
    let ts = Tailscale::start().await;
    let token = ts.add_api_token("alice@example.com");
    let client = client();
    let (_, created) = create(&client, &ts, &token, body(&[], "")).await;
    let url = format!("{}/{}", keys_url(&ts), created["id"].as_str().unwrap());
    let delete = || client.delete(&url).bearer_auth(&token).send();
    assert_eq!(delete().await.unwrap().status(), StatusCode::OK);
    let got: Value = get_json(&client, &url, &token).await;
    assert_eq!(got["invalid"], true);
    assert!(got["revoked"].is_string());
    let again = delete().await.unwrap();
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
    let message: Value = again.json().await.unwrap();
    assert!(message["message"].is_string());
    let missing = client
        .get(format!("{}/knope", keys_url(&ts)))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn strict_parsing_refuses_unknown_and_misspelled_fields() {
    let ts = Tailscale::start().await;
    let token = ts.add_api_token("alice@example.com");
    let client = client();
    for bad in [
        json!({"capabilities": {"devices": {"create": {"reuseable": true}}}}),
        json!({"capabilities": {"devices": {}}, "expiry": 60}),
        json!({"capabilities": {"devices": {}}, "expirySeconds": "60"}),
        json!({"devices": {}}),
        json!({"capabilities": {"devices": {}}, "description": "a:b.c"}),
        json!({"capabilities": {"devices": {}}, "description": "x".repeat(51)}),
        json!({"capabilities": {"devices": {}}, "expirySeconds": 7_776_001}),
        json!({"capabilities": {"devices": {"create": {"tags": ["edge"]}}}}),
    ] {
        let (status, error) = create(&client, &ts, &token, bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(error["message"].is_string(), "{bad}: {error}");
    }
    assert!(ts.keys().is_empty());
    // The minimal documented body: a single-use key without tags, 90 days.
    let (status, created) = create(
        &client,
        &ts,
        &token,
        json!({"capabilities": {"devices": {}}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        created["capabilities"]["devices"]["create"]["reusable"],
        false
    );
    let key = ts.key(created["id"].as_str().unwrap()).unwrap();
    assert_eq!(
        key.expires.duration_since(key.created).as_secs(),
        90 * 86400
    );
}

#[tokio::test]
async fn authentication_is_required() {
    let ts = Tailscale::start().await;
    let client = client();
    let (status, error) = create(&client, &ts, "tskey-api-nope", body(&[], "")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(error["message"].is_string());
    let other_tailnet = client
        .get(format!("{}/api/v2/tailnet/other.org/keys", ts.base_url()))
        .bearer_auth(ts.add_api_token("a"))
        .send()
        .await
        .unwrap();
    assert_eq!(other_tailnet.status(), StatusCode::NOT_FOUND);
    let named = client
        .get(format!(
            "{}/api/v2/tailnet/{}/keys",
            ts.base_url(),
            ts.tailnet()
        ))
        .bearer_auth(ts.add_api_token("a"))
        .send()
        .await
        .unwrap();
    assert_eq!(named.status(), StatusCode::OK);
}

#[tokio::test]
async fn oauth_tokens_last_an_hour_and_keys_need_the_clients_tags() {
    let ts = Tailscale::start().await;
    let oauth = ts.add_oauth_client(&["tag:edge", "tag:ci"], &["auth_keys"]);
    let client = client();
    let response = oauth_token(&client, &ts, &oauth.id, &oauth.secret).await;
    assert_eq!(response["token_type"], "Bearer");
    assert_eq!(response["expires_in"], 3600);
    assert_eq!(response["scope"], "auth_keys");
    let token = response["access_token"].as_str().unwrap().to_owned();
    assert_eq!(ts.tokens_issued(), 1);

    let (status, _) = create(&client, &ts, &token, body(&["tag:edge"], "")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, error) = create(&client, &ts, &token, body(&["tag:prod"], "")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        error["message"],
        "requested tags [tag:prod] are invalid or not permitted"
    );
    let (status, _) = create(&client, &ts, &token, body(&[], "")).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "tailnet-owned keys need tags"
    );

    // OAuth keys belong to the tailnet: a user's token does not see them.
    let user = ts.add_api_token("alice@example.com");
    let list: Value = get_json(&client, keys_url(&ts), &user).await;
    assert_eq!(list["keys"], json!([]));

    ts.advance(Duration::from_secs(3601));
    let (status, _) = create(&client, &ts, &token, body(&["tag:edge"], "")).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "an hour later the token expired"
    );

    let wrong = client
        .post(format!("{}/api/v2/oauth/token", ts.base_url()))
        .form(&[
            ("client_id", oauth.id.as_str()),
            ("client_secret", "tskey-client-x"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);

    let read_only = ts.add_oauth_client(&["tag:edge"], &["auth_keys:read"]);
    let response = oauth_token(&client, &ts, &read_only.id, &read_only.secret).await;
    let (status, _) = create(
        &client,
        &ts,
        response["access_token"].as_str().unwrap(),
        body(&["tag:edge"], ""),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn one_off_keys_are_used_up_and_console_revocation_and_expiry_invalidate() {
    let ts = Tailscale::start().await;
    let token = ts.add_api_token("alice@example.com");
    let client = client();
    let mut one_off = body(&[], "");
    one_off["capabilities"]["devices"]["create"]["reusable"] = json!(false);
    let (_, a) = create(&client, &ts, &token, one_off).await;
    let (_, b) = create(&client, &ts, &token, body(&[], "")).await;
    let (_, c) = create(&client, &ts, &token, body(&[], "")).await;
    let (a, b, c) = (
        a["id"].as_str().unwrap().to_owned(),
        b["id"].as_str().unwrap().to_owned(),
        c["id"].as_str().unwrap().to_owned(),
    );
    ts.use_key(&a).unwrap();
    assert!(ts.use_key(&a).is_err(), "a one-off key works once");
    ts.use_key(&b).unwrap();
    ts.use_key(&b).unwrap();
    assert!(ts.revoke_in_console(&b));
    ts.advance(Duration::from_secs(86401));
    let get = |id: String| {
        let client = client.clone();
        let url = format!("{}/{id}", keys_url(&ts));
        let token = token.clone();
        async move { get_json(&client, url, &token).await }
    };
    for id in [&a, &b, &c] {
        assert_eq!(get(id.clone()).await["invalid"], true, "{id}");
    }
    assert!(
        get(c.clone()).await.get("revoked").is_none(),
        "expired, not revoked"
    );
    assert!(ts.live_keys().is_empty());
}

#[tokio::test]
async fn faults_are_served_in_order_and_every_request_is_logged() {
    let ts = Tailscale::start().await;
    let token = ts.add_api_token("alice@example.com");
    let client = client();
    ts.faults().inject(
        Fault::TooManyRequests {
            retry_after: Some(2),
        },
        1,
        Some("/keys"),
    );
    ts.faults().inject(Fault::Status(503), 1, None);
    ts.faults().inject(Fault::MalformedBody, 1, None);
    let first = client
        .get(keys_url(&ts))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(first.headers()["retry-after"], "2");
    let second = client
        .get(keys_url(&ts))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
    let third = client
        .get(keys_url(&ts))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(third.status(), StatusCode::OK);
    assert!(third.json::<Value>().await.is_err(), "malformed body");
    let fourth = client
        .get(keys_url(&ts))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(fourth.status(), StatusCode::OK);
    assert_eq!(ts.faults().count("GET", "/keys"), 4);
    assert_eq!(
        ts.faults().requests().iter().filter(|r| r.faulted).count(),
        3
    );

    ts.faults().set_delay(Duration::from_millis(300));
    let started = std::time::Instant::now();
    client
        .get(keys_url(&ts))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
}
