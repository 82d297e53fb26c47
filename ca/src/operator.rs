//! Operator signatures: what lets an operator's decisions (join tokens, policy bundles) travel
//! through untrusted hands and still be believed.
//!
//! `weft ca init` writes an operator credential: `operator.pem`, a leaf
//! `spiffe://TD/operator/NAME` signed by the root, and `operator.key`, PKCS#8 P-256. An
//! [`OperatorSigner`] signs bytes with it (ECDSA P-256 SHA-256, ASN.1 DER); anyone holding the
//! trust bundle checks such a signature with [`verify_operator_signature`], given the signer's
//! certificate, which the signed object carries. Each signed format puts its own prefix in the
//! signed bytes, so a signature made for one kind of object never verifies as another.

use std::path::Path;
use std::time::SystemTime;

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::bundle::TrustBundle;
use crate::pki::{OPERATOR_CERT, OPERATOR_KEY};
use crate::spiffe::{SpiffeId, WeftIdentity};
use crate::verify::{SvidError, Usage, format_utc, to_system_time, unix_secs, verify_svid};

/// Why an operator signature could not be made or is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OperatorError {
    /// The credential given to sign with is unusable.
    #[error("operator credential: {0}")]
    Credential(String),
    /// The signer's certificate does not parse.
    #[error("operator certificate does not parse: {0}")]
    Malformed(String),
    /// The signer's certificate does not verify against the trust bundle.
    #[error("operator certificate is not trusted: {0}")]
    Untrusted(SvidError),
    /// The certificate is a valid SVID, but not of an operator.
    #[error("signed by {0}, which is not an operator identity (spiffe://TD/operator/NAME)")]
    NotOperator(String),
    /// The signature does not match the signed bytes.
    #[error("signature does not verify")]
    BadSignature,
}

impl OperatorError {
    /// A short label for metrics (`reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            OperatorError::Credential(_) => "bad_credential",
            OperatorError::Malformed(_) => "malformed",
            OperatorError::Untrusted(_) => "untrusted_operator",
            OperatorError::NotOperator(_) => "not_operator",
            OperatorError::BadSignature => "bad_signature",
        }
    }
}

/// An operator's certificate and key, as PEM text.
pub struct OperatorCredential {
    /// `operator.pem`.
    pub cert_pem: Vec<u8>,
    /// `operator.key` (PKCS#8).
    pub key_pem: Vec<u8>,
}

impl OperatorCredential {
    /// Reads `operator.pem` and `operator.key` from `dir` (where `weft ca init` wrote them).
    pub fn load(dir: &Path) -> Result<OperatorCredential, OperatorError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path)
                .map_err(|e| OperatorError::Credential(format!("{}: {e}", path.display())))
        };
        Ok(OperatorCredential {
            cert_pem: read(OPERATOR_CERT)?,
            key_pem: read(OPERATOR_KEY)?,
        })
    }

    /// A signer from this credential, checked at `now`; see [`OperatorSigner::new`].
    pub fn signer(&self, now: SystemTime) -> Result<OperatorSigner, OperatorError> {
        OperatorSigner::new(&self.cert_pem, &self.key_pem, now)
    }
}

/// A checked operator credential, ready to sign.
pub struct OperatorSigner {
    cert: CertificateDer<'static>,
    id: SpiffeId,
    key: EcdsaKeyPair,
}

impl OperatorSigner {
    /// Checks that the certificate names an operator, is valid at `now`, and belongs with the
    /// key. It does not check the certificate against a trust bundle: verifiers do.
    pub fn new(
        cert_pem: &[u8],
        key_pem: &[u8],
        now: SystemTime,
    ) -> Result<OperatorSigner, OperatorError> {
        let cert = CertificateDer::from_pem_slice(cert_pem)
            .map_err(|e| {
                OperatorError::Credential(format!("operator certificate is not PEM: {e}"))
            })?
            .into_owned();
        let id = certificate_id(&cert).map_err(OperatorError::Credential)?;
        if !matches!(id.kind(), WeftIdentity::Operator { .. }) {
            return Err(OperatorError::NotOperator(id.to_string()));
        }
        check_certificate_current(&cert, now)?;
        let key = operator_key(key_pem)?;
        let (_, parsed) = X509Certificate::from_der(cert.as_ref())
            .map_err(|e| OperatorError::Credential(e.to_string()))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key().as_ref() {
            return Err(OperatorError::Credential(
                "operator key does not belong to the operator certificate".into(),
            ));
        }
        Ok(OperatorSigner { cert, id, key })
    }

