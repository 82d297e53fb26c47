//! Weft integration-test support: multi-agent tests, the network-namespace lab ([`lab`]) and benchmarks.

pub mod agent;
pub mod bench_report;
pub mod lab;
