//! The agent's policy: the bundle in force (held by a [`SignedStore`], which verifies, orders
//! and persists it), its compiled form, and the decision point the proxy asks.
//!
//! A persisted bundle that no longer verifies makes the agent deny everything
//! (`policy_unavailable`) until a good bundle arrives: once policy was published, a damaged
//! file must not open the mesh.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tracing::error;
use weft_ca::SpiffeId;
use weft_ca::tls::SharedBundle;
use weft_discovery::{BundleAdvert, Member, ServiceKey};

use super::bundle_sync::Distributed;
use super::signed_store::{Held, SignedStore, StoreKind};
pub use super::signed_store::{OfferError, Offered};
use crate::policy::bundle::{PolicyFiles, VerifiedBundle};
use crate::policy::engine::{Decision, DecisionReason, Engine, Request};
use crate::proxy::l7::split::Splits;

/// The file, in `data_dir`, holding the last good bundle.
pub const POLICY_FILE: &str = "policy.bundle";

/// The policy in force.
pub struct ActivePolicy {
    /// The bundle it came from; `None` before any was published.
    pub bundle: Option<Arc<VerifiedBundle>>,
    /// Its compiled form.
    pub engine: Engine,
    /// Its TrafficSplits, compiled.
    pub splits: Splits,
}

impl ActivePolicy {
    /// What this agent advertises in gossip.
    pub fn advert(&self) -> Option<BundleAdvert> {
        self.bundle.as_ref().map(|b| b.advert())
    }

    /// The version in force, 0 before any.
    pub fn version(&self) -> u64 {
        self.bundle.as_ref().map_or(0, |b| b.version)
    }
}

/// Every decision reason, with whether it allows.
const REASONS: [DecisionReason; 7] = [
    DecisionReason::NotPublished,
    DecisionReason::NoPolicy,
    DecisionReason::AllowedByTarget,
    DecisionReason::Unavailable,
    DecisionReason::DefaultDeny,
    DecisionReason::NoMatchingTarget,
    DecisionReason::RouteNotMatched,
];

/// One counter per decision reason, in [`REASONS`] order, so counting costs no lookup.
fn decision_counters(registry: &Registry) -> prometheus::Result<Vec<IntCounter>> {
    let decisions = IntCounterVec::new(
        Opts::new(
            "weft_authz_decisions_total",
            "Authorization decisions on inbound connections and requests, by decision and reason.",
        ),
        &["decision", "reason"],
    )?;
    registry.register(Box::new(decisions.clone()))?;
    Ok(REASONS
        .iter()
        .map(|reason| {
            let allowed = matches!(
                reason,
                DecisionReason::NotPublished
                    | DecisionReason::NoPolicy
                    | DecisionReason::AllowedByTarget
            );
            decisions.with_label_values(&[if allowed { "allow" } else { "deny" }, reason.as_str()])
        })
        .collect())
}

impl Distributed for PolicyFiles {
    const ALPN: &'static [u8] = ALPN_POLICY;
    const KIND: &'static str = "policy";

    fn store(shared: &super::Shared) -> &Arc<SignedStore<Self>> {
        shared.policy.store()
    }

    fn advert(member: &Member) -> Option<&BundleAdvert> {
        member.policy.as_ref()
    }
}

/// ALPN of the policy fetch protocol.
pub const ALPN_POLICY: &[u8] = b"weft-policy/1";

/// The policy in force and the way to replace it.
pub struct PolicyStore {
    store: Arc<SignedStore<PolicyFiles>>,
    active: Arc<ArcSwap<ActivePolicy>>,
    decisions: Vec<IntCounter>,
}

impl PolicyStore {
    /// Loads the persisted bundle from `data_dir`, if any; bundles older than `min_version`
    /// are refused, the persisted one included.
    pub fn load(
        data_dir: &Path,
        trust: SharedBundle,
        min_version: u64,
        registry: &Registry,
    ) -> prometheus::Result<PolicyStore> {
        let decisions = decision_counters(registry)?;
        let active = Arc::new(ArcSwap::from_pointee(ActivePolicy {
            bundle: None,
            engine: Engine::unpublished(),
            splits: Splits::default(),
        }));
        let target = active.clone();
        let store = SignedStore::load(
            StoreKind {
                noun: "policy",
                file: POLICY_FILE,
                metrics: "weft_policy",
            },
            data_dir,
            trust,
            min_version,
            registry,
            Box::new(move |held| target.store(Arc::new(active_from(held)))),
        )?;
        Ok(PolicyStore {
            store: Arc::new(store),
            active,
            decisions,
        })
    }

