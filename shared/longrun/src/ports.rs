//! Ports: the narrow capabilities the pipeline needs from the outside world. Adapters
//! implement them for AWS (DynamoDB, SQS, Secrets Manager, the chat API) and for memory
//! (unit tests, the local stack). Domain code only ever sees these traits.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ActionResult;
use crate::step::StepRecord;
use crate::task::{AuditItem, Lease, Progress, Task, TaskId, TaskState};
use crate::wire::{ChatMessage, DeliveryMessage, WorkMessage};

/// What an adapter error means to the pipeline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// The item or message does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A conditional write lost: the state is not what the caller expected.
    #[error("conflict: {0}")]
    Conflict(String),
    /// Throttling, a timeout, a 5xx: trying again later may succeed.
    #[error("transient failure: {0}")]
    Transient(String),
    /// Bad request, access denied, too large: trying again will not help.
    #[error("permanent failure: {0}")]
    Permanent(String),
}

impl PortError {
    /// Whether a retry may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_))
    }
}

/// `Result<T, PortError>`.
pub type PortResult<T> = Result<T, PortError>;

/// The key that makes a `call` idempotent: `(ext, user, request_id)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RequestKey {
    /// The extension the call was made to.
    pub ext: String,
    /// The user who made the call.
    pub user: String,
    /// The caller's id for this call; a retry sends the same one.
    pub request_id: String,
}

/// The answer to [`TaskStore::create`].
#[derive(Debug, Clone, PartialEq)]
pub enum Created {
    /// The task is new.
    New,
    /// The request key already named another task; nothing was written.
    Duplicate(TaskId),
    /// The user already has as many active (queued or running) tasks as the limit allows —
    /// these, as the table counts them; nothing was written.
    AtLimit(Vec<TaskId>),
}

/// The answer to [`TaskStore::claim`].
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The caller now holds the lease; the task is `running` with `attempt` incremented.
    Claimed(Task),
    /// Another worker holds a live lease: drop the duplicate message.
    Busy(Task),
    /// The task already ended: only its delivery may need re-sending.
    Finished(Task),
    /// No such task.
    Missing,
}

/// The answer to a heartbeat or progress write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    /// The user asked to cancel.
    pub cancel_requested: bool,
    /// The progress sequence number after this write.
    pub progress_seq: u64,
}

/// The answer to [`TaskStore::peek`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peek {
    /// Where the task is.
    pub state: TaskState,
    /// Who holds its lease, if anyone.
    pub lease_owner: Option<String>,
    /// The user asked to cancel.
    pub cancel_requested: bool,
}

/// Who may end a task, checked by the conditional write in [`TaskStore::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishGuard {
    /// The worker holding this lease owner id.
    Owner(String),
    /// Anyone, if the task is still `queued` (cancel before start).
    Queued,
    /// Anyone, if the task is `queued` or `running` and its lease (the queue's or a
    /// worker's) lapsed before `at` (the sweeper).
    ExpiredLease,
    /// Anyone, if nobody works on the task: it is `queued` or `sleeping`, or `running` with
    /// a lease that lapsed before `at` (a dead-lettered work message; a live worker keeps its
    /// task).
    Abandoned,
}

/// Who may put a task back in the queue, checked by [`TaskStore::requeue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requeue {
    /// The worker holding this lease owner id (a running task).
    Owner(String),
    /// Anyone, if the task is queued, running or sleeping and its lease lapsed before this
    /// moment.
    Expired(DateTime<Utc>),
    /// Anyone, if the task is running and its lease lapsed before this moment; the task is
    /// marked [`isolated`](crate::task::Task::isolated) (its worker process died with other
    /// tasks in it).
    Isolate(DateTime<Utc>),
}

/// The worker that must still hold a task's lease for a write to land. A background task's
/// step and `ctx.store` writes carry it, so once another worker took the task over (this
/// one's lease lapsed) they are refused with `Conflict` instead of mixing two runs' results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    /// The task whose lease is checked.
    pub task_id: TaskId,
    /// The lease owner id the write is made under.
    pub owner: String,
}

