//! Test backends: a tokio-tungstenite echo backend that reports what it sees, and
//! scripted ones for tests that need a backend doing one specific thing.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderMap, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::PATIENCE;

/// What the backend saw, in order, per connection (numbered from 0).
#[derive(Debug)]
pub enum Seen {
    Handshake {
        conn: usize,
        path: String,
        headers: HeaderMap,
    },
    Message {
        conn: usize,
        msg: Message,
    },
    Closed {
        conn: usize,
        frame: Option<CloseFrame>,
    },
    /// The connection ended without a close frame (reset or EOF).
    Dropped {
        conn: usize,
    },
}

/// How the test backend behaves.
#[derive(Clone, Default)]
pub struct BackendBehaviour {
    /// Send `tick N` every period, this many times (after the handshake).
    pub ticks: Option<(Duration, usize)>,
    /// Refuse every handshake with this status and body.
    pub refuse: Option<(u16, &'static str)>,
    /// Do not echo messages back.
    pub no_echo: bool,
    /// Send `burst N` for N in 1..=this right after the handshake, as fast as possible.
    pub burst: usize,
}

/// A real tokio-tungstenite backend on 127.0.0.1:0.
pub struct Backend {
    pub addr: SocketAddr,
    pub seen: mpsc::UnboundedReceiver<Seen>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start(behaviour: BackendBehaviour) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, seen) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut conn = 0;
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(backend_connection(
                    stream,
                    conn,
                    behaviour.clone(),
                    tx.clone(),
                ));
                conn += 1;
            }
        });
        Backend { addr, seen, task }
    }

    pub async fn echo() -> Backend {
        Backend::start(BackendBehaviour::default()).await
    }

    /// The next event, or a panic after PATIENCE.
    pub async fn next(&mut self) -> Seen {
        tokio::time::timeout(PATIENCE, self.seen.recv())
            .await
            .expect("backend saw nothing in time")
            .expect("backend gone")
    }

    /// Asserts that the next event after the handshake is `expected`, received.
    pub async fn expect_message(&mut self, expected: Message) {
        match self.next_after_handshake().await {
            Seen::Message { msg, .. } => assert_eq!(msg, expected),
            other => panic!("expected {expected:?}, the backend saw {other:?}"),
        }
    }

    /// Asserts that the backend's next event after the handshake is a close with `code`.
    pub async fn expect_close(&mut self, code: CloseCode) {
        match self.next_after_handshake().await {
            Seen::Closed { frame: Some(f), .. } => assert_eq!(f.code, code),
            other => panic!("expected close {code:?}, the backend saw {other:?}"),
        }
    }

    /// The next event that is not a handshake.
    pub async fn next_after_handshake(&mut self) -> Seen {
        loop {
            match self.next().await {
                Seen::Handshake { .. } => continue,
                other => return other,
            }
        }
    }
}

async fn backend_connection(
    stream: TcpStream,
    conn: usize,
    behaviour: BackendBehaviour,
    tx: mpsc::UnboundedSender<Seen>,
) {
    let refuse = behaviour.refuse;
    let tx2 = tx.clone();
    #[allow(clippy::result_large_err)] // the signature tungstenite asks for
    let callback = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default();
        let _ = tx2.send(Seen::Handshake {
            conn,
            path,
            headers: req.headers().clone(),
        });
        if let Some((status, body)) = refuse {
            let mut r = ErrorResponse::new(Some(body.to_owned()));
            *r.status_mut() = StatusCode::from_u16(status).unwrap();
            r.headers_mut()
                .insert("x-backend", HeaderValue::from_static("refused"));
            return Err(r);
        }
        // Choose the last subprotocol offered, to prove the choice is the backend's.
        if let Some(offered) = req.headers().get("sec-websocket-protocol") {
            let last = offered
                .to_str()
                .unwrap()
                .split(',')
                .next_back()
                .unwrap()
                .trim();
            resp.headers_mut()
                .insert("sec-websocket-protocol", last.parse().unwrap());
        }
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    for i in 1..=behaviour.burst {
        if ws.feed(Message::text(format!("burst {i}"))).await.is_err() {
            return;
        }
    }
    if ws.flush().await.is_err() {
        return;
    }
    let mut ticks_left = behaviour.ticks.map_or(0, |(_, n)| n);
    let period = behaviour
        .ticks
        .map_or(Duration::from_secs(3600), |(p, _)| p);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut tick = 0;
    loop {
        tokio::select! {
            _ = ticker.tick(), if ticks_left > 0 => {
                ticks_left -= 1;
                tick += 1;
                if ws.send(Message::text(format!("tick {tick}"))).await.is_err() {
                    break;
                }
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Close(frame))) => {
                    let _ = tx.send(Seen::Closed { conn, frame });
                    // Let tungstenite finish the close handshake.
                    while let Some(Ok(_)) = ws.next().await {}
                    break;
                }
                Some(Ok(msg)) => {
                    let echo = (msg.is_text() || msg.is_binary()) && !behaviour.no_echo;
                    let _ = tx.send(Seen::Message { conn, msg: msg.clone() });
                    if echo && ws.send(msg).await.is_err() {
                        break;
                    }
                }
                Some(Err(_)) | None => {
                    let _ = tx.send(Seen::Dropped { conn });
                    break;
                }
            }
        }
    }
}

/// A backend that serves one WebSocket with `script`: for tests that need a backend
/// doing one specific thing (closing with a code, vanishing, sending fragments).
pub async fn scripted_backend<F, Fut>(script: F) -> SocketAddr
where
    F: FnOnce(WebSocketStream<TcpStream>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        script(ws).await;
    });
    addr
}

/// A backend that closes with `code` and `reason` when a client sends "close please".
pub async fn closing_backend(code: CloseCode, reason: &'static str) -> SocketAddr {
    scripted_backend(move |mut ws| async move {
        while let Some(Ok(m)) = ws.next().await {
            if m == Message::text("close please") {
                let frame = CloseFrame {
                    code,
                    reason: reason.into(),
                };
                ws.close(Some(frame)).await.unwrap();
            }
        }
    })
    .await
}
