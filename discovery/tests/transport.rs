//! Real chitchat clusters over the sealed transport, on 127.0.0.1.
//!
//! Each test runs its own small cluster with a 100 ms gossip interval. The tests hold one
//! lock so they run one at a time: failure detection at this interval is sensitive to CPU
//! starvation, and a 2-core machine running several clusters at once would make liveness
//! assertions measure the scheduler rather than the transport.

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitchat::transport::{Transport, UdpTransport};
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, ProtocolVersion,
    spawn_chitchat,
};
use prometheus::{Encoder, Registry, TextEncoder};
use rand::{Rng, RngCore};
use tokio::sync::Mutex;
use weft_discovery::{
    GossipKey, GossipMetrics, Keyring, PacketOutcome, SealConfig, SealedTransport, SharedKeyring,
};

const INTERVAL: Duration = Duration::from_millis(100);
const CONVERGE: Duration = Duration::from_secs(10);

/// One test at a time (see the module doc).
static SERIAL: Mutex<()> = Mutex::const_new(());

struct Node {
    name: String,
    addr: SocketAddr,
    handle: ChitchatHandle,
    keyring: SharedKeyring,
    metrics: GossipMetrics,
    registry: Registry,
}

/// A port that was free a moment ago. chitchat advertises its listen address, so port 0
/// cannot be used; `start` retries if another process takes the port in between.
fn free_port() -> u16 {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind an ephemeral port");
    socket.local_addr().expect("local address").port()
}

fn chitchat_config(name: &str, addr: SocketAddr, seeds: &[SocketAddr]) -> ChitchatConfig {
    ChitchatConfig {
        chitchat_id: ChitchatId::new(name.to_string(), 1, addr),
        cluster_id: "weft-test".to_string(),
        gossip_interval: INTERVAL,
        listen_addr: addr,
        seed_nodes: seeds.iter().map(ToString::to_string).collect(),
        failure_detector_config: FailureDetectorConfig {
            initial_interval: INTERVAL,
            ..FailureDetectorConfig::default()
        },
        marked_for_deletion_grace_period: Duration::from_secs(3_600),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: ProtocolVersion::V1,
    }
}

async fn spawn_on_free_port(
    name: &str,
    seeds: &[SocketAddr],
    initial: Vec<(String, String)>,
    transport: &dyn Transport,
) -> (SocketAddr, ChitchatHandle) {
    let mut last_error = None;
    for _ in 0..5 {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = chitchat_config(name, addr, seeds);
        match spawn_chitchat(config, initial.clone(), transport).await {
            Ok(handle) => return (addr, handle),
            Err(error) => last_error = Some(error),
        }
    }
    panic!("cannot start {name}: {last_error:?}");
}

async fn start_with(
    name: &str,
    keyring: SharedKeyring,
    seeds: &[SocketAddr],
    seal: SealConfig,
    extra: Vec<(String, String)>,
) -> Node {
    let registry = Registry::new();
    let metrics = GossipMetrics::new(&registry).expect("register metrics");
    let transport = SealedTransport::new(keyring.clone(), metrics.clone(), seal);
    let mut initial = vec![("name".to_string(), name.to_string())];
    initial.extend(extra);
    let (addr, handle) = spawn_on_free_port(name, seeds, initial, &transport).await;
    Node {
        name: name.to_string(),
        addr,
        handle,
        keyring,
        metrics,
        registry,
    }
}

async fn start(name: &str, keyring: SharedKeyring, seeds: &[SocketAddr]) -> Node {
    start_with(name, keyring, seeds, SealConfig::default(), Vec::new()).await
}

/// A, B and C sharing `keyring` (each its own handle on it), B and C seeded with A.
async fn cluster(keyring: &Keyring) -> Vec<Node> {
    let a = start("a", keyring.clone().into_shared(), &[]).await;
    let b = start("b", keyring.clone().into_shared(), &[a.addr]).await;
    let c = start("c", keyring.clone().into_shared(), &[a.addr]).await;
    vec![a, b, c]
}

async fn live(node: &Node) -> BTreeSet<String> {
    node.handle
        .with_chitchat(|c| c.live_nodes().map(|id| id.node_id.to_string()).collect())
        .await
}

async fn known(node: &Node) -> BTreeSet<String> {
    node.handle
        .with_chitchat(|c| {
            c.node_states()
                .keys()
                .map(|id| id.node_id.to_string())
                .collect()
        })
        .await
}

