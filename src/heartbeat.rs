//! The per-connection heartbeat and liveness state machine: pure, no I/O and no clock of
//! its own. The relay tells it what happened (with `now`) and asks it what to do next.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::{HeartbeatMode, Route};

/// Size of a PING payload: a big-endian sequence number, echoed back in the PONG.
pub const PING_PAYLOAD_LEN: usize = 8;

/// What the relay must do now. `poll` returns one at a time; call it until `Idle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing is due before `next_deadline()`.
    Idle,
    /// Send the heartbeat text frame to the client.
    SendHeartbeat,
    /// Send a protocol PING with this payload to the client.
    PingClient([u8; PING_PAYLOAD_LEN]),
    /// Send a protocol PING with this payload to the upstream.
    PingUpstream([u8; PING_PAYLOAD_LEN]),
    /// Nothing came from the client for `timeout`: close both legs with 1001.
    ClientDead,
    /// Nothing came from the upstream for `timeout` (only when upstream PINGs are on):
    /// close the client with 1011.
    UpstreamDead,
}

/// The timing parameters of one connection, taken from its route.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// `None` when text heartbeats are off.
    pub heartbeat_interval: Option<Duration>,
    pub mode: HeartbeatMode,
    pub ping_interval: Duration,
    /// A client alive by its own frames is PINGed this often (for its RTT).
    pub rtt_sample_interval: Duration,
    pub timeout: Duration,
    pub upstream_ping_interval: Option<Duration>,
}

impl Schedule {
    pub fn for_route(route: &Route) -> Self {
        Schedule {
            heartbeat_interval: route
                .heartbeat
                .message
                .as_ref()
                .map(|_| route.heartbeat.interval),
            mode: route.heartbeat.mode,
            ping_interval: route.liveness.ping_interval.0,
            rtt_sample_interval: route.liveness.rtt_sample_interval.0,
            timeout: route.liveness.timeout.0,
            upstream_ping_interval: route.liveness.upstream_ping_interval.map(|d| d.0),
        }
    }
}

/// One leg's PINGs: when the next is due and which one is awaiting its PONG.
///
/// The upstream's PINGs go out on a fixed period (`next`). The client's depend on what
/// it sends: see [`Heartbeat::client_ping_due_at`].
#[derive(Debug)]
struct Pinger {
    interval: Duration,
    next: Instant,
    seq: u64,
    outstanding: Option<(u64, Instant)>,
    last_frame: Instant,
    /// When the latest PING went out (`None`: none yet).
    last_sent: Option<Instant>,
}

impl Pinger {
    fn new(interval: Duration, now: Instant) -> Self {
        Pinger {
            interval,
            next: now + interval,
            seq: 0,
            outstanding: None,
            last_frame: now,
            last_sent: None,
        }
    }

    /// Returns the payload of the PING that is due on the fixed period, advancing it.
    fn due(&mut self, now: Instant) -> Option<[u8; PING_PAYLOAD_LEN]> {
        if now < self.next {
            return None;
        }
        self.next = advance(self.next, self.interval, now);
        Some(self.send(now))
    }

    /// Records a PING going out now; returns its payload.
    fn send(&mut self, now: Instant) -> [u8; PING_PAYLOAD_LEN] {
        self.seq += 1;
        self.outstanding = Some((self.seq, now));
        self.last_sent = Some(now);
        self.seq.to_be_bytes()
    }

    /// The round trip of the PING this PONG answers, if it answers the latest one.
    fn pong(&mut self, payload: &[u8], now: Instant) -> Option<Duration> {
        let (seq, sent) = self.outstanding?;
        if payload != seq.to_be_bytes() {
            return None;
        }
        self.outstanding = None;
        Some(now.saturating_duration_since(sent))
    }
}

/// The next deadline of a periodic event that was due at `due`: one period on, or one
/// period from `now` when the event ran so late that a whole period was missed.
fn advance(due: Instant, period: Duration, now: Instant) -> Instant {
    let next = due + period;
    if next <= now {
        now + period
    } else {
        next
    }
}

