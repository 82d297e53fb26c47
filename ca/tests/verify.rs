//! Relying-party validation of X.509-SVID chains against a real PKI built in a tempdir.
//!
//! The malformed cases are go-spiffe's, transcribed (Apache-2.0) from
//! `spiffe/go-spiffe` `v2/svid/x509svid/verify_test.go` (`TestVerify`: empty chain, no roots
//! for the leaf's domain, bad leaf ID scheme, wrong roots, no URI SAN, two URI SANs, leaf CA,
//! keyCertSign, cRLSign) and `v2/svid/x509svid/svid_test.go` (`TestParse`: the
//! `testdata/wrong-leaf-*.pem` and `wrong-intermediate-*.pem` files: leaf CA true, cert sign,
//! CRL sign, empty ID, no digitalSignature, intermediate without CA flag or keyCertSign,
//! good leaf-only and leaf+intermediate chains). Go's tests edit parsed structs or ship
//! fixed PEM files; here every certificate is regenerated with rcgen and properly signed,
//! so only the property under test is wrong. Extra cases come from specs.md §2.9 and from
//! `maxlambrecht/rust-spiffe` `spiffe-rustls/tests/fixtures` (leaf without keyUsage,
//! non-SPIFFE URI).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use weft_ca::bundle::pem_certificate;
use weft_ca::pki::{self, CA_CERT, CA_KEY, OPERATOR_CERT, ROOT_CERT, ROOT_KEY, SigningCa};
use weft_ca::scope::NODE_SCOPE_OID;
use weft_ca::verify::{
    ChainPosition, SvidError, Usage, VerifiedSvid, parse_chain_pem, verify_svid,
};
use weft_ca::{
    CertificateAuthority, NodeScope, Revocation, Revocations, RevokedKind, SpiffeId, TrustBundle,
    TrustDomain,
};
use x509_parser::prelude::{FromDer, X509Certificate};

const TD: &str = "example.org";
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// A root, an operator and one CA host intermediate of one trust domain, on disk.
struct Pki {
    _dir: tempfile::TempDir,
    root_dir: PathBuf,
    ca_dir: PathBuf,
    bundle: TrustBundle,
    ca: CertificateAuthority,
}

impl Pki {
    fn new(trust_domain: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let td = td(trust_domain);
        let root_dir = dir.path().join("root");
        let ca_dir = dir.path().join("ca-1");
        let out = pki::init(&td, "alice", &root_dir).unwrap();
        pki::intermediate(&td, &root_dir, "ca-1", &ca_dir).unwrap();
        let ca =
            CertificateAuthority::load(&ca_dir.join(CA_CERT), &ca_dir.join(CA_KEY), &out.bundle)
                .unwrap();
        Pki {
            _dir: dir,
            root_dir,
            ca_dir,
            bundle: out.bundle,
            ca,
        }
    }

    fn root(&self) -> SigningCa {
        SigningCa::load(
            &self.root_dir.join(ROOT_CERT),
            &self.root_dir.join(ROOT_KEY),
        )
        .unwrap()
    }

    fn intermediate(&self) -> SigningCa {
        SigningCa::load(&self.ca_dir.join(CA_CERT), &self.ca_dir.join(CA_KEY)).unwrap()
    }

    fn root_der(&self) -> CertificateDer<'static> {
        self.bundle.roots()[0].clone()
    }
}

/// A profile-conformant leaf for `spiffe_id` (1 day), changed by `tweak`, signed by `issuer`.
fn leaf(
    spiffe_id: &str,
    issuer: &Issuer<'_, KeyPair>,
    tweak: impl FnOnce(&mut CertificateParams),
) -> CertificateDer<'static> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = pki::leaf_params(
        &id(spiffe_id),
        DAY,
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    );
    tweak(&mut params);
    params.signed_by(&key, issuer).unwrap().der().clone()
}

