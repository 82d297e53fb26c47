//! The agent's QUIC endpoint on the tunnel port: one UDP socket for every protocol between
//! agents, told apart by ALPN: data-plane tunnels (`weft/1`, every agent), signed-bundle
//! fetches (`weft-policy/1`, `weft-revocations/1`, every agent), golden-metric snapshots
//! (`weft-stats/1`, every agent) and the CA protocol (`weft-ca/1`, CA hosts). It also carries
//! this agent's own outgoing tunnels and CA requests.
//!
//! It is bound before the agent joins gossip, so a port in use fails startup. The server
//! certificate is chosen per ALPN and swapped on rotation without touching live connections.
//! What a peer may cost before and after it proves who it is is decided in [`limits`].

pub mod limits;

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::watch;
use tracing::{debug, warn};
use weft_ca::server::CaServer;
use weft_ca::tls::{
    ALPN_CA, AlpnCertResolver, OptionalSvidClientVerifier, SharedBundle, quic_server_config,
};

use crate::agent::bundle_sync;
use crate::agent::policy::ALPN_POLICY;
use crate::agent::revocation::ALPN_REVOCATIONS;
use crate::agent::stats;
use crate::policy::bundle::{PolicyFiles, RevocationList};
use crate::proxy::tunnel::{ALPN_TUNNEL, MAX_UDP_PAYLOAD, transport_config};
use crate::proxy::{ProxyContext, inbound};
use limits::{Admission, Admit};

/// Errors opening the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The UDP port could not be bound.
    #[error("failed to bind the tunnel endpoint on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    /// TLS setup failed.
    #[error("tunnel endpoint TLS: {0}")]
    Tls(#[from] weft_ca::tls::TlsError),
}

/// Socket buffer asked for in each direction. The kernel default (about 208 KiB) drops
/// datagrams when many handshakes or a bulk transfer arrive at once, and every drop costs a
/// QUIC retransmission; the kernel caps the value at `net.core.{r,w}mem_max`.
const SOCKET_BUFFER: usize = 4 << 20;

