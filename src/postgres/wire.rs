//! The parts of the PostgreSQL wire protocol legate needs: the startup
//! packets (version 3 startup, SSLRequest, GSSENCRequest, CancelRequest) and
//! the framing of regular messages (a type byte, then a big-endian length
//! that counts itself), read as the bytes stream by.
//!
//! Not `postgres-protocol`: its backend parser needs a whole message in
//! memory before it yields one and copies each into owned values, while
//! legate forwards a 1 GB DataRow as it arrives and only ever looks inside
//! two tiny messages (BackendKeyData, ReadyForQuery). Every length read here
//! is bounded before it is trusted.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The codes a startup packet's first field may carry instead of a version.
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
/// Protocol 3.x: major version 3 in the high 16 bits.
const PROTOCOL_3: u32 = 3 << 16;

/// The server's limit on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: usize = 10_000;
/// The server's limit on any other message (`PQ_LARGE_MESSAGE_LIMIT`).
pub const MAX_MESSAGE_LEN: u32 = (1 << 30) - 1;
/// A cancel key is 4 bytes up to protocol 3.1 and at most 256 from 3.2.
const MAX_CANCEL_KEY: usize = 256;

/// The SSLRequest legate sends to a server before TLS.
pub const SSL_REQUEST_PACKET: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
/// A GSSENCRequest, passed on when the app asks for it end to end.
pub const GSSENC_REQUEST_PACKET: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
/// Terminate ('X'): how legate ends a session it closes at an idle point.
pub const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

/// One packet an app may open a connection with.
#[derive(Debug, PartialEq, Eq)]
pub enum Startup {
    SslRequest,
    GssEncRequest,
    /// The whole packet (length included), to send to the right server.
    Cancel {
        packet: Vec<u8>,
        key: Vec<u8>,
    },
    /// A version 3 StartupMessage, whole, to forward as it is.
    Message(Vec<u8>),
}

/// Why a startup packet was refused.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("invalid startup packet length {0}")]
    Length(u32),
    #[error("unsupported startup code {0} (not protocol 3, SSL, GSS or cancel)")]
    Code(u32),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads one startup packet.
pub async fn read_startup<R: AsyncRead + Unpin>(from: &mut R) -> Result<Startup, StartupError> {
    let len = from.read_u32().await?;
    if !(8..=MAX_STARTUP_LEN as u32).contains(&len) {
        return Err(StartupError::Length(len));
    }
    let mut packet = vec![0u8; len as usize];
    packet[..4].copy_from_slice(&len.to_be_bytes());
    from.read_exact(&mut packet[4..]).await?;
    parse_startup(packet)
}

/// Classifies a whole startup packet (length included).
pub fn parse_startup(packet: Vec<u8>) -> Result<Startup, StartupError> {
    let len = packet.len();
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return Err(StartupError::Length(len as u32));
    }
    let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    match code {
        SSL_REQUEST if len == 8 => Ok(Startup::SslRequest),
        GSSENC_REQUEST if len == 8 => Ok(Startup::GssEncRequest),
        CANCEL_REQUEST if (16..=12 + MAX_CANCEL_KEY).contains(&len) => {
            // Process id and secret: together they name the session.
            let key = packet[8..].to_vec();
            Ok(Startup::Cancel { packet, key })
        }
        SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => Err(StartupError::Length(len as u32)),
        c if c >> 16 == PROTOCOL_3 >> 16 => Ok(Startup::Message(packet)),
        c => Err(StartupError::Code(c)),
    }
}

/// A message boundary or a message legate looks into, found while scanning.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// The type byte of a new message, at this offset of the scanned slice.
    Begin { kind: u8, at: usize },
    /// A watched message arrived whole: its type and body (length excluded).
    Whole { kind: u8, body: &'a [u8] },
}

/// Finds message boundaries in one direction of a session, across reads.
/// Keeps at most the 4 length bytes and the body of a watched message
/// (bounded by `watch`'s limit), never a whole ordinary message.
pub struct Framer {
    /// Which message types to hand over whole, and their largest body.
    watch: fn(u8) -> Option<usize>,
    state: State,
    kept: Vec<u8>,
}

enum State {
    /// At a boundary: the next byte is a type.
    Type,
    /// Reading the 4 length bytes of a message of this type.
    Length {
        kind: u8,
        have: usize,
        bytes: [u8; 4],
    },
    /// Inside a body; `keep` when the body is being kept for `Whole`.
    Body { kind: u8, left: u32, keep: bool },
}

/// A length that no well-formed message has.
#[derive(Debug, thiserror::Error)]
#[error("invalid message length {len} for message type {kind:?}")]
pub struct FrameError {
    pub kind: char,
    pub len: u32,
}

impl Framer {
    pub fn new(watch: fn(u8) -> Option<usize>) -> Self {
        Framer {
            watch,
            state: State::Type,
            kept: Vec::new(),
        }
    }

