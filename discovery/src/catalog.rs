//! The membership view and service catalog that the rest of the agent reads.
//!
//! [`Catalog::build`] is a pure function from gossip snapshots to the view, so every merging
//! rule (restarts, leaves, dead members, unhealthy endpoints) is unit-tested without sockets.
//! [`CatalogHandle`] publishes each new view lock-free: readers on the hot path do one atomic
//! load and never wait for the gossip task.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::record::{Health, NodeRecord, Protocol, ServiceKey, ServiceRecord};
use crate::signed::NodeIdentity;

/// A member's state as seen from this agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Heartbeats arrive on time.
    Alive,
    /// Heartbeats are late; the member still counts as alive for routing.
    Suspect,
    /// The failure detector declared it dead.
    Dead,
    /// It announced a graceful leave.
    Left,
}

impl MemberState {
    /// Index into [`crate::metrics::MEMBER_STATES`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The lower-case name used in output and metrics.
    pub fn as_str(self) -> &'static str {
        crate::metrics::MEMBER_STATES[self.index()]
    }

    /// Whether endpoints of a member in this state may receive traffic.
    pub fn is_routable(self) -> bool {
        matches!(self, MemberState::Alive | MemberState::Suspect)
    }
}

/// One gossip member (the newest incarnation of a node name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Node name.
    pub name: String,
    /// Incarnation number; grows on every restart.
    pub generation: u64,
    /// State as seen from here.
    pub state: MemberState,
    /// What the member published about itself; `None` until its record arrived.
    pub record: Option<NodeRecord>,
    /// Fingerprints of the member's gossip keyring, primary first.
    pub keyring: Vec<String>,
    /// Join-token ids this member redeemed (CA hosts only).
    #[serde(default)]
    pub redeemed_tokens: Vec<String>,
    /// The policy bundle the member says it enforces.
    #[serde(default)]
    pub policy: Option<crate::record::BundleAdvert>,
    /// The revocation bundle the member says it enforces.
    pub revocations: Option<crate::record::BundleAdvert>,
    /// The member's verified node identity; `None` for a member that has none yet (joining)
    /// or whose records did not verify: such a member is listed, never routed to.
    #[serde(default)]
    pub identity: Option<Arc<NodeIdentity>>,
    /// Whether this member is the local agent.
    pub is_self: bool,
}

/// One place a service can be reached: a service instance on a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Node that runs the instance.
    pub node: String,
    /// The node's tunnel address.
    pub tunnel_addr: SocketAddr,
    /// Port of the app on its host.
    pub port: u16,
    /// Application protocol.
    pub protocol: Protocol,
    /// Last local health-check result.
    pub health: Health,
    /// Relative load-balancing weight.
    pub weight: u32,
    /// The node's labels (for locality).
    pub labels: BTreeMap<String, String>,
    /// Whether the instance runs on this host.
    pub is_local: bool,
}

impl Endpoint {
    /// Whether load balancing may pick this endpoint.
    pub fn is_routable(&self) -> bool {
        self.health.is_routable()
    }
}

/// What the gossip layer knows about one chitchat node (one incarnation), after
/// [`crate::signed::RecordVerifier`] kept only what the node signed, as input to
/// [`Catalog::build`].
#[derive(Debug, Clone)]
pub struct NodeSnapshot {
    /// Node name.
    pub name: String,
    /// Incarnation number.
    pub generation: u64,
    /// Whether the failure detector considers it alive (always true for self).
    pub live: bool,
    /// Whether its heartbeat has been late for long enough to be suspected.
    pub late: bool,
    /// Whether it is the local agent.
    pub is_self: bool,
    /// Its verified identity, if it has one.
    pub identity: Option<Arc<NodeIdentity>>,
    /// Its verified key-values (signature envelopes removed), shared with the verifier's
    /// cache so a refresh copies none of them.
    pub key_values: BTreeMap<String, Arc<str>>,
}

/// The membership view and the service catalog at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    /// Members by name, newest incarnation only.
    pub members: BTreeMap<String, Member>,
    /// Every endpoint of every service, including unhealthy ones, ordered by node name.
    pub services: BTreeMap<ServiceKey, Vec<Endpoint>>,
}

