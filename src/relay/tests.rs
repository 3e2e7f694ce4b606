//! The relay's endings over in-memory sockets (`tokio::io::duplex`) on a paused
//! clock: every instant is exact, so the tests say "at once" and mean it.

use super::*;
use crate::config::{Config, HumanDuration};
use crate::frame::{close, encode, Event as FrameEvent};
use crate::metrics::Metrics;
use tokio::io::{duplex, AsyncReadExt, DuplexStream};
use tokio::task::JoinHandle;

const MASK: [u8; 4] = [1, 2, 3, 4];

/// A relay between two in-memory peers: `client` and `upstream` are the peers' ends.
struct Harness {
    client: DuplexStream,
    upstream: DuplexStream,
    relay: JoinHandle<Summary>,
    /// Cancelling it drains the relay, as SIGTERM does.
    shutdown: CancellationToken,
}

/// `client_buffer`: how much the client's in-memory socket holds (the upstream's
/// holds more than one read of the relay).
fn start(client_buffer: usize, tune: impl FnOnce(&mut Config)) -> Harness {
    let mut config = Config::default();
    config.heartbeat.message = None;
    tune(&mut config);
    let routes = config.routes();
    let route = routes.resolve("/").clone();
    let metrics = Metrics::new(&routes, false);
    let started = Instant::now();
    let view = Arc::new(ConnectionView::new(
        1,
        std::net::SocketAddr::from(([127, 0, 0, 1], 1)).into(),
        &route.name,
        String::new(),
        started,
    ));
    let shutdown = CancellationToken::new();
    let ctx = RelayContext {
        metrics: metrics.for_route(&route.name),
        view,
        max_message_size: config.limits.max_message_size.0,
        compressed: false,
        write_timeout: config.limits.write_timeout.0,
        shutdown: shutdown.clone(),
        drain_grace: drain_grace(config.shutdown.drain_timeout.0),
        close_spread: Default::default(),
        max_age: None,
        started,
        route,
    };
    let (client, client_leg) = duplex(client_buffer);
    let (upstream, upstream_leg) = duplex(2 * READ_CHUNK);
    let socket = |io| Socket {
        io,
        leftover: bytes::Bytes::new(),
    };
    let relay = tokio::spawn(run(socket(client_leg), socket(upstream_leg), ctx));
    Harness {
        client,
        upstream,
        relay,
        shutdown,
    }
}

fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    encode(&mut f, opcode, payload, Some(MASK));
    if !fin {
        f[0] &= 0x7F;
    }
    f
}

/// Reads until EOF; returns what came and when the EOF did.
async fn read_to_eof(peer: &mut DuplexStream) -> (Vec<u8>, Instant) {
    let mut got = Vec::new();
    peer.read_to_end(&mut got).await.unwrap();
    (got, Instant::now())
}

/// The code of the first close frame in what the relay sent `to` (masked frames to
/// the upstream), read with the relay's own parser.
fn close_code(to: Leg, mut bytes: &[u8]) -> Option<u16> {
    let sender = match to {
        Leg::Client => Sender::Server,
        Leg::Upstream => Sender::Client,
    };
    let mut parser = Parser::new(sender, u64::MAX, None);
    while !bytes.is_empty() {
        let (used, event) = parser.feed(bytes, |_, _| {});
        bytes = &bytes[used..];
        match event {
            Some(FrameEvent::Close(close)) => return close.map(|(code, _)| code),
            Some(FrameEvent::Violation(v)) => panic!("{v:?}"),
            _ => {}
        }
    }
    None
}

fn ms(n: u64) -> HumanDuration {
    HumanDuration::millis(n)
}

#[tokio::test(start_paused = true)]
async fn a_client_dead_mid_frame_has_the_upstream_cut_at_the_verdict() {
    let mut h = start(64 * 1024, |c| {
        c.liveness.ping_interval = ms(100);
        c.liveness.timeout = ms(500);
    });
    let frame = client_frame(frame::OP_BINARY, true, &[7; 1000]);
    h.client.write_all(&frame[..500]).await.unwrap();
    let silent = Instant::now();
    let (got, ended) = read_to_eof(&mut h.upstream).await;
    assert_eq!(got, frame[..500], "the half frame and nothing after it");
    let took = ended - silent;
    assert!(
        took >= Duration::from_millis(500) && took <= Duration::from_millis(600),
        "the upstream's connection ended {took:?} after the client fell silent"
    );
    let summary = h.relay.await.unwrap();
    assert_eq!(summary.outcome, Outcome::ClientDead);
    assert_eq!(summary.upstream_close_code, None, "no close frame was sent");
    assert_eq!(summary.client_close_code, Some(close::GOING_AWAY));
}

