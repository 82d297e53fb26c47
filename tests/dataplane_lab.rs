//! The data plane across a real (namespaced) network: three lab hosts on 198.18.21.0/24, an
//! agent in each (h1 the CA host), a web server and an echo server on h3's loopback, upstream
//! listeners on h2's loopback. curl and socat inside h2 reach h3's services only through the
//! QUIC tunnel from h2 to h3's lab address. The lab is torn down even when an assertion fails.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use weft_tests::agent::{all_logs, kill_process, metric_sum, start_lab_agents, wait_until};
use weft_tests::lab::Lab;

const HOSTS: usize = 3;
const WEB_PORT: u16 = 8080;
const ECHO_PORT: u16 = 9000;
const UP_WEB: u16 = 15000;
const UP_ECHO: u16 = 15001;

/// Metric `name` summed over samples with `labels`, read from inside host `i`.
fn lab_metric(lab: &Lab, i: usize, name: &str, labels: &[(&str, &str)]) -> f64 {
    lab.exec_ok(
        i,
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "http://127.0.0.1:7480/metrics",
        ],
    )
    .map(|text| metric_sum(&text, name, labels))
    .unwrap_or(f64::NAN)
}

#[test]
fn traffic_from_h2_reaches_h3_through_the_tunnel_across_the_lab_network() {
    let lab = Lab::up("wdp", 21, HOSTS).expect("bring the lab up (needs root, iproute2, nftables)");
    let dir = tempfile::Builder::new()
        .prefix("weft-dp-lab-")
        .tempdir()
        .unwrap();
    let site = dir.path().join("site");
    std::fs::create_dir(&site).unwrap();
    let file: Vec<u8> = (0..2 * 1024 * 1024 + 3)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(site.join("file.bin"), &file).unwrap();

    // The services, on h3's own loopback (killed by PID at the end; the lab also kills what
    // it spawned when it is torn down, so a failed assertion leaves nothing behind).
    let mut web = lab
        .spawn(
            3,
            Command::new("python3")
                .args(["-m", "http.server", &WEB_PORT.to_string()])
                .args(["--bind", "127.0.0.1", "--directory"])
                .arg(&site)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("start the web server in h3");
    let mut echo = lab
        .spawn(
            3,
            Command::new("socat")
                .arg(format!(
                    "TCP-LISTEN:{ECHO_PORT},bind=127.0.0.1,fork,reuseaddr"
                ))
                .arg("EXEC:cat")
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("start the echo server in h3");

    let (agents, _pki) = start_lab_agents(&lab, dir.path(), |i, spec| {
        spec.extra = match i {
            3 => format!(
                "[[service]]\nname = \"web\"\nport = {WEB_PORT}\nprotocol = \"http\"\n\n\
                 [[service]]\nname = \"api\"\nport = {ECHO_PORT}\nprotocol = \"tcp\"\n"
            ),
            2 => format!(
                "[[upstream]]\nservice = \"web\"\nlisten = \"127.0.0.1:{UP_WEB}\"\n\n\
                 [[upstream]]\nservice = \"api\"\nlisten = \"127.0.0.1:{UP_ECHO}\"\n"
            ),
            _ => String::new(),
        };
    });
    let logs = || all_logs(&agents);

    let ready = wait_until(Duration::from_secs(20), || {
        agents.iter().all(|a| {
            a.cli_json(&["status"])
                .is_ok_and(|status| status["ready"] == serde_json::Value::Bool(true))
        })
    })
    .unwrap_or_else(|| panic!("lab agents not ready\n{}", logs()));
    let routable = wait_until(Duration::from_secs(10), || {
        ["default/web", "default/api"]
            .iter()
            .all(|s| agents[1].endpoints(s) == [("h3".to_string(), "passing".to_string())])
    })
    .unwrap_or_else(|| panic!("h2 never saw web and api on h3\n{}", logs()));
    println!("3 lab agents ready in {ready:?}; h3's services routable from h2 {routable:?} later");

    // h3's services are not reachable on h2's own loopback: only the mesh can carry them.
    let direct = lab
        .exec(
            2,
            &[
                "curl",
                "-sS",
                "--max-time",
                "3",
                &format!("http://127.0.0.1:{WEB_PORT}/"),
            ],
        )
        .unwrap();
    assert!(
        !direct.status.success(),
        "h3's web server answers inside h2"
    );

    let got = dir.path().join("got.bin");
    let started = Instant::now();
    let out = lab
        .exec(
            2,
            &[
                "curl",
                "-sS",
                "--fail",
                "--max-time",
                "20",
                "-o",
                &got.display().to_string(),
                &format!("http://127.0.0.1:{UP_WEB}/file.bin"),
            ],
        )
        .unwrap();
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "curl in h2 failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    assert!(
        std::fs::read(&got).unwrap() == file,
        "curl in h2 got different bytes"
    );
    println!(
        "curl in h2 fetched {} bytes from h3 in {took:?} ({:.1} MiB/s), identical",
        file.len(),
        file.len() as f64 / 1048576.0 / took.as_secs_f64()
    );

    let started = Instant::now();
    let echoed = lab
        .exec_ok(
            2,
            &[
                "sh",
                "-c",
                &format!("printf 'across-the-lab' | socat -t5 - TCP:127.0.0.1:{UP_ECHO}"),
            ],
        )
        .unwrap_or_else(|e| panic!("socat round trip failed: {e:#}\n{}", logs()));
    println!("socat round trip h2 -> h3 -> h2 in {:?}", started.elapsed());
    assert_eq!(echoed, "across-the-lab");

    // The tunnel's peer is h3's lab address, and both ends counted the connections.
    let h3_tunnel = format!("{}:7402", lab.host_addr(3));
    let h2_log = agents[1].log();
    let opened: Vec<&str> = h2_log
        .lines()
        .filter(|line| line.contains("tunnel open"))
        .collect();
    println!("h2: {}", opened.join("\nh2: "));
    assert!(
        opened
            .iter()
            .any(|line| line.contains(&h3_tunnel) && line.contains("spiffe://test.weft/node/h3")),
        "h2 opened no tunnel to {h3_tunnel}\n{}",
        logs()
    );
    let outbound = lab_metric(&lab, 2, "weft_tcp_open_total", &[("direction", "outbound")]);
    let inbound = lab_metric(&lab, 3, "weft_tcp_open_total", &[("direction", "inbound")]);
    let accepted = lab_metric(
        &lab,
        3,
        "weft_tunnel_handshakes_total",
        &[("role", "server"), ("result", "ok")],
    );
    // `web` is an HTTP service: its request is counted per request, and carried on an HTTP
    // stream that h3 counts as an inbound connection like the TCP one.
    let requests = lab_metric(
        &lab,
        2,
        "weft_http_requests_total",
        &[("direction", "outbound"), ("code_class", "2xx")],
    );
    println!(
        "h2 outbound connections {outbound} and HTTP requests {requests}, h3 inbound \
         connections {inbound}, h3 accepted tunnels {accepted}"
    );
    assert!(outbound >= 1.0 && requests >= 1.0 && inbound >= 2.0 && accepted >= 1.0);

    drop(agents);
    kill_process(&mut web);
    kill_process(&mut echo);
    lab.down().expect("tear the lab down");
}