    /// The operator's SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The operator certificate (DER), which signed objects carry.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Signs `message`; returns the ASN.1 DER ECDSA signature.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, OperatorError> {
        self.key
            .sign(&SystemRandom::new(), message)
            .map(|signature| signature.as_ref().to_vec())
            .map_err(|_| OperatorError::Credential("signing failed".into()))
    }
}

/// Checks that `cert` is an operator SVID of `bundle` valid at `at`, and that `signature`
/// over `message` is its; returns the operator's ID. The certificate is checked first:
/// nothing signed means anything until the signer is authenticated.
pub fn verify_operator_signature(
    cert: &CertificateDer<'_>,
    message: &[u8],
    signature: &[u8],
    bundle: &TrustBundle,
    at: SystemTime,
) -> Result<SpiffeId, OperatorError> {
    let operator = match verify_svid(std::slice::from_ref(cert), bundle, at, Usage::Client) {
        Ok(svid) => svid.id,
        Err(SvidError::BadCertificate { reason, .. }) => {
            return Err(OperatorError::Malformed(reason));
        }
        Err(e) => return Err(OperatorError::Untrusted(e)),
    };
    if !matches!(operator.kind(), WeftIdentity::Operator { .. }) {
        return Err(OperatorError::NotOperator(operator.to_string()));
    }
    let end_entity = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| OperatorError::Malformed(format!("{e:?}")))?;
    end_entity
        .verify_signature(webpki::ring::ECDSA_P256_SHA256, message, signature)
        .map_err(|_| OperatorError::BadSignature)?;
    Ok(operator)
}

/// The single URI SAN of a certificate, as a SPIFFE ID.
fn certificate_id(cert: &CertificateDer<'_>) -> Result<SpiffeId, String> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| format!("certificate does not parse: {e}"))?;
    let uris =
        crate::verify::uri_sans(&parsed).map_err(|e| format!("certificate subjectAltName: {e}"))?;
    match uris.as_slice() {
        [uri] => SpiffeId::parse(uri).map_err(|e| format!("certificate URI SAN {uri:?}: {e}")),
        other => Err(format!(
            "certificate has {} URI SANs; an SVID has exactly one",
            other.len()
        )),
    }
}

/// Refuses to sign with an operator certificate outside its validity window.
fn check_certificate_current(
    cert: &CertificateDer<'_>,
    now: SystemTime,
) -> Result<(), OperatorError> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| OperatorError::Credential(e.to_string()))?;
    let now = unix_secs(now);
    let not_after = parsed.validity().not_after.timestamp();
    if now > not_after {
        return Err(OperatorError::Credential(format!(
            "operator certificate expired at {}",
            format_utc(to_system_time(not_after))
        )));
    }
    let not_before = parsed.validity().not_before.timestamp();
    if now < not_before {
        return Err(OperatorError::Credential(format!(
            "operator certificate is not valid before {}",
            format_utc(to_system_time(not_before))
        )));
    }
    Ok(())
}

fn operator_key(pem: &[u8]) -> Result<EcdsaKeyPair, OperatorError> {
    let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        OperatorError::Credential(format!("operator key is not a PEM private key: {e}"))
    })?;
    let PrivateKeyDer::Pkcs8(pkcs8) = key else {
        return Err(OperatorError::Credential(
            "operator key is not PKCS#8".into(),
        ));
    };
    EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8.secret_pkcs8_der(),
        &SystemRandom::new(),
    )
    .map_err(|e| OperatorError::Credential(format!("operator key is not an ECDSA P-256 key: {e}")))
}
