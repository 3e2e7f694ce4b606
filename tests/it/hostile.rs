//! Slow and hostile clients: trickled request heads, clients that never read, invalid
//! frames, oversized heads, connection bursts and header injection, over real sockets.

use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn a_trickled_request_head_is_dropped_at_handshake_timeout() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| c.limits.handshake_timeout = ms(300)).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let started = Instant::now();
    // One byte of a never-ending head every 20 ms: a timer reset by each byte would keep
    // this connection forever (the test then fails at PATIENCE).
    let head = b"GET / HTTP/1.1\r\nHost: slow\r\nX-Slow: ";
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let mut sent = 0usize;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let byte = head.get(sent).copied().unwrap_or(b'z');
                if s.write_all(&[byte]).await.is_err() {
                    break; // reset by wsbeat
                }
                sent += 1;
                assert!(started.elapsed() < PATIENCE, "still connected after {sent} bytes");
            }
            n = s.read(&mut chunk) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            },
        }
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(280),
        "dropped early: {took:?}"
    );
    assert!(
        took <= Duration::from_millis(300) + Duration::from_millis(1500),
        "dropped after {took:?} with a 300 ms handshake_timeout"
    );
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

/// One malformed frame sequence and the close code RFC 6455 requires for it.
pub(crate) struct BadFrames {
    pub(crate) what: &'static str,
    pub(crate) wire: Vec<u8>,
    pub(crate) code: u16,
}

fn close_with_code(code: u16) -> Vec<u8> {
    client_frame(0x8, &code.to_be_bytes())
}

/// Shared with tests/it/http2.rs: the same table over an HTTP/2 stream.
pub(crate) fn bad_frame_table() -> Vec<BadFrames> {
    let with_bits = |bits: u8| {
        let mut f = client_frame(0x1, b"x");
        f[0] |= bits;
        f
    };
    let mut huge_len = vec![0x82, 0x80 | 127];
    huge_len.extend_from_slice(&(1u64 << 63).to_be_bytes());
    huge_len.extend_from_slice(&[1, 2, 3, 4]);
    let mut bad_reason = 1000u16.to_be_bytes().to_vec();
    bad_reason.extend_from_slice(b"bye \xff");
    let mut cases = vec![
        BadFrames {
            what: "RSV2 set",
            wire: with_bits(0x20),
            code: 1002,
        },
        BadFrames {
            what: "RSV3 set",
            wire: with_bits(0x10),
            code: 1002,
        },
        BadFrames {
            what: "all RSV bits",
            wire: with_bits(0x70),
            code: 1002,
        },
        BadFrames {
            what: "data opcode 0x3",
            wire: client_frame(0x3, b"x"),
            code: 1002,
        },
        BadFrames {
            what: "data opcode 0x7",
            wire: client_frame(0x7, b""),
            code: 1002,
        },
        BadFrames {
            what: "control opcode 0xB",
            wire: client_frame(0xB, b"x"),
            code: 1002,
        },
        BadFrames {
            what: "control opcode 0xF",
            wire: client_frame(0xF, b""),
            code: 1002,
        },
        BadFrames {
            what: "unmasked text",
            wire: vec![0x81, 0x02, b'h', b'i'],
            code: 1002,
        },
        BadFrames {
            what: "unmasked close",
            wire: vec![0x88, 0x02, 0x03, 0xE8],
            code: 1002,
        },
        BadFrames {
            what: "PING of 126 bytes",
            wire: client_frame(0x9, &[7; 126]),
            code: 1002,
        },
        BadFrames {
            what: "PONG of 200 bytes",
            wire: client_frame(0xA, &[7; 200]),
            code: 1002,
        },
        BadFrames {
            what: "close of 126 bytes",
            wire: client_frame(0x8, &[b'a'; 126]),
            code: 1002,
        },
        BadFrames {
            what: "fragmented PING",
            wire: client_fragment(0x9, b"p"),
            code: 1002,
        },
        BadFrames {
            what: "fragmented close",
            wire: {
                let mut f = close_with_code(1000);
                f[0] &= 0x7F; // a fragmented control frame
                f
            },
            code: 1002,
        },
        BadFrames {
            what: "close with a 1-byte payload",
            wire: client_frame(0x8, &[3]),
            code: 1002,
        },
        BadFrames {
            what: "close reason not UTF-8",
            wire: client_frame(0x8, &bad_reason),
            code: 1007,
        },
        BadFrames {
            what: "continuation outside a message",
            wire: client_frame(0x0, b"x"),
            code: 1002,
        },
        BadFrames {
            what: "new message inside a fragmented one",
            wire: [client_fragment(0x1, b"a"), client_frame(0x2, b"b")].concat(),
            code: 1002,
        },
        BadFrames {
            what: "64-bit length with the top bit",
            wire: huge_len,
            code: 1002,
        },
        BadFrames {
            what: "text ending inside a code point",
            wire: client_frame(0x1, b"ok \xce"),
            code: 1007,
        },
        BadFrames {
            what: "overlong UTF-8 across fragments",
            wire: [client_fragment(0x1, b"a\xc0"), client_frame(0x0, b"\xaf")].concat(),
            code: 1007,
        },
        BadFrames {
            what: "surrogate in text",
            wire: client_frame(0x1, b"\xed\xa0\x80"),
            code: 1007,
        },
        BadFrames {
            what: "fragments adding up past max_message_size",
            wire: [
                client_fragment(0x2, &[1; 600]),
                client_frame(0x0, &[2; 600]),
            ]
            .concat(),
            code: 1009,
        },
    ];
    // RFC 6455 §7.4: codes a peer must not send (reporting-only, reserved, out of range).
    for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
        cases.push(BadFrames {
            what: "invalid close code",
            wire: close_with_code(code),
            code: 1002,
        });
    }
    cases
}

