//! A multi-host network lab built from Linux network namespaces.
//!
//! A [`Lab`] named `NAME` with `N` hosts consists of:
//!
//! * a switch namespace `NAME-sw` holding a Linux bridge `br0`;
//! * host namespaces `NAME-h1` … `NAME-hN`, each with `lo` up and one
//!   interface `eth0` carrying `198.18.S.i/24` (`S` is the lab's subnet);
//! * one veth pair per host, switch port `hI` in `NAME-sw` (enslaved to
//!   `br0`) and `eth0` in `NAME-hI`.
//!
//! # Network safety design
//!
//! Tests on this machine may only talk to loopback or to hosts inside
//! namespaces the test itself created, with no route out. The lab enforces
//! that by construction:
//!
//! * **Benchmarking addresses only.** Every lab address lies in
//!   198.18.0.0/15 (RFC 2544 benchmarking space, never routed on the
//!   Internet). [`Lab::up`] checks the computed network and every host address
//!   against that range and refuses anything else.
//! * **Nothing in the root namespace.** The bridge lives in its own switch
//!   namespace, and each veth pair is created directly between the switch
//!   namespace and the host namespace
//!   (`ip -n NAME-sw link add hI type veth peer name eth0 netns NAME-hI`), so
//!   the root namespace never gets an interface, an address, a route or a
//!   firewall rule. Fault injection uses nftables rules in the *switch*
//!   namespace's `bridge` family only.
//! * **No way out.** Hosts get one connected /24 and nothing else: no default
//!   route, no gateway, no NAT. [`Lab::up`] verifies that no host has a
//!   default route (IPv4 or IPv6, any routing table) before returning. Leak
//!   checks should use `ip route get ADDR`, which sends nothing.
//! * **Everything started is cleaned up.** Processes spawned through the lab
//!   are tracked by pidfd (so a recycled PID can never be hit) and are
//!   SIGKILLed and reaped on teardown. Then every process still inside a lab
//!   namespace (as listed by `ip netns pids`; only the test can have put them
//!   there) is SIGKILLed, and the namespaces are deleted. This runs from
//!   [`Drop`], so it also happens when a test panics. Leftovers of an earlier
//!   crashed run with the same lab name are removed by [`Lab::up`] before it
//!   creates anything.
//! * **One owner per lab name.** [`Lab::up`] holds an exclusive `flock` on
//!   `/run/lock/weft-lab-NAME.lock` for the lab's lifetime, so a second run
//!   using the same name fails instead of "cleaning up" a live lab. The lock
//!   is released automatically if the process dies. Use a distinct name and
//!   subnet per test so tests can run in parallel.
//!
//! # Requirements
//!
//! Root (CAP_SYS_ADMIN and CAP_NET_ADMIN), `ip` from the Debian package
//! `iproute2` and `nft` from `nftables`. Missing tools make [`Lab::up`] fail
//! with an error naming the package; nothing is skipped silently.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

/// First address of the range every lab address must lie in (198.18.0.0/15,
/// RFC 2544 benchmarking space).
pub const LAB_RANGE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
/// Prefix length of [`LAB_RANGE`].
pub const LAB_RANGE_PREFIX: u8 = 15;
/// Prefix length of each lab's host network (`198.18.S.0/24`).
pub const PREFIX_LEN: u8 = 24;
/// Largest number of hosts a lab can have (`.1` … `.254` of its /24).
pub const MAX_HOSTS: usize = 254;
/// Longest accepted lab name.
pub const MAX_NAME_LEN: usize = 24;
/// Default time limit of [`Lab::exec`] and [`Lab::exec_ok`].
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(30);

/// Where `ip netns` keeps its namespace handles (iproute2's NETNS_RUN_DIR).
const NETNS_RUN_DIR: &str = "/run/netns";
/// nftables table (bridge family) and chain used for faults in the switch.
const NFT_TABLE: &str = "lab";
const NFT_CHAIN: &str = "filter";
const PARTITION_TAG: &str = "partition ";
/// How long teardown waits for killed processes to disappear.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// A running lab: a switch namespace with a bridge and `N` host namespaces.
///
/// Created by [`Lab::up`]; torn down by [`Lab::down`] or when dropped
/// (including during a panic). Methods taking a host index use 1-based
/// indices `1..=host_count()`.
pub struct Lab {
    name: String,
    subnet: u8,
    hosts: usize,
    ip: PathBuf,
    nft: PathBuf,
    /// Namespaces created by this lab that still exist (switch first).
    namespaces: Vec<String>,
    /// Children spawned through the lab, by pidfd.
    children: Mutex<Vec<Tracked>>,
    /// Exclusive lock on the lab name; released on teardown.
    lock: Option<File>,
}

