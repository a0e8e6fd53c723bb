//! The test harness: emulators on free loopback ports (dynoxide for DynamoDB, moto for SQS
//! and Secrets Manager), fakes of the outside world (an OpenAI-compatible server, a chat
//! API), the real function binaries under `cargo lambda watch`, an event-source-mapping
//! player between the queues and the functions, and [`e2e::Stack`], which puts them together
//! as one deployment. Every server and process stops when its handle is dropped, also when a
//! test fails.

pub mod cost;
pub mod counting;
pub mod dynamo;
pub mod e2e;
pub mod esm;
pub mod fake_chat;
pub mod fake_openai;
pub mod faults;
pub mod moto;
pub mod procs;
pub mod sample_events;
pub mod watch;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Whether a missing emulator must fail the run (`CI=true`) rather than skip the test.
pub fn emulators_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Skips the calling test with a line on stderr, or fails it under `CI=true`.
pub fn skip_or_fail(what: &str) {
    if emulators_required() {
        panic!("{what} is required under CI=true (scripts/install-tools installs it)");
    }
    eprintln!("SKIPPED: {what} is not available; this test needs it");
}

/// The workspace root (the directory of the top `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Cargo's target directory: `CARGO_TARGET_DIR` if set, else the one holding this test
/// executable (`…/target/debug/deps/e2e-…`), else `{workspace}/target`.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return if dir.is_absolute() {
            dir
        } else {
            workspace_root().join(dir)
        };
    }
    if let Ok(exe) = std::env::current_exe() {
        // target/{profile}/deps/{exe} or target/{profile}/{exe}
        for ancestor in exe.ancestors().skip(1) {
            if ancestor.join("CACHEDIR.TAG").exists() {
                return ancestor.to_path_buf();
            }
        }
    }
    workspace_root().join("target")
}

/// A debug binary of the workspace, e.g. `longrun`.
pub fn debug_binary(name: &str) -> PathBuf {
    target_dir().join("debug").join(name)
}

/// The binaries the end-to-end stack runs, built once per test process with the `dev`
/// profile (what `cargo lambda watch` runs too, so its own `cargo run` finds them fresh).
pub const STACK_BINARIES: &[&str] = &["text-tools", "longrun", "faults"];

/// Builds [`STACK_BINARIES`] once per test process; the result is shared by every caller.
/// Each group is built as `cargo run --bin …` builds it (features resolved for that package
/// alone), so the emulator's own `cargo run` finds the binaries fresh.
pub fn build_stack_binaries() -> Result<(), String> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let started = Instant::now();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            for group in [&["text-tools"][..], &["longrun"], &["faults"]] {
                let mut command = std::process::Command::new(&cargo);
                command
                    .current_dir(workspace_root())
                    .args(["build", "--quiet"]);
                for bin in group {
                    command.args(["--bin", bin]);
                }
                let output = command
                    .output()
                    .map_err(|e| format!("cannot run cargo build: {e}"))?;
                if !output.status.success() {
                    return Err(format!(
                        "cargo build of {group:?} failed:\n{}",
                        String::from_utf8_lossy(&output.stderr)
                    ));
                }
            }
            eprintln!(
                "stack binaries built in {} ms",
                started.elapsed().as_millis()
            );
            Ok(())
        })
        .clone()
}

/// Waits (at most `timeout`, then panics naming `what`) until something accepts
/// connections on loopback `port`.
pub async fn until_listening(what: &str, port: u16, timeout: Duration) {
    eventually(what, timeout, || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
    })
    .await;
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout` naming
/// `what`. For "eventually" assertions: the timeout is a generous bound, never the thing
/// under test.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where the harness's servers listen unless a test says otherwise.
pub const LOOPBACK: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// A free loopback port (another process may take it before it is used: callers retry).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A fresh scratch directory for one stack's logs and files.
pub fn scratch_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "longrun-e2e-{}-{label}-{}",
        std::process::id(),
        ulid::Ulid::new()
    ));
    let _ = std::fs::create_dir_all(&dir);
    dir
}
