//! The CA server a CA host runs: answers `weft-ca/1` requests on its QUIC endpoint.
//!
//! Authorization happens here, per request: a redeem needs a valid, unused join token and a
//! CSR for exactly the token's node; a node renewal needs the current node SVID as client
//! certificate; a service SVID needs a node SVID whose scope lists the service. Redeemed token
//! ids are kept on disk (so a restart does not forget them) and published in gossip (so other
//! CA hosts refuse them too). Every refusal is counted by reason.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{IntCounterVec, Opts, Registry};
use rustls_pki_types::CertificateDer;
use tracing::{debug, info, warn};

use crate::issuer::{CertificateAuthority, IssuedSvid};
use crate::protocol::{CaRequest, CaResponse, MAX_MESSAGE, decode_der, encode_der};
use crate::spiffe::{SpiffeId, WeftIdentity};
use crate::tls::SharedBundle;
use crate::token;
use crate::verify::{SvidError, Usage, VerifiedSvid, verify_svid};

/// Shortest and longest service SVID lifetimes a CA host grants (below a few minutes is for
/// tests and drills: every host renews at half the lifetime).
pub const SERVICE_TTL_RANGE: (Duration, Duration) =
    (Duration::from_secs(10), Duration::from_secs(30 * 86_400));

/// How long a client may take to send one whole request.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// CA-host metrics.
#[derive(Clone)]
pub struct CaMetrics {
    issued: IntCounterVec,
    refused: IntCounterVec,
}

impl CaMetrics {
    /// Registers the CA metrics in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<CaMetrics> {
        let issued = IntCounterVec::new(
            Opts::new(
                "weft_ca_issued_total",
                "SVIDs issued by this CA host, by kind (node, service) and result.",
            ),
            &["kind", "result"],
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "weft_ca_refused_total",
                "CA requests refused by this CA host, by reason.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(issued.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        Ok(CaMetrics { issued, refused })
    }

    fn count(&self, kind: &str, response: &CaResponse) {
        match response {
            CaResponse::Issued { .. } => self.issued.with_label_values(&[kind, "ok"]).inc(),
            CaResponse::Refused { reason, .. } => {
                self.issued.with_label_values(&[kind, "refused"]).inc();
                self.refused.with_label_values(&[reason.as_str()]).inc();
            }
        }
    }
}

/// Token ids this CA host redeemed, with their expiry (unix seconds), kept on disk.
pub struct RedeemedTokens {
    path: PathBuf,
    ids: BTreeMap<String, u64>,
}

impl RedeemedTokens {
    /// Loads the record at `path` (empty if absent or unreadable, with a warning).
    pub fn load(path: PathBuf) -> RedeemedTokens {
        let ids = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
                warn!(path = %path.display(), error = %e, "redeemed-token record unreadable; starting empty");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        RedeemedTokens { path, ids }
    }

    /// Whether `id` was redeemed here.
    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains_key(id)
    }

    /// Ids still inside their token's lifetime (older ones cannot be replayed anyway).
    pub fn live_ids(&self) -> Vec<String> {
        let now = unix_now();
        self.ids
            .iter()
            .filter(|(_, exp)| **exp > now)
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn record(&mut self, id: &str, expires: SystemTime) -> std::io::Result<()> {
        let now = unix_now();
        self.ids.retain(|_, exp| *exp > now);
        self.ids.insert(id.to_string(), to_unix(expires));
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec(&self.ids).expect("a map of strings serializes"),
        )?;
        std::fs::rename(&tmp, &self.path)
    }
}

/// Tells whether another CA host already redeemed a token id (learned from gossip).
pub type RedeemedElsewhere = Box<dyn Fn(&str) -> bool + Send + Sync>;

/// A CA host's request handler.
pub struct CaServer {
    ca: Arc<CertificateAuthority>,
    bundle: SharedBundle,
    node_ttl: Duration,
    redeemed: Mutex<RedeemedTokens>,
    redeemed_elsewhere: RedeemedElsewhere,
    metrics: CaMetrics,
}

