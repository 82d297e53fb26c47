//! `weft revoke node|id|serial` and `weft revoke list`: publish the operator's signed
//! revocation list through the local agent (which spreads it like policy), and show it.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use weft_ca::revocation::normalise;
use weft_ca::{OperatorCredential, Revocation, RevokedKind};

use super::policy::{next_version, publish, unix_now};
use super::read::{fetch, print_json};
use super::{ReadArgs, table};
use crate::admin::api::{RevocationReport, paths};
use crate::policy::bundle::{self, RevocationList};

/// Adds `entry` to the list in force, keeping one entry per subject: revoking a node or ID
/// again moves its revocation time to now (covering certificates issued since). Returns
/// `None` when the serial is already revoked.
fn with_entry(mut list: Vec<Revocation>, entry: Revocation) -> Option<Vec<Revocation>> {
    if let Some(held) = list
        .iter_mut()
        .find(|e| e.kind == entry.kind && e.value == entry.value)
    {
        if entry.kind == RevokedKind::Serial {
            return None;
        }
        *held = entry;
    } else {
        list.push(entry);
    }
    Some(list)
}

/// `weft revoke KIND VALUE`.
pub(super) fn revoke(
    socket: &Path,
    kind: RevokedKind,
    value: &str,
    reason: Option<&str>,
    operator: Option<&Path>,
) -> anyhow::Result<()> {
    let operator = operator.context(
        "the operator credential is needed to sign revocations: pass --operator DIR or set WEFT_OPERATOR",
    )?;
    let signer = OperatorCredential::load(operator)?.signer(SystemTime::now())?;
    let value = normalise(kind, value, signer.id().trust_domain())
        .map_err(|e| anyhow::anyhow!("cannot revoke {kind} {value:?}: {e}"))?;
    let current: RevocationReport = fetch(socket, paths::REVOCATIONS)?;
    let entry = Revocation {
        kind,
        value: value.clone(),
        at: unix_now() as i64,
        reason: reason.unwrap_or_default().to_string(),
    };
    let Some(revoked) = with_entry(current.revoked, entry) else {
        println!(
            "{kind} {value} is already revoked (version {})",
            current.version
        );
        return Ok(());
    };
    let count = revoked.len();
    let version = next_version(None, current.version)?;
    let bytes = bundle::sign(RevocationList { revoked }, version, &signer)?;
    let applied = publish(socket, paths::REVOCATIONS, bytes)?;
    println!(
        "revoked {kind} {value}: revocation list version {} ({count} in force), signed by {}; every agent closes its tunnels and refuses it once the list reaches it (`weft revoke list` on any host shows it)",
        applied.version,
        signer.id()
    );
    Ok(())
}

/// `weft revoke list`.
pub(super) fn list(socket: &Path, read: ReadArgs) -> anyhow::Result<()> {
    let report: RevocationReport = fetch(socket, paths::REVOCATIONS)?;
    if read.json {
        return print_json(&report);
    }
    if report.version == 0 {
        println!("# nothing revoked");
        return Ok(());
    }
    println!(
        "# version {}, signed by {}",
        report.version,
        report.operator.as_deref().unwrap_or("-")
    );
    let rows: Vec<Vec<String>> = report
        .revoked
        .iter()
        .map(|e| {
            vec![
                e.kind.to_string(),
                e.value.clone(),
                weft_ca::verify::format_utc(UNIX_EPOCH + Duration::from_secs(e.at.max(0) as u64)),
                if e.reason.is_empty() {
                    "-".into()
                } else {
                    e.reason.clone()
                },
            ]
        })
        .collect();
    table::print(&["KIND", "SUBJECT", "REVOKED AT", "REASON"], &rows);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use Revocation as R;

    #[test]
    fn revoking_again_moves_the_time_and_serials_are_revoked_once() {
        let list = with_entry(Vec::new(), R::new(RevokedKind::Node, "a", 1)).unwrap();
        let list = with_entry(list, R::new(RevokedKind::Serial, "ff", 2)).unwrap();
        let list = with_entry(list, R::new(RevokedKind::Node, "a", 3)).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].at, 3);
        assert!(with_entry(list, R::new(RevokedKind::Serial, "ff", 4)).is_none());
    }
}
