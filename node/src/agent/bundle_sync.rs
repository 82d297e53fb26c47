//! Distribution of operator-signed bundles (policy, revocations) without a server: every
//! agent advertises the version and digest of the bundle of each kind it holds in gossip
//! ([`weft_discovery::BundleAdvert`]); an agent that sees a member advertise a later one
//! fetches it from that member over QUIC (one ALPN per kind, mutual TLS with node SVIDs) and
//! offers it to its [`SignedStore`], which verifies the operator's signature before anything
//! changes. Gossip only says where to look; it never decides what is trusted.
//!
//! Wire: the fetching agent opens one bidirectional stream and finishes its side without
//! sending anything; the serving agent writes its bundle (the exact bytes the operator
//! signed, at most [`MAX_BUNDLE_BYTES`]) and finishes. An agent with no bundle finishes at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use tokio::sync::watch;
use tracing::{debug, warn};
use weft_ca::Usage;
use weft_discovery::{BundleAdvert, Member, MemberState};

use super::Shared;
use super::signed_store::{OfferError, SignedStore, offer_off_runtime};
use crate::policy::bundle::{Content, MAX_BUNDLE_BYTES, peek};
use crate::proxy::ProxyContext;
use crate::proxy::tunnel::peer_node;

/// A kind of bundle agents pass to each other.
pub trait Distributed: Content {
    /// The ALPN its fetches use.
    const ALPN: &'static [u8];
    /// Its name in logs and metrics (`kind`).
    const KIND: &'static str;
    /// This agent's store of it.
    fn store(shared: &Shared) -> &Arc<SignedStore<Self>>;
    /// What a member advertises of it.
    fn advert(member: &Member) -> Option<&BundleAdvert>;
}

/// How long one fetch may take, handshake included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the catalog is looked at even when nothing in it changed (after a failed fetch).
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Serves this agent's bundle of kind `C` on one connection from another agent.
pub async fn serve<C: Distributed>(shared: Arc<Shared>, connection: quinn::Connection) {
    let remote = connection.remote_address();
    if let Err(reason) = peer_node(&connection, &shared.bundle, Usage::Client) {
        warn!(%remote, %reason, kind = C::KIND, "bundle fetch refused");
        connection.close(3u32.into(), b"a node SVID is required");
        return;
    }
    while let Ok((mut send, _recv)) = connection.accept_bi().await {
        let bytes = C::store(&shared)
            .held()
            .bundle
            .as_ref()
            .map(|b| b.bytes.clone())
            .unwrap_or_default();
        if send.write_all(&bytes).await.is_ok() {
            let _ = send.finish();
            let _ = send.stopped().await;
        }
    }
}

/// Keeps this agent's bundle of kind `C` at the latest any alive member advertises, until
/// `stop`. (The agent's publish loop advertises the version in force.)
///
/// Every advertiser of a later bundle is tried, latest first and in random order among
/// equals, until one serves a bundle that is exactly what it advertised (version and digest)
/// and verifies. A peer that serves something else, or nothing, is counted as lying and left
/// alone for a growing back-off, so one member advertising a huge version it does not have
/// costs one fetch, not a frozen policy or revocation list.
pub async fn run<C: Distributed>(proxy: Arc<ProxyContext>, mut stop: watch::Receiver<bool>) {
    let shared = proxy.shared.clone();
    let store = C::store(&shared).clone();
    let mut catalog = shared.catalog.clone();
    let mut applied = store.subscribe();
    let mut backoff = Backoff::default();
    loop {
        let wanted = newer_peers::<C>(&shared, &store);
        let mut fetched = wanted.is_empty();
        let now = Instant::now();
        for (name, addr, advert) in wanted {
            if backoff.waiting(&name, now) {
                continue;
            }
            let fetch = proxy.tunnels.ask(addr, C::ALPN, MAX_BUNDLE_BYTES);
            let outcome = match tokio::time::timeout(FETCH_TIMEOUT, fetch).await {
                Ok(Ok(bytes)) => match peek(&bytes) {
                    Some((version, digest))
                        if version == advert.version && digest == advert.digest =>
                    {
                        match offer_off_runtime(store.clone(), bytes, format!("peer {name}")).await
                        {
                            // Someone else's newer bundle may have arrived meanwhile: either
                            // way this agent is up to date with this peer.
                            Ok(_) | Err(OfferError::Older { .. }) => Fetch::Done,
                            // Refused and counted by the store: a bundle that does not verify.
                            Err(_) => Fetch::Lying("served a bundle that does not verify"),
                        }
                    }
                    _ => Fetch::Lying("served another bundle than it advertises"),
                },
                Ok(Err(reason)) => {
                    debug!(peer = %name, kind = C::KIND, version = advert.version, %reason, "bundle fetch failed");
                    Fetch::Failed
                }
                Err(_) => {
                    debug!(peer = %name, kind = C::KIND, version = advert.version, "bundle fetch timed out");
                    Fetch::Failed
                }
            };
            match outcome {
                Fetch::Done => {
                    backoff.forget(&name);
                    fetched = true;
                    break;
                }
                Fetch::Lying(why) => {
                    warn!(peer = %name, kind = C::KIND, version = advert.version, digest = %advert.digest, why, "bundle advert not honoured; trying the next advertiser");
                    shared.metrics.sync_peer(C::KIND, "lying");
                    backoff.failed(&name, now);
                }
                Fetch::Failed => {
                    shared.metrics.sync_peer(C::KIND, "unreachable");
                    backoff.failed(&name, now);
                }
            }
        }
        let retry = tokio::time::sleep(if fetched {
            Duration::from_secs(3600)
        } else {
            RETRY_INTERVAL
        });
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            changed = catalog.changed() => if changed.is_err() { return },
            _ = applied.changed() => {}
            _ = retry => {}
        }
    }
}

