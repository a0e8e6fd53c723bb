//! The sweeper step (scheduled): revive tasks whose lease lapsed — a worker that crashed, ran
//! out of memory or hit the Lambda timeout, or a work message that was lost — and end those
//! that used up their attempts or their cap; end tasks whose work message was dead-lettered.

use crate::outcome::Outcome;
use crate::ports::{FinishGuard, PortError, Requeue};
use crate::runtime::Runtime;
use crate::task::{AuditItem, AuditKind, Task, TaskState};
use crate::wire::WorkMessage;
use crate::worker::end;

/// What one sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Tasks sent back to the work queue.
    pub requeued: usize,
    /// Tasks ended (attempts or cap used up, or cancelled while their worker was gone).
    pub ended: usize,
}

/// How many expired leases one sweep handles.
pub const SWEEP_LIMIT: usize = 100;

/// Revives or ends every task whose lease lapsed.
pub async fn sweep(rt: &Runtime) -> Result<SweepReport, PortError> {
    let now = rt.now();
    let mut report = SweepReport::default();
    for task in rt.services.tasks.expired_leases(now, SWEEP_LIMIT).await? {
        match revive(rt, &task).await {
            Ok(true) => report.requeued += 1,
            Ok(false) => report.ended += 1,
            Err(PortError::Conflict(_)) => {} // a worker got there first
            Err(err) => {
                tracing::warn!(task_id = %task.task_id, error = %err, "sweep of task failed")
            }
        }
    }
    if report != SweepReport::default() {
        tracing::info!(
            requeued = report.requeued,
            ended = report.ended,
            "sweep done"
        );
    }
    Ok(report)
}

/// Requeues `task` (`Ok(true)`) or ends it (`Ok(false)`).
async fn revive(rt: &Runtime, task: &Task) -> Result<bool, PortError> {
    let now = rt.now();
    let cap_passed = task.cap_deadline().is_some_and(|d| d <= now);
    let outcome = if task.state == TaskState::Running && task.cancel_requested {
        Some(Outcome::cancelled(&task.function))
    } else if task.state == TaskState::Running && task.attempt >= rt.settings.max_attempts {
        Some(Outcome::failed(
            &task.function,
            "attempts_exhausted",
            format!("the worker stopped on each of {} attempts", task.attempt),
            false,
        ))
    } else if cap_passed {
        Some(Outcome::timed_out(&task.function, task.cap_s))
    } else {
        None
    };
    if let Some(outcome) = outcome {
        end(rt, task, FinishGuard::ExpiredLease, outcome).await?;
        return Ok(false);
    }
    let requeued = rt
        .services
        .tasks
        .requeue(&task.task_id, &Requeue::Expired(now), &rt.queue_lease(now))
        .await?;
    if task.state == TaskState::Running {
        let audit = AuditItem::new(
            task,
            format!("reclaimed#{}", task.attempt),
            AuditKind::Reclaimed,
            now,
            format!(
                "lease of attempt {} lapsed; requeued by the sweeper",
                task.attempt
            ),
        );
        rt.services.tasks.append_audit(&audit).await?;
    }
    rt.services
        .work
        .send(&WorkMessage::for_task(&requeued))
        .await?;
    Ok(true)
}

/// Ends the task of a dead-lettered work message with a fallback error.
pub async fn work_dead_lettered(rt: &Runtime, body: &str) -> Result<(), PortError> {
    let Ok(message) = serde_json::from_str::<WorkMessage>(body) else {
        tracing::error!("malformed dead-lettered work message dropped");
        return Ok(());
    };
    let Some(task) = rt.services.tasks.get(&message.task_id).await? else {
        return Ok(());
    };
    if task.state.is_terminal() {
        if task.delivered_at.is_none() {
            crate::worker::send_result(rt, &task).await?;
        }
        return Ok(());
    }
    let outcome = Outcome::failed(
        &task.function,
        "work_dead_lettered",
        "the work message was dead-lettered after repeated failures".to_owned(),
        false,
    );
    end(rt, &task, FinishGuard::NotTerminal, outcome).await
}
