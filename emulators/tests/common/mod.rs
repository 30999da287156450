//! An OIDC issuer for emulator tests that run without a Kubernetes API server: a
//! discovery document and a JWKS on `http://127.0.0.1:<port>`, and ES256 identity
//! tokens signed with a fresh key — what a cluster's service-account issuer publishes.

#![allow(dead_code)]

use std::sync::Arc;

use axum::{Json, Router, routing::get};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use keyward_emulators::{Faults, Server};
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair},
};
use serde_json::{Value, json};

pub struct Issuer {
    server: Server,
    key: Arc<EcdsaKeyPair>,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn new_key() -> EcdsaKeyPair {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap()
}

impl Issuer {
    pub async fn start() -> Self {
        let key = Arc::new(new_key());
        let point = key.public_key().as_ref().to_vec();
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "k1",
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        });
        // The issuer URL is only known once the port is: the router reads it per request.
        let base = Arc::new(std::sync::OnceLock::<String>::new());
        let discovery_base = base.clone();
        let router = Router::new()
            .route(
                "/.well-known/openid-configuration",
                get(move || {
                    let base = discovery_base.get().cloned().unwrap_or_default();
                    async move {
                        Json(json!({
                            "issuer": base,
                            "jwks_uri": format!("{base}/openid/v1/jwks"),
                            "response_types_supported": ["id_token"],
                            "subject_types_supported": ["public"],
                            "id_token_signing_alg_values_supported": ["ES256"],
                        }))
                    }
                }),
            )
            .route(
                "/openid/v1/jwks",
                get(move || {
                    let jwk = jwk.clone();
                    async move { Json(json!({ "keys": [jwk] })) }
                }),
            );
        let server = Server::start(router, Faults::new()).await.unwrap();
        base.set(server.base_url().to_owned()).unwrap();
        Self { server, key }
    }

    /// `http://127.0.0.1:<port>`, the `iss` of its tokens.
    pub fn url(&self) -> &str {
        self.server.base_url()
    }

    /// An identity token for `sub` and `aud`, valid for `seconds`.
    pub fn token(&self, sub: &str, aud: &str, seconds: i64) -> String {
        self.sign(&self.key, self.claims(sub, aud, seconds))
    }

    /// Claims as this issuer puts them in a token.
    pub fn claims(&self, sub: &str, aud: &str, seconds: i64) -> Value {
        let now = jiff::Timestamp::now().as_second();
        json!({"iss": self.url(), "sub": sub, "aud": [aud], "iat": now, "nbf": now, "exp": now + seconds})
    }

    /// A token with `claims`, signed by this issuer's key.
    pub fn signed(&self, claims: Value) -> String {
        self.sign(&self.key, claims)
    }

    /// A token with `claims` signed by a key the issuer never published.
    pub fn forged(&self, claims: Value) -> String {
        self.sign(&new_key(), claims)
    }

    fn sign(&self, key: &EcdsaKeyPair, claims: Value) -> String {
        let header = json!({"alg": "ES256", "kid": "k1", "typ": "JWT"});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = key.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
        format!("{input}.{}", b64(signature.as_ref()))
    }
}
