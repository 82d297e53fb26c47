//! Packaging and fleet rollout, with the real tools: the .deb (lintian, dpkg), the .rpm
//! (rpmlint, rpm --root), the hardened systemd unit (systemd-analyze), and the Ansible role
//! proven on booted systemd machines (systemd-nspawn in lab namespaces on 198.18.47.0/24):
//! site.yml from a controller over SSH, a second run that changes nothing, a rolling upgrade
//! under steady traffic with zero failed requests, a gossip key rotation with membership
//! watched throughout, and a CA root rotation.
//!
//! Inputs, built once per run by `tests/run.sh` (or by hand):
//! * `tests/packaging/build.sh`: the packages in `target/packaging/out/`;
//! * `tests/packaging/rootfs.sh`: the Debian rootfs in `target/weft-lab/rootfs/`.
//!
//! `WEFT_SKIP_BOOTED=1` skips the booted-lab test (minutes); the package tests still run.

#[path = "src/booted.rs"]
mod booted;

use std::fs;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use booted::{BootedLab, Machine, output_within, play_recap, run_ok, workspace_root};
use serde_json::Value;

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The error tags rpmlint reports only because cargo-generate-rpm cannot set the header tags
/// (see packaging/rpm/rpmlint.toml). Any other error fails the test.
const RPMLINT_TOOL_LIMITS: &[&str] = &[
    "no-packager-tag",
    "no-group-tag",
    "no-changelogname-tag",
    "no-buildhost-tag",
];
/// The unit's exposure score must stay at or below this (`systemd-analyze security`).
const MAX_EXPOSURE: f64 = 2.5;

fn out_dir() -> PathBuf {
    workspace_root().join("target/packaging/out")
}

/// The one file in `dir` whose name starts with `prefix` and ends with `suffix`.
fn find_one(dir: &Path, prefix: &str, suffix: &str) -> PathBuf {
    let found: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; build the packages first: tests/packaging/build.sh",
                dir.display()
            )
        })
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {prefix}*{suffix} in {} (tests/packaging/build.sh makes it), found {found:?}",
        dir.display()
    );
    found.into_iter().next().unwrap()
}

fn deb() -> PathBuf {
    find_one(&out_dir(), &format!("weft_{VERSION}-1_"), ".deb")
}

fn upgrade_deb() -> PathBuf {
    find_one(
        &out_dir().join("upgrade"),
        &format!("weft_{VERSION}-2_"),
        ".deb",
    )
}

fn rpm() -> PathBuf {
    find_one(&out_dir(), &format!("weft-{VERSION}-1."), ".rpm")
}

fn rootfs() -> PathBuf {
    std::env::var_os("WEFT_LAB_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/weft-lab/rootfs"))
}

