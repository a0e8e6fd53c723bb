//! longrun on AWS Lambda: one entry point, [`run`], that an extension's `main` calls.
//!
//! ```no_run
//! # fn my_extension() -> longrun::Extension { longrun::Extension::new("my-ext") }
//! #[tokio::main]
//! async fn main() -> Result<(), longrun_lambda::Error> {
//!     longrun_lambda::run(my_extension()).await
//! }
//! ```
//!
//! One binary serves the four functions. Which one a process is comes from the deployment:
//! `LONGRUN_ROLE` (`intake`, `worker`, `delivery` or `sweeper`), which `template.yaml` sets
//! per function, so each builds only the clients its role needs and runs with its own
//! least-privilege IAM role. Without `LONGRUN_ROLE` (`cargo lambda watch`, a quick
//! `cargo lambda invoke`) the role is read from each event's shape: an SQS batch from the work
//! or the delivery queue, an EventBridge schedule, or anything else for intake. Delivery and
//! the sweeper never touch the extension: they read everything from the stored task.
//!
//! Everything here is callable from tests with `LambdaEvent::new(payload, Context::default())`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};
use longrun::config::Config;
use longrun::ports::{ChatApi, PortError};
use longrun::wire::DeliveryMessage;
use longrun::worker::QueueRecord;
use longrun::{Extension, Runtime, Settings, delivery, intake, sweeper, worker};
use longrun_aws::{AwsClients, InitError, chat_from_config, services};
use serde_json::Value;
use tokio::time::Instant;

/// What `main` returns: the Lambda runtime's error.
pub type Error = lambda_runtime::Error;

/// The variable that names a function's role.
pub const ROLE_VAR: &str = "LONGRUN_ROLE";

/// Runs `extension` as the Lambda function the deployment says this process is (see the
/// crate docs), until the Lambda service stops it. A configuration mistake — a missing
/// variable, an unknown role, two functions under one name — ends the cold start with an
/// error naming it.
pub async fn run(extension: Extension) -> Result<(), Error> {
    init_tracing();
    let role = Role::from_env()?;
    let function = init(extension, role).await?;
    let function = &function;
    lambda_runtime::run(service_fn(|event: LambdaEvent<Value>| async move {
        function.handle(event).await
    }))
    .await
}

/// JSON logs for CloudWatch, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_target(false)
        .without_time() // CloudWatch stamps every line
        .with_current_span(false)
        .try_init();
}

/// Which function a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Role {
    /// Direct Invoke: `call`, `status`, `cancel`, `list`.
    Intake,
    /// The work queue's event source mapping.
    Worker,
    /// The delivery queue's event source mapping.
    Delivery,
    /// The schedule.
    Sweeper,
    /// Whatever each event's shape says (no `LONGRUN_ROLE`: local emulators).
    FromEvent,
}

impl Role {
    /// `LONGRUN_ROLE`, or [`Role::FromEvent`] when it is unset.
    pub fn from_env() -> Result<Self, InitError> {
        match std::env::var(ROLE_VAR) {
            Ok(value) if !value.trim().is_empty() => value.trim().parse(),
            _ => Ok(Self::FromEvent),
        }
    }

    fn needs_extension(self) -> bool {
        matches!(self, Self::Intake | Self::Worker | Self::FromEvent)
    }
}

impl std::str::FromStr for Role {
    type Err = InitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "intake" => Ok(Self::Intake),
            "worker" => Ok(Self::Worker),
            "delivery" => Ok(Self::Delivery),
            "sweeper" => Ok(Self::Sweeper),
            other => Err(InitError::Config(longrun::config::ConfigError::Invalid {
                name: ROLE_VAR,
                reason: format!("{other:?} is not one of intake, worker, delivery, sweeper"),
            })),
        }
    }
}

/// What a function holds from cold start on.
#[derive(Clone)]
pub struct Function {
    /// The pipeline's runtime (with the extension for intake and the worker).
    pub rt: Runtime,
    /// The AWS clients, built once.
    pub clients: AwsClients,
    /// The deployment's configuration.
    pub config: Config,
    /// The role.
    pub role: Role,
}

/// Cold start: checks the configuration (naming any missing variable), builds the AWS clients
/// once and wires the extension to them (intake and worker only).
pub async fn init(extension: Extension, role: Role) -> Result<Function, InitError> {
    let extension = extension.validated()?;
    let config = Config::from_env()?;
    let settings = Settings::from_env()?;
    let clients = AwsClients::from_env().await;
    let http = longrun_aws::tls::http_client();
    // Delivery posts into the chat; a process serving every role does so when the chat API
    // is configured (its delivery fails without).
    let posts =
        role == Role::Delivery || (role == Role::FromEvent && config.chat_api_url.is_some());
    let chat: Option<Arc<dyn ChatApi>> = if posts {
        Some(Arc::new(chat_from_config(&clients, &config, http).await?))
    } else {
        None
    };
    let services = services(&clients, &config, chat);
    let rt = if role.needs_extension() {
        Runtime::serving(extension, services, settings)
    } else {
        Runtime::new(services, settings)
    };
    tracing::info!(ext = rt.extension_name(), ?role, table = %config.table, "cold start");
    Ok(Function {
        rt,
        clients,
        config,
        role,
    })
}

