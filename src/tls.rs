//! TLS on both legs with rustls (`ring` provider): the public listener's server config
//! with a certificate that reloads when its files change, the upstream client configs,
//! and the one stream type the relay sees for plain and TLS connections alike.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{Config, TlsConfig, UpstreamConfig, DEFAULT_ROUTE};

/// The only application protocol wsbeat speaks on either leg (WebSockets over HTTP/1.1).
const ALPN_HTTP1: &[u8] = b"http/1.1";
/// The certificate files are looked at (two `stat`s) at most this often, on a handshake:
/// a rotated certificate is in use within this long after the first handshake that
/// follows the change, and no task runs for it while nobody connects.
pub const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A certificate, key or CA file that cannot be used. The message names the file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct TlsFileError {
    pub path: PathBuf,
    pub reason: String,
}

fn file_error(path: &Path, reason: impl fmt::Display) -> TlsFileError {
    TlsFileError {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Why a TLS setting is unusable: the config key, and the reason (naming the file).
#[derive(Debug, thiserror::Error)]
#[error("config key `{key}`: {reason}")]
pub struct TlsError {
    pub key: String,
    pub reason: String,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|e| file_error(path, format!("cannot read: {e}")))
}

/// Parses a PEM certificate chain and its key, and checks that they belong together.
fn certified_key(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsFileError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(cert_path, format!("bad PEM: {e}")))?;
    if chain.is_empty() {
        return Err(file_error(cert_path, "no CERTIFICATE block found"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
        file_error(
            key_path,
            format!("no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
        )
    })?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| file_error(key_path, format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(file_error(
                key_path,
                format!("does not match the certificate in {}", cert_path.display()),
            ))
        }
        Err(e) => Err(file_error(cert_path, format!("unusable certificate: {e}"))),
    }
}

/// What identifies a file's content without reading it: a rotated file (a new file
/// behind a swapped symlink, or a file rewritten in place) changes one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    // `metadata` follows symlinks: a Kubernetes rotation swaps `..data`, so the target
    // (its inode) changes even when the mtime is copied.
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        modified: m.modified().ok(),
    })
}

/// The public listener's certificate: served from memory, reloaded when the files
/// change. A reload that fails keeps the certificate in use and logs a warning.
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// The files' stamps when last loaded (or tried) and when they were last looked at.
    checked: Mutex<(Option<FileStamp>, Option<FileStamp>, Instant)>,
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .finish()
    }
}

impl ReloadingCert {
    /// Loads the certificate and key; errors name the file and the reason.
    pub fn load(tls: &TlsConfig) -> Result<ReloadingCert, TlsFileError> {
        let provider = provider();
        let stamps = (stamp(&tls.cert), stamp(&tls.key));
        let key = certified_key(
            &tls.cert,
            &read(&tls.cert)?,
            &tls.key,
            &read(&tls.key)?,
            &provider,
        )?;
        Ok(ReloadingCert {
            cert_path: tls.cert.clone(),
            key_path: tls.key.clone(),
            provider,
            current: RwLock::new(Arc::new(key)),
            checked: Mutex::new((stamps.0, stamps.1, Instant::now())),
        })
    }

