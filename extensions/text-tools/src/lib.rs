//! The reference extension: the seed's three forms of a long AI call, in Rust.
//!
//! - `refine` (Pattern A): one capped HTTP call; the chat waits for it.
//! - `refine_output` (Pattern B): `background = true`; intake acks at once and a worker runs
//!   the whole handler, reporting progress.
//! - `start_refinement` (Pattern C): decides at run time — a fast synchronous call, or the
//!   `refine_job` job in the background with a custom acknowledgement.
//! - `refine_document` (long-running, 1800 s cap): one AI call per chunk, each a checkpointed
//!   `ctx.step`, so the task outlives a Lambda invocation without paying for a chunk twice.
//! - `refine_offloaded` (long-running): the provider's background mode. The call starts at
//!   the provider (`background: true`), and `ctx.poll` checks it every `OPENAI_POLL_SECONDS`
//!   with durable sleeps in between, so no worker waits while the AI works; a cancel cancels
//!   the provider's response (`on_stop`). Providers without the Responses API get the
//!   synchronous call.
//!
//! All three call an OpenAI-compatible chat completions API at `OPENAI_BASE_URL` (default
//! `https://api.openai.com/v1`) with the user's `openai_api_key` secret, and charge the tokens
//! each call reports to the user's daily `ai_tokens` budget (`TEXT_TOOLS_DAILY_AI_TOKENS`).

mod openai;

use std::time::Duration;

use longrun::schemars::{self, JsonSchema};
use longrun::serde_json::json;
use longrun::{
    ActionResult, ActionType, BackgroundOptions, ChatFunction, Ctx, Extension, Job, PartialError,
    Secret, Stopped,
};
use serde::{Deserialize, Serialize};

pub use openai::{Completion, DEFAULT_POLL_EVERY, OpenAi, Started, Status};

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

/// The extension talking to the OpenAI-compatible API at `base_url`, or configured from the
/// environment when `None` — the form `longrun_dev::main` takes. With a `base_url` (the dev
/// stack's simulator or a local model), background responses are checked every 2 s unless
/// `OPENAI_POLL_SECONDS` says otherwise: locally a check costs nothing.
pub fn extension_at(base_url: Option<&str>) -> Extension {
    match base_url {
        Some(url) => {
            let mut openai = OpenAi {
                base_url: url.trim_end_matches('/').to_owned(),
                ..OpenAi::from_env()
            };
            if std::env::var_os("OPENAI_POLL_SECONDS").is_none() {
                openai.poll_every = LOCAL_POLL_EVERY;
            }
            extension_with(openai)
        }
        None => extension(),
    }
}

/// How often the dev stack checks a background response.
pub const LOCAL_POLL_EVERY: Duration = Duration::from_secs(2);

/// The text the examples ask to refine.
pub const EXAMPLE_TEXT: &str = "hey team, so basically we're gonna ship the new search on friday. pls review the doc and lmk what u think asap";

/// The extension talking to the given OpenAI-compatible endpoint. Every handler reaches it
/// through `ctx.state::<OpenAi>()`.
pub fn extension_with(openai: OpenAi) -> Extension {
    Extension::new(NAME)
        .secret(API_KEY_SECRET, "OpenAI key")
        .budget(AI_TOKENS, daily_ai_tokens(), "AI tokens")
        .with_state(openai)
        .function(
            ChatFunction::new("refine", refine)
                .description("Refine the given text via AI completion.")
                .action_type(ActionType::Write)
                .event("text_refined")
                .example(json!({"input": EXAMPLE_TEXT})),
        )
        .function(
            ChatFunction::new("refine_output", refine_output)
                .description("Refine the given text via AI completion (long-running).")
                .action_type(ActionType::Write)
                .event("text_refined")
                .background(true)
                .long_running(false)
                .example(json!({"input": EXAMPLE_TEXT})),
        )
        .function(
            ChatFunction::new("start_refinement", start_refinement)
                .description("Refine text; chooses fast or background path at runtime.")
                .action_type(ActionType::Write)
                .event("refinement_started")
                .example(json!({"input": EXAMPLE_TEXT, "fast_path": false})),
        )
        .function(
            ChatFunction::new("refine_document", refine_document)
                .description("Refine a long document chunk by chunk (long-running, up to 30 min).")
                .action_type(ActionType::Write)
                .event("document_refined")
                .background(true)
                .long_running(true),
        )
        .function(
            ChatFunction::new("refine_offloaded", refine_offloaded)
                .description(
                    "Refine the given text via AI completion, run at the provider in the background.",
                )
                .action_type(ActionType::Write)
                .event("text_refined")
                .background(true)
                .long_running(true)
                .on_stop(cancel_at_provider),
        )
        .job(Job::new(REFINE_JOB, refine_job).event("text_refined"))
}

