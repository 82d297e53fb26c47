//! Benchmark: how many SVIDs one CA host signs, each figure against a baseline from the same run.
//!
//! Two parts:
//! 1. One core, no network: `CertificateAuthority::issue` from a ready CSR (CSR parse, CSR
//!    signature check, certificate build, ECDSA P-256 signature) and `issue_local` (key
//!    generation + issue), against raw ring ECDSA P-256 SHA-256 signatures, the floor of the
//!    signing cost. Three interleaved rounds of a fixed time each, on the main thread; per-op
//!    cost is that thread's CPU time divided by operations.
//! 2. 1,000 identities asking ONE CA host for a service SVID over QUIC on loopback, each over
//!    its own connection as agents do (`CaClient` connects per request), 32 in flight. The
//!    baseline is the same 1,000 connections (QUIC + mutual TLS with the node SVIDs) asking for
//!    a service outside their scope, which the CA refuses (`out_of_scope`) before touching the
//!    CSR: the difference is the issuing work. The CA host runs on its own tokio runtime, so
//!    its threads' CPU time is measured apart from the clients' (which share the machine).
//!
//! Every loop is bounded in operations and in time. Run:
//! `cargo bench -p weft-tests --bench ca_issuance`. It prints a markdown report and writes it
//! into `docs/benchmarks.md` (section "CA issuance").

use std::hint::black_box;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, anyhow, bail};
use arc_swap::ArcSwap;
use prometheus::Registry;
use rcgen::{CertificateParams, KeyPair, SanType};
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _,
    UnparsedPublicKey,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use weft_ca::client::{CaClient, CaClientError, ca_server_id};
use weft_ca::protocol::{CaRequest, encode_der};
use weft_ca::server::{CaMetrics, CaServer, RedeemedTokens};
use weft_ca::tls::{
    ALPN_CA, AlpnCertResolver, OptionalSvidClientVerifier, SharedBundle, certified_key,
    quic_server_config,
};
use weft_ca::{CertificateAuthority, NodeScope, SpiffeId, TrustDomain, Usage, pki, verify_svid};
use weft_tests::bench_report;

const ROUNDS: usize = 3;
/// Length of one round of the main single-core loops (ring sign, issue, issue_local).
const ROUND_TIME: Duration = Duration::from_secs(2);
/// Length of one round of the breakdown loops (ring verify, CSR check).
const SHORT_ROUND_TIME: Duration = Duration::from_secs(1);
/// Upper bound on operations in one round, whatever the speed.
const MAX_OPS_PER_ROUND: u64 = 2_000_000;
/// The issue's goal for one core.
const GOAL_PER_CORE: f64 = 2_000.0;
const IDENTITIES: usize = 1_000;
const IN_FLIGHT: usize = 32;
/// After this long a fleet round stops starting requests (each is bounded by the client's
/// own 5 s timeout).
const FLEET_ROUND_BOUND: Duration = Duration::from_secs(40);
const WARMUP_REQUESTS: usize = 64;
const SERVICE_TTL: Duration = Duration::from_secs(3600);
/// Receive buffer asked for by the second, bench-only CA host (the kernel caps it at
/// `net.core.rmem_max` and doubles it for bookkeeping).
const LARGE_RECEIVE_BUFFER: usize = 4 << 20;

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let mut report = format!(
        "Two cores: the single-core part runs on the main thread alone; in the QUIC part the \
         CA host (its own 2-worker tokio runtime) and the 1,000 clients (another 2-worker \
         runtime) share both cores. Load average when the run started: {}.\n\n",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let (one_core, issue_per_core) = one_core_section(&pki)?;
    report.push_str(&one_core);
    report.push_str(&fleet_section(&pki, issue_per_core)?);
    report.push_str(&format!(
        "\nWhole run: {:.0} s.\n",
        started.elapsed().as_secs_f64()
    ));
    print!("{report}");
    bench_report::write_section(
        "benchmarks.md",
        "CA issuance",
        "cargo bench -p weft-tests --bench ca_issuance",
        &report,
    )?;
    Ok(())
}

/// A root, one CA-host intermediate, and the CA loaded from it.
struct Pki {
    trust_domain: TrustDomain,
    bundle: SharedBundle,
    ca: Arc<CertificateAuthority>,
    dir: std::path::PathBuf,
}

