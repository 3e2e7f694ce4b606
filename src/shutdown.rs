//! Shutdown: the signal future, the drain of tracked tasks with a deadline, and the
//! schedule that spreads the WebSockets' closes over `shutdown.close_spread`.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Resolves at the first SIGTERM or SIGINT. From then on a second signal exits the
/// process at once (an operator who presses Ctrl-C twice means it).
///
/// The handlers are installed when this is called, not when the future is first polled:
/// until then SIGTERM would kill the process outright (its default action), so call it
/// before anything listens.
pub fn signal() -> impl std::future::Future<Output = ()> {
    // One set of listeners for both signals: a signal that arrives while no listener
    // exists is lost, so the second one must not depend on a task being scheduled.
    let mut signals = Signals::new();
    async move {
        signals.recv().await;
        tracing::info!("shutdown signal received: draining (a second signal exits at once)");
        tokio::spawn(async move {
            signals.recv().await;
            tracing::warn!("second shutdown signal: exiting now");
            std::process::exit(130);
        });
    }
}

/// SIGTERM (what Kubernetes sends) and SIGINT (Ctrl-C).
#[cfg(unix)]
struct Signals(Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>);

#[cfg(unix)]
impl Signals {
    fn new() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => Signals(Some((term, int))),
            _ => Signals(None),
        }
    }

    async fn recv(&mut self) {
        match &mut self.0 {
            Some((term, int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            // No signal handling available: never resolve rather than shut down at once.
            None => std::future::pending::<()>().await,
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn new() -> Self {
        Signals
    }

    async fn recv(&mut self) {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Tells every task to finish (`token`), then waits for them at most `deadline`.
/// Returns false when some were still running at the deadline.
pub async fn drain(token: &CancellationToken, tracker: &TaskTracker, deadline: Duration) -> bool {
    token.cancel();
    tracker.close();
    tokio::time::timeout(deadline, tracker.wait()).await.is_ok()
}

/// `shutdown.close_spread`: when each WebSocket's drain begins. The drain starts with
/// [`begin`](Self::begin); each relay, told to shut down, takes its [`turn`](Self::turn).
/// Turns are evenly spaced, so the clients of a terminating pod reconnect to the others
/// at an even rate rather than all in the same second.
#[derive(Debug, Default)]
pub struct CloseSpread {
    slots: Mutex<Option<Slots>>,
}

#[derive(Debug, Clone, Copy)]
struct Slots {
    start: Instant,
    spread: Duration,
    /// The WebSockets open when the drain began: one turn each.
    total: usize,
    /// Turns handed out so far.
    taken: usize,
}

impl CloseSpread {
    /// The drain begins at `start`: the `total` WebSockets open now get their turns over
    /// `spread`. Call it before the relays are told to shut down.
    pub fn begin(&self, start: Instant, spread: Duration, total: usize) {
        *self.lock() = Some(Slots {
            start,
            spread,
            total,
            taken: 0,
        });
    }

    /// When the calling connection's drain begins; `None` before [`begin`](Self::begin)
    /// (a relay told to shut down by something else than a drain): at once.
    pub fn turn(&self) -> Option<Instant> {
        let mut slots = self.lock();
        let s = slots.as_mut()?;
        let k = s.taken;
        s.taken += 1;
        Some(s.start + spread_offset(s.spread, s.total, k))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Slots>> {
        // A panic elsewhere while holding the lock leaves the slots whole: keep using them.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The offset of turn `k` of `total`, evenly spaced over `spread`: the first at 0, one
/// every `spread / total`, the last at `spread - spread / total`, so its close handshake
/// still has time before `drain_timeout` when the spread is as long as that. A turn past
/// `total` (a WebSocket whose handshake finished after the drain began) takes the last.
pub fn spread_offset(spread: Duration, total: usize, k: usize) -> Duration {
    if total == 0 {
        return Duration::ZERO;
    }
    let k = k.min(total - 1);
    // In nanoseconds, in u128: no overflow for any spread a Duration holds.
    let nanos = spread.as_nanos() * k as u128 / total as u128;
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_are_evenly_spaced_over_the_spread() {
        let spread = Duration::from_secs(2);
        let offsets: Vec<Duration> = (0..100).map(|k| spread_offset(spread, 100, k)).collect();
        assert_eq!(offsets[0], Duration::ZERO);
        assert_eq!(offsets[99], Duration::from_millis(1980));
        for pair in offsets.windows(2) {
            assert_eq!(pair[1] - pair[0], Duration::from_millis(20));
        }
    }

    #[test]
    fn turns_past_the_count_take_the_last_and_no_spread_is_at_once() {
        let spread = Duration::from_secs(10);
        assert_eq!(spread_offset(spread, 4, 3), Duration::from_millis(7500));
        assert_eq!(spread_offset(spread, 4, 4), Duration::from_millis(7500));
        assert_eq!(spread_offset(spread, 4, 1000), Duration::from_millis(7500));
        assert_eq!(spread_offset(spread, 1, 0), Duration::ZERO);
        assert_eq!(spread_offset(spread, 0, 5), Duration::ZERO);
        for k in 0..10 {
            assert_eq!(spread_offset(Duration::ZERO, 10, k), Duration::ZERO);
        }
        // A year over a million connections: no overflow, still in order.
        let year = Duration::from_secs(365 * 86_400);
        assert!(spread_offset(year, 1_000_000, 999_999) < year);
    }

    #[test]
    fn each_connection_takes_the_next_turn_once_the_drain_began() {
        let spread = CloseSpread::default();
        assert_eq!(spread.turn(), None, "no drain yet: at once");
        let start = Instant::now();
        spread.begin(start, Duration::from_secs(3), 3);
        let turns: Vec<_> = (0..5).map(|_| spread.turn().unwrap() - start).collect();
        assert_eq!(
            turns,
            [0, 1, 2, 2, 2].map(Duration::from_secs),
            "one second apart, late comers at the last turn"
        );
    }
}
