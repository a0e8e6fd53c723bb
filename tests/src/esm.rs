//! An event-source-mapping player: what Lambda's SQS poller does between a queue and a
//! function, played against moto and `cargo lambda watch`.
//!
//! For each mapping it receives up to 10 messages (real `ReceiveMessage`, long polling),
//! invokes the function with a real `SqsEvent` JSON batch (`messageId`, `receiptHandle`,
//! `body`, `attributes.ApproximateReceiveCount`, `eventSource`, `eventSourceARN`, …), then
//! deletes the records the function did not name in `batchItemFailures`. A function error,
//! a timeout or a malformed response leaves the whole batch for redelivery after the
//! visibility timeout; a partial failure naming an id that is not in the batch fails the
//! whole batch too, as Lambda does. Messages received more than the queue's
//! `maxReceiveCount` times end in its dead-letter queue (SQS — moto — moves them; the player
//! moves any it is handed anyway). Several batches run at once, as Lambda scales out.
//!
//! Faults: every batch can be delivered `copies` extra times (the first copy concurrently
//! with the original, the others after it returned — SQS's at-least-once delivery, same
//! message ids), and a batch's records can be reordered.
//!
//! A scheduler invokes a function with an EventBridge scheduled event at a fixed period (the
//! sweeper's `rate(1 minute)`, faster).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName,
};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::watch::{Invoked, Invoker};

/// Lambda's largest SQS batch.
pub const MAX_BATCH: i32 = 10;

/// One queue → function mapping.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// The queue the player receives from.
    pub queue_url: String,
    /// The function it invokes with each batch, e.g. `worker`.
    pub function: String,
    /// At most this many records per invocation (1–10).
    pub batch_size: i32,
    /// At most this many invocations at once.
    pub max_concurrency: usize,
    /// The function timeout: an invocation without an answer by then has failed.
    pub timeout: Duration,
}

/// Faults injected into one mapping's deliveries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// How many extra times each batch is delivered.
    pub copies: usize,
    /// Reverse each batch's record order.
    pub reorder: bool,
    /// Receive nothing while set: messages gather in the queue, and the first receive after
    /// it is cleared hands them out together (one batch of up to the batch size).
    pub hold: bool,
}

/// What one mapping did so far.
#[derive(Debug, Default)]
pub struct MappingStats {
    /// Invocations, copies included.
    pub invocations: AtomicUsize,
    /// Records handed to the function, copies included.
    pub records: AtomicUsize,
    /// Records handed to the function as extra copies ([`Faults::copies`]).
    pub duplicated: AtomicUsize,
    /// Records named in `batchItemFailures`.
    pub reported_failures: AtomicUsize,
    /// Invocations that errored, timed out or answered something that is not a batch response.
    pub failed_invocations: AtomicUsize,
    /// Messages deleted from the queue.
    pub deleted: AtomicUsize,
    /// Messages the player itself moved to the dead-letter queue.
    pub dead_lettered: AtomicUsize,
}

impl MappingStats {
    fn add(counter: &AtomicUsize, n: usize) {
        counter.fetch_add(n, Ordering::SeqCst);
    }
}

/// Snapshot of [`MappingStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Invocations, copies included.
    pub invocations: usize,
    /// Records handed to the function, copies included.
    pub records: usize,
    /// Records handed to the function as extra copies ([`Faults::copies`]).
    pub duplicated: usize,
    /// Records named in `batchItemFailures`.
    pub reported_failures: usize,
    /// Invocations that errored, timed out or answered something that is not a batch response.
    pub failed_invocations: usize,
    /// Messages deleted from the queue.
    pub deleted: usize,
    /// Messages the player itself moved to the dead-letter queue.
    pub dead_lettered: usize,
}

struct Running {
    faults: Arc<Mutex<Faults>>,
    stats: Arc<MappingStats>,
    handle: tokio::task::JoinHandle<()>,
}

/// The running player. Stops (and abandons in-flight invocations) when dropped.
pub struct Player {
    mappings: HashMap<String, Running>,
    schedules: Vec<tokio::task::JoinHandle<()>>,
}

impl Player {
    /// A player with no mappings yet.
    pub fn new() -> Self {
        Self {
            mappings: HashMap::new(),
            schedules: Vec::new(),
        }
    }

