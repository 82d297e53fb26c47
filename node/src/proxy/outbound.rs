//! Local apps into the mesh: `[[upstream]]` listeners, and [`connect`], which the HTTP proxy
//! shares.
//!
//! A connection goes to one routable endpoint of its service (alive member, passing health),
//! tried in random order: on a connect failure or a refusal another endpoint could fix, the
//! next one is tried. An endpoint on this host is reached directly, without a tunnel. When no
//! endpoint works the app's connection is closed at once, and the reason logged and counted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use rand::seq::SliceRandom;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use weft_discovery::{Protocol, ServiceKey};

use super::header::{StreamHeader, StreamKind};
use super::{CONNECT_TIMEOUT, Direction, ProxyContext, source_label, splice};
use crate::config::UpstreamConfig;
use crate::policy::engine::Request;

/// A byte stream to a service, through a tunnel or to a local port.
pub trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}

/// Why a connection to a service could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No routable endpoint is known.
    #[error("no healthy endpoint of {0}")]
    NoEndpoint(ServiceKey),
    /// Every endpoint failed; the last error is kept.
    #[error("every endpoint of {service} failed; last: {last}")]
    AllFailed {
        /// The service.
        service: ServiceKey,
        /// The last failure.
        last: String,
        /// Its label.
        reason: &'static str,
    },
}

impl ConnectError {
    /// Short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::NoEndpoint(_) => "no_endpoint",
            ConnectError::AllFailed { reason, .. } => reason,
        }
    }
}

/// Connects to `service` acting for `source`.
pub async fn connect(
    context: &ProxyContext,
    service: &ServiceKey,
    source: Option<&ServiceKey>,
) -> Result<Pin<Box<dyn Duplex>>, ConnectError> {
    let catalog = context.shared.catalog.current();
    let mut endpoints: Vec<_> = catalog.routable_endpoints(service).cloned().collect();
    if endpoints.is_empty() {
        return Err(ConnectError::NoEndpoint(service.clone()));
    }
    endpoints.shuffle(&mut rand::rng());
    // Prefer this host: no tunnel, no extra hop.
    endpoints.sort_by_key(|e| !e.is_local);
    let header = StreamHeader {
        kind: StreamKind::Tcp,
        destination: service.clone(),
        source: source.cloned(),
    };
    let mut last = (String::new(), "");
    for endpoint in endpoints {
        // A local endpoint is reached directly only when policy lets the whole connection
        // through; otherwise through this agent's own tunnel endpoint, which enforces it as
        // for any peer.
        if endpoint.is_local && local_shortcut_allowed(context, service, source) {
            let address = context
                .shared
                .config
                .load()
                .services
                .iter()
                .find(|s| &s.key == service)
                .map(|s| s.address);
            if let Some(address) = address {
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await {
                    Ok(Ok(tcp)) => {
                        let _ = tcp.set_nodelay(true);
                        return Ok(Box::pin(tcp));
                    }
                    Ok(Err(e)) => last = (format!("local {address}: {e}"), "upstream_refused"),
                    Err(_) => last = (format!("local {address}: no answer"), "upstream_refused"),
                }
            }
            continue;
        }
        match context.tunnels.open(endpoint.tunnel_addr, &header).await {
            Ok(stream) => return Ok(Box::pin(stream)),
            Err(e) => {
                warn!(service = %service, node = %endpoint.node, error = %e, "endpoint failed");
                context.metrics.stream_error(e.reason());
                let retry = e.worth_another_endpoint();
                last = (e.to_string(), e.reason());
                if !retry {
                    break;
                }
            }
        }
    }
    Err(ConnectError::AllFailed {
        service: service.clone(),
        last: last.0,
        reason: last.1,
    })
}

/// Whether policy lets a connection from `source` to the local `service` through as a whole.
fn local_shortcut_allowed(
    context: &ProxyContext,
    service: &ServiceKey,
    source: Option<&ServiceKey>,
) -> bool {
    let config = context.shared.config.load();
    let Some(local) = config.services.iter().find(|s| &s.key == service) else {
        return false;
    };
    if local.rate_limit.is_some() {
        return false; // requests are counted one by one at the gate
    }
    let Some(id) = super::local_identity(context, source) else {
        return false;
    };
    let port = local.address.port();
    let policy = &context.shared.policy;
    match local.protocol {
        Protocol::Tcp => {
            policy
                .decide(&Request {
                    source: &id,
                    destination: service,
                    port,
                    http: None,
                })
                .allowed
        }
        _ => policy
            .decide_connection(&id, service, port)
            .is_some_and(|d| d.allowed),
    }
}

