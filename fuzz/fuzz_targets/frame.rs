//! The frame parser against a reference: tungstenite's frame reader and message
//! assembly (a `WebSocket` over an in-memory stream), plus `std::str::from_utf8`.
//!
//! Input: 4 setup bytes, then the byte stream of one leg.
//! - byte 0: bit 0 the sender (1 client: frames must be masked, 0 server: unmasked),
//!   bit 1 adds 65536 to the message limit, bits 2–7 the largest read (0: the whole
//!   stream at once; else reads of 1 to that many bytes);
//! - bytes 1–2: the message limit (little endian, 0–65535, plus 65536 with bit 1);
//! - byte 3: bit 7 negotiates permessage-deflate (`Parser::with_compression`), bits 0–6
//!   the seed of the read sizes.
//!
//! The stream is cut into those reads and fed to `Parser::feed` (no heartbeat: that
//! drop is wsbeat's own feature, and tungstenite would report it as a message) until a
//! violation, a close frame or the end. Checks:
//! - no panic, and `feed` always makes progress;
//! - event `i` is the parser's verdict on frame `i` of the stream (frames as
//!   tungstenite's `FrameHeader::parse` splits it), of the right kind, with the right
//!   FIN and text flags and control payloads;
//! - what is forwarded is the stream's data frames byte for byte, each header in one
//!   piece; a frame cut by a violation or by the end of the input is a strict prefix
//!   (header included only with payload bytes), exactly when `mid_frame()` says so;
//!   nothing at all is forwarded or reported after a violation;
//! - the messages (text, binary, ping, pong, close) equal the reference's, in order,
//!   and every text message is UTF-8 for `std::str::from_utf8`;
//! - the parser rejects the stream exactly when, and at the same frame as, the
//!   reference does, with the close code RFC 6455 gives the reference's error: 1002
//!   protocol error, 1007 invalid UTF-8, 1009 too big. The exceptions, aligned to the
//!   RFC rather than to tungstenite, are in `compare` and `reference_close_allowed`.
//!
//! With permessage-deflate (RFC 7692) tungstenite has no reference, so the stream is
//! mapped to the one the extension means: RSV1 cleared on the first frame of each data
//! message, and a compressed text message turned binary (its bytes are not UTF-8 and
//! are not checked). The parser without the extension on that stream is checked against
//! tungstenite as above, and the parser with it, on the stream as sent, must do exactly
//! the same (events, close codes, what is forwarded), but for the text flag of the
//! compressed messages.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::{self, Cursor, Read, Write};
use tungstenite::error::{Error, ProtocolError};
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::{Message, Role, WebSocket, WebSocketConfig};
use wsbeat::frame::{close, Event, Parser, Sender, Violation};

const SETUP: usize = 4;

#[derive(Debug, Clone, Copy)]
struct Setup {
    sender: Sender,
    max_message: u64,
    max_read: usize,
    seed: u32,
    compression: bool,
}

fn setup(data: &[u8]) -> Option<(Setup, &[u8])> {
    let (head, stream) = data.split_first_chunk::<SETUP>()?;
    let big = if head[0] & 2 != 0 { 1 << 16 } else { 0 };
    let setup = Setup {
        sender: if head[0] & 1 != 0 {
            Sender::Client
        } else {
            Sender::Server
        },
        max_message: u64::from(u16::from_le_bytes([head[1], head[2]])) + big,
        max_read: usize::from(head[0] >> 2),
        // xorshift32 must not start at 0.
        seed: u32::from(head[3] & 0x7F) << 8 | 0x5A,
        compression: head[3] & 0x80 != 0,
    };
    Some((setup, stream))
}

/// A frame of the stream as tungstenite reads its header.
#[derive(Debug)]
struct WireFrame {
    start: usize,
    header_end: usize,
    /// End of the payload; may lie past the input.
    end: u64,
    /// `None` when tungstenite refuses the header (a reserved opcode).
    header: Option<FrameHeader>,
    len: u64,
}

impl WireFrame {
    fn is_data(&self) -> bool {
        matches!(
            self.header.as_ref().map(|h| h.opcode),
            Some(OpCode::Data(Data::Text | Data::Binary | Data::Continue))
        )
    }

    fn opcode(&self) -> Option<OpCode> {
        self.header.as_ref().map(|h| h.opcode)
    }

