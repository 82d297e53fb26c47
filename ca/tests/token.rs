//! Join tokens: created with the operator credential of `weft ca init`, verified with
//! nothing but the trust bundle, and refused with a named reason when expired, tampered,
//! forged, signed by someone who is not an operator of this trust domain, or not a token.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::{Rng, RngCore};
use rcgen::{ExtendedKeyUsagePurpose, KeyPair};
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, UnparsedPublicKey,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use weft_ca::OperatorCredential;
use weft_ca::bundle::pem_certificate;
use weft_ca::pki::{
    self, CA_CERT, CA_KEY, OPERATOR_CERT, OPERATOR_KEY, ROOT_CERT, ROOT_KEY, SigningCa,
};
use weft_ca::token::{self, MAX_TOKEN_LEN, TokenError};
use weft_ca::verify::SvidError;
use weft_ca::{CertificateAuthority, SpiffeId, TrustBundle, TrustDomain};
use x509_parser::prelude::{FromDer, X509Certificate};

const TD: &str = "example.org";
const HOUR: Duration = Duration::from_secs(3600);

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

struct Pki {
    _dir: tempfile::TempDir,
    root_dir: PathBuf,
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
            bundle: out.bundle,
            ca,
        }
    }

    fn operator(&self) -> OperatorCredential {
        OperatorCredential::load(&self.root_dir).unwrap()
    }

    fn operator_cert_der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(self.root_dir.join(OPERATOR_CERT)).unwrap()
    }

    fn operator_key_pem(&self) -> String {
        std::fs::read_to_string(self.root_dir.join(OPERATOR_KEY)).unwrap()
    }

    fn token(&self, node: &str, services: &[&str], ttl: Duration) -> String {
        let services: Vec<String> = services.iter().map(|s| s.to_string()).collect();
        self.operator().create_token(node, &services, ttl).unwrap()
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Assembles a token from any payload, certificate and key, as a forger would.
fn sign_token(payload_json: &str, cert: &[u8], key_pem: &str) -> String {
    let signed = format!(
        "weft1.{}.{}",
        URL_SAFE_NO_PAD.encode(payload_json),
        URL_SAFE_NO_PAD.encode(cert)
    );
    let PrivateKeyDer::Pkcs8(pkcs8) = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap()
    else {
        panic!("not PKCS#8");
    };
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8.secret_pkcs8_der(),
        &rng,
    )
    .unwrap();
    let signature = key.sign(&rng, signed.as_bytes()).unwrap();
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
}

fn payload(td: &str, node: &str, iat: i64, exp: i64) -> String {
    serde_json::json!({
        "id": "00112233445566778899aabbccddeeff",
        "td": td,
        "node": node,
        "services": ["shop/web"],
        "iat": iat,
        "exp": exp,
    })
    .to_string()
}

fn refused(token: &str, bundle: &TrustBundle) -> TokenError {
    refused_at(token, bundle, SystemTime::now())
}

fn refused_at(token: &str, bundle: &TrustBundle, now: SystemTime) -> TokenError {
    match token::verify(token, bundle, now) {
        Ok(t) => panic!("token {} for {} was accepted", t.id, t.node),
        Err(e) => e,
    }
}

// ---- accepted ----

