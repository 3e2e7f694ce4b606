//! Prometheus metrics: one `Metrics` struct of handles, registered once and passed as
//! `Arc`, holding the registry of live connections behind `/connections` and the
//! per-connection series.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::time::Instant;

use crate::config::Routes;
use crate::conn::{self, ConnectionView, Leg, Outcome, PerLeg, Summary};

/// Per-connection series are exported for at most this many connections (the oldest).
pub const PER_CONNECTION_CAP: usize = 1000;

const DIRECTIONS: [&str; 2] = ["to_client", "to_upstream"];
const KINDS: [&str; 3] = ["text", "binary", "close"];
/// Why a WebSocket upgrade was refused before the upstream was dialled: the `reason` of
/// `wsbeat_handshakes_rejected_total`.
pub const HANDSHAKE_REJECT_REASONS: [&str; 5] =
    ["origin", "max_connections", "per_ip", "bad_request", "path"];

/// `reason` label values of `wsbeat_upstream_errors_total`.
/// `timeout`, `connect`: dialing; `tls`: the upstream's certificate or TLS handshake;
/// `handshake`, `refused`: the WebSocket handshake; `http`: a plain-HTTP exchange that
/// broke before the response head; `lost`: an established WebSocket's upstream
/// connection ended without a close frame (the backend crashed or reset it).
pub const UPSTREAM_ERROR_REASONS: [&str; 7] = [
    "timeout",
    "connect",
    "tls",
    "handshake",
    "refused",
    "http",
    "lost",
];
/// Round trips and connect times: 1 ms to 10 s.
const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Plain-HTTP time to response head: 1 ms to 60 s (the default request timeout).
const HTTP_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Connection lifetimes: 1 s to 1 day.
const DURATION_BUCKETS: [f64; 10] = [
    1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14_400.0, 43_200.0, 86_400.0,
];
/// Gaps between client frames: 10 ms to 2 min.
const SILENCE_BUCKETS: [f64; 11] = [0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0];

/// The `code` label of a close code: known codes by number, others as `other`.
pub fn close_code_label(code: Option<u16>) -> &'static str {
    const KNOWN: [&str; 16] = [
        "1000", "1001", "1002", "1003", "1004", "1005", "1006", "1007", "1008", "1009", "1010",
        "1011", "1012", "1013", "1014", "1015",
    ];
    match code {
        // A leg that ended without a close frame: "abnormal closure".
        None => "1006",
        Some(c @ 1000..=1015) => KNOWN[usize::from(c - 1000)],
        Some(_) => "other",
    }
}

