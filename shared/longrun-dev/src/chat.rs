//! A local chat platform: the conversation as a user sees it. It records the user's calls
//! and intake's answers ([`LocalChat::intake`]) and, as the [`ChatApi`] delivery posts to,
//! the progress updates and results — once per idempotency key, as the contract asks. Every
//! event gets a sequence number; readers ([`LocalChat::events_after`] plus
//! [`LocalChat::subscribe`]) follow the conversation live: a terminal transcript, a web page.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

use longrun::ActionResult;
use longrun::Runtime;
use longrun::ports::{ChatApi, ChatOutcome};
use longrun::task::{Progress, TaskId};
use longrun::wire::{CallRequest, ChatMessage, IntakeResponse};

/// How many events the chat keeps; older ones are forgotten.
pub const KEEP_EVENTS: usize = 10_000;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// One thing that happened in a chat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatEvent {
    /// 1, 2, 3, … across all chats.
    pub seq: u64,
    /// When the chat recorded it.
    pub at: DateTime<Utc>,
    /// The chat it happened in.
    pub chat: String,
    /// The user who called, or whose task it is.
    pub user: String,
    /// What happened, serialized flat beside the fields above with its `kind` tag.
    #[serde(flatten)]
    pub body: ChatEventBody,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChatEventBody {
    /// The user called a function.
    Call {
        /// The extension called.
        ext: String,
        /// The function called.
        function: String,
        /// The params the user passed, as sent.
        params: Value,
    },
    /// Intake answered the call: the result itself (Pattern A, or C's fast path), or the
    /// acknowledgement of a background task, which names it in `task_id`.
    Reply {
        /// The function called.
        function: String,
        /// Intake's result: the answer itself, or the ack of a background task.
        result: ActionResult,
        /// The background task the ack names (its data's `task_id`); none for an inline
        /// answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        task_id: Option<TaskId>,
    },
    /// Intake refused the call (bad params, unknown function, …).
    Refused {
        /// The function called.
        function: String,
        /// Intake's HTTP-style status, e.g. 422.
        status: u16,
        /// Intake's machine-readable error code, e.g. `invalid_params`.
        code: String,
        /// What went wrong, for a human.
        message: String,
    },
    /// Delivery posted a progress update.
    Progress {
        /// The running task.
        task_id: TaskId,
        /// The checkpoint's sequence number (from the idempotency key).
        progress_seq: u64,
        /// The checkpoint posted: percentage and message.
        progress: Progress,
    },
    /// Delivery posted a task's result.
    Result {
        /// The finished task.
        task_id: TaskId,
        /// The chat function or job that ran.
        function: String,
        /// The function's declared event name; only with an ok result.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        event: Option<String>,
        /// What the task ended with.
        result: ActionResult,
    },
}

impl ChatEventBody {
    /// Whether this is an error the user sees (a refused call or an error result).
    pub fn is_error(&self) -> bool {
        match self {
            Self::Reply { result, .. } | Self::Result { result, .. } => !result.ok,
            Self::Refused { .. } => true,
            Self::Call { .. } | Self::Progress { .. } => false,
        }
    }
}

struct Log {
    events: VecDeque<ChatEvent>,
    next_seq: u64,
    delivered_keys: HashSet<String>,
}

/// The local chat.
pub struct LocalChat {
    log: Mutex<Log>,
    latest: watch::Sender<u64>,
}

impl Default for LocalChat {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalChat {
    /// An empty chat.
    pub fn new() -> Self {
        Self {
            log: Mutex::new(Log {
                events: VecDeque::new(),
                next_seq: 1,
                delivered_keys: HashSet::new(),
            }),
            latest: watch::channel(0).0,
        }
    }

    fn record(&self, chat: &str, user: &str, body: ChatEventBody) -> ChatEvent {
        let event = {
            let mut log = lock(&self.log);
            let event = ChatEvent {
                seq: log.next_seq,
                at: Utc::now(),
                chat: chat.to_owned(),
                user: user.to_owned(),
                body,
            };
            log.next_seq += 1;
            log.events.push_back(event.clone());
            while log.events.len() > KEEP_EVENTS {
                log.events.pop_front();
            }
            event
        };
        self.latest.send_replace(event.seq);
        event
    }

    /// Calls intake with `event` as the chat platform does, recording a `call` and intake's
    /// answer in the conversation. Other actions (status, cancel, list) pass through.
    pub async fn intake(&self, rt: &Runtime, event: Value) -> IntakeResponse {
        let call = (event.get("action").and_then(Value::as_str) == Some("call"))
            .then(|| serde_json::from_value::<CallRequest>(event.clone()).ok())
            .flatten();
        if let Some(call) = &call {
            self.record(
                &call.chat,
                &call.user,
                ChatEventBody::Call {
                    ext: call.ext.clone(),
                    function: call.function.clone(),
                    params: call.params.clone(),
                },
            );
        }
        let response = longrun::intake::handle(rt, event).await;
        if let Some(call) = &call {
            self.record_answer(call, &response);
        }
        response
    }

