//! Plain HTTP pass-through: a request that is not a WebSocket upgrade goes to its route's
//! upstream over a pooled keep-alive connection, bodies streamed both ways.

mod local;
mod retry;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header;
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use prometheus::{IntCounter, IntCounterVec};
use tokio::net::TcpStream;

use self::local::LocalPool;
pub use self::local::UpstreamBody;
pub use self::retry::UpstreamIo;
use self::retry::{may_retry, ClientBody};

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
    /// `wsbeat_upstream_retries_total{route}`.
    retries: IntCounter,
    /// Idle keep-alive connections, at most `upstream.pool_idle_timeout` each. A request
    /// retried after a stale one goes on a new connection, not on another pooled one
    /// (the pool may hold more that the backend has closed: Node closes them all after
    /// the same 5 s).
    pool: Arc<LocalPool>,
    connector: UpstreamConnector,
    /// `http://host:port` or `https://…`, for errors and logs; its two parts, for each
    /// request's URI (built without formatting and parsing a string per request).
    origin: String,
    scheme: Scheme,
    authority: Authority,
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
    ) -> Result<Response<UpstreamBody>, ForwardError> {
        // Routes and clients come from one configuration: every route has its client.
        let Some(client) = self.clients.get(&route.name) else {
            return Err(ForwardError::Http {
                upstream: route.upstream.url.authority(),
                reason: format!("no client for route `{}`", route.name),
            });
        };
        let upstream = client.origin.as_str();
        let exchange = client.send(
            upstream_request(req, info, &client.scheme, &client.authority),
            route,
            upstream,
            drop_trailers,
        );
        let response = match tokio::time::timeout(route.upstream.request_timeout.0, exchange).await
        {
            Err(_) => return Err(ForwardError::Timeout(upstream.to_owned())),
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
        let (scheme, name) = if route.upstream.url.secure {
            (Scheme::HTTPS, "https")
        } else {
            (Scheme::HTTP, "http")
        };
        let origin = format!("{name}://{}", route.upstream.url.authority());
        // The configuration validated the upstream's host and port.
        let authority = Authority::try_from(route.upstream.url.authority().as_str())
            .unwrap_or_else(|_| Authority::from_static("localhost"));
        RouteClient {
            upstream: route.upstream.clone(),
            retries: retries.with_label_values(&[&route.name]),
            pool: LocalPool::new(MAX_IDLE_PER_UPSTREAM, route.upstream.pool_idle_timeout.0),
            connector,
            origin,
            scheme,
            authority,
        }
    }

    /// One request on a pooled connection (or a new one), and once more on a new
    /// connection if the pooled one turned out stale and the request may be repeated.
    ///
    /// The connection is driven by the task that sends the request (see `local`): no
    /// task of its own, no hand-off between tasks per request.
    async fn send(
        &self,
        req: Request<Incoming>,
        route: &Route,
        upstream: &str,
        drop_trailers: Option<IntCounter>,
    ) -> Result<Response<UpstreamBody>, ForwardError> {
        let (mut parts, body) = req.into_parts();
        // A request without `Host` (HTTP/1.0) gets the upstream's, its port left out
        // when it is the scheme's default.
        if !parts.headers.contains_key(header::HOST) {
            let host = match self.authority.port_u16() {
                Some(port) if port != self.scheme_port() => self.authority.as_str(),
                _ => self.authority.host(),
            };
            if let Ok(v) = header::HeaderValue::from_str(host) {
                parts.headers.insert(header::HOST, v);
            }
        }
        // Origin form on the wire.
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::from(path);
        let (body, slot) = ClientBody::new(body, drop_trailers.clone());
        let again = Request::from_parts(parts.clone(), ());
        // An idle connection the backend has closed is seen here, and skipped.
        let mut up = None;
        while let Some(mut idle) = self.pool.checkout() {
            if idle.ready().await {
                up = Some(idle);
                break;
            }
        }
        let (up, reused) = match up {
            Some(up) => (up, true),
            None => (self.connect(upstream).await?, false),
        };
        let usage = up.usage.clone();
        let e = match up
            .send(Request::from_parts(parts, body), self.pool.clone())
            .await
        {
            Ok(r) => return Ok(r),
            Err(e) => e,
        };
        let unsent = e.is_canceled();
        if !reused || !(unsent || usage.stale()) {
            return Err(ForwardError::Http {
                upstream: upstream.to_owned(),
                reason: e.to_string(),
            });
        }
        let (sent, body) = slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take_back();
        let Some(body) = body.filter(|_| unsent || may_retry(again.method(), sent)) else {
            tracing::debug!(route = %route.name, method = %again.method(), "a reused upstream connection failed before the response; the request cannot be repeated");
            return Err(ForwardError::Http {
                upstream: upstream.to_owned(),
                reason: "a reused upstream connection failed before the response".to_owned(),
            });
        };
        let why = if unsent {
            "a pooled connection closed before taking the request"
        } else {
            "a reused upstream connection failed before the response"
        };
        tracing::debug!(route = %route.name, method = %again.method(), "{why}: sending it on a new connection");
        self.retries.inc();
        let (parts, ()) = again.into_parts();
        let (body, _) = ClientBody::new(body, drop_trailers);
        let up = self.connect(upstream).await?;
        up.send(Request::from_parts(parts, body), self.pool.clone())
            .await
            .map_err(|e| ForwardError::Http {
                upstream: upstream.to_owned(),
                reason: e.to_string(),
            })
    }

    fn scheme_port(&self) -> u16 {
        if self.scheme == Scheme::HTTPS {
            443
        } else {
            80
        }
    }

    /// A new connection to the upstream, its connect and TLS handshake within
    /// `connect_timeout`.
    async fn connect(&self, upstream: &str) -> Result<local::Upstream, ForwardError> {
        use tower_service::Service as _;
        let io = self
            .connector
            .clone()
            .call(Uri::from_static("/"))
            .await
            .map_err(|io| {
                if io.kind() == std::io::ErrorKind::TimedOut {
                    ForwardError::Timeout(upstream.to_owned())
                } else if let Some(tls) = io.get_ref().and_then(|e| e.downcast_ref::<TlsFailed>()) {
                    ForwardError::Tls {
                        upstream: upstream.to_owned(),
                        reason: tls.to_string(),
                    }
                } else {
                    ForwardError::Connect {
                        upstream: upstream.to_owned(),
                        reason: io.to_string(),
                    }
                }
            })?;
        local::Upstream::handshake(io)
            .await
            .map_err(|e| ForwardError::Http {
                upstream: upstream.to_owned(),
                reason: e.to_string(),
            })
    }
}

/// The request the upstream sees: the client's method, origin-form target and body, the
/// end-to-end headers and `Host` unchanged, `X-Forwarded-*` and `Via` added.
fn upstream_request(
    req: Request<Incoming>,
    info: ClientInfo,
    scheme: &Scheme,
    authority: &Authority,
) -> Request<Incoming> {
    let (parts, body) = req.into_parts();
    // Only the path and query are taken from the client: an absolute-form target
    // (`GET http://elsewhere/`) never chooses where wsbeat connects.
    let target = parts
        .uri
        .path_and_query()
        .filter(|pq| pq.as_str().starts_with('/'))
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut uri = hyper::http::uri::Parts::default();
    uri.scheme = Some(scheme.clone());
    uri.authority = Some(authority.clone());
    uri.path_and_query = Some(target);
    let uri = Uri::from_parts(uri).unwrap_or_else(|_| Uri::from_static("/"));
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
