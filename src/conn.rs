//! The vocabulary of one proxied connection, shared by the relay, the metrics and the
//! admin listener: its two legs, per-leg data, the client's address, how it ended, and the
//! registry of live connections behind `/connections`. A leaf: it imports no other wsbeat module.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::{Index, IndexMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// One side of the proxy: the metric label `leg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Leg {
    Client,
    Upstream,
}

impl Leg {
    /// Both legs, client first.
    pub const BOTH: [Leg; 2] = [Leg::Client, Leg::Upstream];

    pub fn as_str(self) -> &'static str {
        match self {
            Leg::Client => "client",
            Leg::Upstream => "upstream",
        }
    }

    /// The leg on the other side of the proxy.
    pub fn other(self) -> Leg {
        match self {
            Leg::Client => Leg::Upstream,
            Leg::Upstream => Leg::Client,
        }
    }
}

impl fmt::Display for Leg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `T` for each leg, indexed by [`Leg`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PerLeg<T> {
    pub client: T,
    pub upstream: T,
}

impl<T> PerLeg<T> {
    /// Builds each leg's value from the leg.
    pub fn new(mut f: impl FnMut(Leg) -> T) -> Self {
        PerLeg {
            client: f(Leg::Client),
            upstream: f(Leg::Upstream),
        }
    }

    /// `leg`'s value and the other leg's, both mutable.
    pub fn pair_mut(&mut self, leg: Leg) -> (&mut T, &mut T) {
        match leg {
            Leg::Client => (&mut self.client, &mut self.upstream),
            Leg::Upstream => (&mut self.upstream, &mut self.client),
        }
    }

    /// Each leg with its value, client first.
    pub fn iter(&self) -> impl Iterator<Item = (Leg, &T)> {
        [(Leg::Client, &self.client), (Leg::Upstream, &self.upstream)].into_iter()
    }
}

impl<T> Index<Leg> for PerLeg<T> {
    type Output = T;

    fn index(&self, leg: Leg) -> &T {
        match leg {
            Leg::Client => &self.client,
            Leg::Upstream => &self.upstream,
        }
    }
}

impl<T> IndexMut<Leg> for PerLeg<T> {
    fn index_mut(&mut self, leg: Leg) -> &mut T {
        match leg {
            Leg::Client => &mut self.client,
            Leg::Upstream => &mut self.upstream,
        }
    }
}

/// How a proxied connection ended: the metric label `outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The client closed (close frame, or its TCP connection ended).
    ClientClose,
    /// The upstream closed.
    UpstreamClose,
    /// The client stopped answering: liveness timeout.
    ClientDead,
    /// The upstream stopped answering its PINGs.
    UpstreamDead,
    /// A protocol violation, an oversized message, a write timeout or an I/O error.
    Error,
    /// wsbeat is shutting down.
    Shutdown,
    /// The connection reached `limits.max_connection_age` and was drained.
    MaxAge,
}

