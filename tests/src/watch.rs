//! The real function binaries under `cargo lambda watch` (the Lambda runtime API emulator):
//! started on a free loopback port with the deployment's environment, invoked through the
//! Lambda Invoke HTTP API (`POST /2015-03-31/functions/{name}/invocations`), and stopped with
//! every instance it spawned when the handle drops.
//!
//! `cargo lambda watch` runs each function as `cargo run --bin {name}` on its first invoke
//! (the binaries are built beforehand, so that is a freshness check) and keeps up to
//! `--concurrency` instances of it. An instance that dies in the middle of an invocation is
//! not replaced: it keeps its place in the pool, and its invocation never answers (the
//! caller's timeout ends it).

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::procs::Guarded;

/// How long `cargo lambda watch` may take to listen.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether `cargo lambda` is installed.
pub async fn available() -> bool {
    tokio::process::Command::new("cargo")
        .args(["lambda", "--version"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// A running `cargo lambda watch`.
pub struct LambdaWatch {
    invoker: Invoker,
    process: Guarded,
}

/// What an invocation returned.
#[derive(Debug, Clone)]
pub enum Invoked {
    /// The function answered; its response body.
    Answer(String),
    /// The function (or the runtime around it) reported an error: the emulator's status and
    /// body (`{"errorType", "errorMessage"}`).
    FunctionError {
        /// The emulator's HTTP status.
        status: u16,
        /// The error body, `{"errorType", "errorMessage"}`.
        body: String,
    },
    /// No answer within the timeout (a killed or hung instance).
    TimedOut,
    /// The emulator could not be reached.
    Unreachable(String),
}

impl Invoked {
    /// The answer as JSON, if the function answered with JSON.
    pub fn json(&self) -> Option<Value> {
        match self {
            Self::Answer(body) => serde_json::from_str(body).ok(),
            _ => None,
        }
    }
}

/// Invokes functions of one emulator; cheap to clone.
#[derive(Clone)]
pub struct Invoker {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The binary every function name resolves to, when one binary serves them all.
    binary: Option<String>,
    http: reqwest::Client,
}

impl Invoker {
    /// An invoker for the Invoke API at `endpoint` (`http://127.0.0.1:PORT`).
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            binary: None,
            http: reqwest::Client::new(),
        }
    }

    /// Sends every invocation to `binary`, whatever function it names: a longrun deployment is
    /// one binary serving intake, worker, delivery and sweeper, which (with no `LONGRUN_ROLE`
    /// under `cargo lambda watch`) reads its role from each event's shape. Scenarios keep the
    /// functions' names for what they mean.
    pub fn serving(mut self, binary: impl Into<String>) -> Self {
        self.binary = Some(binary.into());
        self
    }

    /// Invokes `function` with `payload` (raw bytes: the caller decides whether they are JSON),
    /// waiting at most `timeout` for the answer.
    pub async fn invoke(
        &self,
        function: &str,
        payload: impl Into<Vec<u8>>,
        timeout: Duration,
    ) -> Invoked {
        let function = self.binary.as_deref().unwrap_or(function);
        let url = format!(
            "{}/2015-03-31/functions/{function}/invocations",
            self.endpoint
        );
        let request = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .body(payload.into())
            .timeout(timeout);
        match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                match response.text().await {
                    Ok(body) if status == 200 => Invoked::Answer(body),
                    Ok(body) => Invoked::FunctionError { status, body },
                    Err(e) if e.is_timeout() => Invoked::TimedOut,
                    Err(e) => Invoked::Unreachable(e.to_string()),
                }
            }
            Err(e) if e.is_timeout() => Invoked::TimedOut,
            Err(e) => Invoked::Unreachable(e.to_string()),
        }
    }

    /// Invokes with a JSON payload.
    pub async fn invoke_json(&self, function: &str, payload: &Value, timeout: Duration) -> Invoked {
        self.invoke(function, payload.to_string(), timeout).await
    }
}

