//! An HTTP/2 client (hyper's, over h2c or TLS) that opens WebSockets as RFC 8441
//! extended CONNECT streams, many on one connection.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use super::PATIENCE;

/// A WebSocket's stream on an HTTP/2 connection, as tokio I/O.
pub type H2Io = TokioIo<hyper::upgrade::Upgraded>;
/// A WebSocket client on one HTTP/2 stream.
pub type H2Ws = WebSocketStream<H2Io>;

/// One client HTTP/2 connection; its I/O runs in a task of its own.
pub struct H2Client {
    pub send: SendRequest<Empty<Bytes>>,
    /// Ends with the connection, with how it ended.
    pub conn: JoinHandle<Result<(), hyper::Error>>,
    pub authority: String,
}

impl H2Client {
    /// The HTTP/2 handshake over `io` (h2c with prior knowledge, or TLS that chose `h2`),
    /// and the server's SETTINGS allowing extended CONNECT.
    pub async fn handshake<IO>(io: IO, authority: &str) -> H2Client
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(io))
            .await
            .expect("HTTP/2 handshake");
        // The server's SETTINGS frame comes right after the preface. hyper reads it in a
        // task of its own and tells nobody: the connection's task looks now and then.
        let (enabled, settings) = tokio::sync::oneshot::channel();
        let conn = tokio::spawn(async move {
            let mut conn = Box::pin(conn);
            let mut enabled = Some(enabled);
            let mut look = tokio::time::interval(Duration::from_millis(2));
            loop {
                tokio::select! {
                    r = conn.as_mut() => return r,
                    _ = look.tick(), if enabled.is_some() => {
                        if conn.is_extended_connect_protocol_enabled() {
                            if let Some(tx) = enabled.take() {
                                let _ = tx.send(());
                            }
                        }
                    }
                }
            }
        });
        match tokio::time::timeout(PATIENCE, settings).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("the connection ended before SETTINGS_ENABLE_CONNECT_PROTOCOL"),
            Err(_) => panic!("the server never sent SETTINGS_ENABLE_CONNECT_PROTOCOL"),
        }
        H2Client {
            send,
            conn,
            authority: authority.to_owned(),
        }
    }

    /// h2c with prior knowledge to `addr`.
    pub async fn h2c(addr: std::net::SocketAddr) -> H2Client {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        H2Client::handshake(tcp, &addr.to_string()).await
    }

    /// Sends an extended CONNECT for `path` with `headers`; the response, and the stream
    /// when it was accepted (200).
    pub async fn connect_with(
        &mut self,
        path: &str,
        protocol: Option<&'static str>,
        headers: &[(&str, &str)],
    ) -> Result<H2Io, Response<Incoming>> {
        let scheme = "http";
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("{scheme}://{}{path}", self.authority));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut req = req.body(Empty::new()).unwrap();
        if let Some(p) = protocol {
            req.extensions_mut()
                .insert(hyper::ext::Protocol::from_static(p));
        }
        tokio::time::timeout(PATIENCE, self.send.ready())
            .await
            .expect("stream capacity in time")
            .expect("the connection is open");
        let response = tokio::time::timeout(PATIENCE, self.send.send_request(req))
            .await
            .expect("CONNECT answered in time")
            .expect("CONNECT answered");
        if response.status() != StatusCode::OK {
            return Err(response);
        }
        let upgraded = tokio::time::timeout(PATIENCE, hyper::upgrade::on(response))
            .await
            .expect("stream in time")
            .expect("the accepted CONNECT gives a stream");
        Ok(TokioIo::new(upgraded))
    }

    /// A raw WebSocket stream for `path` (version 13).
    pub async fn raw(&mut self, path: &str) -> H2Io {
        match self
            .connect_with(path, Some("websocket"), &[("sec-websocket-version", "13")])
            .await
        {
            Ok(io) => io,
            Err(r) => panic!("extended CONNECT refused: {}", r.status()),
        }
    }

    /// A WebSocket client on a new stream for `path`.
    pub async fn websocket(&mut self, path: &str) -> H2Ws {
        let io = self.raw(path).await;
        WebSocketStream::from_raw_socket(io, Role::Client, None).await
    }
}
