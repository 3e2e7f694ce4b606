//! The public listener: accept loop, HTTP/1.1 with upgrades, routing, the client
//! handshake checks, and the hand-over of both legs to a relay task.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Route, Routes};
use crate::conn::ConnectionView;
use crate::forwarding::{canonical_path, check_host, copy_end_to_end, ClientInfo};
use crate::handshake::{self, is_upgrade_request, MAX_REQUEST_HEAD};
use crate::metrics::Metrics;
use crate::passthrough::Passthrough;
use crate::proxy_protocol;
use crate::relay::{self, RelayContext};
use crate::shutdown::CloseSpread;
use crate::tls::{self, LegStream};
use crate::upstream::{self, Dialed};

mod h2;
mod idle;
use self::idle::{IdleClock, Tracked};

/// Takes the client's stream back out of a finished upgrade, with the bytes hyper had
/// already read past the handshake.
fn client_stream(upgraded: hyper::upgrade::Upgraded) -> Option<relay::Socket<LegStream>> {
    let parts = upgraded
        .downcast::<TokioIo<idle::Watched<LegStream>>>()
        .ok()?;
    Some(relay::Socket {
        io: parts.io.into_inner().into_inner(),
        leftover: parts.read_buf,
    })
}

/// A WebSocket's client leg: the connection an HTTP/1.1 upgrade took over, or one
/// stream of an HTTP/2 connection.
enum ClientLeg {
    Http1(relay::Socket<LegStream>),
    Http2(relay::Socket<h2::StreamIo>),
}

/// The client leg of a finished upgrade: an HTTP/2 stream when the request came on one
/// (`on_stream`), else the HTTP/1.1 connection's own stream.
fn client_leg(
    upgraded: hyper::upgrade::Upgraded,
    on_stream: Option<h2::OnStream>,
) -> Option<ClientLeg> {
    match on_stream {
        Some(on_stream) => Some(ClientLeg::Http2(relay::Socket {
            io: h2::StreamIo::new(upgraded, on_stream),
            leftover: Bytes::new(),
        })),
        None => client_stream(upgraded).map(ClientLeg::Http1),
    }
}

/// Whether a request asks for a WebSocket: an HTTP/1.1 upgrade or an HTTP/2 extended
/// CONNECT.
fn is_websocket_request<B>(req: &Request<B>) -> bool {
    is_upgrade_request(req.headers()) || h2::is_websocket_connect(req)
}

/// Response body type for everything the public listener answers.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Largest upstream refusal body passed to the client.
const MAX_REFUSAL_BODY: usize = 64 * 1024;
/// Pause after a failed accept (e.g. out of file descriptors) before trying again, so
/// the loop does not spin while the condition lasts.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// What one configuration is made into: the unit a reload swaps, whole. A client
/// connection takes the one in use when it is accepted (its TLS acceptor, handshake
/// timeout), each request the one in use when it arrives; a WebSocket keeps its
/// request's for its whole life.
pub struct Runtime {
    pub config: Arc<Config>,
    routes: Routes,
    /// The listener's acceptor and the `wss://` upstreams' connectors.
    tls: tls::Setup,
    /// Pooled clients for plain HTTP requests.
    passthrough: Passthrough,
}

/// Everything the public listener shares between connections.
pub struct Proxy {
    /// The configuration in use, swapped whole by [`Proxy::reconfigure`].
    runtime: ArcSwap<Runtime>,
    metrics: Arc<Metrics>,
    /// One permit per proxied WebSocket: `limits.max_connections`.
    connections: Capacity,
    /// WebSockets per client address: `limits.max_connections_per_ip`.
    per_ip: Arc<PerIpLimit>,
    /// One permit per accepted client TCP connection: `limits.max_tcp_connections`.
    tcp_slots: Capacity,
    shutdown: CancellationToken,
    /// When each WebSocket's close goes out in a drain (`shutdown.close_spread`).
    close_spread: Arc<CloseSpread>,
    tracker: TaskTracker,
    next_id: AtomicU64,
}

impl Proxy {
    pub fn new(
        config: Arc<Config>,
        tls: tls::Setup,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        let routes = config.routes();
        let runtime = Runtime {
            passthrough: Passthrough::new(&routes, &tls.upstreams, &metrics.upstream_retries),
            routes,
            tls,
            config,
        };
        Proxy {
            connections: Capacity::new(runtime.config.limits.max_connections),
            per_ip: Arc::new(PerIpLimit::default()),
            tcp_slots: Capacity::new(tcp_connection_cap(
                runtime.config.limits.max_tcp_connections,
            )),
            runtime: ArcSwap::from_pointee(runtime),
            metrics,
            shutdown,
            close_spread: Arc::new(CloseSpread::default()),
            tracker,
            next_id: AtomicU64::new(1),
        }
    }

