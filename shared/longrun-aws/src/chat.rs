//! The chat API adapter: `POST {LONGRUN_CHAT_API_URL}/chats/{chat}/messages` with an
//! `Idempotency-Key` header and, when configured, a bearer token. Maps the answer to
//! [`ChatOutcome`]:
//!
//! - 2xx or 409: delivered;
//! - 408, 425, 429, 5xx, a timeout or no connection: unavailable — delivery tries again later.
//!   For a result, a `Retry-After` of at most [`INLINE_RETRY_AFTER`] is waited out and the post
//!   tried once more at once; a longer one is left to the queue's redelivery. A progress update
//!   is never posted again after such a wait: its task may have finished meanwhile and its
//!   result be in the chat, or a later update be there. It goes back to the queue, and
//!   delivery reads the task again before it posts it (or drops it);
//! - 401: the token is read again from its secret (it may have been rotated) and the post
//!   tried once more; a second 401 is a rejection;
//! - any other 4xx: rejected — trying again will not help.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;

use longrun::ports::{ChatApi, ChatOutcome, PortResult, Secret};
use longrun::wire::ChatMessage;

/// How long one POST may take before it counts as unavailable.
pub const CHAT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `Retry-After` waited out inline, before one more try.
pub const INLINE_RETRY_AFTER: Duration = Duration::from_secs(2);

/// Reads the chat token again (from Secrets Manager), after a 401.
pub type TokenSource =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = PortResult<Option<Secret>>> + Send>> + Send + Sync>;

/// The chat platform's message API over HTTP(S).
pub struct HttpChat {
    client: reqwest::Client,
    base_url: String,
    token: RwLock<Option<Secret>>,
    refresh: Option<TokenSource>,
}

/// What one POST got back.
enum Answer {
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    Failed(String),
}

impl HttpChat {
    /// A client for the API at `base_url`, authenticating with `token` when given.
    pub fn new(
        client: reqwest::Client,
        base_url: impl Into<String>,
        token: Option<Secret>,
    ) -> Self {
        Self {
            client,
            base_url: base_url.into().trim_end_matches('/').to_owned(),
            token: RwLock::new(token),
            refresh: None,
        }
    }

    /// Reads the token again through `source` when the API answers 401 (a rotated token).
    pub fn refreshing_with(mut self, source: TokenSource) -> Self {
        self.refresh = Some(source);
        self
    }

    fn url(&self, chat: &str) -> String {
        format!("{}/chats/{}/messages", self.base_url, encode_segment(chat))
    }

