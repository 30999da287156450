//! Prefect Cloud service-account ("bot") API keys, for `ServiceAccountKey`.
//!
//! Endpoints (base `apiURL`, default `https://api.prefect.cloud/api`, `Authorization:
//! Bearer <api key>`): `POST /accounts/{account}/bots/` (201, the key value only here
//! and from rotate), `POST …/bots/filter` (by name), `GET` / `DELETE …/bots/{id}`,
//! `POST …/bots/{id}/rotate_api_key` (`old_key_expires_in_seconds` ≤ 172800 keeps the
//! old key working that long), `DELETE …/bots/{id}/delete_bot_api_key/{key id}` and
//! `POST …/account_roles/filter` (role id by name).
//!
//! Key ids are `created/<bot id>/<api key id>` or `adopted/<bot id>/<api key id>`:
//! revoke, inspect and orphan recovery work from the id alone, and whether keyward
//! made the bot (and may delete it) travels with every key it issued.
//!
//! - `serviceAccount.create: true`: the first key creates the bot (name, role by name,
//!   `api_key_expiration` from `spec.expiry` or none); later keys rotate it with
//!   `old_key_expires_in_seconds` = the overlap (and `PATCH` its role first when
//!   `spec.role` changed); revoking the bot's current key deletes the bot. A bot of that name that keyward does not hold is refused
//!   (`ServiceAccountExists`), never taken over.
//! - `create: false`: the bot is found by name (`ServiceAccountNotFound` otherwise);
//!   every key is a rotation; revoking the current key rotates it away at once and
//!   discards the new key (which expires after a minute); the bot stays.
//! - Revoking a key that is no longer the bot's current one deletes just that key
//!   (`delete_bot_api_key`) if it is still within its grace period; otherwise it is
//!   already gone.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use jiff::{SignedDuration, Timestamp};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::warn;

use super::{
    Capabilities, Interrupted, IssueRequest, IssuedKey, KeyApi, KeyShape, KeyState, ProviderError,
    Refusal, SecretValue, Shared, parse_time, transport::Reply,
};
use crate::resources::PrefectProvider;

/// The longest a rotated-away key may keep working (`old_key_expires_in_seconds`).
pub const MAX_OVERLAP: Duration = Duration::from_secs(172_800);
/// Lifetime of the key an adopted bot is left with after keyward revokes its own.
const DISCARDED_KEY_LIFETIME: SignedDuration = SignedDuration::from_secs(60);
/// A bot created this long before an interrupted attempt started still counts as the
/// attempt's own (clock skew between keyward and Prefect, whole-second status times).
const CREATED_SKEW: SignedDuration = SignedDuration::from_secs(5);

/// Whether keyward created the bot a key belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Created,
    Adopted,
}

/// A key id taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
struct KeyRef {
    mode: Mode,
    bot: String,
    key: String,
}

impl KeyRef {
    fn parse(id: &str) -> Option<Self> {
        let mut parts = id.splitn(3, '/');
        let mode = match parts.next()? {
            "created" => Mode::Created,
            "adopted" => Mode::Adopted,
            _ => return None,
        };
        let bot = parts.next().filter(|s| !s.is_empty())?.to_owned();
        let key = parts
            .next()
            .filter(|s| !s.is_empty() && !s.contains('/'))?
            .to_owned();
        Some(Self { mode, bot, key })
    }

    fn id(&self) -> String {
        let mode = match self.mode {
            Mode::Created => "created",
            Mode::Adopted => "adopted",
        };
        format!("{mode}/{}/{}", self.bot, self.key)
    }
}

/// A bot as `GET` / `filter` / create / rotate return it.
#[derive(Deserialize)]
struct Bot {
    id: String,
    name: String,
    #[serde(default)]
    created: Option<String>,
    #[serde(default)]
    account_role_name: Option<String>,
    #[serde(default)]
    api_key: Option<BotKey>,
}

/// Deliberately without `Debug`: `key` is a key value.
#[derive(Deserialize)]
struct BotKey {
    id: String,
    #[serde(default)]
    created: Option<String>,
    #[serde(default)]
    expiration: Option<String>,
    #[serde(default)]
    key: Option<String>,
}

