//! `longrun call`: call a function as a chat platform would — one intake `call` event — print
//! the answer, and follow a background task (intake `status`, polled) with a progress bar to
//! its result. The intake is the local dev stack's (its `/api/intake`), or a deployed intake
//! function invoked by name through the Lambda Invoke API.
//!
//! Exit code 0 on an ok result, 1 on an error result (cancelled, failed and timed-out tasks
//! end with one), the usual codes otherwise.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use async_trait::async_trait;
use clap::Args;
use longrun::ActionResult;
use longrun::task::{Task, TaskId, TaskState};
use longrun::wire::{IntakeError, IntakeResponse};
use serde_json::{Value, json};

use crate::cli::{AwsArgs, Failure};
use longrun_dev::state::DevEndpoints;
use longrun_dev::transcript::{bar, result_detail};

/// How often a background task's status is asked for.
const POLL_EVERY: Duration = Duration::from_millis(500);
/// Status requests that may fail in a row before `call` gives up following.
const MAX_STATUS_FAILURES: u32 = 10;
/// How long `call` follows a task by default: the longest cap and two minutes.
const DEFAULT_WAIT: Duration = Duration::from_secs(1800 + 120);

/// The arguments of `longrun call`.
#[derive(Debug, Args)]
pub struct CallArgs {
    /// The function to call, e.g. refine, refine_output, start_refinement.
    pub function: String,
    /// The function's params, as JSON.
    #[arg(long, default_value = "{}")]
    pub params: String,
    /// The extension.
    #[arg(long, default_value = "text-tools")]
    pub ext: String,
    /// The calling user.
    #[arg(long, default_value = "dev-user")]
    pub user: String,
    /// The chat the call comes from (and the result goes to).
    #[arg(long, default_value = "dev-chat")]
    pub chat: String,
    /// The call's idempotency key [default: a fresh one]. Repeating it returns the same task.
    #[arg(long)]
    pub request_id: Option<String>,
    /// Invoke this deployed intake function (name or ARN) through the Lambda Invoke API —
    /// with --profile, --region, --endpoint-url as usual — instead of the local dev stack.
    #[arg(long, env = "LONGRUN_INTAKE_FUNCTION")]
    pub function_name: Option<String>,
    /// The dev stack's address [default: the running stack of --state-dir].
    #[arg(long, conflicts_with = "function_name")]
    pub url: Option<String>,
    /// Print the answer and exit; do not follow a background task.
    #[arg(long)]
    pub no_follow: bool,
    /// Print one JSON object for scripts instead of text: `{"response": <intake response>,
    /// "task": <the finished task, or null for an inline answer>}`.
    #[arg(long)]
    pub json: bool,
    /// Stop following after this many seconds (the task goes on) [default: 1920].
    #[arg(long)]
    pub wait_s: Option<u64>,
}

/// Where intake events go.
#[async_trait]
trait Intake: Send + Sync {
    async fn invoke(&self, event: &Value) -> Result<IntakeResponse, Failure>;
    fn describe(&self) -> String;
}

/// The dev stack's `/api/intake`.
struct DevIntake {
    http: reqwest::Client,
    url: String,
}

#[async_trait]
impl Intake for DevIntake {
    async fn invoke(&self, event: &Value) -> Result<IntakeResponse, Failure> {
        let response = self
            .http
            .post(format!("{}/api/intake", self.url))
            .json(event)
            .send()
            .await
            .map_err(|e| {
                Failure::Other(format!(
                    "cannot reach the dev stack at {}: {}",
                    self.url,
                    e.without_url()
                ))
            })?;
        let body = response
            .bytes()
            .await
            .map_err(|e| Failure::Other(format!("dev stack: {}", e.without_url())))?;
        serde_json::from_slice(&body).map_err(|e| {
            Failure::Other(format!(
                "dev stack answered something else than an intake response: {e}"
            ))
        })
    }

