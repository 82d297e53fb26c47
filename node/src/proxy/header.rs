//! The tunnel stream wire format (version 1): what the sending agent writes first on every
//! QUIC stream, and the one reply the receiving agent sends before any application byte.
//!
//! ```text
//! header := version u8 (=1) | kind u8 | dest | source      (strings: u16 BE length + UTF-8)
//!           kind   = 1: a TCP connection: after the reply, the app's bytes both ways
//!                    2: HTTP: after the reply, the sender speaks HTTP/2 (prior knowledge) and
//!                       multiplexes requests from `source` to `dest` on the stream
//!           dest   = "namespace/name" of the destination service
//!           source = "namespace/name" of the calling service, or "" for the node itself
//! reply  := status u8 | reason (u16 BE length + UTF-8)
//!           status: 0 ok, 1 denied, 2 unknown service, 3 upstream refused, 4 draining,
//!                   5 bad header, 6 source not allowed for the sending node
//! ```
//!
//! Pure encode and decode functions over byte slices: a peer controls every byte here, so
//! nothing panics and every length is bounded ([`MAX_FIELD`]).

use weft_discovery::ServiceKey;

/// The only header version this agent speaks.
pub const VERSION: u8 = 1;
/// Kind of a plain TCP stream.
pub const KIND_TCP: u8 = 1;
/// Kind of a stream carrying HTTP/2 requests.
pub const KIND_HTTP: u8 = 2;

/// What a stream carries after the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// One TCP connection's bytes.
    Tcp,
    /// HTTP/2 requests, decided and routed one by one.
    Http,
}

impl StreamKind {
    fn byte(self) -> u8 {
        match self {
            StreamKind::Tcp => KIND_TCP,
            StreamKind::Http => KIND_HTTP,
        }
    }
}
/// Longest string field accepted.
pub const MAX_FIELD: usize = 256;

/// What a stream is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// What the stream carries.
    pub kind: StreamKind,
    /// The service to deliver to.
    pub destination: ServiceKey,
    /// The calling service, if the connection acts for one.
    pub source: Option<ServiceKey>,
}

/// Why a header could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// More bytes are needed.
    #[error("header incomplete")]
    Incomplete,
    /// A version this agent does not speak.
    #[error("unsupported stream header version {0}")]
    Version(u8),
    /// A kind this agent does not know.
    #[error("unknown stream kind {0}")]
    Kind(u8),
    /// A field over [`MAX_FIELD`] bytes.
    #[error("field of {0} bytes is over the {MAX_FIELD}-byte limit")]
    TooLong(usize),
    /// A field that is not UTF-8 or not `namespace/name`.
    #[error("field is not a namespace/name service: {0:?}")]
    BadService(String),
}

/// The receiver's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Connected to the service; bytes follow.
    Ok = 0,
    /// Policy refused the source.
    Denied = 1,
    /// The service does not run on this host.
    UnknownService = 2,
    /// The service's local port refused or timed out.
    UpstreamRefused = 3,
    /// The agent is draining and takes no new streams.
    Draining = 4,
    /// The header could not be read.
    BadHeader = 5,
    /// The sending node may not act for the source it named.
    SourceNotAllowed = 6,
}

impl Status {
    fn from_byte(b: u8) -> Option<Status> {
        Some(match b {
            0 => Status::Ok,
            1 => Status::Denied,
            2 => Status::UnknownService,
            3 => Status::UpstreamRefused,
            4 => Status::Draining,
            5 => Status::BadHeader,
            6 => Status::SourceNotAllowed,
            _ => return None,
        })
    }

    /// Short label for metrics and logs.
    pub fn as_label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Denied => "denied",
            Status::UnknownService => "unknown_service",
            Status::UpstreamRefused => "upstream_refused",
            Status::Draining => "draining",
            Status::BadHeader => "bad_header",
            Status::SourceNotAllowed => "source_not_allowed",
        }
    }

    /// Whether another endpoint of the same service might accept the connection.
    pub fn worth_another_endpoint(self) -> bool {
        matches!(
            self,
            Status::UnknownService | Status::UpstreamRefused | Status::Draining
        )
    }
}

