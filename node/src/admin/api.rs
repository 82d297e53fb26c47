//! The JSON documents of the admin API, shared by the server (agent) and the client (CLI)
//! so both sides agree on one shape. Paths are listed in [`paths`].

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use weft_discovery::{Endpoint, Health, Member, ServiceKey};

/// Admin API paths.
pub mod paths {
    /// `GET`: every member ([`super::Member`] list).
    pub const MEMBERS: &str = "/v1/members";
    /// `GET`: the catalog ([`super::ServiceEntry`] list).
    pub const SERVICES: &str = "/v1/services";
    /// `GET`: this agent ([`super::StatusReport`]).
    pub const STATUS: &str = "/v1/status";
    /// `GET`: keyrings in use across members ([`super::KeysReport`]).
    pub const GOSSIP_KEYS: &str = "/v1/gossip/keys";
    /// `GET`: identities held ([`super::CertsReport`]).
    pub const CERTS: &str = "/v1/certs";
    /// `GET`: the policy bundle in force ([`super::PolicyReport`]); `POST` a signed bundle to
    /// offer it ([`super::PolicyApplied`]; 422 with the reason if refused).
    pub const POLICY: &str = "/v1/policy";
    /// `GET`: the revocations in force ([`super::RevocationReport`]); `POST` a signed
    /// revocation bundle to offer it ([`super::PolicyApplied`]; 422 with the reason if refused).
    pub const REVOCATIONS: &str = "/v1/revocations";
    /// `GET`: each member's policy version ([`super::PolicyStatusReport`]).
    pub const POLICY_STATUS: &str = "/v1/policy/status";
    /// `GET ?from=SVC&to=SVC[&port=P][&method=M&path=P[&header=NAME:VALUE]…]`: a decision explained
    /// ([`super::WhyReport`]).
    pub const WHY: &str = "/v1/why";
    /// `GET`: every alive member's HTTP golden-metric counters ([`super::StatReport`]).
    pub const STAT: &str = "/v1/stat";
    /// `GET`: Prometheus text.
    pub const METRICS: &str = "/metrics";
    /// `GET`: 200 when ready to serve, 503 otherwise.
    pub const READY: &str = "/ready";
    /// `GET`: 200 while the process runs.
    pub const LIVE: &str = "/live";
}

/// One service and all its endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEntry {
    /// Namespace and name.
    pub service: ServiceKey,
    /// Every endpoint, healthy or not.
    pub endpoints: Vec<Endpoint>,
}

/// Member counts by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberCounts {
    /// Alive members (including this one).
    pub alive: usize,
    /// Members with late heartbeats.
    pub suspect: usize,
    /// Members declared dead.
    pub dead: usize,
    /// Members that left.
    pub left: usize,
}

/// A local service and its health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalService {
    /// Namespace and name.
    pub service: ServiceKey,
    /// Where the app listens.
    pub address: SocketAddr,
    /// Last health result.
    pub health: Health,
}

/// What `weft status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Node name.
    pub node: String,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Weft version.
    pub version: String,
    /// Gossip incarnation.
    pub generation: u64,
    /// Advertised gossip address.
    pub gossip_addr: SocketAddr,
    /// Advertised tunnel address.
    pub tunnel_addr: SocketAddr,
    /// Config file in use.
    pub config: PathBuf,
    /// Seconds since the agent started.
    pub uptime_secs: u64,
    /// Whether `/ready` answers 200.
    pub ready: bool,
    /// Members by state.
    pub members: MemberCounts,
    /// Keyring fingerprints, primary first.
    pub keyring: Vec<String>,
    /// This node's SPIFFE ID, once it holds one.
    pub identity: Option<String>,
    /// Expiry of the node SVID, unix seconds.
    pub identity_not_after: Option<u64>,
    /// Alive CA hosts known from gossip (other than this one).
    pub ca_hosts: usize,
    /// Whether this host is a CA host.
    pub is_ca_host: bool,
    /// Services this host runs.
    pub services: Vec<LocalService>,
    /// Version of the policy bundle in force (0: none published).
    #[serde(default)]
    pub policy_version: u64,
    /// Version of the revocation bundle in force (0: none published).
    #[serde(default)]
    pub revocation_version: u64,
    /// Revocations in force.
    #[serde(default)]
    pub revocations: usize,
}

/// The revocations in force, as `weft revoke list` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationReport {
    /// Version of the revocation bundle (0: none published).
    pub version: u64,
    /// SHA-256 of its payload.
    pub digest: Option<String>,
    /// Who signed it.
    pub operator: Option<String>,
    /// When it was signed, unix seconds.
    pub issued_at: Option<u64>,
    /// Every revocation.
    pub revoked: Vec<weft_ca::Revocation>,
}

/// The policy bundle in force, as `weft policy get` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyReport {
    /// `published`, `unpublished` (none yet: authenticated traffic is allowed) or
    /// `unavailable` (the persisted bundle failed verification: everything is denied).
    pub state: String,
    /// Its version (0 when none).
    pub version: u64,
    /// SHA-256 of its payload, hex.
    pub digest: Option<String>,
    /// Who signed it.
    pub operator: Option<String>,
    /// When it was signed, unix seconds.
    pub issued_at: Option<u64>,
    /// Its files, as written.
    pub files: Vec<PolicyFileText>,
}

