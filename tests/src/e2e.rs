//! The whole deployment on one machine, as the end-to-end scenarios use it:
//!
//! - moto (SQS, Secrets Manager) and dynoxide (DynamoDB) on free loopback ports;
//! - the table and queues created by the real `longrun bootstrap`, whose `KEY=value` output
//!   is the functions' configuration (the queues' visibility timeouts are then shortened, so
//!   a redelivery takes seconds, not the production minutes);
//! - the fake OpenAI-compatible server and the fake chat API;
//! - the four function binaries under `cargo lambda watch`, intake invoked through the
//!   Invoke API;
//! - the event-source-mapping player between the queues and `worker` / `delivery`, and a
//!   scheduler invoking `sweeper`;
//! - the task table read through longrun's own DynamoDB adapter, and the `longrun` CLI.
//!
//! [`Stack::start`] returns `None` (the test skips) when moto or cargo-lambda is missing,
//! unless `CI=true`. Dropping the stack stops everything; when the test failed, the scratch
//! directory with every process's output is kept and named on stderr.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;
use longrun::ports::TaskStore;
use longrun::task::{AuditItem, AuditKind, Task, TaskId};
use longrun_aws::dynamodb::DynamoTaskStore;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::dynamo::Dynoxide;
use crate::esm::{Mapping, Player};
use crate::fake_chat::FakeChat;
use crate::fake_openai::FakeOpenAi;
use crate::moto::Moto;
use crate::watch::{Invoked, LambdaWatch};

/// The extension every scenario talks to.
pub const EXT: &str = text_tools::NAME;
/// The model the functions are configured with (`OPENAI_MODEL`).
pub const MODEL: &str = "gpt-e2e";
/// The fast model the functions are configured with (`OPENAI_FAST_MODEL`, for
/// `start_refinement`'s fast path).
pub const FAST_MODEL: &str = "gpt-e2e-mini";
/// Where the chat token lives in Secrets Manager.
pub const CHAT_TOKEN_SECRET: &str = "e2e/chat-api-token";

/// How a stack is set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// Names the scratch directory.
    pub label: String,
    /// The one binary that serves intake, worker, delivery and sweeper.
    pub binary: String,
    /// The extension that binary serves (the `ext` of every request).
    pub ext: String,
    /// The workspace `cargo lambda watch` runs the binary from: this one, or a project of an
    /// author's own (`longrun new`), built beforehand into `CARGO_TARGET_DIR`.
    pub project: Option<std::path::PathBuf>,
    /// `LONGRUN_*` settings overrides for every function.
    pub settings: BTreeMap<String, String>,
    /// Instances per function in `cargo lambda watch`, and invocations at once per mapping.
    pub concurrency: usize,
    /// Instances `cargo lambda watch` may start beyond `concurrency`. An instance killed in
    /// the middle of an invocation keeps its place in the emulator's pool (it is never seen
    /// to finish), so a scenario that kills N instances needs N spare ones to keep its
    /// capacity.
    pub spare_instances: usize,
    /// Whether the chat API requires a bearer token (kept in Secrets Manager).
    pub chat_token: bool,
    /// Visibility timeout of the work queue, in seconds.
    pub work_visibility_s: u32,
    /// Visibility timeout of the delivery queue, in seconds.
    pub delivery_visibility_s: u32,
    /// The worker's function timeout (the player's wait per invocation).
    pub worker_timeout: Duration,
    /// Delivery's function timeout (the player's wait per invocation).
    pub delivery_timeout: Duration,
    /// How often the sweeper runs, if at all.
    pub sweep_every: Option<Duration>,
    /// Whether the player maps the queues to the functions.
    pub esm: bool,
    /// `RUST_LOG` of the functions.
    pub rust_log: String,
    /// Where moto, dynoxide and the fakes listen (loopback unless containers must reach them).
    pub host: std::net::IpAddr,
    /// Runs the release build of the binary (build it beforehand: `cargo build --release`).
    pub release: bool,
}

