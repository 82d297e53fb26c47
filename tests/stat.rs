//! `weft stat` and the Grafana dashboard with real processes: three `weft agent`s on
//! 127.0.0.1, `web` (a real Python HTTP server, protocol `http`) registered on a1 and a2, and
//! a client on a3 sending a known load through a3's HTTP proxy (and a little raw TCP through an
//! upstream listener on a3, to `db` on a2): requests at a fixed pace,
//! some answered 500 by the backend, some slow. The real `weft stat --json` on a3 must count
//! exactly what was sent (served by two agents, gathered over QUIC), at the rate it was sent,
//! with the right success rate and latency quantiles. The dashboard in packaging/grafana must
//! parse, and every metric its queries name must be on the agents' `/metrics`.
//!
//! Every process started here is killed by PID when the test ends; every wait is bounded.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::agent::{Cluster, TestAgent, free_port, wait_for_listener, wait_until, weft_bin};

/// `/fail`: 500; `/slow`: 200 after 150 ms; anything else: 200 at once.
const SERVER_PY: &str = r#"
import http.server, sys, time
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path.startswith("/slow"):
            time.sleep(0.15)
        code = 500 if self.path.startswith("/fail") else 200
        body = ("%d %s\n" % (code, self.path)).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"#;

/// A child process killed by PID on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_backend() -> (Killed, u16) {
    let port = free_port();
    let child = Command::new("python3")
        .args(["-c", SERVER_PY, &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn python3");
    let server = Killed(child);
    assert!(
        wait_for_listener(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(10)
        ),
        "backend on {port} did not listen"
    );
    (server, port)
}

/// a1 (CA host) and a2 run `web` (with a health check), both backed by the one test server;
/// a2 also runs `db`, protocol `tcp`, on the same server; a3 is the client, with an upstream
/// listener for `db` on `db_upstream`.
fn start_mesh(port: u16, db_upstream: u16) -> Cluster {
    let web = format!(
        "[[service]]\nname = \"web\"\nprotocol = \"http\"\nport = {port}\n\
         check = {{ http = \"/ok\", interval = \"1s\", timeout = \"500ms\" }}\n"
    );
    let cluster = Cluster::start(3, |spec| match spec.name.as_str() {
        "a1" => spec.extra = web.clone(),
        "a2" => {
            spec.extra =
                format!("{web}\n[[service]]\nname = \"db\"\nprotocol = \"tcp\"\nport = {port}\n")
        }
        _ => {
            spec.extra =
                format!("[[upstream]]\nservice = \"db\"\nlisten = \"127.0.0.1:{db_upstream}\"\n")
        }
    })
    .expect("start three agents");
    let both = [
        ("a1".to_string(), "passing".to_string()),
        ("a2".to_string(), "passing".to_string()),
    ];
    let ready = wait_until(Duration::from_secs(30), || {
        cluster.all_ready() && cluster.agents[2].endpoints("default/db") == both[1..] && {
            let mut endpoints = cluster.agents[2].endpoints("default/web");
            endpoints.sort();
            endpoints == both
        }
    });
    assert!(ready.is_some(), "mesh not ready\n{}", cluster.logs());
    cluster
}

/// One HTTP/1.1 exchange over raw TCP through the `db` upstream listener; returns the status.
fn get_through_upstream(port: u16) -> u16 {
    status_of(port, "GET /ok HTTP/1.1\r\nHost: db")
}

/// One `GET http://web.weft{path}` through `agent`'s HTTP proxy, on a new connection;
/// returns the status (0 if the exchange failed).
fn get(agent: &TestAgent, path: &str) -> u16 {
    status_of(
        agent.spec.http_proxy_port,
        &format!("GET http://web.weft{path} HTTP/1.1\r\nHost: web.weft"),
    )
}

/// Sends `head` (request line and headers, without the closing blank line) to 127.0.0.1:`port`
/// on a new connection; returns the answer's status (0 if the exchange failed).
fn status_of(port: u16, head: &str) -> u16 {
    let exchange = || -> std::io::Result<u16> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "{head}\r\nConnection: close\r\n\r\n")?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        Ok(String::from_utf8_lossy(&answer)
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0))
    };
    exchange().unwrap_or(0)
}

