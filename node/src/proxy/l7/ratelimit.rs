//! Local rate limits: each HTTP service instance may cap the requests per second it takes from
//! the mesh (`[[service]] rate_limit`); requests over the limit are answered `429 Too Many
//! Requests` by the agent, with `retry-after`, and never reach the app. A token bucket per
//! service: `rps` tokens a second, holding at most `burst`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use weft_discovery::ServiceKey;

use crate::config::RateLimit;

/// Token buckets, by local service.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<ServiceKey, (f64, Instant)>>,
}

impl RateLimiter {
    /// Whether one more request to `service` fits `limit` now; takes its token if so.
    pub fn admit(&self, service: &ServiceKey, limit: RateLimit) -> bool {
        self.admit_at(service, limit, Instant::now())
    }

    fn admit_at(&self, service: &ServiceKey, limit: RateLimit, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().expect("limiter lock is never poisoned");
        let burst = f64::from(limit.burst);
        let (tokens, updated) = buckets.entry(service.clone()).or_insert((burst, now));
        let elapsed = now.saturating_duration_since(*updated).as_secs_f64();
        *tokens = (*tokens + elapsed * f64::from(limit.rps)).min(burst);
        *updated = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let limiter = RateLimiter::default();
        let service = ServiceKey::new("default", "api");
        let limit = RateLimit { rps: 10, burst: 5 };
        let start = Instant::now();
        let burst = (0..20)
            .filter(|_| limiter.admit_at(&service, limit, start))
            .count();
        assert_eq!(burst, 5);
        // One second later: ten more tokens, capped at the burst of five.
        let later = start + Duration::from_secs(1);
        let refilled = (0..20)
            .filter(|_| limiter.admit_at(&service, limit, later))
            .count();
        assert_eq!(refilled, 5);
        // 100 ms later: one token.
        let soon = later + Duration::from_millis(100);
        assert!(limiter.admit_at(&service, limit, soon));
        assert!(!limiter.admit_at(&service, limit, soon));
    }
}
