//! Every way a relayed connection ends, unit-tested on in-memory sockets
//! (`tokio::io::duplex`) with paused time, so the timings asserted are exact: clean closes
//! each way, each peer lost, a dead client, a client that takes nothing, a drain and
//! protocol violations. Each test checks the frames each peer receives and the summary.
//!
//! The peers are tokio-tungstenite endpoints (the client masks, the upstream does not);
//! raw bytes go through `get_mut()` where a test needs a peer that breaks the protocol.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use super::{run, RelayContext, Socket, CLOSE_GRACE};
use crate::config::{Config, HumanDuration};
use crate::conn::{ConnectionView, Outcome, Summary};
use crate::metrics::Metrics;

/// The in-memory pipe's capacity each way: small, so a peer that does not read pushes
/// back on wsbeat quickly.
const PIPE: usize = 16 * 1024;
const HB: &str = "--heartbeat--";

type Peer = WebSocketStream<DuplexStream>;

struct Harness {
    /// The client's end: what a browser would hold.
    client: Peer,
    /// The backend's end.
    upstream: Peer,
    relay: JoinHandle<Summary>,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
    started: Instant,
}

impl Harness {
    async fn start(tune: impl FnOnce(&mut Config)) -> Harness {
        let mut config = Config::default();
        tune(&mut config);
        config.validate().expect("a valid test config");
        let routes = config.routes();
        let route = routes.resolve("/").clone();
        let metrics = Metrics::new(&routes, false);
        let (client, client_relay_end) = tokio::io::duplex(PIPE);
        let (upstream, upstream_relay_end) = tokio::io::duplex(PIPE);
        let started = Instant::now();
        let shutdown = CancellationToken::new();
        let ctx = RelayContext {
            metrics: metrics.for_route(&route.name),
            view: Arc::new(ConnectionView::new(
                1,
                std::net::SocketAddr::from(([127, 0, 0, 1], 1)).into(),
                &route.name,
                route.upstream.url.to_string(),
                started,
            )),
            route,
            max_message_size: config.limits.max_message_size.0,
            compressed: false,
            write_timeout: config.limits.write_timeout.0,
            shutdown: shutdown.clone(),
            drain_grace: super::drain_grace(config.shutdown.drain_timeout.0),
            close_spread: Default::default(),
            max_age: None,
            started,
        };
        let socket = |io| Socket {
            io,
            leftover: bytes::Bytes::new(),
        };
        let relay = tokio::spawn(run(
            socket(client_relay_end),
            socket(upstream_relay_end),
            ctx,
        ));
        Harness {
            client: WebSocketStream::from_raw_socket(client, Role::Client, None).await,
            upstream: WebSocketStream::from_raw_socket(upstream, Role::Server, None).await,
            relay,
            shutdown,
            metrics,
            started,
        }
    }

    /// The relay's summary, once both legs are done.
    async fn summary(self) -> Summary {
        tokio::time::timeout(Duration::from_secs(3600), self.relay)
            .await
            .expect("the relay ends")
            .expect("the relay does not panic")
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = String::from_utf8(self.metrics.render()).unwrap();
        let want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        text.lines()
            .filter(|l| l.starts_with(name) && want.iter().all(|w| l.contains(w.as_str())))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// What a peer received until its stream ended: data messages (heartbeats, PINGs and
/// PONGs left out), the close frame if one came, and when it came.
#[derive(Debug, Default)]
struct Received {
    data: Vec<Message>,
    close: Option<CloseFrame>,
    closed_at: Option<Instant>,
}

/// Reads `peer` until its stream ends (tungstenite answers a close by itself).
async fn read_all(peer: &mut Peer) -> Received {
    let mut got = Received::default();
    while let Some(Ok(msg)) = peer.next().await {
        match msg {
            Message::Close(frame) => {
                got.close = frame;
                got.closed_at = Some(Instant::now());
            }
            Message::Text(t) if t.as_str() == HB => {}
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            m => got.data.push(m),
        }
    }
    got
}

fn code(frame: &Option<CloseFrame>) -> Option<u16> {
    frame.as_ref().map(|f| u16::from(f.code))
}

#[tokio::test(start_paused = true)]
async fn a_client_close_reaches_the_upstream_with_its_code_and_reason() {
    let mut h = Harness::start(|_| {}).await;
    h.client.send(Message::text("last words")).await.unwrap();
    h.client
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        }))
        .await
        .unwrap();
    let upstream = read_all(&mut h.upstream).await;
    assert_eq!(upstream.data, [Message::text("last words")]);
    let close = upstream.close.expect("a close frame");
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (1000, "bye")
    );
    let client = read_all(&mut h.client).await;
    assert_eq!(code(&client.close), Some(1000), "the close is echoed");
    let s = h.summary().await;
    assert_eq!(s.outcome, Outcome::ClientClose);
    assert_eq!(
        (s.client_close_code, s.upstream_close_code),
        (Some(1000), Some(1000))
    );
}

