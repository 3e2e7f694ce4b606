//! Counts the heap allocations wsbeat makes per WebSocket handshake (issue 19).
//!
//! wsbeat runs in-process on a runtime of its own whose threads, and only those, are
//! counted by a counting global allocator; an echo backend and a client run on the main
//! thread, uncounted. After a warm-up, `--handshakes` sequential connections each do:
//! TCP connect, upgrade through wsbeat (which dials the backend), one text message and
//! its echo, a close handshake, the end of the stream. Prints allocations and bytes
//! allocated per handshake, as one JSON line.
//!
//! ```sh
//! cargo run --release --example handshake_allocs -- --handshakes 2000
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

struct Counting;

thread_local! {
    /// Set on wsbeat's runtime threads: only their allocations are counted.
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

fn count(size: usize) {
    if COUNTED.try_with(Cell::get).unwrap_or(false) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(size as u64, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed on to `System` unchanged; counting touches only atomics
// and a const-initialised thread-local (no allocation inside the allocator).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
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
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// One handshake, one echo, one close.
async fn one(url: &str) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::text("hello")).await.unwrap();
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str() == "hello" => break,
            Some(Ok(_)) => {}
            other => panic!("no echo: {other:?}"),
        }
    }
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
}

fn main() {
    let handshakes = arg("--handshakes", 1000);
    let warmup = arg("--warmup", 200);
    let proxy_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(|| COUNTED.with(|c| c.set(true)))
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let backend = echo_backend().await;
        let mut config = wsbeat::config::Config::default();
        config.admin.listen = None;
        config.upstream.url = format!("ws://{backend}").parse().unwrap();
        config.validate().unwrap();
        let tls = wsbeat::tls::Setup::load(&config).unwrap();
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        proxy_rt.spawn(async move {
            let listener = TcpListener::from_std(std_listener).unwrap();
            wsbeat::serve(
                Arc::new(config),
                tls,
                listener,
                None,
                std::future::pending(),
            )
            .await
        });
        let url = format!("ws://{addr}/");
        for _ in 0..warmup {
            one(&url).await;
        }
        // Let the warm-up's relays finish before counting.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let (a0, b0) = (ALLOCS.load(Ordering::Relaxed), BYTES.load(Ordering::Relaxed));
        for _ in 0..handshakes {
            one(&url).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let (a1, b1) = (ALLOCS.load(Ordering::Relaxed), BYTES.load(Ordering::Relaxed));
        let n = handshakes as f64;
        println!(
            "{{\"handshakes\": {handshakes}, \"allocs_per_handshake\": {:.1}, \"bytes_per_handshake\": {:.0}}}",
            (a1 - a0) as f64 / n,
            (b1 - b0) as f64 / n
        );
    });
    proxy_rt.shutdown_background();
}
