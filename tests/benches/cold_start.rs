//! Cold start: how long the release binary takes from exec to its first poll of the Lambda
//! Runtime API (init), as intake and as the worker, against a hello-world Rust Lambda measured
//! in the same run; and, so that a cost moved out of init is still seen, how long until it
//! has answered its first event.
//!
//! `cargo bench -p longrun-tests --bench cold_start`
//!
//! A stub Runtime API (a loopback HTTP/1.1 server) records when each process sends its first
//! `GET /2018-06-01/runtime/invocation/next` — the end of init as Lambda bills it — answers
//! it with one event, and records when the process posts the event's answer. The same server
//! plays DynamoDB (`LONGRUN_ENDPOINT_URL_DYNAMODB`) for what the first event needs: intake
//! gets the status of a task (one GetItem, answered "no such item"), the worker a work
//! message for it (one UpdateItem claim, answered "condition failed": the task is missing).
//! So the first answer includes building the SDK's HTTP connector and its TLS roots.
//!
//! The processes get the environment Lambda gives a function (`AWS_LAMBDA_*`, region,
//! session credentials) plus `template.yaml`'s variables, and nothing else: no
//! `SSL_CERT_FILE`/`SSL_CERT_DIR`, no `HOME`, as on Lambda. Each subject runs [`ROUNDS`] times
//! after [`WARM_UP`], interleaved so that the machine's noise falls on all of them alike; the
//! table gives medians and p90s and their ratios to the hello-world floor's.
//!
//! It builds `text-tools` in release (`cargo build --release -p text-tools-functions`); the
//! floor is this package's `hello-lambda` bin, which cargo builds with the bench (the release
//! profile too). Bounded: every run is capped at [`RUN_TIMEOUT`].
//!
//! `COLD_START_BASELINE=/path/to/text-tools` adds another build of the binary (an older
//! commit's, say) as intake and as the worker to the same run, for a before/after table.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

/// Measured runs of each subject, after the warm-up.
const ROUNDS: usize = 30;
/// Runs of each subject before measuring (page cache, CPU frequency).
const WARM_UP: usize = 3;
/// How long a process may take to poll and answer before the run counts as failed.
const RUN_TIMEOUT: Duration = Duration::from_secs(10);
/// The goal: intake's and the worker's median init within this many times the floor's.
const GOAL: f64 = 3.0;

/// What the Lambda service sets for every function (the runtime reads the `AWS_LAMBDA_*`
/// ones; dummy session credentials, as Lambda passes its role's).
const LAMBDA_ENV: &[(&str, &str)] = &[
    ("AWS_LAMBDA_FUNCTION_NAME", "cold-start-bench"),
    ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
    ("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/cold-start-bench"),
    (
        "AWS_LAMBDA_LOG_STREAM_NAME",
        "2026/12/05/[$LATEST]0123456789abcdef",
    ),
    ("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_DEFAULT_REGION", "us-east-1"),
    ("AWS_ACCESS_KEY_ID", "ASIABENCHNOTAREALKEY"),
    ("AWS_SECRET_ACCESS_KEY", "bench-not-a-real-secret"),
    ("AWS_SESSION_TOKEN", "bench-not-a-real-token"),
    ("AWS_EXECUTION_ENV", "AWS_Lambda_provided.al2023"),
    ("LAMBDA_TASK_ROOT", "/var/task"),
    ("LAMBDA_RUNTIME_DIR", "/var/runtime"),
    ("_HANDLER", "bootstrap"),
    ("TZ", ":UTC"),
    ("LANG", "en_US.UTF-8"),
    ("PATH", "/usr/local/bin:/usr/bin/:/bin:/opt/bin"),
];

/// `template.yaml`'s `Globals` environment with its defaults (the chat API and its token
/// secret set, as a deployment that posts has them). DynamoDB's endpoint is the stub's.
const TEMPLATE_ENV: &[(&str, &str)] = &[
    ("LONGRUN_TABLE", "longrun-TaskTable-1A2B3C"),
    (
        "LONGRUN_WORK_QUEUE_URL",
        "https://sqs.us-east-1.amazonaws.com/123456789012/longrun-WorkQueue-1A2B3C",
    ),
    (
        "LONGRUN_DELIVERY_QUEUE_URL",
        "https://sqs.us-east-1.amazonaws.com/123456789012/longrun-DeliveryQueue-1A2B3C",
    ),
    (
        "LONGRUN_WORK_DLQ_URL",
        "https://sqs.us-east-1.amazonaws.com/123456789012/longrun-WorkDlq-1A2B3C",
    ),
    (
        "LONGRUN_DELIVERY_DLQ_URL",
        "https://sqs.us-east-1.amazonaws.com/123456789012/longrun-DeliveryDlq-1A2B3C",
    ),
    ("LONGRUN_CHAT_API_URL", "https://chat.example.com/api"),
    ("LONGRUN_CHAT_TOKEN_SECRET", "longrun-delivery/chat-token"),
    ("LONGRUN_SECRETS_PREFIX", "longrun"),
    ("LONGRUN_TASK_TTL_DAYS", "30"),
    ("LONGRUN_MAX_ACTIVE_TASKS", "10"),
    ("RUST_LOG", "info"),
    ("LONGRUN_ENDPOINT_URL_SQS", ""),
    ("LONGRUN_ENDPOINT_URL_SECRETS_MANAGER", ""),
    ("OPENAI_BASE_URL", ""),
    ("OPENAI_MODEL", ""),
];

