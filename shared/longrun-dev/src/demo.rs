//! The demo: each function of the extension that declares example params
//! ([`ChatFunction::example`](longrun::ChatFunction::example)) is called once through the dev
//! stack, in name order, labelled A, B, C…, and what happened is printed — an inline answer,
//! or an instant ack and, later, the result delivered to the chat (a background function, or a
//! job a synchronous handler launched).

use std::time::Duration;

use crate::chat::ChatEventBody;
use longrun::task::TaskId;
use serde_json::{Value, json};

use crate::DevStack;
use crate::transcript::Transcript;

const PENDING: &str = "acked at once; result pending";

/// How the demo went.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoReport {
    /// Every pattern answered, and every background task delivered its result.
    pub complete: bool,
    /// One line per pattern.
    pub lines: Vec<String>,
}

struct Pattern {
    label: String,
    function: String,
    what: &'static str,
    params: Value,
}

fn patterns(extension: &longrun::Extension) -> Vec<Pattern> {
    extension
        .functions()
        .filter_map(|f| Some((f, f.example_params()?.clone())))
        .zip('A'..='Z')
        .map(|((f, params), label)| Pattern {
            label: label.to_string(),
            function: f.name().to_owned(),
            what: if f.is_background() {
                "background: an instant ack, progress, then the result as a new message"
            } else {
                "synchronous: the chat waits for the answer (a job it launches reports back later)"
            },
            params,
        })
        .collect()
}

/// Calls each function with an example as `user` in `chat` and waits for the background
/// results.
pub async fn run(
    stack: &DevStack,
    transcript: Option<&Transcript>,
    user: &str,
    chat: &str,
) -> DemoReport {
    let caught_up = |seq| async move {
        if let Some(transcript) = transcript {
            transcript.caught_up(seq).await;
        }
    };
    let ext = stack.extension().name().to_owned();
    println!("\n── each function with its example, once ─────────────────────────");
    let mut outcomes: Vec<(&Pattern, String)> = Vec::new();
    let mut waiting: Vec<(usize, TaskId)> = Vec::new();
    let patterns = patterns(stack.extension());
    for pattern in &patterns {
        println!(
            "\n{} · {} — {}",
            pattern.label, pattern.function, pattern.what
        );
        let event = json!({
            "action": "call", "ext": ext, "user": user, "chat": chat,
            "function": pattern.function, "params": pattern.params,
        });
        let response = stack.call(event).await;
        caught_up(stack.chat().latest_seq()).await;
        let text = match (&response.result, &response.error) {
            (Some(result), _) => {
                let task_id = result
                    .data
                    .as_ref()
                    .and_then(|d| d.get("task_id"))
                    .and_then(|id| serde_json::from_value::<TaskId>(id.clone()).ok());
                match task_id {
                    Some(task_id) => {
                        waiting.push((outcomes.len(), task_id));
                        PENDING.to_owned()
                    }
                    None => format!(
                        "answered inline — {} {}",
                        if result.ok { "✔" } else { "✖" },
                        result.summary
                    ),
                }
            }
            (None, Some(error)) => format!("refused ({}) — {}", response.status, error.message),
            (None, None) => "no answer".to_owned(),
        };
        outcomes.push((pattern, text));
    }

    let rt = stack.runtime();
    let limit =
        Duration::from_secs(rt.cap_seconds(false)) + rt.settings.lease + Duration::from_secs(30);
    let deadline = tokio::time::Instant::now() + limit;
    let mut latest = stack.chat().subscribe();
    let mut complete = true;
    loop {
        latest.borrow_and_update();
        let events = stack.chat().in_chat(chat);
        let mut pending = 0;
        for (index, task_id) in &waiting {
            let result = events.iter().find_map(|e| match &e.body {
                ChatEventBody::Result {
                    task_id: id,
                    result,
                    ..
                } if id == task_id => Some(result),
                _ => None,
            });
            match result {
                Some(result) => {
                    outcomes[*index].1 = format!(
                        "acked at once; result delivered to the chat — {} {}",
                        if result.ok { "✔" } else { "✖" },
                        result.summary
                    );
                }
                None => pending += 1,
            }
        }
        if pending == 0 {
            break;
        }
        tokio::select! {
            changed = latest.changed() => if changed.is_err() { complete = false; break; },
            _ = tokio::time::sleep_until(deadline) => {
                complete = false;
                for (index, _) in &waiting {
                    if outcomes[*index].1 == PENDING {
                        outcomes[*index].1.push_str(" (not delivered in time)");
                    }
                }
                break;
            }
        }
    }
    caught_up(stack.chat().latest_seq()).await;
    let lines: Vec<String> = outcomes
        .iter()
        .map(|(pattern, text)| format!("{} {}: {text}", pattern.label, pattern.function))
        .collect();
    println!("\n── what happened ────────────────────────────────────────────────");
    for line in &lines {
        println!("  {line}");
    }
    DemoReport { complete, lines }
}