/// A child process started through the lab.
struct Tracked {
    pid: u32,
    pidfd: OwnedFd,
}

impl Lab {
    /// Creates lab `name` with `hosts` hosts on network `198.18.{subnet}.0/24`.
    ///
    /// Host `i` (1-based) is namespace `{name}-h{i}` with address
    /// `198.18.{subnet}.{i}/24` on `eth0`; the switch is namespace `{name}-sw`
    /// with bridge `br0` and one port `h{i}` per host. Leftover namespaces of
    /// an earlier crashed run with the same name are emptied (their processes
    /// SIGKILLed) and deleted first.
    ///
    /// Fails if `name` is not 1–24 characters of `[a-z0-9-]` starting with a
    /// letter, if `hosts` is not in `1..=254`, if any address would fall
    /// outside 198.18.0.0/15, if not running as root, if `ip` or `nft` is
    /// missing (the error names the Debian package), if another live process
    /// holds the same lab name, or if any setup command fails. On failure
    /// everything created so far is torn down.
    pub fn up(name: &str, subnet: u8, hosts: usize) -> Result<Lab> {
        validate_name(name)?;
        ensure!(
            (1..=MAX_HOSTS).contains(&hosts),
            "lab `{name}`: host count must be in 1..={MAX_HOSTS}, got {hosts}"
        );
        let network = Ipv4Addr::new(198, 18, subnet, 0);
        check_lab_network(network, PREFIX_LEN)?;
        for i in 1..=hosts {
            check_lab_host(network, PREFIX_LEN, host_ip(subnet, i))?;
        }
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        ensure!(
            euid == 0,
            "lab `{name}` needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) to create network namespaces; running as uid {euid}"
        );
        let search = tool_search_path();
        let ip = find_tool_in("ip", "iproute2", &search)?;
        let nft = find_tool_in("nft", "nftables", &search)?;
        let lock = lock_name(name)?;

        remove_leftovers(&ip, name).with_context(|| format!("lab `{name}`: removing leftovers"))?;

        let mut lab = Lab {
            name: name.to_owned(),
            subnet,
            hosts,
            ip,
            nft,
            namespaces: Vec::new(),
            children: Mutex::new(Vec::new()),
            lock: Some(lock),
        };
        // Any error below drops `lab`, which tears down what exists so far.
        lab.build()
            .with_context(|| format!("lab `{name}`: setting up"))?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        let sw = self.switch_netns();
        self.add_netns(&sw)?;
        self.ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        self.ip(&[
            "-n",
            &sw,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "mcast_snooping",
            "0",
        ])?;
        self.ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        self.nft_script(&format!(
            "add table bridge {NFT_TABLE}\n\
             add chain bridge {NFT_TABLE} {NFT_CHAIN} {{ type filter hook forward priority 0; policy accept; }}\n"
        ))?;

        for i in 1..=self.hosts {
            let ns = self.netns(i);
            let port = port_name(i);
            let addr = format!("{}/{PREFIX_LEN}", self.host_addr(i));
            self.add_netns(&ns)?;
            self.ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            self.ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            self.ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            self.ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            self.ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }

        for i in 1..=self.hosts {
            let ns = self.netns(i);
            for family in ["-4", "-6"] {
                let routes = self.ip(&["-n", &ns, family, "route", "show", "table", "all"])?;
                if let Some(line) = routes.lines().find(|l| l.starts_with("default")) {
                    bail!("host namespace {ns} has a default route ({line}); refusing to run");
                }
            }
        }
        Ok(())
    }

    fn add_netns(&mut self, ns: &str) -> Result<()> {
        self.ip(&["netns", "add", ns])?;
        self.namespaces.push(ns.to_owned());
        Ok(())
    }

    /// The lab's name (prefix of all its namespace names).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of hosts; valid host indices are `1..=host_count()`.
    pub fn host_count(&self) -> usize {
        self.hosts
    }