/// Intake's first event: the status of a task the table does not hold.
const STATUS_EVENT: &str =
    r#"{"action":"status","ext":"text-tools","user":"u1","task_id":"01M8997DG01YQ7K3ZC6M4T9H8P"}"#;

/// The worker's first event: a work message for that task (one record, as `events/`).
const WORK_EVENT: &str = r#"{"Records":[{"messageId":"00000000-0000-4000-8000-000000000000","receiptHandle":"r","body":"{\"cap_s\":180,\"chat\":\"c1\",\"created_at\":\"2026-11-25T12:00:00.000Z\",\"event\":\"text_refined\",\"ext\":\"text-tools\",\"function\":\"refine_output\",\"kind\":\"function\",\"name\":null,\"params\":{\"input\":\"x\"},\"request_id\":\"r-1\",\"task_id\":\"01M8997DG01YQ7K3ZC6M4T9H8P\",\"user\":\"u1\"}","attributes":{"ApproximateReceiveCount":"1"},"messageAttributes":{},"eventSource":"aws:sqs","eventSourceARN":"arn:aws:sqs:us-east-1:123456789012:longrun-WorkQueue-1A2B3C","awsRegion":"us-east-1"}]}"#;

/// One process to measure.
struct Subject {
    name: &'static str,
    binary: PathBuf,
    env: Vec<(&'static str, String)>,
    event: &'static str,
    /// Whether the goal applies (this build's intake and worker).
    judged: bool,
    runs: Vec<Run>,
}

/// What one run measured, from exec.
#[derive(Clone, Copy)]
struct Run {
    init: Duration,
    answer: Duration,
}

impl Subject {
    fn new(name: &'static str, binary: &Path, event: &'static str) -> Self {
        Self {
            name,
            binary: binary.to_owned(),
            env: env(LAMBDA_ENV),
            event,
            judged: false,
            runs: Vec::with_capacity(ROUNDS),
        }
    }

    /// As the function `role` of `template.yaml`, with `memory` MB.
    fn role(mut self, role: &'static str, memory: &'static str, dynamodb: &str) -> Self {
        self.env.extend(env(TEMPLATE_ENV));
        self.env.extend([
            ("LONGRUN_ROLE", role.to_owned()),
            ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", memory.to_owned()),
            ("LONGRUN_ENDPOINT_URL_DYNAMODB", dynamodb.to_owned()),
        ]);
        self
    }

    fn judged(self) -> Self {
        Self {
            judged: true,
            ..self
        }
    }
}

fn env(pairs: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

fn main() {
    let text_tools = match build_text_tools() {
        Ok(path) => path,
        Err(e) => {
            eprintln!("cold_start: {e}");
            std::process::exit(1);
        }
    };
    let hello = PathBuf::from(env!("CARGO_BIN_EXE_hello-lambda"));
    let api = RuntimeApiStub::start();
    let dynamodb = format!("http://{}", api.addr);
    let mut floor = Subject::new("hello-world (floor)", &hello, STATUS_EVENT);
    floor
        .env
        .push(("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256".to_owned()));
    let mut subjects = vec![
        floor,
        Subject::new("text-tools intake", &text_tools, STATUS_EVENT)
            .role("intake", "256", &dynamodb)
            .judged(),
        Subject::new("text-tools worker", &text_tools, WORK_EVENT)
            .role("worker", "512", &dynamodb)
            .judged(),
    ];
    if let Some(baseline) = std::env::var_os("COLD_START_BASELINE").filter(|p| !p.is_empty()) {
        let baseline = PathBuf::from(baseline);
        subjects.extend([
            Subject::new("baseline intake", &baseline, STATUS_EVENT)
                .role("intake", "256", &dynamodb),
            Subject::new("baseline worker", &baseline, WORK_EVENT).role("worker", "512", &dynamodb),
        ]);
    }
    for round in 0..WARM_UP + ROUNDS {
        for subject in &mut subjects {
            match api.run(subject) {
                Ok(run) if round >= WARM_UP => subject.runs.push(run),
                Ok(_) => {}
                Err(e) => {
                    eprintln!("cold_start: {}: {e}", subject.name);
                    std::process::exit(1);
                }
            }
        }
    }
    report(&subjects);
}

/// Builds the deployable binary as `sam build` does (release, its package's features alone).
fn build_text_tools() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .current_dir(longrun_tests::workspace_root())
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "text-tools-functions",
            "--bin",
            "text-tools",
        ])
        .status()
        .map_err(|e| format!("cannot run cargo build: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build of text-tools failed ({status})"));
    }
    Ok(longrun_tests::target_dir()
        .join("release")
        .join("text-tools"))
}

