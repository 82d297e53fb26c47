//! L7 for `http`, `http2` and `grpc` services: each request from a local app is routed,
//! balanced, timed and retried on its own, as Linkerd's proxy does.
//!
//! - Entry: an `[[upstream]]` listener whose service speaks HTTP serves HTTP/1.1 and h2c (prior
//!   knowledge) to the app ([`serve_app`]); the outbound HTTP proxy hands its requests to
//!   [`handle`] too.
//! - Routing: a TrafficSplit whose root is the addressed service sends each request (matching
//!   its HTTPRouteGroups, if it names any) to a backend drawn by weight ([`split`]).
//! - Balancing: power of two choices over peak-EWMA latency, this zone first, with outlier
//!   ejection ([`balance`]).
//! - Transport: requests to one endpoint for one (destination, source) share one HTTP/2
//!   connection over one tunnel stream of kind `HTTP` ([`pool`]); the receiving agent decides
//!   and forwards each request ([`super::gate`]).
//! - Retries and timeouts ([`retry`]): attempts that never reached an endpoint go to another
//!   one; answers are retried by the destination's `HTTPRoutePolicy`, within a retry budget.
//! - Telemetry: golden metrics per source, destination and status class, and W3C
//!   `traceparent` kept or started, and passed on.

pub mod access_log;
pub mod balance;
pub mod metrics;
pub mod pool;
pub mod ratelimit;
pub mod retry;
pub mod split;

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::RngCore;
use tokio::net::TcpStream;
use tracing::{debug, warn};
use weft_discovery::{Endpoint, Protocol, ServiceKey};

use self::access_log::{AccessEntry, AccessLog};
use self::balance::{Balancer, Ejection, Outcome};
use self::metrics::HttpMetrics;
use self::pool::{ClientPool, SendError};
use self::ratelimit::RateLimiter;
use self::retry::{CONNECT_RETRIES, RetryBudget, RouteRules};
use super::ProxyContext;
use super::http::ERROR_HEADER;

/// Body type of requests and responses the L7 proxy passes on.
pub type L7Body = BoxBody<Bytes, hyper::Error>;

/// Largest request body kept in memory so that the request can be retried; larger bodies are
/// streamed and their requests are not retried once sent.
pub const MAX_REPLAY_BODY: usize = 64 * 1024;

/// L7 state shared by every request of this agent.
pub struct L7 {
    /// Per-endpoint latency and failure statistics.
    pub balancer: Balancer,
    /// HTTP/2 connections over tunnel streams, and to local services.
    pub clients: ClientPool,
    /// Retry budgets per destination.
    budgets: Mutex<HashMap<ServiceKey, Arc<RetryBudget>>>,
    /// Rate limits of this host's services.
    pub limiter: RateLimiter,
    /// The access log (off unless configured).
    pub access_log: AccessLog,
    /// Golden metrics.
    pub metrics: HttpMetrics,
}

impl L7 {
    /// Registers the HTTP metrics and opens the access log, if configured.
    pub fn new(
        registry: &prometheus::Registry,
        access_log: Option<&crate::config::AccessLogTarget>,
    ) -> anyhow::Result<L7> {
        Ok(L7 {
            access_log: AccessLog::start(access_log, registry)?,
            balancer: Balancer::default(),
            clients: ClientPool::default(),
            budgets: Mutex::new(HashMap::new()),
            limiter: RateLimiter::default(),
            metrics: HttpMetrics::new(registry)?,
        })
    }

    fn budget(&self, service: &ServiceKey) -> Arc<RetryBudget> {
        self.budgets
            .lock()
            .expect("budget map lock is never poisoned")
            .entry(service.clone())
            .or_default()
            .clone()
    }
}

/// Whether requests to `service` are handled per request: its endpoints speak HTTP, or it is
/// the root of a TrafficSplit whose backends do.
pub fn is_http(context: &ProxyContext, service: &ServiceKey) -> bool {
    let catalog = context.shared.catalog.current();
    let speaks_http = |s: &ServiceKey| {
        catalog
            .endpoints(s)
            .first()
            .is_some_and(|e| e.protocol != Protocol::Tcp)
    };
    speaks_http(service)
        || context
            .shared
            .policy
            .active()
            .splits
            .backends_of(service)
            .iter()
            .any(speaks_http)
}

