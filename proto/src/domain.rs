//! The control plane's own types: jobs, their states and failures, workers and their GPUs,
//! artifacts, and the messages of a worker session. The coordinator, the worker and the CLI
//! work with these; only [`crate::convert`] knows the wire form.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// Milliseconds since the Unix epoch.
pub type UnixMs = i64;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            pub fn new(id: impl Into<String>) -> Self {
                Self(id.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(
    /// A job's id, e.g. `j42`.
    JobId
);
string_id!(
    /// A worker registration's id.
    WorkerId
);

/// A sha256 digest; shown and parsed as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl FromStr for Digest {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).map_err(|_| Error::BadDigest {
            text: text.to_owned(),
        })?;
        Ok(Self(bytes))
    }
}

/// Where a job is in its life. `Restarting` sits between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    Queued,
    Placed,
    Running,
    Restarting,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        Self::Queued,
        Self::Placed,
        Self::Running,
        Self::Restarting,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
    ];

    /// No transition leaves a terminal state.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// Waiting for placement (first attempt or a retry).
    pub fn is_pending(self) -> bool {
        matches!(self, Self::Queued | Self::Restarting)
    }

    /// Holding GPUs on workers.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Placed | Self::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Placed => "placed",
            Self::Running => "running",
            Self::Restarting => "restarting",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Exit code of a rank process whose job cannot run as written (sysexits' `EX_CONFIG`): the
/// coordinator fails the job without retrying.
pub const EXIT_BAD_CONFIG: i32 = 78;

/// Why an attempt failed; decides retry and restart budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The worker stopped heartbeating or its session ended.
    WorkerLost,
    /// The rank was stopped because the coordinator or its worker asked it to (cancel, drain,
    /// stop order); how it then ended does not matter.
    Killed,
    /// The job cannot run as written.
    BadConfig,
    /// Training failed (non-finite loss, collective timeout, error exit).
    TrainingError,
    /// The rank died by a signal nobody in loractl sent: SIGSEGV, SIGABRT (a failed
    /// allocation), the OOM killer. It would most likely happen again, so it is counted.
    Crashed,
}

impl FailureKind {
    pub const ALL: [Self; 5] = [
        Self::WorkerLost,
        Self::Killed,
        Self::BadConfig,
        Self::TrainingError,
        Self::Crashed,
    ];

    /// Whether another attempt may fix it.
    pub fn retryable(self) -> bool {
        !matches!(self, Self::BadConfig)
    }

    /// Whether a retry uses up one of the job's `max_restarts`. Only a stop loractl asked
    /// for and a lost worker do not: a job must not fail because it was drained or its worker
    /// was preempted, but a rank that dies on its own must not be retried for ever.
    pub fn counts_against_restarts(self) -> bool {
        matches!(self, Self::TrainingError | Self::Crashed)
    }

    /// Classifies how a rank process ended: `None` for success; after a stop the worker asked
    /// for (`stop_requested`), `Killed` whatever the code or signal; otherwise a signal is
    /// `Crashed`, [`EXIT_BAD_CONFIG`] is `BadConfig` and any other non-zero code is
    /// `TrainingError`.
    pub fn from_exit(code: Option<i32>, signal: Option<i32>, stop_requested: bool) -> Option<Self> {
        match (code, signal) {
            (Some(0), _) => None,
            _ if stop_requested => Some(Self::Killed),
            (_, Some(_)) => Some(Self::Crashed),
            (Some(EXIT_BAD_CONFIG), None) => Some(Self::BadConfig),
            _ => Some(Self::TrainingError),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::WorkerLost => "worker lost",
            Self::Killed => "killed",
            Self::BadConfig => "bad config",
            Self::TrainingError => "training error",
            Self::Crashed => "crashed",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
    pub rank: Option<u32>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rank {
            Some(rank) => write!(f, "{} on rank {rank}: {}", self.kind, self.message),
            None => write!(f, "{}: {}", self.kind, self.message),
        }
    }
}

/// The devices a job needs on each worker it spans.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GpuRequest {
    Cpu,
    /// Every pinned GPU of the worker; at least one.
    All,
    /// Exactly these GPU indices of the worker, distinct and non-empty.
    Ids(Vec<u32>),
}

