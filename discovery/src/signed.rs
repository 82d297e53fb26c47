//! Signed gossip records: gossip says where, identities say who.
//!
//! Every host holds the gossip key, so anything chitchat delivers may have been written by any
//! member, about any member. This module is the gate between chitchat's state and the
//! [`crate::Catalog`]: nothing reaches the catalog unless the node it is about signed it.
//!
//! # Encoding
//! A node publishes its node SVID chain once, under [`ID_KEY`], and signs every value it
//! publishes (its record, each service, its state, its adverts) with that SVID's key. A value
//! is `w1.SEQ.SIGNATURE.INNER`: `INNER` is what the key held before (JSON records, adverts),
//! `SEQ` is the chitchat version the value is published at, and the signature (base64url)
//! covers the node's name, its generation, the key, `SEQ`, the SHA-256 of the SVID leaf and
//! `INNER` ([`signed_message`]). A value that changes often, such as a service's health,
//! costs one signature, not a certificate: the chain is referenced by its fingerprint.
//!
//! # What a receiver checks ([`RecordVerifier`])
//! - the `id` chain is a valid node SVID of the trust bundle, for the node name chitchat
//!   shows, not expired, and signed by its own leaf;
//! - every other value is signed by that leaf, for this name, generation and key;
//! - `SEQ` equals the version chitchat holds the value at, so an old signed value replayed
//!   at a higher version, or a value moved to another key or incarnation, is refused;
//! - a service is in the SVID's node scope; the `ca` role comes with an intermediate of the
//!   bundle's root and a proof signed by its key.
//!
//! Verification results are cached per node, key and version, so a gossip round costs one
//! signature check per changed value. Every refusal is counted by reason, and logged once per
//! node and reason.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tracing::warn;
use weft_ca::attest::{self, RecordSigner, SignError};
use weft_ca::{NodeScope, TrustBundle};

use crate::catalog::NodeSnapshot;
use crate::metrics::GossipMetrics;
use crate::record::{self, NodeRecord, REDEEMED_KEY, SERVICE_PREFIX, ServiceKey};

/// Key holding the node's SVID chain (and, on a CA host, its proof of the `ca` role).
pub const ID_KEY: &str = "id";
/// Version tag of signed values.
const TAG: &str = "w1";
/// Role that needs a proof by an intermediate.
pub const CA_ROLE: &str = "ca";

/// Why a published value was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// The node published values but no identity (no `id`), or a value that is not signed.
    Unsigned,
    /// The value or the identity does not parse.
    Malformed,
    /// The SVID chain is not valid for the trust bundle (expired, foreign, broken).
    BadChain,
    /// The SVID is valid but for another node than the one chitchat shows.
    WrongNode,
    /// The signature does not verify with the node's leaf.
    BadSignature,
    /// The signed sequence is not the version chitchat holds: an old value replayed.
    Replayed,
    /// A service outside the SVID's node scope.
    OutOfScope,
    /// The `ca` role without a proof from the issuing intermediate.
    CaRoleUnproven,
    /// The operator revoked the node's certificate.
    Revoked,
}

impl Rejection {
    /// Every reason, in label order.
    pub const ALL: [Rejection; 9] = [
        Rejection::Unsigned,
        Rejection::Malformed,
        Rejection::BadChain,
        Rejection::WrongNode,
        Rejection::BadSignature,
        Rejection::Replayed,
        Rejection::OutOfScope,
        Rejection::CaRoleUnproven,
        Rejection::Revoked,
    ];

    /// The `reason` label of `weft_gossip_records_rejected_total`.
    pub fn as_label(self) -> &'static str {
        match self {
            Rejection::Unsigned => "unsigned",
            Rejection::Malformed => "malformed",
            Rejection::BadChain => "bad_chain",
            Rejection::WrongNode => "wrong_node",
            Rejection::BadSignature => "bad_signature",
            Rejection::Replayed => "replayed",
            Rejection::OutOfScope => "out_of_scope",
            Rejection::CaRoleUnproven => "ca_role_unproven",
            Rejection::Revoked => "revoked",
        }
    }
}

/// The bytes a node signs for one value (length-prefixed, so no field can bleed into the next).
pub fn signed_message(
    name: &str,
    generation: u64,
    key: &str,
    seq: u64,
    fingerprint: &[u8; 32],
    inner: &str,
) -> Vec<u8> {
    let mut message = Vec::with_capacity(64 + name.len() + key.len() + inner.len());
    message.extend_from_slice(b"weft-record-v1\0");
    for part in [name.as_bytes(), key.as_bytes()] {
        message.extend_from_slice(&(part.len() as u32).to_be_bytes());
        message.extend_from_slice(part);
    }
    message.extend_from_slice(&generation.to_be_bytes());
    message.extend_from_slice(&seq.to_be_bytes());
    message.extend_from_slice(fingerprint);
    message.extend_from_slice(inner.as_bytes());
    message
}

