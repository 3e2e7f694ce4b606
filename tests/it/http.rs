//! Plain HTTP pass-through and routes (issue 7): a real hyper backend that serves pages,
//! streams, and WebSockets on one port, reached through wsbeat's one public port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Mutex};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub(super) type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub(super) fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// The test payload repeats with this period (a prime, so it never lines up with chunks).
const PERIOD: usize = 1_048_573;

/// One period of the deterministic test payload.
fn period() -> &'static Bytes {
    static PATTERN: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    PATTERN.get_or_init(|| {
        (0..PERIOD as u64)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect::<Vec<u8>>()
            .into()
    })
}

/// The byte at `offset` of the test payload.
fn pattern(offset: u64) -> u8 {
    period()[(offset % PERIOD as u64) as usize]
}

/// Whether `data`, found at `offset` of a body, is the test payload there.
fn is_pattern_at(offset: u64, data: &[u8]) -> bool {
    let mut at = (offset % PERIOD as u64) as usize;
    let mut rest = data;
    while !rest.is_empty() {
        let n = rest.len().min(PERIOD - at);
        if rest[..n] != period()[at..at + n] {
            return false;
        }
        rest = &rest[n..];
        at = 0;
    }
    true
}

/// `len` bytes of the test payload, sent in frames of at most `chunk` bytes.
pub(super) fn pattern_body(len: u64, chunk: usize) -> Body {
    let stream = futures_util::stream::unfold(0u64, move |sent| async move {
        (sent < len).then(|| {
            let at = (sent % PERIOD as u64) as usize;
            let n = chunk.min((len - sent) as usize).min(PERIOD - at);
            let frame = Frame::data(period().slice(at..at + n));
            (Ok(frame), sent + n as u64)
        })
    });
    BodyExt::boxed(StreamBody::new(stream))
}

/// A hyper backend on 127.0.0.1:0:
/// - `GET /hello`: `hello from NAME`; `/status/418`: a teapot with its own header;
/// - `/headers`: the request line and headers it received, one per line;
/// - `POST /check`: compares the body with the test pattern byte for byte;
/// - `/echo`: the body back, streamed; `/slow`: answers after 5 s;
/// - `/sse`: server-sent events, one per string the test pushes into `events`;
/// - any upgrade: a WebSocket echo (pages and WebSockets on one port).
pub(super) struct HttpBackend {
    pub(super) addr: SocketAddr,
    /// TCP connections accepted so far.
    connections: Arc<AtomicUsize>,
    events: mpsc::UnboundedSender<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpBackend {
    pub(super) async fn start(name: &'static str) -> HttpBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let (events, event_rx) = mpsc::unbounded_channel::<String>();
        let event_rx = Arc::new(Mutex::new(event_rx));
        let counter = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let event_rx = event_rx.clone();
                let service = service_fn(move |req| respond(name, req, event_rx.clone()));
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades(),
                );
            }
        });
        HttpBackend {
            addr,
            connections,
            events,
            task,
        }
    }
}