/// The Lambda Runtime API for one process at a time, and DynamoDB as far as a first event
/// needs it.
struct RuntimeApiStub {
    addr: SocketAddr,
    /// The event the next poll gets; later polls are held unanswered.
    event: Arc<Mutex<Option<&'static str>>>,
    seen: mpsc::Receiver<Seen>,
}

/// What the stub saw, when the request had fully arrived.
enum Seen {
    /// A poll for the next event; a held one keeps its connection here until dropped.
    Poll {
        at: Instant,
        _held: Option<TcpStream>,
    },
    /// The answer to the event, or its error (with the body).
    Answer(Instant, Result<(), String>),
}

impl RuntimeApiStub {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let addr = listener.local_addr().expect("the stub's address");
        let event = Arc::new(Mutex::new(None));
        let (tx, seen) = mpsc::channel();
        let next = Arc::clone(&event);
        std::thread::spawn(move || {
            for connection in listener.incoming().flatten() {
                let (tx, next) = (tx.clone(), Arc::clone(&next));
                std::thread::spawn(move || serve(connection, &tx, &next));
            }
        });
        Self { addr, event, seen }
    }

    /// Execs `subject`, waits for its first poll and its answer; the process is killed
    /// either way.
    fn run(&self, subject: &Subject) -> Result<Run, String> {
        while self.seen.try_recv().is_ok() {} // anything a killed process left behind
        *self.event.lock().expect("the event slot") = Some(subject.event);
        let started = Instant::now();
        let mut child = Command::new(&subject.binary)
            .env_clear()
            .envs(subject.env.iter().map(|(k, v)| (k, v)))
            .env("AWS_LAMBDA_RUNTIME_API", self.addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot exec {}: {e}", subject.binary.display()))?;
        let outcome = self.watch(&mut child, started);
        let _ = child.kill();
        let stderr = child
            .stderr
            .take()
            .map(|pipe| std::io::read_to_string(pipe).unwrap_or_default())
            .unwrap_or_default();
        let _ = child.wait();
        outcome.map_err(|e| format!("{e}; its stderr: {}", stderr.trim()))
    }

    fn watch(&self, child: &mut Child, started: Instant) -> Result<Run, String> {
        let mut init = None;
        loop {
            match self.seen.recv_timeout(Duration::from_millis(20)) {
                Ok(Seen::Poll { at, .. }) => {
                    init.get_or_insert(at.duration_since(started));
                }
                Ok(Seen::Answer(at, answer)) => {
                    answer.map_err(|body| format!("it answered with an error: {body}"))?;
                    let init = init.ok_or("it answered before polling")?;
                    let answer = at.duration_since(started);
                    return Ok(Run { init, answer });
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err("the stub Runtime API stopped".into());
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("it exited before answering ({status})"));
            }
            if started.elapsed() > RUN_TIMEOUT {
                return Err(format!("no poll and answer within {RUN_TIMEOUT:?}"));
            }
        }
    }
}

const NEXT_INVOCATION: &str = "/2018-06-01/runtime/invocation/next";
const REQUEST_ID: &str = "cold-start-request-1";

/// One connection: requests in turn until the peer goes away or a poll is held.
fn serve(connection: TcpStream, seen: &mpsc::Sender<Seen>, next: &Mutex<Option<&'static str>>) {
    let Ok(mut reader) = connection.try_clone().map(BufReader::new) else {
        return;
    };
    let mut writer = connection;
    while let Some(request) = read_request(&mut reader) {
        let at = Instant::now();
        let response = if request.method == "GET" && request.path == NEXT_INVOCATION {
            let Some(event) = next.lock().ok().and_then(|mut slot| slot.take()) else {
                let _ = seen.send(Seen::Poll {
                    at,
                    _held: Some(writer),
                });
                return;
            };
            let _ = seen.send(Seen::Poll { at, _held: None });
            event_response(event)
        } else if let Some(rest) = request.path.strip_prefix("/2018-06-01/runtime/invocation/") {
            let answer = if rest.ends_with("/response") {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&request.body).into_owned())
            };
            let _ = seen.send(Seen::Answer(at, answer));
            response(202, "application/json", &[], "{}")
        } else {
            dynamodb_response(request.headers.get("x-amz-target").map(String::as_str))
        };
        if writer.write_all(&response).is_err() {
            return;
        }
    }
}

