//! The offline PKI: the root of a trust domain, operator credentials and CA-host
//! intermediates, and the fixed file names the CLI writes them to.
//!
//! Every key is ECDSA P-256, created here, on the machine that runs the command, and written
//! with mode 0600. Every certificate gets a random serial, a realistic validity and a distinct
//! subject (chain building matches issuers by name, so two trust domains must never share one).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;

use crate::bundle::{TrustBundle, pem_certificate};
use crate::spiffe::{SpiffeId, TrustDomain};

/// Root certificate file written by `weft ca init` (the trust bundle to distribute).
pub const ROOT_CERT: &str = "root.pem";
/// Root key file written by `weft ca init` (keep offline).
pub const ROOT_KEY: &str = "root.key";
/// SPIFFE bundle JSON written by `weft ca init`.
pub const BUNDLE_JSON: &str = "bundle.json";
/// Operator certificate written by `weft ca init`.
pub const OPERATOR_CERT: &str = "operator.pem";
/// Operator key written by `weft ca init`.
pub const OPERATOR_KEY: &str = "operator.key";
/// Intermediate certificate written by `weft ca intermediate`.
pub const CA_CERT: &str = "ca.pem";
/// Intermediate key written by `weft ca intermediate`.
pub const CA_KEY: &str = "ca.key";

/// How long a root is valid.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// How long a CA-host intermediate is valid.
pub const INTERMEDIATE_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
/// How long an operator credential is valid.
pub const OPERATOR_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
/// Backdating of `notBefore`, to tolerate clock skew between hosts.
pub const BACKDATE: Duration = Duration::from_secs(300);

/// Errors creating, reading or writing PKI material.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused to build a certificate or key.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A file exists where we would write, and we never overwrite keys.
    #[error("{0} already exists; refusing to overwrite key material (choose another --out)")]
    Exists(PathBuf),
    /// A file does not hold what it should.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A name is not valid in a SPIFFE ID.
    #[error(transparent)]
    Id(#[from] crate::spiffe::SpiffeIdError),
    /// The bundle could not be built.
    #[error(transparent)]
    Bundle(#[from] crate::bundle::BundleError),
}

/// A random positive serial of 16 bytes.
pub fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // positive and exactly 16 octets
    SerialNumber::from_slice(&bytes)
}

/// A short random hex tag that keeps subjects unique across trust domains and rotations.
fn name_tag() -> String {
    let mut bytes = [0u8; 4];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + lifetime;
}

fn ca_params(
    trust_domain: &TrustDomain,
    common_name: String,
    lifetime: Duration,
    path_len: Option<u8>,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Weft");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = match path_len {
        Some(n) => IsCa::Ca(BasicConstraints::Constrained(n)),
        None => IsCa::Ca(BasicConstraints::Unconstrained),
    };
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![SanType::URI(
        trust_domain
            .id_string()
            .try_into()
            .expect("a trust domain ID is a valid URI"),
    )];
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, lifetime);
    params
}

/// A CA certificate and its key, able to sign.
pub struct SigningCa {
    /// The certificate, DER.
    pub cert: CertificateDer<'static>,
    /// The signer (parameters read back from the certificate, and the key).
    pub issuer: Issuer<'static, KeyPair>,
    /// The key, PKCS#8 PEM.
    pub key_pem: String,
}

impl SigningCa {
    /// Loads a CA certificate and key from PEM files.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<SigningCa, PkiError> {
        let cert_pem = read(cert_path)?;
        let cert =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| PkiError::Invalid {
                path: cert_path.to_path_buf(),
                reason: format!("not a PEM certificate: {e}"),
            })?;
        let key_pem = read(key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Invalid {
            path: key_path.to_path_buf(),
            reason: format!("not a PEM private key: {e}"),
        })?;
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(|e| PkiError::Invalid {
            path: cert_path.to_path_buf(),
            reason: format!("not a usable CA certificate for this key: {e}"),
        })?;
        Ok(SigningCa {
            cert,
            issuer,
            key_pem,
        })
    }
}

/// What `weft ca init` creates.
pub struct InitOutput {
    /// The trust bundle (the new root).
    pub bundle: TrustBundle,
    /// The operator's SPIFFE ID.
    pub operator: SpiffeId,
}

