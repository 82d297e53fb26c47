//! Log setup: tracing to stderr (journald-friendly), text or JSON, with a level that SIGHUP
//! can change while running.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::LogFormat;

/// Changes the log filter of the running process.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl LogControl {
    /// Replaces the filter; `RUST_LOG`, when set, still wins.
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        let filter = filter_for(level)?;
        self.handle.reload(filter).map_err(|e| e.to_string())
    }
}

fn filter_for(level: &str) -> Result<EnvFilter, String> {
    match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => EnvFilter::try_new(env).map_err(|e| e.to_string()),
        _ => EnvFilter::try_new(level).map_err(|e| e.to_string()),
    }
}

/// Installs the global subscriber. Call once per process.
pub fn init(level: &str, format: LogFormat) -> LogControl {
    let filter = filter_for(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    // journald stamps every line itself; a terminal gets colours, anything else plain text.
    let timestamps = std::env::var_os("JOURNAL_STREAM").is_none();
    let ansi = std::io::stderr().is_terminal();
    match (format, timestamps) {
        (LogFormat::Json, _) => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init(),
        (LogFormat::Text, true) => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .init(),
        (LogFormat::Text, false) => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .without_time()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    LogControl { handle }
}
