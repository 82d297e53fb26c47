//! Five real `weft agent` processes on 127.0.0.1: convergence, service changes by SIGHUP,
//! kill -9, graceful leave, restart, wrong gossip key, key rotation, health checks, garbage
//! collection of dead members, and bad gossip datagrams. Times are measured and printed.

use std::net::UdpSocket;
use std::time::Duration;

use weft_tests::agent::{AgentSpec, Cluster, TestAgent, gossip_keygen, wait_until, write_keyring};

const ALL: [usize; 5] = [0, 1, 2, 3, 4];

fn five() -> Cluster {
    Cluster::start(5, |_| {}).expect("start five agents")
}

fn converge(cluster: &Cluster, within: Duration) -> Duration {
    let names = cluster.names();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let observers: Vec<usize> = (0..cluster.agents.len()).collect();
    wait_until(within, || cluster.all_see_alive(&observers, &names)).unwrap_or_else(|| {
        panic!(
            "agents did not all see each other within {within:?}\n{}",
            cluster.logs()
        )
    })
}

#[test]
fn five_agents_see_each_other_within_3s() {
    let cluster = five();
    let took = converge(&cluster, Duration::from_secs(3));
    println!("five agents converged in {took:?}");
    let ready = wait_until(Duration::from_secs(5), || cluster.all_ready()).unwrap_or_else(|| {
        panic!(
            "not every agent became ready (identities)\n{}",
            cluster.logs()
        )
    });
    println!("all five ready (node identities issued by a1) {ready:?} after convergence");
    for agent in &cluster.agents {
        assert_eq!(agent.http_get("/live").unwrap().0, 200);
        assert_eq!(agent.metric("weft_gossip_members{state=\"alive\"}"), 5.0);
    }
}

#[test]
fn service_added_by_sighup_is_in_every_catalog_within_2s() {
    let cluster = five();
    converge(&cluster, Duration::from_secs(5));
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = echo.local_addr().unwrap().port();
    let a3 = &cluster.agents[2];
    let text = a3.spec.config_text(cluster.dir())
        + &format!(
            "[[service]]\nname = \"orders\"\nport = {port}\ncheck = {{ tcp = true, interval = \"1s\", timeout = \"500ms\" }}\n"
        );
    a3.write_config(&text).unwrap();
    a3.sighup();
    let took = wait_until(Duration::from_secs(2), || {
        cluster
            .agents
            .iter()
            .all(|a| a.endpoints("default/orders") == [("a3".to_string(), "passing".to_string())])
    })
    .unwrap_or_else(|| panic!("orders not in every catalog within 2s\n{}", cluster.logs()));
    println!("service added by SIGHUP reached all 5 catalogs in {took:?}");
    assert_eq!(a3.metric("weft_config_reloads_total{result=\"ok\"}"), 1.0);

    // A bad config is refused and the running one stays: the service is still published.
    a3.write_config("[node]\nname = \"a3\"\nbogus = 1\n")
        .unwrap();
    a3.sighup();
    assert!(
        wait_until(Duration::from_secs(2), || a3
            .metric("weft_config_reloads_total{result=\"error\"}")
            == 1.0)
        .is_some()
    );
    assert!(a3.log().contains("config reload refused"), "{}", a3.log());
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(cluster.agents[0].endpoints("default/orders").len(), 1);
    drop(echo);
}

#[test]
fn kill_9_is_seen_dead_by_all_within_5s() {
    let mut cluster = five();
    converge(&cluster, Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(2)); // let the failure detector learn real intervals
    cluster.agents[4].kill9();
    let took = wait_until(Duration::from_secs(5), || {
        cluster.agents[..4]
            .iter()
            .all(|a| a.state_of("a5").as_deref() == Some("dead"))
    })
    .unwrap_or_else(|| panic!("a5 not dead everywhere within 5s\n{}", cluster.logs()));
    println!("kill -9 detected as dead by all 4 others in {took:?}");
    assert_eq!(
        cluster.agents[0].metric("weft_gossip_members{state=\"dead\"}"),
        1.0
    );
}

