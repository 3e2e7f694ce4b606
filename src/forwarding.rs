//! Header policy between the legs: which headers are end-to-end (RFC 9110 §7.6.1),
//! comma-separated tokens, who the client is behind trusted proxies, and what wsbeat adds
//! about it (`X-Forwarded-*`, `X-Real-IP`, `Forwarded`, `Via`); and the request target
//! both legs agree on: the canonical path and a single `Host`.

use std::net::{IpAddr, SocketAddr};

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::Cidr;
use crate::conn::ClientAddr;

/// What wsbeat adds to `Via` (RFC 9110 §7.6.3).
pub const VIA: &str = "1.1 wsbeat";

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Who sent one request: the peer that wsbeat's socket is connected to, and the client
/// behind it, for `X-Forwarded-*`, logs and `/connections`.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo {
    /// The address of the TCP peer (a load balancer, when there is one), IPv4-mapped
    /// IPv6 shown as IPv4. `trusted_proxies` is matched against it.
    pub peer: SocketAddr,
    /// Whether `peer` is in `trusted_proxies`: then its forwarding headers are believed.
    pub peer_trusted: bool,
    /// The client: the peer itself, or, from a trusted peer, the rightmost
    /// `X-Forwarded-For` address that is not itself trusted.
    pub client: ClientAddr,
    /// True when the peer reached wsbeat over TLS.
    pub tls: bool,
}

impl ClientInfo {
    /// Who sent a request with `headers` on a connection from `peer`: the peer, or, when
    /// the peer is in `trusted`, the client its `X-Forwarded-For` names (nginx's
    /// `real_ip_recursive on`: the rightmost address that is not itself trusted; if all
    /// are, the leftmost). An address wsbeat cannot read stops the walk: nothing to its
    /// left is believed.
    pub fn new(peer: SocketAddr, tls: bool, headers: &HeaderMap, trusted: &[Cidr]) -> Self {
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
        let peer_trusted = is_trusted(peer.ip());
        let mut client = ClientAddr::from(peer);
        if peer_trusted {
            let forwarded: Vec<&str> = header_tokens(headers, &X_FORWARDED_FOR).collect();
            for entry in forwarded.iter().rev() {
                let Some(ip) = forwarded_ip(entry) else {
                    break;
                };
                client = ClientAddr { ip, port: None };
                if !is_trusted(ip) {
                    break;
                }
            }
        }
        ClientInfo {
            peer,
            peer_trusted,
            client,
            tls,
        }
    }
}

/// One `X-Forwarded-For` entry: an IP address, IPv4-mapped IPv6 read as IPv4. Some
/// proxies add a port (`192.0.2.1:8080`, `[2001:db8::1]:8080`) or brackets; both are
/// accepted and the port dropped.
fn forwarded_ip(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    let ip = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .and_then(|e| e.parse::<IpAddr>().ok())
        })?;
    Some(ip.to_canonical())
}

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus the WebSocket
/// handshake headers that each leg negotiates for itself.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-accept",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-protocol",
];

