//! The local pipeline: pollers that play Lambda's SQS event source mappings over the
//! [`LocalQueues`], and the sweeper on a timer — so the worker, delivery and sweeper steps run
//! locally exactly as the Lambdas run them.
//!
//! A poller long-polls its queue for batches of up to 10 messages and runs each batch as one
//! "invocation" of [`worker::handle_batch`] or [`delivery::handle_batch`], several at once (an
//! event source mapping scales out too). The records carry their receive count. Messages the
//! batch reports as failed (the partial batch response) become visible again after the queue's
//! visibility timeout; the others are deleted. An invocation that panics fails its whole
//! batch. While a batch runs its messages stay hidden, as they do behind a deployed mapping
//! whose visibility timeout is 6 × the function timeout.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::queue::{LocalQueue, LocalQueues, Received};
use longrun::Runtime;
use longrun::worker::QueueRecord;
use longrun::{delivery, sweeper, worker};

/// How the pollers and the sweeper run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineOptions {
    /// Most messages in one batch (the mapping's `BatchSize`).
    pub batch_size: usize,
    /// Most batches of one queue running at once (the mapping's maximum concurrency).
    pub max_concurrency: usize,
    /// The worker function's timeout: each worker batch gets this deadline, so a task near it
    /// hands itself on to a fresh invocation as it does on Lambda.
    pub worker_timeout: Duration,
    /// The delivery function's timeout: each delivery batch gets this deadline, and posts
    /// it cannot finish in time are left to the queue, as on Lambda.
    pub delivery_timeout: Duration,
    /// How often the sweeper runs (deployed: every minute).
    pub sweep_every: Duration,
    /// At shutdown, how long running batches may take to finish (a delivery that posted its
    /// message marks it delivered) before they are dropped.
    pub shutdown_grace: Duration,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        Self {
            batch_size: 10,
            max_concurrency: 10,
            worker_timeout: Duration::from_secs(u64::from(longrun_aws::sqs::WORKER_TIMEOUT_S)),
            delivery_timeout: Duration::from_secs(u64::from(longrun_aws::sqs::DELIVERY_TIMEOUT_S)),
            sweep_every: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(2),
        }
    }
}

/// How long one long poll waits for a message.
const POLL_WAIT: Duration = Duration::from_secs(20);
/// How long a batch's messages stay hidden while it runs: SQS's longest visibility timeout.
/// The poller settles every message (delete or release) when its batch ends.
const IN_FLIGHT_HOLD: Duration = Duration::from_secs(12 * 3600);
/// How long the sweeper hides a dead-lettered work message it is ending.
const DLQ_VISIBILITY: Duration = Duration::from_secs(60);

/// The running pollers and sweeper. Dropping it stops them; in-flight batches are dropped as
/// a Lambda that is shut down mid-run would be, and their tasks are revived by the sweeper of
/// the next run once their leases lapse.
pub struct LocalPipeline {
    stop: watch::Sender<bool>,
    handles: Vec<JoinHandle<()>>,
}

impl LocalPipeline {
    /// Starts a worker poller on `queues.work`, a delivery poller on `queues.delivery` and the
    /// sweeper (which also ends the tasks of dead-lettered work messages). Must be called
    /// inside a Tokio runtime.
    pub fn start(rt: Runtime, queues: LocalQueues, options: PipelineOptions) -> Self {
        let (stop, stopped) = watch::channel(false);
        let worker_rt = rt.clone();
        let worker_timeout = options.worker_timeout;
        let worker = tokio::spawn(poll(
            Arc::clone(&queues.work),
            options.clone(),
            stopped.clone(),
            move |records| {
                let rt = worker_rt.clone();
                async move {
                    worker::handle_batch(&rt, records, Some(Instant::now() + worker_timeout)).await
                }
            },
        ));
        let delivery_rt = rt.clone();
        let delivery_timeout = options.delivery_timeout;
        let delivery = tokio::spawn(poll(
            Arc::clone(&queues.delivery),
            options.clone(),
            stopped.clone(),
            move |records| {
                let rt = delivery_rt.clone();
                async move {
                    delivery::handle_batch(&rt, records, Some(Instant::now() + delivery_timeout))
                        .await
                }
            },
        ));
        let sweeper = tokio::spawn(sweep_loop(rt, queues, options.sweep_every, stopped));
        Self {
            stop,
            handles: vec![worker, delivery, sweeper],
        }
    }

    /// Stops the pollers and the sweeper and waits until they have stopped.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for handle in std::mem::take(&mut self.handles) {
            let _ = handle.await;
        }
    }
}

impl Drop for LocalPipeline {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for handle in &self.handles {
            handle.abort();
        }
    }
}

