//! SQS: the work and delivery queues behind [`WorkQueue`] and [`DeliveryQueue`], batch sends
//! for the sweeper and the CLI, the queue layout `longrun bootstrap` creates (and the numbers
//! `template.yaml` must agree with), and the dead-letter tools (`receive`, `delete`,
//! `redrive`, `depth`) behind the sweeper and `longrun dlq`.
//!
//! Every message body is the JSON of a wire message; nothing rides in message attributes,
//! so the body size is the whole message size SQS checks.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use serde::Serialize;

use super::port_error;
use longrun::config::vars;
use longrun::ports::{DeliveryQueue, MAX_QUEUE_DELAY, PortError, PortResult, WorkQueue};
use longrun::wire::{DeliveryMessage, WorkMessage};

/// Largest message SQS accepts (1 MiB), and also the most one `SendMessageBatch` may carry
/// in all.
pub const MAX_MESSAGE_BYTES: usize = 1_048_576;
/// Most entries in one `SendMessageBatch`, `DeleteMessageBatch` or `ReceiveMessage`.
pub const MAX_BATCH_ENTRIES: usize = 10;

/// The worker function's timeout (Lambda's maximum).
pub const WORKER_TIMEOUT_S: u32 = 900;
/// The delivery function's timeout.
pub const DELIVERY_TIMEOUT_S: u32 = 30;
/// Work queue visibility timeout: AWS asks for at least 6 × the function timeout on a queue
/// behind an event source mapping, so a message is not handed out again while the batch that
/// holds it may still be running (or being retried after throttling).
pub const WORK_VISIBILITY_TIMEOUT_S: u32 = 6 * WORKER_TIMEOUT_S;
/// Delivery queue visibility timeout: 6 × the delivery function timeout.
pub const DELIVERY_VISIBILITY_TIMEOUT_S: u32 = 6 * DELIVERY_TIMEOUT_S;
/// How long the work and delivery queues keep a message (4 days, SQS's default).
pub const QUEUE_RETENTION_S: u32 = 345_600;
/// How long the dead-letter queues keep a message (14 days, the maximum): longer than the
/// source queue, because a standard queue's message keeps its original enqueue time when it
/// is dead-lettered, and an operator needs time to look.
pub const DLQ_RETENTION_S: u32 = 1_209_600;
/// Receives after which SQS moves a message to the dead-letter queue.
pub const MAX_RECEIVE_COUNT: u32 = 5;

/// How long messages taken by [`redrive`] stay hidden from other consumers: long enough to
/// send and delete a batch, short enough that a crashed redrive hands them back soon.
const REDRIVE_VISIBILITY_TIMEOUT_S: i32 = 60;
/// [`redrive`] long-polls for one second: a short poll samples only some SQS servers and may
/// answer "empty" while messages remain, which would end the redrive early.
const REDRIVE_WAIT_S: i32 = 1;
/// Longest SQS queue name.
const MAX_QUEUE_NAME_CHARS: usize = 80;

/// The work queue on SQS.
#[derive(Debug, Clone)]
pub struct SqsWorkQueue {
    client: Client,
    url: String,
}

impl SqsWorkQueue {
    /// The queue at `url` (`LONGRUN_WORK_QUEUE_URL`).
    pub fn new(client: Client, url: impl Into<String>) -> Self {
        Self {
            client,
            url: url.into(),
        }
    }
}

#[async_trait]
impl WorkQueue for SqsWorkQueue {
    async fn send(&self, message: &WorkMessage) -> PortResult<()> {
        self.send_after(message, Duration::ZERO).await
    }

    async fn send_after(&self, message: &WorkMessage, delay: Duration) -> PortResult<()> {
        let body = to_body("work message", message)?;
        let delay_s = delay_seconds(delay);
        send_delayed(&self.client, &self.url, body, delay_s).await?;
        tracing::debug!(task_id = %message.task_id, ext = %message.ext, user = %message.user, delay_s, "work message sent");
        Ok(())
    }
}

/// The delivery queue on SQS, with its dead-letter queue for messages that can never be
/// delivered.
#[derive(Debug, Clone)]
pub struct SqsDeliveryQueue {
    client: Client,
    url: String,
    dlq_url: Option<String>,
}

