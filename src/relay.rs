//! The per-connection relay: the only code that holds both sockets. One task, one
//! `select!` over both legs, one timer driven by the heartbeat and close state machines,
//! and the shutdown token.
//!
//! Frames are forwarded as they arrive, header and payload bytes unchanged (a client's
//! masked frame reaches the upstream with the client's own mask): no message is
//! reassembled, and an idle connection holds no buffer. Reads land in a buffer on the
//! stack and are copied to the other leg's output, which is written at once; only what
//! the peer does not take stays allocated, and while it does the other leg is not read
//! (backpressure). wsbeat's own frames (heartbeats, PINGs, PONGs, closes) are put between
//! forwarded frames, heartbeats between messages.
//!
//! Submodules, one job each: [`closing`] decides how the legs are closed (pure),
//! `forward` handles the frames read from a leg, `wire` holds one leg's buffers and
//! writes them.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Route;
use crate::conn::{ConnectionView, Leg, Outcome, PerLeg, Summary};
use crate::frame::{self, Parser, Sender};
use crate::heartbeat::{Action as Due, Heartbeat, Schedule};
use crate::metrics::ConnMetrics;
use crate::shutdown::CloseSpread;

pub mod closing;
#[cfg(test)]
mod endings;
mod forward;
#[cfg(test)]
mod tests;
mod wire;

pub use closing::{drain_grace, jittered_age, CLOSE_GRACE};
use closing::{Action, Closing, DrainCause};
use forward::Messages;
use wire::Wire;

/// At most this many ready events are handled before a liveness verdict.
const READY_EVENTS_BEFORE_VERDICT: usize = 64;
/// Bytes read from a socket at once (on the stack, not kept between reads).
const READ_CHUNK: usize = 32 * 1024;
/// A peer that has this many bytes waiting for it (wsbeat's own frames, PONGs, queued or
/// deferred behind a frame being forwarded) is not read until it takes them: a PING
/// flood from a peer that does not read cannot grow memory.
const OWN_FRAMES_LIMIT: usize = 8 * 1024;
/// Timer deadlines are rounded up to this grid, so that the timers of many idle
/// connections fire in one wake-up of the runtime instead of one each: heartbeats may
/// be this much later than due, in exchange for a fraction of the CPU per heartbeat.
const TIMER_GRANULARITY: Duration = Duration::from_millis(10);
/// How long the relay waits, at the end, for each open leg to take its FIN.
const SHUTDOWN_WRITE: Duration = Duration::from_millis(100);

/// What one connection needs besides its two sockets.
pub struct RelayContext {
    pub route: Arc<Route>,
    /// Metric handles resolved once for the route.
    pub metrics: ConnMetrics,
    /// The shared view behind `/connections`.
    pub view: Arc<ConnectionView>,
    pub max_message_size: u64,
    /// `permessage-deflate` was negotiated end to end: RSV1 passes on data messages.
    pub compressed: bool,
    pub write_timeout: Duration,
    pub shutdown: CancellationToken,
    /// When this connection's close goes out once `shutdown` fires
    /// (`shutdown.close_spread`).
    pub close_spread: Arc<CloseSpread>,
    /// This connection's age limit, jittered (`limits.max_connection_age`, see
    /// [`jittered_age`]): past it, it is drained like a shutdown drains it.
    pub max_age: Option<Duration>,
    /// How long a drain waits for the client's close reply before closing the upstream:
    /// CLOSE_GRACE, or less when `shutdown.drain_timeout` leaves no room for it (see
    /// [`drain_grace`]).
    pub drain_grace: Duration,
    /// When the client handshake completed: the liveness clock starts here.
    pub started: Instant,
}

/// A leg's socket and the bytes that arrived with its handshake.
pub struct Socket<S> {
    pub io: S,
    /// Bytes read past the handshake (the first frames), processed before any read.
    pub leftover: bytes::Bytes,
}