/// Waits until every agent lists every member with a verified identity: only then can a
/// member's signed records (such as `left`) reach every catalog.
fn verified_everywhere(cluster: &Cluster) {
    let names = cluster.names();
    let all_verified = |agent: &weft_tests::agent::TestAgent| {
        agent.cli_json(&["members"]).is_ok_and(|members| {
            names.iter().all(|name| {
                members.as_array().is_some_and(|list| {
                    list.iter()
                        .any(|m| m["name"] == name.as_str() && !m["identity"].is_null())
                })
            })
        })
    };
    wait_until(Duration::from_secs(15), || {
        cluster.agents.iter().all(&all_verified)
    })
    .unwrap_or_else(|| panic!("not every member verified everywhere\n{}", cluster.logs()));
}

#[test]
fn sigterm_is_seen_left_within_1s() {
    let mut cluster = five();
    converge(&cluster, Duration::from_secs(5));
    verified_everywhere(&cluster);
    cluster.agents[3].sigterm();
    let took = wait_until(Duration::from_secs(1), || {
        ALL.iter()
            .filter(|&&i| i != 3)
            .all(|&i| cluster.agents[i].state_of("a4").as_deref() == Some("left"))
    })
    .unwrap_or_else(|| panic!("a4 not left everywhere within 1s\n{}", cluster.logs()));
    println!("SIGTERM seen as left by all 4 others in {took:?}");
    assert_eq!(
        cluster.agents[3].wait_exit(Duration::from_secs(5)).unwrap(),
        Some(0)
    );
}

#[test]
fn restarted_agent_is_one_live_member_again() {
    let mut cluster = five();
    converge(&cluster, Duration::from_secs(5));
    cluster.agents[1].restart().unwrap();
    let took = wait_until(Duration::from_secs(5), || {
        ALL.iter().all(|&i| {
            cluster.agents[i].member_states().is_ok_and(|states| {
                states.len() == 5
                    && states
                        .iter()
                        .filter(|(n, s)| n == "a2" && s == "alive")
                        .count()
                        == 1
            })
        })
    })
    .unwrap_or_else(|| {
        panic!(
            "restarted a2 is not exactly one live member everywhere\n{}",
            cluster.logs()
        )
    });
    println!("restarted agent is one live member everywhere after {took:?}");
}

#[test]
fn dead_members_are_garbage_collected() {
    let mut cluster = Cluster::start(3, |spec| spec.dead_grace = "4s".into()).unwrap();
    converge(&cluster, Duration::from_secs(5));
    cluster.agents[2].kill9();
    assert!(
        wait_until(Duration::from_secs(5), || cluster.agents[0]
            .state_of("a3")
            .as_deref()
            == Some("dead"))
        .is_some()
    );
    let took = wait_until(Duration::from_secs(10), || {
        cluster.agents[..2]
            .iter()
            .all(|a| a.member_states().is_ok_and(|s| s.len() == 2))
    })
    .unwrap_or_else(|| {
        panic!(
            "dead a3 was not forgotten after its grace period\n{}",
            cluster.logs()
        )
    });
    println!("dead member forgotten {took:?} after being declared dead (grace 4s)");
}

