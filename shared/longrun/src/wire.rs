//! Wire contracts: the intake event and its response, the work and delivery queue messages,
//! and the chat API body. These shapes are what other systems see; change them with care.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ActionResult;
use crate::task::{Progress, Task, TaskId, TaskKind, TaskState};

/// Largest accepted `params`, serialized: the task record keeps them, and a DynamoDB item
/// holds 400 KB in all (result, audit fields and attribute names included).
pub const MAX_PARAMS_BYTES: usize = 128 * 1024;
/// Largest `ActionResult` a task may end with, serialized.
pub const MAX_RESULT_BYTES: usize = 128 * 1024;
/// Largest intake event, serialized.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;
/// Longest `ext`, `user`, `chat`, `function` or `request_id`.
pub const MAX_NAME_CHARS: usize = 128;
/// Most tasks one `list` returns.
pub const MAX_LIST_LIMIT: usize = 100;
/// Largest result `data` a `list` entry carries, serialized; larger data is left out there
/// (`status` returns it whole). With `params` left out of `list`, this keeps the largest
/// `list` answer well under Lambda's 6 MB response limit.
pub const MAX_LIST_DATA_BYTES: usize = 16 * 1024;

/// Deepest nesting DynamoDB stores in an item: 32 levels, the attribute itself (`params`,
/// `result`, a step's `output`) counting as the first and a plain value (a string, a number)
/// as one too — so `{"a":{"a":…1}}` may hold 31 objects.
pub const MAX_NESTING_LEVELS: usize = 32;
/// Largest number magnitude DynamoDB stores (it allows up to 9.9999…E+125).
const MAX_NUMBER_MAGNITUDE: f64 = 1e126;
/// Smallest non-zero number magnitude DynamoDB stores.
const MIN_NUMBER_MAGNITUDE: f64 = 1e-130;

/// Why a value cannot be kept in the task table: [`fits`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unfit {
    /// Its JSON takes `size` bytes, more than the limit.
    TooLarge { size: usize },
    /// DynamoDB would refuse it ([`check_storable`]).
    Unstorable(String),
}

/// Whether `value` takes at most `limit` bytes as JSON and the task table can store it: the
/// check of a step output, a partial result and a job input.
pub(crate) fn fits(value: &Value, limit: usize) -> Result<(), Unfit> {
    let size = serde_json::to_vec(value)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > limit {
        return Err(Unfit::TooLarge { size });
    }
    check_storable(value).map_err(Unfit::Unstorable)
}

/// Why DynamoDB would refuse to store `value` although it is valid JSON: nesting deeper than
/// [`MAX_NESTING_LEVELS`], or a number outside DynamoDB's range (1E-130 to 9.99E+125 in
/// magnitude; JSON allows up to about 1.8E+308). Integers of 64 bits always fit.
pub fn check_storable(value: &Value) -> Result<(), String> {
    fn walk(value: &Value, level: usize) -> Result<(), String> {
        match value {
            _ if level > MAX_NESTING_LEVELS => Err(format!(
                "nests deeper than the {MAX_NESTING_LEVELS} levels the task table stores"
            )),
            Value::Array(items) => items.iter().try_for_each(|v| walk(v, level + 1)),
            Value::Object(fields) => fields.values().try_for_each(|v| walk(v, level + 1)),
            Value::Number(n) if n.is_f64() => {
                let magnitude = n.as_f64().unwrap_or(0.0).abs();
                if magnitude != 0.0
                    && !(MIN_NUMBER_MAGNITUDE..MAX_NUMBER_MAGNITUDE).contains(&magnitude)
                {
                    Err(format!(
                        "holds the number {n}, outside what the task table stores (1E-130 to \
                         9.99E+125 in magnitude)"
                    ))
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }
    walk(value, 1)
}

/// `{"action":"call",…}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRequest {
    /// The extension to call; must be the one this deployment serves.
    pub ext: String,
    /// The calling user.
    pub user: String,
    /// The chat the call comes from, where a background result is posted.
    pub chat: String,
    /// The caller's idempotency key: a repeated call with the same one returns the first
    /// task instead of starting another.
    #[serde(default)]
    pub request_id: Option<String>,
    /// The chat function to run.
    pub function: String,
    /// The function's params, checked against its schema; absent or `null` means none.
    #[serde(default)]
    pub params: Value,
}

/// `{"action":"status"|"cancel",…}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRequest {
    /// The extension the task belongs to.
    pub ext: String,
    /// The calling user, who must own the task.
    pub user: String,
    /// The task's id as sent; a value that is not a ULID is refused as malformed.
    pub task_id: String,
}

/// `{"action":"list",…}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListRequest {
    /// The extension whose tasks to list.
    pub ext: String,
    /// The user whose tasks to list.
    pub user: String,
    /// The most tasks to return, 1 to [`MAX_LIST_LIMIT`] (default 20).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// An intake event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum IntakeRequest {
    /// Run a chat function (inline, or in the background with an ack).
    Call(CallRequest),
    /// Read one of the caller's tasks.
    Status(TaskRequest),
    /// Cancel one of the caller's tasks.
    Cancel(TaskRequest),
    /// List the caller's tasks, newest first.
    List(ListRequest),
}

