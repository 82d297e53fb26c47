//! Locating config errors in the file: turns a key path into `file:line`.
//!
//! serde reports the first error with a byte span; cross-field checks (duplicates, missing
//! advertise addresses) know only the key path, so they look the span up here.

use std::fmt;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySegment {
    /// `name` in `node.name`.
    Key(String),
    /// `1` in `service[1]`.
    Index(usize),
}

/// A dotted key path such as `service[1].check.interval`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<KeySegment>);

impl KeyPath {
    /// Builds a path from `.`-separated parts where a purely numeric part is an index.
    pub fn parse(dotted: &str) -> KeyPath {
        KeyPath(
            dotted
                .split('.')
                .filter(|s| !s.is_empty())
                .map(|s| match s.parse::<usize>() {
                    Ok(i) => KeySegment::Index(i),
                    Err(_) => KeySegment::Key(s.to_string()),
                })
                .collect(),
        )
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                KeySegment::Key(k) if i == 0 => write!(f, "{k}")?,
                KeySegment::Key(k) => write!(f, ".{k}")?,
                KeySegment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// An error located in a config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {key}{}{message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default(), if key.0.is_empty() { "" } else { ": " })]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The key the error is about (empty for file-level errors).
    pub key: KeyPath,
    /// What is wrong, one line.
    pub message: String,
}

/// The text of a config file and its parsed table, for span lookups.
pub struct Source<'a> {
    path: &'a Path,
    text: &'a str,
    table: Option<DeTable<'a>>,
}

impl<'a> Source<'a> {
    /// Wraps a file's text; the table is parsed lazily only if it parses at all.
    pub fn new(path: &'a Path, text: &'a str) -> Source<'a> {
        let table = DeTable::parse(text).ok().map(|t| t.into_inner());
        Source { path, text, table }
    }

    /// 1-based line of a byte offset.
    pub fn line_of_offset(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    /// Line where `key` is written (its value, or the nearest existing parent).
    pub fn line_of(&self, key: &KeyPath) -> Option<usize> {
        let table = self.table.as_ref()?;
        let mut best: Option<usize> = None;
        let mut current: Option<&DeValue<'_>> = None;
        for segment in &key.0 {
            let next = match (segment, current) {
                (KeySegment::Key(k), None) => table.get(k.as_str()),
                (KeySegment::Key(k), Some(value)) => value.get(k.as_str()),
                (KeySegment::Index(i), Some(value)) => value.get(*i),
                (KeySegment::Index(_), None) => None,
            };
            match next {
                Some(spanned) => {
                    best = Some(self.line_of_offset(spanned.span().start));
                    current = Some(spanned.get_ref());
                }
                None => break,
            }
        }
        best
    }

    /// An error about `key`, located by lookup.
    pub fn error_at(&self, key: KeyPath, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.path.to_path_buf(),
            line: self.line_of(&key),
            key,
            message: message.into(),
        }
    }

    /// Converts a serde error (with the key path serde_path_to_error tracked).
    pub fn serde_error(&self, error: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
        let key = KeyPath::parse(&error.path().to_string().replace('[', ".").replace(']', ""));
        let inner = error.into_inner();
        let line = inner
            .span()
            .map(|span| self.line_of_offset(span.start))
            .or_else(|| self.line_of(&key));
        ConfigError {
            file: self.path.to_path_buf(),
            line,
            key,
            message: one_line(inner.message()),
        }
    }

    /// Converts a TOML syntax error.
    pub fn syntax_error(&self, error: toml::de::Error) -> ConfigError {
        ConfigError {
            file: self.path.to_path_buf(),
            line: error.span().map(|span| self.line_of_offset(span.start)),
            key: KeyPath::default(),
            message: format!("invalid TOML: {}", one_line(error.message())),
        }
    }
}

fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths_render_like_toml_users_write_them() {
        assert_eq!(
            KeyPath::parse("service.1.check.interval").to_string(),
            "service[1].check.interval"
        );
        assert_eq!(KeyPath::parse("gossip.bind").to_string(), "gossip.bind");
    }

    #[test]
    fn lookups_find_the_line_of_nested_keys() {
        let text = "[node]\nname = \"a\"\n\n[[service]]\nname = \"x\"\n\n[[service]]\nname = \"y\"\nport = 1\n";
        let source = Source::new(Path::new("w.toml"), text);
        assert_eq!(source.line_of(&KeyPath::parse("node.name")), Some(2));
        assert_eq!(source.line_of(&KeyPath::parse("service.1.port")), Some(9));
        // A missing key is located at its nearest parent.
        assert_eq!(
            source.line_of(&KeyPath::parse("service.1.missing")),
            Some(7)
        );
        assert_eq!(source.line_of(&KeyPath::parse("nothing")), None);
    }
}