/// One file of a policy bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyFileText {
    /// File name.
    pub name: String,
    /// YAML text.
    pub text: String,
}

/// The answer to an offered bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyApplied {
    /// `applied` or `current` (it was already in force).
    pub result: String,
    /// The version in force now.
    pub version: u64,
}

/// Which policy version each member runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStatusReport {
    /// This agent's version (0: none).
    pub version: u64,
    /// This agent's digest.
    pub digest: Option<String>,
    /// Every alive or suspect member.
    pub members: Vec<MemberPolicy>,
    /// Whether every one of them runs this agent's version and digest.
    pub converged: bool,
}

/// One member's advertised policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberPolicy {
    /// Node name.
    pub node: String,
    /// Its gossip state.
    pub state: String,
    /// Its version (0: none advertised).
    pub version: u64,
    /// Its digest.
    pub digest: Option<String>,
}

/// A decision explained, for `weft why`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhyReport {
    /// The source identity the question was put for.
    pub source: String,
    /// The destination service.
    pub destination: String,
    /// The port decided for.
    pub port: u16,
    /// `allow`, `deny`, or `per-request` (an HTTP destination whose rules look at the request:
    /// give a method and path).
    pub decision: String,
    /// The reason label (as in metrics and `weft-deny-reason`).
    pub reason: Option<String>,
    /// The TrafficTarget that decided.
    pub document: Option<String>,
    /// The rule that decided.
    pub rule: Option<String>,
    /// Policy version the answer comes from.
    pub policy_version: u64,
}

/// One certificate of a chain, as shown to operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainLink {
    /// Subject DN.
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// URI SAN, if any.
    pub uri: Option<String>,
    /// Expiry, unix seconds.
    pub not_after: u64,
}

/// One identity this host holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldIdentity {
    /// SPIFFE ID.
    pub id: String,
    /// `node`, `service` or `ca-server`.
    pub kind: String,
    /// Validity start, unix seconds.
    pub not_before: u64,
    /// Expiry, unix seconds.
    pub not_after: u64,
    /// Planned renewal, unix seconds.
    pub renew_at: u64,
    /// Leaf serial, hex.
    pub serial: String,
    /// Services the node may hold (node SVIDs).
    pub scope: Vec<String>,
    /// The chain, leaf first.
    pub chain: Vec<ChainLink>,
}

/// A CA host known from gossip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaHost {
    /// Node name.
    pub node: String,
    /// Its tunnel address (where it serves `weft-ca/1`).
    pub addr: SocketAddr,
}

/// What `weft certs` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertsReport {
    /// Trust domain.
    pub trust_domain: String,
    /// Roots of the trust bundle in force.
    pub roots: Vec<ChainLink>,
    /// Identities held.
    pub identities: Vec<HeldIdentity>,
    /// Alive CA hosts other than this one.
    pub ca_hosts: Vec<CaHost>,
    /// Whether this host is a CA host.
    pub is_ca_host: bool,
}

/// One member's keyring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberKeys {
    /// Node name.
    pub node: String,
    /// Its state.
    pub state: weft_discovery::MemberState,
    /// Fingerprints, primary first.
    pub keyring: Vec<String>,
}

/// What `weft gossip keys` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeysReport {
    /// This agent's keyring, primary first.
    pub local: Vec<String>,
    /// Every alive or suspect member's keyring.
    pub members: Vec<MemberKeys>,
    /// Whether every such member uses the same primary key and holds the same keys.
    pub uniform: bool,
}

impl KeysReport {
    /// Builds the report from the local keyring and the members. Only alive or suspect
    /// members with a verified identity count: one without (revoked, not joined yet, or a
    /// rogue holding the gossip key) publishes no keyring anyone believes, and a gossip-key
    /// rotation is how such a host is shut out of gossip.
    pub fn new(local: Vec<String>, members: &[Member]) -> KeysReport {
        let members: Vec<MemberKeys> = members
            .iter()
            .filter(|m| m.state.is_routable() && m.identity.is_some())
            .map(|m| MemberKeys {
                node: m.name.clone(),
                state: m.state,
                keyring: m.keyring.clone(),
            })
            .collect();
        let uniform = members.iter().all(|m| {
            m.keyring.first() == local.first() && {
                let mut a = m.keyring.clone();
                let mut b = local.clone();
                a.sort();
                b.sort();
                a == b
            }
        });
        KeysReport {
            local,
            members,
            uniform,
        }
    }
}

/// `GET /v1/stat`: the inbound HTTP counters of every alive member, gathered by one agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatReport {
    /// The agent that gathered them.
    pub node: String,
    /// One entry per alive member (this agent included), by name.
    pub agents: Vec<AgentStat>,
}

/// One member's answer to a stats fetch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStat {
    /// Member name.
    pub node: String,
    /// Tunnel address asked.
    pub addr: Option<SocketAddr>,
    /// Its counters, if it answered.
    pub snapshot: Option<crate::agent::stats::AgentSnapshot>,
    /// Why it did not answer.
    pub error: Option<String>,
}
