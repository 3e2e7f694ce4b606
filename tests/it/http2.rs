//! HTTP/2 on the client leg (`http2: true`): WebSockets as RFC 8441 extended CONNECT
//! streams, many on one connection, over h2c and TLS; the same checks, relay, liveness
//! and close codes as over HTTP/1.1; GOAWAY on drain; and nothing new with `http2: false`.

use std::time::{Duration, Instant};

use crate::common::*;
use crate::hostile::bad_frame_table;
use crate::tls::{tls_connect, Ca, TempDir};
use futures_util::{SinkExt, StreamExt};
use hyper::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

const STREAMS: usize = 50;

/// The next message on an HTTP/2 WebSocket, or a panic after PATIENCE.
async fn recv2(ws: &mut H2Ws) -> Message {
    tokio::time::timeout(PATIENCE, ws.next())
        .await
        .expect("message in time")
        .expect("stream open")
        .expect("no error")
}

/// The next data message, heartbeats and control frames skipped.
async fn recv_data2(ws: &mut H2Ws) -> Message {
    loop {
        match recv2(ws).await {
            Message::Text(t) if t.as_str() == HB => continue,
            Message::Ping(_) | Message::Pong(_) => continue,
            m => return m,
        }
    }
}

/// Reads until a heartbeat arrives.
async fn recv_heartbeat(ws: &mut H2Ws) {
    loop {
        if let Message::Text(t) = recv2(ws).await {
            if t.as_str() == HB {
                return;
            }
        }
    }
}

/// Reads until the close frame; returns its code.
async fn recv_close_code(ws: &mut H2Ws) -> Option<CloseCode> {
    loop {
        if let Message::Close(frame) = recv2(ws).await {
            return frame.map(|f| f.code);
        }
    }
}

fn fast_heartbeats(c: &mut wsbeat::config::Config) {
    c.http2 = true;
    c.heartbeat.interval = ms(100);
}

/// Opens STREAMS WebSockets on `client`; each echoes its own message and gets a
/// heartbeat; then all are closed cleanly.
async fn fifty_streams(client: &mut H2Client, backend: &mut Backend) {
    let mut sockets = Vec::new();
    for _ in 0..STREAMS {
        sockets.push(client.websocket("/chat").await);
    }
    let mut set = JoinSet::new();
    for (i, mut ws) in sockets.into_iter().enumerate() {
        set.spawn(async move {
            let msg = Message::text(format!("stream {i}"));
            ws.send(msg.clone()).await.unwrap();
            assert_eq!(recv_data2(&mut ws).await, msg);
            recv_heartbeat(&mut ws).await;
            ws.send(Message::binary(vec![i as u8; 70_000]))
                .await
                .unwrap();
            assert_eq!(
                recv_data2(&mut ws).await,
                Message::binary(vec![i as u8; 70_000])
            );
            ws.close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "done".into(),
            }))
            .await
            .unwrap();
            // The close handshake completes and the stream ends.
            loop {
                match tokio::time::timeout(PATIENCE, ws.next())
                    .await
                    .expect("the stream ends in time")
                {
                    None | Some(Err(_)) => break,
                    Some(Ok(_)) => continue,
                }
            }
        });
    }
    while let Some(done) = set.join_next().await {
        done.unwrap();
    }
    let mut handshakes = 0;
    let mut closes = 0;
    while closes < STREAMS {
        match backend.next().await {
            Seen::Handshake { headers, .. } => {
                handshakes += 1;
                // The upstream leg is HTTP/1.1 with wsbeat's own key and a Host.
                assert!(headers.contains_key("sec-websocket-key"));
                assert!(headers.contains_key("host"));
            }
            Seen::Closed { frame: Some(f), .. } => {
                assert_eq!(f.code, CloseCode::Normal);
                closes += 1;
            }
            Seen::Message { .. } => {}
            other => panic!("the backend saw {other:?}"),
        }
    }
    assert_eq!(handshakes, STREAMS);
}

#[tokio::test]
async fn fifty_websockets_on_one_h2c_connection_echo_and_get_heartbeats() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, fast_heartbeats).await;
    let mut client = H2Client::h2c(proxy.addr).await;
    fifty_streams(&mut client, &mut backend).await;
    // The connection is still usable afterwards.
    let mut ws = client.websocket("/again").await;
    ws.send(Message::text("again")).await.unwrap();
    assert_eq!(recv_data2(&mut ws).await, Message::text("again"));
    proxy.stop().await;
}

