//! `Config`: the deployment's settings, read once from the environment at cold start. The
//! names are the same in `template.yaml`, the functions and the `longrun` CLI.

use std::time::Duration;

/// A variable that is missing or malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A required variable is unset or blank; holds its name.
    #[error("environment variable {0} is not set")]
    Missing(&'static str),
    /// A variable is set but its value cannot be used.
    #[error("environment variable {name} is invalid: {reason}")]
    Invalid {
        /// The variable's name, e.g. `LONGRUN_TASK_TTL_DAYS`.
        name: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
}

/// The deployment's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `LONGRUN_TABLE`: the task table.
    pub table: String,
    /// `LONGRUN_WORK_QUEUE_URL`.
    pub work_queue_url: String,
    /// `LONGRUN_DELIVERY_QUEUE_URL`.
    pub delivery_queue_url: String,
    /// `LONGRUN_WORK_DLQ_URL`: the work queue's dead-letter queue (sweeper, CLI).
    pub work_dlq_url: Option<String>,
    /// `LONGRUN_DELIVERY_DLQ_URL`: the delivery queue's dead-letter queue.
    pub delivery_dlq_url: Option<String>,
    /// `LONGRUN_CHAT_API_URL`: where delivery posts (delivery only).
    pub chat_api_url: Option<String>,
    /// `LONGRUN_CHAT_TOKEN_SECRET`: the Secrets Manager secret holding the chat API token.
    pub chat_token_secret: Option<String>,
    /// `LONGRUN_SECRETS_PREFIX`: where per-user secrets live (default `longrun`).
    pub secrets_prefix: String,
    /// `LONGRUN_TASK_TTL_DAYS`: how long finished tasks are kept (default 30).
    pub task_ttl: Duration,
}

/// The variable names, for templates and scripts.
pub mod vars {
    /// Holds the name of the DynamoDB task table (required).
    pub const TABLE: &str = "LONGRUN_TABLE";
    /// Holds the URL of the SQS work queue, which feeds the worker (required).
    pub const WORK_QUEUE_URL: &str = "LONGRUN_WORK_QUEUE_URL";
    /// Holds the URL of the SQS delivery queue, which feeds delivery (required).
    pub const DELIVERY_QUEUE_URL: &str = "LONGRUN_DELIVERY_QUEUE_URL";
    /// Holds the URL of the work queue's dead-letter queue (optional; sweeper, CLI).
    pub const WORK_DLQ_URL: &str = "LONGRUN_WORK_DLQ_URL";
    /// Holds the URL of the delivery queue's dead-letter queue (optional).
    pub const DELIVERY_DLQ_URL: &str = "LONGRUN_DELIVERY_DLQ_URL";
    /// Holds the base URL of the chat platform's message API (delivery only).
    pub const CHAT_API_URL: &str = "LONGRUN_CHAT_API_URL";
    /// Holds the name of the Secrets Manager secret with the chat API token.
    pub const CHAT_TOKEN_SECRET: &str = "LONGRUN_CHAT_TOKEN_SECRET";
    /// Holds the name prefix of the per-user secrets in Secrets Manager (default `longrun`).
    pub const SECRETS_PREFIX: &str = "LONGRUN_SECRETS_PREFIX";
    /// Holds how many days finished tasks are kept in the table (default 30).
    pub const TASK_TTL_DAYS: &str = "LONGRUN_TASK_TTL_DAYS";
}

