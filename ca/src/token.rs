//! Join tokens: what an operator hands to a new node so that it can get its first node SVID.
//!
//! A token is signed with the operator credential that `weft ca init` writes (`operator.pem`,
//! a leaf `spiffe://TD/operator/NAME` signed by the root, and `operator.key`, PKCS#8 P-256),
//! expires, names one node and the services that node may hold, and carries a random
//! 128-bit id. Because it carries the operator's certificate, any CA host can check it with
//! nothing but the trust bundle. This module never records tokens: single use is enforced by
//! the CA server, which remembers the ids it has redeemed.
//!
//! Text format (ASCII, at most [`MAX_TOKEN_LEN`] bytes):
//!
//! ```text
//! weft1.<PAYLOAD>.<CERT>.<SIG>
//! PAYLOAD = base64url(JSON {"id": "<32 hex>", "td": "<trust domain>", "node": "<name>",
//!                           "services": ["<ns>/<name>", ...], "iat": <unix s>, "exp": <unix s>})
//! CERT    = base64url(DER of the operator certificate)
//! SIG     = base64url(ECDSA P-256 SHA-256 signature, ASN.1 DER, over the ASCII bytes
//!                     "weft1.<PAYLOAD>.<CERT>")
//! ```
//!
//! base64url is RFC 4648 §5 without padding. The services are sorted and de-duplicated.
//! [`verify`] checks, in this order: size, shape and encoding; that the operator certificate
//! is an SVID of the bundle ([`verify_operator_signature`]); that it names an operator of the
//! bundle's trust domain; the signature; the payload; its trust domain; its node and service
//! names; and its validity window.

use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::bundle::TrustBundle;
use crate::operator::{
    OperatorCredential, OperatorError, OperatorSigner, verify_operator_signature,
};
use crate::scope::NodeScope;
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::verify::{SvidError, format_utc, to_system_time, unix_secs};

/// The version prefix of the token text.
pub const TOKEN_PREFIX: &str = "weft1";
/// Largest token accepted or created, in bytes; longer input is refused before decoding.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Shortest token lifetime `create` accepts.
pub const MIN_TTL: Duration = Duration::from_secs(60);
/// Longest token lifetime `create` and `verify` accept.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 86_400);
/// How far in the future a token's issue time may be, for clock skew between hosts.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Why a token could not be created or is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The input is longer than [`MAX_TOKEN_LEN`].
    #[error("token is {len} bytes; the limit is {MAX_TOKEN_LEN}")]
    TooLarge {
        /// Its length in bytes.
        len: usize,
    },
    /// The text is not a well-formed token.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The embedded operator certificate does not verify against the bundle.
    #[error("operator certificate is not trusted: {0}")]
    UntrustedOperator(SvidError),
    /// The embedded certificate is a valid SVID, but not of an operator.
    #[error(
        "token is signed by {0}, which is not an operator identity (spiffe://TD/operator/NAME)"
    )]
    NotOperator(String),
    /// The signature does not match the payload and certificate.
    #[error("token signature does not verify")]
    BadSignature,
    /// The token names another trust domain than the bundle's.
    #[error("token is for trust domain {token} but the bundle is for {bundle}")]
    ForeignTrustDomain {
        /// What the token says.
        token: String,
        /// The bundle's trust domain.
        bundle: TrustDomain,
    },
    /// The node or a service name is not valid.
    #[error("invalid token scope: {0}")]
    InvalidScope(String),
    /// The lifetime is out of bounds.
    #[error("invalid token lifetime: {0}")]
    InvalidTtl(String),
    /// The token's lifetime has ended.
    #[error("token expired at {}", format_utc(*.0))]
    Expired(SystemTime),
    /// The token says it was issued later than now plus the allowed clock skew.
    #[error("token is issued in the future (at {}); check the clocks", format_utc(*.0))]
    NotYetValid(SystemTime),
    /// The operator credential given to `create` is unusable.
    #[error("operator credential: {0}")]
    Credential(String),
}

impl From<OperatorError> for TokenError {
    fn from(error: OperatorError) -> TokenError {
        match error {
            OperatorError::Credential(reason) => TokenError::Credential(reason),
            OperatorError::Malformed(reason) => {
                TokenError::Malformed(format!("operator certificate does not parse: {reason}"))
            }
            OperatorError::Untrusted(e) => TokenError::UntrustedOperator(e),
            OperatorError::NotOperator(id) => TokenError::NotOperator(id),
            OperatorError::BadSignature => TokenError::BadSignature,
        }
    }
}

