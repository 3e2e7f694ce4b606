//! The PROXY protocol header (HAProxy's spec, versions 1 and 2) that an L4 load balancer
//! (AWS NLB, HAProxy `mode tcp` with `send-proxy[-v2]`) sends before anything else, to
//! hand over the client's address. A pure parser, fuzzed, and a reader that takes exactly
//! the header's bytes from a socket (nothing after it), within a deadline.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The version 2 signature: the first 12 bytes of every v2 header.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most 107 bytes, CRLF included.
const V1_MAX: usize = 107;
/// The fixed part of a v2 header: signature, version and command, family, length.
const V2_FIXED: usize = 16;

/// What the load balancer said about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A proxied connection: the client's address (`source`) and the address it
    /// connected to.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// The load balancer's own connection (v2 `LOCAL`, a health check) or one it could
    /// not describe (v1 `UNKNOWN`, v2 `UNSPEC`): the peer's address stands.
    Local,
}

/// The parser's verdict on the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A valid header so far, not complete yet: at least this many bytes in all are
    /// needed.
    Incomplete { need: usize },
    /// A complete header of `len` bytes.
    Done { header: Header, len: usize },
    /// Not a PROXY header, or a broken one.
    Invalid(&'static str),
}

/// Parses the start of a connection's bytes.
pub fn parse(buf: &[u8]) -> Parsed {
    let sig = buf.len().min(V2_SIGNATURE.len());
    if buf[..sig] == V2_SIGNATURE[..sig] && !buf.is_empty() && buf[0] == b'\r' {
        return parse_v2(buf);
    }
    let prefix = b"PROXY ";
    let p = buf.len().min(prefix.len());
    if buf[..p] != prefix[..p] {
        return Parsed::Invalid("no PROXY protocol header");
    }
    parse_v1(buf)
}

fn parse_v1(buf: &[u8]) -> Parsed {
    // Printable ASCII only, up to the CRLF: a prefix is refused exactly when the whole
    // line would be.
    let printable = |b: &u8| (0x20..0x7f).contains(b);
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return Parsed::Invalid("v1 header longer than 107 bytes");
        }
        let text = buf.strip_suffix(b"\r").unwrap_or(buf);
        if !text.iter().all(printable) {
            return Parsed::Invalid("v1 header with a byte that is not printable ASCII");
        }
        // A v1 header ends in CRLF: read one more byte at a time.
        return Parsed::Incomplete {
            need: buf.len() + 1,
        };
    };
    let len = end + 2;
    if len > V1_MAX {
        return Parsed::Invalid("v1 header longer than 107 bytes");
    }
    if !buf[..end].iter().all(printable) {
        return Parsed::Invalid("v1 header with a byte that is not printable ASCII");
    }
    let Ok(line) = std::str::from_utf8(&buf[..end]) else {
        return Parsed::Invalid("v1 header is not ASCII");
    };
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Parsed::Done {
            header: Header::Local,
            len,
        },
        ["PROXY", family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let v6 = *family == "TCP6";
            let (Some(src), Some(dst)) = (v1_ip(src, v6), v1_ip(dst, v6)) else {
                return Parsed::Invalid("v1 header with a bad address");
            };
            let (Some(sport), Some(dport)) = (v1_port(sport), v1_port(dport)) else {
                return Parsed::Invalid("v1 header with a bad port");
            };
            Parsed::Done {
                header: Header::Proxied {
                    source: SocketAddr::new(src, sport),
                    destination: SocketAddr::new(dst, dport),
                },
                len,
            }
        }
        _ => Parsed::Invalid("v1 header is not PROXY TCP4|TCP6|UNKNOWN with 4 fields"),
    }
}

fn v1_ip(text: &str, v6: bool) -> Option<IpAddr> {
    if v6 {
        text.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
    } else {
        text.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
    }
}

/// A decimal port, 0–65535, without sign or leading zeros (the spec's format).
fn v1_port(text: &str) -> Option<u16> {
    let canonical = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    canonical.then(|| text.parse().ok()).flatten()
}

