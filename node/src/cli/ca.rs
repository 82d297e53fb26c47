//! `weft ca init` and `weft ca intermediate`: the offline PKI steps an operator runs on a
//! trusted machine, never on a mesh host.

use std::path::Path;

use weft_ca::TrustDomain;
use weft_ca::pki::{
    self, BUNDLE_JSON, CA_CERT, CA_KEY, OPERATOR_CERT, OPERATOR_KEY, ROOT_CERT, ROOT_KEY,
};

pub(super) fn init(trust_domain: &str, operator: &str, out: &Path) -> anyhow::Result<()> {
    let trust_domain = TrustDomain::new(trust_domain)?;
    let made = pki::init(&trust_domain, operator, out)?;
    let o = out.display();
    println!("created the root of trust domain {trust_domain} in {o}:");
    println!(
        "  {o}/{ROOT_CERT}     trust bundle: copy to every host as /etc/weft/trust-bundle.pem"
    );
    println!("  {o}/{BUNDLE_JSON}  the same bundle as SPIFFE bundle JSON");
    println!("  {o}/{ROOT_KEY}     root key (0600): keep it offline; it signs only intermediates");
    println!(
        "  {o}/{OPERATOR_CERT} {o}/{OPERATOR_KEY}  operator credential {}",
        made.operator
    );
    println!("next: `weft ca intermediate --root {o} --name CA-HOST --out DIR` for each CA host,");
    println!(
        "      `weft token create --operator {o} --node NAME --service NS/NAME --ttl 1h` for each host."
    );
    println!(
        "For production, close the mesh by default: publish a Mesh document with `default: deny`"
    );
    println!(
        "      (`weft policy apply --operator {o} -f mesh.yaml`, see docs/policies.md), then allow what should talk."
    );
    Ok(())
}

pub(super) fn intermediate(root: &Path, name: &str, out: &Path) -> anyhow::Result<()> {
    let bundle = pki::load_root(root)?;
    let trust_domain = bundle.trust_domain().clone();
    pki::intermediate(&trust_domain, root, name, out)?;
    let o = out.display();
    println!("created the intermediate of CA host {name} ({trust_domain}) in {o}:");
    println!("  {o}/{CA_CERT}  intermediate certificate, signed by the root");
    println!("  {o}/{CA_KEY}  its key (0600)");
    println!(
        "install both on {name} as [ca] cert and key (e.g. /etc/weft/ca/intermediate.pem and .key) and set [ca] enabled = true."
    );
    Ok(())
}
