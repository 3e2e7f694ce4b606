//! wsecho: a minimal WebSocket echo backend for the wsbeat benchmarks.
//!
//! Echoes every text and binary message back on the same connection, answers PINGs
//! (tungstenite does that by itself) and sends nothing of its own: no heartbeats, no PINGs.
//! Prints `listening on ADDR` on stdout once the listener is bound.

use std::io::Write;
use std::net::SocketAddr;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Debug)]
#[command(about = "WebSocket echo backend for the wsbeat benchmarks")]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Tokio worker threads (1 by default so the backend does not take the proxy's cores).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// tungstenite read buffer per connection, bytes (the unit of each socket read).
    #[arg(long, default_value_t = 4096)]
    read_buffer: usize,
    /// tungstenite write buffer per connection, bytes (0: every frame is written at once).
    #[arg(long, default_value_t = 0)]
    write_buffer: usize,
    /// Largest message accepted, bytes.
    #[arg(long, default_value_t = 16 << 20)]
    max_message: usize,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(serve(args))
}

async fn serve(args: Args) -> std::io::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", listener.local_addr()?)?;
        out.flush()?;
    }
    let config = WebSocketConfig::default()
        .read_buffer_size(args.read_buffer)
        .write_buffer_size(args.write_buffer)
        .max_message_size(Some(args.max_message))
        .max_frame_size(Some(args.max_message));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: report, back off briefly, keep serving.
                eprintln!("wsecho: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(echo(stream, config));
    }
}

async fn echo(stream: TcpStream, config: WebSocketConfig) {
    let _ = stream.set_nodelay(true);
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    while let Some(msg) = ws.next().await {
        let msg = match msg {
            Ok(msg) => msg,
            Err(_) => return,
        };
        match msg {
            Message::Text(_) | Message::Binary(_) => {
                if ws.send(msg).await.is_err() {
                    return;
                }
            }
            // PINGs are answered by tungstenite; a close is echoed by tungstenite and
            // the stream then ends.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => {}
        }
    }
}
