//! Every ending of a connection, decided by the close machine alone: synthetic instants,
//! no sockets. Each test feeds the events a relay would see and asserts the actions,
//! the leg states, the deadline, the outcome and the close codes the summary reports.

use super::*;

const MS: Duration = Duration::from_millis(1);

fn send(to: Leg, code: u16, reason: &str) -> Action {
    Action::SendClose {
        to,
        code,
        reason: reason.to_owned(),
    }
}

fn machine() -> (Closing, Instant) {
    (
        Closing::new(drain_grace(Duration::from_secs(25))),
        Instant::now(),
    )
}

fn codes(m: &Closing) -> (Option<u16>, Option<u16>) {
    let c = m.close_codes();
    (c.client, c.upstream)
}

#[test]
fn an_open_connection_has_nothing_to_do() {
    let (mut m, t0) = machine();
    assert!(!m.is_closing());
    assert_eq!(m.outcome(), None);
    assert_eq!(m.next_deadline(), None);
    assert_eq!(m.on_timer(t0 + 3600 * 1000 * MS), []);
    for leg in Leg::BOTH {
        assert_eq!(m.state(leg), LegState::Open);
        assert!(m.reads(leg) && m.writes(leg) && m.may_send(leg));
    }
}

#[test]
fn a_client_close_is_echoed_and_passed_on_then_answered() {
    let (mut m, t0) = machine();
    assert_eq!(
        m.on_close_frame(Leg::Client, 4001, "bye", t0),
        [
            send(Leg::Client, 4001, "bye"),
            send(Leg::Upstream, 4001, "bye")
        ]
    );
    assert_eq!(m.outcome(), Some(Outcome::ClientClose));
    assert_eq!(m.next_deadline(), Some(t0 + CLOSE_GRACE));
    assert_eq!(m.state(Leg::Client), LegState::CloseReceived);
    assert_eq!(m.state(Leg::Upstream), LegState::CloseSent);
    assert!(!m.reads(Leg::Client) && m.writes(Leg::Client) && !m.may_send(Leg::Client));
    assert!(m.reads(Leg::Upstream) && !m.may_send(Leg::Upstream));
    // The upstream's reply ends its handshake; nothing more is sent.
    assert_eq!(m.on_close_frame(Leg::Upstream, 4001, "bye", t0 + MS), []);
    assert_eq!(m.state(Leg::Upstream), LegState::CloseReceived);
    assert_eq!(codes(&m), (Some(4001), Some(4001)));
    assert_eq!(m.next_deadline(), Some(t0 + CLOSE_GRACE), "unchanged");
}

#[test]
fn an_upstream_close_is_echoed_and_passed_on_then_answered() {
    let (mut m, t0) = machine();
    assert_eq!(
        m.on_close_frame(Leg::Upstream, 1000, "", t0),
        [send(Leg::Upstream, 1000, ""), send(Leg::Client, 1000, "")]
    );
    assert_eq!(m.outcome(), Some(Outcome::UpstreamClose));
    assert_eq!(m.on_close_frame(Leg::Client, 1000, "", t0 + MS), []);
    assert_eq!(codes(&m), (Some(1000), Some(1000)));
}

#[test]
fn a_close_without_an_answer_is_given_up_after_the_grace() {
    let (mut m, t0) = machine();
    m.on_close_frame(Leg::Client, 1000, "", t0);
    assert!(!m.timer_due(t0 + CLOSE_GRACE - MS));
    assert_eq!(m.on_timer(t0 + CLOSE_GRACE - MS), []);
    assert!(m.timer_due(t0 + CLOSE_GRACE));
    assert_eq!(
        m.on_timer(t0 + CLOSE_GRACE),
        [Action::GiveUp(Leg::Client), Action::GiveUp(Leg::Upstream)]
    );
    for leg in Leg::BOTH {
        assert!(!m.reads(leg) && !m.writes(leg));
    }
    assert_eq!(m.on_timer(t0 + 2 * CLOSE_GRACE), [], "given up once");
    // The echo to the client was written; the close to the upstream was still queued.
    m.on_queue_dropped(Leg::Upstream);
    assert_eq!(
        codes(&m),
        (Some(1000), None),
        "the upstream ended with 1006"
    );
}

