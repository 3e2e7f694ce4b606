//! The configuration document: the YAML file's serde structs with their defaults, and
//! loading (read, parse, validate) and printing it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{ByteSize, Cidr, ConfigError, HumanDuration, RouteConfig, UpstreamUrl};

/// The whole configuration file. Every key has a default, so a file holding only
/// `upstream.url` works; unknown keys are errors.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the public listener: WebSockets and plain HTTP on one port.
    pub listen: SocketAddr,
    /// Every accepted connection starts with a PROXY protocol header (v1 or v2, told
    /// apart by its first bytes), as an L4 load balancer sends it (AWS NLB, HAProxy
    /// `send-proxy`/`send-proxy-v2`). Its source address is the client's address; a v2
    /// `LOCAL` header (a health check) keeps the peer's. It is read within
    /// `limits.handshake_timeout`, before TLS; a connection without a valid header is
    /// closed and counted (`wsbeat_proxy_protocol_errors_total`). Only turn this on
    /// when every connection comes through such a load balancer.
    pub proxy_protocol: bool,
    /// Networks (`10.0.0.0/8`, `fc00::/7`, a bare address) of the load balancers and
    /// proxies in front of wsbeat. From a peer in one of them, `X-Forwarded-Proto`,
    /// `X-Forwarded-Host`, `X-Real-IP` and `Forwarded` are passed on as they came, and the
    /// client address (logs, `/connections`) is the rightmost `X-Forwarded-For` address
    /// that is not itself trusted. From any other peer, wsbeat sets them from what it saw.
    /// `X-Forwarded-For` is always appended to. Empty (the default): nobody is trusted.
    pub trusted_proxies: Vec<Cidr>,
    /// HTTP/2 on the client leg: TLS listeners offer ALPN `h2` then `http/1.1`, cleartext
    /// ones also accept HTTP/2 with prior knowledge (h2c), and WebSockets may arrive as
    /// RFC 8441 extended CONNECT streams, many on one connection. The upstream leg stays
    /// HTTP/1.1. HTTP/2 PINGs (`liveness.ping_interval`, `liveness.timeout`) end every
    /// stream of a dead connection. `false` (the default): HTTP/1.1 only.
    pub http2: bool,
    /// How changes of this file are noticed (SIGHUP always reloads).
    pub reload: ReloadConfig,
    /// Terminate TLS on the public listener. Absent: plain TCP.
    pub tls: Option<TlsConfig>,
    /// The admin listener (`/metrics`, `/livez`, `/readyz`, `/connections`).
    pub admin: AdminConfig,
    /// The fallback upstream, used by every request no route matches (route `default`).
    pub upstream: UpstreamConfig,
    /// Path-prefix routes; the longest matching prefix wins, else `upstream`.
    pub routes: Vec<RouteConfig>,
    /// Origins (`https://app.example`) whose pages may open WebSockets; a handshake
    /// from any other `Origin` gets 403 (cross-site WebSocket hijacking). A handshake
    /// without `Origin` (not from a browser) passes. `null`: any origin.
    pub allowed_origins: Option<Vec<String>>,
    /// A path (`/_wsbeat.js`) at which wsbeat serves its own browser client, the
    /// `clients/js/wsbeat.js` it was built with, instead of passing the request on.
    /// Exactly that path, GET and HEAD; `null` (the default): never, so no application
    /// route is shadowed.
    pub client_script: Option<String>,
    /// `permessage-deflate` (RFC 7692), per route: `passthrough` (the default) negotiates
    /// it end to end (the client's offer goes upstream with `client_no_context_takeover`
    /// added) and forwards compressed messages byte for byte; `off` strips the offer, so
    /// both legs are uncompressed.
    pub compression: Compression,
    /// Heartbeats sent to clients and dropped from them (the ws4redis protocol).
    pub heartbeat: HeartbeatConfig,
    /// Protocol PINGs and the dead-peer verdict.
    pub liveness: LivenessConfig,
    /// Bounds on connections, messages and slow peers.
    pub limits: LimitsConfig,
    /// Graceful shutdown on SIGTERM / SIGINT.
    pub shutdown: ShutdownConfig,
    /// Prometheus export options.
    pub metrics: MetricsConfig,
    /// The async runtime (read at start; a change needs a restart).
    pub runtime: RuntimeConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            proxy_protocol: false,
            trusted_proxies: Vec::new(),
            http2: false,
            reload: ReloadConfig::default(),
            tls: None,
            admin: AdminConfig::default(),
            upstream: UpstreamConfig::default(),
            routes: Vec::new(),
            allowed_origins: None,
            client_script: None,
            compression: Compression::default(),
            heartbeat: HeartbeatConfig::default(),
            liveness: LivenessConfig::default(),
            limits: LimitsConfig::default(),
            shutdown: ShutdownConfig::default(),
            metrics: MetricsConfig::default(),
            runtime: RuntimeConfig::default(),
        }
    }
}

