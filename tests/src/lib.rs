//! The test harness: emulators on free loopback ports (dynoxide for DynamoDB, moto for SQS
//! and Secrets Manager) and fakes of the outside world (an OpenAI-compatible server, a chat
//! API). Every server stops when its handle is dropped, also when a test fails.

pub mod dynamo;
pub mod moto;

/// Whether a missing emulator must fail the run (`CI=true`) rather than skip the test.
pub fn emulators_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}