#[tokio::test(start_paused = true)]
async fn an_upstream_close_reaches_the_client_with_its_code_and_reason() {
    let mut h = Harness::start(|_| {}).await;
    h.upstream
        .send(Message::text("from backend"))
        .await
        .unwrap();
    h.upstream
        .close(Some(CloseFrame {
            code: CloseCode::Library(4000),
            reason: "done".into(),
        }))
        .await
        .unwrap();
    let client = read_all(&mut h.client).await;
    assert_eq!(client.data, [Message::text("from backend")]);
    let close = client.close.expect("a close frame");
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (4000, "done")
    );
    assert_eq!(code(&read_all(&mut h.upstream).await.close), Some(4000));
    let s = h.summary().await;
    assert_eq!(s.outcome, Outcome::UpstreamClose);
    assert_eq!(
        (s.client_close_code, s.upstream_close_code),
        (Some(4000), Some(4000))
    );
}

#[tokio::test(start_paused = true)]
async fn a_lost_client_closes_the_upstream_with_1001_at_once() {
    let mut h = Harness::start(|_| {}).await;
    let client = std::mem::replace(
        &mut h.client,
        WebSocketStream::from_raw_socket(tokio::io::duplex(1).0, Role::Client, None).await,
    );
    let lost_at = Instant::now();
    drop(client);
    let upstream = read_all(&mut h.upstream).await;
    assert_eq!(code(&upstream.close), Some(1001));
    assert!(upstream.closed_at.unwrap() - lost_at < Duration::from_millis(20));
    let s = h.summary().await;
    assert_eq!(s.outcome, Outcome::ClientClose);
    assert_eq!(s.upstream_close_code, Some(1001));
    assert_eq!(
        s.client_close_code, None,
        "nothing was sent to a vanished client"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lost_upstream_closes_the_client_with_1011_and_is_counted() {
    let mut h = Harness::start(|_| {}).await;
    let upstream = std::mem::replace(
        &mut h.upstream,
        WebSocketStream::from_raw_socket(tokio::io::duplex(1).0, Role::Server, None).await,
    );
    drop(upstream);
    assert_eq!(code(&read_all(&mut h.client).await.close), Some(1011));
    assert_eq!(
        h.counter("wsbeat_upstream_errors_total", &[("reason", "lost")]),
        1.0
    );
    let s = h.summary().await;
    assert_eq!(s.outcome, Outcome::UpstreamClose);
    assert_eq!(s.client_close_code, Some(1011));
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_dead_at_the_timeout_the_upstream_told_first() {
    let mut h = Harness::start(|c| {
        c.liveness.ping_interval = HumanDuration::secs(10);
        c.liveness.timeout = HumanDuration::secs(30);
    })
    .await;
    // The client never reads, so it never answers a PING: dead at 30 s.
    let upstream = read_all(&mut h.upstream).await;
    assert_eq!(code(&upstream.close), Some(1001));
    let verdict = upstream.closed_at.unwrap() - h.started;
    assert!(
        verdict >= Duration::from_secs(30) && verdict <= Duration::from_millis(30_100),
        "the upstream was closed {verdict:?} after the handshake"
    );
    let started = h.started;
    assert_eq!(
        h.counter("wsbeat_liveness_timeouts_total", &[("leg", "client")]),
        1.0
    );
    let s = h.summary().await;
    assert_eq!(s.outcome, Outcome::ClientDead);
    assert_eq!(
        (s.client_close_code, s.upstream_close_code),
        (Some(1001), Some(1001))
    );
    // The unanswered close to the client is given up after CLOSE_GRACE.
    assert!(
        Instant::now() - started
            <= Duration::from_secs(30) + CLOSE_GRACE + Duration::from_millis(100)
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_takes_nothing_is_cut_at_write_timeout() {
    let h = Harness::start(|c| {
        c.limits.write_timeout = HumanDuration::secs(5);
        c.liveness.ping_interval = HumanDuration::secs(600);
        c.liveness.timeout = HumanDuration::secs(1200);
        c.heartbeat.message = None;
    })
    .await;
    // The backend sends more than the pipe holds; the client reads nothing.
    let blob = Message::binary(vec![7u8; 4 * PIPE]);
    let Harness {
        mut upstream,
        client,
        relay,
        started,
        ..
    } = h;
    let backend = tokio::spawn(async move {
        let _ = upstream.send(blob).await;
        read_all(&mut upstream).await
    });
    let got = backend.await.unwrap();
    assert_eq!(code(&got.close), Some(1001));
    let cut = got.closed_at.unwrap() - started;
    assert!(
        cut >= Duration::from_secs(5) && cut <= Duration::from_millis(5_100),
        "the upstream was told after {cut:?}"
    );
    let s = relay.await.unwrap();
    assert_eq!(s.outcome, Outcome::Error);
    drop(client);
}

#[tokio::test(start_paused = true)]
async fn a_drain_closes_the_client_first_and_lets_its_last_messages_through() {
    let mut h = Harness::start(|_| {}).await;
    h.shutdown.cancel();
    // The client sees 1001, still sends, then answers the close.
    let first = h.client.next().await.unwrap().unwrap();
    let first = match first {
        Message::Text(t) if t.as_str() == HB => h.client.next().await.unwrap().unwrap(),
        m => m,
    };
    assert!(
        matches!(&first, Message::Close(Some(f)) if f.code == CloseCode::Away),
        "{first:?}"
    );
    // A message the client sent before it saw the close: raw bytes, since tungstenite
    // sends nothing but the close reply once it has read a close.
    let mut crossed = Vec::new();
    crate::frame::encode(
        &mut crossed,
        crate::frame::OP_TEXT,
        b"sent as the close crossed",
        Some([1, 2, 3, 4]),
    );
    h.client.get_mut().write_all(&crossed).await.unwrap();
    let _ = read_all(&mut h.client).await; // replies to the close and ends
    let upstream = read_all(&mut h.upstream).await;
    assert_eq!(upstream.data, [Message::text("sent as the close crossed")]);
    assert_eq!(code(&upstream.close), Some(1001));
    let s = h.summary().await;
    assert_eq!(s.outcome, Outcome::Shutdown);
    assert_eq!(
        (s.client_close_code, s.upstream_close_code),
        (Some(1001), Some(1001))
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_violation_gets_1002_and_the_upstream_1001() {
    let mut h = Harness::start(|_| {}).await;
    // An unmasked frame from a client: RFC 6455 §5.1 requires the server to close.
    h.client
        .get_mut()
        .write_all(&[0x81, 0x02, b'h', b'i'])
        .await
        .unwrap();
    assert_eq!(code(&read_all(&mut h.upstream).await.close), Some(1001));
    assert_eq!(code(&read_all(&mut h.client).await.close), Some(1002));
    let s = h.summary().await;
    assert_eq!(s.outcome, Outcome::Error);
    assert_eq!(
        (s.client_close_code, s.upstream_close_code),
        (Some(1002), Some(1001))
    );
}

#[tokio::test(start_paused = true)]
async fn an_upstream_violation_gets_1002_and_the_client_1011() {
    let mut h = Harness::start(|_| {}).await;
    // A masked frame from a server is a protocol error.
    h.upstream
        .get_mut()
        .write_all(&[0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2])
        .await
        .unwrap();
    assert_eq!(code(&read_all(&mut h.client).await.close), Some(1011));
    assert_eq!(code(&read_all(&mut h.upstream).await.close), Some(1002));
    let s = h.summary().await;
    assert_eq!(s.outcome, Outcome::Error);
    assert_eq!(
        (s.client_close_code, s.upstream_close_code),
        (Some(1011), Some(1002))
    );
}

#[tokio::test(start_paused = true)]
async fn a_silent_upstream_is_dead_at_the_timeout_and_the_client_gets_1011() {
    let mut h = Harness::start(|c| {
        c.liveness.upstream_ping_interval = Some(HumanDuration::secs(5));
        c.liveness.timeout = HumanDuration::secs(15);
    })
    .await;
    // The client answers PINGs (it is read); the backend reads nothing, so never PONGs.
    let client = read_all(&mut h.client).await;
    assert_eq!(code(&client.close), Some(1011));
    let verdict = client.closed_at.unwrap() - h.started;
    assert!(
        verdict >= Duration::from_secs(15) && verdict <= Duration::from_millis(15_100),
        "the client was closed {verdict:?} after the handshake"
    );
    assert_eq!(
        h.counter("wsbeat_liveness_timeouts_total", &[("leg", "upstream")]),
        1.0
    );
    let s = h.summary().await;
    assert_eq!(s.outcome, Outcome::UpstreamDead);
    assert_eq!(
        (s.client_close_code, s.upstream_close_code),
        (Some(1011), Some(1001))
    );
}
