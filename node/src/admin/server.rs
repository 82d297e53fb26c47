//! The admin servers: JSON API on a Unix socket (mode 0600, so only the agent's user and
//! root can use it) and a small HTTP listener for `/metrics`, `/ready` and `/live`.
//!
//! Both are bound before the agent starts anything else, so a bad address or a socket in use
//! fails startup with a clear error. The HTTP listener never serves the JSON API.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::api::{self, KeysReport, LocalService, MemberCounts, ServiceEntry, StatusReport, paths};
use super::policy;
use crate::agent::Shared;
use crate::proxy::ProxyContext;

/// Errors binding the admin listeners.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The HTTP address could not be bound.
    #[error("failed to bind admin http on {0}: {1}")]
    BindHttp(SocketAddr, io::Error),
    /// The Unix socket could not be created.
    #[error("failed to create admin socket {0}: {1}")]
    BindSocket(PathBuf, io::Error),
    /// Another process is serving the socket.
    #[error("admin socket {0} is in use by another running agent")]
    SocketInUse(PathBuf),
}

/// The bound admin listeners.
pub struct AdminServer {
    unix: UnixListener,
    socket_path: PathBuf,
    http: TcpListener,
}

impl AdminServer {
    /// Binds the Unix socket (mode 0600) and the HTTP address.
    pub async fn bind(socket_path: &Path, http: SocketAddr) -> Result<AdminServer, AdminError> {
        let http_listener = TcpListener::bind(http)
            .await
            .map_err(|e| AdminError::BindHttp(http, e))?;
        if !http.ip().is_loopback() {
            warn!(%http, "admin http is reachable from other hosts; it serves only /metrics, /ready and /live");
        }
        let unix = bind_socket(socket_path).await?;
        Ok(AdminServer {
            unix,
            socket_path: socket_path.to_path_buf(),
            http: http_listener,
        })
    }

    /// Serves until `shutdown` turns true, then removes the socket file.
    pub async fn serve(self, proxy: Arc<ProxyContext>, mut shutdown: watch::Receiver<bool>) {
        let AdminServer {
            unix,
            socket_path,
            http,
        } = self;
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => break,
                accepted = unix.accept() => match accepted {
                    Ok((stream, _)) => spawn_connection(TokioIo::new(stream), proxy.clone(), Surface::Socket),
                    Err(error) => warn!(%error, "admin socket accept failed"),
                },
                accepted = http.accept() => match accepted {
                    Ok((stream, _)) => spawn_connection(TokioIo::new(stream), proxy.clone(), Surface::Http),
                    Err(error) => warn!(%error, "admin http accept failed"),
                },
            }
        }
        let _ = std::fs::remove_file(&socket_path);
    }
}

async fn bind_socket(path: &Path) -> Result<UnixListener, AdminError> {
    let err = |e| AdminError::BindSocket(path.to_path_buf(), e);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(AdminError::SocketInUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Which listener a request came in on; the HTTP one serves only health and metrics.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Surface {
    Socket,
    Http,
}

fn spawn_connection<S>(io: TokioIo<S>, proxy: Arc<ProxyContext>, surface: Surface)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let proxy = proxy.clone();
            async move {
                let shared = &proxy.shared;
                let post = surface == Surface::Socket && request.method() == Method::POST;
                let response = if post && request.uri().path() == paths::POLICY {
                    let store = shared.policy.store().clone();
                    policy::offer(store, "weft policy apply", request).await
                } else if post && request.uri().path() == paths::REVOCATIONS {
                    let store = shared.revocations.clone();
                    policy::offer(store, "weft revoke", request).await
                } else if surface == Surface::Socket
                    && request.method() == Method::GET
                    && request.uri().path() == paths::STAT
                {
                    json(&crate::agent::stats::gather(&proxy).await)
                } else {
                    route(shared, surface, &request)
                };
                Ok::<_, Infallible>(response)
            }
        });
        if let Err(error) = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .await
        {
            debug!(%error, "admin connection ended with an error");
        }
    });
}