    /// A drain begins at `now`: the WebSockets open now get their turns to be closed,
    /// spread over `shutdown.close_spread`. Call it before the shutdown token fires.
    pub fn spread_closes(&self, now: tokio::time::Instant) {
        self.close_spread.begin(
            now,
            self.runtime().config.shutdown.close_spread.0,
            self.metrics.connections().len(),
        );
    }

    /// The configuration in use.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Puts a new configuration in use, in one step: the connections and requests that
    /// start from here on get it; those under way keep what they started with. `tls` is
    /// what `tls::Setup::load` made of `config`. A route whose `ws://` upstream did not
    /// change keeps its plain-HTTP pool. Settings that need a restart (`listen`,
    /// `admin.listen`, `proxy_protocol`) must have been refused before.
    pub fn reconfigure(&self, config: Arc<Config>, tls: tls::Setup) {
        let old = self.runtime.load_full();
        let routes = config.routes();
        self.metrics.add_routes(&routes);
        self.metrics
            .set_per_connection(config.metrics.per_connection);
        let runtime = Runtime {
            passthrough: old.passthrough.renewed(
                &routes,
                &tls.upstreams,
                &self.metrics.upstream_retries,
            ),
            routes,
            tls,
            config,
        };
        self.connections
            .resize(runtime.config.limits.max_connections);
        self.tcp_slots.resize(tcp_connection_cap(
            runtime.config.limits.max_tcp_connections,
        ));
        self.runtime.store(Arc::new(runtime));
    }