/// How a task ends.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    /// The terminal state to move to.
    pub state: TaskState,
    /// The result stored on the task and delivered to the chat: the handler's own, or the
    /// fallback for a failed, cancelled or timed-out task.
    pub result: ActionResult,
    /// When the task ended (its `finished_at`); also the moment `ExpiredLease` is checked
    /// against.
    pub at: DateTime<Utc>,
    /// Who may end it; the write is refused with `Conflict` if the guard does not hold.
    pub guard: FinishGuard,
    /// When the sweeper sends the result again if it is still not delivered by then (the
    /// task's `redeliver_at`).
    pub redeliver_at: DateTime<Utc>,
    /// Audit items that say how the task ended (`critical#…`, `cancelled`): written with the
    /// end itself, atomically, so they exist exactly when the end happened.
    pub audit: Vec<AuditItem>,
    /// The run's last progress, if it was not written yet: stored with the end (no progress
    /// message goes to the chat for it; the result follows).
    pub progress: Option<Progress>,
    /// The run's last partial result, if it was not written yet: stored with the end.
    pub partial: Option<Value>,
}

/// The task table: records, leases, checkpoints, audit items and request keys.
#[async_trait]
pub trait TaskStore: Send + Sync {
    /// Writes a new task, its `created` audit item and its request key (if any), and counts
    /// it among its user's active tasks — unless the key already names another task, or the
    /// user already has `limit` active tasks (no limit: a task accepted earlier whose record
    /// is written again). Writing the same task again is a no-op.
    async fn create(
        &self,
        task: &Task,
        request: Option<&RequestKey>,
        limit: Option<u32>,
    ) -> PortResult<Created>;

    /// Records that `task` was refused (its user is at the limit): its record, ended as
    /// `failed` with `result` and marked delivered (the caller had the answer), kept one day
    /// and in no index — so a work message already sent for it finds it finished and runs
    /// nothing. Leaves an existing record alone.
    async fn refuse(&self, task: &Task, result: &ActionResult, at: DateTime<Utc>)
    -> PortResult<()>;

    /// Stops counting `task_id` among the active tasks of `(ext, user)`. [`TaskStore::finish`]
    /// does it for every task it ends; this repairs a count a lost write left behind.
    async fn release(&self, ext: &str, user: &str, task_id: &TaskId) -> PortResult<()>;

    /// The task, if it exists.
    async fn get(&self, task_id: &TaskId) -> PortResult<Option<Task>>;

    /// The task a request key names, if any.
    async fn find_request(&self, request: &RequestKey) -> PortResult<Option<TaskId>>;

    /// Takes the lease if the task is `queued`, `running` with a lease that lapsed before
    /// `now`, or `sleeping` and due (`wake_at` passed, or a cancel requested). A sleeping
    /// task that is not due is `Busy`.
    async fn claim(&self, task_id: &TaskId, lease: &Lease, now: DateTime<Utc>)
    -> PortResult<Claim>;

    /// One consistent read of what a running worker checks between lease renewals: the
    /// task's state, who holds its lease, and whether the user asked to cancel. `None` if the
    /// task does not exist.
    async fn peek(&self, task_id: &TaskId) -> PortResult<Option<Peek>>;

    /// One conditional write: renews the lease held by `lease.owner`, records the heartbeat
    /// and, when `progress` is given, the checkpoint (bumping `progress_seq`); when `partial`
    /// is given, the handler's partial result. Returns the cancel flag. `Conflict` when the caller no longer holds the lease.
    async fn beat(
        &self,
        task_id: &TaskId,
        lease: &Lease,
        progress: Option<&Progress>,
        partial: Option<&serde_json::Value>,
        now: DateTime<Utc>,
    ) -> PortResult<Beat>;

    /// Ends the task and writes `finish.audit` if `finish.guard` holds; `Conflict`, with
    /// nothing written, otherwise. An ended task no longer counts among its user's active
    /// tasks.
    async fn finish(&self, task_id: &TaskId, finish: &Finish) -> PortResult<Task>;