/// Every metric family, registered once.
pub struct Metrics {
    registry: Registry,
    /// `metrics.per_connection`, as the configuration in use says.
    per_connection: AtomicBool,
    pub connections_active: IntGaugeVec,
    pub connections_total: IntCounterVec,
    pub connection_duration: HistogramVec,
    pub heartbeats_sent: IntCounterVec,
    pub client_heartbeats_dropped: IntCounterVec,
    pub pings_sent: IntCounterVec,
    pub pongs_received: IntCounterVec,
    pub pong_rtt: HistogramVec,
    pub client_silence: HistogramVec,
    pub liveness_timeouts: IntCounterVec,
    pub messages: IntCounterVec,
    pub bytes: IntCounterVec,
    pub upstream_connect: HistogramVec,
    pub upstream_errors: IntCounterVec,
    pub close_codes: IntCounterVec,
    pub http_requests: IntCounterVec,
    pub http_request_duration: HistogramVec,
    /// Plain HTTP requests sent again on a new connection after a reused one failed.
    pub upstream_retries: IntCounterVec,
    /// Plain HTTP requests from HTTP/2 clients whose trailers were dropped on the way to
    /// the HTTP/1.1 upstream.
    pub http2_trailers_dropped: IntCounterVec,
    /// TLS handshakes that failed, by `leg` (a client that sends nothing and closes is
    /// not counted; one that sends nothing until `limits.handshake_timeout` is).
    pub tls_handshake_errors: IntCounterVec,
    /// Accepted client TCP connections open now (`limits.max_tcp_connections`).
    pub tcp_connections_active: IntGauge,
    /// Client HTTP connections open now by protocol `version` (`1.1`, `2`): one HTTP/2
    /// connection may carry many WebSockets (`http2: true`).
    pub client_http_connections_active: IntGaugeVec,
    /// Connections closed because they did not start with a valid PROXY protocol header
    /// (`proxy_protocol: true`).
    pub proxy_protocol_errors: IntCounter,
    /// WebSocket upgrades refused before the upstream was dialled, by `route` and one of
    /// [`HANDSHAKE_REJECT_REASONS`].
    pub handshakes_rejected: IntCounterVec,
    /// Reloads of the configuration, by `result` (`success`, `failure`).
    pub config_reloads: IntCounterVec,
    /// 1 when the last load of the configuration (start-up or reload) succeeded.
    pub config_last_reload_successful: IntGauge,
    /// When the configuration in use was loaded (Unix seconds).
    pub config_last_reload_success_timestamp: Gauge,
    /// Proxied WebSockets open now with `permessage-deflate` negotiated end to end.
    pub compressed_connections_active: IntGaugeVec,
    connection_last_seen: GaugeVec,
    connection_pong_rtt: GaugeVec,
    /// The live WebSockets, listed by `/connections` and the per-connection series.
    live: conn::Registry,
    /// Held while rendering: the per-connection series are rebuilt at each scrape, and
    /// two overlapping scrapes must not see each other's half-built set.
    render: Mutex<()>,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("registered once");
    c
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    let h = HistogramVec::new(opts, labels).expect("valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("registered once");
    h
}

impl Metrics {
    /// Registers every family and creates the series whose label values are known
    /// (every route, leg, direction, outcome), so every family is exported from start-up.
    pub fn new(routes: &Routes, per_connection: bool) -> Arc<Metrics> {
        let r = Registry::new();
        let connections_active = IntGaugeVec::new(
            Opts::new("wsbeat_connections_active", "Proxied WebSockets open now."),
            &["route"],
        )
        .expect("valid metric");
        r.register(Box::new(connections_active.clone()))
            .expect("registered once");
        let gauge = |name: &str, help: &str| {
            let g = GaugeVec::new(Opts::new(name, help), &["conn"]).expect("valid metric");
            r.register(Box::new(g.clone())).expect("registered once");
            g
        };
        let m = Metrics {
            per_connection: AtomicBool::new(per_connection),
            connections_active,
            connections_total: counter(
                &r,
                "wsbeat_connections_total",
                "Proxied WebSockets that ended, by how they ended.",
                &["route", "outcome"],
            ),
            connection_duration: histogram(
                &r,
                "wsbeat_connection_duration_seconds",
                "Lifetime of proxied WebSockets.",
                &["route"],
                &DURATION_BUCKETS,
            ),
            heartbeats_sent: counter(
                &r,
                "wsbeat_heartbeats_sent_total",
                "Heartbeat text frames sent to clients.",
                &["route"],
            ),
            client_heartbeats_dropped: counter(
                &r,
                "wsbeat_client_heartbeats_dropped_total",
                "Heartbeats from clients, dropped before the upstream.",
                &["route"],
            ),
            pings_sent: counter(
                &r,
                "wsbeat_pings_sent_total",
                "Protocol PINGs sent.",
                &["route", "leg"],
            ),
            pongs_received: counter(
                &r,
                "wsbeat_pongs_received_total",
                "Protocol PONGs received.",
                &["route", "leg"],
            ),
            pong_rtt: histogram(
                &r,
                "wsbeat_pong_rtt_seconds",
                "Round trip from a PING to its PONG.",
                &["route", "leg"],
                &LATENCY_BUCKETS,
            ),
            client_silence: histogram(
                &r,
                "wsbeat_client_silence_seconds",
                "Gap between frames from a client, observed at each frame.",
                &["route"],
                &SILENCE_BUCKETS,
            ),
            liveness_timeouts: counter(
                &r,
                "wsbeat_liveness_timeouts_total",
                "Peers declared dead after the liveness timeout.",
                &["route", "leg"],
            ),
            messages: counter(
                &r,
                "wsbeat_messages_total",
                "Data messages and close frames forwarded (not heartbeats or PINGs).",
                &["route", "direction", "kind"],
            ),
            bytes: counter(
                &r,
                "wsbeat_bytes_total",
                "Payload bytes of data messages forwarded.",
                &["route", "direction"],
            ),
            upstream_connect: histogram(
                &r,
                "wsbeat_upstream_connect_seconds",
                "Time to connect to the upstream and complete its handshake.",
                &["route"],
                &LATENCY_BUCKETS,
            ),
            upstream_errors: counter(
                &r,
                "wsbeat_upstream_errors_total",
                "Upstream handshakes that failed or were refused.",
                &["route", "reason"],
            ),
            close_codes: counter(
                &r,
                "wsbeat_close_codes_total",
                "Close codes that ended each leg (1006: no close frame).",
                &["leg", "code"],
            ),
            http_requests: counter(
                &r,
                "wsbeat_http_requests_total",
                "HTTP responses on the public listener, by status.",
                &["route", "status"],
            ),
            http_request_duration: histogram(
                &r,
                "wsbeat_http_request_duration_seconds",
                "Plain HTTP: time from the request head to the response head sent back.",
                &["route"],
                &HTTP_BUCKETS,
            ),
            upstream_retries: counter(
                &r,
                "wsbeat_upstream_retries_total",
                "Plain HTTP requests sent again on a new connection after a reused pooled one failed before the response.",
                &["route"],
            ),
            http2_trailers_dropped: counter(
                &r,
                "wsbeat_request_trailers_dropped_total",
                "Plain HTTP requests from HTTP/2 clients whose trailers were dropped on the way to the HTTP/1.1 upstream.",
                &["route"],
            ),
            tls_handshake_errors: counter(
                &r,
                "wsbeat_tls_handshake_errors_total",
                "TLS handshakes that failed or timed out.",
                &["leg"],
            ),
            tcp_connections_active: {
                let g = IntGauge::new(
                    "wsbeat_tcp_connections_active",
                    "Accepted client TCP connections open now, of every kind.",
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("registered once");
                g
            },
            client_http_connections_active: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "wsbeat_client_http_connections_active",
                        "Client HTTP connections open now, by HTTP version (1.1, 2).",
                    ),
                    &["version"],
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("registered once");
                for version in ["1.1", "2"] {
                    g.with_label_values(&[version]);
                }
                g
            },
            proxy_protocol_errors: {
                let c = IntCounter::new(
                    "wsbeat_proxy_protocol_errors_total",
                    "Connections closed for a missing, invalid or late PROXY protocol header.",
                )
                .expect("valid metric");
                r.register(Box::new(c.clone())).expect("registered once");
                c
            },
            handshakes_rejected: counter(
                &r,
                "wsbeat_handshakes_rejected_total",
                "WebSocket upgrades refused before the upstream was dialled, by reason.",
                &["route", "reason"],
            ),
            config_reloads: counter(
                &r,
                "wsbeat_config_reloads_total",
                "Reloads of the configuration (SIGHUP or a changed file), by result.",
                &["result"],
            ),
            config_last_reload_successful: {
                let g = IntGauge::new(
                    "wsbeat_config_last_reload_successful",
                    "1 when the last load of the configuration (start-up or reload) succeeded, else 0.",
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("registered once");
                g
            },
            config_last_reload_success_timestamp: {
                let g = Gauge::new(
                    "wsbeat_config_last_reload_success_timestamp_seconds",
                    "When the configuration in use was loaded (start-up or reload), Unix time.",
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("registered once");
                g
            },
            compressed_connections_active: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "wsbeat_compressed_connections_active",
                        "Proxied WebSockets open now with permessage-deflate negotiated end to end.",
                    ),
                    &["route"],
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("registered once");
                g
            },
            connection_last_seen: gauge(
                "wsbeat_connection_last_seen_seconds",
                "Seconds since the client's last frame, per connection (metrics.per_connection).",
            ),
            connection_pong_rtt: gauge(
                "wsbeat_connection_pong_rtt_seconds",
                "Last PONG round trip, per connection (metrics.per_connection).",
            ),
            registry: r,
            live: conn::Registry::new(),
            render: Mutex::new(()),
        };
        m.add_routes(routes);
        for result in ["success", "failure"] {
            m.config_reloads.with_label_values(&[result]);
        }
        // The start is a successful load.
        m.config_loaded(true);
        for leg in Leg::BOTH.map(Leg::as_str) {
            m.tls_handshake_errors.with_label_values(&[leg]);
            for code in [1000u16, 1001, 1006, 1011] {
                m.close_codes
                    .with_label_values(&[leg, close_code_label(Some(code))]);
            }
        }
        Arc::new(m)
    }

