//! Benchmark: what policy costs (issue 5): the authorization decision per request with 10 and
//! 1,000 TrafficTargets, and how long a new policy version takes to reach a pool of up to
//! 1,000 agents over gossip.
//!
//! 1. **Decision cost.** Policy sets are generated as SMI YAML text (`TrafficTarget`
//!    `access.smi-spec.io/v1alpha3`, `HTTPRouteGroup` and `TCPRoute`
//!    `specs.smi-spec.io/v1alpha4`, a `Mesh` with `default: deny`): one TrafficTarget per
//!    destination, five or six sources each, three destinations in four speaking HTTP (a
//!    TCPRoute plus an HTTPRouteGroup of eight matches: path regexes, methods, a header-only
//!    canary match), the fourth opaque TCP. They are parsed and validated with
//!    `weft::policy::model::PolicySet::parse_files` and compiled with
//!    `weft::policy::engine::Engine::new`, then `Engine::decide` is timed for L4 allow, L4 deny
//!    (source not listed), HTTP allow on the first match, HTTP allow on the last match, HTTP
//!    deny (no route matches), HTTP allow over every destination in turn, and the unpublished
//!    engine as a floor. The baseline, in the same interleaved rounds, is a lookup of the same
//!    `(source, destination)` pair in a `HashMap<(String, String), bool>` holding every pair of
//!    the set: what a naive ACL costs.
//! 2. **Fetch and verify.** The 1,000-target set is the bundle: its YAML, uncompressed as in
//!    the `weft-policy/1` format, signed with ECDSA P-256 (ring). Verifying it (SHA-256 against
//!    the gossiped digest, the signature, parse, validation, compile) and fetching it (and, for
//!    reference, a 50 KiB payload) from another agent over QUIC on loopback (quinn + rustls
//!    with node SVIDs from a real `weft-ca` CA, mutual TLS as between agents) are measured in
//!    this run. The real `weft::policy::bundle` format (base64url JSON envelope, operator
//!    certificate) is not used: it was being written alongside this benchmark.
//! 3. **Convergence.** N real chitchat 0.13 members in one process on the simulated clock, as
//!    in `gossip_sim` (shared helpers in `weft_tests::gossip_sim`). Each member advertises
//!    `policy = <version>:<sha256 hex>`; an agent that sees an alive member advertise a higher
//!    version fetches the bundle from that member, verifies it and advertises the new version
//!    itself. Fetch and verification are modelled as delays taken from part 2: a connection
//!    handshake, the transfer (one at a time per serving member, so a member asked by many
//!    queues them), then verification. All members start converged on version 1; one sets
//!    version 2; measured: time until 50 %, 99 % and 100 % of members advertise it, against the
//!    time until they merely see the publisher's new key (gossip alone), and fetches served
//!    per member.
//!
//! 4. **Revocation** (its own section, "Revocation"): the same machinery carries the
//!    operator's revocation list. A real `weft-revocations/1` list of [`REVOCATION_ENTRIES`]
//!    entries is signed with a real operator credential; opening it (`weft::policy::bundle::open`,
//!    every check) and installing it in a trust bundle are timed, its fetch over loopback QUIC
//!    is measured as in part 2, and the convergence of part 3 is simulated with those delays.
//!    Then 5 real agents (`target/release/weft` on loopback) take alternating rounds of
//!    `weft revoke id …` and, as the baseline, `weft policy apply` of a one-file set: the time
//!    from the command until every agent holds the new version.
//!
//! Environment: `WEFT_BENCH_QUICK=1` (a smoke run: fewer iterations, small pools, nothing
//! written), `WEFT_POLICY_SIZES` (pool sizes, default `100,300,1000`), `WEFT_POLICY_PARTS`
//! (`policy`, `revocation` or both, the default, comma separated), `WEFT_POLICY_DOCS`
//! (`1` writes `docs/benchmarks.md` even with custom sizes or quick, `0` never). Every loop is
//! bounded in iterations and time, every wait in simulated rounds and wall time.
//!
//! Run with `cargo bench -p weft-tests --bench policy`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow, bail};
use chitchat::ChitchatId;
use chitchat::transport::ChannelTransport;
use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue};
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _,
    UnparsedPublicKey,
};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::time::Instant;
use weft::policy::engine::{Decision, DecisionReason, Engine, HttpRequest, Request};
use weft::policy::matcher::HttpMatcher;
use weft::policy::model::PolicySet;
use weft_ca::tls::{
    AlpnCertResolver, OptionalSvidClientVerifier, SharedBundle, SvidServerVerifier, certified_key,
    quic_client_config, quic_server_config,
};
use weft_ca::{CertificateAuthority, SpiffeId, TrustDomain, pki};
use weft_discovery::ServiceKey;
use weft_tests::bench_report;
use weft_tests::gossip_sim::{
    AGENT_INTERVAL, Clock, MAX_PAYLOAD, SEEDS, mem_available_gib, pool_memory_gib, release_memory,
    runtime, sim_name, spawn_nodes, stop_all,
};

/// The trust domain of the generated sets and of the fetch PKI.
const TRUST_DOMAIN: &str = "prod.example.com";
/// Namespaces the generated services are spread over.
const NAMESPACES: [&str; 8] = [
    "payments", "shop", "catalog", "identity", "data", "platform", "search", "media",
];
/// Sizes of the generated sets (TrafficTargets).
const SET_SIZES: [usize; 2] = [10, 1_000];
/// The set size that is the bundle in parts 2 and 3.
const BUNDLE_TARGETS: usize = 1_000;
/// The gossip key an agent advertises its policy under.
const POLICY_KEY: &str = "policy";
/// ALPN of the fetch in the loopback measurement.
const ALPN_POLICY: &[u8] = b"weft-policy-bench/1";
/// The reference payload of the fetch measurement (a small bundle), and how it is asked for.
const SMALL_FETCH: usize = 50 * 1024;
const SMALL_REQUEST: &[u8] = b"GET 50k";
/// Wall-clock bound on each waiting phase of the convergence simulation. A 1,000-member pool
/// costs this machine about 8 s of CPU per simulated gossip round (see "Gossip at scale"), and
/// publishing takes some 30 rounds, so the shared 180 s bound of `gossip_sim` is too short.
const SIM_WALL_BOUND: Duration = Duration::from_secs(1_200);
/// Decisions per timing chunk (the time bound is checked between chunks).
const CHUNK: u64 = 10_000;

/// Knobs that `WEFT_BENCH_QUICK` turns down.
#[derive(Debug, Clone, Copy)]
struct Effort {
    /// Interleaved rounds of each decision case and its baseline.
    decision_rounds: usize,
    /// Decisions per round (fewer only if a round reaches `round_cap`).
    decisions_per_round: u64,
    round_cap: Duration,
    /// Parse/compile and verification repetitions.
    build_rounds: usize,
    /// Fetches of each kind over loopback QUIC.
    fetches: usize,
}

const FULL: Effort = Effort {
    decision_rounds: 7,
    decisions_per_round: 2_000_000,
    round_cap: Duration::from_secs(2),
    build_rounds: 5,
    fetches: 31,
};

const QUICK: Effort = Effort {
    decision_rounds: 3,
    decisions_per_round: 100_000,
    round_cap: Duration::from_millis(300),
    build_rounds: 2,
    fetches: 5,
};

