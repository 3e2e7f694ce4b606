//! The binary as a user runs it: configuration errors, `check`, `demo`, signals, and a
//! client written by somebody else (Python `websockets`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::common::*;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use wsbeat::config::Config;

const BIN: &str = env!("CARGO_BIN_EXE_wsbeat");

#[test]
fn unknown_config_key_exits_64_naming_the_key() {
    let file =
        write_temp_config("upstream:\n  url: ws://127.0.0.1:9\nheartbeat:\n  intervall: 4s\n");
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(file.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("heartbeat.intervall"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one clear message: {err}");
}

#[test]
fn check_refuses_a_close_spread_longer_than_the_drain_naming_both_keys() {
    let file = write_temp_config(
        "upstream:\n  url: ws://127.0.0.1:9\nshutdown:\n  drain_timeout: 10s\n  close_spread: 30s\n",
    );
    let out = Command::new(BIN)
        .args(["check", "--config", file.path()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("shutdown.close_spread") && err.contains("drain_timeout (10s)"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one clear message: {err}");
    // As long as the drain is allowed, and printed in the effective config.
    let file = write_temp_config(
        "upstream:\n  url: ws://127.0.0.1:9\nshutdown:\n  drain_timeout: 10s\n  close_spread: 10s\nlimits:\n  max_connection_age: 1h\n",
    );
    let out = Command::new(BIN)
        .args(["check", "--config", file.path()])
        .output()
        .unwrap();
    let effective = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(effective.contains("close_spread: 10s"), "{effective}");
    assert!(effective.contains("max_connection_age: 1h"), "{effective}");
}

#[test]
fn bad_values_and_missing_files_exit_64() {
    for (yaml, needle) in [
        ("heartbeat:\n  interval: often\n", "heartbeat.interval"),
        ("upstream:\n  url: http://x:1\n", "upstream.url"),
        (
            "limits:\n  max_message_size: 16MB\n",
            "limits.max_message_size",
        ),
        // Past the connection semaphore's capacity: once a panic at start-up.
        (
            "limits:\n  max_connections: 18446744073709551615\n",
            "limits.max_connections",
        ),
        (
            "limits:\n  max_connection_age: 0s\n",
            "limits.max_connection_age",
        ),
        // A deadline this far away would overflow the clock.
        (
            "shutdown:\n  drain_timeout: 9999999999d\n",
            "shutdown.drain_timeout",
        ),
    ] {
        let file = write_temp_config(yaml);
        let out = Command::new(BIN)
            .arg("--config")
            .arg(file.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{yaml}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{yaml}: {err}");
    }
    let out = Command::new(BIN)
        .args(["--config", "/nonexistent/wsbeat.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/wsbeat.yaml"));
    let out = Command::new(BIN)
        .args(["--upstream", "tcp://x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--upstream"));
    for flag in ["--listen", "--admin-listen"] {
        let out = Command::new(BIN)
            .args([flag, "localhost", "check"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{flag}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(flag),
            "{flag}"
        );
    }
}

#[test]
fn config_from_the_environment_variable() {
    let file = write_temp_config("heartbeat:\n  bogus: 1\n");
    let out = Command::new(BIN)
        .arg("check")
        .env("WSBEAT_CONFIG", file.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus"));
}

#[test]
fn check_shows_which_route_each_path_maps_to() {
    let file = write_temp_config(
        "routes:\n  - { name: chat, path: /ws/chat, upstream: { url: 'ws://chat:8000' } }\n  \
         - { path: /ws, upstream: { url: 'ws://ws:8000' } }\n",
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(file.path())
        .args(["--route", "/ws/chat/1", "--route", "/ws/chatroom?x=1"])
        .args(["--route", "/ws", "--route", "/index.html"])
        .args(["--route", "//ws/%63hat/../chat/2", "--route", "/ws%2Fchat"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mapping: Vec<&str> = stdout.lines().filter(|l| l.starts_with("# /")).collect();
    assert_eq!(
        mapping,
        [
            "# /ws/chat/1 -> route `chat` (prefix /ws/chat, upstream ws://chat:8000)",
            "# /ws/chatroom?x=1 -> route `/ws` (prefix /ws, upstream ws://ws:8000)",
            "# /ws -> route `/ws` (prefix /ws, upstream ws://ws:8000)",
            "# /index.html -> route `default` (prefix /, upstream ws://127.0.0.1:8000)",
            "# //ws/%63hat/../chat/2 -> route `chat` (prefix /ws/chat, upstream ws://chat:8000)",
            "# /ws%2Fchat -> 400 (the path holds an encoded '/' (%2F))",
        ]
    );
    // Still a valid config file.
    Config::from_yaml(&stdout, "check output").unwrap();
}

#[test]
fn check_prints_the_effective_config() {
    let file =
        write_temp_config("upstream:\n  url: ws://10.0.0.5:8000\nheartbeat:\n  interval: 2s\n");
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(file.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let yaml = String::from_utf8(out.stdout).unwrap();
    let effective = Config::from_yaml(&yaml, "check output").unwrap();
    assert_eq!(effective.upstream.url.to_string(), "ws://10.0.0.5:8000");
    assert_eq!(effective.heartbeat.interval, ms(2000));
    assert_eq!(effective.liveness, Config::default().liveness);
    assert!(yaml.contains("pool_idle_timeout: 4s"), "{yaml}");
}

#[test]
fn the_example_config_is_valid_and_states_the_defaults() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/wsbeat.yaml");
    let example = Config::load(std::path::Path::new(path)).unwrap();
    assert_eq!(
        example,
        Config::default(),
        "config/wsbeat.yaml must state every default"
    );
    let out = Command::new(BIN)
        .args(["check", "--config", path])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn sigterm_closes_websockets_with_1001_and_exits() {
    let mut backend = Backend::echo().await;
    let mut running = WsbeatProcess::start(backend.addr, "");
    let mut client = connect(&format!("ws://{}/", running.addr)).await;
    echo_roundtrip(&mut client, Message::text("before the signal")).await;
    signal(running.child.id(), "TERM");
    let frame = recv_close(&mut client).await.expect("close frame");
    assert_eq!(frame.code, CloseCode::Away);
    backend
        .expect_message(Message::text("before the signal"))
        .await;
    backend.expect_close(CloseCode::Away).await;
    drop(client);
    let status = tokio::task::spawn_blocking(move || running.child.wait().unwrap());
    let status = tokio::time::timeout(PATIENCE, status)
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[ignore = "needs Python websockets: python3 -m pip install 'websockets>=12'"]
#[tokio::test]
async fn python_websockets_client_through_wsbeat() {
    let mut backend = Backend::echo().await;
    // A short heartbeat interval, from a config file.
    let running = WsbeatProcess::start(backend.addr, "heartbeat: { interval: 200ms }");
    let url = format!("ws://{}/py", running.addr);
    python_client(&[&url, "--heartbeat--"]).await;
    // The backend saw the data and the close code, never the heartbeat.
    let mut seen = Vec::new();
    loop {
        match backend.next_after_handshake().await {
            Seen::Message { msg, .. } => seen.push(msg),
            Seen::Closed { frame, .. } => {
                assert_eq!(frame.unwrap().code, CloseCode::Library(4002));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        seen,
        vec![
            Message::text("hello from python"),
            Message::binary(b"\x00\x01binary".to_vec())
        ]
    );
}

#[tokio::test]
async fn demo_echoes_and_beats() {
    let mut child = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let url = loop {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "demo exited early"
        );
        if line.contains("wsbeat in front of it") {
            break line.split_whitespace().last().unwrap().to_owned();
        }
    };
    let mut client = connect(&url).await;
    echo_roundtrip(&mut client, Message::text("hi demo")).await;
    signal(child.id(), "INT");
    let frame = recv_close(&mut client).await.expect("close frame");
    assert_eq!(frame.code, CloseCode::Away);
    drop(client);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap());
    assert!(tokio::time::timeout(PATIENCE, status)
        .await
        .unwrap()
        .unwrap()
        .success());
}

#[tokio::test]
async fn json_logs_a_line_per_closed_websocket_and_readyz_turns_503_on_sigterm() {
    let backend = Backend::echo().await;
    let upstream = format!("ws://{}", backend.addr);
    let mut wsbeat = JsonWsbeat::spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    let public = wsbeat.addr("listening");
    let admin = wsbeat.addr("admin listening");

    // One WebSocket, closed normally by the client: one line with its facts.
    let mut client = connect(&format!("ws://{public}/")).await;
    echo_roundtrip(&mut client, Message::text("hello")).await;
    client.close(None).await.unwrap();
    while futures_util::StreamExt::next(&mut client).await.is_some() {}
    let closed = wsbeat.next("websocket closed");
    assert_eq!(closed["level"], "INFO");
    assert_eq!(closed["route"], "default");
    assert_eq!(closed["outcome"], "client_close");
    assert_eq!(closed["client_close"], 1005, "{closed}");
    assert_eq!(closed["upstream_close"], 1005, "{closed}");
    assert!(closed["id"].is_u64(), "{closed}");
    assert!(closed["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(closed["duration_s"].as_f64().unwrap() >= 0.0);
    assert_eq!(closed["heartbeats_sent"], 0);

    // A client that never reads keeps the drain waiting for its close reply, so the
    // admin listener is still up: /readyz must answer 503 once SIGTERM is in.
    let _silent = raw_websocket(public, "/").await;
    let readyz = "GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n";
    assert!(raw_http(admin, readyz).await.starts_with("HTTP/1.1 200"));
    wsbeat.signal("TERM");
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let resp = raw_http(admin, readyz).await;
        if resp.starts_with("HTTP/1.1 503") {
            break;
        }
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz never turned 503"
        );
        tokio::task::yield_now().await;
    }
    let status = wsbeat.exit_status(PATIENCE).await;
    assert!(status.success(), "{status:?}");
}

/// Worker threads of a running wsbeat, named `wsbeat-worker`. No connection is made, so
/// no blocking-pool thread (also named so: a DNS lookup runs there) exists.
fn runtime_workers(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == "wsbeat-worker")
        .count()
}

#[tokio::test]
async fn runtime_workers_sets_the_worker_threads_and_null_means_one_per_core() {
    let cores = std::thread::available_parallelism().unwrap().get();
    for (yaml, want) in [
        ("runtime: { workers: 1 }\n", 1),
        ("runtime: { workers: 3 }\n", 3),
        ("runtime: { workers: null }\n", cores),
    ] {
        let config = write_temp_config(&format!(
            "listen: 127.0.0.1:0\nadmin: {{ listen: null }}\n{yaml}"
        ));
        let mut wsbeat = JsonWsbeat::spawn(&["--config", config.path()]);
        wsbeat.addr("listening");
        assert_eq!(
            wsbeat.next("runtime worker threads")["workers"],
            want,
            "{yaml}"
        );
        assert_eq!(runtime_workers(wsbeat.child.id()), want, "{yaml}");
    }
}
