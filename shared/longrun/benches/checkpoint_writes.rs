//! DynamoDB writes per task, as a function of checkpointed steps and of how often the handler
//! calls `ctx.progress`. The goal: writes = O(steps) + O(duration / heartbeat), independent of
//! the progress rate. Runs the real worker on the in-memory store (which counts the writes
//! DynamoDB would bill) on tokio's paused clock, so a 20-minute task takes milliseconds.
//!
//! `cargo bench -p longrun --bench checkpoint_writes`

use std::sync::Arc;
use std::time::Duration;

use chrono::TimeZone;
use longrun::ports::TokioClock;
use longrun::testing::MemoryStack;
use longrun::{ActionResult, ChatFunction, Ctx, Extension, Settings};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize, JsonSchema)]
struct Params {
    steps: u32,
    step_secs: u64,
    progress_per_sec: u64,
}

async fn work(ctx: Ctx, p: Params) -> longrun::Result<ActionResult> {
    for i in 0..p.steps {
        let ctx2 = ctx.clone();
        ctx.step(&format!("step-{i}"), async move {
            let ticks = p.step_secs * p.progress_per_sec.max(1);
            let every = Duration::from_secs(p.step_secs) / u32::try_from(ticks).unwrap_or(u32::MAX);
            for t in 0..ticks {
                if p.progress_per_sec > 0 {
                    let pct = i64::from(i) * 100 / i64::from(p.steps) + (t as i64 % 2);
                    let _ = ctx2
                        .progress(pct.min(100), format!("step {i} tick {t}"))
                        .await;
                }
                tokio::time::sleep(every).await;
            }
        })
        .await?;
    }
    Ok(ActionResult::success("done", ()))
}

fn stack() -> MemoryStack {
    let ext = Extension::new("bench").function(
        ChatFunction::new("work", work)
            .background(true)
            .long_running(true),
    );
    let clock = TokioClock::starting_at(
        chrono::Utc
            .with_ymd_and_hms(2026, 11, 25, 12, 0, 0)
            .unwrap(),
    );
    MemoryStack::with_clock(ext, Settings::default(), Arc::new(clock))
}

/// Table writes of one task run to completion (intake's included).
async fn writes(steps: u32, step_secs: u64, progress_per_sec: u64) -> u64 {
    let stack = stack();
    let before = stack.tasks.writes();
    let event = json!({"action":"call","ext":"bench","user":"u","chat":"c","function":"work",
        "params":{"steps":steps,"step_secs":step_secs,"progress_per_sec":progress_per_sec}});
    let response = stack.intake(event).await;
    assert_eq!(response.status, 200, "{response:?}");
    stack.drain(50).await;
    let task = &stack.tasks.all()[0];
    assert_eq!(
        task.state,
        longrun::TaskState::Succeeded,
        "{:?}",
        task.result
    );
    stack.tasks.writes() - before
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("tokio runtime");
    let heartbeat = Settings::default().heartbeat;
    println!("DynamoDB writes per task (heartbeat {heartbeat:?}, steps of 10 s)");
    println!(
        "{:>6} {:>10} | {:>8} {:>8} {:>8} {:>8} {:>8} | {:>16} | {:>17}",
        "steps", "duration", "0/s", "1/s", "10/s", "100/s", "1000/s", "1000/s ÷ 1/s", "model (1/s)"
    );
    for steps in [1u32, 5, 20, 60] {
        let step_secs = 10;
        let rates = [0u64, 1, 10, 100, 1000];
        let counts: Vec<u64> = rates
            .iter()
            .map(|&r| runtime.block_on(writes(steps, step_secs, r)))
            .collect();
        let duration = u64::from(steps) * step_secs;
        // One write per step, and per heartbeat period one checkpoint plus the audit item of
        // the progress message it delivers.
        let model = u64::from(steps) + 2 * duration / heartbeat.as_secs();
        println!(
            "{:>6} {:>9}s | {:>8} {:>8} {:>8} {:>8} {:>8} | {:>16.2} | {:>17}",
            steps,
            duration,
            counts[0],
            counts[1],
            counts[2],
            counts[3],
            counts[4],
            counts[4] as f64 / counts[1] as f64,
            model
        );
    }
    println!(
        "0/s: heartbeats only. Writes include intake's, the steps, the checkpoints and one audit"
    );
    println!(
        "item per delivered chat message. 1000/s ÷ 1/s = 1.00: writes do not grow with the progress rate."
    );
}
