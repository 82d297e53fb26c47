//! The revocations in force: the operator's signed revocation list, held, persisted and
//! spread exactly like policy (a [`SignedStore`] of [`RevocationList`]), and installed in the
//! trust bundle, where every chain check sees it ([`weft_ca::revocation`]).
//!
//! Installing a list swaps the shared trust bundle for one carrying it and signals
//! [`TrustSignal`], on which open tunnels are verified again and closed if they no longer
//! verify; gossip records are checked again on the next catalog refresh, since a new bundle
//! invalidates every cached verdict. A persisted list that no longer verifies is logged and
//! counted, and the agent fetches the current one from its peers.

use std::path::Path;
use std::sync::Arc;

use prometheus::{IntGauge, Registry};
use tracing::{error, info};
use weft_ca::tls::SharedBundle;
use weft_discovery::{BundleAdvert, Member};

use super::Shared;
use super::bundle_sync::Distributed;
use super::signed_store::{SignedStore, StoreKind};
use crate::identity::TrustSignal;
use crate::policy::bundle::RevocationList;

/// The file, in `data_dir`, holding the last good revocation bundle.
pub const REVOCATIONS_FILE: &str = "revocations.bundle";
/// ALPN of the revocation fetch protocol.
pub const ALPN_REVOCATIONS: &[u8] = b"weft-revocations/1";

/// Loads the persisted revocation bundle from `data_dir` and installs it in `trust`; every
/// later bundle is installed the same way, and `signal` told.
pub fn load(
    data_dir: &Path,
    trust: SharedBundle,
    signal: TrustSignal,
    registry: &Registry,
) -> prometheus::Result<SignedStore<RevocationList>> {
    let in_force = IntGauge::new(
        "weft_revocations",
        "Revocations in force (entries of the revocation bundle held).",
    )?;
    registry.register(Box::new(in_force.clone()))?;
    let target = trust.clone();
    SignedStore::load(
        StoreKind {
            noun: "revocation",
            file: REVOCATIONS_FILE,
            metrics: "weft_revocation",
        },
        data_dir,
        trust,
        0,
        registry,
        Box::new(move |held| {
            if held.damaged {
                error!(
                    "no revocations are enforced until a good revocation bundle is fetched from a peer"
                );
            }
            let list = held
                .bundle
                .as_ref()
                .map(|b| b.compiled.clone())
                .unwrap_or_default();
            if !list.is_empty() {
                info!(entries = list.len(), "revocations in force");
            }
            in_force.set(list.len() as i64);
            target.rcu(|bundle| bundle.with_revocations(list.clone()));
            signal.changed();
        }),
    )
}

impl Distributed for RevocationList {
    const ALPN: &'static [u8] = ALPN_REVOCATIONS;
    const KIND: &'static str = "revocations";

    fn store(shared: &Shared) -> &Arc<SignedStore<Self>> {
        &shared.revocations
    }

    fn advert(member: &Member) -> Option<&BundleAdvert> {
        member.revocations.as_ref()
    }
}
