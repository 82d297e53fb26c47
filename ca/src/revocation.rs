//! Revocations: the operator's list of certificates the mesh must no longer accept.
//!
//! The list travels inside a bundle signed by the operator (the node crate's signed-bundle
//! machinery, like policy); this module holds what it says and the one check every verifier
//! makes. Once installed in the [`TrustBundle`](crate::TrustBundle), [`verify_svid`]
//! refuses a revoked certificate wherever a chain is checked: TLS handshakes in both
//! directions, CA requests, gossip records, operator signatures.
//!
//! Three kinds of entries:
//! - `node NAME`: every certificate of `spiffe://TD/node/NAME` (and the CA host certificate
//!   `spiffe://TD/ca/NAME`) whose validity starts at or before the revocation time. A
//!   renewal the host obtains afterwards is covered too, since CA hosts backdate the start of
//!   validity by a few minutes and refuse the revoked host anyway; a host joined again later
//!   with a new token the operator minted on purpose gets a certificate that starts after
//!   the revocation, and is accepted.
//! - `id SPIFFE_ID`: the same rule for any SPIFFE ID (a service, an operator).
//! - `serial HEX`: one certificate by serial number, at any position in the chain, so
//!   revoking a CA host's intermediate cuts off everything it signed.
//!
//! [`verify_svid`]: crate::verify_svid

use std::collections::HashMap;
use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::client::ca_server_id;
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::verify::unix_secs;

/// Longest reason text accepted, in bytes.
pub const MAX_REASON_BYTES: usize = 512;
/// Most entries one list may hold.
pub const MAX_ENTRIES: usize = 100_000;

/// What an entry revokes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RevokedKind {
    /// A node name: its node and CA host certificates issued up to the revocation.
    Node,
    /// A SPIFFE ID: its certificates issued up to the revocation.
    Id,
    /// One certificate serial number (lowercase hex).
    Serial,
}

impl fmt::Display for RevokedKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RevokedKind::Node => "node",
            RevokedKind::Id => "id",
            RevokedKind::Serial => "serial",
        })
    }
}

/// One revocation, as the operator published it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    /// What kind of subject.
    pub kind: RevokedKind,
    /// The node name, SPIFFE ID or serial (lowercase hex).
    pub value: String,
    /// When it was revoked (unix seconds): certificates valid from this time or earlier are
    /// revoked (node and ID entries).
    pub at: i64,
    /// The operator's reason, for `weft revoke list` and logs.
    #[serde(default)]
    pub reason: String,
}

impl Revocation {
    /// An entry revoking `kind` `value` at `at` (unix seconds), without a reason.
    pub fn new(kind: RevokedKind, value: impl Into<String>, at: i64) -> Revocation {
        Revocation {
            kind,
            value: value.into(),
            at,
            reason: String::new(),
        }
    }
}

impl fmt::Display for Revocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.value)?;
        if !self.reason.is_empty() {
            write!(f, " ({})", self.reason)?;
        }
        Ok(())
    }
}

/// Why a revocation list is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevocationError {
    /// An entry does not name a valid subject.
    #[error("revocation entry {index} ({kind} {value:?}): {reason}")]
    BadEntry {
        /// 0-based position.
        index: usize,
        /// Its kind.
        kind: RevokedKind,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// Over [`MAX_ENTRIES`].
    #[error("revocation list holds {0} entries; the limit is {MAX_ENTRIES}")]
    TooMany(usize),
}

/// Normalises and checks one subject for `trust_domain`: a node name must make a valid node
/// ID, a SPIFFE ID must be one of this trust domain, a serial must be hex (colons and case
/// are ignored). Returns the value as stored.
pub fn normalise(
    kind: RevokedKind,
    value: &str,
    trust_domain: &TrustDomain,
) -> Result<String, String> {
    match kind {
        RevokedKind::Node => SpiffeId::node(trust_domain, value)
            .map(|_| value.to_string())
            .map_err(|e| format!("not a valid node name: {e}")),
        RevokedKind::Id => {
            let id = SpiffeId::parse(value).map_err(|e| format!("not a SPIFFE ID: {e}"))?;
            if !id.is_member_of(trust_domain) {
                return Err(format!("not in trust domain {trust_domain}"));
            }
            Ok(id.to_string())
        }
        RevokedKind::Serial => {
            let hex: String = value
                .chars()
                .filter(|c| *c != ':')
                .map(|c| c.to_ascii_lowercase())
                .collect();
            let hex = hex.trim_start_matches('0');
            if hex.is_empty() || hex.len() > 40 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err("not a certificate serial (1 to 20 bytes of hex)".into());
            }
            Ok(hex.to_string())
        }
    }
}

/// The revocations in force, indexed for the check made on every chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    entries: Vec<Revocation>,
    /// SPIFFE ID → index of its entry with the latest `at`.
    ids: HashMap<SpiffeId, usize>,
    /// Serial (lowercase hex, no leading zeros) → index of its entry.
    serials: HashMap<String, usize>,
}