/// Creates a root and an operator credential in `out` (which must not hold them yet).
pub fn init(
    trust_domain: &TrustDomain,
    operator_name: &str,
    out: &Path,
) -> Result<InitOutput, PkiError> {
    for name in [
        ROOT_CERT,
        ROOT_KEY,
        BUNDLE_JSON,
        OPERATOR_CERT,
        OPERATOR_KEY,
    ] {
        refuse_existing(&out.join(name))?;
    }
    let operator = SpiffeId::operator(trust_domain, operator_name)?;
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let root_params = ca_params(
        trust_domain,
        format!("Weft root {trust_domain} {}", name_tag()),
        ROOT_VALIDITY,
        None,
    );
    let root_cert = root_params.self_signed(&root_key)?;
    let root_der = root_cert.der().clone();
    let bundle = TrustBundle::new(trust_domain.clone(), vec![root_der.clone()], 1)?;
    let root_issuer = Issuer::new(root_params, root_key);

    let operator_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let operator_cert = leaf_params(
        &operator,
        OPERATOR_VALIDITY,
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    )
    .signed_by(&operator_key, &root_issuer)?;

    std::fs::create_dir_all(out).map_err(|error| PkiError::Io {
        path: out.to_path_buf(),
        error,
    })?;
    write_private(&out.join(ROOT_KEY), &root_issuer.key().serialize_pem())?;
    write_public(&out.join(ROOT_CERT), &pem_certificate(&root_der))?;
    write_public(&out.join(BUNDLE_JSON), &bundle.to_spiffe_json()?)?;
    write_private(&out.join(OPERATOR_KEY), &operator_key.serialize_pem())?;
    write_public(
        &out.join(OPERATOR_CERT),
        &pem_certificate(operator_cert.der()),
    )?;
    Ok(InitOutput { bundle, operator })
}

/// Reads `root_dir/root.pem` and returns it as a bundle of the trust domain its URI SAN
/// names (as `weft ca init` writes it).
pub fn load_root(root_dir: &Path) -> Result<TrustBundle, PkiError> {
    let path = root_dir.join(ROOT_CERT);
    let pem = read(&path)?;
    let invalid = |reason: String| PkiError::Invalid {
        path: path.clone(),
        reason,
    };
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| invalid(format!("not a PEM certificate: {e}")))?;
    let trust_domain = crate::bundle::trust_domain_of_root(&der).ok_or_else(|| {
        invalid(
            "the root names no spiffe://TRUST-DOMAIN URI; was it made by `weft ca init`?".into(),
        )
    })?;
    Ok(TrustBundle::new(trust_domain, vec![der], 1)?)
}

/// Creates an intermediate for CA host `name`, signed by the root in `root_dir`, in `out`.
/// Returns the intermediate certificate.
pub fn intermediate(
    trust_domain: &TrustDomain,
    root_dir: &Path,
    name: &str,
    out: &Path,
) -> Result<CertificateDer<'static>, PkiError> {
    for file in [CA_CERT, CA_KEY] {
        refuse_existing(&out.join(file))?;
    }
    // The host name must be a valid ID segment; it names the CA in its subject.
    SpiffeId::node(trust_domain, name)?;
    let root = SigningCa::load(&root_dir.join(ROOT_CERT), &root_dir.join(ROOT_KEY))?;
    TrustBundle::new(trust_domain.clone(), vec![root.cert.clone()], 1).map_err(|e| {
        PkiError::Invalid {
            path: root_dir.join(ROOT_CERT),
            reason: e.to_string(),
        }
    })?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = ca_params(
        trust_domain,
        format!("Weft CA {name} {trust_domain} {}", name_tag()),
        INTERMEDIATE_VALIDITY,
        Some(0),
    );
    let cert = params.signed_by(&key, &root.issuer)?;
    std::fs::create_dir_all(out).map_err(|error| PkiError::Io {
        path: out.to_path_buf(),
        error,
    })?;
    write_private(&out.join(CA_KEY), &key.serialize_pem())?;
    write_public(&out.join(CA_CERT), &pem_certificate(cert.der()))?;
    Ok(cert.der().clone())
}

/// Parameters of an SVID-profile leaf for `id`: one URI SAN, critical keyUsage with only
/// digitalSignature, not a CA, the given EKUs, a random serial and the given lifetime.
pub fn leaf_params(
    id: &SpiffeId,
    lifetime: Duration,
    ekus: Vec<ExtendedKeyUsagePurpose>,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Weft");
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(
        id.to_string()
            .try_into()
            .expect("a SPIFFE ID is a valid URI"),
    )];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = ekus;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, lifetime);
    params
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|error| PkiError::Io {
        path: path.to_path_buf(),
        error,
    })
}

fn refuse_existing(path: &Path) -> Result<(), PkiError> {
    if path.exists() {
        Err(PkiError::Exists(path.to_path_buf()))
    } else {
        Ok(())
    }
}

/// Writes a secret with mode 0600 from the first byte (never world-readable, even briefly).
pub fn write_private(path: &Path, contents: &str) -> Result<(), PkiError> {
    let io = |error| PkiError::Io {
        path: path.to_path_buf(),
        error,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Writes a public file (certificate, bundle) with mode 0644.
pub fn write_public(path: &Path, contents: &str) -> Result<(), PkiError> {
    let io = |error| PkiError::Io {
        path: path.to_path_buf(),
        error,
    };
    std::fs::write(path, contents).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).map_err(io)
}
