//! DESIGN.md behaviours that no other test pins down: upstream PINGs, extensions in the
//! upstream's 101, the liveness verdict's counters, `drop_client: false`, idle mode with
//! PINGs flowing, a drain that hits its deadline, the admin listener turned off, the
//! upstream chosen by config whatever the request target says, and per-route overrides.
//! Each test fails if the behaviour it names is removed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use wsbeat::config::{Compression, HeartbeatMode};

/// How late a timed event may be on a loaded 2-core machine before a test calls it missed.
const MARGIN: Duration = Duration::from_millis(250);

/// An upstream on raw TCP that answers every handshake with a correct 101 plus
/// `extra_headers` (whole lines, each ending in CRLF), then reads and discards until EOF.
/// Hands over each request head as received, request line included.
async fn upstream_answering_101_with(
    extra_headers: &'static str,
) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let Some(head) = read_head(&mut s).await else {
                    return;
                };
                let head = String::from_utf8(head).unwrap();
                let key = head_field(&head, "sec-websocket-key").expect("a key");
                let accept =
                    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
                let _ = tx.send(head);
                let ok = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{extra_headers}\r\n"
                );
                if s.write_all(ok.as_bytes()).await.is_ok() {
                    let _ = s.read_to_end(&mut Vec::new()).await;
                }
            });
        }
    });
    (addr, rx)
}

/// The next request head a raw upstream received, or a panic after PATIENCE.
async fn next_head(heads: &mut mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(PATIENCE, heads.recv())
        .await
        .expect("the upstream got a handshake in time")
        .expect("the upstream is running")
}

/// TCP ports that process `pid` listens on: its socket inodes (/proc/PID/fd) matched
/// against the LISTEN entries of /proc/PID/net/tcp{,6}.
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the process is running")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXIP:HEXPORT; st 0A is LISTEN; column 9 is the inode.
            if cols.len() > 9 && cols[3] == "0A" && inodes.iter().any(|i| i == cols[9]) {
                let port = cols[1].rsplit(':').next().unwrap();
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports.sort_unstable();
    ports
}

