//! Trust bundles: the root certificates of one trust domain, as PEM (what operators
//! distribute) and as SPIFFE bundle JSON (a JWK Set that go-spiffe and SPIRE parse).
//!
//! A bundle belongs to exactly one trust domain and is never merged with another. It may
//! hold several roots at once, which is how a root rotation works: the new root is trusted
//! beside the old one before anything is signed with it.

use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::revocation::Revocations;
use crate::spiffe::{SpiffeId, TrustDomain};

/// How often consumers should poll for a new bundle, in seconds (SPIFFE's suggested default).
pub const REFRESH_HINT_SECS: u64 = 300;

/// OID of the P-256 curve (prime256v1).
const P256_OID: &str = "1.2.840.10045.3.1.7";

/// Errors reading or writing a trust bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The file could not be read.
    #[error("cannot read trust bundle {path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// No certificate was found.
    #[error(
        "trust bundle holds no CA certificate (expected PEM `BEGIN CERTIFICATE` blocks, such as root.pem from `weft ca init`)"
    )]
    Empty,
    /// A bundle file's content is not usable.
    #[error("trust bundle {path}: {error}")]
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        error: Box<BundleError>,
    },
    /// A PEM block was not a certificate or did not parse.
    #[error("trust bundle entry {index} is not a valid certificate: {reason}")]
    BadCertificate {
        /// 0-based position in the bundle.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A certificate cannot be a root of this trust domain.
    #[error("trust bundle entry {index} is not a CA of {trust_domain}: {reason}")]
    NotARoot {
        /// 0-based position in the bundle.
        index: usize,
        /// The bundle's trust domain.
        trust_domain: TrustDomain,
        /// What is wrong.
        reason: String,
    },
    /// The JSON form is malformed.
    #[error("SPIFFE bundle JSON is invalid: {0}")]
    Json(String),
    /// The root's key type has no JWK form here.
    #[error(
        "trust bundle entry {0} has a key type other than EC P-256, which bundle JSON does not support here"
    )]
    UnsupportedKey(usize),
}

/// The root certificates of one trust domain, and the operator's revocations in force (which
/// every chain verified against the bundle is checked with).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    roots: Vec<CertificateDer<'static>>,
    sequence: u64,
    revocations: Arc<Revocations>,
}

impl TrustBundle {
    /// A bundle from DER roots; each must be a CA certificate fit for this trust domain.
    pub fn new(
        trust_domain: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
        sequence: u64,
    ) -> Result<TrustBundle, BundleError> {
        if roots.is_empty() {
            return Err(BundleError::Empty);
        }
        for (index, root) in roots.iter().enumerate() {
            check_root(&trust_domain, index, root)?;
        }
        Ok(TrustBundle {
            trust_domain,
            roots,
            sequence,
            revocations: Arc::default(),
        })
    }

    /// This bundle with `revocations` in force instead of the ones it had.
    pub fn with_revocations(&self, revocations: Arc<Revocations>) -> TrustBundle {
        TrustBundle {
            revocations,
            ..self.clone()
        }
    }

