//! Benchmark: the data plane (`[[upstream]]` listener on agent A → QUIC mTLS tunnel → inbound
//! delivery on agent B), against a direct connection and against an HAProxy mutual-TLS pair
//! doing the same job, every figure measured in the same run.
//!
//! Three paths to the same servers on 127.0.0.1:
//! - **direct**: the client connects to the server.
//! - **HAProxy pair**: client → client-side HAProxy (TCP mode, originates TLS 1.3 with a client
//!   certificate) → server-side HAProxy (terminates TLS, verifies the client certificate) →
//!   server. ECDSA P-256 certificates from `openssl`, `nbthread 1` per side.
//! - **Weft**: client → `[[upstream]]` listener of `weft agent` A → pooled QUIC tunnel (mutual
//!   TLS with node SVIDs from a real CA) → `weft agent` B (a CA host running the services) →
//!   server. The release binary (`cargo build --release --bin weft`, run by this bench).
//!
//! A fourth, diagnostic route is an `[[upstream]]` of agent B to its own service (the same
//! listener and splice code, no tunnel), to tell the relay's cost from the tunnel's. For HTTP
//! a fifth route, **Weft L7**, reaches the same nginx through services registered as `http`
//! and `http2`, so that each request is parsed, balanced, counted and carried as HTTP/2.
//!
//! Servers: an echo server (a thread per connection in this process), nginx-light (one
//! process, 1 KB file, HTTP/1.1 and h2c) and `iperf3 -s`. Load: a Rust 1-byte echo client on
//! one persistent connection per route (round trip), 300 fresh connections per route (connect
//! and first byte), both with the routes taking turns in chunks; h2load `-c 1 --rps 1000 -D 10`
//! over HTTP/1.1 and h2c (1 KB at a fixed 1,000 requests/s, percentiles from `--log-file`);
//! `wrk -t 1 -c 8` for 5 s (HTTP/1.1 as fast as it goes); iperf3 10 s with 1 and 8 flows.
//! Agent and HAProxy CPU comes from `/proc/PID/stat` (utime + stime) around each run, memory
//! from `/proc/PID/status`.
//!
//! Three interleaved rounds (the order of the paths rotates each round); each figure is the
//! median with the range over the rounds, and the plots (`img/dataplane-*.png`) show the same.
//! CPU used by other processes and steal time are recorded per round. Every process started is
//! killed by PID, also on failure.
//!
//! Run: `cargo bench -p weft-tests --bench dataplane` (needs haproxy, iperf3, nghttp2-client,
//! nginx-light, wrk and openssl; about 10 minutes, plus the release build if it is stale), or
//! `bash tests/bench/run.sh` for every benchmark. It prints a markdown report and writes it
//! into `benchmarks.md` (section "Data plane: Weft vs direct vs HAProxy mTLS") of the docs
//! folder. `WEFT_BENCH_QUICK=1` runs one short round to check the rig and writes nothing.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use weft_tests::agent::{
    AgentSpec, Pki, free_port, gossip_keygen, http_get, wait_until, weft_bin, write_keyring,
};
use weft_tests::bench_report;
use weft_tests::charts::{BarChart, BarSeries, Spread};
use weft_tests::nginx::Nginx;

const ROUNDS: usize = 3;
const RTT_WARMUP: usize = 1_000;
const RTT_SAMPLES: usize = 20_000;
/// A round-trip run stops early after this long, whatever the path's speed.
const RTT_BOUND: Duration = Duration::from_secs(20);
/// Round trips and new connections are measured in this many turns per route.
const CHUNKS: usize = 10;
const NEW_CONNECTIONS: usize = 300;
const NEW_CONNECTIONS_BOUND: Duration = Duration::from_secs(20);
const HTTP_SECONDS: u64 = 10;
const HTTP_RPS: u64 = 1_000;
/// Most requests per second: `wrk` with one thread and this many connections, for this long.
const WRK_CONNECTIONS: usize = 8;
const WRK_SECONDS: u64 = 5;
const IPERF_SECONDS: u64 = 10;
/// The targets.
const TARGET_ADDED_RTT_US: f64 = 25.0;
const TARGET_ADDED_P99_US: f64 = 200.0;
const TARGET_IDLE_RSS_MB: f64 = 15.0;
/// The L7 issue's target: at most 0.05 CPU-seconds per 1,000 requests per agent.
const TARGET_L7_CPU_MS_PER_1K: f64 = 50.0;
/// ztunnel's published figure (Istio 1.24): 0.06 vCPU per 1,000 rps per proxy, i.e. 60 ms of
/// CPU per 1,000 requests per proxy.
const ANCHOR_CPU_MS_PER_1K_PER_PROXY: f64 = 60.0;

/// `WEFT_BENCH_QUICK=1`: one short round, to check the rig; nothing is written to the docs.
fn quick() -> bool {
    std::env::var_os("WEFT_BENCH_QUICK").is_some()
}

/// `WEFT_BENCH_WORKER_THREADS=N`: the agents run with `node.worker_threads = N` (default:
/// the agent's default).
fn worker_threads() -> Option<usize> {
    std::env::var("WEFT_BENCH_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
}

fn rounds() -> usize {
    if quick() { 1 } else { ROUNDS }
}

fn http_seconds() -> u64 {
    if quick() { 2 } else { HTTP_SECONDS }
}

fn iperf_seconds() -> u64 {
    if quick() { 2 } else { IPERF_SECONDS }
}

const HEADING: &str = "Data plane: Weft vs direct vs HAProxy mTLS";
const COMMAND: &str = "cargo bench -p weft-tests --bench dataplane";

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    check_tools()?;
    build_weft()?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let dir = tempfile::Builder::new()
        .prefix("weft-bench-dataplane-")
        .tempdir()?;
    let bench = Bench::start(dir.path())?;
    let setup = started.elapsed();
    let results = bench.run()?;
    let mut report = report(&bench, &results, &load, setup, started.elapsed());
    // A quick run checks the plots too, drawing them where they are thrown away.
    let charts = if quick() {
        dir.path().join("img")
    } else {
        bench_report::charts_dir()
    };
    report.push_str(&render_charts(&results, &charts)?);
    print!("{report}");
    if !quick() {
        bench_report::write_section("benchmarks.md", HEADING, COMMAND, &report)?;
    }
    drop(bench);
    Ok(())
}

/// Fails early, naming the Debian packages, when a tool is missing.
fn check_tools() -> anyhow::Result<()> {
    let tools = [
        ("haproxy", "haproxy"),
        ("iperf3", "iperf3"),
        ("h2load", "nghttp2-client"),
        ("nginx", "nginx-light"),
        ("openssl", "openssl"),
        ("wrk", "wrk"),
    ];
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(tool, _)| {
            !Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {tool}"))
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(_, package)| *package)
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing tools; install them with: apt-get install -y --no-install-recommends {}",
            missing.join(" ")
        );
    }
    Ok(())
}

