//! Property: any sequence of valid messages (text with multi-byte characters, binary),
//! fragmented into frames at arbitrary byte offsets, with PINGs and PONGs between the
//! fragments and the byte stream cut into arbitrary reads, passes through
//! [`Parser::feed`] unchanged: the data frames forwarded byte for byte, the same
//! messages (type and bytes) in order, every control frame reported as such (a close
//! frame, with or without a code, ends the stream).

use super::*;
use proptest::prelude::*;
use proptest::sample::Index;

#[derive(Debug, Clone)]
enum Message {
    Text(String),
    Binary(Vec<u8>),
}

impl Message {
    fn bytes(&self) -> &[u8] {
        match self {
            Message::Text(s) => s.as_bytes(),
            Message::Binary(b) => b,
        }
    }
}

/// A message, where to cut it into fragments (at most 4 cuts), and the control frame to
/// put after each fragment (those before its last fragment land inside the message).
#[derive(Debug, Clone)]
struct Plan {
    message: Message,
    cuts: Vec<Index>,
    controls: Vec<Option<(bool, Vec<u8>)>>,
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        // Any Unicode scalar values: 1 to 4 bytes each.
        4 => any::<String>().prop_map(Message::Text),
        4 => "[a-zé✓𝄞]{0,40}".prop_map(Message::Text),
        4 => prop::collection::vec(any::<u8>(), 0..300).prop_map(Message::Binary),
        // Long enough for the 8-byte length form.
        1 => (65_530usize..65_600, any::<u8>()).prop_map(|(n, b)| Message::Binary(vec![b; n])),
    ]
}

fn plan() -> impl Strategy<Value = Plan> {
    let control = prop::option::weighted(
        0.4,
        (
            any::<bool>(),
            prop::collection::vec(any::<u8>(), 0..=MAX_CONTROL_PAYLOAD),
        ),
    );
    (
        message(),
        prop::collection::vec(any::<Index>(), 0..4),
        prop::collection::vec(control, 5),
    )
        .prop_map(|(message, cuts, controls)| Plan {
            message,
            cuts,
            controls,
        })
}

/// What the parser must report, in order.
#[derive(Debug, PartialEq, Eq)]
enum Expected {
    Data { fin: bool, text: bool },
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

/// Encodes one frame; `encode` always sets FIN, so it is cleared here when needed.
fn frame(out: &mut Vec<u8>, opcode: u8, fin: bool, payload: &[u8], mask: Option<[u8; 4]>) {
    let at = out.len();
    encode(out, opcode, payload, mask);
    if !fin {
        out[at] &= 0x7F;
    }
}

/// The wire bytes of `plans`, the data frames alone (what must be forwarded), and the
/// events the parser must report.
fn build(
    plans: &[Plan],
    close: &Option<(u16, String)>,
    mask: Option<[u8; 4]>,
) -> (Vec<u8>, Vec<u8>, Vec<Expected>) {
    let mut wire = Vec::new();
    let mut data = Vec::new();
    let mut expected = Vec::new();
    for plan in plans {
        let bytes = plan.message.bytes();
        let text = matches!(plan.message, Message::Text(_));
        let mut cuts: Vec<usize> = plan.cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        cuts.push(0);
        cuts.push(bytes.len());
        cuts.sort_unstable();
        // Equal cuts make empty fragments: valid too.
        let pieces = cuts.len() - 1;
        for (n, w) in cuts.windows(2).enumerate() {
            let fin = n + 1 == pieces;
            let opcode = match (n, text) {
                (0, true) => OP_TEXT,
                (0, false) => OP_BINARY,
                _ => OP_CONTINUATION,
            };
            let mut one = Vec::new();
            frame(&mut one, opcode, fin, &bytes[w[0]..w[1]], mask);
            wire.extend_from_slice(&one);
            data.extend_from_slice(&one);
            expected.push(Expected::Data { fin, text });
            if let Some((ping, payload)) = &plan.controls[n] {
                let opcode = if *ping { OP_PING } else { OP_PONG };
                frame(&mut wire, opcode, true, payload, mask);
                expected.push(if *ping {
                    Expected::Ping(payload.clone())
                } else {
                    Expected::Pong(payload.clone())
                });
            }
        }
    }
    let payload = match close {
        Some((code, reason)) => close_payload(*code, reason),
        None => Vec::new(),
    };
    frame(&mut wire, OP_CLOSE, true, &payload, mask);
    expected.push(Expected::Close(close.clone()));
    (wire, data, expected)
}

/// Reassembles the messages of a forwarded byte stream (valid frames by construction).
fn messages_of(mut stream: &[u8]) -> Vec<(bool, Vec<u8>)> {
    let mut messages = Vec::new();
    let mut current: Option<(bool, Vec<u8>)> = None;
    while !stream.is_empty() {
        let fin = stream[0] & 0x80 != 0;
        let opcode = stream[0] & 0x0F;
        let (len, mut at) = match stream[1] & 0x7F {
            126 => (usize::from(u16::from_be_bytes([stream[2], stream[3]])), 4),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&stream[2..10]);
                (usize::try_from(u64::from_be_bytes(b)).unwrap(), 10)
            }
            n => (usize::from(n), 2),
        };
        let mask = (stream[1] & 0x80 != 0).then(|| {
            let m = [stream[at], stream[at + 1], stream[at + 2], stream[at + 3]];
            at += 4;
            m
        });
        let mut payload = stream[at..at + len].to_vec();
        if let Some(m) = mask {
            apply_mask(&mut payload, m, 0);
        }
        stream = &stream[at + len..];
        match current.as_mut() {
            Some((_, bytes)) => {
                assert_eq!(opcode, OP_CONTINUATION);
                bytes.extend_from_slice(&payload);
            }
            None => current = Some((opcode == OP_TEXT, payload)),
        }
        if fin {
            messages.extend(current.take());
        }
    }
    assert!(current.is_none(), "forwarded stream ends inside a message");
    messages
}

