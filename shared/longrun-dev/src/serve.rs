//! The dev command line: what an extension's dev binary runs (`longrun_dev::main`), and what
//! [`DevBuilder::serve`] does — start the stack, print where everything is, play the demo,
//! serve until Ctrl-C.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use longrun::Settings;
use longrun::ports::SecretStore;

use crate::pipeline::PipelineOptions;
use crate::queue::QueueTimeouts;
use crate::secrets::LocalSecrets;
use crate::simulator::Latency;
use crate::stack::{DevOptions, DevStack, MakeExtension, Model, QUEUE_PREFIX};
use crate::transcript::Transcript;
use crate::{DevError, demo, events, state};

/// Run the extension's whole pipeline on this machine: DynamoDB (embedded dynoxide,
/// file-backed under the state folder), queues with SQS semantics, the intake, worker,
/// delivery and sweeper logic the Lambdas run, local secrets, and a chat — printed as a
/// transcript and served as a web page. Plays each function's example once, then serves until
/// Ctrl-C.
#[derive(Debug, Clone, Parser)]
#[command(version)]
pub struct DevArgs {
    /// Port of the chat page, its API and the local SQS API (0: any free port).
    #[arg(long, default_value_t = 8787)]
    pub port: u16,
    /// Port of the DynamoDB endpoint (dynoxide) [default: the chat port + 1; 0 with --port 0].
    #[arg(long)]
    pub dynamodb_port: Option<u16>,
    /// Answer with the offline model simulator (an OpenAI-compatible server, clearly labelled,
    /// 2–8 s per answer) and give the demo user a placeholder for every secret the extension
    /// declares: the demo runs end to end with no keys and no network.
    #[arg(long)]
    pub simulate_model: bool,
    /// The simulator's answer time in milliseconds: MIN..MAX, or one number.
    #[arg(long, default_value = "2000..8000", value_name = "MIN..MAX")]
    pub simulate_latency_ms: Latency,
    /// Give the extension this OpenAI-compatible base URL instead of its own configuration.
    #[arg(long, conflicts_with = "simulate_model", value_name = "URL")]
    pub model_url: Option<String>,
    /// Run the demo (each function with its example params), then exit once its results are
    /// delivered (exit 1 if they are not).
    #[arg(long, conflicts_with = "no_demo")]
    pub demo_only: bool,
    /// Skip the demo.
    #[arg(long)]
    pub no_demo: bool,
    /// The demo's user, and the page's default.
    #[arg(long, default_value = "dev-user")]
    pub user: String,
    /// The demo's chat, and the page's default.
    #[arg(long, default_value = "dev-chat")]
    pub chat: String,
    /// The state folder: DynamoDB data, secrets, and the address of the running stack.
    #[arg(long, env = "LONGRUN_STATE_DIR", default_value = ".longrun")]
    pub state_dir: PathBuf,
    /// Print the extension's LLM tool manifest (JSON) and exit.
    #[arg(long, conflicts_with_all = ["demo_only", "no_demo", "write_events"])]
    pub manifest: bool,
    /// Write a sample event per function (from its example params) and per queue into DIR, for
    /// `sam local invoke -e` and `cargo lambda invoke --data-file`, and exit.
    #[arg(long, value_name = "DIR")]
    pub write_events: Option<PathBuf>,
    /// Log what the stack does (to stderr).
    #[arg(long, short)]
    pub verbose: bool,
}

/// A stack to start: the extension, and the options [`DevArgs`] or the builder's setters give.
pub struct DevBuilder {
    make: MakeExtension,
    options: DevOptions,
}

impl DevBuilder {
    pub(crate) fn new(make: MakeExtension) -> Self {
        Self {
            make,
            options: DevOptions::new(".longrun"),
        }
    }

    /// Every option at once.
    pub fn options(mut self, options: DevOptions) -> Self {
        self.options = options;
        self
    }

    /// The state folder (default `.longrun`).
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.options.state_dir = dir.into();
        self
    }

    /// The chat page's port (default: any free port).
    pub fn port(mut self, port: u16) -> Self {
        self.options.port = port;
        self
    }

    /// The model endpoint the extension is given.
    pub fn model(mut self, model: Model) -> Self {
        self.options.model = model;
        self
    }

    /// The pipeline's timing settings.
    pub fn settings(mut self, settings: Settings) -> Self {
        self.options.settings = settings;
        self
    }

    /// The demo's and the page's default user and chat.
    pub fn user(mut self, user: impl Into<String>, chat: impl Into<String>) -> Self {
        self.options.user = user.into();
        self.options.chat = chat.into();
        self
    }

    /// Starts the stack and returns it (tests, or a program of the author's own).
    pub async fn start(self) -> Result<DevStack, DevError> {
        DevStack::start(self.make, self.options).await
    }

    /// Starts the stack, prints where everything is, plays the demo unless `no_demo`, and
    /// serves until Ctrl-C (or, with `demo_only`, until the demo's results are delivered).
    pub async fn serve(self, demo_only: bool, no_demo: bool) -> Result<(), DevError> {
        let (user, chat, state_dir) = (
            self.options.user.clone(),
            self.options.chat.clone(),
            self.options.state_dir.clone(),
        );
        let stack = self.start().await?;
        print_banner(&stack, &user, &state_dir).await;
        let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        let transcript = Transcript::spawn(Arc::clone(stack.chat()), stack.stopped(), color);

        let mut outcome = Ok(());
        let mut interrupted = false;
        if !no_demo {
            tokio::select! {
                report = demo::run(&stack, Some(&transcript), &user, &chat) => {
                    if demo_only && !report.complete {
                        outcome = Err(DevError::Other("the demo's background results were not all delivered in time".into()));
                    }
                }
                _ = shutdown_signal() => interrupted = true,
            }
        }
        if !demo_only && !interrupted {
            println!(
                "\nServing {} — open it in a browser, or call from another terminal. Ctrl-C stops.\n",
                stack.url()
            );
            shutdown_signal().await;
        }
        println!("\nstopping…");
        stack.shutdown().await;
        transcript.finish().await;
        outcome
    }
}