#[test]
fn a_lost_client_closes_the_upstream_with_1001() {
    let (mut m, t0) = machine();
    assert_eq!(
        m.on_lost(Leg::Client, t0),
        [
            Action::GiveUp(Leg::Client),
            send(Leg::Upstream, close::GOING_AWAY, "client went away")
        ]
    );
    assert_eq!(m.outcome(), Some(Outcome::ClientClose));
    assert_eq!(
        m.state(Leg::Client),
        LegState::Lost {
            close_received: false
        }
    );
    assert_eq!(codes(&m), (None, Some(close::GOING_AWAY)));
    assert_eq!(m.on_lost(Leg::Client, t0 + MS), [], "lost once");
}

#[test]
fn a_lost_upstream_closes_the_client_with_1011() {
    let (mut m, t0) = machine();
    // An EOF without a close frame is a loss too.
    assert_eq!(
        m.on_eof(Leg::Upstream, t0),
        [
            Action::GiveUp(Leg::Upstream),
            send(
                Leg::Client,
                close::INTERNAL_ERROR,
                "upstream connection lost"
            )
        ]
    );
    assert_eq!(m.outcome(), Some(Outcome::UpstreamClose));
    assert_eq!(codes(&m), (Some(close::INTERNAL_ERROR), None));
}

#[test]
fn an_eof_after_the_close_handshake_is_the_end_of_the_leg_not_a_loss() {
    let (mut m, t0) = machine();
    m.on_dead(Leg::Client, false, t0);
    assert_eq!(m.state(Leg::Client), LegState::CloseSent);
    // The client ends its stream without answering: nothing more is read, what is
    // queued for it is still written.
    assert_eq!(m.on_eof(Leg::Client, t0 + MS), []);
    assert_eq!(m.state(Leg::Client), LegState::Closed);
    assert!(m.writes(Leg::Client));
    m.on_close_frame(Leg::Upstream, 1001, "", t0 + 2 * MS);
    assert_eq!(m.on_eof(Leg::Upstream, t0 + 3 * MS), []);
    assert_eq!(m.state(Leg::Upstream), LegState::CloseReceived);
    assert_eq!(codes(&m), (Some(1001), Some(1001)));
}

#[test]
fn a_dead_client_closes_the_upstream_first_then_itself() {
    let (mut m, t0) = machine();
    assert_eq!(
        m.on_dead(Leg::Client, false, t0),
        [
            send(Leg::Upstream, close::GOING_AWAY, "client unresponsive"),
            send(Leg::Client, close::GOING_AWAY, "no answer to pings")
        ]
    );
    assert_eq!(m.outcome(), Some(Outcome::ClientDead));
    assert_eq!(m.next_deadline(), Some(t0 + CLOSE_GRACE));
    // Between frames the client is still read, for a late close reply.
    assert!(m.reads(Leg::Client));
}

#[test]
fn a_client_dead_mid_frame_is_read_no_more_and_the_upstream_is_cut() {
    let (mut m, t0) = machine();
    m.on_dead(Leg::Client, true, t0);
    assert_eq!(m.state(Leg::Client), LegState::Closed);
    assert!(!m.reads(Leg::Client));
    // The relay sees the client's frame toward the upstream can never end.
    assert_eq!(
        m.on_frame_unfinishable(Leg::Client),
        [Action::Cut(Leg::Upstream)]
    );
    // The upstream's 1001 waited behind that frame: dropped, never sent.
    m.on_queue_dropped(Leg::Upstream);
    assert_eq!(codes(&m), (Some(close::GOING_AWAY), None));
    assert_eq!(m.outcome(), Some(Outcome::ClientDead));
}

#[test]
fn a_dead_upstream_closes_itself_first_then_the_client_with_1011() {
    let (mut m, t0) = machine();
    assert_eq!(
        m.on_dead(Leg::Upstream, false, t0),
        [
            send(Leg::Upstream, close::GOING_AWAY, "no answer to pings"),
            send(Leg::Client, close::INTERNAL_ERROR, "upstream unresponsive")
        ]
    );
    assert_eq!(m.outcome(), Some(Outcome::UpstreamDead));
    assert!(m.reads(Leg::Upstream));
}