impl Options {
    /// Quick settings: 20 s cap, 3 s lease, heartbeats every 500 ms.
    pub fn new(label: &str) -> Self {
        let settings = [
            ("LONGRUN_CAP_S", "20"),
            ("LONGRUN_LEASE_MS", "3000"),
            ("LONGRUN_HEARTBEAT_MS", "500"),
            ("LONGRUN_PROGRESS_INTERVAL_MS", "200"),
            ("LONGRUN_CANCEL_GRACE_MS", "1000"),
            ("LONGRUN_QUEUE_GRACE_MS", "30000"),
            ("LONGRUN_MAX_ATTEMPTS", "3"),
            ("LONGRUN_DEADLINE_MARGIN_MS", "2000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        Self {
            label: label.to_owned(),
            binary: "text-tools".into(),
            ext: EXT.into(),
            project: None,
            settings,
            concurrency: 4,
            spare_instances: 0,
            chat_token: true,
            work_visibility_s: 30,
            delivery_visibility_s: 2,
            worker_timeout: Duration::from_secs(25),
            delivery_timeout: Duration::from_secs(15),
            sweep_every: Some(Duration::from_secs(1)),
            esm: true,
            rust_log: "info".into(),
            host: crate::LOOPBACK,
            release: false,
        }
    }

    /// Sets one `LONGRUN_*` setting.
    pub fn setting(mut self, name: &str, value: impl ToString) -> Self {
        self.settings.insert(name.to_owned(), value.to_string());
        self
    }

    /// Runs the fault extension (the `faults` binary) instead of the reference one.
    pub fn with_faults(mut self) -> Self {
        self.binary = "faults".into();
        self
    }
}

/// The deployment's names that `longrun bootstrap` prints: the table and the four queues.
pub const DEPLOYMENT_VARS: [&str; 5] = [
    "LONGRUN_TABLE",
    "LONGRUN_WORK_QUEUE_URL",
    "LONGRUN_DELIVERY_QUEUE_URL",
    "LONGRUN_WORK_DLQ_URL",
    "LONGRUN_DELIVERY_DLQ_URL",
];

/// One run of the `longrun` CLI.
#[derive(Debug, Clone)]
pub struct CliRun {
    /// The exit code; `None` when a signal ended the process.
    pub code: Option<i32>,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

/// The running deployment. Fields drop in order: the player stops invoking before the
/// functions stop, and the functions before the emulators.
pub struct Stack {
    /// The event-source-mapping player (queues to `worker` and `delivery`) and the
    /// `sweeper` schedule.
    pub esm: Player,
    /// `cargo lambda watch` serving the functions.
    pub watch: LambdaWatch,
    /// The fake OpenAI-compatible server the functions call.
    pub openai: FakeOpenAi,
    /// The fake chat API delivery posts to.
    pub chat: FakeChat,
    /// What `longrun bootstrap` printed, by name.
    pub config: BTreeMap<String, String>,
    /// The functions' (and the CLI's) environment.
    pub env: Vec<(String, String)>,
    /// The task table through longrun's adapter.
    pub tasks: DynamoTaskStore,
    /// A DynamoDB client of the dynoxide emulator.
    pub dynamodb: aws_sdk_dynamodb::Client,
    /// An SQS client of moto.
    pub sqs: aws_sdk_sqs::Client,
    /// A Secrets Manager client of moto.
    pub secretsmanager: aws_sdk_secretsmanager::Client,
    /// The OpenAI key users connect (`longrun secrets set`); the fake accepts only it.
    pub openai_key: String,
    /// The chat API token, when the options asked for one.
    pub chat_token: Option<String>,
    /// The options the stack was started with.
    pub options: Options,
    /// Scratch directory: the env file, every process's output.
    pub dir: PathBuf,
    cli_log: Mutex<String>,
    dynoxide: Dynoxide,
    moto: Moto,
}

impl Stack {
    /// Starts everything; `None` when a tool is missing and the test may skip.
    pub async fn start(options: Options) -> Option<Self> {
        if !crate::watch::available().await {
            crate::skip_or_fail("cargo-lambda (pip install cargo-lambda)");
            return None;
        }
        let moto = Moto::start_on(options.host).await?;
        tokio::task::spawn_blocking(crate::build_stack_binaries)
            .await
            .expect("build task")
            .unwrap_or_else(|e| panic!("{e}"));
        let dir = crate::scratch_dir(&options.label);
        let dynoxide = Dynoxide::start_on(options.host).await.expect("dynoxide");
        let openai = FakeOpenAi::start_on(options.host)
            .await
            .expect("fake OpenAI server");
        let chat = FakeChat::start_on(options.host)
            .await
            .expect("fake chat API");
        let openai_key = format!("sk-e2e-{}", ulid::Ulid::new().to_string().to_lowercase());
        openai.expect_key(&openai_key);

        // Per-service endpoints: the CLI turns AWS_ENDPOINT_URL into an explicit endpoint for
        // every service, which would hide AWS_ENDPOINT_URL_DYNAMODB.
        let mut base_env: Vec<(String, String)> = vec![
            ("AWS_ENDPOINT_URL_SQS".into(), moto.endpoint.clone()),
            (
                "AWS_ENDPOINT_URL_SECRETS_MANAGER".into(),
                moto.endpoint.clone(),
            ),
            (
                "AWS_ENDPOINT_URL_DYNAMODB".into(),
                dynoxide.endpoint.clone(),
            ),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ];
        let mut stack_cli_log = String::new();
        let bootstrap = run_cli(
            &base_env,
            &["bootstrap", "--prefix", "e2e"],
            None,
            &mut stack_cli_log,
        )
        .await;
        assert_eq!(
            bootstrap.code,
            Some(0),
            "longrun bootstrap failed: {}",
            bootstrap.stderr
        );
        let config: BTreeMap<String, String> = bootstrap
            .stdout
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        for name in DEPLOYMENT_VARS {
            assert!(
                config.contains_key(name),
                "bootstrap printed no {name}: {}",
                bootstrap.stdout
            );
        }
        // bootstrap's own lines (table, queues, endpoint, region) come first; what only the
        // test knows follows.
        let mut env: Vec<(String, String)> = config.clone().into_iter().collect();
        env.retain(|(k, _)| k != "AWS_ENDPOINT_URL" && k != "AWS_REGION");
        env.append(&mut base_env);
        env.extend([
            ("LONGRUN_CHAT_API_URL".to_owned(), chat.url.clone()),
            ("OPENAI_BASE_URL".to_owned(), openai.base_url.clone()),
            ("OPENAI_MODEL".to_owned(), MODEL.to_owned()),
            ("OPENAI_FAST_MODEL".to_owned(), FAST_MODEL.to_owned()),
            ("RUST_LOG".to_owned(), options.rust_log.clone()),
        ]);
        env.extend(options.settings.clone());

        let sdk = crate::moto::sdk_config(&moto.endpoint).await;
        let sqs = moto.sqs_client().await;
        let secretsmanager = moto.secrets_client().await;
        let _ = sdk;
        let chat_token = if options.chat_token {
            let token = format!("chat-token-{}", ulid::Ulid::new());
            secretsmanager
                .create_secret()
                .name(CHAT_TOKEN_SECRET)
                .secret_string(&token)
                .send()
                .await
                .expect("create the chat token secret");
            chat.expect_token(&token);
            env.push((
                "LONGRUN_CHAT_TOKEN_SECRET".to_owned(),
                CHAT_TOKEN_SECRET.to_owned(),
            ));
            Some(token)
        } else {
            None
        };
        for (url, seconds) in [
            (&config["LONGRUN_WORK_QUEUE_URL"], options.work_visibility_s),
            (
                &config["LONGRUN_DELIVERY_QUEUE_URL"],
                options.delivery_visibility_s,
            ),
        ] {
            sqs.set_queue_attributes()
                .queue_url(url)
                .attributes(QueueAttributeName::VisibilityTimeout, seconds.to_string())
                .send()
                .await
                .expect("shorten the visibility timeout");
        }

        let project = options
            .project
            .clone()
            .unwrap_or_else(crate::workspace_root);
        let instances = options.concurrency + options.spare_instances;
        let watch = LambdaWatch::start(&env, instances, &dir, &project, options.release)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .serving(&options.binary);
        let dynamodb = dynoxide.client().await;
        let tasks = DynamoTaskStore::new(
            dynamodb.clone(),
            config["LONGRUN_TABLE"].clone(),
            Duration::from_secs(86_400),
        );
        let mut esm = Player::new();
        if options.esm {
            for (queue, function, timeout) in [
                (
                    "LONGRUN_WORK_QUEUE_URL",
                    "worker".to_owned(),
                    options.worker_timeout,
                ),
                (
                    "LONGRUN_DELIVERY_QUEUE_URL",
                    "delivery".to_owned(),
                    options.delivery_timeout,
                ),
            ] {
                esm.map(
                    sqs.clone(),
                    watch.invoker(),
                    Mapping {
                        queue_url: config[queue].clone(),
                        function,
                        batch_size: crate::esm::MAX_BATCH,
                        max_concurrency: options.concurrency,
                        timeout,
                    },
                )
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            }
        }
        if let Some(period) = options.sweep_every {
            esm.schedule(watch.invoker(), "sweeper", period);
        }
        let stack = Self {
            esm,
            watch,
            openai,
            chat,
            config,
            env,
            tasks,
            dynamodb,
            sqs,
            secretsmanager,
            openai_key,
            chat_token,
            options,
            dir,
            cli_log: Mutex::new(stack_cli_log),
            dynoxide,
            moto,
        };
        // The first invocation of a function starts it (`cargo run`, then its cold start):
        // warm every function before the scenario, so its timing is the pipeline's own.
        let empty_batch = json!({"Records": []});
        let worker = "worker";
        let list = json!({"action": "list", "ext": stack.options.ext, "user": "warm-up"});
        let (warm, _, _) = tokio::join!(
            stack.invoke_intake(&list),
            stack.invoke_json(worker, &empty_batch),
            stack.invoke_json("delivery", &empty_batch),
        );
        assert_eq!(warm["status"], 200, "intake warm-up: {warm}");
        Some(stack)
    }

