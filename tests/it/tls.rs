//! TLS on both legs: `wss://` clients, `wss://` upstreams, certificate verification and
//! rotation, the handshake deadline, and bad certificate files. Certificates are made at
//! test time with rcgen.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SerialNumber,
};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{client, TlsAcceptor, TlsConnector};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;
use wsbeat::config::{Config, HumanDuration, TlsConfig};

const BIN: &str = env!("CARGO_BIN_EXE_wsbeat");
const HB: &str = "--heartbeat--";
/// Pause between two handshakes while waiting for a rotated certificate (a retry
/// interval of a bounded poll, not a synchronisation).
const RETRY: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------------------
// Certificates.

/// A test certificate authority.
pub(crate) struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    pem: String,
}

/// A certificate and its key, as PEM and DER.
pub(crate) struct Leaf {
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
    pub(crate) der: CertificateDer<'static>,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            issuer: Issuer::new(params, key),
            der: cert.der().clone(),
            pem: cert.pem(),
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses) with this serial.
    pub(crate) fn leaf(&self, names: &[&str], serial: u64) -> Leaf {
        self.leaf_with(names, serial, |_| {})
    }

    fn leaf_with(
        &self,
        names: &[&str],
        serial: u64,
        tune: impl FnOnce(&mut CertificateParams),
    ) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.serial_number = Some(SerialNumber::from(serial));
        tune(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// A client config that trusts this CA only.
    fn client_config(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// A directory under the target directory, removed when dropped.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "tls-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub(crate) fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Writes `leaf` as `tls.crt` / `tls.key`; returns the listener's TLS config.
    pub(crate) fn tls(&self, leaf: &Leaf) -> TlsConfig {
        TlsConfig {
            cert: self.write("tls.crt", &leaf.cert_pem),
            key: self.write("tls.key", &leaf.key_pem),
        }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------
// Peers.

/// Opens TLS to wsbeat as `localhost`, trusting `ca` only.
pub(crate) async fn tls_connect(
    addr: SocketAddr,
    ca: &Ca,
) -> std::io::Result<client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(
        PATIENCE,
        TlsConnector::from(ca.client_config()).connect(name, tcp),
    )
    .await
    .expect("TLS handshake in time")
}

/// The certificate the server presented.
pub(crate) fn peer_cert(tls: &client::TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// A `wss://` client through wsbeat, trusting `ca` only; with the certificate it saw.
pub(crate) async fn wss_connect(
    addr: SocketAddr,
    ca: &Ca,
    path: &str,
) -> (Client, CertificateDer<'static>) {
    let tls = tls_connect(addr, ca).await.expect("TLS handshake");
    let cert = peer_cert(&tls);
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let url = format!("wss://localhost:{}{path}", addr.port());
    let (ws, _) = tokio::time::timeout(
        PATIENCE,
        tokio_tungstenite::client_async(url, MaybeTlsStream::Rustls(tls)),
    )
    .await
    .expect("WebSocket handshake in time")
    .expect("WebSocket handshake through wsbeat");
    (ws, cert)
}

/// A `wss://` echo backend on 127.0.0.1:0 serving `leaf`; reports the SNI of each
/// successful TLS handshake.
/// A TLS server config serving `leaf`.
fn acceptor_for(leaf: &Leaf) -> TlsAcceptor {
    let chain = vec![leaf.der.clone()];
    let key = rustls::pki_types::PrivateKeyDer::try_from(
        KeyPair::from_pem(&leaf.key_pem).unwrap().serialize_der(),
    )
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    TlsAcceptor::from(Arc::new(config))
}

async fn wss_backend(leaf: &Leaf) -> (SocketAddr, mpsc::UnboundedReceiver<Option<String>>) {
    let acceptor = acceptor_for(leaf);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, sni) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = tx.send(tls.get_ref().1.server_name().map(str::to_owned));
                let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, sni)
}

async fn tls_errors(proxy: &Proxy, leg: &str) -> f64 {
    metric(
        proxy.admin,
        "wsbeat_tls_handshake_errors_total",
        &[("leg", leg)],
    )
    .await
}

// ---------------------------------------------------------------------------------------
// Client leg.

#[tokio::test]
async fn a_wss_client_reaches_a_ws_backend_through_wsbeat() {
    let ca = Ca::new("test CA");
    let leaf = ca.leaf(&["localhost"], 1);
    let dir = TempDir::new();
    let mut backend = Backend::echo().await;
    let tls = dir.tls(&leaf);
    let proxy = Proxy::start(backend.addr, |c| c.tls = Some(tls)).await;

    let (mut client, cert) = wss_connect(proxy.addr, &ca, "/chat?room=1").await;
    assert_eq!(cert, leaf.der);
    match backend.next().await {
        Seen::Handshake { path, headers, .. } => {
            assert_eq!(path, "/chat?room=1");
            assert_eq!(headers["x-forwarded-proto"], "https");
        }
        other => panic!("{other:?}"),
    }
    // Heartbeats flow over TLS too.
    assert_eq!(recv(&mut client).await, Message::text(HB));
    echo_roundtrip(&mut client, Message::text("over tls")).await;
    echo_roundtrip(&mut client, Message::binary(vec![0u8; 100_000])).await;
    backend.expect_message(Message::text("over tls")).await;
    client.close(None).await.unwrap();
    assert_eq!(tls_errors(&proxy, "client").await, 0.0);
}

#[tokio::test]
async fn a_client_that_sends_no_client_hello_is_dropped_at_the_handshake_timeout() {
    let ca = Ca::new("test CA");
    let dir = TempDir::new();
    let backend = Backend::echo().await;
    let tls = dir.tls(&ca.leaf(&["localhost"], 1));
    let timeout = Duration::from_millis(300);
    let proxy = Proxy::start(backend.addr, |c| {
        c.tls = Some(tls);
        c.limits.handshake_timeout = ms(300);
    })
    .await;

    // A TCP health check (connect, close) is not a handshake error.
    drop(TcpStream::connect(proxy.addr).await.unwrap());

    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    let opened = Instant::now();
    let read = tokio::time::timeout(PATIENCE, silent.read(&mut [0u8; 64]))
        .await
        .expect("wsbeat drops the silent client");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        opened.elapsed() >= timeout,
        "dropped after {:?}",
        opened.elapsed()
    );
    assert_eq!(tls_errors(&proxy, "client").await, 1.0);

    // Plain HTTP on the TLS port: the handshake fails, is counted, nothing is proxied.
    let mut plain = TcpStream::connect(proxy.addr).await.unwrap();
    plain
        .write_all(upgrade_request("/").as_bytes())
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&read_until_closed(&mut plain).await).into_owned();
    assert!(!answer.contains("HTTP/1.1"), "{answer}");
    assert_eq!(tls_errors(&proxy, "client").await, 2.0);
}

