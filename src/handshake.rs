//! The client handshake decision, pure (no I/O): from a request head to what wsbeat
//! answers before any upstream is dialed. The server uses [`check`] on hyper's parsed
//! request; [`decide_head`] takes the raw bytes (parsed with httparse, as hyper does) so
//! that a fuzz target can drive the whole decision.

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode, Version};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::forwarding::header_tokens;

/// Longest request head accepted; larger ones get 431.
pub const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// Most header lines accepted in a request head; more get 431 (hyper's own limit).
pub const MAX_HEADERS: usize = 100;

/// Why a handshake is refused: the status and a one-line reason for the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    pub reason: &'static str,
}

impl Rejection {
    fn bad(reason: &'static str) -> Self {
        Rejection {
            status: StatusCode::BAD_REQUEST,
            reason,
        }
    }

    /// 426 also names the version wsbeat speaks (`Sec-WebSocket-Version: 13`).
    pub fn needs_version_header(&self) -> bool {
        self.status == StatusCode::UPGRADE_REQUIRED
    }
}

/// What wsbeat does with a request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The head is not complete yet: wait for more bytes (until `handshake_timeout`).
    Incomplete,
    /// Not a WebSocket upgrade: a plain HTTP request.
    PlainHttp,
    /// A valid WebSocket handshake: dial the upstream; `accept` is the client's
    /// `Sec-WebSocket-Accept`.
    Upgrade { accept: String },
    /// Refused before dialing.
    Reject(Rejection),
}

/// True when the request asks for a WebSocket (`Upgrade: websocket`).
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    header_tokens(headers, &header::UPGRADE).any(|t| t.eq_ignore_ascii_case("websocket"))
}

/// RFC 6455 §4.2.1: the opening handshake's requirements, for a request that asks for an
/// upgrade. Refused: 400 with a one-line reason, or 426 for a version other than 13.
pub fn check<B>(req: &Request<B>) -> Result<(), Rejection> {
    checked_key(req).map(|_| ())
}

/// [`check`], returning the validated `Sec-WebSocket-Key`.
fn checked_key<B>(req: &Request<B>) -> Result<&HeaderValue, Rejection> {
    let headers = req.headers();
    if req.method() != Method::GET {
        return Err(Rejection::bad(
            "a WebSocket handshake must be a GET request",
        ));
    }
    if req.version() != Version::HTTP_11 {
        return Err(Rejection::bad("a WebSocket handshake must use HTTP/1.1"));
    }
    if !header_tokens(headers, &header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade")) {
        return Err(Rejection::bad(
            "a WebSocket handshake needs `Connection: Upgrade`",
        ));
    }
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes() == b"13");
    if !version_ok {
        return Err(Rejection {
            status: StatusCode::UPGRADE_REQUIRED,
            reason: "wsbeat speaks WebSocket version 13 only",
        });
    }
    match headers.get(header::SEC_WEBSOCKET_KEY) {
        Some(key) if is_valid_key(key.as_bytes()) => Ok(key),
        Some(_) => Err(Rejection::bad(
            "Sec-WebSocket-Key must be 16 bytes in base64",
        )),
        None => Err(Rejection::bad(
            "a WebSocket handshake needs Sec-WebSocket-Key",
        )),
    }
}

/// The decision on a parsed request.
pub fn decide<B>(req: &Request<B>) -> Decision {
    if !is_upgrade_request(req.headers()) {
        return Decision::PlainHttp;
    }
    match checked_key(req) {
        Err(rejection) => Decision::Reject(rejection),
        Ok(key) => Decision::Upgrade {
            accept: derive_accept_key(key.as_bytes()),
        },
    }
}

/// The decision on raw bytes: the request head as a client sends it (anything after the
/// blank line is ignored). Mirrors hyper's parsing on the public listener: 431 past
/// [`MAX_REQUEST_HEAD`] bytes or [`MAX_HEADERS`] headers, 400 for a head that does not
/// parse, then [`decide`].
pub fn decide_head(head: &[u8]) -> Decision {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut slots);
    let too_large = Decision::Reject(Rejection {
        status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        reason: "request head too large",
    });
    let unparseable = Decision::Reject(Rejection::bad("malformed request head"));
    let head_len = match parsed.parse(head) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if head.len() >= MAX_REQUEST_HEAD => return too_large,
        Ok(httparse::Status::Partial) => return Decision::Incomplete,
        Err(httparse::Error::TooManyHeaders) => return too_large,
        Err(_) => return unparseable,
    };
    if head_len > MAX_REQUEST_HEAD {
        return too_large;
    }
    match to_request(&parsed) {
        Some(req) => decide(&req),
        None => unparseable,
    }
}