    fn token(&self) -> Option<Secret> {
        self.token
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    async fn send(&self, chat: &str, idempotency_key: &str, message: &ChatMessage) -> Answer {
        let mut request = self
            .client
            .post(self.url(chat))
            .header("Idempotency-Key", idempotency_key)
            .json(message)
            .timeout(CHAT_TIMEOUT);
        if let Some(token) = self.token() {
            request = request.bearer_auth(token.expose());
        }
        match request.send().await {
            Ok(response) => Answer::Status {
                status: response.status().as_u16(),
                retry_after: retry_after(response.headers()),
            },
            Err(err) if err.is_timeout() => {
                Answer::Failed(format!("chat API did not answer within {CHAT_TIMEOUT:?}"))
            }
            Err(err) => Answer::Failed(format!("chat API unreachable: {}", err.without_url())),
        }
    }

    /// Reads the token again; whether it changed.
    async fn refreshed(&self) -> bool {
        let Some(source) = &self.refresh else {
            return false;
        };
        match source().await {
            Ok(Some(fresh)) if Some(&fresh) != self.token().as_ref() => {
                *self
                    .token
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(fresh);
                tracing::info!("chat token read again after a 401");
                true
            }
            Ok(_) => false,
            Err(err) => {
                tracing::warn!(error = %err, "chat token could not be read again");
                false
            }
        }
    }
}

/// A `Retry-After` given in seconds (the HTTP-date form is left to the queue's redelivery).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// Whether a status means "later" rather than "never".
fn is_transient(status: u16) -> bool {
    matches!(status, 408 | 425 | 429) || status >= 500
}

fn outcome(answer: Answer) -> ChatOutcome {
    match answer {
        Answer::Status { status, .. } if (200..=299).contains(&status) || status == 409 => {
            ChatOutcome::Delivered
        }
        Answer::Status {
            status,
            retry_after,
        } if is_transient(status) => ChatOutcome::Unavailable {
            reason: match retry_after {
                Some(after) => format!("chat API answered {status} (retry after {after:?})"),
                None => format!("chat API answered {status}"),
            },
        },
        Answer::Status { status, .. } if (400..=499).contains(&status) => {
            ChatOutcome::Rejected { status }
        }
        Answer::Status { status, .. } => ChatOutcome::Unavailable {
            reason: format!("chat API answered {status}"),
        },
        Answer::Failed(reason) => ChatOutcome::Unavailable { reason },
    }
}

/// Percent-encodes a path segment, so a chat id can never add path components or a query.
fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[async_trait]
impl ChatApi for HttpChat {
    async fn post(&self, chat: &str, idempotency_key: &str, message: &ChatMessage) -> ChatOutcome {
        let answer = self.send(chat, idempotency_key, message).await;
        let again = match &answer {
            Answer::Status { status: 401, .. } => self.refreshed().await,
            Answer::Status {
                status,
                retry_after: Some(after),
            } if is_transient(*status)
                && *after <= INLINE_RETRY_AFTER
                && matches!(message, ChatMessage::Result { .. }) =>
            {
                tokio::time::sleep(*after).await;
                true
            }
            _ => false,
        };
        if again {
            return outcome(self.send(chat, idempotency_key, message).await);
        }
        outcome(answer)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;

    use super::*;
    use longrun::ActionResult;

    type Seen = Arc<Mutex<Vec<(String, Option<String>, Option<String>, serde_json::Value)>>>;

    async fn server(status: u16) -> (String, Seen) {
        let seen: Seen = Arc::default();
        let app = axum::Router::new()
            .route(
                "/chats/{chat}/messages",
                post(
                    |State((seen, status)): State<(Seen, u16)>,
                     Path(chat): Path<String>,
                     headers: HeaderMap,
                     body: axum::Json<serde_json::Value>| async move {
                        let header = |name: &str| {
                            headers
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned)
                        };
                        seen.lock().unwrap().push((
                            chat,
                            header("idempotency-key"),
                            header("authorization"),
                            body.0,
                        ));
                        StatusCode::from_u16(status).unwrap()
                    },
                ),
            )
            .with_state((Arc::clone(&seen), status));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, seen)
    }

    fn message() -> ChatMessage {
        ChatMessage::Result {
            user: "u1".into(),
            ext: "text-tools".into(),
            task_id: "01JDZQ6V4E1YQ7K3ZC6M4T9H8P".parse().unwrap(),
            function: "refine_output".into(),
            event: Some("text_refined".into()),
            result: ActionResult::success("done", ()),
        }
    }

    #[tokio::test]
    async fn posts_the_contract_body_key_and_token() {
        let (url, seen) = server(201).await;
        let chat = HttpChat::new(
            reqwest::Client::new(),
            format!("{url}/"),
            Some(Secret::new("tok")),
        );
        assert_eq!(
            chat.post("c/1?x", "k:result", &message()).await,
            ChatOutcome::Delivered
        );
        let seen = seen.lock().unwrap();
        let (chat_id, key, auth, body) = &seen[0];
        assert_eq!(chat_id, "c/1?x");
        assert_eq!(key.as_deref(), Some("k:result"));
        assert_eq!(auth.as_deref(), Some("Bearer tok"));
        assert_eq!(body["kind"], "result");
        assert_eq!(body["event"], "text_refined");
    }

    #[tokio::test]
    async fn statuses_map_to_outcomes() {
        for (status, expected) in [
            (200, ChatOutcome::Delivered),
            (409, ChatOutcome::Delivered),
            (404, ChatOutcome::Rejected { status: 404 }),
            (403, ChatOutcome::Rejected { status: 403 }),
            (401, ChatOutcome::Rejected { status: 401 }),
        ] {
            let (url, _) = server(status).await;
            let chat = HttpChat::new(reqwest::Client::new(), url, None);
            assert_eq!(chat.post("c", "k", &message()).await, expected, "{status}");
        }
        // Throttled, timed out, too early and 5xx are "later", not "never".
        for status in [408, 425, 429, 500, 503] {
            let (url, _) = server(status).await;
            let chat = HttpChat::new(reqwest::Client::new(), url, None);
            assert!(
                matches!(
                    chat.post("c", "k", &message()).await,
                    ChatOutcome::Unavailable { .. }
                ),
                "{status}"
            );
        }
    }

