//! The gossip keyring: the symmetric keys that seal and open gossip datagrams.
//!
//! Owns key parsing (one base64 key a line), the file permission check and the shared,
//! swappable handle the transport reads on every packet. The first key seals; every key
//! opens, which is what makes a rotation without a partition possible (install everywhere,
//! switch the primary everywhere, remove the old key everywhere).
//!
//! It must never print key bytes (not in `Debug`, not in errors, not in logs): keys are
//! named by their fingerprint only.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use base64::Engine;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::{DecodePaddingMode, general_purpose::STANDARD};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Length of a gossip key in bytes (XChaCha20-Poly1305 key size).
pub const KEY_LEN: usize = 32;

/// Keys are written padded (what `to_base64` emits) but a copy-pasted key that lost its `=`
/// is still unambiguous, so decoding accepts both.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The keyring as the agent holds it: swapped whole on reload, read lock-free per packet.
pub type SharedKeyring = Arc<ArcSwap<Keyring>>;

/// What is wrong with one key or one line of a keyring.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    /// The text is not standard base64.
    #[error("not valid base64")]
    NotBase64,
    /// The text decodes to the wrong number of bytes.
    #[error("key is {0} bytes, expected {KEY_LEN}")]
    WrongLength(usize),
    /// The same key appears on an earlier line.
    #[error("duplicate key (same as line {first})")]
    Duplicate {
        /// 1-based line of the first occurrence.
        first: usize,
    },
}

/// Why a key, a keyring text or a keyring file was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// A single key (outside any file) is unusable.
    #[error("invalid gossip key: {0}")]
    Key(KeyProblem),
    /// A line of keyring text is unusable.
    #[error("line {line}: {problem}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        problem: KeyProblem,
    },
    /// The keyring holds no key at all.
    #[error("no keys")]
    Empty,
    /// A keyring built from a list of keys holds the same key twice.
    #[error("duplicate key {fingerprint}")]
    DuplicateKey {
        /// Fingerprint of the repeated key.
        fingerprint: String,
    },
    /// The keyring file could not be opened or read.
    #[error("{}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The keyring file lets users other than its owner read or write it.
    #[error(
        "{}: mode {mode:04o} grants group or other access to the gossip keys; run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A line of the keyring file is unusable.
    #[error("{}:{line}: {problem}", path.display())]
    FileLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        problem: KeyProblem,
    },
    /// The keyring file holds no key.
    #[error("{}: no keys", path.display())]
    FileEmpty {
        /// The file.
        path: PathBuf,
    },
}

/// One 256-bit gossip key.
#[derive(Clone, PartialEq, Eq)]
pub struct GossipKey([u8; KEY_LEN]);

impl GossipKey {
    /// A fresh key from the thread-local CSPRNG (seeded from the operating system).
    pub fn generate() -> Self {
        let mut bytes = [0u8; KEY_LEN];
        rand::rng().fill_bytes(&mut bytes);
        GossipKey(bytes)
    }

    /// A key from raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        GossipKey(bytes)
    }

    /// Parses a base64 key (standard alphabet, padding optional, surrounding blanks ignored).
    pub fn from_base64(text: &str) -> Result<Self, KeyringError> {
        decode_key(text).map_err(KeyringError::Key)
    }

    /// The key as padded standard base64, the form used in keyring files.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// First 8 bytes of the key's SHA-256 as 16 lowercase hex digits: safe to log and gossip.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.0);
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The raw key, for the cipher only.
    pub(crate) fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for GossipKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GossipKey({})", self.fingerprint())
    }
}

fn decode_key(text: &str) -> Result<GossipKey, KeyProblem> {
    let bytes = LENIENT_BASE64
        .decode(text.trim())
        .map_err(|_| KeyProblem::NotBase64)?;
    let bytes: [u8; KEY_LEN] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| KeyProblem::WrongLength(bytes.len()))?;
    Ok(GossipKey(bytes))
}

/// An ordered, non-empty set of distinct keys; the first (primary) seals, all open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keyring {
    keys: Vec<GossipKey>,
}

