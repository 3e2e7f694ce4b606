//! Observability: the admin listener's `/metrics`, `/livez`, `/readyz` and `/connections`,
//! checked against DESIGN §2.3 and §2.4 over real sockets.
//!
//! Every scrape is parsed by the reference parser (`prometheus_client`, through
//! `tests/python/parse_metrics.py`) and the important ones are linted by `promtool check
//! metrics`; `tests/ci-deps.sh` installs both. Each test runs its own wsbeat, so counters
//! start at zero and the values asserted are exact wherever the traffic makes them
//! knowable. Tests wait for counters to settle by scraping again until a condition holds
//! or PATIENCE runs out; the short sleep between scrapes is only the retry interval.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;
use tokio_util::sync::CancellationToken;

const HB: &str = "--heartbeat--";
/// Pause between two scrapes while waiting for a condition (a retry interval, not a
/// synchronisation: every wait is a poll for the condition, bounded by PATIENCE).
const RETRY: Duration = Duration::from_millis(50);
/// Upper bound for the slow waits of the 1005-connection test.
const LONG_PATIENCE: Duration = Duration::from_secs(60);

/// The families of DESIGN §2.4 with their exposed names and types (counters with `_total`,
/// histograms by base name), apart from the opt-in per-connection ones.
const FAMILIES: &[(&str, &str)] = &[
    ("wsbeat_connections_active", "gauge"),
    ("wsbeat_compressed_connections_active", "gauge"),
    ("wsbeat_connections_total", "counter"),
    ("wsbeat_connection_duration_seconds", "histogram"),
    ("wsbeat_heartbeats_sent_total", "counter"),
    ("wsbeat_client_heartbeats_dropped_total", "counter"),
    ("wsbeat_pings_sent_total", "counter"),
    ("wsbeat_pongs_received_total", "counter"),
    ("wsbeat_pong_rtt_seconds", "histogram"),
    ("wsbeat_client_silence_seconds", "histogram"),
    ("wsbeat_liveness_timeouts_total", "counter"),
    ("wsbeat_messages_total", "counter"),
    ("wsbeat_bytes_total", "counter"),
    ("wsbeat_upstream_connect_seconds", "histogram"),
    ("wsbeat_upstream_errors_total", "counter"),
    ("wsbeat_close_codes_total", "counter"),
    ("wsbeat_http_requests_total", "counter"),
    ("wsbeat_http_request_duration_seconds", "histogram"),
    ("wsbeat_upstream_retries_total", "counter"),
    ("wsbeat_request_trailers_dropped_total", "counter"),
    ("wsbeat_tcp_connections_active", "gauge"),
    ("wsbeat_client_http_connections_active", "gauge"),
    ("wsbeat_proxy_protocol_errors_total", "counter"),
    ("wsbeat_handshakes_rejected_total", "counter"),
    ("wsbeat_tls_handshake_errors_total", "counter"),
    ("wsbeat_config_reloads_total", "counter"),
    ("wsbeat_config_last_reload_successful", "gauge"),
    (
        "wsbeat_config_last_reload_success_timestamp_seconds",
        "gauge",
    ),
];
const LAST_SEEN: &str = "wsbeat_connection_last_seen_seconds";
const PONG_RTT: &str = "wsbeat_connection_pong_rtt_seconds";
const OUTCOMES: &[&str] = &[
    "client_close",
    "upstream_close",
    "client_dead",
    "upstream_dead",
    "error",
    "shutdown",
    "max_age",
];
const UPSTREAM_ERRORS: &[&str] = &[
    "timeout",
    "connect",
    "tls",
    "handshake",
    "refused",
    "http",
    "lost",
];

// ---------------------------------------------------------------------------------------
// Scrapes, parsed by prometheus_client and linted by promtool.

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug)]
struct Scrape {
    text: String,
    /// The reference parser's families: name (a counter without `_total`) → type.
    families: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

/// Runs a tool with `input` on stdin (written from a thread so a large input cannot
/// deadlock against the tool's output).
fn run_tool(program: &str, args: &[&str], input: String) -> std::process::Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program} (tests/ci-deps.sh installs it): {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    out
}

impl Scrape {
    async fn parse(text: String) -> Scrape {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/parse_metrics.py");
        let input = text.clone();
        let out = tokio::task::spawn_blocking(move || run_tool("python3", &[script], input))
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "prometheus_client rejected the scrape: {}\n--- scrape ---\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("parse_metrics.py printed bad JSON: {e}"));
        let string = |v: &Value| v.as_str().unwrap_or_else(|| panic!("{v}")).to_owned();
        let families = json["families"]
            .as_object()
            .unwrap_or_else(|| panic!("no families in {json}"))
            .iter()
            .map(|(k, v)| (k.clone(), string(v)))
            .collect();
        let samples = json["samples"]
            .as_array()
            .unwrap_or_else(|| panic!("no samples in {json}"))
            .iter()
            .map(|s| {
                let value = match &s[2] {
                    Value::String(v) if v == "NaN" => f64::NAN,
                    Value::String(v) if v == "+Inf" => f64::INFINITY,
                    Value::String(v) if v == "-Inf" => f64::NEG_INFINITY,
                    v => v.as_f64().unwrap_or_else(|| panic!("value {v}")),
                };
                Sample {
                    name: string(&s[0]),
                    labels: s[1]
                        .as_object()
                        .unwrap_or_else(|| panic!("labels {s}"))
                        .iter()
                        .map(|(k, v)| (k.clone(), string(v)))
                        .collect(),
                    value,
                }
            })
            .collect();
        Scrape {
            text,
            families,
            samples,
        }
    }

    /// `# TYPE` lines of the exposition: exposed family name → type.
    fn type_lines(&self) -> BTreeMap<String, String> {
        let mut types = BTreeMap::new();
        for line in self.text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                    panic!("bad TYPE line {line:?}");
                };
                let old = types.insert(name.to_owned(), kind.to_owned());
                assert!(old.is_none(), "TYPE line twice for {name}");
            }
        }
        types
    }

    /// The wsbeat families the exposition declares, by exposed name.
    fn wsbeat_families(&self) -> BTreeSet<String> {
        self.type_lines()
            .into_keys()
            .filter(|n| n.starts_with("wsbeat_"))
            .collect()
    }

    /// The sample with exactly these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut found = self
            .samples
            .iter()
            .filter(|s| s.name == name && s.labels == want);
        let first = found.next().map(|s| s.value);
        assert!(found.next().is_none(), "{name}{want:?} appears twice");
        first
    }

    /// The sample with exactly these labels, 0 when the series is not exported (yet).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// The sample with exactly these labels, which must be exported.
    fn must(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            panic!(
                "no sample {name}{labels:?}; samples of that name: {:?}",
                self.series(name)
            )
        })
    }

    /// All samples of a name.
    fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// Sum over the samples of a name whose labels include these.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.series(name)
            .into_iter()
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// The values of label `conn` across a per-connection family.
    fn conns(&self, family: &str) -> BTreeSet<String> {
        let series = self.series(family);
        let conns: BTreeSet<String> = series
            .iter()
            .map(|s| {
                assert_eq!(
                    s.labels.keys().collect::<Vec<_>>(),
                    ["conn"],
                    "{family} has labels {:?}",
                    s.labels
                );
                s.labels["conn"].clone()
            })
            .collect();
        assert_eq!(
            conns.len(),
            series.len(),
            "duplicate conn labels in {family}"
        );
        conns
    }

    /// Histogram invariants the parser does not check: per series, cumulative buckets
    /// never decrease, the `+Inf` bucket equals `_count`, and `_sum` exists.
    fn check_histograms(&self) {
        for (family, kind) in &self.families {
            if kind != "histogram" {
                continue;
            }
            let mut groups: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
            for s in self.series(&format!("{family}_bucket")) {
                let mut labels = s.labels.clone();
                let le = labels.remove("le").expect("bucket without le");
                let le: f64 = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                groups.entry(labels).or_default().push((le, s.value));
            }
            for (labels, mut buckets) in groups {
                buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
                assert!(
                    buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                    "{family}{labels:?}: buckets decrease: {buckets:?}"
                );
                let (le, inf) = *buckets.last().unwrap();
                assert!(le.is_infinite(), "{family}{labels:?} has no +Inf bucket");
                let find = |suffix: &str| {
                    self.samples
                        .iter()
                        .find(|s| s.name == format!("{family}{suffix}") && s.labels == labels)
                        .map(|s| s.value)
                };
                assert_eq!(
                    find("_count"),
                    Some(inf),
                    "{family}{labels:?}: +Inf != count"
                );
                assert!(find("_sum").is_some(), "{family}{labels:?} has no _sum");
            }
        }
    }
}

