//! `weft ca init` / `weft ca intermediate` material and SVID issuance from CSRs: file names and
//! modes, the X.509-SVID profile of what we issue, and every refusal.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use weft_ca::pki::{self, CA_CERT, CA_KEY, OPERATOR_CERT, OPERATOR_KEY, ROOT_CERT, ROOT_KEY};
use weft_ca::{CertificateAuthority, IssueError, NodeScope, SpiffeId, TrustBundle, TrustDomain};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

/// A root and one intermediate in `dir`, loaded as a CA.
fn authority(dir: &Path, trust_domain: &str) -> (CertificateAuthority, TrustBundle) {
    let td = td(trust_domain);
    let out = pki::init(&td, "alice", &dir.join("root")).unwrap();
    pki::intermediate(&td, &dir.join("root"), "ca-1", &dir.join("ca-1")).unwrap();
    let ca = CertificateAuthority::load(
        &dir.join("ca-1").join(CA_CERT),
        &dir.join("ca-1").join(CA_KEY),
        &out.bundle,
    )
    .unwrap();
    (ca, out.bundle)
}

fn csr_for(uris: &[&str], is_ca: bool) -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    if is_ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    let der = params.serialize_request(&key).unwrap().der().to_vec();
    (key, der)
}

#[test]
fn init_writes_the_fixed_files_with_private_keys_0600() {
    let dir = tempfile::tempdir().unwrap();
    let out = pki::init(&td("prod.example.com"), "alice", dir.path()).unwrap();
    assert_eq!(
        out.operator.to_string(),
        "spiffe://prod.example.com/operator/alice"
    );
    for (file, mode) in [
        (ROOT_KEY, 0o600),
        (OPERATOR_KEY, 0o600),
        (ROOT_CERT, 0o644),
        (OPERATOR_CERT, 0o644),
        ("bundle.json", 0o644),
    ] {
        let meta =
            std::fs::metadata(dir.path().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
    }
    // Re-running into the same directory never overwrites key material.
    let again = pki::init(&td("prod.example.com"), "alice", dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(again.contains("already exists"), "{again}");
    // The bundle JSON parses back into the same root.
    let json = std::fs::read_to_string(dir.path().join("bundle.json")).unwrap();
    let parsed = TrustBundle::from_spiffe_json(td("prod.example.com"), &json).unwrap();
    assert_eq!(parsed.roots(), out.bundle.roots());
    let pem = std::fs::read(dir.path().join(ROOT_CERT)).unwrap();
    assert_eq!(
        TrustBundle::from_pem(td("prod.example.com"), &pem)
            .unwrap()
            .roots(),
        out.bundle.roots()
    );
    // The JSON form is not a PEM trust bundle: the error names the file and what is expected.
    let wrong = dir.path().join("bundle.json");
    let refused = TrustBundle::load_pem(td("prod.example.com"), &wrong)
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains(&wrong.display().to_string()) && refused.contains("expected PEM"),
        "{refused}"
    );
}

#[test]
fn root_and_intermediate_are_cas_with_unique_subjects() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, bundle) = authority(dir.path(), "example.org");
    let (_, root) = X509Certificate::from_der(bundle.roots()[0].as_ref()).unwrap();
    let (_, inter) = X509Certificate::from_der(ca.certificate().as_ref()).unwrap();
    assert!(root.is_ca() && inter.is_ca());
    assert!(inter.key_usage().unwrap().unwrap().value.key_cert_sign());
    assert_eq!(inter.issuer(), root.subject());
    assert_ne!(inter.subject(), root.subject());
    // Two roots of the same trust domain never share a subject.
    let other = pki::init(&td("example.org"), "bob", &dir.path().join("other")).unwrap();
    let (_, other_root) = X509Certificate::from_der(other.bundle.roots()[0].as_ref()).unwrap();
    assert_ne!(other_root.subject(), root.subject());
    let days =
        (root.validity().not_after.timestamp() - root.validity().not_before.timestamp()) / 86_400;
    assert!((3600..=3660).contains(&days), "root lifetime {days} days");
}

#[test]
fn issued_service_svid_follows_the_profile() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = authority(dir.path(), "example.org");
    let id = SpiffeId::service(&td("example.org"), "default", "api").unwrap();
    let (_, csr) = csr_for(&["spiffe://example.org/ns/default/sa/api"], false);
    let svid = ca
        .issue(&csr, &id, Duration::from_secs(3600), None)
        .unwrap();
    assert_eq!(svid.chain.len(), 2, "leaf and intermediate, never the root");
    assert_eq!(svid.chain[1], *ca.certificate());
    let (_, leaf) = X509Certificate::from_der(svid.chain[0].as_ref()).unwrap();
    let uris: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| {
            if let GeneralName::URI(u) = n {
                Some(u.to_string())
            } else {
                None
            }
        })
        .collect();
    assert_eq!(uris, ["spiffe://example.org/ns/default/sa/api"]);
    assert!(!leaf.is_ca());
    let key_usage = leaf.key_usage().unwrap().unwrap();
    assert!(key_usage.critical, "keyUsage must be critical");
    assert!(
        key_usage.value.digital_signature()
            && !key_usage.value.key_cert_sign()
            && !key_usage.value.crl_sign()
    );
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert!(
        (3600..=3600 + 301).contains(&lifetime),
        "lifetime {lifetime}s"
    );
    assert!(leaf.raw_serial().len() >= 16, "random serial");
    let has_aki = leaf.extensions().iter().any(|e| {
        matches!(
            e.parsed_extension(),
            ParsedExtension::AuthorityKeyIdentifier(_)
        )
    });
    assert!(has_aki);
    // Two issuances for the same key get different serials.
    let again = ca
        .issue(&csr, &id, Duration::from_secs(3600), None)
        .unwrap();
    let (_, leaf2) = X509Certificate::from_der(again.chain[0].as_ref()).unwrap();
    assert_ne!(leaf.raw_serial(), leaf2.raw_serial());
}