#[tokio::test]
async fn fifty_websockets_on_one_tls_connection_that_chose_h2() {
    let ca = Ca::new("test CA");
    let leaf = ca.leaf(&["localhost"], 1);
    let dir = TempDir::new();
    let tls = dir.tls(&leaf);
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        fast_heartbeats(c);
        c.tls = Some(tls);
    })
    .await;
    let stream = tls_connect(proxy.addr, &ca).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut client = H2Client::handshake(stream, &format!("localhost:{}", proxy.addr.port())).await;
    fifty_streams(&mut client, &mut backend).await;
}

#[tokio::test]
async fn a_silent_stream_is_closed_by_liveness_while_the_others_on_its_connection_live_on() {
    let mut backend = Backend::echo().await;
    let (ping, timeout) = (100, 600);
    let proxy = Proxy::start(backend.addr, |c| {
        fast_heartbeats(c);
        c.liveness.ping_interval = ms(ping);
        c.liveness.timeout = ms(timeout);
    })
    .await;
    let mut client = H2Client::h2c(proxy.addr).await;
    let mut silent = client.websocket("/silent").await;
    // Never read from here on: its client answers no PING.
    let went_silent = Instant::now();
    // Its handshake is the first the backend sees.
    assert!(matches!(
        backend.next().await,
        Seen::Handshake { conn: 0, .. }
    ));
    let mut lively = Vec::new();
    for _ in 0..5 {
        let ws = client.websocket("/lively").await;
        // Each reads all the time, so its client answers PINGs; told to stop, it hands
        // its socket back.
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut ws = ws;
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    _ = &mut stopped => return ws,
                    m = ws.next() => match m {
                        Some(Ok(Message::Close(f))) => panic!("a lively stream was closed: {f:?}"),
                        Some(Ok(_)) => {}
                        other => panic!("a lively stream ended: {other:?}"),
                    },
                }
            }
        });
        lively.push((stop, task));
    }
    // The backend is told the silent client went away (1001)…
    match backend.next_after_handshake().await {
        Seen::Closed {
            conn: 0,
            frame: Some(f),
        } => assert_eq!(f.code, CloseCode::Away),
        other => panic!("the backend saw {other:?}"),
    }
    let after = went_silent.elapsed();
    assert!(
        after >= Duration::from_millis(timeout) - Duration::from_millis(50),
        "closed after {after:?}, before the liveness timeout"
    );
    // …and the silent client, reading again, finds the 1001 and its stream ended.
    assert_eq!(recv_close_code(&mut silent).await, Some(CloseCode::Away));
    // The others lived on through three more timeouts, and still echo.
    let mut lively_again = Vec::new();
    tokio::time::sleep(Duration::from_millis(3 * timeout)).await;
    for (stop, task) in lively {
        stop.send(()).unwrap();
        lively_again.push(task.await.unwrap());
    }
    for ws in &mut lively_again {
        ws.send(Message::text("alive")).await.unwrap();
        assert_eq!(recv_data2(ws).await, Message::text("alive"));
    }
}

#[tokio::test]
async fn invalid_frames_on_an_h2_stream_get_the_close_codes_they_get_over_http1() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.http2 = true;
        c.limits.max_message_size = wsbeat::config::ByteSize(1024);
        c.heartbeat.message = None;
    })
    .await;
    let mut client = H2Client::h2c(proxy.addr).await;
    for case in bad_frame_table() {
        let mut raw = client.raw("/").await;
        raw.write_all(&case.wire).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(PATIENCE, raw.read_to_end(&mut answer))
            .await
            .expect("the stream ends in time")
            .expect("the stream ends, not reset");
        assert_eq!(
            close_code_in(&answer),
            Some(case.code),
            "{}: wsbeat sent {answer:?}",
            case.what
        );
        match backend.next_after_handshake().await {
            Seen::Closed { frame: Some(f), .. } => {
                assert_eq!(f.code, CloseCode::Away, "{}", case.what)
            }
            other => panic!("{}: the backend saw {other:?}", case.what),
        }
    }
    // Every bad stream ended on one connection, which still serves.
    let mut ws = client.websocket("/").await;
    ws.send(Message::text("still serving")).await.unwrap();
    assert_eq!(recv_data2(&mut ws).await, Message::text("still serving"));
}

