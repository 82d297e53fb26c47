//! The CA protocol (ALPN `weft-ca/1`): one JSON request and one JSON response per QUIC
//! bidirectional stream, each at most [`MAX_MESSAGE`] bytes.
//!
//! Version 1. Certificates and CSRs travel as standard base64 of DER. A request that does not
//! parse is answered with a `refused` response whose reason is `malformed`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

/// Largest request or response accepted.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// What an agent asks a CA host for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaRequest {
    /// Redeem a join token for a node SVID (no client certificate needed).
    Redeem {
        /// The join token text.
        token: String,
        /// CSR for `spiffe://TD/node/NAME`.
        csr: String,
    },
    /// Renew the node SVID presented as client certificate (same ID, same scope, new key).
    RenewNode {
        /// CSR for the same node ID.
        csr: String,
    },
    /// A service SVID, for a service in the scope of the node SVID presented.
    Service {
        /// Service namespace.
        namespace: String,
        /// Service name.
        name: String,
        /// CSR for `spiffe://TD/ns/NAMESPACE/sa/NAME`.
        csr: String,
        /// Lifetime asked for, in seconds (the CA caps it).
        ttl_secs: u64,
    },
}

/// A CA host's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaResponse {
    /// The SVID: leaf first, then the issuing intermediate.
    Issued {
        /// Chain, base64 DER.
        chain: Vec<String>,
        /// Leaf expiry, unix seconds.
        not_after: u64,
    },
    /// The request was refused.
    Refused {
        /// Short label (also the metric's `reason`).
        reason: String,
        /// What was wrong, for logs and operators.
        message: String,
    },
}

impl CaResponse {
    /// A refusal.
    pub fn refused(reason: &str, message: impl Into<String>) -> CaResponse {
        CaResponse::Refused {
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Base64 of DER bytes.
pub fn encode_der(der: &[u8]) -> String {
    STANDARD.encode(der)
}

/// DER bytes from base64; `None` if not base64.
pub fn decode_der(text: &str) -> Option<Vec<u8>> {
    STANDARD.decode(text).ok()
}

/// A certificate chain from its wire form.
pub fn decode_chain(chain: &[String]) -> Option<Vec<CertificateDer<'static>>> {
    chain
        .iter()
        .map(|c| decode_der(c).map(CertificateDer::from))
        .collect()
}
