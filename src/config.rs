//! Configuration: the YAML file's serde structs with their defaults, validation, and the
//! routes resolved once at start-up.
//!
//! Every field's doc comment is the config reference; `config/wsbeat.yaml` mirrors it.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hyper::Uri;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// The name of the fallback route (the top-level `upstream`), used as the `route` label.
pub const DEFAULT_ROUTE: &str = "default";

/// A configuration that cannot be used; the message names the key or file and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// The whole configuration file. Every key has a default, so a file holding only
/// `upstream.url` works; unknown keys are errors.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the public listener: WebSockets and plain HTTP on one port.
    pub listen: SocketAddr,
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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            tls: None,
            admin: AdminConfig::default(),
            upstream: UpstreamConfig::default(),
            routes: Vec::new(),
            allowed_origins: None,
            client_script: None,
            heartbeat: HeartbeatConfig::default(),
            liveness: LivenessConfig::default(),
            limits: LimitsConfig::default(),
            shutdown: ShutdownConfig::default(),
            metrics: MetricsConfig::default(),
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
    /// `ws://host:port` (or `wss://`). The request path and query are forwarded unchanged.
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

/// One path-prefix route. Any heartbeat or liveness key may be overridden.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The `route` label; defaults to the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Path prefix: `/ws/chat` matches `/ws/chat`, `/ws/chat/…`, not `/ws/chatroom`.
    pub path: String,
    /// The route's upstream; absent: the top-level `upstream`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamConfig>,
    /// Heartbeat keys that differ from the top level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<HeartbeatOverride>,
    /// Liveness keys that differ from the top level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<LivenessOverride>,
    /// The route's own Origin allow-list, replacing the top-level one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_origins: Option<Vec<String>>,
}

impl RouteConfig {
    /// The `route` label: the name, else the path.
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.path)
    }
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

/// Per-route heartbeat overrides.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HeartbeatOverride {
    /// `null` turns heartbeats off on this route.
    #[serde(
        deserialize_with = "explicit_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub message: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<HumanDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<HeartbeatMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop_client: Option<bool>,
}

/// Deserialises a present key (even `null`) as `Some`, so that `message: null` in a route
/// overrides the top-level message instead of inheriting it.
fn explicit_null<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Liveness: PINGs to find dead and half-open peers.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LivenessConfig {
    /// How often a protocol PING goes to the client (browsers answer by themselves).
    pub ping_interval: HumanDuration,
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
            timeout: HumanDuration::secs(30),
            upstream_ping_interval: None,
        }
    }
}

/// Per-route liveness overrides.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LivenessOverride {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ping_interval: Option<HumanDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
    /// `null` turns upstream PINGs off on this route.
    #[serde(
        deserialize_with = "explicit_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub upstream_ping_interval: Option<Option<HumanDuration>>,
}

/// Bounds on what one peer can cost.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Proxied WebSockets at once; past it a handshake gets 503.
    pub max_connections: usize,
    /// Largest message (and frame) accepted on either leg; a larger one closes with 1009.
    pub max_message_size: ByteSize,
    /// A client that has not sent a whole request head after this long is dropped.
    pub handshake_timeout: HumanDuration,
    /// A peer that takes no bytes for this long while wsbeat has some for it is closed.
    pub write_timeout: HumanDuration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 100_000,
            max_message_size: ByteSize(16 << 20),
            handshake_timeout: HumanDuration::secs(10),
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
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout: HumanDuration::secs(25),
        }
    }
}

/// Prometheus export options.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Export per-connection series (at most 1000, removed on close).
    pub per_connection: bool,
}

/// A duration written the humane way: `250ms`, `4s`, `1m`, `1h`, or a combination such as
/// `1m30s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn secs(s: u64) -> Self {
        HumanDuration(Duration::from_secs(s))
    }
    pub const fn millis(ms: u64) -> Self {
        HumanDuration(Duration::from_millis(ms))
    }
}

