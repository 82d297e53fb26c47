//! Policy tests: parsing every kind in every accepted shape (transcribed from the SMI spec,
//! `research/specs.md` and the smi-controller-sdk feature samples), every validation error's
//! exact one-line message, the Meshery SMI conformance scenarios at engine level, and the
//! decision cost.
//!
//! Transcribed samples keep their source in a comment: `servicemeshinterface/smi-spec`
//! (Apache-2.0), `servicemeshinterface/smi-controller-sdk` (Apache-2.0) and
//! `layer5io/learn-layer5` (Apache-2.0).

use std::time::{Duration, Instant};

use hyper::HeaderMap;
use hyper::header::HeaderValue;
use weft_ca::{SpiffeId, TrustDomain};
use weft_discovery::ServiceKey;

use super::engine::{Decision, DecisionReason, Engine, HttpRequest, Request};
use super::model::{
    DEFAULT_RETRY_BACKOFF, DEFAULT_RETRY_CODES, DefaultPolicy, HttpMethod, Kind, PathRegexMatch,
    PolicyError, PolicySet, Retry, RetryBudget, RouteKind, Subject, Timeouts, parse_duration,
};

// ---- helpers ---------------------------------------------------------------------------------

fn parse(files: &[(&str, &str)]) -> PolicySet {
    PolicySet::parse_files(files).unwrap_or_else(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        panic!("expected a valid set, got:\n{}", lines.join("\n"))
    })
}

fn parse_one(text: &str) -> PolicySet {
    parse(&[("p.yaml", text)])
}

fn errors_of(files: &[(&str, &str)]) -> Vec<String> {
    match PolicySet::parse_files(files) {
        Ok(_) => panic!("expected errors"),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

fn errors(text: &str) -> Vec<String> {
    errors_of(&[("p.yaml", text)])
}

fn warnings(set: &PolicySet) -> Vec<String> {
    set.warnings().iter().map(ToString::to_string).collect()
}

fn td() -> TrustDomain {
    TrustDomain::new("prod.example.com").unwrap()
}

fn sa(namespace: &str, name: &str) -> SpiffeId {
    SpiffeId::service(&td(), namespace, name).unwrap()
}

fn key(namespace: &str, name: &str) -> ServiceKey {
    ServiceKey::new(namespace, name)
}

fn engine(text: &str) -> Engine {
    Engine::new(&parse_one(text), &td())
}

fn tcp(engine: &Engine, from: &SpiffeId, to: &ServiceKey, port: u16) -> Decision {
    engine.decide(&Request {
        source: from,
        destination: to,
        port,
        http: None,
    })
}

fn http(
    engine: &Engine,
    from: &SpiffeId,
    to: &ServiceKey,
    port: u16,
    method: &str,
    path: &str,
    headers: &HeaderMap,
) -> Decision {
    engine.decide(&Request {
        source: from,
        destination: to,
        port,
        http: Some(HttpRequest {
            method,
            path,
            headers,
        }),
    })
}

// ---- samples ---------------------------------------------------------------------------------

/// `research/specs.md` §1.3.4, from smi-spec `apis/traffic-access/v1alpha3/traffic-access.md`.
const SPEC_EXAMPLE: &str = r#"apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: api-port, namespace: default}
spec:
  matches:            # NOTE: an object here, unlike HTTPRouteGroup where it is a list
    ports: [8080]
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: api-routes, namespace: default}
spec:
  matches:
  - name: api
    pathRegex: /api
    methods: ["*"]
  - name: metrics
    pathRegex: /metrics
    methods: ["GET"]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: api-service-metrics, namespace: default}
spec:
  destination: {kind: ServiceAccount, name: api-service, namespace: default}
  rules:
  - {kind: TCPRoute, name: api-port}
  - {kind: HTTPRouteGroup, name: api-routes, matches: [metrics]}
  sources:
  - {kind: ServiceAccount, name: prometheus, namespace: default}
"#;

/// `research/specs.md` Appendix A (illustrative complete host policy set).
const APPENDIX_A: &str = r#"# /etc/mesh/policy/payments.yaml      (trust domain configured as prod.example.com)
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: ledger-routes, namespace: payments}
spec:
  matches:
  - {name: read,    pathRegex: "/v1/ledger", methods: [GET, HEAD]}
  - {name: write,   pathRegex: "/v1/ledger", methods: [POST]}
  - {name: metrics, pathRegex: "/metrics",   methods: [GET]}
  - name: debug-canary
    headers: {x-canary: "true"}          # map form; list form [{x-canary: "true"}] also accepted
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: ledger-http, namespace: payments}
spec: {matches: {ports: [8443]}}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: ledger-writers, namespace: payments}
spec:
  destination: {kind: ServiceAccount, name: ledger}      # -> spiffe://prod.example.com/ns/payments/sa/ledger
  rules:
  - {kind: TCPRoute, name: ledger-http}
  - {kind: HTTPRouteGroup, name: ledger-routes, matches: [read, write]}
  sources:
  - {kind: ServiceAccount, name: checkout}               # -> .../ns/payments/sa/checkout
  - {kind: SPIFFEID, name: "spiffe://partner.example.net/billing"}   # extension, federated trust domain
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: ledger-canary, namespace: payments}
spec:
  service: ledger
  backends:
  - {service: ledger-v1, weight: 95}
  - {service: ledger-v2, weight: 5}
"#;

/// `research/specs.md` §1.5, from smi-spec `apis/traffic-split/v1alpha4/traffic-split.md`
/// (with the `spec:` the spec's own HTTPRouteGroup example forgot).
const SPLIT_EXAMPLES: &str = r#"apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: canary, namespace: default}
spec:
  service: website
  backends:
  - {service: website-v1, weight: 90}
  - {service: website-v2, weight: 10}
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: ab-test}
spec:
  service: website
  matches: [{kind: HTTPRouteGroup, name: ab-test}]
  backends:
  - {service: website-v1, weight: 0}
  - {service: website-v2, weight: 100}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: ab-test}
spec:                       # the spec's own example omits `spec:`; that is a doc bug
  matches:
  - name: firefox-users
    headers: {user-agent: ".*Firefox.*"}
"#;

/// Routes the smi-controller-sdk TrafficTarget samples refer to (the samples only show the
/// targets; these make each set complete).
const THE_ROUTES: &str = r#"apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: the-routes, namespace: default}
spec:
  matches:
  - {name: metrics, pathRegex: /metrics, methods: [GET]}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: the-routes, namespace: default}
spec: {matches: {ports: [8080]}}
"#;

// smi-controller-sdk `test/features/access.feature` (commit 0b86a82), three scenarios.
const SDK_ACCESS_V1ALPHA3: &str = r#"apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata:
  name: path-specific
  namespace: default
spec:
  destination:
    kind: ServiceAccount
    name: service-a
    namespace: default
  rules:
  - kind: TCPRoute
    name: the-routes
  - kind: HTTPRouteGroup
    name: the-routes
    matches:
    - metrics
  sources:
  - kind: ServiceAccount
    name: prometheus
    namespace: default
"#;

const SDK_ACCESS_V1ALPHA2: &str = r#"apiVersion: access.smi-spec.io/v1alpha2
kind: TrafficTarget
metadata:
  name: path-specific
  namespace: default
spec:
  destination:
    kind: ServiceAccount
    name: service-a
    namespace: default
    port: 8080
  rules:
  - kind: HTTPRouteGroup
    name: the-routes
    matches:
    - metrics
  sources:
  - kind: ServiceAccount
    name: prometheus
    namespace: default
"#;

const SDK_ACCESS_V1ALPHA1: &str = r#"apiVersion: access.smi-spec.io/v1alpha1
kind: TrafficTarget
metadata:
  name: path-specific
  namespace: default
destination:
  kind: ServiceAccount
  name: service-a
  namespace: default
  port: 8080
specs:
- kind: HTTPRouteGroup
  name: the-routes
  matches:
  - metrics
sources:
- kind: ServiceAccount
  name: prometheus
  namespace: default
"#;

/// The HTTPRouteGroup of smi-controller-sdk `test/features/specs.feature`, per version:
/// v1alpha1/2 put `matches` at the top level, v1alpha3/4 under `spec`; v1alpha4 adds headers.
fn sdk_http_route_group(version: u8) -> String {
    let matches = "- name: metrics\n  pathRegex: \"/metrics\"\n  methods:\n  - GET\n  headers:\n    x-debug: \"1\"\n- name: health\n  pathRegex: \"/ping\"\n  methods: [\"*\"]\n";
    let matches = if version == 4 {
        matches.to_string()
    } else {
        matches.replace("  headers:\n    x-debug: \"1\"\n", "")
    };
    let body = if version <= 2 {
        format!("matches:\n{matches}")
    } else {
        let indented: String = matches.lines().map(|l| format!("  {l}\n")).collect();
        format!("spec:\n  matches:\n{indented}")
    };
    format!(
        "apiVersion: specs.smi-spec.io/v1alpha{version}\nkind: HTTPRouteGroup\nmetadata:\n  name: the-routes\n{body}"
    )
}

// smi-controller-sdk `test/features/split.feature` (commit 0b86a82).
const SDK_SPLIT_V1ALPHA1: &str = r#"apiVersion: split.smi-spec.io/v1alpha1
kind: TrafficSplit
metadata:
  name: trafficsplit-sample
spec:
  service: foo
  backends:
    - service: bar
      weight: 50m
    - service: baz
      weight: 50m
"#;

const SDK_SPLIT_V1ALPHA2: &str = r#"apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata:
  name: trafficsplit-sample
spec:
  service: foo
  backends:
    - service: bar
      weight: 50
    - service: baz
      weight: 50
"#;

/// v1alpha3 and v1alpha4 scenarios: the split, and an HTTPRouteGroup with no apiVersion,
/// top-level matches and list-form headers.
fn sdk_split_ab_test(version: u8) -> String {
    format!(
        r#"apiVersion: split.smi-spec.io/v1alpha{version}
kind: TrafficSplit
metadata:
  name: ab-test
spec:
  service: website
  matches:
  - kind: HTTPRouteGroup
    name: ab-test
  backends:
  - service: website-v1
    weight: 0
  - service: website-v2
    weight: 100
---
kind: HTTPRouteGroup
metadata:
  name: ab-test
matches:
- name: firefox-users
  headers:
  - user-agent: ".*Firefox.*"
"#
    )
}

// ---- parsing ---------------------------------------------------------------------------------

