//! The sweeper step (scheduled): revive tasks whose lease lapsed — a worker that crashed, ran
//! out of memory or hit the Lambda timeout, or a work message that was lost — and end those
//! that used up their attempts or their cap; end tasks whose work message was dead-lettered.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::outcome::Outcome;
use crate::ports::{FinishGuard, PortError, Requeue};
use crate::runtime::{QUEUE_OWNER, Runtime, to_chrono};
use crate::task::{AuditItem, AuditKind, Lease, Task, TaskState};
use crate::wire::WorkMessage;
use crate::worker::{end, process_of};

/// What one sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Tasks sent back to the work queue.
    pub requeued: usize,
    /// Tasks ended (attempts or cap used up, or cancelled while their worker was gone).
    pub ended: usize,
    /// Finished tasks whose undelivered result was sent to the delivery queue again.
    pub redelivered: usize,
}

/// How long after one re-send of an undelivered result the sweeper sends it again: the time
/// delivery may spend on one message (5 receives, 180 s apart).
pub const REDELIVER_EVERY: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// How many expired leases one sweep handles.
pub const SWEEP_LIMIT: usize = 100;

/// Revives or ends every task whose lease lapsed.
///
/// Running tasks whose worker process died with others in it (an out-of-memory or a crash
/// any of them may have caused) are requeued [isolated](Task::isolated), that death not
/// counted against their attempts; they are handled once every one of them has lapsed. A
/// process's leases lapse within one renewal period of each other
/// ([`Settings::renew_every`](crate::Settings::renew_every)), so the sweep also reads those
/// that lapse within the next one, to see each process's tasks together.
pub async fn sweep(rt: &Runtime) -> Result<SweepReport, PortError> {
    let now = rt.now();
    let mut report = SweepReport::default();
    let horizon = now + to_chrono(rt.settings.renew_every());
    let seen = rt
        .services
        .tasks
        .expired_leases(horizon, SWEEP_LIMIT)
        .await?;
    let deaths = process_deaths(&seen, now);
    for task in seen {
        if !task.due_for_sweep(now) {
            continue;
        }
        let shared = match running_process(&task).and_then(|p| deaths.get(p)) {
            Some(death) if death.tasks > 1 && !death.all_lapsed => {
                tracing::info!(task_id = %task.task_id, "lease lapsed with others of its worker process still lapsing; next sweep");
                continue;
            }
            Some(death) => death.tasks > 1,
            None => false,
        };
        if task.state.is_terminal() {
            match redeliver(rt, &task).await {
                Ok(()) => report.redelivered += 1,
                Err(err) => {
                    tracing::warn!(task_id = %task.task_id, error = %err, "re-send of result failed")
                }
            }
            continue;
        }
        match revive(rt, &task, shared).await {
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
            redelivered = report.redelivered,
            "sweep done"
        );
    }
    Ok(report)
}

/// Sends a finished task's undelivered result again, and when to do so next. The next time
/// is written first, so a crash in between costs one sweep's delay, never the result.
async fn redeliver(rt: &Runtime, task: &Task) -> Result<(), PortError> {
    let next = rt.now() + chrono::Duration::from_std(REDELIVER_EVERY).unwrap_or_default();
    if !rt
        .services
        .tasks
        .reschedule_delivery(&task.task_id, Some(next))
        .await?
    {
        return Ok(()); // delivered meanwhile
    }
    tracing::warn!(task_id = %task.task_id, state = %task.state, "result not delivered yet; sent again");
    crate::worker::send_result(rt, task).await
}

/// The running tasks of one worker process among those a sweep read.
struct ProcessDeath {
    tasks: usize,
    /// Whether every one of them lapsed already.
    all_lapsed: bool,
}

fn process_deaths(seen: &[Task], now: DateTime<Utc>) -> HashMap<String, ProcessDeath> {
    let mut deaths: HashMap<String, ProcessDeath> = HashMap::new();
    for task in seen {
        if let Some(process) = running_process(task) {
            let death = deaths.entry(process.to_owned()).or_insert(ProcessDeath {
                tasks: 0,
                all_lapsed: true,
            });
            death.tasks += 1;
            death.all_lapsed &= task.lease.as_ref().is_some_and(|l| l.until < now);
        }
    }
    deaths
}

