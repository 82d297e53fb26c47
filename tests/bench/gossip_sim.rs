//! Gossip at scale: an in-process simulation of one Weft gossip pool.
//!
//! Runs N real chitchat 0.13 instances in this one process, on chitchat's in-memory
//! `ChannelTransport` with the UDP payload limit (65,507 bytes) as MTU, configured exactly as
//! the agent configures them (`discovery/src/membership.rs`): `ProtocolVersion::V1`
//! (zstd-compressed digests), `FailureDetectorConfig` with `initial_interval` equal to the
//! gossip interval and the default phi threshold of 8, a one-hour dead-node grace period,
//! three seed nodes, and four agent-like keys per node (node record, state, keyring
//! fingerprints, one service). For each cluster size it measures:
//!
//! 1. startup convergence: time until every node's live set holds all N nodes;
//! 2. propagation: time until 99 % and 100 % of nodes hold a key one node just set;
//! 3. failure detection: time until 99 % and 100 % of the others drop a stopped node from
//!    their live set;
//! 4. steady-state traffic (bytes and messages per node per second, from
//!    `ChannelTransport::statistics`), process CPU and RSS;
//! 5. the largest gossip message, and at which cluster size a member's digest (sent in full in
//!    every Syn and SynAck) no longer fits 65,507 bytes: a model of chitchat's V1 digest
//!    encoding, checked against the Syn sizes measured in the simulation, then evaluated for
//!    larger clusters; plus a small cluster with oversized node names that shows what chitchat
//!    does past the limit.
//!
//! Simulating N members costs this one machine the CPU of all of them, which grows as N², so
//! the pools run on tokio's paused clock ([`Clock::Simulated`]): handling a message takes no
//! simulated time and the timings are the protocol's own at the agent's 500 ms interval. A
//! small pool also runs on the wall clock ([`Clock::Real`]) as a check of that method.
//!
//! Environment: `WEFT_SIM_SIZES` (comma-separated sizes on the simulated clock, default
//! `100,300,1000`), `WEFT_SIM_REALTIME` (sizes on the wall clock; default `100`, none when
//! `WEFT_SIM_SIZES` is set), `WEFT_SIM_INTERVAL_MS` (gossip interval, default 500),
//! `WEFT_SIM_DOCS` (`1` writes `docs/benchmarks.md` even with custom sizes, `0` never writes
//! it). Every wait is bounded in simulated rounds and in wall time; a bound that is hit is
//! reported, not hidden.
//!
//! Run with `cargo bench -p weft-tests --bench gossip_sim`.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use chitchat::transport::{ChannelTransport, RecvOutcome, SendOutcome, Socket, Transport};
use chitchat::{Chitchat, ChitchatEnvelope, ChitchatId, ChitchatMessage, Serializable};
use tokio::time::Instant;
use weft_tests::bench_report;
use weft_tests::charts::{LineChart, LineSeries};
use weft_tests::gossip_sim::{
    AGENT_INTERVAL, CLUSTER_ID, Clock, GOSSIP_PORT, MAX_PAYLOAD, SEEDS, SimNode, SplitMix,
    WALL_BOUND, mem_available_gib, pool_memory_gib, release_memory, runtime, sim_addr, sim_name,
    spawn_nodes, stop_all, unix_ms,
};

/// This benchmark's section of `benchmarks.md`.
const HEADING: &str = "Gossip at scale (in-process simulation)";
/// Key the propagation phase publishes.
const PROBE_KEY: &str = "bench:probe";
/// chitchat's compressed-stream block size for digests (`DIGEST_BLOCK_THRESHOLD`).
const DIGEST_BLOCK: usize = 16_384;
/// Bytes before the message body: magic (2), protocol version (1), message type (1).
const ENVELOPE_HEADER: usize = 4;
/// Largest own digest with which a node can still answer a Syn: chitchat gives the SynAck's
/// delta `65,507 - 4 - digest` bytes and asserts that this is at least 100
/// (`DeltaSerializer::with_mtu`), so a bigger digest panics the gossip loop.
const MAX_SYNACK_DIGEST: usize = MAX_PAYLOAD - ENVELOPE_HEADER - 100;

fn main() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let sizes_env = std::env::var("WEFT_SIM_SIZES").ok();
    let sizes = parse_sizes(sizes_env.as_deref())?;
    let realtime_env = std::env::var("WEFT_SIM_REALTIME").ok();
    let realtime_sizes = match (realtime_env.as_deref(), sizes_env.is_some()) {
        (Some(spec), _) => parse_sizes(Some(spec).filter(|s| !s.trim().is_empty()))?,
        (None, false) => vec![100],
        (None, true) => Vec::new(),
    };
    let interval = match std::env::var("WEFT_SIM_INTERVAL_MS") {
        Ok(ms) => Duration::from_millis(
            ms.trim()
                .parse()
                .context("WEFT_SIM_INTERVAL_MS must be milliseconds")?,
        ),
        Err(_) => AGENT_INTERVAL,
    };
    let machine = Machine::read();
    eprintln!(
        "gossip_sim: sizes {sizes:?} (simulated time), {realtime_sizes:?} (real time), \
         interval {} ms, on {}",
        interval.as_millis(),
        machine.summary()
    );

    // The real-time check goes first, while the process is fresh and nothing else runs.
    let runs = realtime_sizes
        .iter()
        .map(|&n| (n, Clock::Real))
        .chain(sizes.iter().map(|&n| (n, Clock::Simulated)));
    let mut results = Vec::new();
    let mut skipped = Vec::new();
    for (n, clock) in runs {
        // Every member holds the whole cluster, so the simulation needs memory in N².
        let need_gib = pool_memory_gib(n);
        let available_gib = mem_available_gib();
        if need_gib > available_gib {
            let why = format!(
                "N={n} skipped: needs about {need_gib:.1} GiB, {available_gib:.1} GiB available"
            );
            eprintln!("gossip_sim: {why}");
            skipped.push(why);
            continue;
        }
        eprintln!("gossip_sim: N={n}, {clock:?} clock");
        let result = runtime(clock)?.block_on(simulate(n, interval, clock))?;
        eprintln!("gossip_sim: N={n} done: {result:?}");
        results.push(result);
        release_memory();
    }

    let heartbeat_rate = results
        .iter()
        .map(|r| r.heartbeat_per_s)
        .fold(0.0_f64, f64::max)
        .max(1.0);
    let limits = digest_limits(heartbeat_rate);
    eprintln!("gossip_sim: digest limits computed");
    let stall = runtime(Clock::Simulated)?.block_on(stall_demo())?;
    eprintln!("gossip_sim: stall demo done: {stall:?}");

    let elapsed = started.elapsed();
    let mut report = render(
        &machine,
        &results,
        &skipped,
        &limits,
        &stall,
        heartbeat_rate,
        elapsed,
    );
    println!("{report}");

    let write_docs = match std::env::var("WEFT_SIM_DOCS").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => sizes_env.is_none(),
    };
    if write_docs {
        report.push_str(&render_chart(&results)?);
        bench_report::replace_section("benchmarks.md", HEADING, &report)
            .context("writing the gossip section of benchmarks.md")?;
        eprintln!(
            "gossip_sim: wrote {}",
            bench_report::docs_dir().join("benchmarks.md").display()
        );
    } else {
        eprintln!(
            "gossip_sim: custom sizes, docs/benchmarks.md left alone (WEFT_SIM_DOCS=1 forces)"
        );
    }
    eprintln!("gossip_sim: total {:.1} s", elapsed.as_secs_f64());
    Ok(())
}

