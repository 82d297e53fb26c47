//! The data plane: apps on this host reach mesh services through outbound listeners
//! ([`outbound`]) and the HTTP proxy ([`http`]); other agents reach this host's services
//! through QUIC tunnels ([`inbound`]); tunnels are pooled per peer ([`tunnel`]); every stream
//! starts with the versioned header of [`header`].
//!
//! Identity: tunnels are mutual TLS with node SVIDs. A receiving agent trusts the source
//! service named in a stream header only if the sending node's SVID scope lists it; a sending
//! agent sends to a peer only if the peer's node SVID scope lists the destination service.
//! Gossip never decides who is trusted.

pub mod gate;
pub mod header;
pub mod http;
pub mod inbound;
pub mod l7;
pub mod metered;
pub mod metrics;
pub mod outbound;
pub mod tunnel;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weft_ca::{SpiffeId, TrustDomain};
use weft_discovery::ServiceKey;

use crate::agent::Shared;
pub use metrics::{Direction, ProxyMetrics};

/// How long a peer may take to send a stream header, or to answer one.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connecting to a local service may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Copy buffer per direction.
const COPY_BUFFER: usize = 64 * 1024;

/// Everything the proxy's tasks share.
pub struct ProxyContext {
    /// What the whole agent shares: config, catalog, trust bundle, identities.
    pub shared: Arc<Shared>,
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Metrics.
    pub metrics: ProxyMetrics,
    /// Pooled tunnels to peers.
    pub tunnels: tunnel::TunnelPool,
    /// Per-request HTTP state: balancer, clients, retry budgets, golden metrics.
    pub l7: l7::L7,
    /// Tracks every connection in flight, for draining.
    pub connections: TaskTracker,
    /// Cancelled when the drain deadline passes: in-flight connections are cut.
    pub cut: CancellationToken,
    /// Cancelled when draining starts: no new connections or streams.
    pub draining: CancellationToken,
}

/// The identity a local app's traffic carries: its source service's, or this node's.
pub fn local_identity(context: &ProxyContext, source: Option<&ServiceKey>) -> Option<SpiffeId> {
    match source {
        Some(s) => SpiffeId::service(&context.trust_domain, &s.namespace, &s.name).ok(),
        None => SpiffeId::node(
            &context.trust_domain,
            &context.shared.config.load().node.name,
        )
        .ok(),
    }
}

/// Keeps the tunnel pool in step with membership: whenever the catalog changes, tunnels to
/// peers that are no longer alive members are closed (and their balancing statistics
/// forgotten). Runs until the catalog is gone.
pub async fn prune_tunnels(context: Arc<ProxyContext>) {
    let mut catalog = context.shared.catalog.clone();
    loop {
        let live: std::collections::HashSet<std::net::SocketAddr> = catalog
            .current()
            .members
            .values()
            .filter(|m| m.state.is_routable())
            .filter_map(|m| m.record.as_ref().map(|r| r.tunnel_addr))
            .collect();
        context.tunnels.prune(&live);
        context.l7.balancer.retain(&live);
        if catalog.changed().await.is_err() {
            return;
        }
    }
}

/// The label of an optional source service.
pub fn source_label(source: Option<&ServiceKey>) -> String {
    source
        .map(ToString::to_string)
        .unwrap_or_else(|| "-".into())
}

/// Copies both ways until both sides are done (half-close is passed on: EOF from one side
/// shuts down writing to the other), or until `cut`. Returns bytes read from `app` and bytes
/// written to it.
pub async fn splice<A, B>(app: &mut A, mesh: &mut B, cut: &CancellationToken) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::select! {
        result = tokio::io::copy_bidirectional_with_sizes(app, mesh, COPY_BUFFER, COPY_BUFFER) => result.unwrap_or((0, 0)),
        _ = cut.cancelled() => (0, 0),
    }
}
