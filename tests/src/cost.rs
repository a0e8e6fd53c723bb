//! What tasks cost on AWS, measured on the emulators: the pipeline runs in process over the
//! real adapters, the queues played as Lambda's event source mapping plays them, every AWS
//! request the functions make counted by operation ([`RequestCounter`]), and the bill worked
//! out at list price. The benches `ack_latency` and `wait_cost` print these figures.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use longrun::Runtime;
use longrun::task::{Task, TaskId};
use longrun::worker::QueueRecord;

use crate::counting::{RequestCounter, TRANSACT_ITEMS};

/// List prices, us-east-1, as the README states them beside the figures.
pub mod price {
    /// Lambda, per request.
    pub const LAMBDA_PER_REQUEST: f64 = 0.20 / 1e6;
    /// Lambda, per GB-second (x86).
    pub const LAMBDA_PER_GB_S: f64 = 0.000_016_666_7;
    /// DynamoDB on demand, per write request unit.
    pub const DYNAMODB_PER_WRU: f64 = 0.625 / 1e6;
    /// DynamoDB on demand, per read request unit.
    pub const DYNAMODB_PER_RRU: f64 = 0.125 / 1e6;
    /// SQS standard queue, per request.
    pub const SQS_PER_REQUEST: f64 = 0.40 / 1e6;
    /// Secrets Manager, per API call.
    pub const SECRETS_PER_CALL: f64 = 0.05 / 10_000.0;
}

/// A deployment on the emulators for a cost run: a table and queues named after `name`, and
/// `user`'s OpenAI key (`key`) connected. Returns the configuration the functions read, and
/// the SDK configurations of moto and dynoxide to build (counting) clients from.
pub async fn deploy(
    name: &str,
    moto: &crate::moto::Moto,
    dynoxide: &crate::dynamo::Dynoxide,
    chat_url: &str,
    user: &str,
    key: &str,
) -> (
    longrun::config::Config,
    aws_config::SdkConfig,
    aws_config::SdkConfig,
) {
    let moto_sdk = moto.sdk_config().await;
    let dynamo_sdk = crate::moto::sdk_config(&dynoxide.endpoint).await;
    let dynamodb = aws_sdk_dynamodb::Client::new(&dynamo_sdk);
    let sqs = aws_sdk_sqs::Client::new(&moto_sdk);
    let secrets = aws_sdk_secretsmanager::Client::new(&moto_sdk);
    let table = format!("{name}-tasks");
    longrun_aws::dynamodb::ensure_table(&dynamodb, &table)
        .await
        .expect("table");
    let queues = longrun_aws::sqs::ensure_queues(&sqs, name)
        .await
        .expect("queues");
    longrun_aws::secrets::put_secret(
        &secrets,
        "longrun",
        text_tools::NAME,
        user,
        text_tools::API_KEY_SECRET,
        &longrun::Secret::new(key),
    )
    .await
    .expect("the user's key");
    let vars: BTreeMap<&str, String> = BTreeMap::from([
        ("LONGRUN_TABLE", table),
        ("LONGRUN_WORK_QUEUE_URL", queues.work),
        ("LONGRUN_DELIVERY_QUEUE_URL", queues.delivery),
        ("LONGRUN_WORK_DLQ_URL", queues.work_dlq),
        ("LONGRUN_DELIVERY_DLQ_URL", queues.delivery_dlq),
        ("LONGRUN_CHAT_API_URL", chat_url.to_owned()),
    ]);
    let config =
        longrun::config::Config::from_lookup(|name| vars.get(name).cloned()).expect("config");
    (config, moto_sdk, dynamo_sdk)
}

/// What one function did over a run: AWS requests by operation, invocations, time busy.
#[derive(Debug, Clone, Default)]
pub struct Phase {
    /// Requests by operation (`AmazonSQS.SendMessage`, …), the poller's included.
    pub requests: BTreeMap<String, u64>,
    /// Invocations of the function.
    pub invocations: usize,
    /// The time its invocations ran, summed.
    pub busy: Duration,
}

/// Which function a queue feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The work queue: `worker::handle_batch`.
    Worker,
    /// The delivery queue: `delivery::handle_batch`.
    Delivery,
}

/// Plays Lambda's event source mapping on `url` until `done` says so or `limit` passes:
/// ReceiveMessage of up to 10, one invocation of the function, DeleteMessageBatch of what
/// succeeded. `poll` is an uncounted client: the mapping's receives and deletes are counted
/// here, one each per batch received (its empty polls are a fixed cost of the queue, not of a
/// task); the function's own requests are counted by `counter`.
pub async fn drain<F, Fut>(
    rt: &Runtime,
    poll: &aws_sdk_sqs::Client,
    counter: &RequestCounter,
    url: &str,
    role: Role,
    limit: Duration,
    done: F,
) -> Phase
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let before = counter.snapshot();
    let mut phase = Phase::default();
    let (mut receives, mut deletes) = (0, 0);
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let messages = longrun_aws::sqs::receive(poll, url, 10, 1, None)
            .await
            .expect("ReceiveMessage");
        if messages.is_empty() {
            if done().await {
                break;
            }
            continue;
        }
        receives += 1;
        let records: Vec<QueueRecord> = messages.iter().map(QueueRecord::from).collect();
        let started = Instant::now();
        let failed = match role {
            Role::Worker => longrun::worker::handle_batch(rt, records, None).await,
            Role::Delivery => longrun::delivery::handle_batch(rt, records, None).await,
        };
        phase.busy += started.elapsed();
        phase.invocations += 1;
        let entries: Vec<_> = messages
            .iter()
            .filter(|m| !failed.contains(&m.message_id))
            .enumerate()
            .filter_map(|(i, m)| {
                aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(&m.receipt_handle)
                    .build()
                    .ok()
            })
            .collect();
        if !entries.is_empty() {
            poll.delete_message_batch()
                .queue_url(url)
                .set_entries(Some(entries))
                .send()
                .await
                .expect("DeleteMessageBatch");
            deletes += 1;
        }
    }
    phase.requests = counter.since(&before);
    for (op, n) in [
        ("AmazonSQS.ReceiveMessage", receives),
        ("AmazonSQS.DeleteMessageBatch", deletes),
    ] {
        if n > 0 {
            *phase.requests.entry(op.to_owned()).or_default() += n;
        }
    }
    phase
}

