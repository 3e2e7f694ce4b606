//! `wsbeat demo`: an embedded echo backend with the proxy in front of it, for a first
//! look without any backend of one's own.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;

use crate::config::{Config, UpstreamUrl};

/// Echoes every text and binary message back, on every connection, until `listener`'s
/// task is dropped. This is the demo's backend: it knows nothing of heartbeats.
pub async fn echo_backend(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Runs the demo: the echo backend on an ephemeral port and wsbeat on `listen`.
pub async fn run(
    listen: SocketAddr,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), crate::Error> {
    let backend_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let backend = crate::bind(backend_addr).await?;
    let backend_addr = backend.local_addr().map_err(|source| crate::Error::Bind {
        addr: backend_addr,
        source,
    })?;
    tokio::spawn(echo_backend(backend));

    let listener = crate::bind(listen).await?;
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
    println!(
        "wsbeat demo\n\
         \x20 echo backend (no heartbeats of its own): ws://{backend_addr}/\n\
         \x20 wsbeat in front of it:                   ws://{proxy_addr}/\n\n\
         Connect a WebSocket client to ws://{proxy_addr}/, for example:\n\
         \x20 python3 -m websockets ws://{proxy_addr}/\n\
         You will receive \"{hb}\" every {interval}, and whatever you send is echoed back.\n\
         Send \"{hb}\" yourself: wsbeat drops it, the backend never sees it.\n\
         Ctrl-C stops the demo.",
        hb = config.heartbeat.message.as_deref().unwrap_or(""),
        interval = config.heartbeat.interval,
    );
    crate::serve(Arc::new(config), listener, None, shutdown).await;
    Ok(())
}
