//! Tunnels to other agents: one pooled QUIC connection per peer address (ALPN `weft/1`,
//! mutual TLS with node SVIDs), many streams on it, one per app connection.
//!
//! Before a stream is opened the peer's verified node SVID must list the destination service
//! in its scope: gossip may say a node runs `db`, but only the node's certificate can prove it
//! may. The stream header is written, then the receiver's reply is awaited before any app byte.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, Join, ReadBuf};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use weft_ca::tls::{SharedBundle, SvidServerVerifier, quic_client_config};
use weft_ca::{Usage, VerifiedSvid, WeftIdentity, verify_svid};
use weft_discovery::ServiceKey;

use super::header::{self, MAX_FIELD, Status, StreamHeader};
use super::{HEADER_TIMEOUT, ProxyMetrics};
use crate::identity::{SharedIdentities, TrustSignal};

/// ALPN of tunnels between agents.
pub const ALPN_TUNNEL: &[u8] = b"weft/1";

/// How old a pooled tunnel must be before a peer whose scope lacks a service is asked again
/// with a fresh handshake. A peer reissues its node SVID when its services change (a CA host
/// on reload), but a tunnel keeps the certificate of its handshake; the wait keeps a peer that
/// gossip wrongly says runs a service from costing a handshake per connection.
const SCOPE_RECHECK_AFTER: Duration = Duration::from_secs(5);

/// Why a stream to a peer could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// This host holds no node SVID yet.
    #[error("this host has no node identity yet")]
    NoIdentity,
    /// The connection could not be made (unreachable, handshake refused).
    #[error("tunnel to {addr} failed: {reason}")]
    Connect {
        /// Peer address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The peer's identity does not allow it to serve the destination.
    #[error(
        "{peer} at {addr} is not entitled to serve {service}: its node SVID scope does not list it"
    )]
    NotEntitled {
        /// Peer address.
        addr: SocketAddr,
        /// Peer's SPIFFE ID.
        peer: String,
        /// Destination.
        service: ServiceKey,
    },
    /// The stream broke before the reply.
    #[error("stream to {addr} failed: {reason}")]
    Stream {
        /// Peer address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The peer refused the stream.
    #[error("{addr} refused ({}): {reason}", status.as_label())]
    Refused {
        /// Peer address.
        addr: SocketAddr,
        /// Its status.
        status: Status,
        /// Its reason.
        reason: String,
    },
}

impl TunnelError {
    /// Whether another endpoint of the same service might work.
    pub fn worth_another_endpoint(&self) -> bool {
        match self {
            TunnelError::NoIdentity => false,
            TunnelError::Refused { status, .. } => status.worth_another_endpoint(),
            _ => true,
        }
    }

    /// Short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TunnelError::NoIdentity => "no_identity",
            TunnelError::Connect { .. } => "handshake_failed",
            TunnelError::NotEntitled { .. } => "peer_not_entitled",
            TunnelError::Stream { .. } => "stream_failed",
            TunnelError::Refused { status, .. } => status.as_label(),
        }
    }
}

/// An open, verified tunnel.
#[derive(Clone)]
pub struct Tunnel {
    connection: quinn::Connection,
    peer: Arc<VerifiedSvid>,
    opened: Instant,
    users: Arc<Retirement>,
}

impl Tunnel {
    /// Whether the peer's node SVID, as shown at this tunnel's handshake, lists `service`.
    fn serves(&self, service: &ServiceKey) -> bool {
        self.peer
            .scope
            .as_ref()
            .is_some_and(|scope| scope.allows(&service.namespace, &service.name))
    }
}

/// Shared by a pooled tunnel, its clones and its streams, so that a tunnel replaced by a newer
/// one to the same peer closes once nothing uses it, while its streams finish undisturbed.
#[derive(Default)]
pub struct Retirement {
    /// Cancelled when the pool stops handing the tunnel out.
    retired: CancellationToken,
}

