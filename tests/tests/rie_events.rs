//! Every sample event in `events/` through AWS's own Lambda Runtime Interface Emulator — the
//! emulator `sam local invoke` puts in its container, shipped in the aws-sam-cli wheel
//! (`samcli/local/rapid/aws-lambda-rie-x86_64`) — running the release binary as each function
//! runs it on Lambda (`LONGRUN_ROLE` set, the deployment's `LONGRUN_*` variables), against moto,
//! dynoxide, a fake OpenAI-compatible server and a fake chat API. Each event's answer is
//! checked, and so is its effect: the task record, the queue message, the chat post.
//!
//! The release binary is built the way `sam build` builds it (`cargo lambda build --release`),
//! so the SAM check that follows in `scripts/test` finds it built.

use std::path::{Path, PathBuf};
use std::time::Duration;

use longrun_tests::e2e::{Options, Stack};
use longrun_tests::procs::Guarded;
use longrun_tests::sample_events;
use serde_json::Value;

/// The emulator binary inside the installed aws-sam-cli wheel.
fn emulator() -> Option<PathBuf> {
    let output = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, samcli; print(os.path.dirname(samcli.__file__))",
        ])
        .output()
        .ok()?;
    let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let rie = dir.join("local/rapid/aws-lambda-rie-x86_64");
    rie.is_file().then_some(rie)
}

/// Builds the release binary as `sam build` does; its `bootstrap`.
fn release_bootstrap() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = std::process::Command::new(cargo)
        .current_dir(longrun_tests::workspace_root())
        .args(["lambda", "build", "--release", "--bin", "text-tools"])
        .env("CARGO_TARGET_DIR", longrun_tests::target_dir())
        .status()
        .expect("cargo lambda runs");
    assert!(status.success(), "cargo lambda build --release failed");
    let bootstrap = longrun_tests::target_dir().join("lambda/text-tools/bootstrap");
    assert!(bootstrap.is_file(), "{} was not built", bootstrap.display());
    bootstrap
}

/// One function under the emulator: the release binary with its role.
struct Function {
    url: String,
    http: reqwest::Client,
    _process: Guarded,
}

impl Function {
    async fn start(
        rie: &Path,
        bootstrap: &Path,
        role: &str,
        stack: &Stack,
        log_dir: &Path,
    ) -> Self {
        let port = longrun_tests::free_port().expect("a free port");
        // Each emulator serves its runtime API on a port of its own (the default, 9001, is
        // one for all).
        let runtime_api = longrun_tests::free_port().expect("a free port");
        let mut env = stack.env.clone();
        env.push(("LONGRUN_ROLE".into(), role.into()));
        // The emulator's own deadline for one invocation, as the template's timeouts.
        env.push(("AWS_LAMBDA_FUNCTION_TIMEOUT".into(), "60".into()));
        let process = Guarded::spawn(
            &format!("rie-{role}"),
            &rie.to_string_lossy(),
            &[
                "--runtime-interface-emulator-address".into(),
                format!("127.0.0.1:{port}"),
                "--runtime-api-address".into(),
                format!("127.0.0.1:{runtime_api}"),
                bootstrap.to_string_lossy().into_owned(),
            ],
            log_dir,
            &env,
            log_dir,
        )
        .expect("the emulator starts");
        let function = Self {
            url: format!("http://127.0.0.1:{port}/2015-03-31/functions/function/invocations"),
            http: reqwest::Client::new(),
            _process: process,
        };
        longrun_tests::until_listening(
            &format!("the emulator for {role} to listen"),
            port,
            Duration::from_secs(20),
        )
        .await;
        function
    }

    /// Invokes the function with the event file `name`; its answer.
    async fn invoke(&self, name: &str) -> Value {
        let path = longrun_tests::workspace_root().join("events").join(name);
        let event = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let response = self
            .http
            .post(&self.url)
            .body(event)
            .timeout(Duration::from_secs(90))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{name}: the emulator did not answer: {e}"));
        let status = response.status();
        let body = response.text().await.unwrap();
        assert!(status.is_success(), "{name}: {status} {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {body}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_sample_event_runs_under_the_runtime_interface_emulator() {
    let Some(rie) = emulator() else {
        longrun_tests::skip_or_fail(
            "the aws-sam-cli wheel's aws-lambda-rie (pip install aws-sam-cli)",
        );
        return;
    };
    let mut options = Options::new("rie");
    options.esm = false;
    options.sweep_every = None;
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    let bootstrap = tokio::task::spawn_blocking(release_bootstrap)
        .await
        .unwrap();
    stack.connect_openai_key("u1").await;
    let logs = longrun_tests::scratch_dir("rie-functions");
    let intake = Function::start(&rie, &bootstrap, "intake", &stack, &logs).await;
    let worker = Function::start(&rie, &bootstrap, "worker", &stack, &logs).await;
    let delivery = Function::start(&rie, &bootstrap, "delivery", &stack, &logs).await;
    let sweeper = Function::start(&rie, &bootstrap, "sweeper", &stack, &logs).await;
    sample_events::play(&stack, |role, file| {
        let function = match role {
            "intake" => &intake,
            "worker" => &worker,
            "delivery" => &delivery,
            _ => &sweeper,
        };
        function.invoke(file)
    })
    .await;
}
