//! A real HAProxy in front of wsbeat (Debian's `haproxy`), and clients that connect from
//! an address of their own in 127.0.0.0/8, so that only what the load balancer says can
//! tell wsbeat who they are.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

use super::{read_head, write_temp_config, TempConfig, PATIENCE};

/// HAProxy in front of `wsbeat`; killed when dropped. It listens on a socket the test
/// bound itself (`bind fd@N`), so there is no port to guess and nothing to wait for:
/// connections queue until it accepts.
pub struct Haproxy {
    child: Child,
    pub addr: SocketAddr,
    _config: TempConfig,
}

impl Haproxy {
    /// `mode` is `http` or `tcp`; `frontend` holds extra frontend lines (each ending in a
    /// newline); `server` extra options of the wsbeat server line (`send-proxy-v2`).
    pub fn start(wsbeat: SocketAddr, mode: &str, frontend: &str, server: &str) -> Haproxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // HAProxy inherits the listening socket under the same descriptor number.
        fcntl(&listener, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
        let config = write_temp_config(&format!(
            "global\n  nbthread 1\n\
             defaults\n  mode {mode}\n  timeout connect 5s\n  timeout client 30s\n  \
             timeout server 30s\n  timeout tunnel 30s\n\
             frontend lb\n  bind fd@{fd}\n{frontend}  default_backend wsbeat\n\
             backend wsbeat\n  server wsbeat {wsbeat} {server}\n",
            fd = listener.as_raw_fd()
        ));
        let binary = if std::path::Path::new("/usr/sbin/haproxy").exists() {
            "/usr/sbin/haproxy"
        } else {
            "haproxy"
        };
        let child = Command::new(binary)
            .args(["-db", "-f", config.path()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("needs HAProxy: apt-get install haproxy: {e}"));
        Haproxy {
            child,
            addr,
            _config: config,
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects from `from` (any 127.0.0.0/8 address is local on Linux) to `to`, sends
/// `request` as it is, and reads the response head; returns the socket and the head.
pub async fn request_from(from: &str, to: SocketAddr, request: &[u8]) -> (TcpStream, String) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = tokio::time::timeout(PATIENCE, socket.connect(to))
        .await
        .expect("connected in time")
        .unwrap();
    s.write_all(request).await.unwrap();
    let head = tokio::time::timeout(PATIENCE, read_head(&mut s))
        .await
        .expect("a response head in time")
        .expect("a whole response head");
    (s, String::from_utf8(head).unwrap())
}

/// The `client_addr` of every live WebSocket in `/connections`, sorted, once there are
/// `count` of them (a WebSocket is listed just after its 101 goes out); polled, at most
/// PATIENCE.
pub async fn client_addrs(admin: SocketAddr, count: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let r = super::get(admin, "/connections").await;
        assert_eq!(r.status, 200, "{}", r.text());
        let list: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        let mut addrs: Vec<String> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["client_addr"].as_str().unwrap().to_owned())
            .collect();
        if addrs.len() == count || std::time::Instant::now() > deadline {
            addrs.sort();
            return addrs;
        }
        // The retry interval of a poll bounded by PATIENCE, not a synchronisation.
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
