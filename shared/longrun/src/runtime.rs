//! `Runtime`: the extension, the ports and the settings every pipeline step runs with, and
//! the one place a background task is created (Pattern B's ack and Pattern C's
//! `background_task` both go through [`Runtime::enqueue`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::ctx::{BackgroundError, BackgroundOptions, Caller, Launcher, TaskRun};
use crate::http::Http;
use crate::ports::{
    ChatApi, Clock, Created, DeliveryQueue, KvStore, PortError, RequestKey, SecretStore, TaskStore,
    UsageStore, WorkQueue,
};
use crate::task::{Cap, Lease, Progress, Task, TaskId, TaskKind, TaskState};
use crate::wire::{MAX_PARAMS_BYTES, Unfit, WorkMessage};
use crate::{ActionResult, Ctx, Extension};

/// The adapters a pipeline step talks to.
#[derive(Clone)]
pub struct Services {
    /// The task table: records, leases, checkpoints, steps and audit items.
    pub tasks: Arc<dyn TaskStore>,
    /// The work queue that feeds the worker.
    pub work: Arc<dyn WorkQueue>,
    /// The delivery queue that feeds delivery.
    pub delivery: Arc<dyn DeliveryQueue>,
    /// Per-user secrets, behind `ctx.secrets`.
    pub secrets: Arc<dyn SecretStore>,
    /// Per-user key/value storage, behind `ctx.store`.
    pub kv: Arc<dyn KvStore>,
    /// Per-user daily budgets' meters, behind `ctx.charge`.
    pub usage: Arc<dyn UsageStore>,
    /// The chat platform's message API, which delivery posts to.
    pub chat: Arc<dyn ChatApi>,
    /// Wall time for timestamps and lease expiry.
    pub clock: Arc<dyn Clock>,
    /// The HTTP client behind `ctx.http`, built once per cold start.
    pub http: reqwest::Client,
}

/// Timing and retry settings. The defaults are the production values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// How long a lease lasts without renewal.
    pub lease: Duration,
    /// How often a running task's cancel flag and lease are checked: a read, or the write
    /// that renews the lease when one is due ([`Settings::renew_every`]) or progress waits.
    pub heartbeat: Duration,
    /// The least time between two progress writes; bursts in between are coalesced. Equal to
    /// the heartbeat, so a progress write stands in for a heartbeat and writes per task do not
    /// grow with the progress rate.
    pub progress_interval: Duration,
    /// How long a running task's progress may stand still, its heartbeat alive, before the
    /// chat gets one "still working on it" notice (`LONGRUN_STALL_MS`, 60 s); a function may
    /// set its own or none ([`ChatFunction::stall_notice`](crate::ChatFunction::stall_notice)).
    pub stall_after: Duration,
    /// How long a cancelled handler may take to notice before it is dropped.
    pub cancel_grace: Duration,
    /// How long a queued task may wait for a worker before the sweeper re-sends its message.
    pub queue_grace: Duration,
    /// How many times a task may be claimed before it is ended as failed.
    pub max_attempts: u32,
    /// The queues' `maxReceiveCount`: the receive after which a message is dead-lettered.
    pub max_receives: u32,
    /// How long before the Lambda deadline the worker stops and hands the task on.
    pub deadline_margin: Duration,
    /// The longest a checkpointed step may run (the per-call HTTP cap); the worker hands a
    /// task on when less than this is left before the Lambda deadline.
    pub step_budget: Duration,
    /// Replaces both task caps (180 s / 1800 s); for tests and local demos only.
    pub cap_override: Option<Duration>,
    /// How many tasks one (ext, user) may have queued or running at once
    /// (`LONGRUN_MAX_ACTIVE_TASKS`, 10): one user cannot fill the queue and the worker fleet.
    pub max_active_tasks: u32,
    /// How long a finished task's record is kept (`LONGRUN_TASK_TTL_DAYS`, 30 days): a work
    /// message older than this whose record is gone names a task that may have finished and
    /// expired, so the worker does not write its record again.
    pub task_ttl: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(60),
            heartbeat: Duration::from_secs(5),
            progress_interval: Duration::from_secs(5),
            stall_after: Duration::from_secs(60),
            cancel_grace: Duration::from_secs(2),
            queue_grace: Duration::from_secs(120),
            max_attempts: 3,
            max_receives: 5,
            deadline_margin: Duration::from_secs(10),
            step_budget: crate::step::DEFAULT_STEP_BUDGET,
            cap_override: None,
            max_active_tasks: 10,
            task_ttl: Duration::from_secs(30 * 86_400),
        }
    }
}

