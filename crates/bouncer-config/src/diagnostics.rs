//! Errors that point at the exact place in the config file that caused them.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem found in a config file, with where it is and why it is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub file: PathBuf,
    /// 1-based line, 0 when the problem has no single place (a missing section, say).
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// Dotted key path, such as `upstreams.app.connect_timeout` or `routes[2].upstream`.
    pub key_path: String,
    pub reason: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if self.key_path.is_empty() {
            write!(f, ": {}", self.reason)
        } else {
            write!(f, ": {}: {}", self.key_path, self.reason)
        }
    }
}

/// Every problem found in one config file: validation goes on after the first one so that the
/// operator can fix them all in one pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigProblems(pub Vec<ConfigProblem>);

impl fmt::Display for ConfigProblems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, problem) in self.0.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// Collects problems while the validator walks the tree, turning byte spans into lines and columns.
pub(crate) struct Diagnostics<'a> {
    file: &'a Path,
    source: &'a str,
    problems: Vec<ConfigProblem>,
}

impl<'a> Diagnostics<'a> {
    pub(crate) fn new(file: &'a Path, source: &'a str) -> Self {
        Self {
            file,
            source,
            problems: Vec::new(),
        }
    }

    pub(crate) fn report(
        &mut self,
        span: Option<Range<usize>>,
        key_path: impl Into<String>,
        reason: impl Into<String>,
    ) {
        let (line, column) = span
            .map(|span| line_and_column(self.source, span.start))
            .unwrap_or((0, 0));
        self.problems.push(ConfigProblem {
            file: self.file.to_path_buf(),
            line,
            column,
            key_path: key_path.into(),
            reason: reason.into(),
        });
    }

    /// The problems in file order (those without a place first), whatever order the checks ran in.
    pub(crate) fn into_problems(mut self) -> Vec<ConfigProblem> {
        self.problems
            .sort_by_key(|problem| (problem.line, problem.column));
        self.problems
    }
}

/// Turns a byte offset into a 1-based line and a 1-based column counted in characters.
fn line_and_column(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = source.get(..offset).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |at| at + 1);
    let column = before
        .get(line_start..)
        .map_or(0, |text| text.chars().count())
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_become_lines_and_columns() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_and_column(text, 0), (1, 1));
        assert_eq!(line_and_column(text, 6), (2, 1));
        // The 'é' takes two bytes but one column.
        assert_eq!(line_and_column(text, 9), (2, 3));
        assert_eq!(line_and_column(text, 1000), (3, 1));
    }
}