#[derive(Deserialize)]
struct Role {
    id: String,
    name: String,
}

fn rfc3339(t: Timestamp) -> String {
    Timestamp::from_second(t.as_second())
        .unwrap_or(t)
        .to_string()
}

/// What a refusal of the upstream said: FastAPI's `detail` (a string, or a list of
/// `{loc, msg}`), without echoing anything else from the body.
fn describe(reply: &Reply) -> String {
    let parsed: Option<Value> = serde_json::from_slice(&reply.body).ok();
    let detail = parsed.as_ref().and_then(|v| v.get("detail"));
    let text = match detail {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .map(|i| {
                    let loc = i
                        .get("loc")
                        .and_then(Value::as_array)
                        .map(|l| {
                            l.iter()
                                .map(|p| p.as_str().map_or_else(|| p.to_string(), str::to_owned))
                                .collect::<Vec<_>>()
                                .join(".")
                        })
                        .unwrap_or_default();
                    let msg = i.get("msg").and_then(Value::as_str).unwrap_or("invalid");
                    format!("{loc}: {msg}")
                })
                .collect::<Vec<_>>()
                .join("; "),
        ),
        _ => None,
    };
    match text {
        Some(t) => format!(
            "HTTP {}: {}",
            reply.status,
            t.chars().take(300).collect::<String>()
        ),
        None => reply.message(),
    }
}

pub struct Prefect {
    api_url: String,
    account_id: String,
    api_key: SecretValue,
    shared: Arc<Shared>,
}

impl Prefect {
    /// `credentials` is the data of the Secret `apiKeySecretRef` names.
    pub fn new(
        spec: &PrefectProvider,
        credentials: &BTreeMap<String, Vec<u8>>,
        shared: Arc<Shared>,
    ) -> Result<Self, ProviderError> {
        let reference = &spec.api_key_secret_ref;
        let raw = credentials.get(&reference.key).ok_or_else(|| {
            ProviderError::Misconfigured(format!(
                "Secret {} has no data key {}",
                reference.name, reference.key
            ))
        })?;
        let key = std::str::from_utf8(raw)
            .map(str::trim)
            .ok()
            .filter(|k| !k.is_empty() && !k.contains(char::is_whitespace))
            .ok_or_else(|| {
                ProviderError::Misconfigured(format!(
                    "Secret {} key {} does not hold a Prefect API key (empty or not text)",
                    reference.name, reference.key
                ))
            })?;
        Ok(Self {
            api_url: spec.api_url.trim_end_matches('/').to_owned(),
            account_id: spec.account_id.to_lowercase(),
            api_key: SecretValue::new(key.to_owned()),
            shared,
        })
    }

    /// One request to `…/accounts/{account}/{path}`; 2xx and 4xx come back.
    async fn call(
        &self,
        operation: &'static str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Reply, ProviderError> {
        let url = format!("{}/accounts/{}/{path}", self.api_url, self.account_id);
        let reply = self
            .shared
            .transport
            .send(operation, |client| {
                let mut request = client
                    .request(method.clone(), &url)
                    .bearer_auth(self.api_key.expose());
                if let Some(body) = &body {
                    request = request.json(body);
                }
                request
            })
            .await?;
        if matches!(reply.status, 401 | 403) {
            return Err(ProviderError::Refused {
                reason: "CredentialsInvalid",
                message: format!(
                    "Prefect refused the provider's API key ({}); it needs to be valid and allowed to manage service accounts of account {}",
                    describe(&reply),
                    self.account_id
                ),
            });
        }
        Ok(reply)
    }

    fn unexpected(&self, operation: &str, reply: &Reply) -> ProviderError {
        if reply.status == 404 {
            return ProviderError::Refused {
                reason: "AccountNotFound",
                message: format!(
                    "Prefect cannot {operation}: {}; check spec.prefect.accountId ({}) and that the API key belongs to that account",
                    describe(reply),
                    self.account_id
                ),
            };
        }
        if matches!(reply.status, 400 | 409 | 422) {
            ProviderError::Refused {
                reason: "RequestRefused",
                message: format!("Prefect refused to {operation}: {}", describe(reply)),
            }
        } else {
            ProviderError::Unavailable(format!("prefect {operation}: {}", describe(reply)))
        }
    }