impl Pki {
    fn create(dir: &Path) -> anyhow::Result<Pki> {
        let trust_domain = TrustDomain::new("example.org")?;
        let made = pki::init(&trust_domain, "ops", &dir.join("root"))?;
        let bundle: SharedBundle = Arc::new(ArcSwap::from_pointee(made.bundle));
        let out = dir.join("ca-bench");
        pki::intermediate(&trust_domain, &dir.join("root"), "bench", &out)?;
        let ca = CertificateAuthority::load(
            &out.join(pki::CA_CERT),
            &out.join(pki::CA_KEY),
            &bundle.load(),
        )?;
        Ok(Pki {
            trust_domain,
            bundle,
            ca: Arc::new(ca),
            dir: out,
        })
    }

    fn service_id(&self, name: &str) -> anyhow::Result<SpiffeId> {
        Ok(SpiffeId::service(&self.trust_domain, "default", name)?)
    }
}

/// A CSR (DER) for `id` with a fresh P-256 key, as an agent makes it.
fn csr_for(id: &SpiffeId) -> anyhow::Result<(KeyPair, Vec<u8>)> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

fn key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivatePkcs8KeyDer::from(key.serialize_der()).into()
}

// ---------------------------------------------------------------------------------------------
// Part 1: one core.

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    clock_time(libc::CLOCK_THREAD_CPUTIME_ID).unwrap_or_default()
}