fn main() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let quick = std::env::var_os("WEFT_BENCH_QUICK").is_some();
    let effort = if quick { QUICK } else { FULL };
    let sizes_env = std::env::var("WEFT_POLICY_SIZES").ok();
    let sizes = match sizes_env.as_deref() {
        Some(spec) => parse_sizes(spec)?,
        None if quick => vec![30, 100],
        None => vec![100, 300, 1_000],
    };
    let load = load_average();
    eprintln!(
        "policy: effort {effort:?}, pool sizes {sizes:?}, load average {load}, on {}",
        bench_report::machine()
    );
    let td = TrustDomain::new(TRUST_DOMAIN)?;
    let parts = std::env::var("WEFT_POLICY_PARTS").unwrap_or_else(|_| "policy,revocation".into());
    let write = match std::env::var("WEFT_POLICY_DOCS").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => !quick && sizes_env.is_none(),
    };
    if parts.split(',').any(|p| p == "policy") {
        policy_parts(&td, effort, &sizes, load.clone(), quick, write)?;
    }
    if parts.split(',').any(|p| p == "revocation") {
        revocation_part(effort, &sizes, quick, write)?;
    }
    eprintln!("policy: total {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Parts 1 to 3, written as the "Policy" section.
fn policy_parts(
    td: &TrustDomain,
    effort: Effort,
    sizes: &[usize],
    load: String,
    quick: bool,
    write: bool,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let td = td.clone();

    // Part 1: the sets, their build cost and the decision cost.
    let mut sets = Vec::new();
    for n in SET_SIZES {
        sets.push(GeneratedSet::build(n, &td, effort)?);
    }
    let decisions = decision_rounds(&sets, &td, effort)?;

    // Part 2: the bundle, its verification and its fetch.
    let bundle_set = sets
        .iter()
        .find(|s| s.n == BUNDLE_TARGETS)
        .context("the bundle set is generated")?;
    let bundle = Bundle::sign(&bundle_set.yaml, 2)?;
    let verify = measure_verify(&bundle, &td, effort)?;
    let fetch = measure_fetch(&bundle, effort)?;
    let model = FetchModel {
        handshake: fetch.handshake.median,
        transfer: fetch.established.median,
        verify: verify.total.median,
    };
    eprintln!("policy: fetch model {model:?}");

    // Part 3: convergence over gossip.
    let (pools, skipped) = simulate_pools(sizes, model, &bundle)?;

    let report = render(&Report {
        sets: &sets,
        decisions: &decisions,
        bundle: &bundle,
        verify: &verify,
        fetch: &fetch,
        model,
        pools: &pools,
        skipped: &skipped,
        load,
        quick,
        effort,
        elapsed: started.elapsed(),
    });
    println!("{report}");
    if write {
        bench_report::write_section(
            "benchmarks.md",
            "Policy",
            "cargo bench -p weft-tests --bench policy",
            &report,
        )
        .context("writing the Policy section of docs/benchmarks.md")?;
        eprintln!("policy: wrote docs/benchmarks.md");
    } else {
        eprintln!(
            "policy: quick run or custom sizes, docs/benchmarks.md left alone (WEFT_POLICY_DOCS=1 forces)"
        );
    }
    Ok(())
}

/// Part 3's simulation for each pool size that fits in memory; the sizes skipped, and why.
fn simulate_pools(
    sizes: &[usize],
    model: FetchModel,
    bundle: &Bundle,
) -> anyhow::Result<(Vec<PoolResult>, Vec<String>)> {
    let mut pools = Vec::new();
    let mut skipped = Vec::new();
    for &n in sizes {
        let need = pool_memory_gib(n);
        let available = mem_available_gib();
        if need > available {
            let why =
                format!("N={n} skipped: needs about {need:.1} GiB, {available:.1} GiB available");
            eprintln!("policy: {why}");
            skipped.push(why);
            continue;
        }
        eprintln!("policy: simulating {n} agents");
        let wall = std::time::Instant::now();
        let result =
            runtime(Clock::Simulated)?.block_on(simulate(n, AGENT_INTERVAL, model, bundle))?;
        eprintln!(
            "policy: N={n} done in {:.0} s: {result:?}",
            wall.elapsed().as_secs_f64()
        );
        pools.push(result);
        release_memory();
    }
    Ok((pools, skipped))
}

fn parse_sizes(spec: &str) -> anyhow::Result<Vec<usize>> {
    let sizes = spec
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .context("WEFT_POLICY_SIZES must be comma-separated integers")?;
    if sizes.iter().any(|&n| n < SEEDS + 2) {
        bail!("every size must be at least {}", SEEDS + 2);
    }
    Ok(sizes)
}

// ---------------------------------------------------------------------------------------------
// Timing helpers.

/// CPU time of the calling thread: other processes compiling on the machine do not count.
fn thread_cpu() -> Duration {
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc == 0 {
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    } else {
        Duration::ZERO
    }
}

/// Median and extremes of a few measurements.
#[derive(Debug, Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(values: impl IntoIterator<Item = f64>) -> Spread {
    let mut values: Vec<f64> = values.into_iter().collect();
    values.sort_by(|a, b| a.total_cmp(b));
    if values.is_empty() {
        return Spread {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        };
    }
    Spread {
        median: values[values.len() / 2],
        min: values[0],
        max: values[values.len() - 1],
    }
}

/// Times `op` up to `iterations` times, in chunks, stopping after the chunk that passes `cap`;
/// returns thread CPU nanoseconds per call and the calls made.
fn time_loop<F: FnMut() -> bool>(op: &mut F, iterations: u64, cap: Duration) -> (f64, u64) {
    let wall = std::time::Instant::now();
    let cpu = thread_cpu();
    let mut done = 0;
    let mut hits = 0u64;
    while done < iterations {
        for _ in 0..CHUNK {
            hits += u64::from(op());
        }
        done += CHUNK;
        if wall.elapsed() > cap {
            break;
        }
    }
    black_box(hits);
    ((thread_cpu() - cpu).as_nanos() as f64 / done as f64, done)
}

/// Milliseconds of thread CPU `f` takes, and its result.
fn cpu_ms<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let start = thread_cpu();
    let out = f();
    ((thread_cpu() - start).as_secs_f64() * 1e3, out)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// Part 1: generated sets and decision cost.

/// Namespace of generated service `i`.
fn namespace(i: usize) -> &'static str {
    NAMESPACES[i % NAMESPACES.len()]
}

/// Name of generated service `i`.
fn service(i: usize) -> String {
    format!("svc-{i:04}")
}

/// Whether generated destination `i` is opaque TCP (a database, say) rather than HTTP.
fn is_tcp_only(i: usize) -> bool {
    i % 4 == 3
}

/// The services that call destination `i` (listed as its sources besides the gateway and
/// Prometheus).
fn callers(i: usize, n: usize) -> [usize; 3] {
    [(i + 1) % n, (i + 3) % n, (i + 5) % n]
}

/// An SMI policy set of `n` TrafficTargets, one per destination, as an operator would write
/// it: a Mesh document, then per destination its TCPRoute, its HTTPRouteGroup (HTTP
/// destinations) and its TrafficTarget.
fn policy_yaml(n: usize) -> String {
    let mut y = String::with_capacity(n * 2_000);
    y.push_str(
        "# Generated by tests/bench/policy.rs\napiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata: {name: mesh}\nspec: {default: deny, pathRegexMatch: prefix}\n",
    );
    for i in 0..n {
        let (ns, svc) = (namespace(i), service(i));
        if is_tcp_only(i) {
            let _ = write!(
                y,
                "---\napiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {{name: {svc}-db, namespace: {ns}}}\nspec:\n  matches: {{ports: [5432]}}\n"
            );
        } else {
            let _ = write!(
                y,
                "---\napiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {{name: {svc}-http, namespace: {ns}}}\nspec:\n  matches: {{ports: [8080, 8443]}}\n\
                 ---\napiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata: {{name: {svc}-routes, namespace: {ns}}}\nspec:\n  matches:\n\
                 \x20 - {{name: read, pathRegex: \"/api/v[0-9]+/{svc}/items(/[0-9a-f-]+)?\", methods: [GET, HEAD]}}\n\
                 \x20 - {{name: write, pathRegex: \"/api/v[0-9]+/{svc}/items\", methods: [POST, PUT, PATCH]}}\n\
                 \x20 - {{name: delete, pathRegex: \"/api/v[0-9]+/{svc}/items/[0-9a-f-]+$\", methods: [DELETE]}}\n\
                 \x20 - {{name: search, pathRegex: \"/api/v[0-9]+/{svc}/search\", methods: [GET, POST]}}\n\
                 \x20 - {{name: reports, pathRegex: \"/reports/[a-z]+/[0-9]{{4}}-[0-9]{{2}}\", methods: [GET]}}\n\
                 \x20 - {{name: metrics, pathRegex: /metrics, methods: [GET]}}\n\
                 \x20 - {{name: health, pathRegex: \"/(healthz|readyz)\", methods: [GET, HEAD]}}\n\
                 \x20 - name: canary\n    headers: {{x-canary: \"true|yes\", x-tenant: \"[a-z0-9-]{{3,32}}\"}}\n"
            );
        }
        let rules = if is_tcp_only(i) {
            format!("  - {{kind: TCPRoute, name: {svc}-db}}\n")
        } else {
            format!(
                "  - {{kind: TCPRoute, name: {svc}-http}}\n  - {{kind: HTTPRouteGroup, name: {svc}-routes}}\n"
            )
        };
        let _ = write!(
            y,
            "---\napiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {{name: {svc}-access, namespace: {ns}}}\nspec:\n  destination: {{kind: ServiceAccount, name: {svc}, namespace: {ns}}}\n  rules:\n{rules}  sources:\n"
        );
        for c in callers(i, n) {
            let _ = writeln!(
                y,
                "  - {{kind: ServiceAccount, name: {}, namespace: {}}}",
                service(c),
                namespace(c)
            );
        }
        y.push_str("  - {kind: ServiceAccount, name: gateway, namespace: edge}\n");
        y.push_str("  - {kind: ServiceAccount, name: prometheus, namespace: monitoring}\n");
        if i % 10 == 0 {
            y.push_str("  - {kind: SPIFFEID, name: \"spiffe://partner.example.net/billing\"}\n");
        }
    }
    y
}

/// A generated set, built and compiled.
struct GeneratedSet {
    n: usize,
    yaml: String,
    documents: usize,
    http_matches: usize,
    /// Path and header patterns in those matches.
    regexes: usize,
    /// Every `(source SPIFFE ID, destination)` pair the set lists: the naive ACL.
    acl: HashMap<(String, String), bool>,
    engine: Engine,
    /// Parse + validate, and compile, in ms of CPU.
    parse_ms: Spread,
    compile_ms: Spread,
    /// Of `compile_ms`: compiling the HTTP matches (their regexes).
    regex_ms: Spread,
}

