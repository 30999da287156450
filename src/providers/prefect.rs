//! Prefect Cloud service-account ("bot") API keys, for `ServiceAccountKey`.
//!
//! Endpoints (base `apiURL`, default `https://api.prefect.cloud/api`, `Authorization:
//! Bearer <api key>`): `POST /accounts/{account}/bots/` (201, the key value only here
//! and from rotate), `POST …/bots/filter` (by name, or every bot a page at a time),
//! `DELETE …/bots/{id}`, `POST …/bots/{id}/rotate_api_key` (`old_key_expires_in_seconds`
//! ≤ 172800 keeps the old key working that long), `GET …/bots/{id}/read_bot_api_keys`
//! (the bot's key inventory: `active_key` and the `rotating_keys` still within their
//! grace), `DELETE …/bots/{id}/delete_bot_api_key/{key id}` and
//! `POST …/account_roles/filter` (role id by name).
//!
//! Key ids are `created/<bot id>/<api key id>` or `adopted/<bot id>/<api key id>`:
//! revoke, inspect and orphan recovery work from the id alone, and whether keyward
//! made the bot (and may delete it) travels with every key it issued.
//!
//! - `serviceAccount.create: true`: the first key creates the bot (name, role by name,
//!   `api_key_expiration` from `spec.expiry` or none); later keys rotate it with
//!   `old_key_expires_in_seconds` = the overlap (and `PATCH` its role first when
//!   `spec.role` changed); revoking the bot's current key deletes the bot. A bot of that
//!   name that keyward does not hold is refused (`ServiceAccountExists`), never taken
//!   over.
//! - `create: false`: the bot is found by name (`ServiceAccountNotFound` otherwise);
//!   every key is a rotation; revoking the current key rotates it away at once and
//!   discards the new key (which expires after half a minute); the bot stays.
//! - Revoking a key that is no longer the bot's active one deletes just that key
//!   (`delete_bot_api_key`) if the inventory still lists it; otherwise it is gone.
//! - What keyward never handed out is found by listing, not inferred: the inventory
//!   of every bot keyward holds a key of shows the keys nobody saw (an interrupted
//!   rotation's); see [`Prefect::find_orphans`]. Only an interrupted *first* issuance
//!   — no key held yet — falls back to the bot's name and creation time, with the
//!   residual risk `docs/providers/prefect.md` states.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use jiff::{SignedDuration, Timestamp};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::warn;

use super::{
    Capabilities, Interrupted, IssueRequest, IssuedKey, KeyApi, KeyShape, KeyState, MarkedKey,
    ProviderError, Refusal, SecretValue, Shared, parse_time, transport::Reply,
};
use crate::resources::PrefectProvider;

/// The longest a rotated-away key may keep working (`old_key_expires_in_seconds`).
pub const MAX_OVERLAP: Duration = Duration::from_secs(172_800);
/// Lifetime of a key keyward makes only to rotate another one away (a bot always has
/// an active key): shorter than any key keyward hands out (`spec.expiry` is at least a
/// minute), so a key this short-lived is recognisably one keyward discarded.
const DISCARDED_KEY_LIFETIME: SignedDuration = SignedDuration::from_secs(30);
/// A bot created this long before an interrupted attempt started still counts as the
/// attempt's own (clock skew between keyward and Prefect, whole-second status times).
const CREATED_SKEW: SignedDuration = SignedDuration::from_secs(5);

/// Whether keyward created the bot a key belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Created,
    Adopted,
    /// A key nobody was handed (an interrupted attempt's) on a bot that must stay:
    /// revoking it rotates it away at once, never deletes the bot. Only ever an orphan.
    Unseen,
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
            "unseen" => Mode::Unseen,
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
            Mode::Unseen => "unseen",
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

impl BotKey {
    fn created(&self) -> Option<Timestamp> {
        parse_time(self.created.as_deref())
    }

    /// A key keyward made only to rotate another one away.
    fn is_discarded(&self) -> bool {
        match (self.created(), parse_time(self.expiration.as_deref())) {
            (Some(created), Some(expires)) => {
                expires.duration_since(created) <= DISCARDED_KEY_LIFETIME + CREATED_SKEW
            }
            _ => false,
        }
    }
}

