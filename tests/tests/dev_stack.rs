//! The dev stack (`longrun dev`) in-process: a background task end to end through its web API
//! and event stream, its DynamoDB endpoint read with the AWS SDK, the seed demo with and
//! without a key, restarts on the same state folder, and its SQS API under the SQS helpers the
//! CLI uses.

use std::path::Path;
use std::time::Duration;

use longrun::Settings;
use longrun_dev::chat::ChatEventBody;
use longrun_dev::simulator::{LABEL, Latency};
use longrun_dev::{DevOptions, DevStack, Model, demo};
use serde_json::{Value, json};

/// A folder under the system temp dir, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "longrun-devstack-{name}-{}-{}",
            std::process::id(),
            ulid::Ulid::new()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fast_settings() -> Settings {
    Settings {
        heartbeat: Duration::from_millis(100),
        progress_interval: Duration::from_millis(50),
        lease: Duration::from_secs(3),
        cancel_grace: Duration::from_millis(200),
        ..Settings::default()
    }
}

fn options(state: &Path, model: Model) -> DevOptions {
    let mut options = DevOptions::new(state);
    options.settings = fast_settings();
    options.model = model;
    options.pipeline.sweep_every = Duration::from_millis(500);
    options
}

fn simulated() -> Model {
    Model::Simulated(Latency {
        min: Duration::from_millis(300),
        max: Duration::from_millis(500),
    })
}

/// A model endpoint nothing listens on: the tests that use it never get as far as calling it.
fn unreachable_model() -> Model {
    Model::At("http://127.0.0.1:9/v1".to_owned())
}

