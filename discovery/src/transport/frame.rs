//! The sealed gossip wire format: sealing, opening, reassembly and replay detection.
//!
//! Owns the frame layout and every check a datagram goes through before chitchat sees it.
//! Everything here is a pure function or a plain data structure: no sockets, no clock reads,
//! no tasks, so tests and the fuzz target can drive any sequence of datagrams. It must never
//! panic on input a peer controls, and never let an unauthenticated byte into any state.
//!
//! One frame on the wire:
//!
//! ```text
//! 0      1      2      3           7                  15                     39        n-16     n
//! | 0xE1 | index| count| msg_id u32 | unix ms u64       | nonce (24 bytes)     | ciphertext | tag |
//! |<---------------- header, authenticated as AAD ----->|
//! ```
//!
//! Integers are big-endian. The cipher is XChaCha20-Poly1305 with a random nonce per frame,
//! so no nonce state is kept and a key has no practical message limit. A chitchat message
//! whose sealed size would exceed `max_datagram` is split into `count` frames sharing
//! `msg_id`; each frame is sealed on its own, so a forged fragment is rejected before it can
//! occupy reassembly memory.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};
use rand::RngCore;

use crate::keyring::{GossipKey, Keyring};
use crate::metrics::PacketOutcome;

/// First byte of every sealed frame. Plaintext chitchat starts with 0x53, so the two can be
/// told apart should a plaintext-to-sealed migration mode ever be needed.
pub const VERSION: u8 = 0xE1;
/// Bytes of the authenticated header: version, index, count, msg_id, timestamp.
pub const HEADER_LEN: usize = 15;
/// Bytes of the XChaCha20 nonce.
pub const NONCE_LEN: usize = 24;
/// Bytes of the Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// Bytes a frame adds to its share of the message.
pub const OVERHEAD: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;
/// Largest datagram sent or accepted: the IPv4 UDP payload limit chitchat also uses.
pub const MAX_DATAGRAM: usize = 65_507;
/// Smallest allowed `max_datagram`; keeps any message within 255 fragments.
pub const MIN_DATAGRAM: usize = 512;
/// Largest chitchat message carried: chitchat's codec socket reads at most this much.
pub const MAX_MESSAGE: usize = 65_507;
/// Partial messages held at once, across all peers.
pub const MAX_PARTIAL_MESSAGES: usize = 256;
/// How long a partial message may wait for its missing fragments.
pub const REASSEMBLY_TIMEOUT: Duration = Duration::from_secs(2);
/// Nonces remembered by the replay guard before it starts refusing its oldest timestamps.
pub const REPLAY_CAPACITY: usize = 65_536;

/// Why a message could not be sealed (local misuse, never peer input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The message is larger than any receiver accepts.
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE}-byte limit")]
    MessageTooLarge(usize),
    /// `max_datagram` is outside the supported range.
    #[error("max_datagram {0} is outside {MIN_DATAGRAM}..={MAX_DATAGRAM}")]
    DatagramSize(usize),
    /// The cipher refused to seal (cannot happen below its 256 GiB message limit).
    #[error("the cipher refused to seal")]
    Cipher,
}

/// The authenticated header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Position of this fragment, `0..count`.
    pub index: u8,
    /// Fragments in the message, at least 1.
    pub count: u8,
    /// Identifies the message among the sender's fragments in flight.
    pub msg_id: u32,
    /// Sender's wall clock when sealing, in unix milliseconds.
    pub timestamp_ms: u64,
}

impl FrameHeader {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = VERSION;
        out[1] = self.index;
        out[2] = self.count;
        out[3..7].copy_from_slice(&self.msg_id.to_be_bytes());
        out[7..15].copy_from_slice(&self.timestamp_ms.to_be_bytes());
        out
    }

    fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, PacketOutcome> {
        let [version, index, count, m0, m1, m2, m3, t @ ..] = *bytes;
        if version != VERSION || count == 0 || index >= count {
            return Err(PacketOutcome::Malformed);
        }
        Ok(FrameHeader {
            index,
            count,
            msg_id: u32::from_be_bytes([m0, m1, m2, m3]),
            timestamp_ms: u64::from_be_bytes(t),
        })
    }
}

