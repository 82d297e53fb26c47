//! The local admin API: JSON over a Unix socket for the CLI, and `/metrics`, `/ready`,
//! `/live` over loopback HTTP for Prometheus and service managers.

pub mod api;
pub mod client;
mod policy;
pub mod server;

pub use client::AdminClient;
pub use server::AdminServer;
