//! SPIFFE trust domains and SPIFFE IDs, parsed and validated exactly as the
//! SPIFFE ID standard (`spiffe/spiffe` `standards/SPIFFE-ID.md` §2) requires,
//! plus Weft's naming scheme for the identities it issues.
//!
//! This module owns the only parser of SPIFFE ID strings in Weft: everything
//! downstream (config, CSR checks, peer verification, policy) holds a
//! [`SpiffeId`] or [`TrustDomain`] and never re-parses strings. Parsing is
//! strict like go-spiffe's: the scheme and trust domain must already be
//! lowercase, and nothing is normalised, so two IDs are equal exactly when
//! their strings are equal byte for byte. This module must never accept an ID
//! that go-spiffe would reject, and never percent-decode anything.
//!
//! Weft's identities:
//! - services: `spiffe://TD/ns/NAMESPACE/sa/NAME` (so SMI ServiceAccount sources map exactly),
//! - nodes: `spiffe://TD/node/NAME`,
//! - operators: `spiffe://TD/operator/NAME`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The scheme and authority delimiter every SPIFFE ID starts with.
const SCHEME_PREFIX: &str = "spiffe://";

/// Longest SPIFFE ID, in bytes, that Weft accepts or generates (SPIFFE-ID §2.3).
pub const MAX_ID_LEN: usize = 2048;

/// Longest trust domain name, in bytes (SPIFFE-ID §2.3: the RFC 3986 host limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Path segment naming the namespace part of a service ID (`/ns/NAMESPACE/sa/NAME`).
const NAMESPACE_SEGMENT: &str = "ns";
/// Path segment naming the service-account part of a service ID.
const SERVICE_ACCOUNT_SEGMENT: &str = "sa";
/// First path segment of a node ID (`/node/NAME`).
const NODE_SEGMENT: &str = "node";
/// First path segment of an operator ID (`/operator/NAME`).
const OPERATOR_SEGMENT: &str = "operator";

/// Why a string is not a valid trust domain, SPIFFE ID or path segment.
///
/// The messages start with go-spiffe's wording, so they read the same as the
/// errors operators may already know from SPIRE and go-spiffe. Positions are
/// byte offsets into the string that was being validated (the whole ID for
/// [`SpiffeId::parse`], the name for [`TrustDomain::new`], the segment for the
/// segment-based constructors).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The input string is empty.
    #[error("cannot be empty")]
    Empty,
    /// The input does not start with the exact, lowercase `spiffe://`.
    #[error("scheme is missing or invalid")]
    WrongScheme,
    /// The authority (trust domain) part is empty.
    #[error("trust domain is missing")]
    MissingTrustDomain,
    /// The trust domain holds a byte outside `[a-z0-9._-]`.
    #[error(
        "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores (found {character:?} at byte {position})"
    )]
    BadTrustDomainChar {
        /// The offending character.
        character: char,
        /// Its byte offset in the validated string.
        position: usize,
    },
    /// The trust domain is longer than [`MAX_TRUST_DOMAIN_LEN`] bytes.
    #[error("trust domain cannot be longer than 255 bytes (got {len})")]
    TrustDomainTooLong {
        /// The trust domain's length in bytes.
        len: usize,
    },
    /// A path segment holds a byte outside `[a-zA-Z0-9._-]`.
    #[error(
        "path segment characters are limited to letters, numbers, dots, dashes, and underscores (found {character:?} at byte {position})"
    )]
    BadPathSegmentChar {
        /// The offending character.
        character: char,
        /// Its byte offset in the validated string.
        position: usize,
    },
    /// The path has an empty segment (`//`), or a segment given alone is empty.
    #[error("path cannot contain empty segments")]
    EmptySegment,
    /// The path has a `.` or `..` segment.
    #[error("path cannot contain dot segments")]
    DotSegment,
    /// The path ends with `/`.
    #[error("path cannot have a trailing slash")]
    TrailingSlash,
    /// A non-empty path given alone does not start with `/`.
    #[error("path must have a leading slash")]
    NoLeadingSlash,
    /// The whole ID is longer than [`MAX_ID_LEN`] bytes.
    #[error("ID cannot be longer than 2048 bytes (got {len})")]
    IdTooLong {
        /// The ID's length in bytes.
        len: usize,
    },
}

/// A validated SPIFFE trust domain name, such as `prod.example.com`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain {
    name: String,
}

impl TrustDomain {
    /// Validates a trust domain name, or takes the trust domain of a SPIFFE ID string.
    ///
    /// Like go-spiffe's `TrustDomainFromString`, input containing `:/` is parsed
    /// as a whole SPIFFE ID (so `spiffe://td/path` yields `td` and `spiffe:/td`
    /// is a scheme error); anything else must be a bare name.
    pub fn new(id_or_name: &str) -> Result<Self, SpiffeIdError> {
        if id_or_name.contains(":/") {
            return SpiffeId::parse(id_or_name).map(|id| id.trust_domain);
        }
        validate_trust_domain_name(id_or_name, 0)?;
        Ok(Self {
            name: id_or_name.to_owned(),
        })
    }

    /// The trust domain name, e.g. `prod.example.com`.
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The trust domain's own SPIFFE ID as a string, e.g. `spiffe://prod.example.com`.
    pub fn id_string(&self) -> String {
        format!("{SCHEME_PREFIX}{}", self.name)
    }

