//! Plain HTTP pass-through: a request that is not a WebSocket upgrade goes to its route's
//! upstream through a pooled client, bodies streamed both ways.

mod retry;

use std::collections::HashMap;
use std::error::Error as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::{IntCounter, IntCounterVec};
use tokio::net::TcpStream;

pub use self::retry::UpstreamIo;
use self::retry::{
    failed_on_stale_connection, may_retry, returned_unsent, unless_lost, ClientBody, Lost,
};

use crate::config::{Route, Routes, UpstreamConfig};
use crate::forwarding::{add_forwarding, append_via, copy_end_to_end, ClientInfo};
use crate::tls::{LegStream, UpstreamTls};

/// Idle upstream connections kept per upstream, ready for the next request.
const MAX_IDLE_PER_UPSTREAM: usize = 256;

/// One pooled HTTP client per route (each route has its own upstream and timeouts).
pub struct Passthrough {
    clients: HashMap<String, Arc<RouteClient>>,
}

/// The clients of one route.
struct RouteClient {
    /// What they were made for: a reload keeps them while this is unchanged.
    upstream: UpstreamConfig,
    /// Pooled: keep-alive connections, idle at most `upstream.pool_idle_timeout`.
    pooled: Client<UpstreamConnector, ClientBody>,
    /// Not pooled: every request on a new connection. Retries go here, because the
    /// pool may hold more connections the backend has closed (Node closes them all
    /// after the same 5 s).
    fresh: Client<UpstreamConnector, ClientBody>,
    /// `wsbeat_upstream_retries_total{route}`.
    retries: IntCounter,
}

/// Opens connections to one route's upstream: `ws://` → plain TCP, `wss://` → TLS with
/// the route's roots and server name. The request's URI is ignored: whatever a client
/// asks for, the connection goes to the configured upstream.
#[derive(Clone)]
pub struct UpstreamConnector {
    host: String,
    port: u16,
    connect_timeout: Duration,
    tls: Option<UpstreamTls>,
}

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = TokioIo<UpstreamIo>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<UpstreamIo>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let connect = TcpStream::connect((this.host.as_str(), this.port));
            let tcp = tokio::time::timeout(this.connect_timeout, connect)
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            let _ = tcp.set_nodelay(true);
            let stream = match &this.tls {
                None => LegStream::Plain(tcp),
                Some(tls) => {
                    let handshake = tls.connector.connect(tls.server_name.clone(), tcp);
                    let tls_stream = tokio::time::timeout(this.connect_timeout, handshake)
                        .await
                        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
                        .map_err(|e| std::io::Error::other(TlsFailed(e)))?;
                    tokio_rustls::TlsStream::Client(tls_stream).into()
                }
            };
            Ok(TokioIo::new(UpstreamIo::new(stream)))
        })
    }
}

/// Marks a failed TLS handshake with the upstream, so it is counted as `tls`.
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake with the upstream failed: {0}")]
struct TlsFailed(std::io::Error);

/// Why a request got no response from the upstream; decides the client's status and the
/// `reason` label of `wsbeat_upstream_errors_total`.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No response head within `request_timeout`, or no connection within
    /// `connect_timeout` (client gets 504).
    #[error("upstream {0} did not answer in time")]
    Timeout(String),
    /// The upstream's certificate or TLS handshake failed (client gets 502).
    #[error("upstream {upstream}: {reason}")]
    Tls { upstream: String, reason: String },
    /// The TCP connect failed (client gets 502).
    #[error("cannot connect to upstream {upstream}: {reason}")]
    Connect { upstream: String, reason: String },
    /// The exchange broke before the response head (client gets 502).
    #[error("upstream {upstream} failed the request: {reason}")]
    Http { upstream: String, reason: String },
}

impl ForwardError {
    /// The status the client gets, and the `reason` label of the upstream error counter.
    pub fn status_and_reason(&self) -> (StatusCode, &'static str) {
        match self {
            ForwardError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            ForwardError::Connect { .. } => (StatusCode::BAD_GATEWAY, "connect"),
            ForwardError::Tls { .. } => (StatusCode::BAD_GATEWAY, "tls"),
            ForwardError::Http { .. } => (StatusCode::BAD_GATEWAY, "http"),
        }
    }
}

