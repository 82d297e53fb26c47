//! Policies with real processes: host-level versions of the Meshery SMI conformance scenarios.
//!
//! Three `weft agent`s on 127.0.0.1: a1 the CA host, a2 running `web` (a real Python HTTP
//! server, protocol `http`) and `db` (a real `socat` echo server, protocol `tcp`), a3 running
//! `orders`, the caller: real `curl` through a3's HTTP proxy, and a TCP client through an
//! upstream listener on a3. Policies are published with the real `weft policy apply` on a1
//! and enforced by a2 after they spread. Also: refused bundles (tampered, replayed older,
//! invalid files) leave the last good set in force and are counted, and a restarted agent
//! with no peers enforces the persisted bundle.
//!
//! Every process started here is killed by PID when the test ends; every wait is bounded.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use weft_tests::agent::{Cluster, TestAgent, free_port, wait_for_listener, wait_until};

/// Answers 200 to any method and path, echoing them.
const SERVER_PY: &str = r#"
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self):
        length = int(self.headers.get("Content-Length", "0"))
        if length:
            self.rfile.read(length)
        body = ("%s %s\n" % (self.command, self.path)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = do_DELETE = answer
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"#;

/// A child process killed by PID on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_server(command: &mut Command, port: u16) -> Server {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn server");
    let server = Server(child);
    assert!(
        wait_for_listener(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(10)
        ),
        "server on {port} did not listen"
    );
    server
}

const NS: &str = "default";

fn mesh_deny() -> String {
    "apiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata: {name: mesh}\nspec: {default: deny}\n"
        .into()
}

fn http_routes(matches: &str) -> String {
    format!(
        "---\napiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata:\n  name: web-routes\n  namespace: {NS}\nspec:\n  matches:\n{matches}"
    )
}

fn target(name: &str, destination: &str, rule_kind: &str, rule_name: &str) -> String {
    format!(
        "---\napiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  destination:\n    kind: ServiceAccount\n    name: {destination}\n    namespace: {NS}\n  rules:\n  - kind: {rule_kind}\n    name: {rule_name}\n  sources:\n  - kind: ServiceAccount\n    name: orders\n    namespace: {NS}\n"
    )
}

fn tcp_route(ports: &str) -> String {
    format!(
        "---\napiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata:\n  name: db-ports\n  namespace: {NS}\nspec:\n  matches:\n    ports: [{ports}]\n"
    )
}

struct Mesh {
    cluster: Cluster,
    db_upstream: u16,
    db_port: u16,
    _servers: Vec<Server>,
}

fn start_mesh() -> Mesh {
    let web_port = free_port();
    let db_port = free_port();
    let db_upstream = free_port();
    let web = spawn_server(
        Command::new("python3").args(["-c", SERVER_PY, &web_port.to_string()]),
        web_port,
    );
    let db = spawn_server(
        Command::new("socat").args([
            &format!("TCP-LISTEN:{db_port},bind=127.0.0.1,reuseaddr,fork"),
            "EXEC:cat",
        ]),
        db_port,
    );
    let cluster = Cluster::start(3, |spec| match spec.name.as_str() {
        "a2" => {
            spec.extra = format!(
                "[[service]]\nname = \"web\"\nprotocol = \"http\"\nport = {web_port}\n\n\
                 [[service]]\nname = \"db\"\nprotocol = \"tcp\"\nport = {db_port}\n"
            )
        }
        "a3" => {
            spec.extra = format!(
                "[[service]]\nname = \"orders\"\nport = {}\n\n\
                 [[upstream]]\nservice = \"db\"\nlisten = \"127.0.0.1:{db_upstream}\"\n",
                free_port()
            )
        }
        _ => {}
    })
    .expect("start three agents");
    let ready = wait_until(Duration::from_secs(20), || {
        cluster.all_ready()
            && cluster.agents[2].endpoints("default/web") == [("a2".into(), "passing".into())]
            && cluster.agents[2].endpoints("default/db") == [("a2".into(), "passing".into())]
    });
    assert!(ready.is_some(), "mesh not ready\n{}", cluster.logs());
    Mesh {
        cluster,
        db_upstream,
        db_port,
        _servers: vec![web, db],
    }
}

/// `curl` through a3's HTTP proxy: (status, lower-cased head, body).
fn curl(agent: &TestAgent, args: &[&str]) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--include", "--max-time", "10"])
        .args([
            "--proxy",
            &format!("http://127.0.0.1:{}", agent.spec.http_proxy_port),
        ])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// Whether a TCP round trip through the `db` upstream works (echoed) or is closed.