    /// The lab's network address, `198.18.{subnet}.0` (prefix [`PREFIX_LEN`]).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet, 0)
    }

    /// Address of host `i` on its `eth0`: `198.18.{subnet}.{i}`.
    ///
    /// # Panics
    /// If `i` is not in `1..=host_count()`.
    pub fn host_addr(&self, i: usize) -> Ipv4Addr {
        self.assert_host(i);
        host_ip(self.subnet, i)
    }

    /// Name of host `i`'s network namespace: `{name}-h{i}`.
    ///
    /// # Panics
    /// If `i` is not in `1..=host_count()`.
    pub fn netns(&self, i: usize) -> String {
        self.assert_host(i);
        format!("{}-h{i}", self.name)
    }

    /// Name of the switch namespace: `{name}-sw`.
    pub fn switch_netns(&self) -> String {
        format!("{}-sw", self.name)
    }

    /// Spawns `cmd` inside host `i`'s network namespace and tracks the child.
    ///
    /// The caller's `Command` is used as is, so its program, arguments,
    /// environment, working directory and stdio are all kept. A `pre_exec`
    /// hook added to `cmd` does what `ip netns exec` does in the child before
    /// exec: join the namespace (`setns`), move to a private mount namespace
    /// and mount a `/sys` that shows the host's interfaces. (`/etc/netns`
    /// bind mounts are not done.) Because the hook stays on `cmd`, do not
    /// reuse the same `Command` for another host.
    ///
    /// The child is SIGKILLed and reaped on teardown if still running, so a
    /// `Child::wait` after teardown returns `ECHILD`. Its descendants are
    /// killed too as long as they stay in a lab namespace.
    pub fn spawn(&self, i: usize, cmd: &mut Command) -> Result<Child> {
        self.check_host(i)?;
        let ns = self.netns(i);
        let hook = netns_hook(&ns)?;
        // SAFETY: the hook only makes async-signal-safe system calls (open,
        // setns, close, unshare, mount, umount2, statvfs) on data prepared
        // before fork, and does not allocate.
        unsafe {
            cmd.pre_exec(hook);
        }
        let child = cmd.spawn().with_context(|| {
            format!(
                "spawning {} in namespace {ns}",
                command_line(cmd.get_program(), cmd.get_args())
            )
        })?;
        let pid = child.id();
        match pidfd_open(pid) {
            Ok(pidfd) => {
                self.lock_children().push(Tracked { pid, pidfd });
                Ok(child)
            }
            Err(e) => {
                // Cannot track it safely: do not let it outlive this call.
                let mut child = child;
                let _ = child.kill();
                let _ = child.wait();
                Err(anyhow!(e).context(format!("pidfd_open({pid}) for a child in {ns}")))
            }
        }
    }

    /// Runs `args` (program and arguments) to completion in host `i` and
    /// returns its output, whatever its exit status. Stdin is `/dev/null`.
    /// Fails if it cannot be started or runs longer than
    /// [`DEFAULT_EXEC_TIMEOUT`] (it is then killed).
    pub fn exec<S: AsRef<OsStr>>(&self, i: usize, args: &[S]) -> Result<Output> {
        self.exec_timeout(i, args, DEFAULT_EXEC_TIMEOUT)
    }

    /// Like [`Lab::exec`] with an explicit time limit.
    pub fn exec_timeout<S: AsRef<OsStr>>(
        &self,
        i: usize,
        args: &[S],
        timeout: Duration,
    ) -> Result<Output> {
        let (prog, rest) = args
            .split_first()
            .ok_or_else(|| anyhow!("Lab::exec needs a program"))?;
        let line = command_line(prog.as_ref(), rest.iter().map(AsRef::as_ref));
        let mut cmd = Command::new(prog);
        cmd.args(rest)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.spawn(i, &mut cmd)?;
        let pid = child.id();
        let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
        for (is_out, pipe) in [
            (
                true,
                child
                    .stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn Read + Send>),
            ),
            (
                false,
                child
                    .stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn Read + Send>),
            ),
        ] {
            let tx = tx.clone();
            let mut pipe = pipe.expect("piped");
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                let _ = tx.send((is_out, buf));
            });
        }
        drop(tx);
        let deadline = Instant::now() + timeout;
        let status = wait_deadline(&mut child, deadline);
        self.untrack(pid);
        let status: ExitStatus = match status {
            Ok(Some(status)) => status,
            Ok(None) => bail!("`{line}` in {} timed out after {timeout:?}", self.netns(i)),
            Err(e) => return Err(e.context(format!("waiting for `{line}`"))),
        };
        let mut output = Output {
            status,
            stdout: Vec::new(),
            stderr: Vec::new(),
        };
        // A background descendant may keep a pipe open; don't wait for it forever.
        let grace = Instant::now() + Duration::from_secs(2);
        for _ in 0..2 {
            let left = grace.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((true, buf)) => output.stdout = buf,
                Ok((false, buf)) => output.stderr = buf,
                Err(_) => bail!(
                    "`{line}` in {} exited ({status}) but a descendant still holds its stdout/stderr open",
                    self.netns(i)
                ),
            }
        }
        Ok(output)
    }

    /// Runs `args` in host `i` like [`Lab::exec`] and returns its stdout as
    /// text; fails with the command line, exit status and stderr if it does
    /// not exit successfully.
    pub fn exec_ok<S: AsRef<OsStr>>(&self, i: usize, args: &[S]) -> Result<String> {
        let out = self.exec(i, args)?;
        if !out.status.success() {
            let line = command_line(args[0].as_ref(), args[1..].iter().map(AsRef::as_ref));
            bail!(
                "`{line}` in {} failed ({}): {}",
                self.netns(i),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Partitions host `i`: the switch drops every frame from or to its port
    /// while the link stays up (two nftables `bridge` rules in the switch
    /// namespace, commented `partition hI`, added atomically). Idempotent.
    pub fn partition(&self, i: usize) -> Result<()> {
        self.check_host(i)?;
        let port = port_name(i);
        let tag = format!("{PARTITION_TAG}{port}");
        if !self.rule_handles(|c| c == tag)?.is_empty() {
            return Ok(());
        }
        self.nft_script(&format!(
            "add rule bridge {NFT_TABLE} {NFT_CHAIN} iifname \"{port}\" drop comment \"{tag}\"\n\
             add rule bridge {NFT_TABLE} {NFT_CHAIN} oifname \"{port}\" drop comment \"{tag}\"\n"
        ))
        .with_context(|| format!("partitioning host {i} of lab `{}`", self.name))
    }

    /// Ends the partition of host `i` by deleting exactly its rules (found by
    /// comment, deleted by handle). A no-op if host `i` is not partitioned.
    pub fn heal(&self, i: usize) -> Result<()> {
        self.check_host(i)?;
        let tag = format!("{PARTITION_TAG}{}", port_name(i));
        self.delete_rules(|c| c == tag)
            .with_context(|| format!("healing host {i} of lab `{}`", self.name))
    }

    /// Ends every partition in the lab. Does not [`plug`](Lab::plug)
    /// unplugged hosts.
    pub fn heal_all(&self) -> Result<()> {
        self.delete_rules(|c| c.starts_with(PARTITION_TAG))
            .with_context(|| format!("healing lab `{}`", self.name))
    }

    /// Unplugs host `i`: its switch port goes administratively down, so the
    /// host sees NO-CARRIER on `eth0`.
    pub fn unplug(&self, i: usize) -> Result<()> {
        self.check_host(i)?;
        self.ip(&[
            "-n",
            &self.switch_netns(),
            "link",
            "set",
            &port_name(i),
            "down",
        ])?;
        Ok(())
    }

    /// Plugs host `i` back in (switch port up). ARP recovers within about a
    /// second.
    pub fn plug(&self, i: usize) -> Result<()> {
        self.check_host(i)?;
        self.ip(&[
            "-n",
            &self.switch_netns(),
            "link",
            "set",
            &port_name(i),
            "up",
        ])?;
        Ok(())
    }

    /// Tears the lab down now and reports any failure; see [`Lab::teardown`]
    /// for what that involves. Dropping a `Lab` does the same but can only
    /// print failures.
    pub fn down(mut self) -> Result<()> {
        self.teardown()
    }

    /// Kills tracked children, then every process left in the lab's
    /// namespaces, then deletes the namespaces and releases the name lock.
    /// Idempotent; keeps going after errors and reports them all.
    fn teardown(&mut self) -> Result<()> {
        let mut errors: Vec<String> = Vec::new();

        let children = std::mem::take(&mut *self.lock_children());
        for t in &children {
            if let Err(e) = pidfd_kill(&t.pidfd) {
                errors.push(format!("SIGKILL child {}: {e}", t.pid));
            }
        }
        for t in &children {
            if let Err(e) = reap(&t.pidfd, Instant::now() + KILL_WAIT) {
                errors.push(format!("reaping child {}: {e}", t.pid));
            }
        }

        // Hosts first, switch last.
        let namespaces = std::mem::take(&mut self.namespaces);
        let mut remaining = Vec::new();
        for ns in namespaces.iter().rev() {
            if let Err(e) = kill_netns_processes(&self.ip, ns) {
                errors.push(format!("{e:#}"));
            }
            match delete_netns(&self.ip, ns) {
                Ok(()) => {}
                Err(e) => {
                    errors.push(format!("{e:#}"));
                    remaining.push(ns.clone());
                }
            }
        }
        remaining.reverse();
        self.namespaces = remaining;
        if self.namespaces.is_empty() {
            self.lock = None;
        }

        if errors.is_empty() {
            Ok(())
        } else {
            bail!("tearing down lab `{}`: {}", self.name, errors.join("; "))
        }
    }

    fn lock_children(&self) -> std::sync::MutexGuard<'_, Vec<Tracked>> {
        // A panic while holding the lock leaves the list valid.
        self.children.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn untrack(&self, pid: u32) {
        self.lock_children().retain(|t| t.pid != pid);
    }

    fn assert_host(&self, i: usize) {
        if let Err(e) = self.check_host(i) {
            panic!("{e}");
        }
    }

    fn check_host(&self, i: usize) -> Result<()> {
        ensure!(
            (1..=self.hosts).contains(&i),
            "lab `{}` has hosts 1..={}, not {i}",
            self.name,
            self.hosts
        );
        Ok(())
    }

    fn ip(&self, args: &[&str]) -> Result<String> {
        run(&self.ip, args, None)
    }

    fn nft_script(&self, script: &str) -> Result<()> {
        let sw = self.switch_netns();
        let nft = self.nft.to_string_lossy();
        run(
            &self.ip,
            &["netns", "exec", &sw, &nft, "-f", "-"],
            Some(script),
        )?;
        Ok(())
    }

    /// Handles of the rules in the switch's fault chain whose comment matches.
    fn rule_handles(&self, matches: impl Fn(&str) -> bool) -> Result<Vec<u64>> {
        let sw = self.switch_netns();
        let nft = self.nft.to_string_lossy();
        let json = run(
            &self.ip,
            &[
                "netns", "exec", &sw, &nft, "-j", "list", "chain", "bridge", NFT_TABLE, NFT_CHAIN,
            ],
            None,
        )?;
        let doc: serde_json::Value =
            serde_json::from_str(&json).context("parsing `nft -j list chain` output")?;
        let items = doc["nftables"]
            .as_array()
            .ok_or_else(|| anyhow!("unexpected `nft -j` output: {json}"))?;
        let mut handles = Vec::new();
        for rule in items.iter().filter_map(|item| item.get("rule")) {
            let Some(comment) = rule.get("comment").and_then(|c| c.as_str()) else {
                continue;
            };
            if matches(comment) {
                let handle = rule["handle"]
                    .as_u64()
                    .ok_or_else(|| anyhow!("nft rule without a handle: {rule}"))?;
                handles.push(handle);
            }
        }
        Ok(handles)
    }

    fn delete_rules(&self, matches: impl Fn(&str) -> bool) -> Result<()> {
        let handles = self.rule_handles(matches)?;
        if handles.is_empty() {
            return Ok(());
        }
        let script: String = handles
            .iter()
            .map(|h| format!("delete rule bridge {NFT_TABLE} {NFT_CHAIN} handle {h}\n"))
            .collect();
        self.nft_script(&script)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("weft lab: {e:#}");
        }
    }
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("name", &self.name)
            .field("network", &format_args!("{}/{PREFIX_LEN}", self.network()))
            .field("hosts", &self.hosts)
            .field("namespaces", &self.namespaces)
            .finish()
    }
}

