//! In-memory adapters for every port, with the same conditional-write semantics as the
//! DynamoDB and SQS adapters: for unit tests of the pipeline and for tools that need no AWS.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;
use tokio::time::Instant;

use crate::ports::{
    Beat, ChatApi, ChatOutcome, Claim, Created, DeliveryQueue, Finish, FinishGuard, KvStore,
    LeaseHolder, MAX_QUEUE_DELAY, Peek, PortError, PortResult, RequestKey, Requeue, Secret,
    SecretStore, TaskStore, UsageStore, WorkQueue,
};
use crate::step::StepRecord;
use crate::task::{AuditItem, AuditKind, Lease, Progress, Task, TaskId, TaskState};
use crate::wire::{ChatMessage, DeliveryMessage, WorkMessage};

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving it.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct Tables {
    fail_writes: u32,
    tasks: HashMap<TaskId, Task>,
    requests: HashMap<RequestKey, TaskId>,
    audit: BTreeMap<TaskId, Vec<AuditItem>>,
    steps: BTreeMap<TaskId, BTreeMap<u32, StepRecord>>,
    writes: u64,
    reads: u64,
    step_write_delay: std::time::Duration,
    fail_beats: u32,
    /// Each (ext, user)'s active tasks, as the limit counts them.
    active: HashMap<(String, String), std::collections::BTreeSet<TaskId>>,
    /// Records of refused tasks: readable by id, in no user's list.
    unlisted: HashSet<TaskId>,
}

/// The task table in memory.
#[derive(Default)]
pub struct MemoryTaskStore {
    tables: Mutex<Tables>,
}

impl MemoryTaskStore {
    /// Every task, in no particular order.
    pub fn all(&self) -> Vec<Task> {
        lock(&self.tables).tasks.values().cloned().collect()
    }

    /// How many writes (conditional or not) the store accepted: what DynamoDB would bill.
    pub fn writes(&self) -> u64 {
        lock(&self.tables).writes
    }

    /// How many heartbeat reads ([`TaskStore::peek`]) the store answered.
    pub fn peeks(&self) -> u64 {
        lock(&self.tables).reads
    }

    /// Makes the next `n` task creations fail with a transient error.
    pub fn fail_next_writes(&self, n: u32) {
        lock(&self.tables).fail_writes = n;
    }

    /// Makes the next `n` heartbeats (reads and writes) and progress writes fail with a
    /// transient error (a worker that cannot reach the table, so its lease lapses).
    pub fn fail_next_beats(&self, n: u32) {
        lock(&self.tables).fail_beats = n;
    }

    /// How many of the heartbeat failures [`MemoryTaskStore::fail_next_beats`] asked for are
    /// still to come.
    pub fn beat_failures_left(&self) -> u32 {
        lock(&self.tables).fail_beats
    }

    /// Counts `task_id` among the active tasks of `(ext, user)` without any record, as a
    /// finish whose release was lost leaves it.
    pub fn count_active(&self, ext: &str, user: &str, task_id: &TaskId) {
        lock(&self.tables)
            .active
            .entry((ext.to_owned(), user.to_owned()))
            .or_default()
            .insert(task_id.clone());
    }

    /// Makes every step write take `delay` (on tokio's clock) before it lands, as a slow
    /// table would.
    pub fn delay_step_writes(&self, delay: std::time::Duration) {
        lock(&self.tables).step_write_delay = delay;
    }

    /// Every audit item of every task.
    pub fn all_audit(&self) -> Vec<AuditItem> {
        lock(&self.tables)
            .audit
            .values()
            .flatten()
            .cloned()
            .collect()
    }
}

fn conflict(task_id: &TaskId, what: &str) -> PortError {
    PortError::Conflict(format!("task {task_id}: {what}"))
}

/// Whether `holder` holds its task's lease: the task is running under that owner.
fn holds_lease(tasks: &HashMap<TaskId, Task>, holder: &LeaseHolder) -> bool {
    tasks
        .get(&holder.task_id)
        .is_some_and(|task| runs_under(task, &holder.owner))
}