/// `{"code":"…","message":"…"}` in a failed intake response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct IntakeError {
    /// The HTTP-style status, sent as the response's `status` rather than in this object.
    #[serde(skip)]
    pub status: u16,
    /// A stable machine-readable code: `malformed`, `forbidden`, `not_found`, `conflict`,
    /// `too_large`, `invalid_params`, `too_many_tasks`, `unavailable` or `internal`.
    pub code: String,
    /// What went wrong, for a human.
    pub message: String,
}

impl IntakeError {
    fn new(status: u16, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.to_owned(),
            message: message.into(),
        }
    }
    /// 400: the event is not a well-formed request.
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(400, "malformed", message)
    }
    /// 403: the task belongs to another (ext, user).
    pub fn forbidden() -> Self {
        Self::new(403, "forbidden", "this task belongs to another user")
    }
    /// 404: no such task or function.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "not_found", message)
    }
    /// 409: the task already finished.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, "conflict", message)
    }
    /// 413: params or result too large.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(413, "too_large", message)
    }
    /// 422: params fail the function's schema.
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(422, "invalid_params", message)
    }
    /// 429: the user already has as many tasks queued or running as the deployment allows.
    pub fn too_many_tasks(message: impl Into<String>) -> Self {
        Self::new(429, "too_many_tasks", message)
    }
    /// 429: the user used up one of the extension's daily budgets.
    pub fn over_budget(message: impl Into<String>) -> Self {
        Self::new(429, "over_budget", message)
    }
    /// 503: a dependency is unavailable; the caller may retry with the same `request_id`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "unavailable", message)
    }
    /// 500: a failure on our side that a retry will not fix.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "internal", message)
    }
}

/// The intake response: `{"status":200,"result":…}`, `{"status":200,"task":…}`,
/// `{"status":200,"tasks":[…]}` or `{"status":4xx,"error":{…}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntakeResponse {
    /// 200, or the error's status.
    pub status: u16,
    /// A `call`'s answer: the handler's result, or the background ack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ActionResult>,
    /// A `status` or `cancel`'s answer: the task as it now stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Task>,
    /// A `list`'s answer: the caller's tasks, newest first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks: Option<Vec<Task>>,
    /// Why the request was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<IntakeError>,
}

impl IntakeResponse {
    fn ok() -> Self {
        Self {
            status: 200,
            result: None,
            task: None,
            tasks: None,
            error: None,
        }
    }
    /// 200 with an `ActionResult`.
    pub fn result(result: ActionResult) -> Self {
        Self {
            result: Some(result),
            ..Self::ok()
        }
    }
    /// 200 with a task.
    pub fn task(task: Task) -> Self {
        Self {
            task: Some(task),
            ..Self::ok()
        }
    }
    /// 200 with a list of tasks.
    pub fn tasks(tasks: Vec<Task>) -> Self {
        Self {
            tasks: Some(tasks),
            ..Self::ok()
        }
    }
}

impl From<IntakeError> for IntakeResponse {
    fn from(error: IntakeError) -> Self {
        Self {
            status: error.status,
            error: Some(error),
            ..Self::ok()
        }
    }
}

/// A work queue message: everything the worker needs, so a task record lost in transit can
/// be written again from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkMessage {
    /// The task to run.
    pub task_id: TaskId,
    /// The extension the task belongs to.
    pub ext: String,
    /// The user who started it.
    pub user: String,
    /// The chat its progress and result go to.
    pub chat: String,
    /// The chat function or job to run.
    pub function: String,
    /// Whether `function` names a chat function or a job.
    pub kind: TaskKind,
    /// The function's declared event name, sent with an ok result.
    #[serde(default)]
    pub event: Option<String>,
    /// A human name for the task (`BackgroundOptions::name`).
    #[serde(default)]
    pub name: Option<String>,
    /// The handler's input.
    #[serde(default)]
    pub params: Value,
    /// The task's cap in seconds.
    pub cap_s: u64,
    /// When intake accepted the task.
    pub created_at: DateTime<Utc>,
    /// The caller's `request_id`, if any; with `ext` and `user`, the task's request key.
    #[serde(default)]
    pub request_id: Option<String>,
    /// The task runs alone in its worker invocation ([`Task::isolated`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub isolated: bool,
    /// The message carries on a task its last worker handed on — before the Lambda deadline,
    /// or to sleep: its claim is no resumption after a stopped worker (no "resuming" notice,
    /// no reclaim audit item).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub carry_on: bool,
}

