//! Weft identity: SPIFFE IDs, the PKI (offline root, operator credentials, CA-host
//! intermediates), SVID issuance, trust bundles and the node scope.
//!
//! Nothing here touches the network; the CA server and client that carry requests between
//! agents build on these types.

pub mod bundle;
pub mod issuer;
pub mod pki;
pub mod scope;
pub mod spiffe;

pub use bundle::{BundleError, TrustBundle};
pub use issuer::{CertificateAuthority, IssueError, IssuedSvid};
pub use pki::PkiError;
pub use scope::NodeScope;
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain, WeftIdentity};
