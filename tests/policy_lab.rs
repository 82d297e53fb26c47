//! Policy distribution across five lab hosts (network namespaces on 198.18.22.0/24, the
//! bridge in its own namespace, no route out): a policy applied on one host is in force on
//! all five within 3 s (measured); a host partitioned during an apply converges after the
//! heal; a host restarted with no reachable peer enforces the bundle it persisted. The lab is
//! torn down even when an assertion fails.

use std::path::Path;
use std::time::{Duration, Instant};

use weft_tests::agent::{TestAgent, all_logs, start_lab_agents, wait_until};
use weft_tests::lab::Lab;

const HOSTS: usize = 5;

/// A policy set that denies by default and lets `orders` reach `api` on port `port`.
fn policy(dir: &Path, name: &str, port: u16) -> String {
    let text = format!(
        "apiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata: {{name: mesh}}\nspec: {{default: deny}}\n\
         ---\napiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {{name: api-port, namespace: default}}\n\
         spec:\n  matches:\n    ports: [{port}]\n\
         ---\napiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {{name: orders-to-api, namespace: default}}\n\
         spec:\n  destination: {{kind: ServiceAccount, name: api, namespace: default}}\n\
         \x20 rules:\n  - kind: TCPRoute\n    name: api-port\n\
         \x20 sources:\n  - kind: ServiceAccount\n    name: orders\n    namespace: default\n"
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).expect("write policy");
    path.display().to_string()
}

#[test]
fn policies_reach_every_host_heal_after_partitions_and_survive_restarts() {
    let lab =
        Lab::up("wpol", 22, HOSTS).expect("bring the lab up (needs root, iproute2, nftables)");
    let dir = tempfile::Builder::new()
        .prefix("weft-policy-lab-")
        .tempdir()
        .unwrap();
    let (mut agents, pki) = start_lab_agents(&lab, dir.path(), |_, _| {});
    let logs = |agents: &[TestAgent]| all_logs(agents);
    let ready = wait_until(Duration::from_secs(30), || {
        agents
            .iter()
            .all(|a| a.cli_json(&["status"]).is_ok_and(|s| s["ready"] == true))
            && agents.iter().all(|a| {
                a.member_states()
                    .is_ok_and(|m| m.len() == HOSTS && m.iter().all(|(_, s)| s == "alive"))
            })
    });
    assert!(ready.is_some(), "lab agents not ready\n{}", logs(&agents));

    // Apply on h3; measure until every host has it in force.
    let apply = |agents: &[TestAgent], host: usize, name: &str, port: u16| -> u64 {
        let file = policy(dir.path(), name, port);
        let out = agents[host - 1].cli(&["policy", "apply", "-f", &file], Some(pki.operator_dir()));
        assert!(
            out.status.success(),
            "apply on h{host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        agents[host - 1].policy_version()
    };
    let started = Instant::now();
    let first = apply(&agents, 3, "first", 8080);
    let everywhere = wait_until(Duration::from_secs(10), || {
        agents.iter().all(|a| a.policy_version() == first)
    })
    .map(|_| started.elapsed())
    .unwrap_or_else(|| panic!("policy {first} not on every host\n{}", logs(&agents)));
    println!("policy applied on h3 in force on all {HOSTS} hosts in {everywhere:?}");
    assert!(
        everywhere <= Duration::from_secs(3),
        "convergence took {everywhere:?}, over the 3 s bar"
    );

    // Partition h5, apply a newer version on h1: the other four converge, h5 cannot.
    lab.partition(5).unwrap();
    let second = apply(&agents, 1, "second", 9090);
    assert!(second > first);
    let four = wait_until(Duration::from_secs(10), || {
        agents[..4].iter().all(|a| a.policy_version() == second)
    });
    assert!(
        four.is_some(),
        "the connected hosts did not converge\n{}",
        logs(&agents)
    );
    assert_eq!(agents[4].policy_version(), first, "h5 is partitioned");
    lab.heal(5).unwrap();
    let healed_at = Instant::now();
    let healed = wait_until(Duration::from_secs(20), || {
        agents[4].policy_version() == second
    })
    .map(|_| healed_at.elapsed())
    .unwrap_or_else(|| panic!("h5 did not converge after heal\n{}", logs(&agents)));
    println!("partitioned h5 had the new policy {healed:?} after the heal");
    let status = agents[4].cli_json(&["policy", "status"]).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || {
            agents[4]
                .cli_json(&["policy", "status"])
                .is_ok_and(|s| s["converged"] == true)
        })
        .is_some(),
        "policy status never converged: {status}"
    );

    // Restart h5 with no reachable peer: it enforces the persisted bundle.
    lab.partition(5).unwrap();
    agents[4].restart().expect("restart h5");
    let loaded = wait_until(Duration::from_secs(10), || {
        agents[4].policy_version() == second
    });
    assert!(
        loaded.is_some(),
        "h5 did not load its persisted bundle\n{}",
        agents[4].log()
    );
    for (port, expected) in [(9090, "allow"), (8080, "deny")] {
        let why = agents[4]
            .cli_json(&[
                "why",
                "--from",
                "orders",
                "--to",
                "api",
                "--port",
                &port.to_string(),
            ])
            .expect("weft why");
        assert_eq!(why["decision"], expected, "port {port}: {why}");
    }
    lab.heal(5).unwrap();
    drop(std::mem::take(&mut agents));
    lab.down().expect("tear the lab down");
}
