//! The agent's side of the CA protocol: one request to one CA host over QUIC, with the CA
//! host authenticated by its `spiffe://TD/ca/NAME` SVID (which only CA hosts can mint), so a
//! node pretending to be a CA never sees a join token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;

use crate::protocol::{CaRequest, CaResponse, MAX_MESSAGE, decode_chain};
use crate::spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
use crate::tls::{ALPN_CA, SharedBundle, SvidServerVerifier, quic_client_config};

/// How long one request may take, connection included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The SPIFFE ID a CA host serves the CA protocol with.
pub fn ca_server_id(trust_domain: &TrustDomain, node: &str) -> Result<SpiffeId, SpiffeIdError> {
    SpiffeId::from_segments(trust_domain, &["ca", node])
}

/// Whether `id` is a CA host's server ID.
pub fn is_ca_server_id(id: &SpiffeId) -> bool {
    id.path()
        .strip_prefix("/ca/")
        .is_some_and(|name| !name.is_empty() && !name.contains('/'))
}

/// Why a CA request did not produce an SVID.
#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    /// No connection (unreachable, handshake refused, wrong server identity).
    #[error("cannot reach CA host {addr}: {reason}")]
    Connect {
        /// The CA host.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The CA host did not answer in time.
    #[error("CA host {0} did not answer within {REQUEST_TIMEOUT:?}")]
    Timeout(SocketAddr),
    /// The exchange broke or the answer was not understood.
    #[error("CA host {addr}: {reason}")]
    Protocol {
        /// The CA host.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// The CA host refused the request.
    #[error("CA host {addr} refused ({reason}): {message}")]
    Refused {
        /// The CA host.
        addr: SocketAddr,
        /// Short label.
        reason: String,
        /// Its explanation.
        message: String,
    },
}

impl CaClientError {
    /// Whether another CA host might answer differently (as opposed to a refusal every CA
    /// host would repeat, such as a reused token).
    pub fn is_retryable_elsewhere(&self) -> bool {
        !matches!(self, CaClientError::Refused { .. })
    }
}

/// An SVID chain received from a CA host.
#[derive(Debug, Clone)]
pub struct IssuedChain {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Leaf expiry.
    pub not_after: SystemTime,
}

/// Sends CA requests from an agent's QUIC endpoint.
#[derive(Clone)]
pub struct CaClient {
    endpoint: quinn::Endpoint,
    verifier: Arc<SvidServerVerifier>,
}

impl CaClient {
    /// A client on `endpoint`, trusting CA hosts of `bundle`.
    pub fn new(endpoint: quinn::Endpoint, bundle: SharedBundle) -> CaClient {
        let verifier =
            SvidServerVerifier::new(bundle, "a CA host ID spiffe://TD/ca/NAME", is_ca_server_id);
        CaClient { endpoint, verifier }
    }

    /// Sends `request` to the CA host at `addr`, presenting `client_cert` if given.
    pub async fn request(
        &self,
        addr: SocketAddr,
        client_cert: Option<Arc<CertifiedKey>>,
        request: &CaRequest,
    ) -> Result<IssuedChain, CaClientError> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(addr, client_cert, request))
            .await
            .map_err(|_| CaClientError::Timeout(addr))?
    }

    async fn exchange(
        &self,
        addr: SocketAddr,
        client_cert: Option<Arc<CertifiedKey>>,
        request: &CaRequest,
    ) -> Result<IssuedChain, CaClientError> {
        let connect = |reason: String| CaClientError::Connect { addr, reason };
        let protocol = |reason: String| CaClientError::Protocol { addr, reason };
        let config = quic_client_config(self.verifier.clone(), client_cert, ALPN_CA)
            .map_err(|e| connect(e.to_string()))?;
        let connection = self
            .endpoint
            .connect_with(config, addr, "ca.weft.invalid")
            .map_err(|e| connect(e.to_string()))?
            .await
            .map_err(|e| connect(e.to_string()))?;
        // When the CA host closed the connection (it refused this client's certificate, say),
        // its reason says more than the stream error.
        let failed = |e: String| {
            protocol(
                connection
                    .close_reason()
                    .map_or(e, |reason| reason.to_string()),
            )
        };
        let result = async {
            let (mut send, mut recv) = connection
                .open_bi()
                .await
                .map_err(|e| failed(e.to_string()))?;
            let body = serde_json::to_vec(request).expect("requests always serialize");
            send.write_all(&body)
                .await
                .map_err(|e| failed(e.to_string()))?;
            send.finish().map_err(|e| failed(e.to_string()))?;
            let answer = recv
                .read_to_end(MAX_MESSAGE)
                .await
                .map_err(|e| failed(e.to_string()))?;
            let response: CaResponse = serde_json::from_slice(&answer)
                .map_err(|e| protocol(format!("answer is not weft-ca/1 JSON: {e}")))?;
            match response {
                CaResponse::Issued { chain, not_after } => Ok(IssuedChain {
                    chain: decode_chain(&chain)
                        .ok_or_else(|| protocol("chain is not base64 DER".into()))?,
                    not_after: UNIX_EPOCH + Duration::from_secs(not_after),
                }),
                CaResponse::Refused { reason, message } => Err(CaClientError::Refused {
                    addr,
                    reason,
                    message,
                }),
            }
        }
        .await;
        connection.close(0u32.into(), b"done");
        result
    }
}
