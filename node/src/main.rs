//! The `weft` binary: agent and CLI in one.

use std::process::ExitCode;

use clap::Parser;

mod admin;
mod agent;
mod cli;
mod config;
mod demo;
mod endpoint;
mod health;
mod identity;
mod metrics;
// The agent wires policy into the proxy, admin API and CLI next; until then only tests use it.
#[cfg_attr(not(test), allow(dead_code))]
mod policy;
mod proxy;
mod telemetry;

fn main() -> ExitCode {
    cli::run(cli::Cli::parse())
}
