//! `limits.max_tcp_connections` (issue 16): at the cap wsbeat stops accepting; the
//! connections past it wait in the kernel's backlog and are served, never reset, as
//! earlier ones close.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

const CAP: usize = 3;

/// Sends an upgrade and waits for the response head at most `wait`.
async fn answered_within(s: &mut TcpStream, wait: Duration) -> Option<String> {
    tokio::time::timeout(wait, read_head(s))
        .await
        .ok()
        .map(|head| String::from_utf8(head.expect("an answer, not a reset")).unwrap())
}

#[tokio::test]
async fn at_max_tcp_connections_new_ones_wait_and_are_served_as_others_close() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| c.limits.max_tcp_connections = Some(CAP)).await;
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(connect(&proxy.url("/")).await);
    }
    metric_at_least(
        proxy.admin,
        "wsbeat_tcp_connections_active",
        &[],
        CAP as f64,
        PATIENCE,
    )
    .await;
    // Twice the cap again: the kernel completes their TCP handshakes (backlog), but
    // wsbeat does not accept them, so no upgrade is answered.
    let mut waiting = Vec::new();
    for _ in 0..2 * CAP {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(upgrade_request("/").as_bytes()).await.unwrap();
        waiting.push(s);
    }
    assert!(
        answered_within(&mut waiting[0], Duration::from_millis(300))
            .await
            .is_none(),
        "a connection past the cap was served"
    );
    assert_eq!(
        metric(proxy.admin, "wsbeat_tcp_connections_active", &[]).await,
        CAP as f64
    );
    // Each WebSocket that closes lets one waiting connection in; every one of them is
    // served in turn, none is reset.
    for (i, mut ws) in held.into_iter().enumerate() {
        ws.close(None).await.unwrap();
        drop(ws);
        let head = answered_within(&mut waiting[i], PATIENCE)
            .await
            .expect("served once a slot freed");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    }
    // The first CAP waiting ones (now WebSockets) close: the rest are let in.
    drop(waiting.drain(..CAP));
    for s in waiting.iter_mut() {
        let head = answered_within(s, PATIENCE).await.expect("served in turn");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    }
    // And the proxy still relays.
    drop(waiting);
    let mut ws = connect(&proxy.url("/")).await;
    echo_roundtrip(&mut ws, Message::text("still relaying")).await;
}

/// An upgrade from `local` (an address of the loopback range), after `prefix` (a PROXY
/// header, or nothing).
async fn upgrade_from(
    local: &str,
    proxy: std::net::SocketAddr,
    prefix: &[u8],
) -> (TcpStream, String) {
    request_from(
        local,
        proxy,
        &[prefix, upgrade_request("/").as_bytes()].concat(),
    )
    .await
}

/// How many handshakes the backend has seen so far.
fn handshakes(backend: &mut Backend) -> usize {
    let mut n = 0;
    while let Ok(seen) = backend.seen.try_recv() {
        if matches!(seen, Seen::Handshake { .. }) {
            n += 1;
        }
    }
    n
}

#[tokio::test]
async fn max_connections_per_ip_refuses_with_429_per_address_without_dialling() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| c.limits.max_connections_per_ip = Some(2)).await;
    let mut held = Vec::new();
    for local in ["127.0.0.2", "127.0.0.3"] {
        for _ in 0..2 {
            let (s, head) = upgrade_from(local, proxy.addr, b"").await;
            assert!(head.starts_with("HTTP/1.1 101"), "{local}: {head}");
            held.push(s);
        }
        let (_, head) = upgrade_from(local, proxy.addr, b"").await;
        assert!(head.starts_with("HTTP/1.1 429"), "{local}: {head}");
        assert_eq!(head_field(&head, "retry-after"), Some("5"), "{head}");
    }
    let rejected = [("route", "default"), ("reason", "per_ip")];
    assert_eq!(
        metric(proxy.admin, "wsbeat_handshakes_rejected_total", &rejected).await,
        2.0
    );
    // The refused upgrades never reached the backend: 4 handshakes, not 6.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut seen = 0;
    while seen < 4 {
        assert!(tokio::time::Instant::now() < deadline, "{seen} handshakes");
        if let Seen::Handshake { .. } = backend.next().await {
            seen += 1;
        }
    }
    assert_eq!(handshakes(&mut backend), 0, "a refused upgrade was dialled");
    // A closed WebSocket gives its address's place back.
    drop(held.remove(0));
    let mut again = None;
    for _ in 0..100 {
        let (s, head) = upgrade_from("127.0.0.2", proxy.addr, b"").await;
        if head.starts_with("HTTP/1.1 101") {
            again = Some(s);
            break;
        }
        // The relay ends a moment after the client's TCP does: ask again (bounded).
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "the place was never given back");
}

