//! Relying-party validation of X.509-SVID chains: what the CA server, the tunnels and
//! `weft certs verify` run on every certificate chain a peer presents.
//!
//! [`verify_svid`] follows the SPIFFE X.509-SVID standard §5 (with Workload API §4.6 and
//! Federation §7.3), in this order:
//!
//! 1. the chain is not empty; the first certificate is the leaf, the rest are intermediates;
//! 2. the leaf has exactly one URI SAN, a SPIFFE ID with a non-empty path;
//! 3. the leaf is not a CA, has a keyUsage extension with `digitalSignature` and without
//!    `keyCertSign` or `cRLSign`;
//! 4. the leaf's trust domain is the bundle's (bundles are never pooled: a leaf of
//!    `spiffe://other/x` signed by our own CA is refused);
//! 5. every certificate is inside its validity window, every intermediate is a CA with
//!    `keyCertSign`, and RFC 5280 path validation (webpki) leads to a root of the bundle;
//! 6. the leaf's extendedKeyUsage, when present, allows the requested [`Usage`];
//! 7. (Weft) no certificate of the chain is revoked by the operator's revocations installed
//!    in the bundle ([`crate::revocation`]).
//!
//! Steps 3, 5 (CA flag, keyUsage, validity) and 6 are checked here explicitly before webpki
//! runs, so that a refusal names its cause and the certificate it is about; webpki still
//! checks them again. Nothing here authorizes: callers decide what the verified ID may do.
//! This module must never accept a chain that webpki alone would refuse.

use std::fmt;
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::{ExtendedKeyUsageValidator, KeyPurposeIdIter, KeyUsage};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::bundle::TrustBundle;
use crate::scope::{NodeScope, node_scope_oid_string};
use crate::spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

/// DER content of the id-kp-serverAuth OID (1.3.6.1.5.5.7.3.1).
const EKU_SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
/// DER content of the id-kp-clientAuth OID (1.3.6.1.5.5.7.3.2).
const EKU_CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];
/// Dotted id-kp-serverAuth, as x509-parser prints it.
const EKU_SERVER_AUTH_DOTTED: &str = "1.3.6.1.5.5.7.3.1";
/// Dotted id-kp-clientAuth, as x509-parser prints it.
const EKU_CLIENT_AUTH_DOTTED: &str = "1.3.6.1.5.5.7.3.2";

/// What the peer's certificate is being accepted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Usage {
    /// A TLS client (the leaf must allow id-kp-clientAuth if it lists EKUs).
    Client,
    /// A TLS server (the leaf must allow id-kp-serverAuth if it lists EKUs).
    Server,
    /// Either role (the leaf must allow one of the two if it lists EKUs).
    Any,
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Usage::Client => "clientAuth",
            Usage::Server => "serverAuth",
            Usage::Any => "clientAuth or serverAuth",
        })
    }
}

/// Where a certificate sits in the presented chain: 0 is the leaf, `n` is intermediate `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChainPosition(pub usize);

impl fmt::Display for ChainPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => f.write_str("leaf"),
            n => write!(f, "intermediate {n}"),
        }
    }
}

/// An SVID chain that passed [`verify_svid`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSvid {
    /// The leaf's SPIFFE ID (in the bundle's trust domain, with a non-empty path).
    pub id: SpiffeId,
    /// Start of the leaf's validity.
    pub not_before: SystemTime,
    /// End of the leaf's validity.
    pub not_after: SystemTime,
    /// The node scope, when the leaf carries the node-scope extension.
    pub scope: Option<NodeScope>,
    /// The leaf's serial number, lowercase hex without separators.
    pub serial_hex: String,
}

