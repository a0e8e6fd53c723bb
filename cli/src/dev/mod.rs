//! `longrun dev`: the whole pipeline in one process on this machine, with no AWS account and no
//! Docker.
//!
//! - DynamoDB: the embedded dynoxide emulator, file-backed under the state folder and served
//!   on loopback, used through the same adapter the Lambdas use (`aws dynamodb scan
//!   --endpoint-url …` works on it);
//! - queues: in-process, with SQS semantics ([`longrun::local::queue`]), fed to the same
//!   worker and delivery steps by pollers that play the event source mappings, and reachable
//!   through an SQS API for the `--local` operator commands;
//! - the sweeper on a timer; per-user secrets in a `0600` file;
//! - the chat: a terminal transcript and a web page ([`web`]), live over server-sent events.
//!
//! [`DevStack`] is the running stack (tests start it in-process); [`run`] is the command.

pub mod demo;
pub mod simulator;
pub mod sqs_api;
pub mod state;
pub mod transcript;
pub mod web;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use clap::Args;
use longrun::aws::dynamodb::{DynamoKv, DynamoTaskStore, ensure_table};
use longrun::local::queue::LOCAL_REGION;
use longrun::local::{
    LocalChat, LocalPipeline, LocalQueues, LocalSecrets, PipelineOptions, QueueTimeouts,
};
use longrun::ports::{PortResult, Secret, SecretStore, SystemClock};
use longrun::wire::IntakeResponse;
use longrun::{Runtime, Services, Settings};
use serde_json::Value;
use text_tools::OpenAi;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cli::{AwsArgs, Failure};
use simulator::{Latency, Simulator};
use state::{DevEndpoints, create_state_dir, dynamodb_client, local_sdk_config, secrets_file};
use transcript::Transcript;
use web::{AppState, PageConfig};

/// The dev stack's table: `longrun bootstrap`'s default name.
pub const TABLE: &str = "longrun-tasks";
/// The dev stack's queue name prefix: `longrun bootstrap`'s default.
pub const QUEUE_PREFIX: &str = "longrun";
/// How long finished tasks are kept.
const TASK_TTL: Duration = Duration::from_secs(30 * 86_400);
/// How long shutdown waits for a server to finish its requests.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Port of the chat page, its API and the local SQS API (0: any free port).
    #[arg(long, default_value_t = 8787)]
    pub port: u16,
    /// Port of the DynamoDB endpoint (dynoxide) [default: the chat port + 1; 0 with --port 0].
    #[arg(long)]
    pub dynamodb_port: Option<u16>,
    /// Answer with the offline model simulator (clearly labelled, 2–8 s per answer) instead of
    /// OPENAI_BASE_URL, and give the demo user a placeholder key: the demo runs end to end with
    /// no keys and no network.
    #[arg(long)]
    pub simulate_model: bool,
    /// The simulator's answer time in milliseconds: MIN..MAX, or one number.
    #[arg(long, default_value = "2000..8000", value_name = "MIN..MAX")]
    pub simulate_latency_ms: Latency,
    /// Run the seed demo, then exit once its results are delivered (exit 1 if they are not).
    #[arg(long, conflicts_with = "no_demo")]
    pub demo_only: bool,
    /// Skip the seed demo.
    #[arg(long)]
    pub no_demo: bool,
    /// The demo's user, and the page's default.
    #[arg(long, default_value = "dev-user")]
    pub user: String,
    /// The demo's chat, and the page's default.
    #[arg(long, default_value = "dev-chat")]
    pub chat: String,
}

/// Which model the extension calls.
#[derive(Debug, Clone)]
pub enum Model {
    /// `OPENAI_BASE_URL`, `OPENAI_MODEL`, `OPENAI_FAST_MODEL` (default: OpenAI), with each
    /// user's `openai_api_key` secret.
    FromEnv,
    /// The offline simulator; the demo user gets a placeholder key.
    Simulated(Latency),
    /// This endpoint (tests: a fake OpenAI server).
    At(OpenAi),
}

/// How to run a dev stack.
#[derive(Debug, Clone)]
pub struct DevOptions {
    pub state_dir: PathBuf,
    /// The chat page's port (0: any).
    pub port: u16,
    /// DynamoDB's port (0: any).
    pub dynamodb_port: u16,
    pub settings: Settings,
    pub model: Model,
    /// The demo's and the page's default user and chat.
    pub user: String,
    pub chat: String,
    pub queue_timeouts: QueueTimeouts,
    pub pipeline: PipelineOptions,
}

impl DevOptions {
    /// The defaults of `longrun dev` for `state_dir`, on any free ports.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            port: 0,
            dynamodb_port: 0,
            settings: Settings::default(),
            model: Model::FromEnv,
            user: "dev-user".to_owned(),
            chat: "dev-chat".to_owned(),
            queue_timeouts: QueueTimeouts::default(),
            pipeline: PipelineOptions::default(),
        }
    }
}