impl CaServer {
    /// A server issuing with `ca`, node SVIDs valid for `node_ttl`.
    pub fn new(
        ca: Arc<CertificateAuthority>,
        bundle: SharedBundle,
        node_ttl: Duration,
        redeemed: RedeemedTokens,
        redeemed_elsewhere: RedeemedElsewhere,
        metrics: CaMetrics,
    ) -> CaServer {
        CaServer {
            ca,
            bundle,
            node_ttl,
            redeemed: Mutex::new(redeemed),
            redeemed_elsewhere,
            metrics,
        }
    }

    /// Token ids redeemed here that are still within their lifetime, for gossip.
    pub fn redeemed_ids(&self) -> Vec<String> {
        self.redeemed
            .lock()
            .expect("redeemed-token lock is never poisoned")
            .live_ids()
    }

    /// Serves every request stream of one connection until the peer closes it.
    ///
    /// The client certificate is verified again for every request against the trust in
    /// force, so a certificate revoked (or a root removed) after the handshake gets its
    /// request refused with the reason, and the connection closed.
    pub async fn serve(self: Arc<Self>, connection: quinn::Connection) {
        let remote = connection.remote_address();
        loop {
            let (mut send, mut recv) = match connection.accept_bi().await {
                Ok(stream) => stream,
                Err(e) => {
                    debug!(%remote, error = %e, "CA connection ended");
                    return;
                }
            };
            let server = self.clone();
            let peer = peer_svid(&connection, &self.bundle);
            let connection = connection.clone();
            tokio::spawn(async move {
                let untrusted = peer.is_err();
                let refuse = |reason: &str, message: String| {
                    let response = CaResponse::refused(reason, message);
                    server.metrics.count("unknown", &response);
                    response
                };
                let read =
                    tokio::time::timeout(REQUEST_READ_TIMEOUT, recv.read_to_end(MAX_MESSAGE)).await;
                let response = match (read, peer) {
                    (Err(_), _) => refuse(
                        "timeout",
                        format!("request not complete within {REQUEST_READ_TIMEOUT:?}"),
                    ),
                    (Ok(Ok(_)), Err(e)) => refuse(
                        e.reason(),
                        format!("the client certificate no longer verifies: {e}"),
                    ),
                    (Ok(Ok(bytes)), Ok(peer)) => {
                        match serde_json::from_slice::<CaRequest>(&bytes) {
                            Ok(request) => server.handle(peer.as_ref(), request),
                            Err(e) => refuse(
                                "malformed",
                                format!("request is not valid JSON for weft-ca/1: {e}"),
                            ),
                        }
                    }
                    // The client went away mid-request: nothing to answer, nothing malformed.
                    (
                        Ok(Err(quinn::ReadToEndError::Read(
                            quinn::ReadError::ConnectionLost(_) | quinn::ReadError::Reset(_),
                        ))),
                        _,
                    ) => return,
                    (Ok(Err(e)), _) => refuse(
                        "malformed",
                        format!("request unreadable or over {MAX_MESSAGE} bytes: {e}"),
                    ),
                };
                if let CaResponse::Refused { reason, message } = &response {
                    warn!(%remote, %reason, %message, "CA request refused");
                }
                let bytes = serde_json::to_vec(&response).expect("responses always serialize");
                if send.write_all(&bytes).await.is_ok() && send.finish().is_ok() {
                    let _ = send.stopped().await;
                }
                if untrusted {
                    connection.close(3u32.into(), b"client certificate no longer trusted");
                }
            });
        }
    }

    /// Decides one request from a peer with `peer` as its verified client SVID (if any).
    pub fn handle(&self, peer: Option<&VerifiedSvid>, request: CaRequest) -> CaResponse {
        let (kind, response) = match request {
            CaRequest::Redeem { token, csr } => ("node", self.redeem(&token, &csr)),
            CaRequest::RenewNode { csr } => ("node", self.renew_node(peer, &csr)),
            CaRequest::Service {
                namespace,
                name,
                csr,
                ttl_secs,
            } => (
                "service",
                self.service(peer, &namespace, &name, &csr, ttl_secs),
            ),
        };
        self.metrics.count(kind, &response);
        response
    }