fn clock_time(clock: libc::clockid_t) -> Option<Duration> {
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// CPU time of this whole process (clients and CA host together).
fn process_cpu() -> Duration {
    // SAFETY: getrusage with a valid pointer to a zeroed struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// One timed round of one operation.
struct Round {
    ops: u64,
    cpu: Duration,
    wall: Duration,
}

impl Round {
    fn cpu_us_per_op(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.ops as f64
    }

    fn on_cpu_share(&self) -> f64 {
        self.cpu.as_secs_f64() / self.wall.as_secs_f64()
    }
}

/// Runs `op` on this thread until `window` has passed or [`MAX_OPS_PER_ROUND`] were done.
fn timed_round(window: Duration, op: &mut dyn FnMut()) -> Round {
    let cpu_start = thread_cpu();
    let start = Instant::now();
    let mut ops = 0;
    while ops < MAX_OPS_PER_ROUND && start.elapsed() < window {
        op();
        ops += 1;
    }
    Round {
        ops,
        wall: start.elapsed(),
        cpu: thread_cpu() - cpu_start,
    }
}

/// Median and extremes of `values`.
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(values: impl IntoIterator<Item = f64>) -> Spread {
    let mut values: Vec<f64> = values.into_iter().collect();
    values.sort_by(|a, b| a.total_cmp(b));
    Spread {
        median: values[values.len() / 2],
        min: values[0],
        max: values[values.len() - 1],
    }
}

const RING_SIGN: &str = "ring ECDSA P-256 SHA-256 sign (baseline)";
const CSR_CHECK: &str = "CSR parse + signature check only (rcgen)";
const VERIFY_NODE_SVID: &str = "`verify_svid` of a node SVID chain (client auth)";
const ISSUE: &str = "`issue`: SVID from a CSR";
const ISSUE_LOCAL: &str = "`issue_local`: key generation + SVID";

struct SingleCoreOp {
    label: &'static str,
    window: Duration,
    op: Box<dyn FnMut()>,
    rounds: Vec<Round>,
}

/// The single-core report and the median `issue` rate per core.
fn one_core_section(pki: &Pki) -> anyhow::Result<(String, f64)> {
    eprintln!("part 1: one core, {ROUNDS} rounds");
    let service = pki.service_id("api")?;
    let (_, csr) = csr_for(&service)?;
    // Sanity: what is measured issues a valid SVID for the asked ID.
    let sample = pki.ca.issue(&csr, &service, SERVICE_TTL, None)?;
    let verified = verify_svid(
        &sample.chain,
        &pki.bundle.load(),
        SystemTime::now(),
        Usage::Any,
    )?;
    if verified.id != service {
        bail!("issued {} instead of {service}", verified.id);
    }
    // The ring baseline signs a message the size of an issued leaf (close to its TBS part).
    let message = sample.chain[0].as_ref().to_vec();
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| anyhow!("ring could not generate a P-256 key"))?;
    let ring_key = Arc::new(
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|e| anyhow!("ring refused its own P-256 key: {e}"))?,
    );
    let signature = ring_key
        .sign(&rng, &message)
        .map_err(|_| anyhow!("ring could not sign"))?;
    let public = ring_key.public_key().as_ref().to_vec();
    let node_scope = NodeScope::new(["default/api".to_string()]);
    let (_, node_svid) = pki.ca.issue_local(
        &SpiffeId::node(&pki.trust_domain, "node-0")?,
        Duration::from_secs(86_400),
        Some(&node_scope),
    )?;

    let mut ops = vec![
        SingleCoreOp {
            label: RING_SIGN,
            window: ROUND_TIME,
            op: {
                let (key, rng, message) = (ring_key.clone(), rng.clone(), message.clone());
                Box::new(move || {
                    black_box(key.sign(&rng, black_box(&message)).expect("ring signs"));
                })
            },
            rounds: Vec::new(),
        },
        SingleCoreOp {
            label: "ring ECDSA P-256 SHA-256 verify",
            window: SHORT_ROUND_TIME,
            op: {
                let message = message.clone();
                let signature = signature.as_ref().to_vec();
                Box::new(move || {
                    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &public)
                        .verify(black_box(&message), &signature)
                        .expect("ring verifies its own signature");
                })
            },
            rounds: Vec::new(),
        },
        SingleCoreOp {
            label: CSR_CHECK,
            window: SHORT_ROUND_TIME,
            op: {
                let csr = csr.clone();
                Box::new(move || {
                    black_box(
                        rcgen::CertificateSigningRequestParams::from_der(
                            &CertificateSigningRequestDer::from(black_box(csr.as_slice())),
                        )
                        .expect("the CSR parses"),
                    );
                })
            },
            rounds: Vec::new(),
        },
        SingleCoreOp {
            label: VERIFY_NODE_SVID,
            window: SHORT_ROUND_TIME,
            op: {
                let bundle = pki.bundle.clone();
                let chain = node_svid.chain.clone();
                Box::new(move || {
                    black_box(
                        verify_svid(
                            black_box(&chain),
                            &bundle.load(),
                            SystemTime::now(),
                            Usage::Client,
                        )
                        .expect("the node SVID verifies"),
                    );
                })
            },
            rounds: Vec::new(),
        },
        SingleCoreOp {
            label: ISSUE,
            window: ROUND_TIME,
            op: {
                let (ca, csr, service) = (pki.ca.clone(), csr.clone(), service.clone());
                Box::new(move || {
                    black_box(
                        ca.issue(black_box(&csr), &service, SERVICE_TTL, None)
                            .expect("the CA issues"),
                    );
                })
            },
            rounds: Vec::new(),
        },
        SingleCoreOp {
            label: ISSUE_LOCAL,
            window: ROUND_TIME,
            op: {
                let (ca, service) = (pki.ca.clone(), service.clone());
                Box::new(move || {
                    black_box(
                        ca.issue_local(&service, SERVICE_TTL, None)
                            .expect("the CA issues"),
                    );
                })
            },
            rounds: Vec::new(),
        },
    ];
    // Warm up caches and allocator, then interleave the rounds so drift hits all alike.
    for op in &mut ops {
        timed_round(Duration::from_millis(100), &mut op.op);
    }
    for round in 0..ROUNDS {
        for op in &mut ops {
            let r = timed_round(op.window, &mut op.op);
            eprintln!(
                "  round {}: {:<45} {:>8} ops {:>8.1} µs/op (CPU), on-CPU {:.0} %",
                round + 1,
                op.label,
                r.ops,
                r.cpu_us_per_op(),
                r.on_cpu_share() * 100.0
            );
            op.rounds.push(r);
        }
    }

    let per_op: Vec<Spread> = ops
        .iter()
        .map(|op| spread(op.rounds.iter().map(Round::cpu_us_per_op)))
        .collect();
    let median = |label: &str| -> f64 {
        ops.iter()
            .zip(&per_op)
            .find(|(op, _)| op.label == label)
            .map(|(_, s)| s.median)
            .expect("every label is measured")
    };
    let ring_sign = median(RING_SIGN);
    let mut out = format!(
        "### One core, no network\n\n\
         {ROUNDS} interleaved rounds ({} s each for sign / `issue` / `issue_local`, {} s for the \
         breakdown rows) on one thread; cost per operation is that thread's CPU time divided by \
         operations (median of the rounds, min–max in brackets). Every row's baseline is raw ring \
         ECDSA P-256 SHA-256 signing of a {}-byte message (the size of an issued leaf), measured \
         in the same rounds.\n\n\
         | operation (one core) | per op | per second | baseline: ring sign per op | ratio to baseline | on-CPU share of wall |\n\
         |---|---|---|---|---|---|\n",
        ROUND_TIME.as_secs(),
        SHORT_ROUND_TIME.as_secs(),
        message.len()
    );
    for (op, s) in ops.iter().zip(&per_op) {
        let share = spread(op.rounds.iter().map(Round::on_cpu_share));
        out.push_str(&format!(
            "| {} | {:.1} µs ({:.1}–{:.1}) | {:.0} | {:.1} µs | {:.2}× | {:.0} % (min {:.0} %) |\n",
            op.label,
            s.median,
            s.min,
            s.max,
            1e6 / s.median,
            ring_sign,
            s.median / ring_sign,
            share.median * 100.0,
            share.min * 100.0
        ));
    }
    let issue = &per_op[ops
        .iter()
        .position(|op| op.label == ISSUE)
        .expect("issue is measured")];
    let issue_rate = 1e6 / issue.median;
    let slowest_rate = 1e6 / issue.max;
    let met = if slowest_rate >= GOAL_PER_CORE {
        "**met**"
    } else if issue_rate >= GOAL_PER_CORE {
        "met at the median, not in every round"
    } else {
        "**not met**"
    };
    out.push_str(&format!(
        "\nGoal ≥ {GOAL_PER_CORE:.0} SVIDs/s per core (`issue` from a CSR): {met}: {issue_rate:.0} \
         SVIDs/s at the median, {slowest_rate:.0} in the slowest round ({:.1}× the goal). \
         Of the cost of `issue`, the CSR check (DER parsing plus an ECDSA verify, about three \
         signatures' worth in ring) is {:.0} %, the signature itself {:.0} %, building and \
         encoding the certificate the remaining {:.0} %. `issue_local` skips the CSR check and \
         generates a key instead, so it costs {:.2}× `issue`. `verify_svid` on a node SVID \
         ({:.0} µs) is what the CA host spends checking a client certificate; it does it twice \
         per connection (in the TLS client verifier and again in `peer_svid` when serving), \
         which shows in the next part.\n\n",
        issue_rate / GOAL_PER_CORE,
        median(CSR_CHECK) / issue.median * 100.0,
        ring_sign / issue.median * 100.0,
        (1.0 - (median(CSR_CHECK) + ring_sign) / issue.median) * 100.0,
        median(ISSUE_LOCAL) / issue.median,
        median(VERIFY_NODE_SVID)
    ));
    Ok((out, issue_rate))
}

