//! Per-request authorization for HTTP services on inbound streams.
//!
//! When the policy for a connection depends on the request (HTTPRouteGroup rules), or denies
//! an `http`/`http2`/`grpc` service, the receiving agent speaks HTTP on the tunnel stream
//! (HTTP/1.1 for `http`, HTTP/2 for `http2` and `grpc`) instead of passing bytes through:
//! each request is decided on its own; a denied request is answered `403 Forbidden` with a
//! `weft-deny-reason` header (the reason label, as in `weft_authz_decisions_total`), one over
//! the service's rate limit `429` with `weft-error: rate_limited`, an allowed one is sent to
//! the service, and the response streams back. The calling app sees an ordinary HTTP exchange either way.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tracing::debug;
use weft_ca::SpiffeId;
use weft_discovery::{Protocol, ServiceKey};

use super::l7::access_log::{self, AccessEntry};
use super::l7::{L7Body, over_limit, text_response};
use super::metered::Metered;
use super::{Direction, ProxyContext};
use crate::config::RateLimit;
use crate::policy::engine::{Decision, HttpRequest, Request as Question};
use crate::policy::matcher::normalize_path;

/// The header naming why a request was denied.
pub const DENY_REASON_HEADER: &str = "weft-deny-reason";

/// What one gated stream serves.
pub struct Gate {
    /// The verified caller.
    pub source: SpiffeId,
    /// The calling service as metrics name it (`-` for the node itself).
    pub source_label: String,
    /// The service on this host.
    pub destination: ServiceKey,
    /// Its port, as policy sees it.
    pub port: u16,
    /// Its protocol: HTTP/1.1, or HTTP/2 for `http2` and `grpc`.
    pub protocol: Protocol,
    /// Its rate limit here, if any.
    pub rate_limit: Option<RateLimit>,
}

/// How a gated stream reaches the service.
pub enum Upstream {
    /// One HTTP/1.1 connection, for a TCP-kind stream (one request at a time, as the stream).
    Http1(Mutex<hyper::client::conn::http1::SendRequest<L7Body>>),
    /// One HTTP/2 connection, for a TCP-kind stream.
    Http2(hyper::client::conn::http2::SendRequest<L7Body>),
    /// The agent's pooled clients, for an HTTP-kind stream (multiplexed requests).
    Pooled(SocketAddr, Protocol),
}

impl Upstream {
    /// HTTP over `tcp`, a connection to a service speaking `protocol`.
    pub async fn over(protocol: Protocol, tcp: TcpStream) -> Result<Upstream, hyper::Error> {
        Ok(match protocol {
            Protocol::Http2 | Protocol::Grpc => {
                let (sender, connection) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                        .await?;
                tokio::spawn(connection);
                Upstream::Http2(sender)
            }
            Protocol::Http | Protocol::Tcp => {
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(connection.with_upgrades());
                Upstream::Http1(Mutex::new(sender))
            }
        })
    }
}

/// Serves HTTP on `mesh` until the caller closes it, deciding every request and sending the
/// allowed ones `upstream`. The caller speaks HTTP/2 on HTTP-kind streams, else the service's
/// protocol. Returns the bytes (from the mesh, to the mesh).
pub async fn serve(
    context: Arc<ProxyContext>,
    gate: Gate,
    mesh: Metered,
    upstream: Upstream,
) -> (u64, u64) {
    let (read, written) = (mesh.read.clone(), mesh.written.clone());
    let caller_speaks_h2 = match &upstream {
        Upstream::Pooled(..) => true,
        _ => matches!(gate.protocol, Protocol::Http2 | Protocol::Grpc),
    };
    let shared = Arc::new((gate, upstream));
    let handler_context = context.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let shared = shared.clone();
        let context = handler_context.clone();
        async move {
            let (gate, upstream) = &*shared;
            Ok::<_, Infallible>(handle(&context, gate, upstream, request).await)
        }
    });
    let io = TokioIo::new(mesh);
    let result = if caller_speaks_h2 {
        let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, service);
        tokio::select! {
            result = connection => result,
            _ = context.cut.cancelled() => Ok(()),
        }
    } else {
        let connection = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .with_upgrades();
        tokio::select! {
            result = connection => result,
            _ = context.cut.cancelled() => Ok(()),
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "gated HTTP stream ended with an error");
    }
    (
        read.load(std::sync::atomic::Ordering::Relaxed),
        written.load(std::sync::atomic::Ordering::Relaxed),
    )
}

