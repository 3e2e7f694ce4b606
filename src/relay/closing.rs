//! The close and drain policy of one connection, as a pure state machine: no I/O and no
//! clock of its own. The relay tells it what happened on the legs (with `now`), does the
//! [`Action`]s it returns, and arms its timer from [`Closing::next_deadline`].
//!
//! Each leg is in one [`LegState`]; the connection is open, draining (the client has
//! been sent 1001, the upstream's close waits for the client's answer) or closing (an
//! outcome is decided and the close handshakes have until a deadline to finish). An open
//! connection may have a drain planned for later ([`Closing::plan_drain`]): its turn in a
//! shutdown spread over `shutdown.close_spread`, or the end of its maximum age.
//!
//! ```text
//! Open ──wsbeat's close queued──▶ CloseSent ──the peer's reply──▶ CloseReceived
//!  │                                 └──violation, EOF without a reply──▶ Closed
//!  ├──the peer's close (echoed)─────────────────────────────────▶ CloseReceived
//!  └──violation, dead mid-frame (with wsbeat's close)───────────▶ Closed
//! any state ──lost, write timeout, grace over, cut──▶ Lost
//! ```

use std::time::Duration;

use tokio::time::Instant;

use crate::conn::{Leg, Outcome, PerLeg};
use crate::frame::close;

#[cfg(test)]
mod tests;

/// After wsbeat sends a close frame (or decides a peer is dead), how long it waits for
/// the close handshake to finish before it drops the sockets.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The wait for the client's close reply in a drain: at most CLOSE_GRACE and at most a
/// third of `drain_timeout`, so the upstream's 1001 still goes out, and is answered,
/// before the drain deadline even when the client never replies.
pub fn drain_grace(drain_timeout: Duration) -> Duration {
    CLOSE_GRACE.min(drain_timeout / 3)
}

/// Where one leg's close handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegState {
    /// Frames flow both ways.
    Open,
    /// wsbeat's close frame is queued for the peer; the leg is read on for its reply.
    CloseSent,
    /// The peer's close frame came, and wsbeat's (its echo, or the close it had sent
    /// first) is queued: nothing more is read, what is queued is still written.
    CloseReceived,
    /// wsbeat's close is queued but nothing more is read, though the peer's close never
    /// came: the peer broke the protocol, died in the middle of a frame, or ended its
    /// stream without answering.
    Closed,
    /// Given up: nothing more is read or written. `close_received`: the peer had sent
    /// its close first, so its code stands even if wsbeat's never went out.
    Lost { close_received: bool },
}

/// Why a connection is drained (closed client first, 1001, nothing lost).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainCause {
    /// wsbeat is shutting down.
    Shutdown,
    /// The connection reached its `limits.max_connection_age`.
    MaxAge,
}

impl DrainCause {
    /// The outcome the connection ends with.
    pub fn outcome(self) -> Outcome {
        match self {
            DrainCause::Shutdown => Outcome::Shutdown,
            DrainCause::MaxAge => Outcome::MaxAge,
        }
    }

    /// The reason in the close frames.
    fn reason(self) -> &'static str {
        match self {
            DrainCause::Shutdown => "wsbeat is shutting down",
            DrainCause::MaxAge => "connection reached its maximum age",
        }
    }
}

/// The jitter of `limits.max_connection_age`: each connection's limit is within ±10% of
/// the configured age, so connections opened together (a reconnect wave after a
/// restart) do not all end together and start the next wave.
pub const MAX_AGE_JITTER: f64 = 0.10;
/// Kept free at the early edge of the jitter window: the close must not come before 90%
/// of the age, even seen from a client that completed its handshake a little after wsbeat.
const MAX_AGE_EARLY_MARGIN: Duration = Duration::from_millis(10);
/// Kept free at the late edge: the relay's timer fires on a 10 ms grid and the close
/// frame still has to be written, and the close must not come after 110% of the age.
const MAX_AGE_LATE_MARGIN: Duration = Duration::from_millis(50);

