//! A minimal OpenAI-compatible chat completions client over `ctx.http` (so every call is
//! capped and cancellable), for OpenAI itself or llama.cpp, Ollama, vLLM and the like.

use std::time::Duration;

use longrun::serde_json::{Value, json};
use longrun::{ActionResult, Ctx, HttpError, Secret};

/// Where and with which models to call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAi {
    /// `OPENAI_BASE_URL`, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// `OPENAI_MODEL` (default `gpt-4o`).
    pub model: String,
    /// `OPENAI_FAST_MODEL` (default `gpt-4o-mini`), for `start_refinement`'s fast path.
    pub fast_model: String,
    /// How often `refine_offloaded` checks a background response: `OPENAI_POLL_SECONDS`
    /// (default 10).
    pub poll_every: Duration,
}

/// The default interval between two checks of a background response.
pub const DEFAULT_POLL_EVERY: Duration = Duration::from_secs(10);

impl OpenAi {
    /// OpenAI's API.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into().trim_end_matches('/').to_owned(),
            model: "gpt-4o".to_owned(),
            fast_model: "gpt-4o-mini".to_owned(),
            poll_every: DEFAULT_POLL_EVERY,
        }
    }

    /// From `OPENAI_BASE_URL`, `OPENAI_MODEL` and `OPENAI_FAST_MODEL`.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let mut openai = Self::new(
            var("OPENAI_BASE_URL").unwrap_or_else(|| "https://api.openai.com/v1".to_owned()),
        );
        if let Some(model) = var("OPENAI_MODEL") {
            openai.model = model;
        }
        if let Some(model) = var("OPENAI_FAST_MODEL") {
            openai.fast_model = model;
        }
        if let Some(seconds) = var("OPENAI_POLL_SECONDS").and_then(|v| v.trim().parse().ok()) {
            openai.poll_every = Duration::from_secs(seconds);
        }
        openai
    }

    /// Starts a response in the provider's background mode (the Responses API's
    /// `background: true`): the provider works on it while nobody waits, and
    /// [`OpenAi::check`] asks how it is going. A provider without the Responses API (404,
    /// 405, 501 — llama.cpp, Ollama and the like) answers [`Started::Unsupported`]: call
    /// [`OpenAi::complete`] instead.
    pub async fn start_background(
        &self,
        ctx: &Ctx,
        api_key: &Secret,
        model: &str,
        instructions: &str,
        input: &str,
        max_tokens: u32,
    ) -> Result<Started, HttpError> {
        let response = ctx
            .http
            .post(format!("{}/responses", self.base_url))
            .bearer_auth(api_key.expose())
            .json(&json!({
                "model": model,
                "instructions": instructions,
                "input": input,
                "max_output_tokens": max_tokens,
                "background": true,
            }))
            .send()
            .await?;
        match response.status() {
            200..=202 => {}
            404 | 405 | 501 => return Ok(Started::Unsupported),
            status => return Ok(Started::Failed(refused(status))),
        }
        let body: Value = response.json().unwrap_or(Value::Null);
        Ok(match body["id"].as_str() {
            Some(id) => Started::Background { id: id.to_owned() },
            None => Started::Failed(malformed()),
        })
    }

    /// Where the background response `id` is. A throttled or failing provider answers
    /// [`Status::Unavailable`]: ask again later.
    pub async fn check(&self, ctx: &Ctx, api_key: &Secret, id: &str) -> Result<Status, HttpError> {
        let response = ctx
            .http
            .get(format!("{}/responses/{id}", self.base_url))
            .bearer_auth(api_key.expose())
            .send()
            .await?;
        let status = response.status();
        if status == 429 || status >= 500 {
            return Ok(Status::Unavailable);
        }
        if status != 200 {
            return Ok(Status::Done(Completion::Failed(refused(status))));
        }
        let body: Value = match response.json() {
            Ok(body) => body,
            Err(_) => return Ok(Status::Unavailable),
        };
        Ok(match body["status"].as_str() {
            Some("queued") => Status::Queued,
            Some("in_progress") => Status::InProgress,
            Some("completed") => Status::Done(match output_text(&body) {
                Some(text) => Completion::Text {
                    text,
                    tokens: body["usage"]["total_tokens"].as_u64().unwrap_or(0),
                },
                None => Completion::Failed(malformed()),
            }),
            Some(other) => Status::Done(Completion::Failed(ActionResult::error(
                format!(
                    "OpenAI did not finish the response ({other}{})",
                    body["error"]["message"]
                        .as_str()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                ),
                other == "failed",
            ))),
            None => Status::Done(Completion::Failed(malformed())),
        })
    }

    /// Asks the provider to cancel the background response `id`; returns the HTTP status it
    /// answered (a response that already ended answers 4xx, which is no failure here).
    pub async fn cancel(&self, ctx: &Ctx, api_key: &Secret, id: &str) -> Result<u16, HttpError> {
        let response = ctx
            .http
            .post(format!("{}/responses/{id}/cancel", self.base_url))
            .bearer_auth(api_key.expose())
            .send()
            .await?;
        Ok(response.status())
    }

    /// One chat completion. An HTTP status other than 200, or a body without
    /// `choices[0].message.content`, becomes an error `ActionResult` for the user.
    pub async fn complete(
        &self,
        ctx: &Ctx,
        api_key: &Secret,
        model: &str,
        messages: Value,
        max_tokens: u32,
        timeout: Duration,
    ) -> Result<Completion, HttpError> {
        let response = ctx
            .http
            .post(format!("{}/chat/completions", self.base_url))
            .bearer_auth(api_key.expose())
            .json(&json!({"model": model, "messages": messages, "max_tokens": max_tokens}))
            .timeout(timeout)
            .send()
            .await?;
        if response.status() != 200 {
            return Ok(Completion::Failed(refused(response.status())));
        }
        let body: Value = match response.json() {
            Ok(body) => body,
            Err(_) => return Ok(Completion::Failed(malformed())),
        };
        Ok(match body["choices"][0]["message"]["content"].as_str() {
            Some(text) => Completion::Text {
                text: text.to_owned(),
                // What the API reports it used; a server that reports nothing charges nothing.
                tokens: body["usage"]["total_tokens"].as_u64().unwrap_or(0),
            },
            None => Completion::Failed(malformed()),
        })
    }
}

