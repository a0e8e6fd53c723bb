//! The delivery step: post results and progress into the user's chat — exactly one result
//! message per task, user and chat read from the stored task only, one audit item per
//! delivered message.

use std::collections::BTreeMap;

use futures::StreamExt;

use crate::ports::{ChatOutcome, PortError};
use crate::runtime::Runtime;
use crate::task::{AuditItem, AuditKind, Task};
use crate::wire::{ChatMessage, DeliveryMessage};
use crate::worker::{BATCH_CONCURRENCY, QueueRecord};

/// Works a batch of delivery messages; returns the ids to be redelivered.
///
/// Messages about one task are posted in order (progress by sequence, the result last), and
/// tasks run concurrently.
pub async fn handle_batch(rt: &Runtime, records: Vec<QueueRecord>) -> Vec<String> {
    let mut by_task: BTreeMap<String, Vec<(String, DeliveryMessage)>> = BTreeMap::new();
    for record in records {
        match serde_json::from_str::<DeliveryMessage>(&record.body) {
            Ok(message) => by_task
                .entry(message.task_id().to_string())
                .or_default()
                .push((record.message_id, message)),
            Err(err) => {
                tracing::error!(message_id = %record.message_id, error = %err, "malformed delivery message dropped")
            }
        }
    }
    futures::stream::iter(by_task.into_values())
        .map(|mut messages| async move {
            messages.sort_by_key(|(_, m)| match m {
                DeliveryMessage::Progress { seq, .. } => *seq,
                DeliveryMessage::Result { .. } => u64::MAX,
            });
            let mut failed = Vec::new();
            for (message_id, message) in messages {
                if let Err(err) = handle_message(rt, &message).await {
                    tracing::warn!(%message_id, task_id = %message.task_id(), error = %err, "delivery will be retried");
                    failed.push(message_id);
                }
            }
            failed
        })
        .buffer_unordered(BATCH_CONCURRENCY)
        .flat_map(futures::stream::iter)
        .collect()
        .await
}

/// Delivers one message. `Err` means "redeliver it later".
pub async fn handle_message(rt: &Runtime, message: &DeliveryMessage) -> Result<(), PortError> {
    let Some(task) = rt.services.tasks.get(message.task_id()).await? else {
        tracing::error!(task_id = %message.task_id(), "delivery for an unknown task dropped");
        return Ok(());
    };
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
            let body = ChatMessage::Progress {
                user: task.user.clone(),
                ext: task.ext.clone(),
                task_id: task.task_id.clone(),
                progress: progress.clone(),
            };
            (body, format!("delivered#progress#{seq}"))
        }
    };
    let key = message.idempotency_key();
    match rt.services.chat.post(&task.chat, &key, &body).await {
        ChatOutcome::Delivered => delivered(rt, &task, message, audit_id).await,
        ChatOutcome::Rejected { status } => {
            let detail = format!("chat API refused {key} with {status}");
            tracing::error!(task_id = %task.task_id, status, "critical: chat API refused the message");
            let audit = AuditItem::new(
                &task,
                format!("critical#{audit_id}"),
                AuditKind::Critical,
                rt.now(),
                detail,
            );
            rt.services.tasks.append_audit(&audit).await?;
            if matches!(message, DeliveryMessage::Result { .. }) {
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
