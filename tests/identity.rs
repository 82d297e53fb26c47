//! Identities across real agent processes on 127.0.0.1: three CA hosts and three agents get
//! node and service SVIDs; renewals fail over when a CA host dies; with every CA host down the
//! agents keep what they hold (and stay ready) while renewal errors are counted; renewals
//! resume when a CA host returns; a restarted agent needs no token; a CA host's node scope
//! follows services added by restart or SIGHUP. Times are printed.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use weft_tests::agent::{
    AgentSpec, Cluster, Pki, TOKEN_SCOPE, TestAgent, free_port, gossip_keygen, http_get,
    service_table, take_turn, upstream_table, wait_until, write_keyring,
};
use weft_tests::http_backend::Backend;

/// Service SVID lifetime in these tests: renewals every ~10 s.
const SVID_TTL: &str = "20s";

struct Mesh {
    cas: Vec<TestAgent>,
    agents: Vec<TestAgent>,
    _dir: tempfile::TempDir,
}

impl Mesh {
    fn start(ca_hosts: usize, agents: usize) -> Mesh {
        let dir = tempfile::Builder::new()
            .prefix("weft-id-")
            .tempdir()
            .unwrap();
        let keyring = write_keyring(dir.path(), "gossip.keys", &[gossip_keygen()]);
        let pki = Pki::new(dir.path());
        let mut specs: Vec<AgentSpec> = (1..=ca_hosts)
            .map(|i| {
                let mut spec = AgentSpec::loopback(&format!("c{i}"), &keyring, &pki);
                spec.ca = Some(pki.intermediate(&spec.name));
                spec
            })
            .collect();
        let services = ["api", "db", "web"];
        for i in 1..=agents {
            let mut spec = AgentSpec::loopback(&format!("a{i}"), &keyring, &pki);
            let token = dir.path().join(format!("a{i}.token"));
            pki.write_token(&token, &spec.name, TOKEN_SCOPE, Duration::from_secs(3600));
            spec.join_token = Some(token);
            spec.svid_ttl = SVID_TTL.into();
            spec.extra = format!(
                "[[service]]\nname = \"{}\"\nport = {}\n",
                services[(i - 1) % 3],
                18_000 + i
            );
            specs.push(spec);
        }
        let seeds: Vec<String> = specs[..ca_hosts]
            .iter()
            .map(AgentSpec::gossip_addr)
            .collect();
        for spec in &mut specs {
            spec.seeds = seeds.clone();
        }
        let mut started: Vec<TestAgent> = specs
            .into_iter()
            .map(|spec| TestAgent::start(spec, dir.path(), &[]).unwrap())
            .collect();
        let agents = started.split_off(ca_hosts);
        Mesh {
            cas: started,
            agents,
            _dir: dir,
        }
    }