fn route(shared: &Shared, surface: Surface, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is supported (and POST /v1/policy and /v1/revocations on the socket)\n",
        );
    }
    match (surface, request.uri().path()) {
        (_, paths::LIVE) => text(StatusCode::OK, "live\n"),
        (_, paths::READY) if shared.is_ready() => text(StatusCode::OK, "ready\n"),
        (_, paths::READY) => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        (_, paths::METRICS) => Response::builder()
            .header(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )
            .body(Full::new(Bytes::from(shared.metrics.render())))
            .expect("static response parts are valid"),
        (Surface::Socket, paths::MEMBERS) => {
            let catalog = shared.catalog.current();
            json(&catalog.members.values().collect::<Vec<_>>())
        }
        (Surface::Socket, paths::SERVICES) => {
            let catalog = shared.catalog.current();
            json(
                &catalog
                    .services
                    .iter()
                    .map(|(service, endpoints)| ServiceEntry {
                        service: service.clone(),
                        endpoints: endpoints.clone(),
                    })
                    .collect::<Vec<_>>(),
            )
        }
        (Surface::Socket, paths::STATUS) => json(&status(shared)),
        (Surface::Socket, paths::POLICY) => json(&policy::report(shared)),
        (Surface::Socket, paths::POLICY_STATUS) => json(&policy::status(shared)),
        (Surface::Socket, paths::REVOCATIONS) => json(&policy::revocations(shared)),
        (Surface::Socket, paths::WHY) => match policy::why(shared, request.uri()) {
            Ok(report) => json(&report),
            Err(reason) => text_owned(StatusCode::BAD_REQUEST, format!("{reason}\n")),
        },
        (Surface::Socket, paths::CERTS) => json(&certs(shared)),
        (Surface::Socket, paths::GOSSIP_KEYS) => {
            let catalog = shared.catalog.current();
            let members: Vec<_> = catalog.members.values().cloned().collect();
            json(&KeysReport::new(
                shared.keyring.load().fingerprints(),
                &members,
            ))
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn status(shared: &Shared) -> StatusReport {
    let config = shared.config.load();
    let catalog = shared.catalog.current();
    let [alive, suspect, dead, left] = catalog.member_counts();
    let services = config
        .services
        .iter()
        .map(|s| LocalService {
            service: s.key.clone(),
            address: s.address,
            health: catalog
                .endpoints(&s.key)
                .iter()
                .find(|e| e.is_local)
                .map(|e| e.health)
                .unwrap_or(weft_discovery::Health::Unknown),
        })
        .collect();
    api::StatusReport {
        node: config.node.name.clone(),
        trust_domain: config.node.trust_domain.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        generation: shared.generation,
        gossip_addr: config.gossip.advertise,
        tunnel_addr: config.tunnel.advertise,
        config: config.path.clone(),
        uptime_secs: shared.started.elapsed().as_secs(),
        ready: shared.is_ready(),
        members: MemberCounts {
            alive,
            suspect,
            dead,
            left,
        },
        keyring: shared.keyring.load().fingerprints(),
        identity: shared
            .identities
            .load()
            .node
            .as_ref()
            .map(|n| n.id.to_string()),
        identity_not_after: shared
            .identities
            .load()
            .node
            .as_ref()
            .map(|n| unix(n.not_after)),
        ca_hosts: crate::identity::ca_hosts(&shared.catalog, &config.node.name).len(),
        is_ca_host: config.ca.is_some(),
        services,
        policy_version: shared.policy.active().version(),
        revocation_version: shared.revocations.held().version(),
        revocations: shared
            .revocations
            .held()
            .bundle
            .as_ref()
            .map_or(0, |b| b.content.revoked.len()),
    }
}

/// A JSON response.
pub(super) fn json<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).expect("admin documents always serialize");
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    text_owned(status, body.to_string())
}

/// A plain-text response.
pub(super) fn text_owned(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn unix(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn chain_link(der: &rustls_pki_types::CertificateDer<'_>) -> api::ChainLink {
    use x509_parser::prelude::{FromDer, X509Certificate};
    match X509Certificate::from_der(der.as_ref()) {
        Ok((_, cert)) => api::ChainLink {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            uri: weft_ca::verify::uri_sans(&cert)
                .ok()
                .and_then(|uris| uris.first().map(|u| u.to_string())),
            not_after: cert.validity().not_after.timestamp().max(0) as u64,
        },
        Err(e) => api::ChainLink {
            subject: format!("(unparsable certificate: {e})"),
            issuer: String::new(),
            uri: None,
            not_after: 0,
        },
    }
}

fn certs(shared: &Shared) -> api::CertsReport {
    let config = shared.config.load();
    let ids = shared.identities.load();
    let held = |kind: &str, svid: &crate::identity::HeldSvid| api::HeldIdentity {
        id: svid.id.to_string(),
        kind: kind.into(),
        not_before: unix(svid.not_before),
        not_after: unix(svid.not_after),
        renew_at: unix(svid.renew_at),
        serial: svid.serial_hex.clone(),
        scope: svid
            .scope
            .as_ref()
            .map(|s| s.services().to_vec())
            .unwrap_or_default(),
        chain: svid.chain.iter().map(chain_link).collect(),
    };
    let identities = ids
        .node
        .iter()
        .map(|n| held("node", n))
        .chain(ids.services.values().map(|s| held("service", s)))
        .chain(ids.ca_server.iter().map(|s| held("ca-server", s)))
        .collect();
    api::CertsReport {
        trust_domain: config.node.trust_domain.to_string(),
        roots: shared
            .bundle
            .load()
            .roots()
            .iter()
            .map(chain_link)
            .collect(),
        identities,
        ca_hosts: crate::identity::ca_hosts(&shared.catalog, &config.node.name)
            .into_iter()
            .map(|(node, addr)| api::CaHost { node, addr })
            .collect(),
        is_ca_host: config.ca.is_some(),
    }
}