/// The real `weft stat --json --interval INTERVAL` against `agent`, started; returns the
/// process once its first sample is taken (its progress line on stderr), and that line.
fn spawn_stat(agent: &TestAgent, interval: &str) -> (Killed, String) {
    let mut child = Command::new(weft_bin())
        .args(["stat", "--json", "--interval", interval, "--socket"])
        .arg(agent.socket())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn weft stat");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stderr).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("weft stat took no first sample within 20s");
    (Killed(child), line)
}

/// Waits (bounded) for `weft stat` to exit and parses its JSON.
fn stat_result(mut stat: Killed, timeout: Duration) -> Value {
    let exited = wait_until(timeout, || matches!(stat.0.try_wait(), Ok(Some(_))));
    assert!(
        exited.is_some(),
        "weft stat did not exit within {timeout:?}"
    );
    let status = stat.0.wait().expect("weft stat status");
    let mut stdout = String::new();
    stat.0
        .stdout
        .take()
        .expect("piped stdout")
        .read_to_string(&mut stdout)
        .expect("read weft stat output");
    assert!(status.success(), "weft stat failed: {status}\n{stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("weft stat JSON: {e}\n{stdout}"))
}

#[test]
fn weft_stat_reports_the_load_the_test_sent_and_the_dashboard_names_real_metrics() {
    let (_backend, port) = start_backend();
    let db_upstream = free_port();
    let cluster = start_mesh(port, db_upstream);
    let a3 = &cluster.agents[2];

    // Warm up (tunnels, connection pools); this traffic ends before the measured window.
    for _ in 0..4 {
        assert_eq!(get(a3, "/warm"), 200, "{}", cluster.logs());
    }

    // The window: 8 s. The load: 60 requests at 20/s (3 s), so it fits in the window even on
    // a slow machine. Every 6th request fails (10), requests 3, 15, 27, 39, 51 are slow (5).
    const SENT: u64 = 60;
    const PACE: Duration = Duration::from_millis(50);
    let (stat, first) = spawn_stat(a3, "8s");
    assert!(
        first.contains("sampled 3 of 3 agents"),
        "first sample: {first}\n{}",
        cluster.logs()
    );
    let started = Instant::now();
    let (mut failed, mut slow) = (0u64, 0u64);
    for i in 0..SENT {
        let path = if i % 6 == 0 {
            failed += 1;
            "/fail"
        } else if i % 12 == 3 {
            slow += 1;
            "/slow"
        } else {
            "/ok"
        };
        let expected = if path == "/fail" { 500 } else { 200 };
        assert_eq!(get(a3, path), expected, "GET {path}\n{}", cluster.logs());
        if let Some(wait) = (PACE * (i as u32 + 1)).checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let load = started.elapsed();
    assert_eq!((failed, slow), (10, 5));
    assert!(
        load < Duration::from_secs(7),
        "the load took {load:?}: it no longer fits in the 8 s window"
    );

    let report = stat_result(stat, Duration::from_secs(30));
    assert_eq!(
        report["answered"].as_array().map(Vec::len),
        Some(3),
        "{report:#}"
    );
    let window = report["window_secs"].as_f64().unwrap();
    assert!(
        (7.5..10.0).contains(&window),
        "window {window}s: {report:#}"
    );
    let services = report["services"].as_array().expect("services");
    assert_eq!(services.len(), 1, "only web served requests: {report:#}");
    let web = &services[0];
    assert_eq!(web["service"], "default/web");
    // Every request counted once, by the agent that served it, over both serving agents.
    assert_eq!(web["requests"].as_u64(), Some(SENT), "{report:#}");
    assert_eq!(web["agents"].as_u64(), Some(2), "{report:#}");
    assert_eq!(web["codes"]["5xx"].as_u64(), Some(failed), "{report:#}");
    assert_eq!(
        web["codes"]["2xx"].as_u64(),
        Some(SENT - failed),
        "{report:#}"
    );
    let success = web["success_rate"].as_f64().unwrap();
    assert!(
        (success - 50.0 / 60.0).abs() < 1e-9,
        "success {success}: {report:#}"
    );
    // The rate: what was sent over the window (each agent's rate over its own clock).
    let rps = web["rps"].as_f64().unwrap();
    let expected_rps = SENT as f64 / window;
    assert!(
        (rps - expected_rps).abs() < expected_rps * 0.1,
        "rps {rps}, expected about {expected_rps}: {report:#}"
    );
    // Latency: 55 fast requests and 5 taking 150 ms (8%): the median is fast, p95 and p99
    // fall in the 100-200 ms bucket (or the next one on a very slow machine).
    let p50 = web["p50_seconds"].as_f64().unwrap();
    let p95 = web["p95_seconds"].as_f64().unwrap();
    let p99 = web["p99_seconds"].as_f64().unwrap();
    assert!(p50 < 0.1, "p50 {p50}: {report:#}");
    assert!((0.1..=0.5).contains(&p95), "p95 {p95}: {report:#}");
    assert!(p95 <= p99 && p99 <= 0.5, "p99 {p99}: {report:#}");

    // The table form works too, for one service.
    let table = a3.cli(&["stat", "--interval", "200ms", "web"], None);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success(), "{text}");
    assert!(text.starts_with("SERVICE"), "{text}");
    assert!(text.contains("3 of 3 agents answered"), "{text}");

    // Some TCP traffic too (a raw exchange through the `db` upstream), then every metric the
    // dashboard's queries name must be on a live agent's /metrics (TCP byte counts are
    // recorded when the connection ends, just after the answer).
    assert_eq!(get_through_upstream(db_upstream), 200, "{}", cluster.logs());
    let names = dashboard_metric_names();
    let mut missing = Vec::new();
    let mut exported = BTreeSet::new();
    let all_there = wait_until(Duration::from_secs(5), || {
        exported.clear();
        for agent in &cluster.agents {
            let text = agent.metrics().unwrap_or_default();
            exported.extend(
                text.lines()
                    .filter(|l| !l.starts_with('#'))
                    .filter_map(|l| l.split(['{', ' ']).next())
                    .map(str::to_string),
            );
        }
        missing = names
            .iter()
            .filter(|name| {
                !["", "_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| exported.contains(&format!("{name}{suffix}")))
            })
            .cloned()
            .collect();
        missing.is_empty()
    });
    assert!(
        all_there.is_some(),
        "the dashboard names metrics no agent exports: {missing:?}\nexported: {exported:?}"
    );
}

fn dashboard_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../packaging/grafana/weft-dashboard.json")
}

/// The dashboard's queries: panel target `expr`s and templating variable queries.
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(dashboard_path()).expect("read the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().expect("a target expr").to_string());
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if let Some(query) = variable["query"]["query"].as_str() {
            queries.push(query.to_string());
        }
    }
    queries
}

/// Every `weft_…` name in the dashboard's queries.
fn dashboard_metric_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for query in dashboard_queries() {
        let mut rest = query.as_str();
        while let Some(at) = rest.find("weft_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            names.insert(name);
        }
    }
    names
}

#[test]
fn the_dashboard_parses_and_shows_the_golden_metrics() {
    let text = std::fs::read_to_string(dashboard_path()).expect("read the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "weft-mesh");
    let queries = dashboard_queries();
    assert!(queries.len() >= 10, "{queries:?}");
    let names = dashboard_metric_names();
    for golden in [
        "weft_http_requests_total",
        "weft_http_request_duration_seconds_bucket",
    ] {
        assert!(names.contains(golden), "{golden} missing from {names:?}");
    }
    for quantile in ["0.5", "0.95", "0.99"] {
        assert!(
            queries
                .iter()
                .any(|q| q.contains(&format!("histogram_quantile({quantile},"))),
            "no p{quantile} panel"
        );
    }
    // Every panel has a unique id and a title.
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(panel["title"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(ids.insert(panel["id"].as_u64().expect("panel id")));
    }
}