/// The worker process holding a running task.
fn running_process(task: &Task) -> Option<&str> {
    (task.state == TaskState::Running)
        .then_some(task.lease.as_ref())
        .flatten()
        .and_then(|l| process_of(&l.owner))
}

/// Requeues `task` (`Ok(true)`) or ends it (`Ok(false)`). `shared`: its worker process died
/// with other tasks in it.
async fn revive(rt: &Runtime, task: &Task, shared: bool) -> Result<bool, PortError> {
    let now = rt.now();
    let cap_passed = task.cap_deadline().is_some_and(|d| d <= now);
    // Isolation forgives one death, once: an isolated task runs alone, so its own deaths count.
    let isolate = shared && !task.isolated;
    let outcome = if task.state == TaskState::Running && task.cancel_requested {
        Some(Outcome::cancelled(&task.function))
    } else if task.state == TaskState::Running
        && !isolate
        && task.counted_attempts() >= rt.settings.max_attempts
    {
        Some(Outcome::failed(
            &task.function,
            "attempts_exhausted",
            format!("the worker stopped on each of {} attempts", task.attempt),
            false,
        ))
    } else if task.state == TaskState::Running && cap_passed {
        // A queued task past its cap (requeued, then its message waited or was lost) is sent
        // again instead: `queued → timed_out` is no legal move, and the worker that claims it
        // ends it timed out at once.
        Some(Outcome::timed_out(&task.function, task.cap_s))
    } else {
        None
    };
    if let Some(outcome) = outcome {
        end(rt, task, FinishGuard::ExpiredLease, outcome).await?;
        return Ok(false);
    }
    let lease = Lease {
        owner: QUEUE_OWNER.to_owned(),
        until: now + to_chrono(resend_after(rt, task, now)),
    };
    let requeued = rt
        .services
        .tasks
        .requeue(
            &task.task_id,
            &if isolate {
                Requeue::Isolate(now)
            } else {
                Requeue::Expired(now)
            },
            &lease,
        )
        .await?;
    if task.state == TaskState::Running {
        let detail = if isolate {
            format!(
                "lease of attempt {} lapsed with other tasks of its worker process; requeued by the sweeper to run alone, this attempt not counted",
                task.attempt
            )
        } else {
            format!(
                "lease of attempt {} lapsed; requeued by the sweeper",
                task.attempt
            )
        };
        let audit = AuditItem::new(
            task,
            // The same id the claiming worker writes: one item per reclaim.
            format!("reclaimed#{}", task.attempt + 1),
            AuditKind::Reclaimed,
            now,
            detail,
        );
        rt.services.tasks.append_audit(&audit).await?;
    }
    rt.services
        .work
        .send(&WorkMessage::for_task(&requeued))
        .await?;
    Ok(true)
}

/// How long the sweeper leaves a task it sends to the work queue before it sends it again:
/// the queue grace for a task whose worker died; for a task that was already waiting in the
/// queue, as long again as it has waited (up to [`MAX_RESEND_INTERVAL`]). A queue with a
/// backlog holds the task's message still, so re-sending it every queue grace would only
/// grow the backlog with copies; a message truly lost is still sent again, later each time.
fn resend_after(rt: &Runtime, task: &Task, now: DateTime<Utc>) -> Duration {
    let grace = rt.settings.queue_grace;
    if task.state != TaskState::Queued {
        return grace;
    }
    let queued_since = task.heartbeat_at.unwrap_or(task.created_at);
    let waited = (now - queued_since).to_std().unwrap_or_default();
    waited.min(MAX_RESEND_INTERVAL).max(grace)
}