    /// Bots whose name is exactly `name`.
    async fn bots_named(&self, name: &str) -> Result<Vec<Bot>, ProviderError> {
        let body =
            json!({"service_accounts": {"name": {"any_": [name]}}, "limit": 200, "offset": 0});
        let reply = self
            .call(
                "find service account",
                Method::POST,
                "bots/filter",
                Some(body),
            )
            .await?;
        if !reply.is_success() {
            return Err(self.unexpected("list service accounts", &reply));
        }
        let bots: Vec<Bot> = reply.json("list service accounts")?;
        Ok(bots.into_iter().filter(|b| b.name == name).collect())
    }

    /// The bot, or `None` when it no longer exists.
    async fn bot(&self, id: &str) -> Result<Option<Bot>, ProviderError> {
        let reply = self
            .call(
                "read service account",
                Method::GET,
                &format!("bots/{id}"),
                None,
            )
            .await?;
        match reply.status {
            404 => Ok(None),
            _ if reply.is_success() => Ok(Some(reply.json("read service account")?)),
            _ => Err(self.unexpected("read a service account", &reply)),
        }
    }

    async fn role_id(&self, role: &str) -> Result<String, ProviderError> {
        let body = json!({"account_roles": {"name": {"any_": [role]}}});
        let reply = self
            .call(
                "find role",
                Method::POST,
                "account_roles/filter",
                Some(body),
            )
            .await?;
        if !reply.is_success() {
            return Err(self.unexpected("list account roles", &reply));
        }
        let roles: Vec<Role> = reply.json("list account roles")?;
        roles
            .into_iter()
            .find(|r| r.name == role)
            .map(|r| r.id)
            .ok_or_else(|| ProviderError::Refused {
                reason: "RoleNotFound",
                message: format!(
                    "Prefect account {} has no account role named {role:?}; set spec.role to an existing role (e.g. Member, Admin) or leave it out",
                    self.account_id
                ),
            })
    }

    /// The key a create or rotate answer carries.
    fn issued(mode: Mode, bot: Bot, operation: &str) -> Result<IssuedKey, ProviderError> {
        let malformed = || {
            ProviderError::Unavailable(format!(
                "prefect {operation}: the answer carries no API key"
            ))
        };
        let key = bot.api_key.ok_or_else(malformed)?;
        let value = key.key.filter(|k| !k.is_empty()).ok_or_else(malformed)?;
        Ok(IssuedKey {
            id: KeyRef {
                mode,
                bot: bot.id,
                key: key.id,
            }
            .id(),
            value: SecretValue::new(value),
            created_at: parse_time(key.created.as_deref()).unwrap_or_else(Timestamp::now),
            expires_at: parse_time(key.expiration.as_deref()),
        })
    }

    /// A new key for `bot`; its current key keeps working for `grace` (`None`: the
    /// upstream deletes it at once).
    async fn rotate(
        &self,
        bot: &str,
        expiration: Option<Timestamp>,
        grace: Option<Duration>,
    ) -> Result<Bot, ProviderError> {
        let grace = grace.map(|g| g.min(MAX_OVERLAP).as_secs());
        let body = json!({
            "api_key_expiration": expiration.map(rfc3339),
            "old_key_expires_in_seconds": grace,
        });
        let reply = self
            .call(
                "rotate key",
                Method::POST,
                &format!("bots/{bot}/rotate_api_key"),
                Some(body),
            )
            .await?;
        if !reply.is_success() {
            return Err(self.unexpected("rotate a service account's key", &reply));
        }
        reply.json("rotate key")
    }

    /// Gives a bot keyward created the role `spec.role` names now.
    async fn set_role(&self, bot: &str, role: &str) -> Result<(), ProviderError> {
        let body = json!({"account_role_id": self.role_id(role).await?});
        let reply = self
            .call(
                "update service account",
                Method::PATCH,
                &format!("bots/{bot}"),
                Some(body),
            )
            .await?;
        if !reply.is_success() {
            return Err(self.unexpected("change a service account's role", &reply));
        }
        Ok(())
    }

