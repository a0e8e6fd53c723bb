//! Sample events for an extension, from its functions' example params: one `call` per function
//! that declares them,
//! `status`, `cancel` and `list`, a work-queue and a delivery-queue batch, and the sweeper's
//! schedule — what `sam local invoke -e` and `cargo lambda invoke --data-file` take.

use std::path::{Path, PathBuf};

use longrun::{Extension, ToolSpec};
use serde_json::{Value, json};

use crate::DevError;

/// The task id the samples name (any valid ULID; status and cancel of it answer 404 until a
/// task with that id exists).
pub const SAMPLE_TASK_ID: &str = "01M8997DG01YQ7K3ZC6M4T9H8P";
/// The user and chat of the samples.
const USER: &str = "u1";
const CHAT: &str = "c1";

/// The sample events of `extension`, as (file name, event).
pub fn samples(extension: &Extension) -> Vec<(String, Value)> {
    samples_for(extension.name(), &extension.tool_manifest())
}

/// The sample events of the extension `ext` whose functions the manifest `tools` describes
/// (their `examples`, `background`, `long_running` and `event`), as (file name, event).
pub fn samples_for(ext: &str, tools: &[ToolSpec]) -> Vec<(String, Value)> {
    let mut samples = Vec::new();
    let mut first_background = None;
    // A function without example params gets no sample: `{}` would only show a 422.
    for tool in tools {
        let Some(params) = tool.examples.first().cloned() else {
            continue;
        };
        if tool.background && first_background.is_none() {
            first_background = Some((tool, params.clone()));
        }
        samples.push((
            format!("intake-call-{}.json", tool.name),
            json!({
                "action": "call", "ext": ext, "user": USER, "chat": CHAT,
                "request_id": format!("r-{}", tool.name),
                "function": tool.name, "params": params,
            }),
        ));
    }
    for action in ["status", "cancel"] {
        samples.push((
            format!("intake-{action}.json"),
            json!({"action": action, "ext": ext, "user": USER, "task_id": SAMPLE_TASK_ID}),
        ));
    }
    samples.push((
        "intake-list.json".to_owned(),
        json!({"action": "list", "ext": ext, "user": USER, "limit": 20}),
    ));
    if let Some((tool, params)) = first_background {
        let body = json!({
            "task_id": SAMPLE_TASK_ID, "ext": ext, "user": USER, "chat": CHAT,
            "function": tool.name, "kind": "function", "event": tool.event,
            "name": null, "params": params,
            "cap_s": if tool.long_running { 1800 } else { 180 },
            // Not the `call` sample's request id: played after it, the worker would take this
            // for a retry of that call and drop it.
            "created_at": "2026-11-25T12:00:00.000Z", "request_id": "r-sample-task",
        });
        samples.push((
            "worker-sqs.json".to_owned(),
            sqs_batch("WorkQueue", &[body.to_string()]),
        ));
    }
    let progress = json!({"kind": "progress", "task_id": SAMPLE_TASK_ID, "seq": 1,
                          "progress": {"pct": 15, "message": "Working"}});
    let result = json!({"kind": "result", "task_id": SAMPLE_TASK_ID});
    samples.push((
        "delivery-sqs.json".to_owned(),
        sqs_batch("DeliveryQueue", &[progress.to_string(), result.to_string()]),
    ));
    samples.push((
        "sweeper-schedule.json".to_owned(),
        json!({
            "version": "0", "id": "53dc4d37-cffa-4f76-80c9-8b7d4a4d2eaa",
            "detail-type": "Scheduled Event", "source": "aws.events",
            "account": "123456789012", "time": "2026-11-25T12:01:00Z", "region": "us-east-1",
            "resources": ["arn:aws:events:us-east-1:123456789012:rule/longrun-SweeperSchedule"],
            "detail": {},
        }),
    ));
    samples
}

/// An SQS event source mapping's batch from the queue `logical` with these bodies.
fn sqs_batch(logical: &str, bodies: &[String]) -> Value {
    let records: Vec<Value> = bodies
        .iter()
        .enumerate()
        .map(|(i, body)| {
            json!({
                "messageId": format!("00000000-0000-4000-8000-{i:012}"),
                "receiptHandle": format!("sample-receipt-handle-{i}"),
                "body": body,
                "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "1795608000012"},
                "messageAttributes": {},
                "eventSource": "aws:sqs",
                "eventSourceARN": format!("arn:aws:sqs:us-east-1:123456789012:longrun-{logical}"),
                "awsRegion": "us-east-1",
            })
        })
        .collect();
    json!({ "Records": records })
}

/// Writes [`samples`] into `dir` (created if needed); returns the paths written.
pub fn write(extension: &Extension, dir: &Path) -> Result<Vec<PathBuf>, DevError> {
    write_samples(samples(extension), dir)
}

/// Writes sample events (from [`samples`] or [`samples_for`]) into `dir`.
pub fn write_samples(samples: Vec<(String, Value)>, dir: &Path) -> Result<Vec<PathBuf>, DevError> {
    let io = |e: std::io::Error| DevError::Other(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut written = Vec::new();
    for (name, event) in samples {
        let path = dir.join(name);
        let text =
            serde_json::to_string_pretty(&event).map_err(|e| DevError::Other(e.to_string()))?;
        std::fs::write(&path, text + "\n").map_err(io)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use longrun::{ActionResult, ChatFunction, Ctx};

    use super::*;

    async fn echo(_ctx: Ctx, params: Value) -> longrun::Result<ActionResult> {
        Ok(ActionResult::success("ok", params))
    }

    #[test]
    fn every_function_gets_a_call_with_its_example_and_the_queues_a_batch() {
        let ext = Extension::new("probe")
            .function(ChatFunction::new("quick", echo).example(json!({"a": 1})))
            .function(
                ChatFunction::new("slow", echo)
                    .background(true)
                    .example(json!({"b": 2})),
            );
        let samples = samples(&ext);
        let names: Vec<&str> = samples.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "intake-call-quick.json",
                "intake-call-slow.json",
                "intake-status.json",
                "intake-cancel.json",
                "intake-list.json",
                "worker-sqs.json",
                "delivery-sqs.json",
                "sweeper-schedule.json"
            ]
        );
        assert_eq!(samples[1].1["params"], json!({"b": 2}));
        let body: Value =
            serde_json::from_str(samples[5].1["Records"][0]["body"].as_str().unwrap()).unwrap();
        assert_eq!(body["function"], "slow");
        let work: longrun::wire::WorkMessage = serde_json::from_value(body).unwrap();
        assert_eq!(work.ext, "probe");
    }
}
