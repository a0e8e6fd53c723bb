//! Ack latency and the cost of one background task, on the emulators.
//!
//! `cargo bench -p longrun-tests --bench ack_latency`
//!
//! 1. Latency: intake's Pattern B ack (`longrun::intake::handle` in process, over the real
//!    DynamoDB and SQS adapters: dynoxide and moto) against a bare PutItem and a bare
//!    SendMessage on the same emulators, interleaved in one run. Intake writes the task record
//!    and sends the work message concurrently, so its ack should cost about one round trip:
//!    the goal is ack / max(PutItem, SendMessage) ≤ 1.2 at the median.
//! 2. Cost: 20 tasks through intake, the worker and delivery (in process, the queues played
//!    as Lambda's poller does), counting every AWS request by operation; then dollars per
//!    million tasks at list price, with the assumptions printed beside the figures.
//!
//! Bounded: a fixed number of rounds, every wait capped; it needs moto (`pip install
//! 'moto[server]'`) and says so if it is missing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use longrun::config::Config;
use longrun::task::{Task, TaskId};
use longrun::worker::QueueRecord;
use longrun::{Runtime, Secret, Settings};
use longrun_aws::AwsClients;
use longrun_aws::chat::HttpChat;
use longrun_tests::counting::RequestCounter;
use longrun_tests::dynamo::Dynoxide;
use longrun_tests::fake_chat::FakeChat;
use longrun_tests::fake_openai::FakeOpenAi;
use longrun_tests::moto::Moto;
use serde_json::{Value, json};

/// Measured rounds (each: one ack, one PutItem, one SendMessage), after the warm-up.
const ROUNDS: usize = 300;
const WARM_UP: usize = 30;
/// Tasks pushed through the whole pipeline for the request count.
const TASKS: usize = 20;
const KEY: &str = "sk-bench-not-a-real-key";
const USER: &str = "bench-user";

// List prices, us-east-1.
const LAMBDA_PER_REQUEST: f64 = 0.20 / 1e6;
const LAMBDA_PER_GB_S: f64 = 0.000_016_666_7;
const DYNAMODB_PER_WRU: f64 = 0.625 / 1e6;
const DYNAMODB_PER_RRU: f64 = 0.125 / 1e6;
const SQS_PER_REQUEST: f64 = 0.40 / 1e6;
const SECRETS_PER_CALL: f64 = 0.05 / 10_000.0;
/// Memory of the functions in template.yaml, in GB.
const INTAKE_GB: f64 = 0.25;
const WORKER_GB: f64 = 0.5;
const DELIVERY_GB: f64 = 0.25;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(run());
}

async fn run() {
    let Some(moto) = Moto::start().await else {
        eprintln!("ack_latency: moto is not installed; nothing measured");
        return;
    };
    let dynoxide = Dynoxide::start().await.expect("dynoxide");
    let openai = FakeOpenAi::start().await.expect("fake OpenAI");
    openai.expect_key(KEY);
    let chat = FakeChat::start().await.expect("fake chat");

    let counter = RequestCounter::default();
    let moto_sdk = moto.sdk_config().await;
    let dynamo_sdk = longrun_tests::moto::sdk_config(&dynoxide.endpoint).await;
    let clients = AwsClients {
        dynamodb: counter.dynamodb(&dynamo_sdk),
        sqs: counter.sqs(&moto_sdk),
        secrets: counter.secrets(&moto_sdk),
    };
    let table = "bench-tasks";
    longrun_aws::dynamodb::ensure_table(&clients.dynamodb, table)
        .await
        .expect("table");
    let queues = longrun_aws::sqs::ensure_queues(&clients.sqs, "bench")
        .await
        .expect("queues");
    longrun_aws::secrets::put_secret(
        &clients.secrets,
        "longrun",
        text_tools::NAME,
        USER,
        text_tools::API_KEY_SECRET,
        &Secret::new(KEY),
    )
    .await
    .expect("the user's key");
    let vars: BTreeMap<&str, String> = BTreeMap::from([
        ("LONGRUN_TABLE", table.to_owned()),
        ("LONGRUN_WORK_QUEUE_URL", queues.work.clone()),
        ("LONGRUN_DELIVERY_QUEUE_URL", queues.delivery.clone()),
        ("LONGRUN_WORK_DLQ_URL", queues.work_dlq.clone()),
        ("LONGRUN_DELIVERY_DLQ_URL", queues.delivery_dlq.clone()),
        ("LONGRUN_CHAT_API_URL", chat.url.clone()),
    ]);
    let config = Config::from_lookup(|name| vars.get(name).cloned()).expect("config");
    let chat_api = Arc::new(HttpChat::new(
        reqwest::Client::new(),
        chat.url.clone(),
        None,
    ));
    let rt = Runtime::serving(
        text_tools::extension_with(text_tools::OpenAi::new(openai.base_url.clone())),
        longrun_aws::services(&clients, &config, Some(chat_api)),
        // One bench user stands for many users: the per-user task limit is lifted.
        Settings {
            max_active_tasks: 10_000,
            ..Settings::default()
        },
    );

    latency(&rt, &clients, &config).await;
    let purged = clients
        .sqs
        .purge_queue()
        .queue_url(&config.work_queue_url)
        .send()
        .await;
    if purged.is_err() {
        eprintln!("(could not purge the work queue; the cost run drains it anyway)");
    }
    cost(&rt, &clients, &config, &counter, &chat).await;
}