impl SqsDeliveryQueue {
    /// The queue at `url` (`LONGRUN_DELIVERY_QUEUE_URL`) and its dead-letter queue
    /// (`LONGRUN_DELIVERY_DLQ_URL`), if configured.
    pub fn new(client: Client, url: impl Into<String>, dlq_url: Option<String>) -> Self {
        Self {
            client,
            url: url.into(),
            dlq_url,
        }
    }
}

#[async_trait]
impl DeliveryQueue for SqsDeliveryQueue {
    async fn send(&self, message: &DeliveryMessage) -> PortResult<()> {
        let body = to_body("delivery message", message)?;
        send_one(&self.client, &self.url, body).await?;
        tracing::debug!(task_id = %message.task_id(), key = %message.idempotency_key(), "delivery message sent");
        Ok(())
    }

    async fn dead_letter(&self, message: &DeliveryMessage) -> PortResult<()> {
        let Some(dlq_url) = &self.dlq_url else {
            return Err(PortError::Permanent(format!(
                "cannot dead-letter delivery message {}: {} is not set",
                message.idempotency_key(),
                vars::DELIVERY_DLQ_URL
            )));
        };
        let body = to_body("delivery message", message)?;
        send_one(&self.client, dlq_url, body).await?;
        tracing::warn!(task_id = %message.task_id(), key = %message.idempotency_key(), "delivery message dead-lettered");
        Ok(())
    }
}

fn to_body(what: &str, message: &impl Serialize) -> PortResult<String> {
    let body = serde_json::to_string(message)
        .map_err(|e| PortError::Permanent(format!("{what}: cannot serialize: {e}")))?;
    check_size(what, &body)?;
    Ok(body)
}

fn check_size(what: &str, body: &str) -> PortResult<()> {
    if body.len() > MAX_MESSAGE_BYTES {
        return Err(PortError::Permanent(format!(
            "{what}: {} bytes exceeds the SQS message limit of {MAX_MESSAGE_BYTES} bytes",
            body.len()
        )));
    }
    Ok(())
}

async fn send_one(client: &Client, url: &str, body: String) -> PortResult<()> {
    send_delayed(client, url, body, 0).await
}

/// `DelaySeconds` for `delay`: whole seconds, rounded up so a message never arrives early
/// by a fraction, at most [`MAX_QUEUE_DELAY`].
pub fn delay_seconds(delay: Duration) -> i32 {
    let capped = delay.min(MAX_QUEUE_DELAY);
    let whole = capped.as_secs() + u64::from(capped.subsec_nanos() > 0);
    i32::try_from(whole).unwrap_or(0)
}

async fn send_delayed(client: &Client, url: &str, body: String, delay_s: i32) -> PortResult<()> {
    let mut request = client.send_message().queue_url(url).message_body(body);
    if delay_s > 0 {
        request = request.delay_seconds(delay_s);
    }
    request
        .send()
        .await
        .map_err(|e| port_error("SQS SendMessage", e))?;
    Ok(())
}

/// Sends `bodies` with `SendMessageBatch`: batches of up to 10 entries and 1 MiB; entries
/// SQS reports as failed are sent once more, then the call fails (`Transient`, or
/// `Permanent` when SQS blames the request). A body over 1 MiB fails the call before any
/// request. On failure, messages of earlier batches were sent: a retry sends them again,
/// which at-least-once consumers absorb.
pub async fn send_batch(client: &Client, url: &str, bodies: &[String]) -> PortResult<()> {
    for body in bodies {
        check_size("batch message", body)?;
    }
    let failures = send_all(client, url, bodies).await?;
    if let Some((_, first)) = failures.first() {
        let permanent = failures
            .iter()
            .any(|(_, e)| matches!(e, PortError::Permanent(_)));
        let text = format!(
            "SQS SendMessageBatch: {} of {} messages not sent after a retry; first: {first}",
            failures.len(),
            bodies.len()
        );
        return Err(if permanent {
            PortError::Permanent(text)
        } else {
            PortError::Transient(text)
        });
    }
    tracing::debug!(queue = url, count = bodies.len(), "batch sent");
    Ok(())
}