impl Settings {
    /// How often a running task's lease is renewed by a write when nothing else writes: a
    /// third of the lease (two renewals may fail before it lapses), and never more often than
    /// the heartbeat. Between renewals the heartbeat only reads.
    pub fn renew_every(&self) -> Duration {
        (self.lease / 3).max(self.heartbeat)
    }

    /// The defaults, with any of these set in the environment (for tests and demos, where a
    /// 180 s cap or a 60 s lease would make every run slow): `LONGRUN_CAP_S`,
    /// `LONGRUN_LEASE_MS`, `LONGRUN_HEARTBEAT_MS`, `LONGRUN_PROGRESS_INTERVAL_MS`,
    /// `LONGRUN_STALL_MS`, `LONGRUN_CANCEL_GRACE_MS`, `LONGRUN_QUEUE_GRACE_MS`, `LONGRUN_MAX_ATTEMPTS`,
    /// `LONGRUN_DEADLINE_MARGIN_MS`, `LONGRUN_STEP_BUDGET_MS`, `LONGRUN_MAX_ACTIVE_TASKS`; and
    /// `LONGRUN_TASK_TTL_DAYS`.
    pub fn from_env() -> Result<Self, crate::config::ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`Settings::from_env`] through `lookup`.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, crate::config::ConfigError> {
        let number = |name: &'static str| -> Result<Option<u64>, crate::config::ConfigError> {
            match lookup(name).filter(|v| !v.trim().is_empty()) {
                None => Ok(None),
                Some(v) => v.trim().parse::<u64>().map(Some).map_err(|_| {
                    crate::config::ConfigError::Invalid {
                        name,
                        reason: format!("{v:?} is not a whole number"),
                    }
                }),
            }
        };
        let ms = |name: &'static str,
                  default: Duration|
         -> Result<Duration, crate::config::ConfigError> {
            Ok(number(name)?.map(Duration::from_millis).unwrap_or(default))
        };
        let d = Self::default();
        let settings = Self {
            lease: ms("LONGRUN_LEASE_MS", d.lease)?,
            heartbeat: ms("LONGRUN_HEARTBEAT_MS", d.heartbeat)?,
            progress_interval: ms("LONGRUN_PROGRESS_INTERVAL_MS", d.progress_interval)?,
            stall_after: ms("LONGRUN_STALL_MS", d.stall_after)?,
            cancel_grace: ms("LONGRUN_CANCEL_GRACE_MS", d.cancel_grace)?,
            queue_grace: ms("LONGRUN_QUEUE_GRACE_MS", d.queue_grace)?,
            max_attempts: match number("LONGRUN_MAX_ATTEMPTS")? {
                None => d.max_attempts,
                Some(n @ 1..=100) => n as u32,
                Some(n) => {
                    return Err(crate::config::ConfigError::Invalid {
                        name: "LONGRUN_MAX_ATTEMPTS",
                        reason: format!("{n} is outside 1 to 100"),
                    });
                }
            },
            max_receives: d.max_receives,
            deadline_margin: ms("LONGRUN_DEADLINE_MARGIN_MS", d.deadline_margin)?,
            step_budget: ms("LONGRUN_STEP_BUDGET_MS", d.step_budget)?,
            cap_override: number("LONGRUN_CAP_S")?.map(Duration::from_secs),
            max_active_tasks: match number("LONGRUN_MAX_ACTIVE_TASKS")? {
                None => d.max_active_tasks,
                Some(n @ 1..=10_000) => n as u32,
                Some(n) => {
                    return Err(crate::config::ConfigError::Invalid {
                        name: "LONGRUN_MAX_ACTIVE_TASKS",
                        reason: format!("{n} is outside 1 to 10000"),
                    });
                }
            },
            task_ttl: crate::config::task_ttl(&lookup)?,
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Refuses timings that would break the pipeline's guarantees rather than run with them:
    /// a zero lease, heartbeat, progress interval, queue grace or cap, and a lease shorter
    /// than two heartbeats (one slow write would let a live task's lease lapse, and another
    /// worker would run it a second time).
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        let invalid = |name: &'static str, reason: String| {
            Err(crate::config::ConfigError::Invalid { name, reason })
        };
        for (name, value) in [
            ("LONGRUN_LEASE_MS", self.lease),
            ("LONGRUN_HEARTBEAT_MS", self.heartbeat),
            ("LONGRUN_PROGRESS_INTERVAL_MS", self.progress_interval),
            ("LONGRUN_STALL_MS", self.stall_after),
            ("LONGRUN_QUEUE_GRACE_MS", self.queue_grace),
            ("LONGRUN_STEP_BUDGET_MS", self.step_budget),
            ("LONGRUN_CAP_S", self.cap_override.unwrap_or(Duration::MAX)),
        ] {
            if value.is_zero() {
                return invalid(name, "must be more than 0".to_owned());
            }
        }
        if self.lease < self.heartbeat * 2 {
            return invalid(
                "LONGRUN_LEASE_MS",
                format!(
                    "the lease ({} ms) must last at least two heartbeats (LONGRUN_HEARTBEAT_MS \
                     {} ms), or a live task's lease lapses between them",
                    self.lease.as_millis(),
                    self.heartbeat.as_millis()
                ),
            );
        }
        Ok(())
    }
}