fn call_event(i: usize) -> Value {
    json!({"action": "call", "ext": text_tools::NAME, "user": USER, "chat": "bench-chat",
           "request_id": format!("bench-{i}-{}", ulid::Ulid::new()),
           "function": "refine_output",
           "params": {"input": "Refine this paragraph about long-running AI calls, please."}})
}

async fn latency(rt: &Runtime, clients: &AwsClients, config: &Config) {
    let mut ack = Vec::with_capacity(ROUNDS);
    let mut put = Vec::with_capacity(ROUNDS);
    let mut send = Vec::with_capacity(ROUNDS);
    // A bare item and message the size of a queued task record and its work message.
    let body = serde_json::to_string(&call_event(0)).expect("body");
    for i in 0..WARM_UP + ROUNDS {
        let started = Instant::now();
        let response = longrun::intake::handle(rt, call_event(i)).await;
        let ack_time = started.elapsed();
        assert_eq!(response.status, 200, "{response:?}");

        let started = Instant::now();
        clients
            .dynamodb
            .put_item()
            .table_name(&config.table)
            .item(
                "pk",
                aws_sdk_dynamodb::types::AttributeValue::S(format!("bench#{i}")),
            )
            .item(
                "sk",
                aws_sdk_dynamodb::types::AttributeValue::S("bench".into()),
            )
            .item(
                "body",
                aws_sdk_dynamodb::types::AttributeValue::S(body.clone()),
            )
            .send()
            .await
            .expect("PutItem");
        let put_time = started.elapsed();

        let started = Instant::now();
        clients
            .sqs
            .send_message()
            .queue_url(&config.work_queue_url)
            .message_body(&body)
            .send()
            .await
            .expect("SendMessage");
        let send_time = started.elapsed();
        if i >= WARM_UP {
            ack.push(ack_time);
            put.push(put_time);
            send.push(send_time);
        }
    }
    let (ack, put, send) = (Stats::of(ack), Stats::of(put), Stats::of(send));
    println!("ack latency on the emulators ({ROUNDS} rounds after {WARM_UP} warm-up, interleaved)");
    println!("  {:<34} {:>9} {:>9}", "", "median", "p99");
    for (name, s) in [
        ("intake ack (Pattern B)", &ack),
        ("bare PutItem (dynoxide)", &put),
        ("bare SendMessage (moto)", &send),
    ] {
        println!(
            "  {name:<34} {:>6.2} ms {:>6.2} ms",
            ms(s.median),
            ms(s.p99)
        );
    }
    let floor = put.median.max(send.median);
    let floor_p99 = put.p99.max(send.p99);
    println!(
        "  ack / max(PutItem, SendMessage): {:.2} at the median (goal ≤ 1.2), {:.2} at p99",
        ms(ack.median) / ms(floor),
        ms(ack.p99) / ms(floor_p99)
    );
    println!(
        "  (one round trip = the slower of the two writes; sequential writes would be {:.2} ms)",
        ms(put.median + send.median)
    );
}

struct Stats {
    median: Duration,
    p99: Duration,
}

