//! Closes spread over time (issue 17, DESIGN §1.6), with the real binary and real
//! signals: `shutdown.close_spread` spaces the drain's close frames evenly, and
//! `limits.max_connection_age` drains each WebSocket at its (jittered) age. Both close the
//! way a drain does: the client first, every message accounted for.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::drain::{numbered_backend, peer, Tally};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// wsbeat in front of the numbered backend, with busy WebSockets through it.
struct Busy {
    wsbeat: JsonWsbeat,
    connections: usize,
    /// Per connection: when the client's handshake completed, and its peer task.
    clients: Vec<(Instant, JoinHandle<Tally>)>,
    backend_tallies: mpsc::UnboundedReceiver<(usize, Tally)>,
    warm: mpsc::UnboundedReceiver<()>,
    _config: TempConfig,
}

impl Busy {
    async fn start(connections: usize, yaml: &str) -> Busy {
        let (warm_tx, warm) = mpsc::unbounded_channel();
        let (backend, backend_tallies) = numbered_backend(warm_tx.clone()).await;
        let config = write_temp_config(&format!(
            "upstream: {{ url: 'ws://{backend}' }}\nheartbeat: {{ message: null }}\n{yaml}"
        ));
        let mut wsbeat = JsonWsbeat::spawn(&[
            "--config",
            config.path(),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "off",
        ]);
        let public = wsbeat.addr("listening");
        let mut clients = Vec::new();
        for idx in 0..connections {
            let url = format!("ws://{public}/conn/{idx}");
            let (ws, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
                .await
                .expect("connected in time")
                .unwrap();
            // connect_async returns once the 101 is read: the client's upgrade is done.
            let upgraded = Instant::now();
            let warm = warm_tx.clone();
            clients.push((
                upgraded,
                tokio::spawn(async move { peer(ws, "c", "u", warm).await }),
            ));
        }
        Busy {
            wsbeat,
            connections,
            clients,
            backend_tallies,
            warm,
            _config: config,
        }
    }

    /// Waits until traffic has flowed both ways on every connection.
    async fn warmed(&mut self) {
        for _ in 0..2 * self.connections {
            tokio::time::timeout(PATIENCE, self.warm.recv())
                .await
                .expect("every connection warmed up in time");
        }
    }

    /// Waits for every connection to end; checks that nothing was lost and that each
    /// ended with `outcome` and 1001 on both legs. Returns, per connection, when the
    /// client's handshake completed and when its close frame arrived.
    async fn ended(&mut self, outcome: &str) -> Vec<(Instant, Instant)> {
        let mut client_tallies = Vec::new();
        for (upgraded, client) in self.clients.drain(..) {
            let tally = tokio::time::timeout(PATIENCE, client)
                .await
                .expect("client done")
                .unwrap();
            client_tallies.push((upgraded, tally));
        }
        let mut upstream_tallies = HashMap::new();
        while upstream_tallies.len() < self.connections {
            let (idx, tally) = tokio::time::timeout(PATIENCE, self.backend_tallies.recv())
                .await
                .expect("backend connection done")
                .unwrap();
            upstream_tallies.insert(idx, tally);
        }
        let (mut dropped_to_client, mut dropped_to_upstream) = (0, 0);
        for _ in 0..self.connections {
            let line = self.wsbeat.next("websocket closed");
            assert_eq!(line["outcome"], outcome, "{line}");
            assert_eq!(line["client_close"], 1001, "{line}");
            assert_eq!(line["upstream_close"], 1001, "{line}");
            dropped_to_client += line["dropped_to_client"].as_u64().unwrap();
            dropped_to_upstream += line["dropped_to_upstream"].as_u64().unwrap();
        }
        let (mut unsent, mut to_upstream) = (0, 0);
        let mut times = Vec::new();
        for (idx, (upgraded, c)) in client_tallies.iter().enumerate() {
            let u = &upstream_tallies[&idx];
            assert_eq!(c.close_code, Some(1001), "client {idx}");
            assert_eq!(u.close_code, Some(1001), "backend connection {idx}");
            assert!(c.sent >= 3, "connection {idx} carried traffic: {c:?}");
            // Client to upstream: everything, exactly (the client is closed first, and
            // its messages keep flowing until it answers).
            assert_eq!(u.received, c.sent, "connection {idx}: client messages lost");
            // Upstream to client: a gap-free prefix (checked by `peer`); the rest crossed
            // the client's close, and wsbeat counted each one.
            assert!(c.received <= u.sent, "connection {idx}");
            unsent += u.sent - c.received;
            to_upstream += u.received;
            times.push((*upgraded, c.closed_at.expect("a close frame")));
        }
        assert_eq!(dropped_to_upstream, 0);
        assert_eq!(
            unsent, dropped_to_client,
            "every backend message wsbeat did not deliver is one it read after the client's close"
        );
        println!(
            "{outcome}: {} connections, {to_upstream} messages to upstream, \
             {dropped_to_client} crossed the client's close",
            self.connections
        );
        times
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_spread_spaces_the_drains_close_frames_evenly_and_loses_nothing() {
    let spread = Duration::from_secs(2);
    let drain_timeout = Duration::from_secs(8);
    // 100 connections: one close every 20 ms.
    let mut busy = Busy::start(
        100,
        &format!(
            "shutdown: {{ drain_timeout: {}s, close_spread: {}s }}\n",
            drain_timeout.as_secs(),
            spread.as_secs()
        ),
    )
    .await;
    busy.warmed().await;
    busy.wsbeat.signal("TERM");
    let signalled = Instant::now();
    let mut closes: Vec<Duration> = busy
        .ended("shutdown")
        .await
        .into_iter()
        .map(|(_, closed)| closed - signalled)
        .collect();
    closes.sort();
    let (first, last) = (closes[0], closes[closes.len() - 1]);
    // Evenly: one close every 20 ms; a quarter of them in each quarter of the spread.
    let quarters: Vec<usize> = (0..4)
        .map(|q| {
            let from = first + spread * q / 4;
            let to = if q == 3 {
                last
            } else {
                first + spread * (q + 1) / 4
            };
            closes
                .iter()
                .filter(|&&c| c >= from && (c < to || (q == 3 && c == to)))
                .count()
        })
        .collect();
    println!(
        "close_spread {spread:?}: first close {first:?} after the signal, last {last:?}, \
         by quarter {quarters:?}"
    );
    assert!(
        first < Duration::from_millis(500),
        "the first close came {first:?} after the signal"
    );
    assert!(
        last - first >= Duration::from_millis(1500),
        "closes spread over {:?} only",
        last - first
    );
    assert!(
        last - first <= spread + Duration::from_millis(500),
        "closes spread over {:?}",
        last - first
    );
    for (q, n) in quarters.iter().enumerate() {
        assert!(
            (15..=35).contains(n),
            "quarter {q}: {n} closes: {quarters:?}"
        );
    }
    let status = busy.wsbeat.exit_status(drain_timeout).await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connection_age_drains_each_connection_within_ten_percent_of_its_age() {
    let age = Duration::from_secs(1);
    let mut busy = Busy::start(30, "limits: { max_connection_age: 1s }\n").await;
    let ages: Vec<Duration> = busy
        .ended("max_age")
        .await
        .into_iter()
        .map(|(upgraded, closed)| closed - upgraded)
        .collect();
    let (min, max) = (
        ages.iter().min().copied().unwrap(),
        ages.iter().max().copied().unwrap(),
    );
    let mean = ages.iter().sum::<Duration>() / ages.len() as u32;
    println!("max_connection_age {age:?}: closed at ages {min:?} to {max:?}, mean {mean:?}");
    for (idx, a) in ages.iter().enumerate() {
        assert!(
            *a >= age.mul_f64(0.9) && *a <= age.mul_f64(1.1),
            "connection {idx} closed at age {a:?} (all: {min:?} to {max:?})"
        );
    }
    // Jittered: not all at the same age.
    assert!(
        max - min >= Duration::from_millis(50),
        "ages {min:?} to {max:?}: no jitter"
    );
    // The process keeps serving; nothing is left to drain.
    busy.wsbeat.signal("TERM");
    let status = busy.wsbeat.exit_status(PATIENCE).await;
    assert!(status.success(), "{status:?}");
}
