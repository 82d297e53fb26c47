//! `weft stat`: golden metrics per service across the mesh. Two `GET /v1/stat` samples of
//! every alive member's inbound HTTP counters, `--interval` apart, become one row per
//! destination service: success rate (non-5xx share), requests per second and p50/p95/p99
//! latency (interpolated from the histogram bucket deltas, like `histogram_quantile`).

use std::path::Path;
use std::time::Duration;

use super::read::print_json;
use super::table;
use crate::admin::AdminClient;
use crate::admin::api::{StatReport, paths};
use crate::agent::stats::{self, StatWindow};

pub(super) fn run(
    socket: &Path,
    service: Option<&str>,
    interval: Duration,
    json: bool,
) -> anyhow::Result<()> {
    if interval.is_zero() {
        anyhow::bail!("--interval must be longer than zero");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = AdminClient::new(socket);
    let window = runtime.block_on(async {
        let before: StatReport = client.get_json(paths::STAT).await?;
        let answered = before
            .agents
            .iter()
            .filter(|a| a.snapshot.is_some())
            .count();
        eprintln!(
            "weft stat: sampled {answered} of {} agents; next sample in {}",
            before.agents.len(),
            humantime::format_duration(interval)
        );
        tokio::time::sleep(interval).await;
        let after: StatReport = client.get_json(paths::STAT).await?;
        anyhow::Ok(stats::window(&before, &after, service))
    })?;
    if json {
        return print_json(&window);
    }
    print_table(&window);
    if let Some(service) = service
        && window.services.is_empty()
    {
        println!("(no HTTP requests to {service} were served in the window)");
    }
    Ok(())
}

fn print_table(window: &StatWindow) {
    let rows: Vec<Vec<String>> = window
        .services
        .iter()
        .map(|s| {
            vec![
                s.service.clone(),
                s.success_rate
                    .map(|r| format!("{:.2}%", r * 100.0))
                    .unwrap_or_else(|| "-".into()),
                format!("{:.1}", s.rps),
                latency(s.p50_seconds),
                latency(s.p95_seconds),
                latency(s.p99_seconds),
                s.agents.to_string(),
            ]
        })
        .collect();
    table::print(
        &["SERVICE", "SUCCESS", "RPS", "P50", "P95", "P99", "AGENTS"],
        &rows,
    );
    println!(
        "{} of {} agents answered; window {:.1}s",
        window.answered.len(),
        window.answered.len() + window.unreachable.len(),
        window.window_secs
    );
    for (node, reason) in &window.unreachable {
        println!("unreachable: {node}: {reason}");
    }
}

/// A latency for people: `850µs`, `12.3ms`, `1.25s`.
fn latency(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s < 0.001 => format!("{:.0}µs", s * 1e6),
        Some(s) if s < 1.0 => format!("{:.1}ms", s * 1e3),
        Some(s) => format!("{s:.2}s"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn latencies_are_short_and_readable() {
        assert_eq!(super::latency(None), "-");
        assert_eq!(super::latency(Some(0.00085)), "850µs");
        assert_eq!(super::latency(Some(0.0123)), "12.3ms");
        assert_eq!(super::latency(Some(1.25)), "1.25s");
    }
}
