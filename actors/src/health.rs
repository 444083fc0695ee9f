//! The engine's health: the first fatal failure of a part of it, if any.
//!
//! A part that can no longer keep its guarantees reports here, once, instead of retrying
//! forever: a remote site whose journal cannot make a limit durable (after a failed
//! fsync the journal refuses everything, so a retry would spin), a remote unit whose disk
//! refuses an apply, a local unit whose journal or disk failed. The part stops doing
//! that work; the engine's owner watches [`Health::failed`] and stops the process with a
//! non-zero exit, and status shows the failure. Nothing acknowledged is lost by this
//! (I3): what was journaled stays journaled, and recovery after the disk is fixed is the
//! same as after a crash.

use std::fmt;
use std::sync::Arc;
use tokio::sync::watch;

/// What failed first, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Failure {
    /// The part that failed, e.g. `system site-b` or `pair p0 remote unit`.
    pub component: String,
    pub error: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: {}", self.component, self.error)
    }
}

/// A shared handle: cloned into every part that may fail, and kept by the engine.
#[derive(Clone)]
pub struct Health(Arc<watch::Sender<Option<Failure>>>);

impl Default for Health {
    fn default() -> Self {
        Health(Arc::new(watch::channel(None).0))
    }
}

impl Health {
    /// Reports a failure. Only the first is kept and logged (at error level); returns
    /// whether this one was the first.
    pub fn fail(&self, component: impl Into<String>, error: impl fmt::Display) -> bool {
        let failure = Failure {
            component: component.into(),
            error: error.to_string(),
        };
        let first = self.0.send_if_modified(|f| match f {
            Some(_) => false,
            None => {
                *f = Some(failure.clone());
                true
            }
        });
        if first {
            tracing::error!(component = %failure.component, error = %failure.error,
                "failed; it stops that work (nothing acknowledged is lost: recovery is as after a crash)");
        }
        first
    }

    /// The first failure, if any.
    pub fn failure(&self) -> Option<Failure> {
        self.0.borrow().clone()
    }

    /// Resolves with the first failure, at once if there is one already. Pending
    /// forever on a healthy engine, so it belongs in a `select!` with the other ways
    /// out (a signal, the work being done).
    pub async fn failed(&self) -> Failure {
        let mut rx = self.0.subscribe();
        loop {
            if let Some(f) = rx.borrow_and_update().clone() {
                return f;
            }
            if rx.changed().await.is_err() {
                // Cannot happen while `self` holds the sender; never resolve if it did.
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_failure_is_kept_and_wakes_the_watcher() {
        let h = Health::default();
        assert_eq!(h.failure(), None);
        let watcher = tokio::spawn({
            let h = h.clone();
            async move { h.failed().await }
        });
        assert!(h.fail("system b", "fsync: EIO"));
        assert!(!h.fail("pair p1 remote unit", "later"));
        let f = watcher.await.ok();
        let want = Failure {
            component: "system b".into(),
            error: "fsync: EIO".into(),
        };
        assert_eq!(f.as_ref(), Some(&want));
        assert_eq!(h.failure(), Some(want.clone()));
        // A watcher that comes later gets it at once.
        assert_eq!(h.failed().await, want);
    }
}
