//! The agent: one per host. Binds its listeners, joins gossip, keeps its identities valid,
//! serves the CA protocol on CA hosts, runs health checks, serves the admin API, and reacts to
//! control messages (reload, stop) until it leaves.
//!
//! Order matters and is kept here in one place: the trust bundle and CA material are loaded
//! and every listener is bound before gossip starts (bad files or addresses fail startup
//! without half-joining); on stop the agent turns not-ready first, then leaves gossip, then
//! closes the endpoint and the admin API.

pub mod bundle_sync;
mod memory;
pub mod policy;
mod reload;
pub mod revocation;
pub mod signed_store;
pub mod stats;

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};
use weft_ca::attest::RecordSigner;
use weft_ca::client::CaClient;
use weft_ca::server::{CaMetrics, CaServer, RedeemedTokens};
use weft_ca::tls::SharedBundle;
use weft_ca::{CertificateAuthority, TrustBundle};
use weft_discovery::{
    CatalogHandle, Health, Keyring, Membership, MembershipConfig, NodeRecord, SealConfig,
    ServiceKey, ServiceRecord, SharedKeyring,
};

use crate::admin::AdminServer;
use crate::config::{Config, ServiceConfig};
use crate::endpoint::QuicEndpoint;
use crate::health::{self, CheckResult, HealthChecks};
use crate::identity::{self, IdentityContext, IdentityMetrics, SharedIdentities, TrustSignal};
use crate::metrics::AgentMetrics;
use crate::policy::bundle::{PolicyFiles, RevocationList};
use crate::proxy::http::HttpProxy;
use crate::proxy::outbound::Upstreams;
use crate::proxy::tunnel::TunnelPool;
use crate::proxy::{ProxyContext, ProxyMetrics};
use crate::telemetry::LogControl;
use policy::PolicyStore;
use signed_store::SignedStore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often health (with identity held) and, on CA hosts, redeemed token ids are republished
/// when they changed.
const PUBLISH_INTERVAL: Duration = Duration::from_millis(250);

/// What the rest of the agent (admin API, later the proxy) shares, behind one `Arc`.
pub struct Shared {
    /// The running config (replaced on a successful reload).
    pub config: ArcSwap<Config>,
    /// Membership and service catalog.
    pub catalog: CatalogHandle,
    /// Gossip keyring in use.
    pub keyring: SharedKeyring,
    /// Trust bundle in force.
    pub bundle: SharedBundle,
    /// Identities held.
    pub identities: SharedIdentities,
    /// Every metric.
    pub metrics: AgentMetrics,
    /// The policy in force.
    pub policy: PolicyStore,
    /// The revocations in force (also installed in `bundle`).
    pub revocations: Arc<SignedStore<RevocationList>>,
    /// Told whenever `bundle` is replaced (roots reloaded, revocations installed).
    pub trust_signal: TrustSignal,
    /// Gossip incarnation of this run.
    pub generation: u64,
    /// When this run started.
    pub started: Instant,
    running: AtomicBool,
}

impl Shared {
    /// Ready: started, not stopping, and holding unexpired identities for the node and every
    /// configured service.
    pub fn is_ready(&self) -> bool {
        let services: Vec<ServiceKey> = self
            .config
            .load()
            .services
            .iter()
            .map(|s| s.key.clone())
            .collect();
        let ready = self.running.load(Ordering::Relaxed)
            && self
                .identities
                .load()
                .is_complete(&services, SystemTime::now());
        self.metrics.set_ready(ready);
        ready
    }
}

/// Messages that drive a running agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Re-read the config file and keyring (SIGHUP).
    Reload,
    /// Leave gracefully and stop (SIGTERM, SIGINT).
    Stop,
}

/// A started agent.
pub struct Agent {
    shared: Arc<Shared>,
    membership: Membership,
    checks: HealthChecks,
    results_tx: mpsc::Sender<CheckResult>,
    results_rx: mpsc::Receiver<CheckResult>,
    last_health: BTreeMap<ServiceKey, Health>,
    published_health: BTreeMap<ServiceKey, Health>,
    services_tx: watch::Sender<Vec<ServiceKey>>,
    ca_server: Option<Arc<CaServer>>,
    /// This host's intermediate (CA hosts), to prove the `ca` role in gossip.
    ca: Option<Arc<CertificateAuthority>>,
    proxy: Arc<ProxyContext>,
    upstreams: Upstreams,
    stop_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    log: Option<LogControl>,
}