    /// Creates the series of `routes` (at start-up, and for the routes a reload adds), so
    /// a route's families are exported before its first connection.
    pub fn add_routes(&self, routes: &Routes) {
        for route in routes.all() {
            let name = route.name.as_str();
            self.connections_active.with_label_values(&[name]);
            self.compressed_connections_active
                .with_label_values(&[name]);
            self.connection_duration.with_label_values(&[name]);
            self.heartbeats_sent.with_label_values(&[name]);
            self.client_heartbeats_dropped.with_label_values(&[name]);
            self.client_silence.with_label_values(&[name]);
            self.upstream_connect.with_label_values(&[name]);
            self.http_requests.with_label_values(&[name, "101"]);
            self.http_request_duration.with_label_values(&[name]);
            self.upstream_retries.with_label_values(&[name]);
            self.http2_trailers_dropped.with_label_values(&[name]);
            for outcome in Outcome::ALL {
                self.connections_total
                    .with_label_values(&[name, outcome.as_str()]);
            }
            for leg in Leg::BOTH.map(Leg::as_str) {
                self.pings_sent.with_label_values(&[name, leg]);
                self.pongs_received.with_label_values(&[name, leg]);
                self.pong_rtt.with_label_values(&[name, leg]);
                self.liveness_timeouts.with_label_values(&[name, leg]);
            }
            for direction in DIRECTIONS {
                self.bytes.with_label_values(&[name, direction]);
                for kind in KINDS {
                    self.messages.with_label_values(&[name, direction, kind]);
                }
            }
            for reason in HANDSHAKE_REJECT_REASONS {
                self.handshakes_rejected.with_label_values(&[name, reason]);
            }
            for reason in UPSTREAM_ERROR_REASONS {
                self.upstream_errors.with_label_values(&[name, reason]);
            }
        }
    }