impl fmt::Display for GpuRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::All => f.write_str("all"),
            Self::Ids(ids) => {
                let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
                f.write_str(&ids.join(","))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Resources {
    /// Workers the job spans; at least 1. A GPU job runs one rank per GPU it takes on each.
    pub workers: u32,
    pub gpus: GpuRequest,
    pub max_restarts: u32,
    /// CPU jobs: rank processes on each worker, at least 1. GPU jobs: 1 (a rank per GPU).
    pub ranks_per_worker: u32,
}

/// Where one rank of an attempt runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RankPlacement {
    pub rank: u32,
    pub worker_id: WorkerId,
    /// Empty for CPU ranks.
    pub gpu_indices: Vec<u32>,
}

/// A job as the coordinator stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: JobId,
    pub name: String,
    /// The job spec as submitted (TOML).
    pub spec_toml: String,
    pub priority: i32,
    /// Submission order.
    pub sequence: u64,
    pub submitted_at: UnixMs,
    pub state: JobState,
    pub resources: Resources,
    pub attempt: u32,
    pub counted_restarts: u32,
    /// Attempts in a row that ended with the same failure (kind and message); 0 before any.
    pub failure_streak: u32,
    /// Non-empty exactly while the job is placed or running.
    pub placement: Vec<RankPlacement>,
    pub last_failure: Option<Failure>,
    pub latest_checkpoint: Option<Digest>,
    pub updated_at: UnixMs,
    /// Live view (not stored): why a pending job is not placed yet; empty otherwise.
    pub waiting_reason: String,
    /// Live view (not stored): the latest progress of the current attempt, from rank 0.
    pub progress: Option<Box<Progress>>,
    /// Live view (not stored): the trace id of the current attempt; empty when unknown.
    pub trace_id: String,
}

impl Job {
    /// Job `id`, queued at `now` before its first attempt.
    pub fn queued(
        id: JobId,
        name: String,
        spec_toml: String,
        priority: i32,
        sequence: u64,
        resources: Resources,
        now: UnixMs,
    ) -> Self {
        Self {
            id,
            name,
            spec_toml,
            priority,
            sequence,
            submitted_at: now,
            state: JobState::Queued,
            resources,
            attempt: 0,
            counted_restarts: 0,
            failure_streak: 0,
            placement: Vec::new(),
            last_failure: None,
            latest_checkpoint: None,
            updated_at: now,
            waiting_reason: String::new(),
            progress: None,
            trace_id: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub job_id: JobId,
    pub attempt: u32,
    pub rank: u32,
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u32,
    pub loss: f64,
    pub lr: f64,
    pub d_lr: Option<f64>,
    pub steps_per_second: f64,
    pub samples_per_second: f64,
    pub gpu_memory_bytes: u64,
    pub at: UnixMs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub job_id: JobId,
    pub attempt: u32,
    pub rank: u32,
    pub stream: LogStream,
    pub text: String,
    pub at: UnixMs,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// The index put in `CUDA_VISIBLE_DEVICES`.
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_bytes: u64,
}

/// What a worker says about itself when it registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub protocol_version: u32,
    pub name: String,
    /// Only the GPUs pinned to this worker.
    pub gpus: Vec<GpuInfo>,
    pub labels: BTreeMap<String, String>,
}

/// A registered worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    pub id: WorkerId,
    pub name: String,
    pub gpus: Vec<GpuInfo>,
    pub labels: BTreeMap<String, String>,
    pub registered_at: UnixMs,
    pub last_seen: Option<UnixMs>,
    pub alive: bool,
    /// Live view (ListWorkers only): GPUs held by placed or running jobs.
    pub busy_gpus: Vec<u32>,
    /// Live view: jobs with a rank here.
    pub jobs: Vec<JobId>,
    /// Live view: shutting down, no new work.
    pub draining: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArtifactKind {
    Dataset,
    BaseModel,
    Lora,
    SampleImage,
    Checkpoint,
    /// A TensorBoard event file of the run (`logging.logging_dir`).
    TrainingLog,
}

impl ArtifactKind {
    pub const ALL: [Self; 6] = [
        Self::Dataset,
        Self::BaseModel,
        Self::Lora,
        Self::SampleImage,
        Self::Checkpoint,
        Self::TrainingLog,
    ];