fn host_ip(subnet: u8, i: usize) -> Ipv4Addr {
    // Callers validate 1 <= i <= MAX_HOSTS (254).
    Ipv4Addr::new(198, 18, subnet, i as u8)
}

fn port_name(i: usize) -> String {
    format!("h{i}")
}

/// Checks that `name` is a usable lab name: 1–24 characters of `[a-z0-9-]`,
/// starting with a letter and not ending with `-`.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    ensure!(
        ok,
        "invalid lab name `{name}`: use 1-{MAX_NAME_LEN} characters of [a-z0-9-], starting with a letter"
    );
    Ok(())
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

/// Checks that the network `net/prefix` lies entirely inside 198.18.0.0/15
/// and that `net` is its network address.
pub fn check_lab_network(net: Ipv4Addr, prefix: u8) -> Result<()> {
    ensure!(
        (LAB_RANGE_PREFIX..=30).contains(&prefix),
        "lab network {net}/{prefix}: prefix must be /{LAB_RANGE_PREFIX}../30"
    );
    let n = u32::from(net);
    ensure!(
        n & mask(prefix) == n,
        "lab network {net}/{prefix} has host bits set"
    );
    ensure!(
        n & mask(LAB_RANGE_PREFIX) == u32::from(LAB_RANGE),
        "lab network {net}/{prefix} is outside {LAB_RANGE}/{LAB_RANGE_PREFIX}; refusing"
    );
    Ok(())
}

