//! `weft members`, `weft services`, `weft status`: read the local agent's admin API.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use weft_discovery::Member;

use super::{ReadArgs, table};
use crate::admin::AdminClient;
use crate::admin::api::{ServiceEntry, StatusReport, paths};

/// Runs one admin request on a small runtime.
pub(super) fn fetch<T: serde::de::DeserializeOwned>(
    socket: &Path,
    path: &str,
) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(AdminClient::new(socket).get_json(path))?)
}

/// Prints `value` as pretty JSON.
pub(super) fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub(super) fn members(socket: &Path, read: ReadArgs) -> anyhow::Result<()> {
    let members: Vec<Member> = fetch(socket, paths::MEMBERS)?;
    if read.json {
        return print_json(&members);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            let record = m.record.as_ref();
            let or_dash = |s: Option<String>| s.unwrap_or_else(|| "-".into());
            vec![
                if m.is_self {
                    format!("{} (self)", m.name)
                } else {
                    m.name.clone()
                },
                m.state.as_str().to_string(),
                or_dash(record.map(|r| r.gossip_addr.to_string())),
                or_dash(record.map(|r| r.tunnel_addr.to_string())),
                or_dash(record.map(|r| table::age(now.saturating_sub(r.started_at)))),
                or_dash(record.map(|r| r.version.clone())),
                or_dash(
                    record
                        .map(|r| {
                            r.labels
                                .iter()
                                .map(|(k, v)| format!("{k}={v}"))
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .filter(|s| !s.is_empty()),
                ),
                or_dash(record.map(|r| r.roles.join(",")).filter(|s| !s.is_empty())),
            ]
        })
        .collect();
    table::print(
        &[
            "NAME", "STATE", "GOSSIP", "TUNNEL", "AGE", "VERSION", "LABELS", "ROLES",
        ],
        &rows,
    );
    Ok(())
}

pub(super) fn services(socket: &Path, name: Option<&str>, read: ReadArgs) -> anyhow::Result<()> {
    let mut services: Vec<ServiceEntry> = fetch(socket, paths::SERVICES)?;
    if let Some(name) = name {
        services.retain(|s| s.service.name == name || s.service.to_string() == name);
        if services.is_empty() {
            anyhow::bail!("no service named {name:?} in the catalog");
        }
    }
    if read.json {
        return print_json(&services);
    }
    let rows: Vec<Vec<String>> = services
        .iter()
        .flat_map(|s| {
            s.endpoints.iter().map(move |e| {
                vec![
                    s.service.to_string(),
                    e.node.clone(),
                    e.tunnel_addr.to_string(),
                    e.port.to_string(),
                    e.protocol.to_string(),
                    e.health.to_string(),
                    e.weight.to_string(),
                ]
            })
        })
        .collect();
    table::print(
        &[
            "SERVICE", "NODE", "TUNNEL", "PORT", "PROTOCOL", "HEALTH", "WEIGHT",
        ],
        &rows,
    );
    Ok(())
}

pub(super) fn status(socket: &Path, read: ReadArgs) -> anyhow::Result<()> {
    let status: StatusReport = fetch(socket, paths::STATUS)?;
    if read.json {
        return print_json(&status);
    }
    let m = status.members;
    println!("node:          {}", status.node);
    println!("trust domain:  {}", status.trust_domain);
    println!(
        "version:       {} (generation {})",
        status.version, status.generation
    );
    println!("ready:         {}", if status.ready { "yes" } else { "no" });
    match status.policy_version {
        0 => println!("policy:        none published (authenticated traffic is allowed)"),
        version => println!("policy:        version {version}"),
    }
    match status.revocation_version {
        0 => println!("revocations:   none published"),
        version => println!(
            "revocations:   {} in force (version {version}; `weft revoke list`)",
            status.revocations
        ),
    }
    println!("uptime:        {}", table::age(status.uptime_secs));
    println!("config:        {}", status.config.display());
    println!("gossip:        {}", status.gossip_addr);
    println!("tunnel:        {}", status.tunnel_addr);
    println!(
        "members:       {} alive, {} suspect, {} dead, {} left",
        m.alive, m.suspect, m.dead, m.left
    );
    println!(
        "gossip keys:   {} (primary {})",
        status.keyring.len(),
        status.keyring.first().map(String::as_str).unwrap_or("-")
    );
    match (&status.identity, status.identity_not_after) {
        (Some(id), Some(not_after)) => {
            let at = weft_ca::verify::format_utc(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(not_after),
            );
            println!("identity:      {id} (expires {at})");
        }
        _ => println!("identity:      none yet (waiting for a CA host; see `weft certs`)"),
    }
    println!(
        "CA hosts:      {} reachable by gossip{}",
        status.ca_hosts,
        if status.is_ca_host {
            "; this host is a CA host"
        } else {
            ""
        }
    );
    if status.services.is_empty() {
        println!("services:      none");
    } else {
        println!("services:");
        for s in &status.services {
            println!(
                "  {:<24} {:<22} {}",
                s.service.to_string(),
                s.address,
                s.health
            );
        }
    }
    Ok(())
}