async fn respond(
    name: &'static str,
    mut req: Request<Incoming>,
    events: Arc<Mutex<mpsc::UnboundedReceiver<String>>>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    if let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let mut ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_text() || msg.is_binary() {
                    let _ = ws.send(msg).await;
                }
            }
        });
        let mut r = Response::new(full(""));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let accept = derive_accept_key(key.as_bytes());
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept.parse().unwrap());
        return Ok(r);
    }
    let mut response = match path.as_str() {
        "/hello" => Response::new(full(format!("hello from {name}"))),
        "/status/418" => {
            let mut r = Response::new(full("short and stout\n"));
            *r.status_mut() = StatusCode::IM_A_TEAPOT;
            r.headers_mut()
                .insert("x-teapot", HeaderValue::from_static("yes"));
            r
        }
        "/headers" => {
            let mut text = format!("{} {}\n", req.method(), req.uri());
            for (k, v) in req.headers() {
                text.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
            }
            Response::new(full(text))
        }
        "/check" => {
            let mut body = req.into_body();
            let mut offset = 0u64;
            let mut mismatch = None;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                if let Ok(data) = frame.into_data() {
                    if mismatch.is_none() && !is_pattern_at(offset, &data) {
                        mismatch = Some(offset);
                    }
                    offset += data.len() as u64;
                }
            }
            Response::new(full(match mismatch {
                None => format!("ok {offset}"),
                Some(at) => format!("mismatch at {at} of {offset}"),
            }))
        }
        "/echo" => Response::new(req.into_body().map_err(Into::into).boxed()),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Response::new(full("too late"))
        }
        "/sse" => {
            let stream = futures_util::stream::unfold(events, |events| async move {
                let event = events.lock().await.recv().await?;
                let frame = Frame::data(Bytes::from(format!("data: {event}\n\n")));
                Some((Ok(frame), events))
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            r
        }
        _ => {
            let mut r = Response::new(full("not here"));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    };
    response
        .headers_mut()
        .insert("x-backend", HeaderValue::from_static(name));
    Ok(response)
}

/// An HTTP/1.1 client connection to wsbeat (one TCP connection, kept alive).
pub(super) async fn http_client(addr: SocketAddr) -> SendRequest<Body> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

pub(super) fn get(path: &str) -> Request<Body> {
    Request::get(path)
        .header(header::HOST, "app.example")
        .body(full(""))
        .unwrap()
}

/// Sends a request and returns the status, headers and the whole body as text.
pub(super) async fn exchange(
    sender: &mut SendRequest<Body>,
    req: Request<Body>,
) -> (StatusCode, hyper::HeaderMap, String) {
    let response = tokio::time::timeout(PATIENCE, sender.send_request(req))
        .await
        .expect("response in time")
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(PATIENCE, body.collect())
        .await
        .expect("body in time")
        .unwrap()
        .to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn http_proxy(backend: SocketAddr) -> impl std::future::Future<Output = Proxy> {
    Proxy::start(backend, |_| {})
}

#[tokio::test]
async fn get_reaches_the_upstream_with_forwarding_headers_and_host_kept() {
    let backend = HttpBackend::start("a").await;
    let proxy = http_proxy(backend.addr).await;
    let mut client = http_client(proxy.addr).await;
    let (status, headers, body) = exchange(&mut client, get("/hello")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "hello from a");
    assert_eq!(headers["x-backend"], "a");
    assert_eq!(headers["via"], "1.1 wsbeat");

    let req = Request::get("/headers?x=1")
        .header(header::HOST, "app.example")
        .header(header::CONNECTION, "keep-alive, X-Hop")
        .header("x-hop", "must not pass")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("x-forwarded-for", "203.0.113.9")
        .header(header::VIA, "1.0 edge")
        .header(header::COOKIE, "session=1")
        .body(full(""))
        .unwrap();
    let (status, _, seen) = exchange(&mut client, req).await;
    assert_eq!(status, StatusCode::OK);
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines[0], "GET /headers?x=1");
    for expected in [
        "host: app.example",
        "x-forwarded-for: 203.0.113.9, 127.0.0.1",
        "x-forwarded-proto: http",
        "x-forwarded-host: app.example",
        "via: 1.0 edge, 1.1 wsbeat",
        "cookie: session=1",
    ] {
        assert!(
            lines.contains(&expected),
            "{expected:?} missing in:\n{seen}"
        );
    }
    for hop in ["x-hop", "keep-alive", "proxy-authorization", "connection"] {
        assert!(
            !lines.iter().any(|l| l.starts_with(&format!("{hop}:"))),
            "hop-by-hop {hop} reached the upstream:\n{seen}"
        );
    }
}

#[tokio::test]
async fn upstream_statuses_and_bodies_pass_untouched() {
    let backend = HttpBackend::start("a").await;
    let proxy = http_proxy(backend.addr).await;
    let mut client = http_client(proxy.addr).await;
    let (status, headers, body) = exchange(&mut client, get("/status/418")).await;
    assert_eq!(status, StatusCode::IM_A_TEAPOT);
    assert_eq!(headers["x-teapot"], "yes");
    assert_eq!(body, "short and stout\n");
    let (status, _, body) = exchange(&mut client, get("/nowhere")).await;
    assert_eq!((status, body.as_str()), (StatusCode::NOT_FOUND, "not here"));
}

#[tokio::test]
async fn a_64_mib_upload_arrives_byte_for_byte_and_echoes_back_chunked() {
    let backend = HttpBackend::start("a").await;
    let proxy = http_proxy(backend.addr).await;
    let mut client = http_client(proxy.addr).await;
    let len = 64 << 20;
    let req = Request::post("/check")
        .header(header::HOST, "app.example")
        .header(header::CONTENT_LENGTH, len.to_string())
        .body(pattern_body(len, 64 * 1024))
        .unwrap();
    let (status, _, body) = exchange(&mut client, req).await;
    assert_eq!((status, body), (StatusCode::OK, format!("ok {len}")));

    // Chunked both ways: no length on the upload, the echo streams back as it comes.
    let len = 4 << 20;
    let req = Request::post("/echo")
        .header(header::HOST, "app.example")
        .body(pattern_body(len, 10_000))
        .unwrap();
    let response = client.send_request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get(header::CONTENT_LENGTH).is_none());
    let echoed = tokio::time::timeout(PATIENCE, response.into_body().collect())
        .await
        .expect("echo in time")
        .unwrap()
        .to_bytes();
    assert_eq!(echoed.len() as u64, len);
    assert!(is_pattern_at(0, &echoed));
}