impl Revocations {
    /// Indexes `entries` for `trust_domain`, refusing any that does not name a valid subject.
    pub fn new(
        entries: Vec<Revocation>,
        trust_domain: &TrustDomain,
    ) -> Result<Revocations, RevocationError> {
        if entries.len() > MAX_ENTRIES {
            return Err(RevocationError::TooMany(entries.len()));
        }
        let mut ids = HashMap::new();
        let mut serials = HashMap::new();
        for (index, entry) in entries.iter().enumerate() {
            let bad = |reason: String| RevocationError::BadEntry {
                index,
                kind: entry.kind,
                value: entry.value.clone(),
                reason,
            };
            let value = normalise(entry.kind, &entry.value, trust_domain).map_err(bad)?;
            if value != entry.value {
                return Err(bad(format!("must be written as {value:?}")));
            }
            if entry.reason.len() > MAX_REASON_BYTES {
                return Err(bad(format!("reason is over {MAX_REASON_BYTES} bytes")));
            }
            let mut index_id = |id: SpiffeId| {
                let slot = ids.entry(id).or_insert(index);
                if entries[*slot].at < entry.at {
                    *slot = index;
                }
            };
            match entry.kind {
                RevokedKind::Node => {
                    index_id(SpiffeId::node(trust_domain, &value).map_err(|e| bad(e.to_string()))?);
                    if let Ok(ca) = ca_server_id(trust_domain, &value) {
                        index_id(ca);
                    }
                }
                RevokedKind::Id => {
                    index_id(SpiffeId::parse(&value).map_err(|e| bad(e.to_string()))?)
                }
                RevokedKind::Serial => {
                    serials.insert(value, index);
                }
            }
        }
        Ok(Revocations {
            entries,
            ids,
            serials,
        })
    }

    /// Every entry, as published.
    pub fn entries(&self) -> &[Revocation] {
        &self.entries
    }

    /// How many entries are in force.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry revoking a leaf certificate for `id` with serial `serial_hex` whose
    /// validity starts at `not_before`, if any.
    pub fn leaf(
        &self,
        id: &SpiffeId,
        serial_hex: &str,
        not_before: SystemTime,
    ) -> Option<&Revocation> {
        if let Some(entry) = self.serial(serial_hex) {
            return Some(entry);
        }
        let entry = &self.entries[*self.ids.get(id)?];
        (unix_secs(not_before) <= entry.at).then_some(entry)
    }

    /// The entry revoking the certificate with serial `serial_hex`, if any.
    pub fn serial(&self, serial_hex: &str) -> Option<&Revocation> {
        if self.serials.is_empty() {
            return None;
        }
        let key = serial_hex.trim_start_matches('0');
        self.serials.get(key).map(|i| &self.entries[*i])
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::verify::to_system_time;

    fn td() -> TrustDomain {
        TrustDomain::new("rev.test").unwrap()
    }

    use Revocation as R;

    #[test]
    fn a_node_entry_revokes_its_certificates_issued_up_to_the_revocation() {
        let list =
            Revocations::new(vec![R::new(RevokedKind::Node, "web-1", 1_000)], &td()).unwrap();
        let node = SpiffeId::node(&td(), "web-1").unwrap();
        let ca = ca_server_id(&td(), "web-1").unwrap();
        let other = SpiffeId::node(&td(), "web-2").unwrap();
        assert!(list.leaf(&node, "0a", to_system_time(999)).is_some());
        assert!(list.leaf(&node, "0a", to_system_time(1_000)).is_some());
        assert!(list.leaf(&ca, "0a", to_system_time(500)).is_some());
        // Minted on purpose after the revocation: a new identity.
        assert!(list.leaf(&node, "0b", to_system_time(1_001)).is_none());
        assert!(list.leaf(&other, "0a", to_system_time(999)).is_none());
    }

    #[test]
    fn a_serial_entry_matches_however_the_serial_is_written() {
        let stored = normalise(RevokedKind::Serial, "00:1A:2b", &td()).unwrap();
        assert_eq!(stored, "1a2b");
        let list = Revocations::new(vec![R::new(RevokedKind::Serial, &stored, 0)], &td()).unwrap();
        assert!(list.serial("001a2b").is_some());
        assert!(list.serial("1a2c").is_none());
        let id = SpiffeId::node(&td(), "n").unwrap();
        let later = SystemTime::now() + Duration::from_secs(3600);
        assert!(
            list.leaf(&id, "1a2b", later).is_some(),
            "serials ignore time"
        );
    }

    #[test]
    fn the_latest_entry_for_an_id_counts() {
        let id = "spiffe://rev.test/ns/default/sa/api";
        let list = Revocations::new(
            vec![
                R::new(RevokedKind::Id, id, 100),
                R::new(RevokedKind::Id, id, 300),
            ],
            &td(),
        )
        .unwrap();
        let parsed = SpiffeId::parse(id).unwrap();
        assert!(list.leaf(&parsed, "1", to_system_time(200)).is_some());
        assert!(list.leaf(&parsed, "1", to_system_time(301)).is_none());
    }

    #[test]
    fn bad_entries_are_refused_with_their_position() {
        for (kind, value, why) in [
            (RevokedKind::Node, "a/b", "node name"),
            (
                RevokedKind::Id,
                "spiffe://other.test/node/x",
                "trust domain",
            ),
            (RevokedKind::Id, "https://x", "SPIFFE ID"),
            (RevokedKind::Serial, "xyz", "serial"),
            (RevokedKind::Serial, "00", "serial"),
            (RevokedKind::Serial, "AB", "written as"),
        ] {
            let err = Revocations::new(
                vec![R::new(RevokedKind::Node, "ok", 0), R::new(kind, value, 0)],
                &td(),
            )
            .unwrap_err();
            let text = err.to_string();
            assert!(text.starts_with("revocation entry 1"), "{text}");
            assert!(text.contains(why), "{value}: {text}");
        }
    }
}
