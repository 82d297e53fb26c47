//! Signed bundles: what `weft policy apply` and `weft revoke` publish and agents pass to each
//! other.
//!
//! A bundle is one document set (the policy files, or the revocation list), a version, and
//! the operator's signature over them, so any agent can check it with nothing but the trust
//! bundle, however it arrived. Each kind of content has its own format tag ([`Content`]); the
//! envelope, signing, checks and versioning are the same for all. Wire and disk format (UTF-8
//! JSON, at most [`MAX_BUNDLE_BYTES`]):
//!
//! ```text
//! {"format": FORMAT, "payload": B64(PAYLOAD), "cert": B64(operator cert DER),
//!  "signature": B64(ECDSA P-256 SHA-256, ASN.1 DER, over the ASCII bytes FORMAT "." B64(PAYLOAD))}
//! PAYLOAD = JSON {"td": "<trust domain>", "version": <u64 ≥ 1>, "issued_at": <unix s>, CONTENT...}
//! weft-policy/1:      CONTENT = "files": [{"name": "<file name>", "text": "<YAML>"}, ...]
//! weft-revocations/1: CONTENT = "revoked": [{"kind": "node|id|serial", "value": "...",
//!                                            "at": <unix s>, "reason": "..."}, ...]
//! ```
//!
//! B64 is base64url without padding. The digest that agents gossip is SHA-256 over the
//! decoded PAYLOAD bytes. [`open`] checks, in this order: size and shape; the signer (an
//! operator SVID of the bundle, valid when the bundle was issued, so a bundle outlives the
//! credential that signed it); the signature; the trust domain; the version; and that the
//! content is valid.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use weft_ca::operator::verify_operator_signature;
use weft_ca::verify::{to_system_time, unix_secs};
use weft_ca::{OperatorError, OperatorSigner, SpiffeId, TrustBundle, Usage, verify_svid};

use serde::de::DeserializeOwned;
use weft_ca::{RevocationError, Revocations, TrustDomain};

use super::model::{PolicyError, PolicySet};

/// What a kind of bundle carries: its fields in the payload, its format tag and how it is
/// checked and compiled once the signature verified.
pub trait Content: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The format tag, also the prefix of the signed bytes.
    const FORMAT: &'static str;
    /// Its compiled form.
    type Compiled: Send + Sync + 'static;
    /// Checks and compiles the content for `trust_domain`.
    fn compile(&self, trust_domain: &TrustDomain) -> Result<Self::Compiled, BundleError>;
}

/// The content of a policy bundle: the operator's files, as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyFiles {
    /// The files.
    pub files: Vec<PolicyFile>,
}

impl Content for PolicyFiles {
    const FORMAT: &'static str = "weft-policy/1";
    type Compiled = PolicySet;

    fn compile(&self, _: &TrustDomain) -> Result<PolicySet, BundleError> {
        let named: Vec<(&str, &str)> = self
            .files
            .iter()
            .map(|f| (f.name.as_str(), f.text.as_str()))
            .collect();
        PolicySet::parse_files(&named).map_err(BundleError::Invalid)
    }
}

/// The content of a revocation bundle: every revocation in force.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationList {
    /// The entries.
    pub revoked: Vec<weft_ca::Revocation>,
}

impl Content for RevocationList {
    const FORMAT: &'static str = "weft-revocations/1";
    type Compiled = std::sync::Arc<Revocations>;

    fn compile(&self, trust_domain: &TrustDomain) -> Result<Self::Compiled, BundleError> {
        Revocations::new(self.revoked.clone(), trust_domain)
            .map(std::sync::Arc::new)
            .map_err(BundleError::Revocations)
    }
}
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
    #[error("bundle is {0} bytes; the limit is {MAX_BUNDLE_BYTES}")]
    TooLarge(usize),
    /// Not a bundle of this format.
    #[error("malformed bundle: {0}")]
    Malformed(String),
    /// The signer or the signature does not check out.
    #[error("bundle signature: {0}")]
    Signature(#[from] OperatorError),
    /// Signed for another trust domain.
    #[error("bundle is for trust domain {bundle}, this mesh is {ours}")]
    ForeignTrustDomain {
        /// What the bundle says.
        bundle: String,
        /// Ours.
        ours: String,
    },
    /// Its version is further above its issue time than [`MAX_VERSION_AHEAD`].
    #[error(
        "version {version} is too high: versions may be at most {limit} (the issue time in unix seconds plus ten years), so that no bundle can leave no room for the next one"
    )]
    VersionTooFar {
        /// The version.
        version: u64,
        /// The highest version allowed for its issue time.
        limit: u64,
    },
    /// Issued later than now plus the allowed clock skew.
    #[error("bundle is issued in the future (unix time {0}); check the clocks")]
    NotYetValid(i64),
    /// The signed files are not a valid policy set.
    #[error("bundle holds an invalid policy set: {}", first_error(.0))]
    Invalid(Vec<PolicyError>),
    /// The signed revocation list is not valid.
    #[error("bundle holds an invalid revocation list: {0}")]
    Revocations(RevocationError),
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
            BundleError::VersionTooFar { .. } => "version_too_far",
            BundleError::Invalid(_) => "invalid_policy",
            BundleError::Revocations(_) => "invalid_revocations",
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

