//! The relay and the two handshakes, end to end over real sockets.

use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

#[tokio::test]
async fn echoes_text_binary_empty_and_large_messages() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let mut client = connect(&proxy.url("/echo")).await;
    echo_roundtrip(&mut client, Message::text("hello")).await;
    echo_roundtrip(&mut client, Message::binary(vec![0u8, 1, 2, 255])).await;
    echo_roundtrip(&mut client, Message::text("")).await;
    echo_roundtrip(&mut client, Message::binary(Vec::<u8>::new())).await;
    let big: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
    echo_roundtrip(&mut client, Message::binary(big)).await;
    let big_text = "é".repeat(1 << 19);
    echo_roundtrip(&mut client, Message::text(big_text)).await;
}

#[tokio::test]
async fn ten_thousand_messages_arrive_once_and_in_order() {
    let mut backend = Backend::start(BackendBehaviour {
        no_echo: true,
        ..Default::default()
    })
    .await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let client = connect(&proxy.url("/")).await;
    let (mut tx, _rx) = client.split();
    let sender = tokio::spawn(async move {
        for i in 0..10_000u32 {
            tx.feed(Message::text(i.to_string())).await.unwrap();
        }
        tx.flush().await.unwrap();
        tx
    });
    for i in 0..10_000u32 {
        match backend.next_after_handshake().await {
            Seen::Message { msg, .. } => assert_eq!(msg, Message::text(i.to_string())),
            other => panic!("expected message {i}, got {other:?}"),
        }
    }
    let _tx = sender.await.unwrap();
}

#[tokio::test]
async fn ten_thousand_messages_from_upstream_arrive_in_order() {
    let backend = Backend::start(BackendBehaviour {
        burst: 10_000,
        ..Default::default()
    })
    .await;
    let proxy = Proxy::start(backend.addr, |c| c.heartbeat.message = None).await;
    let mut client = connect(&proxy.url("/")).await;
    for i in 1..=10_000u32 {
        assert_eq!(
            recv_data(&mut client, "--heartbeat--").await,
            Message::text(format!("burst {i}"))
        );
    }
}

#[tokio::test]
async fn client_close_code_and_reason_reach_the_backend() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let mut client = connect(&proxy.url("/")).await;
    client
        .close(Some(CloseFrame {
            code: CloseCode::Library(4000),
            reason: "bye now".into(),
        }))
        .await
        .unwrap();
    match backend.next_after_handshake().await {
        Seen::Closed { frame: Some(f), .. } => {
            assert_eq!(f.code, CloseCode::Library(4000));
            assert_eq!(f.reason.as_str(), "bye now");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    // The client's close handshake completes (wsbeat echoes the close).
    let echoed = recv_close(&mut client).await.expect("close frame");
    assert_eq!(echoed.code, CloseCode::Library(4000));
}

#[tokio::test]
async fn backend_close_code_and_reason_reach_the_client() {
    // The backend closes with its own code after receiving "close please".
    let addr = closing_backend(CloseCode::Library(4001), "done here").await;
    let proxy = Proxy::start(addr, |_| {}).await;
    let mut client = connect(&proxy.url("/")).await;
    client.send(Message::text("close please")).await.unwrap();
    let frame = recv_close(&mut client).await.expect("close frame");
    assert_eq!(frame.code, CloseCode::Library(4001));
    assert_eq!(frame.reason.as_str(), "done here");
}

#[tokio::test]
async fn backend_vanishing_closes_the_client_with_1011() {
    let addr = scripted_backend(|mut ws| async move {
        // Drop the TCP connection without a close frame on the first message.
        let _ = ws.next().await;
        drop(ws);
    })
    .await;
    let proxy = Proxy::start(addr, |_| {}).await;
    let mut client = connect(&proxy.url("/")).await;
    client.send(Message::text("go away")).await.unwrap();
    let frame = recv_close(&mut client).await.expect("close frame");
    assert_eq!(frame.code, CloseCode::Error);
}

#[tokio::test]
async fn client_vanishing_closes_the_backend_with_1001() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let mut raw = raw_websocket(proxy.addr, "/").await;
    raw.write_all(&client_frame(0x1, b"hi")).await.unwrap();
    backend.expect_message(Message::text("hi")).await;
    drop(raw); // FIN without a close frame
    backend.expect_close(CloseCode::Away).await;
}

