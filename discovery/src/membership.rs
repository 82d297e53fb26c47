//! The running gossip member: starts chitchat over the sealed transport, publishes this
//! agent's node record and services, and turns chitchat's state into the [`Catalog`].
//!
//! Owns the chitchat handle. It never holds chitchat's lock across an await and never runs
//! long work under it: the refresh task copies what it needs and builds the catalog outside.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, ProtocolVersion,
    spawn_chitchat,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use weft_ca::attest::RecordSigner;
use weft_ca::tls::SharedBundle;

use crate::catalog::{Catalog, CatalogHandle, CatalogPublisher};
use crate::keyring::SharedKeyring;
use crate::metrics::GossipMetrics;
use crate::record::{
    self, Health, KEYRING_KEY, NODE_KEY, NodeRecord, REDEEMED_KEY, STATE_ALIVE, STATE_KEY,
    STATE_LEFT, ServiceKey, ServiceRecord,
};
use crate::signed::{self, ID_KEY, RawNode, RecordVerifier, Versioned};
use crate::transport::{SealConfig, SealedTransport};

/// Errors starting or driving the gossip member.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The gossip socket could not be opened.
    #[error("failed to start gossip on {addr}: {error}")]
    Start {
        /// Address we tried to bind.
        addr: SocketAddr,
        /// What chitchat or the OS said.
        error: anyhow::Error,
    },
    /// A health update named a service this agent does not publish.
    #[error("service {0} is not published by this agent")]
    UnknownService(ServiceKey),
}

/// How this agent takes part in gossip.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    /// Cluster name; members of other clusters are ignored (the trust domain).
    pub cluster: String,
    /// Local address to bind.
    pub bind: SocketAddr,
    /// Seed members, `host:port` (hostnames are re-resolved periodically).
    pub seeds: Vec<String>,
    /// Gossip round period.
    pub interval: Duration,
    /// How long a dead or left member stays listed before it is forgotten.
    pub dead_grace: Duration,
    /// Transport tuning.
    pub seal: SealConfig,
    /// The trust bundle records are verified against (swapped on SIGHUP).
    pub bundle: SharedBundle,
}

/// The local gossip member.
pub struct Membership {
    chitchat: ChitchatHandle,
    catalog: CatalogHandle,
    local: Arc<Mutex<LocalState>>,
    interval: Duration,
    stop_refresh: watch::Sender<bool>,
    refresh_task: JoinHandle<()>,
}

/// What this agent publishes, kept so single fields can be updated, and what it last wrote
/// into chitchat, so a value that someone else wrote under our name is noticed and replaced.
struct LocalState {
    node: NodeRecord,
    services: BTreeMap<ServiceKey, ServiceRecord>,
    /// Services published once and since removed: published as withdrawn (empty).
    withdrawn: BTreeSet<ServiceKey>,
    /// Small values under fixed keys (state, keyring, policy, redeemed tokens).
    fields: BTreeMap<&'static str, String>,
    /// The node SVID's signer; nothing is published before there is one.
    signer: Option<Arc<RecordSigner>>,
    /// The [`ID_KEY`] inner value for the current signer.
    id_inner: Option<String>,
    /// Exact values this agent wrote, by key.
    written: BTreeMap<String, String>,
}

impl LocalState {
    /// Every key and the inner value it should hold, [`ID_KEY`] first.
    fn desired(&self) -> Vec<(String, String)> {
        let mut values = Vec::with_capacity(self.services.len() + self.fields.len() + 2);
        if let Some(id) = &self.id_inner {
            values.push((ID_KEY.to_string(), id.clone()));
        }
        values.push((NODE_KEY.to_string(), record::encode(&self.node)));
        values.extend(
            self.fields
                .iter()
                .map(|(key, value)| (key.to_string(), value.clone())),
        );
        // A service outside the node SVID's scope would be refused by every receiver: it is
        // published as withdrawn (the agent warns about it when it signs its records).
        let in_scope = |key: &ServiceKey| {
            self.signer
                .as_ref()
                .is_some_and(|s| s.may_hold(&key.namespace, &key.name))
        };
        values.extend(self.services.iter().map(|(key, service)| {
            let inner = if in_scope(key) {
                record::encode(service)
            } else {
                String::new()
            };
            (key.gossip_key(), inner)
        }));
        values.extend(
            self.withdrawn
                .iter()
                .map(|key| (key.gossip_key(), String::new())),
        );
        values
    }