#[tokio::test]
async fn invalid_frames_get_the_close_code_rfc_6455_requires() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.limits.max_message_size = wsbeat::config::ByteSize(1024);
        c.heartbeat.message = None;
    })
    .await;
    for case in bad_frame_table() {
        let mut raw = raw_websocket(proxy.addr, "/").await;
        raw.write_all(&case.wire).await.unwrap();
        let answer = read_until_closed(&mut raw).await;
        assert_eq!(
            close_code_in(&answer),
            Some(case.code),
            "{}: wsbeat sent {answer:?}",
            case.what
        );
        // The backend is told the client went away, and never got a whole bad message.
        match backend.next_after_handshake().await {
            Seen::Closed { frame: Some(f), .. } => {
                assert_eq!(f.code, CloseCode::Away, "{}", case.what)
            }
            other => panic!("{}: the backend saw {other:?}", case.what),
        }
    }
    // And wsbeat still serves.
    let mut client = connect(&proxy.url("/")).await;
    echo_roundtrip(&mut client, Message::text("still serving")).await;
}

#[tokio::test]
async fn a_text_frame_found_invalid_after_it_began_to_pass_is_cut_not_closed_inside() {
    // wsbeat forwards a frame as it arrives, so most of this one has reached the
    // upstream when its last byte turns out to break UTF-8. A close frame can no longer
    // be put in the upstream stream: inside the frame it would be read as payload.
    let (addr, mut received) = raw_upstream(RawAnswer::Accept).await;
    let proxy = Proxy::start(addr, |c| c.heartbeat.message = None).await;
    let mut raw = raw_websocket(proxy.addr, "/").await;
    let mut payload = vec![b'a'; 256 * 1024];
    *payload.last_mut().unwrap() = 0xFF;
    let frame = client_frame(0x1, &payload);
    raw.write_all(&frame).await.unwrap();
    let answer = read_until_closed(&mut raw).await;
    assert_eq!(close_code_in(&answer), Some(1007));
    let got = next_received(&mut received).await;
    // The upstream got part of the frame, byte for byte (wsbeat forwards the client's
    // masked bytes), and nothing else: never the whole invalid message, never a close
    // frame inside the payload.
    assert!(
        got.after.len() < frame.len() && frame.starts_with(&got.after),
        "the upstream got {} bytes that are not a strict prefix of the {}-byte frame",
        got.after.len(),
        frame.len()
    );
    // The upstream leg ended without a close frame: 1006, not a 1001 never sent.
    let code = |code| close_codes(proxy.admin, "upstream", code);
    metric_at_least(
        proxy.admin,
        "wsbeat_close_codes_total",
        &[("leg", "client"), ("code", "1007")],
        1.0,
        PATIENCE,
    )
    .await;
    assert_eq!(code("1006").await, 1.0);
    assert_eq!(code("1001").await, 0.0, "a 1001 never sent");
}