#[tokio::test]
async fn pings_are_answered_per_leg_and_never_forwarded() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let mut client = connect(&proxy.url("/")).await;
    client
        .send(Message::Ping("are you there".into()))
        .await
        .unwrap();
    loop {
        match recv(&mut client).await {
            Message::Pong(p) => {
                assert_eq!(&p[..], b"are you there");
                break;
            }
            Message::Text(t) if t.as_str() == "--heartbeat--" => continue,
            other => panic!("expected a pong, got {other:?}"),
        }
    }
    client.send(Message::text("after ping")).await.unwrap();
    backend.expect_message(Message::text("after ping")).await;
}

#[tokio::test]
async fn subprotocol_is_the_one_the_backend_chose() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let mut req = proxy.url("/").into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "chat, superchat".parse().unwrap());
    let (_ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "superchat");
}

#[tokio::test]
async fn path_query_and_end_to_end_headers_are_forwarded() {
    let mut backend = Backend::echo().await;
    // Extensions are offered upstream only with `compression: passthrough`
    // (tests/it/compression.rs).
    let proxy = Proxy::start(backend.addr, |c| {
        c.compression = wsbeat::config::Compression::Off
    })
    .await;
    let mut req = proxy
        .url("/ws/room/7?token=abc&x=1")
        .into_client_request()
        .unwrap();
    let h = req.headers_mut();
    h.insert("cookie", "session=s3cr3t".parse().unwrap());
    h.insert("authorization", "Bearer xyz".parse().unwrap());
    h.insert("origin", "https://app.example".parse().unwrap());
    h.insert("user-agent", "wsbeat-test/1".parse().unwrap());
    h.insert("x-forwarded-for", "198.51.100.1".parse().unwrap());
    h.insert("x-custom", "kept".parse().unwrap());
    h.insert(
        "sec-websocket-extensions",
        "permessage-deflate".parse().unwrap(),
    );
    let (_ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let Seen::Handshake { path, headers, .. } = backend.next().await else {
        panic!("expected the handshake first");
    };
    assert_eq!(path, "/ws/room/7?token=abc&x=1");
    assert_eq!(headers["cookie"], "session=s3cr3t");
    assert_eq!(headers["authorization"], "Bearer xyz");
    assert_eq!(headers["origin"], "https://app.example");
    assert_eq!(headers["user-agent"], "wsbeat-test/1");
    assert_eq!(headers["x-custom"], "kept");
    assert_eq!(headers["x-forwarded-for"], "198.51.100.1, 127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-forwarded-host"], proxy.addr.to_string());
    assert!(headers.get("sec-websocket-extensions").is_none());
}

#[tokio::test]
async fn upstream_refusal_passes_through_with_its_body() {
    let backend = Backend::start(BackendBehaviour {
        refuse: Some((403, "no entry for you")),
        ..Default::default()
    })
    .await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    match tokio_tungstenite::connect_async(proxy.url("/")).await {
        Err(WsError::Http(resp)) => {
            assert_eq!(resp.status(), 403);
            assert_eq!(resp.headers()["x-backend"], "refused");
            assert_eq!(resp.body().as_deref(), Some(&b"no entry for you"[..]));
        }
        other => panic!("expected 403, got {:?}", other.map(|(_, r)| r)),
    }
}

#[tokio::test]
async fn upstream_down_is_502() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let proxy = Proxy::start(addr, |_| {}).await;
    let resp = raw_http(proxy.addr, &upgrade_request("/")).await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
}

#[tokio::test]
async fn upstream_that_never_answers_is_504_after_connect_timeout() {
    // Accepts TCP, never answers the handshake.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            held.push(silent.accept().await.unwrap());
        }
    });
    let proxy = Proxy::start(addr, |c| c.upstream.connect_timeout = ms(300)).await;
    let started = Instant::now();
    let resp = raw_http(proxy.addr, &upgrade_request("/")).await;
    let took = started.elapsed();
    assert!(resp.starts_with("HTTP/1.1 504"), "{resp}");
    assert!(
        took >= Duration::from_millis(300),
        "answered after {took:?}"
    );
}