/// The error result for an HTTP status other than 200.
fn refused(status: u16) -> ActionResult {
    ActionResult::error(
        format!("OpenAI returned {status}"),
        status == 429 || status >= 500,
    )
}

/// The text of a Responses API response: its `output_text` parts, joined.
fn output_text(body: &Value) -> Option<String> {
    let parts: Vec<&str> = body["output"]
        .as_array()?
        .iter()
        .filter(|item| item["type"] == "message")
        .filter_map(|item| item["content"].as_array())
        .flatten()
        .filter(|part| part["type"] == "output_text")
        .filter_map(|part| part["text"].as_str())
        .collect();
    (!parts.is_empty()).then(|| parts.concat())
}

/// How a background call started. Serializable: it is the output of the step that starts
/// it, so a resumed run polls the same response.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Started {
    /// The provider works on it in the background: check the response `id`.
    Background { id: String },
    /// The provider has no background mode.
    Unsupported,
    /// The provider refused the call.
    Failed(ActionResult),
}

/// Where a background response is.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Waiting for the provider to start it.
    Queued,
    /// Being generated.
    InProgress,
    /// The provider could not be asked just now.
    Unavailable,
    /// Finished: the completion, or why there is none.
    Done(Completion),
}

fn malformed() -> ActionResult {
    ActionResult::error("OpenAI returned a response without a completion", true)
}

/// A completion's text, or the error to show the user. Serializable, so a completion can be a
/// checkpointed step's output.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Completion {
    /// The completion's text and the tokens the call used (`usage.total_tokens`).
    Text {
        text: String,
        tokens: u64,
    },
    Failed(ActionResult),
}

impl Completion {
    /// The tokens the call used.
    pub fn tokens(&self) -> u64 {
        match self {
            Self::Text { tokens, .. } => *tokens,
            Self::Failed(_) => 0,
        }
    }

    /// The text, or the error result to answer with instead.
    pub fn into_text(self) -> Result<String, ActionResult> {
        match self {
            Self::Text { text, .. } => Ok(text),
            Self::Failed(result) => Err(result),
        }
    }

    /// A success with `summary` and `{"text": …}`, or the error result.
    pub fn into_result(self, summary: &str) -> ActionResult {
        match self {
            Self::Text { text, .. } => ActionResult::success(summary, json!({ "text": text })),
            Self::Failed(result) => result,
        }
    }
}
