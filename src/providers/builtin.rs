//! Keys minted by keyward itself: random bytes from the operating system, encoded,
//! behind an optional prefix. There is no upstream, so revoking is forgetting: the
//! value disappears from the Secret and nothing else ever held it.

use async_trait::async_trait;
use base64::Engine;
use jiff::Timestamp;

use super::{Capabilities, IssueRequest, IssuedKey, KeyApi, KeyState, ProviderError, SecretValue};
use crate::resources::{BuiltinProvider, KeyEncoding};

/// 256 bits unless the provider asks for more.
const DEFAULT_BYTES: usize = 32;
const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

pub struct Builtin {
    prefix: String,
    encoding: KeyEncoding,
    bytes: usize,
}

impl Builtin {
    pub fn new(spec: &BuiltinProvider) -> Self {
        Self {
            prefix: spec.prefix.clone().unwrap_or_default(),
            encoding: spec.encoding,
            bytes: spec
                .bytes
                .map_or(DEFAULT_BYTES, usize::from)
                .max(DEFAULT_BYTES),
        }
    }

    fn random(len: usize) -> Result<Vec<u8>, ProviderError> {
        let mut buf = vec![0; len];
        getrandom::fill(&mut buf)
            .map_err(|e| ProviderError::Unavailable(format!("operating system RNG: {e}")))?;
        Ok(buf)
    }

    /// The encoded key body, carrying at least `self.bytes * 8` bits of entropy.
    fn body(&self) -> Result<String, ProviderError> {
        Ok(match self.encoding {
            KeyEncoding::Hex => Self::random(self.bytes)?
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            KeyEncoding::Base64url => {
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Self::random(self.bytes)?)
            }
            KeyEncoding::Base62 => {
                // Rejection sampling keeps every character uniform: bytes ≥ 248 (= 4·62)
                // are dropped. log2(62) ≈ 5.95 bits per character.
                let chars = (self.bytes * 8).div_ceil(5);
                let mut out = String::with_capacity(chars);
                while out.len() < chars {
                    for b in Self::random(chars)? {
                        if b < 248 && out.len() < chars {
                            out.push(BASE62[usize::from(b % 62)] as char);
                        }
                    }
                }
                out
            }
        })
    }
}

#[async_trait]
impl KeyApi for Builtin {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            overlap: true,
            local: true,
            ..Capabilities::default()
        }
    }

    async fn issue(&self, request: &IssueRequest) -> Result<IssuedKey, ProviderError> {
        let created_at = Timestamp::now();
        let expires_at = super::expires_after(created_at, request.lifetime)?;
        // The id is independent of the value: it is shown in status and events.
        let id: String = Self::random(8)?
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(IssuedKey {
            id: format!("kw-{id}"),
            value: SecretValue::new(format!("{}{}", self.prefix, self.body()?)),
            created_at,
            expires_at,
        })
    }

    async fn revoke(&self, _key_id: &str) -> Result<(), ProviderError> {
        Ok(())
    }

    async fn inspect(&self, _key_id: &str) -> Result<KeyState, ProviderError> {
        Ok(KeyState::Unknown)
    }

    async fn find_by_marker(&self, _marker: &str) -> Result<Vec<String>, ProviderError> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::KeyShape;

    fn request() -> IssueRequest {
        IssueRequest {
            marker: "m".into(),
            description: None,
            lifetime: Some(std::time::Duration::from_secs(3600)),
            shape: KeyShape::default(),
            previous: None,
            overlap: std::time::Duration::ZERO,
        }
    }

    async fn issue(encoding: KeyEncoding, prefix: &str) -> IssuedKey {
        let spec = BuiltinProvider {
            prefix: Some(prefix.into()),
            encoding,
            bytes: None,
        };
        Builtin::new(&spec).issue(&request()).await.unwrap()
    }

    #[tokio::test]
    async fn keys_carry_at_least_256_bits_in_each_encoding() {
        let hex = issue(KeyEncoding::Hex, "kw_").await;
        assert_eq!(hex.value.expose().len(), 3 + 64);
        let b64 = issue(KeyEncoding::Base64url, "").await;
        assert_eq!(b64.value.expose().len(), 43);
        let b62 = issue(KeyEncoding::Base62, "p_").await;
        let body = b62.value.expose().strip_prefix("p_").unwrap();
        // 52 characters × log2(62) ≈ 309 bits ≥ 256.
        assert_eq!(body.len(), 52);
        assert!(body.bytes().all(|c| c.is_ascii_alphanumeric()));
    }

    #[tokio::test]
    async fn keys_are_distinct_and_ids_do_not_reveal_values() {
        let a = issue(KeyEncoding::Base62, "").await;
        let b = issue(KeyEncoding::Base62, "").await;
        assert_ne!(a.value, b.value);
        assert_ne!(a.id, b.id);
        assert!(!a.value.expose().contains(a.id.trim_start_matches("kw-")));
        assert_eq!(format!("{:?}", a.value), "SecretValue(<redacted>)");
        let lifetime = a.expires_at.unwrap().duration_since(a.created_at);
        assert_eq!(lifetime.as_secs(), 3600);
    }
}
