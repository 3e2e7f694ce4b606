//! HTTP/2 on the client leg (`http2: true`): telling h2c prior knowledge from HTTP/1.1,
//! serving one HTTP/2 connection (SETTINGS, PINGs, GOAWAY on drain), and the RFC 8441
//! extended CONNECT that carries a WebSocket on one of its streams.
//!
//! A WebSocket stream is handled like an HTTP/1.1 upgrade (same checks, same relay); only
//! the handshake's shape differs: `CONNECT` with `:protocol websocket` and no
//! `Sec-WebSocket-Key`, answered `200`. The upstream leg stays HTTP/1.1.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::idle::{IdleClock, InFlight};
use super::{text, Body, Proxy, Runtime, TcpSlot};
use crate::handshake::MAX_REQUEST_HEAD;
use crate::tls::LegStream;

/// The client connection preface of RFC 9113 §3.4: an h2c client with prior knowledge
/// starts with it; no HTTP/1.1 request can.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How long to wait for more of a preface that came in pieces before peeking again.
const PREFACE_POLL: Duration = Duration::from_millis(5);

/// Whether a cleartext connection starts with the HTTP/2 preface, looked at without
/// taking it (hyper reads it again). `false` as soon as a byte differs (an HTTP/1.1
/// request), at EOF, or when the preface is not whole within `deadline` (the HTTP/1.1
/// server and its clocks then deal with the connection).
pub(super) async fn starts_with_preface(stream: &TcpStream, deadline: Duration) -> bool {
    let look = async {
        let mut buf = [0u8; PREFACE.len()];
        loop {
            let n = match stream.peek(&mut buf).await {
                Ok(n) => n,
                Err(_) => return false,
            };
            if n == 0 || buf[..n] != PREFACE[..n] {
                return false;
            }
            if n == PREFACE.len() {
                return true;
            }
            // A preface split across segments: rare; peek returns the same bytes until
            // more arrive, so wait a little rather than spin.
            tokio::time::sleep(PREFACE_POLL).await;
        }
    };
    tokio::time::timeout(deadline, look).await.unwrap_or(false)
}

/// An extended CONNECT (RFC 8441) for a WebSocket: `CONNECT` with `:protocol websocket`.
pub(super) fn is_websocket_connect<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// RFC 8441 §5 with RFC 6455 §4.2.1's version check: the extended CONNECT must name
/// version 13 (426 naming it otherwise); it carries no key (the stream is the proof).
#[allow(clippy::result_large_err)]
pub(super) fn check_connect<B>(req: &Request<B>) -> Result<(), hyper::Response<Body>> {
    let version = req.headers().get(header::SEC_WEBSOCKET_VERSION);
    if version.is_some_and(|v| v.as_bytes() == b"13") {
        return Ok(());
    }
    let mut r = text(
        StatusCode::UPGRADE_REQUIRED,
        "wsbeat: Sec-WebSocket-Version must be 13",
    );
    r.headers_mut().insert(
        header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
    Err(r)
}

/// What a request that came on an HTTP/2 stream carries to the code that answers it:
/// the stream's place on the connection's idle clock, held by a WebSocket for its life
/// (its response ends at once, its stream does not).
#[derive(Clone)]
pub(super) struct OnStream {
    _in_flight: Arc<InFlight>,
}

/// A WebSocket's client leg on an HTTP/2 stream: hyper's upgraded stream as tokio I/O.
pub(super) struct StreamIo {
    io: TokioIo<hyper::upgrade::Upgraded>,
    _on_stream: OnStream,
}

impl StreamIo {
    pub(super) fn new(upgraded: hyper::upgrade::Upgraded, on_stream: OnStream) -> StreamIo {
        StreamIo {
            io: TokioIo::new(upgraded),
            _on_stream: on_stream,
        }
    }
}

impl AsyncRead for StreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// RFC 9113 §8.3.1: a request passed on as HTTP/1.1 needs a `Host`; HTTP/2 carries it
/// as `:authority` (in the URI), which hyper does not copy into the headers.
fn host_from_authority(req: &mut Request<Incoming>) {
    if req.headers().contains_key(header::HOST) {
        return;
    }
    let host = req
        .uri()
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
    if let Some(host) = host {
        req.headers_mut().insert(header::HOST, host);
    }
}

impl Proxy {
    /// Serves one HTTP/2 client connection until it closes, its idle clock runs out, or
    /// a drain has sent GOAWAY and every stream has ended.
    pub(super) async fn serve_h2(
        self: Arc<Self>,
        stream: LegStream,
        addr: SocketAddr,
        slot: Arc<TcpSlot>,
        runtime: Arc<Runtime>,
    ) {
        let tls = matches!(stream, LegStream::Tls(_));
        let proxy = self.clone();
        let clock = IdleClock::new();
        let service = service_fn({
            let clock = clock.clone();
            move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(OnStream {
                    _in_flight: Arc::new(clock.begin_request()),
                });
                host_from_authority(&mut req);
                proxy.clone().serve_request(req, addr, tls, &slot, &clock)
            }
        });
        let config = &runtime.config;
        let (idle_timeout, handshake_timeout) = (
            config.limits.http_idle_timeout.0,
            config.limits.handshake_timeout.0,
        );
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .enable_connect_protocol()
            .max_concurrent_streams(config.limits.max_streams_per_connection)
            // The connection's own liveness: a peer that does not answer a PING within
            // `liveness.timeout` is gone with all its streams. Each WebSocket's relay
            // declares its client dead after `timeout` without a frame, before this
            // fires (hyper PINGs only after `ping_interval` without a read), so every
            // stream of a dead connection is counted `client_dead`.
            .keep_alive_interval(config.liveness.ping_interval.0)
            .keep_alive_timeout(config.liveness.timeout.0)
            .max_header_list_size(u32::try_from(MAX_REQUEST_HEAD).unwrap_or(u32::MAX))
            .serve_connection(TokioIo::new(stream), service);
        drop(runtime);
        tokio::pin!(conn);
        let expired = clock.expired(idle_timeout, handshake_timeout);
        tokio::pin!(expired);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = self.shutdown.cancelled() => {
                // GOAWAY: no new stream; the WebSockets under way get their 1001 from
                // their relays, and the connection ends with its last stream.
                conn.as_mut().graceful_shutdown();
                conn.await
            }
            _ = expired => {
                tracing::debug!(client = %addr, "HTTP/2 client connection closed: idle");
                conn.as_mut().graceful_shutdown();
                match tokio::time::timeout(handshake_timeout, conn).await {
                    Ok(r) => r,
                    Err(_) => return,
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(peer = %addr, error = %e, "HTTP/2 client connection ended with an error");
        }
    }
}
