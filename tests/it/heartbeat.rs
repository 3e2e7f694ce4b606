//! Heartbeats and liveness, timed over real sockets with short intervals and margins that
//! survive a loaded 2-core machine.

use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use wsbeat::config::HeartbeatMode;

/// Heartbeat interval in the cadence tests.
const INTERVAL: Duration = Duration::from_millis(250);
/// How late a heartbeat may be on a loaded machine before the test calls it missed.
const MARGIN: Duration = Duration::from_millis(200);

fn max_gap(start: Instant, beats: &[Instant]) -> Duration {
    let mut prev = start;
    let mut max = Duration::ZERO;
    for &b in beats {
        max = max.max(b - prev);
        prev = b;
    }
    max
}

async fn interval_mode_cadence(behaviour: BackendBehaviour) -> (usize, usize) {
    let backend = Backend::start(behaviour).await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.heartbeat.interval = ms(INTERVAL.as_millis() as u64);
    })
    .await;
    let mut client = connect(&proxy.url("/")).await;
    let start = Instant::now();
    let Watched { beats, data, .. } = watch(&mut client, Duration::from_millis(2000)).await;
    let gap = max_gap(start, &beats);
    assert!(gap <= INTERVAL + MARGIN, "a heartbeat gap of {gap:?}");
    // 2 s / 250 ms = 8 heartbeats; allow one lost to the window's edges.
    assert!(beats.len() >= 7, "only {} heartbeats", beats.len());
    (beats.len(), data)
}

#[tokio::test]
async fn interval_mode_beats_on_time_with_an_idle_backend() {
    let (_, data) = interval_mode_cadence(BackendBehaviour::default()).await;
    assert_eq!(data, 0);
}

#[tokio::test]
async fn interval_mode_beats_on_time_while_the_backend_sends_every_100ms() {
    let (_, data) = interval_mode_cadence(BackendBehaviour {
        ticks: Some((Duration::from_millis(100), 1000)),
        ..Default::default()
    })
    .await;
    assert!(data >= 15, "the backend's ticks did not flow ({data})");
}

#[tokio::test]
async fn idle_mode_stays_quiet_while_traffic_flows_then_beats() {
    // 15 ticks at 100 ms (1.5 s of traffic), heartbeat interval 300 ms.
    let backend = Backend::start(BackendBehaviour {
        ticks: Some((Duration::from_millis(100), 15)),
        ..Default::default()
    })
    .await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.heartbeat.interval = ms(300);
        c.heartbeat.mode = HeartbeatMode::Idle;
    })
    .await;
    let mut client = connect(&proxy.url("/")).await;
    let mut last_tick = None;
    let mut ticks = 0;
    loop {
        match recv(&mut client).await {
            Message::Text(t) if t.as_str() == HB => break,
            Message::Text(t) => {
                assert!(t.starts_with("tick"));
                ticks += 1;
                last_tick = Some(Instant::now());
            }
            _ => {}
        }
    }
    // The first heartbeat came only after the backend fell silent, a quiet interval
    // after its last message.
    assert_eq!(ticks, 15, "a heartbeat arrived while traffic flowed");
    let quiet = last_tick.unwrap().elapsed();
    assert!(
        quiet >= Duration::from_millis(250),
        "heartbeat {quiet:?} after the last tick"
    );
    assert!(
        quiet <= Duration::from_millis(300) + MARGIN,
        "heartbeat {quiet:?} after the last tick"
    );
}

#[tokio::test]
async fn heartbeats_off_sends_none() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.heartbeat.message = None;
        c.heartbeat.interval = ms(50);
    })
    .await;
    let mut client = connect(&proxy.url("/")).await;
    let beats = watch(&mut client, Duration::from_millis(400)).await.beats;
    assert!(beats.is_empty());
}

#[tokio::test]
async fn route_overrides_the_heartbeat_interval_and_message() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.heartbeat.interval = ms(10_000);
        c.routes = vec![serde_saphyr::from_str(
            "{ path: /fast, heartbeat: { interval: 100ms, message: beat } }",
        )
        .unwrap()];
    })
    .await;
    let mut client = connect(&proxy.url("/fast/1")).await;
    assert_eq!(recv(&mut client).await, Message::text("beat"));
}

