//! Authorization decisions: may this verified source reach this destination, on this port,
//! with this request?
//!
//! The engine is compiled once per policy set (TrafficTargets indexed by destination service
//! and then by source identity; every regex compiled once) and is then read-only, so the data
//! plane can share it behind an `Arc` and decide without locks or allocation. It is pure: no
//! I/O, no clock, no metrics; the caller enforces, counts and logs (`Decision::reason`
//! gives the label). It must never allow what the set does not: anything it cannot resolve
//! matches nothing.
//!
//! Semantics (SPEC §7, research `specs.md` §1.3.3 and §1.8):
//! - before any policy set is published, every authenticated request is allowed;
//! - a destination that no TrafficTarget names follows the Mesh `default` (allow without one);
//! - once a TrafficTarget names a destination, only what TrafficTargets allow reaches it: the
//!   source must be listed, and the rules must match. For opaque TCP, some TCPRoute rule must
//!   list the port (no ports = every port). For HTTP, the port must pass the TCPRoute rules
//!   (if there are any) AND the request must match a selected HTTPRouteGroup match (if there
//!   are HTTPRouteGroup rules; a target with only TCPRoute rules allows every request).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use hyper::HeaderMap;
use weft_ca::{SpiffeId, TrustDomain};
use weft_discovery::ServiceKey;

use super::matcher::{HttpMatcher, normalize_path};
use super::model::{
    DefaultPolicy, HttpRouteGroup, PolicySet, RouteKind, Subject, TcpRoute, TrafficTarget,
};

/// What is asking to get through.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The peer's verified SPIFFE ID (a service's, or a node's for agent traffic).
    pub source: &'a SpiffeId,
    /// The destination service.
    pub destination: &'a ServiceKey,
    /// The destination port the request arrived for (the service's port).
    pub port: u16,
    /// The HTTP request, for `http`/`http2`/`grpc` services; `None` for opaque TCP.
    pub http: Option<HttpRequest<'a>>,
}

/// The parts of an HTTP request policy can match.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    /// The method, exactly as sent (`GET`).
    pub method: &'a str,
    /// The request path, with or without the query; it is normalised before matching.
    pub path: &'a str,
    /// The request headers.
    pub headers: &'a HeaderMap,
}

/// Why a request was allowed or denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecisionReason {
    /// No policy set has been published yet: authenticated traffic is allowed.
    NotPublished,
    /// The agent holds a policy bundle it cannot use (e.g. its persisted copy failed
    /// verification) and has no good one yet: everything is denied until one arrives.
    Unavailable,
    /// No TrafficTarget names the destination, and the mesh default is allow.
    NoPolicy,
    /// A TrafficTarget allows it.
    AllowedByTarget,
    /// No TrafficTarget names the destination, and the mesh default is deny.
    DefaultDeny,
    /// TrafficTargets name the destination, but none lists the source.
    NoMatchingTarget,
    /// A TrafficTarget lists the source, but no rule matches the port or request.
    RouteNotMatched,
}

impl DecisionReason {
    /// A stable label for metrics and the `weft-deny-reason` header.
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionReason::NotPublished => "not_published",
            DecisionReason::Unavailable => "policy_unavailable",
            DecisionReason::NoPolicy => "no_policy",
            DecisionReason::AllowedByTarget => "allowed_by_target",
            DecisionReason::DefaultDeny => "default_deny",
            DecisionReason::NoMatchingTarget => "no_matching_target",
            DecisionReason::RouteNotMatched => "route_not_matched",
        }
    }
}

impl fmt::Display for DecisionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome, with the document and rule that made it (for `weft why` and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// Why.
    pub reason: DecisionReason,
    /// `TrafficTarget NS/NAME` that allowed it, or that listed the source but had no
    /// matching rule.
    pub document: Option<Arc<str>>,
    /// The rule that allowed it, e.g. `rules[1] HTTPRouteGroup api-routes match metrics`.
    pub rule: Option<Arc<str>>,
}

impl Decision {
    fn new(allowed: bool, reason: DecisionReason) -> Decision {
        Decision {
            allowed,
            reason,
            document: None,
            rule: None,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.allowed { "allowed" } else { "denied" })?;
        write!(f, " ({})", self.reason)?;
        if let Some(document) = &self.document {
            write!(f, " by {document}")?;
        }
        if let Some(rule) = &self.rule {
            write!(f, " {rule}")?;
        }
        Ok(())
    }
}

/// A compiled policy set.
#[derive(Debug, Clone)]
pub struct Engine {
    state: State,
}

#[derive(Debug, Clone)]
enum State {
    Unpublished,
    Unavailable,
    Published(CompiledPolicy),
}

#[derive(Debug, Clone)]
struct CompiledPolicy {
    default: DefaultPolicy,
    destinations: HashMap<ServiceKey, Destination>,
}

