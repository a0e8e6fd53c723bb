//! Secrets Manager: per-(extension, user) secrets behind [`SecretStore`] (`ctx.secrets`),
//! the writes behind `longrun secrets set|delete`, and plain secrets such as the chat API
//! token (`LONGRUN_CHAT_TOKEN_SECRET`).
//!
//! # Layout
//!
//! One secret per (ext, user), named `{prefix}/{ext}/{user}`, holding a JSON object
//! `{"name": "value", …}`. Secrets Manager bills $0.40 per secret and month whatever it
//! holds, so a secret per key would multiply the bill by the keys each user connects; this
//! layout costs one secret per connected user, and one `GetSecretValue` fetches all of a
//! user's keys for the cache. A secret value holds up to 64 KiB, far more than a user's API
//! keys need.
//!
//! # Names
//!
//! Secret names allow ASCII letters, digits and `/_+=.@-`. `ext` and `user` are free text,
//! so each is encoded: every byte of its UTF-8 outside `[A-Za-z0-9_+=.@]` becomes `-`
//! followed by two uppercase hex digits. `-` itself and `/` are encoded too, so the encoding
//! is reversible ([`parse_secret_name`]) and two different (ext, user) pairs never share a
//! name: a segment holds no `/`, and a `-` always starts an escape. `user` `ü ser#1/..`
//! becomes `-C3-BC-20ser-231-2F..`. The prefix is the operator's and is used as written. A
//! name longer than 512 characters (Secrets Manager's limit) is refused with
//! [`PortError::Permanent`]. We always address secrets by full name, never by partial ARN, so
//! a name ending in `-` and six characters (which AWS warns about) is harmless here.
//!
//! Values never reach a log line or an error: errors name the secret and the key only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::error::ProvideErrorMetadata;
use serde_json::{Map, Value};

use super::port_error;
use longrun::ports::{PortError, PortResult, Secret, SecretStore};

/// How long [`SecretsManagerStore`] keeps a user's secrets before reading them again.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(300);
/// Longest secret name Secrets Manager accepts.
pub const MAX_SECRET_NAME_CHARS: usize = 512;
/// Cache entries kept before expired ones are dropped: bounds a warm Lambda's memory.
const CACHE_SWEEP_AT: usize = 1024;

/// The secret name of `(ext, user)` under `prefix`: `{prefix}/{ext}/{user}`, `ext` and
/// `user` encoded as the module doc describes.
pub fn secret_name(prefix: &str, ext: &str, user: &str) -> PortResult<String> {
    let prefix_ok = !prefix.is_empty()
        && prefix
            .bytes()
            .all(|b| plain_byte(b) || b == b'/' || b == b'-');
    if !prefix_ok {
        return Err(PortError::Permanent(format!(
            "secrets prefix {prefix:?}: Secrets Manager names allow only ASCII letters, digits and /_+=.@-"
        )));
    }
    let name = format!("{prefix}/{}/{}", encode(ext), encode(user));
    if name.len() > MAX_SECRET_NAME_CHARS {
        return Err(PortError::Permanent(format!(
            "the secret name for ext {ext:?}, user {user:?} would be {} characters, over Secrets Manager's {MAX_SECRET_NAME_CHARS}",
            name.len()
        )));
    }
    Ok(name)
}

/// The `(ext, user)` a secret name under `prefix` belongs to, if it is one of ours.
pub fn parse_secret_name(prefix: &str, name: &str) -> Option<(String, String)> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('/')?;
    let (ext, user) = rest.split_once('/')?;
    Some((decode(ext)?, decode(user)?))
}

fn plain_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'=' | b'.' | b'@')
}

fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if plain_byte(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("-{b:02X}"));
        }
    }
    out
}