/// The longest duration any key takes: a year is far past any sensible timeout.
const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a duration (examples: 250ms, 4s, 1m, 1h)");
        let mut rest = s.trim();
        if rest.is_empty() {
            return Err(bad());
        }
        let mut total = Duration::ZERO;
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
            if digits == 0 {
                return Err(bad());
            }
            let value: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let unit = match &rest[..unit_len] {
                "ms" => Duration::from_millis(1),
                "s" => Duration::from_secs(1),
                "m" => Duration::from_secs(60),
                "h" => Duration::from_secs(3600),
                "d" => Duration::from_secs(86_400),
                _ => return Err(bad()),
            };
            rest = &rest[unit_len..];
            let part = u32::try_from(value)
                .ok()
                .and_then(|v| unit.checked_mul(v))
                .ok_or_else(bad)?;
            total = total.checked_add(part).ok_or_else(bad)?;
        }
        // Deadlines are `now + duration`: a bound keeps that sum from overflowing.
        if total > MAX_DURATION {
            return Err(format!("`{s}` is longer than the 365d wsbeat accepts"));
        }
        Ok(HumanDuration(total))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        match ms {
            0 => write!(f, "0s"),
            _ if ms % 3_600_000 == 0 => write!(f, "{}h", ms / 3_600_000),
            _ if ms % 60_000 == 0 => write!(f, "{}m", ms / 60_000),
            _ if ms % 1000 == 0 => write!(f, "{}s", ms / 1000),
            _ => write!(f, "{ms}ms"),
        }
    }
}

/// A size in bytes: a plain number, or with a unit: `512B`, `4KiB`, `16MiB`, `1GiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a size (examples: 65536, 64KiB, 16MiB)");
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let value: u64 = t[..split].parse().map_err(|_| bad())?;
        let unit: u64 = match t[split..].trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => return Err(bad()),
        };
        value.checked_mul(unit).map(ByteSize).ok_or_else(bad)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        match b {
            0 => write!(f, "0"),
            _ if b % (1 << 30) == 0 => write!(f, "{}GiB", b >> 30),
            _ if b % (1 << 20) == 0 => write!(f, "{}MiB", b >> 20),
            _ if b % (1 << 10) == 0 => write!(f, "{}KiB", b >> 10),
            _ => write!(f, "{b}"),
        }
    }
}

/// A validated upstream URL: `ws://` or `wss://`, a host, and no path beyond `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// True for `wss://`.
    pub secure: bool,
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// Port, defaulted from the scheme.
    pub port: u16,
}

impl UpstreamUrl {
    /// `host:port` with IPv6 literals bracketed, for `Host`-style use and logs.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for UpstreamUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let uri: Uri = s.parse().map_err(|e| format!("`{s}` is not a URL ({e})"))?;
        let secure = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(format!("`{s}`: the scheme must be ws:// or wss://")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("`{s}` has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("`{s}`: credentials in the URL are not supported"));
        }
        // `http::Uri` accepts more than a host (brackets anywhere, `,`, `!`) and reads a
        // port that is not a number as no port at all: check both here, so that a typo
        // is an error instead of a dial to port 80, and `wsbeat check` prints a URL that
        // reads back.
        let raw_host = authority.host();
        let host = match raw_host.strip_prefix('[') {
            Some(bracketed) => bracketed
                .strip_suffix(']')
                .filter(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
                .ok_or_else(|| format!("`{s}`: `{raw_host}` is not an IPv6 address"))?,
            None => raw_host,
        };
        if host.is_empty() {
            return Err(format!("`{s}` has no host"));
        }
        let name_chars = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_');
        if !raw_host.starts_with('[') && !host.bytes().all(name_chars) {
            return Err(format!("`{s}`: `{host}` is not a host name or IP address"));
        }
        let port = match authority.as_str().strip_prefix(raw_host) {
            Some("") => {
                if secure {
                    443
                } else {
                    80
                }
            }
            after_host => after_host
                .and_then(|rest| rest.strip_prefix(':'))
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("`{s}`: the port must be a number from 1 to 65535"))?,
        };
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!(
                "`{s}`: an upstream URL has no path or query (the client's path and query are forwarded unchanged)"
            ));
        }
        Ok(UpstreamUrl {
            secure,
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.secure { "wss" } else { "ws" };
        write!(f, "{scheme}://{}", self.authority())
    }
}