    /// The moto endpoint.
    pub fn moto_endpoint(&self) -> &str {
        &self.moto.endpoint
    }

    /// The dynoxide endpoint.
    pub fn dynamodb_endpoint(&self) -> &str {
        &self.dynoxide.endpoint
    }

    /// Invokes the stack's intake with `event` through the Invoke API; the response as JSON.
    pub async fn invoke_intake(&self, event: &Value) -> Value {
        self.invoke_json("intake", event).await
    }

    /// Invokes `function` with `event`, expecting a JSON answer.
    pub async fn invoke_json(&self, function: &str, event: &Value) -> Value {
        match self
            .watch
            .invoke_json(function, event, Duration::from_secs(120))
            .await
        {
            Invoked::Answer(body) => serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("{function} answered non-JSON {body:?}: {e}")),
            other => panic!(
                "{function} did not answer {event}: {other:?}\n{}",
                self.output_tail()
            ),
        }
    }

    /// A `call` event.
    pub fn call_event(user: &str, chat: &str, function: &str, params: Value) -> Value {
        json!({"action": "call", "ext": EXT, "user": user, "chat": chat,
               "function": function, "params": params})
    }

    /// Calls `function` for `user` in `chat`; the intake response.
    pub async fn call(&self, user: &str, chat: &str, function: &str, params: Value) -> Value {
        let mut event = Self::call_event(user, chat, function, params);
        event["ext"] = json!(self.options.ext);
        self.invoke_intake(&event).await
    }

