//! `RunLease`: a background task run's hold on its lease as the run sees it — the holder its
//! guarded writes (steps, `ctx.store`) are made under, and the one signal that the lease was
//! lost, raised by whichever write found out first (a heartbeat, a step, a store write) and
//! awaited by the worker, which then stops the run.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

use crate::ports::LeaseHolder;

/// A run's lease: who holds it, and whether it was lost.
pub(crate) struct RunLease {
    holder: LeaseHolder,
    lost: AtomicBool,
    notify: Notify,
}

impl RunLease {
    pub(crate) fn new(holder: LeaseHolder) -> Self {
        Self {
            holder,
            lost: AtomicBool::new(false),
            notify: Notify::new(),
        }
    }

    /// The holder guarded writes are made under.
    pub(crate) fn holder(&self) -> &LeaseHolder {
        &self.holder
    }

    /// Whether a write found the task taken over by another worker.
    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Records that the lease is lost and wakes whoever waits in [`RunLease::lost`].
    pub(crate) fn mark_lost(&self) {
        if !self.lost.swap(true, Ordering::SeqCst) {
            tracing::warn!(task_id = %self.holder.task_id, "lease lost");
        }
        self.notify.notify_waiters();
    }

    /// Resolves once the lease is lost.
    pub(crate) async fn lost(&self) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.is_lost() {
            return;
        }
        notified.await;
    }
}
