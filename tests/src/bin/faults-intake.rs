//! The intake Lambda over the fault extension (`longrun_tests::faults`): the same `main` as
//! functions/intake, for end-to-end scenarios that need a panicking or probing handler.

use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use longrun::lambda::{self, Role};
use longrun::serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda::init_tracing();
    let function = lambda::init(longrun_tests::faults::extension(), Role::Intake).await?;
    let rt = &function.rt;
    run(service_fn(|event: LambdaEvent<Value>| {
        lambda::intake(rt, event)
    }))
    .await
}
