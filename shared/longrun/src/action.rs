//! `ActionResult`: what a chat function answers, the same flat JSON everywhere
//! (the intake ack, the status view and the message delivered to the chat).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The outcome of a chat function, as the user sees it.
///
/// Wire form: `{"ok":true,"summary":"…","data":{…},"retryable":false}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionResult {
    /// Whether the function succeeded.
    pub ok: bool,
    /// The one line shown in the chat.
    pub summary: String,
    /// Structured payload; `null` for errors, except a cancelled or timed-out task's
    /// fallback, which carries `{"partial": …}` when the handler recorded one
    /// (`ctx.partial`).
    #[serde(default)]
    pub data: Option<Value>,
    /// Whether trying again may help (errors only; always `false` on success).
    #[serde(default)]
    pub retryable: bool,
}

impl ActionResult {
    /// A successful result with a summary and a payload.
    ///
    /// A payload that cannot be represented as JSON (a map with non-string keys, say)
    /// becomes `null` rather than failing the task.
    pub fn success(summary: impl Into<String>, data: impl Serialize) -> Self {
        let data = match serde_json::to_value(data) {
            Ok(Value::Null) | Err(_) => None,
            Ok(value) => Some(value),
        };
        Self {
            ok: true,
            summary: summary.into(),
            data,
            retryable: false,
        }
    }

    /// A failed result: `message` is shown to the user, `retryable` says whether to try again.
    pub fn error(message: impl Into<String>, retryable: bool) -> Self {
        Self {
            ok: false,
            summary: message.into(),
            data: None,
            retryable,
        }
    }

    /// The size of this result on the wire, in bytes.
    pub fn wire_size(&self) -> usize {
        serde_json::to_vec(self)
            .map(|v| v.len())
            .unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn success_has_the_wire_shape() {
        let result = ActionResult::success("Refined output ready! 🎉", json!({"text": "hi"}));
        assert_eq!(
            serde_json::to_value(&result).unwrap(),
            json!({"ok": true, "summary": "Refined output ready! 🎉", "data": {"text": "hi"}, "retryable": false})
        );
    }

    #[test]
    fn error_has_null_data() {
        let result = ActionResult::error("OpenAI key not connected", false);
        assert_eq!(
            serde_json::to_value(&result).unwrap(),
            json!({"ok": false, "summary": "OpenAI key not connected", "data": null, "retryable": false})
        );
    }

    #[test]
    fn unit_data_is_null() {
        assert_eq!(ActionResult::success("done", ()).data, None);
    }
}