    /// Puts a task back to `queued` with the queue lease `lease`, if `guard` holds: a worker
    /// handing its task to a fresh invocation (which gives back its attempt: a hand-off is not
    /// a failure), or the sweeper reviving an expired lease.
    async fn requeue(&self, task_id: &TaskId, guard: &Requeue, lease: &Lease) -> PortResult<Task>;

    /// Puts a running task held by `owner` to sleep until `wake_at` (`sleeping`, with the
    /// queue lease `lease`, which lapses a queue grace after `wake_at`), giving back its
    /// attempt: a sleep is not a failure. `Conflict` when `owner` no longer holds it.
    async fn suspend(
        &self,
        task_id: &TaskId,
        owner: &str,
        wake_at: DateTime<Utc>,
        lease: &Lease,
    ) -> PortResult<Task>;

    /// Sets the cancel flag on a `running` or `sleeping` task. `Conflict` if it is neither.
    async fn request_cancel(&self, task_id: &TaskId, now: DateTime<Utc>) -> PortResult<Task>;

    /// Marks the result delivered (and clears `redeliver_at`). `Ok(false)` if it already was.
    async fn mark_delivered(&self, task_id: &TaskId, now: DateTime<Utc>) -> PortResult<bool>;

    /// Moves a finished, undelivered task's `redeliver_at` to `at`, or clears it (`None`: the
    /// sweeper no longer sends its result). `Ok(false)` if the result was delivered meanwhile.
    async fn reschedule_delivery(
        &self,
        task_id: &TaskId,
        at: Option<DateTime<Utc>>,
    ) -> PortResult<bool>;

    /// Writes an audit item unless one with the same `(task_id, audit_id)` exists.
    async fn append_audit(&self, item: &AuditItem) -> PortResult<()>;

    /// A task's audit trail, oldest first.
    async fn audit_trail(&self, task_id: &TaskId) -> PortResult<Vec<AuditItem>>;

    /// A user's tasks, newest first.
    async fn list_by_user(&self, ext: &str, user: &str, limit: usize) -> PortResult<Vec<Task>>;

    /// Stores a completed step's output, if `holder` still holds the task's lease
    /// (`Conflict` otherwise, nothing written). If a step is already stored at that position,
    /// it is kept and returned: the stored output is the one the run must use.
    async fn record_step(&self, holder: &LeaseHolder, step: &StepRecord) -> PortResult<StepRecord>;

    /// The task's completed steps, in order.
    async fn steps(&self, task_id: &TaskId) -> PortResult<Vec<StepRecord>>;

    /// The sweeper's work: live tasks whose lease lapsed before `now` (queued or running),
    /// and finished tasks whose result is undelivered and whose `redeliver_at` passed.
    async fn expired_leases(&self, now: DateTime<Utc>, limit: usize) -> PortResult<Vec<Task>>;
}

/// Per-user daily meters of what an extension counts (`ctx.charge`): AI tokens,
/// task-seconds, anything with a whole-number unit.
#[async_trait]
pub trait UsageStore: Send + Sync {
    /// Adds `amount` to `(ext, user, meter)` on `day` unless `charge_id` was counted already
    /// (a retried or replayed charge counts once); returns the day's total either way.
    async fn charge(
        &self,
        ext: &str,
        user: &str,
        meter: &str,
        day: NaiveDate,
        charge_id: &str,
        amount: u64,
    ) -> PortResult<u64>;

    /// `(ext, user)`'s totals on `day`, by meter (meters not used that day are absent).
    async fn usage(
        &self,
        ext: &str,
        user: &str,
        day: NaiveDate,
    ) -> PortResult<BTreeMap<String, u64>>;

    /// Forgets `(ext, user)`'s use on `day` of `meter`, or of every meter.
    async fn reset(
        &self,
        ext: &str,
        user: &str,
        day: NaiveDate,
        meter: Option<&str>,
    ) -> PortResult<()>;
}

