//! The SQS API (the AWS JSON 1.0 protocol the SDKs speak) over the dev stack's in-process
//! queues, so `longrun --local dlq …`, `tasks retry` and any SQS client reach them exactly as
//! they reach SQS. The operations the pipeline and the CLI use are here: GetQueueUrl,
//! ListQueues, GetQueueAttributes, SendMessage(Batch), ReceiveMessage (with long polling),
//! DeleteMessage(Batch), ChangeMessageVisibility and PurgeQueue. The four queues are fixed:
//! CreateQueue and SetQueueAttributes accept them as they are and create nothing.

use std::time::Duration;

use crate::queue::LOCAL_ACCOUNT;
use crate::queue::{LocalQueue, LocalQueues};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::sync::watch;

const CONTENT_TYPE: &str = "application/x-amz-json-1.0";

/// The API over one set of queues, at `endpoint` (e.g. `http://127.0.0.1:8787/sqs`).
#[derive(Clone)]
pub struct SqsApi {
    queues: LocalQueues,
    endpoint: String,
    stop: watch::Receiver<bool>,
}

/// An SQS error: its JSON type, its query-compatible code and a message.
struct SqsError {
    kind: &'static str,
    query_code: &'static str,
    message: String,
}

impl SqsError {
    fn new(kind: &'static str, query_code: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            query_code,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new("InvalidParameterValue", "InvalidParameterValue", message)
    }
}

impl IntoResponse for SqsError {
    fn into_response(self) -> Response {
        let body =
            json!({"__type": format!("com.amazonaws.sqs#{}", self.kind), "message": self.message});
        let mut response = (StatusCode::BAD_REQUEST, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        if let Ok(value) = HeaderValue::from_str(&format!("{};Sender", self.query_code)) {
            headers.insert("x-amzn-query-error", value);
        }
        response
    }
}

fn ok(body: Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        body.to_string(),
    )
        .into_response()
}

/// `DelaySeconds`: 0–900, as SQS allows.
fn delay(input: &Value) -> Result<Duration, SqsError> {
    match &input["DelaySeconds"] {
        Value::Null => Ok(Duration::ZERO),
        value => value
            .as_u64()
            .filter(|s| *s <= 900)
            .map(Duration::from_secs)
            .ok_or_else(|| SqsError::invalid("DelaySeconds must be an integer from 0 to 900")),
    }
}

fn string<'a>(input: &'a Value, field: &str) -> Result<&'a str, SqsError> {
    input[field].as_str().ok_or_else(|| {
        SqsError::new(
            "MissingParameter",
            "MissingParameter",
            format!("{field} is required"),
        )
    })
}

fn number(input: &Value, field: &str) -> Result<Option<u64>, SqsError> {
    match &input[field] {
        Value::Null => Ok(None),
        Value::Number(n) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| SqsError::invalid(format!("{field} must be a whole number"))),
        _ => Err(SqsError::invalid(format!("{field} must be a number"))),
    }
}

impl SqsApi {
    /// The API over `queues`, whose queue URLs start with `endpoint`; long-polling receives
    /// return empty once `stop` turns true.
    pub fn new(queues: LocalQueues, endpoint: String, stop: watch::Receiver<bool>) -> Self {
        Self {
            queues,
            endpoint,
            stop,
        }
    }

    /// The URL of `queue`: `{endpoint}/000000000000/{name}`, shaped like SQS's.
    pub fn url(&self, queue: &LocalQueue) -> String {
        format!("{}/{LOCAL_ACCOUNT}/{}", self.endpoint, queue.name())
    }

    fn queue(&self, input: &Value) -> Result<&LocalQueue, SqsError> {
        let url = string(input, "QueueUrl")?;
        let name = url.trim_end_matches('/').rsplit('/').next().unwrap_or(url);
        self.by_name(name)
    }

    fn by_name(&self, name: &str) -> Result<&LocalQueue, SqsError> {
        self.queues.by_name(name).map(|q| &**q).ok_or_else(|| {
            SqsError::new(
                "QueueDoesNotExist",
                "AWS.SimpleQueueService.NonExistentQueue",
                format!("The specified queue {name} does not exist."),
            )
        })
    }