/// Sends every body in batches, retrying failed entries once. Returns the indexes (into
/// `bodies`) that still failed, with why. An error is a whole request that failed.
async fn send_all(
    client: &Client,
    url: &str,
    bodies: &[String],
) -> PortResult<Vec<(usize, PortError)>> {
    let mut failures = Vec::new();
    for chunk in chunks(bodies) {
        let failed = send_chunk(client, url, bodies, &chunk).await?;
        // SQS blames the sender for a malformed entry: sending it again cannot help.
        let (permanent, retry): (Vec<_>, Vec<_>) = failed
            .into_iter()
            .partition(|(_, e)| matches!(e, PortError::Permanent(_)));
        failures.extend(permanent);
        if !retry.is_empty() {
            let indexes: Vec<usize> = retry.iter().map(|(i, _)| *i).collect();
            tracing::warn!(
                queue = url,
                failed = indexes.len(),
                "batch entries failed; retrying once"
            );
            failures.extend(send_chunk(client, url, bodies, &indexes).await?);
        }
    }
    Ok(failures)
}

/// Groups the indexes of `bodies` into requests of at most 10 entries and 1 MiB.
fn chunks(bodies: &[String]) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut bytes = 0;
    for (i, body) in bodies.iter().enumerate() {
        if current.len() == MAX_BATCH_ENTRIES
            || (!current.is_empty() && bytes + body.len() > MAX_MESSAGE_BYTES)
        {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
        current.push(i);
        bytes += body.len();
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// One `SendMessageBatch` of `bodies[i]` for each `i` in `indexes`; the entry id is the
/// index, so a failure maps back to its body.
async fn send_chunk(
    client: &Client,
    url: &str,
    bodies: &[String],
    indexes: &[usize],
) -> PortResult<Vec<(usize, PortError)>> {
    let mut request = client.send_message_batch().queue_url(url);
    for &i in indexes {
        let entry = SendMessageBatchRequestEntry::builder()
            .id(i.to_string())
            .message_body(&bodies[i])
            .build()
            .map_err(|e| PortError::Permanent(format!("SQS SendMessageBatch entry: {e}")))?;
        request = request.entries(entry);
    }
    let output = request
        .send()
        .await
        .map_err(|e| port_error("SQS SendMessageBatch", e))?;
    let mut failed = Vec::new();
    for entry in output.failed() {
        let Ok(index) = entry.id().parse::<usize>() else {
            return Err(PortError::Permanent(format!(
                "SQS SendMessageBatch: unknown entry id {:?} in the answer",
                entry.id()
            )));
        };
        let text = format!(
            "SQS SendMessageBatch entry {index}: {}: {}",
            entry.code(),
            entry.message().unwrap_or_default()
        );
        let error = if entry.sender_fault() {
            PortError::Permanent(text)
        } else {
            PortError::Transient(text)
        };
        failed.push((index, error));
    }
    Ok(failed)
}

/// The URLs of the four queues of a deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueUrls {
    /// The work queue: tasks waiting for a worker, one work message each.
    pub work: String,
    /// The work queue's dead-letter queue: work messages received [`MAX_RECEIVE_COUNT`]
    /// times without being deleted.
    pub work_dlq: String,
    /// The delivery queue: finished tasks waiting to be posted to the chat.
    pub delivery: String,
    /// The delivery queue's dead-letter queue: delivery messages received
    /// [`MAX_RECEIVE_COUNT`] times without being deleted.
    pub delivery_dlq: String,
}

/// Creates `{prefix}-work-dlq`, `{prefix}-work`, `{prefix}-delivery-dlq` and
/// `{prefix}-delivery` with the attributes `template.yaml` declares, or brings existing ones
/// to those attributes; safe to run again. `prefix` may hold letters, digits, `-` and `_`.
pub async fn ensure_queues(client: &Client, prefix: &str) -> PortResult<QueueUrls> {
    let work_dlq = ensure_queue(client, &queue_name(prefix, "work-dlq")?, dlq_attributes()).await?;
    let work = ensure_queue(
        client,
        &queue_name(prefix, "work")?,
        main_attributes(
            WORK_VISIBILITY_TIMEOUT_S,
            &queue_arn(client, &work_dlq).await?,
        ),
    )
    .await?;
    let delivery_dlq = ensure_queue(
        client,
        &queue_name(prefix, "delivery-dlq")?,
        dlq_attributes(),
    )
    .await?;
    let delivery = ensure_queue(
        client,
        &queue_name(prefix, "delivery")?,
        main_attributes(
            DELIVERY_VISIBILITY_TIMEOUT_S,
            &queue_arn(client, &delivery_dlq).await?,
        ),
    )
    .await?;
    Ok(QueueUrls {
        work,
        work_dlq,
        delivery,
        delivery_dlq,
    })
}

fn queue_name(prefix: &str, suffix: &str) -> PortResult<String> {
    let name = format!("{prefix}-{suffix}");
    let valid = !prefix.is_empty()
        && name.len() <= MAX_QUEUE_NAME_CHARS
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        return Err(PortError::Permanent(format!(
            "queue name {name:?}: SQS allows 1 to {MAX_QUEUE_NAME_CHARS} letters, digits, '-' and '_'"
        )));
    }
    Ok(name)
}

