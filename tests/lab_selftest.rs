//! Self-test of the network-namespace lab (`weft_tests::lab`).
//!
//! Needs root, `ip` (iproute2), `nft` (nftables) and `python3`. Every test
//! uses its own lab name and subnet so the tests can run in parallel; every
//! wait is bounded.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use weft_tests::lab::Lab;

/// Receiver: binds, prints `ready`, waits for the token, acks it, prints
/// `got <source address>`. Exits 3 when nothing arrives in time.
const RECEIVER: &str = r#"
import socket, sys
addr, port, timeout, tok = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4].encode()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((addr, port))
s.settimeout(timeout)
print("ready", flush=True)
try:
    while True:
        d, a = s.recvfrom(2048)
        if d == tok:
            s.sendto(b"ack:" + tok, a)
            print("got", a[0], flush=True)
            sys.exit(0)
except TimeoutError:
    print("timeout", flush=True)
    sys.exit(3)
"#;

/// Sender: sends the token every 50 ms until acked or `n` tries are used up.
const SENDER: &str = r#"
import socket, sys, time
dst, tok, n = (sys.argv[1], int(sys.argv[2])), sys.argv[3].encode(), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.05)
for _ in range(n):
    try:
        s.sendto(tok, dst)
        d, a = s.recvfrom(2048)
        if d == b"ack:" + tok:
            print("acked", flush=True)
            sys.exit(0)
    except TimeoutError:
        pass
    except OSError:
        time.sleep(0.05)
sys.exit(3)
"#;

static PROBE: AtomicU32 = AtomicU32::new(0);

/// Sends UDP datagrams from host `from` to host `to` and reports whether one
/// arrived (checked at the receiver, including the source address).
/// A negative answer takes about `RECV_TIMEOUT`.
fn udp_reaches(lab: &Lab, from: usize, to: usize) -> Result<bool> {
    const RECV_TIMEOUT: f64 = 1.5;
    const TRIES: u32 = 20; // 20 x 50 ms = 1 s of sending
    let n = PROBE.fetch_add(1, Ordering::SeqCst);
    let port = 40000 + (n % 20000) as u16;
    let token = format!("probe-{}-{n}-{from}-{to}", std::process::id());
    let dst = lab.host_addr(to).to_string();

    let mut receiver = lab.spawn(
        to,
        Command::new("python3")
            .args(["-c", RECEIVER, &dst, &port.to_string()])
            .arg(RECV_TIMEOUT.to_string())
            .arg(&token)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    )?;
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = receiver.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(line) if line == "ready" => {}
        other => {
            let _ = receiver.kill();
            let _ = receiver.wait();
            bail!("receiver on h{to} did not get ready: {other:?}");
        }
    }

    let sent = lab.exec_timeout(
        from,
        &[
            "python3",
            "-c",
            SENDER,
            &dst,
            &port.to_string(),
            &token,
            &TRIES.to_string(),
        ],
        Duration::from_secs(20),
    )?;
    let status = wait_bounded(&mut receiver, Duration::from_secs(10))?
        .with_context(|| format!("receiver on h{to} did not exit"))?;
    let lines: Vec<String> = rx.try_iter().collect();
    let expected = format!("got {}", lab.host_addr(from));
    let got = status.success() && lines.contains(&expected);
    ensure!(
        got || status.code() == Some(3),
        "receiver on h{to} failed: {status}, output {lines:?}"
    );
    // With a lossless lab, an arrival is always acked and vice versa.
    ensure!(
        got == sent.status.success(),
        "h{from}->h{to}: receiver got={got} but sender {} (stderr: {})",
        sent.status,
        String::from_utf8_lossy(&sent.stderr)
    );
    Ok(got)
}

fn wait_bounded(child: &mut Child, limit: Duration) -> Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What the lab must never change: root-namespace links, routes and
/// firewall rules.
fn root_namespace_state() -> String {
    format!(
        "links:\n{}\nipv4 routes:\n{}\nipv6 routes:\n{}\nnft:\n{}",
        sh(&["ip", "-br", "link"]),
        sh(&["ip", "-4", "route", "show", "table", "all"]),
        sh(&["ip", "-6", "route", "show", "table", "main"]),
        sh(&["nft", "list", "ruleset"]),
    )
}

