//! [`DevStack`]: an extension's whole pipeline in one process on this machine, with no AWS
//! account and no Docker.
//!
//! - DynamoDB: the embedded dynoxide emulator, file-backed under the state folder and served
//!   on loopback, used through the same adapter the Lambdas use (`aws dynamodb scan
//!   --endpoint-url …` works on it);
//! - queues: in-process, with SQS semantics ([`crate::queue`]), fed to the same
//!   worker and delivery steps by pollers that play the event source mappings, and reachable
//!   through an SQS API for the `--local` operator commands;
//! - the sweeper on a timer; per-user secrets in a `0600` file;
//! - the chat: a terminal transcript and a web page ([`web`]), live over server-sent events.
//!
//! [`DevStack`] is the running stack; [`DevStack::builder`] starts one for any extension.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use longrun::ports::{PortResult, Secret, SecretStore, SystemClock};
use longrun::wire::IntakeResponse;
use longrun::{Extension, Runtime, Services, Settings};
use longrun_aws::dynamodb::{DynamoKv, DynamoTaskStore, DynamoUsage, ensure_table};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::DevError;
use crate::chat::LocalChat;
use crate::pipeline::{LocalPipeline, PipelineOptions};
use crate::queue::{LOCAL_REGION, LocalQueues, QueueTimeouts};
use crate::secrets::LocalSecrets;
use crate::simulator::{Latency, Simulator};
use crate::sqs_api;
use crate::state::{
    self, DevEndpoints, create_state_dir, dynamodb_client, local_sdk_config, secrets_file,
};
use crate::web::{self, AppState, PageConfig};

/// The dev stack's table: `longrun bootstrap`'s default name.
pub const TABLE: &str = "longrun-tasks";
/// The dev stack's queue name prefix: `longrun bootstrap`'s default.
pub const QUEUE_PREFIX: &str = "longrun";
/// How long finished tasks are kept.
const TASK_TTL: Duration = Duration::from_secs(30 * 86_400);
/// How long shutdown waits for a server to finish its requests.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Which OpenAI-compatible model endpoint the extension is given.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Model {
    /// None: the extension's own configuration (e.g. `OPENAI_BASE_URL`), with each user's
    /// secrets.
    FromEnv,
    /// The offline simulator; the demo user gets a placeholder for every declared secret.
    Simulated(Latency),
    /// This base URL (e.g. `http://127.0.0.1:PORT/v1`; tests: a fake OpenAI server).
    At(String),
}

/// Builds the extension once the stack knows its model endpoint: `Some(base_url)` of an
/// OpenAI-compatible API (the simulator's, or [`Model::At`]), or `None` for the extension's
/// own configuration.
pub type MakeExtension = Box<dyn FnOnce(Option<&str>) -> Extension + Send>;

/// How to run a dev stack.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// Where the DynamoDB data, the secrets and `dev.json` live.
    pub state_dir: PathBuf,
    /// The chat page's port (0: any).
    pub port: u16,
    /// DynamoDB's port (0: any).
    pub dynamodb_port: u16,
    /// Timing settings of the pipeline.
    pub settings: Settings,
    /// The model endpoint the extension is given.
    pub model: Model,
    /// The demo's and the page's default user.
    pub user: String,
    /// The demo's and the page's default chat.
    pub chat: String,
    /// The queues' visibility timeouts.
    pub queue_timeouts: QueueTimeouts,
    /// How the pollers and the sweeper run.
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
    extension: Extension,
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

/// The local secrets, plus a placeholder for each secret the extension declares, for the demo
/// user, when the model is simulated (the simulator takes any key).
struct WithPlaceholders {
    file: LocalSecrets,
    ext: String,
    user: String,
    declared: Vec<String>,
}

/// The value of a placeholder secret.
pub const PLACEHOLDER_SECRET: &str = "simulated-placeholder";

#[async_trait]
impl SecretStore for WithPlaceholders {
    async fn get(&self, ext: &str, user: &str, name: &str) -> PortResult<Option<Secret>> {
        let stored = self.file.get(ext, user, name).await?;
        if stored.is_none()
            && ext == self.ext
            && user == self.user
            && self.declared.iter().any(|d| d == name)
        {
            return Ok(Some(Secret::new(PLACEHOLDER_SECRET)));
        }
        Ok(stored)
    }
}

async fn bind(port: u16, what: &str, flag: &str) -> Result<tokio::net::TcpListener, DevError> {
    tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => DevError::Config(format!(
                "port {port} for {what} is in use (another `longrun dev`?); choose another with {flag}"
            )),
            _ => DevError::Other(format!("cannot listen on 127.0.0.1:{port} for {what}: {e}")),
        })
}