    /// Writes every value that chitchat does not hold as this agent last signed it: new or
    /// changed values, values someone else wrote under this agent's name, and everything
    /// after the signer changed. Runs under chitchat's lock; costs one signature per value
    /// written.
    fn sync(&mut self, state: &mut chitchat::NodeState) {
        let Some(signer) = self.signer.clone() else {
            return;
        };
        let id = state.chitchat_id().clone();
        for (key, inner) in self.desired() {
            let current = state.get(&key);
            let ours = self.written.get(&key);
            if ours.is_some_and(|ours| {
                Some(ours.as_str()) == current && signed::inner(ours) == Some(inner.as_str())
            }) {
                continue;
            }
            if current.is_some() && ours.is_none_or(|ours| Some(ours.as_str()) != current) {
                debug!(key, "replacing a value this agent did not write");
            }
            // chitchat gives the next value the next version; a state pushed near the end of
            // the version space by a forged delta cannot be written any more.
            let Some(seq) = state
                .max_version()
                .checked_add(1)
                .filter(|v| *v < u64::MAX / 2)
            else {
                warn!(
                    key,
                    version = state.max_version(),
                    "gossip version space exhausted; restart the agent for a new incarnation"
                );
                return;
            };
            match signed::seal(&signer, &id.node_id, id.generation_id, &key, seq, &inner) {
                Ok(value) => {
                    state.set(key.clone(), value.clone());
                    self.written.insert(key, value);
                }
                Err(error) => warn!(key, %error, "could not sign a gossip record"),
            }
        }
    }
}

impl Membership {
    /// Joins gossip as `node` (whose `gossip_addr` is advertised to peers) and starts
    /// publishing `services`.
    pub async fn start(
        config: MembershipConfig,
        node: NodeRecord,
        services: BTreeMap<ServiceKey, ServiceRecord>,
        keyring: SharedKeyring,
        metrics: GossipMetrics,
    ) -> Result<Membership, DiscoveryError> {
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        let chitchat_id = ChitchatId::new(node.name.clone(), generation, node.gossip_addr);
        let chitchat_config = ChitchatConfig {
            chitchat_id,
            cluster_id: config.cluster.clone(),
            gossip_interval: config.interval,
            listen_addr: config.bind,
            seed_nodes: config.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                initial_interval: config.interval,
                // Heartbeat gaps longer than `max_interval` are dropped as samples; keep it well
                // above the round period when operators lengthen the interval.
                max_interval: FailureDetectorConfig::default()
                    .max_interval
                    .max(config.interval * 10),
                dead_node_grace_period: config.dead_grace,
                ..FailureDetectorConfig::default()
            },
            marked_for_deletion_grace_period: config.dead_grace,
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V1,
        };
        let fingerprints = keyring.load().fingerprints().join(",");
        metrics.set_keyring_keys(keyring.load().keys().len());
        let local = Arc::new(Mutex::new(LocalState {
            node: node.clone(),
            services,
            withdrawn: BTreeSet::new(),
            fields: BTreeMap::from([
                (STATE_KEY, STATE_ALIVE.to_string()),
                (KEYRING_KEY, fingerprints),
            ]),
            signer: None,
            id_inner: None,
            written: BTreeMap::new(),
        }));
        // Nothing is published until the node SVID signs it (`set_signer`): until then the
        // agent gossips only its presence.
        let transport = SealedTransport::new(keyring, metrics.clone(), config.seal.clone());
        let chitchat = spawn_chitchat(chitchat_config, Vec::new(), &transport)
            .await
            .map_err(|error| DiscoveryError::Start {
                addr: config.bind,
                error,
            })?;
        info!(node = %node.name, generation, bind = %config.bind, seeds = ?config.seeds, "joined gossip");