/// The redrive policy of a queue whose dead-letter queue is `dlq_arn`, as `template.yaml`
/// writes it.
pub fn redrive_policy(dlq_arn: &str) -> String {
    serde_json::json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": MAX_RECEIVE_COUNT})
        .to_string()
}

fn dlq_attributes() -> Vec<(QueueAttributeName, String)> {
    vec![
        (
            QueueAttributeName::MessageRetentionPeriod,
            DLQ_RETENTION_S.to_string(),
        ),
        max_size_attribute(),
    ]
}

/// The size the senders check against, set rather than assumed of a queue's default.
fn max_size_attribute() -> (QueueAttributeName, String) {
    (
        QueueAttributeName::MaximumMessageSize,
        MAX_MESSAGE_BYTES.to_string(),
    )
}

fn main_attributes(visibility_s: u32, dlq_arn: &str) -> Vec<(QueueAttributeName, String)> {
    vec![
        (
            QueueAttributeName::VisibilityTimeout,
            visibility_s.to_string(),
        ),
        (
            QueueAttributeName::MessageRetentionPeriod,
            QUEUE_RETENTION_S.to_string(),
        ),
        (QueueAttributeName::RedrivePolicy, redrive_policy(dlq_arn)),
        max_size_attribute(),
    ]
}

/// The queue's URL, creating it if absent. An existing queue is set to `attributes` rather
/// than created again, because `CreateQueue` fails on a queue whose attributes differ, and
/// bootstrap should converge a deployment, not stop at its first drift.
async fn ensure_queue(
    client: &Client,
    name: &str,
    attributes: Vec<(QueueAttributeName, String)>,
) -> PortResult<String> {
    let existing = match client.get_queue_url().queue_name(name).send().await {
        Ok(found) => Some(returned_url("SQS GetQueueUrl", name, found.queue_url())?),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_queue_does_not_exist()) =>
        {
            None
        }
        Err(e) => match port_error("SQS GetQueueUrl", e) {
            PortError::NotFound(_) => None,
            other => return Err(other),
        },
    };
    if let Some(url) = existing {
        let mut request = client.set_queue_attributes().queue_url(&url);
        for (key, value) in attributes {
            request = request.attributes(key, value);
        }
        request
            .send()
            .await
            .map_err(|e| port_error("SQS SetQueueAttributes", e))?;
        tracing::info!(queue = name, url = %url, "queue exists; attributes set");
        return Ok(url);
    }
    let mut request = client.create_queue().queue_name(name);
    for (key, value) in attributes {
        request = request.attributes(key, value);
    }
    let created = request
        .send()
        .await
        .map_err(|e| port_error("SQS CreateQueue", e))?;
    let url = returned_url("SQS CreateQueue", name, created.queue_url())?;
    tracing::info!(queue = name, url = %url, "queue created");
    Ok(url)
}

fn returned_url(what: &str, name: &str, url: Option<&str>) -> PortResult<String> {
    url.filter(|u| !u.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| PortError::Permanent(format!("{what} {name}: no queue URL in the answer")))
}

/// The ARN of the queue at `url`.
pub async fn queue_arn(client: &Client, url: &str) -> PortResult<String> {
    queue_attribute(client, url, QueueAttributeName::QueueArn).await
}

