//! The dev stack's web server on loopback: the chat page, its API and the SQS API.
//!
//! - `GET /` — the chat page (one self-contained HTML file);
//! - `POST /api/intake` — an intake event, exactly as the intake Lambda takes it, answered by
//!   the same [`longrun::intake::handle`]; calls are recorded in the conversation;
//! - `GET /api/events` — the conversation as server-sent events (`id` = sequence number; a
//!   reconnect with `Last-Event-ID` or `?since=N` resumes after it);
//! - `GET /api/tools` — the extension's tool manifest (name, description, JSON Schema);
//! - `GET /api/config` — the page's defaults (ext, user, chat, model);
//! - `GET /api/health` — whether the stack runs;
//! - `POST /sqs` — the SQS JSON API over the in-process queues ([`super::sqs_api`]).
//!
//! Browsers may only call the API from the page itself: a cross-origin POST is refused,
//! `/api/intake` takes `application/json` only, which a foreign page cannot send without a
//! CORS preflight this server never grants, and a request for any host name but the loopback
//! one is refused (DNS rebinding).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use crate::chat::{ChatEvent, LocalChat};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use futures::Stream;
use futures::StreamExt;
use longrun::Runtime;
use longrun::wire::{IntakeError, IntakeResponse, MAX_EVENT_BYTES};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::sqs_api::SqsApi;

/// The chat page.
pub const PAGE: &str = include_str!("../static/chat.html");

/// What the page starts with.
#[derive(Debug, Clone, Serialize)]
pub struct PageConfig {
    /// The extension the stack runs, which the page calls.
    pub ext: String,
    /// The user the page calls as by default.
    pub user: String,
    /// The chat the page calls from by default.
    pub chat: String,
    /// Where the model answers from, in words.
    pub model: String,
    /// Whether the answers come from the offline simulator (the page shows a badge).
    pub simulated_model: bool,
}

/// Everything a request may need.
#[derive(Clone)]
pub struct AppState {
    /// The runtime `/api/intake` and `/api/tools` answer with.
    pub rt: Runtime,
    /// The conversation: calls through `/api/intake` are recorded in it, `/api/events`
    /// streams it.
    pub chat: Arc<LocalChat>,
    /// The SQS API `/sqs` serves.
    pub sqs: SqsApi,
    /// What `/api/config` answers.
    pub page: PageConfig,
    /// Turns true when the stack stops; open event streams end then.
    pub stop: watch::Receiver<bool>,
}

/// The routes.
pub fn router(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/", get(page))
        .route("/api/health", get(health))
        .route("/api/config", get(config))
        .route("/api/tools", get(tools))
        .route("/api/intake", post(intake))
        .route("/api/events", get(events))
        .route("/sqs", post(sqs))
        .route("/sqs/", post(sqs))
        .layer(axum::middleware::from_fn(loopback_only))
        .with_state(state)
}

/// Refuses requests addressed to any name but the loopback one, so a web page whose own name
/// resolves to 127.0.0.1 (DNS rebinding) cannot reach the API as a "same-origin" caller.
async fn loopback_only(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    if matches!(name, "127.0.0.1" | "localhost" | "[::1]") {
        next.run(request).await
    } else {
        (
            StatusCode::MISDIRECTED_REQUEST,
            "this server answers on 127.0.0.1 and localhost only",
        )
            .into_response()
    }
}

async fn page() -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        Html(PAGE),
    )
        .into_response()
}

async fn health(State(state): State<AppState>) -> Json<Value> {
    Json(json!({"ok": true, "ext": state.page.ext}))
}

async fn config(State(state): State<AppState>) -> Json<PageConfig> {
    Json(state.page)
}

async fn tools(State(state): State<AppState>) -> Json<Value> {
    Json(json!(
        state
            .rt
            .extension()
            .map(longrun::Extension::tool_manifest)
            .unwrap_or_default()
    ))
}

/// Whether a browser request comes from this server's own page (or from no page at all).
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    match (origin.to_str().ok(), host) {
        (Some(origin), Some(host)) => origin == format!("http://{host}"),
        _ => false,
    }
}

fn refused(status: StatusCode, error: IntakeError) -> Response {
    let mut error = error;
    error.status = status.as_u16();
    (status, Json(IntakeResponse::from(error))).into_response()
}

async fn intake(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    if !same_origin(&headers) {
        return refused(
            StatusCode::FORBIDDEN,
            IntakeError::malformed("cross-origin requests are not accepted"),
        );
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return refused(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IntakeError::malformed("send the intake event as Content-Type: application/json"),
        );
    }
    let response = if body.len() > MAX_EVENT_BYTES {
        longrun::intake::handle_bytes(&state.rt, &body).await
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(event) => state.chat.intake(&state.rt, event).await,
            Err(_) => longrun::intake::handle_bytes(&state.rt, &body).await,
        }
    };
    let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(response)).into_response()
}

async fn sqs(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    if !same_origin(&headers) {
        return StatusCode::FORBIDDEN.into_response();
    }
    state.sqs.handle(&headers, &body).await
}

/// Where a reader of the conversation resumes: after `Last-Event-ID`, or `?since=N`.
fn resume_after(headers: &HeaderMap, query: Option<&str>) -> u64 {
    let from_header = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    let from_query = query.and_then(|q| {
        q.split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == "since")
            .and_then(|(_, v)| v.parse().ok())
    });
    from_header.or(from_query).unwrap_or(0)
}

struct Follow {
    chat: Arc<LocalChat>,
    latest: watch::Receiver<u64>,
    stop: watch::Receiver<bool>,
    last: u64,
    pending: VecDeque<ChatEvent>,
}

/// The next conversation event, waiting for one; `None` when the stack stops.
async fn next_event(mut follow: Follow) -> Option<(Event, Follow)> {
    loop {
        if let Some(event) = follow.pending.pop_front() {
            follow.last = event.seq;
            let Ok(sse) = Event::default()
                .id(event.seq.to_string())
                .event("chat")
                .json_data(&event)
            else {
                continue;
            };
            return Some((sse, follow));
        }
        follow.latest.borrow_and_update();
        let events = follow.chat.events_after(follow.last);
        if !events.is_empty() {
            follow.pending.extend(events);
            continue;
        }
        tokio::select! {
            changed = follow.latest.changed() => changed.ok()?,
            _ = follow.stop.wait_for(|stopped| *stopped) => return None,
        }
    }
}

async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let follow = Follow {
        latest: state.chat.subscribe(),
        chat: state.chat,
        stop: state.stop,
        last: resume_after(&headers, query.as_deref()),
        pending: VecDeque::new(),
    };
    let stream = futures::stream::unfold(follow, next_event).map(Ok);
    Sse::new(stream).keep_alive(KeepAlive::default())
}
