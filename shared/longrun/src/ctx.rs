//! `Ctx`: what a handler can reach — `http`, `secrets`, `store`, `progress` and
//! `background_task` — bound to the (ext, user) the call belongs to.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::ActionResult;
use crate::extension::{Extension, ParamsError};
use crate::http::Http;
use crate::lease::RunLease;
use crate::ports::{Clock, KvStore, PortError, Secret, SecretStore, UsageStore};
use crate::step::{Check, StepError, StepLog};
use crate::task::{Progress, TaskId};
use crate::wire::Unfit;

/// Why `ctx.progress` did not record a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgressError {
    /// The user cancelled the task: propagate this with `?`.
    #[error("task cancelled by the user")]
    Cancelled,
    /// `pct` is not within 0–100.
    #[error("progress pct {pct} is outside 0–100")]
    OutOfRange {
        /// The percentage the handler passed.
        pct: i64,
    },
    /// Another worker took the task over (this one's lease lapsed); stop working.
    #[error("the task's lease was taken over by another worker")]
    LeaseLost,
}

/// Why `ctx.charge` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChargeError {
    /// No budget of that name is declared on the extension (`Extension::budget`).
    #[error("no budget named {0:?} is declared")]
    UnknownMeter(String),
    /// This charge took the user past the day's budget. It is recorded all the same (the use
    /// happened). Propagated with `?` out of a handler, the runtime answers the user with this
    /// message (not retryable, no critical audit item), and intake refuses the user's next
    /// calls until the day is over (`429 over_budget`).
    #[error("Your daily budget of {per_day} {description} is used up; it renews at 00:00 UTC.")]
    OverBudget {
        /// The meter.
        meter: String,
        /// The day's total, this charge included.
        used: u64,
        /// The budget per day.
        per_day: u64,
        /// What the unit is.
        description: String,
    },
    /// The meter could not be written.
    #[error("could not record the use of {meter:?}: {source}")]
    Unavailable {
        /// The meter.
        meter: String,
        /// What the store said.
        source: PortError,
    },
}

impl ChargeError {
    /// `budget` passed: `used` units of it are recorded today.
    pub(crate) fn over_budget(budget: &crate::extension::Budget, used: u64) -> Self {
        Self::OverBudget {
            meter: budget.meter.clone(),
            used,
            per_day: budget.per_day,
            description: budget.description.clone(),
        }
    }

    /// What the user is told when a handler propagates this error.
    pub fn to_result(&self) -> ActionResult {
        match self {
            Self::OverBudget { .. } => ActionResult::error(self.to_string(), false),
            Self::UnknownMeter(_) | Self::Unavailable { .. } => ActionResult::error(
                "Could not record what this used; try again in a moment.",
                true,
            ),
        }
    }
}

/// Where `ctx.charge` records: the meters, who is charged, and the id of each charge.
pub(crate) struct Meter {
    pub(crate) usage: Arc<dyn UsageStore>,
    pub(crate) clock: Arc<dyn Clock>,
    /// Names the run: a charge's id is `{run}:{meter}:{n}`, n counting the run's charges, so
    /// a replayed or retried run's charges count once.
    pub(crate) run: String,
    pub(crate) charges: std::sync::atomic::AtomicU32,
}

/// Why `ctx.partial` did not record a value (the one recorded before stays).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartialError {
    /// The value does not serialize to JSON.
    #[error("partial result does not serialize: {0}")]
    Serialize(String),
    /// The value is larger than a partial result may be.
    #[error("partial result is {size} bytes; the limit is {limit}")]
    TooLarge {
        /// The value's size as JSON, in bytes.
        size: usize,
        /// [`MAX_PARTIAL_BYTES`].
        limit: usize,
    },
    /// The table cannot store the value (too deeply nested, or a number out of range).
    #[error("partial result cannot be stored: {0}")]
    Unstorable(String),
}

/// The largest value `ctx.partial` records, as JSON: it must fit in the fallback result.
pub const MAX_PARTIAL_BYTES: usize = 64 * 1024;

