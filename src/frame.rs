//! WebSocket frames on the wire (RFC 6455 §5.2): an incremental parser that validates
//! every header and hands data-frame bytes to the relay to forward verbatim (no message
//! reassembly, no copy of a whole message, no buffer while idle), and an encoder for the
//! frames wsbeat makes itself (heartbeats, PINGs, PONGs, closes).

use bytes::Bytes;

use crate::compression;

/// Longest frame header: 2 bytes, 8 of extended length, 4 of mask.
pub const MAX_HEADER: usize = 14;
/// Longest control-frame payload (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// Frames of a fragmented message held while deciding whether it is the client's
/// heartbeat: past this many (empty fragments), the message streams undecided.
const MAX_HEARTBEAT_FRAGMENTS: usize = 16;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Close codes wsbeat sends.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    /// "No status received": a close frame without a code. Never sent on the wire.
    pub const NO_STATUS: u16 = 1005;
}

/// Who writes the frames a parser reads: clients must mask them, servers must not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    Client,
    Server,
}

/// A protocol violation: the close code the offender gets, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

fn violation<T>(code: u16, reason: &'static str) -> Result<T, Violation> {
    Err(Violation { code, reason })
}

/// Something the relay must act on, reported between forwarded bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A data frame has been forwarded completely; `fin` ends its message, `text` says
    /// whether the message is text (else binary).
    DataFrameEnd {
        fin: bool,
        text: bool,
    },
    /// A text message equal to the heartbeat string, in one frame or in fragments:
    /// dropped, not forwarded. (Fragments held while deciding end without an event.)
    HeartbeatDropped,
    Ping(Bytes),
    Pong(Bytes),
    /// A close frame: its code (`None` when it had none) and reason.
    Close(Option<(u16, String)>),
    /// The peer broke the protocol; nothing more is parsed.
    Violation(Violation),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a header into `header`.
    Header,
    /// Forwarding a data frame's payload.
    Forward { remaining: u64, fin: bool },
    /// Holding a control frame or a possible heartbeat until it is complete.
    Hold { opcode: u8, len: usize },
    /// Holding a fragment of a message that may be the heartbeat, as long as its bytes
    /// match the heartbeat's (see [`Candidate`]).
    HoldFragment { remaining: usize, fin: bool },
    /// After a violation: nothing more is read.
    Failed,
}

/// The incremental frame parser of one leg.
#[derive(Debug)]
pub struct Parser {
    sender: Sender,
    max_message: u64,
    /// The client heartbeat to drop (client leg only).
    heartbeat: Option<Bytes>,
    header: [u8; MAX_HEADER],
    header_len: usize,
    mask: Option<[u8; 4]>,
    state: State,
    /// A data message has begun and its final frame has not been seen: its size so far.
    message: Option<u64>,
    /// The message being read (or last read) is text.
    message_text: bool,
    /// `permessage-deflate` was negotiated: RSV1 may mark a data message compressed.
    compression: bool,
    /// The message being read (or last read) is compressed (RSV1 on its first frame):
    /// its bytes are not UTF-8 and are forwarded unchecked.
    message_compressed: bool,
    /// UTF-8 check of the text message being forwarded.
    utf8: Utf8Check,
    /// Bytes of the current frame's payload seen so far (for the mask's phase).
    payload_pos: usize,
    /// The current data frame's header waits to be forwarded with its first payload
    /// bytes, once they pass the checks: a frame refused in its first read leaves the
    /// other leg's stream between frames, where a close frame can still go.
    header_pending: bool,
    /// The parser failed after part of a data frame was forwarded: the other leg's
    /// stream stays inside that frame for good, so nothing may be written after it.
    cut_mid_frame: bool,
    held: [u8; MAX_CONTROL_PAYLOAD],
    held_len: usize,
    /// A fragmented text message that may be the heartbeat, held until decided. Boxed:
    /// it is rare, and every connection's parser would otherwise carry its room.
    candidate: Option<Box<Candidate>>,
}

/// The frames of a fragmented text message whose payload so far is the start of the
/// heartbeat: held as they came (headers, masked payloads), to be dropped if the message
/// turns out to be the heartbeat, or forwarded verbatim before the rest if not. At most
/// the heartbeat's length of payload is held.
#[derive(Debug, Default)]
struct Candidate {
    /// The frames' bytes as received.
    raw: Vec<u8>,
    /// Where each frame's header starts in `raw`, and its length.
    headers: Vec<(usize, usize)>,
    /// Payload bytes held: all equal to the heartbeat's first bytes.
    matched: usize,
}

impl Parser {
    pub fn new(sender: Sender, max_message: u64, heartbeat: Option<Bytes>) -> Self {
        Parser {
            sender,
            max_message,
            heartbeat,
            header: [0; MAX_HEADER],
            header_len: 0,
            mask: None,
            state: State::Header,
            message: None,
            message_text: false,
            compression: false,
            message_compressed: false,
            utf8: Utf8Check::default(),
            payload_pos: 0,
            header_pending: false,
            cut_mid_frame: false,
            held: [0; MAX_CONTROL_PAYLOAD],
            held_len: 0,
            candidate: None,
        }
    }

    /// The parser of a leg on which `permessage-deflate` was negotiated (RFC 7692 §6):
    /// RSV1 is allowed on the first frame of a data message, which is then forwarded
    /// unchecked (its UTF-8 is the receiver's to check once inflated). A compressed text
    /// message of at most [`compression::MAX_HEARTBEAT_COMPRESSED`] bytes, in one frame,
    /// is inflated alone to see whether it is the heartbeat; a compressed message in
    /// fragments never is one (a heartbeat is a few bytes, sent in one frame).
    pub fn with_compression(mut self, on: bool) -> Self {
        self.compression = on;
        self
    }