    fn describe(&self) -> String {
        format!("the dev stack at {}", self.url)
    }
}

/// A deployed intake function.
struct LambdaIntake {
    client: aws_sdk_lambda::Client,
    function: String,
}

#[async_trait]
impl Intake for LambdaIntake {
    async fn invoke(&self, event: &Value) -> Result<IntakeResponse, Failure> {
        use aws_sdk_lambda::error::{DisplayErrorContext, ProvideErrorMetadata};
        let payload = serde_json::to_vec(event).map_err(|e| Failure::Other(e.to_string()))?;
        let output = self
            .client
            .invoke()
            .function_name(&self.function)
            .payload(aws_sdk_lambda::primitives::Blob::new(payload))
            .send()
            .await
            .map_err(|e| {
                let text = format!(
                    "Lambda Invoke {}: {}",
                    self.function,
                    DisplayErrorContext(&e)
                );
                match e.code() {
                    Some("ResourceNotFoundException") => Failure::NotFound(text),
                    _ => Failure::Other(text),
                }
            })?;
        let body = output.payload().map(|b| b.as_ref()).unwrap_or_default();
        if let Some(kind) = output.function_error() {
            return Err(Failure::Other(format!(
                "the intake function {} failed ({kind}): {}",
                self.function,
                String::from_utf8_lossy(body)
                    .chars()
                    .take(500)
                    .collect::<String>()
            )));
        }
        serde_json::from_slice(body).map_err(|e| {
            Failure::Other(format!(
                "{} answered something else than an intake response: {e}",
                self.function
            ))
        })
    }

    fn describe(&self) -> String {
        format!("the Lambda function {}", self.function)
    }
}

async fn intake_for(aws: &AwsArgs, args: &CallArgs) -> Result<Box<dyn Intake>, Failure> {
    if let Some(function) = &args.function_name {
        if aws.local {
            return Err(Failure::Usage(
                "--function-name calls a deployed intake; it cannot be combined with --local"
                    .into(),
            ));
        }
        let sdk = crate::aws::sdk_config(aws).await;
        return Ok(Box::new(LambdaIntake {
            client: aws_sdk_lambda::Client::new(&sdk),
            function: function.clone(),
        }));
    }
    let url = match &args.url {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => DevEndpoints::running(&aws.state_dir).await?.chat_url,
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(240))
        .build()
        .map_err(|e| Failure::Other(e.to_string()))?;
    Ok(Box::new(DevIntake { http, url }))
}

/// An intake refusal as a command failure, with the exit code scripts expect.
fn refused(error: IntakeError, status: u16) -> Failure {
    let text = format!(
        "intake refused the call ({status} {}): {}",
        error.code, error.message
    );
    match status {
        400 | 413 | 422 => Failure::Usage(text),
        404 => Failure::NotFound(text),
        409 => Failure::Conflict(text),
        _ => Failure::Other(text),
    }
}

fn response_error(response: &IntakeResponse) -> Option<Failure> {
    response
        .error
        .clone()
        .map(|error| refused(error, response.status))
}

fn print_result(result: &ActionResult) {
    let mark = if result.ok { "✔" } else { "✖" };
    println!("{mark} {}", result.summary);
    if let Some(detail) = result_detail(result) {
        println!("{detail}");
    }
}

fn outcome(function: &str, result: &ActionResult) -> Result<(), Failure> {
    if result.ok {
        Ok(())
    } else {
        Err(Failure::Other(format!(
            "'{function}' ended with an error result"
        )))
    }
}

fn print_json(value: &impl serde::Serialize) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Failure::Other(e.to_string()))?;
    println!("{text}");
    Ok(())
}