/// Why `ctx.background_task` did not start a task.
#[derive(Debug, thiserror::Error)]
pub enum BackgroundError {
    /// No job of that name is registered on the extension.
    #[error("no job named {0:?} is registered")]
    UnknownJob(String),
    /// The input does not fit the job's input type.
    #[error("job input does not fit: {0}")]
    InvalidInput(#[from] ParamsError),
    /// The input is larger than a task can carry.
    #[error("job input is {size} bytes; the limit is {limit}")]
    TooLarge {
        /// The input's serialized size, in bytes.
        size: usize,
        /// The most a task's params may take ([`crate::wire::MAX_PARAMS_BYTES`]).
        limit: usize,
    },
    /// The input is valid JSON that the task table cannot store
    /// ([`crate::wire::check_storable`]).
    #[error("job input {0}")]
    Unstorable(String),
    /// The input could not be serialized.
    #[error("job input cannot be serialized: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The user already has this many tasks queued or running
    /// ([`crate::Settings::max_active_tasks`]). Propagated with `?` out of an inline handler,
    /// intake answers `429 too_many_tasks`.
    #[error(
        "You already have {limit} tasks queued or running; try again when one of them has finished."
    )]
    TooManyTasks {
        /// The limit.
        limit: u32,
    },
    /// The task table or the work queue failed.
    #[error("could not enqueue the task: {0}")]
    Port(#[from] PortError),
}

/// Options of a background task.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackgroundOptions {
    /// Raises the cap from 180 s to 1800 s.
    pub long_running: bool,
    /// A human name, shown in task lists.
    pub name: Option<String>,
}

impl BackgroundOptions {
    /// Sets `long_running`.
    pub fn long_running(mut self, long_running: bool) -> Self {
        self.long_running = long_running;
        self
    }

    /// Sets the name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
}

/// Where progress goes: the worker's checkpointer.
#[async_trait]
pub(crate) trait ProgressSink: Send + Sync {
    async fn report(&self, progress: Progress) -> Result<(), ProgressError>;

    /// Keeps `value` as the run's partial result, written with the next checkpoint.
    async fn partial(&self, value: Value);

    /// Turns `true` once the task is seen cancelled (stops `ctx.http` calls in flight).
    fn cancel_signal(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }
}

/// Where `background_task` goes: intake's (or the worker's) task launcher.
#[async_trait]
pub(crate) trait Launcher: Send + Sync {
    async fn launch(
        &self,
        job: &str,
        input: Value,
        options: BackgroundOptions,
    ) -> Result<TaskId, BackgroundError>;
}

/// `ctx.secrets`: the user's secrets for this extension.
#[derive(Clone)]
pub struct Secrets {
    port: Arc<dyn SecretStore>,
    ext: String,
    user: String,
    extension: Option<Arc<Extension>>,
}

/// Why [`Secrets::require`] has no value to give.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The user has not connected the secret. Propagated with `?` out of a handler, the
    /// runtime answers the user with `ActionResult::error("{description} not connected",
    /// retryable: false)` — the seed's "OpenAI key not connected" — and no critical audit
    /// item: it is the user's to fix, not the operator's.
    #[error("{description} not connected")]
    NotConnected {
        /// The secret's name.
        name: String,
        /// Its declared description (or its name, when undeclared).
        description: String,
    },
    /// The secret store failed.
    #[error("could not read the secret {name:?}: {source}")]
    Unavailable {
        /// The secret's name.
        name: String,
        /// What the store said.
        source: PortError,
    },
}

impl SecretError {
    /// The answer the user gets when a handler propagates this error.
    pub fn to_result(&self) -> ActionResult {
        match self {
            Self::NotConnected { .. } => ActionResult::error(self.to_string(), false),
            Self::Unavailable { name, .. } => ActionResult::error(
                format!("Could not read your {name} right now; try again in a moment."),
                true,
            ),
        }
    }
}

impl Secrets {
    /// The secret `name`, or `None` if the user has not connected it.
    pub async fn get(&self, name: &str) -> Result<Option<Secret>, PortError> {
        self.port.get(&self.ext, &self.user, name).await
    }

    /// The secret `name`, or [`SecretError::NotConnected`]: the one-line form of the seed's
    /// "key not connected" answer.
    ///
    /// ```ignore
    /// let api_key = ctx.secrets.require("openai_api_key").await?;
    /// ```
    pub async fn require(&self, name: &str) -> Result<Secret, SecretError> {
        match self.get(name).await {
            Ok(Some(secret)) => Ok(secret),
            Ok(None) => Err(SecretError::NotConnected {
                name: name.to_owned(),
                description: self.description(name),
            }),
            Err(source) => Err(SecretError::Unavailable {
                name: name.to_owned(),
                source,
            }),
        }
    }

