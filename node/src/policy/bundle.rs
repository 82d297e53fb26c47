//! Signed policy bundles: what `weft policy apply` publishes and agents pass to each other.
//!
//! A bundle is the whole policy set (every file, as written), a version, and the operator's
//! signature over them, so any agent can check it with nothing but the trust bundle, however
//! it arrived. Wire and disk format (UTF-8 JSON, at most [`MAX_BUNDLE_BYTES`]):
//!
//! ```text
//! {"format": "weft-policy/1", "payload": B64(PAYLOAD), "cert": B64(operator cert DER),
//!  "signature": B64(ECDSA P-256 SHA-256, ASN.1 DER, over the ASCII bytes "weft-policy/1." B64(PAYLOAD))}
//! PAYLOAD = JSON {"td": "<trust domain>", "version": <u64 ≥ 1>, "issued_at": <unix s>,
//!                 "files": [{"name": "<file name>", "text": "<YAML>"}, ...]}
//! ```
//!
//! B64 is base64url without padding. The digest that agents gossip is SHA-256 over the
//! decoded PAYLOAD bytes. [`open`] checks, in this order: size and shape; the signer (an
//! operator SVID of the bundle, valid when the bundle was issued, so a bundle outlives the
//! credential that signed it); the signature; the trust domain; the version; and that the
//! files form a valid policy set.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use weft_ca::operator::verify_operator_signature;
use weft_ca::verify::{to_system_time, unix_secs};
use weft_ca::{OperatorError, OperatorSigner, SpiffeId, TrustBundle};

use super::model::{PolicyError, PolicySet};

/// The format tag, also the prefix of the signed bytes.
pub const FORMAT: &str = "weft-policy/1";
/// Largest bundle accepted or created.
pub const MAX_BUNDLE_BYTES: usize = 4 << 20;
/// How far in the future a bundle's issue time may be, for clock skew between hosts.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// One policy file, as the operator wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// The file's name, for error messages and `weft policy get`.
    pub name: String,
    /// Its YAML text.
    pub text: String,
}

/// Why a bundle is refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BundleError {
    /// Over [`MAX_BUNDLE_BYTES`].
    #[error("policy bundle is {0} bytes; the limit is {MAX_BUNDLE_BYTES}")]
    TooLarge(usize),
    /// Not a bundle of this format.
    #[error("malformed policy bundle: {0}")]
    Malformed(String),
    /// The signer or the signature does not check out.
    #[error("policy bundle signature: {0}")]
    Signature(#[from] OperatorError),
    /// Signed for another trust domain.
    #[error("policy bundle is for trust domain {bundle}, this mesh is {ours}")]
    ForeignTrustDomain {
        /// What the bundle says.
        bundle: String,
        /// Ours.
        ours: String,
    },
    /// Issued later than now plus the allowed clock skew.
    #[error("policy bundle is issued in the future (unix time {0}); check the clocks")]
    NotYetValid(i64),
    /// The signed files are not a valid policy set.
    #[error("policy bundle holds an invalid policy set: {}", first_error(.0))]
    Invalid(Vec<PolicyError>),
}

fn first_error(errors: &[PolicyError]) -> String {
    match errors {
        [] => "no detail".into(),
        [one] => one.to_string(),
        [first, rest @ ..] => format!("{first} (and {} more)", rest.len()),
    }
}

impl BundleError {
    /// A short label for metrics (`reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            BundleError::TooLarge(_) => "too_large",
            BundleError::Malformed(_) => "malformed",
            BundleError::Signature(OperatorError::BadSignature) => "bad_signature",
            BundleError::Signature(OperatorError::NotOperator(_)) => "not_operator",
            BundleError::Signature(_) => "untrusted_signer",
            BundleError::ForeignTrustDomain { .. } => "foreign_trust_domain",
            BundleError::NotYetValid(_) => "not_yet_valid",
            BundleError::Invalid(_) => "invalid_policy",
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    format: String,
    payload: String,
    cert: String,
    signature: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    td: String,
    version: u64,
    issued_at: i64,
    files: Vec<PolicyFile>,
}

