//! Request matching for HTTPRouteGroup matches: anchored regexes, the method set, header
//! conditions and the path normalisation every path is put through before it is matched.
//!
//! This module owns the regex dialect and anchoring of policy (the `regex` crate, RE2-like:
//! no backreferences or lookaround) so that validation and enforcement agree exactly. It must
//! never match a path that was not normalised first: otherwise `/metrics/../admin` would pass
//! an allow rule for `/metrics`.

use std::borrow::Cow;

use hyper::HeaderMap;
use hyper::header::HeaderName;
use regex::{Regex, RegexBuilder};

use super::model::{HttpMatch, HttpMethod, PathRegexMatch};

/// Largest compiled program one policy regex may grow to; real route patterns need a few KiB.
const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Lazy-DFA cache per regex, so thousands of route regexes stay within a bounded footprint.
const REGEX_DFA_SIZE_LIMIT: usize = 256 << 10;

/// How a pattern is anchored when it is compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// `^(?:re)`: the pattern must match at the start (the SMI text for `pathRegex`).
    Start,
    /// `^(?:re)$`: the pattern must match the whole value (header values, `pathRegexMatch: full`).
    Full,
}

/// Compiles a policy regex with the given anchoring.
///
/// The pattern is first compiled on its own, so a pattern such as `a)|(b` that would only
/// parse once wrapped (and would then escape the anchors) is refused. Errors are one line.
pub fn compile(pattern: &str, anchor: Anchor) -> Result<Regex, String> {
    build(pattern)?;
    let anchored = match anchor {
        Anchor::Start => format!("^(?:{pattern})"),
        Anchor::Full => format!("^(?:{pattern})$"),
    };
    build(&anchored)
}

fn build(pattern: &str) -> Result<Regex, String> {
    RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_DFA_SIZE_LIMIT)
        .build()
        .map_err(|e| regex_error(&e))
}

/// The one-line cause of a regex error (the crate's syntax errors span several lines, with
/// the cause on a final `error: ...` line).
fn regex_error(error: &regex::Error) -> String {
    match error {
        regex::Error::Syntax(text) => text
            .lines()
            .rev()
            .find_map(|line| line.strip_prefix("error: "))
            .map(str::to_string)
            .unwrap_or_else(|| super::yaml::one_line(text)),
        regex::Error::CompiledTooBig(limit) => {
            format!("the pattern compiles to more than {limit} bytes")
        }
        other => super::yaml::one_line(&other.to_string()),
    }
}

/// A method bit; methods outside SMI's list (`PROPFIND`, ...) share one bit that only `*` sets.
fn method_bit(method: &str) -> u16 {
    match HttpMethod::parse(method) {
        Some(HttpMethod::Any) | None => 1 << 15,
        Some(m) => 1 << (m as u16),
    }
}

/// Every method, including ones outside SMI's list.
const ALL_METHODS: u16 = u16::MAX;

/// One HTTPRouteGroup match, compiled: every present condition must hold.
#[derive(Debug, Clone)]
pub struct HttpMatcher {
    path: Option<Regex>,
    methods: u16,
    headers: Vec<(HeaderName, Regex)>,
}

impl HttpMatcher {
    /// Compiles a validated match; `None` if it does not compile (validation prevents that,
    /// and callers then treat the rule as matching nothing).
    pub fn compile(m: &HttpMatch, path_match: PathRegexMatch) -> Option<HttpMatcher> {
        let anchor = match path_match {
            PathRegexMatch::Prefix => Anchor::Start,
            PathRegexMatch::Full => Anchor::Full,
        };
        let path = match &m.path_regex {
            Some(pattern) => Some(compile(pattern, anchor).ok()?),
            None => None,
        };
        let methods = if m.methods.is_empty() || m.methods.contains(&HttpMethod::Any) {
            ALL_METHODS
        } else {
            m.methods.iter().fold(0, |bits, m| bits | 1 << (*m as u16))
        };
        let mut headers = Vec::with_capacity(m.headers.len());
        for (name, pattern) in &m.headers {
            let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
            headers.push((name, compile(pattern, Anchor::Full).ok()?));
        }
        Some(HttpMatcher {
            path,
            methods,
            headers,
        })
    }

    /// Whether a request matches. `path` must already be normalised ([`normalize_path`]).
    ///
    /// A header condition holds when any one value of a repeated header matches, and fails
    /// when the header is missing.
    pub fn matches(&self, method: &str, path: &str, headers: &HeaderMap) -> bool {
        if self.methods != ALL_METHODS && self.methods & method_bit(method) == 0 {
            return false;
        }
        if let Some(regex) = &self.path
            && !regex.is_match(path)
        {
            return false;
        }
        self.headers.iter().all(|(name, regex)| {
            headers
                .get_all(name)
                .iter()
                .filter_map(|value| std::str::from_utf8(value.as_bytes()).ok())
                .any(|value| regex.is_match(value))
        })
    }
}