fn parse_v2(buf: &[u8]) -> Parsed {
    if buf.len() < V2_FIXED {
        return Parsed::Incomplete { need: V2_FIXED };
    }
    let version_command = buf[12];
    if version_command >> 4 != 2 {
        return Parsed::Invalid("v2 header with a version other than 2");
    }
    let local = match version_command & 0x0F {
        0 => true,
        1 => false,
        _ => return Parsed::Invalid("v2 header with an unknown command"),
    };
    let family = buf[13];
    let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = V2_FIXED + body;
    if buf.len() < len {
        return Parsed::Incomplete { need: len };
    }
    let addresses = &buf[V2_FIXED..len];
    if local {
        // A health check of the load balancer's own: whatever follows is ignored.
        return Parsed::Done {
            header: Header::Local,
            len,
        };
    }
    let header = match family {
        // UNSPEC: the sender could not tell; the connection's own addresses stand.
        0x00 => Header::Local,
        // TCP over IPv4.
        0x11 => {
            let Some(a) = addresses.get(..12) else {
                return Parsed::Invalid("v2 TCP4 header too short for its addresses");
            };
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]));
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Header::Proxied {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            }
        }
        // TCP over IPv6.
        0x21 => {
            let Some(a) = addresses.get(..36) else {
                return Parsed::Invalid("v2 TCP6 header too short for its addresses");
            };
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&a[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Header::Proxied {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            }
        }
        _ => return Parsed::Invalid("v2 header for a protocol other than TCP"),
    };
    Parsed::Done { header, len }
}

/// Why no header could be read from a connection.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("invalid PROXY protocol header: {0}")]
    Invalid(&'static str),
    #[error("no complete PROXY protocol header within {0:?}")]
    Timeout(Duration),
    #[error("connection ended before the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads a PROXY header from `io`, taking exactly its bytes (what follows stays in the
/// socket for TLS or HTTP), within `deadline`.
pub async fn read_header<S: AsyncRead + Unpin>(
    io: &mut S,
    deadline: Duration,
) -> Result<Header, ReadError> {
    let read = async {
        // 536 bytes hold any v2 header with a TLV or two; more is refused below.
        let mut buf = Vec::with_capacity(V2_FIXED);
        let mut need = V2_SIGNATURE.len().min(b"PROXY UNKNOWN\r\n".len());
        loop {
            let have = buf.len();
            buf.resize(need, 0);
            io.read_exact(&mut buf[have..]).await?;
            match parse(&buf) {
                Parsed::Done { header, len } => {
                    debug_assert_eq!(len, buf.len());
                    return Ok(header);
                }
                Parsed::Invalid(why) => return Err(ReadError::Invalid(why)),
                Parsed::Incomplete { need: more } if more > MAX_HEADER => {
                    return Err(ReadError::Invalid("header longer than wsbeat accepts"))
                }
                Parsed::Incomplete { need: more } => need = more,
            }
        }
    };
    tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| ReadError::Timeout(deadline))?
}

