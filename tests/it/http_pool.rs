//! Plain HTTP over pooled upstream connections that the backend closes (issue 15, defect
//! 5): backends that close after one response without `Connection: close`, and Node's
//! idle keep-alive timeout. A request that fails on a reused connection before any
//! response byte is retried once when that is safe, and counted.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use hyper::header;
use hyper::{Request, StatusCode};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::http::{exchange, full, get, http_client};
use crate::common::*;

/// What a development server does between its response and its close (logging).
const POST_RESPONSE_WORK: Duration = Duration::from_millis(1);

/// How the raw backend treats the requests on one connection.
#[derive(Clone, Copy, PartialEq)]
enum Closes {
    /// Answers the first request (Content-Length, no `Connection: close`), then closes:
    /// ws4redis's development server.
    AfterOneResponse,
    /// Answers the first request; reads the second one whole, then closes without a
    /// word: a backend that closed an idle connection just as the request arrived.
    OnTheSecondRequest,
    /// Like `OnTheSecondRequest`, but closes once it has the second request's head,
    /// before any of its body.
    OnTheSecondHead,
    /// Reads each request whole and closes without answering.
    Always,
}

/// Connection number and `METHOD PATH` of every request head the backend read, in order.
type Seen = Vec<(usize, String)>;

/// A backend written on raw TCP, so that it can close where a real server would not.
struct RawBackend {
    addr: SocketAddr,
    seen: watch::Receiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawBackend {
    async fn start(closes: Closes) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (log, seen) = watch::channel(Vec::new());
        let log = Arc::new(log);
        let task = tokio::spawn(async move {
            let mut conn = 0;
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_raw(stream, conn, closes, log.clone()));
                conn += 1;
            }
        });
        RawBackend { addr, seen, task }
    }

    fn seen(&self) -> Seen {
        self.seen.borrow().clone()
    }

    /// Waits until the requests seen satisfy `done`.
    async fn wait_for(&self, done: impl FnMut(&Seen) -> bool) {
        let mut seen = self.seen.clone();
        tokio::time::timeout(PATIENCE, seen.wait_for(done))
            .await
            .expect("the backend saw it in time")
            .expect("backend running");
    }
}

async fn serve_raw(stream: TcpStream, conn: usize, closes: Closes, seen: Arc<watch::Sender<Seen>>) {
    let mut stream = BufReader::new(stream);
    for nth in 0.. {
        let Some((request, length)) = read_head(&mut stream).await else {
            return;
        };
        seen.send_modify(|seen| seen.push((conn, request.clone())));
        if closes == Closes::OnTheSecondHead && nth > 0 {
            return; // dropped: FIN, nothing unread (the body has not come), so no RST
        }
        let mut body = vec![0u8; length];
        if stream.read_exact(&mut body).await.is_err() {
            return;
        }
        let answer = match closes {
            Closes::AfterOneResponse => true,
            Closes::OnTheSecondRequest | Closes::OnTheSecondHead => nth == 0,
            Closes::Always => false,
        };
        if !answer {
            return; // dropped: FIN, nothing unread, so no RST
        }
        let body = format!("answer to {request} on connection {conn}");
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
        if closes == Closes::AfterOneResponse {
            // A development server logs the request after answering, then closes: the
            // FIN trails the response by a moment, so the connection looks reusable.
            // (Behaviour of the backend being modelled, not synchronisation.)
            tokio::time::sleep(POST_RESPONSE_WORK).await;
            return;
        }
    }
}

/// Reads one request head; returns `METHOD PATH` and the Content-Length.
async fn read_head(stream: &mut BufReader<TcpStream>) -> Option<(String, usize)> {
    let mut line = String::new();
    stream.read_line(&mut line).await.ok()?;
    let request_line = line.trim_end().to_owned();
    let mut length = 0usize;
    loop {
        line.clear();
        if stream.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().ok()?;
            }
        }
    }
    let mut parts = request_line.split(' ');
    Some((format!("{} {}", parts.next()?, parts.next()?), length))
}

fn retries(admin: SocketAddr) -> impl std::future::Future<Output = f64> {
    metric(
        admin,
        "wsbeat_upstream_retries_total",
        &[("route", "default")],
    )
}

