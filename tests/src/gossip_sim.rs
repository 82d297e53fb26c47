//! Shared pieces of the in-process gossip simulations (`tests/bench/gossip_sim.rs`,
//! `tests/bench/policy.rs`): N real chitchat 0.13 members in one process, configured as the
//! agent configures them (`discovery/src/membership.rs`), on a transport the caller chooses
//! (chitchat's in-memory `ChannelTransport`, possibly wrapped), and on either tokio's paused
//! clock or the wall clock.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use chitchat::transport::Transport;
use chitchat::{
    Chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState,
    ProtocolVersion, spawn_chitchat,
};
use tokio::sync::{Mutex, watch};
use tokio::time::Instant;

/// Largest UDP payload over IPv4; chitchat's limit for one gossip message.
pub const MAX_PAYLOAD: usize = 65_507;
/// Cluster id used by every simulated node (the agent uses its trust domain).
pub const CLUSTER_ID: &str = "weft.example";
/// Gossip port every simulated node advertises.
pub const GOSSIP_PORT: u16 = 7946;
/// Seed nodes an operator would list.
pub const SEEDS: usize = 3;
/// The agent's default gossip interval (`gossip.interval`).
pub const AGENT_INTERVAL: Duration = Duration::from_millis(500);
/// The agent's default dead-node grace period (`gossip.dead_grace`).
pub const DEAD_GRACE: Duration = Duration::from_secs(3600);
/// Wall-clock bound on each waiting phase, whatever the clock.
pub const WALL_BOUND: Duration = Duration::from_secs(180);

/// Which clock the gossip loops run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// tokio's paused clock on one thread: time stands still while any task can run and jumps
    /// to the next timer when all are idle, so handling a message takes no simulated time and
    /// the results show the protocol at its configured interval whatever this machine's CPU.
    Simulated,
    /// The wall clock on a multi-threaded runtime: processing time and CPU contention count.
    Real,
}

/// A fresh runtime for one run (a fresh clock, and every task dropped with it).
pub fn runtime(clock: Clock) -> anyhow::Result<tokio::runtime::Runtime> {
    match clock {
        Clock::Simulated => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build(),
        Clock::Real => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    }
    .context("building the tokio runtime")
}

/// One simulated member.
pub struct SimNode {
    pub id: ChitchatId,
    /// `None` once the node is stopped.
    pub handle: Option<ChitchatHandle>,
    pub chitchat: Arc<Mutex<Chitchat>>,
    pub live: watch::Receiver<BTreeMap<ChitchatId, NodeState>>,
}

/// The gossip address of simulated node `i`: one host per address, as in a real fleet.
pub fn sim_addr(i: usize) -> SocketAddr {
    let i = i as u32 + 1;
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8)),
        GOSSIP_PORT,
    )
}

/// The name of simulated node `i`, as an operator would name hosts.
pub fn sim_name(i: usize) -> String {
    format!("node-{:04}", i + 1)
}

/// Agent-like initial keys: node record, lifecycle state, keyring fingerprints, one service.
pub fn agent_keys(name: &str, addr: SocketAddr, started_at: u64) -> Vec<(String, String)> {
    let tunnel = SocketAddr::new(addr.ip(), 7947);
    vec![
        (
            "node".to_string(),
            format!(
                r#"{{"name":"{name}","gossip_addr":"{addr}","tunnel_addr":"{tunnel}","labels":{{"zone":"z1"}},"roles":[],"version":"0.1.0","policy_version":0,"started_at":{started_at}}}"#
            ),
        ),
        ("state".to_string(), "alive".to_string()),
        ("keyring".to_string(), "3f9a1c2b4d5e6f70".to_string()),
        (
            "svc:default/web".to_string(),
            r#"{"port":8080,"protocol":"http","health":"passing","weight":1}"#.to_string(),
        ),
    ]
}

