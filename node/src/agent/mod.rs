//! The agent: one per host. Binds its listeners, joins gossip, runs health checks, serves
//! the admin API, and reacts to control messages (reload, stop) until it leaves.
//!
//! Order matters and is kept here in one place: every listener is bound before gossip
//! starts (a bad address fails startup without half-joining), and on stop the agent turns
//! not-ready first, then leaves gossip, then closes the admin API.

mod reload;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};
use weft_discovery::{
    CatalogHandle, Health, Keyring, Membership, MembershipConfig, NodeRecord, SealConfig,
    ServiceKey, ServiceRecord, SharedKeyring,
};

use crate::admin::AdminServer;
use crate::config::{Config, ServiceConfig};
use crate::health::{self, CheckResult, HealthChecks};
use crate::metrics::AgentMetrics;
use crate::telemetry::LogControl;

/// What the rest of the agent (admin API, later the proxy) shares, behind one `Arc`.
pub struct Shared {
    /// The running config (replaced on a successful reload).
    pub config: ArcSwap<Config>,
    /// Membership and service catalog.
    pub catalog: CatalogHandle,
    /// Gossip keyring in use.
    pub keyring: SharedKeyring,
    /// Every metric.
    pub metrics: AgentMetrics,
    /// Gossip incarnation of this run.
    pub generation: u64,
    /// When this run started.
    pub started: Instant,
    ready: AtomicBool,
}

impl Shared {
    /// Whether the agent is ready to serve (started and not draining).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
        self.metrics.set_ready(ready);
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
    admin_stop: watch::Sender<bool>,
    admin_task: JoinHandle<()>,
    log: Option<LogControl>,
}

impl Agent {
    /// Binds the listeners, loads the keyring and joins gossip.
    pub async fn start(config: Config, log: Option<LogControl>) -> anyhow::Result<Agent> {
        let keyring = Keyring::load(&config.gossip.keyring)?;
        let keyring: SharedKeyring = Arc::new(ArcSwap::from_pointee(keyring));
        let metrics = AgentMetrics::new().context("failed to register metrics")?;
        let admin = AdminServer::bind(&config.admin.socket, config.admin.http).await?;

        let started_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let node = NodeRecord {
            name: config.node.name.clone(),
            gossip_addr: config.gossip.advertise,
            tunnel_addr: config.tunnel.advertise,
            labels: config.node.labels.clone(),
            roles: Vec::new(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            policy_version: 0,
            started_at,
        };
        let last_health: BTreeMap<ServiceKey, Health> = config
            .services
            .iter()
            .map(|s| (s.key.clone(), health::initial_health(s)))
            .collect();
        let membership = Membership::start(
            membership_config(&config),
            node,
            service_records(&config.services, &last_health),
            keyring.clone(),
            metrics.gossip.clone(),
        )
        .await?;

        let shared = Arc::new(Shared {
            catalog: membership.catalog(),
            generation: membership.generation(),
            config: ArcSwap::from_pointee(config),
            keyring,
            metrics,
            started: Instant::now(),
            ready: AtomicBool::new(false),
        });
        let (admin_stop, admin_stop_rx) = watch::channel(false);
        let admin_task = tokio::spawn(admin.serve(shared.clone(), admin_stop_rx));
        let (results_tx, results_rx) = mpsc::channel(64);
        let checks = HealthChecks::start(&shared.config.load().services, results_tx.clone());
        shared.set_ready(true);
        info!(
            node = %shared.config.load().node.name,
            services = shared.config.load().services.len(),
            checks = checks.len(),
            "agent ready"
        );
        Ok(Agent {
            shared,
            membership,
            checks,
            results_tx,
            results_rx,
            last_health,
            admin_stop,
            admin_task,
            log,
        })
    }

    /// What the agent shares with its servers.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Runs until a [`Control::Stop`] arrives (or the control channel closes), then leaves.
    pub async fn run(mut self, mut control: mpsc::Receiver<Control>) {
        loop {
            tokio::select! {
                message = control.recv() => match message {
                    Some(Control::Reload) => self.reload().await,
                    Some(Control::Stop) | None => break,
                },
                Some(result) = self.results_rx.recv() => self.apply_health(result).await,
            }
        }
        self.stop().await;
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
        if let Err(error) = self
            .membership
            .set_health(&result.service, result.health)
            .await
        {
            warn!(%error, "dropped a health result");
        }
    }

    /// Turns not-ready, leaves gossip, and closes the admin API.
    async fn stop(self) {
        info!("leaving the mesh");
        self.shared.set_ready(false);
        drop(self.checks);
        self.membership.leave().await;
        let _ = self.admin_stop.send(true);
        let _ = self.admin_task.await;
        info!("stopped");
    }
}

fn membership_config(config: &Config) -> MembershipConfig {
    MembershipConfig {
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