impl Agent {
    /// Loads keys and trust, binds the listeners, joins gossip and starts the identity manager.
    pub async fn start(config: Config, log: Option<LogControl>) -> anyhow::Result<Agent> {
        let keyring = Keyring::load(&config.gossip.keyring)?;
        let keyring: SharedKeyring = Arc::new(ArcSwap::from_pointee(keyring));
        let bundle = TrustBundle::load_pem(
            config.node.trust_domain.clone(),
            &config.identity.trust_bundle,
        )?;
        let bundle: SharedBundle = Arc::new(ArcSwap::from_pointee(bundle));
        let ca = match &config.ca {
            Some(ca) => Some(Arc::new(CertificateAuthority::load(
                &ca.cert,
                &ca.key,
                &bundle.load(),
            )?)),
            None => None,
        };
        prepare_data_dir(&config)?;
        let metrics = AgentMetrics::new().context("failed to register metrics")?;
        let identity_metrics =
            IdentityMetrics::new(metrics.registry()).context("failed to register metrics")?;
        let ca_metrics =
            CaMetrics::new(metrics.registry()).context("failed to register metrics")?;
        let proxy_metrics =
            ProxyMetrics::new(metrics.registry()).context("failed to register metrics")?;
        // Revocations are installed before anything verifies a peer.
        let trust_signal = TrustSignal::default();
        let revocations = Arc::new(
            revocation::load(
                &config.node.data_dir,
                bundle.clone(),
                trust_signal.clone(),
                metrics.registry(),
            )
            .context("failed to register metrics")?,
        );

        // Every listener is bound before anything joins.
        let admin = AdminServer::bind(&config.admin.socket, config.admin.http).await?;
        let endpoint = QuicEndpoint::bind(config.tunnel.bind, bundle.clone())?;

        let last_health: BTreeMap<ServiceKey, Health> = config
            .services
            .iter()
            .map(|s| (s.key.clone(), health::initial_health(s)))
            .collect();
        let membership = Membership::start(
            membership_config(&config, &bundle),
            node_record(&config),
            service_records(&config.services, &BTreeMap::new()),
            keyring.clone(),
            metrics.gossip.clone(),
        )
        .await?;
        let catalog = membership.catalog();

        let ca_server = ca.as_ref().map(|ca| {
            let elsewhere = catalog.clone();
            Arc::new(CaServer::new(
                ca.clone(),
                bundle.clone(),
                config.identity.node_svid_ttl,
                RedeemedTokens::load(config.node.data_dir.join("ca").join("redeemed.json")),
                Box::new(move |id: &str| {
                    elsewhere
                        .current()
                        .members
                        .values()
                        .any(|m| !m.is_self && m.redeemed_tokens.iter().any(|t| t == id))
                }),
                ca_metrics.clone(),
            ))
        });

        let policy = PolicyStore::load(
            &config.node.data_dir,
            bundle.clone(),
            config.policy.min_version,
            metrics.registry(),
        )
        .context("failed to register metrics")?;
        let identities: SharedIdentities = Arc::default();
        let shared = Arc::new(Shared {
            policy,
            revocations,
            trust_signal,
            catalog: catalog.clone(),
            generation: membership.generation(),
            keyring,
            bundle: bundle.clone(),
            identities: identities.clone(),
            metrics,
            config: ArcSwap::from_pointee(config),
            started: Instant::now(),
            running: AtomicBool::new(true),
        });
        let config = shared.config.load_full();
        let proxy = Arc::new(ProxyContext {
            shared: shared.clone(),
            trust_domain: config.node.trust_domain.clone(),
            metrics: proxy_metrics.clone(),
            tunnels: TunnelPool::new(
                endpoint.quinn(),
                shared.bundle.clone(),
                shared.trust_signal.clone(),
                shared.identities.clone(),
                proxy_metrics,
            ),
            l7: crate::proxy::l7::L7::new(
                shared.metrics.registry(),
                config.log.access_log.as_ref(),
            )?,
            connections: TaskTracker::new(),
            cut: CancellationToken::new(),
            draining: CancellationToken::new(),
        });
        tokio::spawn(crate::proxy::prune_tunnels(proxy.clone()));
        let mut upstreams = Upstreams::new(proxy.clone());
        upstreams.set(&config.upstreams).await?;
        if let Some(address) = config.outbound.http_proxy {
            // Stops accepting by itself when draining starts.
            tokio::spawn(HttpProxy::bind(address).await?.run(proxy.clone()));
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let (services_tx, services_rx) =
            watch::channel(config.services.iter().map(|s| s.key.clone()).collect());
        let context = IdentityContext {
            trust_domain: config.node.trust_domain.clone(),
            node_name: config.node.name.clone(),
            data_dir: config.node.data_dir.clone(),
            join_token: config.identity.join_token.clone(),
            svid_ttl: config.identity.svid_ttl,
            node_svid_ttl: config.identity.node_svid_ttl,
            bundle,
            ca: ca.clone(),
            client: CaClient::new(endpoint.quinn(), shared.bundle.clone()),
            catalog,
            resolver: endpoint.resolver(),
            metrics: identity_metrics,
            identities,
        };
        let tasks = vec![
            tokio::spawn(memory::return_freed_memory(stop_rx.clone())),
            tokio::spawn(admin.serve(proxy.clone(), stop_rx.clone())),
            tokio::spawn(endpoint.serve(ca_server.clone(), proxy.clone(), stop_rx.clone())),
            tokio::spawn(bundle_sync::run::<PolicyFiles>(
                proxy.clone(),
                stop_rx.clone(),
            )),
            tokio::spawn(bundle_sync::run::<RevocationList>(
                proxy.clone(),
                stop_rx.clone(),
            )),
            tokio::spawn(identity::run(context, services_rx, stop_rx)),
        ];
        let (results_tx, results_rx) = mpsc::channel(64);
        let checks = HealthChecks::start(&config.services, results_tx.clone());
        info!(
            node = %config.node.name,
            ca_host = ca_server.is_some(),
            services = config.services.len(),
            checks = checks.len(),
            "agent started"
        );
        Ok(Agent {
            shared,
            membership,
            checks,
            results_tx,
            results_rx,
            last_health,
            published_health: BTreeMap::new(),
            services_tx,
            ca_server,
            ca,
            proxy,
            upstreams,
            stop_tx,
            tasks,
            log,
        })
    }

    /// What the agent shares with its servers.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Runs until a [`Control::Stop`] arrives (or the control channel closes), then leaves.
    /// Returns an error, after stopping, if gossip failed underneath the agent.
    pub async fn run(mut self, mut control: mpsc::Receiver<Control>) -> anyhow::Result<()> {
        let mut publish = tokio::time::interval(PUBLISH_INTERVAL);
        let mut published: Vec<String> = Vec::new();
        let mut advertised = (None, None);
        let mut signed_with = None;
        let gossip_failure = self.membership.failure();
        tokio::pin!(gossip_failure);
        let mut failure = None;
        loop {
            tokio::select! {
                reason = &mut gossip_failure => {
                    tracing::error!(%reason, "gossip stopped underneath the agent; stopping so the service manager restarts it");
                    failure = Some(reason);
                    break;
                }
                message = control.recv() => match message {
                    Some(Control::Reload) => self.reload().await,
                    Some(Control::Stop) | None => break,
                },
                Some(result) = self.results_rx.recv() => self.apply_health(result).await,
                _ = publish.tick() => {
                    self.sign_records(&mut signed_with).await;
                    self.publish_health().await;
                    self.advertise_bundles(&mut advertised).await;
                    if let Some(server) = &self.ca_server {
                        let ids = server.redeemed_ids();
                        if ids != published {
                            self.membership.set_redeemed_tokens(&ids).await;
                            published = ids;
                        }
                    }
                }
            }
        }
        self.stop().await;
        match failure {
            Some(reason) => Err(anyhow::anyhow!(reason)),
            None => Ok(()),
        }
    }

    /// Signs this agent's gossip records with its node SVID once it has one, and again after
    /// every renewal (`signed_with` is the serial last used).
    /// Advertises the policy and revocation bundles held when they changed since `advertised`.
    async fn advertise_bundles(
        &self,
        advertised: &mut (
            Option<weft_discovery::BundleAdvert>,
            Option<weft_discovery::BundleAdvert>,
        ),
    ) {
        let now = (
            self.shared.policy.active().advert(),
            self.shared.revocations.held().advert(),
        );
        for (key, held, before) in [
            (weft_discovery::POLICY_KEY, &now.0, &advertised.0),
            (weft_discovery::REVOCATIONS_KEY, &now.1, &advertised.1),
        ] {
            if held != before
                && let Some(advert) = held
            {
                self.membership.set_advert(key, advert).await;
            }
        }
        *advertised = now;
    }

    async fn sign_records(&mut self, signed_with: &mut Option<String>) {
        let identities = self.shared.identities.load();
        let Some(node) = &identities.node else {
            return;
        };
        if signed_with.as_deref() == Some(node.serial_hex.as_str()) {
            return;
        }
        let signer = RecordSigner::new(node.key.clone(), node.scope.clone(), self.ca.clone());
        for service in self.last_health.keys() {
            if !signer.may_hold(&service.namespace, &service.name) {
                warn!(%service, "service is outside this node's SVID scope (its join token did not list it): not published in gossip");
            }
        }
        self.membership.set_signer(Arc::new(signer)).await;
        info!(serial = %node.serial_hex, "gossip records signed with the node SVID");
        *signed_with = Some(node.serial_hex.clone());
    }

    /// Each local service's health as peers should route by it: its check result, but
    /// `unknown` (not routable) while this host holds no SVID for it, since peers would refuse
    /// to send to it anyway.
    fn effective_health(&self) -> BTreeMap<ServiceKey, Health> {
        let identities = self.shared.identities.load();
        self.last_health
            .iter()
            .map(|(service, health)| {
                let held = identities.services.contains_key(service);
                (
                    service.clone(),
                    if held { *health } else { Health::Unknown },
                )
            })
            .collect()
    }

    /// Publishes [`Agent::effective_health`] where it changed.
    async fn publish_health(&mut self) {
        let effective = self.effective_health();
        for (service, health) in effective {
            if self.published_health.get(&service) != Some(&health) {
                if let Err(error) = self.membership.set_health(&service, health).await {
                    warn!(%error, "dropped a health update");
                }
                self.published_health.insert(service, health);
            }
        }
    }

    async fn apply_health(&mut self, result: CheckResult) {
        let Some(previous) = self.last_health.get(&result.service).copied() else {
            return; // a result from a check that a reload removed
        };
        self.shared
            .metrics
            .health_check(&result.service, result.health);
        if previous != result.health {
            match &result.reason {
                Some(reason) => {
                    warn!(service = %result.service, health = %result.health, %reason, "health changed")
                }
                None => info!(service = %result.service, health = %result.health, "health changed"),
            }
            self.last_health
                .insert(result.service.clone(), result.health);
        }
        self.publish_health().await;
    }

    /// Drains, then leaves: turns not-ready, stops accepting (listeners close, new tunnel
    /// streams are refused as draining, local services are marked failing so peers route
    /// elsewhere), lets connections in flight finish up to `drain_timeout`, cuts the rest,
    /// leaves gossip, and closes the endpoint and the admin API.
    async fn stop(self) {
        self.shared.running.store(false, Ordering::Relaxed);
        self.shared.metrics.set_ready(false);
        drop(self.checks);
        self.proxy.draining.cancel();
        for service in self.last_health.keys() {
            let _ = self.membership.set_health(service, Health::Failing).await;
        }
        self.proxy.connections.close();
        let deadline = self.shared.config.load().node.drain_timeout;
        info!(connections = self.proxy.connections.len(), deadline = ?deadline, "draining");
        if tokio::time::timeout(deadline, self.proxy.connections.wait())
            .await
            .is_err()
        {
            warn!(
                cut = self.proxy.connections.len(),
                "drain deadline passed; cutting the connections still open"
            );
            self.proxy.cut.cancel();
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                self.proxy.connections.wait(),
            )
            .await;
        }
        drop(self.upstreams);
        info!("leaving the mesh");
        self.membership.leave().await;
        let _ = self.stop_tx.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        info!("stopped");
    }
}

