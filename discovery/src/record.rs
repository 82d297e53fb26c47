//! What each agent publishes in gossip: its node record, its services and their health.
//!
//! Records are JSON values under fixed chitchat keys. This module is the only place that
//! knows those keys, so the wire shape of discovery is defined here and nowhere else.
//! Decoding never trusts a peer: a value that does not parse is skipped, never a panic.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Key holding the JSON [`NodeRecord`].
pub const NODE_KEY: &str = "node";
/// Key holding the member's lifecycle: `alive`, or `left` once it leaves gracefully.
pub const STATE_KEY: &str = "state";
/// Key holding the fingerprints of the member's gossip keyring, primary first, comma separated.
pub const KEYRING_KEY: &str = "keyring";
/// Key holding the join-token ids a CA host redeemed (still inside their lifetime), comma
/// separated, so other CA hosts refuse them too.
pub const REDEEMED_KEY: &str = "ca.redeemed";
/// Key holding the policy bundle the member enforces, as `VERSION:DIGEST` (SHA-256 hex);
/// absent before any bundle. Only an advertisement: the bundle itself is fetched from the
/// member and verified, never believed from gossip.
pub const POLICY_KEY: &str = "policy";
/// Key holding the revocation bundle the member enforces, as [`POLICY_KEY`] does for policy.
pub const REVOCATIONS_KEY: &str = "revocations";
/// Prefix of the keys holding one JSON [`ServiceRecord`] each; the rest of the key is
/// `namespace/name`.
pub const SERVICE_PREFIX: &str = "svc:";
/// [`STATE_KEY`] value published by a member that is leaving.
pub const STATE_LEFT: &str = "left";
/// [`STATE_KEY`] value published by a running member.
pub const STATE_ALIVE: &str = "alive";

/// A service's name within its namespace, e.g. `default/api`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceKey {
    /// Namespace, `default` unless configured.
    pub namespace: String,
    /// Service name.
    pub name: String,
}

impl ServiceKey {
    /// A key from its two parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ServiceKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The chitchat key under which this service is published.
    pub fn gossip_key(&self) -> String {
        format!("{SERVICE_PREFIX}{}/{}", self.namespace, self.name)
    }

    /// Parses the part after [`SERVICE_PREFIX`] (`namespace/name`).
    pub fn from_gossip_suffix(suffix: &str) -> Option<Self> {
        let (namespace, name) = suffix.split_once('/')?;
        (!namespace.is_empty() && !name.is_empty()).then(|| ServiceKey::new(namespace, name))
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How the agent talks to a service: byte stream or per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque TCP.
    Tcp,
    /// HTTP/1.1 (and h2c upgrades).
    Http,
    /// HTTP/2 with prior knowledge.
    Http2,
    /// gRPC over HTTP/2.
    Grpc,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
        })
    }
}

/// Result of the local health check of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// The last check passed, or the service has no check.
    Passing,
    /// The last check failed; the endpoint is out of load balancing.
    Failing,
    /// Checked but no result yet (just started).
    Unknown,
}

impl Health {
    /// Whether traffic may be sent to an endpoint in this state. An endpoint whose first
    /// check has not finished is not sent traffic.
    pub fn is_routable(self) -> bool {
        self == Health::Passing
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Passing => "passing",
            Health::Failing => "failing",
            Health::Unknown => "unknown",
        })
    }
}

/// A member's description of itself, published under [`NODE_KEY`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node name, unique in the mesh.
    pub name: String,
    /// Address peers gossip with.
    pub gossip_addr: SocketAddr,
    /// Address of the QUIC tunnel endpoint.
    pub tunnel_addr: SocketAddr,
    /// Operator labels (e.g. `zone`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Roles such as `ca`.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Weft version the member runs.
    pub version: String,
    /// Version of the policy bundle the member enforces (0 when none).
    #[serde(default)]
    pub policy_version: u64,
    /// Unix time (seconds) when this incarnation started.
    pub started_at: u64,
}

/// One service as published by the host that runs it, under [`ServiceKey::gossip_key`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// Port the app listens on, on its host.
    pub port: u16,
    /// Application protocol.
    pub protocol: Protocol,
    /// Local health check result.
    pub health: Health,
    /// Relative load-balancing weight.
    pub weight: u32,
}

/// Decodes a JSON record published by a peer; `None` if it does not parse.
pub fn decode<T: for<'de> Deserialize<'de>>(value: &str) -> Option<T> {
    serde_json::from_str(value).ok()
}

/// Encodes a record for publication.
pub fn encode<T: Serialize>(record: &T) -> String {
    serde_json::to_string(record).expect("records are plain data and always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_key_round_trips_through_its_gossip_key() {
        let key = ServiceKey::new("shop", "api");
        let gossip_key = key.gossip_key();
        assert_eq!(gossip_key, "svc:shop/api");
        let suffix = gossip_key.strip_prefix(SERVICE_PREFIX).unwrap();
        assert_eq!(ServiceKey::from_gossip_suffix(suffix), Some(key));
    }

    #[test]
    fn malformed_service_suffixes_are_rejected() {
        for bad in ["", "api", "/api", "shop/", "/"] {
            assert_eq!(ServiceKey::from_gossip_suffix(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn records_from_peers_that_do_not_parse_are_skipped() {
        assert!(decode::<NodeRecord>("{not json").is_none());
        assert!(
            decode::<ServiceRecord>(
                r#"{"port":70000,"protocol":"tcp","health":"passing","weight":1}"#
            )
            .is_none()
        );
        assert!(
            decode::<ServiceRecord>(
                r#"{"port":80,"protocol":"smtp","health":"passing","weight":1}"#
            )
            .is_none()
        );
        let ok = decode::<ServiceRecord>(
            r#"{"port":80,"protocol":"http","health":"failing","weight":2}"#,
        )
        .unwrap();
        assert_eq!(ok.health, Health::Failing);
    }
}

/// A member's advertised signed bundle ([`POLICY_KEY`], [`REVOCATIONS_KEY`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleAdvert {
    /// The bundle's version.
    pub version: u64,
    /// SHA-256 of its payload, hex.
    pub digest: String,
}

impl BundleAdvert {
    /// The gossip value, `VERSION:DIGEST`.
    pub fn encode(&self) -> String {
        format!("{}:{}", self.version, self.digest)
    }

    /// Reads a gossip value; `None` if it is not `VERSION:DIGEST` with a 64-hex digest.
    pub fn decode(value: &str) -> Option<BundleAdvert> {
        let (version, digest) = value.split_once(':')?;
        let valid = digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit());
        Some(BundleAdvert {
            version: version.parse().ok()?,
            digest: valid.then(|| digest.to_ascii_lowercase())?,
        })
    }
}

#[cfg(test)]
mod bundle_advert_tests {
    use super::BundleAdvert;

    #[test]
    fn adverts_round_trip_and_bad_values_are_skipped() {
        let advert = BundleAdvert {
            version: 42,
            digest: "ab".repeat(32),
        };
        assert_eq!(BundleAdvert::decode(&advert.encode()), Some(advert));
        for bad in [
            "",
            "42",
            "x:ab",
            "42:abc",
            &format!("42:{}", "zz".repeat(32)),
        ] {
            assert_eq!(BundleAdvert::decode(bad), None, "{bad:?}");
        }
    }
}
