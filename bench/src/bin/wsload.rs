//! wsload: the WebSocket load generator for the wsbeat benchmarks.
//!
//! Subcommands (each prints one JSON line on stdout; progress markers go to stderr):
//! - `pingpong`: N connections, each sends a binary message and waits for its echo, in a
//!   loop; after a warm-up, messages/s and round-trip latency percentiles.
//!   stderr: `measuring` when the warm-up ends, `done` when the window ends.
//! - `idle`: open N connections at a bounded rate and hold them, only reading; the lateness
//!   of the `--heartbeat--` text frames and the PINGs seen.
//!   stderr: `holding N` once all are open, `done` when it starts closing them.
//! - `handshakes`: open and close (with the close handshake) connections in a loop from C
//!   workers; handshakes/s and setup latency.
//!   stderr: `measuring` when the warm-up ends, `done` when the window ends.
//!
//! `wss://` URLs need `--ca FILE` (the PEM CA the target's certificate chains to); every
//! connection then makes a full TLS handshake (session resumption is off), so that
//! `handshakes` measures the expensive case.
//!
//! Only loopback URLs are accepted.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The heartbeat text frame wsbeat sends; ignored by `pingpong`, timed by `idle`.
const HEARTBEAT: &str = "--heartbeat--";
/// Budget for one TCP connect + WebSocket handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Budget for a close handshake before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A reply that takes longer than this past the end of the window counts as an error.
const REPLY_GRACE: Duration = Duration::from_secs(5);

#[derive(Parser, Debug)]
#[command(about = "WebSocket load generator for the wsbeat benchmarks")]
struct Cli {
    /// Tokio worker threads (1 by default so the generator's CPU use is bounded).
    #[arg(long, default_value_t = 1, global = true)]
    threads: usize,
    /// PEM CA certificate(s) to trust for wss:// URLs (and nothing else).
    #[arg(long, global = true)]
    ca: Option<std::path::PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// N connections doing send-message/await-echo round trips.
    Pingpong(PingPongArgs),
    /// Hold N idle connections and time the heartbeats that arrive.
    Idle(IdleArgs),
    /// Open and close connections in a loop.
    Handshakes(HandshakeArgs),
}

#[derive(clap::Args, Debug)]
struct PingPongArgs {
    /// ws://127.0.0.1:PORT/...
    #[arg(long)]
    url: String,
    /// Connections.
    #[arg(long, default_value_t = 100)]
    conns: usize,
    /// Binary message size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Warm-up seconds, not counted.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Handshakes in flight at once while opening the connections.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// tungstenite read buffer per connection, bytes (default: 4 KiB, or 128 KiB for
    /// messages over 4 KiB).
    #[arg(long)]
    read_buffer: Option<usize>,
}

#[derive(clap::Args, Debug)]
struct IdleArgs {
    /// ws://127.0.0.1:PORT/...
    #[arg(long)]
    url: String,
    /// Connections.
    #[arg(long, default_value_t = 1000)]
    conns: usize,
    /// Seconds to hold the connections once all are open.
    #[arg(long, default_value_t = 30.0)]
    secs: f64,
    /// The heartbeat interval the proxy is configured with, in ms.
    #[arg(long, default_value_t = 4000)]
    interval_ms: u64,
    /// Connections opened per second at most while ramping up.
    #[arg(long, default_value_t = 2000.0)]
    ramp_rate: f64,
    /// Handshakes in flight at once while ramping up.
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// tungstenite read buffer per connection, bytes.
    #[arg(long, default_value_t = 4096)]
    read_buffer: usize,
}

#[derive(clap::Args, Debug)]
struct HandshakeArgs {
    /// ws://127.0.0.1:PORT/...
    #[arg(long)]
    url: String,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Warm-up seconds, not counted.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Concurrent workers, each opening and closing one connection at a time.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
}