#[tokio::test]
async fn oversized_message_closes_with_1009() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.limits.max_message_size = wsbeat::config::ByteSize(1024)
    })
    .await;
    let mut client = connect(&proxy.url("/")).await;
    echo_roundtrip(&mut client, Message::binary(vec![7u8; 1024])).await;
    client.send(Message::binary(vec![7u8; 1025])).await.unwrap();
    let frame = recv_close(&mut client).await.expect("close frame");
    assert_eq!(frame.code, CloseCode::Size);
    // The backend is told the client went away; it never saw the big message.
    loop {
        match backend.next_after_handshake().await {
            Seen::Message { msg, .. } => assert_eq!(msg.len(), 1024),
            Seen::Closed { frame: Some(f), .. } => {
                assert_eq!(f.code, CloseCode::Away);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn oversized_message_from_upstream_closes_the_client_with_1009() {
    let addr = scripted_backend(|mut ws| async move {
        ws.send(Message::binary(vec![1u8; 4096])).await.unwrap();
        while ws.next().await.is_some() {}
    })
    .await;
    let proxy = Proxy::start(addr, |c| {
        c.limits.max_message_size = wsbeat::config::ByteSize(1024)
    })
    .await;
    let mut client = connect(&proxy.url("/")).await;
    let frame = recv_close(&mut client).await.expect("close frame");
    assert_eq!(frame.code, CloseCode::Size);
}

#[tokio::test]
async fn malformed_upgrades_get_400_and_wrong_version_426() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let no_key = "GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let resp = raw_http(proxy.addr, no_key).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("Sec-WebSocket-Key"), "{resp}");
    let bad_key = upgrade_request("/").replace("dGhlIHNhbXBsZSBub25jZQ==", "short");
    let resp = raw_http(proxy.addr, &bad_key).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    let v8 = upgrade_request("/").replace("Version: 13", "Version: 8");
    let resp = raw_http(proxy.addr, &v8).await;
    assert!(resp.starts_with("HTTP/1.1 426"), "{resp}");
    assert!(
        resp.to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{resp}"
    );
    let post = upgrade_request("/").replace("GET", "POST");
    let resp = raw_http(proxy.addr, &post).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    let garbage = raw_http(proxy.addr, "\x16\x03\x01 not http at all\r\n\r\n").await;
    assert!(
        garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"),
        "{garbage}"
    );
}

#[tokio::test]
async fn slow_request_head_is_dropped_at_handshake_timeout() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| c.limits.handshake_timeout = ms(300)).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let started = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: slow\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    // wsbeat may answer 408 before closing; either way the connection ends.
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf))
        .await
        .expect("dropped within the test's patience")
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250),
        "dropped too early: {took:?}"
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

#[tokio::test]
async fn connections_past_max_connections_get_503() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| c.limits.max_connections = 2).await;
    let mut a = connect(&proxy.url("/")).await;
    let _b = connect(&proxy.url("/")).await;
    let resp = raw_http(proxy.addr, &upgrade_request("/")).await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    // Closing one frees its slot.
    a.close(None).await.unwrap();
    while a.next().await.is_some() {}
    let deadline = Instant::now() + PATIENCE;
    loop {
        match tokio_tungstenite::connect_async(proxy.url("/")).await {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => tokio::task::yield_now().await,
            Err(e) => panic!("slot never freed: {e}"),
        }
    }
}

#[tokio::test]
async fn invalid_frames_from_the_client_get_1002() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let mut raw = raw_websocket(proxy.addr, "/").await;
    // Reserved bit set on a text frame.
    let mut frame = client_frame(0x1, b"x");
    frame[0] |= 0x40;
    raw.write_all(&frame).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(PATIENCE, raw.read_to_end(&mut buf))
        .await
        .expect("closed in time")
        .unwrap();
    // An unmasked server close frame: 0x88, length, code 1002.
    let close_at = buf.iter().position(|&b| b == 0x88).expect("a close frame");
    assert_eq!(&buf[close_at + 2..close_at + 4], &1002u16.to_be_bytes());
    backend.expect_close(CloseCode::Away).await;
}

#[tokio::test]
async fn shutdown_closes_both_legs_with_1001() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let mut client = connect(&proxy.url("/")).await;
    echo_roundtrip(&mut client, Message::text("before")).await;
    let stopping = tokio::spawn(proxy.stop());
    let frame = recv_close(&mut client).await.expect("close frame");
    assert_eq!(frame.code, CloseCode::Away);
    backend.expect_message(Message::text("before")).await;
    backend.expect_close(CloseCode::Away).await;
    drop(client);
    stopping.await.unwrap();
}