/// The agent's chitchat configuration for one node.
pub fn agent_config(id: ChitchatId, seeds: &[String], interval: Duration) -> ChitchatConfig {
    ChitchatConfig {
        listen_addr: id.gossip_advertise_addr,
        chitchat_id: id,
        cluster_id: CLUSTER_ID.to_string(),
        gossip_interval: interval,
        seed_nodes: seeds.to_vec(),
        failure_detector_config: FailureDetectorConfig {
            initial_interval: interval,
            dead_node_grace_period: DEAD_GRACE,
            ..FailureDetectorConfig::default()
        },
        marked_for_deletion_grace_period: DEAD_GRACE,
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: ProtocolVersion::V1,
    }
}

/// Starts `names.len()` nodes on `transport`, the first [`SEEDS`] being the seeds, at random
/// moments within one gossip interval so that their rounds are out of phase, as on real hosts.
/// Each node starts with [`agent_keys`] plus `extra_keys`.
pub async fn spawn_nodes(
    transport: &dyn Transport,
    names: &[String],
    interval: Duration,
    extra_keys: &[(String, String)],
) -> anyhow::Result<Vec<SimNode>> {
    let generation = unix_ms();
    let seeds: Vec<String> = (0..SEEDS.min(names.len()))
        .map(|i| sim_addr(i).to_string())
        .collect();
    let mut rng = SplitMix(names.len() as u64);
    let span = interval.as_micros().max(1) as u64;
    let mut offsets: Vec<Duration> = (0..names.len())
        .map(|_| Duration::from_micros(rng.below(span)))
        .collect();
    offsets.sort();
    let start = Instant::now();
    let mut nodes = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        tokio::time::sleep_until(start + offsets[i]).await;
        let addr = sim_addr(i);
        let id = ChitchatId::new(name.clone(), generation, addr);
        let mut keys = agent_keys(name, addr, generation / 1000);
        keys.extend_from_slice(extra_keys);
        let handle = spawn_chitchat(agent_config(id.clone(), &seeds, interval), keys, transport)
            .await
            .with_context(|| format!("starting simulated node {name}"))?;
        let chitchat = handle.chitchat();
        let live = chitchat.lock().await.live_nodes_watcher();
        nodes.push(SimNode {
            id,
            handle: Some(handle),
            chitchat,
            live,
        });
    }
    Ok(nodes)
}

/// Stops every node still running and waits for their gossip loops to end; returns how many
/// loops had already ended with an error (a panic, in practice), naming the first one on
/// stderr after `log_prefix`.
pub async fn stop_all(nodes: &mut [SimNode], log_prefix: &str) -> usize {
    for node in nodes.iter() {
        if let Some(handle) = &node.handle {
            let _ = handle.initiate_shutdown();
        }
    }
    let mut failed = 0;
    let mut first_error = None;
    for node in nodes.iter_mut() {
        if let Some(handle) = node.handle.take()
            && let Err(error) = handle.shutdown().await
        {
            failed += 1;
            first_error.get_or_insert_with(|| error.to_string());
        }
    }
    if let Some(error) = first_error {
        eprintln!("{log_prefix}: {failed} gossip loops had ended with an error, first: {error}");
    }
    failed
}

/// A small deterministic PRNG (SplitMix64), so model runs are reproducible.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-enough value in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound.max(1)
    }
}

/// Milliseconds since the Unix epoch, like the agent's generation id.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Hands memory freed by the last run back to the system, so that the next run's RSS growth
/// is its own and the machine gets its memory back.
pub fn release_memory() {
    // SAFETY: malloc_trim only releases free heap memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `MemAvailable` from `/proc/meminfo`, in GiB (0 when unreadable).
pub fn mem_available_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0)
}

/// The memory a pool of `n` members needs in this one process, in GiB: every member holds the
/// whole pool (about 12 KiB per peer, mostly the failure detector's sample window), so N².
pub fn pool_memory_gib(n: usize) -> f64 {
    (n * n) as f64 * 13.0 / 1024.0 / 1024.0
}