/// DESIGN §1.2: Ping/Pong are hop-by-hop, answered on each leg by wsbeat itself.
#[tokio::test]
async fn upstream_pings_are_answered_by_wsbeat_and_never_reach_the_client() {
    let (pong_tx, pong_rx) = oneshot::channel();
    let upstream = scripted_backend(move |mut ws| async move {
        ws.send(Message::Ping("upstream ping 1".into()))
            .await
            .unwrap();
        ws.send(Message::text("after the ping")).await.unwrap();
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Pong(payload) = msg {
                let _ = pong_tx.send(payload);
                break;
            }
        }
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    let proxy = Proxy::start(upstream, |c| {
        // wsbeat's own PINGs to the client must not be confused with a forwarded one.
        c.liveness.ping_interval = ms(60_000);
        c.liveness.timeout = ms(120_000);
    })
    .await;
    let mut client = connect(&proxy.url("/")).await;
    // The data message left the backend after its PING: once it is here, a forwarded PING
    // would have been here first.
    loop {
        match recv(&mut client).await {
            Message::Text(t) if t.as_str() == "after the ping" => break,
            Message::Text(t) if t.as_str() == HB => {}
            Message::Ping(p) => panic!("wsbeat forwarded the upstream's PING {p:?}"),
            other => panic!("unexpected {other:?}"),
        }
    }
    let pong = tokio::time::timeout(PATIENCE, pong_rx)
        .await
        .expect("the backend got a PONG in time")
        .expect("the backend script ran");
    assert_eq!(&pong[..], b"upstream ping 1");
}

/// DESIGN §1.1: with `compression: off` wsbeat offers no extension upstream, so a 101
/// that names one breaks the handshake (RFC 6455 §4.1) and the client gets 502, never a
/// compressed stream. (`passthrough`: tests/it/compression.rs.)
#[tokio::test]
async fn an_upstream_101_with_an_extension_the_client_did_not_get_is_refused_with_502() {
    let (upstream, mut heads) =
        upstream_answering_101_with("Sec-WebSocket-Extensions: permessage-deflate\r\n").await;
    let proxy = Proxy::start(upstream, |c| c.compression = Compression::Off).await;
    // A browser offers permessage-deflate; that offer is for wsbeat, not the backend.
    let request = upgrade_request("/").replace(
        "\r\n\r\n",
        "\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
    );
    let response = raw_http(proxy.addr, &request).await;
    assert!(response.starts_with("HTTP/1.1 502"), "{response}");
    assert!(
        !response
            .to_ascii_lowercase()
            .contains("sec-websocket-extensions"),
        "{response}"
    );
    let head = next_head(&mut heads).await;
    assert_eq!(
        head_field(&head, "sec-websocket-extensions"),
        None,
        "{head}"
    );
}

/// DESIGN §1.4 and §2.4: a client silent for `liveness.timeout` is dead; the upstream gets
/// 1001 at once and the verdict is counted.
#[tokio::test]
async fn a_client_that_stops_answering_pings_closes_the_upstream_with_1001_and_is_counted_dead() {
    const TIMEOUT: Duration = Duration::from_millis(400);
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.liveness.ping_interval = ms(100);
        c.liveness.timeout = ms(TIMEOUT.as_millis() as u64);
    })
    .await;
    // A raw client: after the handshake (its last frame) it never reads nor writes, so
    // no PONG can ever come from it.
    let asked = Instant::now();
    let _dead = raw_websocket(proxy.addr, "/").await;
    let last_frame = Instant::now();
    backend.expect_close(CloseCode::Away).await;
    let since_handshake = asked.elapsed();
    let since_last_frame = last_frame.elapsed();
    assert!(
        since_handshake >= TIMEOUT,
        "declared dead after only {since_handshake:?}"
    );
    assert!(
        since_last_frame <= TIMEOUT + Duration::from_secs(1),
        "the upstream's close came {since_last_frame:?} after the client's last frame"
    );
    let client_leg = [("route", "default"), ("leg", "client")];
    let upstream_leg = [("route", "default"), ("leg", "upstream")];
    let timeouts = "wsbeat_liveness_timeouts_total";
    assert_eq!(metric(proxy.admin, timeouts, &client_leg).await, 1.0);
    assert_eq!(metric(proxy.admin, timeouts, &upstream_leg).await, 0.0);
    // The outcome is counted when the connection is over: CLOSE_GRACE after the verdict,
    // as this client never answers the close.
    let outcome = |o| [("route", "default"), ("outcome", o)];
    let total = "wsbeat_connections_total";
    metric_at_least(proxy.admin, total, &outcome("client_dead"), 1.0, PATIENCE).await;
    assert_eq!(
        metric(proxy.admin, total, &outcome("client_dead")).await,
        1.0
    );
    assert_eq!(
        metric(proxy.admin, total, &outcome("client_close")).await,
        0.0
    );
}

/// DESIGN §1.3: `heartbeat.drop_client: false` lets the client's magic string through.
#[tokio::test]
async fn with_drop_client_false_a_client_heartbeat_reaches_the_backend_unchanged() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| c.heartbeat.drop_client = false).await;
    let mut client = connect(&proxy.url("/")).await;
    client.send(Message::text(HB)).await.unwrap();
    client.send(Message::text("next")).await.unwrap();
    backend.expect_message(Message::text(HB)).await;
    backend.expect_message(Message::text("next")).await;

    // The default (true) drops it: the backend's first message is the next one.
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let mut client = connect(&proxy.url("/")).await;
    client.send(Message::text(HB)).await.unwrap();
    client.send(Message::text("next")).await.unwrap();
    backend.expect_message(Message::text("next")).await;
}

