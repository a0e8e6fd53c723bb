//! The task model: identity, states and the legal moves between them, caps, leases and
//! the audit trail. This is the record operators read in DynamoDB.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ActionResult;

/// A task's id: a ULID, so ids sort by creation time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TaskId(String);

impl TaskId {
    /// A fresh id for a task created at `at`.
    pub fn generate(at: DateTime<Utc>) -> Self {
        let ms = u64::try_from(at.timestamp_millis()).unwrap_or(0);
        Self(ulid::Ulid::from_parts(ms, rand_bits()).to_string())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn rand_bits() -> u128 {
    // `Ulid::new()` draws from the thread RNG; reuse its random part rather than pull in `rand`.
    ulid::Ulid::new().random()
}

/// A task id that is not a ULID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("task_id {0:?} is not a ULID")]
pub struct InvalidTaskId(pub String);

impl FromStr for TaskId {
    type Err = InvalidTaskId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ulid::Ulid::from_string(s)
            .map(|u| Self(u.to_string()))
            .map_err(|_| InvalidTaskId(s.chars().take(64).collect()))
    }
}

impl TryFrom<String> for TaskId {
    type Error = InvalidTaskId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<TaskId> for String {
    fn from(id: TaskId) -> Self {
        id.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Accepted and enqueued; no worker has claimed it yet.
    Queued,
    /// A worker holds its lease and runs the handler.
    Running,
    /// The handler waits (`ctx.sleep`, or between `ctx.poll` checks) with no worker running:
    /// its work message is on the queue, delayed until `wake_at`, when a worker claims it and
    /// replays its finished steps. A cancel wakes it at once.
    Sleeping,
    /// The handler returned an `ActionResult` (which may itself be an error the handler chose).
    Succeeded,
    /// The handler failed in a way it could not express: a returned error, a panic, a worker
    /// that died on every attempt. The user got a fallback error.
    Failed,
    /// The user cancelled it.
    Cancelled,
    /// It ran past its cap.
    TimedOut,
}

impl TaskState {
    /// Whether no further move is possible.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::TimedOut
        )
    }

    /// The move to `next`, or why it is illegal.
    ///
    /// `running → running` is legal: it is a reclaim after an expired lease.
    pub fn transition(self, next: TaskState) -> Result<TaskState, IllegalTransition> {
        use TaskState::*;
        let legal = match (self, next) {
            (Queued, Running) => true,
            (Running, Running) => true,
            // A queued task can be cancelled, or ended by the sweeper when its work message
            // was dead-lettered.
            (Queued, Cancelled | Failed) => true,
            (Running, Succeeded | Failed | Cancelled | TimedOut) => true,
            // A continuation re-enqueues a running task before the Lambda deadline.
            (Running, Queued) => true,
            // `ctx.sleep` suspends a running task; a worker claims it when it wakes (or is
            // cancelled), the sweeper re-sends it if its work message was lost, and a
            // dead-lettered work message ends it.
            (Running, Sleeping) => true,
            (Sleeping, Running | Queued | Failed) => true,
            _ => false,
        };
        if legal {
            Ok(next)
        } else {
            Err(IllegalTransition {
                from: self,
                to: next,
            })
        }
    }

    /// The name used on the wire and in DynamoDB.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Sleeping => "sleeping",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::TimedOut => "timed_out",
        }
    }
}

impl FromStr for TaskState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "sleeping" => Self::Sleeping,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            "timed_out" => Self::TimedOut,
            other => return Err(format!("unknown task state {other:?}")),
        })
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A move the state machine refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal task transition {from} → {to}")]
pub struct IllegalTransition {
    /// The state the task was in.
    pub from: TaskState,
    /// The state the move asked for.
    pub to: TaskState,
}

/// A task's wall-time budget, counted from its first start across every invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// 180 s: the default.
    Standard,
    /// 1800 s: `long_running = true`.
    LongRunning,
}

impl Cap {
    /// The cap for a `long_running` flag.
    pub fn for_long_running(long_running: bool) -> Self {
        if long_running {
            Self::LongRunning
        } else {
            Self::Standard
        }
    }

    /// The cap in seconds, as stored in `cap_s`.
    pub fn seconds(self) -> u64 {
        match self {
            Self::Standard => 180,
            Self::LongRunning => 1800,
        }
    }

    /// The cap as a duration.
    pub fn duration(self) -> Duration {
        Duration::from_secs(self.seconds())
    }
}

/// A progress checkpoint: percentage and message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Progress {
    /// How far along the task is, in percent (0–100).
    pub pct: u8,
    /// What the handler is doing now, shown to the user in the chat.
    pub message: String,
}

/// What the task runs: a chat function (Pattern B) or a named job (Pattern C).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// A chat function registered with `background(true)` (Pattern B).
    Function,
    /// A named job launched with `ctx.background_task` (Pattern C).
    Job,
}

