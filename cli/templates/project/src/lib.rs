//! The __NAME__ extension: long AI calls from a chat, in the three forms longrun offers, plus a
//! long-running function in checkpointed steps.
//!
//! - `summarize` — synchronous: one capped HTTP call (default 30 s, at most 180 s); the chat
//!   waits for the answer.
//! - `summarize_later` — `background(true)`: the chat gets an ack at once, sees progress, and
//!   gets the result as a fresh message.
//! - `start_summary` — decides at run time: a quick synchronous answer, or the `summary_job`
//!   job in the background with an acknowledgement of its own.
//! - `summarize_document` — `long_running(true)` (1800 s cap): one AI call per chunk, each a
//!   `ctx.step`, so a task that outlives one Lambda invocation never pays for a chunk twice.
//!
//! Each calls an OpenAI-compatible chat completions API (`OPENAI_BASE_URL`, default
//! `https://api.openai.com/v1`; `OPENAI_MODEL`, default `gpt-4o-mini`) with the user's
//! `openai_api_key` secret.

use std::time::Duration;

use longrun::{
    ActionResult, ActionType, BackgroundOptions, ChatFunction, Ctx, Extension, Job, Secret,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The extension's name: the `ext` of every request it serves.
pub const NAME: &str = "__NAME__";
/// The secret each user connects.
pub const API_KEY: &str = "openai_api_key";
/// The job `start_summary` launches on its slow path.
pub const SUMMARY_JOB: &str = "summary_job";

/// The text the examples use.
const EXAMPLE: &str = "Long AI calls should never block a chat: acknowledge at once, show progress, allow a cancel, and deliver the answer as a fresh message.";

/// Where the model is: shared by every handler through `ctx.state::<Model>()`.
#[derive(Debug, Clone)]
pub struct Model {
    /// The OpenAI-compatible API, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// The model name.
    pub model: String,
}

impl Model {
    /// From `OPENAI_BASE_URL` and `OPENAI_MODEL`.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        Self {
            base_url: var("OPENAI_BASE_URL").unwrap_or_else(|| "https://api.openai.com/v1".into()),
            model: var("OPENAI_MODEL").unwrap_or_else(|| "gpt-4o-mini".into()),
        }
    }
}

/// The extension, configured from the environment.
pub fn extension() -> Extension {
    extension_with(Model::from_env())
}

/// The extension calling the OpenAI-compatible API at `base_url` (`None`: the environment's)
/// — the form `longrun_dev::main` takes, so `--simulate-model` can point it at the simulator.
pub fn extension_at(base_url: Option<&str>) -> Extension {
    let mut model = Model::from_env();
    if let Some(url) = base_url {
        model.base_url = url.trim_end_matches('/').to_owned();
    }
    extension_with(model)
}

/// The extension with its functions, its job and its state.
pub fn extension_with(model: Model) -> Extension {
    Extension::new(NAME)
        .secret(API_KEY, "OpenAI key")
        .with_state(model)
        .function(
            ChatFunction::new("summarize", summarize)
                .description("Summarize the given text (the chat waits for the answer).")
                .event("text_summarized")
                .example(json!({"input": EXAMPLE})),
        )
        .function(
            ChatFunction::new("summarize_later", summarize_later)
                .description("Summarize the given text in the background, with progress.")
                .action_type(ActionType::Write)
                .event("text_summarized")
                .background(true)
                .example(json!({"input": EXAMPLE})),
        )
        .function(
            ChatFunction::new("start_summary", start_summary)
                .description("Summarize quickly, or in the background when asked for depth.")
                .event("summary_started")
                .example(json!({"input": EXAMPLE, "quick": false})),
        )
        .function(
            ChatFunction::new("summarize_document", summarize_document)
                .description("Summarize a long document paragraph by paragraph (up to 30 min).")
                .event("document_summarized")
                .background(true)
                .long_running(true)
                .example(json!({"document": format!("{EXAMPLE}\n\n{EXAMPLE}")})),
        )
        .job(Job::new(SUMMARY_JOB, summary_job).event("text_summarized"))
}

/// Params of `summarize` and `summarize_later`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct TextParams {
    /// Text to summarize
    pub input: String,
}

/// Params of `start_summary`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct StartParams {
    /// Text to summarize
    pub input: String,
    /// Answer at once with a short summary instead of a thorough one in the background
    #[serde(default)]
    pub quick: bool,
}

/// Params of `summarize_document`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct DocumentParams {
    /// The document; paragraphs are separated by blank lines
    pub document: String,
}

/// Input of `summary_job`.
#[derive(Debug, Serialize, Deserialize)]
pub struct JobInput {
    /// Text to summarize
    pub input: String,
}

