//! `sam local invoke` and `sam local start-lambda`, for real, on the Docker engine: `sam build`
//! of `template.yaml`, then every sample event of `events/` through `sam local invoke
//! <Function> -e events/…` — SAM's own container, with AWS's Runtime Interface Emulator in it —
//! and intake behind `sam local start-lambda`, invoked by the AWS SDK's Lambda client and by
//! `longrun call --function-name`. The functions reach moto, dynoxide, the fake model and the
//! fake chat API on the host through `host.docker.internal` (`--add-host
//! host.docker.internal:host-gateway`); their endpoints come in with `--env-vars`, which
//! overrides only what the template declares (`LONGRUN_ENDPOINT_URL_*`, `OPENAI_*`).
//!
//! No registry is reachable here, so the image SAM runs `provided.al2023` functions on is
//! built locally by `tests/fixtures/lambda-base-image` under the tag SAM looks for, and SAM is
//! told not to pull (`--skip-pull-image`). Without a Docker engine the test is skipped (with
//! a `SKIPPED:` line) — and fails under `CI=true`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use longrun::TaskState;
use longrun_tests::e2e::{DEPLOYMENT_VARS, Options, Stack};
use longrun_tests::procs::Guarded;
use longrun_tests::sample_events;
use serde_json::{Value, json};

/// How the functions, in their containers, name the host.
const HOST_ALIAS: &str = "host.docker.internal";

/// Base image SAM runs `provided.al2023` functions on (built by the fixture).
const BASE_IMAGE: &str = "public.ecr.aws/lambda/provided:al2023-x86_64";

