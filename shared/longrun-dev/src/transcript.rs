//! The terminal transcript: the conversation as it happens, one line per event — the user's
//! call, intake's answer (an inline result or the ack of a background task), progress bars and
//! results, errors marked `✖`.

use std::sync::Arc;

use crate::chat::{ChatEvent, ChatEventBody, LocalChat};
use longrun::ActionResult;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Longest text shown for one value before it is shortened.
const SHOWN_CHARS: usize = 300;

/// The transcript printer. It stops with the stack, after printing what is left.
pub struct Transcript {
    printed: watch::Receiver<u64>,
    handle: JoinHandle<()>,
}

impl Transcript {
    /// Prints the conversation of `chat` to stdout from now on (`color`: ANSI colours).
    pub fn spawn(chat: Arc<LocalChat>, mut stop: watch::Receiver<bool>, color: bool) -> Self {
        let (printed_tx, printed) = watch::channel(0u64);
        let mut latest = chat.subscribe();
        let handle = tokio::spawn(async move {
            let mut last = 0;
            loop {
                latest.borrow_and_update();
                for event in chat.events_after(last) {
                    println!("{}", render(&event, color));
                    last = event.seq;
                }
                printed_tx.send_replace(last);
                tokio::select! {
                    changed = latest.changed() => if changed.is_err() { return },
                    _ = stop.wait_for(|stopped| *stopped) => {
                        for event in chat.events_after(last) {
                            println!("{}", render(&event, color));
                        }
                        return;
                    }
                }
            }
        });
        Self { printed, handle }
    }

    /// Waits (briefly) for the printer to print what is left after the stack stopped.
    pub async fn finish(mut self) {
        let handle = std::mem::replace(&mut self.handle, tokio::spawn(async {}));
        let abort = handle.abort_handle();
        if tokio::time::timeout(std::time::Duration::from_secs(2), handle)
            .await
            .is_err()
        {
            abort.abort();
        }
    }

    /// Waits until every event up to `seq` is printed.
    pub async fn caught_up(&self, seq: u64) {
        let mut printed = self.printed.clone();
        let _ = printed.wait_for(|p| *p >= seq).await;
    }
}

impl Drop for Transcript {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

fn shorten(text: &str) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > SHOWN_CHARS {
        one_line.chars().take(SHOWN_CHARS - 1).collect::<String>() + "…"
    } else {
        one_line
    }
}

fn short_id(task_id: &impl std::fmt::Display) -> String {
    let id = task_id.to_string();
    format!("task …{}", &id[id.len().saturating_sub(6)..])
}

/// `[█████░░░░░░░░░░░░░░░]  25%`.
pub fn bar(pct: u8, width: usize) -> String {
    let pct = pct.min(100);
    let filled = usize::from(pct) * width / 100;
    format!(
        "[{}{}] {:>3}%",
        "█".repeat(filled),
        "░".repeat(width - filled),
        pct
    )
}

/// What a result shows beyond its summary: `data.text`, or the data as JSON.
pub fn result_detail(result: &ActionResult) -> Option<String> {
    match &result.data {
        None | Some(Value::Null) => None,
        Some(data) => match data.get("text").and_then(Value::as_str) {
            Some(text) => Some(text.to_owned()),
            None if data.get("task_id").is_some()
                && data.as_object().is_some_and(|o| o.len() == 1) =>
            {
                None
            }
            None => Some(data.to_string()),
        },
    }
}

fn paint(text: &str, code: &str, color: bool) -> String {
    if color {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

/// One transcript line (two for a result with text).
pub fn render(event: &ChatEvent, color: bool) -> String {
    let time = event.at.with_timezone(&chrono::Local).format("%H:%M:%S");
    let who = |name: &str| format!("{time}  {:<10}", shorten(name));
    match &event.body {
        ChatEventBody::Call {
            function, params, ..
        } => format!(
            "{} {} {}  {}",
            who(&event.user),
            paint("→", "1", color),
            paint(function, "1", color),
            shorten(&params.to_string())
        ),
        ChatEventBody::Reply {
            result, task_id, ..
        } => {
            let (mark, code) = match (result.ok, task_id) {
                (false, _) => ("✖", "31"),
                (true, Some(_)) => ("↩", "36"),
                (true, None) => ("✔", "32"),
            };
            let mut line = format!(
                "{} {} {}",
                who("bot"),
                paint(mark, code, color),
                paint(&shorten(&result.summary), code, color)
            );
            if let Some(task_id) = task_id {
                line.push_str(&paint(&format!("  ({})", short_id(task_id)), "2", color));
            }
            if let Some(detail) = result_detail(result) {
                line.push_str(&format!("\n{:<20} {}", "", shorten(&detail)));
            }
            line
        }
        ChatEventBody::Refused {
            function,
            status,
            message,
            ..
        } => format!(
            "{} {} {}",
            who("bot"),
            paint("✖", "31", color),
            paint(
                &format!("{function} refused ({status}): {}", shorten(message)),
                "31",
                color
            )
        ),
        ChatEventBody::Progress {
            task_id, progress, ..
        } => format!(
            "{} {} {} {}{}",
            who("bot"),
            paint("⋯", "33", color),
            paint(&bar(progress.pct, 20), "33", color),
            shorten(&progress.message),
            paint(&format!("  ({})", short_id(task_id)), "2", color)
        ),
        ChatEventBody::Result {
            task_id, result, ..
        } => {
            let (mark, code) = if result.ok {
                ("✔", "32")
            } else {
                ("✖", "31")
            };
            let mut line = format!(
                "{} {} {}{}",
                who("bot"),
                paint(mark, code, color),
                paint(&shorten(&result.summary), code, color),
                paint(&format!("  ({})", short_id(task_id)), "2", color)
            );
            if let Some(detail) = result_detail(result) {
                line.push_str(&format!("\n{:<20} {}", "", shorten(&detail)));
            }
            line
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_with_the_percentage() {
        assert_eq!(bar(0, 10), "[░░░░░░░░░░]   0%");
        assert_eq!(bar(45, 10), "[████░░░░░░]  45%");
        assert_eq!(bar(200, 10), "[██████████] 100%");
    }
}
