//! `permessage-deflate` end to end (DESIGN §1.1, issue 18): the offer and the answer,
//! compressed frames forwarded byte for byte in both directions, wsbeat's heartbeats
//! uncompressed, a compressed client heartbeat recognised and dropped, RSV1 still refused
//! where RFC 7692 forbids it, `compression: off`; then the same with Python `websockets`
//! on both ends, and a client that keeps its compression window although told not to.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;
use miniz_oxide::deflate::core::{
    compress, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use wsbeat::config::Compression;
use wsbeat::frame::{self, OP_BINARY, OP_PING, OP_TEXT};

const CLIENT_OFFER: &str = "permessage-deflate; client_max_window_bits, x-webkit-deflate-frame";

/// One message compressed as a permessage-deflate sender does it, without context: raw
/// deflate, sync flush, the 4-byte tail removed.
pub(crate) fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = CompressorOxide::new(create_comp_flags_from_zip_params(6, -15, 0));
    let mut out = vec![0u8; data.len() + 64];
    let (_, _, n) = compress(&mut c, data, &mut out, TDEFLFlush::Sync);
    out.truncate(n - 4);
    out
}

/// A masked client frame with RSV1 set (a compressed message in one frame).
pub(crate) fn compressed_client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = client_frame(opcode, payload);
    f[0] |= 0x40;
    f
}

/// A server frame with RSV1 set.
fn compressed_server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    frame::encode(&mut f, opcode, payload, None);
    f[0] |= 0x40;
    f
}

/// An upstream on raw TCP that answers the handshake with `extensions` as its
/// `Sec-WebSocket-Extensions` (none when empty), sends `sends`, then hands over the
/// request head and the first `expect` bytes it receives (fewer if the connection ends),
/// and reads on until wsbeat closes the connection.
pub(crate) async fn deflating_upstream(
    extensions: &'static str,
    sends: Vec<u8>,
    expect: usize,
) -> (SocketAddr, mpsc::UnboundedReceiver<(String, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (tx, sends) = (tx.clone(), sends.clone());
            tokio::spawn(async move {
                let Some(head) = read_head(&mut s).await else {
                    return;
                };
                let head = String::from_utf8(head).unwrap();
                let key = head_field(&head, "sec-websocket-key").expect("a key");
                let accept =
                    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
                let ext = match extensions {
                    "" => String::new(),
                    e => format!("Sec-WebSocket-Extensions: {e}\r\n"),
                };
                let ok = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{ext}\r\n"
                );
                let mut got = Vec::new();
                let mut chunk = [0u8; 4096];
                if s.write_all(ok.as_bytes()).await.is_ok() && s.write_all(&sends).await.is_ok() {
                    while got.len() < expect {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => got.extend_from_slice(&chunk[..n]),
                        }
                    }
                }
                let _ = tx.send((head, got));
                // Stays open (and silent) until wsbeat closes it.
                while let Ok(1..) = s.read(&mut chunk).await {}
            });
        }
    });
    (addr, rx)
}

pub(crate) async fn next_upstream(
    rx: &mut mpsc::UnboundedReceiver<(String, Vec<u8>)>,
) -> (String, Vec<u8>) {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("the upstream got its bytes in time")
        .expect("the upstream is running")
}

/// An upgrade request offering `extensions`.
pub(crate) fn offering(extensions: &str) -> String {
    upgrade_request("/").replace(
        "\r\n\r\n",
        &format!("\r\nSec-WebSocket-Extensions: {extensions}\r\n\r\n"),
    )
}

