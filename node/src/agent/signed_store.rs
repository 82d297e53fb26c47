//! One store for every kind of operator-signed bundle (policy, revocations): how a bundle is
//! accepted (from the CLI through the admin API, or fetched from a peer), ordered, persisted
//! and advertised.
//!
//! A bundle replaces the one held only if it verifies against the trust bundle and comes
//! later in the order of (version, digest): a higher version, or, when two operators published
//! the same version at once, the higher digest, so every agent settles on the same bundle. The
//! accepted bundle is written to `data_dir/FILE` (0600, atomically) before it takes effect,
//! so a restart enforces it even with no peers. What a kind does with its bundle once held
//! (compile policy, install revocations) is its `install` hook, run under the same lock that
//! orders offers, so installs happen in version order.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::watch;
use tracing::{error, info, warn};
use weft_ca::tls::SharedBundle;
use weft_discovery::BundleAdvert;

use crate::identity::write_atomic;
use crate::policy::bundle::{self, BundleError, Content, Verified};

/// What a store holds: the bundle in force, or why there is none.
pub struct Held<C: Content> {
    /// The bundle in force; `None` before any was published, or when the persisted one was
    /// damaged.
    pub bundle: Option<Arc<Verified<C>>>,
    /// The persisted bundle could not be read or no longer verifies.
    pub damaged: bool,
}

