//! What waiting on the AI costs: one task whose AI call takes 90 s, three ways.
//!
//! `cargo bench -p longrun-tests --bench wait_cost`
//!
//! - (a) `refine_output`, the worker waiting on the synchronous call at 512 MB (the worker's
//!   size before it was right-sized): the baseline;
//! - (b) the same run priced at the worker's 128 MB (`template.yaml`);
//! - (c) `refine_offloaded`: the call runs at the provider in its background mode, and the
//!   task sleeps between checks (every 10 s, `ctx.poll`), each check a short invocation.
//!
//! Intake, the worker and delivery run in process over the real adapters (dynoxide, moto), the
//! queues played as Lambda's event source mapping plays them, each function's AWS requests
//! counted by operation; the fake OpenAI server takes the 90 s (`LONGRUN_BENCH_AI_SECONDS`
//! shortens it). Lambda time is what the invocations took here. Printed: GB-seconds, requests
//! by operation, DynamoDB units and dollars per million tasks at list price, with ratios to
//! (a). Goals: (c) ≤ 1/50 of (a)'s GB-seconds and ≤ 1/10 of its total; (a)'s orchestration
//! ≤ $5 per million.
//!
//! Needs moto (`pip install 'moto[server]'`) and says so if it is missing.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use longrun::config::Config;
use longrun::task::TaskId;
use longrun::{Runtime, Settings};
use longrun_aws::AwsClients;
use longrun_aws::chat::HttpChat;
use longrun_tests::cost::{ASSUMPTIONS, Bill, Phase, Role, drain, every_task};
use longrun_tests::counting::RequestCounter;
use longrun_tests::dynamo::Dynoxide;
use longrun_tests::fake_chat::FakeChat;
use longrun_tests::fake_openai::FakeOpenAi;
use longrun_tests::moto::Moto;
use serde_json::json;

const KEY: &str = "sk-bench-not-a-real-key";
/// Intake's and delivery's memory in template.yaml, in GB.
const SMALL_GB: f64 = 0.25;
/// The worker's memory before it was right-sized, in GB.
const OLD_WORKER_GB: f64 = 0.5;
/// The worker's memory in template.yaml, in GB.
const WORKER_GB: f64 = 0.125;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(run());
}

fn ai_seconds() -> u64 {
    std::env::var("LONGRUN_BENCH_AI_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(90)
}

async fn run() {
    let Some(moto) = Moto::start().await else {
        eprintln!("wait_cost: moto is not installed; nothing measured");
        return;
    };
    let dynoxide = Dynoxide::start().await.expect("dynoxide");
    let openai = FakeOpenAi::start().await.expect("fake OpenAI");
    openai.expect_key(KEY);
    let chat = FakeChat::start().await.expect("fake chat");
    let ai = ai_seconds();
    let input = format!("Refine this, please. [[delay={}]]", ai * 1000);
    let sync = Pipeline::start("sync", &moto, &dynoxide, &openai, &chat).await;
    let offloaded = Pipeline::start("offload", &moto, &dynoxide, &openai, &chat).await;
    println!("one task whose AI call takes {ai} s, run two ways side by side…");
    let started = Instant::now();
    let (sync, offloaded) = tokio::join!(
        sync.one_task("refine_output", &input),
        offloaded.one_task("refine_offloaded", &input)
    );
    println!("(measured in {:.0} s)", started.elapsed().as_secs_f64());
    let a = Bill::of(
        &[
            (&sync[0], SMALL_GB),
            (&sync[1], OLD_WORKER_GB),
            (&sync[2], SMALL_GB),
        ],
        1,
    );
    let b = Bill::of(
        &[
            (&sync[0], SMALL_GB),
            (&sync[1], WORKER_GB),
            (&sync[2], SMALL_GB),
        ],
        1,
    );
    let c = Bill::of(
        &[
            (&offloaded[0], SMALL_GB),
            (&offloaded[1], WORKER_GB),
            (&offloaded[2], SMALL_GB),
        ],
        1,
    );
    let busy = [sync[1].busy, sync[1].busy, offloaded[1].busy];
    print_table(ai, &[&a, &b, &c], busy);
}

/// The pipeline for one scenario: its own table and queues, and one runtime per function so
/// each function's requests are counted apart.
struct Pipeline {
    intake: (Runtime, RequestCounter),
    worker: (Runtime, RequestCounter),
    delivery: (Runtime, RequestCounter),
    poll: aws_sdk_sqs::Client,
    config: Config,
    user: String,
}

impl Pipeline {
    async fn start(
        name: &str,
        moto: &Moto,
        dynoxide: &Dynoxide,
        openai: &FakeOpenAi,
        chat: &FakeChat,
    ) -> Self {
        let user = format!("bench-{name}");
        let (config, moto_sdk, dynamo_sdk) = longrun_tests::cost::deploy(
            &format!("cost-{name}"),
            moto,
            dynoxide,
            &chat.url,
            &user,
            KEY,
        )
        .await;
        let function = || {
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
                Settings::default(),
            );
            (rt, counter)
        };
        Self {
            intake: function(),
            worker: function(),
            delivery: function(),
            poll: aws_sdk_sqs::Client::new(&moto_sdk),
            config: config.clone(),
            user,
        }
    }

    /// Intake, worker and delivery of one call to `function`: their phases, in that order.
    async fn one_task(&self, function: &str, input: &str) -> [Phase; 3] {
        let (rt, counter) = &self.intake;
        let before = counter.snapshot();
        let started = Instant::now();
        let event = json!({"action": "call", "ext": text_tools::NAME, "user": self.user,
                           "chat": format!("chat-{}", self.user), "request_id": ulid::Ulid::new().to_string(),
                           "function": function, "params": {"input": input}});
        let response = longrun::intake::handle(rt, event).await;
        let task_id: TaskId = response.result.expect("an ack").data.expect("ack data")["task_id"]
            .as_str()
            .expect("a task id")
            .parse()
            .expect("a ULID");
        let intake = Phase {
            requests: counter.since(&before),
            invocations: 1,
            busy: started.elapsed(),
        };
        let ids = [task_id];
        let limit = Duration::from_secs(ai_seconds() + 180);
        // The worker and delivery run side by side, as their Lambdas do.
        let (worker, delivery) = tokio::join!(
            drain(
                &self.worker.0,
                &self.poll,
                &self.worker.1,
                &self.config.work_queue_url,
                Role::Worker,
                limit,
                || every_task(rt, &ids, |t| t.state.is_terminal()),
            ),
            drain(
                &self.delivery.0,
                &self.poll,
                &self.delivery.1,
                &self.config.delivery_queue_url,
                Role::Delivery,
                limit,
                || every_task(rt, &ids, |t| t.delivered_at.is_some()),
            )
        );
        let task = rt
            .services
            .tasks
            .get(&ids[0])
            .await
            .expect("the task")
            .expect("the task");
        assert!(
            task.result.as_ref().is_some_and(|r| r.ok) && task.delivered_at.is_some(),
            "{function} did not succeed and deliver: {task:?}"
        );
        [intake, worker, delivery]
    }
}