/// Rounds `t` up to the next multiple of `TIMER_GRANULARITY` since a process-wide epoch.
fn on_grid(t: Instant) -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    let grid = TIMER_GRANULARITY.as_nanos();
    let since = t.saturating_duration_since(epoch).as_nanos();
    let rounded = since.div_ceil(grid) * grid;
    epoch + Duration::from_nanos(u64::try_from(rounded).unwrap_or(u64::MAX))
}

/// What `poll_event` saw.
enum Event {
    /// Bytes were read and processed.
    Progress,
    /// The peer ended its stream (EOF).
    Eof(Leg),
    ReadFailed(Leg, io::Error),
    WriteFailed(Leg, io::Error),
    /// A write started waiting for its peer: the timer must include its deadline.
    Blocked,
}

/// Relays one connection until both legs are closed; the future returns how it ended.
///
/// Not an `async fn`: the relay is built here and only its loop is the future, so the
/// connection's state is stored once per task, not twice.
pub fn run<C, U>(
    client: Socket<C>,
    upstream: Socket<U>,
    ctx: RelayContext,
) -> impl std::future::Future<Output = Summary>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let heartbeat = ctx
        .route
        .heartbeat
        .message
        .as_ref()
        .filter(|_| ctx.route.heartbeat.drop_client)
        .map(|m| AsRef::<bytes::Bytes>::as_ref(m).clone());
    // Boxed: an async fn's argument is stored apart from its locals, so a large `self`
    // by value would take its room twice in every connection's task.
    let mut relay = Box::new(Relay {
        client_io: Some(client.io),
        upstream_io: Some(upstream.io),
        wires: PerLeg {
            client: Wire::new(
                Parser::new(Sender::Client, ctx.max_message_size, heartbeat)
                    .with_compression(ctx.compressed),
                false,
            ),
            upstream: Wire::new(
                Parser::new(Sender::Server, ctx.max_message_size, None)
                    .with_compression(ctx.compressed),
                true,
            ),
        },
        heartbeat: Heartbeat::new(Schedule::for_route(&ctx.route), ctx.started),
        closing: Closing::new(ctx.drain_grace),
        shutdown_seen: false,
        heartbeat_waiting: false,
        dropped: PerLeg::default(),
        messages_this_read: Messages::default(),
        client_first: true,
        ctx,
    });
    // The leftovers are slices of hyper's handshake buffers: process them, then let
    // them go, so the buffers are not held for the life of the connection.
    for (leg, leftover) in [
        (Leg::Client, client.leftover),
        (Leg::Upstream, upstream.leftover),
    ] {
        if !leftover.is_empty() {
            relay.process(leg, &leftover);
        }
    }
    if let Some(age) = relay.ctx.max_age {
        let at = relay.ctx.started + age;
        let actions = relay
            .closing
            .plan_drain(DrainCause::MaxAge, at, Instant::now());
        relay.apply(actions);
    }
    relay.run()
}

struct Relay<C, U> {
    /// The legs' sockets; `None` once a leg is cut (see [`Action::Cut`]).
    client_io: Option<C>,
    upstream_io: Option<U>,
    wires: PerLeg<Wire>,
    heartbeat: Heartbeat,
    /// Where each leg's close handshake stands, and how the connection ends.
    closing: Closing,
    /// The shutdown token fired (and this connection's turn to drain is planned).
    shutdown_seen: bool,
    /// A heartbeat waits for the message being forwarded to the client to end.
    heartbeat_waiting: bool,
    /// Data messages dropped because the other leg was closed, by source leg.
    dropped: PerLeg<u64>,
    /// Messages forwarded during the read being processed: published to the counters
    /// once per read, not once per message.
    messages_this_read: Messages,
    /// Alternates which leg is read first, so a busy leg cannot starve the other.
    client_first: bool,
    ctx: RelayContext,
}

impl<C, U> Relay<C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    async fn run(mut self: Box<Self>) -> Summary {
        let shutdown = self.ctx.shutdown.clone().cancelled_owned();
        tokio::pin!(shutdown);
        let mut armed = self.deadline();
        let timer = tokio::time::sleep_until(armed);
        tokio::pin!(timer);

