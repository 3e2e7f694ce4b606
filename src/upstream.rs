//! The upstream leg's handshake: dial the route's upstream, forward the client's request
//! with the end-to-end and `X-Forwarded-*` headers, and check the 101 it answers.

use std::time::Instant;

use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::request::Parts;
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::compression;
use crate::config::{Compression, UpstreamConfig};
use crate::forwarding::{add_forwarding, copy_end_to_end, header_tokens, ClientInfo};
use crate::tls::{LegStream, UpstreamTls};

/// The upstream leg once its handshake is done: the stream and any frames that arrived
/// with the 101.
pub type UpstreamSocket = crate::relay::Socket<LegStream>;

/// Why the upstream leg could not be opened; the variant decides the client's status.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// Connect and handshake took longer than `connect_timeout` (client gets 504).
    #[error("upstream {0} did not complete the handshake within the connect timeout")]
    Timeout(String),
    /// TCP connect failed (client gets 502).
    #[error("cannot connect to upstream {upstream}: {source}")]
    Connect {
        upstream: String,
        source: std::io::Error,
    },
    /// The TLS handshake failed, e.g. a certificate that does not verify (client gets
    /// 502).
    #[error("upstream {upstream} TLS handshake failed: {source}")]
    Tls {
        upstream: String,
        source: std::io::Error,
    },
    /// The HTTP exchange failed (client gets 502).
    #[error("upstream {upstream} handshake failed: {source}")]
    Http {
        upstream: String,
        source: hyper::Error,
    },
    /// The upstream answered 101 but broke the WebSocket handshake rules (client gets 502).
    #[error("upstream {upstream} sent an invalid WebSocket handshake: {reason}")]
    Invalid {
        upstream: String,
        reason: &'static str,
    },
}

/// Takes the stream back out of a finished hyper upgrade, with the bytes hyper had
/// already read past the handshake.
fn into_stream(upgraded: Upgraded) -> Option<crate::relay::Socket<LegStream>> {
    let parts = upgraded.downcast::<TokioIo<LegStream>>().ok()?;
    Some(crate::relay::Socket {
        io: parts.io.into_inner(),
        leftover: parts.read_buf,
    })
}

impl DialError {
    /// The status the client gets, and the `reason` label of the upstream error counter.
    pub fn status_and_reason(&self) -> (StatusCode, &'static str) {
        match self {
            DialError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            DialError::Connect { .. } => (StatusCode::BAD_GATEWAY, "connect"),
            DialError::Tls { .. } => (StatusCode::BAD_GATEWAY, "tls"),
            DialError::Http { .. } => (StatusCode::BAD_GATEWAY, "handshake"),
            DialError::Invalid { .. } => (StatusCode::BAD_GATEWAY, "handshake"),
        }
    }
}

/// What the upstream answered.
pub enum Dialed {
    /// 101: the upstream leg is open.
    Accepted {
        socket: Box<UpstreamSocket>,
        /// The subprotocol the upstream chose, for the client's 101.
        protocol: Option<HeaderValue>,
        /// The `Sec-WebSocket-Extensions` for the client's 101: the `permessage-deflate`
        /// the upstream accepted, with `client_no_context_takeover`; `None`: the
        /// connection is not compressed.
        extensions: Option<HeaderValue>,
        /// The 101's other end-to-end headers (e.g. `Set-Cookie`), for the client's 101.
        headers: HeaderMap,
        /// Time from starting to dial to the upstream's 101.
        connect_time: std::time::Duration,
    },
    /// Anything else (403, 404, …): passed to the client as it is, body streamed.
    Refused(Response<Incoming>),
}

/// Builds the upstream handshake request from the client's request head, with `offer`
/// as its `Sec-WebSocket-Extensions`.
fn upstream_request(
    client: &Parts,
    info: ClientInfo,
    upstream: &UpstreamConfig,
    key: &[u8],
    offer: Option<&HeaderValue>,
) -> Request<http_body_util::Empty<bytes::Bytes>> {
    let mut req = Request::new(http_body_util::Empty::new());
    *req.method_mut() = Method::GET;
    *req.version_mut() = Version::HTTP_11;
    // Origin-form only: an absolute-form target never chooses where wsbeat connects.
    let target = client
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    *req.uri_mut() = target
        .parse()
        .unwrap_or_else(|_| hyper::Uri::from_static("/"));

    let headers = req.headers_mut();
    // Built once: room for the client's headers and the dozen added below.
    headers.reserve(client.headers.len() + 12);
    copy_end_to_end(&client.headers, headers);
    headers.remove(header::CONTENT_LENGTH);
    let offered: Vec<&str> =
        header_tokens(&client.headers, &header::SEC_WEBSOCKET_PROTOCOL).collect();
    if !offered.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&offered.join(", ")) {
            headers.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
        }
    }
    if !client.headers.contains_key(header::HOST) {
        if let Ok(v) = HeaderValue::from_str(&upstream.url.authority()) {
            headers.insert(header::HOST, v);
        }
    }
    add_forwarding(&client.headers, info, headers);
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(
        header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
    if let Ok(v) = HeaderValue::from_bytes(key) {
        headers.insert(header::SEC_WEBSOCKET_KEY, v);
    }
    if let Some(offer) = offer {
        headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, offer.clone());
    }
    req
}

