//! The delivery Lambda (SQS delivery queue): posts results and progress into the user's chat,
//! one result message per task, one audit item per message.

use lambda_runtime::{Error, run, service_fn};
use longrun::lambda::{self, Role};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda::init_tracing();
    let function = lambda::init(text_tools::extension(), Role::Delivery).await?;
    let rt = &function.rt;
    run(service_fn(|event| lambda::delivery(rt, event))).await
}