/// The signed payload: the header every kind shares, then the content's own fields.
#[derive(Serialize, Deserialize)]
struct Payload<C> {
    td: String,
    version: u64,
    issued_at: i64,
    #[serde(flatten)]
    content: C,
}

/// The header fields alone, read without knowing the content.
#[derive(Deserialize)]
struct Header {
    version: u64,
}

/// A verified policy bundle.
pub type VerifiedBundle = Verified<PolicyFiles>;

/// A bundle whose signature, trust domain and contents checked out.
#[derive(Debug, Clone)]
pub struct Verified<C: Content> {
    /// The version the operator gave it; higher replaces lower.
    pub version: u64,
    /// SHA-256 of the payload, hex.
    pub digest: String,
    /// When it was signed.
    pub issued_at: SystemTime,
    /// Who signed it.
    pub operator: SpiffeId,
    /// The content, as signed.
    pub content: C,
    /// Its compiled form.
    pub compiled: C::Compiled,
    /// The bundle exactly as received: what is persisted and served to peers.
    pub bytes: Vec<u8>,
}

impl<C: Content> Verified<C> {
    /// What an agent holding it advertises in gossip.
    pub fn advert(&self) -> weft_discovery::BundleAdvert {
        weft_discovery::BundleAdvert {
            version: self.version,
            digest: self.digest.clone(),
        }
    }
}

