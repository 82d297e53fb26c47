//! Where HTTP requests are sent from: one HTTP/2 connection per (endpoint, destination,
//! source) over one tunnel stream of kind `HTTP`, kept while it works; and pooled clients for
//! services on this host (HTTP/1.1, or HTTP/2 for `http2` and `grpc` services).

use std::collections::HashMap;
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

/// HTTP clients of this agent.
pub struct ClientPool {
    remote: Mutex<HashMap<PoolKey, hyper::client::conn::http2::SendRequest<L7Body>>>,
    local_http1: Client<HttpConnector, L7Body>,
    local_http2: Client<HttpConnector, L7Body>,
}

impl Default for ClientPool {
    fn default() -> ClientPool {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(crate::proxy::CONNECT_TIMEOUT));
        let mut http1 = Client::builder(TokioExecutor::new());
        http1.pool_idle_timeout(IDLE_TIMEOUT);
        let mut http2 = Client::builder(TokioExecutor::new());
        http2.pool_idle_timeout(IDLE_TIMEOUT).http2_only(true);
        ClientPool {
            remote: Mutex::new(HashMap::new()),
            local_http1: http1.build(connector.clone()),
            local_http2: http2.build(connector),
        }
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
        keep_host(&mut request);
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string();
        *request.uri_mut() = format!("http://{address}{path}")
            .parse()
            .map_err(|e| SendError::NotSent(format!("request target: {e}")))?;
        let client = match protocol {
            Protocol::Http2 | Protocol::Grpc => {
                *request.version_mut() = Version::HTTP_2;
                &self.local_http2
            }
            Protocol::Http | Protocol::Tcp => {
                *request.version_mut() = Version::HTTP_11;
                &self.local_http1
            }
        };
        client.request(request).await.map_err(|e| {
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
        let pooled = self
            .remote
            .lock()
            .expect("client pool lock is never poisoned")
            .get(&key)
            .filter(|sender| !sender.is_closed())
            .cloned();
        let mut sender = match pooled {
            Some(sender) => sender,
            None => {
                let started = std::time::Instant::now();
                let sender = connect(context, &key).await.map_err(SendError::NotSent);
                *setup.lock().expect("setup lock is never poisoned") = started.elapsed();
                let sender = sender?;
                self.remote
                    .lock()
                    .expect("client pool lock is never poisoned")
                    .insert(key.clone(), sender.clone());
                sender
            }
        };
        absolute_uri(&mut request, destination);
        *request.version_mut() = Version::HTTP_2;
        sender.send_request(request).await.map_err(|e| {
            self.remote
                .lock()
                .expect("client pool lock is never poisoned")
                .remove(&key);
            if e.is_canceled() {
                SendError::NotSent(e.to_string())
            } else {
                SendError::Failed(e.to_string())
            }
        })
    }
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
    let io = TokioIo::new(tokio::io::join(stream.recv, stream.send));
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

/// HTTP/2 needs scheme and authority: the authority the app used (its Host), else the
/// service's mesh name.
fn absolute_uri(request: &mut Request<L7Body>, destination: &ServiceKey) {
    if request.uri().authority().is_some() && request.uri().scheme().is_some() {
        return;
    }
    let authority = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(String::from)
        .unwrap_or_else(|| format!("{}.{}.weft", destination.name, destination.namespace));
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