fn main() {
    let cli = Cli::parse();
    let url = match &cli.cmd {
        Cmd::Pingpong(a) => &a.url,
        Cmd::Idle(a) => &a.url,
        Cmd::Handshakes(a) => &a.url,
    };
    if let Err(e) = check_loopback(url) {
        eprintln!("wsload: {e}");
        std::process::exit(2);
    }
    if let Some(ca) = &cli.ca {
        match tls_connector(ca) {
            Ok(c) => {
                let _ = TLS.set(c);
            }
            Err(e) => {
                eprintln!("wsload: --ca {}: {e}", ca.display());
                std::process::exit(2);
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsload: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Pingpong(a) => pingpong(a).await,
            Cmd::Idle(a) => idle(a).await,
            Cmd::Handshakes(a) => handshakes(a).await,
        }
    });
    // Do not wait for stray tasks (sockets still closing) on the way out.
    rt.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(json) => println!("{json}"),
        Err(e) => {
            eprintln!("wsload: {e}");
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------------------
// pingpong

#[derive(Default)]
struct PingPongStats {
    msgs: u64,
    heartbeats: u64,
    errors: u64,
    first_error: Option<String>,
}

async fn pingpong(a: PingPongArgs) -> Result<String, String> {
    warn_nofile(a.conns);
    let read_buffer = a
        .read_buffer
        .unwrap_or(if a.size > 4096 { 128 << 10 } else { 4096 });
    let config = ws_config(read_buffer);
    let (mut conns, failed, first_err) =
        open_all(&a.url, config, a.conns, a.connect_concurrency).await;
    if conns.is_empty() {
        return Err(format!(
            "no connection could be opened: {}",
            first_err.unwrap_or_default()
        ));
    }
    let payload = Bytes::from(vec![0xa5u8; a.size]);
    let start = Instant::now();
    let warm_end = start + Duration::from_secs_f64(a.warmup.max(0.0));
    let end = warm_end + Duration::from_secs_f64(a.secs.max(0.0));
    spawn_markers(warm_end, "measuring", end);

    let mut tasks = Vec::with_capacity(conns.len());
    for ws in conns.drain(..) {
        let payload = payload.clone();
        tasks.push(tokio::spawn(pingpong_conn(ws, payload, warm_end, end)));
    }
    let mut hist = new_hist();
    let mut stats = PingPongStats::default();
    let mut per_conn_min = u64::MAX;
    let mut per_conn_max = 0u64;
    for t in tasks {
        match t.await {
            Ok((h, s)) => {
                let _ = hist.add(&h);
                per_conn_min = per_conn_min.min(s.msgs);
                per_conn_max = per_conn_max.max(s.msgs);
                stats.msgs += s.msgs;
                stats.heartbeats += s.heartbeats;
                stats.errors += s.errors;
                if stats.first_error.is_none() {
                    stats.first_error = s.first_error;
                }
            }
            Err(e) => {
                stats.errors += 1;
                stats.first_error.get_or_insert(format!("task failed: {e}"));
            }
        }
    }
    let secs = a.secs.max(1e-9);
    let mut j = Json::new();
    j.str("mode", "pingpong")
        .int("conns_requested", a.conns as u64)
        .int("conns_open", a.conns as u64 - failed)
        .int("connect_failed", failed)
        .int("size", a.size as u64)
        .num("secs", a.secs)
        .int("msgs", stats.msgs)
        .num("msgs_per_sec", stats.msgs as f64 / secs)
        .num(
            "mib_per_sec",
            stats.msgs as f64 * a.size as f64 / secs / 1048576.0,
        )
        .int("lat_us_p50", quantile(&hist, 0.50))
        .int("lat_us_p90", quantile(&hist, 0.90))
        .int("lat_us_p99", quantile(&hist, 0.99))
        .int("lat_us_max", hist.max())
        // Fairness: round trips of the least and the most served connection.
        .int("per_conn_msgs_min", per_conn_min.min(per_conn_max))
        .int("per_conn_msgs_max", per_conn_max)
        .int("heartbeats_ignored", stats.heartbeats)
        .int("errors", stats.errors)
        .opt_str("first_error", stats.first_error.or(first_err).as_deref());
    Ok(j.finish())
}

async fn pingpong_conn(
    mut ws: Ws,
    payload: Bytes,
    warm_end: Instant,
    end: Instant,
) -> (Histogram<u64>, PingPongStats) {
    let mut hist = new_hist();
    let mut s = PingPongStats::default();
    let size = payload.len();
    let deadline = tokio::time::Instant::from_std(end + REPLY_GRACE);
    'outer: while Instant::now() < end {
        let t0 = Instant::now();
        if let Err(e) = ws.send(Message::Binary(payload.clone())).await {
            s.errors += 1;
            s.first_error = Some(format!("send: {e}"));
            break;
        }
        loop {
            let next = tokio::time::timeout_at(deadline, ws.next()).await;
            match next {
                Ok(Some(Ok(Message::Binary(b)))) => {
                    if b.len() != size {
                        s.errors += 1;
                        s.first_error = Some(format!("echo of {} bytes, sent {size}", b.len()));
                        break 'outer;
                    }
                    break;
                }
                Ok(Some(Ok(Message::Text(t)))) if t.as_str() == HEARTBEAT => s.heartbeats += 1,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                Ok(Some(Ok(other))) => {
                    s.errors += 1;
                    s.first_error = Some(format!("unexpected message: {}", describe(&other)));
                    break 'outer;
                }
                Ok(Some(Err(e))) => {
                    s.errors += 1;
                    s.first_error = Some(format!("read: {e}"));
                    break 'outer;
                }
                Ok(None) => {
                    s.errors += 1;
                    s.first_error = Some("connection ended".into());
                    break 'outer;
                }
                Err(_) => {
                    s.errors += 1;
                    s.first_error = Some("no echo within 5 s after the window".into());
                    break 'outer;
                }
            }
        }
        let t1 = Instant::now();
        if t1 >= warm_end && t1 <= end {
            s.msgs += 1;
            record(&mut hist, t1 - t0);
        }
    }
    close_gracefully(ws).await;
    (hist, s)
}

// ---------------------------------------------------------------------------------------
// idle

#[derive(Default)]
struct IdleStats {
    heartbeats_total: u64,
    heartbeats_hold: u64,
    pings_total: u64,
    pings_hold: u64,
    other_msgs: u64,
    /// The connection ended (or failed) before the hold was over.
    dropped: bool,
    drop_reason: Option<String>,
}

async fn idle(a: IdleArgs) -> Result<String, String> {
    warn_nofile(a.conns);
    let config = ws_config(a.read_buffer);
    let interval = Duration::from_millis(a.interval_ms);
    let hold_start: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let hold_end: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (open_tx, mut open_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let permits = Arc::new(Semaphore::new(a.connect_concurrency.max(1)));
    let rate = a.ramp_rate.max(1.0);

    let ramp_start = Instant::now();
    let mut tasks = Vec::with_capacity(a.conns);
    for i in 0..a.conns {
        // Bounded rate: connection i starts no earlier than i / rate seconds in.
        let due = ramp_start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return Err("semaphore closed".into());
        };
        let url = a.url.clone();
        let open_tx = open_tx.clone();
        let stop_rx = stop_rx.clone();
        let hold_start = hold_start.clone();
        let hold_end = hold_end.clone();
        tasks.push(tokio::spawn(async move {
            let ws = connect(&url, config).await;
            drop(permit);
            let ws = match ws {
                Ok(ws) => {
                    let _ = open_tx.send(Ok(()));
                    ws
                }
                Err(e) => {
                    let _ = open_tx.send(Err(e));
                    return None;
                }
            };
            Some(idle_conn(ws, interval, stop_rx, hold_start, hold_end).await)
        }));
    }
    drop(open_tx);
    // Wait for every handshake to finish (each is bounded by CONNECT_TIMEOUT).
    let mut opened = 0u64;
    let mut failed = 0u64;
    let mut first_err = None;
    while let Some(r) = open_rx.recv().await {
        match r {
            Ok(()) => opened += 1,
            Err(e) => {
                failed += 1;
                first_err.get_or_insert(e);
            }
        }
        if opened + failed == a.conns as u64 {
            break;
        }
    }
    let ramp_secs = ramp_start.elapsed().as_secs_f64();
    let t_hold = Instant::now();
    let _ = hold_start.set(t_hold);
    marker(&format!("holding {opened}"));
    tokio::time::sleep(Duration::from_secs_f64(a.secs.max(0.0))).await;
    let t_end = Instant::now();
    let _ = hold_end.set(t_end);
    marker("done");
    let _ = stop_tx.send(true);

    let mut lateness = new_hist();
    let mut total = IdleStats::default();
    let mut dropped = 0u64;
    for t in tasks {
        let Ok(Some((h, s))) = t.await else { continue };
        let _ = lateness.add(&h);
        total.heartbeats_total += s.heartbeats_total;
        total.heartbeats_hold += s.heartbeats_hold;
        total.pings_total += s.pings_total;
        total.pings_hold += s.pings_hold;
        total.other_msgs += s.other_msgs;
        if s.dropped {
            dropped += 1;
            if total.drop_reason.is_none() {
                total.drop_reason = s.drop_reason;
            }
        }
    }
    let hold_secs = (t_end - t_hold).as_secs_f64();
    let ms = |us: u64| us as f64 / 1000.0;
    let mut j = Json::new();
    j.str("mode", "idle")
        .int("conns_requested", a.conns as u64)
        .int("conns_open", opened)
        .int("connect_failed", failed)
        .num("ramp_secs", ramp_secs)
        .num("hold_secs", hold_secs)
        .int("interval_ms", a.interval_ms)
        .int("heartbeats_received", total.heartbeats_hold)
        .int("heartbeats_total", total.heartbeats_total)
        .int("pings_seen", total.pings_hold)
        .int("pings_total", total.pings_total)
        .int("lateness_samples", lateness.len())
        .num("lateness_ms_p50", ms(quantile(&lateness, 0.50)))
        .num("lateness_ms_p99", ms(quantile(&lateness, 0.99)))
        .num("lateness_ms_max", ms(lateness.max()))
        .int("other_msgs", total.other_msgs)
        .int("dropped_during_hold", dropped)
        .opt_str("first_error", first_err.as_deref())
        .opt_str("first_drop", total.drop_reason.as_deref());
    Ok(j.finish())
}

/// Reads until told to stop; times the heartbeats. A gap's lateness is recorded when the
/// heartbeat closing it arrives inside the hold window.
async fn idle_conn(
    mut ws: Ws,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
    hold_start: Arc<OnceLock<Instant>>,
    hold_end: Arc<OnceLock<Instant>>,
) -> (Histogram<u64>, IdleStats) {
    let mut hist = new_hist();
    let mut s = IdleStats::default();
    let mut prev: Option<Instant> = None;
    let in_hold = |t: Instant| {
        hold_start.get().is_some_and(|&h| t >= h) && hold_end.get().is_none_or(|&e| t <= e)
    };
    loop {
        tokio::select! {
            biased;
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
            msg = ws.next() => {
                let now = Instant::now();
                match msg {
                    Some(Ok(Message::Text(t))) if t.as_str() == HEARTBEAT => {
                        s.heartbeats_total += 1;
                        if in_hold(now) {
                            s.heartbeats_hold += 1;
                            if let Some(p) = prev {
                                record(&mut hist, (now - p).saturating_sub(interval));
                            }
                        }
                        prev = Some(now);
                    }
                    Some(Ok(Message::Ping(_))) => {
                        s.pings_total += 1;
                        if in_hold(now) {
                            s.pings_hold += 1;
                        }
                    }
                    Some(Ok(Message::Pong(_))) => {}
                    Some(Ok(_)) => s.other_msgs += 1,
                    Some(Err(e)) => {
                        s.dropped = true;
                        s.drop_reason = Some(format!("read: {e}"));
                        return (hist, s);
                    }
                    None => {
                        s.dropped = true;
                        s.drop_reason = Some("connection ended".into());
                        return (hist, s);
                    }
                }
            }
        }
    }
    close_gracefully(ws).await;
    (hist, s)
}

// ---------------------------------------------------------------------------------------
// handshakes

async fn handshakes(a: HandshakeArgs) -> Result<String, String> {
    warn_nofile(a.concurrency * 2);
    let config = ws_config(4096);
    let start = Instant::now();
    let warm_end = start + Duration::from_secs_f64(a.warmup.max(0.0));
    let end = warm_end + Duration::from_secs_f64(a.secs.max(0.0));
    spawn_markers(warm_end, "measuring", end);
    let errors = Arc::new(AtomicUsize::new(0));
    let first_error: Arc<OnceLock<String>> = Arc::new(OnceLock::new());
    let any_ok = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(a.concurrency);
    for _ in 0..a.concurrency.max(1) {
        let url = a.url.clone();
        let errors = errors.clone();
        let first_error = first_error.clone();
        let any_ok = any_ok.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = new_hist();
            let mut n = 0u64;
            while Instant::now() < end {
                let t0 = Instant::now();
                match connect(&url, config).await {
                    Ok(ws) => {
                        let t1 = Instant::now();
                        any_ok.store(true, Ordering::Relaxed);
                        if t1 >= warm_end && t1 <= end {
                            n += 1;
                            record(&mut hist, t1 - t0);
                        }
                        close_gracefully(ws).await;
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        let _ = first_error.set(e);
                        // Do not spin on a refusing target.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (hist, n)
        }));
    }
    let mut hist = new_hist();
    let mut total = 0u64;
    for t in tasks {
        if let Ok((h, n)) = t.await {
            let _ = hist.add(&h);
            total += n;
        }
    }
    if !any_ok.load(Ordering::Relaxed) {
        return Err(format!(
            "no handshake succeeded: {}",
            first_error.get().cloned().unwrap_or_default()
        ));
    }
    let mut j = Json::new();
    j.str("mode", "handshakes")
        .int("concurrency", a.concurrency as u64)
        .num("secs", a.secs)
        .int("handshakes", total)
        .num("handshakes_per_sec", total as f64 / a.secs.max(1e-9))
        .int("setup_us_p50", quantile(&hist, 0.50))
        .int("setup_us_p99", quantile(&hist, 0.99))
        .int("setup_us_max", hist.max())
        .int("errors", errors.load(Ordering::Relaxed) as u64)
        .opt_str("first_error", first_error.get().map(String::as_str));
    Ok(j.finish())
}

// ---------------------------------------------------------------------------------------
// helpers

fn ws_config(read_buffer: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer.max(64))
        .write_buffer_size(0)
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

/// The TLS client for wss:// URLs, from `--ca`.
static TLS: OnceLock<tokio_tungstenite::Connector> = OnceLock::new();

/// A rustls client (ring) that trusts the CA certificates in `ca` only and never resumes
/// a session: each connection pays for a full handshake.
fn tls_connector(ca: &std::path::Path) -> Result<tokio_tungstenite::Connector, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(tokio_tungstenite::Connector::Rustls(Arc::new(config)))
}

