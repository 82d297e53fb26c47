//! The L7 proxy for HTTP services with real processes (issue 6): three `weft agent`s on
//! 127.0.0.1, real HTTP servers ([`Backend`], hyper, in this process) registered as services,
//! and real clients (hyper, tonic, `h2load`) on `[[upstream]]` listeners. Policies are
//! published with the real `weft policy apply`.
//!
//! Shown here: TrafficSplit shares and a live re-split without a failed request; retries of
//! idempotent requests only, within the retry budget; request timeouts answered 504 with
//! `weft-error: timeout`; a slow endpoint getting a small share of the load; outlier ejection
//! and re-admission; gRPC unary and server streaming; HTTP/2 load with `h2load`.
//!
//! Every process started here is killed by PID when its test ends (agents by the harness,
//! `h2load` by its bounded wait); every wait is bounded. Tests take turns (one mesh at a
//! time).

use std::collections::HashMap;
use std::convert::Infallible;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hyper::Method;
use weft_tests::agent::{
    Cluster, TestAgent, free_port, metric_sum, service_table as service, take_turn,
    test_runtime as runtime, upstream_table as upstream, wait_until,
};
use weft_tests::http_backend::{Answer, Backend, Client, by_backend};
use weft_tests::nginx::Nginx;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

static SERIAL: Mutex<()> = Mutex::new(());

/// Takes this file's turn lock.
fn serial() -> MutexGuard<'static, ()> {
    take_turn(&SERIAL)
}

/// Starts three loopback agents (a1 the CA host) with `extra(name)` appended to each config,
/// and waits until all are ready and `observer` sees each `(service, nodes)` passing.
fn start_mesh(
    extra: impl Fn(&str) -> String,
    observer: usize,
    services: &[(&str, &[&str])],
) -> Cluster {
    let started = Instant::now();
    let cluster = Cluster::start(3, |spec| spec.extra = extra(&spec.name)).expect("start agents");
    let ready = wait_until(Duration::from_secs(30), || {
        cluster.all_ready()
            && services.iter().all(|(service, nodes)| {
                let mut seen: Vec<String> = cluster.agents[observer]
                    .endpoints(&format!("default/{service}"))
                    .into_iter()
                    .filter(|(_, health)| health == "passing")
                    .map(|(node, _)| node)
                    .collect();
                seen.sort();
                seen == *nodes
            })
    });
    assert!(
        ready.is_some(),
        "mesh not ready with {services:?} seen by a{} within 30s\n{}",
        observer + 1,
        cluster.logs()
    );
    println!("mesh ready in {:?}", started.elapsed());
    cluster
}

/// [`metric_sum`] on an agent's live `/metrics`.
fn agent_metric(agent: &TestAgent, name: &str, labels: &[(&str, &str)]) -> f64 {
    agent
        .metrics()
        .map(|text| metric_sum(&text, name, labels))
        .unwrap_or(f64::NAN)
}

