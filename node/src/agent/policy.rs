//! The agent's policy: the bundle in force, how a new one is accepted (from `weft policy
//! apply` through the admin API, or fetched from a peer), persisted, and advertised, and the
//! decision point the proxy asks.
//!
//! A bundle replaces the one in force only if it verifies against the trust bundle and comes
//! later in the order of (version, digest): a higher version, or, when two operators published
//! the same version at once, the higher digest, so every agent settles on the same bundle. The
//! accepted bundle is written to `data_dir/policy.bundle` (0600, atomically) before it takes
//! effect, so a restart enforces it even with no peers. A persisted bundle that no longer
//! verifies makes the agent deny everything (`policy_unavailable`) until a good bundle
//! arrives: once policy was published, a damaged file must not open the mesh.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::watch;
use tracing::{error, info, warn};
use weft_ca::SpiffeId;
use weft_ca::tls::SharedBundle;
use weft_discovery::{PolicyAdvert, ServiceKey};

use crate::identity::write_atomic;
use crate::policy::bundle::{self, BundleError, VerifiedBundle};
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
    pub fn advert(&self) -> Option<PolicyAdvert> {
        self.bundle.as_ref().map(|b| PolicyAdvert {
            version: b.version,
            digest: b.digest.clone(),
        })
    }

    /// The version in force, 0 before any.
    pub fn version(&self) -> u64 {
        self.bundle.as_ref().map_or(0, |b| b.version)
    }
}

/// What became of an offered bundle that was not refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// It is now in force.
    Applied {
        /// Its version.
        version: u64,
    },
    /// It is the bundle already in force.
    AlreadyCurrent {
        /// Its version.
        version: u64,
    },
}

/// Why an offered bundle was refused; the bundle in force stays.
#[derive(Debug, thiserror::Error)]
pub enum OfferError {
    /// It did not verify.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// Its version is not newer than the one in force.
    #[error("policy version {offered} is older than version {current} in force")]
    Older {
        /// The offered version.
        offered: u64,
        /// The version in force.
        current: u64,
    },
    /// Same version as the one in force, and a lower digest (the higher digest wins a tie).
    #[error(
        "policy version {version} is already in force with another content; apply with a higher version"
    )]
    Conflict {
        /// The version both claim.
        version: u64,
    },
    /// Its version is below `[policy] min_version`.
    #[error("policy version {offered} is below policy.min_version {minimum} of this agent")]
    BelowMinimum {
        /// The offered version.
        offered: u64,
        /// The configured floor.
        minimum: u64,
    },
    /// It could not be persisted, so it was not applied.
    #[error("cannot persist the policy bundle to {path}: {reason}")]
    Persist {
        /// Where.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl OfferError {
    /// A short label for metrics (`reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            OfferError::Bundle(e) => e.reason(),
            OfferError::Older { .. } => "older_version",
            OfferError::Conflict { .. } => "version_conflict",
            OfferError::BelowMinimum { .. } => "below_min_version",
            OfferError::Persist { .. } => "persist_failed",
        }
    }
}

/// Policy metrics.
struct PolicyMetrics {
    version: IntGauge,
    bundles: IntCounterVec,
    /// One counter per decision reason, in [`REASONS`] order, so counting costs no lookup.
    decisions: Vec<IntCounter>,
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

impl PolicyMetrics {
    fn new(registry: &Registry) -> prometheus::Result<PolicyMetrics> {
        let version = IntGauge::new(
            "weft_policy_version",
            "Version of the policy bundle in force (0: none published).",
        )?;
        let bundles = IntCounterVec::new(
            Opts::new(
                "weft_policy_bundles_total",
                "Policy bundles offered to this agent, by result (applied, current, refused) and reason.",
            ),
            &["result", "reason"],
        )?;
        let decisions_vec = IntCounterVec::new(
            Opts::new(
                "weft_authz_decisions_total",
                "Authorization decisions on inbound connections and requests, by decision and reason.",
            ),
            &["decision", "reason"],
        )?;
        registry.register(Box::new(version.clone()))?;
        registry.register(Box::new(bundles.clone()))?;
        registry.register(Box::new(decisions_vec.clone()))?;
        let decisions = REASONS
            .iter()
            .map(|reason| {
                let allowed = matches!(
                    reason,
                    DecisionReason::NotPublished
                        | DecisionReason::NoPolicy
                        | DecisionReason::AllowedByTarget
                );
                decisions_vec
                    .with_label_values(&[if allowed { "allow" } else { "deny" }, reason.as_str()])
            })
            .collect();
        Ok(PolicyMetrics {
            version,
            bundles,
            decisions,
        })
    }

