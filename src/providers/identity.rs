//! keyward's own ServiceAccount as an identity towards upstreams that federate with the
//! cluster (Tailscale workload identity federation): short-lived tokens from the
//! TokenRequest API, with the audience the upstream expects. Nothing is stored — a
//! token is requested when an access token has to be (re)fetched, and expires by
//! itself.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jiff::Timestamp;
use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::ServiceAccount as KubeServiceAccount,
};
use kube::{Api, api::PostParams};

use super::{ProviderError, SecretValue};

/// Where the kubelet mounts the pod's namespace (and the chart's projected volume too).
pub const NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// The ServiceAccount keyward runs as, and a client to request its tokens with.
#[derive(Clone)]
pub struct ServiceAccount {
    client: kube::Client,
    pub namespace: String,
    pub name: String,
}

/// A token the API server issued for keyward's ServiceAccount.
pub struct IdentityToken {
    pub value: SecretValue,
    pub expires_at: Timestamp,
    /// The token's `iss`, for messages (the API server's `--service-account-issuer`).
    pub issuer: Option<String>,
}

impl ServiceAccount {
    pub fn new(client: kube::Client, namespace: String, name: String) -> Self {
        Self {
            client,
            namespace,
            name,
        }
    }

    /// The `sub` of its tokens: `system:serviceaccount:<namespace>:<name>`.
    pub fn subject(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }

    /// A token for `audience`, asked to last `lifetime` (the API server may shorten it;
    /// the answer says until when it is valid).
    pub async fn token(
        &self,
        audience: &str,
        lifetime: Duration,
    ) -> Result<IdentityToken, ProviderError> {
        let api: Api<KubeServiceAccount> = Api::namespaced(self.client.clone(), &self.namespace);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(vec![audience.to_owned()]),
                expiration_seconds: Some(lifetime.as_secs() as i64),
                ..Default::default()
            }),
            ..Default::default()
        };
        let answer = api
            .create_token_request(&self.name, &PostParams::default(), &request)
            .await
            .map_err(|e| self.refused(e))?;
        let status = answer.status.unwrap_or_default();
        let (Some(token), Some(expires_at)) = (status.token, status.expiration_timestamp) else {
            return Err(ProviderError::Unavailable(format!(
                "the API server answered the TokenRequest for ServiceAccount {}/{} without a token",
                self.namespace, self.name
            )));
        };
        let issuer = claim(&token, "iss");
        Ok(IdentityToken {
            value: SecretValue::new(token),
            expires_at: expires_at.0,
            issuer,
        })
    }

    fn refused(&self, e: kube::Error) -> ProviderError {
        let (ns, name) = (&self.namespace, &self.name);
        match &e {
            kube::Error::Api(status) if status.code == 403 => ProviderError::Refused {
                reason: "CredentialsInvalid",
                message: format!(
                    "keyward may not request a token for its ServiceAccount {ns}/{name}: grant it create on serviceaccounts/token for resourceNames [{name}] in namespace {ns} (the Helm chart does)"
                ),
            },
            kube::Error::Api(status) if status.code == 404 => ProviderError::Refused {
                reason: "CredentialsInvalid",
                message: format!(
                    "ServiceAccount {ns}/{name} does not exist: run keyward with --service-account set to the ServiceAccount it runs as"
                ),
            },
            _ => ProviderError::Unavailable(format!(
                "requesting a token for ServiceAccount {ns}/{name}: {e}"
            )),
        }
    }
}

/// A string claim of a JWT, read without verifying it: only for messages about a
/// token keyward itself was just given.
pub fn claim(jwt: &str, name: &str) -> Option<String> {
    let payload = jwt.split('.').nth(1)?;
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    claims.get(name)?.as_str().map(str::to_owned)
}

/// `NAME` or `NAMESPACE/NAME` (`--service-account`) as `(namespace, name)`; a bare name
/// is in `default_namespace`.
pub fn parse_reference(value: &str, default_namespace: &str) -> Result<(String, String), String> {
    let (namespace, name) = match value.split_once('/') {
        Some((ns, name)) => (ns, name),
        None => (default_namespace, value),
    };
    let valid = |s: &str, max: usize| {
        !s.is_empty()
            && s.len() <= max
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    if !valid(namespace, 63) || namespace.contains('.') {
        return Err(format!(
            "{value:?}: the namespace {namespace:?} is not a Kubernetes namespace name; give NAME or NAMESPACE/NAME"
        ));
    }
    if !valid(name, 253) {
        return Err(format!(
            "{value:?}: {name:?} is not a ServiceAccount name (lower-case letters, digits, '-' and '.'); give NAME or NAMESPACE/NAME"
        ));
    }
    Ok((namespace.to_owned(), name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_name_a_service_account_in_a_namespace() {
        assert_eq!(
            parse_reference("keyward", "keyward-system"),
            Ok(("keyward-system".into(), "keyward".into()))
        );
        assert_eq!(
            parse_reference("ops/kw.operator", "keyward-system"),
            Ok(("ops".into(), "kw.operator".into()))
        );
        for bad in [
            "",
            "Keyward",
            "ops/",
            "/keyward",
            "a/b/c",
            "ops.x/keyward",
            "-kw",
        ] {
            let err = parse_reference(bad, "keyward-system").unwrap_err();
            assert!(err.contains("NAME or NAMESPACE/NAME"), "{bad}: {err}");
        }
    }

    #[test]
    fn claims_are_read_from_the_payload() {
        let payload =
            URL_SAFE_NO_PAD.encode(br#"{"iss":"https://kubernetes.default.svc","sub":"x"}"#);
        let jwt = format!("e30.{payload}.sig");
        assert_eq!(
            claim(&jwt, "iss").as_deref(),
            Some("https://kubernetes.default.svc")
        );
        assert_eq!(claim(&jwt, "aud"), None);
        assert_eq!(claim("not-a-jwt", "iss"), None);
    }
}
