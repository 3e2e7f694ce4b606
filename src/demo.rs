//! `wsbeat demo`: an embedded backend (echo, a ticking demo session, the demo page) with the
//! proxy in front of it, for a first look without any backend of one's own.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use wsbeat::config::{Config, UpstreamUrl};

/// The demo page; `__DEMO_CONFIG__` becomes a JSON object (see [`Site::page`]).
const PAGE: &str = include_str!("demo/page.html");
/// The WebSocket path of the demo session (ticks, pause, kill); any other path echoes.
pub const DEMO_PATH: &str = "/demo";
/// How often the demo session sends its own message.
const TICK: Duration = Duration::from_secs(1);
/// Longest wait for a request head on the backend.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the demo page needs to know, filled in when the page is served.
#[derive(Debug, Clone)]
pub struct Site {
    /// wsbeat's port: the page served by the backend directly connects through it.
    pub proxy_port: u16,
    /// The backend's own port.
    pub backend_port: u16,
    /// The heartbeat string wsbeat sends (the page's client must expect the same).
    pub heartbeat: String,
    /// wsbeat's heartbeat interval, which scales the page's heartbeat chart.
    pub heartbeat_interval: Duration,
}

impl Site {
    /// The page with its configuration. Loaded from wsbeat's port (plain HTTP passed
    /// through to this backend), it connects back to where it came from; loaded from the
    /// backend's port, it connects to wsbeat's port on the same host.
    fn page(&self) -> String {
        let config = serde_json::json!({
            "proxyPort": self.proxy_port,
            "backendPort": self.backend_port,
            "path": DEMO_PATH,
            "heartbeat": self.heartbeat,
            "heartbeatIntervalMs": self.heartbeat_interval.as_millis() as u64,
        });
        // With `<` escaped, no string in the JSON can end the <script> it sits in.
        PAGE.replace(
            "__DEMO_CONFIG__",
            &config.to_string().replace('<', "\\u003c"),
        )
    }
}

/// Serves the demo backend on `listener` until its task is dropped: WebSocket upgrades on
/// [`DEMO_PATH`] get a demo session, on any other path an echo; `GET /` is the demo page
/// and `GET /wsbeat.js` the client library. It knows nothing of heartbeats.
pub async fn backend(listener: TcpListener, site: Arc<Site>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let site = site.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let site = site.clone();
                async move { Ok::<_, Infallible>(respond(req, &site)) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

fn respond(mut req: Request<Incoming>, site: &Site) -> Response<Full<Bytes>> {
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let wants_websocket = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if let (true, Some(key)) = (wants_websocket, key) {
        let demo = req.uri().path() == DEMO_PATH;
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else {
                return;
            };
            let ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            if demo {
                demo_session(ws).await;
            } else {
                echo(ws).await;
            }
        });
        let accept = derive_accept_key(key.as_bytes());
        let mut response = Response::new(Full::default());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = response.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(accept) = HeaderValue::from_str(&accept) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        return response;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/" | "/index.html" => reply(StatusCode::OK, "text/html; charset=utf-8", site.page()),
        "/wsbeat.js" => reply(
            StatusCode::OK,
            "text/javascript",
            wsbeat::client_script::SOURCE.into(),
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Echoes every text and binary message back until the peer goes.
async fn echo<S>(mut ws: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(Ok(msg)) = ws.next().await {
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            break;
        }
    }
}

/// The page's session: a `tick N` message every second, and commands from the page:
/// `__pause__` / `__resume__` stop and restart the ticks, `__kill__` drops the connection
/// without a close frame (wsbeat then closes the client with 1011). Anything else echoes.
async fn demo_session<S>(mut ws: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + TICK, TICK);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut paused = false;
    let mut n: u64 = 0;
    loop {
        let reply = tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => match text.as_str() {
                    "__pause__" => {
                        paused = true;
                        Message::text("backend: paused (no more ticks; wsbeat's heartbeats go on)")
                    }
                    "__resume__" => {
                        paused = false;
                        Message::text("backend: resumed")
                    }
                    // Dropping the stream closes the TCP connection with no close frame.
                    "__kill__" => return,
                    _ => Message::Text(text),
                },
                Some(Ok(msg @ Message::Binary(_))) => msg,
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return,
            },
            _ = ticks.tick(), if !paused => {
                n += 1;
                Message::text(format!("tick {n}"))
            }
        };
        if ws.send(reply).await.is_err() {
            return;
        }
    }
}

/// Runs the demo: the backend on an ephemeral port and wsbeat on `listen`.
pub async fn run(
    listen: SocketAddr,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), wsbeat::Error> {
    let backend_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let backend_listener = wsbeat::bind(backend_addr).await?;
    let backend_addr = backend_listener
        .local_addr()
        .map_err(|source| wsbeat::Error::Bind {
            addr: backend_addr,
            source,
        })?;

    let listener = wsbeat::bind(listen).await?;
    let proxy_addr = listener.local_addr().unwrap_or(listen);
    let mut config = Config {
        listen: proxy_addr,
        ..Config::default()
    };
    config.admin.listen = None;
    config.upstream.url = UpstreamUrl {
        secure: false,
        host: backend_addr.ip().to_string(),
        port: backend_addr.port(),
    };
    let hb = config.heartbeat.message.clone().unwrap_or_default();
    let site = Site {
        proxy_port: proxy_addr.port(),
        backend_port: backend_addr.port(),
        heartbeat: hb.clone(),
        heartbeat_interval: config.heartbeat.interval.0,
    };
    tokio::spawn(backend(backend_listener, Arc::new(site)));
    println!(
        "wsbeat demo\n\
         \x20 echo backend (no heartbeats of its own): ws://{backend_addr}/\n\
         \x20 wsbeat in front of it:                   ws://{proxy_addr}/\n\
         \x20 demo page, through wsbeat:              http://{proxy_addr}/\n\n\
         Open the demo page in a browser, or connect a WebSocket client to ws://{proxy_addr}/,\n\
         for example:\n\
         \x20 python3 -m websockets ws://{proxy_addr}/\n\
         You will receive \"{hb}\" every {interval}, and whatever you send is echoed back.\n\
         Send \"{hb}\" yourself: wsbeat drops it, the backend never sees it.\n\
         Ctrl-C stops the demo.",
        interval = config.heartbeat.interval,
    );
    let tls = wsbeat::tls::Setup::load(&config)?;
    wsbeat::serve(Arc::new(config), tls, listener, None, shutdown).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_gets_its_configuration_and_imports_the_served_client() {
        let site = Site {
            proxy_port: 8080,
            backend_port: 40000,
            heartbeat: "--heartbeat--".into(),
            heartbeat_interval: Duration::from_secs(4),
        };
        let page = site.page();
        assert!(!page.contains("__DEMO_CONFIG__"));
        assert!(page.contains(r#""proxyPort":8080"#), "{page}");
        assert!(page.contains(r#""heartbeatIntervalMs":4000"#));
        assert!(page.contains(r#"from "./wsbeat.js""#));

        let hostile = Site {
            heartbeat: "</script><script>alert(1)</script>".into(),
            ..site
        };
        let page = hostile.page();
        assert!(!page.contains("</script><script>alert"));
        assert!(page.contains(r#""heartbeat":"\u003c/script>\u003cscript>alert(1)\u003c/script>""#));
    }
}
