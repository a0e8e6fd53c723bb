//! The floor of a Rust Lambda's cold start: a hello-world `service_fn` on the Lambda runtime
//! and nothing else (no AWS clients, no TLS, no configuration). `benches/cold_start.rs` runs it
//! beside the real binary to measure how far longrun's init is from it.

use lambda_runtime::{Error, LambdaEvent, service_fn};
use serde_json::{Value, json};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(|event: LambdaEvent<Value>| async move {
        Ok::<_, Error>(json!({ "hello": event.payload }))
    }))
    .await
}
