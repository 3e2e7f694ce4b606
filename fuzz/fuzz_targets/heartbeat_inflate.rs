//! The one inflate wsbeat does (`compression::inflates_to`): a compressed client message
//! of at most 64 bytes, inflated alone into a buffer of the heartbeat's length + 1, to
//! see whether it is the heartbeat.
//!
//! Input: byte 0 chooses the check, the rest is the data.
//! - even: the data is a compressed payload as a client sends it. No panic; the answer is
//!   the reference's: miniz_oxide's streaming inflate of the payload and the 4-byte tail
//!   RFC 7692 removes, with an output limit, equals the heartbeat; never for more than 64
//!   bytes. Zip bombs (tiny input, huge output) are in the seed corpus: the cap stops them.
//! - odd: the data (up to 200 bytes) is a message; compressed as a permessage-deflate
//!   sender does it, it is recognised as itself exactly when it compresses to 64 bytes
//!   or fewer, and never as itself plus one byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use miniz_oxide::deflate::core::{
    compress, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush,
};
use miniz_oxide::inflate::stream::{inflate, InflateState};
use miniz_oxide::{DataFormat, MZError, MZFlush, MZStatus};
use wsbeat::compression::{inflates_to, MAX_HEARTBEAT_COMPRESSED};

const HEARTBEAT: &[u8] = b"--heartbeat--";
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// What the reference makes of a payload: miniz_oxide's streaming inflate (its own
/// 32 KiB window, output in chunks) of the payload and the tail, all of it inflated (the
/// stream may end without a final block, as RFC 7692's messages do); `None` past
/// `limit` bytes of output or on invalid data.
fn reference(payload: &[u8], limit: usize) -> Option<Vec<u8>> {
    let input = [payload, &TAIL].concat();
    let mut input = &input[..];
    let mut state = InflateState::new_boxed(DataFormat::Raw);
    let mut out = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let r = inflate(&mut state, input, &mut chunk, MZFlush::None);
        input = &input[r.bytes_consumed..];
        out.extend_from_slice(&chunk[..r.bytes_written]);
        if out.len() > limit {
            return None;
        }
        match r.status {
            Ok(MZStatus::StreamEnd) => return Some(out),
            Ok(_) if input.is_empty() && r.bytes_written == 0 => return Some(out),
            Ok(_) => {}
            // No progress: the input is used up.
            Err(MZError::Buf) if input.is_empty() => return Some(out),
            Err(_) => return None,
        }
    }
}

/// One message as a permessage-deflate sender compresses it without context.
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = CompressorOxide::new(create_comp_flags_from_zip_params(6, -15, 0));
    let mut out = vec![0u8; data.len() * 2 + 64];
    let (_, _, n) = compress(&mut c, data, &mut out, TDEFLFlush::Sync);
    assert!(n >= 4 && out[n - 4..n] == TAIL, "a sync flush ends with the tail");
    out.truncate(n - 4);
    out
}

fn check(data: &[u8]) {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let got = inflates_to(data, HEARTBEAT);
        let want = data.len() <= MAX_HEARTBEAT_COMPRESSED
            && reference(data, HEARTBEAT.len() + 1).as_deref() == Some(HEARTBEAT);
        assert_eq!(got, want, "payload {data:?}");
    } else {
        let message = &data[..data.len().min(200)];
        let compressed = deflate(message);
        let fits = compressed.len() <= MAX_HEARTBEAT_COMPRESSED;
        assert_eq!(inflates_to(&compressed, message), fits, "{message:?}");
        let longer = [message, b"x"].concat();
        assert!(!inflates_to(&compressed, &longer), "{message:?} plus one byte");
    }
}

fuzz_target!(|data: &[u8]| check(data));
