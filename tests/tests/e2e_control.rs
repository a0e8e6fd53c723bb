//! End to end, scenarios 3 and 4: cancelling a task in the middle of a 60 s AI call, and
//! another user's status, cancel and list on a task that is not theirs.

use std::time::Duration;

use longrun::task::{AuditKind, TaskState};
use longrun_tests::e2e::{EXT, Options, Stack};
use longrun_tests::eventually;
use longrun_tests::fake_openai::CallState;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_stops_the_ai_call_and_the_chat_gets_one_cancelled_result() {
    // The deployed timing (5 s heartbeat, 60 s lease), so the latency printed is the one
    // users see.
    let options = Options::new("cancel")
        .setting("LONGRUN_HEARTBEAT_MS", 5000)
        .setting("LONGRUN_PROGRESS_INTERVAL_MS", 5000)
        .setting("LONGRUN_LEASE_MS", 60000)
        .setting("LONGRUN_CANCEL_GRACE_MS", 2000);
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    stack.connect_openai_key("carol").await;
    // GIVEN a task in the middle of a 60 s AI call
    let task_id = stack
        .start_task(
            "carol",
            "chat-carol",
            "refine_output",
            json!({"input": "cancel me [[delay=60000]]"}),
        )
        .await;
    eventually("the worker to be inside the AI call", WAIT, || async {
        (stack.openai.calls_with("cancel me").len() == 1).then_some(())
    })
    .await;

    // WHEN its owner cancels it
    let requested = std::time::Instant::now();
    let cancelled = stack.ask("cancel", "carol", &task_id).await;
    assert_eq!(cancelled["status"], 200, "{cancelled}");
    assert_eq!(cancelled["task"]["task_id"], task_id.as_str());
    assert_eq!(cancelled["task"]["cancel_requested"], true);

    // THEN the AI server sees its connection dropped, and the chat gets the cancelled result
    // long before the AI call would have ended (half of its 60 s)
    eventually("the AI call to be dropped", WAIT, || async {
        (stack.openai.calls_with("cancel me")[0].state == CallState::Dropped).then_some(())
    })
    .await;
    let dropped_after = requested.elapsed();
    let result = stack.wait_result(&task_id, Duration::from_secs(30)).await;
    let in_chat_after = requested.elapsed();
    eprintln!(
        "cancel latency (heartbeat 5 s): request -> AI connection dropped {} ms, -> 'cancelled' in the chat {} ms",
        dropped_after.as_millis(),
        in_chat_after.as_millis()
    );
    assert_eq!(
        result,
        json!({"ok": false, "summary": "'refine_output' was cancelled.", "data": null,
               "retryable": false})
    );
    // AND the record says cancelled, delivered once, with the audit trail of both steps
    let task = stack.wait_delivered(&task_id, WAIT).await;
    assert_eq!(task.state, TaskState::Cancelled);
    assert_eq!(stack.chat.results_for(&task_id).len(), 1);
    assert_eq!(
        stack
            .audit_count(&task_id, AuditKind::CancelRequested, "")
            .await,
        1
    );
    assert_eq!(
        stack.audit_count(&task_id, AuditKind::Cancelled, "").await,
        1
    );
    assert_eq!(
        stack
            .audit_count(&task_id, AuditKind::Delivered, "delivered#result")
            .await,
        1
    );
    assert_eq!(
        stack.audit_count(&task_id, AuditKind::Critical, "").await,
        0
    );
    // AND cancelling again is a conflict, and the AI was never called a second time
    let again = stack.ask("cancel", "carol", &task_id).await;
    assert_eq!(again["status"], 409, "{again}");
    assert_eq!(stack.openai.calls_with("cancel me").len(), 1);
    let status = stack.ask("status", "carol", &task_id).await;
    assert_eq!(status["task"]["state"], "cancelled");
    stack.assert_no_secret_in_output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_gets_403_and_learns_nothing_of_the_task() {
    let Some(stack) = Stack::start(Options::new("cross-user")).await else {
        return;
    };
    stack.connect_openai_key("alice").await;
    stack.connect_openai_key("bob").await;
    // GIVEN alice's running task and bob's own
    let secret_words = "alice's private draft";
    let alices = stack
        .start_task(
            "alice",
            "chat-alice",
            "refine_output",
            json!({"input": format!("{secret_words} [[delay=3000]]")}),
        )
        .await;
    let bobs = stack
        .start_task(
            "bob",
            "chat-bob",
            "refine_output",
            json!({"input": "bob's text"}),
        )
        .await;

    // WHEN bob asks for alice's task's status, cancels it, and lists
    let forbidden = json!({"status": 403, "error": {"code": "forbidden",
                           "message": "this task belongs to another user"}});
    for action in ["status", "cancel"] {
        let answer = stack.ask(action, "bob", &alices).await;
        // THEN each is a 403 carrying nothing but the refusal
        assert_eq!(answer, forbidden, "{action}");
    }
    let list = stack
        .invoke_intake(&json!({"action": "list", "ext": EXT, "user": "bob"}))
        .await;
    assert_eq!(list["status"], 200);
    let listed: Vec<&str> = list["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["task_id"].as_str())
        .collect();
    assert_eq!(listed, vec![bobs.as_str()], "bob lists his own task only");
    for leak in [secret_words, "chat-alice", alices.as_str()] {
        assert!(!list.to_string().contains(leak), "{leak} leaked: {list}");
    }
    // AND the same id under another extension is unknown, not alice's
    let other_ext = stack
        .invoke_intake(
            &json!({"action": "status", "ext": "other-ext", "user": "alice",
                               "task_id": alices}),
        )
        .await;
    assert_eq!(other_ext["status"], 404, "{other_ext}");
    assert!(!other_ext.to_string().contains("chat-alice"));

    // AND alice's task is untouched: it runs to its result in her chat alone
    let task = stack.wait_delivered(&alices, WAIT).await;
    assert_eq!(task.state, TaskState::Succeeded);
    assert!(!task.cancel_requested);
    assert_eq!(
        stack
            .audit_count(&alices, AuditKind::CancelRequested, "")
            .await,
        0
    );
    assert!(
        stack
            .chat
            .for_task(&alices)
            .iter()
            .all(|p| p.chat == "chat-alice")
    );
    stack.wait_delivered(&bobs, WAIT).await;
    assert!(
        stack
            .chat
            .in_chat("chat-bob")
            .iter()
            .all(|p| p.task_id() == bobs),
        "nothing of alice's in bob's chat"
    );
    let own = stack.ask("status", "alice", &alices).await;
    assert_eq!(own["task"]["state"], "succeeded");
    stack.assert_no_secret_in_output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_silent_past_the_stall_period_gets_one_notice_then_its_result() {
    // A 2 s stall period, heartbeats every 500 ms.
    let options = Options::new("stall").setting("LONGRUN_STALL_MS", 2000);
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    stack.connect_openai_key("gus").await;
    // GIVEN a Pattern B task whose AI call takes 6 s, with no progress meanwhile
    let task_id = stack
        .start_task(
            "gus",
            "chat-gus",
            "refine_output",
            json!({"input": "slow one [[delay=6000]]"}),
        )
        .await;
    // WHEN it runs to its result
    let result = stack.wait_result(&task_id, WAIT).await;
    assert_eq!(result["ok"], true, "{result}");
    stack.wait_delivered(&task_id, WAIT).await;
    // THEN the chat got exactly one "still working" notice, before the result
    let posts = stack.chat.for_task(&task_id);
    let notices: Vec<_> = posts
        .iter()
        .filter(|p| p.idempotency_key.contains(":notice:stalled:"))
        .collect();
    assert_eq!(notices.len(), 1, "{posts:?}");
    let text = notices[0].body["progress"]["message"].as_str().unwrap();
    assert!(text.starts_with("Still working on it…"), "{text}");
    assert_eq!(posts.last().unwrap().kind(), "result");
    assert_eq!(
        stack
            .audit_count(&task_id, AuditKind::Delivered, "delivered#notice#stalled#")
            .await,
        1
    );
    assert_eq!(stack.task(&task_id).await.state, TaskState::Succeeded);
}