// ---------------------------------------------------------------------------------------------
// Part 2: 1,000 identities through one CA host over QUIC.

/// CPU clocks of the CA host's runtime threads, registered as each thread starts.
type ThreadClocks = Arc<Mutex<Vec<libc::clockid_t>>>;

fn clocks_cpu(clocks: &ThreadClocks) -> Duration {
    clocks
        .lock()
        .expect("clock list lock is never poisoned")
        .iter()
        .filter_map(|c| clock_time(*c))
        .sum()
}

struct CaHost {
    addr: SocketAddr,
    /// The kernel's receive buffer of its UDP socket, in bytes (as `SO_RCVBUF` reports it).
    receive_buffer: usize,
    _server: Arc<CaServer>,
    _endpoint: quinn::Endpoint,
}

/// Starts a CA host's QUIC endpoint and accept loop; must run inside the CA runtime so every
/// server-side task lands on its threads. The socket is made as `quinn::Endpoint::server`
/// makes it, with its receive buffer set to `receive_buffer` bytes when given.
fn start_ca_host(pki: &Pki, receive_buffer: Option<usize>) -> anyhow::Result<CaHost> {
    let resolver = Arc::new(AlpnCertResolver::default());
    let (key, issued) = pki.ca.issue_local(
        &ca_server_id(&pki.trust_domain, "bench")?,
        Duration::from_secs(3600),
        None,
    )?;
    resolver.set(ALPN_CA, certified_key(issued.chain, key_der(&key))?);
    let config = quic_server_config(
        resolver,
        OptionalSvidClientVerifier::new(pki.bundle.clone()),
        &[ALPN_CA],
    )?;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    if let Some(bytes) = receive_buffer {
        set_receive_buffer(&socket, bytes)?;
    }
    let receive_buffer = receive_buffer_of(&socket)?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    let server = Arc::new(CaServer::new(
        pki.ca.clone(),
        pki.bundle.clone(),
        Duration::from_secs(86_400),
        RedeemedTokens::load(pki.dir.join("redeemed.json")),
        Box::new(|_| false),
        CaMetrics::new(&Registry::new())?,
    ));
    let accept = endpoint.clone();
    let serving = server.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            let server = serving.clone();
            tokio::spawn(async move {
                if let Ok(connection) = incoming.await {
                    server.serve(connection).await;
                }
            });
        }
    });
    Ok(CaHost {
        addr: endpoint.local_addr()?,
        receive_buffer,
        _server: server,
        _endpoint: endpoint,
    })
}