impl TokenError {
    /// A short label for metrics (`reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::TooLarge { .. } => "too_large",
            TokenError::Malformed(_) => "malformed",
            TokenError::UntrustedOperator(_) => "untrusted_operator",
            TokenError::NotOperator(_) => "not_operator",
            TokenError::BadSignature => "bad_signature",
            TokenError::ForeignTrustDomain { .. } => "foreign_trust_domain",
            TokenError::InvalidScope(_) => "invalid_scope",
            TokenError::InvalidTtl(_) => "invalid_ttl",
            TokenError::Expired(_) => "expired",
            TokenError::NotYetValid(_) => "not_yet_valid",
            TokenError::Credential(_) => "bad_credential",
        }
    }
}

/// A verified join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The random 128-bit id, 32 lowercase hex digits; the CA server redeems each id once.
    pub id: String,
    /// The trust domain the token is for (the bundle's).
    pub trust_domain: TrustDomain,
    /// The node name it admits.
    pub node: String,
    /// The services (`namespace/name`) the node may hold, sorted, without duplicates.
    pub services: Vec<String>,
    /// When it was created.
    pub issued_at: SystemTime,
    /// When it stops being accepted.
    pub expires_at: SystemTime,
    /// The operator who signed it.
    pub operator: SpiffeId,
}

impl JoinToken {
    /// The node's SPIFFE ID, `spiffe://TD/node/NAME`.
    pub fn node_id(&self) -> SpiffeId {
        SpiffeId::node(&self.trust_domain, &self.node)
            .expect("validated when the token was verified")
    }

    /// The scope to put in the node SVID.
    pub fn scope(&self) -> NodeScope {
        NodeScope::new(self.services.iter().cloned())
    }
}

/// The signed payload, as it travels.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    id: String,
    td: String,
    node: String,
    services: Vec<String>,
    iat: i64,
    exp: i64,
}

impl OperatorCredential {
    /// Creates a token with this credential; see [`create`].
    pub fn create_token(
        &self,
        node: &str,
        services: &[String],
        ttl: Duration,
    ) -> Result<String, TokenError> {
        create(&self.cert_pem, &self.key_pem, node, services, ttl)
    }
}

/// Creates a join token for `node`, allowing `services` (`namespace/name` each), valid for
/// `ttl` (1 minute to 30 days), signed with the operator credential.
pub fn create(
    operator_cert_pem: &[u8],
    operator_key_pem: &[u8],
    node: &str,
    services: &[String],
    ttl: Duration,
) -> Result<String, TokenError> {
    create_at(
        operator_cert_pem,
        operator_key_pem,
        node,
        services,
        SystemTime::now(),
        ttl,
    )
}

/// [`create`] with an explicit issue time, e.g. to pre-date a token in an expiry drill. The
/// operator credential must be valid at `issued_at`.
pub fn create_at(
    operator_cert_pem: &[u8],
    operator_key_pem: &[u8],
    node: &str,
    services: &[String],
    issued_at: SystemTime,
    ttl: Duration,
) -> Result<String, TokenError> {
    if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
        return Err(TokenError::InvalidTtl(format!(
            "must be between 1 minute and 30 days (got {} s)",
            ttl.as_secs()
        )));
    }
    let now = issued_at;
    let signer = OperatorSigner::new(operator_cert_pem, operator_key_pem, now)?;
    let cert = signer.cert_der();
    let trust_domain = signer.id().trust_domain().clone();
    let services = validate_scope(&trust_domain, node, services)?;
    let mut id = [0u8; 16];
    rand::rng().fill_bytes(&mut id);
    let iat = unix_secs(now);
    let payload = Payload {
        id: hex(&id),
        td: trust_domain.to_string(),
        node: node.to_owned(),
        services,
        iat,
        exp: iat.saturating_add(ttl.as_secs() as i64),
    };
    let json = serde_json::to_vec(&payload).expect("payload always serializes");
    let signed = format!(
        "{TOKEN_PREFIX}.{}.{}",
        URL_SAFE_NO_PAD.encode(json),
        URL_SAFE_NO_PAD.encode(cert.as_ref())
    );
    let signature = signer.sign(signed.as_bytes())?;
    let token = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(&signature));
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::InvalidScope(format!(
            "the token would be {} bytes, over the {MAX_TOKEN_LEN}-byte limit; name fewer services",
            token.len()
        )));
    }
    Ok(token)
}