/// The retry counter is exported for the route from start-up, before any retry.
async fn assert_retries_exported(admin: SocketAddr) {
    let scrape = raw_http(
        admin,
        "GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        scrape
            .lines()
            .any(|l| l.starts_with("wsbeat_upstream_retries_total{route=\"default\"} ")),
        "wsbeat_upstream_retries_total{{route=\"default\"}} is not exported:\n{scrape}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_closes_after_each_response_never_causes_a_502() {
    const CLIENTS: usize = 6;
    const REQUESTS_EACH: usize = 50;
    let backend = RawBackend::start(Closes::AfterOneResponse).await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    // Six keep-alive client connections, as a browser loading a page opens.
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let mut client = http_client(proxy.addr).await;
        clients.push(tokio::spawn(async move {
            let mut failed = Vec::new();
            for i in 0..REQUESTS_EACH {
                let (status, _, body) = exchange(&mut client, get(&format!("/p/{c}/{i}"))).await;
                if status != StatusCode::OK {
                    failed.push(format!("{status} {body}"));
                }
            }
            failed
        }));
    }
    let mut failed = Vec::new();
    for client in clients {
        failed.extend(client.await.unwrap());
    }
    let total = CLIENTS * REQUESTS_EACH;
    println!("{} of {total} requests failed", failed.len());
    assert!(
        failed.is_empty(),
        "{} of {total} requests failed, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    // The backend read each request once: the retried ones had met a connection it
    // was closing without reading them.
    let retried = retries(proxy.admin).await;
    println!("{retried} retried on a new connection");
    assert_eq!(backend.seen().len(), total);
}

/// tests/node/keepalive_server.js, killed when dropped.
struct NodeServer {
    addr: SocketAddr,
    child: std::process::Child,
}

impl NodeServer {
    fn start() -> NodeServer {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/node/keepalive_server.js"
        );
        let mut child = std::process::Command::new("node")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cannot run `node`: apt-get install nodejs");
        // Node prints its port once it listens: that line is the readiness signal.
        let mut port = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut port)
            .expect("node's port");
        let port: u16 = port.trim().parse().expect("node printed its port");
        NodeServer {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
        }
    }
}

impl Drop for NodeServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long Node keeps an idle keep-alive connection open, measured: it says `timeout=5`
/// but Node 20 waits a second more before it closes.
async fn node_idle_close(node: SocketAddr) -> Duration {
    let mut s = TcpStream::connect(node).await.unwrap();
    s.write_all(b"GET /measure HTTP/1.1\r\nHost: node\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(PATIENCE, s.read(&mut buf))
        .await
        .expect("node answered in time")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let idle = tokio::time::Instant::now();
    let eof = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
        .await
        .expect("node closed an idle connection within 30 s");
    assert!(matches!(eof, Ok(0)), "{eof:?}");
    idle.elapsed()
}

#[ignore = "needs Node: apt-get install nodejs"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_closing_idle_connections_never_causes_a_502() {
    // Each round leaves CONNECTIONS idle upstream connections, then sends one request on
    // each just as Node's keep-alive timeout closes them. To make that moment wide
    // enough to hit, Node is kept busy across it (as a GC pause or a CPU-bound handler
    // does): requests that arrive meanwhile are unread when Node, resuming, closes the
    // expired connections first. Before the fix every such request got a 502.
    const ROUNDS: usize = 3;
    const CONNECTIONS: u64 = 8;
    const BUSY: Duration = Duration::from_millis(80);
    let node = NodeServer::start();
    let close = node_idle_close(node.addr).await;
    println!("Node closes an idle connection after {close:?}");
    let proxy = Proxy::start(node.addr, |_| {}).await;
    let mut failed = Vec::new();
    for round in 0..ROUNDS {
        let mut clients = Vec::new();
        for _ in 0..CONNECTIONS {
            let mut client = http_client(proxy.addr).await;
            // Node holds these 100 ms, so the requests overlap and each takes its own
            // upstream connection.
            let warm_up = tokio::spawn(async move {
                let (status, _, body) = exchange(&mut client, get("/hold")).await;
                assert_eq!(status, StatusCode::OK, "{body}");
                client
            });
            clients.push(warm_up);
        }
        let mut warm = Vec::new();
        for client in clients {
            warm.push(client.await.unwrap());
        }
        // The subject of the test is idle time: sleeping is how it passes.
        let closing = tokio::time::Instant::now() + close;
        let mut busy = TcpStream::connect(node.addr).await.unwrap();
        let blocker = tokio::spawn(async move {
            tokio::time::sleep_until(closing - BUSY / 2).await;
            let request = format!(
                "GET /block?ms={} HTTP/1.1\r\nHost: node\r\n\r\n",
                BUSY.as_millis()
            );
            busy.write_all(request.as_bytes()).await.unwrap();
            let mut buf = [0u8; 256];
            let _ = tokio::time::timeout(PATIENCE, busy.read(&mut buf)).await;
        });
        let mut requests = Vec::new();
        for (k, mut client) in warm.into_iter().enumerate() {
            let at = closing - BUSY / 4 + BUSY / 2 * k as u32 / CONNECTIONS as u32;
            requests.push(tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                let (status, _, body) = exchange(&mut client, get(&format!("/{round}/{k}"))).await;
                (status != StatusCode::OK).then(|| format!("round {round}, #{k}: {status} {body}"))
            }));
        }
        for request in requests {
            failed.extend(request.await.unwrap());
        }
        blocker.await.unwrap();
    }
    let total = ROUNDS * CONNECTIONS as usize;
    println!("{} of {total} requests failed", failed.len());
    assert!(failed.is_empty(), "{} of {total}: {failed:?}", failed.len());
}