fn set_receive_buffer(socket: &std::net::UdpSocket, bytes: usize) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes)?;
    // SAFETY: setsockopt on an open socket with a pointer to a c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!(
            "setting SO_RCVBUF to {bytes}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn receive_buffer_of(socket: &std::net::UdpSocket) -> anyhow::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt on an open socket into a c_int with its size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        bail!("reading SO_RCVBUF: {}", std::io::Error::last_os_error());
    }
    Ok(usize::try_from(value)?)
}

/// What a fleet round asks for.
#[derive(Clone, Copy, PartialEq)]
enum Ask {
    /// A service SVID in the node's scope: handshake + issue.
    Issue,
    /// A service outside the node's scope: handshake + a refusal before any CSR work.
    Refuse,
}

/// 1,000 nodes, each with its node SVID and the two requests it may send.
struct Fleet {
    /// One client per request in flight, each on its own endpoint (UDP socket), as that many
    /// agents would be.
    clients: Vec<CaClient>,
    client_ports: Vec<u16>,
    nodes: Vec<Arc<CertifiedKey>>,
    issue: Vec<CaRequest>,
    refuse: Vec<CaRequest>,
}

/// The outcome of one fleet round.
struct FleetRun {
    done: usize,
    errors: usize,
    first_error: Option<String>,
    wall: Duration,
    latencies: Vec<Duration>,
    ca_cpu: Duration,
    process_cpu: Duration,
    /// Datagrams the kernel dropped on the CA host's socket (receive buffer full).
    ca_drops: u64,
    /// The same, summed over the clients' sockets.
    client_drops: u64,
}

impl FleetRun {
    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() as f64 * p).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[i - 1].as_secs_f64() * 1e3
    }

    fn per_second(&self) -> f64 {
        self.done as f64 / self.wall.as_secs_f64()
    }

    fn ca_cpu_us_per_request(&self) -> f64 {
        self.ca_cpu.as_secs_f64() * 1e6 / self.done.max(1) as f64
    }

    fn process_cpu_us_per_request(&self) -> f64 {
        self.process_cpu.as_secs_f64() * 1e6 / self.done.max(1) as f64
    }
}

/// Whether one answer is the one `ask` expects.
fn expected(ask: Ask, result: &Result<weft_ca::client::IssuedChain, CaClientError>) -> bool {
    match (ask, result) {
        (Ask::Issue, Ok(issued)) => issued.chain.len() == 2,
        (Ask::Refuse, Err(CaClientError::Refused { reason, .. })) => reason == "out_of_scope",
        _ => false,
    }
}

/// Sends `count` requests of kind `ask` (node `i` sends request `i`), `IN_FLIGHT` at a time,
/// each on its own connection.
async fn fleet_round(
    fleet: &Arc<Fleet>,
    addr: SocketAddr,
    ask: Ask,
    count: usize,
    clocks: &ThreadClocks,
) -> FleetRun {
    let next = Arc::new(AtomicUsize::new(0));
    let ca_drops_start = udp_drops(&[addr.port()]);
    let client_drops_start = udp_drops(&fleet.client_ports);
    let ca_cpu_start = clocks_cpu(clocks);
    let process_cpu_start = process_cpu();
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..IN_FLIGHT.min(count) {
        let (fleet, next) = (fleet.clone(), next.clone());
        workers.spawn(async move {
            let mut latencies = Vec::new();
            let (mut errors, mut first_error) = (0, None);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count || start.elapsed() > FLEET_ROUND_BOUND {
                    break;
                }
                let request = match ask {
                    Ask::Issue => &fleet.issue[i],
                    Ask::Refuse => &fleet.refuse[i],
                };
                let sent = Instant::now();
                let result = fleet.clients[worker]
                    .request(addr, Some(fleet.nodes[i].clone()), request)
                    .await;
                if expected(ask, &result) {
                    latencies.push(sent.elapsed());
                } else {
                    errors += 1;
                    first_error.get_or_insert_with(|| match result {
                        Ok(_) => "an SVID where a refusal was expected".to_string(),
                        Err(e) => e.to_string(),
                    });
                }
            }
            (latencies, errors, first_error)
        });
    }
    let mut run = FleetRun {
        done: 0,
        errors: 0,
        first_error: None,
        wall: Duration::ZERO,
        latencies: Vec::with_capacity(count),
        ca_cpu: Duration::ZERO,
        process_cpu: Duration::ZERO,
        ca_drops: 0,
        client_drops: 0,
    };
    while let Some(joined) = workers.join_next().await {
        let (latencies, errors, first_error) = joined.expect("fleet workers do not panic");
        run.latencies.extend(latencies);
        run.errors += errors;
        if run.first_error.is_none() {
            run.first_error = first_error;
        }
    }
    run.wall = start.elapsed();
    run.ca_cpu = clocks_cpu(clocks) - ca_cpu_start;
    run.process_cpu = process_cpu() - process_cpu_start;
    run.ca_drops = udp_drops(&[addr.port()]).saturating_sub(ca_drops_start);
    run.client_drops = udp_drops(&fleet.client_ports).saturating_sub(client_drops_start);
    run.done = run.latencies.len();
    run.latencies.sort();
    run
}

