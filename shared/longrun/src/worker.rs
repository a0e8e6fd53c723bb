//! The worker step: claim a task's lease, run its handler under the task cap with a
//! heartbeat beside it, and end it — whatever happens — in a terminal state with a delivery
//! message. Duplicate messages for a live lease are dropped; a finished task only re-sends its
//! delivery.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;

use crate::ctx::{Caller, ProgressError, ProgressSink, TaskRun};
use crate::extension::{STOP_HOOK_BUDGET, StopReason, Stopped};
use crate::lease::RunLease;
use crate::outcome::{LastCheckpoint, Outcome, panic_message};
use crate::ports::{
    Claim, Created, Finish, FinishGuard, LeaseHolder, PortError, RequestKey, Requeue,
};
use crate::runtime::{Runtime, to_chrono};
use crate::step::{StepLog, StepRecord};
use crate::task::{AuditItem, AuditKind, Lease, Progress, Task, TaskState};
use crate::wire::{DeliveryMessage, MAX_RESULT_BYTES, Notice, WorkMessage};

/// How many messages of one batch run at once.
pub const BATCH_CONCURRENCY: usize = 10;

/// This worker process's id: the first part of every lease owner id it writes
/// (`{process}/{claim}`), so the sweeper can tell which tasks died together.
pub fn worker_process() -> &'static str {
    static PROCESS: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| ulid::Ulid::new().to_string());
    &PROCESS
}

/// The worker process a lease owner id names, if it names one (the queue's does not).
pub fn process_of(owner: &str) -> Option<&str> {
    owner.split_once('/').map(|(process, _)| process)
}

/// One SQS record: its message id and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRecord {
    /// The SQS message id, returned in the partial batch response when the message is to be
    /// redelivered.
    pub message_id: String,
    /// The message body: a JSON work or delivery message.
    pub body: String,
    /// How many times the queue has handed this message out (`ApproximateReceiveCount`).
    pub receive_count: u32,
}

impl QueueRecord {
    /// A record received for the first time.
    pub fn new(message_id: impl Into<String>, body: impl Into<String>) -> Self {
        Self {
            message_id: message_id.into(),
            body: body.into(),
            receive_count: 1,
        }
    }
}

/// Works a batch of work messages; returns the ids of those to be redelivered (the partial
/// batch response). `deadline` is the Lambda invocation's deadline, if any.
pub async fn handle_batch(
    rt: &Runtime,
    records: Vec<QueueRecord>,
    deadline: Option<Instant>,
) -> Vec<String> {
    let (records, mut failed) = isolate(rt, records).await;
    let run: Vec<String> = futures::stream::iter(records)
        .map(|record| async move {
            match handle_message(rt, &record.body, deadline).await {
                Ok(()) => None,
                Err(err) => {
                    tracing::warn!(message_id = %record.message_id, error = %err, "work message will be retried");
                    Some(record.message_id)
                }
            }
        })
        .buffer_unordered(BATCH_CONCURRENCY)
        .filter_map(|failed| async move { failed })
        .collect()
        .await;
    failed.extend(run);
    failed
}

/// An isolated task ([`Task::isolated`]) runs alone: when the batch holds one, it keeps that
/// message only and sends the others to the work queue again, for other invocations. Returns
/// the records to run here and the ids of those that could not be sent on (the queue
/// redelivers them).
async fn isolate(rt: &Runtime, records: Vec<QueueRecord>) -> (Vec<QueueRecord>, Vec<String>) {
    if records.len() < 2 {
        return (records, Vec::new());
    }
    let parsed: Vec<Option<WorkMessage>> = records
        .iter()
        .map(|r| serde_json::from_str(&r.body).ok())
        .collect();
    let Some(alone) = parsed
        .iter()
        .position(|m| m.as_ref().is_some_and(|m| m.isolated))
    else {
        return (records, Vec::new());
    };
    let mut keep = Vec::new();
    let mut failed = Vec::new();
    for (i, (record, message)) in records.into_iter().zip(parsed).enumerate() {
        if i == alone {
            keep.push(record);
            continue;
        }
        let Some(message) = message else {
            keep.push(record); // malformed: dropped by the usual path
            continue;
        };
        match rt.services.work.send(&message).await {
            Ok(()) => {
                tracing::info!(task_id = %message.task_id, "sent on: this invocation runs an isolated task alone")
            }
            Err(err) => {
                tracing::warn!(task_id = %message.task_id, error = %err, "not sent on; the queue redelivers it");
                failed.push(record.message_id);
            }
        }
    }
    (keep, failed)
}

/// Works one work message. `Err` means "redeliver it later".
pub async fn handle_message(
    rt: &Runtime,
    body: &str,
    deadline: Option<Instant>,
) -> Result<(), PortError> {
    let message: WorkMessage = match serde_json::from_str(body) {
        Ok(message) => message,
        Err(err) => {
            // Nothing names a task we could end; redelivery would not help either.
            tracing::error!(error = %err, "malformed work message dropped");
            return Ok(());
        }
    };
    let task_id = message.task_id.clone();
    let owner = format!("{}/{}", worker_process(), ulid::Ulid::new());
    let now = rt.now();
    let lease = Lease {
        owner,
        until: now + to_chrono(rt.settings.lease),
    };
    let mut claim = rt.services.tasks.claim(&task_id, &lease, now).await?;
    if claim == Claim::Missing {
        if !recover_missing(rt, &message).await? {
            return Ok(());
        }
        claim = rt.services.tasks.claim(&task_id, &lease, now).await?;
    }
    match claim {
        Claim::Claimed(task) => run(rt, task, lease, deadline, message.carry_on).await,
        Claim::Busy(task) if task.state == TaskState::Sleeping => {
            // Early: a sleep longer than the queue's longest delay, or a copy of the message.
            // Send it on for the rest of the sleep (one message in, one out).
            let left = task
                .wake_at
                .map(|at| (at - rt.now()).to_std().unwrap_or_default())
                .unwrap_or_default();
            rt.services.work.send_after(&message, left).await?;
            tracing::info!(%task_id, left_s = left.as_secs(), "sleeping task: work message sent on");
            Ok(())
        }
        Claim::Busy(_) => {
            tracing::info!(%task_id, "duplicate work message for a live lease dropped");
            Ok(())
        }
        Claim::Finished(task) => {
            if task.delivered_at.is_none() {
                send_result(rt, &task).await?;
            }
            Ok(())
        }
        Claim::Missing => Ok(()),
    }
}

/// The task record was never written (intake's write failed after its message went out):
/// write it from the message, unless its request key names another task. Returns whether
/// the task now exists.
async fn recover_missing(rt: &Runtime, message: &WorkMessage) -> Result<bool, PortError> {
    let age = (rt.now() - message.created_at).to_std().unwrap_or_default();
    if age >= rt.settings.task_ttl {
        // Records are kept this long after a task finishes: this one may have run, finished
        // and expired long ago (an old message redriven from a dead-letter queue). Writing
        // it again would run it a second time.
        tracing::error!(task_id = %message.task_id, age_s = age.as_secs(), "work message older than the task TTL, for a task with no record, dropped");
        return Ok(false);
    }
    let request = message.request_id.as_ref().map(|request_id| RequestKey {
        ext: message.ext.clone(),
        user: message.user.clone(),
        request_id: request_id.clone(),
    });
    if let Some(request) = &request
        && let Some(existing) = rt.services.tasks.find_request(request).await?
        && existing != message.task_id
    {
        tracing::info!(task_id = %message.task_id, %existing, "work message of a duplicate request dropped");
        return Ok(false);
    }
    if rt.extension_name() != message.ext {
        tracing::error!(task_id = %message.task_id, ext = %message.ext, "work message for another extension dropped");
        return Ok(false);
    }
    let mut task = message.to_task();
    task.lease = Some(rt.queue_lease(rt.now()));
    if let Created::AtLimit(_) = rt.create_within_limit(&task, request.as_ref()).await? {
        // Intake refused this call (its user is at the limit) while the message was on its
        // way, or will find the task written when its own write lands: run nothing now.
        tracing::info!(task_id = %task.task_id, "work message of a user at the task limit dropped");
        return Ok(false);
    }
    // Usually the message simply overtook intake's concurrent PutItem (the conditional write
    // makes this a no-op then); rarely that write was lost and this one restores the record.
    tracing::info!(task_id = %task.task_id, "task record written from its work message");
    Ok(true)
}

