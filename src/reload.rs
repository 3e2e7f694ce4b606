//! Reloading the configuration without dropping a socket: on SIGHUP, or when the config
//! file changes (looked at every `reload.watch`), the file is parsed and validated as
//! `wsbeat check` does, its certificate files are loaded, and the whole configuration is
//! swapped in one step ([`Proxy::reconfigure`]). A reload that fails changes nothing.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;

use tokio_util::task::AbortOnDropHandle;

use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::server::Proxy;
use crate::tls;

/// What a config file was when it was last loaded or tried: the file its path resolves
/// to (a Kubernetes ConfigMap swaps the `..data` symlink, so the path itself never
/// changes) and its bytes (an edit in place may keep the mtime and the size).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    target: PathBuf,
    content: Vec<u8>,
}

impl Snapshot {
    /// Resolves `path` and reads what it resolves to: the two belong together even while
    /// the symlink is being swapped.
    fn read(path: &Path) -> std::io::Result<Snapshot> {
        let target = std::fs::canonicalize(path)?;
        let content = std::fs::read(&target)?;
        Ok(Snapshot { target, content })
    }
}

/// Makes the file's configuration into the one to run: the command-line overrides, then
/// `validate()`. Start-up and every reload take the same steps.
pub type Finish = dyn Fn(Config) -> Result<Config, ConfigError> + Send + Sync;

/// Where the configuration comes from: the config file (or none: flags only) and the
/// command-line overrides applied to it. Made before anything listens: it installs the
/// SIGHUP handler, so that from then on SIGHUP reloads instead of ending the process.
pub struct Source {
    path: Option<PathBuf>,
    finish: Box<Finish>,
    /// The file as last loaded or tried; the watch reloads when it differs.
    baseline: Option<Snapshot>,
    hangups: Option<tokio::signal::unix::Signal>,
}

impl Source {
    /// `path`: the config file, `None` for flags only. `finish` applies the overrides
    /// and validates. Call it inside the tokio runtime: SIGHUP is handled from here on.
    pub fn new(
        path: Option<PathBuf>,
        finish: impl Fn(Config) -> Result<Config, ConfigError> + Send + Sync + 'static,
    ) -> Source {
        let hangups = tokio::runtime::Handle::try_current().ok().and_then(|_| {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .map_err(|e| tracing::warn!(error = %e, "cannot handle SIGHUP"))
                .ok()
        });
        Source {
            path,
            finish: Box::new(finish),
            baseline: None,
            hangups,
        }
    }