/// A frame that passed authentication and the freshness check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedFrame {
    /// Its header.
    pub header: FrameHeader,
    /// Its nonce, which the replay guard remembers.
    pub nonce: [u8; NONCE_LEN],
    /// The decrypted fragment of the chitchat message.
    pub plaintext: Vec<u8>,
    /// Position in the keyring of the key that opened it (0 is the primary).
    pub key_index: usize,
}

impl OpenedFrame {
    /// True when a key other than the primary opened it (a rotation is in progress).
    pub fn opened_with_secondary_key(&self) -> bool {
        self.key_index > 0
    }
}

/// Unix milliseconds of `time`; 0 for a clock before 1970.
pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Checks that `max_datagram` is a size `seal` accepts.
pub fn check_max_datagram(max_datagram: usize) -> Result<(), SealError> {
    if (MIN_DATAGRAM..=MAX_DATAGRAM).contains(&max_datagram) {
        Ok(())
    } else {
        Err(SealError::DatagramSize(max_datagram))
    }
}

fn cipher(key: &GossipKey) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(Key::from_slice(key.as_bytes()))
}

/// Seals one chitchat message with the keyring's primary key into frames of at most
/// `max_datagram` bytes each, split evenly when it does not fit in one.
pub fn seal(
    keyring: &Keyring,
    msg_id: u32,
    now_ms: u64,
    plaintext: &[u8],
    max_datagram: usize,
) -> Result<Vec<Vec<u8>>, SealError> {
    check_max_datagram(max_datagram)?;
    if plaintext.len() > MAX_MESSAGE {
        return Err(SealError::MessageTooLarge(plaintext.len()));
    }
    let room = max_datagram - OVERHEAD;
    let wanted = plaintext.len().div_ceil(room).max(1);
    // Even pieces rather than full ones plus a runt: same frame count, smaller largest frame.
    let piece_len = plaintext.len().div_ceil(wanted).max(1);
    let pieces: Vec<&[u8]> = if plaintext.is_empty() {
        vec![plaintext]
    } else {
        plaintext.chunks(piece_len).collect()
    };
    // MIN_DATAGRAM and MAX_MESSAGE guarantee at most 145 pieces, but never trust arithmetic
    // with a wire field.
    let count = u8::try_from(pieces.len()).map_err(|_| SealError::DatagramSize(max_datagram))?;
    let cipher = cipher(keyring.primary());
    let mut rng = rand::rng();
    pieces
        .iter()
        .zip(0..count)
        .map(|(piece, index)| {
            let header = FrameHeader {
                index,
                count,
                msg_id,
                timestamp_ms: now_ms,
            };
            let mut nonce = [0u8; NONCE_LEN];
            rng.fill_bytes(&mut nonce);
            seal_frame(&cipher, &header, &nonce, piece)
        })
        .collect()
}

fn seal_frame(
    cipher: &XChaCha20Poly1305,
    header: &FrameHeader,
    nonce: &[u8; NONCE_LEN],
    piece: &[u8],
) -> Result<Vec<u8>, SealError> {
    let header = header.encode();
    let body_start = HEADER_LEN + NONCE_LEN;
    let mut frame = Vec::with_capacity(piece.len() + OVERHEAD);
    frame.extend_from_slice(&header);
    frame.extend_from_slice(nonce);
    frame.extend_from_slice(piece);
    let tag = cipher
        .encrypt_in_place_detached(XNonce::from_slice(nonce), &header, &mut frame[body_start..])
        .map_err(|_| SealError::Cipher)?;
    frame.extend_from_slice(&tag);
    Ok(frame)
}

/// How far ahead of our clock a frame's timestamp may be: small, so that hosts need NTP-grade
/// clocks, and a frame sealed (or captured) now stays usable for at most `freshness` from now,
/// not `freshness` past a far-future timestamp.
pub const MAX_FUTURE_SKEW: Duration = Duration::from_secs(10);