#[tokio::test]
async fn fragmented_messages_pass_with_pings_between_fragments() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let mut raw = raw_websocket(proxy.addr, "/").await;
    let mut wire = client_fragment(0x1, b"frag");
    wire.extend(client_frame(0x9, b"mid-ping"));
    wire.extend(client_frame(0x0, b"mented"));
    raw.write_all(&wire).await.unwrap();
    backend.expect_message(Message::text("fragmented")).await;
}

#[tokio::test]
async fn frames_sent_with_the_handshake_are_not_lost() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut wire = upgrade_request("/").into_bytes();
    wire.extend(client_frame(0x1, b"eager"));
    s.write_all(&wire).await.unwrap();
    backend.expect_message(Message::text("eager")).await;
}

#[tokio::test]
async fn heartbeats_wait_for_the_end_of_a_fragmented_message() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    // The backend sends a text message in two fragments, 400 ms apart: longer than the
    // heartbeat interval, so a heartbeat falls due in the middle.
    let addr = scripted_backend(|mut ws| async move {
        let part = |data: &'static str, op, fin| Message::Frame(Frame::message(data, op, fin));
        ws.send(part("first half, ", OpCode::Data(Data::Text), false))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        ws.send(part("second half", OpCode::Data(Data::Continue), true))
            .await
            .unwrap();
        while ws.next().await.is_some() {}
    })
    .await;
    let proxy = Proxy::start(addr, |c| c.heartbeat.interval = ms(100)).await;
    let mut client = connect(&proxy.url("/")).await;
    // tungstenite fails the connection if a data frame interrupts a fragmented message,
    // so receiving the whole message proves the heartbeat waited.
    loop {
        match recv(&mut client).await {
            Message::Text(t) if t.as_str() == "--heartbeat--" => continue,
            Message::Text(t) => {
                assert_eq!(t.as_str(), "first half, second half");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    // And a heartbeat follows promptly once the message is complete.
    assert_eq!(recv(&mut client).await, Message::text("--heartbeat--"));
}

#[tokio::test]
async fn invalid_utf8_text_from_the_client_gets_1007() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let mut raw = raw_websocket(proxy.addr, "/").await;
    raw.write_all(&client_frame(0x1, b"fine")).await.unwrap();
    raw.write_all(&client_frame(0x1, b"bad \xff byte"))
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(PATIENCE, raw.read_to_end(&mut buf))
        .await
        .expect("closed in time")
        .unwrap();
    let close_at = buf.iter().position(|&b| b == 0x88).expect("a close frame");
    assert_eq!(&buf[close_at + 2..close_at + 4], &1007u16.to_be_bytes());
    backend.expect_message(Message::text("fine")).await;
    backend.expect_close(CloseCode::Away).await;
}

#[tokio::test]
async fn a_client_lost_in_the_middle_of_a_frame_has_the_upstream_cut_at_once() {
    // The client's TCP ends with half a frame sent: no close frame can follow that half
    // in the upstream's stream, so the upstream's connection is ended at once (not a
    // CLOSE_GRACE later) and its leg counts as 1006.
    let (addr, mut received) = raw_upstream(RawAnswer::Accept).await;
    let proxy = Proxy::start(addr, |c| c.heartbeat.message = None).await;
    let mut raw = raw_websocket(proxy.addr, "/").await;
    let half = send_half_frame(&mut raw).await;
    drop(raw);
    let lost = Instant::now();
    let got = next_received(&mut received).await;
    let took = lost.elapsed();
    assert!(
        got.after == half,
        "the upstream got {} bytes, not the {}-byte half frame",
        got.after.len(),
        half.len()
    );
    // At once, with a margin for a loaded machine; CLOSE_GRACE would be 1000 ms.
    assert!(
        took <= Duration::from_millis(600),
        "the upstream's connection ended {took:?} after the client's"
    );
    metric_at_least(
        proxy.admin,
        "wsbeat_close_codes_total",
        &[("leg", "upstream"), ("code", "1006")],
        1.0,
        PATIENCE,
    )
    .await;
    let code = |code| close_codes(proxy.admin, "upstream", code);
    assert_eq!(code("1001").await, 0.0, "a 1001 never sent");
}