/// The running stack. Dropping it stops everything; [`DevStack::shutdown`] does so in order.
pub struct DevStack {
    endpoints: DevEndpoints,
    state_dir: PathBuf,
    rt: Runtime,
    chat: Arc<LocalChat>,
    queues: LocalQueues,
    page: PageConfig,
    stop: watch::Sender<bool>,
    pipeline: Option<LocalPipeline>,
    web: Option<JoinHandle<()>>,
    dynamodb: Option<JoinHandle<()>>,
    _simulator: Option<Simulator>,
}

/// The local secrets, plus a placeholder key for the demo user when the model is simulated.
struct WithPlaceholderKey {
    file: LocalSecrets,
    ext: String,
    user: String,
}

#[async_trait]
impl SecretStore for WithPlaceholderKey {
    async fn get(&self, ext: &str, user: &str, name: &str) -> PortResult<Option<Secret>> {
        let stored = self.file.get(ext, user, name).await?;
        if stored.is_none()
            && ext == self.ext
            && user == self.user
            && name == text_tools::API_KEY_SECRET
        {
            return Ok(Some(Secret::new("sk-simulated-placeholder")));
        }
        Ok(stored)
    }
}

async fn bind(port: u16, what: &str, flag: &str) -> Result<tokio::net::TcpListener, Failure> {
    tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => Failure::Config(format!(
                "port {port} for {what} is in use (another `longrun dev`?); choose another with {flag}"
            )),
            _ => Failure::Other(format!("cannot listen on 127.0.0.1:{port} for {what}: {e}")),
        })
}

fn address(listener: &tokio::net::TcpListener) -> Result<String, Failure> {
    listener
        .local_addr()
        .map(|a| format!("http://{a}"))
        .map_err(|e| Failure::Other(e.to_string()))
}

