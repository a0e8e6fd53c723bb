//! [`TestStack`]: an extension's whole pipeline in memory, driven as a chat would drive it.

use std::sync::Arc;

use serde_json::{Value, json};

use super::memory::MemoryQueue;
use super::stack::MemoryStack;
use crate::ports::{Clock, TaskStore, TokioClock};
use crate::task::{AuditItem, AuditKind, Task, TaskId};
use crate::wire::{ChatMessage, IntakeResponse};
use crate::{ActionResult, Extension, Settings};

/// The most queue rounds [`TestStack::run_until_idle`] plays: a task that hands itself on or
/// re-sends messages forever stops here instead of hanging the test.
const MAX_ROUNDS: usize = 1_000;

/// An extension's whole pipeline in memory: intake, the work and delivery queues, the worker,
/// delivery, the task table, the audit trail, secrets, `ctx.store` and a chat that records
/// every message.
///
/// ```
/// # use longrun::{ActionResult, ChatFunction, Ctx, Extension};
/// # use longrun::testing::TestStack;
/// # #[derive(serde::Deserialize, schemars::JsonSchema)] struct Params { input: String }
/// async fn shout(ctx: Ctx, p: Params) -> longrun::Result<ActionResult> {
///     ctx.progress(50, "Shouting").await?;
///     Ok(ActionResult::success("Done", serde_json::json!({"text": p.input.to_uppercase()})))
/// }
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let stack = TestStack::new(
///     Extension::new("demo").function(ChatFunction::new("shout", shout).background(true)),
/// );
/// // GIVEN a background call: the ack comes at once, with the task id
/// let called = stack.call("u1", "shout", serde_json::json!({"input": "hi"})).await;
/// assert_eq!(called.status(), 200);
/// let task_id = called.task_id().expect("a background task");
/// // WHEN the queues run until nothing is left to do
/// stack.run_until_idle().await;
/// // THEN the user's chat holds the progress and exactly one result, and the task is done
/// let results = stack.results("u1");
/// assert_eq!(results.len(), 1);
/// assert_eq!(results[0].data.as_ref().unwrap()["text"], "HI");
/// assert_eq!(stack.task(&task_id).await.unwrap().state, longrun::TaskState::Succeeded);
/// assert_eq!(stack.audit_count(&task_id, longrun::task::AuditKind::Delivered).await, 1);
/// # }
/// ```
#[derive(Clone)]
pub struct TestStack {
    stack: MemoryStack,
}

/// What intake answered to a call.
#[derive(Debug, Clone, PartialEq)]
pub struct Called {
    /// The whole intake response (status, result or error).
    pub response: IntakeResponse,
}

impl Called {
    /// The contract status: 200, or a 4xx/5xx with an error.
    pub fn status(&self) -> u16 {
        self.response.status
    }

    /// The `ActionResult` of a 200 call: the inline result (Pattern A), the ack (Pattern B) or
    /// the handler's own ack (Pattern C).
    pub fn result(&self) -> Option<&ActionResult> {
        self.response.result.as_ref()
    }

    /// The task a background call started (`data.task_id` of the ack), if any.
    pub fn task_id(&self) -> Option<TaskId> {
        let id = self.result()?.data.as_ref()?.get("task_id")?;
        serde_json::from_value(id.clone()).ok()
    }

    /// The error code of a refused call (`invalid_params`, `not_found`, …).
    pub fn error_code(&self) -> Option<&str> {
        self.response.error.as_ref().map(|e| e.code.as_str())
    }
}

impl TestStack {
    /// A stack for `extension` with the production settings (180 s / 1800 s caps, 5 s
    /// heartbeat). Its clock follows tokio's, so it works on a paused clock too.
    pub fn new(extension: Extension) -> Self {
        Self::with_settings(extension, Settings::default())
    }

    /// A stack for `extension` with `settings` (e.g. a shorter `cap_override`).
    pub fn with_settings(extension: Extension, settings: Settings) -> Self {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::starting_at(chrono::Utc::now()));
        Self {
            stack: MemoryStack::with_clock(extension, settings, clock),
        }
    }

    /// The chat a user's calls come from: `chat-{user}`.
    pub fn chat_of(user: &str) -> String {
        format!("chat-{user}")
    }

    /// Connects `user`'s secret `name` (what `ctx.secrets.get(name)` returns).
    pub fn secret(&self, user: &str, name: &str, value: &str) -> &Self {
        self.stack.secrets.set(self.ext(), user, name, value);
        self
    }

    /// The extension's name.
    pub fn ext(&self) -> &str {
        self.stack.rt.extension_name()
    }

    /// Calls `function` as `user` from the chat `chat-{user}`.
    pub async fn call(&self, user: &str, function: &str, params: Value) -> Called {
        let event = json!({
            "action": "call", "ext": self.ext(), "user": user, "chat": Self::chat_of(user),
            "function": function, "params": params,
        });
        self.intake(event).await
    }

    /// Sends any intake event (`call`, `status`, `cancel`, `list`) as the chat platform would.
    pub async fn intake(&self, event: Value) -> Called {
        Called {
            response: self.stack.intake(event).await,
        }
    }

    /// Asks to cancel `task_id` as `user`.
    pub async fn cancel(&self, user: &str, task_id: &TaskId) -> Called {
        self.intake(
            json!({"action": "cancel", "ext": self.ext(), "user": user, "task_id": task_id}),
        )
        .await
    }

    /// Runs the worker and delivery until both queues are empty: every queued task runs (and
    /// resumes, if it hands itself on or sleeps — under tokio's paused clock a `ctx.sleep`
    /// passes at once), and every result and progress message is posted.
    pub async fn run_until_idle(&self) {
        self.stack.drain(MAX_ROUNDS).await;
    }

    /// Runs one worker invocation over the waiting work messages (up to a batch of 10), and
    /// nothing else; returns how many it took. With [`TestStack::deliver_once`], for tests
    /// that look between the steps.
    pub async fn work_once(&self) -> usize {
        self.stack.work_once().await
    }

    /// Runs one delivery invocation over the waiting delivery messages.
    pub async fn deliver_once(&self) -> usize {
        self.stack.deliver_once().await
    }

    /// Every message posted to `user`'s chat, in order.
    pub fn messages(&self, user: &str) -> Vec<ChatMessage> {
        self.stack.chat.in_chat(&Self::chat_of(user))
    }

    /// The results posted to `user`'s chat, in order.
    pub fn results(&self, user: &str) -> Vec<ActionResult> {
        self.messages(user)
            .into_iter()
            .filter_map(|m| match m {
                ChatMessage::Result { result, .. } => Some(result),
                ChatMessage::Progress { .. } => None,
            })
            .collect()
    }

    /// The progress percentages posted to `user`'s chat, in order.
    pub fn progress(&self, user: &str) -> Vec<u8> {
        self.messages(user)
            .into_iter()
            .filter_map(|m| match m {
                ChatMessage::Progress { progress, .. } => Some(progress.pct),
                ChatMessage::Result { .. } => None,
            })
            .collect()
    }

    /// The task record, as an operator reads it.
    pub async fn task(&self, task_id: &TaskId) -> Option<Task> {
        self.stack.tasks.get(task_id).await.ok().flatten()
    }

    /// The task's audit trail, oldest first.
    pub async fn audit(&self, task_id: &TaskId) -> Vec<AuditItem> {
        self.stack
            .tasks
            .audit_trail(task_id)
            .await
            .unwrap_or_default()
    }

    /// How many audit items of `kind` the task has.
    pub async fn audit_count(&self, task_id: &TaskId, kind: AuditKind) -> usize {
        self.audit(task_id)
            .await
            .iter()
            .filter(|a| a.kind == kind)
            .count()
    }

    /// What `ctx.store` holds under `key` for `user`.
    pub async fn stored(&self, user: &str, key: &str) -> Option<Value> {
        use crate::ports::KvStore;
        self.stack
            .kv
            .get(self.ext(), user, key)
            .await
            .ok()
            .flatten()
    }

    /// The work messages waiting (nothing has run them yet).
    pub fn work_queue(&self) -> &MemoryQueue<crate::wire::WorkMessage> {
        &self.stack.work
    }

    /// The lower-level stack underneath (injected failures, raw queues).
    pub fn memory(&self) -> &MemoryStack {
        &self.stack
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;
    use crate::{ChatFunction, Ctx, TaskState};

    #[derive(Deserialize, schemars::JsonSchema)]
    struct Params {
        #[serde(default)]
        input: String,
    }

    struct Greeting(&'static str);

    async fn keyed(ctx: Ctx, p: Params) -> crate::Result<ActionResult> {
        let key = ctx.secrets.require("api_key").await?;
        let greeting = ctx.state::<Greeting>()?;
        ctx.progress(50, "Working").await?;
        Ok(ActionResult::success(
            greeting.0,
            json!({"input": p.input, "key_len": key.expose().len()}),
        ))
    }

    async fn stateless(ctx: Ctx, _p: Params) -> crate::Result<ActionResult> {
        let missing = ctx.state::<String>().unwrap_err();
        Ok(ActionResult::success(missing.to_string(), ()))
    }

    fn extension() -> Extension {
        Extension::new("kit")
            .secret("api_key", "Example key")
            .with_state(Greeting("Hello"))
            .function(ChatFunction::new("inline", keyed))
            .function(ChatFunction::new("later", keyed).background(true))
            .function(ChatFunction::new("stateless", stateless))
    }

    #[tokio::test(start_paused = true)]
    async fn a_secret_not_connected_answers_the_user_inline_and_in_the_background() {
        // GIVEN a user who connected nothing
        let stack = TestStack::new(extension());
        // WHEN they call the inline and the background function
        let inline = stack.call("u1", "inline", json!({})).await;
        let later = stack.call("u1", "later", json!({})).await;
        stack.run_until_idle().await;
        // THEN both answers name the declared secret, not retryable, with no critical audit
        let inline = inline.result().unwrap();
        assert_eq!(
            (inline.ok, inline.summary.as_str(), inline.retryable),
            (false, "Example key not connected", false)
        );
        let results = stack.results("u1");
        assert_eq!(results.len(), 1);
        assert_eq!(results[0].summary, "Example key not connected");
        let task_id = later.task_id().unwrap();
        assert_eq!(stack.audit_count(&task_id, AuditKind::Critical).await, 0);
        assert_eq!(
            stack.task(&task_id).await.unwrap().state,
            TaskState::Succeeded
        );
    }

    #[tokio::test(start_paused = true)]
    async fn state_and_secrets_reach_every_handler() {
        let stack = TestStack::new(extension());
        stack.secret("u1", "api_key", "sk-1234");
        let inline = stack.call("u1", "inline", json!({"input": "x"})).await;
        assert_eq!(inline.result().unwrap().summary, "Hello");
        assert_eq!(
            inline.result().unwrap().data.as_ref().unwrap()["key_len"],
            7
        );
        let later = stack.call("u1", "later", json!({"input": "y"})).await;
        stack.run_until_idle().await;
        assert_eq!(stack.results("u1")[0].summary, "Hello");
        let task = stack.task(&later.task_id().unwrap()).await.unwrap();
        assert_eq!(task.progress.pct, 50);
        // Another user's secret is not this one's.
        stack.call("u2", "later", json!({})).await;
        stack.run_until_idle().await;
        assert_eq!(stack.results("u2")[0].summary, "Example key not connected");
        let missing = stack.call("u1", "stateless", json!({})).await;
        assert!(
            missing
                .result()
                .unwrap()
                .summary
                .contains("no state of type alloc::string::String"),
            "{missing:?}"
        );
    }
}