/// The ports and settings every pipeline step runs with and, for intake and the worker, the
/// extension whose handlers they run. Delivery, the sweeper and the operator commands need
/// no extension: they read everything from the stored task. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    extension: Option<Arc<Extension>>,
    /// The adapters.
    pub services: Services,
    /// Timing and retry settings.
    pub settings: Arc<Settings>,
}

impl Runtime {
    /// A runtime with no extension: delivery, the sweeper and operator commands.
    pub fn new(services: Services, settings: Settings) -> Self {
        Self {
            extension: None,
            services,
            settings: Arc::new(settings),
        }
    }

    /// A runtime that serves `extension`: intake and the worker.
    pub fn serving(extension: Extension, services: Services, settings: Settings) -> Self {
        Self {
            extension: Some(Arc::new(extension)),
            ..Self::new(services, settings)
        }
    }

    /// The extension this runtime serves, if any.
    pub fn extension(&self) -> Option<&Extension> {
        self.extension.as_deref()
    }

    /// The served extension's name, or `""` when it serves none.
    pub fn extension_name(&self) -> &str {
        self.extension().map_or("", Extension::name)
    }

    /// Now, by the runtime's clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.services.clock.now()
    }

    /// The cap in seconds for a `long_running` flag (or the override).
    pub fn cap_seconds(&self, long_running: bool) -> u64 {
        match self.settings.cap_override {
            Some(cap) => cap.as_secs().max(1),
            None => Cap::for_long_running(long_running).seconds(),
        }
    }

    /// The lease a queued task carries: when it lapses, the sweeper re-sends the work message.
    pub(crate) fn queue_lease(&self, now: DateTime<Utc>) -> Lease {
        Lease {
            owner: QUEUE_OWNER.to_owned(),
            until: now + to_chrono(self.settings.queue_grace),
        }
    }

    /// When a result finished at `now` is sent again if it is still not delivered: the
    /// queue grace later, as for a work message that never arrived.
    pub(crate) fn redeliver_at(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now + to_chrono(self.settings.queue_grace)
    }

    /// A fresh queued task.
    pub(crate) fn new_task(&self, spec: TaskSpec, request_id: Option<String>) -> Task {
        let now = self.now();
        Task {
            task_id: TaskId::generate(now),
            ext: spec.caller.ext,
            user: spec.caller.user,
            chat: spec.caller.chat,
            function: spec.function,
            kind: spec.kind,
            event: spec.event,
            name: spec.name,
            state: TaskState::Queued,
            progress: Progress::default(),
            progress_seq: 0,
            attempt: 0,
            cap_s: self.cap_seconds(spec.long_running),
            cancel_requested: false,
            created_at: now,
            wake_at: None,
            started_at: None,
            heartbeat_at: None,
            finished_at: None,
            delivered_at: None,
            redeliver_at: None,
            result: None,
            params: spec.params,
            partial: None,
            lease: Some(self.queue_lease(now)),
            request_id,
            isolated: false,
        }
    }

    /// Writes the task record and sends its work message concurrently, so the ack costs one
    /// round trip. With a request key, a repeated request returns the first task's id. A user
    /// with [`Settings::max_active_tasks`] tasks queued or running gets
    /// [`EnqueueError::TooManyTasks`], and the task is recorded as refused (its work message,
    /// already sent, then runs nothing).
    pub async fn enqueue(
        &self,
        task: Task,
        request: Option<RequestKey>,
    ) -> Result<TaskId, EnqueueError> {
        let message = WorkMessage::for_task(&task);
        let (created, sent) = tokio::join!(
            self.create_within_limit(&task, request.as_ref()),
            self.services.work.send(&message)
        );
        match created? {
            Created::New => {
                if let Err(err) = sent {
                    // The record is written and carries a queue lease: when it lapses, the
                    // sweeper sends the work message again. The ack stays true.
                    tracing::warn!(task_id = %task.task_id, error = %err, "work message not sent; the sweeper will resend it");
                }
                tracing::info!(task_id = %task.task_id, ext = %task.ext, user = %task.user, function = %task.function, "task enqueued");
                Ok(task.task_id)
            }
            Created::Duplicate(existing) => {
                // The message just sent names a task that was never written; the worker drops
                // it (its request key names `existing`). If the first attempt's message was
                // lost, the existing queued task gets a fresh one.
                if let Some(first) = self.services.tasks.get(&existing).await?
                    && first.state == TaskState::Queued
                {
                    self.services
                        .work
                        .send(&WorkMessage::for_task(&first))
                        .await?;
                }
                Ok(existing)
            }
            Created::AtLimit(_) => {
                let limit = self.settings.max_active_tasks;
                let refused = EnqueueError::TooManyTasks { limit };
                let answer = ActionResult::error(refused.to_string(), true);
                self.services
                    .tasks
                    .refuse(&task, &answer, self.now())
                    .await?;
                tracing::info!(task_id = %task.task_id, ext = %task.ext, user = %task.user, limit, "task refused: too many active tasks");
                Err(refused)
            }
        }
    }

    /// Creates `task` within its user's active-task limit. A refusal lists the tasks the table
    /// counts; any of them that ended (or is gone) without its count being released is
    /// released, and the creation tried once more — a lost write cannot lock a user out.
    pub(crate) async fn create_within_limit(
        &self,
        task: &Task,
        request: Option<&RequestKey>,
    ) -> Result<Created, PortError> {
        let limit = Some(self.settings.max_active_tasks);
        let tasks = &self.services.tasks;
        let created = tasks.create(task, request, limit).await?;
        let Created::AtLimit(active) = &created else {
            return Ok(created);
        };
        let mut released = false;
        for id in active {
            let live = tasks.get(id).await?.is_some_and(|t| !t.state.is_terminal());
            if !live {
                tasks.release(&task.ext, &task.user, id).await?;
                released = true;
            }
        }
        if released {
            tasks.create(task, request, limit).await
        } else {
            Ok(created)
        }
    }

    /// Queues a finished task's work again as a new task: same owner, chat, function and
    /// params (`longrun tasks retry`).
    pub async fn resubmit(&self, task: &Task) -> Result<TaskId, EnqueueError> {
        let spec = TaskSpec {
            caller: Caller::from(task),
            function: task.function.clone(),
            kind: task.kind,
            event: task.event.clone(),
            name: task.name.clone(),
            long_running: task.cap_s > Cap::Standard.seconds(),
            params: task.params.clone(),
        };
        let retry = self.new_task(spec, None);
        self.enqueue(retry, None).await
    }

    /// The handler context for `caller`: inline (intake) or, with `run`, as a background
    /// task.
    pub(crate) fn ctx(
        &self,
        caller: Caller,
        http_deadline: Option<tokio::time::Instant>,
        run: Option<TaskRun>,
        request_id: Option<String>,
    ) -> Ctx {
        let meter = crate::ctx::Meter {
            usage: Arc::clone(&self.services.usage),
            clock: Arc::clone(&self.services.clock),
            run: request_id
                .clone()
                .unwrap_or_else(|| ulid::Ulid::new().to_string()),
            charges: AtomicU32::new(0),
        };
        let launcher = Arc::new(TaskLauncher {
            runtime: self.clone(),
            caller: caller.clone(),
            request_id,
            launched: AtomicU32::new(0),
        });
        let mut http = Http::new(self.services.http.clone(), http_deadline);
        if let Some(cancel) = run.as_ref().and_then(|r| r.progress.cancel_signal()) {
            http = http.cancelled_by(cancel);
        }
        Ctx::new(
            caller,
            self.extension.clone(),
            http,
            (
                Arc::clone(&self.services.secrets),
                Arc::clone(&self.services.kv),
            ),
            run,
            launcher,
            meter,
        )
    }
}

