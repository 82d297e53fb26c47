//! Per-request authorization for HTTP services on inbound streams.
//!
//! When the policy for a connection depends on the request (HTTPRouteGroup rules), or denies
//! an `http`/`http2`/`grpc` service, the receiving agent speaks HTTP on the tunnel stream
//! (HTTP/1.1 for `http`, HTTP/2 for `http2` and `grpc`) instead of passing bytes through:
//! each request is decided on its own; a denied request is answered `403 Forbidden` with a
//! `weft-deny-reason` header (the reason label, as in `weft_authz_decisions_total`), an
//! allowed one is sent to the service over one local connection, and the response streams
//! back. The calling app sees an ordinary HTTP exchange either way.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tracing::debug;
use weft_ca::SpiffeId;
use weft_discovery::{Protocol, ServiceKey};

use super::ProxyContext;
use super::metered::Metered;
use crate::policy::engine::{HttpRequest, Request as Question};

/// The header naming why a request was denied.
pub const DENY_REASON_HEADER: &str = "weft-deny-reason";

type GateBody = BoxBody<Bytes, hyper::Error>;

/// What one gated stream serves.
pub struct Gate {
    /// The verified caller.
    pub source: SpiffeId,
    /// The service on this host.
    pub destination: ServiceKey,
    /// Its port, as policy sees it.
    pub port: u16,
    /// Its protocol: HTTP/1.1, or HTTP/2 for `http2` and `grpc`.
    pub protocol: Protocol,
}

/// Local connection to the service, for one gated stream. HTTP/1.1 carries one request at a
/// time (as the gated stream does); HTTP/2 multiplexes them.
enum Upstream {
    Http1(Mutex<hyper::client::conn::http1::SendRequest<Incoming>>),
    Http2(hyper::client::conn::http2::SendRequest<Incoming>),
}

/// Serves HTTP on `mesh` until the caller closes it, deciding every request; allowed requests
/// go to the service over `tcp`. Returns the bytes (from the mesh, to the mesh).
pub async fn serve(
    context: Arc<ProxyContext>,
    gate: Gate,
    mesh: Metered,
    tcp: TcpStream,
) -> (u64, u64) {
    let (read, written) = (mesh.read.clone(), mesh.written.clone());
    let upstream = match gate.protocol {
        Protocol::Http2 | Protocol::Grpc => {
            match hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
            {
                Ok((sender, connection)) => {
                    tokio::spawn(connection);
                    Upstream::Http2(sender)
                }
                Err(e) => {
                    debug!(service = %gate.destination, error = %e, "HTTP/2 handshake with the service failed");
                    return (0, 0);
                }
            }
        }
        Protocol::Http | Protocol::Tcp => {
            match hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await {
                Ok((sender, connection)) => {
                    tokio::spawn(connection.with_upgrades());
                    Upstream::Http1(Mutex::new(sender))
                }
                Err(e) => {
                    debug!(service = %gate.destination, error = %e, "HTTP/1.1 handshake with the service failed");
                    return (0, 0);
                }
            }
        }
    };
    let protocol = gate.protocol;
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
    let result = match protocol {
        Protocol::Http2 | Protocol::Grpc => {
            let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, service);
            tokio::select! {
                result = connection => result,
                _ = context.cut.cancelled() => Ok(()),
            }
        }
        Protocol::Http | Protocol::Tcp => {
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .with_upgrades();
            tokio::select! {
                result = connection => result,
                _ = context.cut.cancelled() => Ok(()),
            }
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

/// Decides one request and answers it or sends it on.
async fn handle(
    context: &ProxyContext,
    gate: &Gate,
    upstream: &Upstream,
    request: Request<Incoming>,
) -> Response<GateBody> {
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
        return text(
            StatusCode::FORBIDDEN,
            Some(decision.reason.as_str()),
            format!(
                "weft: {} may not {} {} on {}: {decision}\n",
                gate.source,
                request.method(),
                request.uri().path(),
                gate.destination
            ),
        );
    }
    let sent = match upstream {
        Upstream::Http1(sender) => sender.lock().await.send_request(request).await,
        Upstream::Http2(sender) => sender.clone().send_request(request).await,
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

fn text(status: StatusCode, deny_reason: Option<&'static str>, body: String) -> Response<GateBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(reason) = deny_reason {
        headers.insert(DENY_REASON_HEADER, HeaderValue::from_static(reason));
    }
    response
}