/// GET /metrics, checked (200, Prometheus text 0.0.4) and parsed by prometheus_client.
async fn scrape(admin: SocketAddr) -> Scrape {
    let r = get(admin, "/metrics").await;
    assert_eq!(r.status, 200, "{r:?}");
    let ct = r.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("text/plain") && ct.contains("version=0.0.4"),
        "Content-Type {ct:?}"
    );
    let s = Scrape::parse(r.body).await;
    s.check_histograms();
    s
}

/// A scrape that `promtool check metrics` also finds clean: no error, no lint warning.
async fn scrape_linted(admin: SocketAddr) -> Scrape {
    let s = scrape(admin).await;
    let text = s.text.clone();
    let out =
        tokio::task::spawn_blocking(move || run_tool("promtool", &["check", "metrics"], text))
            .await
            .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics ({}): {report}\n--- scrape ---\n{}",
        out.status,
        s.text
    );
    s
}

/// Scrapes until `cond` holds; panics with the last scrape after `patience`.
async fn scrape_until(
    admin: SocketAddr,
    what: &str,
    patience: Duration,
    cond: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let deadline = Instant::now() + patience;
    loop {
        let s = scrape(admin).await;
        if cond(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "waited {patience:?} for {what}; last scrape:\n{}",
            s.text
        );
        // Long waits scrape 1000-connection expositions: retry less often.
        let retry = if patience > PATIENCE {
            RETRY * 5
        } else {
            RETRY
        };
        tokio::time::sleep(retry).await;
    }
}

/// Waits until every connection has ended and been recorded: nothing active and `ended`
/// durations observed.
async fn settled(admin: SocketAddr, ended: u64) -> Scrape {
    scrape_until(
        admin,
        &format!("{ended} ended connections and none active"),
        PATIENCE,
        |s| {
            s.value("wsbeat_connections_active", &[("route", "default")]) == 0.0
                && s.value(
                    "wsbeat_connection_duration_seconds_count",
                    &[("route", "default")],
                ) == ended as f64
        },
    )
    .await
}

// ---------------------------------------------------------------------------------------
// /connections

#[derive(Debug, Clone)]
struct ConnView {
    id: u64,
    client_addr: String,
    route: String,
    upstream: String,
    age_seconds: f64,
    last_client_frame_seconds_ago: f64,
    last_pong_rtt_seconds: Option<f64>,
    heartbeats_sent: u64,
    client_heartbeats_dropped: u64,
    messages_to_client: u64,
    messages_to_upstream: u64,
    bytes_to_client: u64,
    bytes_to_upstream: u64,
}

impl ConnView {
    fn from_json(o: &Value) -> ConnView {
        let field = |k: &str| o.get(k).unwrap_or_else(|| panic!("no `{k}` in {o}"));
        // Integers are written as integers (serde_json reads `2.0` as a float).
        let int = |k: &str| {
            field(k)
                .as_u64()
                .unwrap_or_else(|| panic!("`{k}` is not an integer in {o}"))
        };
        let float = |k: &str| {
            field(k)
                .as_f64()
                .unwrap_or_else(|| panic!("`{k}` is not a number in {o}"))
        };
        let string = |k: &str| {
            field(k)
                .as_str()
                .unwrap_or_else(|| panic!("`{k}` is not a string in {o}"))
                .to_owned()
        };
        ConnView {
            id: int("id"),
            client_addr: string("client_addr"),
            route: string("route"),
            upstream: string("upstream"),
            age_seconds: float("age_seconds"),
            last_client_frame_seconds_ago: float("last_client_frame_seconds_ago"),
            last_pong_rtt_seconds: match field("last_pong_rtt_seconds") {
                Value::Null => None,
                v => Some(v.as_f64().unwrap_or_else(|| {
                    panic!("`last_pong_rtt_seconds` is neither null nor a number in {o}")
                })),
            },
            heartbeats_sent: int("heartbeats_sent"),
            client_heartbeats_dropped: int("client_heartbeats_dropped"),
            messages_to_client: int("messages_to_client"),
            messages_to_upstream: int("messages_to_upstream"),
            bytes_to_client: int("bytes_to_client"),
            bytes_to_upstream: int("bytes_to_upstream"),
        }
    }
}

/// GET /connections, checked (200, JSON array of well-formed objects, unique ids).
async fn connections(admin: SocketAddr) -> Vec<ConnView> {
    let r = get(admin, "/connections").await;
    assert_eq!(r.status, 200, "{r:?}");
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("application/json"), "Content-Type {ct:?}");
    let json: Value = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e} in {}", r.body));
    let views: Vec<ConnView> = json
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {}", r.body))
        .iter()
        .map(ConnView::from_json)
        .collect();
    let ids: BTreeSet<u64> = views.iter().map(|v| v.id).collect();
    assert_eq!(ids.len(), views.len(), "duplicate ids: {}", r.body);
    views
}

async fn connections_until(
    admin: SocketAddr,
    what: &str,
    cond: impl Fn(&[ConnView]) -> bool,
) -> Vec<ConnView> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let v = connections(admin).await;
        if cond(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "waited for {what}; last: {v:?}");
        tokio::time::sleep(RETRY).await;
    }
}

// ---------------------------------------------------------------------------------------
// Clients.

fn local_addr(client: &Client) -> SocketAddr {
    match client.get_ref() {
        MaybeTlsStream::Plain(s) => s.local_addr().unwrap(),
        _ => unreachable!("tests connect without TLS"),
    }
}

/// Sends close with `code` and reads until the close handshake has finished.
async fn close_with(client: &mut Client, code: CloseCode, reason: &str) {
    client
        .close(Some(CloseFrame {
            code,
            reason: reason.to_owned().into(),
        }))
        .await
        .unwrap();
    finish(client).await;
}

/// Reads until the stream ends (the close handshake finished), or PATIENCE passes.
async fn finish(client: &mut Client) -> usize {
    let mut heartbeats = 0;
    loop {
        match tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("close handshake in time")
        {
            Some(Ok(Message::Text(t))) if t.as_str() == HB => heartbeats += 1,
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return heartbeats,
        }
    }
}

/// Holds a client open, reading (so it answers PINGs), until `stop`; then closes it with
/// 1000 and waits for the close to finish.
async fn hold(mut client: Client, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            m = client.next() => match m {
                Some(Ok(_)) => {}
                _ => return,
            },
        }
    }
    if client
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        }))
        .await
        .is_ok()
    {
        finish(&mut client).await;
    }
}

/// A held client: its address and what stops it.
struct Held {
    addr: SocketAddr,
    stop: CancellationToken,
}

