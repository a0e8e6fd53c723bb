//! Local adapters: the pipeline on one machine with no AWS account, for `longrun dev` and
//! tests. DynamoDB stays DynamoDB (the dev stack serves the embedded dynoxide emulator and
//! talks to it through [`crate::aws::dynamodb`]); what has no local server is here:
//!
//! - [`queue`]: in-process queues with SQS semantics (visibility timeout, receive count,
//!   redelivery, dead-letter queue after `maxReceiveCount`) behind [`crate::ports::WorkQueue`]
//!   and [`crate::ports::DeliveryQueue`];
//! - [`pipeline`]: the pollers that play Lambda's event source mappings over those queues —
//!   batches of up to 10, partial batch failures — and the sweeper on a timer;
//! - [`secrets`]: per-user secrets in a `0600` JSON file behind [`crate::ports::SecretStore`];
//! - [`chat`]: a chat that records the conversation (the user's calls, intake's answers,
//!   progress and results) behind [`crate::ports::ChatApi`], for a transcript and a web page.

pub mod chat;
pub mod pipeline;
pub mod queue;
pub mod secrets;

pub use chat::{ChatEvent, ChatEventBody, LocalChat};
pub use pipeline::{LocalPipeline, PipelineOptions};
pub use queue::{LocalQueue, LocalQueues, QueueTimeouts, Received};
pub use secrets::LocalSecrets;