async fn post_intake(url: &str, event: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{url}/api/intake"))
        .json(&event)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

fn call(function: &str, params: Value) -> Value {
    json!({"action":"call","ext":"text-tools","user":"dev-user","chat":"dev-chat","function":function,"params":params})
}

/// Reads the page's event stream until `done` says stop; returns the events (bounded).
async fn read_events(url: &str, mut done: impl FnMut(&[Value]) -> bool) -> Vec<Value> {
    let mut response = reqwest::Client::new()
        .get(format!("{url}/api/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut events = Vec::new();
    let mut buffer = String::new();
    let read = async {
        while let Some(chunk) = response.chunk().await.unwrap() {
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let frame: String = buffer.drain(..end + 2).collect();
                if let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) {
                    events.push(serde_json::from_str::<Value>(data).unwrap());
                }
            }
            if done(&events) {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .unwrap_or_else(|_| panic!("the event stream never had it; events: {events:#?}"));
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_task_goes_from_ack_to_progress_to_a_chat_message() {
    // GIVEN a dev stack with the model simulator
    let dir = TempDir::new("e2e");
    let stack = DevStack::builder(text_tools::extension_at)
        .options(options(&dir.0, simulated()))
        .start()
        .await
        .unwrap();
    let url = stack.url().to_owned();

    // WHEN the page calls a background function
    let (status, answer) = post_intake(
        &url,
        call("refine_output", json!({"input": "u r gonna love it"})),
    )
    .await;

    // THEN the ack comes at once, with the task id
    assert_eq!(status, 200, "{answer}");
    let ack = &answer["result"];
    assert_eq!(
        ack["summary"],
        "Started 'refine_output' in background — the result will be sent to chat when it finishes."
    );
    let task_id = ack["data"]["task_id"].as_str().unwrap().to_owned();

    // AND the event stream shows the call, the ack, progress, then the result as a new message
    let events = read_events(&url, |events| {
        events
            .iter()
            .any(|e| e["kind"] == "result" && e["task_id"] == task_id.as_str())
    })
    .await;
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"call"), "{kinds:?}");
    assert!(kinds.contains(&"reply"), "{kinds:?}");
    let progress: Vec<u64> = events
        .iter()
        .filter(|e| e["kind"] == "progress")
        .map(|e| e["progress"]["pct"].as_u64().unwrap())
        .collect();
    assert!(
        progress.iter().any(|p| (1..100).contains(p)),
        "no progress between 0 and 100: {progress:?}"
    );
    let result = events.iter().find(|e| e["kind"] == "result").unwrap();
    assert_eq!(result["result"]["ok"], true);
    assert_eq!(result["result"]["summary"], "Refined output ready! 🎉");
    let text = result["result"]["data"]["text"].as_str().unwrap();
    assert!(text.starts_with(LABEL), "{text}");
    assert!(text.ends_with("You are going to love it."), "{text}");
    assert_eq!(result["chat"], "dev-chat");

    // AND the record in DynamoDB (read through the endpoint the stack prints) tells the story
    let dynamo = longrun_tests::dynamo::client(&stack.endpoints().dynamodb_endpoint).await;
    let store = longrun_aws::dynamodb::DynamoTaskStore::new(
        dynamo,
        "longrun-tasks",
        Duration::from_secs(3600),
    );
    use longrun::ports::TaskStore;
    let id: longrun::TaskId = task_id.parse().unwrap();
    let task = store
        .get(&id)
        .await
        .unwrap()
        .expect("the task is in the table");
    assert_eq!(task.state, longrun::TaskState::Succeeded);
    let trail = store.audit_trail(&id).await.unwrap();
    assert!(
        trail.iter().any(|a| a.audit_id == "delivered#result"),
        "{trail:?}"
    );

    // AND the stack's own list answers the page's task list
    let (_, listed) = post_intake(
        &url,
        json!({"action":"list","ext":"text-tools","user":"dev-user"}),
    )
    .await;
    assert_eq!(listed["tasks"][0]["task_id"], task_id.as_str());

    // AND nothing is left in the queues
    let queues = stack.queues().clone();
    tokio::time::timeout(Duration::from_secs(10), async {
        while queues.all().iter().any(|q| q.depth() + q.in_flight() > 0) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the queues drain");
    stack.shutdown().await;
    assert!(
        !dir.0.join("dev.json").exists(),
        "dev.json is removed at shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_serves_the_providers_background_mode() {
    // GIVEN a dev stack whose simulated model takes 3 s on a response
    let dir = TempDir::new("offload");
    let model = Model::Simulated(Latency {
        min: Duration::from_millis(3000),
        max: Duration::from_millis(3000),
    });
    let stack = DevStack::builder(text_tools::extension_at)
        .options(options(&dir.0, model))
        .start()
        .await
        .unwrap();
    let url = stack.url().to_owned();
    // WHEN the page calls the function that runs the AI call at the provider
    let (status, answer) = post_intake(
        &url,
        call("refine_offloaded", json!({"input": "thx, u r great"})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let task_id = answer["result"]["data"]["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // THEN the chat sees the provider's status as progress, then the simulated answer
    let events = read_events(&url, |events| {
        events
            .iter()
            .any(|e| e["kind"] == "result" && e["task_id"] == task_id.as_str())
    })
    .await;
    let messages: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "progress")
        .filter_map(|e| e["progress"]["message"].as_str())
        .collect();
    assert!(
        messages.contains(&"Queued at the AI provider"),
        "{messages:?}"
    );
    let result = events.iter().find(|e| e["kind"] == "result").unwrap();
    assert_eq!(result["result"]["ok"], true, "{result}");
    let text = result["result"]["data"]["text"].as_str().unwrap();
    assert!(text.starts_with(LABEL), "{text}");
    assert!(text.ends_with("Thanks, you are great."), "{text}");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_demo_without_a_key_answers_openai_key_not_connected() {
    let dir = TempDir::new("no-key");
    let stack = DevStack::builder(text_tools::extension_at)
        .options(options(&dir.0, unreachable_model()))
        .start()
        .await
        .unwrap();
    let report = demo::run(&stack, None, "dev-user", "dev-chat").await;
    assert!(report.complete, "{report:?}");
    assert_eq!(report.lines.len(), 3);
    assert!(
        report.lines[0].starts_with("A refine: answered inline — ✖ OpenAI key not connected"),
        "{report:?}"
    );
    assert!(
        report.lines[1].starts_with("B refine_output: acked at once; result delivered to the chat — ✖ OpenAI key not connected"),
        "{report:?}"
    );
    assert!(
        report.lines[2].contains("✖ OpenAI key not connected"),
        "{report:?}"
    );
    // The error reached the chat as a fresh message, marked as an error.
    let results: Vec<_> = stack
        .chat()
        .in_chat("dev-chat")
        .into_iter()
        .filter(|e| matches!(e.body, ChatEventBody::Result { .. }))
        .collect();
    assert_eq!(results.len(), 1);
    assert!(results[0].body.is_error());
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_demo_runs_the_three_patterns_end_to_end_with_the_simulator() {
    let dir = TempDir::new("demo");
    let stack = DevStack::builder(text_tools::extension_at)
        .options(options(&dir.0, simulated()))
        .start()
        .await
        .unwrap();
    let report = demo::run(&stack, None, "dev-user", "dev-chat").await;
    assert!(report.complete, "{report:?}");
    assert_eq!(
        report.lines,
        vec![
            "A refine: answered inline — ✔ Refined text ready!".to_owned(),
            "B refine_output: acked at once; result delivered to the chat — ✔ Refined output ready! 🎉".to_owned(),
            "C start_refinement: acked at once; result delivered to the chat — ✔ Refined output ready! 🎉".to_owned(),
        ]
    );
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_outlive_the_stack_and_a_second_stack_on_the_folder_is_refused() {
    let dir = TempDir::new("restart");
    let stack = DevStack::builder(text_tools::extension_at)
        .options(options(&dir.0, unreachable_model()))
        .start()
        .await
        .unwrap();
    // A second stack on the same folder would share its database: refused.
    let Err(refused) = DevStack::builder(text_tools::extension_at)
        .options(options(&dir.0, unreachable_model()))
        .start()
        .await
    else {
        panic!("a second stack started on the same state folder");
    };
    assert!(refused.to_string().contains("already runs"), "{refused}");

    let answer = stack
        .call(call("refine_output", json!({"input": "x"})))
        .await;
    let task_id = answer.result.unwrap().data.unwrap()["task_id"].clone();
    let status = json!({"action":"status","ext":"text-tools","user":"dev-user","task_id":task_id});
    tokio::time::timeout(Duration::from_secs(30), async {
        while stack
            .call(status.clone())
            .await
            .task
            .unwrap()
            .delivered_at
            .is_none()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the task finished and was delivered");
    stack.shutdown().await;

    // WHEN the stack starts again on the same folder THEN the task is still there
    let again = DevStack::builder(text_tools::extension_at)
        .options(options(&dir.0, unreachable_model()))
        .start()
        .await
        .unwrap();
    let listed = again
        .call(json!({"action":"list","ext":"text-tools","user":"dev-user"}))
        .await;
    let tasks = listed.tasks.unwrap();
    assert_eq!(tasks.len(), 1);
    assert_eq!(json!(tasks[0].task_id), task_id);
    assert!(tasks[0].delivered_at.is_some());
    again.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_sqs_api_answers_the_sqs_helpers_the_cli_uses() {
    let dir = TempDir::new("sqs");
    let stack = DevStack::builder(text_tools::extension_at)
        .options(options(&dir.0, unreachable_model()))
        .start()
        .await
        .unwrap();
    let e = stack.endpoints().clone();
    let sqs = longrun_tests::moto::sqs_client(&e.sqs_endpoint).await;
    // The queues are there by name, with their dead-letter policy.
    let url = sqs
        .get_queue_url()
        .queue_name("longrun-delivery-dlq")
        .send()
        .await
        .unwrap();
    assert_eq!(url.queue_url(), Some(e.delivery_dlq_url.as_str()));
    let arn = longrun_aws::sqs::queue_arn(&sqs, &e.delivery_dlq_url)
        .await
        .unwrap();
    assert_eq!(
        arn,
        "arn:aws:sqs:us-east-1:000000000000:longrun-delivery-dlq"
    );
    // Messages go in, are counted, peeked, and redriven to the main queue.
    longrun_aws::sqs::send_batch(&sqs, &e.work_dlq_url, &["not a task".to_owned()])
        .await
        .unwrap();
    let delivery_dlq = &e.delivery_dlq_url;
    longrun_aws::sqs::send_batch(
        &sqs,
        delivery_dlq,
        &[
            r#"{"kind":"gossip"}"#.to_owned(),
            r#"{"kind":"gossip"}"#.to_owned(),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        longrun_aws::sqs::depth(&sqs, delivery_dlq).await.unwrap(),
        2
    );
    let peeked = longrun_aws::sqs::receive(&sqs, delivery_dlq, 10, 0, Some(0))
        .await
        .unwrap();
    assert_eq!(peeked.len(), 2);
    assert!(peeked.iter().all(|m| m.receive_count == 1));
    assert_eq!(
        longrun_aws::sqs::depth(&sqs, delivery_dlq).await.unwrap(),
        2
    );
    let moved = longrun_aws::sqs::redrive(&sqs, delivery_dlq, &e.delivery_queue_url, 100)
        .await
        .unwrap();
    assert_eq!(moved, 2);
    assert_eq!(
        longrun_aws::sqs::depth(&sqs, delivery_dlq).await.unwrap(),
        0
    );
    // An unknown queue is "not found", as on SQS.
    let missing =
        longrun_aws::sqs::depth(&sqs, &format!("{}/000000000000/nope", e.sqs_endpoint)).await;
    assert!(
        matches!(missing, Err(longrun::ports::PortError::NotFound(_))),
        "{missing:?}"
    );
    // The sweeper ends what lands in the work DLQ (here: a malformed message, dropped).
    tokio::time::timeout(Duration::from_secs(30), async {
        while longrun_aws::sqs::depth(&sqs, &e.work_dlq_url)
            .await
            .unwrap()
            > 0
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the sweeper drains the work DLQ");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_web_pages_cannot_use_the_api() {
    let dir = TempDir::new("origin");
    let stack = DevStack::builder(text_tools::extension_at)
        .options(options(&dir.0, unreachable_model()))
        .start()
        .await
        .unwrap();
    let url = format!("{}/api/intake", stack.url());
    let event = call("refine_output", json!({"input": "x"})).to_string();
    let http = reqwest::Client::new();
    // A form post from another page (no preflight needed for text/plain): refused.
    let plain = http
        .post(&url)
        .header("content-type", "text/plain")
        .body(event.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 415);
    // A script on another origin: refused.
    let foreign = http
        .post(&url)
        .header("content-type", "application/json")
        .header("origin", "http://evil.example")
        .body(event.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), 403);
    // A page whose name resolves to 127.0.0.1 (DNS rebinding): refused, reads included.
    let rebound = http
        .get(format!("{}/api/tools", stack.url()))
        .header("host", "evil.example:8787")
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), 421);
    // Nothing was called.
    assert!(stack.chat().events_after(0).is_empty());
    // The page itself, and tools without an Origin (curl, the CLI), are served.
    let own = http
        .post(&url)
        .header("content-type", "application/json")
        .header("origin", stack.url())
        .body(event)
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200);
    let page = http.get(stack.url()).send().await.unwrap();
    assert!(page.text().await.unwrap().contains("<title>longrun dev"));
    stack.shutdown().await;
}