/// Whether `task` is running under the lease owner `owner`.
fn runs_under(task: &Task, owner: &str) -> bool {
    task.state == TaskState::Running && task.lease.as_ref().is_some_and(|l| l.owner == owner)
}

fn lease_lapsed(task: &Task, now: DateTime<Utc>) -> bool {
    task.lease.as_ref().is_none_or(|l| l.until < now)
}

#[async_trait]
impl TaskStore for MemoryTaskStore {
    async fn create(
        &self,
        task: &Task,
        request: Option<&RequestKey>,
        limit: Option<u32>,
    ) -> PortResult<Created> {
        let mut guard = lock(&self.tables);
        let t = &mut *guard;
        if t.fail_writes > 0 {
            t.fail_writes -= 1;
            return Err(PortError::Transient("injected write failure".into()));
        }
        if let Some(request) = request
            && let Some(existing) = t.requests.get(request)
            && *existing != task.task_id
        {
            return Ok(Created::Duplicate(existing.clone()));
        }
        let owner = (task.ext.clone(), task.user.clone());
        let active = t.active.entry(owner).or_default();
        let exists = t.tasks.contains_key(&task.task_id);
        if let Some(limit) = limit
            && !exists
            && !active.contains(&task.task_id)
            && active.len() >= limit as usize
        {
            return Ok(Created::AtLimit(active.iter().cloned().collect()));
        }
        if !exists {
            active.insert(task.task_id.clone());
            t.tasks.insert(task.task_id.clone(), task.clone());
            t.writes += 1;
            let created = AuditItem::new(task, "created", AuditKind::Created, task.created_at, "");
            let trail = t.audit.entry(task.task_id.clone()).or_default();
            if !trail.iter().any(|a| a.audit_id == created.audit_id) {
                trail.push(created);
                t.writes += 1;
            }
        }
        if let Some(request) = request {
            t.requests.insert(request.clone(), task.task_id.clone());
        }
        Ok(Created::New)
    }

    async fn refuse(
        &self,
        task: &Task,
        result: &crate::ActionResult,
        at: DateTime<Utc>,
    ) -> PortResult<()> {
        let mut t = lock(&self.tables);
        if !t.tasks.contains_key(&task.task_id) {
            let refused = Task {
                state: TaskState::Failed,
                result: Some(result.clone()),
                finished_at: Some(at),
                delivered_at: Some(at),
                lease: None,
                ..task.clone()
            };
            t.tasks.insert(task.task_id.clone(), refused);
            t.unlisted.insert(task.task_id.clone());
            t.writes += 1;
        }
        Ok(())
    }

    async fn release(&self, ext: &str, user: &str, task_id: &TaskId) -> PortResult<()> {
        let mut t = lock(&self.tables);
        if let Some(active) = t.active.get_mut(&(ext.to_owned(), user.to_owned())) {
            active.remove(task_id);
        }
        t.writes += 1;
        Ok(())
    }

    async fn get(&self, task_id: &TaskId) -> PortResult<Option<Task>> {
        Ok(lock(&self.tables).tasks.get(task_id).cloned())
    }

    async fn find_request(&self, request: &RequestKey) -> PortResult<Option<TaskId>> {
        Ok(lock(&self.tables).requests.get(request).cloned())
    }

    async fn claim(
        &self,
        task_id: &TaskId,
        lease: &Lease,
        now: DateTime<Utc>,
    ) -> PortResult<Claim> {
        let mut t = lock(&self.tables);
        let Some(task) = t.tasks.get_mut(task_id) else {
            return Ok(Claim::Missing);
        };
        let claimable = match task.state {
            TaskState::Queued => true,
            TaskState::Running => lease_lapsed(task, now),
            TaskState::Sleeping => task.cancel_requested || task.wake_at.is_none_or(|at| at <= now),
            _ => return Ok(Claim::Finished(task.clone())),
        };
        if !claimable {
            return Ok(Claim::Busy(task.clone()));
        }
        task.state = task
            .state
            .transition(TaskState::Running)
            .map_err(|e| conflict(task_id, &e.to_string()))?;
        task.attempt += 1;
        task.lease = Some(lease.clone());
        task.wake_at = None;
        task.started_at.get_or_insert(now);
        task.heartbeat_at = Some(now);
        let claimed = task.clone();
        t.writes += 1;
        Ok(Claim::Claimed(claimed))
    }