/// Sends one intake `call` event, prints the answer and, for a background task, follows it
/// (unless `--no-follow`) to its result; `Err` on an error answer or result.
pub async fn run(aws: &AwsArgs, args: CallArgs) -> Result<(), Failure> {
    let params: Value = serde_json::from_str(&args.params)
        .map_err(|e| Failure::Usage(format!("--params is not JSON: {e}")))?;
    let intake = intake_for(aws, &args).await?;
    let request_id = args
        .request_id
        .clone()
        .unwrap_or_else(|| format!("cli-{}", ulid::Ulid::new()));
    if !args.json {
        eprintln!(
            "→ {} {}   ({} as {} in {}, via {})",
            args.function,
            params,
            args.ext,
            args.user,
            args.chat,
            intake.describe()
        );
    }
    let event = json!({
        "action": "call", "ext": args.ext, "user": args.user, "chat": args.chat,
        "request_id": request_id, "function": args.function, "params": params,
    });
    let response = intake.invoke(&event).await?;
    if let Some(failure) = response_error(&response) {
        if args.json {
            print_json(&json!({"response": response, "task": null}))?;
        }
        return Err(failure);
    }
    let Some(result) = response.result.clone() else {
        return Err(Failure::Other("intake answered without a result".into()));
    };
    let task_id = result
        .data
        .as_ref()
        .and_then(|d| d.get("task_id"))
        .and_then(|id| serde_json::from_value::<TaskId>(id.clone()).ok());
    let Some(task_id) = task_id else {
        // Answered inline (Pattern A, or C's fast path): this is the result.
        if args.json {
            print_json(&json!({"response": response, "task": null}))?;
        } else {
            print_result(&result);
        }
        return outcome(&args.function, &result);
    };
    if !args.json {
        println!("↩ {}   (task {task_id})", result.summary);
    }
    if args.no_follow {
        if args.json {
            print_json(&json!({"response": response, "task": null}))?;
        }
        return Ok(());
    }
    let wait = args.wait_s.map_or(DEFAULT_WAIT, Duration::from_secs);
    let task = follow(&*intake, &args, &task_id, wait).await?;
    let Some(final_result) = task.result.clone() else {
        return Err(Failure::Other(format!(
            "task {task_id} ended without a result"
        )));
    };
    if args.json {
        print_json(&json!({"response": response, "task": task}))?;
    } else {
        print_result(&final_result);
    }
    outcome(&args.function, &final_result)
}

/// Polls the task's status until it ends, drawing its progress on stderr.
async fn follow(
    intake: &dyn Intake,
    args: &CallArgs,
    task_id: &TaskId,
    wait: Duration,
) -> Result<Task, Failure> {
    let deadline = tokio::time::Instant::now() + wait;
    let status =
        json!({"action": "status", "ext": args.ext, "user": args.user, "task_id": task_id});
    let tty = std::io::stderr().is_terminal();
    let mut shown: Option<(TaskState, u8, String)> = None;
    let mut failures = 0;
    loop {
        match intake.invoke(&status).await {
            Ok(response) => {
                if let Some(failure) = response_error(&response) {
                    return Err(failure);
                }
                failures = 0;
                if let Some(task) = response.task {
                    let now = (task.state, task.progress.pct, task.progress.message.clone());
                    if !args.json && shown.as_ref() != Some(&now) && !task.state.is_terminal() {
                        let line = format!(
                            "  {} {} {}",
                            bar(task.progress.pct, 24),
                            task.state,
                            task.progress.message
                        );
                        if tty {
                            eprint!("\r\x1b[2K{line}");
                        } else {
                            eprintln!("{line}");
                        }
                        let _ = std::io::stderr().flush();
                        shown = Some(now);
                    }
                    if task.state.is_terminal() {
                        if tty && shown.is_some() {
                            eprintln!();
                        }
                        return Ok(task);
                    }
                }
            }
            Err(failure) => {
                failures += 1;
                if failures >= MAX_STATUS_FAILURES {
                    return Err(failure);
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            if tty {
                eprintln!();
            }
            return Err(Failure::Other(format!(
                "stopped following task {task_id} after {} s; it goes on (see `longrun tasks show {task_id}`)",
                wait.as_secs()
            )));
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}