impl Catalog {
    /// Builds the view from the nodes gossip knows about.
    ///
    /// Rules: a node name is one member: its newest *verified* incarnation, whatever
    /// unverified ones claim (a restart replaces the old incarnation; an impostor with a
    /// higher generation does not); a name with no verified incarnation is listed without a
    /// record and routes nothing. A member that published `left` is left whatever the failure
    /// detector says; only alive or suspect members contribute endpoints; records that do not
    /// parse, and withdrawn (empty) services, are ignored.
    pub fn build(nodes: impl IntoIterator<Item = NodeSnapshot>) -> Catalog {
        let mut newest: BTreeMap<String, NodeSnapshot> = BTreeMap::new();
        for node in nodes {
            let rank = |n: &NodeSnapshot| (n.identity.is_some(), n.generation);
            match newest.get(&node.name) {
                Some(known) if rank(known) >= rank(&node) => {}
                _ => {
                    newest.insert(node.name.clone(), node);
                }
            }
        }

        let mut catalog = Catalog::default();
        for (name, node) in newest {
            let record: Option<NodeRecord> = node
                .key_values
                .get(crate::record::NODE_KEY)
                .and_then(|v| crate::record::decode(v));
            let left = node.key_values.get(crate::record::STATE_KEY).map(|v| &**v)
                == Some(crate::record::STATE_LEFT);
            let state = if left {
                MemberState::Left
            } else if !node.live {
                MemberState::Dead
            } else if node.late {
                MemberState::Suspect
            } else {
                MemberState::Alive
            };
            let list = |key: &str| -> Vec<String> {
                node.key_values
                    .get(key)
                    .map(|v| {
                        v.split(',')
                            .filter(|s| !s.is_empty())
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let keyring = list(crate::record::KEYRING_KEY);
            let redeemed_tokens = list(crate::record::REDEEMED_KEY);
            let advert = |key: &str| {
                node.key_values
                    .get(key)
                    .and_then(|v| crate::record::BundleAdvert::decode(v))
            };
            let policy = advert(crate::record::POLICY_KEY);
            let revocations = advert(crate::record::REVOCATIONS_KEY);

            if let (Some(record), true) = (&record, state.is_routable()) {
                for (key, value) in &node.key_values {
                    let Some(suffix) = key.strip_prefix(crate::record::SERVICE_PREFIX) else {
                        continue;
                    };
                    if value.is_empty() {
                        continue; // withdrawn by its node
                    }
                    let (Some(service), Some(instance)) = (
                        ServiceKey::from_gossip_suffix(suffix),
                        crate::record::decode::<ServiceRecord>(value),
                    ) else {
                        continue;
                    };
                    catalog.services.entry(service).or_default().push(Endpoint {
                        node: name.clone(),
                        tunnel_addr: record.tunnel_addr,
                        port: instance.port,
                        protocol: instance.protocol,
                        health: instance.health,
                        weight: instance.weight,
                        labels: record.labels.clone(),
                        is_local: node.is_self,
                    });
                }
            }
            catalog.members.insert(
                name.clone(),
                Member {
                    name,
                    generation: node.generation,
                    state,
                    record,
                    keyring,
                    redeemed_tokens,
                    policy,
                    revocations,
                    identity: node.identity,
                    is_self: node.is_self,
                },
            );
        }
        catalog
    }

    /// Member counts in [`crate::metrics::MEMBER_STATES`] order.
    pub fn member_counts(&self) -> [usize; 4] {
        let mut counts = [0; 4];
        for member in self.members.values() {
            counts[member.state.index()] += 1;
        }
        counts
    }

    /// Every endpoint of `service`, healthy or not.
    pub fn endpoints(&self, service: &ServiceKey) -> &[Endpoint] {
        self.services.get(service).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The endpoints of `service` that load balancing may pick.
    pub fn routable_endpoints<'a>(
        &'a self,
        service: &ServiceKey,
    ) -> impl Iterator<Item = &'a Endpoint> + 'a {
        self.endpoints(service).iter().filter(|e| e.is_routable())
    }
}

/// Shared, lock-free access to the newest [`Catalog`], plus change notification.
#[derive(Clone)]
pub struct CatalogHandle {
    current: Arc<ArcSwap<Catalog>>,
    changes: watch::Receiver<u64>,
}

/// The writing side of a [`CatalogHandle`], owned by the gossip task.
pub struct CatalogPublisher {
    current: Arc<ArcSwap<Catalog>>,
    changes: watch::Sender<u64>,
}

impl CatalogPublisher {
    /// A publisher holding an empty catalog, and its handle.
    pub fn new() -> (CatalogPublisher, CatalogHandle) {
        let current = Arc::new(ArcSwap::from_pointee(Catalog::default()));
        let (changes_tx, changes_rx) = watch::channel(0);
        (
            CatalogPublisher {
                current: current.clone(),
                changes: changes_tx,
            },
            CatalogHandle {
                current,
                changes: changes_rx,
            },
        )
    }

    /// Publishes `catalog` if it differs from the current one; returns whether it did.
    pub fn publish(&self, catalog: Catalog) -> bool {
        if **self.current.load() == catalog {
            return false;
        }
        self.current.store(Arc::new(catalog));
        self.changes.send_modify(|version| *version += 1);
        true
    }
}

impl CatalogHandle {
    /// The newest catalog (one atomic load; never blocks).
    pub fn current(&self) -> Arc<Catalog> {
        self.current.load_full()
    }

    /// Waits until a catalog newer than the last one this handle saw is published.
    /// Returns an error once the gossip task is gone.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        self.changes.changed().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{self, NODE_KEY, STATE_KEY, STATE_LEFT};

    fn node(name: &str, generation: u64, live: bool) -> NodeSnapshot {
        let record = NodeRecord {
            name: name.into(),
            gossip_addr: "127.0.0.1:7401".parse().unwrap(),
            tunnel_addr: "127.0.0.1:7402".parse().unwrap(),
            labels: BTreeMap::from([("zone".into(), "a".into())]),
            roles: vec![],
            version: "0.1.0".into(),
            policy_version: 0,
            started_at: 1,
        };
        NodeSnapshot {
            name: name.into(),
            generation,
            live,
            late: false,
            is_self: false,
            identity: Some(Arc::new(NodeIdentity {
                serial_hex: format!("{generation:02x}"),
                not_after: u64::MAX,
                is_ca: false,
            })),
            key_values: BTreeMap::from([(NODE_KEY.to_string(), record::encode(&record).into())]),
        }
    }

    /// What the verifier leaves of an incarnation none of whose values verified.
    fn unverified(name: &str, generation: u64) -> NodeSnapshot {
        NodeSnapshot {
            identity: None,
            key_values: BTreeMap::new(),
            ..node(name, generation, true)
        }
    }

    #[test]
    fn an_unverified_incarnation_never_hides_a_verified_one() {
        let real = with_service(node("web-1", 1, true), "api", Health::Passing);
        for impostor in [unverified("web-1", 2), unverified("web-1", u64::MAX)] {
            let catalog = Catalog::build([impostor, real.clone()]);
            let member = &catalog.members["web-1"];
            assert_eq!((member.generation, member.state), (1, MemberState::Alive));
            assert!(member.identity.is_some());
            assert_eq!(
                catalog
                    .routable_endpoints(&ServiceKey::new("default", "api"))
                    .count(),
                1
            );
        }
    }

    #[test]
    fn a_name_with_no_verified_incarnation_is_listed_but_routes_nothing() {
        let catalog = Catalog::build([unverified("joining", 7)]);
        let member = &catalog.members["joining"];
        assert!(member.record.is_none() && member.identity.is_none());
        assert!(catalog.services.is_empty());
    }

    #[test]
    fn a_withdrawn_service_has_no_endpoint() {
        let mut n = with_service(node("a", 1, true), "api", Health::Passing);
        n.key_values.insert("svc:default/old".into(), "".into());
        let catalog = Catalog::build([n]);
        assert_eq!(catalog.services.len(), 1);
        assert!(
            catalog
                .services
                .contains_key(&ServiceKey::new("default", "api"))
        );
    }

    fn with_service(mut node: NodeSnapshot, service: &str, health: Health) -> NodeSnapshot {
        let instance = ServiceRecord {
            port: 8080,
            protocol: Protocol::Http,
            health,
            weight: 1,
        };
        node.key_values.insert(
            ServiceKey::new("default", service).gossip_key(),
            record::encode(&instance).into(),
        );
        node
    }

    #[test]
    fn a_restarted_node_is_one_member_with_its_newest_generation() {
        let old = with_service(node("web-1", 1, false), "api", Health::Passing);
        let new = with_service(node("web-1", 2, true), "api", Health::Passing);
        let catalog = Catalog::build([new, old]);
        assert_eq!(catalog.members.len(), 1);
        let member = &catalog.members["web-1"];
        assert_eq!((member.generation, member.state), (2, MemberState::Alive));
        assert_eq!(
            catalog.endpoints(&ServiceKey::new("default", "api")).len(),
            1
        );
    }

    #[test]
    fn dead_members_contribute_no_endpoints() {
        let dead = with_service(node("web-1", 1, false), "api", Health::Passing);
        let catalog = Catalog::build([dead]);
        assert_eq!(catalog.members["web-1"].state, MemberState::Dead);
        assert!(catalog.services.is_empty());
    }

    #[test]
    fn a_member_that_left_is_left_even_while_still_live() {
        let mut leaving = with_service(node("web-1", 1, true), "api", Health::Passing);
        leaving
            .key_values
            .insert(STATE_KEY.into(), STATE_LEFT.into());
        let catalog = Catalog::build([leaving]);
        assert_eq!(catalog.members["web-1"].state, MemberState::Left);
        assert!(catalog.services.is_empty());
    }

    #[test]
    fn late_heartbeats_make_a_suspect_that_still_routes() {
        let mut late = with_service(node("web-1", 1, true), "api", Health::Passing);
        late.late = true;
        let catalog = Catalog::build([late]);
        assert_eq!(catalog.members["web-1"].state, MemberState::Suspect);
        assert_eq!(catalog.member_counts(), [0, 1, 0, 0]);
        assert_eq!(
            catalog
                .routable_endpoints(&ServiceKey::new("default", "api"))
                .count(),
            1
        );
    }

    #[test]
    fn failing_endpoints_are_listed_but_not_routable() {
        let a = with_service(node("a", 1, true), "api", Health::Passing);
        let b = with_service(node("b", 1, true), "api", Health::Failing);
        let catalog = Catalog::build([a, b]);
        let api = ServiceKey::new("default", "api");
        assert_eq!(catalog.endpoints(&api).len(), 2);
        let routable: Vec<_> = catalog.routable_endpoints(&api).map(|e| &e.node).collect();
        assert_eq!(routable, ["a"]);
    }

    #[test]
    fn garbage_records_are_ignored() {
        let mut n = node("a", 1, true);
        n.key_values
            .insert("svc:default/api".into(), "{garbage".into());
        n.key_values.insert("svc:nonamespace".into(), "{}".into());
        let catalog = Catalog::build([n]);
        assert!(catalog.services.is_empty());
        let mut no_record = node("b", 1, true);
        no_record.key_values.insert(NODE_KEY.into(), "[]".into());
        let no_record = with_service(no_record, "api", Health::Passing);
        let catalog = Catalog::build([no_record]);
        assert!(catalog.members["b"].record.is_none());
        assert!(catalog.services.is_empty());
    }

    #[test]
    fn publishing_an_identical_catalog_does_not_notify() {
        let (publisher, mut handle) = CatalogPublisher::new();
        assert!(publisher.publish(Catalog::build([node("a", 1, true)])));
        assert!(handle.changes.has_changed().unwrap());
        handle.changes.borrow_and_update();
        assert!(!publisher.publish(Catalog::build([node("a", 1, true)])));
        assert!(!handle.changes.has_changed().unwrap());
        assert_eq!(handle.current().members.len(), 1);
    }
}