fn fleet_section(pki: &Pki, issue_per_core: f64) -> anyhow::Result<String> {
    eprintln!("part 2: preparing {IDENTITIES} node SVIDs and CSRs");
    let clocks: ThreadClocks = Arc::new(Mutex::new(Vec::new()));
    let registering = clocks.clone();
    let ca_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ca-host")
        .on_thread_start(move || {
            let mut clock: libc::clockid_t = 0;
            // SAFETY: asks for the CPU clock of the calling thread into a valid pointer.
            if unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) } == 0 {
                registering
                    .lock()
                    .expect("clock list lock is never poisoned")
                    .push(clock);
            }
        })
        .enable_all()
        .build()?;
    let client_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("agents")
        .enable_all()
        .build()?;
    let hosts = ca_runtime.block_on(async {
        anyhow::Ok([
            start_ca_host(pki, None)?,
            start_ca_host(pki, Some(LARGE_RECEIVE_BUFFER))?,
        ])
    })?;

    let scope = NodeScope::new(["default/api".to_string()]);
    let api = pki.service_id("api")?;
    let mut nodes = Vec::with_capacity(IDENTITIES);
    let mut issue = Vec::with_capacity(IDENTITIES);
    let mut refuse = Vec::with_capacity(IDENTITIES);
    for i in 0..IDENTITIES {
        let node_id = SpiffeId::node(&pki.trust_domain, &format!("node-{i}"))?;
        let (key, svid) =
            pki.ca
                .issue_local(&node_id, Duration::from_secs(86_400), Some(&scope))?;
        nodes.push(certified_key(svid.chain, key_der(&key))?);
        let (_, csr) = csr_for(&api)?;
        let csr = encode_der(&csr);
        issue.push(CaRequest::Service {
            namespace: "default".into(),
            name: "api".into(),
            csr: csr.clone(),
            ttl_secs: SERVICE_TTL.as_secs(),
        });
        // Same CSR bytes on the wire; the CA refuses on scope before reading them.
        refuse.push(CaRequest::Service {
            namespace: "default".into(),
            name: "payments".into(),
            csr,
            ttl_secs: SERVICE_TTL.as_secs(),
        });
    }
    let registered_threads = clocks.lock().expect("never poisoned").len();
    if registered_threads == 0 {
        bail!("no CPU clock of the CA host's threads could be read");
    }

    let load_before = load_average();
    let runs = client_runtime.block_on(async {
        let mut clients = Vec::with_capacity(IN_FLIGHT);
        let mut client_ports = Vec::with_capacity(IN_FLIGHT);
        for _ in 0..IN_FLIGHT {
            let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
            client_ports.push(endpoint.local_addr()?.port());
            clients.push(CaClient::new(endpoint, pki.bundle.clone()));
        }
        let fleet = Arc::new(Fleet {
            clients,
            client_ports,
            nodes,
            issue,
            refuse,
        });
        for host in &hosts {
            // Sanity: an issued chain verifies as the asked service; a refusal is the expected one.
            let issued = fleet.clients[0]
                .request(host.addr, Some(fleet.nodes[0].clone()), &fleet.issue[0])
                .await
                .context("first service SVID over QUIC")?;
            let verified = verify_svid(
                &issued.chain,
                &pki.bundle.load(),
                SystemTime::now(),
                Usage::Any,
            )?;
            if verified.id != api {
                bail!("issued {} instead of {api}", verified.id);
            }
            let refused = fleet.clients[0]
                .request(host.addr, Some(fleet.nodes[0].clone()), &fleet.refuse[0])
                .await;
            if !expected(Ask::Refuse, &refused) {
                bail!("the baseline request was not refused as out_of_scope: {refused:?}");
            }
            for ask in [Ask::Refuse, Ask::Issue] {
                fleet_round(&fleet, host.addr, ask, WARMUP_REQUESTS, &clocks).await;
            }
        }
        // runs[host] holds that host's rounds, refusals and issues interleaved.
        let mut runs: [Vec<(Ask, FleetRun)>; 2] = [Vec::new(), Vec::new()];
        for round in 0..ROUNDS {
            for (h, host) in hosts.iter().enumerate() {
                for ask in [Ask::Refuse, Ask::Issue] {
                    let run = fleet_round(&fleet, host.addr, ask, IDENTITIES, &clocks).await;
                    eprintln!(
                        "  round {} (CA receive buffer {} KiB): {:<6} {}/{IDENTITIES} in {:.2} s, \
                         p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, CA CPU {:.2} s, process CPU \
                         {:.2} s, UDP drops CA {} clients {}, errors {}{}",
                        round + 1,
                        host.receive_buffer / 1024,
                        if ask == Ask::Issue { "issue" } else { "refuse" },
                        run.done,
                        run.wall.as_secs_f64(),
                        run.percentile_ms(0.50),
                        run.percentile_ms(0.99),
                        run.percentile_ms(1.0),
                        run.ca_cpu.as_secs_f64(),
                        run.process_cpu.as_secs_f64(),
                        run.ca_drops,
                        run.client_drops,
                        run.errors,
                        run.first_error
                            .as_ref()
                            .map(|e| format!(" (first: {e})"))
                            .unwrap_or_default()
                    );
                    runs[h].push((ask, run));
                }
            }
        }
        anyhow::Ok(runs)
    })?;
    let load_after = load_average();
    let [as_made, enlarged] = [hosts[0].receive_buffer, hosts[1].receive_buffer];
    drop(hosts);
    client_runtime.shutdown_timeout(Duration::from_secs(1));
    ca_runtime.shutdown_timeout(Duration::from_secs(1));

    let mut out = format!(
        "### {IDENTITIES} identities through one CA host over QUIC (loopback)\n\n\
         {IDENTITIES} nodes, each with a node SVID scoped to `default/api` made up front, each \
         send one `Service` request over its own QUIC connection (mutual TLS with the node SVID, \
         as `CaClient` does), {IN_FLIGHT} in flight from {IN_FLIGHT} client endpoints (one UDP \
         socket each, as that many agents). Figure: asking for `default/api` (handshake + \
         issue). Baseline, same run: asking for `default/payments`, refused `out_of_scope` \
         before the CSR is read (handshake + a refusal). {ROUNDS} interleaved rounds of each; \
         median, min–max in brackets. CA-host CPU is the CPU time of the CA runtime's \
         {registered_threads} threads (endpoint driver, handshakes, request handling); process \
         CPU adds the clients, which run in the same process on the same two cores. One-minute \
         load average {load_before} before this part and {load_after} after it: other work on \
         the machine takes cores from the run, so wall time, requests per second and latency \
         depend on it; CPU per request does not.\n\n\
         CA host with its UDP socket as `quinn::Endpoint::server` makes it (kernel default \
         receive buffer, `SO_RCVBUF` = {} KiB):\n\n",
        as_made / 1024
    );
    out.push_str(&fleet_table(&runs[0]));
    let (ca_i, ca_r) = (
        spread(of(&runs[0], Ask::Issue).map(FleetRun::ca_cpu_us_per_request)),
        spread(of(&runs[0], Ask::Refuse).map(FleetRun::ca_cpu_us_per_request)),
    );
    let drops = |runs: &[(Ask, FleetRun)]| -> u64 { runs.iter().map(|(_, r)| r.ca_drops).sum() };
    let client_drops: u64 = runs.iter().flatten().map(|(_, r)| r.client_drops).sum();
    out.push_str(&format!(
        "\nThe CA-host CPU difference ({:.0} µs per request) is the issuing work as the CA host \
         does it over the wire (CSR base64 decode, `issue`, chain encoding, a larger response); \
         compare with `issue` on one core above. The connection (QUIC + mutual TLS handshake, \
         two client-certificate checks, teardown) is {:.0} % of the CA host's CPU per issued \
         SVID, so one CA core serves about {:.0} renewals per second when each arrives on its \
         own connection, against {:.0} SVIDs per second for `issue` alone.\n\n\
         {}The clients' sockets dropped {client_drops} in the whole part. The same rounds \
         against a second CA host in the same runtime whose socket asks for a {} MiB receive \
         buffer (`SO_RCVBUF` then reports {} KiB, the kernel doubling what was asked; a \
         bench-only variant, not how the CA host is started today):\n\n",
        ca_i.median - ca_r.median,
        ca_r.median / ca_i.median * 100.0,
        1e6 / ca_i.median,
        issue_per_core,
        match drops(&runs[0]) {
            0 => "The CA host's socket dropped no datagrams. ".to_string(),
            dropped => format!(
                "The latency tail is lost datagrams, not CPU: the CA host's socket dropped \
                 {dropped} datagrams over these {} rounds (its receive buffer overflows while \
                 {IN_FLIGHT} handshakes arrive at once), and each loss costs that client a \
                 QUIC retransmission timeout (about 1 s during the handshake, hence the maxima \
                 just over 1 s). ",
                runs[0].len()
            ),
        },
        LARGE_RECEIVE_BUFFER >> 20,
        enlarged / 1024,
    ));
    out.push_str(&fleet_table(&runs[1]));
    out.push_str(&format!(
        "\nCompleted, CA host as made: {}. With the larger buffer: {}.\n",
        completed(&runs[0]),
        completed(&runs[1])
    ));
    Ok(out)
}

