//! Nothing lost under churn: many concurrent WebSockets that end every way a connection
//! can end (clean closes from either side, clients and backends that drop their TCP
//! connection, wsbeat's drain), each side sending sequence-numbered messages and
//! checking what it receives. Per connection: after a clean close both directions
//! arrived whole; after any other end, each side received a prefix of what the other
//! sent (in order, no duplicate, no corrupted byte) and was told with a close code.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Connections in the churn phase, and how many run at once.
const CONNECTIONS: u64 = 240;
const CONCURRENT: usize = 40;
/// Connections still streaming when wsbeat drains.
const DRAINED: u64 = 12;
/// The whole test's bound.
const TEST_BOUND: Duration = Duration::from_secs(120);

/// How a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Both sides finish sending, then the client closes with 1000.
    ClientCloses,
    /// Both sides finish sending, then the backend closes with 1000.
    BackendCloses,
    /// The client ends its TCP connection halfway without a close frame: a FIN (then
    /// everything it sent before must arrive), or a reset (which may discard data in
    /// flight) when `reset`.
    ClientDies { reset: bool },
    /// The backend ends its TCP connection halfway, the same two ways.
    BackendDies { reset: bool },
    /// Both sides stream until wsbeat shuts down.
    Drained,
}

impl Ending {
    fn for_id(id: u64) -> Ending {
        match id % 6 {
            0 | 1 => Ending::ClientCloses,
            2 => Ending::BackendCloses,
            3 => Ending::ClientDies {
                reset: id % 12 == 3,
            },
            4 => Ending::BackendDies {
                reset: id % 12 == 4,
            },
            _ => Ending::BackendCloses,
        }
    }

