//! The client handshake decision: any request head bytes get a decision, never a panic,
//! and every refusal is one of the statuses wsbeat documents.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsbeat::handshake::{decide_head, Decision};

fuzz_target!(|data: &[u8]| {
    match decide_head(data) {
        Decision::Incomplete | Decision::PlainHttp => {}
        Decision::Upgrade { accept } => {
            // base64 of a 20-byte SHA-1.
            assert_eq!(accept.len(), 28, "{accept}");
        }
        Decision::Reject(r) => {
            assert!(
                matches!(r.status.as_u16(), 400 | 426 | 431),
                "unexpected status {}",
                r.status
            );
            assert!(!r.reason.is_empty());
        }
    }
});