#[tokio::test]
async fn an_extended_connect_gets_the_checks_and_errors_of_an_upgrade() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.http2 = true;
        c.allowed_origins = Some(vec!["https://app.example".to_owned()]);
        c.limits.max_connections_per_ip = Some(2);
    })
    .await;
    let mut client = H2Client::h2c(proxy.addr).await;
    let status = |r: Result<H2Io, hyper::Response<hyper::body::Incoming>>| match r {
        Ok(_) => StatusCode::OK,
        Err(r) => r.status(),
    };
    let v13 = ("sec-websocket-version", "13");
    // A foreign Origin: 403.
    let r = client
        .connect_with(
            "/",
            Some("websocket"),
            &[v13, ("origin", "https://evil.example")],
        )
        .await;
    assert_eq!(status(r), StatusCode::FORBIDDEN);
    // Another version: 426 naming 13.
    let r = client
        .connect_with("/", Some("websocket"), &[("sec-websocket-version", "8")])
        .await;
    let r = r.expect_err("refused");
    assert_eq!(r.status(), StatusCode::UPGRADE_REQUIRED);
    assert_eq!(r.headers()["sec-websocket-version"], "13");
    // A plain CONNECT (no :protocol) is a tunnel request: 405, as over HTTP/1.1.
    let r = client.connect_with("/", None, &[v13]).await;
    assert_eq!(status(r), StatusCode::METHOD_NOT_ALLOWED);
    // The subprotocol is the upstream's choice, passed on in the 200.
    let r = client
        .connect_with(
            "/",
            Some("websocket"),
            &[v13, ("sec-websocket-protocol", "one, two")],
        )
        .await;
    assert!(r.is_ok());
    let seen = backend.next().await;
    assert!(matches!(seen, Seen::Handshake { .. }), "{seen:?}");
    // Per-IP limits count streams: two are open (the one above and this), a third is 429.
    let _second = client.raw("/").await;
    let r = client.connect_with("/", Some("websocket"), &[v13]).await;
    let r = r.expect_err("refused");
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn the_upstreams_subprotocol_comes_back_in_the_200() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| c.http2 = true).await;
    let mut client = H2Client::h2c(proxy.addr).await;
    let scheme = "http";
    let mut req = hyper::Request::builder()
        .method(hyper::Method::CONNECT)
        .uri(format!("{scheme}://{}/", proxy.addr))
        .header("sec-websocket-version", "13")
        .header("sec-websocket-protocol", "one, two")
        .body(http_body_util::Empty::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let response = tokio::time::timeout(PATIENCE, client.send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // The test backend picks the last one offered.
    assert_eq!(response.headers()["sec-websocket-protocol"], "two");
    assert!(!response.headers().contains_key("sec-websocket-accept"));
}

#[tokio::test]
async fn with_http2_off_an_h2c_preface_is_closed_without_a_response_as_before() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    assert_eq!(read_until_closed(&mut s).await, b"");
    // And HTTP/1.1 is served as ever.
    let mut client = connect(&proxy.url("/")).await;
    echo_roundtrip(&mut client, Message::text("http/1.1")).await;
}

#[tokio::test]
async fn http1_clients_are_served_as_ever_with_http2_on() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| c.http2 = true).await;
    let mut client = connect(&proxy.url("/")).await;
    echo_roundtrip(&mut client, Message::text("http/1.1")).await;
    // A request whose method starts like the preface's first byte.
    let r = raw_request(
        proxy.addr,
        "PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_ne!(r.status, 0);
}