    /// Accepts connections until the shutdown token fires.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            // At `max_tcp_connections` nothing is accepted until a connection closes:
            // new ones wait in the kernel's backlog, never accepted and reset.
            let slot = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                slot = self.tcp_slots.permits.clone().acquire_owned() => match slot {
                    Ok(permit) => TcpSlot::new(permit, &self.metrics),
                    Err(_) => return, // the semaphore is never closed
                },
            };
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, addr)) => {
                    let proxy = self.clone();
                    self.tracker.spawn(async move {
                        proxy.serve_connection(stream, addr, Arc::new(slot)).await
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            }
        }
    }

    /// With `proxy_protocol`: the client's address from the PROXY header (the peer's for
    /// a `LOCAL` one), or `None` when the connection must be closed: it is counted and
    /// logged at debug level, never handed to hyper.
    async fn read_proxy_header(
        &self,
        stream: &mut TcpStream,
        peer: SocketAddr,
        deadline: Duration,
    ) -> Option<SocketAddr> {
        match proxy_protocol::read_header(stream, deadline).await {
            Ok(proxy_protocol::Header::Proxied { source, .. }) => Some(source),
            Ok(proxy_protocol::Header::Local) => Some(peer),
            Err(e) => {
                self.metrics.proxy_protocol_errors.inc();
                tracing::debug!(peer = %peer, error = %e, "connection closed: no valid PROXY header");
                None
            }
        }
    }

    /// Serves one client connection. `slot` is its place under `max_tcp_connections`:
    /// held by the HTTP connection and, after an upgrade, by the WebSocket's task.
    async fn serve_connection(
        self: Arc<Self>,
        mut stream: TcpStream,
        addr: SocketAddr,
        slot: Arc<TcpSlot>,
    ) {
        let _ = stream.set_nodelay(true);
        // The configuration in use when the connection came: its TLS certificate and
        // timeouts. Each request takes the one in use when it arrives.
        let runtime = self.runtime.load_full();
        let handshake_timeout = runtime.config.limits.handshake_timeout.0;
        let addr = if runtime.config.proxy_protocol {
            match self
                .read_proxy_header(&mut stream, addr, handshake_timeout)
                .await
            {
                Some(client) => client,
                None => return,
            }
        } else {
            addr
        };
        let stream = match &runtime.tls.acceptor {
            None => LegStream::Plain(stream),
            Some(acceptor) => match self
                .accept_tls(acceptor, stream, addr, handshake_timeout)
                .await
            {
                Some(tls) => tls,
                None => return,
            },
        };
        let http2 = runtime.config.http2
            && match &stream {
                LegStream::Tls(tls) => tls.get_ref().1.alpn_protocol() == Some(b"h2"),
                LegStream::Plain(tcp) => h2::starts_with_preface(tcp, handshake_timeout).await,
            };
        if http2 {
            slot.set_version(&self.metrics, "2");
            return self.serve_h2(stream, addr, slot, runtime).await;
        }
        slot.set_version(&self.metrics, "1.1");
        let tls = matches!(stream, LegStream::Tls(_));
        let proxy = self.clone();
        let clock = IdleClock::new();
        let service = service_fn({
            let clock = clock.clone();
            move |req| proxy.clone().serve_request(req, addr, tls, &slot, &clock)
        });
        let idle_timeout = runtime.config.limits.http_idle_timeout.0;
        drop(runtime);
        let conn = http1::Builder::new()
            // The idle and head clocks are wsbeat's (see `idle`); hyper's own header
            // timeout, which starts when a connection goes idle, is only a backstop.
            .timer(TokioTimer::new())
            .header_read_timeout(idle_timeout + handshake_timeout)
            // max_buf_size only bounds the read buffer, and one read may take a whole
            // larger head: max_header_size is what turns a long head into a 431.
            .max_buf_size(MAX_REQUEST_HEAD)
            .max_header_size(MAX_REQUEST_HEAD)
            .serve_connection(TokioIo::new(clock.watch(stream)), service)
            .with_upgrades();
        tokio::pin!(conn);
        let expired = clock.expired(idle_timeout, handshake_timeout);
        tokio::pin!(expired);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = self.shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
            _ = expired => {
                tracing::debug!(client = %addr, "client connection closed: idle or slow request head");
                return;
            }
        };
        if let Err(e) = result {
            tracing::debug!(peer = %addr, error = %e, "client connection ended with an error");
        }
    }

    /// The client's TLS handshake, within `limits.handshake_timeout`. A client that
    /// closes before sending a byte (a TCP health check) is not an error; every other
    /// failure is counted and logged at debug.
    async fn accept_tls(
        &self,
        acceptor: &tokio_rustls::TlsAcceptor,
        stream: TcpStream,
        addr: SocketAddr,
        deadline: Duration,
    ) -> Option<LegStream> {
        let handshake = async {
            if stream.peek(&mut [0u8; 1]).await? == 0 {
                return Ok(None);
            }
            acceptor.accept(stream).await.map(Some)
        };
        // A shutdown does not wait for handshakes: nothing has been proxied yet.
        let result = tokio::select! {
            r = tokio::time::timeout(deadline, handshake) => r,
            _ = self.shutdown.cancelled() => return None,
        };
        let error = match result {
            Ok(Ok(Some(tls))) => return Some(tokio_rustls::TlsStream::Server(tls).into()),
            Ok(Ok(None)) => return None,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no handshake within limits.handshake_timeout".to_owned(),
        };
        self.metrics
            .tls_handshake_errors
            .with_label_values(&["client"])
            .inc();
        tracing::debug!(peer = %addr, error, "client TLS handshake failed");
        None
    }

    /// One request of a client connection, HTTP/1.1 or an HTTP/2 stream: it holds the
    /// connection's idle clock until its response body has ended.
    fn serve_request(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        addr: SocketAddr,
        tls: bool,
        slot: &Arc<TcpSlot>,
        clock: &IdleClock,
    ) -> impl std::future::Future<Output = Result<Response<Body>, Infallible>> {
        let in_flight = clock.begin_request();
        // The WebSocket's task takes a clone: the slot is freed when both are done.
        req.extensions_mut().insert(slot.clone());
        // Per request: behind a trusted proxy, each request names its own client.
        let runtime = self.runtime.load_full();
        let info = ClientInfo::new(addr, tls, req.headers(), &runtime.config.trusted_proxies);
        let handled = self.handle(req, info, runtime);
        async move {
            let response = handled.await?;
            Ok(response.map(|body| Tracked::new(body, in_flight).boxed()))
        }
    }

    async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        info: ClientInfo,
        runtime: Arc<Runtime>,
    ) -> Result<Response<Body>, Infallible> {
        let target = canonical_target(&req);
        // A refused target is counted on the route its raw path names.
        let path = match &target {
            Ok(uri) => uri.path(),
            Err(_) => req.uri().path(),
        };
        let route = runtime.routes.resolve(path).clone();
        let response = match target {
            Ok(uri) => {
                *req.uri_mut() = uri;
                self.clone()
                    .respond(req, info, route.clone(), &runtime)
                    .await
            }
            Err((reason, message)) => {
                tracing::debug!(client = %info.client, target = %req.uri(), reason = %message, "request target refused");
                if is_websocket_request(&req) {
                    self.count_rejection(&route, reason);
                }
                text(StatusCode::BAD_REQUEST, &message)
            }
        };
        self.metrics
            .http_requests
            .with_label_values(&[&route.name, response.status().as_str()])
            .inc();
        Ok(response)
    }

    async fn respond(
        self: Arc<Self>,
        req: Request<Incoming>,
        info: ClientInfo,
        route: Arc<Route>,
        runtime: &Arc<Runtime>,
    ) -> Response<Body> {
        if runtime.config.client_script.as_deref() == Some(req.uri().path()) {
            return crate::client_script::respond(req.method(), req.headers())
                .map(|body| body.map_err(|never| match never {}).boxed());
        }
        let over_h2 = h2::is_websocket_connect(&req);
        if !over_h2 && !is_upgrade_request(req.headers()) {
            return self.forward_http(req, info, &route, runtime).await;
        }
        let checked = if over_h2 {
            h2::check_connect(&req)
        } else {
            check_handshake(&req)
        };
        if let Err(rejection) = checked {
            self.count_rejection(&route, "bad_request");
            return rejection;
        }
        if self.shutdown.is_cancelled() {
            // Accepted just before the listener closed: this pod is going away.
            return text(StatusCode::SERVICE_UNAVAILABLE, "wsbeat: shutting down");
        }
        if !route.origin_allowed(req.headers().get(header::ORIGIN).map(|o| o.as_bytes())) {
            tracing::info!(client = %info.client, route = %route.name, origin = ?req.headers().get(header::ORIGIN), "WebSocket from an origin not in allowed_origins: refused");
            self.count_rejection(&route, "origin");
            return text(
                StatusCode::FORBIDDEN,
                "wsbeat: this Origin may not open WebSockets here",
            );
        }
        let per_ip = match self
            .per_ip
            .admit(info.client.ip, runtime.config.limits.max_connections_per_ip)
        {
            Ok(slot) => slot,
            Err(()) => {
                tracing::info!(client = %info.client, "max_connections_per_ip reached: refusing a WebSocket");
                self.count_rejection(&route, "per_ip");
                let mut r = text(
                    StatusCode::TOO_MANY_REQUESTS,
                    "wsbeat: too many WebSockets from this address",
                );
                r.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(PER_IP_RETRY_AFTER),
                );
                return r;
            }
        };
        let Ok(permit) = self.connections.permits.clone().try_acquire_owned() else {
            tracing::warn!(client = %info.client, "max_connections reached: refusing a WebSocket");
            self.count_rejection(&route, "max_connections");
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "wsbeat: too many connections",
            );
        };
        let admission = Admission {
            _connection: permit,
            _per_ip: per_ip,
        };
        self.proxy_websocket(req, info, route, admission, runtime.clone())
            .await
    }

    /// Counts a WebSocket upgrade refused before the upstream was dialled.
    fn count_rejection(&self, route: &Route, reason: &str) {
        self.metrics
            .handshakes_rejected
            .with_label_values(&[&route.name, reason])
            .inc();
    }

    /// A request that is not a WebSocket upgrade: proxied as plain HTTP.
    async fn forward_http(
        &self,
        req: Request<Incoming>,
        info: ClientInfo,
        route: &Route,
        runtime: &Runtime,
    ) -> Response<Body> {
        if let Some(refusal) = crate::passthrough::refuse_method(req.method()) {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, refusal.message);
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(refusal.allow));
            return r;
        }
        let started = tokio::time::Instant::now();
        // HTTP/2 trailers cannot go over the HTTP/1.1 pool: dropped and counted.
        let drop_trailers = (req.version() == hyper::Version::HTTP_2).then(|| {
            self.metrics
                .http2_trailers_dropped
                .with_label_values(&[&route.name])
        });
        let response = match runtime
            .passthrough
            .forward(req, info, route, drop_trailers)
            .await
        {
            Ok(response) => response.map(|body| body.boxed()),
            Err(e) => {
                let (status, reason) = e.status_and_reason();
                self.metrics
                    .upstream_errors
                    .with_label_values(&[&route.name, reason])
                    .inc();
                tracing::warn!(route = %route.name, error = %e, "plain HTTP request failed");
                text(status, &format!("wsbeat: {e}"))
            }
        };
        self.metrics
            .http_request_duration
            .with_label_values(&[&route.name])
            .observe(started.elapsed().as_secs_f64());
        response
    }

    async fn proxy_websocket(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        info: ClientInfo,
        route: Arc<Route>,
        permit: Admission,
        runtime: Arc<Runtime>,
    ) -> Response<Body> {
        // check_handshake has validated the key: derive the answer before dialing.
        let accept = req
            .headers()
            .get(header::SEC_WEBSOCKET_KEY)
            .map(|key| crate::wskey::accept_value(key.as_bytes()));
        let client_upgrade = hyper::upgrade::on(&mut req);
        let (parts, _body) = req.into_parts();
        let upstream_tls = runtime.tls.upstreams.get(&route.name);
        let dialed = upstream::dial(
            &route.upstream,
            route.compression,
            upstream_tls,
            &parts,
            info,
        )
        .await;
        let errors = |reason: &str| {
            self.metrics
                .upstream_errors
                .with_label_values(&[&route.name, reason])
                .inc()
        };
        let (upstream_socket, protocol, extensions, upstream_headers) = match dialed {
            Ok(Dialed::Accepted {
                socket,
                protocol,
                extensions,
                headers,
                connect_time,
            }) => {
                self.metrics
                    .upstream_connect
                    .with_label_values(&[&route.name])
                    .observe(connect_time.as_secs_f64());
                (socket, protocol, extensions, headers)
            }
            Ok(Dialed::Refused(response)) => {
                errors("refused");
                tracing::debug!(route = %route.name, status = %response.status(), "upstream refused the WebSocket");
                return refused(response, route.upstream.connect_timeout.0).await;
            }
            Err(e) => {
                let (status, reason) = e.status_and_reason();
                errors(reason);
                if matches!(e, upstream::DialError::Tls { .. }) {
                    self.metrics
                        .tls_handshake_errors
                        .with_label_values(&["upstream"])
                        .inc();
                }
                tracing::warn!(route = %route.name, error = %e, "upstream handshake failed");
                return text(status, &format!("wsbeat: {e}"));
            }
        };

        // On an HTTP/2 stream (RFC 8441): 200, no upgrade headers and no accept key.
        let on_stream = parts.extensions.get::<h2::OnStream>().cloned();
        let mut response = Response::new(empty());
        *response.status_mut() = match on_stream {
            Some(_) => StatusCode::OK,
            None => StatusCode::SWITCHING_PROTOCOLS,
        };
        *response.headers_mut() = upstream_headers;
        let h = response.headers_mut();
        if on_stream.is_none() {
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            if let Some(accept) = accept {
                h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
            }
        }
        if let Some(p) = protocol {
            h.insert(header::SEC_WEBSOCKET_PROTOCOL, p);
        }
        let compressed = extensions.is_some();
        if let Some(e) = extensions {
            h.insert(header::SEC_WEBSOCKET_EXTENSIONS, e);
        }

        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let proxy = self.clone();
        let tcp_slot = parts.extensions.get::<Arc<TcpSlot>>().cloned();
        // The settings this WebSocket keeps for its life, whatever a reload changes (the
        // route holds its heartbeat and liveness settings).
        let limits = &runtime.config.limits;
        let (max_message_size, write_timeout) = (limits.max_message_size.0, limits.write_timeout.0);
        let drain_grace = relay::drain_grace(runtime.config.shutdown.drain_timeout.0);
        let max_age = limits
            .max_connection_age
            .map(|age| relay::jittered_age(age.0, jitter_seed(id)));
        drop(runtime);
        self.tracker.spawn(async move {
            let _permit = permit;
            let _tcp_slot = tcp_slot;
            let client = match client_upgrade.await.map(|u| client_leg(u, on_stream)) {
                Ok(Some(socket)) => socket,
                Ok(None) => {
                    tracing::error!(
                        id,
                        "the client's upgraded connection is not a wsbeat stream"
                    );
                    return;
                }
                Err(e) => {
                    tracing::debug!(id, error = %e, "client upgrade failed");
                    return;
                }
            };
            let started = tokio::time::Instant::now();
            let view = Arc::new(ConnectionView::new(
                id,
                info.client,
                &route.name,
                route.upstream.url.to_string(),
                started,
            ));
            proxy.metrics.open(view.clone());
            let ctx = RelayContext {
                metrics: proxy.metrics.for_route(&route.name),
                view: view.clone(),
                route: route.clone(),
                max_message_size,
                compressed,
                write_timeout,
                shutdown: proxy.shutdown.clone(),
                drain_grace,
                close_spread: proxy.close_spread.clone(),
                max_age,
                started,
            };
            let compressed_gauge = compressed.then(|| {
                proxy
                    .metrics
                    .compressed_connections_active
                    .with_label_values(&[&route.name])
            });
            if let Some(g) = &compressed_gauge {
                g.inc();
            }
            // One relay, compiled for each kind of client leg: HTTP/1.1 stays as it was.
            let summary = match client {
                ClientLeg::Http1(client) => relay::run(client, *upstream_socket, ctx).await,
                ClientLeg::Http2(client) => relay::run(client, *upstream_socket, ctx).await,
            };
            if let Some(g) = compressed_gauge {
                g.dec();
            }
            proxy.metrics.close(&view, &summary);
            tracing::info!(
                id,
                client = %info.client,
                route = %route.name,
                duration_s = started.elapsed().as_secs_f64(),
                outcome = %summary.outcome,
                client_close = summary.client_close_code,
                upstream_close = summary.upstream_close_code,
                dropped_to_client = summary.dropped_to_client,
                dropped_to_upstream = summary.dropped_to_upstream,
                heartbeats_sent = view.heartbeats_sent.load(std::sync::atomic::Ordering::Relaxed),
                last_rtt_ms = view.last_pong_rtt().map(|d| d.as_secs_f64() * 1e3),
                "websocket closed"
            );
        });
        response
    }
}

