//! The delivery step: post results and progress into the user's chat — exactly one result
//! message per task, user and chat read from the stored task only, one audit item per
//! delivered message.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;

use crate::ports::{ChatOutcome, PortError};
use crate::runtime::Runtime;
use crate::task::{AuditItem, AuditKind, Progress, Task, TaskId};
use crate::wire::{ChatMessage, DeliveryMessage, Notice};
use crate::worker::{BATCH_CONCURRENCY, QueueRecord};

/// What is kept back from the invocation's deadline: no post starts, and none runs, later
/// than this before it — time to record the post in flight and answer the batch.
pub const DELIVERY_MARGIN: Duration = Duration::from_secs(2);
/// The shortest time a post is started with; less, and the message is left to the queue.
const MIN_POST_TIME: Duration = Duration::from_secs(1);

/// One received delivery message.
struct Received {
    message_id: String,
    receive_count: u32,
    message: DeliveryMessage,
}

/// Works a batch of delivery messages; returns the ids to be redelivered.
///
/// Messages about one task are posted in order (progress by sequence, the result last) with
/// one read of the task, and tasks run concurrently. Of one task's progress messages only the
/// latest is posted (the others are news it replaces); a message repeated in the batch is
/// posted once. `deadline` is the Lambda invocation's: every post is cut off
/// [`DELIVERY_MARGIN`] before it, and what could not be posted in time is reported back for
/// redelivery rather than lost with a timed-out invocation.
pub async fn handle_batch(
    rt: &Runtime,
    records: Vec<QueueRecord>,
    deadline: Option<Instant>,
) -> Vec<String> {
    let mut by_task: BTreeMap<TaskId, Vec<Received>> = BTreeMap::new();
    for record in records {
        match serde_json::from_str::<DeliveryMessage>(&record.body) {
            Ok(message) => by_task
                .entry(message.task_id().clone())
                .or_default()
                .push(Received {
                    message_id: record.message_id,
                    receive_count: record.receive_count,
                    message,
                }),
            Err(err) => {
                tracing::error!(message_id = %record.message_id, error = %err, "malformed delivery message dropped")
            }
        }
    }
    futures::stream::iter(by_task)
        .map(|(task_id, messages)| deliver_task(rt, task_id, messages, deadline))
        .buffer_unordered(BATCH_CONCURRENCY)
        .flat_map(futures::stream::iter)
        .collect()
        .await
}

/// Posts one task's messages of a batch; returns the ids to be redelivered.
async fn deliver_task(
    rt: &Runtime,
    task_id: TaskId,
    mut messages: Vec<Received>,
    deadline: Option<Instant>,
) -> Vec<String> {
    messages.sort_by_key(|r| match r.message {
        DeliveryMessage::Progress { seq, .. } => seq,
        DeliveryMessage::Notice { .. } => u64::MAX - 1,
        DeliveryMessage::Result { .. } => u64::MAX,
    });
    let retry_all = |messages: Vec<Received>| messages.into_iter().map(|r| r.message_id).collect();
    let task = match rt.services.tasks.get(&task_id).await {
        Ok(Some(task)) => task,
        Ok(None) => {
            tracing::error!(%task_id, "delivery for an unknown task dropped");
            return Vec::new();
        }
        Err(err) => {
            tracing::warn!(%task_id, error = %err, "task unreadable; its delivery will be retried");
            return retry_all(messages);
        }
    };
    let latest_progress = messages
        .iter()
        .filter_map(|r| match r.message {
            DeliveryMessage::Progress { seq, .. } => Some(seq),
            DeliveryMessage::Result { .. } | DeliveryMessage::Notice { .. } => None,
        })
        .max();
    let mut seen = HashSet::new();
    let mut failed = Vec::new();
    for received in messages {
        let Received {
            message_id,
            receive_count,
            message,
        } = received;
        let key = message.idempotency_key();
        if !seen.insert(key.clone()) {
            continue; // the same message twice in one batch: one post answers both
        }
        if let DeliveryMessage::Progress { seq, .. } = message
            && Some(seq) < latest_progress
        {
            tracing::debug!(%task_id, seq, "progress superseded within the batch not posted");
            continue;
        }
        if receive_count >= rt.settings.max_receives {
            last_attempt(rt, &task, &key).await;
        }
        let Some(budget) = time_left(deadline) else {
            tracing::warn!(%message_id, %task_id, "no time left in this invocation; delivery will be retried");
            failed.push(message_id);
            continue;
        };
        let outcome = match tokio::time::timeout(budget, deliver(rt, &task, &message)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(PortError::Transient(format!(
                "delivery cut off {DELIVERY_MARGIN:?} before the invocation's deadline"
            ))),
        };
        if let Err(err) = outcome {
            tracing::warn!(%message_id, %task_id, error = %err, "delivery will be retried");
            failed.push(message_id);
        }
    }
    failed
}

