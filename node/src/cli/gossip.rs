//! `weft gossip keygen` and `weft gossip keys`.

use std::path::Path;

use weft_discovery::GossipKey;

use super::read::{fetch, print_json};
use super::{ReadArgs, table};
use crate::admin::api::{KeysReport, paths};

pub(super) fn keygen() -> anyhow::Result<()> {
    println!("{}", GossipKey::generate().to_base64());
    Ok(())
}

pub(super) fn keys(socket: &Path, read: ReadArgs) -> anyhow::Result<()> {
    let report: KeysReport = fetch(socket, paths::GOSSIP_KEYS)?;
    if read.json {
        return print_json(&report);
    }
    println!("this agent: {}", describe(&report.local));
    let rows: Vec<Vec<String>> = report
        .members
        .iter()
        .map(|m| {
            vec![
                m.node.clone(),
                m.state.as_str().to_string(),
                m.keyring.first().cloned().unwrap_or_else(|| "-".into()),
                m.keyring.join(","),
            ]
        })
        .collect();
    table::print(&["NODE", "STATE", "PRIMARY", "KEYS"], &rows);
    println!(
        "{}",
        if report.uniform {
            "every live member uses the same primary key and holds the same keys"
        } else {
            "keyrings differ across members: a rotation is in progress (add everywhere, then switch the primary, then remove)"
        }
    );
    Ok(())
}

fn describe(keyring: &[String]) -> String {
    match keyring.split_first() {
        Some((primary, [])) => format!("primary {primary}"),
        Some((primary, rest)) => format!("primary {primary}, also accepts {}", rest.join(",")),
        None => "no keys".into(),
    }
}