impl Function {
    /// Handles one event as this function's role says (or as its shape says).
    pub async fn handle(&self, event: LambdaEvent<Value>) -> Result<Value, Diagnostic> {
        let role = match self.role {
            Role::FromEvent => role_of(&self.config, &event.payload),
            role => role,
        };
        let LambdaEvent { payload, context } = event;
        match role {
            Role::Worker | Role::Delivery => {
                let batch: SqsEvent = serde_json::from_value(payload).map_err(|e| Diagnostic {
                    error_type: "InvalidEvent".into(),
                    error_message: format!("not an SQS event: {e}"),
                })?;
                let event = LambdaEvent::new(batch, context);
                let response = if role == Role::Worker {
                    worker_batch(&self.rt, event).await?
                } else {
                    delivery_batch(&self.rt, event).await?
                };
                to_value(response)
            }
            Role::Sweeper => to_value(sweep(self, LambdaEvent::new(payload, context)).await?),
            Role::Intake | Role::FromEvent => {
                intake_event(&self.rt, LambdaEvent::new(payload, context)).await
            }
        }
    }
}

/// The role an event's shape names: an SQS batch from the work or the delivery queue (by the
/// queue's name in `eventSourceARN`, else by the message body), an EventBridge schedule, or
/// anything else for intake.
fn role_of(config: &Config, payload: &Value) -> Role {
    if payload.get("source").and_then(Value::as_str) == Some("aws.events")
        || payload.get("detail-type").and_then(Value::as_str) == Some("Scheduled Event")
    {
        return Role::Sweeper;
    }
    let Some(first) = payload
        .get("Records")
        .and_then(Value::as_array)
        .and_then(|r| r.first())
        .filter(|r| r.get("eventSource").and_then(Value::as_str) == Some("aws:sqs"))
    else {
        return Role::Intake;
    };
    let arn = first
        .get("eventSourceARN")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let queue = arn.rsplit(':').next().unwrap_or_default();
    let named = |url: &str| !queue.is_empty() && url.rsplit('/').next() == Some(queue);
    if named(&config.delivery_queue_url) {
        return Role::Delivery;
    }
    if named(&config.work_queue_url) {
        return Role::Worker;
    }
    let body = first
        .get("body")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if serde_json::from_str::<DeliveryMessage>(body).is_ok() {
        Role::Delivery
    } else {
        Role::Worker
    }
}

fn to_value<T: serde::Serialize>(response: T) -> Result<Value, Diagnostic> {
    serde_json::to_value(response).map_err(|e| Diagnostic {
        error_type: "SerializeResponse".into(),
        error_message: e.to_string(),
    })
}

/// Deadlines below this (2001-09-09 in epoch milliseconds) cannot be Lambda's absolute
/// deadline: `cargo lambda watch` sends a fixed budget (`600000`) instead, which read as a
/// time lies in 1970 and would make the worker hand every task on the moment it starts.
const EARLIEST_EPOCH_DEADLINE_MS: u64 = 1_000_000_000_000;

/// The invocation's deadline on tokio's clock.
fn deadline(context: &lambda_runtime::Context) -> Option<Instant> {
    deadline_at(context.deadline, SystemTime::now())
}

/// `deadline_ms` (the `Lambda-Runtime-Deadline-Ms` header) as seen at `now`.
fn deadline_at(deadline_ms: u64, now: SystemTime) -> Option<Instant> {
    // `Context::default()` (tests) has no deadline.
    if deadline_ms == 0 {
        return None;
    }
    let left = if deadline_ms < EARLIEST_EPOCH_DEADLINE_MS {
        Duration::from_millis(deadline_ms)
    } else {
        (SystemTime::UNIX_EPOCH + Duration::from_millis(deadline_ms))
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    };
    Some(Instant::now() + left)
}

fn records(event: SqsEvent) -> Vec<QueueRecord> {
    event
        .records
        .into_iter()
        .filter_map(|m| {
            let receive_count = m
                .attributes
                .get("ApproximateReceiveCount")
                .and_then(|c| c.parse().ok())
                .unwrap_or(1);
            Some(QueueRecord {
                message_id: m.message_id?,
                body: m.body.unwrap_or_default(),
                receive_count,
            })
        })
        .collect()
}