#[tokio::test]
async fn a_slow_upstream_gets_504_after_request_timeout() {
    let backend = HttpBackend::start("a").await;
    let proxy = Proxy::start(backend.addr, |c| c.upstream.request_timeout = ms(300)).await;
    let mut client = http_client(proxy.addr).await;
    let started = Instant::now();
    let (status, _, body) = exchange(&mut client, get("/slow")).await;
    let waited = started.elapsed();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(body.starts_with("wsbeat: "), "{body}");
    // The same client connection still works.
    let (status, _, _) = exchange(&mut client, get("/hello")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn an_unreachable_upstream_gets_502() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let proxy = http_proxy(addr).await;
    let mut client = http_client(proxy.addr).await;
    let (status, _, body) = exchange(&mut client, get("/hello")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("cannot connect"), "{body}");
}

#[tokio::test]
async fn server_sent_events_arrive_one_by_one() {
    let backend = HttpBackend::start("a").await;
    let proxy = http_proxy(backend.addr).await;
    let mut client = http_client(proxy.addr).await;
    let response = client.send_request(get("/sse")).await.unwrap();
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    let mut body = response.into_body();
    // Each event is pushed only after the previous one came out of wsbeat: any
    // buffering would stall the test instead of delaying it.
    for i in 0..5 {
        backend.events.send(format!("event {i}")).unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"\n\n") {
            let frame = tokio::time::timeout(PATIENCE, body.frame())
                .await
                .expect("the event passed through without waiting for more")
                .expect("stream still open")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                got.extend_from_slice(&data);
            }
        }
        assert_eq!(got, format!("data: event {i}\n\n").as_bytes());
    }
}

