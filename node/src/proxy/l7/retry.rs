//! What may be retried, and how much: the rules of one destination and its retry budget.
//!
//! Defaults: a request that never reached an endpoint (connect failure, a refused stream) is
//! always tried on another endpoint, since it cannot have had an effect; an idempotent request
//! whose connection failed before the answer (the host died, a partition) is too, within the
//! budget;
//! answers are retried only when an `HTTPRoutePolicy` (of the service the app addressed)
//! asks for it, and then only for
//! idempotent methods unless it says otherwise. Every retry draws on a budget per destination
//! that earns `percent`% of a retry per request plus `min_per_second` a second, so retries can
//! never multiply the load on a failing service.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::Method;

use crate::policy::model::HttpRoutePolicy;

/// Retry and timeout rules for requests to one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRules {
    /// The whole transaction, retries included; `None`: no limit.
    pub request_timeout: Option<Duration>,
    /// Each attempt; `None`: no limit.
    pub try_timeout: Option<Duration>,
    /// Retries after the first attempt, for answers with one of `codes`.
    pub attempts: u32,
    /// Answer codes that are retried.
    pub codes: Vec<u16>,
    /// Wait before a retry.
    pub backoff: Duration,
    /// Retry non-idempotent methods too.
    pub non_idempotent: bool,
    /// Share of requests that may be retried, in percent.
    pub budget_percent: u32,
    /// Retries allowed per second whatever the request rate.
    pub budget_min_per_second: u32,
}

impl Default for RouteRules {
    fn default() -> RouteRules {
        RouteRules {
            request_timeout: None,
            try_timeout: None,
            attempts: 0,
            codes: Vec::new(),
            backoff: Duration::from_millis(25),
            non_idempotent: false,
            budget_percent: 20,
            budget_min_per_second: 10,
        }
    }
}

/// Connect failures are retried on other endpoints at most this many times.
pub const CONNECT_RETRIES: u32 = 3;

impl RouteRules {
    /// The rules an `HTTPRoutePolicy` sets (defaults without one).
    pub fn of(policy: Option<&HttpRoutePolicy>) -> RouteRules {
        let Some(policy) = policy else {
            return RouteRules::default();
        };
        let retry = policy.retry.as_ref();
        RouteRules {
            request_timeout: policy.timeouts.request,
            try_timeout: policy.timeouts.backend_request,
            attempts: retry.map_or(0, |r| r.attempts),
            codes: retry.map(|r| r.codes.clone()).unwrap_or_default(),
            backoff: retry.map_or(RouteRules::default().backoff, |r| r.backoff),
            non_idempotent: retry.is_some_and(|r| r.non_idempotent),
            budget_percent: policy.budget.percent,
            budget_min_per_second: policy.budget.min_per_second,
        }
    }

    /// Whether an answer with `status` to a `method` request may be retried.
    pub fn retries_answer(&self, method: &Method, status: u16) -> bool {
        self.attempts > 0
            && self.codes.contains(&status)
            && (self.non_idempotent || is_idempotent(method))
    }
}

/// RFC 9110 §9.2.2 idempotent methods.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A token bucket of retries for one destination.
#[derive(Debug)]
pub struct RetryBudget {
    state: Mutex<(f64, Instant)>,
}

impl Default for RetryBudget {
    fn default() -> RetryBudget {
        RetryBudget {
            state: Mutex::new((0.0, Instant::now())),
        }
    }
}

impl RetryBudget {
    /// A request was sent: earns `percent`% of a retry.
    pub fn deposit(&self, rules: &RouteRules) {
        let mut state = self.state.lock().expect("budget lock is never poisoned");
        state.0 = (state.0 + f64::from(rules.budget_percent) / 100.0).min(cap(rules));
    }

    /// Takes one retry if the budget holds one.
    pub fn withdraw(&self, rules: &RouteRules) -> bool {
        let mut state = self.state.lock().expect("budget lock is never poisoned");
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(state.1).as_secs_f64();
        state.0 = (state.0 + elapsed * f64::from(rules.budget_min_per_second)).min(cap(rules));
        state.1 = now;
        if state.0 >= 1.0 {
            state.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// At most ten seconds' worth of minimum retries, plus 100 requests' worth, saved up.
fn cap(rules: &RouteRules) -> f64 {
    f64::from(rules.budget_min_per_second) * 10.0 + f64::from(rules.budget_percent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_caps_retries_at_its_share_of_requests() {
        let rules = RouteRules {
            budget_percent: 20,
            budget_min_per_second: 0,
            ..RouteRules::default()
        };
        let budget = RetryBudget::default();
        let mut retried = 0;
        for _ in 0..1000 {
            budget.deposit(&rules);
            if budget.withdraw(&rules) {
                retried += 1;
            }
        }
        assert!(
            (195..=200).contains(&retried),
            "{retried} retries for 1000 requests"
        );
    }

    #[test]
    fn only_idempotent_methods_are_retried_by_default() {
        let rules = RouteRules {
            attempts: 2,
            codes: vec![503],
            ..RouteRules::default()
        };
        assert!(rules.retries_answer(&Method::GET, 503));
        assert!(!rules.retries_answer(&Method::POST, 503));
        assert!(!rules.retries_answer(&Method::GET, 500));
        let post_too = RouteRules {
            non_idempotent: true,
            ..rules.clone()
        };
        assert!(post_too.retries_answer(&Method::POST, 503));
        assert!(!RouteRules::default().retries_answer(&Method::GET, 503));
    }
}
