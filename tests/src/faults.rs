//! Helpers of the reliability fault suite (`tests/faults.rs`, issue 8): a five-host lab mesh
//! with two CA hosts, two endpoints of an HTTP service and a client host; a steady HTTP client
//! that runs inside the client host's namespace and records every request with its time and
//! outcome; leak snapshots of agent processes; faults the lab itself lacks (packet loss with
//! nftables, delay with an NFQUEUE delayer); and the results file `docs/reliability.md`.
//!
//! Topology of [`FaultLab`] (lab network `198.18.S.0/24`):
//!
//! | host | role |
//! |---|---|
//! | h1, h2 | CA hosts (seeds of everyone) |
//! | h3 | client: `[[upstream]]` of `web` on 127.0.0.1:15000 and of `api` on 127.0.0.1:15001 |
//! | h4, h5 | endpoints of `web` (`protocol = "http"`, a `python3 -m http.server` on 127.0.0.1:8080 serving `/id` = the host name); h5 also serves `api` (tcp, an endless stream of zeros) |
//!
//! Everything started here is either an agent ([`TestAgent`], killed by PID on drop) or a
//! process spawned through the [`Lab`] (killed on lab teardown, also during a panic).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::agent::{
    AgentSpec, Pki, TOKEN_SCOPE, TestAgent, gossip_keygen, kill_process, metric_sum,
    start_agent_with, wait_until, write_keyring,
};
use crate::lab::Lab;

/// Hosts of a fault lab.
pub const HOSTS: usize = 5;
/// The CA hosts.
pub const CA_HOSTS: [usize; 2] = [1, 2];
/// The client host.
pub const CLIENT: usize = 3;
/// The endpoint hosts of `web`.
pub const ENDPOINTS: [usize; 2] = [4, 5];
/// Port of the web server on each endpoint host's loopback.
pub const WEB_PORT: u16 = 8080;
/// Port of the bulk (tcp) server on h5's loopback (service `api`: the test tokens allow it).
pub const BULK_PORT: u16 = 9000;
/// The client's upstream listener of `web` (on h3's loopback).
pub const UP_WEB: u16 = 15000;
/// The client's upstream listener of `api`, the bulk stream (on h3's loopback).
pub const UP_BULK: u16 = 15001;

/// Seconds since the unix epoch, as the client script prints them.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// How a [`FaultLab`] is set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// Service SVID lifetime asked for by every agent.
    pub svid_ttl: String,
    /// Also run the bulk stream on h5 as tcp service `api`.
    pub bulk: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            svid_ttl: "1h".into(),
            bulk: false,
        }
    }
}

/// The five-host mesh every scenario starts from.
pub struct FaultLab {
    /// Agents of h1..h5 (index = host - 1).
    pub agents: Vec<TestAgent>,
    /// The test PKI (operator credential for `weft policy apply`).
    pub pki: Pki,
    /// App servers by host: (host, child).
    apps: Vec<(usize, Child)>,
    options: Options,
    dir: tempfile::TempDir,
    /// The lab (last field: dropped after the agents and apps).
    pub lab: Lab,
}

