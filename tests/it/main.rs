//! wsbeat's integration tests, in one binary (one link of the crate instead of one per
//! file), a module per area. Shared helpers live in `common`.
//!
//! `cargo test` needs only the Rust toolchain. A test that needs anything else (Python
//! packages, promtool, openssl, HAProxy, Node and Chromium, root for network namespaces) is
//! `#[ignore = "needs …: how to install"]`; `bash .ci/run` installs all of it and runs
//! `cargo test -- --include-ignored`.

mod common;

mod browser;
mod churn;
mod cli;
mod compression;
mod conformance;
mod contract;
mod drain;
mod faults;
mod haproxy;
mod heartbeat;
mod hostile;
mod http;
mod http2;
mod http_pool;
mod limits;
mod metrics;
mod netns;
mod paths;
mod proxy_protocol;
mod rebalance;
mod relay;
mod reload;
mod structure;
mod tls;
mod trust;
