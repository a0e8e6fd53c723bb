//! AWS adapters for the ports: DynamoDB (tasks, audit, store), SQS (work and delivery
//! queues), Secrets Manager (per-user secrets) and the chat API over HTTPS. This module is
//! the only place an AWS SDK type appears; everything leaves it as a [`PortError`].

pub mod chat;
pub mod dynamodb;
pub mod secrets;
pub mod sqs;

use std::fmt::Debug;

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};

use crate::ports::PortError;

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
    "LimitExceededException",
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
