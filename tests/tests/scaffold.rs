//! `longrun new`, as a new author would use it: a project of their own in a temporary folder,
//! outside this repository; it builds, passes its own tests, runs its own dev demo to the end,
//! its template passes `sam validate --lint`, and its Lambda binary — under `cargo lambda
//! watch`, against moto, dynoxide and the fake chat — turns one background call into one
//! result message and one `delivered` audit item. Nothing of the project reaches into this
//! repository but its path dependency on longrun's crates; it shares this workspace's target
//! folder, so the crates they have in common are built once.

mod dev_support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use dev_support::{FAST_SETTINGS, TempDir, longrun_binary};
use longrun::task::AuditKind;
use longrun_tests::e2e::{Options, Stack};
use serde_json::json;

const NAME: &str = "probe";

/// Runs `program args` in `dir` with the shared target folder; panics with its output when it
/// fails.
fn run(dir: &Path, program: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut command = std::process::Command::new(program);
    command
        .current_dir(dir)
        .args(args)
        .env("CARGO_TARGET_DIR", longrun_tests::target_dir())
        .env("NO_COLOR", "1")
        .env("CARGO_TERM_COLOR", "never")
        .env_remove("LONGRUN_STATE_DIR")
        .stdin(Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "{} {args:?} failed in {}:\n{text}",
        program.display(),
        dir.display()
    );
    text
}

fn cargo() -> PathBuf {
    std::env::var_os("CARGO")
        .map(PathBuf::from)
        .unwrap_or_else(|| "cargo".into())
}

/// Every file of the project, relative paths.
fn files(dir: &Path, base: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path
                .file_name()
                .is_some_and(|n| n == "target" || n == ".longrun")
            {
                continue;
            }
            files(&path, base, out);
        } else {
            out.push(path.strip_prefix(base).unwrap().to_path_buf());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_project_builds_tests_runs_locally_validates_and_delivers_through_the_real_binary() {
    let home = TempDir::new("scaffold");
    let project = home.path().join(NAME);

    // GIVEN `longrun new probe` in a folder outside this repository
    let created = run(
        home.path(),
        &longrun_binary(),
        &["new", NAME, "--path", project.to_str().unwrap()],
        &[],
    );
    assert!(
        created.contains("cargo run --release --bin dev"),
        "{created}"
    );
    let mut listed = Vec::new();
    files(&project, &project, &mut listed);
    for expected in [
        "Cargo.toml",
        "Cargo.lock",
        "src/lib.rs",
        "src/main.rs",
        "dev/Cargo.toml",
        "dev/src/main.rs",
        "tests/extension.rs",
        "template.yaml",
        "samconfig.toml",
        "README.md",
        ".gitignore",
        "events/intake-call-summarize_later.json",
        "events/worker-sqs.json",
    ] {
        assert!(
            listed.contains(&PathBuf::from(expected)),
            "{expected} missing from {listed:?}"
        );
    }
    // Nothing reaches into this repository but the path dependencies on longrun's crates.
    let repo = longrun_tests::workspace_root();
    let repo = repo.canonicalize().unwrap();
    for file in &listed {
        let text = std::fs::read_to_string(project.join(file)).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains(repo.to_str().unwrap())) {
            assert!(
                file == Path::new("Cargo.toml") || file == Path::new("dev/Cargo.toml"),
                "{} names the longrun checkout: {line}",
                file.display()
            );
            assert!(line.contains("/shared/longrun"), "{line}");
        }
    }
    let readme = std::fs::read_to_string(project.join("README.md")).unwrap();
    let first_screen: String = readme.lines().take(12).collect::<Vec<_>>().join("\n");
    assert!(
        first_screen.contains("cargo run --release --bin dev -- --simulate-model")
            && first_screen.contains("cargo test"),
        "{first_screen}"
    );

    // WHEN it is built and its own tests run, offline
    let cargo = cargo();
    run(&project, &cargo, &["build", "--offline", "--bins"], &[]);
    let tests = run(&project, &cargo, &["test", "--offline"], &[]);
    assert!(tests.contains("test result: ok"), "{tests}");

    // AND its dev demo plays each function to the end on the simulated model
    let state = home.path().join("state");
    let mut env: Vec<(&str, &str)> = FAST_SETTINGS.to_vec();
    env.push(("LONGRUN_CAP_S", "60"));
    // The project's dev binary, as its README runs it (offline).
    let dev = |args: &[&str], env: &[(&str, &str)]| {
        let mut all = vec!["run", "--offline", "--quiet", "--bin", "dev", "--"];
        all.extend_from_slice(args);
        run(&project, &cargo, &all, env)
    };
    let demo = dev(
        &[
            "--simulate-model",
            "--simulate-latency-ms",
            "50..150",
            "--demo-only",
            "--port",
            "0",
            "--state-dir",
            state.to_str().unwrap(),
        ],
        &env,
    );
    for function in [
        "summarize",
        "summarize_later",
        "start_summary",
        "summarize_document",
    ] {
        assert!(demo.contains(function), "{function} not played:\n{demo}");
    }
    assert!(
        demo.contains("summarize_later: acked at once; result delivered to the chat — ✔"),
        "{demo}"
    );
    assert!(!demo.contains("not delivered in time"), "{demo}");

    // AND its sample events are what its dev binary writes from the code
    let written = home.path().join("events");
    dev(&["--write-events", written.to_str().unwrap()], &[]);
    for entry in std::fs::read_dir(project.join("events")).unwrap().flatten() {
        let shipped = std::fs::read_to_string(entry.path()).unwrap();
        let fresh = std::fs::read_to_string(written.join(entry.file_name())).unwrap_or_default();
        assert_eq!(
            shipped,
            fresh,
            "{:?} differs from the code's",
            entry.file_name()
        );
    }

    // AND its template passes `sam validate --lint`
    let sam = which("sam");
    match sam {
        Some(sam) => {
            run(
                &project,
                &sam,
                &["validate", "--lint", "--template-file", "template.yaml"],
                &[
                    ("AWS_DEFAULT_REGION", "us-east-1"),
                    ("SAM_CLI_TELEMETRY", "0"),
                ],
            );
        }
        None => longrun_tests::skip_or_fail("the AWS SAM CLI (pip install aws-sam-cli)"),
    }

    // THEN its Lambda binary, under `cargo lambda watch`, delivers one background call once
    let mut options = Options::new("scaffold");
    options.binary = NAME.into();
    options.ext = NAME.into();
    options.project = Some(project.clone());
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    stack.connect_openai_key("u1").await;
    let task_id = stack
        .start_task(
            "u1",
            "c1",
            "summarize_later",
            json!({"input": "A long text."}),
        )
        .await;
    let result = stack.wait_result(&task_id, Duration::from_secs(60)).await;
    assert_eq!(result["ok"], true, "{result}");
    stack
        .wait_delivered(&task_id, Duration::from_secs(30))
        .await;
    stack.wait_quiet(Duration::from_secs(10)).await;
    let posted = stack.chat.results_for(&task_id);
    assert_eq!(posted.len(), 1, "{posted:?}");
    assert_eq!(
        stack
            .audit_count(&task_id, AuditKind::Delivered, "delivered#result")
            .await,
        1,
        "one `delivered` audit item for the result (progress messages have their own)"
    );
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.is_file())
}
