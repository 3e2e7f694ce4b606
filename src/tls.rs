//! TLS on both legs with rustls (`ring` provider): the public listener's server config
//! and the upstream client configs, made from PEM files and re-made in the background
//! when those change (an `Arc` swap, never a file read on the handshake path); and the
//! one stream type the relay sees for plain and TLS connections alike.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

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
/// HTTP/2 over TLS, offered to clients first with `http2: true`.
const ALPN_H2: &[u8] = b"h2";
/// How often the background reload looks at the certificate files (a `stat` each, a
/// read only when one changed): a rotated certificate is in use within about this long.
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

/// Files the background reload looks at, and how to reload what was made of them.
struct Watch {
    /// What is reloaded, for the log: "TLS certificate", "upstream CA".
    what: &'static str,
    files: Vec<PathBuf>,
    /// The files' stamps when last loaded or tried: a broken file is tried again when it
    /// changes again (the key written after the certificate, the rest of a half-written
    /// file), not at every look.
    stamps: Vec<Option<FileStamp>>,
    /// Loads the files and swaps the result in.
    reload: Box<dyn Fn() -> Result<(), TlsFileError> + Send + Sync>,
}

impl Watch {
    /// Loads `load()` now and returns it behind an atomic pointer, with the watch that
    /// swaps in a new one when one of `files` changes. Readers of the pointer take the
    /// current `Arc` without a lock and without touching the file system.
    fn load<T: Send + Sync + 'static>(
        what: &'static str,
        files: Vec<PathBuf>,
        load: impl Fn() -> Result<T, TlsFileError> + Send + Sync + 'static,
    ) -> Result<(Arc<ArcSwap<T>>, Watch), TlsFileError> {
        // Stamped before reading: a change during the read is seen at the next look.
        let stamps = files.iter().map(|f| stamp(f)).collect();
        let current = Arc::new(ArcSwap::from_pointee(load()?));
        let cell = current.clone();
        let reload = Box::new(move || {
            cell.store(Arc::new(load()?));
            Ok(())
        });
        let watch = Watch {
            what,
            files,
            stamps,
            reload,
        };
        Ok((current, watch))
    }

    /// Reloads when a file changed since the last look. A reload that fails keeps what
    /// is in use and logs one error line naming the file and the reason.
    fn check(&mut self) {
        let stamps: Vec<_> = self.files.iter().map(|f| stamp(f)).collect();
        if stamps == self.stamps {
            return;
        }
        self.stamps = stamps;
        match (self.reload)() {
            Ok(()) => tracing::info!(files = ?self.files, "{} reloaded", self.what),
            Err(e) => tracing::error!(
                error = %e,
                "{} not reloaded: keeping the one in use",
                self.what
            ),
        }
    }
}

/// The listener's certificate and key from `tls.cert` / `tls.key`, and its watch.
fn certificate(tls: &TlsConfig) -> Result<(Arc<ArcSwap<CertifiedKey>>, Watch), TlsFileError> {
    let provider = provider();
    let (cert, key) = (tls.cert.clone(), tls.key.clone());
    Watch::load(
        "TLS certificate",
        vec![cert.clone(), key.clone()],
        move || certified_key(&cert, &read(&cert)?, &key, &read(&key)?, &provider),
    )
}

/// The certificate new handshakes get: whatever the background reload last loaded.
/// Nothing here looks at a file: a slow or hung volume never stalls a handshake.
struct CurrentCert {
    path: PathBuf,
    current: Arc<ArcSwap<CertifiedKey>>,
}