/// The longest header accepted: a v2 header's addresses plus TLVs of this much in all
/// (AWS NLB sends a VPC endpoint id, HAProxy a few small TLVs).
pub const MAX_HEADER: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&u16::try_from(addresses.len()).unwrap().to_be_bytes());
        h.extend_from_slice(addresses);
        h
    }

    fn done(buf: &[u8]) -> Header {
        match parse(buf) {
            Parsed::Done { header, len } => {
                assert_eq!(len, buf.len());
                header
            }
            other => panic!("{other:?} for {buf:?}"),
        }
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        assert_eq!(
            done(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n"),
            Header::Proxied {
                source: "203.0.113.7:51234".parse().unwrap(),
                destination: "10.0.0.1:443".parse().unwrap(),
            }
        );
        assert_eq!(
            done(b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 443\r\n"),
            Header::Proxied {
                source: "[2001:db8::7]:51234".parse().unwrap(),
                destination: "[2001:db8::1]:443".parse().unwrap(),
            }
        );
        assert_eq!(done(b"PROXY UNKNOWN\r\n"), Header::Local);
        assert_eq!(
            done(b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"),
            Header::Local
        );
    }

    #[test]
    fn v1_asks_for_more_until_crlf_and_refuses_what_is_broken() {
        assert_eq!(parse(b"PRO"), Parsed::Incomplete { need: 4 });
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4"),
            Parsed::Incomplete { need: 19 }
        );
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 2001:db8::1 1 2\r\n",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        ] {
            assert!(
                matches!(parse(bad), Parsed::Invalid(_)),
                "{:?}: {:?}",
                String::from_utf8_lossy(bad),
                parse(bad)
            );
        }
        let long = [b"PROXY ".as_slice(), &[b'x'; 120]].concat();
        assert!(matches!(parse(&long), Parsed::Invalid(_)));
    }

    #[test]
    fn v2_proxy_local_and_unspec() {
        let mut a4 = vec![203, 0, 113, 7, 10, 0, 0, 1];
        a4.extend_from_slice(&51234u16.to_be_bytes());
        a4.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(
            done(&v2(1, 0x11, &a4)),
            Header::Proxied {
                source: "203.0.113.7:51234".parse().unwrap(),
                destination: "10.0.0.1:443".parse().unwrap(),
            }
        );
        // TLVs after the addresses are skipped.
        let with_tlv = [a4.clone(), vec![0x05, 0x00, 0x02, b'i', b'd']].concat();
        assert!(matches!(
            done(&v2(1, 0x11, &with_tlv)),
            Header::Proxied { .. }
        ));
        let mut a6 = Vec::new();
        a6.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        a6.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        a6.extend_from_slice(&1u16.to_be_bytes());
        a6.extend_from_slice(&2u16.to_be_bytes());
        assert_eq!(
            done(&v2(1, 0x21, &a6)),
            Header::Proxied {
                source: "[2001:db8::7]:1".parse().unwrap(),
                destination: "[2001:db8::1]:2".parse().unwrap(),
            }
        );
        // LOCAL (a health check) and UNSPEC keep the peer's address.
        assert_eq!(done(&v2(0, 0x00, &[])), Header::Local);
        assert_eq!(done(&v2(0, 0x11, &a4)), Header::Local);
        assert_eq!(done(&v2(1, 0x00, &[])), Header::Local);
    }

    #[test]
    fn v2_asks_for_its_length_and_refuses_what_is_broken() {
        let whole = v2(1, 0x11, &[0; 12]);
        assert_eq!(parse(&whole[..5]), Parsed::Incomplete { need: 16 });
        assert_eq!(parse(&whole[..16]), Parsed::Incomplete { need: 28 });
        let mut bad_version = whole.clone();
        bad_version[12] = 0x11;
        let mut bad_command = whole.clone();
        bad_command[12] = 0x22;
        for bad in [
            bad_version,
            bad_command,
            v2(1, 0x11, &[0; 11]),
            v2(1, 0x21, &[0; 35]),
            v2(1, 0x12, &[0; 12]),
            v2(1, 0x31, &[0; 216]),
        ] {
            assert!(matches!(parse(&bad), Parsed::Invalid(_)), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn the_reader_takes_exactly_the_header() {
        let mut wire =
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\nGET / HTTP/1.1\r\n".as_slice();
        let header = read_header(&mut wire, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(matches!(header, Header::Proxied { .. }));
        assert_eq!(wire, b"GET / HTTP/1.1\r\n");
        let v2_wire = [v2(1, 0x11, &[0; 12]), b"\x16\x03\x01".to_vec()].concat();
        let mut rest = v2_wire.as_slice();
        read_header(&mut rest, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(
            rest, b"\x16\x03\x01",
            "a TLS ClientHello after the header is untouched"
        );
        let mut plain = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".as_slice();
        assert!(matches!(
            read_header(&mut plain, Duration::from_secs(1)).await,
            Err(ReadError::Invalid(_))
        ));
        let mut short = b"PROXY TCP4 1.2".as_slice();
        assert!(matches!(
            read_header(&mut short, Duration::from_secs(1)).await,
            Err(ReadError::Io(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_header_that_never_completes_times_out() {
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"PROXY TCP4 ")
            .await
            .unwrap();
        let r = read_header(&mut server, Duration::from_secs(10)).await;
        assert!(matches!(r, Err(ReadError::Timeout(_))), "{r:?}");
        drop(client);
    }
}
