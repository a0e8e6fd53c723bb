//! A fake OpenAI-compatible chat completions server (`POST /v1/chat/completions`).
//!
//! Each request's behaviour is scripted by directives in its last user message, so every
//! task of a test carries its own fault and concurrent tasks never race for a script:
//!
//! | directive          | answer                                                  |
//! |--------------------|---------------------------------------------------------|
//! | (none)             | 200, the completion `Refined: {input}`                  |
//! | `[[delay=MS]]`     | the same, after MS milliseconds                         |
//! | `[[hang]]`         | nothing, ever (the connection stays open)               |
//! | `[[status=CODE]]`  | CODE with an OpenAI-style error body                    |
//! | `[[malformed]]`    | 200 with a body that is not JSON                        |
//! | `[[empty]]`        | 200 JSON without `choices`                              |
//! | `[[big=BYTES]]`    | 200, a completion of BYTES bytes                        |
//!
//! Every request is recorded with its body, whether its bearer key was the expected one (the
//! key itself is never kept), and how it ended — answered, or dropped by the client before
//! the answer (a cancelled task's worker aborting its call).
//!
//! It also speaks the Responses API's background mode: `POST /v1/responses` with
//! `background: true` creates a response (status `queued`), `GET /v1/responses/{id}` reports
//! `queued` at the first check, then `in_progress` until the response's `[[delay=MS]]` since
//! its creation passed (forever with `[[hang]]`), then `completed` with the same completion;
//! `POST /v1/responses/{id}/cancel` cancels it. `[[no_background]]` makes the create answer
//! 404, as a server without the Responses API does; `[[status=CODE]]` makes it answer CODE.
//! Each of these calls is recorded with its kind and the response's input.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// How a recorded request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallState {
    /// The server is still working on it (delay or hang).
    InFlight,
    /// An answer was produced.
    Answered,
    /// The client went away before the answer: the handler future was dropped.
    Dropped,
}

/// Which endpoint a request called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// `POST /v1/chat/completions`: a synchronous completion.
    Chat,
    /// `POST /v1/responses`: a background response created.
    Create,
    /// `GET /v1/responses/{id}`: a check of a background response.
    Check,
    /// `POST /v1/responses/{id}/cancel`.
    Cancel,
}

/// One request the server received.
#[derive(Debug, Clone)]
pub struct AiCall {
    /// The endpoint it called.
    pub kind: CallKind,
    /// The request body as JSON (`Null` if it was not JSON).
    pub body: Value,
    /// `model` from the body.
    pub model: String,
    /// The last user message, directives included.
    pub input: String,
    /// Whether `Authorization: Bearer …` carried the expected key (true when none is expected).
    pub key_ok: bool,
    /// How the request ended, or that it has not yet.
    pub state: CallState,
    /// The caller's address: its port identifies the calling process's socket.
    pub client: SocketAddr,
}

#[derive(Default)]
struct Inner {
    calls: Vec<AiCall>,
    expected_key: Option<String>,
    responses: std::collections::HashMap<String, Background>,
}

/// A background response the server holds.
struct Background {
    input: String,
    model: String,
    created: tokio::time::Instant,
    checks: u32,
    cancelled: bool,
}

type Shared = Arc<Mutex<Inner>>;

/// A running fake. Stops when dropped.
pub struct FakeOpenAi {
    /// `http://HOST:PORT/v1`: the value for `OPENAI_BASE_URL`.
    pub base_url: String,
    /// The address it listens on.
    pub addr: SocketAddr,
    inner: Shared,
    server: tokio::task::JoinHandle<()>,
}

