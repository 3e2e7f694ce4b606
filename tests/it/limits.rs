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