impl GeneratedSet {
    fn build(n: usize, td: &TrustDomain, effort: Effort) -> anyhow::Result<GeneratedSet> {
        let yaml = policy_yaml(n);
        let file = format!("policy-{n}.yaml");
        let mut parse = Vec::new();
        let mut compile = Vec::new();
        let mut regex = Vec::new();
        let mut built = None;
        for _ in 0..effort.build_rounds.max(1) {
            let (ms, set) = cpu_ms(|| parse_set(&file, &yaml));
            parse.push(ms);
            let set = set?;
            let (ms, engine) = cpu_ms(|| Engine::new(&set, td));
            compile.push(ms);
            // The engine's regex work alone: every HTTP match compiled as `Engine::new` does.
            let (ms, compiled) = cpu_ms(|| {
                set.http_route_groups()
                    .iter()
                    .flat_map(|g| &g.matches)
                    .filter_map(|m| HttpMatcher::compile(m, set.path_regex_match()))
                    .count()
            });
            regex.push(ms);
            black_box(compiled);
            built = Some((set, engine));
        }
        let (set, engine) = built.context("built at least once")?;
        if set.traffic_targets().len() != n {
            bail!(
                "generated {n} TrafficTargets, parsed {}",
                set.traffic_targets().len()
            );
        }
        let mut acl = HashMap::new();
        for target in set.traffic_targets() {
            for subject in &target.sources {
                let source = match subject {
                    weft::policy::model::Subject::ServiceAccount(key) => {
                        SpiffeId::service(td, &key.namespace, &key.name)?.to_string()
                    }
                    weft::policy::model::Subject::SpiffeId(id) => id.to_string(),
                };
                acl.insert((source, target.destination.to_string()), true);
            }
        }
        let documents = set.traffic_targets().len()
            + set.tcp_routes().len()
            + set.http_route_groups().len()
            + usize::from(set.mesh().is_some());
        let matches = || set.http_route_groups().iter().flat_map(|g| &g.matches);
        let http_matches = matches().count();
        let regexes = matches()
            .map(|m| usize::from(m.path_regex.is_some()) + m.headers.len())
            .sum();
        eprintln!(
            "policy: {n} TrafficTargets: {} bytes of YAML, {documents} documents, parse {:.1} ms, compile {:.1} ms",
            yaml.len(),
            spread(parse.iter().copied()).median,
            spread(compile.iter().copied()).median
        );
        Ok(GeneratedSet {
            n,
            documents,
            http_matches,
            regexes,
            acl,
            engine,
            parse_ms: spread(parse),
            compile_ms: spread(compile),
            regex_ms: spread(regex),
            yaml,
        })
    }
}

/// Parses and validates one file, every error on its own line.
fn parse_set(file: &str, yaml: &str) -> anyhow::Result<PolicySet> {
    PolicySet::parse_files(&[(file, yaml)]).map_err(|errors| {
        let lines: Vec<String> = errors.iter().take(5).map(ToString::to_string).collect();
        anyhow!(
            "the generated set is invalid ({} errors):\n{}",
            errors.len(),
            lines.join("\n")
        )
    })
}

/// One request the engine is asked about, owning what `Request` borrows.
struct Probe {
    source: SpiffeId,
    destination: ServiceKey,
    port: u16,
    http: Option<(&'static str, String, HeaderMap)>,
}

impl Probe {
    fn request(&self) -> Request<'_> {
        Request {
            source: &self.source,
            destination: &self.destination,
            port: self.port,
            http: self
                .http
                .as_ref()
                .map(|(method, path, headers)| HttpRequest {
                    method,
                    path,
                    headers,
                }),
        }
    }

    fn acl_key(&self) -> (String, String) {
        (self.source.to_string(), self.destination.to_string())
    }
}

/// What a case must decide, checked before it is timed.
#[derive(Clone, Copy)]
struct Expect {
    allowed: bool,
    reason: DecisionReason,
    /// A fragment of the rule label that must decide it (`match read`).
    rule: Option<&'static str>,
}

impl Expect {
    fn check(&self, decision: &Decision) -> anyhow::Result<()> {
        let rule_ok = match self.rule {
            Some(fragment) => decision
                .rule
                .as_deref()
                .is_some_and(|r| r.contains(fragment)),
            None => true,
        };
        if decision.allowed != self.allowed || decision.reason != self.reason || !rule_ok {
            bail!("unexpected decision: {decision}");
        }
        Ok(())
    }
}

/// The kinds of request timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CaseKind {
    L4Allow,
    L4Deny,
    HttpFirst,
    HttpLate,
    HttpDeny,
    HttpRotating,
    Unpublished,
}

impl CaseKind {
    const ALL: [CaseKind; 7] = [
        CaseKind::L4Allow,
        CaseKind::L4Deny,
        CaseKind::HttpFirst,
        CaseKind::HttpLate,
        CaseKind::HttpDeny,
        CaseKind::HttpRotating,
        CaseKind::Unpublished,
    ];

    fn label(self) -> &'static str {
        match self {
            CaseKind::L4Allow => "L4 allow (TCPRoute port)",
            CaseKind::L4Deny => "L4 deny (source not listed)",
            CaseKind::HttpFirst => "HTTP allow, first match (`read`)",
            CaseKind::HttpLate => "HTTP allow, last of 8 matches (`canary` header)",
            CaseKind::HttpDeny => "HTTP deny (no match, 8 tried)",
            CaseKind::HttpRotating => "HTTP allow, first match, every HTTP destination in turn",
            CaseKind::Unpublished => "unpublished engine (floor)",
        }
    }
}

/// Realistic request headers (a browser call through the gateway, with tracing).
fn base_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("host", "svc.shop.internal"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0",
        ),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, br"),
        ("x-request-id", "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
    ] {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    headers
}

/// The probes and expectation of one case on a set of `n` destinations.
fn case_probes(kind: CaseKind, n: usize, td: &TrustDomain) -> anyhow::Result<(Vec<Probe>, Expect)> {
    let last_http = (0..n)
        .rev()
        .find(|&i| !is_tcp_only(i))
        .context("a set with an HTTP destination")?;
    let last_tcp = (0..n)
        .rev()
        .find(|&i| is_tcp_only(i))
        .context("a set with a TCP destination")?;
    let gateway = SpiffeId::service(td, "edge", "gateway")?;
    let dest = |i: usize| ServiceKey::new(namespace(i), service(i));
    let http = |i: usize, method: &'static str, path: String, headers: HeaderMap| Probe {
        source: gateway.clone(),
        destination: dest(i),
        port: 8080,
        http: Some((method, path, headers)),
    };
    let allow = |rule| Expect {
        allowed: true,
        reason: DecisionReason::AllowedByTarget,
        rule,
    };
    let tcp_caller = callers(last_tcp, n)[2];
    Ok(match kind {
        CaseKind::L4Allow | CaseKind::Unpublished => (
            vec![Probe {
                source: SpiffeId::service(td, namespace(tcp_caller), &service(tcp_caller))?,
                destination: dest(last_tcp),
                port: 5432,
                http: None,
            }],
            if kind == CaseKind::Unpublished {
                Expect {
                    allowed: true,
                    reason: DecisionReason::NotPublished,
                    rule: None,
                }
            } else {
                allow(Some("TCPRoute"))
            },
        ),
        CaseKind::L4Deny => (
            vec![Probe {
                source: SpiffeId::service(td, namespace(last_tcp), "stranger")?,
                destination: dest(last_tcp),
                port: 5432,
                http: None,
            }],
            Expect {
                allowed: false,
                reason: DecisionReason::NoMatchingTarget,
                rule: None,
            },
        ),
        CaseKind::HttpFirst => (
            vec![http(
                last_http,
                "GET",
                format!("/api/v2/{}/items/9f2c4e1a?expand=owner", service(last_http)),
                base_headers(),
            )],
            allow(Some("match read")),
        ),
        CaseKind::HttpLate => {
            let mut headers = base_headers();
            headers.insert("x-canary", HeaderValue::from_static("yes"));
            headers.insert("x-tenant", HeaderValue::from_static("acme-corp"));
            (
                vec![http(
                    last_http,
                    "GET",
                    "/checkout/v3/preview".to_string(),
                    headers,
                )],
                allow(Some("match canary")),
            )
        }
        CaseKind::HttpDeny => (
            vec![http(
                last_http,
                "GET",
                "/admin/users/42".to_string(),
                base_headers(),
            )],
            Expect {
                allowed: false,
                reason: DecisionReason::RouteNotMatched,
                rule: None,
            },
        ),
        CaseKind::HttpRotating => (
            (0..n)
                .filter(|&i| !is_tcp_only(i))
                .map(|i| {
                    http(
                        i,
                        "GET",
                        format!("/api/v2/{}/items/9f2c4e1a?expand=owner", service(i)),
                        base_headers(),
                    )
                })
                .collect(),
            allow(Some("match read")),
        ),
    })
}

/// One case's timings on one set.
#[derive(Debug, Clone)]
struct CaseResult {
    n: usize,
    kind: CaseKind,
    /// Requests cycled through (1 unless rotating).
    requests: usize,
    decide_ns: Spread,
    baseline_ns: Spread,
    /// Decisions timed per round (the smallest round).
    per_round: u64,
}

