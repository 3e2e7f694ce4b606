//! The two clocks of a plain-HTTP client connection, as Envoy and nginx keep them:
//! - **idle** (`limits.http_idle_timeout`): from the end of a response to the first byte
//!   of the next request;
//! - **head** (`limits.handshake_timeout`): from the connection's start, or from that
//!   first byte, to the whole request head.
//!
//! A connection whose clock runs out is closed. hyper has one timer for both (its header
//! read timeout starts when the connection goes idle), which cannot keep a healthy idle
//! connection for a minute and still drop a trickled head after ten seconds.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The shared clock of one client connection: its reads, its requests and the watchdog
/// that closes it.
#[derive(Clone)]
pub(super) struct IdleClock {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Set while no request is in progress and the next one's first byte has not come:
    /// the only case in which a read moves a clock (one load per read otherwise).
    awaiting_first_byte: AtomicBool,
    /// Wakes the watchdog when a deadline moves.
    changed: Notify,
}

struct State {
    started: Instant,
    /// Requests begun, and those whose response has not ended yet.
    requests: u64,
    in_flight: usize,
    /// When the last response ended.
    idle_since: Instant,
    /// The first byte of the next request, read while idle.
    first_byte: Option<Instant>,
}

impl IdleClock {
    pub(super) fn new() -> IdleClock {
        let now = Instant::now();
        IdleClock {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    started: now,
                    requests: 0,
                    in_flight: 0,
                    idle_since: now,
                    first_byte: None,
                }),
                awaiting_first_byte: AtomicBool::new(false),
                changed: Notify::new(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A request head has been read: no clock runs until its response ends.
    pub(super) fn begin_request(&self) -> InFlight {
        self.shared
            .awaiting_first_byte
            .store(false, Ordering::Relaxed);
        let mut state = self.state();
        state.requests += 1;
        state.in_flight += 1;
        state.first_byte = None;
        drop(state);
        self.shared.changed.notify_one();
        InFlight {
            clock: Some(self.clone()),
        }
    }

    fn end_request(&self) {
        let mut state = self.state();
        state.in_flight -= 1;
        if state.in_flight == 0 {
            state.idle_since = Instant::now();
            self.shared
                .awaiting_first_byte
                .store(true, Ordering::Relaxed);
        }
        drop(state);
        self.shared.changed.notify_one();
    }

    fn on_read(&self) {
        if self
            .shared
            .awaiting_first_byte
            .swap(false, Ordering::Relaxed)
        {
            let mut state = self.state();
            if state.in_flight == 0 && state.first_byte.is_none() {
                state.first_byte = Some(Instant::now());
            }
            drop(state);
            self.shared.changed.notify_one();
        }
    }

    /// When the connection is to be closed if nothing changes; `None` while a request is
    /// in progress.
    fn deadline(&self, idle: Duration, head: Duration) -> Option<Instant> {
        let state = self.state();
        if state.in_flight > 0 {
            None
        } else if state.requests == 0 {
            Some(state.started + head)
        } else if let Some(first) = state.first_byte {
            Some(first + head)
        } else {
            Some(state.idle_since + idle)
        }
    }

    /// Resolves when a clock runs out: the connection sat idle longer than `idle`, or a
    /// request head took longer than `head`. Never while a request is in progress.
    pub(super) async fn expired(&self, idle: Duration, head: Duration) {
        loop {
            let changed = self.shared.changed.notified();
            match self.deadline(idle, head) {
                None => changed.await,
                Some(deadline) => {
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep_until(deadline) => {
                            if self.deadline(idle, head).is_some_and(|d| d <= Instant::now()) {
                                return;
                            }
                        }
                    }
                }
            }
        }
    }

    /// The client's stream, with its reads reported to this clock.
    pub(super) fn watch<S>(&self, stream: S) -> Watched<S> {
        Watched {
            stream,
            clock: self.clone(),
        }
    }
}

/// A request in progress; dropped when its response has ended (carried by the body).
pub(super) struct InFlight {
    clock: Option<IdleClock>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(clock) = self.clock.take() {
            clock.end_request();
        }
    }
}

/// A response body that ends its request in flight when hyper is done with it.
pub(super) struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub(super) fn new(body: B, in_flight: InFlight) -> Tracked<B> {
        Tracked {
            body,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client's stream; a read while the connection is idle starts the head clock.
pub(super) struct Watched<S> {
    stream: S,
    clock: IdleClock,
}

impl<S> Watched<S> {
    /// The stream itself, once it is a WebSocket: no clock applies any more.
    pub(super) fn into_inner(self) -> S {
        self.stream
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.clock.on_read();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(60);
    const HEAD: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn each_phase_has_its_own_clock() {
        let clock = IdleClock::new();
        let start = Instant::now();
        assert_eq!(clock.deadline(IDLE, HEAD), Some(start + HEAD), "first head");
        let request = clock.begin_request();
        assert_eq!(clock.deadline(IDLE, HEAD), None, "a request in progress");
        tokio::time::advance(Duration::from_secs(300)).await;
        assert_eq!(clock.deadline(IDLE, HEAD), None, "however long it takes");
        drop(request);
        let idle = Instant::now();
        assert_eq!(clock.deadline(IDLE, HEAD), Some(idle + IDLE), "idle");
        tokio::time::advance(Duration::from_secs(30)).await;
        clock.on_read();
        let first = Instant::now();
        assert_eq!(clock.deadline(IDLE, HEAD), Some(first + HEAD), "next head");
        clock.on_read();
        assert_eq!(
            clock.deadline(IDLE, HEAD),
            Some(first + HEAD),
            "from its first byte"
        );
        let _next = clock.begin_request();
        assert_eq!(clock.deadline(IDLE, HEAD), None);
    }

    #[tokio::test(start_paused = true)]
    async fn expires_only_when_a_clock_runs_out() {
        let clock = IdleClock::new();
        let request = clock.begin_request();
        let watchdog = tokio::spawn({
            let clock = clock.clone();
            async move {
                clock.expired(IDLE, HEAD).await;
                Instant::now()
            }
        });
        tokio::time::advance(Duration::from_secs(600)).await;
        assert!(!watchdog.is_finished(), "expired during a request");
        drop(request);
        let idle = Instant::now();
        let expired = watchdog.await.unwrap();
        assert_eq!(expired, idle + IDLE);
    }
}