    /// The trust domain's own SPIFFE ID (no path), as carried by CA certificates.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            trust_domain: self.clone(),
            path: String::new(),
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = SpiffeIdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl TryFrom<&str> for TrustDomain {
    type Error = SpiffeIdError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<TrustDomain> for String {
    fn from(td: TrustDomain) -> Self {
        td.name
    }
}

impl AsRef<str> for TrustDomain {
    fn as_ref(&self) -> &str {
        &self.name
    }
}

/// A validated SPIFFE ID: `spiffe://TRUST_DOMAIN[/PATH]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// Empty, or `/segment(/segment)*` with every segment valid.
    path: String,
}

/// What a SPIFFE ID names in Weft's scheme, judged by its path alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeftIdentity<'a> {
    /// A service account: `/ns/NAMESPACE/sa/NAME`.
    Service {
        /// The service's namespace.
        namespace: &'a str,
        /// The service (account) name.
        name: &'a str,
    },
    /// A node (host agent): `/node/NAME`.
    Node {
        /// The node name.
        name: &'a str,
    },
    /// A human or automation operator: `/operator/NAME`.
    Operator {
        /// The operator name.
        name: &'a str,
    },
    /// Any other path, including the trust domain's own ID with no path.
    Other,
}

impl SpiffeId {
    /// Parses a SPIFFE ID string exactly per SPIFFE-ID §2.
    pub fn parse(id: &str) -> Result<Self, SpiffeIdError> {
        if id.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        let rest = id
            .strip_prefix(SCHEME_PREFIX)
            .ok_or(SpiffeIdError::WrongScheme)?;
        // Checked before scanning so oversized input costs no more than its length.
        if id.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::IdTooLong { len: id.len() });
        }
        let td_end = rest.find('/').unwrap_or(rest.len());
        let (td, path) = rest.split_at(td_end);
        validate_trust_domain_name(td, SCHEME_PREFIX.len())?;
        validate_path(path, SCHEME_PREFIX.len() + td_end)?;
        Ok(Self {
            trust_domain: TrustDomain {
                name: td.to_owned(),
            },
            path: path.to_owned(),
        })
    }

    /// Builds an ID from a trust domain and a path that is empty or starts with `/`.
    pub fn from_path(trust_domain: &TrustDomain, path: &str) -> Result<Self, SpiffeIdError> {
        validate_path(path, 0)?;
        Self::assemble(trust_domain, path.to_owned())
    }

    /// Builds an ID from a trust domain and path segments, each without any `/`.
    pub fn from_segments(
        trust_domain: &TrustDomain,
        segments: &[&str],
    ) -> Result<Self, SpiffeIdError> {
        let mut path = String::with_capacity(segments.iter().map(|s| s.len() + 1).sum());
        for segment in segments {
            validate_path_segment(segment)?;
            path.push('/');
            path.push_str(segment);
        }
        Self::assemble(trust_domain, path)
    }

    /// A service's ID: `spiffe://TD/ns/NAMESPACE/sa/NAME`.
    pub fn service(
        trust_domain: &TrustDomain,
        namespace: &str,
        name: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::from_segments(
            trust_domain,
            &[NAMESPACE_SEGMENT, namespace, SERVICE_ACCOUNT_SEGMENT, name],
        )
    }

    /// A node's ID: `spiffe://TD/node/NAME`.
    pub fn node(trust_domain: &TrustDomain, name: &str) -> Result<Self, SpiffeIdError> {
        Self::from_segments(trust_domain, &[NODE_SEGMENT, name])
    }

    /// An operator's ID: `spiffe://TD/operator/NAME`.
    pub fn operator(trust_domain: &TrustDomain, name: &str) -> Result<Self, SpiffeIdError> {
        Self::from_segments(trust_domain, &[OPERATOR_SEGMENT, name])
    }

    /// The trust domain the ID belongs to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path: empty, or starting with `/` (e.g. `/ns/default/sa/web`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether the ID belongs to `trust_domain` (exact byte comparison).
    pub fn is_member_of(&self, trust_domain: &TrustDomain) -> bool {
        &self.trust_domain == trust_domain
    }

    /// Classifies the ID by its path; the trust domain is not looked at, so
    /// callers must check membership separately.
    pub fn kind(&self) -> WeftIdentity<'_> {
        let Some(path) = self.path.strip_prefix('/') else {
            return WeftIdentity::Other;
        };
        // `Split` is fused, so reading past the end keeps yielding `None`.
        let mut segments = path.split('/');
        match (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) {
            (
                Some(NAMESPACE_SEGMENT),
                Some(namespace),
                Some(SERVICE_ACCOUNT_SEGMENT),
                Some(name),
                None,
            ) => WeftIdentity::Service { namespace, name },
            (Some(NODE_SEGMENT), Some(name), None, None, None) => WeftIdentity::Node { name },
            (Some(OPERATOR_SEGMENT), Some(name), None, None, None) => {
                WeftIdentity::Operator { name }
            }
            _ => WeftIdentity::Other,
        }
    }

    /// Joins an already validated path to a trust domain, enforcing the ID length limit.
    fn assemble(trust_domain: &TrustDomain, path: String) -> Result<Self, SpiffeIdError> {
        let len = SCHEME_PREFIX.len() + trust_domain.name.len() + path.len();
        if len > MAX_ID_LEN {
            return Err(SpiffeIdError::IdTooLong { len });
        }
        Ok(Self {
            trust_domain: trust_domain.clone(),
            path,
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME_PREFIX}{}{}", self.trust_domain.name, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = SpiffeIdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl TryFrom<&str> for SpiffeId {
    type Error = SpiffeIdError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> Self {
        id.to_string()
    }
}

/// Whether `b` may appear in a trust domain name: `[a-z0-9._-]`.
fn is_trust_domain_byte(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

/// Whether `b` may appear in a path segment: `[a-zA-Z0-9._-]`.
fn is_path_segment_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')
}

/// The character starting at byte `pos` of `s`, for error messages.
///
/// Validation scans bytes and stops at the first disallowed one; every byte
/// before it is ASCII, so `pos` is always a character boundary.
fn char_at(s: &str, pos: usize) -> char {
    s.get(pos..)
        .and_then(|rest| rest.chars().next())
        .unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// Validates a bare trust domain name; `offset` is where `name` starts in the caller's input.
fn validate_trust_domain_name(name: &str, offset: usize) -> Result<(), SpiffeIdError> {
    if name.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong { len: name.len() });
    }
    match name.bytes().position(|b| !is_trust_domain_byte(b)) {
        Some(i) => Err(SpiffeIdError::BadTrustDomainChar {
            character: char_at(name, i),
            position: offset + i,
        }),
        None => Ok(()),
    }
}

