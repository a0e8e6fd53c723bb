//! An offline model simulator for demos without keys or network: an OpenAI-compatible chat
//! completions server on loopback that takes a realistic while to answer and returns a
//! plausibly "refined" version of the user's text. It is not a model: every answer starts
//! with [`LABEL`], and the model it reports is `longrun-simulator`.
//!
//! It also serves the Responses API's background mode — `POST /v1/responses` with
//! `background: true`, `GET /v1/responses/{id}` and `POST /v1/responses/{id}/cancel` — so
//! `refine_offloaded` can be tried locally: a response is `queued` for its first second,
//! `in_progress` for the rest of its sampled latency, then `completed`.

use std::hash::{BuildHasher, Hasher};
use std::str::FromStr;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// The mark every simulated answer starts with.
pub const LABEL: &str = "(simulated answer — no AI model was called)";
/// The model name the simulator reports.
pub const MODEL: &str = "longrun-simulator";

/// How long the simulator takes to answer: uniformly between `min` and `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latency {
    /// The shortest time an answer takes.
    pub min: Duration,
    /// The longest time an answer takes.
    pub max: Duration,
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            min: Duration::from_secs(2),
            max: Duration::from_secs(8),
        }
    }
}

impl FromStr for Latency {
    type Err = String;

    /// `MIN..MAX` or `MS`, in milliseconds.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ms = |v: &str| {
            v.trim()
                .parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| format!("{v:?} is not a number of milliseconds"))
        };
        let (min, max) = match s.split_once("..") {
            Some((min, max)) => (ms(min)?, ms(max)?),
            None => (ms(s)?, ms(s)?),
        };
        if min > max {
            return Err(format!("{s:?}: the minimum is above the maximum"));
        }
        if max > Duration::from_secs(600) {
            return Err(format!("{s:?}: at most 600000 ms"));
        }
        Ok(Self { min, max })
    }
}

impl Latency {
    fn sample(&self) -> Duration {
        let span = self.max.saturating_sub(self.min).as_millis() as u64;
        if span == 0 {
            return self.min;
        }
        // A random draw without a `rand` dependency: std's per-instance random hash keys.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        self.min + Duration::from_millis(hasher.finish() % (span + 1))
    }
}

/// A running simulator. It stops when dropped.
pub struct Simulator {
    /// `http://127.0.0.1:PORT/v1`: what `OPENAI_BASE_URL` would be.
    pub base_url: String,
    server: JoinHandle<()>,
}

impl Simulator {
    /// Starts the simulator on a free loopback port.
    pub async fn start(latency: Latency) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(complete))
            .route("/v1/responses", post(create_response))
            .route("/v1/responses/{id}", get(check_response))
            .route("/v1/responses/{id}/cancel", post(cancel_response))
            .route("/v1/models", get(models))
            .with_state(SimState {
                latency,
                responses: std::sync::Arc::default(),
            });
        let server = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                tracing::warn!(error = %err, "model simulator stopped");
            }
        });
        Ok(Self {
            base_url: format!("http://{addr}/v1"),
            server,
        })
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The simulator's state: its latency, and the background responses it holds.
#[derive(Clone)]
struct SimState {
    latency: Latency,
    responses: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, SimResponse>>>,
}

/// A background response being "generated".
struct SimResponse {
    model: String,
    text: String,
    words: usize,
    created: tokio::time::Instant,
    takes: Duration,
    cancelled: bool,
}

impl axum::extract::FromRef<SimState> for Latency {
    fn from_ref(state: &SimState) -> Self {
        state.latency
    }
}

/// The simulated answer to `input`, at most `max_tokens` (a request's token limit, 1000 when
/// absent) long.
fn answer(input: &str, max_tokens: &Value) -> String {
    let max_tokens = max_tokens.as_u64().unwrap_or(1000).clamp(1, 100_000);
    format!("{LABEL} {}", refine(input, max_tokens as usize * 4))
}