#[tokio::test]
async fn cr_lf_and_nul_in_a_request_head_never_reach_the_upstream() {
    let (addr, mut received) = raw_upstream(RawAnswer::Refuse).await;
    let proxy = Proxy::start(addr, |_| {}).await;
    let base = upgrade_request("/");
    let with_header = |line: &str| base.replace("Host: test\r\n", &format!("Host: test\r\n{line}"));
    // (attack, request, forwarded): wsbeat refuses the head with 400, or forwards it
    // re-encoded by its own HTTP writer.
    let attacks = [
        (
            "obs-fold",
            with_header("X-Folded: first\r\n second\r\n"),
            false,
        ),
        (
            "bare CR in a value",
            with_header("X-Bad: a\rX-Injected: yes\r\n"),
            false,
        ),
        (
            "NUL in a value",
            with_header("X-Bad: a\0X-Injected: yes\r\n"),
            false,
        ),
        (
            "space before the colon",
            with_header("X-Bad : a\r\n"),
            false,
        ),
        (
            "bare CR in the target",
            base.replace("GET / ", "GET /a\rX-Injected: yes "),
            false,
        ),
        (
            "bare CR in Host",
            base.replace("Host: test", "Host: te\rX-Injected: yes"),
            false,
        ),
        // A bare LF ends a line (RFC 9112 §2.2): two headers, each forwarded on its own.
        (
            "bare LF in a value",
            with_header("X-Bad: a\nX-Injected: yes\r\n"),
            true,
        ),
        (
            "bare LF in the subprotocols",
            with_header("Sec-WebSocket-Protocol: chat\nX-Injected: yes\r\n"),
            true,
        ),
        (
            "encoded CR LF in the path",
            base.replace("GET / ", "GET /a%0d%0aX-Injected:%20yes "),
            true,
        ),
    ];
    for (what, request, forwarded) in attacks {
        let response = raw_http(proxy.addr, &request).await;
        let expected = if forwarded {
            "HTTP/1.1 403"
        } else {
            "HTTP/1.1 400"
        };
        assert!(response.starts_with(expected), "{what}: {response}");
        // A plain request after each attack: the next head the upstream sees is either
        // the attack's (when forwarded) or this one.
        let marker = format!("/after-{}", what.replace(' ', "-"));
        raw_http(proxy.addr, &upgrade_request(&marker)).await;
        let mut heads = Vec::new();
        while !heads
            .last()
            .is_some_and(|h: &String| h.starts_with(&format!("GET {marker} ")))
        {
            let got = next_received(&mut received).await;
            heads.push(String::from_utf8(got.head).expect("an ASCII head"));
        }
        assert_eq!(
            heads.len(),
            if forwarded { 2 } else { 1 },
            "{what}: {heads:?}"
        );
        for head in &heads {
            let body = head
                .strip_suffix("\r\n\r\n")
                .expect("ends with a blank line");
            for line in body.split("\r\n") {
                assert!(
                    !line.is_empty()
                        && !line.contains(['\r', '\n', '\0'])
                        && !line.starts_with([' ', '\t']),
                    "{what}: bad line {line:?} in {head:?}"
                );
            }
            if forwarded {
                // Nothing after the CR or LF stayed inside another header's value.
                assert!(
                    !body.contains(": a X-Injected") && !body.contains("chat X-Injected"),
                    "{head:?}"
                );
            }
        }
    }
}

