//! Testing kit (feature `testing`): the whole pipeline in memory, for unit tests of an
//! extension's handlers.
//!
//! [`TestStack`] is what an author uses: call a function as a user would, get the ack, run the
//! queues until idle, then read the chat messages, the task record and the audit trail. It
//! runs on tokio's paused clock too (`#[tokio::test(start_paused = true)]`), so a handler
//! that sleeps or waits on a slow call costs no real time.
//!
//! [`memory`] holds the in-memory adapters it is built from, and [`MemoryStack`] the lower
//! level form (hand-pumped queues, injected failures) longrun's own tests use.

#[doc(hidden)]
pub mod fixture;
mod kit;
pub mod memory;
mod stack;

pub use kit::{Called, TestStack};
pub use stack::MemoryStack;