/// Why a chain is not an acceptable X.509-SVID for this bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    /// No certificate was presented.
    #[error("certificate chain is empty")]
    EmptyChain,
    /// The PEM text holds no certificate or a broken block.
    #[error("not a PEM certificate chain: {0}")]
    BadPem(String),
    /// A certificate does not parse as X.509.
    #[error("{position} certificate does not parse: {reason}")]
    BadCertificate {
        /// Which certificate.
        position: ChainPosition,
        /// The parser's complaint.
        reason: String,
    },
    /// The leaf has no URI SAN.
    #[error("leaf has no URI SAN; an SVID has exactly one")]
    NoUriSan,
    /// The leaf has more than one URI SAN.
    #[error("leaf has {0} URI SANs; an SVID has exactly one")]
    MultipleUriSans(usize),
    /// The leaf's URI SAN is not a SPIFFE ID.
    #[error("leaf URI SAN {uri:?} is not a SPIFFE ID: {error}")]
    BadSpiffeId {
        /// The URI as found in the certificate.
        uri: String,
        /// Why it does not parse.
        error: SpiffeIdError,
    },
    /// The leaf's SPIFFE ID is the bare trust domain.
    #[error("SPIFFE ID {0} has no path; a leaf SVID must name a workload")]
    NoPath(SpiffeId),
    /// The leaf says it is a CA.
    #[error("leaf is a CA certificate")]
    LeafIsCa,
    /// The leaf has no keyUsage extension.
    #[error("leaf has no keyUsage extension; an SVID must have one with digitalSignature")]
    LeafNoKeyUsage,
    /// The leaf may sign certificates.
    #[error("leaf keyUsage includes keyCertSign")]
    LeafKeyCertSign,
    /// The leaf may sign CRLs.
    #[error("leaf keyUsage includes cRLSign")]
    LeafCrlSign,
    /// The leaf may not make signatures.
    #[error("leaf keyUsage lacks digitalSignature")]
    LeafNoDigitalSignature,
    /// The leaf's node-scope extension is not a SEQUENCE of UTF8Strings.
    #[error("leaf node-scope extension is malformed")]
    BadNodeScope,
    /// The leaf belongs to another trust domain than the bundle.
    #[error("leaf is in trust domain {leaf} but the bundle is for {bundle}")]
    ForeignTrustDomain {
        /// The leaf's trust domain.
        leaf: TrustDomain,
        /// The bundle's trust domain.
        bundle: TrustDomain,
    },
    /// An intermediate is not a CA.
    #[error("intermediate {0} is not a CA")]
    IntermediateNotCa(usize),
    /// An intermediate has no keyUsage extension.
    #[error("intermediate {0} has no keyUsage extension; a signing certificate needs keyCertSign")]
    IntermediateNoKeyUsage(usize),
    /// An intermediate may not sign certificates.
    #[error("intermediate {0} keyUsage lacks keyCertSign")]
    IntermediateNoKeyCertSign(usize),
    /// A certificate's validity ended before the verification time.
    #[error("{position} certificate expired at {}", format_utc(*not_after))]
    Expired {
        /// Which certificate.
        position: ChainPosition,
        /// Its notAfter.
        not_after: SystemTime,
    },
    /// A certificate's validity starts after the verification time.
    #[error("{position} certificate is not valid before {}", format_utc(*not_before))]
    NotYetValid {
        /// Which certificate.
        position: ChainPosition,
        /// Its notBefore.
        not_before: SystemTime,
    },
    /// The leaf's extendedKeyUsage does not allow the requested use.
    #[error("leaf extendedKeyUsage does not allow {0}")]
    WrongUsage(Usage),
    /// Path building found no route to a root of the bundle.
    #[error("chain does not lead to a root of the bundle ({0})")]
    Untrusted(String),
    /// RFC 5280 path validation failed for another reason.
    #[error("path validation failed: {0}")]
    PathValidation(String),
    /// The operator revoked a certificate of the chain.
    #[error("{position} certificate is revoked: {entry}")]
    Revoked {
        /// Which certificate.
        position: ChainPosition,
        /// The revocation that covers it.
        entry: String,
    },
}