/// Builds the release `weft` binary the agents run (unless `$WEFT_BIN` names one).
fn build_weft() -> anyhow::Result<()> {
    if std::env::var_os("WEFT_BIN").is_some() {
        return Ok(());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut command = Command::new(cargo);
    // `cargo bench` runs this process with the variables it sets for the weft-tests crate;
    // build scripts (ring's) watch some of them, and would rebuild for nothing.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || [
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "OUT_DIR",
            ]
            .contains(&name.as_ref())
        {
            command.env_remove(name.as_ref());
        }
    }
    let status = command
        .args(["build", "--release", "--bin", "weft", "--manifest-path"])
        .arg(manifest)
        .status()
        .context("run cargo build --release --bin weft")?;
    if !status.success() {
        bail!("cargo build --release --bin weft failed");
    }
    let bin = weft_bin();
    if !bin.to_string_lossy().contains("/release/") {
        bail!(
            "{} is not a release build: run the bench with `cargo bench`",
            bin.display()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Processes.

/// A background process this bench started; killed by PID and reaped when dropped.
struct Background {
    child: Child,
}

impl Background {
    fn spawn(name: &'static str, command: &mut Command, log: &Path) -> anyhow::Result<Background> {
        let out = std::fs::File::create(log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        Ok(Background { child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a bounded foreground run returned.
struct Finished {
    stdout: String,
    stderr: String,
    success: bool,
    /// Largest VmRSS (kB) seen for each watched PID while it ran.
    max_rss_kb: Vec<u64>,
}

/// Runs `command` to the end or until `bound` (then kills it by PID), sampling the RSS of
/// `watch` every 100 ms. Output goes through files, so large outputs cannot block it.
fn run_bounded(
    command: &mut Command,
    bound: Duration,
    watch: &[u32],
    scratch: &Path,
) -> anyhow::Result<Finished> {
    let out_path = scratch.join("run.stdout");
    let err_path = scratch.join("run.stderr");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("start {command:?}"))?;
    let started = Instant::now();
    let mut max_rss_kb = vec![0u64; watch.len()];
    let status = loop {
        for (max, pid) in max_rss_kb.iter_mut().zip(watch) {
            *max = (*max).max(status_kb(*pid, "VmRSS").unwrap_or(0));
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > bound {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{command:?} did not finish within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Ok(Finished {
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        success: status.success(),
        max_rss_kb,
    })
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`).
fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// Fields of `/proc/PID/stat` after the command name, parsed as numbers (index 11 = utime).
fn stat_fields(pid: &str) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    stat_fields(&pid.to_string())
        .map(|f| (f[11] + f[12]) as f64 / clock_ticks_per_second())
        .unwrap_or(0.0)
}

/// utime + stime of this process plus its reaped children (the load tools), in seconds.
fn own_cpu_seconds() -> f64 {
    stat_fields("self")
        .map(|f| (f[11] + f[12] + f[13] + f[14]) as f64 / clock_ticks_per_second())
        .unwrap_or(0.0)
}

/// Machine-wide CPU counters (seconds over all cores): busy (user, nice, system; irq and
/// softirq time is charged to no process, so it is left out), steal, and total.
#[derive(Clone, Copy, Default)]
struct MachineCpu {
    busy: f64,
    steal: f64,
    total: f64,
}

fn machine_cpu() -> MachineCpu {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return MachineCpu::default();
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse::<f64>().unwrap_or(0.0) / clock_ticks_per_second())
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0.0);
    MachineCpu {
        busy: at(0) + at(1) + at(2),
        steal: at(7),
        total: (0..8).map(at).sum(),
    }
}

/// `(name, utime + stime in seconds)` of every process, by PID.
fn process_cpu_by_pid() -> BTreeMap<u32, (String, f64)> {
    let ticks = clock_ticks_per_second();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return BTreeMap::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let name = text[text.find('(')? + 1..text.rfind(')')?].to_string();
            let f = stat_fields(&pid.to_string())?;
            Some((pid, (name, (f[11] + f[12]) as f64 / ticks)))
        })
        .collect()
}

/// The three processes, other than this bench and the ones it started, that used the most
/// CPU between two snapshots (alive at both), as % of all cores over `total` CPU seconds.
fn top_others(
    before: &BTreeMap<u32, (String, f64)>,
    after: &BTreeMap<u32, (String, f64)>,
    ours: &[u32],
    total: f64,
) -> Vec<(String, f64)> {
    let me = std::process::id();
    let mut used: Vec<(String, f64)> = after
        .iter()
        .filter(|(pid, _)| **pid != me && !ours.contains(pid))
        .filter_map(|(pid, (name, cpu))| {
            let (_, earlier) = before.get(pid)?;
            Some((format!("{name} ({pid})"), 100.0 * (cpu - earlier) / total))
        })
        .filter(|(_, pct)| *pct >= 0.1)
        .collect();
    used.sort_by(|a, b| b.1.total_cmp(&a.1));
    used.truncate(3);
    used
}

fn wait_for_port(port: u16, what: &str) -> anyhow::Result<()> {
    wait_until(Duration::from_secs(15), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .map(|_| ())
    .with_context(|| format!("{what} is not listening on 127.0.0.1:{port}"))
}

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The rig: servers, HAProxy pair, Weft agents.

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Route {
    Direct,
    Haproxy,
    Weft,
    /// Diagnostic: an `[[upstream]]` of agent B to its own service (TCP relay, no tunnel).
    WeftLocal,
    /// HTTP only: the same two agents with the web services registered as `http` / `http2`,
    /// so each request is routed, balanced and counted on its own (L7).
    WeftL7,
}

impl Route {
    const ALL: [Route; 3] = [Route::Direct, Route::Haproxy, Route::Weft];

    fn label(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Haproxy => "HAProxy pair",
            Route::Weft => "Weft",
            Route::WeftLocal => "Weft, one agent (no tunnel)",
            Route::WeftL7 => "Weft L7",
        }
    }
}

/// The protocol of an h2load run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HttpVersion {
    Http1,
    /// HTTP/2 over cleartext with prior knowledge, as apps speak it to the local agent.
    H2c,
}

impl HttpVersion {
    fn metric_prefix(self) -> &'static str {
        match self {
            HttpVersion::Http1 => "http",
            HttpVersion::H2c => "h2",
        }
    }
}

/// Where a client connects for each server on one route.
#[derive(Clone, Copy)]
struct Ports {
    echo: u16,
    /// nginx over HTTP/1.1.
    http: u16,
    /// nginx over h2c (HTTP/2 with prior knowledge).
    h2: u16,
    iperf: u16,
}

struct Bench {
    dir: PathBuf,
    versions: String,
    direct: Ports,
    haproxy: Ports,
    weft: Ports,
    weft_local: Ports,
    weft_l7: Ports,
    /// Client-side and server-side HAProxy.
    haproxy_pids: [u32; 2],
    /// Agent A (upstream listeners) and agent B (services).
    agent_pids: [u32; 2],
    nginx: Nginx,
    /// (HAProxy client side, server side, agent A, agent B) idle RSS in kB, after one probe.
    idle_rss_kb: [u64; 4],
    /// The part of it that is the process's own memory (`RssAnon`: heap, stacks), not pages of
    /// its executable and libraries (`RssFile`, shared and reclaimable), kB.
    idle_anon_kb: [u64; 4],
    /// Every process started, killed by PID when dropped.
    background: Vec<Background>,
}

impl Bench {
    fn start(dir: &Path) -> anyhow::Result<Bench> {
        let mut background = Vec::new();
        let nginx = Nginx::start(dir)?;
        let direct = Ports {
            echo: start_echo_server()?,
            http: nginx.http_port,
            h2: nginx.h2_port,
            iperf: free_port(),
        };

        background.push(Background::spawn(
            "iperf3 server",
            Command::new("iperf3").args(["-s", "-B", "127.0.0.1", "-p", &direct.iperf.to_string()]),
            &dir.join("iperf3-server.log"),
        )?);
        wait_for_port(direct.iperf, "iperf3 -s")?;

        // HAProxy mTLS pair.
        let certs = haproxy_pki(&dir.join("haproxy-pki"))?;
        let haproxy = Ports {
            echo: free_port(),
            http: free_port(),
            h2: free_port(),
            iperf: free_port(),
        };
        let tls = Ports {
            echo: free_port(),
            http: free_port(),
            h2: free_port(),
            iperf: free_port(),
        };
        let client_side = format!(
            "global\n  nbthread 1\n  ssl-default-server-options ssl-min-ver TLSv1.3\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 5m\n  timeout server 5m\n{}",
            [
                ("echo", haproxy.echo, tls.echo),
                ("http", haproxy.http, tls.http),
                ("h2", haproxy.h2, tls.h2),
                ("iperf", haproxy.iperf, tls.iperf),
            ]
            .iter()
            .map(|(name, listen, peer)| format!(
                "listen {name}_out\n  bind 127.0.0.1:{listen}\n  server peer 127.0.0.1:{peer} ssl crt {c}/client.pem ca-file {c}/ca.crt verify required verifyhost server.mesh.local\n",
                c = certs.display()
            ))
            .collect::<String>()
        );
        let server_side = format!(
            "global\n  nbthread 1\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 5m\n  timeout server 5m\n{}",
            [
                ("echo", tls.echo, direct.echo),
                ("http", tls.http, direct.http),
                ("h2", tls.h2, direct.h2),
                ("iperf", tls.iperf, direct.iperf),
            ]
            .iter()
            .map(|(name, listen, backend)| format!(
                "listen {name}_in\n  bind 127.0.0.1:{listen} ssl crt {c}/server.pem ca-file {c}/ca.crt verify required\n  server backend 127.0.0.1:{backend}\n",
                c = certs.display()
            ))
            .collect::<String>()
        );
        let mut haproxy_pids = [0; 2];
        for (i, (name, text)) in [("client", client_side), ("server", server_side)]
            .into_iter()
            .enumerate()
        {
            let conf = dir.join(format!("haproxy-{name}.cfg"));
            std::fs::write(&conf, text)?;
            let process = Background::spawn(
                if i == 0 {
                    "haproxy (client side)"
                } else {
                    "haproxy (server side)"
                },
                Command::new("haproxy").arg("-db").arg("-f").arg(&conf),
                &dir.join(format!("haproxy-{name}.log")),
            )?;
            haproxy_pids[i] = process.pid();
            background.push(process);
        }
        for port in [tls.echo, tls.http, tls.h2, tls.iperf] {
            wait_for_port(port, "server-side haproxy")?;
        }
        for port in [haproxy.echo, haproxy.http, haproxy.h2, haproxy.iperf] {
            wait_for_port(port, "client-side haproxy")?;
        }

        // Weft: agent B (CA host) runs the services, agent A has the upstream listeners.
        let weft = Ports {
            echo: free_port(),
            http: free_port(),
            h2: free_port(),
            iperf: free_port(),
        };
        let weft_l7 = Ports {
            echo: 0,
            http: free_port(),
            h2: free_port(),
            iperf: 0,
        };
        let keyring = write_keyring(dir, "gossip.keys", &[gossip_keygen()]);
        let pki = Pki::new(dir);
        let mut b = AgentSpec::loopback("b", &keyring, &pki);
        b.seeds = vec![b.gossip_addr()];
        b.ca = Some(pki.intermediate("b"));
        let weft_local = Ports {
            echo: free_port(),
            http: 0,
            h2: 0,
            iperf: free_port(),
        };
        // `web` / `web-h2c` are TCP services (L4, spliced); `web-l7` / `web-l7-h2` are the same
        // nginx listeners registered as HTTP services (L7, per request).
        b.extra = format!(
            "[[service]]\nname = \"echo\"\nport = {}\n\n[[service]]\nname = \"web\"\nport = {}\n\n\
             [[service]]\nname = \"web-h2c\"\nport = {}\n\n\
             [[service]]\nname = \"web-l7\"\nport = {}\nprotocol = \"http\"\n\n\
             [[service]]\nname = \"web-l7-h2\"\nport = {}\nprotocol = \"http2\"\n\n\
             [[service]]\nname = \"iperf\"\nport = {}\n\n\
             [[upstream]]\nservice = \"echo\"\nlisten = \"127.0.0.1:{}\"\n\n\
             [[upstream]]\nservice = \"iperf\"\nlisten = \"127.0.0.1:{}\"\n",
            direct.echo,
            direct.http,
            direct.h2,
            direct.http,
            direct.h2,
            direct.iperf,
            weft_local.echo,
            weft_local.iperf
        );
        let mut admin_ports = [0u16; 2];
        let mut a = AgentSpec::loopback("a", &keyring, &pki);
        a.seeds = vec![b.gossip_addr()];
        let token = dir.join("a.token");
        pki.write_token(&token, "a", &["default/client"], Duration::from_secs(3600));
        a.join_token = Some(token);
        a.extra = format!(
            "[[upstream]]\nservice = \"echo\"\nlisten = \"127.0.0.1:{}\"\n\n\
             [[upstream]]\nservice = \"web\"\nlisten = \"127.0.0.1:{}\"\n\n\
             [[upstream]]\nservice = \"web-h2c\"\nlisten = \"127.0.0.1:{}\"\n\n\
             [[upstream]]\nservice = \"web-l7\"\nlisten = \"127.0.0.1:{}\"\n\n\
             [[upstream]]\nservice = \"web-l7-h2\"\nlisten = \"127.0.0.1:{}\"\n\n\
             [[upstream]]\nservice = \"iperf\"\nlisten = \"127.0.0.1:{}\"\n",
            weft.echo, weft.http, weft.h2, weft_l7.http, weft_l7.h2, weft.iperf
        );
        let mut agent_pids = [0; 2];
        let node_keys = match worker_threads() {
            Some(n) => format!("[node]\nworker_threads = {n}\n"),
            None => "[node]\n".into(),
        };
        for (i, spec) in [a, b].into_iter().enumerate() {
            let config = dir.join(format!("{}.toml", spec.name));
            std::fs::write(
                &config,
                spec.config_text(dir)
                    .replace("level = \"info,weft_discovery=debug\"", "level = \"info\"")
                    .replace("[node]\n", &node_keys),
            )?;
            let agent = Background::spawn(
                if i == 0 {
                    "weft agent a"
                } else {
                    "weft agent b"
                },
                Command::new(weft_bin()).arg("agent").arg("-c").arg(&config),
                &dir.join(format!("{}.log", spec.name)),
            )?;
            agent_pids[i] = agent.pid();
            background.push(agent);
            admin_ports[i] = spec.http_port;
        }
        let logs = || {
            ["a", "b"]
                .iter()
                .map(|n| {
                    let log =
                        std::fs::read_to_string(dir.join(format!("{n}.log"))).unwrap_or_default();
                    format!("--- agent {n} ---\n{log}")
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let ready = wait_until(Duration::from_secs(60), || {
            admin_ports.iter().all(|port| {
                http_get(SocketAddr::from(([127, 0, 0, 1], *port)), "/ready")
                    .is_ok_and(|(status, _)| status == 200)
            })
        });
        if ready.is_none() {
            bail!("the agents did not become ready within 60 s:\n{}", logs());
        }

        // One probe on each route (opens Weft's pooled tunnel), then idle memory.
        for route_ports in [direct, haproxy, weft, weft_local] {
            probe_echo(route_ports.echo).with_context(logs)?;
        }
        for port in [weft.http, weft_l7.http] {
            let (status, body) =
                http_get(SocketAddr::from(([127, 0, 0, 1], port)), "/1k").with_context(logs)?;
            if status != 200 || body.len() != 1024 {
                bail!(
                    "GET /1k through port {port}: status {status}, {} bytes\n{}",
                    body.len(),
                    logs()
                );
            }
        }
        std::thread::sleep(Duration::from_secs(2));
        let proxies = [
            haproxy_pids[0],
            haproxy_pids[1],
            agent_pids[0],
            agent_pids[1],
        ];
        let idle_rss_kb = proxies.map(|pid| status_kb(pid, "VmRSS").unwrap_or(0));
        let idle_anon_kb = proxies.map(|pid| status_kb(pid, "RssAnon").unwrap_or(0));

        let versions = [
            first_line("haproxy", &["-v"]),
            first_line("nginx", &["-v"]),
            first_line("h2load", &["--version"]),
            first_line("iperf3", &["--version"]),
            first_line("openssl", &["version"]),
        ]
        .join("; ");
        Ok(Bench {
            dir: dir.to_path_buf(),
            versions,
            direct,
            haproxy,
            weft,
            weft_local,
            weft_l7,
            haproxy_pids,
            agent_pids,
            nginx,
            idle_rss_kb,
            idle_anon_kb,
            background,
        })
    }

    fn ports(&self, route: Route) -> Ports {
        match route {
            Route::Direct => self.direct,
            Route::Haproxy => self.haproxy,
            Route::Weft => self.weft,
            Route::WeftLocal => self.weft_local,
            Route::WeftL7 => self.weft_l7,
        }
    }

    /// The two proxy processes of a route (none for direct).
    fn proxies(&self, route: Route) -> Vec<u32> {
        match route {
            Route::Direct => Vec::new(),
            Route::Haproxy => self.haproxy_pids.to_vec(),
            Route::Weft | Route::WeftL7 => self.agent_pids.to_vec(),
            Route::WeftLocal => vec![self.agent_pids[1]],
        }
    }

    fn long_lived_pids(&self) -> Vec<u32> {
        let mut pids = vec![self.nginx.pid()];
        pids.extend(self.haproxy_pids);
        pids.extend(self.agent_pids);
        pids.extend(self.background.iter().map(Background::pid));
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    fn run(&self) -> anyhow::Result<Results> {
        let mut results = Results::default();
        for round in 0..rounds() {
            let mut order = Route::ALL;
            order.rotate_left(round);
            let ours_before: f64 = own_cpu_seconds()
                + self
                    .long_lived_pids()
                    .iter()
                    .map(|p| cpu_seconds(*p))
                    .sum::<f64>();
            let machine_before = machine_cpu();
            let others_before = process_cpu_by_pid();
            let round_started = Instant::now();
            // The one-agent diagnostic route takes its turns with the others.
            let mut echo_routes = order.to_vec();
            echo_routes.push(Route::WeftLocal);
            let echo_ports: Vec<u16> = echo_routes.iter().map(|r| self.ports(*r).echo).collect();
            let echo_pids: Vec<Vec<u32>> = echo_routes.iter().map(|r| self.proxies(*r)).collect();
            for (route, rtt) in echo_routes
                .iter()
                .zip(echo_round_trips(&echo_ports, &echo_pids)?)
            {
                results.add(*route, "rtt_switches", rtt.switches);
                results.add(*route, "rtt_p50", rtt.p50);
                results.add(*route, "rtt_p90", rtt.p90);
                results.add(*route, "rtt_p99", rtt.p99);
                results.add(*route, "rtt_n", rtt.count as f64);
            }
            for (route, (p50, p99, n)) in echo_routes.iter().zip(new_connections(&echo_ports)?) {
                results.add(*route, "conn_p50", p50);
                results.add(*route, "conn_p99", p99);
                results.add(*route, "conn_n", n as f64);
            }
            // The HTTP runs add the L7 route, in its turn with the others.
            let mut http_routes = vec![Route::Direct, Route::Haproxy, Route::Weft, Route::WeftL7];
            let turn = round % http_routes.len();
            http_routes.rotate_left(turn);
            for version in [HttpVersion::Http1, HttpVersion::H2c] {
                for route in &http_routes {
                    self.http_run(*route, version, &mut results)?;
                }
            }
            for route in &http_routes {
                self.wrk_run(*route, &mut results)?;
            }
            for flows in [1, 8] {
                for route in order {
                    self.iperf_run(route, flows, &mut results)?;
                }
            }
            // Diagnostic: the same agent code relaying TCP on one host, without the tunnel.
            self.iperf_run(Route::WeftLocal, 1, &mut results)?;
            let machine_after = machine_cpu();
            let others_after = process_cpu_by_pid();
            let ours_after: f64 = own_cpu_seconds()
                + self
                    .long_lived_pids()
                    .iter()
                    .map(|p| cpu_seconds(*p))
                    .sum::<f64>();
            let total = (machine_after.total - machine_before.total).max(1e-9);
            let other =
                ((machine_after.busy - machine_before.busy) - (ours_after - ours_before)).max(0.0);
            results.rounds.push(RoundNoise {
                seconds: round_started.elapsed().as_secs_f64(),
                steal_pct: 100.0 * (machine_after.steal - machine_before.steal) / total,
                other_pct: 100.0 * other / total,
                top_others: top_others(
                    &others_before,
                    &others_after,
                    &self.long_lived_pids(),
                    total,
                ),
            });
            eprintln!(
                "round {} done in {:.0} s",
                round + 1,
                round_started.elapsed().as_secs_f64()
            );
        }
        let rss = |pid, field| status_kb(pid, field).unwrap_or(0);
        std::thread::sleep(Duration::from_secs(2));
        results.after_rss_kb = [
            rss(self.haproxy_pids[0], "VmRSS"),
            rss(self.haproxy_pids[1], "VmRSS"),
            rss(self.agent_pids[0], "VmRSS"),
            rss(self.agent_pids[1], "VmRSS"),
        ];
        results.peak_rss_kb = [
            rss(self.haproxy_pids[0], "VmHWM"),
            rss(self.haproxy_pids[1], "VmHWM"),
            rss(self.agent_pids[0], "VmHWM"),
            rss(self.agent_pids[1], "VmHWM"),
        ];
        Ok(results)
    }

    /// h2load, 1 KB over HTTP/1.1 or h2c, one connection at a fixed 1,000 requests/s for 10 s.
    fn http_run(
        &self,
        route: Route,
        version: HttpVersion,
        results: &mut Results,
    ) -> anyhow::Result<()> {
        let prefix = version.metric_prefix();
        let (port, protocol_args): (u16, &[&str]) = match version {
            HttpVersion::Http1 => (self.ports(route).http, &["--h1"]),
            HttpVersion::H2c => (self.ports(route).h2, &[]),
        };
        let log = self.dir.join("h2load.tsv");
        let _ = std::fs::remove_file(&log);
        let proxies = self.proxies(route);
        let idle_agents = if matches!(route, Route::Weft | Route::WeftL7) {
            Vec::new()
        } else {
            self.agent_pids.to_vec()
        };
        let cpu_before: Vec<f64> = proxies.iter().map(|p| cpu_seconds(*p)).collect();
        let idle_before: f64 = idle_agents.iter().map(|p| cpu_seconds(*p)).sum();
        let started = Instant::now();
        let finished = run_bounded(
            Command::new("h2load")
                .args(protocol_args)
                .args(["-c", "1", "--rps"])
                .arg(HTTP_RPS.to_string())
                .arg("-D")
                .arg(http_seconds().to_string())
                .arg("--log-file")
                .arg(&log)
                .arg(format!("http://127.0.0.1:{port}/1k")),
            Duration::from_secs(http_seconds() + 30),
            &proxies,
            &self.dir,
        )?;
        let wall = started.elapsed().as_secs_f64();
        let cpu: Vec<f64> = proxies
            .iter()
            .zip(&cpu_before)
            .map(|(p, before)| cpu_seconds(*p) - before)
            .collect();
        let idle_cpu = idle_agents.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - idle_before;
        if !finished.success {
            bail!(
                "h2load ({prefix}) on {} failed: {}{}",
                route.label(),
                finished.stdout,
                finished.stderr
            );
        }
        let succeeded = h2load_count(&finished.stdout, "succeeded").unwrap_or(0);
        let failed = h2load_count(&finished.stdout, "failed").unwrap_or(0)
            + h2load_count(&finished.stdout, "errored").unwrap_or(0);
        if failed * 100 > succeeded + failed {
            let agent_log = |name: &str| {
                let log = std::fs::read_to_string(self.dir.join(format!("{name}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            };
            bail!(
                "h2load ({prefix}) on {}: {failed} of {} requests failed:\n{}\n--- agent a ---\n{}\n--- agent b ---\n{}",
                route.label(),
                succeeded + failed,
                finished.stdout,
                agent_log("a"),
                agent_log("b")
            );
        }
        let mut us: Vec<f64> = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (f.len() >= 3 && f[1] != "-1")
                    .then(|| f[2].trim().parse::<f64>().ok())
                    .flatten()
            })
            .collect();
        if us.len() < 100 {
            bail!(
                "h2load ({prefix}) on {} logged {} requests: {}",
                route.label(),
                us.len(),
                finished.stdout
            );
        }
        us.sort_by(f64::total_cmp);
        let metric = |name: &str| format!("{prefix}_{name}");
        results.add(route, &metric("p50"), percentile(&us, 0.50));
        results.add(route, &metric("p90"), percentile(&us, 0.90));
        results.add(route, &metric("p99"), percentile(&us, 0.99));
        results.add(
            route,
            &metric("rps"),
            succeeded as f64 / http_seconds() as f64,
        );
        results.add(route, &metric("failed"), failed as f64);
        if !idle_agents.is_empty() && version == HttpVersion::Http1 {
            // Both agents were idle (gossip only) during this run: their background cost.
            results.add(route, "agents_idle_cpu_pct", 100.0 * idle_cpu / wall);
        }
        if !proxies.is_empty() && succeeded > 0 {
            let per_1k = |s: f64| 1000.0 * s / (succeeded as f64 / 1000.0);
            results.add(route, &metric("cpu_1k_ms"), per_1k(cpu.iter().sum()));
            results.add(route, &metric("cpu_1k_ms_client"), per_1k(cpu[0]));
            results.add(route, &metric("cpu_1k_ms_server"), per_1k(cpu[1]));
            results.add(route, &metric("rss_client"), finished.max_rss_kb[0] as f64);
            results.add(route, &metric("rss_server"), finished.max_rss_kb[1] as f64);
        }
        Ok(())
    }

    /// `wrk` over HTTP/1.1 as fast as it goes: requests per second, latency and failures.
    fn wrk_run(&self, route: Route, results: &mut Results) -> anyhow::Result<()> {
        let proxies = self.proxies(route);
        let cpu_before: f64 = proxies.iter().map(|p| cpu_seconds(*p)).sum();
        let seconds = if quick() { 2 } else { WRK_SECONDS };
        let finished = run_bounded(
            Command::new("wrk")
                .args(["-t", "1", "--latency", "-c"])
                .arg(WRK_CONNECTIONS.to_string())
                .arg("-d")
                .arg(format!("{seconds}s"))
                .arg(format!("http://127.0.0.1:{}/1k", self.ports(route).http)),
            Duration::from_secs(seconds + 30),
            &proxies,
            &self.dir,
        )?;
        let cpu = proxies.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - cpu_before;
        let report = WrkReport::parse(&finished.stdout).with_context(|| {
            format!(
                "wrk on {}: {}{}",
                route.label(),
                finished.stdout,
                finished.stderr
            )
        })?;
        results.add(route, "wrk_rps", report.requests_per_second);
        results.add(route, "wrk_p50", report.p50_us);
        results.add(route, "wrk_p99", report.p99_us);
        results.add(route, "wrk_failed", report.failed as f64);
        if !proxies.is_empty() && report.requests > 0 {
            results.add(
                route,
                "wrk_cpu_1k_ms",
                1000.0 * cpu / (report.requests as f64 / 1000.0) / proxies.len() as f64,
            );
        }
        Ok(())
    }

    /// iperf3 for 10 s with `flows` parallel flows.
    fn iperf_run(&self, route: Route, flows: usize, results: &mut Results) -> anyhow::Result<()> {
        let proxies = self.proxies(route);
        let cpu_before: f64 = proxies.iter().map(|p| cpu_seconds(*p)).sum();
        let udp_before = udp_counters();
        let mut command = Command::new("iperf3");
        command
            .args(["-c", "127.0.0.1", "-J", "-t"])
            .arg(iperf_seconds().to_string())
            .arg("-p")
            .arg(self.ports(route).iperf.to_string());
        if flows > 1 {
            command.arg("-P").arg(flows.to_string());
        }
        let finished = run_bounded(
            &mut command,
            Duration::from_secs(iperf_seconds() + 30),
            &proxies,
            &self.dir,
        )?;
        let cpu = proxies.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - cpu_before;
        let udp_after = udp_counters();
        let udp = |field: &str| {
            udp_after.get(field).copied().unwrap_or(0) as f64
                - udp_before.get(field).copied().unwrap_or(0) as f64
        };
        let json: serde_json::Value =
            serde_json::from_str(&finished.stdout).with_context(|| {
                format!(
                    "iperf3 on {}: {}{}",
                    route.label(),
                    finished.stdout,
                    finished.stderr
                )
            })?;
        let Some(bits) = json["end"]["sum_received"]["bits_per_second"].as_f64() else {
            bail!(
                "iperf3 on {} reported no throughput: {}",
                route.label(),
                json["error"]
            );
        };
        let bytes = json["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
        results.add(route, &format!("iperf_{flows}"), bits / 1e9);
        if route == Route::Weft && bytes > 0.0 {
            // Payload bytes per UDP datagram the kernel counted (both directions), and drops.
            let datagrams = udp("InDatagrams") + udp("OutDatagrams");
            results.add(
                route,
                &format!("iperf_{flows}_bytes_per_datagram"),
                bytes / datagrams.max(1.0),
            );
            results.add(
                route,
                &format!("iperf_{flows}_udp_drops"),
                udp("RcvbufErrors") + udp("SndbufErrors"),
            );
            results.add(
                route,
                &format!("iperf_{flows}_cpu_us_per_datagram"),
                1e6 * cpu / datagrams.max(1.0),
            );
        }
        if !proxies.is_empty() && bytes > 0.0 {
            results.add(
                route,
                &format!("iperf_{flows}_cpu_per_gb"),
                cpu / (bytes / 1e9),
            );
            results.add(
                route,
                &format!("iperf_{flows}_rss"),
                finished.max_rss_kb.iter().copied().max().unwrap_or(0) as f64,
            );
        }
        Ok(())
    }
}

/// Voluntary plus involuntary context switches of every thread of a process.
fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// The kernel's UDP counters (`Udp:` lines of `/proc/net/snmp`), by name.
fn udp_counters() -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp:")).collect();
    match lines.as_slice() {
        [names, values, ..] => names
            .split_whitespace()
            .skip(1)
            .zip(values.split_whitespace().skip(1))
            .map(|(n, v)| (n.to_string(), v.parse().unwrap_or(0)))
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// A count from h2load's `requests:` line, e.g. `succeeded`.
fn h2load_count(stdout: &str, what: &str) -> Option<u64> {
    let line = stdout.lines().find(|l| l.starts_with("requests:"))?;
    line.split(',').find_map(|part| {
        let part = part.trim().trim_start_matches("requests:").trim();
        let (n, label) = part.split_once(' ')?;
        (label.trim() == what).then(|| n.parse().ok()).flatten()
    })
}

/// CA, server and client certificates (ECDSA P-256) for the HAProxy pair, as tools.md does.
fn haproxy_pki(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let sh = |script: &str| -> anyhow::Result<()> {
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .output()?;
        if !out.status.success() {
            bail!(
                "openssl failed: {script}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    sh(
        "openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout ca.key -out ca.crt -days 2 -subj /CN=bench-ca",
    )?;
    for (who, eku) in [("server", "serverAuth"), ("client", "clientAuth")] {
        sh(&format!(
            "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
             -keyout {who}.key -out {who}.csr -subj /CN={who}.mesh.local && \
             printf 'subjectAltName=DNS:{who}.mesh.local,IP:127.0.0.1\\nextendedKeyUsage={eku}\\nkeyUsage=digitalSignature\\n' > {who}.ext && \
             openssl x509 -req -in {who}.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out {who}.crt -days 2 -extfile {who}.ext && \
             cat {who}.crt {who}.key > {who}.pem"
        ))?;
    }
    Ok(dir.to_path_buf())
}

// ---------------------------------------------------------------------------------------------
// The echo server and the TCP clients.

/// A 1-byte-friendly echo server: a thread per connection, TCP_NODELAY. Returns its port.
fn start_echo_server() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    Ok(port)
}

fn echo_connection(port: u16) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(stream)
}

/// Retries one echo round trip for up to 30 s (a route may take a moment to be usable).
fn probe_echo(port: u16) -> anyhow::Result<()> {
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(30), || {
        let attempt = || -> anyhow::Result<()> {
            let mut stream = echo_connection(port)?;
            let mut byte = [0u8; 1];
            for _ in 0..10 {
                stream.write_all(b"x")?;
                stream.read_exact(&mut byte)?;
            }
            Ok(())
        };
        attempt().map_err(|e| last = e.to_string()).is_ok()
    });
    ok.map(|_| ())
        .with_context(|| format!("no echo through 127.0.0.1:{port}: {last}"))
}

/// Percentiles (µs) of one route's round trips, their count, and the context switches of the
/// route's proxies per round trip.
struct RoundTrips {
    p50: f64,
    p90: f64,
    p99: f64,
    count: usize,
    switches: f64,
}

/// 1-byte round trips, one persistent connection per route, the routes taking turns in
/// [`CHUNKS`] chunks so that drifting VM wake-up latency hits every route alike. Returns, per
/// route: p50, p90, p99 (µs), the count, and the context switches of the route's proxy
/// processes (`pids`, every thread) per round trip.
fn echo_round_trips(ports: &[u16], pids: &[Vec<u32>]) -> anyhow::Result<Vec<RoundTrips>> {
    let mut streams = ports
        .iter()
        .map(|port| echo_connection(*port))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut byte = [0u8; 1];
    for stream in &mut streams {
        for _ in 0..RTT_WARMUP {
            stream.write_all(b"x")?;
            stream.read_exact(&mut byte)?;
        }
    }
    let mut us = vec![Vec::with_capacity(RTT_SAMPLES); ports.len()];
    let mut switches = vec![0u64; ports.len()];
    let started = Instant::now();
    for _ in 0..CHUNKS {
        for (i, (stream, us)) in streams.iter_mut().zip(&mut us).enumerate() {
            let before: u64 = pids[i].iter().map(|p| context_switches(*p)).sum();
            for _ in 0..RTT_SAMPLES / CHUNKS {
                let t = Instant::now();
                stream.write_all(b"x")?;
                stream.read_exact(&mut byte)?;
                us.push(t.elapsed().as_secs_f64() * 1e6);
            }
            let after: u64 = pids[i].iter().map(|p| context_switches(*p)).sum();
            switches[i] += after.saturating_sub(before);
        }
        if started.elapsed() > RTT_BOUND {
            break;
        }
    }
    Ok(us
        .into_iter()
        .zip(switches)
        .map(|(mut us, switches)| {
            us.sort_by(f64::total_cmp);
            RoundTrips {
                p50: percentile(&us, 0.50),
                p90: percentile(&us, 0.90),
                p99: percentile(&us, 0.99),
                count: us.len(),
                switches: switches as f64 / us.len().max(1) as f64,
            }
        })
        .collect())
}

/// Fresh connections, each timed from connect to the first echoed byte, the routes taking
/// turns in [`CHUNKS`] chunks. Returns, per route: p50, p99 (µs) and the count.
fn new_connections(ports: &[u16]) -> anyhow::Result<Vec<(f64, f64, usize)>> {
    let mut us = vec![Vec::with_capacity(NEW_CONNECTIONS); ports.len()];
    let started = Instant::now();
    for _ in 0..CHUNKS {
        for (port, us) in ports.iter().zip(&mut us) {
            for _ in 0..NEW_CONNECTIONS / CHUNKS {
                let t = Instant::now();
                let mut stream = echo_connection(*port)?;
                let mut byte = [0u8; 1];
                stream.write_all(b"x")?;
                stream.read_exact(&mut byte)?;
                us.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        if started.elapsed() > NEW_CONNECTIONS_BOUND {
            break;
        }
    }
    Ok(us
        .into_iter()
        .map(|mut us| {
            us.sort_by(f64::total_cmp);
            (percentile(&us, 0.50), percentile(&us, 0.99), us.len())
        })
        .collect())
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

// ---------------------------------------------------------------------------------------------
// Results and the report.

struct RoundNoise {
    seconds: f64,
    steal_pct: f64,
    other_pct: f64,
    /// The busiest other processes seen at both ends of the round: name and % of both cores.
    top_others: Vec<(String, f64)>,
}

#[derive(Default)]
struct Results {
    /// (route, metric) → one value per round.
    values: BTreeMap<(Route, String), Vec<f64>>,
    rounds: Vec<RoundNoise>,
    /// VmRSS 2 s after the last round (HAProxy client, server, agent A, agent B), kB.
    after_rss_kb: [u64; 4],
    /// VmHWM at the end, kB.
    peak_rss_kb: [u64; 4],
}

impl Results {
    fn add(&mut self, route: Route, metric: &str, value: f64) {
        self.values
            .entry((route, metric.to_string()))
            .or_default()
            .push(value);
    }

    fn get(&self, route: Route, metric: &str) -> &[f64] {
        self.values
            .get(&(route, metric.to_string()))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    fn median(&self, route: Route, metric: &str) -> f64 {
        median(self.get(route, metric))
    }

    /// Median over rounds of `f(weft, other)`, pairing values of the same round.
    fn paired(&self, metric: &str, other: Route, f: impl Fn(f64, f64) -> f64) -> f64 {
        self.paired_routes(Route::Weft, metric, other, f)
    }

    /// Median over rounds of `f(route, other)`, pairing values of the same round.
    fn paired_routes(
        &self,
        route: Route,
        metric: &str,
        other: Route,
        f: impl Fn(f64, f64) -> f64,
    ) -> f64 {
        let ours = self.get(route, metric);
        let base = self.get(other, metric);
        let pairs: Vec<f64> = ours.iter().zip(base).map(|(w, b)| f(*w, *b)).collect();
        median(&pairs)
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `median (min–max)` with `digits` decimals.
fn cell(values: &[f64], digits: usize) -> String {
    if values.is_empty() {
        return "–".into();
    }
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(
        "{:.digits$} ({:.digits$}–{:.digits$})",
        median(values),
        min,
        max
    )
}

fn mb(kb: f64) -> f64 {
    kb * 1024.0 / 1e6
}

/// One table row comparing the three routes.
struct Row<'a> {
    figure: &'a str,
    metric: &'a str,
    digits: usize,
    /// Whether the direct route has this figure.
    has_direct: bool,
    /// Unit suffix of the "added" column.
    unit: &'a str,
    /// Target check on (results) → text.
    target: Option<&'a dyn Fn(&Results) -> String>,
    /// Converts raw values for display.
    scale: fn(f64) -> f64,
}

fn row(results: &Results, row: &Row) -> String {
    let scaled = |route: Route| -> Vec<f64> {
        results
            .get(route, row.metric)
            .iter()
            .map(|v| (row.scale)(*v))
            .collect()
    };
    let direct = if row.has_direct {
        cell(&scaled(Route::Direct), row.digits)
    } else {
        "–".into()
    };
    let added = if row.has_direct {
        let a = results.paired(row.metric, Route::Direct, |w, d| {
            (row.scale)(w) - (row.scale)(d)
        });
        format!("{a:+.digits$}{}", row.unit, digits = row.digits)
    } else {
        "–".into()
    };
    let ratio = results.paired(row.metric, Route::Haproxy, |w, h| w / h);
    format!(
        "| {} | {} | {} | {} | {} | {:.2}× | {} |\n",
        row.figure,
        direct,
        cell(&scaled(Route::Haproxy), row.digits),
        cell(&scaled(Route::Weft), row.digits),
        added,
        ratio,
        row.target.map(|t| t(results)).unwrap_or_default()
    )
}

fn verdict(met: bool) -> &'static str {
    if met { "**met**" } else { "**not met**" }
}

fn report(
    bench: &Bench,
    results: &Results,
    load: &str,
    setup: Duration,
    whole: Duration,
) -> String {
    let id = |v: f64| v;
    let added = |metric: &str| results.paired(metric, Route::Direct, |w, d| w - d);
    let rtt_target = |r: &Results| {
        let a = r.paired("rtt_p50", Route::Direct, |w, d| w - d);
        format!(
            "added p50 ≤ {TARGET_ADDED_RTT_US:.0} µs: {}",
            verdict(a <= TARGET_ADDED_RTT_US)
        )
    };
    let http_target = |r: &Results| {
        let a = r.paired("http_p99", Route::Direct, |w, d| w - d);
        format!(
            "added p99 ≤ {TARGET_ADDED_P99_US:.0} µs: {}",
            verdict(a <= TARGET_ADDED_P99_US)
        )
    };
    let iperf1_target = |r: &Results| {
        format!(
            "≥ HAProxy: {}",
            verdict(r.median(Route::Weft, "iperf_1") >= r.median(Route::Haproxy, "iperf_1"))
        )
    };
    let iperf8_target = |r: &Results| {
        format!(
            "≥ HAProxy: {}",
            verdict(r.median(Route::Weft, "iperf_8") >= r.median(Route::Haproxy, "iperf_8"))
        )
    };
    let conn_target = |r: &Results| {
        format!(
            "< HAProxy: {}",
            verdict(r.median(Route::Weft, "conn_p50") < r.median(Route::Haproxy, "conn_p50"))
        )
    };
    let cpu_target = |r: &Results| {
        let per_proxy = r.median(Route::Weft, "http_cpu_1k_ms") / 2.0;
        format!(
            "anchor ztunnel {ANCHOR_CPU_MS_PER_1K_PER_PROXY:.0} ms per proxy: Weft {per_proxy:.0} ms per agent"
        )
    };
    let rows = [
        Row {
            figure: "1-byte TCP round trip p50 (µs)",
            metric: "rtt_p50",
            digits: 1,
            has_direct: true,
            unit: " µs",
            target: Some(&rtt_target),
            scale: id,
        },
        Row {
            figure: "1-byte TCP round trip p90 (µs)",
            metric: "rtt_p90",
            digits: 1,
            has_direct: true,
            unit: " µs",
            target: None,
            scale: id,
        },
        Row {
            figure: "1-byte TCP round trip p99 (µs)",
            metric: "rtt_p99",
            digits: 1,
            has_direct: true,
            unit: " µs",
            target: None,
            scale: id,
        },
        Row {
            figure: "1 KB HTTP/1.1 at 1,000 rps, p50 (µs)",
            metric: "http_p50",
            digits: 0,
            has_direct: true,
            unit: " µs",
            target: None,
            scale: id,
        },
        Row {
            figure: "1 KB HTTP/1.1 at 1,000 rps, p90 (µs)",
            metric: "http_p90",
            digits: 0,
            has_direct: true,
            unit: " µs",
            target: None,
            scale: id,
        },
        Row {
            figure: "1 KB HTTP/1.1 at 1,000 rps, p99 (µs)",
            metric: "http_p99",
            digits: 0,
            has_direct: true,
            unit: " µs",
            target: Some(&http_target),
            scale: id,
        },
        Row {
            figure: "HTTP requests served per second",
            metric: "http_rps",
            digits: 0,
            has_direct: true,
            unit: "",
            target: None,
            scale: id,
        },
        Row {
            figure: "iperf3, 1 flow (Gbit/s)",
            metric: "iperf_1",
            digits: 2,
            has_direct: true,
            unit: "",
            target: Some(&iperf1_target),
            scale: id,
        },
        Row {
            figure: "iperf3, 8 flows (Gbit/s)",
            metric: "iperf_8",
            digits: 2,
            has_direct: true,
            unit: "",
            target: Some(&iperf8_target),
            scale: id,
        },
        Row {
            figure: "new connection + first byte, p50 (µs)",
            metric: "conn_p50",
            digits: 0,
            has_direct: true,
            unit: " µs",
            target: Some(&conn_target),
            scale: id,
        },
        Row {
            figure: "new connection + first byte, p99 (µs)",
            metric: "conn_p99",
            digits: 0,
            has_direct: true,
            unit: " µs",
            target: None,
            scale: id,
        },
        Row {
            figure: "proxy CPU per 1,000 requests, both proxies (ms)",
            metric: "http_cpu_1k_ms",
            digits: 0,
            has_direct: false,
            unit: "",
            target: Some(&cpu_target),
            scale: id,
        },
        Row {
            figure: "  client side / agent A (ms)",
            metric: "http_cpu_1k_ms_client",
            digits: 0,
            has_direct: false,
            unit: "",
            target: None,
            scale: id,
        },
        Row {
            figure: "  server side / agent B (ms)",
            metric: "http_cpu_1k_ms_server",
            digits: 0,
            has_direct: false,
            unit: "",
            target: None,
            scale: id,
        },
        Row {
            figure: "proxy CPU per GB, 1 flow, both proxies (s)",
            metric: "iperf_1_cpu_per_gb",
            digits: 2,
            has_direct: false,
            unit: "",
            target: None,
            scale: id,
        },
        Row {
            figure: "proxy CPU per GB, 8 flows, both proxies (s)",
            metric: "iperf_8_cpu_per_gb",
            digits: 2,
            has_direct: false,
            unit: "",
            target: None,
            scale: id,
        },
        Row {
            figure: "RSS under iperf3 8 flows, larger proxy (MB)",
            metric: "iperf_8_rss",
            digits: 1,
            has_direct: false,
            unit: "",
            target: None,
            scale: mb,
        },
    ];
    let mut out = String::new();
    out.push_str(&format!(
        "Everything on 127.0.0.1 of one 2-vCPU VM: client, proxies and servers share both \
         cores. Routes: **direct** (client → server); **HAProxy pair** (client → HAProxy in TCP \
         mode originating TLS 1.3 with a client certificate → HAProxy terminating TLS and \
         verifying it → server; ECDSA P-256 certificates from openssl, `nbthread 1` per side); \
         **Weft** (client → `[[upstream]]` listener of `weft agent` A → pooled QUIC tunnel with \
         mutual TLS (node SVIDs from the mesh CA) → `weft agent` B, a CA host running the \
         services → server; release build, default runtime, log level info). Servers: an echo \
         server (thread per connection, TCP_NODELAY), nginx-light (one process, 1 KB file), \
         `iperf3 -s`. Clients: a Rust 1-byte echo client ({RTT_SAMPLES} round trips per route \
         after {RTT_WARMUP} warm-up, one connection per route) and {NEW_CONNECTIONS} fresh \
         connections per route timed from connect to the first echoed byte, both with the routes \
         taking turns in {CHUNKS} chunks (this VM's wake-up latency drifts within seconds); \
         `h2load --h1 -c 1 --rps {HTTP_RPS} -D {HTTP_SECONDS}` \
         (percentiles from `--log-file`), `iperf3 -t {IPERF_SECONDS}` with 1 and 8 flows. \
         Proxy CPU is utime + stime from `/proc/PID/stat` of both proxies around the run, RSS is \
         VmRSS from `/proc/PID/status`.\n\n\
         Each cell: median of {ROUNDS} interleaved rounds (the order of the routes rotates each \
         round), range in brackets. \"Added\" is the median over rounds of Weft − direct in the \
         same round; the ratio is the median of Weft / HAProxy.\n\n\
         Agents' runtime threads (`node.worker_threads`): {}. Tools: {}. Load average at \
         start: {}.\n\n",
        worker_threads().map_or_else(|| "the default".to_string(), |n| n.to_string()),
        bench.versions,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    ));
    out.push_str(
        "| figure | direct | HAProxy pair | Weft | Weft vs direct (added) | Weft / HAProxy | target |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        out.push_str(&row(results, r));
    }
    let first = |route: Route, metric: &str| {
        results
            .get(route, metric)
            .first()
            .map(|kb| format!("{:.1}", mb(*kb)))
            .unwrap_or_else(|| "–".into())
    };
    out.push_str(&format!(
        "| RSS during the 1,000 rps run of round 1, before any bulk transfer (MB): client / A, server / B | – | {} / {} | {} / {} | – | – | |\n",
        first(Route::Haproxy, "http_rss_client"),
        first(Route::Haproxy, "http_rss_server"),
        first(Route::Weft, "http_rss_client"),
        first(Route::Weft, "http_rss_server"),
    ));
    let idle = bench.idle_rss_kb.map(|kb| mb(kb as f64));
    let anon = bench.idle_anon_kb.map(|kb| mb(kb as f64));
    let after = results.after_rss_kb.map(|kb| mb(kb as f64));
    let peak = results.peak_rss_kb.map(|kb| mb(kb as f64));
    let idle_met = idle[2] <= TARGET_IDLE_RSS_MB && idle[3] <= TARGET_IDLE_RSS_MB;
    out.push_str(&format!(
        "| RSS idle, tunnel open (MB): client side / agent A | – | {:.1} | {:.1} | – | {:.2}× | ≤ {TARGET_IDLE_RSS_MB:.0} MB: {} |\n\
         | RSS idle, tunnel open (MB): server side / agent B | – | {:.1} | {:.1} | – | {:.2}× | (agent B is also the CA host) |\n\
         | of which the process's own memory (RssAnon, MB): client / A, server / B | – | {:.1} / {:.1} | {:.1} / {:.1} | – | – | the rest is pages of the executable and libraries (RssFile) |\n\
         | RSS idle after all rounds (MB): client / A, server / B | – | {:.1} / {:.1} | {:.1} / {:.1} | – | – | |\n\
         | peak RSS, VmHWM (MB): client / A, server / B | – | {:.1} / {:.1} | {:.1} / {:.1} | – | – | |\n",
        idle[0],
        idle[2],
        idle[2] / idle[0],
        verdict(idle_met),
        idle[1],
        idle[3],
        idle[3] / idle[1],
        anon[0],
        anon[1],
        anon[2],
        anon[3],
        after[0],
        after[1],
        after[2],
        after[3],
        peak[0],
        peak[1],
        peak[2],
        peak[3],
    ));

    out.push_str(&http_report(results));
    out.push_str(
        "\n### Where Weft's cost goes (diagnostics, same rounds)\n\n\
         The one-agent route is an `[[upstream]]` of agent B to its own service: the same \
         listener, connect and splice code, no tunnel.\n\n\
         | figure | direct | Weft, one agent (TCP relay, no tunnel) | Weft, two agents (QUIC tunnel) | HAProxy pair |\n\
         |---|---|---|---|---|\n",
    );
    for (figure, metric, digits) in [
        ("1-byte round trip p50 (µs)", "rtt_p50", 1),
        (
            "context switches of the proxies per round trip",
            "rtt_switches",
            1,
        ),
        ("new connection + first byte p50 (µs)", "conn_p50", 0),
        ("iperf3 1 flow (Gbit/s)", "iperf_1", 2),
        ("proxy CPU per GB, 1 flow (s)", "iperf_1_cpu_per_gb", 2),
    ] {
        out.push_str(&format!(
            "| {figure} | {} | {} | {} | {} |\n",
            cell(results.get(Route::Direct, metric), digits),
            cell(results.get(Route::WeftLocal, metric), digits),
            cell(results.get(Route::Weft, metric), digits),
            cell(results.get(Route::Haproxy, metric), digits),
        ));
    }
    out.push_str(&format!(
        "\nTunnel packets during the Weft iperf3 runs (kernel UDP counters, both directions, \
         ACK-only packets included): payload bytes per datagram {} (1 flow) and {} (8 flows); \
         agent CPU per datagram {} µs and {} µs; UDP buffer drops {} and {}.\n",
        cell(results.get(Route::Weft, "iperf_1_bytes_per_datagram"), 0),
        cell(results.get(Route::Weft, "iperf_8_bytes_per_datagram"), 0),
        cell(results.get(Route::Weft, "iperf_1_cpu_us_per_datagram"), 2),
        cell(results.get(Route::Weft, "iperf_8_cpu_us_per_datagram"), 2),
        cell(results.get(Route::Weft, "iperf_1_udp_drops"), 0),
        cell(results.get(Route::Weft, "iperf_8_udp_drops"), 0),
    ));

    out.push_str("\n### Targets\n\n");
    let rtt_added = added("rtt_p50");
    let p99_added = added("http_p99");
    let haproxy_added =
        |metric: &str| results.paired_routes(Route::Haproxy, metric, Route::Direct, |h, d| h - d);
    out.push_str(&format!(
        "- Added 1-byte round trip ≤ {TARGET_ADDED_RTT_US:.0} µs (p50): {:+.1} µs, {} (the \
         HAProxy pair adds {:+.1} µs in the same rounds).\n\
         - Added p99 at 1,000 rps ≤ {:.1} ms: {:+.3} ms, {} (HAProxy pair: {:+.3} ms).\n\
         - Throughput at least the HAProxy pair's: 1 flow {:.2}×, 8 flows {:.2}×, {}.\n\
         - Idle RSS ≤ {TARGET_IDLE_RSS_MB:.0} MB per agent: A {:.1} MB, B {:.1} MB, {} before \
         any load (of which the agents' own memory: A {:.1} MB, B {:.1} MB; the rest is pages of \
         the executable and libraries); idle again after the rounds: A {:.1} MB, B {:.1} MB, {}.\n",
        rtt_added,
        verdict(rtt_added <= TARGET_ADDED_RTT_US),
        haproxy_added("rtt_p50"),
        TARGET_ADDED_P99_US / 1000.0,
        p99_added / 1000.0,
        verdict(p99_added <= TARGET_ADDED_P99_US),
        haproxy_added("http_p99") / 1000.0,
        results.paired("iperf_1", Route::Haproxy, |w, h| w / h),
        results.paired("iperf_8", Route::Haproxy, |w, h| w / h),
        verdict(
            results.median(Route::Weft, "iperf_1") >= results.median(Route::Haproxy, "iperf_1")
                && results.median(Route::Weft, "iperf_8")
                    >= results.median(Route::Haproxy, "iperf_8")
        ),
        idle[2],
        idle[3],
        verdict(idle_met),
        anon[2],
        anon[3],
        after[2],
        after[3],
        verdict(after[2] <= TARGET_IDLE_RSS_MB && after[3] <= TARGET_IDLE_RSS_MB),
    ));

    out.push_str(
        "\n### Noise\n\n| round | seconds | steal | CPU used by other processes | busiest others alive all round |\n|---|---|---|---|---|\n",
    );
    for (i, r) in results.rounds.iter().enumerate() {
        let top = r
            .top_others
            .iter()
            .map(|(name, pct)| format!("{name} {pct:.1} %"))
            .collect::<Vec<_>>()
            .join(", ");
        out.push_str(&format!(
            "| {} | {:.0} | {:.1} % | {:.1} % | {} |\n",
            i + 1,
            r.seconds,
            r.steal_pct,
            r.other_pct,
            if top.is_empty() { "–" } else { &top }
        ));
    }
    let failed: f64 = [Route::Direct, Route::Haproxy, Route::Weft, Route::WeftL7]
        .iter()
        .flat_map(|r| [results.get(*r, "http_failed"), results.get(*r, "h2_failed")].concat())
        .sum();
    out.push_str(&format!(
        "\nPercentages are of both cores over the round. \"Other processes\" is machine busy \
         time (user + system, interrupt time left out) minus that of this bench, its load \
         tools, servers, proxies and agents. Both agents' \
         background CPU while idle (gossip every 500 ms, measured during the direct and HAProxy \
         HTTP runs): {:.2} % of one core. Failed HTTP requests over all runs: {failed:.0}. \
         Round trips per run: {}; new connections per run: {}.\n",
        median(
            &[
                results.get(Route::Direct, "agents_idle_cpu_pct"),
                results.get(Route::Haproxy, "agents_idle_cpu_pct")
            ]
            .concat()
        ),
        Route::ALL
            .iter()
            .map(|r| format!("{} {:.0}", r.label(), results.median(*r, "rtt_n")))
            .collect::<Vec<_>>()
            .join(", "),
        Route::ALL
            .iter()
            .map(|r| format!("{} {:.0}", r.label(), results.median(*r, "conn_n")))
            .collect::<Vec<_>>()
            .join(", "),
    ));
    out.push_str(&format!(
        "\nWhole run: {:.0} s (setup {:.0} s).\n",
        whole.as_secs_f64(),
        setup.as_secs_f64()
    ));
    out
}

/// The HTTP section: 1 KB over HTTP/1.1 and h2c at 1,000 requests/s, Weft relaying TCP (L4)
/// and Weft handling each request (L7), against direct and the HAProxy pair.
fn http_report(results: &Results) -> String {
    let mut out = format!(
        "\n### HTTP at 1,000 requests/s: L4 and L7\n\n\
         `h2load -c 1 --rps {HTTP_RPS} -D {HTTP_SECONDS}` for a 1 KB file from nginx, over \
         HTTP/1.1 (`--h1`) and over h2c (HTTP/2 with prior knowledge; nginx `listen … http2`). \
         **Weft L4**: the web services are plain `tcp` services, the bytes are spliced through \
         the tunnel as for any TCP service. **Weft L7**: the same nginx listeners registered as \
         `protocol = \"http\"` / `\"http2\"`: agent A parses each request, picks the endpoint, \
         counts it in the golden metrics and sends it as HTTP/2 over a tunnel stream; agent B \
         delivers it to nginx (HTTP/1.1 keep-alive, or h2c). The HAProxy pair stays in TCP mode. \
         CPU is utime + stime of each agent (or HAProxy) over the run, per 1,000 requests.\n\n\
         | figure | direct | HAProxy pair | Weft L4 | Weft L7 | L7 added vs direct | L7 / HAProxy | target |\n\
         |---|---|---|---|---|---|---|---|\n"
    );
    let routes = [Route::Direct, Route::Haproxy, Route::Weft, Route::WeftL7];
    for (version, name) in [("http", "HTTP/1.1"), ("h2", "HTTP/2 (h2c)")] {
        let metric = |m: &str| format!("{version}_{m}");
        for (figure, m, digits) in [
            ("p50 (µs)", "p50", 0),
            ("p90 (µs)", "p90", 0),
            ("p99 (µs)", "p99", 0),
            ("requests served per second", "rps", 0),
            (
                "CPU per 1,000 requests, client side / agent A (ms)",
                "cpu_1k_ms_client",
                1,
            ),
            (
                "CPU per 1,000 requests, server side / agent B (ms)",
                "cpu_1k_ms_server",
                1,
            ),
        ] {
            let metric = metric(m);
            let has_direct = !m.starts_with("cpu");
            let cells: Vec<String> = routes
                .iter()
                .map(|r| cell(results.get(*r, &metric), digits))
                .collect();
            let added = if has_direct {
                let a = results.paired_routes(Route::WeftL7, &metric, Route::Direct, |w, d| w - d);
                format!("{a:+.digits$}")
            } else {
                "–".into()
            };
            let ratio = results.paired_routes(Route::WeftL7, &metric, Route::Haproxy, |w, h| w / h);
            let target = match m {
                "p99" => {
                    let a =
                        results.paired_routes(Route::WeftL7, &metric, Route::Direct, |w, d| w - d);
                    format!(
                        "added p99 ≤ {TARGET_ADDED_P99_US:.0} µs: {}",
                        verdict(a <= TARGET_ADDED_P99_US)
                    )
                }
                "cpu_1k_ms_client" | "cpu_1k_ms_server" => {
                    let ms = results.median(Route::WeftL7, &metric);
                    format!(
                        "≤ {TARGET_L7_CPU_MS_PER_1K:.0} ms per agent: {}",
                        verdict(ms <= TARGET_L7_CPU_MS_PER_1K)
                    )
                }
                _ => String::new(),
            };
            out.push_str(&format!(
                "| {name} {figure} | {} | {} | {} | {} | {added} | {ratio:.2}× | {target} |\n",
                if has_direct { &cells[0] } else { "–" },
                cells[1],
                cells[2],
                cells[3],
            ));
        }
        // A process's RSS does not shrink after the bulk transfers of a round, so only round
        // 1, whose HTTP runs come before any, shows what HTTP costs; the same agents carry
        // L4 and L7.
        let rss = |route: Route, side: &str| {
            results
                .get(route, &metric(&format!("rss_{side}")))
                .first()
                .map_or_else(|| "–".into(), |kb| format!("{:.1}", mb(*kb)))
        };
        out.push_str(&format!(
            "| {name} RSS during the run of round 1 (before any bulk transfer), client side / agent A (MB) | – | {} | {} | {} | – | – | |\n\
             | {name} RSS during the run of round 1 (before any bulk transfer), server side / agent B (MB) | – | {} | {} | {} | – | – | |\n",
            rss(Route::Haproxy, "client"),
            rss(Route::Weft, "client"),
            rss(Route::WeftL7, "client"),
            rss(Route::Haproxy, "server"),
            rss(Route::Weft, "server"),
            rss(Route::WeftL7, "server"),
        ));
    }
    out.push_str(&format!(
        "\nAs fast as it goes: `wrk -t 1 -c {WRK_CONNECTIONS} -d {WRK_SECONDS}s --latency`, \
         HTTP/1.1, the same 1 KB file (client, proxies and nginx share the two cores, so this \
         measures the whole path's cost per request more than any one part's limit).\n\n\
         | figure | direct | HAProxy pair | Weft L4 | Weft L7 | L7 / direct | L7 / HAProxy |\n\
         |---|---|---|---|---|---|---|\n"
    ));
    for (figure, metric, digits) in [
        ("requests per second", "wrk_rps", 0),
        ("p50 (µs)", "wrk_p50", 0),
        ("p99 (µs)", "wrk_p99", 0),
        ("CPU per 1,000 requests, per proxy (ms)", "wrk_cpu_1k_ms", 1),
        ("failed requests (non-2xx, socket errors)", "wrk_failed", 0),
    ] {
        let cells: Vec<String> = routes
            .iter()
            .map(|r| cell(results.get(*r, metric), digits))
            .collect();
        let ratio = |other: Route| {
            let r = results.paired_routes(Route::WeftL7, metric, other, |w, b| w / b);
            if r.is_finite() {
                format!("{r:.2}×")
            } else {
                "–".into()
            }
        };
        out.push_str(&format!(
            "| {figure} | {} | {} | {} | {} | {} | {} |\n",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            ratio(Route::Direct),
            ratio(Route::Haproxy),
        ));
    }
    out
}

/// What `wrk --latency` printed.
struct WrkReport {
    requests: u64,
    requests_per_second: f64,
    p50_us: f64,
    p99_us: f64,
    /// Non-2xx/3xx answers plus socket errors.
    failed: u64,
}

impl WrkReport {
    fn parse(stdout: &str) -> anyhow::Result<WrkReport> {
        let after = |prefix: &str| {
            stdout
                .lines()
                .map(str::trim)
                .find_map(|l| l.strip_prefix(prefix))
                .map(str::trim)
        };
        let duration_us = |text: &str| -> Option<f64> {
            let split = text.find(|c: char| c.is_ascii_alphabetic())?;
            let value: f64 = text[..split].parse().ok()?;
            match &text[split..] {
                "us" => Some(value),
                "ms" => Some(value * 1e3),
                "s" => Some(value * 1e6),
                _ => None,
            }
        };
        let requests = stdout
            .lines()
            .find(|l| l.contains("requests in"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .context("no \"requests in\" line")?;
        let requests_per_second = after("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .context("no Requests/sec")?;
        let p50_us = after("50%")
            .and_then(duration_us)
            .context("no 50% latency")?;
        let p99_us = after("99%")
            .and_then(duration_us)
            .context("no 99% latency")?;
        let non_2xx: u64 = after("Non-2xx or 3xx responses:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        // "Socket errors: connect 0, read 0, write 0, timeout 0"
        let socket_errors: u64 = after("Socket errors:")
            .map(|v| {
                v.split(',')
                    .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0);
        Ok(WrkReport {
            requests,
            requests_per_second,
            p50_us,
            p99_us,
            failed: non_2xx + socket_errors,
        })
    }
}

/// Renders the plots (medians with min–max whiskers over the rounds) into `dir` (`img/` of the
/// docs folder); returns the markdown that shows them.
fn render_charts(results: &Results, dir: &Path) -> anyhow::Result<String> {
    let spread = |route: Route, metric: &str, scale: f64| {
        let values: Vec<f64> = results
            .get(route, metric)
            .iter()
            .map(|v| v * scale)
            .collect();
        Spread::of(&values)
    };
    let bars = |routes: &[Route], metrics: &[&str], scale: f64| -> Vec<BarSeries> {
        routes
            .iter()
            .map(|route| BarSeries {
                // Next to Weft L7, the spliced route is Weft L4.
                name: match (route, routes.contains(&Route::WeftL7)) {
                    (Route::Weft, true) => "Weft L4".to_string(),
                    _ => route.label().to_string(),
                },
                values: metrics.iter().map(|m| spread(*route, m, scale)).collect(),
            })
            .collect()
    };
    let three = [Route::Direct, Route::Haproxy, Route::Weft];
    let four = [Route::Direct, Route::Haproxy, Route::Weft, Route::WeftL7];
    let charts = [
        (
            "dataplane-round-trip.png",
            BarChart {
                title: "1-byte TCP round trip".into(),
                y_label: "µs".into(),
                groups: vec!["p50".into(), "p90".into(), "p99".into()],
                series: bars(&three, &["rtt_p50", "rtt_p90", "rtt_p99"], 1.0),
            },
        ),
        (
            "dataplane-http-latency.png",
            BarChart {
                title: format!(
                    "1 KB over HTTP at {HTTP_RPS} requests/s (Weft L4: tcp service, L7: http)"
                ),
                y_label: "µs".into(),
                groups: ["HTTP/1.1 p50", "HTTP/1.1 p99", "HTTP/2 p50", "HTTP/2 p99"]
                    .map(String::from)
                    .to_vec(),
                series: bars(&four, &["http_p50", "http_p99", "h2_p50", "h2_p99"], 1.0),
            },
        ),
        (
            "dataplane-throughput.png",
            BarChart {
                title: "iperf3 throughput".into(),
                y_label: "Gbit/s".into(),
                groups: vec!["1 flow".into(), "8 flows".into()],
                series: bars(&three, &["iperf_1", "iperf_8"], 1.0),
            },
        ),
        (
            "dataplane-http-max.png",
            BarChart {
                title: format!("HTTP/1.1 as fast as it goes (wrk, {WRK_CONNECTIONS} connections)"),
                y_label: "thousand requests/s".into(),
                groups: vec!["requests per second".into()],
                series: bars(&four, &["wrk_rps"], 1e-3),
            },
        ),
    ];
    let mut markdown = String::from(
        "\n### Plots\n\nMedian of the rounds, whiskers from the lowest to the highest round.\n\n",
    );
    for (file, chart) in charts {
        chart.render_png(&dir.join(file))?;
        markdown.push_str(&format!("![{}](img/{file})\n\n", chart.title));
    }
    Ok(markdown)
}
