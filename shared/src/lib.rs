//! longrun: run chat-extension functions that make long AI calls (60 s to 30 min) on AWS
//! Lambda without blocking the chat.
//!
//! An extension author writes chat functions ([`ChatFunction`]) and jobs ([`Job`]) against
//! [`Ctx`] and registers them on an [`Extension`]. The pipeline steps — [`intake`],
//! [`worker`], [`delivery`] and [`sweeper`] — are plain async functions over the [`ports`];
//! each Lambda is a thin `main` around one of them.

pub mod action;
pub mod aws;
pub mod config;
pub mod ctx;
pub mod delivery;
pub mod error;
pub mod extension;
pub mod http;
pub mod intake;
pub mod lambda;
pub mod local;
pub mod memory;
pub mod outcome;
pub mod ports;
pub mod runtime;
pub mod stack;
pub mod step;
pub mod sweeper;
pub mod task;
#[cfg(test)]
pub(crate) mod testkit;
pub mod wire;
pub mod worker;

pub use action::ActionResult;
pub use ctx::{BackgroundError, BackgroundOptions, Ctx, ProgressError, StoreError};
pub use error::{Cancelled, Error, Result};
pub use extension::{ActionType, ChatFunction, Extension, Job, ParamsError, ToolSpec};
pub use http::{HttpError, HttpResponse};
pub use ports::Secret;
pub use runtime::{Runtime, Services, Settings};
pub use step::StepError;
pub use task::{Task, TaskId, TaskState};

/// Re-exports for extension crates, so they need not depend on `schemars` and `serde`
/// versions of their own.
pub use schemars;
pub use serde;
pub use serde_json;