/// What one fetch from one advertiser came to.
enum Fetch {
    /// Its bundle is (or was overtaken by) the one in force.
    Done,
    /// It served something other than what it advertises.
    Lying(&'static str),
    /// It could not be reached in time.
    Failed,
}

/// Longest pause before a peer that failed or lied is asked again.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Per-peer back-off: 1 s after the first failure, doubling to [`MAX_BACKOFF`].
#[derive(Default)]
struct Backoff {
    peers: HashMap<String, (Instant, u32)>,
}

impl Backoff {
    fn waiting(&self, peer: &str, now: Instant) -> bool {
        self.peers.get(peer).is_some_and(|(until, _)| now < *until)
    }

    fn failed(&mut self, peer: &str, now: Instant) {
        let failures = self.peers.get(peer).map_or(0, |(_, n)| *n) + 1;
        let pause = RETRY_INTERVAL
            .saturating_mul(1 << failures.min(16).saturating_sub(1))
            .min(MAX_BACKOFF);
        self.peers.insert(peer.to_string(), (now + pause, failures));
        if self.peers.len() > 10_000 {
            self.peers.retain(|_, (until, _)| now < *until);
        }
    }

    fn forget(&mut self, peer: &str) {
        self.peers.remove(peer);
    }
}

/// Alive members advertising a later bundle of kind `C` than ours (by version, then digest)
/// and not below the store's floor, latest first, shuffled among equals so fetches spread over
/// the members that have it.
fn newer_peers<C: Distributed>(
    shared: &Shared,
    store: &SignedStore<C>,
) -> Vec<(String, SocketAddr, BundleAdvert)> {
    let ours = store
        .held()
        .advert()
        .map(|a| (a.version, a.digest))
        .unwrap_or_default();
    let minimum = store.min_version();
    let catalog = shared.catalog.current();
    let mut peers: Vec<(String, SocketAddr, BundleAdvert)> = catalog
        .members
        .values()
        .filter(|m| !m.is_self && m.state == MemberState::Alive)
        .filter_map(|m| {
            let advert = C::advert(m)?;
            let addr = m.record.as_ref()?.tunnel_addr;
            (advert.version >= minimum && (advert.version, advert.digest.clone()) > ours)
                .then(|| (m.name.clone(), addr, advert.clone()))
        })
        .collect();
    peers.shuffle(&mut rand::rng());
    peers.sort_by_key(|p| std::cmp::Reverse(p.2.version));
    peers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_peer_waits_longer_each_time_and_is_forgotten_once_it_serves() {
        let mut backoff = Backoff::default();
        let t0 = Instant::now();
        assert!(!backoff.waiting("liar", t0));
        backoff.failed("liar", t0);
        assert!(backoff.waiting("liar", t0 + Duration::from_millis(900)));
        assert!(!backoff.waiting("liar", t0 + Duration::from_secs(1)));
        for _ in 0..40 {
            backoff.failed("liar", t0);
        }
        assert!(backoff.waiting("liar", t0 + MAX_BACKOFF - Duration::from_secs(1)));
        assert!(!backoff.waiting("liar", t0 + MAX_BACKOFF));
        assert!(!backoff.waiting("honest", t0));
        backoff.forget("liar");
        assert!(!backoff.waiting("liar", t0));
    }
}