#[tokio::test]
async fn a_shutdown_does_not_wait_for_a_client_that_sends_no_client_hello() {
    let ca = Ca::new("test CA");
    let dir = TempDir::new();
    let backend = Backend::echo().await;
    let tls = dir.tls(&ca.leaf(&["localhost"], 1));
    let proxy = Proxy::start(backend.addr, |c| {
        c.tls = Some(tls);
        // Longer than the test's patience: only the shutdown can end this handshake.
        c.limits.handshake_timeout = HumanDuration(PATIENCE * 6);
        c.shutdown.drain_timeout = HumanDuration(PATIENCE * 6);
    })
    .await;
    let _silent = TcpStream::connect(proxy.addr).await.unwrap();
    // Connections are accepted in order: once this one is served, the silent one is in
    // its handshake.
    let (mut client, _) = wss_connect(proxy.addr, &ca, "/").await;
    client.close(None).await.unwrap();
    recv_close(&mut client).await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_rotated_certificate_is_served_to_new_handshakes_while_old_connections_go_on() {
    let ca = Ca::new("test CA");
    let old = ca.leaf(&["localhost"], 1001);
    let new = ca.leaf(&["localhost"], 1002);
    let dir = TempDir::new();
    // The layout of a Kubernetes secret volume: tls.crt -> ..data/tls.crt, and a
    // rotation swaps the `..data` symlink to a new directory in one rename.
    let publish = |version: &str, leaf: &Leaf| {
        let versioned = dir.0.join(version);
        std::fs::create_dir(&versioned).unwrap();
        std::fs::write(versioned.join("tls.crt"), &leaf.cert_pem).unwrap();
        std::fs::write(versioned.join("tls.key"), &leaf.key_pem).unwrap();
        let tmp = dir.0.join("..data_tmp");
        std::os::unix::fs::symlink(version, &tmp).unwrap();
        std::fs::rename(&tmp, dir.0.join("..data")).unwrap();
    };
    publish("..v1", &old);
    for name in ["tls.crt", "tls.key"] {
        std::os::unix::fs::symlink(format!("..data/{name}"), dir.0.join(name)).unwrap();
    }
    let backend = Backend::echo().await;
    let tls = TlsConfig {
        cert: dir.0.join("tls.crt"),
        key: dir.0.join("tls.key"),
    };
    let proxy = Proxy::start(backend.addr, |c| c.tls = Some(tls)).await;

    let (mut long_lived, cert) = wss_connect(proxy.addr, &ca, "/").await;
    assert_eq!(cert, old.der);
    echo_roundtrip(&mut long_lived, Message::text("before")).await;

    publish("..v2", &new);
    // New handshakes see serial 1001 until the background reload notices (about once a
    // second, whether or not anybody connects), then 1002; nothing else.
    let deadline = Instant::now() + PATIENCE;
    let mut handshakes = 0;
    loop {
        let tls = tls_connect(proxy.addr, &ca)
            .await
            .expect("handshake during rotation");
        handshakes += 1;
        let seen = peer_cert(&tls);
        if seen == new.der {
            break;
        }
        assert_eq!(
            seen, old.der,
            "handshake {handshakes}: an unknown certificate"
        );
        assert!(
            Instant::now() < deadline,
            "still the old certificate after {handshakes} handshakes"
        );
        tokio::time::sleep(RETRY).await;
    }
    let (mut fresh, cert) = wss_connect(proxy.addr, &ca, "/").await;
    assert_eq!(cert, new.der);
    echo_roundtrip(&mut fresh, Message::text("new cert")).await;
    // The connection made with the old certificate goes on.
    echo_roundtrip(&mut long_lived, Message::text("after")).await;
}

#[tokio::test]
async fn a_half_written_certificate_keeps_the_one_in_use_and_logs_one_error_line() {
    let ca = Ca::new("test CA");
    let leaf = ca.leaf(&["localhost"], 2001);
    let dir = TempDir::new();
    let tls = dir.tls(&leaf);
    // Published the way `mv` does, so each step is one change the reload can see.
    let publish = |text: &str| {
        let tmp = dir.write("tls.crt.tmp", text);
        std::fs::rename(tmp, &tls.cert).unwrap();
    };
    let config = dir.write(
        "wsbeat.yaml",
        &format!(
            "listen: 127.0.0.1:0\nadmin: {{ listen: null }}\n\
             upstream: {{ url: \"ws://127.0.0.1:9\" }}\n\
             tls: {{ cert: {}, key: {} }}\n",
            tls.cert.display(),
            tls.key.display()
        ),
    );
    let mut wsbeat = JsonWsbeat::spawn(&["--config", config.to_str().unwrap()]);
    let addr = wsbeat.addr("listening");

    publish(&leaf.cert_pem[..leaf.cert_pem.len() / 2]);
    let error = wsbeat.next("TLS certificate not reloaded: keeping the one in use");
    assert_eq!(error["level"], "ERROR", "{error}");
    let reason = error["error"].as_str().unwrap();
    assert!(
        reason.contains(&tls.cert.display().to_string()) && reason.contains("bad PEM"),
        "{error}"
    );
    let served = tls_connect(addr, &ca).await.expect("TLS handshake");
    assert_eq!(peer_cert(&served), leaf.der);

    // The rest of the file arrives: reloaded, and no other error line in between.
    publish(&leaf.cert_pem);
    loop {
        let line = wsbeat
            .lines
            .recv_timeout(PATIENCE)
            .expect("a log line saying the certificate was reloaded");
        if line["message"] == "TLS certificate reloaded" {
            break;
        }
        assert_ne!(line["level"], "ERROR", "one error line per change: {line}");
    }
    let served = tls_connect(addr, &ca).await.expect("TLS handshake");
    assert_eq!(peer_cert(&served), leaf.der);
}

#[ignore = "needs Python websockets: python3 -m pip install 'websockets>=12'"]
#[tokio::test]
async fn python_websockets_over_tls_trusting_only_the_test_ca() {
    let ca = Ca::new("test CA");
    let dir = TempDir::new();
    let tls = dir.tls(&ca.leaf(&["localhost"], 7));
    let ca_file = dir.write("ca.crt", &ca.pem);
    let mut backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, |c| {
        c.tls = Some(tls);
        c.heartbeat.interval = ms(200);
    })
    .await;
    let url = format!("wss://localhost:{}/py", proxy.addr.port());
    python_client(&[&url, HB, ca_file.to_str().unwrap()]).await;
    backend
        .expect_message(Message::text("hello from python"))
        .await;

    // The same client with the system's roots does not trust the test certificate.
    let url = format!("wss://localhost:{}/py", proxy.addr.port());
    let out = python_client_output(&[&url, HB]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CERTIFICATE_VERIFY_FAILED"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------
// Upstream leg.

/// wsbeat (plain) in front of a `wss://` upstream at `url`, trusting `ca_pem`.
async fn proxy_to_wss(
    dir: &TempDir,
    url: String,
    ca_pem: &str,
    server_name: Option<&str>,
) -> Proxy {
    let ca_file = dir.write("upstream-ca.crt", ca_pem);
    let server_name = server_name.map(str::to_owned);
    let placeholder: SocketAddr = "127.0.0.1:9".parse().unwrap();
    Proxy::start(placeholder, move |c| {
        c.upstream.url = url.parse().unwrap();
        c.upstream.ca = Some(ca_file);
        c.upstream.server_name = server_name;
    })
    .await
}

#[tokio::test]
async fn a_ws_client_reaches_a_wss_backend_with_sni_from_the_url() {
    let ca = Ca::new("upstream CA");
    let (addr, mut sni) = wss_backend(&ca.leaf(&["localhost"], 2)).await;
    let dir = TempDir::new();
    let proxy = proxy_to_wss(
        &dir,
        format!("wss://localhost:{}", addr.port()),
        &ca.pem,
        None,
    )
    .await;
    let mut client = connect(&proxy.url("/")).await;
    echo_roundtrip(&mut client, Message::text("to a wss backend")).await;
    assert_eq!(sni.recv().await.unwrap().as_deref(), Some("localhost"));
    assert_eq!(tls_errors(&proxy, "upstream").await, 0.0);
}

#[tokio::test]
async fn server_name_overrides_the_url_host_for_sni_and_verification() {
    let ca = Ca::new("upstream CA");
    let (addr, mut sni) = wss_backend(&ca.leaf(&["backend.internal"], 3)).await;
    let dir = TempDir::new();
    let proxy = proxy_to_wss(
        &dir,
        format!("wss://{addr}"),
        &ca.pem,
        Some("backend.internal"),
    )
    .await;
    let mut client = connect(&proxy.url("/")).await;
    echo_roundtrip(&mut client, Message::text("by name")).await;
    assert_eq!(
        sni.recv().await.unwrap().as_deref(),
        Some("backend.internal")
    );
}

#[tokio::test]
async fn a_route_with_its_own_wss_upstream_gets_its_own_connector() {
    let ca = Ca::new("route CA");
    let (secure, mut sni) = wss_backend(&ca.leaf(&["localhost"], 6)).await;
    let mut plain = Backend::echo().await;
    let dir = TempDir::new();
    let ca_file = dir.write("route-ca.crt", &ca.pem);
    let proxy = Proxy::start(plain.addr, |c| {
        let yaml = format!(
            "routes:\n  - name: secure\n    path: /secure\n    upstream: {{ url: \"wss://localhost:{}\", ca: {} }}\n",
            secure.port(),
            ca_file.display()
        );
        c.routes = Config::from_yaml(&yaml, "routes").unwrap().routes;
    })
    .await;
    let mut client = connect(&proxy.url("/secure/room")).await;
    echo_roundtrip(&mut client, Message::text("via the route")).await;
    assert_eq!(sni.recv().await.unwrap().as_deref(), Some("localhost"));
    let mut client = connect(&proxy.url("/other")).await;
    echo_roundtrip(&mut client, Message::text("via the default")).await;
    plain.expect_message(Message::text("via the default")).await;
}

/// An HTTPS backend (hyper over rustls) answering every request with
/// `https METHOD PATH`.
async fn https_backend(leaf: &Leaf) -> SocketAddr {
    let acceptor = acceptor_for(leaf);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|req: hyper::Request<_>| async move {
                    let body = format!("https {} {}", req.method(), req.uri());
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from(body)),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn plain_http_to_a_wss_upstream_goes_over_https() {
    let ca = Ca::new("upstream CA");
    let addr = https_backend(&ca.leaf(&["localhost"], 8)).await;
    let dir = TempDir::new();
    let url = format!("wss://localhost:{}", addr.port());
    let proxy = proxy_to_wss(&dir, url.clone(), &ca.pem, None).await;
    let get = "GET /page?x=1 HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n";
    let answer = raw_http(proxy.addr, get).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("https GET /page?x=1"), "{answer}");

    // An upstream whose certificate does not verify: 502, counted as `tls`.
    let other = Ca::new("other CA");
    let untrusted = proxy_to_wss(&dir, url, &other.pem, None).await;
    let answer = raw_http(untrusted.addr, get).await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(answer.contains("UnknownIssuer"), "{answer}");
    let labels = [("route", "default"), ("reason", "tls")];
    assert_eq!(
        metric(untrusted.admin, "wsbeat_upstream_errors_total", &labels).await,
        1.0
    );
}

#[tokio::test]
async fn a_rotated_upstream_ca_is_used_for_new_upstream_connections() {
    let old = Ca::new("old upstream CA");
    let new = Ca::new("new upstream CA");
    let addr = https_backend(&new.leaf(&["localhost"], 9)).await;
    let dir = TempDir::new();
    let url = format!("wss://localhost:{}", addr.port());
    let proxy = proxy_to_wss(&dir, url, &old.pem, None).await;
    let get = "GET /rotated HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n";
    let answer = raw_http(proxy.addr, get).await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");

    // The new CA replaces the old one in the file wsbeat was given (as `mv` does).
    let ca_file = dir.0.join("upstream-ca.crt");
    let tmp = dir.write("upstream-ca.crt.tmp", &new.pem);
    std::fs::rename(tmp, &ca_file).unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let answer = raw_http(proxy.addr, get).await;
        if answer.starts_with("HTTP/1.1 200") {
            assert!(answer.ends_with("https GET /rotated"), "{answer}");
            break;
        }
        assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
        assert!(
            Instant::now() < deadline,
            "the new upstream CA is still not in use: {answer}"
        );
        tokio::time::sleep(RETRY).await;
    }
}

/// The handshake status through a plain wsbeat, and the upstream error counters.
async fn assert_refused_for_tls(proxy: &Proxy, why: &str) {
    let answer = raw_http(proxy.addr, &upgrade_request("/")).await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(
        answer.contains("TLS handshake failed") && answer.contains(why),
        "{answer}"
    );
    let errors = |reason: &'static str| async move {
        let labels = [("route", "default"), ("reason", reason)];
        metric(proxy.admin, "wsbeat_upstream_errors_total", &labels).await
    };
    assert_eq!(errors("tls").await, 1.0);
    assert_eq!(errors("handshake").await, 0.0);
    assert_eq!(tls_errors(proxy, "upstream").await, 1.0);
    assert_eq!(tls_errors(proxy, "client").await, 0.0);
}

