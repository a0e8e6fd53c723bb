//! End to end, through the real binaries on the emulators: durable sleep (`ctx.sleep`) and
//! the provider background pattern (`refine_offloaded`: `background: true` at the fake
//! OpenAI, checked with `ctx.poll` between durable sleeps, cancelled at the provider by its
//! `on_stop` hook).

use std::time::Duration;

use longrun::task::{AuditKind, TaskState};
use longrun_tests::e2e::{Options, Stack};
use longrun_tests::eventually;
use longrun_tests::fake_openai::CallKind;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(90);

/// Waits until the task is asleep (its worker invocation ended) and returns when it wakes.
async fn sleeping(stack: &Stack, task_id: &str) -> chrono::DateTime<chrono::Utc> {
    eventually("the task to sleep", WAIT, || async {
        let task = stack.task(task_id).await;
        (task.state == TaskState::Sleeping).then_some(task.wake_at)
    })
    .await
    .expect("a sleeping task has a wake time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_sleeps_without_a_worker_and_resumes_after_the_delay() {
    // GIVEN a handler that runs a step, then sleeps 4 s
    let Some(stack) = Stack::start(Options::new("sleep").with_faults()).await else {
        return;
    };
    let task_id = stack
        .start_task("gus", "chat-gus", "nap", json!({"seconds": 4}))
        .await;
    // WHEN it runs, THEN it is suspended: sleeping in its record, no worker holding it
    let wake_at = sleeping(&stack, &task_id).await;
    let asleep = stack.task(&task_id).await;
    assert_eq!(asleep.progress.message, "Napping");
    assert!(asleep.lease.is_some_and(|l| l.owner == "queue"));
    // AND after the delay it resumes and ends with one result
    let result = stack.wait_result(&task_id, WAIT).await;
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["data"]["slept_s"], 4);
    let task = stack.wait_delivered(&task_id, WAIT).await;
    assert_eq!(task.state, TaskState::Succeeded);
    assert!(task.finished_at.unwrap() >= wake_at);
    assert_eq!(task.attempt, 1, "a sleep is not a failed attempt");
    assert_eq!(stack.chat.results_for(&task_id).len(), 1);
    // AND the sweeper, running every second, left the sleeping task alone
    assert_eq!(
        stack.audit_count(&task_id, AuditKind::Reclaimed, "").await,
        0
    );
    assert_eq!(
        stack.audit_count(&task_id, AuditKind::Critical, "").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_a_sleep_ends_the_task_within_seconds() {
    // GIVEN a task asleep for ten minutes
    let options = Options::new("sleep-cancel")
        .with_faults()
        .setting("LONGRUN_CAP_S", 900);
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    let task_id = stack
        .start_task("hal", "chat-hal", "nap", json!({"seconds": 600}))
        .await;
    sleeping(&stack, &task_id).await;
    // AND the operator's CLI shows it sleeping, and when it wakes
    let ext = stack.options.ext.clone();
    let listed = stack
        .cli(&["tasks", "list", "--ext", &ext, "--user", "hal"], None)
        .await;
    assert_eq!(listed.code, Some(0), "{}", listed.stderr);
    let row = listed
        .stdout
        .lines()
        .find(|l| l.starts_with(&task_id))
        .unwrap_or_default()
        .to_owned();
    assert!(row.contains("sleeping"), "{}", listed.stdout);
    let shown = stack.cli(&["tasks", "show", &task_id], None).await;
    assert!(shown.stdout.contains("wakes "), "{}", shown.stdout);
    // WHEN the user cancels
    let cancelled = stack.ask("cancel", "hal", &task_id).await;
    assert_eq!(cancelled["status"], 200, "{cancelled}");
    // THEN it ends cancelled now (the wait allows 30 s, not the 600 s of the sleep)
    let result = stack.wait_result(&task_id, Duration::from_secs(30)).await;
    assert_eq!(result["summary"], "'nap' was cancelled.", "{result}");
    let task = stack.wait_delivered(&task_id, WAIT).await;
    assert_eq!(task.state, TaskState::Cancelled);
    assert_eq!(stack.chat.results_for(&task_id).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_call_at_the_provider_is_checked_in_short_invocations() {
    // GIVEN a provider that takes 7 s on a background response, checked every 2 s
    let options = Options::new("offload").setting("OPENAI_POLL_SECONDS", 2);
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    stack.connect_openai_key("ida").await;
    let params = json!({"input": "offload-a [[delay=7000]]"});
    let task_id = stack
        .start_task("ida", "chat-ida", "refine_offloaded", params)
        .await;
    // WHEN it runs, THEN the task sleeps between checks
    sleeping(&stack, &task_id).await;
    let result = stack.wait_result(&task_id, WAIT).await;
    // AND ends with the provider's answer: the response created once, checked several
    // times, no synchronous call made
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["data"]["text"], "Refined: offload-a");
    assert_eq!(
        stack.openai.calls_of(CallKind::Create, "offload-a").len(),
        1
    );
    let checks = stack.openai.calls_of(CallKind::Check, "offload-a").len();
    assert!(checks >= 3, "{checks} checks");
    assert!(
        stack
            .openai
            .calls_of(CallKind::Chat, "offload-a")
            .is_empty()
    );
    let task = stack.wait_delivered(&task_id, WAIT).await;
    assert_eq!(task.state, TaskState::Succeeded);
    assert_eq!(task.attempt, 1);
    // AND the chat saw the provider's status as progress, then one result
    assert_eq!(stack.chat.results_for(&task_id).len(), 1);
    let pcts = stack.chat.progress_for(&task_id);
    assert!(pcts.contains(&50), "{pcts:?}");
    stack.assert_no_secret_in_output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_a_background_call_cancels_it_at_the_provider() {
    // GIVEN a background response that never finishes, checked every 5 s
    let options = Options::new("offload-cancel")
        .setting("OPENAI_POLL_SECONDS", 5)
        .setting("LONGRUN_CAP_S", 900);
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    stack.connect_openai_key("jo").await;
    let params = json!({"input": "offload-b [[hang]]"});
    let task_id = stack
        .start_task("jo", "chat-jo", "refine_offloaded", params)
        .await;
    sleeping(&stack, &task_id).await;
    // WHEN the user cancels
    let cancelled = stack.ask("cancel", "jo", &task_id).await;
    assert_eq!(cancelled["status"], 200, "{cancelled}");
    // THEN the provider is told to cancel the response, and the task ends cancelled
    let result = stack.wait_result(&task_id, Duration::from_secs(30)).await;
    assert_eq!(
        result["summary"], "'refine_offloaded' was cancelled.",
        "{result}"
    );
    assert_eq!(
        stack.openai.calls_of(CallKind::Cancel, "offload-b").len(),
        1
    );
    let task = stack.wait_delivered(&task_id, WAIT).await;
    assert_eq!(task.state, TaskState::Cancelled);
    assert_eq!(stack.chat.results_for(&task_id).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_without_background_mode_gets_the_synchronous_call() {
    // GIVEN a provider without the Responses API
    let Some(stack) = Stack::start(Options::new("offload-sync")).await else {
        return;
    };
    stack.connect_openai_key("kim").await;
    let params = json!({"input": "offload-c [[no_background]]"});
    let task_id = stack
        .start_task("kim", "chat-kim", "refine_offloaded", params)
        .await;
    // THEN the function falls back to the synchronous completion
    let result = stack.wait_result(&task_id, WAIT).await;
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["data"]["text"], "Refined: offload-c");
    assert_eq!(
        stack.openai.calls_of(CallKind::Create, "offload-c").len(),
        1
    );
    assert_eq!(stack.openai.calls_of(CallKind::Chat, "offload-c").len(), 1);
    assert!(
        stack
            .openai
            .calls_of(CallKind::Check, "offload-c")
            .is_empty()
    );
}