/// DESIGN §1.3: in idle mode only data messages to the client postpone the heartbeat;
/// the protocol PINGs wsbeat sends (and the client's PONGs) do not.
#[tokio::test]
async fn idle_mode_beats_through_flowing_pings_and_waits_out_data() {
    const INTERVAL: Duration = Duration::from_millis(400);
    const TICKS: usize = 10;
    // The backend sends a message every 100 ms for 1 s, then falls silent.
    let backend = Backend::start(BackendBehaviour {
        ticks: Some((Duration::from_millis(100), TICKS)),
        ..Default::default()
    })
    .await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.heartbeat.mode = HeartbeatMode::Idle;
        c.heartbeat.interval = ms(INTERVAL.as_millis() as u64);
        // PINGs four times as often as heartbeats; the client answers them.
        c.liveness.ping_interval = ms(100);
        c.liveness.timeout = ms(5_000);
    })
    .await;
    let mut client = connect(&proxy.url("/")).await;
    let mut ticks = 0;
    let mut last_tick = None;
    let mut beats: Vec<Instant> = Vec::new();
    // PINGs received since the previous heartbeat, at each heartbeat after the first.
    let mut pings_between = Vec::new();
    let mut pings = 0;
    // PINGs keep every single read short: the whole wait needs its own bound.
    let give_up = Instant::now() + PATIENCE;
    while beats.len() < 4 {
        let msg = tokio::time::timeout_at(give_up.into(), recv(&mut client))
            .await
            .unwrap_or_else(|_| panic!("{} heartbeats in {PATIENCE:?}", beats.len()));
        match msg {
            Message::Text(t) if t.as_str() == HB => {
                assert_eq!(ticks, TICKS, "a heartbeat while data flowed");
                if !beats.is_empty() {
                    pings_between.push(pings);
                }
                pings = 0;
                beats.push(Instant::now());
            }
            Message::Text(_) => {
                ticks += 1;
                last_tick = Some(Instant::now());
            }
            Message::Ping(_) => pings += 1,
            _ => {}
        }
    }
    // Data postponed the first heartbeat until a quiet interval after the last message.
    let quiet = beats[0] - last_tick.unwrap();
    assert!(
        quiet >= INTERVAL - Duration::from_millis(100),
        "first heartbeat {quiet:?} after the last message"
    );
    assert!(
        quiet <= INTERVAL + MARGIN,
        "first heartbeat {quiet:?} after the last message"
    );
    // Then a heartbeat every interval, PINGs between them notwithstanding.
    for pair in beats.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap <= INTERVAL + MARGIN, "a heartbeat gap of {gap:?}");
    }
    assert!(
        pings_between.iter().all(|&n| n >= 1),
        "PINGs did not flow between heartbeats: {pings_between:?}"
    );
}

/// The real binary with `shutdown.drain_timeout: 1s` and one WebSocket whose peers never
/// answer a close, just after SIGTERM.
struct StuckDrain {
    wsbeat: JsonWsbeat,
    signalled: Instant,
    /// Everything the client received, once its socket has ended.
    client_bytes: tokio::task::JoinHandle<Vec<u8>>,
    /// What the upstream received, once its socket has ended.
    upstream: mpsc::UnboundedReceiver<RawReceived>,
    _config: TempConfig,
}

const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

async fn sigterm_with_a_connection_that_will_not_close() -> StuckDrain {
    // Takes the handshake, then only reads: it never answers a close.
    let (upstream_addr, upstream) = raw_upstream(RawAnswer::Accept).await;
    let config = write_temp_config(&format!(
        "listen: 127.0.0.1:0\nadmin: {{ listen: null }}\n\
         upstream: {{ url: \"ws://{upstream_addr}\" }}\n\
         shutdown: {{ drain_timeout: {}ms }}\n",
        DRAIN_TIMEOUT.as_millis()
    ));
    let mut wsbeat = JsonWsbeat::spawn(&["--config", config.path()]);
    let public = wsbeat.addr("listening");
    // A raw client that reads what comes but never answers the close.
    let mut client = raw_websocket(public, "/").await;
    let client_bytes = tokio::spawn(async move {
        let mut bytes = Vec::new();
        let _ = client.read_to_end(&mut bytes).await;
        bytes
    });
    let signalled = Instant::now();
    wsbeat.signal("TERM");
    StuckDrain {
        wsbeat,
        signalled,
        client_bytes,
        upstream,
        _config: config,
    }
}

