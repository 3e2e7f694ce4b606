//! Shutdown: the signal future, and the drain of tracked tasks with a deadline.

use std::time::Duration;

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