    /// The signed store behind the policy, for fetching and serving bundles.
    pub fn store(&self) -> &Arc<SignedStore<PolicyFiles>> {
        &self.store
    }

    /// The policy in force.
    pub fn active(&self) -> Arc<ActivePolicy> {
        self.active.load_full()
    }

    /// Verifies `bytes` and, if newer than the bundle in force, persists and applies it.
    /// `origin` names where it came from, for logs.
    pub fn offer(&self, bytes: &[u8], origin: &str) -> Result<Offered, OfferError> {
        self.store.offer(bytes, origin)
    }

    fn count(&self, reason: DecisionReason) {
        if let Some(i) = REASONS.iter().position(|r| *r == reason) {
            self.decisions[i].inc();
        }
    }

    /// Decides one connection or request, and counts the decision.
    pub fn decide(&self, request: &Request<'_>) -> Decision {
        let decision = self.active.load().engine.decide(request);
        self.count(decision.reason);
        decision
    }

    /// [`Engine::decide_connection`], counting the decision when it lets the whole
    /// connection through (denials are counted per request by the HTTP gate).
    pub fn decide_connection(
        &self,
        source: &SpiffeId,
        destination: &ServiceKey,
        port: u16,
    ) -> Option<Decision> {
        let decision = self
            .active
            .load()
            .engine
            .decide_connection(source, destination, port);
        if let Some(decision) = decision.as_ref().filter(|d| d.allowed) {
            self.count(decision.reason);
        }
        decision
    }
}