#[test]
fn an_upstream_dead_mid_frame_has_the_client_cut() {
    let (mut m, t0) = machine();
    m.on_dead(Leg::Upstream, true, t0);
    assert!(!m.reads(Leg::Upstream));
    assert_eq!(
        m.on_frame_unfinishable(Leg::Upstream),
        [Action::Cut(Leg::Client)]
    );
    m.on_queue_dropped(Leg::Client);
    assert_eq!(codes(&m), (None, Some(close::GOING_AWAY)));
}

#[test]
fn a_client_that_takes_nothing_is_given_up_and_the_upstream_closed() {
    let (mut m, t0) = machine();
    assert_eq!(
        m.on_write_timeout(Leg::Client, t0),
        [
            Action::GiveUp(Leg::Client),
            send(Leg::Upstream, close::GOING_AWAY, "client too slow")
        ]
    );
    assert_eq!(m.outcome(), Some(Outcome::Error));
    assert_eq!(codes(&m), (None, Some(close::GOING_AWAY)));
}

#[test]
fn an_upstream_that_takes_nothing_is_given_up_and_the_client_closed() {
    let (mut m, t0) = machine();
    assert_eq!(
        m.on_write_timeout(Leg::Upstream, t0),
        [
            Action::GiveUp(Leg::Upstream),
            send(Leg::Client, close::INTERNAL_ERROR, "upstream too slow")
        ]
    );
    assert_eq!(m.outcome(), Some(Outcome::Error));
}

#[test]
fn the_first_decision_wins() {
    let (mut m, t0) = machine();
    m.on_close_frame(Leg::Client, 1000, "", t0);
    // Later trouble changes neither the outcome nor the deadline, and no second close
    // goes to a leg.
    assert_eq!(
        m.on_write_timeout(Leg::Upstream, t0 + 10 * MS),
        [Action::GiveUp(Leg::Upstream)]
    );
    assert_eq!(
        m.on_lost(Leg::Client, t0 + 20 * MS),
        [Action::GiveUp(Leg::Client)]
    );
    assert_eq!(m.outcome(), Some(Outcome::ClientClose));
    assert_eq!(m.next_deadline(), Some(t0 + CLOSE_GRACE));
    assert_eq!(m.on_shutdown(t0 + 30 * MS), [], "no drain once closing");
    // The client's close came first: its code stands though the echo was dropped.
    m.on_queue_dropped(Leg::Client);
    assert_eq!(codes(&m).0, Some(1000));
}

#[test]
fn a_client_violation_tells_it_why_and_closes_the_upstream_with_1001() {
    let (mut m, t0) = machine();
    assert_eq!(
        m.on_violation(Leg::Client, close::INVALID_PAYLOAD, "invalid UTF-8", t0),
        [
            send(Leg::Client, close::INVALID_PAYLOAD, "invalid UTF-8"),
            send(
                Leg::Upstream,
                close::GOING_AWAY,
                "client violated the protocol"
            )
        ]
    );
    assert_eq!(m.outcome(), Some(Outcome::Error));
    assert_eq!(m.state(Leg::Client), LegState::Closed);
    assert!(!m.reads(Leg::Client) && m.writes(Leg::Client));
}

#[test]
fn an_upstream_violation_closes_the_client_with_1011_or_1009() {
    let (mut m, t0) = machine();
    assert_eq!(
        m.on_violation(Leg::Upstream, close::PROTOCOL_ERROR, "bad opcode", t0),
        [
            send(Leg::Upstream, close::PROTOCOL_ERROR, "bad opcode"),
            send(
                Leg::Client,
                close::INTERNAL_ERROR,
                "upstream violated the protocol"
            )
        ]
    );
    let (mut m, t0) = machine();
    assert_eq!(
        m.on_violation(Leg::Upstream, close::TOO_BIG, "message too big", t0),
        [
            send(Leg::Upstream, close::TOO_BIG, "message too big"),
            send(
                Leg::Client,
                close::TOO_BIG,
                "upstream violated the protocol"
            )
        ]
    );
    assert_eq!(m.outcome(), Some(Outcome::Error));
}

