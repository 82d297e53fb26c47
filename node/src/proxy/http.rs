//! The outbound HTTP proxy (`[outbound] http_proxy`): local apps set
//! `http_proxy=http://127.0.0.1:7481` and reach mesh services by name.
//!
//! - Absolute-form requests (`GET http://api.weft/path`) and origin-form requests whose Host
//!   names a mesh service are forwarded one by one: each request opens a stream to the service
//!   with [`outbound::connect`] (the same endpoint choice and failover as upstream listeners)
//!   and is sent there in origin-form, hop-by-hop headers removed; the response streams back.
//!   The app's connection stays open for further requests (keep-alive).
//! - `CONNECT api.weft:443` answers 200 and splices the connection to the service: any TCP
//!   protocol (TLS included) passes through unchanged.
//!
//! Names: `NAME.weft` is `default/NAME`; `NAME.NAMESPACE.weft` is `NAMESPACE/NAME` (the port is
//! ignored: the service's registered port is used). The proxy never resolves or contacts
//! anything outside the mesh: any other host is refused with 400 before any lookup. When the
//! mesh cannot reach the service the app gets 503 with a `weft-error` header naming the reason;
//! every refusal is logged and counted in `weft_tcp_connection_failures_total`.
//!
//! Draining: once it starts the listener closes, idle keep-alive connections are closed and
//! requests in flight finish (up to the drain deadline, when [`ProxyContext::cut`] ends them).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};
use weft_discovery::ServiceKey;

use super::l7;
use super::metered::Metered;
use super::outbound::{self, ConnectError};
use super::{Direction, ProxyContext, source_label, splice};

/// The domain under which mesh services are addressed.
pub const MESH_DOMAIN: &str = "weft";
/// Response header naming why the mesh could not carry a request.
pub const ERROR_HEADER: &str = "weft-error";
/// How long an app may take to send a request's headers (also closes idle keep-alive
/// connections after this long).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Headers that belong to one hop and are never forwarded (RFC 9110 §7.6.1), besides the ones
/// a `Connection` header lists.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Body of every response the proxy sends.
type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Errors starting the HTTP proxy.
#[derive(Debug, thiserror::Error)]
pub enum HttpProxyError {
    /// The listen address could not be bound.
    #[error("failed to bind the HTTP proxy ([outbound] http_proxy) to {address}: {error}")]
    Bind {
        /// The configured address.
        address: SocketAddr,
        /// What the OS said.
        error: io::Error,
    },
}

/// Why a request does not name a mesh service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Neither the request target nor a Host header names a host.
    #[error("the request names no host")]
    NoHost,
    /// An absolute-form target with a scheme other than `http`.
    #[error("scheme {0:?} is not proxied; use CONNECT for TLS")]
    Scheme(String),
    /// The host is outside the mesh domain.
    #[error("{0:?} is not a mesh service")]
    NotMesh(String),
    /// The host is in the mesh domain but is not a valid service name.
    #[error("{0:?} is not a valid mesh service name")]
    BadName(String),
}

impl RouteError {
    /// Short label for metrics and the `weft-error` header.
    pub fn reason(&self) -> &'static str {
        match self {
            RouteError::NoHost => "no_host",
            RouteError::Scheme(_) => "bad_scheme",
            RouteError::NotMesh(_) => "not_mesh_host",
            RouteError::BadName(_) => "bad_service_name",
        }
    }
}

/// The service a host names: `NAME.weft` is `default/NAME`, `NAME.NAMESPACE.weft` is
/// `NAMESPACE/NAME`. A port, letter case and a trailing dot are ignored. Names containing
/// dots are reached with their namespace: `a.b.default.weft` is `default/a.b`.
pub fn service_for_host(host: &str) -> Result<ServiceKey, RouteError> {
    let name = strip_port(host).trim_end_matches('.').to_ascii_lowercase();
    let Some(labels) = name
        .strip_suffix(MESH_DOMAIN)
        .and_then(|rest| rest.strip_suffix('.'))
    else {
        return Err(RouteError::NotMesh(host.to_string()));
    };
    let (name, namespace) = match labels.rsplit_once('.') {
        Some((name, namespace)) => (name, namespace),
        None => (labels, "default"),
    };
    if !valid_name(name) || !valid_name(namespace) {
        return Err(RouteError::BadName(host.to_string()));
    }
    Ok(ServiceKey::new(namespace, name))
}

