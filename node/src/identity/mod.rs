//! This host's SPIFFE identities: the node SVID and one SVID per configured service, kept
//! valid without an operator.
//!
//! Keys are created here and never leave the host. On first start the node redeems its join
//! token once with any CA host found in gossip; afterwards everything is renewed with the
//! node SVID at about half its lifetime (with jitter, so a fleet does not renew in lockstep),
//! failing over between CA hosts. A CA host issues its own identities. What is held is
//! published through [`SharedIdentities`] (one atomic load for readers) and persisted in
//! `data_dir`, so a restart needs neither a token nor a CA.

mod store;
mod trust;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use arc_swap::ArcSwap;
use prometheus::{GaugeVec, IntCounterVec, Opts, Registry};
use rand::Rng;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tracing::{info, warn};
use weft_ca::client::{CaClient, ca_server_id};
use weft_ca::protocol::{CaRequest, encode_der};
use weft_ca::tls::{ALPN_CA, AlpnCertResolver, SharedBundle, certified_key};
use weft_ca::{CertificateAuthority, NodeScope, SpiffeId, TrustDomain, Usage, verify_svid};
use weft_discovery::{CatalogHandle, ServiceKey};

pub use store::{SvidFiles, write_atomic};
pub use trust::TrustSignal;

/// Lifetime of the certificate a CA host serves the CA protocol with.
const CA_SERVER_TTL: Duration = Duration::from_secs(24 * 3600);
/// Consecutive failures logged at INFO before they are logged as warnings.
const QUIET_FAILURES: u32 = 2;
/// Longest wait between attempts after a failure.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// One SVID this host holds.
pub struct HeldSvid {
    /// Its SPIFFE ID.
    pub id: SpiffeId,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Chain and key for rustls.
    pub key: Arc<CertifiedKey>,
    /// Validity start.
    pub not_before: SystemTime,
    /// Validity end.
    pub not_after: SystemTime,
    /// When it will be renewed.
    pub renew_at: SystemTime,
    /// Leaf serial, hex.
    pub serial_hex: String,
    /// The node scope, for node SVIDs.
    pub scope: Option<NodeScope>,
}

impl HeldSvid {
    /// Checks `chain` as an SVID for `expected` of `bundle` and pairs it with its key.
    fn new(
        chain: Vec<CertificateDer<'static>>,
        key_pem: &str,
        bundle: &SharedBundle,
        expected: &SpiffeId,
    ) -> anyhow::Result<HeldSvid> {
        let verified = verify_svid(&chain, &bundle.load(), SystemTime::now(), Usage::Any)?;
        if &verified.id != expected {
            bail!("certificate is for {}, expected {expected}", verified.id);
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| anyhow!("private key: {e}"))?;
        let key = certified_key(chain.clone(), key)?;
        let lifetime = verified
            .not_after
            .duration_since(verified.not_before)
            .unwrap_or_default();
        let share = rand::rng().random_range(0.45..0.55);
        Ok(HeldSvid {
            id: verified.id,
            chain,
            key,
            not_before: verified.not_before,
            not_after: verified.not_after,
            renew_at: verified.not_before + lifetime.mul_f64(share),
            serial_hex: verified.serial_hex,
            scope: verified.scope,
        })
    }

    fn due(&self, now: SystemTime) -> bool {
        now >= self.renew_at
    }
}

/// Everything this host holds.
#[derive(Default)]
pub struct Identities {
    /// The node SVID.
    pub node: Option<Arc<HeldSvid>>,
    /// Service SVIDs.
    pub services: BTreeMap<ServiceKey, Arc<HeldSvid>>,
    /// The CA-protocol server certificate (CA hosts only).
    pub ca_server: Option<Arc<HeldSvid>>,
}

impl Identities {
    /// Whether the node SVID and every service in `services` are held and unexpired.
    pub fn is_complete(&self, services: &[ServiceKey], now: SystemTime) -> bool {
        let valid = |svid: &HeldSvid| svid.not_after > now;
        self.node.as_deref().is_some_and(valid)
            && services
                .iter()
                .all(|s| self.services.get(s).is_some_and(|svid| valid(svid)))
    }
}

/// Shared, lock-free view of what is held.
pub type SharedIdentities = Arc<ArcSwap<Identities>>;

/// Identity metrics.
#[derive(Clone)]
pub struct IdentityMetrics {
    not_after: GaugeVec,
    renewals: IntCounterVec,
}