#[test]
fn a_violation_mid_frame_has_the_other_leg_cut() {
    let (mut m, t0) = machine();
    m.on_violation(Leg::Client, close::INVALID_PAYLOAD, "invalid UTF-8", t0);
    assert_eq!(
        m.on_frame_unfinishable(Leg::Client),
        [Action::Cut(Leg::Upstream)]
    );
    m.on_queue_dropped(Leg::Upstream);
    assert_eq!(codes(&m), (Some(close::INVALID_PAYLOAD), None));
}

#[test]
fn a_client_lost_mid_frame_has_the_upstream_cut() {
    let (mut m, t0) = machine();
    m.on_lost(Leg::Client, t0);
    assert_eq!(
        m.on_frame_unfinishable(Leg::Client),
        [Action::Cut(Leg::Upstream)]
    );
    m.on_queue_dropped(Leg::Upstream);
    assert_eq!(codes(&m), (None, None));
    assert_eq!(m.outcome(), Some(Outcome::ClientClose));
}

#[test]
fn an_upstream_close_echo_behind_a_lost_client_frame_keeps_the_upstream_code() {
    let (mut m, t0) = machine();
    m.on_close_frame(Leg::Upstream, 4000, "", t0);
    assert_eq!(
        m.on_lost(Leg::Client, t0 + MS),
        [Action::GiveUp(Leg::Client)]
    );
    assert_eq!(
        m.on_frame_unfinishable(Leg::Client),
        [Action::Cut(Leg::Upstream)]
    );
    m.on_queue_dropped(Leg::Upstream);
    assert_eq!(
        m.state(Leg::Upstream),
        LegState::Lost {
            close_received: true
        }
    );
    assert_eq!(codes(&m), (Some(4000), Some(4000)));
    assert_eq!(m.outcome(), Some(Outcome::UpstreamClose));
}

#[test]
fn a_drain_closes_the_upstream_once_the_client_answers() {
    let (mut m, t0) = machine();
    assert_eq!(
        m.on_shutdown(t0),
        [send(
            Leg::Client,
            close::GOING_AWAY,
            "wsbeat is shutting down"
        )]
    );
    assert_eq!(m.outcome(), Some(Outcome::Shutdown));
    assert_eq!(m.next_deadline(), Some(t0 + CLOSE_GRACE));
    // The client's last messages still flow to the upstream.
    assert!(m.reads(Leg::Client) && m.may_send(Leg::Upstream));
    let answered = t0 + 100 * MS;
    assert_eq!(
        m.on_close_frame(Leg::Client, close::GOING_AWAY, "", answered),
        [send(
            Leg::Upstream,
            close::GOING_AWAY,
            "wsbeat is shutting down"
        )]
    );
    assert_eq!(
        m.next_deadline(),
        Some(answered + CLOSE_GRACE),
        "a fresh grace"
    );
    assert_eq!(
        m.on_close_frame(Leg::Upstream, close::GOING_AWAY, "", answered + MS),
        []
    );
    assert_eq!(
        codes(&m),
        (Some(close::GOING_AWAY), Some(close::GOING_AWAY))
    );
    assert_eq!(m.outcome(), Some(Outcome::Shutdown));
}

#[test]
fn a_drain_without_the_clients_answer_gives_it_up_at_the_drain_grace() {
    // drain_timeout 900 ms: the client has a third of it to answer.
    let mut m = Closing::new(drain_grace(900 * MS));
    let t0 = Instant::now();
    m.on_shutdown(t0);
    assert_eq!(m.next_deadline(), Some(t0 + 300 * MS));
    assert_eq!(m.on_timer(t0 + 299 * MS), []);
    assert_eq!(
        m.on_timer(t0 + 300 * MS),
        [
            Action::GiveUp(Leg::Client),
            send(Leg::Upstream, close::GOING_AWAY, "wsbeat is shutting down")
        ]
    );
    let second = t0 + 300 * MS + CLOSE_GRACE;
    assert_eq!(m.next_deadline(), Some(second));
    assert_eq!(m.on_timer(second), [Action::GiveUp(Leg::Upstream)]);
    assert_eq!(m.outcome(), Some(Outcome::Shutdown));
}

