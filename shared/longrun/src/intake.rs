//! The intake step: parse and check the event, then `call` (Pattern A inline, B enqueued with
//! the platform's ack, C inline with `background_task`), `status`, `cancel` or `list`.
//! Every failure is an [`IntakeError`] with its contract status; no input panics, and a
//! refused request writes nothing.

use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::ctx::Caller;
use crate::outcome::panic_message;
use crate::ports::{PortError, RequestKey};
use crate::runtime::{EnqueueError, Runtime, TaskSpec};
use crate::task::{AuditItem, AuditKind, Task, TaskId, TaskKind, TaskState};
use crate::wire::{
    CallRequest, DeliveryMessage, IntakeError, IntakeResponse, ListRequest, MAX_EVENT_BYTES,
    MAX_LIST_LIMIT, MAX_NAME_CHARS, MAX_PARAMS_BYTES, TaskRequest, WorkMessage,
};
use crate::{ActionResult, ports::FinishGuard};

/// Handles an intake event given as raw bytes.
pub async fn handle_bytes(rt: &Runtime, event: &[u8]) -> IntakeResponse {
    if event.len() > MAX_EVENT_BYTES {
        return IntakeError::too_large(format!(
            "event is {} bytes; the limit is {MAX_EVENT_BYTES}",
            event.len()
        ))
        .into();
    }
    match serde_json::from_slice::<Value>(event) {
        Ok(value) => handle(rt, value).await,
        Err(err) => IntakeError::malformed(format!("event is not JSON: {err}")).into(),
    }
}

/// Handles an intake event.
pub async fn handle(rt: &Runtime, event: Value) -> IntakeResponse {
    let response = match dispatch(rt, event).await {
        Ok(response) => response,
        Err(error) => error.into(),
    };
    if let Some(error) = &response.error {
        tracing::info!(status = response.status, code = %error.code, message = %error.message, "intake refused");
    }
    response
}

async fn dispatch(rt: &Runtime, event: Value) -> Result<IntakeResponse, IntakeError> {
    let size = serde_json::to_vec(&event)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > MAX_EVENT_BYTES {
        return Err(IntakeError::too_large(format!(
            "event is {size} bytes; the limit is {MAX_EVENT_BYTES}"
        )));
    }
    let action = match event.get("action") {
        Some(Value::String(action)) => action.clone(),
        Some(_) => return Err(IntakeError::malformed("`action` must be a string")),
        None if event.is_object() => return Err(IntakeError::malformed("missing field `action`")),
        None => return Err(IntakeError::malformed("event must be a JSON object")),
    };
    match action.as_str() {
        "call" => call(rt, parse(event)?).await,
        "status" => status(rt, parse(event)?).await,
        "cancel" => cancel(rt, parse(event)?).await,
        "list" => list(rt, parse(event)?).await,
        other => Err(IntakeError::malformed(format!(
            "unknown action {:?}; expected call, status, cancel or list",
            truncate(other)
        ))),
    }
}

