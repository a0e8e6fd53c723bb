//! Per-(extension, user) secrets in a local JSON file, readable by its owner only (`0600`):
//! the local stand-in for Secrets Manager behind `ctx.secrets`, and what
//! `longrun --local secrets set|delete` writes.
//!
//! The file is read on every lookup, so a secret set while the dev stack runs takes effect at
//! its next use, and written whole to a temporary file that replaces it, so a reader never
//! sees half a file. Layout: `{"secrets": {"<ext>": {"<user>": {"<name>": "<value>"}}}}`.
//! Values never reach a log line or an error.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use longrun::ports::{PortError, PortResult, Secret, SecretStore};

type Values = BTreeMap<String, BTreeMap<String, BTreeMap<String, String>>>;

#[derive(Default, Serialize, Deserialize)]
struct SecretsFile {
    #[serde(default)]
    secrets: Values,
}

/// Secrets in a `0600` JSON file.
#[derive(Debug, Clone)]
pub struct LocalSecrets {
    path: PathBuf,
}

impl LocalSecrets {
    /// The secrets in the file at `path` (which need not exist yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets `name` for (ext, user).
    pub fn set(&self, ext: &str, user: &str, name: &str, value: &Secret) -> PortResult<()> {
        let mut file = self.read()?;
        file.secrets
            .entry(ext.to_owned())
            .or_default()
            .entry(user.to_owned())
            .or_default()
            .insert(name.to_owned(), value.expose().to_owned());
        self.write(&file)
    }

    /// Deletes `name` for (ext, user); `false` if it was not set.
    pub fn delete(&self, ext: &str, user: &str, name: &str) -> PortResult<bool> {
        let mut file = self.read()?;
        let Some(users) = file.secrets.get_mut(ext) else {
            return Ok(false);
        };
        let Some(names) = users.get_mut(user) else {
            return Ok(false);
        };
        if names.remove(name).is_none() {
            return Ok(false);
        }
        if names.is_empty() {
            users.remove(user);
        }
        if users.is_empty() {
            file.secrets.remove(ext);
        }
        self.write(&file)?;
        Ok(true)
    }

    /// The names (never the values) set for (ext, user).
    pub fn names(&self, ext: &str, user: &str) -> PortResult<Vec<String>> {
        Ok(self
            .read()?
            .secrets
            .get(ext)
            .and_then(|users| users.get(user))
            .map(|names| names.keys().cloned().collect())
            .unwrap_or_default())
    }

    fn read(&self) -> PortResult<SecretsFile> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(SecretsFile::default());
            }
            Err(err) => return Err(self.io_error("cannot read", &err)),
        };
        warn_if_readable_by_others(&self.path);
        // serde_json's message names a line and column, never the text.
        serde_json::from_slice(&text).map_err(|err| {
            PortError::Permanent(format!(
                "{} is not a secrets file: {err}",
                self.path.display()
            ))
        })
    }

    fn write(&self, file: &SecretsFile) -> PortResult<()> {
        let text = serde_json::to_vec_pretty(file)
            .map_err(|e| PortError::Permanent(format!("secrets cannot be serialized: {e}")))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| self.io_error("cannot create the folder of", &e))?;
        }
        let tmp = self
            .path
            .with_extension(format!("tmp-{}", std::process::id()));
        let written = (|| {
            let mut out = private_file(&tmp)?;
            out.write_all(&text)?;
            out.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        if let Err(err) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.io_error("cannot write", &err));
        }
        Ok(())
    }

    fn io_error(&self, what: &str, err: &std::io::Error) -> PortError {
        PortError::Permanent(format!("{what} {}: {err}", self.path.display()))
    }
}

/// A new file only its owner can read and write.
fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        let file = options.open(path)?;
        // An existing file keeps its mode on open: set it.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        Ok(file)
    }
    #[cfg(not(unix))]
    {
        options.open(path)
    }
}

fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(path = %path.display(), "secrets file is readable by other users; chmod 600 it");
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[async_trait]
impl SecretStore for LocalSecrets {
    async fn get(&self, ext: &str, user: &str, name: &str) -> PortResult<Option<Secret>> {
        Ok(self
            .read()?
            .secrets
            .get(ext)
            .and_then(|users| users.get(user))
            .and_then(|names| names.get(name))
            .map(|value| Secret::new(value.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "longrun-secrets-{}-{name}-{}",
            std::process::id(),
            ulid::Ulid::new()
        ));
        dir.join("secrets.json")
    }

    #[tokio::test]
    async fn set_get_delete_round_trip_per_ext_and_user() {
        let path = temp_path("round-trip");
        let secrets = LocalSecrets::new(&path);
        assert_eq!(secrets.get("e", "u", "k").await.unwrap(), None);
        secrets.set("e", "u", "k", &Secret::new("v1")).unwrap();
        secrets.set("e", "other", "k", &Secret::new("v2")).unwrap();
        assert_eq!(
            secrets.get("e", "u", "k").await.unwrap(),
            Some(Secret::new("v1"))
        );
        assert_eq!(
            secrets.get("e", "other", "k").await.unwrap(),
            Some(Secret::new("v2"))
        );
        assert_eq!(secrets.get("f", "u", "k").await.unwrap(), None);
        assert_eq!(secrets.names("e", "u").unwrap(), vec!["k".to_owned()]);
        assert!(secrets.delete("e", "u", "k").unwrap());
        assert!(!secrets.delete("e", "u", "k").unwrap());
        assert_eq!(secrets.get("e", "u", "k").await.unwrap(), None);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[cfg(unix)]
    #[test]
    fn the_file_is_private_to_its_owner() {
        use std::os::unix::fs::PermissionsExt;
        let path = temp_path("mode");
        LocalSecrets::new(&path)
            .set("e", "u", "k", &Secret::new("v"))
            .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[tokio::test]
    async fn a_corrupt_file_is_an_error_that_shows_no_content() {
        let path = temp_path("corrupt");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "{\"secrets\": sk-live-123").unwrap();
        let err = LocalSecrets::new(&path)
            .get("e", "u", "k")
            .await
            .unwrap_err();
        assert!(matches!(err, PortError::Permanent(_)));
        assert!(!err.to_string().contains("sk-live-123"), "{err}");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
