//! Issuing X.509-SVIDs from certificate signing requests, as a CA host does.
//!
//! The CSR only proves possession of a key and says which ID it wants; everything else in the
//! certificate (CA flag, key usages, EKUs, validity, serial, extensions) is set here, whatever
//! the CSR asked for. A request is refused, with a reason that names what was wrong, when the
//! CSR is forged, asks for a CA certificate, or names another ID or trust domain.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateSigningRequestParams, CustomExtension, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    SanType,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::bundle::TrustBundle;
use crate::pki::{PkiError, SigningCa, leaf_params};
use crate::scope::{NODE_SCOPE_OID, NodeScope};
use crate::spiffe::{SpiffeId, TrustDomain};

/// Why an issuance was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    /// The CSR does not parse or its signature does not verify.
    #[error("invalid CSR: {0}")]
    BadCsr(String),
    /// The CSR asks for a CA certificate.
    #[error("CSR asks for a CA certificate")]
    CsrRequestsCa,
    /// The CSR names an ID of another trust domain.
    #[error("CSR names {asked}, which is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// What the CSR asked for.
        asked: String,
        /// This CA's trust domain.
        trust_domain: TrustDomain,
    },
    /// The CSR names another ID than the one the requester may have.
    #[error("CSR names {asked}, but this request may only be for {expected}")]
    WrongId {
        /// What the CSR asked for.
        asked: String,
        /// What the requester may have.
        expected: SpiffeId,
    },
    /// The CA's own certificate has expired.
    #[error("this CA's certificate expired; it can no longer issue")]
    CaExpired,
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(String),
}

impl IssueError {
    /// A short label for metrics (`reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            IssueError::BadCsr(_) => "bad_csr",
            IssueError::CsrRequestsCa => "csr_requests_ca",
            IssueError::ForeignTrustDomain { .. } => "foreign_trust_domain",
            IssueError::WrongId { .. } => "wrong_id",
            IssueError::CaExpired => "ca_expired",
            IssueError::Sign(_) => "sign_failed",
        }
    }
}

/// A freshly issued SVID.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    /// Leaf first, then this CA's certificate (never the root).
    pub chain: Vec<CertificateDer<'static>>,
    /// Expiry of the leaf.
    pub not_after: SystemTime,
}

/// An intermediate that issues SVIDs for one trust domain.
pub struct CertificateAuthority {
    ca: SigningCa,
    trust_domain: TrustDomain,
    not_after: SystemTime,
}

impl CertificateAuthority {
    /// Loads the intermediate certificate and key of a CA host and checks that the
    /// certificate is a CA of `bundle`'s trust domain and chains to one of its roots.
    pub fn load(
        cert_path: &Path,
        key_path: &Path,
        bundle: &TrustBundle,
    ) -> Result<CertificateAuthority, PkiError> {
        let ca = SigningCa::load(cert_path, key_path)?;
        let invalid = |reason: String| PkiError::Invalid {
            path: cert_path.to_path_buf(),
            reason,
        };
        let (_, cert) =
            X509Certificate::from_der(ca.cert.as_ref()).map_err(|e| invalid(e.to_string()))?;
        if !cert.is_ca() {
            return Err(invalid("not a CA certificate".into()));
        }
        let signed_by_bundle = bundle.roots().iter().any(|root| {
            X509Certificate::from_der(root.as_ref())
                .is_ok_and(|(_, root)| cert.verify_signature(Some(root.public_key())).is_ok())
        });
        if !signed_by_bundle {
            return Err(invalid(format!(
                "not signed by any root of the {} trust bundle",
                bundle.trust_domain()
            )));
        }
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
        if not_after <= SystemTime::now() {
            return Err(invalid(
                "the intermediate has expired; issue a new one with `weft ca intermediate`".into(),
            ));
        }
        Ok(CertificateAuthority {
            ca,
            trust_domain: bundle.trust_domain().clone(),
            not_after,
        })
    }

    /// This CA's certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.ca.cert
    }

    /// The intermediate's key, to prove the `ca` role in gossip (see [`crate::attest`]).
    pub fn signing_key(&self) -> &rcgen::KeyPair {
        self.ca.issuer.key()
    }

    /// When this CA's certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The trust domain it issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Issues an SVID for `id` to the key of `csr`, valid for `ttl` (capped at this CA's own
    /// expiry), carrying `scope` when it is a node SVID.
    pub fn issue(
        &self,
        csr: &[u8],
        id: &SpiffeId,
        ttl: Duration,
        scope: Option<&NodeScope>,
    ) -> Result<IssuedSvid, IssueError> {
        let request =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr))
                .map_err(|e| IssueError::BadCsr(e.to_string()))?;
        if !matches!(request.params.is_ca, IsCa::NoCa | IsCa::ExplicitNoCa) {
            return Err(IssueError::CsrRequestsCa);
        }
        let uris: Vec<&str> = request
            .params
            .subject_alt_names
            .iter()
            .filter_map(|san| match san {
                SanType::URI(uri) => Some(uri.as_str()),
                _ => None,
            })
            .collect();
        match uris.as_slice() {
            [uri] if *uri == id.to_string() => {}
            [uri] => {
                return Err(match SpiffeId::parse(uri) {
                    Ok(asked) if asked.trust_domain() != &self.trust_domain => {
                        IssueError::ForeignTrustDomain {
                            asked: uri.to_string(),
                            trust_domain: self.trust_domain.clone(),
                        }
                    }
                    _ => IssueError::WrongId {
                        asked: uri.to_string(),
                        expected: id.clone(),
                    },
                });
            }
            _ => {
                return Err(IssueError::WrongId {
                    asked: format!("{} URI SANs", uris.len()),
                    expected: id.clone(),
                });
            }
        }
        if id.trust_domain() != &self.trust_domain {
            return Err(IssueError::ForeignTrustDomain {
                asked: id.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        self.sign(&request.public_key, id, ttl, scope)
    }

    /// Creates a key here and issues an SVID for it: how a CA host gives itself identities.
    pub fn issue_local(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        scope: Option<&NodeScope>,
    ) -> Result<(KeyPair, IssuedSvid), IssueError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IssueError::Sign(e.to_string()))?;
        let svid = self.sign(&key, id, ttl, scope)?;
        Ok((key, svid))
    }

    fn sign(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        id: &SpiffeId,
        ttl: Duration,
        scope: Option<&NodeScope>,
    ) -> Result<IssuedSvid, IssueError> {
        let now = SystemTime::now();
        if self.not_after <= now {
            return Err(IssueError::CaExpired);
        }
        let lifetime = ttl.min(self.not_after.duration_since(now).unwrap_or_default());
        let mut params = leaf_params(
            id,
            lifetime,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        );
        params.not_after = params.not_after.min(to_offset(self.not_after));
        if let Some(scope) = scope {
            params
                .custom_extensions
                .push(CustomExtension::from_oid_content(
                    NODE_SCOPE_OID,
                    scope.to_der(),
                ));
        }
        let cert = params
            .signed_by(public_key, &self.ca.issuer)
            .map_err(|e| IssueError::Sign(e.to_string()))?;
        Ok(IssuedSvid {
            chain: vec![cert.der().clone(), self.ca.cert.clone()],
            not_after: from_offset(params.not_after),
        })
    }
}

fn to_offset(t: SystemTime) -> OffsetDateTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    OffsetDateTime::from_unix_timestamp(secs as i64).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn from_offset(t: OffsetDateTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(t.unix_timestamp().max(0) as u64)
}