#[tokio::test(start_paused = true)]
async fn a_client_dead_between_frames_sends_the_upstream_1001() {
    let mut h = start(64 * 1024, |c| {
        c.liveness.ping_interval = ms(100);
        c.liveness.timeout = ms(500);
    });
    let frame = client_frame(frame::OP_BINARY, true, &[7; 10]);
    h.client.write_all(&frame).await.unwrap();
    let mut got = vec![0; frame.len()];
    h.upstream.read_exact(&mut got).await.unwrap();
    // The upstream answers the close; the dead client never does.
    let mut close = vec![0; 2 + 4 + 2 + "client unresponsive".len()];
    h.upstream.read_exact(&mut close).await.unwrap();
    assert_eq!(close_code(Leg::Upstream, &close), Some(close::GOING_AWAY));
    let mut reply = Vec::new();
    encode(&mut reply, frame::OP_CLOSE, &1001u16.to_be_bytes(), None);
    h.upstream.write_all(&reply).await.unwrap();
    let summary = h.relay.await.unwrap();
    assert_eq!(summary.outcome, Outcome::ClientDead);
    assert_eq!(summary.upstream_close_code, Some(close::GOING_AWAY));
}

#[tokio::test(start_paused = true)]
async fn a_client_lost_mid_frame_has_the_upstream_cut_at_once() {
    let mut h = start(64 * 1024, |_| {});
    let frame = client_frame(frame::OP_BINARY, true, &[7; 1000]);
    h.client.write_all(&frame[..500]).await.unwrap();
    let mut got = vec![0; 500];
    h.upstream.read_exact(&mut got).await.unwrap();
    let lost = Instant::now();
    drop(h.client);
    let (rest, ended) = read_to_eof(&mut h.upstream).await;
    assert!(rest.is_empty(), "nothing after the half frame: {rest:?}");
    assert_eq!(ended, lost, "cut at once");
    let summary = h.relay.await.unwrap();
    assert_eq!(summary.outcome, Outcome::ClientClose);
    assert_eq!(summary.upstream_close_code, None);
}

#[tokio::test(start_paused = true)]
async fn a_text_frame_cut_by_a_violation_has_the_upstream_cut_at_once() {
    let mut h = start(64 * 1024, |_| {});
    let mut text = vec![b'a'; 1000];
    text[999] = 0xFF;
    let frame = client_frame(frame::OP_TEXT, true, &text);
    h.client.write_all(&frame[..500]).await.unwrap();
    let mut got = vec![0; 500];
    h.upstream.read_exact(&mut got).await.unwrap();
    let sent = Instant::now();
    h.client.write_all(&frame[500..]).await.unwrap();
    let (rest, ended) = read_to_eof(&mut h.upstream).await;
    assert!(rest.len() < 500, "the invalid end never passes");
    assert_eq!(ended, sent, "cut at once");
    let (to_client, _) = read_to_eof(&mut h.client).await;
    assert_eq!(
        close_code(Leg::Client, &to_client),
        Some(close::INVALID_PAYLOAD)
    );
    let summary = h.relay.await.unwrap();
    assert_eq!(summary.outcome, Outcome::Error);
    assert_eq!(summary.upstream_close_code, None);
    assert_eq!(summary.client_close_code, Some(close::INVALID_PAYLOAD));
}

#[tokio::test(start_paused = true)]
async fn an_upstream_dead_mid_frame_has_the_client_cut_at_the_verdict() {
    let mut h = start(64 * 1024, |c| {
        c.liveness.ping_interval = ms(100);
        c.liveness.timeout = ms(500);
        c.liveness.upstream_ping_interval = Some(ms(100));
    });
    let mut frame = Vec::new();
    encode(&mut frame, frame::OP_BINARY, &[7; 1000], None);
    h.upstream.write_all(&frame[..500]).await.unwrap();
    // The client answers nothing but stays alive by its own frames.
    let mut pong = Vec::new();
    encode(&mut pong, frame::OP_PONG, b"", Some(MASK));
    let mut got = vec![0; 500];
    h.client.read_exact(&mut got).await.unwrap();
    let silent = Instant::now();
    let mut to_client = Vec::new();
    let mut buf = [0u8; 1024];
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    let ended = loop {
        tokio::select! {
            _ = ticker.tick() => { let _ = h.client.write_all(&pong).await; }
            n = h.client.read(&mut buf) => match n.unwrap_or(0) {
                0 => break Instant::now(),
                n => to_client.extend_from_slice(&buf[..n]),
            },
        }
    };
    let took = ended - silent;
    assert!(
        took >= Duration::from_millis(500) && took <= Duration::from_millis(600),
        "the client's connection ended {took:?} after the upstream fell silent"
    );
    assert_eq!(
        close_code(Leg::Client, &to_client),
        None,
        "no close inside the frame"
    );
    let summary = h.relay.await.unwrap();
    assert_eq!(summary.outcome, Outcome::UpstreamDead);
    assert_eq!(summary.client_close_code, None);
}