    /// Records a load of the configuration: the start (`true`, not counted as a reload)
    /// or a reload's result ([`Metrics::reloaded`]).
    fn config_loaded(&self, ok: bool) {
        self.config_last_reload_successful.set(i64::from(ok));
        if ok {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            self.config_last_reload_success_timestamp.set(now);
        }
    }

    /// Counts a reload and its result.
    pub fn reloaded(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.config_reloads.with_label_values(&[result]).inc();
        self.config_loaded(ok);
    }

    /// `metrics.per_connection` of a reloaded configuration. Turned off, the series go
    /// at once.
    pub fn set_per_connection(&self, on: bool) {
        let _rendering = self.render.lock().unwrap_or_else(|e| e.into_inner());
        if !self.per_connection.swap(on, Ordering::Relaxed) || on {
            return;
        }
        self.connection_last_seen.reset();
        self.connection_pong_rtt.reset();
    }

    /// The handles one connection updates, resolved once for its route.
    pub fn for_route(&self, route: &str) -> ConnMetrics {
        // `direction` is the leg a message goes to.
        let direction = |to: Leg| match to {
            Leg::Client => "to_client",
            Leg::Upstream => "to_upstream",
        };
        let msg = |to: Leg, kind: &str| {
            self.messages
                .with_label_values(&[route, direction(to), kind])
        };
        let by_leg = |family: &IntCounterVec| {
            PerLeg::new(|leg| family.with_label_values(&[route, leg.as_str()]))
        };
        ConnMetrics {
            heartbeats_sent: self.heartbeats_sent.with_label_values(&[route]),
            client_heartbeats_dropped: self.client_heartbeats_dropped.with_label_values(&[route]),
            pings_sent: by_leg(&self.pings_sent),
            pongs_received: by_leg(&self.pongs_received),
            pong_rtt: PerLeg::new(|leg| self.pong_rtt.with_label_values(&[route, leg.as_str()])),
            liveness_timeouts: by_leg(&self.liveness_timeouts),
            client_silence: self.client_silence.with_label_values(&[route]),
            messages_to: PerLeg::new(|to| MessageCounters {
                text: msg(to, "text"),
                binary: msg(to, "binary"),
                close: msg(to, "close"),
            }),
            bytes_to: PerLeg::new(|to| self.bytes.with_label_values(&[route, direction(to)])),
            upstream_lost: self.upstream_errors.with_label_values(&[route, "lost"]),
        }
    }