fn parse<T: DeserializeOwned>(event: Value) -> Result<T, IntakeError> {
    serde_path_to_error::deserialize(event).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            IntakeError::malformed(e.inner().to_string())
        } else {
            IntakeError::malformed(format!("{path}: {}", e.inner()))
        }
    })
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Checks an identity or name field: non-empty, bounded, printable.
fn check_name(field: &str, value: &str) -> Result<(), IntakeError> {
    if value.is_empty() {
        return Err(IntakeError::malformed(format!(
            "`{field}` must not be empty"
        )));
    }
    if value.chars().count() > MAX_NAME_CHARS {
        return Err(IntakeError::malformed(format!(
            "`{field}` is longer than {MAX_NAME_CHARS} characters"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(IntakeError::malformed(format!(
            "`{field}` contains control characters"
        )));
    }
    Ok(())
}

fn check_identity(rt: &Runtime, ext: &str, user: &str) -> Result<(), IntakeError> {
    check_name("ext", ext)?;
    check_name("user", user)?;
    if ext != rt.extension_name() {
        return Err(IntakeError::not_found(format!(
            "this deployment serves extension {:?}, not {:?}",
            rt.extension_name(),
            truncate(ext)
        )));
    }
    Ok(())
}

fn enqueue_error(err: EnqueueError) -> IntakeError {
    match err {
        EnqueueError::TooManyTasks { .. } => IntakeError::too_many_tasks(err.to_string()),
        EnqueueError::Port(err) => port_error(err),
    }
}

fn port_error(err: PortError) -> IntakeError {
    match err {
        PortError::Transient(_) => {
            IntakeError::unavailable(format!("{err}; retry with the same request_id"))
        }
        other => IntakeError::internal(other.to_string()),
    }
}

/// Refuses a call from a user who used up one of the extension's daily budgets (one Query of
/// the user's meters, only for an extension that declares budgets).
async fn check_budgets(rt: &Runtime, caller: &Caller) -> Result<(), IntakeError> {
    let Some(extension) = rt.extension().filter(|e| !e.budgets().is_empty()) else {
        return Ok(());
    };
    let today = rt.now().date_naive();
    let used = rt
        .services
        .usage
        .usage(&caller.ext, &caller.user, today)
        .await
        .map_err(port_error)?;
    for budget in extension.budgets() {
        let spent = used.get(&budget.meter).copied().unwrap_or(0);
        if spent >= budget.per_day {
            let over = crate::ChargeError::over_budget(budget, spent);
            return Err(IntakeError::over_budget(over.to_string()));
        }
    }
    Ok(())
}

async fn call(rt: &Runtime, req: CallRequest) -> Result<IntakeResponse, IntakeError> {
    check_identity(rt, &req.ext, &req.user)?;
    check_name("chat", &req.chat)?;
    check_name("function", &req.function)?;
    if let Some(request_id) = &req.request_id {
        check_name("request_id", request_id)?;
    }
    let function = rt
        .extension()
        .and_then(|e| e.get_function(&req.function))
        .ok_or_else(|| {
            IntakeError::not_found(format!("no function named {:?}", truncate(&req.function)))
        })?;
    let params_size = serde_json::to_vec(&req.params)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if params_size > MAX_PARAMS_BYTES {
        return Err(IntakeError::too_large(format!(
            "params are {params_size} bytes; the limit is {MAX_PARAMS_BYTES}"
        )));
    }
    // Before the schema, which may ignore the field: the task record keeps params whole.
    crate::wire::check_storable(&req.params)
        .map_err(|reason| IntakeError::invalid_params(format!("params {reason}")))?;
    function
        .validate(&req.params)
        .map_err(|e| IntakeError::invalid_params(e.to_string()))?;
    let caller = Caller {
        ext: req.ext,
        user: req.user,
        chat: req.chat,
    };
    check_budgets(rt, &caller).await?;

    if function.is_background() {
        // Pattern B: the worker runs the whole handler; the ack goes back at once.
        let request = req.request_id.clone().map(|request_id| RequestKey {
            ext: caller.ext.clone(),
            user: caller.user.clone(),
            request_id,
        });
        let spec = TaskSpec {
            caller,
            function: function.name().to_owned(),
            kind: TaskKind::Function,
            event: function.event_name().map(str::to_owned),
            name: None,
            long_running: function.is_long_running(),
            params: req.params,
        };
        let task = rt.new_task(spec, req.request_id);
        let task_id = rt.enqueue(task, request).await.map_err(enqueue_error)?;
        return Ok(IntakeResponse::result(background_ack(
            function.name(),
            &task_id,
        )));
    }

    // Patterns A and C: the handler runs here, bounded by the standard cap; whatever it
    // launches with `background_task` is enqueued as it goes.
    let cap = std::time::Duration::from_secs(rt.cap_seconds(false));
    let deadline = tokio::time::Instant::now() + cap;
    let function_name = function.name().to_owned();
    let ctx = rt.ctx(caller, Some(deadline), None, req.request_id);
    let run = AssertUnwindSafe(function.call(ctx, req.params)).catch_unwind();
    let result = match tokio::time::timeout_at(deadline, run).await {
        Ok(Ok(Ok(result))) => result,
        Ok(Ok(Err(ref err))) if let Some(result) = err.user_result() => result,
        Ok(Ok(Err(ref err)))
            if let Some(limited @ crate::BackgroundError::TooManyTasks { .. }) =
                err.downcast_ref::<crate::BackgroundError>() =>
        {
            return Err(IntakeError::too_many_tasks(limited.to_string()));
        }
        Ok(Ok(Err(err))) => {
            tracing::error!(function = %function_name, error = %err, "inline handler failed");
            ActionResult::error(format!("'{function_name}' failed: {err}"), true)
        }
        Ok(Err(panic)) => {
            tracing::error!(function = %function_name, panic = %panic_message(&*panic), "inline handler panicked");
            ActionResult::error(format!("'{function_name}' failed unexpectedly."), false)
        }
        Err(_) => ActionResult::error(
            format!(
                "'{function_name}' did not finish within {} s.",
                cap.as_secs()
            ),
            true,
        ),
    };
    if result.wire_size() > crate::wire::MAX_RESULT_BYTES {
        return Err(IntakeError::too_large(format!(
            "'{function_name}' returned a result larger than {} bytes",
            crate::wire::MAX_RESULT_BYTES
        )));
    }
    Ok(IntakeResponse::result(result))
}

/// Pattern B's automatic acknowledgement.
pub fn background_ack(function: &str, task_id: &TaskId) -> ActionResult {
    ActionResult::success(
        format!(
            "Started '{function}' in background — the result will be sent to chat when it finishes."
        ),
        serde_json::json!({ "task_id": task_id }),
    )
}

/// Loads a task and checks that `(ext, user)` owns it: 400, 404 or 403.
async fn owned_task(rt: &Runtime, req: &TaskRequest) -> Result<Task, IntakeError> {
    check_identity(rt, &req.ext, &req.user)?;
    let task_id: TaskId = req
        .task_id
        .parse()
        .map_err(|e: crate::task::InvalidTaskId| IntakeError::malformed(e.to_string()))?;
    let task = rt
        .services
        .tasks
        .get(&task_id)
        .await
        .map_err(port_error)?
        .ok_or_else(|| IntakeError::not_found(format!("no task {task_id}")))?;
    if !task.is_owned_by(&req.ext, &req.user) {
        tracing::warn!(task_id = %task_id, ext = %req.ext, user = %req.user, "cross-user task access refused");
        return Err(IntakeError::forbidden());
    }
    Ok(task)
}

async fn status(rt: &Runtime, req: TaskRequest) -> Result<IntakeResponse, IntakeError> {
    Ok(IntakeResponse::task(owned_task(rt, &req).await?))
}

async fn cancel(rt: &Runtime, req: TaskRequest) -> Result<IntakeResponse, IntakeError> {
    let task = owned_task(rt, &req).await?;
    cancel_task(rt, task).await.map(IntakeResponse::task)
}

/// Cancels a task on behalf of its owner (also used by the operators' CLI).
///
/// A queued task ends at once with the "cancelled" result; a running one gets its cancel flag,
/// which the worker reads at the next heartbeat or progress call; a sleeping one gets the flag
/// and is woken at once, and the worker that takes it up ends it; a finished one is a 409.
pub async fn cancel_task(rt: &Runtime, task: Task) -> Result<Task, IntakeError> {
    let tasks = &rt.services.tasks;
    let now = rt.now();
    match task.state {
        TaskState::Queued => {
            let finish = crate::ports::Finish {
                state: TaskState::Cancelled,
                // A task requeued after a partial run hands over what it recorded.
                result: crate::outcome::Outcome::cancelled(&task.function)
                    .with_partial(task.partial.as_ref())
                    .result,
                at: now,
                guard: FinishGuard::Queued,
                redeliver_at: rt.redeliver_at(now),
                audit: vec![AuditItem::new(
                    &task,
                    "cancelled",
                    AuditKind::Cancelled,
                    now,
                    "cancelled before start",
                )],
                progress: None,
                partial: None,
            };
            match tasks.finish(&task.task_id, &finish).await {
                Ok(ended) => {
                    let message = DeliveryMessage::Result {
                        task_id: ended.task_id.clone(),
                    };
                    if let Err(err) = rt.services.delivery.send(&message).await {
                        // The task's work message is still queued: the worker that takes it
                        // finds the task finished and sends the delivery then.
                        tracing::warn!(task_id = %ended.task_id, error = %err, "cancel delivery deferred to the worker");
                    }
                    Ok(ended)
                }
                // A worker claimed it in the meantime: ask the running task to stop instead.
                Err(PortError::Conflict(_)) => request_running_cancel(rt, &task).await,
                Err(err) => Err(port_error(err)),
            }
        }
        TaskState::Running | TaskState::Sleeping => request_running_cancel(rt, &task).await,
        // Every other state is terminal.
        state => Err(IntakeError::conflict(format!(
            "task {} already ended as {state}",
            task.task_id
        ))),
    }
}

async fn request_running_cancel(rt: &Runtime, task: &Task) -> Result<Task, IntakeError> {
    let now = rt.now();
    match rt.services.tasks.request_cancel(&task.task_id, now).await {
        Ok(updated) => {
            let audit = AuditItem::new(
                &updated,
                "cancel_requested",
                AuditKind::CancelRequested,
                now,
                "",
            );
            rt.services
                .tasks
                .append_audit(&audit)
                .await
                .map_err(port_error)?;
            if updated.state == TaskState::Sleeping {
                // Wake it now: the worker that takes it up runs its stop hook and ends it.
                if let Err(err) = rt
                    .services
                    .work
                    .send(&WorkMessage::carrying_on(&updated))
                    .await
                {
                    tracing::warn!(task_id = %updated.task_id, error = %err, "sleeping task not woken; it ends cancelled when it wakes");
                }
            }
            Ok(updated)
        }
        Err(PortError::Conflict(_)) => {
            // It finished (or was cancelled) between our read and our write.
            let current = rt
                .services
                .tasks
                .get(&task.task_id)
                .await
                .map_err(port_error)?;
            match current {
                Some(t) if t.state.is_terminal() => Err(IntakeError::conflict(format!(
                    "task {} already ended as {}",
                    t.task_id, t.state
                ))),
                Some(t) if t.state == TaskState::Queued => Box::pin(cancel_task(rt, t)).await,
                _ => Err(IntakeError::unavailable(
                    "task changed while cancelling; retry",
                )),
            }
        }
        Err(err) => Err(port_error(err)),
    }
}

async fn list(rt: &Runtime, req: ListRequest) -> Result<IntakeResponse, IntakeError> {
    check_identity(rt, &req.ext, &req.user)?;
    let limit = req.limit.unwrap_or(20);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(IntakeError::malformed(format!(
            "`limit` must be within 1–{MAX_LIST_LIMIT}"
        )));
    }
    let tasks = rt
        .services
        .tasks
        .list_by_user(&req.ext, &req.user, limit)
        .await
        .map_err(port_error)?;
    Ok(IntakeResponse::tasks(
        tasks.into_iter().map(list_entry).collect(),
    ))
}

/// A task as `list` shows it: without its `params`, and without result `data` larger than
/// [`crate::wire::MAX_LIST_DATA_BYTES`], so a full list stays within Lambda's response limit.
fn list_entry(mut task: Task) -> Task {
    task.params = Value::Null;
    if let Some(result) = &mut task.result {
        let size = serde_json::to_vec(&result.data).map_or(usize::MAX, |v| v.len());
        if size > crate::wire::MAX_LIST_DATA_BYTES {
            result.data = None;
        }
    }
    task
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::ports::UsageStore;
    use crate::testing::fixture::*;

    #[tokio::test(start_paused = true)]
    async fn pattern_a_answers_inline_and_writes_no_task() {
        // GIVEN a synchronous function
        let (stack, _) = stack();
        // WHEN it is called
        let response = stack
            .intake(call_event("sync", "u1", json!({"input": "hi"})))
            .await;
        // THEN the result comes back in the response and nothing was enqueued
        assert_eq!(response.status, 200);
        assert_eq!(
            response.result.unwrap(),
            ActionResult::success("done inline", json!({"echo": "hi"}))
        );
        assert!(stack.tasks.all().is_empty());
        assert!(stack.work.pending().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn pattern_b_acks_at_once_with_the_task_id() {
        let (stack, runs) = stack();
        let response = stack
            .intake(call_event("bg", "u1", json!({"input": "hi"})))
            .await;
        assert_eq!(response.status, 200);
        let result = response.result.clone().unwrap();
        let task_id = task_id_of(&response);
        assert_eq!(
            result.summary,
            "Started 'bg' in background — the result will be sent to chat when it finishes."
        );
        assert!(result.ok);
        // The handler has not run; the task is queued with its work message sent.
        assert_eq!(runs.started.load(std::sync::atomic::Ordering::SeqCst), 0);
        let task = task(&stack, &task_id).await;
        assert_eq!(task.state, TaskState::Queued);
        assert_eq!(task.cap_s, 180);
        assert_eq!(stack.work.pending().len(), 1);
        assert_eq!(
            count(&audit_kinds(&stack, &task_id).await, AuditKind::Created),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_user_over_a_daily_budget_is_refused_until_reset_and_others_are_not() {
        // GIVEN a budget of 100 test tokens a day, and u1 spending 60 twice
        let (stack, _) = stack();
        let spend = |user: &str| call_event("spend", user, json!({"n": 60}));
        let first = stack.intake(spend("u1")).await;
        assert_eq!(first.result.unwrap().data, Some(json!({"used": 60})));
        // WHEN the second charge takes u1 past the budget
        let second = stack.intake(spend("u1")).await;
        // THEN that call answers with the budget message (the use is recorded)…
        assert_eq!(second.status, 200);
        let message = "Your daily budget of 100 test tokens is used up; it renews at 00:00 UTC.";
        assert_eq!(second.result.unwrap(), ActionResult::error(message, false));
        // …and the next call of any function is refused before it runs, with the same words
        let refused = stack.intake(call_event("bg", "u1", json!({}))).await;
        assert_eq!(refused.status, 429);
        let error = refused.error.unwrap();
        assert_eq!(
            (error.code.as_str(), error.message.as_str()),
            ("over_budget", message)
        );
        assert!(stack.work.pending().is_empty(), "nothing enqueued");
        // AND u2 is not affected
        assert_eq!(stack.intake(spend("u2")).await.status, 200);
        // AND once u1's usage is reset, u1 may call again
        let today = stack.rt.now().date_naive();
        assert_eq!(
            stack.usage.usage(EXT, "u1", today).await.unwrap(),
            std::collections::BTreeMap::from([("tokens".to_owned(), 120)])
        );
        stack.usage.reset(EXT, "u1", today, None).await.unwrap();
        assert_eq!(stack.intake(spend("u1")).await.status, 200);
    }

    #[tokio::test(start_paused = true)]
    async fn a_user_at_the_task_limit_is_refused_and_others_are_not() {
        // GIVEN u1 with 10 background tasks queued (the default limit)
        let (stack, runs) = stack();
        for _ in 0..10 {
            assert_eq!(
                stack.intake(call_event("bg", "u1", json!({}))).await.status,
                200
            );
        }
        // WHEN u1 calls an 11th, and launches a job through Pattern C
        let refused = stack.intake(call_event("bg", "u1", json!({}))).await;
        let launched = stack.intake(call_event("launch", "u1", json!({}))).await;
        // THEN both are answered 429 too_many_tasks, with a message for the user
        for response in [&refused, &launched] {
            assert_eq!(response.status, 429);
            let error = response.error.as_ref().unwrap();
            assert_eq!(error.code, "too_many_tasks");
            assert!(
                error.message.contains("10 tasks queued or running"),
                "{error:?}"
            );
        }
        // AND u2 is not affected
        assert_eq!(
            stack.intake(call_event("bg", "u2", json!({}))).await.status,
            200
        );
        // AND the refused task's work message, already sent, runs nothing: 11 handlers ran
        // (u1's ten and u2's one), 11 results reached the chats
        assert_eq!(stack.work.pending().len(), 13);
        stack.drain(50).await;
        assert_eq!(runs.started.load(std::sync::atomic::Ordering::SeqCst), 11);
        assert_eq!(results_in(&stack, "chat-u1").len(), 10);
        assert_eq!(results_in(&stack, "chat-u2").len(), 1);
        let listed = stack
            .intake(json!({"action":"list","ext":EXT,"user":"u1","limit":100}))
            .await;
        assert_eq!(listed.tasks.unwrap().len(), 10);
        // AND once u1's tasks ended, u1 may call again
        assert_eq!(
            stack.intake(call_event("bg", "u1", json!({}))).await.status,
            200
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_count_left_by_a_lost_release_does_not_lock_a_user_out() {
        // GIVEN u1's count holding 10 tasks that do not exist (their release was lost)
        let (stack, _) = stack();
        for _ in 0..10 {
            let ghost = TaskId::generate(stack.rt.now());
            stack.tasks.count_active(EXT, "u1", &ghost);
        }
        // WHEN u1 calls
        let response = stack.intake(call_event("bg", "u1", json!({}))).await;
        // THEN the count is repaired and the call accepted
        assert_eq!(response.status, 200, "{:?}", response.error);
    }

    #[tokio::test(start_paused = true)]
    async fn pattern_c_returns_the_custom_ack_and_enqueues_the_job() {
        let (stack, _) = stack();
        let response = stack
            .intake(call_event("launch", "u1", json!({"input": "doc"})))
            .await;
        assert_eq!(
            response.result.as_ref().unwrap().summary,
            "Got it — working on it."
        );
        let task = task(&stack, &task_id_of(&response)).await;
        assert_eq!(task.kind, TaskKind::Job);
        assert_eq!(task.function, "job");
        assert_eq!(task.name.as_deref(), Some("the job"));
        assert_eq!(task.event.as_deref(), Some("job_done"));
        assert_eq!((task.user.as_str(), task.chat.as_str()), ("u1", "chat-u1"));
    }

    #[tokio::test(start_paused = true)]
    async fn background_task_checks_the_job_input() {
        let (stack, _) = stack();
        let response = stack
            .intake(call_event("launch_bad", "u1", json!({})))
            .await;
        let result = response.result.unwrap();
        assert!(!result.ok);
        assert!(
            result.summary.contains("params.input: invalid type"),
            "{}",
            result.summary
        );
        assert!(stack.tasks.all().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_retried_request_returns_the_same_task() {
        // GIVEN a call with a request_id
        let (stack, runs) = stack();
        let mut event = call_event("bg", "u1", json!({"input": "hi"}));
        event["request_id"] = json!("r-1");
        let first = task_id_of(&stack.intake(event.clone()).await);
        // WHEN the platform retries it
        let second = task_id_of(&stack.intake(event.clone()).await);
        // THEN the same task comes back, and the run happens once
        assert_eq!(first, second);
        assert_eq!(stack.tasks.all().len(), 1);
        stack.drain(20).await;
        assert_eq!(runs.started.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retried_pattern_c_request_launches_no_second_job() {
        let (stack, _) = stack();
        let mut event = call_event("launch", "u1", json!({"input": "doc"}));
        event["request_id"] = json!("r-9");
        let first = task_id_of(&stack.intake(event.clone()).await);
        let second = task_id_of(&stack.intake(event).await);
        assert_eq!(first, second);
        assert_eq!(stack.tasks.all().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn cross_user_access_is_forbidden_and_leaks_nothing() {
        // GIVEN user A's task
        let (stack, _) = stack();
        let task_id = task_id_of(
            &stack
                .intake(call_event("bg", "alice", json!({"input": "secret plan"})))
                .await,
        );
        for action in ["status", "cancel"] {
            // WHEN user B asks about it
            let response = stack
                .intake(json!({"action": action, "ext": EXT, "user": "bob", "task_id": task_id}))
                .await;
            // THEN 403, and no task data in the answer
            assert_eq!(response.status, 403, "{action}");
            assert!(response.task.is_none());
            assert!(
                !serde_json::to_string(&response)
                    .unwrap()
                    .contains("secret plan")
            );
        }
        let list = stack
            .intake(json!({"action": "list", "ext": EXT, "user": "bob"}))
            .await;
        assert_eq!(list.tasks.unwrap(), vec![]);
        // AND A's task was not cancelled
        assert_eq!(task(&stack, &task_id).await.state, TaskState::Queued);
    }

    #[tokio::test(start_paused = true)]
    async fn list_shows_the_users_tasks_newest_first() {
        let (stack, _) = stack();
        let first = task_id_of(&stack.intake(call_event("bg", "u1", json!({}))).await);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let second = task_id_of(&stack.intake(call_event("bg", "u1", json!({}))).await);
        let response = stack
            .intake(json!({"action":"list","ext":EXT,"user":"u1","limit":20}))
            .await;
        let ids: Vec<TaskId> = response
            .tasks
            .unwrap()
            .into_iter()
            .map(|t| t.task_id)
            .collect();
        assert_eq!(ids, vec![second, first]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_largest_list_fits_lambdas_response_limit() {
        // GIVEN a user with 100 tasks, each with the largest params
        let (stack, _) = stack_with(crate::Settings {
            max_active_tasks: 100,
            ..crate::Settings::default()
        });
        let big = "x".repeat(MAX_PARAMS_BYTES - 100);
        for _ in 0..MAX_LIST_LIMIT {
            let ack = stack
                .intake(call_event("bg", "u1", json!({ "text": big })))
                .await;
            assert_eq!(ack.status, 200);
        }
        // WHEN they list them all
        let response = stack
            .intake(json!({"action":"list","ext":EXT,"user":"u1","limit":MAX_LIST_LIMIT}))
            .await;
        // THEN the answer holds all 100, without their params, under Lambda's 6 MB
        let tasks = response.tasks.as_ref().unwrap();
        assert_eq!(tasks.len(), MAX_LIST_LIMIT);
        assert!(tasks.iter().all(|t| t.params.is_null()));
        let size = serde_json::to_vec(&response).unwrap().len();
        assert!(size < 6_000_000, "{size} bytes");
        // AND status still returns the params whole
        let id = tasks[0].task_id.clone();
        let status = stack
            .intake(json!({"action":"status","ext":EXT,"user":"u1","task_id":id}))
            .await;
        assert_eq!(status.task.unwrap().params["text"], json!(big));
    }

    #[tokio::test(start_paused = true)]
    async fn a_list_entry_drops_large_result_data_and_keeps_small() {
        let (stack, _) = stack();
        let id = task_id_of(&stack.intake(call_event("bg", "u1", json!({}))).await);
        let stored = task(&stack, &id).await;
        let with = |data: Value| {
            let mut t = stored.clone();
            t.result = Some(ActionResult::success("done", data));
            list_entry(t)
        };
        let small = with(json!({"text": "short"})).result.unwrap();
        assert_eq!(small.data, Some(json!({"text": "short"})));
        let large = with(json!({"text": "y".repeat(20_000)})).result.unwrap();
        assert_eq!((large.summary.as_str(), large.data), ("done", None));
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_of_a_finished_task_is_a_conflict() {
        let (stack, _) = stack();
        let task_id = task_id_of(&stack.intake(call_event("bg", "u1", json!({}))).await);
        stack.drain(20).await;
        let response = stack
            .intake(json!({"action":"cancel","ext":EXT,"user":"u1","task_id":task_id}))
            .await;
        assert_eq!(response.status, 409);
        assert_eq!(response.error.unwrap().code, "conflict");
    }

    /// Each bad input, its status and the words its message must contain.
    fn bad_inputs() -> Vec<(Value, u16, &'static str)> {
        let big = "x".repeat(MAX_PARAMS_BYTES);
        vec![
            (json!("not an object"), 400, "JSON object"),
            (json!([1, 2]), 400, "JSON object"),
            (json!({}), 400, "missing field `action`"),
            (json!({"action": 7}), 400, "`action` must be a string"),
            (
                json!({"action": "explode", "ext": EXT}),
                400,
                "unknown action",
            ),
            (
                json!({"action":"call","user":"u","chat":"c","function":"bg"}),
                400,
                "missing field `ext`",
            ),
            (
                json!({"action":"call","ext":EXT,"chat":"c","function":"bg"}),
                400,
                "missing field `user`",
            ),
            (
                json!({"action":"call","ext":EXT,"user":"u","function":"bg"}),
                400,
                "missing field `chat`",
            ),
            (
                json!({"action":"call","ext":EXT,"user":"u","chat":"c"}),
                400,
                "missing field `function`",
            ),
            (
                json!({"action":"call","ext":EXT,"user":5,"chat":"c","function":"bg"}),
                400,
                "user: invalid type",
            ),
            (
                json!({"action":"call","ext":EXT,"user":"","chat":"c","function":"bg"}),
                400,
                "`user` must not be empty",
            ),
            (
                json!({"action":"call","ext":EXT,"user":"u\u{0}","chat":"c","function":"bg"}),
                400,
                "control characters",
            ),
            (
                json!({"action":"call","ext":EXT,"user":"u","chat":"c\n","function":"bg"}),
                400,
                "control characters",
            ),
            (
                json!({"action":"call","ext":EXT,"user":"u".repeat(200),"chat":"c","function":"bg"}),
                400,
                "longer than",
            ),
            (
                json!({"action":"call","ext":EXT,"user":"u","chat":"c","function":"nope"}),
                404,
                "no function named",
            ),
            (
                json!({"action":"call","ext":"other-ext","user":"u","chat":"c","function":"bg"}),
                404,
                "serves extension",
            ),
            (
                json!({"action":"call","ext":EXT,"user":"u","chat":"c","function":"bg","params":{"input":5}}),
                422,
                "params.input",
            ),
            (
                json!({"action":"call","ext":EXT,"user":"u","chat":"c","function":"bg","params":[1]}),
                422,
                "params",
            ),
            (
                json!({"action":"call","ext":EXT,"user":"u","chat":"c","function":"bg","params":{"input":big}}),
                413,
                "limit",
            ),
            // Valid JSON the task table cannot store, in a field the function ignores.
            (
                json!({"action":"call","ext":EXT,"user":"u","chat":"c","function":"bg","params":{"input":"hi","extra":1e300}}),
                422,
                "params holds the number 1e+300",
            ),
            (
                json!({"action":"call","ext":EXT,"user":"u","chat":"c","function":"bg","params":{"input":"hi","extra":crate::wire::tests::nested(40)}}),
                422,
                "params nests deeper than the 32 levels",
            ),
            (
                json!({"action":"status","ext":EXT,"user":"u","task_id":"not-a-ulid"}),
                400,
                "not a ULID",
            ),
            (
                json!({"action":"status","ext":EXT,"user":"u","task_id":"../../etc/passwd"}),
                400,
                "not a ULID",
            ),
            (
                json!({"action":"status","ext":EXT,"user":"u","task_id":"01JDZQ6V4E1YQ7K3ZC6M4T9H8P"}),
                404,
                "no task",
            ),
            (
                json!({"action":"cancel","ext":EXT,"user":"u","task_id":"01JDZQ6V4E1YQ7K3ZC6M4T9H8P"}),
                404,
                "no task",
            ),
            (
                json!({"action":"status","ext":EXT,"user":"u"}),
                400,
                "missing field `task_id`",
            ),
            (
                json!({"action":"list","ext":EXT,"user":"u","limit":0}),
                400,
                "`limit`",
            ),
            (
                json!({"action":"list","ext":EXT,"user":"u","limit":100000}),
                400,
                "`limit`",
            ),
            (
                json!({"action":"list","ext":EXT,"user":"u","limit":-1}),
                400,
                "limit",
            ),
        ]
    }

    #[tokio::test(start_paused = true)]
    async fn bad_input_gets_its_status_and_writes_nothing() {
        let (stack, _) = stack();
        for (event, status, words) in bad_inputs() {
            let response = stack.intake(event.clone()).await;
            let error = response
                .error
                .clone()
                .unwrap_or_else(|| panic!("{event} was accepted"));
            assert_eq!(response.status, status, "{event}: {error:?}");
            assert!(
                error.message.contains(words),
                "{event}: {:?} lacks {words:?}",
                error.message
            );
        }
        assert_eq!(stack.tasks.writes(), 0);
        assert!(stack.work.pending().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_that_are_not_json_are_a_400() {
        let (stack, _) = stack();
        for bytes in [&b"{"[..], b"", b"\xff\xfe", b"{\"action\":\"call\",}"] {
            let response = handle_bytes(&stack.rt, bytes).await;
            assert_eq!(response.status, 400);
        }
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(handle_bytes(&stack.rt, deep.as_bytes()).await.status, 400);
        let huge = vec![b' '; MAX_EVENT_BYTES + 1];
        assert_eq!(handle_bytes(&stack.rt, &huge).await.status, 413);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_work_message_still_acks_and_the_sweeper_resends_it() {
        // GIVEN the work queue refuses the message
        let (stack, runs) = stack();
        stack.work.fail_next_sends(1);
        // WHEN the call is made, the ack is given (the record is written)
        let response = stack.intake(call_event("bg", "u1", json!({}))).await;
        assert_eq!(response.status, 200);
        assert!(stack.work.pending().is_empty());
        // AND once the queue lease lapses the sweeper sends it, and it runs once
        tokio::time::sleep(stack.rt.settings.queue_grace + std::time::Duration::from_secs(1)).await;
        assert_eq!(crate::sweeper::sweep(&stack.rt).await.unwrap().requeued, 1);
        stack.drain(20).await;
        assert_eq!(runs.started.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_table_write_is_a_503_and_a_retry_runs_once() {
        // GIVEN the message went out but the record write failed
        let (stack, runs) = stack();
        stack.tasks.fail_next_writes(1);
        let mut event = call_event("bg", "u1", json!({}));
        event["request_id"] = json!("r-2");
        let response = stack.intake(event.clone()).await;
        assert_eq!(response.status, 503);
        // WHEN the platform retries with the same request_id
        let retried = stack.intake(event).await;
        // THEN one task, run once, one result
        assert_eq!(retried.status, 200);
        stack.drain(20).await;
        assert_eq!(stack.tasks.all().len(), 1);
        assert_eq!(runs.started.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(results_in(&stack, "chat-u1").len(), 1);
    }
}