    /// Its name in text protocols (`snake_case`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dataset => "dataset",
            Self::BaseModel => "base_model",
            Self::Lora => "lora",
            Self::SampleImage => "sample_image",
            Self::Checkpoint => "checkpoint",
            Self::TrainingLog => "training_log",
        }
    }

    /// The kind named `name` (as [`ArtifactKind::as_str`] writes it).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// What a training run produces (and a rank may publish), as opposed to its inputs.
    pub fn is_job_output(self) -> bool {
        !matches!(self, Self::Dataset | Self::BaseModel)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactInfo {
    pub digest: Digest,
    pub size: u64,
    pub kind: ArtifactKind,
    pub job_id: Option<JobId>,
    pub name: String,
    pub created_at: UnixMs,
}

/// One rank of one attempt of a job.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RankId {
    pub job_id: JobId,
    pub attempt: u32,
    pub rank: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RankOutcome {
    Succeeded { artifacts: Vec<Digest> },
    Failed(Failure),
}

/// What a worker sends on its session stream.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerMessage {
    /// First message of every session.
    Open {
        worker_id: WorkerId,
    },
    Heartbeat {
        running: Vec<RankId>,
        /// Shutting down: send no new work.
        draining: bool,
    },
    Progress(Progress),
    Log(LogLine),
    Started(RankId),
    Result {
        rank: RankId,
        outcome: RankOutcome,
    },
    /// A rank's collective-backend address, for the rendezvous of a multi-worker job.
    RendezvousJoin {
        rank: RankId,
        address: String,
    },
}

/// Work handed to one rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub job_id: JobId,
    pub attempt: u32,
    pub rank: u32,
    pub world_size: u32,
    /// This rank's index among the job's ranks on its worker, `0..local_world_size`.
    pub local_rank: u32,
    /// The job's ranks on this worker.
    pub local_world_size: u32,
    pub gpu_indices: Vec<u32>,
    pub spec_toml: String,
    pub resume_checkpoint: Option<Digest>,
    /// W3C `traceparent` of the attempt's span; empty when there is none.
    pub trace_parent: String,
}

/// What the coordinator sends on a worker's session stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordinatorMessage {
    Assign(Assignment),
    Stop {
        rank: RankId,
        reason: String,
    },
    /// Every rank's address (by rank) once all ranks of the attempt joined.
    Rendezvous {
        job_id: JobId,
        attempt: u32,
        addresses: Vec<String>,
    },
}

/// What a job watcher receives.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    State(Job),
    Progress(Progress),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_round_trips_through_hex() {
        let digest = Digest([0xab; 32]);
        let text = digest.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<Digest>().ok(), Some(digest));
        assert!(matches!(
            "abc".parse::<Digest>(),
            Err(Error::BadDigest { .. })
        ));
    }

    #[test]
    fn failure_kinds_are_classified() {
        use FailureKind::*;
        assert!(WorkerLost.retryable() && !WorkerLost.counts_against_restarts());
        assert!(Killed.retryable() && !Killed.counts_against_restarts());
        assert!(!BadConfig.retryable());
        assert!(TrainingError.retryable() && TrainingError.counts_against_restarts());
        assert!(Crashed.retryable() && Crashed.counts_against_restarts());

        assert_eq!(FailureKind::from_exit(Some(0), None, false), None);
        assert_eq!(FailureKind::from_exit(Some(0), None, true), None);
        // A signal nobody here sent (SIGABRT, SIGSEGV, SIGKILL of the OOM killer) is a crash.
        for signal in [6, 9, 11] {
            assert_eq!(
                FailureKind::from_exit(None, Some(signal), false),
                Some(Crashed)
            );
        }
        // After a stop the worker asked for, any ending is free.
        assert_eq!(FailureKind::from_exit(None, Some(15), true), Some(Killed));
        assert_eq!(FailureKind::from_exit(Some(1), None, true), Some(Killed));
        assert_eq!(
            FailureKind::from_exit(Some(EXIT_BAD_CONFIG), None, false),
            Some(BadConfig)
        );
        assert_eq!(
            FailureKind::from_exit(Some(1), None, false),
            Some(TrainingError)
        );
    }
}
