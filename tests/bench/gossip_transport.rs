//! Benchmark: what sealing gossip costs, measured against stock chitchat UDP in the same run.
//!
//! Two parts:
//! 1. the frame codec alone: seal and open per message size;
//! 2. a 10-node chitchat cluster on 127.0.0.1, run with stock `UdpTransport` and with Weft's
//!    `SealedTransport`, interleaved three times: convergence time, messages and bytes per
//!    second (both transports wrapped in the same counting socket), and process CPU per
//!    message.
//!
//! Run: `cargo bench -p weft-tests --bench gossip_transport`. It prints a markdown table and
//! writes it into `docs/benchmarks.md` (section "Gossip transport").

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpTransport};
use chitchat::{
    ChitchatConfig, ChitchatEnvelope, ChitchatHandle, ChitchatId, FailureDetectorConfig,
    ProtocolVersion, spawn_chitchat,
};
use weft_discovery::transport::frame;
use weft_discovery::{GossipKey, GossipMetrics, Keyring, SealConfig, SealedTransport};
use weft_tests::bench_report;

const NODES: usize = 10;
const KEYS_PER_NODE: usize = 50;
const INTERVAL: Duration = Duration::from_millis(100);
const STEADY: Duration = Duration::from_secs(8);
const ROUNDS: usize = 3;

fn main() -> anyhow::Result<()> {
    let mut report = String::new();
    report.push_str(&codec_section());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    report.push_str(&runtime.block_on(cluster_section())?);
    print!("{report}");
    bench_report::write_section(
        "benchmarks.md",
        "Gossip transport: sealed vs stock chitchat UDP",
        "cargo bench -p weft-tests --bench gossip_transport",
        &report,
    )?;
    Ok(())
}

/// Median of `samples` (sorted in place).
fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

fn codec_section() -> String {
    let keyring = Keyring::single(GossipKey::generate());
    let three = Keyring::new(vec![
        GossipKey::generate(),
        GossipKey::generate(),
        GossipKey::generate(),
    ])
    .expect("three distinct keys");
    let mut out = String::from(
        "### Frame codec (one core)\n\n| message | seal | open | refuse (1 key) | refuse (3 keys) |\n|---|---|---|---|---|\n",
    );
    for size in [200usize, 1_400, 65_000] {
        let plaintext: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        let iterations = if size > 10_000 { 300 } else { 5_000 };
        let now = frame::unix_ms(std::time::SystemTime::now());
        let per_op = |f: &mut dyn FnMut()| {
            let mut batches: Vec<f64> = (0..5)
                .map(|_| {
                    let started = Instant::now();
                    for _ in 0..iterations {
                        f();
                    }
                    started.elapsed().as_secs_f64() * 1e6 / iterations as f64
                })
                .collect();
            median(&mut batches)
        };
        let sealed = frame::seal(&keyring, 1, now, &plaintext, frame::MAX_DATAGRAM).expect("seal");
        let seal_us = per_op(&mut || {
            std::hint::black_box(
                frame::seal(&keyring, 1, now, &plaintext, frame::MAX_DATAGRAM).expect("seal"),
            );
        });
        let open_us = per_op(&mut || {
            for f in &sealed {
                std::hint::black_box(
                    frame::open(&keyring, f, now, Duration::from_secs(60)).expect("open"),
                );
            }
        });
        let foreign = Keyring::single(GossipKey::generate());
        let refuse1 = per_op(&mut || {
            std::hint::black_box(
                frame::open(&foreign, &sealed[0], now, Duration::from_secs(60)).is_err(),
            );
        });
        let refuse3 = per_op(&mut || {
            std::hint::black_box(
                frame::open(&three, &sealed[0], now, Duration::from_secs(60)).is_err(),
            );
        });
        out.push_str(&format!(
            "| {size} B ({} frame{}) | {seal_us:.1} µs | {open_us:.1} µs | {refuse1:.1} µs | {refuse3:.1} µs |\n",
            sealed.len(),
            if sealed.len() == 1 { "" } else { "s" }
        ));
    }
    out.push('\n');
    out
}

