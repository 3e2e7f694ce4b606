//! The WebSocket handshake's keys (RFC 6455 §4), on the stack: a new
//! `Sec-WebSocket-Key` for the upstream and the `Sec-WebSocket-Accept` for a key, each
//! computed into a fixed array, with no `String` in between.

use hyper::header::HeaderValue;
use sha1::{Digest, Sha1};

/// Appended to the key before hashing (RFC 6455 §1.3).
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding of `input` into `out`, which is exactly
/// `4 * input.len().div_ceil(3)` bytes long.
fn base64<const N: usize>(input: &[u8], out: &mut [u8; N]) {
    for (chunk, quad) in input.chunks(3).zip(out.chunks_mut(4)) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, slot) in quad.iter_mut().enumerate() {
            *slot = if i <= chunk.len() {
                BASE64[((n >> (18 - 6 * i)) & 63) as usize]
            } else {
                b'='
            };
        }
    }
}

/// A fresh random `Sec-WebSocket-Key`: 16 random bytes in base64 (24 characters).
pub fn new_key() -> [u8; 24] {
    let mut out = [0u8; 24];
    base64(&rand::random::<[u8; 16]>(), &mut out);
    out
}

/// The `Sec-WebSocket-Accept` value for `key`: base64 of SHA-1(key + GUID).
pub fn accept(key: &[u8]) -> [u8; 28] {
    let digest = Sha1::new().chain_update(key).chain_update(GUID).finalize();
    let mut out = [0u8; 28];
    base64(digest.as_slice(), &mut out);
    out
}

/// [`accept`] as a header value (one allocation: the value's own).
pub fn accept_value(key: &[u8]) -> HeaderValue {
    let accept = accept(key);
    // Base64 is always a valid header value.
    HeaderValue::from_bytes(&accept).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};

    #[test]
    fn the_rfc_example_key_gives_the_rfc_accept() {
        assert_eq!(
            &accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn keys_and_accepts_match_tungstenite() {
        for _ in 0..200 {
            let key = new_key();
            assert_eq!(key.len(), 24);
            assert!(crate::handshake::is_valid_key(&key), "{key:?}");
            assert_eq!(accept(&key).as_slice(), derive_accept_key(&key).as_bytes());
            let theirs = generate_key();
            assert_eq!(
                accept(theirs.as_bytes()).as_slice(),
                derive_accept_key(theirs.as_bytes()).as_bytes()
            );
        }
    }

    #[test]
    fn base64_pads_like_the_standard() {
        let enc = |input: &[u8]| {
            let mut out = [0u8; 8];
            base64(input, &mut out);
            out
        };
        assert_eq!(&enc(b"foobar"), b"Zm9vYmFy");
        assert_eq!(&enc(b"fooba"), b"Zm9vYmE=");
        assert_eq!(&enc(b"foob"), b"Zm9vYg==");
    }
}
