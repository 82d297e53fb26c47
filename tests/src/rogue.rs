//! A hand-made gossip member for adversarial tests: it holds the gossip key (and, when given
//! one, a valid node SVID of its own) and publishes whatever values it likes under whatever
//! chitchat identity it likes, as an attacker's own client would. It uses chitchat and the
//! sealed transport directly, never the agent's `Membership`, so nothing stops it from lying.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chitchat::transport::{Socket, Transport};
use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, spawn_chitchat};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use weft_ca::attest::RecordSigner;
use weft_ca::{CertificateAuthority, NodeScope, SpiffeId, TrustBundle, TrustDomain};
use weft_discovery::signed::{self, ID_KEY};
use weft_discovery::{GossipMetrics, Keyring, SealConfig, SealedTransport};

/// A running rogue member.
pub struct Rogue {
    handle: ChitchatHandle,
}

impl Rogue {
    /// Joins the gossip of `cluster` through `seeds` as node `name` of generation
    /// `generation`, publishing `values` in order (chitchat gives them versions 1, 2, ...),
    /// sealed with the keyring in `keyring`. It binds a free loopback port itself and
    /// advertises it.
    pub async fn start(
        keyring: &Path,
        cluster: &str,
        seeds: Vec<String>,
        name: &str,
        generation: u64,
        values: Vec<(String, String)>,
    ) -> anyhow::Result<Rogue> {
        let keyring = Keyring::load(keyring)?.into_shared();
        let transport = SealedTransport::new(
            keyring,
            GossipMetrics::unregistered(),
            SealConfig::default(),
        );
        let socket = transport
            .open(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await?;
        let bound = socket.local_addr()?;
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new(name.to_string(), generation, bound),
            cluster_id: cluster.to_string(),
            gossip_interval: Duration::from_millis(200),
            listen_addr: bound,
            seed_nodes: seeds,
            failure_detector_config: FailureDetectorConfig::default(),
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V1,
        };
        let opened = Opened(Mutex::new(Some(socket)));
        let handle = spawn_chitchat(config, values, &opened).await?;
        Ok(Rogue { handle })
    }

    /// Stops gossiping.
    pub async fn stop(self) {
        let _ = self.handle.shutdown().await;
    }
}

/// Hands chitchat a socket that is already bound, so its address is known before chitchat
/// starts (and no port is reserved and released).
struct Opened(Mutex<Option<Box<dyn Socket>>>);

#[async_trait::async_trait]
impl Transport for Opened {
    async fn open(&self, _listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        self.0
            .lock()
            .expect("never poisoned")
            .take()
            .ok_or_else(|| anyhow::anyhow!("the rogue's socket is already in use"))
    }
}

/// A valid node SVID for `name` with service scope `services`, issued with the CA host
/// intermediate at `ca` (certificate, key): what a host that really joined holds, and what
/// it has after it is compromised.
pub fn node_signer(
    bundle: &Path,
    ca: &(std::path::PathBuf, std::path::PathBuf),
    name: &str,
    services: &[&str],
) -> anyhow::Result<Arc<RecordSigner>> {
    let bundle = TrustBundle::load_pem(TrustDomain::new("test.weft")?, bundle)?;
    let ca = CertificateAuthority::load(&ca.0, &ca.1, &bundle)?;
    issue_signer(&ca, name, services)
}

/// A record signer for a node SVID that `ca` issues here for `name`, with service scope
/// `services` (`namespace/name`), valid for an hour.
pub fn issue_signer(
    ca: &CertificateAuthority,
    name: &str,
    services: &[&str],
) -> anyhow::Result<Arc<RecordSigner>> {
    let scope = NodeScope::new(services.iter().map(|s| s.to_string()));
    let (key, svid) = ca.issue_local(
        &SpiffeId::node(ca.trust_domain(), name)?,
        Duration::from_secs(3600),
        Some(&scope),
    )?;
    let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let key = weft_ca::tls::certified_key(svid.chain, key)?;
    Ok(Arc::new(RecordSigner::new(key, Some(scope), None)))
}

/// `values` signed by `signer` for incarnation (`name`, `generation`), preceded by the
/// signer's `id`, with the versions chitchat will give them when published in this order.
pub fn signed_values(
    signer: &RecordSigner,
    name: &str,
    generation: u64,
    values: &[(&str, String)],
) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let id = signed::id_inner(signer, name, generation)?;
    let all = std::iter::once((ID_KEY, id)).chain(values.iter().cloned());
    for (i, (key, inner)) in all.enumerate() {
        let value = signed::seal(signer, name, generation, key, i as u64 + 1, &inner)?;
        out.push((key.to_string(), value));
    }
    Ok(out)
}