/// Applies `text` with the real CLI on a1 and waits until every agent holds the version it
/// published; returns it.
fn apply(cluster: &Cluster, name: &str, text: &str) -> u64 {
    let dir = cluster.dir().join("policies").join(name);
    std::fs::create_dir_all(&dir).expect("policy dir");
    std::fs::write(dir.join("policy.yaml"), text).expect("write policy");
    let a1 = &cluster.agents[0];
    let out = a1.cli(
        &["policy", "apply", "-f", dir.to_str().expect("utf-8 path")],
        Some(cluster.pki.operator_dir()),
    );
    assert!(
        out.status.success(),
        "policy apply failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let version = a1.policy_version();
    assert!(version > 0, "no policy version after apply");
    let reached = wait_until(Duration::from_secs(10), || {
        cluster
            .agents
            .iter()
            .all(|agent| agent.policy_version() == version)
    });
    assert!(
        reached.is_some(),
        "policy version {version} did not reach every agent\n{}",
        cluster.logs()
    );
    version
}

fn traffic_split(name: &str, root: &str, backends: &[(&str, u32)]) -> String {
    let backends: String = backends
        .iter()
        .map(|(service, weight)| format!("  - service: {service}\n    weight: {weight}\n"))
        .collect();
    format!(
        "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  service: {root}\n  backends:\n{backends}"
    )
}

/// An `HTTPRoutePolicy` for `service` whose `spec` holds `body` (YAML, indented two spaces).
fn route_policy(service: &str, body: &str) -> String {
    format!(
        "apiVersion: weft.io/v1alpha1\nkind: HTTPRoutePolicy\nmetadata:\n  name: {service}\n  namespace: default\nspec:\n  service: {service}\n{body}"
    )
}

/// Share of `part` in `whole`, in percent.
fn percent(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    part as f64 * 100.0 / whole as f64
}

/// Status → count, for failure messages.
fn statuses(answers: &[Answer]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for a in answers {
        let key = match &a.weft_error {
            Some(reason) => format!("{} ({reason})", a.status),
            None => a.status.to_string(),
        };
        *counts.entry(key).or_default() += 1;
    }
    counts
}

fn first_failures(answers: &[Answer]) -> Vec<&Answer> {
    answers.iter().filter(|a| !a.ok()).take(3).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. TrafficSplit
// ---------------------------------------------------------------------------------------------

/// `web` split 90/10 over web-v1 (on a2) and web-v2 (on a3), called through an upstream on
/// a1: 10,000 requests share 90±2 % / 10±2 %. Then re-split 50/50 with `weft policy apply`
/// under load: no request fails and the new shares show.
#[test]
fn traffic_split_shares_and_a_live_resplit() {
    let _turn = serial();
    let rt = runtime();
    let v1 = Backend::start("web-v1");
    let v2 = Backend::start("web-v2");
    let up = free_port();
    let (p1, p2) = (v1.port, v2.port);
    let cluster = start_mesh(
        |name| match name {
            "a1" => upstream("web", up),
            "a2" => service("web-v1", p1, "http"),
            "a3" => service("web-v2", p2, "http"),
            _ => String::new(),
        },
        0,
        &[("web-v1", &["a2"]), ("web-v2", &["a3"])],
    );
    apply(
        &cluster,
        "split-90-10",
        &traffic_split("web-split", "web", &[("web-v1", 90), ("web-v2", 10)]),
    );
    let url = format!("http://127.0.0.1:{up}/");
    let client = Client::default();

    let started = Instant::now();
    let answers = rt.block_on(client.load(&Method::GET, &url, 10_000, 8));
    let took = started.elapsed();
    let ok = answers.iter().filter(|a| a.ok()).count();
    let shares = by_backend(&answers);
    let (n1, n2) = (
        shares.get("web-v1").copied().unwrap_or(0),
        shares.get("web-v2").copied().unwrap_or(0),
    );
    println!(
        "split 90/10: {} requests in {took:?} ({:.0} req/s): {ok} ok, web-v1 {n1} ({:.2}%), web-v2 {n2} ({:.2}%)",
        answers.len(),
        answers.len() as f64 / took.as_secs_f64(),
        percent(n1, answers.len()),
        percent(n2, answers.len()),
    );
    assert_eq!(
        ok,
        10_000,
        "every request answered 2xx: {:?}; first failures {:?}",
        statuses(&answers),
        first_failures(&answers)
    );
    assert_eq!(
        n1 + n2,
        10_000,
        "answers only from the backends: {shares:?}"
    );
    let share2 = percent(n2, 10_000);
    assert!(
        (8.0..=12.0).contains(&share2),
        "web-v2 got {share2:.2}% of 10,000 requests, not 10±2%"
    );
    // The requests were counted under the split's route on the calling agent.
    let routed = agent_metric(
        &cluster.agents[0],
        "weft_http_requests_total",
        &[
            ("direction", "outbound"),
            ("route", "split default/web-split"),
            ("code_class", "2xx"),
        ],
    );
    println!(
        "a1 weft_http_requests_total{{route=\"split default/web-split\",code_class=\"2xx\"}} = {routed}"
    );
    assert_eq!(routed, 10_000.0, "the split route counted every request");

    // Re-split 50/50 while a client keeps sending.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
        rt.spawn(async move {
            client
                .load_until(&Method::GET, &url, None, 4, Some(stop))
                .await
        })
    };
    let load_started = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    apply(
        &cluster,
        "split-50-50",
        &traffic_split("web-split", "web", &[("web-v1", 50), ("web-v2", 50)]),
    );
    let switched = load_started.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    let answers = rt.block_on(load).expect("load task");
    let ok = answers.iter().filter(|a| a.ok()).count();
    let before: Vec<Answer> = answers
        .iter()
        .filter(|a| a.sent_at < Duration::from_millis(1400))
        .cloned()
        .collect();
    let after: Vec<Answer> = answers
        .iter()
        .filter(|a| a.sent_at > switched)
        .cloned()
        .collect();
    let share_before = percent(
        by_backend(&before).get("web-v2").copied().unwrap_or(0),
        before.len(),
    );
    let share_after = percent(
        by_backend(&after).get("web-v2").copied().unwrap_or(0),
        after.len(),
    );
    println!(
        "re-split under load: {} requests, {ok} ok, {} failed; new policy in force at a1 after {switched:?}; \
         web-v2 share {share_before:.1}% of {} before, {share_after:.1}% of {} after",
        answers.len(),
        answers.len() - ok,
        before.len(),
        after.len()
    );
    assert_eq!(
        ok,
        answers.len(),
        "requests failed during the re-split: {:?}; first failures {:?}",
        statuses(&answers),
        first_failures(&answers)
    );
    assert!(
        before.len() >= 200 && after.len() >= 500,
        "too few requests to judge: {} before, {} after",
        before.len(),
        after.len()
    );
    assert!(
        share_before < 16.0,
        "web-v2 share before the re-split {share_before:.1}%"
    );
    assert!(
        (42.0..=58.0).contains(&share_after),
        "web-v2 share after the re-split {share_after:.1}% of {} requests, not about 50%",
        after.len()
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Retries and the retry budget
// ---------------------------------------------------------------------------------------------

fn retries(agent: &TestAgent) -> f64 {
    agent_metric(
        agent,
        "weft_http_retries_total",
        &[("destination", "default/api"), ("reason", "status")],
    )
}

/// `api` on a2 (A, failing half its requests with 503) and a3 (B, healthy), called from a1.
/// With `retry: {attempts: 2, codes: [503]}`: GETs succeed (≥ 99.9 %); POSTs are not retried
/// (some fail) until `nonIdempotent: true`; with both endpoints failing half their requests
/// and a budget of 20 % with no minimum, retries stay within 20 % of the requests.
#[test]
fn retries_recover_idempotent_requests_within_the_budget() {
    let _turn = serial();
    let rt = runtime();
    let a = Backend::start("api-a");
    let b = Backend::start("api-b");
    a.set_failing(0.5);
    let up = free_port();
    let (pa, pb) = (a.port, b.port);
    let cluster = start_mesh(
        |name| match name {
            "a1" => upstream("api", up),
            "a2" => service("api", pa, "http"),
            "a3" => service("api", pb, "http"),
            _ => String::new(),
        },
        0,
        &[("api", &["a2", "a3"])],
    );
    let a1 = &cluster.agents[0];
    let url = format!("http://127.0.0.1:{up}/item");
    let client = Client::default();
    // A budget that lets every failed first attempt be retried: this phase shows the retry
    // rule, the last phase the budget.
    let retry = |non_idempotent: bool, budget: &str| {
        route_policy(
            "api",
            &format!(
                "  retry:\n    attempts: 2\n    codes: [503]\n    backoff: 1ms\n    nonIdempotent: {non_idempotent}\n  retryBudget:\n{budget}"
            ),
        )
    };
    let generous = "    percent: 100\n    minRetriesPerSecond: 100\n";
    apply(&cluster, "retry", &retry(false, generous));

    // GETs.
    let (r0, a_failed0) = (retries(a1), a.counts().failed());
    let answers = rt.block_on(client.load(&Method::GET, &url, 2000, 4));
    let ok = answers.iter().filter(|x| x.ok()).count();
    let get_retries = retries(a1) - r0;
    let a_failed = a.counts().failed() - a_failed0;
    println!(
        "GET with retry {{attempts: 2, codes: [503]}}: {ok}/2000 succeeded ({:.2}%); \
         A answered 503 {a_failed} times, weft_http_retries_total{{reason=\"status\"}} +{get_retries}; \
         A got {} GETs, B {}",
        percent(ok, 2000),
        a.counts().method("GET"),
        b.counts().method("GET"),
    );
    assert!(
        ok >= 1998,
        "only {ok} of 2000 GETs succeeded: {:?}",
        statuses(&answers)
    );
    // The balancer steers away from A's failures, so A sees anywhere from ~10 % to half of
    // the GETs (231 of 2,115 in one CI run); 50 failures still exercise the retry rule.
    assert!(
        a_failed >= 50,
        "A failed only {a_failed} requests: the retries were hardly tested"
    );
    assert!(
        get_retries >= a_failed as f64,
        "{get_retries} retries for {a_failed} 503s"
    );

    // POSTs are not retried without nonIdempotent.
    let (r0, a_failed0) = (retries(a1), a.counts().failed());
    let answers = rt.block_on(client.load(&Method::POST, &url, 1000, 4));
    let failed: Vec<&Answer> = answers.iter().filter(|x| !x.ok()).collect();
    let post_retries = retries(a1) - r0;
    let a_failed = a.counts().failed() - a_failed0;
    println!(
        "POST without nonIdempotent: {} of 1000 failed (all 503 from A: {a_failed}), retries +{post_retries}",
        failed.len()
    );
    assert!(
        !failed.is_empty(),
        "no POST failed although A failed {a_failed}"
    );
    assert_eq!(
        failed.len() as u64,
        a_failed,
        "every 503 of A reached the client, and nothing else failed: {:?}",
        statuses(&answers)
    );
    assert!(
        failed.iter().all(|x| x.status == 503 && x.body == "api-a"),
        "the failures are A's own answers: {:?}",
        &failed[..failed.len().min(3)]
    );
    assert_eq!(post_retries, 0.0, "POSTs were retried");

    // With nonIdempotent, POSTs are retried too.
    apply(&cluster, "retry-post", &retry(true, generous));
    let answers = rt.block_on(client.load(&Method::POST, &url, 1000, 4));
    let ok = answers.iter().filter(|x| x.ok()).count();
    println!("POST with nonIdempotent: {ok}/1000 succeeded");
    assert!(
        ok >= 999,
        "only {ok} of 1000 POSTs succeeded with nonIdempotent: {:?}",
        statuses(&answers)
    );

    // The budget: both endpoints fail half their requests, so about three retries would be
    // wanted for every four requests; a budget of 20 % with no minimum allows one in five.
    b.set_failing(0.5);
    apply(
        &cluster,
        "retry-budget",
        &retry(false, "    percent: 20\n    minRetriesPerSecond: 0\n"),
    );
    let (r0, failed0) = (retries(a1), a.counts().failed() + b.counts().failed());
    let answers = rt.block_on(client.load(&Method::GET, &url, 2000, 4));
    let ok = answers.iter().filter(|x| x.ok()).count();
    let budget_retries = retries(a1) - r0;
    let backend_503s = a.counts().failed() + b.counts().failed() - failed0;
    println!(
        "budget 20%, min 0/s, both endpoints failing 50%: 2000 GETs, {ok} ok, {} failed; \
         retries +{budget_retries} ({:.1}% of requests); backends answered 503 {backend_503s} times",
        2000 - ok,
        budget_retries / 20.0,
    );
    assert!(
        budget_retries <= 2000.0 * 0.20 + 25.0,
        "{budget_retries} retries for 2000 requests exceed the 20% budget"
    );
    assert!(
        budget_retries >= 2000.0 * 0.15,
        "only {budget_retries} retries: the budget was not used"
    );
    assert!(
        ok < 1990,
        "{ok} of 2000 succeeded: the budget did not limit retries"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Timeouts
// ---------------------------------------------------------------------------------------------

/// `orders` answers after 2 s; with `timeouts.request: 300ms` the client gets 504 with
/// `weft-error: timeout` after about 300 ms.
#[test]
fn a_request_timeout_answers_504_in_time() {
    let _turn = serial();
    let rt = runtime();
    let slow = Backend::start("orders");
    slow.set_delay(Duration::from_secs(2));
    let up = free_port();
    let port = slow.port;
    let cluster = start_mesh(
        |name| match name {
            "a1" => upstream("orders", up),
            "a2" => service("orders", port, "http"),
            _ => String::new(),
        },
        0,
        &[("orders", &["a2"])],
    );
    let url = format!("http://127.0.0.1:{up}/slow");
    let client = Client::default();
    // Without a policy the slow answer arrives.
    let answer = rt.block_on(client.request(&Method::GET, &url));
    println!(
        "no timeout: {} {:?} after {:?}",
        answer.status, answer.body, answer.latency
    );
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(answer.latency >= Duration::from_secs(2));

    apply(
        &cluster,
        "timeout",
        &route_policy("orders", "  timeouts:\n    request: 300ms\n"),
    );
    let mut latencies = Vec::new();
    for _ in 0..5 {
        let answer = rt.block_on(client.request(&Method::GET, &url));
        println!(
            "timeout 300ms: {} weft-error={:?} after {:?}",
            answer.status, answer.weft_error, answer.latency
        );
        assert_eq!(answer.status, 504, "{answer:?}");
        assert_eq!(answer.weft_error.as_deref(), Some("timeout"), "{answer:?}");
        assert!(
            (Duration::from_millis(250)..=Duration::from_millis(800)).contains(&answer.latency),
            "504 after {:?}, not about 300 ms",
            answer.latency
        );
        latencies.push(answer.latency);
    }
    latencies.sort();
    println!("timeout latencies (sorted): {latencies:?}");
    let counted = agent_metric(
        &cluster.agents[0],
        "weft_http_requests_total",
        &[
            ("direction", "outbound"),
            ("destination", "default/orders"),
            ("code_class", "5xx"),
        ],
    );
    assert_eq!(counted, 5.0, "the five 504s were counted as 5xx");
}

// ---------------------------------------------------------------------------------------------
// 4. Balancing
// ---------------------------------------------------------------------------------------------

/// `api` on a2 answering in 200 ms and on a3 in 20 ms, two requests at a time: over 1,000
/// requests the slow one gets a small share. The delays are well above the mesh's own
/// latency (a few milliseconds, spiking past 100 ms in a debug build on a busy machine), so
/// that the endpoints' latencies as the caller sees them differ by far.
#[test]
fn a_slow_endpoint_gets_a_small_share() {
    let _turn = serial();
    let rt = runtime();
    let slow = Backend::start("api-slow");
    let fast = Backend::start("api-fast");
    slow.set_delay(Duration::from_millis(200));
    fast.set_delay(Duration::from_millis(20));
    let up = free_port();
    let (ps, pf) = (slow.port, fast.port);
    let _cluster = start_mesh(
        |name| match name {
            "a1" => upstream("api", up),
            "a2" => service("api", ps, "http"),
            "a3" => service("api", pf, "http"),
            _ => String::new(),
        },
        0,
        &[("api", &["a2", "a3"])],
    );
    let url = format!("http://127.0.0.1:{up}/");
    let client = Client::default();
    let started = Instant::now();
    let answers = rt.block_on(client.load(&Method::GET, &url, 1000, 2));
    let took = started.elapsed();
    let shares = by_backend(&answers);
    let ok = answers.iter().filter(|x| x.ok()).count();
    let n_slow = shares.get("api-slow").copied().unwrap_or(0);
    let mut latencies: Vec<Duration> = answers.iter().map(|a| a.latency).collect();
    latencies.sort();
    println!(
        "balancing 200 ms vs 20 ms: 1000 requests in {took:?}, {ok} ok; slow endpoint got {n_slow} ({:.1}%), \
         fast {}; client latency p50 {:?}, p99 {:?}",
        percent(n_slow, 1000),
        shares.get("api-fast").copied().unwrap_or(0),
        latencies[500],
        latencies[990],
    );
    let per_hundred: Vec<usize> = answers
        .chunks(100)
        .map(|chunk| chunk.iter().filter(|a| a.body == "api-slow").count())
        .collect();
    println!("slow endpoint's answers per 100 requests, in order: {per_hundred:?}");
    assert_eq!(ok, 1000, "{:?}", statuses(&answers));
    assert!(
        n_slow > 0,
        "the slow endpoint was never tried: was it routable?"
    );
    assert!(
        percent(n_slow, 1000) < 25.0,
        "the 10x slower endpoint got {n_slow} of 1000 requests"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Outlier ejection
// ---------------------------------------------------------------------------------------------

/// `api` on a2 always answering 503, on a3 healthy, no retry policy: a2 is ejected after a
/// few requests and the rest go to a3; made healthy, a2 gets requests again only after its
/// ejection time (10 s).
#[test]
fn a_failing_endpoint_is_ejected_and_readmitted() {
    let _turn = serial();
    let rt = runtime();
    let bad = Backend::start("api-bad");
    let good = Backend::start("api-good");
    let up = free_port();
    let (pb, pg) = (bad.port, good.port);
    let cluster = start_mesh(
        |name| match name {
            "a1" => upstream("api", up),
            "a2" => service("api", pb, "http"),
            "a3" => service("api", pg, "http"),
            _ => String::new(),
        },
        0,
        &[("api", &["a2", "a3"])],
    );
    let a1 = &cluster.agents[0];
    let ejections = || {
        agent_metric(
            a1,
            "weft_http_endpoint_ejections_total",
            &[("destination", "default/api")],
        )
    };
    let url = format!("http://127.0.0.1:{up}/");
    let client = Client::default();
    assert_eq!(ejections(), 0.0);

    // The healthy endpoint answers slowly at first: the balancer then prefers the failing one
    // whichever connection was made first (the first request to an endpoint includes its
    // connection setup in the latency the balancer keeps), so it fails its way to ejection
    // within a few requests; and once usable again it is the cheaper one, so it gets
    // requests as soon as its ejection time is up.
    bad.set_failing(1.0);
    good.set_delay(Duration::from_millis(300));

    // Sequential requests until the bad endpoint is ejected.
    let mut sent = 0;
    let mut failed = 0;
    let bad_before = bad.counts().total();
    let mut trail = Vec::new();
    let ejected_at = loop {
        let answer = rt.block_on(client.request(&Method::GET, &url));
        sent += 1;
        trail.push(format!(
            "{} {} {:?}",
            answer.body, answer.status, answer.latency
        ));
        if !answer.ok() {
            failed += 1;
            assert_eq!(answer.status, 503, "{answer:?}");
        }
        if ejections() >= 1.0 {
            break Instant::now();
        }
        assert!(
            sent < 200,
            "no ejection after {sent} requests ({failed} failed)"
        );
    };
    println!(
        "ejected after {sent} requests: {failed} failed (bad endpoint got {}), ejections_total = {}; answers {trail:?}",
        bad.counts().total() - bad_before,
        ejections()
    );
    assert!(failed >= 5, "ejected after only {failed} failures");

    // While ejected, requests go to the healthy endpoint; the bad one recovers meanwhile, but
    // gets nothing until its ejection time is up.
    bad.set_failing(0.0);
    good.set_delay(Duration::ZERO);
    let bad_before = bad.counts().total();
    let answers = rt.block_on(client.load(&Method::GET, &url, 300, 2));
    let ok = answers.iter().filter(|x| x.ok()).count();
    let during = bad.counts().total() - bad_before;
    println!(
        "while ejected ({:?} in): {ok}/300 ok, bad endpoint got {during}",
        ejected_at.elapsed()
    );
    assert!(
        ejected_at.elapsed() < Duration::from_secs(9),
        "the load took too long to judge the ejection"
    );
    assert_eq!(ok, 300, "{:?}", statuses(&answers));
    assert!(
        during == 0,
        "the ejected endpoint got {during} of 300 requests"
    );

    // Readmission: a steady trickle until the recovered endpoint answers again.
    let readmitted = loop {
        let answer = rt.block_on(client.request(&Method::GET, &url));
        assert!(answer.ok(), "{answer:?}");
        if answer.body == "api-bad" {
            break ejected_at.elapsed();
        }
        assert!(
            ejected_at.elapsed() < Duration::from_secs(20),
            "the recovered endpoint was not readmitted within 20 s; a1 sees {:?}; bad endpoint \
             got {} requests in all; ejections {}, connect retries {}\n{}",
            a1.endpoints("default/api"),
            bad.counts().total(),
            ejections(),
            agent_metric(a1, "weft_http_retries_total", &[("reason", "connect")]),
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let answers = rt.block_on(client.load(&Method::GET, &url, 200, 2));
    let shares = by_backend(&answers);
    println!(
        "readmitted {readmitted:?} after the ejection; next 200 requests: {shares:?}; ejections_total = {}",
        ejections()
    );
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(14)).contains(&readmitted),
        "readmitted {readmitted:?} after the ejection, not when its 10 s ejection time was up"
    );
    assert_eq!(ejections(), 1.0, "ejected again");
    assert_eq!(by_backend(&answers).values().sum::<usize>(), 200);
    assert!(
        shares.get("api-bad").copied().unwrap_or(0) > 0,
        "the readmitted endpoint got none of 200 requests"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. gRPC
// ---------------------------------------------------------------------------------------------

/// A hand-written gRPC service `weft.test.Greeter` (no codegen): `Say` (unary) and `Count`
/// (server streaming), messages by prost derive.
mod greeter {
    use std::future::Future;
    use std::pin::Pin;

    use tokio_stream::wrappers::ReceiverStream;
    use tonic::{Request, Response, Status};

    pub const SAY: &str = "/weft.test.Greeter/Say";
    pub const COUNT: &str = "/weft.test.Greeter/Count";

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Hello {
        #[prost(string, tag = "1")]
        pub name: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CountRequest {
        #[prost(uint32, tag = "1")]
        pub n: u32,
        /// Bytes of padding in each message.
        #[prost(uint32, tag = "2")]
        pub size: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Reply {
        #[prost(string, tag = "1")]
        pub text: String,
        #[prost(uint32, tag = "2")]
        pub index: u32,
        #[prost(bytes = "vec", tag = "3")]
        pub padding: Vec<u8>,
    }

    type Boxed<T> = Pin<Box<dyn Future<Output = Result<Response<T>, Status>> + Send>>;

    pub struct Say(pub String);

    impl tonic::server::UnaryService<Hello> for Say {
        type Response = Reply;
        type Future = Boxed<Reply>;
        fn call(&mut self, request: Request<Hello>) -> Self::Future {
            let node = self.0.clone();
            Box::pin(async move {
                let name = request.into_inner().name;
                if name.is_empty() {
                    return Err(Status::invalid_argument("a name is required"));
                }
                Ok(Response::new(Reply {
                    text: format!("hello {name} from {node}"),
                    index: 0,
                    padding: Vec::new(),
                }))
            })
        }
    }

    pub struct Count;

    impl tonic::server::ServerStreamingService<CountRequest> for Count {
        type Response = Reply;
        type ResponseStream = ReceiverStream<Result<Reply, Status>>;
        type Future = Boxed<Self::ResponseStream>;
        fn call(&mut self, request: Request<CountRequest>) -> Self::Future {
            Box::pin(async move {
                let CountRequest { n, size } = request.into_inner();
                let (tx, rx) = tokio::sync::mpsc::channel(16);
                tokio::spawn(async move {
                    for index in 0..n {
                        let reply = Reply {
                            text: format!("message {index}"),
                            index,
                            padding: vec![(index % 251) as u8; size as usize],
                        };
                        if tx.send(Ok(reply)).await.is_err() {
                            return;
                        }
                    }
                });
                Ok(Response::new(ReceiverStream::new(rx)))
            })
        }
    }
}

/// Serves the greeter over h2c on `listener` until the runtime stops.
async fn serve_greeter(listener: tokio::net::TcpListener, node: &'static str) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                move |request: hyper::Request<hyper::body::Incoming>| async move {
                    let response = match request.uri().path() {
                        greeter::SAY => {
                            tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
                                .unary(greeter::Say(node.to_string()), request)
                                .await
                        }
                        greeter::COUNT => {
                            tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
                                .server_streaming(greeter::Count, request)
                                .await
                        }
                        _ => tonic::Status::unimplemented("no such method").into_http(),
                    };
                    Ok::<_, Infallible>(response)
                },
            );
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// The greeter registered on a2 as `greeter` (protocol `grpc`), called with a tonic client
/// through an upstream on a3: unary calls answer (and a gRPC error status arrives as such),
/// and a stream of 2,000 messages arrives complete and in order.
#[test]
fn grpc_unary_and_server_streaming_through_the_mesh() {
    let _turn = serial();
    let rt = runtime();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind greeter");
    let port = listener.local_addr().expect("greeter address").port();
    rt.spawn(serve_greeter(listener, "a2"));
    let up = free_port();
    let cluster = start_mesh(
        |name| match name {
            "a2" => service("greeter", port, "grpc"),
            "a3" => upstream("greeter", up),
            _ => String::new(),
        },
        2,
        &[("greeter", &["a2"])],
    );
    let result: Result<(), String> = rt.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{up}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        let mut grpc = tonic::client::Grpc::new(channel);
        let path = |p: &'static str| hyper::http::uri::PathAndQuery::from_static(p);

        // Unary, several times on one connection.
        let started = Instant::now();
        for i in 0..20 {
            grpc.ready().await.map_err(|e| format!("ready: {e}"))?;
            let reply: greeter::Reply = grpc
                .unary(
                    tonic::Request::new(greeter::Hello {
                        name: format!("caller-{i}"),
                    }),
                    path(greeter::SAY),
                    tonic_prost::ProstCodec::default(),
                )
                .await
                .map_err(|s| format!("unary call {i}: {s:?}"))?
                .into_inner();
            if reply.text != format!("hello caller-{i} from a2") {
                return Err(format!("unary call {i} answered {:?}", reply.text));
            }
        }
        println!("gRPC: 20 unary calls answered in {:?}", started.elapsed());

        // A gRPC error status (trailers-only answer) arrives as such.
        grpc.ready().await.map_err(|e| format!("ready: {e}"))?;
        let refused = grpc
            .unary::<_, greeter::Reply, _>(
                tonic::Request::new(greeter::Hello {
                    name: String::new(),
                }),
                path(greeter::SAY),
                tonic_prost::ProstCodec::default(),
            )
            .await;
        match refused {
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                println!("gRPC: error status passed through: {:?} {:?}", status.code(), status.message());
            }
            other => return Err(format!("an empty name answered {other:?}, not InvalidArgument")),
        }

        // Server streaming: 2,000 messages of 1 KiB.
        let n = 2000u32;
        let started = Instant::now();
        grpc.ready().await.map_err(|e| format!("ready: {e}"))?;
        let mut stream = grpc
            .server_streaming::<_, greeter::Reply, _>(
                tonic::Request::new(greeter::CountRequest { n, size: 1024 }),
                path(greeter::COUNT),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .map_err(|s| format!("stream call: {s:?}"))?
            .into_inner();
        let mut received = 0u32;
        while let Some(reply) = stream
            .message()
            .await
            .map_err(|s| format!("stream after {received} messages: {s:?}"))?
        {
            if reply.index != received
                || reply.text != format!("message {received}")
                || reply.padding.len() != 1024
                || reply.padding.iter().any(|b| *b != (received % 251) as u8)
            {
                return Err(format!("message {received} arrived as {:?} ({} bytes)", reply.text, reply.padding.len()));
            }
            received += 1;
        }
        let took = started.elapsed();
        println!(
            "gRPC: server stream of {received} messages (1 KiB each) arrived complete and in order in {took:?}"
        );
        if received != n {
            return Err(format!("{received} of {n} messages arrived"));
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}\n{}", cluster.logs());
    }
    let a3 = &cluster.agents[2];
    let counted = agent_metric(
        a3,
        "weft_http_requests_total",
        &[
            ("direction", "outbound"),
            ("destination", "default/greeter"),
        ],
    );
    println!("a3 weft_http_requests_total{{destination=\"default/greeter\"}} = {counted}");
    assert_eq!(counted, 22.0, "each gRPC call was one request");
}

// ---------------------------------------------------------------------------------------------
// 7. HTTP/2 load with h2load
// ---------------------------------------------------------------------------------------------

/// Runs `h2load args url` bounded by `limit`; returns its output.
fn h2load(args: &[&str], url: &str, limit: Duration) -> String {
    let mut child = Command::new("h2load")
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn h2load (Debian package nghttp2-client)");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait h2load").is_some() {
            break;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("h2load did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("h2load output");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The number before `label` on h2load's `requests:` line, e.g. `succeeded`.
fn h2load_count(output: &str, line: &str, label: &str) -> Option<u64> {
    let text = output.lines().find(|l| l.trim_start().starts_with(line))?;
    let words: Vec<&str> = text.split([' ', ',']).filter(|w| !w.is_empty()).collect();
    words
        .windows(2)
        .find(|w| w[1] == label)
        .and_then(|w| w[0].parse().ok())
}

/// Real `h2load` (2,000 requests, 4 connections, 10 streams each) on upstream listeners of
/// an `http2` service and of an `http` one: no request fails.
#[test]
fn h2load_through_upstreams_has_no_errors() {
    let _turn = serial();
    let h2 = Backend::start("web");
    let h1 = Backend::start("api");
    let (up_h2, up_h1) = (free_port(), free_port());
    let (p2, p1) = (h2.port, h1.port);
    let cluster = start_mesh(
        |name| match name {
            "a2" => service("web", p2, "http2") + &service("api", p1, "http"),
            "a3" => upstream("web", up_h2) + &upstream("api", up_h1),
            _ => String::new(),
        },
        2,
        &[("web", &["a2"]), ("api", &["a2"])],
    );
    for (service, port, backend) in [("web", up_h2, &h2), ("api", up_h1, &h1)] {
        let output = h2load(
            &["-n", "2000", "-c", "4", "-m", "10"],
            &format!("http://127.0.0.1:{port}/"),
            Duration::from_secs(60),
        );
        let succeeded = h2load_count(&output, "requests:", "succeeded");
        let failed = h2load_count(&output, "requests:", "failed");
        let errored = h2load_count(&output, "requests:", "errored");
        let ok_2xx = h2load_count(&output, "status codes:", "2xx");
        let rate = output
            .lines()
            .find(|l| l.starts_with("finished in"))
            .unwrap_or("")
            .to_string();
        println!(
            "h2load -n 2000 -c 4 -m 10 on the {service} upstream: {rate}; succeeded {succeeded:?}, failed {failed:?}, errored {errored:?}, 2xx {ok_2xx:?}; backend got {}",
            backend.counts().total()
        );
        assert!(
            succeeded == Some(2000)
                && failed == Some(0)
                && errored == Some(0)
                && ok_2xx == Some(2000),
            "h2load on {service}:\n{output}\n{}",
            cluster.agents[2].log()
        );
        assert_eq!(backend.counts().method("GET"), 2000);
    }
}

/// A strict server behind the mesh: nginx, which refuses an HTTP/2 request carrying both
/// `:authority` and Host. Registered as an `http2` service (h2c) and as an `http` service,
/// reached by apps over HTTP/1.1 and h2c: every request of `h2load` succeeds with the file.
#[test]
fn nginx_serves_every_request_through_the_mesh() {
    let _turn = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let nginx = Nginx::start(dir.path()).expect("start nginx");
    let (up_h2, up_h1) = (free_port(), free_port());
    let (h2_port, http_port) = (nginx.h2_port, nginx.http_port);
    let cluster = start_mesh(
        |name| match name {
            "a2" => service("web", h2_port, "http2") + &service("api", http_port, "http"),
            "a3" => upstream("web", up_h2) + &upstream("api", up_h1),
            _ => String::new(),
        },
        2,
        &[("web", &["a2"]), ("api", &["a2"])],
    );
    for (service, port) in [("web (http2)", up_h2), ("api (http)", up_h1)] {
        for (client, args) in [
            ("h2c", &["-n", "300", "-c", "2", "-m", "4"][..]),
            ("HTTP/1.1", &["--h1", "-n", "300", "-c", "2"][..]),
        ] {
            let output = h2load(
                args,
                &format!("http://127.0.0.1:{port}/1k"),
                Duration::from_secs(60),
            );
            let ok_2xx = h2load_count(&output, "status codes:", "2xx");
            let bytes = output
                .lines()
                .find(|l| l.starts_with("traffic:"))
                .unwrap_or("")
                .to_string();
            println!("{client} app → {service}: 2xx {ok_2xx:?}; {bytes}");
            assert_eq!(
                ok_2xx,
                Some(300),
                "{client} app → nginx as {service}:\n{output}\n{}\n{}",
                std::fs::read_to_string(dir.path().join("nginx-error.log")).unwrap_or_default(),
                cluster.agents[2].log()
            );
        }
    }
}