    /// True while a data frame is being forwarded: frames of wsbeat's own for the
    /// other leg must wait for its end (forever, when the frame was cut by a violation).
    pub fn mid_frame(&self) -> bool {
        (matches!(self.state, State::Forward { .. }) && !self.header_pending) || self.cut_mid_frame
    }

    /// True while a data message is being forwarded: a heartbeat (a data frame itself)
    /// must wait for its end.
    pub fn mid_message(&self) -> bool {
        self.message.is_some() || self.mid_frame()
    }

    /// Parses `input`, passing data-frame bytes to `forward` (with `true` for the first
    /// bytes of each frame, its header). Stops after the first event; returns how many
    /// bytes it consumed and that event.
    pub fn feed(
        &mut self,
        input: &[u8],
        mut forward: impl FnMut(&[u8], bool),
    ) -> (usize, Option<Event>) {
        let mut used = 0;
        while used < input.len() {
            let rest = &input[used..];
            match self.state {
                State::Failed => return (input.len(), None),
                State::Header => {
                    let (n, header_done) = self.take_header(rest);
                    used += n;
                    if header_done {
                        match self.start_frame(&mut forward) {
                            Ok(Some(event)) => return (used, Some(event)),
                            Ok(None) => {}
                            Err(v) => {
                                self.state = State::Failed;
                                return (used, Some(Event::Violation(v)));
                            }
                        }
                    }
                }
                State::Forward { remaining, fin } => {
                    let n = rest
                        .len()
                        .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    if self.checks_utf8() {
                        // Checked before forwarding, the end of the message included,
                        // so that an invalid message never passes whole.
                        let ends_message = fin && n as u64 == remaining;
                        let checked = self
                            .check_text(&rest[..n])
                            .and_then(|()| self.check_text_end(ends_message));
                        if let Err(v) = checked {
                            self.cut_mid_frame = !self.header_pending;
                            self.state = State::Failed;
                            return (used, Some(Event::Violation(v)));
                        }
                    }
                    if self.header_pending {
                        self.header_pending = false;
                        forward(&self.header[..self.header_len], true);
                    }
                    forward(&rest[..n], false);
                    used += n;
                    let remaining = remaining - n as u64;
                    if remaining == 0 {
                        return (used, Some(self.end_data_frame(fin)));
                    }
                    self.state = State::Forward { remaining, fin };
                }
                State::HoldFragment { remaining, fin } => {
                    let n = rest.len().min(remaining);
                    let matched = self.take_candidate_bytes(&rest[..n]);
                    used += matched;
                    if matched < n {
                        // Not the heartbeat: what was held goes first, then the rest of
                        // this frame streams.
                        if let Err(v) = self.release_candidate(&mut forward) {
                            self.state = State::Failed;
                            return (used, Some(Event::Violation(v)));
                        }
                        self.state = State::Forward {
                            remaining: (remaining - matched) as u64,
                            fin,
                        };
                        continue;
                    }
                    if matched < remaining {
                        self.state = State::HoldFragment {
                            remaining: remaining - matched,
                            fin,
                        };
                    } else if let Some(event) = self.end_held_fragment(fin) {
                        return (used, Some(event));
                    }
                }
                State::Hold { opcode, len } => {
                    let n = rest.len().min(len - self.held_len);
                    self.held[self.held_len..self.held_len + n].copy_from_slice(&rest[..n]);
                    self.held_len += n;
                    used += n;
                    if self.held_len == len {
                        let event = self.end_held_frame(opcode, &mut forward);
                        if let Event::Violation(_) = event {
                            self.state = State::Failed;
                        }
                        return (used, Some(event));
                    }
                }
            }
        }
        (used, None)
    }

    /// Copies header bytes from `input`; returns how many it took and whether the
    /// header is now complete.
    fn take_header(&mut self, input: &[u8]) -> (usize, bool) {
        let mut used = 0;
        loop {
            let need = self.header_needed();
            if self.header_len == need {
                return (used, true);
            }
            if used == input.len() {
                return (used, false);
            }
            let n = (need - self.header_len).min(input.len() - used);
            self.header[self.header_len..self.header_len + n]
                .copy_from_slice(&input[used..used + n]);
            self.header_len += n;
            used += n;
        }
    }

    /// The header's full length, as far as the bytes so far tell.
    fn header_needed(&self) -> usize {
        if self.header_len < 2 {
            return 2;
        }
        let ext = match self.header[1] & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        2 + ext + mask
    }