/// `LONGRUN_TASK_TTL_DAYS` through `lookup`: a positive number of days, 30 when unset.
pub(crate) fn task_ttl(lookup: impl Fn(&str) -> Option<String>) -> Result<Duration, ConfigError> {
    let days = match lookup(vars::TASK_TTL_DAYS).filter(|v| !v.trim().is_empty()) {
        Some(v) => v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|d| *d > 0)
            .ok_or_else(|| ConfigError::Invalid {
                name: vars::TASK_TTL_DAYS,
                reason: format!("{v:?} is not a positive number of days"),
            })?,
        None => 30,
    };
    Ok(Duration::from_secs(days * 86_400))
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let optional = |name: &'static str| lookup(name).filter(|v| !v.trim().is_empty());
        let required = |name: &'static str| optional(name).ok_or(ConfigError::Missing(name));
        let task_ttl = task_ttl(&lookup)?;
        let secrets_prefix = optional(vars::SECRETS_PREFIX).unwrap_or_else(|| "longrun".to_owned());
        let chat_token_secret = optional(vars::CHAT_TOKEN_SECRET);
        if let Some(name) = &chat_token_secret
            && name.starts_with(&format!("{}/", secrets_prefix.trim_end_matches('/')))
        {
            return Err(ConfigError::Invalid {
                name: vars::CHAT_TOKEN_SECRET,
                reason: format!(
                    "{name:?} is under {} {secrets_prefix:?}, where intake and worker (the \
                     extension's code) may read secrets; store the chat token outside it, \
                     e.g. as \"longrun-delivery/chat-token\"",
                    vars::SECRETS_PREFIX
                ),
            });
        }
        Ok(Self {
            table: required(vars::TABLE)?,
            work_queue_url: required(vars::WORK_QUEUE_URL)?,
            delivery_queue_url: required(vars::DELIVERY_QUEUE_URL)?,
            work_dlq_url: optional(vars::WORK_DLQ_URL),
            delivery_dlq_url: optional(vars::DELIVERY_DLQ_URL),
            chat_api_url: optional(vars::CHAT_API_URL),
            chat_token_secret,
            secrets_prefix,
            task_ttl,
        })
    }

    /// `LONGRUN_CHAT_API_URL`, which delivery cannot do without.
    pub fn require_chat_api_url(&self) -> Result<&str, ConfigError> {
        self.chat_api_url
            .as_deref()
            .ok_or(ConfigError::Missing(vars::CHAT_API_URL))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn a_missing_variable_is_named() {
        let err = Config::from_lookup(env(&[(vars::TABLE, "t")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable LONGRUN_WORK_QUEUE_URL is not set"
        );
    }

    #[test]
    fn defaults_apply() {
        let config = Config::from_lookup(env(&[
            (vars::TABLE, "t"),
            (vars::WORK_QUEUE_URL, "w"),
            (vars::DELIVERY_QUEUE_URL, "d"),
        ]))
        .unwrap();
        assert_eq!(config.secrets_prefix, "longrun");
        assert_eq!(config.task_ttl, Duration::from_secs(30 * 86_400));
        assert_eq!(
            config.require_chat_api_url().unwrap_err(),
            ConfigError::Missing(vars::CHAT_API_URL)
        );
    }

    #[test]
    fn a_chat_token_where_extension_code_reads_secrets_is_refused() {
        let base = [
            (vars::TABLE, "t"),
            (vars::WORK_QUEUE_URL, "w"),
            (vars::DELIVERY_QUEUE_URL, "d"),
        ];
        for (prefix, token) in [
            (None, "longrun/chat-token"),
            (Some("ext/users"), "ext/users/t"),
        ] {
            let mut pairs = base.to_vec();
            pairs.push((vars::CHAT_TOKEN_SECRET, token));
            if let Some(prefix) = prefix {
                pairs.push((vars::SECRETS_PREFIX, prefix));
            }
            let err = Config::from_lookup(env(&pairs)).unwrap_err();
            assert!(
                matches!(err, ConfigError::Invalid { name, .. } if name == vars::CHAT_TOKEN_SECRET),
                "{err}"
            );
            assert!(
                err.to_string().contains("longrun-delivery/chat-token"),
                "{err}"
            );
        }
        // A name that only starts with the same letters is elsewhere.
        let mut pairs = base.to_vec();
        pairs.push((vars::CHAT_TOKEN_SECRET, "longrun-delivery/chat-token"));
        let config = Config::from_lookup(env(&pairs)).unwrap();
        assert_eq!(
            config.chat_token_secret.as_deref(),
            Some("longrun-delivery/chat-token")
        );
    }

    #[test]
    fn a_bad_ttl_is_refused() {
        let err = Config::from_lookup(env(&[
            (vars::TABLE, "t"),
            (vars::WORK_QUEUE_URL, "w"),
            (vars::DELIVERY_QUEUE_URL, "d"),
            (vars::TASK_TTL_DAYS, "soon"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("LONGRUN_TASK_TTL_DAYS"));
    }
}