#[tokio::test]
async fn an_oversized_request_head_gets_431_and_never_reaches_the_upstream() {
    let (addr, mut received) = raw_upstream(RawAnswer::Refuse).await;
    let proxy = Proxy::start(addr, |_| {}).await;
    let with_header = |line: String| {
        upgrade_request("/big").replace("Host: test\r\n", &format!("Host: test\r\n{line}"))
    };
    let one_long_value = with_header(format!("Cookie: {}\r\n", "c".repeat(100 * 1024)));
    let many_headers = with_header((0..300).map(|i| format!("X-H{i}: v\r\n")).collect());
    for request in [one_long_value, many_headers] {
        let response = raw_http(proxy.addr, &request).await;
        assert!(response.starts_with("HTTP/1.1 431"), "{response}");
    }
    // A large but acceptable head (a 32 KiB cookie) passes whole, and is the first head
    // the upstream sees.
    let cookie = "k".repeat(32 * 1024);
    let response = raw_http(
        proxy.addr,
        &with_header(format!("Cookie: {cookie}\r\n")).replace("/big", "/fine"),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 403"), "{response}");
    let got = next_received(&mut received).await;
    let head = String::from_utf8(got.head).unwrap();
    assert!(head.starts_with("GET /fine "), "{}", &head[..100]);
    assert!(head.contains(&format!("cookie: {cookie}\r\n")));
}

#[tokio::test]
async fn a_connection_burst_past_max_connections_gets_503_and_wsbeat_serves_on() {
    let backend = Backend::echo().await;
    let mut wsbeat = WsbeatProcess::start(backend.addr, "limits: { max_connections: 40 }");
    let mut burst = JoinSet::new();
    for _ in 0..200 {
        let url = wsbeat.url("/");
        burst.spawn(async move {
            tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
                .await
                .expect("an answer in time")
        });
    }
    let mut open = Vec::new();
    let mut refused = 0;
    while let Some(result) = burst.join_next().await {
        match result.unwrap() {
            Ok((client, _)) => open.push(client),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 503 => {
                refused += 1
            }
            Err(e) => panic!("neither 101 nor 503: {e}"),
        }
    }
    assert_eq!((open.len(), refused), (40, 160));
    wsbeat.assert_running();
    // The open ones work, and once they close their slots serve new clients.
    for client in &mut open {
        echo_roundtrip(client, Message::text("inside the limit")).await;
    }
    for mut client in open {
        client.close(None).await.unwrap();
        while client.next().await.is_some() {}
    }
    metric_at_least(
        wsbeat.admin,
        "wsbeat_connections_total",
        &[("route", "default"), ("outcome", "client_close")],
        40.0,
        PATIENCE,
    )
    .await;
    let mut again = Vec::new();
    for _ in 0..40 {
        again.push(connect(&wsbeat.url("/")).await);
    }
    echo_roundtrip(&mut again[39], Message::text("after the burst")).await;
    wsbeat.assert_running();
}

/// Resident memory of `wsbeat` sampled every 50 ms until `done` resolves; the peak.
async fn peak_rss_while<T>(
    wsbeat: &WsbeatProcess,
    done: impl std::future::Future<Output = T>,
) -> (u64, T) {
    tokio::pin!(done);
    let mut peak = wsbeat.rss_kib();
    let mut every = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            out = &mut done => return (peak.max(wsbeat.rss_kib()), out),
            _ = every.tick() => peak = peak.max(wsbeat.rss_kib()),
        }
    }
}