/// The model an answer reports: the simulator, as the model the request named.
fn model_of(request: &Value) -> String {
    request["model"]
        .as_str()
        .map_or(MODEL.to_owned(), |m| format!("{MODEL} (as {m})"))
}

/// A bearer key is present (any will do).
fn authorized(headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|key| !key.trim().is_empty())
}

fn unauthorized() -> Response {
    openai_error(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        "You didn't provide an API key.",
    )
}

/// `usage` for an input of `words` words.
fn usage(words: usize) -> Value {
    json!({"prompt_tokens": words + 12, "completion_tokens": words + 4, "total_tokens": 2 * words + 16,
           "input_tokens": words + 12, "output_tokens": words + 4})
}

fn response_object(id: &str, r: &SimResponse, status: &str) -> Value {
    let mut object = json!({"id": id, "object": "response", "status": status, "model": r.model,
                            "output": [], "error": null});
    if status == "completed" {
        object["output"] = json!([{"type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": r.text, "annotations": []}]}]);
        object["usage"] = usage(r.words);
    }
    object
}

async fn create_response(
    axum::extract::State(state): axum::extract::State<SimState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&headers) {
        return unauthorized();
    }
    let Some(request) = serde_json::from_slice::<Value>(&body).ok() else {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "The body is not valid JSON.",
        );
    };
    let Some(input) = request["input"].as_str() else {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "'input' must be text.",
        );
    };
    let id = format!("resp_sim_{}", ulid::Ulid::new());
    let response = SimResponse {
        model: model_of(&request),
        text: answer(input, &request["max_output_tokens"]),
        words: input.split_whitespace().count(),
        created: tokio::time::Instant::now(),
        takes: state.latency.sample(),
        cancelled: false,
    };
    let object = response_object(&id, &response, "queued");
    state
        .responses
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, response);
    Json(object).into_response()
}

async fn check_response(
    axum::extract::State(state): axum::extract::State<SimState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    respond(&state, &headers, &id, |r| {
        let elapsed = r.created.elapsed();
        if r.cancelled {
            "cancelled"
        } else if elapsed >= r.takes {
            "completed"
        } else if elapsed < Duration::from_secs(1) {
            "queued"
        } else {
            "in_progress"
        }
    })
}

async fn cancel_response(
    axum::extract::State(state): axum::extract::State<SimState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    respond(&state, &headers, &id, |r| {
        r.cancelled = true;
        "cancelled"
    })
}

/// A call on the background response `id`: `act` updates it and names its status.
fn respond(
    state: &SimState,
    headers: &HeaderMap,
    id: &str,
    act: impl FnOnce(&mut SimResponse) -> &'static str,
) -> Response {
    if !authorized(headers) {
        return unauthorized();
    }
    let mut responses = state.responses.lock().unwrap_or_else(|e| e.into_inner());
    let Some(r) = responses.get_mut(id) else {
        return openai_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "No such response.",
        );
    };
    let status = act(r);
    Json(response_object(id, r, status)).into_response()
}

fn openai_error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": kind, "code": null}})),
    )
        .into_response()
}

async fn models() -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "longrun"}]}),
    )
}

async fn complete(
    axum::extract::State(latency): axum::extract::State<Latency>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&headers) {
        return unauthorized();
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "The body is not valid JSON.",
        );
    };
    let Some(input) = request["messages"].as_array().and_then(|messages| {
        messages
            .iter()
            .rev()
            .find(|m| m["role"] == "user")
            .and_then(|m| m["content"].as_str())
    }) else {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "'messages' must hold a user message with text content.",
        );
    };
    let text = answer(input, &request["max_tokens"]);
    tokio::time::sleep(latency.sample()).await;
    let created = chrono::Utc::now().timestamp();
    let words = input.split_whitespace().count();
    Json(json!({
        "id": format!("chatcmpl-sim-{}", ulid::Ulid::new()),
        "object": "chat.completion",
        "created": created,
        "model": model_of(&request),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
        }],
        "usage": usage(words),
    }))
    .into_response()
}