fn decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'-' => {
                let hex = segment.get(i + 1..i + 3)?;
                if !hex
                    .bytes()
                    .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(&h))
                {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b if plain_byte(b) => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// A user's secrets as read: string values, and the keys whose value is not a string (set by
/// hand in the console), which are reported as errors rather than guessed at.
#[derive(Default)]
struct UserSecrets {
    values: HashMap<String, Secret>,
    not_strings: Vec<String>,
}

type CacheEntry = (Instant, Option<Arc<UserSecrets>>);
/// Held while one caller reads an (ext, user)'s secrets.
type ReadGate = Arc<tokio::sync::Mutex<()>>;

/// [`SecretStore`] on Secrets Manager, caching each (ext, user)'s secrets — or their
/// absence — for a TTL, so a warm worker reads a user's secrets once per TTL, not per call.
pub struct SecretsManagerStore {
    client: Client,
    prefix: String,
    ttl: Duration,
    cache: Mutex<HashMap<(String, String), CacheEntry>>,
    /// One lock per (ext, user) being read: concurrent misses for the same user (a batch of
    /// one user's tasks starting together) wait for one GetSecretValue instead of each
    /// sending their own.
    loading: Mutex<HashMap<(String, String), ReadGate>>,
}

impl SecretsManagerStore {
    /// A store for secrets under `prefix` (`LONGRUN_SECRETS_PREFIX`), cached for
    /// [`DEFAULT_CACHE_TTL`].
    pub fn new(client: Client, prefix: impl Into<String>) -> Self {
        Self::with_ttl(client, prefix, DEFAULT_CACHE_TTL)
    }

    /// A store whose cache keeps entries for `ttl` (zero: no caching).
    pub fn with_ttl(client: Client, prefix: impl Into<String>, ttl: Duration) -> Self {
        Self {
            client,
            prefix: prefix.into(),
            ttl,
            cache: Mutex::new(HashMap::new()),
            loading: Mutex::new(HashMap::new()),
        }
    }

    /// Reads `(ext, user)`'s secrets through the cache, one read at a time per key.
    async fn load(&self, ext: &str, user: &str) -> PortResult<Option<Arc<UserSecrets>>> {
        let key = (ext.to_owned(), user.to_owned());
        if let Some(secrets) = self.cached(&key) {
            return Ok(secrets);
        }
        let gate = Arc::clone(
            self.loading
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(key.clone())
                .or_default(),
        );
        let _reading = gate.lock().await;
        // Another caller may have read it while this one waited.
        let secrets = match self.cached(&key) {
            Some(secrets) => Ok(secrets),
            None => {
                let secret_id = secret_name(&self.prefix, ext, user)?;
                tracing::debug!(ext, user, secret = %secret_id, "reading user secrets");
                let fetched = self.fetch(&secret_id).await;
                if let Ok(secrets) = &fetched {
                    self.remember(key.clone(), secrets.clone());
                }
                fetched
            }
        };
        // The last one through removes the gate (the map holds one reference, this one another).
        let mut loading = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        if loading.get(&key).is_some_and(|g| Arc::strong_count(g) <= 2) {
            loading.remove(&key);
        }
        secrets
    }

    fn cached(&self, key: &(String, String)) -> Option<Option<Arc<UserSecrets>>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let (at, secrets) = cache.get(key)?;
        (at.elapsed() < self.ttl).then(|| secrets.clone())
    }

    fn remember(&self, key: (String, String), secrets: Option<Arc<UserSecrets>>) {
        if self.ttl.is_zero() {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_SWEEP_AT {
            let ttl = self.ttl;
            cache.retain(|_, (at, _)| at.elapsed() < ttl);
        }
        cache.insert(key, (Instant::now(), secrets));
    }

    async fn fetch(&self, name: &str) -> PortResult<Option<Arc<UserSecrets>>> {
        let Some(text) = read_string(&self.client, name).await? else {
            return Ok(None);
        };
        let object = parse_object(name, &text)?;
        let mut secrets = UserSecrets::default();
        for (key, value) in object {
            match value {
                Value::String(s) => {
                    secrets.values.insert(key, Secret::new(s));
                }
                _ => secrets.not_strings.push(key),
            }
        }
        Ok(Some(Arc::new(secrets)))
    }
}

#[async_trait]
impl SecretStore for SecretsManagerStore {
    async fn get(&self, ext: &str, user: &str, name: &str) -> PortResult<Option<Secret>> {
        let Some(secrets) = self.load(ext, user).await? else {
            return Ok(None);
        };
        if secrets.not_strings.iter().any(|k| k == name) {
            return Err(PortError::Permanent(format!(
                "secret {} key {name:?} does not hold a string",
                secret_name(&self.prefix, ext, user)?
            )));
        }
        Ok(secrets.values.get(name).cloned())
    }
}

/// What `GetSecretValue` found under a name.
enum Stored {
    Absent,
    /// Scheduled for deletion (deleted with a recovery window): unreadable until restored.
    Deleted,
    Present(String),
}

async fn read(client: &Client, secret_id: &str) -> PortResult<Stored> {
    match client.get_secret_value().secret_id(secret_id).send().await {
        Ok(output) => match output.secret_string() {
            Some(text) => Ok(Stored::Present(text.to_owned())),
            None => Err(PortError::Permanent(format!(
                "secret {secret_id} holds binary data, not a string"
            ))),
        },
        Err(e) => {
            let service = e.as_service_error();
            if service.is_some_and(|s| s.is_resource_not_found_exception()) {
                return Ok(Stored::Absent);
            }
            if service
                .is_some_and(|s| s.is_invalid_request_exception() && marked_deleted(s.message()))
            {
                return Ok(Stored::Deleted);
            }
            Err(port_error(
                &format!("Secrets Manager GetSecretValue {secret_id}"),
                e,
            ))
        }
    }
}

fn marked_deleted(message: Option<&str>) -> bool {
    message.is_some_and(|m| m.contains("marked deleted") || m.contains("marked for deletion"))
}

/// The secret's string, `None` if there is none (or it awaits deletion: to a reader, a
/// deleted secret is gone).
async fn read_string(client: &Client, secret_id: &str) -> PortResult<Option<String>> {
    Ok(match read(client, secret_id).await? {
        Stored::Present(text) => Some(text),
        Stored::Absent | Stored::Deleted => None,
    })
}

/// Parses a user secret. serde's message can quote the input, so only the position of the
/// fault is kept.
fn parse_object(secret_id: &str, text: &str) -> PortResult<Map<String, Value>> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(PortError::Permanent(format!(
            "secret {secret_id} is not a JSON object"
        ))),
        Err(e) => Err(PortError::Permanent(format!(
            "secret {secret_id} is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        ))),
    }
}

/// Sets `name` to `value` in the secret of `(ext, user)`, creating the secret if absent
/// (`longrun secrets set`). Read-modify-write: two concurrent writes to the same user's
/// secrets may lose one key, which is acceptable for an operator command.
pub async fn put_secret(
    client: &Client,
    prefix: &str,
    ext: &str,
    user: &str,
    name: &str,
    value: &Secret,
) -> PortResult<()> {
    let secret_id = secret_name(prefix, ext, user)?;
    // A second pass covers a concurrent creation of the same secret.
    for _ in 0..2 {
        match read(client, &secret_id).await? {
            Stored::Present(text) => {
                let mut object = parse_object(&secret_id, &text)?;
                object.insert(name.to_owned(), Value::String(value.expose().to_owned()));
                write(client, &secret_id, &object).await?;
                tracing::info!(ext, user, secret = %secret_id, key = name, "secret set");
                return Ok(());
            }
            Stored::Deleted => {
                // Keys deleted with the secret stay deleted: restore, then write only this one.
                client
                    .restore_secret()
                    .secret_id(&secret_id)
                    .send()
                    .await
                    .map_err(|e| {
                        port_error(&format!("Secrets Manager RestoreSecret {secret_id}"), e)
                    })?;
                let object =
                    Map::from_iter([(name.to_owned(), Value::String(value.expose().to_owned()))]);
                write(client, &secret_id, &object).await?;
                tracing::info!(ext, user, secret = %secret_id, key = name, "secret restored and set");
                return Ok(());
            }
            Stored::Absent => {
                let object =
                    Map::from_iter([(name.to_owned(), Value::String(value.expose().to_owned()))]);
                let created = client
                    .create_secret()
                    .name(&secret_id)
                    .description(format!(
                        "longrun secrets of user {user:?} in extension {ext:?}"
                    ))
                    .secret_string(Value::Object(object).to_string())
                    .send()
                    .await;
                match created {
                    Ok(_) => {
                        tracing::info!(ext, user, secret = %secret_id, key = name, "secret created");
                        return Ok(());
                    }
                    Err(e)
                        if e.as_service_error()
                            .is_some_and(|s| s.is_resource_exists_exception()) =>
                    {
                        continue;
                    }
                    Err(e) => {
                        return Err(port_error(
                            &format!("Secrets Manager CreateSecret {secret_id}"),
                            e,
                        ));
                    }
                }
            }
        }
    }
    Err(PortError::Conflict(format!(
        "secret {secret_id} changed while setting key {name:?}; try again"
    )))
}

async fn write(client: &Client, secret_id: &str, object: &Map<String, Value>) -> PortResult<()> {
    client
        .put_secret_value()
        .secret_id(secret_id)
        .secret_string(Value::Object(object.clone()).to_string())
        .send()
        .await
        .map_err(|e| port_error(&format!("Secrets Manager PutSecretValue {secret_id}"), e))?;
    Ok(())
}

/// Removes `name` from the secret of `(ext, user)` (`longrun secrets delete`); deletes the
/// secret itself, without a recovery window, once no key is left, so it stops being billed.
/// `Ok(false)` if there was no such key.
pub async fn delete_secret(
    client: &Client,
    prefix: &str,
    ext: &str,
    user: &str,
    name: &str,
) -> PortResult<bool> {
    let secret_id = secret_name(prefix, ext, user)?;
    let Some(text) = read_string(client, &secret_id).await? else {
        return Ok(false);
    };
    let mut object = parse_object(&secret_id, &text)?;
    if object.remove(name).is_none() {
        return Ok(false);
    }
    if object.is_empty() {
        client
            .delete_secret()
            .secret_id(&secret_id)
            .force_delete_without_recovery(true)
            .send()
            .await
            .map_err(|e| port_error(&format!("Secrets Manager DeleteSecret {secret_id}"), e))?;
        tracing::info!(ext, user, secret = %secret_id, key = name, "last key deleted; secret deleted");
    } else {
        write(client, &secret_id, &object).await?;
        tracing::info!(ext, user, secret = %secret_id, key = name, "secret key deleted");
    }
    Ok(true)
}

/// A plain-string secret by name or ARN (the chat API token), `None` if it does not exist.
pub async fn get_plain(client: &Client, secret_id: &str) -> PortResult<Option<Secret>> {
    Ok(read_string(client, secret_id).await?.map(Secret::new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_encode_reversibly_and_without_collisions() {
        let cases = [
            ("text-tools", "u1"),
            ("text-tools", "ü ser#1/.."),
            ("text-tools", "ü ser#1/.-"),
            ("text", "tools/u1"),
            ("text/tools", "u1"),
            ("a-2D", "b"),
            ("a-", "2Db"),
            ("", ""),
        ];
        let mut seen = std::collections::HashSet::new();
        for (ext, user) in cases {
            let name = secret_name("longrun/prod", ext, user).unwrap();
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/_+=.@-".contains(&b)),
                "{name}"
            );
            assert_eq!(
                parse_secret_name("longrun/prod", &name),
                Some((ext.to_owned(), user.to_owned()))
            );
            assert!(seen.insert(name.clone()), "collision on {name}");
        }
        assert_eq!(
            secret_name("longrun", "text-tools", "ü ser#1/..").unwrap(),
            "longrun/text-2Dtools/-C3-BC-20ser-231-2F.."
        );
    }

    #[test]
    fn too_long_names_and_bad_prefixes_are_refused() {
        let long_user = "ü".repeat(100);
        let err = secret_name("longrun", "e", &long_user).unwrap_err();
        assert!(
            matches!(&err, PortError::Permanent(m) if m.contains("512")),
            "{err}"
        );
        assert!(secret_name("has space", "e", "u").is_err());
        assert!(secret_name("", "e", "u").is_err());
    }

    #[test]
    fn parse_errors_do_not_quote_the_value() {
        let err = parse_object("s", r#"{"k": sk-live-123}"#).unwrap_err();
        assert!(!err.to_string().contains("sk-live"), "{err}");
        let err = parse_object("s", r#""sk-live-123""#).unwrap_err();
        assert!(!err.to_string().contains("sk-live"), "{err}");
    }
}