    async fn peek(&self, task_id: &TaskId) -> PortResult<Option<Peek>> {
        let mut t = lock(&self.tables);
        if t.fail_beats > 0 {
            t.fail_beats -= 1;
            return Err(PortError::Transient("injected heartbeat failure".into()));
        }
        t.reads += 1;
        Ok(t.tasks.get(task_id).map(|task| Peek {
            state: task.state,
            lease_owner: task.lease.as_ref().map(|l| l.owner.clone()),
            cancel_requested: task.cancel_requested,
        }))
    }

    async fn beat(
        &self,
        task_id: &TaskId,
        lease: &Lease,
        progress: Option<&Progress>,
        partial: Option<&serde_json::Value>,
        now: DateTime<Utc>,
    ) -> PortResult<Beat> {
        let mut t = lock(&self.tables);
        if t.fail_beats > 0 {
            t.fail_beats -= 1;
            return Err(PortError::Transient("injected heartbeat failure".into()));
        }
        let task = t
            .tasks
            .get_mut(task_id)
            .ok_or_else(|| PortError::NotFound(task_id.to_string()))?;
        if !runs_under(task, &lease.owner) {
            return Err(conflict(task_id, "lease not held"));
        }
        task.lease = Some(lease.clone());
        task.heartbeat_at = Some(now);
        if let Some(progress) = progress {
            task.progress = progress.clone();
            task.progress_seq += 1;
        }
        if let Some(partial) = partial {
            task.partial = Some(partial.clone());
        }
        let beat = Beat {
            cancel_requested: task.cancel_requested,
            progress_seq: task.progress_seq,
        };
        t.writes += 1;
        Ok(beat)
    }

    async fn finish(&self, task_id: &TaskId, finish: &Finish) -> PortResult<Task> {
        let mut t = lock(&self.tables);
        let task = t
            .tasks
            .get_mut(task_id)
            .ok_or_else(|| PortError::NotFound(task_id.to_string()))?;
        let allowed = match &finish.guard {
            FinishGuard::Owner(owner) => runs_under(task, owner),
            FinishGuard::Queued => task.state == TaskState::Queued,
            FinishGuard::ExpiredLease => {
                matches!(task.state, TaskState::Running | TaskState::Queued)
                    && lease_lapsed(task, finish.at)
            }
            FinishGuard::Abandoned => {
                matches!(task.state, TaskState::Queued | TaskState::Sleeping)
                    || (task.state == TaskState::Running && lease_lapsed(task, finish.at))
            }
        };
        if !allowed {
            return Err(conflict(task_id, "finish guard does not hold"));
        }
        task.state = task
            .state
            .transition(finish.state)
            .map_err(|e| conflict(task_id, &e.to_string()))?;
        task.result = Some(finish.result.clone());
        if let Some(progress) = &finish.progress {
            task.progress = progress.clone();
        }
        if let Some(partial) = &finish.partial {
            task.partial = Some(partial.clone());
        }
        task.finished_at = Some(finish.at);
        task.redeliver_at = Some(finish.redeliver_at);
        task.lease = None;
        let ended = task.clone();
        t.writes += 1;
        if let Some(active) = t.active.get_mut(&(ended.ext.clone(), ended.user.clone())) {
            active.remove(task_id);
            t.writes += 1;
        }
        let trail = t.audit.entry(task_id.clone()).or_default();
        for item in &finish.audit {
            trail.retain(|a| a.audit_id != item.audit_id);
            trail.push(item.clone());
        }
        t.writes += finish.audit.len() as u64;
        Ok(ended)
    }

