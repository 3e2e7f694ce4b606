//! Header policy between the legs: which headers are end-to-end (RFC 9110 §7.6.1),
//! comma-separated tokens, and what wsbeat adds about the client (`X-Forwarded-*`, `Via`);
//! and the request target both legs agree on: the canonical path and a single `Host`.

use std::net::SocketAddr;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

/// What wsbeat adds to `Via` (RFC 9110 §7.6.3).
pub const VIA: &str = "1.1 wsbeat";

/// The client's side of the connection, for `X-Forwarded-*`.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo {
    pub addr: SocketAddr,
    /// True when the client reached wsbeat over TLS.
    pub tls: bool,
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
    let named_in_connection: Vec<String> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    for (name, value) in from {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || named_in_connection.iter().any(|c| c == n) {
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

/// Adds `X-Forwarded-For` (the client's own list, then the address wsbeat saw),
/// `X-Forwarded-Proto` and `X-Forwarded-Host` (the client's `Host`) to a request bound
/// for the upstream. The client's `Host` itself is forwarded unchanged.
pub fn add_forwarding(client: &HeaderMap, info: ClientInfo, out: &mut HeaderMap) {
    let ip = info.addr.ip().to_string();
    let xff = match header_tokens(client, &HeaderName::from_static("x-forwarded-for"))
        .collect::<Vec<_>>()
    {
        prior if prior.is_empty() => ip,
        prior => format!("{}, {ip}", prior.join(", ")),
    };
    out.remove("x-forwarded-for");
    if let Ok(v) = HeaderValue::from_str(&xff) {
        out.insert("x-forwarded-for", v);
    }
    out.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(if info.tls { "https" } else { "http" }),
    );
    out.remove("x-forwarded-host");
    if let Some(host) = client.get(header::HOST) {
        out.insert("x-forwarded-host", host.clone());
    }
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
                let Ok(canonical) = canonical_path(&raw) else {
                    continue;
                };
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
