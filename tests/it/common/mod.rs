//! Shared test helpers: real backends, wsbeat in-process and as a child process, clients
//! above and below the WebSocket library.

mod backend;
mod h2client;
mod haproxy;
mod process;
mod proxy;
mod raw;

use std::time::Duration;

pub use backend::*;
pub use h2client::*;
pub use haproxy::*;
pub use process::*;
pub use proxy::*;
pub use raw::*;

/// Generous upper bound for anything a test waits for; reaching it fails the test.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// The default heartbeat string.
pub const HB: &str = "--heartbeat--";