    /// Starts polling `mapping.queue_url` for `mapping.function`.
    pub async fn map(
        &mut self,
        sqs: aws_sdk_sqs::Client,
        invoker: Invoker,
        mapping: Mapping,
    ) -> Result<(), String> {
        let queue = QueueInfo::read(&sqs, &mapping.queue_url).await?;
        let faults = Arc::new(Mutex::new(Faults::default()));
        let stats = Arc::new(MappingStats::default());
        let poller = Poller {
            sqs,
            invoker,
            mapping: mapping.clone(),
            queue,
            faults: Arc::clone(&faults),
            stats: Arc::clone(&stats),
        };
        let handle = tokio::spawn(poller.run());
        self.mappings.insert(
            mapping.function.clone(),
            Running {
                faults,
                stats,
                handle,
            },
        );
        Ok(())
    }

    /// Invokes `function` with an EventBridge scheduled event every `period`.
    pub fn schedule(&mut self, invoker: Invoker, function: &str, period: Duration) {
        let function = function.to_owned();
        self.schedules.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let event = scheduled_event(&function);
                let _ = invoker
                    .invoke_json(&function, &event, Duration::from_secs(60))
                    .await;
            }
        }));
    }

    /// Sets the faults of the mapping to `function`.
    pub fn set_faults(&self, function: &str, faults: Faults) {
        if let Some(running) = self.mappings.get(function) {
            *running.faults.lock().unwrap_or_else(|p| p.into_inner()) = faults;
        }
    }

    /// What the mapping to `function` did so far.
    pub fn stats(&self, function: &str) -> Option<StatsSnapshot> {
        let s = &self.mappings.get(function)?.stats;
        let get = |c: &AtomicUsize| c.load(Ordering::SeqCst);
        Some(StatsSnapshot {
            invocations: get(&s.invocations),
            records: get(&s.records),
            duplicated: get(&s.duplicated),
            reported_failures: get(&s.reported_failures),
            failed_invocations: get(&s.failed_invocations),
            deleted: get(&s.deleted),
            dead_lettered: get(&s.dead_lettered),
        })
    }
}

impl Default for Player {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Player {
    fn drop(&mut self) {
        for running in self.mappings.values() {
            running.handle.abort();
        }
        for schedule in &self.schedules {
            schedule.abort();
        }
    }
}

/// What the player needs to know about a queue.
#[derive(Debug, Clone)]
struct QueueInfo {
    arn: String,
    /// `(dead-letter queue URL, maxReceiveCount)` from the redrive policy.
    redrive: Option<(String, u32)>,
}

impl QueueInfo {
    async fn read(sqs: &aws_sdk_sqs::Client, url: &str) -> Result<Self, String> {
        let attributes = sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::All)
            .send()
            .await
            .map_err(|e| format!("GetQueueAttributes {url}: {e:?}"))?;
        let attributes = attributes.attributes().cloned().unwrap_or_default();
        let arn = attributes
            .get(&QueueAttributeName::QueueArn)
            .cloned()
            .ok_or_else(|| format!("{url} has no QueueArn"))?;
        let redrive = match attributes.get(&QueueAttributeName::RedrivePolicy) {
            Some(policy) => {
                let policy: Value = serde_json::from_str(policy)
                    .map_err(|e| format!("RedrivePolicy of {url}: {e}"))?;
                let max = match &policy["maxReceiveCount"] {
                    Value::Number(n) => n.as_u64().unwrap_or(5) as u32,
                    Value::String(s) => s.parse().unwrap_or(5),
                    _ => 5,
                };
                let dlq_arn = policy["deadLetterTargetArn"].as_str().unwrap_or_default();
                let dlq_name = dlq_arn.rsplit(':').next().unwrap_or_default();
                let dlq_url = sqs
                    .get_queue_url()
                    .queue_name(dlq_name)
                    .send()
                    .await
                    .map_err(|e| format!("GetQueueUrl {dlq_name}: {e:?}"))?
                    .queue_url()
                    .unwrap_or_default()
                    .to_owned();
                Some((dlq_url, max))
            }
            None => None,
        };
        Ok(Self { arn, redrive })
    }
}

/// A received message, as the player hands it on.
#[derive(Debug, Clone)]
struct Received {
    message_id: String,
    receipt_handle: String,
    body: String,
    md5_of_body: String,
    attributes: HashMap<String, String>,
}

impl Received {
    fn receive_count(&self) -> u32 {
        self.attributes
            .get("ApproximateReceiveCount")
            .and_then(|c| c.parse().ok())
            .unwrap_or(1)
    }
}