/// This connection's age limit: uniform over `age` ±10%, less the margins at the edges
/// (at most a fortieth of `age` early, a twentieth late: they only show for ages of a few
/// seconds), picked by `random` (any 64-bit value, uniform). Pure, so the bounds are
/// tested without a clock.
pub fn jittered_age(age: Duration, random: u64) -> Duration {
    let low = age.mul_f64(1.0 - MAX_AGE_JITTER) + MAX_AGE_EARLY_MARGIN.min(age / 40);
    let high = age.mul_f64(1.0 + MAX_AGE_JITTER) - MAX_AGE_LATE_MARGIN.min(age / 20);
    // The top 53 bits: exactly representable, so `fraction` is in [0, 1).
    let fraction = (random >> 11) as f64 / (1u64 << 53) as f64;
    low + (high - low).mul_f64(fraction)
}

/// What the relay must do, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Queue a close frame for `to`; nothing may follow it.
    SendClose { to: Leg, code: u16, reason: String },
    /// Drop what is queued for the leg and neither read nor write it again; its socket
    /// stays until the relay ends. If something queued was dropped, tell
    /// [`Closing::on_queue_dropped`].
    GiveUp(Leg),
    /// End the leg's connection now, without a close frame: give it up and drop its
    /// socket (the peer sees its TCP end).
    Cut(Leg),
}

/// The connection as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// Draining, client first: 1001 went to the client; the upstream's close waits
    /// until nothing more can come from the client (or `deadline`), so that every
    /// message the client sent before it saw the close reaches the upstream.
    Draining {
        cause: DrainCause,
        deadline: Instant,
    },
    /// The outcome is decided; at `deadline` the legs are given up.
    Closing {
        outcome: Outcome,
        deadline: Instant,
    },
}

/// One leg's close state and code.
#[derive(Debug, Clone, Copy)]
struct LegClose {
    state: LegState,
    /// The close code sent to this leg (or first received from it).
    code: Option<u16>,
}

/// The close and drain machine of one connection.
#[derive(Debug)]
pub struct Closing {
    legs: PerLeg<LegClose>,
    phase: Phase,
    /// How long a drain waits for the client's answer (see [`drain_grace`]).
    drain_grace: Duration,
    /// A drain that starts at this instant if the connection is still open then.
    planned: Option<(Instant, DrainCause)>,
}

impl Closing {
    /// Both legs open; `drain_grace` is how long a drain waits for the client's answer.
    pub fn new(drain_grace: Duration) -> Self {
        Closing {
            legs: PerLeg::new(|_| LegClose {
                state: LegState::Open,
                code: None,
            }),
            phase: Phase::Open,
            drain_grace,
            planned: None,
        }
    }

    /// Where `leg`'s close handshake stands.
    pub fn state(&self, leg: Leg) -> LegState {
        self.legs[leg].state
    }

    /// Whether the leg is still read.
    pub fn reads(&self, leg: Leg) -> bool {
        matches!(self.state(leg), LegState::Open | LegState::CloseSent)
    }

    /// Whether what is queued for the leg is still written.
    pub fn writes(&self, leg: Leg) -> bool {
        !matches!(self.state(leg), LegState::Lost { .. })
    }

    /// Whether frames may still be queued for the leg: nothing follows a close frame.
    pub fn may_send(&self, leg: Leg) -> bool {
        self.state(leg) == LegState::Open
    }

    /// Whether an outcome is decided (or a drain begun): the legs are being closed.
    pub fn is_closing(&self) -> bool {
        self.phase != Phase::Open
    }

    /// How the connection ends, once that is decided.
    pub fn outcome(&self) -> Option<Outcome> {
        match self.phase {
            Phase::Open => None,
            Phase::Draining { cause, .. } => Some(cause.outcome()),
            Phase::Closing { outcome, .. } => Some(outcome),
        }
    }