impl DevStack {
    /// Starts DynamoDB, the queues, the pipeline and the web server, and writes `dev.json`.
    pub async fn start(options: DevOptions) -> Result<Self, Failure> {
        let state_dir = options.state_dir.clone();
        create_state_dir(&state_dir)?;
        if let Ok(Some(running)) = DevEndpoints::read(&state_dir)
            && state::is_alive(&running.chat_url).await
        {
            return Err(Failure::Conflict(format!(
                "a dev stack already runs for {} at {} (pid {}); stop it first, or use another --state-dir",
                state_dir.display(),
                running.chat_url,
                running.pid
            )));
        }
        let (stop, stopped) = watch::channel(false);

        // DynamoDB: dynoxide on a file, served on loopback until the stack stops.
        let db_path = state_dir.join(state::DATABASE_FILE);
        let db = db_path
            .to_str()
            .ok_or_else(|| Failure::Config(format!("{} is not valid UTF-8", db_path.display())))
            .and_then(|path| {
                dynoxide::Database::new(path)
                    .map_err(|e| Failure::Other(format!("cannot open {}: {e}", db_path.display())))
            })?;
        let listener = bind(options.dynamodb_port, "DynamoDB", "--dynamodb-port").await?;
        let dynamodb_endpoint = address(&listener)?;
        let mut db_stop = stopped.clone();
        let dynamodb = tokio::spawn(async move {
            let served = dynoxide::server::serve_with_shutdown(listener, db, async move {
                let _ = db_stop.wait_for(|stopped| *stopped).await;
            })
            .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "dynoxide stopped with an error");
            }
        });
        let sdk = local_sdk_config(LOCAL_REGION).await;
        let dynamo = dynamodb_client(&sdk, &dynamodb_endpoint);
        ensure_table(&dynamo, TABLE).await?;

        // The model.
        let files = LocalSecrets::new(secrets_file(&state_dir));
        let (openai, simulator) = match &options.model {
            Model::FromEnv => (OpenAi::from_env(), None),
            Model::At(openai) => (openai.clone(), None),
            Model::Simulated(latency) => {
                let simulator = Simulator::start(*latency)
                    .await
                    .map_err(|e| Failure::Other(format!("model simulator: {e}")))?;
                let mut openai = OpenAi::new(&simulator.base_url);
                openai.model = simulator::MODEL.to_owned();
                openai.fast_model = format!("{}-fast", simulator::MODEL);
                (openai, Some(simulator))
            }
        };
        let extension = text_tools::extension_with(openai.clone())
            .validated()
            .map_err(|e| Failure::Other(e.to_string()))?;
        let secrets: Arc<dyn SecretStore> = if simulator.is_some() {
            Arc::new(WithPlaceholderKey {
                file: files,
                ext: extension.name().to_owned(),
                user: options.user.clone(),
            })
        } else {
            Arc::new(files)
        };
        let model = match &simulator {
            Some(sim) => format!(
                "SIMULATED offline model at {} — every answer says so; {} has a placeholder key",
                sim.base_url, options.user
            ),
            None => format!(
                "{} (OPENAI_BASE_URL), model {}; key: each user's {} secret",
                openai.base_url,
                openai.model,
                text_tools::API_KEY_SECRET
            ),
        };

        // The pipeline.
        let queues = LocalQueues::new(QUEUE_PREFIX, options.queue_timeouts);
        let chat = Arc::new(LocalChat::new());
        let services = Services {
            tasks: Arc::new(DynamoTaskStore::new(dynamo.clone(), TABLE, TASK_TTL)),
            kv: Arc::new(DynamoKv::new(dynamo, TABLE)),
            work: queues.work.clone(),
            delivery: queues.delivery.clone(),
            secrets,
            chat: chat.clone(),
            clock: Arc::new(SystemClock),
            http: reqwest::Client::new(),
        };
        let rt = Runtime::new(extension, services, options.settings.clone());

        // The web server: page, API, SQS API.
        let listener = bind(options.port, "the chat page", "--port").await?;
        let chat_url = address(&listener)?;
        let sqs_endpoint = format!("{chat_url}/sqs");
        let sqs = sqs_api::SqsApi::new(queues.clone(), sqs_endpoint.clone(), stopped.clone());
        let page = PageConfig {
            ext: rt.extension.name().to_owned(),
            user: options.user.clone(),
            chat: options.chat.clone(),
            model,
            simulated_model: simulator.is_some(),
        };
        let app = web::router(AppState {
            rt: rt.clone(),
            chat: chat.clone(),
            sqs: sqs.clone(),
            page: page.clone(),
            stop: stopped.clone(),
        });
        let mut web_stop = stopped.clone();
        let web = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = web_stop.wait_for(|stopped| *stopped).await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "web server stopped with an error");
            }
        });

        let pipeline = LocalPipeline::start(rt.clone(), queues.clone(), options.pipeline.clone());
        let endpoints = DevEndpoints {
            pid: std::process::id(),
            started_at: chrono::Utc::now(),
            chat_url,
            dynamodb_endpoint,
            sqs_endpoint,
            region: LOCAL_REGION.to_owned(),
            ext: rt.extension.name().to_owned(),
            table: TABLE.to_owned(),
            work_queue_url: sqs.url(&queues.work),
            work_dlq_url: sqs.url(&queues.work_dlq),
            delivery_queue_url: sqs.url(&queues.delivery),
            delivery_dlq_url: sqs.url(&queues.delivery_dlq),
            secrets_file: secrets_file(&state_dir),
        };
        endpoints.write(&state_dir)?;
        Ok(Self {
            endpoints,
            state_dir,
            rt,
            chat,
            queues,
            page,
            stop,
            pipeline: Some(pipeline),
            web: Some(web),
            dynamodb: Some(dynamodb),
            _simulator: simulator,
        })
    }

    /// Where the stack listens.
    pub fn endpoints(&self) -> &DevEndpoints {
        &self.endpoints
    }

    /// The chat page, e.g. `http://127.0.0.1:8787`.
    pub fn url(&self) -> &str {
        &self.endpoints.chat_url
    }

    /// The runtime the pipeline runs with.
    pub fn runtime(&self) -> &Runtime {
        &self.rt
    }

    /// The conversation.
    pub fn chat(&self) -> &Arc<LocalChat> {
        &self.chat
    }

    /// The queues.
    pub fn queues(&self) -> &LocalQueues {
        &self.queues
    }

    /// What the page starts with (model description included).
    pub fn page(&self) -> &PageConfig {
        &self.page
    }

    /// Turns true when the stack stops.
    pub fn stopped(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Calls intake as the chat page does (a call is recorded in the conversation).
    pub async fn call(&self, event: Value) -> IntakeResponse {
        self.chat.intake(&self.rt, event).await
    }

    /// Stops the pipeline (in-flight tasks resume at the next start, once their leases lapse),
    /// then the servers, and removes `dev.json`.
    pub async fn shutdown(mut self) {
        if let Some(pipeline) = self.pipeline.take() {
            pipeline.shutdown().await;
        }
        let _ = self.stop.send(true);
        for handle in [self.web.take(), self.dynamodb.take()]
            .into_iter()
            .flatten()
        {
            let abort = handle.abort_handle();
            if tokio::time::timeout(STOP_GRACE, handle).await.is_err() {
                abort.abort();
            }
        }
        self.endpoints.remove(&self.state_dir);
    }
}