/// DESIGN §1.6: the drain ends at `shutdown.drain_timeout` even when a connection never
/// closes; wsbeat then exits 0 (lib.rs `serve` returns, main exits SUCCESS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_hits_drain_timeout_exits_0_in_time() {
    let StuckDrain {
        mut wsbeat,
        signalled,
        client_bytes,
        ..
    } = sigterm_with_a_connection_that_will_not_close().await;
    let draining = wsbeat.next("draining");
    assert_eq!(draining["connections"], 1, "{draining}");
    let gave_up = wsbeat.next("drain timeout reached: exiting anyway");
    assert_eq!(gave_up["remaining"], 1, "{gave_up}");
    let status = wsbeat.exit_status(PATIENCE).await;
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(took >= DRAIN_TIMEOUT, "exited after only {took:?}");
    assert!(
        took <= DRAIN_TIMEOUT + Duration::from_secs(5),
        "exited {took:?} after SIGTERM"
    );
    // The client was told: 1001 came before the socket ended.
    let bytes = tokio::time::timeout(PATIENCE, client_bytes)
        .await
        .expect("the client's socket ended with the process")
        .unwrap();
    assert_eq!(close_code_in(&bytes), Some(1001));
}

/// DESIGN §1.6: "every WebSocket gets close 1001 on both legs", the backend's included,
/// even when the drain is cut short by its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_cut_short_by_drain_timeout_still_sends_1001_to_the_backend() {
    let StuckDrain {
        wsbeat,
        mut upstream,
        ..
    } = sigterm_with_a_connection_that_will_not_close().await;
    let status = wsbeat.exit_status(PATIENCE).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
    let received = tokio::time::timeout(PATIENCE, upstream.recv())
        .await
        .expect("the upstream's socket ended with the process")
        .unwrap();
    assert_eq!(
        close_code_in(&received.after),
        Some(1001),
        "the backend got {} bytes and no 1001",
        received.after.len()
    );
}

/// DESIGN §2.2: `admin.listen` may be turned off (`--admin-listen off`); wsbeat then
/// serves WebSockets and listens on its public port only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listen_off_serves_websockets_without_an_admin_listener() {
    let backend = Backend::echo().await;
    let upstream = format!("ws://{}", backend.addr);
    let run = |admin: &str| {
        JsonWsbeat::spawn(&[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream,
            "--admin-listen",
            admin,
        ])
    };

    // On, for contrast: the admin listener is announced and is a second listening port.
    let mut on = run("127.0.0.1:0");
    let public = on.addr("listening");
    let admin = on.addr("admin listening");
    let mut want = vec![public.port(), admin.port()];
    want.sort_unstable();
    assert_eq!(listening_ports(on.child.id()), want);
    drop(on);

    let mut off = run("off");
    let public = off.addr("listening");
    // Both listeners are bound before "listening" is logged.
    assert_eq!(listening_ports(off.child.id()), vec![public.port()]);
    let mut client = connect(&format!("ws://{public}/")).await;
    echo_roundtrip(&mut client, Message::text("no admin, still proxied")).await;
    client.close(None).await.unwrap();
    while client.next().await.is_some() {}
    // Every line up to the closed WebSocket: none announces an admin listener.
    loop {
        let line = off
            .lines
            .recv_timeout(PATIENCE)
            .expect("a log line for the closed WebSocket");
        assert_ne!(line["message"], "admin listening", "{line}");
        if line["message"] == "websocket closed" {
            break;
        }
    }
}