fn address(listener: &tokio::net::TcpListener) -> Result<String, DevError> {
    listener
        .local_addr()
        .map(|a| format!("http://{a}"))
        .map_err(|e| DevError::Other(e.to_string()))
}

impl DevStack {
    /// A builder for a stack running the extension `make` returns (given the model endpoint:
    /// see [`MakeExtension`]).
    pub fn builder(
        make: impl FnOnce(Option<&str>) -> Extension + Send + 'static,
    ) -> crate::DevBuilder {
        crate::DevBuilder::new(Box::new(make))
    }

    /// Starts DynamoDB, the queues, the pipeline and the web server, and writes `dev.json`.
    pub async fn start(make: MakeExtension, options: DevOptions) -> Result<Self, DevError> {
        let state_dir = options.state_dir.clone();
        create_state_dir(&state_dir)?;
        if let Ok(Some(running)) = DevEndpoints::read(&state_dir)
            && state::is_alive(&running.chat_url).await
        {
            return Err(DevError::Conflict(format!(
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
            .ok_or_else(|| DevError::Config(format!("{} is not valid UTF-8", db_path.display())))
            .and_then(|path| {
                dynoxide::Database::new(path)
                    .map_err(|e| DevError::Other(format!("cannot open {}: {e}", db_path.display())))
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
        let (base_url, simulator) = match &options.model {
            Model::FromEnv => (None, None),
            Model::At(url) => (Some(url.clone()), None),
            Model::Simulated(latency) => {
                let simulator = Simulator::start(*latency)
                    .await
                    .map_err(|e| DevError::Other(format!("model simulator: {e}")))?;
                (Some(simulator.base_url.clone()), Some(simulator))
            }
        };
        let extension = make(base_url.as_deref())
            .validated()
            .map_err(|e| DevError::Config(format!("the extension is not valid: {e}")))?;
        let declared: Vec<String> = extension.secrets().iter().map(|s| s.name.clone()).collect();
        let secrets: Arc<dyn SecretStore> = if simulator.is_some() {
            Arc::new(WithPlaceholders {
                file: files,
                ext: extension.name().to_owned(),
                user: options.user.clone(),
                declared: declared.clone(),
            })
        } else {
            Arc::new(files)
        };
        let secrets_words = if declared.is_empty() {
            "no secrets declared".to_owned()
        } else {
            format!("each user's {}", declared.join(", "))
        };
        let model = match (&simulator, &base_url) {
            (Some(sim), _) => format!(
                "SIMULATED offline model at {} — every answer says so; {} has placeholder secrets",
                sim.base_url, options.user
            ),
            (None, Some(url)) => format!("{url}; secrets: {secrets_words}"),
            (None, None) => format!(
                "the extension's own configuration (e.g. OPENAI_BASE_URL); secrets: {secrets_words}"
            ),
        };

        // The pipeline.
        let queues = LocalQueues::new(QUEUE_PREFIX, options.queue_timeouts);
        let chat = Arc::new(LocalChat::new());
        let services = Services {
            tasks: Arc::new(DynamoTaskStore::new(dynamo.clone(), TABLE, TASK_TTL)),
            kv: Arc::new(DynamoKv::new(dynamo.clone(), TABLE)),
            usage: Arc::new(DynamoUsage::new(dynamo, TABLE)),
            work: queues.work.clone(),
            delivery: queues.delivery.clone(),
            secrets,
            chat: chat.clone(),
            clock: Arc::new(SystemClock),
            http: reqwest::Client::new(),
        };
        let rt = Runtime::serving(extension.clone(), services, options.settings.clone());

        // The web server: page, API, SQS API.
        let listener = bind(options.port, "the chat page", "--port").await?;
        let chat_url = address(&listener)?;
        let sqs_endpoint = format!("{chat_url}/sqs");
        let sqs = sqs_api::SqsApi::new(queues.clone(), sqs_endpoint.clone(), stopped.clone());
        let page = PageConfig {
            ext: rt.extension_name().to_owned(),
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
            ext: rt.extension_name().to_owned(),
            table: TABLE.to_owned(),
            work_queue_url: sqs.url(&queues.work),
            work_dlq_url: sqs.url(&queues.work_dlq),
            delivery_queue_url: sqs.url(&queues.delivery),
            delivery_dlq_url: sqs.url(&queues.delivery_dlq),
            secrets_file: secrets_file(&state_dir),
        };
        endpoints.write(&state_dir)?;
        Ok(Self {
            extension,
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

    /// The extension the stack runs.
    pub fn extension(&self) -> &Extension {
        &self.extension
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