/// A random 64-bit value for connection `id`'s jitter: std's SipHash under the random
/// keys each `RandomState` gets (seeded by the OS once a process, then stepped), so no
/// random-number crate is needed for one draw a connection.
fn jitter_seed(id: u64) -> u64 {
    use std::hash::BuildHasher;
    std::hash::RandomState::new().hash_one(id)
}

/// The target wsbeat routes on and forwards: origin form, the canonical path
/// ([`canonical_path`]) and the query exactly as sent. Refused, with the `reason` label of
/// `wsbeat_handshakes_rejected_total` and a one-line message for the 400, when `Host` is
/// ambiguous (RFC 9112 §3.2) or the path has no canonical form.
fn canonical_target<B>(req: &Request<B>) -> Result<Uri, (&'static str, String)> {
    check_host(req.uri(), req.headers()).map_err(|e| ("bad_request", format!("wsbeat: {e}")))?;
    let path = req.uri().path();
    if !path.starts_with('/') {
        // `*` (OPTIONS): no path to route on; the code that answers it decides.
        return Ok(req.uri().clone());
    }
    if req.uri().authority().is_none() && crate::forwarding::is_plainly_canonical(path) {
        // Origin-form and already canonical (most requests): nothing to rebuild.
        return Ok(req.uri().clone());
    }
    let canonical = canonical_path(path).map_err(|e| ("path", format!("wsbeat: {e}")))?;
    let target = match req.uri().query() {
        Some(query) => format!("{canonical}?{query}"),
        None => canonical,
    };
    target.parse().map_err(|_| {
        (
            "path",
            "wsbeat: the canonical path is not a valid request target".to_owned(),
        )
    })
}

