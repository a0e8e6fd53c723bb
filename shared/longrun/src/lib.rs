//! longrun: run chat-extension functions that make long AI calls (60 s to 30 min) on AWS
//! Lambda without blocking the chat.
//!
//! This crate is what an extension author codes against. It knows nothing of AWS or of the
//! Lambda runtime: those live in `longrun-aws` (the adapters) and `longrun-lambda` (the one
//! entry point a function's `main` calls), and the local stack in `longrun-dev`.
//!
//! # An extension
//!
//! An extension registers chat functions ([`ChatFunction`]) and jobs ([`Job`]) on an
//! [`Extension`]; each handler is a plain async function of [`Ctx`] and typed params that
//! returns an [`ActionResult`]. The seed's three patterns:
//!
//! - **A**, synchronous: the handler runs in intake; `ctx.http` calls default to 30 s and are
//!   capped at 180 s (a longer timeout is refused before anything is sent);
//! - **B**, `background(true)`: intake acks at once and a worker runs the whole handler, whose
//!   [`Ctx::progress`] calls are checkpoints, heartbeats and cancellation points;
//! - **C**, the handler decides at run time and calls [`Ctx::background_task`] with a named
//!   [`Job`] and its typed input — the one deliberate difference from the seed: a Rust future
//!   cannot travel from one Lambda to another, so the detached part is a job registered on the
//!   extension.
//!
//! ```
//! use longrun::{ActionResult, ChatFunction, Ctx, Extension};
//! use longrun::schemars::JsonSchema;
//! use serde::Deserialize;
//!
//! #[derive(Deserialize, JsonSchema)]
//! struct Params {
//!     /// Text to refine
//!     input: String,
//! }
//!
//! /// What every handler can reach through `ctx.state()`.
//! struct Model {
//!     base_url: String,
//! }
//!
//! async fn refine_output(ctx: Ctx, params: Params) -> longrun::Result<ActionResult> {
//!     let _key = ctx.secrets.require("openai_api_key").await?; // "OpenAI key not connected"
//!     let model = ctx.state::<Model>()?;
//!     ctx.progress(45, "Generating with AI").await?; // Err(Cancelled) once the user cancels
//!     Ok(ActionResult::success(
//!         "Refined output ready! 🎉",
//!         serde_json::json!({"text": params.input, "model": model.base_url}),
//!     ))
//! }
//!
//! let extension = Extension::new("text-tools")
//!     .secret("openai_api_key", "OpenAI key")
//!     .with_state(Model { base_url: "https://api.openai.com/v1".into() })
//!     .function(
//!         ChatFunction::new("refine_output", refine_output)
//!             .description("Refine the given text via AI completion (long-running).")
//!             .event("text_refined")
//!             .background(true)
//!             .example(serde_json::json!({"input": "make this sound better"})),
//!     );
//! assert_eq!(extension.tool_manifest()[0].name, "refine_output");
//! ```
//!
//! # Testing a handler
//!
//! With the `testing` feature, [`testing::TestStack`] runs the whole pipeline in memory: call a
//! function as a user would, run the queues until idle, read the chat, the task record and the
//! audit trail — on tokio's paused clock if you like.
//!
//! # The runtime side
//!
//! The pipeline steps — [`intake`], [`worker`], [`delivery`] and [`sweeper`] — are plain async
//! functions over the [`ports`], run by a [`Runtime`]; the adapter and Lambda crates call them.

mod action;
pub mod config;
mod ctx;
pub mod delivery;
mod error;
mod extension;
mod http;
pub mod intake;
mod lease;
mod outcome;
pub mod ports;
pub mod runtime;
mod step;
pub mod sweeper;
pub mod task;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod wire;
pub mod worker;

pub use action::ActionResult;
pub use ctx::{
    BackgroundError, BackgroundOptions, Caller, ChargeError, Ctx, MAX_PARTIAL_BYTES,
    MAX_PROGRESS_MESSAGE_CHARS, MAX_STORE_KEY_BYTES, MissingState, PartialError, ProgressError,
    SecretError, Secrets, Store, StoreError,
};
pub use error::{Cancelled, Error, Result};
pub use extension::{
    ActionType, Budget, ChatFunction, Extension, InvalidExtension, Job, ParamsError,
    STOP_HOOK_BUDGET, SecretSpec, StopReason, Stopped, ToolSpec,
};
pub use http::{
    DEFAULT_HTTP_TIMEOUT, Http, HttpError, HttpRequest, HttpResponse, MAX_HTTP_BODY_BYTES,
    MAX_HTTP_TIMEOUT,
};
pub use ports::Secret;
pub use runtime::{EnqueueError, Runtime, Services, Settings};
pub use step::{Check, MAX_STEP_OUTPUT_BYTES, SLEEP_IN_PLACE, StepError, StepRecord};
pub use task::{Task, TaskId, TaskState};

/// Re-exports for extension crates, so they need not depend on `schemars` and `serde`
/// versions of their own.
pub use schemars;
pub use serde;
pub use serde_json;
