//! The per-connection relay: the only code that holds both sockets. One task, one
//! `select!` over both legs, one timer driven by the heartbeat state machine, and the
//! shutdown token.

use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::config::Route;
use crate::heartbeat::{Action, Heartbeat, Schedule};

/// After wsbeat sends a close frame (or decides a peer is dead), how long it waits for
/// the close handshake to finish before it drops the sockets.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Which side of the proxy: the metric label `leg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegKind {
    Client,
    Upstream,
}

impl LegKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LegKind::Client => "client",
            LegKind::Upstream => "upstream",
        }
    }
}

/// How a proxied connection ended: the metric label `outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The client closed (close frame, or its TCP connection ended).
    ClientClose,
    /// The upstream closed.
    UpstreamClose,
    /// The client stopped answering: liveness timeout.
    ClientDead,
    /// The upstream stopped answering its PINGs.
    UpstreamDead,
    /// A protocol violation, an oversized message, a write timeout or an I/O error.
    Error,
    /// wsbeat is shutting down.
    Shutdown,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::ClientClose => "client_close",
            Outcome::UpstreamClose => "upstream_close",
            Outcome::ClientDead => "client_dead",
            Outcome::UpstreamDead => "upstream_dead",
            Outcome::Error => "error",
            Outcome::Shutdown => "shutdown",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counters of one connection, kept by the relay, reported when it ends.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub heartbeats_sent: u64,
    pub client_heartbeats_dropped: u64,
    pub pings_sent: u64,
    pub pongs_received: u64,
    pub messages_to_client: u64,
    pub messages_to_upstream: u64,
    pub bytes_to_client: u64,
    pub bytes_to_upstream: u64,
    pub last_pong_rtt: Option<Duration>,
}

/// What the relay reports when the connection is over.
#[derive(Debug, Clone)]
pub struct Summary {
    pub outcome: Outcome,
    /// The close code wsbeat sent to (or received from) each leg, when there was one.
    pub client_close_code: Option<u16>,
    pub upstream_close_code: Option<u16>,
    pub stats: Stats,
}

/// What one connection needs besides its two sockets.
pub struct RelayContext {
    pub route: Arc<Route>,
    pub write_timeout: Duration,
    pub shutdown: CancellationToken,
    /// When the client handshake completed: the liveness clock starts here.
    pub started: Instant,
}

/// One leg: its socket and the frames waiting to be written to it.
struct Leg<S> {
    ws: WebSocketStream<S>,
    kind: LegKind,
    /// Messages for this leg not yet handed to the socket. At most one data message
    /// (reads from the other leg stop until it is written) plus a few control frames.
    queue: VecDeque<Message>,
    /// Handed to the socket but not yet flushed.
    unflushed: bool,
    /// Since when a write to this leg has been waiting for the peer to take bytes.
    blocked_since: Option<Instant>,
    /// False once the stream has ended or failed: nothing more will be read.
    readable: bool,
    /// False once writing has failed or the peer is abandoned.
    writable: bool,
    /// The close code sent to this leg (or received from it first).
    close_code: Option<u16>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Leg<S> {
    fn new(ws: WebSocketStream<S>, kind: LegKind) -> Self {
        Leg {
            ws,
            kind,
            queue: VecDeque::with_capacity(2),
            unflushed: false,
            blocked_since: None,
            readable: true,
            writable: true,
            close_code: None,
        }
    }

    /// True when every message for this leg has been written out.
    fn drained(&self) -> bool {
        !self.writable || (self.queue.is_empty() && !self.unflushed)
    }

    /// True when nothing more will happen on this leg.
    fn finished(&self) -> bool {
        !self.readable && self.drained()
    }

    /// Queues a close frame after whatever is already queued (so nothing read is lost).
    fn close(&mut self, frame: Option<CloseFrame>) {
        if self.close_code.is_none() {
            self.close_code = Some(frame.as_ref().map_or(1005, |f| u16::from(f.code)));
        }
        if self.writable {
            self.queue.push_back(Message::Close(frame));
        }
    }

    /// Gives up on the peer: nothing more is read or written.
    fn abandon(&mut self) {
        self.readable = false;
        self.writable = false;
        self.queue.clear();
    }

    /// Hands queued messages to the socket and flushes. Ready(Ok) when drained.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        if !self.writable {
            return Poll::Ready(Ok(()));
        }
        while let Some(next) = self.queue.front() {
            let is_close = matches!(next, Message::Close(_));
            ready!(Pin::new(&mut self.ws).poll_ready(cx))?;
            if let Some(msg) = self.queue.pop_front() {
                Pin::new(&mut self.ws).start_send(msg)?;
                self.unflushed = true;
            }
            if is_close {
                // Nothing may follow a close frame.
                self.queue.clear();
            }
        }
        if self.unflushed {
            ready!(Pin::new(&mut self.ws).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }
}

/// One thing that happened on the sockets.
enum Event {
    Read(LegKind, Option<Result<Message, WsError>>),
    WriteFailed(LegKind, WsError),
    /// A leg started waiting for its peer to take bytes: the timer must include its
    /// write deadline.
    Blocked,
}

/// Why the relay is closing, and until when it waits for the close handshakes.
struct Closing {
    outcome: Outcome,
    deadline: Instant,
}

/// Relays one connection until both legs are closed; returns how it ended.
pub async fn run<C, U>(
    client: WebSocketStream<C>,
    upstream: WebSocketStream<U>,
    ctx: RelayContext,
) -> Summary
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    Relay {
        client: Leg::new(client, LegKind::Client),
        upstream: Leg::new(upstream, LegKind::Upstream),
        heartbeat: Heartbeat::new(Schedule::for_route(&ctx.route), ctx.started),
        closing: None,
        stats: Stats::default(),
        client_first: true,
        ctx,
    }
    .run()
    .await
}