    /// Validates a complete header and sets up the frame's payload state.
    fn start_frame(
        &mut self,
        forward: &mut impl FnMut(&[u8], bool),
    ) -> Result<Option<Event>, Violation> {
        use close::{PROTOCOL_ERROR, TOO_BIG};
        let b0 = self.header[0];
        let b1 = self.header[1];
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0F;
        let masked = b1 & 0x80 != 0;
        let rsv1 = b0 & 0x40 != 0;
        if b0 & 0x30 != 0 || (rsv1 && !self.compression) {
            return violation(PROTOCOL_ERROR, "reserved bits set without an extension");
        }
        if rsv1 && !matches!(opcode, OP_TEXT | OP_BINARY) {
            // RFC 7692 §6.1: only the first frame of a data message carries it.
            return violation(PROTOCOL_ERROR, "RSV1 on a control or continuation frame");
        }
        let (len, mask_at) = match b1 & 0x7F {
            126 => (
                u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
                4,
            ),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.header[2..10]);
                (u64::from_be_bytes(b), 10)
            }
            n => (u64::from(n), 2),
        };
        if len >> 63 != 0 {
            return violation(PROTOCOL_ERROR, "frame length with the top bit set");
        }
        match (self.sender, masked) {
            (Sender::Client, false) => {
                return violation(PROTOCOL_ERROR, "unmasked frame from a client")
            }
            (Sender::Server, true) => {
                return violation(PROTOCOL_ERROR, "masked frame from a server")
            }
            _ => {}
        }
        self.mask = masked.then(|| {
            let mut m = [0u8; 4];
            m.copy_from_slice(&self.header[mask_at..mask_at + 4]);
            m
        });
        self.held_len = 0;
        self.payload_pos = 0;
        match opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !fin {
                    return violation(PROTOCOL_ERROR, "fragmented control frame");
                }
                if len > MAX_CONTROL_PAYLOAD as u64 {
                    return violation(PROTOCOL_ERROR, "control frame over 125 bytes");
                }
                self.state = State::Hold {
                    opcode,
                    len: len as usize,
                };
                if len == 0 {
                    return Ok(Some(self.end_held_frame(opcode, forward)));
                }
                Ok(None)
            }
            OP_CONTINUATION | OP_TEXT | OP_BINARY => {
                let so_far = match (opcode, self.message) {
                    (OP_CONTINUATION, Some(n)) => n,
                    (OP_CONTINUATION, None) => {
                        return violation(PROTOCOL_ERROR, "continuation frame outside a message")
                    }
                    (_, Some(_)) => {
                        return violation(PROTOCOL_ERROR, "new message inside a fragmented one")
                    }
                    (_, None) => 0,
                };
                let total = so_far.saturating_add(len);
                if total > self.max_message {
                    return violation(TOO_BIG, "message too big");
                }
                self.message = if fin { None } else { Some(total) };
                if opcode != OP_CONTINUATION {
                    self.message_text = opcode == OP_TEXT;
                    self.message_compressed = rsv1;
                }
                if self.holds_fragment(opcode, fin, so_far, len) {
                    let candidate = self.candidate.get_or_insert_with(Box::default);
                    let header = &self.header[..self.header_len];
                    candidate.headers.push((candidate.raw.len(), header.len()));
                    candidate.raw.extend_from_slice(header);
                    self.header_len = 0;
                    self.state = State::HoldFragment {
                        remaining: len as usize,
                        fin,
                    };
                    if len == 0 {
                        return Ok(self.end_held_fragment(fin));
                    }
                    return Ok(None);
                }
                // Not (or no longer) possibly the heartbeat.
                self.release_candidate(forward)?;
                let compressed = self.message_compressed;
                let candidate = opcode == OP_TEXT
                    && fin
                    && so_far == 0
                    && self.heartbeat.as_ref().is_some_and(|h| match compressed {
                        false => h.len() as u64 == len,
                        true => len <= compression::MAX_HEARTBEAT_COMPRESSED as u64,
                    });
                if candidate {
                    self.state = State::Hold {
                        opcode,
                        len: len as usize,
                    };
                    if len == 0 {
                        return Ok(Some(self.end_held_frame(opcode, forward)));
                    }
                    return Ok(None);
                }
                if len == 0 {
                    self.check_text_end(fin && self.checks_utf8())?;
                    forward(&self.header[..self.header_len], true);
                    return Ok(Some(self.end_data_frame(fin)));
                }
                self.header_pending = true;
                self.state = State::Forward {
                    remaining: len,
                    fin,
                };
                Ok(None)
            }
            _ => violation(PROTOCOL_ERROR, "unknown opcode"),
        }
    }

    /// Whether this data frame is held as part of a fragmented message that may be the
    /// heartbeat: its message is text, in fragments, and with this frame no longer
    /// than the heartbeat (exactly as long once it ends), and its bytes so far match.
    fn holds_fragment(&self, opcode: u8, fin: bool, so_far: u64, len: u64) -> bool {
        let Some(heartbeat) = &self.heartbeat else {
            return false;
        };
        if self.message_compressed {
            return false;
        }
        let limit = heartbeat.len() as u64;
        let total = so_far.saturating_add(len);
        let fits = total <= limit && (!fin || total == limit);
        match &self.candidate {
            Some(c) => {
                opcode == OP_CONTINUATION && fits && c.headers.len() < MAX_HEARTBEAT_FRAGMENTS
            }
            // A heartbeat in one frame is held as a whole (`State::Hold`).
            None => opcode == OP_TEXT && !fin && fits,
        }
    }

    /// Holds the longest start of `masked` (payload of the current frame) that goes on
    /// matching the heartbeat; returns how many bytes it took.
    fn take_candidate_bytes(&mut self, masked: &[u8]) -> usize {
        let (Some(c), Some(heartbeat)) = (self.candidate.as_mut(), self.heartbeat.as_ref()) else {
            return 0;
        };
        let mask = self.mask.unwrap_or([0; 4]);
        let expected = heartbeat.get(c.matched..).unwrap_or_default();
        let n = masked
            .iter()
            .zip(expected)
            .enumerate()
            .take_while(|&(i, (&b, &want))| b ^ mask[(self.payload_pos + i) & 3] == want)
            .count();
        c.raw.extend_from_slice(&masked[..n]);
        c.matched += n;
        self.payload_pos += n;
        n
    }

    /// A held fragment is complete: the message is the heartbeat when it ends here
    /// (its length was checked at its header), else the next frame decides.
    fn end_held_fragment(&mut self, fin: bool) -> Option<Event> {
        self.state = State::Header;
        self.header_len = 0;
        if fin {
            self.candidate = None;
            return Some(Event::HeartbeatDropped);
        }
        None
    }

    /// The held message is not the heartbeat: forwards its frames as they came (the
    /// first bytes of the message, so they pass the UTF-8 check first).
    fn release_candidate(
        &mut self,
        forward: &mut impl FnMut(&[u8], bool),
    ) -> Result<(), Violation> {
        let Some(c) = self.candidate.take() else {
            return Ok(());
        };
        if let Some(heartbeat) = &self.heartbeat {
            self.utf8
                .feed(heartbeat.get(..c.matched).unwrap_or_default())?;
        }
        for (i, &(start, header_len)) in c.headers.iter().enumerate() {
            let end = c.headers.get(i + 1).map_or(c.raw.len(), |&(next, _)| next);
            forward(&c.raw[start..start + header_len], true);
            forward(&c.raw[start + header_len..end], false);
        }
        Ok(())
    }

    /// The message being forwarded is checked for UTF-8: text, not compressed.
    fn checks_utf8(&self) -> bool {
        self.message_text && !self.message_compressed
    }

    /// Checks a piece of text payload as it passes (unmasking a copy when needed).
    fn check_text(&mut self, masked: &[u8]) -> Result<(), Violation> {
        let Some(mask) = self.mask else {
            self.payload_pos += masked.len();
            return self.utf8.feed(masked);
        };
        let mut plain = [0u8; 1024];
        for piece in masked.chunks(plain.len()) {
            let plain = &mut plain[..piece.len()];
            plain.copy_from_slice(piece);
            apply_mask(plain, mask, self.payload_pos);
            self.payload_pos += piece.len();
            self.utf8.feed(plain)?;
        }
        Ok(())
    }

    /// At the end of a text message (`ends_message`): no code point may be left
    /// incomplete. Called before the message's last bytes are forwarded.
    fn check_text_end(&mut self, ends_message: bool) -> Result<(), Violation> {
        if ends_message && !self.utf8.finish() {
            return violation(close::INVALID_PAYLOAD, "text message is not valid UTF-8");
        }
        Ok(())
    }

    /// A data frame has been forwarded whole (its text checked by `check_text_end`).
    fn end_data_frame(&mut self, fin: bool) -> Event {
        self.state = State::Header;
        self.header_len = 0;
        Event::DataFrameEnd {
            fin,
            text: self.message_text,
        }
    }

    /// A held frame is complete: a control frame, or a text frame that may be the
    /// client's heartbeat.
    fn end_held_frame(&mut self, opcode: u8, forward: &mut impl FnMut(&[u8], bool)) -> Event {
        self.state = State::Header;
        let header_len = std::mem::take(&mut self.header_len);
        let len = self.held_len;
        if opcode == OP_TEXT {
            let mut plain = self.held;
            if let Some(mask) = self.mask {
                apply_mask(&mut plain[..len], mask, 0);
            }
            let heartbeat = match (&self.heartbeat, self.message_compressed) {
                (None, _) => false,
                (Some(h), false) => *h == plain[..len],
                (Some(h), true) => compression::inflates_to(&plain[..len], h),
            };
            if heartbeat {
                return Event::HeartbeatDropped;
            }
            if !self.message_compressed && std::str::from_utf8(&plain[..len]).is_err() {
                return Event::Violation(Violation {
                    code: close::INVALID_PAYLOAD,
                    reason: "text message is not valid UTF-8",
                });
            }
            // Not the heartbeat: forward it as it came.
            forward(&self.header[..header_len], true);
            forward(&self.held[..len], false);
            return Event::DataFrameEnd {
                fin: true,
                text: true,
            };
        }
        if let Some(mask) = self.mask {
            apply_mask(&mut self.held[..len], mask, 0);
        }
        let payload = &self.held[..len];
        match opcode {
            OP_PING => Event::Ping(Bytes::copy_from_slice(payload)),
            OP_PONG => Event::Pong(Bytes::copy_from_slice(payload)),
            _ => match parse_close(payload) {
                Ok(close) => Event::Close(close),
                Err(v) => Event::Violation(v),
            },
        }
    }
}

