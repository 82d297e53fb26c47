//! The CA protocol end to end over real QUIC on loopback: two CA hosts of one trust domain
//! (sharing their redeemed-token ids as gossip would), an agent redeeming a token and asking
//! for service SVIDs, and every refusal the CA must make, each with its reason counted.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use prometheus::Registry;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use weft_ca::client::{CaClient, CaClientError, ca_server_id};
use weft_ca::protocol::{CaRequest, encode_der};
use weft_ca::server::{CaMetrics, CaServer, RedeemedElsewhere, RedeemedTokens};
use weft_ca::tls::{
    ALPN_CA, AlpnCertResolver, OptionalSvidClientVerifier, SharedBundle, certified_key,
    quic_server_config,
};
use weft_ca::{
    CertificateAuthority, OperatorCredential, SpiffeId, TrustDomain, Usage, pki, token, verify_svid,
};

struct CaHost {
    addr: SocketAddr,
    server: Arc<CaServer>,
    registry: Registry,
    _endpoint: quinn::Endpoint,
}

impl CaHost {
    fn refused(&self, reason: &str) -> i64 {
        self.registry
            .gather()
            .iter()
            .filter(|f| f.name() == "weft_ca_refused_total")
            .flat_map(|f| f.get_metric())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "reason" && l.value() == reason)
            })
            .map(|m| m.get_counter().get_value() as i64)
            .sum()
    }
}

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivatePkcs8KeyDer::from(key.serialize_der()).into()
}

fn start_ca(dir: &Path, bundle: &SharedBundle, name: &str, elsewhere: RedeemedElsewhere) -> CaHost {
    let out = dir.join(format!("ca-{name}"));
    pki::intermediate(&td(), &dir.join("root"), name, &out).unwrap();
    let ca = Arc::new(
        CertificateAuthority::load(
            &out.join(pki::CA_CERT),
            &out.join(pki::CA_KEY),
            &bundle.load(),
        )
        .unwrap(),
    );
    let resolver = Arc::new(AlpnCertResolver::default());
    let (key, issued) = ca
        .issue_local(
            &ca_server_id(&td(), name).unwrap(),
            Duration::from_secs(3600),
            None,
        )
        .unwrap();
    resolver.set(ALPN_CA, certified_key(issued.chain, key_der(&key)).unwrap());
    let config = quic_server_config(
        resolver,
        OptionalSvidClientVerifier::new(bundle.clone()),
        &[ALPN_CA],
    )
    .unwrap();
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let registry = Registry::new();
    let server = Arc::new(CaServer::new(
        ca,
        bundle.clone(),
        Duration::from_secs(30 * 86_400),
        RedeemedTokens::load(out.join("redeemed.json")),
        elsewhere,
        CaMetrics::new(&registry).unwrap(),
    ));
    let accept = endpoint.clone();
    let serving = server.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            let server = serving.clone();
            tokio::spawn(async move {
                if let Ok(connection) = incoming.await {
                    server.serve(connection).await;
                }
            });
        }
    });
    CaHost {
        addr: endpoint.local_addr().unwrap(),
        server,
        registry,
        _endpoint: endpoint,
    }
}

fn csr(uris: &[&str], is_ca: bool) -> (KeyPair, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    if is_ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    let der = params.serialize_request(&key).unwrap();
    (key, encode_der(der.der()))
}

