//! The coordinator's errors. Each names the thing at fault and, where there is one, the fix.

use loractl_proto::domain::{JobId, JobState};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A compare-and-swap lost against a concurrent writer; read again and retry.
    #[error("store key `{key}` changed concurrently (expected {expected}, found {found})")]
    Conflict {
        key: String,
        expected: String,
        found: String,
    },
    #[error("cannot open the redb store `{path}`: {source}")]
    RedbOpen {
        path: String,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("`{0}` is not a store location: use `redb:PATH` or `etcd:URL[,URL...]`")]
    BadStoreLocation(String),
    #[error("redb store: {0}")]
    Redb(String),
    #[error(
        "etcd at {endpoints}: {source}; is etcd running there? (`etcd --listen-client-urls ...`)"
    )]
    EtcdConnect {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("store key `{key}` holds an unreadable record: {problem}")]
    Corrupt { key: String, problem: String },
    #[error("job `{0}` does not exist")]
    JobNotFound(JobId),
    #[error("job `{job}` cannot go from {from} to {to}")]
    InvalidTransition {
        job: JobId,
        from: JobState,
        to: JobState,
    },
    #[error("placement of job `{job}` is invalid: {problem}")]
    BadPlacement { job: JobId, problem: String },
    #[error("gave up updating `{key}` after {attempts} concurrent changes")]
    TooManyConflicts { key: String, attempts: u32 },
    #[error("{0}")]
    Spec(#[from] loractl_spec::Error),
    #[error("job spec is invalid: {0}")]
    InvalidSpec(#[from] loractl_spec::SpecErrors),
    #[error("job spec does not parse: {0}")]
    SpecParse(#[from] loractl_spec::ParseErrors),
    #[error("artifact store `{path}`: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("artifact {digest}: {problem}")]
    Artifact { digest: String, problem: String },
    #[error("artifact store is full: {needed} more bytes would exceed its quota of {quota} bytes; raise `--artifact-quota` or delete old jobs")]
    QuotaExceeded { needed: u64, quota: u64 },
    #[error("worker speaks protocol version {worker} but this coordinator speaks {coordinator}: run a loractl-worker of the same release as the coordinator")]
    ProtocolMismatch { worker: u32, coordinator: u32 },
    #[error("worker `{0}` is not registered or was declared lost: register again")]
    UnknownWorker(loractl_proto::domain::WorkerId),
    #[error("cannot serve gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("this coordinator is no longer the leader; another one took over")]
    NotLeader,
    #[error("leader election: {0}")]
    Election(String),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    /// The server task of an in-process coordinator ended without an error of its own.
    #[error("the coordinator {0}")]
    Stopped(String),
    #[error("{0} (--token or LORACTL_TOKEN)")]
    BadToken(String),
    #[error("--listen {0} is reachable from other machines, but no token is set: anyone who can connect could submit jobs and read artifacts. Set LORACTL_TOKEN (e.g. `openssl rand -hex 32`; TLS with --tls-cert/--tls-key as well off a trusted network), listen on 127.0.0.1, or pass --insecure to serve without a token anyway")]
    Exposed(String),
    /// An upload of a job's output from anyone but the worker running its current attempt.
    #[error("{0}")]
    OutputRefused(String),
}

macro_rules! redb_errors {
    ($($ty:ty),*) => {
        $(impl From<$ty> for Error {
            fn from(err: $ty) -> Self {
                Error::Redb(err.to_string())
            }
        })*
    };
}

redb_errors!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let message = err.to_string();
        match err {
            Error::JobNotFound(_) => tonic::Status::not_found(message),
            Error::InvalidTransition { .. } => tonic::Status::failed_precondition(message),
            Error::Spec(_) | Error::InvalidSpec(_) | Error::SpecParse(_) => {
                tonic::Status::invalid_argument(message)
            }
            Error::Artifact { .. } => tonic::Status::invalid_argument(message),
            Error::QuotaExceeded { .. } => tonic::Status::resource_exhausted(message),
            Error::Conflict { .. } | Error::TooManyConflicts { .. } => {
                tonic::Status::aborted(message)
            }
            Error::ShuttingDown | Error::NotLeader => tonic::Status::unavailable(message),
            Error::ProtocolMismatch { .. } => tonic::Status::failed_precondition(message),
            Error::UnknownWorker(_) => tonic::Status::not_found(message),
            Error::OutputRefused(_) => tonic::Status::permission_denied(message),
            _ => tonic::Status::internal(message),
        }
    }
}