/// Dials the upstream (with TLS for `wss://`: `tls` is its connector) and performs the
/// WebSocket handshake, all within `upstream.connect_timeout`. With
/// `Compression::Passthrough` the client's `permessage-deflate` offer goes along.
pub async fn dial(
    upstream: &UpstreamConfig,
    compression: Compression,
    tls: Option<&UpstreamTls>,
    client: &Parts,
    info: ClientInfo,
) -> Result<Dialed, DialError> {
    // The upstream's name is formatted only for an error.
    let started = Instant::now();
    match tokio::time::timeout(
        upstream.connect_timeout.0,
        handshake(upstream, compression, tls, client, info, started),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(DialError::Timeout(upstream.url.to_string())),
    }
}

async fn handshake(
    upstream: &UpstreamConfig,
    compression: Compression,
    tls: Option<&UpstreamTls>,
    client: &Parts,
    info: ClientInfo,
    started: Instant,
) -> Result<Dialed, DialError> {
    let tcp = TcpStream::connect((upstream.url.host.as_str(), upstream.url.port))
        .await
        .map_err(|source| DialError::Connect {
            upstream: upstream.url.to_string(),
            source,
        })?;
    // Small frames (heartbeats, chat messages) must not wait for Nagle.
    let _ = tcp.set_nodelay(true);
    let stream = match tls {
        // `validate` gave every wss:// route a connector; a missing one is a bug, and
        // plain text to a TLS port would only fail later and less clearly.
        None if upstream.url.secure => {
            return Err(DialError::Tls {
                upstream: upstream.url.to_string(),
                source: std::io::Error::other("no TLS settings for this upstream"),
            })
        }
        None => LegStream::Plain(tcp),
        Some(tls) => tls
            .connector
            .connect(tls.server_name.clone(), tcp)
            .await
            .map(|s| tokio_rustls::TlsStream::Client(s).into())
            .map_err(|source| DialError::Tls {
                upstream: upstream.url.to_string(),
                source,
            })?,
    };
    let http_err = |source| DialError::Http {
        upstream: upstream.url.to_string(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_err)?;
    // The connection task ends when the upgrade completes or the refusal's body is read.
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream handshake connection ended with an error");
        }
    });

    let key = crate::wskey::new_key();
    let offer = match compression {
        Compression::Passthrough => compression::offer_upstream(&client.headers),
        Compression::Off => None,
    };
    let request = upstream_request(client, info, upstream, &key, offer.as_ref());
    let mut response = sender.send_request(request).await.map_err(http_err)?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Dialed::Refused(response));
    }
    let invalid = |reason| DialError::Invalid {
        upstream: upstream.url.to_string(),
        reason,
    };
    let headers = response.headers();
    let accept_ok = headers
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .is_some_and(|v| v.as_bytes() == crate::wskey::accept(&key));
    if !accept_ok {
        return Err(invalid("wrong or missing Sec-WebSocket-Accept"));
    }
    if !header_tokens(headers, &header::UPGRADE).any(|t| t.eq_ignore_ascii_case("websocket")) {
        return Err(invalid("101 without Upgrade: websocket"));
    }
    let extensions = compression::answer_client(headers, offer.as_ref()).map_err(invalid)?;
    let protocol = headers.get(header::SEC_WEBSOCKET_PROTOCOL).cloned();
    if let Some(chosen) = &protocol {
        let offered = header_tokens(&client.headers, &header::SEC_WEBSOCKET_PROTOCOL)
            .any(|t| chosen.as_bytes() == t.as_bytes());
        if !offered {
            return Err(invalid("a subprotocol the client did not offer"));
        }
    }
    // With room for the four headers the client's 101 adds.
    let mut forwarded = HeaderMap::with_capacity(headers.len() + 4);
    copy_end_to_end(headers, &mut forwarded);
    let upgraded = hyper::upgrade::on(&mut response).await.map_err(http_err)?;
    let socket = into_stream(upgraded)
        .ok_or_else(|| invalid("the upgraded connection is not a wsbeat stream"))?;
    Ok(Dialed::Accepted {
        socket: Box::new(socket),
        protocol,
        extensions,
        headers: forwarded,
        connect_time: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)], uri: &str) -> Parts {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn forwards_end_to_end_headers_and_drops_hop_by_hop_ones() {
        let client = parts(
            &[
                ("host", "app.example"),
                ("connection", "Upgrade, X-Secret"),
                ("x-secret", "hop"),
                ("keep-alive", "timeout=5"),
                ("cookie", "a=1"),
                ("authorization", "Bearer t"),
                ("origin", "https://app.example"),
                ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("sec-websocket-extensions", "permessage-deflate"),
                ("sec-websocket-protocol", "chat, superchat"),
                ("x-forwarded-for", "203.0.113.9"),
            ],
            "http://evil.example/ws/chat?room=1",
        );
        let info = ClientInfo::new(
            "192.0.2.7:5555".parse().unwrap(),
            false,
            &client.headers,
            &[],
        );
        let req = upstream_request(&client, info, &UpstreamConfig::default(), b"k", None);
        let h = req.headers();
        assert_eq!(req.uri(), "/ws/chat?room=1");
        assert_eq!(h["host"], "app.example");
        assert_eq!(h["cookie"], "a=1");
        assert_eq!(h["authorization"], "Bearer t");
        assert_eq!(h["origin"], "https://app.example");
        assert_eq!(h["sec-websocket-protocol"], "chat, superchat");
        assert_eq!(h["sec-websocket-key"], "k");
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "app.example");
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("sec-websocket-extensions").is_none());
        assert_eq!(h.get_all("connection").iter().count(), 1);

        let offer = compression::offer_upstream(&client.headers);
        let req = upstream_request(
            &client,
            info,
            &UpstreamConfig::default(),
            b"k",
            offer.as_ref(),
        );
        assert_eq!(
            req.headers()["sec-websocket-extensions"],
            "permessage-deflate; client_no_context_takeover"
        );
    }
}