/// Streaming UTF-8 validation across frame and read boundaries: keeps the bytes of a
/// code point that is not complete yet.
#[derive(Debug, Default)]
struct Utf8Check {
    pending: [u8; 4],
    pending_len: usize,
}

impl Utf8Check {
    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), Violation> {
        let invalid = || violation(close::INVALID_PAYLOAD, "text message is not valid UTF-8");
        if self.pending_len > 0 {
            let width = utf8_width(self.pending[0]);
            let take = (width - self.pending_len).min(bytes.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&bytes[..take]);
            self.pending_len += take;
            bytes = &bytes[take..];
            if self.pending_len < width {
                // Still incomplete; but what is there must be a valid prefix.
                return match std::str::from_utf8(&self.pending[..self.pending_len]) {
                    Err(e) if e.error_len().is_some() => invalid(),
                    _ => Ok(()),
                };
            }
            if std::str::from_utf8(&self.pending[..width]).is_err() {
                return invalid();
            }
            self.pending_len = 0;
        }
        match std::str::from_utf8(bytes) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_some() => invalid(),
            Err(e) => {
                let tail = &bytes[e.valid_up_to()..];
                self.pending[..tail.len()].copy_from_slice(tail);
                self.pending_len = tail.len();
                Ok(())
            }
        }
    }

    /// At the end of the message: true when no code point was left incomplete.
    fn finish(&mut self) -> bool {
        std::mem::take(&mut self.pending_len) == 0
    }
}

/// The length of the UTF-8 sequence a lead byte starts (1 for anything invalid, so that
/// `from_utf8` reports it).
fn utf8_width(lead: u8) -> usize {
    match lead {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => 1,
    }
}

/// A close frame's payload: nothing, or a valid code and a UTF-8 reason.
fn parse_close(payload: &[u8]) -> Result<Option<(u16, String)>, Violation> {
    match payload {
        [] => Ok(None),
        [_] => violation(close::PROTOCOL_ERROR, "close frame with a 1-byte payload"),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close_code_allowed(code) {
                return violation(close::PROTOCOL_ERROR, "invalid close code");
            }
            match std::str::from_utf8(reason) {
                Ok(r) => Ok(Some((code, r.to_owned()))),
                Err(_) => violation(close::INVALID_PAYLOAD, "close reason is not UTF-8"),
            }
        }
    }
}

