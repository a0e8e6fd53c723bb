//! Test support: an extension whose functions misbehave on purpose, a stack on tokio's paused
//! clock, and a server that hangs while recording whether its connection was dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::TimeZone;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::stack::MemoryStack;
use crate::ports::TokioClock;
use crate::task::{AuditKind, Task, TaskId};
use crate::wire::{ChatMessage, IntakeResponse};
use crate::{ActionResult, BackgroundOptions, ChatFunction, Ctx, Extension, Job, Settings};

pub const EXT: &str = "test-ext";

#[derive(Debug, Default, Deserialize, Serialize, JsonSchema)]
pub struct Params {
    #[serde(default)]
    pub input: String,
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub pct: i64,
    #[serde(default)]
    pub n: u32,
    /// `http`: how long to wait before its progress call and the AI call.
    #[serde(default)]
    pub delay_ms: u64,
    /// `chunks`: each step's duration in ms (else `n` steps of 10 s); `quiet`: each silence
    /// after a progress call.
    #[serde(default)]
    pub steps_ms: Vec<u64>,
}

/// Counts handler runs, by function, and step bodies, by step name.
#[derive(Default)]
pub struct Runs {
    pub started: AtomicUsize,
    pub step_bodies: std::sync::Mutex<std::collections::BTreeMap<String, usize>>,
    /// Flips the step names of `unstable` (a handler whose control flow changed).
    pub flipped: AtomicBool,
    /// How many times `retry_step`'s flaky step body ran.
    pub flaky_runs: AtomicUsize,
    /// How many checks `poller` made.
    pub checks: AtomicUsize,
    /// The stops `sleeper` and `poller`'s `on_stop` hook saw, with the step output it found.
    pub stops: std::sync::Mutex<Vec<(crate::StopReason, Option<String>)>>,
}

impl Runs {
    pub fn step_runs(&self, name: &str) -> usize {
        self.step_bodies
            .lock()
            .unwrap()
            .get(name)
            .copied()
            .unwrap_or(0)
    }
}

