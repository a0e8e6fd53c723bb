//! Shared by the dev stack tests (`cli_commands`, `chat_page`): the `longrun` binary, built
//! and located through cargo itself; a `longrun dev` child process on free ports in a
//! throw-away state folder, killed when dropped; temporary folders that delete themselves.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Settings that make a task take a second instead of minutes (env overrides of `Settings`).
pub(crate) const FAST_SETTINGS: &[(&str, &str)] = &[
    ("LONGRUN_HEARTBEAT_MS", "150"),
    ("LONGRUN_PROGRESS_INTERVAL_MS", "100"),
    ("LONGRUN_LEASE_MS", "3000"),
    ("LONGRUN_CANCEL_GRACE_MS", "200"),
];

/// A folder under the system temp dir, removed when dropped.
pub(crate) struct TempDir(
    /// The folder's path.
    pub(crate) PathBuf,
);

impl TempDir {
    /// Creates a fresh folder `longrun-NAME-PID-ULID` under the system temp dir.
    pub(crate) fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "longrun-{name}-{}-{}",
            std::process::id(),
            ulid::Ulid::new()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    /// The folder's path.
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `longrun` binary, built once per test process by `cargo build` (a no-op when it is up to
/// date) and located from cargo's own report, so a custom target folder or profile is no
/// guesswork.
pub(crate) fn longrun_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| built("longrun-cli", "longrun"))
        .clone()
}

/// The reference extension's dev binary (`functions/dev`: `longrun_dev::main(text-tools)`),
/// built like [`longrun_binary`].
pub(crate) fn dev_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| built("text-tools-dev", "dev"))
        .clone()
}

fn built(package: &str, bin: &str) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace");
    let mut command = std::process::Command::new(cargo);
    command.current_dir(workspace).args([
        "build",
        "--quiet",
        "-p",
        package,
        "--bin",
        bin,
        "--message-format=json",
    ]);
    // The same profile as the tests themselves (`cargo test --release` included).
    if !cfg!(debug_assertions) {
        command.arg("--release");
    }
    let output = command
        .stderr(Stdio::inherit())
        .output()
        .expect("cargo runs");
    assert!(output.status.success(), "cargo build of {bin} failed");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == bin)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo reported the {bin} executable"))
}

/// What a finished `longrun` command printed and how it exited.
#[derive(Debug)]
pub(crate) struct Run {
    /// The exit code (-1 when the process was ended by a signal).
    pub(crate) code: i32,
    /// Everything it wrote to stdout.
    pub(crate) stdout: String,
    /// Everything it wrote to stderr.
    pub(crate) stderr: String,
}

impl Run {
    /// Stdout parsed as one JSON value; panics, showing stdout, when it is not JSON.
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
}

/// Runs `longrun ARGS` for the state folder `state`, with `stdin` as its input, an
/// environment free of the developer's AWS settings, and a time limit.
pub(crate) async fn longrun(state: &Path, args: &[&str], stdin: Option<&str>) -> Run {
    longrun_env(state, args, stdin, &[]).await
}

/// [`longrun`] with extra environment variables.
pub(crate) async fn longrun_env(
    state: &Path,
    args: &[&str],
    stdin: Option<&str>,
    env: &[(&str, &str)],
) -> Run {
    use tokio::io::AsyncWriteExt;
    let mut command = tokio::process::Command::new(longrun_binary());
    command
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("LONGRUN_INTAKE_FUNCTION")
        .env_remove("LONGRUN_STATE_DIR")
        .env("NO_COLOR", "1")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("longrun runs");
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input.write_all(text.as_bytes()).await.expect("stdin");
    }
    let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("longrun {args:?} did not finish within 120 s"))
        .expect("longrun output");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A dev stack process (the reference extension's dev binary, what `longrun dev` runs).
/// Dropping it kills it.
pub(crate) struct DevProcess {
    child: std::process::Child,
    /// The throw-away state folder passed as `--state-dir`.
    pub(crate) state: TempDir,
    /// `http://127.0.0.1:PORT` of the chat page.
    pub(crate) url: String,
    /// What `dev.json` says.
    pub(crate) endpoints: serde_json::Value,
    log: PathBuf,
}

impl DevProcess {
    /// Starts `dev --port 0 ARGS` with `env`, and waits until it answers.
    pub(crate) fn start(name: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let state = TempDir::new(name);
        let log = state.path().with_extension("log");
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut command = std::process::Command::new(dev_binary());
        command
            .arg("--state-dir")
            .arg(state.path())
            .args(["--port", "0"])
            .args(args)
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_ENDPOINT_URL")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().expect("longrun dev runs");
        let mut dev = Self {
            child,
            state,
            url: String::new(),
            endpoints: serde_json::Value::Null,
            log,
        };
        let started = Instant::now();
        loop {
            if let Ok(text) = std::fs::read(dev.state.path().join("dev.json"))
                && let Ok(endpoints) = serde_json::from_slice::<serde_json::Value>(&text)
            {
                dev.url = endpoints["chat_url"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                dev.endpoints = endpoints;
                if health(&dev.url) {
                    return dev;
                }
            }
            if let Ok(Some(status)) = dev.child.try_wait() {
                panic!("longrun dev exited with {status}:\n{}", dev.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "longrun dev did not come up within 90 s:\n{}",
                dev.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What the process printed so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- longrun dev output ----\n{}", self.log());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Whether a dev stack answers `GET /api/health` at `url`. reqwest's blocking client, on a
/// thread of its own: it must not run on an async test's runtime, where callers may be.
fn health(url: &str) -> bool {
    let url = format!("{url}/api/health");
    std::thread::spawn(move || {
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .and_then(|client| client.get(url).send())
            .is_ok_and(|answer| answer.status() == reqwest::StatusCode::OK)
    })
    .join()
    .unwrap_or(false)
}

/// Whether tests that need a tool must fail rather than skip when it is missing (`CI=true`).
pub(crate) fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// What the dev binary's `--help` prints.
pub(crate) async fn dev_help() -> String {
    let output = tokio::process::Command::new(dev_binary())
        .arg("--help")
        .output()
        .await
        .expect("the dev binary runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}
