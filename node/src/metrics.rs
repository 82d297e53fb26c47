//! The agent's Prometheus registry and the metrics owned by the agent itself (build info,
//! config reloads, health checks). Layers own their metrics (gossip metrics live in
//! `weft_discovery`); this module only creates the registry they register into.

use prometheus::{Encoder, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use weft_discovery::{GossipMetrics, Health, ServiceKey};

/// Every metric of one agent.
#[derive(Clone)]
pub struct AgentMetrics {
    registry: Registry,
    /// Gossip transport and membership metrics.
    pub gossip: GossipMetrics,
    config_reloads: IntCounterVec,
    health_checks: IntCounterVec,
    service_healthy: IntGaugeVec,
    ready: IntGauge,
    sync_peers: IntCounterVec,
}

impl AgentMetrics {
    /// Creates a registry with every agent metric registered.
    pub fn new() -> prometheus::Result<AgentMetrics> {
        let registry = Registry::new();
        let build_info = IntGaugeVec::new(
            Opts::new("weft_build_info", "Weft build information; always 1."),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "weft_config_reloads_total",
                "Config reloads (SIGHUP) by result.",
            ),
            &["result"],
        )?;
        let health_checks = IntCounterVec::new(
            Opts::new(
                "weft_health_checks_total",
                "Local health-check probes by service and result.",
            ),
            &["service", "result"],
        )?;
        let service_healthy = IntGaugeVec::new(
            Opts::new(
                "weft_service_healthy",
                "Whether a local service's last health check passed (1) or not (0).",
            ),
            &["service"],
        )?;
        let ready = IntGauge::new(
            "weft_ready",
            "Whether this agent reports ready (1) or not (0).",
        )?;
        let sync_peers = IntCounterVec::new(
            Opts::new(
                "weft_bundle_sync_peer_failures_total",
                "Fetches of signed bundles (kind: policy, revocations) from peers that advertised a later one and did not serve it: lying (served another bundle, or one that does not verify) or unreachable.",
            ),
            &["kind", "result"],
        )?;
        registry.register(Box::new(sync_peers.clone()))?;
        for kind in ["policy", "revocations"] {
            for result in ["lying", "unreachable"] {
                sync_peers.with_label_values(&[kind, result]);
            }
        }
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(config_reloads.clone()))?;
        registry.register(Box::new(health_checks.clone()))?;
        registry.register(Box::new(service_healthy.clone()))?;
        registry.register(Box::new(ready.clone()))?;
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        for result in ["ok", "error"] {
            config_reloads.with_label_values(&[result]);
        }
        let gossip = GossipMetrics::new(&registry)?;
        Ok(AgentMetrics {
            registry,
            gossip,
            config_reloads,
            health_checks,
            service_healthy,
            ready,
            sync_peers,
        })
    }

    /// The registry other layers register their metrics in.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts a fetch of a `kind` of bundle from a peer that did not serve what it advertised
    /// (`result`: `lying` or `unreachable`).
    pub fn sync_peer(&self, kind: &str, result: &str) {
        self.sync_peers.with_label_values(&[kind, result]).inc();
    }

    /// Counts a config reload.
    pub fn config_reload(&self, ok: bool) {
        self.config_reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    /// Counts one health probe and records the service's health.
    pub fn health_check(&self, service: &ServiceKey, health: Health) {
        let service = service.to_string();
        self.health_checks
            .with_label_values(&[
                service.as_str(),
                if health.is_routable() {
                    "passing"
                } else {
                    "failing"
                },
            ])
            .inc();
        self.service_healthy
            .with_label_values(&[service.as_str()])
            .set(health.is_routable() as i64);
    }

    /// Forgets the health series of a service that is no longer configured.
    pub fn forget_service(&self, service: &ServiceKey) {
        let service = service.to_string();
        let _ = self
            .service_healthy
            .remove_label_values(&[service.as_str()]);
        for result in ["passing", "failing"] {
            let _ = self
                .health_checks
                .remove_label_values(&[service.as_str(), result]);
        }
    }

    /// Records readiness.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(ready as i64);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding metrics to a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}