    async fn create(
        &self,
        name: &str,
        role: Option<&str>,
        expiration: Option<Timestamp>,
    ) -> Result<Bot, ProviderError> {
        let mut body = json!({"name": name, "api_key_expiration": expiration.map(rfc3339)});
        if let Some(role) = role {
            body["account_role_id"] = json!(self.role_id(role).await?);
        }
        let reply = self
            .call("create service account", Method::POST, "bots/", Some(body))
            .await?;
        if reply.status == 409 {
            // It was not there a moment ago (the lookup precedes the create): most
            // likely an earlier try of this very request (a timeout the transport
            // retried) created it. Not a refusal: the attempt stays recorded, so the
            // next reconcile deletes that bot as the attempt's orphan and creates anew.
            return Err(ProviderError::Unavailable(format!(
                "prefect create service account: a service account named {name:?} appeared while creating it; checking again"
            )));
        }
        if !reply.is_success() {
            return Err(self.unexpected("create a service account", &reply));
        }
        reply.json("create service account")
    }
}

fn exists(name: &str) -> ProviderError {
    ProviderError::Refused {
        reason: "ServiceAccountExists",
        message: format!(
            "a Prefect service account named {name:?} already exists and keyward did not create it; set spec.serviceAccount.create: false to adopt it (keyward then rotates its key), or choose another spec.serviceAccount.name"
        ),
    }
}

