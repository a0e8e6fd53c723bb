//! Checkpointed steps: `ctx.step(name, async { … })` stores each step's output in the task's
//! partition the first time it runs, and a later invocation of the same task — after a
//! hand-off before the Lambda deadline, or after a crash — returns the stored output instead
//! of running the step again. So a task can outlive one Lambda invocation, and a crash costs
//! at most the step in flight.
//!
//! Steps are identified by their order: the n-th `ctx.step` of a run replays the n-th stored
//! step. The handler must therefore call its steps in the same order with the same names on
//! every run (deterministic control flow); a name that differs from the record is refused with
//! [`StepError::ReplayMismatch`] rather than mixing results.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::http::MAX_HTTP_TIMEOUT;
use crate::lease::RunLease;
use crate::ports::{PortError, TaskStore};
use crate::runtime::to_chrono;
use crate::wire::Unfit;

/// Room left for storing a step's output: the worker stops handing out new steps this long
/// before a step started then, running its whole budget, would reach the hard yield — so the
/// output write of a step that used its whole budget lands before the invocation ends.
pub(crate) const STEP_RECORD_SLACK: Duration = Duration::from_secs(5);

/// The largest step output, serialized: a DynamoDB item holds 400 KB, and the item also
/// carries its keys and metadata.
pub const MAX_STEP_OUTPUT_BYTES: usize = 300 * 1024;

/// A completed step as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step's position in the run, from 0.
    pub seq: u32,
    /// The name the handler gave the step; a replay must call the same name at this position.
    pub name: String,
    /// The step's output as JSON, returned instead of running the step again on replay.
    pub output: Value,
    /// When the step completed.
    pub at: DateTime<Utc>,
}

/// Why `ctx.step` did not return an output.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The run called a different step than the record holds at this position: the handler's
    /// control flow is not deterministic. The task fails rather than mix results.
    #[error(
        "step {seq} is {found:?} in this run but {recorded:?} in the record: steps must run in the same order on every replay"
    )]
    ReplayMismatch {
        /// The step's position in the run, from 0.
        seq: u32,
        /// The step name the record holds at that position.
        recorded: String,
        /// The step name this run called.
        found: String,
    },
    /// The output is larger than a step item can hold.
    #[error(
        "step {name:?} output is {size} bytes; the limit is {limit} bytes (store large data elsewhere and return a reference)"
    )]
    TooLarge {
        /// The step's name.
        name: String,
        /// The output's serialized size, in bytes.
        size: usize,
        /// The most a step output may take ([`MAX_STEP_OUTPUT_BYTES`]).
        limit: usize,
    },
    /// The output is valid JSON that the task table cannot store
    /// ([`crate::wire::check_storable`]).
    #[error("step {name:?} output {reason}")]
    Unstorable {
        /// The step's name.
        name: String,
        /// What the table cannot store.
        reason: String,
    },
    /// The step ran longer than the per-call cap; a step must fit in one invocation.
    #[error("step {name:?} ran longer than {after:?}")]
    TimedOut {
        /// The step's name.
        name: String,
        /// The step budget it ran past ([`crate::Settings::step_budget`]).
        after: Duration,
    },
    /// The output could not be serialized, or a stored output no longer fits the type.
    #[error("step {name:?} output: {source}")]
    Serde {
        /// The step's name.
        name: String,
        /// The serialization or deserialization failure.
        #[source]
        source: serde_json::Error,
    },
    /// Another worker took the task over (this run's lease lapsed): the step's output was
    /// not stored, and the run stops.
    #[error("step {name:?} was not stored: another worker took the task over")]
    LeaseLost {
        /// The step's name.
        name: String,
    },
    /// The task table failed.
    #[error("step {name:?} could not be stored: {source}")]
    Store {
        /// The step's name.
        name: String,
        /// Why the task table refused or failed the write.
        #[source]
        source: PortError,
    },
}

/// The steps of one task run: what is recorded, where this run is, and when it must hand the
/// task on to a fresh invocation.
pub(crate) struct StepLog {
    tasks: Arc<dyn TaskStore>,
    lease: Arc<RunLease>,
    recorded: Vec<StepRecord>,
    /// The first replay mismatch this run met: the worker fails the task for it, whatever
    /// the handler made of the error.
    mismatch: std::sync::Mutex<Option<String>>,
    next: AtomicU32,
    ran_here: AtomicU32,
    /// Before starting a new step after this moment, the run hands off.
    hand_off_after: Option<Instant>,
    budget: Duration,
    handing_off: AtomicBool,
    hand_off: Notify,
    /// When the run asked to wake, once it suspended itself (`ctx.sleep`, `ctx.poll`).
    wake_at: std::sync::Mutex<Option<DateTime<Utc>>>,
    suspend: Notify,
    clock: Arc<dyn crate::ports::Clock>,
}

/// A sleep shorter than this waits in place: a suspension costs an invocation and a few
/// writes, which a second of a small Lambda's time does not.
pub const SLEEP_IN_PLACE: Duration = Duration::from_secs(1);

