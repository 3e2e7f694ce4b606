//! The PROXY protocol header parser: any bytes get a verdict, never a panic, and the
//! verdicts agree with each other, which is what the socket reader relies on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsbeat::proxy_protocol::{parse, Parsed};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Parsed::Done { len, .. } => {
            assert!(len <= data.len(), "a header longer than its input");
            // The reader asks for more until the verdict: every strict prefix of a
            // valid header must be incomplete, asking for no more than the whole.
            for cut in 0..len {
                match parse(&data[..cut]) {
                    Parsed::Incomplete { need } => {
                        assert!(need > cut && need <= len, "need {need} at {cut} of {len}")
                    }
                    other => panic!("prefix {cut} of a {len}-byte header: {other:?}"),
                }
            }
            // What follows the header does not change it.
            assert_eq!(parse(&data[..len]), parse(data));
        }
        Parsed::Incomplete { need } => assert!(need > data.len(), "need {need}"),
        Parsed::Invalid(why) => assert!(!why.is_empty()),
    }
});