/// Whether a Docker engine answers.
fn engine_answers() -> bool {
    Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The host's address as the functions' containers see it: what `host-gateway` resolves to
/// in a container on the default network (the bridge's gateway).
fn host_gateway() -> IpAddr {
    let output = Command::new("docker")
        .args(["run", "--rm", "--add-host"])
        .arg(format!("{HOST_ALIAS}:host-gateway"))
        .args(["--entrypoint", "getent", BASE_IMAGE, "ahostsv4", HOST_ALIAS])
        .output()
        .expect("docker runs");
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "{HOST_ALIAS} did not resolve in a container: {text}{}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
}

/// What every `sam` run of this test gets: no telemetry, the emulators' region and test
/// credentials (SAM passes the credentials into the containers).
const SAM_ENV: [(&str, &str); 5] = [
    ("SAM_CLI_TELEMETRY", "0"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_DEFAULT_REGION", "us-east-1"),
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
];

fn sam(root: &Path) -> Command {
    let mut command = Command::new("sam");
    command
        .current_dir(root)
        .envs(SAM_ENV)
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN");
    command
}

/// `sam build` of the workspace's template into `dir`; the built template.
fn sam_build(dir: &Path) -> PathBuf {
    let root = longrun_tests::workspace_root();
    let output = sam(&root)
        .args([
            "build",
            "--beta-features",
            "--template-file",
            "template.yaml",
        ])
        .arg("--build-dir")
        .arg(dir)
        .args(["--parameter-overrides", "Architecture=x86_64"])
        .output()
        .expect("sam runs");
    assert!(
        output.status.success(),
        "sam build failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    dir.join("template.yaml")
}

/// Builds (unless present) the base image SAM runs the functions on.
fn base_image() {
    let script = longrun_tests::workspace_root().join("tests/fixtures/lambda-base-image");
    let status = Command::new(&script)
        .status()
        .expect("the image fixture runs");
    assert!(status.success(), "{} failed", script.display());
}

/// What every `sam local` command of this test passes.
struct Local {
    template: PathBuf,
    env_vars: PathBuf,
}

impl Local {
    /// The flags naming the built template, the variables, the image policy and the host.
    fn args(&self) -> Vec<String> {
        vec![
            "--template-file".into(),
            self.template.to_string_lossy().into_owned(),
            "--env-vars".into(),
            self.env_vars.to_string_lossy().into_owned(),
            "--parameter-overrides".into(),
            "Architecture=x86_64 ChatApiUrl=http://host.docker.internal".into(),
            "--skip-pull-image".into(),
            "--add-host".into(),
            format!("{HOST_ALIAS}:host-gateway"),
        ]
    }

    /// `sam local invoke` of the function `role` with `events/{file}`; its answer.
    async fn invoke(&self, role: &'static str, file: &'static str) -> Value {
        let function = function_of(role);
        let event = longrun_tests::workspace_root().join("events").join(file);
        let mut command = tokio::process::Command::from(sam(&longrun_tests::workspace_root()));
        command
            .args(["local", "invoke", function, "--event"])
            .arg(&event)
            .args(self.args())
            .kill_on_drop(true);
        let output = tokio::time::timeout(Duration::from_secs(180), command.output())
            .await
            .unwrap_or_else(|_| panic!("sam local invoke {function} ({file}) hung"))
            .expect("sam runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "sam local invoke {function} -e events/{file} failed:\n{stdout}\n{stderr}"
        );
        // The function's answer is the last line on stdout; SAM's and the function's logs
        // go to stderr.
        let answer = stdout.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
        serde_json::from_str(answer).unwrap_or_else(|e| {
            panic!("sam local invoke {function} ({file}): not JSON ({e}):\n{stdout}\n{stderr}")
        })
    }
}

/// The template's function for a role.
fn function_of(role: &str) -> &'static str {
    match role {
        "intake" => "IntakeFunction",
        "worker" => "WorkerFunction",
        "delivery" => "DeliveryFunction",
        "sweeper" => "SweeperFunction",
        other => panic!("no function for role {other}"),
    }
}

/// The `--env-vars` file: the stack's settings as the containers must see them (the host's
/// address as [`HOST_ALIAS`]), for every function (`Parameters`).
fn env_vars(stack: &Stack, host: IpAddr, dir: &Path) -> PathBuf {
    let from_container = |value: &str| value.replace(&host.to_string(), HOST_ALIAS);
    let env: BTreeMap<&str, &str> = stack
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let declared = [
        "LONGRUN_CHAT_API_URL",
        "LONGRUN_CHAT_TOKEN_SECRET",
        "LONGRUN_SECRETS_PREFIX",
        "OPENAI_BASE_URL",
        "OPENAI_MODEL",
        "OPENAI_FAST_MODEL",
    ];
    for name in DEPLOYMENT_VARS.into_iter().chain(declared) {
        if let Some(value) = env.get(name) {
            vars.insert(name.into(), from_container(value));
        }
    }
    for (name, service) in longrun_aws::ENDPOINT_VARS.into_iter().zip([
        "AWS_ENDPOINT_URL_DYNAMODB",
        "AWS_ENDPOINT_URL_SQS",
        "AWS_ENDPOINT_URL_SECRETS_MANAGER",
    ]) {
        vars.insert(name.into(), from_container(env[service]));
    }
    vars.insert("RUST_LOG".into(), "info".into());
    let path = dir.join("env.json");
    std::fs::write(&path, json!({ "Parameters": vars }).to_string()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sam_local_invoke_runs_every_sample_event_and_start_lambda_serves_intake() {
    if !engine_answers() {
        longrun_tests::skip_or_fail("a Docker engine (docker version)");
        return;
    }
    let host = tokio::task::spawn_blocking(|| {
        base_image();
        host_gateway()
    })
    .await
    .unwrap();
    let mut options = Options::new("sam-local");
    options.esm = false;
    options.sweep_every = None;
    // Containers reach the host at the bridge's address only: everything listens there.
    options.host = host;
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    stack.connect_openai_key("u1").await;
    let dir = longrun_tests::scratch_dir("sam-local");
    let build_dir = dir.join("build");
    let template = tokio::task::spawn_blocking(move || sam_build(&build_dir))
        .await
        .unwrap();
    let local = Local {
        template,
        env_vars: env_vars(&stack, host, &dir),
    };

    // Every event, each through its function's own container.
    sample_events::play(&stack, |role, file| local.invoke(role, file)).await;

    // start-lambda: the Lambda Invoke API in front of the same containers.
    let port = longrun_tests::free_port().expect("a free port");
    let mut args = vec![
        "local".to_owned(),
        "start-lambda".into(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
    ];
    args.extend(local.args());
    let env: Vec<(String, String)> = SAM_ENV.map(|(k, v)| (k.to_owned(), v.to_owned())).into();
    let _server = Guarded::spawn(
        "sam-start-lambda",
        "sam",
        &args,
        &longrun_tests::workspace_root(),
        &env,
        &dir,
    )
    .expect("sam local start-lambda starts");
    let endpoint = format!("http://127.0.0.1:{port}");
    longrun_tests::until_listening(
        "sam local start-lambda to listen",
        port,
        Duration::from_secs(60),
    )
    .await;

    // The AWS SDK's Lambda client, as a chat platform invokes intake.
    let sdk = longrun_tests::moto::sdk_config(&endpoint).await;
    let lambda = aws_sdk_lambda::Client::new(&sdk);
    let call = json!({
        "action": "call", "ext": "text-tools", "function": "refine_output",
        "user": "u1", "chat": "c1", "request_id": "r-start-lambda",
        "params": {"input": "pls make this sound better"},
    });
    let invoked = lambda
        .invoke()
        .function_name("IntakeFunction")
        .payload(aws_sdk_lambda::primitives::Blob::new(call.to_string()))
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "Invoke through start-lambda: {}",
                aws_sdk_lambda::error::DisplayErrorContext(&e)
            )
        });
    assert_eq!(invoked.function_error(), None, "{invoked:?}");
    let ack: Value = serde_json::from_slice(invoked.payload().unwrap().as_ref()).unwrap();
    assert_eq!(ack["status"], 200, "{ack}");
    let task = ack["result"]["data"]["task_id"].as_str().unwrap();
    assert_eq!(stack.task(task).await.state, TaskState::Queued);

    // The operator's CLI, through the same API: the task's status.
    let run = stack
        .cli(
            &[
                "call",
                "refine",
                "--function-name",
                "IntakeFunction",
                "--endpoint-url",
                &endpoint,
                "--user",
                "u1",
                "--chat",
                "c1",
                "--params",
                r#"{"input": "pls make this sound better"}"#,
                "--json",
            ],
            None,
        )
        .await;
    assert_eq!(
        run.code,
        Some(0),
        "longrun call: {}\n{}",
        run.stdout,
        run.stderr
    );
    let answer: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(
        answer["response"]["result"]["summary"], "Refined text ready!",
        "{answer}"
    );
    stack.assert_no_secret_in_output();
}
