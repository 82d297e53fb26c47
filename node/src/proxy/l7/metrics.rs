//! Golden metrics of HTTP requests: totals by status class and latency histograms per
//! direction, source, destination and route, plus retries, outlier ejections and requests
//! refused by rate limits. Labels are
//! bounded: service names, route names from policy, status classes.

use std::time::Duration;

use hyper::StatusCode;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use crate::proxy::Direction;

/// HTTP metrics.
pub struct HttpMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    retries: IntCounterVec,
    ejections: IntCounterVec,
    rate_limited: IntCounterVec,
}

/// Latency buckets, seconds: 0.5 ms to 10 s.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

impl HttpMetrics {
    /// Registers the HTTP metrics in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<HttpMetrics> {
        let requests = IntCounterVec::new(
            Opts::new(
                "weft_http_requests_total",
                "HTTP requests through the mesh, by direction, source, destination, route and status class.",
            ),
            &["direction", "source", "destination", "route", "code_class"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "weft_http_request_duration_seconds",
                "Time to the response head of HTTP requests through the mesh, retries included.",
            )
            .buckets(BUCKETS.to_vec()),
            &["direction", "source", "destination", "route"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "weft_http_retries_total",
                "HTTP request attempts after the first, by destination and reason (connect, status).",
            ),
            &["destination", "reason"],
        )?;
        let ejections = IntCounterVec::new(
            Opts::new(
                "weft_http_endpoint_ejections_total",
                "Endpoints left out of balancing after consecutive failures, by destination.",
            ),
            &["destination"],
        )?;
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "weft_http_rate_limited_total",
                "HTTP requests answered 429 by a local service's rate limit, by destination.",
            ),
            &["destination"],
        )?;
        registry.register(Box::new(rate_limited.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(ejections.clone()))?;
        Ok(HttpMetrics {
            requests,
            duration,
            retries,
            ejections,
            rate_limited,
        })
    }

    /// Counts one finished request.
    pub fn request(
        &self,
        direction: Direction,
        source: &str,
        destination: &str,
        route: &str,
        status: StatusCode,
        took: Duration,
    ) {
        let class = match status.as_u16() {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        let direction = direction.label();
        self.requests
            .with_label_values(&[direction, source, destination, route, class])
            .inc();
        self.duration
            .with_label_values(&[direction, source, destination, route])
            .observe(took.as_secs_f64());
    }

    /// Counts one retry.
    pub fn retry(&self, destination: &str, reason: &str) {
        self.retries.with_label_values(&[destination, reason]).inc();
    }

    /// Counts one request refused by a rate limit.
    pub fn rate_limited(&self, destination: &str) {
        self.rate_limited.with_label_values(&[destination]).inc();
    }

    /// Counts one ejection.
    pub fn ejection(&self, destination: &str) {
        self.ejections.with_label_values(&[destination]).inc();
    }
}