#[tokio::test]
async fn an_upstream_certificate_from_another_ca_gets_502_and_is_counted() {
    let trusted = Ca::new("trusted CA");
    let other = Ca::new("other CA");
    let (addr, _sni) = wss_backend(&other.leaf(&["localhost"], 4)).await;
    let dir = TempDir::new();
    let proxy = proxy_to_wss(
        &dir,
        format!("wss://localhost:{}", addr.port()),
        &trusted.pem,
        None,
    )
    .await;
    assert_refused_for_tls(&proxy, "UnknownIssuer").await;
}

#[tokio::test]
async fn an_expired_upstream_certificate_is_refused() {
    let ca = Ca::new("upstream CA");
    let expired = ca.leaf_with(&["localhost"], 5, |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let (addr, _sni) = wss_backend(&expired).await;
    let dir = TempDir::new();
    let proxy = proxy_to_wss(
        &dir,
        format!("wss://localhost:{}", addr.port()),
        &ca.pem,
        None,
    )
    .await;
    assert_refused_for_tls(&proxy, "certificate expired").await;
}

// ---------------------------------------------------------------------------------------
// Bad files: `wsbeat check` exits 64 naming the file and the reason.

fn check(dir: &TempDir, yaml: &str) -> (Option<i32>, String) {
    let file = dir.write("wsbeat.yaml", yaml);
    let out = Command::new(BIN)
        .args(["check", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unusable_certificate_files_exit_64_naming_the_file() {
    let ca = Ca::new("test CA");
    let dir = TempDir::new();
    let a = ca.leaf(&["localhost"], 1);
    let b = ca.leaf(&["localhost"], 2);
    let cert = dir.write("a.crt", &a.cert_pem);
    let key = dir.write("a.key", &a.key_pem);
    let other_key = dir.write("b.key", &b.key_pem);
    let garbage = dir.write(
        "garbage.pem",
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    );
    let empty = dir.write("empty.pem", "no PEM here\n");
    let missing = dir.0.join("missing.crt");
    let tls =
        |c: &Path, k: &Path| format!("tls: {{ cert: {}, key: {} }}\n", c.display(), k.display());
    for (yaml, file, reason) in [
        (tls(&missing, &key), &missing, "cannot read"),
        (tls(&garbage, &key), &garbage, "bad PEM"),
        (tls(&empty, &key), &empty, "no CERTIFICATE"),
        (tls(&cert, &other_key), &other_key, "does not match"),
        (tls(&cert, &empty), &empty, "no usable private key"),
        (
            format!(
                "upstream: {{ url: \"wss://localhost\", ca: {} }}\n",
                garbage.display()
            ),
            &garbage,
            "bad PEM",
        ),
    ] {
        let (code, err) = check(&dir, &yaml);
        assert_eq!(code, Some(64), "{yaml}: {err}");
        assert!(
            err.contains(&file.display().to_string()) && err.contains(reason),
            "{yaml}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one clear message: {err}");
    }
    // The good pair passes.
    assert_eq!(check(&dir, &tls(&cert, &key)).0, Some(0));
}

#[test]
#[ignore = "needs the openssl command: apt-get install openssl"]
fn pkcs1_and_sec1_keys_made_by_openssl_are_accepted() {
    let dir = TempDir::new();
    let tls =
        |c: &Path, k: &Path| format!("tls: {{ cert: {}, key: {} }}\n", c.display(), k.display());
    // `openssl rsa -traditional` writes PKCS#1; `openssl ec` writes SEC1.
    for (algorithm, convert) in [("rsa:2048", &["rsa", "-traditional"][..]), ("ec", &["ec"])] {
        let (c, k, legacy) = (
            dir.0.join("o.crt"),
            dir.0.join("o.key"),
            dir.0.join("legacy.key"),
        );
        let mut req = Command::new("openssl");
        req.args([
            "req",
            "-x509",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-newkey",
            algorithm,
        ]);
        if algorithm == "ec" {
            req.args(["-pkeyopt", "ec_paramgen_curve:P-256"]);
        }
        let out = req
            .arg("-keyout")
            .arg(&k)
            .arg("-out")
            .arg(&c)
            .output()
            .expect("openssl runs (CI installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new("openssl")
            .args(convert)
            .arg("-in")
            .arg(&k)
            .arg("-out")
            .arg(&legacy)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&legacy).unwrap();
        let label = if algorithm == "ec" {
            "EC PRIVATE KEY"
        } else {
            "RSA PRIVATE KEY"
        };
        assert!(text.contains(label), "{text}");
        let (code, err) = check(&dir, &tls(&c, &legacy));
        assert_eq!(code, Some(0), "{label}: {err}");
    }
}

#[test]
fn the_config_accepts_tls_settings_and_checks_them() {
    let e = Config::from_yaml("upstream: { url: \"ws://x:1\", server_name: x }\n", "t")
        .unwrap_err()
        .to_string();
    assert!(e.contains("upstream.url") && e.contains("wss://"), "{e}");
    let c = Config::from_yaml("upstream: { url: \"wss://example.com\" }\n", "t").unwrap();
    assert_eq!(c.upstream.url.port, 443);
    let e = Config::from_yaml(
        "upstream: { url: \"wss://example.com\", server_name: \"not a name\" }\n",
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("upstream.server_name"), "{e}");
    // Validation reads no file: the certificate files are a step of their own, and a
    // route's own wss:// upstream is checked under the route's key.
    let c = Config::from_yaml(
        "routes:\n  - path: /chat\n    upstream: { url: \"wss://chat:8443\", ca: /nonexistent/ca.pem }\n",
        "t",
    )
    .unwrap();
    let e = wsbeat::tls::Setup::load(&c).err().unwrap().to_string();
    assert!(
        e.contains("routes[0].upstream.ca") && e.contains("/nonexistent/ca.pem"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------
// Start-up: the certificate files are read once, and a bad read exits 64.

/// Feeds a FIFO standing in for a certificate file: the n-th time somebody opens it for
/// reading, they read `contents[n]`. So a test decides what each read of the file sees,
/// without guessing when the reads happen.
struct FifoFeeder {
    path: PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FifoFeeder {
    fn start(path: PathBuf, contents: Vec<String>) -> FifoFeeder {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        use std::io::Write;
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // A reader's close is the signal to serve the next one: opening for writing
        // earlier would join the previous reader, which would read two contents.
        let closes = Inotify::init(InitFlags::IN_CLOEXEC).unwrap();
        closes
            .add_watch(&path, AddWatchFlags::IN_CLOSE_NOWRITE)
            .unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (path, stop) = (path.clone(), stop.clone());
            move || {
                for text in contents {
                    // Blocks until a reader opens the FIFO.
                    let opened = std::fs::OpenOptions::new().write(true).open(&path);
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let mut fifo = opened.unwrap();
                    // The reader may be gone (wsbeat exited): nothing to do then.
                    let _ = fifo.write_all(text.as_bytes());
                    drop(fifo);
                    while closes.read_events().unwrap().is_empty() {}
                }
            }
        });
        FifoFeeder {
            path,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FifoFeeder {
    fn drop(&mut self) {
        use std::os::unix::fs::OpenOptionsExt;
        self.stop.store(true, Ordering::SeqCst);
        // A reader that stays open until the feeder is done lets a feeder blocked in
        // `open` go on and see `stop`.
        let _reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(&self.path);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How a `wsbeat` process started: it listens, or it exited with a code and its stderr.
enum Started {
    Listening(std::process::Child, SocketAddr),
    Exited(Option<i32>, String),
}

fn start_wsbeat(config: &Path) -> Started {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    loop {
        match lines.recv_timeout(PATIENCE) {
            Ok(line) => {
                if let Some(addr) = line
                    .split("listening addr=")
                    .nth(1)
                    .and_then(|a| a.trim().parse().ok())
                {
                    return Started::Listening(child, addr);
                }
                seen.push_str(&line);
                seen.push('\n');
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let code = child.wait().unwrap().code();
                return Started::Exited(code, seen);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("wsbeat neither listened nor exited; stderr: {seen}");
            }
        }
    }
}

#[test]
fn the_certificate_is_read_once_at_start_up_and_a_bad_read_exits_64() {
    let ca = Ca::new("test CA");
    let leaf = ca.leaf(&["localhost"], 1);
    let garbage = "no PEM here\n".to_owned();
    // Whichever read of the certificate file is bad, wsbeat either refuses to start
    // (exit 64, one line naming the file and the reason) or serves the certificate it
    // read and checked: it never exits 0 or 1 for a certificate, and it never checks
    // one read and serves another.
    for bad_read in 1..=4 {
        let dir = TempDir::new();
        let cert = dir.0.join("tls.crt");
        let mut contents = vec![leaf.cert_pem.clone(); 4];
        contents[bad_read - 1] = garbage.clone();
        let feeder = FifoFeeder::start(cert.clone(), contents);
        let key = dir.write("tls.key", &leaf.key_pem);
        let config = dir.write(
            "wsbeat.yaml",
            &format!(
                "listen: 127.0.0.1:0\nadmin: {{ listen: null }}\n\
                 upstream: {{ url: \"ws://127.0.0.1:9\" }}\n\
                 tls: {{ cert: {}, key: {} }}\n",
                cert.display(),
                key.display()
            ),
        );
        match start_wsbeat(&config) {
            Started::Exited(code, err) => {
                assert_eq!(
                    bad_read, 1,
                    "only the first read happens at start-up, yet bad read {bad_read} \
                     made wsbeat exit with {code:?}: {err}"
                );
                assert_eq!(code, Some(64), "{err}");
                assert!(
                    err.contains(&cert.display().to_string())
                        && err.contains("no CERTIFICATE block found"),
                    "{err}"
                );
                assert_eq!(err.trim().lines().count(), 1, "one clear message: {err}");
            }
            Started::Listening(mut child, addr) => {
                let served = tokio::runtime::Runtime::new()
                    .unwrap()
                    .block_on(tls_connect(addr, &ca))
                    .map(|tls| peer_cert(&tls));
                let _ = child.kill();
                let status = child.wait().unwrap();
                assert_ne!(bad_read, 1, "wsbeat started with a bad certificate");
                match served {
                    Ok(der) => assert_eq!(der, leaf.der),
                    Err(e) => {
                        panic!("bad read {bad_read}: no TLS handshake ({e}); wsbeat: {status}")
                    }
                }
            }
        }
        drop(feeder);
    }
}