    fn logs(&self) -> String {
        self.cas
            .iter()
            .chain(&self.agents)
            .map(|a| format!("----- {} -----\n{}", a.spec.name, a.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn ready(agent: &TestAgent) -> bool {
    agent
        .http_get("/ready")
        .is_ok_and(|(status, _)| status == 200)
}

fn certs(agent: &TestAgent) -> Value {
    agent.cli_json(&["certs"]).unwrap_or(Value::Null)
}

/// Serial of the identity of `kind` (`node` or `service`) an agent holds.
fn serial(agent: &TestAgent, kind: &str) -> Option<String> {
    certs(agent)["identities"]
        .as_array()?
        .iter()
        .find(|i| i["kind"] == kind)
        .and_then(|i| i["serial"].as_str().map(String::from))
}

fn renewals(agent: &TestAgent, result: &str) -> f64 {
    agent.metric(&format!(
        "weft_identity_renewals_total{{kind=\"service\",result=\"{result}\"}}"
    ))
}

#[test]
fn three_ca_hosts_issue_and_renewals_survive_ca_loss() {
    let mut mesh = Mesh::start(3, 3);
    let took = wait_until(Duration::from_secs(15), || {
        mesh.cas.iter().chain(&mesh.agents).all(ready)
    })
    .unwrap_or_else(|| panic!("not every host got its identities\n{}", mesh.logs()));
    println!("3 CA hosts and 3 agents hold node and service identities after {took:?}");
    // Ready needs one CA host; the others are learnt by gossip, which a loaded machine slows.
    let ca_hosts = |a: &TestAgent| certs(a)["ca_hosts"].as_array().map_or(0, Vec::len);
    wait_until(Duration::from_secs(15), || {
        mesh.agents.iter().all(|a| ca_hosts(a) == 3)
    })
    .unwrap_or_else(|| panic!("not every agent sees the 3 CA hosts\n{}", mesh.logs()));
    for agent in &mesh.agents {
        let report = certs(agent);
        let ids: Vec<&str> = report["identities"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i["id"].as_str())
            .collect();
        assert!(
            ids.contains(&format!("spiffe://test.weft/node/{}", agent.spec.name).as_str()),
            "{ids:?}"
        );
        assert_eq!(ids.len(), 2, "{ids:?}");
        let key = agent
            .dir
            .join(format!("{}-data", agent.spec.name))
            .join("node.key");
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600,
            "{}",
            key.display()
        );
    }

    // One CA host dies: every agent's next renewal still succeeds, through the others.
    mesh.cas[0].kill9();
    let before: Vec<_> = mesh.agents.iter().map(|a| serial(a, "service")).collect();
    let took = wait_until(Duration::from_secs(30), || {
        mesh.agents
            .iter()
            .zip(&before)
            .all(|(a, old)| serial(a, "service").is_some_and(|s| Some(&s) != old.as_ref()))
    })
    .unwrap_or_else(|| panic!("renewals did not fail over after c1 died\n{}", mesh.logs()));
    println!("with c1 killed, every agent renewed its service SVID within {took:?}");
    assert!(mesh.agents.iter().all(ready));

    // Every CA host dies: agents keep what they hold and stay ready; renewal errors are counted
    // and the expiry gauge stops moving (the clock runs toward it).
    mesh.cas[1].kill9();
    mesh.cas[2].kill9();
    let errors_before: Vec<f64> = mesh.agents.iter().map(|a| renewals(a, "error")).collect();
    let expiry = |a: &TestAgent| {
        let id = format!("spiffe://test.weft/node/{}", a.spec.name);
        a.metric(&format!(
            "weft_certificate_not_after_seconds{{identity=\"{id}\"}}"
        ))
    };
    let node_expiry: Vec<f64> = mesh.agents.iter().map(expiry).collect();
    let took = wait_until(Duration::from_secs(20), || {
        mesh.agents
            .iter()
            .zip(&errors_before)
            .all(|(a, before)| renewals(a, "error") > *before)
    })
    .unwrap_or_else(|| {
        panic!(
            "no renewal error was counted with every CA host down\n{}",
            mesh.logs()
        )
    });
    println!(
        "with every CA host down, each agent counted a failed renewal within {took:?} and stays ready"
    );
    assert!(
        mesh.agents.iter().all(ready),
        "agents must keep serving on what they hold"
    );
    assert_eq!(
        mesh.agents.iter().map(expiry).collect::<Vec<_>>(),
        node_expiry
    );

    // A CA host comes back: renewals resume by themselves.
    mesh.cas[1].restart().unwrap();
    let ok_before: Vec<f64> = mesh.agents.iter().map(|a| renewals(a, "ok")).collect();
    let took = wait_until(Duration::from_secs(40), || {
        mesh.agents
            .iter()
            .zip(&ok_before)
            .all(|(a, before)| renewals(a, "ok") > *before)
    })
    .unwrap_or_else(|| {
        panic!(
            "renewals did not resume after c2 came back\n{}",
            mesh.logs()
        )
    });
    println!("after c2 restarted, every agent renewed again within {took:?}");
    assert!(
        wait_until(Duration::from_secs(10), || mesh.agents.iter().all(ready)).is_some(),
        "{}",
        mesh.logs()
    );
}

#[test]
fn restarted_agent_keeps_its_identity_without_the_token() {
    let mut mesh = Mesh::start(1, 1);
    assert!(
        wait_until(Duration::from_secs(15), || ready(&mesh.agents[0])).is_some(),
        "agent never ready\n{}",
        mesh.logs()
    );
    let node_serial = serial(&mesh.agents[0], "node").unwrap();
    let issued = mesh.cas[0].metric("weft_ca_issued_total{kind=\"node\",result=\"ok\"}");
    assert_eq!(issued, 1.0);

    // The token is gone (as if it expired and was cleaned up); the agent restarts.
    let token = mesh.agents[0].spec.join_token.clone().unwrap();
    std::fs::remove_file(&token).unwrap();
    mesh.agents[0].restart().unwrap();
    let took = wait_until(Duration::from_secs(10), || ready(&mesh.agents[0]))
        .unwrap_or_else(|| panic!("restarted agent not ready\n{}", mesh.logs()));
    println!("restarted agent ready again in {took:?} with the identity from data_dir");
    assert_eq!(
        serial(&mesh.agents[0], "node").as_deref(),
        Some(node_serial.as_str())
    );
    assert_eq!(
        mesh.cas[0].metric("weft_ca_issued_total{kind=\"node\",result=\"ok\"}"),
        1.0,
        "no new node SVID was needed"
    );
}

#[test]
fn sighup_trusts_a_second_root_and_refuses_a_bad_bundle() {
    let mesh = Mesh::start(1, 1);
    let agent = &mesh.agents[0];
    assert!(
        wait_until(Duration::from_secs(15), || ready(agent)).is_some(),
        "{}",
        mesh.logs()
    );
    let bundle = agent.spec.trust_bundle.clone();
    let old_root = std::fs::read_to_string(&bundle).unwrap();

    // Root rotation, step 1: the new root is trusted beside the old one.
    let next = tempfile::tempdir().unwrap();
    let new_root = std::fs::read_to_string(Pki::new(next.path()).bundle()).unwrap();
    std::fs::write(&bundle, format!("{old_root}{new_root}")).unwrap();
    agent.sighup();
    assert!(
        wait_until(Duration::from_secs(5), || agent
            .metric("weft_config_reloads_total{result=\"ok\"}")
            == 1.0)
        .is_some(),
        "{}",
        agent.log()
    );
    assert!(
        agent.log().contains("trust bundle changed"),
        "{}",
        agent.log()
    );
    assert_eq!(certs(agent)["roots"].as_array().map(Vec::len), Some(2));

    // A corrupt bundle is refused as a whole; the running one stays.
    std::fs::write(
        &bundle,
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    agent.sighup();
    assert!(
        wait_until(Duration::from_secs(5), || agent
            .metric("weft_config_reloads_total{result=\"error\"}")
            == 1.0)
        .is_some(),
        "{}",
        agent.log()
    );
    assert!(agent.log().contains("bad trust bundle"), "{}", agent.log());
    assert_eq!(certs(agent)["roots"].as_array().map(Vec::len), Some(2));
    assert!(ready(agent));
}

/// How the CA host is told about its new service.
#[derive(Clone, Copy, Debug)]
enum Apply {
    /// Restart: the node SVID stored in data_dir is found with the old scope.
    Restart,
    /// SIGHUP: the node SVID held in memory has the old scope.
    Reload,
}

/// The node scope of the node SVID `agent` holds (`weft certs`).
fn node_scope(agent: &TestAgent) -> Vec<String> {
    certs(agent)["identities"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["kind"] == "node")
        .and_then(|i| i["scope"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(String::from))
        .collect()
}

/// The backend name answered through the upstream listener on 127.0.0.1:`port`, if any.
fn through(port: u16) -> Option<String> {
    match http_get(SocketAddr::from(([127, 0, 0, 1], port)), "/") {
        Ok((200, body)) => Some(body),
        _ => None,
    }
}

/// Polls [`through`] gently (every refused attempt is logged) until `port` answers, for at most
/// `within`; returns the time it took.
fn flows(port: u16, within: Duration) -> Option<Duration> {
    wait_until(within, || {
        through(port).is_some() || {
            std::thread::sleep(Duration::from_millis(200));
            false
        }
    })
}

/// The scope tests take turns: each starts three agents, on ports picked by [`free_port`].
static SCOPE_TURN: Mutex<()> = Mutex::new(());

/// A CA host (a1) serves `api`, which a2 uses through an upstream (so a2 pools a tunnel to
/// a1); a3 has not talked to a1. Then `orders` is added to a1's config (applied by `apply`)
/// and upstreams for it to a2's and a3's (by SIGHUP). a1 must reissue its own node SVID so its
/// scope lists `orders`; otherwise peers refuse to send it `orders` traffic ("not entitled to
/// serve") until the node SVID is renewed weeks later. Checks that `orders` traffic flows from
/// each agent of `clients` (1 = a2, 2 = a3) within 15 s.
fn ca_host_scope_follows_its_services(apply: Apply, clients: &[usize]) {
    let _turn = take_turn(&SCOPE_TURN);
    let api = Backend::start("api");
    let orders = Backend::start("orders");
    let api_up = free_port();
    let orders_up = [free_port(), free_port()];
    let mut cluster = Cluster::start(3, |spec| {
        spec.extra = match spec.name.as_str() {
            "a1" => service_table("api", api.port, "tcp"),
            "a2" => upstream_table("api", api_up),
            _ => String::new(),
        }
    })
    .expect("start agents");
    let within = Duration::from_secs(15);
    wait_until(within, || cluster.all_ready())
        .unwrap_or_else(|| panic!("agents not ready within {within:?}\n{}", cluster.logs()));
    flows(api_up, within)
        .unwrap_or_else(|| panic!("no api traffic within {within:?}\n{}", cluster.logs()));
    assert_eq!(through(api_up).as_deref(), Some("api"));
    assert_eq!(node_scope(&cluster.agents[0]), ["default/api"]);
    let node_serial = serial(&cluster.agents[0], "node");

    let dir = cluster.dir().to_path_buf();
    let b = &mut cluster.agents[0];
    b.spec.extra += &service_table("orders", orders.port, "tcp");
    b.write_config(&b.spec.config_text(&dir)).unwrap();
    match apply {
        Apply::Restart => {
            // As `systemctl restart` does: a graceful stop, then a new process.
            b.sigterm();
            b.wait_exit(Duration::from_secs(15)).unwrap();
            b.restart().unwrap();
        }
        Apply::Reload => b.sighup(),
    }
    for (a, port) in cluster.agents[1..].iter_mut().zip(orders_up) {
        a.spec.extra += &upstream_table("orders", port);
        a.write_config(&a.spec.config_text(&dir)).unwrap();
        a.sighup();
    }

    let b = &cluster.agents[0];
    let wanted = ["default/api", "default/orders"];
    wait_until(within, || node_scope(b) == wanted).unwrap_or_else(|| {
        panic!(
            "after {apply:?}, a1's node scope is {:?}\n{}",
            node_scope(b),
            cluster.logs()
        )
    });
    assert_ne!(serial(b, "node"), node_serial, "the node SVID was reissued");
    for &client in clients {
        let name = &cluster.agents[client].spec.name;
        let port = orders_up[client - 1];
        let took = flows(port, within).unwrap_or_else(|| {
            panic!(
                "after {apply:?} of a1 with a new service, no orders traffic from {name} within {within:?}\n{}",
                cluster.logs()
            )
        });
        println!("after {apply:?} of the CA host, {name} reaches its new service in {took:?}");
        assert_eq!(through(port).as_deref(), Some("orders"));
    }
    assert_eq!(through(api_up).as_deref(), Some("api"));
    // a2's replaced tunnel (reload) carries no stream any more, so it closes: one tunnel left.
    let a2 = &cluster.agents[1];
    wait_until(within, || a2.metric("weft_tunnels_open") == 1.0).unwrap_or_else(|| {
        panic!(
            "a2 has {} tunnels open, expected 1\n{}",
            a2.metric("weft_tunnels_open"),
            cluster.logs()
        )
    });
}

/// Guards the startup path: a CA host restarted with a service added to its config reissues
/// the node SVID it finds in data_dir, so peers accept it as an endpoint of the new service.
#[test]
fn ca_host_restarted_with_a_new_service_reissues_its_node_scope() {
    ca_host_scope_follows_its_services(Apply::Restart, &[1, 2]);
}

/// Guards the reload path: a CA host given a new service by SIGHUP reissues the node SVID it
/// holds, so peers accept it as an endpoint of the new service: a3 with a new tunnel, and a2,
/// whose pooled tunnel still shows the old scope, by replacing that tunnel.
#[test]
fn ca_host_reloaded_with_a_new_service_reissues_its_node_scope() {
    ca_host_scope_follows_its_services(Apply::Reload, &[1, 2]);
}