/// Checks that `addr` is a usable host address of `net/prefix` (not the
/// network or broadcast address) and lies inside 198.18.0.0/15.
pub fn check_lab_host(net: Ipv4Addr, prefix: u8, addr: Ipv4Addr) -> Result<()> {
    check_lab_network(net, prefix)?;
    let a = u32::from(addr);
    ensure!(
        a & mask(prefix) == u32::from(net),
        "host address {addr} is outside lab network {net}/{prefix}"
    );
    let host_bits = a & !mask(prefix);
    ensure!(
        host_bits != 0 && host_bits != !mask(prefix),
        "host address {addr} is the network or broadcast address of {net}/{prefix}"
    );
    Ok(())
}

/// PATH plus the sbin directories (root tools live there and a non-login
/// PATH may lack them).
fn tool_search_path() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        if !dirs.iter().any(|x| x == Path::new(d)) {
            dirs.push(PathBuf::from(d));
        }
    }
    dirs
}

/// Finds executable `tool` in `dirs`; the error names the Debian `package`
/// that provides it.
pub fn find_tool_in(tool: &str, package: &str, dirs: &[PathBuf]) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    for dir in dirs {
        let path = dir.join(tool);
        if let Ok(meta) = std::fs::metadata(&path)
            && meta.is_file()
            && meta.permissions().mode() & 0o111 != 0
        {
            return Ok(path);
        }
    }
    bail!(
        "the network lab needs `{tool}`, which was not found; install the Debian package `{package}` \
         (apt-get install -y {package})"
    )
}

