//! Talking below any WebSocket or HTTP library: one raw HTTP/1.1 client, raw WebSocket
//! frames (encoded by wsbeat's own encoder), a close-code scanner, and a raw upstream that
//! records exactly the bytes wsbeat sends it.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use wsbeat::frame::{self, OP_CLOSE};

use super::PATIENCE;

// ---------------------------------------------------------------------------------------
// HTTP/1.1 over a raw socket.

/// A response as it came off the wire: the head (status line and fields, without the blank
/// line) and the body, de-chunked.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl RawResponse {
    /// The value of header `name` (any case), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        head_field(&self.head, name)
    }

    /// The whole response as text: head, blank line, body.
    pub fn text(&self) -> String {
        format!("{}\r\n\r\n{}", self.head, self.body)
    }
}

fn invalid(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

/// Sends `request` as it is on a new connection and reads the response head, then the body
/// as its framing says (`Content-Length`, chunked, or until the peer closes). Errors are
/// returned: a refused connection is an answer in some tests.
pub async fn try_raw_request(addr: SocketAddr, request: &str) -> std::io::Result<RawResponse> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(request.as_bytes()).await?;
    tokio::time::timeout(PATIENCE, read_response(&mut s))
        .await
        .map_err(|_| invalid(format!("no complete response in time to {request:?}")))?
}

