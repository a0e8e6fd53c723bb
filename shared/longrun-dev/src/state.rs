//! The dev stack's state folder (`.longrun/` unless `--state-dir` says otherwise): the
//! DynamoDB data file, the secrets file, and `dev.json` — where the running stack listens,
//! which `--local` commands and `longrun call` read to find it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_config::{BehaviorVersion, Region};
use chrono::{DateTime, Utc};
use longrun::config::Config;
use longrun_aws::AwsClients;
use serde::{Deserialize, Serialize};

use crate::DevError;

/// The file naming the running stack.
pub const ENDPOINTS_FILE: &str = "dev.json";
/// The dynoxide database.
pub const DATABASE_FILE: &str = "dynamodb.db";
/// The secrets file.
pub const SECRETS_FILE: &str = "secrets.json";
/// How long a `--local` command waits for the stack to answer its health check.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);
/// The static credentials local clients sign with (dynoxide and the local SQS API ignore them).
const LOCAL_KEY: &str = "longrun-local";

/// The secrets file of a state folder.
pub fn secrets_file(state_dir: &Path) -> PathBuf {
    state_dir.join(SECRETS_FILE)
}

/// Creates the state folder, private to its owner, with a `.gitignore` that keeps its data
/// (secrets included) out of any repository it sits in.
pub fn create_state_dir(state_dir: &Path) -> Result<(), DevError> {
    let io = |e: std::io::Error| DevError::Other(format!("{}: {e}", state_dir.display()));
    std::fs::create_dir_all(state_dir).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    let ignore = state_dir.join(".gitignore");
    if !ignore.exists() {
        std::fs::write(
            &ignore,
            "# longrun dev state: data and secrets stay local\n*\n",
        )
        .map_err(io)?;
    }
    Ok(())
}

/// Where a running dev stack listens, and what it is called there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevEndpoints {
    /// The process id of the running dev stack.
    pub pid: u32,
    /// When the stack started.
    pub started_at: DateTime<Utc>,
    /// The chat page and its API, e.g. `http://127.0.0.1:8787`.
    pub chat_url: String,
    /// The DynamoDB API (dynoxide).
    pub dynamodb_endpoint: String,
    /// The SQS API over the in-process queues.
    pub sqs_endpoint: String,
    /// The region local clients use (`us-east-1`).
    pub region: String,
    /// The extension the stack runs.
    pub ext: String,
    /// The task table's name in its DynamoDB.
    pub table: String,
    /// The work queue's URL on the local SQS API.
    pub work_queue_url: String,
    /// The work dead-letter queue's URL on the local SQS API.
    pub work_dlq_url: String,
    /// The delivery queue's URL on the local SQS API.
    pub delivery_queue_url: String,
    /// The delivery dead-letter queue's URL on the local SQS API.
    pub delivery_dlq_url: String,
    /// The state folder's secrets file, where the stack reads per-user secrets.
    pub secrets_file: PathBuf,
}

impl DevEndpoints {
    /// `dev.json` in `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(ENDPOINTS_FILE)
    }

    /// What `dev.json` says, if it exists.
    pub fn read(state_dir: &Path) -> Result<Option<Self>, DevError> {
        let path = Self::path(state_dir);
        match std::fs::read(&path) {
            Ok(text) => serde_json::from_slice(&text).map(Some).map_err(|e| {
                DevError::Config(format!(
                    "{} is not a dev stack description ({e}); stop any `longrun dev` and delete it",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DevError::Other(format!("{}: {e}", path.display()))),
        }
    }

    /// The stack running for `state_dir`: `dev.json`, checked by asking the stack.
    pub async fn running(state_dir: &Path) -> Result<Self, DevError> {
        let not_running = || {
            DevError::Config(format!(
                "no dev stack is running for {} — start one with `longrun dev` (in this folder, or pass --state-dir)",
                state_dir.display()
            ))
        };
        let endpoints = Self::read(state_dir)?.ok_or_else(not_running)?;
        if !is_alive(&endpoints.chat_url).await {
            return Err(not_running());
        }
        Ok(endpoints)
    }

    /// Writes `dev.json`.
    pub fn write(&self, state_dir: &Path) -> Result<(), DevError> {
        let path = Self::path(state_dir);
        let text = serde_json::to_vec_pretty(self).map_err(|e| DevError::Other(e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| DevError::Other(format!("{}: {e}", path.display())))
    }

    /// Removes `dev.json` if it still describes this process's stack.
    pub fn remove(&self, state_dir: &Path) {
        if let Ok(Some(current)) = Self::read(state_dir)
            && current.pid == self.pid
            && current.chat_url == self.chat_url
        {
            let _ = std::fs::remove_file(Self::path(state_dir));
        }
    }

    /// The deployment configuration of the stack.
    pub fn config(&self) -> Config {
        Config {
            table: self.table.clone(),
            work_queue_url: self.work_queue_url.clone(),
            delivery_queue_url: self.delivery_queue_url.clone(),
            work_dlq_url: Some(self.work_dlq_url.clone()),
            delivery_dlq_url: Some(self.delivery_dlq_url.clone()),
            chat_api_url: Some(self.chat_url.clone()),
            chat_token_secret: None,
            secrets_prefix: "longrun".to_owned(),
            task_ttl: Duration::from_secs(30 * 86_400),
        }
    }

    /// AWS clients for the stack: DynamoDB on dynoxide, SQS on the stack's queue API. The
    /// Secrets Manager client points at the stack too, so nothing can reach AWS by mistake;
    /// local secrets live in the secrets file.
    pub async fn clients(&self) -> AwsClients {
        let sdk = local_sdk_config(&self.region).await;
        AwsClients {
            dynamodb: dynamodb_client(&sdk, &self.dynamodb_endpoint),
            sqs: aws_sdk_sqs::Client::from_conf(
                aws_sdk_sqs::config::Builder::from(&sdk)
                    .endpoint_url(&self.sqs_endpoint)
                    .build(),
            ),
            secrets: longrun_aws::AwsClients::new(
                &sdk.to_builder()
                    .endpoint_url(format!("{}/no-secrets-manager-locally", self.chat_url))
                    .build(),
            )
            .secrets,
        }
    }
}

/// The SDK configuration of local clients: the region, static credentials, nothing read from
/// the developer's AWS profile.
pub async fn local_sdk_config(region: &str) -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            LOCAL_KEY,
            LOCAL_KEY,
            None,
            None,
            "longrun-dev",
        ))
        .load()
        .await
}

/// A DynamoDB client for `endpoint`. The endpoint is set on the client, so an
/// `AWS_ENDPOINT_URL_DYNAMODB` in the environment cannot send it elsewhere.
pub fn dynamodb_client(sdk: &aws_config::SdkConfig, endpoint: &str) -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(sdk)
            .endpoint_url(endpoint)
            .build(),
    )
}

/// Whether a dev stack answers at `chat_url`.
pub async fn is_alive(chat_url: &str) -> bool {
    let Ok(client) = reqwest::Client::builder().timeout(HEALTH_TIMEOUT).build() else {
        return false;
    };
    match client.get(format!("{chat_url}/api/health")).send().await {
        Ok(response) => response.status().is_success(),
        Err(_) => false,
    }
}