    /// Whether the bytes so far end exactly at a message boundary.
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Type)
    }

    /// Scans `buf`, calling `on` for each event in order. `on` returns
    /// `false` to stop before a `Begin` (the scan returns its offset); else
    /// the scan returns `buf.len()`.
    pub fn scan(
        &mut self,
        buf: &[u8],
        mut on: impl FnMut(Event<'_>) -> bool,
    ) -> Result<usize, FrameError> {
        let mut i = 0;
        while i < buf.len() {
            match &mut self.state {
                State::Type => {
                    let kind = buf[i];
                    if !on(Event::Begin { kind, at: i }) {
                        return Ok(i);
                    }
                    self.state = State::Length {
                        kind,
                        have: 0,
                        bytes: [0; 4],
                    };
                    i += 1;
                }
                State::Length { kind, have, bytes } => {
                    let take = (4 - *have).min(buf.len() - i);
                    bytes[*have..*have + take].copy_from_slice(&buf[i..i + take]);
                    *have += take;
                    i += take;
                    if *have < 4 {
                        continue;
                    }
                    let kind = *kind;
                    let len = u32::from_be_bytes(*bytes);
                    let error = FrameError {
                        kind: char::from(kind),
                        len,
                    };
                    if !(4..=MAX_MESSAGE_LEN).contains(&len) {
                        return Err(error);
                    }
                    let keep = match (self.watch)(kind) {
                        Some(max) if (len - 4) as usize > max => return Err(error),
                        Some(_) => true,
                        None => false,
                    };
                    self.kept.clear();
                    self.state = State::Body {
                        kind,
                        left: len - 4,
                        keep,
                    };
                    self.finish_if_empty(&mut on);
                }
                State::Body { left, keep, .. } => {
                    let take = (*left as usize).min(buf.len() - i);
                    if *keep {
                        self.kept.extend_from_slice(&buf[i..i + take]);
                    }
                    *left -= take as u32;
                    i += take;
                    self.finish_if_empty(&mut on);
                }
            }
        }
        Ok(buf.len())
    }

    fn finish_if_empty(&mut self, on: &mut impl FnMut(Event<'_>) -> bool) {
        if let State::Body {
            kind,
            left: 0,
            keep,
        } = self.state
        {
            if keep {
                on(Event::Whole {
                    kind,
                    body: &self.kept,
                });
            }
            self.state = State::Type;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn watch_kz(kind: u8) -> Option<usize> {
        match kind {
            b'K' => Some(4 + MAX_CANCEL_KEY),
            b'Z' => Some(1),
            _ => None,
        }
    }

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// Scans `bytes` split at `cuts`, returning (kinds begun, whole messages).
    fn scan_split(bytes: &[u8], cuts: &[usize]) -> (Vec<u8>, Vec<(u8, Vec<u8>)>) {
        let mut f = Framer::new(watch_kz);
        let (mut begun, mut whole) = (Vec::new(), Vec::new());
        let mut from = 0;
        for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
            let cut = cut.clamp(from, bytes.len());
            f.scan(&bytes[from..cut], |e| {
                match e {
                    Event::Begin { kind, .. } => begun.push(kind),
                    Event::Whole { kind, body } => whole.push((kind, body.to_vec())),
                }
                true
            })
            .unwrap();
            from = cut;
        }
        (begun, whole)
    }

    #[test]
    fn messages_are_found_however_the_bytes_are_split() {
        let mut bytes = msg(b'K', &[0, 0, 0, 7, 1, 2, 3, 4]);
        bytes.extend(msg(b'D', &[9; 100]));
        bytes.extend(msg(b'Z', b"I"));
        for cut in 0..bytes.len() {
            let (begun, whole) = scan_split(&bytes, &[cut, cut + 3]);
            assert_eq!(begun, b"KDZ");
            assert_eq!(
                whole,
                vec![(b'K', vec![0, 0, 0, 7, 1, 2, 3, 4]), (b'Z', b"I".to_vec())]
            );
        }
    }

    #[test]
    fn lengths_out_of_bounds_are_refused() {
        let mut f = Framer::new(watch_kz);
        assert!(f.scan(&[b'Q', 0, 0, 0, 3], |_| true).is_err());
        let mut f = Framer::new(watch_kz);
        assert!(f.scan(&[b'Q', 0x7f, 0xff, 0xff, 0xff], |_| true).is_err());
        let mut f = Framer::new(watch_kz);
        assert!(
            f.scan(&msg(b'Z', b"II"), |_| true).is_err(),
            "a watched body past its bound"
        );
    }

    #[test]
    fn a_scan_can_stop_before_a_message() {
        let mut bytes = msg(b'Z', b"I");
        bytes.extend(msg(b'Q', b"select 1\0"));
        let mut f = Framer::new(watch_kz);
        let stopped = f
            .scan(&bytes, |e| !matches!(e, Event::Begin { kind: b'Q', .. }))
            .unwrap();
        assert_eq!(stopped, 6);
        assert!(f.at_boundary());
    }

    #[test]
    fn startup_packets_are_classified() {
        let ssl = SSL_REQUEST_PACKET.to_vec();
        assert_eq!(parse_startup(ssl).unwrap(), Startup::SslRequest);
        let mut cancel = vec![0, 0, 0, 16];
        cancel.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
        cancel.extend_from_slice(&[0, 0, 0, 42, 9, 9, 9, 9]);
        assert!(matches!(
            parse_startup(cancel).unwrap(),
            Startup::Cancel { key, .. } if key == [0, 0, 0, 42, 9, 9, 9, 9]
        ));
        let mut v3 = vec![0, 0, 0, 9, 0, 3, 0, 0, 0];
        v3[3] = 9;
        assert!(matches!(parse_startup(v3).unwrap(), Startup::Message(_)));
        assert!(parse_startup(vec![0, 0, 0, 8, 0, 2, 0, 0]).is_err());
    }

    proptest! {
        /// Garbage from either side never panics, never keeps more than the
        /// bound, and either frames or is refused.
        #[test]
        fn garbage_is_framed_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..2048),
                                        cut in 0usize..2048) {
            let mut f = Framer::new(watch_kz);
            let cut = cut.min(bytes.len());
            if f.scan(&bytes[..cut], |_| true).is_ok() {
                let _ = f.scan(&bytes[cut..], |_| true);
            }
            prop_assert!(f.kept.len() <= 4 + MAX_CANCEL_KEY);
        }

        #[test]
        fn garbage_startup_packets_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_startup(bytes);
        }
    }
}
