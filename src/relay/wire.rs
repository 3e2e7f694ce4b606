//! One leg's wire, apart from its socket: the parser of the frames its peer sends, the
//! bytes queued for the peer, and the writes that hand them over.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::AsyncWrite;
use tokio::time::Instant;

use crate::frame::{encode, Parser};

/// An output buffer larger than this is freed once written, so a connection that
/// carried one large burst does not keep its memory while idle.
const KEEP_CAPACITY: usize = 1024;

/// What wsbeat keeps of one leg's wire. Whether it is still read or written is the
/// close machine's business ([`super::closing`]), not this struct's.
pub(super) struct Wire {
    /// Parses the frames this peer sends.
    pub parser: Parser,
    /// Bytes for this peer not yet written; empty and unallocated when idle.
    pub out: Vec<u8>,
    /// wsbeat's own frames for this peer, waiting for the frame being forwarded to it to
    /// end.
    pub deferred: Vec<u8>,
    /// The frame being read from this peer is forwarded (not dropped while closing).
    pub passing: bool,
    /// Frames to this peer are masked: wsbeat is the upstream's client.
    masks: bool,
    /// Written to the socket but not flushed.
    unflushed: bool,
    /// Since when a write to this peer has been waiting for it to take bytes: the
    /// last time it took some, not the last time it took everything.
    pub blocked_since: Option<Instant>,
}

impl Wire {
    pub fn new(parser: Parser, masks: bool) -> Self {
        Wire {
            parser,
            out: Vec::new(),
            deferred: Vec::new(),
            passing: false,
            masks,
            unflushed: false,
            blocked_since: None,
        }
    }

    /// True when everything queued for the peer is written and flushed.
    pub fn idle(&self) -> bool {
        self.out.is_empty() && self.deferred.is_empty() && !self.unflushed
    }

    /// Bytes queued for the peer, written or waiting behind a forwarded frame.
    pub fn queued(&self) -> usize {
        self.out.len() + self.deferred.len()
    }

    /// Queues one of wsbeat's own frames: after the frame being forwarded to this peer
    /// when `behind_frame`, else now.
    pub fn queue_own(&mut self, opcode: u8, payload: &[u8], behind_frame: bool) {
        let mask = self.masks.then(rand::random::<[u8; 4]>);
        let buf = if behind_frame {
            &mut self.deferred
        } else {
            &mut self.out
        };
        encode(buf, opcode, payload, mask);
    }

    /// The frame forwarded to this peer is complete: its waiting frames may follow.
    pub fn release_deferred(&mut self) {
        if !self.deferred.is_empty() {
            let mut deferred = std::mem::take(&mut self.deferred);
            self.out.append(&mut deferred);
        }
    }

    /// Drops everything queued for the peer, which is given up. Returns whether anything
    /// was dropped.
    pub fn drop_queued(&mut self) -> bool {
        let dropped = !(self.out.is_empty() && self.deferred.is_empty());
        self.out = Vec::new();
        self.deferred = Vec::new();
        self.blocked_since = None;
        dropped
    }

    /// Writes `out` and flushes. Ready(Ok) when everything is written. A peer that
    /// takes some bytes but not all restarts the write timeout (`blocked_since` is
    /// cleared): it measures time without progress, not time to drain the queue, so a
    /// slow but steady reader is never cut.
    pub fn poll_drain<S: AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        let mut progressed = false;
        let polled = self.poll_write_out(io, cx, &mut progressed);
        if polled.is_pending() && progressed {
            self.blocked_since = None;
        }
        polled
    }

    /// The body of `poll_drain`; sets `progressed` when the peer took bytes.
    fn poll_write_out<S: AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        cx: &mut Context<'_>,
        progressed: &mut bool,
    ) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.drain(..n);
            self.unflushed = true;
            *progressed = true;
        }
        if self.out.capacity() > KEEP_CAPACITY {
            self.out = Vec::new();
        }
        if self.unflushed {
            ready!(Pin::new(&mut *io).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }
}