#[tokio::test]
async fn behind_proxy_protocol_the_per_ip_limit_counts_the_header_address() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.proxy_protocol = true;
        c.limits.max_connections_per_ip = Some(1);
    })
    .await;
    let header = |ip: &str| format!("PROXY TCP4 {ip} 127.0.0.1 1000 2000\r\n");
    // Every connection comes from the load balancer's 127.0.0.1; the header names the
    // client.
    let (a, first) = upgrade_from("127.0.0.1", proxy.addr, header("203.0.113.7").as_bytes()).await;
    assert!(first.starts_with("HTTP/1.1 101"), "{first}");
    let (_, second) = upgrade_from("127.0.0.1", proxy.addr, header("203.0.113.7").as_bytes()).await;
    assert!(second.starts_with("HTTP/1.1 429"), "{second}");
    let (b, other) = upgrade_from("127.0.0.1", proxy.addr, header("203.0.113.8").as_bytes()).await;
    assert!(other.starts_with("HTTP/1.1 101"), "{other}");
    drop((a, b));
}

/// The open-file limit the binary below runs with: its default `max_tcp_connections` is
/// then (128 - 64) / 2 = 32.
const NOFILE: usize = 128;
const DERIVED_CAP: usize = (NOFILE - 64) / 2;

/// The real binary under `ulimit -n NOFILE` (soft and hard: wsbeat cannot raise it), its
/// log lines collected.
struct LimitedWsbeat {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _config: TempConfig,
}

impl Drop for LimitedWsbeat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LimitedWsbeat {
    fn start(upstream: std::net::SocketAddr) -> LimitedWsbeat {
        use std::io::BufRead;
        let config = write_temp_config(&format!(
            "listen: 127.0.0.1:0\nupstream: {{ url: \"ws://{upstream}\" }}\n"
        ));
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", &format!("ulimit -n {NOFILE} && exec \"$0\" \"$@\"")])
            .args([WSBEAT_BIN, "--config", config.path()])
            .env("RUST_LOG", "debug")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("/bin/sh runs wsbeat");
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("wsbeat exited before listening")
                .unwrap();
            if let Some(addr) = line
                .contains("listening")
                .then(|| line.split("addr=").nth(1))
                .flatten()
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.parse().ok())
            {
                break addr;
            }
        };
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        LimitedWsbeat {
            child,
            addr,
            log,
            _config: config,
        }
    }
}

/// One keep-alive `GET /hello`; the connection stays open and idle after it.
async fn keep_alive_get(s: &mut TcpStream, wait: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    s.write_all(b"GET /hello HTTP/1.1\r\nHost: app.example\r\n\r\n")
        .await
        .unwrap();
    let head = answered_within(s, wait).await?;
    let length: usize = head_field(&head, "content-length")
        .expect("a Content-Length")
        .parse()
        .unwrap();
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).await.unwrap();
    Some(head)
}

#[tokio::test]
async fn with_the_derived_cap_three_times_its_idle_keep_alive_connections_never_exhaust_files() {
    let backend = super::http::HttpBackend::start("a").await;
    let wsbeat = LimitedWsbeat::start(backend.addr);
    // Three times the derived cap of idle keep-alive connections, each with a request.
    // The first DERIVED_CAP are served and stay open; the others wait in the backlog.
    let mut served = Vec::new();
    for _ in 0..DERIVED_CAP {
        let mut s = TcpStream::connect(wsbeat.addr).await.unwrap();
        let head = keep_alive_get(&mut s, PATIENCE).await.expect("served");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        served.push(s);
    }
    let mut waiting = Vec::new();
    for _ in 0..2 * DERIVED_CAP {
        let mut s = TcpStream::connect(wsbeat.addr).await.unwrap();
        s.write_all(b"GET /hello HTTP/1.1\r\nHost: app.example\r\n\r\n")
            .await
            .unwrap();
        waiting.push(s);
    }
    assert!(
        answered_within(&mut waiting[0], Duration::from_millis(300))
            .await
            .is_none(),
        "a connection past the derived cap was served"
    );
    // As the idle ones close, every waiting one is served in turn (and closes, letting
    // the next one in); none is reset.
    drop(served);
    for (i, mut s) in waiting.into_iter().enumerate() {
        let head = answered_within(&mut s, PATIENCE).await.unwrap_or_else(|| {
            let log = wsbeat.log.lock().unwrap();
            panic!(
                "waiting connection {i} not served; wsbeat's log ends: {:#?}",
                &log[log.len().saturating_sub(30)..]
            )
        });
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    // WebSockets still work, and wsbeat never ran out of descriptors.
    let mut ws = connect(&format!("ws://{}/ws", wsbeat.addr)).await;
    echo_roundtrip(&mut ws, Message::text("still relaying")).await;
    let log = wsbeat.log.lock().unwrap().clone();
    let emfile: Vec<_> = log
        .iter()
        .filter(|l| l.contains("Too many open files") || l.contains("os error 24"))
        .collect();
    assert!(
        emfile.is_empty(),
        "wsbeat ran out of descriptors: {emfile:?}"
    );
}
