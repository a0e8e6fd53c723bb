//! The worker's memory: the peak resident set of the real release binary while one
//! invocation runs a full batch — 10 `refine_output` tasks at once, each with 120 KB of params
//! and a 100 KB answer from the AI — beside the same binary after a cold start and one small
//! call, measured in the same run. It prints the figures and the `MemorySize` they call for.
//!
//! Runs the deployment of the end-to-end tests (dynoxide, moto, the fake AI server and chat
//! API, `cargo lambda watch --release`), so it needs what they need:
//!
//! ```sh
//! cargo build --release --bin text-tools && cargo bench -p longrun-tests --bench worker_memory
//! ```

use std::time::Duration;

use longrun_tests::e2e::{EXT, Options, Stack};
use longrun_tests::esm::Faults;
use serde_json::json;

/// Tasks in the batch: the event source mapping's `BatchSize`.
const TASKS: usize = 10;
/// Each task's params: text of this many bytes (intake takes up to 128 KiB).
const PARAMS_BYTES: usize = 120 * 1024;
/// Each AI answer's size (a result holds up to 128 KiB).
const ANSWER_BYTES: usize = 100 * 1024;
/// The margin `MemorySize` keeps over the measured peak.
const MARGIN: f64 = 2.0;
/// Lambda's smallest `MemorySize`, in MB.
const LAMBDA_MIN_MB: u64 = 128;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut options = Options::new("worker-memory")
        .setting("LONGRUN_MAX_ACTIVE_TASKS", 100)
        .setting("LONGRUN_CAP_S", 120);
    options.release = true;
    options.concurrency = 1;
    options.sweep_every = None;
    let Some(stack) = Stack::start(options).await else {
        eprintln!("worker_memory: the end-to-end emulators are missing (scripts/install-tools)");
        std::process::exit(1);
    };
    stack.connect_openai_key("mem").await;
    // A cold start and one small call: the floor.
    let status = stack
        .invoke_intake(&json!({"action": "list", "ext": EXT, "user": "mem"}))
        .await;
    assert_eq!(status["status"], 200, "{status}");
    let idle = stack
        .watch
        .peak_rss_kib("text-tools")
        .expect("a text-tools instance");
    // The batch: held back until all ten messages wait, then handed out together.
    stack.esm.set_faults(
        "worker",
        Faults {
            hold: true,
            ..Faults::default()
        },
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let filler = "lorem ipsum dolor sit amet ".repeat(PARAMS_BYTES / 27);
    let mut tasks = Vec::new();
    for i in 0..TASKS {
        let input = format!("task {i} [[big={ANSWER_BYTES}]] [[delay=2000]] {filler}");
        tasks.push(
            stack
                .start_task(
                    "mem",
                    "chat-mem",
                    "refine_output",
                    json!({ "input": input }),
                )
                .await,
        );
    }
    stack.esm.set_faults("worker", Faults::default());
    for task_id in &tasks {
        let result = stack.wait_result(task_id, Duration::from_secs(120)).await;
        assert_eq!(result["ok"], true, "{result}");
    }
    let batch = stack
        .watch
        .peak_rss_kib("text-tools")
        .expect("a text-tools instance");
    let mib = |kib: u64| kib as f64 / 1024.0;
    let needed = (mib(batch) * MARGIN * 1.048_576).ceil() as u64; // MiB → MB
    let memory_size = needed.max(LAMBDA_MIN_MB).div_ceil(64) * 64;
    println!("worker_memory (the release binary, one instance):");
    println!("{:<58} {:>10}", "", "peak RSS");
    println!(
        "{:<58} {:>7.1} MiB",
        "cold start + one list call (baseline)",
        mib(idle)
    );
    println!(
        "{:<58} {:>7.1} MiB  ({:.2}× baseline)",
        format!(
            "{TASKS} tasks at once, {} KB params, {} KB AI answers",
            PARAMS_BYTES / 1024,
            ANSWER_BYTES / 1024
        ),
        mib(batch),
        mib(batch) / mib(idle)
    );
    println!(
        "MemorySize for the worker with a {MARGIN}× margin, rounded up to 64 MB: {memory_size} MB"
    );
}
