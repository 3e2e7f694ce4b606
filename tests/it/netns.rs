//! Vanished clients, for real: 1,000 clients in a network namespace of their own lose
//! their link (no FIN, no RST: their packets simply stop), and wsbeat must find every one
//! dead by its PINGs and close its upstream leg in time, while other clients flow on.
//!
//! Needs root and `ip` (iproute2), as CI has; fails loudly without them. The test makes
//! two namespaces joined by a veth pair, named per run and deleted on drop; all traffic
//! stays inside them and on the test's own loopback.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpSocket;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const VANISHING: usize = 1000;
const STAYING: usize = 20;
const HANDSHAKES_IN_FLIGHT: usize = 16;
const PING_INTERVAL: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(2);
/// The bound: every vanished client detected and its upstream closed within
/// ping_interval + timeout + 1 s of the drop.
const DETECTION_BOUND: Duration = Duration::from_secs(1 + 2 + 1);
/// Namespace names start with this, then the test process id.
const PREFIX: &str = "wsbt-";
pub(crate) const SERVER_IP: [u8; 4] = [10, 213, 0, 1];

/// Runs `ip ARGS`, panicking with its output when it fails.
pub(crate) fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (install iproute2; CI does): {e}"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub(crate) fn assert_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .expect("an effective uid");
    assert_eq!(
        euid, "0",
        "tests/netns.rs makes network namespaces and needs root (CI runs as root)"
    );
}

/// A named network namespace, deleted when dropped (also when the test fails).
pub(crate) struct Netns {
    pub(crate) name: String,
}

impl Netns {
    fn create(role: &str) -> Netns {
        // Numbered: tests in one process may each make their own.
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{role}{n}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it creates belong
    /// to the namespace for their whole life, whichever thread uses them later.
    pub(crate) fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("setns into the test's namespace");
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// Two namespaces joined by a veth pair: the server's (`SERVER_IP`, `veth-srv`) and the
/// clients' (`veth-cli`, whose link a test sets down).
pub(crate) fn veth_pair() -> (Netns, Netns) {
    let server_ns = Netns::create("srv");
    let client_ns = Netns::create("cli");
    ip(&[
        "-n",
        &server_ns.name,
        "link",
        "add",
        "veth-srv",
        "type",
        "veth",
        "peer",
        "name",
        "veth-cli",
        "netns",
        &client_ns.name,
    ]);
    ip(&[
        "-n",
        &server_ns.name,
        "addr",
        "add",
        "10.213.0.1/24",
        "dev",
        "veth-srv",
    ]);
    ip(&[
        "-n",
        &client_ns.name,
        "addr",
        "add",
        "10.213.0.2/24",
        "dev",
        "veth-cli",
    ]);
    ip(&["-n", &server_ns.name, "link", "set", "veth-srv", "up"]);
    ip(&["-n", &client_ns.name, "link", "set", "veth-cli", "up"]);
    (server_ns, client_ns)
}

/// Deletes namespaces left by earlier runs that were killed before their guards ran.
pub(crate) fn sweep_stale_namespaces() {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "delete", name]).status();
        }
    }
}

/// Raises the soft open-files limit to the hard one if it is below `need`.
pub(crate) fn ensure_open_files(need: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < need {
        assert!(
            hard >= need,
            "open-files hard limit {hard} is below the {need} this test needs"
        );
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
}

/// A client socket created inside `ns`, connected through wsbeat's handshake.
async fn connect_from(socket: TcpSocket, server: SocketAddr, path: &str) -> Client {
    let stream = tokio::time::timeout(PATIENCE, socket.connect(server))
        .await
        .expect("TCP connect in time")
        .expect("TCP connect");
    let url = format!("ws://{server}{path}");
    let (ws, _) = tokio::time::timeout(
        PATIENCE,
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream)),
    )
    .await
    .expect("handshake in time")
    .expect("handshake through wsbeat");
    ws
}

pub(crate) fn sockets_in(ns: &Netns, n: usize) -> Vec<TcpSocket> {
    ns.enter(move || (0..n).map(|_| TcpSocket::new_v4().unwrap()).collect())
}

/// What a staying client measured: when each of its round trips completed.
struct Flow {
    completed: Vec<Instant>,
}

/// Sends a numbered message every 50 ms and waits for its echo, until `stop`.
async fn keep_flowing(mut client: Client, id: usize, stop: Arc<Notify>) -> Flow {
    let mut flow = Flow {
        completed: Vec::new(),
    };
    let mut ticker = tokio::time::interval(Duration::from_millis(50));
    let stopped = stop.notified();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            _ = ticker.tick() => {}
        }
        let msg = Message::text(format!("stay {id} {}", flow.completed.len()));
        client
            .send(msg.clone())
            .await
            .expect("a staying client can send");
        assert_eq!(recv_data(&mut client, "--heartbeat--").await, msg);
        flow.completed.push(Instant::now());
    }
    client.close(None).await.unwrap();
    flow
}