#[test]
fn agent_with_a_wrong_key_never_appears_and_is_counted() {
    let cluster = Cluster::start(3, |_| {}).unwrap();
    converge(&cluster, Duration::from_secs(5));
    let other = write_keyring(cluster.dir(), "other.keys", &[gossip_keygen()]);
    let mut spec = AgentSpec::loopback("intruder", &other, &cluster.pki);
    spec.seeds = vec![
        cluster.agents[0].spec.gossip_addr(),
        cluster.agents[1].spec.gossip_addr(),
    ];
    let intruder = TestAgent::start(spec, cluster.dir(), &[]).unwrap();
    // The intruder's datagrams reach its two seeds; both must refuse and count them.
    let bad_auth = || -> f64 {
        cluster.agents[..2]
            .iter()
            .map(|a| a.metric("weft_gossip_packets_total{direction=\"in\",outcome=\"bad_auth\"}"))
            .sum()
    };
    let before = bad_auth();
    let counted = wait_until(Duration::from_secs(8), || bad_auth() >= before + 2.0);
    std::thread::sleep(Duration::from_secs(3)); // and it stays out
    for agent in &cluster.agents {
        let states = agent.member_states().unwrap();
        assert!(states.iter().all(|(n, _)| n != "intruder"), "{states:?}");
    }
    assert!(
        counted.is_some(),
        "bad_auth only went from {before} to {}",
        bad_auth()
    );
    assert_eq!(
        intruder.member_states().unwrap().len(),
        1,
        "the intruder sees only itself"
    );
    println!(
        "wrong-key agent kept out; its seeds counted {} bad_auth datagrams",
        bad_auth() - before
    );
}

#[test]
fn full_key_rotation_keeps_all_five_connected() {
    let cluster = five();
    converge(&cluster, Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(2));
    let old = cluster.keys[0].clone();
    let new = gossip_keygen();
    let steps: [Vec<String>; 3] = [
        vec![old.clone(), new.clone()],
        vec![new.clone(), old.clone()],
        vec![new.clone()],
    ];
    let names = cluster.names();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    for (step, keys) in steps.iter().enumerate() {
        write_keyring(cluster.dir(), "gossip.keys", keys);
        for agent in &cluster.agents {
            agent.sighup();
            // Check connectivity between each agent's reload, as a rolling rotation would.
            std::thread::sleep(Duration::from_millis(300));
            assert!(
                cluster.all_see_alive(&ALL, &names),
                "partition during rotation step {step}\n{}",
                cluster.logs()
            );
        }
        let fingerprint_count = keys.len();
        assert!(
            wait_until(Duration::from_secs(3), || {
                cluster.agents[0]
                    .cli_json(&["gossip", "keys"])
                    .is_ok_and(|r| {
                        r["uniform"] == true
                            && r["members"].as_array().is_some_and(|m| {
                                m.len() == 5
                                    && m.iter().all(|m| {
                                        m["keyring"]
                                            .as_array()
                                            .is_some_and(|k| k.len() == fingerprint_count)
                                    })
                            })
                    })
            })
            .is_some(),
            "keyrings did not converge after step {step}"
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        cluster.all_see_alive(&ALL, &names),
        "partition after rotation\n{}",
        cluster.logs()
    );
    let bad_auth: f64 = cluster
        .agents
        .iter()
        .map(|a| a.metric("weft_gossip_packets_total{direction=\"in\",outcome=\"bad_auth\"}"))
        .sum();
    assert_eq!(
        bad_auth, 0.0,
        "no datagram may be refused during a correct rotation"
    );
}

#[test]
fn failing_http_check_leaves_every_catalog_and_comes_back() {
    // The app: answers /healthz with 200 while a flag file is absent, 500 when it exists.
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("sick");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let app_flag = flag.clone();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf);
            let status = if app_flag.exists() {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    });
    let service = format!(
        "[[service]]\nname = \"api\"\nport = {port}\nprotocol = \"http\"\ncheck = {{ http = \"/healthz\", interval = \"1s\", timeout = \"500ms\" }}\n"
    );
    let cluster = Cluster::start(5, |spec| {
        if spec.name == "a1" {
            spec.extra = service.clone();
        }
    })
    .unwrap();
    converge(&cluster, Duration::from_secs(5));
    let healthy = |h: &str| {
        cluster
            .agents
            .iter()
            .all(|a| a.endpoints("default/api") == [("a1".to_string(), h.to_string())])
    };
    assert!(
        wait_until(Duration::from_secs(3), || healthy("passing")).is_some(),
        "{}",
        cluster.logs()
    );

    std::fs::write(&flag, "").unwrap();
    // One check interval (1s) plus its timeout plus gossip propagation.
    let took =
        wait_until(Duration::from_millis(2500), || healthy("failing")).unwrap_or_else(|| {
            panic!(
                "failing endpoint still routable somewhere\n{}",
                cluster.logs()
            )
        });
    println!("failing HTTP check reached all 5 catalogs in {took:?}");
    assert!(
        cluster.agents[0]
            .metric("weft_health_checks_total{result=\"failing\",service=\"default/api\"}")
            >= 1.0
    );
    assert_eq!(
        cluster.agents[0].metric("weft_service_healthy{service=\"default/api\"}"),
        0.0
    );

    std::fs::remove_file(&flag).unwrap();
    let took = wait_until(Duration::from_millis(2500), || healthy("passing"))
        .unwrap_or_else(|| panic!("recovered endpoint not back everywhere\n{}", cluster.logs()));
    println!("recovered HTTP check reached all 5 catalogs in {took:?}");
}

