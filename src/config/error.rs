//! Config errors: what is wrong, at which key path, and where in the file.

use std::fmt;
use std::path::PathBuf;

/// One problem with a config, pointing at the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Key path such as `distributions[0].placement[1].slots`; empty for the whole file.
    pub path: String,
    /// What is wrong, for an operator to read.
    pub message: String,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    /// 1-based column in the file, when known.
    pub column: Option<usize>,
}

impl ConfigError {
    /// An error at `path` without a position.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            path: path.into(),
            message: message.into(),
            line: None,
            column: None,
        }
    }

    /// Convert a YAML parser error. Its text has the form `path: message at line L column
    /// C` (path and position are optional); the position is kept separately so that all
    /// errors print alike.
    pub fn from_yaml_error(err: &serde_norway::Error) -> ConfigError {
        let mut text = err.to_string();
        let (line, column) = match err.location() {
            Some(loc) => {
                let suffix = format!(" at line {} column {}", loc.line(), loc.column());
                if let Some(stripped) = text.strip_suffix(&suffix) {
                    text = stripped.to_owned();
                }
                (Some(loc.line()), Some(loc.column()))
            }
            None => (None, None),
        };
        // The parser prefixes a key path (no spaces) when the error is below the root.
        let (path, message) = match text.split_once(": ") {
            Some((p, m)) if !p.is_empty() && !p.contains(char::is_whitespace) => {
                (p.to_owned(), m.to_owned())
            }
            _ => (String::new(), text),
        };
        ConfigError {
            path,
            message,
            line,
            column,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, " (line {l}, column {c})"),
            (Some(l), None) => write!(f, " (line {l})"),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Why [`super::Config::load`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", join(.0))]
    Invalid(Vec<ConfigError>),
}

impl LoadError {
    /// Each problem as its own line-sized error (one for an I/O failure).
    pub fn errors(&self) -> Vec<String> {
        match self {
            LoadError::Io { .. } => vec![self.to_string()],
            LoadError::Invalid(errs) => errs.iter().map(ToString::to_string).collect(),
        }
    }
}

fn join(errs: &[ConfigError]) -> String {
    errs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}
