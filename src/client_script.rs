//! `client_script`: wsbeat's own browser client (`clients/js/wsbeat.js`), served from the
//! public port at one configured path, so a page can import the client that matches the
//! proxy in front of it.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Response, StatusCode};

/// The browser client, embedded at build time.
pub const SOURCE: &str = include_str!("../clients/js/wsbeat.js");

/// The script's entity tag: its FNV-1a hash, so a browser revalidates cheaply and sees
/// a new client as soon as wsbeat is upgraded.
fn etag() -> &'static HeaderValue {
    static ETAG: std::sync::OnceLock<HeaderValue> = std::sync::OnceLock::new();
    ETAG.get_or_init(|| {
        let hash = SOURCE.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        HeaderValue::from_str(&format!("\"{hash:016x}\"")).expect("hex is a valid header")
    })
}

/// Whether an `If-None-Match` header names the current script (`*` or a list holding
/// its tag, weak or strong: RFC 9110 §13.1.2 compares them weakly).
fn not_modified(headers: &HeaderMap) -> bool {
    let tag = etag().as_bytes();
    headers.get_all(header::IF_NONE_MATCH).iter().any(|v| {
        v.as_bytes().split(|&b| b == b',').any(|candidate| {
            let candidate = candidate.trim_ascii();
            let candidate = candidate.strip_prefix(b"W/").unwrap_or(candidate);
            candidate == b"*" || candidate == tag
        })
    })
}

/// The answer to a request for the script: GET and HEAD get it (or 304 when the
/// browser's copy is current); any other method gets 405. A whole body (empty for HEAD and
/// 304): the server turns it into its own body type.
pub fn respond(method: &Method, headers: &HeaderMap) -> Response<Full<Bytes>> {
    let (status, body) = match *method {
        Method::GET | Method::HEAD if not_modified(headers) => (StatusCode::NOT_MODIFIED, None),
        Method::GET => (StatusCode::OK, Some(Bytes::from_static(SOURCE.as_bytes()))),
        Method::HEAD => (StatusCode::OK, None),
        _ => {
            let mut r = Response::new(Full::new(Bytes::from_static(
                b"wsbeat: the client script answers GET and HEAD only\n",
            )));
            *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            h.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
    };
    let mut r = Response::new(Full::new(body.unwrap_or_default()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::ETAG, etag().clone());
    // Revalidated on every load (a 304 costs one round trip), never stale after an upgrade.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // A public script, fetched without credentials: pages on any origin (a CDN in front
    // of the app, wsbeat on its own host) may import it as a module.
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    if status == StatusCode::OK {
        // A module script is refused by browsers unless its type is JavaScript.
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/javascript; charset=utf-8"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(SOURCE.len()));
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_if_none_match(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn get_serves_the_embedded_client_as_javascript() {
        let r = respond(&Method::GET, &HeaderMap::new());
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        assert_eq!(
            r.headers()[header::CONTENT_LENGTH],
            SOURCE.len().to_string()
        );
        assert!(SOURCE.contains("export class WsBeat "));
    }

    #[test]
    fn a_current_tag_gets_304_and_any_other_gets_the_script() {
        let tag = etag().to_str().unwrap().to_owned();
        for current in [
            tag.clone(),
            format!("W/{tag}"),
            format!("\"x\", {tag}"),
            "*".into(),
        ] {
            let r = respond(&Method::GET, &with_if_none_match(&current));
            assert_eq!(r.status(), StatusCode::NOT_MODIFIED, "{current}");
        }
        let r = respond(&Method::GET, &with_if_none_match("\"0000000000000000\""));
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[test]
    fn other_methods_get_405_with_allow() {
        let r = respond(&Method::POST, &HeaderMap::new());
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], "GET, HEAD");
    }
}