    fn code(self) -> &'static str {
        match self {
            Ending::ClientCloses => "cc",
            Ending::BackendCloses => "bc",
            Ending::ClientDies { reset: false } => "cd",
            Ending::ClientDies { reset: true } => "cr",
            Ending::BackendDies { reset: false } => "bd",
            Ending::BackendDies { reset: true } => "br",
            Ending::Drained => "dr",
        }
    }

    fn parse(code: &str) -> Ending {
        match code {
            "cc" => Ending::ClientCloses,
            "bc" => Ending::BackendCloses,
            "cd" => Ending::ClientDies { reset: false },
            "cr" => Ending::ClientDies { reset: true },
            "bd" => Ending::BackendDies { reset: false },
            "br" => Ending::BackendDies { reset: true },
            "dr" => Ending::Drained,
            other => panic!("unknown ending {other}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Backend,
}

/// Messages a side sends in all (the drained connections send until stopped).
fn planned(id: u64, side: Side, ending: Ending) -> u64 {
    if ending == Ending::Drained {
        return u64::MAX;
    }
    let salt = if side == Side::Client { 7 } else { 13 };
    20 + (id * salt) % 80
}

/// Message `seq` from `side` on connection `id`: text or binary, of varied length, a
/// few over 32 KiB so that they span several of wsbeat's reads; every byte is derived
/// from (id, side, seq), so any corruption shows.
fn message(id: u64, side: Side, seq: u64) -> Message {
    let len = if seq % 40 == 17 {
        70_000
    } else {
        ((id * 31 + seq * 97) % 1500) as usize
    };
    let tag = if side == Side::Client { 'c' } else { 'b' };
    let head = format!("{id}:{tag}:{seq}:");
    let fill = (0..len).map(|i| b'a' + ((i as u64 + seq + id) % 26) as u8);
    if seq % 3 == 0 {
        let mut bytes = head.into_bytes();
        bytes.extend(fill.map(|b| b ^ 0x80));
        Message::binary(bytes)
    } else {
        let mut text = head;
        text.extend(fill.map(char::from));
        Message::text(text)
    }
}

/// What one side of one connection saw.
#[derive(Debug, Default)]
struct Tally {
    /// Messages whose send completed (flushed to the socket).
    sent: u64,
    /// Messages received, each checked to be the next one in sequence.
    received: u64,
    /// The close code received, if a close frame came.
    close: Option<CloseCode>,
}

/// The "done" message: the sender sent `n` messages and will send no more.
fn done(n: u64) -> Message {
    Message::text(format!("done {n}"))
}

fn parse_done(m: &Message) -> Option<u64> {
    m.to_text().ok()?.strip_prefix("done ")?.parse().ok()
}

/// Receives until the stream ends, checking every message: (received, close code).
async fn receive<S>(
    mut stream: SplitStream<WebSocketStream<S>>,
    id: u64,
    from: Side,
    peer_done: oneshot::Sender<()>,
    progress: Option<Arc<AtomicU64>>,
) -> (u64, Option<CloseCode>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut peer_done = Some(peer_done);
    let mut received = 0u64;
    let mut close = None;
    while let Some(Ok(m)) = stream.next().await {
        match m {
            Message::Close(frame) => close = Some(frame.map_or(CloseCode::Status, |f| f.code)),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            Message::Text(ref t) if t.as_str() == "--heartbeat--" => {}
            m => {
                if let Some(n) = parse_done(&m) {
                    assert_eq!(
                        n, received,
                        "conn {id}: done {n} after {received} from {from:?}"
                    );
                    if let Some(tx) = peer_done.take() {
                        let _ = tx.send(());
                    }
                    continue;
                }
                assert!(
                    m == message(id, from, received),
                    "conn {id}: message {received} from {from:?} is wrong or out of order"
                );
                received += 1;
                if let Some(p) = &progress {
                    p.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    (received, close)
}

/// One side of a connection: sends its messages while a task receives, then ends the
/// way `ending` says. Returns what it saw.
async fn run_side<S>(
    ws: WebSocketStream<S>,
    raw: std::net::TcpStream,
    id: u64,
    side: Side,
    ending: Ending,
    stop: Arc<tokio::sync::Notify>,
    progress: Arc<AtomicU64>,
) -> Tally
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = if side == Side::Client {
        Side::Backend
    } else {
        Side::Client
    };
    let (mut sink, stream): (SplitSink<_, Message>, _) = ws.split();
    let (peer_done_tx, peer_done) = oneshot::channel();
    // Only the drained connections' traffic is counted: the drain waits for it.
    let progress = (ending == Ending::Drained).then_some(progress);
    let mut receiver = tokio::spawn(receive(stream, id, peer, peer_done_tx, progress));
    let dies = matches!(
        (side, ending),
        (Side::Client, Ending::ClientDies { .. }) | (Side::Backend, Ending::BackendDies { .. })
    );
    let closes = matches!(
        (side, ending),
        (Side::Client, Ending::ClientCloses) | (Side::Backend, Ending::BackendCloses)
    );
    let plan = planned(id, side, ending);
    let stop_at = if dies { plan / 2 } else { plan };
    let stopped = stop.notified();
    tokio::pin!(stopped);
    let mut tally = Tally::default();
    // The drained connections stream at a pace (every 10 ms), not as fast as they can:
    // the test must not starve itself on a shared 2-core machine.
    let mut pace = tokio::time::interval(Duration::from_millis(10));
    while tally.sent < stop_at {
        if ending == Ending::Drained {
            pace.tick().await;
        }
        let next = message(id, side, tally.sent);
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            r = sink.send(next) => match r {
                Ok(()) => tally.sent += 1,
                // The other side is gone (or wsbeat closed): stop sending.
                Err(_) => break,
            },
        }
        // A send cancelled by `stop` is not counted, and nothing more is sent after it.
    }
    let reset = matches!(
        ending,
        Ending::ClientDies { reset: true } | Ending::BackendDies { reset: true }
    );
    if dies && reset {
        // Close the socket with a reset (SO_LINGER 0): no close frame, and the kernels
        // may throw away what is in flight.
        receiver.abort();
        drop(sink);
        let _ = (&mut receiver).await;
        return tally;
    }
    if dies {
        // A FIN without a close frame; go on reading until wsbeat drops the socket.
        raw.shutdown(std::net::Shutdown::Write).unwrap();
    }
    if tally.sent == stop_at && ending != Ending::Drained && !dies {
        let _ = sink.send(done(tally.sent)).await;
        if closes {
            // Close once the other side's messages have all arrived.
            tokio::time::timeout(PATIENCE, peer_done)
                .await
                .unwrap_or_else(|_| panic!("conn {id}: {side:?} never got the other's done"))
                .unwrap();
            let _ = sink
                .send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "".into(),
                })))
                .await;
        }
    }
    let (received, close) = tokio::time::timeout(PATIENCE, &mut receiver)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "conn {id} ({ending:?}): {side:?} never saw the end; sent {}",
                tally.sent
            )
        })
        .unwrap();
    tally.received = received;
    tally.close = close;
    tally
}