/// Signs `content` as bundle `version`, issued now. The caller validates the content first
/// (so the operator sees every error with its file and line); signing invalid content is
/// refused too.
pub fn sign<C: Content>(
    content: C,
    version: u64,
    signer: &OperatorSigner,
) -> Result<Vec<u8>, BundleError> {
    let issued_at = unix_secs(SystemTime::now());
    check_version_bound(version, issued_at)?;
    content.compile(signer.id().trust_domain())?;
    let payload = Payload {
        td: signer.id().trust_domain().to_string(),
        version,
        issued_at,
        content,
    };
    let payload_json = serde_json::to_vec(&payload).expect("the payload always serializes");
    let payload_b64 = URL_SAFE_NO_PAD.encode(&payload_json);
    let signature = signer.sign(signed_bytes::<C>(&payload_b64).as_bytes())?;
    let envelope = Envelope {
        format: C::FORMAT.into(),
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

/// Verifies and opens a bundle received at `now` (from `weft policy apply` or a peer)
/// against `trust`: the operator certificate must have been valid when the bundle was issued
/// *and* be valid now, so a bundle signed with a backdated issue time by a credential that has
/// since expired is refused.
pub fn open<C: Content>(
    bytes: &[u8],
    trust: &TrustBundle,
    now: SystemTime,
) -> Result<Verified<C>, BundleError> {
    open_checked(bytes, trust, now, true)
}

/// Verifies and opens the bundle this agent persisted after it accepted it: the operator
/// certificate must have been valid when the bundle was issued, so policy in force survives
/// a restart after the operator credential expired.
pub fn open_persisted<C: Content>(
    bytes: &[u8],
    trust: &TrustBundle,
    now: SystemTime,
) -> Result<Verified<C>, BundleError> {
    open_checked(bytes, trust, now, false)
}

/// Both openings; `received` adds the check that the operator certificate is valid `now`.
fn open_checked<C: Content>(
    bytes: &[u8],
    trust: &TrustBundle,
    now: SystemTime,
    received: bool,
) -> Result<Verified<C>, BundleError> {
    if bytes.len() > MAX_BUNDLE_BYTES {
        return Err(BundleError::TooLarge(bytes.len()));
    }
    let malformed = |what: String| BundleError::Malformed(what);
    let envelope: Envelope =
        serde_json::from_slice(bytes).map_err(|e| malformed(format!("envelope: {e}")))?;
    if envelope.format != C::FORMAT {
        return Err(malformed(format!(
            "format {:?}, expected {:?}",
            envelope.format,
            C::FORMAT
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
    let payload: Payload<C> =
        serde_json::from_slice(&payload_json).map_err(|e| malformed(format!("payload: {e}")))?;
    if payload.issued_at > unix_secs(now).saturating_add(MAX_CLOCK_SKEW.as_secs() as i64) {
        return Err(BundleError::NotYetValid(payload.issued_at));
    }
    let issued_at = to_system_time(payload.issued_at);
    let operator = verify_operator_signature(
        &cert,
        signed_bytes::<C>(&envelope.payload).as_bytes(),
        &signature,
        trust,
        issued_at,
    )?;
    if received {
        verify_svid(std::slice::from_ref(&cert), trust, now, Usage::Client)
            .map_err(OperatorError::Untrusted)?;
    }
    if payload.td != trust.trust_domain().as_str() {
        return Err(BundleError::ForeignTrustDomain {
            bundle: payload.td,
            ours: trust.trust_domain().to_string(),
        });
    }
    if payload.version == 0 {
        return Err(malformed("version 0; versions start at 1".into()));
    }
    check_version_bound(payload.version, payload.issued_at)?;
    let compiled = payload.content.compile(trust.trust_domain())?;
    Ok(Verified {
        version: payload.version,
        digest: hex_digest(&payload_json),
        issued_at,
        operator,
        content: payload.content,
        compiled,
        bytes: bytes.to_vec(),
    })
}

/// How far above its issue time (in unix seconds) a bundle's version may be: ten years. The
/// default version is the issue time itself, so this leaves every operator room, while a
/// version near `u64::MAX` (which would leave no room for the next bundle, freezing policy
/// for good) is refused by `weft policy apply` and by every agent.
pub const MAX_VERSION_AHEAD: u64 = 10 * 365 * 86_400;

/// Refuses `version` if it is more than [`MAX_VERSION_AHEAD`] above `issued_at`.
fn check_version_bound(version: u64, issued_at: i64) -> Result<(), BundleError> {
    let limit = (issued_at.max(0) as u64).saturating_add(MAX_VERSION_AHEAD);
    if version > limit {
        return Err(BundleError::VersionTooFar { version, limit });
    }
    Ok(())
}

/// The version and digest a bundle claims, read without verifying anything: enough to tell
/// whether a peer served what it advertised before the bundle is verified.
pub fn peek(bytes: &[u8]) -> Option<(u64, String)> {
    let envelope: Envelope = serde_json::from_slice(bytes).ok()?;
    let payload_json = URL_SAFE_NO_PAD.decode(&envelope.payload).ok()?;
    let header: Header = serde_json::from_slice(&payload_json).ok()?;
    Some((header.version, hex_digest(&payload_json)))
}

fn signed_bytes<C: Content>(payload_b64: &str) -> String {
    format!("{}.{payload_b64}", C::FORMAT)
}

fn hex_digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use rcgen::{ExtendedKeyUsagePurpose, KeyPair};
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
    use rustls_pki_types::pem::PemObject;
    use weft_ca::pki::{self, SigningCa};
    use weft_ca::{OperatorCredential, TrustDomain};

    use super::*;

    const TD: &str = "policy.test";
    pub(crate) const ALLOW_ALL: &str = "apiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata: {name: mesh}\nspec: {default: allow}\n";

    /// A trust domain's root and operator in a temp dir, for tests that sign bundles.
    pub(crate) struct Fixture {
        pub(crate) dir: tempfile::TempDir,
        pub(crate) root: std::path::PathBuf,
        pub(crate) trust: TrustBundle,
        pub(crate) signer: OperatorSigner,
    }

    pub(crate) fn fixture(td: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let domain = TrustDomain::new(td).unwrap();
        pki::init(&domain, "alice", &root).unwrap();
        let trust = TrustBundle::load_pem(domain, &root.join(pki::ROOT_CERT)).unwrap();
        let signer = OperatorCredential::load(&root)
            .unwrap()
            .signer(SystemTime::now())
            .unwrap();
        Fixture {
            dir,
            root,
            trust,
            signer,
        }
    }

    pub(crate) fn files(text: &str) -> PolicyFiles {
        PolicyFiles {
            files: vec![PolicyFile {
                name: "mesh.yaml".into(),
                text: text.into(),
            }],
        }
    }

    /// [`super::open`] for policy bundles.
    fn open(
        bytes: &[u8],
        trust: &TrustBundle,
        now: SystemTime,
    ) -> Result<VerifiedBundle, BundleError> {
        super::open(bytes, trust, now)
    }

    fn envelope(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).unwrap()
    }

    /// An envelope around `payload_json`, signed by the holder of `cert_der` and `key_pem`.
    fn forge(payload_json: &[u8], cert_der: &[u8], key_pem: &str) -> Vec<u8> {
        let payload = URL_SAFE_NO_PAD.encode(payload_json);
        let der = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            der.secret_der(),
            &SystemRandom::new(),
        )
        .unwrap();
        let signature = key
            .sign(
                &SystemRandom::new(),
                signed_bytes::<PolicyFiles>(&payload).as_bytes(),
            )
            .unwrap();
        serde_json::to_vec(&serde_json::json!({
            "format": PolicyFiles::FORMAT,
            "payload": payload,
            "cert": URL_SAFE_NO_PAD.encode(cert_der),
            "signature": URL_SAFE_NO_PAD.encode(signature.as_ref()),
        }))
        .unwrap()
    }

    fn payload_json(td: &str, version: u64, issued_at: i64, text: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "td": td, "version": version, "issued_at": issued_at,
            "files": [{"name": "mesh.yaml", "text": text}],
        }))
        .unwrap()
    }

    #[test]
    fn a_signed_bundle_opens_with_its_version_operator_files_and_digest() {
        let f = fixture(TD);
        let bytes = sign(files(ALLOW_ALL), 7, &f.signer).unwrap();
        let opened = open(&bytes, &f.trust, SystemTime::now()).unwrap();
        assert_eq!(opened.version, 7);
        assert_eq!(
            opened.operator.to_string(),
            "spiffe://policy.test/operator/alice"
        );
        assert_eq!(opened.content, files(ALLOW_ALL));
        assert_eq!(opened.digest.len(), 64);
        assert_eq!(opened.bytes, bytes);
        // The digest is over the payload: the same files signed again (a new signature, a new
        // issue time maybe) keep the same digest only if the payload is the same.
        let again = open(&bytes, &f.trust, SystemTime::now()).unwrap();
        assert_eq!(again.digest, opened.digest);
        assert_eq!(peek(&bytes), Some((7, opened.digest.clone())));
        assert_eq!(peek(b"not a bundle"), None);
    }

    #[test]
    fn a_tampered_payload_or_signature_is_refused() {
        let f = fixture(TD);
        let bytes = sign(files(ALLOW_ALL), 3, &f.signer).unwrap();
        let mut tampered = envelope(&bytes);
        let other = payload_json(TD, 99, unix_secs(SystemTime::now()), ALLOW_ALL);
        tampered["payload"] = URL_SAFE_NO_PAD.encode(other).into();
        let err = open(
            &serde_json::to_vec(&tampered).unwrap(),
            &f.trust,
            SystemTime::now(),
        )
        .unwrap_err();
        assert_eq!(err.reason(), "bad_signature", "{err}");
        let mut bad_sig = envelope(&bytes);
        bad_sig["signature"] = URL_SAFE_NO_PAD.encode([1u8; 70]).into();
        let err = open(
            &serde_json::to_vec(&bad_sig).unwrap(),
            &f.trust,
            SystemTime::now(),
        )
        .unwrap_err();
        assert_eq!(err.reason(), "bad_signature");
    }

    #[test]
    fn an_operator_of_another_root_is_untrusted() {
        let ours = fixture(TD);
        let theirs = fixture(TD);
        let bytes = sign(files(ALLOW_ALL), 3, &theirs.signer).unwrap();
        let err = open(&bytes, &ours.trust, SystemTime::now()).unwrap_err();
        assert_eq!(err.reason(), "untrusted_signer", "{err}");
    }

    #[test]
    fn a_node_identity_cannot_sign_policies() {
        let f = fixture(TD);
        let root =
            SigningCa::load(&f.root.join(pki::ROOT_CERT), &f.root.join(pki::ROOT_KEY)).unwrap();
        let node = SpiffeId::node(f.trust.trust_domain(), "host-9").unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = pki::leaf_params(
            &node,
            Duration::from_secs(3600),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        )
        .signed_by(&key, &root.issuer)
        .unwrap();
        let payload = payload_json(TD, 5, unix_secs(SystemTime::now()), ALLOW_ALL);
        let bytes = forge(&payload, cert.der(), &key.serialize_pem());
        let err = open(&bytes, &f.trust, SystemTime::now()).unwrap_err();
        assert_eq!(err.reason(), "not_operator", "{err}");
    }

    #[test]
    fn foreign_trust_domain_future_issue_version_zero_or_too_far_and_invalid_sets_are_refused() {
        let f = fixture(TD);
        let key_pem = std::fs::read_to_string(f.root.join(pki::OPERATOR_KEY)).unwrap();
        let cert = f.signer.cert_der().to_vec();
        let now = unix_secs(SystemTime::now());
        let cases: [(Vec<u8>, &str); 5] = [
            (
                payload_json("other.test", 5, now, ALLOW_ALL),
                "foreign_trust_domain",
            ),
            // Signed by a real operator with another tool, past the bound.
            (
                payload_json(TD, u64::MAX, now, ALLOW_ALL),
                "version_too_far",
            ),
            (payload_json(TD, 5, now + 3600, ALLOW_ALL), "not_yet_valid"),
            (payload_json(TD, 0, now, ALLOW_ALL), "malformed"),
            (
                payload_json(TD, 5, now, "kind: Nonsense\n"),
                "invalid_policy",
            ),
        ];
        for (payload, reason) in cases {
            let err = open(
                &forge(&payload, &cert, &key_pem),
                &f.trust,
                SystemTime::now(),
            )
            .unwrap_err();
            assert_eq!(err.reason(), reason, "{err}");
        }
    }

    #[test]
    fn a_bundle_outlives_the_operator_credential_that_signed_it() {
        let f = fixture(TD);
        let bytes = sign(files(ALLOW_ALL), 3, &f.signer).unwrap();
        // Two years on, the operator certificate (one year) has expired; the bundle this
        // agent accepted while it was valid still opens from its own disk...
        let later = SystemTime::now() + Duration::from_secs(2 * 365 * 86_400);
        assert!(open_persisted::<PolicyFiles>(&bytes, &f.trust, later).is_ok());
        // ...but nobody can hand it (or anything else that credential signed, backdated or
        // not) to an agent any more.
        let err = open(&bytes, &f.trust, later).unwrap_err();
        assert_eq!(err.reason(), "untrusted_signer", "{err}");
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[test]
    fn a_version_that_leaves_no_room_for_the_next_is_not_signed() {
        let f = fixture(TD);
        for version in [u64::MAX, u64::MAX / 2] {
            let err = sign(files(ALLOW_ALL), version, &f.signer).unwrap_err();
            assert_eq!(err.reason(), "version_too_far", "{err}");
        }
        let highest = unix_secs(SystemTime::now()) as u64 + MAX_VERSION_AHEAD - 60;
        let bytes = sign(files(ALLOW_ALL), highest, &f.signer).unwrap();
        assert_eq!(
            open(&bytes, &f.trust, SystemTime::now()).unwrap().version,
            highest
        );
    }

    #[test]
    fn a_revocation_bundle_opens_as_one_and_never_as_policy() {
        let f = fixture(TD);
        let entry = |value: &str| weft_ca::Revocation {
            kind: weft_ca::RevokedKind::Node,
            value: value.into(),
            at: unix_secs(SystemTime::now()),
            reason: "lost laptop".into(),
        };
        let list = RevocationList {
            revoked: vec![entry("web-1")],
        };
        let bytes = sign(list.clone(), 4, &f.signer).unwrap();
        let opened: Verified<RevocationList> =
            super::open(&bytes, &f.trust, SystemTime::now()).unwrap();
        assert_eq!(opened.content, list);
        assert_eq!(opened.compiled.len(), 1);
        assert_eq!(peek(&bytes).map(|p| p.0), Some(4));
        let err = open(&bytes, &f.trust, SystemTime::now()).unwrap_err();
        assert_eq!(err.reason(), "malformed", "{err}");
        // An entry that names no valid subject is refused when signing.
        let bad = RevocationList {
            revoked: vec![entry("a/b")],
        };
        assert_eq!(
            sign(bad, 5, &f.signer).unwrap_err().reason(),
            "invalid_revocations"
        );
    }

    #[test]
    fn garbage_and_oversized_input_are_refused_without_panicking() {
        let f = fixture(TD);
        for input in [
            &b""[..],
            b"{}",
            b"not json",
            br#"{"format":"weft-policy/2","payload":"","cert":"","signature":""}"#,
            br#"{"format":"weft-policy/1","payload":"!!","cert":"","signature":""}"#,
        ] {
            assert_eq!(
                open(input, &f.trust, SystemTime::now())
                    .unwrap_err()
                    .reason(),
                "malformed"
            );
        }
        let big = vec![b' '; MAX_BUNDLE_BYTES + 1];
        assert_eq!(
            open(&big, &f.trust, SystemTime::now())
                .unwrap_err()
                .reason(),
            "too_large"
        );
    }
}
