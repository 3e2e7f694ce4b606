//! Shared test helpers: a real WebSocket backend that reports what it sees, wsbeat started
//! in-process on port 0, and clients.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderMap, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsbeat::config::{Config, HumanDuration};

/// A client connected through wsbeat.
pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Generous upper bound for anything a test waits for; reaching it fails the test.
pub const PATIENCE: Duration = Duration::from_secs(10);

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
        let addr = listener.local_addr().unwrap();
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = admin_listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(wsbeat::serve(
            Arc::new(config),
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

/// Sends a raw HTTP request and reads the response head and any body until the
/// connection closes or PATIENCE passes. Returns the whole response text.
pub async fn raw_http(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(PATIENCE, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                // Stop at the end of a response with a known length.
                let text = String::from_utf8_lossy(&buf);
                if let Some(head_end) = text.find("\r\n\r\n") {
                    let len = text[..head_end].lines().find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    });
                    if let Some(len) = len {
                        if buf.len() >= head_end + 4 + len {
                            break;
                        }
                    }
                }
            }
            Err(_) => panic!("no response in time"),
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// A valid upgrade request for `path`, as raw text.
pub fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Opens a WebSocket with a raw TCP client and returns the socket right after the 101,
/// for tests that need a peer that misbehaves below the WebSocket library.
pub async fn raw_websocket(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(upgrade_request(path).as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(PATIENCE, s.read(&mut byte))
            .await
            .expect("101 in time")
            .unwrap();
        assert_eq!(n, 1, "connection closed during handshake");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// A masked client frame (FIN set) with the given opcode and payload.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Echo helper: sends and expects the same message back (heartbeats skipped).
pub async fn echo_roundtrip(client: &mut Client, msg: Message) {
    client.send(msg.clone()).await.unwrap();
    assert_eq!(recv_data(client, "--heartbeat--").await, msg);
}

// ---------------------------------------------------------------------------------------
// The real binary as a child process (for RSS and "the process stays up" checks), and
// single samples from /metrics.

/// The `wsbeat` binary cargo built for these tests.
pub const WSBEAT_BIN: &str = env!("CARGO_BIN_EXE_wsbeat");

/// A `wsbeat` child process on 127.0.0.1:0 with its admin listener on 127.0.0.1:0; killed
/// when dropped, its config file removed.
pub struct WsbeatProcess {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// Removed when the process is dropped.
    config: TempConfig,
}

impl WsbeatProcess {
    /// Starts the binary in front of `upstream`; `extra_yaml` adds top-level keys
    /// (e.g. `"limits: { write_timeout: 1s }"`). Returns once both listeners are up.
    pub fn start(upstream: SocketAddr, extra_yaml: &str) -> WsbeatProcess {
        let config = write_temp_config(&format!(
            "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\n\
             upstream: {{ url: \"ws://{upstream}\" }}\n{extra_yaml}\n"
        ));
        let mut child = std::process::Command::new(WSBEAT_BIN)
            .arg("--config")
            .arg(config.path())
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the wsbeat binary starts");
        let mut log = std::io::BufReader::new(child.stderr.take().unwrap());
        let (mut addr, mut admin) = (None, None);
        while addr.is_none() || admin.is_none() {
            let mut line = String::new();
            let n = log.read_line(&mut line).unwrap();
            assert!(n > 0, "wsbeat exited before listening ({})", config.path());
            let Some(at) = line
                .split("addr=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.parse::<SocketAddr>().ok())
            else {
                continue;
            };
            if line.contains("admin listening") {
                admin = Some(at);
            } else if line.contains("listening") {
                addr = Some(at);
            }
        }
        // Keep draining the log so the process never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut log, &mut std::io::sink()));
        WsbeatProcess {
            child,
            addr: addr.unwrap(),
            admin: admin.unwrap(),
            config,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Resident set size in KiB, from /proc/PID/status.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("wsbeat is running");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Panics if the process has exited.
    pub fn assert_running(&mut self) {
        let status = self.child.try_wait().unwrap();
        assert!(status.is_none(), "wsbeat exited: {status:?}");
    }
}

/// A `wsbeat` process started with `--log-format json`, its log lines handed over as
/// parsed JSON as they come (a line that is not JSON fails the test). Killed when dropped.
pub struct JsonWsbeat {
    pub child: Child,
    pub lines: std::sync::mpsc::Receiver<serde_json::Value>,
}

impl Drop for JsonWsbeat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl JsonWsbeat {
    pub fn spawn(args: &[&str]) -> JsonWsbeat {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wsbeat"))
            .args(args)
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let value: serde_json::Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        JsonWsbeat { child, lines }
    }

    /// The next log line whose message is `message` (earlier lines are skipped).
    pub fn next(&mut self, message: &str) -> serde_json::Value {
        let mut skipped = Vec::new();
        loop {
            match self.lines.recv_timeout(PATIENCE) {
                Ok(v) if v["message"] == message => return v,
                Ok(v) => skipped.push(v),
                Err(e) => panic!(
                    "no log line {message:?} ({e}); wsbeat: {:?}; lines seen: {skipped:?}",
                    self.child.try_wait()
                ),
            }
        }
    }

    /// The address logged by the next line saying `message` ("listening", "admin listening").
    pub fn addr(&mut self, message: &str) -> SocketAddr {
        self.next(message)["addr"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Waits for the process to exit, at most `patience`.
    pub async fn exit_status(mut self, patience: Duration) -> std::process::ExitStatus {
        let status = tokio::task::spawn_blocking(move || self.child.wait().unwrap());
        tokio::time::timeout(patience, status)
            .await
            .expect("wsbeat exited in time")
            .unwrap()
    }

    /// Sends a signal (`TERM`, `INT`, `STOP` …) with kill(1).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// A config file under the target directory, removed when dropped.
pub struct TempConfig(std::path::PathBuf);

impl TempConfig {
    pub fn path(&self) -> &str {
        self.0.to_str().expect("UTF-8 target directory")
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes `text` to a fresh file for `--config`.
pub fn write_temp_config(text: &str) -> TempConfig {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let name = format!(
        "config-{}-{}.yaml",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, text).unwrap();
    TempConfig(path)
}

impl Drop for WsbeatProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One sample of a `/metrics` scrape: the value of `name` with exactly these labels, 0
/// when the series is not exported. A small reader of the text format, for tests that
/// check a counter or two (tests/metrics.rs checks the format itself).
pub async fn metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let request = "GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n";
    let response = raw_http(admin, request).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let mut want: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    want.sort();
    let body = &response[response.find("\r\n\r\n").expect("a head") + 4..];
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').expect("name and value");
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let mut got: Vec<(String, String)> = series_labels
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').expect("label=value");
                (k.to_owned(), v.trim_matches('"').to_owned())
            })
            .collect();
        got.sort();
        if got == want {
            return value.parse().expect("a number");
        }
    }
    0.0
}

/// Scrapes until `name{labels}` reaches at least `at_least`; panics after `patience`.
/// Returns the value seen.
pub async fn metric_at_least(
    admin: SocketAddr,
    name: &str,
    labels: &[(&str, &str)],
    at_least: f64,
    patience: Duration,
) -> f64 {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let v = metric(admin, name, labels).await;
        if v >= at_least {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}{labels:?} is {v}, waited {patience:?} for {at_least}"
        );
        // The retry interval of a poll bounded by `patience`, not a synchronisation.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The close code in the first close frame of a server's (unmasked) byte stream.
pub fn close_code_in(server_bytes: &[u8]) -> Option<u16> {
    let mut at = 0;
    while at + 2 <= server_bytes.len() {
        let opcode = server_bytes[at] & 0x0F;
        let (len, header) = match server_bytes[at + 1] & 0x7F {
            126 if at + 4 <= server_bytes.len() => (
                u16::from_be_bytes([server_bytes[at + 2], server_bytes[at + 3]]) as usize,
                4,
            ),
            127 if at + 10 <= server_bytes.len() => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&server_bytes[at + 2..at + 10]);
                (u64::from_be_bytes(b) as usize, 10)
            }
            n if n < 126 => (n as usize, 2),
            _ => return None,
        };
        let payload = server_bytes.get(at + header..at + header + len)?;
        if opcode == 0x8 {
            return payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
        }
        at += header + len;
    }
    None
}

/// What a raw upstream answers to a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawAnswer {
    /// A correct 101; then everything wsbeat sends is recorded until EOF.
    Accept,
    /// `403` with an empty body.
    Refuse,
}

/// What a raw upstream received on one connection: the request head as sent (up to and
/// including the blank line), and for an accepted WebSocket every byte after it.
#[derive(Debug)]
pub struct RawReceived {
    pub head: Vec<u8>,
    pub after: Vec<u8>,
}

/// An upstream on raw TCP that records exactly the bytes wsbeat sends it, for checks
/// below any WebSocket or HTTP library (header injection, frame boundaries).
pub async fn raw_upstream(answer: RawAnswer) -> (SocketAddr, mpsc::UnboundedReceiver<RawReceived>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut byte).await.unwrap_or(0) == 0 {
                        let _ = tx.send(RawReceived {
                            head,
                            after: Vec::new(),
                        });
                        return;
                    }
                    head.push(byte[0]);
                }
                let mut after = Vec::new();
                match answer {
                    RawAnswer::Refuse => {
                        let _ = s
                            .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
                            .await;
                    }
                    RawAnswer::Accept => {
                        let text = String::from_utf8_lossy(&head).into_owned();
                        let key = head_field(&text, "sec-websocket-key").expect("a key");
                        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(
                            key.as_bytes(),
                        );
                        let ok = format!(
                            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                             Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                        );
                        if s.write_all(ok.as_bytes()).await.is_ok() {
                            let _ = s.read_to_end(&mut after).await;
                        }
                    }
                }
                let _ = tx.send(RawReceived { head, after });
            });
        }
    });
    (addr, rx)
}

/// The value of header `name` (any case) in a raw HTTP head, trimmed.
pub fn head_field<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (field, value) = line.split_once(':')?;
        field
            .trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim())
    })
}

/// Runs tests/python/client.py (Python `websockets`, a client nobody here wrote) with
/// `args`, at most 30 s, and returns what it did.
pub async fn python_client_output(args: &[&str]) -> std::process::Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/client.py");
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3").arg(script).args(&args).output()
    });
    tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("python client done in 30 s")
        .unwrap()
        .expect("python3 runs (CI installs `websockets`)")
}

/// Runs tests/python/client.py and fails the test unless it exits 0 saying OK.
pub async fn python_client(args: &[&str]) {
    let out = python_client_output(args).await;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("OK"),
        "python client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
