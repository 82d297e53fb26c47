//! Booted lab hosts: real systemd machines (systemd-nspawn) inside [`Lab`] network namespaces,
//! for the packaging and Ansible tests. (Compiled into `tests/packaging.rs` with `#[path]`,
//! so it names the support crate `weft_tests`.)
//!
//! A [`BootedLab`] of `n` machines plus one controller is a [`Lab`] of `n + 1` hosts:
//!
//! * hosts `1..=n` each boot the cached Debian rootfs (`tests/packaging/rootfs.sh`) with
//!   `systemd-nspawn -b`, on a private overlay (the rootfs itself is never written), joined
//!   to the lab namespace `NAME-hI` with `--network-namespace-path`, so the machine's only
//!   interface is the lab's `eth0` and it has no route out. Its sshd accepts the lab's key
//!   for root.
//! * host `n + 1` is the controller `ctl`: a plain namespace (the real file system, no
//!   agent) from which `ansible-playbook` reaches the machines over SSH.
//!
//! The harness workarounds of `research/harness.md` §4 are built in: nspawn runs from the root
//! network namespace (`ip netns exec` would hide `/sys/fs/cgroup`), with `--keep-unit
//! --register=no` (no host systemd), inside a private mount namespace whose tmpfs on
//! `/run/systemd/nspawn` keeps nspawn's propagation directory off the ext4 `/run`.
//!
//! Teardown, also on panic: each machine gets SIGTERM (a clean shutdown, bounded wait),
//! then SIGKILL; then the lab kills whatever is left in its namespaces and deletes them. The
//! overlays live in a temp dir and their mounts die with the private mount namespaces.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use weft_tests::lab::Lab;

/// How long a machine may take to reach `running` (or `degraded`) after boot.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a clean shutdown may take before the machine is killed.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// The workspace root (parent of `tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// One booted machine.
pub struct Machine {
    /// Host name (also its node name): `h1`, `h2`, …
    pub name: String,
    /// Its lab address.
    pub addr: String,
    nspawn: Child,
    /// PID (in the root PID namespace) of the machine's systemd.
    pub init_pid: u32,
    /// The machine's root as seen from here (`/proc/PID/root`).
    pub root: PathBuf,
    /// systemd-nspawn's output (the console is passive: boot messages only).
    console: PathBuf,
}

/// A lab of booted machines and a controller. Fields drop in order: machines first.
pub struct BootedLab {
    /// The machines, `h1..hN`.
    pub machines: Vec<Machine>,
    /// The network lab (hosts `1..=N` the machines, `N + 1` the controller).
    pub lab: Lab,
    /// Scratch space: overlays, SSH key, inventory.
    pub dir: tempfile::TempDir,
    /// Private key whose public half every machine's root accepts.
    pub ssh_key: PathBuf,
}