/// Cluster sizes from `WEFT_SIM_SIZES`, or the default 100, 300, 1000.
fn parse_sizes(spec: Option<&str>) -> anyhow::Result<Vec<usize>> {
    let Some(spec) = spec else {
        return Ok(vec![100, 300, 1000]);
    };
    let sizes = spec
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .context("WEFT_SIM_SIZES must be comma-separated integers")?;
    if sizes.iter().any(|&n| n < SEEDS + 2) {
        bail!("every size must be at least {}", SEEDS + 2);
    }
    Ok(sizes)
}

/// What one cluster size measured.
#[derive(Debug, Clone)]
struct SimResult {
    n: usize,
    clock: Clock,
    interval: Duration,
    /// Startup: first time 99 % / 100 % of nodes had a full live set.
    converge: Reached,
    /// Key propagation: 99 % / 100 % of nodes hold the new value.
    propagate: Reached,
    /// Failure detection: 99 % / 100 % of the survivors dropped the stopped node.
    detect: Reached,
    /// Steady-state window length.
    window: Duration,
    bytes_per_node_s: f64,
    msgs_per_node_s: f64,
    /// Process CPU during the window per member per gossip round, in milliseconds.
    cpu_ms_per_node_round: f64,
    /// Lowest fraction of nodes with a full live set seen during the window.
    min_full_view: f64,
    rss_mib: f64,
    hwm_mib: f64,
    /// Resident memory this size added, per simulated member (each holds a full cluster view).
    mib_per_member: f64,
    /// Largest message of each kind sent during the whole run (bytes).
    max_syn: usize,
    max_synack: usize,
    max_ack: usize,
    /// Messages chitchat could not send (larger than the MTU).
    send_errors: u64,
    /// Gossip loops that had ended with an error by the end of the run.
    crashed_loops: usize,
    /// Node 0's last Syn size, and the size the digest model predicts for its state.
    probe_syn: usize,
    model_syn: usize,
    /// Node 0's own heartbeat increments per second in steady state.
    heartbeat_per_s: f64,
}

/// When a sampled fraction of nodes first reached 99 % and 100 %.
#[derive(Debug, Clone, Copy)]
struct Reached {
    p99: Option<Duration>,
    p100: Option<Duration>,
    /// Nodes that had reached the condition when sampling stopped, out of `of`.
    done: usize,
    of: usize,
    /// How long sampling lasted.
    waited: Duration,
}

/// Tracks how many targets met a condition, sampling until all do or a bound passes.
struct Progress {
    start: Instant,
    pending: Vec<usize>,
    of: usize,
    p99: Option<Duration>,
    p100: Option<Duration>,
}

impl Progress {
    fn new(targets: Vec<usize>, start: Instant) -> Self {
        Progress {
            start,
            of: targets.len(),
            pending: targets,
            p99: None,
            p100: None,
        }
    }

    /// Records the targets that now meet the condition; returns true when all do.
    fn update(&mut self, now: Instant, mut met: impl FnMut(usize) -> bool) -> bool {
        self.pending.retain(|&i| !met(i));
        self.note(now)
    }

    fn note(&mut self, now: Instant) -> bool {
        let done = self.of - self.pending.len();
        let need99 = (self.of * 99).div_ceil(100);
        if self.p99.is_none() && done >= need99 {
            self.p99 = Some(now - self.start);
        }
        if self.p100.is_none() && self.pending.is_empty() {
            self.p100 = Some(now - self.start);
        }
        self.pending.is_empty()
    }

    fn finish(&self) -> Reached {
        Reached {
            p99: self.p99,
            p100: self.p100,
            done: self.of - self.pending.len(),
            of: self.of,
            waited: self.start.elapsed(),
        }
    }
}

/// Counts what the simulated nodes send, per message kind.
#[derive(Default)]
struct Meter {
    max_syn: AtomicUsize,
    max_synack: AtomicUsize,
    max_ack: AtomicUsize,
    send_errors: AtomicU64,
    /// Address whose latest Syn size is kept in `probe_syn`.
    probe: std::sync::Mutex<Option<SocketAddr>>,
    probe_syn: AtomicUsize,
}

/// A `ChannelTransport` whose sockets report message sizes to a [`Meter`].
struct MeteredTransport {
    inner: ChannelTransport,
    meter: Arc<Meter>,
}