async fn connect(url: &str, config: WebSocketConfig) -> Result<Ws, String> {
    let tls = if url.starts_with("wss://") {
        Some(TLS.get().cloned().ok_or("a wss:// URL needs --ca")?)
    } else {
        None
    };
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_tungstenite::connect_async_tls_with_config(url, Some(config), true, tls),
    )
    .await
    {
        Ok(Ok((ws, _response))) => Ok(ws),
        Ok(Err(e)) => Err(format!("connect: {e}")),
        Err(_) => Err("connect: timed out after 10 s".into()),
    }
}

/// Opens `n` connections with at most `concurrency` handshakes in flight.
async fn open_all(
    url: &str,
    config: WebSocketConfig,
    n: usize,
    concurrency: usize,
) -> (Vec<Ws>, u64, Option<String>) {
    let results: Vec<Result<Ws, String>> = futures_util::stream::iter(0..n)
        .map(|_| connect(url, config))
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut ok = Vec::with_capacity(n);
    let mut failed = 0;
    let mut first = None;
    for r in results {
        match r {
            Ok(ws) => ok.push(ws),
            Err(e) => {
                failed += 1;
                first.get_or_insert(e);
            }
        }
    }
    (ok, failed, first)
}

/// Sends a close frame and waits (bounded) for the peer's close and the end of the stream.
async fn close_gracefully(mut ws: Ws) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if ws.close(None).await.is_err() {
            return;
        }
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