async fn queue_attribute(
    client: &Client,
    url: &str,
    name: QueueAttributeName,
) -> PortResult<String> {
    let output = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(name.clone())
        .send()
        .await
        .map_err(|e| port_error("SQS GetQueueAttributes", e))?;
    output
        .attributes()
        .and_then(|a| a.get(&name))
        .cloned()
        .ok_or_else(|| {
            PortError::Permanent(format!(
                "SQS GetQueueAttributes: {url} did not report {}",
                name.as_str()
            ))
        })
}

/// A message taken from a queue, still there until [`delete`]d.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// The id SQS gave the message when it was sent.
    pub message_id: String,
    /// The handle of this receive, which [`delete`] needs; a new one each time.
    pub receipt_handle: String,
    /// The message body: the JSON of a wire message.
    pub body: String,
    /// How often SQS handed the message out, this time included.
    pub receive_count: u32,
}

impl From<&ReceivedMessage> for longrun::worker::QueueRecord {
    fn from(message: &ReceivedMessage) -> Self {
        Self {
            message_id: message.message_id.clone(),
            body: message.body.clone(),
            receive_count: message.receive_count,
        }
    }
}

/// Takes up to `max` messages (clamped to SQS's 1..=10), long-polling `wait_seconds`
/// (clamped to 0..=20), hiding them for `visibility_timeout` seconds or the queue's default.
pub async fn receive(
    client: &Client,
    url: &str,
    max: i32,
    wait_seconds: i32,
    visibility_timeout: Option<i32>,
) -> PortResult<Vec<ReceivedMessage>> {
    let output = client
        .receive_message()
        .queue_url(url)
        .max_number_of_messages(max.clamp(1, MAX_BATCH_ENTRIES as i32))
        .wait_time_seconds(wait_seconds.clamp(0, 20))
        .set_visibility_timeout(visibility_timeout)
        .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
        .send()
        .await
        .map_err(|e| port_error("SQS ReceiveMessage", e))?;
    Ok(output
        .messages()
        .iter()
        .map(|m| ReceivedMessage {
            message_id: m.message_id().unwrap_or_default().to_owned(),
            receipt_handle: m.receipt_handle().unwrap_or_default().to_owned(),
            body: m.body().unwrap_or_default().to_owned(),
            receive_count: m
                .attributes()
                .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                .and_then(|c| c.parse().ok())
                .unwrap_or(0),
        })
        .collect())
}

/// Removes a received message for good.
pub async fn delete(client: &Client, url: &str, receipt_handle: &str) -> PortResult<()> {
    client
        .delete_message()
        .queue_url(url)
        .receipt_handle(receipt_handle)
        .send()
        .await
        .map_err(|e| port_error("SQS DeleteMessage", e))?;
    Ok(())
}

/// Moves up to `max` messages from `from_url` (a dead-letter queue) to `to_url`, and returns
/// how many moved. A message is deleted from `from_url` only after `to_url` accepted it, so
/// none is lost; a crash between the two leaves a copy in both, which the idempotent
/// pipeline absorbs. Messages that could not be sent are made visible again at once.
pub async fn redrive(
    client: &Client,
    from_url: &str,
    to_url: &str,
    max: usize,
) -> PortResult<usize> {
    let mut moved = 0;
    while moved < max {
        let want = (max - moved).min(MAX_BATCH_ENTRIES) as i32;
        let received = receive(
            client,
            from_url,
            want,
            REDRIVE_WAIT_S,
            Some(REDRIVE_VISIBILITY_TIMEOUT_S),
        )
        .await?;
        if received.is_empty() {
            break;
        }
        let bodies: Vec<String> = received.iter().map(|m| m.body.clone()).collect();
        let failures = match send_all(client, to_url, &bodies).await {
            Ok(failures) => failures,
            Err(e) => {
                release(client, from_url, received.iter()).await;
                return Err(e);
            }
        };
        let failed: HashMap<usize, &PortError> = failures.iter().map(|(i, e)| (*i, e)).collect();
        let sent: Vec<&ReceivedMessage> = received
            .iter()
            .enumerate()
            .filter(|(i, _)| !failed.contains_key(i))
            .map(|(_, m)| m)
            .collect();
        delete_batch(client, from_url, &sent).await?;
        moved += sent.len();
        if let Some((_, first)) = failures.first() {
            release(
                client,
                from_url,
                received
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| failed.contains_key(i))
                    .map(|(_, m)| m),
            )
            .await;
            tracing::warn!(
                from = from_url,
                to = to_url,
                moved,
                failed = failures.len(),
                "redrive stopped"
            );
            return Err(match first {
                PortError::Permanent(m) => {
                    PortError::Permanent(format!("redrive after {moved} moved: {m}"))
                }
                other => PortError::Transient(format!("redrive after {moved} moved: {other}")),
            });
        }
    }
    tracing::info!(from = from_url, to = to_url, moved, "redrive done");
    Ok(moved)
}