    async fn requeue(&self, task_id: &TaskId, guard: &Requeue, lease: &Lease) -> PortResult<Task> {
        let mut t = lock(&self.tables);
        let task = t
            .tasks
            .get_mut(task_id)
            .ok_or_else(|| PortError::NotFound(task_id.to_string()))?;
        let allowed = match guard {
            Requeue::Owner(owner) => runs_under(task, owner),
            Requeue::Expired(now) => {
                matches!(
                    task.state,
                    TaskState::Running | TaskState::Queued | TaskState::Sleeping
                ) && lease_lapsed(task, *now)
            }
            Requeue::Isolate(now) => task.state == TaskState::Running && lease_lapsed(task, *now),
        };
        if !allowed {
            return Err(conflict(task_id, "requeue guard does not hold"));
        }
        if matches!(guard, Requeue::Owner(_)) {
            // A hand-off to a fresh invocation is not a failed attempt.
            task.attempt = task.attempt.saturating_sub(1);
        }
        if matches!(guard, Requeue::Isolate(_)) {
            task.isolated = true;
        }
        task.state = TaskState::Queued;
        task.lease = Some(lease.clone());
        task.wake_at = None;
        let requeued = task.clone();
        t.writes += 1;
        Ok(requeued)
    }

    async fn suspend(
        &self,
        task_id: &TaskId,
        owner: &str,
        wake_at: DateTime<Utc>,
        lease: &Lease,
    ) -> PortResult<Task> {
        let mut t = lock(&self.tables);
        let task = t
            .tasks
            .get_mut(task_id)
            .ok_or_else(|| PortError::NotFound(task_id.to_string()))?;
        if !runs_under(task, owner) {
            return Err(conflict(task_id, "lease not held"));
        }
        task.state = TaskState::Sleeping;
        task.wake_at = Some(wake_at);
        task.lease = Some(lease.clone());
        task.attempt = task.attempt.saturating_sub(1);
        let sleeping = task.clone();
        t.writes += 1;
        Ok(sleeping)
    }

    async fn request_cancel(&self, task_id: &TaskId, _now: DateTime<Utc>) -> PortResult<Task> {
        let mut t = lock(&self.tables);
        let task = t
            .tasks
            .get_mut(task_id)
            .ok_or_else(|| PortError::NotFound(task_id.to_string()))?;
        if !matches!(task.state, TaskState::Running | TaskState::Sleeping) {
            return Err(conflict(task_id, "not running"));
        }
        task.cancel_requested = true;
        let updated = task.clone();
        t.writes += 1;
        Ok(updated)
    }

    async fn mark_delivered(&self, task_id: &TaskId, now: DateTime<Utc>) -> PortResult<bool> {
        let mut t = lock(&self.tables);
        let task = t
            .tasks
            .get_mut(task_id)
            .ok_or_else(|| PortError::NotFound(task_id.to_string()))?;
        if task.delivered_at.is_some() {
            return Ok(false);
        }
        task.delivered_at = Some(now);
        task.redeliver_at = None;
        t.writes += 1;
        Ok(true)
    }

    async fn reschedule_delivery(
        &self,
        task_id: &TaskId,
        at: Option<DateTime<Utc>>,
    ) -> PortResult<bool> {
        let mut t = lock(&self.tables);
        let task = t
            .tasks
            .get_mut(task_id)
            .ok_or_else(|| PortError::NotFound(task_id.to_string()))?;
        if !task.state.is_terminal() {
            return Err(conflict(task_id, "task has not finished"));
        }
        if task.delivered_at.is_some() {
            return Ok(false);
        }
        task.redeliver_at = at;
        t.writes += 1;
        Ok(true)
    }

    async fn append_audit(&self, item: &AuditItem) -> PortResult<()> {
        let mut t = lock(&self.tables);
        let trail = t.audit.entry(item.task_id.clone()).or_default();
        if !trail.iter().any(|a| a.audit_id == item.audit_id) {
            trail.push(item.clone());
            t.writes += 1;
        }
        Ok(())
    }

    async fn audit_trail(&self, task_id: &TaskId) -> PortResult<Vec<AuditItem>> {
        let mut trail = lock(&self.tables)
            .audit
            .get(task_id)
            .cloned()
            .unwrap_or_default();
        trail.sort_by_key(|a| a.at);
        Ok(trail)
    }