#[test]
fn the_spec_example_parses_into_typed_documents() {
    let set = parse_one(SPEC_EXAMPLE);
    assert_eq!(set.tcp_routes()[0].ports, vec![8080]);
    let group = &set.http_route_groups()[0];
    assert_eq!(group.meta.name, "api-routes");
    assert_eq!(group.matches[0].methods, vec![HttpMethod::Any]);
    assert_eq!(group.matches[1].path_regex.as_deref(), Some("/metrics"));
    assert_eq!(group.matches[1].methods, vec![HttpMethod::Get]);
    let target = &set.traffic_targets()[0];
    assert_eq!(target.meta.namespace, "default");
    assert_eq!(target.meta.origin.document, 3);
    assert_eq!(target.meta.origin.line, 20);
    assert_eq!(target.meta.origin.to_string(), "p.yaml:20 (document 3)");
    assert_eq!(target.destination, key("default", "api-service"));
    assert_eq!(target.destination_port, None);
    assert_eq!(target.rules[0].kind, RouteKind::TcpRoute);
    assert_eq!(target.rules[1].kind, RouteKind::HttpRouteGroup);
    assert_eq!(target.rules[1].matches, vec!["metrics".to_string()]);
    assert_eq!(
        target.sources,
        vec![Subject::ServiceAccount(key("default", "prometheus"))]
    );
    assert!(set.warnings().is_empty());
    assert!(set.mesh().is_none());
    assert_eq!(set.default_policy(), DefaultPolicy::Allow);
    assert_eq!(set.path_regex_match(), PathRegexMatch::Prefix);
}

#[test]
fn appendix_a_parses_with_spiffeid_sources_map_headers_and_a_split() {
    let set = parse(&[("/etc/mesh/policy/payments.yaml", APPENDIX_A)]);
    let group = &set.http_route_groups()[0];
    assert_eq!(
        group.matches[0].methods,
        vec![HttpMethod::Get, HttpMethod::Head]
    );
    let canary = &group.matches[3];
    assert_eq!(canary.name, "debug-canary");
    assert_eq!(canary.path_regex, None);
    assert!(canary.methods.is_empty());
    assert_eq!(canary.headers, vec![("x-canary".into(), "true".into())]);
    let target = &set.traffic_targets()[0];
    assert_eq!(target.destination, key("payments", "ledger"));
    assert_eq!(
        target.sources,
        vec![
            Subject::ServiceAccount(key("payments", "checkout")),
            Subject::SpiffeId(SpiffeId::parse("spiffe://partner.example.net/billing").unwrap()),
        ]
    );
    let split = &set.traffic_splits()[0];
    assert_eq!(split.service, key("payments", "ledger"));
    let weights: Vec<(String, u32)> = split
        .backends
        .iter()
        .map(|b| (b.service.to_string(), b.weight))
        .collect();
    assert_eq!(
        weights,
        vec![
            ("payments/ledger-v1".into(), 95),
            ("payments/ledger-v2".into(), 5)
        ]
    );
    assert!(split.matches.is_empty());
}

#[test]
fn tcp_route_examples_parse_and_udp_route_is_refused() {
    // research/specs.md §1.4.2; empty ports and absent ports both mean every port.
    let set = parse_one(
        "kind: TCPRoute\napiVersion: specs.smi-spec.io/v1alpha4\nmetadata: {name: mysql}\nspec: {matches: {ports: [3306, 6446]}}\n---\nkind: TCPRoute\napiVersion: specs.smi-spec.io/v1alpha4\nmetadata: {name: any}\nspec: {matches: {ports: []}}\n",
    );
    assert_eq!(set.tcp_routes()[0].ports, vec![3306, 6446]);
    assert!(set.tcp_routes()[1].ports.is_empty());
    assert_eq!(
        errors(
            "kind: UDPRoute\napiVersion: specs.smi-spec.io/v1alpha4\nmetadata: {name: dns}\nspec: {matches: {ports: []}}\n"
        ),
        vec![
            "p.yaml:1: document 1: kind: UDPRoute is not supported: Weft carries TCP and HTTP only"
        ]
    );
}

#[test]
fn traffic_split_examples_parse_with_weights_root_service_and_matches() {
    let set = parse_one(SPLIT_EXAMPLES);
    let [canary, ab] = set.traffic_splits() else {
        panic!("two splits");
    };
    assert_eq!(canary.service, key("default", "website"));
    assert_eq!(
        canary.backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
        vec![90, 10]
    );
    assert_eq!(ab.meta.namespace, "default");
    assert_eq!(ab.matches, vec!["ab-test".to_string()]);
    assert_eq!(ab.backends[1].service, key("default", "website-v2"));
    assert_eq!(
        set.http_route_groups()[0].matches[0].headers,
        vec![("user-agent".into(), ".*Firefox.*".into())]
    );
}

#[test]
fn smi_controller_sdk_traffic_targets_of_every_version_are_accepted() {
    let v3 = parse(&[
        ("routes.yaml", THE_ROUTES),
        ("tt.yaml", SDK_ACCESS_V1ALPHA3),
    ]);
    let target = &v3.traffic_targets()[0];
    assert_eq!(target.rules.len(), 2);
    assert_eq!(target.destination_port, None);
    assert!(v3.warnings().is_empty());

    let v2 = parse(&[
        ("routes.yaml", THE_ROUTES),
        ("tt.yaml", SDK_ACCESS_V1ALPHA2),
    ]);
    assert_eq!(v2.traffic_targets()[0].destination_port, Some(8080));
    assert_eq!(
        warnings(&v2),
        vec![
            "tt.yaml:1: document 1 (TrafficTarget default/path-specific): apiVersion: \
             access.smi-spec.io/v1alpha2 is read as access.smi-spec.io/v1alpha3"
        ]
    );

    let v1 = parse(&[
        ("routes.yaml", THE_ROUTES),
        ("tt.yaml", SDK_ACCESS_V1ALPHA1),
    ]);
    let target = &v1.traffic_targets()[0];
    assert_eq!(target.destination_port, Some(8080));
    assert_eq!(target.rules[0].name, "the-routes");
    assert_eq!(target.rules[0].matches, vec!["metrics".to_string()]);
    assert_eq!(target.sources.len(), 1);
}

#[test]
fn smi_controller_sdk_route_specs_of_every_version_are_accepted() {
    for version in 1..=4 {
        let text = sdk_http_route_group(version);
        let set = parse_one(&text);
        let group = &set.http_route_groups()[0];
        assert_eq!(group.matches.len(), 2, "v1alpha{version}");
        assert_eq!(group.matches[1].methods, vec![HttpMethod::Any]);
        let headers = &group.matches[0].headers;
        assert_eq!(headers.len(), usize::from(version == 4), "v1alpha{version}");
    }
    // TCPRoute v1alpha1..3 have no matches (every port); v1alpha4 lists ports.
    for version in 1..=3 {
        let text = format!(
            "apiVersion: specs.smi-spec.io/v1alpha{version}\nkind: TCPRoute\nmetadata:\n  name: tcp-route\n{}",
            if version == 3 { "spec: {}\n" } else { "" }
        );
        assert!(parse_one(&text).tcp_routes()[0].ports.is_empty());
    }
    let v4 = parse_one(
        "apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata:\n  name: the-routes\nspec:\n  matches:\n    ports:\n    - 3306\n    - 6446\n",
    );
    assert_eq!(v4.tcp_routes()[0].ports, vec![3306, 6446]);
}

#[test]
fn smi_controller_sdk_traffic_splits_of_every_version_are_accepted() {
    // v1alpha1 quantities: 50m and 50m stay relative (milli-units).
    let v1 = parse_one(SDK_SPLIT_V1ALPHA1);
    let split = &v1.traffic_splits()[0];
    assert_eq!(split.service, key("default", "foo"));
    assert_eq!(
        split.backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
        vec![50, 50]
    );
    let v2 = parse_one(SDK_SPLIT_V1ALPHA2);
    assert_eq!(v2.traffic_splits()[0].backends[1].weight, 50);
    for version in [3, 4] {
        let set = parse_one(&sdk_split_ab_test(version));
        let split = &set.traffic_splits()[0];
        assert_eq!(split.matches, vec!["ab-test".to_string()]);
        assert_eq!(split.backends[0].weight, 0);
        assert_eq!(
            set.http_route_groups()[0].matches[0].headers,
            vec![("user-agent".into(), ".*Firefox.*".into())]
        );
        let warned = warnings(&set);
        assert!(
            warned.contains(
                &"p.yaml:16: document 2 (HTTPRouteGroup default/ab-test): apiVersion: missing; \
                  read as specs.smi-spec.io/v1alpha4"
                    .to_string()
            ),
            "{warned:?}"
        );
    }
}

#[test]
fn v1alpha1_quantity_weights_mix_with_whole_numbers_as_milli_units() {
    let set = parse_one(
        "apiVersion: split.smi-spec.io/v1alpha1\nkind: TrafficSplit\nmetadata: {name: s}\nspec:\n  service: web\n  backends:\n  - {service: a, weight: 1}\n  - {service: b, weight: 500m}\n",
    );
    let weights: Vec<u32> = set.traffic_splits()[0]
        .backends
        .iter()
        .map(|b| b.weight)
        .collect();
    assert_eq!(weights, vec![1000, 500]);
}

#[test]
fn flattened_headers_and_bodies_are_accepted() {
    let set = parse_one(
        "kind: TrafficTarget\napiVersion: access.smi-spec.io/v1alpha3\nname: t\nnamespace: shop\ndestination: {kind: ServiceAccount, name: api}\nrules: [{kind: TCPRoute, name: all}]\nsources: [{kind: ServiceAccount, name: web}]\n---\nkind: TCPRoute\napiVersion: specs.smi-spec.io/v1alpha4\nname: all\nnamespace: shop\n",
    );
    let target = &set.traffic_targets()[0];
    assert_eq!(target.meta.name, "t");
    assert_eq!(target.destination, key("shop", "api"));
    assert_eq!(
        target.sources,
        vec![Subject::ServiceAccount(key("shop", "web"))]
    );
}

#[test]
fn the_mesh_document_sets_the_default_and_path_anchoring() {
    let set = parse_one(
        "apiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata: {name: mesh}\nspec:\n  default: deny\n  pathRegexMatch: full\n",
    );
    let mesh = set.mesh().unwrap();
    assert_eq!(mesh.name, "mesh");
    assert_eq!(mesh.origin.line, 1);
    assert_eq!(mesh.default, DefaultPolicy::Deny);
    assert_eq!(set.default_policy(), DefaultPolicy::Deny);
    assert_eq!(set.path_regex_match(), PathRegexMatch::Full);
    let defaults = parse_one("apiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata: {name: mesh}\n");
    assert_eq!(defaults.default_policy(), DefaultPolicy::Allow);
    assert_eq!(defaults.path_regex_match(), PathRegexMatch::Prefix);
    assert!(defaults.mesh().is_some());
    assert_eq!(Kind::Mesh.api_version(), "weft.io/v1alpha1");
}

/// The HTTPRoutePolicy example of the issue (and of `model.rs`'s documentation).
const ROUTE_POLICY_EXAMPLE: &str = r#"apiVersion: weft.io/v1alpha1
kind: HTTPRoutePolicy
metadata: {name: api, namespace: default}
spec:
  service: api                 # the destination service (name, same namespace)
  timeouts:                    # Gateway API HTTPRoute `timeouts` shape
    request: 10s
    backendRequest: 2s
  retry:                       # Gateway API HTTPRoute `retry` shape (GEP-1731)
    attempts: 2
    codes: [502, 503, 504]
    backoff: 25ms
    nonIdempotent: false
  retryBudget:
    percent: 20
    minRetriesPerSecond: 10
