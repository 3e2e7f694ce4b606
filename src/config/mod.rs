//! Configuration: the YAML document with its defaults (`document`), humane units
//! (`units`), IP networks (`cidr`), upstream URLs (`url`), routes and their per-route overrides (`routes`), and
//! the pure `validate()` (`validate`). Loading the certificate files the document names is
//! a step of its own, in `tls`.
//!
//! Every field's doc comment is the config reference; `config/wsbeat.yaml` mirrors it.

mod cidr;
mod document;
mod routes;
mod units;
mod url;
mod validate;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use cidr::*;
pub use document::*;
pub use routes::*;
pub use units::*;
pub use url::*;

/// A configuration that cannot be used; the message names the key or file and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}