/// The handshake checks of [`handshake::check`], answered: 400 with the reason, or 426
/// naming the version wsbeat speaks.
#[allow(clippy::result_large_err)]
fn check_handshake<B>(req: &Request<B>) -> Result<(), Response<Body>> {
    handshake::check(req).map_err(|rejection| {
        let mut r = text(rejection.status, rejection.reason);
        if rejection.needs_version_header() {
            r.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        r
    })
}

/// Passes the upstream's refusal on: its status, end-to-end headers and body. The body
/// is read whole (it is small: an error page) so that the client gets a
/// `Content-Length`, which simple WebSocket clients need to show it.
async fn refused(response: Response<Incoming>, patience: Duration) -> Response<Body> {
    let (parts, body) = response.into_parts();
    let collected =
        tokio::time::timeout(patience, Limited::new(body, MAX_REFUSAL_BODY).collect()).await;
    let Ok(Ok(body)) = collected else {
        return text(
            StatusCode::BAD_GATEWAY,
            "wsbeat: the upstream refused the WebSocket with an unreadable or oversized body",
        );
    };
    let mut out = Response::new(
        Full::new(body.to_bytes())
            .map_err(|never| match never {})
            .boxed(),
    );
    *out.status_mut() = parts.status;
    copy_end_to_end(&parts.headers, out.headers_mut());
    out.headers_mut().remove(header::CONTENT_LENGTH);
    out
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

/// A short plain-text response; the body is one line.
pub fn text(status: StatusCode, line: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{line}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// `Retry-After` on a 429 for `max_connections_per_ip`, in seconds.
const PER_IP_RETRY_AFTER: &str = "5";

/// What lets a WebSocket in, held for its life: its place under `max_connections` and
/// under `max_connections_per_ip`.
struct Admission {
    _connection: OwnedSemaphorePermit,
    _per_ip: Option<PerIpSlot>,
}

/// `limits.max_connections_per_ip`: live WebSockets per client address, IPv6 clients
/// grouped by their /64 (one host's addresses are one network's).
/// The limit is the configuration's in use when a WebSocket asks (a reload may change
/// it); the counts are of every live WebSocket, whatever configuration admitted it.
#[derive(Default)]
struct PerIpLimit {
    live: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

impl PerIpLimit {
    /// A place for one more WebSocket from `ip` under `max`, or `Err` at the limit.
    /// `Ok(None)` when there is no limit.
    fn admit(
        self: &Arc<Self>,
        ip: std::net::IpAddr,
        max: Option<usize>,
    ) -> Result<Option<PerIpSlot>, ()> {
        let Some(max) = max else {
            return Ok(None);
        };
        let key = per_ip_key(ip);
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let n = live.entry(key).or_insert(0);
        if *n >= max {
            return Err(());
        }
        *n += 1;
        Ok(Some(PerIpSlot {
            key,
            limit: self.clone(),
        }))
    }
}

/// The address a per-IP limit counts: IPv4 as it is, IPv6 by its /64.
fn per_ip_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip.to_canonical() {
        std::net::IpAddr::V6(v6) => {
            std::net::IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into())
        }
        v4 => v4,
    }
}

/// One WebSocket's place under `max_connections_per_ip`, given back when dropped.
struct PerIpSlot {
    key: std::net::IpAddr,
    limit: Arc<PerIpLimit>,
}

impl Drop for PerIpSlot {
    fn drop(&mut self) {
        let mut live = self.limit.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = live.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                live.remove(&self.key);
            }
        }
    }
}

