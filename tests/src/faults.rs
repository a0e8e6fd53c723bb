//! The reference extension plus the faults the end-to-end scenarios need and the reference
//! extension cannot produce: a handler that panics, one that returns an error, one that
//! outruns its cap without ever calling `ctx.progress`, one that kills its process, and probes that pass a caller's
//! timeout to `ctx.http` and a caller's percentage to `ctx.progress`, and a nap (`ctx.sleep`).
//!
//! `faults` (src/bin) is the Lambda `main` over this extension.

use std::time::Duration;

use longrun::serde_json::json;
use longrun::{ActionResult, ChatFunction, Ctx, Extension};
use schemars::JsonSchema;
use serde::Deserialize;

/// No params.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct Nothing {}

/// Params of `probe` and `probe_bg`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ProbeParams {
    /// The per-call timeout to ask `ctx.http` for, in milliseconds (unsigned: a negative one
    /// fails the schema).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// The percentage to report with `ctx.progress` (any integer: the runtime checks it).
    #[serde(default)]
    pub pct: Option<i64>,
}

/// Params of `nap`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct NapParams {
    /// How long to sleep.
    pub seconds: u64,
}

/// The reference extension with the fault functions added.
pub fn extension() -> Extension {
    text_tools::extension()
        .function(
            ChatFunction::new("explode", |_ctx: Ctx, _: Nothing| async move {
                if std::hint::black_box(true) {
                    panic!("the explode handler always panics");
                }
                Ok(ActionResult::success("unreachable", ()))
            })
            .description("Panics (a bug in a handler).")
            .background(true),
        )
        .function(
            ChatFunction::new("fail", |_ctx: Ctx, _: Nothing| async move {
                Err::<ActionResult, _>(longrun::Error::msg("the fail handler always fails"))
            })
            .description("Returns an error (a failure the handler does not turn into a result).")
            .background(true),
        )
        .function(
            ChatFunction::new("spin", |_ctx: Ctx, _: Nothing| async move {
                // Busy for a minute without a progress call: only the cap can stop it.
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(ActionResult::success("spun", ()))
            })
            .description("Runs past any test cap without reporting progress.")
            .background(true),
        )
        .function(
            ChatFunction::new("abort", |_ctx: Ctx, _: Nothing| async move {
                // Long enough for the rest of its batch to be claimed and running.
                tokio::time::sleep(Duration::from_millis(1500)).await;
                std::process::abort()
            })
            .description("Kills its worker process (as a stack overflow or out-of-memory does).")
            .background(true),
        )
        .function(
            ChatFunction::new("nap", |ctx: Ctx, params: NapParams| async move {
                let before: u32 = ctx.step("before", async { 1 }).await?;
                ctx.progress(10, "Napping").await?;
                ctx.sleep(Duration::from_secs(params.seconds)).await?;
                ctx.progress(90, "Awake").await?;
                Ok(ActionResult::success(
                    "rested",
                    json!({"before": before, "slept_s": params.seconds}),
                ))
            })
            .description("Sleeps durably (ctx.sleep) between two steps.")
            .background(true),
        )
        .function(
            ChatFunction::new("probe", probe)
                .description("Passes the caller's timeout to ctx.http and pct to ctx.progress."),
        )
        .function(
            ChatFunction::new("probe_bg", probe)
                .description("`probe`, in the background.")
                .background(true),
        )
}

async fn probe(ctx: Ctx, params: ProbeParams) -> longrun::Result<ActionResult> {
    if let Some(pct) = params.pct {
        ctx.progress(pct, "probing").await?;
    }
    if let Some(timeout_ms) = params.timeout_ms {
        let base = std::env::var("OPENAI_BASE_URL").unwrap_or_default();
        let response = ctx
            .http
            .post(format!("{base}/chat/completions"))
            .json(&json!({"model": "probe", "messages": [{"role": "user", "content": "probe"}]}))
            .timeout(Duration::from_millis(timeout_ms))
            .send()
            .await?;
        return Ok(ActionResult::success(
            "probed",
            json!({"status": response.status()}),
        ));
    }
    Ok(ActionResult::success("probed", ()))
}