impl FaultLab {
    /// Brings up lab `name` on `198.18.{subnet}.0/24` with the mesh described in the module
    /// docs, and waits (bounded) until every agent is ready and h3 routes `web` to h4 and h5.
    pub fn up(name: &str, subnet: u8, options: Options) -> Result<FaultLab> {
        let lab = Lab::up(name, subnet, HOSTS)
            .context("bring the lab up (needs root, iproute2, nftables)")?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("weft-{name}-"))
            .tempdir()?;
        let keyring = write_keyring(dir.path(), "gossip.keys", &[gossip_keygen()]);
        let pki = Pki::new(dir.path());
        let seeds: Vec<String> = CA_HOSTS
            .iter()
            .map(|&i| format!("{}:7401", lab.host_addr(i)))
            .collect();
        let mut fl = FaultLab {
            agents: Vec::new(),
            pki,
            apps: Vec::new(),
            options,
            dir,
            lab,
        };
        for &i in &ENDPOINTS {
            fl.start_apps(i)?;
        }
        for i in 1..=HOSTS {
            let name = format!("h{i}");
            let mut spec = AgentSpec::loopback(&name, &keyring, &fl.pki);
            if CA_HOSTS.contains(&i) {
                spec.ca = Some(fl.pki.intermediate(&name));
            } else {
                let token = fl.dir.path().join(format!("{name}.token"));
                fl.pki
                    .write_token(&token, &name, TOKEN_SCOPE, Duration::from_secs(3600));
                spec.join_token = Some(token);
            }
            spec.ip = fl.lab.host_addr(i).to_string();
            spec.gossip_port = 7401;
            spec.tunnel_port = 7402;
            spec.http_port = 7480;
            spec.http_proxy_port = 7481;
            spec.seeds = seeds.clone();
            spec.svid_ttl = fl.options.svid_ttl.clone();
            spec.extra = match i {
                CLIENT => format!(
                    "[[upstream]]\nservice = \"web\"\nlisten = \"127.0.0.1:{UP_WEB}\"\n\n\
                     [[upstream]]\nservice = \"api\"\nlisten = \"127.0.0.1:{UP_BULK}\"\n"
                ),
                4 | 5 => {
                    let mut s = format!(
                        "[[service]]\nname = \"web\"\nport = {WEB_PORT}\nprotocol = \"http\"\n\n"
                    );
                    if i == 5 && fl.options.bulk {
                        s.push_str(&format!(
                            "[[service]]\nname = \"api\"\nport = {BULK_PORT}\nprotocol = \"tcp\"\n"
                        ));
                    }
                    s
                }
                _ => String::new(),
            };
            let ns = fl.lab.netns(i);
            // A short drain, so a graceful restart under load stays within the scenario's time.
            let agent =
                start_agent_with(spec, fl.dir.path(), &["ip", "netns", "exec", &ns], |t| {
                    t.replacen("[node]\n", "[node]\ndrain_timeout = \"3s\"\n", 1)
                })?;
            fl.agents.push(agent);
        }
        let ready = wait_until(Duration::from_secs(30), || {
            fl.agents.iter().all(|a| {
                a.cli_json(&["status"])
                    .is_ok_and(|s| s["ready"] == Value::Bool(true))
            })
        });
        if ready.is_none() {
            bail!("fault lab agents not ready in 30 s\n{}", fl.logs());
        }
        let routable = wait_until(Duration::from_secs(20), || {
            (1..=HOSTS).all(|o| ENDPOINTS.iter().all(|&e| fl.routable(o, e)))
        });
        if routable.is_none() {
            bail!("not every agent routes web to h4 and h5\n{}", fl.logs());
        }
        Ok(fl)
    }

    /// The shared temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Agent of host `i`.
    pub fn agent(&self, i: usize) -> &TestAgent {
        &self.agents[i - 1]
    }

    /// Agent of host `i`, mutable.
    pub fn agent_mut(&mut self, i: usize) -> &mut TestAgent {
        &mut self.agents[i - 1]
    }

    /// Starts host `i`'s app servers (web; bulk on h5 when enabled).
    pub fn start_apps(&mut self, i: usize) -> Result<()> {
        let site = self.dir.path().join(format!("site-h{i}"));
        std::fs::create_dir_all(&site)?;
        std::fs::write(site.join("id"), format!("h{i}\n"))?;
        let web = self.lab.spawn(
            i,
            Command::new("python3")
                .args(["-m", "http.server", &WEB_PORT.to_string()])
                .args(["--bind", "127.0.0.1", "--directory"])
                .arg(&site)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        self.apps.push((i, web));
        if i == 5 && self.options.bulk {
            let bulk = self.lab.spawn(
                i,
                Command::new("socat")
                    .arg(format!(
                        "TCP-LISTEN:{BULK_PORT},bind=127.0.0.1,fork,reuseaddr"
                    ))
                    .arg("EXEC:cat /dev/zero")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            )?;
            self.apps.push((i, bulk));
        }
        let ok = wait_until(Duration::from_secs(10), || {
            self.lab
                .exec(
                    i,
                    &[
                        "curl",
                        "-sf",
                        "--max-time",
                        "1",
                        &format!("http://127.0.0.1:{WEB_PORT}/id"),
                    ],
                )
                .is_ok_and(|o| o.status.success())
        });
        if ok.is_none() {
            bail!("web server on h{i} did not start");
        }
        Ok(())
    }

    /// Kills host `i` the way harness.md says: unplug its switch port first (a netns without
    /// processes still answers), then SIGKILL its agent and its app servers.
    pub fn kill_host(&mut self, i: usize) -> Result<()> {
        self.lab.unplug(i)?;
        self.agents[i - 1].kill9();
        let mut kept = Vec::new();
        for (host, mut child) in std::mem::take(&mut self.apps) {
            if host == i {
                kill_process(&mut child);
            } else {
                kept.push((host, child));
            }
        }
        self.apps = kept;
        Ok(())
    }

    /// Brings a killed host back: plug it in, start its apps and its agent (same config and
    /// data dir: a new generation of the same node).
    pub fn revive_host(&mut self, i: usize) -> Result<()> {
        self.lab.plug(i)?;
        if ENDPOINTS.contains(&i) {
            self.start_apps(i)?;
        }
        self.agents[i - 1].restart()
    }

    /// Whether host `observer`'s agent has a passing endpoint of `web` on host `node`.
    pub fn routable(&self, observer: usize, node: usize) -> bool {
        let name = format!("h{node}");
        self.agent(observer)
            .endpoints("default/web")
            .iter()
            .any(|(n, h)| *n == name && h == "passing")
    }

    /// Member name → state as host `observer` sees them.
    pub fn members(&self, observer: usize) -> BTreeMap<String, String> {
        self.agent(observer)
            .member_states()
            .map(|v| v.into_iter().collect())
            .unwrap_or_default()
    }

    /// Whether every agent in `observers` sees all five members alive.
    pub fn all_alive(&self, observers: &[usize]) -> bool {
        observers.iter().all(|&o| {
            let m = self.members(o);
            (1..=HOSTS).all(|i| m.get(&format!("h{i}")).is_some_and(|s| s == "alive"))
        })
    }

    /// The Prometheus text of host `i`'s agent (read from inside the host).
    pub fn metrics(&self, i: usize) -> String {
        self.lab
            .exec_ok(
                i,
                &[
                    "curl",
                    "-sS",
                    "--max-time",
                    "5",
                    "http://127.0.0.1:7480/metrics",
                ],
            )
            .unwrap_or_default()
    }

    /// Leak figures of host `i`'s agent.
    pub fn snapshot(&self, i: usize) -> Snapshot {
        let pid = self.agent(i).pid().unwrap_or(0);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let metrics = self.metrics(i);
        Snapshot {
            host: i,
            pid,
            fds: crate::agent::open_fds(pid).unwrap_or(0),
            rss_kib: field("VmRSS:"),
            threads: field("Threads:"),
            tunnels: metric_sum(&metrics, "weft_tunnels_open", &[]),
            tcp_open: metric_sum(&metrics, "weft_tcp_open_total", &[])
                - metric_sum(&metrics, "weft_tcp_close_total", &[]),
        }
    }

    /// Publishes an `HTTPRoutePolicy` for `web` through h3: each attempt bounded, and 502/503/504
    /// answers to idempotent requests retried twice (the way an operator asks for "retry
    /// elsewhere"). Waits until every agent has it.
    pub fn apply_retry_policy(&self) -> Result<()> {
        let path = self.dir.path().join("web-retry.yaml");
        std::fs::write(
            &path,
            "apiVersion: weft.io/v1alpha1\nkind: HTTPRoutePolicy\nmetadata:\n  name: web\n  namespace: default\n\
             spec:\n  service: web\n  timeouts: {request: 6s, backendRequest: 2s}\n\
             \x20 retry: {attempts: 2, codes: [502, 503, 504], backoff: 25ms}\n\
             \x20 retryBudget: {percent: 50, minRetriesPerSecond: 20}\n",
        )?;
        let out = self.agent(CLIENT).cli(
            &["policy", "apply", "-f", &path.display().to_string()],
            Some(self.pki.operator_dir()),
        );
        if !out.status.success() {
            bail!(
                "weft policy apply failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let version = |a: &TestAgent| {
            a.cli_json(&["policy", "get"])
                .ok()
                .and_then(|v| v["version"].as_u64())
                .unwrap_or(0)
        };
        let want = version(self.agent(CLIENT));
        if want == 0
            || wait_until(Duration::from_secs(15), || {
                self.agents.iter().all(|a| version(a) == want)
            })
            .is_none()
        {
            bail!(
                "the retry policy did not reach every agent\n{}",
                self.logs()
            );
        }
        Ok(())
    }

    /// Every agent's log, for failure messages (the tail of each).
    pub fn logs(&self) -> String {
        self.agents
            .iter()
            .map(|a| {
                let log = a.log();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(60)..].join("\n");
                format!("--- {} ---\n{tail}", a.spec.name)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Starts the steady client in h3 against `web` (see [`SteadyClient`]).
    pub fn client(&self, secs: f64) -> Result<SteadyClient> {
        SteadyClient::start(&self.lab, CLIENT, self.dir.path(), UP_WEB, secs)
    }
}

/// Leak figures of one agent process.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    /// Host number.
    pub host: usize,
    /// Agent PID.
    pub pid: u32,
    /// Open file descriptors (`/proc/PID/fd`).
    pub fds: usize,
    /// Resident memory (`VmRSS`), KiB.
    pub rss_kib: u64,
    /// Threads (`/proc/PID/status`; the agent's tokio workers plus blocking threads).
    pub threads: u64,
    /// `weft_tunnels_open`.
    pub tunnels: f64,
    /// TCP connections through the mesh still open (`weft_tcp_open_total - close_total`).
    pub tcp_open: f64,
}

/// Allowed growth between a before and an after snapshot of the same process.
pub const FD_SLACK: usize = 8;
/// Allowed RSS growth, KiB (the allocator keeps freed memory; debug build).
pub const RSS_SLACK_KIB: u64 = 32 * 1024;
/// Allowed thread growth (tokio's blocking pool keeps idle threads for 10 s).
pub const THREAD_SLACK: u64 = 8;

impl Snapshot {
    /// A leak found between `self` (before) and `after`, described; `None` if within slack.
    pub fn leak(&self, after: &Snapshot) -> Option<String> {
        let mut problems = Vec::new();
        if after.fds > self.fds + FD_SLACK {
            problems.push(format!("fds {} -> {}", self.fds, after.fds));
        }
        if after.rss_kib > self.rss_kib + RSS_SLACK_KIB {
            problems.push(format!("RSS {} -> {} KiB", self.rss_kib, after.rss_kib));
        }
        if after.threads > self.threads + THREAD_SLACK {
            problems.push(format!("threads {} -> {}", self.threads, after.threads));
        }
        if after.tunnels > self.tunnels {
            problems.push(format!("tunnels {} -> {}", self.tunnels, after.tunnels));
        }
        if after.tcp_open > self.tcp_open {
            problems.push(format!(
                "open tcp connections {} -> {}",
                self.tcp_open, after.tcp_open
            ));
        }
        (!problems.is_empty()).then(|| format!("h{}: {}", self.host, problems.join(", ")))
    }

    /// One line: `h3 fds 31→32, RSS 41→43 MiB, threads 6→6, tunnels 2→2`.
    pub fn describe(&self, after: &Snapshot) -> String {
        format!(
            "h{} fds {}→{}, RSS {:.0}→{:.0} MiB, threads {}→{}, tunnels {}→{}, tcp {}→{}",
            self.host,
            self.fds,
            after.fds,
            self.rss_kib as f64 / 1024.0,
            after.rss_kib as f64 / 1024.0,
            self.threads,
            after.threads,
            self.tunnels,
            after.tunnels,
            self.tcp_open,
            after.tcp_open
        )
    }
}

/// The steady client: a bounded Python program (inside a lab host) with [`CLIENT_WORKERS`]
/// threads, each sending sequential GETs of `/id` through the mesh, one line per request: `start_unix_s duration_s status body`. Status 0 is
/// a client-side error (timeout, refused, reset), with the exception name as body.
const CLIENT_PY: &str = r#"
import sys, time, threading, urllib.request, urllib.error
url, secs, gap, timeout, workers = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
end = time.time() + secs
lock = threading.Lock()
def worker():
    while time.time() < end:
        t0 = time.time()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                status, body = r.status, r.read().decode(errors="replace").strip()
        except urllib.error.HTTPError as e:
            status, body = e.code, "weft-error=" + str(e.headers.get("weft-error"))
        except Exception as e:
            status, body = 0, type(e).__name__
        with lock:
            print("%.3f %.4f %d %s" % (t0, time.time() - t0, status, body.replace(" ", "_") or "-"), flush=True)
        time.sleep(gap)
threads = [threading.Thread(target=worker) for _ in range(workers)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"#;

/// Time between two requests of one worker (about 25 requests/s per worker when answers are
/// fast).
pub const CLIENT_GAP: f64 = 0.04;
/// Concurrent workers of the steady client: with requests in flight at once, the balancer
/// (peak-EWMA × in flight) spreads them over both endpoints, so a fault on one endpoint meets
/// requests in flight to it.
pub const CLIENT_WORKERS: usize = 3;
/// The steady client's own limit per request.
pub const CLIENT_TIMEOUT: f64 = 10.0;

/// A running steady client.
pub struct SteadyClient {
    child: Child,
    out: PathBuf,
    secs: f64,
}

/// One request the steady client made.
#[derive(Debug, Clone)]
pub struct Request {
    /// Start, unix seconds.
    pub t: f64,
    /// Duration, seconds.
    pub took: f64,
    /// HTTP status, 0 for a client-side error.
    pub status: u16,
    /// The answering host's name (`h4`), or the error.
    pub body: String,
}

impl Request {
    /// Whether it failed.
    pub fn failed(&self) -> bool {
        self.status != 200
    }
}

impl SteadyClient {
    /// Starts it in host `host` against `http://127.0.0.1:{port}/id` for `secs` seconds.
    pub fn start(lab: &Lab, host: usize, dir: &Path, port: u16, secs: f64) -> Result<SteadyClient> {
        let out = dir.join(format!("client-{}.log", now() as u64 * 1000 + port as u64));
        let file = std::fs::File::create(&out)?;
        let child = lab.spawn(
            host,
            Command::new("python3")
                .args(["-c", CLIENT_PY])
                .arg(format!("http://127.0.0.1:{port}/id"))
                .arg(secs.to_string())
                .arg(CLIENT_GAP.to_string())
                .arg(CLIENT_TIMEOUT.to_string())
                .arg(CLIENT_WORKERS.to_string())
                .stdin(Stdio::null())
                .stdout(file)
                .stderr(Stdio::null()),
        )?;
        Ok(SteadyClient { child, out, secs })
    }

    /// Requests recorded so far.
    pub fn requests(&self) -> Vec<Request> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some(Request {
                    t: f.next()?.parse().ok()?,
                    took: f.next()?.parse().ok()?,
                    status: f.next()?.parse().ok()?,
                    body: f.next().unwrap_or("-").to_string(),
                })
            })
            .collect()
    }

    /// Stops it now (SIGKILL); returns every request it completed.
    pub fn stop(mut self) -> Vec<Request> {
        kill_process(&mut self.child);
        self.requests()
    }

    /// Waits (bounded: its run time plus one request timeout plus 5 s) until it ends; returns
    /// every request.
    pub fn finish(mut self) -> Vec<Request> {
        let deadline = Instant::now() + Duration::from_secs_f64(self.secs + CLIENT_TIMEOUT + 5.0);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    kill_process(&mut self.child);
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        self.requests()
    }
}

