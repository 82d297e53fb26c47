//! rustls configuration for mutual TLS with X.509-SVIDs, shared by the CA protocol and (later)
//! the tunnels.
//!
//! Standard webpki verifiers match DNS names; SPIFFE peers are named by one URI SAN, so both
//! directions use [`verify_svid`] against the trust bundle in force and then check the peer's
//! SPIFFE ID with a caller-given rule. Handshake signatures are checked with ring. Nothing here
//! authorizes a request: that is the caller's job once it knows the verified ID.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::bundle::TrustBundle;
use crate::spiffe::SpiffeId;
use crate::verify::{Usage, VerifiedSvid, verify_svid};

/// ALPN of the CA protocol.
pub const ALPN_CA: &[u8] = b"weft-ca/1";

/// The trust bundle in force, swapped atomically when the operator publishes a new one.
pub type SharedBundle = Arc<ArcSwap<TrustBundle>>;

/// The crypto provider every Weft TLS config uses: ring, with AES-128-GCM as the first choice
/// of TLS 1.3 suites (as BoringSSL and Go order them). It is as safe as AES-256-GCM for
/// 128-bit security, and its 10 rounds instead of 14 make it the cheaper cipher for bulk
/// traffic through the tunnels.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// Errors building TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the configuration or key.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// quinn refused the rustls configuration.
    #[error("QUIC crypto configuration: {0}")]
    Quic(String),
}

/// A certificate chain and its private key, ready for rustls.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let signing_key = provider().key_provider.load_private_key(key)?;
    Ok(Arc::new(CertifiedKey::new(chain, signing_key)))
}

fn time_of(now: UnixTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(now.as_secs())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// Why a peer certificate was rejected, readable in rustls errors (which print the inner error
/// with `{:?}`, so Debug shows the message too).
struct PeerRejected(String);

impl fmt::Debug for PeerRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for PeerRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PeerRejected {}

fn rejected(reason: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(PeerRejected(reason)),
    )))
}

/// Checks the peer's chain as an SVID of the bundle for `usage`.
fn verify_peer(
    bundle: &SharedBundle,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: Usage,
) -> Result<VerifiedSvid, rustls::Error> {
    let mut chain = Vec::with_capacity(intermediates.len() + 1);
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    verify_svid(&chain, &bundle.load(), time_of(now), usage).map_err(|e| rejected(e.to_string()))
}

/// Server side: client certificates are optional at the TLS layer (a joining agent has none
/// yet); when present they must be SVIDs of the bundle. Each request then decides whether it
/// needs one.
pub struct OptionalSvidClientVerifier {
    bundle: SharedBundle,
}

impl OptionalSvidClientVerifier {
    /// A verifier for clients of `bundle`.
    pub fn new(bundle: SharedBundle) -> Arc<Self> {
        Arc::new(OptionalSvidClientVerifier { bundle })
    }
}

impl fmt::Debug for OptionalSvidClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OptionalSvidClientVerifier")
    }
}

impl ClientCertVerifier for OptionalSvidClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_peer(&self.bundle, end_entity, intermediates, now, Usage::Client)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Client side: the server must present an SVID of the bundle whose ID satisfies `expect`
/// (for the CA protocol: `spiffe://TD/ca/NAME`). The TLS server name is ignored.
pub struct SvidServerVerifier {
    bundle: SharedBundle,
    expect: Box<dyn Fn(&SpiffeId) -> bool + Send + Sync>,
    describe: String,
}

impl SvidServerVerifier {
    /// A verifier accepting servers whose ID passes `expect`; `describe` names the rule in
    /// errors (e.g. "a CA host ID spiffe://TD/ca/NAME").
    pub fn new(
        bundle: SharedBundle,
        describe: impl Into<String>,
        expect: impl Fn(&SpiffeId) -> bool + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(SvidServerVerifier {
            bundle,
            expect: Box::new(expect),
            describe: describe.into(),
        })
    }
}

impl fmt::Debug for SvidServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SvidServerVerifier({})", self.describe)
    }
}

impl ServerCertVerifier for SvidServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let svid = verify_peer(&self.bundle, end_entity, intermediates, now, Usage::Server)?;
        if !(self.expect)(&svid.id) {
            return Err(rejected(format!(
                "server presented {}, but {} was required",
                svid.id, self.describe
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Chooses the server certificate by the ALPN the client offers, so one QUIC endpoint can
/// serve the CA protocol with the CA host's certificate and tunnels with the node SVID.
/// Certificates are swapped atomically on rotation.
#[derive(Default)]
pub struct AlpnCertResolver {
    by_alpn: ArcSwap<HashMap<Vec<u8>, Arc<CertifiedKey>>>,
}

impl fmt::Debug for AlpnCertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AlpnCertResolver")
    }
}

impl AlpnCertResolver {
    /// Installs (or replaces) the certificate served for `alpn`.
    pub fn set(&self, alpn: &[u8], key: Arc<CertifiedKey>) {
        self.by_alpn.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.insert(alpn.to_vec(), key.clone());
            next
        });
    }
}

impl ResolvesServerCert for AlpnCertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let table = self.by_alpn.load();
        hello.alpn()?.find_map(|alpn| table.get(alpn).cloned())
    }
}

/// The QUIC server configuration of an agent's endpoint, speaking `alpns`.
pub fn quic_server_config(
    resolver: Arc<AlpnCertResolver>,
    client_verifier: Arc<OptionalSvidClientVerifier>,
    alpns: &[&[u8]],
) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_cert_resolver(resolver);
    tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
}

/// A QUIC client configuration for `alpn`, verifying the server with `verifier` and
/// presenting `client_cert` when given.
pub fn quic_client_config(
    verifier: Arc<SvidServerVerifier>,
    client_cert: Option<Arc<CertifiedKey>>,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut tls = match client_cert {
        Some(cert) => builder.with_client_cert_resolver(Arc::new(FixedClientCert(cert))),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// Presents one fixed certificate as the client's.
#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedClientCert {
    fn resolve(
        &self,
        _root_hints: &[&[u8]],
        _schemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TLS 1.3 handshake in memory between configs built on [`provider`], with an rcgen
    /// self-signed server certificate; returns the suite both sides agreed on.
    fn negotiated_suite() -> rustls::CipherSuite {
        let cert = rcgen::generate_simple_self_signed(vec!["weft.test".into()]).unwrap();
        let cert_der = cert.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert_der.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert_der).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut client = rustls::ClientConnection::new(
            Arc::new(client),
            ServerName::try_from("weft.test").unwrap(),
        )
        .unwrap();
        let mut server = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        for _ in 0..10 {
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            wire.clear();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets().unwrap();
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
        }
        let suite = client.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(server.negotiated_cipher_suite().unwrap().suite(), suite);
        suite
    }

    #[test]
    fn peers_agree_on_aes_128_gcm() {
        assert_eq!(
            negotiated_suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
    }
}