    /// Calls a background function and returns the task id from its ack.
    pub async fn start_task(
        &self,
        user: &str,
        chat: &str,
        function: &str,
        params: Value,
    ) -> String {
        let response = self.call(user, chat, function, params).await;
        assert_eq!(response["status"], 200, "call refused: {response}");
        response["result"]["data"]["task_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no task id in {response}"))
            .to_owned()
    }

    /// `status`, `cancel` or `list` for `user`.
    pub async fn ask(&self, action: &str, user: &str, task_id: &str) -> Value {
        self.invoke_intake(
            &json!({"action": action, "ext": self.options.ext, "user": user, "task_id": task_id}),
        )
        .await
    }

    /// Connects `user`'s OpenAI key with `longrun secrets set` (the value on stdin).
    pub async fn connect_openai_key(&self, user: &str) {
        let key = self.openai_key.clone();
        let run = self
            .cli(
                &[
                    "secrets",
                    "set",
                    "--ext",
                    &self.options.ext,
                    "--user",
                    user,
                    text_tools::API_KEY_SECRET,
                ],
                Some(&key),
            )
            .await;
        assert_eq!(run.code, Some(0), "longrun secrets set: {}", run.stderr);
    }

    /// Runs the `longrun` CLI against the stack; its output is kept for [`Stack::captured_output`].
    pub async fn cli(&self, args: &[&str], stdin: Option<&str>) -> CliRun {
        let mut log = String::new();
        let run = run_cli(&self.env, args, stdin, &mut log).await;
        self.cli_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_str(&log);
        run
    }