impl WorkMessage {
    /// The message that runs `task`.
    pub fn for_task(task: &Task) -> Self {
        Self {
            task_id: task.task_id.clone(),
            ext: task.ext.clone(),
            user: task.user.clone(),
            chat: task.chat.clone(),
            function: task.function.clone(),
            kind: task.kind,
            event: task.event.clone(),
            name: task.name.clone(),
            params: task.params.clone(),
            cap_s: task.cap_s,
            created_at: task.created_at,
            request_id: task.request_id.clone(),
            isolated: task.isolated,
            carry_on: false,
        }
    }

    /// The message that carries `task` on in a fresh invocation: after a hand-off, or when it
    /// wakes from a sleep.
    pub fn carrying_on(task: &Task) -> Self {
        Self {
            carry_on: true,
            ..Self::for_task(task)
        }
    }

    /// The queued task this message describes.
    pub fn to_task(&self) -> Task {
        Task {
            task_id: self.task_id.clone(),
            ext: self.ext.clone(),
            user: self.user.clone(),
            chat: self.chat.clone(),
            function: self.function.clone(),
            kind: self.kind,
            event: self.event.clone(),
            name: self.name.clone(),
            state: TaskState::Queued,
            progress: Progress::default(),
            progress_seq: 0,
            attempt: 0,
            cap_s: self.cap_s,
            cancel_requested: false,
            created_at: self.created_at,
            wake_at: None,
            started_at: None,
            heartbeat_at: None,
            finished_at: None,
            delivered_at: None,
            redeliver_at: None,
            result: None,
            params: self.params.clone(),
            partial: None,
            lease: None,
            request_id: self.request_id.clone(),
            isolated: self.isolated,
        }
    }
}

/// A delivery queue message. It names the task only: who and where to deliver to is read
/// from the stored task, never from the message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeliveryMessage {
    /// The task's final result.
    Result {
        /// The finished task whose stored result is to be posted.
        task_id: TaskId,
    },
    /// A progress checkpoint.
    Progress {
        /// The task that reported progress.
        task_id: TaskId,
        /// The task's `progress_seq` after this checkpoint; orders the chat's progress messages
        /// and keys their idempotency.
        seq: u64,
        /// The checkpoint to post: percentage and message.
        progress: Progress,
    },
    /// A notice about a running task the handler did not write: posted as a progress
    /// message, at most once each.
    Notice {
        /// The task it is about.
        task_id: TaskId,
        /// What happened.
        notice: Notice,
    },
}

/// What a notice says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Notice {
    /// The task's progress has stood at checkpoint `seq` for the stall period while its
    /// worker is alive; it has run `running_s` seconds.
    Stalled {
        /// The task's `progress_seq` when it was seen stalled: one notice per value.
        seq: u64,
        /// How long the task has run, in seconds.
        running_s: u64,
    },
    /// A worker resumed the task after the previous one stopped without finishing it.
    Resumed {
        /// The attempt that resumed it.
        attempt: u32,
    },
}

impl Notice {
    /// The text the chat shows.
    pub fn text(&self) -> String {
        match self {
            Self::Stalled { running_s, .. } => {
                let (m, s) = (running_s / 60, running_s % 60);
                let took = if m == 0 {
                    format!("{s} s")
                } else {
                    format!("{m} min {s} s")
                };
                format!("Still working on it… (running for {took})")
            }
            Self::Resumed { .. } => {
                "The task was interrupted and is resuming where it left off.".to_owned()
            }
        }
    }

    /// The idempotency key and audit id suffix: `stalled:{seq}` or `resumed:{attempt}`.
    fn key(&self) -> String {
        match self {
            Self::Stalled { seq, .. } => format!("stalled:{seq}"),
            Self::Resumed { attempt } => format!("resumed:{attempt}"),
        }
    }

    /// The `delivered` audit item's id: `delivered#notice#stalled#3`.
    pub fn audit_id(&self) -> String {
        format!("delivered#notice#{}", self.key().replace(':', "#"))
    }
}

impl DeliveryMessage {
    /// The task the message is about.
    pub fn task_id(&self) -> &TaskId {
        match self {
            Self::Result { task_id }
            | Self::Progress { task_id, .. }
            | Self::Notice { task_id, .. } => task_id,
        }
    }