/// Serves HTTP/1.1 and h2c on one app connection to an upstream listener of `service`.
pub async fn serve_app(
    context: Arc<ProxyContext>,
    app: TcpStream,
    service: ServiceKey,
    source: Option<ServiceKey>,
) {
    let _ = app.set_nodelay(true);
    let handler = context.clone();
    let target = Arc::new((service, source));
    let service_fn = hyper::service::service_fn(move |request: Request<Incoming>| {
        let context = handler.clone();
        let target = target.clone();
        async move {
            let (service, source) = &*target;
            Ok::<_, Infallible>(
                handle(
                    &context,
                    request.map(BodyExt::boxed),
                    service,
                    source.as_ref(),
                )
                .await,
            )
        }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(app), service_fn);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = context.draining.cancelled() => {
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                result = connection.as_mut() => result,
                _ = context.cut.cancelled() => Ok(()),
            }
        }
        _ = context.cut.cancelled() => Ok(()),
    };
    if let Err(e) = result {
        debug!(error = %e, "app HTTP connection ended with an error");
    }
}

/// Routes, balances, retries and times one request from a local app to `service`.
pub async fn handle(
    context: &ProxyContext,
    request: Request<L7Body>,
    service: &ServiceKey,
    source: Option<&ServiceKey>,
) -> Response<L7Body> {
    let started = Instant::now();
    let (mut parts, body) = request.into_parts();
    let policy = context.shared.policy.active();
    let (destination, route) = policy.splits.route(service, &parts);
    let rules = RouteRules::of(
        policy
            .bundle
            .as_ref()
            .and_then(|b| b.compiled.route_policy(service)),
    );
    let budget = context.l7.budget(&destination);
    budget.deposit(&rules);
    propagate_trace(&mut parts.headers);
    if !parts.headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(header::HOST, host);
    }
    // A body known to be small is kept, so that the request can be sent again; others
    // (larger, or of unknown length such as gRPC streams) are streamed once, and their
    // requests are not retried once sent.
    let small = hyper::body::Body::size_hint(&body)
        .exact()
        .is_some_and(|length| length <= MAX_REPLAY_BODY as u64);
    let (replay, mut stream_once) = if small {
        match Limited::new(body, MAX_REPLAY_BODY).collect().await {
            Ok(collected) => (Some(collected.to_bytes()), None),
            Err(e) => {
                return mesh_error(
                    StatusCode::BAD_REQUEST,
                    "bad_request_body",
                    format!("weft: cannot read the request body: {e}"),
                );
            }
        }
    } else {
        (None, Some(body))
    };
    let source_label = super::source_label(source);
    let destination_label = destination.to_string();
    let deadline = rules.request_timeout.map(|t| started + t);
    let mut tried: HashSet<SocketAddr> = HashSet::new();
    let mut connect_failures = 0;
    let mut answer_retries = 0;
    let response = loop {
        let catalog = context.shared.catalog.current();
        let all: Vec<Endpoint> = catalog.routable_endpoints(&destination).cloned().collect();
        if all.is_empty() {
            break mesh_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_endpoint",
                format!("weft: no healthy endpoint of {destination}"),
            );
        }
        let untried: Vec<Endpoint> = all
            .iter()
            .filter(|e| !tried.contains(&e.tunnel_addr))
            .cloned()
            .collect();
        let candidates = if untried.is_empty() { &all } else { &untried };
        let zone = context
            .shared
            .config
            .load()
            .node
            .labels
            .get("zone")
            .cloned();
        let endpoint = context
            .l7
            .balancer
            .pick(candidates, zone.as_deref())
            .clone();
        tried.insert(endpoint.tunnel_addr);
        if endpoint.is_local
            && let Some(refused) = local_refusal(context, &destination, source, &parts)
        {
            break refused;
        }
        let mut attempt = Request::builder()
            .method(parts.method.clone())
            .uri(parts.uri.clone())
            .version(parts.version)
            .body(match (&replay, stream_once.take()) {
                (Some(bytes), _) => Full::new(bytes.clone())
                    .map_err(|never| match never {})
                    .boxed(),
                (None, Some(body)) => body,
                (None, None) => empty(),
            })
            .expect("parts of a valid request");
        *attempt.headers_mut() = parts.headers.clone();
        let try_timeout = match (rules.try_timeout, deadline) {
            (Some(t), Some(d)) => Some(t.min(d.saturating_duration_since(Instant::now()))),
            (t, Some(d)) => t.or(Some(d.saturating_duration_since(Instant::now()))),
            (t, None) => t,
        };
        let attempt_started = Instant::now();
        context.l7.balancer.start(endpoint.tunnel_addr);
        let (sent, setup) = context
            .l7
            .clients
            .send(
                context,
                &endpoint,
                &destination,
                source,
                attempt,
                try_timeout,
            )
            .await;
        // The endpoint's latency, not the setup of a new connection to it.
        let latency = attempt_started.elapsed().saturating_sub(setup);
        let outcome = match &sent {
            Ok(response) if response.status().is_server_error() => Outcome::Failure,
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        };
        match context
            .l7
            .balancer
            .finish(endpoint.tunnel_addr, latency, outcome)
        {
            Ejection::Ejected(time) => {
                warn!(service = %destination, node = %endpoint.node, ejected_for = ?time, "endpoint ejected after consecutive failures");
                context.l7.metrics.ejection(&destination_label);
            }
            Ejection::Readmitted => {
                debug!(service = %destination, node = %endpoint.node, "endpoint readmitted");
            }
            Ejection::None => {}
        }
        let out_of_time = deadline.is_some_and(|d| Instant::now() >= d);
        match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                if answer_retries < rules.attempts
                    && replay.is_some()
                    && rules.retries_answer(&parts.method, status)
                    && !out_of_time
                    && budget.withdraw(&rules)
                {
                    answer_retries += 1;
                    context.l7.metrics.retry(&destination_label, "status");
                    tokio::time::sleep(rules.backoff).await;
                    continue;
                }
                break response.map(BodyExt::boxed);
            }
            Err(SendError::Timeout(after)) => {
                // An attempt that timed out is retried like a 504 answer, on another endpoint.
                if answer_retries < rules.attempts
                    && replay.is_some()
                    && rules.retries_answer(&parts.method, 504)
                    && !out_of_time
                    && budget.withdraw(&rules)
                {
                    answer_retries += 1;
                    context.l7.metrics.retry(&destination_label, "timeout");
                    continue;
                }
                break mesh_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    format!("weft: {destination} did not answer within {after:?}"),
                );
            }
            Err(SendError::NotSent(reason)) => {
                // It never reached the endpoint: safe to try another.
                if connect_failures < CONNECT_RETRIES && !out_of_time && replay.is_some() {
                    connect_failures += 1;
                    context.l7.metrics.retry(&destination_label, "connect");
                    debug!(service = %destination, node = %endpoint.node, %reason, "trying another endpoint");
                    continue;
                }
                break mesh_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "connect_failed",
                    format!("weft: {destination} at {}: {reason}", endpoint.node),
                );
            }
            Err(SendError::Failed(reason)) => {
                // Sent, and the connection failed before an answer (the host died, a
                // partition): an idempotent request is safe to send to another endpoint,
                // within the connect-retry count and the budget, policy or not.
                let may_repeat = rules.non_idempotent || retry::is_idempotent(&parts.method);
                if may_repeat
                    && connect_failures < CONNECT_RETRIES
                    && replay.is_some()
                    && !out_of_time
                    && budget.withdraw(&rules)
                {
                    connect_failures += 1;
                    context.l7.metrics.retry(&destination_label, "reset");
                    debug!(service = %destination, node = %endpoint.node, %reason, "the exchange failed; trying another endpoint");
                    continue;
                }
                break mesh_error(
                    StatusCode::BAD_GATEWAY,
                    "upstream_http_error",
                    format!(
                        "weft: {destination} at {} failed to answer: {reason}",
                        endpoint.node
                    ),
                );
            }
        }
    };
    let took = started.elapsed();
    context.l7.metrics.request(
        super::Direction::Outbound,
        &source_label,
        &destination_label,
        &route,
        response.status(),
        took,
    );
    context.l7.access_log.record(&AccessEntry {
        direction: "outbound",
        source: &source_label,
        destination: &destination_label,
        route: &route,
        method: parts.method.as_str(),
        path: parts.uri.path(),
        status: response.status().as_u16(),
        duration_ms: took.as_secs_f64() * 1e3,
        trace_id: access_log::trace_id(parts.headers.get("traceparent")),
    });
    response
}