#[async_trait]
impl Transport for MeteredTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let inner = self.inner.open(listen_addr).await?;
        let is_probe = *self.meter.probe.lock().expect("probe lock") == Some(listen_addr);
        Ok(Box::new(MeteredSocket {
            inner,
            meter: self.meter.clone(),
            is_probe,
        }))
    }
}

/// One node's socket, forwarding to the channel transport and recording sizes.
struct MeteredSocket {
    inner: Box<dyn Socket>,
    meter: Arc<Meter>,
    is_probe: bool,
}

/// The kinds of chitchat message the meter tells apart.
#[derive(Clone, Copy)]
enum Kind {
    Syn,
    SynAck,
    Ack,
    Other,
}

#[async_trait]
impl Socket for MeteredSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.inner.local_addr()
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        let kind = match envelope.message {
            ChitchatMessage::Syn { .. } => Kind::Syn,
            ChitchatMessage::SynAck { .. } => Kind::SynAck,
            ChitchatMessage::Ack { .. } => Kind::Ack,
            _ => Kind::Other,
        };
        match self.inner.send(to, envelope).await {
            Ok(outcome) => {
                let len = outcome.num_bytes_sent;
                match kind {
                    Kind::Syn => {
                        self.meter.max_syn.fetch_max(len, Ordering::Relaxed);
                        if self.is_probe {
                            self.meter.probe_syn.store(len, Ordering::Relaxed);
                        }
                    }
                    Kind::SynAck => {
                        self.meter.max_synack.fetch_max(len, Ordering::Relaxed);
                    }
                    Kind::Ack => {
                        self.meter.max_ack.fetch_max(len, Ordering::Relaxed);
                    }
                    Kind::Other => {}
                }
                Ok(outcome)
            }
            Err(error) => {
                self.meter.send_errors.fetch_add(1, Ordering::Relaxed);
                Err(error)
            }
        }
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        self.inner.recv().await
    }
}

