//! `weft certs`, `weft certs verify` and `weft token create`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde::Serialize;
use weft_ca::bundle::trust_domain_of_root;
use weft_ca::{
    OperatorCredential, SpiffeId, TrustBundle, TrustDomain, Usage, parse_chain_pem, verify_svid,
};

use super::read::{fetch, print_json};
use super::{ReadArgs, table};
use crate::admin::api::{CertsReport, paths};
use crate::config::Config;

fn when(unix: u64) -> String {
    weft_ca::verify::format_utc(UNIX_EPOCH + Duration::from_secs(unix))
}

fn until(unix: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if unix > now {
        format!("in {}", table::age(unix - now))
    } else {
        format!("{} ago", table::age(now - unix))
    }
}

pub(super) fn show(socket: &Path, read: ReadArgs) -> anyhow::Result<()> {
    let report: CertsReport = fetch(socket, paths::CERTS)?;
    if read.json {
        return print_json(&report);
    }
    println!(
        "trust domain {}{}",
        report.trust_domain,
        if report.is_ca_host {
            " (this host is a CA host)"
        } else {
            ""
        }
    );
    for root in &report.roots {
        println!(
            "  root: {} (expires {})",
            root.subject,
            when(root.not_after)
        );
    }
    if report.identities.is_empty() {
        println!("no identity held yet (see `journalctl -u weft` for why)");
    }
    for id in &report.identities {
        println!("\n{} ({})", id.id, id.kind);
        println!(
            "  not after:    {} ({})",
            when(id.not_after),
            until(id.not_after)
        );
        println!(
            "  next renewal: {} ({})",
            when(id.renew_at),
            until(id.renew_at)
        );
        println!("  serial:       {}", id.serial);
        if !id.scope.is_empty() {
            println!("  may hold:     {}", id.scope.join(", "));
        }
        for (i, link) in id.chain.iter().enumerate() {
            let label = if i == 0 { "leaf" } else { "issued by" };
            println!(
                "  {label:<12}  {} <- {}",
                link.uri.as_deref().unwrap_or(&link.subject),
                link.issuer
            );
        }
    }
    let hosts: Vec<String> = report
        .ca_hosts
        .iter()
        .map(|h| format!("{} ({})", h.node, h.addr))
        .collect();
    println!(
        "\nCA hosts reachable by gossip: {}",
        if hosts.is_empty() {
            "none".into()
        } else {
            hosts.join(", ")
        }
    );
    Ok(())
}

/// What `weft certs verify --json` prints.
#[derive(Serialize)]
struct VerifyOutcome {
    ok: bool,
    id: Option<String>,
    not_after: Option<String>,
    reason: Option<String>,
    message: Option<String>,
}

pub(super) fn verify(
    file: &Path,
    bundle_path: Option<&Path>,
    expected: Option<&str>,
    config_path: &Path,
    json: bool,
) -> anyhow::Result<()> {
    let config = Config::load(config_path).ok();
    let bundle_path: PathBuf = match (bundle_path, &config) {
        (Some(path), _) => path.to_path_buf(),
        (None, Some(config)) => config.identity.trust_bundle.clone(),
        (None, None) => PathBuf::from("/etc/weft/trust-bundle.pem"),
    };
    let pem = std::fs::read(&bundle_path)
        .with_context(|| format!("cannot read trust bundle {}", bundle_path.display()))?;
    let roots: Vec<_> = parse_chain_pem(&pem).unwrap_or_default();
    let trust_domain: TrustDomain = roots
        .iter()
        .find_map(trust_domain_of_root)
        .or_else(|| config.map(|c| c.node.trust_domain.clone()))
        .with_context(|| {
            format!(
                "cannot tell which trust domain {} is for",
                bundle_path.display()
            )
        })?;
    let bundle = TrustBundle::from_pem(trust_domain, &pem)?;
    let chain_pem =
        std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let outcome = parse_chain_pem(&chain_pem)
        .and_then(|chain| verify_svid(&chain, &bundle, SystemTime::now(), Usage::Any))
        .map_err(|e| (e.reason().to_string(), e.to_string()))
        .and_then(|svid| match expected {
            Some(want) => {
                let want = SpiffeId::parse(want)
                    .map_err(|e| ("bad_expected_id".to_string(), format!("--id {want}: {e}")))?;
                if svid.id == want {
                    Ok(svid)
                } else {
                    Err((
                        "wrong_id".into(),
                        format!("the SVID is {}, not {want}", svid.id),
                    ))
                }
            }
            None => Ok(svid),
        });
    let report = match &outcome {
        Ok(svid) => VerifyOutcome {
            ok: true,
            id: Some(svid.id.to_string()),
            not_after: Some(weft_ca::verify::format_utc(svid.not_after)),
            reason: None,
            message: None,
        },
        Err((reason, message)) => VerifyOutcome {
            ok: false,
            id: None,
            not_after: None,
            reason: Some(reason.clone()),
            message: Some(message.clone()),
        },
    };
    if json {
        print_json(&report)?;
    } else if let Ok(svid) = &outcome {
        println!(
            "{}: OK {} (expires {})",
            file.display(),
            svid.id,
            weft_ca::verify::format_utc(svid.not_after)
        );
    }
    match outcome {
        Ok(_) => Ok(()),
        Err((reason, message)) if json => bail!("{reason}: {message}"),
        Err((reason, message)) => bail!("{}: FAIL ({reason}): {message}", file.display()),
    }
}

pub(super) fn token_create(
    operator: &Path,
    node: &str,
    services: &[String],
    ttl: &str,
) -> anyhow::Result<()> {
    let ttl = humantime::parse_duration(ttl)
        .with_context(|| format!("--ttl {ttl:?} is not a duration (e.g. 30m, 1h, 7d)"))?;
    let services: Vec<String> = services
        .iter()
        .map(|s| {
            if s.contains('/') {
                s.clone()
            } else {
                format!("default/{s}")
            }
        })
        .collect();
    let credential = OperatorCredential::load(operator)?;
    println!("{}", credential.create_token(node, &services, ttl)?);
    Ok(())
}