struct Poller {
    sqs: aws_sdk_sqs::Client,
    invoker: Invoker,
    mapping: Mapping,
    queue: QueueInfo,
    faults: Arc<Mutex<Faults>>,
    stats: Arc<MappingStats>,
}

impl Poller {
    async fn run(self) {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(this.mapping.max_concurrency.max(1)));
        let mut batches = JoinSet::new();
        loop {
            while batches.try_join_next().is_some() {}
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            if this.faults.lock().unwrap_or_else(|p| p.into_inner()).hold {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let received = match this.receive().await {
                Ok(received) => received,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let records = this.dead_letter_overdue(received).await;
            if records.is_empty() {
                continue;
            }
            let this = Arc::clone(&this);
            batches.spawn(async move {
                this.deliver(records).await;
                drop(slot);
            });
        }
    }

    async fn receive(&self) -> Result<Vec<Received>, String> {
        let output = self
            .sqs
            .receive_message()
            .queue_url(&self.mapping.queue_url)
            .max_number_of_messages(self.mapping.batch_size.clamp(1, MAX_BATCH))
            .wait_time_seconds(1)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .map_err(|e| format!("ReceiveMessage: {e:?}"))?;
        Ok(output
            .messages()
            .iter()
            .filter_map(|m| {
                Some(Received {
                    message_id: m.message_id()?.to_owned(),
                    receipt_handle: m.receipt_handle()?.to_owned(),
                    body: m.body().unwrap_or_default().to_owned(),
                    md5_of_body: m.md5_of_body().unwrap_or_default().to_owned(),
                    attributes: m
                        .attributes()
                        .map(|a| {
                            a.iter()
                                .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
                                .collect()
                        })
                        .unwrap_or_default(),
                })
            })
            .collect())
    }

    /// Moves messages received more than `maxReceiveCount` times to the dead-letter queue
    /// (in case the queue service did not); returns the others.
    async fn dead_letter_overdue(&self, received: Vec<Received>) -> Vec<Received> {
        let Some((dlq, max)) = &self.queue.redrive else {
            return received;
        };
        let mut keep = Vec::new();
        for message in received {
            if message.receive_count() > *max {
                let sent = self
                    .sqs
                    .send_message()
                    .queue_url(dlq)
                    .message_body(&message.body)
                    .send()
                    .await;
                if sent.is_ok() {
                    let _ = self
                        .sqs
                        .delete_message()
                        .queue_url(&self.mapping.queue_url)
                        .receipt_handle(&message.receipt_handle)
                        .send()
                        .await;
                    MappingStats::add(&self.stats.dead_lettered, 1);
                }
            } else {
                keep.push(message);
            }
        }
        keep
    }

    /// Invokes the function with the batch (and its copies), then deletes what succeeded.
    async fn deliver(&self, records: Vec<Received>) {
        let faults = self
            .faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut ordered = records.clone();
        if faults.reorder {
            ordered.reverse();
        }
        let reversed: Vec<Received> = records.iter().rev().cloned().collect();
        MappingStats::add(&self.stats.duplicated, records.len() * faults.copies);
        let first_copy = async {
            if faults.copies >= 1 {
                self.invoke(&reversed).await;
            }
        };
        let (outcome, ()) = tokio::join!(self.invoke(&ordered), first_copy);
        if let Some(failed) = outcome {
            let done: Vec<&Received> = records
                .iter()
                .filter(|r| !failed.contains(&r.message_id))
                .collect();
            self.delete(&done).await;
        }
        for copy in 1..faults.copies {
            let batch = if copy % 2 == 0 { &ordered } else { &reversed };
            self.invoke(batch).await;
        }
    }

    /// One invocation. `Some(failed ids)` when the function answered a valid batch
    /// response; `None` when the whole batch failed.
    async fn invoke(&self, records: &[Received]) -> Option<HashSet<String>> {
        MappingStats::add(&self.stats.invocations, 1);
        MappingStats::add(&self.stats.records, records.len());
        let event = sqs_event(records, &self.queue.arn);
        let invoked = self
            .invoker
            .invoke_json(&self.mapping.function, &event, self.mapping.timeout)
            .await;
        let failed = match &invoked {
            Invoked::Answer(body) => batch_failures(body, records),
            _ => None,
        };
        match &failed {
            Some(failed) => MappingStats::add(&self.stats.reported_failures, failed.len()),
            None => MappingStats::add(&self.stats.failed_invocations, 1),
        }
        failed
    }

    async fn delete(&self, records: &[&Received]) {
        for chunk in records.chunks(MAX_BATCH as usize) {
            let entries: Vec<DeleteMessageBatchRequestEntry> = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(&r.receipt_handle)
                        .build()
                        .ok()
                })
                .collect();
            if entries.is_empty() {
                continue;
            }
            if let Ok(output) = self
                .sqs
                .delete_message_batch()
                .queue_url(&self.mapping.queue_url)
                .set_entries(Some(entries))
                .send()
                .await
            {
                MappingStats::add(&self.stats.deleted, output.successful().len());
            }
        }
    }
}