    /// The close code each leg ended with (`None`: no close frame, counted as 1006).
    pub fn close_codes(&self) -> PerLeg<Option<u16>> {
        PerLeg::new(|leg| self.legs[leg].code)
    }

    /// When [`on_timer`](Self::on_timer) has something to do: a planned drain's start,
    /// or the end of the grace period of a close or a drain.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Open => self.planned.map(|(at, _)| at),
            Phase::Draining { deadline, .. } | Phase::Closing { deadline, .. } => Some(deadline),
        }
    }

    /// Whether [`on_timer`](Self::on_timer) has something to do at `now` (a planned drain
    /// begins, or a grace period is over): the relay then calls it and does nothing else
    /// at this tick.
    pub fn timer_due(&self, now: Instant) -> bool {
        self.next_deadline().is_some_and(|d| now >= d)
    }

    /// Plans a drain for `cause` at `at`, unless an earlier one is planned; at or after
    /// `at` it begins as [`on_drain`](Self::on_drain) begins it. One due already (`at`
    /// not after `now`) begins now. Nothing if the connection is already closing.
    pub fn plan_drain(&mut self, cause: DrainCause, at: Instant, now: Instant) -> Vec<Action> {
        if self.is_closing() {
            return Vec::new();
        }
        if self.planned.is_none_or(|(planned, _)| at < planned) {
            self.planned = Some((at, cause));
        }
        match self.planned {
            Some((at, cause)) if at <= now => self.on_drain(cause, now),
            _ => Vec::new(),
        }
    }

    /// A close frame came from `leg`. The reply to wsbeat's own close ends the
    /// handshake; a close the peer started is echoed and passed on to the other leg with
    /// its code and reason.
    pub fn on_close_frame(
        &mut self,
        leg: Leg,
        code: u16,
        reason: &str,
        now: Instant,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let started_by_peer = match self.state(leg) {
            LegState::Open => true,
            LegState::CloseSent => false,
            // Not read: no frame can come from these.
            LegState::CloseReceived | LegState::Closed | LegState::Lost { .. } => return actions,
        };
        self.legs[leg].state = LegState::CloseReceived;
        if started_by_peer {
            self.legs[leg].code = Some(code);
            actions.push(Action::SendClose {
                to: leg,
                code,
                reason: reason.to_owned(),
            });
            self.send_close(&mut actions, leg.other(), code, reason);
            self.begin(Outcome::closed_by(leg), now);
        }
        self.advance_drain(&mut actions, now);
        actions
    }

    /// `leg`'s peer broke the protocol: it is told why (`code`, `reason`) and read no
    /// more; the other leg is closed (client at fault → 1001; upstream at fault → 1009
    /// for an oversized message, else 1011).
    pub fn on_violation(&mut self, leg: Leg, code: u16, reason: &str, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        self.send_close(&mut actions, leg, code, reason);
        self.stop_reading(leg);
        match leg {
            Leg::Client => self.send_close(
                &mut actions,
                Leg::Upstream,
                close::GOING_AWAY,
                "client violated the protocol",
            ),
            Leg::Upstream => {
                let code = if code == close::TOO_BIG {
                    close::TOO_BIG
                } else {
                    close::INTERNAL_ERROR
                };
                self.send_close(
                    &mut actions,
                    Leg::Client,
                    code,
                    "upstream violated the protocol",
                );
            }
        }
        self.begin(Outcome::Error, now);
        self.advance_drain(&mut actions, now);
        actions
    }

    /// `leg`'s stream ended (EOF). After its close, or after wsbeat's while closing, that
    /// is the end of the leg; otherwise the peer vanished without a close.
    pub fn on_eof(&mut self, leg: Leg, now: Instant) -> Vec<Action> {
        match self.state(leg) {
            LegState::CloseSent if self.is_closing() => {
                self.stop_reading(leg);
                let mut actions = Vec::new();
                self.advance_drain(&mut actions, now);
                actions
            }
            LegState::Open | LegState::CloseSent => self.on_lost(leg, now),
            LegState::CloseReceived | LegState::Closed | LegState::Lost { .. } => Vec::new(),
        }
    }

    /// `leg`'s peer vanished (reset, EOF without close, write error): it is given up and,
    /// unless the connection is already closing, the other leg is closed (client gone →
    /// 1001, upstream gone → 1011).
    pub fn on_lost(&mut self, leg: Leg, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if matches!(self.state(leg), LegState::Lost { .. }) {
            return actions;
        }
        self.give_up(&mut actions, leg);
        if !self.is_closing() {
            match leg {
                Leg::Client => self.send_close(
                    &mut actions,
                    Leg::Upstream,
                    close::GOING_AWAY,
                    "client went away",
                ),
                Leg::Upstream => self.send_close(
                    &mut actions,
                    Leg::Client,
                    close::INTERNAL_ERROR,
                    "upstream connection lost",
                ),
            }
            self.begin(Outcome::closed_by(leg), now);
        }
        self.advance_drain(&mut actions, now);
        actions
    }

    /// Liveness declared `leg`'s peer dead. The upstream is closed first (1001), so the
    /// backend frees its resources; then the client (1001 when it is the dead one, 1011
    /// when the upstream is). `mid_frame`: the dead peer stopped in the middle of a frame
    /// toward the other leg, so it is read no more (it would have to finish that frame
    /// before any close reply).
    pub fn on_dead(&mut self, leg: Leg, mid_frame: bool, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        match leg {
            Leg::Client => {
                self.send_close(
                    &mut actions,
                    Leg::Upstream,
                    close::GOING_AWAY,
                    "client unresponsive",
                );
                self.send_close(
                    &mut actions,
                    Leg::Client,
                    close::GOING_AWAY,
                    "no answer to pings",
                );
            }
            Leg::Upstream => {
                self.send_close(
                    &mut actions,
                    Leg::Upstream,
                    close::GOING_AWAY,
                    "no answer to pings",
                );
                self.send_close(
                    &mut actions,
                    Leg::Client,
                    close::INTERNAL_ERROR,
                    "upstream unresponsive",
                );
            }
        }
        if mid_frame {
            self.stop_reading(leg);
        }
        self.begin(Outcome::dead(leg), now);
        self.advance_drain(&mut actions, now);
        actions
    }

    /// `leg`'s peer took no bytes for the write timeout: it is given up, and the other
    /// leg closed (client too slow → 1001, upstream too slow → 1011).
    pub fn on_write_timeout(&mut self, leg: Leg, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        self.give_up(&mut actions, leg);
        match leg {
            Leg::Client => self.send_close(
                &mut actions,
                Leg::Upstream,
                close::GOING_AWAY,
                "client too slow",
            ),
            Leg::Upstream => self.send_close(
                &mut actions,
                Leg::Client,
                close::INTERNAL_ERROR,
                "upstream too slow",
            ),
        }
        self.begin(Outcome::Error, now);
        self.advance_drain(&mut actions, now);
        actions
    }

    /// wsbeat is shutting down: drain now (see [`on_drain`](Self::on_drain)).
    pub fn on_shutdown(&mut self, now: Instant) -> Vec<Action> {
        self.on_drain(DrainCause::Shutdown, now)
    }

    /// Drain, client first: 1001 to the client while its messages still flow to the
    /// upstream; once the client has answered (or is gone, or the drain grace passed),
    /// 1001 to the upstream. Nothing if already closing.
    pub fn on_drain(&mut self, cause: DrainCause, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.is_closing() {
            return actions;
        }
        self.planned = None;
        self.send_close(&mut actions, Leg::Client, close::GOING_AWAY, cause.reason());
        self.phase = Phase::Draining {
            cause,
            deadline: (now + CLOSE_GRACE).min(now + self.drain_grace),
        };
        self.advance_drain(&mut actions, now);
        actions
    }

    /// Nothing more will be read from `feeder`, which stopped in the middle of a frame
    /// toward the other leg: that leg's stream is inside the frame for good, and nothing
    /// can follow there, not even a close frame (it would be read as payload). Waiting
    /// changes nothing, so that leg is cut at once.
    pub fn on_frame_unfinishable(&mut self, feeder: Leg) -> Vec<Action> {
        let target = feeder.other();
        self.lose(target);
        vec![Action::Cut(target)]
    }

    /// The timer fired at `now`. A planned drain that is due begins. Once the grace
    /// period is over the close handshakes took too long: the legs are given up, except
    /// that a drain still owes the upstream its close: then only the client is given up,
    /// and the upstream gets its 1001 with a fresh grace period.
    pub fn on_timer(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if !self.timer_due(now) {
            return actions;
        }
        if let (Phase::Open, Some((_, cause))) = (self.phase, self.planned) {
            return self.on_drain(cause, now);
        }
        self.give_up(&mut actions, Leg::Client);
        if !matches!(self.phase, Phase::Draining { .. }) {
            self.give_up(&mut actions, Leg::Upstream);
        }
        self.advance_drain(&mut actions, now);
        actions
    }

    /// The relay dropped bytes still queued for `leg` when giving it up. wsbeat's close
    /// frame, the last thing queued, never reached the peer: the leg ended without one,
    /// so its code is forgotten (counted as 1006), unless the peer had sent its own.
    pub fn on_queue_dropped(&mut self, leg: Leg) {
        if self.state(leg)
            == (LegState::Lost {
                close_received: false,
            })
        {
            self.legs[leg].code = None;
        }
    }

    /// Queues a close for `to` and records its code, unless a close went there already
    /// or the leg is given up.
    fn send_close(&mut self, actions: &mut Vec<Action>, to: Leg, code: u16, reason: &str) {
        if !self.may_send(to) {
            return;
        }
        let leg = &mut self.legs[to];
        leg.code.get_or_insert(code);
        leg.state = LegState::CloseSent;
        actions.push(Action::SendClose {
            to,
            code,
            reason: reason.to_owned(),
        });
    }

    /// Nothing more is read from `leg` (its close, if any, is already queued).
    fn stop_reading(&mut self, leg: Leg) {
        if let LegState::Open | LegState::CloseSent = self.state(leg) {
            self.legs[leg].state = LegState::Closed;
        }
    }

    fn give_up(&mut self, actions: &mut Vec<Action>, leg: Leg) {
        if !matches!(self.state(leg), LegState::Lost { .. }) {
            self.lose(leg);
            actions.push(Action::GiveUp(leg));
        }
    }

    fn lose(&mut self, leg: Leg) {
        let close_received = match self.state(leg) {
            LegState::CloseReceived => true,
            LegState::Lost { close_received } => close_received,
            _ => false,
        };
        self.legs[leg].state = LegState::Lost { close_received };
    }

    /// The first decision wins: a connection ends one way.
    fn begin(&mut self, outcome: Outcome, now: Instant) {
        if self.phase == Phase::Open {
            self.phase = Phase::Closing {
                outcome,
                deadline: now + CLOSE_GRACE,
            };
        }
    }

    /// The second half of a drain: close the upstream once nothing more can come from
    /// the client, with a fresh grace period for its answer.
    fn advance_drain(&mut self, actions: &mut Vec<Action>, now: Instant) {
        if let Phase::Draining { cause, .. } = self.phase {
            if !self.reads(Leg::Client) {
                self.send_close(actions, Leg::Upstream, close::GOING_AWAY, cause.reason());
                self.phase = Phase::Closing {
                    outcome: cause.outcome(),
                    deadline: now + CLOSE_GRACE,
                };
            }
        }
    }
}
