//! Routes: the per-route document (`routes:` entries and their heartbeat and liveness
//! overrides), and every route resolved once, looked up by request path.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::{
    Compression, Config, HeartbeatConfig, HeartbeatMode, HumanDuration, LivenessConfig,
    UpstreamConfig,
};

/// The name of the fallback route (the top-level `upstream`), used as the `route` label.
pub const DEFAULT_ROUTE: &str = "default";

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
    /// `passthrough` or `off` for this route; absent: the top-level `compression`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
}

impl RouteConfig {
    /// The `route` label: the name, else the path.
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.path)
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

/// Per-route liveness overrides.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LivenessOverride {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ping_interval: Option<HumanDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_sample_interval: Option<HumanDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
    /// `null` turns upstream PINGs off on this route.
    #[serde(
        deserialize_with = "explicit_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub upstream_ping_interval: Option<Option<HumanDuration>>,
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
    /// What the route does with `permessage-deflate`.
    pub compression: Compression,
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
    pub(super) fn from_config(c: &HeartbeatConfig) -> Self {
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
    pub(super) routes: Vec<Arc<Route>>,
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
    /// Resolves every route's settings (route keys over top-level keys), once.
    pub(super) fn resolve_routes(&self) -> Routes {
        let fallback = Arc::new(Route {
            name: DEFAULT_ROUTE.to_owned(),
            path: "/".to_owned(),
            upstream: self.upstream.clone(),
            heartbeat: HeartbeatSettings::from_config(&self.heartbeat),
            liveness: self.liveness.clone(),
            allowed_origins: normalize_origins(&self.allowed_origins),
            compression: self.compression,
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
                    liveness.rtt_sample_interval = o
                        .rtt_sample_interval
                        .unwrap_or(liveness.rtt_sample_interval);
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
                    compression: r.compression.unwrap_or(self.compression),
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