/// Takes the exclusive per-name lock, or fails if a live process holds it.
fn lock_name(name: &str) -> Result<File> {
    let dir = if Path::new("/run/lock").is_dir() {
        PathBuf::from("/run/lock")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("weft-lab-{name}.lock"));
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening lab lock {}", path.display()))?;
    // SAFETY: flock on a valid, owned descriptor.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            bail!(
                "lab name `{name}` is in use by another running lab (lock {} is held); \
                 give each test its own lab name",
                path.display()
            );
        }
        return Err(anyhow!(e).context(format!("locking {}", path.display())));
    }
    Ok(file)
}

/// Namespace names `{name}-sw` and `{name}-h<digits>` that exist now.
fn leftover_namespaces(ip: &Path, name: &str) -> Result<Vec<String>> {
    let list = run(ip, &["netns", "list"], None)?;
    let prefix = format!("{name}-");
    Ok(list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|ns| {
            ns.strip_prefix(&prefix).is_some_and(|rest| {
                rest == "sw"
                    || rest
                        .strip_prefix('h')
                        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            })
        })
        .map(str::to_owned)
        .collect())
}

fn remove_leftovers(ip: &Path, name: &str) -> Result<()> {
    let mut leftovers = leftover_namespaces(ip, name)?;
    // Hosts before the switch, like a normal teardown.
    leftovers.sort_by_key(|ns| ns.ends_with("-sw"));
    for ns in &leftovers {
        kill_netns_processes(ip, ns)?;
        delete_netns(ip, ns)?;
    }
    Ok(())
}