/// Opens `n` clients through the proxy, at most `batch` handshakes at once, each held by
/// a task that reads until stopped.
async fn open_held(url: &str, n: usize, batch: usize, tasks: &mut JoinSet<()>) -> Vec<Held> {
    let mut held = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let mut ramp = JoinSet::new();
        for _ in 0..batch.min(left) {
            let url = url.to_owned();
            ramp.spawn(async move { connect(&url).await });
        }
        left -= batch.min(left);
        while let Some(client) = ramp.join_next().await {
            let client = client.unwrap();
            let stop = CancellationToken::new();
            held.push(Held {
                addr: local_addr(&client),
                stop: stop.clone(),
            });
            tasks.spawn(hold(client, stop));
        }
    }
    held
}

// ---------------------------------------------------------------------------------------
// 1. Start-up.

#[ignore = "needs Python prometheus_client and promtool: python3 -m pip install prometheus_client; apt-get install prometheus"]
#[tokio::test]
async fn every_family_is_exported_from_start_up_and_promtool_finds_it_clean() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let s = scrape_linted(proxy.admin).await;
    let types = s.type_lines();
    for (name, kind) in FAMILIES {
        assert_eq!(
            types.get(*name).map(String::as_str),
            Some(*kind),
            "family {name} ({kind}) missing or mistyped; scrape:\n{}",
            s.text
        );
        // The reference parser agrees (it names a counter without `_total`).
        let parsed = if *kind == "counter" {
            name.strip_suffix("_total").unwrap()
        } else {
            name
        };
        assert_eq!(
            s.families.get(parsed).map(String::as_str),
            Some(*kind),
            "{parsed}"
        );
        assert!(
            s.text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
    }
    // Exactly these: the per-connection families are opt-in and off by default.
    let expected: BTreeSet<String> = FAMILIES.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(s.wsbeat_families(), expected);
    assert_eq!(
        s.must("wsbeat_connections_active", &[("route", "default")]),
        0.0
    );
}

// 2. A scenario with exact counts.

#[ignore = "needs Python prometheus_client and promtool: python3 -m pip install prometheus_client; apt-get install prometheus"]
#[tokio::test]
async fn a_mixed_workload_is_counted_exactly() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.heartbeat.interval = ms(100);
        c.liveness.ping_interval = ms(100);
        c.liveness.timeout = ms(400);
    })
    .await;
    let mut payload_bytes = 0;
    for i in 0..3usize {
        let mut client = connect(&proxy.url("/")).await;
        let text = format!("text message number {i}");
        let binary = vec![i as u8; 10 + i];
        payload_bytes += text.len() + binary.len();
        echo_roundtrip(&mut client, Message::text(text)).await;
        echo_roundtrip(&mut client, Message::binary(binary)).await;
        close_with(&mut client, CloseCode::Normal, "done").await;
    }
    // A client that completes the handshake and then says nothing, ever.
    let _silent = raw_websocket(proxy.addr, "/").await;
    loop {
        match backend.next().await {
            Seen::Closed { conn: 3, frame } => {
                assert_eq!(frame.map(|f| f.code), Some(CloseCode::Away));
                break;
            }
            Seen::Dropped { conn: 3 } => panic!("the silent client's backend leg was dropped"),
            _ => {}
        }
    }
    let s = settled(proxy.admin, 4).await;
    let d = [("route", "default")];
    let total = |outcome| s.value("wsbeat_connections_total", &[d[0], ("outcome", outcome)]);
    assert_eq!(total("client_close"), 3.0, "{}", s.text);
    assert_eq!(total("client_dead"), 1.0, "{}", s.text);
    for other in OUTCOMES {
        if !["client_close", "client_dead"].contains(other) {
            assert_eq!(total(other), 0.0, "outcome {other}");
        }
    }
    let leg = |name: &str, l: &str| s.value(name, &[d[0], ("leg", l)]);
    assert_eq!(leg("wsbeat_liveness_timeouts_total", "client"), 1.0);
    assert_eq!(leg("wsbeat_liveness_timeouts_total", "upstream"), 0.0);
    assert_eq!(s.must("wsbeat_connections_active", &d), 0.0);
    let msgs = |direction, kind| {
        s.value(
            "wsbeat_messages_total",
            &[d[0], ("direction", direction), ("kind", kind)],
        )
    };
    // Data messages only: heartbeats (every 100 ms) and PINGs are not messages.
    assert_eq!(msgs("to_upstream", "text"), 3.0);
    assert_eq!(msgs("to_upstream", "binary"), 3.0);
    assert_eq!(msgs("to_client", "text"), 3.0);
    assert_eq!(msgs("to_client", "binary"), 3.0);
    // The three clients' closes were forwarded; the backend's answers to them, and the
    // 1001 that wsbeat itself sent for the dead client, were not forwarded frames.
    assert_eq!(msgs("to_upstream", "close"), 3.0, "{}", s.text);
    assert_eq!(msgs("to_client", "close"), 0.0, "{}", s.text);
    let bytes = |direction| s.value("wsbeat_bytes_total", &[d[0], ("direction", direction)]);
    assert_eq!(bytes("to_upstream"), payload_bytes as f64, "{}", s.text);
    assert_eq!(bytes("to_client"), payload_bytes as f64, "{}", s.text);
    assert_eq!(s.must("wsbeat_connection_duration_seconds_count", &d), 4.0);
    assert_eq!(s.must("wsbeat_upstream_connect_seconds_count", &d), 4.0);
    assert_eq!(
        s.value("wsbeat_http_requests_total", &[d[0], ("status", "101")]),
        4.0
    );
    for reason in UPSTREAM_ERRORS {
        assert_eq!(
            s.value("wsbeat_upstream_errors_total", &[d[0], ("reason", reason)]),
            0.0
        );
    }
    assert_eq!(s.value("wsbeat_client_heartbeats_dropped_total", &d), 0.0);
    // The silent client lived at least 400 ms with heartbeats and PINGs every 100 ms.
    assert!(
        s.value("wsbeat_heartbeats_sent_total", &d) >= 3.0,
        "{}",
        s.text
    );
    assert!(
        leg("wsbeat_pings_sent_total", "client") >= 3.0,
        "{}",
        s.text
    );
    // Each normal client sent at least a text, a binary and a close frame.
    assert!(
        s.must("wsbeat_client_silence_seconds_count", &d) >= 9.0,
        "{}",
        s.text
    );
    // Durations: the dead client lived at least the 400 ms timeout.
    assert!(s.must("wsbeat_connection_duration_seconds_sum", &d) >= 0.4);
    scrape_linted(proxy.admin).await;
}

// 3. Client heartbeats.

#[ignore = "needs Python prometheus_client and promtool: python3 -m pip install prometheus_client; apt-get install prometheus"]
#[tokio::test]
async fn client_heartbeats_are_dropped_and_counted() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let mut client = connect(&proxy.url("/")).await;
    for _ in 0..7 {
        client.feed(Message::text(HB)).await.unwrap();
    }
    client.send(Message::text("normal")).await.unwrap();
    match backend.next_after_handshake().await {
        Seen::Message { msg, .. } => assert_eq!(msg, Message::text("normal")),
        other => panic!("{other:?}"),
    }
    let s = scrape(proxy.admin).await;
    let d = [("route", "default")];
    assert_eq!(
        s.value("wsbeat_client_heartbeats_dropped_total", &d),
        7.0,
        "{}",
        s.text
    );
    assert_eq!(
        s.value(
            "wsbeat_messages_total",
            &[d[0], ("direction", "to_upstream"), ("kind", "text")]
        ),
        1.0,
        "dropped heartbeats are not messages"
    );
    let views = connections(proxy.admin).await;
    assert_eq!(views.len(), 1, "{views:?}");
    assert_eq!(views[0].client_heartbeats_dropped, 7);
    assert_eq!(views[0].messages_to_upstream, 1);
    assert_eq!(views[0].bytes_to_upstream, "normal".len() as u64);
}