/// How the race between handler, cap, heartbeat and Lambda deadline ended.
enum Ending {
    Done(Outcome),
    /// Another worker holds the task now; leave it alone.
    LeaseLost,
    /// The invocation is about to end: hand the task to a fresh one.
    Continue,
    /// The handler sleeps (`ctx.sleep`, `ctx.poll`) until this moment.
    Sleep(DateTime<Utc>),
}

async fn run(
    rt: &Runtime,
    task: Task,
    lease: Lease,
    deadline: Option<Instant>,
    carry_on: bool,
) -> Result<(), PortError> {
    let now = rt.now();
    // A claim after a stopped worker. A hand-off or a sleep gives its attempt back, so after
    // one the attempts above 1 are old news: its message says it carries the task on.
    let resumed = task.attempt > 1 && !carry_on;
    if resumed {
        let audit = AuditItem::new(
            &task,
            format!("reclaimed#{}", task.attempt),
            AuditKind::Reclaimed,
            now,
            format!("attempt {}", task.attempt),
        );
        rt.services.tasks.append_audit(&audit).await?;
    }
    let ending = if task.counted_attempts() > rt.settings.max_attempts {
        Ending::Done(Outcome::failed(
            &task.function,
            "attempts_exhausted",
            format!(
                "the worker stopped on each of {} attempts",
                rt.settings.max_attempts
            ),
            false,
        ))
    } else if task.cancel_requested {
        Ending::Done(Outcome::cancelled(&task.function))
    } else {
        let remaining = task
            .cap_deadline()
            .map(|d| (d - now).to_std().unwrap_or(Duration::ZERO))
            .unwrap_or(Duration::ZERO);
        if remaining.is_zero() {
            Ending::Done(Outcome::timed_out(&task.function, task.cap_s))
        } else {
            let recorded = match rt.services.tasks.steps(&task.task_id).await {
                Ok(recorded) => recorded,
                Err(err) => {
                    // Give the task back so the redelivered message can claim it at once.
                    let guard = Requeue::Owner(lease.owner.clone());
                    rt.services
                        .tasks
                        .requeue(&task.task_id, &guard, &rt.queue_lease(rt.now()))
                        .await?;
                    return Err(err);
                }
            };
            if resumed {
                // The previous worker stopped without finishing (a hand-off gives its attempt
                // back): tell the chat once that the task goes on.
                let message = DeliveryMessage::Notice {
                    task_id: task.task_id.clone(),
                    notice: Notice::Resumed {
                        attempt: task.attempt,
                    },
                };
                if let Err(err) = rt.services.delivery.send(&message).await {
                    tracing::warn!(task_id = %task.task_id, error = %err, "resume notice not sent");
                }
            }
            execute(
                rt,
                &task,
                &lease,
                Instant::now() + remaining,
                deadline,
                recorded,
            )
            .await
        }
    };
    match ending {
        Ending::Done(outcome) => {
            if let Some(reason) = match outcome.state {
                TaskState::Cancelled => Some(StopReason::Cancelled),
                TaskState::TimedOut => Some(StopReason::TimedOut),
                _ => None,
            } {
                run_stop_hook(rt, &task, reason).await;
            }
            end(rt, &task, FinishGuard::Owner(lease.owner.clone()), outcome).await
        }
        Ending::Sleep(wake_at) => suspend(rt, &task, &lease, wake_at).await,
        Ending::LeaseLost => {
            tracing::warn!(task_id = %task.task_id, "lease lost; another worker carries on");
            Ok(())
        }
        Ending::Continue => {
            let guard = Requeue::Owner(lease.owner.clone());
            rt.services
                .tasks
                .requeue(&task.task_id, &guard, &rt.queue_lease(rt.now()))
                .await?;
            rt.services
                .work
                .send(&WorkMessage::carrying_on(&task))
                .await?;
            tracing::info!(task_id = %task.task_id, "handed on to a fresh invocation before the Lambda deadline");
            Ok(())
        }
    }
}

/// Puts the task to sleep until `wake_at` (the cap's end at the latest, when the worker that
/// takes it up ends it timed out) and sends its work message with the delay — none if a
/// cancel arrived meanwhile, so that it ends now.
async fn suspend(
    rt: &Runtime,
    task: &Task,
    lease: &Lease,
    wake_at: DateTime<Utc>,
) -> Result<(), PortError> {
    let wake_at = task.cap_deadline().map_or(wake_at, |cap| wake_at.min(cap));
    let sleeping = match rt
        .services
        .tasks
        .suspend(
            &task.task_id,
            &lease.owner,
            wake_at,
            &rt.queue_lease(wake_at),
        )
        .await
    {
        Ok(sleeping) => sleeping,
        Err(PortError::Conflict(reason)) => {
            tracing::warn!(task_id = %task.task_id, %reason, "lease lost before the sleep; another worker carries on");
            return Ok(());
        }
        // The task keeps this worker's lease, which lapses; the sweeper or the redelivered
        // message takes it up.
        Err(err) => return Err(err),
    };
    let delay = if sleeping.cancel_requested {
        Duration::ZERO
    } else {
        (wake_at - rt.now()).to_std().unwrap_or_default()
    };
    // If the send fails, the message is redelivered and finds the task sleeping (sent on
    // then); failing that, the sweeper sends it a queue grace after `wake_at`.
    rt.services
        .work
        .send_after(&WorkMessage::carrying_on(&sleeping), delay)
        .await?;
    tracing::info!(task_id = %task.task_id, %wake_at, "sleeping");
    Ok(())
}

/// Runs the task's `on_stop` hook, if it has one, within [`STOP_HOOK_BUDGET`]. Its failure
/// is logged: the task ends either way.
async fn run_stop_hook(rt: &Runtime, task: &Task, reason: StopReason) {
    let Some(hook) = rt
        .extension()
        .and_then(|e| e.stop_hook(task.kind, &task.function))
    else {
        return;
    };
    let steps = match rt.services.tasks.steps(&task.task_id).await {
        Ok(steps) => steps,
        Err(err) => {
            tracing::warn!(task_id = %task.task_id, error = %err, "steps not read for the stop hook; it runs without them");
            Vec::new()
        }
    };
    let caller = Caller::from(task);
    let deadline = Instant::now() + STOP_HOOK_BUDGET;
    let ctx = rt.ctx(
        caller,
        Some(deadline),
        None,
        Some(format!("stop:{}", task.task_id)),
    );
    let stopped = Stopped::new(reason, task.params.clone(), steps);
    match tokio::time::timeout(
        STOP_HOOK_BUDGET,
        AssertUnwindSafe(hook(ctx, stopped)).catch_unwind(),
    )
    .await
    {
        Ok(Ok(Ok(()))) => tracing::info!(task_id = %task.task_id, ?reason, "stop hook ran"),
        Ok(Ok(Err(err))) => {
            tracing::warn!(task_id = %task.task_id, error = %err, "stop hook failed")
        }
        Ok(Err(panic)) => {
            tracing::warn!(task_id = %task.task_id, panic = %panic_message(&*panic), "stop hook panicked")
        }
        Err(_) => tracing::warn!(task_id = %task.task_id, "stop hook ran out of time"),
    }
}