/// `host:port` or `[v6]:port` without the port.
fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .split_once(']')
            .map(|(host, _)| &authority[..host.len() + 1])
            .unwrap_or(authority);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// The characters config allows in service and namespace names.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(['-', '.'])
        && !name.ends_with('.')
        && !name.contains("..")
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
        })
}

/// The host a request is for: the target's authority (absolute-form, or CONNECT's
/// authority-form), else the Host header.
fn request_host(method: &Method, uri: &Uri, headers: &HeaderMap) -> Result<String, RouteError> {
    if let Some(authority) = uri.authority() {
        match uri.scheme_str() {
            None if method == Method::CONNECT => {}
            Some(scheme) if scheme.eq_ignore_ascii_case("http") => {}
            Some(scheme) => return Err(RouteError::Scheme(scheme.to_string())),
            None => return Err(RouteError::Scheme(String::new())),
        }
        return Ok(authority.as_str().to_string());
    }
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .ok_or(RouteError::NoHost)
}

/// Removes hop-by-hop headers, including every header the `Connection` header lists.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

/// The HTTP proxy's listener, bound and not yet accepting.
pub struct HttpProxy {
    listener: TcpListener,
    address: SocketAddr,
}

impl HttpProxy {
    /// Binds the listener (startup fails on a bad address rather than half-starting).
    pub async fn bind(address: SocketAddr) -> Result<HttpProxy, HttpProxyError> {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|error| HttpProxyError::Bind { address, error })?;
        let address = listener.local_addr().unwrap_or(address);
        Ok(HttpProxy { listener, address })
    }

    /// Accepts app connections until draining starts; each is tracked in
    /// [`ProxyContext::connections`].
    pub async fn run(self, context: Arc<ProxyContext>) {
        info!(listen = %self.address, "HTTP proxy listening");
        loop {
            let tcp = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        warn!(listen = %self.address, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = context.draining.cancelled() => {
                    info!(listen = %self.address, "HTTP proxy stopped accepting");
                    return;
                }
            };
            context.connections.spawn(serve_app(context.clone(), tcp));
        }
    }
}

/// Serves one app connection: many requests, or one CONNECT.
async fn serve_app(context: Arc<ProxyContext>, tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let handler = context.clone();
    let service = hyper::service::service_fn(move |request| {
        let context = handler.clone();
        async move { Ok::<_, Infallible>(handle(&context, request).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let connection = builder
        .serve_connection(TokioIo::new(tcp), service)
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = context.draining.cancelled() => {
            // Finish the request in flight, then close; idle connections close at once.
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                result = connection.as_mut() => result,
                _ = context.cut.cancelled() => Ok(()),
            }
        }
        _ = context.cut.cancelled() => Ok(()),
    };
    if let Err(e) = result {
        debug!(error = %e, "HTTP proxy connection ended with an error");
    }
}

/// Answers one request from an app.
async fn handle(context: &Arc<ProxyContext>, request: Request<Incoming>) -> Response<ProxyBody> {
    let service = match request_host(request.method(), request.uri(), request.headers())
        .and_then(|host| service_for_host(&host))
    {
        Ok(service) => service,
        Err(e) => {
            warn!(method = %request.method(), target = %request.uri(), error = %e, "HTTP proxy request refused");
            context.metrics.failure(Direction::Outbound, e.reason());
            return refused(&e);
        }
    };
    let source = outbound::host_source(context);
    if request.method() == Method::CONNECT {
        tunnel(context, request, service, source).await
    } else {
        forward(context, request, service, source).await
    }
}

/// `CONNECT`: opens the stream to the service first (so a failure is a 503, not a dead
/// tunnel), answers 200, then splices the upgraded connection.
async fn tunnel(
    context: &Arc<ProxyContext>,
    mut request: Request<Incoming>,
    service: ServiceKey,
    source: Option<ServiceKey>,
) -> Response<ProxyBody> {
    let mut mesh = match outbound::connect(context, &service, source.as_ref()).await {
        Ok(mesh) => mesh,
        Err(e) => return unavailable(context, &service, &e),
    };
    let upgrade = hyper::upgrade::on(&mut request);
    let task_context = context.clone();
    context.connections.spawn(async move {
        let context = task_context;
        let upgraded = match upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                debug!(service = %service, error = %e, "app left before the CONNECT tunnel started");
                return;
            }
        };
        let mut app = TokioIo::new(upgraded);
        let source = source_label(source.as_ref());
        let destination = service.to_string();
        context
            .metrics
            .opened(Direction::Outbound, &source, &destination);
        let (read, written) = splice(&mut app, &mut mesh, &context.cut).await;
        context
            .metrics
            .closed(Direction::Outbound, &source, &destination, read, written);
    });
    Response::new(empty())
}