/// Opens one datagram: checks its shape, authenticates it with each key of the keyring in
/// order, decrypts it and checks that its timestamp is at most `freshness` behind `now_ms`
/// and at most [`MAX_FUTURE_SKEW`] ahead of it.
///
/// The error is the outcome to count; nothing about an unauthenticated datagram is kept.
pub fn open(
    keyring: &Keyring,
    datagram: &[u8],
    now_ms: u64,
    freshness: Duration,
) -> Result<OpenedFrame, PacketOutcome> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(PacketOutcome::Oversized);
    }
    if datagram.len() < OVERHEAD {
        return Err(PacketOutcome::Malformed);
    }
    let (aad, rest) = datagram.split_at(HEADER_LEN);
    let (nonce, rest) = rest.split_at(NONCE_LEN);
    let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
    let header_bytes: &[u8; HEADER_LEN] = aad.try_into().map_err(|_| PacketOutcome::Malformed)?;
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| PacketOutcome::Malformed)?;
    let header = FrameHeader::decode(header_bytes)?;

    // Poly1305 is verified before any byte is decrypted, so a failed key leaves `plaintext`
    // as ciphertext for the next one.
    let mut plaintext = body.to_vec();
    let key_index = keyring
        .keys()
        .iter()
        .position(|key| {
            cipher(key)
                .decrypt_in_place_detached(
                    XNonce::from_slice(&nonce),
                    aad,
                    &mut plaintext,
                    Tag::from_slice(tag),
                )
                .is_ok()
        })
        .ok_or(PacketOutcome::BadAuth)?;

    let window_ms = u64::try_from(freshness.as_millis()).unwrap_or(u64::MAX);
    let ahead_ms = u64::try_from(MAX_FUTURE_SKEW.as_millis())
        .unwrap_or(u64::MAX)
        .min(window_ms);
    let ts = header.timestamp_ms;
    if now_ms.saturating_sub(ts) > window_ms || ts.saturating_sub(now_ms) > ahead_ms {
        return Err(PacketOutcome::Stale);
    }
    Ok(OpenedFrame {
        header,
        nonce,
        plaintext,
        key_index,
    })
}

/// Remembers the nonces of authenticated frames inside the freshness window, so a frame
/// captured and sent again is refused.
///
/// Memory is bounded: a nonce is forgotten once its timestamp leaves the window (the
/// freshness check refuses it from then on), and past `capacity` the oldest entries are
/// dropped while every timestamp up to the newest dropped one is refused. So a full guard
/// refuses old frames rather than letting a replay through.
#[derive(Debug)]
pub struct ReplayGuard {
    window_ms: u64,
    capacity: usize,
    seen: BTreeSet<(u64, [u8; NONCE_LEN])>,
    /// Timestamps at or below this are refused: their nonces may have been forgotten.
    floor_ms: Option<u64>,
}

impl ReplayGuard {
    /// A guard for frames accepted within `freshness` of now, holding at most `capacity`
    /// nonces.
    pub fn new(freshness: Duration, capacity: usize) -> Self {
        ReplayGuard {
            window_ms: u64::try_from(freshness.as_millis()).unwrap_or(u64::MAX),
            capacity: capacity.max(1),
            seen: BTreeSet::new(),
            floor_ms: None,
        }
    }

    /// Records `frame` and accepts it, or refuses it as [`PacketOutcome::Replayed`].
    pub fn check(&mut self, frame: &OpenedFrame, now_ms: u64) -> Result<(), PacketOutcome> {
        let horizon = now_ms.saturating_sub(self.window_ms);
        while let Some(&(ts, _)) = self.seen.first() {
            if ts >= horizon {
                break;
            }
            self.forget_oldest();
        }
        let ts = frame.header.timestamp_ms;
        if self.floor_ms.is_some_and(|floor| ts <= floor) {
            return Err(PacketOutcome::Replayed);
        }
        if !self.seen.insert((ts, frame.nonce)) {
            return Err(PacketOutcome::Replayed);
        }
        while self.seen.len() > self.capacity {
            self.forget_oldest();
        }
        Ok(())
    }

    fn forget_oldest(&mut self) {
        if let Some((ts, _)) = self.seen.pop_first() {
            self.floor_ms = Some(self.floor_ms.map_or(ts, |floor| floor.max(ts)));
        }
    }

    /// Number of nonces remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when no nonce is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// A message waiting for its other fragments.
#[derive(Debug)]
struct Partial {
    count: u8,
    fragments: Vec<Option<Vec<u8>>>,
    received: usize,
    bytes: usize,
    started: Instant,
}

/// Joins authenticated fragments back into chitchat messages, with bounded memory: at most
/// `max_partial` incomplete messages, each for at most `timeout`, each at most
/// [`MAX_MESSAGE`] bytes.
#[derive(Debug)]
pub struct Reassembler {
    max_partial: usize,
    timeout: Duration,
    partial: HashMap<(SocketAddr, u32), Partial>,
}

impl Default for Reassembler {
    fn default() -> Self {
        Reassembler::new(MAX_PARTIAL_MESSAGES, REASSEMBLY_TIMEOUT)
    }
}

impl Reassembler {
    /// A reassembler holding at most `max_partial` incomplete messages for `timeout` each.
    pub fn new(max_partial: usize, timeout: Duration) -> Self {
        Reassembler {
            max_partial: max_partial.max(1),
            timeout,
            partial: HashMap::new(),
        }
    }