#[test]
fn node_svid_carries_its_scope() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = authority(dir.path(), "example.org");
    let id = SpiffeId::node(&td("example.org"), "web-1").unwrap();
    let scope = NodeScope::new(["default/api".to_string(), "shop/web".to_string()]);
    let (_, svid) = ca
        .issue_local(&id, Duration::from_secs(30 * 86_400), Some(&scope))
        .unwrap();
    let (_, leaf) = X509Certificate::from_der(svid.chain[0].as_ref()).unwrap();
    let oid = weft_ca::scope::node_scope_oid_string();
    let ext = leaf
        .extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == oid)
        .expect("scope extension");
    assert!(!ext.critical);
    assert_eq!(NodeScope::from_der(ext.value), Some(scope));
}

#[test]
fn svid_lifetime_is_capped_at_the_intermediate_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = authority(dir.path(), "example.org");
    let id = SpiffeId::node(&td("example.org"), "n").unwrap();
    let (_, svid) = ca
        .issue_local(&id, Duration::from_secs(10 * 365 * 86_400), None)
        .unwrap();
    assert!(svid.not_after <= ca.not_after());
    assert!(svid.not_after > SystemTime::now() + Duration::from_secs(300 * 86_400));
}

#[test]
fn refusals_name_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = authority(dir.path(), "example.org");
    let api = SpiffeId::service(&td("example.org"), "default", "api").unwrap();
    let hour = Duration::from_secs(3600);

    let (_, csr) = csr_for(&["spiffe://example.org/ns/default/sa/api"], true);
    let err = ca.issue(&csr, &api, hour, None).unwrap_err();
    assert_eq!(
        (err.reason(), err.clone()),
        ("csr_requests_ca", IssueError::CsrRequestsCa)
    );

    let (_, csr) = csr_for(&["spiffe://other.org/ns/default/sa/api"], false);
    let err = ca.issue(&csr, &api, hour, None).unwrap_err();
    assert_eq!(err.reason(), "foreign_trust_domain", "{err}");
    assert!(err.to_string().contains("other.org"), "{err}");

    let (_, csr) = csr_for(&["spiffe://example.org/ns/default/sa/admin"], false);
    let err = ca.issue(&csr, &api, hour, None).unwrap_err();
    assert_eq!(err.reason(), "wrong_id", "{err}");

    let (_, csr) = csr_for(
        &[
            "spiffe://example.org/ns/default/sa/api",
            "spiffe://example.org/ns/default/sa/db",
        ],
        false,
    );
    assert_eq!(
        ca.issue(&csr, &api, hour, None).unwrap_err().reason(),
        "wrong_id"
    );

    let (_, mut csr) = csr_for(&["spiffe://example.org/ns/default/sa/api"], false);
    let last = csr.len() - 1;
    csr[last] ^= 0x55; // break the signature
    assert_eq!(
        ca.issue(&csr, &api, hour, None).unwrap_err().reason(),
        "bad_csr"
    );
    assert_eq!(
        ca.issue(b"not a csr", &api, hour, None)
            .unwrap_err()
            .reason(),
        "bad_csr"
    );

    let foreign = SpiffeId::service(&td("other.org"), "default", "api").unwrap();
    let (_, csr) = csr_for(&["spiffe://other.org/ns/default/sa/api"], false);
    assert_eq!(
        ca.issue(&csr, &foreign, hour, None).unwrap_err().reason(),
        "foreign_trust_domain"
    );
}

#[test]
fn a_csr_cannot_smuggle_in_extra_rights() {
    // Whatever key usages or EKUs a CSR asks for, the leaf gets the SVID profile.
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = authority(dir.path(), "example.org");
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        "spiffe://example.org/ns/default/sa/api".try_into().unwrap(),
    )];
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    let id = SpiffeId::service(&td("example.org"), "default", "api").unwrap();
    let svid = ca.issue(&csr, &id, Duration::from_secs(60), None).unwrap();
    let (_, leaf) = X509Certificate::from_der(svid.chain[0].as_ref()).unwrap();
    let usage = leaf.key_usage().unwrap().unwrap().value;
    assert!(!usage.key_cert_sign() && !usage.crl_sign() && usage.digital_signature());
}

#[test]
fn a_ca_refuses_to_load_an_intermediate_of_another_root() {
    let dir = tempfile::tempdir().unwrap();
    let td = td("example.org");
    let mine = pki::init(&td, "alice", &dir.path().join("mine")).unwrap();
    pki::init(&td, "mallory", &dir.path().join("theirs")).unwrap();
    pki::intermediate(
        &td,
        &dir.path().join("theirs"),
        "ca-x",
        &dir.path().join("ca-x"),
    )
    .unwrap();
    let err = CertificateAuthority::load(
        &dir.path().join("ca-x").join(CA_CERT),
        &dir.path().join("ca-x").join(CA_KEY),
        &mine.bundle,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("not signed by any root"), "{err}");
}