/// Builds every case and its baseline on every set, then times them in interleaved rounds.
fn decision_rounds(
    sets: &[GeneratedSet],
    td: &TrustDomain,
    effort: Effort,
) -> anyhow::Result<Vec<CaseResult>> {
    let unpublished = Engine::unpublished();
    struct Timed<'a> {
        n: usize,
        kind: CaseKind,
        requests: usize,
        decide: Box<dyn FnMut(u64, Duration) -> (f64, u64) + 'a>,
        baseline: Box<dyn FnMut(u64, Duration) -> (f64, u64) + 'a>,
        decide_ns: Vec<f64>,
        baseline_ns: Vec<f64>,
        per_round: u64,
    }
    let mut probes_of = Vec::new();
    for set in sets {
        for kind in CaseKind::ALL {
            let (probes, expect) = case_probes(kind, set.n, td)?;
            probes_of.push((set, kind, probes, expect));
        }
    }
    let mut timed = Vec::new();
    for (set, kind, probes, expect) in &probes_of {
        let engine = if *kind == CaseKind::Unpublished {
            &unpublished
        } else {
            &set.engine
        };
        let requests: Vec<Request<'_>> = probes.iter().map(Probe::request).collect();
        for request in &requests {
            expect
                .check(&engine.decide(request))
                .with_context(|| format!("{} with {} targets", kind.label(), set.n))?;
        }
        let keys: Vec<(String, String)> = probes.iter().map(Probe::acl_key).collect();
        let listed = set.acl.get(&keys[0]).copied().unwrap_or(false);
        if listed != (*kind != CaseKind::L4Deny) {
            bail!("the ACL baseline disagrees on {}", kind.label());
        }
        let acl = &set.acl;
        let decide = {
            let requests = requests.clone();
            Box::new(move |iterations: u64, cap: Duration| {
                let mut i = 0;
                let mut op = || {
                    let request = &requests[i];
                    i += 1;
                    if i == requests.len() {
                        i = 0;
                    }
                    black_box(engine.decide(black_box(request))).allowed
                };
                time_loop(&mut op, iterations, cap)
            })
        };
        let baseline = Box::new(move |iterations: u64, cap: Duration| {
            let mut i = 0;
            let mut op = || {
                let key = &keys[i];
                i += 1;
                if i == keys.len() {
                    i = 0;
                }
                black_box(acl.get(black_box(key)).copied().unwrap_or(false))
            };
            time_loop(&mut op, iterations, cap)
        });
        timed.push(Timed {
            n: set.n,
            kind: *kind,
            requests: requests.len(),
            decide,
            baseline,
            decide_ns: Vec::new(),
            baseline_ns: Vec::new(),
            per_round: u64::MAX,
        });
    }
    // Warm up, then interleave so drift and other load hit every case alike.
    for t in &mut timed {
        (t.decide)(CHUNK * 10, Duration::from_millis(50));
        (t.baseline)(CHUNK * 10, Duration::from_millis(50));
    }
    for round in 0..effort.decision_rounds {
        for t in &mut timed {
            let (ns, done) = (t.decide)(effort.decisions_per_round, effort.round_cap);
            let (base, base_done) = (t.baseline)(effort.decisions_per_round, effort.round_cap);
            t.per_round = t.per_round.min(done).min(base_done);
            t.decide_ns.push(ns);
            t.baseline_ns.push(base);
            eprintln!(
                "policy: round {}: {:>5} targets {:<55} {ns:>7.1} ns, baseline {base:>6.1} ns ({done} decisions)",
                round + 1,
                t.n,
                t.kind.label()
            );
        }
    }
    Ok(timed
        .into_iter()
        .map(|t| CaseResult {
            n: t.n,
            kind: t.kind,
            requests: t.requests,
            decide_ns: spread(t.decide_ns),
            baseline_ns: spread(t.baseline_ns),
            per_round: t.per_round,
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Part 2: the bundle, its verification and its fetch.

/// A signed policy bundle: the YAML payload, its SHA-256 and an ECDSA P-256 signature over it
/// (the `weft-policy/1` envelope, base64url JSON, would add about a third on the wire).
struct Bundle {
    version: u64,
    bytes: Vec<u8>,
    digest_hex: String,
    signature: Vec<u8>,
    public_key: Vec<u8>,
}

impl Bundle {
    fn sign(yaml: &str, version: u64) -> anyhow::Result<Bundle> {
        let bytes = yaml.as_bytes().to_vec();
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|_| anyhow!("ring could not generate a P-256 key"))?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|e| anyhow!("ring refused its own key: {e}"))?;
        let signature = key
            .sign(&rng, &bytes)
            .map_err(|_| anyhow!("ring could not sign"))?
            .as_ref()
            .to_vec();
        Ok(Bundle {
            version,
            digest_hex: sha256_hex(&bytes),
            signature,
            public_key: key.public_key().as_ref().to_vec(),
            bytes,
        })
    }

    /// The gossip value advertising this bundle.
    fn advertisement(&self) -> String {
        format!("{}:{}", self.version, self.digest_hex)
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest
        .as_ref()
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// What verifying one fetched bundle costs, step by step (ms of CPU).
#[derive(Debug, Clone)]
struct VerifyCost {
    digest: Spread,
    signature: Spread,
    parse: Spread,
    compile: Spread,
    total: Spread,
}

/// Verifies `bytes` as `bundle` the way an agent must before enforcing it, timing each step.
fn verify_once(bundle: &Bundle, bytes: &[u8], td: &TrustDomain) -> anyhow::Result<[f64; 4]> {
    let (digest_ms, digest) = cpu_ms(|| sha256_hex(bytes));
    if digest != bundle.digest_hex {
        bail!("digest mismatch");
    }
    let (signature_ms, verified) = cpu_ms(|| {
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &bundle.public_key)
            .verify(bytes, &bundle.signature)
    });
    verified.map_err(|_| anyhow!("bad bundle signature"))?;
    let (parse_ms, set) = cpu_ms(|| {
        std::str::from_utf8(bytes)
            .context("the bundle is not UTF-8")
            .and_then(|yaml| parse_set("bundle.yaml", yaml))
    });
    let set = set?;
    let (compile_ms, engine) = cpu_ms(|| Engine::new(&set, td));
    black_box(engine);
    Ok([digest_ms, signature_ms, parse_ms, compile_ms])
}

fn measure_verify(bundle: &Bundle, td: &TrustDomain, effort: Effort) -> anyhow::Result<VerifyCost> {
    let mut steps: [Vec<f64>; 4] = Default::default();
    let mut total = Vec::new();
    verify_once(bundle, &bundle.bytes, td)?;
    for _ in 0..effort.build_rounds.max(1) {
        let times = verify_once(bundle, &bundle.bytes, td)?;
        for (step, t) in steps.iter_mut().zip(times) {
            step.push(t);
        }
        total.push(times.iter().sum());
    }
    let [digest, signature, parse, compile] = steps.map(spread);
    let cost = VerifyCost {
        digest,
        signature,
        parse,
        compile,
        total: spread(total),
    };
    eprintln!("policy: verify {cost:?}");
    Ok(cost)
}

/// Loopback QUIC fetches of the bundle (ms of wall time).
#[derive(Debug, Clone)]
struct FetchCost {
    /// Connect (QUIC + mutual TLS with node SVIDs), request, receive the bundle, close.
    new_connection: Spread,
    /// The same fetch on a connection already open.
    established: Spread,
    /// A [`SMALL_FETCH`]-byte fetch on a new connection, for reference.
    small_new_connection: Spread,
    /// Connection setup alone (QUIC + mutual TLS), until the client holds the connection.
    handshake: Spread,
}

/// Starts a fetch server (one agent) and times fetches of the bundle from another, over
/// loopback, on a 2-thread runtime.
fn measure_fetch(bundle: &Bundle, effort: Effort) -> anyhow::Result<FetchCost> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let payload = Arc::new(bundle.bytes.clone());
    rt.block_on(async move {
        let dir = tempfile::tempdir()?;
        let td = TrustDomain::new(TRUST_DOMAIN)?;
        let made = pki::init(&td, "ops", &dir.path().join("root"))?;
        let shared: SharedBundle = Arc::new(arc_swap::ArcSwap::from_pointee(made.bundle));
        let out = dir.path().join("ca");
        pki::intermediate(&td, &dir.path().join("root"), "bench", &out)?;
        let ca = CertificateAuthority::load(
            &out.join(pki::CA_CERT),
            &out.join(pki::CA_KEY),
            &shared.load(),
        )?;
        let ttl = Duration::from_secs(3_600);
        let server_id = SpiffeId::node(&td, "node-0001")?;
        let (server_key, server_svid) = ca.issue_local(&server_id, ttl, None)?;
        let (client_key, client_svid) =
            ca.issue_local(&SpiffeId::node(&td, "node-0002")?, ttl, None)?;
        let key_der = |key: &rcgen::KeyPair| -> PrivateKeyDer<'static> {
            PrivatePkcs8KeyDer::from(key.serialize_der()).into()
        };

        let resolver = Arc::new(AlpnCertResolver::default());
        resolver.set(
            ALPN_POLICY,
            certified_key(server_svid.chain, key_der(&server_key))?,
        );
        let server_config = quic_server_config(
            resolver,
            OptionalSvidClientVerifier::new(shared.clone()),
            &[ALPN_POLICY],
        )?;
        let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse()?)?;
        let server_addr = server.local_addr()?;
        let accept = server.clone();
        let serving = payload.clone();
        let accept_loop = tokio::spawn(async move {
            while let Some(incoming) = accept.accept().await {
                let payload = serving.clone();
                tokio::spawn(async move {
                    let Ok(connection) = incoming.await else {
                        return;
                    };
                    while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                        let Ok(request) = recv.read_to_end(256).await else {
                            break;
                        };
                        let body = if request == SMALL_REQUEST {
                            &payload[..SMALL_FETCH.min(payload.len())]
                        } else {
                            &payload[..]
                        };
                        if send.write_all(body).await.is_err() || send.finish().is_err() {
                            break;
                        }
                    }
                });
            }
        });

        let expected = server_id.clone();
        let verifier = SvidServerVerifier::new(shared.clone(), "the serving agent", move |id| {
            *id == expected
        });
        let client_config = quic_client_config(
            verifier,
            Some(certified_key(client_svid.chain, key_der(&client_key))?),
            ALPN_POLICY,
        )?;
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        client.set_default_client_config(client_config);
        let full = payload.len();
        let fetch_of = |connection: quinn::Connection, small: bool| async move {
            let (request, want): (&[u8], usize) = if small {
                (SMALL_REQUEST, SMALL_FETCH.min(full))
            } else {
                (b"GET policy", full)
            };
            let (mut send, mut recv) = connection.open_bi().await?;
            send.write_all(request).await?;
            send.finish()?;
            let got = recv.read_to_end(want + 1024).await?;
            if got.len() != want {
                bail!("fetched {} bytes, expected {want}", got.len());
            }
            anyhow::Ok(())
        };
        let fetch = |connection: quinn::Connection| fetch_of(connection, false);
        let bound = Duration::from_secs(10);
        let mut new_connection = Vec::new();
        let mut established = Vec::new();
        let mut small = Vec::new();
        let mut handshake = Vec::new();
        let open = tokio::time::timeout(
            bound,
            client.connect(server_addr, "weft-node")?.into_future(),
        )
        .await
        .context("connecting timed out")??;
        // Warm-up, then interleave the two kinds.
        for _ in 0..3 {
            tokio::time::timeout(bound, fetch(open.clone())).await??;
        }
        for _ in 0..effort.fetches {
            let start = std::time::Instant::now();
            let connection = tokio::time::timeout(bound, async {
                let connection = client.connect(server_addr, "weft-node")?.await?;
                fetch(connection.clone()).await?;
                anyhow::Ok(connection)
            })
            .await
            .context("a fetch on a new connection timed out")??;
            new_connection.push(start.elapsed().as_secs_f64() * 1e3);
            connection.close(0u32.into(), b"done");

            let start = std::time::Instant::now();
            tokio::time::timeout(bound, fetch(open.clone()))
                .await
                .context("a fetch on an open connection timed out")??;
            established.push(start.elapsed().as_secs_f64() * 1e3);

            let start = std::time::Instant::now();
            let connection = tokio::time::timeout(bound, async {
                let connection = client.connect(server_addr, "weft-node")?.await?;
                fetch_of(connection.clone(), true).await?;
                anyhow::Ok(connection)
            })
            .await
            .context("a small fetch on a new connection timed out")??;
            small.push(start.elapsed().as_secs_f64() * 1e3);
            connection.close(0u32.into(), b"done");

            let start = std::time::Instant::now();
            let connection = tokio::time::timeout(
                bound,
                client.connect(server_addr, "weft-node")?.into_future(),
            )
            .await
            .context("a handshake timed out")??;
            handshake.push(start.elapsed().as_secs_f64() * 1e3);
            connection.close(0u32.into(), b"done");
        }
        open.close(0u32.into(), b"done");
        client.wait_idle().await;
        server.close(0u32.into(), b"done");
        accept_loop.abort();
        let cost = FetchCost {
            new_connection: spread(new_connection),
            established: spread(established),
            small_new_connection: spread(small),
            handshake: spread(handshake),
        };
        eprintln!("policy: fetch {cost:?}");
        Ok(cost)
    })
}