        let (publisher, catalog) = CatalogPublisher::new();
        let (stop_refresh, stop_rx) = watch::channel(false);
        let refresh_task = tokio::spawn(refresh_loop(
            chitchat.chitchat(),
            local.clone(),
            publisher,
            RecordVerifier::new(metrics.clone()),
            config.bundle.clone(),
            metrics,
            config.interval,
            stop_rx,
        ));
        Ok(Membership {
            chitchat,
            catalog,
            local,
            interval: config.interval,
            stop_refresh,
            refresh_task,
        })
    }

    /// Resolves if the gossip server stops on its own (an error, or a panic inside chitchat,
    /// e.g. past the digest size limit): an agent must not keep running with a frozen view.
    pub fn failure(&self) -> impl std::future::Future<Output = String> + use<> {
        let terminated = self.chitchat.termination_watcher();
        async move {
            match terminated.await {
                Ok(()) => "the gossip server stopped".to_string(),
                Err(e) => format!("the gossip server failed: {e}"),
            }
        }
    }

    /// A handle to the catalog, for readers anywhere in the agent.
    pub fn catalog(&self) -> CatalogHandle {
        self.catalog.clone()
    }

    /// This incarnation's generation number.
    pub fn generation(&self) -> u64 {
        self.chitchat.chitchat_id().generation_id
    }

    /// Signs everything this agent publishes with `signer` (its node SVID, renewed or new)
    /// and publishes it: before the first signer, the agent gossips only its presence.
    pub async fn set_signer(&self, signer: Arc<RecordSigner>) {
        self.update(
            |local, name, generation| match signed::id_inner(&signer, name, generation) {
                Ok(id) => {
                    local.id_inner = Some(id);
                    local.signer = Some(signer.clone());
                    local.written.clear();
                }
                Err(error) => warn!(%error, "could not sign this node's identity record"),
            },
        )
        .await;
    }

    /// Replaces the published services: new ones appear, removed ones are withdrawn, and the
    /// last known health of a kept service is preserved unless `services` says otherwise.
    pub async fn set_services(&self, services: BTreeMap<ServiceKey, ServiceRecord>) {
        self.update(move |local, _, _| {
            for key in local.services.keys() {
                if !services.contains_key(key) {
                    local.withdrawn.insert(key.clone());
                }
            }
            for key in services.keys() {
                local.withdrawn.remove(key);
            }
            local.services = services.clone();
        })
        .await;
    }

    /// Publishes a new health result for one local service.
    pub async fn set_health(
        &self,
        service: &ServiceKey,
        health: Health,
    ) -> Result<(), DiscoveryError> {
        {
            let mut local = self
                .local
                .lock()
                .expect("local state lock is never poisoned");
            let instance = local
                .services
                .get_mut(service)
                .ok_or_else(|| DiscoveryError::UnknownService(service.clone()))?;
            instance.health = health;
        }
        self.update(|_, _, _| {}).await;
        Ok(())
    }

    /// Publishes the fingerprints of the keyring now in use, after a rotation step.
    pub async fn set_keyring_fingerprints(&self, fingerprints: &[String]) {
        let value = fingerprints.join(",");
        self.update(move |local, _, _| {
            local.fields.insert(KEYRING_KEY, value.clone());
        })
        .await;
    }

    /// Publishes the join-token ids this CA host redeemed.
    pub async fn set_redeemed_tokens(&self, ids: &[String]) {
        let value = ids.join(",");
        self.update(move |local, _, _| {
            local.fields.insert(REDEEMED_KEY, value.clone());
        })
        .await;
    }

    /// Advertises the signed bundle this agent enforces under `key` ([`crate::record::POLICY_KEY`] or
    /// [`crate::record::REVOCATIONS_KEY`]).
    pub async fn set_advert(&self, key: &'static str, advert: &crate::record::BundleAdvert) {
        let value = advert.encode();
        self.update(move |local, _, _| {
            local.fields.insert(key, value.clone());
        })
        .await;
    }

    /// Changes what is published with `change` (given the local state, this incarnation's
    /// name and generation) and writes what changed into chitchat.
    async fn update(&self, change: impl FnOnce(&mut LocalState, &str, u64) + Send) {
        let local = self.local.clone();
        let mut change = Some(change);
        self.chitchat
            .with_chitchat(move |c| {
                let id = c.self_chitchat_id().clone();
                let mut local = local.lock().expect("local state lock is never poisoned");
                if let Some(change) = change.take() {
                    change(&mut local, &id.node_id, id.generation_id);
                }
                local.sync(c.self_node_state());
            })
            .await;
    }

    /// Leaves gracefully: announces `left`, pushes it to every live peer at once, waits a
    /// gossip round so it spreads, then stops gossiping.
    pub async fn leave(self) {
        self.update(|local, _, _| {
            local.fields.insert(STATE_KEY, STATE_LEFT.to_string());
        })
        .await;
        let peers: Vec<SocketAddr> = self
            .chitchat
            .with_chitchat(|c| {
                let me = c.self_chitchat_id().clone();
                c.live_nodes()
                    .filter(|id| **id != me)
                    .map(|id| id.gossip_advertise_addr)
                    .collect()
            })
            .await;
        for peer in &peers {
            if let Err(error) = self.chitchat.gossip(*peer) {
                debug!(%peer, %error, "could not push leave");
            }
        }
        info!(peers = peers.len(), "announced leave");
        tokio::time::sleep(self.interval * 2).await;
        self.shutdown().await;
    }

    /// Stops gossiping without announcing anything (peers will detect us as dead).
    pub async fn shutdown(self) {
        let _ = self.stop_refresh.send(true);
        let _ = self.refresh_task.await;
        if let Err(error) = self.chitchat.shutdown().await {
            warn!(%error, "gossip server stopped with an error");
        }
    }
}

