//! The frames read from a leg: data frames forwarded to the other leg as they arrive,
//! PINGs answered, PONGs timed, closes and violations handed to the close machine, and
//! wsbeat's own frames (heartbeats, PINGs, PONGs, closes) put between forwarded frames.

use std::sync::atomic::Ordering;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::Relay;
use crate::conn::Leg;
use crate::frame::{self, close, Event as FrameEvent, Violation};

/// Data messages forwarded, by kind.
#[derive(Debug, Default)]
pub(super) struct Messages {
    pub text: u64,
    pub binary: u64,
}

impl<C, U> Relay<C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    /// Parses bytes read from `leg`, forwarding data frames to the other leg. Counters
    /// are added up here and published once per read, not once per message.
    pub(super) fn process(&mut self, leg: Leg, mut data: &[u8]) {
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
            // Once a close frame is queued for the other leg nothing may follow it; until
            // then frames pass, even while closing (a drain forwards the client's last
            // words).
            let dst_open = self.closing.may_send(leg.other());
            let (src, dst) = self.wires.pair_mut(leg);
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
            if !self.closing.reads(leg) {
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
        // The frame into the other leg is complete: its waiting frames may follow.
        self.wires[leg.other()].release_deferred();
        if fin && leg == Leg::Upstream {
            if forwarded {
                self.heartbeat.on_sent_to_client(now);
            }
            if self.heartbeat_waiting {
                self.heartbeat_waiting = false;
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

    /// Queues one of wsbeat's own frames for `to`, unless a close went there already.
    pub(super) fn send_own(&mut self, to: Leg, opcode: u8, payload: &[u8]) {
        if self.closing.may_send(to) {
            self.queue_own(to, opcode, payload);
        }
    }

    /// Queues a frame for `to`: now if the stream into it is between frames, else after
    /// the frame being forwarded.
    pub(super) fn queue_own(&mut self, to: Leg, opcode: u8, payload: &[u8]) {
        let (target, feeder) = self.wires.pair_mut(to);
        let behind_frame = feeder.parser.mid_frame() && feeder.passing;
        target.queue_own(opcode, payload, behind_frame);
    }

    /// A heartbeat is a data frame: it waits for the message being forwarded to end.
    pub(super) fn send_heartbeat(&mut self) {
        let Some(message) = self.ctx.route.heartbeat.message.clone() else {
            return;
        };
        if !self.closing.may_send(Leg::Client) {
            return;
        }
        let upstream = &self.wires.upstream;
        if upstream.parser.mid_message() && upstream.passing {
            self.heartbeat_waiting = true;
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
        // A close the peer started is passed on (the reply to wsbeat's own is not).
        if self.closing.may_send(leg) {
            self.ctx.metrics.messages_to[leg.other()].close.inc();
        }
        let actions = self.closing.on_close_frame(leg, code, &reason, now);
        self.apply(actions);
    }

    /// The peer broke the protocol: tell it why and close the other leg.
    fn on_violation(&mut self, leg: Leg, v: Violation, now: Instant) {
        tracing::debug!(leg = leg.as_str(), reason = v.reason, "protocol violation");
        let actions = self.closing.on_violation(leg, v.code, v.reason, now);
        self.apply(actions);
    }
}