    /// Loads the configuration (at start-up, or for `wsbeat check`): reads the file,
    /// parses, applies the overrides, validates. The file read becomes the baseline the
    /// watch compares with.
    pub fn load(&mut self) -> Result<Config, ConfigError> {
        let Some(path) = self.path.clone() else {
            return (self.finish)(Config::default());
        };
        let snapshot = Snapshot::read(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        self.baseline = Some(snapshot.clone());
        self.parse(&path, &snapshot)
    }

    fn parse(&self, path: &Path, snapshot: &Snapshot) -> Result<Config, ConfigError> {
        let text = std::str::from_utf8(&snapshot.content).map_err(|e| ConfigError::Read {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        (self.finish)(Config::from_yaml(text, &path.display().to_string())?)
    }
}

/// Why a reload was not applied: the message names the key or file and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("config key `{key}`: changed from {from} to {to}: a restart is needed to apply it")]
    NeedsRestart {
        key: &'static str,
        from: String,
        to: String,
    },
}

/// Refuses a configuration that changes what only a restart can: the listeners,
/// whether connections start with a PROXY header, and the runtime's worker threads.
pub fn needs_restart(running: &Config, new: &Config) -> Result<(), ReloadError> {
    let changed = |key, from: String, to: String| {
        if from == to {
            Ok(())
        } else {
            Err(ReloadError::NeedsRestart { key, from, to })
        }
    };
    let admin = |c: &Config| c.admin.listen.map_or("null".to_owned(), |a| a.to_string());
    changed("listen", running.listen.to_string(), new.listen.to_string())?;
    changed("admin.listen", admin(running), admin(new))?;
    changed(
        "proxy_protocol",
        running.proxy_protocol.to_string(),
        new.proxy_protocol.to_string(),
    )?;
    let workers = |c: &Config| {
        c.runtime
            .workers
            .map_or("null".to_owned(), |n| n.to_string())
    };
    changed("runtime.workers", workers(running), workers(new))
}

/// What makes a reload happen.
enum Event {
    Hangup,
    /// The server is shutting down: stop looking.
    Stop,
}

/// The running reloads: the SIGHUP listener, the watch of the config file, and the
/// background reload of the certificate files in use. Stopped when dropped.
pub struct Reloading {
    events: Option<Sender<Event>>,
    _hangups: Option<AbortOnDropHandle<()>>,
    /// The certificate watch of the configuration in use, when no reload thread holds it.
    _certificates: Option<tls::Reloader>,
}

impl Drop for Reloading {
    fn drop(&mut self) {
        if let Some(events) = &self.events {
            let _ = events.send(Event::Stop);
        }
    }
}

impl Reloading {
    /// Starts reloading `proxy`'s configuration from `source` (`None`: never, as for a
    /// proxy started in-process). `certificates` is the background reload of the
    /// certificate files of the configuration in use; a reload replaces it with the
    /// new configuration's.
    pub fn start(
        source: Option<Source>,
        proxy: Arc<Proxy>,
        metrics: Arc<Metrics>,
        certificates: Option<tls::Reloader>,
    ) -> Reloading {
        let Some(mut source) = source else {
            return Reloading {
                events: None,
                _hangups: None,
                _certificates: certificates,
            };
        };
        let hangups = source.hangups.take();
        let Some(path) = source.path.clone() else {
            // Flags only: SIGHUP has nothing to reload, and must not end the process.
            let hangups = hangups.map(|mut hangups| {
                AbortOnDropHandle::new(tokio::spawn(async move {
                    while hangups.recv().await.is_some() {
                        tracing::info!("SIGHUP: no config file (flags only): nothing to reload");
                    }
                }))
            });
            return Reloading {
                events: None,
                _hangups: hangups,
                _certificates: certificates,
            };
        };
        let (events, received) = std::sync::mpsc::channel();
        let hangups = hangups.map(|mut hangups| {
            let events = events.clone();
            AbortOnDropHandle::new(tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    if events.send(Event::Hangup).is_err() {
                        return;
                    }
                }
            }))
        });
        let watcher = Watcher {
            path,
            source,
            proxy,
            metrics,
            certificates,
        };
        let runtime = tokio::runtime::Handle::current();
        // A thread of its own, as the certificate watch: a read that hangs (a stuck
        // volume) blocks only this thread, never a worker nor the process's exit.
        let spawned = std::thread::Builder::new()
            .name("wsbeat-config-reload".to_owned())
            .spawn(move || {
                let _runtime = runtime.enter();
                watcher.run(received);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the config reload: SIGHUP and file changes are ignored");
        }
        Reloading {
            events: Some(events),
            _hangups: hangups,
            _certificates: None,
        }
    }
}

/// The reload thread's state.
struct Watcher {
    path: PathBuf,
    source: Source,
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    certificates: Option<tls::Reloader>,
}