/// A bundle whose signature, trust domain and contents checked out.
#[derive(Debug, Clone)]
pub struct VerifiedBundle {
    /// The version the operator gave it; higher replaces lower.
    pub version: u64,
    /// SHA-256 of the payload, hex.
    pub digest: String,
    /// When it was signed.
    pub issued_at: SystemTime,
    /// Who signed it.
    pub operator: SpiffeId,
    /// The files, as written.
    pub files: Vec<PolicyFile>,
    /// The validated set.
    pub set: PolicySet,
    /// The bundle exactly as received: what is persisted and served to peers.
    pub bytes: Vec<u8>,
}

/// Signs `files` as bundle `version`, issued now. The caller validates the set first (so the
/// operator sees every error with its file and line); signing an invalid set is refused too.
pub fn sign(
    files: Vec<PolicyFile>,
    version: u64,
    signer: &OperatorSigner,
) -> Result<Vec<u8>, BundleError> {
    let payload = Payload {
        td: signer.id().trust_domain().to_string(),
        version,
        issued_at: unix_secs(SystemTime::now()),
        files,
    };
    let payload_json = serde_json::to_vec(&payload).expect("the payload always serializes");
    let payload_b64 = URL_SAFE_NO_PAD.encode(&payload_json);
    let signature = signer.sign(signed_bytes(&payload_b64).as_bytes())?;
    let envelope = Envelope {
        format: FORMAT.into(),
        payload: payload_b64,
        cert: URL_SAFE_NO_PAD.encode(signer.cert_der().as_ref()),
        signature: URL_SAFE_NO_PAD.encode(signature),
    };
    let bytes = serde_json::to_vec(&envelope).expect("the envelope always serializes");
    if bytes.len() > MAX_BUNDLE_BYTES {
        return Err(BundleError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

/// Verifies and opens a bundle against `trust`, at time `now`.
pub fn open(
    bytes: &[u8],
    trust: &TrustBundle,
    now: SystemTime,
) -> Result<VerifiedBundle, BundleError> {
    if bytes.len() > MAX_BUNDLE_BYTES {
        return Err(BundleError::TooLarge(bytes.len()));
    }
    let malformed = |what: String| BundleError::Malformed(what);
    let envelope: Envelope =
        serde_json::from_slice(bytes).map_err(|e| malformed(format!("envelope: {e}")))?;
    if envelope.format != FORMAT {
        return Err(malformed(format!(
            "format {:?}, expected {FORMAT:?}",
            envelope.format
        )));
    }
    let decode = |field: &str, text: &str| {
        URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| malformed(format!("{field} is not base64url")))
    };
    let payload_json = decode("payload", &envelope.payload)?;
    let cert = CertificateDer::from(decode("cert", &envelope.cert)?);
    let signature = decode("signature", &envelope.signature)?;
    // Read, not yet believed: the signer's certificate is checked at the issue time.
    let payload: Payload =
        serde_json::from_slice(&payload_json).map_err(|e| malformed(format!("payload: {e}")))?;
    if payload.issued_at > unix_secs(now).saturating_add(MAX_CLOCK_SKEW.as_secs() as i64) {
        return Err(BundleError::NotYetValid(payload.issued_at));
    }
    let issued_at = to_system_time(payload.issued_at);
    let operator = verify_operator_signature(
        &cert,
        signed_bytes(&envelope.payload).as_bytes(),
        &signature,
        trust,
        issued_at,
    )?;
    if payload.td != trust.trust_domain().as_str() {
        return Err(BundleError::ForeignTrustDomain {
            bundle: payload.td,
            ours: trust.trust_domain().to_string(),
        });
    }
    if payload.version == 0 {
        return Err(malformed("version 0; versions start at 1".into()));
    }
    let named: Vec<(&str, &str)> = payload
        .files
        .iter()
        .map(|f| (f.name.as_str(), f.text.as_str()))
        .collect();
    let set = PolicySet::parse_files(&named).map_err(BundleError::Invalid)?;
    Ok(VerifiedBundle {
        version: payload.version,
        digest: hex_digest(&payload_json),
        issued_at,
        operator,
        files: payload.files,
        set,
        bytes: bytes.to_vec(),
    })
}

fn signed_bytes(payload_b64: &str) -> String {
    format!("{FORMAT}.{payload_b64}")
}

fn hex_digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