fn spawn_markers(first_at: Instant, first: &'static str, done_at: Instant) {
    tokio::spawn(async move {
        tokio::time::sleep_until(tokio::time::Instant::from_std(first_at)).await;
        marker(first);
        tokio::time::sleep_until(tokio::time::Instant::from_std(done_at)).await;
        marker("done");
    });
}

fn marker(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
    let _ = err.flush();
}

/// Microsecond histogram, 1 µs to 1 hour, 3 significant digits.
fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
    h.saturating_record(us);
}

fn quantile(h: &Histogram<u64>, q: f64) -> u64 {
    if h.is_empty() {
        0
    } else {
        h.value_at_quantile(q)
    }
}

fn describe(m: &Message) -> String {
    match m {
        Message::Text(t) => format!("text of {} bytes", t.len()),
        Message::Binary(b) => format!("binary of {} bytes", b.len()),
        Message::Close(c) => format!("close {c:?}"),
        Message::Ping(_) => "ping".into(),
        Message::Pong(_) => "pong".into(),
        Message::Frame(_) => "raw frame".into(),
    }
}

/// The benchmarks only ever target this machine.
fn check_loopback(url: &str) -> Result<(), String> {
    let uri: Uri = url.parse().map_err(|e| format!("bad url {url:?}: {e}"))?;
    if !matches!(uri.scheme_str(), Some("ws" | "wss")) {
        return Err(format!(
            "only ws:// and wss:// URLs are supported, got {url:?}"
        ));
    }
    let host = uri.host().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(format!("only loopback targets are allowed, got {host:?}"))
    }
}