struct Relay<C, U> {
    client: Leg<C>,
    upstream: Leg<U>,
    heartbeat: Heartbeat,
    closing: Option<Closing>,
    stats: Stats,
    /// Alternates which leg is read first, so a busy leg cannot starve the other.
    client_first: bool,
    ctx: RelayContext,
}

impl<C, U> Relay<C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    async fn run(mut self) -> Summary {
        let shutdown = self.ctx.shutdown.clone();
        let shutdown = shutdown.cancelled();
        tokio::pin!(shutdown);
        let mut armed = self.deadline();
        let timer = tokio::time::sleep_until(armed);
        tokio::pin!(timer);

        while !(self.client.finished() && self.upstream.finished()) {
            tokio::select! {
                biased;
                _ = &mut shutdown, if self.closing.is_none() => self.on_shutdown(),
                _ = &mut timer => {
                    self.on_timer();
                    armed = self.deadline();
                    timer.as_mut().reset(armed);
                    continue;
                }
                event = poll_fn(|cx| self.poll_event(cx)) => self.on_event(event),
            }
            // Deadlines only move later as traffic flows (the timer then fires early and
            // re-arms); re-arm now only when something became due sooner.
            let want = self.deadline();
            if want < armed {
                armed = want;
                timer.as_mut().reset(armed);
            }
        }
        Summary {
            outcome: self.closing.map_or(Outcome::Error, |c| c.outcome),
            client_close_code: self.client.close_code,
            upstream_close_code: self.upstream.close_code,
            stats: self.stats,
        }
    }

    /// The earliest instant at which the timer must fire.
    fn deadline(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(86_400);
        let mut d = match &self.closing {
            Some(c) => c.deadline,
            None => self.heartbeat.next_deadline().unwrap_or(far),
        };
        for blocked in [self.client.blocked_since, self.upstream.blocked_since]
            .into_iter()
            .flatten()
        {
            d = d.min(blocked + self.ctx.write_timeout);
        }
        d
    }

    /// Drives writes on both legs, then reads from whichever leg may be read.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        macro_rules! drive_writes {
            ($leg:expr) => {
                match $leg.poll_write(cx) {
                    Poll::Ready(Ok(())) => $leg.blocked_since = None,
                    Poll::Ready(Err(e)) => return Poll::Ready(Event::WriteFailed($leg.kind, e)),
                    Poll::Pending => {
                        if $leg.blocked_since.is_none() {
                            $leg.blocked_since = Some(Instant::now());
                            return Poll::Ready(Event::Blocked);
                        }
                    }
                }
            };
        }
        drive_writes!(self.client);
        drive_writes!(self.upstream);

        // Backpressure: a leg is read only when the other has written everything, so
        // at most one message per direction is held. While closing, both are read
        // freely (to see the close replies); data is then dropped.
        let closing = self.closing.is_some();
        let read_client = self.client.readable && (closing || self.upstream.drained());
        let read_upstream = self.upstream.readable && (closing || self.client.drained());
        self.client_first = !self.client_first;
        for client_turn in [self.client_first, !self.client_first] {
            if client_turn && read_client {
                if let Poll::Ready(item) = Pin::new(&mut self.client.ws).poll_next(cx) {
                    return Poll::Ready(Event::Read(LegKind::Client, item));
                }
            } else if !client_turn && read_upstream {
                if let Poll::Ready(item) = Pin::new(&mut self.upstream.ws).poll_next(cx) {
                    return Poll::Ready(Event::Read(LegKind::Upstream, item));
                }
            }
        }
        Poll::Pending
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Blocked => {}
            Event::Read(LegKind::Client, Some(Ok(msg))) => self.on_client_message(msg),
            Event::Read(LegKind::Upstream, Some(Ok(msg))) => self.on_upstream_message(msg),
            Event::Read(leg, Some(Err(e))) => self.on_read_error(leg, e),
            Event::Read(leg, None) => self.on_stream_end(leg),
            Event::WriteFailed(leg, e) => {
                tracing::debug!(leg = leg.as_str(), error = %e, "write failed");
                self.on_leg_lost(leg);
            }
        }
    }

    fn on_client_message(&mut self, msg: Message) {
        let now = Instant::now();
        self.heartbeat.on_client_frame(now);
        match msg {
            Message::Text(text) if self.is_client_heartbeat(&text) => {
                self.stats.client_heartbeats_dropped += 1;
            }
            Message::Text(_) | Message::Binary(_) => {
                if self.closing.is_none() {
                    self.stats.messages_to_upstream += 1;
                    self.stats.bytes_to_upstream += msg.len() as u64;
                    self.upstream.queue.push_back(msg);
                }
            }
            // tungstenite has queued the PONG; make sure it is flushed promptly.
            Message::Ping(_) => self.client.unflushed = true,
            Message::Pong(payload) => {
                self.stats.pongs_received += 1;
                if let Some(rtt) = self.heartbeat.on_pong(&payload, now) {
                    self.stats.last_pong_rtt = Some(rtt);
                }
            }
            Message::Close(frame) => {
                self.client.close_code = Some(frame.as_ref().map_or(1005, |f| u16::from(f.code)));
                // tungstenite has queued the echo of the client's close frame.
                self.client.unflushed = true;
                self.upstream.close(frame);
                self.begin_closing(Outcome::ClientClose, now);
            }
            Message::Frame(_) => {}
        }
    }

    fn on_upstream_message(&mut self, msg: Message) {
        let now = Instant::now();
        self.heartbeat.on_upstream_frame(now);
        match msg {
            Message::Text(_) | Message::Binary(_) => {
                if self.closing.is_none() {
                    self.stats.messages_to_client += 1;
                    self.stats.bytes_to_client += msg.len() as u64;
                    self.heartbeat.on_sent_to_client(now);
                    self.client.queue.push_back(msg);
                }
            }
            Message::Ping(_) => self.upstream.unflushed = true,
            Message::Pong(payload) => {
                let _ = self.heartbeat.on_upstream_pong(&payload, now);
            }
            Message::Close(frame) => {
                self.upstream.close_code = Some(frame.as_ref().map_or(1005, |f| u16::from(f.code)));
                self.upstream.unflushed = true;
                self.client.close(frame);
                self.begin_closing(Outcome::UpstreamClose, now);
            }
            Message::Frame(_) => {}
        }
    }

    fn is_client_heartbeat(&self, text: &Utf8Bytes) -> bool {
        let hb = &self.ctx.route.heartbeat;
        hb.drop_client && hb.message.as_ref().is_some_and(|m| m == text)
    }

    /// A read failed: tell the offending peer why (when it can still hear it) and close
    /// the other leg.
    fn on_read_error(&mut self, leg: LegKind, e: WsError) {
        let code = match &e {
            WsError::Capacity(CapacityError::MessageTooLong { .. }) => Some(CloseCode::Size),
            WsError::Utf8(_) => Some(CloseCode::Invalid),
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
            WsError::Protocol(_) => Some(CloseCode::Protocol),
            _ => None,
        };
        tracing::debug!(leg = leg.as_str(), error = %e, "read failed");
        let Some(code) = code else {
            return self.on_leg_lost(leg);
        };
        let now = Instant::now();
        let reason = Utf8Bytes::from(e.to_string().chars().take(100).collect::<String>());
        let (offender, other_code) = match leg {
            LegKind::Client => {
                self.client.readable = false;
                self.client.close(Some(CloseFrame { code, reason }));
                (LegKind::Client, CloseCode::Away)
            }
            LegKind::Upstream => {
                self.upstream.readable = false;
                self.upstream.close(Some(CloseFrame { code, reason }));
                let to_client = if code == CloseCode::Size {
                    CloseCode::Size
                } else {
                    CloseCode::Error
                };
                (LegKind::Upstream, to_client)
            }
        };
        let frame = Some(CloseFrame {
            code: other_code,
            reason: Utf8Bytes::from_static(match offender {
                LegKind::Client => "client violated the protocol",
                LegKind::Upstream => "upstream violated the protocol",
            }),
        });
        match offender {
            LegKind::Client => self.upstream.close(frame),
            LegKind::Upstream => self.client.close(frame),
        }
        self.begin_closing(Outcome::Error, now);
    }

    /// A leg's stream ended: after a close handshake that is the normal end; without one
    /// the peer is gone, and the other leg is closed (client gone → 1001, upstream gone →
    /// 1011).
    fn on_stream_end(&mut self, leg: LegKind) {
        match leg {
            LegKind::Client => self.client.readable = false,
            LegKind::Upstream => self.upstream.readable = false,
        }
        if self.closing.is_none() {
            self.on_leg_lost(leg);
        }
    }

    /// A peer vanished (reset, EOF without close, write error): abandon it and close the
    /// other leg.
    fn on_leg_lost(&mut self, leg: LegKind) {
        let now = Instant::now();
        match leg {
            LegKind::Client => {
                self.client.abandon();
                if self.closing.is_none() {
                    self.upstream
                        .close(close_frame(CloseCode::Away, "client went away"));
                    self.begin_closing(Outcome::ClientClose, now);
                }
            }
            LegKind::Upstream => {
                self.upstream.abandon();
                if self.closing.is_none() {
                    self.client
                        .close(close_frame(CloseCode::Error, "upstream connection lost"));
                    self.begin_closing(Outcome::UpstreamClose, now);
                }
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

    fn on_shutdown(&mut self) {
        let frame = close_frame(CloseCode::Away, "wsbeat is shutting down");
        self.upstream.close(frame.clone());
        self.client.close(frame);
        self.begin_closing(Outcome::Shutdown, Instant::now());
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        if let Some(c) = &self.closing {
            if now >= c.deadline {
                // The close handshake took too long: drop both sockets.
                self.client.abandon();
                self.upstream.abandon();
                return;
            }
        }
        let write_timeout = self.ctx.write_timeout;
        let stalled = |since: Option<Instant>| since.is_some_and(|t| now >= t + write_timeout);
        if stalled(self.client.blocked_since) {
            tracing::debug!("client took no bytes for the write timeout");
            self.client.abandon();
            self.upstream
                .close(close_frame(CloseCode::Away, "client too slow"));
            self.begin_closing(Outcome::Error, now);
        }
        if stalled(self.upstream.blocked_since) {
            tracing::debug!("upstream took no bytes for the write timeout");
            self.upstream.abandon();
            self.client
                .close(close_frame(CloseCode::Error, "upstream too slow"));
            self.begin_closing(Outcome::Error, now);
        }
        if self.closing.is_some() {
            return;
        }
        loop {
            match self.heartbeat.poll(now) {
                Action::Idle => break,
                Action::SendHeartbeat => {
                    if let Some(m) = &self.ctx.route.heartbeat.message {
                        // One heartbeat waiting behind a blocked write is enough.
                        let queued = self.client.queue.iter().any(|q| is_text(q, m));
                        if !queued {
                            self.client.queue.push_back(Message::Text(m.clone()));
                            self.stats.heartbeats_sent += 1;
                        }
                    }
                }
                Action::PingClient(payload) => {
                    self.stats.pings_sent += 1;
                    self.client
                        .queue
                        .push_back(Message::Ping(Bytes::copy_from_slice(&payload)));
                }
                Action::PingUpstream(payload) => {
                    self.upstream
                        .queue
                        .push_back(Message::Ping(Bytes::copy_from_slice(&payload)));
                }
                Action::ClientDead => {
                    // The backend frees its resources first; the client gets a close it
                    // will probably never read, and CLOSE_GRACE later the socket is gone.
                    self.upstream
                        .close(close_frame(CloseCode::Away, "client unresponsive"));
                    self.client
                        .close(close_frame(CloseCode::Away, "no answer to pings"));
                    self.begin_closing(Outcome::ClientDead, now);
                    break;
                }
                Action::UpstreamDead => {
                    self.upstream
                        .close(close_frame(CloseCode::Away, "no answer to pings"));
                    self.client
                        .close(close_frame(CloseCode::Error, "upstream unresponsive"));
                    self.begin_closing(Outcome::UpstreamDead, now);
                    break;
                }
            }
        }
    }
}

fn is_text(msg: &Message, text: &Utf8Bytes) -> bool {
    matches!(msg, Message::Text(t) if t == text)
}

fn close_frame(code: CloseCode, reason: &'static str) -> Option<CloseFrame> {
    Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    })
}