/// The heartbeat and liveness state of one proxied connection.
#[derive(Debug)]
pub struct Heartbeat {
    schedule: Schedule,
    /// Interval mode: when the next heartbeat is due. Idle mode: when the last data
    /// message or heartbeat went to the client (the next is due `interval` later).
    heartbeat_mark: Instant,
    client: Pinger,
    upstream: Option<Pinger>,
    /// When the clocks started (the first client PING is due `ping_interval` later).
    started: Instant,
    /// The `now` of the latest `poll` that returned `SendHeartbeat`, and when that
    /// heartbeat was due: a client PING due by then rides in the same write.
    heartbeat_sent_at: Option<(Instant, Instant)>,
    /// Set once a leg is declared dead: the machine then asks for nothing more.
    verdict: bool,
}

impl Heartbeat {
    /// Starts the clocks: `now` is when the client handshake completed.
    pub fn new(schedule: Schedule, now: Instant) -> Self {
        let heartbeat_mark = match (schedule.mode, schedule.heartbeat_interval) {
            (HeartbeatMode::Interval, Some(interval)) => now + interval,
            _ => now,
        };
        Heartbeat {
            schedule,
            heartbeat_mark,
            client: Pinger::new(schedule.ping_interval, now),
            upstream: schedule
                .upstream_ping_interval
                .map(|interval| Pinger::new(interval, now)),
            started: now,
            heartbeat_sent_at: None,
            verdict: false,
        }
    }

    /// When the client's next PING falls due. The first, `ping_interval` after the
    /// start (an early RTT). Then, once the client has been silent for `ping_interval`
    /// (its PONG counts: it is a frame) and `ping_interval` has passed since the last
    /// PING; but a client that is never silent that long, alive by its own frames, is
    /// still PINGed every `rtt_sample_interval` so that its RTT stays measured.
    fn client_ping_due_at(&self) -> Instant {
        let interval = self.schedule.ping_interval;
        match self.client.last_sent {
            None => self.started + interval,
            Some(sent) => (self.client.last_frame.max(sent) + interval)
                .min(sent + self.schedule.rtt_sample_interval.max(interval)),
        }
    }

    /// How long a due client PING may wait for the next heartbeat, to go out in the same
    /// write: one heartbeat interval, but never so long that a client which answers
    /// only PINGs nears its liveness timeout (a quarter of the room between
    /// `ping_interval` and `timeout`). Zero without heartbeats.
    fn ping_slack(&self) -> Duration {
        match self.schedule.heartbeat_interval {
            Some(hb) => hb.min(
                self.schedule
                    .timeout
                    .saturating_sub(self.schedule.ping_interval)
                    / 4,
            ),
            None => Duration::ZERO,
        }
    }

    /// Any frame from the client (data, PONG, heartbeat) proves it alive. Returns the
    /// silence that this frame ended.
    pub fn on_client_frame(&mut self, now: Instant) -> Duration {
        let gap = now.saturating_duration_since(self.client.last_frame);
        self.client.last_frame = now;
        gap
    }

    /// A data message went to the client (in idle mode this postpones the heartbeat).
    pub fn on_sent_to_client(&mut self, now: Instant) {
        if self.schedule.mode == HeartbeatMode::Idle {
            self.heartbeat_mark = now;
        }
    }

    /// A PONG from the client: its round trip, if it answers the latest PING.
    pub fn on_pong(&mut self, payload: &[u8], now: Instant) -> Option<Duration> {
        self.client.pong(payload, now)
    }

    /// Any frame from the upstream proves it alive.
    pub fn on_upstream_frame(&mut self, now: Instant) {
        if let Some(p) = &mut self.upstream {
            p.last_frame = now;
        }
    }

    /// A PONG from the upstream: its round trip, if it answers the latest PING.
    pub fn on_upstream_pong(&mut self, payload: &[u8], now: Instant) -> Option<Duration> {
        self.upstream.as_mut()?.pong(payload, now)
    }