async fn value_seen(node: &Node, of: &str, key: &str) -> Option<String> {
    node.handle
        .with_chitchat(|c| {
            c.node_states()
                .iter()
                .find(|(id, _)| &*id.node_id == of)
                .and_then(|(_, state)| state.get(key).map(str::to_string))
        })
        .await
}

fn names(nodes: &[Node]) -> BTreeSet<String> {
    nodes.iter().map(|n| n.name.clone()).collect()
}

/// Polls `check` every 20 ms until it holds or `limit` passes; returns the time it took.
async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn all_live(nodes: &[Node]) -> bool {
    let want = names(nodes);
    for node in nodes {
        if live(node).await != want {
            return false;
        }
    }
    true
}

async fn converge(nodes: &[Node]) -> Duration {
    wait_until(CONVERGE, "the cluster to converge", || all_live(nodes)).await
}

/// Value of a counter without labels, read the way Prometheus scrapes it.
fn scraped(registry: &Registry, name: &str) -> u64 {
    let mut text = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut text)
        .expect("encode metrics");
    String::from_utf8(text)
        .expect("utf-8 metrics")
        .lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .parse::<f64>()
                .ok()
        })
        .map_or(0, |v| v as u64)
}

async fn shutdown(nodes: Vec<Node>) {
    for node in nodes {
        tokio::time::timeout(Duration::from_secs(5), node.handle.shutdown())
            .await
            .expect("shutdown in time")
            .expect("clean shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_converge_and_see_each_others_key_values() {
    let _serial = SERIAL.lock().await;
    let nodes = cluster(&Keyring::single(GossipKey::generate())).await;
    let took = converge(&nodes).await;
    eprintln!("converged in {took:?}");
    wait_until(CONVERGE, "initial key-values everywhere", || async {
        for node in &nodes {
            for other in &nodes {
                if value_seen(node, &other.name, "name").await.as_deref() != Some(&*other.name) {
                    return false;
                }
            }
        }
        true
    })
    .await;

    nodes[0]
        .handle
        .with_chitchat(|c| c.self_node_state().set("service:api", "healthy"))
        .await;
    let took = wait_until(CONVERGE, "a new key-value on b and c", || async {
        value_seen(&nodes[1], "a", "service:api").await.as_deref() == Some("healthy")
            && value_seen(&nodes[2], "a", "service:api").await.as_deref() == Some("healthy")
    })
    .await;
    eprintln!("new key-value propagated in {took:?}");
    for node in &nodes {
        assert_eq!(node.metrics.inbound_count(PacketOutcome::BadAuth), 0);
        assert_eq!(node.metrics.inbound_count(PacketOutcome::Malformed), 0);
        assert!(node.metrics.inbound_count(PacketOutcome::Ok) > 0);
    }
    shutdown(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_with_a_wrong_key_never_joins_and_is_counted() {
    let _serial = SERIAL.lock().await;
    let nodes = cluster(&Keyring::single(GossipKey::generate())).await;
    converge(&nodes).await;
    let seeds: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let intruder = start(
        "intruder",
        Keyring::single(GossipKey::generate()).into_shared(),
        &seeds,
    )
    .await;
    let before: u64 = nodes
        .iter()
        .map(|n| n.metrics.inbound_count(PacketOutcome::BadAuth))
        .sum();

    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        for node in &nodes {
            assert!(
                !known(node).await.contains("intruder"),
                "{} admitted the intruder",
                node.name
            );
        }
        assert_eq!(
            known(&intruder).await,
            BTreeSet::from(["intruder".to_string()])
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after: u64 = nodes
        .iter()
        .map(|n| n.metrics.inbound_count(PacketOutcome::BadAuth))
        .sum();
    // The intruder sends one Syn per 100 ms tick: about 20 in 2 s.
    assert!(
        after - before >= 10,
        "bad_auth grew by only {}",
        after - before
    );
    assert!(all_live(&nodes).await, "the cluster must stay whole");
    assert_eq!(intruder.metrics.inbound_count(PacketOutcome::Ok), 0);
    let mut all = nodes;
    all.push(intruder);
    shutdown(all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_chitchat_node_is_counted_as_malformed_and_never_appears() {
    let _serial = SERIAL.lock().await;
    let nodes = cluster(&Keyring::single(GossipKey::generate())).await;
    converge(&nodes).await;
    let initial = vec![("name".to_string(), "plain".to_string())];
    let (_, plain) = spawn_on_free_port("plain", &[nodes[0].addr], initial, &UdpTransport).await;

    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        for node in &nodes {
            assert!(
                !known(node).await.contains("plain"),
                "{} admitted a plaintext node",
                node.name
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let malformed = nodes[0].metrics.inbound_count(PacketOutcome::Malformed);
    assert!(
        malformed >= 10,
        "only {malformed} malformed datagrams counted"
    );
    let plain_known: BTreeSet<String> = plain
        .with_chitchat(|c| {
            c.node_states()
                .keys()
                .map(|id| id.node_id.to_string())
                .collect()
        })
        .await;
    assert_eq!(plain_known, BTreeSet::from(["plain".to_string()]));
    plain.shutdown().await.expect("plaintext node shuts down");
    shutdown(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_are_counted_while_the_cluster_stays_converged() {
    let _serial = SERIAL.lock().await;
    let nodes = cluster(&Keyring::single(GossipKey::generate())).await;
    converge(&nodes).await;
    let target = &nodes[0];
    let refused = |n: &Node| {
        n.metrics.inbound_count(PacketOutcome::Malformed)
            + n.metrics.inbound_count(PacketOutcome::BadAuth)
    };
    let before = refused(target);

    let raw = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut rng = rand::rng();
    const GARBAGE: u64 = 2_000;
    for i in 0..GARBAGE {
        let len = match i % 4 {
            0 => rng.random_range(0..55), // shorter than any frame
            1 => rng.random_range(55..200),
            2 => rng.random_range(200..2_000),
            _ => rng.random_range(2_000..20_000),
        };
        let mut datagram = vec![0u8; len];
        rng.fill_bytes(&mut datagram);
        if i % 3 == 0 && len > 3 {
            // A plausible header, so the cipher has to reject it.
            datagram[..3].copy_from_slice(&[0xE1, 0, 1]);
        }
        raw.send_to(&datagram, target.addr).unwrap();
        if i % 50 == 49 {
            // Pace the flood so the kernel does not drop any of it: the test wants every
            // datagram counted.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    wait_until(
        Duration::from_secs(5),
        "every garbage datagram counted",
        || async { refused(target) - before == GARBAGE },
    )
    .await;
    assert!(target.metrics.inbound_count(PacketOutcome::Malformed) >= GARBAGE / 2);
    assert!(all_live(&nodes).await, "garbage must not cost liveness");

    target
        .handle
        .with_chitchat(|c| c.self_node_state().set("after", "garbage"))
        .await;
    wait_until(CONVERGE, "a key-value set after the flood", || async {
        value_seen(&nodes[1], "a", "after").await.is_some()
            && value_seen(&nodes[2], "a", "after").await.is_some()
    })
    .await;
    shutdown(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_in_three_phases_keeps_every_node_live() {
    let _serial = SERIAL.lock().await;
    let k1 = GossipKey::generate();
    let k2 = GossipKey::generate();
    let nodes = Arc::new(cluster(&Keyring::single(k1.clone())).await);
    converge(&nodes).await;

    // Sample every node's live set every 20 ms for the whole rotation.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let nodes = nodes.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut samples = 0usize;
            let mut worst = usize::MAX;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for node in nodes.iter() {
                    worst = worst.min(live(node).await.len());
                }
                samples += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (samples, worst)
        })
    };

    let phases = [
        Keyring::new(vec![k1.clone(), k2.clone()]).unwrap(),
        Keyring::new(vec![k2.clone(), k1.clone()]).unwrap(),
        Keyring::single(k2.clone()),
    ];
    for phase in &phases {
        // Staggered like a rolling playbook: peers run mixed keyrings for a while.
        for node in nodes.iter() {
            node.keyring.store(Arc::new(phase.clone()));
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (samples, worst) = sampler.await.unwrap();
    eprintln!("rotation: {samples} samples, minimum live set {worst}");
    assert!(samples >= 50, "only {samples} samples");
    assert_eq!(worst, 3, "a node was declared dead during the rotation");

    let secondary: u64 = nodes
        .iter()
        .map(|n| scraped(&n.registry, "weft_gossip_secondary_key_opens_total"))
        .sum();
    assert!(
        secondary > 0,
        "no frame was opened with a secondary key: the test did not mix keyrings"
    );
    for node in nodes.iter() {
        assert_eq!(
            node.metrics.inbound_count(PacketOutcome::BadAuth),
            0,
            "{}",
            node.name
        );
    }

    // After the rotation, a node still holding only K1 is locked out.
    let seeds: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let stale = start("stale", Keyring::single(k1).into_shared(), &seeds).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for node in nodes.iter() {
        assert!(!known(node).await.contains("stale"));
    }
    // And gossip still carries news.
    nodes[2]
        .handle
        .with_chitchat(|c| c.self_node_state().set("rotated", "k2"))
        .await;
    wait_until(CONVERGE, "a key-value set after the rotation", || async {
        value_seen(&nodes[0], "c", "rotated").await.as_deref() == Some("k2")
    })
    .await;

    let Ok(nodes) = Arc::try_unwrap(nodes) else {
        panic!("sampler still holds the nodes");
    };
    let mut all = nodes;
    all.push(stale);
    shutdown(all).await;
}

/// 2,000 values of about 600 bytes that zstd cannot shrink, so chitchat stores its blocks
/// raw and fills datagrams to within a few dozen bytes of its 65,507-byte limit.
///
/// Random characters mixed so that the UTF-8 bytes are spread almost evenly (about 7.9 bits
/// of entropy per byte): 75% ASCII, 15% two-byte, 5% three-byte and 5% four-byte characters.
fn large_state() -> Vec<(String, String)> {
    let mut rng = rand::rng();
    (0..2_000)
        .map(|i| {
            let mut value = String::with_capacity(620);
            while value.len() < 600 {
                let roll: f64 = rng.random();
                let code = if roll < 0.75 {
                    rng.random_range(0..0x80)
                } else if roll < 0.90 {
                    rng.random_range(0x80..0x800)
                } else if roll < 0.95 {
                    rng.random_range(0x800..0xD800)
                } else {
                    rng.random_range(0x1_0000..0x11_0000)
                };
                value.extend(char::from_u32(code));
            }
            (format!("bulk:{i:05}"), value)
        })
        .collect()
}

async fn large_state_replicates(seal: SealConfig) -> Duration {
    let keyring = Keyring::single(GossipKey::generate());
    let big = start_with(
        "a",
        keyring.clone().into_shared(),
        &[],
        seal.clone(),
        large_state(),
    )
    .await;
    let b = start_with("b", keyring.into_shared(), &[big.addr], seal, Vec::new()).await;
    let took = wait_until(Duration::from_secs(30), "the large state on b", || async {
        b.handle
            .with_chitchat(|c| {
                c.node_states()
                    .iter()
                    .find(|(id, _)| &*id.node_id == "a")
                    .is_some_and(|(_, s)| s.num_key_values() == 2_001)
            })
            .await
    })
    .await;
    let expected = big
        .handle
        .with_chitchat(|c| c.self_node_state().get("bulk:01999").map(str::to_string))
        .await;
    assert!(expected.is_some());
    assert_eq!(value_seen(&b, "a", "bulk:01999").await, expected);
    for node in [&big, &b] {
        assert_eq!(node.metrics.inbound_count(PacketOutcome::Oversized), 0);
        assert_eq!(node.metrics.inbound_count(PacketOutcome::Malformed), 0);
    }
    shutdown(vec![big, b]).await;
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_state_replicates_with_full_size_datagrams() {
    let _serial = SERIAL.lock().await;
    let took = large_state_replicates(SealConfig::default()).await;
    eprintln!("1.2 MB state replicated in {took:?} at max_datagram 65,507");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_state_replicates_in_small_fragments() {
    let _serial = SERIAL.lock().await;
    let seal = SealConfig {
        max_datagram: 1_400,
        ..SealConfig::default()
    };
    let took = large_state_replicates(seal).await;
    eprintln!("1.2 MB state replicated in {took:?} at max_datagram 1,400");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_port_is_free_right_after_shutdown() {
    let _serial = SERIAL.lock().await;
    let keyring = Keyring::single(GossipKey::generate());
    let nodes = cluster(&keyring).await;
    converge(&nodes).await;
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    shutdown(nodes).await;
    for addr in addrs {
        UdpSocket::bind(addr).unwrap_or_else(|e| panic!("{addr} still taken after shutdown: {e}"));
    }
    // Dropping the handle (no shutdown call) releases it as well, once the task ends.
    let node = start("solo", keyring.into_shared(), &[]).await;
    let addr = node.addr;
    drop(node);
    wait_until(Duration::from_secs(2), "the port after drop", || async {
        UdpSocket::bind(addr).is_ok()
    })
    .await;
}