/// A bidirectional stream that passed the header exchange.
pub struct TunnelStream {
    io: Join<quinn::RecvStream, quinn::SendStream>,
    /// Keeps a retired tunnel open while this stream lives.
    _users: Arc<Retirement>,
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<Tunnel>>>;

/// Pooled tunnels, keyed by peer address.
pub struct TunnelPool {
    endpoint: quinn::Endpoint,
    bundle: SharedBundle,
    signal: TrustSignal,
    identities: SharedIdentities,
    metrics: ProxyMetrics,
    transport: Arc<quinn::TransportConfig>,
    slots: Mutex<HashMap<SocketAddr, Slot>>,
}

/// Largest UDP payload tunnels use: a 9000-byte jumbo frame minus IPv6 and UDP headers. Path
/// MTU discovery probes up to it and settles on what the path carries (1452 on a 1500-byte
/// Ethernet path); fewer, larger datagrams cut the per-packet CPU cost of bulk transfers.
pub const MAX_UDP_PAYLOAD: u16 = 8952;

/// Transport settings for tunnels (both roles): many concurrent streams; flow-control windows
/// sized to a LAN's bandwidth-delay product (2 MiB per stream, 16 MiB per tunnel: 10 Gbit/s at
/// 1.6 ms), not larger, since quinn may buffer up to the window per tunnel; keep-alives so idle
/// pooled tunnels stay usable; path MTU discovery up to [`MAX_UDP_PAYLOAD`].
pub fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    transport.mtu_discovery_config(Some(mtu));
    transport
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(16_384))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
        .stream_receive_window(quinn::VarInt::from_u32(2 * 1024 * 1024))
        .receive_window(quinn::VarInt::from_u32(16 * 1024 * 1024))
        .send_window(16 * 1024 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .max_idle_timeout(Some(
            Duration::from_secs(30)
                .try_into()
                .expect("30 s is a valid idle timeout"),
        ));
    transport
}

/// Why a peer's certificate is not (or no longer) a node SVID of the trust in force.
#[derive(Debug)]
pub struct PeerRefused {
    /// A short label for metrics (`reason`).
    pub reason: &'static str,
    message: String,
}

impl std::fmt::Display for PeerRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The verified node SVID of a tunnel's peer, or why there is none. Checked against the
/// trust bundle in force now (revocations included), so it also tells whether a peer
/// verified at the handshake still does.
pub fn peer_node(
    connection: &quinn::Connection,
    bundle: &SharedBundle,
    usage: Usage,
) -> Result<VerifiedSvid, PeerRefused> {
    let chain = connection
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| PeerRefused {
            reason: "no_certificate",
            message: "no client certificate".into(),
        })?;
    let svid =
        verify_svid(&chain, &bundle.load(), SystemTime::now(), usage).map_err(|e| PeerRefused {
            reason: e.reason(),
            message: e.to_string(),
        })?;
    match svid.id.kind() {
        WeftIdentity::Node { .. } => Ok(svid),
        _ => Err(PeerRefused {
            reason: "not_a_node",
            message: format!("{} is not a node identity", svid.id),
        }),
    }
}

/// The trust an open tunnel's peer is verified against again whenever it changes.
#[derive(Clone)]
pub struct TrustWatch {
    /// The trust bundle in force (revocations included).
    pub bundle: SharedBundle,
    /// Where changes are signalled.
    pub signal: TrustSignal,
    /// How the peer's certificate is used: `Server` for tunnels this agent dialed.
    pub usage: Usage,
}