#[ignore = "needs root and iproute2: run as root; apt-get install iproute2"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_vanished_clients_are_found_dead_in_time_while_others_flow() {
    assert_root();
    sweep_stale_namespaces();
    // Test side: 1,020 clients, 1,020 backend sockets; wsbeat: 2,040; plus spare.
    ensure_open_files(6000);

    let (server_ns, client_ns) = veth_pair();

    // wsbeat listens inside the server namespace; its upstream leg and admin listener are
    // on the test's loopback, where the backend is.
    let mut backend = Backend::echo().await;
    let listen = server_ns.enter(|| {
        let s = TcpSocket::new_v4().unwrap();
        s.set_reuseaddr(true).unwrap();
        s.bind(SocketAddr::from((SERVER_IP, 0))).unwrap();
        s
    });
    let listener = listen.listen(2048).unwrap();
    let server = listener.local_addr().unwrap();
    let proxy = Proxy::start_on(listener, backend.addr, |c| {
        c.liveness.ping_interval = ms(PING_INTERVAL.as_millis() as u64);
        c.liveness.timeout = ms(TIMEOUT.as_millis() as u64);
        c.heartbeat.interval = ms(1000);
    })
    .await;

    // The vanishing clients, from the client namespace, over the veth pair. Each is read
    // by a task, so it answers PINGs until its link goes.
    // Each task reads from the moment its handshake is done. Few handshakes at once, so
    // that the PINGs of the clients already connected are not answered late behind a
    // deep run queue of handshakes on a loaded machine.
    let handshaking = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_IN_FLIGHT));
    let (connected_tx, mut connected) = tokio::sync::mpsc::unbounded_channel();
    let mut readers = JoinSet::new();
    for (i, socket) in sockets_in(&client_ns, VANISHING).into_iter().enumerate() {
        let permit = handshaking.clone().acquire_owned().await.unwrap();
        let connected_tx = connected_tx.clone();
        readers.spawn(async move {
            let mut client = connect_from(socket, server, &format!("/vanish/{i}")).await;
            drop(permit);
            let _ = connected_tx.send(());
            while let Some(Ok(_)) = client.next().await {}
        });
    }
    for _ in 0..VANISHING {
        tokio::time::timeout(PATIENCE, connected.recv())
            .await
            .expect("every vanishing client connects in time")
            .expect("a reader task panicked while connecting");
    }
    assert_eq!(readers.len(), VANISHING);

    // The staying clients: inside the server namespace, so their path never crosses
    // the link that goes down.
    let stop = Arc::new(Notify::new());
    let mut staying = JoinSet::new();
    for (i, socket) in sockets_in(&server_ns, STAYING).into_iter().enumerate() {
        let client = connect_from(socket, server, &format!("/stay/{i}")).await;
        staying.spawn(keep_flowing(client, i, stop.clone()));
    }

    // The backend has every handshake; which connection is which, by path.
    let mut vanishing_conns = BTreeSet::new();
    let mut handshakes_seen = 0;
    while handshakes_seen < VANISHING + STAYING {
        match backend.next().await {
            Seen::Handshake { conn, path, .. } => {
                handshakes_seen += 1;
                if path.starts_with("/vanish/") {
                    vanishing_conns.insert(conn);
                }
            }
            Seen::Message { .. } => {}
            other => panic!("before the drop the backend saw {other:?}"),
        }
    }
    assert_eq!(vanishing_conns.len(), VANISHING);

    // The link goes down in the client namespace: from now on the vanishing clients'
    // packets are lost in both directions, with no FIN and no RST.
    ip(&["-n", &client_ns.name, "link", "set", "veth-cli", "down"]);
    let dropped = Instant::now();

    let mut closed: BTreeMap<usize, Duration> = BTreeMap::new();
    while closed.len() < VANISHING {
        let event =
            tokio::time::timeout(DETECTION_BOUND + PATIENCE, backend.next_after_handshake())
                .await
                .expect("the backend hears of every vanished client");
        match event {
            Seen::Message { .. } => {}
            Seen::Closed { conn, frame } if vanishing_conns.contains(&conn) => {
                assert_eq!(frame.map(|f| f.code), Some(CloseCode::Away), "conn {conn}");
                assert!(
                    closed.insert(conn, dropped.elapsed()).is_none(),
                    "conn {conn} twice"
                );
            }
            other => panic!("after the drop the backend saw {other:?}"),
        }
    }
    let last = closed.values().max().copied().unwrap();
    let first = closed.values().min().copied().unwrap();
    eprintln!(
        "FIGURES netns: {VANISHING} vanished clients' upstream legs closed between {first:?} and {last:?} after the drop"
    );
    assert!(
        last <= DETECTION_BOUND,
        "the last upstream leg closed {last:?} after the drop (bound {DETECTION_BOUND:?})"
    );

    // Counted as liveness timeouts of the client leg, and as client_dead connections.
    let d = ("route", "default");
    let client_leg = [d, ("leg", "client")];
    let timeouts = "wsbeat_liveness_timeouts_total";
    assert_eq!(
        metric(proxy.admin, timeouts, &client_leg).await,
        VANISHING as f64
    );
    metric_at_least(
        proxy.admin,
        "wsbeat_connections_total",
        &[d, ("outcome", "client_dead")],
        VANISHING as f64,
        PATIENCE,
    )
    .await;

    // The staying clients flowed all along: from the drop to now, none of them went a
    // liveness timeout without an echo.
    stop.notify_waiters();
    let end = Instant::now();
    while let Some(flow) = staying.join_next().await {
        let flow = flow.unwrap();
        let mut marks: Vec<Instant> = vec![dropped];
        marks.extend(
            flow.completed
                .iter()
                .filter(|t| **t > dropped && **t <= end),
        );
        marks.push(end);
        let gap = marks.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        assert!(
            gap < TIMEOUT,
            "a staying client had no echo for {gap:?} ({} round trips since the drop)",
            marks.len() - 2
        );
    }
    assert_eq!(
        metric(proxy.admin, timeouts, &client_leg).await,
        VANISHING as f64,
        "a staying client was declared dead"
    );
    readers.abort_all();
}