/// The bytes a CA host's intermediate signs to prove the `ca` role of one incarnation.
pub fn ca_role_message(name: &str, generation: u64, fingerprint: &[u8; 32]) -> Vec<u8> {
    let mut message = b"weft-ca-role-v1\0".to_vec();
    message.extend_from_slice(&(name.len() as u32).to_be_bytes());
    message.extend_from_slice(name.as_bytes());
    message.extend_from_slice(&generation.to_be_bytes());
    message.extend_from_slice(fingerprint);
    message
}

/// The inner value of [`ID_KEY`].
#[derive(Debug, Serialize, Deserialize)]
struct IdValue {
    /// DER certificates, base64, leaf first.
    chain: Vec<String>,
    /// On a CA host: its intermediate (base64 DER) and a proof of the `ca` role signed by it
    /// (base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca: Option<(String, String)>,
}

/// Signs `inner` as the value of `key` published at version `seq` by incarnation
/// (`name`, `generation`).
pub fn seal(
    signer: &RecordSigner,
    name: &str,
    generation: u64,
    key: &str,
    seq: u64,
    inner: &str,
) -> Result<String, SignError> {
    let message = signed_message(name, generation, key, seq, &signer.fingerprint(), inner);
    let signature = signer.sign(&message)?;
    Ok(format!(
        "{TAG}.{seq}.{}.{inner}",
        URL_SAFE_NO_PAD.encode(signature)
    ))
}

/// The inner value of [`ID_KEY`] for `signer`: its chain, and its `ca` proof on a CA host.
pub fn id_inner(signer: &RecordSigner, name: &str, generation: u64) -> Result<String, SignError> {
    let proof = signer
        .sign_as_ca(&ca_role_message(name, generation, &signer.fingerprint()))
        .transpose()?;
    let ca = proof
        .zip(signer.ca_certificate())
        .map(|(signature, cert)| (STANDARD.encode(cert.as_ref()), STANDARD.encode(signature)));
    Ok(record::encode(&IdValue {
        chain: signer
            .chain()
            .iter()
            .map(|c| STANDARD.encode(c.as_ref()))
            .collect(),
        ca,
    }))
}

/// The inner value of a signed value (unverified), or `None` if it is not one.
pub fn inner(value: &str) -> Option<&str> {
    open(value).map(|(_, _, inner)| inner)
}

/// Splits a signed value into (seq, signature, inner).
fn open(value: &str) -> Option<(u64, Vec<u8>, &str)> {
    let rest = value.strip_prefix(TAG)?.strip_prefix('.')?;
    let (seq, rest) = rest.split_once('.')?;
    let (signature, inner) = rest.split_once('.')?;
    Some((
        seq.parse().ok()?,
        URL_SAFE_NO_PAD.decode(signature).ok()?,
        inner,
    ))
}

/// One value as chitchat holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// chitchat's version of the value.
    pub version: u64,
    /// The value as published; `None` when the verifier already holds its verdict at this
    /// version ([`RecordVerifier::known`]), so the refresh need not copy it.
    pub value: Option<String>,
}

/// One chitchat node (one incarnation) as chitchat holds it, before verification.
#[derive(Debug, Clone)]
pub struct RawNode {
    /// Node name.
    pub name: String,
    /// Incarnation number.
    pub generation: u64,
    /// Whether the failure detector considers it alive.
    pub live: bool,
    /// Whether its heartbeat is late.
    pub late: bool,
    /// Whether it is the local agent.
    pub is_self: bool,
    /// Its non-deleted values with their versions.
    pub key_values: BTreeMap<String, Versioned>,
}

/// What a verified identity lets a node claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdentity {
    /// Serial of the node SVID, lowercase hex.
    pub serial_hex: String,
    /// Expiry of the node SVID (unix seconds).
    pub not_after: u64,
    /// Whether the node proved the `ca` role.
    pub is_ca: bool,
}

struct VerifiedId {
    identity: Arc<NodeIdentity>,
    not_after: SystemTime,
    leaf: CertificateDer<'static>,
    fingerprint: [u8; 32],
    scope: Option<NodeScope>,
}

/// The verdict on one value at one version, under the identity (leaf fingerprint) current
/// when it was checked.
type CachedValue = (u64, [u8; 32], Result<Arc<str>, Rejection>);

/// What the verifier remembers about one incarnation (name and generation).
struct CachedNode {
    /// The verification pass that last saw it; entries not seen in a pass are dropped.
    seen: u64,
    /// Version of the `id` value the verdict is about; `None` before the first check.
    id_version: Option<u64>,
    verdict: Result<Arc<VerifiedId>, Rejection>,
    /// The identity the current one replaced: right after a renewal, values not yet
    /// re-signed still carry the previous leaf's signature.
    previous: Option<Arc<VerifiedId>>,
    /// Verdicts on the other values, by key.
    values: HashMap<String, CachedValue>,
}

/// Verifies what chitchat holds before the catalog sees it, caching results per value.
pub struct RecordVerifier {
    /// By node name, then generation (looked up without allocating on every pass).
    cache: HashMap<String, BTreeMap<u64, CachedNode>>,
    pass: u64,
    bundle: Option<Arc<TrustBundle>>,
    report: Reporter,
}