/// Validates an ID path (empty, or `/`-separated valid segments); `offset` is
/// where `path` starts in the caller's input. The first problem from the left wins.
fn validate_path(path: &str, offset: usize) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    if !path.starts_with('/') {
        return Err(SpiffeIdError::NoLeadingSlash);
    }
    let bytes = path.as_bytes();
    // Index of the '/' that opens the current segment.
    let mut segment_start = 0;
    for (i, &b) in bytes.iter().enumerate().skip(1) {
        if b == b'/' {
            check_segment_shape(&path[segment_start + 1..i], false)?;
            segment_start = i;
        } else if !is_path_segment_byte(b) {
            return Err(SpiffeIdError::BadPathSegmentChar {
                character: char_at(path, i),
                position: offset + i,
            });
        }
    }
    check_segment_shape(&path[segment_start + 1..], true)
}

/// Rejects an empty or dot segment; an empty last segment means a trailing slash.
fn check_segment_shape(segment: &str, is_last: bool) -> Result<(), SpiffeIdError> {
    match segment {
        "" if is_last => Err(SpiffeIdError::TrailingSlash),
        "" => Err(SpiffeIdError::EmptySegment),
        "." | ".." => Err(SpiffeIdError::DotSegment),
        _ => Ok(()),
    }
}

/// Validates one path segment given on its own (no `/` allowed in it).
fn validate_path_segment(segment: &str) -> Result<(), SpiffeIdError> {
    if segment.is_empty() {
        return Err(SpiffeIdError::EmptySegment);
    }
    if let Some(i) = segment.bytes().position(|b| !is_path_segment_byte(b)) {
        return Err(SpiffeIdError::BadPathSegmentChar {
            character: char_at(segment, i),
            position: i,
        });
    }
    check_segment_shape(segment, false)
}

#[cfg(test)]
mod tests {
    //! Vectors transcribed from go-spiffe (Apache-2.0), package `spiffeid`:
    //! `spiffe/go-spiffe` `spiffeid/id_test.go` (commit 0de9f65384aec54444e26028d86eba9f4928fef6),
    //! `spiffeid/trustdomain_test.go` (commit 2fe980674ecc4ff5d9b07c3ecf511b5bba8e7d32),
    //! `spiffeid/path_test.go` (commit ea1a845a92a59152208062c595f7364d6ddb416d),
    //! error texts from `spiffeid/errors.go`. Cases for userinfo, port, query,
    //! fragment and IP literals follow `maxlambrecht/rust-spiffe`
    //! `spiffe/src/spiffe_id/mod.rs` and SPIFFE-ID §2.1. Length and Weft-scheme
    //! cases are Weft's own.
    //!
    //! Where go-spiffe has a zero value (empty string round-trips as "no ID"),
    //! Weft has none: an empty string is an error and optional IDs use `Option`.

    use super::*;

    const BAD_TD_CHAR: &str = "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores";
    const BAD_PATH_CHAR: &str =
        "path segment characters are limited to letters, numbers, dots, dashes, and underscores";

