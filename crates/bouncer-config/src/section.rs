//! A typed, position-keeping view of one TOML table.
//!
//! Each accessor marks its key as known, reports a precise problem when the value has the wrong
//! shape, and lets validation carry on; `finish` then reports every key nobody asked for, with a
//! suggestion when it looks like a misspelling of a known one.

use std::ops::Range;
use std::time::Duration;

use toml_edit::{Item, TableLike, Value};

use crate::diagnostics::Diagnostics;
use crate::units::{parse_duration, parse_size};

pub(crate) type Span = Option<Range<usize>>;

pub(crate) struct Section<'d> {
    table: &'d dyn TableLike,
    path: String,
    span: Span,
    known: Vec<&'static str>,
}

impl<'d> Section<'d> {
    pub(crate) fn new(table: &'d dyn TableLike, path: String, span: Span) -> Self {
        Self {
            table,
            path,
            span,
            known: Vec::new(),
        }
    }

    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    pub(crate) fn span(&self) -> Span {
        self.span.clone()
    }

    pub(crate) fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The raw item under `key`, with the span of its value (or of its key when the value has none).
    pub(crate) fn item(&mut self, key: &'static str) -> Option<(&'d Item, Span)> {
        self.known.push(key);
        let (found_key, item) = self.table.get_key_value(key)?;
        let span = item.span().or_else(|| found_key.span());
        Some((item, span))
    }

