//! Upstream faults: a backend killed mid-stream and restarted, a backend that never
//! answers the handshake, and a backend that stops reading.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// tests/python/echo_backend.py in a process of its own, so that it can be killed.
struct KillableBackend {
    child: Child,
    addr: SocketAddr,
}

impl KillableBackend {
    /// Starts it on `port` (0: any) and waits until it listens.
    fn start(port: u16) -> KillableBackend {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/echo_backend.py");
        let mut child = Command::new("python3")
            .args([script, &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs (CI installs `websockets`)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .strip_prefix("listening ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("echo_backend.py did not start: {line:?}"));
        KillableBackend {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// SIGKILL: the kernel closes its sockets, no close frame is ever sent.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for KillableBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads until a `tick` arrives: the backend is streaming to this client.
async fn until_tick(client: &mut Client) {
    loop {
        if let Message::Text(t) = recv_data(client, "--heartbeat--").await {
            if t.starts_with("tick ") {
                return;
            }
        }
    }
}

#[ignore = "needs Python websockets: python3 -m pip install 'websockets>=12'"]
#[tokio::test]
async fn a_backend_killed_mid_stream_closes_its_clients_with_1011_and_a_restart_serves_again() {
    const CLIENTS: usize = 10;
    let mut backend = KillableBackend::start(0);
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut client = connect(&proxy.url("/")).await;
        until_tick(&mut client).await;
        clients.push(client);
    }
    backend.kill();
    let killed = Instant::now();
    for client in &mut clients {
        // Ticks still in flight may come first; then the close.
        let frame = recv_close(client).await.expect("a close frame");
        assert_eq!(frame.code, CloseCode::Error);
    }
    let took = killed.elapsed();
    // wsbeat learns of the death from the kernel at once (EOF or reset): the clients'
    // closes need no timer.
    assert!(took < Duration::from_secs(1), "the closes took {took:?}");
    for client in &mut clients {
        while client.next().await.is_some() {}
    }
    let d = ("route", "default");
    metric_at_least(
        proxy.admin,
        "wsbeat_close_codes_total",
        &[("leg", "client"), ("code", "1011")],
        CLIENTS as f64,
        PATIENCE,
    )
    .await;
    assert_eq!(
        metric(
            proxy.admin,
            "wsbeat_connections_total",
            &[d, ("outcome", "upstream_close")]
        )
        .await,
        CLIENTS as f64
    );
    // The upstream leg ended without a close frame: counted as 1006.
    assert_eq!(
        metric(
            proxy.admin,
            "wsbeat_close_codes_total",
            &[("leg", "upstream"), ("code", "1006")]
        )
        .await,
        CLIENTS as f64
    );

    // ... and counted as an upstream failure, which a clean close from the backend is not
    // (tests/metrics.rs).
    assert_eq!(
        metric(
            proxy.admin,
            "wsbeat_upstream_errors_total",
            &[d, ("reason", "lost")]
        )
        .await,
        CLIENTS as f64
    );

    // While it is down, a new WebSocket gets 502 and the failed connect is counted.
    let response = raw_http(proxy.addr, &upgrade_request("/")).await;
    assert!(response.starts_with("HTTP/1.1 502"), "{response}");
    assert_eq!(
        metric(
            proxy.admin,
            "wsbeat_upstream_errors_total",
            &[d, ("reason", "connect")]
        )
        .await,
        1.0
    );

    // Restarted on the same port: new WebSockets work, with no restart of wsbeat.
    let _restarted = KillableBackend::start(backend.addr.port());
    let mut client = connect(&proxy.url("/")).await;
    until_tick(&mut client).await;
    client.send(Message::text("back again")).await.unwrap();
    loop {
        match recv_data(&mut client, "--heartbeat--").await {
            Message::Text(t) if t.starts_with("tick ") => continue,
            other => {
                assert_eq!(other, Message::text("back again"));
                break;
            }
        }
    }
}

/// A backend that completes the handshake and never reads again.
async fn backend_that_never_reads() -> SocketAddr {
    scripted_backend(|ws| async move {
        std::future::pending::<()>().await;
        drop(ws);
    })
    .await
}

#[tokio::test]
async fn a_backend_that_stops_reading_stops_wsbeat_reading_the_client() {
    let addr = backend_that_never_reads().await;
    let wsbeat = WsbeatProcess::start(addr, "heartbeat: { message: null }");
    let mut raw = raw_websocket(wsbeat.addr, "/").await;
    let before = wsbeat.rss_kib();
    // Flood 64 KiB messages, up to 200 MiB, until a write makes no progress for a
    // second: the client is then held back by TCP, not buffered by wsbeat.
    let frame = client_frame(0x2, &[0xA5; 64 * 1024]);
    let mut pushed = 0usize;
    let mut peak = before;
    let stalled = loop {
        if pushed >= 200 << 20 {
            break false;
        }
        match tokio::time::timeout(Duration::from_secs(1), raw.write_all(&frame)).await {
            Ok(result) => result.expect("wsbeat keeps the connection open"),
            Err(_) => break true,
        }
        pushed += frame.len();
        if pushed % (4 << 20) < frame.len() {
            peak = peak.max(wsbeat.rss_kib());
        }
    };
    let after = wsbeat.rss_kib();
    eprintln!(
        "FIGURES backpressure: pushed {pushed} B before stalling; RSS {before} KiB -> peak {} KiB, {after} KiB after",
        peak.max(after)
    );
    assert!(stalled, "wsbeat took all 200 MiB from the client");
    assert!(pushed < 64 << 20, "the client pushed {pushed} bytes");
    assert!(
        peak.max(after) < before + 32 * 1024,
        "RSS {before} KiB before, peak {peak} KiB, {after} KiB after"
    );
}

#[tokio::test]
async fn a_backend_that_takes_no_bytes_for_write_timeout_closes_the_client_with_1011() {
    let addr = backend_that_never_reads().await;
    // The liveness timeout is far shorter than write_timeout: while wsbeat holds the
    // client back (not reading it, the backend having taken nothing), the client's
    // PONGs go unread, and that silence must not be blamed on the client.
    let proxy = Proxy::start(addr, |c| {
        c.heartbeat.message = None;
        c.limits.write_timeout = ms(1500);
        c.liveness.ping_interval = ms(100);
        c.liveness.timeout = ms(300);
    })
    .await;
    let (mut tx, mut rx) = connect(&proxy.url("/")).await.split();
    // Send far more than the socket buffers between here and the backend hold, so
    // wsbeat is soon blocked writing to the backend; the sender stops when its writes
    // block for good or fail.
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        let message = Message::binary(vec![1u8; 64 * 1024]);
        for _ in 0..1024 {
            if tx.send(message.clone()).await.is_err() {
                break;
            }
        }
    });
    let frame = loop {
        match tokio::time::timeout(PATIENCE, rx.next())
            .await
            .expect("a close frame in time")
        {
            Some(Ok(Message::Close(frame))) => break frame.expect("a close code"),
            Some(Ok(_)) => continue,
            other => panic!("the connection ended without a close frame: {other:?}"),
        }
    };
    sender.abort();
    assert_eq!(frame.code, CloseCode::Error, "{frame:?}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1500), "closed after {took:?}");
    metric_at_least(
        proxy.admin,
        "wsbeat_connections_total",
        &[("route", "default"), ("outcome", "error")],
        1.0,
        PATIENCE,
    )
    .await;
    let client = [("route", "default"), ("leg", "client")];
    assert_eq!(
        metric(proxy.admin, "wsbeat_liveness_timeouts_total", &client).await,
        0.0
    );
}