/// Serde through `FromStr` / `Display`: the config's humane strings.
macro_rules! serde_via_str {
    ($($ty:ty),*) => {$(
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = StringOrNumber::deserialize(d)?.0;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    )*};
}
serde_via_str!(HumanDuration, ByteSize, UpstreamUrl);

/// A scalar read as text, so that `max_message_size: 65536` works as well as `64KiB`.
struct StringOrNumber(String);

impl<'de> Deserialize<'de> for StringOrNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = StringOrNumber;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(StringOrNumber(v.to_owned()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(StringOrNumber(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(StringOrNumber(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A route with every setting resolved: what one connection runs with.
#[derive(Debug, Clone)]
pub struct Route {
    /// The `route` label.
    pub name: String,
    /// The path prefix (`/` for the fallback route).
    pub path: String,
    pub upstream: UpstreamConfig,
    pub heartbeat: HeartbeatSettings,
    pub liveness: LivenessConfig,
    /// Lower-cased origins allowed to open WebSockets; `None`: any.
    pub allowed_origins: Option<Vec<String>>,
}

impl Route {
    /// Whether a WebSocket handshake with this `Origin` header (absent: not a browser)
    /// may proceed. Scheme and host compare case-insensitively.
    pub fn origin_allowed(&self, origin: Option<&[u8]>) -> bool {
        match (&self.allowed_origins, origin) {
            (None, _) | (Some(_), None) => true,
            (Some(list), Some(origin)) => list
                .iter()
                .any(|allowed| allowed.as_bytes().eq_ignore_ascii_case(origin)),
        }
    }
}

/// Heartbeat settings in the form the relay uses.
#[derive(Debug, Clone)]
pub struct HeartbeatSettings {
    /// The magic string, ready to send without copying; `None`: no text heartbeats.
    pub message: Option<Utf8Bytes>,
    pub interval: Duration,
    pub mode: HeartbeatMode,
    pub drop_client: bool,
}

impl HeartbeatSettings {
    fn from_config(c: &HeartbeatConfig) -> Self {
        HeartbeatSettings {
            message: c.message.clone().map(Utf8Bytes::from),
            interval: c.interval.0,
            mode: c.mode,
            drop_client: c.drop_client,
        }
    }
}

/// All routes, resolved once; looked up by request path.
#[derive(Debug, Clone)]
pub struct Routes {
    /// Sorted by descending path length, so the first match is the longest.
    routes: Vec<Arc<Route>>,
    fallback: Arc<Route>,
}

impl Routes {
    /// The route for a request path (without the query): the longest matching prefix,
    /// else the fallback.
    pub fn resolve(&self, path: &str) -> &Arc<Route> {
        self.routes
            .iter()
            .find(|r| path_matches(&r.path, path))
            .unwrap_or(&self.fallback)
    }

    /// Every route, the fallback last.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter().chain(std::iter::once(&self.fallback))
    }
}

/// `/ws/chat` matches `/ws/chat` and `/ws/chat/…` but not `/ws/chatroom`.
fn path_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'),
        None => false,
    }
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

    /// Checks what serde cannot: ranges, relations between keys, route paths.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_upstream("upstream", &self.upstream)?;
        validate_heartbeat(
            "heartbeat",
            &HeartbeatSettings::from_config(&self.heartbeat),
        )?;
        validate_liveness("liveness", &self.liveness)?;
        validate_origins("allowed_origins", &self.allowed_origins)?;
        if let Some(path) = &self.client_script {
            if !path.starts_with('/')
                || path.contains(['?', '#'])
                || path.contains(char::is_whitespace)
            {
                return Err(invalid(
                    "client_script",
                    format!(
                        "`{path}` must be a path like `/_wsbeat.js` (starting with `/`, no query)"
                    ),
                ));
            }
        }
        // The connection semaphore cannot hold more permits than this.
        let most = tokio::sync::Semaphore::MAX_PERMITS;
        if !(1..=most).contains(&self.limits.max_connections) {
            return Err(invalid(
                "limits.max_connections",
                format!("must be between 1 and {most}"),
            ));
        }
        let max = self.limits.max_message_size.0;
        if max == 0 || max > 1 << 30 {
            return Err(invalid(
                "limits.max_message_size",
                "must be between 1 byte and 1GiB",
            ));
        }
        for (key, d) in [
            ("limits.handshake_timeout", self.limits.handshake_timeout),
            ("limits.write_timeout", self.limits.write_timeout),
        ] {
            if d.0.is_zero() {
                return Err(invalid(key, "must be longer than 0s"));
            }
        }
        // Port 0 asks for any free port: two such listeners never share one.
        if self.listen.port() != 0 && self.admin.listen == Some(self.listen) {
            return Err(invalid(
                "admin.listen",
                "must differ from `listen` (admin endpoints never share the public port)",
            ));
        }
        let mut seen_paths = std::collections::HashSet::new();
        let mut seen_names = std::collections::HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            if !r.path.starts_with('/') {
                return Err(invalid(format!("{key}.path"), "must start with `/`"));
            }
            if r.path.contains(['?', '#']) {
                return Err(invalid(
                    format!("{key}.path"),
                    "is a path prefix, without `?` or `#`",
                ));
            }
            if !seen_paths.insert(r.path.as_str()) {
                return Err(invalid(
                    format!("{key}.path"),
                    format!("`{}` is listed twice", r.path),
                ));
            }
            let name = r.label();
            if name.is_empty() || name == DEFAULT_ROUTE || !seen_names.insert(name) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("`{name}` must be non-empty, unique and not `{DEFAULT_ROUTE}`"),
                ));
            }
        }
        for (i, route) in self.resolve_routes().routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            if let Some(u) = &self.routes[i].upstream {
                validate_upstream(&format!("{key}.upstream"), u)?;
            }
            validate_heartbeat(&format!("{key}.heartbeat"), &route.heartbeat)?;
            validate_liveness(&format!("{key}.liveness"), &route.liveness)?;
            validate_origins(
                &format!("{key}.allowed_origins"),
                &self.routes[i].allowed_origins,
            )?;
        }
        // Last: the files are read only for an otherwise valid config.
        crate::tls::Setup::load(self).map_err(|e| invalid(e.key, e.reason))?;
        Ok(())
    }

    /// Resolves every route's settings (route keys over top-level keys), once.
    fn resolve_routes(&self) -> Routes {
        let fallback = Arc::new(Route {
            name: DEFAULT_ROUTE.to_owned(),
            path: "/".to_owned(),
            upstream: self.upstream.clone(),
            heartbeat: HeartbeatSettings::from_config(&self.heartbeat),
            liveness: self.liveness.clone(),
            allowed_origins: normalize_origins(&self.allowed_origins),
        });
        // Keep config order for validation messages; matching order is by length below.
        let routes: Vec<Arc<Route>> = self
            .routes
            .iter()
            .map(|r| {
                let mut heartbeat = self.heartbeat.clone();
                if let Some(o) = &r.heartbeat {
                    if let Some(m) = &o.message {
                        heartbeat.message = m.clone();
                    }
                    heartbeat.interval = o.interval.unwrap_or(heartbeat.interval);
                    heartbeat.mode = o.mode.unwrap_or(heartbeat.mode);
                    heartbeat.drop_client = o.drop_client.unwrap_or(heartbeat.drop_client);
                }
                let mut liveness = self.liveness.clone();
                if let Some(o) = &r.liveness {
                    liveness.ping_interval = o.ping_interval.unwrap_or(liveness.ping_interval);
                    liveness.timeout = o.timeout.unwrap_or(liveness.timeout);
                    if let Some(interval) = o.upstream_ping_interval {
                        liveness.upstream_ping_interval = interval;
                    }
                }
                Arc::new(Route {
                    name: r.label().to_owned(),
                    path: r.path.clone(),
                    upstream: r.upstream.clone().unwrap_or_else(|| self.upstream.clone()),
                    heartbeat: HeartbeatSettings::from_config(&heartbeat),
                    liveness,
                    allowed_origins: normalize_origins(
                        r.allowed_origins.as_ref().or(self.allowed_origins.as_ref()),
                    ),
                })
            })
            .collect();
        Routes { routes, fallback }
    }

    /// The routes in matching order (longest prefix first).
    pub fn routes(&self) -> Routes {
        let mut routes = self.resolve_routes();
        routes
            .routes
            .sort_by_key(|r| std::cmp::Reverse(r.path.len()));
        routes
    }
}

