//! Walk filters in containerd's filter syntax (`github.com/containerd/containerd/filters`),
//! evaluated against snapshot records the way containerd's metastore adaptor does.
//!
//! Containerd itself filters in its metadata store and never sends filters to a proxy
//! snapshotter; other clients (and the conformance suite's raw mode) may.
//!
//! Grammar: a request holds several filters, OR-ed; a filter is selectors separated by
//! `,`, AND-ed; a selector is `fieldpath`, `fieldpath==value`, `fieldpath!=value` or
//! `fieldpath~=regexp`; a fieldpath is fields separated by `.`; fields and values may be
//! quoted with `"` (backslash escapes) or `` ` `` (raw).

use regex::Regex;

use crate::{metadata::Record, Error, Result};

#[derive(Debug)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug)]
struct Selector {
    fieldpath: Vec<String>,
    op: Op,
}

/// Parsed filters: matches a snapshot if any filter matches (an empty set matches all).
#[derive(Debug, Default)]
pub struct Filters {
    any: Vec<Vec<Selector>>,
}

impl Filters {
    /// Parses the filters of a List (Walk) request. Empty strings are ignored, as in
    /// containerd.
    pub fn parse(filters: &[String]) -> Result<Self> {
        let mut any = Vec::new();
        for f in filters {
            if f.trim().is_empty() {
                continue;
            }
            any.push(
                Parser::new(f)
                    .filter()
                    .map_err(|e| Error::InvalidArgument(format!("filter {f:?}: {e}")))?,
            );
        }
        Ok(Filters { any })
    }

    /// Whether snapshot `name` with `record` passes.
    pub fn matches(&self, name: &str, record: &Record) -> bool {
        self.any.is_empty()
            || self
                .any
                .iter()
                .any(|all| all.iter().all(|s| s.matches(name, record)))
    }
}

impl Selector {
    fn matches(&self, name: &str, record: &Record) -> bool {
        let field = field(&self.fieldpath, name, record);
        match &self.op {
            Op::Present => field.is_some(),
            Op::Equal(v) => field.as_deref() == Some(v.as_str()),
            // As in containerd: a missing field is "" for != and ~=.
            Op::NotEqual(v) => field.as_deref().unwrap_or("") != v,
            Op::Matches(re) => re.is_match(field.as_deref().unwrap_or("")),
        }
    }
}

/// containerd's `adaptSnapshot`.
fn field(path: &[String], name: &str, record: &Record) -> Option<String> {
    match path.first()?.as_str() {
        "kind" => Some(record.kind.as_str().to_string()),
        "name" => Some(name.to_string()),
        "parent" => Some(record.parent.clone()),
        "labels" => {
            if record.labels.is_empty() {
                return None;
            }
            record.labels.get(&path[1..].join(".")).cloned()
        }
        _ => None,
    }
}

struct Parser<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(s: &'a str) -> Self {
        Parser { s, pos: 0 }
    }

    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.s.len() - trimmed.len();
    }

    fn eat(&mut self, tok: &str) -> bool {
        self.skip_ws();
        if self.rest().starts_with(tok) {
            self.pos += tok.len();
            true
        } else {
            false
        }
    }

    fn filter(&mut self) -> std::result::Result<Vec<Selector>, String> {
        let mut all = vec![self.selector()?];
        while self.eat(",") {
            all.push(self.selector()?);
        }
        self.skip_ws();
        if !self.rest().is_empty() {
            return Err(format!("unexpected {:?} at {}", self.rest(), self.pos));
        }
        Ok(all)
    }

    fn selector(&mut self) -> std::result::Result<Selector, String> {
        let mut fieldpath = vec![self.field()?];
        while self.eat(".") {
            fieldpath.push(self.field()?);
        }
        let op = if self.eat("==") {
            Op::Equal(self.value()?)
        } else if self.eat("!=") {
            Op::NotEqual(self.value()?)
        } else if self.eat("~=") {
            let v = self.value()?;
            Op::Matches(Regex::new(&v).map_err(|e| format!("bad regexp {v:?}: {e}"))?)
        } else {
            Op::Present
        };
        Ok(Selector { fieldpath, op })
    }

    fn field(&mut self) -> std::result::Result<String, String> {
        self.skip_ws();
        if let Some(q) = self.quoted()? {
            return Ok(q);
        }
        let len = self
            .rest()
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-'))
            .unwrap_or(self.rest().len());
        if len == 0 {
            return Err(format!("expected a field name at {}", self.pos));
        }
        let f = self.rest()[..len].to_string();
        self.pos += len;
        Ok(f)
    }

    fn value(&mut self) -> std::result::Result<String, String> {
        self.skip_ws();
        if let Some(q) = self.quoted()? {
            return Ok(q);
        }
        let len = self.rest().find(',').unwrap_or(self.rest().len());
        let v = self.rest()[..len].trim_end().to_string();
        if v.is_empty() {
            return Err(format!("expected a value at {}", self.pos));
        }
        self.pos += len;
        Ok(v)
    }

    /// A `"..."` (with escapes) or `` `...` `` (raw) string, if one starts here.
    fn quoted(&mut self) -> std::result::Result<Option<String>, String> {
        let quote = match self.rest().chars().next() {
            Some(c @ ('"' | '`')) => c,
            _ => return Ok(None),
        };
        let start = self.pos;
        self.pos += 1;
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            if c == quote {
                self.pos += i + 1;
                return Ok(Some(out));
            }
            if c == '\\' && quote == '"' {
                match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 't')) => out.push('\t'),
                    Some((_, e)) => out.push(e),
                    None => break,
                }
            } else {
                out.push(c);
            }
        }
        Err(format!("unterminated quoted string at {start}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{Kind, Usage};
    use std::{collections::HashMap, time::SystemTime};

    fn rec(kind: Kind, parent: &str, labels: &[(&str, &str)]) -> Record {
        Record {
            id: 1,
            kind,
            parent: parent.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
            created: SystemTime::now(),
            updated: SystemTime::now(),
            usage: Usage::default(),
            remote: false,
        }
    }

    fn f(fs: &[&str]) -> Filters {
        Filters::parse(&fs.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn containerd_walk_cases() {
        let a = rec(
            Kind::Active,
            "p",
            &[("containerd.io/gc.root", "check-walk"), ("l", "2")],
        );
        let p = rec(
            Kind::Committed,
            "",
            &[("containerd.io/gc.root", "check-walk")],
        );
        let gc = r#"labels."containerd.io/gc.root"==check-walk"#;
        assert!(f(&[gc]).matches("a", &a));
        assert!(f(&[&format!("kind==active,{gc}")]).matches("a", &a));
        assert!(!f(&[&format!("kind==view,{gc}")]).matches("a", &a));
        assert!(f(&["name==p", "name==a"]).matches("a", &a));
        assert!(f(&["name==a,labels.l"]).matches("a", &a));
        assert!(!f(&["labels.l"]).matches("p", &p));
        assert!(f(&["parent==p"]).matches("a", &a));
        assert!(f(&[&format!(r#"parent!="",{gc}"#)]).matches("a", &a));
        assert!(!f(&[&format!(r#"parent!="",{gc}"#)]).matches("p", &p));
        assert!(f(&["labels.l==2"]).matches("a", &a));
        assert!(f(&["name~=^a$"]).matches("a", &a));
        assert!(f(&[]).matches("p", &p));
        assert!(Filters::parse(&["name==".into()]).is_err());
        assert!(Filters::parse(&[r#"labels."open"#.into()]).is_err());
    }
}
