//! `weft demo`: three agents on loopback in one process, with demo services, printing the
//! members and the catalog as they converge, the identities they get, traffic through the
//! mesh, and a signed policy taking effect, then staying up until Ctrl-C.
//!
//! Everything it creates lives in one temporary directory that is removed on exit.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use weft_discovery::{Catalog, GossipKey};

use crate::agent::{Agent, Control};
use crate::config::Config;

/// `weft demo` options.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// First port of the block the demo uses (it needs 40 ports from here).
    #[arg(long, default_value_t = 17400)]
    pub base_port: u16,
}

const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];
/// Offset of node-1's upstream listener to `api` in the demo's port block.
const API_UPSTREAM: u16 = 35;
/// Offset of node-1's upstream listener to `db`.
const DB_UPSTREAM: u16 = 36;

/// Sends requests through the mesh from node-1 and shows the answers, their latency, and the
/// metric lines that counted them.
async fn show_traffic(base: u16, node1: &crate::agent::Shared) {
    println!("\nTraffic through the mesh (mTLS QUIC tunnels between agents):");
    let mut latencies = Vec::new();
    let mut first = None;
    for _ in 0..20 {
        let started = Instant::now();
        match http_get(("127.0.0.1", base + API_UPSTREAM)).await {
            Ok(body) => {
                latencies.push(started.elapsed());
                first.get_or_insert(body);
            }
            Err(e) => println!("  request failed: {e}"),
        }
    }
    latencies.sort();
    if let (Some(body), Some(p50), Some(max)) =
        (first, latencies.get(latencies.len() / 2), latencies.last())
    {
        println!(
            "  node-1 -> api on node-2: {} HTTP requests, answer {:?}, p50 {:.2} ms, max {:.2} ms",
            latencies.len(),
            body.trim(),
            p50.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3
        );
    }
    match echo(("127.0.0.1", base + DB_UPSTREAM), b"hello through the mesh").await {
        Ok(reply) => println!(
            "  node-1 -> db on node-3 (TCP echo): {:?}",
            String::from_utf8_lossy(&reply)
        ),
        Err(e) => println!("  echo failed: {e}"),
    }
    println!("  node-1's metrics that counted them:");
    for line in node1.metrics.render().lines().filter(|l| {
        l.starts_with("weft_tcp_open_total")
            || l.starts_with("weft_tunnel_handshakes_total")
            || l.starts_with("weft_tunnels_open")
    }) {
        println!("    {line}");
    }
}

/// The demo's policy: closed by default, `web` (node-1) may GET `/` on `api`; nothing may
/// reach `db`.
const DEMO_POLICY: &str = "apiVersion: weft.io/v1alpha1
kind: Mesh
metadata: {name: mesh}
spec: {default: deny}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: api-routes, namespace: default}
spec:
  matches:
  - name: root
    pathRegex: /
    methods: [GET]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: web-to-api, namespace: default}
spec:
  destination: {kind: ServiceAccount, name: api, namespace: default}
  rules:
  - kind: HTTPRouteGroup
    name: api-routes
  sources:
  - {kind: ServiceAccount, name: web, namespace: default}
";

/// Publishes [`DEMO_POLICY`] on node-1 as `weft policy apply` would, waits until every agent
/// enforces it, and shows its effect.
async fn show_policy(
    base: u16,
    operator: &weft_ca::OperatorCredential,
    shared: &[std::sync::Arc<crate::agent::Shared>],
) -> anyhow::Result<()> {
    println!("\nPolicy: default deny; web may GET / on api; nothing may reach db.");
    let signer = operator.signer(std::time::SystemTime::now())?;
    let files = vec![crate::policy::bundle::PolicyFile {
        name: "demo-policy.yaml".into(),
        text: DEMO_POLICY.into(),
    }];
    let bytes =
        crate::policy::bundle::sign(crate::policy::bundle::PolicyFiles { files }, 1, &signer)?;
    let started = Instant::now();
    shared[0].policy.offer(&bytes, "weft demo")?;
    let deadline = started + Duration::from_secs(5);
    while shared.iter().any(|s| s.policy.active().version() != 1) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "  signed by {}, applied on node-1, in force on all 3 agents after {} ms (spread by gossip, fetched over QUIC)",
        signer.id(),
        started.elapsed().as_millis()
    );
    match http_get(("127.0.0.1", base + API_UPSTREAM)).await {
        Ok(body) => println!("  node-1 (web) -> api GET /: {:?}", body.trim()),
        Err(e) => println!("  node-1 (web) -> api GET /: failed: {e}"),
    }
    match echo(("127.0.0.1", base + DB_UPSTREAM), b"hello").await {
        Ok(reply) if reply.is_empty() => {
            println!("  node-1 (web) -> db: closed by node-3 (denied, default_deny)")
        }
        Ok(reply) => println!(
            "  node-1 (web) -> db: {:?} (unexpected)",
            String::from_utf8_lossy(&reply)
        ),
        Err(e) => {
            println!("  node-1 (web) -> db: {e}: node-3 denied it (default_deny), as logged above")
        }
    }
    println!("  node-3's decisions:");
    for line in shared[2]
        .metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("weft_authz_decisions_total") && !l.ends_with(" 0"))
    {
        println!("    {line}");
    }
    Ok(())
}

