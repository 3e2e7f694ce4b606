//! Header policy between the legs: which headers are end-to-end (RFC 9110 §7.6.1),
//! comma-separated tokens, and what wsbeat adds about the client (`X-Forwarded-*`, `Via`).

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
