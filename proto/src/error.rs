//! Errors of the API crate: a wire message that does not make a valid domain value.

/// A field of a wire message that is missing or holds a value the domain type cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}`: {problem}")]
pub struct ConvertError {
    /// Dotted path of the field inside the request, e.g. `job.resources.workers`.
    pub field: String,
    pub problem: String,
}

impl ConvertError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }

    pub fn missing(field: impl Into<String>) -> Self {
        Self::new(field, "missing; it is required")
    }

    /// Prefixes the field path with the enclosing message's field, e.g. `job` + `name`.
    pub fn within(mut self, parent: &str) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}

impl From<ConvertError> for tonic::Status {
    fn from(err: ConvertError) -> Self {
        tonic::Status::invalid_argument(err.to_string())
    }
}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Convert(#[from] ConvertError),
    #[error("`{text}` is not a sha256 digest: expected 64 hex digits")]
    BadDigest { text: String },
}

pub type Result<T> = std::result::Result<T, Error>;
