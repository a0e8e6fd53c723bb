//! Cold start: how long the release binary takes from exec to its first poll of the Lambda
//! Runtime API, as intake and as the worker, against a hello-world Rust Lambda measured in the
//! same run.
//!
//! `cargo bench -p longrun-tests --bench cold_start`
//!
//! A stub Runtime API (a loopback listener) records when each process sends its first
//! `GET /2018-06-01/runtime/invocation/next`; that moment is the end of init as Lambda bills
//! it. The processes get the environment Lambda gives a function (`AWS_LAMBDA_*`, region,
//! session credentials) plus `template.yaml`'s variables, and nothing else: no
//! `SSL_CERT_FILE`/`SSL_CERT_DIR`, no `HOME`, as on Lambda. Each subject runs [`ROUNDS`] times
//! after [`WARM_UP`], interleaved so that the machine's noise falls on all of them alike; the
//! table gives the median and p90 and their ratio to the hello-world floor.
//!
//! It builds `text-tools` in release (`cargo build --release -p text-tools-functions`); the
//! floor is this package's `hello-lambda` bin, which cargo builds with the bench (the release
//! profile too). Bounded: every wait for a poll is capped at [`POLL_TIMEOUT`].
//!
//! `COLD_START_BASELINE=/path/to/text-tools` adds another build of the binary (an older
//! commit's, say) as intake and as the worker to the same run, for a before/after table.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Measured runs of each subject, after the warm-up.
const ROUNDS: usize = 30;
/// Runs of each subject before measuring (page cache, CPU frequency).
const WARM_UP: usize = 3;
/// How long a process may take to poll before the run counts as failed.
const POLL_TIMEOUT: Duration = Duration::from_secs(10);
/// The goal: intake's and the worker's median within this many times the floor's.
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
/// secret set, as a deployment that posts has them).
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
    ("LONGRUN_ENDPOINT_URL_DYNAMODB", ""),
    ("LONGRUN_ENDPOINT_URL_SQS", ""),
    ("LONGRUN_ENDPOINT_URL_SECRETS_MANAGER", ""),
    ("OPENAI_BASE_URL", ""),
    ("OPENAI_MODEL", ""),
];

/// One process to measure.
struct Subject {
    name: &'static str,
    binary: PathBuf,
    env: Vec<(&'static str, &'static str)>,
    /// Whether the goal applies (this build's intake and worker).
    judged: bool,
    runs: Vec<Duration>,
}

impl Subject {
    fn new(name: &'static str, binary: &Path, extra: &[(&'static str, &'static str)]) -> Self {
        let mut env = LAMBDA_ENV.to_vec();
        env.extend_from_slice(extra);
        Self {
            name,
            binary: binary.to_owned(),
            env,
            judged: false,
            runs: Vec::with_capacity(ROUNDS),
        }
    }

    fn judged(self) -> Self {
        Self {
            judged: true,
            ..self
        }
    }
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
    let with_role = |role: &'static str, memory: &'static str| {
        let mut env = TEMPLATE_ENV.to_vec();
        env.push(("LONGRUN_ROLE", role));
        env.push(("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", memory));
        env
    };
    let mut subjects = vec![
        Subject::new(
            "hello-world (floor)",
            &hello,
            &[("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")],
        ),
        Subject::new(
            "text-tools intake",
            &text_tools,
            &with_role("intake", "256"),
        )
        .judged(),
        Subject::new(
            "text-tools worker",
            &text_tools,
            &with_role("worker", "512"),
        )
        .judged(),
    ];
    if let Some(baseline) = std::env::var_os("COLD_START_BASELINE").filter(|p| !p.is_empty()) {
        let baseline = PathBuf::from(baseline);
        subjects.push(Subject::new(
            "baseline intake",
            &baseline,
            &with_role("intake", "256"),
        ));
        subjects.push(Subject::new(
            "baseline worker",
            &baseline,
            &with_role("worker", "512"),
        ));
    }
    let api = RuntimeApiStub::start();
    for round in 0..WARM_UP + ROUNDS {
        for subject in &mut subjects {
            match api.time_to_first_poll(subject) {
                Ok(took) if round >= WARM_UP => subject.runs.push(took),
                Ok(_) => {}
                Err(e) => {
                    eprintln!("cold_start: {}: {e}", subject.name);
                    std::process::exit(1);
                }
            }
        }
    }
    report(&subjects, &text_tools, &hello);
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

/// A Runtime API that answers nothing: it notes when each connection's first request arrived
/// and holds the connection open, so the process waits there until it is killed.
struct RuntimeApiStub {
    addr: SocketAddr,
    polls: mpsc::Receiver<Poll>,
}

/// The first request of a connection, when it had fully arrived.
struct Poll {
    at: Instant,
    request_line: String,
    _connection: TcpStream,
}

impl RuntimeApiStub {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let addr = listener.local_addr().expect("the stub's address");
        let (tx, polls) = mpsc::channel();
        std::thread::spawn(move || {
            for connection in listener.incoming().flatten() {
                if let Some(poll) = read_request(connection)
                    && tx.send(poll).is_err()
                {
                    break;
                }
            }
        });
        Self { addr, polls }
    }