/// The table of the three bills, and the time the worker was busy in each.
fn print_table(ai: u64, bills: &[&Bill; 3], worker_busy: [Duration; 3]) {
    let [a, _, c] = bills;
    println!();
    println!("one task, AI call of {ai} s; per task; $ per million tasks at list price");
    println!(
        "| | (a) synchronous wait, 512 MB | (b) synchronous wait, 128 MB | (c) background call + durable sleeps |"
    );
    println!("|---|---|---|---|");
    let row = |name: &str, cell: &dyn Fn(&Bill) -> String| {
        let cells: Vec<String> = bills.iter().map(|b| cell(b)).collect();
        println!("| {name} | {} |", cells.join(" | "));
    };
    row("Lambda invocations", &|b| format!("{:.0}", b.invocations));
    let busy: Vec<String> = worker_busy
        .iter()
        .map(|d| format!("{:.2} s", d.as_secs_f64()))
        .collect();
    println!("| worker busy | {} |", busy.join(" | "));
    row("Lambda GB-s", &|b| format!("{:.3}", b.gb_s));
    row("GB-s ÷ (a)", &|b| format!("{:.4}", b.gb_s / a.gb_s));
    let ops: BTreeSet<&String> = bills.iter().flat_map(|b| b.requests.keys()).collect();
    for op in ops {
        row(&format!("{op} requests"), &|b| {
            format!("{:.0}", b.requests.get(op).copied().unwrap_or(0.0))
        });
    }
    row("AWS requests, all", &|b| {
        format!("{:.0}", b.total_requests())
    });
    row("DynamoDB WRU / RRU", &|b| {
        format!("{:.0} / {:.0}", b.wru, b.rru)
    });
    row("$ Lambda duration", &|b| {
        format!("{:.2}", b.lambda_duration_dollars())
    });
    row("$ Lambda requests", &|b| {
        format!("{:.2}", b.lambda_request_dollars())
    });
    row("$ DynamoDB", &|b| format!("{:.2}", b.dynamodb_dollars()));
    row("$ SQS", &|b| format!("{:.2}", b.sqs_dollars()));
    row("$ Secrets Manager", &|b| {
        format!("{:.2}", b.secrets_dollars())
    });
    row("$ orchestration (all but duration)", &|b| {
        format!("{:.2}", b.orchestration_dollars())
    });
    row("**$ total**", &|b| format!("**{:.2}**", b.total_dollars()));
    row("total ÷ (a)", &|b| {
        format!("{:.3}", b.total_dollars() / a.total_dollars())
    });
    println!();
    let gb_ratio = a.gb_s / c.gb_s;
    let dollar_ratio = a.total_dollars() / c.total_dollars();
    println!(
        "(c) uses 1/{gb_ratio:.0} of (a)'s GB-seconds (goal ≥ 50: {}) and costs 1/{dollar_ratio:.1} of its total (goal ≥ 10: {}); (a)'s orchestration ${:.2} per million (goal ≤ $5: {})",
        met(gb_ratio >= 50.0),
        met(dollar_ratio >= 10.0),
        a.orchestration_dollars(),
        met(a.orchestration_dollars() <= 5.0),
    );
    println!("assumptions: {ASSUMPTIONS}.");
}

fn met(yes: bool) -> &'static str {
    if yes { "met" } else { "NOT met" }
}