/// A plain request: to an HTTP service, routed, balanced and retried per request by the L7
/// proxy; to a TCP service, sent in origin-form on its own stream. The response streams back.
async fn forward(
    context: &Arc<ProxyContext>,
    request: Request<Incoming>,
    service: ServiceKey,
    source: Option<ServiceKey>,
) -> Response<ProxyBody> {
    let response = if l7::is_http(context, &service) {
        l7::handle(
            context,
            origin_form(request).map(BodyExt::boxed),
            &service,
            source.as_ref(),
        )
        .await
    } else {
        forward_on_stream(context, request, service, source).await
    };
    let (mut parts, body) = response.into_parts();
    // The app's hop is HTTP/1.1 (keep-alive) whatever the service spoke; hyper answers a
    // 1.0 app in 1.0.
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body)
}

/// A request to a TCP service that speaks HTTP anyway: one stream, one exchange.
async fn forward_on_stream(
    context: &Arc<ProxyContext>,
    request: Request<Incoming>,
    service: ServiceKey,
    source: Option<ServiceKey>,
) -> Response<ProxyBody> {
    let mesh = match outbound::connect(context, &service, source.as_ref()).await {
        Ok(mesh) => mesh,
        Err(e) => return unavailable(context, &service, &e),
    };
    let mesh = Metered::new(mesh);
    let (sent, received) = (mesh.written.clone(), mesh.read.clone());
    let source = source_label(source.as_ref());
    let destination = service.to_string();
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake(TokioIo::new(mesh)).await {
            Ok(pair) => pair,
            Err(e) => return bad_gateway(context, &service, &e),
        };
    context
        .metrics
        .opened(Direction::Outbound, &source, &destination);
    let task_context = context.clone();
    // The connection ends once the response body is done and `sender` is dropped.
    context.connections.spawn(async move {
        let context = task_context;
        tokio::select! {
            result = connection => if let Err(e) = result {
                debug!(service = %destination, error = %e, "mesh HTTP connection ended with an error");
            },
            _ = context.cut.cancelled() => {}
        }
        context.metrics.closed(
            Direction::Outbound,
            &source,
            &destination,
            sent.load(Ordering::Relaxed),
            received.load(Ordering::Relaxed),
        );
    });
    match sender.send_request(origin_form(request)).await {
        Ok(response) => response.map(BodyExt::boxed),
        Err(e) => bad_gateway(context, &service, &e),
    }
}

/// The request as the service should see it: origin-form target, Host as the app addressed
/// the service (for absolute-form the target's authority wins over any Host header, RFC 9112
/// §3.2.2), hop-by-hop headers removed.
fn origin_form(request: Request<Incoming>) -> Request<Incoming> {
    let (mut parts, body) = request.into_parts();
    if let Some(authority) = parts.uri.authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(header::HOST, host);
    }
    parts.uri = parts
        .uri
        .path_and_query()
        .map(|pq| Uri::from(pq.clone()))
        .unwrap_or_else(|| Uri::from_static("/"));
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    Request::from_parts(parts, body)
}

fn empty() -> ProxyBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

fn text(status: StatusCode, reason: &'static str, body: String) -> Response<ProxyBody> {
    l7::text_response(status, Some((ERROR_HEADER, reason)), body)
}