    /// `ActionResult::error("{description} not connected", false)` for the declared secret
    /// `name`, for a handler that checks [`Secrets::get`] itself.
    pub fn not_connected(&self, name: &str) -> ActionResult {
        SecretError::NotConnected {
            name: name.to_owned(),
            description: self.description(name),
        }
        .to_result()
    }

    fn description(&self, name: &str) -> String {
        self.extension
            .as_deref()
            .and_then(|e| e.secrets().iter().find(|s| s.name == name))
            .map(|s| s.description.clone())
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| name.to_owned())
    }
}

/// [`Ctx::state`] asked for a type the extension was not given with
/// [`Extension::with_state`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the extension has no state of type {type_name} (register it with Extension::with_state)")]
pub struct MissingState {
    /// The type asked for.
    pub type_name: &'static str,
}

/// `ctx.store`: key/value storage private to this (ext, user).
#[derive(Clone)]
pub struct Store {
    port: Arc<dyn KvStore>,
    ext: String,
    user: String,
    /// In a background task: the run's lease, which every write must still hold.
    lease: Option<Arc<RunLease>>,
}

/// Why a `ctx.store` call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The key/value table failed.
    #[error(transparent)]
    Port(#[from] PortError),
    /// The stored value does not fit the requested type, or the value to store is not
    /// serializable as JSON.
    #[error("stored value does not fit the requested type: {0}")]
    Decode(#[from] serde_json::Error),
    /// Keys are 1 to 1024 bytes (DynamoDB's sort key limit).
    #[error("store key must be 1 to {MAX_STORE_KEY_BYTES} bytes, got {0}")]
    InvalidKey(usize),
    /// Another worker took the background task over (this run's lease lapsed): the write
    /// was refused, and the run stops.
    #[error("not stored: another worker took the task over")]
    LeaseLost,
}

/// The longest progress message, in characters: a longer one is cut (with `…`), so every
/// checkpoint — each one a heartbeat and a cancellation point — stays a small write.
pub const MAX_PROGRESS_MESSAGE_CHARS: usize = 500;

/// `message`, cut to [`MAX_PROGRESS_MESSAGE_CHARS`] characters.
fn bounded(message: String) -> String {
    crate::task::cut_chars(message, MAX_PROGRESS_MESSAGE_CHARS)
}

/// The longest `ctx.store` key, in bytes.
pub const MAX_STORE_KEY_BYTES: usize = 1024;

fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() || key.len() > MAX_STORE_KEY_BYTES {
        return Err(StoreError::InvalidKey(key.len()));
    }
    Ok(())
}

impl Store {
    /// The value under `key`, if any.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        check_key(key)?;
        match self.port.get(&self.ext, &self.user, key).await? {
            Some(value) => Ok(Some(serde_json::from_value(value)?)),
            None => Ok(None),
        }
    }

    /// Stores `value` under `key`. In a background task, only while the run holds the
    /// task's lease ([`StoreError::LeaseLost`] otherwise).
    pub async fn set<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        check_key(key)?;
        let value = serde_json::to_value(value)?;
        let written = self
            .port
            .set(&self.ext, &self.user, key, &value, self.holder())
            .await;
        self.guarded(written)
    }

    /// Removes `key`. In a background task, only while the run holds the task's lease.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        check_key(key)?;
        let deleted = self
            .port
            .delete(&self.ext, &self.user, key, self.holder())
            .await;
        self.guarded(deleted)
    }

    fn holder(&self) -> Option<&crate::ports::LeaseHolder> {
        self.lease.as_deref().map(RunLease::holder)
    }

    /// A write's answer; a refusal under the run's lease means the lease is lost.
    fn guarded(&self, written: Result<(), PortError>) -> Result<(), StoreError> {
        match (written, &self.lease) {
            (Err(PortError::Conflict(_)), Some(lease)) => {
                lease.mark_lost();
                Err(StoreError::LeaseLost)
            }
            (written, _) => Ok(written?),
        }
    }
}

/// Who a call belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The extension.
    pub ext: String,
    /// The user.
    pub user: String,
    /// The chat the call came from, where results are delivered.
    pub chat: String,
}

impl From<&crate::task::Task> for Caller {
    /// The task's owner and chat: whom its handler runs for.
    fn from(task: &crate::task::Task) -> Self {
        Self {
            ext: task.ext.clone(),
            user: task.user.clone(),
            chat: task.chat.clone(),
        }
    }
}