/// Runs the timed phases for one cluster size.
async fn simulate(n: usize, interval: Duration, clock: Clock) -> anyhow::Result<SimResult> {
    let meter = Arc::new(Meter::default());
    *meter.probe.lock().expect("probe lock") = Some(sim_addr(0));
    let channel = ChannelTransport::with_mtu(MAX_PAYLOAD);
    let transport = MeteredTransport {
        inner: channel.clone(),
        meter: meter.clone(),
    };
    let names: Vec<String> = (0..n).map(sim_name).collect();
    let rounds = |k: u32| interval * k;
    let (rss_base, _) = rss_mib()?;

    // 1. Startup convergence, timed from the first spawn.
    let start = Instant::now();
    let wall = std::time::Instant::now();
    let mut nodes = spawn_nodes(&transport, &names, interval, &[]).await?;
    let mut progress = Progress::new((0..n).collect(), start);
    loop {
        let now = Instant::now();
        if progress.update(now, |i| nodes[i].live.borrow().len() >= n)
            || now - start > rounds(60)
            || wall.elapsed() > WALL_BOUND
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let converge = progress.finish();

    // 4. Steady state: traffic, CPU and view stability over a fixed window.
    tokio::time::sleep(rounds(1)).await;
    let window = rounds(4);
    let heartbeat_before = own_heartbeat(&nodes[0]).await;
    let stats_before = channel.statistics();
    let cpu_before = cpu_seconds()?;
    let window_start = Instant::now();
    let mut min_full_view = 1.0_f64;
    while window_start.elapsed() < window {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let full = nodes
            .iter()
            .filter(|node| node.live.borrow().len() >= n)
            .count();
        min_full_view = min_full_view.min(full as f64 / n as f64);
    }
    let window_len = window_start.elapsed().as_secs_f64();
    let cpu = cpu_seconds()? - cpu_before;
    let stats_after = channel.statistics();
    let heartbeat_after = own_heartbeat(&nodes[0]).await;
    let (rss_mib, hwm_mib) = rss_mib()?;
    let mib_per_member = (rss_mib - rss_base).max(0.0) / n as f64;
    let bytes_per_node_s =
        (stats_after.num_bytes_total - stats_before.num_bytes_total) as f64 / n as f64 / window_len;
    let msgs_per_node_s = (stats_after.num_messages_total - stats_before.num_messages_total) as f64
        / n as f64
        / window_len;
    let window_rounds = window_len / interval.as_secs_f64();
    let cpu_ms_per_node_round = cpu * 1000.0 / n as f64 / window_rounds;
    let heartbeat_per_s = (heartbeat_after.saturating_sub(heartbeat_before)) as f64 / window_len;

    // 5a. Check the digest model against node 0's real Syn.
    let entries = {
        let guard = nodes[0].chitchat.lock().await;
        digest_entries(&guard)
    };
    let model_syn = syn_len(&entries);
    let probe_syn = meter.probe_syn.load(Ordering::Relaxed);

    // 2 and 3, run together: one non-seed node sets a new key while another one stops.
    let writer = n / 2;
    let victim = n - 1;
    let writer_id = nodes[writer].id.clone();
    let victim_id = nodes[victim].id.clone();
    nodes[writer]
        .handle
        .as_ref()
        .context("writer node is running")?
        .with_chitchat(|c| c.self_node_state().set(PROBE_KEY, "v1"))
        .await;
    let start = Instant::now();
    if let Some(handle) = nodes[victim].handle.take() {
        handle
            .shutdown()
            .await
            .context("stopping the node to be detected")?;
    }
    let wall = std::time::Instant::now();
    let sample = if n <= 300 {
        Duration::from_millis(10)
    } else {
        Duration::from_millis(20)
    };
    let mut propagation = Progress::new(
        (0..n).filter(|&i| i != writer && i != victim).collect(),
        start,
    );
    let mut detection = Progress::new((0..n).filter(|&i| i != victim).collect(), start);
    loop {
        let mut seen = Vec::new();
        for &i in &propagation.pending {
            // A node busy with a message is simply checked again at the next sample.
            let Ok(guard) = nodes[i].chitchat.try_lock() else {
                continue;
            };
            if guard
                .node_state(&writer_id)
                .and_then(|state| state.get(PROBE_KEY))
                .is_some()
            {
                seen.push(i);
            }
        }
        let now = Instant::now();
        let propagated = propagation.update(now, |i| seen.contains(&i));
        let detected = detection.update(now, |i| !nodes[i].live.borrow().contains_key(&victim_id));
        if (propagated && detected) || now - start > rounds(40) || wall.elapsed() > WALL_BOUND {
            break;
        }
        tokio::time::sleep(sample).await;
    }
    let propagate = propagation.finish();
    let detect = detection.finish();

    let crashed_loops = stop_all(&mut nodes, "gossip_sim").await;
    drop(nodes);
    Ok(SimResult {
        n,
        clock,
        interval,
        converge,
        propagate,
        detect,
        window: Duration::from_secs_f64(window_len),
        bytes_per_node_s,
        msgs_per_node_s,
        cpu_ms_per_node_round,
        min_full_view,
        rss_mib,
        hwm_mib,
        mib_per_member,
        max_syn: meter.max_syn.load(Ordering::Relaxed),
        max_synack: meter.max_synack.load(Ordering::Relaxed),
        max_ack: meter.max_ack.load(Ordering::Relaxed),
        send_errors: meter.send_errors.load(Ordering::Relaxed),
        crashed_loops,
        probe_syn,
        model_syn,
        heartbeat_per_s,
    })
}

/// A node's own heartbeat counter.
async fn own_heartbeat(node: &SimNode) -> u64 {
    let mut guard = node.chitchat.lock().await;
    u64::from(guard.self_node_state().heartbeat())
}

/// One digest entry: who, and its heartbeat, last GC version and max version.
type DigestEntry = (ChitchatId, u64, u64, u64);

/// The entries chitchat puts in this node's digest: every known node (none is scheduled for
/// deletion during a run this short), in `ChitchatId` order.
fn digest_entries(chitchat: &Chitchat) -> Vec<DigestEntry> {
    chitchat
        .node_states()
        .iter()
        .map(|(id, state)| {
            (
                id.clone(),
                u64::from(state.heartbeat()),
                state.last_gc_version(),
                state.max_version(),
            )
        })
        .collect()
}

/// Size of chitchat 0.13's V1 (compressed) digest for `entries` (sorted by `ChitchatId`).
///
/// Mirrors `Digest::serialize_v1`: entries are serialized with chitchat's own public
/// `Serializable` impls, cut into 16 KiB blocks, each block zstd-compressed on its own at the
/// default level (kept raw when compression does not shrink it) behind a 3-byte block header,
/// then a 1-byte end tag.
fn digest_stream_len(entries: &[DigestEntry]) -> usize {
    let mut raw = Vec::with_capacity(entries.len() * 64);
    for (id, heartbeat, last_gc, max_version) in entries {
        id.serialize(&mut raw);
        heartbeat.serialize(&mut raw);
        last_gc.serialize(&mut raw);
        max_version.serialize(&mut raw);
    }
    let mut stream = 1; // end tag
    let mut scratch = vec![0u8; DIGEST_BLOCK];
    for block in raw.chunks(DIGEST_BLOCK) {
        let out = &mut scratch[..block.len()];
        stream += 3 + zstd::bulk::compress_to_buffer(block, out, 0).unwrap_or(block.len());
    }
    stream
}

/// Size of the V1 Syn carrying `entries`: envelope header, digest, cluster id.
fn syn_len(entries: &[DigestEntry]) -> usize {
    ENVELOPE_HEADER + digest_stream_len(entries) + CLUSTER_ID.serialized_len()
}

/// Size of the uncompressed (V0) digest entry for `id`.
fn v0_entry_len(id: &ChitchatId) -> usize {
    id.serialized_len() + 3 * 8
}

/// Node-name style for the digest-size model.
#[derive(Debug, Clone, Copy)]
enum Names {
    /// `node-0001`, `node-0002`, ...
    Numbered,
    /// Random UUIDs, 36 characters.
    Uuid,
}

impl Names {
    fn label(self) -> &'static str {
        match self {
            Names::Numbered => "`node-0001` (9 chars)",
            Names::Uuid => "UUID (36 chars)",
        }
    }

    fn name(self, i: usize, rng: &mut SplitMix) -> String {
        match self {
            Names::Numbered => sim_name(i),
            Names::Uuid => {
                let hi = rng.next_u64();
                let lo = rng.next_u64();
                format!(
                    "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
                    hi >> 32,
                    (hi >> 16) & 0xffff,
                    hi & 0xfff,
                    0x8000 | (lo >> 48) & 0x3fff,
                    lo & 0xffff_ffff_ffff
                )
            }
        }
    }
}

/// How long-lived the synthetic cluster is, which sets how random the digest numbers are.
#[derive(Debug, Clone, Copy)]
enum Age {
    /// Like the simulation: all started together a minute ago, addresses in sequence.
    Fresh,
    /// Up to 30 days of uptime, scattered addresses, up to 1000 key versions per node.
    Month,
}

/// A synthetic digest of `m` nodes.
fn synthetic_entries(m: usize, names: Names, age: Age, heartbeat_per_s: f64) -> Vec<DigestEntry> {
    let mut rng = SplitMix(0x5eed_0000 + m as u64);
    let now = unix_ms();
    let mut entries: Vec<DigestEntry> = (0..m)
        .map(|i| {
            let name = names.name(i, &mut rng);
            let (uptime_ms, addr, max_version, last_gc) = match age {
                Age::Fresh => (60_000 + rng.below(2_000), sim_addr(i), 4, 0),
                Age::Month => {
                    let octets = rng.next_u64().to_le_bytes();
                    let addr = SocketAddr::new(
                        IpAddr::V4(Ipv4Addr::new(10, octets[0], octets[1], octets[2])),
                        GOSSIP_PORT,
                    );
                    let max_version = 4 + rng.below(1_000);
                    let last_gc = rng.below(max_version);
                    (rng.below(30 * 86_400_000), addr, max_version, last_gc)
                }
            };
            let heartbeat = (uptime_ms as f64 / 1000.0 * heartbeat_per_s) as u64 + 1;
            let id = ChitchatId::new(name, now - uptime_ms, addr);
            (id, heartbeat, last_gc, max_version)
        })
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    entries
}

