//! The fuzzing entry points for every Weft parser that reads bytes a peer or an operator
//! controls (SPEC §10: bad input never crashes the agent). Each takes the raw bytes libFuzzer
//! produces, drives one parser, and panics only when a property breaks: a panic inside the
//! parser is the bug being hunted, and an `assert!` here names a wrong answer.
//!
//! This file is compiled twice: as the `weft_fuzz` library that the cargo-fuzz targets in
//! `fuzz_targets/` call, and as a module of `tests/fuzz_regressions.rs`, which replays the
//! kept corpora and crash inputs with plain `cargo test`. So it may only use crates both
//! have: `weft`, `weft_ca`, `weft_discovery`, `base64`, `chacha20poly1305` and `hyper`. Fixtures (a CA, an operator credential, a gossip keyring) are made once per
//! process. See docs/fuzzing.md.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::LazyLock;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use hyper::HeaderMap;
use hyper::header::HeaderValue;
use weft::config::Config;
use weft::header::{MAX_FIELD, StreamHeader, decode_reply, encode_reply};
use weft::policy::engine::{Engine, HttpRequest, Request};
use weft::policy::matcher::normalize_path;
use weft::policy::model::{PolicySet, Subject};
use weft_ca::token::{self, TokenError};
use weft_ca::{OperatorCredential, OperatorSigner, SpiffeId, TrustBundle, TrustDomain};
use weft_discovery::transport::frame::{self, FrameHeader, HEADER_LEN, NONCE_LEN, ReplayGuard};
use weft_discovery::{GossipKey, Keyring, PacketOutcome, ServiceKey};

/// One fuzzing entry point: raw input bytes in, a panic out only on a finding.
pub type Target = fn(&[u8]);

/// Every target by the name `cargo fuzz` and the corpus directories use.
pub const TARGETS: &[(&str, Target)] = &[
    ("tunnel_header", tunnel_header),
    ("config", config),
    ("policy", policy),
    ("join_token", join_token),
    ("gossip_frame", gossip_frame),
];

// ---- tunnel stream header ---------------------------------------------------------------------

