//! text-tools on longrun's local stack: the whole pipeline and the chat page on this machine.
//! `cargo run --release --bin dev -- --simulate-model` (`--help` for the rest).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    longrun_dev::main(text_tools::extension_at).await
}