#[test]
fn a_drain_closes_the_upstream_when_the_client_is_lost() {
    let (mut m, t0) = machine();
    m.on_shutdown(t0);
    // Closing already: no "client went away", but the drain's own 1001.
    assert_eq!(
        m.on_lost(Leg::Client, t0 + MS),
        [
            Action::GiveUp(Leg::Client),
            send(Leg::Upstream, close::GOING_AWAY, "wsbeat is shutting down")
        ]
    );
    assert_eq!(m.outcome(), Some(Outcome::Shutdown));
}

#[test]
fn a_drain_cut_by_its_grace_with_the_client_mid_frame_cuts_the_upstream() {
    let (mut m, t0) = machine();
    m.on_shutdown(t0);
    let given_up = m.on_timer(t0 + CLOSE_GRACE);
    assert_eq!(given_up[0], Action::GiveUp(Leg::Client));
    // The upstream's 1001 is queued behind the client's half frame, which can never end.
    assert_eq!(
        m.on_frame_unfinishable(Leg::Client),
        [Action::Cut(Leg::Upstream)]
    );
    m.on_queue_dropped(Leg::Upstream);
    assert_eq!(codes(&m), (Some(close::GOING_AWAY), None));
    assert_eq!(m.outcome(), Some(Outcome::Shutdown));
}

#[test]
fn a_slow_client_in_a_drain_closes_the_upstream_at_once() {
    let (mut m, t0) = machine();
    m.on_shutdown(t0);
    let t = t0 + 500 * MS;
    assert_eq!(
        m.on_write_timeout(Leg::Client, t),
        [
            Action::GiveUp(Leg::Client),
            send(Leg::Upstream, close::GOING_AWAY, "client too slow")
        ]
    );
    assert_eq!(
        m.outcome(),
        Some(Outcome::Shutdown),
        "the drain decided first"
    );
    assert_eq!(m.next_deadline(), Some(t + CLOSE_GRACE));
}

#[test]
fn the_drain_grace_leaves_room_for_the_upstreams_close() {
    assert_eq!(drain_grace(Duration::from_secs(25)), CLOSE_GRACE);
    assert_eq!(drain_grace(900 * MS), 300 * MS);
}

#[test]
fn a_planned_drain_waits_for_its_turn_then_drains_client_first() {
    let (mut m, t0) = machine();
    let turn = t0 + 1500 * MS;
    assert_eq!(m.plan_drain(DrainCause::Shutdown, turn, t0), []);
    // Still open until then: frames flow, nothing decided.
    assert!(!m.is_closing());
    assert_eq!(m.outcome(), None);
    assert_eq!(m.next_deadline(), Some(turn));
    assert!(!m.timer_due(turn - MS));
    assert_eq!(m.on_timer(turn - MS), []);
    assert!(m.timer_due(turn));
    assert_eq!(
        m.on_timer(turn),
        [send(
            Leg::Client,
            close::GOING_AWAY,
            "wsbeat is shutting down"
        )]
    );
    assert_eq!(m.outcome(), Some(Outcome::Shutdown));
    assert_eq!(m.next_deadline(), Some(turn + CLOSE_GRACE));
    assert!(m.reads(Leg::Client) && m.may_send(Leg::Upstream));
}

#[test]
fn a_drain_due_already_begins_at_once() {
    let (mut m, t0) = machine();
    assert_eq!(
        m.plan_drain(DrainCause::Shutdown, t0, t0),
        [send(
            Leg::Client,
            close::GOING_AWAY,
            "wsbeat is shutting down"
        )]
    );
    assert_eq!(m.outcome(), Some(Outcome::Shutdown));
}