fn refusal(result: Result<weft_ca::client::IssuedChain, CaClientError>) -> (String, String) {
    match result {
        Err(CaClientError::Refused {
            reason, message, ..
        }) => (reason, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

struct Mesh {
    dir: tempfile::TempDir,
    bundle: SharedBundle,
    operator: OperatorCredential,
    ca1: CaHost,
    ca2: CaHost,
    client: CaClient,
}

fn mesh() -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let made = pki::init(&td(), "ops", &dir.path().join("root")).unwrap();
    let bundle: SharedBundle = Arc::new(ArcSwap::from_pointee(made.bundle));
    let operator = OperatorCredential::load(&dir.path().join("root")).unwrap();
    let ca1 = start_ca(dir.path(), &bundle, "ca1", Box::new(|_| false));
    // ca2 learns ca1's redeemed ids the way gossip would deliver them.
    let ca1_server = ca1.server.clone();
    let ca2 = start_ca(
        dir.path(),
        &bundle,
        "ca2",
        Box::new(move |id| ca1_server.redeemed_ids().iter().any(|r| r == id)),
    );
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let client = CaClient::new(endpoint, bundle.clone());
    Mesh {
        dir,
        bundle,
        operator,
        ca1,
        ca2,
        client,
    }
}

impl Mesh {
    /// Redeems a fresh token for `node` with `services` at ca1; returns the node's client cert.
    async fn join(&self, node: &str, services: &[&str]) -> Arc<CertifiedKey> {
        let services: Vec<String> = services.iter().map(|s| s.to_string()).collect();
        let token = self
            .operator
            .create_token(node, &services, Duration::from_secs(600))
            .unwrap();
        let (key, csr) = csr(&[&format!("spiffe://example.org/node/{node}")], false);
        let issued = self
            .client
            .request(self.ca1.addr, None, &CaRequest::Redeem { token, csr })
            .await
            .unwrap();
        certified_key(issued.chain, key_der(&key)).unwrap()
    }
}

#[tokio::test]
async fn token_redeemed_for_a_node_svid_then_service_svids_within_scope() {
    let m = mesh();
    let token = m
        .operator
        .create_token("web-1", &["default/api".into()], Duration::from_secs(600))
        .unwrap();
    let (key, csr_text) = csr(&["spiffe://example.org/node/web-1"], false);
    let issued = m
        .client
        .request(
            m.ca1.addr,
            None,
            &CaRequest::Redeem {
                token,
                csr: csr_text,
            },
        )
        .await
        .unwrap();
    let node = verify_svid(
        &issued.chain,
        &m.bundle.load(),
        SystemTime::now(),
        Usage::Any,
    )
    .unwrap();
    assert_eq!(node.id.to_string(), "spiffe://example.org/node/web-1");
    assert_eq!(node.scope.unwrap().services(), ["default/api"]);
    let node_cert = certified_key(issued.chain, key_der(&key)).unwrap();

    // Any CA host issues service SVIDs in the node's scope: no shared database needed.
    for ca in [&m.ca1, &m.ca2] {
        let (_, csr_text) = csr(&["spiffe://example.org/ns/default/sa/api"], false);
        let request = CaRequest::Service {
            namespace: "default".into(),
            name: "api".into(),
            csr: csr_text,
            ttl_secs: 3600,
        };
        let svid = m
            .client
            .request(ca.addr, Some(node_cert.clone()), &request)
            .await
            .unwrap();
        let verified =
            verify_svid(&svid.chain, &m.bundle.load(), SystemTime::now(), Usage::Any).unwrap();
        assert_eq!(
            verified.id,
            SpiffeId::service(&td(), "default", "api").unwrap()
        );
    }

    // The node renews itself with its current SVID, keeping its scope.
    let (_, csr_text) = csr(&["spiffe://example.org/node/web-1"], false);
    let renewed = m
        .client
        .request(
            m.ca2.addr,
            Some(node_cert),
            &CaRequest::RenewNode { csr: csr_text },
        )
        .await
        .unwrap();
    let renewed = verify_svid(
        &renewed.chain,
        &m.bundle.load(),
        SystemTime::now(),
        Usage::Any,
    )
    .unwrap();
    assert_eq!(renewed.scope.unwrap().services(), ["default/api"]);
}

#[tokio::test]
async fn reused_join_token_is_refused_by_the_same_and_a_second_ca() {
    let m = mesh();
    let token = m
        .operator
        .create_token("db-1", &["default/db".into()], Duration::from_secs(600))
        .unwrap();
    let (_, csr_text) = csr(&["spiffe://example.org/node/db-1"], false);
    let redeem = CaRequest::Redeem {
        token,
        csr: csr_text,
    };
    m.client.request(m.ca1.addr, None, &redeem).await.unwrap();
    let (reason, message) = refusal(m.client.request(m.ca1.addr, None, &redeem).await);
    assert_eq!(reason, "token_reused", "{message}");
    let (reason, _) = refusal(m.client.request(m.ca2.addr, None, &redeem).await);
    assert_eq!(reason, "token_reused");
    assert_eq!(
        (m.ca1.refused("token_reused"), m.ca2.refused("token_reused")),
        (1, 1)
    );
    // The record survives a restart of the CA host.
    let record =
        std::fs::read_to_string(m.dir.path().join("ca-ca1").join("redeemed.json")).unwrap();
    assert!(record.contains(&m.ca1.server.redeemed_ids()[0]));
}

#[tokio::test]
async fn forged_and_expired_tokens_are_refused() {
    let m = mesh();
    // Forged: signed by the operator of another root of the same trust domain.
    let other = tempfile::tempdir().unwrap();
    pki::init(&td(), "mallory", other.path()).unwrap();
    let mallory = OperatorCredential::load(other.path()).unwrap();
    let forged = mallory
        .create_token("evil", &["default/api".into()], Duration::from_secs(600))
        .unwrap();
    let (_, csr_text) = csr(&["spiffe://example.org/node/evil"], false);
    let (reason, message) = refusal(
        m.client
            .request(
                m.ca1.addr,
                None,
                &CaRequest::Redeem {
                    token: forged,
                    csr: csr_text.clone(),
                },
            )
            .await,
    );
    assert_eq!(reason, "untrusted_operator", "{message}");

    // Expired: issued 250 s ago for 60 s (the operator credential, backdated 5 minutes like
    // every certificate we make, was already valid then).
    let expired = token::create_at(
        &m.operator.cert_pem,
        &m.operator.key_pem,
        "late",
        &["default/api".into()],
        SystemTime::now() - Duration::from_secs(250),
        Duration::from_secs(60),
    )
    .unwrap();
    let (_, csr_text) = csr(&["spiffe://example.org/node/late"], false);
    let (reason, message) = refusal(
        m.client
            .request(
                m.ca1.addr,
                None,
                &CaRequest::Redeem {
                    token: expired,
                    csr: csr_text,
                },
            )
            .await,
    );
    assert_eq!(reason, "expired", "{message}");
    assert!(message.contains("expired at"), "{message}");

    // Garbage.
    let (_, csr_text) = csr(&["spiffe://example.org/node/x"], false);
    let (reason, _) = refusal(
        m.client
            .request(
                m.ca1.addr,
                None,
                &CaRequest::Redeem {
                    token: "weft1.garbage".into(),
                    csr: csr_text,
                },
            )
            .await,
    );
    assert_eq!(reason, "malformed");
    assert_eq!(
        (
            m.ca1.refused("untrusted_operator"),
            m.ca1.refused("expired"),
            m.ca1.refused("malformed")
        ),
        (1, 1, 1)
    );
}

#[tokio::test]
async fn a_token_for_one_node_cannot_be_redeemed_for_another() {
    let m = mesh();
    let token = m
        .operator
        .create_token("web-1", &[], Duration::from_secs(600))
        .unwrap();
    let (_, csr_text) = csr(&["spiffe://example.org/node/admin"], false);
    let (reason, message) = refusal(
        m.client
            .request(
                m.ca1.addr,
                None,
                &CaRequest::Redeem {
                    token,
                    csr: csr_text,
                },
            )
            .await,
    );
    assert_eq!(reason, "wrong_id", "{message}");
}

#[tokio::test]
async fn service_outside_the_scope_is_refused() {
    let m = mesh();
    let node = m.join("web-1", &["default/api"]).await;
    let (_, csr_text) = csr(&["spiffe://example.org/ns/default/sa/payments"], false);
    let request = CaRequest::Service {
        namespace: "default".into(),
        name: "payments".into(),
        csr: csr_text,
        ttl_secs: 3600,
    };
    let (reason, message) = refusal(m.client.request(m.ca2.addr, Some(node), &request).await);
    assert_eq!(reason, "out_of_scope");
    assert!(
        message.contains("may not hold default/payments"),
        "{message}"
    );
    assert_eq!(m.ca2.refused("out_of_scope"), 1);
}

#[tokio::test]
async fn csr_for_a_ca_or_another_trust_domain_is_refused() {
    let m = mesh();
    let node = m.join("web-1", &["default/api"]).await;
    let ask = |csr_text: String| CaRequest::Service {
        namespace: "default".into(),
        name: "api".into(),
        csr: csr_text,
        ttl_secs: 3600,
    };
    let (_, ca_csr) = csr(&["spiffe://example.org/ns/default/sa/api"], true);
    let (reason, _) = refusal(
        m.client
            .request(m.ca1.addr, Some(node.clone()), &ask(ca_csr))
            .await,
    );
    assert_eq!(reason, "csr_requests_ca");
    let (_, foreign) = csr(&["spiffe://other.org/ns/default/sa/api"], false);
    let (reason, message) = refusal(
        m.client
            .request(m.ca1.addr, Some(node), &ask(foreign))
            .await,
    );
    assert_eq!(reason, "foreign_trust_domain", "{message}");
    assert_eq!(
        (
            m.ca1.refused("csr_requests_ca"),
            m.ca1.refused("foreign_trust_domain")
        ),
        (1, 1)
    );
}

#[tokio::test]
async fn requests_without_a_valid_node_svid_are_refused() {
    let m = mesh();
    let (_, csr_text) = csr(&["spiffe://example.org/ns/default/sa/api"], false);
    let service = CaRequest::Service {
        namespace: "default".into(),
        name: "api".into(),
        csr: csr_text.clone(),
        ttl_secs: 3600,
    };
    let (reason, _) = refusal(m.client.request(m.ca1.addr, None, &service).await);
    assert_eq!(reason, "no_node_svid");
    let (reason, _) = refusal(
        m.client
            .request(
                m.ca1.addr,
                None,
                &CaRequest::RenewNode {
                    csr: csr_text.clone(),
                },
            )
            .await,
    );
    assert_eq!(reason, "no_node_svid");
    assert_eq!(m.ca1.refused("no_node_svid"), 2);

    // A service SVID is not a node SVID: it cannot renew a node or ask for services.
    let node = m.join("web-1", &["default/api"]).await;
    let (service_key, csr_text) = csr(&["spiffe://example.org/ns/default/sa/api"], false);
    let request = CaRequest::Service {
        namespace: "default".into(),
        name: "api".into(),
        csr: csr_text,
        ttl_secs: 3600,
    };
    let svid = m
        .client
        .request(m.ca1.addr, Some(node), &request)
        .await
        .unwrap();
    let service_cert = certified_key(svid.chain, key_der(&service_key)).unwrap();
    let (_, csr_text) = csr(&["spiffe://example.org/ns/default/sa/api"], false);
    let (reason, message) = refusal(
        m.client
            .request(
                m.ca1.addr,
                Some(service_cert),
                &CaRequest::RenewNode { csr: csr_text },
            )
            .await,
    );
    assert_eq!(reason, "not_a_node", "{message}");

    // A client certificate from another trust domain is refused in the handshake.
    let other = tempfile::tempdir().unwrap();
    let other_td = TrustDomain::new("other.org").unwrap();
    pki::init(&other_td, "x", &other.path().join("root")).unwrap();
    pki::intermediate(
        &other_td,
        &other.path().join("root"),
        "oca",
        &other.path().join("oca"),
    )
    .unwrap();
    let other_bundle = pki::load_root(&other.path().join("root")).unwrap();
    let other_ca = CertificateAuthority::load(
        &other.path().join("oca").join(pki::CA_CERT),
        &other.path().join("oca").join(pki::CA_KEY),
        &other_bundle,
    )
    .unwrap();
    let (key, issued) = other_ca
        .issue_local(
            &SpiffeId::node(&other_td, "web-1").unwrap(),
            Duration::from_secs(3600),
            None,
        )
        .unwrap();
    let foreign = certified_key(issued.chain, key_der(&key)).unwrap();
    let result = m.client.request(m.ca1.addr, Some(foreign), &service).await;
    assert!(
        matches!(
            result,
            Err(CaClientError::Connect { .. } | CaClientError::Protocol { .. })
        ),
        "{result:?}"
    );
}

#[tokio::test]
async fn an_agent_refuses_a_server_that_is_not_a_ca_host() {
    // A node SVID (not spiffe://TD/ca/NAME) serving weft-ca/1 must not receive tokens.
    let m = mesh();
    let dir = m.dir.path();
    let ca = CertificateAuthority::load(
        &dir.join("ca-ca1").join(pki::CA_CERT),
        &dir.join("ca-ca1").join(pki::CA_KEY),
        &m.bundle.load(),
    )
    .unwrap();
    let (key, issued) = ca
        .issue_local(
            &SpiffeId::node(&td(), "impostor").unwrap(),
            Duration::from_secs(3600),
            None,
        )
        .unwrap();
    let resolver = Arc::new(AlpnCertResolver::default());
    resolver.set(ALPN_CA, certified_key(issued.chain, key_der(&key)).unwrap());
    let config = quic_server_config(
        resolver,
        OptionalSvidClientVerifier::new(m.bundle.clone()),
        &[ALPN_CA],
    )
    .unwrap();
    let impostor = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = impostor.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(i) = impostor.accept().await {
            let _ = i.await;
        }
    });
    let token = m
        .operator
        .create_token("web-1", &[], Duration::from_secs(600))
        .unwrap();
    let (_, csr_text) = csr(&["spiffe://example.org/node/web-1"], false);
    let result = m
        .client
        .request(
            addr,
            None,
            &CaRequest::Redeem {
                token,
                csr: csr_text,
            },
        )
        .await;
    match result {
        Err(CaClientError::Connect { reason, .. }) => assert!(
            reason.contains("spiffe://example.org/node/impostor"),
            "{reason}"
        ),
        other => panic!("expected a refused handshake, got {other:?}"),
    }
}