/// How long a post may still take, or `None` when it should not start.
fn time_left(deadline: Option<Instant>) -> Option<Duration> {
    let Some(deadline) = deadline else {
        return Some(Duration::MAX);
    };
    let left = deadline
        .checked_duration_since(Instant::now())?
        .checked_sub(DELIVERY_MARGIN)?;
    (left >= MIN_POST_TIME).then_some(left)
}

/// A message's last receive: if this attempt fails too, the queue moves the message to its
/// dead-letter queue, where `longrun dlq redrive` can send it again once the chat API is back.
/// The critical audit item is written before the attempt, so that an invocation cut off
/// mid-post still leaves it; a `delivered` item after it means the attempt went through.
async fn last_attempt(rt: &Runtime, task: &Task, key: &str) {
    tracing::warn!(task_id = %task.task_id, %key, "last delivery attempt before the dead-letter queue");
    let audit = AuditItem::new(
        task,
        format!("critical#last-attempt#{key}"),
        AuditKind::Critical,
        rt.now(),
        format!(
            "{key}: attempt {max} of {max}; unless a delivered item follows, it waits in the delivery dead-letter queue",
            max = rt.settings.max_receives
        ),
    );
    if let Err(err) = rt.services.tasks.append_audit(&audit).await {
        tracing::error!(task_id = %task.task_id, error = %err, "critical audit item not written");
    }
}

/// Delivers one message about `task`, as read at the start of its batch. `Err` means
/// "redeliver it later".
async fn deliver(rt: &Runtime, task: &Task, message: &DeliveryMessage) -> Result<(), PortError> {
    let (body, audit_id) = match message {
        DeliveryMessage::Result { .. } => {
            if task.delivered_at.is_some() {
                tracing::info!(task_id = %task.task_id, "result already delivered");
                return Ok(());
            }
            let Some(result) = task.result.clone().filter(|_| task.state.is_terminal()) else {
                tracing::error!(task_id = %task.task_id, state = %task.state, "result message for an unfinished task dropped");
                return Ok(());
            };
            let event = if result.ok { task.event.clone() } else { None };
            let body = ChatMessage::Result {
                user: task.user.clone(),
                ext: task.ext.clone(),
                task_id: task.task_id.clone(),
                function: task.function.clone(),
                event,
                result,
            };
            (body, "delivered#result".to_owned())
        }
        DeliveryMessage::Progress { seq, progress, .. } => {
            if task.state.is_terminal() {
                // The result is (or is about to be) in the chat; a late progress bar would
                // only confuse.
                return Ok(());
            }
            if *seq < task.progress_seq {
                // A later checkpoint exists and has its own message: posting this one now
                // would move the bar backwards (the queue does not keep order) or spend a
                // post on news already superseded.
                tracing::debug!(task_id = %task.task_id, seq, latest = task.progress_seq, "superseded progress not posted");
                return Ok(());
            }
            let body = ChatMessage::Progress {
                user: task.user.clone(),
                ext: task.ext.clone(),
                task_id: task.task_id.clone(),
                progress: progress.clone(),
            };
            (body, format!("delivered#progress#{seq}"))
        }
        DeliveryMessage::Notice { notice, .. } => {
            if task.state.is_terminal() {
                return Ok(()); // none after the result
            }
            if let Notice::Stalled { seq, .. } = notice
                && *seq < task.progress_seq
            {
                // The task moved on since it was seen stalled.
                return Ok(());
            }
            let body = ChatMessage::Progress {
                user: task.user.clone(),
                ext: task.ext.clone(),
                task_id: task.task_id.clone(),
                progress: Progress {
                    pct: task.progress.pct,
                    message: notice.text(),
                },
            };
            (body, notice.audit_id())
        }
    };
    let key = message.idempotency_key();
    match rt.services.chat.post(&task.chat, &key, &body).await {
        ChatOutcome::Delivered => delivered(rt, task, message, audit_id).await,
        ChatOutcome::Rejected { status } => {
            let detail = format!("chat API refused {key} with {status}");
            tracing::error!(task_id = %task.task_id, status, "critical: chat API refused the message");
            let audit = AuditItem::new(
                task,
                format!("critical#{audit_id}"),
                AuditKind::Critical,
                rt.now(),
                detail,
            );
            rt.services.tasks.append_audit(&audit).await?;
            if matches!(message, DeliveryMessage::Result { .. }) {
                // Refused for good: the sweeper stops sending it; an operator may redrive it.
                rt.services
                    .tasks
                    .reschedule_delivery(&task.task_id, None)
                    .await?;
                rt.services.delivery.dead_letter(message).await?;
            }
            Ok(())
        }
        ChatOutcome::Unavailable { reason } => {
            Err(PortError::Transient(format!("chat API: {reason}")))
        }
    }
}