fn normalize_origins<'a>(list: impl Into<Option<&'a Vec<String>>>) -> Option<Vec<String>> {
    list.into().map(|l| {
        l.iter()
            .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
            .collect()
    })
}

/// An origin is `scheme://host[:port]`, as browsers send it: no path, no query.
fn validate_origins(key: &str, list: &Option<Vec<String>>) -> Result<(), ConfigError> {
    for (i, origin) in list.iter().flatten().enumerate() {
        let trimmed = origin.trim_end_matches('/');
        let ok = trimmed.parse::<Uri>().is_ok_and(|u| {
            u.scheme().is_some()
                && u.authority().is_some()
                && u.path_and_query()
                    .is_none_or(|pq| matches!(pq.as_str(), "" | "/"))
        });
        if !ok {
            return Err(invalid(
                format!("{key}[{i}]"),
                format!("`{origin}` is not an origin like `https://app.example` or `http://localhost:3000`"),
            ));
        }
    }
    Ok(())
}

fn validate_upstream(key: &str, u: &UpstreamConfig) -> Result<(), ConfigError> {
    if !u.url.secure && (u.ca.is_some() || u.server_name.is_some()) {
        return Err(invalid(
            format!("{key}.url"),
            "`ca` and `server_name` are for wss:// upstreams only",
        ));
    }
    if u.request_timeout.0.is_zero() {
        return Err(invalid(
            format!("{key}.request_timeout"),
            "must be longer than 0s",
        ));
    }
    if u.connect_timeout.0.is_zero() {
        return Err(invalid(
            format!("{key}.connect_timeout"),
            "must be longer than 0s",
        ));
    }
    if u.pool_idle_timeout.0.is_zero() {
        return Err(invalid(
            format!("{key}.pool_idle_timeout"),
            "must be longer than 0s",
        ));
    }
    Ok(())
}