/// Largest cluster whose members can still answer a Syn (own digest at most
/// [`MAX_SYNACK_DIGEST`]; the Syn itself fits up to a few members more), by bisection.
fn largest_fitting(names: Names, age: Age, heartbeat_per_s: f64) -> usize {
    let fits = |m: usize| {
        digest_stream_len(&synthetic_entries(m, names, age, heartbeat_per_s)) <= MAX_SYNACK_DIGEST
    };
    let (mut lo, mut hi) = (1usize, 200_000usize);
    if fits(hi) {
        return hi;
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The digest-size findings for one name style.
#[derive(Debug, Clone)]
struct DigestLimit {
    names: Names,
    v0_entry: usize,
    v0_max: usize,
    /// V1 Syn bytes for a month-old cluster of 1000, 2000 and 5000 nodes.
    syn_at: Vec<(usize, usize)>,
    v1_max_fresh: usize,
    v1_max_month: usize,
}

/// Evaluates the digest model for both name styles.
fn digest_limits(heartbeat_per_s: f64) -> Vec<DigestLimit> {
    [Names::Numbered, Names::Uuid]
        .into_iter()
        .map(|names| {
            let sample = &synthetic_entries(1, names, Age::Month, heartbeat_per_s)[0].0;
            let v0_entry = v0_entry_len(sample);
            // V0 digest: a u16 count, then the entries, under the same SynAck bound.
            let v0_max = (MAX_SYNACK_DIGEST - 2) / v0_entry;
            let syn_at = [1000, 2000, 5000]
                .into_iter()
                .map(|m| {
                    let len = syn_len(&synthetic_entries(m, names, Age::Month, heartbeat_per_s));
                    (m, len)
                })
                .collect();
            DigestLimit {
                names,
                v0_entry,
                v0_max,
                syn_at,
                v1_max_fresh: largest_fitting(names, Age::Fresh, heartbeat_per_s),
                v1_max_month: largest_fitting(names, Age::Month, heartbeat_per_s),
            }
        })
        .collect()
}

/// What happened to a small cluster whose digest outgrows one message.
#[derive(Debug, Clone)]
struct StallResult {
    n: usize,
    name_len: usize,
    /// Members past which, by the model, answering a Syn leaves under 100 bytes for the
    /// delta (chitchat then panics), and past which a Syn no longer fits.
    panic_members: usize,
    syn_members: usize,
    /// Largest live view any node reached (self included), and when.
    peak_view: usize,
    peak_at: Duration,
    /// Gossip loops that panicked, and when the first one did.
    panics: u64,
    first_panic: Option<Duration>,
    /// Gossip loops found dead (ended with an error) when the demo stopped the nodes.
    dead_loops: usize,
    /// Largest live view (other than self) among all nodes at the end.
    live_end: usize,
    observed: Duration,
    send_errors: u64,
    /// Messages delivered per second, whole cluster, over the last quarter of the run.
    msgs_per_s_end: f64,
    max_syn: usize,
}

/// Panics seen by the hook installed during [`stall_demo`].
static PANICS: AtomicU64 = AtomicU64::new(0);

/// Runs 40 nodes whose names are 3 KB of random text, so that the digest passes the limit at
/// around 30 members, and watches what chitchat does.
async fn stall_demo() -> anyhow::Result<StallResult> {
    const N: usize = 40;
    const NAME_TAIL: usize = 3_000;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let interval = Duration::from_millis(500);
    let mut rng = SplitMix(0xdead_beef);
    let names: Vec<String> = (0..N)
        .map(|i| {
            let tail: String = (0..NAME_TAIL)
                .map(|_| ALPHABET[rng.below(ALPHABET.len() as u64) as usize] as char)
                .collect();
            format!("{}-{tail}", sim_name(i))
        })
        .collect();
    let generation = unix_ms();
    let mut ids: Vec<ChitchatId> = names
        .iter()
        .enumerate()
        .map(|(i, name)| ChitchatId::new(name.clone(), generation, sim_addr(i)))
        .collect();
    ids.sort();
    let entries_for = |k: usize| -> Vec<DigestEntry> {
        ids[..k].iter().map(|id| (id.clone(), 100, 0, 4)).collect()
    };
    let panic_members = (1..=N)
        .take_while(|&k| digest_stream_len(&entries_for(k)) <= MAX_SYNACK_DIGEST)
        .count();
    let syn_members = (1..=N)
        .take_while(|&k| syn_len(&entries_for(k)) <= MAX_PAYLOAD)
        .count();

    // chitchat's gossip loop runs in a spawned task; count its panics instead of printing
    // each one with its 3 KB node names.
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        if PANICS.fetch_add(1, Ordering::Relaxed) == 0 {
            eprintln!("gossip_sim: stall demo: first gossip-loop panic: {info}");
        }
    }));
    PANICS.store(0, Ordering::Relaxed);
    let mut first_panic = None;

    let meter = Arc::new(Meter::default());
    let channel = ChannelTransport::with_mtu(MAX_PAYLOAD);
    let transport = MeteredTransport {
        inner: channel.clone(),
        meter: meter.clone(),
    };
    let start = Instant::now();
    let mut nodes = spawn_nodes(&transport, &names, interval, &[]).await?;
    let observe = Duration::from_secs(24);
    let mut peak_view = 0;
    let mut peak_at = Duration::ZERO;
    let mut tail_stats = None;
    while start.elapsed() < observe {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let view = nodes
            .iter()
            .map(|node| node.live.borrow().len())
            .max()
            .unwrap_or(0);
        if view > peak_view {
            peak_view = view;
            peak_at = start.elapsed();
        }
        if first_panic.is_none() && PANICS.load(Ordering::Relaxed) > 0 {
            first_panic = Some(start.elapsed());
        }
        if tail_stats.is_none() && start.elapsed() >= observe * 3 / 4 {
            tail_stats = Some((Instant::now(), channel.statistics()));
        }
    }
    let msgs_per_s_end = match tail_stats {
        Some((at, stats)) => {
            (channel.statistics().num_messages_total - stats.num_messages_total) as f64
                / at.elapsed().as_secs_f64()
        }
        None => 0.0,
    };
    let live_end = nodes
        .iter()
        .map(|node| node.live.borrow().len().saturating_sub(1))
        .max()
        .unwrap_or(0);
    let observed = start.elapsed();
    let dead_loops = stop_all(&mut nodes, "gossip_sim").await;
    std::panic::set_hook(previous_hook);
    Ok(StallResult {
        n: N,
        name_len: names[0].len(),
        panic_members,
        syn_members,
        peak_view,
        peak_at,
        panics: PANICS.load(Ordering::Relaxed),
        first_panic,
        dead_loops,
        live_end,
        observed,
        send_errors: meter.send_errors.load(Ordering::Relaxed),
        msgs_per_s_end,
        max_syn: meter.max_syn.load(Ordering::Relaxed),
    })
}

