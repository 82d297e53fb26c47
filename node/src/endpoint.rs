//! The agent's QUIC endpoint on the tunnel port: one UDP socket for every protocol between
//! agents, told apart by ALPN. Today it serves the CA protocol (`weft-ca/1`) on CA hosts and
//! carries this agent's own CA requests; the data-plane tunnels (`weft/1`) join it later.
//!
//! It is bound before the agent joins gossip, so a port in use fails startup. The server
//! certificate is chosen per ALPN and swapped on rotation without touching live connections.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{debug, warn};
use weft_ca::server::CaServer;
use weft_ca::tls::{
    ALPN_CA, AlpnCertResolver, OptionalSvidClientVerifier, SharedBundle, quic_server_config,
};

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

/// The bound endpoint.
pub struct QuicEndpoint {
    endpoint: quinn::Endpoint,
    resolver: Arc<AlpnCertResolver>,
}

impl QuicEndpoint {
    /// Binds `addr`; peers' client certificates are checked against `bundle`.
    pub fn bind(addr: SocketAddr, bundle: SharedBundle) -> Result<QuicEndpoint, EndpointError> {
        let resolver = Arc::new(AlpnCertResolver::default());
        let config = quic_server_config(
            resolver.clone(),
            OptionalSvidClientVerifier::new(bundle),
            &[ALPN_CA],
        )?;
        let endpoint =
            quinn::Endpoint::server(config, addr).map_err(|e| EndpointError::Bind(addr, e))?;
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
    pub async fn serve(self, ca: Option<Arc<CaServer>>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let incoming = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => incoming,
                    None => break,
                },
            };
            let ca = ca.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let connection = match incoming.await {
                    Ok(connection) => connection,
                    Err(e) => {
                        debug!(%remote, error = %e, "QUIC handshake failed");
                        return;
                    }
                };
                let alpn = connection
                    .handshake_data()
                    .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                    .and_then(|data| data.protocol);
                match (alpn.as_deref(), ca) {
                    (Some(ALPN_CA), Some(ca)) => ca.serve(connection).await,
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
