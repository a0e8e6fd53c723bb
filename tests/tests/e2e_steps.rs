//! End to end, issue 6: a long-running task in checkpointed steps (`refine_document`) through
//! the real binaries — handed on across worker invocations before a (simulated) Lambda
//! deadline, and resumed after its worker is killed, without calling the AI twice for a
//! finished step.

use std::time::Duration;

use longrun::task::{AuditKind, TaskState};
use longrun_tests::e2e::{Options, Stack};
use longrun_tests::eventually;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(90);

/// A document of `n` chunks: each paragraph is too long to share a 4000-character chunk with
/// the next, and carries its own marker and fake-AI directives.
fn document(n: usize, directives: impl Fn(usize) -> String) -> String {
    (0..n)
        .map(|i| {
            format!(
                "chunk-{i}-marker {} {}",
                directives(i),
                "words ".repeat(400)
            )
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

fn hand_offs(stack: &Stack) -> usize {
    stack
        .captured_output()
        .matches("handing off before the Lambda deadline")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_task_spans_three_invocations_and_calls_the_ai_once_per_chunk() {
    // GIVEN invocations that may start a 5 s step only in their first 5 s (cargo lambda watch
    // gives each a 600 s budget; a 585 s margin leaves 15 s, of which a step needs its 5 s
    // budget and 5 s to store its output), and six chunks of 3 s each
    let options = Options::new("steps")
        .setting("LONGRUN_CAP_S", 300)
        .setting("LONGRUN_DEADLINE_MARGIN_MS", 585_000)
        .setting("LONGRUN_STEP_BUDGET_MS", 5_000);
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    stack.connect_openai_key("dora").await;
    // WHEN the document is refined in the background
    let params = json!({"document": document(6, |_| "[[delay=3000]]".to_owned())});
    let task_id = stack
        .start_task("dora", "chat-dora", "refine_document", params)
        .await;
    let result = stack.wait_result(&task_id, WAIT).await;
    // THEN it succeeded over three invocations (two hand-offs), one AI call per chunk
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["data"]["chunks"], 6);
    for i in 0..6 {
        assert_eq!(
            stack.openai.calls_with(&format!("chunk-{i}-marker")).len(),
            1,
            "chunk-{i}"
        );
    }
    assert_eq!(hand_offs(&stack), 2, "{}", stack.output_tail());
    let task = stack.wait_delivered(&task_id, WAIT).await;
    assert_eq!(task.state, TaskState::Succeeded);
    assert_eq!(task.attempt, 1, "a hand-off is not a failed attempt");
    assert_eq!(task.cap_s, 300);
    // AND the chat saw progress only go up, then one result
    let pcts = stack.chat.progress_for(&task_id);
    assert!(pcts.windows(2).all(|w| w[0] <= w[1]), "{pcts:?}");
    assert_eq!(stack.chat.results_for(&task_id).len(), 1);
    assert_eq!(
        stack.audit_count(&task_id, AuditKind::Critical, "").await,
        0
    );
    stack.assert_no_secret_in_output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_in_step_two_re_runs_only_step_two() {
    // GIVEN a three-chunk document whose second chunk takes 8 s at the AI
    let options = Options::new("steps-kill").setting("LONGRUN_CAP_S", 120);
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    stack.connect_openai_key("eve").await;
    let params = json!({"document": document(3, |i| if i == 1 { "[[delay=8000]]".into() } else { "[[delay=500]]".into() })});
    let task_id = stack
        .start_task("eve", "chat-eve", "refine_document", params)
        .await;
    eventually(
        "the worker to be inside the AI call of chunk 1",
        WAIT,
        || async { (stack.openai.calls_with("chunk-1-marker").len() == 1).then_some(()) },
    )
    .await;
    // WHEN its worker instance is killed in the middle of that call
    stack.kill_instance_in_ai_call("chunk-1-marker");
    // THEN the sweeper revives it and a fresh worker replays chunk 0 from its checkpoint,
    // calls the AI again for chunk 1 only, then finishes
    let result = stack.wait_result(&task_id, WAIT).await;
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(stack.openai.calls_with("chunk-0-marker").len(), 1);
    assert_eq!(stack.openai.calls_with("chunk-1-marker").len(), 2);
    assert_eq!(stack.openai.calls_with("chunk-2-marker").len(), 1);
    let task = stack.wait_delivered(&task_id, WAIT).await;
    assert_eq!(task.state, TaskState::Succeeded);
    assert!(task.attempt >= 2, "attempt {}", task.attempt);
    assert_eq!(stack.chat.results_for(&task_id).len(), 1);
    assert_eq!(
        stack.audit_count(&task_id, AuditKind::Reclaimed, "").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_cancelled_after_two_chunks_hands_the_user_those_two() {
    // GIVEN a five-chunk document, each chunk 3 s at the AI
    let options = Options::new("steps-partial").setting("LONGRUN_CAP_S", 120);
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    stack.connect_openai_key("fay").await;
    let params = json!({"document": document(5, |_| "[[delay=3000]]".to_owned())});
    let task_id = stack
        .start_task("fay", "chat-fay", "refine_document", params)
        .await;
    // WHEN the user cancels while the third chunk is at the AI
    eventually("the AI call of chunk 2", WAIT, || async {
        (stack.openai.calls_with("chunk-2-marker").len() == 1).then_some(())
    })
    .await;
    let cancelled = stack.ask("cancel", "fay", &task_id).await;
    assert_eq!(cancelled["status"], 200, "{cancelled}");
    // THEN one "cancelled" result carries the two chunks refined before it
    let result = stack.wait_result(&task_id, WAIT).await;
    assert_eq!(result["ok"], false, "{result}");
    assert_eq!(result["summary"], "'refine_document' was cancelled.");
    let partial = &result["data"]["partial"];
    assert_eq!(partial["chunks_done"], 2, "{result}");
    assert_eq!(partial["chunks"], 5);
    let text = partial["text"].as_str().unwrap();
    assert!(
        text.contains("chunk-0-marker") && text.contains("chunk-1-marker"),
        "{text:.200}"
    );
    assert!(!text.contains("chunk-2-marker"));
    let task = stack.wait_delivered(&task_id, WAIT).await;
    assert_eq!(task.state, TaskState::Cancelled);
    assert_eq!(stack.chat.results_for(&task_id).len(), 1);
    assert!(stack.openai.calls_with("chunk-3-marker").is_empty());
}
