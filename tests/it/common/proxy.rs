//! wsbeat started in-process on port 0, and a tokio-tungstenite client through it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsbeat::config::{Config, HumanDuration};

use super::{HB, PATIENCE};

/// A client connected through wsbeat.
pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// wsbeat running in-process on 127.0.0.1:0; shuts down when dropped or on `stop`.
pub struct Proxy {
    pub addr: SocketAddr,
    /// The admin listener (`/metrics`, `/livez`, `/readyz`, `/connections`).
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Starts wsbeat in front of `upstream` with test-friendly defaults, after `tune`.
    pub async fn start(upstream: SocketAddr, tune: impl FnOnce(&mut Config)) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Proxy::start_on(listener, upstream, tune).await
    }

    /// Like `start`, on a listener the test bound itself (e.g. in a network namespace).
    pub async fn start_on(
        listener: TcpListener,
        upstream: SocketAddr,
        tune: impl FnOnce(&mut Config),
    ) -> Proxy {
        let mut config = Config::default();
        config.admin.listen = None;
        config.upstream.url = format!("ws://{upstream}").parse().unwrap();
        tune(&mut config);
        config.validate().expect("test config is valid");
        let tls = wsbeat::tls::Setup::load(&config).expect("test TLS files are usable");
        let addr = listener.local_addr().unwrap();
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = admin_listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(wsbeat::serve(
            Arc::new(config),
            tls,
            listener,
            Some(admin_listener),
            async {
                let _ = stopped.await;
            },
        ));
        Proxy {
            addr,
            admin,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Triggers shutdown and waits until wsbeat has drained.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("drain in time")
                .unwrap();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

pub fn ms(n: u64) -> HumanDuration {
    HumanDuration::millis(n)
}

/// Connects a tokio-tungstenite client through wsbeat.
pub async fn connect(url: &str) -> Client {
    tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect in time")
        .expect("handshake through wsbeat")
        .0
}

/// The next message the client receives, or a panic after PATIENCE.
pub async fn recv(client: &mut Client) -> Message {
    tokio::time::timeout(PATIENCE, client.next())
        .await
        .expect("message in time")
        .expect("stream open")
        .expect("no error")
}

/// The next data message, skipping heartbeats.
pub async fn recv_data(client: &mut Client, heartbeat: &str) -> Message {
    loop {
        match recv(client).await {
            Message::Text(t) if t.as_str() == heartbeat => continue,
            Message::Ping(_) | Message::Pong(_) => continue,
            m => return m,
        }
    }
}

/// Reads until the client receives a close frame; returns it.
pub async fn recv_close(client: &mut Client) -> Option<CloseFrame> {
    loop {
        match recv(client).await {
            Message::Close(frame) => return frame,
            _ => continue,
        }
    }
}

/// Echo helper: sends and expects the same message back (heartbeats skipped).
pub async fn echo_roundtrip(client: &mut Client, msg: Message) {
    client.send(msg.clone()).await.unwrap();
    assert_eq!(recv_data(client, HB).await, msg);
}

/// What a client received in a window of time.
#[derive(Debug, Default)]
pub struct Watched {
    /// When each heartbeat arrived.
    pub beats: Vec<Instant>,
    /// Data messages (text other than the heartbeat, binary).
    pub data: usize,
    /// PINGs.
    pub pings: usize,
}

/// Receives for `window` and tallies what arrives (the default heartbeat string).
pub async fn watch(client: &mut Client, window: Duration) -> Watched {
    let end = Instant::now() + window;
    let mut seen = Watched::default();
    while let Ok(msg) = tokio::time::timeout_at(end.into(), recv(client)).await {
        match msg {
            Message::Text(t) if t.as_str() == HB => seen.beats.push(Instant::now()),
            Message::Text(_) | Message::Binary(_) => seen.data += 1,
            Message::Ping(_) => seen.pings += 1,
            _ => {}
        }
    }
    seen
}