/// An `http::Request` from httparse's fields; `None` for a method, target or header
/// that `http` does not accept (hyper answers those with 400 too).
fn to_request(parsed: &httparse::Request<'_, '_>) -> Option<Request<()>> {
    let version = match parsed.version? {
        0 => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut req = Request::builder()
        .method(Method::from_bytes(parsed.method?.as_bytes()).ok()?)
        .uri(parsed.path?)
        .version(version)
        .body(())
        .ok()?;
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        req.headers_mut().append(name, value);
    }
    Some(req)
}

/// A base64 encoding of exactly 16 bytes: 22 alphabet characters, the last of which
/// carries only 2 bits, then `==`.
pub fn is_valid_key(key: &[u8]) -> bool {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    if key.len() != 24 || &key[22..] != b"==" {
        return false;
    }
    let Some(last) = ALPHABET.iter().position(|&c| c == key[21]) else {
        return false;
    };
    last & 0x0f == 0 && key[..21].iter().all(|c| ALPHABET.contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str =
        "GET /ws?room=1 HTTP/1.1\r\nHost: example\r\nConnection: keep-alive, Upgrade\r\n\
        Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

    fn status(head: &[u8]) -> Option<StatusCode> {
        match decide_head(head) {
            Decision::Reject(r) => Some(r.status),
            _ => None,
        }
    }

    #[test]
    fn a_valid_head_is_upgraded_with_the_rfc_accept_key() {
        // RFC 6455 §1.3's example key and answer.
        assert_eq!(
            decide_head(GOOD.as_bytes()),
            Decision::Upgrade {
                accept: "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".into()
            }
        );
    }

    #[test]
    fn heads_are_incomplete_until_the_blank_line() {
        let cut = &GOOD.as_bytes()[..GOOD.len() - 2];
        assert_eq!(decide_head(cut), Decision::Incomplete);
        assert_eq!(decide_head(b""), Decision::Incomplete);
    }

    #[test]
    fn plain_requests_are_plain_http() {
        assert_eq!(
            decide_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Decision::PlainHttp
        );
    }

    #[test]
    fn oversized_heads_and_too_many_headers_get_431() {
        let mut big = GOOD.trim_end().to_owned();
        big.push_str(&format!(
            "\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(MAX_REQUEST_HEAD)
        ));
        assert_eq!(
            status(big.as_bytes()),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        let endless = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_REQUEST_HEAD));
        assert_eq!(
            status(endless.as_bytes()),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "X: 1\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(
            status(many.as_bytes()),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
    }

    #[test]
    fn malformed_heads_get_400() {
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(status(b"\x00\x01\r\n\r\n"), Some(StatusCode::BAD_REQUEST));
        // A bare CR cannot smuggle a header line to the upstream: the head is refused.
        let smuggle = GOOD.replace("Host: example", "Host: example\rX-Injected: 1");
        assert_eq!(status(smuggle.as_bytes()), Some(StatusCode::BAD_REQUEST));
    }

    #[test]
    fn handshake_rules_apply_to_raw_heads() {
        let with = |from: &str, to: &str| status(GOOD.replace(from, to).as_bytes());
        assert_eq!(
            with("Version: 13", "Version: 8"),
            Some(StatusCode::UPGRADE_REQUIRED)
        );
        assert_eq!(with("GET /ws", "POST /ws"), Some(StatusCode::BAD_REQUEST));
        assert_eq!(with("HTTP/1.1", "HTTP/1.0"), Some(StatusCode::BAD_REQUEST));
        assert_eq!(
            with("keep-alive, Upgrade", "keep-alive"),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            with("dGhlIHNhbXBsZSBub25jZQ==", "short"),
            Some(StatusCode::BAD_REQUEST)
        );
    }

    #[test]
    fn keys_must_be_16_bytes_of_base64() {
        assert!(is_valid_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(
            !is_valid_key(b"dGhlIHNhbXBsZSBub25jZR=="),
            "non-canonical last char"
        );
        assert!(!is_valid_key(b"dGhlIHNhbXBsZSBub25j*Q=="));
        assert!(!is_valid_key(b"dGhlIHNhbXBsZSBub25jZQ="));
    }
}