/// DESIGN §1.1: the upstream is always the configured one; an absolute-form target or a
/// foreign Host changes nothing but what is forwarded as path and `X-Forwarded-Host`.
#[tokio::test]
async fn an_absolute_form_target_or_a_foreign_host_still_reaches_the_configured_upstream() {
    // Records the request line exactly as wsbeat sent it.
    let (upstream, mut heads) = upstream_answering_101_with("").await;
    let proxy = Proxy::start(upstream, |_| {}).await;

    let absolute = upgrade_request("ws://elsewhere.example:1/x?q=1")
        .replace("Host: test", "Host: elsewhere.example:1");
    let (_absolute, head) = raw_head(proxy.addr, &absolute).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let upstream_head = next_head(&mut heads).await;
    assert!(
        upstream_head.starts_with("GET /x?q=1 HTTP/1.1\r\n"),
        "{upstream_head}"
    );

    let foreign = upgrade_request("/y").replace("Host: test", "Host: elsewhere.example:1");
    let (_foreign, head) = raw_head(proxy.addr, &foreign).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let upstream_head = next_head(&mut heads).await;
    assert!(
        upstream_head.starts_with("GET /y HTTP/1.1\r\n"),
        "{upstream_head}"
    );
    assert_eq!(
        head_field(&upstream_head, "x-forwarded-host"),
        Some("elsewhere.example:1")
    );
}

/// DESIGN §2.2: a route may override any heartbeat or liveness key; here `heartbeat.mode`
/// and `liveness.upstream_ping_interval`, against a default route that keeps the top level.
#[tokio::test]
async fn a_route_overrides_heartbeat_mode_and_upstream_ping_interval() {
    const INTERVAL: Duration = Duration::from_millis(500);
    // Busy: a message every 100 ms for 3 s on every connection.
    let mut backend = Backend::start(BackendBehaviour {
        ticks: Some((Duration::from_millis(100), 30)),
        ..Default::default()
    })
    .await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.heartbeat.interval = ms(INTERVAL.as_millis() as u64);
        c.routes = vec![serde_saphyr::from_str(
            "{ path: /idle, heartbeat: { mode: idle }, \
               liveness: { upstream_ping_interval: 100ms } }",
        )
        .unwrap()];
    })
    .await;
    let mut default_route = connect(&proxy.url("/")).await;
    let mut idle_route = connect(&proxy.url("/idle/1")).await;
    let window = Duration::from_secs(2);
    let (interval, idle) = tokio::join!(
        watch(&mut default_route, window),
        watch(&mut idle_route, window)
    );
    let (interval_beats, interval_data) = (interval.beats, interval.data);
    let (idle_beats, idle_data) = (idle.beats, idle.data);
    assert!(
        interval_data >= 10 && idle_data >= 10,
        "the backend was not busy"
    );
    // 2 s at 500 ms: 4 heartbeats on the interval route (one may fall off an edge), none
    // on the idle route while data flows.
    assert!(
        interval_beats.len() >= 3,
        "the default route sent {} heartbeats",
        interval_beats.len()
    );
    assert!(
        idle_beats.is_empty(),
        "the idle route sent {} heartbeats while data flowed",
        idle_beats.len()
    );

    // What the backend saw, per connection: which path, how many PINGs.
    let mut paths = HashMap::new();
    let mut pings: HashMap<usize, usize> = HashMap::new();
    while let Ok(seen) = backend.seen.try_recv() {
        match seen {
            Seen::Handshake { conn, path, .. } => {
                paths.insert(path, conn);
            }
            Seen::Message {
                conn,
                msg: Message::Ping(_),
            } => *pings.entry(conn).or_default() += 1,
            _ => {}
        }
    }
    let pings_on = |path: &str| pings.get(&paths[path]).copied().unwrap_or(0);
    assert!(
        pings_on("/idle/1") >= 5,
        "the /idle route's backend got {} PINGs in 2 s at 100 ms",
        pings_on("/idle/1")
    );
    assert_eq!(pings_on("/"), 0, "the default route PINGed its backend");
}
