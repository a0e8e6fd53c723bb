//! The Lambda over the fault extension (`longrun_tests::faults`): the same one-line `main` as
//! functions/text-tools, for end-to-end scenarios that need a panicking or probing handler.

#[tokio::main]
async fn main() -> Result<(), longrun_lambda::Error> {
    longrun_lambda::run(longrun_tests::faults::extension()).await
}
