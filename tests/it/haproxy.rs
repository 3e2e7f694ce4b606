//! A real HAProxy (`mode http`, `option forwardfor`, `X-Forwarded-Proto: https`) in front
//! of wsbeat: what the backend sees, and who `/connections` says the client is, with
//! HAProxy's address trusted and not.

use wsbeat::config::{Cidr, Config};

use crate::common::*;

fn trusting(list: &'static [&'static str]) -> impl FnOnce(&mut Config) {
    move |c| c.trusted_proxies = list.iter().map(|s| s.parse::<Cidr>().unwrap()).collect()
}

const SPOOFED: &str = "X-Forwarded-For: 203.0.113.7\r\nX-Real-IP: 198.51.100.1\r\n\
                       Forwarded: for=198.51.100.1;proto=https\r\n";

#[tokio::test]
#[ignore = "needs HAProxy: apt-get install haproxy"]
async fn behind_a_trusted_haproxy_the_backend_sees_https_and_the_real_client() {
    let (upstream, mut received) = raw_upstream(RawAnswer::Accept).await;
    // Only HAProxy's own address (it connects from 127.0.0.1) is trusted; the client
    // connects from 127.0.0.2 and claims to be 203.0.113.7.
    let proxy = Proxy::start(upstream, trusting(&["127.0.0.1"])).await;
    let lb = Haproxy::start(
        proxy.addr,
        "http",
        "  option forwardfor\n  http-request set-header X-Forwarded-Proto https\n",
        "",
    );
    let upgrade = format!(
        "GET /ws HTTP/1.1\r\nHost: app.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{SPOOFED}\r\n"
    );
    let (socket, answer) = request_from("127.0.0.2", lb.addr, upgrade.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    assert_eq!(client_addrs(proxy.admin, 1).await, ["127.0.0.2"]);
    drop(socket);
    let head = String::from_utf8(next_received(&mut received).await.head).unwrap();
    assert_eq!(
        head_field(&head, "x-forwarded-proto"),
        Some("https"),
        "{head}"
    );
    assert_eq!(
        head_field(&head, "x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.2, 127.0.0.1"),
        "{head}"
    );
    // Trusted: what came through HAProxy is passed on (HAProxy does not clean these).
    assert_eq!(
        head_field(&head, "x-real-ip"),
        Some("198.51.100.1"),
        "{head}"
    );
    drop(lb);
    proxy.stop().await;
}

#[tokio::test]
#[ignore = "needs HAProxy: apt-get install haproxy"]
async fn behind_an_untrusted_haproxy_the_backend_sees_only_what_wsbeat_saw() {
    let (upstream, mut received) = raw_upstream(RawAnswer::Refuse).await;
    let proxy = Proxy::start(upstream, trusting(&["10.0.0.0/8"])).await;
    let lb = Haproxy::start(
        proxy.addr,
        "http",
        "  option forwardfor\n  http-request set-header X-Forwarded-Proto https\n",
        "",
    );
    let request =
        format!("GET /api HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n{SPOOFED}\r\n");
    let (_socket, answer) = request_from("127.0.0.2", lb.addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    let head = String::from_utf8(next_received(&mut received).await.head).unwrap();
    for (name, value) in [
        ("x-forwarded-proto", "http"),
        ("x-forwarded-for", "203.0.113.7, 127.0.0.2, 127.0.0.1"),
        ("x-real-ip", "127.0.0.1"),
        ("forwarded", "for=127.0.0.1;proto=http;host=app.example"),
    ] {
        assert_eq!(head_field(&head, name), Some(value), "{head}");
    }
    drop(lb);
    proxy.stop().await;
}