/// The TrafficTargets naming one destination, indexed by source identity.
#[derive(Debug, Clone, Default)]
struct Destination {
    targets: Vec<Target>,
    by_source: HashMap<SpiffeId, Vec<usize>>,
}

#[derive(Debug, Clone)]
struct Target {
    label: Arc<str>,
    /// A reference that did not resolve (validation prevents it): the target allows nothing.
    broken: bool,
    port: Option<u16>,
    tcp: Vec<TcpRule>,
    http: Vec<HttpRule>,
}

#[derive(Debug, Clone)]
struct TcpRule {
    label: Arc<str>,
    /// Empty: every port.
    ports: Vec<u16>,
}

#[derive(Debug, Clone)]
struct HttpRule {
    label: Arc<str>,
    /// Shared by every target that selects the same match.
    matcher: Arc<HttpMatcher>,
}

/// Compiled matches by (namespace, group, match name): each regex is compiled once per set,
/// however many TrafficTargets select it. `None` records a match that did not compile.
type MatcherCache<'s> = HashMap<(&'s str, &'s str, &'s str), Option<Arc<HttpMatcher>>>;

impl Engine {
    /// The engine before any policy set is published: authenticated traffic is allowed.
    pub fn unpublished() -> Engine {
        Engine {
            state: State::Unpublished,
        }
    }

    /// The engine of an agent that must not fall back to allowing: every request is denied
    /// (reason `policy_unavailable`) until a good policy set replaces it.
    pub fn unavailable() -> Engine {
        Engine {
            state: State::Unavailable,
        }
    }

    /// `unpublished`, `unavailable` or `published`.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            State::Unpublished => "unpublished",
            State::Unavailable => "unavailable",
            State::Published(_) => "published",
        }
    }

    /// Compiles a validated set. ServiceAccount subjects become service SPIFFE IDs in
    /// `trust_domain`; a peer of another trust domain matches only `SPIFFEID` subjects.
    pub fn new(set: &PolicySet, trust_domain: &TrustDomain) -> Engine {
        let groups: HashMap<(&str, &str), &HttpRouteGroup> = set
            .http_route_groups()
            .iter()
            .map(|g| ((g.meta.namespace.as_str(), g.meta.name.as_str()), g))
            .collect();
        let tcp_routes: HashMap<(&str, &str), &TcpRoute> = set
            .tcp_routes()
            .iter()
            .map(|r| ((r.meta.namespace.as_str(), r.meta.name.as_str()), r))
            .collect();
        let mut matchers = MatcherCache::new();
        let mut destinations: HashMap<ServiceKey, Destination> = HashMap::new();
        for target in set.traffic_targets() {
            let compiled = compile_target(target, &groups, &tcp_routes, &mut matchers, set);
            let destination = destinations.entry(target.destination.clone()).or_default();
            let position = destination.targets.len();
            destination.targets.push(compiled);
            for subject in &target.sources {
                let id = match subject {
                    Subject::ServiceAccount(key) => {
                        // Names are validated SPIFFE segments, so this only fails past the
                        // ID length limit; such a source then matches no peer.
                        match SpiffeId::service(trust_domain, &key.namespace, &key.name) {
                            Ok(id) => id,
                            Err(_) => continue,
                        }
                    }
                    Subject::SpiffeId(id) => id.clone(),
                };
                let positions = destination.by_source.entry(id).or_default();
                if positions.last() != Some(&position) {
                    positions.push(position);
                }
            }
        }
        Engine {
            state: State::Published(CompiledPolicy {
                default: set.default_policy(),
                destinations,
            }),
        }
    }

    /// Decides one request. Cost: two hash lookups, then the rules of the TrafficTargets
    /// that name both this destination and this source.
    pub fn decide(&self, request: &Request<'_>) -> Decision {
        let (destination, candidates) = match self.candidates(request.source, request.destination) {
            Ok(found) => found,
            Err(decision) => return decision,
        };
        let mut path = None;
        for &i in candidates {
            let target = &destination.targets[i];
            if let Some(rule) = target.allows(request, &mut path) {
                return Decision {
                    allowed: true,
                    reason: DecisionReason::AllowedByTarget,
                    document: Some(target.label.clone()),
                    rule: Some(rule.clone()),
                };
            }
        }
        route_not_matched(destination, candidates)
    }

    /// For a connection to an HTTP destination: the decision every request on it would get,
    /// when that does not depend on the request (so the proxy may pass bytes through), or
    /// `None` when each request must be decided on its own.
    pub fn decide_connection(
        &self,
        source: &SpiffeId,
        destination: &ServiceKey,
        port: u16,
    ) -> Option<Decision> {
        let (compiled, candidates) = match self.candidates(source, destination) {
            Ok(found) => found,
            Err(decision) => return Some(decision),
        };
        let mut per_request = false;
        for &i in candidates {
            let target = &compiled.targets[i];
            if target.broken || target.port.is_some_and(|p| p != port) {
                continue;
            }
            let tcp_hit = target
                .tcp
                .iter()
                .find(|r| r.ports.is_empty() || r.ports.contains(&port));
            if !target.tcp.is_empty() && tcp_hit.is_none() {
                continue;
            }
            match (target.http.is_empty(), tcp_hit) {
                (true, Some(rule)) => {
                    return Some(Decision {
                        allowed: true,
                        reason: DecisionReason::AllowedByTarget,
                        document: Some(target.label.clone()),
                        rule: Some(rule.label.clone()),
                    });
                }
                (false, _) => per_request = true,
                (true, None) => {}
            }
        }
        (!per_request).then(|| route_not_matched(compiled, candidates))
    }

    /// The TrafficTargets naming this destination and source, or the decision when there
    /// are none to look at.
    fn candidates(
        &self,
        source: &SpiffeId,
        destination: &ServiceKey,
    ) -> Result<(&Destination, &[usize]), Decision> {
        let policy = match &self.state {
            State::Unpublished => return Err(Decision::new(true, DecisionReason::NotPublished)),
            State::Unavailable => return Err(Decision::new(false, DecisionReason::Unavailable)),
            State::Published(policy) => policy,
        };
        let Some(compiled) = policy.destinations.get(destination) else {
            return Err(match policy.default {
                DefaultPolicy::Allow => Decision::new(true, DecisionReason::NoPolicy),
                DefaultPolicy::Deny => Decision::new(false, DecisionReason::DefaultDeny),
            });
        };
        match compiled.by_source.get(source) {
            Some(candidates) => Ok((compiled, candidates)),
            None => Err(Decision::new(false, DecisionReason::NoMatchingTarget)),
        }
    }
}

