//! The extension's handlers through the whole pipeline, in memory (`longrun::testing`): a call
//! as a user makes it, the queues run until idle, then the chat, the task record and the audit
//! trail. The model is longrun's offline simulator on loopback — no key, no network.

use std::time::Duration;

use longrun::TaskState;
use longrun::task::AuditKind;
use longrun::testing::TestStack;
use longrun_dev::simulator::{LABEL, Latency, Simulator};
use serde_json::json;

use __CRATE__::{API_KEY, extension_at};

/// A stack whose model is the simulator, and a user who connected a key.
async fn stack_with_model() -> (TestStack, Simulator) {
    let fast = Latency {
        min: Duration::from_millis(10),
        max: Duration::from_millis(30),
    };
    let simulator = Simulator::start(fast).await.expect("the simulator starts");
    let stack = TestStack::new(extension_at(Some(&simulator.base_url)));
    stack.secret("u1", API_KEY, "sk-test");
    (stack, simulator)
}

#[tokio::test]
async fn a_background_summary_acks_at_once_then_reaches_the_chat_exactly_once() {
    // GIVEN a user with a key
    let (stack, _model) = stack_with_model().await;
    // WHEN they call the background function
    let called = stack
        .call("u1", "summarize_later", json!({"input": "A long text."}))
        .await;
    // THEN the ack comes at once, naming the task
    assert_eq!(called.status(), 200);
    let task_id = called.task_id().expect("a background task");
    assert!(called.result().unwrap().summary.starts_with("Started 'summarize_later'"));
    // AND once the queues have run, the chat holds progress and one result
    stack.run_until_idle().await;
    let results = stack.results("u1");
    assert_eq!(results.len(), 1, "{results:?}");
    assert!(results[0].ok, "{results:?}");
    let text = results[0].data.as_ref().unwrap()["text"].as_str().unwrap();
    assert!(text.starts_with(LABEL), "{text}");
    // AND the task record and its audit trail tell the operator the same story (progress
    // messages in the chat depend on timing: a task this quick may finish before any is sent)
    let task = stack.task(&task_id).await.unwrap();
    assert_eq!(task.state, TaskState::Succeeded);
    assert_eq!(task.progress.pct, 90);
    assert!(task.delivered_at.is_some());
    assert_eq!(stack.audit_count(&task_id, AuditKind::Delivered).await, 1);
    assert_eq!(stack.stored("u1", "last_summary").await, Some(json!(text)));
}

#[tokio::test]
async fn start_summary_answers_quickly_or_launches_its_job() {
    let (stack, _model) = stack_with_model().await;
    let quick = stack
        .call("u1", "start_summary", json!({"input": "x", "quick": true}))
        .await;
    assert_eq!(quick.result().unwrap().summary, "Summary ready.");
    assert!(quick.task_id().is_none());

    let slow = stack
        .call("u1", "start_summary", json!({"input": "x", "quick": false}))
        .await;
    assert_eq!(
        slow.result().unwrap().summary,
        "On it — I'll send the summary here."
    );
    let task_id = slow.task_id().expect("the job's task");
    stack.run_until_idle().await;
    assert_eq!(stack.results("u1").len(), 1);
    assert_eq!(stack.task(&task_id).await.unwrap().state, TaskState::Succeeded);
}

#[tokio::test]
async fn a_document_is_summarized_step_by_step() {
    let (stack, _model) = stack_with_model().await;
    let called = stack
        .call("u1", "summarize_document", json!({"document": "One.\n\nTwo.\n\nThree."}))
        .await;
    stack.run_until_idle().await;
    let result = &stack.results("u1")[0];
    assert_eq!(result.summary, "Document summarized (3 paragraphs).");
    let task = stack.task(&called.task_id().unwrap()).await.unwrap();
    assert_eq!(task.cap_s, 1800);
}

#[tokio::test(start_paused = true)]
async fn without_a_key_the_user_is_told_to_connect_one() {
    // No model is needed: the handlers stop before calling it.
    let stack = TestStack::new(extension_at(Some("http://127.0.0.1:9/v1")));
    let inline = stack.call("u2", "summarize", json!({"input": "x"})).await;
    let result = inline.result().unwrap();
    assert!(!result.ok);
    assert_eq!(result.summary, "OpenAI key not connected");

    stack
        .call("u2", "summarize_later", json!({"input": "x"}))
        .await;
    stack.run_until_idle().await;
    assert_eq!(stack.results("u2")[0].summary, "OpenAI key not connected");
}

#[tokio::test(start_paused = true)]
async fn params_that_do_not_fit_are_refused_and_nothing_runs() {
    let stack = TestStack::new(extension_at(Some("http://127.0.0.1:9/v1")));
    let called = stack.call("u1", "summarize_later", json!({"input": 5})).await;
    assert_eq!(called.status(), 422);
    assert_eq!(called.error_code(), Some("invalid_params"));
    let unknown = stack.call("u1", "no_such_function", json!({})).await;
    assert_eq!(unknown.status(), 404);
    assert!(stack.work_queue().pending().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_cancel_before_the_worker_starts_ends_the_task_with_one_message() {
    let stack = TestStack::new(extension_at(Some("http://127.0.0.1:9/v1")));
    stack.secret("u1", API_KEY, "sk-test");
    let task_id = stack
        .call("u1", "summarize_later", json!({"input": "x"}))
        .await
        .task_id()
        .unwrap();
    // Another user cannot touch it.
    assert_eq!(stack.cancel("u3", &task_id).await.status(), 403);
    assert_eq!(stack.cancel("u1", &task_id).await.status(), 200);
    stack.run_until_idle().await;
    assert_eq!(stack.task(&task_id).await.unwrap().state, TaskState::Cancelled);
    let results = stack.results("u1");
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].summary, "'summarize_later' was cancelled.");
}