fn lab_namespaces(name: &str) -> Vec<String> {
    let prefix = format!("{name}-");
    sh(&["ip", "netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|ns| ns.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// True if `pid` no longer names a live (non-zombie) process.
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

fn wait_gone(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if gone(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    gone(pid)
}

#[test]
fn three_hosts_reach_each_other_partition_heal_and_leave_nothing() -> Result<()> {
    let before = root_namespace_state();
    let started = Instant::now();
    let lab = Lab::up("wlst1", 61, 3)?;
    eprintln!("wlst1: lab up with 3 hosts in {:?}", started.elapsed());

    assert_eq!(lab.host_addr(2), Ipv4Addr::new(198, 18, 61, 2));
    assert_eq!(lab.netns(3), "wlst1-h3");
    let mut listed = lab_namespaces("wlst1");
    listed.sort();
    assert_eq!(listed, ["wlst1-h1", "wlst1-h2", "wlst1-h3", "wlst1-sw"]);
    assert_eq!(
        root_namespace_state(),
        before,
        "the lab changed the root namespace"
    );

    // Each host sees only lo and its eth0 (also through /sys), with its address.
    for i in 1..=3 {
        let links = lab.exec_ok(i, &["ip", "-br", "link"])?;
        let names: Vec<&str> = links
            .lines()
            .filter_map(|l| l.split(['@', ' ']).next())
            .collect();
        assert_eq!(names, ["lo", "eth0"], "h{i} links: {links}");
        let mut sys: Vec<String> = lab
            .exec_ok(i, &["ls", "/sys/class/net"])?
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        sys.sort();
        assert_eq!(sys, ["eth0", "lo"], "h{i} /sys/class/net");
        let addrs = lab.exec_ok(i, &["ip", "-4", "-br", "addr", "show", "eth0"])?;
        assert!(
            addrs.contains(&format!("198.18.61.{i}/24")),
            "h{i}: {addrs}"
        );
    }

    // No way out: route lookups for outside addresses fail (nothing is sent).
    for i in 1..=3 {
        for (family, outside) in [("-4", "192.0.2.1"), ("-6", "2001:db8::1")] {
            let out = lab.exec(i, &["ip", family, "route", "get", outside])?;
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && err.contains("unreachable"),
                "h{i}: `ip route get {outside}` = {} / {err}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let defaults = lab.exec_ok(i, &["ip", "route", "show", "default"])?;
        assert!(defaults.trim().is_empty(), "h{i} default route: {defaults}");
    }

    assert!(udp_reaches(&lab, 1, 2)?, "h1 -> h2 before any fault");
    assert!(udp_reaches(&lab, 1, 3)?, "h1 -> h3 before any fault");

    // A child left running, plus a grandchild it forked: both must die on teardown.
    let mut sleeper = lab.spawn(
        2,
        Command::new("sh")
            .args(["-c", "sleep 600 & echo $!; wait"])
            .stdout(Stdio::piped()),
    )?;
    let grandchild: u32 = {
        let mut line = String::new();
        BufReader::new(sleeper.stdout.take().unwrap()).read_line(&mut line)?;
        line.trim().parse().context("grandchild pid")?
    };
    let sleeper_pid = sleeper.id();

    lab.partition(3)?;
    lab.partition(3)?; // idempotent
    assert!(
        !udp_reaches(&lab, 1, 3)?,
        "h1 -> h3 while h3 is partitioned"
    );
    assert!(
        !udp_reaches(&lab, 3, 2)?,
        "h3 -> h2 while h3 is partitioned"
    );
    assert!(udp_reaches(&lab, 1, 2)?, "h1 -> h2 while h3 is partitioned");
    let link = lab.exec_ok(3, &["ip", "-br", "link", "show", "eth0"])?;
    assert!(
        link.contains("LOWER_UP") && !link.contains("NO-CARRIER"),
        "partitioned link must stay up: {link}"
    );

    lab.heal(3)?;
    lab.heal(3)?; // no-op
    assert!(udp_reaches(&lab, 1, 3)?, "h1 -> h3 after heal");
    assert!(udp_reaches(&lab, 3, 1)?, "h3 -> h1 after heal");

    let started = Instant::now();
    lab.down()?;
    eprintln!("wlst1: lab down in {:?}", started.elapsed());

    assert!(
        lab_namespaces("wlst1").is_empty(),
        "left: {:?}",
        lab_namespaces("wlst1")
    );
    assert_eq!(
        root_namespace_state(),
        before,
        "root namespace differs after the lab"
    );
    // The lab reaped its child, so it is no longer ours to wait for.
    let reaped = sleeper.try_wait();
    assert!(
        matches!(&reaped, Err(e) if e.raw_os_error() == Some(libc::ECHILD)),
        "tracked child {sleeper_pid} not killed and reaped: {reaped:?}"
    );
    assert!(
        wait_gone(grandchild, Duration::from_secs(5)),
        "grandchild {grandchild} still alive"
    );
    Ok(())
}

#[test]
fn unplug_plug_and_heal_all() -> Result<()> {
    let lab = Lab::up("wlst4", 64, 3)?;
    lab.unplug(2)?;
    let link = lab.exec_ok(2, &["ip", "-br", "link", "show", "eth0"])?;
    assert!(link.contains("NO-CARRIER"), "unplugged link: {link}");
    assert!(!udp_reaches(&lab, 1, 2)?, "h1 -> h2 while h2 is unplugged");
    assert!(udp_reaches(&lab, 1, 3)?, "h1 -> h3 while h2 is unplugged");
    lab.plug(2)?;
    // ARP/carrier recovery: the probe retries for about a second.
    assert!(udp_reaches(&lab, 1, 2)?, "h1 -> h2 after plug");

    lab.partition(1)?;
    lab.partition(2)?;
    assert!(
        !udp_reaches(&lab, 3, 1)?,
        "h3 -> h1 while h1 is partitioned"
    );
    lab.heal_all()?;
    assert!(udp_reaches(&lab, 3, 1)?, "h3 -> h1 after heal_all");
    assert!(udp_reaches(&lab, 1, 2)?, "h1 -> h2 after heal_all");
    drop(lab);
    assert!(lab_namespaces("wlst4").is_empty());
    Ok(())
}

#[test]
fn panicking_test_body_still_tears_the_lab_down() {
    let before = root_namespace_state();
    let (tx, rx) = mpsc::channel::<u32>();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = Lab::up("wlst2", 62, 2).expect("lab up");
        #[allow(
            clippy::zombie_processes,
            reason = "the lab must kill and reap it while unwinding; that is what is tested"
        )]
        let child = lab
            .spawn(1, Command::new("sleep").arg("600"))
            .expect("spawn sleep");
        tx.send(child.id()).unwrap();
        assert_eq!(lab_namespaces("wlst2").len(), 3);
        panic!("deliberate panic inside a lab test body (expected by this test)");
    }));
    assert!(result.is_err(), "the body should have panicked");
    let pid = rx.recv_timeout(Duration::from_secs(1)).expect("child pid");
    assert!(
        lab_namespaces("wlst2").is_empty(),
        "left: {:?}",
        lab_namespaces("wlst2")
    );
    assert!(
        wait_gone(pid, Duration::from_secs(5)),
        "child {pid} survived the panic"
    );
    assert_eq!(root_namespace_state(), before);
}