/// The runs of `ask` among `runs`.
fn of(runs: &[(Ask, FleetRun)], ask: Ask) -> impl Iterator<Item = &FleetRun> {
    runs.iter().filter(move |(a, _)| *a == ask).map(|(_, r)| r)
}

/// "refuse 1000/1000, issue 1000/1000, ..." with errors named.
fn completed(runs: &[(Ask, FleetRun)]) -> String {
    runs.iter()
        .map(|(a, r)| {
            format!(
                "{} {}/{IDENTITIES}{}",
                if *a == Ask::Issue { "issue" } else { "refuse" },
                r.done,
                if r.errors > 0 {
                    format!(
                        " ({} errors, first: {})",
                        r.errors,
                        r.first_error.as_deref().unwrap_or("?")
                    )
                } else {
                    String::new()
                }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Datagrams dropped so far on the IPv4 UDP sockets bound to `ports` (last column of
/// `/proc/net/udp`).
fn udp_drops(ports: &[u16]) -> u64 {
    let table = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = fields.get(1)?.rsplit(':').next()?;
            let port = u16::from_str_radix(port, 16).ok()?;
            ports
                .contains(&port)
                .then(|| fields.last()?.parse::<u64>().ok())
                .flatten()
        })
        .sum()
}

/// The 1-minute load average, as text.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_string()
}

/// One table: each metric for issued SVIDs against the out-of-scope refusals.
fn fleet_table(runs: &[(Ask, FleetRun)]) -> String {
    let mut out = String::from(
        "| metric | figure: service SVID issued | baseline: refused out_of_scope | ratio | difference |\n\
         |---|---|---|---|---|\n",
    );
    let mut row = |name: &str, unit: &str, decimals: usize, f: &dyn Fn(&FleetRun) -> f64| {
        let i = spread(of(runs, Ask::Issue).map(f));
        let r = spread(of(runs, Ask::Refuse).map(f));
        let ratio = if r.median > 0.0 {
            format!("{:.2}×", i.median / r.median)
        } else {
            "–".to_string()
        };
        out.push_str(&format!(
            "| {name} | {:.d$}{unit} ({:.d$}–{:.d$}) | {:.d$}{unit} ({:.d$}–{:.d$}) | {ratio} | {:+.d$}{unit} |\n",
            i.median,
            i.min,
            i.max,
            r.median,
            r.min,
            r.max,
            i.median - r.median,
            d = decimals
        ));
    };
    row("wall time for the requests", " s", 2, &|r: &FleetRun| {
        r.wall.as_secs_f64()
    });
    row("requests per second", " /s", 0, &FleetRun::per_second);
    row("latency p50", " ms", 1, &|r: &FleetRun| {
        r.percentile_ms(0.50)
    });
    row("latency p99", " ms", 1, &|r: &FleetRun| {
        r.percentile_ms(0.99)
    });
    row("latency max", " ms", 1, &|r: &FleetRun| {
        r.percentile_ms(1.0)
    });
    row(
        "datagrams dropped at the CA host's socket",
        "",
        0,
        &|r: &FleetRun| r.ca_drops as f64,
    );
    row(
        "CA-host CPU per request",
        " µs",
        0,
        &FleetRun::ca_cpu_us_per_request,
    );
    row(
        "CA-host requests per CPU-second (one core's capacity)",
        " /s",
        0,
        &|r: &FleetRun| 1e6 / r.ca_cpu_us_per_request(),
    );
    row(
        "process CPU per request (CA + clients)",
        " µs",
        0,
        &FleetRun::process_cpu_us_per_request,
    );
    row(
        "cores kept busy by the process (process CPU / wall)",
        "",
        2,
        &|r: &FleetRun| r.process_cpu.as_secs_f64() / r.wall.as_secs_f64(),
    );
    out
}