/// Places that a reload can resize (`max_connections`, `max_tcp_connections`): a
/// semaphore given permits when the limit grows. When it shrinks, the surplus is taken
/// away as it comes free: until enough connections have closed, no new one gets a place,
/// and nothing already admitted is closed.
struct Capacity {
    permits: Arc<Semaphore>,
    size: std::sync::Mutex<usize>,
}

impl Capacity {
    fn new(size: usize) -> Self {
        Capacity {
            permits: Arc::new(Semaphore::new(size)),
            size: std::sync::Mutex::new(size),
        }
    }

    /// Makes the limit `to`. Shrinking needs a tokio runtime: the surplus is waited for
    /// by a task (without one, the limit stays as it was).
    fn resize(&self, to: usize) {
        let mut size = self.size.lock().unwrap_or_else(|e| e.into_inner());
        if to > *size {
            self.permits.add_permits(to - *size);
        } else if to < *size {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                tracing::warn!("no runtime to lower a connection limit: kept at {size}");
                return;
            };
            let permits = self.permits.clone();
            let mut surplus = *size - to;
            runtime.spawn(async move {
                while surplus > 0 {
                    let n = u32::try_from(surplus).unwrap_or(u32::MAX);
                    match permits.acquire_many(n).await {
                        Ok(taken) => taken.forget(),
                        Err(_) => return, // the semaphore is never closed
                    }
                    surplus -= n as usize;
                }
            });
        }
        *size = to;
    }
}