/// Warns when the soft open-files limit cannot hold `sockets` (the driver raises it to the
/// hard limit before starting the generator).
fn warn_nofile(sockets: usize) {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(soft) = soft {
        if sockets + 32 > soft {
            eprintln!(
                "wsload: warning: {sockets} sockets but the open-files limit is {soft}; \
                 raise it (ulimit -n) up to the hard limit"
            );
        }
    }
}

/// A flat JSON object writer (numbers and strings only), to avoid a serde dependency.
struct Json {
    out: String,
}

impl Json {
    fn new() -> Self {
        Json {
            out: String::from("{"),
        }
    }

    fn key(&mut self, k: &str) {
        if self.out.len() > 1 {
            self.out.push(',');
        }
        let _ = write!(self.out, "\"{k}\":");
    }

    fn int(&mut self, k: &str, v: u64) -> &mut Self {
        self.key(k);
        let _ = write!(self.out, "{v}");
        self
    }

    fn num(&mut self, k: &str, v: f64) -> &mut Self {
        self.key(k);
        if v.is_finite() {
            let _ = write!(self.out, "{v:.3}");
        } else {
            self.out.push_str("null");
        }
        self
    }

    fn str(&mut self, k: &str, v: &str) -> &mut Self {
        self.key(k);
        self.out.push('"');
        for c in v.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(self.out, "\\u{:04x}", c as u32);
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
        self
    }

    fn opt_str(&mut self, k: &str, v: Option<&str>) -> &mut Self {
        match v {
            Some(v) => self.str(k, v),
            None => {
                self.key(k);
                self.out.push_str("null");
                self
            }
        }
    }

    fn finish(&mut self) -> String {
        let mut s = std::mem::take(&mut self.out);
        s.push('}');
        s
    }
}