#[tokio::test]
async fn keep_alive_reuses_the_client_and_the_upstream_connection() {
    let backend = HttpBackend::start("a").await;
    let proxy = http_proxy(backend.addr).await;
    let mut client = http_client(proxy.addr).await;
    for _ in 0..5 {
        let (status, _, _) = exchange(&mut client, get("/hello")).await;
        assert_eq!(status, StatusCode::OK);
    }
    // Five requests on one client connection reached the backend over one pooled one.
    assert_eq!(backend.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body() {
    let backend = HttpBackend::start("a").await;
    let proxy = http_proxy(backend.addr).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let body: Vec<u8> = (0..1000u64).map(pattern).collect();
    s.write_all(
        b"POST /check HTTP/1.1\r\nHost: app.example\r\nContent-Length: 1000\r\n\
          Expect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(PATIENCE, s.read(&mut buf))
        .await
        .expect("100 Continue before the body")
        .unwrap();
    let interim = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue\r\n"),
        "{interim}"
    );
    s.write_all(&body).await.unwrap();
    let mut rest = Vec::new();
    while !String::from_utf8_lossy(&rest).ends_with("ok 1000") {
        let n = tokio::time::timeout(PATIENCE, s.read(&mut buf))
            .await
            .expect("final response in time")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&rest));
        rest.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 200 OK\r\n"));
}

#[tokio::test]
async fn routes_choose_the_backend_by_longest_prefix() {
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    let c = HttpBackend::start("c").await;
    let url = |addr: SocketAddr| format!("ws://{addr}");
    let yaml = format!(
        "routes:\n  - {{ path: /api, upstream: {{ url: '{}' }} }}\n  \
         - {{ path: /api/v2, upstream: {{ url: '{}' }} }}\n",
        url(b.addr),
        url(c.addr)
    );
    let routes = wsbeat::config::Config::from_yaml(&yaml, "test")
        .unwrap()
        .routes;
    let proxy = Proxy::start(a.addr, |config| config.routes = routes).await;
    let mut client = http_client(proxy.addr).await;
    for (path, backend) in [
        ("/hello", "a"),
        ("/api/hello", "b"),
        ("/apihello", "a"),
        ("/api/v2/hello", "c"),
        ("/api/v2?x", "c"),
    ] {
        let (_, headers, _) = exchange(&mut client, get(path)).await;
        assert_eq!(headers["x-backend"], backend, "{path}");
    }
}

#[tokio::test]
async fn absolute_form_targets_stay_on_the_configured_upstream() {
    let backend = HttpBackend::start("a").await;
    let proxy = http_proxy(backend.addr).await;
    let resp = raw_http(
        proxy.addr,
        "GET http://elsewhere.example:9/headers HTTP/1.1\r\nHost: elsewhere.example:9\r\n\
         Connection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\r\n\r\nGET /headers\n"), "{resp}");
    let connect = raw_http(
        proxy.addr,
        "CONNECT elsewhere.example:443 HTTP/1.1\r\nHost: elsewhere.example:443\r\n\r\n",
    )
    .await;
    assert!(connect.starts_with("HTTP/1.1 405"), "{connect}");
    assert_eq!(backend.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn pages_and_websockets_share_one_port() {
    let backend = HttpBackend::start("a").await;
    let proxy = http_proxy(backend.addr).await;
    let mut client = http_client(proxy.addr).await;
    let (status, _, body) = exchange(&mut client, get("/hello")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "hello from a"));
    let mut ws = connect(&proxy.url("/ws")).await;
    echo_roundtrip(&mut ws, Message::text("through one port")).await;
    let (status, _, _) = exchange(&mut client, get("/hello")).await;
    assert_eq!(status, StatusCode::OK);
}

fn handshake_with_origin(origin: Option<&str>) -> String {
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    upgrade_request("/ws").replace("\r\n\r\n", &format!("\r\n{origin}\r\n"))
}

#[tokio::test]
async fn allowed_origins_refuse_cross_site_websockets_with_403() {
    let backend = HttpBackend::start("a").await;
    let other = HttpBackend::start("b").await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.allowed_origins = Some(vec!["https://app.example".into()]);
        let yaml = format!(
            "routes: [{{ path: /open, upstream: {{ url: 'ws://{}' }}, allowed_origins: ['http://localhost:3000'] }}]",
            other.addr
        );
        c.routes = wsbeat::config::Config::from_yaml(&yaml, "t").unwrap().routes;
    })
    .await;
    let status = |resp: String| resp.lines().next().unwrap_or_default().to_owned();
    let refused = raw_http(
        proxy.addr,
        &handshake_with_origin(Some("https://evil.example")),
    )
    .await;
    assert!(status(refused.clone()).contains(" 403 "), "{refused}");
    for allowed in [
        Some("https://app.example"),
        Some("HTTPS://App.Example"),
        None,
    ] {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(handshake_with_origin(allowed).as_bytes())
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        tokio::time::timeout(PATIENCE, s.read_exact(&mut buf))
            .await
            .expect("answer in time")
            .unwrap();
        assert_eq!(&buf, b"HTTP/1.1 101", "origin {allowed:?}");
    }
    // The route's own list replaces the top-level one.
    let on_route = handshake_with_origin(Some("https://app.example")).replace("/ws", "/open");
    assert!(status(raw_http(proxy.addr, &on_route).await).contains(" 403 "));
    // Plain HTTP is not a WebSocket: the allow-list does not apply.
    let mut client = http_client(proxy.addr).await;
    let mut req = get("/hello");
    req.headers_mut().insert(
        header::ORIGIN,
        HeaderValue::from_static("https://evil.example"),
    );
    assert_eq!(exchange(&mut client, req).await.0, StatusCode::OK);
}