    async fn list_by_user(&self, ext: &str, user: &str, limit: usize) -> PortResult<Vec<Task>> {
        let t = lock(&self.tables);
        let mut tasks: Vec<Task> = t
            .tasks
            .values()
            .filter(|task| task.is_owned_by(ext, user) && !t.unlisted.contains(&task.task_id))
            .cloned()
            .collect();
        tasks.sort_by(|a, b| b.task_id.cmp(&a.task_id));
        tasks.truncate(limit);
        Ok(tasks)
    }

    async fn record_step(&self, holder: &LeaseHolder, step: &StepRecord) -> PortResult<StepRecord> {
        let delay = lock(&self.tables).step_write_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut guard = lock(&self.tables);
        let t = &mut *guard;
        if !holds_lease(&t.tasks, holder) {
            return Err(conflict(&holder.task_id, "lease not held"));
        }
        let steps = t.steps.entry(holder.task_id.clone()).or_default();
        match steps.entry(step.seq) {
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(step.clone());
                t.writes += 1;
                Ok(step.clone())
            }
            std::collections::btree_map::Entry::Occupied(stored) => Ok(stored.get().clone()),
        }
    }

    async fn steps(&self, task_id: &TaskId) -> PortResult<Vec<StepRecord>> {
        Ok(lock(&self.tables)
            .steps
            .get(task_id)
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default())
    }

    async fn expired_leases(&self, now: DateTime<Utc>, limit: usize) -> PortResult<Vec<Task>> {
        let t = lock(&self.tables);
        let mut tasks: Vec<Task> = t
            .tasks
            .values()
            .filter(|task| task.due_for_sweep(now))
            .cloned()
            .collect();
        tasks.sort_by(|a, b| a.task_id.cmp(&b.task_id));
        tasks.truncate(limit);
        Ok(tasks)
    }
}

/// A queue in memory: FIFO, with delayed messages (on tokio's clock, so a paused-clock test
/// moves through a delay at once), a dead-letter list and an optional injected failure.
pub struct MemoryQueue<M> {
    messages: Mutex<VecDeque<(Instant, M)>>,
    dead: Mutex<Vec<M>>,
    fail_sends: Mutex<u32>,
    sent: Mutex<u64>,
}

impl<M> Default for MemoryQueue<M> {
    fn default() -> Self {
        Self {
            messages: Mutex::new(VecDeque::new()),
            dead: Mutex::new(Vec::new()),
            fail_sends: Mutex::new(0),
            sent: Mutex::new(0),
        }
    }
}

impl<M: Clone> MemoryQueue<M> {
    /// Takes up to `max` messages whose delay is over.
    pub fn take(&self, max: usize) -> Vec<M> {
        let now = Instant::now();
        let mut q = lock(&self.messages);
        let mut taken = Vec::new();
        q.retain(|(visible_at, m)| {
            if taken.len() < max && *visible_at <= now {
                taken.push(m.clone());
                false
            } else {
                true
            }
        });
        taken
    }

    /// Puts a message back (or in, as if sent).
    pub fn push(&self, message: M) {
        lock(&self.messages).push_back((Instant::now(), message));
    }

    /// The messages waiting, delayed ones included.
    pub fn pending(&self) -> Vec<M> {
        lock(&self.messages)
            .iter()
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// Loses every waiting message, delayed ones included; returns how many.
    pub fn purge(&self) -> usize {
        let mut q = lock(&self.messages);
        let n = q.len();
        q.clear();
        n
    }

    /// The messages waiting with the time left until each is delivered.
    pub fn pending_delays(&self) -> Vec<(Duration, M)> {
        let now = Instant::now();
        lock(&self.messages)
            .iter()
            .map(|(at, m)| (at.saturating_duration_since(now), m.clone()))
            .collect()
    }

    /// When the next delayed message is delivered, if every waiting message is delayed.
    pub fn next_delivery(&self) -> Option<Instant> {
        lock(&self.messages).iter().map(|(at, _)| *at).min()
    }

    /// The dead-lettered messages.
    pub fn dead_letters(&self) -> Vec<M> {
        lock(&self.dead).clone()
    }

    /// Makes the next `n` sends fail with a transient error.
    pub fn fail_next_sends(&self, n: u32) {
        *lock(&self.fail_sends) = n;
    }

    /// How many messages were sent in all.
    pub fn sent(&self) -> u64 {
        *lock(&self.sent)
    }

    fn accept(&self, message: &M, delay: Duration) -> PortResult<()> {
        {
            let mut fail = lock(&self.fail_sends);
            if *fail > 0 {
                *fail -= 1;
                return Err(PortError::Transient("injected send failure".into()));
            }
        }
        *lock(&self.sent) += 1;
        lock(&self.messages).push_back((Instant::now() + delay, message.clone()));
        Ok(())
    }
}

#[async_trait]
impl WorkQueue for MemoryQueue<WorkMessage> {
    async fn send(&self, message: &WorkMessage) -> PortResult<()> {
        self.accept(message, Duration::ZERO)
    }