    /// Answers one request.
    pub async fn handle(&self, headers: &HeaderMap, body: &[u8]) -> Response {
        let Some(operation) = headers
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .and_then(|t| t.strip_prefix("AmazonSQS."))
        else {
            return SqsError::new(
                "InvalidAction",
                "InvalidAction",
                "this endpoint speaks the SQS JSON protocol (X-Amz-Target: AmazonSQS.<Operation>)",
            )
            .into_response();
        };
        let input: Value = if body.is_empty() {
            json!({})
        } else {
            match serde_json::from_slice(body) {
                Ok(input) => input,
                Err(e) => {
                    return SqsError::new(
                        "InvalidParameterValue",
                        "MalformedInput",
                        format!("body is not JSON: {e}"),
                    )
                    .into_response();
                }
            }
        };
        match self.operation(operation, &input).await {
            Ok(body) => ok(body),
            Err(err) => err.into_response(),
        }
    }

    async fn operation(&self, operation: &str, input: &Value) -> Result<Value, SqsError> {
        match operation {
            "GetQueueUrl" => {
                let queue = self.by_name(string(input, "QueueName")?)?;
                Ok(json!({"QueueUrl": self.url(queue)}))
            }
            "CreateQueue" => {
                let name = string(input, "QueueName")?;
                let queue = self.by_name(name).map_err(|_| {
                    SqsError::new(
                        "UnsupportedOperation",
                        "AWS.SimpleQueueService.UnsupportedOperation",
                        format!(
                            "the dev stack's queues are fixed ({}); it cannot create {name}",
                            self.names().join(", ")
                        ),
                    )
                })?;
                Ok(json!({"QueueUrl": self.url(queue)}))
            }
            "ListQueues" => {
                let prefix = input["QueueNamePrefix"].as_str().unwrap_or("");
                let urls: Vec<String> = self
                    .queues
                    .all()
                    .into_iter()
                    .filter(|q| q.name().starts_with(prefix))
                    .map(|q| self.url(q))
                    .collect();
                Ok(json!({"QueueUrls": urls}))
            }
            "GetQueueAttributes" => self.attributes(input),
            "SetQueueAttributes" => {
                let queue = self.queue(input)?;
                tracing::info!(
                    queue = queue.name(),
                    "SetQueueAttributes ignored: the dev stack's queues are fixed"
                );
                Ok(json!({}))
            }
            "SendMessage" => {
                let queue = self.queue(input)?;
                let body = string(input, "MessageBody")?;
                let id = queue
                    .send_message_after(body, delay(input)?)
                    .map_err(|e| SqsError::invalid(e.to_string()))?;
                Ok(json!({"MessageId": id}))
            }
            "SendMessageBatch" => {
                let queue = self.queue(input)?;
                let entries = batch_entries(input)?;
                let (mut sent, mut failed) = (Vec::new(), Vec::new());
                for entry in entries {
                    let id = entry["Id"].as_str().unwrap_or_default();
                    match entry["MessageBody"]
                        .as_str()
                        .ok_or_else(|| "MessageBody is required".to_owned())
                        .and_then(|body| queue.send_message(body).map_err(|e| e.to_string()))
                    {
                        Ok(message_id) => sent.push(json!({"Id": id, "MessageId": message_id})),
                        Err(message) => failed.push(json!({"Id": id, "SenderFault": true, "Code": "InvalidParameterValue", "Message": message})),
                    }
                }
                Ok(json!({"Successful": sent, "Failed": failed}))
            }
            "ReceiveMessage" => self.receive(input).await,
            "DeleteMessage" => {
                let queue = self.queue(input)?;
                // SQS answers a delete of a message that is already gone with success too.
                queue.delete(string(input, "ReceiptHandle")?);
                Ok(json!({}))
            }
            "DeleteMessageBatch" => {
                let queue = self.queue(input)?;
                let done: Vec<Value> = batch_entries(input)?
                    .iter()
                    .map(|entry| {
                        if let Some(receipt) = entry["ReceiptHandle"].as_str() {
                            queue.delete(receipt);
                        }
                        json!({"Id": entry["Id"]})
                    })
                    .collect();
                Ok(json!({"Successful": done, "Failed": []}))
            }
            "ChangeMessageVisibility" => {
                let queue = self.queue(input)?;
                let seconds = number(input, "VisibilityTimeout")?.unwrap_or(0).min(43_200);
                if queue.change_visibility(
                    string(input, "ReceiptHandle")?,
                    Duration::from_secs(seconds),
                ) {
                    Ok(json!({}))
                } else {
                    Err(SqsError::new(
                        "MessageNotInflight",
                        "AWS.SimpleQueueService.MessageNotInflight",
                        "The message referred to isn't in flight.",
                    ))
                }
            }
            "PurgeQueue" => {
                self.queue(input)?.purge();
                Ok(json!({}))
            }
            other => Err(SqsError::new(
                "UnsupportedOperation",
                "AWS.SimpleQueueService.UnsupportedOperation",
                format!("the dev stack's SQS API does not implement {other}"),
            )),
        }
    }

