//! Golden metrics across the mesh (`weft stat`): every agent serves a compact snapshot of the
//! HTTP requests it served (inbound direction, so each request is counted once, by the agent
//! in front of the service that answered it) over QUIC (ALPN [`ALPN_STATS`], mutual TLS with
//! node SVIDs); the admin API's `GET /v1/stat` gathers the snapshot of every alive member
//! concurrently. The CLI takes two such gatherings some seconds apart and turns the counter
//! and histogram deltas into success rate, requests per second and latency quantiles.
//!
//! The admin HTTP listener (`/metrics`) stays local to each host; this protocol is the only
//! way metrics leave a host, and it carries counts only (no labels beyond the service name).
//!
//! Wire: like the policy fetch, the asking agent opens one bidirectional stream and finishes
//! its side without sending anything; the serving agent writes one JSON [`AgentSnapshot`]
//! (at most [`MAX_SNAPSHOT_BYTES`]) and finishes.
//!
//! The snapshot, merge and quantile arithmetic are pure functions, tested below.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::proto::MetricFamily;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tracing::{debug, warn};
use weft_ca::Usage;
use weft_discovery::MemberState;

use super::Shared;
use crate::admin::api::{AgentStat, StatReport};
use crate::proxy::ProxyContext;
use crate::proxy::tunnel::peer_node;

/// ALPN of the stats protocol.
pub const ALPN_STATS: &[u8] = b"weft-stats/1";
/// Largest snapshot accepted from a peer.
pub const MAX_SNAPSHOT_BYTES: usize = 1 << 20;
/// How long one peer may take to answer, handshake included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// Name of the request counter this module reads.
const REQUESTS: &str = "weft_http_requests_total";
/// Name of the latency histogram this module reads.
const DURATION: &str = "weft_http_request_duration_seconds";

/// One agent's counters at one instant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentSnapshot {
    /// Node name.
    pub node: String,
    /// Gossip incarnation of the agent's run: a new value means the counters restarted.
    pub generation: u64,
    /// Milliseconds since the agent started (monotonic): the clock rates are computed with.
    pub uptime_ms: u64,
    /// Inbound HTTP requests served, by destination service (`namespace/name`).
    pub services: BTreeMap<String, ServiceCounts>,
}

/// Counters of one service at one agent (or summed over agents, or a delta).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceCounts {
    /// Requests by status class (`2xx`, `5xx`, …).
    pub requests: BTreeMap<String, u64>,
    /// Latency histogram: `[upper bound in seconds, cumulative count]`, finite bounds in
    /// ascending order (the `+Inf` bucket is [`ServiceCounts::count`]).
    pub buckets: Vec<(f64, u64)>,
    /// Observations in the histogram.
    pub count: u64,
    /// Sum of the observations, seconds.
    pub sum: f64,
}

impl ServiceCounts {
    /// Requests of every status class.
    pub fn total(&self) -> u64 {
        self.requests.values().sum()
    }

    /// Requests not answered with a 5xx.
    pub fn successes(&self) -> u64 {
        self.requests
            .iter()
            .filter(|(class, _)| class.as_str() != "5xx")
            .map(|(_, n)| n)
            .sum()
    }

    /// Cumulative count at `bound`: that of the largest own bucket bound not above it.
    fn cumulative_at(&self, bound: f64) -> u64 {
        self.buckets
            .iter()
            .take_while(|(le, _)| *le <= bound)
            .last()
            .map(|(_, n)| *n)
            .unwrap_or(0)
    }

    /// Adds `other` (request counts by class, histogram by bucket bound).
    pub fn add(&mut self, other: &ServiceCounts) {
        for (class, n) in &other.requests {
            *self.requests.entry(class.clone()).or_default() += n;
        }
        let mut bounds: Vec<f64> = self
            .buckets
            .iter()
            .chain(&other.buckets)
            .map(|(le, _)| *le)
            .collect();
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        self.buckets = bounds
            .into_iter()
            .map(|le| (le, self.cumulative_at(le) + other.cumulative_at(le)))
            .collect();
        self.count += other.count;
        self.sum += other.sum;
    }

    /// What was counted after `before`; `None` if a counter went down (the counters were
    /// reset, so the two samples cannot be compared).
    pub fn since(&self, before: &ServiceCounts) -> Option<ServiceCounts> {
        let mut requests = BTreeMap::new();
        for (class, n) in &self.requests {
            let was = before.requests.get(class).copied().unwrap_or(0);
            requests.insert(class.clone(), n.checked_sub(was)?);
        }
        if before
            .requests
            .keys()
            .any(|c| !self.requests.contains_key(c))
        {
            return None;
        }
        let mut buckets = Vec::with_capacity(self.buckets.len());
        for (le, n) in &self.buckets {
            buckets.push((*le, n.checked_sub(before.cumulative_at(*le))?));
        }
        Some(ServiceCounts {
            requests,
            buckets,
            count: self.count.checked_sub(before.count)?,
            sum: (self.sum - before.sum).max(0.0),
        })
    }
}