impl TunnelPool {
    /// A pool dialing from `endpoint`.
    pub fn new(
        endpoint: quinn::Endpoint,
        bundle: SharedBundle,
        signal: TrustSignal,
        identities: SharedIdentities,
        metrics: ProxyMetrics,
    ) -> TunnelPool {
        TunnelPool {
            endpoint,
            bundle,
            signal,
            identities,
            metrics,
            transport: Arc::new(transport_config()),
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// Opens a stream to `addr` for `header` and waits for the peer's acceptance.
    pub async fn open(
        &self,
        addr: SocketAddr,
        header: &StreamHeader,
    ) -> Result<TunnelStream, TunnelError> {
        let mut tunnel = self.tunnel(addr, None).await?;
        if !tunnel.serves(&header.destination) && tunnel.opened.elapsed() >= SCOPE_RECHECK_AFTER {
            tunnel = self.tunnel(addr, Some(&tunnel)).await?;
        }
        if !tunnel.serves(&header.destination) {
            return Err(TunnelError::NotEntitled {
                addr,
                peer: tunnel.peer.id.to_string(),
                service: header.destination.clone(),
            });
        }
        let stream_error = |reason: String| TunnelError::Stream { addr, reason };
        let (mut send, mut recv) = tunnel
            .connection
            .open_bi()
            .await
            .map_err(|e| stream_error(e.to_string()))?;
        send.write_all(&header.encode())
            .await
            .map_err(|e| stream_error(e.to_string()))?;
        let (status, reason) = tokio::time::timeout(HEADER_TIMEOUT, read_reply(&mut recv))
            .await
            .map_err(|_| stream_error(format!("no reply within {HEADER_TIMEOUT:?}")))?
            .map_err(stream_error)?;
        match status {
            Status::Ok => Ok(TunnelStream {
                io: tokio::io::join(recv, send),
                _users: tunnel.users.clone(),
            }),
            status => Err(TunnelError::Refused {
                addr,
                status,
                reason,
            }),
        }
    }

    /// Closes pooled tunnels to addresses that are not in `live` (peers gossip shows dead,
    /// left or gone): their streams end at once instead of waiting for QUIC's idle timeout, and
    /// the next connection to that service goes elsewhere.
    pub fn prune(&self, live: &std::collections::HashSet<SocketAddr>) {
        let mut slots = self.slots.lock().expect("pool lock is never poisoned");
        slots.retain(|addr, slot| {
            if live.contains(addr) {
                return true;
            }
            match slot.try_lock() {
                Ok(mut tunnel) => {
                    if let Some(tunnel) = tunnel.take() {
                        info!(%addr, peer = %tunnel.peer.id, "closing the tunnel to a peer that left the mesh");
                        tunnel.connection.close(4u32.into(), b"peer no longer in the mesh");
                    }
                    false
                }
                // Someone is connecting right now; leave it for the next pass.
                Err(_) => true,
            }
        });
    }

    /// The pooled tunnel to `addr`, connecting if there is none or it closed. With `stale`,
    /// the caller needs a newer tunnel than that one: unless another task replaced it already,
    /// a new one is connected and `stale` is retired (it takes no new streams and closes when
    /// its last one ends).
    async fn tunnel(
        &self,
        addr: SocketAddr,
        stale: Option<&Tunnel>,
    ) -> Result<Tunnel, TunnelError> {
        let slot = self
            .slots
            .lock()
            .expect("pool lock is never poisoned")
            .entry(addr)
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        if let Some(tunnel) = slot.as_ref()
            && tunnel.connection.close_reason().is_none()
            && !tunnel.users.retired.is_cancelled()
            && stale.is_none_or(|s| s.connection.stable_id() != tunnel.connection.stable_id())
        {
            return Ok(tunnel.clone());
        }
        let tunnel = self.connect(addr).await?;
        if let Some(stale) = stale {
            info!(%addr, peer = %tunnel.peer.id, "tunnel replaced to see the peer's current node scope");
            stale.users.retired.cancel();
        }
        *slot = Some(tunnel.clone());
        Ok(tunnel)
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Tunnel, TunnelError> {
        let (connection, peer) = self.dial(addr, ALPN_TUNNEL).await?;
        info!(%addr, peer = %peer.id, "tunnel open");
        let users = Arc::new(Retirement::default());
        track(
            connection.clone(),
            self.metrics.clone(),
            peer.not_after,
            Some(users.clone()),
            TrustWatch {
                bundle: self.bundle.clone(),
                signal: self.signal.clone(),
                usage: Usage::Server,
            },
        );
        Ok(Tunnel {
            connection,
            peer: Arc::new(peer),
            opened: Instant::now(),
            users,
        })
    }

    /// One request-and-answer exchange with the agent at `addr` over protocol `alpn` (policy
    /// bundles, stats): a new mutual-TLS connection, one stream on which this side sends
    /// nothing, and the peer's whole answer, at most `limit` bytes.
    pub async fn ask(
        &self,
        addr: SocketAddr,
        alpn: &[u8],
        limit: usize,
    ) -> Result<Vec<u8>, String> {
        let (connection, _peer) = self.dial(addr, alpn).await.map_err(|e| e.to_string())?;
        let result = async {
            let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            recv.read_to_end(limit).await.map_err(|e| e.to_string())
        }
        .await;
        connection.close(0u32.into(), b"done");
        result
    }

    /// A new, unpooled connection to the agent at `addr` for protocol `alpn`, mutual TLS with
    /// this node's SVID; returns it with the peer's verified node SVID.
    pub async fn dial(
        &self,
        addr: SocketAddr,
        alpn: &[u8],
    ) -> Result<(quinn::Connection, VerifiedSvid), TunnelError> {
        let node = self
            .identities
            .load()
            .node
            .clone()
            .ok_or(TunnelError::NoIdentity)?;
        let verifier = SvidServerVerifier::new(
            self.bundle.clone(),
            "a node ID spiffe://TD/node/NAME",
            |id| matches!(id.kind(), WeftIdentity::Node { .. }),
        );
        let connect = |reason: String| TunnelError::Connect { addr, reason };
        let mut config = quic_client_config(verifier, Some(node.key.clone()), alpn)
            .map_err(|e| connect(e.to_string()))?;
        config.transport_config(self.transport.clone());
        let connecting = self
            .endpoint
            .connect_with(config, addr, "tunnel.weft.invalid")
            .map_err(|e| connect(e.to_string()))?;
        let connection = match tokio::time::timeout(HEADER_TIMEOUT, connecting).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(e)) => {
                self.metrics.handshake("client", "failed");
                return Err(connect(e.to_string()));
            }
            Err(_) => {
                self.metrics.handshake("client", "timeout");
                return Err(connect(format!("no handshake within {HEADER_TIMEOUT:?}")));
            }
        };
        let peer = peer_node(&connection, &self.bundle, Usage::Server).map_err(|reason| {
            self.metrics.handshake("client", "bad_peer");
            connection.close(2u32.into(), b"peer identity refused");
            connect(reason.to_string())
        })?;
        self.metrics.handshake("client", "ok");
        Ok((connection, peer))
    }
}

/// How long streams in flight on a dialed tunnel may go on once its peer no longer verifies.
const UNTRUSTED_GRACE: Duration = Duration::from_millis(500);

/// Counts a tunnel while it is open, samples its RTT and path events, and closes it when the
/// peer's certificate expires or, whenever the trust in force changes (roots reloaded,
/// revocations installed), no longer verifies: a TLS identity is checked at the handshake
/// only, so a long-lived tunnel must not outlive it (the next stream handshakes again with a
/// fresh SVID). A pooled tunnel comes with its `users`: once retired, it is closed when
/// nothing else holds them.
pub fn track(
    connection: quinn::Connection,
    metrics: ProxyMetrics,
    peer_not_after: SystemTime,
    users: Option<Arc<Retirement>>,
    trust: TrustWatch,
) {
    let mut changes = trust.signal.subscribe();
    let mut grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    metrics.tunnel_opened();
    let expires_in = peer_not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::spawn(async move {
        let mut sample = tokio::time::interval(Duration::from_secs(5));
        let mut path = quinn::PathStats::default();
        let expiry = tokio::time::sleep(expires_in);
        tokio::pin!(expiry);
        loop {
            tokio::select! {
                reason = connection.closed() => {
                    debug!(remote = %connection.remote_address(), %reason, "tunnel closed");
                    metrics.path(&path, &connection.stats().path);
                    break;
                }
                _ = &mut expiry => {
                    info!(remote = %connection.remote_address(), "closing a tunnel whose peer certificate expired");
                    connection.close(5u32.into(), b"peer certificate expired");
                }
                Ok(()) = changes.changed() => {
                    match peer_node(&connection, &trust.bundle, trust.usage) {
                        Ok(_) => metrics.reverified("kept", ""),
                        Err(refused) => {
                            warn!(remote = %connection.remote_address(), reason = refused.reason, %refused, "closing a tunnel whose peer no longer verifies");
                            metrics.reverified("closed", refused.reason);
                            match &users {
                                // Dialed by this agent: no new streams from now on (the pool
                                // connects again, and the handshake refuses the peer), and
                                // the requests in flight get a moment to finish.
                                Some(users) => {
                                    users.retired.cancel();
                                    grace = Some(Box::pin(tokio::time::sleep(UNTRUSTED_GRACE)));
                                }
                                None => connection.close(7u32.into(), b"peer identity no longer trusted"),
                            }
                        }
                    }
                }
                _ = async { grace.as_mut().expect("guarded").await }, if grace.is_some() => {
                    grace = None;
                    connection.close(7u32.into(), b"peer identity no longer trusted");
                }
                _ = sample.tick() => {
                    metrics.rtt(connection.rtt());
                    let now = connection.stats().path;
                    metrics.path(&path, &now);
                    path = now;
                    if users
                        .as_ref()
                        .is_some_and(|u| u.retired.is_cancelled() && Arc::strong_count(u) == 1)
                    {
                        debug!(remote = %connection.remote_address(), "closing a replaced tunnel whose streams have ended");
                        connection.close(6u32.into(), b"replaced by a newer tunnel");
                    }
                }
            }
        }
        metrics.tunnel_closed();
    });
}

/// Reads a reply: status, then a length-prefixed reason.
async fn read_reply(recv: &mut quinn::RecvStream) -> Result<(Status, String), String> {
    let mut head = [0u8; 3];
    recv.read_exact(&mut head)
        .await
        .map_err(|e| e.to_string())?;
    let len = u16::from_be_bytes([head[1], head[2]]) as usize;
    if len > MAX_FIELD {
        return Err(format!("reply reason of {len} bytes"));
    }
    let mut buf = head.to_vec();
    buf.resize(3 + len, 0);
    recv.read_exact(&mut buf[3..])
        .await
        .map_err(|e| e.to_string())?;
    let (status, reason, _) = header::decode_reply(&buf).map_err(|e| e.to_string())?;
    Ok((status, reason))
}
