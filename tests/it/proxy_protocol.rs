//! `proxy_protocol: true` (issue 16): an L4 load balancer's PROXY header, v1 or v2, names
//! the client; a connection without a valid one is closed and counted, never proxied.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::common::*;

/// A v2 PROXY header for TCP over IPv4 (`command` 1: PROXY, 0: LOCAL).
fn v2_header(command: u8, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (source, destination) else {
        panic!("IPv4 addresses only");
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x20 | command, 0x11, 0, 12]);
    h.extend_from_slice(&s.ip().octets());
    h.extend_from_slice(&d.ip().octets());
    h.extend_from_slice(&s.port().to_be_bytes());
    h.extend_from_slice(&d.port().to_be_bytes());
    h
}

/// Opens a connection, sends `header` then a WebSocket upgrade, and returns the socket
/// after the 101.
async fn upgrade_behind(addr: SocketAddr, header: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[header, upgrade_request("/").as_bytes()].concat())
        .await
        .unwrap();
    let head = String::from_utf8(read_head(&mut s).await.expect("a response head")).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// The `X-Forwarded-For` the backend saw on its next handshake.
async fn forwarded_for(backend: &mut Backend) -> String {
    match backend.next().await {
        Seen::Handshake { headers, .. } => headers["x-forwarded-for"].to_str().unwrap().to_owned(),
        other => panic!("expected a handshake, the backend saw {other:?}"),
    }
}

#[tokio::test]
async fn v1_and_v2_headers_name_the_client() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| c.proxy_protocol = true).await;
    let v1 = upgrade_behind(
        proxy.addr,
        format!("PROXY TCP4 203.0.113.7 {} 51234 8080\r\n", proxy.addr.ip()).as_bytes(),
    )
    .await;
    assert_eq!(forwarded_for(&mut backend).await, "203.0.113.7");
    let v2 = upgrade_behind(
        proxy.addr,
        &v2_header(1, "198.51.100.9:40000".parse().unwrap(), proxy.addr),
    )
    .await;
    assert_eq!(forwarded_for(&mut backend).await, "198.51.100.9");
    let seen = client_addrs(proxy.admin, 2).await;
    assert_eq!(seen, ["198.51.100.9:40000", "203.0.113.7:51234"]);
    assert_eq!(
        metric(proxy.admin, "wsbeat_proxy_protocol_errors_total", &[]).await,
        0.0
    );
    drop((v1, v2));
}

#[tokio::test]
async fn a_v2_local_header_keeps_the_peer_address() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| c.proxy_protocol = true).await;
    let s = upgrade_behind(
        proxy.addr,
        &v2_header(0, "192.0.2.1:1".parse().unwrap(), proxy.addr),
    )
    .await;
    assert_eq!(forwarded_for(&mut backend).await, "127.0.0.1");
    drop(s);
}

#[tokio::test]
async fn a_connection_without_a_valid_header_is_closed_and_counted() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.proxy_protocol = true;
        c.limits.handshake_timeout = ms(300);
    })
    .await;
    // A plain request, a broken header, and a header that never completes.
    for (sent, what) in [
        (upgrade_request("/"), "no header"),
        (
            "PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n".to_owned(),
            "a bad port",
        ),
        ("PROXY TCP4 1.2".to_owned(), "a header cut short"),
    ] {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(sent.as_bytes()).await.unwrap();
        let answer = read_until_closed(&mut s).await;
        assert!(answer.is_empty(), "{what}: wsbeat answered {answer:?}");
    }
    metric_at_least(
        proxy.admin,
        "wsbeat_proxy_protocol_errors_total",
        &[],
        3.0,
        Duration::from_secs(5),
    )
    .await;
    // Nothing reached the backend, and wsbeat still serves.
    let s = upgrade_behind(proxy.addr, b"PROXY TCP4 203.0.113.7 127.0.0.1 1 2\r\n").await;
    assert_eq!(forwarded_for(&mut backend).await, "203.0.113.7");
    drop(s);
}

#[ignore = "needs HAProxy: apt-get install haproxy"]
#[tokio::test]
async fn behind_a_real_haproxy_in_tcp_mode_the_client_address_comes_through() {
    for send_proxy in ["send-proxy-v2", "send-proxy"] {
        let mut backend = Backend::echo().await;
        let proxy = Proxy::start(backend.addr, |c| c.proxy_protocol = true).await;
        let haproxy = Haproxy::start(proxy.addr, "tcp", "", send_proxy);
        // The client speaks from 127.0.0.2, HAProxy from 127.0.0.1: only the PROXY
        // header can tell wsbeat the client's address.
        let (stream, head) =
            request_from("127.0.0.2", haproxy.addr, upgrade_request("/").as_bytes()).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{send_proxy}: {head}");
        let client_port = stream.local_addr().unwrap().port();
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            stream,
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await;
        assert_eq!(
            forwarded_for(&mut backend).await,
            "127.0.0.2",
            "{send_proxy}"
        );
        assert_eq!(
            client_addrs(proxy.admin, 1).await,
            [format!("127.0.0.2:{client_port}")],
            "{send_proxy}"
        );
        use futures_util::{SinkExt, StreamExt};
        ws.send(tokio_tungstenite::tungstenite::Message::text("through"))
            .await
            .unwrap();
        loop {
            match ws.next().await.unwrap().unwrap() {
                tokio_tungstenite::tungstenite::Message::Text(t) if t.as_str() == HB => continue,
                m => {
                    assert_eq!(m, tokio_tungstenite::tungstenite::Message::text("through"));
                    break;
                }
            }
        }
        drop(haproxy);
    }
}
