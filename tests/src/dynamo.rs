//! DynamoDB for tests: the dynoxide emulator served in-process on a free loopback port, with
//! a fresh in-memory database per launcher, and an SDK client pointed at it.

use aws_config::{BehaviorVersion, Region};
use aws_sdk_dynamodb::config::Credentials;
use tokio::sync::oneshot;

/// A running dynoxide HTTP server. It stops when dropped.
pub struct Dynoxide {
    /// `http://{host}:{port}`.
    pub endpoint: String,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Dynoxide {
    /// Starts a server over a fresh in-memory database on loopback. Must be called inside a
    /// Tokio runtime.
    pub async fn start() -> Result<Self, String> {
        Self::start_on(crate::LOOPBACK).await
    }

    /// Starts a server listening on `host` (e.g. the Docker bridge's address, so containers
    /// reach it).
    pub async fn start_on(host: std::net::IpAddr) -> Result<Self, String> {
        let db = dynoxide::Database::memory().map_err(|e| format!("dynoxide database: {e}"))?;
        let listener = tokio::net::TcpListener::bind((host, 0))
            .await
            .map_err(|e| format!("bind: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("local address: {e}"))?;
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            // A dropped sender stops the server as a sent signal does.
            let served = dynoxide::server::serve_with_shutdown(listener, db, async {
                let _ = stopped.await;
            })
            .await;
            if let Err(e) = served {
                eprintln!("dynoxide stopped with an error: {e}");
            }
        });
        Ok(Self {
            endpoint: format!("http://{addr}"),
            shutdown: Some(stop),
        })
    }

    /// A client for this server.
    pub async fn client(&self) -> aws_sdk_dynamodb::Client {
        client(&self.endpoint).await
    }
}

impl Drop for Dynoxide {
    fn drop(&mut self) {
        if let Some(stop) = self.shutdown.take() {
            let _ = stop.send(());
        }
    }
}

/// A DynamoDB client for `endpoint` with static test credentials in `us-east-1`.
pub async fn client(endpoint: &str) -> aws_sdk_dynamodb::Client {
    let config = aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "test",
            "test",
            None,
            None,
            "longrun-tests",
        ))
        .load()
        .await;
    aws_sdk_dynamodb::Client::new(&config)
}