/// Resolves once a stop is requested (or whoever could request one is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// One event source mapping: receive, invoke, settle.
async fn poll<F, Fut>(
    queue: Arc<LocalQueue>,
    options: PipelineOptions,
    mut stop: watch::Receiver<bool>,
    invoke: F,
) where
    F: Fn(Vec<QueueRecord>) -> Fut,
    Fut: std::future::Future<Output = Vec<String>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(options.max_concurrency.max(1)));
    let mut running = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = stopped(&mut stop) => break,
        };
        let received = tokio::select! {
            received = queue.receive_wait(options.batch_size, IN_FLIGHT_HOLD, POLL_WAIT) => received,
            _ = stopped(&mut stop) => break,
        };
        while running.try_join_next().is_some() {}
        if received.is_empty() {
            continue;
        }
        let records: Vec<QueueRecord> = received.iter().map(QueueRecord::from).collect();
        let invocation = AssertUnwindSafe(invoke(records)).catch_unwind();
        let queue = Arc::clone(&queue);
        running.spawn(async move {
            let _permit = permit;
            let failed = match invocation.await {
                Ok(failed) => failed,
                Err(_) => {
                    tracing::error!(queue = %queue.name(), "invocation panicked; its whole batch will be retried");
                    received.iter().map(|r| r.message_id.clone()).collect()
                }
            };
            settle(&queue, &received, &failed);
        });
    }
    // Invocations still running after the grace period end here, as a Lambda that is shut
    // down mid-run; their tasks are revived once their leases lapse.
    let drained = tokio::time::timeout(options.shutdown_grace, async {
        while running.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        running.abort_all();
        while running.join_next().await.is_some() {}
    }
}

/// Deletes what the batch handled and hands the failures back after the visibility timeout.
fn settle(queue: &LocalQueue, received: &[Received], failed: &[String]) {
    for message in received {
        if failed.contains(&message.message_id) {
            queue.change_visibility(&message.receipt_handle, queue.visibility_timeout());
        } else {
            queue.delete(&message.receipt_handle);
        }
    }
}

async fn sweep_loop(
    rt: Runtime,
    queues: LocalQueues,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = sweep_once(&rt, &queues) => {}
            _ = stopped(&mut stop) => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopped(&mut stop) => return,
        }
    }
}

/// What one local sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepSummary {
    /// Tasks whose lease lapsed that were sent back to the work queue.
    pub requeued: usize,
    /// Tasks whose lease lapsed that were ended (attempts or cap used up, or cancelled while
    /// their worker was gone).
    pub ended: usize,
    /// Finished tasks whose undelivered result was sent again.
    pub redelivered: usize,
    /// Tasks ended with a fallback error because their work message was dead-lettered (each
    /// such message is deleted from the work dead-letter queue).
    pub dead_letters_ended: usize,
}