/// What a [`RecordVerifier`] holds about one incarnation ([`RecordVerifier::known`]).
pub struct KnownValues<'a> {
    id_version: u64,
    node: Option<&'a CachedNode>,
}

impl KnownValues<'_> {
    /// Whether the verifier has its verdict on `key` at `version`, under the current `id`.
    pub fn has(&self, key: &str, version: u64) -> bool {
        let Some(node) = self.node else {
            return false;
        };
        if key == ID_KEY {
            return version == self.id_version;
        }
        let fingerprint = node.verdict.as_ref().map(|id| id.fingerprint).ok();
        node.values
            .get(key)
            .is_some_and(|(v, fp, _)| *v == version && Some(*fp) == fingerprint)
    }
}

/// Counts and logs refusals.
struct Reporter {
    metrics: GossipMetrics,
    logged: HashSet<(String, Rejection)>,
    self_name: Option<String>,
}

/// Most (node, reason) pairs remembered as logged; past it the memory starts over, so a flood
/// of invented names cannot grow it.
const MAX_LOGGED: usize = 4096;

impl RecordVerifier {
    /// A verifier that counts refusals in `metrics`.
    pub fn new(metrics: GossipMetrics) -> RecordVerifier {
        RecordVerifier {
            cache: HashMap::new(),
            pass: 0,
            bundle: None,
            report: Reporter {
                metrics,
                logged: HashSet::new(),
                self_name: None,
            },
        }
    }

    /// What this verifier already holds about incarnation (`name`, `generation`) whose `id`
    /// is at `id_version`, still valid at `now` under `bundle`: values it has a verdict on at
    /// their current version may be left out of the [`RawNode`] passed to
    /// [`RecordVerifier::verify`] with the same `bundle` and `now` (copying large values out
    /// of chitchat on every refresh is most of what signed records would otherwise cost).
    /// Under another bundle than the last verified with (roots or revocations changed),
    /// nothing is known: every value must be copied and checked again.
    pub fn known(
        &self,
        bundle: &Arc<TrustBundle>,
        name: &str,
        generation: u64,
        id_version: u64,
        now: SystemTime,
    ) -> KnownValues<'_> {
        let same_bundle = self.bundle.as_ref().is_some_and(|b| Arc::ptr_eq(b, bundle));
        let node = self
            .cache
            .get(name)
            .and_then(|g| g.get(&generation))
            .filter(|_| same_bundle)
            .filter(|cached| {
                cached.id_version == Some(id_version)
                    && cached.verdict.as_ref().is_ok_and(|id| id.not_after > now)
            });
        KnownValues { id_version, node }
    }

    /// Verifies every node against `bundle` at `now`: each snapshot keeps only the values its
    /// node signed, and carries the node's identity when it has a valid one.
    pub fn verify(
        &mut self,
        nodes: Vec<RawNode>,
        bundle: &Arc<TrustBundle>,
        now: SystemTime,
    ) -> Vec<NodeSnapshot> {
        if !self.bundle.as_ref().is_some_and(|b| Arc::ptr_eq(b, bundle)) {
            // A new bundle (root added or removed): every chain is checked again.
            self.cache.clear();
            self.bundle = Some(bundle.clone());
        }
        if let Some(me) = nodes.iter().find(|n| n.is_self) {
            self.report.self_name = Some(me.name.clone());
        }
        self.pass += 1;
        let snapshots = nodes
            .into_iter()
            .map(|node| self.verify_node(node, bundle, now))
            .collect();
        let pass = self.pass;
        self.cache.retain(|_, generations| {
            generations.retain(|_, cached| cached.seen == pass);
            !generations.is_empty()
        });
        snapshots
    }

    fn verify_node(
        &mut self,
        mut node: RawNode,
        bundle: &TrustBundle,
        now: SystemTime,
    ) -> NodeSnapshot {
        if !self.cache.contains_key(&node.name) {
            self.cache.insert(node.name.clone(), BTreeMap::new());
        }
        let cached = self
            .cache
            .get_mut(&node.name)
            .expect("inserted above")
            .entry(node.generation)
            .or_insert_with(|| CachedNode {
                seen: 0,
                id_version: None,
                verdict: Err(Rejection::Unsigned),
                previous: None,
                values: HashMap::new(),
            });
        cached.seen = self.pass;
        let id = self.report.identity(cached, &node, bundle, now);
        let mut key_values = BTreeMap::new();
        if let Some(id) = &id {
            let previous = cached.previous.clone().filter(|p| p.not_after > now);
            // Keys move into the snapshot; `node` keeps the rest for refusal reports.
            for (key, versioned) in std::mem::take(&mut node.key_values) {
                if key == ID_KEY {
                    continue;
                }
                let verdict = match cached.values.get(key.as_str()) {
                    Some((version, fingerprint, verdict))
                        if *version == versioned.version && *fingerprint == id.fingerprint =>
                    {
                        verdict.clone()
                    }
                    // Left out by a caller that saw it current: nothing to check it with.
                    _ if versioned.value.is_none() => continue,
                    _ => {
                        let check =
                            |id| check_value(&node.name, node.generation, &key, &versioned, id);
                        let verdict = match (check(id), &previous) {
                            (Err(Rejection::BadSignature), Some(previous)) => check(previous),
                            (verdict, _) => verdict,
                        };
                        if let Err(reason) = verdict {
                            self.report.reject(&node, reason, &key);
                        }
                        cached.values.insert(
                            key.clone(),
                            (versioned.version, id.fingerprint, verdict.clone()),
                        );
                        verdict
                    }
                };
                if let Ok(inner) = verdict {
                    key_values.insert(key, inner);
                }
            }
        }
        NodeSnapshot {
            name: node.name,
            generation: node.generation,
            live: node.live,
            late: node.late,
            is_self: node.is_self,
            identity: id.map(|id| id.identity.clone()),
            key_values,
        }
    }
}