    async fn send_after(&self, message: &WorkMessage, delay: Duration) -> PortResult<()> {
        self.accept(message, delay.min(MAX_QUEUE_DELAY))
    }
}

#[async_trait]
impl DeliveryQueue for MemoryQueue<DeliveryMessage> {
    async fn send(&self, message: &DeliveryMessage) -> PortResult<()> {
        self.accept(message, Duration::ZERO)
    }

    async fn dead_letter(&self, message: &DeliveryMessage) -> PortResult<()> {
        lock(&self.dead).push(message.clone());
        Ok(())
    }
}

/// Secrets in memory, keyed by (ext, user, name).
#[derive(Default)]
pub struct MemorySecrets {
    values: Mutex<HashMap<(String, String, String), String>>,
}

impl MemorySecrets {
    /// Sets a secret.
    pub fn set(&self, ext: &str, user: &str, name: &str, value: &str) {
        lock(&self.values).insert((ext.into(), user.into(), name.into()), value.into());
    }
}

#[async_trait]
impl SecretStore for MemorySecrets {
    async fn get(&self, ext: &str, user: &str, name: &str) -> PortResult<Option<Secret>> {
        Ok(lock(&self.values)
            .get(&(ext.into(), user.into(), name.into()))
            .map(|v| Secret::new(v.clone())))
    }
}

/// One meter's key: (ext, user, meter, day).
type MeterKey = (String, String, String, NaiveDate);

/// Budget meters in memory: a total and the charge ids counted, per (ext, user, meter, day).
#[derive(Default)]
pub struct MemoryUsage {
    meters: Mutex<HashMap<MeterKey, (u64, HashSet<String>)>>,
}

#[async_trait]
impl UsageStore for MemoryUsage {
    async fn charge(
        &self,
        ext: &str,
        user: &str,
        meter: &str,
        day: NaiveDate,
        charge_id: &str,
        amount: u64,
    ) -> PortResult<u64> {
        let mut meters = lock(&self.meters);
        let (used, ids) = meters
            .entry((ext.to_owned(), user.to_owned(), meter.to_owned(), day))
            .or_default();
        if ids.insert(charge_id.to_owned()) {
            *used = used.saturating_add(amount);
        }
        Ok(*used)
    }

    async fn usage(
        &self,
        ext: &str,
        user: &str,
        day: NaiveDate,
    ) -> PortResult<BTreeMap<String, u64>> {
        Ok(lock(&self.meters)
            .iter()
            .filter(|((e, u, _, d), _)| e == ext && u == user && *d == day)
            .map(|((_, _, meter, _), (used, _))| (meter.clone(), *used))
            .collect())
    }