/// What a handler running as a background task reaches beyond an inline call: its
/// checkpoints, its steps and its lease.
pub(crate) struct TaskRun {
    pub(crate) task_id: TaskId,
    pub(crate) progress: Arc<dyn ProgressSink>,
    pub(crate) steps: Arc<StepLog>,
    pub(crate) lease: Arc<RunLease>,
}

/// The handler's context.
#[derive(Clone)]
pub struct Ctx {
    /// Outbound HTTP with per-call caps.
    pub http: Http,
    /// The user's secrets.
    pub secrets: Secrets,
    /// The user's key/value store.
    pub store: Store,
    caller: Arc<Caller>,
    extension: Option<Arc<Extension>>,
    task_id: Option<TaskId>,
    progress: Option<Arc<dyn ProgressSink>>,
    steps: Option<Arc<StepLog>>,
    launcher: Arc<dyn Launcher>,
    meter: Arc<Meter>,
}

impl Ctx {
    pub(crate) fn new(
        caller: Caller,
        extension: Option<Arc<Extension>>,
        http: Http,
        (secrets, kv): (Arc<dyn SecretStore>, Arc<dyn KvStore>),
        run: Option<TaskRun>,
        launcher: Arc<dyn Launcher>,
        meter: Meter,
    ) -> Self {
        let (task_id, progress, steps, lease) = match run {
            Some(run) => (
                Some(run.task_id),
                Some(run.progress),
                Some(run.steps),
                Some(run.lease),
            ),
            None => (None, None, None, None),
        };
        Self {
            http,
            secrets: Secrets {
                port: secrets,
                ext: caller.ext.clone(),
                user: caller.user.clone(),
                extension: extension.clone(),
            },
            store: Store {
                port: kv,
                ext: caller.ext.clone(),
                user: caller.user.clone(),
                lease,
            },
            caller: Arc::new(caller),
            extension,
            task_id,
            progress,
            meter: Arc::new(meter),
            steps,
            launcher,
        }
    }

    /// The extension's name.
    pub fn ext(&self) -> &str {
        &self.caller.ext
    }

    /// The calling user.
    pub fn user(&self) -> &str {
        &self.caller.user
    }

    /// The chat the call came from.
    pub fn chat(&self) -> &str {
        &self.caller.chat
    }