        while !(self.finished(Leg::Client) && self.finished(Leg::Upstream)) {
            tokio::select! {
                biased;
                _ = &mut shutdown, if !self.shutdown_seen && !self.closing.is_closing() => {
                    self.shutdown_seen = true;
                    let now = Instant::now();
                    let turn = self.ctx.close_spread.turn().unwrap_or(now);
                    let actions = self.closing.plan_drain(DrainCause::Shutdown, turn, now);
                    self.apply(actions);
                }
                _ = &mut timer => {
                    if !self.closing.is_closing() && self.heartbeat.verdict_due(Instant::now()) {
                        // After a stall (a CPU-throttled pod, a paused process) the timer
                        // fires before the socket is read: the peer's proof of life may be
                        // waiting there. Let the runtime collect socket readiness first
                        // (tokio's scheduler defers a yielded task until its I/O driver
                        // has been polled; not a documented guarantee, measured in
                        // tests/it/heartbeat.rs), then read what is ready before judging.
                        tokio::task::yield_now().await;
                        self.read_ready_input().await;
                    }
                    self.on_timer();
                    self.cut_unfinishable_frames();
                    armed = self.deadline();
                    timer.as_mut().reset(armed);
                    continue;
                }
                event = poll_fn(|cx| self.poll_event(cx)) => self.on_event(event),
            }
            self.cut_unfinishable_frames();
            // Deadlines only move later as traffic flows (the timer then fires early and
            // re-arms); re-arm now only when something became due sooner.
            let want = self.deadline();
            if want < armed {
                armed = want;
                timer.as_mut().reset(armed);
            }
        }
        // Half-close what is still open, so the peers see FIN after the close frame.
        let writes = PerLeg::new(|leg| self.closing.writes(leg));
        if let Some(io) = self.client_io.as_mut().filter(|_| writes.client) {
            let _ = tokio::time::timeout(SHUTDOWN_WRITE, io.shutdown()).await;
        }
        if let Some(io) = self.upstream_io.as_mut().filter(|_| writes.upstream) {
            let _ = tokio::time::timeout(SHUTDOWN_WRITE, io.shutdown()).await;
        }
        let codes = self.closing.close_codes();
        Summary {
            outcome: self.closing.outcome().unwrap_or(Outcome::Error),
            client_close_code: codes.client,
            upstream_close_code: codes.upstream,
            dropped_to_client: self.dropped.upstream,
            dropped_to_upstream: self.dropped.client,
        }
    }

    /// True when nothing more will happen on this leg: it is not read, and what is
    /// queued for it is written (or it is given up).
    fn finished(&self, leg: Leg) -> bool {
        !self.closing.reads(leg) && (!self.closing.writes(leg) || self.wires[leg].idle())
    }

    /// The earliest instant at which the timer must fire, on the shared timer grid.
    fn deadline(&self) -> Instant {
        on_grid(self.exact_deadline())
    }

    fn exact_deadline(&self) -> Instant {
        // Once closing, heartbeats and liveness are over; before, a planned drain (its
        // turn in a spread shutdown, its maximum age) competes with them.
        let heartbeat = if self.closing.is_closing() {
            None
        } else {
            self.heartbeat.next_deadline()
        };
        let mut d = [self.closing.next_deadline(), heartbeat]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
        for blocked in [
            self.wires.client.blocked_since,
            self.wires.upstream.blocked_since,
        ]
        .into_iter()
        .flatten()
        {
            d = d.min(blocked + self.ctx.write_timeout);
        }
        d
    }

    /// Handles every event that is ready now, without waiting (bounded, so a peer
    /// that never stops sending cannot hold the timer off).
    async fn read_ready_input(&mut self) {
        for _ in 0..READY_EVENTS_BEFORE_VERDICT {
            match poll_fn(|cx| Poll::Ready(self.poll_event(cx))).await {
                Poll::Ready(event) => self.on_event(event),
                Poll::Pending => return,
            }
        }
    }

    /// Drives writes on both legs, then reads from whichever leg may be read.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        macro_rules! drive_writes {
            ($wire:expr, $io:expr, $leg:expr) => {
                // A cut leg has no socket left to write; a given-up one is not written.
                if let Some(io) = $io.as_mut().filter(|_| self.closing.writes($leg)) {
                    match $wire.poll_drain(io, cx) {
                        Poll::Ready(Ok(())) => $wire.blocked_since = None,
                        Poll::Ready(Err(e)) => return Poll::Ready(Event::WriteFailed($leg, e)),
                        Poll::Pending => {
                            if $wire.blocked_since.is_none() {
                                $wire.blocked_since = Some(Instant::now());
                                return Poll::Ready(Event::Blocked);
                            }
                        }
                    }
                }
            };
        }
        drive_writes!(self.wires.client, self.client_io, Leg::Client);
        drive_writes!(self.wires.upstream, self.upstream_io, Leg::Upstream);

        self.client_first = !self.client_first;
        let order = if self.client_first {
            [Leg::Client, Leg::Upstream]
        } else {
            [Leg::Upstream, Leg::Client]
        };
        let mut storage = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        for leg in order {
            if !self.may_read(leg) {
                continue;
            }
            let mut buf = ReadBuf::uninit(&mut storage);
            let polled = match (leg, &mut self.client_io, &mut self.upstream_io) {
                (Leg::Client, Some(io), _) => Pin::new(io).poll_read(cx, &mut buf),
                (Leg::Upstream, _, Some(io)) => Pin::new(io).poll_read(cx, &mut buf),
                _ => continue,
            };
            match polled {
                Poll::Pending => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Event::ReadFailed(leg, e)),
                Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                    return Poll::Ready(Event::Eof(leg))
                }
                Poll::Ready(Ok(())) => {
                    self.process(leg, buf.filled());
                    return Poll::Ready(Event::Progress);
                }
            }
        }
        Poll::Pending
    }

    /// Backpressure: a leg is read only when the other leg has taken everything
    /// forwarded to it, and this leg has taken wsbeat's own frames. While closing, a leg
    /// whose frames are being dropped is read freely (to see its close reply).
    fn may_read(&self, leg: Leg) -> bool {
        let (src, dst) = (&self.wires[leg], &self.wires[leg.other()]);
        let dropping = self.closing.is_closing() && !src.passing;
        // Own frames waiting behind a half-forwarded frame count too: a peer that reads
        // a long frame slowly while flooding PINGs must not pile up PONGs without bound.
        self.closing.reads(leg)
            && src.queued() < OWN_FRAMES_LIMIT
            && (dst.out.is_empty() || !self.closing.writes(leg.other()) || dropping)
    }

    /// Whether `leg` is left unread only because the other leg has not yet taken what
    /// was forwarded to it.
    fn held_back(&self, leg: Leg) -> bool {
        self.closing.reads(leg)
            && self.closing.writes(leg.other())
            && !self.wires[leg.other()].out.is_empty()
    }

    fn on_event(&mut self, event: Event) {
        let now = Instant::now();
        if let Event::Eof(Leg::Upstream)
        | Event::ReadFailed(Leg::Upstream, _)
        | Event::WriteFailed(Leg::Upstream, _) = event
        {
            // While open, an upstream that ends without a close is lost: a backend that
            // crashed or reset the connection, an upstream failure (though the outcome
            // stays `upstream_close`: the upstream ended it).
            if !self.closing.is_closing() {
                self.ctx.metrics.upstream_lost.inc();
            }
        }
        let actions = match event {
            Event::Progress | Event::Blocked => return,
            Event::Eof(leg) => self.closing.on_eof(leg, now),
            Event::ReadFailed(leg, e) | Event::WriteFailed(leg, e) => {
                tracing::debug!(leg = leg.as_str(), error = %e, "socket error");
                self.closing.on_lost(leg, now)
            }
        };
        self.apply(actions);
    }

    /// Does what the close machine decided, in order.
    fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::SendClose { to, code, reason } => {
                    self.queue_own(to, frame::OP_CLOSE, &frame::close_payload(code, &reason))
                }
                Action::GiveUp(leg) => self.give_up(leg),
                Action::Cut(leg) => {
                    tracing::debug!(leg = leg.as_str(), "cut in the middle of a frame");
                    self.give_up(leg);
                    match leg {
                        Leg::Client => self.client_io = None,
                        Leg::Upstream => self.upstream_io = None,
                    }
                }
            }
        }
    }

    /// Drops what is queued for a leg the close machine has given up.
    fn give_up(&mut self, leg: Leg) {
        if self.wires[leg].drop_queued() {
            self.closing.on_queue_dropped(leg);
        }
    }

    /// A leg that will be read no more while in the middle of a frame toward the other
    /// leg (its peer lost, dead, too slow, or cut by a violation) leaves the other leg's
    /// stream inside that frame for good: see [`Closing::on_frame_unfinishable`].
    fn cut_unfinishable_frames(&mut self) {
        for leg in Leg::BOTH {
            let target_open = match leg.other() {
                Leg::Client => self.client_io.is_some(),
                Leg::Upstream => self.upstream_io.is_some(),
            };
            let feeder = &self.wires[leg];
            if target_open
                && !self.closing.reads(leg)
                && feeder.passing
                && feeder.parser.mid_frame()
            {
                let actions = self.closing.on_frame_unfinishable(leg);
                self.apply(actions);
            }
        }
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        if self.closing.timer_due(now) {
            let actions = self.closing.on_timer(now);
            self.apply(actions);
            return;
        }
        let write_timeout = self.ctx.write_timeout;
        for leg in Leg::BOTH {
            if self.wires[leg]
                .blocked_since
                .is_some_and(|t| now >= t + write_timeout)
            {
                tracing::debug!(leg = leg.as_str(), "took no bytes for the write timeout");
                let actions = self.closing.on_write_timeout(leg, now);
                self.apply(actions);
            }
        }
        if self.closing.is_closing() {
            return;
        }
        // A leg held back by backpressure is not read, so its PONGs go unseen: that
        // silence is the other leg's doing (closed at write_timeout if it takes nothing),
        // not a sign that this peer is dead.
        if self.held_back(Leg::Client) {
            self.heartbeat.on_client_frame(now);
        }
        if self.held_back(Leg::Upstream) {
            self.heartbeat.on_upstream_frame(now);
        }
        loop {
            match self.heartbeat.poll(now) {
                Due::Idle => break,
                Due::SendHeartbeat => self.send_heartbeat(),
                Due::PingClient(payload) => {
                    self.ctx.metrics.pings_sent.client.inc();
                    self.send_own(Leg::Client, frame::OP_PING, &payload);
                }
                Due::PingUpstream(payload) => {
                    self.ctx.metrics.pings_sent.upstream.inc();
                    self.send_own(Leg::Upstream, frame::OP_PING, &payload);
                }
                Due::ClientDead => {
                    self.on_dead(Leg::Client, now);
                    break;
                }
                Due::UpstreamDead => {
                    self.on_dead(Leg::Upstream, now);
                    break;
                }
            }
        }
    }

    /// Liveness declared `leg`'s peer dead. If it stopped in the middle of a frame toward
    /// the other leg, it is read no more, and that leg is cut; the client gets a close it
    /// will probably never read, and CLOSE_GRACE later its socket is gone.
    fn on_dead(&mut self, leg: Leg, now: Instant) {
        self.ctx.metrics.liveness_timeouts[leg].inc();
        let wire = &self.wires[leg];
        let mid_frame = wire.passing && wire.parser.mid_frame();
        let actions = self.closing.on_dead(leg, mid_frame, now);
        self.apply(actions);
    }
}