#[tokio::test]
async fn client_heartbeats_never_reach_the_backend_and_keep_the_client_alive() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.heartbeat.message = Some(HB.into());
        // Pings are rare, so only the client's heartbeats can keep it alive.
        c.liveness.ping_interval = ms(5_000);
        c.liveness.timeout = ms(6_000);
    })
    .await;
    let mut client = connect(&proxy.url("/")).await;
    client.send(Message::text(HB)).await.unwrap();
    client.send(Message::text("--heartbeat-- ")).await.unwrap();
    client
        .send(Message::binary(HB.as_bytes().to_vec()))
        .await
        .unwrap();
    client.send(Message::text("next")).await.unwrap();
    // The exact string is dropped; near misses and binary copies are data.
    for expected in [
        Message::text("--heartbeat-- "),
        Message::binary(HB.as_bytes().to_vec()),
        Message::text("next"),
    ] {
        match backend.next_after_handshake().await {
            Seen::Message { msg, .. } => assert_eq!(msg, expected),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn client_heartbeats_alone_keep_a_client_alive_past_timeout() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.liveness.ping_interval = ms(100);
        c.liveness.timeout = ms(400);
    })
    .await;
    // A raw client that never answers PINGs, only sends heartbeats every 100 ms.
    let mut raw = raw_websocket(proxy.addr, "/").await;
    let beat = client_frame(0x1, HB.as_bytes());
    let alive_until = Instant::now() + Duration::from_millis(1200);
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    while Instant::now() < alive_until {
        ticker.tick().await;
        raw.write_all(&beat).await.unwrap();
    }
    // Three timeouts later the backend has seen nothing at all: no heartbeat, no close.
    assert!(matches!(backend.next().await, Seen::Handshake { .. }));
    assert!(backend.seen.try_recv().is_err(), "the backend saw traffic");
    // Silence: now the verdict comes.
    backend.expect_close(CloseCode::Away).await;
}

#[tokio::test]
async fn after_a_stall_wsbeat_reads_waiting_proof_of_life_before_judging() {
    // wsbeat frozen (SIGSTOP: a CPU-throttled pod, a paused VM) for longer than
    // liveness.timeout while the client goes on sending heartbeats: on waking, every
    // timer is due at once, and the client's heartbeats wait in the socket. They must be
    // read before the verdict, or a live client is declared dead.
    let mut backend = Backend::echo().await;
    let wsbeat = WsbeatProcess::start(
        backend.addr,
        "liveness: { ping_interval: 200ms, timeout: 600ms }",
    );
    let mut raw = raw_websocket(wsbeat.addr, "/").await;
    assert!(matches!(backend.next().await, Seen::Handshake { .. }));
    let beat = client_frame(0x1, HB.as_bytes());
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    let started = Instant::now();
    let mut stopped = false;
    let mut resumed_at = None;
    while resumed_at.is_none_or(|at: Instant| at.elapsed() < Duration::from_millis(1000)) {
        ticker.tick().await;
        raw.write_all(&beat).await.unwrap();
        let t = started.elapsed();
        if !stopped && t >= Duration::from_millis(300) {
            signal(wsbeat.child.id(), "STOP");
            stopped = true;
        }
        if stopped && resumed_at.is_none() && t >= Duration::from_millis(1800) {
            signal(wsbeat.child.id(), "CONT");
            resumed_at = Some(Instant::now());
        }
    }
    let client = [("route", "default"), ("leg", "client")];
    assert_eq!(
        metric(wsbeat.admin, "wsbeat_liveness_timeouts_total", &client).await,
        0.0,
        "a client that kept sending was declared dead"
    );
    assert!(
        backend.seen.try_recv().is_err(),
        "the backend saw traffic (a close?)"
    );
}

#[tokio::test]
async fn a_silent_client_is_declared_dead_and_the_backend_gets_1001_in_time() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.liveness.ping_interval = ms(100);
        c.liveness.timeout = ms(400);
    })
    .await;
    // A raw client: completes the handshake, then never reads or answers anything.
    let mut raw = raw_websocket(proxy.addr, "/").await;
    let handshake_done = Instant::now();
    match backend.next().await {
        Seen::Handshake { .. } => {}
        other => panic!("{other:?}"),
    }
    backend.expect_close(CloseCode::Away).await;
    let took = handshake_done.elapsed();
    assert!(
        took >= Duration::from_millis(380),
        "declared dead after only {took:?}"
    );
    assert!(
        took <= Duration::from_millis(100 + 400) + Duration::from_millis(500),
        "declared dead after {took:?}"
    );
    // The client's socket is dropped at most CLOSE_GRACE after the verdict.
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut buf))
        .await
        .expect("wsbeat dropped the dead client's socket")
        .ok();
    assert!(handshake_done.elapsed() <= Duration::from_millis(400 + 1000 + 1000));
}