impl Keyring {
    /// A keyring from keys in order, primary first; refuses an empty list or a repeated key.
    pub fn new(keys: Vec<GossipKey>) -> Result<Self, KeyringError> {
        if keys.is_empty() {
            return Err(KeyringError::Empty);
        }
        for (i, key) in keys.iter().enumerate() {
            if keys[..i].contains(key) {
                return Err(KeyringError::DuplicateKey {
                    fingerprint: key.fingerprint(),
                });
            }
        }
        Ok(Keyring { keys })
    }

    /// A keyring holding one key.
    pub fn single(key: GossipKey) -> Self {
        Keyring { keys: vec![key] }
    }

    /// Parses keyring text: one base64 key a line, primary first; blank lines and `#`
    /// comments (whole-line or trailing) are ignored.
    pub fn parse(text: &str) -> Result<Self, KeyringError> {
        parse_lines(text).map_err(|e| match e {
            LineError::At(line, problem) => KeyringError::Line { line, problem },
            LineError::Empty => KeyringError::Empty,
        })
    }

    /// Reads and parses a keyring file, refusing one that grants any group or other
    /// permission; errors name the file and the line.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, KeyringError> {
        let path = path.as_ref();
        let read_error = |error| KeyringError::Read {
            path: path.to_path_buf(),
            error,
        };
        // Check the mode of the handle we read, not of the path, so a swap between the
        // check and the read cannot slip in a world-readable file.
        let mut file = File::open(path).map_err(read_error)?;
        let mode = file.metadata().map_err(read_error)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyringError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(read_error)?;
        parse_lines(&text).map_err(|e| match e {
            LineError::At(line, problem) => KeyringError::FileLine {
                path: path.to_path_buf(),
                line,
                problem,
            },
            LineError::Empty => KeyringError::FileEmpty {
                path: path.to_path_buf(),
            },
        })
    }

    /// The key that seals outgoing datagrams.
    pub fn primary(&self) -> &GossipKey {
        &self.keys[0]
    }

    /// Every key, primary first, in the order `open` tries them.
    pub fn keys(&self) -> &[GossipKey] {
        &self.keys
    }

    /// Fingerprints of every key, primary first.
    pub fn fingerprints(&self) -> Vec<String> {
        self.keys.iter().map(GossipKey::fingerprint).collect()
    }

    /// Wraps the keyring in the swappable handle the transport and the agent share.
    pub fn into_shared(self) -> SharedKeyring {
        Arc::new(ArcSwap::from_pointee(self))
    }
}

/// A parse failure before the caller adds its context (a bare line number or a file).
enum LineError {
    At(usize, KeyProblem),
    Empty,
}