    fn fin(&self) -> bool {
        self.header.as_ref().is_some_and(|h| h.is_final)
    }

    /// The unmasked payload, as much of it as `stream` holds.
    fn payload(&self, stream: &[u8]) -> Vec<u8> {
        let end = usize::try_from(self.end)
            .unwrap_or(usize::MAX)
            .min(stream.len());
        let mut p = stream[self.header_end..end].to_vec();
        if let Some(mask) = self.header.as_ref().and_then(|h| h.mask) {
            for (i, b) in p.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        p
    }

    fn complete_in(&self, stream: &[u8]) -> bool {
        self.end <= stream.len() as u64
    }
}

/// Splits `stream` into frames with tungstenite's header parser; stops at the first
/// header it refuses or that is incomplete, and after a frame that runs past the end.
fn frames(stream: &[u8]) -> Vec<WireFrame> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < stream.len() {
        let mut cursor = Cursor::new(&stream[pos..]);
        let parsed = FrameHeader::parse(&mut cursor);
        let header_end = pos + cursor.position() as usize;
        match parsed {
            Ok(None) => break,
            Ok(Some((header, len))) => {
                let end = (header_end as u64).saturating_add(len);
                out.push(WireFrame {
                    start: pos,
                    header_end,
                    end,
                    header: Some(header),
                    len,
                });
                if end > stream.len() as u64 {
                    break;
                }
                pos = end as usize;
            }
            Err(_) => {
                out.push(WireFrame {
                    start: pos,
                    header_end,
                    end: header_end as u64,
                    header: None,
                    len: 0,
                });
                break;
            }
        }
    }
    out
}

