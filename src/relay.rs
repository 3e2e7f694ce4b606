//! The per-connection relay: the only code that holds both sockets. One task, one
//! `select!` over both legs, one timer driven by the heartbeat state machine, and the
//! shutdown token.
//!
//! Frames are forwarded as they arrive, header and payload bytes unchanged (a client's
//! masked frame reaches the upstream with the client's own mask): no message is
//! reassembled, and an idle connection holds no buffer. Reads land in a buffer on the
//! stack and are copied to the other leg's output, which is written at once; only what
//! the peer does not take stays allocated, and while it does the other leg is not read
//! (backpressure). wsbeat's own frames (heartbeats, PINGs, PONGs, closes) are put between
//! forwarded frames, heartbeats between messages.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Route;
use crate::conn::{ConnectionView, Leg, Outcome, PerLeg, Summary};
use crate::frame::{self, close, encode, Event as FrameEvent, Parser, Sender, Violation};
use crate::heartbeat::{Action, Heartbeat, Schedule};
use crate::metrics::ConnMetrics;

#[cfg(test)]
mod endings;

/// After wsbeat sends a close frame (or decides a peer is dead), how long it waits for
/// the close handshake to finish before it drops the sockets.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The wait for the client's close reply in a drain: at most CLOSE_GRACE and at most a
/// third of `drain_timeout`, so the upstream's 1001 still goes out, and is answered,
/// before the drain deadline even when the client never replies.
pub fn drain_grace(drain_timeout: Duration) -> Duration {
    CLOSE_GRACE.min(drain_timeout / 3)
}
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
/// An output buffer larger than this is freed once written, so a connection that
/// carried one large burst does not keep its memory while idle.
const KEEP_CAPACITY: usize = 1024;

/// What one connection needs besides its two sockets.
pub struct RelayContext {
    pub route: Arc<Route>,
    /// Metric handles resolved once for the route.
    pub metrics: ConnMetrics,
    /// The shared view behind `/connections`.
    pub view: Arc<ConnectionView>,
    pub max_message_size: u64,
    pub write_timeout: Duration,
    pub shutdown: CancellationToken,
    /// How long a drain waits for the client's close reply before closing the upstream:
    /// CLOSE_GRACE, or less when `shutdown.drain_timeout` leaves no room for it (see
    /// [`drain_grace`]).
    pub drain_grace: Duration,
    /// When the client handshake completed: the liveness clock starts here.
    pub started: Instant,
}

/// What wsbeat keeps of one leg's wire, apart from its socket: the parser of what the
/// peer sends, the bytes going to it, and where its close handshake stands.
struct Wire {
    /// Parses the frames this peer sends.
    parser: Parser,
    /// Bytes for this peer not yet written; empty and unallocated when idle.
    out: Vec<u8>,
    /// wsbeat's own frames for this peer, waiting for the frame being forwarded to it to
    /// end.
    deferred: Vec<u8>,
    /// A heartbeat waits for the message being forwarded to this peer to end.
    heartbeat_waiting: bool,
    /// The frame being read from this peer is forwarded (not dropped while closing).
    passing: bool,
    /// Frames to this peer are masked: wsbeat is the upstream's client.
    masks: bool,
    /// Written to the socket but not flushed.
    unflushed: bool,
    /// Since when a write to this peer has been waiting for it to take bytes: the
    /// last time it took some, not the last time it took everything.
    blocked_since: Option<Instant>,
    /// False once nothing more will be read from this peer.
    readable: bool,
    /// False once writing has failed or the peer is abandoned.
    writable: bool,
    /// A close frame has been queued for this peer; nothing may follow it.
    close_sent: bool,
    /// This peer sent a close frame.
    close_received: bool,
    /// The close code sent to this peer (or first received from it).
    close_code: Option<u16>,
}

impl Wire {
    fn new(parser: Parser, masks: bool) -> Self {
        Wire {
            parser,
            out: Vec::new(),
            deferred: Vec::new(),
            heartbeat_waiting: false,
            passing: false,
            masks,
            unflushed: false,
            blocked_since: None,
            readable: true,
            writable: true,
            close_sent: false,
            close_received: false,
            close_code: None,
        }
    }

    /// True when nothing more will happen on this leg.
    fn finished(&self) -> bool {
        !self.readable
            && (!self.writable
                || (self.out.is_empty() && self.deferred.is_empty() && !self.unflushed))
    }

    /// Gives up on the peer: nothing more is read or written. A close frame still
    /// waiting in wsbeat's buffers never reached the peer: the leg ended without one, so
    /// its code is forgotten (counted as 1006), unless the peer sent its own.
    fn abandon(&mut self) {
        let close_unsent = self.close_sent && !(self.out.is_empty() && self.deferred.is_empty());
        if close_unsent && !self.close_received {
            self.close_code = None;
        }
        self.readable = false;
        self.writable = false;
        self.out = Vec::new();
        self.deferred = Vec::new();
        self.blocked_since = None;
    }

