//! End to end, scenarios 5 to 8: what the cloud throws at the pipeline — every message
//! delivered three times, a worker killed mid-task, a chat API that is down, and handlers that
//! panic, fail, outrun their cap or wait on an AI server that never answers.

use std::time::Duration;

use longrun::task::{AuditKind, TaskState};
use longrun_tests::e2e::{EXT, Options, Stack};
use longrun_tests::esm::Faults;
use longrun_tests::eventually;
use longrun_tests::fake_openai::CallState;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_three_times_still_runs_each_task_once_with_one_result() {
    // A long lease: under this load a late heartbeat must not hand a healthy task to a
    // second worker (that is scenario 6's business).
    let options = Options::new("duplicates")
        .setting("LONGRUN_LEASE_MS", 15_000)
        // Twelve tasks a user, started ten at a time: above the default per-user limit.
        .setting("LONGRUN_MAX_ACTIVE_TASKS", 100);
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    // GIVEN every work and delivery message delivered three times, batches reordered
    for function in ["worker", "delivery"] {
        stack.esm.set_faults(
            function,
            Faults {
                copies: 2,
                reorder: true,
                ..Faults::default()
            },
        );
    }
    let users: Vec<String> = (0..5).map(|u| format!("dup-user-{u}")).collect();
    for user in &users {
        stack.connect_openai_key(user).await;
    }
    // WHEN 50 Pattern B tasks and 10 Pattern C jobs are started
    let mut calls = Vec::new();
    for i in 0..60 {
        let user = users[i % users.len()].clone();
        let input = format!("dup task {i} [[delay={}]]", (i % 4) * 150);
        let (function, params) = if i < 50 {
            ("refine_output", json!({"input": input}))
        } else {
            ("start_refinement", json!({"input": input}))
        };
        calls.push((user, input, function, params));
    }
    let mut tasks = Vec::new();
    let stack_ref = &stack;
    for chunk in calls.chunks(10) {
        let started =
            futures::future::join_all(chunk.iter().map(|(user, _, function, params)| async move {
                let chat = format!("chat-{user}");
                stack_ref
                    .start_task(user, &chat, function, params.clone())
                    .await
            }))
            .await;
        for (id, (user, input, _, _)) in started.into_iter().zip(chunk) {
            tasks.push((id, user.clone(), input.clone()));
        }
    }
    for (id, _, _) in &tasks {
        stack.wait_delivered(id, Duration::from_secs(180)).await;
    }
    // Let the last copies land before counting.
    stack.wait_quiet(Duration::from_secs(60)).await;

    // THEN each task ran once and its chat got exactly one result
    for (id, user, input) in &tasks {
        let task = stack.task(id).await;
        assert_eq!(task.state, TaskState::Succeeded, "{id}");
        assert_eq!(task.attempt, 1, "{id} was claimed once");
        let ai = stack.openai.calls_with(input);
        assert_eq!(ai.len(), 1, "{input}: one execution, got {}", ai.len());
        let results = stack.chat.results_for(id);
        assert_eq!(results.len(), 1, "{id}: {results:?}");
        assert_eq!(results[0]["ok"], true);
        assert!(
            stack
                .chat
                .for_task(id)
                .iter()
                .all(|p| p.chat == format!("chat-{user}"))
        );
        assert_eq!(
            stack
                .audit_count(id, AuditKind::Delivered, "delivered#result")
                .await,
            1
        );
        assert_eq!(stack.audit_count(id, AuditKind::Critical, "").await, 0);
    }
    // AND the duplicates really were delivered
    let work = stack.esm.stats("worker").unwrap();
    let delivery = stack.esm.stats("delivery").unwrap();
    assert!(work.records >= 3 * tasks.len(), "{work:?}");
    assert!(delivery.records >= 3 * tasks.len(), "{delivery:?}");
    eprintln!(
        "duplicates: worker {work:?}; delivery {delivery:?}; chat answered 409 to {} repeats",
        stack.chat.duplicates()
    );
    stack.assert_no_secret_in_output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_task_is_retried_to_exactly_one_result() {
    let Some(stack) = Stack::start(Options::new("killed")).await else {
        return;
    };
    stack.connect_openai_key("dora").await;
    // GIVEN a task whose worker is inside a 5 s AI call
    let task_id = stack
        .start_task(
            "dora",
            "chat-dora",
            "refine_output",
            json!({"input": "crash me [[delay=5000]]"}),
        )
        .await;
    eventually("the AI call", WAIT, || async {
        (stack.openai.calls_with("crash me").len() == 1).then_some(())
    })
    .await;
    // WHEN that function instance is killed (SIGKILL, as an out-of-memory Lambda ends)
    stack.kill_instance_in_ai_call("crash me");

    // THEN the sweeper revives the task, a fresh instance runs it, and the chat gets one
    // result
    let task = stack.wait_delivered(&task_id, WAIT).await;
    assert_eq!(task.state, TaskState::Succeeded);
    assert!(task.attempt >= 2, "attempt {}", task.attempt);
    let results = stack.chat.results_for(&task_id);
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["ok"], true);
    assert!(
        stack
            .audit_count(&task_id, AuditKind::Reclaimed, "reclaimed#")
            .await
            >= 1
    );
    let ai = stack.openai.calls_with("crash me");
    assert_eq!(
        ai[0].state,
        CallState::Dropped,
        "the killed call died with it"
    );
    assert_eq!(ai.last().map(|c| c.state), Some(CallState::Answered));
    // AND the chat was told once that the task resumed
    let resumed = stack
        .chat
        .for_task(&task_id)
        .iter()
        .filter(|p| p.idempotency_key.contains(":notice:resumed:"))
        .count();
    assert_eq!(resumed, 1);
    // AND nothing is left stuck
    assert_all_terminal(&stack, "dora").await;
    stack.assert_no_secret_in_output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_kills_its_process_ends_alone_and_its_batch_neighbours_finish() {
    let mut options = Options::new("blast").with_faults();
    // `cargo lambda watch` does not replace a dead instance: room for the four deaths.
    options.concurrency = 8;
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    // GIVEN the worker mapping holding messages back, so the next four tasks share one
    // batch — one worker process
    stack.esm.set_faults(
        "worker",
        Faults {
            hold: true,
            ..Faults::default()
        },
    );
    tokio::time::sleep(Duration::from_secs(2)).await; // a receive in flight comes back empty
    let poison = stack
        .start_task("blast-0", "chat-blast-0", "abort", json!({}))
        .await;
    let mut neighbours = Vec::new();
    for i in 1..4 {
        let user = format!("blast-{i}");
        stack.connect_openai_key(&user).await;
        let input = format!("neighbour {i} [[delay=4000]]");
        let task_id = stack
            .start_task(
                &user,
                &format!("chat-{user}"),
                "refine_output",
                json!({ "input": input }),
            )
            .await;
        neighbours.push(task_id);
    }
    // WHEN one invocation gets all four and the `abort` handler kills its process
    stack.esm.set_faults("worker", Faults::default());
    // THEN each neighbour runs again alone, not charged for that death, to one result
    for task_id in &neighbours {
        let task = stack.wait_delivered(task_id, WAIT).await;
        assert_eq!(task.state, TaskState::Succeeded, "{task:?}");
        assert!(task.isolated, "{task:?}");
        assert_eq!(task.counted_attempts(), 1, "{task:?}");
        let results = stack.chat.results_for(task_id);
        assert_eq!(results.len(), 1, "{results:?}");
        assert_eq!(results[0]["ok"], true);
    }
    // AND the task at fault ends failed after its own attempts, with one fallback message
    let task = stack.wait_delivered(&poison, WAIT).await;
    assert_eq!(task.state, TaskState::Failed, "{task:?}");
    assert!(task.isolated);
    assert_eq!(task.counted_attempts(), 3, "{task:?}");
    assert_eq!(stack.chat.results_for(&poison).len(), 1);
    assert_eq!(
        stack
            .audit_count(&poison, AuditKind::Critical, "critical#attempts_exhausted")
            .await,
        1
    );
    for i in 0..4 {
        assert_all_terminal(&stack, &format!("blast-{i}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_worker_dies_on_every_attempt_ends_with_a_fallback() {
    let options = Options::new("killed-twice").setting("LONGRUN_MAX_ATTEMPTS", 2);
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    stack.connect_openai_key("erin").await;
    let task_id = stack
        .start_task(
            "erin",
            "chat-erin",
            "refine_output",
            json!({"input": "doomed [[delay=20000]]"}),
        )
        .await;
    // WHEN the worker is killed on each of its 2 attempts
    for attempt in 1..=2 {
        eventually(&format!("AI call of attempt {attempt}"), WAIT, || async {
            (stack.openai.calls_with("doomed").len() == attempt).then_some(())
        })
        .await;
        stack.kill_instance_in_ai_call("doomed");
    }
    // THEN the task ends failed with the fallback error and a critical audit item
    let task = stack.wait_delivered(&task_id, WAIT).await;
    assert_eq!(task.state, TaskState::Failed);
    assert_eq!(
        stack.chat.results_for(&task_id),
        vec![json!({"ok": false,
            "summary": "'refine_output' failed unexpectedly. The error was recorded for the operators.",
            "data": null, "retryable": false})]
    );
    assert_eq!(
        stack
            .audit_count(&task_id, AuditKind::Critical, "critical#attempts_exhausted")
            .await,
        1
    );
    assert_eq!(stack.openai.calls_with("doomed").len(), 2);
    stack.assert_no_secret_in_output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_outage_delays_the_result_then_dead_letters_it_for_a_redrive() {
    let Some(stack) = Stack::start(Options::new("chat-outage")).await else {
        return;
    };
    stack.connect_openai_key("fay").await;

    // GIVEN the chat API answers 500 for a while
    stack.chat.go_down();
    let first = stack
        .start_task(
            "fay",
            "chat-fay",
            "refine_output",
            json!({"input": "outage one"}),
        )
        .await;
    let key = format!("{first}:result");
    eventually("two failed deliveries", WAIT, || async {
        (stack.chat.attempts_for(&key) >= 2).then_some(())
    })
    .await;
    assert!(stack.chat.results_for(&first).is_empty());
    // WHEN it recovers
    stack.chat.heal();
    // THEN the result is delivered once, with no critical audit
    let task = stack.wait_delivered(&first, WAIT).await;
    assert_eq!(task.state, TaskState::Succeeded);
    assert_eq!(stack.chat.results_for(&first).len(), 1);
    assert_eq!(stack.audit_count(&first, AuditKind::Critical, "").await, 0);

    // GIVEN it goes down for longer than the retry budget (maxReceiveCount 5)
    stack.chat.go_down();
    let second = stack
        .start_task(
            "fay",
            "chat-fay",
            "refine_output",
            json!({"input": "outage two"}),
        )
        .await;
    let key = format!("{second}:result");
    // THEN the result message lands in the delivery dead-letter queue…
    eventually("the result in the dead-letter queue", WAIT, || async {
        let run = stack
            .cli(&["dlq", "list", "delivery", "--json"], None)
            .await;
        assert_eq!(run.code, Some(0), "{}", run.stderr);
        let listed: Value = serde_json::from_str(&run.stdout).unwrap();
        let found = listed["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["body"]["kind"] == "result" && m["body"]["task_id"] == second.as_str());
        // The depth is read before the listing: a message that moved in between is listed
        // but not yet counted, so wait for a listing that counts it too.
        let counted = listed["depth"].as_u64().is_some_and(|d| d >= 1);
        (found && counted).then_some(())
    })
    .await;
    assert_eq!(stack.chat.attempts_for(&key), 5, "one post per receive");
    // …with a critical audit item, nothing in the chat, and the task not marked delivered
    assert_eq!(
        stack
            .audit_count(
                &second,
                AuditKind::Critical,
                &format!("critical#last-attempt#{key}")
            )
            .await,
        1
    );
    assert!(stack.chat.results_for(&second).is_empty());
    let task = stack.task(&second).await;
    assert_eq!(task.state, TaskState::Succeeded);
    assert!(task.delivered_at.is_none());

    // WHEN the chat API is back and the operator redrives the dead-letter queue
    stack.chat.heal();
    let redrive = stack.cli(&["dlq", "redrive", "delivery"], None).await;
    assert_eq!(redrive.code, Some(0), "{}", redrive.stderr);
    // THEN the result is delivered, once
    stack.wait_delivered(&second, WAIT).await;
    assert_eq!(stack.chat.results_for(&second).len(), 1);
    assert_eq!(
        stack
            .audit_count(&second, AuditKind::Delivered, "delivered#result")
            .await,
        1
    );
    assert_eq!(stack.queue_depth("LONGRUN_DELIVERY_DLQ_URL").await, 0);
    stack.assert_no_secret_in_output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_errors_caps_and_hung_ai_calls_end_with_a_fallback_and_a_critical_audit() {
    let options = Options::new("failures")
        .with_faults()
        .setting("LONGRUN_CAP_S", 4);
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    stack.connect_openai_key("gus").await;
    let fallback = |function: &str, retryable: bool| {
        json!({"ok": false,
               "summary": format!("'{function}' failed unexpectedly. The error was recorded for the operators."),
               "data": null, "retryable": retryable})
    };
    // (function, params, the states it may end in, critical audit id prefix, exact result)
    type Case<'a> = (&'a str, Value, Vec<TaskState>, &'a str, Option<Value>);
    let cases: Vec<Case> = vec![
        (
            "explode",
            json!({}),
            vec![TaskState::Failed],
            "critical#handler_panic",
            Some(fallback("explode", false)),
        ),
        (
            "fail",
            json!({}),
            vec![TaskState::Failed],
            "critical#handler_error",
            Some(fallback("fail", true)),
        ),
        (
            "spin",
            json!({}),
            vec![TaskState::TimedOut],
            "critical#cap_exceeded",
            Some(
                json!({"ok": false, "summary": "'spin' did not finish within its 4 s limit.",
                        "data": null, "retryable": true}),
            ),
        ),
        // A progress percentage out of range is the handler's error, not a crash.
        (
            "probe_bg",
            json!({"pct": 101}),
            vec![TaskState::Failed],
            "critical#handler_error",
            Some(fallback("probe_bg", true)),
        ),
        // The AI call's timeout is cut to what the cap leaves, so the call times out as the
        // cap runs out: either ends the task with a fallback and a critical item.
        (
            "refine_output",
            json!({"input": "hung call [[hang]]"}),
            vec![TaskState::TimedOut, TaskState::Failed],
            "critical#",
            None,
        ),
    ];
    let mut started = Vec::new();
    for (function, params, ..) in &cases {
        started.push(
            stack
                .start_task("gus", "chat-gus", function, params.clone())
                .await,
        );
    }
    for ((function, _, states, critical, expected), task_id) in cases.iter().zip(&started) {
        let task = stack.wait_delivered(task_id, WAIT).await;
        assert!(states.contains(&task.state), "{function}: {:?}", task.state);
        let results = stack.chat.results_for(task_id);
        assert_eq!(results.len(), 1, "{function}: {results:?}");
        assert_eq!(results[0]["ok"], false, "{function}");
        if let Some(expected) = expected {
            assert_eq!(&results[0], expected, "{function}");
        }
        assert_eq!(
            stack
                .audit_count(task_id, AuditKind::Critical, critical)
                .await,
            1,
            "{function}: {:?}",
            stack.audit(task_id).await
        );
    }
    // The hung AI call was abandoned, not left open.
    eventually("the hung call to be dropped", WAIT, || async {
        (stack.openai.calls_with("hung call")[0].state == CallState::Dropped).then_some(())
    })
    .await;

    // Pattern A waits on a hung AI call no longer than the cap either.
    let inline = stack
        .call(
            "gus",
            "chat-gus",
            "refine",
            json!({"input": "inline hang [[hang]]"}),
        )
        .await;
    assert_eq!(inline["status"], 200, "{inline}");
    assert_eq!(inline["result"]["ok"], false);
    assert_eq!(inline["result"]["retryable"], true);

    // Errors the handler turns into results are the user's answer, not a critical failure.
    for (input, summary, retryable) in [
        ("ai 500 [[status=500]]", "OpenAI returned 500", true),
        ("ai 401 [[status=401]]", "OpenAI returned 401", false),
        (
            "ai junk [[malformed]]",
            "OpenAI returned a response without a completion",
            true,
        ),
    ] {
        let task_id = stack
            .start_task("gus", "chat-gus", "refine_output", json!({"input": input}))
            .await;
        let task = stack.wait_delivered(&task_id, WAIT).await;
        assert_eq!(task.state, TaskState::Succeeded, "{input}");
        assert_eq!(
            stack.chat.results_for(&task_id),
            vec![json!({"ok": false, "summary": summary, "data": null, "retryable": retryable})],
            "{input}"
        );
        assert_eq!(
            stack.audit_count(&task_id, AuditKind::Critical, "").await,
            0
        );
    }
    assert_all_terminal(&stack, "gus").await;
    stack.assert_no_secret_in_output();
}

/// Every task of `user` is in a terminal state.
async fn assert_all_terminal(stack: &Stack, user: &str) {
    let list = stack
        .invoke_intake(&json!({"action": "list", "ext": EXT, "user": user, "limit": 100}))
        .await;
    for task in list["tasks"].as_array().unwrap() {
        let state = task["state"].as_str().unwrap();
        assert!(
            ["succeeded", "failed", "cancelled", "timed_out"].contains(&state),
            "{} is stuck {state}",
            task["task_id"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_progress_update_throttled_while_its_task_finishes_never_follows_the_result() {
    // Found by the chaos soak (seed 5): a 429 with a short Retry-After used to be waited out
    // and the progress update posted again as it was, after its task had finished and its
    // result had reached the chat.
    let Some(stack) = Stack::start(Options::new("throttled-progress")).await else {
        return;
    };
    stack.connect_openai_key("hal").await;
    // GIVEN a chat API that asks the first post to come back in 2 s (429, Retry-After: 2)
    stack.chat.throttle_next(1, Duration::from_secs(2));
    // WHEN a task reports progress, then finishes within those 2 s
    let task_id = stack
        .start_task(
            "hal",
            "chat-hal",
            "refine_output",
            json!({"input": "throttled progress [[delay=1200]]"}),
        )
        .await;
    stack.wait_delivered(&task_id, WAIT).await;
    stack.wait_quiet(WAIT).await;
    // THEN the throttled post was a progress update, and nothing followed the result
    let answered = stack.chat.answered(&task_id);
    assert_eq!(answered[0].status, 429, "{answered:?}");
    assert!(
        answered[0].idempotency_key.contains(":progress:"),
        "{answered:?}"
    );
    let posts = stack.chat.for_task(&task_id);
    assert_eq!(
        posts.iter().map(|p| p.kind()).collect::<Vec<_>>().last(),
        Some(&"result"),
        "{answered:?}"
    );
    assert_eq!(stack.chat.results_for(&task_id).len(), 1);
}
