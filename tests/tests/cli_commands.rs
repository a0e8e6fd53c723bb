//! The `longrun` commands as a user runs them — the built binary, its output and its exit
//! code — against a running `longrun dev` (dynoxide, the in-process queues behind the local SQS
//! API, the secrets file): `call`, `tasks list|show|cancel|retry`, `dlq list|redrive`,
//! `secrets set|delete`, `usage show|reset`, `bootstrap`, and `call` of a "deployed" intake
//! over the Lambda Invoke API.

mod dev_support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dev_support::{DevProcess, FAST_SETTINGS, Run, TempDir, longrun, longrun_env};
use serde_json::{Value, json};

/// The simulator's mark on every answer.
const SIMULATED: &str = "(simulated answer";

fn fast_dev(name: &str, latency: &str) -> DevProcess {
    // Both binaries built before any stack starts: a build (a minute, cold) never runs down
    // a scenario's own time limits.
    dev_support::longrun_binary();
    DevProcess::start(
        name,
        &[
            "--no-demo",
            "--simulate-model",
            "--simulate-latency-ms",
            latency,
        ],
        FAST_SETTINGS,
    )
}

fn task_id(run: &Run) -> String {
    let json = run.json();
    json["task"]["task_id"]
        .as_str()
        .or_else(|| json["response"]["result"]["data"]["task_id"].as_str())
        .unwrap_or_else(|| panic!("no task id in {json}"))
        .to_owned()
}