impl<C: Content> Held<C> {
    /// What this agent advertises in gossip.
    pub fn advert(&self) -> Option<BundleAdvert> {
        self.bundle.as_ref().map(|b| b.advert())
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
    #[error("version {offered} is older than version {current} in force")]
    Older {
        /// The offered version.
        offered: u64,
        /// The version in force.
        current: u64,
    },
    /// Same version as the one in force, and a lower digest (the higher digest wins a tie).
    #[error("version {version} is already in force with another content; publish a higher version")]
    Conflict {
        /// The version both claim.
        version: u64,
    },
    /// Its version is below the configured floor (`[policy] min_version`).
    #[error("version {offered} is below policy.min_version {minimum} of this agent")]
    BelowMinimum {
        /// The offered version.
        offered: u64,
        /// The configured floor.
        minimum: u64,
    },
    /// It could not be persisted, so it was not applied.
    #[error("cannot persist the bundle to {path}: {reason}")]
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

/// What differs between kinds of store.
pub struct StoreKind {
    /// For logs: "policy", "revocation".
    pub noun: &'static str,
    /// The file in `data_dir` holding the last good bundle.
    pub file: &'static str,
    /// Prefix of the metrics `PREFIX_version` and `PREFIX_bundles_total`.
    pub metrics: &'static str,
}

/// Run whenever the bundle held changes (and once at load).
pub type Install<C> = Box<dyn Fn(&Held<C>) + Send + Sync>;

/// The bundle of one kind in force and the way to replace it.
pub struct SignedStore<C: Content> {
    kind: StoreKind,
    held: ArcSwap<Held<C>>,
    /// Serializes offers, so versions only go up and installs follow in order.
    offer_lock: Mutex<()>,
    path: PathBuf,
    trust: SharedBundle,
    min_version: u64,
    version: IntGauge,
    bundles: IntCounterVec,
    changed: watch::Sender<u64>,
    install: Install<C>,
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

impl<C: Content> SignedStore<C> {
    /// Loads the persisted bundle from `data_dir`, if any (refusing it below `min_version`),
    /// and installs what it holds.
    pub fn load(
        kind: StoreKind,
        data_dir: &Path,
        trust: SharedBundle,
        min_version: u64,
        registry: &Registry,
        install: Install<C>,
    ) -> prometheus::Result<SignedStore<C>> {
        let version = IntGauge::new(
            format!("{}_version", kind.metrics),
            format!(
                "Version of the {} bundle in force (0: none published).",
                kind.noun
            ),
        )?;
        let bundles = IntCounterVec::new(
            Opts::new(
                format!("{}_bundles_total", kind.metrics),
                format!(
                    "{} bundles offered to this agent, by result (applied, current, refused) and reason.",
                    kind.noun
                ),
            ),
            &["result", "reason"],
        )?;
        registry.register(Box::new(version.clone()))?;
        registry.register(Box::new(bundles.clone()))?;
        let path = data_dir.join(kind.file);
        let opened = |bytes: &[u8]| -> Result<Verified<C>, OfferError> {
            let verified = bundle::open_persisted(bytes, &trust.load(), SystemTime::now())?;
            check_minimum(verified.version, min_version)?;
            Ok(verified)
        };
        let noun = kind.noun;
        let held = match std::fs::read(&path) {
            Ok(bytes) => match opened(&bytes) {
                Ok(verified) => {
                    info!(version = verified.version, digest = %verified.digest, "enforcing the persisted {noun} bundle");
                    Held {
                        bundle: Some(Arc::new(verified)),
                        damaged: false,
                    }
                }
                Err(e) => {
                    error!(path = %path.display(), error = %e, "the persisted {noun} bundle does not verify");
                    bundles.with_label_values(&["refused", e.reason()]).inc();
                    Held {
                        bundle: None,
                        damaged: true,
                    }
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Held {
                bundle: None,
                damaged: false,
            },
            Err(e) => {
                error!(path = %path.display(), error = %e, "cannot read the persisted {noun} bundle");
                Held {
                    bundle: None,
                    damaged: true,
                }
            }
        };
        version.set(held.version() as i64);
        install(&held);
        let (changed, _) = watch::channel(held.version());
        Ok(SignedStore {
            kind,
            held: ArcSwap::from_pointee(held),
            offer_lock: Mutex::new(()),
            path,
            trust,
            min_version,
            version,
            bundles,
            changed,
            install,
        })
    }

    /// The configured floor.
    pub fn min_version(&self) -> u64 {
        self.min_version
    }

    /// The bundle in force.
    pub fn held(&self) -> Arc<Held<C>> {
        self.held.load_full()
    }

    /// Changes to the version in force.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Verifies `bytes` and, if newer than the bundle in force, persists, installs and holds
    /// it. `origin` names where it came from, for logs.
    pub fn offer(&self, bytes: &[u8], origin: &str) -> Result<Offered, OfferError> {
        let _serial = self
            .offer_lock
            .lock()
            .expect("offer lock is never poisoned");
        let result = self.try_offer(bytes);
        let noun = self.kind.noun;
        match &result {
            Ok(Offered::Applied { version }) => {
                info!(version, %origin, "{noun} bundle applied");
                self.bundles.with_label_values(&["applied", ""]).inc();
            }
            Ok(Offered::AlreadyCurrent { .. }) => {
                self.bundles.with_label_values(&["current", ""]).inc();
            }
            Err(e) => {
                warn!(%origin, reason = e.reason(), error = %e, "{noun} bundle refused; the one in force stays");
                self.bundles
                    .with_label_values(&["refused", e.reason()])
                    .inc();
            }
        }
        result
    }

    fn try_offer(&self, bytes: &[u8]) -> Result<Offered, OfferError> {
        let verified: Verified<C> = bundle::open(bytes, &self.trust.load(), SystemTime::now())?;
        check_minimum(verified.version, self.min_version)?;
        let current = self.held.load();
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

    fn apply(&self, verified: Verified<C>) -> Result<Offered, OfferError> {
        write_atomic(&self.path, &verified.bytes, 0o600).map_err(|e| OfferError::Persist {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let version = verified.version;
        let held = Held {
            bundle: Some(Arc::new(verified)),
            damaged: false,
        };
        (self.install)(&held);
        self.held.store(Arc::new(held));
        self.version.set(version as i64);
        self.changed.send_replace(version);
        Ok(Offered::Applied { version })
    }
}

/// [`SignedStore::offer`] on tokio's blocking pool: verifying and compiling a large set takes
/// long (about 2 s for 1,000 TrafficTargets on one core) and must not hold up a runtime
/// thread that carries traffic.
pub async fn offer_off_runtime<C: Content>(
    store: Arc<SignedStore<C>>,
    bytes: impl AsRef<[u8]> + Send + 'static,
    origin: String,
) -> Result<Offered, OfferError> {
    match tokio::task::spawn_blocking(move || store.offer(bytes.as_ref(), &origin)).await {
        Ok(result) => result,
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}
