//! A fake chat platform API: `POST /chats/{chat}/messages`, as delivery calls it.
//!
//! It records every message it accepts, honours `Idempotency-Key` the way the contract
//! expects of a platform (a repeated key answers 409 and is not recorded again), checks the
//! bearer token when told which one to expect (the token itself is never kept), and can be
//! told to answer 500 for the next N requests, to stay down until healed, to answer 429 with a
//! `Retry-After`, to hang, or to accept a message and answer late. It knows which posts are in
//! flight and from which client socket, so a test can kill the function instance waiting on one.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
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
    /// When the fake accepted it.
    pub received_at: Instant,
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

/// One request and how the fake answered it.
#[derive(Debug, Clone)]
pub struct ChatAttempt {
    /// The request's `Idempotency-Key` header (empty without one).
    pub idempotency_key: String,
    /// When it arrived.
    pub received_at: Instant,
    /// When it was answered (a hung request: when its hang ended).
    pub answered_at: Instant,
    /// The status answered.
    pub status: u16,
}

/// The faults the fake answered with so far, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ChatFaults {
    /// Requests answered 500 ([`FakeChat::fail_next`], [`FakeChat::go_down`]).
    pub errors: usize,
    /// Requests answered 429 with a `Retry-After` ([`FakeChat::throttle_next`]).
    pub throttled: usize,
    /// Requests held, then answered 503 — or dropped by the caller first
    /// ([`FakeChat::hang_next`]).
    pub hung: usize,
    /// Messages accepted but answered late ([`FakeChat::answer_late_next`]).
    pub late: usize,
}

#[derive(Default)]
struct Inner {
    accepted: Vec<ChatPost>,
    keys: HashSet<String>,
    attempts: usize,
    attempts_by_key: std::collections::HashMap<String, usize>,
    answered: Vec<ChatAttempt>,
    duplicates: usize,
    unauthorized: usize,
    fail_next: usize,
    down: bool,
    hang_next: usize,
    hang_for: Duration,
    throttle_next: usize,
    retry_after: Duration,
    late_next: usize,
    late_by: Duration,
    faults: ChatFaults,
    in_flight: HashMap<u64, SocketAddr>,
    next_request: u64,
    expected_token: Option<String>,
}

type Shared = Arc<Mutex<Inner>>;

/// A running fake. Stops when dropped.
pub struct FakeChat {
    /// `http://HOST:PORT`: the value for `LONGRUN_CHAT_API_URL`.
    pub url: String,
    /// The address it listens on.
    pub addr: SocketAddr,
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
        let addr = listener.local_addr()?;
        let url = format!("http://{addr}");
        let server = tokio::spawn(async move {
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            url,
            addr,
            inner,
            server,
        })
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

    /// Ends [`FakeChat::go_down`] and every pending scripted fault.
    pub fn heal(&self) {
        let mut inner = self.lock();
        inner.down = false;
        inner.fail_next = 0;
        inner.hang_next = 0;
        inner.throttle_next = 0;
        inner.late_next = 0;
    }

    /// Holds the next `n` requests for `d` each, then answers 503.
    pub fn hang_next(&self, n: usize, d: Duration) {
        let mut inner = self.lock();
        inner.hang_next = n;
        inner.hang_for = d;
    }

    /// Answers the next `n` requests 429 with `Retry-After: {retry_after}` (whole seconds), as
    /// a rate-limited platform does.
    pub fn throttle_next(&self, n: usize, retry_after: Duration) {
        let mut inner = self.lock();
        inner.throttle_next = n;
        inner.retry_after = retry_after;
    }

    /// Accepts the next `n` messages (they are in the chat) but answers only after `d`: the
    /// window in which a caller that dies has posted without knowing it.
    pub fn answer_late_next(&self, n: usize, d: Duration) {
        let mut inner = self.lock();
        inner.late_next = n;
        inner.late_by = d;
    }

    /// The faults answered so far, by kind.
    pub fn faults(&self) -> ChatFaults {
        self.lock().faults
    }

