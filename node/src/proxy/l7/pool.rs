//! Where HTTP requests are sent from: one HTTP/2 connection per (endpoint, destination,
//! source) over one tunnel stream of kind `HTTP`, kept while it works; and clients for
//! services on this host (pooled HTTP/1.1, or one HTTP/2 connection per `http2` and `grpc`
//! service).
//!
//! Where the authority travels depends on the next hop: HTTP/2 carries it in the URI
//! (`:authority`) and never also in a Host header (nginx, for one, refuses a request with
//! both); HTTP/1.1 carries it in Host. Either way it is the name the app used.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::debug;
use weft_discovery::{Endpoint, Protocol, ServiceKey};

use super::{IDLE_TIMEOUT, L7Body};
use crate::proxy::ProxyContext;
use crate::proxy::header::{StreamHeader, StreamKind};

/// Why a request got no answer.
#[derive(Debug)]
pub enum SendError {
    /// It never reached the endpoint (no connection, stream refused): safe to send elsewhere.
    NotSent(String),
    /// It was sent, and the exchange failed.
    Failed(String),
    /// No answer within the attempt's time.
    Timeout(Duration),
}

type PoolKey = (SocketAddr, ServiceKey, Option<ServiceKey>);
type Http2Sender = hyper::client::conn::http2::SendRequest<L7Body>;

/// HTTP clients of this agent.
pub struct ClientPool {
    /// To peer agents, over tunnel streams.
    remote: Http2Connections<PoolKey>,
    local_http1: Client<HttpConnector, L7Body>,
    /// To `http2` and `grpc` services on this host, by address.
    local_http2: Http2Connections<SocketAddr>,
}

impl Default for ClientPool {
    fn default() -> ClientPool {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(crate::proxy::CONNECT_TIMEOUT));
        let mut http1 = Client::builder(TokioExecutor::new());
        http1.pool_idle_timeout(IDLE_TIMEOUT);
        ClientPool {
            remote: Http2Connections::default(),
            local_http1: http1.build(connector),
            local_http2: Http2Connections::default(),
        }
    }
}

/// HTTP/2 connections kept by key while they work; one that fails is forgotten, and the next
/// request opens a new one.
struct Http2Connections<K> {
    senders: Mutex<HashMap<K, Http2Sender>>,
}