impl LambdaWatch {
    /// Starts `cargo lambda watch` in the workspace with `env` for every function, at most
    /// `concurrency` instances per function, logging to `log_dir`, in the workspace `project`.
    pub async fn start(
        env: &[(String, String)],
        concurrency: usize,
        log_dir: &Path,
        project: &Path,
        release: bool,
    ) -> Result<Self, String> {
        let env_file = log_dir.join("functions.env");
        let text: String = env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        std::fs::write(&env_file, text).map_err(|e| format!("{}: {e}", env_file.display()))?;
        let mut last_failure = String::new();
        for attempt in 0..3 {
            let port = crate::free_port().map_err(|e| format!("no free port: {e}"))?;
            let mut args: Vec<String> = [
                "lambda",
                "watch",
                "--invoke-address",
                "127.0.0.1",
                "--invoke-port",
                &port.to_string(),
                "--ignore-changes",
                "--concurrency",
                &concurrency.to_string(),
                "--env-file",
                &env_file.to_string_lossy(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if release {
                args.push("--release".to_owned());
            }
            // The functions get their configuration from the env file only; the variables
            // here keep cargo itself quiet and colourless.
            let process = Guarded::spawn(
                &format!("cargo-lambda-watch-{attempt}"),
                "cargo",
                &args,
                project,
                &[
                    ("CARGO_TERM_COLOR".into(), "never".into()),
                    ("NO_COLOR".into(), "1".into()),
                    // A project of an author's own shares this workspace's target folder.
                    (
                        "CARGO_TARGET_DIR".into(),
                        crate::target_dir().to_string_lossy().into_owned(),
                    ),
                ],
                log_dir,
            )?;
            let mut watch = Self {
                invoker: Invoker::new(format!("http://127.0.0.1:{port}")),
                process,
            };
            match watch.wait_ready(port).await {
                Ok(()) => return Ok(watch),
                Err(why) => last_failure = why,
            }
        }
        Err(format!("cargo lambda watch did not start: {last_failure}"))
    }

    async fn wait_ready(&mut self, port: u16) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if !self.process.is_running() {
                return Err(format!("it exited: {}", tail(&self.process.output())));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "no listener on {port} after {READY_TIMEOUT:?}: {}",
                    tail(&self.process.output())
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends every invocation to `binary` (see [`Invoker::serving`]).
    pub fn serving(mut self, binary: &str) -> Self {
        self.invoker = self.invoker.serving(binary);
        self
    }

    /// The invoker for this emulator.
    pub fn invoker(&self) -> Invoker {
        self.invoker.clone()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.invoker.endpoint
    }

    /// Invokes `function` with a JSON payload.
    pub async fn invoke_json(&self, function: &str, payload: &Value, timeout: Duration) -> Invoked {
        self.invoker.invoke_json(function, payload, timeout).await
    }

    /// Invokes `function` with raw bytes.
    pub async fn invoke(
        &self,
        function: &str,
        payload: impl Into<Vec<u8>>,
        timeout: Duration,
    ) -> Invoked {
        self.invoker.invoke(function, payload, timeout).await
    }

    /// The highest peak resident set size (`VmHWM`) of any running instance of the function
    /// binary `bin`, in KiB.
    pub fn peak_rss_kib(&self, bin: &str) -> Option<u64> {
        self.process
            .pids_of(bin)
            .into_iter()
            .filter_map(|pid| {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                status
                    .lines()
                    .find_map(|line| line.strip_prefix("VmHWM:"))
                    .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .max()
    }

    /// Kills every running instance of the function binary `bin` (SIGKILL, as a crashed or
    /// out-of-memory Lambda instance ends); returns how many.
    pub fn kill_instances(&self, bin: &str) -> usize {
        self.process.kill_by_exe(bin).len()
    }

    /// Kills (SIGKILL) the function instance that holds the connection from local port `port`
    /// to a server on `peer_port` — e.g. the one in the middle of a call the fake AI server
    /// is holding. Only that instance: `cargo lambda watch` does not replace an instance that
    /// dies, so killing every instance would leave the function with none. Returns the pid
    /// killed.
    pub fn kill_instance_with_connection(&self, port: u16, peer_port: u16) -> Option<u32> {
        let pid = self.process.pid_with_connection(port, peer_port)?;
        self.process.kill_descendant(pid).then_some(pid)
    }

    /// The function instance that holds the connection from local port `port` to a server on
    /// `peer_port`, if any.
    pub fn instance_with_connection(&self, port: u16, peer_port: u16) -> Option<u32> {
        self.process.pid_with_connection(port, peer_port)
    }

    /// Kills (SIGKILL) the function instance `pid`; whether it was one of this emulator's.
    pub fn kill_instance(&self, pid: u32) -> bool {
        self.process.kill_descendant(pid)
    }

    /// How many instances of `bin` are running.
    pub fn instances(&self, bin: &str) -> usize {
        self.process.pids_of(bin).len()
    }

    /// Everything the emulator and the functions printed so far.
    pub fn output(&self) -> String {
        self.process.output()
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
