//! The outbound HTTP proxy with real processes: three `weft agent`s on 127.0.0.1, a real
//! HTTP server (`python3 -m http.server`) registered on a2 as `web`, and real `curl` on a3's
//! proxy. Proves name routing (`web.weft`, `web.default.weft`), keep-alive, CONNECT, the
//! 503/400 answers, and the metrics that count them.
//!
//! Every process started here is killed by PID when the test ends (agents by the harness,
//! the HTTP server by [`FileServer`]'s drop); every wait is bounded.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use weft_tests::agent::{Cluster, TestAgent, free_port, start_cluster_with, wait_until};

/// The service name: in the scope of every test join token (`TOKEN_SCOPE`).
const SERVICE: &str = "web";
/// The file served.
const FILE: &str = "hello.bin";

/// Python's `http.server` file handler, answering also what it was sent: the Host header,
/// the request target, and which hop-by-hop headers reached it.
const SERVER_PY: &str = r#"
import functools, http.server, sys
HOP = ("Proxy-Connection", "Proxy-Authorization", "Keep-Alive", "X-Hop")
class Handler(http.server.SimpleHTTPRequestHandler):
    def end_headers(self):
        self.send_header("x-seen-host", self.headers.get("Host", "-"))
        self.send_header("x-seen-target", self.path)
        self.send_header("x-seen-hop", ",".join(h for h in HOP if h in self.headers) or "-")
        super().end_headers()
    def log_message(self, *args):
        pass
handler = functools.partial(Handler, directory=sys.argv[2])
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), handler).serve_forever()
"#;