/// The path a policy sees: the query and fragment removed, percent-escapes of unreserved
/// characters decoded (and other escapes' hex digits upper-cased), and `.`/`..` segments
/// resolved (RFC 3986 §6.2.2 and §5.2.4). Repeated slashes are kept as they are, so
/// `//admin` does not match a rule written for `/admin`.
///
/// The data plane should forward this same path, so the application serves what the
/// policy decided on.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let decoded = if path.contains('%') {
        Cow::Owned(decode_unreserved(path))
    } else {
        Cow::Borrowed(path)
    };
    let has_dot_segments = decoded.split('/').any(|s| s == "." || s == "..");
    if !decoded.starts_with('/') || !has_dot_segments {
        return decoded;
    }
    let mut out: Vec<&str> = Vec::new();
    let mut last_was_dot = false;
    for segment in decoded[1..].split('/') {
        last_was_dot = matches!(segment, "." | "..");
        match segment {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut result = format!("/{}", out.join("/"));
    if last_was_dot && !result.ends_with('/') {
        result.push('/');
    }
    Cow::Owned(result)
}

/// Decodes `%XX` escapes of unreserved characters; other escapes keep upper-case hex. A `%`
/// that starts no escape becomes `%25`, so decoding can never assemble a new escape out of
/// the characters around it (`%%32%65` must not turn into `%2e`, which an app would read as
/// `.`), and normalising twice gives the same path as once.
fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).and_then(|b| (*b as char).to_digit(16)),
                bytes.get(i + 2).and_then(|b| (*b as char).to_digit(16)),
            )
        {
            let byte = (hi * 16 + lo) as u8;
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
                out.push(byte as char);
            } else {
                out.push('%');
                out.push_str(&format!("{byte:02X}"));
            }
            i += 3;
            continue;
        }
        if bytes[i] == b'%' {
            out.push_str("%25");
            i += 1;
            continue;
        }
        // Copy one UTF-8 character (paths from hyper are ASCII, but stay correct for any &str).
        let ch_len = path[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&path[i..i + ch_len]);
        i += ch_len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn a_stray_percent_cannot_assemble_a_new_escape() {
        // `%%32%65` decoded naively gives `%2e`, which an app reads as `.`.
        let once = normalize_path("/public/%%32%65%%32%65/admin");
        assert_eq!(once, "/public/%252e%252e/admin");
        assert_eq!(
            normalize_path(&once),
            once,
            "normalising twice changes nothing"
        );
        assert_eq!(normalize_path("/a%zz/b%"), "/a%25zz/b%25");
        for path in ["/x/%2e%2e/y", "/a%20b", "/%7euser/./x/../y", "/p%%%41"] {
            let once = normalize_path(path).into_owned();
            assert_eq!(normalize_path(&once), once, "{path}");
        }
    }

    #[test]
    fn paths_are_normalised_before_matching() {
        let cases = [
            ("/metrics", "/metrics"),
            ("/metrics?x=1", "/metrics"),
            ("/metrics#frag", "/metrics"),
            ("/metrics/../admin", "/admin"),
            ("/a/b/c/./../../g", "/a/g"),
            ("/a/b/..", "/a/"),
            ("/..", "/"),
            ("/a/./", "/a/"),
            ("/%2e%2e/admin", "/admin"),
            ("/%6Detrics", "/metrics"),
            ("/a%2fb", "/a%2Fb"),
            ("/a//b", "/a//b"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/100%", "/100%25"), // a stray `%` is escaped, so no new escape can form
            ("*", "*"),
            ("", ""),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_path(raw), want, "normalising {raw:?}");
        }
        assert!(matches!(normalize_path("/plain/path"), Cow::Borrowed(_)));
    }

    #[test]
    fn anchoring_is_explicit_and_cannot_be_escaped() {
        let start = compile("/api", Anchor::Start).unwrap();
        assert!(start.is_match("/api/v1") && start.is_match("/apiary"));
        assert!(!start.is_match("/v1/api"));
        let full = compile("/api", Anchor::Full).unwrap();
        assert!(full.is_match("/api") && !full.is_match("/api/v1"));
        // Would compile once wrapped as ^(?:a)|(b)$ and match "xb"; refused on its own.
        assert_eq!(
            compile("a)|(b", Anchor::Full).unwrap_err(),
            "unopened group"
        );
        assert_eq!(
            compile("/api/(", Anchor::Start).unwrap_err(),
            "unclosed group"
        );
        assert!(
            compile("a{1000}{1000}", Anchor::Full)
                .unwrap_err()
                .starts_with("the pattern compiles to more than")
        );
    }

    fn matcher(methods: &[HttpMethod], headers: &[(&str, &str)]) -> HttpMatcher {
        let m = HttpMatch {
            name: "m".into(),
            path_regex: Some("/echo".into()),
            methods: methods.to_vec(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        };
        HttpMatcher::compile(&m, PathRegexMatch::Prefix).unwrap()
    }

    #[test]
    fn methods_are_exact_and_star_takes_every_method() {
        let get = matcher(&[HttpMethod::Get], &[]);
        let none = HeaderMap::new();
        assert!(get.matches("GET", "/echo", &none));
        assert!(
            !get.matches("get", "/echo", &none),
            "methods are case-sensitive"
        );
        assert!(!get.matches("POST", "/echo", &none));
        let any = matcher(&[HttpMethod::Any], &[]);
        assert!(any.matches("PROPFIND", "/echo", &none));
        let unlisted = matcher(&[], &[]);
        assert!(unlisted.matches("DELETE", "/echo", &none));
        assert!(!get.matches("PROPFIND", "/echo", &none));
    }

    #[test]
    fn header_conditions_match_any_value_in_full_and_require_the_header() {
        let m = matcher(&[], &[("x-canary", "true"), ("user-agent", ".*Firefox.*")]);
        let mut headers = HeaderMap::new();
        headers.insert("X-Canary", HeaderValue::from_static("true"));
        assert!(
            !m.matches("GET", "/echo", &headers),
            "user-agent is missing"
        );
        headers.insert(
            "user-agent",
            HeaderValue::from_static("Mozilla Firefox/140"),
        );
        assert!(m.matches("GET", "/echo", &headers));
        headers.insert("x-canary", HeaderValue::from_static("truest"));
        assert!(!m.matches("GET", "/echo", &headers), "values match in full");
        headers.append("x-canary", HeaderValue::from_static("true"));
        assert!(
            m.matches("GET", "/echo", &headers),
            "any value of a repeated header"
        );
    }
}