/// Copies the end-to-end headers: everything but hop-by-hop ones and those the
/// `Connection` header names.
pub fn copy_end_to_end(from: &HeaderMap, to: &mut HeaderMap) {
    // Room for all of them at once: one allocation, not one per growth.
    to.reserve(from.len());
    for (name, value) in from {
        let n = name.as_str();
        // Header names are lowercase; the tokens `Connection` names may not be.
        if HOP_BY_HOP.contains(&n)
            || header_tokens(from, &header::CONNECTION).any(|t| t.eq_ignore_ascii_case(n))
        {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

/// Tokens of a comma-separated header, e.g. the subprotocols a client offers.
pub fn header_tokens<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Adds what the upstream needs to know about the client to a request bound for it;
/// `client` is the client's request head, `out` the upstream request's headers with the
/// end-to-end ones already copied. The client's `Host` itself is forwarded unchanged.
///
/// - `X-Forwarded-For`: the list that came, then the peer's address, always.
/// - From a trusted peer, `X-Forwarded-Proto`, `X-Forwarded-Host`, `X-Real-IP` and
///   `Forwarded` are kept as they came; the first three are set (below) only when absent.
/// - From any other peer they are what wsbeat saw: `X-Forwarded-Proto` from its own
///   listener, `X-Forwarded-Host` from `Host`, `X-Real-IP` the peer's address, and
///   `Forwarded` wsbeat's own RFC 7239 element in place of whatever the client claimed.
pub fn add_forwarding(client: &HeaderMap, info: ClientInfo, out: &mut HeaderMap) {
    let ip = info.peer.ip().to_string();
    let xff = match header_tokens(client, &X_FORWARDED_FOR).collect::<Vec<_>>() {
        prior if prior.is_empty() => ip,
        prior => format!("{}, {ip}", prior.join(", ")),
    };
    out.remove(&X_FORWARDED_FOR);
    if let Ok(v) = HeaderValue::from_str(&xff) {
        out.insert(&X_FORWARDED_FOR, v);
    }
    let proto = if info.tls { "https" } else { "http" };
    let host = client.get(header::HOST);
    if info.peer_trusted {
        if !out.contains_key(&X_FORWARDED_PROTO) {
            out.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        }
        if let Some(host) = host.filter(|_| !out.contains_key(&X_FORWARDED_HOST)) {
            out.insert(&X_FORWARDED_HOST, host.clone());
        }
        if !out.contains_key(&X_REAL_IP) {
            if let Ok(v) = HeaderValue::from_str(&info.client.ip.to_string()) {
                out.insert(&X_REAL_IP, v);
            }
        }
        return;
    }
    out.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    out.remove(&X_FORWARDED_HOST);
    if let Some(host) = host {
        out.insert(&X_FORWARDED_HOST, host.clone());
    }
    if let Ok(v) = HeaderValue::from_str(&info.peer.ip().to_string()) {
        out.insert(&X_REAL_IP, v);
    }
    let element = forwarded_element(info.peer.ip(), proto, host.and_then(|h| h.to_str().ok()));
    out.remove(header::FORWARDED);
    if let Ok(v) = HeaderValue::from_str(&element) {
        out.insert(header::FORWARDED, v);
    }
}

/// wsbeat's own `Forwarded` element (RFC 7239 §4): `for`, `proto` and, when the client
/// sent one, `host`. An IPv6 address is bracketed and quoted (§6); any value that is not
/// a token is quoted.
fn forwarded_element(peer: IpAddr, proto: &str, host: Option<&str>) -> String {
    use std::fmt::Write;
    // Built in one string: no intermediate for the node or the host.
    let mut element = String::with_capacity(64 + host.map_or(0, str::len));
    let _ = match peer {
        IpAddr::V4(v4) => write!(element, "for={v4};proto={proto}"),
        IpAddr::V6(v6) => write!(element, "for=\"[{v6}]\";proto={proto}"),
    };
    if let Some(host) = host.filter(|h| !h.is_empty()) {
        element.push_str(";host=");
        push_token_or_quoted(&mut element, host);
    }
    element
}

/// `value` as an RFC 9110 token when it is one, else as a quoted-string.
fn push_token_or_quoted(quoted: &mut String, value: &str) {
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if value.chars().all(tchar) {
        quoted.push_str(value);
        return;
    }
    quoted.push('"');
    for c in value.chars() {
        if matches!(c, '"' | '\\') {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
}

/// Adds wsbeat to the `Via` list, after any earlier hops.
pub fn append_via(headers: &mut HeaderMap) {
    let via = match headers.get(header::VIA).and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => format!("{prior}, {VIA}"),
        _ => VIA.to_owned(),
    };
    headers.remove(header::VIA);
    if let Ok(v) = HeaderValue::from_str(&via) {
        headers.insert(header::VIA, v);
    }
}

/// Why a request path has no canonical form: the request gets 400 with this reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path holds an encoded '/' (%2F)")]
    EncodedSlash,
    #[error("the path holds an encoded '\\' (%5C)")]
    EncodedBackslash,
    /// A raw `\` is no path character (RFC 3986 §3.3), and browsers and some servers
    /// read it as `/`: refused for the same reason as `%5C`.
    #[error("the path holds a '\\'")]
    Backslash,
    #[error("the path holds a NUL (%00)")]
    Nul,
    #[error("the path holds an invalid percent escape")]
    InvalidEscape,
    #[error("the path is not valid UTF-8 once decoded")]
    InvalidUtf8,
}

/// The canonical form of a request path, on which routes are matched and which the
/// upstream receives, so that wsbeat and a backend that decodes paths agree on the route
/// (`/%61dmin/ws` and `//admin/ws` are `/admin/ws`). Escapes of unreserved characters
/// (RFC 3986 §2.3) are decoded and every other escape is kept with uppercase hex; dot
/// segments are removed (RFC 3986 §5.2.4, `..` above the root stays at the root) and
/// repeated `/` merged. An encoded `/` or `\` (or a raw `\`), a NUL, an invalid escape,
/// or bytes that are not UTF-8 once decoded (overlong forms included) have no canonical
/// form: their meaning differs between backends. `path` is the path alone, without the query.
pub fn canonical_path(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    // `kept`: the path with only unreserved escapes decoded; `decoded`: every escape
    // decoded, to check that the path is UTF-8 the way a decoding backend sees it.
    let mut kept = String::with_capacity(path.len());
    let mut decoded = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\\' {
            return Err(PathError::Backslash);
        }
        if b != b'%' {
            // A str boundary: '%' is ASCII, so `i` starts a character here.
            let c = path[i..].chars().next().ok_or(PathError::InvalidEscape)?;
            kept.push(c);
            decoded.extend_from_slice(&bytes[i..i + c.len_utf8()]);
            i += c.len_utf8();
            continue;
        }
        let hex = |at: usize| bytes.get(at).and_then(|h| (*h as char).to_digit(16));
        let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
            return Err(PathError::InvalidEscape);
        };
        let byte = (hi * 16 + lo) as u8;
        match byte {
            b'/' => return Err(PathError::EncodedSlash),
            b'\\' => return Err(PathError::EncodedBackslash),
            0 => return Err(PathError::Nul),
            b if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => kept.push(b as char),
            b => {
                kept.push('%');
                kept.push_str(&format!("{b:02X}"));
            }
        }
        decoded.push(byte);
        i += 3;
    }
    if std::str::from_utf8(&decoded).is_err() {
        return Err(PathError::InvalidUtf8);
    }
    Ok(remove_dot_segments(&kept))
}