    /// Every line any process of the stack printed: the emulator and the functions, and
    /// every CLI run.
    pub fn captured_output(&self) -> String {
        let mut text = self.watch.output();
        text.push_str(&self.cli_log.lock().unwrap_or_else(|p| p.into_inner()));
        text
    }

    /// Asserts that no secret the stack holds — the users' OpenAI key, the chat token —
    /// appears in anything a process printed.
    pub fn assert_no_secret_in_output(&self) {
        let output = self.captured_output();
        assert!(
            !output.contains(&self.openai_key),
            "the OpenAI key appears in the output (kept in {})",
            self.dir.display()
        );
        if let Some(token) = &self.chat_token {
            assert!(
                !output.contains(token.as_str()),
                "the chat token appears in the output (kept in {})",
                self.dir.display()
            );
        }
    }

    /// Kills (SIGKILL) the function instance inside the AI call whose input contains `needle`
    /// — a Lambda instance dying mid-task. Panics when there is no such call in flight.
    pub fn kill_instance_in_ai_call(&self, needle: &str) -> u32 {
        let call = self
            .openai
            .calls_with(needle)
            .into_iter()
            .rev()
            .find(|c| c.state == crate::fake_openai::CallState::InFlight)
            .unwrap_or_else(|| panic!("no AI call with {needle:?} in flight"));
        self.watch
            .kill_instance_with_connection(call.client.port(), self.openai.addr.port())
            .unwrap_or_else(|| panic!("no function instance holds the call from {}", call.client))
    }

    /// Kills (SIGKILL) one worker instance in the middle of its work: among the instances
    /// inside an AI call whose input contains `needle` (one binary serves every function, so
    /// the call is what tells a worker apart — give background tasks' inputs a marker that
    /// inline calls lack), the one `choose` picks, given how many there are. `None` when no
    /// such call is in flight.
    pub fn kill_worker_in_ai_call(
        &self,
        needle: &str,
        choose: impl FnOnce(usize) -> usize,
    ) -> Option<u32> {
        let ports = self
            .openai
            .calls_with(needle)
            .into_iter()
            .filter(|c| c.state == crate::fake_openai::CallState::InFlight)
            .map(|c| c.client.port());
        self.kill_one_of(ports, self.openai.addr.port(), choose)
    }

    /// Kills (SIGKILL) one delivery instance in the middle of a post: among the instances
    /// waiting on the fake chat API, the one `choose` picks, given how many there are. `None`
    /// when no post is in flight.
    pub fn kill_delivery_in_chat_post(&self, choose: impl FnOnce(usize) -> usize) -> Option<u32> {
        let ports = self.chat.in_flight().into_iter().map(|c| c.port());
        self.kill_one_of(ports, self.chat.addr.port(), choose)
    }

    /// Kills the instance `choose` picks among those holding a connection from one of
    /// `ports` to `peer_port`, each instance counted once.
    fn kill_one_of(
        &self,
        ports: impl Iterator<Item = u16>,
        peer_port: u16,
        choose: impl FnOnce(usize) -> usize,
    ) -> Option<u32> {
        let mut pids: Vec<u32> = ports
            .filter_map(|port| self.watch.instance_with_connection(port, peer_port))
            .collect();
        pids.sort_unstable();
        pids.dedup();
        if pids.is_empty() {
            return None;
        }
        let pid = pids[choose(pids.len()) % pids.len()];
        self.watch.kill_instance(pid).then_some(pid)
    }

    /// The task record.
    pub async fn task(&self, task_id: &str) -> Task {
        let id: TaskId = task_id.parse().expect("a task id");
        self.tasks
            .get(&id)
            .await
            .expect("read the task")
            .unwrap_or_else(|| panic!("no task {task_id}"))
    }

    /// The task's audit trail.
    pub async fn audit(&self, task_id: &str) -> Vec<AuditItem> {
        let id: TaskId = task_id.parse().expect("a task id");
        self.tasks.audit_trail(&id).await.expect("read the audit")
    }

    /// How many audit items of `kind` with `audit_id` starting with `prefix` the task has.
    pub async fn audit_count(&self, task_id: &str, kind: AuditKind, prefix: &str) -> usize {
        self.audit(task_id)
            .await
            .iter()
            .filter(|a| a.kind == kind && a.audit_id.starts_with(prefix))
            .count()
    }