/// A CA certificate (changed by `tweak`) signed by `issuer`, and the issuer it makes.
fn sub_ca(
    common_name: &str,
    issuer: &Issuer<'_, KeyPair>,
    tweak: impl FnOnce(&mut CertificateParams),
) -> (CertificateDer<'static>, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Weft");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(pki::random_serial());
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(30);
    tweak(&mut params);
    let der = params.signed_by(&key, issuer).unwrap().der().clone();
    (der, Issuer::new(params, key))
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn verify(chain: &[CertificateDer<'_>], bundle: &TrustBundle) -> Result<VerifiedSvid, SvidError> {
    verify_svid(chain, bundle, SystemTime::now(), Usage::Any)
}

fn refused(chain: &[CertificateDer<'_>], bundle: &TrustBundle) -> SvidError {
    match verify(chain, bundle) {
        Ok(svid) => panic!("chain for {} was accepted", svid.id),
        Err(e) => e,
    }
}

// ---- accepted chains ----

#[test]
fn good_leaf_and_intermediate_chain_verifies_with_its_id_and_expiry() {
    let pki = Pki::new(TD);
    let service = SpiffeId::service(&td(TD), "shop", "web").unwrap();
    let (_, issued) = pki.ca.issue_local(&service, HOUR, None).unwrap();
    assert_eq!(issued.chain.len(), 2);
    for usage in [Usage::Client, Usage::Server, Usage::Any] {
        let svid = verify_svid(&issued.chain, &pki.bundle, SystemTime::now(), usage).unwrap();
        assert_eq!(svid.id, service);
        assert_eq!(svid.not_after, issued.not_after);
        assert!(svid.not_before < SystemTime::now());
        assert_eq!(svid.scope, None);
        let (_, cert) = X509Certificate::from_der(issued.chain[0].as_ref()).unwrap();
        let serial: String = cert
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(svid.serial_hex, serial);
        assert_eq!(svid.serial_hex.len(), 32);
    }
}

#[test]
fn good_leaf_only_chain_signed_by_the_root_verifies() {
    let pki = Pki::new(TD);
    let der = leaf(
        "spiffe://example.org/workload-1",
        &pki.root().issuer,
        |_| {},
    );
    let svid = verify(&[der], &pki.bundle).unwrap();
    assert_eq!(svid.id.to_string(), "spiffe://example.org/workload-1");
}

#[test]
fn node_scope_round_trips_through_verify() {
    let pki = Pki::new(TD);
    let scope = NodeScope::new(["shop/web".to_string(), "default/api".into()]);
    let node = SpiffeId::node(&td(TD), "host-1").unwrap();
    let (_, issued) = pki.ca.issue_local(&node, HOUR, Some(&scope)).unwrap();
    let svid = verify(&issued.chain, &pki.bundle).unwrap();
    assert_eq!(svid.id, node);
    assert_eq!(svid.scope, Some(scope));
}

#[test]
fn a_malformed_node_scope_extension_is_refused() {
    let pki = Pki::new(TD);
    let der = leaf(
        "spiffe://example.org/node/host-1",
        &pki.intermediate().issuer,
        |p| {
            p.custom_extensions.push(CustomExtension::from_oid_content(
                NODE_SCOPE_OID,
                vec![0x02, 0x01, 0x05],
            ));
        },
    );
    let chain = [der, pki.ca.certificate().clone()];
    assert_eq!(refused(&chain, &pki.bundle), SvidError::BadNodeScope);
}

#[test]
fn dns_sans_beside_the_uri_san_are_allowed() {
    let pki = Pki::new(TD);
    let der = leaf(
        "spiffe://example.org/ns/shop/sa/web",
        &pki.intermediate().issuer,
        |p| {
            p.subject_alt_names
                .push(SanType::DnsName("web.shop.internal".try_into().unwrap()));
        },
    );
    let chain = [der, pki.ca.certificate().clone()];
    assert_eq!(
        verify(&chain, &pki.bundle).unwrap().id.path(),
        "/ns/shop/sa/web"
    );
}

// ---- go-spiffe verify_test.go / svid_test.go cases ----

#[test]
fn empty_chain_is_refused() {
    let pki = Pki::new(TD);
    let err = refused(&[], &pki.bundle);
    assert_eq!(err, SvidError::EmptyChain);
    assert_eq!(err.reason(), "empty_chain");
}

#[test]
fn leaf_with_ca_flag_is_refused() {
    let pki = Pki::new(TD);
    let der = leaf("spiffe://example.org/workload-1", &pki.root().issuer, |p| {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    });
    let err = refused(&[der], &pki.bundle);
    assert_eq!(err, SvidError::LeafIsCa);
    assert_eq!(err.to_string(), "leaf is a CA certificate");
}

#[test]
fn leaf_with_key_cert_sign_is_refused() {
    let pki = Pki::new(TD);
    let der = leaf("spiffe://example.org/workload-1", &pki.root().issuer, |p| {
        p.key_usages.push(KeyUsagePurpose::KeyCertSign);
    });
    let err = refused(&[der], &pki.bundle);
    assert_eq!(err, SvidError::LeafKeyCertSign);
    assert_eq!(err.to_string(), "leaf keyUsage includes keyCertSign");
}

#[test]
fn leaf_with_crl_sign_is_refused() {
    let pki = Pki::new(TD);
    let der = leaf("spiffe://example.org/workload-1", &pki.root().issuer, |p| {
        p.key_usages.push(KeyUsagePurpose::CrlSign);
    });
    let err = refused(&[der], &pki.bundle);
    assert_eq!(err, SvidError::LeafCrlSign);
    assert_eq!(err.to_string(), "leaf keyUsage includes cRLSign");
}

#[test]
fn leaf_without_digital_signature_is_refused() {
    let pki = Pki::new(TD);
    let der = leaf("spiffe://example.org/workload-1", &pki.root().issuer, |p| {
        p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    });
    let err = refused(&[der], &pki.bundle);
    assert_eq!(err, SvidError::LeafNoDigitalSignature);
    assert_eq!(err.to_string(), "leaf keyUsage lacks digitalSignature");
}

#[test]
fn leaf_without_key_usage_extension_is_refused() {
    let pki = Pki::new(TD);
    let der = leaf("spiffe://example.org/workload-1", &pki.root().issuer, |p| {
        p.key_usages.clear();
    });
    assert_eq!(refused(&[der], &pki.bundle), SvidError::LeafNoKeyUsage);
}

#[test]
fn leaf_without_uri_san_is_refused() {
    let pki = Pki::new(TD);
    let der = leaf("spiffe://example.org/workload-1", &pki.root().issuer, |p| {
        p.subject_alt_names = vec![SanType::DnsName(
            "workload-1.example.org".try_into().unwrap(),
        )];
    });
    let err = refused(&[der], &pki.bundle);
    assert_eq!(err, SvidError::NoUriSan);
    assert_eq!(err.reason(), "no_uri_san");
}

#[test]
fn leaf_with_empty_path_id_is_refused() {
    let pki = Pki::new(TD);
    let der = leaf("spiffe://example.org/workload-1", &pki.root().issuer, |p| {
        p.subject_alt_names = vec![uri("spiffe://example.org")];
    });
    let err = refused(&[der], &pki.bundle);
    assert_eq!(err, SvidError::NoPath(id("spiffe://example.org")));
    assert!(
        err.to_string()
            .starts_with("SPIFFE ID spiffe://example.org has no path"),
        "{err}"
    );
}

#[test]
fn leaf_with_two_uri_sans_is_refused() {
    let pki = Pki::new(TD);
    let der = leaf("spiffe://example.org/workload-1", &pki.root().issuer, |p| {
        p.subject_alt_names
            .push(uri("spiffe://example.org/workload-2"));
    });
    let err = refused(&[der], &pki.bundle);
    assert_eq!(err, SvidError::MultipleUriSans(2));
    assert_eq!(
        err.to_string(),
        "leaf has 2 URI SANs; an SVID has exactly one"
    );
}

#[test]
fn leaf_with_a_non_spiffe_uri_is_refused() {
    let pki = Pki::new(TD);
    for (bad, expected) in [
        (
            "sparfe://example.org/workload",
            weft_ca::SpiffeIdError::WrongScheme,
        ),
        (
            "https://example.org/workload",
            weft_ca::SpiffeIdError::WrongScheme,
        ),
        (
            "spiffe://Example.org/workload",
            weft_ca::SpiffeIdError::BadTrustDomainChar {
                character: 'E',
                position: 9,
            },
        ),
    ] {
        let der = leaf("spiffe://example.org/workload-1", &pki.root().issuer, |p| {
            p.subject_alt_names = vec![uri(bad)];
        });
        assert_eq!(
            refused(&[der], &pki.bundle),
            SvidError::BadSpiffeId {
                uri: bad.into(),
                error: expected
            },
            "{bad}"
        );
    }
}

#[test]
fn intermediate_without_ca_flag_is_refused() {
    let pki = Pki::new(TD);
    let (int_der, int_issuer) = sub_ca("Weft not-a-CA", &pki.root().issuer, |p| {
        p.is_ca = IsCa::ExplicitNoCa;
    });
    let der = leaf("spiffe://example.org/workload-1", &int_issuer, |_| {});
    let err = refused(&[der, int_der], &pki.bundle);
    assert_eq!(err, SvidError::IntermediateNotCa(1));
    assert_eq!(err.to_string(), "intermediate 1 is not a CA");
}

#[test]
fn intermediate_without_key_cert_sign_is_refused_though_webpki_would_accept_it() {
    let pki = Pki::new(TD);
    let (int_der, int_issuer) = sub_ca("Weft no-keyCertSign", &pki.root().issuer, |p| {
        p.key_usages = vec![KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    });
    let der = leaf("spiffe://example.org/workload-1", &int_issuer, |_| {});
    let chain = [der, int_der];
    let err = refused(&chain, &pki.bundle);
    assert_eq!(err, SvidError::IntermediateNoKeyCertSign(1));
    assert_eq!(err.to_string(), "intermediate 1 keyUsage lacks keyCertSign");

    // webpki ignores keyUsage on CAs, so the explicit check is the only guard.
    let anchors = pki.bundle.trust_anchors();
    let ee = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
    let now = rustls_pki_types::UnixTime::now();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &chain[1..],
        now,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .expect("webpki alone accepts this chain");
}

#[test]
fn intermediate_without_key_usage_extension_is_refused() {
    let pki = Pki::new(TD);
    let (int_der, int_issuer) = sub_ca("Weft no-keyUsage", &pki.root().issuer, |p| {
        p.key_usages.clear();
    });
    let der = leaf("spiffe://example.org/workload-1", &int_issuer, |_| {});
    assert_eq!(
        refused(&[der, int_der], &pki.bundle),
        SvidError::IntermediateNoKeyUsage(1)
    );
}

#[test]
fn expired_leaf_is_refused_as_expired() {
    let pki = Pki::new(TD);
    let service = SpiffeId::service(&td(TD), "shop", "web").unwrap();
    let (_, issued) = pki.ca.issue_local(&service, HOUR, None).unwrap();
    let later = SystemTime::now() + 2 * HOUR;
    let err = verify_svid(&issued.chain, &pki.bundle, later, Usage::Any).unwrap_err();
    assert_eq!(
        err,
        SvidError::Expired {
            position: ChainPosition(0),
            not_after: issued.not_after
        }
    );
    assert_eq!(err.reason(), "expired");
    let message = err.to_string();
    assert!(
        message.starts_with("leaf certificate expired at 20"),
        "{message}"
    );
    assert!(message.ends_with('Z'), "{message}");
    assert_eq!(
        message.len(),
        "leaf certificate expired at 2026-11-24T07:00:00Z".len(),
        "{message}"
    );
}

#[test]
fn leaf_not_yet_valid_is_refused_as_such() {
    let pki = Pki::new(TD);
    let service = SpiffeId::service(&td(TD), "shop", "web").unwrap();
    let (_, issued) = pki.ca.issue_local(&service, HOUR, None).unwrap();
    let earlier = SystemTime::now() - DAY;
    let err = verify_svid(&issued.chain, &pki.bundle, earlier, Usage::Any).unwrap_err();
    assert!(
        matches!(
            err,
            SvidError::NotYetValid {
                position: ChainPosition(0),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("leaf certificate is not valid before "),
        "{err}"
    );
}

#[test]
fn expired_intermediate_is_named() {
    let pki = Pki::new(TD);
    let (int_der, int_issuer) = sub_ca("Weft short-lived", &pki.root().issuer, |p| {
        p.not_after = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    });
    let der = leaf("spiffe://example.org/workload-1", &int_issuer, |_| {});
    let err = verify_svid(
        &[der, int_der],
        &pki.bundle,
        SystemTime::now() + 3 * HOUR,
        Usage::Any,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            SvidError::Expired {
                position: ChainPosition(1),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("intermediate 1 certificate expired at "),
        "{err}"
    );
}

#[test]
fn leaf_of_another_trust_domain_signed_by_our_ca_is_refused() {
    let pki = Pki::new(TD);
    let der = leaf(
        "spiffe://other.org/ns/shop/sa/web",
        &pki.intermediate().issuer,
        |_| {},
    );
    let err = refused(&[der, pki.ca.certificate().clone()], &pki.bundle);
    assert_eq!(
        err,
        SvidError::ForeignTrustDomain {
            leaf: td("other.org"),
            bundle: td(TD)
        }
    );
    assert_eq!(
        err.to_string(),
        "leaf is in trust domain other.org but the bundle is for example.org"
    );
}

#[test]
fn leaf_of_another_trust_domain_is_refused_by_our_bundle_even_with_its_own_chain() {
    let ours = Pki::new(TD);
    let theirs = Pki::new("other.org");
    let (_, issued) = theirs
        .ca
        .issue_local(
            &SpiffeId::service(&td("other.org"), "shop", "web").unwrap(),
            HOUR,
            None,
        )
        .unwrap();
    assert!(verify(&issued.chain, &theirs.bundle).is_ok());
    assert_eq!(
        refused(&issued.chain, &ours.bundle).reason(),
        "foreign_trust_domain"
    );
}

#[test]
fn chain_of_another_root_of_the_same_trust_domain_is_refused() {
    let ours = Pki::new(TD);
    let rogue = Pki::new(TD);
    let (_, issued) = rogue
        .ca
        .issue_local(
            &SpiffeId::service(&td(TD), "shop", "web").unwrap(),
            HOUR,
            None,
        )
        .unwrap();
    let err = refused(&issued.chain, &ours.bundle);
    assert_eq!(err, SvidError::Untrusted("UnknownIssuer".into()));
    assert_eq!(
        err.to_string(),
        "chain does not lead to a root of the bundle (UnknownIssuer)"
    );
}

#[test]
fn chain_signed_by_a_foreign_root_with_the_same_subject_is_refused() {
    let pki = Pki::new(TD);
    let root_der = pki.root_der();
    let (_, root) = X509Certificate::from_der(root_der.as_ref()).unwrap();
    let cn = root
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();

    // A look-alike root: same subject, its own key.
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Weft");
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(pki::random_serial());
    let fake_root_der = params.self_signed(&key).unwrap().der().clone();
    let (_, fake_root) = X509Certificate::from_der(fake_root_der.as_ref()).unwrap();
    assert_eq!(
        fake_root.subject().as_raw(),
        root.subject().as_raw(),
        "the subjects must match byte for byte"
    );
    let fake_root = Issuer::new(params, key);

    // Leaf directly under it, and leaf under a look-alike of our intermediate.
    let der = leaf("spiffe://example.org/workload-1", &fake_root, |_| {});
    let err = refused(&[der], &pki.bundle);
    assert_eq!(err.reason(), "untrusted", "{err:?}");
    assert!(
        err.to_string()
            .starts_with("chain does not lead to a root of the bundle ("),
        "{err}"
    );

    let (int_der, int_issuer) = sub_ca("Weft CA look-alike", &fake_root, |_| {});
    let der = leaf("spiffe://example.org/workload-1", &int_issuer, |_| {});
    assert_eq!(refused(&[der, int_der], &pki.bundle).reason(), "untrusted");
}

#[test]
fn our_intermediate_cannot_sign_sub_cas_past_its_path_length() {
    let pki = Pki::new(TD);
    let (sub_der, sub_issuer) = sub_ca("Weft sub-CA", &pki.intermediate().issuer, |_| {});
    let der = leaf("spiffe://example.org/workload-1", &sub_issuer, |_| {});
    let err = refused(&[der, sub_der, pki.ca.certificate().clone()], &pki.bundle);
    assert_eq!(
        err,
        SvidError::PathValidation("PathLenConstraintViolated".into())
    );
}

#[test]
fn leaf_eku_must_allow_the_requested_usage() {
    let pki = Pki::new(TD);
    let issuer = pki.intermediate().issuer;
    let ca = pki.ca.certificate().clone();
    let client_only = leaf("spiffe://example.org/operator/alice", &issuer, |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    });
    let chain = [client_only, ca.clone()];
    let now = SystemTime::now();
    assert!(verify_svid(&chain, &pki.bundle, now, Usage::Client).is_ok());
    assert!(verify_svid(&chain, &pki.bundle, now, Usage::Any).is_ok());
    let err = verify_svid(&chain, &pki.bundle, now, Usage::Server).unwrap_err();
    assert_eq!(err, SvidError::WrongUsage(Usage::Server));
    assert_eq!(
        err.to_string(),
        "leaf extendedKeyUsage does not allow serverAuth"
    );

    let code_signing = leaf("spiffe://example.org/workload-1", &issuer, |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    });
    let chain = [code_signing, ca.clone()];
    for usage in [Usage::Client, Usage::Server, Usage::Any] {
        assert_eq!(
            verify_svid(&chain, &pki.bundle, now, usage),
            Err(SvidError::WrongUsage(usage))
        );
    }

    // No EKU extension at all means any use (RFC 5280 §4.2.1.12).
    let no_eku = leaf("spiffe://example.org/workload-1", &issuer, |p| {
        p.extended_key_usages.clear();
    });
    let chain = [no_eku, ca];
    for usage in [Usage::Client, Usage::Server, Usage::Any] {
        assert!(verify_svid(&chain, &pki.bundle, now, usage).is_ok());
    }
}

#[test]
fn a_certificate_that_does_not_parse_is_named() {
    let pki = Pki::new(TD);
    let (_, issued) = pki
        .ca
        .issue_local(
            &SpiffeId::service(&td(TD), "shop", "web").unwrap(),
            HOUR,
            None,
        )
        .unwrap();
    let mut broken = issued.chain[1].to_vec();
    broken[0] = 0x27; // as go-spiffe's TestParseAndVerify does
    let err = refused(
        &[issued.chain[0].clone(), CertificateDer::from(broken)],
        &pki.bundle,
    );
    assert!(
        matches!(
            err,
            SvidError::BadCertificate {
                position: ChainPosition(1),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        refused(
            &[CertificateDer::from(b"not-DER-encoded".to_vec())],
            &pki.bundle
        )
        .to_string()
        .starts_with("leaf certificate does not parse")
    );
}

#[test]
fn every_refusal_has_a_snake_case_reason() {
    let pki = Pki::new(TD);
    let err = refused(&[], &pki.bundle);
    for reason in [
        err.reason(),
        SvidError::WrongUsage(Usage::Any).reason(),
        SvidError::IntermediateNotCa(1).reason(),
    ] {
        assert!(
            reason.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{reason}"
        );
    }
}

// ---- PEM chains (`weft certs verify FILE`) ----

#[test]
fn pem_chain_parses_leaf_first_and_skips_keys() {
    let pki = Pki::new(TD);
    let (key, issued) = pki
        .ca
        .issue_local(
            &SpiffeId::service(&td(TD), "shop", "web").unwrap(),
            HOUR,
            None,
        )
        .unwrap();
    let pem: String = issued.chain.iter().map(pem_certificate).collect();
    let chain = parse_chain_pem(pem.as_bytes()).unwrap();
    assert_eq!(chain, issued.chain);
    // go-spiffe's "key and certificate in the same byte array".
    let with_key = format!("{}{pem}", key.serialize_pem());
    assert_eq!(parse_chain_pem(with_key.as_bytes()).unwrap(), issued.chain);
    assert!(verify(&chain, &pki.bundle).is_ok());
}

#[test]
fn text_that_is_not_a_pem_chain_is_refused() {
    for input in [
        &b"not-pem"[..],
        b"",
        b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    ] {
        let err = parse_chain_pem(input).unwrap_err();
        assert_eq!(err.reason(), "bad_pem", "{input:?}: {err}");
    }
}

// ---- OpenSSL agrees that what we issue is valid ----

fn openssl() -> &'static str {
    let path = "/usr/bin/openssl";
    assert!(
        Path::new(path).exists(),
        "openssl is required for this test: install it (apt-get install openssl)"
    );
    path
}

fn openssl_verify(
    dir: &Path,
    purpose: &str,
    root: &Path,
    untrusted: Option<&Path>,
    leaf: &Path,
) -> (bool, String) {
    let mut cmd = Command::new(openssl());
    cmd.current_dir(dir)
        .args(["verify", "-purpose", purpose, "-CAfile"])
        .arg(root);
    if let Some(untrusted) = untrusted {
        cmd.arg("-untrusted").arg(untrusted);
    }
    let out = cmd.arg(leaf).output().expect("run openssl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn write_pem(dir: &Path, name: &str, der: &CertificateDer<'_>) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem_certificate(der)).unwrap();
    path
}

#[test]
fn openssl_accepts_issued_svids_for_client_and_server_use() {
    let pki = Pki::new(TD);
    let work = tempfile::tempdir().unwrap();
    let root = pki.root_dir.join(ROOT_CERT);
    let ca = pki.ca_dir.join(CA_CERT);
    let scope = NodeScope::new(["shop/web".to_string()]);
    let node = SpiffeId::node(&td(TD), "host-1").unwrap();
    let service = SpiffeId::service(&td(TD), "shop", "web").unwrap();
    let (_, node_svid) = pki.ca.issue_local(&node, HOUR, Some(&scope)).unwrap();
    let (_, service_svid) = pki.ca.issue_local(&service, HOUR, None).unwrap();
    for (name, svid) in [("node.pem", node_svid), ("service.pem", service_svid)] {
        let leaf = write_pem(work.path(), name, &svid.chain[0]);
        for purpose in ["sslclient", "sslserver"] {
            let (ok, text) = openssl_verify(work.path(), purpose, &root, Some(&ca), &leaf);
            assert!(
                ok,
                "openssl verify -purpose {purpose} refused {name}: {text}"
            );
            assert!(verify_svid(&svid.chain, &pki.bundle, SystemTime::now(), Usage::Any).is_ok());
        }
    }
    // The operator credential from `weft ca init` is a client certificate.
    let (ok, text) = openssl_verify(
        work.path(),
        "sslclient",
        &root,
        None,
        &pki.root_dir.join(OPERATOR_CERT),
    );
    assert!(ok, "openssl refused operator.pem: {text}");
}

#[test]
fn openssl_and_verify_svid_both_refuse_a_chain_of_another_root() {
    let ours = Pki::new(TD);
    let rogue = Pki::new(TD);
    let work = tempfile::tempdir().unwrap();
    let (_, svid) = rogue
        .ca
        .issue_local(
            &SpiffeId::service(&td(TD), "shop", "web").unwrap(),
            HOUR,
            None,
        )
        .unwrap();
    let leaf = write_pem(work.path(), "leaf.pem", &svid.chain[0]);
    let untrusted = write_pem(work.path(), "ca.pem", &svid.chain[1]);
    let (ok, text) = openssl_verify(
        work.path(),
        "sslclient",
        &ours.root_dir.join(ROOT_CERT),
        Some(&untrusted),
        &leaf,
    );
    assert!(!ok, "openssl accepted a chain of another root: {text}");
    assert_eq!(refused(&svid.chain, &ours.bundle).reason(), "untrusted");
}

// ---- revocations ----

fn revoked(bundle: &TrustBundle, kind: RevokedKind, value: &str, at: SystemTime) -> TrustBundle {
    let entry = Revocation {
        kind,
        value: value.into(),
        at: weft_ca::verify::unix_secs(at),
        reason: "test".into(),
    };
    let list = Revocations::new(vec![entry], bundle.trust_domain()).unwrap();
    bundle.with_revocations(std::sync::Arc::new(list))
}

#[test]
fn revoked_nodes_ids_and_serials_are_refused_and_new_identities_are_not() {
    let pki = Pki::new(TD);
    let node = SpiffeId::node(&td(TD), "web-1").unwrap();
    let (_, issued) = pki.ca.issue_local(&node, HOUR, None).unwrap();
    let now = SystemTime::now();

    let by_node = revoked(&pki.bundle, RevokedKind::Node, "web-1", now);
    let err = refused(&issued.chain, &by_node);
    assert_eq!(err.reason(), "revoked");
    assert!(
        err.to_string()
            .contains("leaf certificate is revoked: node web-1 (test)"),
        "{err}"
    );
    // A certificate minted after the revocation is a new identity.
    let earlier = revoked(&pki.bundle, RevokedKind::Node, "web-1", now - DAY);
    verify(&issued.chain, &earlier).unwrap();

    let by_id = revoked(&pki.bundle, RevokedKind::Id, &node.to_string(), now);
    assert_eq!(refused(&issued.chain, &by_id).reason(), "revoked");

    let serial = verify(&issued.chain, &pki.bundle).unwrap().serial_hex;
    let stored = weft_ca::revocation::normalise(RevokedKind::Serial, &serial, &td(TD)).unwrap();
    let by_serial = revoked(&pki.bundle, RevokedKind::Serial, &stored, now - DAY);
    assert_eq!(refused(&issued.chain, &by_serial).reason(), "revoked");

    // Revoking the CA host's intermediate cuts off everything it signed.
    let (_, intermediate) = X509Certificate::from_der(issued.chain[1].as_ref()).unwrap();
    let ca_serial: String = intermediate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let stored = weft_ca::revocation::normalise(RevokedKind::Serial, &ca_serial, &td(TD)).unwrap();
    let by_ca = revoked(&pki.bundle, RevokedKind::Serial, &stored, now);
    let err = refused(&issued.chain, &by_ca);
    assert!(err.to_string().starts_with("intermediate"), "{err}");

    // Other identities are untouched.
    let other = SpiffeId::node(&td(TD), "web-2").unwrap();
    let (_, fine) = pki.ca.issue_local(&other, HOUR, None).unwrap();
    verify(&fine.chain, &by_node).unwrap();
}