/// SIGKILLs every process whose network namespace is `ns` and waits (bounded)
/// until none is left.
fn kill_netns_processes(ip: &Path, ns: &str) -> Result<()> {
    let ns_path = Path::new(NETNS_RUN_DIR).join(ns);
    let Ok(meta) = std::fs::metadata(&ns_path) else {
        return Ok(()); // already gone
    };
    let ns_id = (meta.dev(), meta.ino());
    let me = std::process::id();
    let deadline = Instant::now() + KILL_WAIT;
    let mut signalled: HashSet<u32> = HashSet::new();
    loop {
        let pids = match run(ip, &["netns", "pids", ns], None) {
            Ok(out) => out,
            Err(_) if !ns_path.exists() => return Ok(()),
            Err(e) => return Err(e),
        };
        let pids: Vec<u32> = pids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            return Ok(());
        }
        for &pid in &pids {
            ensure!(
                pid != me,
                "this test process itself is inside lab namespace {ns}; not killing it"
            );
            // Pin the process first, then confirm it is (still) in `ns`, so a
            // recycled PID is never signalled.
            let Ok(pidfd) = pidfd_open(pid) else { continue };
            let in_ns = std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .map(|m| (m.dev(), m.ino()) == ns_id)
                .unwrap_or(false);
            if in_ns {
                let _ = pidfd_kill(&pidfd);
                signalled.insert(pid);
                // Reap it if it happens to be our own (untracked) child.
                let _ = try_reap(&pidfd);
            }
        }
        if Instant::now() >= deadline {
            bail!("processes {pids:?} in namespace {ns} survived SIGKILL for {KILL_WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn delete_netns(ip: &Path, ns: &str) -> Result<()> {
    match run(ip, &["netns", "del", ns], None) {
        Ok(_) => Ok(()),
        Err(_) if !Path::new(NETNS_RUN_DIR).join(ns).exists() => Ok(()),
        Err(e) => Err(e),
    }
}

/// The `pre_exec` hook that moves a child into namespace `ns` the way
/// `ip netns exec` does (iproute2 `netns_switch`).
fn netns_hook(ns: &str) -> Result<impl FnMut() -> io::Result<()> + Send + Sync + 'static> {
    let path = CString::new(format!("{NETNS_RUN_DIR}/{ns}"))?;
    let sysfs_source = CString::new(ns)?;
    Ok(move || {
        // SAFETY: only async-signal-safe system calls on NUL-terminated
        // strings that live as long as the closure.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let r = libc::setns(fd, libc::CLONE_NEWNET);
            let setns_err = io::Error::last_os_error();
            libc::close(fd);
            if r != 0 {
                return Err(setns_err);
            }
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Keep our mounts from propagating back to the parent.
            if libc::mount(
                c"".as_ptr(),
                c"/".as_ptr(),
                c"none".as_ptr(),
                libc::MS_SLAVE | libc::MS_REC,
                std::ptr::null(),
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // A /sys that describes the joined network namespace.
            let mut flags: libc::c_ulong = 0;
            if libc::umount2(c"/sys".as_ptr(), libc::MNT_DETACH) != 0 {
                let mut st: libc::statvfs = std::mem::zeroed();
                if libc::statvfs(c"/sys".as_ptr(), &mut st) == 0 && st.f_flag & libc::ST_RDONLY != 0
                {
                    flags = libc::MS_RDONLY;
                }
            }
            if libc::mount(
                sysfs_source.as_ptr(),
                c"/sys".as_ptr(),
                c"sysfs".as_ptr(),
                flags,
                std::ptr::null(),
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    })
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain system call; on success it returns a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// SIGKILLs the process behind `pidfd`; a process that already exited is fine.
fn pidfd_kill(pidfd: &OwnedFd) -> io::Result<()> {
    // SAFETY: plain system call on a valid pidfd.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e);
        }
    }
    Ok(())
}

/// Reaps the child behind `pidfd` if it has exited. `Ok(true)` when it is
/// gone (reaped now, or already reaped by its owner / not our child).
fn try_reap(pidfd: &OwnedFd) -> io::Result<bool> {
    // SAFETY: waitid on a valid pidfd with a zeroed siginfo out-parameter.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        );
        if r != 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ECHILD) {
                Ok(true)
            } else {
                Err(e)
            };
        }
        // With WNOHANG, si_pid stays 0 while the child is still running.
        Ok(info.si_pid() != 0)
    }
}

