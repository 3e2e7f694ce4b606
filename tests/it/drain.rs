//! Graceful drain on a real SIGTERM (issue 8, DESIGN §1.6): 200 WebSockets with traffic
//! both ways, /readyz, the closed listener, 1001 on every leg, exact message accounting,
//! a plain HTTP request in flight, and the second signal.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

const CONNECTIONS: usize = 200;
/// Each peer sends a numbered message this often.
const TICK: Duration = Duration::from_millis(40);
/// Messages each way every connection must have seen before the SIGTERM.
const WARM: u64 = 3;

/// What one side of one connection did, reported when its socket is done.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Messages sent (the send returned Ok).
    pub sent: u64,
    /// Messages received; they must be numbered 0, 1, 2 … without gaps.
    pub received: u64,
    /// The close code the peer received.
    pub close_code: Option<u16>,
    /// When the peer's close frame arrived.
    pub closed_at: Option<Instant>,
}

/// Runs one peer: sends `{prefix}{n}` every TICK, checks the other side's numbering,
/// reports `warm` once WARM messages came in, stops sending at the close and returns
/// its tally once the socket is done.
pub(crate) async fn peer<S>(
    mut ws: tokio_tungstenite::WebSocketStream<S>,
    prefix: &'static str,
    expect: &'static str,
    warm: mpsc::UnboundedSender<()>,
) -> Tally
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut tally = Tally::default();
    let mut tick = tokio::time::interval(TICK);
    let mut closing = false;
    loop {
        tokio::select! {
            _ = tick.tick(), if !closing => {
                if ws.send(Message::text(format!("{prefix}{}", tally.sent))).await.is_ok() {
                    tally.sent += 1;
                }
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    assert_eq!(t.as_str(), format!("{expect}{}", tally.received), "gap or reorder");
                    tally.received += 1;
                    if tally.received == WARM {
                        let _ = warm.send(());
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    tally.closed_at = Some(Instant::now());
                    tally.close_code = frame.map(|f| f.code.into());
                    closing = true;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return tally,
            }
        }
    }
}

/// A backend that runs `peer` on every connection, keyed by the `/conn/N` path.
pub(crate) async fn numbered_backend(
    warm: mpsc::UnboundedSender<()>,
) -> (SocketAddr, mpsc::UnboundedReceiver<(usize, Tally)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (done, tallies) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (done, warm) = (done.clone(), warm.clone());
            tokio::spawn(async move {
                let (path_tx, path_rx) = oneshot::channel();
                #[allow(clippy::result_large_err)] // the type tungstenite asks for
                let callback = |req: &Request, resp: Response| {
                    let _ = path_tx.send(req.uri().path().to_owned());
                    Ok(resp)
                };
                let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
                    return;
                };
                let path = path_rx.await.unwrap();
                let idx = path.trim_start_matches("/conn/").parse().unwrap();
                let tally = peer(ws, "u", "c", warm).await;
                let _ = done.send((idx, tally));
            });
        }
    });
    (addr, tallies)
}

fn readyz(admin: SocketAddr) -> impl std::future::Future<Output = String> {
    raw_http(
        admin,
        "GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    )
}

/// A one-shot HTTP backend on `/slow`: reports when the request has arrived, answers when
/// told to.
async fn held_http_backend() -> (SocketAddr, oneshot::Receiver<()>, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (arrived_tx, arrived) = oneshot::channel();
    let (release, release_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        read_head(&mut s).await.expect("a request head");
        let _ = arrived_tx.send(());
        let _ = release_rx.await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nfinished")
            .await;
        // Keep the socket until wsbeat is done with it.
        let _ = s.read(&mut [0u8; 1024]).await;
    });
    (addr, arrived, release)
}