impl Reporter {
    /// The node's verified identity, from `cached` while its `id` value is unchanged and its
    /// certificate unexpired; checked (and any refusal counted) otherwise.
    fn identity(
        &mut self,
        cached: &mut CachedNode,
        node: &RawNode,
        bundle: &TrustBundle,
        now: SystemTime,
    ) -> Option<Arc<VerifiedId>> {
        let version = node.key_values.get(ID_KEY).map_or(0, |v| v.version);
        let expired = cached.verdict.as_ref().is_ok_and(|id| id.not_after <= now);
        if cached.id_version != Some(version) || expired {
            let verdict = match node.key_values.get(ID_KEY) {
                Some(id) => check_id(&node.name, node.generation, id, bundle, now).map(Arc::new),
                None => Err(Rejection::Unsigned),
            };
            // A node that published nothing yet (no SVID) only gossips its presence: not a
            // refusal. Values without an identity are.
            let silent = version == 0 && node.key_values.is_empty();
            if let (Err(reason), false) = (&verdict, silent) {
                self.reject(node, *reason, ID_KEY);
            }
            if verdict.is_err() && !node.is_self && self.self_name.as_ref() == Some(&node.name) {
                self.impersonation(&node.name, node.generation);
            }
            cached.previous = match (&cached.verdict, &verdict) {
                (Ok(old), Ok(_)) => Some(old.clone()),
                _ => None,
            };
            cached.verdict = verdict;
            cached.id_version = Some(version);
        }
        cached.verdict.as_ref().ok().cloned()
    }

    /// Whether (`node`, `reason`) is logged for the first time.
    fn first_log(&mut self, node: String, reason: Rejection) -> bool {
        if self.logged.len() >= MAX_LOGGED {
            self.logged.clear();
        }
        self.logged.insert((node, reason))
    }

    fn reject(&mut self, node: &RawNode, reason: Rejection, key: &str) {
        self.metrics.record_rejected(reason, node.is_self);
        if self.first_log(node.name.clone(), reason) {
            if node.is_self {
                warn!(
                    node = %node.name,
                    generation = node.generation,
                    key,
                    reason = reason.as_label(),
                    "gossip holds a record about this agent that it did not sign; ignored"
                );
            } else {
                warn!(
                    node = %node.name,
                    generation = node.generation,
                    key,
                    reason = reason.as_label(),
                    "refused a gossip record that its node did not sign validly"
                );
            }
        }
    }

    /// Counts an incarnation under this agent's own name that this agent did not publish.
    fn impersonation(&mut self, name: &str, generation: u64) {
        self.metrics.impersonation();
        if self.first_log(format!("{name}#{generation}"), Rejection::WrongNode) {
            warn!(
                node = %name,
                generation,
                "another gossip member uses this agent's name; its records are ignored"
            );
        }
    }
}

fn check_id(
    name: &str,
    generation: u64,
    id: &Versioned,
    bundle: &TrustBundle,
    now: SystemTime,
) -> Result<VerifiedId, Rejection> {
    let value = id.value.as_deref().ok_or(Rejection::Malformed)?;
    let (seq, signature, inner) = open(value).ok_or(Rejection::Unsigned)?;
    let parsed: IdValue = record::decode(inner).ok_or(Rejection::Malformed)?;
    let chain = parsed
        .chain
        .iter()
        .map(|c| STANDARD.decode(c).map(CertificateDer::from))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| Rejection::Malformed)?;
    let verified = attest::verify_node_chain(&chain, bundle, now, name).map_err(|e| match e {
        attest::NodeChainError::WrongId { .. } => Rejection::WrongNode,
        attest::NodeChainError::Svid(weft_ca::SvidError::Revoked { .. }) => Rejection::Revoked,
        attest::NodeChainError::Svid(_) => Rejection::BadChain,
    })?;
    let leaf = chain[0].clone();
    let fingerprint = attest::fingerprint(&leaf);
    let message = signed_message(name, generation, ID_KEY, seq, &fingerprint, inner);
    if !attest::verify_signature(&leaf, &message, &signature) {
        return Err(Rejection::BadSignature);
    }
    if seq != id.version {
        return Err(Rejection::Replayed);
    }
    let is_ca = match &parsed.ca {
        None => false,
        Some((cert, proof)) => {
            let cert = STANDARD.decode(cert).map_err(|_| Rejection::Malformed)?;
            let proof = STANDARD.decode(proof).map_err(|_| Rejection::Malformed)?;
            let message = ca_role_message(name, generation, &fingerprint);
            let cert = CertificateDer::from(cert);
            if !attest::verify_ca_proof(&cert, bundle, now, &message, &proof) {
                return Err(Rejection::CaRoleUnproven);
            }
            true
        }
    };
    Ok(VerifiedId {
        identity: Arc::new(NodeIdentity {
            serial_hex: verified.serial_hex.clone(),
            not_after: verified
                .not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            is_ca,
        }),
        not_after: verified.not_after,
        leaf,
        fingerprint,
        scope: verified.scope,
    })
}