#[test]
fn created_token_verifies_with_its_node_services_and_operator() {
    let pki = Pki::new(TD);
    let text = pki.token("host-1", &["shop/web", "default/api", "shop/web"], HOUR);
    let token = token::verify(&text, &pki.bundle, SystemTime::now()).unwrap();
    assert_eq!(token.trust_domain, td(TD));
    assert_eq!(token.node, "host-1");
    assert_eq!(token.services, ["default/api", "shop/web"]);
    assert_eq!(
        token.operator.to_string(),
        "spiffe://example.org/operator/alice"
    );
    assert_eq!(
        token.expires_at.duration_since(token.issued_at).unwrap(),
        HOUR
    );
    assert_eq!(token.id.len(), 32);
    assert!(
        token
            .id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert_eq!(
        token.node_id().to_string(),
        "spiffe://example.org/node/host-1"
    );
    assert!(token.scope().allows("shop", "web"));
    assert!(!token.scope().allows("shop", "api"));

    let again = token::verify(
        &pki.token("host-1", &[], HOUR),
        &pki.bundle,
        SystemTime::now(),
    )
    .unwrap();
    assert_ne!(again.id, token.id, "every token has its own random id");
    assert!(again.services.is_empty());
}

#[test]
fn token_text_has_the_documented_format() {
    let pki = Pki::new(TD);
    let text = pki.token("host-1", &["shop/web"], HOUR);
    let parts: Vec<&str> = text.split('.').collect();
    assert_eq!(parts.len(), 4);
    assert_eq!(parts[0], "weft1");
    let json: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    let mut keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(keys, ["exp", "iat", "id", "node", "services", "td"]);
    assert_eq!(json["td"], TD);
    assert_eq!(
        json["exp"].as_i64().unwrap() - json["iat"].as_i64().unwrap(),
        3600
    );
    let cert = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    assert_eq!(cert, pki.operator_cert_der().as_ref());

    // An ECDSA P-256 SHA-256 ASN.1 signature over "weft1.<payload>.<cert>", by the cert's key.
    let (_, parsed) = X509Certificate::from_der(&cert).unwrap();
    let public = parsed.public_key().subject_public_key.data.to_vec();
    let signed = format!("{}.{}.{}", parts[0], parts[1], parts[2]);
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, public)
        .verify(
            signed.as_bytes(),
            &URL_SAFE_NO_PAD.decode(parts[3]).unwrap(),
        )
        .expect("signature verifies with ring directly");
}

#[test]
fn surrounding_whitespace_is_ignored() {
    let pki = Pki::new(TD);
    let text = pki.token("host-1", &[], HOUR);
    assert!(token::verify(&format!("  {text}\n"), &pki.bundle, SystemTime::now()).is_ok());
}

// ---- refused ----

#[test]
fn expired_token_is_refused_with_its_expiry() {
    let pki = Pki::new(TD);
    let text = pki.token("host-1", &[], HOUR);
    let good = token::verify(&text, &pki.bundle, SystemTime::now()).unwrap();
    let err = refused_at(&text, &pki.bundle, SystemTime::now() + 2 * HOUR);
    assert_eq!(err, TokenError::Expired(good.expires_at));
    assert_eq!(err.reason(), "expired");
    let message = err.to_string();
    assert!(
        message.starts_with("token expired at 20") && message.ends_with('Z'),
        "{message}"
    );
    assert_eq!(
        message.len(),
        "token expired at 2026-11-24T07:00:00Z".len(),
        "{message}"
    );
    // The expiry second itself is already too late.
    assert_eq!(
        refused_at(&text, &pki.bundle, good.expires_at).reason(),
        "expired"
    );
}

#[test]
fn token_issued_in_the_future_is_refused_beyond_five_minutes_of_skew() {
    let pki = Pki::new(TD);
    let now = unix_now();
    let cert = pki.operator_cert_der();
    let key = pki.operator_key_pem();
    let future = sign_token(&payload(TD, "host-1", now + 3600, now + 7200), &cert, &key);
    assert_eq!(refused(&future, &pki.bundle).reason(), "not_yet_valid");
    let skewed = sign_token(&payload(TD, "host-1", now + 240, now + 3600), &cert, &key);
    assert!(token::verify(&skewed, &pki.bundle, SystemTime::now()).is_ok());
}