    /// Reloads when the files changed since the last look, at most once per
    /// `min_interval`. Concurrent handshakes do not wait for each other: one looks, the
    /// others use the certificate in place.
    fn refresh(&self, min_interval: Duration) {
        let Ok(mut checked) = self.checked.try_lock() else {
            return;
        };
        if checked.2.elapsed() < min_interval {
            return;
        }
        checked.2 = Instant::now();
        let stamps = (stamp(&self.cert_path), stamp(&self.key_path));
        if stamps.0 == checked.0 && stamps.1 == checked.1 {
            return;
        }
        // Remembered whatever the outcome: a broken pair is retried when a file changes
        // again (e.g. the key written after the certificate), not on every handshake.
        (checked.0, checked.1) = stamps;
        let loaded = read(&self.cert_path).and_then(|cert| {
            let key = read(&self.key_path)?;
            certified_key(&self.cert_path, &cert, &self.key_path, &key, &self.provider)
        });
        match loaded {
            Ok(key) => {
                if let Ok(mut current) = self.current.write() {
                    *current = Arc::new(key);
                }
                tracing::info!(cert = %self.cert_path.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate not reloaded: keeping the one in use");
            }
        }
    }

    /// The certificate new handshakes get.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.refresh(RELOAD_CHECK_INTERVAL);
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The public listener's TLS acceptor: TLS 1.2 and 1.3, ALPN `http/1.1`, the
/// certificate from `tls.cert` / `tls.key`, reloaded when they change.
pub fn acceptor(tls: &TlsConfig) -> Result<TlsAcceptor, TlsFileError> {
    let cert = Arc::new(ReloadingCert::load(tls)?);
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| file_error(&tls.cert, e))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The roots an upstream certificate must chain to: `upstream.ca` when set, else the
/// webpki (Mozilla) roots.
fn roots(ca: Option<&Path>) -> Result<RootCertStore, TlsFileError> {
    let Some(path) = ca else {
        return Ok(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        });
    };
    let pem = read(path)?;
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| file_error(path, format!("bad PEM: {e}")))?;
        store
            .add(cert)
            .map_err(|e| file_error(path, format!("unusable CA certificate: {e}")))?;
    }
    if store.is_empty() {
        return Err(file_error(path, "no CERTIFICATE block found"));
    }
    Ok(store)
}

/// A client config for upstreams: TLS 1.2 and 1.3, ALPN `http/1.1`, certificates
/// verified against `ca` (or the webpki roots). There is no way to turn verification off.
pub fn client_config(ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsFileError> {
    let roots = roots(ca)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| file_error(ca.unwrap_or(Path::new("webpki-roots")), e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

/// The name an upstream's certificate must carry (and the SNI sent):
/// `upstream.server_name`, else the URL's host (a DNS name or an IP address).
pub fn server_name(upstream: &UpstreamConfig) -> Result<ServerName<'static>, String> {
    let name = upstream
        .server_name
        .as_deref()
        .unwrap_or(&upstream.url.host);
    ServerName::try_from(name.to_owned())
        .map_err(|e| format!("`{name}` is not a DNS name or IP address ({e})"))
}

/// How to open TLS to one upstream: the connector and the name to verify.
#[derive(Clone)]
pub struct UpstreamTls {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
}

/// The TLS connector and server name for a `wss://` (or `https://`) upstream. For the
/// plain-HTTP client too: it needs the same verification.
pub fn upstream_connector(upstream: &UpstreamConfig) -> Result<UpstreamTls, TlsError> {
    upstream_connector_with(upstream, &mut HashMap::new(), "upstream")
}

/// As [`upstream_connector`], sharing client configs between upstreams with the same CA.
fn upstream_connector_with(
    upstream: &UpstreamConfig,
    configs: &mut HashMap<Option<PathBuf>, Arc<ClientConfig>>,
    key: &str,
) -> Result<UpstreamTls, TlsError> {
    let server_name = server_name(upstream).map_err(|reason| TlsError {
        key: format!("{key}.server_name"),
        reason,
    })?;
    let config = match configs.get(&upstream.ca) {
        Some(c) => c.clone(),
        None => {
            let c = client_config(upstream.ca.as_deref()).map_err(|e| TlsError {
                key: format!("{key}.ca"),
                reason: e.to_string(),
            })?;
            configs.insert(upstream.ca.clone(), c.clone());
            c
        }
    };
    Ok(UpstreamTls {
        connector: TlsConnector::from(config),
        server_name,
    })
}

/// Everything TLS the proxy needs, loaded once at start-up (the listener's certificate
/// then reloads by itself).
#[derive(Default, Clone)]
pub struct Setup {
    /// Set when `tls:` is configured.
    pub acceptor: Option<TlsAcceptor>,
    /// The connector of each route with a `wss://` upstream, by route name.
    pub upstreams: HashMap<String, UpstreamTls>,
}

impl Setup {
    /// Loads the listener's certificate and every `wss://` upstream's roots.
    pub fn load(config: &Config) -> Result<Setup, TlsError> {
        let acceptor = match &config.tls {
            Some(tls) => Some(acceptor(tls).map_err(|source| {
                let key = if source.path == tls.key {
                    "tls.key"
                } else {
                    "tls.cert"
                };
                TlsError {
                    key: key.to_owned(),
                    reason: source.to_string(),
                }
            })?),
            None => None,
        };
        let mut configs = HashMap::new();
        let mut upstreams = HashMap::new();
        let top = match config.upstream.url.secure {
            true => Some(upstream_connector_with(
                &config.upstream,
                &mut configs,
                "upstream",
            )?),
            false => None,
        };
        if let Some(tls) = &top {
            upstreams.insert(DEFAULT_ROUTE.to_owned(), tls.clone());
        }
        for (i, route) in config.routes.iter().enumerate() {
            let tls = match &route.upstream {
                Some(u) if u.url.secure => Some(upstream_connector_with(
                    u,
                    &mut configs,
                    &format!("routes[{i}].upstream"),
                )?),
                Some(_) => None,
                None => top.clone(),
            };
            if let Some(tls) = tls {
                upstreams.insert(route.label().to_owned(), tls);
            }
        }
        Ok(Setup {
            acceptor,
            upstreams,
        })
    }
}

/// One leg's transport: plain TCP or TLS over TCP. Both legs of every connection use
/// this one type, so the relay is compiled once. TLS state is boxed: a plain
/// connection does not pay for its size.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Stream::Plain(s)
    }
}

