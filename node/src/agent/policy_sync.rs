//! Policy distribution without a server: every agent advertises the version and digest of the
//! bundle it enforces in gossip ([`weft_discovery::PolicyAdvert`]); an agent that sees a
//! member advertise a higher version fetches the bundle from that member over QUIC (ALPN
//! [`ALPN_POLICY`], mutual TLS with node SVIDs) and offers it to its [`PolicyStore`], which
//! verifies the operator's signature before anything changes. Gossip only says where to look;
//! it never decides what is trusted.
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
use weft_discovery::{MemberState, PolicyAdvert};

use super::Shared;
use super::policy::{OfferError, offer_off_runtime};
use crate::policy::bundle::{MAX_BUNDLE_BYTES, peek};
use crate::proxy::ProxyContext;
use crate::proxy::tunnel::peer_node;

/// ALPN of the policy fetch protocol.
pub const ALPN_POLICY: &[u8] = b"weft-policy/1";
/// How long one fetch may take, handshake included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the catalog is looked at even when nothing in it changed (after a failed fetch).
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Serves this agent's bundle on one `weft-policy/1` connection from another agent.
pub async fn serve(shared: Arc<Shared>, connection: quinn::Connection) {
    let remote = connection.remote_address();
    if let Err(reason) = peer_node(&connection, &shared.bundle, Usage::Client) {
        warn!(%remote, %reason, "policy fetch refused");
        connection.close(3u32.into(), b"a node SVID is required");
        return;
    }
    while let Ok((mut send, _recv)) = connection.accept_bi().await {
        let bytes = shared
            .policy
            .active()
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

/// Keeps this agent's policy at the highest version any alive member advertises, until
/// `stop`. (The agent's publish loop advertises the version in force.)
///
/// Every advertiser of a later bundle is tried, latest first and in random order among
/// equals, until one serves a bundle that is exactly what it advertised (version and digest)
/// and verifies. A peer that serves something else, or nothing, is counted as lying and left
/// alone for a growing back-off, so one member advertising a huge version it does not have
/// costs one fetch, not a frozen policy.
pub async fn run(proxy: Arc<ProxyContext>, mut stop: watch::Receiver<bool>) {
    let shared = proxy.shared.clone();
    let mut catalog = shared.catalog.clone();
    let mut applied = shared.policy.subscribe();
    let mut backoff = Backoff::default();
    loop {
        let wanted = newer_peers(&shared);
        let mut fetched = wanted.is_empty();
        let now = Instant::now();
        for (name, addr, advert) in wanted {
            if backoff.waiting(&name, now) {
                continue;
            }
            let fetch = proxy.tunnels.ask(addr, ALPN_POLICY, MAX_BUNDLE_BYTES);
            let outcome = match tokio::time::timeout(FETCH_TIMEOUT, fetch).await {
                Ok(Ok(bytes)) => match peek(&bytes) {
                    Some((version, digest))
                        if version == advert.version && digest == advert.digest =>
                    {
                        match offer_off_runtime(shared.clone(), bytes, format!("peer {name}")).await
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
                    debug!(peer = %name, version = advert.version, %reason, "policy fetch failed");
                    Fetch::Failed
                }
                Err(_) => {
                    debug!(peer = %name, version = advert.version, "policy fetch timed out");
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
                    warn!(peer = %name, version = advert.version, digest = %advert.digest, why, "policy advert not honoured; trying the next advertiser");
                    shared.metrics.policy_peer("lying");
                    backoff.failed(&name, now);
                }
                Fetch::Failed => {
                    shared.metrics.policy_peer("unreachable");
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

/// Alive members advertising a later bundle than ours (by version, then digest) and not
/// below `[policy] min_version`, latest first, shuffled among equals so fetches spread over the members that have it.
fn newer_peers(shared: &Shared) -> Vec<(String, SocketAddr, PolicyAdvert)> {
    let ours = shared
        .policy
        .active()
        .advert()
        .map(|a| (a.version, a.digest))
        .unwrap_or_default();
    let minimum = shared.policy.min_version();
    let catalog = shared.catalog.current();
    let mut peers: Vec<(String, SocketAddr, PolicyAdvert)> = catalog
        .members
        .values()
        .filter(|m| !m.is_self && m.state == MemberState::Alive)
        .filter_map(|m| {
            let advert = m.policy.as_ref()?;
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
