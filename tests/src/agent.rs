//! Real `weft agent` processes for integration tests: config files in a temp dir, spawn,
//! signals by PID, and reads through the real CLI (`weft members --json`) and the real
//! `/metrics` endpoint.
//!
//! Every process started here is killed by PID when its [`TestAgent`] is dropped, so a failing
//! test leaves nothing running.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

/// The `weft` binary under test: `$WEFT_BIN`, else `target/<profile>/weft` next to this test.
pub fn weft_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("WEFT_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps");
    let bin = profile_dir.join("weft");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --bin weft` (tests/run.sh does)",
        bin.display()
    );
    bin
}

/// A free loopback port for both TCP and UDP, for an agent listener whose port must be
/// written in its config (best effort: tried, then released).
///
/// The port is taken below the kernel's ephemeral range (`ip_local_port_range`), so no socket
/// that binds port 0 or connects out (every other socket of the tests) can be given it between
/// this check and the agent's bind; and never twice in one process.
pub fn free_port() -> u16 {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    const LOWEST: u16 = 15_000;
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768)
        .max(LOWEST + 1_000);
    let span = u64::from(ephemeral_start - LOWEST);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..10_000 {
        // A different start per process and call (splitmix64 of pid, time and a counter).
        let mut x = u64::from(std::process::id())
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
            ^ COUNTER
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let port = LOWEST + ((x ^ (x >> 31)) % span) as u16;
        if given.contains(&port) {
            continue;
        }
        if UdpSocket::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        {
            given.push(port);
            return port;
        }
    }
    panic!("no free loopback port between {LOWEST} and {ephemeral_start}");
}

/// Writes a fresh random gossip keyring file (mode 0600) and returns its path.
pub fn write_keyring(dir: &Path, file: &str, keys: &[String]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(file);
    std::fs::write(&path, keys.join("\n") + "\n").expect("write keyring");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod keyring");
    path
}

/// A new gossip key from the real CLI.
pub fn gossip_keygen() -> String {
    let out = Command::new(weft_bin())
        .args(["gossip", "keygen"])
        .output()
        .expect("run weft gossip keygen");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

/// How to configure one test agent.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// Node name.
    pub name: String,
    /// IP to bind and advertise.
    pub ip: String,
    /// Gossip port.
    pub gossip_port: u16,
    /// Tunnel port.
    pub tunnel_port: u16,
    /// Admin HTTP port.
    pub http_port: u16,
    /// Outbound HTTP proxy port (on the agent's IP).
    pub http_proxy_port: u16,
    /// Seeds (`ip:port`).
    pub seeds: Vec<String>,
    /// Keyring file.
    pub keyring: PathBuf,
    /// Gossip interval, e.g. `"500ms"`.
    pub interval: String,
    /// Dead-member grace period, e.g. `"1h"`.
    pub dead_grace: String,
    /// Trust bundle file.
    pub trust_bundle: PathBuf,
    /// Join token file (agents that are not CA hosts).
    pub join_token: Option<PathBuf>,
    /// Intermediate certificate and key, when this agent is a CA host.
    pub ca: Option<(PathBuf, PathBuf)>,
    /// Service lifetime to ask for, e.g. `"1h"`.
    pub svid_ttl: String,
    /// Extra TOML appended verbatim (e.g. `[[service]]` tables).
    pub extra: String,
}

impl AgentSpec {
    /// A loopback agent with free ports, default timings and no services, trusting `pki`.
    pub fn loopback(name: &str, keyring: &Path, pki: &Pki) -> AgentSpec {
        AgentSpec {
            name: name.into(),
            ip: "127.0.0.1".into(),
            gossip_port: free_port(),
            tunnel_port: free_port(),
            http_port: free_port(),
            http_proxy_port: free_port(),
            seeds: Vec::new(),
            keyring: keyring.to_path_buf(),
            interval: "500ms".into(),
            dead_grace: "1h".into(),
            trust_bundle: pki.bundle(),
            join_token: None,
            ca: None,
            svid_ttl: "1h".into(),
            extra: String::new(),
        }
    }

    /// The gossip address as `ip:port`.
    pub fn gossip_addr(&self) -> String {
        format!("{}:{}", self.ip, self.gossip_port)
    }

    /// The config file text.
    pub fn config_text(&self, dir: &Path) -> String {
        let seeds: Vec<String> = self.seeds.iter().map(|s| format!("\"{s}\"")).collect();
        let token = self
            .join_token
            .clone()
            .unwrap_or_else(|| dir.join(format!("{}.token", self.name)));
        let mut identity = format!(
            "[identity]\ntrust_bundle = \"{}\"\njoin_token = \"{}\"\nsvid_ttl = \"{}\"\n\n",
            self.trust_bundle.display(),
            token.display(),
            self.svid_ttl
        );
        if let Some((cert, key)) = &self.ca {
            identity.push_str(&format!(
                "[ca]\nenabled = true\ncert = \"{}\"\nkey = \"{}\"\n\n",
                cert.display(),
                key.display()
            ));
        }
        identity
            + &format!(
                "[node]\nname = \"{name}\"\ntrust_domain = \"test.weft\"\ndata_dir = \"{dir}/{name}-data\"\n\n\
             [gossip]\nbind = \"{ip}:{gp}\"\nseeds = [{seeds}]\nkeyring = \"{keyring}\"\ninterval = \"{interval}\"\ndead_grace = \"{grace}\"\n\n\
             [tunnel]\nbind = \"{ip}:{tp}\"\n\n[admin]\nsocket = \"{dir}/{name}.sock\"\nhttp = \"127.0.0.1:{hp}\"\n\n\
             [outbound]\nhttp_proxy = \"{ip}:{pp}\"\n\n\
             [log]\nlevel = \"info,weft_discovery=debug\"\n\n{extra}",
                name = self.name,
                dir = dir.display(),
                ip = self.ip,
                gp = self.gossip_port,
                tp = self.tunnel_port,
                hp = self.http_port,
                pp = self.http_proxy_port,
                seeds = seeds.join(", "),
                keyring = self.keyring.display(),
                interval = self.interval,
                grace = self.dead_grace,
                extra = self.extra,
            )
    }
}

/// A real PKI for a test mesh (trust domain `test.weft`), made with the same code as
/// `weft ca init`, `weft ca intermediate` and `weft token create`.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Creates the root and operator credential in `dir/pki`.
    pub fn new(dir: &Path) -> Pki {
        let root = dir.join("pki");
        let td = weft_ca::TrustDomain::new("test.weft").expect("valid trust domain");
        weft_ca::pki::init(&td, "tester", &root).expect("create test root");
        Pki { dir: root }
    }

    /// The directory holding the operator credential (`--operator`).
    pub fn operator_dir(&self) -> &Path {
        &self.dir
    }

    /// The root certificate (trust bundle).
    pub fn bundle(&self) -> PathBuf {
        self.dir.join(weft_ca::pki::ROOT_CERT)
    }

    /// Makes CA host `name` an intermediate; returns its certificate and key paths.
    pub fn intermediate(&self, name: &str) -> (PathBuf, PathBuf) {
        let td = weft_ca::TrustDomain::new("test.weft").expect("valid trust domain");
        let out = self.dir.join(format!("ca-{name}"));
        weft_ca::pki::intermediate(&td, &self.dir, name, &out).expect("create intermediate");
        (
            out.join(weft_ca::pki::CA_CERT),
            out.join(weft_ca::pki::CA_KEY),
        )
    }

    /// Writes a join token for `node` and `services` (`ns/name`) valid for `ttl` to `path`.
    pub fn write_token(&self, path: &Path, node: &str, services: &[&str], ttl: Duration) {
        let operator = weft_ca::OperatorCredential::load(&self.dir).expect("operator credential");
        let services: Vec<String> = services.iter().map(|s| s.to_string()).collect();
        let token = operator
            .create_token(node, &services, ttl)
            .expect("create token");
        std::fs::write(path, token).expect("write token");
    }
}

/// One `weft agent` process.
pub struct TestAgent {
    /// Its configuration.
    pub spec: AgentSpec,
    /// Directory holding its config, socket and log.
    pub dir: PathBuf,
    child: Option<Child>,
    wrapper: Vec<String>,
}

impl TestAgent {
    /// Writes the config and starts the agent (optionally under a wrapper such as
    /// `ip netns exec NS`).
    pub fn start(spec: AgentSpec, dir: &Path, wrapper: &[&str]) -> anyhow::Result<TestAgent> {
        let mut agent = TestAgent {
            spec,
            dir: dir.to_path_buf(),
            child: None,
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
        };
        agent.write_config(&agent.spec.config_text(dir))?;
        agent.spawn()?;
        Ok(agent)
    }

    /// Path of its config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join(format!("{}.toml", self.spec.name))
    }

    /// Path of its admin socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join(format!("{}.sock", self.spec.name))
    }

    /// Replaces its config file (apply with [`TestAgent::sighup`]).
    pub fn write_config(&self, text: &str) -> anyhow::Result<()> {
        std::fs::write(self.config_path(), text).context("write config")
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", self.spec.name)))?;
        let mut argv: Vec<String> = self.wrapper.clone();
        argv.push(weft_bin().display().to_string());
        argv.extend([
            "agent".into(),
            "-c".into(),
            self.config_path().display().to_string(),
        ]);
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {argv:?}"))?;
        self.child = Some(child);
        Ok(())
    }

    /// Process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, signal: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on a PID we spawned and have not reaped yet.
            unsafe { libc::kill(pid as i32, signal) };
        }
    }

    /// `kill -9`, then reaps it.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// SIGTERM (graceful leave) without waiting.
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Waits up to `timeout` for the process to exit; returns its exit status code.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        let Some(child) = self.child.as_mut() else {
            bail!("not running")
        };
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?}", self.spec.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGHUP (reload).
    pub fn sighup(&self) {
        self.signal(libc::SIGHUP);
    }

    /// Starts it again with the same config (a new generation).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            self.kill9();
        }
        self.spawn()
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.log", self.spec.name)))
            .unwrap_or_default()
    }

    /// Runs the real CLI against this agent (`--socket`), with `WEFT_OPERATOR` set to
    /// `operator` when given.
    pub fn cli(&self, args: &[&str], operator: Option<&Path>) -> std::process::Output {
        let mut command = Command::new(weft_bin());
        command.args(args).arg("--socket").arg(self.socket());
        match operator {
            Some(dir) => command.env("WEFT_OPERATOR", dir),
            None => command.env_remove("WEFT_OPERATOR"),
        };
        command.output().expect("run weft")
    }

    /// The policy version in force (`weft policy get`), 0 when none or unreadable.
    pub fn policy_version(&self) -> u64 {
        self.cli_json(&["policy", "get"])
            .ok()
            .and_then(|v| v["version"].as_u64())
            .unwrap_or(0)
    }

    /// Runs a read command of the real CLI with `--json` against this agent.
    pub fn cli_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let out = Command::new(weft_bin())
            .args(args)
            .arg("--json")
            .arg("--socket")
            .arg(self.socket())
            .output()?;
        if !out.status.success() {
            bail!(
                "weft {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Member name → state, as this agent sees them.
    pub fn member_states(&self) -> anyhow::Result<Vec<(String, String)>> {
        let members = self.cli_json(&["members"])?;
        Ok(members
            .as_array()
            .context("members is a list")?
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap_or("").to_string(),
                    m["state"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect())
    }

    /// State of member `name` as this agent sees it (`None` if not listed).
    pub fn state_of(&self, name: &str) -> Option<String> {
        self.member_states()
            .ok()?
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
    }

    /// `(node, health)` of every endpoint of `service` (`namespace/name`) in this agent's catalog.
    pub fn endpoints(&self, service: &str) -> Vec<(String, String)> {
        let Ok(services) = self.cli_json(&["services"]) else {
            return Vec::new();
        };
        services
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| {
                format!(
                    "{}/{}",
                    s["service"]["namespace"].as_str().unwrap_or(""),
                    s["service"]["name"].as_str().unwrap_or("")
                ) == service
            })
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .map(|e| {
                (
                    e["node"].as_str().unwrap_or("").to_string(),
                    e["health"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// `GET` on the admin HTTP listener; returns status code and body.
    pub fn http_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(
            SocketAddr::from(([127, 0, 0, 1], self.spec.http_port)),
            path,
        )
    }

    /// The Prometheus text of this agent.
    pub fn metrics(&self) -> anyhow::Result<String> {
        let (status, body) = self.http_get("/metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(body)
    }

    /// The value of one sample, e.g. `weft_gossip_packets_total{direction="in",outcome="ok"}`.
    pub fn metric(&self, sample: &str) -> f64 {
        self.metrics()
            .ok()
            .and_then(|text| sample_value(&text, sample))
            .unwrap_or(0.0)
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The value of `sample` (name plus exact label set as printed) in Prometheus text.
pub fn sample_value(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A minimal HTTP/1.0 GET over TCP, for probing admin endpoints.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status line")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Polls `check` every 25 ms until it holds or `timeout` passes; returns the time it took.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    loop {
        if check() {
            return Some(started.elapsed());
        }
        if started.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Services every test join token allows.
pub const TOKEN_SCOPE: &[&str] = &[
    "default/api",
    "default/orders",
    "default/web",
    "default/db",
    // The L7 tests' split backends and gRPC service.
    "default/web-v1",
    "default/web-v2",
    "default/greeter",
];

/// A group of agents sharing one temp dir and keyring.
pub struct Cluster {
    /// The agents, in start order.
    pub agents: Vec<TestAgent>,
    /// The shared keyring file.
    pub keyring: PathBuf,
    /// The keys in the keyring, primary first.
    pub keys: Vec<String>,
    /// The test PKI.
    pub pki: Pki,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` loopback agents named `a1..aN`, all seeded with `a1`. `a1` is a CA host;
    /// every other agent gets a join token for the services [`TOKEN_SCOPE`] lists. `tune` may
    /// adjust each spec (services, timings) before start.
    pub fn start(n: usize, tune: impl FnMut(&mut AgentSpec)) -> anyhow::Result<Cluster> {
        start_cluster_with(n, tune, |_, text| text)
    }

    /// The shared directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether every agent in `observers` sees exactly the agents named in `expected` alive.
    pub fn all_see_alive(&self, observers: &[usize], expected: &[&str]) -> bool {
        observers.iter().all(|&i| {
            self.agents[i].member_states().is_ok_and(|states| {
                expected
                    .iter()
                    .all(|name| states.iter().any(|(n, s)| n == name && s == "alive"))
            })
        })
    }

    /// Whether every agent reports `/ready` (identities held).
    pub fn all_ready(&self) -> bool {
        self.agents
            .iter()
            .all(|a| a.http_get("/ready").is_ok_and(|(status, _)| status == 200))
    }

    /// Names of all agents.
    pub fn names(&self) -> Vec<String> {
        self.agents.iter().map(|a| a.spec.name.clone()).collect()
    }

    /// Logs of every agent, for failure messages.
    pub fn logs(&self) -> String {
        self.agents
            .iter()
            .map(|a| format!("----- {} -----\n{}", a.spec.name, a.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Starts an agent like [`TestAgent::start`], with its generated config text passed through
/// `edit` first: for keys of tables the generated config already opens (such as
/// `[node] drain_timeout`), which [`AgentSpec::extra`] cannot add.
pub fn start_agent_with(
    spec: AgentSpec,
    dir: &Path,
    wrapper: &[&str],
    edit: impl FnOnce(String) -> String,
) -> anyhow::Result<TestAgent> {
    let mut agent = TestAgent {
        spec,
        dir: dir.to_path_buf(),
        child: None,
        wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
    };
    agent.write_config(&edit(agent.spec.config_text(dir)))?;
    agent.spawn()?;
    Ok(agent)
}

/// Like [`Cluster::start`], with each agent's config text also passed through `edit` (see
/// [`start_agent_with`]).
pub fn start_cluster_with(
    n: usize,
    mut tune: impl FnMut(&mut AgentSpec),
    mut edit: impl FnMut(&AgentSpec, String) -> String,
) -> anyhow::Result<Cluster> {
    let dir = tempfile::Builder::new().prefix("weft-test-").tempdir()?;
    let keys = vec![gossip_keygen()];
    let keyring = write_keyring(dir.path(), "gossip.keys", &keys);
    let pki = Pki::new(dir.path());
    let mut specs: Vec<AgentSpec> = (1..=n)
        .map(|i| AgentSpec::loopback(&format!("a{i}"), &keyring, &pki))
        .collect();
    let seed = specs[0].gossip_addr();
    for (i, spec) in specs.iter_mut().enumerate() {
        spec.seeds = vec![seed.clone()];
        if i == 0 {
            spec.ca = Some(pki.intermediate(&spec.name));
        } else {
            let token = dir.path().join(format!("{}.token", spec.name));
            pki.write_token(&token, &spec.name, TOKEN_SCOPE, Duration::from_secs(3600));
            spec.join_token = Some(token);
        }
        tune(spec);
    }
    let agents = specs
        .into_iter()
        .map(|spec| {
            let text = edit(&spec, spec.config_text(dir.path()));
            start_agent_with(spec, dir.path(), &[], |_| text)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Cluster {
        agents,
        keyring,
        keys,
        pki,
        dir,
    })
}

/// Number of open file descriptors of process `pid` (from `/proc/PID/fd`).
pub fn open_fds(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(Iterator::count)
}

/// Resident memory (`VmRSS`) of process `pid`, KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Spawns a local helper process (an app server such as `redis-server`) that
/// [`kill_process`] ends by PID; the caller keeps the [`Child`].
pub fn spawn_process(cmd: &mut Command) -> anyhow::Result<Child> {
    cmd.stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("spawn {:?}", cmd.get_program()))
}

/// SIGKILLs a process this test spawned, by its PID, and reaps it (no-op if it already exited).
pub fn kill_process(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        // SAFETY: kill(2) on a PID we spawned and have not reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    }
    let _ = child.wait();
}

/// Waits up to `timeout` for a TCP listener at `addr`; returns whether one answered.
pub fn wait_for_listener(addr: SocketAddr, timeout: Duration) -> bool {
    wait_until(timeout, || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    })
    .is_some()
}

/// Sum of every sample of metric `name` in Prometheus text whose labels include all of
/// `labels`, whatever the label order in the text.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let present: Vec<(&str, &str)> = label_text
                .split(',')
                .filter_map(|pair| {
                    let (key, value) = pair.split_once('=')?;
                    Some((key.trim(), value.trim().trim_matches('"')))
                })
                .collect();
            labels
                .iter()
                .all(|wanted| present.contains(wanted))
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Starts one agent per host of `lab` (`h1..hN`, each in its own namespace on the lab
/// network, standard ports, seeded with h1): h1 is the CA host, every other host gets a join
/// token for [`TOKEN_SCOPE`]. `tune` may adjust each spec (by host number) before start.
pub fn start_lab_agents(
    lab: &crate::lab::Lab,
    dir: &Path,
    mut tune: impl FnMut(usize, &mut AgentSpec),
) -> (Vec<TestAgent>, Pki) {
    let keyring = write_keyring(dir, "gossip.keys", &[gossip_keygen()]);
    let seed = format!("{}:7401", lab.host_addr(1));
    let pki = Pki::new(dir);
    let agents = (1..=lab.host_count())
        .map(|i| {
            let name = format!("h{i}");
            let mut spec = AgentSpec::loopback(&name, &keyring, &pki);
            if i == 1 {
                spec.ca = Some(pki.intermediate(&name));
            } else {
                let token = dir.join(format!("{name}.token"));
                pki.write_token(&token, &name, TOKEN_SCOPE, Duration::from_secs(3600));
                spec.join_token = Some(token);
            }
            spec.ip = lab.host_addr(i).to_string();
            spec.gossip_port = 7401;
            spec.tunnel_port = 7402;
            spec.http_port = 7480; // each host has its own loopback
            spec.http_proxy_port = 7481;
            spec.seeds = vec![seed.clone()];
            tune(i, &mut spec);
            let ns = lab.netns(i);
            TestAgent::start(spec, dir, &["ip", "netns", "exec", &ns]).expect("start agent")
        })
        .collect();
    (agents, pki)
}

/// Every agent's log, for failure messages.
pub fn all_logs(agents: &[TestAgent]) -> String {
    agents
        .iter()
        .map(|a| format!("--- {} ---\n{}", a.spec.name, a.log()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A `[[service]]` table for [`AgentSpec::extra`].
pub fn service_table(name: &str, port: u16, protocol: &str) -> String {
    format!("[[service]]\nname = \"{name}\"\nport = {port}\nprotocol = \"{protocol}\"\n\n")
}

/// An `[[upstream]]` table listening on 127.0.0.1, for [`AgentSpec::extra`].
pub fn upstream_table(service: &str, port: u16) -> String {
    format!("[[upstream]]\nservice = \"{service}\"\nlisten = \"127.0.0.1:{port}\"\n\n")
}

/// A two-thread tokio runtime for a test's own clients and servers.
pub fn test_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Takes a test file's turn lock; a test that failed holding it does not block the others.
pub fn take_turn(lock: &'static std::sync::Mutex<()>) -> std::sync::MutexGuard<'static, ()> {
    lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
