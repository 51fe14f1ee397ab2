//! The trainer's error type.
use std::path::PathBuf;

/// Everything that can go wrong inside the training engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A model file that is not what it claims to be, truncated, or built for another model.
    #[error("{path}: {msg}")]
    BadCheckpoint { path: PathBuf, msg: String },
    /// A tensor the model needs is absent from the weights.
    #[error("missing tensor `{name}` in {origin}")]
    MissingTensor { name: String, origin: String },
    /// A tensor is present but has the wrong shape for this model.
    #[error("tensor `{name}` has shape {got:?} but the model expects {expected:?} ({origin})")]
    ShapeMismatch {
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
        origin: String,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("LoRA: {0}")]
    Lora(String),
    /// The loss or a gradient became NaN or infinite: the run stopped, nothing was written.
    #[error("training diverged: {0}")]
    Diverged(String),
    /// A data-parallel collective failed (a peer rank died, stalled or is out of step).
    #[error("data-parallel: {0}")]
    Collective(#[from] loractl_collective::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn bad_checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::BadCheckpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