fn parse_lines(text: &str) -> Result<Keyring, LineError> {
    let mut keys: Vec<(usize, GossipKey)> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        // Base64 never contains `#`, so everything after one is a comment.
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let key = decode_key(content).map_err(|p| LineError::At(line, p))?;
        if let Some((first, _)) = keys.iter().find(|(_, k)| *k == key) {
            return Err(LineError::At(line, KeyProblem::Duplicate { first: *first }));
        }
        keys.push((line, key));
    }
    if keys.is_empty() {
        return Err(LineError::Empty);
    }
    Ok(Keyring {
        keys: keys.into_iter().map(|(_, k)| k).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn key(byte: u8) -> GossipKey {
        GossipKey::from_bytes([byte; KEY_LEN])
    }

    #[test]
    fn base64_round_trip_and_padding_is_optional() {
        let k = GossipKey::generate();
        let text = k.to_base64();
        assert_eq!(text.len(), 44);
        assert_eq!(GossipKey::from_base64(&text).unwrap(), k);
        assert_eq!(
            GossipKey::from_base64(text.trim_end_matches('=')).unwrap(),
            k
        );
        assert_eq!(GossipKey::from_base64(&format!("  {text}\t")).unwrap(), k);
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(GossipKey::generate(), GossipKey::generate());
    }

    #[test]
    fn fingerprint_is_16_hex_digits_of_sha256() {
        // SHA-256 of 32 zero bytes starts with 66687aadf862bd77.
        assert_eq!(key(0).fingerprint(), "66687aadf862bd77");
        assert_ne!(key(1).fingerprint(), key(0).fingerprint());
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let k = GossipKey::generate();
        let shown = format!("{k:?} {:?}", Keyring::single(k.clone()));
        assert!(!shown.contains(&k.to_base64()));
        assert!(!shown.contains(&k.to_base64()[..10]));
        assert!(shown.contains(&k.fingerprint()));
    }

    #[test]
    fn parse_keeps_order_and_skips_comments_and_blanks() {
        let text = format!(
            "# gossip keys\n\n{}  # primary\n   \n{}\n",
            key(1).to_base64(),
            key(2).to_base64()
        );
        let ring = Keyring::parse(&text).unwrap();
        assert_eq!(ring.keys(), &[key(1), key(2)]);
        assert_eq!(ring.primary(), &key(1));
        assert_eq!(
            ring.fingerprints(),
            vec![key(1).fingerprint(), key(2).fingerprint()]
        );
    }

    #[test]
    fn parse_errors_name_the_line_and_reason() {
        let good = key(1).to_base64();
        let cases = [
            (
                format!("{good}\n\n???not base64\n"),
                "line 3: not valid base64",
            ),
            (
                format!("# c\n{}\n", STANDARD.encode([7u8; 17])),
                "line 2: key is 17 bytes, expected 32",
            ),
            (
                format!("{good}\n{}\n\n{good}\n", key(2).to_base64()),
                "line 4: duplicate key (same as line 1)",
            ),
            ("# only a comment\n\n".to_string(), "no keys"),
            (String::new(), "no keys"),
        ];
        for (text, expected) in cases {
            let err = Keyring::parse(&text).unwrap_err();
            assert_eq!(err.to_string(), expected, "for {text:?}");
        }
    }

    #[test]
    fn new_refuses_empty_and_duplicates() {
        assert!(matches!(Keyring::new(vec![]), Err(KeyringError::Empty)));
        let err = Keyring::new(vec![key(1), key(2), key(1)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("duplicate key {}", key(1).fingerprint())
        );
        assert_eq!(
            Keyring::new(vec![key(2), key(1)]).unwrap().primary(),
            &key(2)
        );
    }

    fn write_keys(mode: u32, text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gossip.keys");
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        (dir, path)
    }

    #[test]
    fn load_reads_a_private_file() {
        let (_dir, path) = write_keys(0o600, &format!("{}\n", key(3).to_base64()));
        assert_eq!(Keyring::load(&path).unwrap().keys(), &[key(3)]);
        let (_dir, path) = write_keys(0o400, &format!("{}\n", key(3).to_base64()));
        assert!(Keyring::load(&path).is_ok());
    }

    #[test]
    fn load_refuses_group_or_world_access() {
        for mode in [0o644, 0o640, 0o604, 0o660, 0o602] {
            let (_dir, path) = write_keys(mode, &format!("{}\n", key(3).to_base64()));
            let err = Keyring::load(&path).unwrap_err();
            assert!(matches!(err, KeyringError::Permissions { .. }), "{mode:o}");
            let text = err.to_string();
            assert!(text.contains("chmod 600"), "{text}");
            assert!(text.contains(&path.display().to_string()), "{text}");
        }
    }

    #[test]
    fn load_errors_name_the_path_and_line() {
        let (_dir, path) = write_keys(0o600, &format!("{}\n\nnope!\n", key(1).to_base64()));
        assert_eq!(
            Keyring::load(&path).unwrap_err().to_string(),
            format!("{}:3: not valid base64", path.display())
        );
        let (_dir, path) = write_keys(0o600, "# nothing yet\n");
        assert_eq!(
            Keyring::load(&path).unwrap_err().to_string(),
            format!("{}: no keys", path.display())
        );
        let missing = Keyring::load("/nonexistent/weft/gossip.keys").unwrap_err();
        assert!(matches!(missing, KeyringError::Read { .. }));
        assert!(
            missing
                .to_string()
                .starts_with("/nonexistent/weft/gossip.keys: ")
        );
    }

    #[test]
    fn shared_keyring_swaps_whole() {
        let shared = Keyring::single(key(1)).into_shared();
        assert_eq!(shared.load().primary(), &key(1));
        shared.store(Arc::new(Keyring::new(vec![key(2), key(1)]).unwrap()));
        assert_eq!(shared.load().primary(), &key(2));
    }
}