// 4. Heartbeats sent, PINGs and PONGs.

#[ignore = "needs Python prometheus_client and promtool: python3 -m pip install prometheus_client; apt-get install prometheus"]
#[tokio::test]
async fn heartbeats_sent_match_what_the_client_received() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.heartbeat.interval = ms(100);
        c.liveness.ping_interval = ms(200);
        c.liveness.timeout = ms(2000);
    })
    .await;
    // tokio-tungstenite answers PINGs while it reads.
    let mut client = connect(&proxy.url("/")).await;
    let mut received = 0u64;
    let window_end = Instant::now() + Duration::from_secs(1);
    while let Ok(msg) = tokio::time::timeout_at(window_end.into(), recv(&mut client)).await {
        match msg {
            Message::Text(t) if t.as_str() == HB => received += 1,
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let d = [("route", "default")];
    let live = scrape(proxy.admin).await;
    let sent = live.value("wsbeat_heartbeats_sent_total", &d) as u64;
    // Live, the counter is at least what arrived; it may be ahead by the heartbeats wsbeat
    // wrote that the client has not read yet (one in flight, plus any sent while the
    // scrape ran). Reading on must deliver every one of them: the count is not inflated.
    assert!(
        sent >= received,
        "counter {sent} < {received} heartbeats received"
    );
    assert!(received >= 5, "only {received} heartbeats in 1 s at 100 ms");
    while received < sent {
        match recv(&mut client).await {
            Message::Text(t) if t.as_str() == HB => received += 1,
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let leg = |s: &Scrape, name: &str, l: &str| s.value(name, &[d[0], ("leg", l)]);
    let pings = leg(&live, "wsbeat_pings_sent_total", "client");
    let pongs = leg(&live, "wsbeat_pongs_received_total", "client");
    let rtts = leg(&live, "wsbeat_pong_rtt_seconds_count", "client");
    assert!(pings >= 3.0, "{pings} PINGs in 1 s at 200 ms");
    assert!(
        pongs >= 2.0 && pongs <= pings,
        "{pongs} PONGs for {pings} PINGs"
    );
    assert!(
        rtts >= 2.0 && rtts <= pongs,
        "{rtts} RTTs for {pongs} PONGs"
    );
    let rtt_sum = leg(&live, "wsbeat_pong_rtt_seconds_sum", "client");
    assert!(
        rtt_sum >= 0.0 && rtt_sum / rtts < 1.0,
        "mean RTT {} s on loopback",
        rtt_sum / rtts
    );
    // The upstream is not pinged unless configured.
    assert_eq!(leg(&live, "wsbeat_pings_sent_total", "upstream"), 0.0);
    // After the close nothing is in flight: wsbeat sends no heartbeat after echoing the
    // client's close, and every heartbeat written before it reaches the client (which
    // still reads data after sending its close), so the final count is exact.
    client
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        }))
        .await
        .unwrap();
    received += finish(&mut client).await as u64;
    let s = settled(proxy.admin, 1).await;
    assert_eq!(
        s.value("wsbeat_heartbeats_sent_total", &d),
        received as f64,
        "{}",
        s.text
    );
    assert_eq!(
        s.value(
            "wsbeat_messages_total",
            &[d[0], ("direction", "to_client"), ("kind", "text")]
        ),
        0.0,
        "heartbeats are not messages"
    );
}

// 5. /connections.

#[tokio::test]
async fn connections_lists_each_live_websocket_with_its_counters() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.heartbeat.interval = ms(100);
        c.liveness.ping_interval = ms(100);
        c.liveness.timeout = ms(5000);
    })
    .await;
    assert!(connections(proxy.admin).await.is_empty());
    let client = connect(&proxy.url("/ws/chat?room=1")).await;
    let client_addr = local_addr(&client);
    let (mut tx, mut rx) = client.split();
    // A reader that answers PINGs, counts heartbeats and hands data messages over.
    let heartbeats = Arc::new(AtomicU64::new(0));
    let (data_tx, mut data_rx) = tokio::sync::mpsc::unbounded_channel();
    let counted = heartbeats.clone();
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = rx.next().await {
            match m {
                Message::Text(t) if t.as_str() == HB => {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
                Message::Text(_) | Message::Binary(_) => data_tx.send(m).unwrap(),
                _ => {}
            }
        }
    });
    let first = Message::text("first message");
    let second = Message::binary((0..=255u8).collect::<Vec<_>>());
    let bytes = (first.len() + second.len()) as u64;
    tx.send(first.clone()).await.unwrap();
    tx.send(second.clone()).await.unwrap();
    for expected in [first, second] {
        let got = tokio::time::timeout(PATIENCE, data_rx.recv())
            .await
            .expect("echo in time");
        assert_eq!(got, Some(expected));
    }
    for _ in 0..2 {
        assert!(matches!(
            backend.next_after_handshake().await,
            Seen::Message { .. }
        ));
    }
    // Wait for the first PONG to be measured; the client answers PINGs every 100 ms.
    let views = connections_until(proxy.admin, "a measured PONG RTT", |v| {
        v.len() == 1 && v[0].last_pong_rtt_seconds.is_some()
    })
    .await;
    let heartbeats_before = heartbeats.load(Ordering::SeqCst);
    let views_after = connections(proxy.admin).await;
    assert_eq!(views_after.len(), 1);
    let c = &views_after[0];
    assert_eq!(c.id, views[0].id, "the id is stable");
    assert_eq!(c.client_addr, client_addr.to_string());
    assert_eq!(c.route, "default");
    let upstream = format!("ws://{}", backend.addr);
    assert!(
        c.upstream == upstream || c.upstream == format!("{upstream}/"),
        "upstream {:?}, backend {upstream}",
        c.upstream
    );
    assert!(
        c.age_seconds > 0.0 && c.age_seconds < 60.0,
        "age {}",
        c.age_seconds
    );
    assert!(c.age_seconds >= views[0].age_seconds, "age went backwards");
    assert!(
        c.last_client_frame_seconds_ago >= 0.0 && c.last_client_frame_seconds_ago <= c.age_seconds,
        "{c:?}"
    );
    let rtt = c.last_pong_rtt_seconds.unwrap();
    assert!((0.0..1.0).contains(&rtt), "RTT {rtt} s on loopback");
    assert_eq!(c.messages_to_upstream, 2);
    assert_eq!(c.bytes_to_upstream, bytes);
    assert_eq!(c.messages_to_client, 2, "heartbeats are not messages");
    assert_eq!(c.bytes_to_client, bytes);
    assert_eq!(c.client_heartbeats_dropped, 0);
    assert!(
        c.heartbeats_sent >= heartbeats_before,
        "{} heartbeats sent, {heartbeats_before} received",
        c.heartbeats_sent
    );
    tx.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    })))
    .await
    .unwrap();
    tokio::time::timeout(PATIENCE, reader)
        .await
        .expect("close handshake in time")
        .unwrap();
    connections_until(proxy.admin, "an empty list", <[ConnView]>::is_empty).await;
}

// 6. Upstream errors and HTTP statuses.

async fn handshake_status(proxy: &Proxy) -> String {
    let response = raw_http(proxy.addr, &upgrade_request("/")).await;
    response.lines().next().unwrap_or_default().to_owned()
}