/// The step name a `ctx.sleep` is recorded under.
pub(crate) const SLEEP_STEP: &str = "longrun.sleep";

/// What a `ctx.sleep` records: when it ends.
#[derive(Debug, Serialize, Deserialize)]
struct Slept {
    until: DateTime<Utc>,
}

/// One check of [`Ctx::poll`](crate::Ctx::poll): the awaited value, or not yet.
#[derive(Debug, Clone, PartialEq)]
pub enum Check<T> {
    /// The wait is over, with this value (stored as the poll's step output).
    Done(T),
    /// Not yet: check again after the poll's interval.
    Pending,
}

impl StepLog {
    pub(crate) fn new(
        tasks: Arc<dyn TaskStore>,
        clock: Arc<dyn crate::ports::Clock>,
        lease: Arc<RunLease>,
        mut recorded: Vec<StepRecord>,
        yield_at: Option<Instant>,
        budget: Duration,
    ) -> Self {
        recorded.sort_by_key(|s| s.seq);
        Self {
            tasks,
            lease,
            recorded,
            mismatch: std::sync::Mutex::new(None),
            next: AtomicU32::new(0),
            ran_here: AtomicU32::new(0),
            hand_off_after: yield_at
                .map(|y| y.checked_sub(budget + STEP_RECORD_SLACK).unwrap_or(y)),
            budget,
            handing_off: AtomicBool::new(false),
            hand_off: Notify::new(),
            wake_at: std::sync::Mutex::new(None),
            suspend: Notify::new(),
            clock,
        }
    }

    /// Resolves once the run decided to hand the task on.
    pub(crate) async fn handed_off(&self) {
        let notified = self.hand_off.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.handing_off.load(Ordering::SeqCst) {
            return;
        }
        notified.await;
    }

    /// Resolves, with the moment to wake, once the run suspended itself.
    pub(crate) async fn suspended(&self) -> DateTime<Utc> {
        loop {
            let notified = self.suspend.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(at) = *self.wake_at.lock().unwrap_or_else(|e| e.into_inner()) {
                return at;
            }
            notified.await;
        }
    }

    /// Waits until `until`: in place if that is near, else by suspending the run (the worker
    /// ends the invocation, and a later one replays the run to here). Never returns in the
    /// latter case: the worker drops the run.
    async fn wait_until(&self, until: DateTime<Utc>) {
        let left = (until - self.clock.now()).to_std().unwrap_or_default();
        if left < SLEEP_IN_PLACE {
            tokio::time::sleep(left).await;
            return;
        }
        tracing::info!(task_id = %self.lease.holder().task_id, %until, "suspending until");
        *self.wake_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(until);
        self.suspend.notify_waiters();
        std::future::pending::<()>().await;
    }

    /// `ctx.sleep` in a task: a step that records when the sleep ends, then waits for it.
    pub(crate) async fn sleep(&self, duration: Duration) -> Result<(), StepError> {
        if duration < SLEEP_IN_PLACE {
            // Decided by the duration alone, so a replay takes the same path.
            tokio::time::sleep(duration).await;
            return Ok(());
        }
        let seq = self.next.fetch_add(1, Ordering::SeqCst);
        let slept: Slept = match self.recorded_at(seq) {
            Some(record) => self.replay(record, SLEEP_STEP)?,
            None => {
                let until = self.clock.now() + to_chrono(duration);
                self.keep(seq, SLEEP_STEP, Slept { until })
                    .await
                    .map_err(|err| self.give_back(seq, err))?
            }
        };
        self.wait_until(slept.until).await;
        Ok(())
    }

    /// `ctx.poll` in a task: `check` until it is done, sleeping `every` between checks; the
    /// value is stored as the step `name`. A pending check stores nothing, so a resumed run
    /// checks again where it left off.
    pub(crate) async fn poll<T, F, Fut>(
        &self,
        name: &str,
        every: Duration,
        mut check: F,
    ) -> Result<T, StepError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut() -> Fut,
        Fut: Future<Output = Check<T>>,
    {
        let seq = self.next.fetch_add(1, Ordering::SeqCst);
        if let Some(record) = self.recorded_at(seq) {
            return self.replay(record, name);
        }
        loop {
            let Ok(checked) = tokio::time::timeout(self.budget, check()).await else {
                let timed_out = StepError::TimedOut {
                    name: name.to_owned(),
                    after: self.budget,
                };
                return Err(self.give_back(seq, timed_out));
            };
            match checked {
                Check::Done(output) => {
                    return self
                        .keep(seq, name, output)
                        .await
                        .map_err(|err| self.give_back(seq, err));
                }
                Check::Pending => self.wait_until(self.clock.now() + to_chrono(every)).await,
            }
        }
    }

