//! Tunnels from other agents to this host's services.
//!
//! A connection must present a node SVID (checked in the handshake, required here). Each
//! stream names its destination and source: the destination must be a service of this host,
//! the source must be in the sending node's scope, and the authorization hook must allow the
//! pair. Then the agent connects to the service's local port, answers `ok`, and splices.
//! Every refusal is answered with its status and reason, and counted.

use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::policy::engine::Request;
use weft_ca::{SpiffeId, Usage, VerifiedSvid};
use weft_discovery::Protocol;

use super::gate::{self, Gate, Upstream};
use super::header::{self, MAX_FIELD, Status, StreamHeader, StreamKind};
use super::metered::Metered;
use super::tunnel::{TrustWatch, peer_node, track};
use super::{CONNECT_TIMEOUT, Direction, HEADER_TIMEOUT, ProxyContext, source_label, splice};

/// How an accepted stream is carried to the service.
enum Carry {
    /// Bytes pass through to this connection: the policy decided the stream as a whole.
    Splice(TcpStream),
    /// HTTP, decided request by request.
    Gate(Gate, Upstream),
}

/// Serves every stream of one `weft/1` connection.
pub async fn serve(context: Arc<ProxyContext>, connection: quinn::Connection) {
    let remote = connection.remote_address();
    let peer = match peer_node(&connection, &context.shared.bundle, Usage::Client) {
        Ok(peer) => Arc::new(peer),
        Err(reason) => {
            warn!(%remote, %reason, "tunnel refused");
            context.metrics.handshake("server", "no_node_svid");
            connection.close(3u32.into(), b"a node SVID is required");
            return;
        }
    };
    context.metrics.handshake("server", "ok");
    debug!(%remote, peer = %peer.id, "tunnel accepted");
    track(
        connection.clone(),
        context.metrics.clone(),
        peer.not_after,
        None,
        TrustWatch {
            bundle: context.shared.bundle.clone(),
            signal: context.shared.trust_signal.clone(),
            usage: Usage::Client,
        },
    );
    loop {
        let (send, recv) = tokio::select! {
            accepted = connection.accept_bi() => match accepted {
                Ok(stream) => stream,
                Err(e) => {
                    debug!(%remote, error = %e, "tunnel ended");
                    return;
                }
            },
            _ = context.cut.cancelled() => return,
        };
        let context_for_stream = context.clone();
        let peer = peer.clone();
        context
            .connections
            .spawn(async move { stream(context_for_stream, peer, send, recv).await });
    }
}

