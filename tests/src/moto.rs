//! A moto server (SQS and Secrets Manager on the real wire protocol) on a free loopback port,
//! for adapter and end-to-end tests. Each [`Moto`] is its own process with its own state;
//! dropping it kills the process, also when the test panics, and a test process that dies
//! without unwinding takes moto with it (moto exits when its stdin closes).

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_sqs::config::Credentials;

/// How long moto may take to answer after it was spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Ports another process may grab between our probe and moto's bind: try a few.
const SPAWN_ATTEMPTS: usize = 3;

/// Starts moto's server and exits when stdin reaches end of file, so the server never
/// outlives the test process, even one killed by a signal.
const LAUNCHER: &str = r#"
import os, sys, threading
def watch_parent():
    sys.stdin.buffer.read()
    os._exit(0)
threading.Thread(target=watch_parent, daemon=True).start()
from moto.server import main
main(sys.argv[1:])
"#;

/// A running moto server.
pub struct Moto {
    /// `http://HOST:PORT`.
    pub endpoint: String,
    child: Child,
    log: PathBuf,
}

impl Moto {
    /// Starts moto on loopback, or returns `None` (after saying why on stderr) when moto is
    /// not installed. Under `CI=true` a missing moto is a failure, not a skip.
    pub async fn start() -> Option<Moto> {
        Self::start_on(crate::LOOPBACK).await
    }

    /// [`Moto::start`], listening on `host`.
    pub async fn start_on(host: std::net::IpAddr) -> Option<Moto> {
        if !moto_installed().await {
            if crate::emulators_required() {
                panic!("moto server is required under CI=true: pip install 'moto[server]'");
            }
            eprintln!(
                "SKIPPED: moto server is not installed (pip install 'moto[server]'); this test needs it"
            );
            return None;
        }
        let mut last_failure = String::new();
        for _ in 0..SPAWN_ATTEMPTS {
            match spawn(host).await {
                Ok(moto) => return Some(moto),
                Err(why) => last_failure = why,
            }
        }
        panic!("moto server did not start: {last_failure}");
    }

    /// The SDK configuration for this server: its endpoint, `us-east-1`, test credentials.
    pub async fn sdk_config(&self) -> SdkConfig {
        sdk_config(&self.endpoint).await
    }

    /// An SQS client for this server.
    pub async fn sqs_client(&self) -> aws_sdk_sqs::Client {
        sqs_client(&self.endpoint).await
    }

    /// A Secrets Manager client for this server.
    pub async fn secrets_client(&self) -> aws_sdk_secretsmanager::Client {
        secrets_client(&self.endpoint).await
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        // kill + wait, so no zombie is left behind; errors mean it is already gone.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The SDK configuration for a local endpoint: `us-east-1`, static test credentials, and no
/// reliance on the developer's AWS profile or environment for either.
pub async fn sdk_config(endpoint: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "moto"))
        .load()
        .await
}

/// An SQS client for `endpoint`. The endpoint is set on the client too, so a service-specific
/// `AWS_ENDPOINT_URL_SQS` in the environment cannot redirect the test.
pub async fn sqs_client(endpoint: &str) -> aws_sdk_sqs::Client {
    let config = aws_sdk_sqs::config::Builder::from(&sdk_config(endpoint).await)
        .endpoint_url(endpoint)
        .build();
    aws_sdk_sqs::Client::from_conf(config)
}

/// A Secrets Manager client for `endpoint`.
pub async fn secrets_client(endpoint: &str) -> aws_sdk_secretsmanager::Client {
    let config = aws_sdk_secretsmanager::config::Builder::from(&sdk_config(endpoint).await)
        .endpoint_url(endpoint)
        .build();
    aws_sdk_secretsmanager::Client::from_conf(config)
}

async fn moto_installed() -> bool {
    tokio::process::Command::new("python3")
        .args(["-c", "import moto.server"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

async fn spawn(host: std::net::IpAddr) -> Result<Moto, String> {
    let port = TcpListener::bind((host, 0))
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let log = std::env::temp_dir().join(format!("longrun-moto-{}-{port}.log", std::process::id()));
    let out = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let child = Command::new("python3")
        .args([
            "-c",
            LAUNCHER,
            "-H",
            &host.to_string(),
            "-p",
            &port.to_string(),
        ])
        // The pipe's write end lives in `child.stdin` and closes when this process ends.
        .stdin(Stdio::piped())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    let mut moto = Moto {
        endpoint: format!("http://{host}:{port}"),
        child,
        log,
    };
    let started = Instant::now();
    loop {
        if answers_http(&moto.endpoint).await {
            eprintln!(
                "moto ready on port {port} in {} ms",
                started.elapsed().as_millis()
            );
            return Ok(moto);
        }
        if let Ok(Some(status)) = moto.child.try_wait() {
            // Dropping `moto` removes the log, so read it first.
            return Err(format!("exited with {status}: {}", log_tail(&moto.log)));
        }
        if started.elapsed() > READY_TIMEOUT {
            return Err(format!(
                "no answer on port {port} after {READY_TIMEOUT:?}: {}",
                log_tail(&moto.log)
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether moto's dashboard API (`/moto-api/`) answers at `endpoint`.
async fn answers_http(endpoint: &str) -> bool {
    reqwest::Client::new()
        .get(format!("{endpoint}/moto-api/"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .is_ok()
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