async fn read_response(s: &mut TcpStream) -> std::io::Result<RawResponse> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(invalid(format!(
                "closed before a response head: {:?}",
                String::from_utf8_lossy(&buf)
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|_| head.starts_with("HTTP/1.1 "))
        .ok_or_else(|| invalid(format!("bad status line: {head}")))?;
    let mut raw = buf.split_off(head_end + 4);
    let content_length = head_field(&head, "content-length")
        .map(|v| v.parse::<usize>())
        .transpose()
        .map_err(|e| invalid(format!("bad Content-Length: {e}")))?;
    let chunked = head_field(&head, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let body = if status / 100 == 1 || status == 204 || status == 304 {
        Vec::new()
    } else if chunked {
        loop {
            if let Some(body) = dechunk(&raw)? {
                break body;
            }
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Err(invalid("closed inside a chunked body".into()));
            }
            raw.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(len) = content_length {
        while raw.len() < len {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Err(invalid(format!(
                    "Content-Length {len} but {} bytes",
                    raw.len()
                )));
            }
            raw.extend_from_slice(&chunk[..n]);
        }
        raw
    } else {
        s.read_to_end(&mut raw).await?;
        raw
    };
    Ok(RawResponse {
        status,
        head,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A chunked body's content once the terminating chunk has arrived; `None` before.
fn dechunk(mut raw: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&raw[..line_end]).unwrap_or("");
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Ok(Some(body));
        }
        if raw.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// `try_raw_request` that fails the test on an error.
pub async fn raw_request(addr: SocketAddr, request: &str) -> RawResponse {
    try_raw_request(addr, request)
        .await
        .unwrap_or_else(|e| panic!("{request:?} to {addr}: {e}"))
}

/// The whole response to `request` as text (head, blank line, body).
pub async fn raw_http(addr: SocketAddr, request: &str) -> String {
    raw_request(addr, request).await.text()
}

/// `GET path` with `Connection: close`.
pub async fn get(addr: SocketAddr, path: &str) -> RawResponse {
    raw_request(addr, &get_request(addr, path)).await
}

/// The text of `GET path` with `Connection: close`.
pub fn get_request(addr: SocketAddr, path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
}

/// Sends `request` on a new connection and reads only the response head (up to the blank
/// line); the socket stays open for whatever follows (a WebSocket after a 101).
pub async fn raw_head(addr: SocketAddr, request: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let head = tokio::time::timeout(PATIENCE, read_head(&mut s))
        .await
        .expect("a response head in time")
        .expect("a whole response head before the connection closed");
    (s, String::from_utf8(head).unwrap())
}

/// Reads an HTTP head byte by byte, up to and including the blank line, so that nothing
/// after it is consumed. `None` if the peer closes first.
pub async fn read_head(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.unwrap_or(0) == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(head)
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

// ---------------------------------------------------------------------------------------
// WebSockets below the library.

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
    let (s, head) = raw_head(addr, &upgrade_request(path)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// Reads what the peer sends until it closes the connection (or PATIENCE passes).
pub async fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(PATIENCE, s.read(&mut chunk))
            .await
            .expect("the peer closes the connection in time")
        {
            Ok(0) | Err(_) => return buf,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

const CLIENT_MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

/// A masked client frame with FIN set, encoded by `wsbeat::frame::encode`.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    frame::encode(&mut f, opcode, payload, Some(CLIENT_MASK));
    f
}

/// A masked client frame with FIN clear: a fragment that more frames must follow.
pub fn client_fragment(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = client_frame(opcode, payload);
    f[0] &= 0x7F;
    f
}

/// Sends the first half of a 64 KiB binary client frame: a client that stops (or
/// vanishes) in the middle of a frame. Returns the half sent.
pub async fn send_half_frame(raw: &mut TcpStream) -> Vec<u8> {
    let frame = client_frame(frame::OP_BINARY, &[0x5a; 64 * 1024]);
    let half = frame[..frame.len() / 2].to_vec();
    raw.write_all(&half).await.unwrap();
    half
}

/// The close code in the first close frame of a byte stream of frames, masked (what
/// wsbeat sent an upstream) or not (what it sent a client). `None` if there is no close
/// frame with a code.
pub fn close_code_in(bytes: &[u8]) -> Option<u16> {
    let mut at = 0;
    while at + 2 <= bytes.len() {
        let (len, mut header) = match bytes[at + 1] & 0x7F {
            126 => (
                usize::from(u16::from_be_bytes([
                    *bytes.get(at + 2)?,
                    *bytes.get(at + 3)?,
                ])),
                4,
            ),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(bytes.get(at + 2..at + 10)?);
                (usize::try_from(u64::from_be_bytes(b)).ok()?, 10)
            }
            n => (usize::from(n), 2),
        };
        let mask = if bytes[at + 1] & 0x80 != 0 {
            let m = bytes.get(at + header..at + header + 4)?;
            header += 4;
            [m[0], m[1], m[2], m[3]]
        } else {
            [0; 4]
        };
        let payload = bytes.get(at + header..at + header + len)?;
        if bytes[at] & 0x0F == OP_CLOSE {
            let code = payload.get(..2)?;
            return Some(u16::from_be_bytes([code[0] ^ mask[0], code[1] ^ mask[1]]));
        }
        at += header + len;
    }
    None
}

// ---------------------------------------------------------------------------------------
// An upstream on raw TCP.

/// What a raw upstream recorded on its next connection, once that connection ended;
/// fails the test after PATIENCE.
pub async fn next_received(received: &mut mpsc::UnboundedReceiver<RawReceived>) -> RawReceived {
    tokio::time::timeout(PATIENCE, received.recv())
        .await
        .expect("the upstream's connection ends in time")
        .expect("the raw upstream is running")
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
                let Some(head) = read_head(&mut s).await else {
                    let _ = tx.send(RawReceived {
                        head: Vec::new(),
                        after: Vec::new(),
                    });
                    return;
                };
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

#[test]
fn dechunk_reassembles_a_chunked_body_and_waits_for_its_end() {
    assert_eq!(
        dechunk(b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n").unwrap(),
        Some(b"hello world".to_vec())
    );
    assert_eq!(dechunk(b"5\r\nhel").unwrap(), None);
    assert!(dechunk(b"zz\r\n").is_err());
}

#[test]
fn close_code_in_reads_masked_and_unmasked_streams() {
    let mut server = Vec::new();
    frame::encode(&mut server, frame::OP_TEXT, &[b'x'; 300], None);
    frame::encode(
        &mut server,
        OP_CLOSE,
        &frame::close_payload(1001, "bye"),
        None,
    );
    assert_eq!(close_code_in(&server), Some(1001));
    let client = [
        client_frame(frame::OP_PING, b"p"),
        client_frame(OP_CLOSE, &4000u16.to_be_bytes()),
    ]
    .concat();
    assert_eq!(close_code_in(&client), Some(4000));
    assert_eq!(
        close_code_in(&client_frame(frame::OP_TEXT, b"no close")),
        None
    );
}