/// The longest a queued task waits between two re-sends of its work message.
pub const MAX_RESEND_INTERVAL: Duration = Duration::from_secs(3600);

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
    if task.state == TaskState::Running && !task.due_for_sweep(rt.now()) {
        // A live worker holds the task (this message was a duplicate, or an earlier one of a
        // task handed on): it ends the task itself.
        tracing::info!(task_id = %task.task_id, "dead-lettered work message of a task a live worker holds; left to the worker");
        return Ok(());
    }
    let outcome = Outcome::failed(
        &task.function,
        "work_dead_lettered",
        "the work message was dead-lettered after repeated failures".to_owned(),
        false,
    );
    end(rt, &task, FinishGuard::Abandoned, outcome).await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::ports::{Claim, TaskStore, UsageStore};
    use crate::task::{AuditKind, Lease};
    use crate::testing::fixture::*;

    /// Claims the task as a worker that then dies (never beats, never finishes).
    async fn claim_and_die(stack: &crate::testing::MemoryStack, task_id: &crate::TaskId) {
        stack.work.take(10);
        let now = stack.rt.now();
        let lease = Lease {
            owner: "dead-worker".into(),
            until: now + chrono::Duration::seconds(60),
        };
        assert!(matches!(
            stack.tasks.claim(task_id, &lease, now).await.unwrap(),
            Claim::Claimed(_)
        ));
    }

    /// Claims the task as a worker of `process` for `lease_s` seconds; it never beats again.
    async fn claim_in(
        stack: &crate::testing::MemoryStack,
        task_id: &crate::TaskId,
        process: &str,
        lease_s: i64,
    ) -> crate::task::Task {
        let now = stack.rt.now();
        let lease = Lease {
            owner: format!("{process}/{}", ulid::Ulid::new()),
            until: now + chrono::Duration::seconds(lease_s),
        };
        match stack.tasks.claim(task_id, &lease, now).await.unwrap() {
            Claim::Claimed(task) => task,
            other => panic!("not claimed: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn tasks_whose_process_died_together_run_alone_after_and_lose_no_attempt() {
        // GIVEN three tasks: two in worker process p1, one alone in p2
        let (stack, runs) = stack();
        let mut ids = Vec::new();
        for user in ["u1", "u2", "u3"] {
            ids.push(task_id_of(
                &stack.intake(call_event("bg", user, json!({}))).await,
            ));
        }
        stack.work.take(10);
        claim_in(&stack, &ids[0], "p1", 60).await;
        claim_in(&stack, &ids[2], "p2", 60).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        claim_in(&stack, &ids[1], "p1", 60).await;
        // WHEN both processes die, and the sweeper runs when p1's first lease has lapsed
        // but not its second
        tokio::time::sleep(Duration::from_secs(59)).await;
        // THEN p2's task is requeued, its death counted; p1's wait for the next sweep
        assert_eq!(sweep(&stack.rt).await.unwrap().requeued, 1);
        let alone = task(&stack, &ids[2]).await;
        assert_eq!((alone.state, alone.isolated), (TaskState::Queued, false));
        assert_eq!(alone.counted_attempts(), 1);
        assert_eq!(task(&stack, &ids[0]).await.state, TaskState::Running);
        // AND once both of p1's leases lapsed, both are requeued to run alone, uncounted
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(sweep(&stack.rt).await.unwrap().requeued, 2);
        for id in &ids[..2] {
            let requeued = task(&stack, id).await;
            assert_eq!(requeued.state, TaskState::Queued);
            assert!(requeued.isolated);
            assert_eq!(requeued.counted_attempts(), 0);
        }
        let messages = stack.work.take(10);
        let isolated = messages.iter().filter(|m| m.isolated).count();
        assert_eq!((messages.len(), isolated), (3, 2));
        let audit = audit_kinds(&stack, &ids[0]).await;
        assert_eq!(count(&audit, AuditKind::Reclaimed), 1, "{audit:?}");
        // AND every task then runs once more to one result
        for message in &messages {
            stack.work.push(message.clone());
        }
        stack.drain(40).await;
        assert_eq!(runs.started.load(std::sync::atomic::Ordering::SeqCst), 3);
        for (id, user) in ids.iter().zip(["u1", "u2", "u3"]) {
            assert_eq!(task(&stack, id).await.state, TaskState::Succeeded);
            assert_eq!(results_in(&stack, &format!("chat-{user}")).len(), 1);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_poison_task_ends_after_its_own_deaths_only() {
        // GIVEN a task that kills its process every time, first beside a neighbour
        let (stack, _) = stack();
        let poison = task_id_of(&stack.intake(call_event("bg", "u1", json!({}))).await);
        let neighbour = task_id_of(&stack.intake(call_event("bg", "u2", json!({}))).await);
        stack.work.take(10);
        claim_in(&stack, &poison, "p1", 60).await;
        claim_in(&stack, &neighbour, "p1", 60).await;
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(sweep(&stack.rt).await.unwrap().requeued, 2);
        // WHEN from then on it dies alone, each time
        let mut deaths = 0;
        while task(&stack, &poison).await.state == TaskState::Queued {
            stack.work.take(10);
            claim_in(&stack, &poison, &format!("alone{deaths}"), 10).await;
            deaths += 1;
            tokio::time::sleep(Duration::from_secs(11)).await;
            sweep(&stack.rt).await.unwrap();
        }
        // THEN it ends failed after max_attempts deaths of its own, the shared one forgiven
        assert_eq!(deaths, stack.rt.settings.max_attempts);
        let ended = task(&stack, &poison).await;
        assert_eq!(ended.state, TaskState::Failed);
        assert_eq!(ended.attempt, stack.rt.settings.max_attempts + 1);
        stack.drain(20).await;
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_charge_made_again_by_a_resumed_task_counts_once() {
        // GIVEN a background task that charged 30 tokens, then its worker died
        let (stack, _) = stack();
        let task_id = task_id_of(
            &stack
                .intake(call_event("spend_bg", "u1", json!({"n": 30})))
                .await,
        );
        let worker = tokio::spawn({
            let stack = stack.clone();
            async move { stack.work_once().await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        worker.abort();
        let today = stack.rt.now().date_naive();
        let used = || async { stack.usage.usage(EXT, "u1", today).await.unwrap()["tokens"] };
        assert_eq!(used().await, 30);
        // WHEN the sweeper revives it and it runs again, charging at the same position
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(sweep(&stack.rt).await.unwrap().requeued, 1);
        stack.drain(20).await;
        // THEN it finished, and the meter counted the charge once
        assert_eq!(task(&stack, &task_id).await.state, TaskState::Succeeded);
        assert_eq!(used().await, 30);
        assert_eq!(
            results_in(&stack, "chat-u1")[0].data,
            Some(json!({"used": 30}))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_workers_task_is_requeued_and_finishes_once() {
        // GIVEN a task whose worker died mid-run
        let (stack, runs) = stack();
        let task_id = task_id_of(&stack.intake(call_event("bg", "u1", json!({}))).await);
        claim_and_die(&stack, &task_id).await;
        // WHEN the lease lapses and the sweeper runs
        assert_eq!(sweep(&stack.rt).await.unwrap(), SweepReport::default());
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(
            sweep(&stack.rt).await.unwrap(),
            SweepReport {
                requeued: 1,
                ..SweepReport::default()
            }
        );
        // THEN a fresh worker runs it to one result, and the audit says it was reclaimed
        stack.drain(20).await;
        assert_eq!(runs.started.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(task(&stack, &task_id).await.state, TaskState::Succeeded);
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
        let audit = audit_kinds(&stack, &task_id).await;
        assert_eq!(count(&audit, AuditKind::Reclaimed), 1, "{audit:?}");
        // AND the chat was told once that the task resumed
        let resumed: Vec<_> = stack
            .chat
            .posted()
            .into_iter()
            .filter(|p| p.idempotency_key == format!("{task_id}:notice:resumed:2"))
            .collect();
        assert_eq!(resumed.len(), 1);
        assert!(audit.contains(&(AuditKind::Delivered, "delivered#notice#resumed#2".into())));
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_whose_worker_dies_every_time_ends_with_a_fallback() {
        let (stack, _) = stack();
        let task_id = task_id_of(&stack.intake(call_event("bg", "u1", json!({}))).await);
        for _ in 0..stack.rt.settings.max_attempts {
            claim_and_die(&stack, &task_id).await;
            tokio::time::sleep(Duration::from_secs(61)).await;
            sweep(&stack.rt).await.unwrap();
        }
        stack.drain(20).await;
        assert_eq!(task(&stack, &task_id).await.state, TaskState::Failed);
        let results = results_in(&stack, "chat-u1");
        assert_eq!(results.len(), 1);
        assert!(!results[0].ok);
        let audit = audit_kinds(&stack, &task_id).await;
        assert!(audit.contains(&(AuditKind::Critical, "critical#attempts_exhausted".into())));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_task_whose_worker_died_ends_cancelled() {
        let (stack, _) = stack();
        let task_id = task_id_of(&stack.intake(call_event("bg", "u1", json!({}))).await);
        claim_and_die(&stack, &task_id).await;
        let status = stack
            .intake(json!({"action":"cancel","ext":EXT,"user":"u1","task_id":task_id}))
            .await
            .status;
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(sweep(&stack.rt).await.unwrap().ended, 1);
        stack.drain(20).await;
        assert_eq!(task(&stack, &task_id).await.state, TaskState::Cancelled);
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_result_the_sweeper_could_not_send_is_sent_again_and_delivered_once() {
        // GIVEN a task whose worker died on every attempt, and a delivery queue that refuses
        // the send of its fallback result
        let (stack, _) = stack();
        let task_id = task_id_of(&stack.intake(call_event("bg", "u1", json!({}))).await);
        for attempt in 1..=stack.rt.settings.max_attempts {
            claim_and_die(&stack, &task_id).await;
            tokio::time::sleep(Duration::from_secs(61)).await;
            if attempt == stack.rt.settings.max_attempts {
                stack.delivery.fail_next_sends(1);
            }
            sweep(&stack.rt).await.unwrap();
        }
        stack.drain(20).await;
        assert_eq!(task(&stack, &task_id).await.state, TaskState::Failed);
        assert!(results_in(&stack, "chat-u1").is_empty());
        // WHEN the redelivery time passes and the sweeper runs (twice)
        tokio::time::sleep(stack.rt.settings.queue_grace + Duration::from_secs(1)).await;
        assert_eq!(sweep(&stack.rt).await.unwrap().redelivered, 1);
        assert_eq!(sweep(&stack.rt).await.unwrap(), SweepReport::default());
        stack.drain(20).await;
        // THEN the fallback reaches the chat once, and the task leaves the sweeper's work
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
        let ended = task(&stack, &task_id).await;
        assert!(ended.delivered_at.is_some() && ended.redeliver_at.is_none());
        tokio::time::sleep(REDELIVER_EVERY * 2).await;
        assert_eq!(sweep(&stack.rt).await.unwrap(), SweepReport::default());
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_task_cancelled_while_its_result_could_not_be_sent_gets_it_later() {
        // GIVEN a queued task whose work message was lost
        let (stack, runs) = stack();
        let task_id = task_id_of(&stack.intake(call_event("bg", "u1", json!({}))).await);
        stack.work.take(10);
        // WHEN the user cancels it while the delivery queue refuses sends
        stack.delivery.fail_next_sends(1);
        let cancel = json!({"action":"cancel","ext":EXT,"user":"u1","task_id":task_id});
        let _ = stack.intake(cancel).await;
        assert_eq!(task(&stack, &task_id).await.state, TaskState::Cancelled);
        stack.drain(20).await;
        assert!(results_in(&stack, "chat-u1").is_empty());
        // THEN the sweeper sends the "cancelled" result once the redelivery time passed
        tokio::time::sleep(stack.rt.settings.queue_grace + Duration::from_secs(1)).await;
        assert_eq!(sweep(&stack.rt).await.unwrap().redelivered, 1);
        stack.drain(20).await;
        let results = results_in(&stack, "chat-u1");
        assert_eq!(results.len(), 1);
        assert!(!results[0].ok);
        assert_eq!(runs.started.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_result_still_undelivered_is_sent_again_every_period_until_delivered() {
        // GIVEN a finished task whose result message keeps getting lost
        let (stack, _) = stack();
        let task_id = task_id_of(&stack.intake(call_event("bg", "u1", json!({}))).await);
        stack.work_once().await;
        assert_eq!(task(&stack, &task_id).await.state, TaskState::Succeeded);
        stack.delivery.take(10); // lost
        tokio::time::sleep(stack.rt.settings.queue_grace + Duration::from_secs(1)).await;
        assert_eq!(sweep(&stack.rt).await.unwrap().redelivered, 1);
        stack.delivery.take(10); // lost again
        // THEN it is not sent again before the period is over, and is after
        tokio::time::sleep(REDELIVER_EVERY - Duration::from_secs(2)).await;
        assert_eq!(sweep(&stack.rt).await.unwrap().redelivered, 0);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(sweep(&stack.rt).await.unwrap().redelivered, 1);
        stack.drain(20).await;
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlog_is_not_grown_by_copies_of_its_own_messages() {
        // GIVEN five queued tasks whose messages wait in a queue no worker reads for 30 min
        let (stack, _) = stack();
        for user in ["a", "b", "c", "d", "e"] {
            stack.intake(call_event("bg", user, json!({}))).await;
        }
        let sent_by_intake = stack.work.sent();
        // WHEN the sweeper runs every minute
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_secs(60)).await;
            sweep(&stack.rt).await.unwrap();
        }
        // THEN each task's message was sent again after 3, 7 and 15 minutes of waiting (each
        // time as long again as it had waited), not at every sweep after its 2-minute queue
        // grace lapsed (10 times each)
        let resent = stack.work.sent() - sent_by_intake;
        assert_eq!(resent, 5 * 3, "{resent} re-sends");
        // AND once the queue is worked, each task runs once
        stack.drain(50).await;
        for user in ["a", "b", "c", "d", "e"] {
            assert_eq!(results_in(&stack, &format!("chat-{user}")).len(), 1);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_task_whose_message_was_lost_is_sent_again() {
        let (stack, runs) = stack();
        let task_id = task_id_of(&stack.intake(call_event("bg", "u1", json!({}))).await);
        stack.work.take(10); // the message is lost
        tokio::time::sleep(stack.rt.settings.queue_grace + Duration::from_secs(1)).await;
        assert_eq!(sweep(&stack.rt).await.unwrap().requeued, 1);
        stack.drain(20).await;
        assert_eq!(runs.started.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(task(&stack, &task_id).await.state, TaskState::Succeeded);
    }

    #[tokio::test(start_paused = true)]
    async fn a_requeued_task_whose_cap_ran_out_while_it_waited_is_timed_out_by_a_worker() {
        // GIVEN a task whose worker died, requeued by the sweeper, and that message lost
        let (stack, runs) = stack();
        let task_id = task_id_of(&stack.intake(call_event("bg", "u1", json!({}))).await);
        claim_and_die(&stack, &task_id).await;
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(sweep(&stack.rt).await.unwrap().requeued, 1);
        stack.work.take(10);
        // WHEN its cap and the queue grace pass before any worker sees it
        tokio::time::sleep(stack.rt.settings.queue_grace + Duration::from_secs(1)).await;
        // THEN the sweeper sends it again rather than ending a queued task as timed out (no
        // legal move: the DynamoDB store refused it, and every sweep tried again, forever)
        assert_eq!(
            sweep(&stack.rt).await.unwrap(),
            SweepReport {
                requeued: 1,
                ..SweepReport::default()
            }
        );
        // AND the worker that claims it ends it timed out, without running the handler
        stack.drain(20).await;
        assert_eq!(task(&stack, &task_id).await.state, TaskState::TimedOut);
        assert_eq!(runs.started.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
        assert!(
            audit_kinds(&stack, &task_id)
                .await
                .contains(&(AuditKind::Critical, "critical#cap_exceeded".into()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_lettered_work_message_leaves_a_task_a_live_worker_holds() {
        // GIVEN a task a worker is running, and a copy of its work message dead-lettered
        let (stack, runs) = stack();
        let task_id = task_id_of(&stack.intake(call_event("bg", "u1", json!({}))).await);
        let message = stack.work.pending()[0].clone();
        let worker = tokio::spawn({
            let stack = stack.clone();
            async move { stack.work_once().await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(task(&stack, &task_id).await.state, TaskState::Running);
        work_dead_lettered(&stack.rt, &serde_json::to_string(&message).unwrap())
            .await
            .unwrap();
        // THEN the worker carries the task to its own result
        worker.await.unwrap();
        stack.drain(20).await;
        assert_eq!(task(&stack, &task_id).await.state, TaskState::Succeeded);
        assert_eq!(
            results_in(&stack, "chat-u1"),
            vec![crate::ActionResult::success(
                "Background done",
                json!({"echo": ""})
            )]
        );
        assert_eq!(runs.started.load(std::sync::atomic::Ordering::SeqCst), 1);
        let audit = audit_kinds(&stack, &task_id).await;
        assert_eq!(count(&audit, AuditKind::Critical), 0, "{audit:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_lettered_work_message_ends_its_task() {
        let (stack, _) = stack();
        let task_id = task_id_of(&stack.intake(call_event("bg", "u1", json!({}))).await);
        let message = stack.work.take(1).remove(0);
        work_dead_lettered(&stack.rt, &serde_json::to_string(&message).unwrap())
            .await
            .unwrap();
        stack.drain(20).await;
        assert_eq!(task(&stack, &task_id).await.state, TaskState::Failed);
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
        assert!(
            audit_kinds(&stack, &task_id)
                .await
                .contains(&(AuditKind::Critical, "critical#work_dead_lettered".into()))
        );
    }
}