/// Rebuilds the catalog whenever chitchat reports a change, and at least twice per round
/// so heartbeat lateness (suspect) and dead members are noticed.
#[allow(clippy::too_many_arguments)]
async fn refresh_loop(
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    local: Arc<Mutex<LocalState>>,
    publisher: CatalogPublisher,
    mut verifier: RecordVerifier,
    bundle: SharedBundle,
    metrics: GossipMetrics,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut live_watcher = chitchat.lock().await.live_nodes_watcher();
    let mut tick = tokio::time::interval(interval / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeats = HeartbeatTracker::default();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            changed = live_watcher.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
        let now = SystemTime::now();
        // One bundle for the whole pass: what the verifier knows is only good under it.
        let trust = bundle.load_full();
        let snapshots = {
            let mut guard = chitchat.lock().await;
            // Our own values as we signed them, even if a forged delta overwrote one.
            local
                .lock()
                .expect("local state lock is never poisoned")
                .sync(guard.self_node_state());
            snapshot(&guard, &mut heartbeats, interval, &verifier, &trust, now)
        };
        let verified = verifier.verify(snapshots, &trust, now);
        let catalog = Catalog::build(verified);
        metrics.set_members(catalog.member_counts());
        publisher.publish(catalog);
    }
}

/// Copies what the catalog needs out of chitchat: every value's version, and the values
/// `verifier` has not checked at that version yet.
fn snapshot(
    chitchat: &chitchat::Chitchat,
    heartbeats: &mut HeartbeatTracker,
    interval: Duration,
    verifier: &RecordVerifier,
    bundle: &Arc<weft_ca::TrustBundle>,
    now: SystemTime,
) -> Vec<RawNode> {
    let me = chitchat.self_chitchat_id();
    let live: std::collections::HashSet<&ChitchatId> = chitchat.live_nodes().collect();
    let instant = Instant::now();
    let mut snapshots = Vec::with_capacity(chitchat.node_states().len());
    for (id, state) in chitchat.node_states() {
        let is_self = id == me;
        let is_live = is_self || live.contains(id);
        if heartbeats.is_joining(id, is_live, instant, interval) {
            continue;
        }
        let quiet_for = heartbeats.observe(id, u64::from(state.heartbeat()), instant);
        let late_after = chitchat
            .failure_detection_timeout(id)
            .map(|timeout| timeout / 2)
            .unwrap_or(interval * 4)
            .max(interval * 2);
        let id_version = state.get_versioned(ID_KEY).map_or(0, |v| v.version);
        let known = verifier.known(bundle, &id.node_id, id.generation_id, id_version, now);
        snapshots.push(RawNode {
            name: id.node_id.to_string(),
            generation: id.generation_id,
            live: is_live,
            late: !is_self && quiet_for > late_after,
            is_self,
            key_values: state
                .key_values_including_deleted()
                .filter(|(_, v)| !v.is_deleted())
                .map(|(k, v)| {
                    let value = Versioned {
                        version: v.version,
                        value: (!known.has(k, v.version)).then(|| v.value.clone()),
                    };
                    (k.to_string(), value)
                })
                .collect(),
        });
    }
    heartbeats.retain(|id| chitchat.node_states().contains_key(id));
    snapshots
}

/// How many gossip rounds a newly heard-of node may take to become live before it is listed
/// as dead. chitchat's failure detector calls a node dead until it has heartbeat samples,
/// which takes 2 to 3 rounds; showing a joining member as dead would mislead.
const JOIN_ROUNDS: u32 = 5;

/// Remembers when each node's heartbeat last moved (to tell late, suspect members) and which
/// nodes were ever live (to tell joining members from dead ones).
#[derive(Default)]
struct HeartbeatTracker {
    seen: HashMap<ChitchatId, (u64, Instant)>,
    first_heard: HashMap<ChitchatId, Instant>,
    ever_live: std::collections::HashSet<ChitchatId>,
}

