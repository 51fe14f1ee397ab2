//! Errors of the job spec: `ParseErrors` for a file that does not fit the schema (each with
//! line, column and key path), `SpecErrors` for a spec that parses but cannot run (each with key
//! path and fix), and `SpecWarning` for accepted values that deserve a word.

use std::fmt;
use std::path::PathBuf;

/// Everything that can go wrong loading or checking a job spec.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OS error is in the message, not `source()`, so a printed chain says it once.
    #[error("cannot read job spec `{}`: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Parse(#[from] ParseErrors),
    #[error(transparent)]
    Invalid(#[from] SpecErrors),
    #[error("cannot write job spec as TOML: {0}")]
    Serialize(#[from] toml::ser::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// One problem found while reading the TOML text into a [`crate::JobSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// Where the text came from (a file path, `<stdin>`, `<request>`).
    pub origin: String,
    /// 1-based line and column (in characters) of the offending key or value.
    pub line: usize,
    pub column: usize,
    /// Dotted key path, e.g. `optimizer.lerning_rate`; `None` for TOML syntax errors.
    pub path: Option<String>,
    pub message: String,
    /// A likely fix, e.g. "did you mean `learning_rate`?".
    pub hint: Option<String>,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.origin, self.line, self.column)?;
        if let Some(path) = &self.path {
            write!(f, "`{path}`: ")?;
        }
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "; {hint}")?;
        }
        Ok(())
    }
}

/// Every parse problem found in one document (unknown keys are all reported, not just the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseErrors(pub Vec<ParseError>);

impl ParseErrors {
    pub fn iter(&self) -> std::slice::Iter<'_, ParseError> {
        self.0.iter()
    }
}

impl fmt::Display for ParseErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_list(f, "job spec does not parse", self.0.iter())
    }
}

impl std::error::Error for ParseErrors {}

/// One reason a parsed spec cannot run, with the key it is about and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// Dotted key path, e.g. `dataset.bucket_reso_steps`.
    pub path: String,
    /// What is wrong, e.g. "100 is not a multiple of 64".
    pub problem: String,
    /// What to do instead, e.g. "use 64 or 128".
    pub fix: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}; {}", self.path, self.problem, self.fix)
    }
}

/// Every problem [`crate::JobSpec::validate`] found, in schema order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecErrors(pub Vec<SpecError>);

impl SpecErrors {
    pub fn iter(&self) -> std::slice::Iter<'_, SpecError> {
        self.0.iter()
    }

    /// The problems about one key path.
    pub fn at<'a>(&'a self, path: &'a str) -> impl Iterator<Item = &'a SpecError> + 'a {
        self.0.iter().filter(move |e| e.path == path)
    }
}

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_list(f, "invalid job spec", self.0.iter())
    }
}

impl std::error::Error for SpecErrors {}

/// A value that is accepted but behaves differently from what a reader may expect (kohya
/// compatibility adjustments, ignored options, defaults worth knowing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecWarning {
    pub path: String,
    pub message: String,
}

impl fmt::Display for SpecWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.path, self.message)
    }
}

fn write_list<T: fmt::Display>(
    f: &mut fmt::Formatter<'_>,
    title: &str,
    mut items: impl ExactSizeIterator<Item = T>,
) -> fmt::Result {
    match items.len() {
        0 => f.write_str(title),
        1 => match items.next() {
            Some(item) => write!(f, "{title}: {item}"),
            None => f.write_str(title),
        },
        n => {
            write!(f, "{title} ({n} problems):")?;
            for item in items {
                write!(f, "\n  {item}")?;
            }
            Ok(())
        }
    }
}
