//! Command deadlines on the monotonic clock.
//!
//! The control plane sends a deadline as Unix milliseconds (`Dispatch::deadline_ms`). The
//! agent reads its wall clock exactly once, when the dispatch arrives, to turn that into
//! the time left, and from then on counts down on tokio's monotonic clock
//! ([`tokio::time::Instant`]). A later step of the wall clock — NTP correcting a clock
//! that was behind, an admin running `date -s` — therefore never cancels running work,
//! nor makes a command outlive its deadline when the clock steps back. (Only the one
//! reading at receipt depends on the wall clock: an agent whose clock is far ahead of
//! the control plane's sees its commands' deadlines as already passed, and says so.)

use std::time::Duration;

use tokio::time::Instant;
use trellis_protocol::CancelReason;

use super::ExecContext;

/// Deadlines further away than this (about 30 years) count as this far.
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 86_400);

/// The wall clock, in Unix milliseconds: read once per dispatch. Tests inject their own.
pub trait WallClock: Send + Sync {
    fn now_ms(&self) -> i64;
}

/// How long past its deadline a dispatch may still arrive (clock skew between the hosts).
pub const LATE_ARRIVAL_GRACE_MS: i64 = 5 * 60 * 1000;

/// A dispatch whose deadline passed longer ago than any clock skew explains: the control
/// plane never sends one (its deadline sweep ends such commands), so it is a replay of an
/// old signed frame (a row set back to `queued`), and it must not run.
pub fn long_past(deadline_ms: i64, clock: &dyn WallClock) -> bool {
    clock.now_ms().saturating_sub(deadline_ms) > LATE_ARRIVAL_GRACE_MS
}

/// The system's real-time clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

/// A command's deadline as a point on the monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    at: Instant,
    /// What was left of it when it arrived.
    pub remaining: Duration,
}

impl Deadline {
    /// Converts the server's absolute deadline (Unix ms) once, on receipt: the only read
    /// of the wall clock for this command.
    pub fn from_server(deadline_ms: i64, clock: &dyn WallClock) -> Self {
        let left_ms = deadline_ms.saturating_sub(clock.now_ms()).max(0);
        // A deadline from the network may be absurdly far: never overflow the Instant.
        let remaining = Duration::from_millis(left_ms as u64).min(FAR_FUTURE);
        Self {
            at: Instant::now() + remaining,
            remaining,
        }
    }

    /// The monotonic instant the command must stop at.
    pub fn instant(&self) -> Instant {
        self.at
    }

    /// Cancels `ctx` with [`CancelReason::TimedOut`] at the deadline, unless it ends (its
    /// token is cancelled for another reason) first. Counts on the monotonic clock only.
    pub async fn enforce(self, ctx: ExecContext) {
        tokio::select! {
            _ = tokio::time::sleep_until(self.at) => ctx.request_cancel(CancelReason::TimedOut),
            _ = ctx.cancel.cancelled() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use uuid::Uuid;

    /// A wall clock that steps forward by an hour after its first reading, as NTP does
    /// to a clock that was behind. An implementation that consulted the wall clock while
    /// the command runs (polling it, or sleeping until a wall-clock time) would see the
    /// deadline as long past and time the command out at once; this one must not.
    struct SteppingClock {
        start_ms: i64,
        reads: AtomicU32,
    }

    impl WallClock for SteppingClock {
        fn now_ms(&self) -> i64 {
            let n = self.reads.fetch_add(1, Ordering::SeqCst);
            if n == 0 {
                self.start_ms
            } else {
                self.start_ms + 3_600_000
            }
        }
    }

    fn ctx() -> ExecContext {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        std::mem::forget(rx);
        let id = Uuid::new_v4();
        ExecContext::new(id, id, 1, tx)
    }

    /// Lets the spawned watcher run up to its next await (time is paused, so it never
    /// moves by itself here: only `advance` moves it).
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn only_a_deadline_long_past_is_refused() {
        struct At(i64);
        impl WallClock for At {
            fn now_ms(&self) -> i64 {
                self.0
            }
        }
        let now = At(1_000_000_000);
        assert!(!long_past(now.0 + 1, &now), "in the future");
        assert!(!long_past(now.0 - 1000, &now), "just passed: clock skew");
        assert!(!long_past(now.0 - LATE_ARRIVAL_GRACE_MS, &now));
        assert!(long_past(now.0 - LATE_ARRIVAL_GRACE_MS - 1, &now));
        assert!(long_past(i64::MIN, &now), "no overflow");
        assert!(!long_past(i64::MAX, &now));
    }

    #[tokio::test(start_paused = true)]
    async fn a_forward_wall_clock_step_does_not_time_out_running_work() {
        let clock = SteppingClock {
            start_ms: 1_700_000_000_000,
            reads: AtomicU32::new(0),
        };
        let deadline = Deadline::from_server(clock.start_ms + 10_000, &clock);
        assert_eq!(deadline.remaining, Duration::from_secs(10));
        let ctx = ctx();
        let watcher = tokio::spawn(deadline.enforce(ctx.clone()));
        settle().await;
        // The wall clock has now jumped an hour ahead (every further read says so), far
        // past the deadline; 9.9 s of monotonic time pass: the command keeps running.
        assert_eq!(clock.now_ms(), clock.start_ms + 3_600_000);
        tokio::time::advance(Duration::from_millis(9_900)).await;
        settle().await;
        assert!(!ctx.is_cancelled(), "cancelled by a wall-clock step");
        // At 10 s of monotonic time the deadline is reached.
        tokio::time::advance(Duration::from_millis(200)).await;
        settle().await;
        assert!(ctx.is_cancelled(), "the deadline did not stop the command");
        assert_eq!(ctx.cancel_reason(), Some(CancelReason::TimedOut));
        watcher.await.unwrap();
        // One read on receipt, one by this test.
        assert_eq!(clock.reads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_backward_wall_clock_step_does_not_extend_the_deadline() {
        struct BackClock(AtomicU32);
        impl WallClock for BackClock {
            fn now_ms(&self) -> i64 {
                if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                    5_000_000
                } else {
                    1_000_000
                }
            }
        }
        let clock = BackClock(AtomicU32::new(0));
        let deadline = Deadline::from_server(5_000_000 + 2_000, &clock);
        let ctx = ctx();
        tokio::spawn(deadline.enforce(ctx.clone()));
        settle().await;
        tokio::time::advance(Duration::from_millis(2_001)).await;
        settle().await;
        assert_eq!(ctx.cancel_reason(), Some(CancelReason::TimedOut));
    }

    #[tokio::test(start_paused = true)]
    async fn a_command_that_ends_first_stops_its_watcher() {
        let deadline = Deadline::from_server(i64::MAX, &SystemClock);
        assert_eq!(
            deadline.remaining, FAR_FUTURE,
            "no overflow on a huge deadline"
        );
        let ctx = ctx();
        let watcher = tokio::spawn(deadline.enforce(ctx.clone()));
        ctx.request_cancel(CancelReason::Cancelled);
        watcher.await.unwrap();
        assert_eq!(ctx.cancel_reason(), Some(CancelReason::Cancelled));
        // A deadline already passed on receipt (or a clock far ahead) stops at once.
        let past = Deadline::from_server(0, &SystemClock);
        assert_eq!(past.remaining, Duration::ZERO);
    }
}
