//! `permessage-deflate` end to end (RFC 7692): the offer wsbeat sends upstream, the
//! answer it gives the client, and the one inflate it ever does, alone and capped, to
//! recognise a compressed heartbeat. No zlib state is kept between messages.
//!
//! Why `client_no_context_takeover` is forced: wsbeat drops the client's heartbeats. If
//! the client compressed each message with the window of the ones before, the backend's
//! inflater would miss the dropped message's window and fail on the next one. With the
//! parameter, every client message is compressed on its own, so dropping one is safe
//! and one message can be inflated without any history.

use hyper::header::{self, HeaderMap, HeaderValue};
use miniz_oxide::inflate::core::inflate_flags::{
    TINFL_FLAG_HAS_MORE_INPUT, TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
};
use miniz_oxide::inflate::core::{decompress, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

/// The extension's name.
pub const PERMESSAGE_DEFLATE: &str = "permessage-deflate";
/// Compressed client messages up to this many payload bytes are inflated to see whether
/// they are the heartbeat; longer ones never are (a heartbeat compresses to a few bytes).
pub const MAX_HEARTBEAT_COMPRESSED: usize = 64;
/// What a sender removes from the end of each compressed message, and a receiver puts
/// back before inflating (RFC 7692 §7.2.2): an empty stored block.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
const CLIENT_NO_CONTEXT_TAKEOVER: &str = "client_no_context_takeover";

/// One extension from a `Sec-WebSocket-Extensions` list: its name and parameters
/// (values unquoted).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Extension {
    name: String,
    params: Vec<(String, Option<String>)>,
}

impl Extension {
    fn has(&self, param: &str) -> bool {
        self.params
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case(param))
    }

    fn render(&self) -> String {
        let mut s = self.name.clone();
        for (k, v) in &self.params {
            s.push_str("; ");
            s.push_str(k);
            if let Some(v) = v {
                s.push('=');
                s.push_str(v);
            }
        }
        s
    }
}