/// Reloading the configuration file (SIGHUP reloads it whatever this says).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ReloadConfig {
    /// How often the config file is looked at (its resolved path and its content, so a
    /// Kubernetes ConfigMap's `..data` symlink swap is seen); a change reloads it. `null`:
    /// only SIGHUP reloads. The certificate files are watched on their own, about once a
    /// second, whatever this says.
    pub watch: Option<HumanDuration>,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            watch: Some(HumanDuration::secs(2)),
        }
    }
}

/// TLS termination on the public listener. The files are reloaded when they change
/// (a Kubernetes secret rotation swaps a symlink): new handshakes get the new
/// certificate, open connections keep theirs.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, the server's certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The admin listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener; `null` turns it off. A sidecar sets `0.0.0.0:9090`
    /// so Prometheus can scrape the pod.
    pub listen: Option<SocketAddr>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
        }
    }
}

/// Where a route's connections go.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `ws://host:port` (or `wss://`). The request's canonical path and its query, as
    /// sent, are forwarded.
    pub url: UpstreamUrl,
    /// Time allowed to connect and complete the upstream handshake; past it the client
    /// gets 504.
    pub connect_timeout: HumanDuration,
    /// Plain HTTP: time allowed from sending a request to the upstream's response head
    /// (a retry on a new connection included); past it the client gets 504. The body
    /// after the head is not timed (downloads and server-sent events stream as long as
    /// they last).
    pub request_timeout: HumanDuration,
    /// Plain HTTP: an idle pooled connection to the upstream is closed after this long.
    /// Keep it below the backend's own keep-alive timeout (Node's `http` server announces
    /// 5 s), so wsbeat forgets a connection before the backend closes it under a request.
    pub pool_idle_timeout: HumanDuration,
    /// PEM CA bundle that signs a `wss://` upstream's certificate; absent: the webpki
    /// (Mozilla) roots. There is no switch that turns verification off.
    pub ca: Option<PathBuf>,
    /// The name a `wss://` upstream's certificate must carry, also sent as SNI; absent:
    /// the URL's host.
    pub server_name: Option<String>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: UpstreamUrl::from_str("ws://127.0.0.1:8000").expect("default upstream URL"),
            connect_timeout: HumanDuration::secs(5),
            request_timeout: HumanDuration::secs(60),
            pool_idle_timeout: HumanDuration::secs(4),
            ca: None,
            server_name: None,
        }
    }
}

/// What a route does with `permessage-deflate`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Negotiated end to end; compressed messages pass byte for byte, and wsbeat keeps
    /// no zlib state (it inflates only short client messages, alone, to spot the
    /// heartbeat).
    #[default]
    Passthrough,
    /// The client's offer is stripped: both legs are uncompressed.
    Off,
}

/// How heartbeats are scheduled.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum HeartbeatMode {
    /// A heartbeat at least every `interval`, whatever other traffic flows (what the
    /// ws4redis client needs).
    #[default]
    Interval,
    /// A heartbeat only after `interval` with no data message sent to the client.
    Idle,
}

/// Heartbeats (the ws4redis protocol).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// The text sent to clients as a text frame; `null` turns text heartbeats off.
    pub message: Option<String>,
    /// Heartbeat period.
    pub interval: HumanDuration,
    /// `interval` or `idle`.
    pub mode: HeartbeatMode,
    /// Drop client text messages exactly equal to `message` (they never reach the
    /// upstream) and count them as proof of life.
    pub drop_client: bool,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            message: Some("--heartbeat--".to_owned()),
            interval: HumanDuration::secs(4),
            mode: HeartbeatMode::Interval,
            drop_client: true,
        }
    }
}

/// Liveness: PINGs to find dead and half-open peers.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LivenessConfig {
    /// A protocol PING goes to a client silent this long (browsers answer by
    /// themselves); with heartbeats on, in the write of the heartbeat that follows.
    pub ping_interval: HumanDuration,
    /// A client alive by its own frames (never silent for `ping_interval`) is PINGed
    /// this often, so that its RTT stays measured (`ping_interval` if that is longer).
    pub rtt_sample_interval: HumanDuration,
    /// Nothing from the client for this long: it is dead; both legs are closed with 1001.
    pub timeout: HumanDuration,
    /// Also PING the upstream this often; it is dead after `timeout` without a frame, and
    /// the client is closed with 1011. `null`: never.
    pub upstream_ping_interval: Option<HumanDuration>,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        LivenessConfig {
            ping_interval: HumanDuration::secs(10),
            rtt_sample_interval: HumanDuration::secs(60),
            timeout: HumanDuration::secs(30),
            upstream_ping_interval: None,
        }
    }
}

