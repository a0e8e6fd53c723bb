//! AWS adapters for the ports: DynamoDB (tasks, audit, store), SQS (work and delivery
//! queues), Secrets Manager (per-user secrets) and the chat API over HTTPS. This module is
//! the only place an AWS SDK type appears; everything leaves it as a [`PortError`].

pub mod chat;
pub mod dynamodb;
pub mod secrets;
pub mod sqs;
pub mod tls;

use std::fmt::Debug;

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};

use longrun::ports::PortError;

/// Error codes that mean "try again later", across DynamoDB, SQS and Secrets Manager.
const TRANSIENT_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "InternalServerError",
    "InternalFailure",
    "InternalServiceError",
    "ServiceUnavailable",
    "TransactionInProgressException",
    "KMSThrottlingException",
    "AWS.SimpleQueueService.ServiceUnavailable",
    "RequestThrottled",
];

/// Maps an SDK error to its meaning. `what` names the operation for the message.
pub(crate) fn port_error<E, R>(what: &str, err: SdkError<E, R>) -> PortError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: Debug,
{
    match &err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            let code = e.code().unwrap_or("Unknown");
            let message = format!("{what}: {code}: {}", e.message().unwrap_or_default());
            match code {
                "ConditionalCheckFailedException" | "TransactionConflictException" => {
                    PortError::Conflict(message)
                }
                "ResourceNotFoundException"
                | "AWS.SimpleQueueService.NonExistentQueue"
                | "QueueDoesNotExist" => PortError::NotFound(message),
                code if TRANSIENT_CODES.contains(&code) => PortError::Transient(message),
                _ => PortError::Permanent(message),
            }
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            PortError::Transient(format!("{what}: {}", error_chain(&err)))
        }
        _ => PortError::Permanent(format!("{what}: {}", error_chain(&err))),
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The AWS clients, built once per cold start from one `SdkConfig` ("SdkConfig is
/// expensive, clients are cheap").
#[derive(Clone, Debug)]
pub struct AwsClients {
    /// DynamoDB: the task table (tasks, audit items, request keys, `ctx.store`).
    pub dynamodb: aws_sdk_dynamodb::Client,
    /// SQS: the work and delivery queues and their dead-letter queues.
    pub sqs: aws_sdk_sqs::Client,
    /// Secrets Manager: per-user secrets and the chat API token.
    pub secrets: aws_sdk_secretsmanager::Client,
}

impl AwsClients {
    /// Clients for `sdk` (region, credentials and `AWS_ENDPOINT_URL*` as the SDK resolves them).
    pub fn new(sdk: &aws_config::SdkConfig) -> Self {
        Self {
            dynamodb: aws_sdk_dynamodb::Client::new(sdk),
            sqs: aws_sdk_sqs::Client::new(sdk),
            secrets: aws_sdk_secretsmanager::Client::new(sdk),
        }
    }

    /// Clients from the environment: the standard AWS variables and profile files, then
    /// [`ENDPOINT_VARS`] where set and not empty. They share one HTTPS client, whose TLS roots
    /// are loaded at its first request ([`tls::sdk_http_client`]).
    pub async fn from_env() -> Self {
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(tls::sdk_http_client())
            .load()
            .await;
        Self::new(&sdk).with_endpoints(|name| std::env::var(name).ok())
    }

    /// Points each client whose [`ENDPOINT_VARS`] entry `lookup` answers (not empty) at that
    /// endpoint.
    pub fn with_endpoints(mut self, lookup: impl Fn(&str) -> Option<String>) -> Self {
        let [dynamodb, sqs, secrets] = ENDPOINT_VARS.map(|name| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        });
        if let Some(url) = dynamodb {
            let config = self.dynamodb.config().to_builder().endpoint_url(url);
            self.dynamodb = aws_sdk_dynamodb::Client::from_conf(config.build());
        }
        if let Some(url) = sqs {
            let config = self.sqs.config().to_builder().endpoint_url(url);
            self.sqs = aws_sdk_sqs::Client::from_conf(config.build());
        }
        if let Some(url) = secrets {
            let config = self.secrets.config().to_builder().endpoint_url(url);
            self.secrets = aws_sdk_secretsmanager::Client::from_conf(config.build());
        }
        self
    }
}

/// Endpoint overrides for DynamoDB, SQS and Secrets Manager, in that order — for local
/// emulators under `sam local`, which passes a function only the variables its template
/// declares. `template.yaml` declares them empty (empty = the SDK's own resolution, which also
/// honours the standard `AWS_ENDPOINT_URL_*` variables).
pub const ENDPOINT_VARS: [&str; 3] = [
    "LONGRUN_ENDPOINT_URL_DYNAMODB",
    "LONGRUN_ENDPOINT_URL_SQS",
    "LONGRUN_ENDPOINT_URL_SECRETS_MANAGER",
];

