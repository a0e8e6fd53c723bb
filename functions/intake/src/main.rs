//! The intake Lambda (direct Invoke): answers `call`, `status`, `cancel` and `list` for the
//! extension at once; background work goes to the work queue.

use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use longrun::lambda::{self, Role};
use longrun::serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda::init_tracing();
    let function = lambda::init(text_tools::extension(), Role::Intake).await?;
    let rt = &function.rt;
    run(service_fn(|event: LambdaEvent<Value>| {
        lambda::intake(rt, event)
    }))
    .await
}
