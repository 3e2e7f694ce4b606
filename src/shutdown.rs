//! Shutdown: the signal future, and the drain of tracked tasks with a deadline.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Resolves at the first SIGTERM or SIGINT. From then on a second signal exits the
/// process at once (an operator who presses Ctrl-C twice means it).
pub async fn signal() {
    wait_for_signal().await;
    tracing::info!("shutdown signal received: draining (a second signal exits at once)");
    tokio::spawn(async {
        wait_for_signal().await;
        tracing::warn!("second shutdown signal: exiting now");
        std::process::exit(130);
    });
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // No signal handling available: never resolve rather than shut down at once.
            std::future::pending::<()>().await
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Tells every task to finish (`token`), then waits for them at most `deadline`.
/// Returns false when some were still running at the deadline.
pub async fn drain(token: &CancellationToken, tracker: &TaskTracker, deadline: Duration) -> bool {
    token.cancel();
    tracker.close();
    tokio::time::timeout(deadline, tracker.wait()).await.is_ok()
}