#[tokio::test]
async fn sigterm_sends_goaway_then_1001_on_every_stream() {
    let backend = Backend::echo().await;
    let wsbeat = WsbeatProcess::start(backend.addr, "http2: true\n");
    let mut client = H2Client::h2c(wsbeat.addr).await;
    let mut sockets = Vec::new();
    for _ in 0..3 {
        let mut ws = client.websocket("/").await;
        ws.send(Message::text("before")).await.unwrap();
        assert_eq!(recv_data2(&mut ws).await, Message::text("before"));
        sockets.push(ws);
    }
    signal(wsbeat.child.id(), "TERM");
    for ws in &mut sockets {
        assert_eq!(recv_close_code(ws).await, Some(CloseCode::Away));
    }
    // GOAWAY came first: no new stream is taken.
    let refused = tokio::time::timeout(PATIENCE, async {
        if client.send.ready().await.is_err() {
            return true;
        }
        let scheme = "http";
        let mut req = hyper::Request::builder()
            .method(hyper::Method::CONNECT)
            .uri(format!("{scheme}://{}/", wsbeat.addr))
            .header("sec-websocket-version", "13")
            .body(http_body_util::Empty::new())
            .unwrap();
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        client.send.send_request(req).await.is_err()
    });
    assert!(
        refused.await.unwrap_or(false),
        "a stream opened after GOAWAY"
    );
    for mut ws in sockets {
        let _ = ws.close(None).await;
    }
    let status = tokio::task::spawn_blocking(move || {
        let mut wsbeat = wsbeat;
        wsbeat.child.wait().unwrap()
    });
    let status = tokio::time::timeout(PATIENCE, status)
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    // And the connection is closed.
    let ended = tokio::time::timeout(PATIENCE, client.conn).await;
    assert!(ended.is_ok(), "the HTTP/2 connection outlived wsbeat");
}

#[ignore = "needs root, iproute2, Python prometheus_client and promtool: run as root; apt-get install iproute2 prometheus; python3 -m pip install prometheus_client"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_ends_all_its_streams_as_client_dead_within_timeout_and_a_second() {
    use crate::netns::{assert_root, sockets_in, sweep_stale_namespaces, veth_pair, SERVER_IP};
    assert_root();
    sweep_stale_namespaces();
    let (server_ns, client_ns) = veth_pair();
    let timeout = Duration::from_secs(2);
    let mut backend = Backend::echo().await;
    let listen = server_ns.enter(|| {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(std::net::SocketAddr::from((SERVER_IP, 0))).unwrap();
        s
    });
    let listener = listen.listen(64).unwrap();
    let server = listener.local_addr().unwrap();
    let proxy = Proxy::start_on(listener, backend.addr, |c| {
        c.http2 = true;
        c.liveness.ping_interval = ms(500);
        c.liveness.timeout = ms(timeout.as_millis() as u64);
        c.heartbeat.interval = ms(200);
    })
    .await;
    let socket = sockets_in(&client_ns, 1).pop().unwrap();
    let tcp = tokio::time::timeout(PATIENCE, socket.connect(server))
        .await
        .expect("TCP connect in time")
        .expect("TCP connect");
    let mut client = H2Client::handshake(tcp, &server.to_string()).await;
    // Every stream is read all the time, so it answers PINGs until the link goes.
    let mut readers = JoinSet::new();
    for _ in 0..STREAMS {
        let mut ws = client.websocket("/cut").await;
        readers.spawn(async move { while let Some(Ok(_)) = ws.next().await {} });
    }
    let mut conns = std::collections::BTreeSet::new();
    while conns.len() < STREAMS {
        if let Seen::Handshake { conn, .. } = backend.next().await {
            conns.insert(conn);
        }
    }
    // Let them live through a few PINGs first.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ip_link_down(&client_ns.name);
    let dropped = Instant::now();
    let mut closed = std::collections::BTreeMap::new();
    while closed.len() < STREAMS {
        match backend.next_after_handshake().await {
            Seen::Message { .. } => {}
            Seen::Closed { conn, frame } if conns.contains(&conn) => {
                assert_eq!(frame.map(|f| f.code), Some(CloseCode::Away), "conn {conn}");
                assert!(closed.insert(conn, dropped.elapsed()).is_none());
            }
            other => panic!("after the cut the backend saw {other:?}"),
        }
    }
    let last = closed.values().max().copied().unwrap();
    let first = closed.values().min().copied().unwrap();
    eprintln!("FIGURES h2 cut: {STREAMS} streams of one connection ended between {first:?} and {last:?} after the cut");
    assert!(
        last <= timeout + Duration::from_secs(1),
        "the last stream ended {last:?} after the cut (bound: timeout + 1 s)"
    );
    // Each relay counts its ending once its client's close grace is over.
    let dead = metric_at_least(
        proxy.admin,
        "wsbeat_connections_total",
        &[("route", "default"), ("outcome", "client_dead")],
        STREAMS as f64,
        PATIENCE,
    )
    .await;
    assert_eq!(dead, STREAMS as f64, "every stream counted client_dead");
    for outcome in ["client_close", "error"] {
        let n = metric(
            proxy.admin,
            "wsbeat_connections_total",
            &[("route", "default"), ("outcome", outcome)],
        )
        .await;
        assert_eq!(n, 0.0, "{outcome}");
    }
    drop(client);
    readers.abort_all();
}