/// Feeds `wire` in reads of the given sizes (cycled); returns the forwarded bytes and
/// the events.
fn feed_all(parser: &mut Parser, wire: &[u8], reads: &[usize]) -> (Vec<u8>, Vec<Event>) {
    let mut forwarded = Vec::new();
    let mut events = Vec::new();
    let mut rest = wire;
    for &size in reads.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (mut chunk, after) = rest.split_at(size.min(rest.len()));
        rest = after;
        while !chunk.is_empty() {
            let (n, event) = parser.feed(chunk, |b, _| forwarded.extend_from_slice(b));
            assert!(n > 0 || event.is_some(), "feed made no progress");
            chunk = &chunk[n..];
            events.extend(event);
        }
    }
    (forwarded, events)
}

proptest! {
    #[test]
    fn valid_messages_pass_unchanged(
        plans in prop::collection::vec(plan(), 1..6),
        close in prop::option::of((
            prop_oneof![1000u16..=1003, 1007u16..=1014, 3000u16..=4999],
            "[a-zé ]{0,20}",
        )),
        client in any::<bool>(),
        mask in any::<[u8; 4]>(),
        reads in prop::collection::vec(1usize..40, 1..8),
    ) {
        let (sender, mask) = if client {
            (Sender::Client, Some(mask))
        } else {
            (Sender::Server, None)
        };
        let (wire, data, expected) = build(&plans, &close, mask);
        let mut parser = Parser::new(sender, 1 << 20, None);
        let (forwarded, events) = feed_all(&mut parser, &wire, &reads);

        prop_assert_eq!(&forwarded, &data);
        let got: Vec<Expected> = events
            .into_iter()
            .map(|e| match e {
                Event::DataFrameEnd { fin, text } => Expected::Data { fin, text },
                Event::Ping(p) => Expected::Ping(p.to_vec()),
                Event::Pong(p) => Expected::Pong(p.to_vec()),
                Event::Close(c) => Expected::Close(c),
                other => panic!("unexpected event {other:?}"),
            })
            .collect();
        prop_assert_eq!(got, expected);
        prop_assert!(!parser.mid_message());

        let sent: Vec<(bool, Vec<u8>)> = plans
            .iter()
            .map(|p| (matches!(p.message, Message::Text(_)), p.message.bytes().to_vec()))
            .collect();
        prop_assert_eq!(messages_of(&forwarded), sent);
    }
}

/// The byte-at-a-time XOR that [`apply_mask`] must match.
fn apply_mask_bytewise(data: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[(offset + i) & 3];
    }
}

proptest! {
    #[test]
    fn word_at_a_time_masking_matches_the_bytewise_xor(
        data in proptest::collection::vec(any::<u8>(), 0..200),
        mask in any::<[u8; 4]>(),
        offset in 0usize..64,
        start in 0usize..9,
    ) {
        // `start` shifts the slice against the allocation's alignment.
        let start = start.min(data.len());
        let mut fast = data.clone();
        let mut slow = data.clone();
        apply_mask(&mut fast[start..], mask, offset);
        apply_mask_bytewise(&mut slow[start..], mask, offset);
        prop_assert_eq!(&fast, &slow);
        // Masking twice gives the data back.
        apply_mask(&mut fast[start..], mask, offset);
        prop_assert_eq!(&fast, &data);
    }
}