#[test]
fn random_and_truncated_gossip_datagrams_are_counted_as_malformed() {
    let cluster = Cluster::start(2, |_| {}).unwrap();
    converge(&cluster, Duration::from_secs(5));
    let target = cluster.agents[1].spec.gossip_addr();
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let sent = 200;
    for i in 0..sent {
        let len = match i % 4 {
            0 => 0,
            1 => (next() % 16) as usize,
            2 => (next() % 1400) as usize,
            _ => 60 + (next() % 200) as usize,
        };
        let mut datagram: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if i % 2 == 0 && !datagram.is_empty() {
            datagram[0] = 0xE1; // looks like our version byte, so it reaches the authenticator
        }
        sender.send_to(&datagram, &target).unwrap();
    }
    let refused = || {
        let a = &cluster.agents[1];
        a.metric("weft_gossip_packets_total{direction=\"in\",outcome=\"malformed\"}")
            + a.metric("weft_gossip_packets_total{direction=\"in\",outcome=\"bad_auth\"}")
    };
    assert!(
        wait_until(Duration::from_secs(3), || refused() >= sent as f64).is_some(),
        "only {} of {sent} garbage datagrams were counted",
        refused()
    );
    assert!(
        cluster.agents[1]
            .metric("weft_gossip_packets_total{direction=\"in\",outcome=\"malformed\"}")
            >= 50.0
    );
    // The agent is unharmed and still in the cluster.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        cluster.all_see_alive(&[0, 1], &["a1", "a2"]),
        "{}",
        cluster.logs()
    );
}

#[test]
fn metrics_are_valid_prometheus_text() {
    let cluster = Cluster::start(1, |_| {}).unwrap();
    assert!(
        wait_until(Duration::from_secs(3), || cluster.agents[0]
            .metrics()
            .is_ok())
        .is_some()
    );
    let text = cluster.agents[0].metrics().unwrap();
    // The HTTP listener serves only metrics and probes; the JSON API is on the 0600 socket.
    assert_eq!(cluster.agents[0].http_get("/v1/members").unwrap().0, 404);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(cluster.agents[0].socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "admin socket mode {mode:o}");
    for name in [
        "weft_build_info",
        "weft_gossip_members",
        "weft_gossip_packets_total",
        "weft_gossip_bytes_total",
        "weft_ready",
        "process_resident_memory_bytes",
    ] {
        assert!(
            text.contains(&format!("\n{name}")) || text.starts_with(name),
            "{name} missing"
        );
    }
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`) must be installed: .ci/run installs it");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_config_reports_one_line_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weft.toml");
    std::fs::write(
        &path,
        "[node]\ntrust_domain = \"t.weft\"\n\n[gossip]\nbind = \"0.0.0.0:99999\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(weft_tests::agent::weft_bin())
        .args(["check-config", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("{}:5: gossip.bind: ", path.display())),
        "{stderr}"
    );
    let usage = std::process::Command::new(weft_tests::agent::weft_bin())
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
}