fn assert_upstream_errors(s: &Scrape, reason: &str, status: &str) {
    for r in UPSTREAM_ERRORS {
        let want = if *r == reason { 1.0 } else { 0.0 };
        assert_eq!(
            s.value(
                "wsbeat_upstream_errors_total",
                &[("route", "default"), ("reason", r)]
            ),
            want,
            "reason {r}; scrape:\n{}",
            s.text
        );
    }
    assert_eq!(
        s.sum("wsbeat_http_requests_total", &[]),
        1.0,
        "one request in all:\n{}",
        s.text
    );
    assert_eq!(
        s.value(
            "wsbeat_http_requests_total",
            &[("route", "default"), ("status", status)]
        ),
        1.0,
        "{}",
        s.text
    );
    assert_eq!(s.sum("wsbeat_connections_total", &[]), 0.0);
    assert_eq!(
        s.value("wsbeat_connections_active", &[("route", "default")]),
        0.0
    );
}

#[ignore = "needs Python prometheus_client and promtool: python3 -m pip install prometheus_client; apt-get install prometheus"]
#[tokio::test]
async fn an_unreachable_upstream_counts_connect_and_502() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let proxy = Proxy::start(addr, |_| {}).await;
    assert!(handshake_status(&proxy).await.starts_with("HTTP/1.1 502"));
    let s = scrape_until(proxy.admin, "the 502 counted", PATIENCE, |s| {
        s.sum("wsbeat_http_requests_total", &[]) >= 1.0
    })
    .await;
    assert_upstream_errors(&s, "connect", "502");
}

#[ignore = "needs Python prometheus_client and promtool: python3 -m pip install prometheus_client; apt-get install prometheus"]
#[tokio::test]
async fn an_upstream_refusal_counts_refused_and_its_status() {
    let backend = Backend::start(BackendBehaviour {
        refuse: Some((403, "not you")),
        ..Default::default()
    })
    .await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    assert!(handshake_status(&proxy).await.starts_with("HTTP/1.1 403"));
    let s = scrape_until(proxy.admin, "the 403 counted", PATIENCE, |s| {
        s.sum("wsbeat_http_requests_total", &[]) >= 1.0
    })
    .await;
    assert_upstream_errors(&s, "refused", "403");
}

#[ignore = "needs Python prometheus_client and promtool: python3 -m pip install prometheus_client; apt-get install prometheus"]
#[tokio::test]
async fn a_silent_upstream_counts_timeout_and_504() {
    // Accepted by the kernel's backlog, never answered.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = Proxy::start(silent.local_addr().unwrap(), |c| {
        c.upstream.connect_timeout = ms(300);
    })
    .await;
    assert!(handshake_status(&proxy).await.starts_with("HTTP/1.1 504"));
    let s = scrape_until(proxy.admin, "the 504 counted", PATIENCE, |s| {
        s.sum("wsbeat_http_requests_total", &[]) >= 1.0
    })
    .await;
    assert_upstream_errors(&s, "timeout", "504");
    drop(silent);
}

#[ignore = "needs Python prometheus_client and promtool: python3 -m pip install prometheus_client; apt-get install prometheus"]
#[tokio::test]
async fn an_invalid_upstream_handshake_counts_handshake_and_502() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        if read_head(&mut s).await.is_none() {
            return;
        }
        // A 101 with the wrong Sec-WebSocket-Accept.
        let _ = s
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                  Connection: Upgrade\r\nSec-WebSocket-Accept: bm90IHRoZSByaWdodCBrZXk=\r\n\r\n",
            )
            .await;
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    });
    let proxy = Proxy::start(addr, |_| {}).await;
    assert!(handshake_status(&proxy).await.starts_with("HTTP/1.1 502"));
    let s = scrape_until(proxy.admin, "the 502 counted", PATIENCE, |s| {
        s.sum("wsbeat_http_requests_total", &[]) >= 1.0
    })
    .await;
    assert_upstream_errors(&s, "handshake", "502");
}

#[ignore = "needs Python prometheus_client and promtool: python3 -m pip install prometheus_client; apt-get install prometheus"]
#[tokio::test]
async fn a_successful_upgrade_counts_101_and_no_error() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let mut client = connect(&proxy.url("/")).await;
    assert!(matches!(backend.next().await, Seen::Handshake { .. }));
    let s = scrape(proxy.admin).await;
    let d = ("route", "default");
    assert_eq!(
        s.value("wsbeat_http_requests_total", &[d, ("status", "101")]),
        1.0,
        "{}",
        s.text
    );
    assert_eq!(s.sum("wsbeat_http_requests_total", &[]), 1.0);
    assert_eq!(s.sum("wsbeat_upstream_errors_total", &[]), 0.0);
    assert_eq!(s.must("wsbeat_connections_active", &[d]), 1.0);
    assert_eq!(s.must("wsbeat_upstream_connect_seconds_count", &[d]), 1.0);
    close_with(&mut client, CloseCode::Normal, "").await;
    settled(proxy.admin, 1).await;
}

// 7. Close codes.

#[ignore = "needs Python prometheus_client and promtool: python3 -m pip install prometheus_client; apt-get install prometheus"]
#[tokio::test]
async fn a_client_close_code_outside_1000_1015_is_counted_as_other() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let mut client = connect(&proxy.url("/")).await;
    close_with(&mut client, CloseCode::Library(4000), "bye").await;
    match backend.next_after_handshake().await {
        Seen::Closed { frame: Some(f), .. } => assert_eq!(f.code, CloseCode::Library(4000)),
        other => panic!("{other:?}"),
    }
    let s = settled(proxy.admin, 1).await;
    // One close code per leg and connection: the client's 4000, which the upstream got.
    let code = |leg, code| s.value("wsbeat_close_codes_total", &[("leg", leg), ("code", code)]);
    assert_eq!(code("client", "other"), 1.0, "{}", s.text);
    assert_eq!(code("upstream", "other"), 1.0, "{}", s.text);
    assert_eq!(s.sum("wsbeat_close_codes_total", &[]), 2.0, "{}", s.text);
    assert_eq!(
        s.value(
            "wsbeat_connections_total",
            &[("route", "default"), ("outcome", "client_close")]
        ),
        1.0
    );
}

#[ignore = "needs Python prometheus_client and promtool: python3 -m pip install prometheus_client; apt-get install prometheus"]
#[tokio::test]
async fn a_backend_close_code_is_counted_by_its_number() {
    // The backend closes with 1000 when asked to.
    let addr = closing_backend(CloseCode::Normal, "as you wish").await;
    let proxy = Proxy::start(addr, |_| {}).await;
    let mut client = connect(&proxy.url("/")).await;
    client.send(Message::text("close please")).await.unwrap();
    let frame = recv_close(&mut client).await.expect("close frame");
    assert_eq!(frame.code, CloseCode::Normal);
    finish(&mut client).await;
    let s = settled(proxy.admin, 1).await;
    let code = |leg, code| s.value("wsbeat_close_codes_total", &[("leg", leg), ("code", code)]);
    assert_eq!(code("upstream", "1000"), 1.0, "{}", s.text);
    assert_eq!(code("client", "1000"), 1.0, "{}", s.text);
    assert_eq!(s.sum("wsbeat_close_codes_total", &[]), 2.0, "{}", s.text);
    assert_eq!(
        s.value(
            "wsbeat_connections_total",
            &[("route", "default"), ("outcome", "upstream_close")]
        ),
        1.0
    );
    assert_eq!(
        s.sum("wsbeat_upstream_errors_total", &[]),
        0.0,
        "a clean close is no upstream failure: {}",
        s.text
    );
    assert_eq!(
        s.value(
            "wsbeat_messages_total",
            &[
                ("route", "default"),
                ("direction", "to_client"),
                ("kind", "close")
            ]
        ),
        1.0,
        "the backend's close was forwarded"
    );
}