/// A client connection's place under `limits.max_tcp_connections`, counted in
/// `wsbeat_tcp_connections_active` while held.
pub struct TcpSlot {
    _permit: OwnedSemaphorePermit,
    active: prometheus::IntGauge,
    /// Its series of `wsbeat_client_http_connections_active`, once the HTTP version is
    /// known; an HTTP/1.1 connection taken over by a WebSocket stays counted.
    version: std::sync::OnceLock<prometheus::IntGauge>,
}

impl TcpSlot {
    fn new(permit: OwnedSemaphorePermit, metrics: &Metrics) -> Self {
        metrics.tcp_connections_active.inc();
        TcpSlot {
            _permit: permit,
            active: metrics.tcp_connections_active.clone(),
            version: std::sync::OnceLock::new(),
        }
    }

    /// Counts the connection as HTTP `version` (`1.1` or `2`) until it closes.
    fn set_version(&self, metrics: &Metrics, version: &str) {
        let gauge = metrics
            .client_http_connections_active
            .with_label_values(&[version]);
        if self.version.set(gauge.clone()).is_ok() {
            gauge.inc();
        }
    }
}

impl Drop for TcpSlot {
    fn drop(&mut self) {
        self.active.dec();
        if let Some(version) = self.version.get() {
            version.dec();
        }
    }
}

/// Raises the soft open-file limit to the hard one, as nginx's `worker_rlimit_nofile`
/// and Go's runtime do: the default soft limit (often 1024) would cap a proxy at a few
/// hundred connections. Logs the limit in force.
pub fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "open-file limit raised"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit"),
        },
        Ok((soft, _)) => tracing::debug!(limit = soft, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}