/// Deletes sent messages. A message whose delete fails stays in the source queue and will be
/// moved again by the next redrive: a duplicate, never a loss.
async fn delete_batch(client: &Client, url: &str, messages: &[&ReceivedMessage]) -> PortResult<()> {
    if messages.is_empty() {
        return Ok(());
    }
    let mut request = client.delete_message_batch().queue_url(url);
    for (i, m) in messages.iter().enumerate() {
        let entry = DeleteMessageBatchRequestEntry::builder()
            .id(i.to_string())
            .receipt_handle(&m.receipt_handle)
            .build()
            .map_err(|e| PortError::Permanent(format!("SQS DeleteMessageBatch entry: {e}")))?;
        request = request.entries(entry);
    }
    let output = request
        .send()
        .await
        .map_err(|e| port_error("SQS DeleteMessageBatch", e))?;
    for entry in output.failed() {
        tracing::warn!(
            queue = url,
            code = entry.code(),
            "delete after redrive failed; the message will be redriven again"
        );
    }
    Ok(())
}

/// Makes received messages visible again, best effort: if this fails they come back when
/// their visibility timeout ends.
async fn release<'a>(
    client: &Client,
    url: &str,
    messages: impl Iterator<Item = &'a ReceivedMessage>,
) {
    for m in messages {
        let result = client
            .change_message_visibility()
            .queue_url(url)
            .receipt_handle(&m.receipt_handle)
            .visibility_timeout(0)
            .send()
            .await;
        if let Err(e) = result {
            let error = port_error("SQS ChangeMessageVisibility", e);
            tracing::warn!(queue = url, message_id = %m.message_id, %error, "could not release message");
        }
    }
}

/// The number of messages waiting to be received (`ApproximateNumberOfMessages`: messages in
/// flight are not counted).
pub async fn depth(client: &Client, url: &str) -> PortResult<u64> {
    let value =
        queue_attribute(client, url, QueueAttributeName::ApproximateNumberOfMessages).await?;
    value.parse().map_err(|_| {
        PortError::Permanent(format!(
            "SQS GetQueueAttributes: {url}: ApproximateNumberOfMessages is {value:?}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_hold_at_most_ten_entries_and_one_mib() {
        // GIVEN 25 small bodies
        let small: Vec<String> = (0..25).map(|i| i.to_string()).collect();
        // WHEN grouped THEN 10 + 10 + 5, in order
        let sizes: Vec<usize> = chunks(&small).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![10, 10, 5]);
        assert_eq!(chunks(&small).concat(), (0..25).collect::<Vec<_>>());

        // GIVEN three bodies of 400 KiB: two fit in 1 MiB, three do not
        let big: Vec<String> = (0..3).map(|_| "x".repeat(400 * 1024)).collect();
        // WHEN grouped THEN the third goes to a second request
        assert_eq!(chunks(&big), vec![vec![0, 1], vec![2]]);
    }

    #[test]
    fn the_redrive_policy_names_the_dlq_and_the_receive_count() {
        let policy: serde_json::Value =
            serde_json::from_str(&redrive_policy("arn:aws:sqs:us-east-1:1:q-dlq")).unwrap();
        assert_eq!(
            policy,
            serde_json::json!({"deadLetterTargetArn": "arn:aws:sqs:us-east-1:1:q-dlq", "maxReceiveCount": 5})
        );
    }

    #[test]
    fn queue_names_follow_sqs_rules() {
        assert_eq!(
            queue_name("longrun-dev", "work").unwrap(),
            "longrun-dev-work"
        );
        assert!(queue_name("", "work").is_err());
        assert!(queue_name("has space", "work").is_err());
        assert!(queue_name(&"p".repeat(70), "delivery-dlq").is_err());
    }
}
