//! `longrun`: the command line for developers and operators. Every command works the same
//! against real AWS (`--profile`, `--region`), an emulator (`--endpoint-url`) and the local
//! dev stack (`--local`, started by `longrun dev`).

use clap::Parser;
use longrun_cli::cli;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = cli::Args::parse();
    cli::init_logging(&args);
    match cli::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(cli::Failure::Exit(code)) => {
            std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Err(failure) => {
            eprintln!("longrun: {failure}");
            failure.exit_code()
        }
    }
}