    /// The extension's state of type `S`, given with [`Extension::with_state`]: a model
    /// client, a configuration, a connection pool — shared by every handler, never cloned into
    /// their closures.
    pub fn state<S: Send + Sync + 'static>(&self) -> Result<&S, MissingState> {
        self.extension
            .as_deref()
            .and_then(Extension::state_of::<S>)
            .ok_or(MissingState {
                type_name: std::any::type_name::<S>(),
            })
    }

    /// Records `amount` units of the budget `meter` (declared with `Extension::budget`) as
    /// used by this user today (UTC), and returns the day's total.
    ///
    /// Charges are identified by their order in the run: a task resumed after a hand-off or
    /// a crash that charges again in the same order (a step replayed, then charged) counts
    /// each charge once. A charge that takes the user past the budget is recorded and fails
    /// with [`ChargeError::OverBudget`]: propagate it with `?` to stop, and the user gets a
    /// clear message; intake refuses the user's next calls until the day is over.
    pub async fn charge(&self, meter: &str, amount: u64) -> Result<u64, ChargeError> {
        let budget = self
            .extension
            .as_deref()
            .and_then(|e| e.get_budget(meter))
            .ok_or_else(|| ChargeError::UnknownMeter(meter.to_owned()))?;
        let n = self
            .meter
            .charges
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let id = format!("{}:{meter}:{n}", self.meter.run);
        let day = self.meter.clock.now().date_naive();
        let used = self
            .meter
            .usage
            .charge(&self.caller.ext, &self.caller.user, meter, day, &id, amount)
            .await
            .map_err(|source| ChargeError::Unavailable {
                meter: meter.to_owned(),
                source,
            })?;
        if used > budget.per_day {
            return Err(ChargeError::over_budget(budget, used));
        }
        Ok(used)
    }

    /// The background task this handler runs as, if any.
    pub fn task_id(&self) -> Option<&TaskId> {
        self.task_id.as_ref()
    }

    /// Reports progress: a checkpoint, a heartbeat and the cancellation point.
    ///
    /// `pct` must be within 0–100; a value below the last one keeps the last one (progress in
    /// the chat never goes backwards). Returns [`ProgressError::Cancelled`] once the user has
    /// cancelled: propagate it with `?`. Outside a background task (Pattern A) it only checks
    /// `pct`.
    pub async fn progress(
        &self,
        pct: i64,
        message: impl Into<String>,
    ) -> Result<(), ProgressError> {
        let pct = u8::try_from(pct)
            .ok()
            .filter(|p| *p <= 100)
            .ok_or(ProgressError::OutOfRange { pct })?;
        match &self.progress {
            Some(sink) => {
                sink.report(Progress {
                    pct,
                    message: bounded(message.into()),
                })
                .await
            }
            None => Ok(()),
        }
    }

    /// Records what the handler has achieved so far, for the user to keep if the task ends
    /// before it returns.
    ///
    /// If the task is cancelled or runs out of time, the fallback result in the chat carries
    /// the last value recorded as `data: {"partial": value}`; a task that finishes otherwise
    /// delivers its own result and the value is only kept in the task record (`partial`).
    /// The call writes nothing itself: the value goes out with the next checkpoint — a
    /// progress write or a heartbeat, at most one heartbeat later — so it may be called after
    /// every chunk of work. A later value replaces an earlier one; values are limited to
    /// [`MAX_PARTIAL_BYTES`] as JSON. Outside a background task (Pattern A) it only checks
    /// the value.
    pub async fn partial(&self, value: impl Serialize) -> Result<(), PartialError> {
        let value =
            serde_json::to_value(value).map_err(|e| PartialError::Serialize(e.to_string()))?;
        crate::wire::fits(&value, MAX_PARTIAL_BYTES).map_err(|unfit| match unfit {
            Unfit::TooLarge { size } => PartialError::TooLarge {
                size,
                limit: MAX_PARTIAL_BYTES,
            },
            Unfit::Unstorable(reason) => PartialError::Unstorable(reason),
        })?;
        if let Some(sink) = &self.progress {
            sink.partial(value).await;
        }
        Ok(())
    }

    /// Runs `body` as a checkpointed step named `name` and returns its output.
    ///
    /// In a background task, the first run stores the output (in the task's partition); when
    /// the task resumes in a later invocation — handed on before the Lambda deadline, or after
    /// a crash — the stored output is returned without running `body` again, so an AI call
    /// already paid for is not made twice. Steps must be called in the same order with the same
    /// names on every run; outputs are limited to
    /// [`MAX_STEP_OUTPUT_BYTES`](crate::step::MAX_STEP_OUTPUT_BYTES), and a step may take at
    /// most the per-call cap (180 s). Before starting a step that might not finish in the
    /// current invocation, the run stops and a fresh invocation carries on.
    ///
    /// Outside a background task (Pattern A) it just runs `body`.
    pub async fn step<T, F>(&self, name: &str, body: F) -> Result<T, StepError>
    where
        T: Serialize + DeserializeOwned,
        F: std::future::Future<Output = T>,
    {
        match &self.steps {
            Some(log) => log.step(name, body).await,
            None => Ok(body.await),
        }
    }

    /// Waits `duration` without holding a worker: a durable sleep.
    ///
    /// In a background task the run is suspended — progress is written, the lease released,
    /// the invocation ends — and the task is `sleeping` in its record (with `wake_at`) until
    /// a worker takes it up again after `duration` (SQS delays of up to 15 minutes, chained
    /// for longer sleeps) and replays the run to here, finished steps from the record. The
    /// sleep counts toward the task's cap: one that outlasts it ends the task timed out when
    /// the cap is reached. A cancel during the sleep wakes the task at once, runs the
    /// function's `on_stop` hook and ends it cancelled. Like a step, a sleep is identified by
    /// its position in the run, so a replay must reach it in the same order.
    ///
    /// Sleeps shorter than [`SLEEP_IN_PLACE`](crate::SLEEP_IN_PLACE) wait in place, as does
    /// every sleep outside a background task (Pattern A), within the call's time.
    pub async fn sleep(&self, duration: Duration) -> Result<(), StepError> {
        match &self.steps {
            Some(log) => log.sleep(duration).await,
            None => {
                tokio::time::sleep(duration).await;
                Ok(())
            }
        }
    }

    /// Calls `check` until it returns [`Check::Done`], sleeping durably `every` between
    /// checks (as [`Ctx::sleep`]), and returns the value — stored as the step `name`, so a
    /// replay returns it without checking again. Each check of a suspended task is one short
    /// invocation: the way to wait on work done elsewhere, such as a provider's background AI
    /// call, without paying for a worker while it runs. `check` may report progress; a check
    /// that takes longer than the step budget fails the poll with [`StepError::TimedOut`].
    ///
    /// Outside a background task it checks in place, sleeping `every` between checks.
    pub async fn poll<T, F, Fut>(
        &self,
        name: &str,
        every: Duration,
        mut check: F,
    ) -> Result<T, StepError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Check<T>>,
    {
        match &self.steps {
            Some(log) => log.poll(name, every, check).await,
            None => loop {
                if let Check::Done(value) = check().await {
                    return Ok(value);
                }
                tokio::time::sleep(every).await;
            },
        }
    }

    /// Starts the named job as a background task bound to this (ext, user, chat) and returns
    /// its id at once (Pattern C). The job's result is delivered to the chat when it finishes.
    pub async fn background_task<I: Serialize + ?Sized>(
        &self,
        job: &str,
        input: &I,
        options: BackgroundOptions,
    ) -> Result<TaskId, BackgroundError> {
        let input = serde_json::to_value(input)?;
        self.launcher.launch(job, input, options).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::testing::memory::MemoryKv;

    fn store() -> Store {
        Store {
            port: Arc::new(MemoryKv::default()),
            ext: "e".into(),
            user: "u".into(),
            lease: None,
        }
    }

    #[tokio::test]
    async fn store_round_trips_typed_values() {
        let store = store();
        store.set("last", &vec![1, 2]).await.unwrap();
        assert_eq!(
            store.get::<Vec<u8>>("last").await.unwrap(),
            Some(vec![1, 2])
        );
        assert!(matches!(
            store.get::<String>("last").await,
            Err(StoreError::Decode(_))
        ));
        store.delete("last").await.unwrap();
        assert_eq!(store.get::<Vec<u8>>("last").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_run_that_lost_its_lease_cannot_write_the_store() {
        // GIVEN a task another worker holds, and a run that still thinks it holds it
        use crate::ports::TaskStore;
        use crate::testing::fixture::{call_event, stack, task_id_of};
        let (stack, _) = stack();
        let task_id = task_id_of(&stack.intake(call_event("bg", "u1", Value::Null)).await);
        let now = stack.rt.now();
        let lease = crate::task::Lease {
            owner: "other".into(),
            until: now + chrono::Duration::seconds(60),
        };
        stack.tasks.claim(&task_id, &lease, now).await.unwrap();
        let run_lease = Arc::new(RunLease::new(crate::ports::LeaseHolder {
            task_id,
            owner: "mine".into(),
        }));
        let store = Store {
            port: Arc::new(MemoryKv::checking_leases_in(Arc::clone(&stack.tasks))),
            ext: "e".into(),
            user: "u".into(),
            lease: Some(Arc::clone(&run_lease)),
        };
        // WHEN it writes and deletes
        // THEN both are refused, and the run learns its lease is lost
        assert!(matches!(
            store.set("k", &1).await,
            Err(StoreError::LeaseLost)
        ));
        assert!(run_lease.is_lost());
        assert!(matches!(
            store.delete("k").await,
            Err(StoreError::LeaseLost)
        ));
        assert_eq!(store.get::<i32>("k").await.unwrap(), None);
    }

    #[test]
    fn progress_messages_are_cut_to_their_bound() {
        let short = "é".repeat(MAX_PROGRESS_MESSAGE_CHARS);
        assert_eq!(bounded(short.clone()), short);
        let long = bounded("é".repeat(MAX_PROGRESS_MESSAGE_CHARS * 1000));
        assert_eq!(long.chars().count(), MAX_PROGRESS_MESSAGE_CHARS);
        assert!(long.ends_with('…'));
        assert_eq!(bounded("Saving".into()), "Saving");
    }

    #[tokio::test]
    async fn empty_and_oversized_keys_are_refused() {
        let store = store();
        assert!(matches!(
            store.set("", &1).await,
            Err(StoreError::InvalidKey(0))
        ));
        let long = "k".repeat(MAX_STORE_KEY_BYTES + 1);
        assert!(matches!(
            store.get::<u8>(&long).await,
            Err(StoreError::InvalidKey(1025))
        ));
    }
}