/// A worker's hold on a running task, renewed by every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The worker invocation that holds it.
    pub owner: String,
    /// When it lapses unless renewed.
    pub until: DateTime<Utc>,
}

/// A background task: the record in the table and the status view callers get.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// The task's id, also its key in the table.
    pub task_id: TaskId,
    /// The extension the task belongs to.
    pub ext: String,
    /// The user who started it; with `ext`, the task's owner.
    pub user: String,
    /// The chat the call came from, where progress and the result are posted.
    pub chat: String,
    /// The chat function or job name.
    pub function: String,
    /// Whether `function` names a chat function or a job.
    pub kind: TaskKind,
    /// The function's declared event name, sent with an ok result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// A human name for the task (`BackgroundOptions::name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Where the task is in its life.
    pub state: TaskState,
    /// The last progress checkpoint written.
    pub progress: Progress,
    /// How many progress checkpoints were written; the chat's progress message sequence.
    #[serde(default)]
    pub progress_seq: u64,
    /// How many times a worker has claimed the task; a hand-off to a fresh invocation gives
    /// its claim back. Past `Settings::max_attempts` the task fails.
    pub attempt: u32,
    /// The task's cap in seconds (180, 1800 or the override), counted from `started_at`.
    pub cap_s: u64,
    /// Whether the user asked to cancel the running task; the worker reads it at each
    /// heartbeat and progress write.
    #[serde(default)]
    pub cancel_requested: bool,
    /// When intake accepted the task.
    pub created_at: DateTime<Utc>,
    /// While the task sleeps: when it wakes (a worker claims it then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake_at: Option<DateTime<Utc>>,
    /// When a worker first claimed the task; the cap counts from here.
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    /// When the worker last renewed the lease (claim, heartbeat or progress write).
    #[serde(default)]
    pub heartbeat_at: Option<DateTime<Utc>>,
    /// When the task reached a terminal state.
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    /// When the result reached the chat; once set, delivery does not post the result again.
    #[serde(default)]
    pub delivered_at: Option<DateTime<Utc>>,
    /// While a finished task's result is not in the chat: when the sweeper sends its result
    /// message again (the first send may have failed, or its message been lost). Cleared once
    /// delivered, or when the chat API refused the result for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redeliver_at: Option<DateTime<Utc>>,
    /// The result for the chat once the task ended: the handler's own, or the fallback for a
    /// failed, cancelled or timed-out task.
    #[serde(default)]
    pub result: Option<ActionResult>,
    /// The handler's input, kept so a lost work message can be re-sent.
    #[serde(default)]
    pub params: serde_json::Value,
    /// What the handler recorded with `ctx.partial` by its last checkpoint: handed to the
    /// user in the result's `data.partial` if the task ends cancelled or timed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<serde_json::Value>,
    /// Who holds the task: a worker while it runs, the queue while it waits (when that lapses,
    /// the sweeper re-sends the work message). `None` once it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    /// The caller's `request_id`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The worker process that ran the task died with other tasks of its batch in it (an
    /// out-of-memory or a crash that any of them may have caused): from then on the task runs
    /// alone in its worker invocation, and that one death is not counted against its
    /// attempts (see [`Task::counted_attempts`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub isolated: bool,
}

impl Task {
    /// The attempts that count against `Settings::max_attempts`: every claim but the one
    /// whose process died with other tasks in it, when the task was isolated for that.
    pub fn counted_attempts(&self) -> u32 {
        self.attempt.saturating_sub(u32::from(self.isolated))
    }

    /// Whether the sweeper has work with this task at `now`: a live task whose lease lapsed
    /// (its worker died, or its work message was lost), or a finished one whose result is
    /// still undelivered at its `redeliver_at`.
    pub fn due_for_sweep(&self, now: DateTime<Utc>) -> bool {
        if self.state.is_terminal() {
            self.delivered_at.is_none() && self.redeliver_at.is_some_and(|at| at < now)
        } else {
            self.lease.as_ref().is_none_or(|l| l.until < now)
        }
    }

    /// The moment the cap runs out, once the task has started.
    pub fn cap_deadline(&self) -> Option<DateTime<Utc>> {
        let cap = chrono::Duration::seconds(i64::try_from(self.cap_s).unwrap_or(i64::MAX / 2));
        self.started_at.map(|s| s + cap)
    }

    /// Whether `(ext, user)` owns this task (I-LONGRUN-BG-USER-SCOPED).
    pub fn is_owned_by(&self, ext: &str, user: &str) -> bool {
        self.ext == ext && self.user == user
    }
}

/// What an audit item records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    /// The task was accepted.
    Created,
    /// A message reached the user's chat (I-LONGRUN-CHAT-INJECT-AUDIT-EVERY).
    Delivered,
    /// The user asked to cancel.
    CancelRequested,
    /// The task ended as cancelled.
    Cancelled,
    /// An expired lease was taken over by another worker.
    Reclaimed,
    /// Something the handler could not express: an error, a panic, a cap, a dead worker, an
    /// undeliverable message.
    Critical,
}