    /// Execs `subject` and waits for its first poll; the process is killed either way.
    fn time_to_first_poll(&self, subject: &Subject) -> Result<Duration, String> {
        while self.polls.try_recv().is_ok() {} // anything a killed process left behind
        let started = Instant::now();
        let mut child = Command::new(&subject.binary)
            .env_clear()
            .envs(subject.env.iter().copied())
            .env("AWS_LAMBDA_RUNTIME_API", self.addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot exec {}: {e}", subject.binary.display()))?;
        let outcome = self.first_poll(&mut child, started);
        let _ = child.kill();
        let stderr = child
            .stderr
            .take()
            .map(|pipe| std::io::read_to_string(pipe).unwrap_or_default())
            .unwrap_or_default();
        let _ = child.wait();
        outcome.map_err(|e| format!("{e}; its stderr: {}", stderr.trim()))
    }

    fn first_poll(&self, child: &mut Child, started: Instant) -> Result<Duration, String> {
        loop {
            match self.polls.recv_timeout(Duration::from_millis(20)) {
                Ok(poll) if poll.request_line.starts_with(NEXT_INVOCATION) => {
                    return Ok(poll.at.duration_since(started));
                }
                Ok(poll) => {
                    return Err(format!(
                        "the first request was {:?}, not a poll",
                        poll.request_line
                    ));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err("the stub Runtime API stopped".into());
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("it exited before polling ({status})"));
            }
            if started.elapsed() > POLL_TIMEOUT {
                return Err(format!("no poll within {POLL_TIMEOUT:?}"));
            }
        }
    }
}

const NEXT_INVOCATION: &str = "GET /2018-06-01/runtime/invocation/next ";

/// Reads a request's head (up to its blank line); `None` if the peer went away first.
fn read_request(connection: TcpStream) -> Option<Poll> {
    let mut reader = BufReader::new(connection.try_clone().ok()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return None,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {}
        }
    }
    Some(Poll {
        at: Instant::now(),
        request_line,
        _connection: connection,
    })
}

/// The value at quantile `q` (nearest rank) of sorted `runs`.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn report(subjects: &[Subject], text_tools: &Path, hello: &Path) {
    let stats: Vec<(Duration, Duration)> = subjects
        .iter()
        .map(|s| {
            let mut runs = s.runs.clone();
            runs.sort();
            (quantile(&runs, 0.5), quantile(&runs, 0.9))
        })
        .collect();
    let (floor_median, floor_p90) = stats[0];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "cold start: exec → first poll of the Runtime API ({ROUNDS} runs each after {WARM_UP} \
         warm-up, interleaved)"
    );
    println!("  {}", machine());
    let baseline = subjects.get(3).map(|s| s.binary.as_path());
    for path in [Some(text_tools), Some(hello), baseline]
        .into_iter()
        .flatten()
    {
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        println!("  {}: {:.2} MB", path.display(), size as f64 / 1e6);
    }
    println!();
    println!(
        "| {:<20} | {:>9} | {:>9} | {:>14} | {:>11} |",
        "", "median", "p90", "median ÷ floor", "p90 ÷ floor"
    );
    println!(
        "|{:-<22}|{:->11}|{:->11}|{:->16}|{:->13}|",
        "", "", "", "", ""
    );
    for (subject, (median, p90)) in subjects.iter().zip(&stats) {
        println!(
            "| {:<20} | {:>6.2} ms | {:>6.2} ms | {:>13.2}× | {:>10.2}× |",
            subject.name,
            ms(*median),
            ms(*p90),
            ms(*median) / ms(floor_median),
            ms(*p90) / ms(floor_p90),
        );
    }
    let worst = subjects
        .iter()
        .zip(&stats)
        .filter(|(subject, _)| subject.judged)
        .map(|(_, (median, _))| ms(*median) / ms(floor_median))
        .fold(0.0, f64::max);
    println!();
    println!(
        "goal: intake and worker ≤ {GOAL:.1}× the floor at the median — {} (worst {worst:.2}×)",
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
