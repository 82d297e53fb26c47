//! TrafficSplit routing (SMI `split.smi-spec.io/v1alpha4`, research `specs.md` §1.5): a
//! request addressed to a split's root service goes to one of its backends, drawn at random
//! in proportion to the weights; with `matches`, only requests matching one of the named
//! HTTPRouteGroups are split and the rest go to the root service itself. All weights 0, or no
//! split for the service: the root service. Backends are not resolved recursively.

use std::collections::HashMap;
use std::sync::Arc;

use hyper::http::request::Parts;
use rand::Rng;
use weft_discovery::ServiceKey;

use crate::policy::matcher::{HttpMatcher, normalize_path};
use crate::policy::model::PolicySet;

/// One compiled TrafficSplit.
#[derive(Debug)]
struct CompiledSplit {
    /// `split NS/NAME`, the route label of the requests it routes.
    label: Arc<str>,
    backends: Vec<(ServiceKey, u32)>,
    total: u64,
    /// Empty: every request is split.
    matchers: Vec<HttpMatcher>,
}

/// Every TrafficSplit of a policy set, by root service.
#[derive(Debug, Default)]
pub struct Splits {
    by_root: HashMap<ServiceKey, Vec<CompiledSplit>>,
}

impl Splits {
    /// Compiles the splits of `set` (validated, so references resolve).
    pub fn new(set: &PolicySet) -> Splits {
        let mut by_root: HashMap<ServiceKey, Vec<CompiledSplit>> = HashMap::new();
        for split in set.traffic_splits() {
            let namespace = &split.meta.namespace;
            let matchers = split
                .matches
                .iter()
                .filter_map(|group| {
                    set.http_route_groups()
                        .iter()
                        .find(|g| &g.meta.namespace == namespace && &g.meta.name == group)
                })
                .flat_map(|group| group.matches.iter())
                .filter_map(|m| HttpMatcher::compile(m, set.path_regex_match()))
                .collect();
            let backends: Vec<(ServiceKey, u32)> = split
                .backends
                .iter()
                .map(|b| (b.service.clone(), b.weight))
                .collect();
            let total = backends.iter().map(|(_, w)| u64::from(*w)).sum();
            by_root
                .entry(split.service.clone())
                .or_default()
                .push(CompiledSplit {
                    label: format!("split {namespace}/{}", split.meta.name).into(),
                    backends,
                    total,
                    matchers,
                });
        }
        Splits { by_root }
    }

    /// The services a split of `root` may send to.
    pub fn backends_of(&self, root: &ServiceKey) -> Vec<ServiceKey> {
        self.by_root
            .get(root)
            .into_iter()
            .flatten()
            .flat_map(|s| s.backends.iter().map(|(b, _)| b.clone()))
            .collect()
    }

    /// Where a request to `service` goes, and the label of the split that sent it (`-` when
    /// none did).
    pub fn route(&self, service: &ServiceKey, parts: &Parts) -> (ServiceKey, Arc<str>) {
        let unsplit = || (service.clone(), Arc::from("-"));
        let Some(splits) = self.by_root.get(service) else {
            return unsplit();
        };
        let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let normalized = normalize_path(path);
        let applies = |split: &&CompiledSplit| {
            split.total > 0
                && (split.matchers.is_empty()
                    || split
                        .matchers
                        .iter()
                        .any(|m| m.matches(parts.method.as_str(), &normalized, &parts.headers)))
        };
        let Some(split) = splits.iter().find(applies) else {
            return unsplit();
        };
        let mut draw = rand::rng().random_range(0..split.total);
        for (backend, weight) in &split.backends {
            if draw < u64::from(*weight) {
                return (backend.clone(), split.label.clone());
            }
            draw -= u64::from(*weight);
        }
        unsplit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(text: &str) -> PolicySet {
        PolicySet::parse_files(&[("split.yaml", text)]).expect("valid")
    }

    fn parts(path: &str, agent: &str) -> Parts {
        hyper::Request::get(path)
            .header("user-agent", agent)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    const CANARY: &str = "apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: canary, namespace: default}
spec:
  service: website
  backends:
  - {service: website-v1, weight: 90}
  - {service: website-v2, weight: 10}
";

    #[test]
    fn weights_share_requests() {
        let splits = Splits::new(&set(CANARY));
        let root = ServiceKey::new("default", "website");
        let mut v2 = 0;
        for _ in 0..10_000 {
            let (to, label) = splits.route(&root, &parts("/", "curl"));
            assert_eq!(&*label, "split default/canary");
            if to.name == "website-v2" {
                v2 += 1;
            }
        }
        assert!((800..=1200).contains(&v2), "v2 got {v2} of 10000");
        assert_eq!(splits.backends_of(&root).len(), 2);
        let other = ServiceKey::new("default", "api");
        assert_eq!(splits.route(&other, &parts("/", "curl")).0, other);
    }

    #[test]
    fn matches_split_only_matching_requests() {
        let text = "apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: ab-test, namespace: default}
spec:
  service: website
  matches: [{kind: HTTPRouteGroup, name: ab-test}]
  backends:
  - {service: website-v1, weight: 0}
  - {service: website-v2, weight: 100}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: ab-test, namespace: default}
spec:
  matches:
  - name: firefox-users
    headers: {user-agent: \".*Firefox.*\"}
";
        let splits = Splits::new(&set(text));
        let root = ServiceKey::new("default", "website");
        assert_eq!(
            splits.route(&root, &parts("/", "Mozilla Firefox/1")).0.name,
            "website-v2"
        );
        assert_eq!(splits.route(&root, &parts("/", "curl")).0, root);
    }
}
