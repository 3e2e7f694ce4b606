//! wsbeat: a WebSocket reverse proxy that adds heartbeats, dead-peer detection and
//! liveness metrics to backends that have none.
//!
//! Modules, one job each:
//! - [`config`]: the YAML document and its loading, units, upstream URLs, routes and
//!   their overrides, and the pure `validate()`.
//! - [`server`]: the public listener, routing, the hand-over to a relay.
//! - [`proxy_protocol`]: the PROXY protocol header (v1, v2) an L4 load balancer sends first.
//! - [`handshake`]: the client handshake decision (pure): request head → response.
//! - [`forwarding`]: header policy between the legs: end-to-end headers, tokens,
//!   `X-Forwarded-*` and `Via`.
//! - [`upstream`]: the upstream leg's handshake with the forwarded headers.
//! - [`compression`]: `permessage-deflate` end to end: the offer, the answer, and the
//!   one capped inflate that spots a compressed heartbeat (leaf, no zlib state).
//! - [`client_script`]: the browser client, served at `client_script` when configured.
//! - [`passthrough`]: plain HTTP requests, proxied through a pooled client.
//! - [`conn`]: the vocabulary of one connection (leaf): `Leg`, `PerLeg`, `Outcome`,
//!   `Summary`, the live-connection registry behind `/connections`.
//! - [`relay`]: the per-connection loop that holds both sockets; its close and drain
//!   policy is a pure state machine ([`relay::closing`]).
//! - [`frame`]: WebSocket frames on the wire: the validating parser and the encoder.
//! - [`heartbeat`]: the heartbeat and liveness state machine (pure, no I/O).
//! - [`metrics`]: the Prometheus families; owns the live-connection registry.
//! - [`admin`]: `/metrics`, `/livez`, `/readyz`, `/connections` on their own listener.
//! - [`tls`]: rustls configs for both legs, their certificates reloaded in the background,
//!   the leg stream type.
//! - [`reload`]: SIGHUP and the config-file watch; a reload validates as `wsbeat check`,
//!   then swaps the whole configuration at once ([`server::Proxy::reconfigure`]).
//! - [`shutdown`]: signals, the drain with a deadline, the spread of its closes.
#![forbid(unsafe_code)]

pub mod admin;
pub mod client_script;
pub mod compression;
pub mod config;
pub mod conn;
pub mod forwarding;
pub mod frame;
pub mod handshake;
pub mod heartbeat;
pub mod metrics;
pub mod passthrough;
pub mod proxy_protocol;
pub mod relay;
pub mod reload;
pub mod server;
pub mod shutdown;
pub mod tls;
pub mod upstream;
pub mod wskey;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

pub use config::Config;

/// Errors that stop wsbeat from running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// A certificate, key or CA file cannot be used: a configuration problem (the
    /// binary exits 64).
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// Binds the configured listeners and serves until `shutdown` resolves, then drains.
/// `config` is what `source` loaded; SIGHUP and changes of its file reload it.
///
/// The public listener is served by `runtime.workers` threads, each with a
/// current-thread runtime that waits on the listening socket in its own epoll: the
/// first one free takes the next connection. A connection, its upstream leg and their
/// tasks stay on the thread that accepted it: no work stealing, no wake-ups across
/// threads. The calling runtime keeps the admin listener, the reloads, the signals and
/// the drain.
pub async fn run(
    config: Config,
    source: reload::Source,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    // `validate` reads no file: the certificate files are loaded here, once, before
    // binding; `serve` uses what was loaded (and checked), never a second read.
    let tls = tls::Setup::load(&config)?;
    // Before the TCP cap is derived from it (`limits.max_tcp_connections: null`).
    server::raise_open_file_limit();
    let listeners = bind_per_worker(config.listen, config.runtime.worker_threads()).await?;
    let admin = match config.admin.listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    serve_reloading(
        Arc::new(config),
        tls,
        Listeners::PerWorker(listeners),
        admin,
        Some(source),
        shutdown,
    )
    .await;
    Ok(())
}

/// `workers` handles on one listening socket bound to `addr` (duplicated descriptors,
/// non-blocking, registered with no runtime yet): each worker waits on it in its own
/// epoll, and the first one free to accept a connection takes it.
async fn bind_per_worker(
    addr: SocketAddr,
    workers: usize,
) -> Result<Vec<std::net::TcpListener>, Error> {
    let first = bind(addr)
        .await?
        .into_std()
        .map_err(|source| Error::Bind { addr, source })?;
    let mut listeners = Vec::with_capacity(workers);
    while listeners.len() + 1 < workers {
        let handle = first
            .try_clone()
            .map_err(|source| Error::Bind { addr, source })?;
        listeners.push(handle);
    }
    listeners.push(first);
    Ok(listeners)
}

/// Binds a TCP listener, naming the address on failure.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
}

/// Serves on an already bound listener until `shutdown` resolves; then stops accepting,
/// closes every WebSocket with 1001 on both legs (the client first; the first closes
/// spread over `shutdown.close_spread`) and waits for them at most
/// `shutdown.drain_timeout`. `tls` is what `tls::Setup::load` made of `config`: nothing
/// here can fail to start. The configuration is never reloaded (that is [`run`]'s).
pub async fn serve(
    config: Arc<Config>,
    tls: tls::Setup,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) {
    serve_reloading(
        config,
        tls,
        Listeners::Here(listener),
        admin,
        None,
        shutdown,
    )
    .await
}