/// A summary of a client's requests.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Requests made.
    pub total: usize,
    /// Requests that failed.
    pub failed: usize,
    /// Answers by host name.
    pub by_host: BTreeMap<String, usize>,
    /// Failures by status/body.
    pub failures: BTreeMap<String, usize>,
    /// First and last failure start, unix seconds.
    pub failure_span: Option<(f64, f64)>,
    /// Median and slowest request, seconds.
    pub p50: f64,
    /// 99th percentile, seconds.
    pub p99: f64,
    /// Slowest request, seconds.
    pub max: f64,
}

impl Tally {
    /// Summarises `requests` started in `[from, to)`.
    pub fn of(requests: &[Request], from: f64, to: f64) -> Tally {
        let mut t = Tally::default();
        let mut took = Vec::new();
        for r in requests.iter().filter(|r| r.t >= from && r.t < to) {
            t.total += 1;
            took.push(r.took);
            if r.failed() {
                t.failed += 1;
                *t.failures
                    .entry(format!("{} {}", r.status, r.body))
                    .or_default() += 1;
                t.failure_span = Some(match t.failure_span {
                    None => (r.t, r.t),
                    Some((a, _)) => (a, r.t),
                });
            } else {
                *t.by_host.entry(r.body.clone()).or_default() += 1;
            }
        }
        took.sort_by(f64::total_cmp);
        let q = |p: f64| {
            if took.is_empty() {
                0.0
            } else {
                took[((took.len() - 1) as f64 * p).round() as usize]
            }
        };
        t.p50 = q(0.5);
        t.p99 = q(0.99);
        t.max = q(1.0);
        t
    }

