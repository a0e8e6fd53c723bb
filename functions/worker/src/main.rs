//! The worker Lambda (SQS work queue): claims each task, runs its handler under the task cap
//! with heartbeats, and ends it in a terminal state with a delivery message.

use lambda_runtime::{Error, run, service_fn};
use longrun::lambda::{self, Role};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda::init_tracing();
    let function = lambda::init(text_tools::extension(), Role::Worker).await?;
    let rt = &function.rt;
    run(service_fn(|event| lambda::worker(rt, event))).await
}
