//! `Config::validate`: what serde cannot check (ranges, relations between keys, route
//! paths). Pure: it reads no file.

use std::time::Duration;

use hyper::Uri;

use super::{
    invalid, Config, ConfigError, HeartbeatSettings, LivenessConfig, UpstreamConfig, DEFAULT_ROUTE,
};

/// The shortest `reload.watch`: each look reads the whole file.
const MIN_RELOAD_WATCH: Duration = Duration::from_millis(100);

impl Config {
    /// Checks what serde cannot: ranges, relations between keys, route paths. Pure: it
    /// reads no file (the certificate files are loaded by `tls::Setup::load`, a step of
    /// its own that `run` and `wsbeat check` take after this one).
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_upstream("upstream", &self.upstream)?;
        validate_heartbeat(
            "heartbeat",
            &HeartbeatSettings::from_config(&self.heartbeat),
        )?;
        validate_liveness("liveness", &self.liveness)?;
        if let Some(n) = self.runtime.workers {
            if !(1..=1024).contains(&n) {
                return Err(invalid(
                    "runtime.workers".to_owned(),
                    format!("({n}) must be 1 to 1024 (null: the number of cores)"),
                ));
            }
        }
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
        if self.limits.max_connections_per_ip == Some(0) {
            return Err(invalid(
                "limits.max_connections_per_ip",
                "must be at least 1, or null (no per-address limit)",
            ));
        }
        if self
            .limits
            .max_tcp_connections
            .is_some_and(|n| !(1..=most).contains(&n))
        {
            return Err(invalid(
                "limits.max_tcp_connections",
                format!("must be between 1 and {most}, or null (derived from the open-file limit)"),
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
            ("limits.http_idle_timeout", self.limits.http_idle_timeout),
            ("limits.write_timeout", self.limits.write_timeout),
        ] {
            if d.0.is_zero() {
                return Err(invalid(key, "must be longer than 0s"));
            }
        }
        if self
            .limits
            .max_connection_age
            .is_some_and(|d| d.0.is_zero())
        {
            return Err(invalid(
                "limits.max_connection_age",
                "must be longer than 0s, or null (no limit)",
            ));
        }
        if self.limits.max_streams_per_connection == 0 {
            return Err(invalid(
                "limits.max_streams_per_connection",
                "must be at least 1",
            ));
        }
        if self.shutdown.close_spread > self.shutdown.drain_timeout {
            return Err(invalid(
                "shutdown.close_spread",
                format!(
                    "({}) must be at most shutdown.drain_timeout ({}): connections whose close comes after the drain ends would be cut without one",
                    self.shutdown.close_spread, self.shutdown.drain_timeout
                ),
            ));
        }
        if self.reload.watch.is_some_and(|d| d.0 < MIN_RELOAD_WATCH) {
            return Err(invalid(
                "reload.watch",
                "must be at least 100ms, or null (reload on SIGHUP only)",
            ));
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
        Ok(())
    }
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
    // The name the upstream's certificate must carry, and the SNI sent.
    if u.url.secure {
        let (name, field) = match &u.server_name {
            Some(name) => (name.as_str(), "server_name"),
            None => (u.url.host.as_str(), "url"),
        };
        if let Err(e) = rustls_pki_types::ServerName::try_from(name) {
            return Err(invalid(
                format!("{key}.{field}"),
                format!("`{name}` is not a DNS name or IP address ({e})"),
            ));
        }
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
    if l.rtt_sample_interval.0 < Duration::from_millis(1) {
        return Err(invalid(
            format!("{key}.rtt_sample_interval"),
            "must be at least 1ms",
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