/// User plus system CPU time of this process, from `/proc/self/stat`.
fn cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unexpected /proc/self/stat format")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |index: usize| -> anyhow::Result<f64> {
        fields
            .get(index)
            .context("short /proc/self/stat")?
            .parse::<f64>()
            .context("non-numeric CPU time in /proc/self/stat")
    };
    // `rest` starts at field 3 (state), so field k is at index k - 3.
    let total = ticks(14 - 3)? + ticks(15 - 3)?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(total / if hz > 0 { hz as f64 } else { 100.0 })
}

/// Current and peak resident set size in MiB, from `/proc/self/status`.
fn rss_mib() -> anyhow::Result<(f64, f64)> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// The machine the numbers come from.
struct Machine {
    cpu: String,
    cores: usize,
    mem_gib: f64,
    rustc: String,
    kernel: String,
    /// UTC date of the run.
    date: String,
}

impl Machine {
    fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name"))
            .and_then(|v| v.split_once(':'))
            .map_or_else(|| "unknown CPU".to_string(), |(_, v)| v.trim().to_string());
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_gib = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
        let rustc = command_output("rustc", &["--version"]);
        let kernel = command_output("uname", &["-r"]);
        let date = command_output("date", &["-u", "+%Y-%m-%d"]);
        Machine {
            cpu,
            cores,
            mem_gib,
            rustc,
            kernel,
            date,
        }
    }

    fn summary(&self) -> String {
        format!(
            "{}, {} cores, {:.1} GiB RAM, Linux {}, {}",
            self.cpu, self.cores, self.mem_gib, self.kernel, self.rustc
        )
    }
}

/// First line of a command's output, or `unknown`.
fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".to_string())
}

/// `1.23 s (2.5 rounds)`, or why there is no number.
fn fmt_reached(at: Option<Duration>, reached: &Reached, interval: Duration) -> String {
    match at {
        Some(t) => format!(
            "{:.2} s ({:.1} r)",
            t.as_secs_f64(),
            t.as_secs_f64() / interval.as_secs_f64()
        ),
        None => format!(
            "not reached ({}/{} after {:.0} s)",
            reached.done,
            reached.of,
            reached.waited.as_secs_f64()
        ),
    }
}