// ---------------------------------------------------------------------------------------------
// Part 3: convergence over gossip.

/// The delays a fetch and its verification take in the simulation (ms), from part 2.
#[derive(Debug, Clone, Copy)]
struct FetchModel {
    /// Connection setup (QUIC + mutual TLS).
    handshake: f64,
    /// The transfer, which a serving member does one at a time.
    transfer: f64,
    /// Verification by the fetching member.
    verify: f64,
}

fn ms(value: f64) -> Duration {
    Duration::from_secs_f64(value.max(0.0) / 1e3)
}

/// What one member did with version 2.
#[derive(Debug, Clone, Copy)]
struct Upgrade {
    /// When it first saw a member advertise it.
    seen: Instant,
    /// When it advertised it itself.
    advertised: Instant,
    /// The member it fetched from (itself for the publisher).
    source: usize,
    /// How long its fetch waited behind others at the source.
    queued: Duration,
}

/// State the simulated agents share with the measurement.
struct Shared {
    index: HashMap<ChitchatId, usize>,
    served: Vec<AtomicU64>,
    /// When each member's uplink is next free.
    free_at: Mutex<Vec<Instant>>,
    upgrades: Mutex<Vec<Option<Upgrade>>>,
    /// When each member first held the publisher's version-2 key (gossip alone).
    key_seen: Vec<OnceLock<Instant>>,
}

/// Time until a share of members reached something, or how many did.
#[derive(Debug, Clone, Copy)]
struct Reach {
    p50: Option<Duration>,
    p99: Option<Duration>,
    p100: Option<Duration>,
    done: usize,
    of: usize,
}

/// Percentiles over per-member times (`None` for members that never got there).
fn reach(times: &[Option<Duration>]) -> Reach {
    let of = times.len();
    let mut got: Vec<Duration> = times.iter().flatten().copied().collect();
    got.sort();
    let at = |pct: usize| {
        let need = (of * pct).div_ceil(100).max(1);
        got.get(need - 1).copied()
    };
    Reach {
        p50: at(50),
        p99: at(99),
        p100: at(100),
        done: got.len(),
        of,
    }
}

/// One pool's results.
#[derive(Debug, Clone)]
struct PoolResult {
    n: usize,
    interval: Duration,
    /// Startup: every member's live set full and every member holding every version-1 key.
    converged: Option<Duration>,
    /// Members advertising version 2, from the publisher's `set`.
    advertised: Reach,
    /// Members holding the publisher's version-2 key (gossip alone), from the same moment.
    key_seen: Reach,
    /// Members that had seen some member advertise version 2.
    learned: Reach,
    served_max: u64,
    served_mean: f64,
    servers: usize,
    publisher_served: u64,
    max_hops: usize,
    max_queued: Duration,
    crashed_loops: usize,
}

/// Runs one pool: converge on version 1, publish version 2 on one member, measure.
async fn simulate(
    n: usize,
    interval: Duration,
    model: FetchModel,
    bundle: &Bundle,
) -> anyhow::Result<PoolResult> {
    let rounds = |k: u32| interval * k;
    let channel = ChannelTransport::with_mtu(MAX_PAYLOAD);
    let names: Vec<String> = (0..n).map(sim_name).collect();
    let v1 = format!("1:{}", sha256_hex(b"policy version 1"));
    let v2 = bundle.advertisement();
    let start = Instant::now();
    let wall = std::time::Instant::now();
    let mut nodes =
        spawn_nodes(&channel, &names, interval, &[(POLICY_KEY.to_string(), v1)]).await?;

    // Converge: full live sets, then every member holds every member's version-1 key.
    let mut converged = None;
    let mut live_full = false;
    loop {
        if !live_full {
            live_full = nodes.iter().all(|node| node.live.borrow().len() >= n);
        }
        if live_full {
            let mut all = true;
            for node in &nodes {
                let guard = node.chitchat.lock().await;
                if !nodes.iter().all(|other| {
                    guard
                        .node_state(&other.id)
                        .and_then(|s| s.get(POLICY_KEY))
                        .is_some()
                }) {
                    all = false;
                    break;
                }
            }
            if all {
                converged = Some(start.elapsed());
                break;
            }
        }
        if start.elapsed() > rounds(60) || wall.elapsed() > SIM_WALL_BOUND {
            break;
        }
        tokio::time::sleep(if live_full {
            rounds(1)
        } else {
            Duration::from_millis(20)
        })
        .await;
    }
    eprintln!("policy: N={n} converged: {converged:?}");
    tokio::time::sleep(rounds(2)).await;

    // The agents' policy logic.
    let publisher = n / 2;
    let publisher_id = nodes[publisher].id.clone();
    let shared = Arc::new(Shared {
        index: nodes
            .iter()
            .enumerate()
            .map(|(i, node)| (node.id.clone(), i))
            .collect(),
        served: (0..n).map(|_| AtomicU64::new(0)).collect(),
        free_at: Mutex::new(vec![Instant::now(); n]),
        upgrades: Mutex::new(vec![None; n]),
        key_seen: (0..n).map(|_| OnceLock::new()).collect(),
    });
    let versions: Vec<Arc<AtomicU64>> = (0..n).map(|_| Arc::new(AtomicU64::new(1))).collect();
    let mut listeners = Vec::with_capacity(n);
    let mut agents = Vec::with_capacity(n);
    for (i, node) in nodes.iter().enumerate() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(ChitchatId, u64, String)>();
        let current = versions[i].clone();
        let seen_by = shared.clone();
        let publisher_id = publisher_id.clone();
        let listener = node
            .chitchat
            .lock()
            .await
            .subscribe_event(POLICY_KEY, move |event| {
                if !event.key.is_empty() {
                    return;
                }
                let Some((version, digest)) = event.value.split_once(':') else {
                    return;
                };
                let Ok(version) = version.parse::<u64>() else {
                    return;
                };
                if version == 2 && *event.node == publisher_id {
                    seen_by.key_seen[i].get_or_init(Instant::now);
                }
                if version > current.load(Ordering::Relaxed) {
                    let _ = tx.send((event.node.clone(), version, digest.to_string()));
                }
            });
        listeners.push(listener);
        let current = versions[i].clone();
        let live = node.live.clone();
        let chitchat = node.chitchat.clone();
        let shared = shared.clone();
        agents.push(tokio::spawn(async move {
            let mut seen = None;
            while let Some((source_id, version, digest)) = rx.recv().await {
                if version <= current.load(Ordering::Relaxed) {
                    continue;
                }
                let seen_at = *seen.get_or_insert_with(Instant::now);
                let Some(&source) = shared.index.get(&source_id) else {
                    continue;
                };
                if source == i || !live.borrow().contains_key(&source_id) {
                    continue;
                }
                // Fetch: the handshake, then the transfer once the source's uplink is free.
                let now = Instant::now();
                let connected = now + ms(model.handshake);
                let (begin, done) = {
                    let mut free_at = shared.free_at.lock().expect("free_at lock");
                    let begin = connected.max(free_at[source]);
                    let done = begin + ms(model.transfer);
                    free_at[source] = done;
                    (begin, done)
                };
                shared.served[source].fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep_until(done + ms(model.verify)).await;
                current.store(version, Ordering::Relaxed);
                chitchat
                    .lock()
                    .await
                    .self_node_state()
                    .set(POLICY_KEY, format!("{version}:{digest}"));
                shared.upgrades.lock().expect("upgrades lock")[i] = Some(Upgrade {
                    seen: seen_at,
                    advertised: Instant::now(),
                    source,
                    queued: begin - connected,
                });
            }
        }));
    }

    // Publish version 2 on one (non-seed) member.
    let published = Instant::now();
    versions[publisher].store(2, Ordering::Relaxed);
    nodes[publisher]
        .chitchat
        .lock()
        .await
        .self_node_state()
        .set(POLICY_KEY, &v2);
    shared.upgrades.lock().expect("upgrades lock")[publisher] = Some(Upgrade {
        seen: published,
        advertised: published,
        source: publisher,
        queued: Duration::ZERO,
    });
    let wall = std::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let upgraded = shared
            .upgrades
            .lock()
            .expect("upgrades lock")
            .iter()
            .filter(|u| u.is_some())
            .count();
        let seen = shared.key_seen.iter().filter(|s| s.get().is_some()).count();
        if (upgraded == n && seen == n - 1)
            || published.elapsed() > rounds(120)
            || wall.elapsed() > SIM_WALL_BOUND
        {
            break;
        }
    }
    for agent in &agents {
        agent.abort();
    }
    drop(listeners);
    let crashed_loops = stop_all(&mut nodes, "policy").await;

    let upgrades = shared.upgrades.lock().expect("upgrades lock").clone();
    let since = |t: Instant| t.saturating_duration_since(published);
    let advertised = reach(
        &upgrades
            .iter()
            .map(|u| u.map(|u| since(u.advertised)))
            .collect::<Vec<_>>(),
    );
    let learned = reach(
        &upgrades
            .iter()
            .map(|u| u.map(|u| since(u.seen)))
            .collect::<Vec<_>>(),
    );
    let key_seen = reach(
        &(0..n)
            .map(|i| {
                if i == publisher {
                    Some(Duration::ZERO)
                } else {
                    shared.key_seen[i].get().map(|t| since(*t))
                }
            })
            .collect::<Vec<_>>(),
    );
    let served: Vec<u64> = shared
        .served
        .iter()
        .map(|s| s.load(Ordering::Relaxed))
        .collect();
    let hops = |mut i: usize| {
        let mut h = 0;
        while let Some(u) = upgrades[i] {
            if u.source == i || h > n {
                break;
            }
            i = u.source;
            h += 1;
        }
        h
    };
    Ok(PoolResult {
        n,
        interval,
        converged,
        advertised,
        key_seen,
        learned,
        served_max: served.iter().copied().max().unwrap_or(0),
        served_mean: served.iter().sum::<u64>() as f64 / n as f64,
        servers: served.iter().filter(|&&s| s > 0).count(),
        publisher_served: served[publisher],
        max_hops: (0..n).map(hops).max().unwrap_or(0),
        max_queued: upgrades
            .iter()
            .flatten()
            .map(|u| u.queued)
            .max()
            .unwrap_or_default(),
        crashed_loops,
    })
}