// Beyond the list: fragmented messages, and the upstream leg's PINGs and death.

#[ignore = "needs Python prometheus_client and promtool: python3 -m pip install prometheus_client; apt-get install prometheus"]
#[tokio::test]
async fn a_fragmented_message_counts_once_with_its_kind_and_payload_bytes() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let mut raw = raw_websocket(proxy.addr, "/").await;
    let mut wire = Vec::new();
    // Text in two fragments with a PING between them; binary in three.
    wire.extend(client_fragment(0x1, b"hel"));
    wire.extend(client_frame(0x9, b"ping"));
    wire.extend(client_frame(0x0, b"lo"));
    wire.extend(client_fragment(0x2, &[1, 2, 3]));
    wire.extend(client_fragment(0x0, &[4]));
    wire.extend(client_frame(0x0, &[5, 6]));
    raw.write_all(&wire).await.unwrap();
    for expected in [
        Message::text("hello"),
        Message::binary(vec![1, 2, 3, 4, 5, 6]),
    ] {
        match backend.next_after_handshake().await {
            Seen::Message { msg, .. } => assert_eq!(msg, expected),
            other => panic!("{other:?}"),
        }
    }
    let d = ("route", "default");
    let msgs = |s: &Scrape, direction: &str, kind: &str| {
        s.value(
            "wsbeat_messages_total",
            &[d, ("direction", direction), ("kind", kind)],
        )
    };
    // The echoes (whole messages) flow back to the raw client, which does not read them.
    let s = scrape_until(proxy.admin, "both echoes counted", PATIENCE, |s| {
        msgs(s, "to_client", "text") + msgs(s, "to_client", "binary") >= 2.0
    })
    .await;
    assert_eq!(msgs(&s, "to_upstream", "text"), 1.0, "{}", s.text);
    assert_eq!(msgs(&s, "to_upstream", "binary"), 1.0, "{}", s.text);
    assert_eq!(msgs(&s, "to_client", "text"), 1.0, "{}", s.text);
    assert_eq!(msgs(&s, "to_client", "binary"), 1.0, "{}", s.text);
    let bytes = |direction| s.value("wsbeat_bytes_total", &[d, ("direction", direction)]);
    assert_eq!(bytes("to_upstream"), 11.0, "{}", s.text);
    assert_eq!(bytes("to_client"), 11.0, "{}", s.text);
    let views = connections(proxy.admin).await;
    assert_eq!(views.len(), 1);
    assert_eq!(views[0].messages_to_upstream, 2);
    assert_eq!(views[0].bytes_to_upstream, 11);
}

/// A backend that completes the WebSocket handshake by hand and then never reads or
/// writes again: a dead upstream.
async fn silent_upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let Some(head) = read_head(&mut s).await else {
            return;
        };
        let head = String::from_utf8(head).unwrap();
        let key = head_field(&head, "sec-websocket-key").expect("a key");
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        s.write_all(
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        // Hold the socket, never read: wsbeat's PINGs go unanswered.
        std::future::pending::<()>().await;
        drop(s);
    });
    (addr, task)
}

#[ignore = "needs Python prometheus_client and promtool: python3 -m pip install prometheus_client; apt-get install prometheus"]
#[tokio::test]
async fn upstream_pings_are_counted_per_leg() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.liveness.upstream_ping_interval = Some(ms(100));
    })
    .await;
    let mut client = connect(&proxy.url("/")).await;
    let up = [("route", "default"), ("leg", "upstream")];
    // The tokio-tungstenite backend reads all the time, so it answers every PING.
    let s = scrape_until(proxy.admin, "upstream PONGs measured", PATIENCE, |s| {
        s.value("wsbeat_pong_rtt_seconds_count", &up) >= 2.0
    })
    .await;
    let pings = s.value("wsbeat_pings_sent_total", &up);
    let pongs = s.value("wsbeat_pongs_received_total", &up);
    assert!(
        pongs >= 2.0 && pongs <= pings,
        "{pongs} PONGs for {pings} PINGs"
    );
    assert!(s.value("wsbeat_pong_rtt_seconds_count", &up) <= pongs);
    // Nothing of it lands on the client leg's series (the client is not pinged in 10 s).
    let cl = [("route", "default"), ("leg", "client")];
    assert_eq!(s.value("wsbeat_pongs_received_total", &cl), 0.0);
    assert_eq!(s.value("wsbeat_pong_rtt_seconds_count", &cl), 0.0);
    close_with(&mut client, CloseCode::Normal, "").await;
    settled(proxy.admin, 1).await;
}

#[ignore = "needs Python prometheus_client and promtool: python3 -m pip install prometheus_client; apt-get install prometheus"]
#[tokio::test]
async fn a_dead_upstream_is_counted_as_upstream_dead() {
    let (addr, _upstream) = silent_upstream().await;
    let proxy = Proxy::start(addr, |c| {
        c.liveness.ping_interval = ms(100);
        c.liveness.timeout = ms(600);
        c.liveness.upstream_ping_interval = Some(ms(100));
    })
    .await;
    // This client reads all along, so it answers its PINGs and stays alive.
    let mut client = connect(&proxy.url("/")).await;
    let frame = recv_close(&mut client).await.expect("a close frame");
    assert_eq!(
        frame.code,
        CloseCode::Error,
        "a dead upstream closes the client with 1011"
    );
    finish(&mut client).await;
    let s = settled(proxy.admin, 1).await;
    let d = ("route", "default");
    assert_eq!(
        s.value(
            "wsbeat_connections_total",
            &[d, ("outcome", "upstream_dead")]
        ),
        1.0,
        "{}",
        s.text
    );
    assert_eq!(s.sum("wsbeat_connections_total", &[]), 1.0);
    assert_eq!(
        s.value("wsbeat_liveness_timeouts_total", &[d, ("leg", "upstream")]),
        1.0
    );
    assert_eq!(
        s.value("wsbeat_liveness_timeouts_total", &[d, ("leg", "client")]),
        0.0
    );
    let up = [d, ("leg", "upstream")];
    assert!(s.value("wsbeat_pings_sent_total", &up) >= 3.0, "{}", s.text);
    assert_eq!(s.value("wsbeat_pongs_received_total", &up), 0.0);
    let code = |leg, code| s.value("wsbeat_close_codes_total", &[("leg", leg), ("code", code)]);
    assert_eq!(code("client", "1011"), 1.0, "{}", s.text);
    assert_eq!(code("upstream", "1001"), 1.0, "{}", s.text);
}

#[ignore = "needs Python prometheus_client and promtool: python3 -m pip install prometheus_client; apt-get install prometheus"]
#[tokio::test]
async fn a_connection_past_its_maximum_age_is_counted_as_max_age() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.limits.max_connection_age = Some(ms(300));
    })
    .await;
    let mut client = connect(&proxy.url("/")).await;
    let frame = recv_close(&mut client).await.expect("a close frame");
    assert_eq!(
        frame.code,
        CloseCode::Away,
        "closed as a drain closes: 1001"
    );
    finish(&mut client).await;
    let s = settled(proxy.admin, 1).await;
    let d = ("route", "default");
    assert_eq!(
        s.value("wsbeat_connections_total", &[d, ("outcome", "max_age")]),
        1.0,
        "{}",
        s.text
    );
    assert_eq!(s.sum("wsbeat_connections_total", &[]), 1.0);
    let code = |leg, code| s.value("wsbeat_close_codes_total", &[("leg", leg), ("code", code)]);
    assert_eq!(code("client", "1001"), 1.0, "{}", s.text);
    assert_eq!(code("upstream", "1001"), 1.0, "{}", s.text);
}

// 8. Per-connection series.