/// Descriptors kept out of the client budget: listeners, the admin server, certificate
/// and config files, the runtime's own.
const RESERVED_FILES: u64 = 64;

/// `limits.max_tcp_connections`, or, when it is not set, half of the open-file limit
/// less a reserve: each proxied connection holds two descriptors (client and upstream).
pub fn tcp_connection_cap(configured: Option<usize>) -> usize {
    if let Some(n) = configured {
        return n;
    }
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    derived_cap(soft)
}

fn derived_cap(open_files: u64) -> usize {
    let cap = open_files.saturating_sub(RESERVED_FILES) / 2;
    usize::try_from(cap)
        .unwrap_or(usize::MAX)
        .clamp(1, tokio::sync::Semaphore::MAX_PERMITS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn per_ip_limits_count_ipv4_addresses_and_ipv6_networks() {
        use std::net::IpAddr;
        let key = |s: &str| super::per_ip_key(s.parse::<IpAddr>().unwrap());
        assert_eq!(key("192.0.2.7"), key("192.0.2.7"));
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        let limit = std::sync::Arc::new(super::PerIpLimit::default());
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let a = limit.admit(ip, Some(2)).unwrap();
        let b = limit.admit(ip, Some(2)).unwrap();
        assert!(limit.admit(ip, Some(2)).is_err());
        assert!(limit
            .admit("192.0.2.8".parse().unwrap(), Some(2))
            .unwrap()
            .is_some());
        drop(a);
        assert!(
            limit.admit(ip, Some(2)).is_ok(),
            "a closed WebSocket gives its place back"
        );
        drop(b);
        assert!(limit.admit(ip, None).unwrap().is_none());
    }

    #[tokio::test]
    async fn a_lowered_capacity_closes_nothing_and_admits_again_below_the_new_limit() {
        let capacity = super::Capacity::new(3);
        let held: Vec<_> = (0..3)
            .map(|_| capacity.permits.clone().try_acquire_owned().unwrap())
            .collect();
        capacity.resize(1);
        let mut held = held.into_iter();
        drop(held.next());
        drop(held.next());
        // Two came back, both taken by the lower limit: one still in use, at the limit.
        let taken = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while capacity.permits.available_permits() > 0 {
                tokio::task::yield_now().await;
            }
        });
        taken.await.unwrap();
        assert!(capacity.permits.clone().try_acquire_owned().is_err());
        drop(held.next());
        let one = capacity.permits.clone().try_acquire_owned().unwrap();
        assert!(capacity.permits.clone().try_acquire_owned().is_err());
        capacity.resize(2);
        let two = capacity.permits.clone().try_acquire_owned().unwrap();
        assert!(capacity.permits.clone().try_acquire_owned().is_err());
        drop((one, two));
        assert_eq!(capacity.permits.available_permits(), 2);
    }

    #[test]
    fn the_tcp_cap_is_half_the_open_files_less_a_reserve() {
        assert_eq!(super::derived_cap(20_000), 9_968);
        assert_eq!(super::derived_cap(1024), 480);
        assert_eq!(super::derived_cap(10), 1);
        assert_eq!(
            super::derived_cap(u64::MAX),
            tokio::sync::Semaphore::MAX_PERMITS
        );
        assert_eq!(super::tcp_connection_cap(Some(7)), 7);
    }

    use super::*;
    use hyper::Method;

    fn request(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/ws");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    const GOOD: &[(&str, &str)] = &[
        ("connection", "keep-alive, Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn a_valid_handshake_passes() {
        assert!(check_handshake(&request(GOOD)).is_ok());
    }

    #[test]
    fn invalid_handshakes_get_400_or_426() {
        let with = |name: &str, value: Option<&str>| {
            let mut h: Vec<(&str, &str)> =
                GOOD.iter().copied().filter(|(k, _)| *k != name).collect();
            if let Some(v) = value {
                h.push((name, v));
            }
            check_handshake(&request(&h)).unwrap_err().status()
        };
        assert_eq!(
            with("connection", Some("keep-alive")),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(with("sec-websocket-key", None), StatusCode::BAD_REQUEST);
        assert_eq!(
            with("sec-websocket-key", Some("short")),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            with("sec-websocket-version", Some("8")),
            StatusCode::UPGRADE_REQUIRED
        );
        assert_eq!(
            with("sec-websocket-version", None),
            StatusCode::UPGRADE_REQUIRED
        );
        let mut post = request(GOOD);
        *post.method_mut() = Method::POST;
        assert_eq!(
            check_handshake(&post).unwrap_err().status(),
            StatusCode::BAD_REQUEST
        );
    }
}