impl FakeOpenAi {
    /// Starts the server on a free loopback port.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on(crate::LOOPBACK).await
    }

    /// Starts the server on a free port of `host`.
    pub async fn start_on(host: std::net::IpAddr) -> std::io::Result<Self> {
        let inner: Shared = Arc::default();
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(completions))
            .route("/v1/responses", post(create_response))
            .route("/v1/responses/{id}", axum::routing::get(check_response))
            .route("/v1/responses/{id}/cancel", post(cancel_response))
            .with_state(Arc::clone(&inner));
        let listener = tokio::net::TcpListener::bind((host, 0)).await?;
        let addr = listener.local_addr()?;
        let base_url = format!("http://{addr}/v1");
        let server = tokio::spawn(async move {
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            base_url,
            addr,
            inner,
            server,
        })
    }

    /// Answers 401 to any request whose bearer key is not `key`, as OpenAI does.
    pub fn expect_key(&self, key: &str) {
        self.lock().expected_key = Some(key.to_owned());
    }

    /// Every request so far, in arrival order.
    pub fn calls(&self) -> Vec<AiCall> {
        self.lock().calls.clone()
    }

    /// The requests of `kind` whose input contains `needle`.
    pub fn calls_of(&self, kind: CallKind, needle: &str) -> Vec<AiCall> {
        self.calls_with(needle)
            .into_iter()
            .filter(|c| c.kind == kind)
            .collect()
    }

    /// The requests whose input contains `needle`.
    pub fn calls_with(&self, needle: &str) -> Vec<AiCall> {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.input.contains(needle))
            .cloned()
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// What a request's directives ask for.
#[derive(Debug, Default, PartialEq, Eq)]
struct Directives {
    delay: Option<Duration>,
    hang: bool,
    status: Option<u16>,
    malformed: bool,
    empty: bool,
    big: Option<usize>,
}

fn directives(input: &str) -> Directives {
    let mut d = Directives::default();
    let mut rest = input;
    while let Some(start) = rest.find("[[") {
        let Some(len) = rest[start..].find("]]") else {
            break;
        };
        let word = &rest[start + 2..start + len];
        let (key, value) = word.split_once('=').unwrap_or((word, ""));
        match key {
            "delay" => d.delay = value.parse().ok().map(Duration::from_millis),
            "hang" => d.hang = true,
            "status" => d.status = value.parse().ok(),
            "malformed" => d.malformed = true,
            "empty" => d.empty = true,
            "big" => d.big = value.parse().ok(),
            _ => {}
        }
        rest = &rest[start + len + 2..];
    }
    d
}

/// The input without its directives, trimmed.
pub fn plain_input(input: &str) -> String {
    let mut out = String::new();
    let mut rest = input;
    while let Some(start) = rest.find("[[") {
        out.push_str(&rest[..start]);
        match rest[start..].find("]]") {
            Some(len) => rest = &rest[start + len + 2..],
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out.trim().to_owned()
}

/// The completion the fake answers for `input`.
pub fn completion_for(input: &str) -> String {
    format!("Refined: {}", plain_input(input))
}

/// Marks the call dropped unless it finished: an axum handler future is dropped when its
/// client disconnects.
struct CallGuard {
    inner: Shared,
    index: usize,
    finished: bool,
}

impl CallGuard {
    fn finish(mut self) {
        self.set(CallState::Answered);
        self.finished = true;
    }

    fn set(&self, state: CallState) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(call) = inner.calls.get_mut(self.index) {
            call.state = state;
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.set(CallState::Dropped);
        }
    }
}

async fn completions(
    State(inner): State<Shared>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let input = body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let (index, key_ok) = record(
        &inner,
        &headers,
        AiCall {
            kind: CallKind::Chat,
            body: body.clone(),
            model: model.clone(),
            input: input.clone(),
            key_ok: false,
            state: CallState::InFlight,
            client,
        },
    );
    let guard = CallGuard {
        inner,
        index,
        finished: false,
    };
    if !key_ok {
        guard.finish();
        return error(401, "Incorrect API key provided.");
    }
    let d = directives(&input);
    if let Some(delay) = d.delay {
        tokio::time::sleep(delay).await;
    }
    if d.hang {
        std::future::pending::<()>().await;
    }
    let response = if let Some(status) = d.status {
        error(status, "scripted failure")
    } else if d.malformed {
        (
            StatusCode::OK,
            [("content-type", "application/json")],
            "{\"choices\": [ this is not json",
        )
            .into_response()
    } else if d.empty {
        axum::Json(json!({"id": "chatcmpl-empty", "object": "chat.completion", "choices": []}))
            .into_response()
    } else {
        let content = match d.big {
            Some(bytes) => "x".repeat(bytes),
            None => completion_for(&input),
        };
        axum::Json(json!({
            "id": format!("chatcmpl-{index}"),
            "object": "chat.completion",
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop"
            }],
            "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}
        }))
        .into_response()
    };
    guard.finish();
    response
}

/// The bearer key a request presented.
fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
}