#[ignore = "needs Python prometheus_client and promtool: python3 -m pip install prometheus_client; apt-get install prometheus"]
#[tokio::test]
async fn per_connection_series_follow_the_live_connections() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.metrics.per_connection = true;
        c.liveness.ping_interval = ms(100);
        c.liveness.timeout = ms(5000);
    })
    .await;
    let mut tasks = JoinSet::new();
    let held = open_held(&proxy.url("/"), 2, 2, &mut tasks).await;
    let s = scrape_until(proxy.admin, "2 series of each family", PATIENCE, |s| {
        s.series(LAST_SEEN).len() == 2 && s.series(PONG_RTT).len() == 2
    })
    .await;
    let conns = s.conns(LAST_SEEN);
    assert_eq!(conns.len(), 2);
    assert_eq!(s.conns(PONG_RTT), conns);
    let views = connections(proxy.admin).await;
    let ids: BTreeSet<String> = views.iter().map(|v| v.id.to_string()).collect();
    assert_eq!(conns, ids, "conn labels are the /connections ids");
    for sample in s.series(PONG_RTT) {
        assert!(
            (0.0..1.0).contains(&sample.value),
            "RTT {} s on loopback",
            sample.value
        );
    }
    for sample in s.series(LAST_SEEN) {
        assert!(
            sample.value.is_finite() && sample.value >= 0.0,
            "{sample:?}"
        );
    }
    scrape_linted(proxy.admin).await;

    // Close the first: its series go, the other's stay.
    let gone = &held[0];
    let gone_id = views
        .iter()
        .find(|v| v.client_addr == gone.addr.to_string())
        .unwrap()
        .id
        .to_string();
    gone.stop.cancel();
    let s = scrape_until(proxy.admin, "1 series of each family", PATIENCE, |s| {
        s.series(LAST_SEEN).len() == 1 && s.series(PONG_RTT).len() == 1
    })
    .await;
    let left: BTreeSet<String> = conns.iter().filter(|c| **c != gone_id).cloned().collect();
    assert_eq!(s.conns(LAST_SEEN), left);
    assert_eq!(s.conns(PONG_RTT), left);
    held[1].stop.cancel();
    scrape_until(proxy.admin, "no per-connection series", PATIENCE, |s| {
        s.series(LAST_SEEN).is_empty() && s.series(PONG_RTT).is_empty()
    })
    .await;
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

#[ignore = "needs Python prometheus_client and promtool: python3 -m pip install prometheus_client; apt-get install prometheus"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_connection_series_are_capped_at_the_1000_oldest() {
    // File descriptors: 1005 clients + 2 × 1005 in wsbeat + 1005 in the backend ≈ 4020,
    // well inside the 20,000 limit even with the other tests of this file running.
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.metrics.per_connection = true;
        c.liveness.ping_interval = ms(1000);
        c.liveness.timeout = ms(60_000);
        c.heartbeat.interval = ms(10_000);
    })
    .await;
    let url = proxy.url("/");
    let mut tasks = JoinSet::new();
    let mut held = open_held(&url, 1000, 50, &mut tasks).await;
    // The five youngest come after the first thousand are all open.
    let young = open_held(&url, 5, 5, &mut tasks).await;
    let young_addrs: BTreeSet<String> = young.iter().map(|h| h.addr.to_string()).collect();
    held.extend(young);
    let s = scrape_until(
        proxy.admin,
        "1000 series of each family",
        LONG_PATIENCE,
        |s| s.series(LAST_SEEN).len() == 1000 && s.series(PONG_RTT).len() == 1000,
    )
    .await;
    assert_eq!(
        s.must("wsbeat_connections_active", &[("route", "default")]),
        1005.0
    );
    let views = connections(proxy.admin).await;
    assert_eq!(views.len(), 1005);
    let young_ids: BTreeSet<String> = views
        .iter()
        .filter(|v| young_addrs.contains(&v.client_addr))
        .map(|v| v.id.to_string())
        .collect();
    assert_eq!(young_ids.len(), 5);
    let oldest: BTreeSet<String> = views
        .iter()
        .map(|v| v.id.to_string())
        .filter(|id| !young_ids.contains(id))
        .collect();
    assert_eq!(s.conns(LAST_SEEN), oldest, "the 1000 oldest have series");
    assert_eq!(s.conns(PONG_RTT), oldest);
    // Still 1000 after more scrapes: the cap holds, no series for the young five.
    let s = scrape_linted(proxy.admin).await;
    assert_eq!(s.series(LAST_SEEN).len(), 1000);
    assert_eq!(s.series(PONG_RTT).len(), 1000);

    // Five of the old ones close: 1000 live connections remain, so all of them have
    // series now, the young five included.
    for h in &held[..5] {
        h.stop.cancel();
    }
    let s = scrape_until(
        proxy.admin,
        "the 1000 remaining connections with series",
        LONG_PATIENCE,
        |s| {
            s.value("wsbeat_connections_active", &[("route", "default")]) == 1000.0
                && s.series(LAST_SEEN).len() == 1000
                && s.series(PONG_RTT).len() == 1000
                && young_ids.is_subset(&s.conns(LAST_SEEN))
        },
    )
    .await;
    let live: BTreeSet<String> = connections(proxy.admin)
        .await
        .iter()
        .map(|v| v.id.to_string())
        .collect();
    assert_eq!(s.conns(LAST_SEEN), live);

    for h in &held {
        h.stop.cancel();
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    scrape_until(
        proxy.admin,
        "no connections and no series",
        LONG_PATIENCE,
        |s| {
            s.value("wsbeat_connections_active", &[("route", "default")]) == 0.0
                && s.series(LAST_SEEN).is_empty()
                && s.series(PONG_RTT).is_empty()
        },
    )
    .await;
}