"#;

#[test]
fn the_http_route_policy_example_parses_into_typed_values() {
    let set = parse_one(ROUTE_POLICY_EXAMPLE);
    assert!(warnings(&set).is_empty(), "{:?}", warnings(&set));
    let [policy] = set.http_route_policies() else {
        panic!("{:?}", set.http_route_policies());
    };
    assert_eq!(policy.meta.name, "api");
    assert_eq!(policy.meta.namespace, "default");
    assert_eq!(policy.meta.origin.line, 1);
    assert_eq!(policy.service, key("default", "api"));
    assert_eq!(
        policy.timeouts,
        Timeouts {
            request: Some(Duration::from_secs(10)),
            backend_request: Some(Duration::from_secs(2)),
        }
    );
    assert_eq!(
        policy.retry,
        Some(Retry {
            attempts: 2,
            codes: vec![502, 503, 504],
            backoff: Duration::from_millis(25),
            non_idempotent: false,
        })
    );
    assert_eq!(
        policy.budget,
        RetryBudget {
            percent: 20,
            min_per_second: 10,
        }
    );
    assert_eq!(set.route_policy(&key("default", "api")), Some(policy));
    assert_eq!(set.route_policy(&key("other", "api")), None);
    assert_eq!(set.route_policy(&key("default", "web")), None);
    assert_eq!(Kind::HttpRoutePolicy.as_str(), "HTTPRoutePolicy");
    assert_eq!(Kind::HttpRoutePolicy.api_version(), "weft.io/v1alpha1");
    // It sits beside the SMI kinds without changing them.
    let mixed = parse(&[("a.yaml", SPEC_EXAMPLE), ("b.yaml", ROUTE_POLICY_EXAMPLE)]);
    assert_eq!(mixed.traffic_targets().len(), 1);
    assert_eq!(mixed.http_route_policies().len(), 1);
}

#[test]
fn http_route_policy_defaults() {
    let header = "apiVersion: weft.io/v1alpha1\nkind: HTTPRoutePolicy\n";
    // Only the service: no timeouts, no retries, the default budget.
    let set = parse_one(&format!(
        "{header}metadata: {{name: p}}\nspec: {{service: api}}\n"
    ));
    let policy = set.route_policy(&key("default", "api")).unwrap();
    assert_eq!(policy.timeouts, Timeouts::default());
    assert_eq!(policy.timeouts.request, None);
    assert_eq!(policy.timeouts.backend_request, None);
    assert_eq!(policy.retry, None);
    assert_eq!(policy.budget, RetryBudget::default());
    assert_eq!(policy.budget.percent, 20);
    assert_eq!(policy.budget.min_per_second, 10);

    // An empty retry takes every default; 0s disables a timeout (None), so it never counts
    // against backendRequest; a partial budget keeps the other default.
    let set = parse_one(&format!(
        "{header}metadata: {{name: p, namespace: shop}}\nspec:\n  service: api\n  timeouts: {{request: 0s, backendRequest: 1h}}\n  retry: {{}}\n  retryBudget: {{percent: 0}}\n"
    ));
    let policy = set.route_policy(&key("shop", "api")).unwrap();
    assert_eq!(
        policy.timeouts,
        Timeouts {
            request: None,
            backend_request: Some(Duration::from_secs(3600)),
        }
    );
    let retry = policy.retry.as_ref().unwrap();
    assert_eq!(*retry, Retry::default());
    assert_eq!(retry.attempts, 1);
    assert_eq!(retry.codes, DEFAULT_RETRY_CODES.to_vec());
    assert_eq!(retry.codes, vec![502, 503, 504]);
    assert_eq!(retry.backoff, DEFAULT_RETRY_BACKOFF);
    assert!(!retry.non_idempotent);
    assert_eq!(
        policy.budget,
        RetryBudget {
            percent: 0,
            min_per_second: 10,
        }
    );

    // Explicit values: an empty code list (connection failures only), a zero backoff,
    // non-idempotent retries, backendRequest equal to request, 0s backendRequest.
    let set = parse_one(&format!(
        "{header}metadata: {{name: p}}\nspec:\n  service: api\n  timeouts: {{request: 1s, backendRequest: 1000ms}}\n  retry: {{attempts: 10, codes: [], backoff: 0ms, nonIdempotent: true}}\n---\n{header}metadata: {{name: q}}\nspec: {{service: web, timeouts: {{request: 1s, backendRequest: 0s}}}}\n"
    ));
    let policy = set.route_policy(&key("default", "api")).unwrap();
    assert_eq!(
        policy.timeouts,
        Timeouts {
            request: Some(Duration::from_secs(1)),
            backend_request: Some(Duration::from_secs(1)),
        }
    );
    assert_eq!(
        policy.retry,
        Some(Retry {
            attempts: 10,
            codes: Vec::new(),
            backoff: Duration::ZERO,
            non_idempotent: true,
        })
    );
    let web = set.route_policy(&key("default", "web")).unwrap();
    assert_eq!(web.meta.name, "q");
    assert_eq!(web.timeouts.request, Some(Duration::from_secs(1)));
    assert_eq!(web.timeouts.backend_request, None);
    assert_eq!(set.http_route_policies().len(), 2);
    assert_eq!(set.http_route_policies()[1].meta.name, "q");
}

#[test]
fn http_route_policy_warnings_follow_the_usual_shape() {
    // A missing apiVersion is read as weft.io/v1alpha1; a budget without retry does nothing;
    // the flattened shape is accepted as for the other kinds.
    let set =
        parse_one("kind: HTTPRoutePolicy\nname: p\nservice: api\nretryBudget: {percent: 50}\n");
    assert_eq!(
        warnings(&set),
        vec![
            "p.yaml:1: document 1 (HTTPRoutePolicy default/p): apiVersion: missing; read as weft.io/v1alpha1",
            "p.yaml:4: document 1 (HTTPRoutePolicy default/p): retryBudget: has no effect without retry",
        ]
    );
    let policy = set.route_policy(&key("default", "api")).unwrap();
    assert_eq!(policy.budget.percent, 50);
    assert_eq!(policy.retry, None);
}

#[test]
fn durations_follow_the_gateway_api_format() {
    let ok = [
        ("0s", Duration::ZERO),
        ("0ms", Duration::ZERO),
        ("1h", Duration::from_secs(3600)),
        ("1m", Duration::from_secs(60)),
        ("10s", Duration::from_secs(10)),
        ("250ms", Duration::from_millis(250)),
        ("1m30s", Duration::from_secs(90)),
        ("1h2m3s4ms", Duration::from_millis(3_723_004)),
        ("4ms3s2m1h", Duration::from_millis(3_723_004)),
        ("1s1s", Duration::from_secs(2)),
        ("99999s", Duration::from_secs(99_999)),
        ("00001ms", Duration::from_millis(1)),
        (
            "99999h99999h99999h99999h",
            Duration::from_secs(4 * 99_999 * 3600),
        ),
    ];
    for (text, want) in ok {
        assert_eq!(parse_duration(text), Some(want), "{text}");
    }
    let refused = [
        "",
        "5",
        "1.5s",
        "100000s",
        "000001s",
        "1h2m3s4ms5s",
        "-1s",
        "+1s",
        "1 s",
        " 1s",
        "1s ",
        "1us",
        "1ns",
        "1d",
        "1S",
        "1H",
        "s",
        "ms",
        "1mss",
        "1sm",
        "1h-",
        "0x10s",
        "１s",
    ];
    for text in refused {
        assert_eq!(parse_duration(text), None, "{text:?}");
    }
    // In a document, quoted and plain spellings are the same string.
    let set = parse_one(
        "apiVersion: weft.io/v1alpha1\nkind: HTTPRoutePolicy\nmetadata: {name: p}\nspec: {service: api, timeouts: {request: \"1h2m3s4ms\", backendRequest: 1m}}\n",
    );
    let policy = set.route_policy(&key("default", "api")).unwrap();
    assert_eq!(
        policy.timeouts.request,
        Some(Duration::from_millis(3_723_004))
    );
    assert_eq!(
        policy.timeouts.backend_request,
        Some(Duration::from_secs(60))
    );
    for text in ["1.5s", "100000s", "5"] {
        let got = errors(&format!(
            "apiVersion: weft.io/v1alpha1\nkind: HTTPRoutePolicy\nmetadata: {{name: p}}\nspec: {{service: api, retry: {{backoff: {text}}}}}\n"
        ));
        assert_eq!(
            got,
            vec![format!(
                "p.yaml:4: document 1 (HTTPRoutePolicy default/p): spec.retry.backoff: {text:?} \
                 is not a duration: use 1 to 4 groups of up to 5 digits and a unit h, m, s or \
                 ms, such as 10s, 1m30s or 250ms (Gateway API GEP-2257)"
            )]
        );
    }
}

#[test]
fn a_second_route_policy_for_a_service_names_both_documents_across_files() {
    let policy = |name: &str| {
        format!(
            "apiVersion: weft.io/v1alpha1\nkind: HTTPRoutePolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  service: api\n"
        )
    };
    assert_eq!(
        errors_of(&[("a.yaml", &policy("first")), ("b.yaml", &policy("second"))]),
        vec![
            "b.yaml:5: document 1 (HTTPRoutePolicy shop/second): spec.service: service shop/api \
             already has a policy, HTTPRoutePolicy shop/first at a.yaml:1 (document 1); a \
             service takes one HTTPRoutePolicy"
        ]
    );
    // The same document name twice is the usual duplicate error.
    assert_eq!(
        errors_of(&[("a.yaml", &policy("p")), ("b.yaml", &policy("p"))]),
        vec![
            "b.yaml:3: document 1 (HTTPRoutePolicy shop/p): metadata.name: HTTPRoutePolicy \
             shop/p is already defined at a.yaml:1 (document 1)"
        ]
    );
}

#[test]
fn an_empty_set_and_empty_documents_are_valid() {
    let set = parse(&[("a.yaml", ""), ("b.yaml", "---\n# nothing\n---\n")]);
    assert!(set.traffic_targets().is_empty());
    assert!(set.http_route_groups().is_empty());
    assert!(set.tcp_routes().is_empty());
    assert!(set.traffic_splits().is_empty());
    assert!(set.http_route_policies().is_empty());
    assert!(set.route_policy(&key("default", "api")).is_none());
    assert!(set.warnings().is_empty());
}

#[test]
fn all_zero_weights_are_accepted_with_a_warning() {
    let set = parse_one(
        "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {name: s}\nspec:\n  service: web\n  backends: [{service: a, weight: 0}]\n",
    );
    assert_eq!(
        warnings(&set),
        vec![
            "p.yaml:6: document 1 (TrafficSplit default/s): spec.backends: every weight is 0: \
             requests go to the root service default/web itself"
        ]
    );
}