/// The budget meter of the tokens the AI calls use.
pub const AI_TOKENS: &str = "ai_tokens";

/// Each user's daily AI token budget: `TEXT_TOOLS_DAILY_AI_TOKENS`, default 1 000 000.
fn daily_ai_tokens() -> u64 {
    std::env::var("TEXT_TOOLS_DAILY_AI_TOKENS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1_000_000)
}

/// Charges the tokens a completion used to the user's daily budget; past the budget, the
/// error ends the call with the budget message.
async fn charge(ctx: &Ctx, completion: &Completion) -> longrun::Result<()> {
    if completion.tokens() > 0 {
        ctx.charge(AI_TOKENS, completion.tokens()).await?;
    }
    Ok(())
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

/// Params of `refine_document`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct RefineDocumentParams {
    /// The document; paragraphs are separated by blank lines
    pub document: String,
}

/// The longest chunk sent in one AI call, in characters.
pub const MAX_CHUNK_CHARS: usize = 4000;

/// Splits a document into chunks of whole paragraphs, each at most [`MAX_CHUNK_CHARS`]
/// characters (a longer paragraph is a chunk of its own, cut at character boundaries).
pub fn chunks(document: &str) -> Vec<String> {
    let mut chunks: Vec<String> = Vec::new();
    let mut current = String::new();
    for paragraph in document
        .split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let fits = current.chars().count() + paragraph.chars().count() + 2 <= MAX_CHUNK_CHARS;
        if !current.is_empty() && !fits {
            chunks.push(std::mem::take(&mut current));
        }
        if paragraph.chars().count() > MAX_CHUNK_CHARS {
            let chars: Vec<char> = paragraph.chars().collect();
            chunks.extend(
                chars
                    .chunks(MAX_CHUNK_CHARS)
                    .map(|c| c.iter().collect::<String>()),
            );
            continue;
        }
        if !current.is_empty() {
            current.push_str("\n\n");
        }
        current.push_str(paragraph);
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// A long-running task in checkpointed steps: one AI call per chunk, each a `ctx.step`, so a
/// task handed on before the Lambda deadline — or resumed after a crash — never pays for a
/// chunk twice.
async fn refine_document(ctx: Ctx, params: RefineDocumentParams) -> longrun::Result<ActionResult> {
    let api_key = ctx.secrets.require(API_KEY_SECRET).await?;
    let openai = ctx.state::<OpenAi>()?;
    let chunks = chunks(&params.document);
    if chunks.is_empty() {
        return Ok(ActionResult::error("The document is empty.", false));
    }
    let total = chunks.len();
    let mut refined = Vec::with_capacity(total);
    for (i, chunk) in chunks.iter().enumerate() {
        let completion = ctx
            .step(&format!("chunk-{i}"), async {
                refine_long(openai, &ctx, &api_key, chunk)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await?;
        // Charged after the step, replayed or not: a resumed task charges each chunk at the
        // same position again, and the meter counts it once.
        if let Ok(completion) = &completion {
            charge(&ctx, completion).await?;
        }
        match completion.map(Completion::into_text) {
            Ok(Ok(text)) => refined.push(text),
            Ok(Err(result)) => return Ok(result),
            Err(error) => return Err(longrun::Error::msg(error)),
        }
        // What the user keeps if they cancel now or the task runs out of time. A document
        // whose refined text outgrows the limit keeps the last value that fitted.
        let so_far = json!({"text": refined.join("\n\n"), "chunks_done": i + 1, "chunks": total});
        match ctx.partial(so_far).await {
            Ok(()) | Err(PartialError::TooLarge { .. }) => {}
            Err(other) => return Err(other.into()),
        }
        let pct = i64::try_from((i + 1) * 95 / total).unwrap_or(95);
        ctx.progress(pct, format!("Refined chunk {} of {total}", i + 1))
            .await?;
    }
    let text = refined.join("\n\n");
    ctx.store.set(LAST_REFINED, &text).await?;
    Ok(ActionResult::success(
        format!("Document refined ({total} chunks)."),
        json!({"text": text, "chunks": total}),
    ))
}

/// Input of `refine_job`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RefineJobInput {
    pub input: String,
}

const SYSTEM_PROMPT: &str = "You refine prose. Be concise.";

fn messages(input: &str) -> longrun::serde_json::Value {
    json!([
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": input},
    ])
}

/// Pattern A: one call with a per-call timeout of 120 s (the cap is 180 s).
async fn refine(ctx: Ctx, params: RefineParams) -> longrun::Result<ActionResult> {
    let api_key = ctx.secrets.require(API_KEY_SECRET).await?;
    let openai = ctx.state::<OpenAi>()?;
    let completion = openai
        .complete(
            &ctx,
            &api_key,
            &openai.model,
            messages(&params.input),
            params.max_length,
            LONG_CALL,
        )
        .await?;
    charge(&ctx, &completion).await?;
    Ok(completion.into_result("Refined text ready!"))
}

/// One refinement with the main model: 4000 tokens, 120 s — the slow call of Patterns B and C.
async fn refine_long(
    openai: &OpenAi,
    ctx: &Ctx,
    api_key: &Secret,
    input: &str,
) -> longrun::Result<Completion> {
    Ok(openai
        .complete(
            ctx,
            api_key,
            &openai.model,
            messages(input),
            4000,
            LONG_CALL,
        )
        .await?)
}

/// The per-call timeout of the slow calls (the cap is 180 s).
const LONG_CALL: Duration = Duration::from_secs(120);

/// Pattern B: the whole handler runs detached; progress and the result reach the chat.
async fn refine_output(ctx: Ctx, params: StartRefinementParams) -> longrun::Result<ActionResult> {
    let api_key = ctx.secrets.require(API_KEY_SECRET).await?;
    let openai = ctx.state::<OpenAi>()?;
    ctx.progress(15, "Fetching context").await?;
    ctx.progress(45, "Generating with AI").await?;
    let completion = refine_long(openai, &ctx, &api_key, &params.input).await?;
    refined(&ctx, completion).await
}

/// Charges a refinement's tokens, keeps its text as the user's last refined one and answers
/// with it — or with the error the AI call ended in.
async fn refined(ctx: &Ctx, completion: Completion) -> longrun::Result<ActionResult> {
    charge(ctx, &completion).await?;
    let text = match completion.into_text() {
        Ok(text) => text,
        Err(result) => return Ok(result),
    };
    ctx.progress(90, "Saving").await?;
    ctx.store.set(LAST_REFINED, &text).await?;
    Ok(ActionResult::success(
        "Refined output ready! 🎉",
        json!({"text": text}),
    ))
}

/// The step that starts `refine_offloaded`'s provider call; its output names the response.
const START_STEP: &str = "start";

/// Pattern B with the provider's background mode: no worker waits while the AI works.
///
/// The call starts once (a step, so a resumed run polls the same response), then `ctx.poll`
/// checks it every `poll_every`, each check a short invocation and the task `sleeping` in
/// between. Progress follows the provider's status. If the user cancels, the `on_stop` hook
/// cancels the response at the provider before the task ends.
async fn refine_offloaded(
    ctx: Ctx,
    params: StartRefinementParams,
) -> longrun::Result<ActionResult> {
    let api_key = ctx.secrets.require(API_KEY_SECRET).await?;
    let openai = ctx.state::<OpenAi>()?;
    // Progress follows the provider's status; each change is a chat message (and its
    // writes), so there is none for the start itself: the ack just said it.
    let started = ctx
        .step(START_STEP, async {
            openai
                .start_background(
                    &ctx,
                    &api_key,
                    &openai.model,
                    SYSTEM_PROMPT,
                    &params.input,
                    4000,
                )
                .await
                .map_err(|e| e.to_string())
        })
        .await?
        .map_err(longrun::Error::msg)?;
    let completion = match started {
        Started::Background { id } => {
            ctx.poll("response", openai.poll_every, || {
                let (ctx, api_key, id) = (&ctx, &api_key, &id);
                async move {
                    match openai.check(ctx, api_key, id).await {
                        Ok(Status::Queued) => {
                            let _ = ctx.progress(20, "Queued at the AI provider").await;
                            longrun::Check::Pending
                        }
                        Ok(Status::InProgress) => {
                            let _ = ctx.progress(50, "The AI is writing").await;
                            longrun::Check::Pending
                        }
                        // Asked again at the next check; the cap bounds the wait.
                        Ok(Status::Unavailable) | Err(_) => longrun::Check::Pending,
                        Ok(Status::Done(completion)) => longrun::Check::Done(completion),
                    }
                }
            })
            .await?
        }
        // No background mode at this provider: the synchronous call, in a step.
        Started::Unsupported => {
            ctx.progress(45, "Generating with AI").await?;
            ctx.step("complete", async {
                refine_long(openai, &ctx, &api_key, &params.input)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await?
            .map_err(longrun::Error::msg)?
        }
        Started::Failed(result) => return Ok(result),
    };
    refined(&ctx, completion).await
}

/// `refine_offloaded`'s `on_stop` hook: cancels the provider's response, if one started.
async fn cancel_at_provider(ctx: Ctx, stopped: Stopped) -> longrun::Result<()> {
    let Some(Ok(Started::Background { id })) = stopped.step::<Result<Started, String>>(START_STEP)
    else {
        return Ok(());
    };
    let api_key = ctx.secrets.require(API_KEY_SECRET).await?;
    let openai = ctx.state::<OpenAi>()?;
    openai.cancel(&ctx, &api_key, &id).await?;
    Ok(())
}

/// Pattern C: a fast synchronous path, or `refine_job` in the background with a custom ack.
async fn start_refinement(ctx: Ctx, params: StartParams) -> longrun::Result<ActionResult> {
    let api_key = ctx.secrets.require(API_KEY_SECRET).await?;
    if params.fast_path {
        let openai = ctx.state::<OpenAi>()?;
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
        charge(&ctx, &completion).await?;
        return Ok(completion.into_result("Quick refine done."));
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
async fn refine_job(ctx: Ctx, input: RefineJobInput) -> longrun::Result<ActionResult> {
    let api_key = ctx.secrets.require(API_KEY_SECRET).await?;
    let openai = ctx.state::<OpenAi>()?;
    ctx.progress(50, "Generating with AI").await?;
    let completion = refine_long(openai, &ctx, &api_key, &input.input).await?;
    refined(&ctx, completion).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_keep_paragraphs_whole_and_bounded() {
        let paragraph = "word ".repeat(300); // 1500 chars
        let document = [paragraph.as_str(); 5].join("\n\n");
        let chunks = chunks(&document);
        assert_eq!(chunks.len(), 3);
        assert!(chunks.iter().all(|c| c.chars().count() <= MAX_CHUNK_CHARS));
        assert_eq!(chunks.join("\n\n").split("\n\n").count(), 5);
    }

    #[test]
    fn a_huge_paragraph_is_cut_and_blank_input_has_no_chunks() {
        let chunks = chunks(&"é".repeat(MAX_CHUNK_CHARS * 2 + 1));
        assert_eq!(
            chunks.iter().map(|c| c.chars().count()).collect::<Vec<_>>(),
            vec![4000, 4000, 1]
        );
        assert!(super::chunks(" \n\n \n\n").is_empty());
    }
}