/// Splits `s` on `sep` outside quoted strings.
fn split_unquoted(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// A token as RFC 7230 defines it (what extension names and parameters are).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Every extension in the `Sec-WebSocket-Extensions` headers; `None` when one does not
/// parse (a header that is not ASCII, a name or parameter that is not a token).
fn parse_extensions(headers: &HeaderMap) -> Option<Vec<Extension>> {
    let mut list = Vec::new();
    for value in headers.get_all(header::SEC_WEBSOCKET_EXTENSIONS) {
        let value = value.to_str().ok()?;
        for item in split_unquoted(value, ',') {
            if item.trim().is_empty() {
                continue; // `1#` lists allow empty elements
            }
            let mut pieces = split_unquoted(item, ';').into_iter().map(str::trim);
            let name = pieces.next().filter(|n| is_token(n))?.to_owned();
            let mut params = Vec::new();
            for p in pieces {
                let (k, v) = match p.split_once('=') {
                    Some((k, v)) => {
                        let v = v.trim();
                        let v = v
                            .strip_prefix('"')
                            .and_then(|v| v.strip_suffix('"'))
                            .unwrap_or(v);
                        (k.trim(), Some(v))
                    }
                    None => (p, None),
                };
                if !is_token(k) || v.is_some_and(|v| !is_token(v)) {
                    return None;
                }
                params.push((k.to_owned(), v.map(str::to_owned)));
            }
            list.push(Extension { name, params });
        }
    }
    Some(list)
}

/// The `Sec-WebSocket-Extensions` wsbeat sends upstream for a client's request: the
/// client's `permessage-deflate` offers, in its order, each with
/// `client_no_context_takeover` added; every other extension left out. `None`: no offer
/// (the client made none, or its header does not parse).
pub fn offer_upstream(client: &HeaderMap) -> Option<HeaderValue> {
    let offers: Vec<String> = parse_extensions(client)?
        .into_iter()
        .filter(|e| e.name.eq_ignore_ascii_case(PERMESSAGE_DEFLATE))
        .map(|mut e| {
            if !e.has(CLIENT_NO_CONTEXT_TAKEOVER) {
                e.params.push((CLIENT_NO_CONTEXT_TAKEOVER.to_owned(), None));
            }
            e.render()
        })
        .collect();
    if offers.is_empty() {
        return None;
    }
    HeaderValue::from_str(&offers.join(", ")).ok()
}

/// The window size parameters take 8 to 15 (RFC 7692 §7.1.2).
fn window_bits_ok(v: Option<&str>) -> bool {
    v.and_then(|v| v.parse::<u8>().ok())
        .is_some_and(|bits| (8..=15).contains(&bits) && !v.is_some_and(|v| v.starts_with('0')))
}

/// The upstream's 101 against what wsbeat offered: `Ok(None)` when it accepted no
/// extension, `Ok(Some(answer))` for the client's 101 (the upstream's parameters with
/// `client_no_context_takeover` added if it left it out), `Err(reason)` when it
/// accepted something that was not offered or is not a valid `permessage-deflate`
/// answer (the client gets 502).
pub fn answer_client(
    upstream: &HeaderMap,
    offered: Option<&HeaderValue>,
) -> Result<Option<HeaderValue>, &'static str> {
    const NOT_OFFERED: &str = "an extension that was not offered";
    if !upstream.contains_key(header::SEC_WEBSOCKET_EXTENSIONS) {
        return Ok(None);
    }
    let Some(offered) = offered else {
        return Err(NOT_OFFERED);
    };
    let accepted = parse_extensions(upstream).ok_or("an unparseable Sec-WebSocket-Extensions")?;
    let mut offers_map = HeaderMap::new();
    offers_map.insert(header::SEC_WEBSOCKET_EXTENSIONS, offered.clone());
    let offers = parse_extensions(&offers_map).unwrap_or_default();
    let mut answer = match accepted.as_slice() {
        [one] if one.name.eq_ignore_ascii_case(PERMESSAGE_DEFLATE) => one.clone(),
        [] => return Ok(None),
        _ => return Err(NOT_OFFERED),
    };
    let mut seen: Vec<String> = Vec::new();
    for (k, v) in &answer.params {
        let k = k.to_ascii_lowercase();
        if seen.contains(&k) {
            return Err("a permessage-deflate parameter twice");
        }
        let valid = match k.as_str() {
            "server_no_context_takeover" | CLIENT_NO_CONTEXT_TAKEOVER => v.is_none(),
            "server_max_window_bits" => window_bits_ok(v.as_deref()),
            // Only when the client said it can limit its window (§7.1.2.2).
            "client_max_window_bits" => {
                window_bits_ok(v.as_deref()) && offers.iter().any(|o| o.has(&k))
            }
            _ => false,
        };
        if !valid {
            return Err("a permessage-deflate parameter that was not offered");
        }
        seen.push(k);
    }
    answer.name = PERMESSAGE_DEFLATE.to_owned();
    if !answer.has(CLIENT_NO_CONTEXT_TAKEOVER) {
        answer
            .params
            .push((CLIENT_NO_CONTEXT_TAKEOVER.to_owned(), None));
    }
    HeaderValue::from_str(&answer.render())
        .map(Some)
        .map_err(|_| NOT_OFFERED)
}