/// The tunnel stream header and reply decoders (`weft::header`), which read the first bytes
/// of every QUIC stream a peer opens. Properties: a decoded header or reply re-encodes to
/// exactly the bytes it was read from (the encoding is canonical), and a header built from
/// valid service names survives encode then decode, while every strict prefix of its
/// encoding is merely incomplete.
pub fn tunnel_header(data: &[u8]) {
    match StreamHeader::decode(data) {
        Ok((header, used)) => {
            assert!(
                used <= data.len(),
                "header used {used} of {} bytes",
                data.len()
            );
            assert_eq!(
                header.encode(),
                &data[..used],
                "header encoding is not canonical"
            );
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
    match decode_reply(data) {
        Ok((status, reason, used)) => {
            assert!(
                used <= data.len(),
                "reply used {used} of {} bytes",
                data.len()
            );
            // The reason is decoded lossily, so only UTF-8 reasons re-encode byte for byte.
            if std::str::from_utf8(&data[3..used]).is_ok() {
                assert_eq!(encode_reply(status, &reason), &data[..used]);
            }
            let _ = (status.as_label(), status.worth_another_endpoint());
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
    header_round_trip(data);
}

/// Builds a header from newline-separated `ns`, `name`, `source ns`, `source name` and
/// checks the round trip where the names are valid: a namespace without `/`, non-empty
/// parts, and each field within [`MAX_FIELD`] bytes (longer ones are never encoded: the
/// config limits names to 63 characters).
fn header_round_trip(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\n');
    let valid = |ns: &str, name: &str| {
        !ns.is_empty()
            && !name.is_empty()
            && !ns.contains('/')
            && ns.len() + 1 + name.len() <= MAX_FIELD
    };
    let (Some(ns), Some(name)) = (parts.next(), parts.next()) else {
        return;
    };
    if !valid(ns, name) {
        return;
    }
    let source = match (parts.next(), parts.next()) {
        (Some(sns), Some(sname)) if valid(sns, sname) => Some(ServiceKey::new(sns, sname)),
        _ => None,
    };
    let kind = if text.len().is_multiple_of(2) {
        weft::header::StreamKind::Tcp
    } else {
        weft::header::StreamKind::Http
    };
    let header = StreamHeader {
        kind,
        destination: ServiceKey::new(ns, name),
        source,
    };
    let bytes = header.encode();
    assert_eq!(StreamHeader::decode(&bytes), Ok((header, bytes.len())));
    for cut in 0..bytes.len() {
        assert_eq!(
            StreamHeader::decode(&bytes[..cut]),
            Err(weft::header::HeaderError::Incomplete),
            "prefix of {cut} bytes"
        );
    }
}

// ---- agent config -------------------------------------------------------------------------------

/// A valid config to compare reloads against.
static BASELINE_CONFIG: LazyLock<Config> = LazyLock::new(|| {
    Config::parse(
        Path::new("/etc/weft/weft.toml"),
        "[node]\nname = \"web-1\"\ntrust_domain = \"prod.example.com\"\n\
         [gossip]\nbind = \"127.0.0.1:7401\"\n[tunnel]\nbind = \"127.0.0.1:7402\"\n",
    )
    .expect("the baseline config is valid")
});

/// The agent config parser and validator (`Config::parse`) on arbitrary UTF-8 text, then the
/// reload comparison and the one-line error rendering (which maps byte offsets to lines).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(Path::new("/etc/weft/weft.toml"), text) {
        Ok(config) => {
            let same = config.reload_changes(&config);
            assert!(same.need_restart.is_empty(), "a config differs from itself");
            let _ = BASELINE_CONFIG.reload_changes(&config);
            let _ = config.reload_changes(&BASELINE_CONFIG);
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
}

// ---- policy ----------------------------------------------------------------------------------

static POLICY_TRUST_DOMAIN: LazyLock<TrustDomain> =
    LazyLock::new(|| TrustDomain::new("prod.example.com").expect("valid trust domain"));

/// Most TrafficTargets, sources and paths tried per input, to keep an execution cheap.
const MAX_DECISIONS: usize = 16;

/// The SMI policy parser and validator (`PolicySet::parse_files`) on arbitrary UTF-8 text
/// (NUL bytes split it into up to four files, for cross-file references and duplicates),
/// then, for a valid set, the engine compiled from it deciding TCP and HTTP requests for
/// the destinations and sources the set names, with the input's first lines as paths.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let files: Vec<(String, &str)> = text
        .split('\0')
        .take(4)
        .enumerate()
        .map(|(i, text)| (format!("p{i}.yaml"), text))
        .collect();
    let set = match PolicySet::parse_files(&files) {
        Ok(set) => set,
        Err(errors) => {
            assert!(!errors.is_empty(), "a refused set names no error");
            for error in errors {
                let _ = error.to_string();
            }
            return;
        }
    };
    for warning in set.warnings() {
        let _ = warning.to_string();
    }
    let engine = Engine::new(&set, &POLICY_TRUST_DOMAIN);
    let stranger = SpiffeId::service(&POLICY_TRUST_DOMAIN, "nobody", "stranger").expect("valid");
    let mut headers = HeaderMap::new();
    headers.insert("x-canary", HeaderValue::from_static("true"));
    headers.insert("user-agent", HeaderValue::from_static("weft-fuzz/1"));
    let mut paths: Vec<&str> = text.lines().take(4).collect();
    paths.extend(["/", "/api/v1/items?id=7", "/metrics"]);
    let mut destinations: Vec<&ServiceKey> = set
        .traffic_targets()
        .iter()
        .map(|t| &t.destination)
        .chain(set.traffic_splits().iter().map(|s| &s.service))
        .take(MAX_DECISIONS)
        .collect();
    let unknown = ServiceKey::new("nowhere", "none");
    destinations.push(&unknown);
    let mut sources: Vec<SpiffeId> = set
        .traffic_targets()
        .iter()
        .flat_map(|t| &t.sources)
        .filter_map(|s| match s {
            Subject::ServiceAccount(key) => {
                SpiffeId::service(&POLICY_TRUST_DOMAIN, &key.namespace, &key.name).ok()
            }
            Subject::SpiffeId(id) => Some(id.clone()),
        })
        .take(MAX_DECISIONS)
        .collect();
    sources.push(stranger);
    let ports: Vec<u16> = set
        .tcp_routes()
        .iter()
        .flat_map(|r| r.ports.iter().copied())
        .take(2)
        .chain([80])
        .collect();
    for destination in &destinations {
        for source in &sources {
            for &port in &ports {
                let tcp = engine.decide(&Request {
                    source,
                    destination,
                    port,
                    http: None,
                });
                let _ = tcp.to_string();
            }
            for (i, path) in paths.iter().enumerate() {
                let method = ["GET", "POST", "PROPFIND"][i % 3];
                let http = engine.decide(&Request {
                    source,
                    destination,
                    port: ports[0],
                    http: Some(HttpRequest {
                        method,
                        path,
                        headers: &headers,
                    }),
                });
                let _ = http.to_string();
            }
        }
    }
    for path in paths {
        let _ = normalize_path(path);
    }
}

// ---- join tokens -------------------------------------------------------------------------------

/// A trust domain with a root and an operator credential, made once.
struct TokenFixture {
    bundle: TrustBundle,
    signer: OperatorSigner,
    now: SystemTime,
    cert_b64: String,
}

static TOKEN_FIXTURE: LazyLock<TokenFixture> = LazyLock::new(|| {
    let now = SystemTime::now();
    let nanos = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("weft-fuzz-ca-{}-{nanos}", std::process::id()));
    let td = TrustDomain::new("fuzz.example.com").expect("valid trust domain");
    let init = weft_ca::pki::init(&td, "fuzzer", &dir).expect("weft ca init in a temp dir");
    let credential = OperatorCredential::load(&dir).expect("the operator credential just written");
    let signer = credential
        .signer(now)
        .expect("a fresh operator credential signs");
    let _ = std::fs::remove_dir_all(&dir);
    let cert_b64 = URL_SAFE_NO_PAD.encode(signer.cert_der().as_ref());
    TokenFixture {
        bundle: init.bundle,
        signer,
        now,
        cert_b64,
    }
});

/// The join-token verifier (`weft_ca::token::verify`) against a fixed bundle. The first byte
/// picks what the rest is:
/// - `0 mod 3`: the token text itself (shape, base64, certificate and signature checks);
/// - `1 mod 3`: the payload JSON, which the target signs with the bundle's operator so the
///   checks after the signature run (`@NOW` and `@EXP` in it become the current unix time
///   and one hour later). A correctly signed token is never refused for its signer;
/// - `2 mod 3`: the operator certificate DER, under a well-formed payload and signature.
pub fn join_token(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let fixture = &*TOKEN_FIXTURE;
    let result = match mode % 3 {
        0 => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            token::verify(text, &fixture.bundle, fixture.now)
        }
        1 => {
            let now = unix_secs(fixture.now);
            let payload = replace(rest, b"@NOW", now.to_string().as_bytes());
            let payload = replace(&payload, b"@EXP", (now + 3600).to_string().as_bytes());
            let token = signed_token(fixture, &URL_SAFE_NO_PAD.encode(payload), &fixture.cert_b64);
            let result = token::verify(&token, &fixture.bundle, fixture.now);
            if token.len() <= token::MAX_TOKEN_LEN {
                assert!(
                    !matches!(
                        result,
                        Err(TokenError::BadSignature
                            | TokenError::UntrustedOperator(_)
                            | TokenError::NotOperator(_))
                    ),
                    "a token signed by the bundle's operator was refused: {result:?}"
                );
            }
            result
        }
        _ => {
            let payload = format!(
                r#"{{"id":"0123456789abcdef0123456789abcdef","td":"fuzz.example.com","node":"n1","services":["default/api"],"iat":{0},"exp":{1}}}"#,
                unix_secs(fixture.now),
                unix_secs(fixture.now) + 3600
            );
            let token = signed_token(
                fixture,
                &URL_SAFE_NO_PAD.encode(payload),
                &URL_SAFE_NO_PAD.encode(rest),
            );
            token::verify(&token, &fixture.bundle, fixture.now)
        }
    };
    match result {
        Ok(token) => {
            assert_eq!(&token.trust_domain, fixture.bundle.trust_domain());
            assert!(token.issued_at < token.expires_at);
            assert!(
                token.services.windows(2).all(|w| w[0] < w[1]),
                "services not sorted"
            );
            let _ = (token.node_id(), token.scope());
        }
        Err(error) => {
            let _ = (error.to_string(), error.reason());
        }
    }
}

/// `weft1.PAYLOAD.CERT.SIG` with the fixture operator's signature over the first three.
fn signed_token(fixture: &TokenFixture, payload_b64: &str, cert_b64: &str) -> String {
    let signed = format!("{}.{payload_b64}.{cert_b64}", token::TOKEN_PREFIX);
    let signature = fixture
        .signer
        .sign(signed.as_bytes())
        .expect("signing works");
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}

fn unix_secs(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `haystack` with every `needle` replaced by `with`.
fn replace(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

// ---- gossip datagrams ---------------------------------------------------------------------------

/// Keys the gossip fixture seals with: the keyring holds the first two, the third is a
/// stranger's.
const GOSSIP_KEYS: [[u8; 32]; 3] = [[0x11; 32], [0x22; 32], [0x33; 32]];
/// The receiver's wall clock at the start of every input, unix ms.
const GOSSIP_NOW_MS: u64 = 1_700_000_000_000;
/// The freshness window.
const GOSSIP_FRESHNESS: Duration = Duration::from_secs(60);
/// Small bounds, so eviction and the replay floor are reached within one input.
const GOSSIP_REPLAY_CAPACITY: usize = 8;
const GOSSIP_MAX_PARTIAL: usize = 4;
/// Frames built per input at most.
const GOSSIP_MAX_FRAMES: usize = 64;

static GOSSIP_KEYRING: LazyLock<Keyring> = LazyLock::new(|| {
    Keyring::new(vec![
        GossipKey::from_bytes(GOSSIP_KEYS[0]),
        GossipKey::from_bytes(GOSSIP_KEYS[1]),
    ])
    .expect("two distinct keys")
});

static GOSSIP_START: LazyLock<Instant> = LazyLock::new(Instant::now);

/// The sealed gossip transport (`weft_discovery::frame`) with a fixed two-key keyring. The
/// first byte picks what the rest is:
/// - `0 mod 4`: one datagram off the wire, through `open`;
/// - `1 mod 4`: a script of frames that the target seals itself (any header, either key or
///   a stranger's), each checked for the exact outcome `open` must give, then passed through
///   the replay guard and the reassembler as the transport does;
/// - `2 mod 4`: a message through `seal`, every frame opened and the message reassembled;
/// - `3 mod 4`: keyring file text, through `Keyring::parse`.
///
/// (Chitchat's own decoder of the message inside is crate-private in chitchat 0.13, so it
/// is out of reach here.)
pub fn gossip_frame(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            let _ = frame::open(&GOSSIP_KEYRING, rest, GOSSIP_NOW_MS, GOSSIP_FRESHNESS);
        }
        1 => gossip_script(rest),
        2 => gossip_seal_round_trip(rest),
        _ => {
            if let Ok(text) = std::str::from_utf8(rest) {
                match Keyring::parse(text) {
                    Ok(ring) => assert!(!ring.keys().is_empty()),
                    Err(error) => {
                        let _ = error.to_string();
                    }
                }
            }
        }
    }
}

/// One scripted frame: `version index count msg_id[4]` (7 bytes), a timestamp offset from
/// the receiver's clock in 4 ms units (i16 BE), a nonce byte, a key byte (0, 1: keyring; 2:
/// stranger), a peer byte, a clock step in 100 ms units, a length (u16 BE) and the piece.
fn gossip_script(mut script: &[u8]) {
    let mut guard = ReplayGuard::new(GOSSIP_FRESHNESS, GOSSIP_REPLAY_CAPACITY);
    let mut reassembler = frame::Reassembler::new(GOSSIP_MAX_PARTIAL, Duration::from_secs(2));
    let mut elapsed_ms = 0u64;
    for _ in 0..GOSSIP_MAX_FRAMES {
        let Some((fixed, tail)) = script.split_at_checked(15) else {
            return;
        };
        let len = usize::from(u16::from_be_bytes([fixed[13], fixed[14]]));
        let piece = &tail[..len.min(tail.len())];
        script = &tail[piece.len()..];
        let offset_ms = i64::from(i16::from_be_bytes([fixed[7], fixed[8]])) * 4;
        let nonce = [fixed[9]; NONCE_LEN];
        let key = usize::from(fixed[10] % 3);
        let peer = SocketAddr::from(([127, 0, 0, 1], 7400 + u16::from(fixed[11] % 4)));
        elapsed_ms += u64::from(fixed[12]) * 100;
        let now_ms = GOSSIP_NOW_MS + elapsed_ms;
        let now = *GOSSIP_START + Duration::from_millis(elapsed_ms);
        let timestamp_ms = now_ms.saturating_add_signed(offset_ms);

        let mut header = [0u8; HEADER_LEN];
        header[..7].copy_from_slice(&fixed[..7]);
        header[7..].copy_from_slice(&timestamp_ms.to_be_bytes());
        let datagram = seal_raw(&GOSSIP_KEYS[key], &header, &nonce, piece);

        let header_ok = header[0] == frame::VERSION && header[2] >= 1 && header[1] < header[2];
        let expected = if datagram.len() > frame::MAX_DATAGRAM {
            Err(PacketOutcome::Oversized)
        } else if !header_ok {
            Err(PacketOutcome::Malformed)
        } else if key == 2 {
            Err(PacketOutcome::BadAuth)
        } else if now_ms.saturating_sub(timestamp_ms) > GOSSIP_FRESHNESS.as_millis() as u64
            || timestamp_ms.saturating_sub(now_ms) > frame::MAX_FUTURE_SKEW.as_millis() as u64
        {
            Err(PacketOutcome::Stale)
        } else {
            Ok(())
        };
        let opened = frame::open(&GOSSIP_KEYRING, &datagram, now_ms, GOSSIP_FRESHNESS);
        assert_eq!(
            opened.as_ref().map(|_| ()),
            expected.as_ref().copied(),
            "frame outcome"
        );
        let Ok(opened) = opened else {
            continue;
        };
        assert_eq!(opened.plaintext, piece);
        assert_eq!(opened.key_index, key);
        assert_eq!(
            opened.header,
            FrameHeader {
                index: header[1],
                count: header[2],
                msg_id: u32::from_be_bytes([header[3], header[4], header[5], header[6]]),
                timestamp_ms,
            }
        );
        if guard.check(&opened, now_ms).is_err() {
            continue;
        }
        assert_eq!(
            guard.check(&opened, now_ms),
            Err(PacketOutcome::Replayed),
            "a frame just accepted was accepted again"
        );
        assert!(guard.len() <= GOSSIP_REPLAY_CAPACITY);
        if let Ok(Some(message)) = reassembler.accept(peer, opened, now) {
            assert!(message.len() <= frame::MAX_MESSAGE);
        }
        assert!(reassembler.len() <= GOSSIP_MAX_PARTIAL);
    }
}

/// Seals one frame the way `frame::seal` does, but with any header and nonce.
fn seal_raw(
    key: &[u8; 32],
    header: &[u8; HEADER_LEN],
    nonce: &[u8; NONCE_LEN],
    piece: &[u8],
) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(Key::from_slice(key));
    let mut body = piece.to_vec();
    let tag = cipher
        .encrypt_in_place_detached(XNonce::from_slice(nonce), header, &mut body)
        .expect("XChaCha20-Poly1305 seals any piece under 256 GiB");
    let mut out = Vec::with_capacity(HEADER_LEN + NONCE_LEN + body.len() + tag.len());
    out.extend_from_slice(header);
    out.extend_from_slice(nonce);
    out.extend_from_slice(&body);
    out.extend_from_slice(&tag);
    out
}