fn push_field(out: &mut Vec<u8>, field: &str) {
    // Service names are at most 63 + 1 + 63 bytes (config and SPIFFE checks), far below the
    // limit; truncating would name another service.
    debug_assert!(
        field.len() <= MAX_FIELD,
        "header field of {} bytes",
        field.len()
    );
    let bytes = &field.as_bytes()[..field.len().min(MAX_FIELD)];
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Reads one length-prefixed field at `at`; returns it and the offset after it.
fn read_field(buf: &[u8], at: usize) -> Result<(&[u8], usize), HeaderError> {
    let len_bytes = buf.get(at..at + 2).ok_or(HeaderError::Incomplete)?;
    let len = u16::from_be_bytes([len_bytes[0], len_bytes[1]]) as usize;
    if len > MAX_FIELD {
        return Err(HeaderError::TooLong(len));
    }
    let field = buf
        .get(at + 2..at + 2 + len)
        .ok_or(HeaderError::Incomplete)?;
    Ok((field, at + 2 + len))
}

fn service_of(field: &[u8]) -> Result<ServiceKey, HeaderError> {
    let text = std::str::from_utf8(field)
        .map_err(|_| HeaderError::BadService(String::from_utf8_lossy(field).into()))?;
    ServiceKey::from_gossip_suffix(text).ok_or_else(|| HeaderError::BadService(text.into()))
}

impl StreamHeader {
    /// Encodes the header.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION, self.kind.byte()];
        push_field(&mut out, &self.destination.to_string());
        push_field(
            &mut out,
            &self
                .source
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        );
        out
    }

    /// Decodes a header from the start of `buf`; returns it and how many bytes it used.
    pub fn decode(buf: &[u8]) -> Result<(StreamHeader, usize), HeaderError> {
        let version = *buf.first().ok_or(HeaderError::Incomplete)?;
        if version != VERSION {
            return Err(HeaderError::Version(version));
        }
        let kind = match *buf.get(1).ok_or(HeaderError::Incomplete)? {
            KIND_TCP => StreamKind::Tcp,
            KIND_HTTP => StreamKind::Http,
            other => return Err(HeaderError::Kind(other)),
        };
        let (destination, at) = read_field(buf, 2)?;
        let (source, used) = read_field(buf, at)?;
        let destination = service_of(destination)?;
        let source = if source.is_empty() {
            None
        } else {
            Some(service_of(source)?)
        };
        Ok((
            StreamHeader {
                kind,
                destination,
                source,
            },
            used,
        ))
    }
}

/// Encodes a reply.
pub fn encode_reply(status: Status, reason: &str) -> Vec<u8> {
    let mut out = vec![status as u8];
    push_field(&mut out, reason);
    out
}

/// Decodes a reply from the start of `buf`; returns the status, reason and bytes used.
pub fn decode_reply(buf: &[u8]) -> Result<(Status, String, usize), HeaderError> {
    let byte = *buf.first().ok_or(HeaderError::Incomplete)?;
    let status = Status::from_byte(byte).ok_or(HeaderError::Kind(byte))?;
    let (reason, used) = read_field(buf, 1)?;
    Ok((status, String::from_utf8_lossy(reason).into_owned(), used))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(source: Option<&str>) -> StreamHeader {
        StreamHeader {
            kind: StreamKind::Tcp,
            destination: ServiceKey::new("shop", "db"),
            source: source.map(|s| ServiceKey::new("default", s)),
        }
    }

    #[test]
    fn header_round_trips_with_and_without_source() {
        for h in [header(Some("web")), header(None)] {
            let bytes = h.encode();
            assert_eq!(StreamHeader::decode(&bytes), Ok((h.clone(), bytes.len())));
            let mut longer = bytes.clone();
            longer.extend_from_slice(b"app bytes");
            assert_eq!(StreamHeader::decode(&longer).unwrap().1, bytes.len());
        }
    }

    #[test]
    fn http_streams_round_trip() {
        let h = StreamHeader {
            kind: StreamKind::Http,
            ..header(Some("web"))
        };
        let bytes = h.encode();
        assert_eq!(bytes[1], KIND_HTTP);
        assert_eq!(StreamHeader::decode(&bytes), Ok((h, bytes.len())));
    }

    #[test]
    fn every_prefix_is_incomplete_never_a_panic() {
        let bytes = header(Some("web")).encode();
        for cut in 0..bytes.len() {
            assert_eq!(
                StreamHeader::decode(&bytes[..cut]),
                Err(HeaderError::Incomplete),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn bad_headers_are_named() {
        assert_eq!(StreamHeader::decode(&[2, 1]), Err(HeaderError::Version(2)));
        assert_eq!(StreamHeader::decode(&[1, 9]), Err(HeaderError::Kind(9)));
        assert_eq!(
            StreamHeader::decode(&[1, 1, 0xff, 0xff]),
            Err(HeaderError::TooLong(65535))
        );
        let mut bad = vec![1, 1, 0, 2, b'n', b'o', 0, 0];
        assert!(matches!(
            StreamHeader::decode(&bad),
            Err(HeaderError::BadService(_))
        ));
        bad = vec![1, 1, 0, 3, b'a', b'/', 0xff, 0, 0];
        assert!(matches!(
            StreamHeader::decode(&bad),
            Err(HeaderError::BadService(_))
        ));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 40) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (state >> (i % 8 * 8)) as u8).collect();
            let _ = StreamHeader::decode(&bytes);
            let _ = decode_reply(&bytes);
        }
    }

    #[test]
    fn replies_round_trip() {
        for status in [
            Status::Ok,
            Status::Denied,
            Status::UnknownService,
            Status::UpstreamRefused,
            Status::Draining,
            Status::BadHeader,
            Status::SourceNotAllowed,
        ] {
            let bytes = encode_reply(status, "because");
            assert_eq!(
                decode_reply(&bytes),
                Ok((status, "because".to_string(), bytes.len()))
            );
        }
        assert_eq!(decode_reply(&[0, 0]), Err(HeaderError::Incomplete));
        assert_eq!(decode_reply(&[42, 0, 0]), Err(HeaderError::Kind(42)));
    }
}