impl Watcher {
    fn run(mut self, events: Receiver<Event>) {
        loop {
            // The interval of the configuration in use: a reload may change it.
            let event = match self.proxy.runtime().config.reload.watch {
                Some(every) => events.recv_timeout(every.0),
                None => events.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match event {
                Ok(Event::Hangup) => {
                    let snapshot = Snapshot::read(&self.path);
                    self.reload("SIGHUP", snapshot);
                }
                Err(RecvTimeoutError::Timeout) => match Snapshot::read(&self.path) {
                    Ok(s) if Some(&s) != self.source.baseline.as_ref() => {
                        self.reload("file changed", Ok(s))
                    }
                    Ok(_) => {}
                    // Missing for a moment while it is replaced: looked at again next time.
                    Err(e) => {
                        tracing::debug!(file = %self.path.display(), error = %e, "config file unreadable")
                    }
                },
                Ok(Event::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Applies `snapshot` if it makes a usable configuration; otherwise changes nothing
    /// and logs one error line. Either way it becomes the baseline: the same content is
    /// never applied (nor refused) twice by the watch.
    fn reload(&mut self, trigger: &'static str, snapshot: std::io::Result<Snapshot>) {
        let file = self.path.display().to_string();
        match self.prepare(snapshot) {
            Ok((config, mut setup)) => {
                let certificates = setup.reload_in_background();
                self.proxy.reconfigure(Arc::new(config), setup);
                // The old configuration's certificate watch stops here.
                self.certificates = certificates;
                self.metrics.reloaded(true);
                tracing::info!(trigger, file, "configuration reloaded");
            }
            Err(e) => {
                self.metrics.reloaded(false);
                tracing::error!(
                    trigger,
                    file,
                    error = %e,
                    "configuration not reloaded: keeping the one in use"
                );
            }
        }
    }

    /// Everything that can fail, before anything is changed: read, parse, validate,
    /// refuse restart-only changes, load the certificate files.
    fn prepare(
        &mut self,
        snapshot: std::io::Result<Snapshot>,
    ) -> Result<(Config, tls::Setup), ReloadError> {
        let snapshot = snapshot.map_err(|source| ConfigError::Read {
            path: self.path.clone(),
            source,
        })?;
        self.source.baseline = Some(snapshot.clone());
        let config = self.source.parse(&self.path, &snapshot)?;
        needs_restart(&self.proxy.runtime().config, &config)?;
        let setup = tls::Setup::load(&config)?;
        Ok((config, setup))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_and_proxy_protocol_need_a_restart_and_the_rest_does_not() {
        let running = Config::default();
        let mut new = running.clone();
        new.heartbeat.message = Some("changed".into());
        new.limits.max_connections = 7;
        assert!(needs_restart(&running, &new).is_ok());
        let mut listen = running.clone();
        listen.listen = "127.0.0.1:1".parse().unwrap();
        let e = needs_restart(&running, &listen).unwrap_err().to_string();
        assert!(e.contains("`listen`") && e.contains("restart"), "{e}");
        let mut admin = running.clone();
        admin.admin.listen = None;
        let e = needs_restart(&running, &admin).unwrap_err().to_string();
        assert!(e.contains("`admin.listen`") && e.contains("null"), "{e}");
        let mut proxy_protocol = running.clone();
        proxy_protocol.proxy_protocol = true;
        let e = needs_restart(&running, &proxy_protocol)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`proxy_protocol`"), "{e}");
        let mut workers = running.clone();
        workers.runtime.workers = Some(1);
        let e = needs_restart(&running, &workers).unwrap_err().to_string();
        assert!(e.contains("`runtime.workers`"), "{e}");
    }

    #[test]
    fn a_snapshot_follows_symlinks_and_sees_the_content() {
        let dir = std::env::temp_dir().join(format!("wsbeat-reload-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("v1")).unwrap();
        std::fs::create_dir_all(dir.join("v2")).unwrap();
        std::fs::write(dir.join("v1/c.yaml"), "a").unwrap();
        std::fs::write(dir.join("v2/c.yaml"), "a").unwrap();
        std::os::unix::fs::symlink("v1", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/c.yaml", dir.join("c.yaml")).unwrap();
        let first = Snapshot::read(&dir.join("c.yaml")).unwrap();
        // Same bytes behind another target: a change (the ConfigMap was swapped).
        std::os::unix::fs::symlink("v2", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        let swapped = Snapshot::read(&dir.join("c.yaml")).unwrap();
        assert_ne!(first, swapped);
        assert_eq!(first.content, swapped.content);
        // Same target, other bytes: a change too.
        std::fs::write(dir.join("v2/c.yaml"), "b").unwrap();
        assert_ne!(swapped, Snapshot::read(&dir.join("c.yaml")).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
