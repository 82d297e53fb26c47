//! The `weft` binary: agent and CLI in one.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    weft::cli::run(weft::cli::Cli::parse())
}
