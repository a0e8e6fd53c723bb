//! In-process queues with the SQS semantics the pipeline relies on: a received message is
//! hidden for a visibility timeout and comes back unless it is deleted; every receive counts
//! (`ApproximateReceiveCount`); a message received `maxReceiveCount` times without being
//! deleted moves to the dead-letter queue on its next receive, as SQS's redrive policy does.
//!
//! [`LocalQueues`] is the deployment's four queues (work, delivery and their dead-letter
//! queues). A [`LocalQueue`] implements both [`WorkQueue`] and [`DeliveryQueue`], so the
//! pipeline sends to it as it sends to SQS; [`crate::pipeline`] receives from it.
//!
//! Locally the visibility timeouts are seconds ([`QueueTimeouts`]), not the deployed queues'
//! 6 × function timeout: a failed message is retried while you watch.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;

use longrun::ports::{DeliveryQueue, PortError, PortResult, WorkQueue};
use longrun::wire::{DeliveryMessage, WorkMessage};
use longrun_aws::sqs::{MAX_MESSAGE_BYTES, MAX_RECEIVE_COUNT};

/// The account id in local queue ARNs.
pub const LOCAL_ACCOUNT: &str = "000000000000";
/// The region in local queue ARNs and clients.
pub const LOCAL_REGION: &str = "us-east-1";

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving it.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A message handed out by [`LocalQueue::receive`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The id the queue gave the message when it was sent.
    pub message_id: String,
    /// Names this receive: [`LocalQueue::delete`] and [`LocalQueue::change_visibility`] take it.
    pub receipt_handle: String,
    /// The message body, as sent.
    pub body: String,
    /// How many times the message has been received, this time included.
    pub receive_count: u32,
    /// When the message was first sent.
    pub sent_at: DateTime<Utc>,
}

impl From<&Received> for longrun::worker::QueueRecord {
    fn from(message: &Received) -> Self {
        Self {
            message_id: message.message_id.clone(),
            body: message.body.clone(),
            receive_count: message.receive_count,
        }
    }
}

struct Stored {
    message_id: String,
    body: String,
    sent_at: DateTime<Utc>,
    receive_count: u32,
    visible_at: Instant,
    receipt: Option<String>,
}

struct DeadLetter {
    queue: Arc<LocalQueue>,
    max_receive_count: u32,
}

/// One queue.
pub struct LocalQueue {
    name: String,
    visibility_timeout: Duration,
    dead_letter: Option<DeadLetter>,
    messages: Mutex<VecDeque<Stored>>,
    changed: Notify,
}

impl std::fmt::Debug for LocalQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalQueue")
            .field("name", &self.name)
            .field("visibility_timeout", &self.visibility_timeout)
            .finish_non_exhaustive()
    }
}

impl LocalQueue {
    /// A queue without a dead-letter queue.
    pub fn new(name: impl Into<String>, visibility_timeout: Duration) -> Self {
        Self {
            name: name.into(),
            visibility_timeout,
            dead_letter: None,
            messages: Mutex::new(VecDeque::new()),
            changed: Notify::new(),
        }
    }