    /// Adds a fragment from `from`; returns the whole message once its last fragment is in.
    ///
    /// A fragment that contradicts what is held (another count, an index already received)
    /// is refused as malformed and a message growing past [`MAX_MESSAGE`] as oversized.
    pub fn accept(
        &mut self,
        from: SocketAddr,
        frame: OpenedFrame,
        now: Instant,
    ) -> Result<Option<Vec<u8>>, PacketOutcome> {
        let FrameHeader {
            index,
            count,
            msg_id,
            ..
        } = frame.header;
        if count == 1 {
            return Ok(Some(frame.plaintext));
        }
        let timeout = self.timeout;
        self.partial
            .retain(|_, p| now.saturating_duration_since(p.started) < timeout);
        let key = (from, msg_id);
        if !self.partial.contains_key(&key) && self.partial.len() >= self.max_partial {
            // Evicting the oldest keeps the table useful for live senders; a peer can only
            // fill it with authenticated fragments anyway.
            if let Some(oldest) = self
                .partial
                .iter()
                .min_by_key(|(_, p)| p.started)
                .map(|(k, _)| *k)
            {
                self.partial.remove(&oldest);
            }
        }
        let partial = self.partial.entry(key).or_insert_with(|| Partial {
            count,
            fragments: vec![None; usize::from(count)],
            received: 0,
            bytes: 0,
            started: now,
        });
        if partial.count != count {
            return Err(PacketOutcome::Malformed);
        }
        let Some(slot) = partial.fragments.get_mut(usize::from(index)) else {
            return Err(PacketOutcome::Malformed);
        };
        if slot.is_some() {
            return Err(PacketOutcome::Malformed);
        }
        if partial.bytes + frame.plaintext.len() > MAX_MESSAGE {
            self.partial.remove(&key);
            return Err(PacketOutcome::Oversized);
        }
        partial.bytes += frame.plaintext.len();
        partial.received += 1;
        *slot = Some(frame.plaintext);
        if partial.received < usize::from(partial.count) {
            return Ok(None);
        }
        let Some(done) = self.partial.remove(&key) else {
            return Ok(None);
        };
        let mut message = Vec::with_capacity(done.bytes);
        for piece in done.fragments.into_iter().flatten() {
            message.extend_from_slice(&piece);
        }
        Ok(Some(message))
    }

    /// Number of incomplete messages held.
    pub fn len(&self) -> usize {
        self.partial.len()
    }

    /// True when no incomplete message is held.
    pub fn is_empty(&self) -> bool {
        self.partial.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::GossipKey;

    const NOW: u64 = 1_700_000_000_000;
    const WINDOW: Duration = Duration::from_secs(60);

    fn ring(keys: &[&GossipKey]) -> Keyring {
        Keyring::new(keys.iter().map(|k| (*k).clone()).collect()).unwrap()
    }

    fn peer() -> SocketAddr {
        "127.0.0.1:7401".parse().unwrap()
    }

    /// Deterministic, poorly compressible bytes (xorshift), so tests need no RNG seed.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn frame_with(key: &GossipKey, header: FrameHeader, piece: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        seal_frame(&cipher(key), &header, &nonce, piece).unwrap()
    }

    fn header(index: u8, count: u8, msg_id: u32) -> FrameHeader {
        FrameHeader {
            index,
            count,
            msg_id,
            timestamp_ms: NOW,
        }
    }

