//! The configuration's unit tests: inline YAML through `Config::from_yaml`.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::*;

fn parse(yaml: &str) -> Result<Config, ConfigError> {
    Config::from_yaml(yaml, "test.yaml")
}

#[test]
fn validation_reads_no_file() {
    // The certificate files are loaded by a step of their own (`tls::Setup::load`).
    let c = parse(
        "tls: { cert: /nonexistent/tls.crt, key: /nonexistent/tls.key }\n\
         upstream: { url: \"wss://backend:8443\", ca: /nonexistent/ca.pem }\n",
    )
    .unwrap();
    assert_eq!(c.upstream.ca, Some(PathBuf::from("/nonexistent/ca.pem")));
    // What can be checked without a file still is: the name the certificate must carry.
    let e = parse("upstream: { url: \"wss://backend:8443\", server_name: \"a b\" }\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("upstream.server_name"), "{e}");
}

#[test]
fn a_file_with_only_the_upstream_url_works() {
    let c = parse("upstream:\n  url: ws://10.1.2.3:9000\n").unwrap();
    assert_eq!(c.upstream.url.authority(), "10.1.2.3:9000");
    assert_eq!(c.heartbeat, HeartbeatConfig::default());
    assert_eq!(c.limits.max_message_size, ByteSize(16 << 20));
}

#[test]
fn pool_idle_timeout_is_per_upstream_and_longer_than_zero() {
    let c = parse(
        "upstream:\n  pool_idle_timeout: 2500ms\nroutes:\n  - path: /api\n    upstream: { url: ws://api:8000, pool_idle_timeout: 30s }\n",
    )
    .unwrap();
    assert_eq!(c.upstream.pool_idle_timeout, HumanDuration::millis(2500));
    let routes = c.routes();
    assert_eq!(
        routes.resolve("/api/x").upstream.pool_idle_timeout,
        HumanDuration::secs(30)
    );
    assert_eq!(
        UpstreamConfig::default().pool_idle_timeout,
        HumanDuration::secs(4)
    );
    for yaml in [
        "upstream:\n  pool_idle_timeout: 0s\n",
        "routes:\n  - path: /api\n    upstream: { pool_idle_timeout: 0s }\n",
    ] {
        let e = parse(yaml).unwrap_err().to_string();
        assert!(e.contains("pool_idle_timeout"), "{e}");
    }
}

#[test]
fn empty_file_is_all_defaults() {
    assert_eq!(parse("").unwrap(), Config::default());
}

#[test]
fn unknown_keys_are_named() {
    let e = parse("heartbeat:\n  intervall: 4s\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("intervall"), "{e}");
    let e = parse("bogus: 1\n").unwrap_err().to_string();
    assert!(e.contains("bogus"), "{e}");
}

#[test]
fn bad_values_name_their_key() {
    let e = parse("heartbeat:\n  interval: fast\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("heartbeat.interval") && e.contains("fast"),
        "{e}"
    );
    let e = parse("upstream:\n  url: http://x\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("upstream.url") && e.contains("ws://"), "{e}");
    let e = parse("liveness:\n  ping_interval: 10s\n  timeout: 5s\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("liveness.timeout"), "{e}");
    let e = parse("runtime:\n  workers: 0\n").unwrap_err().to_string();
    assert!(e.contains("runtime.workers"), "{e}");
    assert_eq!(
        parse("runtime:\n  workers: 3\n")
            .unwrap()
            .runtime
            .worker_threads(),
        3
    );
    assert!(parse("").unwrap().runtime.worker_threads() >= 1);
    let e = parse("liveness:\n  rtt_sample_interval: 0s\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("liveness.rtt_sample_interval"), "{e}");
    let e = parse("routes:\n  - path: /a\n    liveness: { rtt_sample_interval: 0s }\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("rtt_sample_interval"), "{e}");
    let e = parse("limits:\n  max_message_size: 0\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("limits.max_message_size"), "{e}");
    for bad in ["_wsbeat.js", "/a.js?v=1", "/a b.js"] {
        let e = parse(&format!("client_script: \"{bad}\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("client_script") && e.contains(bad), "{e}");
    }
    let e = parse("liveness:\n  timeout: 366d\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("liveness.timeout") && e.contains("365d"), "{e}");
    parse("liveness:\n  timeout: 365d\n").unwrap();
    let ok = parse("client_script: /_wsbeat.js\n").unwrap();
    assert_eq!(ok.client_script.as_deref(), Some("/_wsbeat.js"));
}

#[test]
fn durations_and_sizes_are_humane() {
    for (s, ms) in [
        ("250ms", 250),
        ("4s", 4000),
        ("1m", 60_000),
        ("1m30s", 90_000),
    ] {
        assert_eq!(
            s.parse::<HumanDuration>().unwrap(),
            HumanDuration::millis(ms)
        );
    }
    for bad in ["", "4", "s", "4 parsecs", "-1s", "1.5s"] {
        assert!(bad.parse::<HumanDuration>().is_err(), "{bad}");
    }
    assert_eq!("16MiB".parse::<ByteSize>().unwrap(), ByteSize(16 << 20));
    assert_eq!("65536".parse::<ByteSize>().unwrap(), ByteSize(65536));
    assert!("16MB".parse::<ByteSize>().is_err());
    assert_eq!(HumanDuration::millis(1500).to_string(), "1500ms");
    assert_eq!(ByteSize(16 << 20).to_string(), "16MiB");
}

#[test]
fn null_message_turns_heartbeats_off_and_routes_override() {
    let c = parse(
        "heartbeat:\n  message: null\nroutes:\n  - path: /ws/chat\n    heartbeat: { message: ping, interval: 2s }\n  - path: /ws\n    name: ws\n",
    )
    .unwrap();
    let routes = c.routes();
    assert!(routes.resolve("/other").heartbeat.message.is_none());
    let chat = routes.resolve("/ws/chat/42");
    assert_eq!(chat.name, "/ws/chat");
    assert_eq!(chat.heartbeat.message.as_deref(), Some("ping"));
    assert_eq!(chat.heartbeat.interval, Duration::from_secs(2));
    assert_eq!(routes.resolve("/ws/chatroom").name, "ws");
    assert_eq!(routes.resolve("/ws").name, "ws");
    assert_eq!(routes.resolve("/wsx").name, DEFAULT_ROUTE);
}

#[test]
fn route_message_null_overrides_a_top_level_message() {
    let c = parse("routes:\n  - path: /quiet\n    heartbeat: { message: null }\n").unwrap();
    assert!(c.routes().resolve("/quiet").heartbeat.message.is_none());
    assert!(c.routes().resolve("/").heartbeat.message.is_some());
}

#[test]
fn allowed_origins_are_origins_and_routes_replace_the_list() {
    let c = parse(
        "allowed_origins: ['https://App.example/']\nroutes:\n  - path: /open\n    allowed_origins: ['http://localhost:3000']\n  - path: /same\n",
    )
    .unwrap();
    let routes = c.routes();
    let origin = |path: &str, o: &str| routes.resolve(path).origin_allowed(Some(o.as_bytes()));
    assert!(origin("/", "https://app.example"));
    assert!(!origin("/", "https://app.example.evil"));
    assert!(origin("/same/x", "https://APP.example"));
    assert!(origin("/open", "http://localhost:3000"));
    assert!(!origin("/open", "https://app.example"));
    assert!(
        routes.resolve("/").origin_allowed(None),
        "non-browser clients pass"
    );
    assert!(parse("")
        .unwrap()
        .routes()
        .resolve("/")
        .origin_allowed(Some(b"x")));
    for bad in ["app.example", "https://app.example/path", "*"] {
        let e = parse(&format!("allowed_origins: ['{bad}']\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("allowed_origins[0]"), "{bad}: {e}");
    }
}

#[test]
fn admin_must_not_share_the_public_port_unless_both_are_ephemeral() {
    let e = parse("listen: 127.0.0.1:9000\nadmin: { listen: 127.0.0.1:9000 }\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("admin.listen"), "{e}");
    parse("listen: 127.0.0.1:0\nadmin: { listen: 127.0.0.1:0 }\n").unwrap();
}

#[test]
fn a_route_turns_upstream_pings_off_with_null() {
    let c = parse(
        "liveness:\n  upstream_ping_interval: 5s\nroutes:\n  - path: /off\n    liveness: { upstream_ping_interval: null }\n  - path: /kept\n    liveness: { timeout: 40s }\n",
    )
    .unwrap();
    let routes = c.routes();
    assert_eq!(routes.resolve("/off").liveness.upstream_ping_interval, None);
    assert_eq!(
        routes.resolve("/kept").liveness.upstream_ping_interval,
        Some(HumanDuration::secs(5))
    );
}

#[test]
fn route_errors_are_named() {
    let e = parse("routes:\n  - path: ws\n").unwrap_err().to_string();
    assert!(e.contains("routes[0].path"), "{e}");
    let e = parse("routes:\n  - path: /a\n  - path: /a\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("routes[1].path"), "{e}");
    let e = parse("routes:\n  - path: /a\n    liveness: { timeout: 1s }\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("routes[0].liveness.timeout"), "{e}");
}

#[test]
fn effective_config_round_trips_through_yaml() {
    let c = parse("routes:\n  - path: /ws/chat\n    heartbeat: { interval: 2s }\n").unwrap();
    let again = parse(&c.to_yaml()).unwrap();
    assert_eq!(c, again);
}

#[test]
fn upstream_urls_with_a_bad_port_or_host_are_errors() {
    for bad in [
        "ws://backend:80a",
        "ws://backend:99999",
        "ws://backend:0",
        "ws://backend:",
        "ws://back[end]:80",
        "ws://a,b!c:80",
        "ws://[not-ipv6]:80",
    ] {
        let e = UpstreamUrl::from_str(bad).unwrap_err();
        assert!(e.contains(bad), "{e}");
    }
    let ok = |s: &str| UpstreamUrl::from_str(s).unwrap().authority();
    assert_eq!(ok("ws://backend"), "backend:80");
    assert_eq!(ok("wss://backend"), "backend:443");
    assert_eq!(ok("ws://my_backend-1.svc:8000/"), "my_backend-1.svc:8000");
    assert_eq!(ok("ws://[::1]:9000"), "[::1]:9000");
}

/// Found by `cargo fuzz run config` (fuzz/corpus/config/regression-url-brackets.yaml):
/// `http::Uri` took this authority, wsbeat kept `0_____________A_____[___…tag` as the
/// host, and `wsbeat check` printed a URL it could not read back.
#[test]
fn fuzz_regression_a_bracket_inside_the_host_is_refused() {
    let text = include_str!("../../fuzz/corpus/config/regression-url-brackets.yaml");
    let e = parse(text).unwrap_err().to_string();
    assert!(
        e.contains("upstream.url") && e.contains("not a host name"),
        "{e}"
    );
}

#[test]
fn trusted_proxies_are_networks_and_a_bad_one_is_named() {
    assert!(Config::default().trusted_proxies.is_empty());
    let c = parse("trusted_proxies: [10.0.0.0/8, \"fc00::/7\", 192.0.2.1]\n").unwrap();
    let printed: Vec<String> = c.trusted_proxies.iter().map(|n| n.to_string()).collect();
    assert_eq!(printed, ["10.0.0.0/8", "fc00::/7", "192.0.2.1/32"]);
    assert!(c.to_yaml().contains("192.0.2.1/32"));
    assert_eq!(parse(&c.to_yaml()).unwrap(), c);
    for bad in ["10.0.0.0/33", "10.0.0/8", "10.0.0.1/8", "lb.internal"] {
        let e = parse(&format!("trusted_proxies: [10.0.0.0/8, \"{bad}\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("trusted_proxies[1]"), "{e}");
    }
}

#[test]
fn close_spread_is_at_most_the_drain_timeout() {
    let c = parse("").unwrap();
    assert_eq!(c.shutdown.close_spread, HumanDuration::secs(0));
    let c = parse("shutdown:\n  drain_timeout: 25s\n  close_spread: 25s\n").unwrap();
    assert_eq!(c.shutdown.close_spread, HumanDuration::secs(25));
    let e = parse("shutdown:\n  drain_timeout: 10s\n  close_spread: 20s\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("shutdown.close_spread") && e.contains("drain_timeout") && e.contains("10s"),
        "{e}"
    );
    // Against the default drain_timeout (25s) too.
    let e = parse("shutdown:\n  close_spread: 30s\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("shutdown.close_spread") && e.contains("25s"),
        "{e}"
    );
}

#[test]
fn max_connection_age_is_off_by_default_and_longer_than_zero() {
    assert_eq!(parse("").unwrap().limits.max_connection_age, None);
    let c = parse("limits:\n  max_connection_age: 1h\n").unwrap();
    assert_eq!(c.limits.max_connection_age, Some(HumanDuration::secs(3600)));
    let e = parse("limits:\n  max_connection_age: 0s\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("limits.max_connection_age"), "{e}");
    let e = parse("limits:\n  max_connection_age: soon\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("limits.max_connection_age"), "{e}");
}

#[test]
fn reload_watch_defaults_to_2s_and_null_turns_it_off() {
    assert_eq!(
        parse("").unwrap().reload.watch,
        Some(HumanDuration::secs(2))
    );
    assert_eq!(
        parse("reload: { watch: null }\n").unwrap().reload.watch,
        None
    );
    assert_eq!(
        parse("reload: { watch: 500ms }\n").unwrap().reload.watch,
        Some(HumanDuration::millis(500))
    );
    for yaml in ["reload: { watch: 0s }\n", "reload: { watch: 10ms }\n"] {
        let e = parse(yaml).unwrap_err().to_string();
        assert!(e.contains("reload.watch"), "{e}");
    }
    let e = parse("reload: { interval: 1s }\n").unwrap_err().to_string();
    assert!(e.contains("interval"), "{e}");
}

#[test]
fn compression_is_passthrough_by_default_and_routes_may_turn_it_off() {
    let c = parse("routes:\n  - path: /plain\n    compression: off\n  - path: /same\n").unwrap();
    let routes = c.routes();
    assert_eq!(routes.resolve("/").compression, Compression::Passthrough);
    assert_eq!(
        routes.resolve("/same").compression,
        Compression::Passthrough
    );
    assert_eq!(routes.resolve("/plain").compression, Compression::Off);
    let c =
        parse("compression: off\nroutes:\n  - path: /z\n    compression: passthrough\n").unwrap();
    assert_eq!(c.routes().resolve("/").compression, Compression::Off);
    assert_eq!(
        c.routes().resolve("/z").compression,
        Compression::Passthrough
    );
    for bad in [
        "compression: gzip\n",
        "routes:\n  - path: /x\n    compression: yes\n",
    ] {
        let e = parse(bad).unwrap_err().to_string();
        assert!(e.contains("compression"), "{bad}: {e}");
    }
}

#[test]
fn http2_is_off_by_default_and_streams_per_connection_at_least_one() {
    let c = parse("").unwrap();
    assert!(!c.http2);
    assert_eq!(c.limits.max_streams_per_connection, 100);
    let c = parse("http2: true\nlimits:\n  max_streams_per_connection: 7\n").unwrap();
    assert!(c.http2);
    assert_eq!(c.limits.max_streams_per_connection, 7);
    let e = parse("limits:\n  max_streams_per_connection: 0\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("limits.max_streams_per_connection"), "{e}");
    let e = parse("http2: sometimes\n").unwrap_err().to_string();
    assert!(e.contains("http2"), "{e}");
}
