//! `longrun`: the command line for developers and operators. Every command works the same
//! against real AWS (`--profile`, `--region`) and an emulator (`--endpoint-url`).

mod aws;
mod bootstrap;
mod cli;
mod dlq;
mod secrets;
mod tasks;

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = cli::Args::parse();
    cli::init_logging(args.verbose);
    match cli::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("longrun: {failure}");
            failure.exit_code()
        }
    }
}
