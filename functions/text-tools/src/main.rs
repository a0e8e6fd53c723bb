//! The text-tools Lambda: one binary that `template.yaml` deploys as the intake, worker,
//! delivery and sweeper functions (`LONGRUN_ROLE` tells each which it is).

#[tokio::main]
async fn main() -> Result<(), longrun_lambda::Error> {
    longrun_lambda::run(text_tools::extension()).await
}