fn weft_release() -> PathBuf {
    let bin = workspace_root().join("target/release/weft");
    assert!(
        bin.exists(),
        "{} missing: run tests/packaging/build.sh",
        bin.display()
    );
    bin
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Standard output only (rpm warns on stderr about keys it does not know).
fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cmd(program: &str, args: &[&str]) -> Output {
    output_within(Command::new(program).args(args), Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e:#}"))
}

/// Runs `script` with `sh -e` in a private mount namespace where `$M` is a throwaway overlay
/// of the lab rootfs (so maintainer scripts run against a real Debian system), after copying
/// `files` to `$M/root/`. Returns the output whatever the exit status.
fn in_rootfs_overlay(script: &str, files: &[&Path]) -> Output {
    let root = rootfs();
    assert!(
        root.join(".weft-rootfs-ok").exists(),
        "no rootfs at {}: run tests/packaging/rootfs.sh",
        root.display()
    );
    let dir = tempfile::Builder::new()
        .prefix("weft-pkg-overlay-")
        .tempdir_in(workspace_root().join("target"))
        .unwrap();
    let d = dir.path();
    for sub in ["upper", "work", "merged"] {
        fs::create_dir(d.join(sub)).unwrap();
    }
    let copies: String = files
        .iter()
        .map(|f| format!("cp '{}' \"$M/root/\"\n", f.display()))
        .collect();
    let full = format!(
        "set -e\nM={m}\nmount -t overlay overlay -o lowerdir={lower},upperdir={d}/upper,workdir={d}/work \"$M\"\n\
         mount -t proc proc \"$M/proc\"\n{copies}{script}\n",
        m = d.join("merged").display(),
        lower = root.display(),
        d = d.display(),
    );
    let path = d.join("script.sh");
    fs::write(&path, full).unwrap();
    let out = output_within(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-e"])
            .arg(&path),
        Duration::from_secs(300),
    )
    .expect("run the overlay script");
    drop(dir);
    out
}

#[test]
fn deb_passes_lintian_and_carries_binary_unit_conffile_and_scripts() {
    let deb = deb();
    let lint = cmd(
        "lintian",
        &[
            "--fail-on",
            "error",
            "--tag-display-limit",
            "0",
            deb.to_str().unwrap(),
        ],
    );
    let report = text(&lint);
    println!("lintian {}:\n{report}", deb.display());
    assert!(lint.status.success(), "lintian failed:\n{report}");
    assert!(
        !report.lines().any(|l| l.starts_with("E:")),
        "lintian errors:\n{report}"
    );

    let fields = text(&cmd("dpkg-deb", &["-f", deb.to_str().unwrap()]));
    assert!(
        fields.contains(&format!("Version: {VERSION}-1\n")),
        "{fields}"
    );
    assert!(fields.contains("Package: weft\n"), "{fields}");
    let contents = text(&cmd("dpkg-deb", &["-c", deb.to_str().unwrap()]));
    for (mode, path) in [
        ("-rwxr-xr-x", "./usr/bin/weft"),
        ("-rwxr-xr-x", "./usr/lib/weft/weft-wait-ready"),
        ("-rw-r--r--", "./usr/lib/systemd/system/weft.service"),
        ("-rw-r--r--", "./etc/weft/weft.toml"),
        ("-rw-r--r--", "./usr/share/man/man1/weft.1.gz"),
        ("-rw-r--r--", "./usr/lib/sysusers.d/weft.conf"),
        ("-rw-r--r--", "./usr/share/weft/grafana/weft-dashboard.json"),
    ] {
        assert!(
            contents
                .lines()
                .any(|l| l.starts_with(mode) && l.contains(" root/root ") && l.ends_with(path)),
            "{path} ({mode}, root-owned) missing from the deb:\n{contents}"
        );
    }

    let control = tempfile::tempdir().unwrap();
    run_ok(
        Command::new("dpkg-deb")
            .arg("-e")
            .arg(&deb)
            .arg(control.path()),
    )
    .unwrap();
    let conffiles = fs::read_to_string(control.path().join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/weft/weft.toml");
    let postinst = fs::read_to_string(control.path().join("postinst")).unwrap();
    assert!(postinst.contains("useradd --system"), "{postinst}");
    assert!(
        postinst.contains("install -d -o weft -g weft -m 0700 /var/lib/weft"),
        "{postinst}"
    );
    // Not enabled or started on install; a running agent is try-restarted on upgrade.
    // (deb-systemd-helper re-enables only a unit that was enabled before: `was-enabled`.)
    assert!(
        postinst.contains("deb-systemd-invoke try-restart weft.service"),
        "{postinst}"
    );
    assert!(postinst.contains("was-enabled weft.service"), "{postinst}");
    assert!(!postinst.contains("deb-systemd-invoke start"), "{postinst}");
    let postrm = fs::read_to_string(control.path().join("postrm")).unwrap();
    assert!(postrm.contains("rm -rf /var/lib/weft"), "{postrm}");
}

#[test]
fn unit_is_hardened_with_exposure_at_most_2_5() {
    let unit = workspace_root().join("packaging/weft.service");
    let text_unit = fs::read_to_string(&unit).unwrap();
    for directive in [
        "User=weft",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6\n",
        "SystemCallFilter=@system-service",
        "ReadWritePaths=/var/lib/weft\n",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ExecStartPost=/usr/lib/weft/weft-wait-ready",
    ] {
        assert!(
            text_unit.contains(directive),
            "weft.service lacks {directive:?}"
        );
    }
    let out = cmd(
        "systemd-analyze",
        &[
            "security",
            "--offline=true",
            "--no-pager",
            unit.to_str().unwrap(),
        ],
    );
    let exposure = exposure_of(&text(&out));
    println!("systemd-analyze security --offline=true weft.service: exposure {exposure}");
    assert!(
        exposure <= MAX_EXPOSURE,
        "exposure {exposure} > {MAX_EXPOSURE}:\n{}",
        text(&out)
    );
}

/// The number in "Overall exposure level for weft.service: 1.2 OK".
fn exposure_of(report: &str) -> f64 {
    report
        .lines()
        .find_map(|l| {
            let rest = l.split("Overall exposure level for weft.service:").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"))
}

#[test]
fn rpm_passes_rpmlint_is_signed_and_installs_into_a_root() {
    let rpm = rpm();
    let rpm_s = rpm.to_str().unwrap();
    // A private rpm keyring (Debian's rpm keeps its db under $HOME) with the build's key.
    let home = tempfile::tempdir().unwrap();
    let with_home = |program: &str, args: &[&str]| -> Output {
        output_within(
            Command::new(program).args(args).env("HOME", home.path()),
            Duration::from_secs(120),
        )
        .unwrap()
    };
    let key = out_dir().join("RPM-GPG-KEY-weft");
    let import = with_home("rpm", &["--import", key.to_str().unwrap()]);
    assert!(import.status.success(), "{}", text(&import));
    let check = with_home("rpm", &["-K", rpm_s]);
    assert!(
        check.status.success() && text(&check).contains("digests signatures OK"),
        "signature: {}",
        text(&check)
    );

    // Unfiltered: only the four header tags cargo-generate-rpm cannot set may be errors.
    let raw = text(&with_home("rpmlint", &[rpm_s]));
    println!("rpmlint (no config):\n{raw}");
    let errors: Vec<&str> = raw
        .lines()
        .filter_map(|l| l.split(": E: ").nth(1))
        .map(|rest| rest.split_whitespace().next().unwrap_or(rest))
        .collect();
    let unexpected: Vec<&&str> = errors
        .iter()
        .filter(|e| !RPMLINT_TOOL_LIMITS.contains(e))
        .collect();
    assert!(
        unexpected.is_empty(),
        "rpmlint errors: {unexpected:?}\n{raw}"
    );
    let config = workspace_root().join("packaging/rpm/rpmlint.toml");
    let lint = with_home("rpmlint", &["-c", config.to_str().unwrap(), rpm_s]);
    println!("rpmlint -c packaging/rpm/rpmlint.toml:\n{}", text(&lint));
    assert!(lint.status.success(), "{}", text(&lint));
    assert!(text(&lint).contains(" 0 errors"), "{}", text(&lint));

    let info = stdout_of(&cmd("rpm", &["-qip", rpm_s]));
    println!("rpm -qip:\n{info}");
    for (field, value) in [
        ("Name", "weft"),
        ("Version", VERSION),
        ("Release", "1"),
        ("License", "Apache-2.0"),
        ("Architecture", "x86_64"),
    ] {
        assert!(
            info.lines().any(|l| l.starts_with(field)
                && l.split_once(':').is_some_and(|(_, v)| v.trim() == value)),
            "{field} is not {value}:\n{info}"
        );
    }
    assert!(
        info.lines()
            .any(|l| l.starts_with("Signature") && l.contains("Key ID")),
        "{info}"
    );
    let files = stdout_of(&cmd("rpm", &["-qlp", rpm_s]));
    println!("rpm -qlp:\n{files}");
    for path in [
        "/usr/bin/weft",
        "/usr/lib/systemd/system/weft.service",
        "/etc/weft/weft.toml",
        "/usr/lib/weft/weft-wait-ready",
        "/usr/lib/sysusers.d/weft.conf",
        "/usr/share/man/man1/weft.1.gz",
        "/usr/share/weft/grafana/weft-dashboard.json",
    ] {
        assert!(files.lines().any(|l| l == path), "{path} not in the rpm");
    }
    let config_files = stdout_of(&cmd("rpm", &["-qp", "--configfiles", rpm_s]));
    assert_eq!(config_files.trim(), "/etc/weft/weft.toml");
    let noreplace = stdout_of(&cmd(
        "rpm",
        &["-qp", "--qf", "[%{FILEFLAGS:fflags} %{FILENAMES}\n]", rpm_s],
    ));
    assert!(
        noreplace
            .lines()
            .any(|l| l.ends_with(" /etc/weft/weft.toml") && l.contains('n')),
        "weft.toml is not %config(noreplace):\n{noreplace}"
    );
    let scripts = stdout_of(&cmd("rpm", &["-qp", "--scripts", rpm_s]));
    assert!(scripts.contains("useradd --system"), "{scripts}");

    // Into an empty --root (no scriptlets: there is no shell there).
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    for args in [
        vec!["--root", r, "--dbpath", "/var/lib/rpm", "--initdb"],
        vec![
            "--root",
            r,
            "--dbpath",
            "/var/lib/rpm",
            "-ivh",
            "--nodeps",
            "--noscripts",
            rpm_s,
        ],
    ] {
        let out = with_home("rpm", &args);
        assert!(out.status.success(), "rpm {args:?}: {}", text(&out));
    }
    let qa = text(&with_home(
        "rpm",
        &["--root", r, "--dbpath", "/var/lib/rpm", "-qa"],
    ));
    assert!(qa.contains(&format!("weft-{VERSION}-1")), "{qa}");
    let verify = with_home(
        "rpm",
        &[
            "--root",
            r,
            "--dbpath",
            "/var/lib/rpm",
            "-V",
            "--nodeps",
            "weft",
        ],
    );
    assert!(verify.status.success(), "rpm -V: {}", text(&verify));
    let version = run_ok(Command::new(root.path().join("usr/bin/weft")).arg("--version")).unwrap();
    assert!(version.contains(VERSION), "{version}");

    // Into a Debian system (overlay of the lab rootfs): the scriptlets create the user and
    // the state directory; erase keeps the state (RPM has no purge).
    let out = in_rootfs_overlay(
        &format!(
            "rpm --root \"$M\" --dbpath /var/lib/rpm --initdb\n\
             rpm --root \"$M\" --dbpath /var/lib/rpm -ivh --nodeps \"$M/root/{name}\"\n\
             chroot \"$M\" getent passwd weft\n\
             echo \"state=$(chroot \"$M\" stat -c %U:%G:%a /var/lib/weft)\"\n\
             echo kept > \"$M/var/lib/weft/node.pem\"\n\
             rpm --root \"$M\" --dbpath /var/lib/rpm -e --nodeps weft\n\
             test -f \"$M/var/lib/weft/node.pem\" && echo state-kept-on-erase\n\
             test ! -e \"$M/usr/bin/weft\" && echo binary-removed",
            name = rpm.file_name().unwrap().to_str().unwrap()
        ),
        &[&rpm],
    );
    let log = text(&out);
    println!("rpm into a Debian root:\n{log}");
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("weft:x:") && log.contains(":/var/lib/weft:"),
        "{log}"
    );
    assert!(log.contains("state=weft:weft:700"), "{log}");
    assert!(
        log.contains("state-kept-on-erase") && log.contains("binary-removed"),
        "{log}"
    );
}

#[test]
fn deb_install_upgrade_remove_and_purge_keep_what_they_promise() {
    let (deb, next) = (deb(), upgrade_deb());
    let script = format!(
        r#"in_m() {{ chroot "$M" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }}
in_m dpkg -i /root/{d1}
in_m getent passwd weft
echo "state=$(in_m stat -c %U:%G:%a /var/lib/weft)"
echo "enabled=$(in_m systemctl is-enabled weft.service || true)"
# Every commented setting of the default config is valid: uncomment them all and check.
in_m weft gossip keygen > "$M/etc/weft/gossip.keys"
chmod 600 "$M/etc/weft/gossip.keys"
sed -e 's/^# \([a-z_[]\)/\1/' "$M/etc/weft/weft.toml" > "$M/root/all.toml"
in_m weft check-config -c /root/all.toml
# The operator edits the conffile; the agent has state.
echo '# edited by the operator' >> "$M/etc/weft/weft.toml"
echo identity > "$M/var/lib/weft/node.pem"
in_m dpkg -i --force-confold /root/{d2}
echo "version=$(in_m dpkg-query -W -f '${{Version}}' weft)"
grep -q 'edited by the operator' "$M/etc/weft/weft.toml" && echo conffile-kept-on-upgrade
in_m dpkg -r weft
test -f "$M/var/lib/weft/node.pem" && echo state-kept-on-remove
test -f "$M/etc/weft/weft.toml" && echo conffile-kept-on-remove
test ! -e "$M/usr/bin/weft" && echo binary-removed
in_m dpkg -P weft
test ! -e "$M/var/lib/weft" && echo state-removed-on-purge
test ! -e "$M/etc/weft/weft.toml" && echo conffile-removed-on-purge
test ! -e "$M/etc/weft/gossip.keys" && echo secrets-removed-on-purge
"#,
        d1 = deb.file_name().unwrap().to_str().unwrap(),
        d2 = next.file_name().unwrap().to_str().unwrap(),
    );
    let out = in_rootfs_overlay(&script, &[&deb, &next]);
    let log = text(&out);
    println!("{log}");
    assert!(out.status.success(), "{log}");
    for expected in [
        ":/var/lib/weft:/usr/sbin/nologin",
        "state=weft:weft:700",
        "enabled=disabled",
        "/root/all.toml: ok",
        &format!("version={VERSION}-2"),
        "conffile-kept-on-upgrade",
        "state-kept-on-remove",
        "conffile-kept-on-remove",
        "binary-removed",
        "state-removed-on-purge",
        "conffile-removed-on-purge",
        "secrets-removed-on-purge",
    ] {
        assert!(log.contains(expected), "missing {expected:?} in:\n{log}");
    }
}

// ------------------------------------------------------------------------------------------
// The booted lab: Ansible over SSH to systemd machines.

const LAB: &str = "wpkg";
const SUBNET: u8 = 47;
const MACHINES: usize = 4;
const UPSTREAM: &str = "127.0.0.1:15000";

fn skip_booted() -> bool {
    if std::env::var("WEFT_SKIP_BOOTED").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: booted Ansible lab (WEFT_SKIP_BOOTED=1)");
        return true;
    }
    false
}

/// `weft` CLI (the release build) against a machine's agent, through its admin socket.
fn weft_json(m: &Machine, args: &[&str]) -> Option<Value> {
    let out = output_within(
        Command::new(weft_release())
            .args(args)
            .arg("--json")
            .arg("--socket")
            .arg(m.admin_socket()),
        Duration::from_secs(10),
    )
    .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn is_ready(m: &Machine) -> bool {
    weft_json(m, &["status"]).is_some_and(|s| s["ready"] == Value::Bool(true))
}

/// Names of the members `m` sees alive.
fn alive_members(m: &Machine) -> Vec<String> {
    weft_json(m, &["members"])
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|x| x["state"] == "alive")
        .filter_map(|x| x["name"].as_str().map(str::to_string))
        .collect()
}

fn recap_ok(out: &Output, hosts: &[&str]) -> Vec<(String, u32, u32, u32, u32)> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let recap = play_recap(&stdout);
    assert!(
        out.status.success(),
        "ansible-playbook failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for h in hosts {
        let row = recap
            .iter()
            .find(|r| r.0 == *h)
            .unwrap_or_else(|| panic!("{h} not in PLAY RECAP:\n{stdout}"));
        assert_eq!((row.3, row.4), (0, 0), "{h} unreachable/failed:\n{stdout}");
    }
    recap
}

/// Steady HTTP client in a host's network namespace: one request per `period` to `addr`,
/// until stopped. Counts successes (by backend body) and failures.
struct SteadyClient {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<(Vec<String>, Vec<String>)>>,
}

impl SteadyClient {
    fn start(netns: &str, addr: SocketAddr, period: Duration) -> SteadyClient {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let path = format!("/run/netns/{netns}");
        let handle = std::thread::spawn(move || {
            // setns(2) moves only this thread into the host's network namespace.
            let file = fs::File::open(&path).expect("open netns");
            // SAFETY: setns on a valid namespace fd; affects only the calling thread.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {path}");
            let mut backends = Vec::new();
            let mut errors = Vec::new();
            // Bounded: at most 30 minutes of requests even if never stopped.
            let deadline = Instant::now() + Duration::from_secs(1800);
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                let started = Instant::now();
                match weft_tests::agent::http_get(addr, "/") {
                    Ok((200, body)) => {
                        o.fetch_add(1, Ordering::Relaxed);
                        let b = body.trim().to_string();
                        if !backends.contains(&b) {
                            backends.push(b);
                        }
                    }
                    Ok((status, body)) => {
                        f.fetch_add(1, Ordering::Relaxed);
                        errors.push(format!("status {status}: {}", body.trim()));
                    }
                    Err(e) => {
                        f.fetch_add(1, Ordering::Relaxed);
                        errors.push(format!("{e:#}"));
                    }
                }
                if let Some(rest) = period.checked_sub(started.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
            (backends, errors)
        });
        SteadyClient {
            stop,
            ok,
            failed,
            handle: Some(handle),
        }
    }

    /// Stops it; returns (ok, failed, backends seen, errors).
    fn finish(mut self) -> (u64, u64, Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let (backends, errors) = self.handle.take().unwrap().join().expect("client thread");
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            backends,
            errors,
        )
    }
}

impl Drop for SteadyClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Watches membership from every machine until stopped: each check asks every machine for
/// its alive members and records any machine that does not see all `expected` alive.
struct MembershipWatch {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl MembershipWatch {
    fn start(machines: Vec<(String, PathBuf)>, expected: Vec<String>) -> MembershipWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let bin = weft_release();
        let handle = std::thread::spawn(move || {
            let mut rounds = 0;
            let mut violations = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(900);
            let started = Instant::now();
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                for (name, socket) in &machines {
                    let out = output_within(
                        Command::new(&bin)
                            .args(["members", "--json", "--socket"])
                            .arg(socket),
                        Duration::from_secs(10),
                    );
                    let alive: Vec<String> = out
                        .ok()
                        .filter(|o| o.status.success())
                        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
                        .and_then(|v| v.as_array().cloned())
                        .unwrap_or_default()
                        .iter()
                        .filter(|x| x["state"] == "alive")
                        .filter_map(|x| x["name"].as_str().map(str::to_string))
                        .collect();
                    let missing: Vec<&String> =
                        expected.iter().filter(|e| !alive.contains(e)).collect();
                    if !missing.is_empty() {
                        violations.push(format!(
                            "at {:.1}s {name} does not see {missing:?} alive",
                            started.elapsed().as_secs_f64()
                        ));
                    }
                }
                rounds += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            (rounds, violations)
        });
        MembershipWatch {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().expect("watch thread")
    }
}

impl Drop for MembershipWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

fn write_inventory(lab: &BootedLab, pki: &Path, keys: &[String], package: &Path) -> PathBuf {
    let m = &lab.machines;
    let check = "{ http: /, interval: 1s, timeout: 500ms }";
    let inventory = format!(
        r#"all:
  vars:
    ansible_user: root
    ansible_ssh_private_key_file: {key}
    ansible_ssh_common_args: "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=5"
    ansible_python_interpreter: /usr/bin/python3
    weft_trust_domain: lab.weft
    weft_pki_dir: {pki}
    weft_operator_bin: {bin}
    weft_package_file: {package}
    weft_gossip_keys: {keys}
    weft_settle_seconds: 2
    # A restart drains for at most this long; the test's requests take milliseconds.
    weft_drain_timeout: 5s
  children:
    weft:
      children:
        weft_ca:
          hosts:
            h1: {{ ansible_host: {a1} }}
        weft_apps:
          hosts:
            h2:
              ansible_host: {a2}
              weft_services: [{{ name: api, port: 8080, protocol: http, check: {check} }}]
            h3:
              ansible_host: {a3}
              weft_services: [{{ name: api, port: 8080, protocol: http, check: {check} }}]
        weft_edge:
          hosts:
            h4:
              ansible_host: {a4}
              weft_upstreams: [{{ service: api, listen: "{UPSTREAM}" }}]
"#,
        key = lab.ssh_key.display(),
        pki = pki.display(),
        bin = weft_release().display(),
        package = package.display(),
        keys = serde_json::to_string(keys).unwrap(),
        a1 = m[0].addr,
        a2 = m[1].addr,
        a3 = m[2].addr,
        a4 = m[3].addr,
    );
    let path = lab.dir.path().join("inventory.yml");
    fs::write(&path, inventory).unwrap();
    path
}

fn step(t0: Instant, what: &str) {
    println!("[{:6.1}s] {what}", t0.elapsed().as_secs_f64());
}

#[test]
fn ansible_installs_upgrades_and_rotates_a_booted_fleet_without_dropping_traffic() {
    if skip_booted() {
        return;
    }
    let t0 = Instant::now();
    let (deb, next) = (deb(), upgrade_deb());
    let bin = weft_release();
    let lab = BootedLab::up(LAB, SUBNET, MACHINES, &rootfs())
        .expect("boot the lab machines (needs root, systemd-container, the rootfs)");
    step(t0, "4 machines booted, sshd up");
    let m = &lab.machines;
    let ansible = workspace_root().join("ansible");
    let playbook = |name: &str| ansible.join(name).display().to_string();

    // The operator's PKI and gossip key, on the controller.
    let pki = lab.dir.path().join("pki");
    run_ok(
        Command::new(&bin)
            .args(["ca", "init", "--trust-domain", "lab.weft", "--out"])
            .arg(&pki),
    )
    .unwrap();
    run_ok(
        Command::new(&bin)
            .args(["ca", "intermediate", "--root"])
            .arg(&pki)
            .args(["--name", "h1", "--out"])
            .arg(pki.join("ca-h1")),
    )
    .unwrap();
    let key1 = run_ok(Command::new(&bin).args(["gossip", "keygen"]))
        .unwrap()
        .trim()
        .to_string();

    // The app on h2 and h3: an HTTP server on the machine's loopback naming its host.
    for app in &m[1..3] {
        app.exec_ok(&[
            "sh",
            "-c",
            &format!(
                "mkdir -p /srv/app && echo {} > /srv/app/index.html && \
                 systemd-run --unit=lab-app -p WorkingDirectory=/srv/app \
                 python3 -m http.server 8080 --bind 127.0.0.1",
                app.name
            ),
        ])
        .unwrap();
    }

    // 1. site.yml installs the .deb built in this run, CA host first.
    let inventory = write_inventory(&lab, &pki, std::slice::from_ref(&key1), &deb);
    let inv = inventory.display().to_string();
    let (out, took) = lab
        .ansible_playbook(
            &["-i", &inv, &playbook("site.yml"), "-e", "weft_serial=2"],
            Duration::from_secs(600),
        )
        .unwrap();
    let recap = recap_ok(&out, &["h1", "h2", "h3", "h4"]);
    step(
        t0,
        &format!("site.yml (first run) took {took:.1?}: {recap:?}"),
    );
    assert!(
        recap
            .iter()
            .filter(|r| r.0.starts_with('h'))
            .all(|r| r.2 > 0),
        "{recap:?}"
    );

    for x in m {
        assert!(is_ready(x), "{} is not ready after site.yml", x.name);
        assert_eq!(
            x.unit_property("weft.service", "ActiveState").unwrap(),
            "active"
        );
        assert_eq!(
            x.unit_property("weft.service", "UnitFileState").unwrap(),
            "enabled"
        );
        assert_eq!(x.unit_property("weft.service", "User").unwrap(), "weft");
        let perms = x
            .exec_ok(&[
                "stat",
                "-c",
                "%n %U:%G %a",
                "/var/lib/weft",
                "/etc/weft/gossip.keys",
                "/var/lib/weft/node.key",
            ])
            .unwrap();
        assert_eq!(
            perms.trim(),
            "/var/lib/weft weft:weft 700\n/etc/weft/gossip.keys weft:weft 600\n/var/lib/weft/node.key weft:weft 600",
            "{}",
            x.name
        );
        let secret = if x.name == "h1" {
            "/etc/weft/ca/intermediate.key"
        } else {
            "/etc/weft/join.token"
        };
        assert_eq!(
            x.exec_ok(&["stat", "-c", "%U:%G %a", secret])
                .unwrap()
                .trim(),
            "weft:weft 600"
        );
        x.exec_ok(&["weft", "check-config", "-c", "/etc/weft/weft.toml"])
            .unwrap();
        // The identity: a node SVID that chains to the trust bundle.
        let verified = x
            .exec_ok(&[
                "weft",
                "certs",
                "verify",
                "/var/lib/weft/node.pem",
                "--bundle",
                "/etc/weft/trust-bundle.pem",
            ])
            .unwrap();
        assert!(
            verified.contains(&format!("spiffe://lab.weft/node/{}", x.name)),
            "{verified}"
        );
        let alive = alive_members(x);
        assert_eq!(alive.len(), MACHINES, "{} sees {alive:?}", x.name);
    }
    // A request through the mesh: h4's upstream -> tunnel -> api on h2 or h3.
    let mut served = Vec::new();
    for _ in 0..20 {
        let body = m[3]
            .exec_ok(&[
                "curl",
                "-sS",
                "--fail",
                "--max-time",
                "5",
                &format!("http://{UPSTREAM}/"),
            ])
            .unwrap();
        served.push(body.trim().to_string());
    }
    assert!(served.iter().all(|b| b == "h2" || b == "h3"), "{served:?}");
    step(
        t0,
        &format!("agents ready, identities verified, 20 requests via h4 served by {served:?}"),
    );

    // The unit's exposure, as systemd on a real machine sees it.
    let analysis = m[0]
        .exec(
            &["systemd-analyze", "security", "--no-pager", "weft.service"],
            Duration::from_secs(60),
        )
        .unwrap();
    let exposure = exposure_of(&text(&analysis));
    step(
        t0,
        &format!("systemd-analyze security weft.service on h1: {exposure}"),
    );
    assert!(exposure <= MAX_EXPOSURE, "{}", text(&analysis));

    // 2. A second run changes nothing.
    let (out, took) = lab
        .ansible_playbook(
            &["-i", &inv, &playbook("site.yml"), "-e", "weft_serial=2"],
            Duration::from_secs(600),
        )
        .unwrap();
    let recap = recap_ok(&out, &["h1", "h2", "h3", "h4"]);
    step(
        t0,
        &format!("site.yml (second run) took {took:.1?}: {recap:?}"),
    );
    for r in &recap {
        assert_eq!(
            r.2,
            0,
            "second run changed {}: {}",
            r.0,
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // 3. Rolling upgrade of h1..h3 (CA host, both api hosts) to the next package revision
    //    while h4 sends steady requests to api. h4 itself is the client's host: upgrading it
    //    restarts the client's own agent, which no rollout can hide from its local apps.
    let before: Vec<String> = m
        .iter()
        .map(|x| x.unit_property("weft.service", "MainPID").unwrap())
        .collect();
    let client = SteadyClient::start(
        &lab.lab.netns(4),
        UPSTREAM.parse().unwrap(),
        Duration::from_millis(50),
    );
    std::thread::sleep(Duration::from_secs(2));
    let (out, took) = lab
        .ansible_playbook(
            &[
                "-i",
                &inv,
                &playbook("rolling-upgrade.yml"),
                "--limit",
                "h1,h2,h3",
                "-e",
                &format!("weft_package_file={}", next.display()),
            ],
            Duration::from_secs(600),
        )
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let (ok, failed, backends, errors) = client.finish();
    let recap = recap_ok(&out, &["h1", "h2", "h3"]);
    step(
        t0,
        &format!(
            "rolling-upgrade.yml took {took:.1?}: {ok} requests ok, {failed} failed, backends {backends:?}; {recap:?}"
        ),
    );
    assert_eq!(
        failed, 0,
        "failed requests during the rolling upgrade: {errors:?}"
    );
    assert!(ok > 100, "too few requests ({ok}) to show anything");
    backends
        .iter()
        .for_each(|b| assert!(b == "h2" || b == "h3", "{b}"));
    for (i, x) in m[..3].iter().enumerate() {
        let version = x
            .exec_ok(&["dpkg-query", "-W", "-f", "${Version}", "weft"])
            .unwrap();
        assert_eq!(version, format!("{VERSION}-2"), "{}", x.name);
        let pid = x.unit_property("weft.service", "MainPID").unwrap();
        assert_ne!(pid, before[i], "{} was not restarted", x.name);
        assert!(is_ready(x), "{} not ready after the upgrade", x.name);
    }
    // Batches waited for readiness: each host was ready (its start, ExecStartPost included,
    // finished) before the next host began to stop. Monotonic clocks are shared by machines.
    let mono = |x: &Machine, p: &str| -> u64 {
        x.unit_property("weft.service", p).unwrap().parse().unwrap()
    };
    for pair in m[..3].windows(2) {
        let ready = mono(&pair[0], "ActiveEnterTimestampMonotonic");
        let next_stop = mono(&pair[1], "ActiveExitTimestampMonotonic");
        assert!(
            ready < next_stop,
            "{} began to stop ({next_stop}) before {} was ready again ({ready})",
            pair[1].name,
            pair[0].name
        );
        println!(
            "  {} ready {:.1}s before {} began to stop",
            pair[0].name,
            (next_stop - ready) as f64 / 1e6,
            pair[1].name
        );
    }

    // 4. Gossip key rotation, with membership watched from every machine throughout.
    let key2 = run_ok(Command::new(&bin).args(["gossip", "keygen"]))
        .unwrap()
        .trim()
        .to_string();
    let new_key_vars = lab.dir.path().join("new-gossip-key.yml");
    fs::write(&new_key_vars, format!("weft_gossip_new_key: {key2}\n")).unwrap();
    let names: Vec<String> = m.iter().map(|x| x.name.clone()).collect();
    let watch = MembershipWatch::start(
        m.iter()
            .map(|x| (x.name.clone(), x.admin_socket()))
            .collect(),
        names,
    );
    let (out, took) = lab
        .ansible_playbook(
            &[
                "-i",
                &inv,
                &playbook("rotate-gossip-key.yml"),
                "-e",
                &format!("@{}", new_key_vars.display()),
            ],
            Duration::from_secs(600),
        )
        .unwrap();
    let (rounds, violations) = watch.finish();
    let recap = recap_ok(&out, &["h1", "h2", "h3", "h4"]);
    step(
        t0,
        &format!(
            "rotate-gossip-key.yml took {took:.1?}: {rounds} membership rounds, {} violations; {recap:?}",
            violations.len()
        ),
    );
    assert!(
        violations.is_empty(),
        "membership broke during the rotation: {violations:?}"
    );
    assert!(rounds >= 10, "membership checked only {rounds} times");
    for x in m {
        let keyring = x.exec_ok(&["cat", "/etc/weft/gossip.keys"]).unwrap();
        assert!(
            keyring.contains(&key2) && !keyring.contains(&key1),
            "{}: {keyring}",
            x.name
        );
        let report = weft_json(x, &["gossip", "keys"]).expect("gossip keys");
        assert_eq!(
            report["local"].as_array().map(Vec::len),
            Some(1),
            "{report}"
        );
        assert_eq!(report["uniform"], Value::Bool(true), "{report}");
    }

    // 5. CA root rotation: trust both roots, switch issuance; finish refuses while hosts
    //    still hold identities of the old root.
    let pki2 = lab.dir.path().join("pki2");
    run_ok(
        Command::new(&bin)
            .args(["ca", "init", "--trust-domain", "lab.weft", "--out"])
            .arg(&pki2),
    )
    .unwrap();
    run_ok(
        Command::new(&bin)
            .args(["ca", "intermediate", "--root"])
            .arg(&pki2)
            .args(["--name", "h1", "--out"])
            .arg(pki2.join("ca-h1")),
    )
    .unwrap();
    let inventory = write_inventory(&lab, &pki, std::slice::from_ref(&key2), &next);
    let inv = inventory.display().to_string();
    let rotate = |phase: &str| {
        lab.ansible_playbook(
            &[
                "-i",
                &inv,
                &playbook("rotate-ca.yml"),
                "-e",
                &format!("weft_ca_rotation_phase={phase}"),
                "-e",
                &format!("weft_new_pki_dir={}", pki2.display()),
            ],
            Duration::from_secs(600),
        )
        .unwrap()
    };
    let (out, took) = rotate("trust");
    recap_ok(&out, &["h1", "h2", "h3", "h4"]);
    step(t0, &format!("rotate-ca.yml trust took {took:.1?}"));
    let new_root = fs::read_to_string(pki2.join("root.pem")).unwrap();
    for x in m {
        let bundle = x.exec_ok(&["cat", "/etc/weft/trust-bundle.pem"]).unwrap();
        assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2, "{}", x.name);
        assert!(bundle.contains(new_root.trim()), "{}", x.name);
        assert!(is_ready(x), "{}", x.name);
    }
    let (out, took) = rotate("switch");
    recap_ok(&out, &["h1"]);
    step(t0, &format!("rotate-ca.yml switch took {took:.1?}"));
    let installed = m[0]
        .exec_ok(&["cat", "/etc/weft/ca/intermediate.pem"])
        .unwrap();
    assert_eq!(
        installed.trim(),
        fs::read_to_string(pki2.join("ca-h1/ca.pem"))
            .unwrap()
            .trim()
    );
    // A new identity from the new intermediate chains to the new root: re-bootstrap h4 the
    // way docs/identity.md describes (stop, forget the node identity, new token, start).
    m[3].exec_ok(&[
        "sh",
        "-c",
        "systemctl stop weft && rm -f /var/lib/weft/node.*",
    ])
    .unwrap();
    let token = run_ok(
        Command::new(&bin)
            .args(["token", "create", "--operator"])
            .arg(&pki)
            .args(["--node", "h4", "--ttl", "10m"]),
    )
    .unwrap();
    fs::write(m[3].root.join("etc/weft/join.token"), token).unwrap();
    m[3].exec_ok(&["systemctl", "start", "weft"]).unwrap();
    let verify_new = m[3]
        .exec(&["sh", "-c", "awk '/BEGIN/{n++} n==2' /etc/weft/trust-bundle.pem > /root/new-root.pem; weft certs verify /var/lib/weft/node.pem --bundle /root/new-root.pem"], Duration::from_secs(30))
        .unwrap();
    assert!(
        verify_new.status.success(),
        "h4's new node SVID does not chain to the new root: {}",
        text(&verify_new)
    );
    wait_for(
        "every machine ready after the switch",
        Duration::from_secs(60),
        || m.iter().all(is_ready),
    );
    for _ in 0..10 {
        let body = m[3]
            .exec_ok(&[
                "curl",
                "-sS",
                "--fail",
                "--max-time",
                "5",
                &format!("http://{UPSTREAM}/"),
            ])
            .unwrap();
        assert!(body.trim() == "h2" || body.trim() == "h3", "{body}");
    }
    step(
        t0,
        "after the switch: h4 re-bootstrapped under the new root, traffic h4 -> api (old-root SVIDs) flows",
    );
    let (out, took) = rotate("finish");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "finish must refuse while h2/h3 hold old-root identities:\n{stdout}"
    );
    assert!(
        stdout.contains("still holds identities issued under the old root"),
        "{stdout}"
    );
    for x in m {
        let bundle = x.exec_ok(&["cat", "/etc/weft/trust-bundle.pem"]).unwrap();
        assert_eq!(
            bundle.matches("BEGIN CERTIFICATE").count(),
            2,
            "finish changed {}'s bundle",
            x.name
        );
    }
    step(
        t0,
        &format!("rotate-ca.yml finish refused as it must ({took:.1?}); bundles unchanged"),
    );
    drop(lab);
    step(t0, "lab torn down");
}