#[test]
fn tampered_payload_is_refused() {
    let pki = Pki::new(TD);
    let text = pki.token("host-1", &["shop/web"], HOUR);
    let parts: Vec<&str> = text.split('.').collect();

    // Widen the scope in the JSON and re-encode it.
    let json = String::from_utf8(URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    let widened = json.replace("\"shop/web\"", "\"shop/web\",\"shop/admin\"");
    assert_ne!(widened, json);
    let tampered = format!(
        "weft1.{}.{}.{}",
        URL_SAFE_NO_PAD.encode(widened),
        parts[2],
        parts[3]
    );
    let err = refused(&tampered, &pki.bundle);
    assert_eq!(err, TokenError::BadSignature);
    assert_eq!(err.to_string(), "token signature does not verify");

    // Flip single characters inside the payload text.
    for position in [7, 10, 20, parts[1].len()] {
        let mut bytes = text.clone().into_bytes();
        bytes[position] = if bytes[position] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(bytes).unwrap();
        let err = refused(&flipped, &pki.bundle);
        assert!(
            matches!(err.reason(), "bad_signature" | "malformed"),
            "{position}: {err}"
        );
    }

    // And in the signature.
    let mut sig = URL_SAFE_NO_PAD.decode(parts[3]).unwrap();
    let last = sig.len() - 1;
    sig[last] ^= 0x01;
    let tampered = format!(
        "weft1.{}.{}.{}",
        parts[1],
        parts[2],
        URL_SAFE_NO_PAD.encode(sig)
    );
    assert_eq!(refused(&tampered, &pki.bundle), TokenError::BadSignature);
}

#[test]
fn token_signed_with_another_key_but_carrying_the_operator_cert_is_refused() {
    let pki = Pki::new(TD);
    let now = unix_now();
    let other_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let forged = sign_token(
        &payload(TD, "host-1", now, now + 3600),
        &pki.operator_cert_der(),
        &other_key.serialize_pem(),
    );
    assert_eq!(refused(&forged, &pki.bundle), TokenError::BadSignature);
    // The same payload with the real key is fine, so only the key made the difference.
    let real = sign_token(
        &payload(TD, "host-1", now, now + 3600),
        &pki.operator_cert_der(),
        &pki.operator_key_pem(),
    );
    assert!(token::verify(&real, &pki.bundle, SystemTime::now()).is_ok());
}

#[test]
fn create_refuses_a_key_that_is_not_the_operators() {
    let pki = Pki::new(TD);
    let other_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = std::fs::read(pki.root_dir.join(OPERATOR_CERT)).unwrap();
    let err = token::create(
        &cert,
        other_key.serialize_pem().as_bytes(),
        "host-1",
        &[],
        HOUR,
    )
    .unwrap_err();
    assert_eq!(err.reason(), "bad_credential", "{err}");
    let err = token::create(
        b"garbage",
        pki.operator_key_pem().as_bytes(),
        "host-1",
        &[],
        HOUR,
    )
    .unwrap_err();
    assert_eq!(err.reason(), "bad_credential", "{err}");
    let err = token::create(&cert, b"garbage", "host-1", &[], HOUR).unwrap_err();
    assert_eq!(err.reason(), "bad_credential", "{err}");
}

#[test]
fn operator_of_another_trust_domain_is_untrusted() {
    let ours = Pki::new(TD);
    let theirs = Pki::new("other.org");
    let text = theirs.token("host-1", &[], HOUR);
    assert!(token::verify(&text, &theirs.bundle, SystemTime::now()).is_ok());
    let err = refused(&text, &ours.bundle);
    assert_eq!(
        err,
        TokenError::UntrustedOperator(SvidError::ForeignTrustDomain {
            leaf: td("other.org"),
            bundle: td(TD)
        })
    );
    assert_eq!(err.reason(), "untrusted_operator");
    assert!(
        err.to_string()
            .contains("leaf is in trust domain other.org but the bundle is for example.org"),
        "{err}"
    );
}

#[test]
fn operator_of_another_root_of_the_same_trust_domain_is_untrusted() {
    let ours = Pki::new(TD);
    let rogue = Pki::new(TD);
    let text = rogue.token("host-1", &["shop/web"], HOUR);
    let err = refused(&text, &ours.bundle);
    assert_eq!(
        err,
        TokenError::UntrustedOperator(SvidError::Untrusted("UnknownIssuer".into()))
    );
    assert_eq!(err.reason(), "untrusted_operator");
}

#[test]
fn operator_credential_past_its_expiry_is_untrusted() {
    let pki = Pki::new(TD);
    let text = pki.token("host-1", &[], HOUR);
    let err = refused_at(&text, &pki.bundle, SystemTime::now() + 400 * 24 * HOUR);
    assert!(
        matches!(
            err,
            TokenError::UntrustedOperator(SvidError::Expired { .. })
        ),
        "{err:?}"
    );
}

#[test]
fn node_svid_signed_by_the_root_is_not_an_operator() {
    let pki = Pki::new(TD);
    let root =
        SigningCa::load(&pki.root_dir.join(ROOT_CERT), &pki.root_dir.join(ROOT_KEY)).unwrap();
    let node = SpiffeId::node(&td(TD), "host-9").unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = pki::leaf_params(&node, HOUR, vec![ExtendedKeyUsagePurpose::ClientAuth])
        .signed_by(&key, &root.issuer)
        .unwrap();
    let now = unix_now();
    let text = sign_token(
        &payload(TD, "host-1", now, now + 3600),
        cert.der(),
        &key.serialize_pem(),
    );
    let err = refused(&text, &pki.bundle);
    assert_eq!(
        err,
        TokenError::NotOperator("spiffe://example.org/node/host-9".into())
    );
    assert_eq!(err.reason(), "not_operator");

    // `create` refuses to sign with it in the first place.
    let err = token::create(
        pem_certificate(cert.der()).as_bytes(),
        key.serialize_pem().as_bytes(),
        "host-1",
        &[],
        HOUR,
    )
    .unwrap_err();
    assert_eq!(err.reason(), "not_operator");
}

#[test]
fn service_and_node_svids_from_a_ca_host_cannot_sign_tokens() {
    let pki = Pki::new(TD);
    let now = unix_now();
    for id in [
        SpiffeId::service(&td(TD), "shop", "web").unwrap(),
        SpiffeId::node(&td(TD), "host-2").unwrap(),
        // Even an operator ID minted by a CA host: only the offline root makes operators.
        SpiffeId::operator(&td(TD), "mallory").unwrap(),
    ] {
        let (key, svid) = pki.ca.issue_local(&id, HOUR, None).unwrap();
        let text = sign_token(
            &payload(TD, "host-1", now, now + 3600),
            &svid.chain[0],
            &key.serialize_pem(),
        );
        let err = refused(&text, &pki.bundle);
        assert_eq!(
            err,
            TokenError::UntrustedOperator(SvidError::Untrusted("UnknownIssuer".into())),
            "{id}"
        );
    }
}

#[test]
fn token_for_another_trust_domain_is_refused() {
    let pki = Pki::new(TD);
    let now = unix_now();
    let text = sign_token(
        &payload("other.org", "host-1", now, now + 3600),
        &pki.operator_cert_der(),
        &pki.operator_key_pem(),
    );
    let err = refused(&text, &pki.bundle);
    assert_eq!(
        err,
        TokenError::ForeignTrustDomain {
            token: "other.org".into(),
            bundle: td(TD)
        }
    );
    assert_eq!(err.reason(), "foreign_trust_domain");
}

#[test]
fn signed_payloads_with_bad_content_are_refused() {
    let pki = Pki::new(TD);
    let now = unix_now();
    let cert = pki.operator_cert_der();
    let key = pki.operator_key_pem();
    let sign = |json: String| sign_token(&json, &cert, &key);
    let base = |node: &str| payload(TD, node, now, now + 3600);

    assert_eq!(
        refused(&sign(base("a/b")), &pki.bundle).reason(),
        "invalid_scope"
    );
    assert_eq!(
        refused(&sign(base("..")), &pki.bundle).reason(),
        "invalid_scope"
    );
    let bad_service = base("host-1").replace("shop/web", "shop/we b");
    assert_eq!(
        refused(&sign(bad_service), &pki.bundle).reason(),
        "invalid_scope"
    );
    let bad_id = base("host-1").replace("00112233445566778899aabbccddeeff", "XYZ");
    assert_eq!(refused(&sign(bad_id), &pki.bundle).reason(), "malformed");
    let extra = base("host-1").replace("{", "{\"admin\":true,");
    assert_eq!(refused(&sign(extra), &pki.bundle).reason(), "malformed");
    assert_eq!(
        refused(&sign("not json".into()), &pki.bundle).reason(),
        "malformed"
    );
    let too_long = payload(TD, "host-1", now, now + 31 * 86_400);
    assert_eq!(
        refused(&sign(too_long), &pki.bundle).reason(),
        "invalid_ttl"
    );
    let backwards = payload(TD, "host-1", now, now - 10);
    assert_eq!(
        refused(&sign(backwards), &pki.bundle).reason(),
        "invalid_ttl"
    );
}

#[test]
fn garbage_and_truncated_input_is_malformed_and_never_panics() {
    let pki = Pki::new(TD);
    let mut rng = rand::rng();
    let alphabet: Vec<char> =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \n\u{e9}\u{1F600}"
            .chars()
            .collect();
    for i in 0..2000 {
        let len = rng.random_range(0..400);
        let mut text: String = (0..len)
            .map(|_| alphabet[rng.random_range(0..alphabet.len())])
            .collect();
        if i % 2 == 0 {
            text = format!("weft1.{text}");
        }
        if i % 4 == 0 {
            // Four well-formed base64url parts of random bytes.
            let mut part = || {
                let mut bytes = vec![0u8; rng.random_range(0..300)];
                rng.fill_bytes(&mut bytes);
                URL_SAFE_NO_PAD.encode(bytes)
            };
            text = format!("weft1.{}.{}.{}", part(), part(), part());
        }
        let err = refused(&text, &pki.bundle);
        assert_eq!(err.reason(), "malformed", "{text:?}: {err}");
    }

    let text = pki.token("host-1", &["shop/web"], HOUR);
    for cut in 0..text.len() {
        let err = refused(&text[..cut], &pki.bundle);
        assert!(
            matches!(err.reason(), "malformed" | "bad_signature"),
            "cut at {cut}: {err}"
        );
    }
    assert!(token::verify(&text, &pki.bundle, SystemTime::now()).is_ok());
}

#[test]
fn oversized_input_is_refused_before_decoding() {
    let pki = Pki::new(TD);
    let huge = format!("weft1.{}", "A".repeat(MAX_TOKEN_LEN));
    let err = refused(&huge, &pki.bundle);
    assert_eq!(
        err,
        TokenError::TooLarge {
            len: MAX_TOKEN_LEN + 6
        }
    );
    assert_eq!(err.reason(), "too_large");

    // `create` will not make a token that `verify` would refuse for its size.
    let services: Vec<String> = (0..600)
        .map(|i| format!("namespace-{i:04}/service-number-{i:04}"))
        .collect();
    let err = pki
        .operator()
        .create_token("host-1", &services, HOUR)
        .unwrap_err();
    assert_eq!(err.reason(), "invalid_scope", "{err}");
}

#[test]
fn create_validates_names_and_lifetime() {
    let pki = Pki::new(TD);
    let op = pki.operator();
    for node in ["", "a/b", ".", "..", "bad name", "h\u{e9}"] {
        let err = op.create_token(node, &[], HOUR).unwrap_err();
        assert_eq!(err.reason(), "invalid_scope", "{node:?}: {err}");
    }
    for service in ["web", "shop/", "/web", "a/b/c", "shop/we b", "shop/.."] {
        let err = op
            .create_token("host-1", &[service.to_string()], HOUR)
            .unwrap_err();
        assert_eq!(err.reason(), "invalid_scope", "{service:?}: {err}");
    }
    for ttl in [
        Duration::from_secs(59),
        Duration::from_secs(30 * 86_400 + 1),
        Duration::ZERO,
    ] {
        let err = op.create_token("host-1", &[], ttl).unwrap_err();
        assert_eq!(err.reason(), "invalid_ttl", "{ttl:?}: {err}");
    }
    for ttl in [Duration::from_secs(60), Duration::from_secs(30 * 86_400)] {
        let text = op.create_token("host-1", &[], ttl).unwrap();
        assert!(
            token::verify(&text, &pki.bundle, SystemTime::now()).is_ok(),
            "{ttl:?}"
        );
    }
}

#[test]
fn every_refusal_reason_is_snake_case() {
    for err in [
        TokenError::Malformed(String::new()),
        TokenError::BadSignature,
        TokenError::NotOperator(String::new()),
        TokenError::UntrustedOperator(SvidError::EmptyChain),
        TokenError::Expired(SystemTime::UNIX_EPOCH),
        TokenError::TooLarge { len: 0 },
    ] {
        let reason = err.reason();
        assert!(
            reason.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{reason}"
        );
    }
}