/// Checks one signed value of a node with a verified identity; returns its inner value.
fn check_value(
    name: &str,
    generation: u64,
    key: &str,
    versioned: &Versioned,
    id: &VerifiedId,
) -> Result<Arc<str>, Rejection> {
    let value = versioned.value.as_deref().ok_or(Rejection::Malformed)?;
    let (seq, signature, inner) = open(value).ok_or(Rejection::Unsigned)?;
    let message = signed_message(name, generation, key, seq, &id.fingerprint, inner);
    if !attest::verify_signature(&id.leaf, &message, &signature) {
        return Err(Rejection::BadSignature);
    }
    if seq != versioned.version {
        return Err(Rejection::Replayed);
    }
    if let Some(suffix) = key.strip_prefix(SERVICE_PREFIX) {
        let service = ServiceKey::from_gossip_suffix(suffix).ok_or(Rejection::Malformed)?;
        let allowed = id
            .scope
            .as_ref()
            .is_some_and(|scope| scope.allows(&service.namespace, &service.name));
        // An empty value withdraws a service; withdrawing needs no scope.
        if !allowed && !inner.is_empty() {
            return Err(Rejection::OutOfScope);
        }
    } else if key == record::NODE_KEY {
        let record: NodeRecord = record::decode(inner).ok_or(Rejection::Malformed)?;
        if record.name != name {
            return Err(Rejection::WrongNode);
        }
        if record.roles.iter().any(|r| r == CA_ROLE) && !id.identity.is_ca {
            return Err(Rejection::CaRoleUnproven);
        }
    } else if key == REDEEMED_KEY && !id.identity.is_ca && !inner.is_empty() {
        return Err(Rejection::CaRoleUnproven);
    }
    Ok(Arc::from(inner))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    use weft_ca::tls::certified_key;
    use weft_ca::{CertificateAuthority, SpiffeId, TrustDomain, pki};

    use super::*;
    use crate::record::{Health, Protocol, ServiceRecord};

    /// A root, one CA host's intermediate, and the bundle, made for real.
    struct Mesh {
        bundle: Arc<TrustBundle>,
        ca: Arc<CertificateAuthority>,
        _dir: tempfile::TempDir,
    }

    fn mesh() -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("test.weft").unwrap();
        let out = pki::init(&td, "ops", &dir.path().join("root")).unwrap();
        let ca_dir = dir.path().join("ca");
        pki::intermediate(&td, &dir.path().join("root"), "ca-1", &ca_dir).unwrap();
        let ca = CertificateAuthority::load(
            &ca_dir.join(pki::CA_CERT),
            &ca_dir.join(pki::CA_KEY),
            &out.bundle,
        )
        .unwrap();
        Mesh {
            bundle: Arc::new(out.bundle),
            ca: Arc::new(ca),
            _dir: dir,
        }
    }

    impl Mesh {
        fn signer(&self, name: &str, services: &[&str], ttl: Duration, ca: bool) -> RecordSigner {
            let id = SpiffeId::node(self.bundle.trust_domain(), name).unwrap();
            let scope = NodeScope::new(services.iter().map(|s| s.to_string()));
            let (key, svid) = self.ca.issue_local(&id, ttl, Some(&scope)).unwrap();
            let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
            let key = certified_key(svid.chain, key).unwrap();
            RecordSigner::new(key, Some(scope), ca.then(|| self.ca.clone()))
        }
    }

    /// What a node publishes, written the way `Membership` writes it: `id` first, each value
    /// signed at the next version.
    struct Publisher<'a> {
        signer: &'a RecordSigner,
        node: RawNode,
        version: u64,
    }

    impl<'a> Publisher<'a> {
        fn new(signer: &'a RecordSigner, name: &str, generation: u64) -> Self {
            let mut publisher = Publisher {
                signer,
                node: RawNode {
                    name: name.into(),
                    generation,
                    live: true,
                    late: false,
                    is_self: false,
                    key_values: BTreeMap::new(),
                },
                version: 0,
            };
            let id = id_inner(signer, name, generation).unwrap();
            publisher.set(ID_KEY, &id);
            publisher
        }

        fn set(&mut self, key: &str, inner: &str) -> &mut Self {
            self.version += 1;
            let value = seal(
                self.signer,
                &self.node.name,
                self.node.generation,
                key,
                self.version,
                inner,
            )
            .unwrap();
            self.node.key_values.insert(
                key.into(),
                Versioned {
                    version: self.version,
                    value: Some(value),
                },
            );
            self
        }

        fn record(&mut self, roles: &[&str]) -> &mut Self {
            let record = NodeRecord {
                name: self.node.name.clone(),
                gossip_addr: "127.0.0.1:7401".parse().unwrap(),
                tunnel_addr: "127.0.0.1:7402".parse().unwrap(),
                labels: BTreeMap::new(),
                roles: roles.iter().map(|r| r.to_string()).collect(),
                version: "test".into(),
                policy_version: 0,
                started_at: 1,
            };
            self.set(record::NODE_KEY, &record::encode(&record))
        }

        fn service(&mut self, name: &str) -> &mut Self {
            let service = ServiceRecord {
                port: 8080,
                protocol: Protocol::Http,
                health: Health::Passing,
                weight: 1,
            };
            let key = ServiceKey::new("default", name).gossip_key();
            self.set(&key, &record::encode(&service))
        }
    }

    fn verify_one(mesh: &Mesh, node: RawNode) -> (NodeSnapshot, GossipMetrics) {
        let metrics = GossipMetrics::unregistered();
        let mut verifier = RecordVerifier::new(metrics.clone());
        let mut out = verifier.verify(vec![node], &mesh.bundle, SystemTime::now());
        (out.remove(0), metrics)
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_signed_node_passes_with_its_scoped_services() {
        let mesh = mesh();
        let signer = mesh.signer("web-1", &["default/api"], HOUR, false);
        let mut publisher = Publisher::new(&signer, "web-1", 5);
        publisher
            .record(&[])
            .service("api")
            .set(record::STATE_KEY, "alive");
        let (snapshot, metrics) = verify_one(&mesh, publisher.node.clone());
        assert!(snapshot.identity.is_some());
        assert_eq!(
            snapshot.key_values.keys().collect::<Vec<_>>(),
            ["node", "state", "svc:default/api"]
        );
        assert_eq!(&*snapshot.key_values["state"], "alive");
        for reason in Rejection::ALL {
            assert_eq!(metrics.rejected_count(reason), 0, "{reason:?}");
        }
    }

    #[test]
    fn a_tampered_value_is_refused_and_the_rest_kept() {
        let mesh = mesh();
        let signer = mesh.signer("web-1", &["default/api"], HOUR, false);
        let mut publisher = Publisher::new(&signer, "web-1", 5);
        publisher.record(&[]).service("api");
        let value = publisher
            .node
            .key_values
            .get_mut("svc:default/api")
            .unwrap()
            .value
            .as_mut()
            .unwrap();
        *value = value.replace("8080", "9090");
        let (snapshot, metrics) = verify_one(&mesh, publisher.node);
        assert!(snapshot.key_values.contains_key("node"));
        assert!(!snapshot.key_values.contains_key("svc:default/api"));
        assert_eq!(metrics.rejected_count(Rejection::BadSignature), 1);
    }

    #[test]
    fn a_value_signed_by_another_node_is_refused() {
        let mesh = mesh();
        let victim = mesh.signer("web-1", &["default/api"], HOUR, false);
        let attacker = mesh.signer("web-2", &["default/api"], HOUR, false);
        // The attacker's own valid chain under the victim's name.
        let (snapshot, metrics) = verify_one(&mesh, Publisher::new(&attacker, "web-1", 9).node);
        assert!(snapshot.identity.is_none());
        assert_eq!(metrics.rejected_count(Rejection::WrongNode), 1);
        // The victim's chain, but values signed with the attacker's key.
        let mut forged = Publisher::new(&victim, "web-1", 9);
        let mut other = Publisher::new(&attacker, "web-1", 9);
        other.version = forged.version;
        other.record(&[]);
        forged
            .node
            .key_values
            .insert("node".into(), other.node.key_values["node"].clone());
        let (snapshot, metrics) = verify_one(&mesh, forged.node);
        assert!(snapshot.identity.is_some());
        assert!(snapshot.key_values.is_empty());
        assert_eq!(metrics.rejected_count(Rejection::BadSignature), 1);
    }

    #[test]
    fn unsigned_values_and_a_bare_presence() {
        let mesh = mesh();
        let mut node = Publisher::new(&mesh.signer("a", &[], HOUR, false), "a", 1).node;
        node.key_values.clear();
        let (snapshot, metrics) = verify_one(&mesh, node.clone());
        assert!(snapshot.identity.is_none());
        assert_eq!(
            metrics.rejected_count(Rejection::Unsigned),
            0,
            "presence only"
        );
        node.key_values.insert(
            "state".into(),
            Versioned {
                version: 1,
                value: Some("left".into()),
            },
        );
        let (snapshot, metrics) = verify_one(&mesh, node);
        assert!(snapshot.identity.is_none() && snapshot.key_values.is_empty());
        assert_eq!(metrics.rejected_count(Rejection::Unsigned), 1);
    }

    #[test]
    fn a_service_outside_the_node_scope_is_refused() {
        let mesh = mesh();
        let signer = mesh.signer("web-1", &["default/api"], HOUR, false);
        let mut publisher = Publisher::new(&signer, "web-1", 5);
        publisher.record(&[]).service("api").service("payments");
        // Withdrawing a service needs no scope.
        publisher.set(&ServiceKey::new("default", "old").gossip_key(), "");
        let (snapshot, metrics) = verify_one(&mesh, publisher.node);
        assert!(snapshot.key_values.contains_key("svc:default/api"));
        assert!(!snapshot.key_values.contains_key("svc:default/payments"));
        assert_eq!(&*snapshot.key_values["svc:default/old"], "");
        assert_eq!(metrics.rejected_count(Rejection::OutOfScope), 1);
    }

    #[test]
    fn a_value_replayed_at_another_version_or_key_or_incarnation_is_refused() {
        let mesh = mesh();
        let signer = mesh.signer("web-1", &["default/api", "default/db"], HOUR, false);
        let mut publisher = Publisher::new(&signer, "web-1", 5);
        publisher.record(&[]).service("api");
        let api = publisher.node.key_values["svc:default/api"].clone();
        // Same value pushed at a higher version (a forged delta), under another key, and in
        // another incarnation.
        let mut replayed = publisher.node.clone();
        replayed.key_values.insert(
            "svc:default/api".into(),
            Versioned {
                version: 1_000,
                value: api.value.clone(),
            },
        );
        replayed
            .key_values
            .insert("svc:default/db".into(), api.clone());
        let (snapshot, metrics) = verify_one(&mesh, replayed);
        assert!(snapshot.key_values.contains_key("node"));
        assert!(!snapshot.key_values.contains_key("svc:default/api"));
        assert!(!snapshot.key_values.contains_key("svc:default/db"));
        assert_eq!(metrics.rejected_count(Rejection::Replayed), 1);
        assert_eq!(metrics.rejected_count(Rejection::BadSignature), 1);
        let mut other_generation = publisher.node.clone();
        other_generation.generation = 6;
        let (snapshot, metrics) = verify_one(&mesh, other_generation);
        assert!(snapshot.identity.is_none());
        assert_eq!(metrics.rejected_count(Rejection::BadSignature), 1);
    }

    #[test]
    fn an_expired_chain_verifies_nothing() {
        let mesh = mesh();
        let signer = mesh.signer("web-1", &["default/api"], Duration::from_secs(1), false);
        let mut publisher = Publisher::new(&signer, "web-1", 5);
        publisher.record(&[]).service("api");
        let metrics = GossipMetrics::unregistered();
        let mut verifier = RecordVerifier::new(metrics.clone());
        let now = SystemTime::now();
        let fresh = verifier.verify(vec![publisher.node.clone()], &mesh.bundle, now);
        assert!(fresh[0].identity.is_some());
        let later = now + Duration::from_secs(5);
        let stale = verifier.verify(vec![publisher.node.clone()], &mesh.bundle, later);
        assert!(stale[0].identity.is_none() && stale[0].key_values.is_empty());
        let stale = verifier.verify(vec![publisher.node], &mesh.bundle, later);
        assert!(stale[0].identity.is_none());
        assert_eq!(metrics.rejected_count(Rejection::BadChain), 1);
    }

    #[test]
    fn a_revoked_node_loses_what_it_had_verified_as_soon_as_the_list_is_installed() {
        let mesh = mesh();
        let signer = mesh.signer("web-1", &["default/api"], HOUR, false);
        let mut publisher = Publisher::new(&signer, "web-1", 5);
        publisher.record(&[]).service("api");
        let other_signer = mesh.signer("web-2", &["default/api"], HOUR, false);
        let mut other = Publisher::new(&other_signer, "web-2", 5);
        other.record(&[]).service("api");
        let metrics = GossipMetrics::unregistered();
        let mut verifier = RecordVerifier::new(metrics.clone());
        let now = SystemTime::now();
        let nodes = vec![publisher.node.clone(), other.node.clone()];
        let before = verifier.verify(nodes.clone(), &mesh.bundle, now);
        assert!(before.iter().all(|n| n.identity.is_some()));
        let list = weft_ca::Revocations::new(
            vec![weft_ca::Revocation {
                kind: weft_ca::RevokedKind::Node,
                value: "web-1".into(),
                at: weft_ca::verify::unix_secs(now),
                reason: String::new(),
            }],
            mesh.bundle.trust_domain(),
        )
        .unwrap();
        let revoked = Arc::new(mesh.bundle.with_revocations(Arc::new(list)));
        let after = verifier.verify(nodes, &revoked, now);
        assert!(after[0].identity.is_none() && after[0].key_values.is_empty());
        assert!(after[1].identity.is_some(), "web-2 is untouched");
        assert!(after[1].key_values.keys().any(|k| k.starts_with("svc:")));
        assert_eq!(metrics.rejected_count(Rejection::Revoked), 1);
    }

    #[test]
    fn the_ca_role_needs_an_intermediate_proof() {
        let mesh = mesh();
        let ca_host = mesh.signer("ca-1", &[], HOUR, true);
        let mut publisher = Publisher::new(&ca_host, "ca-1", 1);
        publisher.record(&[CA_ROLE]).set(REDEEMED_KEY, "t1,t2");
        let (snapshot, _) = verify_one(&mesh, publisher.node);
        assert!(snapshot.identity.as_ref().is_some_and(|i| i.is_ca));
        assert_eq!(&*snapshot.key_values[REDEEMED_KEY], "t1,t2");

        let plain = mesh.signer("web-1", &[], HOUR, false);
        let mut publisher = Publisher::new(&plain, "web-1", 1);
        publisher.record(&[CA_ROLE]).set(REDEEMED_KEY, "t1");
        let (snapshot, metrics) = verify_one(&mesh, publisher.node);
        assert!(snapshot.identity.as_ref().is_some_and(|i| !i.is_ca));
        assert!(snapshot.key_values.is_empty());
        assert_eq!(metrics.rejected_count(Rejection::CaRoleUnproven), 2);
    }

    #[test]
    fn values_signed_before_a_renewal_stay_valid_until_re_signed() {
        let mesh = mesh();
        let old = mesh.signer("web-1", &["default/api"], HOUR, false);
        let new = mesh.signer("web-1", &["default/api"], HOUR, false);
        let mut publisher = Publisher::new(&old, "web-1", 5);
        publisher.record(&[]).service("api");
        let metrics = GossipMetrics::unregistered();
        let mut verifier = RecordVerifier::new(metrics.clone());
        verifier.verify(
            vec![publisher.node.clone()],
            &mesh.bundle,
            SystemTime::now(),
        );
        // The renewed id arrives before the re-signed values.
        let mut renewed = Publisher::new(&new, "web-1", 5);
        renewed.version = publisher.version;
        renewed.set(ID_KEY, &id_inner(&new, "web-1", 5).unwrap());
        let mut node = publisher.node.clone();
        node.key_values
            .insert(ID_KEY.into(), renewed.node.key_values[ID_KEY].clone());
        let out = verifier.verify(vec![node], &mesh.bundle, SystemTime::now());
        assert!(out[0].key_values.contains_key("svc:default/api"));
        for reason in Rejection::ALL {
            assert_eq!(metrics.rejected_count(reason), 0, "{reason:?}");
        }
    }

    #[test]
    fn a_refresh_need_not_copy_what_the_verifier_already_checked() {
        let mesh = mesh();
        let signer = mesh.signer("web-1", &["default/api"], Duration::from_secs(60), false);
        let mut publisher = Publisher::new(&signer, "web-1", 5);
        publisher.record(&[]).service("api");
        let metrics = GossipMetrics::unregistered();
        let mut verifier = RecordVerifier::new(metrics.clone());
        let now = SystemTime::now();
        let full = publisher.node.clone();
        let id_version = full.key_values[ID_KEY].version;
        let current = |v: &RecordVerifier, key: &str, version: u64, at: SystemTime| {
            v.known(&mesh.bundle, "web-1", 5, id_version, at)
                .has(key, version)
        };
        assert!(!current(&verifier, "node", 2, now), "nothing checked yet");
        let first = verifier.verify(vec![full.clone()], &mesh.bundle, now);
        for (key, versioned) in &full.key_values {
            assert!(current(&verifier, key, versioned.version, now), "{key}");
        }
        assert!(!current(&verifier, "node", 9, now), "another version");
        assert!(
            !verifier
                .known(&mesh.bundle, "web-1", 5, id_version + 1, now)
                .has("node", 2)
        );
        let later = now + Duration::from_secs(120);
        assert!(!current(&verifier, ID_KEY, id_version, later), "expired");
        // Values left out because they are current come back from the cache.
        let mut slim = full.clone();
        for versioned in slim.key_values.values_mut() {
            versioned.value = None;
        }
        let second = verifier.verify(vec![slim], &mesh.bundle, now);
        assert_eq!(first[0].key_values, second[0].key_values);
        assert_eq!(first[0].identity, second[0].identity);
        // Under a new bundle (a revocation list installed), nothing is known any more.
        let renewed = Arc::new(mesh.bundle.with_revocations(Arc::default()));
        assert!(
            !verifier
                .known(&renewed, "web-1", 5, id_version, now)
                .has(ID_KEY, id_version)
        );
        for reason in Rejection::ALL {
            assert_eq!(metrics.rejected_count(reason), 0, "{reason:?}");
        }
    }

    #[test]
    fn an_impostor_under_this_agents_name_is_counted() {
        let mesh = mesh();
        let me = mesh.signer("web-1", &[], HOUR, false);
        let mut mine = Publisher::new(&me, "web-1", 5);
        mine.record(&[]);
        mine.node.is_self = true;
        let mut impostor = mine.node.clone();
        impostor.is_self = false;
        impostor.generation = 6;
        impostor.key_values.clear();
        let metrics = GossipMetrics::unregistered();
        let mut verifier = RecordVerifier::new(metrics.clone());
        let out = verifier.verify(vec![mine.node, impostor], &mesh.bundle, SystemTime::now());
        assert!(out[0].identity.is_some() && out[1].identity.is_none());
        assert_eq!(metrics.impersonations(), 1);
    }
}