/// One line of a task's audit trail. Its `audit_id` is deterministic, so writing the same
/// event twice (a redelivered message) leaves one item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditItem {
    /// The task the item belongs to.
    pub task_id: TaskId,
    /// Unique within the task, e.g. `delivered#result`, `delivered#progress#3`.
    pub audit_id: String,
    /// What kind of event the item records.
    pub kind: AuditKind,
    /// When the event happened.
    pub at: DateTime<Utc>,
    /// The task's extension, copied so the trail can be read without the task.
    pub ext: String,
    /// The task's owner, copied from the task.
    pub user: String,
    /// The task's chat, copied from the task.
    pub chat: String,
    /// Free text for operators: an error, a panic message, an HTTP status; may be empty.
    pub detail: String,
}

/// The longest audit item `detail`, in characters: a longer one (a huge error message, say)
/// is cut with `…`, so an audit write never fails for its size.
pub const MAX_AUDIT_DETAIL_CHARS: usize = 2000;

/// `text`, cut to `max` characters (the last one `…`) when longer.
pub(crate) fn cut_chars(text: String, max: usize) -> String {
    if text.chars().nth(max).is_none() {
        return text;
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

impl AuditItem {
    /// An audit item about `task`; `detail` is cut to [`MAX_AUDIT_DETAIL_CHARS`].
    pub fn new(
        task: &Task,
        audit_id: impl Into<String>,
        kind: AuditKind,
        at: DateTime<Utc>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            task_id: task.task_id.clone(),
            audit_id: audit_id.into(),
            kind,
            at,
            ext: task.ext.clone(),
            user: task.user.clone(),
            chat: task.chat.clone(),
            detail: cut_chars(detail.into(), MAX_AUDIT_DETAIL_CHARS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskState::*;

    #[test]
    fn a_long_text_is_cut_to_its_limit_in_characters() {
        assert_eq!(cut_chars("short".into(), 10), "short");
        assert_eq!(cut_chars("é".repeat(10), 10), "é".repeat(10));
        let cut = cut_chars("é".repeat(5000), MAX_AUDIT_DETAIL_CHARS);
        assert_eq!(cut.chars().count(), MAX_AUDIT_DETAIL_CHARS);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn the_happy_path_is_legal() {
        assert_eq!(Queued.transition(Running), Ok(Running));
        assert_eq!(Running.transition(Succeeded), Ok(Succeeded));
    }

    #[test]
    fn terminal_states_refuse_every_move() {
        for from in [Succeeded, Failed, Cancelled, TimedOut] {
            for to in [
                Queued, Running, Sleeping, Succeeded, Failed, Cancelled, TimedOut,
            ] {
                assert!(
                    from.transition(to).is_err(),
                    "{from} → {to} must be illegal"
                );
            }
        }
    }

    #[test]
    fn a_queued_task_cannot_succeed_without_running() {
        assert_eq!(
            Queued.transition(Succeeded),
            Err(IllegalTransition {
                from: Queued,
                to: Succeeded
            })
        );
        assert!(Queued.transition(TimedOut).is_err());
    }

    #[test]
    fn a_task_sleeps_only_while_running_and_leaves_sleep_by_waking_requeue_or_abandon() {
        assert_eq!(Running.transition(Sleeping), Ok(Sleeping));
        for to in [Running, Queued, Failed] {
            assert_eq!(Sleeping.transition(to), Ok(to));
        }
        // A sleeping task is cancelled or timed out by the worker that wakes it.
        for to in [Succeeded, Cancelled, TimedOut, Sleeping] {
            assert!(Sleeping.transition(to).is_err(), "sleeping → {to}");
        }
        assert!(Queued.transition(Sleeping).is_err());
        assert!(!Sleeping.is_terminal());
    }

    #[test]
    fn caps_are_180_and_1800_seconds() {
        assert_eq!(Cap::for_long_running(false).seconds(), 180);
        assert_eq!(Cap::for_long_running(true).seconds(), 1800);
    }

    #[test]
    fn task_ids_are_ulids() {
        let id = TaskId::generate(Utc::now());
        assert_eq!(id.as_str().len(), 26);
        assert_eq!(id.as_str().parse::<TaskId>().unwrap(), id);
        assert!("not-a-ulid".parse::<TaskId>().is_err());
        assert!(serde_json::from_str::<TaskId>("\"../../etc\"").is_err());
    }

    #[test]
    fn states_round_trip_as_snake_case() {
        assert_eq!(serde_json::to_string(&TimedOut).unwrap(), "\"timed_out\"");
        for s in [
            Queued, Running, Sleeping, Succeeded, Failed, Cancelled, TimedOut,
        ] {
            assert_eq!(s.as_str().parse::<TaskState>().unwrap(), s);
        }
    }
}
