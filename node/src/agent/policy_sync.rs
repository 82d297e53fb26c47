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

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::seq::SliceRandom;
use tokio::sync::watch;
use tracing::{debug, warn};
use weft_ca::Usage;
use weft_discovery::MemberState;

use super::Shared;
use super::policy::{OfferError, offer_off_runtime};
use crate::policy::bundle::MAX_BUNDLE_BYTES;
use crate::proxy::ProxyContext;
use crate::proxy::tunnel::peer_node;

/// ALPN of the policy fetch protocol.
pub const ALPN_POLICY: &[u8] = b"weft-policy/1";
/// How long one fetch may take, handshake included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the catalog is looked at even when nothing in it changed (after a failed fetch).
const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Peers tried per round, highest version first.
const PEERS_PER_ROUND: usize = 3;

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
pub async fn run(proxy: Arc<ProxyContext>, mut stop: watch::Receiver<bool>) {
    let shared = proxy.shared.clone();
    let mut catalog = shared.catalog.clone();
    let mut applied = shared.policy.subscribe();
    loop {
        let wanted = newer_peers(&shared);
        let mut fetched = wanted.is_empty();
        for (name, addr, version) in wanted.into_iter().take(PEERS_PER_ROUND) {
            let fetch = proxy.tunnels.ask(addr, ALPN_POLICY, MAX_BUNDLE_BYTES);
            match tokio::time::timeout(FETCH_TIMEOUT, fetch).await {
                Ok(Ok(bytes)) if bytes.is_empty() => {
                    debug!(peer = %name, "peer advertised a policy but served none");
                }
                Ok(Ok(bytes)) => {
                    match offer_off_runtime(shared.clone(), bytes, format!("peer {name}")).await {
                        Ok(_) => {
                            fetched = true;
                            break;
                        }
                        // Someone else's newer bundle arrived meanwhile: nothing to do.
                        Err(OfferError::Older { .. }) => {
                            fetched = true;
                            break;
                        }
                        Err(_) => {} // refused and counted by the store; try the next peer
                    }
                }
                Ok(Err(reason)) => {
                    debug!(peer = %name, version, %reason, "policy fetch failed");
                }
                Err(_) => debug!(peer = %name, version, "policy fetch timed out"),
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

/// Alive members advertising a later bundle than ours (by version, then digest), latest
/// first, shuffled among equals so fetches spread over the members that have it.
fn newer_peers(shared: &Shared) -> Vec<(String, SocketAddr, u64)> {
    let ours = shared
        .policy
        .active()
        .advert()
        .map(|a| (a.version, a.digest))
        .unwrap_or_default();
    let catalog = shared.catalog.current();
    let mut peers: Vec<(String, SocketAddr, u64)> = catalog
        .members
        .values()
        .filter(|m| !m.is_self && m.state == MemberState::Alive)
        .filter_map(|m| {
            let advert = m.policy.as_ref()?;
            let addr = m.record.as_ref()?.tunnel_addr;
            ((advert.version, advert.digest.clone()) > ours)
                .then(|| (m.name.clone(), addr, advert.version))
        })
        .collect();
    peers.shuffle(&mut rand::rng());
    peers.sort_by_key(|p| std::cmp::Reverse(p.2));
    peers
}