fn reap(pidfd: &OwnedFd, deadline: Instant) -> io::Result<()> {
    loop {
        if try_reap(pidfd)? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "still running after SIGKILL",
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits for `child` until `deadline`; on timeout kills and reaps it and
/// returns `Ok(None)`.
fn wait_deadline(child: &mut Child, deadline: Instant) -> Result<Option<ExitStatus>> {
    let mut pause = Duration::from_micros(200);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

fn command_line<'a>(prog: &OsStr, args: impl IntoIterator<Item = &'a OsStr>) -> String {
    let mut line = quote(prog);
    for a in args {
        line.push(' ');
        line.push_str(&quote(a));
    }
    line
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs a tool to completion; the error carries the command line, exit
/// status, stderr and (if any) the stdin script.
fn run(prog: &Path, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let line = command_line(prog.as_os_str(), args.iter().map(OsStr::new));
    let mut child = Command::new(prog)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{line}`"))?;
    if let Some(script) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(script.as_bytes())
            .with_context(|| format!("writing stdin of `{line}`"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{line}`"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut msg = format!("`{line}` failed ({}): {}", out.status, stderr.trim());
        if let Some(script) = stdin {
            msg.push_str(&format!("\nstdin was:\n{script}"));
        }
        bail!(msg);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_networks_must_stay_in_benchmark_range() {
        check_lab_network(Ipv4Addr::new(198, 18, 0, 0), 24).unwrap();
        check_lab_network(Ipv4Addr::new(198, 18, 255, 0), 24).unwrap();
        check_lab_network(Ipv4Addr::new(198, 19, 7, 0), 24).unwrap();
        check_lab_network(Ipv4Addr::new(198, 18, 0, 0), 15).unwrap();
        for (net, prefix) in [
            ([198, 17, 255, 0], 24),
            ([198, 20, 0, 0], 24),
            ([10, 0, 0, 0], 24),
            ([192, 0, 2, 0], 24),
            ([198, 18, 0, 0], 14),
            ([198, 16, 0, 0], 14),
            ([198, 18, 0, 0], 0),
            ([198, 18, 1, 5], 24),
        ] {
            assert!(
                check_lab_network(Ipv4Addr::from(net), prefix).is_err(),
                "{net:?}/{prefix} accepted"
            );
        }
    }

    #[test]
    fn host_addresses_are_checked() {
        let net = Ipv4Addr::new(198, 18, 9, 0);
        check_lab_host(net, 24, Ipv4Addr::new(198, 18, 9, 1)).unwrap();
        check_lab_host(net, 24, Ipv4Addr::new(198, 18, 9, 254)).unwrap();
        assert!(check_lab_host(net, 24, Ipv4Addr::new(198, 18, 9, 0)).is_err());
        assert!(check_lab_host(net, 24, Ipv4Addr::new(198, 18, 9, 255)).is_err());
        assert!(check_lab_host(net, 24, Ipv4Addr::new(198, 18, 10, 1)).is_err());
        assert!(check_lab_host(net, 24, Ipv4Addr::new(8, 8, 8, 8)).is_err());
        assert_eq!(host_ip(9, 254), Ipv4Addr::new(198, 18, 9, 254));
    }

    #[test]
    fn names_are_validated() {
        for ok in ["a", "wlst1", "gossip-basic", "a-b-c9"] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            "1abc",
            "Abc",
            "a b",
            "a_b",
            "a-",
            "a/b",
            "a.b",
            &"x".repeat(25),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn missing_tool_error_names_the_package() {
        let empty = tempfile::tempdir().unwrap();
        let err = find_tool_in("nft", "nftables", &[empty.path().to_path_buf()]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("`nft`") && msg.contains("apt-get install -y nftables"),
            "{msg}"
        );
        let found = find_tool_in(
            "sh",
            "dash",
            &[PathBuf::from("/bin"), PathBuf::from("/usr/bin")],
        );
        assert!(found.is_ok());
    }

    #[test]
    fn quoting_is_shell_like() {
        assert_eq!(
            command_line(OsStr::new("ip"), ["-n", "a b", "it's"].map(OsStr::new)),
            r"ip -n 'a b' 'it'\''s'"
        );
    }
}