/// Verifies a join token against `bundle` at time `now`. Surrounding whitespace is ignored.
/// Whether the id was already redeemed is the caller's business.
pub fn verify(token: &str, bundle: &TrustBundle, now: SystemTime) -> Result<JoinToken, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLarge { len: token.len() });
    }
    let token = token.trim();
    let malformed = |what: &str| TokenError::Malformed(what.to_owned());
    let parts: Vec<&str> = token.split('.').collect();
    let [prefix, payload_b64, cert_b64, sig_b64] = parts.as_slice() else {
        return Err(TokenError::Malformed(format!(
            "expected 4 dot-separated parts, found {}",
            parts.len()
        )));
    };
    if *prefix != TOKEN_PREFIX {
        return Err(malformed("does not start with `weft1.`"));
    }
    let payload_json = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|_| malformed("payload is not base64url"))?;
    let cert = CertificateDer::from(
        URL_SAFE_NO_PAD
            .decode(cert_b64)
            .map_err(|_| malformed("operator certificate is not base64url"))?,
    );
    let signature = URL_SAFE_NO_PAD
        .decode(sig_b64)
        .map_err(|_| malformed("signature is not base64url"))?;

    // The signer first: nothing in the payload means anything until it is authenticated.
    let signed_len = token.len() - sig_b64.len() - 1;
    let operator = verify_operator_signature(
        &cert,
        &token.as_bytes()[..signed_len],
        &signature,
        bundle,
        now,
    )?;

    let payload: Payload = serde_json::from_slice(&payload_json)
        .map_err(|e| TokenError::Malformed(format!("payload: {e}")))?;
    if payload.td != bundle.trust_domain().as_str() {
        return Err(TokenError::ForeignTrustDomain {
            token: payload.td,
            bundle: bundle.trust_domain().clone(),
        });
    }
    if payload.id.len() != 32
        || !payload
            .id
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(malformed("id is not 32 lowercase hex digits"));
    }
    let services = validate_scope(bundle.trust_domain(), &payload.node, &payload.services)?;
    if services != payload.services {
        return Err(malformed("services are not sorted and unique"));
    }
    let lifetime = payload.exp.saturating_sub(payload.iat);
    if lifetime <= 0 || lifetime as u64 > MAX_TTL.as_secs() {
        return Err(TokenError::InvalidTtl(format!(
            "issued at {} and expiring at {}; at most 30 days apart",
            format_utc(to_system_time(payload.iat)),
            format_utc(to_system_time(payload.exp))
        )));
    }
    let now_secs = unix_secs(now);
    if now_secs >= payload.exp {
        return Err(TokenError::Expired(to_system_time(payload.exp)));
    }
    if payload.iat > now_secs.saturating_add(MAX_CLOCK_SKEW.as_secs() as i64) {
        return Err(TokenError::NotYetValid(to_system_time(payload.iat)));
    }
    Ok(JoinToken {
        id: payload.id,
        trust_domain: bundle.trust_domain().clone(),
        node: payload.node,
        services,
        issued_at: to_system_time(payload.iat),
        expires_at: to_system_time(payload.exp),
        operator,
    })
}

/// Checks the node name and each `namespace/name` as SPIFFE path segments; returns the
/// services sorted and de-duplicated.
fn validate_scope(
    trust_domain: &TrustDomain,
    node: &str,
    services: &[String],
) -> Result<Vec<String>, TokenError> {
    SpiffeId::node(trust_domain, node)
        .map_err(|e| TokenError::InvalidScope(format!("node name {node:?}: {e}")))?;
    for service in services {
        let (namespace, name) = service.split_once('/').ok_or_else(|| {
            TokenError::InvalidScope(format!("service {service:?} is not `namespace/name`"))
        })?;
        SpiffeId::service(trust_domain, namespace, name)
            .map_err(|e| TokenError::InvalidScope(format!("service {service:?}: {e}")))?;
    }
    Ok(NodeScope::new(services.iter().cloned()).services().to_vec())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