    /// The client sockets of the requests in flight (received, not yet answered), oldest
    /// first: each names the process waiting on that post.
    pub fn in_flight(&self) -> Vec<SocketAddr> {
        let inner = self.lock();
        let mut requests: Vec<(&u64, &SocketAddr)> = inner.in_flight.iter().collect();
        requests.sort();
        requests.into_iter().map(|(_, client)| *client).collect()
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

    /// Every request answered so far whose idempotency key starts with `prefix` (e.g. a task
    /// id), in the order they were answered.
    pub fn answered(&self, prefix: &str) -> Vec<ChatAttempt> {
        self.lock()
            .answered
            .iter()
            .filter(|a| a.idempotency_key.starts_with(prefix))
            .cloned()
            .collect()
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

/// Forgets a request in flight when its handler ends, answered or dropped by the client.
struct InFlight {
    inner: Shared,
    id: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .in_flight
            .remove(&self.id);
    }
}

/// What the fake does with one request before it looks at the message.
enum Script {
    Hang(Duration),
    Throttle(Duration),
    Answer { late_by: Option<Duration> },
}

async fn post_message(
    State(inner): State<Shared>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Path(chat): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received_at = Instant::now();
    let idempotency_key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let response = answer(&inner, client, chat, &headers, &body).await;
    inner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .answered
        .push(ChatAttempt {
            idempotency_key,
            received_at,
            answered_at: Instant::now(),
            status: response.status().as_u16(),
        });
    response
}

/// The answer to one request, after its scripted fault if any.
async fn answer(
    inner: &Shared,
    client: SocketAddr,
    chat: String,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (script, _in_flight) = {
        let mut state = inner.lock().unwrap_or_else(|p| p.into_inner());
        state.attempts += 1;
        if let Some(key) = &key {
            *state.attempts_by_key.entry(key.clone()).or_default() += 1;
        }
        let id = state.next_request;
        state.next_request += 1;
        state.in_flight.insert(id, client);
        let script = if state.hang_next > 0 {
            state.hang_next -= 1;
            state.faults.hung += 1;
            Script::Hang(state.hang_for)
        } else if state.throttle_next > 0 {
            state.throttle_next -= 1;
            state.faults.throttled += 1;
            Script::Throttle(state.retry_after)
        } else if state.late_next > 0 {
            state.late_next -= 1;
            Script::Answer {
                late_by: Some(state.late_by),
            }
        } else {
            Script::Answer { late_by: None }
        };
        let guard = InFlight {
            inner: Arc::clone(inner),
            id,
        };
        (script, guard)
    };
    let late_by = match script {
        Script::Hang(hang) => {
            tokio::time::sleep(hang).await;
            return status(503, "hung");
        }
        Script::Throttle(after) => {
            let mut response = status(429, "slow down");
            response
                .headers_mut()
                .insert("retry-after", after.as_secs().into());
            return response;
        }
        Script::Answer { late_by } => late_by,
    };
    let answer = accept(inner, chat, key, headers, body);
    if let Some(late_by) = late_by
        && answer.status() == StatusCode::CREATED
    {
        inner.lock().unwrap_or_else(|p| p.into_inner()).faults.late += 1;
        tokio::time::sleep(late_by).await;
    }
    answer
}

/// Answers a request the script lets through: down, scripted 500, token, key, body, repeat.
fn accept(
    inner: &Shared,
    chat: String,
    key: Option<String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let mut state = inner.lock().unwrap_or_else(|p| p.into_inner());
    if state.down {
        state.faults.errors += 1;
        return status(500, "down");
    }
    if state.fail_next > 0 {
        state.fail_next -= 1;
        state.faults.errors += 1;
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
    let Ok(body) = serde_json::from_slice::<Value>(body) else {
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
        received_at: Instant::now(),
    });
    (StatusCode::CREATED, axum::Json(json!({"id": id}))).into_response()
}

fn status(code: u16, message: &str) -> Response {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, axum::Json(json!({"error": message}))).into_response()
}