/// `tasks show ID --json` until `done` holds for the task (bounded).
async fn show_until(
    dev: &DevProcess,
    id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let started = Instant::now();
    loop {
        let run = longrun(
            dev.state.path(),
            &["--local", "tasks", "show", id, "--json"],
            None,
        )
        .await;
        assert_eq!(run.code, 0, "{run:?}");
        let shown = run.json();
        if done(&shown["task"]) {
            return shown;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "task {id} never became {what}: {shown}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_prints_the_ack_follows_the_progress_and_prints_the_result() {
    let dev = fast_dev("cli-call", "300..500");
    let state = dev.state.path();

    // Pattern B: the ack at once, a progress bar, then the result; exit 0.
    let run = longrun(
        state,
        &[
            "call",
            "refine_output",
            "--params",
            r#"{"input":"pls make this better"}"#,
        ],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("↩ Started 'refine_output' in background — the result will be sent to chat when it finishes."),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("✔ Refined output ready! 🎉"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains(SIMULATED), "{}", run.stdout);
    assert!(run.stderr.contains('%'), "no progress bar: {}", run.stderr);

    // Pattern A answers inline.
    let run = longrun(
        state,
        &["call", "refine", "--params", r#"{"input":"u r great"}"#],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("✔ Refined text ready!"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("You are great."), "{}", run.stdout);

    // Pattern C: the custom ack, then the job's result.
    let run = longrun(
        state,
        &[
            "call",
            "start_refinement",
            "--params",
            r#"{"input":"hi","fast_path":false}"#,
        ],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("↩ Got it — refining"), "{}", run.stdout);
    assert!(
        run.stdout.contains("✔ Refined output ready! 🎉"),
        "{}",
        run.stdout
    );

    // An error result exits 1: a user without a key gets the seed's answer.
    let run = longrun(
        state,
        &[
            "call",
            "refine_output",
            "--user",
            "no-key-user",
            "--params",
            r#"{"input":"x"}"#,
        ],
        None,
    )
    .await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout.contains("✖ OpenAI key not connected"),
        "{}",
        run.stdout
    );

    // --json: one object with the response and the finished task.
    let run = longrun(
        state,
        &[
            "call",
            "refine_output",
            "--json",
            "--params",
            r#"{"input":"x"}"#,
        ],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let json = run.json();
    assert_eq!(json["task"]["state"], "succeeded");
    assert_eq!(json["task"]["result"]["ok"], true);
    assert_eq!(json["response"]["status"], 200);

    // Mistakes get the exit codes scripts can trust.
    let run = longrun(state, &["call", "nope"], None).await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stderr.contains("no function named"), "{}", run.stderr);
    let run = longrun(state, &["call", "refine", "--params", "{not json"], None).await;
    assert_eq!(run.code, 2, "{run:?}");
    let run = longrun(
        state,
        &["call", "refine", "--params", r#"{"input":5}"#],
        None,
    )
    .await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("422"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_list_show_cancel_retry_and_bootstrap_work_on_the_local_stack() {
    let dev = fast_dev("cli-tasks", "100..200");
    let state = dev.state.path();
    let run = longrun(
        state,
        &[
            "call",
            "refine_output",
            "--json",
            "--params",
            r#"{"input":"a"}"#,
        ],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let id = task_id(&run);

    // usage: the tokens the simulated AI call reported, charged to the user's daily budget;
    // reset forgets them
    let usage = |command: &'static str| {
        let mut args = vec![
            "--local",
            "usage",
            command,
            "--ext",
            "text-tools",
            "--user",
            "dev-user",
        ];
        if command == "show" {
            args.push("--json");
        }
        async move { longrun(state, &args, None).await }
    };
    let run = usage("show").await;
    assert_eq!(run.code, 0, "{run:?}");
    let shown = run.json();
    assert!(shown["used"]["ai_tokens"].as_u64().unwrap() > 0, "{shown}");
    let run = usage("reset").await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(usage("show").await.json()["used"], json!({}));

    // list: a table by default, JSON with --json, filtered by --state
    let run = longrun(
        state,
        &[
            "--local",
            "tasks",
            "list",
            "--ext",
            "text-tools",
            "--user",
            "dev-user",
        ],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains(&id) && run.stdout.contains("succeeded"),
        "{}",
        run.stdout
    );
    let run = longrun(
        state,
        &[
            "--local",
            "tasks",
            "list",
            "--ext",
            "text-tools",
            "--user",
            "dev-user",
            "--json",
        ],
        None,
    )
    .await;
    let tasks = run.json();
    assert!(
        tasks
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["task_id"] == id.as_str())
    );
    let run = longrun(
        state,
        &[
            "--local",
            "tasks",
            "list",
            "--ext",
            "text-tools",
            "--user",
            "dev-user",
            "--state",
            "running",
            "--json",
        ],
        None,
    )
    .await;
    assert_eq!(run.json(), json!([]));

    // show: record, timings and the audit trail
    let run = longrun(state, &["--local", "tasks", "show", &id], None).await;
    assert_eq!(run.code, 0, "{run:?}");
    for words in [
        "succeeded",
        "delivered#result",
        "created",
        "Refined output ready",
    ] {
        assert!(
            run.stdout.contains(words),
            "{words:?} missing: {}",
            run.stdout
        );
    }

    // cancel of a finished task is a conflict
    let run = longrun(state, &["--local", "tasks", "cancel", &id], None).await;
    assert_eq!(run.code, 4, "{run:?}");

    // retry queues a new task that runs to its result
    let run = longrun(state, &["--local", "tasks", "retry", &id, "--json"], None).await;
    assert_eq!(run.code, 0, "{run:?}");
    let retry = run.json()["task_id"].as_str().unwrap().to_owned();
    assert_ne!(retry, id);
    let shown = show_until(&dev, &retry, "delivered", |t| !t["delivered_at"].is_null()).await;
    assert_eq!(shown["task"]["state"], "succeeded");

    // an unknown task is "not found"
    let run = longrun(
        state,
        &["--local", "tasks", "show", "01JDZQ6V4E1YQ7K3ZC6M4T9H8P"],
        None,
    )
    .await;
    assert_eq!(run.code, 3, "{run:?}");

    // bootstrap finds the stack's table and queues and prints its configuration
    let run = longrun(state, &["--local", "bootstrap"], None).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("LONGRUN_TABLE=longrun-tasks"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!(
            "AWS_ENDPOINT_URL_DYNAMODB={}",
            dev.endpoints["dynamodb_endpoint"].as_str().unwrap()
        )),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("LONGRUN_WORK_QUEUE_URL="),
        "{}",
        run.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_task_is_cancelled_from_the_cli_and_its_caller_hears_so() {
    // GIVEN a model that takes a long while
    let dev = fast_dev("cli-cancel", "20000");
    let state = dev.state.path().to_owned();
    // WHEN a call is being followed
    let follower = {
        let state = state.clone();
        tokio::spawn(async move {
            longrun(
                &state,
                &["call", "refine_output", "--params", r#"{"input":"slow"}"#],
                None,
            )
            .await
        })
    };
    let started = Instant::now();
    let id = loop {
        let run = longrun(
            &state,
            &[
                "--local",
                "tasks",
                "list",
                "--ext",
                "text-tools",
                "--user",
                "dev-user",
                "--state",
                "running",
                "--json",
            ],
            None,
        )
        .await;
        if let Some(task) = run.json().as_array().and_then(|a| a.first().cloned()) {
            break task["task_id"].as_str().unwrap().to_owned();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the task never ran"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // AND an operator cancels it
    let run = longrun(&state, &["--local", "tasks", "cancel", &id], None).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("cancel requested"), "{}", run.stdout);
    // THEN it ends cancelled, long before the model would have answered
    let shown = show_until(&dev, &id, "cancelled", |t| t["state"] == "cancelled").await;
    assert_eq!(
        shown["task"]["result"]["summary"],
        "'refine_output' was cancelled."
    );
    // AND the caller's `call` prints the cancellation and exits 1
    let run = follower.await.unwrap();
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout.contains("✖ 'refine_output' was cancelled."),
        "{}",
        run.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_secrets_are_set_and_deleted_and_the_value_is_never_shown() {
    let dev = fast_dev("cli-secrets", "50..100");
    let state = dev.state.path();
    let call = [
        "call",
        "refine",
        "--user",
        "alice",
        "--params",
        r#"{"input":"hello"}"#,
    ];
    let run = longrun(state, &call, None).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout.contains("OpenAI key not connected"),
        "{}",
        run.stdout
    );

    let value = "sk-test-alice-4f9c2e";
    let set = [
        "--local",
        "secrets",
        "set",
        "--ext",
        "text-tools",
        "--user",
        "alice",
        "openai_api_key",
    ];
    let run = longrun(state, &set, Some(&format!("{value}\n"))).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stderr
            .contains("set openai_api_key for text-tools/alice"),
        "{}",
        run.stderr
    );
    assert!(!run.stdout.contains(value) && !run.stderr.contains(value));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state.join("secrets.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // The running stack uses it at once.
    let run = longrun(state, &call, None).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains(SIMULATED), "{}", run.stdout);

    let delete = [
        "--local",
        "secrets",
        "delete",
        "--ext",
        "text-tools",
        "--user",
        "alice",
        "openai_api_key",
    ];
    assert_eq!(longrun(state, &delete, None).await.code, 0);
    assert_eq!(longrun(state, &delete, None).await.code, 3);
    assert_eq!(longrun(state, &call, None).await.code, 1);
    assert!(
        !dev.log().contains(value),
        "the secret reached the dev stack's output"
    );
    // An empty value is refused.
    assert_eq!(longrun(state, &set, Some("")).await.code, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_queues_are_listed_and_redriven_through_the_local_sqs_api() {
    let dev = fast_dev("cli-dlq", "50..100");
    let state = dev.state.path();
    let run = longrun(
        state,
        &[
            "call",
            "refine_output",
            "--json",
            "--params",
            r#"{"input":"a"}"#,
        ],
        None,
    )
    .await;
    let id = task_id(&run);
    let run = longrun(
        state,
        &["--local", "dlq", "list", "delivery", "--json"],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.json()["depth"], 0);

    // GIVEN the task's result message parked in the delivery DLQ (as after a chat outage)
    let sqs =
        longrun_tests::moto::sqs_client(dev.endpoints["sqs_endpoint"].as_str().unwrap()).await;
    sqs.send_message()
        .queue_url(dev.endpoints["delivery_dlq_url"].as_str().unwrap())
        .message_body(json!({"kind": "result", "task_id": id}).to_string())
        .send()
        .await
        .expect("SendMessage to the local SQS API");
    // THEN `dlq list` shows it, and leaves it there
    for _ in 0..2 {
        let run = longrun(
            state,
            &["--local", "dlq", "list", "delivery", "--json"],
            None,
        )
        .await;
        let listed = run.json();
        assert_eq!(listed["depth"], 1, "{listed}");
        assert_eq!(listed["messages"][0]["body"]["task_id"], id.as_str());
    }
    // WHEN it is redriven
    let run = longrun(state, &["--local", "dlq", "redrive", "delivery"], None).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("1 message(s) moved back"),
        "{}",
        run.stdout
    );
    // THEN the DLQ is empty, and the already-delivered result is not posted twice
    let started = Instant::now();
    loop {
        let depth =
            longrun_tests::moto::sqs_client(dev.endpoints["sqs_endpoint"].as_str().unwrap())
                .await
                .get_queue_attributes()
                .queue_url(dev.endpoints["delivery_queue_url"].as_str().unwrap())
                .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
                .send()
                .await
                .unwrap();
        let attributes = depth.attributes().unwrap();
        let waiting: u64 = attributes
            [&aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages]
            .parse()
            .unwrap();
        let in_flight: u64 = attributes
            [&aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible]
            .parse()
            .unwrap();
        if waiting + in_flight == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "redriven message never handled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let run = longrun(state, &["--local", "tasks", "show", &id, "--json"], None).await;
    let delivered = run.json()["audit"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["audit_id"] == "delivered#result")
        .count();
    assert_eq!(delivered, 1);
    let run = longrun(
        state,
        &["--local", "dlq", "list", "delivery", "--json"],
        None,
    )
    .await;
    assert_eq!(run.json()["depth"], 0);
    let run = longrun(state, &["--local", "dlq", "list", "work"], None).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("0 message(s)"), "{}", run.stdout);
}

/// A Lambda Invoke API that forwards each invocation of `longrun-intake` to the dev stack's
/// intake, records what it saw, and knows no other function.
async fn fake_lambda(dev_url: String) -> (String, Arc<Mutex<Vec<(String, String)>>>) {
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    type Seen = Arc<Mutex<Vec<(String, String)>>>;
    let seen: Seen = Arc::default();
    let app = axum::Router::new()
        .route(
            "/2015-03-31/functions/{name}/invocations",
            axum::routing::post(
                |State((seen, dev_url)): State<(Seen, String)>,
                 Path(name): Path<String>,
                 headers: HeaderMap,
                 body: axum::body::Bytes| async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    seen.lock().unwrap().push((name.clone(), auth));
                    if name != "longrun-intake" {
                        return (
                            StatusCode::NOT_FOUND,
                            [("x-amzn-errortype", "ResourceNotFoundException")],
                            json!({"Type": "User", "message": format!("Function not found: {name}")}).to_string(),
                        )
                            .into_response();
                    }
                    let answer = reqwest::Client::new()
                        .post(format!("{dev_url}/api/intake"))
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .unwrap()
                        .bytes()
                        .await
                        .unwrap();
                    (StatusCode::OK, answer).into_response()
                },
            ),
        )
        .with_state((Arc::clone(&seen), dev_url));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_reaches_a_deployed_intake_through_the_lambda_invoke_api() {
    let dev = fast_dev("cli-lambda", "50..100");
    let (lambda, seen) = fake_lambda(dev.url.clone()).await;
    let elsewhere = TempDir::new("cli-lambda-elsewhere");
    let aws = [
        ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
        ("AWS_SECRET_ACCESS_KEY", "secret"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    // No dev stack runs for `elsewhere`: the call can only have gone through Lambda.
    let run = longrun_env(
        elsewhere.path(),
        &[
            "--endpoint-url",
            &lambda,
            "call",
            "refine_output",
            "--function-name",
            "longrun-intake",
            "--params",
            r#"{"input":"x"}"#,
        ],
        None,
        &aws,
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stderr
            .contains("via the Lambda function longrun-intake"),
        "{}",
        run.stderr
    );
    assert!(
        run.stdout.contains("✔ Refined output ready! 🎉"),
        "{}",
        run.stdout
    );
    {
        let seen = seen.lock().unwrap();
        assert!(seen.len() >= 2, "a call and at least one status: {seen:?}");
        assert!(
            seen.iter().all(
                |(name, auth)| name == "longrun-intake" && auth.starts_with("AWS4-HMAC-SHA256")
            )
        );
    }
    let run = longrun_env(
        elsewhere.path(),
        &[
            "--endpoint-url",
            &lambda,
            "call",
            "refine",
            "--function-name",
            "no-such-function",
        ],
        None,
        &aws,
    )
    .await;
    assert_eq!(run.code, 3, "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_commands_without_a_running_stack_say_how_to_start_one() {
    let empty = TempDir::new("cli-no-stack");
    for args in [
        &[
            "--local",
            "tasks",
            "list",
            "--ext",
            "text-tools",
            "--user",
            "u",
        ][..],
        &["--local", "dlq", "list"][..],
        &["call", "refine", "--params", r#"{"input":"x"}"#][..],
    ] {
        let run = longrun(empty.path(), args, None).await;
        assert_eq!(run.code, 5, "{args:?}: {run:?}");
        assert!(run.stderr.contains("longrun dev"), "{}", run.stderr);
    }
    let run = longrun(empty.path(), &["--help"], None).await;
    assert_eq!(run.code, 0);
    for words in ["--local", "longrun dev", "Exit codes", "--state-dir"] {
        assert!(run.stdout.contains(words), "{words:?} missing from --help");
    }
    let run = dev_support::dev_help().await;
    assert!(
        run.contains("--simulate-model") && run.contains("--demo-only"),
        "{run}"
    );
    // `longrun dev` links no extension: it runs the project's dev binary (here functions/dev).
    let run = longrun(empty.path(), &["dev", "--debug", "--help"], None).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("--simulate-model"), "{run:?}");
    let run = longrun(empty.path(), &["call", "--help"], None).await;
    assert!(run.stdout.contains("--function-name") && run.stdout.contains("--params"));
}