#[tokio::test]
async fn a_client_that_never_reads_while_the_backend_floods_is_closed_after_write_timeout() {
    // The backend floods 64 KiB messages until its writes fail, and reports when
    // wsbeat's close arrives and how many bytes it managed to send.
    let (report, mut reported) = tokio::sync::mpsc::unbounded_channel();
    let addr = scripted_backend(move |ws| async move {
        let (mut sink, mut stream) = ws.split();
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = sent.clone();
        let flood = tokio::spawn(async move {
            let chunk = Message::binary(vec![0x5a; 64 * 1024]);
            while sink.send(chunk.clone()).await.is_ok() {
                counter.fetch_add(64 * 1024, std::sync::atomic::Ordering::Relaxed);
            }
        });
        let started = Instant::now();
        let close = loop {
            match stream.next().await {
                Some(Ok(Message::Close(frame))) => break frame.map(|f| f.code),
                Some(Ok(_)) => continue,
                _ => break None,
            }
        };
        let _ = report.send((
            started.elapsed(),
            close,
            sent.load(std::sync::atomic::Ordering::Relaxed),
        ));
        flood.abort();
    })
    .await;
    let wsbeat = WsbeatProcess::start(
        addr,
        "limits: { write_timeout: 2s }\nheartbeat: { message: null }",
    );
    let mut raw = raw_websocket(wsbeat.addr, "/").await;
    let before = wsbeat.rss_kib();
    let (peak, report) = peak_rss_while(&wsbeat, async {
        tokio::time::timeout(PATIENCE, reported.recv())
            .await
            .expect("wsbeat closes the backend leg in time")
    })
    .await;
    let (took, close, sent) = report.unwrap();
    assert_eq!(
        close,
        Some(CloseCode::Away),
        "the backend is told the client went away"
    );
    assert!(
        took >= Duration::from_secs(2),
        "closed after {took:?}, before write_timeout"
    );
    assert!(
        took <= Duration::from_secs(2) + Duration::from_millis(1500),
        "closed after {took:?}"
    );
    // What the backend could push is bounded by socket buffers, and wsbeat's memory
    // does not follow it.
    eprintln!(
        "FIGURES flood: took {took:?}, backend sent {sent} B, RSS {before} KiB -> peak {peak} KiB"
    );
    assert!(
        sent < 64 << 20,
        "the backend pushed {sent} bytes into a client that reads nothing"
    );
    assert!(
        peak < before + 32 * 1024,
        "RSS {before} KiB before, peak {peak} KiB"
    );
    metric_at_least(
        wsbeat.admin,
        "wsbeat_connections_total",
        &[("route", "default"), ("outcome", "error")],
        1.0,
        PATIENCE,
    )
    .await;
    // The client's socket is dropped: reading it to the end terminates.
    read_until_closed(&mut raw).await;
}

/// Writes PING frames to `s` until wsbeat stops taking them (no progress for 1 s),
/// `budget` bytes have gone, or 10 s have passed; returns the bytes written.
async fn flood_pings(s: &mut (impl AsyncWriteExt + Unpin), budget: usize) -> usize {
    let ping = client_frame(0x9, &[0x50; 125]);
    let chunk: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 500)
        .collect();
    let mut written = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while written < budget && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), s.write(&chunk)).await {
            Ok(Ok(n)) if n > 0 => written += n,
            _ => break,
        }
    }
    written
}

/// Far more than the kernel's socket buffers on both sides can hold (a few MiB each).
const FLOOD_BUDGET: usize = 256 << 20;
/// What the buffers may hold before wsbeat must have stopped reading.
const FLOOD_BOUND: usize = 48 << 20;

#[tokio::test]
async fn a_ping_flood_from_a_client_that_never_reads_is_not_read_without_bound() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let mut s = raw_websocket(proxy.addr, "/").await;
    // Each PING owes a PONG the client never takes: past OWN_FRAMES_LIMIT of them,
    // wsbeat stops reading, and the client's writes stall in the kernel's buffers.
    let written = flood_pings(&mut s, FLOOD_BUDGET).await;
    assert!(
        written < FLOOD_BOUND,
        "wsbeat kept reading PINGs: {written} B taken"
    );
}