/// Records `call`, its key judged against the expected one; returns its index and whether
/// the key was right.
fn record(inner: &Shared, headers: &HeaderMap, mut call: AiCall) -> (usize, bool) {
    let mut state = inner.lock().unwrap_or_else(|p| p.into_inner());
    call.key_ok = match &state.expected_key {
        Some(expected) => bearer(headers).as_deref() == Some(expected.as_str()),
        None => true,
    };
    let key_ok = call.key_ok;
    state.calls.push(call);
    (state.calls.len() - 1, key_ok)
}

/// A Responses API call, answered at once.
fn answered(kind: CallKind, client: SocketAddr, body: Value, input: &str, model: &str) -> AiCall {
    AiCall {
        kind,
        body,
        model: model.to_owned(),
        input: input.to_owned(),
        key_ok: false,
        state: CallState::Answered,
        client,
    }
}

/// A Responses API response object.
fn response_object(id: &str, model: &str, status: &str, input: &str) -> Value {
    let mut object = json!({"id": id, "object": "response", "status": status, "model": model,
                            "output": [], "error": null});
    if status == "completed" {
        object["output"] = json!([{"type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": completion_for(input), "annotations": []}]}]);
        object["usage"] = json!({"input_tokens": 10, "output_tokens": 10, "total_tokens": 20});
    }
    object
}

async fn create_response(
    State(inner): State<Shared>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let input = body["input"].as_str().unwrap_or_default().to_owned();
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let call = answered(CallKind::Create, client, body.clone(), &input, &model);
    if !record(&inner, &headers, call).1 {
        return error(401, "Incorrect API key provided.");
    }
    let d = directives(&input);
    if input.contains("[[no_background]]") {
        return error(404, "Not Found");
    }
    if let Some(status) = d.status {
        return error(status, "scripted failure");
    }
    if body["background"] != json!(true) {
        return error(400, "this fake only serves background responses");
    }
    let id = format!("resp_{}", ulid::Ulid::new());
    inner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .responses
        .insert(
            id.clone(),
            Background {
                input: input.clone(),
                model: model.clone(),
                created: tokio::time::Instant::now(),
                checks: 0,
                cancelled: false,
            },
        );
    axum::Json(response_object(&id, &model, "queued", &input)).into_response()
}

async fn check_response(
    State(inner): State<Shared>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    respond(&inner, CallKind::Check, client, &headers, &id, |r| {
        r.checks += 1;
        let d = directives(&r.input);
        let done = !d.hang && r.created.elapsed() >= d.delay.unwrap_or_default();
        if r.cancelled {
            "cancelled"
        } else if r.checks == 1 {
            "queued"
        } else if done {
            "completed"
        } else {
            "in_progress"
        }
    })
}

async fn cancel_response(
    State(inner): State<Shared>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    respond(&inner, CallKind::Cancel, client, &headers, &id, |r| {
        r.cancelled = true;
        "cancelled"
    })
}

/// A call on the background response `id`: `act` updates it and names its status. Recorded
/// with the response's input; 404 for an unknown id, 401 for a wrong key.
fn respond(
    inner: &Shared,
    kind: CallKind,
    client: SocketAddr,
    headers: &HeaderMap,
    id: &str,
    act: impl FnOnce(&mut Background) -> &'static str,
) -> Response {
    let found = {
        let mut state = inner.lock().unwrap_or_else(|p| p.into_inner());
        state.responses.get_mut(id).map(|r| {
            let status = act(r);
            (r.input.clone(), r.model.clone(), status)
        })
    };
    let Some((input, model, status)) = found else {
        record(inner, headers, answered(kind, client, Value::Null, "", ""));
        return error(404, "No response found");
    };
    let call = answered(kind, client, Value::Null, &input, &model);
    if !record(inner, headers, call).1 {
        return error(401, "Incorrect API key provided.");
    }
    axum::Json(response_object(id, &model, status, &input)).into_response()
}

fn error(status: u16, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        axum::Json(json!({"error": {"message": message, "type": "fake_error"}})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_are_read_and_stripped() {
        let d = directives("fix this [[delay=250]] please [[status=503]]");
        assert_eq!(d.delay, Some(Duration::from_millis(250)));
        assert_eq!(d.status, Some(503));
        assert!(!d.hang);
        assert_eq!(plain_input("fix [[hang]] it"), "fix  it");
        assert_eq!(completion_for("[[delay=1]]hello"), "Refined: hello");
    }
}
