//! The HTTP access log (`[log] access_log`): one JSON object a line per request, outbound
//! (from a local app) and inbound (to a local service), written by one background task so
//! requests never wait on disk. Lines that would wait (the writer is behind by
//! [`QUEUE`] lines) are dropped and counted rather than slowing traffic down. The path is
//! logged without its query string, which often carries secrets.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::time::SystemTime;

use prometheus::{IntCounter, Registry};
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::warn;

use crate::config::AccessLogTarget;

/// Lines the writer may be behind before new ones are dropped.
const QUEUE: usize = 4096;

/// One request, as logged.
#[derive(Debug, Serialize)]
pub struct AccessEntry<'a> {
    /// `outbound` or `inbound`.
    pub direction: &'a str,
    /// Calling service (`-` for the node itself).
    pub source: &'a str,
    /// Destination service.
    pub destination: &'a str,
    /// Route label (the TrafficSplit that routed it, or `-`).
    pub route: &'a str,
    /// Request method.
    pub method: &'a str,
    /// Request path, without the query.
    pub path: &'a str,
    /// Response status.
    pub status: u16,
    /// Time to the response head, milliseconds.
    pub duration_ms: f64,
    /// W3C trace id, when the request carries one.
    pub trace_id: Option<&'a str>,
}

#[derive(Serialize)]
struct Line<'a> {
    ts: String,
    #[serde(flatten)]
    entry: &'a AccessEntry<'a>,
}

/// The access log of this agent (a no-op when off).
pub struct AccessLog {
    lines: Option<mpsc::Sender<String>>,
    dropped: IntCounter,
}

impl AccessLog {
    /// Opens `target` and starts its writer; `None` turns the log off.
    pub fn start(
        target: Option<&AccessLogTarget>,
        registry: &Registry,
    ) -> anyhow::Result<AccessLog> {
        let dropped = IntCounter::new(
            "weft_access_log_dropped_total",
            "Access log lines dropped because the writer was behind.",
        )?;
        registry.register(Box::new(dropped.clone()))?;
        let Some(target) = target else {
            return Ok(AccessLog {
                lines: None,
                dropped,
            });
        };
        let mut out: Box<dyn Write + Send> = match target {
            AccessLogTarget::Stdout => Box::new(std::io::stdout()),
            AccessLogTarget::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o640)
                    .open(path)
                    .map_err(|e| {
                        anyhow::anyhow!("cannot open the access log {}: {e}", path.display())
                    })?,
            ),
        };
        let (tx, mut rx) = mpsc::channel::<String>(QUEUE);
        tokio::task::spawn_blocking(move || {
            while let Some(line) = rx.blocking_recv() {
                if let Err(e) = out.write_all(line.as_bytes()) {
                    warn!(error = %e, "access log write failed; access logging stops");
                    return;
                }
                if rx.is_empty() {
                    let _ = out.flush();
                }
            }
        });
        Ok(AccessLog {
            lines: Some(tx),
            dropped,
        })
    }

    /// Logs one request.
    pub fn record(&self, entry: &AccessEntry<'_>) {
        let Some(lines) = &self.lines else {
            return;
        };
        let line = Line {
            ts: weft_ca::verify::format_utc(SystemTime::now()),
            entry,
        };
        let mut text = serde_json::to_string(&line).expect("access lines always serialize");
        text.push('\n');
        if lines.try_send(text).is_err() {
            self.dropped.inc();
        }
    }
}

/// The trace id of a `traceparent` header value.
pub fn trace_id(traceparent: Option<&hyper::header::HeaderValue>) -> Option<&str> {
    traceparent?.to_str().ok()?.split('-').nth(1)
}
