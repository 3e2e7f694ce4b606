//! Config parsing: any text is a `Config` or a `ConfigError`, never a panic; and a config
//! that parses survives the round trip through `wsbeat check`'s YAML unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsbeat::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::from_yaml(text, "fuzz") else {
        return;
    };
    // What the server does with a valid config at start-up.
    let _ = config.routes();
    let yaml = config.to_yaml();
    match Config::from_yaml(&yaml, "round trip") {
        Ok(again) => assert_eq!(again, config, "round trip through:\n{yaml}"),
        Err(e) => panic!("wsbeat check printed a config it cannot read back: {e}\n{yaml}"),
    }
});