    fn record_answer(&self, call: &CallRequest, response: &IntakeResponse) {
        let body = match (&response.result, &response.error) {
            (Some(result), _) => ChatEventBody::Reply {
                function: call.function.clone(),
                task_id: result
                    .data
                    .as_ref()
                    .and_then(|d| d.get("task_id"))
                    .and_then(|id| serde_json::from_value(id.clone()).ok()),
                result: result.clone(),
            },
            (None, Some(error)) => ChatEventBody::Refused {
                function: call.function.clone(),
                status: response.status,
                code: error.code.clone(),
                message: error.message.clone(),
            },
            (None, None) => return,
        };
        self.record(&call.chat, &call.user, body);
    }

    /// The events after `seq`, oldest first.
    pub fn events_after(&self, seq: u64) -> Vec<ChatEvent> {
        lock(&self.log)
            .events
            .iter()
            .filter(|e| e.seq > seq)
            .cloned()
            .collect()
    }

    /// The events of one chat, oldest first.
    pub fn in_chat(&self, chat: &str) -> Vec<ChatEvent> {
        lock(&self.log)
            .events
            .iter()
            .filter(|e| e.chat == chat)
            .cloned()
            .collect()
    }

    /// The sequence number of the latest event (0: none yet).
    pub fn latest_seq(&self) -> u64 {
        *self.latest.borrow()
    }

    /// The sequence number of the latest event, changing whenever one is recorded. Never hold
    /// its `borrow()` across an `.await`: recording waits for it.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }
}

fn progress_seq(idempotency_key: &str) -> u64 {
    idempotency_key
        .rsplit_once(":progress:")
        .and_then(|(_, seq)| seq.parse().ok())
        .unwrap_or(0)
}

#[async_trait]
impl ChatApi for LocalChat {
    async fn post(&self, chat: &str, idempotency_key: &str, message: &ChatMessage) -> ChatOutcome {
        if !lock(&self.log)
            .delivered_keys
            .insert(idempotency_key.to_owned())
        {
            // Already delivered under this key: the contract's 409.
            return ChatOutcome::Delivered;
        }
        let (user, body) = match message {
            ChatMessage::Progress {
                user,
                task_id,
                progress,
                ..
            } => (
                user,
                ChatEventBody::Progress {
                    task_id: task_id.clone(),
                    progress_seq: progress_seq(idempotency_key),
                    progress: progress.clone(),
                },
            ),
            ChatMessage::Result {
                user,
                task_id,
                function,
                event,
                result,
                ..
            } => (
                user,
                ChatEventBody::Result {
                    task_id: task_id.clone(),
                    function: function.clone(),
                    event: event.clone(),
                    result: result.clone(),
                },
            ),
        };
        self.record(chat, user, body);
        ChatOutcome::Delivered
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn result_message(task_id: &TaskId) -> ChatMessage {
        ChatMessage::Result {
            user: "u1".into(),
            ext: "e".into(),
            task_id: task_id.clone(),
            function: "f".into(),
            event: None,
            result: ActionResult::error("OpenAI key not connected", false),
        }
    }

    #[tokio::test]
    async fn a_repeated_idempotency_key_is_recorded_once() {
        let chat = LocalChat::new();
        let task_id = TaskId::generate(Utc::now());
        let mut seen = chat.subscribe();
        for _ in 0..3 {
            assert_eq!(
                chat.post(
                    "c1",
                    &format!("{task_id}:result"),
                    &result_message(&task_id)
                )
                .await,
                ChatOutcome::Delivered
            );
        }
        let events = chat.in_chat("c1");
        assert_eq!(events.len(), 1);
        assert!(events[0].body.is_error());
        assert!(seen.has_changed().unwrap());
        assert_eq!(*seen.borrow_and_update(), events[0].seq);
    }

    #[tokio::test]
    async fn progress_keeps_its_sequence_number_and_events_serialize_flat() {
        let chat = LocalChat::new();
        let task_id = TaskId::generate(Utc::now());
        let message = ChatMessage::Progress {
            user: "u1".into(),
            ext: "e".into(),
            task_id: task_id.clone(),
            progress: Progress {
                pct: 45,
                message: "Generating".into(),
            },
        };
        chat.post("c1", &format!("{task_id}:progress:7"), &message)
            .await;
        let event = chat.events_after(0).remove(0);
        let value = serde_json::to_value(&event).unwrap();
        assert_eq!(value["kind"], "progress");
        assert_eq!(value["progress_seq"], 7);
        assert_eq!(
            value["progress"],
            json!({"pct": 45, "message": "Generating"})
        );
        assert_eq!(value["chat"], "c1");
        assert!(chat.events_after(event.seq).is_empty());
    }
}