/// Whether the payload of one compressed message (unmasked, the tail removed as RFC
/// 7692 sends it) inflates to exactly `expected`. Inflated alone, without any window
/// from earlier messages, into a buffer of `expected.len() + 1` bytes on the stack, so
/// a zip bomb stops after that many bytes. Payloads over [`MAX_HEARTBEAT_COMPRESSED`]
/// bytes are never inflated (`false`).
pub fn inflates_to(payload: &[u8], expected: &[u8]) -> bool {
    const OUT: usize = 256;
    if payload.len() > MAX_HEARTBEAT_COMPRESSED || expected.len() >= OUT {
        return false;
    }
    let mut input = [0u8; MAX_HEARTBEAT_COMPRESSED + TAIL.len()];
    input[..payload.len()].copy_from_slice(payload);
    input[payload.len()..payload.len() + TAIL.len()].copy_from_slice(&TAIL);
    let input = &input[..payload.len() + TAIL.len()];
    let mut out = [0u8; OUT];
    let out = &mut out[..expected.len() + 1];
    let mut inflater = DecompressorOxide::new();
    // More input "may follow": the message ends with the tail's empty stored block, not
    // a final block, and this is how the inflater reports having used all of it.
    let flags = TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF | TINFL_FLAG_HAS_MORE_INPUT;
    let (status, used, written) = decompress(&mut inflater, input, out, 0, flags);
    let complete = match status {
        TINFLStatus::NeedsMoreInput => used == input.len(),
        // A final block ends the stream before the tail; that is fine.
        TINFLStatus::Done => true,
        // More output than the cap, or not deflate data.
        _ => false,
    };
    complete && out.get(..written) == Some(expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use miniz_oxide::deflate::core::{
        compress, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush,
    };

    /// Raw deflate of `data`, sync-flushed and without the tail, as a permessage-deflate
    /// sender makes one message (`final_block`: ended with a final block instead).
    fn deflate(data: &[u8], final_block: bool) -> Vec<u8> {
        let mut c = CompressorOxide::new(create_comp_flags_from_zip_params(6, -15, 0));
        let mut out = vec![0u8; data.len() + 64];
        let flush = if final_block {
            TDEFLFlush::Finish
        } else {
            TDEFLFlush::Sync
        };
        let (_, _, n) = compress(&mut c, data, &mut out, flush);
        out.truncate(n);
        if !final_block {
            assert_eq!(out[n - 4..], TAIL);
            out.truncate(n - 4);
        }
        out
    }

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_str(value).unwrap(),
        );
        h
    }

    #[test]
    fn a_compressed_heartbeat_is_recognised_and_near_misses_are_not() {
        let hb = b"--heartbeat--";
        assert!(inflates_to(&deflate(hb, false), hb));
        assert!(inflates_to(&deflate(hb, true), hb));
        assert!(!inflates_to(&deflate(b"--heartbeat--x", false), hb));
        assert!(!inflates_to(&deflate(b"--heartbeat-", false), hb));
        assert!(!inflates_to(&deflate(b"hello", false), hb));
        assert!(!inflates_to(b"\xff\xff\xff", hb));
        assert!(!inflates_to(b"", hb));
    }

    #[test]
    fn a_zip_bomb_stops_at_the_cap() {
        let hb = b"--heartbeat--";
        let bomb = deflate(&vec![b'-'; 1 << 20], false);
        assert!(bomb.len() > MAX_HEARTBEAT_COMPRESSED, "never even inflated");
        let small_bomb = deflate(&[b'-'; 4000], false);
        assert!(small_bomb.len() <= MAX_HEARTBEAT_COMPRESSED);
        assert!(!inflates_to(&small_bomb, hb));
    }

    #[test]
    fn offers_keep_only_permessage_deflate_and_force_client_no_context_takeover() {
        let h = headers(
            "x-webkit-deflate-frame, permessage-deflate; client_max_window_bits, \
             permessage-deflate; client_no_context_takeover; server_max_window_bits=\"10\"",
        );
        assert_eq!(
            offer_upstream(&h).unwrap(),
            "permessage-deflate; client_max_window_bits; client_no_context_takeover, \
             permessage-deflate; client_no_context_takeover; server_max_window_bits=10"
        );
        assert_eq!(offer_upstream(&headers("x-other; a=1")), None);
        assert_eq!(offer_upstream(&HeaderMap::new()), None);
        assert_eq!(
            offer_upstream(&headers("permessage-deflate; a=\"b c\"")),
            None
        );
    }

    #[test]
    fn answers_gain_client_no_context_takeover_and_bad_ones_are_refused() {
        let offer = HeaderValue::from_static(
            "permessage-deflate; client_max_window_bits; client_no_context_takeover",
        );
        let answer = |v: &str| answer_client(&headers(v), Some(&offer));
        assert_eq!(
            answer("permessage-deflate; server_max_window_bits=12")
                .unwrap()
                .unwrap(),
            "permessage-deflate; server_max_window_bits=12; client_no_context_takeover"
        );
        assert_eq!(
            answer("permessage-deflate; client_no_context_takeover; client_max_window_bits=9")
                .unwrap()
                .unwrap(),
            "permessage-deflate; client_no_context_takeover; client_max_window_bits=9"
        );
        assert_eq!(answer_client(&HeaderMap::new(), Some(&offer)), Ok(None));
        assert!(answer("x-webkit-deflate-frame").is_err());
        assert!(answer("permessage-deflate, permessage-deflate").is_err());
        assert!(answer("permessage-deflate; server_max_window_bits=16").is_err());
        assert!(answer("permessage-deflate; server_max_window_bits").is_err());
        assert!(answer("permessage-deflate; foo").is_err());
        assert!(answer(
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover"
        )
        .is_err());
        let no_cmwb = HeaderValue::from_static("permessage-deflate");
        assert!(answer_client(
            &headers("permessage-deflate; client_max_window_bits=10"),
            Some(&no_cmwb)
        )
        .is_err());
        assert!(answer_client(&headers("permessage-deflate"), None).is_err());
    }
}