/// One chat completion through `ctx.http` (capped, and dropped at once on a cancel): the text,
/// or the error result to show the user.
async fn complete(
    ctx: &Ctx,
    api_key: &Secret,
    prompt: &str,
    max_tokens: u32,
    timeout: Duration,
) -> longrun::Result<Result<String, ActionResult>> {
    let model = ctx.state::<Model>()?;
    let response = ctx
        .http
        .post(format!("{}/chat/completions", model.base_url))
        .bearer_auth(api_key.expose())
        .json(&json!({
            "model": model.model,
            "messages": [
                {"role": "system", "content": "You summarize text. Be concise."},
                {"role": "user", "content": prompt},
            ],
            "max_tokens": max_tokens,
        }))
        .timeout(timeout)
        .send()
        .await?;
    if response.status() != 200 {
        let retryable = response.status() == 429 || response.status() >= 500;
        return Ok(Err(ActionResult::error(
            format!("The model returned {}", response.status()),
            retryable,
        )));
    }
    let body: Value = response.json()?;
    Ok(match body["choices"][0]["message"]["content"].as_str() {
        Some(text) => Ok(text.to_owned()),
        None => Err(ActionResult::error("The model sent no answer", true)),
    })
}

/// Synchronous: one call with a 60 s per-call timeout (the cap is 180 s).
async fn summarize(ctx: Ctx, params: TextParams) -> longrun::Result<ActionResult> {
    // Not connected: the user gets "OpenAI key not connected" (not retryable).
    let api_key = ctx.secrets.require(API_KEY).await?;
    Ok(
        match complete(&ctx, &api_key, &params.input, 500, Duration::from_secs(60)).await? {
            Ok(text) => ActionResult::success("Summary ready.", json!({ "text": text })),
            Err(error) => error,
        },
    )
}

/// Background: the whole handler runs in the worker; progress reaches the chat, and every
/// `ctx.progress` is a heartbeat and a cancellation point (`?` ends a cancelled task).
async fn summarize_later(ctx: Ctx, params: TextParams) -> longrun::Result<ActionResult> {
    let api_key = ctx.secrets.require(API_KEY).await?;
    ctx.progress(15, "Reading").await?;
    ctx.progress(45, "Asking the model").await?;
    let text = match complete(&ctx, &api_key, &params.input, 2000, Duration::from_secs(120)).await? {
        Ok(text) => text,
        Err(error) => return Ok(error),
    };
    ctx.progress(90, "Saving").await?;
    ctx.store.set("last_summary", &text).await?;
    Ok(ActionResult::success(
        "Summary ready! 🎉",
        json!({ "text": text }),
    ))
}

/// Decides at run time: a quick answer here, or `summary_job` in the background with a custom
/// acknowledgement.
async fn start_summary(ctx: Ctx, params: StartParams) -> longrun::Result<ActionResult> {
    ctx.secrets.require(API_KEY).await?;
    if params.quick {
        return summarize(
            ctx,
            TextParams {
                input: params.input,
            },
        )
        .await;
    }
    let task_id = ctx
        .background_task(
            SUMMARY_JOB,
            &JobInput {
                input: params.input,
            },
            BackgroundOptions::default().name("Thorough summary"),
        )
        .await?;
    Ok(ActionResult::success(
        "On it — I'll send the summary here.",
        json!({ "task_id": task_id }),
    ))
}

/// The detached part of `start_summary`.
async fn summary_job(ctx: Ctx, input: JobInput) -> longrun::Result<ActionResult> {
    let api_key = ctx.secrets.require(API_KEY).await?;
    ctx.progress(50, "Asking the model").await?;
    Ok(
        match complete(&ctx, &api_key, &input.input, 2000, Duration::from_secs(120)).await? {
            Ok(text) => ActionResult::success("Summary ready! 🎉", json!({ "text": text })),
            Err(error) => error,
        },
    )
}

/// Long-running, in checkpointed steps: each paragraph's summary is stored when its step ends,
/// and a task resumed in a later invocation (handed on before the Lambda deadline, or after a
/// crash) replays the stored ones instead of calling the model again.
async fn summarize_document(ctx: Ctx, params: DocumentParams) -> longrun::Result<ActionResult> {
    let paragraphs: Vec<&str> = params
        .document
        .split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if paragraphs.is_empty() {
        return Ok(ActionResult::error("The document is empty.", false));
    }
    let api_key = ctx.secrets.require(API_KEY).await?;
    let total = paragraphs.len();
    let mut summaries = Vec::with_capacity(total);
    for (i, paragraph) in paragraphs.iter().enumerate() {
        let answer = ctx
            .step(&format!("paragraph-{i}"), async {
                complete(&ctx, &api_key, paragraph, 500, Duration::from_secs(120))
                    .await
                    .map_err(|e| e.to_string())
            })
            .await?;
        match answer {
            Ok(Ok(text)) => summaries.push(text),
            Ok(Err(error)) => return Ok(error),
            Err(error) => return Err(longrun::Error::msg(error)),
        }
        let pct = i64::try_from((i + 1) * 95 / total).unwrap_or(95);
        ctx.progress(pct, format!("Summarized {} of {total}", i + 1))
            .await?;
    }
    Ok(ActionResult::success(
        format!("Document summarized ({total} paragraphs)."),
        json!({ "text": summaries.join("\n\n"), "paragraphs": total }),
    ))
}