impl fmt::Debug for CurrentCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CurrentCert")
            .field("cert", &self.path)
            .finish()
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The public listener's TLS acceptor: TLS 1.2 and 1.3, ALPN `http/1.1` (with `http2`:
/// `h2` first), the certificate from `tls.cert` / `tls.key`; with the watch that reloads
/// it.
fn acceptor(tls: &TlsConfig, http2: bool) -> Result<(TlsAcceptor, Watch), TlsFileError> {
    let (current, watch) = certificate(tls)?;
    let resolver = CurrentCert {
        path: tls.cert.clone(),
        current,
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| file_error(&tls.cert, e))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = if http2 {
        vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()]
    } else {
        vec![ALPN_HTTP1.to_vec()]
    };
    Ok((TlsAcceptor::from(Arc::new(config)), watch))
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
fn client_config(ca: Option<&Path>) -> Result<ClientConfig, TlsFileError> {
    let roots = roots(ca)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| file_error(ca.unwrap_or(Path::new("webpki-roots")), e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(config)
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

/// Opens TLS to an upstream with the client config in use at that moment: the one the
/// background reload last made of `upstream.ca` (or the webpki roots, which never
/// change). Cloning shares the config.
#[derive(Clone)]
pub struct Connector(Arc<ArcSwap<ClientConfig>>);

impl Connector {
    /// Starts the TLS handshake over `stream`, verifying the certificate for `name`.
    pub fn connect<IO>(&self, name: ServerName<'static>, stream: IO) -> tokio_rustls::Connect<IO>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        TlsConnector::from(self.0.load_full()).connect(name, stream)
    }
}

/// How to open TLS to one upstream: the connector and the name to verify.
#[derive(Clone)]
pub struct UpstreamTls {
    pub connector: Connector,
    pub server_name: ServerName<'static>,
}

/// The TLS connector and server name for a `wss://` (or `https://`) upstream (for the
/// plain-HTTP client too: it needs the same verification). Upstreams with the same CA
/// share one connector (`connectors`, by CA file); a CA file gets a watch.
fn upstream_connector(
    upstream: &UpstreamConfig,
    connectors: &mut HashMap<Option<PathBuf>, Connector>,
    watches: &mut Vec<Watch>,
    key: &str,
) -> Result<UpstreamTls, TlsError> {
    let server_name = server_name(upstream).map_err(|reason| TlsError {
        key: format!("{key}.server_name"),
        reason,
    })?;
    let connector = match connectors.get(&upstream.ca) {
        Some(c) => c.clone(),
        None => {
            let ca_error = |e: TlsFileError| TlsError {
                key: format!("{key}.ca"),
                reason: e.to_string(),
            };
            let c = match &upstream.ca {
                // The webpki roots are built in: nothing to reload.
                None => Connector(Arc::new(ArcSwap::from_pointee(
                    client_config(None).map_err(ca_error)?,
                ))),
                Some(ca) => {
                    let path = ca.clone();
                    let (current, watch) =
                        Watch::load("upstream CA", vec![ca.clone()], move || {
                            client_config(Some(&path))
                        })
                        .map_err(ca_error)?;
                    watches.push(watch);
                    Connector(current)
                }
            };
            connectors.insert(upstream.ca.clone(), c.clone());
            c
        }
    };
    Ok(UpstreamTls {
        connector,
        server_name,
    })
}

/// Everything TLS the proxy needs, loaded once at start-up by [`Setup::load`];
/// [`Setup::reload_in_background`] keeps the certificates current.
#[derive(Default)]
pub struct Setup {
    /// Set when `tls:` is configured.
    pub acceptor: Option<TlsAcceptor>,
    /// The connector of each route with a `wss://` upstream, by route name.
    pub upstreams: HashMap<String, UpstreamTls>,
    /// The files behind `acceptor` and the upstream CAs, for the background reload.
    watches: Vec<Watch>,
}

impl Setup {
    /// Loads the listener's certificate and every `wss://` upstream's roots. An error
    /// names the config key, the file and the reason.
    pub fn load(config: &Config) -> Result<Setup, TlsError> {
        let mut watches = Vec::new();
        let acceptor = match &config.tls {
            Some(tls) => {
                let (acceptor, watch) = acceptor(tls, config.http2).map_err(|source| {
                    let key = if source.path == tls.key {
                        "tls.key"
                    } else {
                        "tls.cert"
                    };
                    TlsError {
                        key: key.to_owned(),
                        reason: source.to_string(),
                    }
                })?;
                watches.push(watch);
                Some(acceptor)
            }
            None => None,
        };
        let mut connectors = HashMap::new();
        let mut upstreams = HashMap::new();
        let top = match config.upstream.url.secure {
            true => Some(upstream_connector(
                &config.upstream,
                &mut connectors,
                &mut watches,
                "upstream",
            )?),
            false => None,
        };
        if let Some(tls) = &top {
            upstreams.insert(DEFAULT_ROUTE.to_owned(), tls.clone());
        }
        for (i, route) in config.routes.iter().enumerate() {
            let tls = match &route.upstream {
                Some(u) if u.url.secure => Some(upstream_connector(
                    u,
                    &mut connectors,
                    &mut watches,
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
            watches,
        })
    }

    /// Starts looking at the certificate files (the listener's and every `upstream.ca`)
    /// every [`RELOAD_CHECK_INTERVAL`], reloading the ones that changed, until the
    /// returned guard is dropped. `None` when no file is configured.
    ///
    /// A thread of its own rather than a runtime task: a `stat` or a read that hangs (a
    /// stuck secret volume) then blocks only this thread, never a worker that serves
    /// connections, nor the process's exit (the runtime waits for its blocking pool).
    pub fn reload_in_background(&mut self) -> Option<Reloader> {
        if self.watches.is_empty() {
            return None;
        }
        let mut watches = std::mem::take(&mut self.watches);
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("wsbeat-tls-reload".to_owned())
            .spawn(move || {
                // Wakes every interval, and at once when the guard is dropped.
                while let Err(RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(RELOAD_CHECK_INTERVAL)
                {
                    for watch in &mut watches {
                        watch.check();
                    }
                }
            });
        match spawned {
            Ok(_) => Some(Reloader { _stop: stop }),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the certificate reload: the certificates stay as loaded");
                None
            }
        }
    }
}

/// The running background reload of the certificate files; it stops when this is
/// dropped (a look in progress finishes first, in the background).
pub struct Reloader {
    /// Dropping the sender wakes the reload thread, which then ends.
    _stop: std::sync::mpsc::Sender<()>,
}

/// One leg's transport: plain TCP or TLS over TCP. Both legs of every connection use
/// this one type, so the relay is compiled once. TLS state is boxed: a plain
/// connection does not pay for its size.
pub enum LegStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl From<TcpStream> for LegStream {
    fn from(s: TcpStream) -> Self {
        LegStream::Plain(s)
    }
}

impl From<tokio_rustls::TlsStream<TcpStream>> for LegStream {
    fn from(s: tokio_rustls::TlsStream<TcpStream>) -> Self {
        LegStream::Tls(Box::new(s))
    }
}

impl AsyncRead for LegStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LegStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            LegStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for LegStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            LegStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            LegStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            LegStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            LegStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            LegStream::Plain(s) => s.is_write_vectored(),
            LegStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LegStream::Plain(s) => Pin::new(s).poll_flush(cx),
            LegStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LegStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            LegStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
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

    /// What new handshakes get after the reload's next look.
    fn served(current: &ArcSwap<CertifiedKey>, watch: &mut Watch) -> Vec<u8> {
        watch.check();
        current.load().cert[0].to_vec()
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
        let (cert, mut watch) = certificate(&tls).unwrap();
        assert_eq!(served(&cert, &mut watch), der(&a_cert));
        // The certificate is written first: it does not match the key yet.
        files.put("tls.crt", &b_cert);
        assert_eq!(served(&cert, &mut watch), der(&a_cert));
        files.put("tls.key", &b_key);
        assert_eq!(served(&cert, &mut watch), der(&b_cert));
        files.put("tls.crt", "garbage");
        assert_eq!(served(&cert, &mut watch), der(&b_cert));
        std::fs::remove_file(&tls.key).unwrap();
        assert_eq!(served(&cert, &mut watch), der(&b_cert));
    }

    #[test]
    fn a_broken_file_is_tried_once_per_change_not_at_every_look() {
        let files = Files::new("tries");
        let path = files.put("tls.crt", "good");
        let tries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (current, mut watch) = Watch::load("test file", vec![path.clone()], {
            let (path, tries) = (path.clone(), tries.clone());
            move || {
                tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let text = std::fs::read_to_string(&path).unwrap();
                match text.as_str() {
                    "half" => Err(file_error(&path, "half-written")),
                    _ => Ok(text),
                }
            }
        })
        .unwrap();
        let tries = || tries.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(tries(), 1);
        // Nothing changed: no read.
        watch.check();
        assert_eq!(tries(), 1);
        files.put("tls.crt", "half");
        for _ in 0..3 {
            watch.check();
        }
        assert_eq!(tries(), 2, "one try (and one error line) for one change");
        assert_eq!(**current.load(), "good");
        files.put("tls.crt", "whole");
        watch.check();
        assert_eq!(tries(), 3);
        assert_eq!(**current.load(), "whole");
    }

    #[test]
    fn an_upstream_ca_reloads_into_the_shared_connector() {
        let files = Files::new("ca");
        let (a_cert, _) = self_signed();
        let (b_cert, _) = self_signed();
        let ca = files.put("ca.crt", &a_cert);
        let upstream = UpstreamConfig {
            url: "wss://localhost:8443".parse().unwrap(),
            ca: Some(ca),
            ..UpstreamConfig::default()
        };
        let (mut connectors, mut watches) = (HashMap::new(), Vec::new());
        let first =
            upstream_connector(&upstream, &mut connectors, &mut watches, "upstream").unwrap();
        let second =
            upstream_connector(&upstream, &mut connectors, &mut watches, "routes[0]").unwrap();
        assert_eq!(watches.len(), 1, "one watch per CA file");
        let before = first.connector.0.load_full();
        files.put("ca.crt", "garbage");
        watches[0].check();
        assert!(Arc::ptr_eq(&before, &first.connector.0.load_full()));
        files.put("ca.crt", &b_cert);
        watches[0].check();
        let after = first.connector.0.load_full();
        assert!(
            !Arc::ptr_eq(&before, &after),
            "a new CA, a new client config"
        );
        assert!(Arc::ptr_eq(&after, &second.connector.0.load_full()));
    }

    #[test]
    fn the_reload_thread_ends_when_its_guard_is_dropped() {
        let files = Files::new("stop");
        let path = files.put("tls.crt", "x");
        // The thread owns the watch, and so this sender: when it ends, it drops it.
        let (alive, ended) = std::sync::mpsc::channel::<()>();
        let (_, watch) = Watch::load("test file", vec![path], move || {
            let _ = &alive;
            Ok(())
        })
        .unwrap();
        let mut setup = Setup {
            watches: vec![watch],
            ..Setup::default()
        };
        let reloader = setup.reload_in_background().expect("a file to watch");
        assert!(setup.reload_in_background().is_none(), "started once");
        drop(reloader);
        assert_eq!(
            ended.recv_timeout(Duration::from_secs(10)),
            Err(RecvTimeoutError::Disconnected)
        );
        assert!(Setup::default().reload_in_background().is_none());
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
        assert!(std::mem::size_of::<LegStream>() <= 2 * std::mem::size_of::<TcpStream>());
    }
}