#[async_trait]
impl KeyApi for Prefect {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            native_rotate: true,
            overlap: true,
            listing: true,
            inspect: true,
            ..Capabilities::default()
        }
    }

    fn check(&self, request: &IssueRequest) -> Result<(), Refusal> {
        if request.shape.service_account.is_none() {
            return Err(Refusal {
                reason: "KindNotSupported",
                message: "the prefect provider issues ServiceAccountKey keys (API keys of a Prefect service account); an AuthKey cannot use it: point spec.providerRef at a tailscale or builtin provider".to_owned(),
            });
        }
        if !request.shape.scopes.is_empty() {
            return Err(Refusal {
                reason: "ScopesNotSupported",
                message: "Prefect service-account keys have no scopes; remove spec.scopes and grant access with spec.role".to_owned(),
            });
        }
        if request.overlap > MAX_OVERLAP {
            return Err(Refusal {
                reason: "OverlapOutOfRange",
                message: format!(
                    "rotation.overlap is {}s but Prefect keeps a rotated-away key for at most 48h (172800s, old_key_expires_in_seconds); set rotation.overlap to 48h or less",
                    request.overlap.as_secs()
                ),
            });
        }
        Ok(())
    }

    async fn issue(&self, request: &IssueRequest) -> Result<IssuedKey, ProviderError> {
        self.check(request)?;
        let shape = &request.shape;
        let name = shape
            .service_account
            .as_deref()
            .expect("check() refuses a key without a service account");
        let expiration = super::expires_after(Timestamp::now(), request.lifetime)?;
        let previous = request.previous.as_deref().and_then(KeyRef::parse);
        let mut found = self.bots_named(name).await?;
        if found.len() > 1 {
            return Err(ProviderError::Refused {
                reason: "ServiceAccountAmbiguous",
                message: format!(
                    "{} Prefect service accounts are named {name:?}; keyward needs the name to be unique: rename or delete the others",
                    found.len()
                ),
            });
        }
        let existing = found.pop();
        if shape.create_service_account {
            match existing {
                None => {
                    let bot = self.create(name, shape.role.as_deref(), expiration).await?;
                    Self::issued(Mode::Created, bot, "create service account")
                }
                // Only a bot keyward created and still holds a key of is rotated.
                Some(bot)
                    if previous
                        .as_ref()
                        .is_some_and(|p| p.mode == Mode::Created && p.bot == bot.id) =>
                {
                    if let Some(role) = shape.role.as_deref()
                        && bot.account_role_name.as_deref() != Some(role)
                    {
                        self.set_role(&bot.id, role).await?;
                    }
                    let bot = self
                        .rotate(&bot.id, expiration, Some(request.overlap))
                        .await?;
                    Self::issued(Mode::Created, bot, "rotate key")
                }
                Some(_) => Err(exists(name)),
            }
        } else {
            let Some(bot) = existing else {
                return Err(ProviderError::Refused {
                    reason: "ServiceAccountNotFound",
                    message: format!(
                        "no Prefect service account is named {name:?} in account {}; create it in Prefect, fix spec.serviceAccount.name, or set spec.serviceAccount.create: true to let keyward create it",
                        self.account_id
                    ),
                });
            };
            let bot = self
                .rotate(&bot.id, expiration, Some(request.overlap))
                .await?;
            Self::issued(Mode::Adopted, bot, "rotate key")
        }
    }

    async fn revoke(&self, key_id: &str) -> Result<(), ProviderError> {
        let Some(key) = KeyRef::parse(key_id) else {
            // Not an id this provider issued (e.g. the provider type changed): there
            // is nothing upstream to revoke, and refusing would hold the finalizer.
            warn!(key_id, "not a Prefect key id; nothing to revoke upstream");
            return Ok(());
        };
        let Some(bot) = self.bot(&key.bot).await? else {
            return Ok(());
        };
        let current = bot.api_key.as_ref().map(|k| k.id.as_str());
        if current == Some(key.key.as_str()) {
            return match key.mode {
                Mode::Created => {
                    let reply = self
                        .call(
                            "delete service account",
                            Method::DELETE,
                            &format!("bots/{}", key.bot),
                            None,
                        )
                        .await?;
                    if reply.is_success() || reply.status == 404 {
                        Ok(())
                    } else {
                        Err(self.unexpected("delete a service account", &reply))
                    }
                }
                Mode::Adopted => {
                    // Rotate our key away at once; nobody ever sees the new one.
                    let expires = Timestamp::now().checked_add(DISCARDED_KEY_LIFETIME).ok();
                    self.rotate(&key.bot, expires, Some(Duration::ZERO))
                        .await
                        .map(drop)
                }
            };
        }
        // Rotated away already: delete it if it is still in its grace period.
        let reply = self
            .call(
                "delete old key",
                Method::DELETE,
                &format!("bots/{}/delete_bot_api_key/{}", key.bot, key.key),
                None,
            )
            .await?;
        if reply.is_success() || reply.status == 404 {
            Ok(())
        } else {
            Err(self.unexpected("delete a rotated-away key", &reply))
        }
    }

    async fn inspect(&self, key_id: &str) -> Result<KeyState, ProviderError> {
        let Some(key) = KeyRef::parse(key_id) else {
            return Ok(KeyState::Unknown);
        };
        let Some(bot) = self.bot(&key.bot).await? else {
            return Ok(KeyState::Revoked);
        };
        let Some(current) = bot.api_key.filter(|k| k.id == key.key) else {
            // Rotated away (by keyward's own interrupted attempt, or out of band).
            return Ok(KeyState::Revoked);
        };
        Ok(match parse_time(current.expiration.as_deref()) {
            Some(at) if at <= Timestamp::now() => KeyState::Expired,
            _ => KeyState::Valid,
        })
    }

    async fn find_by_marker(&self, _marker: &str) -> Result<Vec<String>, ProviderError> {
        // Bots carry no description to hold a marker: see `find_orphans`.
        Ok(Vec::new())
    }

    /// With `create: true`, an interrupted attempt's bot is a bot of the service
    /// account's name that keyward holds no key of and that was created after the
    /// attempt started; revoking its current key deletes it. A bot that existed
    /// before (someone else's: the attempt was refused) is never touched.
    ///
    /// Nothing else is an orphan: an interrupted rotation replaced the key of the bot
    /// keyward holds, and deleting that bot would cut off the workload. Its trigger
    /// (renewal time, rotate annotation, spec change) still holds after the restart,
    /// so the rotation is retried at once; that `rotate_api_key` rotates the unseen key
    /// away with the overlap as its grace, after which it is gone upstream. Nobody
    /// ever held its value. An adopted bot's unseen key goes the same way.
    async fn find_orphans(&self, attempt: &Interrupted<'_>) -> Result<Vec<String>, ProviderError> {
        let shape: &KeyShape = attempt.shape;
        let Some(name) = shape.service_account.as_deref() else {
            return Ok(Vec::new());
        };
        if !shape.create_service_account {
            return Ok(Vec::new());
        }
        let held: Vec<KeyRef> = attempt
            .held
            .iter()
            .filter_map(|id| KeyRef::parse(id))
            .collect();
        let since = attempt
            .started_at
            .checked_sub(CREATED_SKEW)
            .unwrap_or(attempt.started_at);
        let mut orphans = Vec::new();
        for bot in self.bots_named(name).await? {
            if held.iter().any(|k| k.bot == bot.id) {
                continue;
            }
            let created = parse_time(bot.created.as_deref());
            if created.is_none_or(|c| c < since) {
                continue;
            }
            if let Some(key) = &bot.api_key {
                orphans.push(
                    KeyRef {
                        mode: Mode::Created,
                        bot: bot.id.clone(),
                        key: key.id.clone(),
                    }
                    .id(),
                );
            }
        }
        Ok(orphans)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        providers::{TokenCache, Transport},
        resources::SecretKeyRef,
    };
    use keyward_emulators::{Fault, prefect::Prefect as Emulator};

    async fn provider(emulator: &Emulator, key: &str) -> Prefect {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let spec = PrefectProvider {
            api_url: format!("{}/", emulator.api_url()),
            account_id: emulator.account_id(),
            api_key_secret_ref: SecretKeyRef {
                name: "admin".into(),
                key: "api-key".into(),
            },
        };
        let credentials = BTreeMap::from([("api-key".to_owned(), key.as_bytes().to_vec())]);
        let shared = Arc::new(Shared {
            transport: Transport::new("prefect", None),
            tokens: TokenCache::default(),
        });
        Prefect::new(&spec, &credentials, shared).unwrap()
    }

    fn request(name: &str, create: bool) -> IssueRequest {
        IssueRequest {
            marker: "kw:00000000.00000000".into(),
            description: None,
            lifetime: None,
            shape: KeyShape {
                service_account: Some(name.into()),
                create_service_account: create,
                ..KeyShape::default()
            },
            previous: None,
            overlap: Duration::ZERO,
        }
    }

    #[tokio::test]
    async fn issue_rotate_inspect_and_revoke_against_the_emulator() {
        let emulator = Emulator::start().await;
        let api = provider(&emulator, &emulator.add_admin_key()).await;
        let mut req = request("agent", true);
        req.lifetime = Some(Duration::from_secs(3600));
        let first = api.issue(&req).await.unwrap();
        assert!(first.id.starts_with("created/"));
        assert!(first.expires_at.is_some(), "api_key_expiration sent");
        assert_eq!(api.inspect(&first.id).await.unwrap(), KeyState::Valid);

        req.previous = Some(first.id.clone());
        req.overlap = Duration::from_secs(60);
        req.shape.role = Some("Admin".into());
        let second = api.issue(&req).await.unwrap();
        let bot = KeyRef::parse(&second.id).unwrap().bot;
        assert_eq!(
            emulator.role_of(&bot).as_deref(),
            Some("Admin"),
            "role follows spec.role"
        );
        assert_eq!(
            emulator.bots_named("agent").len(),
            1,
            "rotated, not recreated"
        );
        assert!(emulator.authenticates(first.value.expose()), "overlap");
        assert_eq!(api.inspect(&first.id).await.unwrap(), KeyState::Revoked);
        assert_eq!(api.inspect(&second.id).await.unwrap(), KeyState::Valid);

        // The old key is deleted before its grace ends; the bot stays.
        api.revoke(&first.id).await.unwrap();
        assert!(!emulator.authenticates(first.value.expose()));
        assert!(emulator.authenticates(second.value.expose()));
        api.revoke(&first.id).await.unwrap();

        api.revoke(&second.id).await.unwrap();
        assert!(emulator.bots_named("agent").is_empty());
        assert_eq!(api.inspect(&second.id).await.unwrap(), KeyState::Revoked);
        api.revoke(&second.id).await.unwrap();
        api.revoke("kw-not-ours").await.unwrap();
    }

    #[tokio::test]
    async fn orphans_are_only_bots_made_since_the_attempt_that_keyward_does_not_hold() {
        let emulator = Emulator::start().await;
        let api = provider(&emulator, &emulator.add_admin_key()).await;
        emulator.create_bot_in_ui("foreign");
        let shape = request("foreign", true).shape;
        let attempt = |shape, held: Vec<String>, started_at| Interrupted {
            marker: "kw:00000000.00000000",
            shape,
            started_at,
            held,
        };
        let later = Timestamp::now() + SignedDuration::from_secs(60);
        assert!(
            api.find_orphans(&attempt(&shape, vec![], later))
                .await
                .unwrap()
                .is_empty(),
            "a bot that existed before the attempt is someone else's"
        );
        let fresh = api.issue(&request("fresh", true)).await.unwrap();
        let fresh_shape = request("fresh", true).shape;
        assert_eq!(
            api.find_orphans(&attempt(&fresh_shape, vec![], Timestamp::now()))
                .await
                .unwrap(),
            vec![fresh.id.clone()]
        );
        assert!(
            api.find_orphans(&attempt(
                &fresh_shape,
                vec![fresh.id.clone()],
                Timestamp::now()
            ))
            .await
            .unwrap()
            .is_empty(),
            "a bot keyward holds a key of is never an orphan"
        );
        let adopt = request("fresh", false).shape;
        assert!(
            api.find_orphans(&attempt(&adopt, vec![], Timestamp::now()))
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn throttling_is_waited_out_and_bad_credentials_are_named_not_echoed() {
        let emulator = Emulator::start().await;
        let api = provider(&emulator, &emulator.add_admin_key()).await;
        emulator.faults().inject(
            Fault::TooManyRequests {
                retry_after: Some(1),
            },
            1,
            Some("/bots/filter"),
        );
        api.issue(&request("agent", true)).await.unwrap();
        assert_eq!(emulator.faults().pending(), 0);

        let wrong = "pnu_wrongwrongwrongwrongwrongwrongwrong";
        let err = provider(&emulator, wrong)
            .await
            .issue(&request("other", true))
            .await
            .unwrap_err();
        let ProviderError::Refused { reason, message } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(*reason, "CredentialsInvalid");
        assert!(!message.contains(wrong), "{message}");
    }

    #[tokio::test]
    async fn existing_and_missing_bots_are_refused() {
        let emulator = Emulator::start().await;
        let api = provider(&emulator, &emulator.add_admin_key()).await;
        emulator.create_bot_in_ui("taken");
        let err = api.issue(&request("taken", true)).await.unwrap_err();
        assert!(matches!(
            err,
            ProviderError::Refused {
                reason: "ServiceAccountExists",
                ..
            }
        ));
        let err = api.issue(&request("nobody", false)).await.unwrap_err();
        assert!(matches!(
            err,
            ProviderError::Refused {
                reason: "ServiceAccountNotFound",
                ..
            }
        ));
        let mut with_role = request("roled", true);
        with_role.shape.role = Some("Nope".into());
        let err = api.issue(&with_role).await.unwrap_err();
        assert!(matches!(
            err,
            ProviderError::Refused {
                reason: "RoleNotFound",
                ..
            }
        ));
        assert_eq!(emulator.bots().len(), 1);
    }

    #[test]
    fn key_ids_round_trip_and_foreign_ids_are_not_ours() {
        let k = KeyRef {
            mode: Mode::Adopted,
            bot: "b".into(),
            key: "k".into(),
        };
        assert_eq!(KeyRef::parse(&k.id()), Some(k));
        for foreign in [
            "kw-0011",
            "created/b",
            "created//k",
            "other/b/k",
            "created/b/k/x",
        ] {
            assert_eq!(KeyRef::parse(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn validation_errors_are_described_without_inputs() {
        let reply = Reply {
            status: 422,
            body: br#"{"detail":[{"type":"extra_forbidden","loc":["body","x"],"msg":"Extra inputs are not permitted","input":"pnb_secret"}]}"#.to_vec(),
        };
        let text = describe(&reply);
        assert_eq!(text, "HTTP 422: body.x: Extra inputs are not permitted");
    }
}