/// Whether `path` is its own canonical form at a glance: printable ASCII with no escape
/// and no backslash, and no empty (but a final one), `.` or `..` segment. Most paths
/// are; for them [`canonical_path`] would only copy the path.
pub fn is_plainly_canonical(path: &str) -> bool {
    let mut segments = path.split('/');
    segments.next() == Some("")
        && path
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'%' && b != b'\\')
        && {
            let mut rest = segments.peekable();
            let mut ok = true;
            while let Some(s) = rest.next() {
                let last = rest.peek().is_none();
                if matches!(s, "." | "..") || (s.is_empty() && !last) {
                    ok = false;
                    break;
                }
            }
            ok
        }
}

/// Merges repeated `/` and removes `.` and `..` segments; a final `.` or `..` leaves a
/// trailing `/`, as in RFC 3986 §5.2.4.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in path.split('/') {
        trailing_slash = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len() + 1);
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    out
}

/// Why a request's `Host` is refused with 400 (RFC 9112 §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("more than one Host header")]
    Repeated,
    #[error("the Host header disagrees with the request target's authority")]
    DisagreesWithTarget,
}

/// RFC 9112 §3.2: one `Host` at most, and with an absolute-form target a `Host` that names
/// the same authority (host compared without case, an absent port being the scheme's
/// default). Two answers to "which site?" let a front and a backend pick different ones.
pub fn check_host(uri: &hyper::Uri, headers: &HeaderMap) -> Result<(), HostError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(HostError::Repeated);
    }
    let (Some(target), Some(host)) = (uri.authority(), host) else {
        return Ok(());
    };
    let default_port = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    let Ok(host) = host
        .to_str()
        .map_err(|_| ())
        .and_then(|h| h.parse::<hyper::http::uri::Authority>().map_err(|_| ()))
    else {
        return Err(HostError::DisagreesWithTarget);
    };
    let same = host.host().eq_ignore_ascii_case(target.host())
        && host.port_u16().unwrap_or(default_port) == target.port_u16().unwrap_or(default_port);
    if same {
        Ok(())
    } else {
        Err(HostError::DisagreesWithTarget)
    }
}

