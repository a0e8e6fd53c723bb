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

use std::sync::Arc;
use std::time::{Duration, Instant};

use longrun::config::Config;
use longrun::task::TaskId;
use longrun::{Runtime, Settings};
use longrun_aws::AwsClients;
use longrun_aws::chat::HttpChat;
use longrun_tests::cost::{ASSUMPTIONS, Bill, Phase, Role, drain, every_task, price};
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

/// Memory of the functions in template.yaml, in GB.
const INTAKE_GB: f64 = 0.25;
const WORKER_GB: f64 = 0.125;
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

    let (config, moto_sdk, dynamo_sdk) =
        longrun_tests::cost::deploy("bench", &moto, &dynoxide, &chat.url, USER, KEY).await;
    let counter = RequestCounter::default();
    let clients = AwsClients {
        dynamodb: counter.dynamodb(&dynamo_sdk),
        sqs: counter.sqs(&moto_sdk),
        secrets: counter.secrets(&moto_sdk),
    };
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
    let poll = aws_sdk_sqs::Client::new(&moto_sdk);
    cost(&rt, &poll, &config, &counter, &chat).await;
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

async fn cost(
    rt: &Runtime,
    poll: &aws_sdk_sqs::Client,
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
    let limit = Duration::from_secs(60);
    // Worker: the work queue played as Lambda's poller does, batches of up to 10.
    let worker = drain(
        rt,
        poll,
        counter,
        &config.work_queue_url,
        Role::Worker,
        limit,
        || every_task(rt, &ids, |t| t.state.is_terminal()),
    )
    .await;
    // Delivery: progress and results to the chat.
    let delivery = drain(
        rt,
        poll,
        counter,
        &config.delivery_queue_url,
        Role::Delivery,
        limit,
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

fn print_cost(intake: &Phase, worker: &Phase, delivery: &Phase) {
    println!();
    println!("AWS requests per background task (refine_output, {TASKS} tasks, end to end)");
    for (name, phase) in [
        ("intake", intake),
        ("worker", worker),
        ("delivery", delivery),
    ] {
        let bill = Bill::of(&[(phase, 0.0)], TASKS);
        println!(
            "  {name:<8} {:.2} invocations/task; {}",
            bill.invocations,
            bill.requests_line()
        );
    }
    let bill = Bill::of(
        &[
            (intake, INTAKE_GB),
            (worker, WORKER_GB),
            (delivery, DELIVERY_GB),
        ],
        TASKS,
    );
    println!(
        "  total    {:.2} AWS requests per task",
        bill.total_requests()
    );
    println!();
    println!("dollars per million background tasks, list price (us-east-1)");
    println!(
        "  DynamoDB   ${:>8.2}  ({:.1} WRU + {:.1} RRU per task)",
        bill.dynamodb_dollars(),
        bill.wru,
        bill.rru
    );
    println!(
        "  SQS        ${:>8.2}  ({:.2} requests per task, the poller's included)",
        bill.sqs_dollars(),
        bill.sqs
    );
    println!(
        "  Secrets    ${:>8.2}  ({:.2} GetSecretValue per task)",
        bill.secrets_dollars(),
        bill.secrets
    );
    println!(
        "  Lambda req ${:>8.2}  ({:.2} invocations per task)",
        bill.lambda_request_dollars(),
        bill.invocations
    );
    println!(
        "  Lambda GB-s${:>8.2}  ({:.4} GB-s per task, measured here)",
        bill.lambda_duration_dollars(),
        bill.gb_s
    );
    println!(
        "  total      ${:>8.2}  per million tasks, before the AI call's own time",
        bill.total_dollars()
    );
    let per_minute_of_ai = 60.0 * WORKER_GB * price::LAMBDA_PER_GB_S * 1e6;
    println!(
        "  + ${per_minute_of_ai:.2} per million tasks for each minute the worker waits on the AI \
         ({} MB × 60 s; see the wait_cost bench)",
        (WORKER_GB * 1024.0) as u32
    );
    println!(
        "assumptions: {ASSUMPTIONS}; memory as in template.yaml; batches of up to 10; the default \
         settings (heartbeat every 5 s, progress coalesced to one write per heartbeat)."
    );
}