impl Stats {
    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Self {
            median: at(0.5),
            p99: at(0.99),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What one phase of the pipeline did.
struct Phase {
    requests: BTreeMap<String, u64>,
    invocations: usize,
    busy: Duration,
}

async fn cost(
    rt: &Runtime,
    clients: &AwsClients,
    config: &Config,
    counter: &RequestCounter,
    chat: &FakeChat,
) {
    // Intake: TASKS calls, one invocation each.
    let before = counter.snapshot();
    let started = Instant::now();
    let mut ids = Vec::new();
    for i in 0..TASKS {
        let response = longrun::intake::handle(rt, call_event(10_000 + i)).await;
        let result = response.result.expect("an ack");
        ids.push(
            result.data.as_ref().expect("ack data")["task_id"]
                .as_str()
                .expect("task id")
                .parse::<TaskId>()
                .expect("a ULID"),
        );
    }
    let intake = Phase {
        requests: counter.since(&before),
        invocations: TASKS,
        busy: started.elapsed(),
    };

    // Worker: the work queue played as Lambda's poller does, batches of up to 10.
    let worker = drain(
        rt,
        clients,
        counter,
        &config.work_queue_url,
        Role::Worker,
        || every_task(rt, &ids, |t| t.state.is_terminal()),
    )
    .await;

    // Delivery: progress and results to the chat.
    let delivery = drain(
        rt,
        clients,
        counter,
        &config.delivery_queue_url,
        Role::Delivery,
        || every_task(rt, &ids, |t| t.delivered_at.is_some()),
    )
    .await;
    let delivered = ids
        .iter()
        .filter(|id| chat.results_for(id.as_str()).len() == 1)
        .count();
    assert_eq!(
        delivered, TASKS,
        "every task's result reached the chat once"
    );

    print_cost(&intake, &worker, &delivery);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Worker,
    Delivery,
}

/// Polls `url` like Lambda's event source mapping (ReceiveMessage of up to 10, the function,
/// DeleteMessageBatch of what succeeded) until `done` says so, or 60 s pass.
async fn drain<F, Fut>(
    rt: &Runtime,
    clients: &AwsClients,
    counter: &RequestCounter,
    url: &str,
    role: Role,
    done: F,
) -> Phase
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let before = counter.snapshot();
    let mut busy = Duration::ZERO;
    let mut invocations = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let messages = longrun_aws::sqs::receive(&clients.sqs, url, 10, 1, None)
            .await
            .expect("ReceiveMessage");
        if messages.is_empty() {
            if done().await {
                break;
            }
            continue;
        }
        let records: Vec<QueueRecord> = messages.iter().map(QueueRecord::from).collect();
        let started = Instant::now();
        let failed = match role {
            Role::Worker => longrun::worker::handle_batch(rt, records, None).await,
            Role::Delivery => longrun::delivery::handle_batch(rt, records, None).await,
        };
        busy += started.elapsed();
        invocations += 1;
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
            clients
                .sqs
                .delete_message_batch()
                .queue_url(url)
                .set_entries(Some(entries))
                .send()
                .await
                .expect("DeleteMessageBatch");
        }
    }
    Phase {
        requests: counter.since(&before),
        invocations,
        busy,
    }
}

/// Write and read units an operation costs, under the printed assumptions.
fn units(operation: &str) -> (f64, f64) {
    match operation.rsplit('.').next().unwrap_or_default() {
        "PutItem" | "UpdateItem" | "DeleteItem" => (1.0, 0.0),
        // A transaction costs 2 WRU per item; intake's create writes the task and its
        // request key.
        "TransactWriteItems" => (4.0, 0.0),
        "GetItem" | "Query" => (0.0, 1.0),
        _ => (0.0, 0.0),
    }
}