#[tokio::test]
async fn a_slow_request_is_refused_in_time_and_a_dropped_one_is_not_malformed() {
    let m = mesh();
    let verifier = weft_ca::tls::SvidServerVerifier::new(
        m.bundle.clone(),
        "a CA host",
        weft_ca::client::is_ca_server_id,
    );
    let config = weft_ca::tls::quic_client_config(verifier, None, ALPN_CA).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let connect = || async {
        endpoint
            .connect_with(config.clone(), m.ca1.addr, "ca.weft.invalid")
            .unwrap()
            .await
            .unwrap()
    };

    // A client that goes away in the middle of its request.
    let gone = connect().await;
    let (mut send, _recv) = gone.open_bi().await.unwrap();
    send.write_all(br#"{"redeem":"#).await.unwrap();
    gone.close(0u32.into(), b"gone");

    // A client that sends half a request and waits.
    let slow = connect().await;
    let (mut send, mut recv) = slow.open_bi().await.unwrap();
    send.write_all(br#"{"redeem":"#).await.unwrap();
    let started = std::time::Instant::now();
    let answer = recv.read_to_end(64 * 1024).await.unwrap();
    let waited = started.elapsed();
    let response: weft_ca::protocol::CaResponse = serde_json::from_slice(&answer).unwrap();
    let weft_ca::protocol::CaResponse::Refused { reason, message } = response else {
        panic!("a half request was answered: {response:?}");
    };
    assert_eq!(reason, "timeout", "{message}");
    let limit = weft_ca::server::REQUEST_READ_TIMEOUT;
    assert!(
        waited >= limit - Duration::from_secs(1) && waited < limit + Duration::from_secs(5),
        "answered after {waited:?}"
    );
    assert_eq!(m.ca1.refused("timeout"), 1);
    assert_eq!(
        m.ca1.refused("malformed"),
        0,
        "a dropped request is not malformed"
    );
}