/// 400 for a request that names no mesh service, with the forms that do.
fn refused(error: &RouteError) -> Response<ProxyBody> {
    text(
        StatusCode::BAD_REQUEST,
        error.reason(),
        format!(
            "weft: {error}. This proxy reaches mesh services only: address them as \
             http://NAME.weft/ (namespace default) or http://NAME.NAMESPACE.weft/, \
             or CONNECT NAME.weft:PORT for any TCP protocol.\n"
        ),
    )
}

/// 503 when the mesh cannot reach the service.
fn unavailable(
    context: &ProxyContext,
    service: &ServiceKey,
    error: &ConnectError,
) -> Response<ProxyBody> {
    warn!(service = %service, error = %error, "HTTP proxy: the mesh could not reach the service");
    context.metrics.failure(Direction::Outbound, error.reason());
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        error.reason(),
        format!("weft: {error}\n"),
    )
}

/// 502 when the service's connection failed during the exchange.
fn bad_gateway(
    context: &ProxyContext,
    service: &ServiceKey,
    error: &hyper::Error,
) -> Response<ProxyBody> {
    const REASON: &str = "upstream_http_error";
    warn!(service = %service, error = %error, "HTTP proxy: the service's answer failed");
    context.metrics.failure(Direction::Outbound, REASON);
    text(
        StatusCode::BAD_GATEWAY,
        REASON,
        format!("weft: {service} failed to answer: {error}\n"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(namespace: &str, name: &str) -> ServiceKey {
        ServiceKey::new(namespace, name)
    }

    #[test]
    fn name_dot_weft_is_the_default_namespace() {
        assert_eq!(service_for_host("api.weft"), Ok(key("default", "api")));
        assert_eq!(service_for_host("api.weft:8080"), Ok(key("default", "api")));
        assert_eq!(service_for_host("API.Weft."), Ok(key("default", "api")));
    }

    #[test]
    fn name_dot_namespace_dot_weft_names_the_namespace() {
        assert_eq!(service_for_host("api.shop.weft"), Ok(key("shop", "api")));
        assert_eq!(
            service_for_host("api.shop.weft:443"),
            Ok(key("shop", "api"))
        );
        assert_eq!(
            service_for_host("a.b.default.weft"),
            Ok(key("default", "a.b"))
        );
    }

    #[test]
    fn hosts_outside_the_mesh_are_refused() {
        for host in [
            "example.com",
            "weft",
            "api.weft.example.com",
            "apiweft",
            "127.0.0.1:80",
            "[::1]:80",
            "",
        ] {
            assert!(
                matches!(service_for_host(host), Err(RouteError::NotMesh(_))),
                "{host}"
            );
        }
    }

    #[test]
    fn invalid_names_in_the_mesh_domain_are_refused() {
        for host in [
            ".weft",
            "-api.weft",
            "api..weft",
            "a_p!.weft",
            "api.-x.weft",
        ] {
            assert!(
                matches!(service_for_host(host), Err(RouteError::BadName(_))),
                "{host}"
            );
        }
    }

    #[test]
    fn ports_are_stripped_from_authorities() {
        assert_eq!(strip_port("api.weft:80"), "api.weft");
        assert_eq!(strip_port("api.weft"), "api.weft");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }

    #[test]
    fn the_target_authority_wins_over_the_host_header() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("other.weft"));
        let uri: Uri = "http://api.weft/x".parse().unwrap();
        assert_eq!(
            request_host(&Method::GET, &uri, &headers),
            Ok("api.weft".into())
        );
        let origin: Uri = "/x".parse().unwrap();
        assert_eq!(
            request_host(&Method::GET, &origin, &headers),
            Ok("other.weft".into())
        );
        assert_eq!(
            request_host(&Method::GET, &origin, &HeaderMap::new()),
            Err(RouteError::NoHost)
        );
        let connect: Uri = "api.weft:443".parse().unwrap();
        assert_eq!(
            request_host(&Method::CONNECT, &connect, &HeaderMap::new()),
            Ok("api.weft:443".into())
        );
        let https: Uri = "https://api.weft/".parse().unwrap();
        assert!(matches!(
            request_host(&Method::GET, &https, &headers),
            Err(RouteError::Scheme(_))
        ));
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic eA=="),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("host", "api.weft"),
            ("x-end-to-end", "kept"),
            ("content-length", "3"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-length", "host", "x-end-to-end"]);
    }
}