impl IdentityMetrics {
    /// Registers the identity metrics.
    pub fn new(registry: &Registry) -> prometheus::Result<IdentityMetrics> {
        let not_after = GaugeVec::new(
            Opts::new(
                "weft_certificate_not_after_seconds",
                "Expiry (unix seconds) of each identity this host holds.",
            ),
            &["identity"],
        )?;
        let renewals = IntCounterVec::new(
            Opts::new(
                "weft_identity_renewals_total",
                "Identity issuance and renewal attempts by this host, by kind and result.",
            ),
            &["kind", "result"],
        )?;
        registry.register(Box::new(not_after.clone()))?;
        registry.register(Box::new(renewals.clone()))?;
        Ok(IdentityMetrics {
            not_after,
            renewals,
        })
    }

    fn held(&self, svid: &HeldSvid) {
        let secs = svid
            .not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.not_after
            .with_label_values(&[svid.id.to_string().as_str()])
            .set(secs);
    }

    fn attempt(&self, kind: &str, ok: bool) {
        self.renewals
            .with_label_values(&[kind, if ok { "ok" } else { "error" }])
            .inc();
    }
}

/// What the identity manager works with.
pub struct IdentityContext {
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// This node's name.
    pub node_name: String,
    /// State directory.
    pub data_dir: PathBuf,
    /// Join token file.
    pub join_token: PathBuf,
    /// Lifetime to ask for service SVIDs.
    pub svid_ttl: Duration,
    /// Lifetime of node SVIDs (used when this host is a CA host).
    pub node_svid_ttl: Duration,
    /// The trust bundle in force.
    pub bundle: SharedBundle,
    /// This host's intermediate, when it is a CA host.
    pub ca: Option<Arc<CertificateAuthority>>,
    /// Client for other CA hosts.
    pub client: CaClient,
    /// Where CA hosts are found.
    pub catalog: CatalogHandle,
    /// Server certificates of the QUIC endpoint.
    pub resolver: Arc<AlpnCertResolver>,
    /// Metrics.
    pub metrics: IdentityMetrics,
    /// The published identities.
    pub identities: SharedIdentities,
}

/// The node scope that lists `services`.
fn scope_of(services: &[ServiceKey]) -> NodeScope {
    NodeScope::new(services.iter().map(ServiceKey::to_string))
}

