//! A real HAProxy (`mode http`, `option forwardfor`, `X-Forwarded-Proto: https`) in front
//! of wsbeat: what the backend sees, and who `/connections` says the client is, with
//! HAProxy's address trusted and not.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use wsbeat::config::{Cidr, Config};

use crate::common::*;
use crate::trust::client_addrs;

const NEEDS: &str = "needs HAProxy: apt-get install haproxy";

/// HAProxy in `mode http` in front of `wsbeat`, as a TLS-terminating load balancer
/// configures it. It listens on a socket this test bound itself (`bind fd@N`), so there
/// is no port to guess and nothing to wait for: connections queue until it accepts.
struct Haproxy {
    child: Child,
    addr: SocketAddr,
    _config: TempConfig,
}

impl Haproxy {
    fn start(wsbeat: SocketAddr) -> Haproxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // HAProxy inherits the listening socket under the same descriptor number.
        fcntl(&listener, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
        let config = write_temp_config(&format!(
            "global\n  nbthread 1\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  \
             timeout server 30s\n  timeout tunnel 30s\n\
             frontend lb\n  bind fd@{fd}\n  option forwardfor\n  \
             http-request set-header X-Forwarded-Proto https\n  default_backend wsbeat\n\
             backend wsbeat\n  server wsbeat {wsbeat}\n",
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
            .unwrap_or_else(|e| panic!("{NEEDS}: {e}"));
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

/// A raw request sent from `from` (any 127.0.0.0/8 address is local on Linux) to `to`;
/// returns the socket and the response head.
async fn request_from(from: &str, to: SocketAddr, request: &str) -> (TcpStream, String) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = tokio::time::timeout(PATIENCE, socket.connect(to))
        .await
        .expect("connected in time")
        .unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let head = tokio::time::timeout(PATIENCE, read_head(&mut s))
        .await
        .expect("a response head in time")
        .expect("a whole response head");
    (s, String::from_utf8(head).unwrap())
}

fn trusting(list: &'static [&'static str]) -> impl FnOnce(&mut Config) {
    move |c| c.trusted_proxies = list.iter().map(|s| s.parse::<Cidr>().unwrap()).collect()
}

const SPOOFED: &str = "X-Forwarded-For: 203.0.113.7\r\nX-Real-IP: 198.51.100.1\r\n\
                       Forwarded: for=198.51.100.1;proto=https\r\n";

#[tokio::test]
#[ignore = "needs HAProxy: apt-get install haproxy"]
async fn behind_a_trusted_haproxy_the_backend_sees_https_and_the_real_client() {
    let (upstream, mut received) = raw_upstream(RawAnswer::Accept).await;
    // Only HAProxy's own address (it connects from 127.0.0.1) is trusted; the client
    // connects from 127.0.0.2 and claims to be 203.0.113.7.
    let proxy = Proxy::start(upstream, trusting(&["127.0.0.1"])).await;
    let lb = Haproxy::start(proxy.addr);
    let upgrade = format!(
        "GET /ws HTTP/1.1\r\nHost: app.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{SPOOFED}\r\n"
    );
    let (socket, answer) = request_from("127.0.0.2", lb.addr, &upgrade).await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    assert_eq!(client_addrs(proxy.admin, 1).await, ["127.0.0.2"]);
    drop(socket);
    let head = String::from_utf8(next_received(&mut received).await.head).unwrap();
    assert_eq!(
        head_field(&head, "x-forwarded-proto"),
        Some("https"),
        "{head}"
    );
    assert_eq!(
        head_field(&head, "x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.2, 127.0.0.1"),
        "{head}"
    );
    // Trusted: what came through HAProxy is passed on (HAProxy does not clean these).
    assert_eq!(
        head_field(&head, "x-real-ip"),
        Some("198.51.100.1"),
        "{head}"
    );
    drop(lb);
    proxy.stop().await;
}

#[tokio::test]
#[ignore = "needs HAProxy: apt-get install haproxy"]
async fn behind_an_untrusted_haproxy_the_backend_sees_only_what_wsbeat_saw() {
    let (upstream, mut received) = raw_upstream(RawAnswer::Refuse).await;
    let proxy = Proxy::start(upstream, trusting(&["10.0.0.0/8"])).await;
    let lb = Haproxy::start(proxy.addr);
    let request =
        format!("GET /api HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n{SPOOFED}\r\n");
    let (_socket, answer) = request_from("127.0.0.2", lb.addr, &request).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    let head = String::from_utf8(next_received(&mut received).await.head).unwrap();
    for (name, value) in [
        ("x-forwarded-proto", "http"),
        ("x-forwarded-for", "203.0.113.7, 127.0.0.2, 127.0.0.1"),
        ("x-real-ip", "127.0.0.1"),
        ("forwarded", "for=127.0.0.1;proto=http;host=app.example"),
    ] {
        assert_eq!(head_field(&head, name), Some(value), "{head}");
    }
    drop(lb);
    proxy.stop().await;
}