/// A Python `http.server` serving one directory on 127.0.0.1, killed by PID on drop.
struct FileServer {
    child: Child,
    port: u16,
    content: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl FileServer {
    fn start() -> FileServer {
        let dir = tempfile::tempdir().expect("temp dir");
        // Bytes a text-only path could mangle: every value, twice, and a line break.
        let content: Vec<u8> = (0..=255u8).chain(0..=255u8).chain(*b"\r\nend\n").collect();
        std::fs::write(dir.path().join(FILE), &content).expect("write file");
        let port = free_port();
        let child = Command::new("python3")
            .args(["-c", SERVER_PY, &port.to_string()])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn python3 -m http.server");
        let server = FileServer {
            child,
            port,
            content,
            _dir: dir,
        };
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        assert!(
            wait_until(Duration::from_secs(10), || {
                TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok()
            })
            .is_some(),
            "python3 -m http.server did not listen on {address} within 10s"
        );
        server
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        // Child::kill signals exactly the PID spawned above.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three agents: a1 the CA host, a2 running `web` (the file server), a3 the client host.
fn mesh_with_web(files: &FileServer) -> Cluster {
    let port = files.port;
    let cluster = Cluster::start(3, |spec| {
        if spec.name == "a2" {
            spec.extra =
                format!("[[service]]\nname = \"{SERVICE}\"\nprotocol = \"http\"\nport = {port}\n");
        }
    })
    .expect("start three agents");
    let ready = wait_until(Duration::from_secs(15), || {
        cluster.all_ready()
            && cluster.agents[2].endpoints(&format!("default/{SERVICE}"))
                == [("a2".to_string(), "passing".to_string())]
    });
    assert!(
        ready.is_some(),
        "mesh not ready with {SERVICE} on a2 within 15s\n{}",
        cluster.logs()
    );
    cluster
}

fn proxy_url(agent: &TestAgent) -> String {
    format!("http://127.0.0.1:{}", agent.spec.http_proxy_port)
}

/// Runs real `curl` through `agent`'s proxy (as `http_proxy` in the environment, unless
/// `args` name `-x`), bounded by `--max-time`.
fn curl(agent: &TestAgent, args: &[&str]) -> Output {
    Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10"])
        .args(args)
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env("http_proxy", proxy_url(agent))
        .stdin(Stdio::null())
        .output()
        .expect("run curl")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `(status, header lines each ending in CRLF and lower-cased, body)` of one
/// `curl --include` answer.
fn status_headers_body(output: &Output) -> (u16, String, String) {
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase() + "\r\n", body.to_string())
}

fn outbound_sample(name: &str, destination: &str) -> String {
    format!("{name}{{destination=\"{destination}\",direction=\"outbound\",source=\"-\"}}")
}

fn failure_sample(reason: &str) -> String {
    format!("weft_tcp_connection_failures_total{{direction=\"outbound\",reason=\"{reason}\"}}")
}

/// The agent's proxy metric for `sample` reaches `at_least` within 5 s (closes are counted
/// when the connection ends, just after the app has its answer).
fn metric_reaches(agent: &TestAgent, sample: &str, at_least: f64) -> bool {
    wait_until(Duration::from_secs(5), || agent.metric(sample) >= at_least).is_some()
}

#[test]
fn curl_fetches_a_file_by_name_and_by_namespace_on_one_keep_alive_connection() {
    let files = FileServer::start();
    let cluster = mesh_with_web(&files);
    let a3 = &cluster.agents[2];
    let dir = tempfile::tempdir().unwrap();

    for (i, url) in [
        format!("http://{SERVICE}.weft/{FILE}"),
        format!("http://{SERVICE}.default.weft/{FILE}"),
        format!("http://{SERVICE}.weft:8080/{FILE}"),
    ]
    .iter()
    .enumerate()
    {
        let out = dir.path().join(format!("single-{i}"));
        let output = curl(a3, &["--fail", "-o", out.to_str().unwrap(), url.as_str()]);
        assert!(
            output.status.success(),
            "curl {url} via a3's proxy failed: {}\n{}",
            stderr(&output),
            cluster.logs()
        );
        assert_eq!(
            std::fs::read(&out).unwrap(),
            files.content,
            "{url}: the bytes differ from the file"
        );
    }

    // Two URLs in one curl run: the second request reuses the connection to the proxy.
    let (first, second) = (dir.path().join("first"), dir.path().join("second"));
    let output = curl(
        a3,
        &[
            "--verbose",
            "--fail",
            "-o",
            first.to_str().unwrap(),
            &format!("http://{SERVICE}.weft/{FILE}"),
            "-o",
            second.to_str().unwrap(),
            &format!("http://{SERVICE}.default.weft/{FILE}"),
        ],
    );
    let log = stderr(&output);
    assert!(output.status.success(), "two URLs failed: {log}");
    assert_eq!(std::fs::read(&first).unwrap(), files.content);
    assert_eq!(std::fs::read(&second).unwrap(), files.content);
    assert!(
        log.contains("Re-using existing connection") || log.contains("Reusing existing connection"),
        "curl opened a second connection to the proxy instead of keeping the first alive:\n{log}"
    );
    assert_eq!(
        log.matches("Connected to 127.0.0.1").count(),
        1,
        "one TCP connection to the proxy expected:\n{log}"
    );

    // The service sees the Host the app addressed, an origin-form target, and no hop-by-hop
    // headers (curl's Proxy-Connection, a Proxy-Authorization, one the Connection header lists).
    let output = curl(
        a3,
        &[
            "--include",
            "--fail",
            "-H",
            "Proxy-Authorization: Basic eA==",
            "-H",
            "Connection: x-hop",
            "-H",
            "X-Hop: 1",
            "-H",
            "X-End-To-End: kept",
            &format!("http://{SERVICE}.weft:8080/{FILE}"),
        ],
    );
    let (status, headers, _) = status_headers_body(&output);
    assert_eq!(status, 200, "{}", stderr(&output));
    assert!(
        headers.contains("x-seen-host: web.weft:8080\r\n"),
        "{headers}"
    );
    assert!(
        headers.contains(&format!("x-seen-target: /{FILE}\r\n")),
        "{headers}"
    );
    assert!(headers.contains("x-seen-hop: -\r\n"), "{headers}");
    assert!(headers.starts_with("http/1.1 200"), "{headers}");
    assert!(output.stdout.ends_with(&files.content));

    // Each forwarded request is counted once as an outbound request on a3 and once as an
    // inbound request on a2 (carried per request, multiplexed on HTTP/2 tunnel streams).
    let destination = format!("default/{SERVICE}");
    let requests = |direction: &str| {
        format!(
            "weft_http_requests_total{{code_class=\"2xx\",destination=\"{destination}\",direction=\"{direction}\",route=\"-\",source=\"-\"}}"
        )
    };
    assert!(
        metric_reaches(a3, &requests("outbound"), 6.0),
        "a3 did not count 6 outbound requests\n{}",
        a3.metrics().unwrap_or_default()
    );
    assert!(
        metric_reaches(&cluster.agents[1], &requests("inbound"), 6.0),
        "a2 did not count the inbound requests\n{}",
        cluster.agents[1].metrics().unwrap_or_default()
    );
    let latency = format!(
        "weft_http_request_duration_seconds_count{{destination=\"{destination}\",direction=\"outbound\",route=\"-\",source=\"-\"}}"
    );
    assert!(a3.metric(&latency) >= 6.0);
}

#[test]
fn connect_tunnels_curl_to_the_service() {
    let files = FileServer::start();
    let cluster = mesh_with_web(&files);
    let a3 = &cluster.agents[2];
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("tunnelled");
    let output = curl(
        a3,
        &[
            "--verbose",
            "--fail",
            "--proxytunnel",
            "-x",
            &proxy_url(a3),
            "-o",
            file.to_str().unwrap(),
            &format!("http://{SERVICE}.weft/{FILE}"),
        ],
    );
    let log = stderr(&output);
    assert!(
        output.status.success(),
        "curl --proxytunnel failed: {log}\n{}",
        cluster.logs()
    );
    assert!(
        log.contains("CONNECT web.weft:80"),
        "curl did not tunnel:\n{log}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), files.content);

    let destination = format!("default/{SERVICE}");
    assert!(
        metric_reaches(
            a3,
            &outbound_sample("weft_tcp_close_total", &destination),
            1.0
        ),
        "the tunnel was not counted as closed\n{}",
        a3.metrics().unwrap_or_default()
    );
    assert_eq!(
        a3.metric(&outbound_sample("weft_tcp_open_total", &destination)),
        1.0
    );
    // Bytes through the splice: the response (headers and file) went to the app.
    assert!(
        a3.metric(&outbound_sample("weft_tcp_write_bytes_total", &destination))
            > files.content.len() as f64
    );
    assert!(a3.metric(&outbound_sample("weft_tcp_read_bytes_total", &destination)) > 0.0);

    // CONNECT to a service nobody runs is refused with the reason, not a dead tunnel.
    let output = curl(
        a3,
        &[
            "--verbose",
            "--proxytunnel",
            "-x",
            &proxy_url(a3),
            "http://nosuch.weft/",
        ],
    );
    assert!(!output.status.success());
    let log = stderr(&output);
    assert!(
        log.contains("503") && log.to_ascii_lowercase().contains("weft-error: no_endpoint"),
        "{log}"
    );
}

#[test]
fn a_rate_limit_answers_429_and_every_request_is_in_the_access_logs() {
    const LIMIT: u32 = 5;
    let files = FileServer::start();
    let port = files.port;
    let cluster = start_cluster_with(
        3,
        |spec| {
            if spec.name == "a2" {
                spec.extra = format!(
                    "[[service]]\nname = \"{SERVICE}\"\nprotocol = \"http\"\nport = {port}\n\
                     rate_limit = {{ rps = {LIMIT}, burst = {LIMIT} }}\n"
                );
            }
        },
        |spec, text| {
            // The keyring sits in the cluster's directory.
            let dir = spec.keyring.parent().expect("keyring in the cluster dir");
            let log = format!(
                "[log]\naccess_log = \"{}/{}-access.log\"\n",
                dir.display(),
                spec.name
            );
            text.replacen("[log]\n", &log, 1)
        },
    )
    .expect("start three agents");
    let log_of = |name: &str| {
        std::fs::read_to_string(cluster.dir().join(format!("{name}-access.log")))
            .unwrap_or_default()
    };
    let ready = wait_until(Duration::from_secs(15), || {
        cluster.all_ready()
            && cluster.agents[2].endpoints(&format!("default/{SERVICE}"))
                == [("a2".to_string(), "passing".to_string())]
    });
    assert!(ready.is_some(), "mesh not ready\n{}", cluster.logs());
    let a3 = &cluster.agents[2];
    // 30 requests at once: about the burst passes, the rest get 429 from a2's agent.
    let mut statuses = Vec::new();
    for _ in 0..30 {
        let output = curl(
            a3,
            &[
                "--include",
                &format!("http://{SERVICE}.weft/{FILE}?token=secret"),
            ],
        );
        let (status, headers, _) = status_headers_body(&output);
        if status == 429 {
            assert!(
                headers.contains("weft-error: rate_limited\r\n"),
                "{headers}"
            );
            assert!(headers.contains("retry-after: 1\r\n"), "{headers}");
        }
        statuses.push(status);
    }
    let passed = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    println!("30 quick requests with a limit of {LIMIT}/s: {passed} passed, {limited} got 429");
    assert_eq!(passed + limited, 30, "{statuses:?}");
    assert!(
        (LIMIT as usize..=LIMIT as usize + 10).contains(&passed),
        "{passed} passed; statuses {statuses:?}"
    );
    let refused = format!("weft_http_rate_limited_total{{destination=\"default/{SERVICE}\"}}");
    assert!(metric_reaches(&cluster.agents[1], &refused, limited as f64));
    // Every request is one JSON line in a3's (outbound) and a2's (inbound) access logs, the
    // path without its query.
    let complete = wait_until(Duration::from_secs(5), || {
        log_of("a3").lines().count() >= 30 && log_of("a2").lines().count() >= 30
    });
    assert!(
        complete.is_some(),
        "a3:\n{}\na2:\n{}",
        log_of("a3"),
        log_of("a2")
    );
    for (name, direction) in [("a3", "outbound"), ("a2", "inbound")] {
        let lines: Vec<serde_json::Value> = log_of(name)
            .lines()
            .map(|l| serde_json::from_str(l).expect("each access log line is JSON"))
            .collect();
        assert_eq!(lines.len(), 30, "{name}");
        assert!(lines.iter().all(|l| l["direction"] == direction
            && l["destination"] == format!("default/{SERVICE}")
            && l["path"] == format!("/{FILE}")
            && l["trace_id"].as_str().is_some_and(|t| t.len() == 32)));
        let logged_429 = lines.iter().filter(|l| l["status"] == 429).count();
        assert_eq!(logged_429, limited, "{name}");
    }
}

#[test]
fn unknown_service_is_503_and_a_foreign_host_is_400_without_contact() {
    let files = FileServer::start();
    let cluster = mesh_with_web(&files);
    let a3 = &cluster.agents[2];

    let output = curl(a3, &["--include", "http://nosuch.weft/x"]);
    let (status, headers, body) = status_headers_body(&output);
    assert_eq!(status, 503, "{}{}", headers, stderr(&output));
    assert!(headers.contains("weft-error: no_endpoint"), "{headers}");
    assert!(
        body.contains("no healthy endpoint of default/nosuch"),
        "{body}"
    );
    assert_eq!(body.lines().count(), 1, "{body}");

    let output = curl(a3, &["--include", "http://nosuch.shop.weft/"]);
    let (status, _, body) = status_headers_body(&output);
    assert_eq!(status, 503);
    assert!(body.contains("shop/nosuch"), "{body}");

    // A host outside the mesh: 400 explaining the forms; nothing is resolved or contacted,
    // not even a listener on this very host.
    let bait = TcpListener::bind("127.0.0.1:0").unwrap();
    bait.set_nonblocking(true).unwrap();
    let bait_port = bait.local_addr().unwrap().port();
    for url in [
        "http://example.com/".to_string(),
        format!("http://127.0.0.1:{bait_port}/"),
        format!("http://localhost:{bait_port}/"),
    ] {
        let output = curl(a3, &["--include", &url]);
        let (status, headers, body) = status_headers_body(&output);
        assert_eq!(status, 400, "{url}: {headers}{}", stderr(&output));
        assert!(headers.contains("weft-error: not_mesh_host"), "{headers}");
        assert!(
            body.contains("NAME.weft") && body.contains("NAME.NAMESPACE.weft"),
            "{body}"
        );
    }
    assert!(
        bait.accept().is_err(),
        "the proxy connected to a host outside the mesh"
    );

    // The proxy still serves the mesh on the same kind of connection afterwards.
    let output = curl(a3, &["--fail", &format!("http://{SERVICE}.weft/{FILE}")]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(output.stdout, files.content);

    assert_eq!(a3.metric(&failure_sample("no_endpoint")), 2.0);
    assert_eq!(a3.metric(&failure_sample("not_mesh_host")), 3.0);
    let log = a3.log();
    assert!(log.contains("HTTP proxy request refused"), "{log}");
    assert!(
        log.contains("HTTP proxy: the mesh could not reach the service"),
        "{log}"
    );
}

#[test]
fn a_taken_proxy_address_fails_startup_naming_it() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut cluster = Cluster::start(1, |spec| spec.http_proxy_port = port).unwrap();
    let agent = &mut cluster.agents[0];
    let code = agent
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    assert_ne!(code, Some(0));
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "failed to bind the HTTP proxy ([outbound] http_proxy) to 127.0.0.1:{port}"
        )),
        "{log}"
    );
    drop(taken);
}

/// Reads one HTTP/1.x response with a Content-Length body: `(head, body)`.
fn read_response(stream: &mut TcpStream) -> std::io::Result<(String, Vec<u8>)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte)?;
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body)?;
    Ok((head, body))
}