/// Counts what chitchat hands to a transport's socket, identically for both transports.
#[derive(Default)]
struct Counters {
    messages: AtomicU64,
    bytes: AtomicU64,
}

struct Counting<T> {
    inner: T,
    counters: Arc<Counters>,
}

struct CountingSocket {
    inner: Box<dyn Socket>,
    counters: Arc<Counters>,
}

#[async_trait]
impl<T: Transport> Transport for Counting<T> {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        Ok(Box::new(CountingSocket {
            inner: self.inner.open(listen_addr).await?,
            counters: self.counters.clone(),
        }))
    }
}

#[async_trait]
impl Socket for CountingSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.inner.local_addr()
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        let outcome = self.inner.send(to, envelope).await?;
        self.counters.messages.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes
            .fetch_add(outcome.num_bytes_sent as u64, Ordering::Relaxed);
        Ok(outcome)
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        self.inner.recv().await
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Stock,
    Sealed,
}

/// A table row: label, how to read the figure from a run, unit.
type Row<'a> = (&'a str, &'a dyn Fn(&RunResult) -> f64, &'a str);

/// One run's figures.
struct RunResult {
    converge_ms: f64,
    messages_per_s: f64,
    plaintext_bytes_per_s: f64,
    wire_bytes_per_s: Option<f64>,
    cpu_us_per_message: f64,
}