fn ip_link_down(ns: &str) {
    crate::netns::ip(&["-n", ns, "link", "set", "veth-cli", "down"]);
}

#[ignore = "needs Python prometheus_client and promtool: python3 -m pip install prometheus_client; apt-get install prometheus"]
#[tokio::test]
async fn client_http_connections_are_counted_by_version() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| c.http2 = true).await;
    let version = |v: &'static str| {
        let admin = proxy.admin;
        async move {
            metric(
                admin,
                "wsbeat_client_http_connections_active",
                &[("version", v)],
            )
            .await
        }
    };
    assert_eq!(version("1.1").await, 0.0);
    assert_eq!(version("2").await, 0.0);
    let mut h2 = H2Client::h2c(proxy.addr).await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(h2.websocket("/").await);
    }
    let mut h1 = connect(&proxy.url("/")).await;
    echo_roundtrip(&mut h1, Message::text("h1")).await;
    // One HTTP/2 connection with three WebSockets, one HTTP/1.1 connection with one.
    assert_eq!(version("2").await, 1.0);
    assert_eq!(version("1.1").await, 1.0);
    assert_eq!(
        metric(
            proxy.admin,
            "wsbeat_connections_active",
            &[("route", "default")]
        )
        .await,
        4.0
    );
    drop(streams);
    drop(h2);
    h1.close(None).await.unwrap();
    while let Some(Ok(_)) = h1.next().await {}
    let admin = proxy.admin;
    let gone = tokio::time::timeout(PATIENCE, async move {
        loop {
            let open = metric(
                admin,
                "wsbeat_client_http_connections_active",
                &[("version", "2")],
            )
            .await
                + metric(
                    admin,
                    "wsbeat_client_http_connections_active",
                    &[("version", "1.1")],
                )
                .await;
            if open == 0.0 {
                return;
            }
            // The retry interval of a poll bounded by PATIENCE, not a synchronisation.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert!(
        gone.await.is_ok(),
        "closed connections are no longer counted"
    );
}

/// An HTTP/2 client for plain requests with bodies (h2c prior knowledge).
async fn h2_http_client(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http2::SendRequest<crate::http::Body> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    send
}

/// Sends `req` and returns the status, headers and whole body as text.
async fn h2_exchange(
    send: &mut hyper::client::conn::http2::SendRequest<crate::http::Body>,
    req: hyper::Request<crate::http::Body>,
) -> (StatusCode, hyper::HeaderMap, String) {
    use http_body_util::BodyExt;
    let response = tokio::time::timeout(PATIENCE, send.send_request(req))
        .await
        .expect("response in time")
        .expect("a response");
    assert_eq!(response.version(), hyper::Version::HTTP_2);
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(PATIENCE, body.collect())
        .await
        .expect("body in time")
        .expect("a whole body")
        .to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// A body of `data` followed by trailers.
fn body_with_trailers(data: &'static str) -> crate::http::Body {
    use http_body_util::BodyExt;
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert("x-checksum", hyper::header::HeaderValue::from_static("abc"));
    let frames: Vec<
        Result<hyper::body::Frame<bytes::Bytes>, Box<dyn std::error::Error + Send + Sync>>,
    > = vec![
        Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
            data.as_bytes(),
        ))),
        Ok(hyper::body::Frame::trailers(trailers)),
    ];
    BodyExt::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
        frames,
    )))
}