/// Creates `data_dir` (0700) if missing; it will hold private keys.
fn prepare_data_dir(config: &Config) -> anyhow::Result<()> {
    let dir = &config.node.data_dir;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create data_dir {}", dir.display()))?;
    }
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("cannot read data_dir {}", dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        warn!(data_dir = %dir.display(), mode = format!("{:o}", mode & 0o777), "data_dir is accessible to group or others; it holds private keys (chmod 700)");
    }
    Ok(())
}

fn node_record(config: &Config) -> NodeRecord {
    NodeRecord {
        name: config.node.name.clone(),
        gossip_addr: config.gossip.advertise,
        tunnel_addr: config.tunnel.advertise,
        labels: config.node.labels.clone(),
        roles: if config.ca.is_some() {
            vec![weft_discovery::signed::CA_ROLE.into()]
        } else {
            Vec::new()
        },
        version: env!("CARGO_PKG_VERSION").to_string(),
        policy_version: 0,
        started_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
    }
}

fn membership_config(config: &Config, bundle: &SharedBundle) -> MembershipConfig {
    MembershipConfig {
        bundle: bundle.clone(),
        cluster: config.node.trust_domain.to_string(),
        bind: config.gossip.bind,
        seeds: config.gossip.seeds.clone(),
        interval: config.gossip.interval,
        dead_grace: config.gossip.dead_grace,
        seal: SealConfig {
            max_datagram: config.gossip.max_datagram,
            ..SealConfig::default()
        },
    }
}

fn service_records(
    services: &[ServiceConfig],
    health: &BTreeMap<ServiceKey, Health>,
) -> BTreeMap<ServiceKey, ServiceRecord> {
    services
        .iter()
        .map(|s| {
            let record = ServiceRecord {
                port: s.address.port(),
                protocol: s.protocol,
                health: health.get(&s.key).copied().unwrap_or(Health::Unknown),
                weight: s.weight,
            };
            (s.key.clone(), record)
        })
        .collect()
}
