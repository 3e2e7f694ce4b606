//! When a plain HTTP request may go again: what an upstream connection carried, and how
//! much of a request's body the upstream took, told apart without buffering anything.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::Method;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::tls::LegStream;

/// One upstream connection, with a record of what it has carried.
pub struct UpstreamIo {
    stream: LegStream,
    usage: Arc<ConnectionUsage>,
}

impl UpstreamIo {
    /// A connection just opened: it has carried nothing yet.
    pub fn new(stream: LegStream) -> UpstreamIo {
        UpstreamIo {
            stream,
            usage: Arc::default(),
        }
    }
}

impl UpstreamIo {
    /// What this connection carries, seen from outside it.
    pub(super) fn usage(&self) -> Arc<ConnectionUsage> {
        self.usage.clone()
    }
}

/// What one upstream connection has carried, shared with the requests sent on it, so that
/// a request that fails can tell whether any byte of its response had arrived.
///
/// HTTP/1.1 without pipelining alternates: a request is written, its response read,
/// then the next request is written. So the first write after response bytes starts the
/// next exchange.
#[derive(Debug, Default)]
pub(super) struct ConnectionUsage {
    /// Exchanges begun on this connection, the current one included.
    exchanges: AtomicU32,
    /// Response bytes read in the current exchange.
    read_in_exchange: AtomicU64,
}

impl ConnectionUsage {
    /// A write is about to start (whether or not a byte gets through).
    fn on_write(&self) {
        if self.exchanges.load(Ordering::Relaxed) == 0
            || self.read_in_exchange.load(Ordering::Relaxed) > 0
        {
            self.exchanges.fetch_add(1, Ordering::Relaxed);
            self.read_in_exchange.store(0, Ordering::Relaxed);
        }
    }

    fn on_read(&self, n: usize) {
        self.read_in_exchange.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The connection served an earlier exchange, and nothing of the current response
    /// has arrived: the signature of a connection the backend closed while it sat idle
    /// in the pool.
    pub(super) fn stale(&self) -> bool {
        self.exchanges.load(Ordering::Relaxed) >= 2
            && self.read_in_exchange.load(Ordering::Relaxed) == 0
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        this.usage.on_read(buf.filled().len() - before);
        polled
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if !buf.is_empty() {
            this.usage.on_write();
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if bufs.iter().any(|b| !b.is_empty()) {
            this.usage.on_write();
        }
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The client's request body on its way upstream. It stays in a shared slot until the
/// upstream connection takes its first frame, so a request whose body the upstream never
/// took can be sent again, whole, on another connection, without buffering anything.
pub(super) struct ClientBody {
    slot: Arc<Mutex<BodySlot>>,
    end_stream: bool,
    size_hint: SizeHint,
    /// For a request that came over HTTP/2: its trailers are dropped (HTTP/1.1 carries
    /// them only in a chunked body the upstream agreed to) and counted here.
    drop_trailers: Option<IntCounter>,
}

pub(super) struct BodySlot {
    body: Option<Incoming>,
    /// The client sent no body at all (`Content-Length: 0` or none).
    empty: bool,
    /// The upstream connection got a frame, or the body's end: the body went, at least
    /// in part, and cannot be sent again.
    handed: bool,
}

impl BodySlot {
    /// What the upstream connection took, and the body back if it is whole.
    pub(super) fn take_back(&mut self) -> (BodySent, Option<Incoming>) {
        let sent = if self.empty {
            BodySent::Empty
        } else if self.handed {
            BodySent::Some
        } else {
            BodySent::Nothing
        };
        (sent, self.body.take())
    }
}

impl ClientBody {
    pub(super) fn new(
        body: Incoming,
        drop_trailers: Option<IntCounter>,
    ) -> (ClientBody, Arc<Mutex<BodySlot>>) {
        use hyper::body::Body as _;
        let end_stream = body.is_end_stream();
        let size_hint = body.size_hint();
        let slot = Arc::new(Mutex::new(BodySlot {
            body: Some(body),
            empty: end_stream,
            handed: false,
        }));
        let body = ClientBody {
            slot: slot.clone(),
            end_stream,
            size_hint,
            drop_trailers,
        };
        (body, slot)
    }
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(body) = slot.body.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(body).poll_frame(cx);
        if polled.is_ready() {
            slot.handed = true;
        }
        if let (Poll::Ready(Some(Ok(frame))), Some(dropped)) = (&polled, &self.drop_trailers) {
            if frame.is_trailers() {
                // Trailers are the body's last frame: it ends here.
                dropped.inc();
                slot.body = None;
                return Poll::Ready(None);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.end_stream
    }

    fn size_hint(&self) -> SizeHint {
        self.size_hint
    }
}

/// How much of a request's body an upstream connection took before it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BodySent {
    /// The request has no body: it went whole with its head.
    Empty,
    /// The upstream never took a byte of a body it was told to expect: it cannot have
    /// acted on the request, and the body is still here to send again.
    Nothing,
    /// Some of the body went: it cannot be sent again without having been buffered.
    Some,
}

/// Whether a request that failed on a stale pooled connection may go again on a new one
/// (RFC 9110 §9.2.2; nginx's `proxy_next_upstream` does the same):
/// - a bodyless request with an idempotent method (GET, HEAD, OPTIONS, TRACE, PUT,
///   DELETE): sending it twice has the effect of sending it once;
/// - any request whose body the upstream never took: it never had the whole request;
/// - never one whose body was (partly) sent, and never a bodyless request with another
///   method (a bodyless POST may have been acted on; a proxy must not repeat it).
pub(super) fn may_retry(method: &Method, body: BodySent) -> bool {
    match body {
        BodySent::Empty => method.is_idempotent(),
        BodySent::Nothing => true,
        BodySent::Some => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_cannot_have_been_acted_on_twice_is_repeated() {
        for method in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            assert!(may_retry(&method, BodySent::Empty), "{method}");
            assert!(may_retry(&method, BodySent::Nothing), "{method}");
            assert!(!may_retry(&method, BodySent::Some), "{method}");
        }
        for method in [Method::POST, Method::PATCH] {
            assert!(!may_retry(&method, BodySent::Empty), "{method}");
            assert!(may_retry(&method, BodySent::Nothing), "{method}");
            assert!(!may_retry(&method, BodySent::Some), "{method}");
        }
    }

    #[test]
    fn a_connection_is_stale_when_reused_and_silent() {
        let usage = ConnectionUsage::default();
        usage.on_write(); // first request
        assert!(!usage.stale(), "a new connection is not stale");
        usage.on_write(); // its body
        usage.on_read(100); // its response
        assert!(!usage.stale());
        usage.on_write(); // second request: reused
        assert!(usage.stale(), "reused, nothing of the response yet");
        usage.on_read(1);
        assert!(!usage.stale(), "part of the response arrived");
    }
}