impl Passthrough {
    /// `tls` holds the connector of every route with a `wss://` upstream; `retries` is
    /// `wsbeat_upstream_retries_total`.
    pub fn new(
        routes: &Routes,
        tls: &HashMap<String, UpstreamTls>,
        retries: &IntCounterVec,
    ) -> Self {
        Passthrough::reusing(None, routes, tls, retries)
    }

    /// The clients of a reloaded configuration. A route whose `ws://` upstream did not
    /// change keeps its pool (and its idle connections); the others get new ones.
    /// Requests in flight finish on the client they started on, which lives as long as
    /// they do. A `wss://` upstream always gets a new client: its connector is the new
    /// configuration's, whose CA is watched.
    pub fn renewed(
        &self,
        routes: &Routes,
        tls: &HashMap<String, UpstreamTls>,
        retries: &IntCounterVec,
    ) -> Self {
        Passthrough::reusing(Some(self), routes, tls, retries)
    }

    fn reusing(
        old: Option<&Passthrough>,
        routes: &Routes,
        tls: &HashMap<String, UpstreamTls>,
        retries: &IntCounterVec,
    ) -> Self {
        let clients = routes
            .all()
            .map(|route| {
                let kept = old
                    .and_then(|old| old.clients.get(&route.name))
                    .filter(|c| c.upstream == route.upstream && !route.upstream.url.secure);
                let client = match kept {
                    Some(client) => client.clone(),
                    None => Arc::new(RouteClient::new(route, tls, retries)),
                };
                (route.name.clone(), client)
            })
            .collect();
        Passthrough { clients }
    }

    /// Sends the request to the route's upstream and returns its response, whose body
    /// streams as the upstream sends it. A request that meets a pooled connection the
    /// backend has closed goes once more on a new connection when `retry::may_retry` allows.
    /// `drop_trailers`: the request came over HTTP/2; its trailers are dropped and
    /// counted there.
    pub async fn forward(
        &self,
        req: Request<Incoming>,
        info: ClientInfo,
        route: &Route,
        drop_trailers: Option<IntCounter>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let scheme = if route.upstream.url.secure {
            "https"
        } else {
            "http"
        };
        let upstream = format!("{scheme}://{}", route.upstream.url.authority());
        // Routes and clients come from one configuration: every route has its client.
        let Some(client) = self.clients.get(&route.name) else {
            return Err(ForwardError::Http {
                upstream,
                reason: format!("no client for route `{}`", route.name),
            });
        };
        let exchange = client.send(
            upstream_request(req, info, &upstream),
            route,
            &upstream,
            drop_trailers,
        );
        let response = match tokio::time::timeout(route.upstream.request_timeout.0, exchange).await
        {
            Err(_) => return Err(ForwardError::Timeout(upstream)),
            Ok(result) => result?,
        };
        let (parts, body) = response.into_parts();
        let mut out = Response::new(body);
        *out.status_mut() = parts.status;
        copy_end_to_end(&parts.headers, out.headers_mut());
        append_via(out.headers_mut());
        Ok(out)
    }
}

impl RouteClient {
    fn new(route: &Route, tls: &HashMap<String, UpstreamTls>, retries: &IntCounterVec) -> Self {
        let connector = UpstreamConnector {
            host: route.upstream.url.host.clone(),
            port: route.upstream.url.port,
            connect_timeout: route.upstream.connect_timeout.0,
            tls: tls.get(&route.name).cloned(),
        };
        let pooled = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(route.upstream.pool_idle_timeout.0)
            .pool_max_idle_per_host(MAX_IDLE_PER_UPSTREAM)
            // A request the pool returns unsent is sent again here, on a new connection
            // (`RouteClient::send`), not on another pooled one.
            .retry_canceled_requests(false)
            .build(connector.clone());
        let fresh = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_max_idle_per_host(0)
            .build(connector);
        RouteClient {
            upstream: route.upstream.clone(),
            pooled,
            fresh,
            retries: retries.with_label_values(&[&route.name]),
        }
    }