fn batch_response(failed: Vec<String>) -> SqsBatchResponse {
    let mut response = SqsBatchResponse::default();
    for id in failed {
        response.add_failure(id);
    }
    response
}

/// Intake: the event is any JSON; the answer is always an `IntakeResponse`.
pub async fn intake_event(rt: &Runtime, event: LambdaEvent<Value>) -> Result<Value, Diagnostic> {
    to_value(intake::handle(rt, event.payload).await)
}

/// Worker: a batch of work messages; failures are reported per message.
pub async fn worker_batch(
    rt: &Runtime,
    event: LambdaEvent<SqsEvent>,
) -> Result<SqsBatchResponse, Diagnostic> {
    let deadline = deadline(&event.context);
    Ok(batch_response(
        worker::handle_batch(rt, records(event.payload), deadline).await,
    ))
}

/// Delivery: a batch of delivery messages; failures are reported per message.
pub async fn delivery_batch(
    rt: &Runtime,
    event: LambdaEvent<SqsEvent>,
) -> Result<SqsBatchResponse, Diagnostic> {
    let deadline = deadline(&event.context);
    Ok(batch_response(
        delivery::handle_batch(rt, records(event.payload), deadline).await,
    ))
}

/// What one scheduled sweep did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SweepSummary {
    /// Tasks whose lapsed lease was revived.
    pub requeued: usize,
    /// Tasks ended because they could not finish.
    pub ended: usize,
    /// Finished tasks whose undelivered result was sent again.
    pub redelivered: usize,
    /// Tasks of dead-lettered work messages ended.
    pub dead_letters_ended: usize,
}

/// Sweeper: revive expired leases, then end the tasks of dead-lettered work messages.
pub async fn sweep(
    function: &Function,
    _event: LambdaEvent<Value>,
) -> Result<SweepSummary, Diagnostic> {
    let report = sweeper::sweep(&function.rt).await.map_err(diagnostic)?;
    let mut dead_letters_ended = 0;
    if let Some(dlq) = &function.config.work_dlq_url {
        let sqs = &function.clients.sqs;
        loop {
            let messages = longrun_aws::sqs::receive(sqs, dlq, 10, 0, Some(60))
                .await
                .map_err(diagnostic)?;
            if messages.is_empty() {
                break;
            }
            for message in messages {
                sweeper::work_dead_lettered(&function.rt, &message.body)
                    .await
                    .map_err(diagnostic)?;
                longrun_aws::sqs::delete(sqs, dlq, &message.receipt_handle)
                    .await
                    .map_err(diagnostic)?;
                dead_letters_ended += 1;
            }
        }
    }
    Ok(SweepSummary {
        requeued: report.requeued,
        ended: report.ended,
        redelivered: report.redelivered,
        dead_letters_ended,
    })
}

