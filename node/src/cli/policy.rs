//! `weft policy apply|get|status` and `weft why`: publish signed policies through the local
//! agent, show them, show which members run which version, and explain a decision.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use weft_ca::OperatorCredential;

use super::read::{fetch, print_json};
use super::{ReadArgs, table};
use crate::admin::AdminClient;
use crate::admin::api::{PolicyApplied, PolicyReport, PolicyStatusReport, WhyReport, paths};
use crate::policy::bundle::{self, PolicyFile};
use crate::policy::model::PolicySet;

/// What `weft why` asks.
pub struct WhyQuestion<'a> {
    /// Source service (`NAME`, `NAMESPACE/NAME`) or SPIFFE ID.
    pub from: &'a str,
    /// Destination service.
    pub to: &'a str,
    /// Destination port (default: the service's registered port).
    pub port: Option<u16>,
    /// HTTP method.
    pub method: Option<&'a str>,
    /// HTTP path.
    pub path: Option<&'a str>,
    /// Request headers, `NAME: VALUE`.
    pub headers: &'a [String],
}

/// Reads the policy files: `paths` are files, or directories whose `*.yaml` and `*.yml`
/// files are taken in name order.
fn read_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PolicyFile>> {
    let mut files = Vec::new();
    for path in paths {
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut found: Vec<PathBuf> = if meta.is_dir() {
            std::fs::read_dir(path)
                .with_context(|| format!("cannot list {}", path.display()))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
                })
                .collect()
        } else {
            vec![path.clone()]
        };
        found.sort();
        for file in found {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            files.push(PolicyFile {
                name: file.display().to_string(),
                text,
            });
        }
    }
    if files.is_empty() {
        bail!("no policy files found (a directory contributes its *.yaml and *.yml files)");
    }
    Ok(files)
}

/// `weft policy apply`.
pub(super) fn apply(
    socket: &Path,
    paths: &[PathBuf],
    operator: Option<&Path>,
    version: Option<u64>,
    dry_run: bool,
) -> anyhow::Result<()> {
    let files = read_files(paths)?;
    let named: Vec<(&str, &str)> = files
        .iter()
        .map(|f| (f.name.as_str(), f.text.as_str()))
        .collect();
    let set = match PolicySet::parse_files(&named) {
        Ok(set) => set,
        Err(errors) => {
            for error in &errors {
                eprintln!("{error}");
            }
            bail!(
                "the policy set has {} error(s); nothing was published",
                errors.len()
            );
        }
    };
    for warning in set.warnings() {
        eprintln!("warning: {warning}");
    }
    let summary = format!(
        "{} file(s): {} TrafficTarget, {} HTTPRouteGroup, {} TCPRoute, {} TrafficSplit{}",
        files.len(),
        set.traffic_targets().len(),
        set.http_route_groups().len(),
        set.tcp_routes().len(),
        set.traffic_splits().len(),
        if set.mesh().is_some() { ", Mesh" } else { "" }
    );
    if dry_run {
        println!("valid: {summary}");
        return Ok(());
    }
    let operator = operator.context(
        "the operator credential is needed to sign policies: pass --operator DIR or set WEFT_OPERATOR",
    )?;
    let signer = OperatorCredential::load(operator)?.signer(SystemTime::now())?;
    let current: PolicyReport = fetch(socket, paths::POLICY)?;
    let version = next_version(version, current.version)?;
    let bytes = bundle::sign(bundle::PolicyFiles { files }, version, &signer)?;
    let applied = publish(socket, paths::POLICY, bytes)?;
    println!(
        "policy version {} {} ({summary}), signed by {}; it spreads by gossip: `weft policy status` shows convergence",
        applied.version,
        if applied.result == "applied" {
            "applied"
        } else {
            "was already in force"
        },
        signer.id()
    );
    Ok(())
}

