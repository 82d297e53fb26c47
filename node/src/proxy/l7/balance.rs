//! Endpoint choice for HTTP requests: power of two choices over peak-EWMA latency (as Linkerd
//! and Finagle do), preferring this node's zone, with outlier ejection.
//!
//! Each endpoint keeps a latency estimate of its successful answers that jumps up to any slower
//! sample at once and decays towards faster ones with a 10-second time constant, and a count
//! of requests in flight. Failures do not feed the estimate (a dead host's timeouts would keep
//! it shunned long after it recovers); they count towards ejection instead. The
//! cost of an endpoint is `estimate × (in flight + 1)`; of two endpoints drawn at random, the
//! cheaper one is used. An endpoint that fails [`EJECT_AFTER`] requests in a row (connect
//! errors and 5xx answers) is left out for [`EJECTION_BASE`], doubling on each ejection up to
//! [`EJECTION_MAX`]; when the time is up it is tried again, and one success clears its record.
//! If every candidate is ejected, ejection is ignored: a bad endpoint beats none.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;
use weft_discovery::Endpoint;

/// Consecutive failures that eject an endpoint.
pub const EJECT_AFTER: u32 = 5;
/// First ejection time.
pub const EJECTION_BASE: Duration = Duration::from_secs(10);
/// Longest ejection time.
pub const EJECTION_MAX: Duration = Duration::from_secs(300);
/// Decay time constant of the latency estimate.
const DECAY: Duration = Duration::from_secs(10);
/// Estimate of an endpoint with no samples yet: optimistic, so new endpoints get tried.
const INITIAL_ESTIMATE: Duration = Duration::from_millis(1);

#[derive(Debug)]
struct Stats {
    estimate_ns: f64,
    updated: Instant,
    in_flight: u32,
    consecutive_failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl Stats {
    fn new(now: Instant) -> Stats {
        Stats {
            estimate_ns: INITIAL_ESTIMATE.as_nanos() as f64,
            updated: now,
            in_flight: 0,
            consecutive_failures: 0,
            ejections: 0,
            ejected_until: None,
        }
    }

    fn cost(&self, now: Instant) -> f64 {
        self.decayed(now) * f64::from(self.in_flight + 1)
    }

    fn decayed(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        let floor = INITIAL_ESTIMATE.as_nanos() as f64 / 10.0;
        floor + (self.estimate_ns - floor) * (-elapsed / DECAY.as_secs_f64()).exp()
    }

    /// Takes a latency sample. Peak: a slower one is taken at once; faster ones pull the
    /// estimate down slowly.
    fn observe(&mut self, latency: Duration, now: Instant) {
        let sample = latency.as_nanos() as f64;
        let decayed = self.decayed(now);
        self.estimate_ns = if sample > decayed {
            sample
        } else {
            let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
            let weight = (-elapsed / DECAY.as_secs_f64()).exp();
            decayed * weight + sample * (1.0 - weight)
        };
        self.updated = now;
    }

    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }
}

/// How a request to an endpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered, not 5xx.
    Success,
    /// A connect or stream error, or a 5xx answer.
    Failure,
}

/// Per-endpoint statistics, shared by every request of this agent.
#[derive(Debug, Default)]
pub struct Balancer {
    stats: Mutex<HashMap<SocketAddr, Stats>>,
}

/// What an endpoint's ejection changed, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ejection {
    /// Nothing.
    None,
    /// The endpoint was just ejected for this long.
    Ejected(Duration),
    /// A formerly ejected endpoint answered well and is back in full.
    Readmitted,
}