impl From<tokio_rustls::TlsStream<TcpStream>> for Stream {
    fn from(s: tokio_rustls::TlsStream<TcpStream>) -> Self {
        Stream::Tls(Box::new(s))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `localhost`: (certificate PEM, key PEM).
    fn self_signed() -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    struct Files(PathBuf);

    impl Files {
        fn new(name: &str) -> Files {
            let dir =
                std::env::temp_dir().join(format!("wsbeat-tls-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Files(dir)
        }
        /// Replaces a file the way `mv` does: a new inode behind the same name.
        fn put(&self, name: &str, text: &str) -> PathBuf {
            let tmp = self.0.join(format!("{name}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            let path = self.0.join(name);
            std::fs::rename(&tmp, &path).unwrap();
            path
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn served(cert: &ReloadingCert) -> Vec<u8> {
        cert.refresh(Duration::ZERO);
        cert.current.read().unwrap().cert[0].to_vec()
    }

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn a_broken_pair_keeps_the_certificate_in_use_until_a_good_one_arrives() {
        let files = Files::new("reload");
        let (a_cert, a_key) = self_signed();
        let (b_cert, b_key) = self_signed();
        let tls = TlsConfig {
            cert: files.put("tls.crt", &a_cert),
            key: files.put("tls.key", &a_key),
        };
        let cert = ReloadingCert::load(&tls).unwrap();
        assert_eq!(served(&cert), der(&a_cert));
        // The certificate is written first: it does not match the key yet.
        files.put("tls.crt", &b_cert);
        assert_eq!(served(&cert), der(&a_cert));
        files.put("tls.key", &b_key);
        assert_eq!(served(&cert), der(&b_cert));
        files.put("tls.crt", "garbage");
        assert_eq!(served(&cert), der(&b_cert));
        std::fs::remove_file(&tls.key).unwrap();
        assert_eq!(served(&cert), der(&b_cert));
    }

    #[test]
    fn the_server_name_is_the_url_host_unless_overridden() {
        let mut u = UpstreamConfig {
            url: "wss://10.0.0.1:8443".parse().unwrap(),
            ..UpstreamConfig::default()
        };
        assert_eq!(server_name(&u).unwrap().to_str(), "10.0.0.1");
        u.server_name = Some("backend.internal".to_owned());
        assert_eq!(server_name(&u).unwrap().to_str(), "backend.internal");
        u.url = "wss://[::1]:8443".parse().unwrap();
        u.server_name = None;
        assert_eq!(server_name(&u).unwrap().to_str(), "::1");
    }

    #[test]
    fn a_plain_connection_does_not_pay_for_tls_state() {
        assert!(std::mem::size_of::<Stream>() <= 2 * std::mem::size_of::<TcpStream>());
    }
}