    /// One line for the report.
    pub fn describe(&self) -> String {
        format!(
            "{} requests, {} failed {:?}, answered by {:?}, latency p50 {:.1} ms p99 {:.1} ms max {:.1} ms",
            self.total,
            self.failed,
            self.failures,
            self.by_host,
            self.p50 * 1e3,
            self.p99 * 1e3,
            self.max * 1e3
        )
    }
}

/// Polls `check` every 100 ms for at most `timeout`; returns the seconds since `since` (unix
/// seconds) when it first held.
pub fn time_until(since: f64, timeout: Duration, mut check: impl FnMut() -> bool) -> Option<f64> {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return Some(now() - since);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------------
// Packet loss and delay on one host's port of the switch
// ---------------------------------------------------------------------------------------------

/// nftables table of the loss injector (bridge family, in the switch namespace; separate from
/// the lab's own `lab` table, so partitions and impairments never touch each other's rules).
const IMPAIR_TABLE: &str = "weftfaults";

/// Drops `percent` % of the frames host `i` sends (nftables `numgen random` in the switch's
/// bridge forward hook; harness.md "Loss only"). Removed by [`clear_impairments`] (and with the
/// switch namespace on lab teardown).
pub fn add_loss(lab: &Lab, i: usize, percent: u32) -> Result<()> {
    let script = format!(
        "add table bridge {IMPAIR_TABLE}\n\
         add chain bridge {IMPAIR_TABLE} impair {{ type filter hook forward priority -10; policy accept; }}\n\
         add rule bridge {IMPAIR_TABLE} impair iifname \"h{i}\" numgen random mod 10000 < {} drop\n",
        percent * 100
    );
    nft(lab, &script)
}

/// Removes every loss rule (the whole table) and stops no process: see [`Delayer`].
pub fn clear_impairments(lab: &Lab) -> Result<()> {
    let listed = nft(lab, &format!("list table bridge {IMPAIR_TABLE}\n")).is_ok();
    if listed {
        nft(lab, &format!("delete table bridge {IMPAIR_TABLE}\n"))?;
    }
    Ok(())
}

fn nft(lab: &Lab, script: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", &lab.switch_netns(), "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft failed: {}\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The NFQUEUE delayer (harness.md "Delay, jitter and loss"): packets queued by an iptables
/// `NFQUEUE` rule in the switch namespace are held for `delay` and then accepted, in order,
/// by a small pure-Python nfnetlink_queue client (no library). The kernel lacks netem and nft
/// `queue`, so the rule goes through iptables-nft's xt compatibility target.
const DELAYER_PY: &str = r#"
import socket, struct, sys, time, heapq, select
qnum, delay = int(sys.argv[1]), float(sys.argv[2])
NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS = 1, 2
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NF_ACCEPT = 1
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind((0, 0))
seq = 0
def attr(t, payload):
    l = 4 + len(payload)
    return struct.pack("=HH", l, t) + payload + b"\0" * ((4 - l % 4) % 4)
def send(msg_type, res_id, attrs, flags=NLM_F_REQUEST):
    global seq
    seq += 1
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(res_id)) + b"".join(attrs)
    hdr = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, seq, 0)
    s.send(hdr + body)
