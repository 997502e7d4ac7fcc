//! [`ConfigError`]: which field is wrong and why, found in the TOML text by [`field_at`], with
//! long values cut so a hostile file cannot flood the terminal.

use std::collections::BTreeMap;

/// A configuration problem: which field, and what is wrong with it. Shown with long values cut
/// (see [`clip_values`]): a 50 MB value is echoed as its first characters and its length.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{}: {}", clip_values(field), clip_values(message))]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

/// Characters of a value an error message shows.
const SHOWN_CHARS: usize = 80;

/// `text` with every value longer than `SHOWN_CHARS` (80) cut to that many characters, an
/// ellipsis and its length in bytes: a quoted value (`"..."`, with escapes, or `` `...` ``, as
/// the TOML parser quotes keys) or else a run of non-blank characters. Messages quote the
/// values they echo, and a file may put anything in them.
pub fn clip_values(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= SHOWN_CHARS {
        return text.into();
    }
    fn push_clipped(out: &mut String, v: &str) -> bool {
        match v.char_indices().nth(SHOWN_CHARS) {
            None => {
                out.push_str(v);
                false
            }
            Some((cut, _)) => {
                out.push_str(&v[..cut]);
                out.push('…');
                true
            }
        }
    }
    let mut out = String::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let (token, len) = match c {
            '"' | '`' => {
                let body = &rest[1..];
                let mut escaped = false;
                let end = body
                    .char_indices()
                    .find(|&(_, ch)| {
                        let close = ch == c && !escaped;
                        escaped = c == '"' && ch == '\\' && !escaped;
                        close
                    })
                    .map_or(body.len(), |(i, _)| i);
                out.push(c);
                let cut = push_clipped(&mut out, &body[..end]);
                let closed = end < body.len();
                if closed {
                    out.push(c);
                }
                if cut {
                    out.push_str(&format!(" ({} bytes)", end));
                }
                (None, 1 + end + usize::from(closed))
            }
            c if c.is_whitespace() => {
                out.push(c);
                (None, c.len_utf8())
            }
            _ => {
                let end = rest
                    .find(|ch: char| ch.is_whitespace() || ch == '"' || ch == '`')
                    .unwrap_or(rest.len());
                (Some(&rest[..end]), end)
            }
        };
        if let Some(run) = token
            && push_clipped(&mut out, run)
        {
            out.push_str(&format!(" ({} bytes)", run.len()));
        }
        rest = &rest[len..];
    }
    out.into()
}

impl ConfigError {
    pub(super) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Names the field at byte `at` of a TOML text, e.g. `dataplane.max_services (line 2)` or
/// `service[1].listen (line 9)`, from the table headers above it and the key on its line.
pub(super) fn field_at(text: &str, at: usize) -> String {
    let line_no = text[..at].matches('\n').count() + 1;
    let mut table = String::new();
    let mut arrays: BTreeMap<String, usize> = BTreeMap::new();
    for l in text.lines().take(line_no) {
        let l = l.trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_owned();
            let n = arrays
                .entry(name.clone())
                .and_modify(|n| *n += 1)
                .or_insert(0);
            table = format!("{name}[{n}]");
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.split(']').next()) {
            let name = name.trim();
            // `[service.health]` belongs to the latest `[[service]]`.
            table = match name.split_once('.') {
                Some((parent, child)) if arrays.contains_key(parent) => {
                    format!("{parent}[{}].{child}", arrays[parent])
                }
                _ => name.to_owned(),
            };
        }
    }
    let key = text
        .lines()
        .nth(line_no - 1)
        .and_then(|l| l.split_once('='))
        .map(|(k, _)| k.trim().trim_matches('"').to_owned())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    match (table.is_empty(), key) {
        (_, None) if table.is_empty() => format!("line {line_no}"),
        (_, None) => format!("{table} (line {line_no})"),
        (true, Some(k)) => format!("{k} (line {line_no})"),
        (false, Some(k)) => format!("{table}.{k} (line {line_no})"),
    }
}