/// The policy a held bundle makes: compiled when there is one, deny-all when the persisted
/// one was damaged, allow-all before any was published.
fn active_from(held: &Held<PolicyFiles>) -> ActivePolicy {
    match &held.bundle {
        Some(verified) => ActivePolicy {
            engine: Engine::new(&verified.compiled, verified.operator.trust_domain()),
            splits: Splits::new(&verified.compiled),
            bundle: Some(verified.clone()),
        },
        None if held.damaged => {
            error!("denying all inbound traffic until a good policy bundle arrives");
            ActivePolicy {
                bundle: None,
                engine: Engine::unavailable(),
                splits: Splits::default(),
            }
        }
        None => ActivePolicy {
            bundle: None,
            engine: Engine::unpublished(),
            splits: Splits::default(),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use arc_swap::ArcSwap;
    use prometheus::Registry;

    use super::*;
    use crate::policy::bundle::sign;
    use crate::policy::bundle::tests::{ALLOW_ALL, files, fixture};

    fn open(
        bytes: &[u8],
        trust: &weft_ca::TrustBundle,
        now: SystemTime,
    ) -> Result<VerifiedBundle, crate::policy::bundle::BundleError> {
        crate::policy::bundle::open(bytes, trust, now)
    }

    const TD: &str = "store.test";
    const DENY_ALL: &str =
        "apiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata: {name: mesh}\nspec: {default: deny}\n";

    fn store(data_dir: &Path, trust: &weft_ca::TrustBundle) -> (PolicyStore, Registry) {
        store_with_minimum(data_dir, trust, 0)
    }

    fn store_with_minimum(
        data_dir: &Path,
        trust: &weft_ca::TrustBundle,
        min_version: u64,
    ) -> (PolicyStore, Registry) {
        let registry = Registry::new();
        let store = PolicyStore::load(
            data_dir,
            Arc::new(ArcSwap::from_pointee(trust.clone())),
            min_version,
            &registry,
        )
        .unwrap();
        (store, registry)
    }

    #[test]
    fn bundles_below_the_minimum_version_are_refused_even_from_disk() {
        let f = fixture(TD);
        let data = f.dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let (first, _) = store(&data, &f.trust);
        let v5 = sign(files(ALLOW_ALL), 5, &f.signer).unwrap();
        first.offer(&v5, "test").unwrap();
        // The operator raised the floor past the persisted bundle: it is not enforced.
        let (second, registry) = store_with_minimum(&data, &f.trust, 6);
        assert_eq!(second.active().engine.state_name(), "unavailable");
        assert_eq!(counted(&registry, "refused", "below_min_version"), 1);
        let err = second.offer(&v5, "peer").unwrap_err();
        assert_eq!(err.reason(), "below_min_version");
        assert!(err.to_string().contains("min_version 6"), "{err}");
        let v6 = sign(files(ALLOW_ALL), 6, &f.signer).unwrap();
        assert_eq!(
            second.offer(&v6, "peer").unwrap(),
            Offered::Applied { version: 6 }
        );
    }

    fn counted(registry: &Registry, result: &str, reason: &str) -> u64 {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == "weft_policy_bundles_total")
            .flat_map(|f| f.get_metric())
            .filter(|m| {
                let labels: Vec<(&str, &str)> = m
                    .get_label()
                    .iter()
                    .map(|l| (l.name(), l.value()))
                    .collect();
                labels.contains(&("result", result)) && labels.contains(&("reason", reason))
            })
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    #[test]
    fn versions_only_go_up_and_conflicts_are_refused() {
        let f = fixture(TD);
        let data = f.dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let (store, registry) = store(&data, &f.trust);
        assert_eq!(store.active().engine.state_name(), "unpublished");
        let v5 = sign(files(ALLOW_ALL), 5, &f.signer).unwrap();
        assert_eq!(
            store.offer(&v5, "test").unwrap(),
            Offered::Applied { version: 5 }
        );
        assert_eq!(
            store.offer(&v5, "test").unwrap(),
            Offered::AlreadyCurrent { version: 5 }
        );
        let v4 = sign(files(DENY_ALL), 4, &f.signer).unwrap();
        assert_eq!(
            store.offer(&v4, "test").unwrap_err().reason(),
            "older_version"
        );
        // Same version, other content: the higher digest wins, on every agent alike.
        let other5 = sign(files(DENY_ALL), 5, &f.signer).unwrap();
        let held = store.active().bundle.as_ref().unwrap().digest.clone();
        let other = open(&other5, &f.trust, SystemTime::now()).unwrap().digest;
        let (low, high) = if other < held {
            (other5, v5)
        } else {
            (v5, other5)
        };
        let _ = store.offer(&high, "test");
        assert_eq!(
            store.offer(&low, "test").unwrap_err().reason(),
            "version_conflict"
        );
        assert_eq!(store.active().version(), 5);
        assert!((1..=2).contains(&counted(&registry, "applied", "")));
        assert_eq!(counted(&registry, "refused", "older_version"), 1);
        assert_eq!(counted(&registry, "refused", "version_conflict"), 1);
    }

    #[test]
    fn the_applied_bundle_persists_and_a_damaged_copy_fails_closed() {
        let f = fixture(TD);
        let data = f.dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let (first, _) = store(&data, &f.trust);
        let v9 = sign(files(DENY_ALL), 9, &f.signer).unwrap();
        first.offer(&v9, "test").unwrap();
        let file = data.join(POLICY_FILE);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A restart loads it.
        let (second, _) = store(&data, &f.trust);
        assert_eq!(second.active().version(), 9);
        // A damaged copy: everything is denied until a good bundle arrives.
        let mut bytes = std::fs::read(&file).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x01;
        std::fs::write(&file, &bytes).unwrap();
        let (third, registry) = store(&data, &f.trust);
        assert_eq!(third.active().engine.state_name(), "unavailable");
        let refused: u64 = ["bad_signature", "malformed", "untrusted_signer"]
            .iter()
            .map(|reason| counted(&registry, "refused", reason))
            .sum();
        assert_eq!(refused, 1, "the damaged copy is counted as refused");
        third.offer(&v9, "peer").unwrap();
        assert_eq!(third.active().engine.state_name(), "published");
    }
}
