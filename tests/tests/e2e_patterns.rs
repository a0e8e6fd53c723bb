//! End to end, scenarios 1 and 2: the reference extension's three patterns through the real
//! binaries, a user who never connected an OpenAI key, and one who used up the daily AI budget.

use std::time::Duration;

use longrun::task::{AuditKind, TaskKind, TaskState};
use longrun_tests::e2e::{EXT, FAST_MODEL, MODEL, Options, Stack};
use longrun_tests::esm::Faults;
use longrun_tests::fake_openai::{CallState, completion_for};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patterns_a_b_and_c_reach_the_chat_once_with_progress_in_order() {
    let Some(stack) = Stack::start(Options::new("patterns")).await else {
        return;
    };
    stack.connect_openai_key("alice").await;

    // Pattern A: `refine` answers inline; nothing is queued.
    let a = stack
        .call("alice", "chat-a", "refine", json!({"input": "pattern a"}))
        .await;
    assert_eq!(a["status"], 200, "{a}");
    assert_eq!(
        a["result"],
        json!({"ok": true, "summary": "Refined text ready!",
               "data": {"text": completion_for("pattern a")}, "retryable": false})
    );
    let ai = stack.openai.calls_with("pattern a");
    assert_eq!(ai.len(), 1);
    assert!(ai[0].key_ok, "the user's key reached the AI server");
    assert_eq!(ai[0].model, MODEL);

    // Pattern B: `refine_output` acks at once with the task id; the worker does the rest.
    let b = stack
        .call(
            "alice",
            "chat-b",
            "refine_output",
            json!({"input": "pattern b [[delay=4000]]"}),
        )
        .await;
    assert_eq!(b["status"], 200, "{b}");
    assert_eq!(b["result"]["ok"], true);
    assert_eq!(
        b["result"]["summary"],
        "Started 'refine_output' in background — the result will be sent to chat when it finishes."
    );
    let b_id = b["result"]["data"]["task_id"].as_str().unwrap().to_owned();
    assert_eq!(b_id.len(), 26, "a ULID: {b_id}");

    // Pattern C, fast path: answered inline with the fast model.
    let fast = stack
        .call(
            "alice",
            "chat-c",
            "start_refinement",
            json!({"input": "pattern c fast", "fast_path": true}),
        )
        .await;
    assert_eq!(fast["result"]["summary"], "Quick refine done.", "{fast}");
    assert_eq!(
        fast["result"]["data"]["text"],
        completion_for("pattern c fast")
    );
    assert_eq!(
        stack.openai.calls_with("pattern c fast")[0].model,
        FAST_MODEL
    );

    // Pattern C, slow path: the custom ack, and the `refine_job` job in the background.
    let c = stack
        .call(
            "alice",
            "chat-c",
            "start_refinement",
            json!({"input": "pattern c slow [[delay=4000]]"}),
        )
        .await;
    assert_eq!(
        c["result"]["summary"], "Got it — refining (≈90s). I'll send the result here.",
        "{c}"
    );
    let c_id = c["result"]["data"]["task_id"].as_str().unwrap().to_owned();

    // THEN each background task's result reaches its chat once, after its progress, which
    // arrives in order
    for (task_id, chat, event, input) in [
        (&b_id, "chat-b", "text_refined", "pattern b [[delay=4000]]"),
        (
            &c_id,
            "chat-c",
            "text_refined",
            "pattern c slow [[delay=4000]]",
        ),
    ] {
        let task = stack.wait_delivered(task_id, WAIT).await;
        assert_eq!(task.state, TaskState::Succeeded);
        assert_eq!(task.attempt, 1);
        let posts = stack.chat.for_task(task_id);
        assert!(
            posts.iter().all(|p| p.chat == chat),
            "wrong chat: {posts:?}"
        );
        let results: Vec<_> = posts.iter().filter(|p| p.kind() == "result").collect();
        assert_eq!(results.len(), 1, "{posts:?}");
        let result = &results[0].body;
        assert_eq!(result["user"], "alice");
        assert_eq!(result["ext"], EXT);
        assert_eq!(result["event"], event);
        assert_eq!(
            result["result"],
            json!({"ok": true, "summary": "Refined output ready! 🎉",
                   "data": {"text": completion_for(input)}, "retryable": false})
        );
        assert_eq!(
            posts.last().map(|p| p.kind()),
            Some("result"),
            "nothing after the result: {posts:?}"
        );
        let progress = stack.chat.progress_for(task_id);
        assert!(!progress.is_empty(), "progress reached the chat: {posts:?}");
        assert!(
            progress.windows(2).all(|w| w[0] < w[1]),
            "progress in order: {progress:?}"
        );
        // The table: one `created`, one `delivered#result`, one `delivered` per progress
        // message, nothing critical.
        let audit = stack.audit(task_id).await;
        let count = |kind: AuditKind, prefix: &str| {
            audit
                .iter()
                .filter(|a| a.kind == kind && a.audit_id.starts_with(prefix))
                .count()
        };
        assert_eq!(count(AuditKind::Created, ""), 1, "{audit:?}");
        assert_eq!(count(AuditKind::Delivered, "delivered#result"), 1);
        assert_eq!(
            count(AuditKind::Delivered, "delivered#progress"),
            progress.len()
        );
        assert_eq!(count(AuditKind::Critical, ""), 0, "{audit:?}");
        assert_eq!(
            task.result.as_ref().map(|r| r.ok),
            Some(true),
            "the record holds the result"
        );
        assert!(task.finished_at.is_some() && task.started_at.is_some());
    }
    let job = stack.task(&c_id).await;
    assert_eq!(job.kind, TaskKind::Job);
    assert_eq!(job.function, "refine_job");
    assert_eq!(job.name.as_deref(), Some("AI refinement"));
    assert_eq!(job.chat, "chat-c");

    // AND each AI call happened exactly once
    for input in ["pattern b", "pattern c slow"] {
        let calls = stack.openai.calls_with(input);
        assert_eq!(calls.len(), 1, "{input}: {calls:?}");
        assert_eq!(calls[0].state, CallState::Answered);
    }

    // AND the owner sees both through status and list
    let status = stack.ask("status", "alice", &b_id).await;
    assert_eq!(status["status"], 200);
    assert_eq!(status["task"]["state"], "succeeded");
    assert_eq!(status["task"]["progress"]["pct"], 90);
    let list = stack
        .invoke_intake(&json!({"action": "list", "ext": EXT, "user": "alice"}))
        .await;
    let ids: Vec<&str> = list["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["task_id"].as_str())
        .collect();
    assert_eq!(ids, vec![c_id.as_str(), b_id.as_str()], "newest first");

    // AND the operator's CLI shows the same record and trail
    let shown = stack.cli(&["tasks", "show", &b_id, "--json"], None).await;
    assert_eq!(shown.code, Some(0), "{}", shown.stderr);
    let shown: serde_json::Value = serde_json::from_str(&shown.stdout).unwrap();
    assert_eq!(shown["task"]["state"], "succeeded");
    assert!(
        shown["audit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["audit_id"] == "delivered#result")
    );
    stack.assert_no_secret_in_output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_openai_key_is_the_seeds_error_in_every_pattern() {
    let Some(stack) = Stack::start(Options::new("no-key")).await else {
        return;
    };
    let expected = json!({"ok": false, "summary": "OpenAI key not connected",
                          "data": null, "retryable": false});

    // Pattern A and C answer inline with the error
    let a = stack
        .call("bob", "chat-bob", "refine", json!({"input": "no key a"}))
        .await;
    assert_eq!(a["status"], 200);
    assert_eq!(a["result"], expected);
    let c = stack
        .call(
            "bob",
            "chat-bob",
            "start_refinement",
            json!({"input": "no key c"}),
        )
        .await;
    assert_eq!(c["result"], expected);

    // Pattern B acks, then delivers the same error to the chat
    let task_id = stack
        .start_task(
            "bob",
            "chat-bob",
            "refine_output",
            json!({"input": "no key b"}),
        )
        .await;
    let task = stack.wait_delivered(&task_id, WAIT).await;
    assert_eq!(stack.chat.results_for(&task_id), vec![expected.clone()]);
    assert_eq!(
        stack.chat.for_task(&task_id)[0].body.get("event"),
        None,
        "no event with an error result"
    );
    // The handler chose that answer: the task succeeded, with nothing critical.
    assert_eq!(task.state, TaskState::Succeeded);
    assert_eq!(
        stack.audit_count(&task_id, AuditKind::Critical, "").await,
        0
    );
    assert!(
        stack.openai.calls().is_empty(),
        "no AI call without a key: {:?}",
        stack.openai.calls()
    );
    stack.assert_no_secret_in_output();
}

/// What `user` used of the reference extension's `ai_tokens` budget today.
async fn ai_tokens_used(stack: &Stack, user: &str) -> u64 {
    let pk = format!("USAGE#{EXT}#{user}");
    stack
        .table_items()
        .await
        .iter()
        .filter(|item| item["pk"] == pk.as_str() && item["meter"] == "ai_tokens")
        .filter_map(|item| item["used"].as_u64())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_over_the_daily_ai_budget_is_refused_and_duplicated_work_is_charged_once() {
    // The fake AI server reports 20 tokens a call; each user may use 50 a day.
    let options = Options::new("budget").setting("TEXT_TOOLS_DAILY_AI_TOKENS", 50);
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    for user in ["hal", "ida"] {
        stack.connect_openai_key(user).await;
    }
    // GIVEN every work message delivered three times
    stack.esm.set_faults(
        "worker",
        Faults {
            copies: 2,
            ..Faults::default()
        },
    );
    // WHEN hal runs two background refinements
    for i in 0..2 {
        let task_id = stack
            .start_task(
                "hal",
                "chat-hal",
                "refine_output",
                json!({ "input": format!("budget {i}") }),
            )
            .await;
        let task = stack.wait_delivered(&task_id, WAIT).await;
        assert_eq!(task.state, TaskState::Succeeded);
    }
    // THEN each was charged once
    assert_eq!(ai_tokens_used(&stack, "hal").await, 40);
    // WHEN a third call takes hal past the budget: it answers with the budget message
    let budget = "Your daily budget of 50 AI tokens is used up; it renews at 00:00 UTC.";
    let passed = stack
        .call("hal", "chat-hal", "refine", json!({"input": "budget 2"}))
        .await;
    assert_eq!(passed["status"], 200, "{passed}");
    assert_eq!(passed["result"]["summary"], budget, "{passed}");
    assert_eq!(ai_tokens_used(&stack, "hal").await, 60);
    // AND the next call is refused before it reaches the AI
    let refused = stack
        .call("hal", "chat-hal", "refine", json!({"input": "budget 3"}))
        .await;
    assert_eq!(refused["status"], 429, "{refused}");
    assert_eq!(refused["error"]["code"], "over_budget");
    assert_eq!(refused["error"]["message"], budget);
    assert!(stack.openai.calls_with("budget 3").is_empty());
    // AND ida is not affected
    let other = stack
        .call("ida", "chat-ida", "refine", json!({"input": "ida's turn"}))
        .await;
    assert_eq!(other["result"]["ok"], true, "{other}");
}