/// Per (ext, user) key/value storage behind `ctx.store`.
#[async_trait]
pub trait KvStore: Send + Sync {
    /// The value stored under `key` for `(ext, user)`, if any.
    async fn get(&self, ext: &str, user: &str, key: &str) -> PortResult<Option<Value>>;
    /// Stores `value` under `key` for `(ext, user)`, replacing any previous value. With a
    /// `holder` (a background task's write), only while it holds the task's lease: `Conflict`
    /// otherwise, nothing written.
    async fn set(
        &self,
        ext: &str,
        user: &str,
        key: &str,
        value: &Value,
        holder: Option<&LeaseHolder>,
    ) -> PortResult<()>;
    /// Removes `key` for `(ext, user)`; removing a missing key is not an error. `holder` as
    /// for [`KvStore::set`].
    async fn delete(
        &self,
        ext: &str,
        user: &str,
        key: &str,
        holder: Option<&LeaseHolder>,
    ) -> PortResult<()>;
}

/// A secret value. Its `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that needs it (an `Authorization` header).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Per (ext, user) secrets behind `ctx.secrets`.
#[async_trait]
pub trait SecretStore: Send + Sync {
    /// The user's secret `name` for extension `ext`, or `None` if the user has not connected
    /// it.
    async fn get(&self, ext: &str, user: &str, name: &str) -> PortResult<Option<Secret>>;
}

/// The work queue: intake and the sweeper send, the worker receives (through Lambda).
#[async_trait]
pub trait WorkQueue: Send + Sync {
    /// Sends a work message, which a worker invocation will receive.
    async fn send(&self, message: &WorkMessage) -> PortResult<()>;
    /// Sends a work message that a worker receives `delay` from now — or sooner, after
    /// [`MAX_QUEUE_DELAY`] at the most (SQS's limit): the worker sends an early one on.
    async fn send_after(&self, message: &WorkMessage, delay: Duration) -> PortResult<()>;
}

/// The longest a queue holds a message back (SQS `DelaySeconds` at most 900).
pub const MAX_QUEUE_DELAY: Duration = Duration::from_secs(900);

/// The delivery queue: the worker sends, delivery receives.
#[async_trait]
pub trait DeliveryQueue: Send + Sync {
    /// Sends a delivery message, which a delivery invocation will receive.
    async fn send(&self, message: &DeliveryMessage) -> PortResult<()>;
    /// Parks a message that can never be delivered in the dead-letter queue.
    async fn dead_letter(&self, message: &DeliveryMessage) -> PortResult<()>;
}

/// What the chat API said to a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatOutcome {
    /// 2xx, or 409 (already delivered under this idempotency key).
    Delivered,
    /// Another 4xx: trying again will not help.
    Rejected {
        /// The HTTP status the chat API answered.
        status: u16,
    },
    /// 5xx, a timeout, a connection error: try again later.
    Unavailable {
        /// The status, timeout or connection error, for logs and audit items.
        reason: String,
    },
}

/// The chat platform's message API.
#[async_trait]
pub trait ChatApi: Send + Sync {
    /// Posts `message` to `chat` under `idempotency_key`, so a repeated post of the same
    /// message is not shown twice. Failures are reported in the outcome, never as an error.
    async fn post(&self, chat: &str, idempotency_key: &str, message: &ChatMessage) -> ChatOutcome;
}

/// Wall time, so tests can control it.
pub trait Clock: Send + Sync {
    /// The current wall-clock time, in UTC.
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that follows tokio's (pausable) monotonic time from a fixed start, for tests that
/// run with `start_paused`.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    wall: DateTime<Utc>,
    mono: tokio::time::Instant,
}

impl TokioClock {
    /// A clock that reads `wall` now and moves with `tokio::time`.
    pub fn starting_at(wall: DateTime<Utc>) -> Self {
        Self {
            wall,
            mono: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> DateTime<Utc> {
        let elapsed = tokio::time::Instant::now() - self.mono;
        self.wall + chrono::Duration::from_std(elapsed).unwrap_or_default()
    }
}