    async fn reset(
        &self,
        ext: &str,
        user: &str,
        day: NaiveDate,
        meter: Option<&str>,
    ) -> PortResult<()> {
        lock(&self.meters).retain(|(e, u, m, d), _| {
            !(e == ext && u == user && *d == day && meter.is_none_or(|meter| meter == m))
        });
        Ok(())
    }
}

/// `ctx.store` in memory. Writes made under a lease are checked against `tasks` (the
/// stack's task table), as the DynamoDB adapter checks them against the task record.
#[derive(Default)]
pub struct MemoryKv {
    values: Mutex<HashMap<(String, String, String), Value>>,
    tasks: Option<std::sync::Arc<MemoryTaskStore>>,
}

impl MemoryKv {
    /// A store whose lease-guarded writes are checked against `tasks`.
    pub fn checking_leases_in(tasks: std::sync::Arc<MemoryTaskStore>) -> Self {
        Self {
            values: Mutex::default(),
            tasks: Some(tasks),
        }
    }

    fn check(&self, holder: Option<&LeaseHolder>) -> PortResult<()> {
        match (holder, &self.tasks) {
            (Some(holder), Some(tasks)) if !holds_lease(&lock(&tasks.tables).tasks, holder) => {
                Err(conflict(&holder.task_id, "lease not held"))
            }
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl KvStore for MemoryKv {
    async fn get(&self, ext: &str, user: &str, key: &str) -> PortResult<Option<Value>> {
        Ok(lock(&self.values)
            .get(&(ext.into(), user.into(), key.into()))
            .cloned())
    }
    async fn set(
        &self,
        ext: &str,
        user: &str,
        key: &str,
        value: &Value,
        holder: Option<&LeaseHolder>,
    ) -> PortResult<()> {
        self.check(holder)?;
        lock(&self.values).insert((ext.into(), user.into(), key.into()), value.clone());
        Ok(())
    }
    async fn delete(
        &self,
        ext: &str,
        user: &str,
        key: &str,
        holder: Option<&LeaseHolder>,
    ) -> PortResult<()> {
        self.check(holder)?;
        lock(&self.values).remove(&(ext.into(), user.into(), key.into()));
        Ok(())
    }
}

/// A message the chat received.
#[derive(Debug, Clone, PartialEq)]
pub struct Posted {
    /// The chat it was posted to.
    pub chat: String,
    /// The idempotency key it was posted under.
    pub idempotency_key: String,
    /// The body as posted: a result or a progress update.
    pub message: ChatMessage,
}

/// A chat platform in memory: records every message once per idempotency key (a repeat gets
/// 409, as the contract allows) and can be told to fail.
#[derive(Default)]
pub struct MemoryChat {
    posted: Mutex<Vec<Posted>>,
    keys: Mutex<HashSet<String>>,
    script: Mutex<VecDeque<ChatOutcome>>,
    attempts: Mutex<u64>,
    latency: Mutex<Duration>,
}

impl MemoryChat {
    /// Every later post takes `latency` before it is answered (a slow chat API).
    pub fn answer_after(&self, latency: Duration) {
        *lock(&self.latency) = latency;
    }

    /// The messages delivered, in order.
    pub fn posted(&self) -> Vec<Posted> {
        lock(&self.posted).clone()
    }

    /// The messages delivered to `chat`.
    pub fn in_chat(&self, chat: &str) -> Vec<ChatMessage> {
        self.posted()
            .into_iter()
            .filter(|p| p.chat == chat)
            .map(|p| p.message)
            .collect()
    }

    /// The next posts answer these outcomes instead of delivering.
    pub fn script(&self, outcomes: impl IntoIterator<Item = ChatOutcome>) {
        lock(&self.script).extend(outcomes);
    }

    /// How many POSTs were attempted, repeats and failures included.
    pub fn attempts(&self) -> u64 {
        *lock(&self.attempts)
    }
}

#[async_trait]
impl ChatApi for MemoryChat {
    async fn post(&self, chat: &str, idempotency_key: &str, message: &ChatMessage) -> ChatOutcome {
        *lock(&self.attempts) += 1;
        let latency = *lock(&self.latency);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if let Some(outcome) = lock(&self.script).pop_front() {
            return outcome;
        }
        if !lock(&self.keys).insert(idempotency_key.to_owned()) {
            return ChatOutcome::Delivered; // 409: already there
        }
        lock(&self.posted).push(Posted {
            chat: chat.to_owned(),
            idempotency_key: idempotency_key.to_owned(),
            message: message.clone(),
        });
        ChatOutcome::Delivered
    }
}