// ---------------------------------------------------------------------------------------------
// The report.

struct Report<'a> {
    sets: &'a [GeneratedSet],
    decisions: &'a [CaseResult],
    bundle: &'a Bundle,
    verify: &'a VerifyCost,
    fetch: &'a FetchCost,
    model: FetchModel,
    pools: &'a [PoolResult],
    skipped: &'a [String],
    load: String,
    quick: bool,
    effort: Effort,
    elapsed: Duration,
}

fn fmt_ns(s: &Spread) -> String {
    format!("{:.1} ns ({:.1}–{:.1})", s.median, s.min, s.max)
}

fn fmt_ms(s: &Spread) -> String {
    format!("{:.2} ms ({:.2}–{:.2})", s.median, s.min, s.max)
}

fn fmt_at(at: Option<Duration>, reach: &Reach, interval: Duration) -> String {
    match at {
        Some(t) => format!(
            "{:.2} s ({:.1} r)",
            t.as_secs_f64(),
            t.as_secs_f64() / interval.as_secs_f64()
        ),
        None => format!("not reached ({}/{})", reach.done, reach.of),
    }
}

fn ratio(a: Option<Duration>, b: Option<Duration>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if !b.is_zero() => format!("{:.2}×", a.as_secs_f64() / b.as_secs_f64()),
        _ => "–".to_string(),
    }
}