/// Codes a peer may send (RFC 6455 §7.4, IANA registry): 1005, 1006 and 1015 are for
/// reporting only, 1004 and 1016–2999 are reserved.
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// XORs `data` with `mask`, starting at byte `offset` of the mask cycle: eight bytes at
/// a time (the mask, turned to the phase of `data[0]`, repeated in a `u64`), the tail
/// byte by byte.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut m = mask;
    m.rotate_left(offset & 3);
    let word = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(w) ^ word).to_ne_bytes());
    }
    // The tail starts a multiple of 8 bytes in: the same phase as `data[0]`.
    for (b, k) in chunks.into_remainder().iter_mut().zip(m.iter().cycle()) {
        *b ^= k;
    }
}

/// Appends one complete frame (FIN set) to `out`, masked when `mask` is given.
pub fn encode(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    out.push(0x80 | opcode);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let start = out.len();
    if let Some(m) = mask {
        out.extend_from_slice(&m);
    }
    let payload_at = out.len();
    out.extend_from_slice(payload);
    if let Some(m) = mask {
        apply_mask(&mut out[payload_at..], m, 0);
    }
    debug_assert!(out.len() >= start);
}

/// A close frame's payload: the code and a reason cut to fit in 125 bytes on a UTF-8
/// boundary. Code 1005 means "no code": an empty payload.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    if code == close::NO_STATUS {
        return Vec::new();
    }
    let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut p = Vec::with_capacity(2 + cut);
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(&reason.as_bytes()[..cut]);
    p
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [1, 2, 3, 4];

    /// Feeds `input` in pieces of `step` bytes; returns what was forwarded and the events.
    fn run(p: &mut Parser, input: &[u8], step: usize) -> (Vec<u8>, Vec<Event>) {
        let mut forwarded = Vec::new();
        let mut events = Vec::new();
        for chunk in input.chunks(step.max(1)) {
            let mut rest = chunk;
            while !rest.is_empty() {
                let (n, ev) = p.feed(rest, |b, _| forwarded.extend_from_slice(b));
                rest = &rest[n..];
                events.extend(ev);
            }
        }
        (forwarded, events)
    }

    fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        encode(&mut f, opcode, payload, Some(MASK));
        if !fin {
            f[0] &= 0x7F;
        }
        f
    }

    fn client_parser() -> Parser {
        Parser::new(
            Sender::Client,
            1 << 20,
            Some(Bytes::from_static(b"--heartbeat--")),
        )
    }

    #[test]
    fn data_frames_are_forwarded_verbatim_at_any_chunking() {
        let mut input = client_frame(OP_TEXT, true, b"hello");
        input.extend(client_frame(OP_BINARY, true, &[9u8; 300]));
        input.extend(client_frame(OP_BINARY, true, &vec![7u8; 70_000]));
        for step in [1, 2, 3, 7, 100, 1 << 20] {
            let (fwd, events) = run(&mut client_parser(), &input, step);
            assert_eq!(fwd, input, "step {step}");
            assert_eq!(
                events,
                vec![
                    Event::DataFrameEnd {
                        fin: true,
                        text: true
                    },
                    Event::DataFrameEnd {
                        fin: true,
                        text: false
                    },
                    Event::DataFrameEnd {
                        fin: true,
                        text: false
                    }
                ],
                "step {step}"
            );
        }
    }

    #[test]
    fn fragmented_messages_pass_with_control_frames_between() {
        let mut input = client_frame(OP_TEXT, false, b"he");
        input.extend(client_frame(OP_PING, true, b"p"));
        input.extend(client_frame(OP_CONTINUATION, true, b"llo"));
        let mut p = client_parser();
        let (fwd, events) = run(&mut p, &input, 5);
        let mut expected = client_frame(OP_TEXT, false, b"he");
        expected.extend(client_frame(OP_CONTINUATION, true, b"llo"));
        assert_eq!(fwd, expected);
        assert_eq!(
            events,
            vec![
                Event::DataFrameEnd {
                    fin: false,
                    text: true
                },
                Event::Ping(Bytes::from_static(b"p")),
                Event::DataFrameEnd {
                    fin: true,
                    text: true
                }
            ]
        );
        assert!(!p.mid_message());
    }

    #[test]
    fn the_exact_heartbeat_is_dropped_and_near_misses_forwarded() {
        let hb = client_frame(OP_TEXT, true, b"--heartbeat--");
        let near = client_frame(OP_TEXT, true, b"--heartbeat-!");
        let binary = client_frame(OP_BINARY, true, b"--heartbeat--");
        let mut input = hb.clone();
        input.extend(&near);
        input.extend(&binary);
        let (fwd, events) = run(&mut client_parser(), &input, 4);
        let mut expected = near.clone();
        expected.extend(&binary);
        assert_eq!(fwd, expected);
        assert_eq!(
            events,
            vec![
                Event::HeartbeatDropped,
                Event::DataFrameEnd {
                    fin: true,
                    text: true
                },
                Event::DataFrameEnd {
                    fin: true,
                    text: false
                }
            ]
        );
    }

    #[test]
    fn a_heartbeat_sent_in_fragments_is_dropped_with_control_frames_between() {
        let mut two = client_frame(OP_TEXT, false, b"--heart");
        two.extend(client_frame(OP_CONTINUATION, true, b"beat--"));
        let mut with_ping = client_frame(OP_TEXT, false, b"--heart");
        with_ping.extend(client_frame(OP_PING, true, b"p"));
        with_ping.extend(client_frame(OP_CONTINUATION, true, b"beat--"));
        let mut bytewise = Vec::new();
        for (i, b) in b"--heartbeat--".iter().enumerate() {
            let op = if i == 0 { OP_TEXT } else { OP_CONTINUATION };
            bytewise.extend(client_frame(op, i == 12, &[*b]));
        }
        let mut empty_last = client_frame(OP_TEXT, false, b"--heartbeat--");
        empty_last.extend(client_frame(OP_CONTINUATION, true, b""));
        for input in [&two, &with_ping, &bytewise, &empty_last] {
            for step in [1, 3, 100] {
                let mut p = client_parser();
                let (fwd, events) = run(&mut p, input, step);
                assert!(fwd.is_empty(), "step {step}: forwarded {fwd:?}");
                assert_eq!(events.last(), Some(&Event::HeartbeatDropped), "step {step}");
                assert!(!p.mid_message());
            }
        }
        let (_, events) = run(&mut client_parser(), &with_ping, 100);
        assert_eq!(
            events,
            vec![
                Event::Ping(Bytes::from_static(b"p")),
                Event::HeartbeatDropped
            ]
        );
    }

    #[test]
    fn a_fragmented_message_that_only_starts_like_the_heartbeat_passes_unchanged() {
        let fragments: [&[&[u8]]; 6] = [
            &[b"--heart", b"beat--x"],
            &[b"--heart", b"beat--", b"x"],
            &[b"--heart", b"beat-"],
            &[b"--heart", b"beat-!"],
            &[b"--hearX", b"beat--"],
            &[b"--heartbeat--x", b""],
        ];
        for parts in fragments {
            let mut input = Vec::new();
            for (i, part) in parts.iter().enumerate() {
                let op = if i == 0 { OP_TEXT } else { OP_CONTINUATION };
                input.extend(client_frame(op, i == parts.len() - 1, part));
                if i == 0 {
                    input.extend(client_frame(OP_PONG, true, b"between"));
                }
            }
            for step in [1, 2, 5, 100] {
                let (fwd, events) = run(&mut client_parser(), &input, step);
                let mut expected = input.clone();
                let pong = client_frame(OP_PONG, true, b"between");
                let at = client_frame(OP_TEXT, false, parts[0]).len();
                expected.drain(at..at + pong.len());
                assert_eq!(fwd, expected, "{parts:?} step {step}");
                assert!(
                    events.contains(&Event::Pong(Bytes::from_static(b"between"))),
                    "{events:?}"
                );
                assert_eq!(
                    events.last(),
                    Some(&Event::DataFrameEnd {
                        fin: true,
                        text: true
                    }),
                    "{parts:?} step {step}"
                );
            }
        }
    }

    #[test]
    fn deciding_about_a_fragmented_heartbeat_holds_a_bounded_number_of_frames() {
        // Endless empty fragments cannot make the parser hold without bound: past a
        // few frames the message streams (a heartbeat sent that way is forwarded).
        let mut input = client_frame(OP_TEXT, false, b"--heart");
        for _ in 0..100 {
            input.extend(client_frame(OP_CONTINUATION, false, b""));
        }
        input.extend(client_frame(OP_CONTINUATION, true, b"beat--"));
        let mut p = client_parser();
        let (fwd, events) = run(&mut p, &input, 100);
        assert_eq!(fwd, input);
        assert_eq!(
            events.last(),
            Some(&Event::DataFrameEnd {
                fin: true,
                text: true
            })
        );
        // Text split inside a character, diverging after it, is still checked as UTF-8
        // across the held and the streamed part.
        let mut p = Parser::new(Sender::Client, 1 << 20, Some(Bytes::from("--\u{2665}--")));
        let heart = "\u{2665}".as_bytes();
        let mut input = client_frame(OP_TEXT, false, &[b"--", &heart[..1]].concat());
        input.extend(client_frame(
            OP_CONTINUATION,
            true,
            &[&heart[1..], b"-!"].concat(),
        ));
        let (fwd, events) = run(&mut p, &input, 1);
        assert_eq!(fwd, input);
        assert!(
            !events.iter().any(|e| matches!(e, Event::Violation(_))),
            "{events:?}"
        );
    }

    #[test]
    fn close_frames_are_parsed_and_checked() {
        let mut p = client_parser();
        let f = client_frame(OP_CLOSE, true, &close_payload(4000, "bye"));
        assert_eq!(
            run(&mut p, &f, 3).1,
            vec![Event::Close(Some((4000, "bye".into())))]
        );
        let f = client_frame(OP_CLOSE, true, b"");
        assert_eq!(run(&mut client_parser(), &f, 3).1, vec![Event::Close(None)]);
        for (payload, code) in [
            (vec![3u8], close::PROTOCOL_ERROR),
            (1005u16.to_be_bytes().to_vec(), close::PROTOCOL_ERROR),
            (999u16.to_be_bytes().to_vec(), close::PROTOCOL_ERROR),
            (
                [&1000u16.to_be_bytes()[..], &[0xff, 0xfe]].concat(),
                close::INVALID_PAYLOAD,
            ),
        ] {
            let f = client_frame(OP_CLOSE, true, &payload);
            match &run(&mut client_parser(), &f, 100).1[..] {
                [Event::Violation(v)] => assert_eq!(v.code, code, "{payload:?}"),
                other => panic!("{payload:?}: {other:?}"),
            }
        }
    }

    fn violation_of(p: &mut Parser, input: &[u8]) -> Violation {
        match run(p, input, 100).1.last() {
            Some(Event::Violation(v)) => *v,
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    /// Raw deflate of `data` as a permessage-deflate sender makes one message: a sync
    /// flush with its 4-byte tail removed.
    fn deflate(data: &[u8]) -> Vec<u8> {
        use miniz_oxide::deflate::core::{
            compress, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush,
        };
        let mut c = CompressorOxide::new(create_comp_flags_from_zip_params(6, -15, 0));
        let mut out = vec![0u8; data.len() + 64];
        let (_, _, n) = compress(&mut c, data, &mut out, TDEFLFlush::Sync);
        out.truncate(n - 4);
        out
    }

    /// A client frame with RSV1 set.
    fn compressed_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = client_frame(opcode, fin, payload);
        f[0] |= 0x40;
        f
    }

    #[test]
    fn with_compression_rsv1_passes_on_the_first_frame_of_a_data_message_only() {
        let compressed = || client_parser().with_compression(true);
        // Compressed bytes are not UTF-8: forwarded unchecked, verbatim.
        let mut input = compressed_frame(OP_TEXT, false, &[0xff, 0xfe, 0x00]);
        input.extend(client_frame(OP_PING, true, b"p"));
        input.extend(client_frame(OP_CONTINUATION, true, &[0xc3]));
        input.extend(compressed_frame(OP_BINARY, true, &[1, 2, 3]));
        input.extend(client_frame(OP_TEXT, true, b"plain"));
        for step in [1, 3, 1000] {
            let (forwarded, events) = run(&mut compressed(), &input, step);
            let mut expected = compressed_frame(OP_TEXT, false, &[0xff, 0xfe, 0x00]);
            expected.extend(client_frame(OP_CONTINUATION, true, &[0xc3]));
            expected.extend(compressed_frame(OP_BINARY, true, &[1, 2, 3]));
            expected.extend(client_frame(OP_TEXT, true, b"plain"));
            assert_eq!(forwarded, expected, "step {step}");
            assert!(!events.iter().any(|e| matches!(e, Event::Violation(_))));
        }
        // An uncompressed text message on a compressed connection is still checked.
        let bad = client_frame(OP_TEXT, true, &[0xff; 20]);
        assert_eq!(
            violation_of(&mut compressed(), &bad).code,
            close::INVALID_PAYLOAD
        );
        for (frames, what) in [
            (compressed_frame(OP_PING, true, b"x"), "ping"),
            (
                compressed_frame(OP_CLOSE, true, &1000u16.to_be_bytes()),
                "close",
            ),
            (
                [
                    compressed_frame(OP_TEXT, false, b"a"),
                    compressed_frame(OP_CONTINUATION, true, b"b"),
                ]
                .concat(),
                "continuation",
            ),
            (
                {
                    let mut f = client_frame(OP_TEXT, true, b"x");
                    f[0] |= 0x20;
                    f
                },
                "rsv2",
            ),
        ] {
            let v = violation_of(&mut compressed(), &frames);
            assert_eq!(v.code, close::PROTOCOL_ERROR, "{what}");
        }
        // max_message_size counts the compressed bytes on the wire.
        let mut small = Parser::new(Sender::Client, 10, None).with_compression(true);
        let big = compressed_frame(OP_BINARY, true, &[0u8; 11]);
        assert_eq!(violation_of(&mut small, &big).code, close::TOO_BIG);
        let mut small = Parser::new(Sender::Client, 10, None).with_compression(true);
        let (forwarded, _) = run(&mut small, &compressed_frame(OP_BINARY, true, &[0; 10]), 4);
        assert_eq!(forwarded.len(), 2 + 4 + 10);
    }

    #[test]
    fn a_compressed_heartbeat_in_one_frame_is_dropped_and_anything_else_forwarded() {
        let compressed = || client_parser().with_compression(true);
        let hb = compressed_frame(OP_TEXT, true, &deflate(b"--heartbeat--"));
        for step in [1, 5, 100] {
            let (forwarded, events) = run(&mut compressed(), &hb, step);
            assert!(forwarded.is_empty());
            assert_eq!(events, vec![Event::HeartbeatDropped]);
        }
        // The uncompressed heartbeat is still dropped on a compressed connection.
        let plain = client_frame(OP_TEXT, true, b"--heartbeat--");
        assert_eq!(
            run(&mut compressed(), &plain, 3).1,
            vec![Event::HeartbeatDropped]
        );
        let mut others = vec![
            compressed_frame(OP_TEXT, true, &deflate(b"--heartbeat--!")),
            compressed_frame(OP_TEXT, true, &deflate(b"hello")),
            compressed_frame(OP_BINARY, true, &deflate(b"--heartbeat--")),
            compressed_frame(OP_TEXT, true, &[0xff; 64]),
            compressed_frame(OP_TEXT, true, &[]),
            compressed_frame(OP_TEXT, true, &deflate(&[b'-'; 100_000])),
        ];
        // In fragments a compressed message is never taken for the heartbeat.
        let deflated = deflate(b"--heartbeat--");
        let (a, b) = deflated.split_at(3);
        others.push(
            [
                compressed_frame(OP_TEXT, false, a),
                client_frame(OP_CONTINUATION, true, b),
            ]
            .concat(),
        );
        for frame in others {
            let (forwarded, events) = run(&mut compressed(), &frame, 7);
            assert_eq!(forwarded, frame);
            assert!(matches!(
                events.last(),
                Some(Event::DataFrameEnd { fin: true, .. })
            ));
        }
    }

    #[test]
    fn protocol_violations_are_reported_with_their_close_code() {
        let mut rsv = client_frame(OP_TEXT, true, b"x");
        rsv[0] |= 0x40;
        assert_eq!(
            violation_of(&mut client_parser(), &rsv).code,
            close::PROTOCOL_ERROR
        );
        let unknown = client_frame(0x3, true, b"x");
        assert_eq!(
            violation_of(&mut client_parser(), &unknown).code,
            close::PROTOCOL_ERROR
        );
        let mut unmasked = Vec::new();
        encode(&mut unmasked, OP_TEXT, b"x", None);
        assert_eq!(
            violation_of(&mut client_parser(), &unmasked).reason,
            "unmasked frame from a client"
        );
        let mut server = Parser::new(Sender::Server, 1 << 20, None);
        let masked = client_frame(OP_TEXT, true, b"x");
        assert_eq!(
            violation_of(&mut server, &masked).reason,
            "masked frame from a server"
        );
        let big_ping = client_frame(OP_PING, true, &[0u8; 126]);
        assert_eq!(
            violation_of(&mut client_parser(), &big_ping).code,
            close::PROTOCOL_ERROR
        );
        let frag_ping = client_frame(OP_PING, false, b"");
        assert_eq!(
            violation_of(&mut client_parser(), &frag_ping).code,
            close::PROTOCOL_ERROR
        );
        let cont = client_frame(OP_CONTINUATION, true, b"x");
        assert_eq!(
            violation_of(&mut client_parser(), &cont).code,
            close::PROTOCOL_ERROR
        );
        let mut nested = client_frame(OP_TEXT, false, b"a");
        nested.extend(client_frame(OP_TEXT, true, b"b"));
        assert_eq!(
            violation_of(&mut client_parser(), &nested).code,
            close::PROTOCOL_ERROR
        );
    }

    #[test]
    fn messages_over_the_limit_are_1009_before_any_byte_of_the_frame_is_forwarded() {
        let mut p = Parser::new(Sender::Client, 10, None);
        let mut input = client_frame(OP_BINARY, false, &[1u8; 6]);
        input.extend(client_frame(OP_CONTINUATION, true, &[1u8; 5]));
        let (fwd, events) = run(&mut p, &input, 100);
        assert_eq!(fwd, client_frame(OP_BINARY, false, &[1u8; 6]));
        assert_eq!(
            events.last(),
            Some(&Event::Violation(Violation {
                code: 1009,
                reason: "message too big"
            }))
        );
    }

    #[test]
    fn nothing_is_parsed_after_a_violation() {
        let mut p = client_parser();
        let mut input = client_frame(0x3, true, b"x");
        input.extend(client_frame(OP_TEXT, true, b"after"));
        let (fwd, events) = run(&mut p, &input, 100);
        assert!(fwd.is_empty());
        assert_eq!(events.len(), 1);
    }

    #[test]
    fn encode_masks_and_uses_extended_lengths() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload = vec![0xAB; len];
            let mut f = Vec::new();
            encode(&mut f, OP_BINARY, &payload, Some(MASK));
            let (fwd, events) = run(&mut client_parser(), &f, 1000);
            assert_eq!(fwd, f);
            assert_eq!(
                events,
                vec![Event::DataFrameEnd {
                    fin: true,
                    text: false
                }]
            );
            let mut s = Vec::new();
            encode(&mut s, OP_BINARY, &payload, None);
            let mut server = Parser::new(Sender::Server, 1 << 20, None);
            assert_eq!(run(&mut server, &s, 1000).0, s);
        }
    }

    #[test]
    fn an_invalid_text_message_is_never_forwarded_whole() {
        // The incomplete last code point is seen before the last byte is forwarded, at
        // any chunking, and with an empty final fragment too.
        let single = client_frame(OP_TEXT, true, b"ok \xce");
        let mut split = client_frame(OP_TEXT, false, b"a\xce");
        split.extend(client_frame(OP_CONTINUATION, true, b""));
        for input in [single, split] {
            for step in [1, 3, 100] {
                let (forwarded, events) = run(&mut client_parser(), &input, step);
                assert!(forwarded.len() < input.len(), "step {step}: all forwarded");
                assert!(
                    matches!(events.last(), Some(Event::Violation(_))),
                    "{events:?}"
                );
            }
        }
    }

    #[test]
    fn a_frame_cut_by_a_violation_stays_mid_frame() {
        // Part of the frame has been forwarded when its text turns invalid: the other
        // leg's stream is inside that frame for good.
        let mut p = client_parser();
        let f = client_frame(OP_TEXT, true, b"fine up to here \xff");
        let (forwarded, events) = run(&mut p, &f, f.len() - 1);
        assert!(
            matches!(events.last(), Some(Event::Violation(_))),
            "{events:?}"
        );
        assert!(!forwarded.is_empty());
        assert!(p.mid_frame());
        // A violation before anything of the frame passed leaves it between frames.
        let mut p = client_parser();
        run(&mut p, &client_frame(OP_TEXT, true, b"\xff"), 100);
        assert!(!p.mid_frame());
    }

    #[test]
    fn text_is_checked_for_utf8_across_frames_and_reads() {
        let text = "héllo wörld ✓ 𝄞".as_bytes();
        // Split inside multi-byte characters, across two fragments.
        let cut = 3;
        let mut input = client_frame(OP_TEXT, false, &text[..cut]);
        input.extend(client_frame(OP_CONTINUATION, true, &text[cut..]));
        for step in [1, 2, 5, 100] {
            let (_, events) = run(&mut client_parser(), &input, step);
            assert!(
                !events.iter().any(|e| matches!(e, Event::Violation(_))),
                "step {step}: {events:?}"
            );
        }
        for bad in [&b"\xff"[..], b"ok\xc3", b"\xed\xa0\x80", b"a\xf0\x9d\x84"] {
            let f = client_frame(OP_TEXT, true, bad);
            match run(&mut client_parser(), &f, 1).1.last() {
                Some(Event::Violation(v)) => assert_eq!(v.code, close::INVALID_PAYLOAD, "{bad:?}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        // Binary messages are not checked.
        let f = client_frame(OP_BINARY, true, b"\xff\xfe");
        assert_eq!(
            run(&mut client_parser(), &f, 1).1,
            vec![Event::DataFrameEnd {
                fin: true,
                text: false
            }]
        );
    }

    #[test]
    fn close_payload_cuts_long_reasons_on_a_char_boundary() {
        let p = close_payload(1001, &"é".repeat(100));
        assert!(p.len() <= MAX_CONTROL_PAYLOAD);
        assert!(std::str::from_utf8(&p[2..]).is_ok());
        assert!(close_payload(close::NO_STATUS, "x").is_empty());
    }
}
