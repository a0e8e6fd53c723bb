//! End to end, scenarios 9 and 10: hostile input through the Invoke API, and no secret in
//! anything the processes print.

use std::time::Duration;

use longrun_tests::e2e::{EXT, Options, Stack};
use longrun_tests::watch::Invoked;
use serde_json::{Value, json};

/// What an input must get.
#[derive(Debug, Clone)]
enum Expect {
    /// The intake's contract answer: this status, and an error message containing the words.
    Status(u16, &'static str),
    /// 200 with an error `ActionResult` whose summary contains the words.
    ErrorResult(&'static str),
    /// 200 with an ok `ActionResult`.
    OkResult,
    /// Not JSON, or nested past the JSON parser's depth limit: refused before intake's code
    /// runs (the Lambda service answers `InvalidRequestContentException`; under the
    /// emulator, the runtime reports a deserialization error). Either way nothing runs.
    NotAnEvent,
}

fn call(user: &str, function: &str, params: Value) -> Value {
    json!({"action": "call", "ext": EXT, "user": user, "chat": "chat-h", "function": function,
           "params": params})
}

fn nested(depth: usize) -> String {
    format!("{}\"x\"{}", "[".repeat(depth), "]".repeat(depth))
}

/// (label, function to invoke, payload, expectation). `faults-intake` is intake over the
/// reference extension plus `probe`, which hands its params to `ctx.http` and
/// `ctx.progress`.
fn cases() -> Vec<(&'static str, &'static str, Vec<u8>, Expect)> {
    use Expect::*;
    let j = |v: Value| v.to_string().into_bytes();
    let ulid = "01JDZQ6V4E1YQ7K3ZC6M4T9H8P";
    let huge = "a".repeat(1_100_000);
    let big = "a".repeat(200 * 1024);
    let deep_params = format!(
        r#"{{"action":"call","ext":"{EXT}","user":"h","chat":"c","function":"refine_output","params":{{"input":{}}}}}"#,
        nested(100)
    );
    let too_deep = format!(
        r#"{{"action":"call","ext":"{EXT}","user":"h","chat":"c","function":"refine_output","params":{{"input":{}}}}}"#,
        nested(100_000)
    );
    vec![
        ("truncated JSON", "intake", b"{".to_vec(), NotAnEvent),
        (
            "bytes that are not UTF-8",
            "intake",
            b"\xff\xfe\x00".to_vec(),
            NotAnEvent,
        ),
        (
            "trailing comma",
            "intake",
            br#"{"action":"call",}"#.to_vec(),
            NotAnEvent,
        ),
        (
            "an array",
            "intake",
            j(json!([])),
            Status(400, "JSON object"),
        ),
        (
            "a string",
            "intake",
            j(json!("call")),
            Status(400, "JSON object"),
        ),
        ("null", "intake", j(Value::Null), Status(400, "JSON object")),
        (
            "no action",
            "intake",
            j(json!({})),
            Status(400, "missing field `action`"),
        ),
        (
            "action a number",
            "intake",
            j(json!({"action": 7})),
            Status(400, "must be a string"),
        ),
        (
            "action in capitals",
            "intake",
            j(json!({"action": "CALL", "ext": EXT})),
            Status(400, "unknown action"),
        ),
        (
            "unknown action",
            "intake",
            j(json!({"action": "delete", "ext": EXT, "user": "h"})),
            Status(400, "unknown action"),
        ),
        (
            "call without ext",
            "intake",
            j(json!({"action": "call", "user": "h", "chat": "c", "function": "refine"})),
            Status(400, "ext"),
        ),
        (
            "call without user",
            "intake",
            j(json!({"action": "call", "ext": EXT, "chat": "c", "function": "refine"})),
            Status(400, "user"),
        ),
        (
            "call without chat",
            "intake",
            j(json!({"action": "call", "ext": EXT, "user": "h", "function": "refine"})),
            Status(400, "chat"),
        ),
        (
            "call without function",
            "intake",
            j(json!({"action": "call", "ext": EXT, "user": "h", "chat": "c"})),
            Status(400, "function"),
        ),
        (
            "ext a number",
            "intake",
            j(json!({"action": "call", "ext": 5, "user": "h", "chat": "c", "function": "refine"})),
            Status(400, "ext"),
        ),
        (
            "user empty",
            "intake",
            j(call("", "refine", json!({"input": "x"}))),
            Status(400, "must not be empty"),
        ),
        (
            "NUL in user",
            "intake",
            j(call("u\u{0}x", "refine", json!({"input": "x"}))),
            Status(400, "control characters"),
        ),
        (
            "newline in chat",
            "intake",
            j(
                json!({"action": "call", "ext": EXT, "user": "h", "chat": "c\n1", "function": "refine", "params": {"input": "x"}}),
            ),
            Status(400, "control characters"),
        ),
        (
            "bell in function",
            "intake",
            j(call("h", "refine\u{7}", json!({"input": "x"}))),
            Status(400, "control characters"),
        ),
        (
            "escape in request_id",
            "intake",
            j(
                json!({"action": "call", "ext": EXT, "user": "h", "chat": "c", "request_id": "r\u{1b}[31m", "function": "refine", "params": {"input": "x"}}),
            ),
            Status(400, "control characters"),
        ),
        (
            "user of 129 characters",
            "intake",
            j(call(&"u".repeat(129), "refine", json!({"input": "x"}))),
            Status(400, "longer than 128"),
        ),
        (
            "unknown function",
            "intake",
            j(call("h", "rm_rf", json!({}))),
            Status(404, "no function named"),
        ),
        (
            "right-to-left override in function",
            "intake",
            j(call("h", "refine\u{202e}", json!({"input": "x"}))),
            Status(404, "no function named"),
        ),
        (
            "another extension",
            "intake",
            j(
                json!({"action": "call", "ext": "other-ext", "user": "h", "chat": "c", "function": "refine", "params": {}}),
            ),
            Status(404, "serves extension"),
        ),
        (
            "input a number",
            "intake",
            j(call("h", "refine_output", json!({"input": 5}))),
            Status(422, "input"),
        ),
        (
            "input missing",
            "intake",
            j(call("h", "refine_output", json!({}))),
            Status(422, "input"),
        ),
        (
            "params a string",
            "intake",
            j(call("h", "refine_output", json!("text"))),
            Status(422, ""),
        ),
        (
            "params null",
            "intake",
            j(call("h", "refine_output", Value::Null)),
            Status(422, ""),
        ),
        (
            "params over 1 MiB",
            "intake",
            j(call("h", "refine_output", json!({"input": huge}))),
            Status(413, "limit"),
        ),
        (
            "params of 200 KiB",
            "intake",
            j(call("h", "refine_output", json!({"input": big}))),
            Status(413, "params are"),
        ),
        (
            "params nested 100 deep",
            "intake",
            deep_params.into_bytes(),
            Status(422, "nests deeper than the 32 levels"),
        ),
        (
            "params with a number DynamoDB cannot store, in a field the function ignores",
            "intake",
            j(call(
                "h",
                "refine_output",
                json!({"input": "hi", "extra": 1e300}),
            )),
            Status(422, "holds the number 1e+300"),
        ),
        (
            "params nested 100000 deep",
            "intake",
            too_deep.into_bytes(),
            NotAnEvent,
        ),
        (
            "task id a path",
            "intake",
            j(json!({"action": "status", "ext": EXT, "user": "h", "task_id": "../../etc/passwd"})),
            Status(400, "not a ULID"),
        ),
        (
            "task id empty",
            "intake",
            j(json!({"action": "cancel", "ext": EXT, "user": "h", "task_id": ""})),
            Status(400, "not a ULID"),
        ),
        (
            "task id a number",
            "intake",
            j(json!({"action": "status", "ext": EXT, "user": "h", "task_id": 42})),
            Status(400, "task_id"),
        ),
        (
            "unknown task status",
            "intake",
            j(json!({"action": "status", "ext": EXT, "user": "h", "task_id": ulid})),
            Status(404, "no task"),
        ),
        (
            "unknown task cancel",
            "intake",
            j(json!({"action": "cancel", "ext": EXT, "user": "h", "task_id": ulid})),
            Status(404, "no task"),
        ),
        (
            "list limit 0",
            "intake",
            j(json!({"action": "list", "ext": EXT, "user": "h", "limit": 0})),
            Status(400, "limit"),
        ),
        (
            "list limit 101",
            "intake",
            j(json!({"action": "list", "ext": EXT, "user": "h", "limit": 101})),
            Status(400, "limit"),
        ),
        (
            "list limit -1",
            "intake",
            j(json!({"action": "list", "ext": EXT, "user": "h", "limit": -1})),
            Status(400, "limit"),
        ),
        (
            "list limit a word",
            "intake",
            j(json!({"action": "list", "ext": EXT, "user": "h", "limit": "ten"})),
            Status(400, "limit"),
        ),
        (
            "unicode user lists",
            "intake",
            j(json!({"action": "list", "ext": EXT, "user": "ünï 用户 🎉"})),
            Status(200, ""),
        ),
        (
            "unicode user calls",
            "intake",
            j(call("ünï 用户 🎉", "refine", json!({"input": "ça"}))),
            ErrorResult("OpenAI key not connected"),
        ),
        (
            "negative timeout for ctx.http",
            "faults-intake",
            j(call("h", "probe", json!({"timeout_ms": -5}))),
            Status(422, "timeout_ms"),
        ),
        (
            "181 s timeout for ctx.http",
            "faults-intake",
            j(call("h", "probe", json!({"timeout_ms": 181_000}))),
            ErrorResult("180 s per-call cap"),
        ),
        (
            "zero timeout for ctx.http",
            "faults-intake",
            j(call("h", "probe", json!({"timeout_ms": 0}))),
            ErrorResult("greater than zero"),
        ),
        (
            "progress pct 101",
            "faults-intake",
            j(call("h", "probe", json!({"pct": 101}))),
            ErrorResult("outside 0–100"),
        ),
        (
            "progress pct -1",
            "faults-intake",
            j(call("h", "probe", json!({"pct": -1}))),
            ErrorResult("outside 0–100"),
        ),
        (
            "progress pct 100 and a 180 s timeout",
            "faults-intake",
            j(call(
                "h",
                "probe",
                json!({"pct": 100, "timeout_ms": 180_000}),
            )),
            OkResult,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_its_contract_status_no_panic_and_writes_nothing() {
    let mut options = Options::new("hostile").with_faults();
    // No consumers: any message a refused request sent would still be in the queue.
    options.esm = false;
    options.sweep_every = None;
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    let cases = cases();
    assert!(cases.len() >= 30);
    for (label, function, payload, expect) in &cases {
        let invoked = stack
            .watch
            .invoke(function, payload.clone(), Duration::from_secs(60))
            .await;
        match expect {
            Expect::NotAnEvent => {
                let Invoked::FunctionError { body, .. } = &invoked else {
                    panic!("{label}: expected a refusal before intake, got {invoked:?}");
                };
                assert!(
                    body.contains("errorType") || body.contains("errorMessage"),
                    "{label}: {body}"
                );
            }
            expected => {
                let answer = invoked
                    .json()
                    .unwrap_or_else(|| panic!("{label}: no JSON answer: {invoked:?}"));
                match expected {
                    Expect::Status(status, words) => {
                        assert_eq!(answer["status"], *status, "{label}: {answer}");
                        if *status != 200 {
                            let message = answer["error"]["message"].as_str().unwrap_or_default();
                            assert!(message.contains(words), "{label}: {answer}");
                            assert!(answer.get("task").is_none() && answer.get("result").is_none());
                        }
                    }
                    Expect::ErrorResult(words) => {
                        assert_eq!(answer["status"], 200, "{label}: {answer}");
                        assert_eq!(answer["result"]["ok"], false, "{label}: {answer}");
                        let summary = answer["result"]["summary"].as_str().unwrap_or_default();
                        assert!(summary.contains(words), "{label}: {answer}");
                    }
                    Expect::OkResult => {
                        assert_eq!(answer["status"], 200, "{label}: {answer}");
                        assert_eq!(answer["result"]["ok"], true, "{label}: {answer}");
                    }
                    Expect::NotAnEvent => unreachable!(),
                }
            }
        }
    }
    // THEN nothing was written, nothing was queued, nothing panicked, and intake still answers
    assert_eq!(
        stack.table_items().await,
        Vec::new(),
        "no half-written state"
    );
    assert_eq!(stack.queue_counts("LONGRUN_WORK_QUEUE_URL").await, (0, 0));
    assert_eq!(
        stack.queue_counts("LONGRUN_DELIVERY_QUEUE_URL").await,
        (0, 0)
    );
    // The refused timeouts never reached the network; the accepted one did.
    assert_eq!(stack.openai.calls().len(), 1, "{:?}", stack.openai.calls());
    let output = stack.captured_output();
    assert!(!output.contains("panicked"), "a function panicked");
    for intake in ["intake", "faults-intake"] {
        let alive = stack
            .invoke_json(intake, &json!({"action": "list", "ext": EXT, "user": "h"}))
            .await;
        assert_eq!(alive["status"], 200, "{intake} still answers");
    }
    stack.assert_no_secret_in_output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_any_output_even_at_debug_level() {
    let mut options = Options::new("secrets");
    options.rust_log = "debug".into();
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    assert!(stack.chat_token.is_some(), "the chat API token is set");
    stack.connect_openai_key("hana").await;
    // Every path that reads a secret: Patterns A, B and C, a cancel, the operator's CLI.
    let a = stack
        .call("hana", "chat-hana", "refine", json!({"input": "secret a"}))
        .await;
    assert_eq!(a["result"]["ok"], true, "{a}");
    let b = stack
        .start_task(
            "hana",
            "chat-hana",
            "refine_output",
            json!({"input": "secret b"}),
        )
        .await;
    let c = stack
        .start_task(
            "hana",
            "chat-hana",
            "start_refinement",
            json!({"input": "secret c"}),
        )
        .await;
    let cancelled = stack
        .start_task(
            "hana",
            "chat-hana",
            "refine_output",
            json!({"input": "secret cancel [[delay=30000]]"}),
        )
        .await;
    longrun_tests::eventually("the slow call", Duration::from_secs(60), || async {
        (!stack.openai.calls_with("secret cancel").is_empty()).then_some(())
    })
    .await;
    assert_eq!(stack.ask("cancel", "hana", &cancelled).await["status"], 200);
    for id in [&b, &c, &cancelled] {
        stack.wait_delivered(id, Duration::from_secs(60)).await;
    }
    for args in [
        vec!["tasks", "show", b.as_str()],
        vec!["tasks", "list", "--ext", EXT, "--user", "hana", "--json"],
        vec!["dlq", "list", "delivery"],
    ] {
        let run = stack.cli(&args, None).await;
        assert_eq!(run.code, Some(0), "{args:?}: {}", run.stderr);
    }
    let output = stack.captured_output();
    // The scan saw real traffic at debug level…
    assert!(
        output.contains("\"level\":\"DEBUG\""),
        "debug logs were captured"
    );
    assert!(output.contains("result delivered"));
    // …and neither secret in it.
    stack.assert_no_secret_in_output();
    assert!(!output.contains(&stack.openai_key));
}