    /// Waits until the chat holds a result for the task; returns the first.
    pub async fn wait_result(&self, task_id: &str, timeout: Duration) -> Value {
        let chat = &self.chat;
        crate::eventually(&format!("a result for {task_id}"), timeout, || async move {
            chat.results_for(task_id).into_iter().next()
        })
        .await
    }

    /// Waits until the task record is delivered (the result is in the chat and
    /// `delivered_at` is written).
    pub async fn wait_delivered(&self, task_id: &str, timeout: Duration) -> Task {
        crate::eventually(
            &format!("task {task_id} delivered"),
            timeout,
            || async move {
                let task = self.task(task_id).await;
                task.delivered_at.is_some().then_some(task)
            },
        )
        .await
    }

    /// Messages in a queue (visible and in flight), by its config name, e.g.
    /// `LONGRUN_DELIVERY_DLQ_URL`.
    pub async fn queue_depth(&self, name: &str) -> u64 {
        longrun_aws::sqs::depth(&self.sqs, &self.config[name])
            .await
            .expect("queue depth")
    }

    /// Visible and in-flight messages of a queue, by its config name.
    pub async fn queue_counts(&self, name: &str) -> (u64, u64) {
        let attributes = self
            .sqs
            .get_queue_attributes()
            .queue_url(&self.config[name])
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .expect("queue attributes");
        let get = |name: QueueAttributeName| {
            attributes
                .attributes()
                .and_then(|a| a.get(&name))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (
            get(QueueAttributeName::ApproximateNumberOfMessages),
            get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        )
    }

    /// Waits until the work and delivery queues hold nothing, visible or in flight.
    pub async fn wait_quiet(&self, timeout: Duration) {
        crate::eventually("the queues to drain", timeout, || async {
            let work = self.queue_counts("LONGRUN_WORK_QUEUE_URL").await;
            let delivery = self.queue_counts("LONGRUN_DELIVERY_QUEUE_URL").await;
            (work == (0, 0) && delivery == (0, 0)).then_some(())
        })
        .await;
    }

    /// The last lines the functions printed, for failure messages.
    pub fn output_tail(&self) -> String {
        let text = self.watch.output();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.contains("Blocking waiting for file lock"))
            .collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Every item in the table (for "nothing half-written" checks).
    pub async fn table_items(&self) -> Vec<BTreeMap<String, Value>> {
        let mut items = Vec::new();
        let mut start = None;
        loop {
            let page = self
                .dynamodb
                .scan()
                .table_name(&self.config["LONGRUN_TABLE"])
                .set_exclusive_start_key(start)
                .send()
                .await
                .expect("scan the table");
            for item in page.items() {
                items.push(
                    item.iter()
                        .map(|(k, v)| {
                            (
                                k.clone(),
                                longrun_aws::dynamodb::attribute_to_json(v).unwrap_or(Value::Null),
                            )
                        })
                        .collect(),
                );
            }
            start = page.last_evaluated_key().cloned();
            if start.is_none() {
                return items;
            }
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::env::var_os("LONGRUN_E2E_KEEP").is_some() {
            eprintln!(
                "stack {:?} output kept in {}",
                self.options.label,
                self.dir.display()
            );
        } else if std::thread::panicking() {
            eprintln!(
                "stack {:?} failed; its processes' output is kept in {}\n--- last lines ---\n{}",
                self.options.label,
                self.dir.display(),
                self.output_tail()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs the `longrun` binary with `env`, appending its command line and output to `log`.
async fn run_cli(
    env: &[(String, String)],
    args: &[&str],
    stdin: Option<&str>,
    log: &mut String,
) -> CliRun {
    let binary = crate::debug_binary("longrun");
    let mut command = tokio::process::Command::new(&binary);
    command
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for name in crate::procs::AMBIENT_AWS {
        command.env_remove(name);
    }
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).await.expect("write stdin");
        drop(pipe);
    }
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("longrun {args:?} did not finish within 60 s"))
        .expect("longrun output");
    let run = CliRun {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    log.push_str(&format!(
        "$ longrun {}\n{}{}",
        args.join(" "),
        run.stdout,
        run.stderr
    ));
    run
}