    #[test]
    fn round_trip_small_message() {
        let k = GossipKey::generate();
        let keys = ring(&[&k]);
        let frames = seal(&keys, 7, NOW, b"hello chitchat", MAX_DATAGRAM).unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].len(), 14 + OVERHEAD);
        assert_eq!(frames[0][0], VERSION);
        let opened = open(&keys, &frames[0], NOW + 5, WINDOW).unwrap();
        assert_eq!(opened.plaintext, b"hello chitchat");
        assert_eq!(opened.header, header(0, 1, 7));
        assert!(!opened.opened_with_secondary_key());
    }

    #[test]
    fn empty_message_round_trips() {
        let keys = ring(&[&GossipKey::generate()]);
        let frames = seal(&keys, 1, NOW, b"", MAX_DATAGRAM).unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].len(), OVERHEAD);
        assert!(
            open(&keys, &frames[0], NOW, WINDOW)
                .unwrap()
                .plaintext
                .is_empty()
        );
    }

    #[test]
    fn same_message_sealed_twice_differs() {
        let keys = ring(&[&GossipKey::generate()]);
        let a = seal(&keys, 1, NOW, b"same", MAX_DATAGRAM).unwrap();
        let b = seal(&keys, 1, NOW, b"same", MAX_DATAGRAM).unwrap();
        assert_ne!(a, b, "nonces must be fresh per frame");
    }

    #[test]
    fn every_tampered_byte_is_refused() {
        let keys = ring(&[&GossipKey::generate()]);
        let frame = seal(&keys, 9, NOW, &noise(300, 1), MAX_DATAGRAM)
            .unwrap()
            .remove(0);
        for i in 0..frame.len() {
            let mut bad = frame.clone();
            bad[i] ^= 0x01;
            let outcome = open(&keys, &bad, NOW, WINDOW).unwrap_err();
            // Flipping the version or making index >= count is caught before the cipher;
            // every other bit flip must fail authentication.
            let expected = if i == 0 || i == 1 || i == 2 {
                PacketOutcome::Malformed
            } else {
                PacketOutcome::BadAuth
            };
            assert_eq!(outcome, expected, "byte {i}");
        }
    }

    #[test]
    fn wrong_key_is_bad_auth() {
        let frame = seal(&ring(&[&GossipKey::generate()]), 1, NOW, b"x", MAX_DATAGRAM)
            .unwrap()
            .remove(0);
        let other = ring(&[&GossipKey::generate(), &GossipKey::generate()]);
        assert_eq!(
            open(&other, &frame, NOW, WINDOW),
            Err(PacketOutcome::BadAuth)
        );
    }

    #[test]
    fn secondary_key_opens_and_is_reported() {
        let old = GossipKey::generate();
        let new = GossipKey::generate();
        let frame = seal(&ring(&[&old]), 1, NOW, b"rotating", MAX_DATAGRAM)
            .unwrap()
            .remove(0);
        let opened = open(&ring(&[&new, &old]), &frame, NOW, WINDOW).unwrap();
        assert_eq!(opened.key_index, 1);
        assert!(opened.opened_with_secondary_key());
        assert_eq!(opened.plaintext, b"rotating");
    }

    #[test]
    fn truncated_short_and_wrong_version_are_malformed() {
        let keys = ring(&[&GossipKey::generate()]);
        let frame = seal(&keys, 1, NOW, b"payload", MAX_DATAGRAM)
            .unwrap()
            .remove(0);
        for len in 0..OVERHEAD {
            assert_eq!(
                open(&keys, &frame[..len], NOW, WINDOW),
                Err(PacketOutcome::Malformed),
                "len {len}"
            );
        }
        // Cut inside the ciphertext: the shape is fine, the tag is not.
        assert_eq!(
            open(&keys, &frame[..frame.len() - 1], NOW, WINDOW),
            Err(PacketOutcome::BadAuth)
        );
        let mut plaintext_chitchat = frame.clone();
        plaintext_chitchat[0] = 0x53;
        assert_eq!(
            open(&keys, &plaintext_chitchat, NOW, WINDOW),
            Err(PacketOutcome::Malformed)
        );
    }

    #[test]
    fn inconsistent_fragment_header_is_malformed() {
        let k = GossipKey::generate();
        let keys = ring(&[&k]);
        for (index, count) in [(0, 0), (2, 2), (255, 1), (200, 100)] {
            let frame = frame_with(&k, header(index, count, 1), b"x");
            assert_eq!(
                open(&keys, &frame, NOW, WINDOW),
                Err(PacketOutcome::Malformed),
                "index {index} count {count}"
            );
        }
    }

    #[test]
    fn datagram_over_the_udp_limit_is_oversized() {
        let keys = ring(&[&GossipKey::generate()]);
        assert_eq!(
            open(&keys, &vec![VERSION; MAX_DATAGRAM + 1], NOW, WINDOW),
            Err(PacketOutcome::Oversized)
        );
    }

    #[test]
    fn random_and_truncated_garbage_never_panics_and_is_refused() {
        let k = GossipKey::generate();
        let keys = ring(&[&k]);
        let real = seal(&keys, 3, NOW, &noise(2_000, 5), MAX_DATAGRAM)
            .unwrap()
            .remove(0);
        let mut rng = rand::rng();
        for round in 0..2_000u64 {
            let datagram = match round % 4 {
                // Pure noise of any length up to a little over one frame.
                0 => noise((rng.next_u32() % 3_000) as usize, round + 11),
                // Noise behind a valid version byte and a plausible fragment header.
                1 => {
                    let mut d = noise(OVERHEAD + (rng.next_u32() % 500) as usize, round + 13);
                    d[0] = VERSION;
                    d[1] = 0;
                    d[2] = 1;
                    d
                }
                // A real frame cut anywhere.
                2 => real[..(rng.next_u32() as usize) % real.len()].to_vec(),
                // A real frame with a random byte changed.
                _ => {
                    let mut d = real.clone();
                    let at = (rng.next_u32() as usize) % d.len();
                    d[at] = d[at].wrapping_add(1 + (rng.next_u32() % 255) as u8);
                    d
                }
            };
            let outcome = open(&keys, &datagram, NOW, WINDOW).unwrap_err();
            assert!(
                matches!(outcome, PacketOutcome::Malformed | PacketOutcome::BadAuth),
                "round {round}: {outcome:?}"
            );
        }
    }

    #[test]
    fn large_message_is_fragmented_and_reassembled() {
        let keys = ring(&[&GossipKey::generate()]);
        // A 200 KB message is bigger than any chitchat datagram, so test the limit honestly:
        // seal refuses it, and its 64 KB prefix splits and rejoins at both frame sizes.
        let big = noise(200_000, 42);
        assert_eq!(
            seal(&keys, 1, NOW, &big, MAX_DATAGRAM),
            Err(SealError::MessageTooLarge(200_000))
        );
        let message = &big[..MAX_MESSAGE];
        for (max_datagram, expected_frames) in [(MAX_DATAGRAM, 2), (1_400, 49)] {
            let frames = seal(&keys, 77, NOW, message, max_datagram).unwrap();
            assert_eq!(frames.len(), expected_frames, "max_datagram {max_datagram}");
            assert!(frames.iter().all(|f| f.len() <= max_datagram));
            let mut reassembler = Reassembler::default();
            let mut replay = ReplayGuard::new(WINDOW, REPLAY_CAPACITY);
            let now = Instant::now();
            let mut out = None;
            // Out of order on purpose: reassembly places fragments by index.
            for frame in frames.iter().rev() {
                let opened = open(&keys, frame, NOW, WINDOW).unwrap();
                replay.check(&opened, NOW).unwrap();
                assert!(out.is_none(), "message completed early");
                out = reassembler.accept(peer(), opened, now).unwrap();
            }
            assert_eq!(out.as_deref(), Some(message));
            assert!(reassembler.is_empty());
        }
    }

    #[test]
    fn seal_refuses_bad_datagram_sizes() {
        let keys = ring(&[&GossipKey::generate()]);
        for size in [0, 55, MIN_DATAGRAM - 1, MAX_DATAGRAM + 1] {
            assert_eq!(
                seal(&keys, 1, NOW, b"x", size),
                Err(SealError::DatagramSize(size))
            );
        }
        // The smallest datagram still carries the largest message.
        let frames = seal(&keys, 1, NOW, &noise(MAX_MESSAGE, 3), MIN_DATAGRAM).unwrap();
        assert!(frames.len() <= 255);
    }

    #[test]
    fn fragments_from_different_peers_and_messages_do_not_mix() {
        let k = GossipKey::generate();
        let keys = ring(&[&k]);
        let other: SocketAddr = "127.0.0.1:7402".parse().unwrap();
        let mut r = Reassembler::default();
        let now = Instant::now();
        let f = |i, id, body: &[u8]| {
            open(&keys, &frame_with(&k, header(i, 2, id), body), NOW, WINDOW).unwrap()
        };
        assert_eq!(r.accept(peer(), f(0, 1, b"a0"), now), Ok(None));
        assert_eq!(r.accept(other, f(1, 1, b"b1"), now), Ok(None));
        assert_eq!(r.accept(peer(), f(1, 2, b"c1"), now), Ok(None));
        assert_eq!(r.len(), 3);
        assert_eq!(
            r.accept(peer(), f(1, 1, b"a1"), now),
            Ok(Some(b"a0a1".to_vec()))
        );
        assert_eq!(
            r.accept(other, f(0, 1, b"b0"), now),
            Ok(Some(b"b0b1".to_vec()))
        );
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn reassembly_refuses_contradicting_fragments() {
        let k = GossipKey::generate();
        let keys = ring(&[&k]);
        let mut r = Reassembler::default();
        let now = Instant::now();
        let f = |i, n, body: &[u8]| {
            open(&keys, &frame_with(&k, header(i, n, 5), body), NOW, WINDOW).unwrap()
        };
        assert_eq!(r.accept(peer(), f(0, 3, b"x"), now), Ok(None));
        assert_eq!(
            r.accept(peer(), f(0, 3, b"x"), now),
            Err(PacketOutcome::Malformed),
            "same index twice"
        );
        assert_eq!(
            r.accept(peer(), f(1, 2, b"x"), now),
            Err(PacketOutcome::Malformed),
            "another count for the same message"
        );
        // The partial message survives both and still completes.
        assert_eq!(r.accept(peer(), f(1, 3, b"y"), now), Ok(None));
        assert_eq!(
            r.accept(peer(), f(2, 3, b"z"), now),
            Ok(Some(b"xyz".to_vec()))
        );
    }

    #[test]
    fn reassembly_refuses_a_message_over_the_limit() {
        let k = GossipKey::generate();
        let keys = ring(&[&k]);
        let mut r = Reassembler::default();
        let now = Instant::now();
        let half = noise(MAX_MESSAGE / 2 + 10, 9);
        let f = |i| open(&keys, &frame_with(&k, header(i, 3, 8), &half), NOW, WINDOW).unwrap();
        assert_eq!(r.accept(peer(), f(0), now), Ok(None));
        assert_eq!(r.accept(peer(), f(1), now), Err(PacketOutcome::Oversized));
        assert!(r.is_empty(), "an oversized message is dropped whole");
    }

    #[test]
    fn reassembly_holds_at_most_max_partial_and_evicts_the_oldest() {
        let k = GossipKey::generate();
        let keys = ring(&[&k]);
        let mut r = Reassembler::default();
        let start = Instant::now();
        let f = |i, id| open(&keys, &frame_with(&k, header(i, 2, id), b"p"), NOW, WINDOW).unwrap();
        for id in 0..300u32 {
            let at = start + Duration::from_millis(u64::from(id));
            assert_eq!(r.accept(peer(), f(0, id), at), Ok(None));
            assert!(r.len() <= MAX_PARTIAL_MESSAGES);
        }
        assert_eq!(r.len(), MAX_PARTIAL_MESSAGES);
        let at = start + Duration::from_millis(300);
        // The 44 oldest were evicted: their second half starts a new partial message.
        assert_eq!(r.accept(peer(), f(1, 0), at), Ok(None));
        // A recent one still completes.
        assert_eq!(r.accept(peer(), f(1, 299), at), Ok(Some(b"pp".to_vec())));
    }

    #[test]
    fn partial_messages_expire_after_the_timeout() {
        let k = GossipKey::generate();
        let keys = ring(&[&k]);
        let mut r = Reassembler::default();
        let start = Instant::now();
        let f = |i, id| open(&keys, &frame_with(&k, header(i, 2, id), b"q"), NOW, WINDOW).unwrap();
        assert_eq!(r.accept(peer(), f(0, 1), start), Ok(None));
        assert_eq!(r.accept(peer(), f(0, 2), start), Ok(None));
        let late = start + REASSEMBLY_TIMEOUT + Duration::from_millis(1);
        // Message 1's first half expired, so its second half waits alone; message 2 too.
        assert_eq!(r.accept(peer(), f(1, 1), late), Ok(None));
        assert_eq!(r.len(), 1);
        let in_time = start + REASSEMBLY_TIMEOUT - Duration::from_millis(1);
        let mut r = Reassembler::default();
        assert_eq!(r.accept(peer(), f(0, 3), start), Ok(None));
        assert_eq!(r.accept(peer(), f(1, 3), in_time), Ok(Some(b"qq".to_vec())));
    }

    #[test]
    fn stale_and_future_timestamps_are_refused_after_authentication() {
        let keys = ring(&[&GossipKey::generate()]);
        let frame = seal(&keys, 1, NOW, b"x", MAX_DATAGRAM).unwrap().remove(0);
        let hour = 3_600_000;
        assert_eq!(
            open(&keys, &frame, NOW + hour, WINDOW),
            Err(PacketOutcome::Stale)
        );
        assert_eq!(
            open(&keys, &frame, NOW - hour, WINDOW),
            Err(PacketOutcome::Stale)
        );
        assert!(open(&keys, &frame, NOW + 60_000, WINDOW).is_ok());
        assert_eq!(
            open(&keys, &frame, NOW + 60_001, WINDOW),
            Err(PacketOutcome::Stale)
        );
        // Ahead of the receiver's clock: only a small skew.
        assert!(open(&keys, &frame, NOW - 10_000, WINDOW).is_ok());
        assert_eq!(
            open(&keys, &frame, NOW - 10_001, WINDOW),
            Err(PacketOutcome::Stale)
        );
        // A forged old frame is bad_auth, not stale: the timestamp means nothing unsigned.
        let other = ring(&[&GossipKey::generate()]);
        assert_eq!(
            open(&other, &frame, NOW + hour, WINDOW),
            Err(PacketOutcome::BadAuth)
        );
    }

    #[test]
    fn replayed_frame_is_refused() {
        let keys = ring(&[&GossipKey::generate()]);
        let frame = seal(&keys, 1, NOW, b"syn", MAX_DATAGRAM).unwrap().remove(0);
        let mut guard = ReplayGuard::new(WINDOW, REPLAY_CAPACITY);
        let opened = open(&keys, &frame, NOW, WINDOW).unwrap();
        assert_eq!(guard.check(&opened, NOW), Ok(()));
        let again = open(&keys, &frame, NOW + 1_000, WINDOW).unwrap();
        assert_eq!(
            guard.check(&again, NOW + 1_000),
            Err(PacketOutcome::Replayed)
        );
        // Another frame of the same message (fresh nonce) is fine.
        let resealed = seal(&keys, 1, NOW, b"syn", MAX_DATAGRAM).unwrap().remove(0);
        let resealed = open(&keys, &resealed, NOW, WINDOW).unwrap();
        assert_eq!(guard.check(&resealed, NOW + 1_000), Ok(()));
    }

    #[test]
    fn replay_guard_forgets_what_left_the_window() {
        let keys = ring(&[&GossipKey::generate()]);
        let mut guard = ReplayGuard::new(WINDOW, REPLAY_CAPACITY);
        for i in 0..100 {
            let frame = seal(&keys, i, NOW + u64::from(i) * 1_000, b"x", MAX_DATAGRAM)
                .unwrap()
                .remove(0);
            let now = NOW + u64::from(i) * 1_000;
            guard
                .check(&open(&keys, &frame, now, WINDOW).unwrap(), now)
                .unwrap();
            assert!(guard.len() <= 61, "at {i}: {}", guard.len());
        }
    }

    #[test]
    fn full_replay_guard_refuses_old_timestamps_instead_of_forgetting() {
        let keys = ring(&[&GossipKey::generate()]);
        let mut guard = ReplayGuard::new(WINDOW, 10);
        let frames: Vec<OpenedFrame> = (0..20u64)
            .map(|i| {
                let f = seal(&keys, 1, NOW + i, b"x", MAX_DATAGRAM)
                    .unwrap()
                    .remove(0);
                open(&keys, &f, NOW + 20, WINDOW).unwrap()
            })
            .collect();
        for f in &frames {
            assert_eq!(guard.check(f, NOW + 20), Ok(()));
        }
        assert_eq!(guard.len(), 10);
        // Frame 0's nonce was dropped to stay bounded, and it is still refused.
        assert_eq!(
            guard.check(&frames[0], NOW + 20),
            Err(PacketOutcome::Replayed)
        );
        assert_eq!(
            guard.check(&frames[19], NOW + 20),
            Err(PacketOutcome::Replayed)
        );
    }

    #[test]
    fn unix_ms_of_the_epoch_is_zero() {
        assert_eq!(unix_ms(UNIX_EPOCH), 0);
        assert_eq!(unix_ms(UNIX_EPOCH + Duration::from_millis(1_234)), 1_234);
    }
}