/// The `q` quantile (0..=1) of a histogram, interpolated linearly within the bucket it falls
/// in, as Prometheus' `histogram_quantile` does: the lowest bucket starts at 0, and a quantile
/// in the `+Inf` bucket is the highest finite bound. `None` without observations.
pub fn quantile(q: f64, buckets: &[(f64, u64)], count: u64) -> Option<f64> {
    if count == 0 || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let rank = q * count as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for &(le, cumulative) in buckets {
        if cumulative as f64 >= rank && cumulative > below {
            if le <= 0.0 {
                return Some(le);
            }
            let share = (rank - below as f64) / (cumulative - below) as f64;
            return Some(lower + (le - lower) * share.clamp(0.0, 1.0));
        }
        lower = le;
        below = cumulative;
    }
    buckets.last().map(|(le, _)| *le)
}

/// The inbound HTTP counters in `families` (a registry's `gather()`), summed per destination
/// over sources and routes.
pub fn snapshot_from(families: &[MetricFamily]) -> BTreeMap<String, ServiceCounts> {
    let mut services: BTreeMap<String, ServiceCounts> = BTreeMap::new();
    for family in families {
        let name = family.name();
        if name != REQUESTS && name != DURATION {
            continue;
        }
        for metric in family.get_metric() {
            let label = |wanted: &str| {
                metric
                    .get_label()
                    .iter()
                    .find(|l| l.name() == wanted)
                    .map(|l| l.value())
            };
            if label("direction") != Some("inbound") {
                continue;
            }
            let Some(destination) = label("destination") else {
                continue;
            };
            let mut counts = ServiceCounts::default();
            if name == REQUESTS {
                let class = label("code_class").unwrap_or("other");
                counts
                    .requests
                    .insert(class.to_string(), metric.get_counter().get_value() as u64);
            } else {
                let histogram = metric.get_histogram();
                counts.buckets = histogram
                    .get_bucket()
                    .iter()
                    .filter(|b| b.upper_bound().is_finite())
                    .map(|b| (b.upper_bound(), b.cumulative_count()))
                    .collect();
                counts.count = histogram.get_sample_count();
                counts.sum = histogram.get_sample_sum();
            }
            services
                .entry(destination.to_string())
                .or_default()
                .add(&counts);
        }
    }
    services
}

/// This agent's snapshot.
pub fn local(shared: &Shared) -> AgentSnapshot {
    AgentSnapshot {
        node: shared.config.load().node.name.clone(),
        generation: shared.generation,
        uptime_ms: shared.started.elapsed().as_millis() as u64,
        services: snapshot_from(&shared.metrics.registry().gather()),
    }
}

/// Serves this agent's snapshot on one `weft-stats/1` connection from another agent.
pub async fn serve(shared: Arc<Shared>, connection: quinn::Connection) {
    let remote = connection.remote_address();
    if let Err(reason) = peer_node(&connection, &shared.bundle, Usage::Client) {
        warn!(%remote, %reason, "stats request refused");
        connection.close(3u32.into(), b"a node SVID is required");
        return;
    }
    while let Ok((mut send, _recv)) = connection.accept_bi().await {
        let bytes = serde_json::to_vec(&local(&shared)).expect("snapshots always serialize");
        if send.write_all(&bytes).await.is_ok() {
            let _ = send.finish();
            let _ = send.stopped().await;
        }
    }
}