#[test]
fn max_age_drains_like_a_shutdown_and_is_counted_as_max_age() {
    let (mut m, t0) = machine();
    let age = t0 + 1000 * MS;
    assert_eq!(m.plan_drain(DrainCause::MaxAge, age, t0), []);
    let reason = "connection reached its maximum age";
    assert_eq!(
        m.on_timer(age),
        [send(Leg::Client, close::GOING_AWAY, reason)]
    );
    assert_eq!(m.outcome(), Some(Outcome::MaxAge));
    // The client's messages still flow; its answer closes the upstream.
    assert!(m.reads(Leg::Client) && m.may_send(Leg::Upstream));
    let answered = age + 20 * MS;
    assert_eq!(
        m.on_close_frame(Leg::Client, close::GOING_AWAY, "", answered),
        [send(Leg::Upstream, close::GOING_AWAY, reason)]
    );
    assert_eq!(
        m.on_close_frame(Leg::Upstream, close::GOING_AWAY, "", answered + MS),
        []
    );
    assert_eq!(m.outcome(), Some(Outcome::MaxAge));
    assert_eq!(
        codes(&m),
        (Some(close::GOING_AWAY), Some(close::GOING_AWAY))
    );
}

#[test]
fn the_earliest_planned_drain_wins_and_a_closing_connection_plans_none() {
    let (mut m, t0) = machine();
    m.plan_drain(DrainCause::MaxAge, t0 + 5000 * MS, t0);
    // A shutdown turn before the age limit takes its place, and its cause.
    m.plan_drain(DrainCause::Shutdown, t0 + 2000 * MS, t0 + MS);
    assert_eq!(m.next_deadline(), Some(t0 + 2000 * MS));
    // A later one changes nothing.
    m.plan_drain(DrainCause::MaxAge, t0 + 3000 * MS, t0 + 2 * MS);
    assert_eq!(m.next_deadline(), Some(t0 + 2000 * MS));
    m.on_timer(t0 + 2000 * MS);
    assert_eq!(m.outcome(), Some(Outcome::Shutdown));

    // The client closed first: its ending stands, no drain is planned any more.
    let (mut m, t0) = machine();
    m.plan_drain(DrainCause::MaxAge, t0 + 1000 * MS, t0);
    m.on_close_frame(Leg::Client, 1000, "", t0 + 10 * MS);
    assert_eq!(m.plan_drain(DrainCause::Shutdown, t0, t0 + 20 * MS), []);
    assert_eq!(m.next_deadline(), Some(t0 + 10 * MS + CLOSE_GRACE));
    assert_eq!(m.outcome(), Some(Outcome::ClientClose));
}

#[test]
fn max_age_jitter_stays_within_ten_percent() {
    let hour = Duration::from_secs(3600);
    // The extremes of the random value are the edges of the window.
    let low = jittered_age(hour, 0);
    let high = jittered_age(hour, u64::MAX);
    assert_eq!(low, Duration::from_secs(3240) + 10 * MS);
    assert!(high <= Duration::from_secs(3960) - 50 * MS, "{high:?}");
    assert!(high > Duration::from_secs(3960) - 51 * MS, "{high:?}");
    assert_eq!(
        jittered_age(hour, 1 << 63),
        Duration::from_millis(3_599_980)
    );
    // One second: the early margin is 10 ms, the late one 50 ms.
    let second = Duration::from_secs(1);
    assert_eq!(jittered_age(second, 0), 910 * MS);
    assert!(jittered_age(second, u64::MAX) <= 1050 * MS);
    assert!(jittered_age(second, u64::MAX) > 1049 * MS);
    // Any random value: inside ±10%, and the draws cover the window evenly (a spread
    // of well-mixed values lands in every tenth of it).
    let mut tenths = [0u32; 10];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..10_000 {
        // xorshift64: well-mixed test inputs without a clock or a crate.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let age = jittered_age(second, x);
        assert!(age >= 900 * MS && age <= 1100 * MS, "{age:?}");
        let tenth = ((age - 910 * MS).as_secs_f64() / 0.140 * 10.0) as usize;
        tenths[tenth.min(9)] += 1;
    }
    for (i, n) in tenths.iter().enumerate() {
        assert!((800..1200).contains(n), "tenth {i}: {n} of 10000");
    }
    // Tiny ages: the margins shrink with them, the window never turns over.
    for ms in [1, 10, 100] {
        let age = ms * MS;
        for r in [0, 1 << 63, u64::MAX] {
            let j = jittered_age(age, r);
            assert!(
                j >= age.mul_f64(0.9) && j <= age.mul_f64(1.1),
                "{age:?} {j:?}"
            );
        }
    }
}
