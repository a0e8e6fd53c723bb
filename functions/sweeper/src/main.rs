//! The sweeper Lambda (every minute): revives tasks whose worker died, ends those that cannot
//! finish, and ends the tasks of dead-lettered work messages.

use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use longrun::lambda::{self, Role};
use longrun::serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda::init_tracing();
    let function = lambda::init(text_tools::extension(), Role::Sweeper).await?;
    let function = &function;
    run(service_fn(|event: LambdaEvent<Value>| {
        lambda::sweeper(function, event)
    }))
    .await
}
