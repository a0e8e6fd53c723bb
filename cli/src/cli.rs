//! The argument grammar, the failures a command can end with, and their exit codes.

use std::process::ExitCode;

use clap::{Args as ClapArgs, Parser, Subcommand};

use crate::{bootstrap, call, dev, dlq, new, secrets, tasks, usage};

/// Run long AI calls from chat extensions on AWS Lambda: run the whole pipeline locally, call
/// functions, set up, inspect and repair a deployment.
///
/// Start here: `longrun new my-ext` makes a project of your own; in it, `longrun dev
/// --simulate-model` runs the pipeline on this machine (no AWS account, no Docker, no keys)
/// with a chat page at http://127.0.0.1:8787, and `longrun call FUNCTION --params '{…}'`
/// calls it from another terminal. The operator commands need no extension.
///
/// Where commands act: on AWS by default — the usual AWS_PROFILE and AWS_REGION, or
/// --profile and --region, or an emulator through --endpoint-url. With --local they act on the
/// dev stack that `longrun dev` runs for the state folder (--state-dir, default .longrun):
/// its DynamoDB (dynoxide), its queues and its secrets file. `secrets --local` needs no running
/// stack; `tasks`, `dlq` and `bootstrap --local` do. `longrun call` talks to the dev stack
/// unless --function-name names a deployed intake function.
///
/// Exit codes: 0 success (for `call`: an ok result); 1 failure (for `call`: an error result);
/// 2 usage error; 3 not found; 4 conflict (e.g. cancel of a finished task); 5 missing
/// configuration (e.g. no dev stack running for --local).
#[derive(Debug, Parser)]
#[command(name = "longrun", version, propagate_version = true)]
pub struct Args {
    /// Where commands act: AWS, an emulator or the local dev stack.
    #[command(flatten)]
    pub aws: AwsArgs,
    /// Log what the command does (to stderr).
    #[arg(long, short, global = true)]
    pub verbose: bool,
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Where AWS is: the usual profile and region, or an emulator's endpoint.
#[derive(Debug, Clone, ClapArgs)]
pub struct AwsArgs {
    /// Endpoint for every AWS service (moto, dynoxide, DynamoDB Local); it overrides all of
    /// the environment's. Without it the SDK reads AWS_ENDPOINT_URL and the per-service
    /// AWS_ENDPOINT_URL_DYNAMODB, AWS_ENDPOINT_URL_SQS, … as usual (per-service first).
    #[arg(long, global = true)]
    pub endpoint_url: Option<String>,
    /// AWS region.
    #[arg(long, global = true, env = "AWS_REGION")]
    pub region: Option<String>,
    /// Named profile from ~/.aws/config.
    #[arg(long, global = true, env = "AWS_PROFILE")]
    pub profile: Option<String>,
    /// Act on the local dev stack (`longrun dev`) instead of AWS: its DynamoDB endpoint, its
    /// in-process queues and its secrets file. Overrides --endpoint-url, --region and --profile.
    #[arg(long, global = true)]
    pub local: bool,
    /// The dev stack's state folder: DynamoDB data, secrets, and the address of the running
    /// stack.
    #[arg(
        long,
        global = true,
        env = "LONGRUN_STATE_DIR",
        default_value = ".longrun"
    )]
    pub state_dir: std::path::PathBuf,
}

/// The commands of `longrun`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the project's extension on this machine: its dev binary (`cargo run --release --bin
    /// dev`) serves the whole pipeline — DynamoDB (embedded dynoxide), queues with SQS
    /// semantics, the intake, worker, delivery and sweeper logic the Lambdas run, local secrets,
    /// and a chat page — plays each function's example once, then serves until Ctrl-C.
    Dev(dev::DevArgs),
    /// Make a new extension project of your own (outside this repository): the extension, its
    /// Lambda `main`, a dev entry point, tests, template.yaml, samconfig.toml and events/.
    New(new::NewArgs),
    /// Call a function of the extension as a chat would: print the ack, follow the background
    /// task with a progress bar, print the result. Exit 0 on an ok result, 1 on an error.
    Call(call::CallArgs),
    /// Create the task table and the queues (as template.yaml defines them), idempotently,
    /// and print the configuration as KEY=value lines, ready for `export`.
    Bootstrap(bootstrap::BootstrapArgs),
    /// Set or delete a user's secret for an extension (the value is read from stdin).
    #[command(subcommand)]
    Secrets(secrets::SecretsCommand),
    /// List, show, cancel and retry tasks.
    #[command(subcommand)]
    Tasks(tasks::TasksCommand),
    /// Inspect and redrive the dead-letter queues.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Show or reset a user's use of the extension's daily budgets.
    #[command(subcommand)]
    Usage(usage::UsageCommand),
}