/// A port error as the Lambda runtime reports it: the error type says what it means.
fn diagnostic(err: PortError) -> Diagnostic {
    let error_type = match err {
        PortError::NotFound(_) => "NotFound",
        PortError::Conflict(_) => "Conflict",
        PortError::Transient(_) => "Transient",
        PortError::Permanent(_) => "Permanent",
    };
    Diagnostic {
        error_type: error_type.into(),
        error_message: err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use lambda_runtime::Context;
    use serde_json::json;

    use super::*;
    use longrun::testing::fixture::*;

    #[tokio::test(start_paused = true)]
    async fn a_deadline_is_an_epoch_time_or_the_emulators_budget() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_000);
        // Lambda: an absolute time in epoch milliseconds
        assert_eq!(
            deadline_at(1_800_000_030_000, now),
            Some(Instant::now() + Duration::from_secs(30))
        );
        // `cargo lambda watch`: 600000 is a budget, not a moment in 1970 (which left the
        // worker no time at all, so it handed every task on the moment it started)
        assert_eq!(
            deadline_at(600_000, now),
            Some(Instant::now() + Duration::from_secs(600))
        );
        // A deadline already past leaves no time; none at all means no deadline.
        assert_eq!(deadline_at(1_799_999_990_000, now), Some(Instant::now()));
        assert_eq!(deadline_at(0, now), None);
    }

    #[tokio::test(start_paused = true)]
    async fn intake_answers_an_invoke_payload() {
        let (stack, _) = stack();
        let event = LambdaEvent::new(
            call_event("sync", "u1", json!({"input": "x"})),
            Context::default(),
        );
        let answer = intake_event(&stack.rt, event).await.unwrap();
        assert_eq!(answer["status"], 200);
        assert_eq!(answer["result"]["summary"], "done inline");
    }

    #[tokio::test(start_paused = true)]
    async fn worker_and_delivery_answer_sqs_events_with_partial_failures() {
        // GIVEN a queued task, and an SQS event carrying its message and a broken one
        let (stack, _) = stack();
        stack.intake(call_event("launch", "u1", json!({}))).await;
        let body = serde_json::to_string(&stack.work.take(1)[0]).unwrap();
        let event: SqsEvent = serde_json::from_value(json!({"Records": [
            {"messageId": "ok", "body": body, "attributes": {"ApproximateReceiveCount": "1"}, "messageAttributes": {}},
            {"messageId": "junk", "body": "{", "attributes": {}, "messageAttributes": {}}
        ]}))
        .unwrap();
        // WHEN the worker handles it
        let response = worker_batch(&stack.rt, LambdaEvent::new(event, Context::default()))
            .await
            .unwrap();
        // THEN nothing is reported failed (the junk is dropped, not retried forever)
        assert!(response.batch_item_failures.is_empty());
        // AND delivery, fed the delivery queue's messages, posts the result
        let bodies: Vec<Value> = stack
            .delivery
            .take(10)
            .iter()
            .enumerate()
            .map(|(i, m)| json!({"messageId": format!("d{i}"), "body": serde_json::to_string(m).unwrap(), "attributes": {}, "messageAttributes": {}}))
            .collect();
        let event: SqsEvent = serde_json::from_value(json!({ "Records": bodies })).unwrap();
        let response = delivery_batch(&stack.rt, LambdaEvent::new(event, Context::default()))
            .await
            .unwrap();
        assert!(response.batch_item_failures.is_empty());
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_delivery_is_reported_by_message_id() {
        let (stack, _) = stack();
        let task_id = finished_job(&stack).await;
        stack.delivery.take(10);
        stack
            .chat
            .script([longrun::ports::ChatOutcome::Unavailable {
                reason: "503".into(),
            }]);
        let body =
            serde_json::to_string(&longrun::wire::DeliveryMessage::Result { task_id }).unwrap();
        let event: SqsEvent = serde_json::from_value(json!({"Records": [
            {"messageId": "m-1", "body": body, "attributes": {"ApproximateReceiveCount": "2"}, "messageAttributes": {}}
        ]}))
        .unwrap();
        let response = delivery_batch(&stack.rt, LambdaEvent::new(event, Context::default()))
            .await
            .unwrap();
        let failed: Vec<_> = response
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.clone())
            .collect();
        assert_eq!(failed, vec!["m-1".to_owned()]);
    }
}

#[cfg(test)]
mod role_tests {
    use serde_json::json;

    use super::*;

    fn config() -> Config {
        Config::from_lookup(|name| match name {
            "LONGRUN_TABLE" => Some("t".into()),
            "LONGRUN_WORK_QUEUE_URL" => Some("http://sqs/000000000000/app-WorkQueue-1".into()),
            "LONGRUN_DELIVERY_QUEUE_URL" => {
                Some("http://sqs/000000000000/app-DeliveryQueue-1".into())
            }
            _ => None,
        })
        .unwrap()
    }

    fn batch(arn: &str, body: &str) -> Value {
        json!({"Records": [{"messageId": "m", "body": body, "eventSource": "aws:sqs",
                            "eventSourceARN": arn, "attributes": {}}]})
    }

    #[test]
    fn an_events_shape_names_its_role() {
        let config = config();
        let arn = |q: &str| format!("arn:aws:sqs:us-east-1:000000000000:{q}");
        assert_eq!(
            role_of(&config, &batch(&arn("app-WorkQueue-1"), "{}")),
            Role::Worker
        );
        assert_eq!(
            role_of(&config, &batch(&arn("app-DeliveryQueue-1"), "{}")),
            Role::Delivery
        );
        // An unknown queue: the body tells (a delivery message is tagged by `kind`).
        let result = r#"{"kind":"result","task_id":"01M8997DG01YQ7K3ZC6M4T9H8P"}"#;
        assert_eq!(
            role_of(&config, &batch(&arn("other"), result)),
            Role::Delivery
        );
        assert_eq!(role_of(&config, &batch(&arn("other"), "{}")), Role::Worker);
        let schedule = json!({"source": "aws.events", "detail-type": "Scheduled Event"});
        assert_eq!(role_of(&config, &schedule), Role::Sweeper);
        for intake in [
            json!({"action": "list", "ext": "e", "user": "u"}),
            json!({"Records": []}),
            json!([1, 2]),
            Value::Null,
        ] {
            assert_eq!(role_of(&config, &intake), Role::Intake, "{intake}");
        }
    }

    #[test]
    fn longrun_role_names_one_of_four() {
        assert_eq!("worker".parse::<Role>().unwrap(), Role::Worker);
        let err = "workers".parse::<Role>().err().unwrap();
        assert!(err.to_string().contains("LONGRUN_ROLE"), "{err}");
        assert!(Role::Intake.needs_extension() && Role::Worker.needs_extension());
        assert!(!Role::Delivery.needs_extension() && !Role::Sweeper.needs_extension());
    }
}