fn route_not_matched(destination: &Destination, candidates: &[usize]) -> Decision {
    Decision {
        allowed: false,
        reason: DecisionReason::RouteNotMatched,
        document: candidates
            .first()
            .map(|&i| destination.targets[i].label.clone()),
        rule: None,
    }
}

fn compile_target<'s>(
    target: &'s TrafficTarget,
    groups: &HashMap<(&str, &str), &'s HttpRouteGroup>,
    tcp_routes: &HashMap<(&str, &str), &'s TcpRoute>,
    matchers: &mut MatcherCache<'s>,
    set: &PolicySet,
) -> Target {
    let namespace = target.meta.namespace.as_str();
    let mut compiled = Target {
        label: format!("TrafficTarget {namespace}/{}", target.meta.name).into(),
        broken: false,
        port: target.destination_port,
        tcp: Vec::new(),
        http: Vec::new(),
    };
    for (i, rule) in target.rules.iter().enumerate() {
        match rule.kind {
            RouteKind::TcpRoute => match tcp_routes.get(&(namespace, rule.name.as_str())) {
                Some(route) => compiled.tcp.push(TcpRule {
                    label: format!("rules[{i}] TCPRoute {}", rule.name).into(),
                    ports: route.ports.clone(),
                }),
                None => compiled.broken = true,
            },
            RouteKind::HttpRouteGroup => {
                let Some(group) = groups.get(&(namespace, rule.name.as_str())) else {
                    compiled.broken = true;
                    continue;
                };
                let selected = group
                    .matches
                    .iter()
                    .filter(|m| rule.matches.is_empty() || rule.matches.contains(&m.name));
                for m in selected {
                    let matcher = matchers
                        .entry((namespace, group.meta.name.as_str(), m.name.as_str()))
                        .or_insert_with(|| {
                            HttpMatcher::compile(m, set.path_regex_match()).map(Arc::new)
                        });
                    match matcher {
                        Some(matcher) => compiled.http.push(HttpRule {
                            label: format!(
                                "rules[{i}] HTTPRouteGroup {} match {}",
                                rule.name, m.name
                            )
                            .into(),
                            matcher: matcher.clone(),
                        }),
                        None => compiled.broken = true,
                    }
                }
            }
        }
    }
    compiled
}

impl Target {
    /// The rule that lets the request through, if any. `path` caches the normalised path
    /// across the targets of one decision.
    fn allows<'r>(
        &self,
        request: &Request<'r>,
        path: &mut Option<Cow<'r, str>>,
    ) -> Option<&Arc<str>> {
        if self.broken || self.port.is_some_and(|p| p != request.port) {
            return None;
        }
        let tcp_hit = self
            .tcp
            .iter()
            .find(|r| r.ports.is_empty() || r.ports.contains(&request.port));
        let Some(http) = &request.http else {
            return tcp_hit.map(|r| &r.label);
        };
        if !self.tcp.is_empty() && tcp_hit.is_none() {
            return None;
        }
        if self.http.is_empty() {
            return tcp_hit.map(|r| &r.label);
        }
        let path = path.get_or_insert_with(|| normalize_path(http.path));
        self.http
            .iter()
            .find(|r| r.matcher.matches(http.method, path, http.headers))
            .map(|r| &r.label)
    }
}
