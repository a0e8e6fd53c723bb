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
}

impl OpenAi {
    /// OpenAI's API.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into().trim_end_matches('/').to_owned(),
            model: "gpt-4o".to_owned(),
            fast_model: "gpt-4o-mini".to_owned(),
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
        openai
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
            let retryable = response.status() == 429 || response.status() >= 500;
            return Ok(Completion::Failed(ActionResult::error(
                format!("OpenAI returned {}", response.status()),
                retryable,
            )));
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