// ---- validation: every error, one line -------------------------------------------------------

/// `(yaml, expected errors)`: each message exactly as the operator sees it.
const ERROR_CASES: &[(&str, &[&str])] = &[
    // Reading the document.
    (
        "a: [1, 2\nb: 3\n",
        &["p.yaml:2: document 1: invalid YAML: illegal placement of ':' indicator"],
    ),
    (
        "kind: TCPRoute\nmetadata: &m {name: a}\n---\nkind: TCPRoute\nmetadata: *m\n",
        &[
            "p.yaml:5: document 2: invalid YAML: YAML aliases (*name) are not supported in policy files",
        ],
    ),
    (
        "- 1\n- 2\n",
        &["p.yaml:1: document 1: expected a mapping, found a list"],
    ),
    (
        "metadata: {name: a}\n",
        &["p.yaml:1: document 1: kind: required"],
    ),
    (
        "kind: Deployment\n",
        &[
            "p.yaml:1: document 1: kind: \"Deployment\" is not a supported kind; expected TrafficTarget, HTTPRouteGroup, TCPRoute, TrafficSplit, Mesh or HTTPRoutePolicy",
        ],
    ),
    (
        "kind: TrafficTarget\napiVersion: split.smi-spec.io/v1alpha4\nmetadata: {name: a}\n",
        &[
            "p.yaml:2: document 1 (TrafficTarget default/a): apiVersion: \"split.smi-spec.io/v1alpha4\" does not define TrafficTarget; use access.smi-spec.io/v1alpha3",
        ],
    ),
    (
        "kind: TrafficTarget\napiVersion: access.smi-spec.io/v1alpha4\nmetadata: {name: a}\n",
        &[
            "p.yaml:2: document 1 (TrafficTarget default/a): apiVersion: \"access.smi-spec.io/v1alpha4\" is not supported; use access.smi-spec.io/v1alpha3",
        ],
    ),
    (
        "kind: TCPRoute\napiVersion: specs.smi-spec.io/v1alpha4\nmetadata: {namespace: a}\n",
        &["p.yaml:3: document 1 (TCPRoute): metadata.name: required"],
    ),
    (
        "kind: TCPRoute\napiVersion: specs.smi-spec.io/v1alpha4\nmetadata: {name: Api}\n",
        &[
            "p.yaml:3: document 1 (TCPRoute): metadata.name: \"Api\" is not a valid name: use 1 to 63 lowercase letters, digits, '-', '_' or '.', not starting with '-' or '.'",
        ],
    ),
    (
        "kind: TCPRoute\napiVersion: specs.smi-spec.io/v1alpha4\nmetadata: {name: a}\nname: b\n",
        &[
            "p.yaml:4: document 1 (TCPRoute default/a): name: give name under metadata or at the top level, not both",
        ],
    ),
    (
        "kind: TCPRoute\napiVersion: specs.smi-spec.io/v1alpha4\nmetadata: {name: a, labels: {x: y}, uid: 1}\n",
        &[
            "p.yaml:3: document 1 (TCPRoute default/a): metadata.uid: unknown field; expected name, namespace, labels or annotations",
        ],
    ),
    (
        "kind: Mesh\napiVersion: weft.io/v1alpha1\nmetadata: {name: m, namespace: x}\n",
        &[
            "p.yaml:3: document 1 (Mesh m): metadata.namespace: a Mesh applies to the whole mesh and takes no namespace",
        ],
    ),
    (
        "kind: TCPRoute\napiVersion: specs.smi-spec.io/v1alpha4\nmetadata: {name: a}\nstatus: {}\n",
        &[
            "p.yaml:4: document 1 (TCPRoute default/a): status: unknown field; expected apiVersion, kind, metadata, name, namespace, spec or matches",
        ],
    ),
    (
        "kind: TCPRoute\napiVersion: specs.smi-spec.io/v1alpha4\nmetadata: {name: a}\nspec: {}\nmatches: {}\n",
        &[
            "p.yaml:5: document 1 (TCPRoute default/a): matches: unknown field (the body belongs under spec)",
        ],
    ),
    (
        "kind: TCPRoute\napiVersion: specs.smi-spec.io/v1alpha4\nmetadata: {name: a}\nspec:\n  matches: {ports: [1]}\n  matches: {ports: [2]}\n",
        &["p.yaml:6: document 1 (TCPRoute default/a): spec.matches: duplicate key"],
    ),
    (
        "kind: TCPRoute\napiVersion: specs.smi-spec.io/v1alpha4\nmetadata: {name: a}\nspec: [1]\n",
        &["p.yaml:4: document 1 (TCPRoute default/a): spec: expected a mapping, found a list"],
    ),
    // TrafficTarget.
    (
        "kind: TrafficTarget\napiVersion: access.smi-spec.io/v1alpha3\nmetadata: {name: t}\n",
        &[
            "p.yaml:1: document 1 (TrafficTarget default/t): spec.destination: required",
            "p.yaml:1: document 1 (TrafficTarget default/t): spec.rules: required",
            "p.yaml:1: document 1 (TrafficTarget default/t): spec.sources: required",
        ],
    ),
    (
        "kind: TrafficTarget\napiVersion: access.smi-spec.io/v1alpha3\nmetadata: {name: t, namespace: shop}\nspec:\n  destination: {kind: Group, name: api, namespace: other, port: 80}\n  rules: []\n  sources: []\n",
        &[
            "p.yaml:5: document 1 (TrafficTarget shop/t): spec.destination.port: unknown field; expected kind, name or namespace",
            "p.yaml:5: document 1 (TrafficTarget shop/t): spec.destination.kind: \"Group\" is not supported; a destination is a ServiceAccount",
            "p.yaml:5: document 1 (TrafficTarget shop/t): spec.destination.namespace: must be the TrafficTarget's own namespace \"shop\": only a service's owners grant access to it",
            "p.yaml:6: document 1 (TrafficTarget shop/t): spec.rules: at least one rule is required",
            "p.yaml:7: document 1 (TrafficTarget shop/t): spec.sources: at least one source is required",
        ],
    ),
    (
        "kind: TrafficTarget\napiVersion: access.smi-spec.io/v1alpha3\nmetadata: {name: t}\nspec:\n  destination: {kind: ServiceAccount, name: api}\n  rules:\n  - {kind: UDPRoute, name: dns}\n  - {kind: HTTPRoute, name: r}\n  - {kind: TCPRoute, name: r, matches: [x]}\n  sources:\n  - {kind: Group, name: g}\n  - {kind: SPIFFEID, name: \"spiffe://Bad/x\", namespace: default}\n  - {kind: ServiceAccount}\n",
        &[
            "p.yaml:7: document 1 (TrafficTarget default/t): spec.rules[0].kind: UDPRoute is not supported: Weft carries TCP and HTTP only",
            "p.yaml:8: document 1 (TrafficTarget default/t): spec.rules[1].kind: \"HTTPRoute\" is not a rule kind; expected HTTPRouteGroup or TCPRoute",
            "p.yaml:9: document 1 (TrafficTarget default/t): spec.rules[2].matches: matches applies only to HTTPRouteGroup rules",
            "p.yaml:9: document 1 (TrafficTarget default/t): spec.rules[2].name: TCPRoute default/r is not defined in this set",
            "p.yaml:11: document 1 (TrafficTarget default/t): spec.sources[0].kind: \"Group\" is not a source kind; expected ServiceAccount or SPIFFEID",
            "p.yaml:12: document 1 (TrafficTarget default/t): spec.sources[1].namespace: does not apply to a SPIFFEID source",
            "p.yaml:12: document 1 (TrafficTarget default/t): spec.sources[1].name: \"spiffe://Bad/x\" is not a SPIFFE ID: trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores (found 'B' at byte 9)",
            "p.yaml:13: document 1 (TrafficTarget default/t): spec.sources[2].name: required",
        ],
    ),
    (
        "kind: TrafficTarget\napiVersion: access.smi-spec.io/v1alpha3\nmetadata: {name: api-access, namespace: shop}\nspec:\n  destination: {kind: ServiceAccount, name: api}\n  rules:\n  - {kind: TCPRoute, name: api-port}\n  - kind: HTTPRouteGroup\n    name: api-routes\n    matches: [metrics, metric]\n  sources: [{kind: ServiceAccount, name: web}]\n---\nkind: HTTPRouteGroup\napiVersion: specs.smi-spec.io/v1alpha4\nmetadata: {name: api-routes, namespace: shop}\nspec: {matches: [{name: metrics}]}\n---\nkind: TCPRoute\napiVersion: specs.smi-spec.io/v1alpha4\nmetadata: {name: api-port}\n",
        &[
            "p.yaml:7: document 1 (TrafficTarget shop/api-access): spec.rules[0].name: TCPRoute shop/api-port is not defined in this set (there is one in namespace \"default\"; rules refer to routes in their own namespace)",
            "p.yaml:10: document 1 (TrafficTarget shop/api-access): spec.rules[1].matches[1]: HTTPRouteGroup shop/api-routes has no match named \"metric\"",
        ],
    ),
    (
        "kind: TrafficTarget\napiVersion: access.smi-spec.io/v1alpha2\nmetadata: {name: t}\nspec:\n  destination: {kind: ServiceAccount, name: api, port: 70000}\n  rules: [{kind: HTTPRouteGroup, name: missing}]\n  sources: [{kind: ServiceAccount, name: web}]\n",
        &[
            "p.yaml:5: document 1 (TrafficTarget default/t): spec.destination.port: 70000 is not a port (1-65535)",
            "p.yaml:6: document 1 (TrafficTarget default/t): spec.rules[0].name: HTTPRouteGroup default/missing is not defined in this set",
        ],
    ),
    (
        "kind: TrafficTarget\napiVersion: access.smi-spec.io/v1alpha3\nmetadata: {name: t}\nspec:\n  destination: {kind: ServiceAccount, name: [a]}\n  rules: {kind: TCPRoute}\n  sources: [web, ~]\n",
        &[
            "p.yaml:5: document 1 (TrafficTarget default/t): spec.destination.name: expected a string, found a list",
            "p.yaml:6: document 1 (TrafficTarget default/t): spec.rules: expected a list, found a mapping",
            "p.yaml:7: document 1 (TrafficTarget default/t): spec.sources[0]: expected a mapping, found \"web\"",
            "p.yaml:7: document 1 (TrafficTarget default/t): spec.sources[1]: expected a mapping, found null",
        ],
    ),
    // HTTPRouteGroup.
    (
        "kind: HTTPRouteGroup\napiVersion: specs.smi-spec.io/v1alpha4\nmetadata: {name: g}\nspec: {matches: []}\n",
        &[
            "p.yaml:4: document 1 (HTTPRouteGroup default/g): spec.matches: at least one match is required",
        ],
    ),
    (
        "kind: HTTPRouteGroup\napiVersion: specs.smi-spec.io/v1alpha4\nmetadata: {name: g}\nspec:\n  matches:\n  - name: a\n    pathRegex: /api/(\n    methods: [get, GET]\n  - name: a\n    methods: []\n    headers: [{x-a: \"1\", x-b: \"2\"}, {\"bad name\": x}, {X-C: \"a\"}, {x-c: \"b\"}, {x-d: ~}]\n  - {name: \"a b\", headers: {x-e: \"[\"}, paths: [x]}\n",
        &[
            "p.yaml:7: document 1 (HTTPRouteGroup default/g): spec.matches[0].pathRegex: invalid regex \"/api/(\": unclosed group",
            "p.yaml:8: document 1 (HTTPRouteGroup default/g): spec.matches[0].methods[0]: \"get\" is not an SMI method; expected *, GET, HEAD, PUT, POST, DELETE, CONNECT, OPTIONS, TRACE or PATCH (case-sensitive)",
            "p.yaml:9: document 1 (HTTPRouteGroup default/g): spec.matches[1].name: \"a\" is already the name of spec.matches[0]",
            "p.yaml:10: document 1 (HTTPRouteGroup default/g): spec.matches[1].methods: an empty list matches no request; leave methods out to match every method",
            "p.yaml:11: document 1 (HTTPRouteGroup default/g): spec.matches[1].headers[0]: each headers item must be a mapping with exactly one header",
            "p.yaml:11: document 1 (HTTPRouteGroup default/g): spec.matches[1].headers[1].bad name: \"bad name\" is not an HTTP header name",
            "p.yaml:11: document 1 (HTTPRouteGroup default/g): spec.matches[1].headers[3].x-c: header \"x-c\" is listed twice (names are case-insensitive)",
            "p.yaml:11: document 1 (HTTPRouteGroup default/g): spec.matches[1].headers[4].x-d: required: a regex for the value",
            "p.yaml:12: document 1 (HTTPRouteGroup default/g): spec.matches[2].paths: unknown field; expected name, pathRegex, methods or headers",
            "p.yaml:12: document 1 (HTTPRouteGroup default/g): spec.matches[2].name: \"a b\" is not a valid match name: use letters, digits, '-', '_' or '.'",
            "p.yaml:12: document 1 (HTTPRouteGroup default/g): spec.matches[2].headers.x-e: invalid regex \"[\": unclosed character class",
        ],
    ),
    // TCPRoute.
    (
        "kind: TCPRoute\napiVersion: specs.smi-spec.io/v1alpha4\nmetadata: {name: r}\nspec:\n  matches: [{ports: [80]}]\n",
        &[
            "p.yaml:5: document 1 (TCPRoute default/r): spec.matches: expected a mapping such as {ports: [8080]} (a TCPRoute's matches is one object, unlike an HTTPRouteGroup's list)",
        ],
    ),
    (
        "kind: TCPRoute\napiVersion: specs.smi-spec.io/v1alpha4\nmetadata: {name: r}\nspec:\n  matches:\n    ports: [0, 70000, \"80\", 8080, 8080, http]\n",
        &[
            "p.yaml:6: document 1 (TCPRoute default/r): spec.matches.ports[0]: 0 is not a port (1-65535)",
            "p.yaml:6: document 1 (TCPRoute default/r): spec.matches.ports[1]: 70000 is not a port (1-65535)",
            "p.yaml:6: document 1 (TCPRoute default/r): spec.matches.ports[2]: expected a whole number, found the string \"80\"",
            "p.yaml:6: document 1 (TCPRoute default/r): spec.matches.ports[4]: port 8080 is listed twice",
            "p.yaml:6: document 1 (TCPRoute default/r): spec.matches.ports[5]: expected a whole number, found \"http\"",
        ],
    ),
    // TrafficSplit.
    (
        "kind: TrafficSplit\napiVersion: split.smi-spec.io/v1alpha4\nmetadata: {name: s}\nspec:\n  backends:\n  - {service: web, weight: 1.5}\n  - {service: web, weight: -1}\n  - {service: b, weight: 2000000}\n  - {service: c}\n",
        &[
            "p.yaml:5: document 1 (TrafficSplit default/s): spec.service: required",
            "p.yaml:6: document 1 (TrafficSplit default/s): spec.backends[0].weight: expected a whole number, found \"1.5\"",
            "p.yaml:7: document 1 (TrafficSplit default/s): spec.backends[1].weight: expected a whole number, found \"-1\"",
            "p.yaml:8: document 1 (TrafficSplit default/s): spec.backends[2].weight: 2000000 is above the largest weight, 1000000",
            "p.yaml:9: document 1 (TrafficSplit default/s): spec.backends[3].weight: required",
        ],
    ),
    (
        "kind: TrafficSplit\napiVersion: split.smi-spec.io/v1alpha4\nmetadata: {name: s}\nspec:\n  service: web\n  matches:\n  - {kind: TCPRoute, name: r, apiGroup: x.io}\n  - {kind: HTTPRouteGroup, name: missing}\n  backends:\n  - {service: web, weight: 1}\n  - {service: a, weight: 1}\n  - {service: a, weight: 1}\n",
        &[
            "p.yaml:7: document 1 (TrafficSplit default/s): spec.matches[0].kind: \"TCPRoute\" is not supported; a TrafficSplit matches HTTPRouteGroups",
            "p.yaml:7: document 1 (TrafficSplit default/s): spec.matches[0].apiGroup: \"x.io\" is not the HTTPRouteGroup API group specs.smi-spec.io",
            "p.yaml:8: document 1 (TrafficSplit default/s): spec.matches[1].name: HTTPRouteGroup default/missing is not defined in this set",
            "p.yaml:10: document 1 (TrafficSplit default/s): spec.backends[0].service: a backend may not be the root service itself",
            "p.yaml:12: document 1 (TrafficSplit default/s): spec.backends[2].service: backend \"a\" is listed twice",
        ],
    ),
    (
        "kind: TrafficSplit\napiVersion: split.smi-spec.io/v1alpha4\nmetadata: {name: one}\nspec: {service: web, backends: [{service: a, weight: 1}]}\n---\nkind: TrafficSplit\napiVersion: split.smi-spec.io/v1alpha4\nmetadata: {name: two}\nspec: {service: web, backends: [{service: b, weight: 1}]}\n",
        &[
            "p.yaml:9: document 2 (TrafficSplit default/two): spec.service: root service default/web is already split by TrafficSplit default/one; only one TrafficSplit without matches may name a root service",
        ],
    ),
    (
        "kind: TrafficSplit\napiVersion: split.smi-spec.io/v1alpha1\nmetadata: {name: s}\nspec:\n  service: web\n  backends:\n  - {service: a, weight: 2000}\n  - {service: b, weight: 1m}\n",
        &[
            "p.yaml:7: document 1 (TrafficSplit default/s): spec.backends[0].weight: 2000000 milli-units is above the largest weight, 1000000",
        ],
    ),
    // Mesh.
    (
        "kind: Mesh\napiVersion: weft.io/v1alpha1\nmetadata: {name: m}\nspec: {default: permissive, pathRegexMatch: regex}\n---\nkind: Mesh\napiVersion: weft.io/v1alpha1\nmetadata: {name: n}\n",
        &[
            "p.yaml:4: document 1 (Mesh m): spec.default: \"permissive\" is not a default; expected allow or deny",
            "p.yaml:4: document 1 (Mesh m): spec.pathRegexMatch: \"regex\" is not a path match; expected prefix or full",
            "p.yaml:8: document 2 (Mesh n): metadata.name: a set holds one Mesh document; one is already defined at p.yaml:1 (document 1)",
        ],
    ),
    // HTTPRoutePolicy.
    (
        "kind: HTTPRoutePolicy\napiVersion: weft.io/v1alpha1\nmetadata: {name: p}\nspec:\n  timeouts: {request: 1.5s, backendRequest: 5, idle: 1s}\n  retry: {attempts: 0, codes: [200, 503, 503, 600, \"502\"], backoff: 100000s, perTryTimeout: 1s, nonIdempotent: \"yes\"}\n  retryBudget: {percent: 101, minRetriesPerSecond: 5000000000, ttl: 10s}\n",
        &[
            "p.yaml:5: document 1 (HTTPRoutePolicy default/p): spec.service: required",
            "p.yaml:5: document 1 (HTTPRoutePolicy default/p): spec.timeouts.idle: unknown field; expected request or backendRequest",
            "p.yaml:5: document 1 (HTTPRoutePolicy default/p): spec.timeouts.request: \"1.5s\" is not a duration: use 1 to 4 groups of up to 5 digits and a unit h, m, s or ms, such as 10s, 1m30s or 250ms (Gateway API GEP-2257)",
            "p.yaml:5: document 1 (HTTPRoutePolicy default/p): spec.timeouts.backendRequest: \"5\" is not a duration: use 1 to 4 groups of up to 5 digits and a unit h, m, s or ms, such as 10s, 1m30s or 250ms (Gateway API GEP-2257)",
            "p.yaml:6: document 1 (HTTPRoutePolicy default/p): spec.retry.perTryTimeout: unknown field; expected attempts, codes, backoff or nonIdempotent",
            "p.yaml:6: document 1 (HTTPRoutePolicy default/p): spec.retry.attempts: 0 is not a retry count (1-10: retries after the first try)",
            "p.yaml:6: document 1 (HTTPRoutePolicy default/p): spec.retry.codes[0]: 200 is not a retryable status code (400-599)",
            "p.yaml:6: document 1 (HTTPRoutePolicy default/p): spec.retry.codes[2]: code 503 is listed twice",
            "p.yaml:6: document 1 (HTTPRoutePolicy default/p): spec.retry.codes[3]: 600 is not a retryable status code (400-599)",
            "p.yaml:6: document 1 (HTTPRoutePolicy default/p): spec.retry.codes[4]: expected a whole number, found the string \"502\"",
            "p.yaml:6: document 1 (HTTPRoutePolicy default/p): spec.retry.backoff: \"100000s\" is not a duration: use 1 to 4 groups of up to 5 digits and a unit h, m, s or ms, such as 10s, 1m30s or 250ms (Gateway API GEP-2257)",
            "p.yaml:6: document 1 (HTTPRoutePolicy default/p): spec.retry.nonIdempotent: expected true or false, found the string \"yes\"",
            "p.yaml:7: document 1 (HTTPRoutePolicy default/p): spec.retryBudget.ttl: unknown field; expected percent or minRetriesPerSecond",
            "p.yaml:7: document 1 (HTTPRoutePolicy default/p): spec.retryBudget.percent: 101 is not a percentage (0-100)",
            "p.yaml:7: document 1 (HTTPRoutePolicy default/p): spec.retryBudget.minRetriesPerSecond: 5000000000 is above the largest value, 4294967295",
        ],
    ),
    (
        "kind: HTTPRoutePolicy\napiVersion: weft.io/v1alpha1\nmetadata: {name: p, namespace: shop}\nspec:\n  service: Api\n  timeouts:\n    request: 2s\n    backendRequest: 2s1ms\n  retry: {attempts: 11, nonIdempotent: yes}\n  timeout: 1s\n",
        &[
            "p.yaml:5: document 1 (HTTPRoutePolicy shop/p): spec.service: \"Api\" is not a valid name: use 1 to 63 lowercase letters, digits, '-', '_' or '.', not starting with '-' or '.'",
            "p.yaml:8: document 1 (HTTPRoutePolicy shop/p): spec.timeouts.backendRequest: 2s1ms is longer than the request timeout 2s; each attempt must fit in the whole request",
            "p.yaml:9: document 1 (HTTPRoutePolicy shop/p): spec.retry.attempts: 11 is not a retry count (1-10: retries after the first try)",
            "p.yaml:9: document 1 (HTTPRoutePolicy shop/p): spec.retry.nonIdempotent: expected true or false, found \"yes\"",
            "p.yaml:10: document 1 (HTTPRoutePolicy shop/p): spec.timeout: unknown field; expected service, timeouts, retry or retryBudget",
        ],
    ),
    (
        "kind: HTTPRoutePolicy\napiVersion: weft.io/v1alpha1\nmetadata: {name: p}\nspec:\n  service: {name: api}\n  timeouts: 10s\n  retry: [1]\n  retryBudget: {percent: -1}\n---\nkind: HTTPRoutePolicy\napiVersion: weft.io/v1alpha1\nmetadata: {name: q}\nspec: {service: api, retry: {codes: 503, backoff: \"\"}}\n",
        &[
            "p.yaml:5: document 1 (HTTPRoutePolicy default/p): spec.service: expected a string, found a mapping",
            "p.yaml:6: document 1 (HTTPRoutePolicy default/p): spec.timeouts: expected a mapping, found \"10s\"",
            "p.yaml:7: document 1 (HTTPRoutePolicy default/p): spec.retry: expected a mapping, found a list",
            "p.yaml:8: document 1 (HTTPRoutePolicy default/p): spec.retryBudget.percent: expected a whole number, found \"-1\"",
            "p.yaml:13: document 2 (HTTPRoutePolicy default/q): spec.retry.codes: expected a list, found \"503\"",
            "p.yaml:13: document 2 (HTTPRoutePolicy default/q): spec.retry.backoff: \"\" is not a duration: use 1 to 4 groups of up to 5 digits and a unit h, m, s or ms, such as 10s, 1m30s or 250ms (Gateway API GEP-2257)",
        ],
    ),
    (
        "kind: HTTPRoutePolicy\napiVersion: weft.io/v1alpha2\nmetadata: {name: p}\nspec: {service: api}\n---\nkind: HTTPRoutePolicy\napiVersion: gateway.networking.k8s.io/v1\nmetadata: {name: q}\nspec: {service: api}\n",
        &[
            "p.yaml:2: document 1 (HTTPRoutePolicy default/p): apiVersion: \"weft.io/v1alpha2\" is not supported; use weft.io/v1alpha1",
            "p.yaml:7: document 2 (HTTPRoutePolicy default/q): apiVersion: \"gateway.networking.k8s.io/v1\" does not define HTTPRoutePolicy; use weft.io/v1alpha1",
        ],
    ),
    (
        "kind: HTTPRoutePolicy\napiVersion: weft.io/v1alpha1\nmetadata: {name: one}\nspec: {service: api, retry: {attempts: 0}}\n---\nkind: HTTPRoutePolicy\napiVersion: weft.io/v1alpha1\nmetadata: {name: two}\nspec: {service: api}\n---\nkind: HTTPRoutePolicy\napiVersion: weft.io/v1alpha1\nmetadata: {name: one, namespace: other}\nspec: {service: api}\n",
        &[
            "p.yaml:4: document 1 (HTTPRoutePolicy default/one): spec.retry.attempts: 0 is not a retry count (1-10: retries after the first try)",
            "p.yaml:9: document 2 (HTTPRoutePolicy default/two): spec.service: service default/api already has a policy, HTTPRoutePolicy default/one at p.yaml:1 (document 1); a service takes one HTTPRoutePolicy",
        ],
    ),
];