/// One HTTP/1.1 GET of `/` with `Connection: close`; returns the body.
async fn http_get(addr: (&str, u16)) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: api.weft\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response).into_owned();
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or(text))
}

/// Sends `message`, half-closes, and returns what comes back.
async fn echo(addr: (&str, u16), message: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(message).await?;
    stream.shutdown().await?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await?;
    Ok(reply)
}

/// Runs the demo until Ctrl-C.
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(demo(args.base_port))
}

async fn demo(base: u16) -> anyhow::Result<()> {
    let _ = crate::telemetry::init("warn", crate::config::LogFormat::Text);
    let dir = tempfile::Builder::new().prefix("weft-demo-").tempdir()?;
    let keyring = dir.path().join("gossip.keys");
    std::fs::write(&keyring, format!("{}\n", GossipKey::generate().to_base64()))?;
    std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o600))?;

    // A real PKI, as an operator makes it: root and operator credential, an intermediate for
    // the CA host node-1, and join tokens for node-2 and node-3.
    let td = weft_ca::TrustDomain::new("demo.weft")?;
    let pki = dir.path().join("pki");
    weft_ca::pki::init(&td, "demo", &pki)?;
    weft_ca::pki::intermediate(&td, &pki, NODES[0], &dir.path().join("ca"))?;
    let operator = weft_ca::OperatorCredential::load(&pki)?;

    let web = serve_demo_http(base + 31, "hello from web on node-1\n").await?;
    let api = serve_demo_http(base + 32, "hello from api on node-2\n").await?;
    let db = serve_echo(base + 33).await?;
    let apps = [
        ("web", "http", web, "http = \"/healthz\""),
        ("api", "http", api, "http = \"/healthz\""),
        ("db", "tcp", db, "tcp = true"),
    ];

    println!(
        "Weft demo: 3 agents on 127.0.0.1, gossip sealed with a fresh key, node-1 a CA host, files in {}",
        dir.path().display()
    );
    let started = Instant::now();
    let mut controls = Vec::new();
    let mut tasks = Vec::new();
    let mut first_catalog = None;
    let mut shared = Vec::new();
    for (i, node) in NODES.iter().enumerate() {
        let port = |offset: u16| base + (i as u16) * 10 + offset;
        let (service, protocol, addr, check) = apps[i];
        let token = dir.path().join(format!("{node}.token"));
        let ca_section = if i == 0 {
            format!(
                "[ca]\nenabled = true\ncert = \"{0}/ca/ca.pem\"\nkey = \"{0}/ca/ca.key\"\n\n",
                dir.path().display()
            )
        } else {
            let services = [format!("default/{service}")];
            std::fs::write(
                &token,
                operator.create_token(node, &services, Duration::from_secs(600))?,
            )?;
            String::new()
        };
        let text = format!(
            "[node]\nname = \"{node}\"\ntrust_domain = \"demo.weft\"\ndata_dir = \"{dir}/{node}\"\nlabels = {{ zone = \"zone-{zone}\" }}\n\n\
             [gossip]\nbind = \"127.0.0.1:{gossip}\"\nseeds = [\"127.0.0.1:{seed}\"]\nkeyring = \"{keyring}\"\ninterval = \"200ms\"\n\n\
             [tunnel]\nbind = \"127.0.0.1:{tunnel}\"\n\n[admin]\nsocket = \"{dir}/{node}.sock\"\nhttp = \"127.0.0.1:{http}\"\n\n\
             [outbound]\nhttp_proxy = \"127.0.0.1:{proxy}\"\n\n\
             [identity]\ntrust_bundle = \"{dir}/pki/root.pem\"\njoin_token = \"{token}\"\n\n{ca_section}{upstreams}\
             [[service]]\nname = \"{service}\"\nport = {app_port}\nprotocol = \"{protocol}\"\ncheck = {{ {check}, interval = \"1s\", timeout = \"500ms\" }}\n",
            dir = dir.path().display(),
            zone = i % 2 + 1,
            gossip = port(1),
            seed = base + 1,
            keyring = keyring.display(),
            tunnel = port(2),
            http = port(0),
            proxy = port(3),
            upstreams = if i == 0 {
                format!(
                    "[[upstream]]\nservice = \"api\"\nlisten = \"127.0.0.1:{}\"\n\n[[upstream]]\nservice = \"db\"\nlisten = \"127.0.0.1:{}\"\n\n",
                    base + API_UPSTREAM,
                    base + DB_UPSTREAM
                )
            } else {
                String::new()
            },
            app_port = addr.port(),
            token = token.display(),
        );
        let path = dir.path().join(format!("{node}.toml"));
        std::fs::write(&path, text)?;
        let config = Config::load(&path)?;
        let agent = Agent::start(config, None).await.with_context(|| {
            format!(
                "failed to start {node} (is port block {base}..{} free? try --base-port)",
                base + 40
            )
        })?;
        if first_catalog.is_none() {
            first_catalog = Some(agent.shared().catalog.clone());
        }
        shared.push(agent.shared());
        let (control, control_rx) = mpsc::channel(2);
        controls.push(control);
        tasks.push(tokio::spawn(agent.run(control_rx)));
    }

    let mut catalog = first_catalog.expect("three agents started");
    let mut converged = false;
    let mut identified = false;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut last_shown = String::new();
    loop {
        let shown = render(&catalog.current());
        if shown != last_shown {
            println!(
                "\n[+{:>5} ms] as node-1 sees the mesh:\n{shown}",
                started.elapsed().as_millis()
            );
            last_shown = shown;
        }
        if !identified && shared.iter().all(|s| s.is_ready()) {
            identified = true;
            println!(
                "\n[+{:>5} ms] every agent holds its SPIFFE identities (node-1 issued them):",
                started.elapsed().as_millis()
            );
            for agent in &shared {
                let ids = agent.identities.load();
                for svid in ids.node.iter().chain(ids.services.values()) {
                    println!(
                        "  {:<42} expires {}",
                        svid.id.to_string(),
                        weft_ca::verify::format_utc(svid.not_after)
                    );
                }
            }
        }
        if !converged && identified && is_converged(&catalog.current()) {
            converged = true;
            println!(
                "converged in {} ms: 3 members alive, 3 services passing.",
                started.elapsed().as_millis()
            );
            show_traffic(base, &shared[0]).await;
            if let Err(e) = show_policy(base, &operator, &shared).await {
                println!("  policy step failed: {e:#}");
            }
            println!("\nTry, in another terminal:");
            println!(
                "  curl -s 127.0.0.1:{}/                     # node-1's upstream to api (on node-2)",
                base + API_UPSTREAM
            );
            println!(
                "  curl -s -x http://127.0.0.1:{} http://api.weft/   # node-1's HTTP proxy",
                base + 3
            );
            println!(
                "  echo hello | socat - TCP:127.0.0.1:{}     # node-1's upstream to db (TCP echo on node-3)",
                base + DB_UPSTREAM
            );
            println!(
                "  weft members --socket {}/node-1.sock",
                dir.path().display()
            );
            println!(
                "  weft services --socket {}/node-2.sock",
                dir.path().display()
            );
            println!(
                "  weft gossip keys --socket {}/node-3.sock",
                dir.path().display()
            );
            println!("  weft certs --socket {}/node-2.sock", dir.path().display());
            println!(
                "  weft policy status --socket {}/node-2.sock",
                dir.path().display()
            );
            println!(
                "  weft why --socket {}/node-2.sock --from web --to api --method POST --path /",
                dir.path().display()
            );
            println!("  curl -s 127.0.0.1:{base}/metrics | grep -E 'weft_gossip_members|weft_ca_'");
            println!(
                "Press Ctrl-C to stop (the agents leave gracefully and {} is removed).",
                dir.path().display()
            );
            let _ = std::io::stdout().flush();
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            changed = catalog.changed() => if changed.is_err() { break },
            _ = tick.tick(), if !identified => {}
        }
    }
    println!("\nstopping: each agent announces it is leaving");
    for control in &controls {
        let _ = control.send(Control::Stop).await;
    }
    for task in tasks {
        let _ = task.await;
    }
    dir.close()?;
    println!("stopped; removed the demo directory");
    Ok(())
}

