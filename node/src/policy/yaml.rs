//! A small YAML document tree with line numbers, built from `saphyr-parser` events.
//!
//! Policy files are read into this tree first and mapped to typed documents by hand
//! (`model.rs`), so every error, not only syntax errors, can name the line it is about.
//! The tree keeps scalars as text and resolves them only when a field asks for a type.
//!
//! It must never expand aliases (a few bytes of `*a` can otherwise grow into gigabytes:
//! the "billion laughs"), never recurse without a bound on depth, and never panic on input.

use std::fmt;

use saphyr_parser::{Event, Parser, ScalarStyle};

/// How deep mappings and sequences may nest; policy documents need about eight levels.
pub const MAX_DEPTH: usize = 32;

/// One YAML value and the line (1-based) where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// 1-based line of the value's first character.
    pub line: usize,
    /// The value.
    pub value: Value,
}

/// The shape of a YAML value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A scalar, as written; `quoted` when it was single- or double-quoted or a block
    /// scalar (so `"8080"` stays a string while `8080` may be read as a number).
    Scalar { text: String, quoted: bool },
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping: keys in the order written (duplicates are kept; the mapper refuses them).
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// Whether this is YAML's null (`~`, `null`, or nothing at all), which policy fields
    /// treat as absent, like Kubernetes does.
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar { text, quoted: false }
            if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// What the value is, for "expected X, found Y" messages: `null`, a scalar's text
    /// (quoted, cut at 40 characters), `a list` or `a mapping`.
    pub fn describe(&self) -> String {
        match &self.value {
            Value::Scalar { .. } if self.is_null() => "null".to_string(),
            Value::Scalar { text, .. } if text.chars().count() > 40 => {
                let cut: String = text.chars().take(40).collect();
                format!("{cut:?}...")
            }
            Value::Scalar { text, .. } => format!("{text:?}"),
            Value::Seq(_) => "a list".to_string(),
            Value::Map(_) => "a mapping".to_string(),
        }
    }
}

/// One document of a stream: its 1-based index and its root (`None` when the document
/// is empty, e.g. after a trailing `---`).
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// 1-based position of the document in its file.
    pub index: usize,
    /// The root value, or `None` for an empty document.
    pub root: Option<Node>,
}

/// Why a file is not YAML this loader accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// 1-based line.
    pub line: usize,
    /// 1-based index of the document being read when the error was found.
    pub document: usize,
    /// What is wrong, one line.
    pub message: String,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// A collection being built: its start line, its items and, for a mapping, a pending key.
enum Frame {
    Seq {
        line: usize,
        items: Vec<Node>,
    },
    Map {
        line: usize,
        entries: Vec<(Node, Node)>,
        key: Option<Node>,
    },
}

/// Parses a multi-document YAML stream into documents.
///
/// Returns the documents read before the first syntax error together with that error,
/// so callers can still check what was readable.
pub fn parse_stream(text: &str) -> (Vec<Document>, Option<SyntaxError>) {
    let mut documents = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<Node> = None;
    let mut index = 0;
    for event in Parser::new_from_str(text) {
        let (event, span) = match event {
            Ok(ok) => ok,
            Err(e) => {
                let error = SyntaxError {
                    line: e.marker().line(),
                    document: index.max(1),
                    message: one_line(e.info()),
                };
                return (documents, Some(error));
            }
        };
        let line = span.start.line();
        let fail = |message: &str| SyntaxError {
            line,
            document: index.max(1),
            message: message.to_string(),
        };
        let node = match event {
            Event::StreamStart | Event::StreamEnd | Event::Nothing => continue,
            Event::DocumentStart(_) => {
                index += 1;
                root = None;
                continue;
            }
            Event::DocumentEnd => {
                documents.push(Document {
                    index,
                    root: root.take().filter(|n| !n.is_null()),
                });
                continue;
            }
            Event::Alias(_) => {
                return (
                    documents,
                    Some(fail(
                        "YAML aliases (*name) are not supported in policy files",
                    )),
                );
            }
            Event::Scalar(text, style, _anchor, tag) => {
                if tag.is_some() {
                    return (
                        documents,
                        Some(fail("YAML tags (!tag) are not supported in policy files")),
                    );
                }
                Node {
                    line,
                    value: Value::Scalar {
                        text: text.into_owned(),
                        quoted: style != ScalarStyle::Plain,
                    },
                }
            }
            Event::SequenceStart(_, tag) | Event::MappingStart(_, tag) if tag.is_some() => {
                return (
                    documents,
                    Some(fail("YAML tags (!tag) are not supported in policy files")),
                );
            }
            Event::SequenceStart(..) | Event::MappingStart(..) if stack.len() >= MAX_DEPTH => {
                let message = format!("values nest deeper than {MAX_DEPTH} levels");
                return (documents, Some(fail(&message)));
            }
            Event::SequenceStart(..) => {
                stack.push(Frame::Seq {
                    line,
                    items: Vec::new(),
                });
                continue;
            }
            Event::MappingStart(..) => {
                stack.push(Frame::Map {
                    line,
                    entries: Vec::new(),
                    key: None,
                });
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some(Frame::Seq { line, items }) => Node {
                    line,
                    value: Value::Seq(items),
                },
                Some(Frame::Map { line, entries, .. }) => Node {
                    line,
                    value: Value::Map(entries),
                },
                None => return (documents, Some(fail("unbalanced collection end"))),
            },
        };
        match stack.last_mut() {
            None => root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { entries, key, .. }) => match key.take() {
                None => *key = Some(node),
                Some(k) => entries.push((k, node)),
            },
        }
    }
    (documents, None)
}

