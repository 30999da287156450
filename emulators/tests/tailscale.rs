//! The Tailscale emulator answers as the published API does.

mod common;

use std::time::Duration;

use common::Issuer;
use keyward_emulators::{
    Fault,
    tailscale::{FederatedIdentity, Tailscale},
};
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
    assert_eq!(created["keyType"], "auth");
    assert_eq!(created["expirySeconds"], 86400);
    let user_id = created["userId"].as_str().unwrap();
    assert!(
        user_id.starts_with('u') && !user_id.contains('@'),
        "an opaque user id, not the login: {user_id}"
    );
    assert_eq!(ts.user_id("alice@example.com").as_deref(), Some(user_id));
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

    // The list holds full key objects: the auth key as get answers it, and the
    // caller's own API access token.
    let list: Value = get_json(&client, keys_url(&ts), &token).await;
    let keys = list["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{list}");
    let listed = keys.iter().find(|k| k["id"] == id).unwrap();
    assert_eq!(listed, &got, "a listed auth key is the full object");
    let own = keys.iter().find(|k| k["id"] != id).unwrap();
    assert_eq!(own["keyType"], "api");
    assert_eq!(own["id"].as_str(), ts.api_token_id(&token).as_deref());
    assert_eq!(own["userId"], got["userId"]);
    assert!(own.get("key").is_none());
    ts.set_list_ids_only(true);
    let list: Value = get_json(&client, keys_url(&ts), &token).await;
    assert_eq!(list["keys"].as_array().unwrap().len(), 2);
    assert_eq!(
        list["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id),
        Some(&json!({"id": id}))
    );
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
    let revoked: jiff::Timestamp = got["revoked"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        revoked.subsec_nanosecond(),
        0,
        "whole seconds, as every time"
    );
    assert!(!got["revoked"].as_str().unwrap().contains('.'));
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
        json!({"capabilities": {"devices": {"create": {"tags": ["tag:1edge"]}}}}),
        json!({"capabilities": {"devices": {"create": {"tags": ["tag:edge_nodes"]}}}}),
        json!({"capabilities": {"devices": {"create": {"tags": ["tag:"]}}}}),
        json!({"keyType": "api", "capabilities": {"devices": {}}}),
        json!({"keyType": "auth", "capabilities": {"devices": {}}, "scopes": ["all"]}),
        json!({"keyType": "auth"}),
    ] {
        let (status, error) = create(&client, &ts, &token, bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(error["message"].is_string(), "{bad}: {error}");
    }
    assert!(ts.keys().is_empty());
    // keyType "auth" is the documented default, and may be sent.
    let (status, created) = create(
        &client,
        &ts,
        &token,
        json!({"keyType": "auth", "capabilities": {"devices": {"create": {"tags": ["tag:edge-2", "tag:Ci9"]}}}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    assert_eq!(created["keyType"], "auth");
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

    // OAuth keys belong to the tailnet: a user's token does not see them (only its
    // own API access token).
    let user = ts.add_api_token("alice@example.com");
    let list: Value = get_json(&client, keys_url(&ts), &user).await;
    assert_eq!(
        list["keys"],
        json!([get_json(
            &client,
            format!("{}/{}", keys_url(&ts), ts.api_token_id(&user).unwrap()),
            &user
        )
        .await])
    );

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

/// An OAuth client and a federated identity made through the keys endpoint (`keyType`
/// client / federated), listed to the callers the API lists them to, and refused when
/// their fields are wrong.
#[tokio::test]
async fn trust_credentials_are_created_listed_and_deleted_through_the_keys_endpoint() {
    let ts = Tailscale::start().await;
    let user = ts.add_api_token("alice@example.com");
    let client = client();
    let (status, made) = create(
        &client,
        &ts,
        &user,
        json!({"keyType": "client", "scopes": ["auth_keys"], "tags": ["tag:edge"], "description": "ci client"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{made}");
    assert_eq!(made["keyType"], "client");
    assert_eq!(made["scopes"], json!(["auth_keys"]));
    assert_eq!(made["tags"], json!(["tag:edge"]));
    assert_eq!(
        made["userId"].as_str(),
        ts.user_id("alice@example.com").as_deref()
    );
    let client_id = made["id"].as_str().unwrap().to_owned();
    let secret = made["key"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("tskey-client-"));

    // The client's access token sees tailnet keys and OAuth clients, not the user's.
    let access = oauth_token(&client, &ts, &client_id, &secret).await;
    let access = access["access_token"].as_str().unwrap().to_owned();
    let (status, key) = create(&client, &ts, &access, body(&["tag:edge"], "tailnet key")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(key.get("userId").is_none(), "a tailnet-owned key: {key}");
    let (_, mine) = create(&client, &ts, &user, body(&[], "mine")).await;
    let listed: Value = get_json(&client, keys_url(&ts), &access).await;
    let types: Vec<(String, String)> = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["id"].as_str().unwrap().into(),
                k["keyType"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        types.contains(&(client_id.clone(), "client".into())),
        "{types:?}"
    );
    assert!(types.contains(&(key["id"].as_str().unwrap().into(), "auth".into())));
    assert!(
        !types.iter().any(|(id, _)| *id == mine["id"]),
        "a user's key"
    );
    assert!(!types.iter().any(|(_, t)| t == "api"), "a user's API token");
    // With `all`, the user sees the tailnet's keys too.
    let all: Value = get_json(&client, format!("{}?all=true", keys_url(&ts)), &user).await;
    assert!(
        all["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["id"] == key["id"])
    );
    let own: Value = get_json(&client, keys_url(&ts), &user).await;
    assert!(
        !own["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["id"] == key["id"])
    );

    // An access token of a client with auth_keys only may neither make nor delete
    // trust credentials.
    let (status, _) = create(
        &client,
        &ts,
        &access,
        json!({"keyType": "client", "scopes": ["auth_keys"], "tags": ["tag:edge"]}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let delete = |id: String, token: String| {
        let client = client.clone();
        let url = format!("{}/{id}", keys_url(&ts));
        async move {
            client
                .delete(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(
        delete(client_id.clone(), access.clone()).await,
        StatusCode::FORBIDDEN
    );

    for (bad, why) in [
        (
            json!({"keyType": "client", "tags": ["tag:edge"]}),
            "no scope",
        ),
        (
            json!({"keyType": "client", "scopes": ["auth_keys"]}),
            "auth_keys without tags",
        ),
        (
            json!({"keyType": "client", "scopes": ["all"], "capabilities": {"devices": {}}}),
            "an auth-key field",
        ),
        (
            json!({"keyType": "client", "scopes": ["all"], "issuer": "https://x"}),
            "a federated field",
        ),
        (
            json!({"keyType": "federated", "scopes": ["all"], "issuer": "http://example.com", "subject": "s"}),
            "an http issuer",
        ),
        (
            json!({"keyType": "federated", "scopes": ["all"], "issuer": "https://example.com"}),
            "no subject",
        ),
        (
            json!({"keyType": "federated", "scopes": ["all"], "subject": "s"}),
            "no issuer",
        ),
    ] {
        let (status, error) = create(&client, &ts, &user, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{why}: {error}");
    }
    let (status, federated) = create(
        &client,
        &ts,
        &user,
        json!({"keyType": "federated", "scopes": ["auth_keys"], "tags": ["tag:edge"],
               "issuer": "https://issuer.example.com", "subject": "system:serviceaccount:*:keyward"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{federated}");
    assert_eq!(federated["keyType"], "federated");
    assert!(
        federated.get("key").is_none(),
        "a federated identity has no secret"
    );
    assert_eq!(
        federated["audience"],
        format!("api.tailscale.com/{}", federated["id"].as_str().unwrap()),
        "an audience is generated when none is asked for"
    );

    // The user who made the client may delete it; its tokens stop working.
    assert_eq!(
        delete(client_id.clone(), user.clone()).await,
        StatusCode::OK
    );
    let (status, _) = create(&client, &ts, &access, body(&["tag:edge"], "")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let again = client
        .post(format!("{}/api/v2/oauth/token", ts.base_url()))
        .form(&[
            ("client_id", client_id.as_str()),
            ("client_secret", secret.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::UNAUTHORIZED);
    assert!(
        ts.credentials()
            .iter()
            .any(|c| c.id == client_id && c.revoked)
    );
}

/// The token exchange: an identity token is checked against the issuer's own discovery
/// document and keys, then against the federated identity's issuer, subject and
/// audience. Whatever is wrong, the answer is the same opaque 403.
#[tokio::test]
async fn the_token_exchange_accepts_only_the_federated_identitys_tokens() {
    let ts = Tailscale::start().await;
    let issuer = Issuer::start().await;
    let subject = "system:serviceaccount:kw:keyward";
    let audience = "api.tailscale.com/keyward-test";
    let id = ts.add_federated_identity(FederatedIdentity {
        issuer: issuer.url().to_owned(),
        subject: subject.to_owned(),
        audience: audience.to_owned(),
        tags: vec!["tag:edge".into()],
        scopes: vec!["auth_keys".into()],
    });
    let client = client();
    let exchange = |client_id: String, jwt: String| {
        let client = client.clone();
        let url = format!("{}/api/v2/oauth/token-exchange", ts.base_url());
        async move {
            let response = client
                .post(url)
                .form(&[("client_id", client_id), ("jwt", jwt)])
                .send()
                .await
                .unwrap();
            let status = response.status();
            (status, response.json::<Value>().await.unwrap())
        }
    };

    let (status, answer) = exchange(id.clone(), issuer.token(subject, audience, 600)).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{answer} {:?}",
        ts.exchange_refusals()
    );
    assert_eq!(answer["token_type"], "Bearer");
    assert_eq!(answer["expires_in"], 3600);
    assert_eq!(answer["scope"], "auth_keys");
    assert_eq!(ts.exchanges(), 1);
    let access = answer["access_token"].as_str().unwrap().to_owned();
    let (status, key) = create(&client, &ts, &access, body(&["tag:edge"], "")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(key.get("userId").is_none(), "owned by the tailnet");
    let (status, _) = create(&client, &ts, &access, body(&["tag:prod"], "")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "only the identity's tags");
    let listed: Value = get_json(&client, keys_url(&ts), &access).await;
    assert!(
        listed["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["id"] == id && k["keyType"] == "federated" && k["subject"] == subject)
    );

    let mut other_issuer = issuer.claims(subject, audience, 600);
    other_issuer["iss"] = json!("https://elsewhere.example.com");
    let unreachable = ts.add_federated_identity(FederatedIdentity {
        issuer: "https://127.0.0.1:1".to_owned(),
        subject: subject.to_owned(),
        audience: audience.to_owned(),
        tags: vec!["tag:edge".into()],
        scopes: vec!["auth_keys".into()],
    });
    let mut unreachable_claims = issuer.claims(subject, audience, 600);
    unreachable_claims["iss"] = json!("https://127.0.0.1:1");
    for (client_id, jwt, why) in [
        (
            id.clone(),
            issuer.token(subject, "api.tailscale.com/other", 600),
            "audience",
        ),
        (
            id.clone(),
            issuer.token("system:serviceaccount:kw:other", audience, 600),
            "subject",
        ),
        (
            id.clone(),
            issuer.forged(issuer.claims(subject, audience, 600)),
            "signature",
        ),
        (id.clone(), issuer.token(subject, audience, -10), "expiry"),
        (id.clone(), issuer.signed(other_issuer.clone()), "issuer"),
        (id.clone(), "not.a-jwt".to_owned(), "the token"),
        (
            "kunknownCNTRL".to_owned(),
            issuer.token(subject, audience, 600),
            "client",
        ),
        (
            unreachable.clone(),
            issuer.signed(unreachable_claims.clone()),
            "discovery",
        ),
    ] {
        let (status, answer) = exchange(client_id, jwt).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{why}");
        assert_eq!(answer, json!({"message": "Unauthorized"}), "{why}: opaque");
        let refusals = ts.exchange_refusals();
        let last = refusals.last().unwrap();
        assert!(
            last.starts_with(why),
            "refused for {why}, recorded {last:?}"
        );
    }
    assert_eq!(ts.exchanges(), 1);
    let missing = client
        .post(format!("{}/api/v2/oauth/token-exchange", ts.base_url()))
        .form(&[("client_id", id.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
}
