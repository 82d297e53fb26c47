//! The Weft agent as a library: the `weft` binary is a thin shell around [`cli`], and fuzz
//! targets and benchmarks reach the parsers ([`config`], [`policy`], [`header`]) through it.
//! Everything else stays private to the crate, so unused code is still caught.

mod admin;
mod agent;
pub mod cli;
pub mod config;
mod demo;
mod endpoint;
mod health;
mod identity;
mod metrics;
pub mod policy;
mod proxy;
mod telemetry;

pub use proxy::header;
