//! The argument grammar, the failures a command can end with, and their exit codes.

use std::process::ExitCode;

use clap::{Args as ClapArgs, Parser, Subcommand};

use crate::{bootstrap, dlq, secrets, tasks};

/// Run long AI calls from chat extensions on AWS Lambda: set up, inspect and repair a deployment.
///
/// Exit codes: 0 success; 1 failure; 2 usage error; 3 not found; 4 conflict (e.g. cancel of a
/// finished task); 5 missing configuration.
#[derive(Debug, Parser)]
#[command(name = "longrun", version, propagate_version = true)]
pub struct Args {
    #[command(flatten)]
    pub aws: AwsArgs,
    /// Log what the command does (to stderr).
    #[arg(long, short, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Where AWS is: the usual profile and region, or an emulator's endpoint.
#[derive(Debug, Clone, ClapArgs)]
pub struct AwsArgs {
    /// Endpoint for every AWS service (moto, dynoxide, DynamoDB Local). Per-service endpoints
    /// come from AWS_ENDPOINT_URL_DYNAMODB, AWS_ENDPOINT_URL_SQS, … as usual.
    #[arg(long, global = true, env = "AWS_ENDPOINT_URL")]
    pub endpoint_url: Option<String>,
    /// AWS region.
    #[arg(long, global = true, env = "AWS_REGION")]
    pub region: Option<String>,
    /// Named profile from ~/.aws/config.
    #[arg(long, global = true, env = "AWS_PROFILE")]
    pub profile: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
}

/// How a command failed.
#[derive(Debug)]
pub enum Failure {
    NotFound(String),
    Conflict(String),
    Config(String),
    Other(String),
}

impl Failure {
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            Self::Other(_) => 1,
            Self::NotFound(_) => 3,
            Self::Conflict(_) => 4,
            Self::Config(_) => 5,
        })
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotFound(m) | Self::Conflict(m) | Self::Config(m) | Self::Other(m) => {
                f.write_str(m)
            }
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

impl From<std::io::Error> for Failure {
    fn from(err: std::io::Error) -> Self {
        Self::Other(err.to_string())
    }
}

/// Human logs on stderr, quiet unless `--verbose` or `RUST_LOG`.
pub fn init_logging(verbose: bool) {
    let default = if verbose { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

pub async fn run(args: Args) -> Result<(), Failure> {
    match args.command {
        Command::Bootstrap(cmd) => bootstrap::run(&args.aws, cmd).await,
        Command::Secrets(cmd) => secrets::run(&args.aws, cmd).await,
        Command::Tasks(cmd) => tasks::run(&args.aws, cmd).await,
        Command::Dlq(cmd) => dlq::run(&args.aws, cmd).await,
    }
}