/// Informal words and what a careful writer would put instead.
const REWRITES: &[(&str, &str)] = &[
    ("gonna", "going to"),
    ("wanna", "want to"),
    ("gotta", "have to"),
    ("u", "you"),
    ("ur", "your"),
    ("r", "are"),
    ("pls", "please"),
    ("plz", "please"),
    ("thx", "thanks"),
    ("lmk", "let me know"),
    ("asap", "as soon as possible"),
    ("btw", "by the way"),
    ("imo", "in my opinion"),
    ("dont", "don't"),
    ("cant", "can't"),
    ("wont", "won't"),
    ("im", "I'm"),
    ("i", "I"),
    ("ok", "OK"),
    ("stuff", "material"),
    ("thing", "item"),
    ("really", ""),
    ("very", ""),
    ("basically", ""),
    ("just", ""),
];

/// A plausible refinement: informal words replaced, filler dropped, sentences capitalized
/// and ended, at most `max_chars` long.
pub fn refine(input: &str, max_chars: usize) -> String {
    let mut words: Vec<String> = Vec::new();
    for word in input.split_whitespace() {
        let core = word.trim_matches(|c: char| !c.is_alphanumeric());
        let (lead, rest) = word.split_at(word.find(core).unwrap_or(0));
        let trail = &rest[core.len()..];
        match REWRITES
            .iter()
            .find(|(from, _)| from.eq_ignore_ascii_case(core))
        {
            // Filler goes; its punctuation stays with the word before.
            Some((_, "")) => {
                if let Some(last) = words.last_mut() {
                    last.push_str(trail);
                }
            }
            Some((_, to)) => words.push(format!("{lead}{to}{trail}")),
            None => words.push(word.to_owned()),
        }
    }
    let mut text = String::new();
    let mut sentence_start = true;
    for word in words.iter().filter(|w| !w.is_empty()) {
        if !text.is_empty() {
            text.push(' ');
        }
        let mut chars = word.chars();
        if sentence_start && let Some(first) = chars.next() {
            text.extend(first.to_uppercase());
            text.push_str(chars.as_str());
        } else {
            text.push_str(word);
        }
        sentence_start = word.ends_with(['.', '!', '?']);
    }
    if text.is_empty() {
        text.push_str("(There was no text to refine.)");
    } else if !text.ends_with(['.', '!', '?']) {
        text = text.trim_end_matches([',', ';', ':', '-']).to_owned();
        text.push('.');
    }
    if text.chars().count() > max_chars.max(16) {
        text = text.chars().take(max_chars.max(16) - 1).collect::<String>() + "…";
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refine_tidies_informal_text() {
        assert_eq!(
            refine(
                "hey so we're gonna ship it friday, pls review and lmk what u think",
                4000
            ),
            "Hey so we're going to ship it friday, please review and let me know what you think."
        );
        assert_eq!(refine("  ", 4000), "(There was no text to refine.)");
        assert_eq!(refine("it is just fine. really", 4000), "It is fine.");
        assert_eq!(refine("it is really, fine", 4000), "It is, fine.");
    }

    #[test]
    fn latency_parses_ranges_and_refuses_nonsense() {
        assert_eq!(
            "100..200".parse::<Latency>().unwrap(),
            Latency {
                min: Duration::from_millis(100),
                max: Duration::from_millis(200)
            }
        );
        assert_eq!("0".parse::<Latency>().unwrap().max, Duration::ZERO);
        assert!("9..1".parse::<Latency>().is_err());
        assert!("soon".parse::<Latency>().is_err());
        let sampled = "10..20".parse::<Latency>().unwrap().sample();
        assert!((Duration::from_millis(10)..=Duration::from_millis(20)).contains(&sampled));
    }
}
