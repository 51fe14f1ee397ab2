//! The trainer's error type, and who can fix each failure ([`ErrorKind`]), decided next to
//! each variant so that callers (the rank's exit code, the coordinator's retry policy) do not
//! keep their own list of variants.
use std::path::PathBuf;

/// Who can fix a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The job or its inputs are wrong (spec, model, LoRA or dataset files): running it again
    /// fails the same way until the user changes something.
    BadConfig,
    /// The machine or loractl itself failed (device, out of memory, disk, a bug): another
    /// attempt may succeed.
    Internal,
    /// The loss, a gradient or a weight became NaN or infinite.
    Diverged,
}

/// Everything that can go wrong inside the training engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The OS error is part of the message and deliberately not the error's `source()`, so
    /// that printing the chain (`{:#}`) does not repeat it.
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A model file that is not what it claims to be, truncated, or built for another model.
    #[error("{path}: {msg}")]
    BadCheckpoint { path: PathBuf, msg: String },
    /// A tensor the model needs is absent from the weights.
    #[error("missing tensor {} in {origin}", label(name, stored_as))]
    MissingTensor {
        name: String,
        /// The file's name for it, where the file's layout names it otherwise.
        stored_as: Option<Box<str>>,
        origin: String,
    },
    /// A tensor is present but has the wrong shape for this model.
    #[error(
        "tensor {} has shape {got:?} but the model expects {expected:?} ({origin})",
        label(name, stored_as)
    )]
    ShapeMismatch {
        name: String,
        /// The file's name for it, where the file's layout names it otherwise.
        stored_as: Option<Box<str>>,
        got: Vec<usize>,
        expected: Vec<usize>,
        origin: String,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The job asks for something impossible or its inputs do not fit it.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A failure that is neither the user's nor the data's (an invariant of loractl broke).
    #[error("internal error: {0}")]
    Internal(String),
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

/// A tensor name in backticks; one the file names otherwise as `` `stored` (for `name`) ``.
fn label(name: &str, stored_as: &Option<Box<str>>) -> String {
    match stored_as {
        Some(stored) if &**stored != name => format!("`{stored}` (for `{name}`)"),
        _ => format!("`{name}`"),
    }
}

impl Error {
    /// Who can fix this error; see [`ErrorKind`].
    pub fn kind(&self) -> ErrorKind {
        use std::io::ErrorKind as Io;
        match self {
            // Model, LoRA, tokenizer and dataset files are the job's inputs.
            Error::BadCheckpoint { .. }
            | Error::MissingTensor { .. }
            | Error::ShapeMismatch { .. }
            | Error::Tokenizer(_)
            | Error::Config(_)
            | Error::Lora(_) => ErrorKind::BadConfig,
            // A path that is not there or not readable is the job's; a full disk or a failing
            // device is the machine's.
            Error::Io { error, .. } => match error.kind() {
                Io::NotFound | Io::PermissionDenied | Io::InvalidData | Io::InvalidInput => {
                    ErrorKind::BadConfig
                }
                _ => ErrorKind::Internal,
            },
            // A peer rank that died or stalled: the attempt is retried from its checkpoint.
            Error::Candle(_) | Error::Internal(_) | Error::Collective(_) => ErrorKind::Internal,
            Error::Diverged(_) => ErrorKind::Diverged,
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }
    pub fn bad_checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::BadCheckpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_says_who_can_fix_it() {
        let io = |k| Error::io("/x", std::io::Error::from(k));
        assert_eq!(
            io(std::io::ErrorKind::NotFound).kind(),
            ErrorKind::BadConfig
        );
        assert_eq!(
            io(std::io::ErrorKind::StorageFull).kind(),
            ErrorKind::Internal
        );
        // A LoRA made for another base model (network_weights) is the user's to fix.
        assert_eq!(
            Error::Lora("`x.lora_down.weight` has shape [4, 768]".into()).kind(),
            ErrorKind::BadConfig
        );
        // A state that fails to serialise is loractl's failure, so another attempt may run.
        assert_eq!(
            Error::Internal("encoding the training state".into()).kind(),
            ErrorKind::Internal
        );
        assert_eq!(Error::Diverged("nan".into()).kind(), ErrorKind::Diverged);
        assert_eq!(
            Error::bad_checkpoint("/m", "truncated").kind(),
            ErrorKind::BadConfig
        );
    }

    #[test]
    fn a_tensor_read_for_another_name_is_quoted_once_each() {
        let e = Error::ShapeMismatch {
            name: "conv_out.weight".into(),
            stored_as: Some("model.diffusion_model.out.2.weight".into()),
            got: vec![4],
            expected: vec![4, 320, 3, 3],
            origin: "m.safetensors".into(),
        };
        assert_eq!(
            e.to_string(),
            "tensor `model.diffusion_model.out.2.weight` (for `conv_out.weight`) has shape [4] \
             but the model expects [4, 320, 3, 3] (m.safetensors)"
        );
        let e = Error::MissingTensor {
            name: "conv_out.weight".into(),
            stored_as: None,
            origin: "m.safetensors".into(),
        };
        assert_eq!(
            e.to_string(),
            "missing tensor `conv_out.weight` in m.safetensors"
        );
    }

    #[test]
    fn an_io_error_is_said_once_in_the_chain() {
        let e = anyhow::Error::from(Error::io(
            "/m/sd15.safetensors",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
        let text = format!("{e:#}");
        assert_eq!(text.matches("not found").count(), 1, "{text}");
    }
}
