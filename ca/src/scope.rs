//! The node scope: which services a node may hold identities for, carried inside the node
//! SVID as a private, non-critical X.509 extension.
//!
//! Because the scope travels in a certificate signed by a CA host, any other CA host can
//! check a service request against it without a shared database. The content is the DER
//! encoding of a SEQUENCE of UTF8String `namespace/name` entries.

use x509_parser::der_parser::ber::BerObjectContent;
use x509_parser::der_parser::der::parse_der;

/// OID of the node-scope extension: a random 63-bit arc under `2.25` (the unregistered,
/// UUID-number arc). X.667 asks for a full 128-bit UUID there, but rcgen encodes arcs as
/// `u64`; a random 63-bit number keeps collisions as unlikely in practice.
pub const NODE_SCOPE_OID: &[u64] = &[2, 25, 5_691_516_302_659_138_824];

/// Dotted form of [`NODE_SCOPE_OID`], as x509-parser prints it.
pub fn node_scope_oid_string() -> String {
    NODE_SCOPE_OID
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

/// Services (`namespace/name`) a node may hold, sorted and without duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeScope {
    services: Vec<String>,
}

impl NodeScope {
    /// A scope from `namespace/name` entries.
    pub fn new(services: impl IntoIterator<Item = String>) -> NodeScope {
        let mut services: Vec<String> = services.into_iter().collect();
        services.sort();
        services.dedup();
        NodeScope { services }
    }

    /// The entries.
    pub fn services(&self) -> &[String] {
        &self.services
    }

    /// Whether the node may hold `namespace/name`.
    pub fn allows(&self, namespace: &str, name: &str) -> bool {
        self.services
            .iter()
            .any(|s| s.split_once('/') == Some((namespace, name)))
    }

    /// DER content of the extension.
    pub fn to_der(&self) -> Vec<u8> {
        let mut body = Vec::new();
        for service in &self.services {
            body.push(0x0c); // UTF8String
            push_len(&mut body, service.len());
            body.extend_from_slice(service.as_bytes());
        }
        let mut out = vec![0x30]; // SEQUENCE
        push_len(&mut out, body.len());
        out.extend_from_slice(&body);
        out
    }

    /// Parses the extension content; `None` if it is not a SEQUENCE of UTF8Strings.
    pub fn from_der(der: &[u8]) -> Option<NodeScope> {
        let (rest, object) = parse_der(der).ok()?;
        if !rest.is_empty() {
            return None;
        }
        let BerObjectContent::Sequence(items) = object.content else {
            return None;
        };
        let services = items
            .into_iter()
            .map(|item| match item.content {
                BerObjectContent::UTF8String(s) => Some(s.to_string()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?;
        Some(NodeScope::new(services))
    }
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_round_trips_through_der() {
        let scope = NodeScope::new([
            "shop/web".to_string(),
            "default/api".into(),
            "default/api".into(),
        ]);
        assert_eq!(scope.services(), ["default/api", "shop/web"]);
        assert_eq!(NodeScope::from_der(&scope.to_der()), Some(scope.clone()));
        assert!(scope.allows("shop", "web"));
        assert!(!scope.allows("shop", "api"));
        assert!(!scope.allows("default", "api/x"));
    }

    #[test]
    fn long_scopes_use_long_form_lengths() {
        let scope = NodeScope::new((0..40).map(|i| format!("default/service-number-{i:03}")));
        assert!(scope.to_der().len() > 256);
        assert_eq!(NodeScope::from_der(&scope.to_der()), Some(scope));
    }

    #[test]
    fn malformed_content_is_refused() {
        assert_eq!(NodeScope::from_der(&[]), None);
        assert_eq!(NodeScope::from_der(&[0x30, 0x03, 0x02, 0x01, 0x05]), None); // INTEGER inside
        assert_eq!(NodeScope::from_der(&[0x0c, 0x01, b'a']), None); // not a SEQUENCE
        let mut trailing = NodeScope::new(["a/b".to_string()]).to_der();
        trailing.push(0);
        assert_eq!(NodeScope::from_der(&trailing), None);
    }
}