/// The whole section: machine, tables and what they mean.
fn render(
    machine: &Machine,
    results: &[SimResult],
    skipped: &[String],
    limits: &[DigestLimit],
    stall: &StallResult,
    heartbeat_per_s: f64,
    elapsed: Duration,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## {HEADING}\n");
    let _ = writeln!(
        s,
        "Command: `cargo bench -p weft-tests --bench gossip_sim` (`tests/bench/gossip_sim.rs`). \
         Measured {} on: {}; the whole run took {:.0} s.\n",
        machine.date,
        machine.summary(),
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        s,
        "N real chitchat 0.13 nodes run in one process on chitchat's in-memory \
         `ChannelTransport` (MTU 65,507 bytes) with the agent's settings: gossip every 500 ms, \
         `ProtocolVersion::V1`, `initial_interval` = gossip interval, phi threshold 8, one-hour \
         dead grace, 3 seed nodes, four agent-like keys per node, started at random moments \
         within one interval. Simulating a pool costs one machine the CPU of all its members, \
         which grows as N² ({}), so the pools run on a **simulated clock** (tokio's paused clock, one thread): \
         time stands still while any node has work and jumps to the next timer when all are \
         idle. Handling a message thus takes no simulated time, as on an idle host with a fast \
         network, and the times below are the protocol's own at 500 ms. The rows marked \
         \"real time\" run the same pool on the wall clock (two threads) as a check of that \
         method. Times are from the first spawn (convergence) and from the `set` and the \
         shutdown, done together (propagation, detection); \"r\" is gossip rounds. Propagation \
         is sampled every 10 ms (20 ms at N > 300) in each node's chitchat state, liveness from \
         each node's live-nodes watcher.\n",
        results
            .iter()
            .filter(|r| r.clock == Clock::Simulated)
            .max_by_key(|r| r.n)
            .map_or(String::new(), |r| format!(
                "at {} nodes, about {:.0} s of CPU per {} ms round, see the CPU column",
                r.n,
                r.cpu_ms_per_node_round * r.n as f64 / 1000.0,
                r.interval.as_millis()
            ))
    );

    let label = |r: &SimResult| match r.clock {
        Clock::Simulated => r.n.to_string(),
        Clock::Real => format!("{} (real time)", r.n),
    };
    let _ = writeln!(
        s,
        "| N | converged 99 % | converged 100 % | key seen 99 % | key seen 100 % | dead 99 % | dead 100 % |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for r in results {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            label(r),
            fmt_reached(r.converge.p99, &r.converge, r.interval),
            fmt_reached(r.converge.p100, &r.converge, r.interval),
            fmt_reached(r.propagate.p99, &r.propagate, r.interval),
            fmt_reached(r.propagate.p100, &r.propagate, r.interval),
            fmt_reached(r.detect.p99, &r.detect, r.interval),
            fmt_reached(r.detect.p100, &r.detect, r.interval),
        );
    }
    let _ = writeln!(s);
    for why in skipped {
        let _ = writeln!(s, "Not measured: {why}.\n");
    }
    if let Some(r) = results.iter().find(|r| r.interval != AGENT_INTERVAL) {
        let _ = writeln!(
            s,
            "This run used a {} ms gossip interval (`WEFT_SIM_INTERVAL_MS`), not the agent's \
             500 ms.\n",
            r.interval.as_millis()
        );
    }

    let _ = writeln!(
        s,
        "Steady state, over {:.0} rounds after convergence (all nodes alive). Bytes and messages \
         are per member per second as counted by `ChannelTransport::statistics` (chitchat \
         messages, before any sealing). CPU is the process's user + system time over the window \
         divided by members and rounds: every message is serialized, compressed, decompressed \
         and parsed once in this process, as it would be once on each of two hosts, so it is \
         what one member spends on gossip. \"Full view\" is the lowest share of members, \
         sampled every 50 ms in the window, whose live set held all N (below 100 % means false \
         deaths). \"Memory per member\" is the RSS this size added divided by N, since every \
         member holds the whole pool's state and failure-detector samples. Failed sends are \
         messages over the MTU; crashed loops are gossip tasks that ended with an error.\n",
        results
            .iter()
            .find(|r| r.clock == Clock::Simulated)
            .or(results.first())
            .map_or(0.0, |r| r.window.as_secs_f64() / r.interval.as_secs_f64())
    );
    let _ = writeln!(
        s,
        "| N | bytes/member/s | msgs/member/s | CPU per member per round | CPU per member at 500 ms | full view | memory per member | RSS / peak (MiB) | largest Syn / SynAck / Ack (B) | failed sends / crashed loops |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.1} | {:.2} ms | {:.2} % of a core | {:.0} % | {:.1} MiB | {:.0} / {:.0} | {} / {} / {} | {} / {} |",
            label(r),
            r.bytes_per_node_s,
            r.msgs_per_node_s,
            r.cpu_ms_per_node_round,
            r.cpu_ms_per_node_round / 500.0 * 100.0,
            r.min_full_view * 100.0,
            r.mib_per_member,
            r.rss_mib,
            r.hwm_mib,
            r.max_syn,
            r.max_synack,
            r.max_ack,
            r.send_errors,
            r.crashed_loops,
        );
    }
    let _ = writeln!(s);

    let _ = writeln!(
        s,
        "**Digest size.** Every Syn and SynAck carries the sender's full digest (one entry per \
         known node: id, generation, address, heartbeat, two versions); only the delta is cut to \
         fit. The model below mirrors chitchat's V1 encoding (entries serialized with chitchat's \
         own `Serializable`, 16 KiB blocks, each zstd-compressed at the default level). Checked \
         against the simulation — node 0's last Syn vs. the model of node 0's state at the same \
         moment:\n"
    );
    let _ = writeln!(s, "| N | measured Syn (B) | model (B) | difference |");
    let _ = writeln!(s, "|---|---|---|---|");
    for r in results {
        let diff = r.model_syn as f64 / r.probe_syn.max(1) as f64 - 1.0;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:+.1} % |",
            label(r),
            r.probe_syn,
            r.model_syn,
            diff * 100.0
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Then evaluated for larger pools. \"Fresh\" is like the simulation (all started a minute \
         ago, sequential addresses); \"month-old\" is the realistic steady state and the binding \
         one: up to 30 days of uptime (generation and heartbeat at the measured {heartbeat_per_s:.0} \
         heartbeats per second), addresses scattered over 10/8, up to 1000 key versions. \
         \"Max nodes\" is the largest pool whose members can still answer a Syn: a SynAck carries \
         the responder's digest plus at least 100 bytes of delta, so the digest must stay under \
         {MAX_SYNACK_DIGEST} bytes, which binds a few members before the Syn's own 65,507 bytes \
         (see below for what happens past it).\n"
    );
    let _ = writeln!(
        s,
        "| node names | V0 entry | V0 max nodes | V1 Syn, month-old: 1000 / 2000 / 5000 nodes | V1 max nodes, fresh | V1 max nodes, month-old |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for l in limits {
        let syn_at = l
            .syn_at
            .iter()
            .map(|(_, len)| format!("{len} B"))
            .collect::<Vec<_>>()
            .join(" / ");
        let _ = writeln!(
            s,
            "| {} | {} B | {} | {} | {} | {} |",
            l.names.label(),
            l.v0_entry,
            l.v0_max,
            syn_at,
            l.v1_max_fresh,
            l.v1_max_month
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "**Past the limit** (measured): {n} nodes whose names are {len} characters of random \
         text, so that by the model a member's SynAck has too little room left once it knows \
         {panic_members} members, and its Syn stops fitting at {syn_members}. In {obs:.0} s of simulated time at \
         500 ms: the largest live view reached was {peak} (self included, at {peak_at:.1} s); \
         {panics} gossip loops panicked{first}; {dead_loops} of {n} loops were dead when the run \
         ended; {send_errors} Syns could not be sent (over the MTU) and the largest that went out \
         was {max_syn} B; at the end the best view \
         held {live_end} other live members and the whole pool exchanged {msgs:.0} messages/s. \
         So chitchat 0.13 does not degrade gracefully at the limit. Answering a Syn, a member \
         gives the SynAck's delta `65,507 - 4 - digest` bytes and asserts that this is at least \
         100 (`DeltaSerializer::with_mtu`): a member whose own digest passes {max_digest} bytes \
         panics its gossip task the first time it answers a Syn. The task never restarts while \
         the process keeps running: the member is silently out of the pool, its own view \
         frozen, and its peers declare it dead. A member whose Syn passes 65,507 bytes logs \
         the failed send and stays silent. The pool does not settle at the limit; it breaks \
         into members that are gone and survivors with partial views.\n",
        n = stall.n,
        len = stall.name_len,
        panic_members = stall.panic_members,
        syn_members = stall.syn_members,
        obs = stall.observed.as_secs_f64(),
        peak = stall.peak_view,
        peak_at = stall.peak_at.as_secs_f64(),
        panics = stall.panics,
        first = stall.first_panic.map_or(String::new(), |t| format!(
            ", the first by {:.1} s (`assertion failed: mtu >= 100`)",
            t.as_secs_f64()
        )),
        dead_loops = stall.dead_loops,
        send_errors = stall.send_errors,
        live_end = stall.live_end,
        msgs = stall.msgs_per_s_end,
        max_digest = MAX_SYNACK_DIGEST,
        max_syn = stall.max_syn,
    );

    let numbered = limits.iter().find(|l| matches!(l.names, Names::Numbered));
    let uuid = limits.iter().find(|l| matches!(l.names, Names::Uuid));
    let (num_max, uuid_max) = (
        numbered.map_or(0, |l| l.v1_max_month),
        uuid.map_or(0, |l| l.v1_max_month),
    );
    let largest = results
        .iter()
        .filter(|r| r.clock == Clock::Simulated)
        .max_by_key(|r| r.n);
    let _ = writeln!(
        s,
        "**What this means for operators.** {}The hard ceiling of one gossip pool is the \
         digest: a member's whole digest must fit in one 65,507-byte chitchat message with room \
         for a delta, which with V1 compression is about {num_max} members named like \
         `node-0001` and about {uuid_max} with UUID names (month-old pool; uncompressed V0 would \
         stop near {} and {}). Past it chitchat does not degrade, it breaks (above). Members \
         counted are every node a peer still knows: live ones, plus dead or restarted ones until \
         half of `gossip.dead_grace` has passed (30 min by default; a restart is a new \
         generation, so a rolling restart of the whole fleet within that time counts every node \
         twice). Plan for at most half the ceiling: about {} members with short names, {} with \
         UUIDs. Weft's sealed transport splits a message into frames of `gossip.max_datagram` \
         bytes, which keeps IP fragmentation off the wire, but it carries at most one \
         65,507-byte chitchat message, so it does not raise the ceiling; V1 compression is what \
         raises it ({:.1}x over V0 for short names). CPU, traffic and memory are the other \
         costs: each member compresses its whole digest for every Syn and SynAck and holds \
         every peer's state and an 8 KB sample window per peer, so a member's CPU, bytes and \
         memory all grow linearly with the pool, as the table shows, and stay modest at the sizes \
         measured here. \
         For a larger fleet, run several pools (for example one per zone or cluster), or raise \
         `gossip.interval`, which divides CPU and \
         bytes but lengthens propagation and detection in proportion (the \"r\" figures), and \
         past about 2 s also needs chitchat's `max_interval` (10 s, which the agent leaves at \
         its default) raised, since the failure detector drops heartbeat gaps longer than \
         that.\n",
        largest.map_or(String::new(), |r| format!(
            "At {} members, a member spends about {:.1} ms of CPU per gossip round ({:.1} % of \
             a core at 500 ms), sends about {:.0} kB/s of gossip and holds about {:.0} MiB; a \
             new key reaches 99 % of members in {} and a stopped member is dead for 99 % of \
             them after {}. ",
            r.n,
            r.cpu_ms_per_node_round,
            r.cpu_ms_per_node_round / 500.0 * 100.0,
            r.bytes_per_node_s / 1000.0,
            r.mib_per_member,
            fmt_reached(r.propagate.p99, &r.propagate, r.interval),
            fmt_reached(r.detect.p99, &r.detect, r.interval),
        )),
        numbered.map_or(0, |l| l.v0_max),
        uuid.map_or(0, |l| l.v0_max),
        num_max / 2,
        uuid_max / 2,
        num_max as f64 / numbered.map_or(1, |l| l.v0_max.max(1)) as f64,
    );
    s
}