impl BootedLab {
    /// Brings up lab `name` on `198.18.{subnet}.0/24` with `machines` booted hosts from
    /// `rootfs` and a controller, and waits until every machine runs systemd and sshd.
    pub fn up(name: &str, subnet: u8, machines: usize, rootfs: &Path) -> Result<BootedLab> {
        ensure!(
            rootfs.join(".weft-rootfs-ok").exists(),
            "no finished rootfs at {}: run tests/packaging/rootfs.sh",
            rootfs.display()
        );
        for (tool, package) in [
            ("systemd-nspawn", "systemd-container"),
            ("ssh-keygen", "openssh-client"),
            ("unshare", "util-linux"),
            ("nsenter", "util-linux"),
        ] {
            weft_tests::lab::find_tool_in(tool, package, &search_path())?;
        }
        let lab = Lab::up(name, subnet, machines + 1)?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("weft-{name}-"))
            .tempdir_in(workspace_root().join("target"))?;
        let ssh_key = dir.path().join("id_ed25519");
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "weft-lab", "-f"])
                .arg(&ssh_key),
        )?;
        let pubkey = fs::read_to_string(dir.path().join("id_ed25519.pub"))?;
        let mut booted = BootedLab {
            machines: Vec::new(),
            lab,
            dir,
            ssh_key,
        };
        for i in 1..=machines {
            let machine = booted.boot(i, rootfs, &pubkey)?;
            booted.machines.push(machine);
        }
        for m in &booted.machines {
            m.wait_running(BOOT_TIMEOUT)?;
        }
        Ok(booted)
    }

    /// Lab index of the controller host.
    pub fn controller(&self) -> usize {
        self.machines.len() + 1
    }

    fn boot(&self, i: usize, rootfs: &Path, pubkey: &str) -> Result<Machine> {
        let name = format!("h{i}");
        let base = self.dir.path().join(&name);
        let (upper, work, merged) = (base.join("upper"), base.join("work"), base.join("merged"));
        for d in [&upper, &work, &merged] {
            fs::create_dir_all(d)?;
        }
        // Per-machine files, written into the overlay's upper layer before boot.
        fs::create_dir_all(upper.join("etc"))?;
        fs::write(upper.join("etc/hostname"), format!("{name}\n"))?;
        let id: String = (0..32)
            .map(|_| char::from_digit(rand_nibble(), 16).expect("nibble"))
            .collect();
        fs::write(upper.join("etc/machine-id"), format!("{id}\n"))?;
        fs::write(
            upper.join("etc/hosts"),
            format!("127.0.0.1 localhost\n127.0.1.1 {name}\n"),
        )?;
        let ssh = upper.join("root/.ssh");
        fs::create_dir_all(&ssh)?;
        fs::set_permissions(&ssh, fs::Permissions::from_mode(0o700))?;
        fs::write(ssh.join("authorized_keys"), pubkey)?;
        fs::set_permissions(
            ssh.join("authorized_keys"),
            fs::Permissions::from_mode(0o600),
        )?;

        fs::create_dir_all("/run/systemd/nspawn")?;
        let netns = format!("/run/netns/{}", self.lab.netns(i));
        let script = format!(
            "set -e; mount -t tmpfs tmpfs /run/systemd/nspawn; \
             mount -t overlay overlay -o lowerdir={lower},upperdir={upper},workdir={work} {merged}; \
             exec systemd-nspawn -q -b -D {merged} -M {name} --register=no --keep-unit \
             --network-namespace-path={netns} --console=passive --resolv-conf=off \
             --timezone=off --link-journal=no",
            lower = rootfs.display(),
            upper = upper.display(),
            work = work.display(),
            merged = merged.display(),
        );
        let log = fs::File::create(base.join("console.log"))?;
        let nspawn = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start systemd-nspawn")?;
        let mut machine = Machine {
            name,
            addr: self.lab.host_addr(i).to_string(),
            init_pid: 0,
            root: PathBuf::new(),
            console: base.join("console.log"),
            nspawn,
        };
        // The container's systemd: a child of nspawn that is PID 1 of its own PID namespace
        // and runs systemd itself. nspawn's short-lived outer child runs systemd-nspawn, and
        // the inner child runs nspawn's code until it execs systemd, so wait for both
        // conditions, seen twice in a row.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen: Option<u32> = None;
        loop {
            if let Some(status) = machine.nspawn.try_wait()? {
                bail!(
                    "systemd-nspawn for {} exited at once ({status}): {}",
                    machine.name,
                    fs::read_to_string(base.join("console.log")).unwrap_or_default()
                );
            }
            let pid = machine.nspawn.id();
            let children =
                fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
            let init = children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
                .find(|&child| is_container_init(child));
            match (init, seen) {
                (Some(now), Some(before)) if now == before => {
                    machine.init_pid = now;
                    machine.root = PathBuf::from(format!("/proc/{now}/root"));
                    return Ok(machine);
                }
                _ => seen = init,
            }
            if Instant::now() > deadline {
                bail!("no init process under systemd-nspawn for {}", machine.name);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `ansible-playbook` on the controller with `args` (inventory, playbook, extra
    /// vars); returns its output, whatever its exit status, and how long it took.
    pub fn ansible_playbook(&self, args: &[&str], timeout: Duration) -> Result<(Output, Duration)> {
        let root = workspace_root();
        let cp = self.dir.path().join("cp");
        let tmp = self.dir.path().join("ansible-tmp");
        fs::create_dir_all(&cp)?;
        fs::create_dir_all(&tmp)?;
        let mut argv: Vec<String> = vec![
            "env".into(),
            format!(
                "ANSIBLE_CONFIG={}",
                root.join("ansible/ansible.cfg").display()
            ),
            format!("ANSIBLE_SSH_CONTROL_PATH_DIR={}", cp.display()),
            format!("ANSIBLE_LOCAL_TEMP={}", tmp.display()),
            "ANSIBLE_HOST_KEY_CHECKING=False".into(),
            "ANSIBLE_NOCOLOR=1".into(),
            "ANSIBLE_FORCE_COLOR=0".into(),
            "ansible-playbook".into(),
        ];
        argv.extend(args.iter().map(|s| s.to_string()));
        let started = Instant::now();
        let out = self.lab.exec_timeout(self.controller(), &argv, timeout)?;
        Ok((out, started.elapsed()))
    }
}

impl Drop for BootedLab {
    fn drop(&mut self) {
        // Clean shutdowns first, all at once, then a bounded wait, then SIGKILL.
        for m in &self.machines {
            // SAFETY: kill(2) on the nspawn process we spawned and have not reaped.
            unsafe { libc::kill(m.nspawn.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        for m in &mut self.machines {
            loop {
                match m.nspawn.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = m.nspawn.kill();
                        let _ = m.nspawn.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        // The lab (dropped next) kills anything still in its namespaces.
    }
}

impl Machine {
    /// Runs `args` inside the machine (all its namespaces) with a clean environment; returns
    /// the output whatever the exit status. Fails on timeout.
    pub fn exec(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.init_pid.to_string(), "-a", "--", "env", "-i"])
            .arg("PATH=/usr/sbin:/usr/bin:/sbin:/bin")
            .arg("LANG=C.UTF-8")
            .args(args);
        output_within(&mut cmd, timeout)
            .with_context(|| format!("{}: {}", self.name, args.join(" ")))
    }

    /// Like [`Machine::exec`], but fails unless the command exits 0; returns stdout.
    pub fn exec_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.exec(args, Duration::from_secs(60))?;
        if !out.status.success() {
            bail!(
                "{}: `{}` failed ({}): {}{}",
                self.name,
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A unit property (`systemctl show -p NAME --value UNIT`).
    pub fn unit_property(&self, unit: &str, property: &str) -> Result<String> {
        Ok(self
            .exec_ok(&["systemctl", "show", "-p", property, "--value", unit])?
            .trim()
            .to_string())
    }

    /// The admin socket of the machine's agent at the default path, reachable from here.
    pub fn admin_socket(&self) -> PathBuf {
        self.root.join("run/weft/admin.sock")
    }

    fn wait_running(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            let probe = self.exec(&["systemctl", "is-system-running"], Duration::from_secs(10));
            if let Err(e) = &probe {
                last = format!("{e:#}");
            }
            if let Ok(out) = probe {
                last = format!(
                    "{} {}",
                    String::from_utf8_lossy(&out.stdout).trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if state == "running" || state == "degraded" {
                    let ssh = self.exec(
                        &["systemctl", "is-active", "ssh.service"],
                        Duration::from_secs(10),
                    )?;
                    if String::from_utf8_lossy(&ssh.stdout).trim() == "active" {
                        return Ok(());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let children = output_within(
            Command::new("ps")
                .args(["-o", "pid,stat,args", "--ppid"])
                .arg(self.init_pid.to_string()),
            Duration::from_secs(5),
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
        bail!(
            "{} did not finish booting within {timeout:?} (init pid {}, last probe: {last}); \
             nspawn said: {}; processes under init: {children}",
            self.name,
            self.init_pid,
            fs::read_to_string(&self.console).unwrap_or_default(),
        )
    }
}

/// Whether `pid` is PID 1 of its own PID namespace and runs systemd.
fn is_container_init(pid: u32) -> bool {
    let pid_one = fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .is_some_and(|ids| {
                ids.split_whitespace().count() > 1 && ids.split_whitespace().last() == Some("1")
            })
    });
    pid_one
        && fs::read_link(format!("/proc/{pid}/exe"))
            .is_ok_and(|exe| exe.file_name().is_some_and(|n| n == "systemd"))
}

/// Runs a command to completion within `timeout` (killed on timeout, which is an error).
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {:?}", cmd.get_program()))?;
    let pid = child.id();
    let deadline = Instant::now() + timeout;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let out_thread = std::thread::spawn(move || read_all(stdout));
    let err_thread = std::thread::spawn(move || read_all(stderr));
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Output {
                status,
                stdout: out_thread.join().unwrap_or_default(),
                stderr: err_thread.join().unwrap_or_default(),
            });
        }
        if Instant::now() > deadline {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let _ = child.wait();
            bail!("timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn read_all(pipe: Option<impl std::io::Read>) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(mut p) = pipe {
        let _ = p.read_to_end(&mut buf);
    }
    buf
}

/// Runs a command that must succeed; returns stdout.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = output_within(cmd, Duration::from_secs(300))?;
    if !out.status.success() {
        bail!(
            "`{:?}` failed ({}): {}{}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn search_path() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        dirs.push(PathBuf::from(d));
    }
    dirs
}

fn rand_nibble() -> u32 {
    let mut b = [0u8; 1];
    // SAFETY: getrandom into a 1-byte buffer we own.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 1, 0) };
    assert_eq!(n, 1, "getrandom");
    u32::from(b[0] & 0x0f)
}

/// PLAY RECAP totals of an ansible-playbook run: `(host, ok, changed, unreachable, failed)`.
pub fn play_recap(stdout: &str) -> Vec<(String, u32, u32, u32, u32)> {
    let mut rows = Vec::new();
    let mut in_recap = false;
    for line in stdout.lines() {
        if line.starts_with("PLAY RECAP") {
            in_recap = true;
            continue;
        }
        if !in_recap {
            continue;
        }
        let Some((host, rest)) = line.split_once(':') else {
            continue;
        };
        let field = |key: &str| -> u32 {
            rest.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
                .unwrap_or(0)
        };
        rows.push((
            host.trim().to_string(),
            field("ok"),
            field("changed"),
            field("unreachable"),
            field("failed"),
        ));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn play_recap_is_parsed() {
        let out = "TASK [x]\nok: [h1]\n\nPLAY RECAP *********\n\
                   h1                         : ok=20   changed=3    unreachable=0    failed=0    skipped=4    rescued=0    ignored=0\n\
                   localhost                  : ok=1    changed=0    unreachable=0    failed=1    skipped=0    rescued=0    ignored=0\n";
        assert_eq!(
            play_recap(out),
            vec![
                ("h1".to_string(), 20, 3, 0, 0),
                ("localhost".to_string(), 1, 0, 0, 1)
            ]
        );
    }
}
