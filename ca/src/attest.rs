//! Signatures over what a node publishes about itself in gossip.
//!
//! Every host holds the gossip key, so gossip alone cannot say who wrote a record. A node
//! signs each record with the key of its node SVID ([`RecordSigner`]); a receiver checks the
//! chain against the trust bundle ([`verify_node_chain`]) and the signature against the leaf
//! ([`verify_signature`]). A CA host also proves its role with the key of its intermediate
//! ([`RecordSigner::sign_as_ca`], [`verify_ca_proof`]), whichever CA issued its node SVID. This module only signs and checks
//! bytes; what is signed, and what a verified record may claim, is decided by the gossip
//! layer.

use std::sync::Arc;
use std::time::SystemTime;

use rcgen::SigningKey as _;
use rustls::SignatureScheme;
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::bundle::TrustBundle;
use crate::issuer::CertificateAuthority;
use crate::scope::NodeScope;
use crate::spiffe::SpiffeId;
use crate::verify::{SvidError, Usage, VerifiedSvid, verify_svid};

/// Signature schemes a node key may sign records with, in order of preference.
const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
];

/// Why a record could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The key supports none of [`SCHEMES`].
    #[error("the node key supports no record signature scheme (ECDSA P-256/P-384, Ed25519)")]
    NoScheme,
    /// The key refused to sign.
    #[error("signing failed: {0}")]
    Sign(String),
}

/// Signs this node's gossip records with its node SVID's key (and, on a CA host, proves the
/// `ca` role with its intermediate's key).
pub struct RecordSigner {
    key: Arc<CertifiedKey>,
    fingerprint: [u8; 32],
    scope: Option<NodeScope>,
    ca: Option<Arc<CertificateAuthority>>,
}

impl RecordSigner {
    /// A signer for the node SVID `key` (chain leaf first) whose node scope is `scope`; `ca`
    /// is this host's intermediate when it is a CA host.
    pub fn new(
        key: Arc<CertifiedKey>,
        scope: Option<NodeScope>,
        ca: Option<Arc<CertificateAuthority>>,
    ) -> RecordSigner {
        let fingerprint = key.cert.first().map(fingerprint).unwrap_or_default();
        RecordSigner {
            key,
            fingerprint,
            scope,
            ca,
        }
    }

    /// Whether the node SVID lets this node hold service `namespace/name`: receivers refuse
    /// any other, so there is no point publishing it.
    pub fn may_hold(&self, namespace: &str, name: &str) -> bool {
        self.scope
            .as_ref()
            .is_some_and(|scope| scope.allows(namespace, name))
    }

    /// The node SVID chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.key.cert
    }

    /// SHA-256 of the leaf certificate.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// Whether this signer can prove the `ca` role.
    pub fn is_ca(&self) -> bool {
        self.ca.is_some()
    }

    /// Signs `message` with the node key.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        let signer = self
            .key
            .key
            .choose_scheme(SCHEMES)
            .ok_or(SignError::NoScheme)?;
        signer
            .sign(message)
            .map_err(|e| SignError::Sign(e.to_string()))
    }

    /// The intermediate that signs [`RecordSigner::sign_as_ca`] proofs, on a CA host.
    pub fn ca_certificate(&self) -> Option<&CertificateDer<'static>> {
        self.ca.as_ref().map(|ca| ca.certificate())
    }

    /// Signs `message` with the intermediate's key; `None` on a host that is not a CA host.
    pub fn sign_as_ca(&self, message: &[u8]) -> Option<Result<Vec<u8>, SignError>> {
        let ca = self.ca.as_ref()?;
        Some(
            ca.signing_key()
                .sign(message)
                .map_err(|e| SignError::Sign(e.to_string())),
        )
    }
}

/// SHA-256 of a certificate's DER.
pub fn fingerprint(cert: &CertificateDer<'_>) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, cert.as_ref())
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// Why a node's certificate chain does not vouch for its records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeChainError {
    /// The chain is not a valid SVID of the bundle.
    #[error("{0}")]
    Svid(#[from] SvidError),
    /// The chain is valid but for another identity.
    #[error("certificate is for {found}, not {expected}")]
    WrongId {
        /// The identity the record names.
        expected: String,
        /// The identity of the certificate.
        found: String,
    },
}

/// Checks that `chain` is a valid node SVID of `bundle` at `now` for node `name`.
pub fn verify_node_chain(
    chain: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: SystemTime,
    name: &str,
) -> Result<VerifiedSvid, NodeChainError> {
    let verified = verify_svid(chain, bundle, now, Usage::Any)?;
    let expected =
        SpiffeId::node(bundle.trust_domain(), name).map_err(|_| NodeChainError::WrongId {
            expected: format!("a node named {name:?}"),
            found: verified.id.to_string(),
        })?;
    if verified.id != expected {
        return Err(NodeChainError::WrongId {
            expected: expected.to_string(),
            found: verified.id.to_string(),
        });
    }
    Ok(verified)
}

/// Whether `signature` over `message` was made with the key of `cert`.
pub fn verify_signature(cert: &CertificateDer<'_>, message: &[u8], signature: &[u8]) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    [
        webpki::ring::ECDSA_P256_SHA256,
        webpki::ring::ECDSA_P384_SHA384,
        webpki::ring::ED25519,
    ]
    .iter()
    .any(|alg| cert.verify_signature(*alg, message, signature).is_ok())
}