fn render(r: &Report<'_>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Issue 5: the cost of one authorization decision with 10 and 1,000 TrafficTargets, and \
         how long a new policy version takes to reach a pool of up to 1,000 agents. \
         `tests/bench/policy.rs`; the whole run took {:.0} s; load average at the start {} \
         (other builds may share the two cores: single-thread figures are that thread's CPU \
         time, not wall time).{}\n",
        r.elapsed.as_secs_f64(),
        r.load,
        if r.quick {
            " **Quick run (`WEFT_BENCH_QUICK=1`): few iterations, small pools.**"
        } else {
            ""
        }
    );

    // Sets.
    let _ = writeln!(s, "### Policy sets\n");
    let _ = writeln!(
        s,
        "Generated SMI YAML, one TrafficTarget per destination over {} namespaces, `Mesh` \
         `default: deny`. Three destinations in four speak HTTP: a TCPRoute (ports 8080, 8443) \
         and an HTTPRouteGroup of 8 matches (7 path regexes with method sets, one header-only \
         `canary` match on two headers); the fourth is opaque TCP (a TCPRoute on 5432). Sources: \
         three calling services from other namespaces, the gateway, Prometheus, and on every \
         tenth a federated `SPIFFEID`. Parse + validate is `PolicySet::parse_files` (which also \
         compiles every pattern to check it), compile is `Engine::new` (every HTTP match \
         compiled once into an `HttpMatcher`; the next column times just that, \
         `HttpMatcher::compile` over every match); CPU time, median of {} builds (min–max).\n",
        NAMESPACES.len(),
        r.effort.build_rounds.max(1)
    );
    let _ = writeln!(
        s,
        "| TrafficTargets | documents | HTTP matches (patterns) | YAML | parse + validate | compile | of which HTTP matches | ACL pairs (baseline) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for set in r.sets {
        let _ = writeln!(
            s,
            "| {} | {} | {} ({}) | {:.1} KiB | {} | {} | {} | {} |",
            set.n,
            set.documents,
            set.http_matches,
            set.regexes,
            set.yaml.len() as f64 / 1024.0,
            fmt_ms(&set.parse_ms),
            fmt_ms(&set.compile_ms),
            fmt_ms(&set.regex_ms),
            set.acl.len()
        );
    }
    let _ = writeln!(s);

    // Decisions.
    let min_per_round = r.decisions.iter().map(|d| d.per_round).min().unwrap_or(0);
    let _ = writeln!(s, "### Decision cost per request\n");
    let _ = writeln!(
        s,
        "`Engine::decide` on one thread, `std::hint::black_box` on request and result; every \
         case is checked first to decide as named (allow/deny, reason, deciding rule). Each \
         case and its baseline run in {} interleaved rounds of up to {} decisions (at least {} \
         in every round here); figures are CPU ns per decision, median of the rounds \
         (min–max). Requests reach the last generated destination (the last HTTP one, or the \
         last opaque-TCP one) from a listed source, with six ordinary headers; the rotating \
         case cycles through every HTTP destination so the lookups miss the CPU caches as a \
         busy proxy's would. **Baseline**: the same `(source SPIFFE ID, destination)` key \
         looked up in a `HashMap<(String, String), bool>` of every pair the set lists, which \
         is what a naive ACL costs.\n",
        r.effort.decision_rounds,
        fmt_count(r.effort.decisions_per_round),
        fmt_count(min_per_round)
    );
    let _ = writeln!(
        s,
        "| request | TrafficTargets | `decide` | baseline: HashMap lookup | ratio |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for kind in CaseKind::ALL {
        for d in r.decisions.iter().filter(|d| d.kind == kind) {
            let label = if d.requests > 1 {
                format!("{} ({} destinations)", kind.label(), d.requests)
            } else {
                kind.label().to_string()
            };
            let _ = writeln!(
                s,
                "| {label} | {} | {} | {} | {:.1}× |",
                d.n,
                fmt_ns(&d.decide_ns),
                fmt_ns(&d.baseline_ns),
                d.decide_ns.median / d.baseline_ns.median
            );
        }
    }
    let _ = writeln!(s);
    let find = |kind: CaseKind, n: usize| {
        r.decisions
            .iter()
            .find(|d| d.kind == kind && d.n == n)
            .map_or(f64::NAN, |d| d.decide_ns.median)
    };
    let big = BUNDLE_TARGETS;
    let small = SET_SIZES[0];
    let hot_max = r
        .decisions
        .iter()
        .filter(|d| d.kind != CaseKind::HttpRotating)
        .map(|d| d.decide_ns.median)
        .fold(0.0_f64, f64::max);
    let _ = writeln!(
        s,
        "From {small} to {big} TrafficTargets the cost of deciding one repeated request \
         changes by {:+.0} % (L4 allow) and {:+.0} % (HTTP first match): the engine indexes \
         targets by destination, then by source, so a decision is two hash lookups plus the \
         rules of the targets that list the source, whatever the size of the set. What grows \
         it is the HTTP matches tried: the last of 8 costs {:.1}× the first (method bits skip \
         some, each other one runs its regex), and a denied HTTP request tries them all. Over \
         every destination in turn it costs {:.0} ns with {small} TrafficTargets and {:.0} ns \
         with {big}: each decision then uses another target's compiled regexes and their \
         search caches, and with {big} targets ({} patterns) those no longer fit in the CPU \
         caches, the likely reason for the jump; that is the figure for a proxy whose requests \
         spread over many destinations. At the slowest repeated case ({:.0} ns) one core makes \
         about {:.1} million decisions per second; at the rotating {big}-target figure, about \
         {:.2} million.\n",
        (find(CaseKind::L4Allow, big) / find(CaseKind::L4Allow, small) - 1.0) * 100.0,
        (find(CaseKind::HttpFirst, big) / find(CaseKind::HttpFirst, small) - 1.0) * 100.0,
        find(CaseKind::HttpLate, big) / find(CaseKind::HttpFirst, big),
        find(CaseKind::HttpRotating, small),
        find(CaseKind::HttpRotating, big),
        r.sets
            .iter()
            .find(|set| set.n == big)
            .map_or(0, |set| set.regexes),
        hot_max,
        1e3 / hot_max,
        1e3 / find(CaseKind::HttpRotating, big),
    );

    // Bundle, verification and fetch.
    let v = r.verify;
    let _ = writeln!(s, "### Fetching and verifying a {big}-target bundle\n");
    let _ = writeln!(
        s,
        "The bundle is the {big}-target set above: {:.1} KiB of YAML, uncompressed as in the \
         `weft-policy/1` format, with an ECDSA P-256 signature over it (ring); the format's \
         base64url JSON envelope and operator certificate would add about a third on the wire \
         and one certificate check, which are not counted here. Verifying is what an agent \
         must do before enforcing a fetched bundle; CPU time per step, median of {} runs \
         (min–max):\n",
        r.bundle.bytes.len() as f64 / 1024.0,
        r.effort.build_rounds.max(1)
    );
    let _ = writeln!(s, "| step | time |");
    let _ = writeln!(s, "|---|---|");
    for (label, spread) in [
        (
            "SHA-256 of the bundle, checked against the gossiped digest",
            &v.digest,
        ),
        ("ECDSA P-256 signature verify (ring)", &v.signature),
        (
            "UTF-8 check, parse + validate (`PolicySet::parse_files`)",
            &v.parse,
        ),
        ("compile (`Engine::new`)", &v.compile),
        ("**total**", &v.total),
    ] {
        let _ = writeln!(s, "| {label} | {} |", fmt_ms(spread));
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Fetch, wall time on loopback (quinn 0.11 + rustls, mutual TLS with node SVIDs issued by \
         a `weft-ca` CA, as between agents; median of {} fetches each, interleaved, min–max):\n",
        r.effort.fetches
    );
    let _ = writeln!(
        s,
        "| fetch of the {:.1} KiB bundle | time |",
        r.bundle.bytes.len() as f64 / 1024.0
    );
    let _ = writeln!(s, "|---|---|");
    let _ = writeln!(
        s,
        "| handshake alone (QUIC + mutual TLS) | {} |",
        fmt_ms(&r.fetch.handshake)
    );
    let _ = writeln!(
        s,
        "| new connection: handshake, request, transfer, close | {} |",
        fmt_ms(&r.fetch.new_connection)
    );
    let _ = writeln!(
        s,
        "| on an open connection: request and transfer | {} |",
        fmt_ms(&r.fetch.established)
    );
    let _ = writeln!(
        s,
        "| for reference, {} KiB on a new connection | {} |",
        SMALL_FETCH / 1024,
        fmt_ms(&r.fetch.small_new_connection)
    );
    let _ = writeln!(s);

    // Convergence.
    let m = r.model;
    let _ = writeln!(
        s,
        "### Policy convergence over gossip (in-process simulation)\n"
    );
    let _ = writeln!(
        s,
        "N real chitchat 0.13 members on the simulated clock exactly as in \"Gossip at scale\" \
         above (agent settings, 500 ms gossip interval, shared code in \
         `tests/src/gossip_sim.rs`), each also advertising `policy = <version>:<sha256 hex>`. \
         An agent that sees an alive member advertise a higher version fetches the bundle from \
         that member, verifies it, then advertises the new version itself. Fetch and \
         verification are delays taken from the measurements above, not real transfers: \
         {:.2} ms of handshake (QUIC + mutual TLS, measured alone), {:.2} ms of \
         transfer, which a serving member performs one at a time (a member asked by many \
         queues them: one loopback stream's rate per member, no bandwidth limit below that), \
         then {:.1} ms of verification; {:.1} ms per fetch without queueing. Loopback has no \
         network latency, so a real fetch adds a few round trips. All members start converged \
         on version 1; then one non-seed member sets version 2. Times are from that `set`; \
         \"r\" is gossip rounds. **Baseline**: when each member merely holds the publisher's \
         new key (gossip propagation alone, from the same run). Fetch hops: the longest chain \
         of fetches from the publisher.\n",
        m.handshake,
        m.transfer,
        m.verify,
        m.handshake + m.transfer + m.verify
    );
    let _ = writeln!(
        s,
        "| N | advertising v2: 50 % | 99 % | 100 % | baseline: key seen 50 % | 99 % | 100 % | ratio at 99 % | fetches served per member: max / mean | members that served | longest queue at a source | fetch hops |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for p in r.pools {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {:.2} | {} (publisher: {}) | {:.1} ms | {} |",
            p.n,
            fmt_at(p.advertised.p50, &p.advertised, p.interval),
            fmt_at(p.advertised.p99, &p.advertised, p.interval),
            fmt_at(p.advertised.p100, &p.advertised, p.interval),
            fmt_at(p.key_seen.p50, &p.key_seen, p.interval),
            fmt_at(p.key_seen.p99, &p.key_seen, p.interval),
            fmt_at(p.key_seen.p100, &p.key_seen, p.interval),
            ratio(p.advertised.p99, p.key_seen.p99),
            p.served_max,
            p.served_mean,
            p.servers,
            p.publisher_served,
            p.max_queued.as_secs_f64() * 1e3,
            p.max_hops,
        );
    }
    let _ = writeln!(s);
    for why in r.skipped {
        let _ = writeln!(s, "Not measured: {why}.\n");
    }
    let startup: Vec<String> = r
        .pools
        .iter()
        .map(|p| {
            format!(
                "{} at N={}{}",
                p.converged.map_or("not converged".to_string(), |t| format!(
                    "{:.1} s",
                    t.as_secs_f64()
                )),
                p.n,
                if p.crashed_loops > 0 {
                    format!(" ({} gossip loops crashed)", p.crashed_loops)
                } else {
                    String::new()
                }
            )
        })
        .collect();
    let _ = writeln!(
        s,
        "Startup convergence on version 1 (full live sets and every member's `policy` key \
         everywhere) took {}.\n",
        startup.join(", ")
    );

    // What it means.
    if let Some(p) = r.pools.iter().max_by_key(|p| p.n) {
        let set = r.sets.iter().find(|set| set.n == big);
        let publisher_share = p.publisher_served as f64 / (p.n - 1).max(1) as f64 * 100.0;
        let regex_share = set.map_or(f64::NAN, |set| {
            set.regex_ms.median / set.compile_ms.median * 100.0
        });
        let secs = |t: Option<Duration>| t.map_or(f64::NAN, |t| t.as_secs_f64());
        let _ = writeln!(
            s,
            "**What this means for a {n}-host fleet.** Enforcement is cheap and flat: a repeated \
             request is decided in {:.0}–{:.0} ns with {small} or {big} TrafficTargets \
             ({:.1}–{:.1}× a bare hash lookup), and about {:.1} µs when requests spread over all \
             {big} destinations. Distribution is bound by three things. (1) Verification: an \
             agent spends {:.1} s of CPU checking a {big}-target bundle ({:.0} ms parse + \
             validate, {:.0} ms compile, {regex_share:.0} % of the compile step being the HTTP \
             matches' regexes; validation compiles every pattern too; the signature and digest \
             are under 2 ms), so each agent adds that much after it learns of a new version, and \
             every member of the fleet burns it once per version. (2) The publisher's uplink: \
             every agent fetches from the first member it sees advertising the version; 99 % of \
             members have seen it advertised within {:.2} s, {} than one verification, so \
             {publisher_share:.0} % of the fetches went to the publisher: in the {n}-member pool \
             it served {} of {} ({} members served any; the mean per member is {:.2}), sending \
             about {:.0} MiB, and the last fetch queued there for {:.1} s at one loopback \
             stream's rate. (3) Gossip itself, about {:.1} s to reach 99 %. Together: 50 % of members advertise the new version after {:.1} s, 99 % \
             after {:.1} s and all after {:.1} s, {} the time the bare key takes. Fetching from \
             a random advertiser after a short random delay would spread the uploads over the \
             first upgraded members, and keeping the compiled regexes of validation for the \
             engine would cut verification; both are for the distribution design, not measured \
             here.\n",
            r.decisions
                .iter()
                .filter(|d| d.kind != CaseKind::Unpublished && d.kind != CaseKind::HttpRotating)
                .map(|d| d.decide_ns.median)
                .fold(f64::INFINITY, f64::min),
            hot_max,
            r.decisions
                .iter()
                .filter(|d| d.kind != CaseKind::Unpublished && d.kind != CaseKind::HttpRotating)
                .map(|d| d.decide_ns.median / d.baseline_ns.median)
                .fold(f64::INFINITY, f64::min),
            r.decisions
                .iter()
                .filter(|d| d.kind != CaseKind::Unpublished && d.kind != CaseKind::HttpRotating)
                .map(|d| d.decide_ns.median / d.baseline_ns.median)
                .fold(0.0_f64, f64::max),
            find(CaseKind::HttpRotating, big) / 1e3,
            r.verify.total.median / 1e3,
            r.verify.parse.median,
            r.verify.compile.median,
            secs(p.learned.p99),
            if secs(p.learned.p99) * 1e3 < r.verify.total.median {
                "less"
            } else {
                "more"
            },
            p.publisher_served,
            p.n - 1,
            p.servers,
            p.served_mean,
            p.publisher_served as f64 * r.bundle.bytes.len() as f64 / 1024.0 / 1024.0,
            p.max_queued.as_secs_f64(),
            secs(p.key_seen.p99),
            secs(p.advertised.p50),
            secs(p.advertised.p99),
            secs(p.advertised.p100),
            ratio(p.advertised.p99, p.key_seen.p99),
            n = p.n,
        );
    }
    s
}

