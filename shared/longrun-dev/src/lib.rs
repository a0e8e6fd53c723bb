//! longrun's local stack, as a library: any extension's whole pipeline on one machine, with no
//! AWS account and no Docker.
//!
//! - DynamoDB stays DynamoDB: the embedded dynoxide emulator, file-backed under the state
//!   folder and served on loopback, used through the same `longrun-aws` adapter the Lambdas
//!   use;
//! - [`queue`]: in-process queues with SQS semantics (visibility timeout, receive count,
//!   redelivery, dead-letter queue after `maxReceiveCount`), reachable through an SQS API
//!   ([`sqs_api`]) for the `longrun --local` operator commands;
//! - [`pipeline`]: pollers that play Lambda's event source mappings over those queues, and the
//!   sweeper on a timer — the same worker, delivery and sweeper steps the Lambdas run;
//! - [`secrets`]: per-user secrets in a `0600` JSON file;
//! - [`chat`]: a chat that records the conversation, shown as a terminal [`transcript`] and a
//!   web page ([`web`]), live over server-sent events;
//! - [`simulator`]: an offline, clearly labelled OpenAI-compatible model, so a demo runs with
//!   no keys and no network; [`demo`] plays each function's example once;
//! - [`events`]: sample events for `sam local invoke` and `cargo lambda invoke`.
//!
//! An extension's dev binary is one call, [`main`]:
//!
//! ```no_run
//! # fn my_extension(_model_url: Option<&str>) -> longrun::Extension { longrun::Extension::new("my-ext") }
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     longrun_dev::main(my_extension).await
//! }
//! ```
//!
//! The closure gets the OpenAI-compatible base URL the stack chose (`--simulate-model`'s
//! simulator, or `--model-url`), or `None` for the extension's own configuration. A program of
//! the author's own, or a test, starts a stack with [`DevStack::builder`].

pub mod chat;
pub mod demo;
pub mod events;
pub mod pipeline;
pub mod queue;
pub mod secrets;
mod serve;
pub mod simulator;
pub mod sqs_api;
mod stack;
pub mod state;
pub mod transcript;
pub mod web;

pub use serve::{DevArgs, DevBuilder, main, run};
pub use stack::{
    DevOptions, DevStack, MakeExtension, Model, PLACEHOLDER_SECRET, QUEUE_PREFIX, TABLE,
};

/// Why the dev stack could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DevError {
    /// Something to change in the set-up: a port in use, no stack running, a bad extension.
    #[error("{0}")]
    Config(String),
    /// Another stack already runs for the state folder.
    #[error("{0}")]
    Conflict(String),
    /// A file, a server or an emulator failed.
    #[error("{0}")]
    Other(String),
}

impl DevError {
    /// The exit code of the `longrun` command line for this failure: 5 configuration,
    /// 4 conflict, 1 anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) => 5,
            Self::Conflict(_) => 4,
            Self::Other(_) => 1,
        }
    }
}

impl From<longrun::ports::PortError> for DevError {
    fn from(err: longrun::ports::PortError) -> Self {
        Self::Other(err.to_string())
    }
}

impl From<std::io::Error> for DevError {
    fn from(err: std::io::Error) -> Self {
        Self::Other(err.to_string())
    }
}