    /// Writes `out` and flushes. Ready(Ok) when everything is written. A peer that
    /// takes some bytes but not all restarts the write timeout (`blocked_since` is
    /// cleared): it measures time without progress, not time to drain the queue, so a
    /// slow but steady reader is never cut.
    fn poll_drain<S: AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.writable {
            return Poll::Ready(Ok(()));
        }
        let mut progressed = false;
        let polled = self.poll_write_out(io, cx, &mut progressed);
        if polled.is_pending() && progressed {
            self.blocked_since = None;
        }
        polled
    }

    /// The body of `poll_drain`; sets `progressed` when the peer took bytes.
    fn poll_write_out<S: AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        cx: &mut Context<'_>,
        progressed: &mut bool,
    ) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.drain(..n);
            self.unflushed = true;
            *progressed = true;
        }
        if self.out.capacity() > KEEP_CAPACITY {
            self.out = Vec::new();
        }
        if self.unflushed {
            ready!(Pin::new(&mut *io).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }
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

/// Why the relay is closing, and until when it waits for the close handshakes.
struct Closing {
    outcome: Outcome,
    deadline: Instant,
}

/// A leg's socket and the bytes that arrived with its handshake.
pub struct Socket<S> {
    pub io: S,
    /// Bytes read past the handshake (the first frames), processed before any read.
    pub leftover: bytes::Bytes,
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
        .map(|m| bytes::Bytes::copy_from_slice(m.as_bytes()));
    // Boxed: an async fn's argument is stored apart from its locals, so a large `self`
    // by value would take its room twice in every connection's task.
    let mut relay = Box::new(Relay {
        client_io: Some(client.io),
        upstream_io: Some(upstream.io),
        wires: PerLeg {
            client: Wire::new(
                Parser::new(Sender::Client, ctx.max_message_size, heartbeat),
                false,
            ),
            upstream: Wire::new(
                Parser::new(Sender::Server, ctx.max_message_size, None),
                true,
            ),
        },
        heartbeat: Heartbeat::new(Schedule::for_route(&ctx.route), ctx.started),
        closing: None,
        upstream_close_waits: false,
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
    relay.run()
}

/// Data messages forwarded, by kind.
#[derive(Debug, Default)]
struct Messages {
    text: u64,
    binary: u64,
}

struct Relay<C, U> {
    /// The legs' sockets; `None` once a leg is cut (see [`Relay::cut`]).
    client_io: Option<C>,
    upstream_io: Option<U>,
    wires: PerLeg<Wire>,
    heartbeat: Heartbeat,
    closing: Option<Closing>,
    /// Draining: the upstream's close waits until the client has answered its own, so
    /// that every message the client sent before it saw the close reaches the upstream.
    upstream_close_waits: bool,
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

        while !(self.wires.client.finished() && self.wires.upstream.finished()) {
            tokio::select! {
                biased;
                _ = &mut shutdown, if self.closing.is_none() => self.on_shutdown(),
                _ = &mut timer => {
                    if self.closing.is_none() && self.heartbeat.verdict_due(Instant::now()) {
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
                    self.advance_drain();
                    self.cut_unfinishable_frames();
                    armed = self.deadline();
                    timer.as_mut().reset(armed);
                    continue;
                }
                event = poll_fn(|cx| self.poll_event(cx)) => self.on_event(event),
            }
            self.advance_drain();
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
        let grace = Duration::from_millis(100);
        if let Some(io) = self
            .client_io
            .as_mut()
            .filter(|_| self.wires.client.writable)
        {
            let _ = tokio::time::timeout(grace, io.shutdown()).await;
        }
        if let Some(io) = self
            .upstream_io
            .as_mut()
            .filter(|_| self.wires.upstream.writable)
        {
            let _ = tokio::time::timeout(grace, io.shutdown()).await;
        }
        Summary {
            outcome: self.closing.map_or(Outcome::Error, |c| c.outcome),
            client_close_code: self.wires.client.close_code,
            upstream_close_code: self.wires.upstream.close_code,
            dropped_to_client: self.dropped.upstream,
            dropped_to_upstream: self.dropped.client,
        }
    }

    /// The earliest instant at which the timer must fire, on the shared timer grid.
    fn deadline(&self) -> Instant {
        on_grid(self.exact_deadline())
    }

    fn exact_deadline(&self) -> Instant {
        let mut d = match &self.closing {
            Some(c) => c.deadline,
            None => self
                .heartbeat
                .next_deadline()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400)),
        };
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
                // A cut leg has no socket left to write.
                if let Some(io) = $io.as_mut() {
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
        let dropping = self.closing.is_some() && !src.passing;
        // Own frames waiting behind a half-forwarded frame count too: a peer that reads
        // a long frame slowly while flooding PINGs must not pile up PONGs without bound.
        src.readable
            && src.out.len() + src.deferred.len() < OWN_FRAMES_LIMIT
            && (dst.out.is_empty() || !dst.writable || dropping)
    }

    /// Whether `leg` is left unread only because the other leg has not yet taken what
    /// was forwarded to it.
    fn held_back(&self, leg: Leg) -> bool {
        let (src, dst) = (&self.wires[leg], &self.wires[leg.other()]);
        src.readable && dst.writable && !dst.out.is_empty()
    }

    /// Parses bytes read from `leg`, forwarding data frames to the other leg. Counters
    /// are added up here and published once per read, not once per message.
    fn process(&mut self, leg: Leg, mut data: &[u8]) {
        let now = Instant::now();
        match leg {
            Leg::Client => {
                let gap = self.heartbeat.on_client_frame(now);
                self.ctx.metrics.client_silence.observe(gap.as_secs_f64());
                self.ctx.view.client_frame_at(now);
            }
            Leg::Upstream => self.heartbeat.on_upstream_frame(now),
        }
        let mut payload_bytes = 0u64;
        while !data.is_empty() {
            let (src, dst) = self.wires.pair_mut(leg);
            // Once a close frame is queued for `dst` nothing may follow it; until then
            // frames pass, even while closing (a drain forwards the client's last words).
            let dst_open = dst.writable && !dst.close_sent;
            let passing = &mut src.passing;
            let out = &mut dst.out;
            let (used, event) = src.parser.feed(data, |bytes, starts_frame| {
                if starts_frame {
                    *passing = dst_open;
                } else if *passing {
                    payload_bytes += bytes.len() as u64;
                }
                if *passing {
                    out.extend_from_slice(bytes);
                }
            });
            data = &data[used..];
            if let Some(event) = event {
                self.on_frame_event(leg, event, now);
            }
            if !self.wires[leg].readable {
                break;
            }
        }
        let to = leg.other();
        if payload_bytes > 0 {
            self.ctx.metrics.bytes_to[to].inc_by(payload_bytes);
            self.ctx
                .view
                .bytes_to(to)
                .fetch_add(payload_bytes, Ordering::Relaxed);
        }
        let messages = std::mem::take(&mut self.messages_this_read);
        let counters = &self.ctx.metrics.messages_to[to];
        for (counter, n) in [
            (&counters.text, messages.text),
            (&counters.binary, messages.binary),
        ] {
            if n > 0 {
                counter.inc_by(n);
                self.ctx
                    .view
                    .messages_to(to)
                    .fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// A data frame from `leg` has been forwarded (or dropped) completely.
    fn on_data_frame_end(&mut self, leg: Leg, fin: bool, text: bool, now: Instant) {
        let forwarded = self.wires[leg].passing;
        if fin && forwarded {
            match text {
                true => self.messages_this_read.text += 1,
                false => self.messages_this_read.binary += 1,
            }
        } else if fin {
            self.dropped[leg] += 1;
        }
        let dst = &mut self.wires[leg.other()];
        // The frame into `dst` is complete: its waiting frames may follow.
        if !dst.deferred.is_empty() {
            let mut deferred = std::mem::take(&mut dst.deferred);
            dst.out.append(&mut deferred);
        }
        if fin && leg == Leg::Upstream {
            if forwarded {
                self.heartbeat.on_sent_to_client(now);
            }
            if self.wires.client.heartbeat_waiting {
                self.wires.client.heartbeat_waiting = false;
                self.send_heartbeat();
            }
        }
    }

    fn on_frame_event(&mut self, leg: Leg, event: FrameEvent, now: Instant) {
        match event {
            FrameEvent::DataFrameEnd { fin, text } => self.on_data_frame_end(leg, fin, text, now),
            FrameEvent::HeartbeatDropped => {
                self.ctx.metrics.client_heartbeats_dropped.inc();
                self.ctx
                    .view
                    .client_heartbeats_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
            // PING/PONG are hop-by-hop: answered here, never forwarded.
            FrameEvent::Ping(payload) => self.send_own(leg, frame::OP_PONG, &payload),
            FrameEvent::Pong(payload) => {
                self.ctx.metrics.pongs_received[leg].inc();
                let rtt = match leg {
                    Leg::Client => self.heartbeat.on_pong(&payload, now),
                    Leg::Upstream => self.heartbeat.on_upstream_pong(&payload, now),
                };
                if let Some(rtt) = rtt {
                    self.ctx.metrics.pong_rtt[leg].observe(rtt.as_secs_f64());
                    if leg == Leg::Client {
                        self.ctx.view.set_pong_rtt(rtt);
                    }
                }
            }
            FrameEvent::Close(frame) => self.on_close_frame(leg, frame, now),
            FrameEvent::Violation(v) => self.on_violation(leg, v, now),
        }
    }

    /// Queues one of wsbeat's own frames for `to`: now if the stream into it is between
    /// frames, else after the frame being forwarded. Nothing follows a close frame.
    fn send_own(&mut self, to: Leg, opcode: u8, payload: &[u8]) {
        let (target, feeder) = self.wires.pair_mut(to);
        if target.close_sent || !target.writable {
            return;
        }
        let mask = target.masks.then(rand::random::<[u8; 4]>);
        let buf = if feeder.parser.mid_frame() && feeder.passing {
            &mut target.deferred
        } else {
            &mut target.out
        };
        encode(buf, opcode, payload, mask);
        if opcode == frame::OP_CLOSE {
            target.close_sent = true;
        }
    }

    /// Queues a close frame for `to` and records its code.
    fn send_close(&mut self, to: Leg, code: u16, reason: &str) {
        let wire = &mut self.wires[to];
        if wire.close_sent || !wire.writable {
            return;
        }
        wire.close_code.get_or_insert(code);
        self.send_own(to, frame::OP_CLOSE, &frame::close_payload(code, reason));
    }

    /// A heartbeat is a data frame: it waits for the message being forwarded to end.
    fn send_heartbeat(&mut self) {
        let Some(message) = self.ctx.route.heartbeat.message.clone() else {
            return;
        };
        let (client, upstream) = (&mut self.wires.client, &self.wires.upstream);
        if client.close_sent || !client.writable {
            return;
        }
        if upstream.parser.mid_message() && upstream.passing {
            client.heartbeat_waiting = true;
            return;
        }
        self.send_own(Leg::Client, frame::OP_TEXT, message.as_bytes());
        self.ctx.metrics.heartbeats_sent.inc();
        self.ctx
            .view
            .heartbeats_sent
            .fetch_add(1, Ordering::Relaxed);
    }

    fn on_close_frame(&mut self, leg: Leg, frame: Option<(u16, String)>, now: Instant) {
        let (code, reason) = frame.unwrap_or((close::NO_STATUS, String::new()));
        let wire = &mut self.wires[leg];
        wire.close_received = true;
        wire.readable = false;
        if wire.close_sent {
            return; // the reply to our close
        }
        wire.close_code = Some(code);
        // The peer started the close: echo it, and pass it on with its code and reason.
        self.send_own(leg, frame::OP_CLOSE, &frame::close_payload(code, &reason));
        self.send_close(leg.other(), code, &reason);
        self.ctx.metrics.messages_to[leg.other()].close.inc();
        self.begin_closing(Outcome::closed_by(leg), now);
    }

    /// The peer broke the protocol: tell it why and close the other leg.
    fn on_violation(&mut self, leg: Leg, v: Violation, now: Instant) {
        tracing::debug!(leg = leg.as_str(), reason = v.reason, "protocol violation");
        self.wires[leg].readable = false;
        self.send_close(leg, v.code, v.reason);
        match leg {
            Leg::Client => self.send_close(
                Leg::Upstream,
                close::GOING_AWAY,
                "client violated the protocol",
            ),
            Leg::Upstream => {
                let code = if v.code == close::TOO_BIG {
                    close::TOO_BIG
                } else {
                    close::INTERNAL_ERROR
                };
                self.send_close(Leg::Client, code, "upstream violated the protocol");
            }
        }
        self.begin_closing(Outcome::Error, now);
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Progress | Event::Blocked => {}
            Event::Eof(leg) => {
                let closing = self.closing.is_some();
                let wire = &mut self.wires[leg];
                if wire.close_received || (wire.close_sent && closing) {
                    wire.readable = false;
                } else {
                    self.on_leg_lost(leg);
                }
            }
            Event::ReadFailed(leg, e) | Event::WriteFailed(leg, e) => {
                tracing::debug!(leg = leg.as_str(), error = %e, "socket error");
                self.on_leg_lost(leg);
            }
        }
    }

    /// A peer vanished (reset, EOF without close, write error): abandon it and close the
    /// other leg (client gone → 1001, upstream gone → 1011).
    fn on_leg_lost(&mut self, leg: Leg) {
        self.wires[leg].abandon();
        if self.closing.is_some() {
            return;
        }
        let now = Instant::now();
        match leg {
            Leg::Client => {
                self.send_close(Leg::Upstream, close::GOING_AWAY, "client went away");
                self.begin_closing(Outcome::ClientClose, now);
            }
            Leg::Upstream => {
                // A backend that crashed or reset the connection: an upstream failure,
                // though the outcome stays `upstream_close` (the upstream ended it).
                self.ctx.metrics.upstream_lost.inc();
                self.send_close(
                    Leg::Client,
                    close::INTERNAL_ERROR,
                    "upstream connection lost",
                );
                self.begin_closing(Outcome::UpstreamClose, now);
            }
        }
    }

    fn begin_closing(&mut self, outcome: Outcome, now: Instant) {
        if self.closing.is_none() {
            self.closing = Some(Closing {
                outcome,
                deadline: now + CLOSE_GRACE,
            });
        }
    }

    /// A leg that will be read no more while in the middle of a frame toward the other
    /// leg (its peer lost, dead, too slow, or cut by a violation) leaves the other leg's
    /// stream inside that frame for good: nothing can follow there, not even a close
    /// frame (it would be read as payload). Waiting for the grace period changes
    /// nothing, so that leg is cut at once.
    fn cut_unfinishable_frames(&mut self) {
        for leg in [Leg::Client, Leg::Upstream] {
            let target_open = match leg.other() {
                Leg::Client => self.client_io.is_some(),
                Leg::Upstream => self.upstream_io.is_some(),
            };
            let feeder = &self.wires[leg];
            if target_open && !feeder.readable && feeder.passing && feeder.parser.mid_frame() {
                self.cut(leg.other());
            }
        }
    }

    /// Ends `leg`'s connection now, without a close frame: its socket is dropped (the
    /// peer sees its TCP end). A close waiting behind the cut frame is forgotten with
    /// its code, so the leg counts as 1006 (unless its peer had sent its own close).
    fn cut(&mut self, leg: Leg) {
        tracing::debug!(leg = leg.as_str(), "cut in the middle of a frame");
        self.wires[leg].abandon();
        match leg {
            Leg::Client => self.client_io = None,
            Leg::Upstream => self.upstream_io = None,
        }
    }

    /// A peer declared dead by liveness: if it stopped in the middle of a frame toward
    /// the other leg, nothing more is read from it (it would have to finish that frame
    /// before any close reply), and that leg is cut.
    fn stop_reading_if_mid_frame(&mut self, dead: Leg) {
        let wire = &mut self.wires[dead];
        if wire.passing && wire.parser.mid_frame() {
            wire.readable = false;
        }
    }

    /// Drain, client first: 1001 to the client while its messages still flow to the
    /// upstream; once the client has answered (or is gone, or `drain_grace` passed), 1001
    /// to the upstream. Whatever either peer sent before its close reached the other
    /// side, except upstream messages that crossed the client's close.
    fn on_shutdown(&mut self) {
        self.send_close(Leg::Client, close::GOING_AWAY, "wsbeat is shutting down");
        self.upstream_close_waits = true;
        let now = Instant::now();
        self.begin_closing(Outcome::Shutdown, now);
        if let Some(c) = &mut self.closing {
            c.deadline = c.deadline.min(now + self.ctx.drain_grace);
        }
        self.advance_drain();
    }

    /// The second half of a drain: close the upstream once nothing more can come from
    /// the client, with a fresh grace period for its answer.
    fn advance_drain(&mut self) {
        if self.upstream_close_waits && !self.wires.client.readable {
            self.upstream_close_waits = false;
            self.send_close(Leg::Upstream, close::GOING_AWAY, "wsbeat is shutting down");
            if let Some(c) = &mut self.closing {
                c.deadline = Instant::now() + CLOSE_GRACE;
            }
        }
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        if let Some(c) = &self.closing {
            if now >= c.deadline {
                // The close handshake took too long: drop the sockets. A drain still
                // owes the upstream its close: only the client is dropped, and
                // advance_drain closes the upstream.
                self.wires.client.abandon();
                if !self.upstream_close_waits {
                    self.wires.upstream.abandon();
                }
                return;
            }
        }
        let write_timeout = self.ctx.write_timeout;
        let stalled = |since: Option<Instant>| since.is_some_and(|t| now >= t + write_timeout);
        if stalled(self.wires.client.blocked_since) {
            tracing::debug!("client took no bytes for the write timeout");
            self.wires.client.abandon();
            self.send_close(Leg::Upstream, close::GOING_AWAY, "client too slow");
            self.begin_closing(Outcome::Error, now);
        }
        if stalled(self.wires.upstream.blocked_since) {
            tracing::debug!("upstream took no bytes for the write timeout");
            self.wires.upstream.abandon();
            self.send_close(Leg::Client, close::INTERNAL_ERROR, "upstream too slow");
            self.begin_closing(Outcome::Error, now);
        }
        if self.closing.is_some() {
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
                Action::Idle => break,
                Action::SendHeartbeat => self.send_heartbeat(),
                Action::PingClient(payload) => {
                    self.ctx.metrics.pings_sent.client.inc();
                    self.send_own(Leg::Client, frame::OP_PING, &payload);
                }
                Action::PingUpstream(payload) => {
                    self.ctx.metrics.pings_sent.upstream.inc();
                    self.send_own(Leg::Upstream, frame::OP_PING, &payload);
                }
                Action::ClientDead => {
                    self.ctx.metrics.liveness_timeouts.client.inc();
                    self.stop_reading_if_mid_frame(Leg::Client);
                    // The backend frees its resources first (its connection is cut instead
                    // when the client died in the middle of a frame toward it); the client
                    // gets a close it will probably never read, and CLOSE_GRACE later the
                    // socket is gone.
                    self.send_close(Leg::Upstream, close::GOING_AWAY, "client unresponsive");
                    self.send_close(Leg::Client, close::GOING_AWAY, "no answer to pings");
                    self.begin_closing(Outcome::ClientDead, now);
                    break;
                }
                Action::UpstreamDead => {
                    self.ctx.metrics.liveness_timeouts.upstream.inc();
                    self.stop_reading_if_mid_frame(Leg::Upstream);
                    self.send_close(Leg::Upstream, close::GOING_AWAY, "no answer to pings");
                    self.send_close(Leg::Client, close::INTERNAL_ERROR, "upstream unresponsive");
                    self.begin_closing(Outcome::UpstreamDead, now);
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The relay's endings over in-memory sockets (`tokio::io::duplex`) on a paused
    //! clock: every instant is exact, so the tests say "at once" and mean it.

    use super::*;
    use crate::config::{Config, HumanDuration};
    use crate::metrics::Metrics;
    use tokio::io::{duplex, AsyncReadExt, DuplexStream};
    use tokio::task::JoinHandle;

    const MASK: [u8; 4] = [1, 2, 3, 4];

    /// A relay between two in-memory peers: `client` and `upstream` are the peers' ends.
    struct Harness {
        client: DuplexStream,
        upstream: DuplexStream,
        relay: JoinHandle<Summary>,
        /// Cancelling it drains the relay, as SIGTERM does.
        shutdown: CancellationToken,
    }

    /// `client_buffer`: how much the client's in-memory socket holds (the upstream's
    /// holds more than one read of the relay).
    fn start(client_buffer: usize, tune: impl FnOnce(&mut Config)) -> Harness {
        let mut config = Config::default();
        config.heartbeat.message = None;
        tune(&mut config);
        let routes = config.routes();
        let route = routes.resolve("/").clone();
        let metrics = Metrics::new(&routes, false);
        let started = Instant::now();
        let view = Arc::new(ConnectionView::new(
            1,
            ([127, 0, 0, 1], 1).into(),
            &route.name,
            String::new(),
            started,
        ));
        let shutdown = CancellationToken::new();
        let ctx = RelayContext {
            metrics: metrics.for_route(&route.name),
            view,
            max_message_size: config.limits.max_message_size.0,
            write_timeout: config.limits.write_timeout.0,
            shutdown: shutdown.clone(),
            drain_grace: drain_grace(config.shutdown.drain_timeout.0),
            started,
            route,
        };
        let (client, client_leg) = duplex(client_buffer);
        let (upstream, upstream_leg) = duplex(2 * READ_CHUNK);
        let socket = |io| Socket {
            io,
            leftover: bytes::Bytes::new(),
        };
        let relay = tokio::spawn(run(socket(client_leg), socket(upstream_leg), ctx));
        Harness {
            client,
            upstream,
            relay,
            shutdown,
        }
    }

    fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        encode(&mut f, opcode, payload, Some(MASK));
        if !fin {
            f[0] &= 0x7F;
        }
        f
    }

    /// Reads until EOF; returns what came and when the EOF did.
    async fn read_to_eof(peer: &mut DuplexStream) -> (Vec<u8>, Instant) {
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        (got, Instant::now())
    }

    /// The code of the first close frame in what the relay sent `to` (masked frames to
    /// the upstream), read with the relay's own parser.
    fn close_code(to: Leg, mut bytes: &[u8]) -> Option<u16> {
        let sender = match to {
            Leg::Client => Sender::Server,
            Leg::Upstream => Sender::Client,
        };
        let mut parser = Parser::new(sender, u64::MAX, None);
        while !bytes.is_empty() {
            let (used, event) = parser.feed(bytes, |_, _| {});
            bytes = &bytes[used..];
            match event {
                Some(FrameEvent::Close(close)) => return close.map(|(code, _)| code),
                Some(FrameEvent::Violation(v)) => panic!("{v:?}"),
                _ => {}
            }
        }
        None
    }

    fn ms(n: u64) -> HumanDuration {
        HumanDuration::millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_dead_mid_frame_has_the_upstream_cut_at_the_verdict() {
        let mut h = start(64 * 1024, |c| {
            c.liveness.ping_interval = ms(100);
            c.liveness.timeout = ms(500);
        });
        let frame = client_frame(frame::OP_BINARY, true, &[7; 1000]);
        h.client.write_all(&frame[..500]).await.unwrap();
        let silent = Instant::now();
        let (got, ended) = read_to_eof(&mut h.upstream).await;
        assert_eq!(got, frame[..500], "the half frame and nothing after it");
        let took = ended - silent;
        assert!(
            took >= Duration::from_millis(500) && took <= Duration::from_millis(600),
            "the upstream's connection ended {took:?} after the client fell silent"
        );
        let summary = h.relay.await.unwrap();
        assert_eq!(summary.outcome, Outcome::ClientDead);
        assert_eq!(summary.upstream_close_code, None, "no close frame was sent");
        assert_eq!(summary.client_close_code, Some(close::GOING_AWAY));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_dead_between_frames_sends_the_upstream_1001() {
        let mut h = start(64 * 1024, |c| {
            c.liveness.ping_interval = ms(100);
            c.liveness.timeout = ms(500);
        });
        let frame = client_frame(frame::OP_BINARY, true, &[7; 10]);
        h.client.write_all(&frame).await.unwrap();
        let mut got = vec![0; frame.len()];
        h.upstream.read_exact(&mut got).await.unwrap();
        // The upstream answers the close; the dead client never does.
        let mut close = vec![0; 2 + 4 + 2 + "client unresponsive".len()];
        h.upstream.read_exact(&mut close).await.unwrap();
        assert_eq!(close_code(Leg::Upstream, &close), Some(close::GOING_AWAY));
        let mut reply = Vec::new();
        encode(&mut reply, frame::OP_CLOSE, &1001u16.to_be_bytes(), None);
        h.upstream.write_all(&reply).await.unwrap();
        let summary = h.relay.await.unwrap();
        assert_eq!(summary.outcome, Outcome::ClientDead);
        assert_eq!(summary.upstream_close_code, Some(close::GOING_AWAY));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_lost_mid_frame_has_the_upstream_cut_at_once() {
        let mut h = start(64 * 1024, |_| {});
        let frame = client_frame(frame::OP_BINARY, true, &[7; 1000]);
        h.client.write_all(&frame[..500]).await.unwrap();
        let mut got = vec![0; 500];
        h.upstream.read_exact(&mut got).await.unwrap();
        let lost = Instant::now();
        drop(h.client);
        let (rest, ended) = read_to_eof(&mut h.upstream).await;
        assert!(rest.is_empty(), "nothing after the half frame: {rest:?}");
        assert_eq!(ended, lost, "cut at once");
        let summary = h.relay.await.unwrap();
        assert_eq!(summary.outcome, Outcome::ClientClose);
        assert_eq!(summary.upstream_close_code, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_text_frame_cut_by_a_violation_has_the_upstream_cut_at_once() {
        let mut h = start(64 * 1024, |_| {});
        let mut text = vec![b'a'; 1000];
        text[999] = 0xFF;
        let frame = client_frame(frame::OP_TEXT, true, &text);
        h.client.write_all(&frame[..500]).await.unwrap();
        let mut got = vec![0; 500];
        h.upstream.read_exact(&mut got).await.unwrap();
        let sent = Instant::now();
        h.client.write_all(&frame[500..]).await.unwrap();
        let (rest, ended) = read_to_eof(&mut h.upstream).await;
        assert!(rest.len() < 500, "the invalid end never passes");
        assert_eq!(ended, sent, "cut at once");
        let (to_client, _) = read_to_eof(&mut h.client).await;
        assert_eq!(
            close_code(Leg::Client, &to_client),
            Some(close::INVALID_PAYLOAD)
        );
        let summary = h.relay.await.unwrap();
        assert_eq!(summary.outcome, Outcome::Error);
        assert_eq!(summary.upstream_close_code, None);
        assert_eq!(summary.client_close_code, Some(close::INVALID_PAYLOAD));
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_dead_mid_frame_has_the_client_cut_at_the_verdict() {
        let mut h = start(64 * 1024, |c| {
            c.liveness.ping_interval = ms(100);
            c.liveness.timeout = ms(500);
            c.liveness.upstream_ping_interval = Some(ms(100));
        });
        let mut frame = Vec::new();
        encode(&mut frame, frame::OP_BINARY, &[7; 1000], None);
        h.upstream.write_all(&frame[..500]).await.unwrap();
        // The client answers nothing but stays alive by its own frames.
        let mut pong = Vec::new();
        encode(&mut pong, frame::OP_PONG, b"", Some(MASK));
        let mut got = vec![0; 500];
        h.client.read_exact(&mut got).await.unwrap();
        let silent = Instant::now();
        let mut to_client = Vec::new();
        let mut buf = [0u8; 1024];
        let mut ticker = tokio::time::interval(Duration::from_millis(100));
        let ended = loop {
            tokio::select! {
                _ = ticker.tick() => { let _ = h.client.write_all(&pong).await; }
                n = h.client.read(&mut buf) => match n.unwrap_or(0) {
                    0 => break Instant::now(),
                    n => to_client.extend_from_slice(&buf[..n]),
                },
            }
        };
        let took = ended - silent;
        assert!(
            took >= Duration::from_millis(500) && took <= Duration::from_millis(600),
            "the client's connection ended {took:?} after the upstream fell silent"
        );
        assert_eq!(
            close_code(Leg::Client, &to_client),
            None,
            "no close inside the frame"
        );
        let summary = h.relay.await.unwrap();
        assert_eq!(summary.outcome, Outcome::UpstreamDead);
        assert_eq!(summary.client_close_code, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_that_gives_up_on_a_client_mid_frame_cuts_the_upstream() {
        // Draining, the upstream's 1001 waits for the client's close reply, at most
        // drain_grace. A client that stopped mid-frame never replies, and the upstream's
        // stream is inside its frame: the upstream is cut when the client is given up.
        let mut h = start(64 * 1024, |_| {});
        let frame = client_frame(frame::OP_BINARY, true, &[7; 1000]);
        h.client.write_all(&frame[..500]).await.unwrap();
        let mut got = vec![0; 500];
        h.upstream.read_exact(&mut got).await.unwrap();
        let draining = Instant::now();
        h.shutdown.cancel();
        let (rest, ended) = read_to_eof(&mut h.upstream).await;
        assert!(rest.is_empty(), "nothing after the half frame: {rest:?}");
        let took = ended - draining;
        assert!(
            took >= CLOSE_GRACE && took <= CLOSE_GRACE + Duration::from_millis(20),
            "the upstream's connection ended {took:?} into the drain"
        );
        let summary = h.relay.await.unwrap();
        assert_eq!(summary.outcome, Outcome::Shutdown);
        assert_eq!(summary.upstream_close_code, None);
        assert_eq!(summary.client_close_code, Some(close::GOING_AWAY));
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_close_echo_behind_a_lost_client_frame_keeps_the_upstream_code() {
        // The upstream closes while the client is mid-frame: the echo waits behind that
        // frame. The client is then lost: the upstream is cut, and its leg counts the
        // code it sent, not 1006.
        let mut h = start(64 * 1024, |_| {});
        let frame = client_frame(frame::OP_BINARY, true, &[7; 1000]);
        h.client.write_all(&frame[..500]).await.unwrap();
        let mut got = vec![0; 500];
        h.upstream.read_exact(&mut got).await.unwrap();
        let mut close = Vec::new();
        encode(&mut close, frame::OP_CLOSE, &4000u16.to_be_bytes(), None);
        h.upstream.write_all(&close).await.unwrap();
        let mut to_client = vec![0; 4];
        h.client.read_exact(&mut to_client).await.unwrap();
        assert_eq!(close_code(Leg::Client, &to_client), Some(4000));
        drop(h.client);
        let (rest, _) = read_to_eof(&mut h.upstream).await;
        assert!(rest.is_empty(), "no echo inside the frame: {rest:?}");
        let summary = h.relay.await.unwrap();
        assert_eq!(summary.outcome, Outcome::UpstreamClose);
        assert_eq!(summary.upstream_close_code, Some(4000));
    }

    /// An upstream peer that sends 4 MiB in 16 KiB binary messages as fast as they are
    /// read, then waits. (Not endless: on a paused clock, time only moves when every
    /// task waits.)
    fn flood(mut upstream: DuplexStream) -> JoinHandle<DuplexStream> {
        tokio::spawn(async move {
            let mut message = Vec::new();
            encode(&mut message, frame::OP_BINARY, &[0x5a; 16 * 1024], None);
            for _ in 0..256 {
                if upstream.write_all(&message).await.is_err() {
                    break;
                }
            }
            upstream
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_taking_bytes_is_not_cut_at_write_timeout() {
        // 512 bytes every 100 ms: the relay's queue for the client (up to a 32 KiB read)
        // never empties, but the client never stops taking bytes.
        let h = start(4096, |c| c.limits.write_timeout = ms(1000));
        let _flood = flood(h.upstream);
        let mut client = h.client;
        let mut buf = [0u8; 512];
        let mut taken = 0;
        let mut ticker = tokio::time::interval(Duration::from_millis(100));
        for _ in 0..30 {
            ticker.tick().await;
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "cut after {taken} bytes");
            taken += n;
        }
        assert!(!h.relay.is_finished(), "the relay ended");
        assert!(taken >= 30 * 500, "only {taken} bytes in 3 s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_takes_nothing_is_cut_at_write_timeout() {
        let h = start(4096, |c| c.limits.write_timeout = ms(1000));
        let started = Instant::now();
        // The flood ends once the client is given up and the relay reads (and drops) the
        // rest; then the upstream's close is waiting.
        let mut upstream = flood(h.upstream).await.unwrap();
        let mut to_upstream = vec![0; 256];
        let n = upstream.read(&mut to_upstream).await.unwrap();
        to_upstream.truncate(n);
        let took = started.elapsed();
        assert_eq!(
            close_code(Leg::Upstream, &to_upstream),
            Some(close::GOING_AWAY)
        );
        assert!(
            took >= Duration::from_millis(1000) && took <= Duration::from_millis(1100),
            "the upstream was closed after {took:?}"
        );
        assert_eq!(h.relay.await.unwrap().outcome, Outcome::Error);
        drop(h.client);
    }
}
