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
mod proxy;
mod telemetry;

fn main() -> ExitCode {
    cli::run(cli::Cli::parse())
}