/// A bot's keys (`read_bot_api_keys`): the active one, and those rotated away that still
/// work for their grace period.
#[derive(Deserialize)]
struct Inventory {
    active_key: BotKey,
    #[serde(default)]
    rotating_keys: Vec<BotKey>,
}

impl Inventory {
    fn keys(&self) -> impl Iterator<Item = &BotKey> {
        std::iter::once(&self.active_key).chain(&self.rotating_keys)
    }
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
        let build = |client: &reqwest::Client| {
            let mut request = client
                .request(method.clone(), &url)
                .bearer_auth(self.api_key.expose());
            if let Some(body) = &body {
                request = request.json(body);
            }
            request
        };
        // Prefect's `…/filter` endpoints are searches sent as POST: safe to resend.
        let transport = &self.shared.transport;
        let reply = if path.ends_with("/filter") {
            transport.send_query(operation, build).await?
        } else {
            transport.send(operation, build).await?
        };
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

    /// Bots whose name is exactly `name`, or every bot of the account.
    async fn bots(&self, name: Option<&str>) -> Result<Vec<Bot>, ProviderError> {
        const PAGE: usize = 200;
        let mut all = Vec::new();
        loop {
            let mut body = json!({"limit": PAGE, "offset": all.len()});
            if let Some(name) = name {
                body["service_accounts"] = json!({"name": {"any_": [name]}});
            }
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
            let page: Vec<Bot> = reply.json("list service accounts")?;
            let last = page.len() < PAGE;
            all.extend(page);
            if last {
                break;
            }
        }
        Ok(all
            .into_iter()
            .filter(|b| name.is_none_or(|n| b.name == n))
            .collect())
    }

    async fn bots_named(&self, name: &str) -> Result<Vec<Bot>, ProviderError> {
        self.bots(Some(name)).await
    }

    /// The bot's key inventory, or `None` when the bot no longer exists.
    async fn inventory(&self, bot: &str) -> Result<Option<Inventory>, ProviderError> {
        let reply = self
            .call(
                "read service account keys",
                Method::GET,
                &format!("bots/{bot}/read_bot_api_keys"),
                None,
            )
            .await?;
        match reply.status {
            404 => Ok(None),
            _ if reply.is_success() => Ok(Some(reply.json("read service account keys")?)),
            _ => Err(self.unexpected("read a service account's keys", &reply)),
        }
    }

    async fn delete_bot(&self, bot: &str) -> Result<(), ProviderError> {
        let reply = self
            .call(
                "delete service account",
                Method::DELETE,
                &format!("bots/{bot}"),
                None,
            )
            .await?;
        if reply.is_success() || reply.status == 404 {
            Ok(())
        } else {
            Err(self.unexpected("delete a service account", &reply))
        }
    }

