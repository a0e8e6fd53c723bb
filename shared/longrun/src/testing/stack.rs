//! `MemoryStack`: the whole pipeline on in-memory adapters, with the queue pumping done by
//! hand. Unit tests and the end-to-end pipeline tests drive it; it is the shortest way to see
//! a task go from ack to progress to chat message.

use std::sync::Arc;

use serde_json::Value;

use crate::ports::{Clock, SystemClock};
use crate::runtime::{Runtime, Services, Settings};
use crate::testing::memory::{
    MemoryChat, MemoryKv, MemoryQueue, MemorySecrets, MemoryTaskStore, MemoryUsage,
};
use crate::wire::{DeliveryMessage, IntakeResponse, WorkMessage};
use crate::worker::QueueRecord;
use crate::{Extension, delivery, intake, worker};

/// The pipeline wired to in-memory adapters.
#[derive(Clone)]
pub struct MemoryStack {
    /// The runtime serving the extension over these adapters.
    pub rt: Runtime,
    /// The task table: task records, audit trails and steps.
    pub tasks: Arc<MemoryTaskStore>,
    /// The work queue; [`MemoryStack::work_once`] pumps it.
    pub work: Arc<MemoryQueue<WorkMessage>>,
    /// The delivery queue; [`MemoryStack::deliver_once`] pumps it.
    pub delivery: Arc<MemoryQueue<DeliveryMessage>>,
    /// The users' secrets; set them before calling a function that needs one.
    pub secrets: Arc<MemorySecrets>,
    /// The storage behind `ctx.store`.
    pub kv: Arc<MemoryKv>,
    /// The budget meters behind `ctx.charge`.
    pub usage: Arc<MemoryUsage>,
    /// The chat platform; read the delivered messages here.
    pub chat: Arc<MemoryChat>,
}

impl MemoryStack {
    /// A stack for `extension` with the system clock.
    pub fn new(extension: Extension, settings: Settings) -> Self {
        Self::with_clock(extension, settings, Arc::new(SystemClock))
    }

    /// A stack for `extension` with the given clock.
    pub fn with_clock(extension: Extension, settings: Settings, clock: Arc<dyn Clock>) -> Self {
        let tasks = Arc::new(MemoryTaskStore::default());
        let work = Arc::new(MemoryQueue::default());
        let delivery = Arc::new(MemoryQueue::default());
        let secrets = Arc::new(MemorySecrets::default());
        let kv = Arc::new(MemoryKv::checking_leases_in(tasks.clone()));
        let chat = Arc::new(MemoryChat::default());
        let usage = Arc::new(MemoryUsage::default());
        let services = Services {
            tasks: tasks.clone(),
            work: work.clone(),
            delivery: delivery.clone(),
            secrets: secrets.clone(),
            kv: kv.clone(),
            usage: usage.clone(),
            chat: chat.clone(),
            clock,
            http: reqwest::Client::new(),
        };
        Self {
            rt: Runtime::serving(extension, services, settings),
            tasks,
            work,
            delivery,
            secrets,
            kv,
            usage,
            chat,
        }
    }

    /// Invokes intake.
    pub async fn intake(&self, event: Value) -> IntakeResponse {
        intake::handle(&self.rt, event).await
    }

    /// Runs one worker invocation over up to 10 waiting work messages. Failed messages go
    /// back to the queue. Returns how many messages it took.
    pub async fn work_once(&self) -> usize {
        let batch = self.work.take(10);
        let n = batch.len();
        let records = records(&batch);
        let failed = worker::handle_batch(&self.rt, records.clone(), None).await;
        requeue_failed(&self.work, &batch, &records, &failed);
        n
    }

    /// Runs one delivery invocation over up to 10 waiting delivery messages.
    pub async fn deliver_once(&self) -> usize {
        let batch = self.delivery.take(10);
        let n = batch.len();
        let records = records(&batch);
        let failed = delivery::handle_batch(&self.rt, records.clone(), None).await;
        requeue_failed(&self.delivery, &batch, &records, &failed);
        n
    }

    /// Pumps both queues until they are empty (at most `rounds` rounds). Delivery runs
    /// beside the worker, as the delivery Lambda does, so progress reaches the chat while the
    /// task runs. When only delayed work messages wait (sleeping tasks), it waits for the
    /// next one — at once under a paused clock.
    pub async fn drain(&self, rounds: usize) {
        for _ in 0..rounds {
            let work = self.work_once();
            tokio::pin!(work);
            let worked = loop {
                tokio::select! {
                    worked = &mut work => break worked,
                    _ = tokio::time::sleep(DELIVERY_POLL) => { self.deliver_once().await; }
                }
            };
            let mut delivered = 0;
            for _ in 0..rounds {
                match self.deliver_once().await {
                    0 => break,
                    n => delivered += n,
                }
            }
            if worked == 0 && delivered == 0 {
                match self.work.next_delivery() {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => return,
                }
            }
        }
    }
}

/// How often the in-memory delivery pump looks for messages while a worker runs.
const DELIVERY_POLL: std::time::Duration = std::time::Duration::from_millis(100);

fn records<M: serde::Serialize>(batch: &[M]) -> Vec<QueueRecord> {
    batch
        .iter()
        .enumerate()
        .map(|(i, m)| {
            QueueRecord::new(
                format!("m{i}"),
                serde_json::to_string(m).unwrap_or_default(),
            )
        })
        .collect()
}

fn requeue_failed<M: Clone>(
    queue: &MemoryQueue<M>,
    batch: &[M],
    records: &[QueueRecord],
    failed: &[String],
) {
    for (message, record) in batch.iter().zip(records) {
        if failed.contains(&record.message_id) {
            queue.push(message.clone());
        }
    }
}