    type Authorizations = Arc<Mutex<Vec<Option<String>>>>;
    type Script = Arc<Mutex<std::collections::VecDeque<(u16, Option<&'static str>)>>>;

    /// A server that answers each POST with the next of `answers` (status, Retry-After) and
    /// then 201; it records the Authorization header of each.
    async fn scripted(answers: Vec<(u16, Option<&'static str>)>) -> (String, Authorizations) {
        let seen: Authorizations = Arc::default();
        let answers = Arc::new(Mutex::new(std::collections::VecDeque::from(answers)));
        let state = (Arc::clone(&seen), answers);
        let app = axum::Router::new()
            .route(
                "/chats/{chat}/messages",
                post(
                    |State((seen, answers)): State<(Authorizations, Script)>,
                     headers: HeaderMap| async move {
                        seen.lock().unwrap().push(
                            headers
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned),
                        );
                        let (status, after) =
                            answers.lock().unwrap().pop_front().unwrap_or((201, None));
                        let mut response = axum::response::Response::new(axum::body::Body::empty());
                        *response.status_mut() = StatusCode::from_u16(status).unwrap();
                        if let Some(after) = after {
                            response
                                .headers_mut()
                                .insert("retry-after", after.parse().unwrap());
                        }
                        response
                    },
                ),
            )
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, seen)
    }

    fn source(token: &'static str) -> TokenSource {
        Arc::new(move || Box::pin(async move { Ok(Some(Secret::new(token))) }))
    }

    #[tokio::test]
    async fn a_401_reads_the_rotated_token_once_and_posts_again() {
        // GIVEN an API that refuses the old token once
        let (url, seen) = scripted(vec![(401, None)]).await;
        let chat = HttpChat::new(reqwest::Client::new(), url, Some(Secret::new("old")))
            .refreshing_with(source("new"));
        // WHEN a message is posted, THEN it is delivered with the token read again
        assert_eq!(
            chat.post("c", "k", &message()).await,
            ChatOutcome::Delivered
        );
        assert_eq!(
            *seen.lock().unwrap(),
            vec![Some("Bearer old".to_owned()), Some("Bearer new".to_owned())]
        );
        // AND the next message uses the new token from the start
        chat.post("c", "k2", &message()).await;
        assert_eq!(seen.lock().unwrap()[2].as_deref(), Some("Bearer new"));
    }

    #[tokio::test]
    async fn a_401_with_an_unchanged_token_is_rejected_without_a_second_post() {
        let (url, seen) = scripted(vec![(401, None), (401, None)]).await;
        let chat = HttpChat::new(reqwest::Client::new(), url, Some(Secret::new("same")))
            .refreshing_with(source("same"));
        assert_eq!(
            chat.post("c", "k", &message()).await,
            ChatOutcome::Rejected { status: 401 }
        );
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_short_retry_after_is_waited_out_and_a_long_one_left_to_redelivery() {
        let (url, seen) = scripted(vec![(429, Some("1"))]).await;
        let chat = HttpChat::new(reqwest::Client::new(), url, None);
        assert_eq!(
            chat.post("c", "k", &message()).await,
            ChatOutcome::Delivered
        );
        assert_eq!(seen.lock().unwrap().len(), 2);

        let (url, seen) = scripted(vec![(429, Some("120"))]).await;
        let chat = HttpChat::new(reqwest::Client::new(), url, None);
        match chat.post("c", "k", &message()).await {
            ChatOutcome::Unavailable { reason } => assert!(reason.contains("429"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_progress_update_is_not_posted_again_after_a_retry_after() {
        // GIVEN an API that asks to come back in a second
        let (url, seen) = scripted(vec![(429, Some("1"))]).await;
        let chat = HttpChat::new(reqwest::Client::new(), url, None);
        let progress = ChatMessage::Progress {
            user: "u1".into(),
            ext: "text-tools".into(),
            task_id: "01JDZQ6V4E1YQ7K3ZC6M4T9H8P".parse().unwrap(),
            progress: longrun::task::Progress {
                pct: 45,
                message: "Generating with AI".into(),
            },
        };
        // WHEN a progress update is posted, THEN it is left to the queue's redelivery, which
        // reads the task again first: by then the result may be in the chat
        assert!(matches!(
            chat.post("c", "k:progress:1", &progress).await,
            ChatOutcome::Unavailable { .. }
        ));
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_unreachable_api_is_unavailable_not_rejected() {
        let chat = HttpChat::new(reqwest::Client::new(), "http://127.0.0.1:9", None);
        assert!(matches!(
            chat.post("c", "k", &message()).await,
            ChatOutcome::Unavailable { .. }
        ));
    }
}