/// Bounds on what one peer can cost.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Proxied WebSockets at once; past it a handshake gets 503.
    pub max_connections: usize,
    /// WebSockets one client address may hold at once (IPv6 clients grouped by their
    /// /64); past it an upgrade gets `429 Too Many Requests` with `Retry-After`, and the
    /// upstream is never dialled. The client address is the one `trusted_proxies` and
    /// `proxy_protocol` name. `null`: no per-address limit.
    pub max_connections_per_ip: Option<usize>,
    /// Client TCP connections at once, of every kind (WebSockets, plain-HTTP keep-alive
    /// connections, TLS handshakes in progress). At the cap wsbeat stops accepting until
    /// one closes: new connections wait in the kernel's backlog (and the load balancer
    /// retries), they are never accepted and reset. `null`: derived from the open-file
    /// limit (`RLIMIT_NOFILE`, raised to its hard limit at start-up), half of it less a
    /// reserve, since a proxied connection needs two descriptors: wsbeat never fails
    /// with "too many open files".
    pub max_tcp_connections: Option<usize>,
    /// Largest message (and frame) accepted on either leg; a larger one closes with 1009.
    pub max_message_size: ByteSize,
    /// A WebSocket open for this long is closed the way a drain closes it (the client
    /// first, nothing lost, 1001), so that clients reconnect and spread over the pods
    /// there are now: without it, pods added by a scale-out get no existing connection.
    /// Each connection's limit is jittered by up to ±10%, so connections opened together
    /// do not all end together; closes are counted as `outcome="max_age"`. A connection
    /// keeps the limit it started with. `null` (the default): no limit.
    pub max_connection_age: Option<HumanDuration>,
    /// With `http2: true`: streams one HTTP/2 connection may have open at once (plain
    /// requests and WebSockets), advertised as `SETTINGS_MAX_CONCURRENT_STREAMS`.
    pub max_streams_per_connection: u32,
    /// A client that has not sent a whole request head after this long is dropped:
    /// counted from the connection's start (after TLS), or from the first byte of a
    /// later request on a keep-alive connection.
    pub handshake_timeout: HumanDuration,
    /// A plain-HTTP keep-alive connection with no request for this long (from the end
    /// of its last response to the next request's first byte) is closed.
    pub http_idle_timeout: HumanDuration,
    /// A peer that takes no bytes for this long while wsbeat has some for it is closed.
    pub write_timeout: HumanDuration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 100_000,
            max_connections_per_ip: None,
            max_tcp_connections: None,
            max_message_size: ByteSize(16 << 20),
            max_connection_age: None,
            max_streams_per_connection: 100,
            handshake_timeout: HumanDuration::secs(10),
            http_idle_timeout: HumanDuration::secs(60),
            write_timeout: HumanDuration::secs(30),
        }
    }
}

/// Graceful shutdown.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// After SIGTERM, the longest wait for WebSockets to finish their close handshakes.
    pub drain_timeout: HumanDuration,
    /// After SIGTERM, the WebSockets' close frames (1001) go out spread evenly over this
    /// long instead of all at once, so the clients of a terminating pod do not all
    /// reconnect to the other pods in the same second. At most `drain_timeout`; leave
    /// the last connections a few seconds of `drain_timeout` for their close handshakes.
    /// `0s` (the default): all at once.
    pub close_spread: HumanDuration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout: HumanDuration::secs(25),
            close_spread: HumanDuration::secs(0),
        }
    }
}

/// The async runtime.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Threads that run connections, each with a current-thread runtime of its own
    /// accepting on `listen`. `null`: the number of cores the process may use.
    pub workers: Option<usize>,
}

impl RuntimeConfig {
    /// Worker threads to start: `workers`, or the cores available.
    pub fn worker_threads(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }
}

/// Prometheus export options.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Export per-connection series (at most 1000, removed on close).
    pub per_connection: bool,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_yaml(&text, &path.display().to_string())
    }

    /// Parses and validates YAML text; `origin` names it in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_saphyr::with_deserializer_from_str(text, |de| {
                serde_path_to_error::deserialize::<_, Config>(de).map_err(|e| {
                    let path = e.path().to_string();
                    let inner = e.into_inner();
                    <serde_saphyr::Error as serde::de::Error>::custom(if path == "." {
                        inner.to_string()
                    } else {
                        format!("key `{path}`: {inner}")
                    })
                })
            })
            .map_err(|e| ConfigError::Parse {
                path: origin.to_owned(),
                message: e.to_string(),
            })?
        };
        config.validate()?;
        Ok(config)
    }

    /// The effective configuration as YAML (what `wsbeat check` prints).
    pub fn to_yaml(&self) -> String {
        let mut yaml =
            serde_saphyr::to_string(self).unwrap_or_else(|e| format!("# cannot render: {e}"));
        if !yaml.ends_with('\n') {
            yaml.push('\n');
        }
        yaml
    }
}
