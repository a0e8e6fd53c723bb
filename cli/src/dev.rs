//! `longrun dev`: runs the current project's dev binary — `cargo run --release --bin dev --
//! ARGS` — which is `longrun_dev::main(my_extension)`: the extension's whole pipeline and the
//! chat page on this machine. The CLI itself links no extension; the project does.

use std::ffi::OsString;

use clap::Args;

use crate::cli::{AwsArgs, Failure};

/// `longrun dev [ARGS…]`.
#[derive(Debug, Args)]
#[command(
    disable_help_flag = true,
    after_help = "Everything after `dev` goes to the project's dev binary: `longrun dev --help` prints its options (--simulate-model, --demo-only, --port, --manifest, --write-events, …)."
)]
pub struct DevArgs {
    /// Build with the dev profile instead of release (faster to build, slower to run).
    #[arg(long)]
    pub debug: bool,
    /// The arguments of the dev binary, e.g. `--simulate-model --demo-only`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub args: Vec<OsString>,
}

/// Runs `cargo run [--release] --bin dev -- [--state-dir DIR] ARGS` at the root of the
/// workspace the current folder belongs to, and exits as it exits. The state folder stays
/// where it would be for this folder.
pub async fn run(aws: &AwsArgs, args: DevArgs) -> Result<(), Failure> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = workspace_root(&cargo).await?;
    let state_dir = std::path::absolute(&aws.state_dir)?;
    let mut command = tokio::process::Command::new(cargo);
    command.current_dir(root).args(["run", "--quiet"]);
    if !args.debug {
        command.arg("--release");
    }
    command.args(["--bin", "dev", "--"]);
    let asks_help = args.args.iter().any(|a| a == "--help" || a == "-h");
    if !asks_help {
        command.arg("--state-dir").arg(&state_dir);
    }
    command.args(&args.args);
    let status = command.status().await.map_err(|e| {
        Failure::Config(format!(
            "cannot run cargo ({e}); `longrun dev` runs the dev binary of the project in this folder"
        ))
    })?;
    match status.code() {
        Some(0) => Ok(()),
        Some(101) => Err(Failure::Config(
            "this folder has no `dev` binary to run (a project made by `longrun new` has one; in the longrun repository it is functions/dev)".into(),
        )),
        code => Err(Failure::Exit(code.unwrap_or(1))),
    }
}

/// The folder of the workspace root manifest (`cargo locate-project --workspace`).
async fn workspace_root(cargo: &std::ffi::OsStr) -> Result<std::path::PathBuf, Failure> {
    let output = tokio::process::Command::new(cargo)
        .args(["locate-project", "--workspace", "--message-format", "plain"])
        .output()
        .await
        .map_err(|e| Failure::Config(format!("cannot run cargo ({e})")))?;
    if !output.status.success() {
        return Err(Failure::Config(
            "`longrun dev` runs in a Cargo project: this folder is in none (make one with `longrun new`)".into(),
        ));
    }
    let manifest = std::path::PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    Ok(manifest
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or(manifest))
}