#[tokio::test(start_paused = true)]
async fn a_drain_that_gives_up_on_a_client_mid_frame_cuts_the_upstream() {
    // Draining, the upstream's 1001 waits for the client's close reply, at most
    // drain_grace. A client that stopped mid-frame never replies, and the upstream's
    // stream is inside its frame: the upstream is cut when the client is given up.
    let mut h = start(64 * 1024, |_| {});
    let frame = client_frame(frame::OP_BINARY, true, &[7; 1000]);
    h.client.write_all(&frame[..500]).await.unwrap();
    let mut got = vec![0; 500];
    h.upstream.read_exact(&mut got).await.unwrap();
    let draining = Instant::now();
    h.shutdown.cancel();
    let (rest, ended) = read_to_eof(&mut h.upstream).await;
    assert!(rest.is_empty(), "nothing after the half frame: {rest:?}");
    let took = ended - draining;
    assert!(
        took >= CLOSE_GRACE && took <= CLOSE_GRACE + Duration::from_millis(20),
        "the upstream's connection ended {took:?} into the drain"
    );
    let summary = h.relay.await.unwrap();
    assert_eq!(summary.outcome, Outcome::Shutdown);
    assert_eq!(summary.upstream_close_code, None);
    assert_eq!(summary.client_close_code, Some(close::GOING_AWAY));
}

#[tokio::test(start_paused = true)]
async fn an_upstream_close_echo_behind_a_lost_client_frame_keeps_the_upstream_code() {
    // The upstream closes while the client is mid-frame: the echo waits behind that
    // frame. The client is then lost: the upstream is cut, and its leg counts the
    // code it sent, not 1006.
    let mut h = start(64 * 1024, |_| {});
    let frame = client_frame(frame::OP_BINARY, true, &[7; 1000]);
    h.client.write_all(&frame[..500]).await.unwrap();
    let mut got = vec![0; 500];
    h.upstream.read_exact(&mut got).await.unwrap();
    let mut close = Vec::new();
    encode(&mut close, frame::OP_CLOSE, &4000u16.to_be_bytes(), None);
    h.upstream.write_all(&close).await.unwrap();
    let mut to_client = vec![0; 4];
    h.client.read_exact(&mut to_client).await.unwrap();
    assert_eq!(close_code(Leg::Client, &to_client), Some(4000));
    drop(h.client);
    let (rest, _) = read_to_eof(&mut h.upstream).await;
    assert!(rest.is_empty(), "no echo inside the frame: {rest:?}");
    let summary = h.relay.await.unwrap();
    assert_eq!(summary.outcome, Outcome::UpstreamClose);
    assert_eq!(summary.upstream_close_code, Some(4000));
}

/// An upstream peer that sends 4 MiB in 16 KiB binary messages as fast as they are
/// read, then waits. (Not endless: on a paused clock, time only moves when every
/// task waits.)
fn flood(mut upstream: DuplexStream) -> JoinHandle<DuplexStream> {
    tokio::spawn(async move {
        let mut message = Vec::new();
        encode(&mut message, frame::OP_BINARY, &[0x5a; 16 * 1024], None);
        for _ in 0..256 {
            if upstream.write_all(&message).await.is_err() {
                break;
            }
        }
        upstream
    })
}

#[tokio::test(start_paused = true)]
async fn a_slow_reader_that_keeps_taking_bytes_is_not_cut_at_write_timeout() {
    // 512 bytes every 100 ms: the relay's queue for the client (up to a 32 KiB read)
    // never empties, but the client never stops taking bytes.
    let h = start(4096, |c| c.limits.write_timeout = ms(1000));
    let _flood = flood(h.upstream);
    let mut client = h.client;
    let mut buf = [0u8; 512];
    let mut taken = 0;
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    for _ in 0..30 {
        ticker.tick().await;
        let n = client.read(&mut buf).await.unwrap();
        assert!(n > 0, "cut after {taken} bytes");
        taken += n;
    }
    assert!(!h.relay.is_finished(), "the relay ended");
    assert!(taken >= 30 * 500, "only {taken} bytes in 3 s");
}

#[tokio::test(start_paused = true)]
async fn a_reader_that_takes_nothing_is_cut_at_write_timeout() {
    let h = start(4096, |c| c.limits.write_timeout = ms(1000));
    let started = Instant::now();
    // The flood ends once the client is given up and the relay reads (and drops) the
    // rest; then the upstream's close is waiting.
    let mut upstream = flood(h.upstream).await.unwrap();
    let mut to_upstream = vec![0; 256];
    let n = upstream.read(&mut to_upstream).await.unwrap();
    to_upstream.truncate(n);
    let took = started.elapsed();
    assert_eq!(
        close_code(Leg::Upstream, &to_upstream),
        Some(close::GOING_AWAY)
    );
    assert!(
        took >= Duration::from_millis(1000) && took <= Duration::from_millis(1100),
        "the upstream was closed after {took:?}"
    );
    assert_eq!(h.relay.await.unwrap().outcome, Outcome::Error);
    drop(h.client);
}
