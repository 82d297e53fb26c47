//! Five agents on five lab hosts (network namespaces on 198.18.20.0/24, the bridge in its own
//! namespace, no route out): a partitioned host is seen dead by every other host, and alive
//! again after the partition heals. The lab is torn down even when an assertion fails.

use std::time::Duration;

use weft_tests::agent::{all_logs, start_lab_agents, wait_until};
use weft_tests::lab::Lab;

const HOSTS: usize = 5;

#[test]
fn partitioned_host_is_dead_everywhere_else_and_alive_after_heal() {
    let lab =
        Lab::up("wlab", 20, HOSTS).expect("bring the lab up (needs root, iproute2, nftables)");
    let dir = tempfile::Builder::new()
        .prefix("weft-lab-")
        .tempdir()
        .unwrap();
    let (agents, _pki) = start_lab_agents(&lab, dir.path(), |_, _| {});
    let logs = || all_logs(&agents);
    let state = |observer: usize, of: &str| agents[observer].state_of(of);
    let others = |host: &str| {
        agents
            .iter()
            .enumerate()
            .filter(|(_, a)| a.spec.name != host)
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
    };

    let converged = wait_until(Duration::from_secs(10), || {
        agents.iter().all(|a| {
            a.member_states()
                .is_ok_and(|m| m.len() == HOSTS && m.iter().all(|(_, s)| s == "alive"))
        })
    })
    .unwrap_or_else(|| panic!("lab agents did not converge\n{}", logs()));
    println!("5 lab hosts converged in {converged:?}");
    std::thread::sleep(Duration::from_secs(2));

    lab.partition(5).unwrap();
    let detected = wait_until(Duration::from_secs(8), || {
        others("h5")
            .iter()
            .all(|&i| state(i, "h5").as_deref() == Some("dead"))
    })
    .unwrap_or_else(|| panic!("partitioned h5 not dead everywhere\n{}", logs()));
    println!("partitioned h5 seen dead by all 4 others in {detected:?}");
    // The partitioned host, for its part, sees everyone else dead.
    assert!(
        wait_until(Duration::from_secs(8), || {
            others("h5")
                .iter()
                .all(|&i| state(4, &agents[i].spec.name).as_deref() == Some("dead"))
        })
        .is_some(),
        "h5 still sees others alive\n{}",
        logs()
    );

    lab.heal(5).unwrap();
    let healed = wait_until(Duration::from_secs(10), || {
        agents.iter().all(|a| {
            a.member_states()
                .is_ok_and(|m| m.len() == HOSTS && m.iter().all(|(_, s)| s == "alive"))
        })
    })
    .unwrap_or_else(|| panic!("h5 not alive everywhere after heal\n{}", logs()));
    println!("after heal, all 5 hosts alive everywhere in {healed:?}");
    drop(agents);
    lab.down().expect("tear the lab down");
}