#[tokio::test]
async fn a_client_that_answers_pings_outlives_the_timeout() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.heartbeat.message = None;
        c.liveness.ping_interval = ms(100);
        c.liveness.timeout = ms(400);
    })
    .await;
    // tokio-tungstenite answers PINGs while it reads; this client only reads.
    let mut client = connect(&proxy.url("/")).await;
    let data = watch(&mut client, Duration::from_millis(1500)).await.data;
    assert_eq!(data, 0);
    client.send(Message::text("still here")).await.unwrap();
    assert_eq!(
        recv_data(&mut client, HB).await,
        Message::text("still here")
    );
    backend.expect_message(Message::text("still here")).await;
}

#[tokio::test]
async fn a_client_dead_in_the_middle_of_a_frame_has_the_upstream_cut_at_the_verdict() {
    // A phone that loses its network in the middle of an upload: half of a large frame
    // has reached the upstream when the client falls silent. No close frame can follow
    // half a frame, so at the verdict the upstream's TCP is ended at once (not a
    // CLOSE_GRACE later), and the upstream leg counts as 1006, not as a 1001 never sent.
    let (addr, mut received) = raw_upstream(RawAnswer::Accept).await;
    let proxy = Proxy::start(addr, |c| {
        c.heartbeat.message = None;
        c.liveness.ping_interval = ms(100);
        c.liveness.timeout = ms(500);
    })
    .await;
    let mut raw = raw_websocket(proxy.addr, "/").await;
    let half = send_half_frame(&mut raw).await;
    let silent_since = Instant::now();
    let got = next_received(&mut received).await;
    let took = silent_since.elapsed();
    // The upstream got the half frame as the client sent it, and nothing after it.
    assert!(
        got.after == half,
        "the upstream got {} bytes, not the {}-byte half frame",
        got.after.len(),
        half.len()
    );
    assert!(
        took >= Duration::from_millis(400),
        "cut after {took:?}, before liveness.timeout"
    );
    // timeout + 100 ms, plus a margin for a loaded machine; waiting for CLOSE_GRACE
    // would take 1500 ms.
    assert!(
        took <= Duration::from_millis(500 + 100 + 500),
        "the upstream's connection ended {took:?} after the client fell silent"
    );
    // The client gets its 1001, then its socket is closed.
    assert_eq!(
        close_code_in(&read_until_closed(&mut raw).await),
        Some(1001)
    );
    metric_at_least(
        proxy.admin,
        "wsbeat_connections_total",
        &[("route", "default"), ("outcome", "client_dead")],
        1.0,
        PATIENCE,
    )
    .await;
    let code = |leg, code| close_codes(proxy.admin, leg, code);
    assert_eq!(code("upstream", "1006").await, 1.0);
    assert_eq!(code("upstream", "1001").await, 0.0, "a 1001 never sent");
    assert_eq!(code("client", "1001").await, 1.0);
}

#[tokio::test]
async fn a_client_heartbeat_sent_in_fragments_is_dropped_like_a_whole_one() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| c.heartbeat.message = Some(HB.into())).await;
    let mut raw = raw_websocket(proxy.addr, "/").await;
    // The heartbeat in two fragments; again with a PING between them; then a message
    // that starts like the heartbeat but is longer, split in the middle; then a marker.
    let mut wire = client_fragment(0x1, b"--heart");
    wire.extend(client_frame(0x0, b"beat--"));
    wire.extend(client_fragment(0x1, b"--heart"));
    wire.extend(client_frame(0x9, b"between"));
    wire.extend(client_frame(0x0, b"beat--"));
    wire.extend(client_fragment(0x1, b"--heartb"));
    wire.extend(client_frame(0x0, b"eat--x"));
    wire.extend(client_frame(0x1, b"next"));
    raw.write_all(&wire).await.unwrap();
    for expected in [Message::text("--heartbeat--x"), Message::text("next")] {
        match backend.next_after_handshake().await {
            Seen::Message { msg, .. } => assert_eq!(msg, expected),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        metric(
            proxy.admin,
            "wsbeat_client_heartbeats_dropped_total",
            &[("route", "default")]
        )
        .await,
        2.0
    );
}