#[cfg(test)]
mod canonical_tests {
    use super::*;

    #[test]
    fn paths_are_canonical() {
        for (raw, canonical) in [
            ("/", "/"),
            ("/admin/ws", "/admin/ws"),
            ("/%61dmin/ws", "/admin/ws"),
            ("//admin//ws", "/admin/ws"),
            ("/./admin/./ws", "/admin/ws"),
            ("/a/b/../c", "/a/c"),
            ("/%2e%2e/%2E%2E/admin", "/admin"),
            ("/../../x", "/x"),
            ("/..", "/"),
            ("/a/.", "/a/"),
            ("/a/..", "/"),
            ("/a/", "/a/"),
            ("/a//", "/a/"),
            ("/%7E/~", "/~/~"),
            ("/a%20b", "/a%20b"),
            ("/a%c3%a9", "/a%C3%A9"),
            ("/é", "/é"),
            ("/.%2e/x", "/x"),
            ("/a/...", "/a/..."),
        ] {
            assert_eq!(canonical_path(raw).as_deref(), Ok(canonical), "{raw}");
        }
    }

    /// Every combination of a few tricky pieces: a canonical path is its own canonical
    /// form, starts with `/`, and holds no empty, `.` or `..` segment.
    #[test]
    fn canonical_paths_are_fixed_points() {
        const PIECES: &[&str] = &[
            "/", "a", ".", "..", "%2e", "%2E%2e", "%61", "%7e", "~", "%25", "%c3%a9", "é", "%",
            "%2f", "?",
        ];
        let mut paths = vec![String::new()];
        for _ in 0..4 {
            paths = paths
                .iter()
                .flat_map(|p| PIECES.iter().map(move |piece| format!("{p}{piece}")))
                .collect();
            for path in &paths {
                let raw = format!("/{path}");
                if is_plainly_canonical(&raw) {
                    assert_eq!(canonical_path(&raw).as_ref(), Ok(&raw), "{raw}");
                }
                let Ok(canonical) = canonical_path(&raw) else {
                    continue;
                };
                assert!(is_plainly_canonical(&canonical) || canonical.contains(['%', 'é']));
                assert_eq!(canonical_path(&canonical).as_ref(), Ok(&canonical), "{raw}");
                assert!(canonical.starts_with('/'), "{raw} -> {canonical}");
                let inner = canonical.trim_end_matches('/');
                assert!(
                    inner
                        .split('/')
                        .skip(1)
                        .all(|s| !matches!(s, "" | "." | "..")),
                    "{raw} -> {canonical}"
                );
            }
        }
    }