    /// The chat API idempotency key: `{task_id}:result`, `{task_id}:progress:{seq}`,
    /// `{task_id}:notice:stalled:{seq}` or `{task_id}:notice:resumed:{attempt}`.
    pub fn idempotency_key(&self) -> String {
        match self {
            Self::Result { task_id } => format!("{task_id}:result"),
            Self::Progress { task_id, seq, .. } => format!("{task_id}:progress:{seq}"),
            Self::Notice { task_id, notice } => format!("{task_id}:notice:{}", notice.key()),
        }
    }
}

/// The body POSTed to `{LONGRUN_CHAT_API_URL}/chats/{chat}/messages`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChatMessage {
    /// A task's final result.
    Result {
        /// The user the task belongs to.
        user: String,
        /// The extension that ran it.
        ext: String,
        /// The task's id, as in the ack's `task_id`.
        task_id: TaskId,
        /// The chat function or job that ran.
        function: String,
        /// The function's declared event name; only with an ok result.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        event: Option<String>,
        /// What the task ended with.
        result: ActionResult,
    },
    /// A progress update for a running task.
    Progress {
        /// The user the task belongs to.
        user: String,
        /// The extension that runs it.
        ext: String,
        /// The task's id, as in the ack's `task_id`.
        task_id: TaskId,
        /// The checkpoint to show: percentage and message.
        progress: Progress,
    },
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// `{"a":{"a":…{"a":1}}}` with `levels` objects.
    pub(crate) fn nested(levels: usize) -> Value {
        (0..levels).fold(json!(1), |inner, _| json!({ "a": inner }))
    }

    #[test]
    fn values_dynamodb_refuses_are_named() {
        for ok in [
            json!(null),
            json!({"n": u64::MAX, "i": i64::MIN, "f": 1.5e125, "tiny": 1e-130, "zero": 0.0}),
            nested(MAX_NESTING_LEVELS - 1),
        ] {
            assert_eq!(check_storable(&ok), Ok(()), "{ok}");
        }
        for (bad, words) in [
            (json!({"x": 1e126}), "1e+126"),
            (json!({"x": [-1e300]}), "-1e+300"),
            (json!({"x": 1e-131}), "1e-131"),
            (nested(MAX_NESTING_LEVELS), "32 levels"),
        ] {
            let err = check_storable(&bad).unwrap_err();
            assert!(err.contains(words), "{bad}: {err}");
        }
    }

    #[test]
    fn intake_request_parses_each_action() {
        let call: IntakeRequest = serde_json::from_value(json!({
            "action":"call","ext":"text-tools","user":"u1","chat":"c1","request_id":"r1",
            "function":"refine_output","params":{"input":"…"}
        }))
        .unwrap();
        assert!(
            matches!(call, IntakeRequest::Call(CallRequest { ref function, .. }) if function == "refine_output")
        );
        let list: IntakeRequest =
            serde_json::from_value(json!({"action":"list","ext":"e","user":"u","limit":20}))
                .unwrap();
        assert!(matches!(
            list,
            IntakeRequest::List(ListRequest {
                limit: Some(20),
                ..
            })
        ));
    }

    #[test]
    fn error_response_has_the_contract_shape() {
        let response = IntakeResponse::from(IntakeError::forbidden());
        assert_eq!(
            serde_json::to_value(&response).unwrap(),
            json!({"status":403,"error":{"code":"forbidden","message":"this task belongs to another user"}})
        );
    }

    #[test]
    fn chat_result_body_has_the_contract_shape() {
        let task_id: TaskId = "01JDZQ6V4E1YQ7K3ZC6M4T9H8P".parse().unwrap();
        let body = ChatMessage::Result {
            user: "u1".into(),
            ext: "text-tools".into(),
            task_id,
            function: "refine_output".into(),
            event: Some("text_refined".into()),
            result: ActionResult::success("done", json!({"text":"t"})),
        };
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            json!({"kind":"result","user":"u1","ext":"text-tools","task_id":"01JDZQ6V4E1YQ7K3ZC6M4T9H8P",
                   "function":"refine_output","event":"text_refined",
                   "result":{"ok":true,"summary":"done","data":{"text":"t"},"retryable":false}})
        );
    }

    #[test]
    fn idempotency_keys_follow_the_contract() {
        let task_id: TaskId = "01JDZQ6V4E1YQ7K3ZC6M4T9H8P".parse().unwrap();
        assert_eq!(
            DeliveryMessage::Result {
                task_id: task_id.clone()
            }
            .idempotency_key(),
            "01JDZQ6V4E1YQ7K3ZC6M4T9H8P:result"
        );
        let progress = DeliveryMessage::Progress {
            task_id,
            seq: 3,
            progress: Progress::default(),
        };
        assert_eq!(
            progress.idempotency_key(),
            "01JDZQ6V4E1YQ7K3ZC6M4T9H8P:progress:3"
        );
    }
}