/// `2,000,000`.
fn fmt_count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Part 4: revocation
// ---------------------------------------------------------------------------------------------

/// Entries of the revocation list spread in part 4.
const REVOCATION_ENTRIES: usize = 100;
/// Agents of the real-agent rounds.
const REAL_AGENTS: usize = 5;

/// Opening and installing a real revocation list.
struct RevocationCost {
    /// The signed list, wrapped for the fetch and the simulation.
    bundle: Bundle,
    /// `open` (every check) plus installing it in a trust bundle, ms.
    open: Spread,
}

/// Signs a real `weft-revocations/1` list with a real operator credential and times opening
/// and installing it.
fn measure_revocation(effort: Effort) -> anyhow::Result<RevocationCost> {
    use weft::policy::bundle::{RevocationList, Verified};
    let dir = tempfile::tempdir()?;
    let td = TrustDomain::new(TRUST_DOMAIN)?;
    let made = pki::init(&td, "ops", dir.path())?;
    let signer = weft_ca::OperatorCredential::load(dir.path())?.signer(SystemTime::now())?;
    let at = weft_ca::verify::unix_secs(SystemTime::now());
    let revoked = (0..REVOCATION_ENTRIES)
        .map(|i| weft_ca::Revocation {
            kind: weft_ca::RevokedKind::Node,
            value: format!("host-{i:04}"),
            at,
            reason: "decommissioned".into(),
        })
        .collect();
    let bytes = weft::policy::bundle::sign(RevocationList { revoked }, 2, &signer)?;
    let mut times = Vec::new();
    for _ in 0..effort.build_rounds.max(1) * 20 {
        let (took, installed) = cpu_ms(|| -> anyhow::Result<weft_ca::TrustBundle> {
            let opened: Verified<RevocationList> =
                weft::policy::bundle::open(&bytes, &made.bundle, SystemTime::now())?;
            Ok(made.bundle.with_revocations(opened.compiled))
        });
        black_box(installed?);
        times.push(took);
    }
    Ok(RevocationCost {
        bundle: Bundle::sign(std::str::from_utf8(&bytes)?, 2)?,
        open: spread(times),
    })
}

/// One kind of real-agent round: time from the command until every agent holds the version.
#[derive(Debug, Clone)]
struct RealRounds {
    revoke: Spread,
    policy: Spread,
    rounds: usize,
}

/// Alternating rounds of `weft revoke id` and `weft policy apply` on [`REAL_AGENTS`] real
/// agents on loopback.
fn real_agent_rounds(effort: Effort) -> anyhow::Result<RealRounds> {
    use weft_tests::agent::{Cluster, TestAgent, wait_until};
    let cluster = Cluster::start(REAL_AGENTS, |_| {})?;
    wait_until(Duration::from_secs(30), || cluster.all_ready())
        .context("the real agents never became ready")?;
    let version = |agent: &TestAgent, field: &str| {
        agent
            .cli_json(&["status"])
            .ok()
            .and_then(|s| s[field].as_u64())
            .unwrap_or(0)
    };
    let until_everywhere = |field: &str, wanted: u64| -> anyhow::Result<f64> {
        let started = std::time::Instant::now();
        wait_until(Duration::from_secs(30), || {
            cluster.agents.iter().all(|a| version(a, field) >= wanted)
        })
        .with_context(|| format!("{field} {wanted} did not reach every agent in 30 s"))?;
        Ok(started.elapsed().as_secs_f64() * 1e3)
    };
    let policy_dir = cluster.dir().join("bench-policy");
    std::fs::create_dir_all(&policy_dir)?;
    std::fs::write(
        policy_dir.join("mesh.yaml"),
        "apiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata: {name: mesh}\nspec: {default: allow}\n",
    )?;
    let operator = cluster.pki.operator_dir();
    let a1 = &cluster.agents[0];
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let out = a1.cli(args, Some(operator));
        anyhow::ensure!(
            out.status.success(),
            "weft {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let rounds = effort.build_rounds * 2;
    let (mut revoke, mut policy) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let before = version(a1, "revocation_version");
        let id = format!("spiffe://test.weft/ns/bench/sa/round-{round}");
        let started = std::time::Instant::now();
        run(&["revoke", "id", &id, "--reason", "bench"])?;
        let wanted = version(a1, "revocation_version").max(before + 1);
        let command = started.elapsed().as_secs_f64() * 1e3;
        revoke.push(command + until_everywhere("revocation_version", wanted)?);
        let before = version(a1, "policy_version");
        let started = std::time::Instant::now();
        run(&[
            "policy",
            "apply",
            "-f",
            policy_dir.to_str().context("path")?,
        ])?;
        let wanted = version(a1, "policy_version").max(before + 1);
        let command = started.elapsed().as_secs_f64() * 1e3;
        policy.push(command + until_everywhere("policy_version", wanted)?);
    }
    Ok(RealRounds {
        revoke: spread(revoke),
        policy: spread(policy),
        rounds,
    })
}

/// Part 4, written as the "Revocation" section.
fn revocation_part(
    effort: Effort,
    sizes: &[usize],
    quick: bool,
    write: bool,
) -> anyhow::Result<()> {
    let cost = measure_revocation(effort)?;
    eprintln!("revocation: open and install {:?}", cost.open);
    let fetch = measure_fetch(&cost.bundle, effort)?;
    let model = FetchModel {
        handshake: fetch.handshake.median,
        transfer: fetch.established.median,
        verify: cost.open.median,
    };
    eprintln!("revocation: fetch model {model:?}");
    let real = real_agent_rounds(effort)?;
    eprintln!("revocation: real agents {real:?}");
    let (pools, skipped) = simulate_pools(sizes, model, &cost.bundle)?;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "The operator's revocation list travels through the same machinery as policy (signed \
         bundle, gossip advert, fetch from an advertiser, verify, persist): what it costs and \
         how fast it reaches every agent. Every agent closes the tunnels of a revoked peer the \
         moment it installs the list (tested in `tests/trust.rs`), so the time to hold the list \
         is the time to cut the peer off.\n"
    );
    let _ = writeln!(
        s,
        "**Cost.** A list of {REVOCATION_ENTRIES} node entries is {} bytes. Opening it (every \
         check: operator certificate, signature, entries) and installing it in the trust bundle \
         takes {} of CPU. Fetching it from another agent over loopback QUIC: handshake {}, \
         transfer on an open connection {}.\n",
        cost.bundle.bytes.len(),
        fmt_ms(&cost.open),
        fmt_ms(&fetch.handshake),
        fmt_ms(&fetch.established),
    );
    let _ = writeln!(
        s,
        "**{REAL_AGENTS} real agents** (release binary, loopback, one CA host; {} alternating \
         rounds; median, min–max): from the command on one agent until every agent reports \
         the new version in `weft status`, polled through the CLI \
         (each poll asks all five agents, then waits 25 ms), so figures include up to one poll \
         of delay.\n\n\
         | command | until every agent holds it |\n|---|---|\n\
         | `weft revoke id …` | {} |\n| baseline: `weft policy apply` (one file) | {} |\n",
        real.rounds,
        fmt_ms(&real.revoke),
        fmt_ms(&real.policy),
    );
    let _ = writeln!(
        s,
        "**Simulated pools** (real chitchat members on the simulated clock, as in \"Policy\"; \
         fetch and verification are the delays above). Times from the publisher's `set`; the \
         baseline is gossip alone (every member holding the publisher's new key). Goal: every \
         agent within 2 s at p99.\n\n\
         | members | holds the list: p50 / p99 / all | gossip alone p99 | p99 ratio | goal |\n\
         |---|---|---|---|---|"
    );
    for p in &pools {
        let secs = |d: Option<Duration>| {
            d.map_or("-".to_string(), |d| format!("{:.2} s", d.as_secs_f64()))
        };
        let met = p
            .advertised
            .p99
            .is_some_and(|d| d <= Duration::from_secs(2));
        let _ = writeln!(
            s,
            "| {} | {} / {} / {} | {} | {} | {} |",
            p.n,
            secs(p.advertised.p50),
            secs(p.advertised.p99),
            secs(p.advertised.p100),
            secs(p.key_seen.p99),
            ratio(p.advertised.p99, p.key_seen.p99),
            if met { "met" } else { "not met" },
        );
    }
    for why in &skipped {
        let _ = writeln!(s, "\n{why}");
    }
    println!("{s}");
    if write && !quick {
        bench_report::write_section(
            "benchmarks.md",
            "Revocation",
            "WEFT_POLICY_PARTS=revocation cargo bench -p weft-tests --bench policy",
            &s,
        )
        .context("writing the Revocation section of docs/benchmarks.md")?;
        eprintln!("revocation: wrote docs/benchmarks.md");
    }
    Ok(())
}