/// Draws convergence, propagation and detection times against pool size (simulated clock)
/// into `img/gossip-scale.png` of the docs folder; returns the markdown that shows it.
fn render_chart(results: &[SimResult]) -> anyhow::Result<String> {
    let simulated: Vec<&SimResult> = results
        .iter()
        .filter(|r| matches!(r.clock, Clock::Simulated))
        .collect();
    let line = |name: &str, time: fn(&SimResult) -> Option<Duration>| LineSeries {
        name: name.to_string(),
        points: simulated
            .iter()
            .filter_map(|r| Some((r.n as f64, time(r)?.as_secs_f64())))
            .collect(),
    };
    let mut chart = LineChart {
        title: "One gossip pool, 500 ms interval (simulated clock)".into(),
        x_label: "members".into(),
        y_label: "seconds".into(),
        log_x: true,
        series: vec![
            line("startup: every member sees all", |r| r.converge.p100),
            line("a new key reaches 99 %", |r| r.propagate.p99),
            line("a stopped member is dropped by 99 %", |r| r.detect.p99),
        ],
    };
    // A bound that was hit leaves no time to draw; the tables say so.
    chart.series.retain(|s| !s.points.is_empty());
    if chart.series.is_empty() {
        return Ok(String::new());
    }
    let file = "gossip-scale.png";
    chart.render_png(&bench_report::charts_dir().join(file))?;
    Ok(format!("\n![{}](img/{file})\n", chart.title))
}