/// The 403 or 429 for a request to a service on this host that policy denies or its rate
/// limit refuses (a peer's agent would answer it for a remote endpoint).
fn local_refusal(
    context: &ProxyContext,
    destination: &ServiceKey,
    source: Option<&ServiceKey>,
    parts: &hyper::http::request::Parts,
) -> Option<Response<L7Body>> {
    let config = context.shared.config.load();
    let local = config.services.iter().find(|s| &s.key == destination)?;
    let port = local.address.port();
    let id = super::local_identity(context, source)?;
    let decision = context
        .shared
        .policy
        .decide(&crate::policy::engine::Request {
            source: &id,
            destination,
            port,
            http: Some(crate::policy::engine::HttpRequest {
                method: parts.method.as_str(),
                path: parts.uri.path_and_query().map_or("/", |pq| pq.as_str()),
                headers: &parts.headers,
            }),
        });
    if !decision.allowed {
        return Some(super::gate::forbidden(
            &id,
            &parts.method,
            parts.uri.path(),
            destination,
            &decision,
        ));
    }
    over_limit(context, destination, local.rate_limit)
}

/// The 429 for a request over `service`'s rate limit, counted.
pub fn over_limit(
    context: &ProxyContext,
    service: &ServiceKey,
    limit: Option<crate::config::RateLimit>,
) -> Option<Response<L7Body>> {
    let limit = limit?;
    if context.l7.limiter.admit(service, limit) {
        return None;
    }
    context.l7.metrics.rate_limited(&service.to_string());
    let mut response = mesh_error(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!(
            "weft: {service} takes at most {} requests a second here",
            limit.rps
        ),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    Some(response)
}

fn empty() -> L7Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

/// Keeps the trace of an incoming W3C `traceparent` (with a new span id for this hop), or
/// starts a sampled trace.
pub fn propagate_trace(headers: &mut hyper::HeaderMap) {
    let mut rng = rand::rng();
    let mut span = [0u8; 8];
    rng.fill_bytes(&mut span);
    let span = hex(&span);
    let existing = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent);
    let value = match existing {
        Some((trace, flags)) => format!("00-{trace}-{span}-{flags}"),
        None => {
            let mut trace = [0u8; 16];
            rng.fill_bytes(&mut trace);
            format!("00-{}-{span}-01", hex(&trace))
        }
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert("traceparent", value);
    }
}