/// Which frame a reference read position falls in (its header end or payload end).
fn frame_at(frames: &[WireFrame], pos: usize) -> usize {
    frames
        .iter()
        .position(|f| f.start < pos && pos as u64 <= f.end)
        .unwrap_or_else(|| panic!("reference stopped at {pos}, outside every frame"))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Msg {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParserEnd {
    /// The input ran out.
    Eof,
    /// A close frame (the last event).
    Closed,
    Violation(Violation),
}

struct ParserRun {
    /// One per frame, the violation excluded.
    events: Vec<Event>,
    end: ParserEnd,
    forwarded: Vec<u8>,
    /// Where in `forwarded` each header begins.
    header_at: Vec<usize>,
    mid_frame: bool,
}

fn run_parser(setup: Setup, stream: &[u8], compression: bool) -> ParserRun {
    let mut parser =
        Parser::new(setup.sender, setup.max_message, None).with_compression(compression);
    let mut rng = setup.seed;
    let mut forwarded = Vec::new();
    let mut header_at = Vec::new();
    let mut events = Vec::new();
    let mut end = ParserEnd::Eof;
    let mut offset = 0;
    'reads: while offset < stream.len() {
        let size = if setup.max_read == 0 {
            stream.len()
        } else {
            rng ^= rng << 13;
            rng ^= rng >> 17;
            rng ^= rng << 5;
            1 + rng as usize % setup.max_read
        };
        let read_end = stream.len().min(offset + size);
        while offset < read_end {
            let (n, event) = parser.feed(&stream[offset..read_end], |bytes, header| {
                if header {
                    header_at.push(forwarded.len());
                }
                forwarded.extend_from_slice(bytes);
            });
            assert!(n <= read_end - offset, "consumed more than given");
            assert!(n > 0 || event.is_some(), "feed made no progress");
            offset += n;
            match event {
                Some(Event::Violation(v)) => {
                    end = ParserEnd::Violation(v);
                    break 'reads;
                }
                Some(e @ Event::Close(_)) => {
                    events.push(e);
                    end = ParserEnd::Closed;
                    break 'reads;
                }
                Some(e) => events.push(e),
                None => {}
            }
        }
    }
    if let ParserEnd::Violation(_) = end {
        // Nothing more is read, forwarded or reported.
        let rest = &stream[offset.min(stream.len())..];
        let mut more = false;
        let (n, event) = parser.feed(rest, |_, _| more = true);
        assert_eq!(
            (n, event, more),
            (rest.len(), None, false),
            "parsed after a violation"
        );
    }
    ParserRun {
        events,
        end,
        forwarded,
        header_at,
        mid_frame: parser.mid_frame(),
    }
}

/// The messages the parser's events carry, each with the frame that completed it;
/// checks every event against its frame.
fn parser_messages(run: &ParserRun, frames: &[WireFrame], stream: &[u8]) -> Vec<(usize, Msg)> {
    let mut msgs = Vec::new();
    let mut open: Option<(bool, Vec<u8>)> = None;
    for (i, event) in run.events.iter().enumerate() {
        let f = &frames[i];
        assert!(
            f.complete_in(stream),
            "event {event:?} for an incomplete frame {i}"
        );
        let payload = f.payload(stream);
        let opcode = f.opcode();
        match event {
            Event::DataFrameEnd { fin, text } => {
                assert!(f.is_data(), "frame {i} {opcode:?} reported as data");
                assert_eq!(*fin, f.fin(), "frame {i}: FIN");
                match opcode {
                    Some(OpCode::Data(Data::Continue)) => {
                        let (t, bytes) = open.as_mut().expect("continuation accepted alone");
                        assert_eq!(*text, *t, "frame {i}: text flag of a continuation");
                        bytes.extend_from_slice(&payload);
                    }
                    _ => {
                        assert!(open.is_none(), "frame {i}: new message inside one");
                        let t = opcode == Some(OpCode::Data(Data::Text));
                        assert_eq!(*text, t, "frame {i}: text flag");
                        open = Some((t, payload));
                    }
                }
                if *fin {
                    let (t, bytes) = open.take().expect("message open");
                    if t {
                        assert!(std::str::from_utf8(&bytes).is_ok(), "invalid text passed");
                        msgs.push((i, Msg::Text(bytes)));
                    } else {
                        msgs.push((i, Msg::Binary(bytes)));
                    }
                }
            }
            Event::Ping(p) => {
                assert_eq!(opcode, Some(OpCode::Control(Control::Ping)), "frame {i}");
                assert_eq!(p[..], payload[..]);
                msgs.push((i, Msg::Ping(payload)));
            }
            Event::Pong(p) => {
                assert_eq!(opcode, Some(OpCode::Control(Control::Pong)), "frame {i}");
                assert_eq!(p[..], payload[..]);
                msgs.push((i, Msg::Pong(payload)));
            }
            Event::Close(c) => {
                assert_eq!(opcode, Some(OpCode::Control(Control::Close)), "frame {i}");
                msgs.push((i, Msg::Close(c.clone())));
            }
            Event::HeartbeatDropped | Event::Violation(_) => {
                panic!("frame {i}: unexpected {event:?}")
            }
        }
    }
    msgs
}

/// What is forwarded: the data frames of the accepted frames verbatim, then at most a
/// strict prefix of the frame the parser stopped in.
fn check_forwarded(run: &ParserRun, frames: &[WireFrame], stream: &[u8]) {
    let accepted = run.events.len();
    let mut expected = Vec::new();
    let mut headers = Vec::new();
    for f in frames[..accepted].iter().filter(|f| f.is_data()) {
        headers.push(expected.len());
        expected.extend_from_slice(&stream[f.start..f.end as usize]);
    }
    assert!(
        run.forwarded.starts_with(&expected),
        "forwarded bytes differ from the data frames"
    );
    let tail = &run.forwarded[expected.len()..];
    if !tail.is_empty() {
        assert_ne!(
            run.end,
            ParserEnd::Closed,
            "forwarded after the close frame"
        );
        let f = &frames[accepted];
        assert!(f.is_data(), "part of a non-data frame forwarded");
        assert!(stream[f.start..].starts_with(tail), "cut frame differs");
        assert!(
            (tail.len() as u64) < f.end - f.start as u64,
            "a whole frame, no event"
        );
        assert!(
            tail.len() > f.header_end - f.start,
            "a header forwarded alone"
        );
        headers.push(expected.len());
    }
    assert_eq!(run.header_at, headers, "header boundaries");
    assert_eq!(
        run.mid_frame,
        !tail.is_empty(),
        "mid_frame() vs the forwarded bytes"
    );
}

/// Hands the reference the stream one frame part (header, payload) at a time, so that
/// where it stops tells which frame it decided on.
struct Segmented {
    data: Vec<u8>,
    pos: usize,
    stops: Vec<usize>,
}

impl Read for Segmented {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // `stops` ascend: each frame's header end, then its end.
        let i = self.stops.partition_point(|&s| s <= self.pos);
        let next = self
            .stops
            .get(i)
            .copied()
            .unwrap_or(usize::MAX)
            .min(self.data.len());
        let n = buf.len().min(next - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for Segmented {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RefEnd {
    Eof,
    /// A close frame, at this frame.
    Closed(usize),
    /// Rejected with this close code at this frame.
    Reject(u16, usize),
}

/// The close codes the reference accepts. tungstenite 0.30 maps 1014 (Bad Gateway, in
/// the IANA registry RFC 6455 §11.7 set up, like 1012 and 1013 which it accepts) to
/// `Bad` and refuses it; wsbeat accepts it. Aligned to the registry: 1014 is allowed.
fn reference_close_allowed(code: u16) -> bool {
    CloseCode::from(code).is_allowed() || code == 1014
}

/// The frame limit the reference gets. tungstenite applies `max_frame_size` to every
/// frame, control frames included, before reading the payload (it reserves the declared
/// length, so it must be bounded); wsbeat's `max_message` bounds data messages only and
/// control frames are bounded by the RFC's 125. A data frame over `max_message` is over
/// the message limit anyway, so this limit refuses nothing the message limit would not.
fn reference_frame_limit(setup: Setup) -> u64 {
    setup.max_message.max(125)
}

fn run_reference(setup: Setup, data: Vec<u8>, frames: &[WireFrame]) -> (Vec<(usize, Msg)>, RefEnd) {
    let role = match setup.sender {
        Sender::Client => Role::Server,
        Sender::Server => Role::Client,
    };
    let limit = reference_frame_limit(setup) as usize;
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .max_message_size(Some(setup.max_message as usize))
        .max_frame_size(Some(limit));
    let stops = frames
        .iter()
        .flat_map(|f| [f.header_end, usize::try_from(f.end).unwrap_or(usize::MAX)])
        .collect();
    let stream = Segmented {
        data,
        pos: 0,
        stops,
    };
    let mut ws = WebSocket::from_raw_socket(stream, role, Some(config));
    let mut msgs = Vec::new();
    loop {
        let result = ws.read();
        let pos = ws.get_ref().pos;
        let code = match result {
            Ok(message) => {
                let at = frame_at(frames, pos);
                let msg = match message {
                    Message::Text(t) => Msg::Text(t.as_bytes().to_vec()),
                    Message::Binary(b) => Msg::Binary(b.to_vec()),
                    Message::Ping(p) => Msg::Ping(p.to_vec()),
                    Message::Pong(p) => Msg::Pong(p.to_vec()),
                    Message::Close(None) => Msg::Close(None),
                    Message::Close(Some(c)) => {
                        // tungstenite does not fail on a close code a peer may not send:
                        // it reports code 1002 instead (and replies with it). Take the
                        // code from the frame itself.
                        let payload = frames[at].payload(&ws.get_ref().data);
                        let raw = u16::from_be_bytes([payload[0], payload[1]]);
                        if !reference_close_allowed(raw) {
                            return (msgs, RefEnd::Reject(close::PROTOCOL_ERROR, at));
                        }
                        let reason = if CloseCode::from(raw).is_allowed() {
                            assert_eq!(u16::from(c.code), raw);
                            c.reason.as_str().to_owned()
                        } else {
                            // 1014, which tungstenite replaced: its reason is UTF-8
                            // (tungstenite checked it), take it from the frame too.
                            String::from_utf8(payload[2..].to_vec()).expect("UTF-8 reason")
                        };
                        Msg::Close(Some((raw, reason)))
                    }
                    Message::Frame(_) => unreachable!("raw frames are never read"),
                };
                let closed = matches!(msg, Msg::Close(_));
                msgs.push((at, msg));
                if closed {
                    return (msgs, RefEnd::Closed(at));
                }
                continue;
            }
            Err(Error::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                return (msgs, RefEnd::Eof)
            }
            Err(Error::Protocol(_)) => close::PROTOCOL_ERROR,
            Err(Error::Utf8(_)) => close::INVALID_PAYLOAD,
            Err(Error::Capacity(_)) => close::TOO_BIG,
            Err(e) => panic!("unexpected reference error {e:?}"),
        };
        return (msgs, RefEnd::Reject(code, frame_at(frames, pos)));
    }
}

/// True when RFC 6455 makes frame `k`'s header alone a protocol error (1002).
fn header_protocol_error(setup: Setup, frames: &[WireFrame], k: usize) -> bool {
    let Some(h) = frames[k].header.as_ref() else {
        return true; // a reserved opcode
    };
    let mut in_message = false;
    for f in frames[..k].iter().filter(|f| f.is_data()) {
        in_message = !f.fin();
    }
    let control = matches!(h.opcode, OpCode::Control(_));
    h.rsv1
        || h.rsv2
        || h.rsv3
        || h.mask.is_some() != (setup.sender == Sender::Client)
        || frames[k].len >> 63 != 0
        || (control && (!h.is_final || frames[k].len > 125))
        || (h.opcode == OpCode::Data(Data::Continue) && !in_message)
        || (matches!(h.opcode, OpCode::Data(Data::Text | Data::Binary)) && in_message)
}

/// True when `f` is a close frame whose code the reference refuses.
fn close_code_refused(f: &WireFrame, stream: &[u8]) -> bool {
    if f.opcode() != Some(OpCode::Control(Control::Close)) {
        return false;
    }
    match f.payload(stream)[..] {
        [hi, lo, ..] => !reference_close_allowed(u16::from_be_bytes([hi, lo])),
        _ => false,
    }
}

/// True when the text message that frame `k` belongs to is invalid UTF-8 for
/// `std::str::from_utf8` with the bytes the stream holds: an invalid sequence, or an
/// incomplete one at the end of a complete final frame.
fn text_invalid_through(frames: &[WireFrame], k: usize, stream: &[u8]) -> bool {
    let mut open: Option<(bool, Vec<u8>)> = None;
    for (i, f) in frames[..=k].iter().enumerate().filter(|(_, f)| f.is_data()) {
        let payload = f.payload(stream);
        if f.opcode() == Some(OpCode::Data(Data::Continue)) {
            match open.as_mut() {
                Some((_, bytes)) => bytes.extend_from_slice(&payload),
                None => return false,
            }
        } else {
            open = Some((f.opcode() == Some(OpCode::Data(Data::Text)), payload));
        }
        if f.fin() && i < k {
            open = None;
        }
    }
    let Some((true, bytes)) = open else {
        return false;
    };
    match std::str::from_utf8(&bytes) {
        Ok(_) => false,
        Err(e) => e.error_len().is_some() || (frames[k].fin() && frames[k].complete_in(stream)),
    }
}

/// The stream a permessage-deflate peer means: RSV1 cleared on the first frame of each
/// data message (where the extension allows it), and compressed text messages turned
/// binary. Also returns, per frame, whether it belongs to a compressed text message.
fn without_compression(stream: &[u8], frames: &[WireFrame]) -> (Vec<u8>, Vec<bool>) {
    let mut out = stream.to_vec();
    let mut compressed_text = vec![false; frames.len()];
    let mut in_message = false;
    let mut text = false;
    for (i, f) in frames.iter().enumerate() {
        let Some(h) = f.header.as_ref() else {
            break;
        };
        match h.opcode {
            OpCode::Data(d @ (Data::Text | Data::Binary)) => {
                if in_message {
                    break; // a protocol error either way
                }
                text = false;
                if h.rsv1 {
                    out[f.start] &= !0x40;
                    if d == Data::Text {
                        out[f.start] = (out[f.start] & 0xF0) | 0x2;
                        text = true;
                    }
                }
                compressed_text[i] = text;
                in_message = !h.is_final;
            }
            OpCode::Data(Data::Continue) => {
                if !in_message {
                    break;
                }
                compressed_text[i] = text;
                in_message = !h.is_final;
            }
            _ => {}
        }
    }
    (out, compressed_text)
}

/// With permessage-deflate: the parser on the stream as sent does what the parser
/// without the extension does on the stream it means, but for the text flag of the
/// compressed messages; then the latter is checked against the reference.
fn check_compressed(setup: Setup, stream: &[u8]) {
    let frames = frames(stream);
    let (plain_stream, compressed_text) = without_compression(stream, &frames);
    let with = run_parser(setup, stream, true);
    let without = run_parser(setup, &plain_stream, false);
    check_forwarded(&with, &frames, stream);
    let expected: Vec<Event> = without
        .events
        .iter()
        .enumerate()
        .map(|(i, e)| match e {
            Event::DataFrameEnd { fin, .. } if compressed_text[i] => Event::DataFrameEnd {
                fin: *fin,
                text: true,
            },
            e => e.clone(),
        })
        .collect();
    assert_eq!(with.events, expected, "events with and without the extension");
    let code = |end: ParserEnd| match end {
        ParserEnd::Violation(v) => Some(v.code),
        _ => None,
    };
    assert_eq!(code(with.end), code(without.end), "close codes");
    assert_eq!(
        std::mem::discriminant(&with.end),
        std::mem::discriminant(&without.end)
    );
    assert_eq!(with.header_at, without.header_at, "header boundaries");
    assert_eq!(with.forwarded.len(), without.forwarded.len());
    assert_eq!(with.mid_frame, without.mid_frame);
    check_stream(setup, &plain_stream);
}

fn check(data: &[u8]) {
    let Some((setup, stream)) = setup(data) else {
        return;
    };
    if setup.compression {
        check_compressed(setup, stream);
    } else {
        check_stream(setup, stream);
    }
}

/// The parser without the extension on `stream`, against tungstenite.
fn check_stream(setup: Setup, stream: &[u8]) {
    let frames = frames(stream);
    let run = run_parser(setup, stream, false);
    let p_msgs = parser_messages(&run, &frames, stream);
    check_forwarded(&run, &frames, stream);

    // The reference needs the whole frame the parser rejected, which the input may cut
    // short: zeros complete it (the parser decided without those bytes).
    let mut reference_input = stream.to_vec();
    if let ParserEnd::Violation(_) = run.end {
        let f = &frames[run.events.len()];
        if f.header.is_some() && f.len <= reference_frame_limit(setup) && !f.complete_in(stream) {
            reference_input.resize(f.end as usize, 0);
        }
    }
    let (r_msgs, r_end) = run_reference(setup, reference_input, &frames);

    let k = run.events.len();
    let mut cutoff = usize::MAX;
    match (run.end, r_end) {
        (ParserEnd::Eof, RefEnd::Eof) => {}
        (ParserEnd::Closed, RefEnd::Closed(j)) => assert_eq!(j + 1, k, "close frame"),
        (ParserEnd::Violation(v), RefEnd::Reject(code, j)) if j == k && code == v.code => {}
        // Both refuse the frame, for different reasons: tungstenite checks its frame
        // limit (1009) before anything else, wsbeat the header's protocol errors first.
        // RFC 6455 gives no order; 1002 is right when the header breaks the protocol
        // (among those: a length with the top bit set, which §5.2 forbids and
        // tungstenite only sees as too big).
        (ParserEnd::Violation(v), RefEnd::Reject(close::TOO_BIG, j))
            if j == k
                && v.code == close::PROTOCOL_ERROR
                && header_protocol_error(setup, &frames, k) => {}
        // A close frame with both a code a peer may not send (1002) and a reason that is
        // not UTF-8 (1007): tungstenite checks the reason first, wsbeat the code. RFC
        // 6455 gives no order either.
        (ParserEnd::Violation(v), RefEnd::Reject(close::INVALID_PAYLOAD, j))
            if j == k
                && v.code == close::PROTOCOL_ERROR
                && close_code_refused(&frames[k], stream) => {}
        // A streaming UTF-8 check may refuse a text message before a reassembling
        // reader does: fine when the bytes so far cannot start any valid UTF-8.
        (ParserEnd::Violation(v), r)
            if v.code == close::INVALID_PAYLOAD
                && frames[k].is_data()
                && !matches!(r, RefEnd::Reject(_, j) | RefEnd::Closed(j) if j < k)
                && text_invalid_through(&frames, k, stream) =>
        {
            cutoff = k;
        }
        (p, r) => panic!(
            "parser {p:?} after {k} frames, reference {r:?}; setup {setup:?}, frames {:?}",
            &frames[..frames.len().min(k + 2)]
        ),
    }
    let r_msgs: Vec<_> = r_msgs.into_iter().filter(|(at, _)| *at < cutoff).collect();
    assert_eq!(p_msgs, r_msgs, "messages differ from the reference's");
}

fuzz_target!(|data: &[u8]| check(data));