/// Decides one request and answers it or sends it on; counts it.
async fn handle(
    context: &ProxyContext,
    gate: &Gate,
    upstream: &Upstream,
    request: Request<Incoming>,
) -> Response<L7Body> {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let trace = request.headers().get("traceparent").cloned();
    let response = decide_and_forward(context, gate, upstream, request).await;
    let took = started.elapsed();
    let destination = gate.destination.to_string();
    context.l7.metrics.request(
        Direction::Inbound,
        &gate.source_label,
        &destination,
        "-",
        response.status(),
        took,
    );
    context.l7.access_log.record(&AccessEntry {
        direction: "inbound",
        source: &gate.source_label,
        destination: &destination,
        route: "-",
        method: method.as_str(),
        path: &path,
        status: response.status().as_u16(),
        duration_ms: took.as_secs_f64() * 1e3,
        trace_id: access_log::trace_id(trace.as_ref()),
    });
    response
}

async fn decide_and_forward(
    context: &ProxyContext,
    gate: &Gate,
    upstream: &Upstream,
    request: Request<Incoming>,
) -> Response<L7Body> {
    let decision = context.shared.policy.decide(&Question {
        source: &gate.source,
        destination: &gate.destination,
        port: gate.port,
        http: Some(HttpRequest {
            method: request.method().as_str(),
            path: request.uri().path_and_query().map_or("/", |pq| pq.as_str()),
            headers: request.headers(),
        }),
    });
    if !decision.allowed {
        debug!(source = %gate.source, destination = %gate.destination, method = %request.method(), %decision, "request denied");
        return forbidden(
            &gate.source,
            request.method(),
            request.uri().path(),
            &gate.destination,
            &decision,
        );
    }
    if let Some(limited) = over_limit(context, &gate.destination, gate.rate_limit) {
        return limited;
    }
    let (mut parts, body) = request.into_parts();
    // The service sees the path policy decided on (`/a/../b` is `/b`), with its query, so
    // that what was allowed is what is served.
    let raw = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    if let Cow::Owned(normalized) = normalize_path(raw) {
        let target = match parts.uri.query() {
            Some(query) => format!("{normalized}?{query}"),
            None => normalized,
        };
        let mut uri = parts.uri.clone().into_parts();
        uri.path_and_query = target.parse().ok();
        if let Ok(rebuilt) = Uri::from_parts(uri) {
            parts.uri = rebuilt;
        }
    }
    let request = Request::from_parts(parts, body.boxed());
    let sent = match upstream {
        Upstream::Http1(sender) => sender
            .lock()
            .await
            .send_request(request)
            .await
            .map_err(|e| e.to_string()),
        Upstream::Http2(sender) => sender
            .clone()
            .send_request(request)
            .await
            .map_err(|e| e.to_string()),
        Upstream::Pooled(address, protocol) => context
            .l7
            .clients
            .send_local(*address, *protocol, request)
            .await
            .map_err(|e| format!("{e:?}")),
    };
    match sent {
        Ok(response) => response.map(BodyExt::boxed),
        Err(e) => {
            debug!(service = %gate.destination, error = %e, "the service's answer failed");
            text(
                StatusCode::BAD_GATEWAY,
                None,
                format!("weft: {} failed to answer: {e}\n", gate.destination),
            )
        }
    }
}

/// The 403 for a denied request, naming the reason in [`DENY_REASON_HEADER`].
pub fn forbidden(
    source: &SpiffeId,
    method: &hyper::Method,
    path: &str,
    destination: &ServiceKey,
    decision: &Decision,
) -> Response<L7Body> {
    text(
        StatusCode::FORBIDDEN,
        Some(decision.reason.as_str()),
        format!("weft: {source} may not {method} {path} on {destination}: {decision}\n"),
    )
}

fn text(status: StatusCode, deny_reason: Option<&'static str>, body: String) -> Response<L7Body> {
    text_response(
        status,
        deny_reason.map(|reason| (DENY_REASON_HEADER, reason)),
        body,
    )
}