fn print_cost(intake: &Phase, worker: &Phase, delivery: &Phase) {
    let n = TASKS as f64;
    println!();
    println!("AWS requests per background task (refine_output, {TASKS} tasks, end to end)");
    let mut total: BTreeMap<String, f64> = BTreeMap::new();
    for (name, phase) in [
        ("intake", intake),
        ("worker", worker),
        ("delivery", delivery),
    ] {
        let per_task: Vec<String> = phase
            .requests
            .iter()
            .map(|(op, count)| {
                *total.entry(op.clone()).or_default() += *count as f64 / n;
                format!("{} {:.2}", short(op), *count as f64 / n)
            })
            .collect();
        println!(
            "  {name:<8} {:.2} invocations/task; {}",
            phase.invocations as f64 / n,
            per_task.join(", ")
        );
    }
    let requests: f64 = total.values().sum();
    println!("  total    {requests:.2} AWS requests per task");

    let (mut wru, mut rru, mut sqs, mut secrets) = (0.0, 0.0, 0.0, 0.0);
    for (op, count) in &total {
        let (w, r) = units(op);
        wru += w * count;
        rru += r * count;
        if op.starts_with("AmazonSQS") {
            sqs += count;
        }
        if op.starts_with("secretsmanager") {
            secrets += count;
        }
    }
    let invocations = (intake.invocations + worker.invocations + delivery.invocations) as f64 / n;
    let gb_s = (intake.busy.as_secs_f64() * INTAKE_GB
        + worker.busy.as_secs_f64() * WORKER_GB
        + delivery.busy.as_secs_f64() * DELIVERY_GB)
        / n;
    let million = 1e6;
    let dynamodb = (wru * DYNAMODB_PER_WRU + rru * DYNAMODB_PER_RRU) * million;
    let sqs_cost = sqs * SQS_PER_REQUEST * million;
    let secrets_cost = secrets * SECRETS_PER_CALL * million;
    let lambda_requests = invocations * LAMBDA_PER_REQUEST * million;
    let lambda_duration = gb_s * LAMBDA_PER_GB_S * million;
    let per_minute_of_ai =
        60.0 * WORKER_GB * LAMBDA_PER_GB_S * million + 12.0 * DYNAMODB_PER_WRU * million;
    println!();
    println!("dollars per million background tasks, list price (us-east-1)");
    println!("  DynamoDB   ${dynamodb:>8.2}  ({wru:.1} WRU + {rru:.1} RRU per task)");
    println!("  SQS        ${sqs_cost:>8.2}  ({sqs:.2} requests per task, the poller's included)");
    println!("  Secrets    ${secrets_cost:>8.2}  ({secrets:.2} GetSecretValue per task)");
    println!("  Lambda req ${lambda_requests:>8.2}  ({invocations:.2} invocations per task)");
    println!(
        "  Lambda GB-s${lambda_duration:>8.2}  ({:.4} GB-s per task, measured here)",
        gb_s
    );
    println!(
        "  total      ${:>8.2}  per million tasks, before the AI call's own time",
        dynamodb + sqs_cost + secrets_cost + lambda_requests + lambda_duration
    );
    println!(
        "  + ${per_minute_of_ai:.2} per million tasks for each minute the worker waits on the AI \
         (512 MB × 60 s, and 12 heartbeat writes)"
    );
    println!(
        "assumptions: on-demand DynamoDB at $0.625/M WRU and $0.125/M RRU, 1 WRU per write \
              (items under 1 KB; a larger record costs 1 WRU per started KB), 2 WRU per item in a \
              transaction, 1 RRU per strongly consistent read under 4 KB; SQS $0.40/M requests \
              (the poller's ReceiveMessage and DeleteMessageBatch counted, its empty polls not); \
              Secrets Manager $0.05 per 10,000 calls (a warm worker caches a user's secrets for 5 \
              minutes, so real traffic calls it less); Lambda $0.20/M requests and \
              $0.0000166667 per GB-s (x86), memory as in template.yaml (256/512/256 MB), duration \
              as measured here in process against the emulators, batches of up to 10; the \
              sweeper runs once a minute whatever the traffic and is not counted per task; the \
              default settings (heartbeat every 5 s, progress coalesced to one write per heartbeat)."
    );
}

fn short(operation: &str) -> &str {
    operation.rsplit('.').next().unwrap_or(operation)
}

/// Whether every task of `ids` exists and satisfies `done`.
async fn every_task(rt: &Runtime, ids: &[TaskId], done: impl Fn(&Task) -> bool) -> bool {
    for id in ids {
        match rt.services.tasks.get(id).await {
            Ok(Some(task)) if done(&task) => {}
            _ => return false,
        }
    }
    true
}
