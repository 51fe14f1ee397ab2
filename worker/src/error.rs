//! The worker's errors. Each names the thing at fault and, where there is one, the fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read worker config `{}`: {source}", path.display())]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("worker config `{origin}` does not parse: {message}")]
    ParseConfig { origin: String, message: String },
    #[error("invalid worker config:{}", .0.iter().map(|p| format!("\n  {p}")).collect::<String>())]
    InvalidConfig(Vec<ConfigProblem>),
    #[error("`gpus` lists GPU {index} but this machine has {available}: pick among those, or use \"all\" or \"cpu\"")]
    NoSuchGpu { index: u32, available: String },
    #[error("cannot connect to the coordinator at {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("coordinator refused {call}: {status}")]
    Rpc {
        call: &'static str,
        #[source]
        status: tonic::Status,
    },
    #[error(
        "cannot start rank command `{command}`: {source}; set `rank_command` in the worker config"
    )]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("artifact {digest}: {problem}")]
    Artifact { digest: String, problem: String },
    #[error("{0}")]
    Convert(#[from] loractl_proto::ConvertError),
    #[error("`{key}` = `{}`: {problem}", path.display())]
    PathNotAllowed {
        key: String,
        path: PathBuf,
        problem: String,
    },
    #[error("the assigned job spec is not valid here: {0}")]
    BadSpec(String),
    /// The job cannot run on this worker as written (a path outside the allowed folders, a bad
    /// dataset manifest): reported as a bad config, not retried.
    #[error("{0}")]
    BadJob(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The job cannot run as written (retrying elsewhere would not help).
    pub fn is_bad_config(&self) -> bool {
        matches!(
            self,
            Error::PathNotAllowed { .. } | Error::BadSpec(_) | Error::BadJob(_)
        )
    }
}

/// One problem of a worker config, with its key and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub key: String,
    pub problem: String,
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`: {}", self.key, self.problem)
    }
}

pub(crate) fn io_error(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