#[ignore = "needs Python prometheus_client and promtool: python3 -m pip install prometheus_client; apt-get install prometheus"]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_scrapes_each_see_the_whole_per_connection_set() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.metrics.per_connection = true;
        c.liveness.ping_interval = ms(1000);
        c.liveness.timeout = ms(60_000);
        c.heartbeat.interval = ms(10_000);
    })
    .await;
    let mut tasks = JoinSet::new();
    // Many connections make rebuilding the per-connection set take long enough to overlap.
    let held = open_held(&proxy.url("/"), 1000, 50, &mut tasks).await;
    scrape_until(
        proxy.admin,
        "1000 series of each family",
        LONG_PATIENCE,
        |s| s.series(LAST_SEEN).len() == 1000 && s.series(PONG_RTT).len() == 1000,
    )
    .await;
    // Scrapes that overlap (an HA pair of Prometheus servers, or a person with curl
    // next to Prometheus) each see the whole set, never a set that another scrape is
    // rebuilding. Four scrapers, 100 scrapes each, not in step; counted without the
    // parser to keep it quick. Four runtime workers on two cores get preempted mid-scrape,
    // as on a loaded machine: without that, a half-built set shows up in under 1% of the
    // scrapes, with it in 5-10%.
    let admin = proxy.admin;
    let mut scrapers = JoinSet::new();
    for _ in 0..4 {
        scrapers.spawn(async move {
            let mut partial = Vec::new();
            for _ in 0..100 {
                let body = get(admin, "/metrics").await.body;
                let count = |family: &str| {
                    let prefix = format!("{family}{{");
                    body.lines().filter(|l| l.starts_with(&prefix)).count()
                };
                let counts = (count(LAST_SEEN), count(PONG_RTT));
                if counts != (1000, 1000) {
                    partial.push(counts);
                }
            }
            partial
        });
    }
    let mut partial = Vec::new();
    while let Some(p) = scrapers.join_next().await {
        partial.extend(p.unwrap());
    }
    assert!(
        partial.is_empty(),
        "{} of 400 overlapping scrapes saw a partial per-connection set \
         (series of last_seen, pong_rtt): {partial:?}",
        partial.len()
    );

    for h in &held {
        h.stop.cancel();
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

// 9. Liveness and readiness.

#[ignore = "needs Python prometheus_client and promtool: python3 -m pip install prometheus_client; apt-get install prometheus"]
#[tokio::test]
async fn readyz_turns_503_as_soon_as_the_drain_starts() {
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    let admin = proxy.admin;
    assert_eq!(get(admin, "/livez").await.status, 200);
    assert_eq!(get(admin, "/readyz").await.status, 200);
    assert_eq!(get(admin, "/no-such-endpoint").await.status, 404);
    // A client that never reads: it will never answer wsbeat's close, so the drain waits
    // for it (the close grace, 1 s) and /readyz can be asked while draining.
    let _stubborn = raw_websocket(proxy.addr, "/").await;
    assert!(matches!(backend.next().await, Seen::Handshake { .. }));
    let stopping = tokio::spawn(proxy.stop());
    let deadline = Instant::now() + PATIENCE;
    loop {
        match try_raw_request(admin, &get_request(admin, "/readyz")).await {
            Ok(r) if r.status == 503 => break,
            Ok(r) if r.status == 200 => {}
            Ok(r) => panic!("/readyz answered {r:?}"),
            Err(e) => panic!(
                "the admin listener went away before /readyz said 503 (drain over: {}): {e}",
                stopping.is_finished()
            ),
        }
        assert!(Instant::now() < deadline, "/readyz never turned 503");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The 503 came while wsbeat was still draining (the stubborn client still open), and
    // the process is still alive.
    assert!(!stopping.is_finished(), "503 only after the drain ended");
    assert_eq!(get(admin, "/livez").await.status, 200);
    let s = scrape(admin).await;
    assert_eq!(
        s.value("wsbeat_connections_active", &[("route", "default")]),
        1.0,
        "the stubborn client is still being drained"
    );
    match backend.next().await {
        Seen::Closed { frame: Some(f), .. } => assert_eq!(f.code, CloseCode::Away),
        other => panic!("expected close 1001 on shutdown, got {other:?}"),
    }
    stopping.await.unwrap();
    // serve() has returned: the admin listener is gone with it.
    let deadline = Instant::now() + PATIENCE;
    while TcpStream::connect(admin).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the admin listener outlived serve()"
        );
        tokio::time::sleep(RETRY).await;
    }
}

#[tokio::test]
async fn admin_endpoints_are_not_served_on_the_public_port() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |_| {}).await;
    for path in ["/metrics", "/connections", "/livez", "/readyz"] {
        let public = raw_http(
            proxy.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(
            !public.contains("wsbeat_") && !public.contains("client_addr"),
            "{path} on the public port: {public}"
        );
    }
    assert_eq!(get(proxy.admin, "/livez").await.status, 200);
}

// 10. The README's metrics table.

fn readme_metric_names() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let mut lines = readme.lines().skip_while(|l| l.trim_end() != "## Metrics");
    assert!(
        lines.next().is_some(),
        "README.md has no `## Metrics` section"
    );
    let mut names = BTreeSet::new();
    for line in lines.take_while(|l| !l.starts_with("## ")) {
        let Some(first_cell) = line
            .trim()
            .strip_prefix('|')
            .and_then(|r| r.split('|').next())
        else {
            continue;
        };
        // Every other span between backticks is inside them.
        for span in first_cell.split('`').skip(1).step_by(2) {
            let name: String = span
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if name.starts_with("wsbeat_") {
                names.insert(name);
            }
        }
    }
    names
}

#[ignore = "needs Python prometheus_client and promtool: python3 -m pip install prometheus_client; apt-get install prometheus"]
#[tokio::test]
async fn the_readme_metrics_table_lists_exactly_the_exported_families() {
    let readme = readme_metric_names();
    assert!(!readme.is_empty(), "no metric names in README's table");
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.metrics.per_connection = true;
        c.liveness.ping_interval = ms(100);
    })
    .await;
    let mut tasks = JoinSet::new();
    let held = open_held(&proxy.url("/"), 1, 1, &mut tasks).await;
    scrape_until(proxy.admin, "the per-connection series", PATIENCE, |s| {
        s.series(LAST_SEEN).len() == 1 && s.series(PONG_RTT).len() == 1
    })
    .await;
    let s = scrape_linted(proxy.admin).await;
    let exported = s.wsbeat_families();
    assert_eq!(
        readme,
        exported,
        "README only: {:?}; exported only: {:?}",
        readme.difference(&exported).collect::<Vec<_>>(),
        exported.difference(&readme).collect::<Vec<_>>()
    );
    held[0].stop.cancel();
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// permessage-deflate

/// `wsbeat_compressed_connections_active{route}` counts the connections with
/// permessage-deflate negotiated, while they are open; `wsbeat_bytes_total` counts the
/// compressed bytes on the wire; a route with `compression: off` has none.
#[ignore = "needs Python prometheus_client and promtool: python3 -m pip install prometheus_client; apt-get install prometheus"]
#[tokio::test]
async fn compressed_connections_are_counted_while_open_and_bytes_on_the_wire() {
    use crate::compression::{compressed_client_frame, deflate, deflating_upstream, offering};
    let message = compressed_client_frame(wsbeat::frame::OP_TEXT, &deflate(&[b'a'; 1000]));
    let wire_payload = (message.len() - 2 - 4) as f64; // header and mask of a short frame
    let (compressing, mut received) =
        deflating_upstream("permessage-deflate", Vec::new(), message.len()).await;
    let (plain, _plain_received) = deflating_upstream("", Vec::new(), 0).await;
    let proxy = Proxy::start(compressing, |c| {
        c.routes.push(wsbeat::config::RouteConfig {
            name: Some("plain".into()),
            path: "/plain".into(),
            upstream: Some(wsbeat::config::UpstreamConfig {
                url: format!("ws://{plain}").parse().unwrap(),
                ..Default::default()
            }),
            heartbeat: None,
            liveness: None,
            allowed_origins: None,
            compression: Some(wsbeat::config::Compression::Off),
        });
    })
    .await;
    let (mut compressed, head) = raw_head(proxy.addr, &offering("permessage-deflate")).await;
    assert!(head.contains("permessage-deflate"), "{head}");
    let plain_request = offering("permessage-deflate").replace("GET / ", "GET /plain ");
    let (uncompressed, head) = raw_head(proxy.addr, &plain_request).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    compressed.write_all(&message).await.unwrap();
    let (_, got) = crate::compression::next_upstream(&mut received).await;
    assert_eq!(got, message);

    let gauge = "wsbeat_compressed_connections_active";
    let s = scrape_linted(proxy.admin).await;
    assert_eq!(s.must(gauge, &[("route", "default")]), 1.0, "{}", s.text);
    assert_eq!(s.must(gauge, &[("route", "plain")]), 0.0, "{}", s.text);
    assert_eq!(
        s.must("wsbeat_connections_active", &[("route", "plain")]),
        1.0
    );
    let bytes = s.must(
        "wsbeat_bytes_total",
        &[("route", "default"), ("direction", "to_upstream")],
    );
    assert_eq!(
        bytes, wire_payload,
        "compressed bytes, not 1000 inflated ones"
    );
    drop((compressed, uncompressed));
    scrape_until(proxy.admin, "no compressed connection", PATIENCE, |s| {
        s.value(gauge, &[("route", "default")]) == 0.0
            && s.value("wsbeat_connections_active", &[("route", "default")]) == 0.0
    })
    .await;
}