/// Where the public listener's connections are accepted and served.
enum Listeners {
    /// One listener, its accept loop on the calling runtime ([`serve`]).
    Here(TcpListener),
    /// One handle on the listening socket per worker thread ([`run`]).
    PerWorker(Vec<std::net::TcpListener>),
}

impl Listeners {
    fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listeners::Here(listener) => listener.local_addr().ok(),
            Listeners::PerWorker(listeners) => listeners.first()?.local_addr().ok(),
        }
    }
}

/// A worker thread as [`start_worker`] started it.
struct Worker {
    /// Resolves (`Ok`) once its runtime runs; `Err` when it could not start.
    started: tokio::sync::oneshot::Receiver<()>,
    /// Resolves once it has dropped its handle on the listener (or could not start).
    listener_closed: tokio::sync::oneshot::Receiver<()>,
}

/// Starts a worker thread: a current-thread runtime that accepts on `listener` until
/// `stop`, then runs the connections it accepted until `done`.
fn start_worker(
    proxy: Arc<server::Proxy>,
    listener: std::net::TcpListener,
    stop: CancellationToken,
    done: CancellationToken,
) -> Worker {
    let (running, started) = tokio::sync::oneshot::channel();
    let (closed, listener_closed) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name(WORKER_THREAD.to_owned())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .thread_name(WORKER_THREAD)
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start a worker's runtime: the others accept without it");
                    return;
                }
            };
            let _ = running.send(());
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => tokio::select! {
                        _ = proxy.serve(listener) => {}
                        _ = stop.cancelled() => {}
                    },
                    Err(e) => {
                        tracing::error!(error = %e, "a worker cannot use the listener: the others accept without it");
                    }
                }
                // Its handle on the listener is dropped with the loop that owned it.
                let _ = closed.send(());
                // Its connections live on this runtime: it runs them through the drain.
                done.cancelled().await;
            });
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start a worker thread: the others accept without it");
    }
    Worker {
        started,
        listener_closed,
    }
}

/// The name of the threads that run connections.
const WORKER_THREAD: &str = "wsbeat-worker";

/// [`serve`], reloading the configuration from `source` when there is one.
async fn serve_reloading(
    config: Arc<Config>,
    mut tls: tls::Setup,
    listeners: Listeners,
    admin: Option<TcpListener>,
    source: Option<reload::Source>,
    shutdown: impl Future<Output = ()>,
) {
    if let Some(addr) = listeners.local_addr() {
        tracing::info!(%addr, "listening");
    }
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    let metrics = metrics::Metrics::new(&config.routes(), config.metrics.per_connection);
    let certificates = tls.reload_in_background();
    let ready = Arc::new(AtomicBool::new(true));
    // The admin listener is not tracked: it serves until the process exits.
    let admin = admin.map(|listener| {
        let state = Arc::new(admin::Admin {
            metrics: metrics.clone(),
            ready: ready.clone(),
        });
        // Stopped when `serve` returns, or when its future is dropped.
        AbortOnDropHandle::new(tokio::spawn(admin::serve(listener, state)))
    });
    let proxy = Arc::new(server::Proxy::new(
        config,
        tls,
        metrics.clone(),
        token.clone(),
        tracker.clone(),
    ));
    let reloading = reload::Reloading::start(source, proxy.clone(), metrics, certificates);
    // The worker threads run until this returns (their connections through the drain).
    let done = CancellationToken::new();
    let _done = done.clone().drop_guard();
    match listeners {
        Listeners::Here(listener) => {
            // The calling runtime's threads run the connections.
            let workers = tokio::runtime::Handle::current().metrics().num_workers();
            tracing::info!(workers, "runtime worker threads");
            tokio::select! {
                _ = proxy.clone().serve(listener) => {}
                _ = shutdown => {}
            }
        }
        Listeners::PerWorker(listeners) => {
            let stop = CancellationToken::new();
            let workers: Vec<_> = listeners
                .into_iter()
                .map(|listener| start_worker(proxy.clone(), listener, stop.clone(), done.clone()))
                .collect();
            let mut running = 0;
            let mut closed = Vec::with_capacity(workers.len());
            for worker in workers {
                running += usize::from(worker.started.await.is_ok());
                closed.push(worker.listener_closed);
            }
            // Once they run: a script that reads it finds the threads.
            tracing::info!(workers = running, "runtime worker threads");
            shutdown.await;
            stop.cancel();
            for listener_closed in closed {
                let _ = listener_closed.await;
            }
        }
    }
    ready.store(false, Ordering::Relaxed);
    // Before the token fires: each relay takes its turn from this as it is told.
    proxy.spread_closes(tokio::time::Instant::now());
    // No new handshakes from here on: neither the configuration nor the certificate
    // files need more looks.
    drop(reloading);
    // The configuration in use now, reloaded or not.
    let drain_timeout = proxy.runtime().config.shutdown.drain_timeout.0;
    // The listeners are closed here: no new connections.
    tracing::info!(connections = tracker.len(), "draining");
    if shutdown::drain(&token, &tracker, drain_timeout).await {
        tracing::info!("drained: exiting");
    } else {
        tracing::warn!(
            remaining = tracker.len(),
            "drain timeout reached: exiting anyway"
        );
    }
    drop(admin);
}