/// Reads server frames from `s` until `done` says the frames so far are enough; returns
/// them as (first header byte, payload).
async fn read_frames(
    s: &mut TcpStream,
    done: impl Fn(&[(u8, Vec<u8>)]) -> bool,
) -> Vec<(u8, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while buf.len() >= 2 {
            let (len, at) = match buf[1] & 0x7F {
                126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
                126 | 127 => panic!("frames over 64 KiB are not expected here"),
                n => (usize::from(n), 2),
            };
            if buf.len() < at + len {
                break;
            }
            frames.push((buf[0], buf[at..at + len].to_vec()));
            buf.drain(..at + len);
        }
        if done(&frames) {
            return frames;
        }
        let n = tokio::time::timeout(PATIENCE, s.read(&mut chunk))
            .await
            .expect("frames arrive in time")
            .unwrap();
        assert!(
            n > 0,
            "wsbeat closed the connection; frames so far: {frames:?}"
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// DESIGN §1.1: the client's permessage-deflate offer goes upstream with
/// `client_no_context_takeover` added and nothing else; the upstream's answer comes back
/// with it added; compressed frames pass byte for byte both ways; wsbeat's heartbeats
/// are uncompressed; the client's compressed heartbeat is dropped.
#[tokio::test]
async fn passthrough_negotiates_end_to_end_and_forwards_compressed_frames_verbatim() {
    let from_upstream = compressed_server_frame(OP_TEXT, &deflate(b"{\"from\":\"upstream\"}"));
    let hello = compressed_client_frame(OP_TEXT, &deflate(b"hello, compressed"));
    // Invalid UTF-8 once inflated is the backend's to find: wsbeat cannot see it.
    let binary = compressed_client_frame(OP_BINARY, &deflate(&[0xff; 300]));
    let expected = [hello.clone(), binary.clone()].concat();
    let (upstream, mut received) = deflating_upstream(
        "permessage-deflate; server_no_context_takeover",
        from_upstream.clone(),
        expected.len(),
    )
    .await;
    let proxy = Proxy::start(upstream, |c| {
        c.heartbeat.interval = ms(100);
    })
    .await;
    let (mut client, head) = raw_head(proxy.addr, &offering(CLIENT_OFFER)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        head_field(&head, "sec-websocket-extensions"),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
        "{head}"
    );
    let heartbeat = compressed_client_frame(OP_TEXT, &deflate(HB.as_bytes()));
    let frames = [heartbeat, hello.clone(), binary].concat();
    client.write_all(&frames).await.unwrap();

    let (upstream_head, got) = next_upstream(&mut received).await;
    assert_eq!(
        head_field(&upstream_head, "sec-websocket-extensions"),
        Some("permessage-deflate; client_max_window_bits; client_no_context_takeover"),
        "{upstream_head}"
    );
    assert_eq!(
        got, expected,
        "the heartbeat dropped, the rest byte for byte"
    );

    // The upstream's compressed frame arrives as it was sent, and heartbeats with RSV1
    // clear (two, so that one certainly came after the compressed frame).
    let frames = read_frames(&mut client, |f| {
        f.iter().filter(|(b0, _)| *b0 == 0x81).count() >= 2 && f.iter().any(|(b0, _)| *b0 == 0xC1)
    })
    .await;
    let (b0, payload) = frames.iter().find(|(b0, _)| *b0 == 0xC1).unwrap();
    let mut wire = Vec::new();
    frame::encode(&mut wire, OP_TEXT, payload, None);
    wire[0] = *b0;
    assert_eq!(wire, from_upstream);
    for (b0, payload) in &frames {
        assert!(
            *b0 == 0xC1 || (*b0 == 0x81 && payload == HB.as_bytes()) || *b0 == 0x89,
            "unexpected frame {b0:#x} {payload:?}"
        );
    }
}

/// DESIGN §1.1: `compression: off` strips the offer; an upstream that accepts the
/// extension anyway gets the client a 502.
#[tokio::test]
async fn compression_off_strips_the_offer_and_refuses_an_upstream_that_compresses() {
    let (upstream, mut received) = deflating_upstream("", Vec::new(), 0).await;
    let proxy = Proxy::start(upstream, |c| c.compression = Compression::Off).await;
    let (_client, head) = raw_head(proxy.addr, &offering(CLIENT_OFFER)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        head_field(&head, "sec-websocket-extensions"),
        None,
        "{head}"
    );
    let (upstream_head, _) = next_upstream(&mut received).await;
    assert_eq!(
        head_field(&upstream_head, "sec-websocket-extensions"),
        None,
        "{upstream_head}"
    );

    let (upstream, _received) = deflating_upstream("permessage-deflate", Vec::new(), 0).await;
    let proxy = Proxy::start(upstream, |c| c.compression = Compression::Off).await;
    let response = raw_http(proxy.addr, &offering(CLIENT_OFFER)).await;
    assert!(response.starts_with("HTTP/1.1 502"), "{response}");
}

/// DESIGN §1.1: an upstream that accepts what was not offered gets the client a 502.
#[tokio::test]
async fn an_upstream_accepting_what_was_not_offered_gets_the_client_a_502() {
    for (offer, answer) in [
        (CLIENT_OFFER, "x-webkit-deflate-frame"),
        (CLIENT_OFFER, "permessage-deflate, permessage-deflate"),
        (CLIENT_OFFER, "permessage-deflate; server_max_window_bits=7"),
        (
            "permessage-deflate",
            "permessage-deflate; client_max_window_bits=10",
        ),
        ("x-webkit-deflate-frame", "permessage-deflate"),
    ] {
        let (upstream, _received) = deflating_upstream(answer, Vec::new(), 0).await;
        let proxy = Proxy::start(upstream, |_| {}).await;
        let response = raw_http(proxy.addr, &offering(offer)).await;
        assert!(
            response.starts_with("HTTP/1.1 502"),
            "{offer} / {answer}: {response}"
        );
    }
}

/// RFC 7692 §6.1: even on a compressed connection RSV1 is only for the first frame of a
/// data message; on a control or continuation frame the client gets 1002. Without the
/// extension negotiated, RSV1 is 1002 anywhere.
#[tokio::test]
async fn rsv1_where_rfc_7692_forbids_it_closes_the_client_with_1002() {
    let cases = [
        ("permessage-deflate", compressed_client_frame(OP_PING, b"p")),
        (
            "permessage-deflate",
            [
                compressed_client_frame(OP_TEXT, &deflate(b"a"))[..]
                    .iter()
                    .enumerate()
                    .map(|(i, b)| if i == 0 { b & 0x7F } else { *b })
                    .collect::<Vec<u8>>(),
                compressed_client_frame(frame::OP_CONTINUATION, b"b"),
            ]
            .concat(),
        ),
        ("", compressed_client_frame(OP_TEXT, &deflate(b"a"))),
    ];
    for (answer, frames) in cases {
        let (upstream, _received) = deflating_upstream(answer, Vec::new(), usize::MAX).await;
        let proxy = Proxy::start(upstream, |_| {}).await;
        let request = match answer {
            "" => upgrade_request("/"),
            _ => offering("permessage-deflate"),
        };
        let (mut client, head) = raw_head(proxy.addr, &request).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        client.write_all(&frames).await.unwrap();
        let got = read_until_closed(&mut client).await;
        assert_eq!(close_code_in(&got), Some(1002), "{answer:?}: {got:?}");
    }
}

/// tests/python/deflate_backend.py in a process of its own.
pub(crate) struct DeflateBackend {
    child: Child,
    /// Its report lines, read by a thread of their own (a pipe read blocks).
    reports: mpsc::UnboundedReceiver<String>,
    pub addr: SocketAddr,
}

impl DeflateBackend {
    /// Starts it with `flags` (`--busy`: it also sends a 1 KiB message every 20 ms;
    /// `--quiet`: no reports) and waits until it listens.
    pub fn start(flags: &[&str]) -> DeflateBackend {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/deflate_backend.py"
        );
        let mut cmd = Command::new("python3");
        cmd.args([script, "0"]).args(flags);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs (CI installs `websockets`)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = lines.next().expect("a line").unwrap();
        let port: u16 = line
            .strip_prefix("listening ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("deflate_backend.py did not start: {line:?}"));
        let (tx, reports) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        DeflateBackend {
            child,
            reports,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// The backend's report on the next connection that ended.
    async fn next_report(&mut self) -> Value {
        let line = tokio::time::timeout(PATIENCE, self.reports.recv())
            .await
            .expect("the backend reports in time")
            .expect("the backend is running");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }
}

impl Drop for DeflateBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn deflate_client(url: &str, mode: &str) -> String {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/deflate_client.py"
    );
    let args = [script.to_owned(), url.to_owned(), mode.to_owned()];
    let out = tokio::task::spawn_blocking(move || Command::new("python3").args(args).output());
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("python client done in 30 s")
        .unwrap()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Python `websockets` on both ends, compressing every message: negotiated end to end,
/// messages intact both ways, the client's compressed heartbeat never reaches the
/// backend, whose inflater never fails, and wsbeat's heartbeats reach the client.
#[ignore = "needs Python websockets: python3 -m pip install websockets"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_compressing_on_both_ends_through_wsbeat() {
    let mut backend = DeflateBackend::start(&[]);
    let proxy = Proxy::start(backend.addr, |c| c.heartbeat.interval = ms(200)).await;
    let out = deflate_client(&proxy.url("/"), "ok").await;
    assert!(out.starts_with("OK permessage-deflate"), "{out}");
    let report = backend.next_report().await;
    assert!(
        report["offer"]
            .as_str()
            .unwrap()
            .contains("client_no_context_takeover"),
        "{report}"
    );
    assert_eq!(report["heartbeats"], 0, "{report}");
    assert_eq!(report["messages"], 18, "{report}");
    assert_eq!(report["error"], Value::Null, "{report}");
    assert_eq!(report["close_rcvd"][0], 4002, "{report}");
}

/// A client that compresses with context takeover although told not to: the backend's
/// inflater fails, the backend closes with its own code, and wsbeat forwards that close
/// unchanged (and keeps running).
#[ignore = "needs Python websockets: python3 -m pip install websockets"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_keeping_its_window_gets_the_backends_own_close() {
    let mut backend = DeflateBackend::start(&[]);
    let proxy = Proxy::start(backend.addr, |c| c.heartbeat.interval = ms(200)).await;
    let out = deflate_client(&proxy.url("/"), "takeover").await;
    let report = backend.next_report().await;
    let sent = &report["close_sent"];
    assert!(sent[0].as_u64().is_some(), "the backend closed: {report}");
    // The backend's inflater failed (websockets: 1002 "decompression failed"), not wsbeat.
    assert!(report["error"].as_str().is_some(), "{report}");
    assert_eq!(
        out.trim(),
        format!("CLOSED {} {}", sent[0], sent[1].as_str().unwrap()),
        "{report}"
    );
    // wsbeat is still up: a well-behaved client gets through.
    let out = deflate_client(&proxy.url("/"), "ok").await;
    assert!(out.starts_with("OK"), "{out}");
}
