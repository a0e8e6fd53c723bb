//! The seed, shown: the reference extension's three patterns run once through the dev stack —
//! `refine` (A, synchronous), `refine_output` (B, background) and `start_refinement` with
//! `fast_path: false` (C, a job launched from the handler) — and what happened, printed.

use std::time::Duration;

use longrun::local::ChatEventBody;
use longrun::task::TaskId;
use serde_json::{Value, json};

use super::DevStack;
use super::transcript::Transcript;

/// The text the demo asks to refine.
pub const DEMO_TEXT: &str = "hey team, so basically we're gonna ship the new search on friday. pls review the doc and lmk what u think asap";

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
    label: &'static str,
    function: &'static str,
    what: &'static str,
    params: Value,
}

fn patterns() -> Vec<Pattern> {
    vec![
        Pattern {
            label: "A",
            function: "refine",
            what: "synchronous: the chat waits for the answer",
            params: json!({"input": DEMO_TEXT}),
        },
        Pattern {
            label: "B",
            function: "refine_output",
            what: "background: an instant ack, progress, then the result as a new message",
            params: json!({"input": DEMO_TEXT}),
        },
        Pattern {
            label: "C",
            function: "start_refinement",
            what: "decides at run time: fast_path false launches the refine_job job with its own ack",
            params: json!({"input": DEMO_TEXT, "fast_path": false}),
        },
    ]
}

/// Runs the three patterns as `user` in `chat` and waits for the background results.
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
    let ext = stack.runtime().extension.name().to_owned();
    println!("\n── the seed's three patterns, once ──────────────────────────────");
    let mut outcomes: Vec<(&Pattern, String)> = Vec::new();
    let mut waiting: Vec<(usize, TaskId)> = Vec::new();
    let patterns = patterns();
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
