//! A fake chat platform API: `POST /chats/{chat}/messages`, as delivery calls it.
//!
//! It records every message it accepts, honours `Idempotency-Key` the way the contract
//! expects of a platform (a repeated key answers 409 and is not recorded again), checks the
//! bearer token when told which one to expect (the token itself is never kept), and can be
//! told to answer 500 for the next N requests, to stay down until healed, or to hang.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// One accepted message.
#[derive(Debug, Clone)]
pub struct ChatPost {
    /// The chat posted to, from the path `/chats/{chat}/messages`.
    pub chat: String,
    /// The request's `Idempotency-Key` header.
    pub idempotency_key: String,
    /// The message as JSON: a `result` or a `progress` update.
    pub body: Value,
}

impl ChatPost {
    /// `kind` of the body: `result` or `progress`.
    pub fn kind(&self) -> &str {
        self.body["kind"].as_str().unwrap_or_default()
    }

    /// `task_id` of the body.
    pub fn task_id(&self) -> &str {
        self.body["task_id"].as_str().unwrap_or_default()
    }
}

#[derive(Default)]
struct Inner {
    accepted: Vec<ChatPost>,
    keys: HashSet<String>,
    attempts: usize,
    attempts_by_key: std::collections::HashMap<String, usize>,
    duplicates: usize,
    unauthorized: usize,
    fail_next: usize,
    down: bool,
    hang_next: usize,
    hang_for: Duration,
    expected_token: Option<String>,
}

type Shared = Arc<Mutex<Inner>>;

/// A running fake. Stops when dropped.
pub struct FakeChat {
    /// `http://HOST:PORT`: the value for `LONGRUN_CHAT_API_URL`.
    pub url: String,
    inner: Shared,
    server: tokio::task::JoinHandle<()>,
}

impl FakeChat {
    /// Starts the server on a free loopback port.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on(crate::LOOPBACK).await
    }

    /// Starts the server on a free port of `host`.
    pub async fn start_on(host: std::net::IpAddr) -> std::io::Result<Self> {
        let inner: Shared = Arc::default();
        let app = axum::Router::new()
            .route("/chats/{chat}/messages", post(post_message))
            .with_state(Arc::clone(&inner));
        let listener = tokio::net::TcpListener::bind((host, 0)).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { url, inner, server })
    }

    /// Answers 401 to requests without `Authorization: Bearer {token}`.
    pub fn expect_token(&self, token: &str) {
        self.lock().expected_token = Some(token.to_owned());
    }

    /// Answers 500 to the next `n` requests.
    pub fn fail_next(&self, n: usize) {
        self.lock().fail_next = n;
    }

    /// Answers 500 to every request until [`FakeChat::heal`].
    pub fn go_down(&self) {
        self.lock().down = true;
    }

    /// Ends [`FakeChat::go_down`] and any pending [`FakeChat::fail_next`].
    pub fn heal(&self) {
        let mut inner = self.lock();
        inner.down = false;
        inner.fail_next = 0;
        inner.hang_next = 0;
    }

    /// Holds the next `n` requests for `d` each, then answers 503.
    pub fn hang_next(&self, n: usize, d: Duration) {
        let mut inner = self.lock();
        inner.hang_next = n;
        inner.hang_for = d;
    }

    /// Every accepted message, in arrival order.
    pub fn messages(&self) -> Vec<ChatPost> {
        self.lock().accepted.clone()
    }

    /// The accepted messages about one task, in arrival order.
    pub fn for_task(&self, task_id: &str) -> Vec<ChatPost> {
        self.lock()
            .accepted
            .iter()
            .filter(|p| p.task_id() == task_id)
            .cloned()
            .collect()
    }

    /// The results (`ActionResult`s) posted about one task.
    pub fn results_for(&self, task_id: &str) -> Vec<Value> {
        self.for_task(task_id)
            .iter()
            .filter(|p| p.kind() == "result")
            .map(|p| p.body["result"].clone())
            .collect()
    }

    /// The progress percentages posted about one task, in arrival order.
    pub fn progress_for(&self, task_id: &str) -> Vec<u64> {
        self.for_task(task_id)
            .iter()
            .filter(|p| p.kind() == "progress")
            .filter_map(|p| p.body["progress"]["pct"].as_u64())
            .collect()
    }

    /// Every accepted message posted to `chat`.
    pub fn in_chat(&self, chat: &str) -> Vec<ChatPost> {
        self.lock()
            .accepted
            .iter()
            .filter(|p| p.chat == chat)
            .cloned()
            .collect()
    }

    /// Requests received, accepted or not.
    pub fn attempts(&self) -> usize {
        self.lock().attempts
    }

    /// Requests received with this idempotency key, accepted or not.
    pub fn attempts_for(&self, key: &str) -> usize {
        self.lock().attempts_by_key.get(key).copied().unwrap_or(0)
    }

    /// Requests that repeated an accepted idempotency key (answered 409).
    pub fn duplicates(&self) -> usize {
        self.lock().duplicates
    }

    /// Requests refused for a missing or wrong token.
    pub fn unauthorized(&self) -> usize {
        self.lock().unauthorized
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for FakeChat {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn post_message(
    State(inner): State<Shared>,
    Path(chat): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let hang = {
        let mut state = inner.lock().unwrap_or_else(|p| p.into_inner());
        state.attempts += 1;
        if let Some(key) = &key {
            *state.attempts_by_key.entry(key.clone()).or_default() += 1;
        }
        if state.hang_next > 0 {
            state.hang_next -= 1;
            Some(state.hang_for)
        } else {
            None
        }
    };
    if let Some(hang) = hang {
        tokio::time::sleep(hang).await;
        return status(503, "hung");
    }
    let mut state = inner.lock().unwrap_or_else(|p| p.into_inner());
    if state.down {
        return status(500, "down");
    }
    if state.fail_next > 0 {
        state.fail_next -= 1;
        return status(500, "scripted failure");
    }
    if let Some(expected) = &state.expected_token {
        let presented = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if presented != Some(expected.as_str()) {
            state.unauthorized += 1;
            return status(401, "bad token");
        }
    }
    let Some(key) = key else {
        return status(400, "Idempotency-Key is required");
    };
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "body is not JSON");
    };
    if !state.keys.insert(key.clone()) {
        state.duplicates += 1;
        return status(409, "duplicate Idempotency-Key");
    }
    let id = state.accepted.len();
    state.accepted.push(ChatPost {
        chat,
        idempotency_key: key,
        body,
    });
    (StatusCode::CREATED, axum::Json(json!({"id": id}))).into_response()
}

fn status(code: u16, message: &str) -> Response {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, axum::Json(json!({"error": message}))).into_response()
}