/// How a command failed.
#[derive(Debug)]
pub enum Failure {
    /// The arguments or input are invalid (exit code 2).
    Usage(String),
    /// What the command names does not exist (exit code 3).
    NotFound(String),
    /// The request conflicts with the current state, e.g. a cancel of a finished task (exit
    /// code 4).
    Conflict(String),
    /// Configuration is missing, e.g. no dev stack running for `--local` (exit code 5).
    Config(String),
    /// Any other failure (exit code 1).
    Other(String),
    /// A child process's own exit code, passed on.
    Exit(i32),
}

impl Failure {
    /// The process exit code for this failure: 1 to 5 by kind, or a child's own code (1 if
    /// it does not fit in a `u8`).
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            Self::Other(_) => 1,
            Self::Usage(_) => 2,
            Self::NotFound(_) => 3,
            Self::Conflict(_) => 4,
            Self::Config(_) => 5,
            Self::Exit(code) => u8::try_from(*code).unwrap_or(1),
        })
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Usage(m)
            | Self::NotFound(m)
            | Self::Conflict(m)
            | Self::Config(m)
            | Self::Other(m) => f.write_str(m),
            Self::Exit(code) => write!(f, "exited with {code}"),
        }
    }
}

impl From<longrun::ports::PortError> for Failure {
    fn from(err: longrun::ports::PortError) -> Self {
        match err {
            longrun::ports::PortError::NotFound(m) => Self::NotFound(m),
            longrun::ports::PortError::Conflict(m) => Self::Conflict(m),
            other => Self::Other(other.to_string()),
        }
    }
}

impl From<longrun::EnqueueError> for Failure {
    fn from(err: longrun::EnqueueError) -> Self {
        match err {
            longrun::EnqueueError::Port(err) => err.into(),
            // The user's limit: a state of things, like a conflict.
            other => Self::Conflict(other.to_string()),
        }
    }
}

impl From<longrun::config::ConfigError> for Failure {
    fn from(err: longrun::config::ConfigError) -> Self {
        Self::Config(format!(
            "{err} (run `longrun bootstrap` and export what it prints)"
        ))
    }
}

impl From<longrun::wire::IntakeError> for Failure {
    fn from(err: longrun::wire::IntakeError) -> Self {
        match err.status {
            404 => Self::NotFound(err.message),
            409 => Self::Conflict(err.message),
            _ => Self::Other(err.message),
        }
    }
}

impl From<longrun_dev::DevError> for Failure {
    fn from(err: longrun_dev::DevError) -> Self {
        match err {
            longrun_dev::DevError::Config(m) => Self::Config(m),
            longrun_dev::DevError::Conflict(m) => Self::Conflict(m),
            other => Self::Other(other.to_string()),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(err: std::io::Error) -> Self {
        Self::Other(err.to_string())
    }
}

/// Human logs on stderr, quiet unless `--verbose` or `RUST_LOG`. Under `longrun dev` the
/// transcript is the output: only errors are logged by default (the emulator logs every
/// refused conditional write, which the pipeline expects, as a warning).
pub fn init_logging(args: &Args) {
    let default = match (args.verbose, &args.command) {
        (true, _) => "info",
        (false, Command::Dev(_) | Command::New(_)) => "error",
        (false, _) => "warn,dynoxide=error",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Runs the command `args` names.
pub async fn run(args: Args) -> Result<(), Failure> {
    match args.command {
        Command::Dev(cmd) => dev::run(&args.aws, cmd).await,
        Command::New(cmd) => new::run(cmd),
        Command::Call(cmd) => call::run(&args.aws, cmd).await,
        Command::Bootstrap(cmd) => bootstrap::run(&args.aws, cmd).await,
        Command::Secrets(cmd) => secrets::run(&args.aws, cmd).await,
        Command::Tasks(cmd) => tasks::run(&args.aws, cmd).await,
        Command::Dlq(cmd) => dlq::run(&args.aws, cmd).await,
        Command::Usage(cmd) => usage::run(&args.aws, cmd).await,
    }
}
