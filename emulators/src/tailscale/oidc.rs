//! Verifying an OIDC identity token the way a relying party such as Tailscale does for
//! workload identity federation: fetch the issuer's discovery document
//! (`{issuer}/.well-known/openid-configuration`, OpenID Connect Discovery 1.0 §4), check
//! that it names the same issuer, fetch its `jwks_uri`, verify the JWS signature with
//! the key the token's `kid` names (RFC 7515 / RFC 7517), then check `exp` and `nbf`.
//! Audience and subject are the federated identity's business and checked by the caller.
//!
//! Written here, with `ring` for the signature, because the emulator needs only this
//! one verification (ES256 as a Kubernetes API server signs with an EC key, RS256 as
//! most issuers do) and a JWT crate would bring a second crypto stack into the tests.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::signature::{self, UnparsedPublicKey};
use serde::Deserialize;
use serde_json::Value;

/// How far `nbf` may lie in the future (clock skew between issuer and relying party).
const LEEWAY_SECONDS: i64 = 60;

/// The claims a federated identity is matched against (beside the issuer, which
/// [`verify`] has checked).
#[derive(Clone, Debug)]
pub struct Claims {
    pub subject: String,
    pub audiences: Vec<String>,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

#[derive(Deserialize)]
struct Payload {
    iss: String,
    sub: String,
    #[serde(default)]
    aud: Option<Value>,
    exp: i64,
    #[serde(default)]
    nbf: Option<i64>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
}

fn decode(part: &str, what: &str) -> Result<Vec<u8>, String> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| format!("the token's {what} is not base64url"))
}

/// Verifies `jwt` as issued by `issuer` (the federated identity's issuer, compared
/// before anything is fetched: only a trusted issuer's documents are ever requested).
/// `Err` says why, for the emulator's own record; callers answer opaquely.
pub async fn verify(
    http: &reqwest::Client,
    jwt: &str,
    issuer: &str,
    now: i64,
) -> Result<Claims, String> {
    let parts: Vec<&str> = jwt.split('.').collect();
    let [raw_header, raw_payload, raw_signature] = parts[..] else {
        return Err("the token is not a JWS in compact form".to_owned());
    };
    let header: Header = serde_json::from_slice(&decode(raw_header, "header")?)
        .map_err(|_| "the token's header is not JSON".to_owned())?;
    let claims: Payload = serde_json::from_slice(&decode(raw_payload, "payload")?)
        .map_err(|_| "the token's payload lacks iss, sub or exp".to_owned())?;
    let signature = decode(raw_signature, "signature")?;
    if claims.iss != issuer {
        return Err(format!(
            "issuer: the token's iss {:?} is not the federated identity's issuer {issuer:?}",
            claims.iss
        ));
    }

    let discovery_url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let discovery: Discovery = fetch(http, &discovery_url).await?;
    if discovery.issuer != issuer {
        return Err(format!(
            "issuer: the discovery document names issuer {:?}, not {issuer:?}",
            discovery.issuer
        ));
    }
    let jwks: Jwks = fetch(http, &discovery.jwks_uri).await?;
    let signed = &jwt[..raw_header.len() + raw_payload.len() + 1];
    let candidates: Vec<&Jwk> = jwks
        .keys
        .iter()
        .filter(|k| header.kid.is_none() || k.kid == header.kid)
        .collect();
    if !candidates
        .iter()
        .any(|k| verifies(k, &header.alg, signed.as_bytes(), &signature))
    {
        return Err(format!(
            "signature: no key of the issuer's JWKS (kid {:?}, alg {}) verifies the token",
            header.kid, header.alg
        ));
    }

    if claims.exp <= now {
        return Err("expiry: the token has expired".to_owned());
    }
    if claims.nbf.is_some_and(|nbf| nbf > now + LEEWAY_SECONDS) {
        return Err("the token is not valid yet (nbf)".to_owned());
    }
    let audiences = match claims.aud {
        Some(Value::String(a)) => vec![a],
        Some(Value::Array(all)) => all
            .into_iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    Ok(Claims {
        subject: claims.sub,
        audiences,
    })
}

async fn fetch<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
) -> Result<T, String> {
    let response = http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("discovery: fetching {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!(
            "discovery: {url} answered {} (the issuer's discovery documents must be readable without credentials)",
            response.status()
        ));
    }
    response
        .json()
        .await
        .map_err(|e| format!("discovery: {url} is not the expected JSON: {e}"))
}

fn verifies(key: &Jwk, alg: &str, signed: &[u8], signature: &[u8]) -> bool {
    let part = |v: &Option<String>| v.as_deref().and_then(|s| URL_SAFE_NO_PAD.decode(s).ok());
    match (alg, key.kty.as_str()) {
        ("ES256", "EC") if key.crv.as_deref() == Some("P-256") => {
            let (Some(x), Some(y)) = (part(&key.x), part(&key.y)) else {
                return false;
            };
            let mut point = vec![0x04];
            point.extend(x);
            point.extend(y);
            UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(signed, signature)
                .is_ok()
        }
        ("RS256", "RSA") => {
            let (Some(n), Some(e)) = (part(&key.n), part(&key.e)) else {
                return false;
            };
            signature::RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, signature)
                .is_ok()
        }
        _ => false,
    }
}

/// Whether `value` matches a Tailscale claim pattern, in which `*` stands for any run
/// of characters.
pub fn matches(pattern: &str, value: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let [first, middle @ .., last] = parts.as_slice() else {
        return pattern == value;
    };
    let Some(mut rest) = value.strip_prefix(first) else {
        return false;
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn patterns_match_like_tailscale_documents() {
        assert!(matches(
            "system:serviceaccount:ns:sa",
            "system:serviceaccount:ns:sa"
        ));
        assert!(!matches(
            "system:serviceaccount:ns:sa",
            "system:serviceaccount:ns:sa2"
        ));
        assert!(matches(
            "repo:org/repo:*",
            "repo:org/repo:ref:refs/heads/main"
        ));
        assert!(!matches(
            "repo:org/repo",
            "repo:org/repo:ref:refs/heads/main"
        ));
        assert!(matches(
            "system:serviceaccount:*:keyward",
            "system:serviceaccount:ops:keyward"
        ));
        assert!(!matches(
            "system:serviceaccount:*:keyward",
            "system:serviceaccount:ops:other"
        ));
        assert!(matches("a*b*c", "a-x-b-y-c"));
        assert!(!matches("a*b*c", "a-x-c"));
        assert!(!matches("ab*ba", "aba"), "the two ends may not overlap");
    }
}