impl Drop for DevStack {
    fn drop(&mut self) {
        self.pipeline.take();
        let _ = self.stop.send(true);
        for handle in [self.web.take(), self.dynamodb.take()]
            .into_iter()
            .flatten()
        {
            handle.abort();
        }
        self.endpoints.remove(&self.state_dir);
    }
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

/// How to run this binary again, for the hints: its path relative to here when it is in the
/// build folder (`target/release/longrun`), else `longrun`.
fn command_name() -> String {
    let exe = std::env::current_exe().ok();
    let cwd = std::env::current_dir().ok();
    match (exe, cwd) {
        (Some(exe), Some(cwd)) => match exe.strip_prefix(&cwd) {
            Ok(relative) if relative.starts_with("target") => relative.display().to_string(),
            _ => "longrun".to_owned(),
        },
        _ => "longrun".to_owned(),
    }
}

async fn print_banner(stack: &DevStack, args: &DevArgs, state_dir: &std::path::Path) {
    let e = stack.endpoints();
    let longrun = command_name();
    let ext = &stack.page().ext;
    let state_flag = if state_dir == std::path::Path::new(".longrun") {
        String::new()
    } else {
        format!(" --state-dir {}", state_dir.display())
    };
    println!("longrun dev — the whole pipeline on this machine (no AWS account, no Docker)\n");
    println!("  chat page   {}", e.chat_url);
    println!(
        "  extension   {ext}: {}",
        stack
            .runtime()
            .extension
            .functions()
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
        "  queues      in-process with SQS semantics: {}-work, {}-delivery, their -dlq (maxReceiveCount {}); SQS API {}",
        QUEUE_PREFIX,
        QUEUE_PREFIX,
        longrun::aws::sqs::MAX_RECEIVE_COUNT,
        e.sqs_endpoint
    );
    println!("  secrets     {} (0600)", e.secrets_file.display());
    let key_missing = !stack.page().simulated_model
        && LocalSecrets::new(&e.secrets_file)
            .get(ext, &args.user, text_tools::API_KEY_SECRET)
            .await
            .ok()
            .flatten()
            .is_none();
    if key_missing {
        println!(
            "\n  {} has no {} yet, so the extension answers \"OpenAI key not connected\", as the seed says.\n  Connect one (any OpenAI-compatible server: set OPENAI_BASE_URL and OPENAI_MODEL before `dev`):\n    printf %s \"$OPENAI_API_KEY\" | {longrun}{state_flag} --local secrets set --ext {ext} --user {} {}\n  or restart with --simulate-model for an offline, clearly labelled simulation.",
            args.user,
            text_tools::API_KEY_SECRET,
            args.user,
            text_tools::API_KEY_SECRET
        );
    }
    println!("\n  try, from another terminal:");
    println!(
        "    {longrun}{state_flag} call refine_output --params '{{\"input\":\"make this sound better\"}}'"
    );
    println!(
        "    {longrun}{state_flag} --local tasks list --ext {ext} --user {}",
        args.user
    );
    println!(
        "    AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local aws dynamodb scan --region {} --endpoint-url {} --table-name {}",
        e.region, e.dynamodb_endpoint, e.table
    );
}

/// `longrun dev`.
pub async fn run(aws: &AwsArgs, args: DevArgs) -> Result<(), Failure> {
    let settings = Settings::from_env()?;
    // The sweeper revives lapsed leases; locally it need not wait the deployed minute.
    let pipeline = PipelineOptions {
        sweep_every: (settings.lease / 2)
            .clamp(Duration::from_millis(200), Duration::from_secs(30)),
        ..PipelineOptions::default()
    };
    let options = DevOptions {
        state_dir: aws.state_dir.clone(),
        port: args.port,
        dynamodb_port: args.dynamodb_port.unwrap_or(if args.port == 0 {
            0
        } else {
            args.port.saturating_add(1)
        }),
        settings,
        model: if args.simulate_model {
            Model::Simulated(args.simulate_latency_ms)
        } else {
            Model::FromEnv
        },
        user: args.user.clone(),
        chat: args.chat.clone(),
        queue_timeouts: QueueTimeouts::default(),
        pipeline,
    };
    let stack = DevStack::start(options).await?;
    print_banner(&stack, &args, &aws.state_dir).await;
    let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let transcript = Transcript::spawn(Arc::clone(stack.chat()), stack.stopped(), color);

    let mut outcome = Ok(());
    let mut interrupted = false;
    if !args.no_demo {
        tokio::select! {
            report = demo::run(&stack, Some(&transcript), &args.user, &args.chat) => {
                if args.demo_only && !report.complete {
                    outcome = Err(Failure::Other("the demo's background results were not all delivered in time".into()));
                }
            }
            _ = shutdown_signal() => interrupted = true,
        }
    }
    if !args.demo_only && !interrupted {
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