impl SvidError {
    /// A short label for metrics (`reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            SvidError::EmptyChain => "empty_chain",
            SvidError::BadPem(_) => "bad_pem",
            SvidError::BadCertificate { .. } => "bad_certificate",
            SvidError::NoUriSan => "no_uri_san",
            SvidError::MultipleUriSans(_) => "multiple_uri_sans",
            SvidError::BadSpiffeId { .. } => "bad_spiffe_id",
            SvidError::NoPath(_) => "no_path",
            SvidError::LeafIsCa => "leaf_is_ca",
            SvidError::LeafNoKeyUsage => "leaf_no_key_usage",
            SvidError::LeafKeyCertSign => "leaf_key_cert_sign",
            SvidError::LeafCrlSign => "leaf_crl_sign",
            SvidError::LeafNoDigitalSignature => "leaf_no_digital_signature",
            SvidError::BadNodeScope => "bad_node_scope",
            SvidError::ForeignTrustDomain { .. } => "foreign_trust_domain",
            SvidError::IntermediateNotCa(_) => "intermediate_not_ca",
            SvidError::IntermediateNoKeyUsage(_) => "intermediate_no_key_usage",
            SvidError::IntermediateNoKeyCertSign(_) => "intermediate_no_key_cert_sign",
            SvidError::Expired { .. } => "expired",
            SvidError::NotYetValid { .. } => "not_yet_valid",
            SvidError::WrongUsage(_) => "wrong_usage",
            SvidError::Untrusted(_) => "untrusted",
            SvidError::PathValidation(_) => "path_validation",
            SvidError::Revoked { .. } => "revoked",
        }
    }
}

/// Parses PEM text holding a certificate chain, leaf first (what `weft certs verify FILE`
/// reads). Blocks other than CERTIFICATE (e.g. a private key) are skipped.
pub fn parse_chain_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, SvidError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SvidError::BadPem(e.to_string()))?;
    if chain.is_empty() {
        return Err(SvidError::BadPem("no CERTIFICATE block found".into()));
    }
    Ok(chain)
}

/// Verifies an X.509-SVID chain (leaf first, then intermediates, never needing the root)
/// against `bundle` at time `now`, for `usage`. See the module documentation for the steps.
pub fn verify_svid(
    chain: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: SystemTime,
    usage: Usage,
) -> Result<VerifiedSvid, SvidError> {
    // Step 1.
    let (leaf_der, intermediates) = chain.split_first().ok_or(SvidError::EmptyChain)?;
    let leaf = parse(leaf_der, 0)?;

    // Step 2.
    let id = leaf_spiffe_id(&leaf)?;

    // Step 3.
    check_leaf_usage(&leaf)?;
    let scope = node_scope(&leaf)?;

    // Step 4: the bundle is for exactly one trust domain; never fall back to another.
    if !id.is_member_of(bundle.trust_domain()) {
        return Err(SvidError::ForeignTrustDomain {
            leaf: id.trust_domain().clone(),
            bundle: bundle.trust_domain().clone(),
        });
    }

    // Step 5, the checks webpki does not name (or, for keyUsage on CAs, does not do).
    let now_secs = unix_secs(now);
    check_validity(&leaf, ChainPosition(0), now_secs)?;
    let revocations = bundle.revocations();
    for (i, der) in intermediates.iter().enumerate() {
        let position = i + 1;
        let cert = parse(der, position)?;
        check_signing_certificate(&cert, position)?;
        check_validity(&cert, ChainPosition(position), now_secs)?;
        // Formatting the serial costs an allocation per certificate: only when needed.
        if !revocations.is_empty()
            && let Some(entry) = revocations.serial(&serial_hex(&cert))
        {
            return Err(SvidError::Revoked {
                position: ChainPosition(position),
                entry: entry.to_string(),
            });
        }
    }

    // Step 6, on the leaf (webpki checks every certificate in the path again below).
    check_leaf_eku(&leaf, usage)?;

    // Step 5: RFC 5280 path validation to a root of this bundle.
    let end_entity =
        webpki::EndEntityCert::try_from(leaf_der).map_err(|e| SvidError::BadCertificate {
            position: ChainPosition(0),
            reason: format!("{e:?}"),
        })?;
    let anchors = bundle.trust_anchors();
    let time = UnixTime::since_unix_epoch(Duration::from_secs(now_secs.max(0) as u64));
    let result = match usage {
        Usage::Client => end_entity.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            time,
            KeyUsage::client_auth(),
            None,
            None,
        ),
        Usage::Server => end_entity.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            time,
            KeyUsage::server_auth(),
            None,
            None,
        ),
        Usage::Any => end_entity.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            time,
            AnyTlsAuth,
            None,
            None,
        ),
    };
    result.map_err(|e| path_error(e, usage))?;

    // Step 7: the operator's revocations in force (intermediates were checked above).
    let not_before = to_system_time(leaf.validity().not_before.timestamp());
    let serial_hex = serial_hex(&leaf);
    if let Some(entry) = revocations.leaf(&id, &serial_hex, not_before) {
        return Err(SvidError::Revoked {
            position: ChainPosition(0),
            entry: entry.to_string(),
        });
    }

    Ok(VerifiedSvid {
        id,
        not_before,
        not_after: to_system_time(leaf.validity().not_after.timestamp()),
        scope,
        serial_hex,
    })
}