async fn stream(
    context: Arc<ProxyContext>,
    peer: Arc<VerifiedSvid>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let refuse = |status: Status, reason: String| {
        context
            .metrics
            .failure(Direction::Inbound, status.as_label());
        debug!(peer = %peer.id, status = status.as_label(), %reason, "stream refused");
        header::encode_reply(status, &reason)
    };
    let reply = async {
        let header = match tokio::time::timeout(HEADER_TIMEOUT, read_header(&mut recv)).await {
            Ok(Ok(header)) => header,
            Ok(Err(e)) => return Err(refuse(Status::BadHeader, e)),
            Err(_) => {
                return Err(refuse(
                    Status::BadHeader,
                    format!("no header within {HEADER_TIMEOUT:?}"),
                ));
            }
        };
        if context.draining.is_cancelled() {
            return Err(refuse(Status::Draining, "this agent is draining".into()));
        }
        let source_id = match &header.source {
            Some(source) => {
                if !peer
                    .scope
                    .as_ref()
                    .is_some_and(|s| s.allows(&source.namespace, &source.name))
                {
                    return Err(refuse(
                        Status::SourceNotAllowed,
                        format!("{} may not act for {source}", peer.id),
                    ));
                }
                SpiffeId::service(&context.trust_domain, &source.namespace, &source.name)
                    .map_err(|e| refuse(Status::BadHeader, e.to_string()))?
            }
            None => peer.id.clone(),
        };
        let config = context.shared.config.load();
        let Some(service) = config.services.iter().find(|s| s.key == header.destination) else {
            return Err(refuse(
                Status::UnknownService,
                format!("{} does not run on this host", header.destination),
            ));
        };
        let port = service.address.port();
        let gate = || Gate {
            source: source_id.clone(),
            source_label: source_label(header.source.as_ref()),
            destination: header.destination.clone(),
            port,
            protocol: service.protocol,
            rate_limit: service.rate_limit,
        };
        let carry =
            match (header.kind, service.protocol) {
                (StreamKind::Http, Protocol::Tcp) => {
                    return Err(refuse(
                        Status::BadHeader,
                        format!(
                            "{} is a TCP service; it takes TCP streams",
                            header.destination
                        ),
                    ));
                }
                (StreamKind::Http, protocol) => {
                    // Requests are decided one by one; the service is reached through the pool.
                    let carry = Carry::Gate(gate(), Upstream::Pooled(service.address, protocol));
                    return Ok((header, carry));
                }
                (StreamKind::Tcp, Protocol::Tcp) => {
                    let decision = context.shared.policy.decide(&Request {
                        source: &source_id,
                        destination: &header.destination,
                        port,
                        http: None,
                    });
                    if !decision.allowed {
                        return Err(refuse(Status::Denied, format!("{source_id}: {decision}")));
                    }
                    None
                }
                (StreamKind::Tcp, _) => match context.shared.policy.decide_connection(
                    &source_id,
                    &header.destination,
                    port,
                ) {
                    Some(decision) if decision.allowed => None,
                    _ => Some(gate()),
                },
            };
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(service.address))
            .await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                return Err(refuse(
                    Status::UpstreamRefused,
                    format!("{} at {}: {e}", header.destination, service.address),
                ));
            }
            Err(_) => {
                return Err(refuse(
                    Status::UpstreamRefused,
                    format!(
                        "{} at {} did not accept within {CONNECT_TIMEOUT:?}",
                        header.destination, service.address
                    ),
                ));
            }
        };
        let _ = tcp.set_nodelay(true);
        let carry = match carry {
            None => Carry::Splice(tcp),
            Some(gate) => match Upstream::over(gate.protocol, tcp).await {
                Ok(upstream) => Carry::Gate(gate, upstream),
                Err(e) => {
                    return Err(refuse(
                        Status::UpstreamRefused,
                        format!("{} at {}: {e}", header.destination, service.address),
                    ));
                }
            },
        };
        Ok((header, carry))
    }
    .await;
    match reply {
        Err(bytes) => {
            if send.write_all(&bytes).await.is_ok() {
                let _ = send.finish();
                let _ = send.stopped().await;
            }
        }
        Ok((header, carry)) => {
            if let Err(e) = send.write_all(&header::encode_reply(Status::Ok, "")).await {
                context.metrics.stream_error("reply_failed");
                debug!(error = %e, "stream closed before the reply");
                return;
            }
            let source = source_label(header.source.as_ref());
            let destination = header.destination.to_string();
            context
                .metrics
                .opened(Direction::Inbound, &source, &destination);
            let mut mesh = tokio::io::join(recv, send);
            let (read, written) = match carry {
                Carry::Splice(mut tcp) => splice(&mut tcp, &mut mesh, &context.cut).await,
                Carry::Gate(gate, upstream) => {
                    let mesh = Metered::new(Box::pin(mesh));
                    let (from_mesh, to_mesh) =
                        gate::serve(context.clone(), gate, mesh, upstream).await;
                    // As `splice` reports them: read from the service, written to it.
                    (to_mesh, from_mesh)
                }
            };
            context
                .metrics
                .closed(Direction::Inbound, &source, &destination, read, written);
        }
    }
}

/// Reads the stream header field by field, never more than its bounded size.
async fn read_header(recv: &mut quinn::RecvStream) -> Result<StreamHeader, String> {
    let mut buf = vec![0u8; 4];
    recv.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    for field in 0..2 {
        let at = buf.len() - 2;
        let len = u16::from_be_bytes([buf[at], buf[at + 1]]) as usize;
        if len > MAX_FIELD {
            return Err(format!("header field of {len} bytes"));
        }
        let extra = if field == 0 { len + 2 } else { len };
        let start = buf.len();
        buf.resize(start + extra, 0);
        recv.read_exact(&mut buf[start..])
            .await
            .map_err(|e| e.to_string())?;
    }
    StreamHeader::decode(&buf)
        .map(|(header, _)| header)
        .map_err(|e| e.to_string())
}