/// Why a background task was not enqueued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnqueueError {
    /// The user already has this many tasks queued or running.
    #[error(
        "You already have {limit} tasks queued or running; try again when one of them has finished."
    )]
    TooManyTasks {
        /// [`Settings::max_active_tasks`].
        limit: u32,
    },
    /// The task table or the work queue failed.
    #[error(transparent)]
    Port(#[from] PortError),
}

/// The lease owner of a task waiting in the queue.
pub(crate) const QUEUE_OWNER: &str = "queue";

/// What a new task runs and for whom.
pub(crate) struct TaskSpec {
    pub caller: Caller,
    pub function: String,
    pub kind: TaskKind,
    pub event: Option<String>,
    pub name: Option<String>,
    pub long_running: bool,
    pub params: Value,
}

pub(crate) fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// `ctx.background_task` for one handler run. The n-th task a run launches gets the request
/// key `{request_id}#{n}`, so a retried request re-launches none.
struct TaskLauncher {
    runtime: Runtime,
    caller: Caller,
    request_id: Option<String>,
    launched: AtomicU32,
}

#[async_trait]
impl Launcher for TaskLauncher {
    async fn launch(
        &self,
        job_name: &str,
        input: Value,
        options: BackgroundOptions,
    ) -> Result<TaskId, BackgroundError> {
        let job = self
            .runtime
            .extension()
            .and_then(|e| e.get_job(job_name))
            .ok_or_else(|| BackgroundError::UnknownJob(job_name.to_owned()))?;
        job.validate(&input)?;
        crate::wire::fits(&input, MAX_PARAMS_BYTES).map_err(|unfit| match unfit {
            Unfit::TooLarge { size } => BackgroundError::TooLarge {
                size,
                limit: MAX_PARAMS_BYTES,
            },
            Unfit::Unstorable(reason) => BackgroundError::Unstorable(reason),
        })?;
        let n = self.launched.fetch_add(1, Ordering::SeqCst);
        let request_id = self.request_id.as_ref().map(|r| format!("{r}#{n}"));
        let request = request_id.clone().map(|request_id| RequestKey {
            ext: self.caller.ext.clone(),
            user: self.caller.user.clone(),
            request_id,
        });
        let spec = TaskSpec {
            caller: self.caller.clone(),
            function: job.name().to_owned(),
            kind: TaskKind::Job,
            event: job.event_name().map(str::to_owned),
            name: options.name,
            long_running: options.long_running,
            params: input,
        };
        let task = self.runtime.new_task(spec, request_id);
        match self.runtime.enqueue(task, request).await {
            Ok(task_id) => Ok(task_id),
            Err(EnqueueError::TooManyTasks { limit }) => {
                Err(BackgroundError::TooManyTasks { limit })
            }
            Err(EnqueueError::Port(err)) => Err(err.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Result<Settings, crate::config::ConfigError> {
        Settings::from_lookup(|name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn the_defaults_and_the_test_timings_are_valid() {
        assert_eq!(settings(&[]).unwrap(), Settings::default());
        let fast = settings(&[
            ("LONGRUN_LEASE_MS", "3000"),
            ("LONGRUN_HEARTBEAT_MS", "500"),
            ("LONGRUN_MAX_ATTEMPTS", "2"),
        ])
        .unwrap();
        assert_eq!((fast.lease.as_millis(), fast.max_attempts), (3000, 2));
    }

    #[test]
    fn timings_that_break_a_guarantee_are_refused_by_name() {
        for (pairs, name, words) in [
            (
                &[("LONGRUN_LEASE_MS", "8000")][..],
                "LONGRUN_LEASE_MS",
                "at least two heartbeats",
            ),
            (
                &[("LONGRUN_HEARTBEAT_MS", "40000")],
                "LONGRUN_LEASE_MS",
                "at least two heartbeats",
            ),
            (
                &[("LONGRUN_HEARTBEAT_MS", "0")],
                "LONGRUN_HEARTBEAT_MS",
                "more than 0",
            ),
            (
                &[("LONGRUN_QUEUE_GRACE_MS", "0")],
                "LONGRUN_QUEUE_GRACE_MS",
                "more than 0",
            ),
            (&[("LONGRUN_CAP_S", "0")], "LONGRUN_CAP_S", "more than 0"),
            (
                &[("LONGRUN_MAX_ATTEMPTS", "0")],
                "LONGRUN_MAX_ATTEMPTS",
                "outside 1 to 100",
            ),
            (
                &[("LONGRUN_MAX_ACTIVE_TASKS", "0")],
                "LONGRUN_MAX_ACTIVE_TASKS",
                "outside 1 to 10000",
            ),
            (
                &[("LONGRUN_LEASE_MS", "soon")],
                "LONGRUN_LEASE_MS",
                "whole number",
            ),
        ] {
            match settings(pairs) {
                Err(crate::config::ConfigError::Invalid { name: n, reason }) => {
                    assert_eq!(n, name, "{pairs:?}: {reason}");
                    assert!(reason.contains(words), "{pairs:?}: {reason}");
                }
                other => panic!("{pairs:?} gave {other:?}"),
            }
        }
    }
}