    /// How long the client has been silent (for `/connections`).
    pub fn client_silence(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.client.last_frame)
    }

    fn heartbeat_due_at(&self) -> Option<Instant> {
        let interval = self.schedule.heartbeat_interval?;
        Some(match self.schedule.mode {
            HeartbeatMode::Interval => self.heartbeat_mark,
            HeartbeatMode::Idle => self.heartbeat_mark + interval,
        })
    }

    /// What is due at `now`, most urgent first. Call until it returns `Idle`.
    /// Whether [`poll`](Self::poll) would now declare a peer dead.
    pub fn verdict_due(&self, now: Instant) -> bool {
        !self.verdict
            && (now >= self.client.last_frame + self.schedule.timeout
                || self
                    .upstream
                    .as_ref()
                    .is_some_and(|up| now >= up.last_frame + self.schedule.timeout))
    }

    pub fn poll(&mut self, now: Instant) -> Action {
        if self.verdict {
            return Action::Idle;
        }
        if now >= self.client.last_frame + self.schedule.timeout {
            self.verdict = true;
            return Action::ClientDead;
        }
        if let Some(up) = &self.upstream {
            if now >= up.last_frame + self.schedule.timeout {
                self.verdict = true;
                return Action::UpstreamDead;
            }
        }
        if let (Some(due), Some(interval)) =
            (self.heartbeat_due_at(), self.schedule.heartbeat_interval)
        {
            if now >= due {
                self.heartbeat_mark = match self.schedule.mode {
                    HeartbeatMode::Interval => advance(due, interval, now),
                    HeartbeatMode::Idle => now,
                };
                self.heartbeat_sent_at = Some((now, due));
                return Action::SendHeartbeat;
            }
        }
        let ping_due = self.client_ping_due_at();
        if now >= ping_due {
            // When it went out, for the next one's schedule: when the heartbeat it rides
            // was due, else when it was due itself; `now` after a stall, so that a late
            // wake-up does not send the next one at once.
            let nominal = match self.heartbeat_sent_at {
                Some((at, hb_due)) if at == now => Some(hb_due.max(ping_due)),
                _ if now >= ping_due + self.ping_slack() => Some(ping_due),
                _ => None,
            };
            if let Some(nominal) = nominal {
                let payload = self.client.send(now);
                if nominal + self.schedule.ping_interval > now {
                    self.client.last_sent = Some(nominal);
                }
                return Action::PingClient(payload);
            }
        }
        if let Some(payload) = self.upstream.as_mut().and_then(|p| p.due(now)) {
            return Action::PingUpstream(payload);
        }
        Action::Idle
    }

    /// The earliest instant at which `poll` may have something to do; `None` once a
    /// verdict is out. Deadlines only move later between polls, except after `poll`
    /// itself, so a relay may keep an earlier timer and re-arm after it fires.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.verdict {
            return None;
        }
        // A due PING waits for the heartbeat (its deadline is below) at most the slack.
        let mut next = (self.client_ping_due_at() + self.ping_slack())
            .min(self.client.last_frame + self.schedule.timeout);
        if let Some(h) = self.heartbeat_due_at() {
            next = next.min(h);
        }
        if let Some(up) = &self.upstream {
            next = next.min(up.next).min(up.last_frame + self.schedule.timeout);
        }
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn schedule(mode: HeartbeatMode) -> Schedule {
        Schedule {
            heartbeat_interval: Some(400 * MS),
            mode,
            ping_interval: 1000 * MS,
            rtt_sample_interval: 5000 * MS,
            timeout: 3000 * MS,
            upstream_ping_interval: None,
        }
    }

    /// Drains every due action at `now`.
    fn actions(h: &mut Heartbeat, now: Instant) -> Vec<Action> {
        std::iter::from_fn(|| match h.poll(now) {
            Action::Idle => None,
            a => Some(a),
        })
        .collect()
    }

    #[test]
    fn interval_mode_sends_on_schedule_whatever_the_traffic() {
        let t0 = Instant::now();
        let mut h = Heartbeat::new(schedule(HeartbeatMode::Interval), t0);
        assert_eq!(h.next_deadline(), Some(t0 + 400 * MS));
        assert_eq!(actions(&mut h, t0 + 399 * MS), vec![]);
        // Data to the client does not postpone heartbeats in interval mode.
        h.on_sent_to_client(t0 + 390 * MS);
        assert_eq!(actions(&mut h, t0 + 400 * MS), vec![Action::SendHeartbeat]);
        assert_eq!(h.next_deadline(), Some(t0 + 800 * MS));
        // A little late: the cadence stays on the original grid.
        assert_eq!(actions(&mut h, t0 + 805 * MS), vec![Action::SendHeartbeat]);
        // The PING due at 1000 ms waits for the heartbeat at 1200 ms.
        assert_eq!(h.next_deadline(), Some(t0 + 1200 * MS));
    }

    #[test]
    fn interval_mode_skips_missed_periods_instead_of_bursting() {
        let t0 = Instant::now();
        let mut h = Heartbeat::new(schedule(HeartbeatMode::Interval), t0);
        h.on_client_frame(t0 + 900 * MS);
        // Woken 1.5 periods late: one heartbeat (and the due PING), then a full period.
        let late = t0 + 1000 * MS;
        assert_eq!(
            actions(&mut h, late),
            vec![
                Action::SendHeartbeat,
                Action::PingClient(1u64.to_be_bytes())
            ]
        );
        assert_eq!(actions(&mut h, late), vec![]);
        assert_eq!(h.next_deadline(), Some(late + 400 * MS));
    }

    #[test]
    fn idle_mode_waits_for_a_quiet_interval() {
        let t0 = Instant::now();
        let mut h = Heartbeat::new(schedule(HeartbeatMode::Idle), t0);
        h.on_sent_to_client(t0 + 300 * MS);
        assert_eq!(actions(&mut h, t0 + 400 * MS), vec![]);
        assert_eq!(h.next_deadline(), Some(t0 + 700 * MS));
        assert_eq!(actions(&mut h, t0 + 700 * MS), vec![Action::SendHeartbeat]);
        // The heartbeat itself restarts the quiet interval (the PING due at 1000 ms
        // waits for the heartbeat at 1100 ms).
        assert_eq!(h.next_deadline(), Some(t0 + 1100 * MS));
    }

    #[test]
    fn no_heartbeats_when_the_message_is_off() {
        let t0 = Instant::now();
        let mut s = schedule(HeartbeatMode::Interval);
        s.heartbeat_interval = None;
        let mut h = Heartbeat::new(s, t0);
        assert_eq!(h.next_deadline(), Some(t0 + 1000 * MS));
        assert_eq!(actions(&mut h, t0 + 999 * MS), vec![]);
    }

    #[test]
    fn pings_carry_a_sequence_and_pongs_give_the_round_trip() {
        let t0 = Instant::now();
        let mut s = schedule(HeartbeatMode::Interval);
        s.heartbeat_interval = None;
        let mut h = Heartbeat::new(s, t0);
        let first = match h.poll(t0 + 1000 * MS) {
            Action::PingClient(p) => p,
            a => panic!("expected a PING, got {a:?}"),
        };
        assert_eq!(first, 1u64.to_be_bytes());
        // A PONG that answers nothing we sent gives no round trip.
        assert_eq!(h.on_pong(b"12345678", t0 + 1010 * MS), None);
        assert_eq!(h.on_pong(&first, t0 + 1025 * MS), Some(25 * MS));
        // Only once.
        assert_eq!(h.on_pong(&first, t0 + 1030 * MS), None);
        assert_eq!(
            h.poll(t0 + 2000 * MS),
            Action::PingClient(2u64.to_be_bytes())
        );
    }

    #[test]
    fn a_pong_for_an_older_ping_is_not_a_round_trip() {
        let t0 = Instant::now();
        let mut h = Heartbeat::new(schedule(HeartbeatMode::Idle), t0);
        h.on_client_frame(t0 + 900 * MS);
        assert!(matches!(h.poll(t0 + 1000 * MS), Action::SendHeartbeat));
        assert_eq!(
            h.poll(t0 + 1000 * MS),
            Action::PingClient(1u64.to_be_bytes())
        );
        let _ = actions(&mut h, t0 + 2000 * MS);
        assert_eq!(h.on_pong(&1u64.to_be_bytes(), t0 + 2001 * MS), None);
        assert_eq!(h.on_pong(&2u64.to_be_bytes(), t0 + 2002 * MS), Some(2 * MS));
    }

    #[test]
    fn silence_for_timeout_is_death_once() {
        let t0 = Instant::now();
        let mut h = Heartbeat::new(schedule(HeartbeatMode::Interval), t0);
        // Pings and heartbeats go out while the client is silent...
        let early = actions(&mut h, t0 + 2999 * MS);
        assert!(early.contains(&Action::PingClient(1u64.to_be_bytes())));
        assert!(early.contains(&Action::SendHeartbeat));
        assert_eq!(h.next_deadline(), Some(t0 + 3000 * MS));
        // ...then the verdict, and nothing more after it.
        assert_eq!(actions(&mut h, t0 + 3000 * MS), vec![Action::ClientDead]);
        assert_eq!(h.next_deadline(), None);
        assert_eq!(actions(&mut h, t0 + 9000 * MS), vec![]);
    }

    #[test]
    fn any_client_frame_postpones_the_verdict_and_reports_the_gap() {
        let t0 = Instant::now();
        let mut h = Heartbeat::new(schedule(HeartbeatMode::Interval), t0);
        assert_eq!(h.on_client_frame(t0 + 2500 * MS), 2500 * MS);
        assert_eq!(h.client_silence(t0 + 2600 * MS), 100 * MS);
        assert!(!actions(&mut h, t0 + 5499 * MS).contains(&Action::ClientDead));
        assert_eq!(actions(&mut h, t0 + 5500 * MS), vec![Action::ClientDead]);
    }

    #[test]
    fn upstream_pings_and_upstream_death() {
        let t0 = Instant::now();
        let mut s = schedule(HeartbeatMode::Interval);
        s.heartbeat_interval = None;
        s.ping_interval = 10_000 * MS;
        s.timeout = 20_000 * MS;
        s.upstream_ping_interval = Some(500 * MS);
        let mut h = Heartbeat::new(s, t0);
        assert_eq!(h.next_deadline(), Some(t0 + 500 * MS));
        assert_eq!(
            h.poll(t0 + 500 * MS),
            Action::PingUpstream(1u64.to_be_bytes())
        );
        assert_eq!(
            h.on_upstream_pong(&1u64.to_be_bytes(), t0 + 503 * MS),
            Some(3 * MS)
        );
        h.on_upstream_frame(t0 + 503 * MS);
        // The client stays alive; the upstream goes quiet.
        h.on_client_frame(t0 + 19_000 * MS);
        let acts = actions(&mut h, t0 + 20_503 * MS);
        assert_eq!(acts.last(), Some(&Action::UpstreamDead));
        assert_eq!(h.next_deadline(), None);
    }

    #[test]
    fn without_upstream_pings_upstream_frames_are_ignored() {
        let t0 = Instant::now();
        let mut h = Heartbeat::new(schedule(HeartbeatMode::Interval), t0);
        h.on_upstream_frame(t0);
        assert_eq!(h.on_upstream_pong(&1u64.to_be_bytes(), t0), None);
        h.on_client_frame(t0 + 2900 * MS);
        assert!(!actions(&mut h, t0 + 3000 * MS).contains(&Action::UpstreamDead));
    }

    /// Runs `h` for `span` on the relay's 10 ms timer grid, the client answering each
    /// PING at once (its PONG is a frame) and sending its own frame at every instant in
    /// `client_frames`. Returns the ticks at which something was sent, with what.
    fn run(
        h: &mut Heartbeat,
        t0: Instant,
        span: Duration,
        client_frames: &[Duration],
    ) -> Vec<(Duration, Vec<Action>)> {
        let mut sent = Vec::new();
        let mut t = Duration::ZERO;
        while t <= span {
            let now = t0 + t;
            if client_frames.contains(&t) {
                h.on_client_frame(now);
            }
            if h.next_deadline().is_some_and(|d| d <= now) {
                let acts = actions(h, now);
                for a in &acts {
                    if let Action::PingClient(p) = a {
                        h.on_client_frame(now + MS);
                        assert_eq!(h.on_pong(p, now + MS), Some(MS));
                    }
                }
                if !acts.is_empty() {
                    sent.push((t, acts));
                }
            }
            t += 10 * MS;
        }
        sent
    }

    fn defaults() -> Schedule {
        Schedule {
            heartbeat_interval: Some(Duration::from_secs(4)),
            mode: HeartbeatMode::Interval,
            ping_interval: Duration::from_secs(10),
            rtt_sample_interval: Duration::from_secs(60),
            timeout: Duration::from_secs(30),
            upstream_ping_interval: None,
        }
    }

    fn pings(sent: &[(Duration, Vec<Action>)]) -> Vec<Duration> {
        sent.iter()
            .filter(|(_, a)| a.iter().any(|a| matches!(a, Action::PingClient(_))))
            .map(|(t, _)| *t)
            .collect()
    }

    #[test]
    fn a_due_ping_rides_the_next_heartbeat() {
        let t0 = Instant::now();
        let mut h = Heartbeat::new(schedule(HeartbeatMode::Interval), t0);
        let _ = actions(&mut h, t0 + 800 * MS);
        // Due at 1000 ms, but a heartbeat follows within one interval: it waits.
        assert_eq!(actions(&mut h, t0 + 1000 * MS), vec![]);
        assert_eq!(h.next_deadline(), Some(t0 + 1200 * MS));
        assert_eq!(
            actions(&mut h, t0 + 1200 * MS),
            vec![
                Action::SendHeartbeat,
                Action::PingClient(1u64.to_be_bytes())
            ]
        );
    }

    #[test]
    fn at_the_defaults_an_idle_connection_costs_one_write_per_heartbeat() {
        let t0 = Instant::now();
        let mut h = Heartbeat::new(defaults(), t0);
        let sent = run(&mut h, t0, Duration::from_secs(60), &[]);
        // 15 heartbeats a minute, and every PING in one of their writes.
        assert_eq!(sent.len(), 15, "{sent:?}");
        assert!(sent.iter().all(|(_, a)| a[0] == Action::SendHeartbeat));
        // A PING whenever the client has been silent 10 s: the heartbeat after it.
        let s = Duration::from_secs;
        assert_eq!(pings(&sent), vec![s(12), s(24), s(36), s(48), s(60)]);
    }

    #[test]
    fn a_client_alive_by_its_own_frames_is_pinged_only_for_rtt_samples() {
        let t0 = Instant::now();
        let mut h = Heartbeat::new(defaults(), t0);
        // The client sends a frame of its own every 5 s (e.g. its own heartbeats).
        let frames: Vec<Duration> = (1..=36).map(|i| Duration::from_secs(5 * i)).collect();
        let sent = run(&mut h, t0, Duration::from_secs(180), &frames);
        let s = Duration::from_secs;
        // The first PING early (an RTT at once), then one every rtt_sample_interval,
        // each riding a heartbeat.
        assert_eq!(pings(&sent), vec![s(12), s(72), s(132)]);
        assert!(!h.verdict_due(t0 + s(180)));
    }

    #[test]
    fn a_silent_client_is_still_pinged_and_dies_at_the_timeout() {
        let t0 = Instant::now();
        let mut h = Heartbeat::new(defaults(), t0);
        let s = Duration::from_secs;
        let mut got = Vec::new();
        let mut t = Duration::ZERO;
        while t <= s(40) {
            let now = t0 + t;
            if h.next_deadline().is_some_and(|d| d <= now) {
                for a in actions(&mut h, now) {
                    got.push((t, a));
                }
            }
            t += 10 * MS;
        }
        let ping_times: Vec<Duration> = got
            .iter()
            .filter(|(_, a)| matches!(a, Action::PingClient(_)))
            .map(|(t, _)| *t)
            .collect();
        // PINGs every ping_interval of silence since the last, each on a heartbeat.
        assert_eq!(ping_times, vec![s(12), s(24)]);
        assert_eq!(got.last(), Some(&(s(30), Action::ClientDead)));
    }

    #[test]
    fn without_heartbeats_a_ping_goes_when_due() {
        let t0 = Instant::now();
        let mut s = defaults();
        s.heartbeat_interval = None;
        let mut h = Heartbeat::new(s, t0);
        let sent = run(&mut h, t0, Duration::from_secs(60), &[]);
        let secs = |n: u64| Duration::from_secs(n) + Duration::from_millis(10 * (n / 10 - 1));
        // Each 10 s after the PONG (1 ms after its PING) on the 10 ms grid.
        assert_eq!(pings(&sent)[0], Duration::from_secs(10));
        assert_eq!(pings(&sent)[1], secs(20));
    }

    #[test]
    fn in_idle_mode_a_ping_waits_for_a_heartbeat_at_most_one_interval() {
        let t0 = Instant::now();
        let mut h = Heartbeat::new(defaults_idle(), t0);
        // Data goes to the client all the time: no heartbeat ever falls due.
        let mut t = Duration::ZERO;
        let mut first_ping = None;
        while t <= Duration::from_secs(20) && first_ping.is_none() {
            let now = t0 + t;
            h.on_sent_to_client(now);
            if let Action::PingClient(_) = h.poll(now) {
                first_ping = Some(t);
            }
            t += 10 * MS;
        }
        assert_eq!(first_ping, Some(Duration::from_secs(14)));
    }

    fn defaults_idle() -> Schedule {
        Schedule {
            mode: HeartbeatMode::Idle,
            ..defaults()
        }
    }

    #[test]
    fn the_wait_for_a_heartbeat_leaves_room_before_the_timeout() {
        let t0 = Instant::now();
        let mut s = schedule(HeartbeatMode::Interval);
        s.heartbeat_interval = Some(4000 * MS);
        s.ping_interval = 100 * MS;
        s.timeout = 300 * MS;
        let mut h = Heartbeat::new(s, t0);
        // A quarter of timeout - ping_interval: 50 ms, not the 4 s to the heartbeat.
        assert_eq!(h.next_deadline(), Some(t0 + 150 * MS));
        assert_eq!(
            actions(&mut h, t0 + 150 * MS),
            vec![Action::PingClient(1u64.to_be_bytes())]
        );
    }

    #[test]
    fn late_wake_ups_do_not_push_a_silent_clients_pings_off_the_heartbeats() {
        let t0 = Instant::now();
        let mut s = schedule(HeartbeatMode::Interval);
        s.heartbeat_interval = Some(100 * MS);
        s.ping_interval = 100 * MS;
        s.timeout = 400 * MS;
        let mut h = Heartbeat::new(s, t0);
        // Every timer fires 7 ms late; the client never answers.
        let mut got = Vec::new();
        for tick in 1..=4 {
            got.extend(actions(&mut h, t0 + (tick * 100 + 7) * MS));
        }
        let pings = got
            .iter()
            .filter(|a| matches!(a, Action::PingClient(_)))
            .count();
        assert_eq!(pings, 3, "{got:?}");
        assert_eq!(got.last(), Some(&Action::ClientDead));
    }
}
