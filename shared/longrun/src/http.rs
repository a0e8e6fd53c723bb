//! `ctx.http`: outbound HTTP with the per-call caps of I-LONGRUN-HTTP-CAP-180S.
//!
//! Every call has a timeout: 30 s unless the handler asks for another, at most 180 s (a larger
//! one is refused before any request is sent), and never past the task's own cap. Timeouts use
//! `tokio::time`, and dropping the future aborts the request, so a cancelled task stops even
//! in the middle of a long AI call.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::time::Instant;

/// The timeout a call gets when the handler sets none.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest per-call timeout (I-LONGRUN-HTTP-CAP-180S).
pub const MAX_HTTP_TIMEOUT: Duration = Duration::from_secs(180);
/// The largest response body a call reads, in bytes: a larger one fails the call with
/// [`HttpError::BodyTooLarge`] instead of filling the worker's memory, which ten tasks share.
pub const MAX_HTTP_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Why an HTTP call did not produce a response.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The handler asked for more than 180 s. No request was sent.
    #[error("timeout of {requested:?} exceeds the 180 s per-call cap (I-LONGRUN-HTTP-CAP-180S)")]
    TimeoutAboveCap {
        /// The timeout the handler asked for.
        requested: Duration,
    },
    /// The handler asked for a zero timeout. No request was sent.
    #[error("timeout must be greater than zero")]
    ZeroTimeout,
    /// The call took longer than its timeout (or than the task has left).
    #[error("request timed out after {after:?}")]
    TimedOut {
        /// The timeout that ran out: the requested one, or less if the task had less left.
        after: Duration,
    },
    /// The request could not be built or sent, or the body could not be read. The error
    /// carries no URL: a URL's query or path may hold a key or a user's data, and this error's
    /// text reaches audit items and logs.
    #[error("request failed: {0}")]
    Request(reqwest::Error),
    /// The response body is larger than [`MAX_HTTP_BODY_BYTES`]; reading stopped there.
    #[error("response body is larger than {limit} bytes")]
    BodyTooLarge {
        /// The limit that was passed.
        limit: usize,
    },
    /// The body is not the JSON the caller expected.
    #[error("response body is not the expected JSON: {0}")]
    Decode(#[from] serde_json::Error),
    /// The user cancelled the task while the call was in flight; the request was dropped
    /// (its connection closed). A handler that passes this on with `?` ends cancelled.
    #[error("the task was cancelled; the request was dropped")]
    Cancelled,
}

impl From<reqwest::Error> for HttpError {
    fn from(err: reqwest::Error) -> Self {
        Self::Request(err.without_url())
    }
}

/// The HTTP client handed to handlers as `ctx.http`.
#[derive(Clone, Debug)]
pub struct Http {
    client: reqwest::Client,
    /// When the task's cap runs out; no call may outlive it.
    deadline: Option<Instant>,
    /// Turns `true` when the worker sees the task's cancel flag: calls in flight stop then.
    cancel: Option<watch::Receiver<bool>>,
}

impl Http {
    /// A client whose calls end no later than `deadline`.
    pub fn new(client: reqwest::Client, deadline: Option<Instant>) -> Self {
        Self {
            client,
            deadline,
            cancel: None,
        }
    }

    /// Calls in flight when `cancel` turns `true` end at once with [`HttpError::Cancelled`].
    pub(crate) fn cancelled_by(mut self, cancel: watch::Receiver<bool>) -> Self {
        self.cancel = Some(cancel);
        self
    }

    /// A POST to `url`.
    pub fn post(&self, url: impl AsRef<str>) -> HttpRequest {
        self.request(reqwest::Method::POST, url)
    }

    /// A GET of `url`.
    pub fn get(&self, url: impl AsRef<str>) -> HttpRequest {
        self.request(reqwest::Method::GET, url)
    }

    /// A request with any method.
    pub fn request(&self, method: reqwest::Method, url: impl AsRef<str>) -> HttpRequest {
        HttpRequest {
            builder: self.client.request(method, url.as_ref()),
            timeout: DEFAULT_HTTP_TIMEOUT,
            deadline: self.deadline,
            cancel: self.cancel.clone(),
        }
    }
}

/// A request being built; `send` checks the timeout and runs it.
#[derive(Debug)]
#[must_use = "a request does nothing until it is sent"]
pub struct HttpRequest {
    builder: reqwest::RequestBuilder,
    timeout: Duration,
    deadline: Option<Instant>,
    cancel: Option<watch::Receiver<bool>>,
}

impl HttpRequest {
    /// A JSON body.
    pub fn json<T: Serialize + ?Sized>(mut self, body: &T) -> Self {
        self.builder = self.builder.json(body);
        self
    }