/// `seal` then `open` and reassembly of every frame gives the message back. The first two
/// bytes pick `max_datagram`, the next four the message id.
fn gossip_seal_round_trip(data: &[u8]) {
    let Some((params, message)) = data.split_at_checked(6) else {
        return;
    };
    let max_datagram = usize::from(u16::from_be_bytes([params[0], params[1]]));
    let msg_id = u32::from_be_bytes([params[2], params[3], params[4], params[5]]);
    let frames = match frame::seal(
        &GOSSIP_KEYRING,
        msg_id,
        GOSSIP_NOW_MS,
        message,
        max_datagram,
    ) {
        Ok(frames) => frames,
        Err(error) => {
            assert!(
                frame::check_max_datagram(max_datagram).is_err()
                    || message.len() > frame::MAX_MESSAGE
            );
            let _ = error.to_string();
            return;
        }
    };
    assert!(!frames.is_empty() && frames.len() <= 255);
    let peer = SocketAddr::from(([127, 0, 0, 1], 7401));
    let mut guard = ReplayGuard::new(GOSSIP_FRESHNESS, frame::REPLAY_CAPACITY);
    let mut reassembler = frame::Reassembler::default();
    let mut whole = None;
    for datagram in &frames {
        assert!(datagram.len() <= max_datagram, "frame over max_datagram");
        let opened = frame::open(&GOSSIP_KEYRING, datagram, GOSSIP_NOW_MS, GOSSIP_FRESHNESS)
            .expect("a sealed frame opens");
        assert_eq!(opened.key_index, 0);
        guard.check(&opened, GOSSIP_NOW_MS).expect("fresh nonces");
        if let Some(done) = reassembler
            .accept(peer, opened, *GOSSIP_START)
            .expect("fragments of one message fit")
        {
            assert!(whole.is_none(), "message completed twice");
            whole = Some(done);
        }
    }
    assert_eq!(
        whole.as_deref(),
        Some(message),
        "reassembled message differs"
    );
}