/// Runs the identity manager until `stop` turns true. `services` carries the configured
/// services and changes on reload.
pub async fn run(
    context: IdentityContext,
    mut services: watch::Receiver<Vec<ServiceKey>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_secs(1);
    let mut failures = 0u32;
    loop {
        let wanted = services.borrow_and_update().clone();
        let wait = match context.step(&wanted).await {
            Ok(next) => {
                backoff = Duration::from_secs(1);
                failures = 0;
                next.duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .max(Duration::from_millis(100))
            }
            Err(e) => {
                failures += 1;
                // The first attempts of a joining agent usually fail only because gossip has
                // not shown it a CA host yet; say so quietly, then loudly if it persists.
                if failures <= QUIET_FAILURES {
                    info!(error = %format!("{e:#}"), retry_in = ?backoff, "identity not yet complete");
                } else {
                    warn!(error = %format!("{e:#}"), retry_in = ?backoff, failures, "identity not yet complete");
                }
                let wait = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                wait
            }
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = services.changed() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

impl IdentityContext {
    /// Does whatever is due; returns when something is next due, or the first error.
    async fn step(&self, wanted: &[ServiceKey]) -> anyhow::Result<SystemTime> {
        let now = SystemTime::now();
        let node_id = SpiffeId::node(&self.trust_domain, &self.node_name)?;
        let current = self.identities.load_full();

        let node = match &current.node {
            Some(node) if !node.due(now) && !self.scope_outdated(node, wanted) => node.clone(),
            held => {
                let node = Arc::new(self.node_svid(&node_id, held.as_deref(), wanted).await?);
                info!(id = %node.id, not_after = %weft_ca::verify::format_utc(node.not_after), "node identity held");
                // Tunnels are served with the node SVID; new handshakes use the new one.
                self.resolver
                    .set(crate::proxy::tunnel::ALPN_TUNNEL, node.key.clone());
                for alpn in [
                    crate::agent::policy::ALPN_POLICY,
                    crate::agent::revocation::ALPN_REVOCATIONS,
                ] {
                    self.resolver.set(alpn, node.key.clone());
                }
                self.resolver
                    .set(crate::agent::stats::ALPN_STATS, node.key.clone());
                self.publish(|ids| ids.node = Some(node.clone()));
                node
            }
        };

        if let Some(ca) = &self.ca
            && current.ca_server.as_ref().is_none_or(|s| s.due(now))
        {
            let id = ca_server_id(&self.trust_domain, &self.node_name)?;
            let (key, issued) = ca.issue_local(&id, CA_SERVER_TTL, None)?;
            let held = Arc::new(HeldSvid::new(
                issued.chain,
                &key.serialize_pem(),
                &self.bundle,
                &id,
            )?);
            self.resolver.set(ALPN_CA, held.key.clone());
            self.publish(|ids| ids.ca_server = Some(held.clone()));
        }

        let mut first_error = None;
        for service in wanted {
            let held = self.identities.load().services.get(service).cloned();
            if held.as_ref().is_some_and(|h| !h.due(now)) {
                continue;
            }
            match self.service_svid(service, held.as_deref(), &node).await {
                Ok(svid) => {
                    info!(id = %svid.id, not_after = %weft_ca::verify::format_utc(svid.not_after), "service identity held");
                    let svid = Arc::new(svid);
                    self.publish(|ids| {
                        ids.services.insert(service.clone(), svid.clone());
                    });
                }
                Err(e) => {
                    first_error.get_or_insert(e.context(format!("service {service}")));
                }
            }
        }
        self.publish(|ids| ids.services.retain(|k, _| wanted.contains(k)));
        if let Some(e) = first_error {
            return Err(e);
        }
        let ids = self.identities.load();
        let next = std::iter::once(node.renew_at)
            .chain(ids.services.values().map(|s| s.renew_at))
            .chain(ids.ca_server.iter().map(|s| s.renew_at))
            .min()
            .unwrap_or(now + MAX_BACKOFF);
        Ok(next)
    }

    fn publish(&self, change: impl Fn(&mut Identities)) {
        self.identities.rcu(|current| {
            let mut next = Identities {
                node: current.node.clone(),
                services: current.services.clone(),
                ca_server: current.ca_server.clone(),
            };
            change(&mut next);
            next
        });
        let ids = self.identities.load();
        for svid in ids.node.iter().chain(ids.services.values()) {
            self.metrics.held(svid);
        }
    }

    /// The node SVID: from disk, from this host's own CA, by renewal, or by redeeming the token.
    async fn node_svid(
        &self,
        id: &SpiffeId,
        held: Option<&HeldSvid>,
        wanted: &[ServiceKey],
    ) -> anyhow::Result<HeldSvid> {
        let files = SvidFiles::node(&self.data_dir);
        if held.is_none()
            && let Some(svid) = self
                .stored(&files, id)
                .filter(|svid| !self.scope_outdated(svid, wanted))
        {
            return Ok(svid);
        }
        let scope = scope_of(wanted);
        let request = |csr| -> anyhow::Result<CaRequest> {
            if held.is_some() {
                return Ok(CaRequest::RenewNode { csr });
            }
            let token = std::fs::read_to_string(&self.join_token).with_context(|| {
                format!(
                    "no node identity in {} and no join token at {} (create one with `weft token create`)",
                    self.data_dir.display(),
                    self.join_token.display()
                )
            })?;
            Ok(CaRequest::Redeem {
                token: token.trim().to_string(),
                csr,
            })
        };
        let client_cert = held.map(|h| h.key.clone());
        self.obtain(
            "node",
            id,
            &files,
            self.node_svid_ttl,
            Some(&scope),
            request,
            client_cert,
        )
        .await
    }

    /// Whether `node` must be reissued because this host's services changed. Only a CA host
    /// issues its own node SVID with the scope it asks for; elsewhere the scope is the join
    /// token's and renewal keeps it.
    fn scope_outdated(&self, node: &HeldSvid, wanted: &[ServiceKey]) -> bool {
        self.ca.is_some() && node.scope.as_ref() != Some(&scope_of(wanted))
    }

    /// A service SVID: from disk or from a CA (this host's own, or one found in gossip).
    async fn service_svid(
        &self,
        service: &ServiceKey,
        held: Option<&HeldSvid>,
        node: &HeldSvid,
    ) -> anyhow::Result<HeldSvid> {
        let id = SpiffeId::service(&self.trust_domain, &service.namespace, &service.name)?;
        let files = SvidFiles::service(&self.data_dir, service);
        if held.is_none()
            && let Some(svid) = self
                .stored(&files, &id)
                .filter(|svid| !svid.due(SystemTime::now()))
        {
            return Ok(svid);
        }
        let request = |csr| -> anyhow::Result<CaRequest> {
            Ok(CaRequest::Service {
                namespace: service.namespace.clone(),
                name: service.name.clone(),
                csr,
                ttl_secs: self.svid_ttl.as_secs(),
            })
        };
        self.obtain(
            "service",
            &id,
            &files,
            self.svid_ttl,
            None,
            request,
            Some(node.key.clone()),
        )
        .await
    }

    /// A usable, unexpired SVID for `id` stored in `files`, if there is one.
    fn stored(&self, files: &SvidFiles, id: &SpiffeId) -> Option<HeldSvid> {
        let (chain, key) = files.load()?;
        match HeldSvid::new(chain, &key, &self.bundle, id) {
            Ok(svid) if svid.not_after > SystemTime::now() => Some(svid),
            Ok(_) => {
                warn!(path = %files.cert.display(), "stored identity expired");
                None
            }
            Err(e) => {
                warn!(path = %files.cert.display(), error = %format!("{e:#}"), "stored identity unusable");
                None
            }
        }
    }

    /// Gets an SVID for `id` with a key made here: from this host's own CA when it is a CA
    /// host, else from a CA host with the request `request` builds around the CSR. Stores it
    /// in `files` and counts the attempt as `kind`.
    #[allow(clippy::too_many_arguments)]
    async fn obtain(
        &self,
        kind: &str,
        id: &SpiffeId,
        files: &SvidFiles,
        ttl: Duration,
        scope: Option<&NodeScope>,
        request: impl FnOnce(String) -> anyhow::Result<CaRequest>,
        client_cert: Option<Arc<CertifiedKey>>,
    ) -> anyhow::Result<HeldSvid> {
        let result = async {
            match &self.ca {
                Some(ca) => {
                    let (key, issued) = ca.issue_local(id, ttl, scope)?;
                    Ok((issued.chain, key.serialize_pem()))
                }
                None => {
                    let (key, csr) = csr_for(id)?;
                    let chain = self.ask_ca_hosts(&request(csr)?, client_cert).await?;
                    Ok::<_, anyhow::Error>((chain, key.serialize_pem()))
                }
            }
        }
        .await;
        self.metrics.attempt(kind, result.is_ok());
        let (chain, key) = result?;
        let svid = HeldSvid::new(chain, &key, &self.bundle, id)?;
        files
            .save(&svid.chain, &key)
            .with_context(|| format!("cannot store {id} in {}", self.data_dir.display()))?;
        Ok(svid)
    }

    /// Tries the CA hosts known from gossip, in random order, until one issues.
    async fn ask_ca_hosts(
        &self,
        request: &CaRequest,
        client_cert: Option<Arc<CertifiedKey>>,
    ) -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let mut hosts = ca_hosts(&self.catalog, &self.node_name);
        if hosts.is_empty() {
            bail!("no CA host is known yet (none alive in gossip with the `ca` role)");
        }
        {
            use rand::seq::SliceRandom;
            hosts.shuffle(&mut rand::rng());
        }
        let mut errors = Vec::new();
        for (name, addr) in hosts {
            match self
                .client
                .request(addr, client_cert.clone(), request)
                .await
            {
                Ok(issued) => return Ok(issued.chain),
                Err(e) if e.is_retryable_elsewhere() => errors.push(format!("{name}: {e}")),
                Err(e) => return Err(anyhow!(e)),
            }
        }
        bail!("every CA host failed: {}", errors.join("; "))
    }
}

/// Alive CA hosts other than `me`, with their tunnel addresses.
pub fn ca_hosts(catalog: &CatalogHandle, me: &str) -> Vec<(String, SocketAddr)> {
    catalog
        .current()
        .members
        .values()
        .filter(|m| m.name != me && m.state.is_routable())
        .filter_map(|m| {
            let record = m.record.as_ref()?;
            record
                .roles
                .iter()
                .any(|r| r == "ca")
                .then(|| (m.name.clone(), record.tunnel_addr))
        })
        .collect()
}

/// A new key and a CSR naming only `id`.
fn csr_for(id: &SpiffeId) -> anyhow::Result<(KeyPair, String)> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok((key, encode_der(csr.der())))
}