#[test]
fn every_validation_error_is_one_line_naming_file_line_document_object_and_field() {
    let mut mismatches = Vec::new();
    for (text, expected) in ERROR_CASES {
        let got = errors(text);
        for error in &got {
            assert!(!error.contains('\n'), "{error}");
        }
        if got != *expected {
            mismatches.push(format!(
                "for:\n{text}\n  got:  {got:#?}\n  want: {expected:#?}"
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n\n"));
}

#[test]
fn a_missing_route_names_file_line_document_object_and_field() {
    let text = "kind: TrafficTarget\napiVersion: access.smi-spec.io/v1alpha3\nmetadata: {name: api-access, namespace: shop}\nspec:\n  destination: {kind: ServiceAccount, name: api}\n  rules: [{kind: HTTPRouteGroup, name: api-routes}]\n  sources: [{kind: ServiceAccount, name: web}]\n";
    let errors = PolicySet::parse_files(&[("policies/web.yaml", text)]).unwrap_err();
    assert_eq!(
        errors[0],
        PolicyError {
            file: "policies/web.yaml".into(),
            line: Some(6),
            document: Some(1),
            object: Some("TrafficTarget shop/api-access".into()),
            field: "spec.rules[0].name".into(),
            message: "HTTPRouteGroup shop/api-routes is not defined in this set".into(),
        }
    );
    assert_eq!(
        errors[0].to_string(),
        "policies/web.yaml:6: document 1 (TrafficTarget shop/api-access): spec.rules[0].name: \
         HTTPRouteGroup shop/api-routes is not defined in this set"
    );
}

#[test]
fn the_whole_set_is_validated_and_every_error_returned_in_file_order() {
    let a = "kind: TCPRoute\napiVersion: specs.smi-spec.io/v1alpha4\nmetadata: {name: r}\nspec: {matches: {ports: [0]}}\n";
    let b = "kind: TCPRoute\napiVersion: specs.smi-spec.io/v1alpha4\nmetadata: {name: r}\n---\nkind: HTTPRouteGroup\napiVersion: specs.smi-spec.io/v1alpha4\nmetadata: {name: g}\nspec: {matches: [{name: m, pathRegex: \"(\"}]}\n";
    assert_eq!(
        errors_of(&[("a.yaml", a), ("b.yaml", b)]),
        vec![
            "a.yaml:4: document 1 (TCPRoute default/r): spec.matches.ports[0]: 0 is not a port (1-65535)",
            "b.yaml:3: document 1 (TCPRoute default/r): metadata.name: TCPRoute default/r is already defined at a.yaml:1 (document 1)",
            "b.yaml:8: document 2 (HTTPRouteGroup default/g): spec.matches[0].pathRegex: invalid regex \"(\": unclosed group",
        ]
    );
}

#[test]
fn a_syntax_error_skips_reference_checks_that_it_would_make_misleading() {
    let routes = "kind: TCPRoute\napiVersion: specs.smi-spec.io/v1alpha4\nmetadata: {name: r\n";
    let target = "kind: TrafficTarget\napiVersion: access.smi-spec.io/v1alpha3\nmetadata: {name: t}\nspec:\n  destination: {kind: ServiceAccount, name: api}\n  rules: [{kind: TCPRoute, name: r}]\n  sources: [{kind: ServiceAccount, name: web}]\n";
    let got = errors_of(&[("routes.yaml", routes), ("target.yaml", target)]);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].starts_with("routes.yaml:"), "{got:?}");
    assert!(got[0].contains("document 1: invalid YAML: "), "{got:?}");
}

#[test]
fn meshery_sample_with_a_dangling_match_is_rejected_not_ignored() {
    // layer5io/learn-layer5 smi-conformance/test-gen/test-yamls/traffic-spec/05-install.yaml
    // (commit 8b9310d): the group sits in the default namespace while the target is in
    // kuttl-test-stage and names a match the group lacks. research §1.3.3: reject.
    let text = r#"apiVersion: specs.smi-spec.io/v1alpha2
kind: HTTPRouteGroup
metadata:
  name: http-rg
matches:
- name: echo-post
  pathRegex: ".*"
  methods:
  - POST
---
apiVersion: access.smi-spec.io/v1alpha1
kind: TrafficTarget
metadata:
  name: service-targets
  namespace: kuttl-test-stage
destination:
  kind: ServiceAccount
  name: service-b
  namespace: kuttl-test-stage
sources:
- kind: ServiceAccount
  name: service-a
  namespace: kuttl-test-stage
specs:
- kind: HTTPRouteGroup
  name: http-rg
  matches:
  - metrics
"#;
    assert_eq!(
        errors(text),
        vec![
            "p.yaml:26: document 2 (TrafficTarget kuttl-test-stage/service-targets): specs[0].name: \
             HTTPRouteGroup kuttl-test-stage/http-rg is not defined in this set (there is one in \
             namespace \"default\"; rules refer to routes in their own namespace)"
        ]
    );
}

// ---- the engine: Meshery SMI conformance scenarios ------------------------------------------

/// Meshery traffic-access step 04 (`traffic-access/04-install.yaml`, commit 377d472): a
/// v1alpha1 TCPRoute with every port, and a TrafficTarget allowing service-a → service-b.
const MESHERY_ACCESS_ALLOW: &str = r#"---
apiVersion: specs.smi-spec.io/v1alpha1
kind: TCPRoute
metadata:
  name: service-tcp-route
  namespace: kuttl-test-stage
---
apiVersion: access.smi-spec.io/v1alpha1
kind: TrafficTarget
metadata:
  name: service-targets
  namespace: kuttl-test-stage
destination:
  kind: ServiceAccount
  name: service-b
  namespace: kuttl-test-stage
sources:
- kind: ServiceAccount
  name: service-a
  namespace: kuttl-test-stage
specs:
- kind: TCPRoute
  name: service-tcp-route
"#;

const MESH_DENY: &str =
    "apiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata: {name: mesh}\nspec: {default: deny}\n";

const NS: &str = "kuttl-test-stage";

#[test]
fn before_any_policy_is_published_authenticated_traffic_is_allowed() {
    let engine = Engine::unpublished();
    let decision = tcp(&engine, &sa(NS, "service-a"), &key(NS, "service-b"), 9091);
    assert!(decision.allowed);
    assert_eq!(decision.reason, DecisionReason::NotPublished);
    assert_eq!(decision.to_string(), "allowed (not_published)");
}

#[test]
fn meshery_traffic_access_default_deny_then_allow_then_deny_again() {
    let (a, b) = (sa(NS, "service-a"), key(NS, "service-b"));
    // 03: by default all traffic is blocked.
    let deny_all = Engine::new(&parse(&[("mesh.yaml", MESH_DENY)]), &td());
    let decision = http(&deny_all, &a, &b, 9091, "GET", "/echo", &HeaderMap::new());
    assert!(!decision.allowed);
    assert_eq!(decision.reason, DecisionReason::DefaultDeny);
    assert_eq!(decision.reason.as_str(), "default_deny");

    // 04/05: the TrafficTarget allows service-a → service-b.
    let allowed = Engine::new(
        &parse(&[
            ("mesh.yaml", MESH_DENY),
            ("access.yaml", MESHERY_ACCESS_ALLOW),
        ]),
        &td(),
    );
    let decision = http(&allowed, &a, &b, 9091, "GET", "/echo", &HeaderMap::new());
    assert!(decision.allowed, "{decision}");
    assert_eq!(decision.reason, DecisionReason::AllowedByTarget);
    assert_eq!(
        decision.document.as_deref(),
        Some("TrafficTarget kuttl-test-stage/service-targets")
    );
    assert_eq!(
        decision.rule.as_deref(),
        Some("rules[0] TCPRoute service-tcp-route")
    );
    assert_eq!(
        decision.to_string(),
        "allowed (allowed_by_target) by TrafficTarget kuttl-test-stage/service-targets rules[0] TCPRoute service-tcp-route"
    );
    assert!(tcp(&allowed, &a, &b, 9091).allowed);
    // service-c is not a source, and service-a → service-c names no target (default deny).
    let c = sa(NS, "service-c");
    let decision = tcp(&allowed, &c, &b, 9091);
    assert_eq!(
        (decision.allowed, decision.reason),
        (false, DecisionReason::NoMatchingTarget)
    );
    assert_eq!(
        tcp(&allowed, &a, &key(NS, "service-c"), 9091).reason,
        DecisionReason::DefaultDeny
    );

    // 06/07: the TrafficTarget is deleted: refused again.
    let deleted = Engine::new(&parse(&[("mesh.yaml", MESH_DENY)]), &td());
    assert!(!tcp(&deleted, &a, &b, 9091).allowed);
}

#[test]
fn without_a_mesh_document_only_named_destinations_are_closed() {
    let engine = Engine::new(&parse(&[("access.yaml", MESHERY_ACCESS_ALLOW)]), &td());
    let (a, c) = (sa(NS, "service-a"), sa(NS, "service-c"));
    let decision = tcp(&engine, &c, &key(NS, "service-a"), 9091);
    assert_eq!(
        (decision.allowed, decision.reason),
        (true, DecisionReason::NoPolicy)
    );
    assert!(!tcp(&engine, &c, &key(NS, "service-b"), 9091).allowed);
    assert!(tcp(&engine, &a, &key(NS, "service-b"), 9091).allowed);
    // A node identity is authenticated but never a ServiceAccount source.
    let node = SpiffeId::node(&td(), "web-1").unwrap();
    assert_eq!(
        tcp(&engine, &node, &key(NS, "service-b"), 9091).reason,
        DecisionReason::NoMatchingTarget
    );
    assert!(tcp(&engine, &node, &key(NS, "service-a"), 9091).allowed);
}

/// Meshery traffic-spec step 03 (`traffic-spec/03-install.yaml`, commit 250bad6): only
/// `service-b:9091/metrics`, any method. The v1alpha1 `destination.port` is a string there.
const MESHERY_SPEC_PATH: &str = r#"apiVersion: specs.smi-spec.io/v1alpha1
kind: HTTPRouteGroup
metadata:
  name: http-rg
  namespace: kuttl-test-stage
matches:
- name: testMatch
  pathRegex: /metrics
  methods: ["*"]
---
apiVersion: access.smi-spec.io/v1alpha1
kind: TrafficTarget
metadata:
  name: service-targets
  namespace: kuttl-test-stage
destination:
  kind: ServiceAccount
  name: service-b
  namespace: kuttl-test-stage
  port: "9091"
sources:
- kind: ServiceAccount
  name: service-a
  namespace: kuttl-test-stage
specs:
- kind: HTTPRouteGroup
  name: http-rg
  matches:
  - testMatch
"#;

#[test]
fn meshery_traffic_spec_path_allows_metrics_and_blocks_echo() {
    let engine = Engine::new(
        &parse(&[("mesh.yaml", MESH_DENY), ("spec.yaml", MESHERY_SPEC_PATH)]),
        &td(),
    );
    let (a, b, none) = (sa(NS, "service-a"), key(NS, "service-b"), HeaderMap::new());
    let metrics = http(&engine, &a, &b, 9091, "GET", "/metrics", &none);
    assert!(metrics.allowed);
    assert_eq!(
        metrics.rule.as_deref(),
        Some("rules[0] HTTPRouteGroup http-rg match testMatch")
    );
    let echo = http(&engine, &a, &b, 9091, "GET", "/echo", &none);
    assert_eq!(
        (echo.allowed, echo.reason),
        (false, DecisionReason::RouteNotMatched)
    );
    assert_eq!(
        echo.document.as_deref(),
        Some("TrafficTarget kuttl-test-stage/service-targets")
    );
    assert_eq!(echo.rule, None);
    // The v1alpha1 destination port restricts the port; the path is normalised first.
    assert!(!http(&engine, &a, &b, 9092, "GET", "/metrics", &none).allowed);
    assert!(!http(&engine, &a, &b, 9091, "GET", "/metrics/../admin", &none).allowed);
    assert!(http(&engine, &a, &b, 9091, "GET", "/%6detrics?x=1", &none).allowed);
    // Prefix anchoring is SMI's text: /metrics/extra passes; /x/metrics does not.
    assert!(http(&engine, &a, &b, 9091, "GET", "/metrics/extra", &none).allowed);
    assert!(!http(&engine, &a, &b, 9091, "GET", "/x/metrics", &none).allowed);
    // An HTTPRouteGroup-only target gives opaque TCP nothing.
    assert!(!tcp(&engine, &a, &b, 9091).allowed);
}

#[test]
fn pathregexmatch_full_makes_the_regex_match_the_whole_path() {
    let mesh = "apiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata: {name: mesh}\nspec: {default: deny, pathRegexMatch: full}\n";
    let engine = Engine::new(
        &parse(&[("mesh.yaml", mesh), ("spec.yaml", MESHERY_SPEC_PATH)]),
        &td(),
    );
    let (a, b, none) = (sa(NS, "service-a"), key(NS, "service-b"), HeaderMap::new());
    assert!(http(&engine, &a, &b, 9091, "GET", "/metrics", &none).allowed);
    assert!(!http(&engine, &a, &b, 9091, "GET", "/metrics/extra", &none).allowed);
}

/// Meshery traffic-spec step 05 as its `Tests.md` describes it (`service-b:PORT/*`, only
/// GET); the stored YAML for that step is inconsistent (see the rejection test above).
const MESHERY_SPEC_METHOD: &str = r#"apiVersion: specs.smi-spec.io/v1alpha2
kind: HTTPRouteGroup
metadata:
  name: http-rg
  namespace: kuttl-test-stage
matches:
- name: echo-get
  pathRegex: ".*"
  methods:
  - GET
---
apiVersion: access.smi-spec.io/v1alpha1
kind: TrafficTarget
metadata:
  name: service-targets
  namespace: kuttl-test-stage
destination:
  kind: ServiceAccount
  name: service-b
  namespace: kuttl-test-stage
sources:
- kind: ServiceAccount
  name: service-a
  namespace: kuttl-test-stage
specs:
- kind: HTTPRouteGroup
  name: http-rg
"#;

#[test]
fn meshery_traffic_spec_method_allows_get_and_blocks_post() {
    let engine = Engine::new(
        &parse(&[("mesh.yaml", MESH_DENY), ("spec.yaml", MESHERY_SPEC_METHOD)]),
        &td(),
    );
    let (a, b, none) = (sa(NS, "service-a"), key(NS, "service-b"), HeaderMap::new());
    assert!(http(&engine, &a, &b, 9091, "GET", "/echo", &none).allowed);
    let post = http(&engine, &a, &b, 9091, "POST", "/echo", &none);
    assert_eq!(
        (post.allowed, post.reason),
        (false, DecisionReason::RouteNotMatched)
    );
}

#[test]
fn a_header_match_allows_only_requests_carrying_the_header() {
    let engine = Engine::new(&parse_one(APPENDIX_A), &td());
    let ledger = key("payments", "ledger");
    let checkout = sa("payments", "checkout");
    // ledger-writers selects read and write; add a target for debug-canary from checkout-v2.
    let canary_target = "apiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {name: canary, namespace: payments}\nspec:\n  destination: {kind: ServiceAccount, name: ledger}\n  rules: [{kind: HTTPRouteGroup, name: ledger-routes, matches: [debug-canary]}]\n  sources: [{kind: ServiceAccount, name: tester}]\n";
    let with_canary = Engine::new(
        &parse(&[("a.yaml", APPENDIX_A), ("canary.yaml", canary_target)]),
        &td(),
    );
    let tester = sa("payments", "tester");
    let mut headers = HeaderMap::new();
    assert!(
        !http(
            &with_canary,
            &tester,
            &ledger,
            8443,
            "DELETE",
            "/anything",
            &headers
        )
        .allowed
    );
    headers.insert("x-canary", HeaderValue::from_static("true"));
    let decision = http(
        &with_canary,
        &tester,
        &ledger,
        8443,
        "DELETE",
        "/anything",
        &headers,
    );
    assert!(decision.allowed);
    assert_eq!(
        decision.rule.as_deref(),
        Some("rules[0] HTTPRouteGroup ledger-routes match debug-canary")
    );
    // checkout may not use the canary match: ledger-writers selects only read and write.
    assert!(
        !http(
            &engine,
            &checkout,
            &ledger,
            8443,
            "DELETE",
            "/anything",
            &headers
        )
        .allowed
    );
    assert!(
        http(
            &engine,
            &checkout,
            &ledger,
            8443,
            "POST",
            "/v1/ledger",
            &headers
        )
        .allowed
    );
}

#[test]
fn a_tcp_route_limits_ports_and_is_anded_with_http_rules() {
    // research §1.3.2 L7 example: TCPRoute 8080 + HTTPRouteGroup [metrics] = only GET /metrics
    // on 8080.
    let spec = engine(SPEC_EXAMPLE);
    let (prometheus, api, none) = (
        sa("default", "prometheus"),
        key("default", "api-service"),
        HeaderMap::new(),
    );
    let decision = http(&spec, &prometheus, &api, 8080, "GET", "/metrics", &none);
    assert!(decision.allowed);
    assert_eq!(
        decision.rule.as_deref(),
        Some("rules[1] HTTPRouteGroup api-routes match metrics")
    );
    assert!(!http(&spec, &prometheus, &api, 9090, "GET", "/metrics", &none).allowed);
    assert!(!http(&spec, &prometheus, &api, 8080, "POST", "/metrics", &none).allowed);
    assert!(!http(&spec, &prometheus, &api, 8080, "GET", "/api", &none).allowed);
    // Opaque TCP: the TCPRoute alone decides.
    let appendix = engine(APPENDIX_A);
    let (checkout, ledger) = (sa("payments", "checkout"), key("payments", "ledger"));
    let decision = tcp(&appendix, &checkout, &ledger, 8443);
    assert_eq!(
        decision.rule.as_deref(),
        Some("rules[0] TCPRoute ledger-http")
    );
    assert!(!tcp(&appendix, &checkout, &ledger, 8444).allowed);
}

#[test]
fn a_source_not_listed_is_refused_and_foreign_trust_domains_match_only_spiffeid_sources() {
    let engine = engine(APPENDIX_A);
    let ledger = key("payments", "ledger");
    let none = HeaderMap::new();
    let stranger = sa("payments", "stranger");
    let decision = http(
        &engine,
        &stranger,
        &ledger,
        8443,
        "GET",
        "/v1/ledger",
        &none,
    );
    assert_eq!(
        (decision.allowed, decision.reason, decision.document),
        (false, DecisionReason::NoMatchingTarget, None)
    );
    let billing = SpiffeId::parse("spiffe://partner.example.net/billing").unwrap();
    assert!(http(&engine, &billing, &ledger, 8443, "GET", "/v1/ledger", &none).allowed);
    // Same path as checkout, but another trust domain: not the ServiceAccount source.
    let impostor = SpiffeId::parse("spiffe://partner.example.net/ns/payments/sa/checkout").unwrap();
    assert!(
        !http(
            &engine,
            &impostor,
            &ledger,
            8443,
            "GET",
            "/v1/ledger",
            &none
        )
        .allowed
    );
}

#[test]
fn meshery_traffic_split_weights_parse_for_every_step() {
    // traffic-split steps 04, 06, 08 and 10 (04-install.yaml is 1/0; 08-install.yaml uses
    // v1alpha1 with 75/25; 06 and 10 mirror them).
    for (version, weights) in [(4, [1, 0]), (4, [0, 1]), (1, [75, 25]), (1, [25, 75])] {
        let text = format!(
            "apiVersion: split.smi-spec.io/v1alpha{version}\nkind: TrafficSplit\nmetadata:\n  name: server-split\n  namespace: kuttl-test-stage\nspec:\n  service: app-svc\n  backends:\n  - service: app-b\n    weight: {}\n  - service: app-c\n    weight: {}\n",
            weights[0], weights[1]
        );
        let set = parse_one(&text);
        let split = &set.traffic_splits()[0];
        assert_eq!(split.service, key(NS, "app-svc"));
        let got: Vec<(String, u32)> = split
            .backends
            .iter()
            .map(|b| (b.service.name.clone(), b.weight))
            .collect();
        assert_eq!(
            got,
            vec![("app-b".into(), weights[0]), ("app-c".into(), weights[1])]
        );
    }
}

#[test]
fn truncated_or_corrupted_policy_files_never_panic() {
    // A cheap stand-in for a fuzz target: prefixes of the samples, and bytes replaced by
    // YAML punctuation, must parse to a set or to errors.
    let samples = [SPEC_EXAMPLE, APPENDIX_A];
    let mut parsed = 0;
    for sample in samples {
        for end in (0..=sample.len())
            .step_by(4)
            .filter(|&i| sample.is_char_boundary(i))
        {
            let _ = PolicySet::parse_files(&[("p.yaml", &sample[..end])]);
            parsed += 1;
        }
        for i in (0..sample.len()).step_by(13) {
            for replacement in [":", "- ", "[", "\"", "*a", "\t"] {
                let mut text = sample.as_bytes().to_vec();
                text.splice(i..i + 1, replacement.bytes());
                if let Ok(text) = String::from_utf8(text) {
                    let _ = PolicySet::parse_files(&[("p.yaml", text.as_str())]);
                    parsed += 1;
                }
            }
        }
    }
    assert!(parsed > 1_000, "{parsed}");
}

// ---- decision cost ---------------------------------------------------------------------------

/// `n` destinations, each with a TrafficTarget (TCPRoute 8080 + an HTTPRouteGroup of three
/// matches: path, method, header) plus `n` TrafficTargets on one hot destination, each
/// naming a different source.
fn synthetic_set(n: usize) -> String {
    let mut text = String::new();
    text.push_str(
        "apiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata: {name: mesh}\nspec: {default: deny}\n",
    );
    text.push_str("---\napiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {name: http-port}\nspec: {matches: {ports: [8080]}}\n");
    text.push_str("---\napiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata: {name: routes}\nspec:\n  matches:\n  - {name: read, pathRegex: \"/api/v[0-9]+/items\", methods: [GET, HEAD]}\n  - {name: write, pathRegex: \"/api/v[0-9]+/items\", methods: [POST, PUT]}\n  - {name: canary, headers: {x-canary: \"true|yes\"}}\n");
    for i in 0..n {
        text.push_str(&format!(
            "---\napiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {{name: svc-{i}}}\nspec:\n  destination: {{kind: ServiceAccount, name: svc-{i}}}\n  rules:\n  - {{kind: TCPRoute, name: http-port}}\n  - {{kind: HTTPRouteGroup, name: routes, matches: [read, canary]}}\n  sources: [{{kind: ServiceAccount, name: client-{i}}}, {{kind: ServiceAccount, name: web}}]\n---\napiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {{name: hot-{i}}}\nspec:\n  destination: {{kind: ServiceAccount, name: hot}}\n  rules: [{{kind: HTTPRouteGroup, name: routes}}]\n  sources: [{{kind: ServiceAccount, name: hot-client-{i}}}]\n"
        ));
    }
    text
}

fn nanos_per_decision(engine: &Engine, request: &Request<'_>, expect: bool) -> f64 {
    const ROUNDS: u32 = 20_000;
    assert_eq!(engine.decide(request).allowed, expect);
    let start = Instant::now();
    let mut allowed = 0u32;
    for _ in 0..ROUNDS {
        allowed +=
            u32::from(std::hint::black_box(engine.decide(std::hint::black_box(request))).allowed);
    }
    assert_eq!(allowed, if expect { ROUNDS } else { 0 });
    start.elapsed().as_nanos() as f64 / f64::from(ROUNDS)
}

#[test]
fn decision_cost_stays_flat_from_10_to_1000_traffic_targets() {
    for n in [10, 1000] {
        let text = synthetic_set(n);
        let parse_start = Instant::now();
        let set = parse_one(&text);
        let parse_ms = parse_start.elapsed().as_secs_f64() * 1e3;
        let compile_start = Instant::now();
        let engine = Engine::new(&set, &td());
        let compile_ms = compile_start.elapsed().as_secs_f64() * 1e3;
        assert_eq!(set.traffic_targets().len(), 2 * n);

        let last = n - 1;
        let destination = key("default", &format!("svc-{last}"));
        let client = sa("default", &format!("client-{last}"));
        let hot = key("default", "hot");
        let hot_client = sa("default", &format!("hot-client-{last}"));
        let mut headers = HeaderMap::new();
        headers.insert("user-agent", HeaderValue::from_static("curl/8"));
        let get = |method, path, to, from| Request {
            source: from,
            destination: to,
            port: 8080,
            http: Some(HttpRequest {
                method,
                path,
                headers: &headers,
            }),
        };
        let allowed_http = nanos_per_decision(
            &engine,
            &get("GET", "/api/v2/items?page=3", &destination, &client),
            true,
        );
        let denied_http = nanos_per_decision(
            &engine,
            &get("DELETE", "/api/v2/items", &destination, &client),
            false,
        );
        let hot_http = nanos_per_decision(
            &engine,
            &get("POST", "/api/v1/items", &hot, &hot_client),
            true,
        );
        let tcp_request = Request {
            source: &client,
            destination: &destination,
            port: 8080,
            http: None,
        };
        let allowed_tcp = nanos_per_decision(&engine, &tcp_request, true);
        let unknown = sa("default", "stranger");
        let no_source = nanos_per_decision(
            &engine,
            &Request {
                source: &unknown,
                ..tcp_request
            },
            false,
        );
        println!(
            "policy decision cost with {} TrafficTargets (parse {parse_ms:.1} ms, compile \
             {compile_ms:.1} ms): allowed HTTP {allowed_http:.0} ns, denied HTTP \
             {denied_http:.0} ns, hot destination ({n} targets) HTTP {hot_http:.0} ns, \
             allowed TCP {allowed_tcp:.0} ns, unlisted source {no_source:.0} ns",
            2 * n
        );
    }
}

#[test]
fn a_connection_is_decided_once_unless_http_rules_apply() {
    let (a, b, c) = (
        sa(NS, "service-a"),
        key(NS, "service-b"),
        sa(NS, "service-c"),
    );
    // Unpublished: allowed as a whole.
    let open = Engine::unpublished().decide_connection(&a, &b, 9091);
    assert_eq!(open.map(|d| d.reason), Some(DecisionReason::NotPublished));
    // HTTPRouteGroup rules: each request is decided on its own...
    let engine = Engine::new(
        &parse(&[("mesh.yaml", MESH_DENY), ("spec.yaml", MESHERY_SPEC_PATH)]),
        &td(),
    );
    assert_eq!(engine.decide_connection(&a, &b, 9091), None);
    // ...but a source no target lists, or a port no target allows, is denied as a whole.
    let stranger = engine.decide_connection(&c, &b, 9091).expect("decided");
    assert_eq!(
        (stranger.allowed, stranger.reason),
        (false, DecisionReason::NoMatchingTarget)
    );
    let wrong_port = engine.decide_connection(&a, &b, 9092).expect("decided");
    assert_eq!(
        (wrong_port.allowed, wrong_port.reason),
        (false, DecisionReason::RouteNotMatched)
    );
    // A destination no target names follows the mesh default.
    let other = engine
        .decide_connection(&a, &key(NS, "service-z"), 80)
        .expect("decided");
    assert_eq!(other.reason, DecisionReason::DefaultDeny);
}

#[test]
fn a_tcp_route_only_target_allows_the_whole_connection() {
    let engine = engine(MESHERY_ACCESS_ALLOW);
    let decision = engine
        .decide_connection(&sa(NS, "service-a"), &key(NS, "service-b"), 9091)
        .expect("decided without looking at requests");
    assert_eq!(
        (decision.allowed, decision.reason),
        (true, DecisionReason::AllowedByTarget)
    );
}

#[test]
fn an_unavailable_policy_denies_everything() {
    let engine = Engine::unavailable();
    let d = tcp(&engine, &sa(NS, "a"), &key(NS, "b"), 80);
    assert_eq!((d.allowed, d.reason), (false, DecisionReason::Unavailable));
    assert_eq!(d.reason.as_str(), "policy_unavailable");
    let c = engine
        .decide_connection(&sa(NS, "a"), &key(NS, "b"), 80)
        .expect("decided");
    assert!(!c.allowed);
}
