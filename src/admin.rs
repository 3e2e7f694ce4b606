//! The admin listener: `/metrics`, `/livez`, `/readyz`, `/connections`. Never on the
//! public port; it stays up until the process exits, so `/readyz` can say "draining".

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// How long a scraper may take to send its request head.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What the admin endpoints read.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    /// True while listening and not draining: `/readyz` answers 200.
    pub ready: Arc<AtomicBool>,
}

/// Serves the admin endpoints until the task is dropped.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin listening");
    }
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.respond(&req)) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

impl Admin {
    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
        }
        match req.uri().path() {
            "/metrics" => reply(
                StatusCode::OK,
                prometheus::TEXT_FORMAT,
                self.metrics.render(),
            ),
            "/livez" => reply(StatusCode::OK, "text/plain", "ok\n"),
            "/readyz" if self.ready.load(Ordering::Relaxed) => {
                reply(StatusCode::OK, "text/plain", "ready\n")
            }
            "/readyz" => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n"),
            "/connections" => {
                let now = tokio::time::Instant::now();
                let list: Vec<_> = self
                    .metrics
                    .connections()
                    .list()
                    .iter()
                    .map(|c| c.to_json(now))
                    .collect();
                let body = serde_json::to_vec(&list).unwrap_or_else(|_| b"[]".to_vec());
                reply(StatusCode::OK, "application/json", body)
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /metrics /livez /readyz /connections\n",
            ),
        }
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}