/// `weft policy get`.
pub(super) fn get(socket: &Path, read: ReadArgs) -> anyhow::Result<()> {
    let report: PolicyReport = fetch(socket, paths::POLICY)?;
    if read.json {
        return print_json(&report);
    }
    match report.state.as_str() {
        "unpublished" => {
            println!("# no policy published yet: authenticated mesh traffic is allowed");
            return Ok(());
        }
        "unavailable" => {
            println!(
                "# the persisted policy bundle failed verification: all inbound traffic is denied until a good bundle arrives (see the agent log)"
            );
            return Ok(());
        }
        _ => {}
    }
    println!("# version:   {}", report.version);
    println!("# digest:    {}", report.digest.as_deref().unwrap_or("-"));
    println!("# signed by: {}", report.operator.as_deref().unwrap_or("-"));
    if let Some(at) = report.issued_at {
        println!(
            "# signed at: {}",
            weft_ca::verify::format_utc(UNIX_EPOCH + std::time::Duration::from_secs(at))
        );
    }
    for file in &report.files {
        println!("# ---- file: {}", file.name);
        print!("{}", file.text);
        if !file.text.ends_with('\n') {
            println!();
        }
    }
    Ok(())
}

/// `weft policy status`.
pub(super) fn status(socket: &Path, read: ReadArgs) -> anyhow::Result<()> {
    let report: PolicyStatusReport = fetch(socket, paths::POLICY_STATUS)?;
    if read.json {
        return print_json(&report);
    }
    let rows: Vec<Vec<String>> = report
        .members
        .iter()
        .map(|m| {
            vec![
                m.node.clone(),
                m.state.clone(),
                m.version.to_string(),
                m.digest
                    .as_deref()
                    .map(|d| d[..d.len().min(12)].to_string())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table::print(&["NODE", "STATE", "VERSION", "DIGEST"], &rows);
    println!(
        "converged: {} (this agent: version {})",
        if report.converged { "yes" } else { "no" },
        report.version
    );
    Ok(())
}

/// `weft why`.
pub(super) fn why(socket: &Path, question: &WhyQuestion<'_>, read: ReadArgs) -> anyhow::Result<()> {
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("from", question.from);
    query.append_pair("to", question.to);
    if let Some(port) = question.port {
        query.append_pair("port", &port.to_string());
    }
    if let Some(method) = question.method {
        query.append_pair("method", method);
    }
    if let Some(path) = question.path {
        query.append_pair("path", path);
    }
    for header in question.headers {
        query.append_pair("header", header);
    }
    let path = format!("{}?{}", paths::WHY, query.finish());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, body) = runtime.block_on(AdminClient::new(socket).get(&path))?;
    if !status.is_success() {
        bail!("{}", String::from_utf8_lossy(&body).trim());
    }
    let report: WhyReport = serde_json::from_slice(&body)?;
    if read.json {
        return print_json(&report);
    }
    println!(
        "{} -> {} port {}: {}",
        report.source, report.destination, report.port, report.decision
    );
    if let Some(reason) = &report.reason {
        println!("  reason:   {reason}");
    }
    if let Some(document) = &report.document {
        println!("  document: {document}");
    }
    if let Some(rule) = &report.rule {
        println!("  rule:     {rule}");
    }
    if report.decision == "per-request" {
        println!("  the destination's rules look at each request: add --method and --path");
    }
    println!("  policy version {}", report.policy_version);
    Ok(())
}

/// The version to publish after `current`: `requested` if it is higher, else seconds since
/// the epoch (which grows across operators and machines), or one past `current` if clocks
/// disagree.
pub(super) fn next_version(requested: Option<u64>, current: u64) -> anyhow::Result<u64> {
    Ok(match requested {
        Some(v) if v <= current => {
            bail!("version {v} is not higher than version {current} in force")
        }
        Some(v) => v,
        None => unix_now().max(current.saturating_add(1)),
    })
}

/// Hands a signed bundle to the local agent at `path` (`/v1/policy`, `/v1/revocations`).
pub(super) fn publish(socket: &Path, path: &str, bytes: Vec<u8>) -> anyhow::Result<PolicyApplied> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, body) =
        runtime.block_on(AdminClient::new(socket).post(path, Bytes::from(bytes)))?;
    if !status.is_success() {
        bail!(
            "the agent refused the bundle: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(serde_json::from_slice(&body)?)
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