/// A certificate's serial number, lowercase hex without separators.
fn serial_hex(cert: &X509Certificate<'_>) -> String {
    cert.raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC, whole seconds) for messages.
pub fn format_utc(t: SystemTime) -> String {
    let secs = unix_secs(t);
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("@{secs}"),
    }
}

/// Seconds since the Unix epoch, negative before it.
pub fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// The time `secs` seconds after (or before) the Unix epoch.
pub fn to_system_time(secs: i64) -> SystemTime {
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn parse<'a>(
    der: &'a CertificateDer<'_>,
    position: usize,
) -> Result<X509Certificate<'a>, SvidError> {
    let bad = |reason: String| SvidError::BadCertificate {
        position: ChainPosition(position),
        reason,
    };
    let (rest, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| bad(e.to_string()))?;
    if !rest.is_empty() {
        return Err(bad(format!("{} bytes of trailing data", rest.len())));
    }
    Ok(cert)
}

/// The URI SANs of a certificate, in order (none when it has no subjectAltName).
pub fn uri_sans<'a>(
    cert: &X509Certificate<'a>,
) -> Result<Vec<&'a str>, x509_parser::error::X509Error> {
    Ok(cert
        .subject_alternative_name()?
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect())
}

fn leaf_spiffe_id(leaf: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let uris = uri_sans(leaf).map_err(|e| SvidError::BadCertificate {
        position: ChainPosition(0),
        reason: format!("subjectAltName: {e}"),
    })?;
    let uri = match uris.as_slice() {
        [] => return Err(SvidError::NoUriSan),
        [uri] => *uri,
        more => return Err(SvidError::MultipleUriSans(more.len())),
    };
    let id = SpiffeId::parse(uri).map_err(|error| SvidError::BadSpiffeId {
        uri: uri.to_owned(),
        error,
    })?;
    if id.path().is_empty() {
        return Err(SvidError::NoPath(id));
    }
    Ok(id)
}

fn check_leaf_usage(leaf: &X509Certificate<'_>) -> Result<(), SvidError> {
    let bad = |e: x509_parser::error::X509Error| SvidError::BadCertificate {
        position: ChainPosition(0),
        reason: e.to_string(),
    };
    if leaf
        .basic_constraints()
        .map_err(bad)?
        .is_some_and(|bc| bc.value.ca)
    {
        return Err(SvidError::LeafIsCa);
    }
    let usage = leaf
        .key_usage()
        .map_err(bad)?
        .ok_or(SvidError::LeafNoKeyUsage)?;
    if usage.value.key_cert_sign() {
        return Err(SvidError::LeafKeyCertSign);
    }
    if usage.value.crl_sign() {
        return Err(SvidError::LeafCrlSign);
    }
    if !usage.value.digital_signature() {
        return Err(SvidError::LeafNoDigitalSignature);
    }
    Ok(())
}

fn node_scope(leaf: &X509Certificate<'_>) -> Result<Option<NodeScope>, SvidError> {
    let oid = node_scope_oid_string();
    match leaf
        .extensions()
        .iter()
        .find(|ext| ext.oid.to_id_string() == oid)
    {
        None => Ok(None),
        Some(ext) => NodeScope::from_der(ext.value)
            .map(Some)
            .ok_or(SvidError::BadNodeScope),
    }
}