    /// Rotates the bot's active key away at once; the new key, which nobody will see,
    /// expires within [`DISCARDED_KEY_LIFETIME`].
    async fn discard_active_key(&self, bot: &str) -> Result<(), ProviderError> {
        let expires = Timestamp::now().checked_add(DISCARDED_KEY_LIFETIME).ok();
        self.rotate(bot, expires, Some(Duration::ZERO))
            .await
            .map(drop)
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

/// How long the bot's active key keeps working after a rotation: the overlap, so the
/// key keyward handed out outlives the switch. An active key keyward never handed out
/// (an interrupted rotation's, or one rotated in out of band after keyward's) is rotated
/// away at once: the key keyward holds was already rotated away, with its own grace,
/// and nobody can be using the unseen one.
fn grace(bot: &Bot, previous: Option<&KeyRef>, overlap: Duration) -> Option<Duration> {
    let active = bot.api_key.as_ref().map(|k| k.id.as_str());
    match previous {
        Some(p) if p.bot == bot.id && active != Some(p.key.as_str()) => Some(Duration::ZERO),
        _ => Some(overlap),
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
                    let grace = grace(&bot, previous.as_ref(), request.overlap);
                    let bot = self.rotate(&bot.id, expiration, grace).await?;
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
            let grace = grace(&bot, previous.as_ref(), request.overlap);
            let bot = self.rotate(&bot.id, expiration, grace).await?;
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
        let Some(inventory) = self.inventory(&key.bot).await? else {
            return Ok(());
        };
        if inventory.active_key.id == key.key {
            return match key.mode {
                Mode::Created => self.delete_bot(&key.bot).await,
                // Rotate the key away at once; nobody ever sees the new one.
                Mode::Adopted | Mode::Unseen => self.discard_active_key(&key.bot).await,
            };
        }
        if inventory.rotating_keys.iter().any(|k| k.id == key.key) {
            let reply = self
                .call(
                    "delete old key",
                    Method::DELETE,
                    &format!("bots/{}/delete_bot_api_key/{}", key.bot, key.key),
                    None,
                )
                .await?;
            if !(reply.is_success() || reply.status == 404) {
                return Err(self.unexpected("delete a rotated-away key", &reply));
            }
        }
        // A bot keyward made, left with no key but one keyward discarded (its last key
        // was revoked after an interrupted rotation's unseen key was rotated away), is
        // keyward's to delete: nothing else would.
        let others_rotating = inventory.rotating_keys.iter().any(|k| k.id != key.key);
        if key.mode == Mode::Created && !others_rotating && inventory.active_key.is_discarded() {
            self.delete_bot(&key.bot).await?;
        }
        Ok(())
    }

    async fn inspect(&self, key_id: &str) -> Result<KeyState, ProviderError> {
        let Some(key) = KeyRef::parse(key_id) else {
            return Ok(KeyState::Unknown);
        };
        let Some(inventory) = self.inventory(&key.bot).await? else {
            return Ok(KeyState::Revoked);
        };
        if inventory.active_key.id != key.key {
            // Rotated away (it may still work for its grace period, but the Secret must
            // move on), or deleted.
            return Ok(KeyState::Revoked);
        }
        Ok(
            match parse_time(inventory.active_key.expiration.as_deref()) {
                Some(at) if at <= Timestamp::now() => KeyState::Expired,
                _ => KeyState::Valid,
            },
        )
    }

    async fn find_by_marker(&self, _marker: &str) -> Result<Vec<String>, ProviderError> {
        // Bots carry no description to hold a marker: see `find_orphans`.
        Ok(Vec::new())
    }

    /// Keys an interrupted attempt left that nobody was handed, found by listing:
    ///
    /// - On every bot keyward holds a key of, the inventory names them: any key it does
    ///   not hold. A rotated-away one is deleted; an active one (an interrupted
    ///   rotation's) is rotated away at once, so the bot and the key keyward holds —
    ///   already rotated away by that attempt, with the overlap as its grace — stay.
    /// - With `create: true` and no key held on a bot of the service account's name (an
    ///   interrupted first issuance) only the name and times remain: a bot created
    ///   since the attempt started (Prefect's clock against keyward's, 5s of skew
    ///   allowed) is the attempt's own and is deleted; one that existed before is
    ///   someone else's (the attempt was refused for it) and never touched.
    /// - An interrupted first issuance on an adopted bot leaves nothing keyward can tell
    ///   from the key the bot already had: the retried issuance rotates it away, with
    ///   the overlap as its grace.
    async fn find_orphans(&self, attempt: &Interrupted<'_>) -> Result<Vec<String>, ProviderError> {
        let shape: &KeyShape = attempt.shape;
        let held: Vec<KeyRef> = attempt
            .held
            .iter()
            .filter_map(|id| KeyRef::parse(id))
            .collect();
        let mut orphans = Vec::new();
        let mut bots: Vec<(&str, Mode)> = Vec::new();
        for key in &held {
            if !bots.iter().any(|(bot, _)| *bot == key.bot) {
                bots.push((&key.bot, key.mode));
            }
        }
        for (bot, mode) in &bots {
            let Some(inventory) = self.inventory(bot).await? else {
                continue;
            };
            let holds = |key: &str| held.iter().any(|h| h.bot == *bot && h.key == key);
            for key in inventory.rotating_keys.iter().filter(|k| !holds(&k.id)) {
                orphans.push(
                    KeyRef {
                        mode: *mode,
                        bot: (*bot).to_owned(),
                        key: key.id.clone(),
                    }
                    .id(),
                );
            }
            if !holds(&inventory.active_key.id) {
                orphans.push(
                    KeyRef {
                        mode: Mode::Unseen,
                        bot: (*bot).to_owned(),
                        key: inventory.active_key.id.clone(),
                    }
                    .id(),
                );
            }
        }

        if !shape.create_service_account {
            return Ok(orphans);
        }
        let Some(name) = shape.service_account.as_deref() else {
            return Ok(orphans);
        };
        let since = attempt
            .started_at
            .checked_sub(CREATED_SKEW)
            .unwrap_or(attempt.started_at);
        for bot in self.bots_named(name).await? {
            let held_bot = bots.iter().any(|(held, _)| *held == bot.id);
            let created = parse_time(bot.created.as_deref());
            if held_bot || created.is_none_or(|c| c < since) {
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

    /// Every live key of every bot of the account. Prefect gives a bot no room for a
    /// marker: the bot's name is what ties it to a `ServiceAccountKey`.
    async fn marked_keys(&self) -> Result<Vec<MarkedKey>, ProviderError> {
        let mut marked = Vec::new();
        for bot in self.bots(None).await? {
            let Some(inventory) = self.inventory(&bot.id).await? else {
                continue;
            };
            for key in inventory.keys() {
                marked.push(MarkedKey {
                    id: KeyRef {
                        mode: Mode::Created,
                        bot: bot.id.clone(),
                        key: key.id.clone(),
                    }
                    .id(),
                    marker: bot.name.clone(),
                    created_at: key.created(),
                });
            }
        }
        Ok(marked)
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

    /// A rotation whose answer never reached keyward (as after a crash): issued on the
    /// bot keyward holds `held` of, then dropped.
    async fn lose_a_rotation(api: &Prefect, name: &str, held: &IssuedKey) -> String {
        let mut req = request(name, true);
        req.previous = Some(held.id.clone());
        req.overlap = Duration::from_secs(60);
        let lost = api.issue(&req).await.unwrap();
        KeyRef::parse(&lost.id).unwrap().key
    }

    fn interrupted<'a>(shape: &'a KeyShape, held: &[&IssuedKey]) -> Interrupted<'a> {
        Interrupted {
            marker: "kw:00000000.00000000",
            shape,
            started_at: Timestamp::now() - SignedDuration::from_secs(1),
            held: held.iter().map(|k| k.id.clone()).collect(),
        }
    }

    /// After an interrupted rotation the inventory shows the key nobody saw; it is
    /// rotated away at once, the bot and the held key (within its grace) stay, and the
    /// retried rotation leaves exactly the held keys live.
    #[tokio::test]
    async fn an_interrupted_rotation_is_found_by_listing_and_the_bot_stays() {
        let emulator = Emulator::start().await;
        let api = provider(&emulator, &emulator.add_admin_key()).await;
        let shape = request("agent", true).shape;
        let first = api.issue(&request("agent", true)).await.unwrap();
        let bot = KeyRef::parse(&first.id).unwrap().bot;
        let works = |key: &str| emulator.key(key).unwrap().is_valid(Timestamp::now());
        // Interrupted twice: the second try rotates the first one's unseen key away at
        // once (it is not the key keyward holds), so only the second's is left.
        let unseen_first = lose_a_rotation(&api, "agent", &first).await;
        let unseen = lose_a_rotation(&api, "agent", &first).await;
        assert!(!works(&unseen_first));
        // Then someone rotated it with a grace period: a rotating key nobody holds too.
        api.rotate(&bot, None, Some(Duration::from_secs(60)))
            .await
            .unwrap();
        let active = emulator.bots_named("agent")[0].active_key.clone();
        let orphans = api
            .find_orphans(&interrupted(&shape, &[&first]))
            .await
            .unwrap();
        assert_eq!(
            orphans,
            vec![
                format!("created/{bot}/{unseen}"),
                format!("unseen/{bot}/{active}"),
            ]
        );
        for orphan in &orphans {
            api.revoke(orphan).await.unwrap();
        }
        assert!(
            emulator.authenticates(first.value.expose()),
            "the held key still works"
        );
        assert_eq!(emulator.bots_named("agent").len(), 1, "the bot stays");
        assert!(
            !works(&unseen) && !works(&active),
            "no key nobody saw still works"
        );

        // The retried rotation: its new key and the held one, nothing else.
        let mut req = request("agent", true);
        req.previous = Some(first.id.clone());
        req.overlap = Duration::from_secs(60);
        let second = api.issue(&req).await.unwrap();
        let mut live: Vec<String> = emulator.live_bot_keys().into_iter().map(|k| k.id).collect();
        live.sort();
        let mut expected = vec![
            KeyRef::parse(&first.id).unwrap().key,
            KeyRef::parse(&second.id).unwrap().key,
        ];
        expected.sort();
        assert_eq!(live, expected);
        assert!(
            api.find_orphans(&interrupted(&shape, &[&second, &first]))
                .await
                .unwrap()
                .is_empty()
        );
    }

    /// A resource deleted while a rotation was interrupted: the unseen key is rotated
    /// away, then revoking the held key leaves the bot with only the key keyward
    /// discarded, and keyward deletes the bot it made.
    #[tokio::test]
    async fn deleting_during_an_interrupted_rotation_leaves_no_bot() {
        let emulator = Emulator::start().await;
        let api = provider(&emulator, &emulator.add_admin_key()).await;
        let shape = request("agent", true).shape;
        let first = api.issue(&request("agent", true)).await.unwrap();
        lose_a_rotation(&api, "agent", &first).await;
        for orphan in api
            .find_orphans(&interrupted(&shape, &[&first]))
            .await
            .unwrap()
        {
            api.revoke(&orphan).await.unwrap();
        }
        assert_eq!(emulator.bots_named("agent").len(), 1);
        api.revoke(&first.id).await.unwrap();
        assert!(
            emulator.bots_named("agent").is_empty(),
            "the bot keyward made is gone"
        );
        assert!(emulator.live_bot_keys().is_empty());

        // An ordinary retirement never deletes the bot: its active key is a real one.
        let kept = api.issue(&request("kept", true)).await.unwrap();
        let mut req = request("kept", true);
        req.previous = Some(kept.id.clone());
        req.overlap = Duration::from_secs(60);
        req.lifetime = Some(Duration::from_secs(60));
        let current = api.issue(&req).await.unwrap();
        api.revoke(&kept.id).await.unwrap();
        assert!(!emulator.authenticates(kept.value.expose()));
        assert!(emulator.authenticates(current.value.expose()));
        assert_eq!(emulator.bots_named("kept").len(), 1);
    }

    /// The inventory: every live key of every bot, named after its bot.
    #[tokio::test]
    async fn marked_keys_list_every_live_key_of_every_bot() {
        let emulator = Emulator::start().await;
        let api = provider(&emulator, &emulator.add_admin_key()).await;
        let first = api.issue(&request("agent", true)).await.unwrap();
        let mut req = request("agent", true);
        req.previous = Some(first.id.clone());
        req.overlap = Duration::from_secs(60);
        let second = api.issue(&req).await.unwrap();
        let (ui_bot, _) = emulator.create_bot_in_ui("someone-elses");
        let mut marked = api.marked_keys().await.unwrap();
        marked.sort_by(|a, b| a.id.cmp(&b.id));
        let mut ids: Vec<(String, String)> = marked
            .iter()
            .map(|m| (m.id.clone(), m.marker.clone()))
            .collect();
        ids.sort();
        let ui_key = emulator.bots_named("someone-elses")[0].active_key.clone();
        let mut expected = vec![
            (first.id.clone(), "agent".to_owned()),
            (second.id.clone(), "agent".to_owned()),
            (
                format!("created/{ui_bot}/{ui_key}"),
                "someone-elses".to_owned(),
            ),
        ];
        expected.sort();
        assert_eq!(ids, expected);
        assert!(marked.iter().all(|m| m.created_at.is_some()));
    }
}