/// A second handle on `stream`'s socket, for ending it below the WebSocket library
/// (a FIN by `shutdown`, or a reset on close after SO_LINGER 0 when `reset`).
fn raw_handle(stream: TcpStream, reset: bool) -> (TcpStream, std::net::TcpStream) {
    if reset {
        stream.set_zero_linger().unwrap();
    }
    let std = stream.into_std().unwrap();
    let raw = std.try_clone().unwrap();
    (TcpStream::from_std(std).unwrap(), raw)
}

/// The backend: reads the connection's id and ending from the path, then plays its side.
async fn backend(
    listener: TcpListener,
    tallies: mpsc::UnboundedSender<(u64, Tally)>,
    stop: Arc<tokio::sync::Notify>,
    progress: Arc<AtomicU64>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        // Which ending is known only from the path: every backend socket gets a raw
        // handle, and a reset on close only when the ending asks for it (below).
        let (stream, raw) = raw_handle(stream, false);
        let (tallies, stop, progress) = (tallies.clone(), stop.clone(), progress.clone());
        tokio::spawn(async move {
            let (path_tx, path_rx) = std::sync::mpsc::channel();
            #[allow(clippy::result_large_err)] // the signature tungstenite asks for
            let callback =
                move |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
                    let _ = path_tx.send(req.uri().path().to_owned());
                    Ok(resp)
                };
            let ws = tokio_tungstenite::accept_hdr_async(stream, callback)
                .await
                .expect("wsbeat's handshake");
            let path = path_rx.recv().unwrap();
            let mut parts = path.trim_start_matches('/').split('/');
            let id: u64 = parts.next().unwrap().parse().unwrap();
            let ending = Ending::parse(parts.next().unwrap());
            if ending == (Ending::BackendDies { reset: true }) {
                ws.get_ref().set_zero_linger().unwrap();
            }
            let tally = run_side(ws, raw, id, Side::Backend, ending, stop, progress).await;
            let _ = tallies.send((id, tally));
        });
    }
}

/// The client side of connection `id`.
async fn client(
    addr: std::net::SocketAddr,
    id: u64,
    ending: Ending,
    stop: Arc<tokio::sync::Notify>,
    progress: Arc<AtomicU64>,
) -> (u64, Tally) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (stream, raw) = raw_handle(stream, ending == (Ending::ClientDies { reset: true }));
    let url = format!("ws://{addr}/{id}/{}", ending.code());
    let (ws, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::client_async(url, stream))
        .await
        .expect("handshake in time")
        .expect("handshake through wsbeat");
    (
        id,
        run_side(ws, raw, id, Side::Client, ending, stop, progress).await,
    )
}