    pub(crate) async fn step<T, F>(&self, name: &str, body: F) -> Result<T, StepError>
    where
        T: Serialize + DeserializeOwned,
        F: Future<Output = T>,
    {
        let seq = self.next.fetch_add(1, Ordering::SeqCst);
        if let Some(record) = self.recorded_at(seq) {
            return self.replay(record, name);
        }
        // A new step. If it might not finish before the invocation ends, stop here and let
        // a fresh invocation replay what is done — but only once this one did some work.
        if let Some(after) = self.hand_off_after
            && Instant::now() >= after
            && self.ran_here.load(Ordering::SeqCst) > 0
        {
            tracing::info!(task_id = %self.lease.holder().task_id, step = name, seq, "handing off before the Lambda deadline");
            self.handing_off.store(true, Ordering::SeqCst);
            self.hand_off.notify_waiters();
            std::future::pending::<()>().await;
        }
        match self.run_new(seq, name, body).await {
            Ok(output) => {
                self.ran_here.fetch_add(1, Ordering::SeqCst);
                Ok(output)
            }
            Err(err) => Err(self.give_back(seq, err)),
        }
    }

    /// A step, poll or sleep at `seq` that failed leaves nothing in the record, so it gives
    /// its position back: a handler that tries it again gets the same position, as it will
    /// on replay. (Unless another one started meanwhile — steps run concurrently keep the
    /// order they were started in.) Returns `err`.
    fn give_back(&self, seq: u32, err: StepError) -> StepError {
        let _ = self
            .next
            .compare_exchange(seq + 1, seq, Ordering::SeqCst, Ordering::SeqCst);
        err
    }

    /// Runs a step that is not in the record yet, checks its output and stores it.
    async fn run_new<T, F>(&self, seq: u32, name: &str, body: F) -> Result<T, StepError>
    where
        T: Serialize + DeserializeOwned,
        F: Future<Output = T>,
    {
        let output =
            tokio::time::timeout(self.budget, body)
                .await
                .map_err(|_| StepError::TimedOut {
                    name: name.to_owned(),
                    after: self.budget,
                })?;
        self.keep(seq, name, output).await
    }

    /// The record at position `seq`, if the run already passed it.
    fn recorded_at(&self, seq: u32) -> Option<&StepRecord> {
        self.recorded.iter().find(|r| r.seq == seq)
    }

    /// Checks and stores step `seq`'s output, and returns the output the run goes on with.
    async fn keep<T>(&self, seq: u32, name: &str, output: T) -> Result<T, StepError>
    where
        T: Serialize + DeserializeOwned,
    {
        let value = self.checked(name, &output)?;
        let stored = self.store(seq, name, value.clone()).await?;
        if stored.output == value {
            Ok(output)
        } else {
            // The table already held this position (written by a worker this one took over
            // from, before it did): that output is the one every replay will see.
            self.replay(&stored, name)
        }
    }

    /// `output` as the JSON a step record can hold.
    fn checked<T: Serialize>(&self, name: &str, output: &T) -> Result<Value, StepError> {
        let value = serde_json::to_value(output).map_err(|source| StepError::Serde {
            name: name.to_owned(),
            source,
        })?;
        match crate::wire::fits(&value, MAX_STEP_OUTPUT_BYTES) {
            Ok(()) => Ok(value),
            Err(Unfit::TooLarge { size }) => Err(StepError::TooLarge {
                name: name.to_owned(),
                size,
                limit: MAX_STEP_OUTPUT_BYTES,
            }),
            Err(Unfit::Unstorable(reason)) => Err(StepError::Unstorable {
                name: name.to_owned(),
                reason,
            }),
        }
    }

    /// Stores step `seq`'s output while this run holds the lease; returns the record the
    /// table holds at that position (an earlier worker's, if it got there first).
    async fn store(&self, seq: u32, name: &str, output: Value) -> Result<StepRecord, StepError> {
        let record = StepRecord {
            seq,
            name: name.to_owned(),
            output,
            at: self.clock.now(),
        };
        match self.tasks.record_step(self.lease.holder(), &record).await {
            Ok(stored) => Ok(stored),
            Err(PortError::Conflict(_)) => {
                self.lease.mark_lost();
                Err(StepError::LeaseLost {
                    name: name.to_owned(),
                })
            }
            Err(source) => Err(StepError::Store {
                name: name.to_owned(),
                source,
            }),
        }
    }

    /// The stored output of `record` for the step `name` called at its position.
    fn replay<T: DeserializeOwned>(&self, record: &StepRecord, name: &str) -> Result<T, StepError> {
        if record.name != name {
            let err = StepError::ReplayMismatch {
                seq: record.seq,
                recorded: record.name.clone(),
                found: name.to_owned(),
            };
            self.mismatch
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert_with(|| err.to_string());
            return Err(err);
        }
        serde_json::from_value(record.output.clone()).map_err(|source| StepError::Serde {
            name: name.to_owned(),
            source,
        })
    }