/// `(trace id, flags)` of a valid version-00 `traceparent`.
fn parse_traceparent(value: &str) -> Option<(&str, &str)> {
    let mut parts = value.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex_of = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    (version == "00"
        && parts.next().is_none()
        && hex_of(trace, 32)
        && trace != "0".repeat(32)
        && hex_of(parent, 16)
        && parent != "0".repeat(16)
        && hex_of(flags, 2))
    .then_some((trace, flags))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An answer made by the mesh, naming the reason in [`ERROR_HEADER`].
pub fn mesh_error(status: StatusCode, reason: &'static str, body: String) -> Response<L7Body> {
    text_response(status, Some((ERROR_HEADER, reason)), body + "\n")
}

/// A plain-text answer made by the agent, with one header naming why (`weft-error`,
/// `weft-deny-reason`) when given.
pub fn text_response(
    status: StatusCode,
    why: Option<(&'static str, &'static str)>,
    body: String,
) -> Response<L7Body> {
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
    if let Some((name, value)) = why {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// How long idle pooled HTTP/2 connections are kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_is_kept_with_a_new_span_or_started() {
        let mut headers = hyper::HeaderMap::new();
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        headers.insert("traceparent", HeaderValue::from_static(incoming));
        propagate_trace(&mut headers);
        let out = headers["traceparent"].to_str().unwrap().to_string();
        assert!(
            out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{out}"
        );
        assert!(out.ends_with("-01"));
        assert_ne!(out, incoming, "a new span id");
        for bad in [
            "",
            "00-xyz",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            let mut headers = hyper::HeaderMap::new();
            headers.insert("traceparent", HeaderValue::from_str(bad).unwrap());
            propagate_trace(&mut headers);
            let started = headers["traceparent"].to_str().unwrap().to_string();
            assert!(parse_traceparent(&started).is_some(), "{started}");
            assert!(!started.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
        }
    }
}