fn validate_heartbeat(key: &str, h: &HeartbeatSettings) -> Result<(), ConfigError> {
    if h.interval < Duration::from_millis(1) {
        return Err(invalid(format!("{key}.interval"), "must be at least 1ms"));
    }
    if let Some(m) = &h.message {
        if m.is_empty() || m.len() > 125 {
            return Err(invalid(
                format!("{key}.message"),
                "must be 1 to 125 bytes (or null to turn heartbeats off)",
            ));
        }
    }
    Ok(())
}

fn validate_liveness(key: &str, l: &LivenessConfig) -> Result<(), ConfigError> {
    if l.ping_interval.0 < Duration::from_millis(1) {
        return Err(invalid(
            format!("{key}.ping_interval"),
            "must be at least 1ms",
        ));
    }
    if l.timeout <= l.ping_interval {
        return Err(invalid(
            format!("{key}.timeout"),
            format!(
                "({}) must be longer than ping_interval ({}), or live clients are cut before they can answer a PING",
                l.timeout, l.ping_interval
            ),
        ));
    }
    if let Some(u) = l.upstream_ping_interval {
        if u.0 < Duration::from_millis(1) || u >= l.timeout {
            return Err(invalid(
                format!("{key}.upstream_ping_interval"),
                "must be at least 1ms and shorter than timeout",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(yaml, "test.yaml")
    }

    #[test]
    fn a_file_with_only_the_upstream_url_works() {
        let c = parse("upstream:\n  url: ws://10.1.2.3:9000\n").unwrap();
        assert_eq!(c.upstream.url.authority(), "10.1.2.3:9000");
        assert_eq!(c.heartbeat, HeartbeatConfig::default());
        assert_eq!(c.limits.max_message_size, ByteSize(16 << 20));
    }

    #[test]
    fn pool_idle_timeout_is_per_upstream_and_longer_than_zero() {
        let c = parse(
            "upstream:\n  pool_idle_timeout: 2500ms\nroutes:\n  - path: /api\n    upstream: { url: ws://api:8000, pool_idle_timeout: 30s }\n",
        )
        .unwrap();
        assert_eq!(c.upstream.pool_idle_timeout, HumanDuration::millis(2500));
        let routes = c.routes();
        assert_eq!(
            routes.resolve("/api/x").upstream.pool_idle_timeout,
            HumanDuration::secs(30)
        );
        assert_eq!(
            UpstreamConfig::default().pool_idle_timeout,
            HumanDuration::secs(4)
        );
        for yaml in [
            "upstream:\n  pool_idle_timeout: 0s\n",
            "routes:\n  - path: /api\n    upstream: { pool_idle_timeout: 0s }\n",
        ] {
            let e = parse(yaml).unwrap_err().to_string();
            assert!(e.contains("pool_idle_timeout"), "{e}");
        }
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = parse("heartbeat:\n  intervall: 4s\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("intervall"), "{e}");
        let e = parse("bogus: 1\n").unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = parse("heartbeat:\n  interval: fast\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("heartbeat.interval") && e.contains("fast"),
            "{e}"
        );
        let e = parse("upstream:\n  url: http://x\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("upstream.url") && e.contains("ws://"), "{e}");
        let e = parse("liveness:\n  ping_interval: 10s\n  timeout: 5s\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("liveness.timeout"), "{e}");
        let e = parse("limits:\n  max_message_size: 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("limits.max_message_size"), "{e}");
        for bad in ["_wsbeat.js", "/a.js?v=1", "/a b.js"] {
            let e = parse(&format!("client_script: \"{bad}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("client_script") && e.contains(bad), "{e}");
        }
        let e = parse("liveness:\n  timeout: 366d\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("liveness.timeout") && e.contains("365d"), "{e}");
        parse("liveness:\n  timeout: 365d\n").unwrap();
        let ok = parse("client_script: /_wsbeat.js\n").unwrap();
        assert_eq!(ok.client_script.as_deref(), Some("/_wsbeat.js"));
    }

    #[test]
    fn durations_and_sizes_are_humane() {
        for (s, ms) in [
            ("250ms", 250),
            ("4s", 4000),
            ("1m", 60_000),
            ("1m30s", 90_000),
        ] {
            assert_eq!(
                s.parse::<HumanDuration>().unwrap(),
                HumanDuration::millis(ms)
            );
        }
        for bad in ["", "4", "s", "4 parsecs", "-1s", "1.5s"] {
            assert!(bad.parse::<HumanDuration>().is_err(), "{bad}");
        }
        assert_eq!("16MiB".parse::<ByteSize>().unwrap(), ByteSize(16 << 20));
        assert_eq!("65536".parse::<ByteSize>().unwrap(), ByteSize(65536));
        assert!("16MB".parse::<ByteSize>().is_err());
        assert_eq!(HumanDuration::millis(1500).to_string(), "1500ms");
        assert_eq!(ByteSize(16 << 20).to_string(), "16MiB");
    }

    #[test]
    fn null_message_turns_heartbeats_off_and_routes_override() {
        let c = parse(
            "heartbeat:\n  message: null\nroutes:\n  - path: /ws/chat\n    heartbeat: { message: ping, interval: 2s }\n  - path: /ws\n    name: ws\n",
        )
        .unwrap();
        let routes = c.routes();
        assert!(routes.resolve("/other").heartbeat.message.is_none());
        let chat = routes.resolve("/ws/chat/42");
        assert_eq!(chat.name, "/ws/chat");
        assert_eq!(chat.heartbeat.message.as_deref(), Some("ping"));
        assert_eq!(chat.heartbeat.interval, Duration::from_secs(2));
        assert_eq!(routes.resolve("/ws/chatroom").name, "ws");
        assert_eq!(routes.resolve("/ws").name, "ws");
        assert_eq!(routes.resolve("/wsx").name, DEFAULT_ROUTE);
    }

    #[test]
    fn route_message_null_overrides_a_top_level_message() {
        let c = parse("routes:\n  - path: /quiet\n    heartbeat: { message: null }\n").unwrap();
        assert!(c.routes().resolve("/quiet").heartbeat.message.is_none());
        assert!(c.routes().resolve("/").heartbeat.message.is_some());
    }

    #[test]
    fn allowed_origins_are_origins_and_routes_replace_the_list() {
        let c = parse(
            "allowed_origins: ['https://App.example/']\nroutes:\n  - path: /open\n    allowed_origins: ['http://localhost:3000']\n  - path: /same\n",
        )
        .unwrap();
        let routes = c.routes();
        let origin = |path: &str, o: &str| routes.resolve(path).origin_allowed(Some(o.as_bytes()));
        assert!(origin("/", "https://app.example"));
        assert!(!origin("/", "https://app.example.evil"));
        assert!(origin("/same/x", "https://APP.example"));
        assert!(origin("/open", "http://localhost:3000"));
        assert!(!origin("/open", "https://app.example"));
        assert!(
            routes.resolve("/").origin_allowed(None),
            "non-browser clients pass"
        );
        assert!(parse("")
            .unwrap()
            .routes()
            .resolve("/")
            .origin_allowed(Some(b"x")));
        for bad in ["app.example", "https://app.example/path", "*"] {
            let e = parse(&format!("allowed_origins: ['{bad}']\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("allowed_origins[0]"), "{bad}: {e}");
        }
    }

    #[test]
    fn admin_must_not_share_the_public_port_unless_both_are_ephemeral() {
        let e = parse("listen: 127.0.0.1:9000\nadmin: { listen: 127.0.0.1:9000 }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("admin.listen"), "{e}");
        parse("listen: 127.0.0.1:0\nadmin: { listen: 127.0.0.1:0 }\n").unwrap();
    }

    #[test]
    fn a_route_turns_upstream_pings_off_with_null() {
        let c = parse(
            "liveness:\n  upstream_ping_interval: 5s\nroutes:\n  - path: /off\n    liveness: { upstream_ping_interval: null }\n  - path: /kept\n    liveness: { timeout: 40s }\n",
        )
        .unwrap();
        let routes = c.routes();
        assert_eq!(routes.resolve("/off").liveness.upstream_ping_interval, None);
        assert_eq!(
            routes.resolve("/kept").liveness.upstream_ping_interval,
            Some(HumanDuration::secs(5))
        );
    }

    #[test]
    fn route_errors_are_named() {
        let e = parse("routes:\n  - path: ws\n").unwrap_err().to_string();
        assert!(e.contains("routes[0].path"), "{e}");
        let e = parse("routes:\n  - path: /a\n  - path: /a\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("routes[1].path"), "{e}");
        let e = parse("routes:\n  - path: /a\n    liveness: { timeout: 1s }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("routes[0].liveness.timeout"), "{e}");
    }

    #[test]
    fn effective_config_round_trips_through_yaml() {
        let c = parse("routes:\n  - path: /ws/chat\n    heartbeat: { interval: 2s }\n").unwrap();
        let again = parse(&c.to_yaml()).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn upstream_urls_with_a_bad_port_or_host_are_errors() {
        for bad in [
            "ws://backend:80a",
            "ws://backend:99999",
            "ws://backend:0",
            "ws://backend:",
            "ws://back[end]:80",
            "ws://a,b!c:80",
            "ws://[not-ipv6]:80",
        ] {
            let e = UpstreamUrl::from_str(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        let ok = |s: &str| UpstreamUrl::from_str(s).unwrap().authority();
        assert_eq!(ok("ws://backend"), "backend:80");
        assert_eq!(ok("wss://backend"), "backend:443");
        assert_eq!(ok("ws://my_backend-1.svc:8000/"), "my_backend-1.svc:8000");
        assert_eq!(ok("ws://[::1]:9000"), "[::1]:9000");
    }

    /// Found by `cargo fuzz run config` (fuzz/corpus/config/regression-url-brackets.yaml):
    /// `http::Uri` took this authority, wsbeat kept `0_____________A_____[___…tag` as the
    /// host, and `wsbeat check` printed a URL it could not read back.
    #[test]
    fn fuzz_regression_a_bracket_inside_the_host_is_refused() {
        let text = include_str!("../fuzz/corpus/config/regression-url-brackets.yaml");
        let e = parse(text).unwrap_err().to_string();
        assert!(
            e.contains("upstream.url") && e.contains("not a host name"),
            "{e}"
        );
    }
}
