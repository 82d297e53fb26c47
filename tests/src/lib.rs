//! Weft integration-test support: multi-agent tests, the network-namespace lab ([`lab`]) and benchmarks
//! (report writing in [`bench_report`], the shared in-process gossip simulation in [`gossip_sim`]).

pub mod agent;
pub mod bench_report;
pub mod charts;
pub mod faults;
pub mod gossip_sim;
pub mod http_backend;
pub mod lab;
pub mod nginx;
pub mod rogue;
