//! The chat API adapter: `POST {LONGRUN_CHAT_API_URL}/chats/{chat}/messages` with an
//! `Idempotency-Key` header and, when configured, a bearer token. Maps the answer to
//! [`ChatOutcome`]: 2xx or 409 delivered, other 4xx rejected, 5xx or timeout unavailable.

use std::time::Duration;

use async_trait::async_trait;

use longrun::ports::{ChatApi, ChatOutcome, Secret};
use longrun::wire::ChatMessage;

/// How long one POST may take before it counts as unavailable.
pub const CHAT_TIMEOUT: Duration = Duration::from_secs(10);

/// The chat platform's message API over HTTP(S).
pub struct HttpChat {
    client: reqwest::Client,
    base_url: String,
    token: Option<Secret>,
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
            token,
        }
    }

    fn url(&self, chat: &str) -> String {
        format!("{}/chats/{}/messages", self.base_url, encode_segment(chat))
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
        let mut request = self
            .client
            .post(self.url(chat))
            .header("Idempotency-Key", idempotency_key)
            .json(message)
            .timeout(CHAT_TIMEOUT);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token.expose());
        }
        match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                match status {
                    200..=299 | 409 => ChatOutcome::Delivered,
                    400..=499 => ChatOutcome::Rejected { status },
                    _ => ChatOutcome::Unavailable {
                        reason: format!("chat API answered {status}"),
                    },
                }
            }
            Err(err) if err.is_timeout() => ChatOutcome::Unavailable {
                reason: format!("chat API did not answer within {CHAT_TIMEOUT:?}"),
            },
            Err(err) => ChatOutcome::Unavailable {
                reason: format!("chat API unreachable: {}", err.without_url()),
            },
        }
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
        ] {
            let (url, _) = server(status).await;
            let chat = HttpChat::new(reqwest::Client::new(), url, None);
            assert_eq!(chat.post("c", "k", &message()).await, expected, "{status}");
        }
        let (url, _) = server(503).await;
        let chat = HttpChat::new(reqwest::Client::new(), url, None);
        assert!(matches!(
            chat.post("c", "k", &message()).await,
            ChatOutcome::Unavailable { .. }
        ));
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