async fn delivered(
    rt: &Runtime,
    task: &Task,
    message: &DeliveryMessage,
    audit_id: String,
) -> Result<(), PortError> {
    let now = rt.now();
    let detail = match message {
        DeliveryMessage::Result { .. } => format!("result delivered to chat {}", task.chat),
        DeliveryMessage::Progress { seq, .. } => {
            format!("progress #{seq} delivered to chat {}", task.chat)
        }
        DeliveryMessage::Notice { notice, .. } => {
            format!(
                "notice \"{}\" delivered to chat {}",
                notice.text(),
                task.chat
            )
        }
    };
    rt.services
        .tasks
        .append_audit(&AuditItem::new(
            task,
            audit_id,
            AuditKind::Delivered,
            now,
            detail,
        ))
        .await?;
    if matches!(message, DeliveryMessage::Result { .. }) {
        rt.services.tasks.mark_delivered(&task.task_id, now).await?;
        tracing::info!(task_id = %task.task_id, ext = %task.ext, user = %task.user, "result delivered");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::ports::{ChatApi, TaskStore};
    use crate::task::{AuditKind, TaskState};
    use crate::testing::fixture::*;

    /// A stack with one background task of u1's, claimed by worker `w1`.
    async fn running_task() -> (crate::testing::MemoryStack, TaskId, crate::task::Lease) {
        let (stack, _) = stack();
        let task_id = task_id_of(&stack.intake(call_event("bg", "u1", json!({}))).await);
        let now = stack.rt.now();
        let lease = crate::task::Lease {
            owner: "w1".into(),
            until: now + chrono::Duration::seconds(60),
        };
        stack.tasks.claim(&task_id, &lease, now).await.unwrap();
        (stack, task_id, lease)
    }

    /// A checkpoint at `pct`.
    fn at(pct: u8) -> crate::task::Progress {
        crate::task::Progress {
            pct,
            message: format!("{pct}%"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_result_message_three_times_posts_once() {
        // GIVEN a finished task
        let (stack, _) = stack();
        let task_id = task_id_of(&stack.intake(call_event("launch", "u1", json!({}))).await);
        stack.drain(20).await;
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
        // WHEN its result message arrives three more times, once in a single batch
        let message = DeliveryMessage::Result {
            task_id: task_id.clone(),
        };
        for _ in 0..3 {
            stack.delivery.push(message.clone());
        }
        stack.drain(20).await;
        // THEN the chat still holds one result and the audit one `delivered#result`
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
        let audit = audit_kinds(&stack, &task_id).await;
        assert_eq!(
            audit
                .iter()
                .filter(|(_, id)| id == "delivered#result")
                .count(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_crash_after_posting_is_repaired_by_the_idempotency_key() {
        // GIVEN the result was posted but delivered_at was never written (crash in between)
        let (stack, _) = stack();
        let task_id = finished_job(&stack).await;
        let message = DeliveryMessage::Result {
            task_id: task_id.clone(),
        };
        let task = stack.tasks.get(&task_id).await.unwrap().unwrap();
        let body = ChatMessage::Result {
            user: task.user.clone(),
            ext: task.ext.clone(),
            task_id: task_id.clone(),
            function: task.function.clone(),
            event: task.event.clone(),
            result: task.result.clone().unwrap(),
        };
        stack
            .chat
            .post(&task.chat, &message.idempotency_key(), &body)
            .await;
        // WHEN the message is redelivered
        stack.drain(20).await;
        // THEN the chat holds one result and the task is marked delivered
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
        assert!(
            crate::testing::fixture::task(&stack, &task_id)
                .await
                .delivered_at
                .is_some()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn user_and_chat_come_from_the_stored_task_only() {
        // GIVEN alice's finished task
        let (stack, _) = stack();
        let task_id = task_id_of(&stack.intake(call_event("launch", "alice", json!({}))).await);
        stack.drain(20).await;
        // WHEN a forged progress message for it names nothing but the task
        let records = vec![QueueRecord::new(
            "x",
            json!({"kind":"result","task_id":task_id,"user":"mallory","chat":"chat-mallory"})
                .to_string(),
        )];
        handle_batch(&stack.rt, records, None).await;
        // THEN nothing ever lands in mallory's chat
        assert!(stack.chat.in_chat("chat-mallory").is_empty());
        assert!(stack.chat.posted().iter().all(|p| p.chat == "chat-alice"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_5xx_is_retried_and_delivers_once() {
        let (stack, _) = stack();
        stack.chat.script([
            ChatOutcome::Unavailable {
                reason: "503".into(),
            },
            ChatOutcome::Unavailable {
                reason: "timeout".into(),
            },
        ]);
        let task_id = finished_job(&stack).await;
        stack.drain(20).await;
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
        assert!(stack.chat.attempts() >= 3);
        assert!(task(&stack, &task_id).await.delivered_at.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_4xx_is_permanent_critical_and_dead_lettered() {
        let (stack, _) = stack();
        let task_id = finished_job(&stack).await;
        stack.chat.script([ChatOutcome::Rejected { status: 400 }]);
        stack.drain(20).await;
        assert!(results_in(&stack, "chat-u1").is_empty());
        assert_eq!(
            stack.delivery.dead_letters(),
            vec![DeliveryMessage::Result {
                task_id: task_id.clone()
            }]
        );
        let audit = audit_kinds(&stack, &task_id).await;
        assert!(audit.contains(&(AuditKind::Critical, "critical#delivered#result".into())));
        assert_eq!(count(&audit, AuditKind::Delivered), 0);
        let ended = stack.tasks.get(&task_id).await.unwrap().unwrap();
        assert_eq!(ended.state, TaskState::Succeeded);
        // AND the sweeper no longer sends it: the dead-letter queue is where it waits
        assert_eq!(ended.redeliver_at, None);
        tokio::time::sleep(stack.rt.settings.queue_grace * 2).await;
        assert_eq!(
            crate::sweeper::sweep(&stack.rt).await.unwrap(),
            crate::sweeper::SweepReport::default()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_retry_leaves_a_critical_audit_before_the_dead_letter_queue() {
        // GIVEN a finished task and a chat API that stays down
        let (stack, _) = stack();
        let task_id = finished_job(&stack).await;
        stack.delivery.take(10);
        let body = serde_json::to_string(&DeliveryMessage::Result {
            task_id: task_id.clone(),
        })
        .unwrap();
        for receive_count in 1..=stack.rt.settings.max_receives {
            stack.chat.script([ChatOutcome::Unavailable {
                reason: "503".into(),
            }]);
            let record = QueueRecord {
                receive_count,
                ..QueueRecord::new("m", body.clone())
            };
            // THEN every receive asks for a retry…
            assert_eq!(
                handle_batch(&stack.rt, vec![record], None).await,
                vec!["m".to_owned()]
            );
            let critical = count(&audit_kinds(&stack, &task_id).await, AuditKind::Critical);
            // …and only the last one, bound for the dead-letter queue, is recorded as critical
            assert_eq!(
                critical,
                usize::from(receive_count == stack.rt.settings.max_receives)
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_chat_api_slower_than_the_invocation_is_cut_off_and_left_to_the_queue() {
        // GIVEN a finished task and a chat API that takes a minute to answer
        let (stack, _) = stack();
        let task_id = finished_job(&stack).await;
        stack.delivery.take(10);
        stack.chat.answer_after(Duration::from_secs(60));
        let body = serde_json::to_string(&DeliveryMessage::Result {
            task_id: task_id.clone(),
        })
        .unwrap();
        // WHEN its result message is received for the last time by a 30 s invocation
        let deadline = Instant::now() + Duration::from_secs(30);
        let record = QueueRecord {
            receive_count: stack.rt.settings.max_receives,
            ..QueueRecord::new("m", body.clone())
        };
        let failed = handle_batch(&stack.rt, vec![record], Some(deadline)).await;
        // THEN the batch answers before the deadline, with the message to be redelivered…
        assert!(Instant::now() <= deadline - DELIVERY_MARGIN);
        assert_eq!(failed, vec!["m".to_owned()]);
        // …and the critical item of the last attempt was written before the post began
        let audit = audit_kinds(&stack, &task_id).await;
        let key = format!("{task_id}:result");
        assert!(
            audit.contains(&(AuditKind::Critical, format!("critical#last-attempt#{key}"))),
            "{audit:?}"
        );
        assert_eq!(count(&audit, AuditKind::Delivered), 0);
        // AND a batch started with less than the margin left posts nothing at all
        let attempts = stack.chat.attempts();
        let late = Instant::now() + DELIVERY_MARGIN;
        let failed = handle_batch(
            &stack.rt,
            vec![QueueRecord::new("n", body.clone())],
            Some(late),
        )
        .await;
        assert_eq!(failed, vec!["n".to_owned()]);
        assert_eq!(stack.chat.attempts(), attempts);
        // AND once the chat API is fast again, the redelivered message posts the result once
        stack.chat.answer_after(Duration::ZERO);
        let deadline = Instant::now() + Duration::from_secs(30);
        let failed =
            handle_batch(&stack.rt, vec![QueueRecord::new("m", body)], Some(deadline)).await;
        assert!(failed.is_empty());
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
        assert!(task(&stack, &task_id).await.delivered_at.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlog_of_progress_posts_only_the_latest_once() {
        // GIVEN a running task with five checkpoints, whose messages all arrive in one batch,
        // the latest twice
        let (stack, task_id, lease) = running_task().await;
        let now = stack.rt.now();
        let mut records = Vec::new();
        for seq in 1..=5u64 {
            let pct = u8::try_from(seq * 20).unwrap();
            stack
                .tasks
                .beat(&task_id, &lease, Some(&at(pct)), None, now)
                .await
                .unwrap();
            let message = DeliveryMessage::Progress {
                task_id: task_id.clone(),
                seq,
                progress: at(pct),
            };
            records.push(QueueRecord::new(
                format!("p{seq}"),
                serde_json::to_string(&message).unwrap(),
            ));
        }
        records.push(records[4].clone());
        // WHEN the batch is delivered
        let failed = handle_batch(&stack.rt, records, None).await;
        // THEN one post went out, the latest, and every message is acknowledged
        assert!(failed.is_empty());
        assert_eq!(stack.chat.attempts(), 1);
        assert_eq!(progress_in(&stack, "chat-u1"), vec![100]);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_progress_after_the_result_is_not_posted() {
        let (stack, _) = stack();
        let task_id = task_id_of(&stack.intake(call_event("launch", "u1", json!({}))).await);
        stack.drain(20).await;
        let before = stack.chat.posted().len();
        stack.delivery.push(DeliveryMessage::Progress {
            task_id,
            seq: 1,
            progress: crate::task::Progress {
                pct: 10,
                message: "late".into(),
            },
        });
        stack.drain(20).await;
        assert_eq!(stack.chat.posted().len(), before);
    }

    #[tokio::test(start_paused = true)]
    async fn progress_never_goes_backwards_and_superseded_progress_is_not_posted() {
        // GIVEN a running task whose record holds its second checkpoint
        let (stack, task_id, lease) = running_task().await;
        let now = stack.rt.now();
        for pct in [30, 60] {
            stack
                .tasks
                .beat(&task_id, &lease, Some(&at(pct)), None, now)
                .await
                .unwrap();
        }
        let message = |seq: u64, pct: u8| DeliveryMessage::Progress {
            task_id: task_id.clone(),
            seq,
            progress: at(pct),
        };
        // WHEN the second checkpoint's message arrives before the first, in separate batches
        stack.delivery.push(message(2, 60));
        stack.deliver_once().await;
        stack.delivery.push(message(1, 30));
        stack.deliver_once().await;
        // AND both arrive again in one batch
        stack.delivery.push(message(1, 30));
        stack.delivery.push(message(2, 60));
        stack.deliver_once().await;
        // THEN the chat shows 60 % once and never 30 %
        assert_eq!(progress_in(&stack, "chat-u1"), vec![60]);
    }

    #[tokio::test(start_paused = true)]
    async fn malformed_and_unknown_messages_are_dropped_without_panic() {
        let (stack, _) = stack();
        let records = vec![
            QueueRecord::new("a", "]["),
            QueueRecord::new(
                "b",
                json!({"kind":"result","task_id":"01JDZQ6V4E1YQ7K3ZC6M4T9H8P"}).to_string(),
            ),
            QueueRecord::new("c", json!({"kind":"gossip"}).to_string()),
        ];
        assert!(handle_batch(&stack.rt, records, None).await.is_empty());
        assert!(stack.chat.posted().is_empty());
    }
}