/// Deletes namespaces and kills a child this test created by hand, even if
/// an assertion fails first.
struct Manual {
    namespaces: Vec<&'static str>,
    child: Option<Child>,
}

impl Drop for Manual {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

#[test]
fn leftovers_of_a_crashed_run_are_removed_first() -> Result<()> {
    // Simulate a crashed run: stale namespaces (one with a live process) plus
    // a namespace of another lab whose name merely shares a prefix.
    let mut manual = Manual {
        namespaces: vec!["wlst3-sw", "wlst3-h1", "wlst3-h9", "wlst33-h1"],
        child: None,
    };
    for ns in &manual.namespaces {
        sh(&["ip", "netns", "add", ns]);
    }
    manual.child = Some(
        Command::new("ip")
            .args(["netns", "exec", "wlst3-h9", "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()?,
    );
    // Wait (bounded) until the sleeper is inside the namespace.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sh(&["ip", "netns", "pids", "wlst3-h9"]).trim().is_empty() {
        assert!(Instant::now() < deadline, "sleeper never entered wlst3-h9");
        std::thread::sleep(Duration::from_millis(10));
    }

    let lab = Lab::up("wlst3", 63, 2)?;
    let mut listed = lab_namespaces("wlst3");
    listed.sort();
    assert_eq!(listed, ["wlst3-h1", "wlst3-h2", "wlst3-sw"]);
    assert_eq!(
        lab_namespaces("wlst33"),
        ["wlst33-h1"],
        "another lab's namespace was touched"
    );
    let status = wait_bounded(manual.child.as_mut().unwrap(), Duration::from_secs(5))?
        .context("leftover process was not killed")?;
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "leftover exit: {status}"
    );
    assert!(udp_reaches(&lab, 1, 2)?, "fresh lab works after cleanup");

    // A second lab with a live name is refused, not "cleaned up".
    let err = Lab::up("wlst3", 63, 2).unwrap_err();
    assert!(format!("{err:#}").contains("in use"), "{err:#}");
    assert!(
        udp_reaches(&lab, 2, 1)?,
        "live lab intact after refused duplicate"
    );
    lab.down()?;
    assert!(lab_namespaces("wlst3").is_empty());
    Ok(())
}

#[test]
fn bad_arguments_are_refused_before_anything_is_created() {
    for (name, hosts) in [("Bad Name", 2), ("wlst5", 0), ("wlst5", 255), ("9lives", 1)] {
        let r = Lab::up(name, 65, hosts);
        assert!(r.is_err(), "{name:?}/{hosts} accepted");
    }
    assert!(lab_namespaces("wlst5").is_empty());
    let lab = Lab::up("wlst5", 65, 1).expect("one-host lab");
    assert_eq!(lab.host_addr(1), Ipv4Addr::new(198, 18, 65, 1));
    assert!(lab.partition(2).is_err(), "host 2 does not exist");
    assert!(lab.exec(0, &["true"]).is_err(), "host 0 does not exist");
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lab.host_addr(2)));
    assert!(panicked.is_err());
    drop(lab);
    assert!(lab_namespaces("wlst5").is_empty());
}