fn cpu_time() -> Duration {
    // SAFETY: getrusage with a valid pointer to a zeroed struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

async fn run_cluster(kind: Kind) -> anyhow::Result<RunResult> {
    let counters = Arc::new(Counters::default());
    let keyring = Keyring::single(GossipKey::generate()).into_shared();
    let metrics = GossipMetrics::unregistered();
    let ports: Vec<u16> = (0..NODES).map(|_| free_udp_port()).collect();
    let seed = format!("127.0.0.1:{}", ports[0]);
    let started = Instant::now();
    let mut handles: Vec<ChitchatHandle> = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let addr: SocketAddr = ([127, 0, 0, 1], *port).into();
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new(format!("node-{i:02}"), 1, addr),
            cluster_id: "bench".into(),
            gossip_interval: INTERVAL,
            listen_addr: addr,
            seed_nodes: vec![seed.clone()],
            failure_detector_config: FailureDetectorConfig {
                initial_interval: INTERVAL,
                ..Default::default()
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V1,
        };
        let values: Vec<(String, String)> = (0..KEYS_PER_NODE)
            .map(|k| (format!("svc:default/s{k:02}"), format!("{{\"port\":{},\"protocol\":\"http\",\"health\":\"passing\",\"weight\":1,\"pad\":\"{}\"}}", 8000 + k, "x".repeat(40))))
            .collect();
        let handle = match kind {
            Kind::Stock => {
                spawn_chitchat(
                    config,
                    values,
                    &Counting {
                        inner: UdpTransport,
                        counters: counters.clone(),
                    },
                )
                .await?
            }
            Kind::Sealed => {
                let sealed =
                    SealedTransport::new(keyring.clone(), metrics.clone(), SealConfig::default());
                spawn_chitchat(
                    config,
                    values,
                    &Counting {
                        inner: sealed,
                        counters: counters.clone(),
                    },
                )
                .await?
            }
        };
        handles.push(handle);
    }
    // Converged: every node sees every node live with all its key-values.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut done = true;
        for handle in &handles {
            let complete = handle
                .with_chitchat(|c| {
                    c.live_nodes().count() == NODES
                        && c.node_states()
                            .values()
                            .all(|s| s.key_values().count() == KEYS_PER_NODE)
                })
                .await;
            done &= complete;
        }
        if done {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{kind:?} cluster did not converge in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let converge_ms = started.elapsed().as_secs_f64() * 1e3;

    let messages_before = counters.messages.load(Ordering::Relaxed);
    let bytes_before = counters.bytes.load(Ordering::Relaxed);
    let wire_before = wire_bytes(&metrics);
    let cpu_before = cpu_time();
    tokio::time::sleep(STEADY).await;
    let cpu = cpu_time() - cpu_before;
    let messages = counters.messages.load(Ordering::Relaxed) - messages_before;
    let bytes = counters.bytes.load(Ordering::Relaxed) - bytes_before;
    let wire = wire_bytes(&metrics) - wire_before;
    for handle in handles {
        handle.shutdown().await?;
    }
    let secs = STEADY.as_secs_f64();
    Ok(RunResult {
        converge_ms,
        messages_per_s: messages as f64 / secs,
        plaintext_bytes_per_s: bytes as f64 / secs,
        wire_bytes_per_s: (kind == Kind::Sealed).then(|| wire / secs),
        cpu_us_per_message: cpu.as_secs_f64() * 1e6 / messages.max(1) as f64,
    })
}

/// Sealed bytes sent, from the transport's own metric.
fn wire_bytes(metrics: &GossipMetrics) -> f64 {
    metrics.bytes_out() as f64
}

async fn cluster_section() -> anyhow::Result<String> {
    let mut results: BTreeMap<Kind, Vec<RunResult>> = BTreeMap::new();
    for round in 0..ROUNDS {
        for kind in [Kind::Stock, Kind::Sealed] {
            let result = run_cluster(kind).await?;
            eprintln!(
                "round {round} {kind:?}: converged {:.0} ms, {:.0} msg/s, {:.1} µs CPU/msg",
                result.converge_ms, result.messages_per_s, result.cpu_us_per_message
            );
            results.entry(kind).or_default().push(result);
        }
    }
    let med = |kind: Kind, f: &dyn Fn(&RunResult) -> f64| {
        let mut v: Vec<f64> = results[&kind].iter().map(f).collect();
        median(&mut v)
    };
    let spread = |kind: Kind, f: &dyn Fn(&RunResult) -> f64| {
        let v: Vec<f64> = results[&kind].iter().map(f).collect();
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        format!("{lo:.1}–{hi:.1}")
    };
    let mut out = format!(
        "### {NODES}-node cluster on loopback ({} ms gossip interval, {KEYS_PER_NODE} key-values per node, {} s steady state, median of {ROUNDS} interleaved rounds)\n\n\
         | figure | stock chitchat UDP (baseline) | Weft sealed | ratio |\n|---|---|---|---|\n",
        INTERVAL.as_millis(),
        STEADY.as_secs()
    );
    let rows: [Row; 4] = [
        (
            "convergence (all nodes, all key-values)",
            &|r| r.converge_ms,
            "ms",
        ),
        (
            "messages per second (whole cluster)",
            &|r| r.messages_per_s,
            "/s",
        ),
        (
            "plaintext bytes per node per second",
            &|r| r.plaintext_bytes_per_s / NODES as f64,
            "B/s",
        ),
        (
            "process CPU per gossip message",
            &|r| r.cpu_us_per_message,
            "µs",
        ),
    ];
    for (name, f, unit) in rows {
        let (stock, sealed) = (med(Kind::Stock, f), med(Kind::Sealed, f));
        out.push_str(&format!(
            "| {name} | {stock:.1} {unit} (range {}) | {sealed:.1} {unit} (range {}) | {:.2}× |\n",
            spread(Kind::Stock, f),
            spread(Kind::Sealed, f),
            sealed / stock
        ));
    }
    let wire = med(Kind::Sealed, &|r| r.wire_bytes_per_s.unwrap_or(0.0)) / NODES as f64;
    out.push_str(&format!(
        "| sealed bytes on the wire per node per second | – | {wire:.0} B/s | – |\n\n"
    ));
    Ok(out)
}
