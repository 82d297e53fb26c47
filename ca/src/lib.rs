//! SPIFFE IDs, PKI, CA server and client, rotation, verifiers.
//!
//! For now this crate holds only the SPIFFE identity types ([`spiffe`]); the
//! PKI, the distributed CA and the verifiers build on them.

pub mod spiffe;

pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain, WeftIdentity};