#[tokio::test]
async fn a_post_whose_body_was_sent_is_not_retried() {
    let backend = RawBackend::start(Closes::OnTheSecondRequest).await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    assert_retries_exported(proxy.admin).await;
    let mut client = http_client(proxy.addr).await;
    assert_eq!(exchange(&mut client, get("/first")).await.0, StatusCode::OK);
    // The pooled connection is reused; the backend reads the whole POST and closes.
    let post = Request::post("/submit")
        .header(header::HOST, "app.example")
        .body(full("order=1"))
        .unwrap();
    let (status, _, body) = exchange(&mut client, post).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(
        backend.seen(),
        vec![(0, "GET /first".to_owned()), (0, "POST /submit".to_owned())],
        "the POST reached the backend more than once"
    );
    assert_eq!(retries(proxy.admin).await, 0.0);
}

#[tokio::test]
async fn a_post_whose_body_the_upstream_never_took_goes_again_whole() {
    let backend = RawBackend::start(Closes::OnTheSecondHead).await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let mut client = http_client(proxy.addr).await;
    assert_eq!(exchange(&mut client, get("/first")).await.0, StatusCode::OK);
    // `Expect: 100-continue` holds the body back until wsbeat asks for it (that is, once
    // the upstream connection wants it); the backend closes the reused connection as
    // soon as it has the head.
    let mut raw = TcpStream::connect(proxy.addr).await.unwrap();
    raw.write_all(
        b"POST /order HTTP/1.1\r\nHost: app.example\r\nContent-Length: 7\r\n\
          Expect: 100-continue\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(PATIENCE, raw.read(&mut buf))
        .await
        .expect("100 Continue in time")
        .unwrap();
    let interim = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue\r\n"),
        "{interim}"
    );
    // The body is sent only once the request has gone again, on a new connection.
    backend
        .wait_for(|seen| seen.iter().filter(|(_, r)| r == "POST /order").count() == 2)
        .await;
    raw.write_all(b"order=1").await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, raw.read_to_end(&mut response))
        .await
        .expect("response in time")
        .unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(
        response.ends_with("answer to POST /order on connection 1"),
        "{response}"
    );
    assert_eq!(retries(proxy.admin).await, 1.0);
}

#[tokio::test]
async fn retries_go_to_a_new_connection_and_are_counted() {
    let backend = RawBackend::start(Closes::OnTheSecondRequest).await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let mut client = http_client(proxy.addr).await;
    for path in ["/a", "/b", "/c", "/d"] {
        let (status, _, body) = exchange(&mut client, get(path)).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    // /b met the connection that closed on it and went again, on a new connection.
    let seen = backend.seen();
    let mut retried = 0;
    for path in ["/a", "/b", "/c", "/d"] {
        let conns: Vec<usize> = seen
            .iter()
            .filter(|(_, r)| *r == format!("GET {path}"))
            .map(|(c, _)| *c)
            .collect();
        match conns[..] {
            [_] => {}
            [first, again] => {
                assert_ne!(
                    first, again,
                    "{path}: retried on the connection that failed"
                );
                retried += 1;
            }
            _ => panic!("{path} reached the backend {} times: {seen:?}", conns.len()),
        }
    }
    assert!(
        seen.iter().filter(|(_, r)| r == "GET /b").count() == 2,
        "{seen:?}"
    );
    assert_eq!(retries(proxy.admin).await, f64::from(retried));

    // A backend that fails on a new connection is broken, not stale: not retried.
    let broken = RawBackend::start(Closes::Always).await;
    let proxy = Proxy::start(broken.addr, |_| {}).await;
    let mut client = http_client(proxy.addr).await;
    assert_eq!(
        exchange(&mut client, get("/x")).await.0,
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(broken.seen().len(), 1);
    assert_eq!(retries(proxy.admin).await, 0.0);
}

#[tokio::test]
async fn an_idle_pooled_connection_is_closed_after_pool_idle_timeout() {
    const IDLE: Duration = Duration::from_millis(300);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let proxy = Proxy::start(addr, |c| c.upstream.pool_idle_timeout = ms(300)).await;
    let backend = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut stream = BufReader::new(stream);
        let (request, _) = read_head(&mut stream).await.expect("a request head");
        stream
            .get_mut()
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await
            .unwrap();
        let answered = tokio::time::Instant::now();
        // The connection stays open (keep-alive) until wsbeat's pool lets go of it.
        let mut rest = Vec::new();
        let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest))
            .await
            .expect("wsbeat closed the idle upstream connection in time");
        (request, read, answered.elapsed())
    });
    let mut client = http_client(proxy.addr).await;
    let (status, _, body) = exchange(&mut client, get("/once")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    let (request, read, idle) = backend.await.unwrap();
    assert_eq!(request, "GET /once");
    assert!(
        matches!(read, Ok(0)),
        "wsbeat sent more on an idle connection: {read:?}"
    );
    assert!(
        idle >= IDLE,
        "the idle connection was closed after {idle:?}, before pool_idle_timeout ({IDLE:?})"
    );
    // The client's own connection is still open, and the closed upstream connection is
    // not handed out again: the next request dials (and finds the backend gone).
    let (status, _, _) = exchange(&mut client, get("/again")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
}