    #[test]
    fn ambiguous_paths_have_no_canonical_form() {
        for (raw, error) in [
            ("/a%2Fb", PathError::EncodedSlash),
            ("/a%2fb", PathError::EncodedSlash),
            ("/a%5cb", PathError::EncodedBackslash),
            ("/a%5Cb", PathError::EncodedBackslash),
            ("/a\\..\\b", PathError::Backslash),
            ("/a%00", PathError::Nul),
            ("/a%zz", PathError::InvalidEscape),
            ("/a%4", PathError::InvalidEscape),
            ("/a%", PathError::InvalidEscape),
            ("/%C0%AE%C0%AE/x", PathError::InvalidUtf8),
            ("/%FF", PathError::InvalidUtf8),
            ("/%C3", PathError::InvalidUtf8),
        ] {
            assert_eq!(canonical_path(raw), Err(error), "{raw}");
        }
    }

    #[test]
    fn host_must_be_single_and_agree_with_the_target() {
        let headers = |hosts: &[&str]| {
            let mut h = HeaderMap::new();
            for v in hosts {
                h.append(header::HOST, HeaderValue::from_str(v).unwrap());
            }
            h
        };
        let origin: hyper::Uri = "/ws".parse().unwrap();
        let absolute: hyper::Uri = "http://Example.com/ws".parse().unwrap();
        assert_eq!(check_host(&origin, &headers(&["a"])), Ok(()));
        assert_eq!(check_host(&origin, &headers(&[])), Ok(()));
        assert_eq!(
            check_host(&origin, &headers(&["a", "a"])),
            Err(HostError::Repeated)
        );
        assert_eq!(check_host(&absolute, &headers(&["example.com"])), Ok(()));
        assert_eq!(check_host(&absolute, &headers(&["example.com:80"])), Ok(()));
        assert_eq!(
            check_host(&absolute, &headers(&["evil.com"])),
            Err(HostError::DisagreesWithTarget)
        );
        assert_eq!(
            check_host(&absolute, &headers(&["example.com:8080"])),
            Err(HostError::DisagreesWithTarget)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        h
    }

    fn nets(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn info(peer: &str, client: &HeaderMap, trusted: &[&str]) -> ClientInfo {
        ClientInfo::new(peer.parse().unwrap(), false, client, &nets(trusted))
    }

    /// The upstream request's headers for a client request from `peer`.
    fn forwarded(peer: &str, client: &[(&str, &str)], trusted: &[&str]) -> HeaderMap {
        let client = headers(client);
        let mut out = HeaderMap::new();
        copy_end_to_end(&client, &mut out);
        add_forwarding(&client, info(peer, &client, trusted), &mut out);
        out
    }

    const SPOOFED: &[(&str, &str)] = &[
        ("host", "app.example:8443"),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "evil.example"),
        ("x-real-ip", "198.51.100.1"),
        ("forwarded", "for=198.51.100.1;proto=https"),
    ];

    #[test]
    fn an_untrusted_peer_cannot_claim_an_identity() {
        let h = forwarded("192.0.2.7:5555", SPOOFED, &["10.0.0.0/8"]);
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "app.example:8443");
        assert_eq!(h["x-real-ip"], "192.0.2.7");
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.7;proto=http;host=\"app.example:8443\""
        );
        for name in [
            "x-real-ip",
            "forwarded",
            "x-forwarded-proto",
            "x-forwarded-for",
        ] {
            assert_eq!(h.get_all(name).iter().count(), 1, "{name}");
        }
        let client = headers(SPOOFED);
        let i = info("192.0.2.7:5555", &client, &["10.0.0.0/8"]);
        assert!(!i.peer_trusted);
        assert_eq!(i.client.to_string(), "192.0.2.7:5555");
    }

    #[test]
    fn a_trusted_peer_is_believed() {
        let h = forwarded("10.1.2.3:5555", SPOOFED, &["10.0.0.0/8"]);
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "evil.example");
        assert_eq!(h["x-real-ip"], "198.51.100.1");
        assert_eq!(h["forwarded"], "for=198.51.100.1;proto=https");
        let client = headers(SPOOFED);
        let i = info("10.1.2.3:5555", &client, &["10.0.0.0/8"]);
        assert!(i.peer_trusted);
        assert_eq!(i.client.to_string(), "203.0.113.7");
    }

    #[test]
    fn a_trusted_peer_that_says_nothing_gets_what_wsbeat_saw() {
        let h = forwarded(
            "10.1.2.3:5555",
            &[("host", "app.example"), ("x-forwarded-for", "203.0.113.7")],
            &["10.0.0.0/8"],
        );
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "app.example");
        assert_eq!(h["x-real-ip"], "203.0.113.7");
        assert!(h.get("forwarded").is_none());
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_address() {
        let trusted = ["10.0.0.0/8", "fc00::/7"];
        let client = |xff: &[&str]| {
            let pairs: Vec<(&str, &str)> = xff.iter().map(|v| ("x-forwarded-for", *v)).collect();
            info("10.9.9.9:1", &headers(&pairs), &trusted)
                .client
                .to_string()
        };
        assert_eq!(client(&["203.0.113.7, 10.0.0.5"]), "203.0.113.7");
        // A client's own claim left of the real address is not believed.
        assert_eq!(client(&["1.1.1.1, 203.0.113.7, 10.0.0.5"]), "203.0.113.7");
        // Several headers are one list, in order.
        assert_eq!(client(&["1.1.1.1", "203.0.113.7, fd00::1"]), "203.0.113.7");
        // All trusted: the leftmost.
        assert_eq!(client(&["10.0.0.1, 10.0.0.2"]), "10.0.0.1");
        // None readable, or none at all: the peer.
        assert_eq!(client(&["unknown"]), "10.9.9.9:1");
        assert_eq!(client(&[]), "10.9.9.9:1");
        // An unreadable entry stops the walk: nothing left of it is believed.
        assert_eq!(client(&["203.0.113.7, garbage, 10.0.0.5"]), "10.0.0.5");
        // Ports and brackets are read and dropped; mapped IPv6 is IPv4.
        assert_eq!(client(&["203.0.113.7:4444"]), "203.0.113.7");
        assert_eq!(client(&["[2001:db8::1]:4444"]), "2001:db8::1");
        assert_eq!(client(&["[2001:db8::2]"]), "2001:db8::2");
        assert_eq!(client(&["::ffff:203.0.113.9, 10.0.0.5"]), "203.0.113.9");
    }

    #[test]
    fn ipv4_mapped_ipv6_peers_are_ipv4() {
        let client = headers(&[("host", "h")]);
        let i = info("[::ffff:127.0.0.1]:4000", &client, &[]);
        assert_eq!(i.peer.to_string(), "127.0.0.1:4000");
        assert_eq!(i.client.to_string(), "127.0.0.1:4000");
        let h = forwarded("[::ffff:192.0.2.7]:4000", &[("host", "h")], &[]);
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["x-real-ip"], "192.0.2.7");
        assert_eq!(h["forwarded"], "for=192.0.2.7;proto=http;host=h");
        // A trusted IPv4 network matches a mapped peer.
        assert!(info("[::ffff:127.0.0.1]:4000", &client, &["127.0.0.0/8"]).peer_trusted);
    }

    #[test]
    fn forwarded_quotes_what_is_not_a_token() {
        let h = forwarded("[2001:db8::1]:443", &[], &[]);
        assert_eq!(h["forwarded"], "for=\"[2001:db8::1]\";proto=http");
        assert_eq!(h["x-real-ip"], "2001:db8::1");
        assert_eq!(
            forwarded_element("192.0.2.1".parse().unwrap(), "https", Some("a\"b\\c")),
            "for=192.0.2.1;proto=https;host=\"a\\\"b\\\\c\""
        );
        assert_eq!(
            forwarded_element("192.0.2.1".parse().unwrap(), "http", Some("[::1]:8080")),
            "for=192.0.2.1;proto=http;host=\"[::1]:8080\""
        );
    }
}
