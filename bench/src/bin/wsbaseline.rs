//! wsbaseline: the limit baseline for the idle-cost scenario. A minimal WebSocket server
//! that holds the connections the load generator opens and sends them what wsbeat sends
//! an idle connection at its defaults, nothing else: the heartbeat text frame
//! (`--heartbeat--`) every 4 s and a protocol PING every 10 s, each connection on its own
//! clock from its handshake; a PING that falls due with a heartbeat goes in the same
//! write (at 20 s, 40 s, 60 s…), the others in a write of their own. It reads and discards
//! what the client sends (PONGs). No backend, no parsing beyond the upgrade request, no
//! metrics.
//!
//! Prints `listening on ADDR` on stdout once the listener is bound.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

#[derive(Parser, Debug)]
#[command(about = "Limit baseline: heartbeats and PINGs on idle WebSockets, nothing else")]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Tokio worker threads (default: the number of cores, like wsbeat).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value_t = 4000)]
    heartbeat_ms: u64,
    #[arg(long, default_value_t = 10_000)]
    ping_ms: u64,
}

const HEARTBEAT: &[u8] = b"--heartbeat--";

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
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
    let hb = Duration::from_millis(args.heartbeat_ms);
    let ping = Duration::from_millis(args.ping_ms);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("wsbaseline: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = hold(stream, hb, ping).await;
        });
    }
}

/// Reads the upgrade request and answers 101; returns the key's accept value.
async fn upgrade(stream: &mut TcpStream) -> std::io::Result<()> {
    let mut req = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || req.len() > 16 * 1024 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        req.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&req);
    let key = text
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim().to_owned())
        })
        .ok_or(std::io::ErrorKind::InvalidData)?;
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    stream.write_all(resp.as_bytes()).await
}

/// Appends an unmasked frame (FIN set; payloads here are under 126 bytes).
fn frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    out.push(payload.len() as u8);
    out.extend_from_slice(payload);
}

async fn hold(mut stream: TcpStream, hb: Duration, ping: Duration) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    upgrade(&mut stream).await?;
    let start = Instant::now();
    let (mut next_hb, mut next_ping) = (start + hb, start + ping);
    let mut seq = 0u64;
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let at = next_hb.min(next_ping);
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {
                let now = Instant::now();
                out.clear();
                if now >= next_hb {
                    frame(&mut out, 0x1, HEARTBEAT);
                    next_hb += hb;
                }
                if now >= next_ping {
                    seq += 1;
                    frame(&mut out, 0x9, &seq.to_be_bytes());
                    next_ping += ping;
                }
                stream.write_all(&out).await?;
            }
            n = stream.read(&mut buf) => {
                if n? == 0 {
                    return Ok(());
                }
            }
        }
    }
}
