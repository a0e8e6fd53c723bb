//! The reference extension: the seed's three forms of a long AI call, in Rust.
//!
//! - `refine` (Pattern A): one capped HTTP call; the chat waits for it.
//! - `refine_output` (Pattern B): `background = true`; intake acks at once and a worker runs
//!   the whole handler, reporting progress.
//! - `start_refinement` (Pattern C): decides at run time — a fast synchronous call, or the
//!   `refine_job` job in the background with a custom acknowledgement.
//!
//! All three call an OpenAI-compatible chat completions API at `OPENAI_BASE_URL` (default
//! `https://api.openai.com/v1`) with the user's `openai_api_key` secret.

mod openai;

use std::time::Duration;

use longrun::schemars::{self, JsonSchema};
use longrun::serde_json::json;
use longrun::{ActionResult, ActionType, BackgroundOptions, ChatFunction, Ctx, Extension, Job};
use serde::{Deserialize, Serialize};

pub use openai::{Completion, OpenAi};

/// The extension's name: the `ext` of every request it serves.
pub const NAME: &str = "text-tools";
/// The secret each user connects.
pub const API_KEY_SECRET: &str = "openai_api_key";
/// The `ctx.store` key of the last refined text.
pub const LAST_REFINED: &str = "last_refined";

/// The extension, configured from the environment (`OPENAI_BASE_URL`, `OPENAI_MODEL`,
/// `OPENAI_FAST_MODEL`).
pub fn extension() -> Extension {
    extension_with(OpenAi::from_env())
}

/// The extension talking to the given OpenAI-compatible endpoint.
pub fn extension_with(openai: OpenAi) -> Extension {
    let a = openai.clone();
    let b = openai.clone();
    let c = openai.clone();
    let job = openai;
    Extension::new(NAME)
        .secret(API_KEY_SECRET, "OpenAI (or compatible) API key")
        .function(
            ChatFunction::new("refine", move |ctx, params| refine(a.clone(), ctx, params))
                .description("Refine the given text via AI completion.")
                .action_type(ActionType::Write)
                .event("text_refined"),
        )
        .function(
            ChatFunction::new("refine_output", move |ctx, params| {
                refine_output(b.clone(), ctx, params)
            })
            .description("Refine the given text via AI completion (long-running).")
            .action_type(ActionType::Write)
            .event("text_refined")
            .background(true)
            .long_running(false),
        )
        .function(
            ChatFunction::new("start_refinement", move |ctx, params| {
                start_refinement(c.clone(), ctx, params)
            })
            .description("Refine text; chooses fast or background path at runtime.")
            .action_type(ActionType::Write)
            .event("refinement_started"),
        )
        .job(
            Job::new(REFINE_JOB, move |ctx, input| {
                refine_job(job.clone(), ctx, input)
            })
            .event("text_refined"),
        )
}

/// The job `start_refinement` launches on its slow path.
pub const REFINE_JOB: &str = "refine_job";

/// Params of `refine`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct RefineParams {
    /// Text to refine
    pub input: String,
    /// Most tokens to generate
    #[serde(default = "default_max_length")]
    pub max_length: u32,
}

fn default_max_length() -> u32 {
    1000
}

/// Params of `refine_output`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct StartRefinementParams {
    /// Text to refine
    pub input: String,
}

/// Params of `start_refinement`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct StartParams {
    /// Text to refine
    pub input: String,
    /// Answer at once with a smaller model instead of refining in the background
    #[serde(default)]
    pub fast_path: bool,
}

/// Input of `refine_job`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RefineJobInput {
    pub input: String,
}

const SYSTEM_PROMPT: &str = "You refine prose. Be concise.";

fn key_missing() -> ActionResult {
    ActionResult::error("OpenAI key not connected", false)
}

fn messages(input: &str) -> longrun::serde_json::Value {
    json!([
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": input},
    ])
}

/// Pattern A: one call with a per-call timeout of 120 s (the cap is 180 s).
async fn refine(openai: OpenAi, ctx: Ctx, params: RefineParams) -> longrun::Result<ActionResult> {
    let Some(api_key) = ctx.secrets.get(API_KEY_SECRET).await? else {
        return Ok(key_missing());
    };
    let completion = openai
        .complete(
            &ctx,
            &api_key,
            &openai.model,
            messages(&params.input),
            params.max_length,
            Duration::from_secs(120),
        )
        .await?;
    Ok(match completion {
        Completion::Text(text) => {
            ActionResult::success("Refined text ready!", json!({"text": text}))
        }
        Completion::Failed(result) => result,
    })
}

/// Pattern B: the whole handler runs detached; progress and the result reach the chat.
async fn refine_output(
    openai: OpenAi,
    ctx: Ctx,
    params: StartRefinementParams,
) -> longrun::Result<ActionResult> {
    let Some(api_key) = ctx.secrets.get(API_KEY_SECRET).await? else {
        return Ok(key_missing());
    };
    ctx.progress(15, "Fetching context").await?;
    ctx.progress(45, "Generating with AI").await?;
    let completion = openai
        .complete(
            &ctx,
            &api_key,
            &openai.model,
            messages(&params.input),
            4000,
            Duration::from_secs(120),
        )
        .await?;
    let text = match completion {
        Completion::Text(text) => text,
        Completion::Failed(result) => return Ok(result),
    };
    ctx.progress(90, "Saving").await?;
    ctx.store.set(LAST_REFINED, &text).await?;
    Ok(ActionResult::success(
        "Refined output ready! 🎉",
        json!({"text": text}),
    ))
}

/// Pattern C: a fast synchronous path, or `refine_job` in the background with a custom ack.
async fn start_refinement(
    openai: OpenAi,
    ctx: Ctx,
    params: StartParams,
) -> longrun::Result<ActionResult> {
    let Some(api_key) = ctx.secrets.get(API_KEY_SECRET).await? else {
        return Ok(key_missing());
    };
    if params.fast_path {
        let completion = openai
            .complete(
                &ctx,
                &api_key,
                &openai.fast_model,
                messages(&params.input),
                500,
                Duration::from_secs(30),
            )
            .await?;
        return Ok(match completion {
            Completion::Text(text) => {
                ActionResult::success("Quick refine done.", json!({"text": text}))
            }
            Completion::Failed(result) => result,
        });
    }
    let task_id = ctx
        .background_task(
            REFINE_JOB,
            &RefineJobInput {
                input: params.input,
            },
            BackgroundOptions::default()
                .long_running(false)
                .name("AI refinement"),
        )
        .await?;
    Ok(ActionResult::success(
        "Got it — refining (≈90s). I'll send the result here.",
        json!({"task_id": task_id}),
    ))
}

/// The detached part of `start_refinement`.
async fn refine_job(
    openai: OpenAi,
    ctx: Ctx,
    input: RefineJobInput,
) -> longrun::Result<ActionResult> {
    let Some(api_key) = ctx.secrets.get(API_KEY_SECRET).await? else {
        return Ok(key_missing());
    };
    ctx.progress(50, "Generating with AI").await?;
    let completion = openai
        .complete(
            &ctx,
            &api_key,
            &openai.model,
            messages(&input.input),
            4000,
            Duration::from_secs(120),
        )
        .await?;
    let text = match completion {
        Completion::Text(text) => text,
        Completion::Failed(result) => return Ok(result),
    };
    ctx.store.set(LAST_REFINED, &text).await?;
    Ok(ActionResult::success(
        "Refined output ready! 🎉",
        json!({"text": text}),
    ))
}