send(NFQNL_MSG_CONFIG, qnum, [attr(NFQA_CFG_CMD, struct.pack("=BxH", NFQNL_CFG_CMD_BIND, 0))])
send(NFQNL_MSG_CONFIG, qnum, [attr(NFQA_CFG_PARAMS, struct.pack(">IB", 0, NFQNL_COPY_META))])
print("bound", flush=True)
held = []
while True:
    timeout = max(0.0, held[0][0] - time.time()) if held else 1.0
    r, _, _ = select.select([s], [], [], timeout)
    now = time.time()
    if r:
        data = s.recv(1 << 20)
        off = 0
        while off + 16 <= len(data):
            ln, mtype, _, _, _ = struct.unpack_from("=IHHII", data, off)
            if ln < 16:
                break
            if mtype == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                a = off + 20
                while a + 4 <= off + ln:
                    al, at = struct.unpack_from("=HH", data, a)
                    if al < 4:
                        break
                    if at & 0x7fff == NFQA_PACKET_HDR:
                        pid = struct.unpack_from(">I", data, a + 4)[0]
                        heapq.heappush(held, (now + delay, pid))
                    a += (al + 3) & ~3
            off += (ln + 3) & ~3
    while held and held[0][0] <= time.time():
        _, pid = heapq.heappop(held)
        send(NFQNL_MSG_VERDICT, qnum, [attr(NFQA_VERDICT_HDR, struct.pack(">II", NF_ACCEPT, pid))])
