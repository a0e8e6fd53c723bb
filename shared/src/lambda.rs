//! Lambda glue: cold-start set-up and the four handlers that turn Lambda events into calls to
//! the pipeline steps. A function's `main` is `init` plus `run(service_fn(..))`; everything
//! here is callable from tests with `LambdaEvent::new(payload, Context::default())`.

use std::time::{Duration, SystemTime};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{Diagnostic, LambdaEvent};
use serde_json::Value;
use tokio::time::Instant;

use crate::aws::{AwsClients, InitError, chat_from_config, services};
use crate::config::Config;
use crate::ports::PortError;
use crate::worker::QueueRecord;
use crate::{Extension, Runtime, Settings, delivery, intake, sweeper, worker};

/// JSON logs for CloudWatch, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_target(false)
        .without_time() // CloudWatch stamps every line
        .with_current_span(false)
        .init();
}

/// What a function holds from cold start on.
#[derive(Clone)]
pub struct Function {
    pub rt: Runtime,
    pub clients: AwsClients,
    pub config: Config,
}

/// Which function is starting: delivery alone needs the chat API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Intake,
    Worker,
    Delivery,
    Sweeper,
}

/// Cold start: checks the configuration (naming any missing variable), builds the AWS clients
/// once and wires the extension to them.
pub async fn init(extension: Extension, role: Role) -> Result<Function, InitError> {
    let extension = extension.validated()?;
    let config = Config::from_env()?;
    let settings = Settings::from_env()?;
    let clients = AwsClients::from_env().await;
    let http = reqwest::Client::new();
    let chat: Option<std::sync::Arc<dyn crate::ports::ChatApi>> = match role {
        Role::Delivery => Some(std::sync::Arc::new(
            chat_from_config(&clients, &config, http).await?,
        )),
        _ => None,
    };
    let rt = Runtime::new(extension, services(&clients, &config, chat), settings);
    tracing::info!(ext = rt.extension.name(), ?role, table = %config.table, "cold start");
    Ok(Function {
        rt,
        clients,
        config,
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
pub async fn intake(rt: &Runtime, event: LambdaEvent<Value>) -> Result<Value, Diagnostic> {
    let response = intake::handle(rt, event.payload).await;
    serde_json::to_value(response).map_err(|e| Diagnostic {
        error_type: "SerializeResponse".into(),
        error_message: e.to_string(),
    })
}

/// Worker: a batch of work messages; failures are reported per message.
pub async fn worker(
    rt: &Runtime,
    event: LambdaEvent<SqsEvent>,
) -> Result<SqsBatchResponse, Diagnostic> {
    let deadline = deadline(&event.context);
    Ok(batch_response(
        worker::handle_batch(rt, records(event.payload), deadline).await,
    ))
}

/// Delivery: a batch of delivery messages; failures are reported per message.
pub async fn delivery(
    rt: &Runtime,
    event: LambdaEvent<SqsEvent>,
) -> Result<SqsBatchResponse, Diagnostic> {
    Ok(batch_response(
        delivery::handle_batch(rt, records(event.payload)).await,
    ))
}

/// What one scheduled sweep did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SweepSummary {
    pub requeued: usize,
    pub ended: usize,
    pub dead_letters_ended: usize,
}

/// Sweeper: revive expired leases, then end the tasks of dead-lettered work messages.
pub async fn sweeper(
    function: &Function,
    _event: LambdaEvent<Value>,
) -> Result<SweepSummary, Diagnostic> {
    let report = sweeper::sweep(&function.rt).await.map_err(diagnostic)?;
    let mut dead_letters_ended = 0;
    if let Some(dlq) = &function.config.work_dlq_url {
        let sqs = &function.clients.sqs;
        loop {
            let messages = crate::aws::sqs::receive(sqs, dlq, 10, 0, Some(60))
                .await
                .map_err(diagnostic)?;
            if messages.is_empty() {
                break;
            }
            for message in messages {
                sweeper::work_dead_lettered(&function.rt, &message.body)
                    .await
                    .map_err(diagnostic)?;
                crate::aws::sqs::delete(sqs, dlq, &message.receipt_handle)
                    .await
                    .map_err(diagnostic)?;
                dead_letters_ended += 1;
            }
        }
    }
    Ok(SweepSummary {
        requeued: report.requeued,
        ended: report.ended,
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
    use crate::testkit::*;

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
        let answer = intake(&stack.rt, event).await.unwrap();
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
        let response = worker(&stack.rt, LambdaEvent::new(event, Context::default()))
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
        let response = delivery(&stack.rt, LambdaEvent::new(event, Context::default()))
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
        stack.chat.script([crate::ports::ChatOutcome::Unavailable {
            reason: "503".into(),
        }]);
        let body =
            serde_json::to_string(&crate::wire::DeliveryMessage::Result { task_id }).unwrap();
        let event: SqsEvent = serde_json::from_value(json!({"Records": [
            {"messageId": "m-1", "body": body, "attributes": {"ApproximateReceiveCount": "2"}, "messageAttributes": {}}
        ]}))
        .unwrap();
        let response = delivery(&stack.rt, LambdaEvent::new(event, Context::default()))
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