/// Checks one connection's two tallies against how it ended.
fn check(id: u64, ending: Ending, client: &Tally, backend: &Tally) {
    let what = format!("conn {id} ({ending:?}): client {client:?}, backend {backend:?}");
    // Always: each side received at most what the other sent (the receivers checked
    // that what came is the prefix, in order, byte for byte).
    assert!(backend.received <= client.sent, "{what}");
    assert!(client.received <= backend.sent, "{what}");
    match ending {
        Ending::ClientCloses | Ending::BackendCloses => {
            assert_eq!(backend.received, client.sent, "{what}");
            assert_eq!(client.received, backend.sent, "{what}");
            assert_eq!(client.sent, planned(id, Side::Client, ending), "{what}");
            assert_eq!(backend.sent, planned(id, Side::Backend, ending), "{what}");
            assert_eq!(client.close, Some(CloseCode::Normal), "{what}");
            assert_eq!(backend.close, Some(CloseCode::Normal), "{what}");
        }
        // The survivor was told: 1001 for a vanished client, 1011 for a vanished backend.
        // After a FIN, wsbeat read everything up to it and passed all of it on. A reset
        // may cut a frame in half, and then no close frame can follow it on the other
        // leg: that leg ends without one (an abnormal closure, 1006), never with a
        // close frame written inside the cut frame (the receiver would have failed).
        Ending::ClientDies { reset } => {
            if reset {
                assert!(
                    matches!(backend.close, Some(CloseCode::Away) | None),
                    "{what}"
                );
            } else {
                assert_eq!(backend.close, Some(CloseCode::Away), "{what}");
                assert_eq!(backend.received, client.sent, "{what}");
            }
        }
        Ending::BackendDies { reset } => {
            if reset {
                assert!(
                    matches!(client.close, Some(CloseCode::Error) | None),
                    "{what}"
                );
            } else {
                assert_eq!(client.close, Some(CloseCode::Error), "{what}");
                assert_eq!(client.received, backend.sent, "{what}");
            }
        }
        Ending::Drained => {
            assert_eq!(client.close, Some(CloseCode::Away), "{what}");
            assert_eq!(backend.close, Some(CloseCode::Away), "{what}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_churn_every_message_arrives_once_in_order_or_the_connection_says_it_failed() {
    tokio::time::timeout(TEST_BOUND, churn())
        .await
        .expect("churn within its bound");
}

async fn churn() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let (tallies_tx, mut tallies) = mpsc::unbounded_channel();
    let stop = Arc::new(tokio::sync::Notify::new());
    let progress = Arc::new(AtomicU64::new(0));
    let backend_task = tokio::spawn(backend(
        listener,
        tallies_tx,
        stop.clone(),
        progress.clone(),
    ));
    let proxy = Proxy::start(upstream, |c| {
        c.heartbeat.interval = ms(50);
        c.upstream.connect_timeout = ms(30_000);
    })
    .await;
    let addr = proxy.addr;

    // Churn: CONNECTIONS connections, CONCURRENT at a time, every ending mixed.
    let slots = Arc::new(Semaphore::new(CONCURRENT));
    let mut clients = JoinSet::new();
    for id in 0..CONNECTIONS {
        let permit = slots.clone().acquire_owned().await.unwrap();
        let (stop, progress) = (stop.clone(), progress.clone());
        clients.spawn(async move {
            let result = client(addr, id, Ending::for_id(id), stop, progress).await;
            drop(permit);
            result
        });
    }
    // Then connections that are streaming when wsbeat drains.
    let mut drained = JoinSet::new();
    for id in CONNECTIONS..CONNECTIONS + DRAINED {
        let (stop, progress) = (stop.clone(), progress.clone());
        drained.spawn(client(addr, id, Ending::Drained, stop, progress));
    }
    let mut client_tallies = BTreeMap::new();
    while let Some(r) = clients.join_next().await {
        let (id, tally) = r.unwrap();
        client_tallies.insert(id, tally);
    }
    // Drain while messages flow on the drained connections: once they have carried
    // some traffic both ways (polled; the retry interval is no synchronisation).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while progress.load(Ordering::Relaxed) < DRAINED * 2 * 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the drained connections carry nothing"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.stop().await;
    stop.notify_waiters();
    while let Some(r) = drained.join_next().await {
        let (id, tally) = r.unwrap();
        client_tallies.insert(id, tally);
    }
    let mut backend_tallies = BTreeMap::new();
    while backend_tallies.len() < client_tallies.len() {
        let (id, tally) = tokio::time::timeout(PATIENCE, tallies.recv())
            .await
            .expect("every backend side ends")
            .unwrap();
        backend_tallies.insert(id, tally);
    }
    backend_task.abort();

    let mut by_ending: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for (id, client) in &client_tallies {
        let ending = if *id >= CONNECTIONS {
            Ending::Drained
        } else {
            Ending::for_id(*id)
        };
        let backend = &backend_tallies[id];
        check(*id, ending, client, backend);
        let entry = by_ending.entry(ending.code()).or_default();
        entry.0 += 1;
        entry.1 += client.received + backend.received;
    }
    eprintln!("FIGURES churn: connections and messages delivered by ending: {by_ending:?}");
}
