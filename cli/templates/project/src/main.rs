//! The Lambda: one binary for the intake, worker, delivery and sweeper functions.

#[tokio::main]
async fn main() -> Result<(), longrun_lambda::Error> {
    longrun_lambda::run(__CRATE__::extension()).await
}