"#;

/// A running NFQUEUE delayer for the frames one host sends.
pub struct Delayer {
    child: Child,
    switch: String,
    host: usize,
    queue: u16,
}

impl Delayer {
    /// Delays every frame host `i` sends by `delay`: enables bridge netfilter in the switch
    /// namespace, starts the delayer there, then adds the iptables `NFQUEUE` rule
    /// (`--queue-bypass`, so frames pass undelayed if the delayer dies).
    pub fn start(lab: &Lab, i: usize, delay: Duration) -> Result<Delayer> {
        let sw = lab.switch_netns();
        let queue = 7;
        run_ok(&[
            "ip",
            "netns",
            "exec",
            &sw,
            "sysctl",
            "-qw",
            "net.bridge.bridge-nf-call-iptables=1",
        ])?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &sw, "python3", "-c", DELAYER_PY])
            .arg(queue.to_string())
            .arg(delay.as_secs_f64().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start the NFQUEUE delayer")?;
        let mut line = String::new();
        {
            use std::io::BufRead;
            let mut out = std::io::BufReader::new(child.stdout.take().expect("piped"));
            let _ = out.read_line(&mut line);
        }
        let delayer = Delayer {
            child,
            switch: sw,
            host: i,
            queue,
        };
        if line.trim() != "bound" {
            bail!("the NFQUEUE delayer did not bind queue {queue}");
        }
        run_ok(&delayer.rule("-A"))?;
        Ok(delayer)
    }

    fn rule(&self, op: &str) -> Vec<String> {
        [
            "ip",
            "netns",
            "exec",
            &self.switch,
            "iptables",
            "-t",
            "mangle",
            op,
            "FORWARD",
            "-m",
            "physdev",
            "--physdev-in",
            &format!("h{}", self.host),
            "-j",
            "NFQUEUE",
            "--queue-num",
            &self.queue.to_string(),
            "--queue-bypass",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Removes the rule and stops the delayer.
    pub fn stop(mut self) -> Result<()> {
        let removed = run_ok(&self.rule("-D"));
        kill_process(&mut self.child);
        removed
    }
}

impl Drop for Delayer {
    fn drop(&mut self) {
        let _ = run_ok(&self.rule("-D"));
        kill_process(&mut self.child);
    }
}

fn run_ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Result<()> {
    let out = Command::new(&args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {:?}", args[0].as_ref()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Results: target/faults/*.json and docs/reliability.md
// ---------------------------------------------------------------------------------------------

/// One scenario's result.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// Order in the table.
    pub order: u32,
    /// Scenario name (the `## ` heading).
    pub scenario: String,
    /// What was injected.
    pub injected: String,
    /// Detection time, as text (`2.9 s`).
    pub detection: String,
    /// Recovery time, as text.
    pub recovery: String,
    /// Failed requests / total, as text.
    pub failed: String,
    /// The command that reproduces it.
    pub command: String,
    /// Bars checked, each with whether it held.
    pub bars: Vec<(String, bool)>,
    /// Further measured lines (leaks, latencies).
    pub details: Vec<String>,
}

impl Record {
    /// Adds a bar and whether it held.
    pub fn bar(&mut self, text: impl Into<String>, held: bool) {
        self.bars.push((text.into(), held));
    }

    /// Adds a detail line.
    pub fn detail(&mut self, text: impl Into<String>) {
        let text = text.into();
        println!("{}: {text}", self.scenario);
        self.details.push(text);
    }

    /// Bars that were missed.
    pub fn missed(&self) -> Vec<&str> {
        self.bars
            .iter()
            .filter(|(_, ok)| !ok)
            .map(|(b, _)| b.as_str())
            .collect()
    }

    /// Saves the record to `target/faults/`, regenerates `docs/reliability.md` from every saved
    /// record when `WEFT_FAULTS_DOCS=1`, then panics naming every missed bar (with `context`,
    /// e.g. the agents' logs), so a missed bar fails the test after its figures are kept.
    pub fn finish(&self, context: &str) {
        let dir = results_dir();
        let _ = std::fs::create_dir_all(&dir);
        let value = json!({
            "order": self.order,
            "scenario": self.scenario,
            "injected": self.injected,
            "detection": self.detection,
            "recovery": self.recovery,
            "failed": self.failed,
            "command": self.command,
            "bars": self.bars.iter().map(|(b, ok)| json!({"bar": b, "held": ok})).collect::<Vec<_>>(),
            "details": self.details,
            "machine": crate::bench_report::machine(),
        });
        let file = dir.join(format!("{:02}.json", self.order));
        std::fs::write(&file, serde_json::to_string_pretty(&value).expect("json"))
            .expect("write fault result");
        println!(
            "{}: detection {}, recovery {}, failed {}; saved to {}",
            self.scenario,
            self.detection,
            self.recovery,
            self.failed,
            file.display()
        );
        if std::env::var("WEFT_FAULTS_DOCS").is_ok_and(|v| v == "1") {
            write_docs().expect("write docs/reliability.md");
        }
        let missed = self.missed();
        assert!(
            missed.is_empty(),
            "{}: reliability bar(s) missed: {missed:?}\ndetails: {:#?}\n{context}",
            self.scenario,
            self.details
        );
    }
}

/// Where scenario results are kept: `target/faults/`.
pub fn results_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("faults")
}

/// Regenerates `docs/reliability.md` from every record in [`results_dir`].
pub fn write_docs() -> Result<()> {
    let mut records: Vec<Value> = std::fs::read_dir(results_dir())?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| serde_json::from_str(&t).ok())
        .collect();
    records.sort_by_key(|r| r["order"].as_u64().unwrap_or(0));
    let s = |v: &Value| v.as_str().unwrap_or("").replace('|', "\\|");
    let mut doc = String::from(DOC_HEAD);
    doc.push_str(
        "| scenario | injected | detection | recovery | failed requests | bars | reproduce |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in &records {
        let bars = r["bars"].as_array().cloned().unwrap_or_default();
        let held = bars.iter().filter(|b| b["held"] == true).count();
        let verdict = if held == bars.len() {
            format!("all {} held", bars.len())
        } else {
            format!("**{} of {} missed**", bars.len() - held, bars.len())
        };
        doc.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | `{}` |\n",
            s(&r["scenario"]),
            s(&r["injected"]),
            s(&r["detection"]),
            s(&r["recovery"]),
            s(&r["failed"]),
            verdict,
            s(&r["command"]),
        ));
    }
    if let Some(machine) = records.first().and_then(|r| r["machine"].as_str()) {
        doc.push_str(&format!("\nMeasured on: {machine}.\n"));
    }
    for r in &records {
        doc.push_str(&format!("\n## {}\n\n", s(&r["scenario"])));
        doc.push_str(&format!(
            "Injected: {}. Command: `{}`.\n\n",
            s(&r["injected"]),
            s(&r["command"])
        ));
        for b in r["bars"].as_array().into_iter().flatten() {
            let mark = if b["held"] == true {
                "held"
            } else {
                "**MISSED**"
            };
            doc.push_str(&format!("- Bar: {} — {mark}\n", s(&b["bar"])));
        }
        for d in r["details"].as_array().into_iter().flatten() {
            doc.push_str(&format!("- {}\n", s(d)));
        }
    }
    let path = crate::bench_report::docs_dir().join("reliability.md");
    std::fs::create_dir_all(crate::bench_report::docs_dir())?;
    std::fs::write(&path, doc)?;
    println!("wrote {}", path.display());
    Ok(())
}