#[tokio::test]
async fn plain_http_over_h2_goes_to_the_http1_pool_with_bodies_streamed() {
    use crate::http::{full, pattern_body, HttpBackend};
    let backend = HttpBackend::start("one").await;
    let proxy = Proxy::start(backend.addr, |c| c.http2 = true).await;
    let mut send = h2_http_client(proxy.addr).await;
    let authority = proxy.addr.to_string();
    let scheme = "http";
    let uri = |path: &str| format!("{scheme}://{authority}{path}");
    // The upstream gets HTTP/1.1 with a Host made from :authority.
    let req = hyper::Request::get(uri("/headers")).body(full("")).unwrap();
    let (status, headers, text) = h2_exchange(&mut send, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-backend"], "one");
    assert!(text.starts_with("GET /headers\n"), "{text}");
    assert!(text.contains(&format!("host: {authority}\n")), "{text}");
    // Statuses and bodies pass; a 4 MiB upload streams through byte for byte.
    let req = hyper::Request::get(uri("/status/418"))
        .body(full(""))
        .unwrap();
    let (status, headers, _) = h2_exchange(&mut send, req).await;
    assert_eq!(status, StatusCode::IM_A_TEAPOT);
    assert_eq!(headers["x-teapot"], "yes");
    let req = hyper::Request::post(uri("/check"))
        .body(pattern_body(4 << 20, 16 << 10))
        .unwrap();
    let (status, _, text) = h2_exchange(&mut send, req).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "ok 4194304"));
    // A body with trailers arrives without them.
    let req = hyper::Request::post(uri("/echo"))
        .body(body_with_trailers("with trailers"))
        .unwrap();
    let (status, _, text) = h2_exchange(&mut send, req).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "with trailers"));
    // Several requests at once on the one connection.
    let mut set = JoinSet::new();
    for _ in 0..20 {
        let mut send = send.clone();
        let req = hyper::Request::get(uri("/hello")).body(full("")).unwrap();
        set.spawn(async move { h2_exchange(&mut send, req).await });
    }
    while let Some(done) = set.join_next().await {
        let (status, _, text) = done.unwrap();
        assert_eq!((status, text.as_str()), (StatusCode::OK, "hello from one"));
    }
}

#[ignore = "needs Python prometheus_client and promtool: python3 -m pip install prometheus_client; apt-get install prometheus"]
#[tokio::test]
async fn trailers_from_http2_clients_are_dropped_and_counted() {
    let backend = crate::http::HttpBackend::start("one").await;
    let proxy = Proxy::start(backend.addr, |c| c.http2 = true).await;
    let mut send = h2_http_client(proxy.addr).await;
    let scheme = "http";
    for _ in 0..3 {
        let req = hyper::Request::post(format!("{scheme}://{}/echo", proxy.addr))
            .body(body_with_trailers("abc"))
            .unwrap();
        let (status, _, text) = h2_exchange(&mut send, req).await;
        assert_eq!((status, text.as_str()), (StatusCode::OK, "abc"));
    }
    let dropped = metric(
        proxy.admin,
        "wsbeat_request_trailers_dropped_total",
        &[("route", "default")],
    )
    .await;
    assert_eq!(dropped, 3.0);
}

const IDLE_SOCKETS: usize = 1000;

/// Opens IDLE_SOCKETS WebSockets through `wsbeat` (over HTTP/2 streams, 100 a connection,
/// or one HTTP/1.1 connection each), each read all the time so it answers PINGs; holds
/// them while heartbeats flow; returns wsbeat's RSS growth per socket, in bytes.
async fn rss_per_idle_socket(over_h2: bool) -> u64 {
    let bin = std::env::var("WSBEAT_MEASURE_BIN").unwrap_or_else(|_| WSBEAT_BIN.to_owned());
    let mut backend = Backend::echo().await;
    let wsbeat = WsbeatProcess::start_bin(
        &bin,
        backend.addr,
        "http2: true\nheartbeat: { interval: 1s }\nliveness: { ping_interval: 2s, timeout: 10s }\n",
    );
    // One connection first, so what the first connection brings (buffers, pools) is not
    // counted per socket.
    let warm = connect(&wsbeat.url("/warm")).await;
    let before = wsbeat.rss_kib();
    let mut readers = JoinSet::new();
    let mut clients = Vec::new();
    if over_h2 {
        for _ in 0..IDLE_SOCKETS / 100 {
            let mut client = H2Client::h2c(wsbeat.addr).await;
            for _ in 0..100 {
                let mut ws = client.websocket("/idle").await;
                readers.spawn(async move { while let Some(Ok(_)) = ws.next().await {} });
            }
            clients.push(client);
        }
    } else {
        for _ in 0..IDLE_SOCKETS {
            let mut ws = connect(&wsbeat.url("/idle")).await;
            readers.spawn(async move { while let Some(Ok(_)) = ws.next().await {} });
        }
    }
    let mut handshakes = 0;
    while handshakes < IDLE_SOCKETS + 1 {
        if let Seen::Handshake { .. } = backend.next().await {
            handshakes += 1;
        }
    }
    // Held through a few heartbeats and PINGs, as the bench's idle runs are.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = wsbeat.rss_kib();
    drop(warm);
    readers.abort_all();
    after.saturating_sub(before) * 1024 / IDLE_SOCKETS as u64
}