impl Outcome {
    /// Every outcome, in the order the metrics list them.
    pub const ALL: [Outcome; 7] = [
        Outcome::ClientClose,
        Outcome::UpstreamClose,
        Outcome::ClientDead,
        Outcome::UpstreamDead,
        Outcome::Error,
        Outcome::Shutdown,
        Outcome::MaxAge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::ClientClose => "client_close",
            Outcome::UpstreamClose => "upstream_close",
            Outcome::ClientDead => "client_dead",
            Outcome::UpstreamDead => "upstream_dead",
            Outcome::Error => "error",
            Outcome::Shutdown => "shutdown",
            Outcome::MaxAge => "max_age",
        }
    }

    /// The leg closed (or lost): `ClientClose` or `UpstreamClose`.
    pub fn closed_by(leg: Leg) -> Outcome {
        match leg {
            Leg::Client => Outcome::ClientClose,
            Leg::Upstream => Outcome::UpstreamClose,
        }
    }

    /// The leg was declared dead by liveness: `ClientDead` or `UpstreamDead`.
    pub fn dead(leg: Leg) -> Outcome {
        match leg {
            Leg::Client => Outcome::ClientDead,
            Leg::Upstream => Outcome::UpstreamDead,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the relay reports when the connection is over.
#[derive(Debug, Clone)]
pub struct Summary {
    pub outcome: Outcome,
    /// The close code sent to (or first received from) each leg, when there was one.
    pub client_close_code: Option<u16>,
    pub upstream_close_code: Option<u16>,
    /// Data messages read from the upstream after the client's leg was closed, and
    /// from the client after the upstream's: there was nowhere left to write them.
    pub dropped_to_client: u64,
    pub dropped_to_upstream: u64,
}

impl Summary {
    /// The close code each leg ended with (`None`: no close frame, 1006).
    pub fn close_codes(&self) -> PerLeg<Option<u16>> {
        PerLeg {
            client: self.client_close_code,
            upstream: self.upstream_close_code,
        }
    }
}

/// A client address (logs, `/connections`, the close log line): with the port when it is
/// the TCP peer, without one when a trusted proxy named it in `X-Forwarded-For`
/// (`forwarding::ClientInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

impl From<SocketAddr> for ClientAddr {
    /// The TCP peer as a client address, IPv4-mapped IPv6 as IPv4.
    fn from(peer: SocketAddr) -> Self {
        ClientAddr {
            ip: peer.ip().to_canonical(),
            port: Some(peer.port()),
        }
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => SocketAddr::new(self.ip, port).fmt(f),
            None => self.ip.fmt(f),
        }
    }
}

/// What `/connections` shows of one live WebSocket; the relay updates it as it goes.
#[derive(Debug)]
pub struct ConnectionView {
    pub id: u64,
    /// The client (behind trusted proxies: the address they name, without a port).
    pub client_addr: ClientAddr,
    pub route: String,
    pub upstream: String,
    pub started: Instant,
    /// Milliseconds from `started` to the client's last frame.
    last_client_frame_ms: AtomicU64,
    /// Microseconds of the last PONG round trip; `u64::MAX` while there is none.
    last_pong_rtt_us: AtomicU64,
    pub heartbeats_sent: AtomicU64,
    pub client_heartbeats_dropped: AtomicU64,
    pub messages_to_client: AtomicU64,
    pub messages_to_upstream: AtomicU64,
    pub bytes_to_client: AtomicU64,
    pub bytes_to_upstream: AtomicU64,
}

impl ConnectionView {
    pub fn new(
        id: u64,
        client_addr: ClientAddr,
        route: &str,
        upstream: String,
        started: Instant,
    ) -> Self {
        ConnectionView {
            id,
            client_addr,
            route: route.to_owned(),
            upstream,
            started,
            last_client_frame_ms: AtomicU64::new(0),
            last_pong_rtt_us: AtomicU64::new(u64::MAX),
            heartbeats_sent: AtomicU64::new(0),
            client_heartbeats_dropped: AtomicU64::new(0),
            messages_to_client: AtomicU64::new(0),
            messages_to_upstream: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            bytes_to_upstream: AtomicU64::new(0),
        }
    }

    pub fn client_frame_at(&self, at: Instant) {
        let ms = at.saturating_duration_since(self.started).as_millis();
        self.last_client_frame_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub fn last_client_frame_ago(&self, now: Instant) -> Duration {
        let at =
            self.started + Duration::from_millis(self.last_client_frame_ms.load(Ordering::Relaxed));
        now.saturating_duration_since(at)
    }

    pub fn set_pong_rtt(&self, rtt: Duration) {
        let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX - 1);
        self.last_pong_rtt_us.store(us, Ordering::Relaxed);
    }

    pub fn last_pong_rtt(&self) -> Option<Duration> {
        match self.last_pong_rtt_us.load(Ordering::Relaxed) {
            u64::MAX => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Messages forwarded toward `to` (`/connections`' `messages_to_*`).
    pub fn messages_to(&self, to: Leg) -> &AtomicU64 {
        match to {
            Leg::Client => &self.messages_to_client,
            Leg::Upstream => &self.messages_to_upstream,
        }
    }

    /// Payload bytes forwarded toward `to` (`/connections`' `bytes_to_*`).
    pub fn bytes_to(&self, to: Leg) -> &AtomicU64 {
        match to {
            Leg::Client => &self.bytes_to_client,
            Leg::Upstream => &self.bytes_to_upstream,
        }
    }

    /// The JSON object `/connections` lists.
    pub fn to_json(&self, now: Instant) -> serde_json::Value {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "id": self.id,
            "client_addr": self.client_addr.to_string(),
            "route": self.route,
            "upstream": self.upstream,
            "age_seconds": now.saturating_duration_since(self.started).as_secs_f64(),
            "last_client_frame_seconds_ago": self.last_client_frame_ago(now).as_secs_f64(),
            "last_pong_rtt_seconds": self.last_pong_rtt().map(|d| d.as_secs_f64()),
            "heartbeats_sent": n(&self.heartbeats_sent),
            "client_heartbeats_dropped": n(&self.client_heartbeats_dropped),
            "messages_to_client": n(&self.messages_to_client),
            "messages_to_upstream": n(&self.messages_to_upstream),
            "bytes_to_client": n(&self.bytes_to_client),
            "bytes_to_upstream": n(&self.bytes_to_upstream),
        })
    }
}

/// The live WebSockets, by id: what `/connections` and the per-connection series list.
#[derive(Debug, Default)]
pub struct Registry {
    /// Ids grow with time, so this is oldest first.
    live: Mutex<BTreeMap<u64, Arc<ConnectionView>>>,
}

impl Registry {
    pub fn new() -> Self {
        Registry::default()
    }

    /// Lists a connection that has just opened.
    pub fn insert(&self, view: Arc<ConnectionView>) {
        self.lock().insert(view.id, view);
    }

    /// Forgets a connection that has ended.
    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Snapshots of the live connections, oldest first.
    pub fn list(&self) -> Vec<Arc<ConnectionView>> {
        self.lock().values().cloned().collect()
    }

    /// How many connections are live.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no connection is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<ConnectionView>>> {
        // A panic elsewhere while holding the lock leaves the map whole: keep using it.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_leg_is_indexed_by_leg() {
        let mut p = PerLeg::new(|leg| leg.as_str().len());
        assert_eq!((p[Leg::Client], p[Leg::Upstream]), (6, 8));
        p[Leg::Upstream] += 1;
        assert_eq!(p.upstream, 9);
        let (a, b) = p.pair_mut(Leg::Upstream);
        std::mem::swap(a, b);
        assert_eq!(
            p,
            PerLeg {
                client: 9,
                upstream: 6
            }
        );
        assert_eq!(Leg::Client.other(), Leg::Upstream);
    }

    #[test]
    fn the_registry_lists_live_connections_oldest_first() {
        let registry = Registry::new();
        let view = |id| {
            Arc::new(ConnectionView::new(
                id,
                std::net::SocketAddr::from(([127, 0, 0, 1], 1)).into(),
                "default",
                String::new(),
                Instant::now(),
            ))
        };
        registry.insert(view(2));
        registry.insert(view(1));
        registry.insert(view(3));
        registry.remove(2);
        let ids: Vec<u64> = registry.list().iter().map(|v| v.id).collect();
        assert_eq!(ids, [1, 3]);
    }
}