    /// A header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.builder = self.builder.header(name, value);
        self
    }

    /// `Authorization: Bearer {token}`.
    pub fn bearer_auth(mut self, token: &str) -> Self {
        self.builder = self.builder.bearer_auth(token);
        self
    }

    /// The per-call timeout: above 180 s, `send` refuses the call.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The timeout `send` will apply: the requested one, shortened to what the task has left.
    pub fn effective_timeout(&self) -> Result<Duration, HttpError> {
        if self.timeout > MAX_HTTP_TIMEOUT {
            return Err(HttpError::TimeoutAboveCap {
                requested: self.timeout,
            });
        }
        if self.timeout.is_zero() {
            return Err(HttpError::ZeroTimeout);
        }
        Ok(match self.deadline {
            Some(deadline) => self
                .timeout
                .min(deadline.saturating_duration_since(Instant::now())),
            None => self.timeout,
        })
    }

    /// Sends the request and reads the whole body within the timeout.
    pub async fn send(self) -> Result<HttpResponse, HttpError> {
        let timeout = self.effective_timeout()?;
        let call = async {
            let mut response = self.builder.send().await?;
            let status = response.status().as_u16();
            let too_large = HttpError::BodyTooLarge {
                limit: MAX_HTTP_BODY_BYTES,
            };
            if response
                .content_length()
                .is_some_and(|n| n > MAX_HTTP_BODY_BYTES as u64)
            {
                return Err(too_large);
            }
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                if body.len() + chunk.len() > MAX_HTTP_BODY_BYTES {
                    return Err(too_large);
                }
                body.extend_from_slice(&chunk);
            }
            Ok::<_, HttpError>(HttpResponse { status, body })
        };
        let cancelled = async {
            match self.cancel {
                // A dropped sender (the task ended) is no cancel.
                Some(mut cancel) => {
                    let seen = cancel.wait_for(|c| *c).await.is_ok();
                    if !seen {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            timed = tokio::time::timeout(timeout, call) => match timed {
                Ok(result) => result,
                Err(_) => Err(HttpError::TimedOut { after: timeout }),
            },
            () = cancelled => Err(HttpError::Cancelled),
        }
    }
}

/// A response with its whole body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    status: u16,
    body: Vec<u8>,
}

impl HttpResponse {
    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The body as JSON of type `T`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HttpError> {
        Ok(serde_json::from_slice(&self.body)?)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(deadline: Option<Instant>) -> Http {
        Http::new(reqwest::Client::new(), deadline)
    }

    #[tokio::test]
    async fn default_is_30_seconds() {
        let request = http(None).post("http://127.0.0.1:9/");
        assert_eq!(
            request.effective_timeout().unwrap(),
            Duration::from_secs(30)
        );
    }

    #[tokio::test]
    async fn exactly_180_seconds_is_accepted() {
        let request = http(None)
            .post("http://127.0.0.1:9/")
            .timeout(Duration::from_secs(180));
        assert_eq!(
            request.effective_timeout().unwrap(),
            Duration::from_secs(180)
        );
    }

    #[tokio::test]
    async fn above_180_seconds_is_refused_before_sending() {
        // GIVEN a server that counts requests
        let (url, hits) = counting_server().await;
        // WHEN a call asks for 181 s
        let err = http(None)
            .post(&url)
            .timeout(Duration::from_secs(181))
            .send()
            .await
            .unwrap_err();
        // THEN it is refused with the typed error and nothing reached the server
        assert!(
            matches!(err, HttpError::TimeoutAboveCap { requested } if requested == Duration::from_secs(181))
        );
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn zero_timeout_is_refused() {
        let err = http(None)
            .get("http://127.0.0.1:9/")
            .timeout(Duration::ZERO)
            .send()
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::ZeroTimeout));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_never_outlives_the_task_cap() {
        let deadline = Instant::now() + Duration::from_secs(12);
        let request = http(Some(deadline))
            .post("http://127.0.0.1:9/")
            .timeout(Duration::from_secs(120));
        assert_eq!(
            request.effective_timeout().unwrap(),
            Duration::from_secs(12)
        );
    }

    #[tokio::test]
    async fn a_failed_request_does_not_carry_its_url() {
        // GIVEN a URL whose path and query hold secrets, on a port nothing listens on
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let url = format!("http://127.0.0.1:{port}/users/alice/doc?api_key=sk-12345");
        // WHEN the call fails
        let err = http(None).get(&url).send().await.unwrap_err();
        // THEN its text, which reaches audit items and logs, names neither
        let text = format!("{err} {err:?}");
        assert!(matches!(err, HttpError::Request(_)), "{text}");
        for secret in ["sk-12345", "api_key", "alice"] {
            assert!(!text.contains(secret), "{text}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_server_times_out_at_the_default() {
        // GIVEN a server that accepts and never answers
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        // WHEN a call is made with no explicit timeout
        let started = Instant::now();
        let err = http(None).post(&url).send().await.unwrap_err();
        // THEN it ends after exactly the 30 s default (tokio's paused clock)
        assert!(matches!(err, HttpError::TimedOut { after } if after == DEFAULT_HTTP_TIMEOUT));
        assert_eq!(started.elapsed(), DEFAULT_HTTP_TIMEOUT);
    }

    #[tokio::test]
    async fn a_body_past_the_limit_fails_the_call_without_reading_it_all() {
        // GIVEN servers answering one byte more than the limit, with and without a length
        let big = || "x".repeat(MAX_HTTP_BODY_BYTES + 1);
        let sized = axum::Router::new().fallback(move || async move { big() });
        let streamed = axum::Router::new().fallback(|| async {
            let chunks = (0..17).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 1024 * 1024]));
            axum::body::Body::from_stream(futures::stream::iter(chunks))
        });
        for app in [sized, streamed] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await });
            // WHEN a handler calls it
            let err = http(None).get(&url).send().await.unwrap_err();
            // THEN the call fails with the typed error
            assert!(
                matches!(err, HttpError::BodyTooLarge { limit } if limit == MAX_HTTP_BODY_BYTES),
                "{err}"
            );
        }
        // AND a body at the limit is read whole
        let app = axum::Router::new().fallback(|| async { "y".repeat(MAX_HTTP_BODY_BYTES) });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let ok = http(None).get(&url).send().await.unwrap();
        assert_eq!(ok.text().len(), MAX_HTTP_BODY_BYTES);
    }

    async fn counting_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&hits);
        let app = axum::Router::new().fallback(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async { "ok" }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, hits)
    }
}