/// Whether every task of `ids` exists and satisfies `done`.
pub async fn every_task(rt: &Runtime, ids: &[TaskId], done: impl Fn(&Task) -> bool) -> bool {
    for id in ids {
        match rt.services.tasks.get(id).await {
            Ok(Some(task)) if done(&task) => {}
            _ => return false,
        }
    }
    true
}

/// The operation's name without its service prefix: `PutItem`.
pub fn short(operation: &str) -> &str {
    operation.rsplit('.').next().unwrap_or(operation)
}

/// One task's bill: what it used, and what that costs per million tasks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bill {
    /// AWS requests by operation (short names), per task.
    pub requests: BTreeMap<String, f64>,
    /// DynamoDB write request units, per task.
    pub wru: f64,
    /// DynamoDB read request units, per task.
    pub rru: f64,
    /// SQS requests, per task.
    pub sqs: f64,
    /// Secrets Manager calls, per task.
    pub secrets: f64,
    /// Lambda invocations, per task.
    pub invocations: f64,
    /// Lambda GB-seconds, per task.
    pub gb_s: f64,
}

impl Bill {
    /// The bill of `tasks` tasks whose functions ran `phases`, each with its memory in GB.
    pub fn of(phases: &[(&Phase, f64)], tasks: usize) -> Self {
        let n = tasks as f64;
        let mut bill = Self::default();
        for (phase, gb) in phases {
            bill.invocations += phase.invocations as f64 / n;
            bill.gb_s += phase.busy.as_secs_f64() * gb / n;
            for (op, count) in &phase.requests {
                let per_task = *count as f64 / n;
                if op.ends_with(TRANSACT_ITEMS) {
                    // 2 WRU per item in a transaction.
                    bill.wru += 2.0 * per_task;
                    continue;
                }
                *bill.requests.entry(short(op).to_owned()).or_default() += per_task;
                match short(op) {
                    "PutItem" | "UpdateItem" | "DeleteItem" => bill.wru += per_task,
                    "GetItem" | "Query" => bill.rru += per_task,
                    _ => {}
                }
                if op.starts_with("AmazonSQS") {
                    bill.sqs += per_task;
                }
                if op.starts_with("secretsmanager") {
                    bill.secrets += per_task;
                }
            }
        }
        bill
    }

    /// AWS requests per task, all operations.
    pub fn total_requests(&self) -> f64 {
        self.requests.values().sum()
    }

    /// DynamoDB, per million tasks.
    pub fn dynamodb_dollars(&self) -> f64 {
        (self.wru * price::DYNAMODB_PER_WRU + self.rru * price::DYNAMODB_PER_RRU) * 1e6
    }

    /// SQS, per million tasks.
    pub fn sqs_dollars(&self) -> f64 {
        self.sqs * price::SQS_PER_REQUEST * 1e6
    }

    /// Secrets Manager, per million tasks.
    pub fn secrets_dollars(&self) -> f64 {
        self.secrets * price::SECRETS_PER_CALL * 1e6
    }

    /// Lambda requests, per million tasks.
    pub fn lambda_request_dollars(&self) -> f64 {
        self.invocations * price::LAMBDA_PER_REQUEST * 1e6
    }

    /// Lambda duration, per million tasks.
    pub fn lambda_duration_dollars(&self) -> f64 {
        self.gb_s * price::LAMBDA_PER_GB_S * 1e6
    }

    /// Everything but Lambda duration, per million tasks: what orchestrating a task costs.
    pub fn orchestration_dollars(&self) -> f64 {
        self.dynamodb_dollars()
            + self.sqs_dollars()
            + self.secrets_dollars()
            + self.lambda_request_dollars()
    }

    /// The whole bill, per million tasks.
    pub fn total_dollars(&self) -> f64 {
        self.orchestration_dollars() + self.lambda_duration_dollars()
    }

    /// `Op n, Op n, …` per task.
    pub fn requests_line(&self) -> String {
        self.requests
            .iter()
            .map(|(op, n)| format!("{op} {n:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The pricing assumptions the figures rest on, for printing beside them.
pub const ASSUMPTIONS: &str = "on-demand DynamoDB at $0.625/M WRU and $0.125/M RRU, 1 WRU per \
write (items under 1 KB; a larger record costs 1 WRU per started KB), 2 WRU per item in a \
transaction, 1 RRU per strongly consistent read under 4 KB; SQS $0.40/M requests (the event \
source mapping's ReceiveMessage and DeleteMessageBatch counted, one each per batch; its empty \
polls not); Secrets Manager $0.05 per 10,000 calls; Lambda $0.20/M requests and $0.0000166667 \
per GB-s (x86), duration as measured here in process against the emulators; the sweeper runs \
once a minute whatever the traffic and is not counted per task";
