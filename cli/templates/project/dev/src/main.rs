//! __NAME__ on longrun's local stack: the whole pipeline and a chat page on this machine.
//! `cargo run --release --bin dev -- --simulate-model` (`-- --help` for the rest).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    longrun_dev::main(__CRATE__::extension_at).await
}
