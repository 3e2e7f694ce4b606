//! The real `wsbeat` binary as a child process (for signals, RSS, logs and "the process
//! stays up" checks), single samples from `/metrics`, and the Python client.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::{raw_http, PATIENCE};

/// Sends signal `sig` (`TERM`, `INT`, `HUP`, `STOP`, `CONT` …) to process `pid`.
pub fn signal(pid: u32, sig: &str) {
    let signal: Signal = format!("SIG{sig}")
        .parse()
        .unwrap_or_else(|e| panic!("signal {sig}: {e}"));
    let pid = Pid::from_raw(i32::try_from(pid).expect("a pid fits in i32"));
    nix::sys::signal::kill(pid, signal).unwrap_or_else(|e| panic!("kill -{sig} {pid}: {e}"));
}

/// The `wsbeat` binary cargo built for these tests.
pub const WSBEAT_BIN: &str = env!("CARGO_BIN_EXE_wsbeat");

/// A `wsbeat` child process on 127.0.0.1:0 with its admin listener on 127.0.0.1:0; killed
/// when dropped, its config file removed.
pub struct WsbeatProcess {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// Removed when the process is dropped.
    _config: TempConfig,
}

impl WsbeatProcess {
    /// Starts the binary in front of `upstream`; `extra_yaml` adds top-level keys
    /// (e.g. `"limits: { write_timeout: 1s }"`). Returns once both listeners are up.
    pub fn start(upstream: SocketAddr, extra_yaml: &str) -> WsbeatProcess {
        WsbeatProcess::start_bin(WSBEAT_BIN, upstream, extra_yaml)
    }

    /// Like `start`, with the binary at `bin` (e.g. a release build, for measurements).
    pub fn start_bin(bin: &str, upstream: SocketAddr, extra_yaml: &str) -> WsbeatProcess {
        let config = write_temp_config(&format!(
            "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\n\
             upstream: {{ url: \"ws://{upstream}\" }}\n{extra_yaml}\n"
        ));
        let mut child = std::process::Command::new(bin)
            .arg("--config")
            .arg(config.path())
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the wsbeat binary starts");
        let mut log = std::io::BufReader::new(child.stderr.take().unwrap());
        let (mut addr, mut admin) = (None, None);
        while addr.is_none() || admin.is_none() {
            let mut line = String::new();
            let n = log.read_line(&mut line).unwrap();
            assert!(n > 0, "wsbeat exited before listening ({})", config.path());
            let Some(at) = line
                .split("addr=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.parse::<SocketAddr>().ok())
            else {
                continue;
            };
            if line.contains("admin listening") {
                admin = Some(at);
            } else if line.contains("listening") {
                addr = Some(at);
            }
        }
        // Keep draining the log so the process never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut log, &mut std::io::sink()));
        WsbeatProcess {
            child,
            addr: addr.unwrap(),
            admin: admin.unwrap(),
            _config: config,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Resident set size in KiB, from /proc/PID/status.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("wsbeat is running");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Panics if the process has exited.
    pub fn assert_running(&mut self) {
        let status = self.child.try_wait().unwrap();
        assert!(status.is_none(), "wsbeat exited: {status:?}");
    }
}

/// A `wsbeat` process started with `--log-format json`, its log lines handed over as
/// parsed JSON as they come (a line that is not JSON fails the test). Killed when dropped.
pub struct JsonWsbeat {
    pub child: Child,
    pub lines: std::sync::mpsc::Receiver<serde_json::Value>,
}

impl Drop for JsonWsbeat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl JsonWsbeat {
    pub fn spawn(args: &[&str]) -> JsonWsbeat {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wsbeat"))
            .args(args)
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let value: serde_json::Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        JsonWsbeat { child, lines }
    }

    /// The next log line whose message is `message` (earlier lines are skipped).
    pub fn next(&mut self, message: &str) -> serde_json::Value {
        let mut skipped = Vec::new();
        loop {
            match self.lines.recv_timeout(PATIENCE) {
                Ok(v) if v["message"] == message => return v,
                Ok(v) => skipped.push(v),
                Err(e) => panic!(
                    "no log line {message:?} ({e}); wsbeat: {:?}; lines seen: {skipped:?}",
                    self.child.try_wait()
                ),
            }
        }
    }

    /// The address logged by the next line saying `message` ("listening", "admin listening").
    pub fn addr(&mut self, message: &str) -> SocketAddr {
        self.next(message)["addr"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Waits for the process to exit, at most `patience`.
    pub async fn exit_status(mut self, patience: Duration) -> std::process::ExitStatus {
        let status = tokio::task::spawn_blocking(move || self.child.wait().unwrap());
        tokio::time::timeout(patience, status)
            .await
            .expect("wsbeat exited in time")
            .unwrap()
    }

    /// Sends a signal (`TERM`, `INT`, `STOP` …).
    pub fn signal(&self, sig: &str) {
        signal(self.child.id(), sig);
    }
}

/// A config file under the target directory, removed when dropped.
pub struct TempConfig(std::path::PathBuf);

impl TempConfig {
    pub fn path(&self) -> &str {
        self.0.to_str().expect("UTF-8 target directory")
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes `text` to a fresh file for `--config`.
pub fn write_temp_config(text: &str) -> TempConfig {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let name = format!(
        "config-{}-{}.yaml",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, text).unwrap();
    TempConfig(path)
}

impl Drop for WsbeatProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One sample of a `/metrics` scrape: the value of `name` with exactly these labels, 0
/// when the series is not exported. A small reader of the text format, for tests that
/// check a counter or two (tests/metrics.rs checks the format itself).
pub async fn metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let request = "GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n";
    let response = raw_http(admin, request).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let mut want: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    want.sort();
    let body = &response[response.find("\r\n\r\n").expect("a head") + 4..];
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').expect("name and value");
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let mut got: Vec<(String, String)> = series_labels
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').expect("label=value");
                (k.to_owned(), v.trim_matches('"').to_owned())
            })
            .collect();
        got.sort();
        if got == want {
            return value.parse().expect("a number");
        }
    }
    0.0
}

/// Scrapes until `name{labels}` reaches at least `at_least`; panics after `patience`.
/// Returns the value seen.
pub async fn metric_at_least(
    admin: SocketAddr,
    name: &str,
    labels: &[(&str, &str)],
    at_least: f64,
    patience: Duration,
) -> f64 {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let v = metric(admin, name, labels).await;
        if v >= at_least {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}{labels:?} is {v}, waited {patience:?} for {at_least}"
        );
        // The retry interval of a poll bounded by `patience`, not a synchronisation.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `wsbeat_close_codes_total{leg, code}`: how many legs ended with `code` (`1006`: with
/// no close frame).
pub async fn close_codes(admin: SocketAddr, leg: &str, code: &str) -> f64 {
    metric(
        admin,
        "wsbeat_close_codes_total",
        &[("leg", leg), ("code", code)],
    )
    .await
}

/// Runs tests/python/client.py (Python `websockets`, a client nobody here wrote) with
/// `args`, at most 30 s, and returns what it did.
pub async fn python_client_output(args: &[&str]) -> std::process::Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/client.py");
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3").arg(script).args(&args).output()
    });
    tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("python client done in 30 s")
        .unwrap()
        .expect("python3 runs (CI installs `websockets`)")
}

/// Runs tests/python/client.py and fails the test unless it exits 0 saying OK.
pub async fn python_client(args: &[&str]) {
    let out = python_client_output(args).await;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("OK"),
        "python client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