/// Collapses a message onto one line.
pub fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(node: &Node) -> &str {
        match &node.value {
            Value::Scalar { text, .. } => text,
            other => panic!("not a scalar: {other:?}"),
        }
    }

    #[test]
    fn documents_are_numbered_and_nodes_carry_lines() {
        let text = "a: 1\n---\nb:\n  - x\n  - \"y\"\n---\n";
        let (docs, error) = parse_stream(text);
        assert_eq!(error, None);
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[0].index, 1);
        assert_eq!(docs[2].root, None, "a trailing --- is an empty document");
        let Some(Node {
            value: Value::Map(entries),
            ..
        }) = &docs[1].root
        else {
            panic!("expected a mapping");
        };
        assert_eq!(scalar(&entries[0].0), "b");
        let Value::Seq(items) = &entries[0].1.value else {
            panic!("expected a list");
        };
        assert_eq!(items[0].line, 4);
        assert_eq!(items[1].line, 5);
        assert_eq!(
            items[1].value,
            Value::Scalar {
                text: "y".into(),
                quoted: true
            }
        );
        assert_eq!(items[0].describe(), "\"x\"");
        let long = Node {
            line: 1,
            value: Value::Scalar {
                text: "y".repeat(50),
                quoted: false,
            },
        };
        assert_eq!(long.describe(), format!("{:?}...", "y".repeat(40)));
    }

    #[test]
    fn aliases_are_refused_so_alias_bombs_cannot_expand() {
        let text = "a: &a [\"lol\"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: [*b,*b,*b,*b,*b]\n";
        let (_, error) = parse_stream(text);
        let error = error.expect("aliases are refused");
        assert_eq!(error.line, 2);
        assert_eq!(
            error.to_string(),
            "line 2: YAML aliases (*name) are not supported in policy files"
        );
    }

    #[test]
    fn deep_nesting_and_tags_are_refused() {
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        let (_, error) = parse_stream(&deep);
        assert!(error.unwrap().message.contains("deeper than 32"));
        let (_, error) = parse_stream("a: !!str 5\n");
        assert!(error.unwrap().message.contains("tags"));
    }

    #[test]
    fn syntax_errors_name_the_line_and_document() {
        let (docs, error) = parse_stream("a: 1\n---\nb: [1, 2\nc: 3\n");
        let error = error.expect("unclosed flow sequence");
        assert_eq!(docs.len(), 1, "the first document was readable");
        assert_eq!(error.document, 2);
        assert!(error.line >= 3, "{error:?}");
        assert!(!error.message.contains('\n'));
        assert_eq!(one_line("a\n  b"), "a b");
    }

    #[test]
    fn null_spellings_are_null_and_quoted_empty_is_not() {
        let (docs, _) = parse_stream("[~, null, '', x]");
        let Some(Node {
            value: Value::Seq(items),
            ..
        }) = &docs[0].root
        else {
            panic!("expected a list");
        };
        assert!(items[0].is_null() && items[1].is_null());
        assert!(!items[2].is_null() && !items[3].is_null());
        assert_eq!(items[0].describe(), "null");
    }
}