async fn execute(
    rt: &Runtime,
    task: &Task,
    lease: &Lease,
    cap_deadline: Instant,
    lambda_deadline: Option<Instant>,
    recorded_steps: Vec<StepRecord>,
) -> Ending {
    let Some(handler) = rt
        .extension()
        .and_then(|e| e.handler(task.kind, &task.function))
    else {
        return Ending::Done(Outcome::failed(
            &task.function,
            "unknown_function",
            format!("{:?} is not registered in this deployment", task.function),
            false,
        ));
    };

    let run_lease = Arc::new(RunLease::new(LeaseHolder {
        task_id: task.task_id.clone(),
        owner: lease.owner.clone(),
    }));
    let checkpoint = Arc::new(Checkpoint::new(
        rt.clone(),
        task,
        lease.clone(),
        Arc::clone(&run_lease),
    ));
    let caller = Caller::from(task);
    let yield_at = lambda_deadline
        .map(|d| d.checked_sub(rt.settings.deadline_margin).unwrap_or(d))
        .filter(|d| *d < cap_deadline);
    let steps = Arc::new(StepLog::new(
        Arc::clone(&rt.services.tasks),
        Arc::clone(&rt.services.clock),
        Arc::clone(&run_lease),
        recorded_steps,
        yield_at,
        rt.settings.step_budget,
    ));
    let run = TaskRun {
        task_id: task.task_id.clone(),
        progress: Arc::clone(&checkpoint) as Arc<dyn ProgressSink>,
        steps: Arc::clone(&steps),
        lease: Arc::clone(&run_lease),
    };
    let ctx = rt.ctx(
        caller,
        Some(cap_deadline),
        Some(run),
        Some(format!("task:{}", task.task_id)),
    );
    let work = AssertUnwindSafe(handler(ctx, task.params.clone())).catch_unwind();
    tokio::pin!(work);

    let first = tokio::select! {
        finished = &mut work => Some(finished),
        _ = tokio::time::sleep_until(cap_deadline) => {
            let timed_out = Outcome::timed_out(&task.function, task.cap_s);
            return Ending::Done(checkpoint.hand_over(timed_out).await);
        }
        _ = sleep_until_opt(yield_at) => {
            checkpoint.flush().await;
            return Ending::Continue;
        }
        // A step or store write found the task taken over: stop at once.
        _ = run_lease.lost() => return Ending::LeaseLost,
        _ = steps.handed_off() => {
            checkpoint.flush().await;
            return Ending::Continue;
        }
        wake_at = steps.suspended() => {
            // Progress and the partial result go out before the task sleeps; the write also
            // reads the cancel flag.
            checkpoint.flush().await;
            if run_lease.is_lost() {
                return Ending::LeaseLost;
            }
            if checkpoint.is_cancelled() {
                let cancelled = Outcome::cancelled(&task.function);
                return Ending::Done(checkpoint.hand_over(cancelled).await);
            }
            return Ending::Sleep(wake_at);
        }
        stop = checkpoint.heartbeat() => match stop {
            Stop::LeaseLost => return Ending::LeaseLost,
            Stop::Cancelled => None,
        },
    };
    let finished = match first {
        Some(finished) => finished,
        // Cancelled: give the handler a moment to notice at a progress call, then drop it —
        // which aborts whatever it awaits, an HTTP call included.
        None => match tokio::time::timeout(rt.settings.cancel_grace, &mut work).await {
            Ok(finished) => finished,
            Err(_) => {
                tracing::info!(task_id = %task.task_id, "cancelled handler dropped after the grace period");
                let cancelled = Outcome::cancelled(&task.function);
                return Ending::Done(checkpoint.hand_over(cancelled).await);
            }
        },
    };
    // How the run ended is decided from what the runtime itself saw, not from the handler's
    // error: a lost lease, a replay that met another step than the record holds. The last
    // progress and partial result are written with the end (`hand_over`), not before it.
    if run_lease.is_lost() {
        return Ending::LeaseLost;
    }
    if let Some(mismatch) = steps.mismatch() {
        return Ending::Done(Outcome::failed(
            &task.function,
            "replay_mismatch",
            mismatch,
            false,
        ));
    }
    let outcome = match finished {
        Ok(Ok(result)) if result.wire_size() > MAX_RESULT_BYTES => Outcome::failed(
            &task.function,
            "result_too_large",
            format!(
                "result is {} bytes; the limit is {MAX_RESULT_BYTES}",
                result.wire_size()
            ),
            false,
        ),
        Ok(Ok(result))
            if let Err(reason) = serde_json::to_value(&result)
                .map_err(|e| e.to_string())
                .and_then(|v| crate::wire::check_storable(&v)) =>
        {
            Outcome::failed(
                &task.function,
                "result_unstorable",
                format!("result {reason}"),
                false,
            )
        }
        Ok(Ok(result)) => Outcome::returned(result),
        // An error after the cancel was seen is the cancel's doing, whatever the handler made
        // of it (a cancelled AI call turned into a step's error value, say).
        Ok(Err(err)) if err.is_cancelled() || checkpoint.is_cancelled() => {
            Outcome::cancelled(&task.function)
        }
        Ok(Err(ref err)) if let Some(result) = err.user_result() => Outcome::returned(result),
        Ok(Err(err)) => Outcome::failed(&task.function, "handler_error", err.to_string(), true),
        Err(panic) => Outcome::failed(
            &task.function,
            "handler_panic",
            format!("handler panicked: {}", panic_message(&*panic)),
            false,
        ),
    };
    Ending::Done(checkpoint.hand_over(outcome).await)
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Writes the terminal state with the audit items that say how it ended (in one write, so
/// they exist exactly when the end happened), then sends the delivery message.
pub(crate) async fn end(
    rt: &Runtime,
    task: &Task,
    guard: FinishGuard,
    outcome: Outcome,
) -> Result<(), PortError> {
    let now = rt.now();
    // A cancelled or timed-out end hands the user what the handler recorded (the run's own
    // latest value when the worker ends it, else the one the record holds).
    let outcome = outcome.with_partial(task.partial.as_ref());
    let mut audit = Vec::new();
    if let Some(critical) = &outcome.critical {
        audit.push(AuditItem::new(
            task,
            format!("critical#{}", critical.reason),
            AuditKind::Critical,
            now,
            critical.detail.clone(),
        ));
    }
    if outcome.state == TaskState::Cancelled {
        audit.push(AuditItem::new(
            task,
            "cancelled",
            AuditKind::Cancelled,
            now,
            "",
        ));
    }
    let checkpoint = outcome.checkpoint.unwrap_or_default();
    let finish = Finish {
        state: outcome.state,
        result: outcome.result,
        at: now,
        guard,
        redeliver_at: rt.redeliver_at(now),
        audit,
        progress: checkpoint.progress,
        partial: checkpoint.partial,
    };
    match rt.services.tasks.finish(&task.task_id, &finish).await {
        Ok(ended) => {
            if let Some(critical) = &outcome.critical {
                tracing::error!(task_id = %task.task_id, ext = %task.ext, user = %task.user, reason = critical.reason, detail = %critical.detail, "critical: task failed");
            }
            tracing::info!(task_id = %ended.task_id, state = %ended.state, "task ended");
            send_result(rt, &ended).await
        }
        Err(PortError::Conflict(reason)) => {
            tracing::warn!(task_id = %task.task_id, %reason, "task was ended elsewhere");
            Ok(())
        }
        Err(err) => Err(err),
    }
}

pub(crate) async fn send_result(rt: &Runtime, task: &Task) -> Result<(), PortError> {
    rt.services
        .delivery
        .send(&DeliveryMessage::Result {
            task_id: task.task_id.clone(),
        })
        .await
}

/// Why the heartbeat stopped the handler.
enum Stop {
    Cancelled,
    LeaseLost,
}

struct Written {
    /// The last progress the handler reported.
    reported: Progress,
    /// The last progress written to the table.
    written: Progress,
    /// When the last write (progress or heartbeat) was made — or tried: a table that fails
    /// is tried again a period later, not in a tight loop.
    at: Instant,
    /// When the cancel flag and lease were last read without a write.
    checked: Instant,
    /// When the lease was last renewed (the claim, or a write that landed): a renewal that
    /// failed is tried again at the next heartbeat, not a renewal period later.
    renewed: Instant,
    /// The last partial result the handler recorded (`ctx.partial`)...
    partial: Option<serde_json::Value>,
    /// ...and whether the table holds it.
    partial_stored: bool,
    /// When the reported progress last changed (or the run started).
    moved_at: Instant,
    /// The task's `progress_seq` as last written.
    seq: u64,
    /// The `progress_seq` a stall notice was sent for: one per stall episode.
    noticed: Option<u64>,
}

impl Written {
    /// The progress and partial result the run reported that the table does not hold yet.
    fn unwritten(&self) -> LastCheckpoint {
        LastCheckpoint {
            progress: (self.reported != self.written).then(|| self.reported.clone()),
            partial: self.partial.clone().filter(|_| !self.partial_stored),
        }
    }

    /// Whether anything the run reported waits to be written.
    fn has_unwritten(&self) -> bool {
        self.reported != self.written || !self.partial_stored
    }
}

/// The running task's checkpoint writer: the single place progress, heartbeats, lease renewal
/// and the cancel flag meet. Progress bursts are coalesced to one write per
/// `progress_interval`; the last value is written by the next heartbeat or at the end.
struct Checkpoint {
    rt: Runtime,
    task: Task,
    lease: Lease,
    /// How long progress may stand still before the chat gets a notice; `None`: never.
    stall_after: Option<Duration>,
    state: Mutex<Written>,
    cancelled: AtomicBool,
    /// Tells `ctx.http` calls in flight that the task was cancelled.
    cancel_signal: tokio::sync::watch::Sender<bool>,
    run_lease: Arc<RunLease>,
    stopped: Notify,
}

impl Checkpoint {
    fn new(rt: Runtime, task: &Task, lease: Lease, run_lease: Arc<RunLease>) -> Self {
        let stall_after = rt
            .extension()
            .and_then(|e| e.stall_notice(task.kind, &task.function))
            .unwrap_or(Some(rt.settings.stall_after));
        Self {
            task: task.clone(),
            lease,
            stall_after,
            state: Mutex::new(Written {
                reported: task.progress.clone(),
                written: task.progress.clone(),
                // The first progress call writes at once.
                at: Instant::now()
                    .checked_sub(rt.settings.progress_interval)
                    .unwrap_or_else(Instant::now),
                checked: Instant::now(),
                renewed: Instant::now(),
                partial: task.partial.clone(),
                partial_stored: true,
                moved_at: Instant::now(),
                seq: task.progress_seq,
                noticed: None,
            }),
            cancelled: AtomicBool::new(false),
            cancel_signal: tokio::sync::watch::Sender::new(false),
            run_lease,
            stopped: Notify::new(),
            rt,
        }
    }

    fn is_lease_lost(&self) -> bool {
        self.run_lease.is_lost()
    }

    /// Whether the cancel flag was seen.
    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    fn check(&self) -> Result<(), ProgressError> {
        if self.is_lease_lost() {
            Err(ProgressError::LeaseLost)
        } else if self.cancelled.load(Ordering::SeqCst) {
            Err(ProgressError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// One conditional write: lease, heartbeat, and the checkpoint if it changed.
    async fn write(&self, state: &mut Written) {
        let started = Instant::now();
        state.at = started;
        let now = self.rt.now();
        let lease = Lease {
            owner: self.lease.owner.clone(),
            until: now + to_chrono(self.rt.settings.lease),
        };
        let LastCheckpoint { progress, partial } = state.unwritten();
        match self
            .rt
            .services
            .tasks
            .beat(
                &self.task.task_id,
                &lease,
                progress.as_ref(),
                partial.as_ref(),
                now,
            )
            .await
        {
            Ok(beat) => {
                state.renewed = started;
                state.seq = beat.progress_seq;
                if partial.is_some() {
                    state.partial_stored = true;
                }
                if let Some(progress) = progress {
                    state.written = progress.clone();
                    let message = DeliveryMessage::Progress {
                        task_id: self.task.task_id.clone(),
                        seq: beat.progress_seq,
                        progress,
                    };
                    if let Err(err) = self.rt.services.delivery.send(&message).await {
                        // The record holds the checkpoint; the chat misses one update.
                        tracing::warn!(task_id = %self.task.task_id, error = %err, "progress message not sent");
                    }
                }
                if beat.cancel_requested {
                    self.observe_cancel();
                }
            }
            Err(PortError::Conflict(reason)) => {
                tracing::debug!(task_id = %self.task.task_id, %reason, "heartbeat refused");
                self.lose_lease();
            }
            Err(err) => {
                // The lease outlives several heartbeats; the next one tries again.
                tracing::warn!(task_id = %self.task.task_id, error = %err, "heartbeat failed");
            }
        }
    }

    /// One read between renewals: the cancel flag, and whether this worker still holds the
    /// lease. A read costs a fraction of a write, so the cancel flag is checked as often as
    /// ever while the lease is renewed less often.
    async fn check_in(&self, state: &mut Written) {
        state.checked = Instant::now();
        match self.rt.services.tasks.peek(&self.task.task_id).await {
            Ok(Some(peek))
                if peek.state == TaskState::Running
                    && peek.lease_owner.as_deref() == Some(self.lease.owner.as_str()) =>
            {
                if peek.cancel_requested {
                    self.observe_cancel();
                }
            }
            Ok(_) => {
                tracing::debug!(task_id = %self.task.task_id, "lease found taken over at a heartbeat");
                self.lose_lease();
            }
            Err(err) => {
                tracing::warn!(task_id = %self.task.task_id, error = %err, "heartbeat read failed");
            }
        }
    }

    fn observe_cancel(&self) {
        if !self.cancelled.swap(true, Ordering::SeqCst) {
            tracing::info!(task_id = %self.task.task_id, "cancel observed");
            // An HTTP call in flight (the AI call, typically) stops now, not after the grace
            // period.
            self.cancel_signal.send_replace(true);
            self.stopped.notify_waiters();
        }
    }

    fn lose_lease(&self) {
        self.run_lease.mark_lost();
        self.stopped.notify_waiters();
    }

    /// Watches the task until it is cancelled or the lease is lost: a `heartbeat` after the
    /// last write or read, it writes — renewing the lease — when a renewal is due
    /// ([`Settings::renew_every`](crate::Settings::renew_every)) or progress or a partial
    /// result waits, and otherwise only reads the cancel flag and the lease. So the flag is
    /// read at least once a heartbeat, a progress write stands in for a heartbeat, and a
    /// silent task writes once a renewal period.
    async fn heartbeat(&self) -> Stop {
        let every = self.rt.settings.heartbeat;
        let renew = self.rt.settings.renew_every();
        // `checked` and `renewed` start at the claim, which renewed the lease: the first
        // heartbeat is one period away, the first renewal a renewal period.
        loop {
            let stopped = self.stopped.notified();
            tokio::pin!(stopped);
            let due = {
                let state = self.state.lock().await;
                state.at.max(state.checked) + every
            };
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {
                    let mut state = self.state.lock().await;
                    // A progress write since `due` was set moved the next one on; a
                    // coalesced progress value goes out with this one.
                    if state.at.elapsed() >= every && state.checked.elapsed() >= every {
                        if state.has_unwritten() || state.renewed.elapsed() >= renew {
                            self.write(&mut state).await;
                        } else {
                            self.check_in(&mut state).await;
                        }
                    }
                    self.notice_stall(&mut state).await;
                }
                _ = &mut stopped => {}
            }
            if self.is_lease_lost() {
                return Stop::LeaseLost;
            }
            if self.cancelled.load(Ordering::SeqCst) {
                return Stop::Cancelled;
            }
        }
    }

    /// Tells the chat once per stall episode that a live task's progress has stood still for
    /// the stall period. Sent after a successful heartbeat (the task is alive and not
    /// cancelled); delivery drops it if the task moved on or ended meanwhile.
    async fn notice_stall(&self, state: &mut Written) {
        let Some(stall_after) = self.stall_after else {
            return;
        };
        if state.moved_at.elapsed() < stall_after
            || state.noticed == Some(state.seq)
            || self.is_cancelled()
            || self.is_lease_lost()
        {
            return;
        }
        state.noticed = Some(state.seq);
        let started = self.task.started_at.unwrap_or(self.task.created_at);
        let running_s = (self.rt.now() - started).num_seconds().max(0) as u64;
        let message = DeliveryMessage::Notice {
            task_id: self.task.task_id.clone(),
            notice: Notice::Stalled {
                seq: state.seq,
                running_s,
            },
        };
        tracing::info!(task_id = %self.task.task_id, running_s, "progress stalled; the chat is told");
        if let Err(err) = self.rt.services.delivery.send(&message).await {
            tracing::warn!(task_id = %self.task.task_id, error = %err, "stall notice not sent");
        }
    }

    /// Writes the last reported progress and partial result if they were not written yet.
    async fn flush(&self) {
        let mut state = self.state.lock().await;
        if state.has_unwritten() && !self.is_lease_lost() {
            self.write(&mut state).await;
        }
    }

    /// `outcome`, with the last partial result the handler recorded (written or not) if it
    /// is a cancelled or timed-out end, and the checkpoint not written yet, to be written
    /// with the end.
    async fn hand_over(&self, outcome: Outcome) -> Outcome {
        let state = self.state.lock().await;
        let mut outcome = outcome.with_partial(state.partial.as_ref());
        outcome.checkpoint = Some(state.unwritten());
        outcome
    }
}

#[async_trait]
impl ProgressSink for Checkpoint {
    fn cancel_signal(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        Some(self.cancel_signal.subscribe())
    }

    async fn report(&self, mut progress: Progress) -> Result<(), ProgressError> {
        self.check()?;
        let mut state = self.state.lock().await;
        // Progress in the chat never goes backwards.
        progress.pct = progress.pct.max(state.reported.pct);
        if progress != state.reported {
            state.moved_at = Instant::now();
        }
        state.reported = progress;
        if state.at.elapsed() >= self.rt.settings.progress_interval
            && state.reported != state.written
        {
            self.write(&mut state).await;
        }
        drop(state);
        self.check()
    }

    async fn partial(&self, value: serde_json::Value) {
        let mut state = self.state.lock().await;
        state.partial = Some(value);
        state.partial_stored = false;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering as AtomicOrdering;

    use serde_json::json;

    use super::*;
    use crate::ports::TaskStore;
    use crate::task::TaskId;
    use crate::testing::fixture::*;
    use crate::wire::ChatMessage;
    use crate::{ActionResult, Settings};

    async fn cancel(stack: &crate::testing::MemoryStack, user: &str, task_id: &TaskId) -> u16 {
        stack
            .intake(json!({"action":"cancel","ext":EXT,"user":user,"task_id":task_id}))
            .await
            .status
    }

    #[tokio::test(start_paused = true)]
    async fn pattern_b_runs_reports_progress_and_delivers_once() {
        // GIVEN a background call
        let (stack, runs) = stack();
        let task_id = task_id_of(
            &stack
                .intake(call_event("bg", "u1", json!({"input": "hi"})))
                .await,
        );
        // WHEN the queues are worked
        stack.drain(20).await;
        // THEN the chat shows progress in order, then one result
        assert_eq!(progress_in(&stack, "chat-u1"), vec![10, 50]);
        assert_eq!(
            results_in(&stack, "chat-u1"),
            vec![ActionResult::success(
                "Background done",
                json!({"echo": "hi"})
            )]
        );
        let posted = stack.chat.posted();
        assert!(
            matches!(posted.last().unwrap().message, ChatMessage::Result { ref event, .. } if event.as_deref() == Some("bg_done"))
        );
        // AND the record and the audit trail tell the story
        let task = task(&stack, &task_id).await;
        assert_eq!(task.state, TaskState::Succeeded);
        assert_eq!(task.attempt, 1);
        assert_eq!(task.progress.pct, 50);
        assert!(
            task.started_at.is_some() && task.finished_at.is_some() && task.delivered_at.is_some()
        );
        let audit = audit_kinds(&stack, &task_id).await;
        assert!(audit.contains(&(AuditKind::Delivered, "delivered#result".into())));
        assert_eq!(
            count(&audit, AuditKind::Delivered),
            3,
            "two progress messages and the result"
        );
        assert_eq!(count(&audit, AuditKind::Critical), 0);
        assert_eq!(runs.started.load(AtomicOrdering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn pattern_c_job_result_reaches_the_same_chat() {
        let (stack, _) = stack();
        let task_id = task_id_of(
            &stack
                .intake(call_event("launch", "u1", json!({"input": "doc"})))
                .await,
        );
        stack.drain(20).await;
        assert_eq!(
            results_in(&stack, "chat-u1"),
            vec![ActionResult::success("Job done", json!({"echo": "doc"}))]
        );
        assert_eq!(task(&stack, &task_id).await.state, TaskState::Succeeded);
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_work_message_three_times_runs_once() {
        // GIVEN a task whose work message arrives three times in one batch
        let (stack, runs) = stack();
        let task_id = task_id_of(&stack.intake(call_event("bg", "u1", json!({}))).await);
        let message = stack.work.pending()[0].clone();
        stack.work.push(message.clone());
        stack.work.push(message.clone());
        stack.drain(20).await;
        // AND once more after it finished
        stack.work.push(message);
        stack.drain(20).await;
        // THEN the handler ran once and the chat got one result
        assert_eq!(runs.started.load(AtomicOrdering::SeqCst), 1);
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
        assert_eq!(task(&stack, &task_id).await.attempt, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn exceeding_the_cap_times_out_with_a_fallback_and_a_critical_audit() {
        let (stack, _) = stack();
        let task_id = task_id_of(&stack.intake(call_event("sleepy", "u1", json!({}))).await);
        let started = Instant::now();
        stack.drain(20).await;
        // The 180 s cap, on tokio's paused clock.
        assert_eq!(started.elapsed().as_secs(), 180);
        let task = task(&stack, &task_id).await;
        assert_eq!(task.state, TaskState::TimedOut);
        let results = results_in(&stack, "chat-u1");
        assert_eq!(results.len(), 1);
        assert!(!results[0].ok);
        assert!(
            results[0].summary.contains("180 s"),
            "{}",
            results[0].summary
        );
        assert!(
            audit_kinds(&stack, &task_id)
                .await
                .contains(&(AuditKind::Critical, "critical#cap_exceeded".into()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_returned_error_or_a_panic_delivers_a_fallback_and_a_critical_audit() {
        for (function, reason) in [
            ("fails", "critical#handler_error"),
            ("panics", "critical#handler_panic"),
        ] {
            let (stack, _) = stack();
            let task_id = task_id_of(&stack.intake(call_event(function, "u1", json!({}))).await);
            stack.drain(20).await;
            let task = task(&stack, &task_id).await;
            assert_eq!(task.state, TaskState::Failed, "{function}");
            let results = results_in(&stack, "chat-u1");
            assert_eq!(results.len(), 1, "{function}");
            assert!(!results[0].ok);
            assert!(results[0].summary.contains(&format!("'{function}' failed")));
            // The user sees no internals; the operator's audit item has them.
            assert!(
                !results[0].summary.contains("exploded") && !results[0].summary.contains("bug")
            );
            let trail = stack.tasks.audit_trail(&task_id).await.unwrap();
            let critical = trail
                .iter()
                .find(|a| a.audit_id == reason)
                .unwrap_or_else(|| panic!("{reason}"));
            assert!(critical.detail.contains(if function == "fails" {
                "upstream exploded"
            } else {
                "handler bug"
            }));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_result_too_large_for_the_table_fails_clearly() {
        let (stack, _) = stack();
        let task_id = task_id_of(&stack.intake(call_event("huge", "u1", json!({}))).await);
        stack.drain(20).await;
        assert_eq!(task(&stack, &task_id).await.state, TaskState::Failed);
        assert!(
            audit_kinds(&stack, &task_id)
                .await
                .contains(&(AuditKind::Critical, "critical#result_too_large".into()))
        );
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_result_or_step_output_the_table_cannot_store_fails_at_once() {
        for (params, reason) in [
            (json!({}), "critical#result_unstorable"),
            (json!({"input": "in_step"}), "critical#handler_error"),
        ] {
            let (stack, _) = stack();
            let task_id = task_id_of(&stack.intake(call_event("unstorable", "u1", params)).await);
            stack.drain(20).await;
            let record = task(&stack, &task_id).await;
            // Failed on the first attempt: nothing to retry, no "attempts exhausted".
            assert_eq!((record.state, record.attempt), (TaskState::Failed, 1));
            let trail = stack.tasks.audit_trail(&task_id).await.unwrap();
            let critical: Vec<_> = trail
                .iter()
                .filter(|a| a.kind == AuditKind::Critical)
                .collect();
            assert_eq!(critical.len(), 1, "{trail:?}");
            assert_eq!(critical[0].audit_id, reason);
            assert!(
                critical[0].detail.contains("1e+300"),
                "{}",
                critical[0].detail
            );
            let results = results_in(&stack, "chat-u1");
            assert_eq!(results.len(), 1);
            assert!(!results[0].ok);
            assert!(stack.tasks.steps(&task_id).await.unwrap().is_empty());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn progress_outside_0_to_100_is_a_typed_error_to_the_handler() {
        for pct in [101, -1, 1000] {
            let (stack, _) = stack();
            stack
                .intake(call_event("bad_progress", "u1", json!({"pct": pct})))
                .await;
            stack.drain(20).await;
            let results = results_in(&stack, "chat-u1");
            assert_eq!(
                results[0].summary,
                format!("progress pct {pct} is outside 0–100")
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_before_start_ends_the_task_without_running_it() {
        let (stack, runs) = stack();
        let task_id = task_id_of(&stack.intake(call_event("bg", "u1", json!({}))).await);
        assert_eq!(cancel(&stack, "u1", &task_id).await, 200);
        stack.drain(20).await;
        assert_eq!(runs.started.load(AtomicOrdering::SeqCst), 0);
        assert_eq!(task(&stack, &task_id).await.state, TaskState::Cancelled);
        assert_eq!(
            results_in(&stack, "chat-u1"),
            vec![ActionResult::error("'bg' was cancelled.", false)]
        );
        assert_eq!(
            count(&audit_kinds(&stack, &task_id).await, AuditKind::Cancelled),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_whose_delivery_message_is_lost_is_delivered_by_the_worker() {
        // GIVEN a queued task, and a delivery queue that refuses the cancel's message
        let (stack, runs) = stack();
        let task_id = task_id_of(&stack.intake(call_event("bg", "u1", json!({}))).await);
        stack.delivery.fail_next_sends(1);
        assert_eq!(cancel(&stack, "u1", &task_id).await, 200);
        assert!(stack.delivery.pending().is_empty());
        // WHEN the task's work message reaches a worker
        stack.drain(20).await;
        // THEN the handler never ran and the chat got one "cancelled" result
        assert_eq!(runs.started.load(AtomicOrdering::SeqCst), 0);
        assert_eq!(
            results_in(&stack, "chat-u1"),
            vec![ActionResult::error("'bg' was cancelled.", false)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_task_hands_over_its_partial_result() {
        // GIVEN a job of five 10 s steps that records the chunks refined so far
        let (stack, _) = stack();
        let task_id = task_id_of(
            &stack
                .intake(call_event("chunks", "u1", json!({"n": 5})))
                .await,
        );
        let worker = tokio::spawn({
            let stack = stack.clone();
            async move { stack.work_once().await }
        });
        // WHEN the user cancels during the third chunk
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert_eq!(cancel(&stack, "u1", &task_id).await, 200);
        worker.await.unwrap();
        stack.drain(20).await;
        // THEN one "cancelled" result carries the two chunks refined before it
        let partial = json!({"chunks": ["refined 0 (run 1)", "refined 1 (run 1)"]});
        let mut expected = ActionResult::error("'chunks' was cancelled.", false);
        expected.data = Some(json!({ "partial": partial }));
        assert_eq!(results_in(&stack, "chat-u1"), vec![expected]);
        let ended = task(&stack, &task_id).await;
        assert_eq!(ended.state, TaskState::Cancelled);
        assert_eq!(ended.partial, Some(partial));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timed_out_task_hands_over_its_last_partial_result_written_once_a_heartbeat() {
        // GIVEN a silent handler that records a partial result every second, ten times, and
        // one that records none
        let writes_of = |n: u32| async move {
            let (stack, _) = stack();
            let task_id = task_id_of(
                &stack
                    .intake(call_event("partial", "u1", json!({"n": n})))
                    .await,
            );
            // WHEN each runs past its cap
            stack.drain(20).await;
            (stack, task_id)
        };
        let (silent, _) = writes_of(0).await;
        let (stack, task_id) = writes_of(10).await;
        // THEN the timed-out result carries the last value
        let ended = task(&stack, &task_id).await;
        assert_eq!(ended.state, TaskState::TimedOut);
        let results = results_in(&stack, "chat-u1");
        assert_eq!(results.len(), 1);
        assert_eq!(results[0].data, Some(json!({"partial": {"done": 10}})));
        // AND the ten calls over 10 s cost no write of their own: the heartbeats at 5 s and
        // 10 s carry them — writes, where a silent task's heartbeats only read — and renew
        // the lease with them (the cap and a heartbeat fall due at the same instant, so
        // either run may write one more)
        let extra = stack.tasks.writes().abs_diff(silent.tasks.writes());
        assert!(extra <= 3, "{extra} more writes");
        assert_eq!(
            results_in(&silent, "chat-u1")[0].data,
            None,
            "nothing recorded, nothing handed over"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_never_records_a_partial_result_ends_as_before() {
        let (stack, _) = stack();
        task_id_of(&stack.intake(call_event("sleepy", "u1", json!({}))).await);
        stack.drain(20).await;
        let results = results_in(&stack, "chat-u1");
        assert_eq!(results.len(), 1);
        assert_eq!(results[0].data, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_handler_that_turns_the_cancel_into_its_own_error_ends_cancelled() {
        let (stack, _) = stack();
        let task_id = task_id_of(&stack.intake(call_event("swallow", "u1", json!({}))).await);
        let worker = tokio::spawn({
            let stack = stack.clone();
            async move { stack.work_once().await }
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(cancel(&stack, "u1", &task_id).await, 200);
        worker.await.unwrap();
        stack.drain(20).await;
        assert_eq!(task(&stack, &task_id).await.state, TaskState::Cancelled);
        assert_eq!(
            results_in(&stack, "chat-u1"),
            vec![ActionResult::error("'swallow' was cancelled.", false)]
        );
        let audit = audit_kinds(&stack, &task_id).await;
        assert_eq!(count(&audit, AuditKind::Critical), 0, "{audit:?}");
    }

    /// The progress messages the chat shows for `task_id`, in order.
    fn progress_messages(stack: &crate::testing::MemoryStack) -> Vec<String> {
        stack
            .chat
            .in_chat("chat-u1")
            .into_iter()
            .filter_map(|m| match m {
                ChatMessage::Progress { progress, .. } => Some(progress.message),
                ChatMessage::Result { .. } => None,
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_silent_past_the_stall_period_gets_one_notice_per_episode_then_its_result() {
        // GIVEN a handler silent for 70 s, then after one more progress call for 100 s
        let (stack, _) = stack();
        let params = json!({"steps_ms": [70_000, 100_000]});
        let task_id = task_id_of(&stack.intake(call_event("quiet", "u1", params)).await);
        // WHEN it runs to its result
        stack.drain(20).await;
        assert_eq!(task(&stack, &task_id).await.state, TaskState::Succeeded);
        // THEN the chat got one notice in each silence (at the first heartbeat 60 s into
        // it), never two, and the result after them
        assert_eq!(
            progress_messages(&stack),
            vec![
                "part 0",
                "Still working on it… (running for 1 min 0 s)",
                "part 1",
                "Still working on it… (running for 2 min 10 s)",
            ]
        );
        assert!(matches!(
            stack.chat.posted().last().unwrap().message,
            ChatMessage::Result { .. }
        ));
        // AND each notice is one audit item, under its own idempotency key
        let audit = audit_kinds(&stack, &task_id).await;
        for id in ["delivered#notice#stalled#1", "delivered#notice#stalled#2"] {
            assert!(
                audit.contains(&(AuditKind::Delivered, id.to_owned())),
                "{audit:?}"
            );
        }
        let keys: Vec<String> = stack
            .chat
            .posted()
            .into_iter()
            .map(|p| p.idempotency_key)
            .filter(|k| k.contains(":notice:"))
            .collect();
        assert_eq!(
            keys,
            vec![
                format!("{task_id}:notice:stalled:1"),
                format!("{task_id}:notice:stalled:2")
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_function_may_go_without_stall_notices_and_a_short_silence_gets_none() {
        let (hushed, _) = stack();
        let long = json!({"steps_ms": [150_000]});
        task_id_of(&hushed.intake(call_event("hushed", "u1", long)).await);
        hushed.drain(20).await;
        let (stack2, _) = stack();
        let short = json!({"steps_ms": [50_000, 50_000]});
        task_id_of(&stack2.intake(call_event("quiet", "u1", short)).await);
        stack2.drain(20).await;
        assert_eq!(progress_messages(&hushed), vec!["part 0"]);
        assert_eq!(progress_messages(&stack2), vec!["part 0", "part 1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_is_seen_at_the_next_progress_call() {
        // GIVEN a handler that reports progress every second
        let (stack, _) = stack();
        let task_id = task_id_of(&stack.intake(call_event("ticker", "u1", json!({}))).await);
        let worker = tokio::spawn({
            let stack = stack.clone();
            async move { stack.work_once().await }
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        // WHEN the user cancels
        let cancelled_at = Instant::now();
        assert_eq!(cancel(&stack, "u1", &task_id).await, 200);
        worker.await.unwrap();
        // THEN it stops within a heartbeat, and the chat gets one "cancelled" result
        assert!(cancelled_at.elapsed() <= Settings::default().heartbeat);
        stack.drain(20).await;
        let task = task(&stack, &task_id).await;
        assert_eq!(task.state, TaskState::Cancelled);
        assert!(task.progress.pct < 20);
        assert_eq!(
            results_in(&stack, "chat-u1"),
            vec![ActionResult::error("'ticker' was cancelled.", false)]
        );
    }

    /// Runs the `http` handler against an AI server that never answers (`delay_ms` before
    /// its progress call), cancels it `cancel_after` in, and checks the task ends cancelled
    /// with one result and the AI connection dropped. How long the cancel took to land, and
    /// the writes made from the cancel on.
    async fn cancel_mid_ai_call(delay_ms: u64, cancel_after: Duration) -> (Duration, u64) {
        let (url, dropped) = hanging_server().await;
        let (stack, _) = stack();
        let params = json!({"url": url, "delay_ms": delay_ms});
        let task_id = task_id_of(&stack.intake(call_event("http", "u1", params)).await);
        let worker = tokio::spawn({
            let stack = stack.clone();
            async move { stack.work_once().await }
        });
        tokio::time::sleep(cancel_after).await;
        let writes_before = stack.tasks.writes();
        let cancelled_at = Instant::now();
        assert_eq!(cancel(&stack, "u1", &task_id).await, 200);
        worker.await.unwrap();
        let took = cancelled_at.elapsed();
        let writes = stack.tasks.writes() - writes_before;
        // The in-flight request was aborted: the server saw the connection close.
        for _ in 0..100 {
            if dropped.load(AtomicOrdering::SeqCst) {
                break;
            }
            tokio::task::yield_now().await;
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            dropped.load(AtomicOrdering::SeqCst),
            "connection still open"
        );
        stack.drain(20).await;
        assert_eq!(task(&stack, &task_id).await.state, TaskState::Cancelled);
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
        (took, writes)
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_during_a_slow_http_call_drops_the_handler_and_the_connection() {
        // GIVEN a handler waiting on an AI server that never answers (120 s timeout)
        // WHEN the user cancels 7 s in
        let (took, _) = cancel_mid_ai_call(0, Duration::from_secs(7)).await;
        // THEN the call is dropped within a heartbeat: the in-flight request ends at once
        assert!(took <= Settings::default().heartbeat, "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_reaches_an_ai_call_within_a_heartbeat_even_after_a_progress_write() {
        // GIVEN a handler that wrote progress just after a heartbeat (5.5 s in), then waits on
        // an AI server that never answers; WHEN the user cancels 6 s in
        let (took, writes) = cancel_mid_ai_call(5_500, Duration::from_secs(6)).await;
        // THEN the call is dropped within one heartbeat of the request (the next write comes
        // a heartbeat after the progress write, not two), with no grace period on top
        assert!(took <= Settings::default().heartbeat, "{took:?}");
        // AND no extra writes bought it: the cancel's flag and audit item, one heartbeat,
        // the finish with its cancelled audit item, and the release of the user's
        // active-task count
        assert!(writes <= 6, "{writes} writes");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_task_renews_its_lease_a_third_of_a_lease_apart_and_reads_in_between() {
        // GIVEN a handler silent for 120 s after its first progress call
        let (stack, _) = stack();
        let params = json!({"steps_ms": [120_000]});
        let task_id = task_id_of(&stack.intake(call_event("hushed", "u1", params)).await);
        let (writes, peeks) = (stack.tasks.writes(), stack.tasks.peeks());
        // WHEN it runs
        stack.work_once().await;
        // THEN the lease was renewed once every 20 s (a third of the 60 s lease), not at every
        // 5 s heartbeat: the claim, the progress, 6 renewals and the end (with the release of
        // the user's count) — and the cancel flag was read at the heartbeats in between
        assert_eq!(Settings::default().renew_every(), Duration::from_secs(20));
        let writes = stack.tasks.writes() - writes;
        assert!(writes <= 2 + 6 + 2, "{writes} writes");
        let peeks = stack.tasks.peeks() - peeks;
        assert!((16..=19).contains(&peeks), "{peeks} reads");
        assert_eq!(task(&stack, &task_id).await.state, TaskState::Succeeded);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_renewal_is_tried_again_at_the_next_heartbeat() {
        // GIVEN a silent task, and a table that refuses its first renewal (20 s in): the
        // reads at 5, 10 and 15 s pass, the write at 20 s fails
        let (stack, _) = stack();
        let params = json!({"steps_ms": [40_000]});
        let task_id = task_id_of(&stack.intake(call_event("hushed", "u1", params)).await);
        let worker = tokio::spawn({
            let stack = stack.clone();
            async move { stack.work_once().await }
        });
        tokio::time::sleep(Duration::from_secs(17)).await;
        let renewed_before = task(&stack, &task_id).await.heartbeat_at;
        stack.tasks.fail_next_beats(1);
        // WHEN 26 s have passed
        tokio::time::sleep(Duration::from_secs(9)).await;
        // THEN the renewal landed at the heartbeat after the failure (25 s), not 20 s later
        assert_eq!(stack.tasks.beat_failures_left(), 0);
        let renewed = task(&stack, &task_id).await.heartbeat_at;
        assert!(
            renewed > renewed_before,
            "{renewed:?} vs {renewed_before:?}"
        );
        worker.await.unwrap();
        assert_eq!(task(&stack, &task_id).await.state, TaskState::Succeeded);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_hook_that_never_returns_is_cut_off_at_its_budget() {
        // GIVEN a running task whose stop hook hangs
        let (stack, _) = stack();
        let task_id = task_id_of(&stack.intake(call_event("stubborn", "u1", json!({}))).await);
        let worker = tokio::spawn({
            let stack = stack.clone();
            async move { stack.work_once().await }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        // WHEN the user cancels
        let cancelled_at = Instant::now();
        assert_eq!(cancel(&stack, "u1", &task_id).await, 200);
        worker.await.unwrap();
        // THEN the task ends cancelled once the hook's budget is spent, with one result
        let settings = Settings::default();
        assert!(
            cancelled_at.elapsed()
                <= settings.heartbeat + settings.cancel_grace + crate::STOP_HOOK_BUDGET
        );
        stack.drain(20).await;
        assert_eq!(task(&stack, &task_id).await.state, TaskState::Cancelled);
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_table_that_refuses_heartbeats_is_tried_once_a_heartbeat() {
        // GIVEN a handler reporting progress every second, and a table that refuses every
        // heartbeat and progress write
        let (stack, _) = stack();
        task_id_of(&stack.intake(call_event("ticker", "u1", json!({}))).await);
        stack.tasks.fail_next_beats(1_000);
        // WHEN it runs for 30 s
        let _ = tokio::time::timeout(Duration::from_secs(30), stack.work_once()).await;
        // THEN the worker tried about once a heartbeat (6 in 30 s), not in a tight loop
        let tries = 1_000 - stack.tasks.beat_failures_left();
        assert!((5..=8).contains(&tries), "{tries} tries");
    }

    #[tokio::test(start_paused = true)]
    async fn progress_bursts_are_coalesced_and_the_last_value_kept() {
        // GIVEN a handler that reports progress 10 000 times without pausing
        let (stack, _) = stack();
        let task_id = task_id_of(
            &stack
                .intake(call_event("burst", "u1", json!({"n": 10_000})))
                .await,
        );
        let before = stack.tasks.writes();
        stack.drain(20).await;
        // THEN a handful of writes, not 10 000, and the record holds the last value
        let writes = stack.tasks.writes() - before;
        assert!(writes < 20, "{writes} writes");
        let task = task(&stack, &task_id).await;
        assert_eq!(task.progress.pct, 100);
        assert_eq!(task.progress.message, "burst done");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_task_record_is_rebuilt_from_its_work_message() {
        // GIVEN a work message whose task record was never written
        let (stack, runs) = stack();
        let task_id = task_id_of(&stack.intake(call_event("bg", "u1", json!({}))).await);
        let message = stack.work.take(1).remove(0);
        let (stack2, runs2) = stack_with(Settings::default());
        stack2.work.push(message);
        // WHEN a worker takes it
        stack2.drain(20).await;
        // THEN the task runs and its result reaches the chat
        assert_eq!(runs2.started.load(AtomicOrdering::SeqCst), 1);
        assert_eq!(runs.started.load(AtomicOrdering::SeqCst), 0);
        assert_eq!(task(&stack2, &task_id).await.state, TaskState::Succeeded);
        assert_eq!(results_in(&stack2, "chat-u1").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_end_that_does_not_happen_leaves_no_audit_item_claiming_it() {
        // GIVEN a running task held by another worker
        let (stack, _) = stack();
        let task_id = task_id_of(&stack.intake(call_event("bg", "u1", json!({}))).await);
        let now = stack.rt.now();
        let lease = Lease {
            owner: "live-worker".into(),
            until: now + chrono::Duration::seconds(60),
        };
        stack.tasks.claim(&task_id, &lease, now).await.unwrap();
        let running = task(&stack, &task_id).await;
        // WHEN this worker tries to end it as failed, and as cancelled
        for outcome in [
            Outcome::failed("bg", "handler_error", "boom".into(), true),
            Outcome::cancelled("bg"),
        ] {
            end(
                &stack.rt,
                &running,
                FinishGuard::Owner("stale-worker".into()),
                outcome,
            )
            .await
            .unwrap();
        }
        // THEN the task is still running and its trail holds no critical or cancelled item
        assert_eq!(task(&stack, &task_id).await.state, TaskState::Running);
        let audit = audit_kinds(&stack, &task_id).await;
        assert_eq!(count(&audit, AuditKind::Critical), 0, "{audit:?}");
        assert_eq!(count(&audit, AuditKind::Cancelled), 0, "{audit:?}");
        assert!(stack.delivery.pending().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_older_than_the_task_ttl_does_not_bring_an_expired_task_back() {
        // GIVEN a work message from 31 days ago whose task record is gone (finished and
        // expired, as the 30-day TTL does)
        let (stack, runs) = stack();
        task_id_of(&stack.intake(call_event("bg", "u1", json!({}))).await);
        let mut message = stack.work.take(1).remove(0);
        message.created_at -= chrono::Duration::days(31);
        let (stack2, runs2) = stack_with(Settings::default());
        stack2.work.push(message);
        // WHEN a worker takes it
        stack2.drain(20).await;
        // THEN nothing runs, no record is written and the chat gets nothing
        assert_eq!(runs2.started.load(AtomicOrdering::SeqCst), 0);
        assert_eq!(runs.started.load(AtomicOrdering::SeqCst), 0);
        assert!(stack2.tasks.all().is_empty());
        assert!(stack2.chat.posted().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_isolated_task_runs_alone_and_the_rest_of_its_batch_is_sent_on() {
        // GIVEN a batch of three work messages, the second of an isolated task
        let (stack, runs) = stack();
        for user in ["u1", "u2", "u3"] {
            stack.intake(call_event("bg", user, json!({}))).await;
        }
        let mut messages = stack.work.take(10);
        messages[1].isolated = true;
        let isolated = messages[1].task_id.clone();
        let records: Vec<QueueRecord> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| QueueRecord::new(format!("m{i}"), serde_json::to_string(m).unwrap()))
            .collect();
        // WHEN one invocation gets it
        let failed = handle_batch(&stack.rt, records, None).await;
        // THEN it runs the isolated task only, and the others wait in the queue again
        assert!(failed.is_empty());
        assert_eq!(runs.started.load(AtomicOrdering::SeqCst), 1);
        assert_eq!(task(&stack, &isolated).await.state, TaskState::Succeeded);
        let sent_on = stack.work.take(10);
        assert_eq!(sent_on, vec![messages[0].clone(), messages[2].clone()]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_malformed_work_message_is_dropped_without_panic() {
        let (stack, _) = stack();
        let records = vec![
            QueueRecord::new("a", "{"),
            QueueRecord::new("b", "{\"task_id\":\"nope\"}"),
            QueueRecord::new("c", "null"),
        ];
        assert!(handle_batch(&stack.rt, records, None).await.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn near_the_lambda_deadline_the_task_is_handed_on() {
        // GIVEN an invocation with 60 s left and a task that needs 100 s
        let (stack, _) = stack();
        let task_id = task_id_of(&stack.intake(call_event("ticker", "u1", json!({}))).await);
        let batch = stack.work.take(10);
        let records = batch
            .iter()
            .map(|m| QueueRecord::new("m", serde_json::to_string(m).unwrap()))
            .collect();
        let failed = handle_batch(
            &stack.rt,
            records,
            Some(Instant::now() + Duration::from_secs(60)),
        )
        .await;
        // THEN the invocation ends cleanly with the task queued again
        assert!(failed.is_empty());
        let task = task(&stack, &task_id).await;
        assert_eq!(task.state, TaskState::Queued);
        assert_eq!(stack.work.pending().len(), 1);
        // AND a fresh invocation carries it to the end, progress never going backwards
        stack.drain(20).await;
        assert_eq!(
            crate::testing::fixture::task(&stack, &task_id).await.state,
            TaskState::Succeeded
        );
        let pcts = progress_in(&stack, "chat-u1");
        assert!(pcts.windows(2).all(|w| w[0] <= w[1]), "{pcts:?}");
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
    }
}