    /// A WebSocket is open: count it and list it.
    pub fn open(&self, view: Arc<ConnectionView>) {
        self.connections_active
            .with_label_values(&[&view.route])
            .inc();
        self.live.insert(view);
    }

    /// A WebSocket ended: count how, and forget it.
    pub fn close(&self, view: &ConnectionView, summary: &Summary) {
        let route = view.route.as_str();
        self.live.remove(view.id);
        self.connections_active.with_label_values(&[route]).dec();
        self.connections_total
            .with_label_values(&[route, summary.outcome.as_str()])
            .inc();
        self.connection_duration
            .with_label_values(&[route])
            .observe(view.started.elapsed().as_secs_f64());
        for (leg, code) in summary.close_codes().iter() {
            self.close_codes
                .with_label_values(&[leg.as_str(), close_code_label(*code)])
                .inc();
        }
    }

    /// The live WebSockets (`/connections`).
    pub fn connections(&self) -> &conn::Registry {
        &self.live
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        let _rendering = self.render.lock().unwrap_or_else(|e| e.into_inner());
        if self.per_connection.load(Ordering::Relaxed) {
            self.refresh_per_connection();
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }

    /// Rebuilds the per-connection series from the live views: the oldest
    /// `PER_CONNECTION_CAP` connections; closed ones disappear.
    fn refresh_per_connection(&self) {
        self.connection_last_seen.reset();
        self.connection_pong_rtt.reset();
        let now = Instant::now();
        for view in self.live.list().iter().take(PER_CONNECTION_CAP) {
            let conn = view.id.to_string();
            self.connection_last_seen
                .with_label_values(&[&conn])
                .set(view.last_client_frame_ago(now).as_secs_f64());
            if let Some(rtt) = view.last_pong_rtt() {
                self.connection_pong_rtt
                    .with_label_values(&[&conn])
                    .set(rtt.as_secs_f64());
            }
        }
    }
}

/// The handles a connection updates, per leg where the family has a `leg` label, and
/// per destination leg (`direction`) for what is forwarded.
pub struct ConnMetrics {
    pub heartbeats_sent: IntCounter,
    pub client_heartbeats_dropped: IntCounter,
    pub pings_sent: PerLeg<IntCounter>,
    pub pongs_received: PerLeg<IntCounter>,
    pub pong_rtt: PerLeg<Histogram>,
    pub liveness_timeouts: PerLeg<IntCounter>,
    pub client_silence: Histogram,
    /// `wsbeat_messages_total`, by the leg the messages go to.
    pub messages_to: PerLeg<MessageCounters>,
    /// `wsbeat_bytes_total`, by the leg the bytes go to.
    pub bytes_to: PerLeg<IntCounter>,
    /// `wsbeat_upstream_errors_total{reason="lost"}`.
    pub upstream_lost: IntCounter,
}

/// `wsbeat_messages_total` of one direction, by `kind`.
pub struct MessageCounters {
    pub text: IntCounter,
    pub binary: IntCounter,
    pub close: IntCounter,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_are_a_bounded_label_set() {
        assert_eq!(close_code_label(Some(1000)), "1000");
        assert_eq!(close_code_label(Some(1015)), "1015");
        assert_eq!(close_code_label(Some(4000)), "other");
        assert_eq!(close_code_label(Some(999)), "other");
        assert_eq!(close_code_label(None), "1006");
    }

    #[test]
    fn every_family_is_exported_from_start_up() {
        let config = crate::Config::default();
        let m = Metrics::new(&config.routes(), false);
        let text = String::from_utf8(m.render()).unwrap();
        for family in [
            "wsbeat_connections_active",
            "wsbeat_compressed_connections_active",
            "wsbeat_connections_total",
            "wsbeat_connection_duration_seconds",
            "wsbeat_pong_rtt_seconds",
            "wsbeat_upstream_errors_total",
            "wsbeat_close_codes_total",
            "wsbeat_http_requests_total",
            "wsbeat_http_request_duration_seconds",
            "wsbeat_upstream_retries_total",
            "wsbeat_request_trailers_dropped_total",
            "wsbeat_handshakes_rejected_total",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{family} missing"
            );
        }
    }
}
