//! Weft identity: SPIFFE IDs, the PKI (offline root, operator credentials, CA-host
//! intermediates), SVID issuance and verification, operator signatures, join tokens, trust bundles, the node
//! scope, revocations, the CA protocol (server and client) and the TLS verifiers built on SVIDs.

pub mod attest;
pub mod bundle;
pub mod client;
pub mod issuer;
pub mod operator;
pub mod pki;
pub mod protocol;
pub mod revocation;
pub mod scope;
pub mod server;
pub mod spiffe;
pub mod tls;
pub mod token;
pub mod verify;

pub use bundle::{BundleError, TrustBundle};
pub use issuer::{CertificateAuthority, IssueError, IssuedSvid};
pub use operator::{OperatorCredential, OperatorError, OperatorSigner};
pub use pki::PkiError;
pub use revocation::{Revocation, RevocationError, Revocations, RevokedKind};
pub use scope::NodeScope;
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain, WeftIdentity};
pub use token::{JoinToken, TokenError};
pub use verify::{SvidError, Usage, VerifiedSvid, parse_chain_pem, verify_svid};
