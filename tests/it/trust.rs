//! `trusted_proxies`: which forwarding headers are believed from whom, and who the client
//! is behind a load balancer (real sockets; the test client's address, 127.0.0.1, is the
//! peer).

use wsbeat::config::Cidr;

use crate::common::*;

/// An upgrade request for `/ws` with extra header lines (each ending in CRLF).
fn upgrade_with(extra: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: app.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// A plain GET with extra header lines.
fn get_with(extra: &str) -> String {
    format!("GET /api HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n{extra}\r\n")
}

fn trusting<'a>(list: &'a [&'a str]) -> impl FnOnce(&mut wsbeat::config::Config) + 'a {
    move |c| c.trusted_proxies = list.iter().map(|s| s.parse::<Cidr>().unwrap()).collect()
}

/// How many times header `name` appears in a raw head.
fn count(head: &str, name: &str) -> usize {
    head.lines()
        .skip(1)
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(f, _)| f.trim().eq_ignore_ascii_case(name))
        })
        .count()
}

const SPOOFED: &str = "X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n\
                       X-Forwarded-Host: evil.example\r\nX-Real-IP: 198.51.100.1\r\n\
                       Forwarded: for=198.51.100.1;proto=https\r\n";

#[tokio::test]
async fn an_untrusted_peer_cannot_claim_an_address_or_https() {
    let (upstream, mut received) = raw_upstream(RawAnswer::Refuse).await;
    // Trusting someone else changes nothing for this peer.
    let proxy = Proxy::start(upstream, trusting(&["10.0.0.0/8"])).await;
    for request in [upgrade_with(SPOOFED), get_with(SPOOFED)] {
        let r = raw_request(proxy.addr, &request).await;
        assert_eq!(r.status, 403, "{}", r.text());
        let head = String::from_utf8(next_received(&mut received).await.head).unwrap();
        let field = |name| head_field(&head, name);
        assert_eq!(
            field("x-forwarded-for"),
            Some("203.0.113.7, 127.0.0.1"),
            "{head}"
        );
        assert_eq!(field("x-forwarded-proto"), Some("http"), "{head}");
        assert_eq!(field("x-forwarded-host"), Some("app.example"), "{head}");
        assert_eq!(field("x-real-ip"), Some("127.0.0.1"), "{head}");
        assert_eq!(
            field("forwarded"),
            Some("for=127.0.0.1;proto=http;host=app.example"),
            "{head}"
        );
        for name in [
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-real-ip",
            "forwarded",
        ] {
            assert_eq!(count(&head, name), 1, "{name} in {head}");
        }
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_trusted_peer_is_believed_and_names_the_client() {
    let (upstream, mut received) = raw_upstream(RawAnswer::Accept).await;
    let proxy = Proxy::start(upstream, trusting(&["127.0.0.0/8"])).await;
    let (socket, answer) = raw_head(
        proxy.addr,
        &upgrade_with("X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    assert_eq!(client_addrs(proxy.admin, 1).await, ["203.0.113.7"]);
    drop(socket);
    let head = String::from_utf8(next_received(&mut received).await.head).unwrap();
    assert_eq!(
        head_field(&head, "x-forwarded-proto"),
        Some("https"),
        "{head}"
    );
    assert_eq!(
        head_field(&head, "x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.1"),
        "{head}"
    );
    assert_eq!(
        head_field(&head, "x-real-ip"),
        Some("203.0.113.7"),
        "{head}"
    );
    proxy.stop().await;

    // Plain HTTP gets the same policy.
    let (upstream, mut received) = raw_upstream(RawAnswer::Refuse).await;
    let proxy = Proxy::start(upstream, trusting(&["127.0.0.0/8"])).await;
    raw_request(proxy.addr, &get_with(SPOOFED)).await;
    let head = String::from_utf8(next_received(&mut received).await.head).unwrap();
    for (name, value) in [
        ("x-forwarded-for", "203.0.113.7, 127.0.0.1"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "evil.example"),
        ("x-real-ip", "198.51.100.1"),
        ("forwarded", "for=198.51.100.1;proto=https"),
    ] {
        assert_eq!(head_field(&head, name), Some(value), "{head}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn the_client_is_the_rightmost_untrusted_address_in_the_chain() {
    let (upstream, _received) = raw_upstream(RawAnswer::Accept).await;
    let proxy = Proxy::start(upstream, trusting(&["127.0.0.0/8", "10.0.0.0/8"])).await;
    // (X-Forwarded-For, the client): a client's own claim left of the real address is
    // not believed; when every hop is trusted, the leftmost is the client.
    let cases = [
        ("203.0.113.7, 10.0.0.5", "203.0.113.7"),
        ("192.0.2.66, 203.0.113.8, 10.0.0.5", "203.0.113.8"),
        ("10.0.0.9, 10.0.0.5", "10.0.0.9"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
    ];
    let mut open = Vec::new();
    for (xff, _) in cases {
        let (socket, answer) = raw_head(
            proxy.addr,
            &upgrade_with(&format!("X-Forwarded-For: {xff}\r\n")),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
        open.push(socket);
    }
    let seen = client_addrs(proxy.admin, cases.len()).await;
    let mut expected: Vec<&str> = cases.iter().map(|(_, client)| *client).collect();
    expected.sort();
    assert_eq!(seen, expected);
    drop(open);
    proxy.stop().await;
}

#[tokio::test]
async fn the_close_log_line_names_the_client_behind_a_trusted_peer() {
    let backend = Backend::echo().await;
    let config = write_temp_config(&format!(
        "listen: 127.0.0.1:0\nadmin: {{ listen: null }}\ntrusted_proxies: [127.0.0.0/8]\n\
         upstream: {{ url: \"ws://{}\" }}\n",
        backend.addr
    ));
    let mut wsbeat = JsonWsbeat::spawn(&["--config", config.path()]);
    let public = wsbeat.addr("listening");
    let (socket, answer) = raw_head(
        public,
        &upgrade_with("X-Forwarded-For: 203.0.113.7, 127.0.0.9\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    drop(socket);
    // The backend runs on this test's runtime: wait for the log line off it.
    let closed = tokio::task::spawn_blocking(move || wsbeat.next("websocket closed"))
        .await
        .unwrap();
    assert_eq!(closed["client"], "203.0.113.7", "{closed}");
}