    fn decision(&self, reason: DecisionReason) {
        if let Some(i) = REASONS.iter().position(|r| *r == reason) {
            self.decisions[i].inc();
        }
    }
}

/// The policy in force and the way to replace it.
pub struct PolicyStore {
    active: ArcSwap<ActivePolicy>,
    /// Serializes offers, so versions only go up.
    offer_lock: Mutex<()>,
    path: PathBuf,
    trust: SharedBundle,
    /// `[policy] min_version`: older bundles are refused.
    min_version: u64,
    metrics: PolicyMetrics,
    changed: watch::Sender<u64>,
}

/// Refuses `version` below the configured floor.
fn check_minimum(version: u64, minimum: u64) -> Result<(), OfferError> {
    if version < minimum {
        return Err(OfferError::BelowMinimum {
            offered: version,
            minimum,
        });
    }
    Ok(())
}

/// [`PolicyStore::offer`] on tokio's blocking pool: verifying and compiling a large set takes
/// long (about 2 s for 1,000 TrafficTargets on one core) and must not hold up a runtime
/// thread that carries traffic.
pub async fn offer_off_runtime(
    shared: Arc<super::Shared>,
    bytes: impl AsRef<[u8]> + Send + 'static,
    origin: String,
) -> Result<Offered, OfferError> {
    match tokio::task::spawn_blocking(move || shared.policy.offer(bytes.as_ref(), &origin)).await {
        Ok(result) => result,
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
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
        let metrics = PolicyMetrics::new(registry)?;
        let path = data_dir.join(POLICY_FILE);
        let opened = |bytes: &[u8]| -> Result<VerifiedBundle, OfferError> {
            let verified = bundle::open_persisted(bytes, &trust.load(), SystemTime::now())?;
            check_minimum(verified.version, min_version)?;
            Ok(verified)
        };
        let active = match std::fs::read(&path) {
            Ok(bytes) => match opened(&bytes) {
                Ok(verified) => {
                    info!(version = verified.version, digest = %verified.digest, "enforcing the persisted policy bundle");
                    active_from(verified)
                }
                Err(e) => {
                    error!(path = %path.display(), error = %e, "the persisted policy bundle does not verify; denying all inbound traffic until a good bundle arrives");
                    metrics
                        .bundles
                        .with_label_values(&["refused", e.reason()])
                        .inc();
                    ActivePolicy {
                        bundle: None,
                        engine: Engine::unavailable(),
                        splits: Splits::default(),
                    }
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ActivePolicy {
                bundle: None,
                engine: Engine::unpublished(),
                splits: Splits::default(),
            },
            Err(e) => {
                error!(path = %path.display(), error = %e, "cannot read the persisted policy bundle; denying all inbound traffic until a good bundle arrives");
                ActivePolicy {
                    bundle: None,
                    engine: Engine::unavailable(),
                    splits: Splits::default(),
                }
            }
        };
        metrics.version.set(active.version() as i64);
        let (changed, _) = watch::channel(active.version());
        Ok(PolicyStore {
            active: ArcSwap::from_pointee(active),
            offer_lock: Mutex::new(()),
            path,
            trust,
            min_version,
            metrics,
            changed,
        })
    }

    /// `[policy] min_version`.
    pub fn min_version(&self) -> u64 {
        self.min_version
    }

    /// The policy in force.
    pub fn active(&self) -> Arc<ActivePolicy> {
        self.active.load_full()
    }

    /// Changes to the version in force.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Verifies `bytes` and, if newer than the bundle in force, persists and applies it.
    /// `origin` names where it came from, for logs.
    pub fn offer(&self, bytes: &[u8], origin: &str) -> Result<Offered, OfferError> {
        let _serial = self
            .offer_lock
            .lock()
            .expect("offer lock is never poisoned");
        let result = self.try_offer(bytes);
        match &result {
            Ok(Offered::Applied { version }) => {
                info!(version, %origin, "policy bundle applied");
                self.metrics
                    .bundles
                    .with_label_values(&["applied", ""])
                    .inc();
            }
            Ok(Offered::AlreadyCurrent { .. }) => {
                self.metrics
                    .bundles
                    .with_label_values(&["current", ""])
                    .inc();
            }
            Err(e) => {
                warn!(%origin, reason = e.reason(), error = %e, "policy bundle refused; the one in force stays");
                self.metrics
                    .bundles
                    .with_label_values(&["refused", e.reason()])
                    .inc();
            }
        }
        result
    }

    fn try_offer(&self, bytes: &[u8]) -> Result<Offered, OfferError> {
        let verified = bundle::open(bytes, &self.trust.load(), SystemTime::now())?;
        check_minimum(verified.version, self.min_version)?;
        let current = self.active.load();
        if let Some(held) = &current.bundle {
            // Bundles are ordered by (version, digest): two operators who publish the same
            // version at once still leave every agent on the same one.
            if verified.version == held.version {
                return match verified.digest.cmp(&held.digest) {
                    std::cmp::Ordering::Equal => Ok(Offered::AlreadyCurrent {
                        version: held.version,
                    }),
                    std::cmp::Ordering::Less => Err(OfferError::Conflict {
                        version: held.version,
                    }),
                    std::cmp::Ordering::Greater => self.apply(verified),
                };
            }
            if verified.version < held.version {
                return Err(OfferError::Older {
                    offered: verified.version,
                    current: held.version,
                });
            }
        }
        self.apply(verified)
    }

    fn apply(&self, verified: VerifiedBundle) -> Result<Offered, OfferError> {
        write_atomic(&self.path, &verified.bytes, 0o600).map_err(|e| OfferError::Persist {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let version = verified.version;
        self.active.store(Arc::new(active_from(verified)));
        self.metrics.version.set(version as i64);
        self.changed.send_replace(version);
        Ok(Offered::Applied { version })
    }

    /// Decides one connection or request, and counts the decision.
    pub fn decide(&self, request: &Request<'_>) -> Decision {
        let decision = self.active.load().engine.decide(request);
        self.metrics.decision(decision.reason);
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
            self.metrics.decision(decision.reason);
        }
        decision
    }
}

fn active_from(verified: VerifiedBundle) -> ActivePolicy {
    let trust_domain = verified.operator.trust_domain().clone();
    let engine = Engine::new(&verified.set, &trust_domain);
    let splits = Splits::new(&verified.set);
    ActivePolicy {
        bundle: Some(Arc::new(verified)),
        engine,
        splits,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arc_swap::ArcSwap;
    use prometheus::Registry;

    use super::*;
    use crate::policy::bundle::tests::{ALLOW_ALL, files, fixture};
    use crate::policy::bundle::{open, sign};

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
