//! The upstream connections of plain HTTP, driven by the task that uses them: no task per
//! connection, no hand-off between tasks per request (hyper-util's pooled client spawns a
//! task per connection and another per request, and passes each request, its response
//! head and its body between them and the client connection's task).
//!
//! A request takes the most recently idle connection of its route's pool (or opens one),
//! polls the connection itself while it waits for the response head, and the response
//! body polls it while it streams; once the body has ended, the connection goes back to
//! the pool. Idle connections are looked at every `pool_idle_timeout / 2` (at least
//! every 100 ms, at most every second): expired ones and those the backend closed are
//! dropped; one closed in between is seen, and skipped, when a request takes it.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::retry::{ClientBody, ConnectionUsage, UpstreamIo};

type Conn = http1::Connection<TokioIo<UpstreamIo>, ClientBody>;

/// One upstream connection and its sender.
pub(super) struct Upstream {
    send: http1::SendRequest<ClientBody>,
    conn: Conn,
    pub(super) usage: Arc<ConnectionUsage>,
}

struct Idle {
    upstream: Upstream,
    since: Instant,
}

pub(super) struct LocalPool {
    idle: Mutex<Vec<Idle>>,
    reaper: std::sync::atomic::AtomicBool,
    max_idle: usize,
    idle_timeout: Duration,
}

impl LocalPool {
    pub(super) fn new(max_idle: usize, idle_timeout: Duration) -> Arc<LocalPool> {
        Arc::new(LocalPool {
            idle: Mutex::new(Vec::new()),
            reaper: std::sync::atomic::AtomicBool::new(false),
            max_idle,
            idle_timeout,
        })
    }

    /// The most recently used idle connection that is still open, if any.
    pub(super) fn checkout(&self) -> Option<Upstream> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        // Expired ones go (they are at the front: the oldest).
        let expired = idle
            .iter()
            .take_while(|i| now.duration_since(i.since) >= self.idle_timeout)
            .count();
        idle.drain(..expired);
        while let Some(i) = idle.pop() {
            if !i.upstream.send.is_closed() {
                return Some(i.upstream);
            }
        }
        None
    }

    fn give_back(self: &Arc<Self>, upstream: Upstream) {
        if !self.reaper.swap(true, std::sync::atomic::Ordering::Relaxed) {
            // Started with the first idle connection (inside the runtime): closes the
            // idle connections that expired or that the backend closed.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let pool = Arc::downgrade(self);
                let tick = (self.idle_timeout / 2)
                    .clamp(Duration::from_millis(100), Duration::from_secs(1));
                rt.spawn(async move {
                    let mut every = tokio::time::interval(tick);
                    loop {
                        every.tick().await;
                        let Some(pool) = pool.upgrade() else { return };
                        pool.reap();
                    }
                });
            }
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push(Idle {
                upstream,
                since: Instant::now(),
            });
        }
    }
}

impl LocalPool {
    fn reap(&self) {
        let now = Instant::now();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain_mut(|i| {
            now.duration_since(i.since) < self.idle_timeout
                && Pin::new(&mut i.upstream.conn).poll(&mut cx).is_pending()
        });
    }
}

impl Upstream {
    pub(super) async fn handshake(io: TokioIo<UpstreamIo>) -> hyper::Result<Upstream> {
        let usage = io.inner().usage();
        let (send, conn) = http1::Builder::new().handshake(io).await?;
        Ok(Upstream { send, conn, usage })
    }

    /// Drives the connection until it takes a request; `false` when it has closed (the
    /// backend closed it while it sat idle): nothing was sent on it.
    pub(super) async fn ready(&mut self) -> bool {
        std::future::poll_fn(|cx| {
            // A finished connection future never lets its sender become ready: the
            // sender learns of the end only when the future is dropped.
            if Pin::new(&mut self.conn).poll(cx).is_ready() {
                return Poll::Ready(false);
            }
            self.send.poll_ready(cx).map(|r| r.is_ok())
        })
        .await
    }

    /// Sends `req` on this (ready) connection, driving it until the response head; the
    /// response's body drives it on and gives it back to `pool` at its end.
    pub(super) async fn send(
        self,
        req: Request<ClientBody>,
        pool: Arc<LocalPool>,
    ) -> hyper::Result<Response<UpstreamBody>> {
        let Upstream {
            mut send,
            conn,
            usage,
        } = self;
        let mut conn = Some(conn);
        let mut response = std::pin::pin!(send.send_request(req));
        let head = std::future::poll_fn(|cx| {
            if let Some(c) = conn.as_mut() {
                if Pin::new(c).poll(cx).is_ready() {
                    // Dropped: a request it had not taken gets its answer (canceled).
                    conn = None;
                }
            }
            response.as_mut().poll(cx)
        })
        .await?;
        let (parts, body) = head.into_parts();
        let upstream = conn.map(|conn| Upstream { send, conn, usage });
        Ok(Response::from_parts(
            parts,
            UpstreamBody {
                body,
                upstream,
                pool,
                ended: false,
            },
        ))
    }
}

/// A response body that drives its upstream connection, and gives it back to the pool
/// once the body has ended.
pub struct UpstreamBody {
    body: Incoming,
    upstream: Option<Upstream>,
    pool: Arc<LocalPool>,
    /// The body was read to its end: the connection may serve another request.
    ended: bool,
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if self.ended || self.body.is_end_stream() {
            if let Some(up) = self.upstream.take() {
                LocalPool::give_back(&self.pool, up);
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(up) = this.upstream.as_mut() {
            if Pin::new(&mut up.conn).poll(cx).is_ready() {
                this.upstream = None;
            }
        }
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.ended = true;
            if let Some(up) = this.upstream.as_mut() {
                // One more poll lets the dispatcher finish the exchange.
                if Pin::new(&mut up.conn).poll(cx).is_ready() {
                    this.upstream = None;
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