fn is_converged(catalog: &Catalog) -> bool {
    let [alive, ..] = catalog.member_counts();
    alive == NODES.len()
        && catalog.services.len() == 3
        && catalog
            .services
            .values()
            .all(|eps| eps.iter().any(|e| e.is_routable()))
}

fn render(catalog: &Catalog) -> String {
    let mut out = String::new();
    for member in catalog.members.values() {
        let zone = member
            .record
            .as_ref()
            .and_then(|r| r.labels.get("zone").cloned())
            .unwrap_or_default();
        out.push_str(&format!(
            "  member  {:<8} {:<8} {}\n",
            member.name,
            member.state.as_str(),
            zone
        ));
    }
    let services: BTreeMap<_, _> = catalog.services.iter().collect();
    for (service, endpoints) in services {
        for e in endpoints {
            out.push_str(&format!(
                "  service {:<12} on {:<8} {:<5} {}\n",
                service.to_string(),
                e.node,
                e.protocol.to_string(),
                e.health
            ));
        }
    }
    out
}

/// A tiny HTTP/1.1 server answering every request with `body` (and `/healthz` with 200).
async fn serve_demo_http(port: u16, body: &'static str) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("demo app port {port} is busy; try --base-port"))?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(body.as_bytes())),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// A TCP echo server.
async fn serve_echo(port: u16) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("demo app port {port} is busy; try --base-port"))?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}