#[tokio::test]
async fn plain_http_is_counted_by_status_with_its_duration() {
    let backend = HttpBackend::start("a").await;
    let proxy = http_proxy(backend.addr).await;
    let mut client = http_client(proxy.addr).await;
    exchange(&mut client, get("/hello")).await;
    exchange(&mut client, get("/status/418")).await;
    exchange(&mut client, get("/hello")).await;
    let metrics = raw_http(
        proxy.admin,
        "GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    for line in [
        "wsbeat_http_requests_total{route=\"default\",status=\"200\"} 2",
        "wsbeat_http_requests_total{route=\"default\",status=\"418\"} 1",
        "wsbeat_http_request_duration_seconds_count{route=\"default\"} 3",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing:\n{metrics}"
        );
    }
}

#[tokio::test]
async fn client_script_is_served_at_its_path_only_when_configured() {
    const SCRIPT: &str = "/_wsbeat.js";
    let source =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/clients/js/wsbeat.js")).unwrap();
    let backend = HttpBackend::start("a").await;

    // Off by default: the path is the application's.
    let plain = http_proxy(backend.addr).await;
    let mut client = http_client(plain.addr).await;
    let (status, headers, _) = exchange(&mut client, get(SCRIPT)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(headers["x-backend"], "a");

    let proxy = Proxy::start(backend.addr, |c| c.client_script = Some(SCRIPT.into())).await;
    let mut client = http_client(proxy.addr).await;
    for path in [SCRIPT.to_owned(), format!("{SCRIPT}?v=3")] {
        let (status, headers, body) = exchange(&mut client, get(&path)).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert!(
            headers.get("x-backend").is_none(),
            "{path} reached the backend"
        );
        assert_eq!(body.as_bytes(), source, "{path}: not clients/js/wsbeat.js");
        assert_eq!(
            headers[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
    }
    let (_, headers, _) = exchange(&mut client, get(SCRIPT)).await;
    let etag = headers[header::ETAG].clone();

    let mut revalidate = get(SCRIPT);
    revalidate
        .headers_mut()
        .insert(header::IF_NONE_MATCH, etag.clone());
    let (status, headers, body) = exchange(&mut client, revalidate).await;
    assert_eq!((status, body.as_str()), (StatusCode::NOT_MODIFIED, ""));
    assert_eq!(headers[header::ETAG], etag);

    let head = Request::head(SCRIPT)
        .header(header::HOST, "app.example")
        .body(full(""))
        .unwrap();
    let (status, headers, body) = exchange(&mut client, head).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, ""));
    assert_eq!(headers[header::CONTENT_LENGTH], source.len().to_string());

    let post = Request::post(SCRIPT)
        .header(header::HOST, "app.example")
        .body(full("x"))
        .unwrap();
    let (status, headers, _) = exchange(&mut client, post).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers[header::ALLOW], "GET, HEAD");

    // Exactly that path: its neighbours still belong to the application.
    for path in ["/_wsbeat.jsx", "/_wsbeat.js/x", "/hello"] {
        let (_, headers, _) = exchange(&mut client, get(path)).await;
        assert_eq!(
            headers["x-backend"], "a",
            "{path} did not reach the backend"
        );
    }
    // Counted like any request on that path: 4 script answers and /hello.
    let ok = [("route", "default"), ("status", "200")];
    assert_eq!(
        metric(proxy.admin, "wsbeat_http_requests_total", &ok).await,
        5.0
    );
}