    fn names(&self) -> Vec<String> {
        self.queues
            .all()
            .into_iter()
            .map(|q| q.name().to_owned())
            .collect()
    }

    fn attributes(&self, input: &Value) -> Result<Value, SqsError> {
        let queue = self.queue(input)?;
        let mut all = Map::new();
        let mut put = |name: &str, value: String| {
            all.insert(name.to_owned(), Value::String(value));
        };
        put("QueueArn", queue.arn());
        put("ApproximateNumberOfMessages", queue.depth().to_string());
        put(
            "ApproximateNumberOfMessagesNotVisible",
            queue.in_flight().to_string(),
        );
        put(
            "VisibilityTimeout",
            queue.visibility_timeout().as_secs().to_string(),
        );
        put(
            "MaximumMessageSize",
            longrun_aws::sqs::MAX_MESSAGE_BYTES.to_string(),
        );
        if let Some((dlq, max)) = queue.redrive_policy() {
            put(
                "RedrivePolicy",
                json!({"deadLetterTargetArn": dlq.arn(), "maxReceiveCount": max}).to_string(),
            );
        }
        let wanted: Vec<&str> = input["AttributeNames"]
            .as_array()
            .map(|names| names.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if !wanted.contains(&"All") {
            all.retain(|name, _| wanted.contains(&name.as_str()));
        }
        Ok(json!({"Attributes": all}))
    }

    async fn receive(&self, input: &Value) -> Result<Value, SqsError> {
        let queue = self.queue(input)?;
        let max = number(input, "MaxNumberOfMessages")?.unwrap_or(1);
        if !(1..=10).contains(&max) {
            return Err(SqsError::invalid(
                "MaxNumberOfMessages must be within 1 to 10",
            ));
        }
        let wait = number(input, "WaitTimeSeconds")?.unwrap_or(0);
        if wait > 20 {
            return Err(SqsError::invalid("WaitTimeSeconds must be within 0 to 20"));
        }
        let visibility = match number(input, "VisibilityTimeout")? {
            Some(s) if s > 43_200 => {
                return Err(SqsError::invalid(
                    "VisibilityTimeout must be within 0 to 43200",
                ));
            }
            Some(s) => Duration::from_secs(s),
            None => queue.visibility_timeout(),
        };
        let mut stop = self.stop.clone();
        let received = tokio::select! {
            received = queue.receive_wait(max as usize, visibility, Duration::from_secs(wait)) => received,
            _ = stop.wait_for(|stopped| *stopped) => Vec::new(),
        };
        let messages: Vec<Value> = received
            .into_iter()
            .map(|m| {
                json!({
                    "MessageId": m.message_id,
                    "ReceiptHandle": m.receipt_handle,
                    "Body": m.body,
                    "Attributes": {
                        "ApproximateReceiveCount": m.receive_count.to_string(),
                        "SentTimestamp": m.sent_at.timestamp_millis().to_string(),
                    },
                })
            })
            .collect();
        Ok(json!({"Messages": messages}))
    }
}

fn batch_entries(input: &Value) -> Result<&Vec<Value>, SqsError> {
    let entries = input["Entries"].as_array().ok_or_else(|| {
        SqsError::new(
            "EmptyBatchRequest",
            "AWS.SimpleQueueService.EmptyBatchRequest",
            "Entries is required",
        )
    })?;
    if entries.is_empty() {
        return Err(SqsError::new(
            "EmptyBatchRequest",
            "AWS.SimpleQueueService.EmptyBatchRequest",
            "There should be at least one entry in the request.",
        ));
    }
    if entries.len() > 10 {
        return Err(SqsError::new(
            "TooManyEntriesInBatchRequest",
            "AWS.SimpleQueueService.TooManyEntriesInBatchRequest",
            "Maximum number of entries per request are 10.",
        ));
    }
    Ok(entries)
}