fn connect_to_proxy(agent: &TestAgent) -> std::io::Result<TcpStream> {
    let address = SocketAddr::from(([127, 0, 0, 1], agent.spec.http_proxy_port));
    let stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(stream)
}

#[test]
fn draining_closes_idle_connections_refuses_new_ones_and_finishes_tunnels() {
    let files = FileServer::start();
    let mut cluster = mesh_with_web(&files);
    let a3 = &cluster.agents[2];

    // An idle keep-alive connection after one request.
    let mut idle = connect_to_proxy(a3).unwrap();
    write!(
        idle,
        "GET http://{SERVICE}.weft/{FILE} HTTP/1.1\r\nHost: {SERVICE}.weft\r\n\r\n"
    )
    .unwrap();
    let (head, body) = read_response(&mut idle).unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, files.content);

    // An open CONNECT tunnel, not yet used.
    let mut tunnel = connect_to_proxy(a3).unwrap();
    write!(
        tunnel,
        "CONNECT {SERVICE}.weft:80 HTTP/1.1\r\nHost: {SERVICE}.weft:80\r\n\r\n"
    )
    .unwrap();
    let (head, _) = read_response(&mut tunnel).unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");

    a3.sigterm();
    // The idle connection is closed at once; new connections are refused.
    let mut rest = Vec::new();
    assert_eq!(
        idle.read_to_end(&mut rest).unwrap_or(usize::MAX),
        0,
        "the idle keep-alive connection was not closed by the drain"
    );
    assert!(
        wait_until(Duration::from_secs(3), || connect_to_proxy(a3).is_err()).is_some(),
        "the proxy still accepts connections while draining"
    );

    // The tunnel in flight still carries a whole exchange; once it ends the agent exits
    // without waiting for the drain deadline (30 s).
    write!(
        tunnel,
        "GET /{FILE} HTTP/1.0\r\nHost: {SERVICE}.weft\r\n\r\n"
    )
    .unwrap();
    let (head, body) = read_response(&mut tunnel).unwrap();
    assert!(head.starts_with("http/1.0 200"), "{head}");
    assert_eq!(body, files.content);
    drop(tunnel);
    let a3 = &mut cluster.agents[2];
    let code = a3
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", a3.log()));
    assert_eq!(code, Some(0), "{}", a3.log());
}
