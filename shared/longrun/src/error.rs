//! The error a handler returns when it cannot produce an `ActionResult`, and `Cancelled`.
//!
//! Handlers return [`Result<ActionResult>`](crate::Result). Any `std::error::Error` converts
//! into [`Error`] with `?`, so a handler can propagate an HTTP, JSON or progress error as it
//! would in any Rust program. The runtime turns such an error into a fallback error message in
//! the user's chat and a `critical` audit item (the Rust form of
//! I-LONGRUN-BG-CORO-RETURNS-ACTIONRESULT), except for cancellation, which ends the task as
//! `cancelled`.

use std::error::Error as StdError;
use std::fmt;

/// The user cancelled the task. Returned by [`Ctx::progress`](crate::Ctx::progress);
/// propagate it with `?` and the runtime delivers the cancellation to the chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("task cancelled by the user")]
pub struct Cancelled;

/// Any failure a handler propagates instead of returning an `ActionResult`.
pub struct Error {
    inner: Box<dyn StdError + Send + Sync + 'static>,
}

/// `Result<T, longrun::Error>`: the return type of handlers.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error from a plain message.
    pub fn msg(message: impl fmt::Display) -> Self {
        Self {
            inner: Box::new(Message(message.to_string())),
        }
    }

    /// Whether this error means the task was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.inner.is::<Cancelled>()
            || matches!(
                self.inner.downcast_ref::<crate::HttpError>(),
                Some(crate::HttpError::Cancelled)
            )
            || matches!(
                self.inner.downcast_ref::<crate::ProgressError>(),
                Some(crate::ProgressError::Cancelled)
            )
    }

    /// The result the user gets for an error the runtime can explain to them — a secret not
    /// connected, a daily budget used up — instead of the fallback "failed unexpectedly".
    pub(crate) fn user_result(&self) -> Option<crate::ActionResult> {
        if let Some(missing) = self.downcast_ref::<crate::SecretError>() {
            return Some(missing.to_result());
        }
        match self.downcast_ref::<crate::ChargeError>() {
            Some(over @ crate::ChargeError::OverBudget { .. }) => Some(over.to_result()),
            _ => None,
        }
    }

    /// The underlying error, if it is of type `E`.
    pub fn downcast_ref<E: StdError + 'static>(&self) -> Option<&E> {
        self.inner.downcast_ref::<E>()
    }
}

impl<E: StdError + Send + Sync + 'static> From<E> for Error {
    fn from(error: E) -> Self {
        Self {
            inner: Box::new(error),
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.inner, f)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)?;
        let mut source = self.inner.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Message(String);

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for Message {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancelled_survives_the_question_mark() {
        fn handler() -> Result<()> {
            Err(Cancelled)?;
            Ok(())
        }
        assert!(handler().unwrap_err().is_cancelled());
    }

    #[test]
    fn other_errors_are_not_cancellation() {
        let err = Error::from(serde_json::from_str::<u8>("x").unwrap_err());
        assert!(!err.is_cancelled());
        assert!(err.to_string().contains("expected value"));
    }
}
