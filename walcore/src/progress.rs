//! Progress watchdog: no call may hang on a stalled connection.
//!
//! Every answer from the store (a request completed, a piece of a download received) marks
//! progress, process-wide. [`watchdog`] resolves with an error once nothing has moved for the
//! configured time, so a store that accepts connections and then never answers ends the call
//! with a clear error instead of holding PostgreSQL's archiver or startup process.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind};

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds after [`epoch`] of the last progress.
static LAST: AtomicU64 = AtomicU64::new(0);

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Records progress now.
pub fn tick() {
    LAST.fetch_max(now_ms(), Ordering::Relaxed);
}

/// Records progress if the store answered, even with "not found" or "already exists": only
/// a transport failure (no answer) is not progress.
pub fn tick_unless_failed<T>(answer: &Result<T, object_store::Error>) {
    if !matches!(answer, Err(object_store::Error::Generic { .. })) {
        tick();
    }
}

/// Time since the last progress.
pub fn idle() -> Duration {
    Duration::from_millis(now_ms().saturating_sub(LAST.load(Ordering::Relaxed)))
}

/// Resolves once nothing has progressed for `timeout` (counting from this call), with an error
/// naming `store`. Never resolves while progress continues.
pub async fn watchdog(timeout: Duration, store: String) -> Error {
    tick();
    loop {
        let idle = idle();
        if idle >= timeout {
            return Error::new(
                ErrorKind::Transient,
                format!(
                    "no progress for {:.1}s talking to {store} (WALCORE_PROGRESS_TIMEOUT is {:.1}s): the store accepted the request but stopped answering",
                    idle.as_secs_f64(),
                    timeout.as_secs_f64()
                ),
            );
        }
        let step = (timeout - idle).min(Duration::from_millis(250));
        tokio::time::sleep(step.max(Duration::from_millis(10))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_only_without_progress() {
        let timeout = Duration::from_millis(300);
        // Ticking keeps it quiet...
        let busy = async {
            for _ in 0..8 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                tick();
            }
        };
        tokio::select! {
            e = watchdog(timeout, "s3://b".into()) => panic!("fired while progressing: {e}"),
            () = busy => {}
        }
        // ...and silence ends it.
        let e = watchdog(timeout, "s3://b".into()).await;
        assert_eq!(e.kind(), ErrorKind::Transient);
        assert!(e.to_string().contains("no progress"), "{e}");
    }
}