#[tokio::test]
async fn a_1_gib_upload_streams_through_the_binary_in_flat_memory() {
    let backend = HttpBackend::start("a").await;
    let wsbeat = WsbeatProcess::start(backend.addr, "");
    let mut client = http_client(wsbeat.addr).await;
    // Warm up the connection pool and the allocator, then take the baseline.
    assert_eq!(exchange(&mut client, get("/hello")).await.0, StatusCode::OK);
    let baseline = wsbeat.rss_kib();
    let len: u64 = 1 << 30;
    let req = Request::post("/check")
        .header(header::HOST, "app.example")
        .header(header::CONTENT_LENGTH, len.to_string())
        .body(pattern_body(len, 256 * 1024))
        .unwrap();
    let upload = tokio::spawn(async move { exchange(&mut client, req).await });
    // Sample wsbeat's RSS while the gigabyte flows (measurement, not synchronisation).
    let mut peak = baseline;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !upload.is_finished() {
        assert!(
            Instant::now() < deadline,
            "1 GiB upload did not finish in 120 s"
        );
        peak = peak.max(wsbeat.rss_kib());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _, body) = upload.await.unwrap();
    assert_eq!((status, body), (StatusCode::OK, format!("ok {len}")));
    let growth = peak.saturating_sub(baseline);
    println!("1 GiB upload: RSS baseline {baseline} KiB, peak {peak} KiB, growth {growth} KiB");
    assert!(
        growth < 32 * 1024,
        "RSS grew by {growth} KiB while streaming 1 GiB: the body is being buffered"
    );
}

/// One keep-alive exchange of `GET /hello` on a raw socket: the response head and body
/// read exactly (Content-Length), so the connection is idle afterwards.
async fn raw_keep_alive_hello(s: &mut TcpStream) {
    s.write_all(b"GET /hello HTTP/1.1\r\nHost: app.example\r\n\r\n")
        .await
        .unwrap();
    let head = tokio::time::timeout(PATIENCE, read_head(s))
        .await
        .expect("answered in time")
        .expect("answered, not closed");
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let length: usize = head_field(&head, "content-length")
        .unwrap()
        .parse()
        .unwrap();
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).await.unwrap();
    assert_eq!(body, b"hello from a");
}

/// Reads until the peer closes; how long that took.
async fn closed_after(s: &mut TcpStream) -> Duration {
    let started = Instant::now();
    let rest = tokio::time::timeout(PATIENCE, read_until_closed(s))
        .await
        .expect("closed by wsbeat in time");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    started.elapsed()
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_at_http_idle_timeout_not_at_handshake_timeout() {
    let backend = HttpBackend::start("a").await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.limits.handshake_timeout = ms(300);
        c.limits.http_idle_timeout = ms(1500);
    })
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    raw_keep_alive_hello(&mut s).await;
    // Idle for twice the head timeout: a healthy keep-alive connection, not a slow head.
    // (The idle time is the behaviour under test, not synchronisation.)
    tokio::time::sleep(Duration::from_millis(600)).await;
    raw_keep_alive_hello(&mut s).await;
    let idle = closed_after(&mut s).await;
    assert!(
        idle >= Duration::from_millis(1400),
        "closed after {idle:?} idle, before the 1.5 s http_idle_timeout"
    );
    assert!(
        idle <= Duration::from_millis(1500 + 1500),
        "closed after {idle:?} idle, long after the 1.5 s http_idle_timeout"
    );
}

#[tokio::test]
async fn a_trickled_head_on_a_kept_alive_connection_is_dropped_at_handshake_timeout() {
    let backend = HttpBackend::start("a").await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.limits.handshake_timeout = ms(300);
        c.limits.http_idle_timeout = wsbeat::config::HumanDuration(PATIENCE);
    })
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    raw_keep_alive_hello(&mut s).await;
    // The next request's head, a byte every 20 ms: its clock starts at the first byte.
    let started = Instant::now();
    let head = b"GET /hello HTTP/1.1\r\nHost: app.example\r\nX-Slow: ";
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let mut chunk = [0u8; 1024];
    for sent in 0.. {
        tokio::select! {
            _ = ticker.tick() => {
                let byte = head.get(sent).copied().unwrap_or(b'z');
                if s.write_all(&[byte]).await.is_err() {
                    break; // reset by wsbeat
                }
                assert!(started.elapsed() < PATIENCE, "still connected after {sent} bytes");
            }
            n = s.read(&mut chunk) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => panic!("answered a head never finished: {:?}", String::from_utf8_lossy(&chunk[..n])),
            },
        }
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(280),
        "dropped early: {took:?}"
    );
    assert!(
        took <= Duration::from_millis(300 + 1500),
        "dropped after {took:?} with a 300 ms handshake_timeout"
    );
}
