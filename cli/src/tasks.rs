//! `longrun tasks`: what operators do with task records — list, show (with the audit trail),
//! cancel and retry.

use clap::{Args, Subcommand};
use longrun::task::{AuditItem, Task, TaskId, TaskState};

use crate::cli::{AwsArgs, Failure};

/// The subcommands of `longrun tasks`.
#[derive(Debug, Subcommand)]
pub enum TasksCommand {
    /// A user's tasks, newest first.
    List(ListArgs),
    /// One task: record, progress, timings and its whole audit trail.
    Show(IdArgs),
    /// Cancel a task: a queued one ends at once, a sleeping one is woken to end now, a
    /// running one ends at its next heartbeat.
    Cancel(IdArgs),
    /// Run a finished task again as a new task (same user, chat, function and params).
    Retry(IdArgs),
}

/// The arguments of `longrun tasks list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// The extension.
    #[arg(long)]
    pub ext: String,
    /// The user whose tasks to list.
    #[arg(long)]
    pub user: String,
    /// Only tasks in this state (queued, running, sleeping, succeeded, failed, cancelled,
    /// timed_out).
    #[arg(long)]
    pub state: Option<TaskState>,
    /// Fetch at most this many of the newest tasks (clamped to 1–1000); --state filters those.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// JSON for scripts instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The arguments of `longrun tasks show`, `cancel` and `retry`.
#[derive(Debug, Args)]
pub struct IdArgs {
    /// The task id (a ULID).
    pub task_id: TaskId,
    /// JSON for scripts instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Lists, shows, cancels or retries tasks in the deployment's task table.
pub async fn run(aws: &AwsArgs, command: TasksCommand) -> Result<(), Failure> {
    let (rt, _, _) = crate::aws::deployment(aws).await?;
    let store = &rt.services.tasks;
    match command {
        TasksCommand::List(args) => {
            let mut tasks = store
                .list_by_user(&args.ext, &args.user, args.limit.clamp(1, 1000))
                .await?;
            if let Some(state) = args.state {
                tasks.retain(|t| t.state == state);
            }
            if args.json {
                print_json(&tasks)?;
            } else {
                print_table(&tasks);
            }
        }
        TasksCommand::Show(args) => {
            let task = get(&rt, &args.task_id).await?;
            let audit = store.audit_trail(&args.task_id).await?;
            if args.json {
                print_json(&serde_json::json!({"task": task, "audit": audit}))?;
            } else {
                print_task(&task, &audit);
            }
        }
        TasksCommand::Cancel(args) => {
            let task = get(&rt, &args.task_id).await?;
            let task = longrun::intake::cancel_task(&rt, task).await?;
            if args.json {
                print_json(&task)?;
            } else {
                let note = match task.state {
                    TaskState::Running => {
                        " (cancel requested; the worker stops it at its next heartbeat)"
                    }
                    TaskState::Sleeping => " (cancel requested; woken to end now)",
                    _ => "",
                };
                println!("{} {}{note}", task.task_id, task.state);
            }
        }
        TasksCommand::Retry(args) => {
            let task = get(&rt, &args.task_id).await?;
            if !task.state.is_terminal() {
                return Err(Failure::Conflict(format!(
                    "task {} is still {}; only a finished task can be retried",
                    task.task_id, task.state
                )));
            }
            let new_id = rt.resubmit(&task).await?;
            if args.json {
                print_json(&serde_json::json!({"task_id": new_id, "retry_of": task.task_id}))?;
            } else {
                println!("{new_id} queued (retry of {})", task.task_id);
            }
        }
    }
    Ok(())
}

async fn get(rt: &longrun::Runtime, id: &TaskId) -> Result<Task, Failure> {
    rt.services
        .tasks
        .get(id)
        .await?
        .ok_or_else(|| Failure::NotFound(format!("no task {id}")))
}

fn print_json(value: &impl longrun::serde::Serialize) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Failure::Other(e.to_string()))?;
    println!("{text}");
    Ok(())
}

fn time(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

fn print_table(tasks: &[Task]) {
    println!(
        "{:<26}  {:<10}  {:<20}  {:>4}  {:>7}  {:<19}  SUMMARY",
        "TASK", "STATE", "FUNCTION", "PCT", "ATTEMPT", "CREATED"
    );
    for t in tasks {
        let summary = t
            .result
            .as_ref()
            .map(|r| r.summary.as_str())
            .unwrap_or(t.progress.message.as_str());
        println!(
            "{:<26}  {:<10}  {:<20}  {:>4}  {:>7}  {:<19}  {}",
            t.task_id,
            t.state.as_str(),
            t.function,
            t.progress.pct,
            t.attempt,
            time(Some(t.created_at)),
            summary
        );
    }
}

fn print_task(t: &Task, audit: &[AuditItem]) {
    println!("task       {}", t.task_id);
    println!("owner      {} / {} (chat {})", t.ext, t.user, t.chat);
    println!(
        "function   {} ({:?}){}",
        t.function,
        t.kind,
        t.name
            .as_ref()
            .map(|n| format!(" \"{n}\""))
            .unwrap_or_default()
    );
    println!(
        "state      {}{}",
        t.state,
        if t.cancel_requested {
            " (cancel requested)"
        } else {
            ""
        }
    );
    println!("progress   {}% {}", t.progress.pct, t.progress.message);
    println!("attempt    {} (cap {} s)", t.attempt, t.cap_s);
    println!("created    {}", time(Some(t.created_at)));
    println!("started    {}", time(t.started_at));
    println!("heartbeat  {}", time(t.heartbeat_at));
    if let Some(wake_at) = t.wake_at {
        println!("wakes      {}", time(Some(wake_at)));
    }
    println!("finished   {}", time(t.finished_at));
    println!("delivered  {}", time(t.delivered_at));
    if let Some(lease) = &t.lease {
        println!(
            "lease      {} until {}",
            lease.owner,
            time(Some(lease.until))
        );
    }
    if let Some(r) = &t.result {
        println!(
            "result     {} {}",
            if r.ok { "ok" } else { "error" },
            r.summary
        );
    }
    println!("audit");
    for a in audit {
        println!(
            "  {}  {:<16}  {:<28}  {}",
            time(Some(a.at)),
            format!("{:?}", a.kind).to_lowercase(),
            a.audit_id,
            a.detail
        );
    }
}