/// A request as the stub needs it: method, path, lower-case headers, body.
struct Request {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// Reads one request; `None` once the peer has gone away.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut headers = BTreeMap::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 {
            return None;
        }
        if header == "\r\n" {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
    }
    let length = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

/// The next invocation: `event`, with the headers the runtime reads.
fn event_response(event: &str) -> Vec<u8> {
    let deadline = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        + Duration::from_secs(60);
    let headers = [
        ("Lambda-Runtime-Aws-Request-Id", REQUEST_ID.to_owned()),
        (
            "Lambda-Runtime-Deadline-Ms",
            deadline.as_millis().to_string(),
        ),
        (
            "Lambda-Runtime-Invoked-Function-Arn",
            "arn:aws:lambda:us-east-1:123456789012:function:cold-start-bench".to_owned(),
        ),
    ];
    response(200, "application/json", &headers, event)
}

/// DynamoDB's answer to what a first event asks: no such item (GetItem), the condition
/// failed with nothing to return (UpdateItem: the task is missing), else an empty success.
fn dynamodb_response(target: Option<&str>) -> Vec<u8> {
    const JSON: &str = "application/x-amz-json-1.0";
    match target {
        Some("DynamoDB_20120810.UpdateItem") => response(
            400,
            JSON,
            &[],
            r#"{"__type":"com.amazonaws.dynamodb.v20120810#ConditionalCheckFailedException","message":"The conditional request failed"}"#,
        ),
        _ => response(200, JSON, &[], "{}"),
    }
}

fn response(status: u16, content_type: &str, headers: &[(&str, String)], body: &str) -> Vec<u8> {
    let reason = if status < 300 { "OK" } else { "Bad Request" };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    bytes
}

/// The value at quantile `q` (nearest rank) of sorted `runs`.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Median and p90 of one measure of `runs`.
fn spread(runs: &[Run], measure: fn(&Run) -> Duration) -> (Duration, Duration) {
    let mut values: Vec<Duration> = runs.iter().map(measure).collect();
    values.sort();
    (quantile(&values, 0.5), quantile(&values, 0.9))
}

fn report(subjects: &[Subject]) {
    let init: Vec<_> = subjects
        .iter()
        .map(|s| spread(&s.runs, |r| r.init))
        .collect();
    let answer: Vec<_> = subjects
        .iter()
        .map(|s| spread(&s.runs, |r| r.answer))
        .collect();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let ratio = |d: Duration, floor: Duration| ms(d) / ms(floor);
    println!(
        "cold start from exec: init = first poll of the Runtime API, answer = first event \
         answered ({ROUNDS} runs each after {WARM_UP} warm-up, interleaved)"
    );
    println!("  {}", machine());
    let mut binaries: Vec<&Path> = subjects.iter().map(|s| s.binary.as_path()).collect();
    binaries.dedup();
    for path in binaries {
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        println!("  {}: {:.2} MB", path.display(), size as f64 / 1e6);
    }
    println!();
    println!(
        "| {:<19} | {:>11} | {:>9} | {:>7} | {:>13} | {:>11} | {:>7} |",
        "", "init median", "p90", "÷ floor", "answer median", "p90", "÷ floor"
    );
    println!(
        "|{:-<21}|{:->13}|{:->11}|{:->9}|{:->15}|{:->13}|{:->9}|",
        "", "", "", "", "", "", ""
    );
    for (i, subject) in subjects.iter().enumerate() {
        println!(
            "| {:<19} | {:>8.2} ms | {:>6.2} ms | {:>6.2}× | {:>10.2} ms | {:>8.2} ms | {:>6.2}× |",
            subject.name,
            ms(init[i].0),
            ms(init[i].1),
            ratio(init[i].0, init[0].0),
            ms(answer[i].0),
            ms(answer[i].1),
            ratio(answer[i].0, answer[0].0),
        );
    }
    let worst = subjects
        .iter()
        .zip(&init)
        .filter(|(subject, _)| subject.judged)
        .map(|(_, (median, _))| ratio(*median, init[0].0))
        .fold(0.0, f64::max);
    println!();
    println!(
        "goal: intake's and the worker's init ≤ {GOAL:.1}× the floor's at the median — {} \
         (worst {worst:.2}×)",
        if worst <= GOAL { "met" } else { "NOT met" }
    );
}

/// The CPU model and the cores this process may use.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}")
}