impl HeartbeatTracker {
    /// Whether `id` is still joining: never live yet and first heard of less than
    /// [`JOIN_ROUNDS`] rounds ago.
    fn is_joining(
        &mut self,
        id: &ChitchatId,
        live: bool,
        now: Instant,
        interval: Duration,
    ) -> bool {
        if live {
            self.ever_live.insert(id.clone());
            return false;
        }
        if self.ever_live.contains(id) {
            return false;
        }
        let first = *self.first_heard.entry(id.clone()).or_insert(now);
        now.duration_since(first) < interval * JOIN_ROUNDS
    }

    /// Records `heartbeat` and returns how long it has been unchanged.
    fn observe(&mut self, id: &ChitchatId, heartbeat: u64, now: Instant) -> Duration {
        match self.seen.get_mut(id) {
            Some((last, since)) if *last == heartbeat => now.duration_since(*since),
            Some(entry) => {
                *entry = (heartbeat, now);
                Duration::ZERO
            }
            None => {
                self.seen.insert(id.clone(), (heartbeat, now));
                Duration::ZERO
            }
        }
    }

    fn retain(&mut self, keep: impl Fn(&ChitchatId) -> bool) {
        self.seen.retain(|id, _| keep(id));
        self.first_heard.retain(|id, _| keep(id));
        self.ever_live.retain(|id| keep(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> ChitchatId {
        ChitchatId::new(name.to_string(), 1, "127.0.0.1:7401".parse().unwrap())
    }

    #[test]
    fn a_node_never_live_is_joining_for_five_rounds_then_listed() {
        let mut tracker = HeartbeatTracker::default();
        let round = Duration::from_millis(100);
        let t0 = Instant::now();
        assert!(tracker.is_joining(&id("new"), false, t0, round));
        assert!(tracker.is_joining(&id("new"), false, t0 + round * 4, round));
        assert!(!tracker.is_joining(&id("new"), false, t0 + round * 5, round));
    }

    #[test]
    fn a_node_once_live_is_never_joining_again() {
        let mut tracker = HeartbeatTracker::default();
        let round = Duration::from_millis(100);
        let t0 = Instant::now();
        assert!(!tracker.is_joining(&id("a"), true, t0, round));
        assert!(!tracker.is_joining(&id("a"), false, t0 + round, round));
        tracker.retain(|_| false);
        assert!(tracker.is_joining(&id("a"), false, t0 + round * 2, round));
    }

    fn test_bundle() -> SharedBundle {
        let dir = tempfile::tempdir().unwrap();
        let td = weft_ca::TrustDomain::new("test.weft").unwrap();
        let out = weft_ca::pki::init(&td, "ops", dir.path()).unwrap();
        Arc::new(arc_swap::ArcSwap::from_pointee(out.bundle))
    }

    #[tokio::test]
    async fn a_gossip_server_that_dies_is_reported() {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let config = MembershipConfig {
            cluster: "test".into(),
            bind: addr,
            seeds: Vec::new(),
            interval: Duration::from_millis(100),
            dead_grace: Duration::from_secs(60),
            seal: SealConfig::default(),
            bundle: test_bundle(),
        };
        let node = NodeRecord {
            name: "a".into(),
            gossip_addr: addr,
            tunnel_addr: addr,
            labels: Default::default(),
            roles: Vec::new(),
            version: "test".into(),
            policy_version: 0,
            started_at: 0,
        };
        let keyring = crate::Keyring::single(crate::GossipKey::generate()).into_shared();
        let membership = Membership::start(
            config,
            node,
            BTreeMap::new(),
            keyring,
            GossipMetrics::unregistered(),
        )
        .await
        .unwrap();
        let failure = membership.failure();
        membership.chitchat.abort(); // what a panic inside chitchat's task amounts to
        let reason = tokio::time::timeout(Duration::from_secs(5), failure)
            .await
            .expect("failure reported");
        assert!(reason.contains("gossip server failed"), "{reason}");
    }

    #[test]
    fn quiet_time_counts_from_the_last_heartbeat_change() {
        let mut tracker = HeartbeatTracker::default();
        let t0 = Instant::now();
        let a = id("a");
        let (one, two) = (1, 2);
        assert_eq!(tracker.observe(&a, one, t0), Duration::ZERO);
        assert_eq!(
            tracker.observe(&a, one, t0 + Duration::from_secs(3)),
            Duration::from_secs(3)
        );
        assert_eq!(
            tracker.observe(&a, two, t0 + Duration::from_secs(4)),
            Duration::ZERO
        );
    }
}
