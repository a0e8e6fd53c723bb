//! How a handler run ends: the terminal state, the result the user sees and, for failures the
//! handler could not express, the critical audit detail.

use std::any::Any;

use crate::ActionResult;
use crate::task::TaskState;

/// A handler run's end, before it is written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Outcome {
    pub state: TaskState,
    pub result: ActionResult,
    /// `Some(detail)` when the end deserves a critical audit item; `detail` is for operators.
    pub critical: Option<Critical>,
    /// The run's last checkpoint (progress, partial result) not written yet: written with
    /// the end rather than in a write of its own just before it.
    pub checkpoint: Option<LastCheckpoint>,
}

/// What a run reported after its last checkpoint write.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct LastCheckpoint {
    pub progress: Option<crate::task::Progress>,
    pub partial: Option<serde_json::Value>,
}

/// A critical audit item's id suffix and detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Critical {
    pub reason: &'static str,
    pub detail: String,
}

impl Outcome {
    /// The handler returned an `ActionResult`.
    pub(crate) fn returned(result: ActionResult) -> Self {
        Self {
            state: TaskState::Succeeded,
            result,
            critical: None,
            checkpoint: None,
        }
    }

    /// The user cancelled.
    pub(crate) fn cancelled(function: &str) -> Self {
        Self {
            state: TaskState::Cancelled,
            result: cancelled_result(function),
            critical: None,
            checkpoint: None,
        }
    }

    /// A failure the handler could not express.
    pub(crate) fn failed(
        function: &str,
        reason: &'static str,
        detail: String,
        retryable: bool,
    ) -> Self {
        Self {
            state: TaskState::Failed,
            result: ActionResult::error(
                format!(
                    "'{function}' failed unexpectedly. The error was recorded for the operators."
                ),
                retryable,
            ),
            critical: Some(Critical { reason, detail }),
            checkpoint: None,
        }
    }

    /// A cancelled or timed-out run hands the user what the handler recorded with
    /// `ctx.partial`, as the result's `data`: `{"partial": value}`. Other ends keep theirs.
    pub(crate) fn with_partial(mut self, partial: Option<&serde_json::Value>) -> Self {
        if let Some(partial) = partial
            && matches!(self.state, TaskState::Cancelled | TaskState::TimedOut)
            && self.result.data.is_none()
        {
            self.result.data = Some(serde_json::json!({ "partial": partial }));
        }
        self
    }

    /// The task ran past its cap.
    pub(crate) fn timed_out(function: &str, cap_s: u64) -> Self {
        Self {
            state: TaskState::TimedOut,
            result: ActionResult::error(
                format!("'{function}' did not finish within its {cap_s} s limit."),
                true,
            ),
            critical: Some(Critical {
                reason: "cap_exceeded",
                detail: format!("task cap of {cap_s} s exceeded"),
            }),
            checkpoint: None,
        }
    }
}

/// The result a cancelled task delivers.
pub(crate) fn cancelled_result(function: &str) -> ActionResult {
    ActionResult::error(format!("'{function}' was cancelled."), false)
}

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