impl Balancer {
    /// Picks one of `candidates` (not empty), preferring those in `zone` when any is there.
    pub fn pick<'a>(&self, candidates: &'a [Endpoint], zone: Option<&str>) -> &'a Endpoint {
        let now = Instant::now();
        let stats = self.stats.lock().expect("balancer lock is never poisoned");
        let usable = |e: &&Endpoint| !stats.get(&e.tunnel_addr).is_some_and(|s| s.ejected(now));
        let in_zone = |e: &&Endpoint| {
            zone.is_some_and(|z| e.labels.get("zone").map(String::as_str) == Some(z))
        };
        let mut pool: Vec<&Endpoint> = candidates.iter().filter(usable).filter(in_zone).collect();
        if pool.is_empty() {
            pool = candidates.iter().filter(usable).collect();
        }
        if pool.is_empty() {
            pool = candidates.iter().collect();
        }
        if pool.len() == 1 {
            return pool[0];
        }
        let mut rng = rand::rng();
        let a = rng.random_range(0..pool.len());
        let mut b = rng.random_range(0..pool.len() - 1);
        if b >= a {
            b += 1;
        }
        let cost = |e: &Endpoint| {
            stats
                .get(&e.tunnel_addr)
                .map_or(INITIAL_ESTIMATE.as_nanos() as f64, |s| s.cost(now))
        };
        if cost(pool[a]) <= cost(pool[b]) {
            pool[a]
        } else {
            pool[b]
        }
    }

    /// A request to `endpoint` starts.
    pub fn start(&self, endpoint: SocketAddr) {
        let now = Instant::now();
        let mut stats = self.stats.lock().expect("balancer lock is never poisoned");
        stats
            .entry(endpoint)
            .or_insert_with(|| Stats::new(now))
            .in_flight += 1;
    }

    /// A request to `endpoint` that started ended after `latency`.
    pub fn finish(&self, endpoint: SocketAddr, latency: Duration, outcome: Outcome) -> Ejection {
        let now = Instant::now();
        let mut stats = self.stats.lock().expect("balancer lock is never poisoned");
        let s = stats.entry(endpoint).or_insert_with(|| Stats::new(now));
        s.in_flight = s.in_flight.saturating_sub(1);
        match outcome {
            Outcome::Success => {
                s.observe(latency, now);
                s.consecutive_failures = 0;
                if s.ejections > 0 && !s.ejected(now) {
                    s.ejections = 0;
                    s.ejected_until = None;
                    return Ejection::Readmitted;
                }
                Ejection::None
            }
            Outcome::Failure => {
                s.consecutive_failures += 1;
                if s.consecutive_failures >= EJECT_AFTER && !s.ejected(now) {
                    let factor = 1u32 << s.ejections.min(8);
                    let time = (EJECTION_BASE * factor).min(EJECTION_MAX);
                    s.ejections += 1;
                    s.consecutive_failures = 0;
                    s.ejected_until = Some(now + time);
                    return Ejection::Ejected(time);
                }
                Ejection::None
            }
        }
    }

    /// Forgets endpoints not in `live`.
    pub fn retain(&self, live: &std::collections::HashSet<SocketAddr>) {
        self.stats
            .lock()
            .expect("balancer lock is never poisoned")
            .retain(|addr, _| live.contains(addr));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use weft_discovery::{Health, Protocol};

    use super::*;

    fn endpoint(port: u16, zone: &str) -> Endpoint {
        Endpoint {
            node: format!("n{port}"),
            tunnel_addr: SocketAddr::from(([127, 0, 0, 1], port)),
            port: 80,
            protocol: Protocol::Http,
            health: Health::Passing,
            weight: 1,
            labels: BTreeMap::from([("zone".to_string(), zone.to_string())]),
            is_local: false,
        }
    }

    #[test]
    fn a_slow_endpoint_gets_a_small_share() {
        let balancer = Balancer::default();
        let endpoints = [endpoint(1, "a"), endpoint(2, "a")];
        let mut slow = 0;
        for _ in 0..2000 {
            let chosen = balancer.pick(&endpoints, None).tunnel_addr;
            balancer.start(chosen);
            let latency = if chosen.port() == 1 {
                slow += 1;
                Duration::from_millis(10)
            } else {
                Duration::from_millis(1)
            };
            balancer.finish(chosen, latency, Outcome::Success);
        }
        assert!(slow < 200, "the 10x slower endpoint got {slow} of 2000");
    }

    #[test]
    fn the_local_zone_is_preferred_while_it_has_endpoints() {
        let balancer = Balancer::default();
        let endpoints = [endpoint(1, "a"), endpoint(2, "b"), endpoint(3, "b")];
        for _ in 0..100 {
            assert_eq!(balancer.pick(&endpoints, Some("a")).tunnel_addr.port(), 1);
        }
        // Without a zone match, any endpoint.
        let ports: std::collections::HashSet<u16> = (0..200)
            .map(|_| balancer.pick(&endpoints, Some("c")).tunnel_addr.port())
            .collect();
        assert_eq!(ports.len(), 3);
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_readmits() {
        let balancer = Balancer::default();
        let endpoints = [endpoint(1, "a"), endpoint(2, "a")];
        let bad = endpoints[0].tunnel_addr;
        let mut ejected = None;
        for _ in 0..EJECT_AFTER {
            balancer.start(bad);
            ejected = Some(balancer.finish(bad, Duration::from_millis(1), Outcome::Failure));
        }
        assert_eq!(ejected, Some(Ejection::Ejected(EJECTION_BASE)));
        for _ in 0..100 {
            assert_eq!(balancer.pick(&endpoints, None).tunnel_addr.port(), 2);
        }
        // Alone, an ejected endpoint is still used.
        assert_eq!(balancer.pick(&endpoints[..1], None).tunnel_addr, bad);
        // Time up (simulated): a success readmits it.
        balancer
            .stats
            .lock()
            .unwrap()
            .get_mut(&bad)
            .unwrap()
            .ejected_until = Some(Instant::now());
        balancer.start(bad);
        assert_eq!(
            balancer.finish(bad, Duration::from_millis(1), Outcome::Success),
            Ejection::Readmitted
        );
    }
}
