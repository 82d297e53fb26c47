//! Weft discovery: who is in the mesh and which services run where.
//!
//! Built on chitchat. This crate owns the gossip transport (sealed with the gossip keyring),
//! the records each agent publishes (signed with its node SVID, verified before use), the
//! membership view and the service catalog that the rest of the agent reads. Gossip tells
//! where things are; identities say who: nothing a member publishes reaches the catalog
//! unless the node it is about signed it ([`signed`]).

pub mod catalog;
pub mod keyring;
pub mod membership;
pub mod metrics;
pub mod record;
pub mod signed;
pub mod transport;

pub use catalog::{Catalog, CatalogHandle, Endpoint, Member, MemberState};
pub use keyring::{GossipKey, Keyring, KeyringError, SharedKeyring};
pub use membership::{DiscoveryError, Membership, MembershipConfig};
pub use metrics::{GossipMetrics, PacketOutcome};
pub use record::{
    BundleAdvert, Health, NodeRecord, POLICY_KEY, Protocol, REVOCATIONS_KEY, ServiceKey,
    ServiceRecord,
};
pub use signed::{NodeIdentity, RecordVerifier, Rejection};
pub use transport::{SealConfig, SealedTransport};