    /// A queue whose messages move to `dead_letter` when received more than
    /// `max_receive_count` times.
    pub fn with_dead_letter(
        name: impl Into<String>,
        visibility_timeout: Duration,
        dead_letter: Arc<LocalQueue>,
        max_receive_count: u32,
    ) -> Self {
        Self {
            dead_letter: Some(DeadLetter {
                queue: dead_letter,
                max_receive_count: max_receive_count.max(1),
            }),
            ..Self::new(name, visibility_timeout)
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `arn:aws:sqs:us-east-1:000000000000:{name}`.
    pub fn arn(&self) -> String {
        format!("arn:aws:sqs:{LOCAL_REGION}:{LOCAL_ACCOUNT}:{}", self.name)
    }

    /// How long a received message stays hidden unless told otherwise.
    pub fn visibility_timeout(&self) -> Duration {
        self.visibility_timeout
    }

    /// The dead-letter queue and `maxReceiveCount`, if the queue has a redrive policy.
    pub fn redrive_policy(&self) -> Option<(&Arc<LocalQueue>, u32)> {
        self.dead_letter
            .as_ref()
            .map(|d| (&d.queue, d.max_receive_count))
    }

    /// Sends a message; returns its id. A body over SQS's 1 MiB is refused as SQS would.
    pub fn send_message(&self, body: impl Into<String>) -> PortResult<String> {
        self.send_message_after(body, Duration::ZERO)
    }

    /// Sends a message that becomes visible `delay` from now (SQS `DelaySeconds`).
    pub fn send_message_after(
        &self,
        body: impl Into<String>,
        delay: Duration,
    ) -> PortResult<String> {
        let body = body.into();
        if body.len() > MAX_MESSAGE_BYTES {
            return Err(PortError::Permanent(format!(
                "{}: {} bytes exceeds the SQS message limit of {MAX_MESSAGE_BYTES} bytes",
                self.name,
                body.len()
            )));
        }
        let message_id = new_id();
        self.accept(Stored {
            message_id: message_id.clone(),
            body,
            sent_at: Utc::now(),
            receive_count: 0,
            visible_at: Instant::now() + delay,
            receipt: None,
        });
        Ok(message_id)
    }

    fn accept(&self, message: Stored) {
        lock(&self.messages).push_back(message);
        self.changed.notify_waiters();
    }

    /// Takes up to `max` visible messages and hides them for `visibility` (zero leaves them
    /// visible, as SQS does; the receive still counts). Messages that used up their receives
    /// move to the dead-letter queue instead of being handed out.
    pub fn receive(&self, max: usize, visibility: Duration) -> Vec<Received> {
        let now = Instant::now();
        let mut out = Vec::new();
        let mut exhausted = Vec::new();
        {
            let mut messages = lock(&self.messages);
            let mut i = 0;
            while i < messages.len() && out.len() < max {
                if messages[i].visible_at > now {
                    i += 1;
                    continue;
                }
                if let Some(dead) = &self.dead_letter
                    && messages[i].receive_count >= dead.max_receive_count
                {
                    if let Some(message) = messages.remove(i) {
                        exhausted.push(message);
                    }
                    continue;
                }
                let message = &mut messages[i];
                message.receive_count += 1;
                message.visible_at = now + visibility;
                let receipt = format!("{}:{}", message.message_id, new_id());
                message.receipt = Some(receipt.clone());
                out.push(Received {
                    message_id: message.message_id.clone(),
                    receipt_handle: receipt,
                    body: message.body.clone(),
                    receive_count: message.receive_count,
                    sent_at: message.sent_at,
                });
                i += 1;
            }
        }
        if let Some(dead) = &self.dead_letter {
            for mut message in exhausted {
                tracing::warn!(queue = %self.name, message_id = %message.message_id, receives = message.receive_count, dead_letter_queue = %dead.queue.name, "message dead-lettered");
                message.receive_count = 0;
                message.visible_at = now;
                message.receipt = None;
                dead.queue.accept(message);
            }
        }
        out
    }

    /// [`LocalQueue::receive`], waiting up to `wait` for a message (SQS long polling).
    pub async fn receive_wait(
        &self,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Vec<Received> {
        let max = max.max(1);
        let deadline = Instant::now() + wait;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before looking, so a send in between is not missed.
            changed.as_mut().enable();
            let received = self.receive(max, visibility);
            let now = Instant::now();
            if !received.is_empty() || now >= deadline {
                return received;
            }
            let wake = self
                .next_visible()
                .filter(|at| *at > now)
                .map_or(deadline, |at| at.min(deadline));
            tokio::select! {
                _ = &mut changed => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    fn next_visible(&self) -> Option<Instant> {
        lock(&self.messages).iter().map(|m| m.visible_at).min()
    }

    /// Deletes the message this receipt names. `false` if it is gone or was received again
    /// since (its receipt is stale).
    pub fn delete(&self, receipt_handle: &str) -> bool {
        let mut messages = lock(&self.messages);
        match messages
            .iter()
            .position(|m| m.receipt.as_deref() == Some(receipt_handle))
        {
            Some(i) => {
                messages.remove(i);
                true
            }
            None => false,
        }
    }

    /// Hides the message this receipt names for `visibility` from now (zero: visible at
    /// once). `false` if the receipt is stale or the message is not in flight.
    pub fn change_visibility(&self, receipt_handle: &str, visibility: Duration) -> bool {
        let now = Instant::now();
        let changed = {
            let mut messages = lock(&self.messages);
            match messages
                .iter_mut()
                .find(|m| m.receipt.as_deref() == Some(receipt_handle) && m.visible_at > now)
            {
                Some(message) => {
                    message.visible_at = now + visibility;
                    true
                }
                None => false,
            }
        };
        if changed {
            self.changed.notify_waiters();
        }
        changed
    }

    /// Messages waiting to be received (`ApproximateNumberOfMessages`).
    pub fn depth(&self) -> usize {
        let now = Instant::now();
        lock(&self.messages)
            .iter()
            .filter(|m| m.visible_at <= now)
            .count()
    }

    /// Messages received and not yet deleted or visible again
    /// (`ApproximateNumberOfMessagesNotVisible`).
    pub fn in_flight(&self) -> usize {
        let now = Instant::now();
        lock(&self.messages)
            .iter()
            .filter(|m| m.visible_at > now)
            .count()
    }

    /// Deletes every message.
    pub fn purge(&self) -> usize {
        let mut messages = lock(&self.messages);
        let n = messages.len();
        messages.clear();
        n
    }
}

fn new_id() -> String {
    ulid::Ulid::new().to_string().to_lowercase()
}

fn body(what: &str, message: &impl Serialize) -> PortResult<String> {
    serde_json::to_string(message)
        .map_err(|e| PortError::Permanent(format!("{what}: cannot serialize: {e}")))
}

#[async_trait]
impl WorkQueue for LocalQueue {
    async fn send(&self, message: &WorkMessage) -> PortResult<()> {
        self.send_message(body("work message", message)?)?;
        Ok(())
    }

    async fn send_after(&self, message: &WorkMessage, delay: Duration) -> PortResult<()> {
        self.send_message_after(
            body("work message", message)?,
            delay.min(longrun::ports::MAX_QUEUE_DELAY),
        )?;
        Ok(())
    }
}

#[async_trait]
impl DeliveryQueue for LocalQueue {
    async fn send(&self, message: &DeliveryMessage) -> PortResult<()> {
        self.send_message(body("delivery message", message)?)?;
        Ok(())
    }

    async fn dead_letter(&self, message: &DeliveryMessage) -> PortResult<()> {
        let Some(dead) = &self.dead_letter else {
            return Err(PortError::Permanent(format!(
                "queue {} has no dead-letter queue",
                self.name
            )));
        };
        dead.queue
            .send_message(body("delivery message", message)?)?;
        tracing::warn!(task_id = %message.task_id(), key = %message.idempotency_key(), "delivery message dead-lettered");
        Ok(())
    }
}

/// Visibility timeouts of the local work and delivery queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueTimeouts {
    /// How long a failed work message waits before it is tried again.
    pub work: Duration,
    /// How long a failed delivery message waits before it is tried again.
    pub delivery: Duration,
}

impl Default for QueueTimeouts {
    fn default() -> Self {
        Self {
            work: Duration::from_secs(30),
            delivery: Duration::from_secs(10),
        }
    }
}

/// The four queues of a deployment, named as `longrun bootstrap` names them:
/// `{prefix}-work`, `{prefix}-delivery` and their `-dlq`s, with `maxReceiveCount` 5.
#[derive(Debug, Clone)]
pub struct LocalQueues {
    /// `{prefix}-work`: tasks for the worker; dead-letters to [`Self::work_dlq`].
    pub work: Arc<LocalQueue>,
    /// `{prefix}-work-dlq`: work messages received too often, ended by the sweeper.
    pub work_dlq: Arc<LocalQueue>,
    /// `{prefix}-delivery`: progress updates and results for delivery to post to the chat;
    /// dead-letters to [`Self::delivery_dlq`].
    pub delivery: Arc<LocalQueue>,
    /// `{prefix}-delivery-dlq`: delivery messages received too often, kept for
    /// `longrun dlq`.
    pub delivery_dlq: Arc<LocalQueue>,
}

impl LocalQueues {
    /// Fresh, empty queues.
    pub fn new(prefix: &str, timeouts: QueueTimeouts) -> Self {
        let dlq_visibility = Duration::from_secs(30);
        let work_dlq = Arc::new(LocalQueue::new(
            format!("{prefix}-work-dlq"),
            dlq_visibility,
        ));
        let delivery_dlq = Arc::new(LocalQueue::new(
            format!("{prefix}-delivery-dlq"),
            dlq_visibility,
        ));
        Self {
            work: Arc::new(LocalQueue::with_dead_letter(
                format!("{prefix}-work"),
                timeouts.work,
                Arc::clone(&work_dlq),
                MAX_RECEIVE_COUNT,
            )),
            delivery: Arc::new(LocalQueue::with_dead_letter(
                format!("{prefix}-delivery"),
                timeouts.delivery,
                Arc::clone(&delivery_dlq),
                MAX_RECEIVE_COUNT,
            )),
            work_dlq,
            delivery_dlq,
        }
    }

    /// The four queues: work, work DLQ, delivery, delivery DLQ.
    pub fn all(&self) -> [&Arc<LocalQueue>; 4] {
        [
            &self.work,
            &self.work_dlq,
            &self.delivery,
            &self.delivery_dlq,
        ]
    }

    /// The queue named `name`.
    pub fn by_name(&self, name: &str) -> Option<&Arc<LocalQueue>> {
        self.all().into_iter().find(|q| q.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VISIBILITY: Duration = Duration::from_secs(30);

    fn queues() -> LocalQueues {
        LocalQueues::new(
            "t",
            QueueTimeouts {
                work: VISIBILITY,
                delivery: VISIBILITY,
            },
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_received_message_is_hidden_until_its_visibility_timeout_ends() {
        // GIVEN a message received once and not deleted
        let q = queues();
        q.work.send_message("m").unwrap();
        let first = q.work.receive(10, VISIBILITY);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].receive_count, 1);
        // THEN it is hidden while the timeout runs
        assert!(q.work.receive(10, VISIBILITY).is_empty());
        assert_eq!((q.work.depth(), q.work.in_flight()), (0, 1));
        // AND comes back after it, with its receive count raised
        tokio::time::sleep(VISIBILITY).await;
        let again = q.work.receive(10, VISIBILITY);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].message_id, first[0].message_id);
        assert_eq!(again[0].receive_count, 2);
        // AND the first receipt no longer deletes it
        assert!(!q.work.delete(&first[0].receipt_handle));
        assert!(q.work.delete(&again[0].receipt_handle));
        assert_eq!(q.work.depth() + q.work.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_received_max_receive_count_times_moves_to_the_dead_letter_queue() {
        let q = queues();
        q.delivery.send_message("poison").unwrap();
        for n in 1..=MAX_RECEIVE_COUNT {
            let got = q.delivery.receive(10, VISIBILITY);
            assert_eq!(got[0].receive_count, n);
            tokio::time::sleep(VISIBILITY).await;
        }
        // The next receive finds nothing: the message went to the DLQ.
        assert!(q.delivery.receive(10, VISIBILITY).is_empty());
        let dead = q.delivery_dlq.receive(10, Duration::ZERO);
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].body, "poison");
        assert_eq!(q.delivery.depth() + q.delivery.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn change_visibility_to_zero_returns_a_message_at_once() {
        let q = queues();
        q.work.send_message("m").unwrap();
        let got = q.work.receive(1, VISIBILITY);
        assert!(
            q.work
                .change_visibility(&got[0].receipt_handle, Duration::ZERO)
        );
        assert_eq!(q.work.receive(1, VISIBILITY)[0].receive_count, 2);
        assert!(!q.work.change_visibility("not-a-receipt", Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_visibility_receive_peeks() {
        let q = queues();
        q.work_dlq.send_message("m").unwrap();
        assert_eq!(q.work_dlq.receive(10, Duration::ZERO).len(), 1);
        assert_eq!(q.work_dlq.depth(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn long_polling_wakes_on_a_send_and_on_a_message_coming_back() {
        let q = queues();
        let queue = Arc::clone(&q.work);
        let waiter = tokio::spawn(async move {
            queue
                .receive_wait(10, VISIBILITY, Duration::from_secs(20))
                .await
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        q.work.send_message("late").unwrap();
        let got = waiter.await.unwrap();
        assert_eq!(got[0].body, "late");
        // A wait with nothing to receive returns empty at the end of the wait.
        let none = q
            .work
            .receive_wait(10, VISIBILITY, Duration::from_secs(5))
            .await;
        assert!(none.is_empty());
        // The in-flight message becomes visible within a long wait and is returned.
        let back = q
            .work
            .receive_wait(10, VISIBILITY, Duration::from_secs(60))
            .await;
        assert_eq!(back[0].receive_count, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn receive_takes_at_most_max_and_oversized_bodies_are_refused() {
        let q = queues();
        for i in 0..15 {
            q.work.send_message(i.to_string()).unwrap();
        }
        assert_eq!(q.work.receive(10, VISIBILITY).len(), 10);
        assert_eq!(q.work.receive(10, VISIBILITY).len(), 5);
        let big = "x".repeat(MAX_MESSAGE_BYTES + 1);
        assert!(matches!(
            q.work.send_message(big),
            Err(PortError::Permanent(_))
        ));
    }
}