    /// The first replay mismatch this run met, if any.
    pub(crate) fn mismatch(&self) -> Option<String> {
        self.mismatch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The budget a step gets by default: the per-call HTTP cap, so one AI call fits.
pub(crate) const DEFAULT_STEP_BUDGET: Duration = MAX_HTTP_TIMEOUT;

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering as AtomicOrdering;

    use serde_json::json;

    use super::*;
    use crate::ActionResult;
    use crate::ports::TaskStore;
    use crate::task::{AuditKind, TaskState};
    use crate::testing::MemoryStack;
    use crate::testing::fixture::*;
    use crate::worker::{QueueRecord, handle_batch};
    use crate::{Settings, TaskId};

    /// Settings for short invocations: a step (10 s here) gets a budget of 15 s, and a new
    /// step starts only while 20 s (its budget and the record slack) are left before the yield
    /// a second before the deadline — so an invocation of 45 s runs three steps and hands on.
    fn short_lambda() -> Settings {
        Settings {
            step_budget: Duration::from_secs(15),
            deadline_margin: Duration::from_secs(1),
            ..Settings::default()
        }
    }

    /// One worker invocation over the waiting work messages, with `seconds` to live, and
    /// delivery afterwards. Returns how many messages it took.
    async fn invoke(stack: &MemoryStack, seconds: u64) -> usize {
        let batch = stack.work.take(10);
        let records: Vec<QueueRecord> = batch
            .iter()
            .map(|m| QueueRecord::new("m", serde_json::to_string(m).unwrap()))
            .collect();
        let n = records.len();
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let failed = handle_batch(&stack.rt, records, Some(deadline)).await;
        assert!(failed.is_empty());
        while stack.deliver_once().await > 0 {}
        n
    }

    async fn steps_of(stack: &MemoryStack, id: &TaskId) -> Vec<String> {
        stack
            .tasks
            .steps(id)
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_spans_three_invocations_and_calls_each_step_once() {
        // GIVEN nine 10-second steps and invocations that live 45 s
        let (stack, runs) = stack_with(short_lambda());
        let id = task_id_of(
            &stack
                .intake(call_event("chunks", "u1", json!({"n": 9})))
                .await,
        );
        // WHEN workers are invoked until the queue is empty
        let mut invocations = 0;
        while invoke(&stack, 45).await > 0 {
            invocations += 1;
            assert!(invocations < 10, "no progress");
        }
        // THEN it took three invocations, every step body ran exactly once
        assert_eq!(invocations, 3);
        for i in 0..9 {
            assert_eq!(runs.step_runs(&format!("chunk-{i}")), 1, "chunk-{i}");
        }
        // AND one result, progress monotonic across invocations, attempts not used up
        let task = task(&stack, &id).await;
        assert_eq!(task.state, TaskState::Succeeded);
        assert_eq!(task.attempt, 1);
        let chunks = task.result.unwrap().data.unwrap()["chunks"]
            .as_array()
            .unwrap()
            .len();
        assert_eq!(chunks, 9);
        let pcts = progress_in(&stack, "chat-u1");
        assert!(pcts.windows(2).all(|w| w[0] <= w[1]), "{pcts:?}");
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
        assert_eq!(steps_of(&stack, &id).await.len(), 9);
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_killed_in_step_two_reruns_only_step_two() {
        // GIVEN a task whose worker dies 25 s in, in the middle of its third step (chunk-2)
        let (stack, runs) = stack_with(Settings::default());
        let id = task_id_of(
            &stack
                .intake(call_event("chunks", "u1", json!({"n": 4})))
                .await,
        );
        let crashed = tokio::time::timeout(Duration::from_secs(25), stack.work_once()).await;
        assert!(
            crashed.is_err(),
            "the worker should still have been running"
        );
        assert_eq!(steps_of(&stack, &id).await, vec!["chunk-0", "chunk-1"]);
        // WHEN its lease lapses and the sweeper revives it
        tokio::time::sleep(stack.rt.settings.lease + Duration::from_secs(1)).await;
        assert_eq!(crate::sweeper::sweep(&stack.rt).await.unwrap().requeued, 1);
        stack.drain(20).await;
        // THEN chunk-0 and chunk-1 were not run again; chunk-2 ran twice (once cut short)
        assert_eq!(runs.step_runs("chunk-0"), 1);
        assert_eq!(runs.step_runs("chunk-1"), 1);
        assert_eq!(runs.step_runs("chunk-2"), 2);
        assert_eq!(runs.step_runs("chunk-3"), 1);
        assert_eq!(task(&stack, &id).await.state, TaskState::Succeeded);
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_between_invocations_stops_with_one_cancelled_message() {
        let (stack, runs) = stack_with(short_lambda());
        let id = task_id_of(
            &stack
                .intake(call_event("chunks", "u1", json!({"n": 9})))
                .await,
        );
        invoke(&stack, 45).await;
        assert_eq!(task(&stack, &id).await.state, TaskState::Queued);
        // WHEN the user cancels while the task waits for its next invocation
        let status = stack
            .intake(json!({"action":"cancel","ext":EXT,"user":"u1","task_id":id}))
            .await
            .status;
        assert_eq!(status, 200);
        while invoke(&stack, 45).await > 0 {}
        // THEN no further step ran and the chat got one "cancelled" result, carrying the
        // chunks the first invocation recorded (`ctx.partial` outlives the invocation)
        assert_eq!(runs.step_runs("chunk-3"), 0);
        assert_eq!(task(&stack, &id).await.state, TaskState::Cancelled);
        let mut cancelled = ActionResult::error("'chunks' was cancelled.", false);
        cancelled.data = Some(json!({"partial": {"chunks": [
            "refined 0 (run 1)", "refined 1 (run 1)", "refined 2 (run 1)"
        ]}}));
        assert_eq!(results_in(&stack, "chat-u1"), vec![cancelled]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_that_may_use_its_whole_budget_is_not_started_too_close_to_the_yield() {
        // GIVEN invocations that yield at 39 s, a 15 s step budget and a table whose step
        // writes take 500 ms; the third step starts at 23.9 s and takes 14.99 s
        let (stack, runs) = stack_with(short_lambda());
        stack.tasks.delay_step_writes(Duration::from_millis(500));
        let params = json!({"steps_ms": [11_450, 11_450, 14_990, 1_000]});
        let id = task_id_of(&stack.intake(call_event("chunks", "u1", params)).await);
        // WHEN workers are invoked until the queue is empty
        while invoke(&stack, 40).await > 0 {}
        // THEN that step was left to the next invocation rather than cut off while its
        // output was being written: every step body ran once
        for i in 0..4 {
            assert_eq!(runs.step_runs(&format!("chunk-{i}")), 1, "chunk-{i}");
        }
        assert_eq!(task(&stack, &id).await.state, TaskState::Succeeded);
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_retried_after_it_failed_keeps_its_position_on_replay() {
        // GIVEN a handler whose first step times out once and is tried again, then records
        // two more steps, and a worker that dies in the last one
        let (stack, runs) = stack_with(Settings {
            step_budget: Duration::from_secs(30),
            ..Settings::default()
        });
        let id = task_id_of(
            &stack
                .intake(call_event("retry_step", "u1", json!({})))
                .await,
        );
        let crashed = tokio::time::timeout(Duration::from_secs(40), stack.work_once()).await;
        assert!(
            crashed.is_err(),
            "the worker should still have been running"
        );
        assert_eq!(steps_of(&stack, &id).await, vec!["flaky", "after"]);
        // WHEN the sweeper revives the task and a fresh worker replays it
        tokio::time::sleep(stack.rt.settings.lease + Duration::from_secs(1)).await;
        assert_eq!(crate::sweeper::sweep(&stack.rt).await.unwrap().requeued, 1);
        stack.drain(20).await;
        // THEN the retried step replays from its record (its body ran twice in all: the
        // timeout and the retry) and the task succeeds
        assert_eq!(runs.flaky_runs.load(AtomicOrdering::SeqCst), 2);
        let ended = task(&stack, &id).await;
        assert_eq!(ended.state, TaskState::Succeeded, "{:?}", ended.result);
        assert_eq!(ended.result.unwrap().data.unwrap()["sum"], 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_poll_retried_after_it_failed_keeps_its_position() {
        // GIVEN a handler whose poll's first check runs past the step budget, and which polls
        // again, then takes a step
        let (stack, runs) = stack_with(Settings {
            step_budget: Duration::from_secs(30),
            ..Settings::default()
        });
        let id = task_id_of(
            &stack
                .intake(call_event("retry_poll", "u1", json!({})))
                .await,
        );
        // WHEN it runs
        stack.drain(20).await;
        // THEN the retried poll took the failed one's position, as a retried step does, so a
        // replay meets each record where the run put it
        assert_eq!(runs.flaky_runs.load(AtomicOrdering::SeqCst), 2);
        let positions: Vec<(u32, String)> = stack
            .tasks
            .steps(&id)
            .await
            .unwrap()
            .into_iter()
            .map(|s| (s.seq, s.name))
            .collect();
        assert_eq!(
            positions,
            vec![(0, "flaky".to_owned()), (1, "after".to_owned())]
        );
        assert_eq!(task(&stack, &id).await.state, TaskState::Succeeded);
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_that_lost_its_lease_stores_no_step_and_stops() {
        // GIVEN worker A, whose heartbeats cannot reach the table, 61 s into eight 10 s
        // steps: its lease lapsed in the middle of chunk-6, and the sweeper requeued the task
        let (stack, runs) = stack();
        let id = task_id_of(
            &stack
                .intake(call_event("chunks", "u1", json!({"n": 8})))
                .await,
        );
        stack.tasks.fail_next_beats(1_000);
        let a = tokio::spawn({
            let stack = stack.clone();
            async move { stack.work_once().await }
        });
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(crate::sweeper::sweep(&stack.rt).await.unwrap().requeued, 1);
        // WHEN worker B takes it over, and A finishes its chunk-6 at 70 s
        let b = tokio::spawn({
            let stack = stack.clone();
            async move { stack.work_once().await }
        });
        tokio::time::sleep(Duration::from_secs(14)).await;
        stack.tasks.fail_next_beats(0);
        a.await.unwrap();
        b.await.unwrap();
        stack.drain(20).await;
        // THEN A's chunk-6 was not stored: the table holds B's, and B's result is built on
        // the outputs the table holds
        assert_eq!(runs.step_runs("chunk-6"), 2);
        let stored = stack.tasks.steps(&id).await.unwrap();
        assert_eq!(stored[6].output, json!("refined 6 (run 2)"));
        let ended = task(&stack, &id).await;
        assert_eq!((ended.state, ended.attempt), (TaskState::Succeeded, 2));
        let chunks = ended.result.unwrap().data.unwrap()["chunks"].clone();
        let outputs: Vec<_> = stored.iter().map(|s| s.output.clone()).collect();
        assert_eq!(chunks, json!(outputs));
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_step_sequence_on_replay_fails_clearly() {
        // GIVEN a task handed on after its first steps
        let (stack, runs) = stack_with(Settings {
            step_budget: Duration::from_secs(15),
            deadline_margin: Duration::from_secs(1),
            ..Settings::default()
        });
        let id = task_id_of(&stack.intake(call_event("unstable", "u1", json!({}))).await);
        invoke(&stack, 33).await;
        assert_eq!(steps_of(&stack, &id).await, vec!["first", "second"]);
        // WHEN the handler's control flow changes before the replay
        runs.flipped.store(true, AtomicOrdering::SeqCst);
        while invoke(&stack, 33).await > 0 {}
        // THEN the task fails with a critical audit item and an error in the chat
        assert_eq!(task(&stack, &id).await.state, TaskState::Failed);
        let trail = stack.tasks.audit_trail(&id).await.unwrap();
        let critical = trail
            .iter()
            .find(|a| a.kind == AuditKind::Critical)
            .expect("critical audit");
        assert_eq!(critical.audit_id, "critical#replay_mismatch");
        assert!(critical.detail.contains("\"other\""), "{}", critical.detail);
        let results = results_in(&stack, "chat-u1");
        assert_eq!(results.len(), 1);
        assert!(!results[0].ok);
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_output_too_large_names_the_limit() {
        let (stack, _) = stack();
        let id = task_id_of(&stack.intake(call_event("big_step", "u1", json!({}))).await);
        stack.drain(20).await;
        assert_eq!(task(&stack, &id).await.state, TaskState::Failed);
        let trail = stack.tasks.audit_trail(&id).await.unwrap();
        let critical = trail
            .iter()
            .find(|a| a.kind == AuditKind::Critical)
            .expect("critical audit");
        assert!(
            critical.detail.contains("the limit is 307200 bytes"),
            "{}",
            critical.detail
        );
        assert!(stack.tasks.steps(&id).await.unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn outside_a_task_a_step_just_runs() {
        let (stack, _) = stack();
        let ctx = stack.rt.ctx(
            crate::ctx::Caller {
                ext: EXT.into(),
                user: "u".into(),
                chat: "c".into(),
            },
            None,
            None,
            None,
        );
        assert_eq!(ctx.step("s", async { 41 + 1 }).await.unwrap(), 42);
        assert_eq!(ctx.step("s", async { 7 }).await.unwrap(), 7);
    }

    /// The delays of the waiting work messages, in whole seconds.
    fn delays(stack: &MemoryStack) -> Vec<u64> {
        stack
            .work
            .pending_delays()
            .into_iter()
            .map(|(d, _)| d.as_secs_f64().round() as u64)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_sleep_ends_the_invocation_and_the_task_resumes_after_it() {
        // GIVEN a task that runs a step, then sleeps 10 minutes
        let (stack, runs) = stack();
        let params = json!({"delay_ms": 600_000});
        let id = task_id_of(&stack.intake(call_event("sleeper", "u1", params)).await);
        // WHEN a worker takes it
        let started = Instant::now();
        stack.work_once().await;
        // THEN the invocation ends at once, the task sleeping with its wake time, its
        // progress written and its message on the queue for when it wakes
        assert!(started.elapsed() < SLEEP_IN_PLACE);
        let sleeping = task(&stack, &id).await;
        assert_eq!(sleeping.state, TaskState::Sleeping);
        let wake_at = sleeping.wake_at.unwrap();
        assert_eq!((wake_at - stack.rt.now()).num_seconds(), 600);
        assert_eq!(sleeping.progress.message, "Started");
        assert_eq!(sleeping.attempt, 0, "a sleep is not a failed attempt");
        assert_eq!(delays(&stack), vec![600]);
        assert_eq!(steps_of(&stack, &id).await, vec!["start", SLEEP_STEP]);
        // AND the sweeper leaves it alone while it sleeps
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert_eq!(
            crate::sweeper::sweep(&stack.rt).await.unwrap(),
            crate::sweeper::SweepReport::default()
        );
        // WHEN it wakes
        stack.drain(20).await;
        // THEN it replays to the sleep, goes on and ends with one result
        let done = task(&stack, &id).await;
        assert_eq!(done.state, TaskState::Succeeded);
        assert!(done.finished_at.unwrap() >= wake_at);
        assert_eq!(runs.started.load(AtomicOrdering::SeqCst), 2);
        assert_eq!(
            steps_of(&stack, &id).await,
            vec!["start", SLEEP_STEP, "finish"]
        );
        assert_eq!(
            results_in(&stack, "chat-u1"),
            vec![ActionResult::success(
                "slept",
                json!({"job": "job-1", "done": 2})
            )]
        );
        // AND no reclaim or resume was reported: the task never lost a worker
        let audit = audit_kinds(&stack, &id).await;
        assert_eq!(count(&audit, AuditKind::Reclaimed), 0, "{audit:?}");
        assert_eq!(count(&audit, AuditKind::Critical), 0, "{audit:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_sleep_longer_than_the_queue_delay_is_chained() {
        // GIVEN a task that sleeps 25 minutes (the queue delays 15 at most)
        let (stack, runs) = stack();
        let params = json!({"delay_ms": 1_500_000});
        let id = task_id_of(&stack.intake(call_event("sleeper", "u1", params)).await);
        stack.work_once().await;
        assert_eq!(delays(&stack), vec![900]);
        // WHEN the message arrives after 15 minutes
        tokio::time::sleep(Duration::from_secs(900)).await;
        stack.work_once().await;
        // THEN it is sent on for the 10 minutes left, the handler not run
        assert_eq!(delays(&stack), vec![600]);
        assert_eq!(runs.started.load(AtomicOrdering::SeqCst), 1);
        assert_eq!(task(&stack, &id).await.state, TaskState::Sleeping);
        // AND after them the task finishes
        stack.drain(20).await;
        assert_eq!(task(&stack, &id).await.state, TaskState::Succeeded);
        assert_eq!(runs.started.load(AtomicOrdering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_during_a_sleep_ends_the_task_at_once_after_its_stop_hook() {
        // GIVEN a task asleep for 10 minutes
        let (stack, runs) = stack();
        let params = json!({"delay_ms": 600_000});
        let id = task_id_of(&stack.intake(call_event("sleeper", "u1", params)).await);
        stack.work_once().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        // WHEN the user cancels
        let cancelled_at = Instant::now();
        let response = stack
            .intake(json!({"action": "cancel", "ext": EXT, "user": "u1", "task_id": id}))
            .await;
        assert_eq!(response.status, 200, "{response:?}");
        while stack.work_once().await > 0 {}
        while stack.deliver_once().await > 0 {}
        // THEN it ends now, not at the end of the sleep, with one cancelled result that
        // hands over its partial result, after the stop hook saw the started job
        assert!(cancelled_at.elapsed() < SLEEP_IN_PLACE);
        let ended = task(&stack, &id).await;
        assert_eq!(ended.state, TaskState::Cancelled);
        let results = results_in(&stack, "chat-u1");
        assert_eq!(results.len(), 1);
        assert_eq!(results[0].data, Some(json!({"partial": {"job": "job-1"}})));
        assert_eq!(
            *runs.stops.lock().unwrap(),
            vec![(crate::StopReason::Cancelled, Some("job-1".to_owned()))]
        );
        assert_eq!(runs.started.load(AtomicOrdering::SeqCst), 1);
        // AND the wake message, when it comes, changes nothing
        stack.drain(20).await;
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
        assert_eq!(runs.stops.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sleep_past_the_cap_ends_the_task_timed_out_at_the_cap() {
        // GIVEN a task with the 1800 s cap that sleeps an hour
        let (stack, runs) = stack();
        let params = json!({"delay_ms": 3_600_000});
        let id = task_id_of(&stack.intake(call_event("sleeper", "u1", params)).await);
        let started = Instant::now();
        // WHEN it runs
        stack.drain(20).await;
        // THEN it wakes at its cap and ends timed out, its stop hook told so
        let ended = task(&stack, &id).await;
        assert_eq!(ended.state, TaskState::TimedOut);
        assert_eq!(started.elapsed().as_secs(), 1800);
        assert_eq!(
            *runs.stops.lock().unwrap(),
            vec![(crate::StopReason::TimedOut, Some("job-1".to_owned()))]
        );
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sleeping_task_whose_wake_message_was_lost_is_sent_again_by_the_sweeper() {
        // GIVEN a sleeping task whose delayed work message is lost
        let (stack, _) = stack();
        let params = json!({"delay_ms": 600_000});
        let id = task_id_of(&stack.intake(call_event("sleeper", "u1", params)).await);
        stack.work_once().await;
        assert_eq!(stack.work.purge(), 1);
        // WHEN the sweeper runs after its wake time and the queue grace
        tokio::time::sleep(Duration::from_secs(600) + Settings::default().queue_grace).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let report = crate::sweeper::sweep(&stack.rt).await.unwrap();
        // THEN the task is sent again and finishes
        assert_eq!(report.requeued, 1);
        stack.drain(20).await;
        assert_eq!(task(&stack, &id).await.state, TaskState::Succeeded);
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_poll_checks_in_short_invocations_and_stores_only_its_answer() {
        // GIVEN a task that polls a job every 20 s until the fourth check finds it done
        let (stack, runs) = stack();
        let params = json!({"n": 4, "delay_ms": 20_000});
        let id = task_id_of(&stack.intake(call_event("poller", "u1", params)).await);
        let writes_before = stack.tasks.writes();
        // WHEN it runs
        stack.drain(20).await;
        // THEN each check was one invocation, the job started once, and only the start and
        // the answer are stored as steps
        let done = task(&stack, &id).await;
        assert_eq!(done.state, TaskState::Succeeded);
        assert_eq!(runs.checks.load(AtomicOrdering::SeqCst), 4);
        assert_eq!(runs.started.load(AtomicOrdering::SeqCst), 4);
        assert_eq!(steps_of(&stack, &id).await, vec!["start", "wait"]);
        assert_eq!(
            results_in(&stack, "chat-u1"),
            vec![ActionResult::success(
                "polled",
                json!({"job": "job-2", "checks": 4})
            )]
        );
        // AND a check that reports the same progress writes none: one progress message
        let progress = progress_in(&stack, "chat-u1");
        assert_eq!(progress, vec![20], "{progress:?}");
        // AND each further check costs two writes, a claim and a suspension: polling eight
        // times writes eight more than polling four times
        let writes = stack.tasks.writes() - writes_before;
        let (longer, _) = crate::testing::fixture::stack();
        let params = json!({"n": 8, "delay_ms": 20_000});
        longer.intake(call_event("poller", "u1", params)).await;
        let longer_before = longer.tasks.writes();
        longer.drain(20).await;
        assert_eq!(longer.tasks.writes() - longer_before, writes + 4 * 2);
    }

    /// The task's first worker claims it and dies; the sweeper requeues it after its lease.
    async fn die_once(stack: &MemoryStack, id: &TaskId) {
        stack.work.take(10);
        let now = stack.rt.now();
        let dead = crate::task::Lease {
            owner: "dead-process/claim".into(),
            until: now + chrono::Duration::seconds(60),
        };
        stack.tasks.claim(id, &dead, now).await.unwrap();
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(crate::sweeper::sweep(&stack.rt).await.unwrap().requeued, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_resumed_once_is_not_announced_as_resumed_again_at_each_wake() {
        // GIVEN a sleeping task whose first worker died before it slept
        let (stack, _) = stack();
        let params = json!({"delay_ms": 60_000});
        let id = task_id_of(&stack.intake(call_event("sleeper", "u1", params)).await);
        die_once(&stack, &id).await;
        // WHEN it runs and sleeps: the chat is told it resumed
        stack.work_once().await;
        assert_eq!(task(&stack, &id).await.state, TaskState::Sleeping);
        while stack.deliver_once().await > 0 {}
        // AND it wakes and runs to its end
        tokio::time::sleep(Duration::from_secs(60)).await;
        stack.work_once().await;
        // THEN the wake sent no second notice, only the result
        assert_eq!(task(&stack, &id).await.state, TaskState::Succeeded);
        let sent = stack.delivery.pending();
        assert!(
            sent.iter()
                .all(|m| !matches!(m, crate::wire::DeliveryMessage::Notice { .. })),
            "{sent:?}"
        );
        stack.drain(20).await;
        let resumed: Vec<String> = stack
            .chat
            .posted()
            .into_iter()
            .map(|p| p.idempotency_key)
            .filter(|k| k.contains(":notice:resumed:"))
            .collect();
        assert_eq!(resumed, vec![format!("{id}:notice:resumed:2")]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_resumed_once_is_not_announced_as_resumed_again_at_each_hand_off() {
        // GIVEN a nine-step task whose first worker died, on invocations of 45 s (three steps)
        let (stack, _) = stack_with(short_lambda());
        let id = task_id_of(
            &stack
                .intake(call_event("chunks", "u1", json!({"n": 9})))
                .await,
        );
        die_once(&stack, &id).await;
        // WHEN it runs to its end over three invocations, handing on twice
        let mut notices = 0;
        loop {
            let batch = stack.work.take(10);
            if batch.is_empty() {
                break;
            }
            let records: Vec<QueueRecord> = batch
                .iter()
                .map(|m| QueueRecord::new("m", serde_json::to_string(m).unwrap()))
                .collect();
            let deadline = Instant::now() + Duration::from_secs(45);
            assert!(
                handle_batch(&stack.rt, records, Some(deadline))
                    .await
                    .is_empty()
            );
            notices += stack
                .delivery
                .pending()
                .iter()
                .filter(|m| matches!(m, crate::wire::DeliveryMessage::Notice { .. }))
                .count();
            while stack.deliver_once().await > 0 {}
        }
        // THEN the chat was told once that it resumed
        assert_eq!(task(&stack, &id).await.state, TaskState::Succeeded);
        assert_eq!(notices, 1);
    }
}