    /// The revocations in force (empty unless installed with [`TrustBundle::with_revocations`]).
    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
    }

    /// Parses PEM text holding one or more root certificates.
    pub fn from_pem(trust_domain: TrustDomain, pem: &[u8]) -> Result<TrustBundle, BundleError> {
        let roots = CertificateDer::pem_slice_iter(pem)
            .enumerate()
            .map(|(index, cert)| {
                cert.map_err(|e| BundleError::BadCertificate {
                    index,
                    reason: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        TrustBundle::new(trust_domain, roots, 1)
    }

    /// Reads a PEM bundle file.
    pub fn load_pem(trust_domain: TrustDomain, path: &Path) -> Result<TrustBundle, BundleError> {
        let pem = std::fs::read(path).map_err(|error| BundleError::Read {
            path: path.display().to_string(),
            error,
        })?;
        TrustBundle::from_pem(trust_domain, &pem).map_err(|error| BundleError::File {
            path: path.display().to_string(),
            error: Box::new(error),
        })
    }

    /// The trust domain this bundle is for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The root certificates, DER.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// webpki trust anchors for path validation.
    pub fn trust_anchors(&self) -> Vec<rustls_pki_types::TrustAnchor<'_>> {
        self.roots
            .iter()
            .filter_map(|root| webpki::anchor_from_trusted_cert(root).ok())
            .collect()
    }

    /// PEM text of every root.
    pub fn to_pem(&self) -> String {
        self.roots.iter().map(|der| pem_certificate(der)).collect()
    }

    /// The SPIFFE bundle JSON (RFC 7517 JWK Set with `spiffe_sequence` and
    /// `spiffe_refresh_hint`), in the shape go-jose accepts: one `x509-svid` JWK per root,
    /// with `x5c` holding exactly that root and `crv`/`x`/`y` taken from it.
    pub fn to_spiffe_json(&self) -> Result<String, BundleError> {
        let keys = self
            .roots
            .iter()
            .enumerate()
            .map(|(index, der)| {
                let (x, y) = p256_point(der).ok_or(BundleError::UnsupportedKey(index))?;
                Ok(Jwk {
                    use_: "x509-svid".into(),
                    kty: "EC".into(),
                    crv: Some("P-256".into()),
                    x: Some(URL_SAFE_NO_PAD.encode(x)),
                    y: Some(URL_SAFE_NO_PAD.encode(y)),
                    x5c: Some(vec![STANDARD.encode(der.as_ref())]),
                })
            })
            .collect::<Result<Vec<_>, BundleError>>()?;
        let set = JwkSet {
            spiffe_sequence: Some(self.sequence),
            spiffe_refresh_hint: Some(REFRESH_HINT_SECS),
            keys: Some(keys),
        };
        Ok(serde_json::to_string_pretty(&set).expect("bundle JSON always serializes"))
    }

    /// Parses SPIFFE bundle JSON for `trust_domain`. Entries with an unknown `use` or `kty`,
    /// or without `x5c`, are ignored as the spec requires; only the first `x5c` value counts.
    pub fn from_spiffe_json(
        trust_domain: TrustDomain,
        json: &str,
    ) -> Result<TrustBundle, BundleError> {
        let set: JwkSet =
            serde_json::from_str(json).map_err(|e| BundleError::Json(e.to_string()))?;
        let keys = set
            .keys
            .ok_or_else(|| BundleError::Json("`keys` is missing".into()))?;
        let roots = keys
            .iter()
            .filter(|k| k.use_ == "x509-svid")
            .filter_map(|k| k.x5c.as_ref()?.first())
            .map(|b64| {
                STANDARD
                    .decode(b64)
                    .map(CertificateDer::from)
                    .map_err(|e| BundleError::Json(format!("x5c is not base64: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        TrustBundle::new(trust_domain, roots, set.spiffe_sequence.unwrap_or(0))
    }
}

/// The trust domain a root names in its `spiffe://TD` URI SAN (as Weft roots do), if any.
pub fn trust_domain_of_root(der: &CertificateDer<'_>) -> Option<TrustDomain> {
    let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
    let uris = crate::verify::uri_sans(&cert).ok()?;
    uris.into_iter().find_map(|uri| TrustDomain::new(uri).ok())
}

/// PEM text of one certificate.
pub fn pem_certificate(der: &CertificateDer<'_>) -> String {
    let body = STANDARD.encode(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[derive(Serialize, Deserialize)]
struct JwkSet {
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<u64>,
    keys: Option<Vec<Jwk>>,
}

#[derive(Serialize, Deserialize)]
struct Jwk {
    #[serde(rename = "use", default)]
    use_: String,
    #[serde(default)]
    kty: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    crv: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    x: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    y: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    x5c: Option<Vec<String>>,
}

/// The affine coordinates of a P-256 public key in `der`, if it has one.
fn p256_point(der: &CertificateDer<'_>) -> Option<(Vec<u8>, Vec<u8>)> {
    let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
    let spki = cert.public_key();
    let curve = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
    if curve.to_id_string() != P256_OID {
        return None;
    }
    let point = spki.subject_public_key.data.as_ref();
    (point.len() == 65 && point[0] == 0x04).then(|| (point[1..33].to_vec(), point[33..].to_vec()))
}

fn check_root(
    trust_domain: &TrustDomain,
    index: usize,
    der: &CertificateDer<'_>,
) -> Result<(), BundleError> {
    let not_root = |reason: &str| BundleError::NotARoot {
        index,
        trust_domain: trust_domain.clone(),
        reason: reason.into(),
    };
    let (_, cert) =
        X509Certificate::from_der(der.as_ref()).map_err(|e| BundleError::BadCertificate {
            index,
            reason: e.to_string(),
        })?;
    if !cert.is_ca() {
        return Err(not_root("basicConstraints does not say CA"));
    }
    if let Ok(Some(usage)) = cert.key_usage()
        && !usage.value.key_cert_sign()
    {
        return Err(not_root("keyUsage lacks keyCertSign"));
    }
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    let id = SpiffeId::parse(uri)
                        .map_err(|e| not_root(&format!("URI SAN {uri:?}: {e}")))?;
                    if id.trust_domain() != trust_domain || !id.path().is_empty() {
                        return Err(not_root(&format!(
                            "URI SAN {uri} is not spiffe://{trust_domain}"
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}