    /// Every entry, for tables whose keys are names chosen by the user (such as `[upstreams]`).
    pub(crate) fn entries(&self) -> impl Iterator<Item = (&'d str, &'d Item, Span)> + 'd {
        let table = self.table;
        table.iter().map(move |(key, item)| {
            let span = item
                .span()
                .or_else(|| table.key(key).and_then(|found| found.span()));
            (key, item, span)
        })
    }

    pub(crate) fn string(
        &mut self,
        d: &mut Diagnostics,
        key: &'static str,
    ) -> Option<(String, Span)> {
        let (item, span) = self.item(key)?;
        match item.as_str() {
            Some(text) => Some((text.to_string(), span)),
            None => {
                d.report(span, self.key_path(key), expected("a string", item));
                None
            }
        }
    }

    pub(crate) fn bool(&mut self, d: &mut Diagnostics, key: &'static str) -> Option<bool> {
        let (item, span) = self.item(key)?;
        match item.as_bool() {
            Some(value) => Some(value),
            None => {
                d.report(span, self.key_path(key), expected("true or false", item));
                None
            }
        }
    }

    /// A whole number within `min..=max`.
    pub(crate) fn integer(
        &mut self,
        d: &mut Diagnostics,
        key: &'static str,
        min: i64,
        max: i64,
    ) -> Option<i64> {
        let (item, span) = self.item(key)?;
        match item.as_integer() {
            Some(value) if (min..=max).contains(&value) => Some(value),
            Some(value) => {
                d.report(
                    span,
                    self.key_path(key),
                    format!("{value} is out of range: it must be between {min} and {max}"),
                );
                None
            }
            None => {
                d.report(span, self.key_path(key), expected("a whole number", item));
                None
            }
        }
    }

    /// A number (integer or float) within `min..=max`.
    pub(crate) fn number(
        &mut self,
        d: &mut Diagnostics,
        key: &'static str,
        min: f64,
        max: f64,
    ) -> Option<f64> {
        let (item, span) = self.item(key)?;
        let value = item
            .as_float()
            .or_else(|| item.as_integer().map(|value| value as f64));
        match value {
            Some(value) if (min..=max).contains(&value) => Some(value),
            Some(value) => {
                d.report(
                    span,
                    self.key_path(key),
                    format!("{value} is out of range: it must be between {min} and {max}"),
                );
                None
            }
            None => {
                d.report(span, self.key_path(key), expected("a number", item));
                None
            }
        }
    }

    /// A duration such as `"500ms"` or `"2s"`, at least `min`; `default` when absent or wrong.
    pub(crate) fn duration(
        &mut self,
        d: &mut Diagnostics,
        key: &'static str,
        default: Duration,
        min: Duration,
    ) -> Duration {
        let Some((item, span)) = self.item(key) else {
            return default;
        };
        let Some(text) = item.as_str() else {
            d.report(
                span,
                self.key_path(key),
                expected(
                    "a duration string such as \"500ms\", \"2s\" or \"5m\"",
                    item,
                ),
            );
            return default;
        };
        match parse_duration(text) {
            Ok(value) if value >= min => value,
            Ok(_) => {
                d.report(
                    span,
                    self.key_path(key),
                    format!("\"{text}\" is too short: the minimum is {min:?}"),
                );
                default
            }
            Err(reason) => {
                d.report(span, self.key_path(key), format!("\"{text}\": {reason}"));
                default
            }
        }
    }

    /// A size in bytes, written as an integer or as `"64KiB"`, `"10MiB"`; within `min..=max`.
    pub(crate) fn size(
        &mut self,
        d: &mut Diagnostics,
        key: &'static str,
        default: u64,
        min: u64,
        max: u64,
    ) -> u64 {
        let Some((item, span)) = self.item(key) else {
            return default;
        };
        let parsed = match (item.as_integer(), item.as_str()) {
            (Some(bytes), _) => {
                u64::try_from(bytes).map_err(|_| "a size cannot be negative".to_string())
            }
            (None, Some(text)) => {
                parse_size(text).map_err(|reason| format!("\"{text}\": {reason}"))
            }
            (None, None) => Err(expected("a size such as 65536 or \"64KiB\"", item)),
        };
        match parsed {
            Ok(bytes) if (min..=max).contains(&bytes) => bytes,
            Ok(bytes) => {
                d.report(
                    span,
                    self.key_path(key),
                    format!(
                        "{bytes} bytes is out of range: it must be between {min} and {max} bytes"
                    ),
                );
                default
            }
            Err(reason) => {
                d.report(span, self.key_path(key), reason);
                default
            }
        }
    }

    /// An array of strings, each with its own span so that a bad element can be pointed at.
    pub(crate) fn strings(
        &mut self,
        d: &mut Diagnostics,
        key: &'static str,
    ) -> Option<Vec<(String, Span)>> {
        let (item, span) = self.item(key)?;
        let Some(array) = item.as_array() else {
            d.report(
                span,
                self.key_path(key),
                expected("an array of strings", item),
            );
            return None;
        };
        let mut strings = Vec::with_capacity(array.len());
        for (index, value) in array.iter().enumerate() {
            match value.as_str() {
                Some(text) => strings.push((text.to_string(), value.span())),
                None => d.report(
                    value.span(),
                    format!("{}[{index}]", self.key_path(key)),
                    format!("expected a string, found {}", value.type_name()),
                ),
            }
        }
        Some(strings)
    }

    /// A nested table, written either as `[a.b]` or inline as `b = { ... }`.
    pub(crate) fn table(&mut self, d: &mut Diagnostics, key: &'static str) -> Option<Section<'d>> {
        let (item, span) = self.item(key)?;
        match item.as_table_like() {
            Some(table) => Some(Section::new(table, self.key_path(key), span)),
            None => {
                d.report(span, self.key_path(key), expected("a table", item));
                None
            }
        }
    }

    /// An array of tables, written either as `[[a]]` blocks or inline as `a = [{ ... }]`.
    pub(crate) fn tables(&mut self, d: &mut Diagnostics, key: &'static str) -> Vec<Section<'d>> {
        let Some((item, span)) = self.item(key) else {
            return Vec::new();
        };
        let path = self.key_path(key);
        if let Some(array) = item.as_array_of_tables() {
            return array
                .iter()
                .enumerate()
                .map(|(index, table)| {
                    Section::new(
                        table,
                        format!("{path}[{index}]"),
                        table.span().or(span.clone()),
                    )
                })
                .collect();
        }
        if let Some(array) = item.as_array() {
            let mut sections = Vec::new();
            for (index, value) in array.iter().enumerate() {
                match value {
                    Value::InlineTable(table) => {
                        sections.push(Section::new(
                            table,
                            format!("{path}[{index}]"),
                            value.span(),
                        ));
                    }
                    other => d.report(
                        other.span(),
                        format!("{path}[{index}]"),
                        format!("expected a table, found {}", other.type_name()),
                    ),
                }
            }
            return sections;
        }
        d.report(span, path, expected("an array of tables", item));
        Vec::new()
    }

    /// Reports every key that no accessor asked for, suggesting the closest known key.
    pub(crate) fn finish(self, d: &mut Diagnostics) {
        for (key, item) in self.table.iter() {
            if self.known.contains(&key) {
                continue;
            }
            let span = self
                .table
                .key(key)
                .and_then(|found| found.span())
                .or_else(|| item.span());
            let suggestion = self
                .known
                .iter()
                .map(|known| (strsim::damerau_levenshtein(key, known), *known))
                .filter(|(distance, known)| {
                    *distance <= 2 || known.contains(key) || key.contains(known)
                })
                .min_by_key(|(distance, _)| *distance);
            let reason = match suggestion {
                Some((_, known)) => format!("unknown key \"{key}\"; did you mean \"{known}\"?"),
                None => {
                    let mut known: Vec<&str> = self.known.clone();
                    known.sort_unstable();
                    known.dedup();
                    format!(
                        "unknown key \"{key}\"; known keys here: {}",
                        known.join(", ")
                    )
                }
            };
            d.report(span, self.key_path(key), reason);
        }
    }
}

pub(crate) fn expected(what: &str, item: &Item) -> String {
    format!("expected {what}, found {}", describe(item))
}

fn describe(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Value(value) => value.type_name(),
        Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
    }
}