/// Binds the endpoint's UDP socket with large buffers.
fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Dual-stack when bound to [::], like quinn's own sockets.
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    // Linux reports twice the size it grants; less than asked means net.core.rmem_max capped it.
    if let Ok(reported) = socket.recv_buffer_size()
        && reported / 2 < SOCKET_BUFFER
    {
        warn!(
            %addr,
            granted_kib = reported / 2 / 1024,
            wanted_kib = SOCKET_BUFFER / 1024,
            "the kernel caps the tunnel socket's receive buffer (net.core.rmem_max), so bursts may be \
             dropped and counted as lost packets; raise net.core.rmem_max and net.core.wmem_max \
             to 4194304 (see docs/troubleshooting.md)"
        );
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Most bytes one UDP send carries (a GSO batch included): 65,535 less the UDP header.
const MAX_UDP_SEND: usize = 65_507;

/// The endpoint's UDP socket as quinn's runtime wraps it, with segmentation-offload (GSO)
/// batches capped at what one send may carry.
///
/// quinn sends up to 10 datagrams of the path MTU in one `sendmsg`. Once path MTU discovery
/// reaches jumbo sizes, 10 × 8,952 bytes is over the limit, the kernel refuses the batch with
/// EMSGSIZE, and quinn-udp drops it silently (it takes that error for a too-large MTU probe).
/// QUIC then sees the whole batch lost, cuts its congestion window and, after a few such
/// bursts, declares the path an MTU black hole and falls back to 1,200-byte packets.
#[derive(Debug)]
struct BoundedGsoSocket {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
}

impl quinn::AsyncUdpSocket for BoundedGsoSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        let fit = MAX_UDP_SEND / usize::from(MAX_UDP_PAYLOAD);
        self.inner.max_transmit_segments().clamp(1, fit)
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// The bound endpoint.
pub struct QuicEndpoint {
    endpoint: quinn::Endpoint,
    resolver: Arc<AlpnCertResolver>,
}

impl QuicEndpoint {
    /// Binds `addr`; peers' client certificates are checked against `bundle`.
    pub fn bind(addr: SocketAddr, bundle: SharedBundle) -> Result<QuicEndpoint, EndpointError> {
        let resolver = Arc::new(AlpnCertResolver::default());
        let mut config = quic_server_config(
            resolver.clone(),
            OptionalSvidClientVerifier::new(bundle),
            &[
                ALPN_TUNNEL,
                ALPN_CA,
                ALPN_POLICY,
                ALPN_REVOCATIONS,
                stats::ALPN_STATS,
            ],
        )?;
        config.transport_config(Arc::new(server_transport_config()));
        let socket = bind_udp(addr).map_err(|e| EndpointError::Bind(addr, e))?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| EndpointError::Bind(addr, std::io::Error::other("no async runtime")))?;
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config
            .max_udp_payload_size(MAX_UDP_PAYLOAD)
            .expect("the jumbo payload size is within QUIC's bounds");
        let socket = BoundedGsoSocket {
            inner: runtime
                .wrap_udp_socket(socket)
                .map_err(|e| EndpointError::Bind(addr, e))?,
        };
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(config),
            Arc::new(socket),
            runtime,
        )
        .map_err(|e| EndpointError::Bind(addr, e))?;
        Ok(QuicEndpoint { endpoint, resolver })
    }

    /// The quinn endpoint, for outgoing connections.
    pub fn quinn(&self) -> quinn::Endpoint {
        self.endpoint.clone()
    }

    /// Where server certificates are installed.
    pub fn resolver(&self) -> Arc<AlpnCertResolver> {
        self.resolver.clone()
    }

    /// Accepts connections until `shutdown` turns true, then closes the endpoint.
    pub async fn serve(
        self,
        ca: Option<Arc<CaServer>>,
        proxy: Arc<ProxyContext>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let admission = Arc::new(Mutex::new(Admission::default()));
        loop {
            let incoming = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => incoming,
                    None => break,
                },
            };
            let remote = incoming.remote_address();
            let verdict = admission
                .lock()
                .expect("admission lock is never poisoned")
                .incoming(remote.ip(), incoming.remote_address_validated());
            proxy.metrics.admission(verdict.as_label());
            match verdict {
                Admit::Accept => {}
                Admit::Retry => {
                    if let Err(e) = incoming.retry() {
                        e.into_incoming().refuse();
                    }
                    continue;
                }
                Admit::RefuseSource | Admit::RefuseLoad => {
                    debug!(%remote, result = verdict.as_label(), "QUIC connection attempt refused");
                    incoming.refuse();
                    continue;
                }
            }
            let handshake = Slot::new(admission.clone(), remote.ip(), SlotKind::Handshake);
            let ca = ca.clone();
            let proxy = proxy.clone();
            let admission = admission.clone();
            tokio::spawn(async move {
                let connected = incoming.await;
                drop(handshake);
                let connection = match connected {
                    Ok(connection) => connection,
                    Err(e) => {
                        warn!(%remote, error = %e, "QUIC handshake refused");
                        proxy.metrics.handshake("server", "refused");
                        return;
                    }
                };
                // Held while the connection is served.
                let _unauthenticated = if connection.peer_identity().is_none() {
                    let admitted = admission
                        .lock()
                        .expect("admission lock is never poisoned")
                        .unauthenticated(remote.ip());
                    if !admitted {
                        proxy.metrics.admission("refused_unauthenticated");
                        debug!(%remote, "too many connections without a client certificate; closing");
                        connection.close(
                            8u32.into(),
                            b"too many connections without a client certificate",
                        );
                        return;
                    }
                    let gauge = proxy.metrics.unauthenticated().clone();
                    Some(Slot::new(
                        admission,
                        remote.ip(),
                        SlotKind::Unauthenticated(gauge),
                    ))
                } else {
                    None
                };
                let alpn = connection
                    .handshake_data()
                    .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                    .and_then(|data| data.protocol);
                let budget = limits::budget(alpn.as_deref().unwrap_or_default());
                connection.set_max_concurrent_bi_streams(budget.streams.into());
                connection.set_receive_window(budget.window.into());
                match (alpn.as_deref(), ca) {
                    (Some(ALPN_TUNNEL), _) => inbound::serve(proxy, connection).await,
                    (Some(ALPN_CA), Some(ca)) => ca.serve(connection).await,
                    (Some(ALPN_POLICY), _) => {
                        bundle_sync::serve::<PolicyFiles>(proxy.shared.clone(), connection).await
                    }
                    (Some(ALPN_REVOCATIONS), _) => {
                        bundle_sync::serve::<RevocationList>(proxy.shared.clone(), connection).await
                    }
                    (Some(stats::ALPN_STATS), _) => {
                        stats::serve(proxy.shared.clone(), connection).await
                    }
                    (alpn, _) => {
                        warn!(%remote, alpn = ?alpn.map(String::from_utf8_lossy), "no service for this protocol here");
                        connection.close(1u32.into(), b"protocol not served by this agent");
                    }
                }
            });
        }
        self.endpoint.close(0u32.into(), b"agent stopping");
        self.endpoint.wait_idle().await;
    }
}

/// The server side's transport settings: the tunnels' ([`transport_config`]), except that a
/// connection starts with the small budget of [`limits`] until its protocol is known.
fn server_transport_config() -> quinn::TransportConfig {
    let mut transport = transport_config();
    transport
        .max_concurrent_bidi_streams(limits::INITIAL_STREAMS.into())
        .receive_window(limits::INITIAL_WINDOW.into());
    transport
}

/// What an admitted connection holds in the [`Admission`] state.
enum SlotKind {
    Handshake,
    /// With the gauge that shows it.
    Unauthenticated(prometheus::IntGauge),
}

/// Releases its count in the [`Admission`] state when dropped, however the task holding it
/// ends.
struct Slot {
    admission: Arc<Mutex<Admission>>,
    source: IpAddr,
    kind: SlotKind,
}

impl Slot {
    fn new(admission: Arc<Mutex<Admission>>, source: IpAddr, kind: SlotKind) -> Slot {
        if let SlotKind::Unauthenticated(gauge) = &kind {
            gauge.inc();
        }
        Slot {
            admission,
            source,
            kind,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut admission = self
            .admission
            .lock()
            .expect("admission lock is never poisoned");
        match &self.kind {
            SlotKind::Handshake => admission.handshake_done(self.source),
            SlotKind::Unauthenticated(gauge) => {
                admission.unauthenticated_closed(self.source);
                gauge.dec();
            }
        }
    }
}