/// The `SqsEvent` Lambda sends for `records` of the queue `arn`.
fn sqs_event(records: &[Received], arn: &str) -> Value {
    let region = arn.split(':').nth(3).unwrap_or("us-east-1");
    let records: Vec<Value> = records
        .iter()
        .map(|r| {
            json!({
                "messageId": r.message_id,
                "receiptHandle": r.receipt_handle,
                "body": r.body,
                "attributes": r.attributes,
                "messageAttributes": {},
                "md5OfBody": r.md5_of_body,
                "eventSource": "aws:sqs",
                "eventSourceARN": arn,
                "awsRegion": region,
            })
        })
        .collect();
    json!({ "Records": records })
}

/// The failed ids of a batch response, or `None` when Lambda would fail the whole batch: a
/// body that is not a batch response, or an identifier that is empty or not in the batch.
fn batch_failures(body: &str, records: &[Received]) -> Option<HashSet<String>> {
    let value: Value = serde_json::from_str(body).ok()?;
    let ids: HashSet<&str> = records.iter().map(|r| r.message_id.as_str()).collect();
    let mut failed = HashSet::new();
    match value.get("batchItemFailures") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for item in items {
                let id = item.get("itemIdentifier")?.as_str()?;
                if id.is_empty() || !ids.contains(id) {
                    return None;
                }
                failed.insert(id.to_owned());
            }
        }
        Some(_) => return None,
    }
    Some(failed)
}

/// The event EventBridge Scheduler sends a scheduled function.
pub fn scheduled_event(function: &str) -> Value {
    json!({
        "version": "0",
        "id": ulid::Ulid::new().to_string(),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "123456789012",
        "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "region": "us-east-1",
        "resources": [format!("arn:aws:events:us-east-1:123456789012:rule/{function}")],
        "detail": {}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> Received {
        Received {
            message_id: id.into(),
            receipt_handle: format!("rh-{id}"),
            body: "{}".into(),
            md5_of_body: String::new(),
            attributes: HashMap::from([("ApproximateReceiveCount".into(), "2".into())]),
        }
    }

    #[test]
    fn batch_responses_follow_lambdas_rules() {
        let records = [record("a"), record("b")];
        assert_eq!(batch_failures("{}", &records), Some(HashSet::new()));
        assert_eq!(
            batch_failures(r#"{"batchItemFailures":[]}"#, &records),
            Some(HashSet::new())
        );
        assert_eq!(
            batch_failures(
                r#"{"batchItemFailures":[{"itemIdentifier":"b"}]}"#,
                &records
            ),
            Some(HashSet::from(["b".to_owned()]))
        );
        // An unknown or empty identifier, or a body that is not JSON, fails the whole batch.
        assert_eq!(
            batch_failures(
                r#"{"batchItemFailures":[{"itemIdentifier":"z"}]}"#,
                &records
            ),
            None
        );
        assert_eq!(
            batch_failures(r#"{"batchItemFailures":[{"itemIdentifier":""}]}"#, &records),
            None
        );
        assert_eq!(batch_failures("oops", &records), None);
    }

    #[test]
    fn the_event_has_lambdas_sqs_shape() {
        let event = sqs_event(&[record("a")], "arn:aws:sqs:eu-west-1:123:q");
        let r = &event["Records"][0];
        assert_eq!(r["messageId"], "a");
        assert_eq!(r["receiptHandle"], "rh-a");
        assert_eq!(r["eventSource"], "aws:sqs");
        assert_eq!(r["eventSourceARN"], "arn:aws:sqs:eu-west-1:123:q");
        assert_eq!(r["awsRegion"], "eu-west-1");
        assert_eq!(r["attributes"]["ApproximateReceiveCount"], "2");
        let parsed: aws_lambda_events::event::sqs::SqsEvent =
            serde_json::from_value(event).unwrap();
        assert_eq!(parsed.records[0].message_id.as_deref(), Some("a"));
    }
}