pub fn extension(runs: Arc<Runs>) -> Extension {
    let r = Arc::clone(&runs);
    let chunks = Arc::clone(&runs);
    let unstable = Arc::clone(&runs);
    let flaky = Arc::clone(&runs);
    let flaky_poll = Arc::clone(&runs);
    let sleeper = Arc::clone(&runs);
    let poller = Arc::clone(&runs);
    let stop_hook = |runs: Arc<Runs>| {
        move |_ctx: Ctx, stopped: crate::Stopped| {
            let runs = Arc::clone(&runs);
            async move {
                let started: Option<String> = stopped.step("start");
                runs.stops.lock().unwrap().push((stopped.reason, started));
                Ok(())
            }
        }
    };
    let sleeper_stops = stop_hook(Arc::clone(&runs));
    let poller_stops = stop_hook(Arc::clone(&runs));
    Extension::new(EXT)
        .budget("tokens", 100, "test tokens")
        .function(ChatFunction::new(
            "sync",
            |_ctx: Ctx, p: Params| async move {
                Ok(ActionResult::success(
                    "done inline",
                    json!({"echo": p.input}),
                ))
            },
        ))
        .function(
            ChatFunction::new("bg", move |ctx: Ctx, p: Params| {
                let r = Arc::clone(&r);
                async move {
                    r.started.fetch_add(1, Ordering::SeqCst);
                    ctx.progress(10, "Fetching context").await?;
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    ctx.progress(50, "Generating").await?;
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    Ok(ActionResult::success(
                        "Background done",
                        json!({"echo": p.input}),
                    ))
                }
            })
            .event("bg_done")
            .background(true),
        )
        .function(
            ChatFunction::new("chunks", move |ctx: Ctx, p: Params| {
                let runs = Arc::clone(&chunks);
                async move {
                    let durations: Vec<Duration> = if p.steps_ms.is_empty() {
                        vec![Duration::from_secs(10); p.n as usize]
                    } else {
                        p.steps_ms
                            .iter()
                            .map(|ms| Duration::from_millis(*ms))
                            .collect()
                    };
                    let n = durations.len() as u32;
                    let mut out = Vec::new();
                    for (i, took) in (0..n).zip(durations) {
                        let name = format!("chunk-{i}");
                        let runs = Arc::clone(&runs);
                        let body_name = name.clone();
                        let text: String = ctx
                            .step(&name, async move {
                                let run = {
                                    let mut bodies = runs.step_bodies.lock().unwrap();
                                    let count = bodies.entry(body_name).or_default();
                                    *count += 1;
                                    *count
                                };
                                tokio::time::sleep(took).await;
                                format!("refined {i} (run {run})")
                            })
                            .await?;
                        out.push(text);
                        ctx.partial(json!({"chunks": out})).await?;
                        ctx.progress(
                            i64::from((i + 1) * 100 / n.max(1)),
                            format!("chunk {} of {}", i + 1, n),
                        )
                        .await?;
                    }
                    Ok(ActionResult::success(
                        "all chunks refined",
                        json!({"chunks": out}),
                    ))
                }
            })
            .background(true)
            .long_running(true),
        )
        .function(
            ChatFunction::new("unstable", move |ctx: Ctx, _p: Params| {
                let runs = Arc::clone(&unstable);
                async move {
                    let second = if runs.flipped.load(Ordering::SeqCst) {
                        "other"
                    } else {
                        "second"
                    };
                    ctx.step("first", async {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        1
                    })
                    .await?;
                    ctx.step(second, async {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        2
                    })
                    .await?;
                    ctx.step("third", async {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        3
                    })
                    .await?;
                    Ok(ActionResult::success("stable after all", ()))
                }
            })
            .background(true)
            .long_running(true),
        )
        .function(
            // Retries a step that timed out the first time, then works for 25 s.
            ChatFunction::new("retry_step", move |ctx: Ctx, _p: Params| {
                let runs = Arc::clone(&flaky);
                async move {
                    let first = loop {
                        let runs = Arc::clone(&runs);
                        let attempt = ctx
                            .step("flaky", async move {
                                if runs.flaky_runs.fetch_add(1, Ordering::SeqCst) == 0 {
                                    std::future::pending::<()>().await;
                                }
                                1
                            })
                            .await;
                        match attempt {
                            Ok(value) => break value,
                            Err(crate::StepError::TimedOut { .. }) => continue,
                            Err(err) => return Err(err.into()),
                        }
                    };
                    let second = ctx.step("after", async { 2 }).await?;
                    let third = ctx
                        .step("slow", async {
                            tokio::time::sleep(Duration::from_secs(25)).await;
                            3
                        })
                        .await?;
                    Ok(ActionResult::success(
                        "retried",
                        json!({"sum": first + second + third}),
                    ))
                }
            })
            .background(true)
            .long_running(true),
        )
        .function(
            // A step, a durable sleep of `delay_ms`, a step: counts its runs in `started`.
            ChatFunction::new("sleeper", move |ctx: Ctx, p: Params| {
                let runs = Arc::clone(&sleeper);
                async move {
                    runs.started.fetch_add(1, Ordering::SeqCst);
                    let job: String = ctx.step("start", async { "job-1".to_owned() }).await?;
                    ctx.progress(10, "Started").await?;
                    ctx.partial(json!({"job": job})).await?;
                    ctx.sleep(Duration::from_millis(p.delay_ms)).await?;
                    ctx.progress(60, "Woke up").await?;
                    let done: u32 = ctx.step("finish", async { 2 }).await?;
                    Ok(ActionResult::success(
                        "slept",
                        json!({"job": job, "done": done}),
                    ))
                }
            })
            .background(true)
            .long_running(true)
            .on_stop(sleeper_stops),
        )
        .function(
            // Starts a job, then polls it every `delay_ms` until the `n`-th check finds it
            // done; each check reports progress.
            ChatFunction::new("poller", move |ctx: Ctx, p: Params| {
                let runs = Arc::clone(&poller);
                async move {
                    runs.started.fetch_add(1, Ordering::SeqCst);
                    let job: String = ctx.step("start", async { "job-2".to_owned() }).await?;
                    let every = Duration::from_millis(p.delay_ms);
                    let checks = ctx
                        .poll("wait", every, || {
                            let runs = Arc::clone(&runs);
                            let ctx = ctx.clone();
                            async move {
                                let n = runs.checks.fetch_add(1, Ordering::SeqCst) + 1;
                                let _ = ctx.progress(20, "Waiting on the provider").await;
                                if n >= p.n as usize {
                                    crate::Check::Done(n)
                                } else {
                                    crate::Check::Pending
                                }
                            }
                        })
                        .await?;
                    Ok(ActionResult::success(
                        "polled",
                        json!({"job": job, "checks": checks}),
                    ))
                }
            })
            .background(true)
            .on_stop(poller_stops),
        )
        .function(
            // Works for an hour; its stop hook never returns.
            ChatFunction::new("stubborn", |ctx: Ctx, _p: Params| async move {
                ctx.progress(1, "Starting").await?;
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(ActionResult::success("done", ()))
            })
            .background(true)
            .on_stop(|_ctx: Ctx, _stopped: crate::Stopped| async move {
                std::future::pending::<()>().await;
                Ok(())
            }),
        )
        .function(
            // Polls with a check that hangs past the step budget the first time; retries the
            // poll, then takes one step.
            ChatFunction::new("retry_poll", move |ctx: Ctx, _p: Params| {
                let runs = Arc::clone(&flaky_poll);
                async move {
                    let first: u32 = loop {
                        let runs = Arc::clone(&runs);
                        let attempt = ctx
                            .poll("flaky", Duration::from_secs(5), move || {
                                let runs = Arc::clone(&runs);
                                async move {
                                    if runs.flaky_runs.fetch_add(1, Ordering::SeqCst) == 0 {
                                        std::future::pending::<()>().await;
                                    }
                                    crate::Check::Done(1)
                                }
                            })
                            .await;
                        match attempt {
                            Ok(value) => break value,
                            Err(crate::StepError::TimedOut { .. }) => continue,
                            Err(err) => return Err(err.into()),
                        }
                    };
                    let second: u32 = ctx.step("after", async { 2 }).await?;
                    Ok(ActionResult::success(
                        "retried",
                        json!({"sum": first + second}),
                    ))
                }
            })
            .background(true)
            .long_running(true),
        )
        .function(
            ChatFunction::new("big_step", |ctx: Ctx, _p: Params| async move {
                let blob: String = ctx.step("big", async { "x".repeat(400 * 1024) }).await?;
                Ok(ActionResult::success(format!("{} bytes", blob.len()), ()))
            })
            .background(true),
        )
        .function(
            ChatFunction::new("sleepy", |ctx: Ctx, _p: Params| async move {
                ctx.progress(1, "Starting").await?;
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(ActionResult::success("woke up", ()))
            })
            .background(true),
        )
        .function(
            // Records a partial result after each of `n` seconds of work, silently (no progress
            // calls), then hangs until its cap.
            ChatFunction::new("partial", |ctx: Ctx, p: Params| async move {
                for done in 1..=p.n {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    ctx.partial(json!({"done": done})).await?;
                }
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(ActionResult::success("never", ()))
            })
            .background(true),
        )
        .function(
            // Turns the cancellation it sees into an error of its own making.
            ChatFunction::new("swallow", |ctx: Ctx, _p: Params| async move {
                for i in 0..100 {
                    if let Err(seen) = ctx.progress(i, "working").await {
                        return Err(crate::Error::msg(format!("gave up: {seen}")));
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Ok(ActionResult::success("done", ()))
            })
            .background(true),
        )
        .function(ChatFunction::new("quiet", quiet).background(true))
        .function(ChatFunction::new(
            "spend",
            |ctx: Ctx, p: Params| async move {
                let used = ctx.charge("tokens", u64::from(p.n)).await?;
                Ok(ActionResult::success("spent", json!({"used": used})))
            },
        ))
        .function(
            // Charges `n`, then works 30 s before answering.
            ChatFunction::new("spend_bg", |ctx: Ctx, p: Params| async move {
                let used = ctx.charge("tokens", u64::from(p.n)).await?;
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(ActionResult::success("spent", json!({"used": used})))
            })
            .background(true),
        )
        .function(
            ChatFunction::new("hushed", quiet)
                .background(true)
                .stall_notice(None),
        )
        .function(
            ChatFunction::new("ticker", |ctx: Ctx, _p: Params| async move {
                for i in 0..100 {
                    ctx.progress(i, format!("step {i}")).await?;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Ok(ActionResult::success("ticked", ()))
            })
            .background(true),
        )
        .function(
            ChatFunction::new("burst", |ctx: Ctx, p: Params| async move {
                for i in 0..p.n {
                    ctx.progress(i64::from(i % 101), format!("burst {i}"))
                        .await?;
                }
                ctx.progress(100, "burst done").await?;
                Ok(ActionResult::success("burst", ()))
            })
            .background(true),
        )
        .function(
            ChatFunction::new("http", |ctx: Ctx, p: Params| async move {
                tokio::time::sleep(Duration::from_millis(p.delay_ms)).await;
                ctx.progress(5, "Calling the AI").await?;
                let response = ctx
                    .http
                    .post(&p.url)
                    .timeout(Duration::from_secs(120))
                    .send()
                    .await?;
                Ok(ActionResult::success(
                    format!("AI said {}", response.status()),
                    (),
                ))
            })
            .background(true),
        )
        .function(
            ChatFunction::new("fails", |_ctx: Ctx, _p: Params| async move {
                Err::<ActionResult, _>(crate::Error::msg("upstream exploded"))
            })
            .background(true),
        )
        .function(
            ChatFunction::new("panics", |_ctx: Ctx, _p: Params| async move {
                if true {
                    panic!("handler bug");
                }
                Ok(ActionResult::success("unreachable", ()))
            })
            .background(true),
        )
        .function(
            ChatFunction::new("bad_progress", |ctx: Ctx, p: Params| async move {
                match ctx.progress(p.pct, "odd").await {
                    Err(err) => Ok(ActionResult::error(err.to_string(), false)),
                    Ok(()) => Ok(ActionResult::success("accepted", ())),
                }
            })
            .background(true),
        )
        .function(
            ChatFunction::new("huge", |_ctx: Ctx, _p: Params| async move {
                Ok(ActionResult::success(
                    "huge",
                    json!({"blob": "x".repeat(200 * 1024)}),
                ))
            })
            .background(true),
        )
        .function(
            // Valid JSON that DynamoDB cannot store, as a result and as a step output.
            ChatFunction::new("unstorable", |ctx: Ctx, p: Params| async move {
                if p.input == "in_step" {
                    ctx.step("big_number", async { json!({"x": 1e300}) })
                        .await?;
                }
                Ok(ActionResult::success("done", json!({"x": 1e300})))
            })
            .background(true),
        )
        .function(
            ChatFunction::new("launch", |ctx: Ctx, p: Params| async move {
                let task_id = ctx
                    .background_task(
                        "job",
                        &json!({"input": p.input}),
                        BackgroundOptions::default().name("the job"),
                    )
                    .await?;
                Ok(ActionResult::success(
                    "Got it — working on it.",
                    json!({"task_id": task_id}),
                ))
            })
            .event("launched"),
        )
        .function(ChatFunction::new(
            "launch_bad",
            |ctx: Ctx, _p: Params| async move {
                match ctx
                    .background_task("job", &json!({"input": 5}), BackgroundOptions::default())
                    .await
                {
                    Err(err) => Ok(ActionResult::error(err.to_string(), false)),
                    Ok(id) => Ok(ActionResult::success("launched", json!({"task_id": id}))),
                }
            },
        ))
        .job(
            Job::new("job", |ctx: Ctx, p: Params| async move {
                ctx.progress(50, "Job halfway").await?;
                Ok(ActionResult::success("Job done", json!({"echo": p.input})))
            })
            .event("job_done"),
        )
        .job(Job::new("huge_job", |_ctx: Ctx, _p: Value| async move {
            Ok(ActionResult::success("unused", ()))
        }))
}

/// A stack for the test extension on tokio's (paused) clock.
pub fn stack() -> (MemoryStack, Arc<Runs>) {
    stack_with(Settings::default())
}

pub fn stack_with(settings: Settings) -> (MemoryStack, Arc<Runs>) {
    let runs = Arc::new(Runs::default());
    let clock = TokioClock::starting_at(
        chrono::Utc
            .with_ymd_and_hms(2026, 11, 25, 12, 0, 0)
            .unwrap(),
    );
    (
        MemoryStack::with_clock(extension(Arc::clone(&runs)), settings, Arc::new(clock)),
        runs,
    )
}

pub fn call_event(function: &str, user: &str, params: Value) -> Value {
    json!({"action":"call","ext":EXT,"user":user,"chat":format!("chat-{user}"),"function":function,"params":params})
}

pub fn task_id_of(response: &IntakeResponse) -> TaskId {
    let result = response.result.as_ref().expect("a result");
    serde_json::from_value(result.data.as_ref().expect("data")["task_id"].clone())
        .expect("a task id")
}

/// A Pattern C job run to its end by a worker, its result message waiting for delivery.
pub async fn finished_job(stack: &MemoryStack) -> TaskId {
    let task_id = task_id_of(&stack.intake(call_event("launch", "u1", json!({}))).await);
    while stack.work_once().await > 0 {}
    task_id
}

/// `quiet` and `hushed`: a progress call, then a silence, for each of `steps_ms`.
async fn quiet(ctx: Ctx, p: Params) -> crate::Result<ActionResult> {
    for (i, ms) in p.steps_ms.iter().enumerate() {
        ctx.progress(i64::try_from(i + 1).unwrap_or(0) * 10, format!("part {i}"))
            .await?;
        tokio::time::sleep(Duration::from_millis(*ms)).await;
    }
    Ok(ActionResult::success("spoke at last", ()))
}

pub async fn task(stack: &MemoryStack, id: &TaskId) -> Task {
    use crate::ports::TaskStore;
    stack.tasks.get(id).await.unwrap().expect("task exists")
}

pub fn results_in(stack: &MemoryStack, chat: &str) -> Vec<ActionResult> {
    stack
        .chat
        .in_chat(chat)
        .into_iter()
        .filter_map(|m| match m {
            ChatMessage::Result { result, .. } => Some(result),
            ChatMessage::Progress { .. } => None,
        })
        .collect()
}

pub fn progress_in(stack: &MemoryStack, chat: &str) -> Vec<u8> {
    stack
        .chat
        .in_chat(chat)
        .into_iter()
        .filter_map(|m| match m {
            ChatMessage::Progress { progress, .. } => Some(progress.pct),
            ChatMessage::Result { .. } => None,
        })
        .collect()
}

pub async fn audit_kinds(stack: &MemoryStack, id: &TaskId) -> Vec<(AuditKind, String)> {
    use crate::ports::TaskStore;
    stack
        .tasks
        .audit_trail(id)
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.kind, a.audit_id))
        .collect()
}

pub fn count(kinds: &[(AuditKind, String)], kind: AuditKind) -> usize {
    kinds.iter().filter(|(k, _)| *k == kind).count()
}

/// A server that accepts connections and never answers; `dropped` turns true when the client
/// closes its connection.
pub async fn hanging_server() -> (String, Arc<AtomicBool>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/v1/chat/completions",
        listener.local_addr().unwrap()
    );
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&dropped);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let flag = Arc::clone(&flag);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            flag.store(true, Ordering::SeqCst);
                            return;
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    (url, dropped)
}