    /// One request through the pool, and once more on a new connection if the pooled one
    /// turned out stale and the request may be repeated, or if the pool gave it back
    /// unsent.
    async fn send(
        &self,
        req: Request<Incoming>,
        route: &Route,
        upstream: &str,
        drop_trailers: Option<IntCounter>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let (parts, body) = req.into_parts();
        let (body, slot) = ClientBody::new(body, drop_trailers.clone());
        let again = Request::from_parts(parts.clone(), ());
        let mut req = Request::from_parts(parts, body);
        let captured = hyper_util::client::legacy::connect::capture_connection(&mut req);
        // Why the request may go again, if it may: `unsent` when nothing of it reached
        // the upstream (sending it again is sending it once); otherwise the connection
        // was stale and may have had its head, and `may_retry` decides.
        let (unsent, why) = match unless_lost(self.pooled.request(req), captured).await {
            Ok(Ok(response)) => return Ok(response),
            Err(Lost) => (true, "a closing pooled connection lost the request unsent"),
            Ok(Err(e)) if returned_unsent(&e) => {
                (true, "a pooled connection closed before taking the request")
            }
            Ok(Err(e)) if failed_on_stale_connection(&e) => (
                false,
                "a reused upstream connection failed before the response",
            ),
            Ok(Err(e)) => return Err(classify(e, upstream)),
        };
        let (sent, body) = slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take_back();
        let Some(body) = body.filter(|_| unsent || may_retry(again.method(), sent)) else {
            tracing::debug!(route = %route.name, method = %again.method(), "{why}; the request cannot be repeated");
            return Err(ForwardError::Http {
                upstream: upstream.to_owned(),
                reason: why.to_owned(),
            });
        };
        tracing::debug!(route = %route.name, method = %again.method(), "{why}: sending it on a new connection");
        self.retries.inc();
        let (parts, ()) = again.into_parts();
        let (body, _) = ClientBody::new(body, drop_trailers);
        self.fresh
            .request(Request::from_parts(parts, body))
            .await
            .map_err(|e| classify(e, upstream))
    }
}

/// The request the upstream sees: the client's method, origin-form target and body, the
/// end-to-end headers and `Host` unchanged, `X-Forwarded-*` and `Via` added.
fn upstream_request(req: Request<Incoming>, info: ClientInfo, upstream: &str) -> Request<Incoming> {
    let (parts, body) = req.into_parts();
    // Only the path and query are taken from the client: an absolute-form target
    // (`GET http://elsewhere/`) never chooses where wsbeat connects.
    let target = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .filter(|pq| pq.starts_with('/'))
        .unwrap_or("/");
    let uri: Uri = format!("{upstream}{target}")
        .parse()
        .unwrap_or_else(|_| Uri::from_static("/"));
    let mut out = Request::new(body);
    *out.method_mut() = parts.method;
    *out.version_mut() = Version::HTTP_11;
    *out.uri_mut() = uri;
    let headers = out.headers_mut();
    copy_end_to_end(&parts.headers, headers);
    // wsbeat answers `Expect: 100-continue` itself (hyper sends the 100 when the body is
    // first read, i.e. once the upstream takes it); the upstream gets the body directly.
    headers.remove(header::EXPECT);
    add_forwarding(&parts.headers, info, headers);
    append_via(headers);
    out
}

/// Tells a connect timeout (504) from a refused connect (502) from a broken exchange.
fn classify(e: hyper_util::client::legacy::Error, upstream: &str) -> ForwardError {
    let mut source = e.source();
    let mut reason = e.to_string();
    while let Some(s) = source {
        reason = s.to_string();
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return ForwardError::Timeout(upstream.to_owned());
            }
            if let Some(tls) = io.get_ref().and_then(|e| e.downcast_ref::<TlsFailed>()) {
                return ForwardError::Tls {
                    upstream: upstream.to_owned(),
                    reason: tls.to_string(),
                };
            }
        }
        source = s.source();
    }
    if e.is_connect() {
        ForwardError::Connect {
            upstream: upstream.to_owned(),
            reason,
        }
    } else {
        ForwardError::Http {
            upstream: upstream.to_owned(),
            reason,
        }
    }
}

/// Why a request is refused before it is forwarded; the server renders it (405 with
/// `Allow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodRefusal {
    pub message: &'static str,
    /// The methods wsbeat forwards, for the `Allow` header.
    pub allow: &'static str,
}

/// Requests wsbeat never forwards: `CONNECT` would make it an open tunnel.
pub fn refuse_method(method: &Method) -> Option<MethodRefusal> {
    (method == Method::CONNECT).then_some(MethodRefusal {
        message: "wsbeat: CONNECT is not supported (wsbeat is a reverse proxy, not a tunnel)",
        allow: "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
    })
}