impl<K> Default for Http2Connections<K> {
    fn default() -> Self {
        Http2Connections {
            senders: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> Http2Connections<K> {
    /// The open connection for `key`, if there is one.
    fn open(&self, key: &K) -> Option<Http2Sender> {
        self.senders
            .lock()
            .expect("client pool lock is never poisoned")
            .get(key)
            .filter(|sender| !sender.is_closed())
            .cloned()
    }

    fn keep(&self, key: K, sender: Http2Sender) {
        self.senders
            .lock()
            .expect("client pool lock is never poisoned")
            .insert(key, sender);
    }

    /// Sends `request` on `sender` (the connection kept for `key`); a failed exchange drops
    /// the connection. A request the connection never took is safe to send elsewhere.
    async fn send(
        &self,
        key: &K,
        mut sender: Http2Sender,
        mut request: Request<L7Body>,
    ) -> Result<Response<Incoming>, SendError> {
        *request.version_mut() = Version::HTTP_2;
        sender.send_request(request).await.map_err(|e| {
            self.senders
                .lock()
                .expect("client pool lock is never poisoned")
                .remove(key);
            if e.is_canceled() {
                SendError::NotSent(e.to_string())
            } else {
                SendError::Failed(e.to_string())
            }
        })
    }
}

impl ClientPool {
    /// Sends `request` for `destination` to `endpoint`, within `timeout`. Also returns the
    /// time spent opening a new tunnel stream and HTTP/2 connection, if one was needed, so that
    /// latency estimates measure the endpoint and not connection setup.
    pub async fn send(
        &self,
        context: &ProxyContext,
        endpoint: &Endpoint,
        destination: &ServiceKey,
        source: Option<&ServiceKey>,
        request: Request<L7Body>,
        timeout: Option<Duration>,
    ) -> (Result<Response<Incoming>, SendError>, Duration) {
        let setup = std::sync::Mutex::new(Duration::ZERO);
        let exchange = async {
            if endpoint.is_local {
                let local = context
                    .shared
                    .config
                    .load()
                    .services
                    .iter()
                    .find(|s| &s.key == destination)
                    .map(|s| (s.address, s.protocol));
                let Some((address, protocol)) = local else {
                    return Err(SendError::NotSent(format!(
                        "{destination} no longer runs on this host"
                    )));
                };
                return self.send_local(address, protocol, request).await;
            }
            self.send_remote(
                context,
                endpoint.tunnel_addr,
                destination,
                source,
                request,
                &setup,
            )
            .await
        };
        let result = match timeout {
            Some(limit) => tokio::time::timeout(limit, exchange)
                .await
                .unwrap_or(Err(SendError::Timeout(limit))),
            None => exchange.await,
        };
        let setup = *setup.lock().expect("setup lock is never poisoned");
        (result, setup)
    }

    /// Sends to a service on this host.
    pub async fn send_local(
        &self,
        address: SocketAddr,
        protocol: Protocol,
        mut request: Request<L7Body>,
    ) -> Result<Response<Incoming>, SendError> {
        if matches!(protocol, Protocol::Http2 | Protocol::Grpc) {
            authority_in_uri(&mut request, || address.to_string());
            let sender = match self.local_http2.open(&address) {
                Some(sender) => sender,
                None => {
                    let sender = connect_local_http2(address).await?;
                    self.local_http2.keep(address, sender.clone());
                    sender
                }
            };
            return self.local_http2.send(&address, sender, request).await;
        }
        // The pooled HTTP/1.1 client connects to the URI's authority: the service's address.
        // The name the app used travels in Host.
        keep_host(&mut request);
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string();
        *request.uri_mut() = format!("http://{address}{path}")
            .parse()
            .map_err(|e| SendError::NotSent(format!("request target: {e}")))?;
        *request.version_mut() = Version::HTTP_11;
        self.local_http1.request(request).await.map_err(|e| {
            if e.is_connect() {
                SendError::NotSent(format!("{address}: {e}"))
            } else {
                SendError::Failed(format!("{address}: {e}"))
            }
        })
    }

    async fn send_remote(
        &self,
        context: &ProxyContext,
        addr: SocketAddr,
        destination: &ServiceKey,
        source: Option<&ServiceKey>,
        mut request: Request<L7Body>,
        setup: &std::sync::Mutex<Duration>,
    ) -> Result<Response<Incoming>, SendError> {
        let key: PoolKey = (addr, destination.clone(), source.cloned());
        let sender = match self.remote.open(&key) {
            Some(sender) => sender,
            None => {
                let started = std::time::Instant::now();
                let sender = connect(context, &key).await.map_err(SendError::NotSent);
                *setup.lock().expect("setup lock is never poisoned") = started.elapsed();
                let sender = sender?;
                self.remote.keep(key.clone(), sender.clone());
                sender
            }
        };
        authority_in_uri(&mut request, || {
            format!("{}.{}.weft", destination.name, destination.namespace)
        });
        self.remote.send(&key, sender, request).await
    }
}

/// Opens an HTTP/2 (h2c) connection to a service on this host.
async fn connect_local_http2(address: SocketAddr) -> Result<Http2Sender, SendError> {
    let not_sent = |e: String| SendError::NotSent(format!("{address}: {e}"));
    let tcp = tokio::time::timeout(
        crate::proxy::CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(address),
    )
    .await
    .map_err(|_| not_sent("connect timed out".into()))?
    .map_err(|e| not_sent(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| not_sent(format!("HTTP/2 handshake: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(%address, error = %e, "HTTP/2 connection to the service ended with an error");
        }
    });
    Ok(sender)
}

/// Opens an HTTP stream to the agent at `key.0` and starts HTTP/2 on it.
async fn connect(
    context: &ProxyContext,
    key: &PoolKey,
) -> Result<hyper::client::conn::http2::SendRequest<L7Body>, String> {
    let (addr, destination, source) = key;
    let header = StreamHeader {
        kind: StreamKind::Http,
        destination: destination.clone(),
        source: source.clone(),
    };
    let stream = context
        .tunnels
        .open(*addr, &header)
        .await
        .map_err(|e| e.to_string())?;
    let io = TokioIo::new(stream);
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(io)
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    let cut = context.cut.clone();
    tokio::spawn(async move {
        tokio::select! {
            result = connection => if let Err(e) = result {
                debug!(error = %e, "mesh HTTP/2 connection ended with an error");
            },
            _ = cut.cancelled() => {}
        }
    });
    Ok(sender)
}

/// For an HTTP/2 hop: the URI gets scheme and authority (the authority the app used: the
/// URI's, else its Host, else `fallback`), and the Host header goes.
fn authority_in_uri(request: &mut Request<L7Body>, fallback: impl FnOnce() -> String) {
    let host = request.headers_mut().remove(header::HOST);
    if request.uri().authority().is_some() && request.uri().scheme().is_some() {
        return;
    }
    let authority = request
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| host.and_then(|h| h.to_str().ok().map(String::from)))
        .unwrap_or_else(fallback);
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_string();
    if let Ok(uri) = format!("http://{authority}{path}").parse::<Uri>() {
        *request.uri_mut() = uri;
    }
}

/// An HTTP/2 request names its authority in the URI, not in a Host header; a service
/// reached over HTTP/1.1 must still see the name the app used.
fn keep_host(request: &mut Request<L7Body>) {
    if request.headers().contains_key(header::HOST) {
        return;
    }
    if let Some(authority) = request.uri().authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        request.headers_mut().insert(header::HOST, host);
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Empty};

    use super::*;

    fn request(uri: &str, host: Option<&str>) -> Request<L7Body> {
        let mut builder = Request::builder().uri(uri);
        if let Some(host) = host {
            builder = builder.header(header::HOST, host);
        }
        builder
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .expect("valid request")
    }

    #[test]
    fn an_http2_hop_carries_the_apps_host_as_authority_only() {
        let mut from_http1 = request("/a?b=1", Some("web.weft:8080"));
        authority_in_uri(&mut from_http1, || "fallback".into());
        assert_eq!(from_http1.uri().to_string(), "http://web.weft:8080/a?b=1");
        assert!(from_http1.headers().get(header::HOST).is_none());

        // An HTTP/2 request already names its authority; a Host next to it goes.
        let mut from_http2 = request("http://web.weft/x", Some("web.weft"));
        authority_in_uri(&mut from_http2, || "fallback".into());
        assert_eq!(from_http2.uri().to_string(), "http://web.weft/x");
        assert!(from_http2.headers().get(header::HOST).is_none());

        let mut nameless = request("/", None);
        authority_in_uri(&mut nameless, || "web.default.weft".into());
        assert_eq!(nameless.uri().to_string(), "http://web.default.weft/");
    }

    #[test]
    fn an_http1_hop_carries_the_authority_in_host() {
        let mut from_http2 = request("http://web.weft:8080/x", None);
        keep_host(&mut from_http2);
        assert_eq!(from_http2.headers()[header::HOST], "web.weft:8080");

        let mut with_host = request("/x", Some("app.example"));
        keep_host(&mut with_host);
        assert_eq!(with_host.headers()[header::HOST], "app.example");
    }
}