/// Carries one app connection to `service`.
pub async fn carry(
    context: Arc<ProxyContext>,
    mut app: TcpStream,
    service: ServiceKey,
    source: Option<ServiceKey>,
) {
    let _ = app.set_nodelay(true);
    let source_text = source_label(source.as_ref());
    let destination = service.to_string();
    match connect(&context, &service, source.as_ref()).await {
        Ok(mut mesh) => {
            context
                .metrics
                .opened(Direction::Outbound, &source_text, &destination);
            let (read, written) = splice(&mut app, &mut mesh, &context.cut).await;
            context.metrics.closed(
                Direction::Outbound,
                &source_text,
                &destination,
                read,
                written,
            );
        }
        Err(e) => {
            warn!(service = %service, error = %e, "connection closed: the mesh could not carry it");
            context.metrics.failure(Direction::Outbound, e.reason());
        }
    }
}

/// The source a connection from an upstream listener acts for: the configured `from`, else
/// [`host_source`].
fn source_of(context: &ProxyContext, upstream: &UpstreamConfig) -> Option<ServiceKey> {
    upstream.from.clone().or_else(|| host_source(context))
}

/// The source a local app acts for when nothing names one: the host's only service if it
/// runs exactly one, else none (the node itself). Shared by upstream listeners and the HTTP
/// proxy.
pub fn host_source(context: &ProxyContext) -> Option<ServiceKey> {
    let config = context.shared.config.load();
    match config.services.as_slice() {
        [only] => Some(only.key.clone()),
        _ => None,
    }
}

/// The running upstream listeners.
pub struct Upstreams {
    context: Arc<ProxyContext>,
    running: HashMap<SocketAddr, (UpstreamConfig, CancellationToken)>,
}

/// Errors binding an upstream listener.
#[derive(Debug, thiserror::Error)]
#[error("failed to bind upstream {service} on {listen}: {error}")]
pub struct BindError {
    /// The destination service.
    pub service: ServiceKey,
    /// The address.
    pub listen: SocketAddr,
    /// What the OS said.
    pub error: std::io::Error,
}

impl Upstreams {
    /// No listeners yet.
    pub fn new(context: Arc<ProxyContext>) -> Upstreams {
        Upstreams {
            context,
            running: HashMap::new(),
        }
    }

    /// Makes the running listeners match `wanted`: new ones are bound (all before any starts,
    /// so one bad address changes nothing), removed ones stop accepting (their connections go on).
    pub async fn set(&mut self, wanted: &[UpstreamConfig]) -> Result<(), BindError> {
        let mut bound = Vec::new();
        for upstream in wanted {
            if self
                .running
                .get(&upstream.listen)
                .is_some_and(|(running, _)| running == upstream)
            {
                continue;
            }
            let existing = self
                .running
                .get(&upstream.listen)
                .map(|(_, stop)| stop.clone());
            if let Some(stop) = existing {
                // Same address, new destination: free the port first.
                stop.cancel();
                self.running.remove(&upstream.listen);
                tokio::task::yield_now().await;
            }
            let listener = TcpListener::bind(upstream.listen)
                .await
                .map_err(|error| BindError {
                    service: upstream.service.clone(),
                    listen: upstream.listen,
                    error,
                })?;
            bound.push((upstream.clone(), listener));
        }
        let keep: Vec<SocketAddr> = wanted.iter().map(|u| u.listen).collect();
        self.running.retain(|addr, (_, stop)| {
            let kept = keep.contains(addr);
            if !kept {
                stop.cancel();
            }
            kept
        });
        for (upstream, listener) in bound {
            let stop = self.context.draining.child_token();
            info!(service = %upstream.service, listen = %upstream.listen, "upstream listening");
            tokio::spawn(accept_loop(
                self.context.clone(),
                listener,
                upstream.clone(),
                stop.clone(),
            ));
            self.running.insert(upstream.listen, (upstream, stop));
        }
        Ok(())
    }
}

async fn accept_loop(
    context: Arc<ProxyContext>,
    listener: TcpListener,
    upstream: UpstreamConfig,
    stop: CancellationToken,
) {
    loop {
        let (app, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(listen = %upstream.listen, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let source = source_of(&context, &upstream);
        let service = upstream.service.clone();
        if super::l7::is_http(&context, &service) {
            context
                .connections
                .spawn(super::l7::serve_app(context.clone(), app, service, source));
        } else {
            context
                .connections
                .spawn(carry(context.clone(), app, service, source));
        }
    }
}