const DOC_HEAD: &str = "# Reliability: the fault suite

SPEC §10's bars, measured by `tests/faults.rs` (issue 8) on the network-namespace lab
(`tests/src/lab.rs`): five hosts on one bridge, **h1 and h2 CA hosts**, **h3 a client** whose
app reaches `web` through its `[[upstream]]` listener, **h4 and h5 the two endpoints of `web`**
(`protocol = \"http\"`, a real `python3 -m http.server` on each host's loopback). In every
scenario a steady client inside h3 sends `GET /id` requests from three concurrent workers (each
sequential, 40 ms apart, each request allowed 10 s; so requests are in flight to both endpoints
at once) and records every request with its start time, status and the host that answered;
every non-200 answer or client-side error counts as a failed request.

- **Detection time:** from the fault to every other agent's catalog showing it (the endpoint
  leaves `weft services` everywhere, or the renewal moves to another CA host).
- **Recovery time:** from the end of the fault (heal, revive, restart) to every catalog showing
  the full mesh again (for CA loss: to every agent having renewed again). When the endpoint
  next answered the client is listed too: after attempts to it failed slowly, the balancer's
  latency estimate keeps it out of the picks for a while (it decays with a 10 s time constant).
- **Leaks:** open fds, RSS, threads, `weft_tunnels_open` and open mesh TCP connections of the
  agents that live through the scenario, before the fault and after recovery (slack: 8 fds,
  32 MiB RSS, 8 threads — tokio keeps idle blocking threads for 10 s and the allocator keeps
  freed pages; tunnels and TCP connections must not grow).
- **Faults:** a killed host is unplugged from the switch first (a namespace without processes
  still answers ARP and sends RSTs), then its agent and apps get SIGKILL. A partition drops
  every frame to and from the host at the switch (nftables, link stays up). Loss is nftables
  `numgen` at the switch; delay is an NFQUEUE delayer in the switch namespace (this kernel has
  no netem; see `research/harness.md`). Both act on frames the impaired host sends. The delayer
  needs `iptables` (Debian package `iptables`: the kernel has no nft `queue`, so the rule uses
  iptables-nft's xt `NFQUEUE` target) and `python3`; the suite also uses `curl` and `python3`
  inside the lab hosts.

Every scenario runs in CI (`bash tests/run.sh` runs `cargo test --workspace`, which includes
this suite; each scenario takes 30–80 s, the whole suite about 4 minutes on 2 cores) and fails
when a bar is missed. The figures below were written by the suite itself: run

```sh
cargo build --bin weft && WEFT_FAULTS_DOCS=1 cargo test -p weft-tests --test faults -- --test-threads=1
```

to measure again and regenerate this file (each scenario saves its figures to
`target/faults/NN.json`; the file is rebuilt from all of them).

";