/// Every alive member's snapshot: this agent's own directly, the others' fetched
/// concurrently over QUIC, each bounded by [`FETCH_TIMEOUT`]. A member that does not answer
/// is reported with the reason, never fails the whole report.
pub async fn gather(proxy: &Arc<ProxyContext>) -> StatReport {
    let shared = &proxy.shared;
    let config = shared.config.load_full();
    let catalog = shared.catalog.current();
    let mut agents = Vec::new();
    let mut peers = Vec::new();
    for member in catalog.members.values() {
        if member.is_self {
            agents.push(AgentStat {
                node: member.name.clone(),
                addr: member.record.as_ref().map(|r| r.tunnel_addr),
                snapshot: Some(local(shared)),
                error: None,
            });
        } else if member.state == MemberState::Alive {
            match member.record.as_ref() {
                Some(record) => peers.push((member.name.clone(), record.tunnel_addr)),
                None => agents.push(AgentStat {
                    node: member.name.clone(),
                    addr: None,
                    snapshot: None,
                    error: Some("no node record in gossip yet".into()),
                }),
            }
        }
    }
    let mut fetches = JoinSet::new();
    for (node, addr) in peers {
        let proxy = proxy.clone();
        fetches.spawn(async move {
            let result = tokio::time::timeout(FETCH_TIMEOUT, fetch(&proxy, addr))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {FETCH_TIMEOUT:?}")));
            (node, addr, result)
        });
    }
    while let Some(joined) = fetches.join_next().await {
        let Ok((node, addr, result)) = joined else {
            continue;
        };
        if let Err(reason) = &result {
            debug!(peer = %node, %addr, %reason, "stats fetch failed");
        }
        let (snapshot, error) = match result {
            Ok(snapshot) => (Some(snapshot), None),
            Err(reason) => (None, Some(reason)),
        };
        agents.push(AgentStat {
            node,
            addr: Some(addr),
            snapshot,
            error,
        });
    }
    agents.sort_by(|a, b| a.node.cmp(&b.node));
    StatReport {
        node: config.node.name.clone(),
        agents,
    }
}

/// Fetches the snapshot of the agent at `addr` over this agent's own QUIC endpoint.
async fn fetch(proxy: &ProxyContext, addr: SocketAddr) -> Result<AgentSnapshot, String> {
    let bytes = proxy
        .tunnels
        .ask(addr, ALPN_STATS, MAX_SNAPSHOT_BYTES)
        .await?;
    serde_json::from_slice(&bytes).map_err(|e| format!("bad snapshot: {e}"))
}

/// Golden metrics of one service over a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStat {
    /// `namespace/name`.
    pub service: String,
    /// Requests served in the window.
    pub requests: u64,
    /// Requests by status class.
    pub codes: BTreeMap<String, u64>,
    /// Share of requests not answered with a 5xx (`None` without requests).
    pub success_rate: Option<f64>,
    /// Requests per second.
    pub rps: f64,
    /// Median latency, seconds.
    pub p50_seconds: Option<f64>,
    /// 95th percentile latency, seconds.
    pub p95_seconds: Option<f64>,
    /// 99th percentile latency, seconds.
    pub p99_seconds: Option<f64>,
    /// Agents that served the service (and answered both samples).
    pub agents: usize,
}

/// `weft stat`'s result: per-service golden metrics between two [`StatReport`]s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatWindow {
    /// Mean window length over the agents compared, seconds (by their own clocks).
    pub window_secs: f64,
    /// Agents compared (answered both samples, same run).
    pub answered: Vec<String>,
    /// Agents left out, with the reason.
    pub unreachable: BTreeMap<String, String>,
    /// One row per destination service, by name.
    pub services: Vec<ServiceStat>,
}

/// Compares two gatherings: per agent, what it counted between them (over its own elapsed
/// time), summed per service over the agents. Agents that failed to answer either sample, or
/// restarted in between, are left out and listed. `only` keeps the services it names
/// (`name` or `namespace/name`).
pub fn window(before: &StatReport, after: &StatReport, only: Option<&str>) -> StatWindow {
    let mut unreachable = BTreeMap::new();
    let mut answered = Vec::new();
    let mut elapsed_total = 0.0;
    let mut merged: BTreeMap<String, (ServiceCounts, f64, usize)> = BTreeMap::new();
    for agent in &after.agents {
        let earlier = before.agents.iter().find(|a| a.node == agent.node);
        let (now, then) = match (&agent.snapshot, earlier.and_then(|a| a.snapshot.as_ref())) {
            (Some(now), Some(then)) => (now, then),
            (None, _) => {
                let reason = agent.error.clone().unwrap_or_else(|| "no answer".into());
                unreachable.insert(agent.node.clone(), reason);
                continue;
            }
            (Some(_), None) => {
                let reason = earlier
                    .and_then(|a| a.error.clone())
                    .unwrap_or_else(|| "not in the first sample".into());
                unreachable.insert(agent.node.clone(), reason);
                continue;
            }
        };
        if now.generation != then.generation || now.uptime_ms <= then.uptime_ms {
            unreachable.insert(agent.node.clone(), "restarted between samples".into());
            continue;
        }
        let secs = (now.uptime_ms - then.uptime_ms) as f64 / 1000.0;
        let mut deltas = Vec::new();
        for (service, counts) in &now.services {
            let zero = ServiceCounts::default();
            let Some(delta) = counts.since(then.services.get(service).unwrap_or(&zero)) else {
                deltas.clear();
                unreachable.insert(agent.node.clone(), "counters reset between samples".into());
                break;
            };
            deltas.push((service, delta));
        }
        if unreachable.contains_key(&agent.node) {
            continue;
        }
        answered.push(agent.node.clone());
        elapsed_total += secs;
        for (service, delta) in deltas {
            let entry = merged.entry(service.clone()).or_default();
            entry.1 += delta.total() as f64 / secs;
            entry.0.add(&delta);
            entry.2 += 1;
        }
    }
    for agent in &before.agents {
        if agent.snapshot.is_none() && !after.agents.iter().any(|a| a.node == agent.node) {
            let reason = agent.error.clone().unwrap_or_else(|| "no answer".into());
            unreachable.insert(agent.node.clone(), reason);
        }
    }
    let services = merged
        .into_iter()
        .filter(|(service, _)| only.is_none_or(|o| matches_service(service, o)))
        .map(|(service, (counts, rps, agents))| {
            let total = counts.total();
            let q = |q| quantile(q, &counts.buckets, counts.count);
            ServiceStat {
                service,
                requests: total,
                success_rate: (total > 0).then(|| counts.successes() as f64 / total as f64),
                rps,
                p50_seconds: q(0.5),
                p95_seconds: q(0.95),
                p99_seconds: q(0.99),
                codes: counts.requests,
                agents,
            }
        })
        .collect();
    StatWindow {
        window_secs: if answered.is_empty() {
            0.0
        } else {
            elapsed_total / answered.len() as f64
        },
        answered,
        unreachable,
        services,
    }
}