/// One run of the sweeper function: revive expired leases, then end the tasks of
/// dead-lettered work messages.
pub async fn sweep_once(rt: &Runtime, queues: &LocalQueues) -> SweepSummary {
    let mut summary = SweepSummary::default();
    match sweeper::sweep(rt).await {
        Ok(report) => {
            summary.requeued = report.requeued;
            summary.ended = report.ended;
            summary.redelivered = report.redelivered;
        }
        Err(err) => tracing::warn!(error = %err, "sweep failed; the next one tries again"),
    }
    loop {
        let messages = queues.work_dlq.receive(10, DLQ_VISIBILITY);
        if messages.is_empty() {
            break;
        }
        for message in messages {
            match sweeper::work_dead_lettered(rt, &message.body).await {
                Ok(()) => {
                    queues.work_dlq.delete(&message.receipt_handle);
                    summary.dead_letters_ended += 1;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "dead-lettered work message not ended; retried later")
                }
            }
        }
    }
    summary
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use serde_json::json;

    use super::*;
    use crate::queue::QueueTimeouts;
    use longrun::ActionResult;
    use longrun::ports::{ChatOutcome, TaskStore, TokioClock};
    use longrun::task::{AuditKind, TaskState};
    use longrun::testing::fixture::{self as testkit, Runs};
    use longrun::testing::memory::{
        MemoryChat, MemoryKv, MemorySecrets, MemoryTaskStore, MemoryUsage,
    };
    use longrun::wire::ChatMessage;
    use longrun::{Services, Settings, intake};

    struct Local {
        rt: Runtime,
        queues: LocalQueues,
        tasks: Arc<MemoryTaskStore>,
        chat: Arc<MemoryChat>,
        runs: Arc<Runs>,
    }

    const VISIBILITY: Duration = Duration::from_secs(10);

    fn local() -> Local {
        let runs = Arc::new(Runs::default());
        let queues = LocalQueues::new(
            "t",
            QueueTimeouts {
                work: VISIBILITY,
                delivery: VISIBILITY,
            },
        );
        let tasks = Arc::new(MemoryTaskStore::default());
        let chat = Arc::new(MemoryChat::default());
        let services = Services {
            tasks: tasks.clone(),
            work: queues.work.clone(),
            delivery: queues.delivery.clone(),
            secrets: Arc::new(MemorySecrets::default()),
            kv: Arc::new(MemoryKv::default()),
            usage: Arc::new(MemoryUsage::default()),
            chat: chat.clone(),
            clock: Arc::new(TokioClock::starting_at(chrono::Utc::now())),
            http: reqwest::Client::new(),
        };
        let rt = Runtime::serving(
            testkit::extension(Arc::clone(&runs)),
            services,
            Settings::default(),
        );
        Local {
            rt,
            queues,
            tasks,
            chat,
            runs,
        }
    }

    async fn call(local: &Local, function: &str) -> longrun::TaskId {
        let response =
            intake::handle(&local.rt, testkit::call_event(function, "u1", json!({}))).await;
        testkit::task_id_of(&response)
    }

    fn results(chat: &MemoryChat, id: &str) -> Vec<ActionResult> {
        chat.in_chat(id)
            .into_iter()
            .filter_map(|m| match m {
                ChatMessage::Result { result, .. } => Some(result),
                ChatMessage::Progress { .. } => None,
            })
            .collect()
    }

    /// Waits (on tokio's paused clock) until `done` holds; panics after `limit` simulated time.
    async fn until(limit: Duration, mut done: impl FnMut() -> bool) {
        let end = Instant::now() + limit;
        while !done() {
            assert!(Instant::now() < end, "condition not met within {limit:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_pollers_run_a_background_task_to_one_chat_result() {
        // GIVEN the local pipeline
        let local = local();
        let pipeline = LocalPipeline::start(
            local.rt.clone(),
            local.queues.clone(),
            PipelineOptions::default(),
        );
        // WHEN a background function is called
        let task_id = call(&local, "bg").await;
        // THEN the worker poller runs it and the delivery poller posts progress and one result
        until(Duration::from_secs(60), || {
            results(&local.chat, "chat-u1").len() == 1
        })
        .await;
        assert_eq!(local.runs.started.load(Ordering::SeqCst), 1);
        let task = local.tasks.get(&task_id).await.unwrap().unwrap();
        assert_eq!(task.state, TaskState::Succeeded);
        until(Duration::from_secs(5), || {
            local
                .queues
                .all()
                .iter()
                .all(|q| q.depth() + q.in_flight() == 0)
        })
        .await;
        pipeline.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_delivery_comes_back_after_the_visibility_timeout_with_its_receive_count() {
        // GIVEN a chat API that is down for two posts
        let local = local();
        local.chat.script([
            ChatOutcome::Unavailable {
                reason: "503".into(),
            },
            ChatOutcome::Unavailable {
                reason: "503".into(),
            },
        ]);
        let pipeline = LocalPipeline::start(
            local.rt.clone(),
            local.queues.clone(),
            PipelineOptions::default(),
        );
        let started = Instant::now();
        call(&local, "launch").await;
        // THEN the result arrives once, after two visibility timeouts
        until(Duration::from_secs(120), || {
            results(&local.chat, "chat-u1").len() == 1
        })
        .await;
        assert!(started.elapsed() >= VISIBILITY);
        assert!(local.chat.attempts() >= 3);
        pipeline.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_delivery_that_fails_five_times_is_dead_lettered_with_a_critical_audit() {
        // GIVEN a chat API that never answers
        let local = local();
        local.chat.script(std::iter::repeat_n(
            ChatOutcome::Unavailable {
                reason: "down".into(),
            },
            100,
        ));
        let pipeline = LocalPipeline::start(
            local.rt.clone(),
            local.queues.clone(),
            PipelineOptions::default(),
        );
        let task_id = call(&local, "launch").await;
        // THEN after maxReceiveCount receives the result message sits in the DLQ
        until(Duration::from_secs(600), || {
            local
                .queues
                .delivery_dlq
                .receive(10, Duration::ZERO)
                .iter()
                .any(|m| m.body.contains(r#""kind":"result""#))
        })
        .await;
        let trail = local.tasks.audit_trail(&task_id).await.unwrap();
        assert!(
            trail
                .iter()
                .any(|a| a.kind == AuditKind::Critical && a.audit_id.contains("last-attempt")),
            "{trail:?}"
        );
        assert!(results(&local.chat, "chat-u1").is_empty());
        pipeline.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_lettered_work_message_ends_its_task_at_the_next_sweep() {
        let local = local();
        // GIVEN a work message that landed in the work DLQ
        let task_id = call(&local, "bg").await;
        let message = local.queues.work.receive(1, Duration::ZERO).remove(0);
        local.queues.work.delete(&message.receipt_handle);
        local.queues.work_dlq.send_message(message.body).unwrap();
        // WHEN the pipeline (and so the sweeper) runs
        let pipeline = LocalPipeline::start(
            local.rt.clone(),
            local.queues.clone(),
            PipelineOptions::default(),
        );
        // THEN the task ends failed and the user hears about it
        until(Duration::from_secs(60), || {
            results(&local.chat, "chat-u1").len() == 1
        })
        .await;
        let task = local.tasks.get(&task_id).await.unwrap().unwrap();
        assert_eq!(task.state, TaskState::Failed);
        assert_eq!(local.runs.started.load(Ordering::SeqCst), 0);
        pipeline.shutdown().await;
    }
}