/// The pipeline's ports on AWS, for `config`. `chat` is the chat API adapter (delivery's);
/// functions that never post pass `None`.
pub fn services(
    clients: &AwsClients,
    config: &longrun::config::Config,
    chat: Option<std::sync::Arc<dyn longrun::ports::ChatApi>>,
) -> longrun::Services {
    use std::sync::Arc;
    longrun::Services {
        tasks: Arc::new(dynamodb::DynamoTaskStore::new(
            clients.dynamodb.clone(),
            &config.table,
            config.task_ttl,
        )),
        kv: Arc::new(dynamodb::DynamoKv::new(
            clients.dynamodb.clone(),
            &config.table,
        )),
        usage: Arc::new(dynamodb::DynamoUsage::new(
            clients.dynamodb.clone(),
            &config.table,
        )),
        work: Arc::new(sqs::SqsWorkQueue::new(
            clients.sqs.clone(),
            &config.work_queue_url,
        )),
        delivery: Arc::new(sqs::SqsDeliveryQueue::new(
            clients.sqs.clone(),
            &config.delivery_queue_url,
            config.delivery_dlq_url.clone(),
        )),
        secrets: Arc::new(secrets::SecretsManagerStore::new(
            clients.secrets.clone(),
            &config.secrets_prefix,
        )),
        chat: chat.unwrap_or_else(|| Arc::new(NoChat)),
        clock: Arc::new(longrun::ports::SystemClock),
        http: tls::http_client(),
    }
}

/// The chat adapter of a function that never posts: any use is a configuration error.
struct NoChat;

#[async_trait::async_trait]
impl longrun::ports::ChatApi for NoChat {
    async fn post(
        &self,
        _: &str,
        _: &str,
        _: &longrun::wire::ChatMessage,
    ) -> longrun::ports::ChatOutcome {
        longrun::ports::ChatOutcome::Unavailable {
            reason: format!(
                "{} is not set in this function",
                longrun::config::vars::CHAT_API_URL
            ),
        }
    }
}

/// The chat adapter for `config`: the HTTP API with the bearer token read from
/// `LONGRUN_CHAT_TOKEN_SECRET` when that is set — at cold start, and again after a 401 (a
/// rotated token reaches running functions without a redeploy).
pub async fn chat_from_config(
    clients: &AwsClients,
    config: &longrun::config::Config,
    http: reqwest::Client,
) -> Result<chat::HttpChat, InitError> {
    let url = config.require_chat_api_url()?;
    let token = match &config.chat_token_secret {
        Some(name) => Some(
            secrets::get_plain(&clients.secrets, name)
                .await?
                .ok_or_else(|| InitError::ChatToken(name.clone()))?,
        ),
        None => None,
    };
    let chat = chat::HttpChat::new(http, url, token);
    Ok(match &config.chat_token_secret {
        Some(name) => {
            let (client, name) = (clients.secrets.clone(), name.clone());
            chat.refreshing_with(std::sync::Arc::new(move || {
                let (client, name) = (client.clone(), name.clone());
                Box::pin(async move { secrets::get_plain(&client, &name).await })
            }))
        }
        None => chat,
    })
}

/// Why a function could not start.
#[derive(thiserror::Error)]
pub enum InitError {
    /// A `LONGRUN_*` variable is missing or malformed.
    #[error(transparent)]
    Config(#[from] longrun::config::ConfigError),
    /// The secret named by `LONGRUN_CHAT_TOKEN_SECRET` (held here) does not exist.
    #[error("the chat token secret {0:?} does not exist")]
    ChatToken(String),
    /// An AWS call made while starting (reading the chat token) failed.
    #[error(transparent)]
    Port(#[from] PortError),
    /// The extension's registrations were refused.
    #[error(transparent)]
    Extension(#[from] longrun::InvalidExtension),
}

/// `main` prints its error with `Debug`: make that the readable message.
impl std::fmt::Debug for InitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SDK configuration `AwsClients::from_env` loads (its HTTPS client), for a test region.
    async fn sdk() -> aws_config::SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(tls::sdk_http_client())
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
                "testing", "testing", None, None, "test",
            ))
            .load()
            .await
    }

    #[tokio::test]
    async fn an_endpoint_variable_sends_its_service_there() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        // DynamoDB's set (spaces around it are trimmed), SQS's empty: SQS keeps the SDK's.
        let clients = AwsClients::new(&sdk().await).with_endpoints(|name| match name {
            "LONGRUN_ENDPOINT_URL_DYNAMODB" => Some(format!(" {url} ")),
            "LONGRUN_ENDPOINT_URL_SQS" => Some("  ".into()),
            _ => None,
        });
        tokio::select! {
            accepted = listener.accept() => assert!(accepted.is_ok()),
            answered = clients.dynamodb.list_tables().send() => {
                panic!("the request went elsewhere: {answered:?}")
            }
        }
    }
}