/// Whether `service` (`namespace/name`) is the one `wanted` names (`name` or `namespace/name`).
pub fn matches_service(service: &str, wanted: &str) -> bool {
    service == wanted
        || service
            .split_once('/')
            .is_some_and(|(_, name)| name == wanted)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hyper::StatusCode;
    use prometheus::Registry;

    use super::*;
    use crate::proxy::Direction;
    use crate::proxy::l7::metrics::HttpMetrics;

    fn counts(requests: &[(&str, u64)], buckets: &[(f64, u64)]) -> ServiceCounts {
        let count = buckets.last().map(|b| b.1).unwrap_or(0);
        ServiceCounts {
            requests: requests.iter().map(|(c, n)| (c.to_string(), *n)).collect(),
            buckets: buckets.to_vec(),
            count,
            sum: 0.0,
        }
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn quantiles_interpolate_like_histogram_quantile() {
        // 10 in (0, 0.1], 10 in (0.1, 0.2], none above.
        let b = [(0.1, 10), (0.2, 20), (0.5, 20)];
        assert!(close(quantile(0.5, &b, 20), 0.1));
        assert!(close(quantile(0.25, &b, 20), 0.05));
        assert!(close(quantile(0.75, &b, 20), 0.15));
        assert!(close(quantile(1.0, &b, 20), 0.2));
        // Observations above the highest bound: the highest bound.
        assert!(close(quantile(0.99, &[(0.1, 1), (0.2, 1)], 10), 0.2));
        assert_eq!(quantile(0.5, &b, 0), None);
        assert_eq!(quantile(1.5, &b, 20), None);
        // Empty buckets below are skipped.
        assert!(close(
            quantile(0.5, &[(0.1, 0), (0.2, 0), (0.4, 4)], 4),
            0.3
        ));
    }

    #[test]
    fn merging_adds_classes_and_buckets() {
        let mut a = counts(&[("2xx", 3)], &[(0.1, 2), (0.2, 3)]);
        a.add(&counts(&[("2xx", 1), ("5xx", 2)], &[(0.1, 1), (0.2, 3)]));
        assert_eq!(a.requests["2xx"], 4);
        assert_eq!(a.requests["5xx"], 2);
        assert_eq!(a.buckets, vec![(0.1, 3), (0.2, 6)]);
        assert_eq!((a.count, a.total(), a.successes()), (6, 6, 4));
        // Different bounds: each side's count at a bound is its count at the bound below.
        let mut b = counts(&[], &[(0.1, 1), (1.0, 2)]);
        b.add(&counts(&[], &[(0.5, 5)]));
        assert_eq!(b.buckets, vec![(0.1, 1), (0.5, 6), (1.0, 7)]);
    }

    #[test]
    fn deltas_subtract_and_detect_resets() {
        let then = counts(&[("2xx", 5)], &[(0.1, 4), (0.2, 5)]);
        let now = counts(&[("2xx", 8), ("5xx", 1)], &[(0.1, 6), (0.2, 9)]);
        let delta = now.since(&then).unwrap();
        assert_eq!(delta.requests["2xx"], 3);
        assert_eq!(delta.requests["5xx"], 1);
        assert_eq!(delta.buckets, vec![(0.1, 2), (0.2, 4)]);
        assert_eq!(delta.count, 4);
        assert_eq!(then.since(&now), None);
    }

    #[test]
    fn snapshots_sum_inbound_requests_per_destination() {
        let registry = Registry::new();
        let metrics = HttpMetrics::new(&registry).unwrap();
        let ms = Duration::from_millis;
        metrics.request(
            Direction::Inbound,
            "a",
            "default/web",
            "-",
            StatusCode::OK,
            ms(3),
        );
        metrics.request(
            Direction::Inbound,
            "b",
            "default/web",
            "r",
            StatusCode::OK,
            ms(30),
        );
        let err = StatusCode::INTERNAL_SERVER_ERROR;
        metrics.request(Direction::Inbound, "a", "default/web", "-", err, ms(300));
        metrics.request(
            Direction::Outbound,
            "a",
            "default/db",
            "-",
            StatusCode::OK,
            ms(3),
        );
        let services = snapshot_from(&registry.gather());
        assert_eq!(services.keys().collect::<Vec<_>>(), ["default/web"]);
        let web = &services["default/web"];
        assert_eq!((web.total(), web.successes(), web.count), (3, 2, 3));
        assert_eq!(web.buckets.len(), 14);
        assert_eq!(web.cumulative_at(0.005), 1);
        assert_eq!(web.cumulative_at(0.05), 2);
        assert_eq!(web.cumulative_at(0.5), 3);
        assert!((web.sum - 0.333).abs() < 1e-9);
    }

    fn agent(node: &str, generation: u64, uptime_ms: u64, web: Option<ServiceCounts>) -> AgentStat {
        AgentStat {
            node: node.into(),
            addr: None,
            snapshot: Some(AgentSnapshot {
                node: node.into(),
                generation,
                uptime_ms,
                services: web.into_iter().map(|c| ("default/web".into(), c)).collect(),
            }),
            error: None,
        }
    }

    #[test]
    fn windows_sum_agents_and_leave_out_the_ones_that_cannot_be_compared() {
        let before = StatReport {
            node: "a1".into(),
            agents: vec![
                agent(
                    "a1",
                    1,
                    1_000,
                    Some(counts(&[("2xx", 10)], &[(0.1, 10), (0.2, 10)])),
                ),
                agent("a2", 1, 5_000, None),
                agent(
                    "a3",
                    1,
                    9_000,
                    Some(counts(&[("2xx", 50)], &[(0.1, 50), (0.2, 50)])),
                ),
                AgentStat {
                    node: "a4".into(),
                    addr: None,
                    snapshot: None,
                    error: Some("timed out".into()),
                },
            ],
        };
        let after = StatReport {
            node: "a1".into(),
            agents: vec![
                // 10 more over 2 s, all fast and successful.
                agent(
                    "a1",
                    1,
                    3_000,
                    Some(counts(&[("2xx", 20)], &[(0.1, 20), (0.2, 20)])),
                ),
                // 10 new over 4 s: 8 ok, 2 failed, all slow.
                agent(
                    "a2",
                    1,
                    9_000,
                    Some(counts(&[("2xx", 8), ("5xx", 2)], &[(0.1, 0), (0.2, 10)])),
                ),
                // Restarted: left out.
                agent(
                    "a3",
                    2,
                    100,
                    Some(counts(&[("2xx", 1)], &[(0.1, 1), (0.2, 1)])),
                ),
                AgentStat {
                    node: "a4".into(),
                    addr: None,
                    snapshot: None,
                    error: Some("timed out".into()),
                },
            ],
        };
        let w = window(&before, &after, None);
        assert_eq!(w.answered, ["a1", "a2"]);
        assert_eq!(w.unreachable.keys().collect::<Vec<_>>(), ["a3", "a4"]);
        assert!((w.window_secs - 3.0).abs() < 1e-9);
        assert_eq!(w.services.len(), 1);
        let web = &w.services[0];
        assert_eq!((web.requests, web.agents), (20, 2));
        assert!(close(web.success_rate, 0.9));
        assert!((web.rps - (10.0 / 2.0 + 10.0 / 4.0)).abs() < 1e-9);
        assert!(close(web.p50_seconds, 0.1));
        assert!(close(web.p95_seconds, 0.19));
        assert!(window(&before, &after, Some("db")).services.is_empty());
        assert_eq!(window(&before, &after, Some("web")).services.len(), 1);
        assert_eq!(
            window(&before, &after, Some("default/web")).services.len(),
            1
        );
    }
}