    const LOWER: &str = "abcdefghijklmnopqrstuvwxyz";
    const UPPER: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    const DIGITS: &str = "0123456789";
    const SPECIAL: &str = ".-_";

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).expect("valid trust domain")
    }

    fn is_td_char(c: char) -> bool {
        LOWER.contains(c) || DIGITS.contains(c) || SPECIAL.contains(c)
    }

    fn is_path_char(c: char) -> bool {
        is_td_char(c) || UPPER.contains(c)
    }

    /// Every Unicode scalar U+0000..=U+00FF, like Go's `string(rune(i))` for
    /// i in 0..256: the upper half becomes two UTF-8 bytes, so non-ASCII input is covered.
    fn all_256() -> impl Iterator<Item = (u32, char)> {
        (0u32..256).map(|i| (i, char::from_u32(i).expect("scalar below 256")))
    }

    #[track_caller]
    fn assert_id(input: &str, expect_td: &TrustDomain, expect_path: &str) {
        let id = SpiffeId::parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
        assert_eq!(id.trust_domain(), expect_td, "trust domain of {input:?}");
        assert_eq!(id.path(), expect_path, "path of {input:?}");
        assert_eq!(
            id.to_string(),
            format!("{}{}", expect_td.id_string(), expect_path)
        );
        assert_eq!(id.to_string(), input);
        assert_eq!(input.parse::<SpiffeId>().as_ref(), Ok(&id));
    }

    #[track_caller]
    fn assert_id_fails(input: &str, expect: &str) {
        match SpiffeId::parse(input) {
            Ok(id) => panic!("{input:?} parsed as {id}, expected error containing {expect:?}"),
            Err(e) => assert!(
                e.to_string().contains(expect),
                "{input:?}: error {e:?} does not contain {expect:?}"
            ),
        }
    }

    #[track_caller]
    fn assert_td_fails(input: &str, expect: &str) {
        match TrustDomain::new(input) {
            Ok(td) => panic!("{input:?} accepted as {td}, expected error containing {expect:?}"),
            Err(e) => assert!(
                e.to_string().contains(expect),
                "{input:?}: error {e:?} does not contain {expect:?}"
            ),
        }
    }

    // ---- id_test.go: TestFromString ----

    #[test]
    fn empty_id_is_rejected() {
        assert_eq!(SpiffeId::parse(""), Err(SpiffeIdError::Empty));
        assert_id_fails("", "cannot be empty");
    }

    #[test]
    fn path_is_optional() {
        assert_id("spiffe://trustdomain", &td("trustdomain"), "");
    }

    #[test]
    fn every_byte_as_trust_domain_char_in_id() {
        for (i, c) in all_256() {
            if c == '/' {
                // The delimiter between trust domain and path.
                continue;
            }
            let input = format!("spiffe://trustdomain{c}/path");
            if is_td_char(c) {
                assert_id(&input, &td(&format!("trustdomain{c}")), "/path");
            } else {
                assert_id_fails(&input, BAD_TD_CHAR);
                assert_eq!(
                    SpiffeId::parse(&input),
                    Err(SpiffeIdError::BadTrustDomainChar {
                        character: c,
                        position: 20
                    }),
                    "byte {i:02X}"
                );
            }
        }
    }

    #[test]
    fn every_byte_as_path_char_in_id() {
        let trustdomain = td("trustdomain");
        for (i, c) in all_256() {
            if c == '/' {
                // The delimiter between path segments.
                continue;
            }
            let input = format!("spiffe://trustdomain/path{c}");
            if is_path_char(c) {
                assert_id(&input, &trustdomain, &format!("/path{c}"));
            } else {
                assert_id_fails(&input, BAD_PATH_CHAR);
                assert_eq!(
                    SpiffeId::parse(&input),
                    Err(SpiffeIdError::BadPathSegmentChar {
                        character: c,
                        position: 25
                    }),
                    "byte {i:02X}"
                );
            }
        }
    }

    #[test]
    fn bad_scheme_is_rejected() {
        assert_id_fails("s", "scheme is missing or invalid");
        assert_id_fails("spiffe:/", "scheme is missing or invalid");
        assert_id_fails("Spiffe://", "scheme is missing or invalid");
        // TestFromURI: `url.URL{Scheme: "SPIFFE", Host: "trustdomain"}`.
        assert_id_fails("SPIFFE://trustdomain", "scheme is missing or invalid");
        // rust-spiffe vectors.
        assert_id_fails("192.168.2.2:6688", "scheme is missing or invalid");
        assert_id_fails(
            "http://domain.test/path/element",
            "scheme is missing or invalid",
        );
        assert_id_fails("spiffe:/path/element", "scheme is missing or invalid");
        assert_id_fails("spiffe:path/element", "scheme is missing or invalid");
    }

    #[test]
    fn missing_trust_domain_is_rejected() {
        assert_id_fails("spiffe://", "trust domain is missing");
        assert_id_fails("spiffe:///", "trust domain is missing");
        assert_id_fails("spiffe:///path/element", "trust domain is missing");
    }

    #[test]
    fn empty_segments_are_rejected() {
        assert_id_fails("spiffe://trustdomain/", "path cannot have a trailing slash");
        assert_id_fails(
            "spiffe://trustdomain//",
            "path cannot contain empty segments",
        );
        assert_id_fails(
            "spiffe://trustdomain//path",
            "path cannot contain empty segments",
        );
        assert_id_fails(
            "spiffe://trustdomain/path/",
            "path cannot have a trailing slash",
        );
        assert_id_fails(
            "spiffe://test.org/path//other",
            "path cannot contain empty segments",
        );
    }

    #[test]
    fn dot_segments_are_rejected() {
        for input in [
            "spiffe://trustdomain/.",
            "spiffe://trustdomain/./path",
            "spiffe://trustdomain/path/./other",
            "spiffe://trustdomain/path/..",
            "spiffe://trustdomain/..",
            "spiffe://trustdomain/../path",
            "spiffe://trustdomain/path/../other",
        ] {
            assert_id_fails(input, "path cannot contain dot segments");
        }
    }

    #[test]
    fn segments_with_dots_that_are_not_dot_segments_are_accepted() {
        let trustdomain = td("trustdomain");
        assert_id("spiffe://trustdomain/.path", &trustdomain, "/.path");
        assert_id("spiffe://trustdomain/..path", &trustdomain, "/..path");
        assert_id("spiffe://trustdomain/...", &trustdomain, "/...");
    }

    #[test]
    fn percent_encoding_is_rejected() {
        // Percent-encoded unicode.
        assert_id_fails("spiffe://%F0%9F%A4%AF/path", BAD_TD_CHAR);
        assert_id_fails("spiffe://trustdomain/%F0%9F%A4%AF", BAD_PATH_CHAR);
        // Percent-encoded ASCII.
        assert_id_fails("spiffe://%62%61%64/path", BAD_TD_CHAR);
        assert_id_fails("spiffe://trustdomain/%62%61%64", BAD_PATH_CHAR);
    }

    // ---- id_test.go: TestFromURI (as strings; Weft has no URL type) ----

    #[test]
    fn uri_forms_parse_like_strings() {
        assert_id("spiffe://trustdomain", &td("trustdomain"), "");
        assert_id("spiffe://trustdomain/path", &td("trustdomain"), "/path");
        assert_id_fails("spiffe://trust$domain", BAD_TD_CHAR);
        assert_id_fails("spiffe://trustdomain/path$", BAD_PATH_CHAR);
    }

    // ---- SPIFFE-ID §2.1/§2.2 URI components (rust-spiffe vectors) ----

    #[test]
    fn userinfo_port_query_fragment_and_ipv6_are_rejected() {
        assert_id_fails("spiffe://user:password@test.org/path/element", BAD_TD_CHAR);
        assert_id_fails("spiffe://domain.test:8080/path/element", BAD_TD_CHAR);
        assert_id_fails("spiffe://domain.test:/path/element", BAD_TD_CHAR);
        assert_id_fails("spiffe://domain.test/path/element?query=1", BAD_PATH_CHAR);
        assert_id_fails(
            "spiffe://domain.test/path/element#fragment-1",
            BAD_PATH_CHAR,
        );
        assert_id_fails("spiffe://domain.test?query=1", BAD_TD_CHAR);
        assert_id_fails("spiffe://[::1]/path", BAD_TD_CHAR);
    }

    #[test]
    fn ipv4_trust_domain_is_accepted() {
        assert_id("spiffe://192.168.2.2/path", &td("192.168.2.2"), "/path");
    }

    #[test]
    fn bad_character_error_names_character_and_position() {
        let err = SpiffeId::parse("spiffe://domain.test:8080/x").unwrap_err();
        assert_eq!(
            err,
            SpiffeIdError::BadTrustDomainChar {
                character: ':',
                position: 20
            }
        );
        assert_eq!(
            err.to_string(),
            format!("{BAD_TD_CHAR} (found ':' at byte 20)")
        );
        let err = SpiffeId::parse("spiffe://td/ok/b\u{e9}d").unwrap_err();
        assert_eq!(
            err,
            SpiffeIdError::BadPathSegmentChar {
                character: '\u{e9}',
                position: 16
            }
        );
        assert_eq!(
            err.to_string(),
            format!("{BAD_PATH_CHAR} (found '\u{e9}' at byte 16)")
        );
    }

    // ---- id_test.go: TestFromSegments, path_test.go: TestJoinPathSegments / TestValidatePathSegment ----

    #[test]
    fn from_segments_joins_valid_segments() {
        let trustdomain = td("trustdomain");
        for (segments, expect_path) in [
            (&[][..], ""),
            (&["foo"][..], "/foo"),
            (&["foo", "bar"][..], "/foo/bar"),
            (&["a"][..], "/a"),
            (&["a", "b"][..], "/a/b"),
        ] {
            let id = SpiffeId::from_segments(&trustdomain, segments).expect("valid segments");
            assert_eq!(id.trust_domain(), &trustdomain);
            assert_eq!(id.path(), expect_path);
            assert_eq!(id.to_string(), format!("spiffe://trustdomain{expect_path}"));
        }
    }

    #[test]
    fn from_segments_rejects_invalid_segments() {
        let trustdomain = td("trustdomain");
        for (segment, expect) in [
            ("", SpiffeIdError::EmptySegment),
            (".", SpiffeIdError::DotSegment),
            ("..", SpiffeIdError::DotSegment),
            (
                "/",
                SpiffeIdError::BadPathSegmentChar {
                    character: '/',
                    position: 0,
                },
            ),
            (
                "/foo",
                SpiffeIdError::BadPathSegmentChar {
                    character: '/',
                    position: 0,
                },
            ),
            (
                "$",
                SpiffeIdError::BadPathSegmentChar {
                    character: '$',
                    position: 0,
                },
            ),
        ] {
            assert_eq!(
                SpiffeId::from_segments(&trustdomain, &[segment]),
                Err(expect),
                "segment {segment:?}"
            );
        }
    }

    #[test]
    fn every_byte_as_lone_segment() {
        let trustdomain = td("trustdomain");
        for (i, c) in all_256() {
            let segment = format!("seg{c}");
            let result = SpiffeId::from_segments(&trustdomain, &[segment.as_str()]);
            if is_path_char(c) {
                assert_eq!(
                    result.map(|id| id.path().to_owned()),
                    Ok(format!("/{segment}"))
                );
            } else {
                assert_eq!(
                    result,
                    Err(SpiffeIdError::BadPathSegmentChar {
                        character: c,
                        position: 3
                    }),
                    "byte {i:02X}"
                );
            }
        }
    }

    // ---- id_test.go: TestFromPathf ----

    #[test]
    fn from_path_validates_the_whole_path() {
        let trustdomain = td("trustdomain");
        let id = SpiffeId::from_path(&trustdomain, "/foo").expect("valid path");
        assert_eq!((id.trust_domain(), id.path()), (&trustdomain, "/foo"));
        let id = SpiffeId::from_path(&trustdomain, "").expect("empty path");
        assert_eq!((id.trust_domain(), id.path()), (&trustdomain, ""));
        assert_eq!(
            SpiffeId::from_path(&trustdomain, "foo"),
            Err(SpiffeIdError::NoLeadingSlash)
        );
        assert_eq!(
            SpiffeId::from_path(&trustdomain, "foo")
                .unwrap_err()
                .to_string(),
            "path must have a leading slash"
        );
        assert_eq!(
            SpiffeId::from_path(&trustdomain, "/"),
            Err(SpiffeIdError::TrailingSlash)
        );
        assert_eq!(
            SpiffeId::from_path(&trustdomain, "/a//b"),
            Err(SpiffeIdError::EmptySegment)
        );
        assert_eq!(
            SpiffeId::from_path(&trustdomain, "/a/.."),
            Err(SpiffeIdError::DotSegment)
        );
        assert_eq!(
            SpiffeId::from_path(&trustdomain, "/a$"),
            Err(SpiffeIdError::BadPathSegmentChar {
                character: '$',
                position: 2
            })
        );
    }

    // ---- id_test.go: TestIDMemberOf, TestIDString ----

    #[test]
    fn membership_is_exact_trust_domain_equality() {
        let trustdomain = td("trustdomain");
        let id = SpiffeId::from_segments(&trustdomain, &["path", "element"]).unwrap();
        assert!(id.is_member_of(&trustdomain));
        let id = SpiffeId::from_segments(&trustdomain, &[]).unwrap();
        assert!(id.is_member_of(&trustdomain));
        let other = td("domain2.test");
        let id = SpiffeId::from_segments(&other, &["path", "element"]).unwrap();
        assert!(!id.is_member_of(&trustdomain));
    }

    #[test]
    fn id_displays_as_its_string() {
        for s in ["spiffe://trustdomain", "spiffe://trustdomain/path"] {
            assert_eq!(SpiffeId::parse(s).unwrap().to_string(), s);
        }
    }

    // ---- id_test.go: TestIDTextMarshaler / TestIDTextUnmarshaler (serde) ----

    #[test]
    fn id_serializes_as_string_and_validates_on_deserialize() {
        let id = SpiffeId::parse("spiffe://trustdomain/path").unwrap();
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            r#""spiffe://trustdomain/path""#
        );
        let back: SpiffeId = serde_json::from_str(r#""spiffe://trustdomain/path""#).unwrap();
        assert_eq!(back, id);
        let err = serde_json::from_str::<SpiffeId>(r#""BAD""#).unwrap_err();
        assert!(
            err.to_string().contains("scheme is missing or invalid"),
            "{err}"
        );
        let err = serde_json::from_str::<SpiffeId>(r#""""#).unwrap_err();
        assert!(err.to_string().contains("cannot be empty"), "{err}");
    }

    // ---- trustdomain_test.go: TestTrustDomainFromString ----

    #[test]
    fn empty_trust_domain_is_rejected() {
        assert_eq!(TrustDomain::new(""), Err(SpiffeIdError::MissingTrustDomain));
        assert_td_fails("", "trust domain is missing");
    }

    #[test]
    fn trust_domain_is_taken_from_an_id_with_or_without_path() {
        assert_eq!(
            TrustDomain::new("spiffe://trustdomain"),
            Ok(td("trustdomain"))
        );
        assert_eq!(
            TrustDomain::new("spiffe://trustdomain/path"),
            Ok(td("trustdomain"))
        );
    }

    #[test]
    fn trust_domain_from_a_bad_id_is_rejected() {
        assert_td_fails("spiffe:/trustdomain/path", "scheme is missing or invalid");
        assert_td_fails("spiffe://", "trust domain is missing");
        assert_td_fails("spiffe:///path", "trust domain is missing");
        assert_td_fails("spiffe://trustdomain/", "path cannot have a trailing slash");
        assert_td_fails(
            "spiffe://trustdomain/path/",
            "path cannot have a trailing slash",
        );
        assert_td_fails("spiffe://%F0%9F%A4%AF/path", BAD_TD_CHAR);
        assert_td_fails("spiffe://trustdomain/%F0%9F%A4%AF", BAD_PATH_CHAR);
    }

    #[test]
    fn every_byte_as_trust_domain_char() {
        for (i, c) in all_256() {
            let name = format!("trustdomain{c}");
            if is_td_char(c) {
                let expected = TrustDomain::new(&name).unwrap_or_else(|e| panic!("{name:?}: {e}"));
                assert_eq!(expected.as_str(), name);
                assert_eq!(TrustDomain::new(&format!("spiffe://{name}")), Ok(expected));
            } else {
                assert_td_fails(&name, BAD_TD_CHAR);
                assert_eq!(
                    TrustDomain::new(&name),
                    Err(SpiffeIdError::BadTrustDomainChar {
                        character: c,
                        position: 11
                    }),
                    "byte {i:02X}"
                );
            }
        }
    }

    // ---- trustdomain_test.go: TestTrustDomainFromURI ----

    #[test]
    fn trust_domain_from_uri_forms() {
        assert_eq!(
            TrustDomain::new("spiffe://trustdomain"),
            Ok(td("trustdomain"))
        );
        assert_eq!(
            TrustDomain::new("spiffe://trustdomain/path"),
            Ok(td("trustdomain"))
        );
        assert_td_fails("SPIFFE://trustdomain", "scheme is missing or invalid");
        assert_td_fails("spiffe://trust$domain", BAD_TD_CHAR);
        assert_td_fails("spiffe://trustdomain/path$", BAD_PATH_CHAR);
    }

    // ---- trustdomain_test.go: TestTrustDomainID / TestTrustDomainIDString ----

    #[test]
    fn trust_domain_id_has_no_path() {
        let expected = SpiffeId::parse("spiffe://trustdomain").unwrap();
        for s in [
            "trustdomain",
            "spiffe://trustdomain",
            "spiffe://trustdomain/path",
        ] {
            let trustdomain = td(s);
            assert_eq!(trustdomain.id(), expected);
            assert_eq!(trustdomain.id_string(), "spiffe://trustdomain");
            assert_eq!(trustdomain.to_string(), "trustdomain");
        }
    }

    // ---- trustdomain_test.go: TestTrustDomainCompare ----

    #[test]
    fn trust_domains_order_lexicographically() {
        let (a, b) = (td("a"), td("b"));
        assert_eq!(a.cmp(&b), std::cmp::Ordering::Less);
        assert_eq!(a.cmp(&a.clone()), std::cmp::Ordering::Equal);
        assert_eq!(b.cmp(&a), std::cmp::Ordering::Greater);
    }

    // ---- trustdomain_test.go: TestTrustDomainTextMarshaler / TextUnmarshaler (serde) ----

    #[test]
    fn trust_domain_serializes_as_string_and_validates_on_deserialize() {
        assert_eq!(
            serde_json::to_string(&td("trustdomain")).unwrap(),
            r#""trustdomain""#
        );
        let back: TrustDomain = serde_json::from_str(r#""trustdomain""#).unwrap();
        assert_eq!(back.to_string(), "trustdomain");
        let err = serde_json::from_str::<TrustDomain>(r#""BAD""#).unwrap_err();
        assert!(err.to_string().contains(BAD_TD_CHAR), "{err}");
        let err = serde_json::from_str::<TrustDomain>(r#""""#).unwrap_err();
        assert!(err.to_string().contains("trust domain is missing"), "{err}");
    }

    // ---- Length limits (SPIFFE-ID §2.3) ----

    #[test]
    fn trust_domain_is_limited_to_255_bytes() {
        let max = "a".repeat(MAX_TRUST_DOMAIN_LEN);
        assert_eq!(td(&max).as_str(), max);
        let long = "a".repeat(MAX_TRUST_DOMAIN_LEN + 1);
        assert_eq!(
            TrustDomain::new(&long),
            Err(SpiffeIdError::TrustDomainTooLong { len: 256 })
        );
        assert_eq!(
            SpiffeId::parse(&format!("spiffe://{long}/path")),
            Err(SpiffeIdError::TrustDomainTooLong { len: 256 })
        );
    }

    #[test]
    fn id_is_limited_to_2048_bytes() {
        let trustdomain = td("trustdomain");
        // "spiffe://trustdomain/" is 21 bytes.
        let max = format!("spiffe://trustdomain/{}", "p".repeat(MAX_ID_LEN - 21));
        assert_eq!(max.len(), MAX_ID_LEN);
        assert_eq!(SpiffeId::parse(&max).unwrap().to_string(), max);
        let long = format!("{max}p");
        assert_eq!(
            SpiffeId::parse(&long),
            Err(SpiffeIdError::IdTooLong { len: 2049 })
        );
        assert_eq!(
            SpiffeId::parse(&long).unwrap_err().to_string(),
            "ID cannot be longer than 2048 bytes (got 2049)"
        );
        let segment = "p".repeat(MAX_ID_LEN - 20);
        assert_eq!(
            SpiffeId::from_segments(&trustdomain, &[segment.as_str()]),
            Err(SpiffeIdError::IdTooLong { len: 2049 })
        );
        assert_eq!(
            SpiffeId::from_path(&trustdomain, &format!("/{segment}")),
            Err(SpiffeIdError::IdTooLong { len: 2049 })
        );
        assert_eq!(
            SpiffeId::node(&trustdomain, &"n".repeat(3000)),
            Err(SpiffeIdError::IdTooLong { len: 3026 })
        );
    }

    // ---- Weft's identities ----

    #[test]
    fn service_id_is_ns_namespace_sa_name() {
        let prod = td("prod.example.com");
        let id = SpiffeId::service(&prod, "default", "web").unwrap();
        assert_eq!(
            id.to_string(),
            "spiffe://prod.example.com/ns/default/sa/web"
        );
        assert_eq!(
            id.kind(),
            WeftIdentity::Service {
                namespace: "default",
                name: "web"
            }
        );
        assert_eq!(SpiffeId::parse(&id.to_string()), Ok(id));
    }

    #[test]
    fn node_id_is_node_name() {
        let prod = td("prod.example.com");
        let id = SpiffeId::node(&prod, "host-01.dc1").unwrap();
        assert_eq!(id.to_string(), "spiffe://prod.example.com/node/host-01.dc1");
        assert_eq!(
            id.kind(),
            WeftIdentity::Node {
                name: "host-01.dc1"
            }
        );
        assert_eq!(SpiffeId::parse(&id.to_string()), Ok(id));
    }

    #[test]
    fn operator_id_is_operator_name() {
        let prod = td("prod.example.com");
        let id = SpiffeId::operator(&prod, "alice").unwrap();
        assert_eq!(id.to_string(), "spiffe://prod.example.com/operator/alice");
        assert_eq!(id.kind(), WeftIdentity::Operator { name: "alice" });
        assert_eq!(SpiffeId::parse(&id.to_string()), Ok(id));
    }

    #[test]
    fn constructors_refuse_names_that_are_not_path_segments() {
        let prod = td("prod.example.com");
        assert_eq!(
            SpiffeId::service(&prod, "", "web"),
            Err(SpiffeIdError::EmptySegment)
        );
        assert_eq!(
            SpiffeId::service(&prod, "default", ".."),
            Err(SpiffeIdError::DotSegment)
        );
        // A slash must not smuggle in extra segments (e.g. to forge `/ns/x/sa/y`).
        assert_eq!(
            SpiffeId::service(&prod, "default", "web/../admin"),
            Err(SpiffeIdError::BadPathSegmentChar {
                character: '/',
                position: 3
            })
        );
        assert_eq!(
            SpiffeId::node(&prod, "ns/x/sa/y"),
            Err(SpiffeIdError::BadPathSegmentChar {
                character: '/',
                position: 2
            })
        );
        assert_eq!(
            SpiffeId::operator(&prod, "."),
            Err(SpiffeIdError::DotSegment)
        );
        assert_eq!(
            SpiffeId::operator(&prod, "bob smith"),
            Err(SpiffeIdError::BadPathSegmentChar {
                character: ' ',
                position: 3
            })
        );
        // Path segments are case-sensitive and may hold uppercase letters.
        assert_eq!(
            SpiffeId::service(&prod, "Payments", "API_v2")
                .unwrap()
                .path(),
            "/ns/Payments/sa/API_v2"
        );
    }

    #[test]
    fn kind_classifies_parsed_ids_by_exact_shape() {
        for (input, expected) in [
            (
                "spiffe://td/ns/default/sa/web",
                WeftIdentity::Service {
                    namespace: "default",
                    name: "web",
                },
            ),
            ("spiffe://td/node/n1", WeftIdentity::Node { name: "n1" }),
            (
                "spiffe://td/operator/ops",
                WeftIdentity::Operator { name: "ops" },
            ),
            // Segments named like the keywords are still just names.
            (
                "spiffe://td/ns/sa/sa/ns",
                WeftIdentity::Service {
                    namespace: "sa",
                    name: "ns",
                },
            ),
            ("spiffe://td/node/node", WeftIdentity::Node { name: "node" }),
            ("spiffe://td", WeftIdentity::Other),
            ("spiffe://td/ns", WeftIdentity::Other),
            ("spiffe://td/ns/default", WeftIdentity::Other),
            ("spiffe://td/ns/default/sa", WeftIdentity::Other),
            ("spiffe://td/ns/default/sa/web/extra", WeftIdentity::Other),
            ("spiffe://td/ns/default/xx/web", WeftIdentity::Other),
            ("spiffe://td/NS/default/sa/web", WeftIdentity::Other),
            ("spiffe://td/ns/default/SA/web", WeftIdentity::Other),
            ("spiffe://td/node", WeftIdentity::Other),
            ("spiffe://td/node/a/b", WeftIdentity::Other),
            ("spiffe://td/Node/a", WeftIdentity::Other),
            ("spiffe://td/operator", WeftIdentity::Other),
            ("spiffe://td/operator/a/b", WeftIdentity::Other),
            ("spiffe://td/workload/web", WeftIdentity::Other),
        ] {
            assert_eq!(SpiffeId::parse(input).unwrap().kind(), expected, "{input}");
        }
    }

    #[test]
    fn kind_ignores_the_trust_domain() {
        let a = SpiffeId::service(&td("a.test"), "default", "web").unwrap();
        let b = SpiffeId::service(&td("b.test"), "default", "web").unwrap();
        assert_eq!(a.kind(), b.kind());
        assert_ne!(a, b);
    }
}
