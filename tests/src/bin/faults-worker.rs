//! The worker Lambda over the fault extension (`longrun_tests::faults`): the same `main` as
//! functions/worker, for end-to-end scenarios that need a panicking or probing handler.

use lambda_runtime::{Error, run, service_fn};
use longrun::lambda::{self, Role};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda::init_tracing();
    let function = lambda::init(longrun_tests::faults::extension(), Role::Worker).await?;
    let rt = &function.rt;
    run(service_fn(|event| lambda::worker(rt, event))).await
}