fn check_signing_certificate(cert: &X509Certificate<'_>, position: usize) -> Result<(), SvidError> {
    let bad = |e: x509_parser::error::X509Error| SvidError::BadCertificate {
        position: ChainPosition(position),
        reason: e.to_string(),
    };
    if !cert
        .basic_constraints()
        .map_err(bad)?
        .is_some_and(|bc| bc.value.ca)
    {
        return Err(SvidError::IntermediateNotCa(position));
    }
    // webpki ignores keyUsage on CAs; the SVID profile requires keyCertSign on signers.
    let usage = cert
        .key_usage()
        .map_err(bad)?
        .ok_or(SvidError::IntermediateNoKeyUsage(position))?;
    if !usage.value.key_cert_sign() {
        return Err(SvidError::IntermediateNoKeyCertSign(position));
    }
    Ok(())
}

fn check_validity(
    cert: &X509Certificate<'_>,
    position: ChainPosition,
    now: i64,
) -> Result<(), SvidError> {
    let not_before = cert.validity().not_before.timestamp();
    let not_after = cert.validity().not_after.timestamp();
    // Same boundaries as webpki: valid on both end seconds.
    if now < not_before {
        return Err(SvidError::NotYetValid {
            position,
            not_before: to_system_time(not_before),
        });
    }
    if now > not_after {
        return Err(SvidError::Expired {
            position,
            not_after: to_system_time(not_after),
        });
    }
    Ok(())
}

fn check_leaf_eku(leaf: &X509Certificate<'_>, usage: Usage) -> Result<(), SvidError> {
    let eku = leaf
        .extended_key_usage()
        .map_err(|e| SvidError::BadCertificate {
            position: ChainPosition(0),
            reason: format!("extendedKeyUsage: {e}"),
        })?;
    let Some(eku) = eku else {
        // RFC 5280 §4.2.1.12: no EKU extension means any use.
        return Ok(());
    };
    let eku = eku.value;
    let has = |dotted: &str| eku.other.iter().any(|oid| oid.to_id_string() == dotted);
    // anyExtendedKeyUsage is not enough: webpki, like Go, wants the specific purpose.
    let server = eku.server_auth || has(EKU_SERVER_AUTH_DOTTED);
    let client = eku.client_auth || has(EKU_CLIENT_AUTH_DOTTED);
    let allowed = match usage {
        Usage::Client => client,
        Usage::Server => server,
        Usage::Any => client || server,
    };
    if allowed {
        Ok(())
    } else {
        Err(SvidError::WrongUsage(usage))
    }
}

/// Maps a webpki refusal to the cause a reader can act on.
fn path_error(error: webpki::Error, usage: Usage) -> SvidError {
    match error {
        webpki::Error::UnknownIssuer
        | webpki::Error::InvalidSignatureForPublicKey
        | webpki::Error::UnsupportedSignatureAlgorithmContext(_)
        | webpki::Error::UnsupportedSignatureAlgorithmForPublicKeyContext(_)
        | webpki::Error::SignatureAlgorithmMismatch => SvidError::Untrusted(short_debug(&error)),
        webpki::Error::CaUsedAsEndEntity => SvidError::LeafIsCa,
        webpki::Error::RequiredEkuNotFoundContext(_) => SvidError::WrongUsage(usage),
        other => SvidError::PathValidation(short_debug(&other)),
    }
}

/// The variant name of a webpki error (its context structs are noisy in messages).
fn short_debug(error: &webpki::Error) -> String {
    let debug = format!("{error:?}");
    match debug.find(['(', ' ', '{']) {
        Some(end) => debug[..end].to_owned(),
        None => debug,
    }
}

/// EKU policy for [`Usage::Any`]: no EKU extension, or one that lists clientAuth or serverAuth.
struct AnyTlsAuth;

impl ExtendedKeyUsageValidator for AnyTlsAuth {
    fn validate(&self, iter: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        let server = webpki::KeyPurposeId::new(EKU_SERVER_AUTH);
        let client = webpki::KeyPurposeId::new(EKU_CLIENT_AUTH);
        let mut present = Vec::new();
        for id in iter {
            let id = id?;
            if id == server || id == client {
                return Ok(());
            }
            present.push(id.to_decoded_oid());
        }
        if present.is_empty() {
            return Ok(());
        }
        Err(webpki::Error::RequiredEkuNotFoundContext(
            webpki::RequiredEkuNotFoundContext {
                required: KeyUsage::server_auth(),
                present,
            },
        ))
    }
}
