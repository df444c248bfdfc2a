//! Bouncer's configuration: a TOML file read into a validated [`Config`].
//!
//! Validation walks a TOML tree that keeps positions, so that every problem names the file, line,
//! column, key path and reason, and all problems are reported at once rather than the first only.

mod diagnostics;
mod model;
mod redact;
mod section;
mod units;
mod validate;

use std::path::{Path, PathBuf};

pub use diagnostics::{ConfigProblem, ConfigProblems};
pub use model::*;
pub use redact::redacted_json;
pub use units::{parse_duration, parse_size};

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(#[from] ConfigProblems),
}

impl LoadError {
    /// The individual problems, for callers that list them one per line.
    pub fn problems(&self) -> Vec<String> {
        match self {
            LoadError::Read { .. } => {
                let mut lines = vec![self.to_string()];
                let mut cause = std::error::Error::source(self);
                while let Some(inner) = cause {
                    lines[0] = format!("{}: {inner}", lines[0]);
                    cause = inner.source();
                }
                lines
            }
            LoadError::Invalid(problems) => problems.0.iter().map(ToString::to_string).collect(),
        }
    }
}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse(path, &text)?)
}

/// Validates config text; `file` is only used to name the source in problems.
pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigProblems> {
    validate::validate(file, text)
}