fn db_echoes(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if stream.write_all(b"ping\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 5];
    stream.read_exact(&mut buf).is_ok() && &buf == b"ping\n"
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Applies `text` with the real CLI on a1; returns the version it published.
fn apply(mesh: &Mesh, name: &str, text: &str) -> u64 {
    let dir = mesh.cluster.dir().join("policies").join(name);
    std::fs::create_dir_all(&dir).expect("policy dir");
    std::fs::write(dir.join("policy.yaml"), text).expect("write policy");
    let a1 = &mesh.cluster.agents[0];
    let out = a1.cli(
        &["policy", "apply", "-f", dir.to_str().expect("utf-8 path")],
        Some(mesh.cluster.pki.operator_dir()),
    );
    assert!(out.status.success(), "apply failed: {}", output_text(&out));
    let version = a1.policy_version();
    assert!(version > 0);
    // Enforcement happens at a2: wait for it there.
    let reached = wait_until(Duration::from_secs(5), || {
        mesh.cluster.agents[1].policy_version() == version
    });
    assert!(
        reached.is_some(),
        "version {version} did not reach a2\n{}",
        mesh.cluster.logs()
    );
    version
}

#[test]
fn meshery_smi_scenarios_at_host_level() {
    let mesh = start_mesh();
    let a3 = &mesh.cluster.agents[2];
    let web = "http://web.weft";

    // No policy yet: authenticated traffic is allowed.
    let first = curl(a3, &[&format!("{web}/echo")]);
    assert_eq!(first.0, 200, "{first:?}\n{}", mesh.cluster.logs());
    assert!(db_echoes(mesh.db_upstream));

    // Default deny: A→B is refused (HTTP 403 with the reason; TCP closed).
    apply(&mesh, "deny", &mesh_deny());
    let (status, head, _) = curl(a3, &[&format!("{web}/echo")]);
    assert_eq!(status, 403, "{head}");
    assert!(head.contains("weft-deny-reason: default_deny"), "{head}");
    assert!(!db_echoes(mesh.db_upstream));

    // A TrafficTarget with an HTTPRouteGroup allowing GET /metrics: /metrics passes, /echo
    // and POST /metrics are blocked.
    let metrics_only =
        http_routes("  - name: metrics\n    pathRegex: /metrics\n    methods: [GET]\n");
    apply(
        &mesh,
        "metrics",
        &format!(
            "{}{metrics_only}{}",
            mesh_deny(),
            target("orders-to-web", "web", "HTTPRouteGroup", "web-routes")
        ),
    );
    let (status, _, body) = curl(a3, &[&format!("{web}/metrics")]);
    assert_eq!((status, body.as_str()), (200, "GET /metrics\n"));
    let (status, head, _) = curl(a3, &[&format!("{web}/echo")]);
    assert_eq!(status, 403);
    assert!(
        head.contains("weft-deny-reason: route_not_matched"),
        "{head}"
    );
    let (status, _, _) = curl(
        a3,
        &["-X", "POST", "--data", "x", &format!("{web}/metrics")],
    );
    assert_eq!(status, 403, "POST is not among the allowed methods");
    // The TCP service is still closed: no target names it.
    assert!(!db_echoes(mesh.db_upstream));

    // A header match.
    let canary = http_routes(
        "  - name: canary\n    pathRegex: /.*\n    methods: [\"*\"]\n    headers:\n      x-canary: \"^yes$\"\n",
    );
    apply(
        &mesh,
        "header",
        &format!(
            "{}{canary}{}",
            mesh_deny(),
            target("orders-to-web", "web", "HTTPRouteGroup", "web-routes")
        ),
    );
    assert_eq!(
        curl(a3, &["-H", "x-canary: yes", &format!("{web}/anything")]).0,
        200
    );
    assert_eq!(curl(a3, &[&format!("{web}/anything")]).0, 403);
    let why = mesh.cluster.agents[1]
        .cli_json(&[
            "why",
            "--from",
            "orders",
            "--to",
            "web",
            "--method",
            "GET",
            "--path",
            "/x",
            "--header",
            "x-canary: yes",
        ])
        .expect("weft why with a header");
    assert_eq!(why["decision"], "allow", "{why}");
    assert_eq!(
        why["rule"],
        "rules[0] HTTPRouteGroup web-routes match canary"
    );

    // A TCPRoute limits ports: the db port passes, another port is refused.
    let db_port = mesh.db_port;
    apply(
        &mesh,
        "tcp-allow",
        &format!(
            "{}{}{}",
            mesh_deny(),
            tcp_route(&db_port.to_string()),
            target("orders-to-db", "db", "TCPRoute", "db-ports")
        ),
    );
    assert!(db_echoes(mesh.db_upstream), "{}", mesh.cluster.logs());
    apply(
        &mesh,
        "tcp-other-port",
        &format!(
            "{}{}{}",
            mesh_deny(),
            tcp_route(&(db_port.wrapping_add(1)).to_string()),
            target("orders-to-db", "db", "TCPRoute", "db-ports")
        ),
    );
    assert!(!db_echoes(mesh.db_upstream));

    // Deleting the TrafficTarget refuses again.
    let last = apply(&mesh, "deleted", &mesh_deny());
    assert!(!db_echoes(mesh.db_upstream));
    assert_eq!(curl(a3, &[&format!("{web}/metrics")]).0, 403);

    // `weft why` names the decision and the rule.
    let a2 = &mesh.cluster.agents[1];
    let why = a2
        .cli_json(&[
            "why", "--from", "orders", "--to", "web", "--method", "GET", "--path", "/x",
        ])
        .expect("weft why");
    assert_eq!(why["decision"], "deny");
    assert_eq!(why["reason"], "default_deny");

    // Every member converged on the last version.
    let status = a3.cli_json(&["policy", "status"]).expect("policy status");
    let converged = wait_until(Duration::from_secs(5), || {
        a3.cli_json(&["policy", "status"])
            .is_ok_and(|s| s["converged"] == true && s["version"].as_u64() == Some(last))
    });
    assert!(converged.is_some(), "not converged: {status}");

    // Decisions are counted by decision and reason.
    assert!(
        a2.metric("weft_authz_decisions_total{decision=\"deny\",reason=\"default_deny\"}") >= 2.0
    );
    assert!(
        a2.metric("weft_authz_decisions_total{decision=\"allow\",reason=\"allowed_by_target\"}")
            >= 2.0
    );

    refused_bundles_leave_the_last_good_set(&mesh, last);
    restart_without_peers_enforces_the_persisted_bundle(mesh, last);
}

/// Tampered, replayed-older and invalid bundles are refused and counted; `last` stays.
fn refused_bundles_leave_the_last_good_set(mesh: &Mesh, last: u64) {
    let a1 = &mesh.cluster.agents[0];
    let policy_file = a1
        .dir
        .join(format!("{}-data", a1.spec.name))
        .join("policy.bundle");
    let good = std::fs::read(&policy_file).expect("a1 persisted the bundle");
    let post = |bytes: &[u8], name: &str| -> Output {
        let path = mesh.cluster.dir().join(name);
        std::fs::write(&path, bytes).expect("write bundle");
        Command::new("curl")
            .args(["--silent", "--max-time", "5", "--unix-socket"])
            .arg(a1.socket())
            .args(["-X", "POST", "--data-binary"])
            .arg(format!("@{}", path.display()))
            .args(["-w", "\n%{http_code}", "http://weft-admin/v1/policy"])
            .output()
            .expect("curl the admin socket")
    };
    // Tampered: one byte of the signed payload changed.
    let mut envelope: serde_json::Value = serde_json::from_slice(&good).expect("bundle JSON");
    let mut payload = envelope["payload"].as_str().expect("payload").to_string();
    let flip = payload.len() / 2;
    let replacement = if &payload[flip..flip + 1] == "A" {
        "B"
    } else {
        "A"
    };
    payload.replace_range(flip..flip + 1, replacement);
    envelope["payload"] = payload.into();
    let out = post(&serde_json::to_vec(&envelope).unwrap(), "tampered.bundle");
    assert!(
        output_text(&out).trim_end().ends_with("422"),
        "{}",
        output_text(&out)
    );
    assert!(
        a1.metric("weft_policy_bundles_total{reason=\"bad_signature\",result=\"refused\"}") >= 1.0
            || a1.metric("weft_policy_bundles_total{reason=\"malformed\",result=\"refused\"}")
                >= 1.0
    );
    // Replayed older: the first bundle this agent applied is kept by nobody, so sign an older
    // version explicitly with the real CLI.
    let dir = mesh.cluster.dir().join("policies").join("deny");
    let out = a1.cli(
        &[
            "policy",
            "apply",
            "-f",
            dir.to_str().unwrap(),
            "--policy-version",
            "1",
        ],
        Some(mesh.cluster.pki.operator_dir()),
    );
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("not higher than version"),
        "{}",
        output_text(&out)
    );
    // An invalid policy file: every error named, nothing published.
    let bad = mesh.cluster.dir().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {name: t}\nspec:\n  destination: {kind: ServiceAccount, name: web}\n  sources: []\n",
    )
    .unwrap();
    let out = a1.cli(
        &["policy", "apply", "-f", bad.to_str().unwrap()],
        Some(mesh.cluster.pki.operator_dir()),
    );
    assert!(!out.status.success());
    let text = output_text(&out);
    assert!(
        text.contains("bad.yaml:") && text.contains("nothing was published"),
        "{text}"
    );
    // Without the operator credential nothing is signed.
    let out = a1.cli(&["policy", "apply", "-f", dir.to_str().unwrap()], None);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("operator credential"),
        "{}",
        output_text(&out)
    );
    assert_eq!(a1.policy_version(), last);
}

/// With every peer gone, a restarted agent enforces the bundle it persisted.
fn restart_without_peers_enforces_the_persisted_bundle(mut mesh: Mesh, last: u64) {
    for i in [0, 2] {
        mesh.cluster.agents[i].kill9();
    }
    let a2 = &mut mesh.cluster.agents[1];
    a2.restart().expect("restart a2");
    let back = wait_until(Duration::from_secs(10), || a2.policy_version() == last);
    assert!(
        back.is_some(),
        "a2 did not load the persisted bundle\n{}",
        a2.log()
    );
    let why = a2
        .cli_json(&["why", "--from", "orders", "--to", "db", "--port", "1"])
        .expect("weft why");
    assert_eq!(why["decision"], "deny");
    assert_eq!(why["policy_version"].as_u64(), Some(last));
}