#[tokio::test]
async fn a_ping_flood_behind_a_slowly_read_frame_does_not_grow_memory() {
    // The backend sends one large message; the client reads it at a trickle, so the
    // frame stays half forwarded for seconds and every PONG must wait behind it, while
    // the client floods PINGs. Unbounded, wsbeat reads them all and piles up their
    // PONGs; bounded, it stops reading once a few KiB of PONGs wait.
    let backend = scripted_backend(|mut ws| async move {
        let _ = ws.send(Message::binary(vec![7u8; 15 << 20])).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    let wsbeat = WsbeatProcess::start(backend, "");
    let (mut read, mut write) = raw_websocket(wsbeat.addr, "/").await.into_split();
    let before = wsbeat.rss_kib();
    let trickle = tokio::spawn(async move {
        // About 400 KB/s: the 15 MiB frame lasts over 30 s, the flood below 6 s.
        let mut buf = [0u8; 2048];
        let mut ticker = tokio::time::interval(Duration::from_millis(5));
        loop {
            ticker.tick().await;
            if matches!(read.read(&mut buf).await, Ok(0) | Err(_)) {
                return;
            }
        }
    });
    let mut peak = before;
    let mut written = 0;
    let ping = client_frame(0x9, &[0x50; 125]);
    let chunk: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 100)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline {
        let write = tokio::time::timeout(Duration::from_millis(100), write.write(&chunk));
        if let Ok(Ok(n)) = write.await {
            written += n;
        }
        peak = peak.max(wsbeat.rss_kib());
    }
    trickle.abort();
    eprintln!(
        "FIGURES ping flood behind a frame: {written} B of PINGs taken, RSS {before} KiB -> peak {peak} KiB"
    );
    assert!(
        peak < before + 2560,
        "RSS grew from {before} KiB to {peak} KiB while PONGs waited behind a frame"
    );
}

#[tokio::test]
async fn a_slow_reader_that_keeps_reading_is_not_cut_at_write_timeout() {
    // A phone on 2G: it takes 512 bytes every 100 ms, far less than the backend pushes,
    // so wsbeat's queue for it never empties; but it never stops reading, and
    // write_timeout is about a peer that makes no progress. Small socket buffers on
    // both ends (wsbeat's accepted socket inherits its listener's) let the progress show
    // in wsbeat's writes within the timeout instead of vanishing into kernel buffers.
    let (report, mut reported) = tokio::sync::mpsc::unbounded_channel();
    let addr = scripted_backend(move |ws| async move {
        let (mut sink, mut stream) = ws.split();
        let flood = tokio::spawn(async move {
            let chunk = Message::binary(vec![0x5a; 64 * 1024]);
            while sink.send(chunk.clone()).await.is_ok() {}
        });
        let close = loop {
            match stream.next().await {
                Some(Ok(Message::Close(frame))) => break frame.map(|f| f.code),
                Some(Ok(_)) => continue,
                _ => break None,
            }
        };
        let _ = report.send(close);
        flood.abort();
    })
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(2048).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(16).unwrap();
    let proxy = Proxy::start_on(listener, addr, |c| {
        c.heartbeat.message = None;
        c.limits.write_timeout = ms(1000);
    })
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(2048).unwrap();
    let mut s = socket.connect(proxy.addr).await.unwrap();
    s.write_all(upgrade_request("/").as_bytes()).await.unwrap();
    let head = read_head(&mut s).await.expect("a response head");
    assert!(head.starts_with(b"HTTP/1.1 101"));
    let mut buf = [0u8; 512];
    let mut taken = 0;
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    let reading_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < reading_until {
        ticker.tick().await;
        let n = tokio::time::timeout(PATIENCE, s.read(&mut buf))
            .await
            .expect("bytes in time")
            .unwrap_or(0);
        assert!(n > 0, "cut after {taken} bytes");
        taken += n;
    }
    assert!(
        reported.try_recv().is_err(),
        "the backend was closed while the client read"
    );
    assert_eq!(
        metric(
            proxy.admin,
            "wsbeat_connections_total",
            &[("route", "default"), ("outcome", "error")]
        )
        .await,
        0.0
    );
    eprintln!("FIGURES slow reader: took {taken} B in 3 s");
}