/// The whole dev command line for an extension: parses [`DevArgs`] from the process's
/// arguments, then serves (or prints the manifest, or writes the sample events). An
/// extension's dev binary is this one call:
///
/// ```no_run
/// # fn my_extension(_model_url: Option<&str>) -> longrun::Extension { longrun::Extension::new("my-ext") }
/// #[tokio::main]
/// async fn main() -> std::process::ExitCode {
///     longrun_dev::main(my_extension).await
/// }
/// ```
pub async fn main(
    make: impl FnOnce(Option<&str>) -> longrun::Extension + Send + 'static,
) -> ExitCode {
    let args = DevArgs::parse();
    init_logging(args.verbose);
    match run(Box::new(make), args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("dev: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}

/// Human logs on stderr. The transcript is the output: only errors are logged unless
/// `--verbose` or `RUST_LOG` (the emulator logs every refused conditional write, which the
/// pipeline expects, as a warning).
fn init_logging(verbose: bool) {
    let default = if verbose { "info" } else { "error" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Runs the dev command line with parsed `args`.
pub async fn run(make: MakeExtension, args: DevArgs) -> Result<(), DevError> {
    if args.manifest || args.write_events.is_some() {
        let extension = make(None)
            .validated()
            .map_err(|e| DevError::Config(format!("the extension is not valid: {e}")))?;
        if let Some(dir) = &args.write_events {
            for path in events::write(&extension, dir)? {
                println!("{}", path.display());
            }
        } else {
            let manifest = serde_json::to_string_pretty(&extension.tool_manifest())
                .map_err(|e| DevError::Other(e.to_string()))?;
            println!("{manifest}");
        }
        return Ok(());
    }
    let settings = Settings::from_env().map_err(|e| DevError::Config(e.to_string()))?;
    // The sweeper revives lapsed leases; locally it need not wait the deployed minute.
    let pipeline = PipelineOptions {
        sweep_every: (settings.lease / 2)
            .clamp(Duration::from_millis(200), Duration::from_secs(30)),
        ..PipelineOptions::default()
    };
    let options = DevOptions {
        state_dir: args.state_dir.clone(),
        port: args.port,
        dynamodb_port: args.dynamodb_port.unwrap_or(if args.port == 0 {
            0
        } else {
            args.port.saturating_add(1)
        }),
        settings,
        model: match (&args.model_url, args.simulate_model) {
            (Some(url), _) => Model::At(url.clone()),
            (None, true) => Model::Simulated(args.simulate_latency_ms),
            (None, false) => Model::FromEnv,
        },
        user: args.user.clone(),
        chat: args.chat.clone(),
        queue_timeouts: QueueTimeouts::default(),
        pipeline,
    };
    DevBuilder { make, options }
        .serve(args.demo_only, args.no_demo)
        .await
}

/// Ctrl-C, or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn print_banner(stack: &DevStack, user: &str, state_dir: &Path) {
    let e = stack.endpoints();
    let ext = stack.extension();
    let name = ext.name();
    let state_flag = if state_dir == Path::new(".longrun") {
        String::new()
    } else {
        format!(" --state-dir {}", state_dir.display())
    };
    println!("longrun dev — the whole pipeline on this machine (no AWS account, no Docker)\n");
    println!("  chat page   {}", e.chat_url);
    println!(
        "  extension   {name}: {}",
        ext.functions()
            .map(|f| f.name().to_owned())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("  model       {}", stack.page().model);
    println!(
        "  DynamoDB    {}  (dynoxide, data in {}, table {})",
        e.dynamodb_endpoint,
        state_dir.join(state::DATABASE_FILE).display(),
        e.table
    );
    println!(
        "  queues      in-process with SQS semantics: {QUEUE_PREFIX}-work, {QUEUE_PREFIX}-delivery, their -dlq (maxReceiveCount {}); SQS API {}",
        longrun_aws::sqs::MAX_RECEIVE_COUNT,
        e.sqs_endpoint
    );
    println!("  secrets     {} (0600)", e.secrets_file.display());
    if !stack.page().simulated_model {
        let file = LocalSecrets::new(&e.secrets_file);
        for secret in ext.secrets() {
            let missing = file
                .get(name, user, &secret.name)
                .await
                .ok()
                .flatten()
                .is_none();
            if missing {
                println!(
                    "\n  {user} has no {} yet, so the extension answers \"{} not connected\".\n  Connect one:\n    printf %s \"$VALUE\" | longrun{state_flag} --local secrets set --ext {name} --user {user} {}\n  or restart with --simulate-model for an offline, clearly labelled simulation.",
                    secret.name, secret.description, secret.name
                );
            }
        }
    }
    println!("\n  try, from another terminal:");
    if let Some(function) = ext
        .functions()
        .find(|f| f.is_background() && f.example_params().is_some())
        .or_else(|| ext.functions().find(|f| f.example_params().is_some()))
    {
        let params = function
            .example_params()
            .map(|p| p.to_string())
            .unwrap_or_default();
        println!(
            "    longrun{state_flag} call {} --params '{params}'",
            function.name()
        );
    }
    println!("    longrun{state_flag} --local tasks list --ext {name} --user {user}");
    println!(
        "    AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local aws dynamodb scan --region {} --endpoint-url {} --table-name {}",
        e.region, e.dynamodb_endpoint, e.table
    );
}