/// Sends `GET /slow` to wsbeat and returns the client socket once the held backend has
/// the request.
async fn request_held_at_upstream(public: SocketAddr, arrived: oneshot::Receiver<()>) -> TcpStream {
    let mut http = TcpStream::connect(public).await.unwrap();
    http.write_all(b"GET /slow HTTP/1.1\r\nHost: app\r\n\r\n")
        .await
        .unwrap();
    tokio::time::timeout(PATIENCE, arrived)
        .await
        .expect("the request reached the upstream in time")
        .unwrap();
    http
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_200_busy_websockets_without_losing_a_message() {
    let (warm_tx, mut warm_rx) = mpsc::unbounded_channel();
    let (backend, mut backend_tallies) = numbered_backend(warm_tx.clone()).await;
    let (http_backend, http_arrived, http_release) = held_http_backend().await;
    let drain_timeout = Duration::from_secs(20);
    let config = write_temp_config(&format!(
        "upstream: {{ url: 'ws://{backend}' }}\n\
         routes: [{{ path: /slow, upstream: {{ url: 'ws://{http_backend}' }} }}]\n\
         shutdown: {{ drain_timeout: {}s }}\n\
         heartbeat: {{ message: null }}\n",
        drain_timeout.as_secs()
    ));
    let mut wsbeat = JsonWsbeat::spawn(&[
        "--config",
        config.path(),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    let public = wsbeat.addr("listening");
    let admin = wsbeat.addr("admin listening");

    let mut clients = Vec::new();
    for idx in 0..CONNECTIONS {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{public}/conn/{idx}"))
            .await
            .unwrap();
        let warm = warm_tx.clone();
        clients.push(tokio::spawn(async move { peer(ws, "c", "u", warm).await }));
    }
    // Traffic flows both ways on every connection before the signal.
    for _ in 0..2 * CONNECTIONS {
        tokio::time::timeout(PATIENCE, warm_rx.recv())
            .await
            .expect("every connection warmed up in time");
    }
    // A plain HTTP request is in flight at the upstream.
    let mut http = request_held_at_upstream(public, http_arrived).await;
    assert!(readyz(admin).await.starts_with("HTTP/1.1 200"));

    // Timed from kill(1)'s return: the signal has been delivered by then.
    wsbeat.signal("TERM");
    let signalled = Instant::now();
    loop {
        let resp = readyz(admin).await;
        if resp.starts_with("HTTP/1.1 503") {
            break;
        }
        assert!(signalled.elapsed() < PATIENCE, "/readyz never turned 503");
    }
    let not_ready_after = signalled.elapsed();
    // The listener is closed: a new connection is refused (polled: the listener closes
    // as the drain starts, not before the signal is read).
    loop {
        match TcpStream::connect(public).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            Err(e) => panic!("unexpected connect error {e}"),
            Ok(_) => assert!(signalled.elapsed() < PATIENCE, "listener still open"),
        }
    }

    // The request in flight finishes.
    http_release.send(()).unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, http.read_to_end(&mut response))
        .await
        .expect("the in-flight request finished in time")
        .unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("finished"), "{response}");

    let mut client_tallies = HashMap::new();
    for (idx, client) in clients.into_iter().enumerate() {
        let tally = tokio::time::timeout(PATIENCE, client)
            .await
            .expect("client done")
            .unwrap();
        client_tallies.insert(idx, tally);
    }
    let mut upstream_tallies = HashMap::new();
    while upstream_tallies.len() < CONNECTIONS {
        let (idx, tally) = tokio::time::timeout(PATIENCE, backend_tallies.recv())
            .await
            .expect("backend connection done")
            .unwrap();
        upstream_tallies.insert(idx, tally);
    }
    // One log line per WebSocket, with what wsbeat had to drop.
    let mut dropped_to_client = 0;
    let mut dropped_to_upstream = 0;
    for _ in 0..CONNECTIONS {
        let line = wsbeat.next("websocket closed");
        assert_eq!(line["outcome"], "shutdown", "{line}");
        assert_eq!(line["client_close"], 1001, "{line}");
        assert_eq!(line["upstream_close"], 1001, "{line}");
        dropped_to_client += line["dropped_to_client"].as_u64().unwrap();
        dropped_to_upstream += line["dropped_to_upstream"].as_u64().unwrap();
    }
    let status = wsbeat.exit_status(drain_timeout).await;
    let exited_after = signalled.elapsed();
    assert!(status.success(), "{status:?}");

    let (mut to_upstream, mut to_client, mut unsent) = (0, 0, 0);
    for idx in 0..CONNECTIONS {
        let (c, u) = (&client_tallies[&idx], &upstream_tallies[&idx]);
        assert_eq!(c.close_code, Some(1001), "client {idx}");
        assert_eq!(u.close_code, Some(1001), "backend connection {idx}");
        // Client to upstream: everything, exactly (the client is closed first, and its
        // messages keep flowing until it answers).
        assert_eq!(u.received, c.sent, "connection {idx}: client messages lost");
        // Upstream to client: a gap-free prefix; the rest crossed the client's close.
        assert!(c.received <= u.sent, "connection {idx}");
        to_upstream += u.received;
        to_client += c.received;
        unsent += u.sent - c.received;
    }
    assert_eq!(dropped_to_upstream, 0);
    assert_eq!(
        unsent, dropped_to_client,
        "every backend message wsbeat did not deliver is one it read after the client's close"
    );
    println!(
        "drain: {CONNECTIONS} connections, {to_upstream} messages to upstream and {to_client} to \
         clients delivered, {dropped_to_client} crossed the client's close; /readyz 503 after \
         {not_ready_after:?}, exit after {exited_after:?}"
    );
    assert!(
        not_ready_after < Duration::from_millis(100),
        "/readyz took {not_ready_after:?}"
    );
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let (http_backend, http_arrived, _hold) = held_http_backend().await;
    let upstream = format!("ws://{http_backend}");
    let mut wsbeat = JsonWsbeat::spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
        "--admin-listen",
        "off",
    ]);
    let public = wsbeat.addr("listening");
    // A request the upstream never answers keeps the drain waiting (drain_timeout 25s).
    let _http = request_held_at_upstream(public, http_arrived).await;
    wsbeat.signal("TERM");
    wsbeat.next("draining");
    wsbeat.signal("TERM");
    let status = wsbeat.exit_status(PATIENCE).await;
    assert_eq!(status.code(), Some(130), "{status:?}");
}