#[ignore = "a measurement for bench/RESULTS.md (2,000 sockets, about 30 s): WSBEAT_MEASURE_BIN=target/release/wsbeat cargo test --test it rss_per_idle -- --ignored --nocapture"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rss_per_idle_websocket_over_h2_streams_and_over_http1() {
    crate::netns::ensure_open_files(8192);
    let h1 = rss_per_idle_socket(false).await;
    let h2 = rss_per_idle_socket(true).await;
    eprintln!(
        "FIGURES rss per idle WebSocket ({IDLE_SOCKETS} each way): HTTP/1.1 {h1} B, HTTP/2 streams (100 a connection) {h2} B"
    );
    for (what, bytes) in [("HTTP/1.1", h1), ("HTTP/2", h2)] {
        assert!(
            (1..64 * 1024).contains(&bytes),
            "{what}: {bytes} B per idle WebSocket"
        );
    }
}

#[tokio::test]
async fn a_lost_upstream_gets_its_stream_1011_and_ends_it() {
    // The backend takes one message, then vanishes without a close frame.
    let upstream = scripted_backend(|mut ws| async move {
        let _ = ws.next().await;
        drop(ws);
    })
    .await;
    let proxy = Proxy::start(upstream, |c| c.http2 = true).await;
    let mut client = H2Client::h2c(proxy.addr).await;
    let mut ws = client.websocket("/").await;
    ws.send(Message::text("bye")).await.unwrap();
    assert_eq!(recv_close_code(&mut ws).await, Some(CloseCode::Error));
    let ended = tokio::time::timeout(PATIENCE, async {
        while let Some(Ok(_)) = ws.next().await {}
    });
    assert!(ended.await.is_ok(), "the stream ends");
}

#[tokio::test]
async fn max_streams_per_connection_holds_a_stream_back_until_one_closes() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.http2 = true;
        c.limits.max_streams_per_connection = 2;
    })
    .await;
    let mut client = H2Client::h2c(proxy.addr).await;
    let first = client.websocket("/").await;
    let _second = client.websocket("/").await;
    // The third waits for a stream of the two (SETTINGS_MAX_CONCURRENT_STREAMS 2).
    let mut third_client = H2Client {
        send: client.send.clone(),
        conn: tokio::spawn(async { Ok(()) }),
        authority: proxy.addr.to_string(),
    };
    let third = tokio::spawn(async move { third_client.websocket("/").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!third.is_finished(), "a third stream opened past the limit");
    drop(first);
    let mut third = tokio::time::timeout(PATIENCE, third)
        .await
        .expect("the third stream opens once one closed")
        .unwrap();
    third.send(Message::text("third")).await.unwrap();
    assert_eq!(recv_data2(&mut third).await, Message::text("third"));
}

#[tokio::test]
async fn a_connection_that_answers_no_http2_ping_is_closed_after_liveness_timeout() {
    let backend = Backend::echo().await;
    let (ping, timeout) = (Duration::from_millis(200), Duration::from_millis(600));
    let proxy = Proxy::start(backend.addr, |c| {
        c.http2 = true;
        c.liveness.ping_interval = ms(ping.as_millis() as u64);
        c.liveness.timeout = ms(timeout.as_millis() as u64);
        // Neither idle clock may close it first.
        c.limits.handshake_timeout = ms(30_000);
    })
    .await;
    // A client that sends the preface and its SETTINGS, then never answers anything.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let started = Instant::now();
    let received = read_until_closed(&mut s).await;
    let after = started.elapsed();
    // What wsbeat sent: frames, one of which a PING (type 6) without ACK.
    let mut at = 0;
    let mut pings = 0;
    while at + 9 <= received.len() {
        let len = usize::from(received[at]) << 16
            | usize::from(received[at + 1]) << 8
            | usize::from(received[at + 2]);
        if received[at + 3] == 6 && received[at + 4] & 1 == 0 {
            pings += 1;
        }
        at += 9 + len;
    }
    assert!(pings >= 1, "no PING before the close: {received:?}");
    assert!(
        after >= ping + timeout - Duration::from_millis(50)
            && after < ping + timeout + Duration::from_secs(2),
        "closed {after:?} after the preface (PING every {ping:?}, timeout {timeout:?})"
    );
}