/// Whether `signature` over `message` proves the `ca` role: `intermediate` is a CA
/// certificate signed by a root of `bundle`, valid at `now`, and its key made the signature.
pub fn verify_ca_proof(
    intermediate: &CertificateDer<'_>,
    bundle: &TrustBundle,
    now: SystemTime,
    message: &[u8],
    signature: &[u8],
) -> bool {
    let Ok((_, ca)) = X509Certificate::from_der(intermediate.as_ref()) else {
        return false;
    };
    let now = crate::verify::unix_secs(now);
    let valid =
        ca.validity().not_before.timestamp() <= now && now <= ca.validity().not_after.timestamp();
    let signed_by_root = bundle.roots().iter().any(|root| {
        X509Certificate::from_der(root.as_ref())
            .is_ok_and(|(_, root)| ca.verify_signature(Some(root.public_key())).is_ok())
    });
    ca.is_ca() && valid && signed_by_root && verify_signature(intermediate, message, signature)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::pki;
    use crate::spiffe::TrustDomain;
    use crate::tls::certified_key;
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;

    struct Pki {
        bundle: TrustBundle,
        ca: Arc<CertificateAuthority>,
        _dir: tempfile::TempDir,
    }

    fn pki() -> Pki {
        pki_for("test.weft")
    }

    fn pki_for(trust_domain: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new(trust_domain).unwrap();
        let root = dir.path().join("root");
        let out = pki::init(&td, "ops", &root).unwrap();
        let ca_dir = dir.path().join("ca");
        pki::intermediate(&td, &root, "ca-1", &ca_dir).unwrap();
        let ca = CertificateAuthority::load(
            &ca_dir.join(pki::CA_CERT),
            &ca_dir.join(pki::CA_KEY),
            &out.bundle,
        )
        .unwrap();
        Pki {
            bundle: out.bundle,
            ca: Arc::new(ca),
            _dir: dir,
        }
    }

    fn node_key(pki: &Pki, name: &str) -> Arc<CertifiedKey> {
        let id = SpiffeId::node(pki.bundle.trust_domain(), name).unwrap();
        let (key, svid) = pki
            .ca
            .issue_local(&id, Duration::from_secs(3600), None)
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
        certified_key(svid.chain, key).unwrap()
    }

    #[test]
    fn a_record_signed_by_a_node_verifies_with_its_chain_only() {
        let pki = pki();
        let signer = RecordSigner::new(node_key(&pki, "web-1"), None, None);
        let chain = signer.chain().to_vec();
        verify_node_chain(&chain, &pki.bundle, SystemTime::now(), "web-1").unwrap();
        let signature = signer.sign(b"record").unwrap();
        assert!(verify_signature(&chain[0], b"record", &signature));
        assert!(!verify_signature(&chain[0], b"recorD", &signature));
        let other = RecordSigner::new(node_key(&pki, "web-2"), None, None);
        assert!(!verify_signature(&other.chain()[0], b"record", &signature));
    }

    #[test]
    fn a_chain_for_another_node_or_expired_is_refused() {
        let pki = pki();
        let chain = node_key(&pki, "web-1").cert.clone();
        assert!(matches!(
            verify_node_chain(&chain, &pki.bundle, SystemTime::now(), "web-2"),
            Err(NodeChainError::WrongId { .. })
        ));
        let later = SystemTime::now() + Duration::from_secs(7200);
        assert!(matches!(
            verify_node_chain(&chain, &pki.bundle, later, "web-1"),
            Err(NodeChainError::Svid(_))
        ));
    }

    #[test]
    fn only_the_holder_of_an_intermediate_proves_the_ca_role() {
        let pki = pki();
        let now = SystemTime::now();
        let ca_host = RecordSigner::new(node_key(&pki, "ca-1"), None, Some(pki.ca.clone()));
        let intermediate = ca_host.ca_certificate().unwrap().clone();
        let proof = ca_host.sign_as_ca(b"ca-1 is a CA host").unwrap().unwrap();
        let check = |cert: &CertificateDer<'_>, msg: &[u8], sig: &[u8]| {
            verify_ca_proof(cert, &pki.bundle, now, msg, sig)
        };
        assert!(check(&intermediate, b"ca-1 is a CA host", &proof));
        assert!(!check(&intermediate, b"web-1 is a CA host", &proof));
        // A plain node's chain also carries the intermediate, but it cannot sign with it.
        let node = RecordSigner::new(node_key(&pki, "web-1"), None, None);
        assert!(node.sign_as_ca(b"x").is_none());
        let forged = node.sign(b"web-1 is a CA host").unwrap();
        assert!(!check(&intermediate, b"web-1 is a CA host", &forged));
        // A leaf is not a CA certificate, even with a valid signature of its own key.
        assert!(!check(&node.chain()[0], b"web-1 is a CA host", &forged));
        // An intermediate of another root does not count.
        let other = pki_for("other.weft");
        let other_host = RecordSigner::new(node_key(&other, "ca-9"), None, Some(other.ca.clone()));
        let proof = other_host.sign_as_ca(b"ca-9").unwrap().unwrap();
        assert!(!check(
            other_host.ca_certificate().unwrap(),
            b"ca-9",
            &proof
        ));
        // Nor does an expired intermediate.
        let later = now + Duration::from_secs(2 * 365 * 86_400);
        let proof = ca_host.sign_as_ca(b"late").unwrap().unwrap();
        assert!(!verify_ca_proof(
            &intermediate,
            &pki.bundle,
            later,
            b"late",
            &proof
        ));
    }
}