    fn redeem(&self, token_text: &str, csr: &str) -> CaResponse {
        let token = match token::verify(token_text, &self.bundle.load(), SystemTime::now()) {
            Ok(token) => token,
            Err(e) => return CaResponse::refused(e.reason(), e.to_string()),
        };
        let mut redeemed = self
            .redeemed
            .lock()
            .expect("redeemed-token lock is never poisoned");
        if redeemed.contains(&token.id) || (self.redeemed_elsewhere)(&token.id) {
            return CaResponse::refused(
                "token_reused",
                format!("join token {} was already redeemed", token.id),
            );
        }
        let response = self.issue(csr, &token.node_id(), self.node_ttl, Some(&token.scope()));
        if matches!(response, CaResponse::Issued { .. }) {
            if let Err(e) = redeemed.record(&token.id, token.expires_at) {
                // Refuse rather than issue a token we could not remember.
                warn!(error = %e, "could not record a redeemed token");
                return CaResponse::refused(
                    "internal",
                    format!("could not record the redeemed token: {e}"),
                );
            }
            info!(node = %token.node, token = %token.id, services = ?token.services, "join token redeemed");
        }
        response
    }

    fn renew_node(&self, peer: Option<&VerifiedSvid>, csr: &str) -> CaResponse {
        let Some(peer) = peer else {
            return CaResponse::refused(
                "no_node_svid",
                "renewing a node SVID needs the current node SVID as client certificate",
            );
        };
        if !matches!(peer.id.kind(), WeftIdentity::Node { .. }) {
            return CaResponse::refused(
                "not_a_node",
                format!("{} is not a node identity", peer.id),
            );
        }
        self.issue(
            csr,
            &peer.id,
            self.node_ttl,
            Some(&peer.scope.clone().unwrap_or_default()),
        )
    }

    fn service(
        &self,
        peer: Option<&VerifiedSvid>,
        namespace: &str,
        name: &str,
        csr: &str,
        ttl_secs: u64,
    ) -> CaResponse {
        let Some(peer) = peer else {
            return CaResponse::refused(
                "no_node_svid",
                "a service SVID needs the node SVID as client certificate",
            );
        };
        if !matches!(peer.id.kind(), WeftIdentity::Node { .. }) {
            return CaResponse::refused(
                "not_a_node",
                format!("{} is not a node identity", peer.id),
            );
        }
        let id = match SpiffeId::service(self.ca.trust_domain(), namespace, name) {
            Ok(id) => id,
            Err(e) => {
                return CaResponse::refused(
                    "bad_request",
                    format!("service {namespace}/{name}: {e}"),
                );
            }
        };
        if !peer
            .scope
            .as_ref()
            .is_some_and(|scope| scope.allows(namespace, name))
        {
            return CaResponse::refused(
                "out_of_scope",
                format!(
                    "{} may not hold {namespace}/{name}; its join token did not list it",
                    peer.id
                ),
            );
        }
        let ttl = Duration::from_secs(ttl_secs).clamp(SERVICE_TTL_RANGE.0, SERVICE_TTL_RANGE.1);
        self.issue(csr, &id, ttl, None)
    }

    fn issue(
        &self,
        csr: &str,
        id: &SpiffeId,
        ttl: Duration,
        scope: Option<&crate::scope::NodeScope>,
    ) -> CaResponse {
        let Some(csr) = decode_der(csr) else {
            return CaResponse::refused("bad_csr", "CSR is not base64");
        };
        match self.ca.issue(&csr, id, ttl, scope) {
            Ok(IssuedSvid { chain, not_after }) => CaResponse::Issued {
                chain: chain.iter().map(|c| encode_der(c.as_ref())).collect(),
                not_after: to_unix(not_after),
            },
            Err(e) => CaResponse::refused(e.reason(), e.to_string()),
        }
    }
}

/// The verified SVID the peer presented as client certificate, if any.
/// The client's SVID, verified now: `None` when it presented no certificate (a joining
/// agent), an error when it presented one that no longer verifies.
fn peer_svid(
    connection: &quinn::Connection,
    bundle: &SharedBundle,
) -> Result<Option<VerifiedSvid>, SvidError> {
    let Some(chain) = connection
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
    else {
        return Ok(None);
    };
    verify_svid(&chain, &bundle.load(), SystemTime::now(), Usage::Client).map(Some)
}

fn unix_now() -> u64 {
    to_unix(SystemTime::now())
}

fn to_unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
