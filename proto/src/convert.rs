//! Wire <-> domain conversions, all in one place. Wire to domain is `TryFrom` and fails with a
//! [`ConvertError`] naming the field (tonic's `InvalidArgument` through `From`); domain to wire
//! is `From` and cannot fail.

use crate::domain::*;
use crate::error::ConvertError;
use crate::pb;

type Result<T> = std::result::Result<T, ConvertError>;

fn required<T>(value: Option<T>, field: &str) -> Result<T> {
    value.ok_or_else(|| ConvertError::missing(field))
}

fn non_empty(value: String, field: &str) -> Result<String> {
    if value.trim().is_empty() {
        Err(ConvertError::new(field, "empty; it is required"))
    } else {
        Ok(value)
    }
}

/// Converts a nested message, prefixing errors with the field that holds it.
fn nested<P, D>(value: Option<P>, field: &str) -> Result<D>
where
    D: TryFrom<P, Error = ConvertError>,
{
    D::try_from(required(value, field)?).map_err(|e| e.within(field))
}

fn nested_opt<P, D>(value: Option<P>, field: &str) -> Result<Option<D>>
where
    D: TryFrom<P, Error = ConvertError>,
{
    value
        .map(|v| D::try_from(v).map_err(|e| e.within(field)))
        .transpose()
}

fn nested_list<P, D>(values: Vec<P>, field: &str) -> Result<Vec<D>>
where
    D: TryFrom<P, Error = ConvertError>,
{
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| D::try_from(v).map_err(|e| e.within(&format!("{field}[{i}]"))))
        .collect()
}

pub fn job_id(value: String, field: &str) -> Result<JobId> {
    non_empty(value, field).map(JobId::new)
}

pub fn worker_id(value: String, field: &str) -> Result<WorkerId> {
    non_empty(value, field).map(WorkerId::new)
}

/// A required digest field.
pub fn digest(value: Option<pb::Digest>, field: &str) -> Result<Digest> {
    nested(value, field)
}

/// A required artifact info field.
pub fn artifact_info(value: Option<pb::ArtifactInfo>, field: &str) -> Result<ArtifactInfo> {
    nested(value, field)
}

impl TryFrom<pb::Digest> for Digest {
    type Error = ConvertError;

    fn try_from(value: pb::Digest) -> Result<Self> {
        let bytes: [u8; 32] = value.sha256.as_slice().try_into().map_err(|_| {
            ConvertError::new(
                "sha256",
                format!("{} bytes; a sha256 digest is 32", value.sha256.len()),
            )
        })?;
        Ok(Self(bytes))
    }
}

impl From<Digest> for pb::Digest {
    fn from(value: Digest) -> Self {
        Self {
            sha256: value.0.to_vec(),
        }
    }
}

macro_rules! enum_conversions {
    ($domain:ident, $wire:ident, $fn_name:ident, [$($d:ident <=> $w:ident),* $(,)?]) => {
        /// Reads an enum field, refusing unknown values and `UNSPECIFIED`.
        pub fn $fn_name(raw: i32, field: &str) -> Result<$domain> {
            match pb::$wire::try_from(raw) {
                $(Ok(pb::$wire::$w) => Ok($domain::$d),)*
                Ok(pb::$wire::Unspecified) => Err(ConvertError::new(field, "unspecified; it is required")),
                Err(_) => Err(ConvertError::new(field, format!("unknown value {raw}"))),
            }
        }

        impl From<$domain> for pb::$wire {
            fn from(value: $domain) -> Self {
                match value {
                    $($domain::$d => pb::$wire::$w,)*
                }
            }
        }
    };
}

enum_conversions!(JobState, JobState, job_state, [
    Queued <=> Queued,
    Placed <=> Placed,
    Running <=> Running,
    Restarting <=> Restarting,
    Succeeded <=> Succeeded,
    Failed <=> Failed,
    Cancelled <=> Cancelled,
]);

enum_conversions!(FailureKind, FailureKind, failure_kind, [
    WorkerLost <=> WorkerLost,
    Killed <=> Killed,
    BadConfig <=> BadConfig,
    TrainingError <=> TrainingError,
    Crashed <=> Crashed,
]);

enum_conversions!(LogStream, LogStream, log_stream, [
    Stdout <=> Stdout,
    Stderr <=> Stderr,
]);

enum_conversions!(ArtifactKind, ArtifactKind, artifact_kind, [
    Dataset <=> Dataset,
    BaseModel <=> BaseModel,
    Lora <=> Lora,
    SampleImage <=> SampleImage,
    Checkpoint <=> Checkpoint,
    TrainingLog <=> TrainingLog,
]);

impl TryFrom<pb::Failure> for Failure {
    type Error = ConvertError;

    fn try_from(value: pb::Failure) -> Result<Self> {
        Ok(Self {
            kind: failure_kind(value.kind, "kind")?,
            message: value.message,
            rank: value.rank,
        })
    }
}

impl From<Failure> for pb::Failure {
    fn from(value: Failure) -> Self {
        Self {
            kind: pb::FailureKind::from(value.kind).into(),
            message: value.message,
            rank: value.rank,
        }
    }
}

impl TryFrom<pb::GpuRequest> for GpuRequest {
    type Error = ConvertError;

    fn try_from(value: pb::GpuRequest) -> Result<Self> {
        use pb::gpu_request::Request;
        match required(value.request, "request")? {
            Request::Cpu(_) => Ok(Self::Cpu),
            Request::All(_) => Ok(Self::All),
            Request::Ids(ids) => {
                if ids.ids.is_empty() {
                    return Err(ConvertError::new(
                        "ids",
                        "empty; list at least one GPU index, or ask for `all` or `cpu`",
                    ));
                }
                let mut seen = ids.ids.clone();
                seen.sort_unstable();
                if seen.windows(2).any(|w| w[0] == w[1]) {
                    return Err(ConvertError::new("ids", "lists a GPU index twice"));
                }
                Ok(Self::Ids(ids.ids))
            }
        }
    }
}

impl From<GpuRequest> for pb::GpuRequest {
    fn from(value: GpuRequest) -> Self {
        use pb::gpu_request::Request;
        let request = match value {
            GpuRequest::Cpu => Request::Cpu(true),
            GpuRequest::All => Request::All(true),
            GpuRequest::Ids(ids) => Request::Ids(pb::GpuIds { ids }),
        };
        Self {
            request: Some(request),
        }
    }
}

impl TryFrom<pb::Resources> for Resources {
    type Error = ConvertError;

    fn try_from(value: pb::Resources) -> Result<Self> {
        if value.workers == 0 {
            return Err(ConvertError::new("workers", "0; a job needs at least 1"));
        }
        Ok(Self {
            workers: value.workers,
            gpus: nested(value.gpus, "gpus")?,
            max_restarts: value.max_restarts,
            // Jobs stored before the field existed ran one rank per worker.
            ranks_per_worker: value.ranks_per_worker.max(1),
        })
    }
}

impl From<Resources> for pb::Resources {
    fn from(value: Resources) -> Self {
        Self {
            workers: value.workers,
            gpus: Some(value.gpus.into()),
            max_restarts: value.max_restarts,
            ranks_per_worker: value.ranks_per_worker,
        }
    }
}

impl TryFrom<pb::RankPlacement> for RankPlacement {
    type Error = ConvertError;

    fn try_from(value: pb::RankPlacement) -> Result<Self> {
        Ok(Self {
            rank: value.rank,
            worker_id: worker_id(value.worker_id, "worker_id")?,
            gpu_indices: value.gpu_indices,
        })
    }
}

impl From<RankPlacement> for pb::RankPlacement {
    fn from(value: RankPlacement) -> Self {
        Self {
            rank: value.rank,
            worker_id: value.worker_id.to_string(),
            gpu_indices: value.gpu_indices,
        }
    }
}

impl TryFrom<pb::Job> for Job {
    type Error = ConvertError;

    fn try_from(value: pb::Job) -> Result<Self> {
        Ok(Self {
            id: job_id(value.id, "id")?,
            name: value.name,
            spec_toml: value.spec_toml,
            priority: value.priority,
            sequence: value.sequence,
            submitted_at: value.submitted_at_unix_ms,
            state: job_state(value.state, "state")?,
            resources: nested(value.resources, "resources")?,
            attempt: value.attempt,
            counted_restarts: value.counted_restarts,
            failure_streak: value.failure_streak,
            placement: nested_list(value.placement, "placement")?,
            last_failure: nested_opt(value.last_failure, "last_failure")?,
            latest_checkpoint: nested_opt(value.latest_checkpoint, "latest_checkpoint")?,
            updated_at: value.updated_at_unix_ms,
            waiting_reason: value.waiting_reason,
            progress: nested_opt::<_, Progress>(value.progress, "progress")?.map(Box::new),
            trace_id: value.trace_id,
        })
    }
}

impl From<Job> for pb::Job {
    fn from(value: Job) -> Self {
        Self {
            id: value.id.to_string(),
            name: value.name,
            spec_toml: value.spec_toml,
            priority: value.priority,
            sequence: value.sequence,
            submitted_at_unix_ms: value.submitted_at,
            state: pb::JobState::from(value.state).into(),
            resources: Some(value.resources.into()),
            attempt: value.attempt,
            counted_restarts: value.counted_restarts,
            failure_streak: value.failure_streak,
            placement: value.placement.into_iter().map(Into::into).collect(),
            last_failure: value.last_failure.map(Into::into),
            latest_checkpoint: value.latest_checkpoint.map(Into::into),
            updated_at_unix_ms: value.updated_at,
            waiting_reason: value.waiting_reason,
            progress: value.progress.map(|p| (*p).into()),
            trace_id: value.trace_id,
        }
    }
}

impl TryFrom<pb::Progress> for Progress {
    type Error = ConvertError;

    fn try_from(value: pb::Progress) -> Result<Self> {
        Ok(Self {
            job_id: job_id(value.job_id, "job_id")?,
            attempt: value.attempt,
            rank: value.rank,
            step: value.step,
            total_steps: value.total_steps,
            epoch: value.epoch,
            loss: value.loss,
            lr: value.lr,
            d_lr: value.d_lr,
            steps_per_second: value.steps_per_second,
            samples_per_second: value.samples_per_second,
            gpu_memory_bytes: value.gpu_memory_bytes,
            at: value.unix_ms,
        })
    }
}

impl From<Progress> for pb::Progress {
    fn from(value: Progress) -> Self {
        Self {
            job_id: value.job_id.to_string(),
            attempt: value.attempt,
            rank: value.rank,
            step: value.step,
            total_steps: value.total_steps,
            epoch: value.epoch,
            loss: value.loss,
            lr: value.lr,
            d_lr: value.d_lr,
            steps_per_second: value.steps_per_second,
            samples_per_second: value.samples_per_second,
            gpu_memory_bytes: value.gpu_memory_bytes,
            unix_ms: value.at,
        }
    }
}

impl TryFrom<pb::LogLine> for LogLine {
    type Error = ConvertError;

    fn try_from(value: pb::LogLine) -> Result<Self> {
        Ok(Self {
            job_id: job_id(value.job_id, "job_id")?,
            attempt: value.attempt,
            rank: value.rank,
            stream: log_stream(value.stream, "stream")?,
            text: value.text,
            at: value.unix_ms,
        })
    }
}

impl From<LogLine> for pb::LogLine {
    fn from(value: LogLine) -> Self {
        Self {
            job_id: value.job_id.to_string(),
            attempt: value.attempt,
            rank: value.rank,
            stream: pb::LogStream::from(value.stream).into(),
            text: value.text,
            unix_ms: value.at,
        }
    }
}

impl TryFrom<pb::GpuInfo> for GpuInfo {
    type Error = ConvertError;

    fn try_from(value: pb::GpuInfo) -> Result<Self> {
        Ok(Self {
            index: value.index,
            uuid: value.uuid,
            name: value.name,
            memory_bytes: value.memory_bytes,
        })
    }
}

impl From<GpuInfo> for pb::GpuInfo {
    fn from(value: GpuInfo) -> Self {
        Self {
            index: value.index,
            uuid: value.uuid,
            name: value.name,
            memory_bytes: value.memory_bytes,
        }
    }
}

impl TryFrom<pb::RegisterRequest> for Registration {
    type Error = ConvertError;

    fn try_from(value: pb::RegisterRequest) -> Result<Self> {
        let gpus: Vec<GpuInfo> = nested_list(value.gpus, "gpus")?;
        let mut indices: Vec<u32> = gpus.iter().map(|g| g.index).collect();
        indices.sort_unstable();
        if indices.windows(2).any(|w| w[0] == w[1]) {
            return Err(ConvertError::new("gpus", "lists a GPU index twice"));
        }
        Ok(Self {
            protocol_version: value.protocol_version,
            name: non_empty(value.name, "name")?,
            gpus,
            labels: value.labels.into_iter().collect(),
        })
    }
}

impl From<Registration> for pb::RegisterRequest {
    fn from(value: Registration) -> Self {
        Self {
            protocol_version: value.protocol_version,
            name: value.name,
            gpus: value.gpus.into_iter().map(Into::into).collect(),
            labels: value.labels.into_iter().collect(),
        }
    }
}

impl TryFrom<pb::Worker> for Worker {
    type Error = ConvertError;

    fn try_from(value: pb::Worker) -> Result<Self> {
        Ok(Self {
            id: worker_id(value.id, "id")?,
            name: non_empty(value.name, "name")?,
            gpus: nested_list(value.gpus, "gpus")?,
            labels: value.labels.into_iter().collect(),
            registered_at: value.registered_at_unix_ms,
            last_seen: value.last_seen_unix_ms,
            alive: value.alive,
            busy_gpus: value.busy_gpu_indices,
            jobs: value
                .job_ids
                .into_iter()
                .enumerate()
                .map(|(i, id)| job_id(id, &format!("job_ids[{i}]")))
                .collect::<Result<_>>()?,
            draining: value.draining,
        })
    }
}

impl From<Worker> for pb::Worker {
    fn from(value: Worker) -> Self {
        Self {
            id: value.id.to_string(),
            name: value.name,
            gpus: value.gpus.into_iter().map(Into::into).collect(),
            labels: value.labels.into_iter().collect(),
            registered_at_unix_ms: value.registered_at,
            last_seen_unix_ms: value.last_seen,
            alive: value.alive,
            busy_gpu_indices: value.busy_gpus,
            job_ids: value.jobs.into_iter().map(|id| id.to_string()).collect(),
            draining: value.draining,
        }
    }
}

impl TryFrom<pb::ArtifactInfo> for ArtifactInfo {
    type Error = ConvertError;

    fn try_from(value: pb::ArtifactInfo) -> Result<Self> {
        Ok(Self {
            digest: digest(value.digest, "digest")?,
            size: value.size,
            kind: artifact_kind(value.kind, "kind")?,
            job_id: (!value.job_id.is_empty()).then(|| JobId::new(value.job_id)),
            name: value.name,
            created_at: value.created_at_unix_ms,
        })
    }
}

impl From<ArtifactInfo> for pb::ArtifactInfo {
    fn from(value: ArtifactInfo) -> Self {
        Self {
            digest: Some(value.digest.into()),
            size: value.size,
            kind: pb::ArtifactKind::from(value.kind).into(),
            job_id: value.job_id.map(|id| id.to_string()).unwrap_or_default(),
            name: value.name,
            created_at_unix_ms: value.created_at,
        }
    }
}

impl TryFrom<pb::RankId> for RankId {
    type Error = ConvertError;

    fn try_from(value: pb::RankId) -> Result<Self> {
        Ok(Self {
            job_id: job_id(value.job_id, "job_id")?,
            attempt: value.attempt,
            rank: value.rank,
        })
    }
}

impl From<RankId> for pb::RankId {
    fn from(value: RankId) -> Self {
        Self {
            job_id: value.job_id.to_string(),
            attempt: value.attempt,
            rank: value.rank,
        }
    }
}

impl TryFrom<pb::WorkerMessage> for WorkerMessage {
    type Error = ConvertError;

    fn try_from(value: pb::WorkerMessage) -> Result<Self> {
        use pb::worker_message::Message;
        Ok(match required(value.message, "message")? {
            Message::Open(open) => Self::Open {
                worker_id: worker_id(open.worker_id, "open.worker_id")?,
            },
            Message::Heartbeat(beat) => Self::Heartbeat {
                running: nested_list(beat.running, "heartbeat.running")?,
                draining: beat.draining,
            },
            Message::Progress(p) => {
                Self::Progress(Progress::try_from(p).map_err(|e| e.within("progress"))?)
            }
            Message::Log(line) => Self::Log(LogLine::try_from(line).map_err(|e| e.within("log"))?),
            Message::Started(started) => Self::Started(nested(started.rank, "started.rank")?),
            Message::Result(result) => {
                use pb::rank_result::Outcome;
                let rank = nested(result.rank, "result.rank")?;
                let outcome = match required(result.outcome, "result.outcome")? {
                    Outcome::Succeeded(ok) => RankOutcome::Succeeded {
                        artifacts: nested_list(ok.artifacts, "result.succeeded.artifacts")?,
                    },
                    Outcome::Failed(failure) => RankOutcome::Failed(
                        Failure::try_from(failure).map_err(|e| e.within("result.failed"))?,
                    ),
                };
                Self::Result { rank, outcome }
            }
            Message::Join(join) => Self::RendezvousJoin {
                rank: nested(join.rank, "join.rank")?,
                address: non_empty(join.address, "join.address")?,
            },
        })
    }
}

impl From<WorkerMessage> for pb::WorkerMessage {
    fn from(value: WorkerMessage) -> Self {
        use pb::worker_message::Message;
        let message = match value {
            WorkerMessage::Open { worker_id } => Message::Open(pb::SessionOpen {
                worker_id: worker_id.to_string(),
            }),
            WorkerMessage::Heartbeat { running, draining } => Message::Heartbeat(pb::Heartbeat {
                running: running.into_iter().map(Into::into).collect(),
                draining,
            }),
            WorkerMessage::Progress(p) => Message::Progress(p.into()),
            WorkerMessage::Log(line) => Message::Log(line.into()),
            WorkerMessage::Started(rank) => Message::Started(pb::RankStarted {
                rank: Some(rank.into()),
            }),
            WorkerMessage::Result { rank, outcome } => {
                use pb::rank_result::Outcome;
                let outcome = match outcome {
                    RankOutcome::Succeeded { artifacts } => Outcome::Succeeded(pb::RankSucceeded {
                        artifacts: artifacts.into_iter().map(Into::into).collect(),
                    }),
                    RankOutcome::Failed(failure) => Outcome::Failed(failure.into()),
                };
                Message::Result(pb::RankResult {
                    rank: Some(rank.into()),
                    outcome: Some(outcome),
                })
            }
            WorkerMessage::RendezvousJoin { rank, address } => Message::Join(pb::RendezvousJoin {
                rank: Some(rank.into()),
                address,
            }),
        };
        Self {
            message: Some(message),
        }
    }
}

impl TryFrom<pb::Assignment> for Assignment {
    type Error = ConvertError;

    fn try_from(value: pb::Assignment) -> Result<Self> {
        if value.world_size == 0 || value.rank >= value.world_size {
            return Err(ConvertError::new(
                "rank",
                format!(
                    "rank {} does not fit world_size {}",
                    value.rank, value.world_size
                ),
            ));
        }
        // A coordinator older than local ranks sends neither: one rank on the worker.
        let local_world_size = value.local_world_size.max(1);
        if value.local_rank >= local_world_size || local_world_size > value.world_size {
            return Err(ConvertError::new(
                "local_rank",
                format!(
                    "local rank {} of {} does not fit world_size {}",
                    value.local_rank, local_world_size, value.world_size
                ),
            ));
        }
        Ok(Self {
            job_id: job_id(value.job_id, "job_id")?,
            attempt: value.attempt,
            rank: value.rank,
            world_size: value.world_size,
            local_rank: value.local_rank,
            local_world_size,
            gpu_indices: value.gpu_indices,
            spec_toml: non_empty(value.spec_toml, "spec_toml")?,
            resume_checkpoint: nested_opt(value.resume_checkpoint, "resume_checkpoint")?,
            trace_parent: value.trace_parent,
        })
    }
}

impl From<Assignment> for pb::Assignment {
    fn from(value: Assignment) -> Self {
        Self {
            job_id: value.job_id.to_string(),
            attempt: value.attempt,
            rank: value.rank,
            world_size: value.world_size,
            local_rank: value.local_rank,
            local_world_size: value.local_world_size,
            gpu_indices: value.gpu_indices,
            spec_toml: value.spec_toml,
            resume_checkpoint: value.resume_checkpoint.map(Into::into),
            trace_parent: value.trace_parent,
        }
    }
}

impl TryFrom<pb::CoordinatorMessage> for CoordinatorMessage {
    type Error = ConvertError;

    fn try_from(value: pb::CoordinatorMessage) -> Result<Self> {
        use pb::coordinator_message::Message;
        Ok(match required(value.message, "message")? {
            Message::Assign(a) => {
                Self::Assign(Assignment::try_from(a).map_err(|e| e.within("assign"))?)
            }
            Message::Stop(stop) => Self::Stop {
                rank: nested(stop.rank, "stop.rank")?,
                reason: stop.reason,
            },
            Message::Rendezvous(r) => Self::Rendezvous {
                job_id: job_id(r.job_id, "rendezvous.job_id")?,
                attempt: r.attempt,
                addresses: r.addresses,
            },
        })
    }
}

impl From<CoordinatorMessage> for pb::CoordinatorMessage {
    fn from(value: CoordinatorMessage) -> Self {
        use pb::coordinator_message::Message;
        let message = match value {
            CoordinatorMessage::Assign(a) => Message::Assign(a.into()),
            CoordinatorMessage::Stop { rank, reason } => Message::Stop(pb::StopRank {
                rank: Some(rank.into()),
                reason,
            }),
            CoordinatorMessage::Rendezvous {
                job_id,
                attempt,
                addresses,
            } => Message::Rendezvous(pb::Rendezvous {
                job_id: job_id.to_string(),
                attempt,
                addresses,
            }),
        };
        Self {
            message: Some(message),
        }
    }
}

impl TryFrom<pb::JobEvent> for JobEvent {
    type Error = ConvertError;

    fn try_from(value: pb::JobEvent) -> Result<Self> {
        use pb::job_event::Event;
        Ok(match required(value.event, "event")? {
            Event::State(job) => Self::State(Job::try_from(job).map_err(|e| e.within("state"))?),
            Event::Progress(p) => {
                Self::Progress(Progress::try_from(p).map_err(|e| e.within("progress"))?)
            }
        })
    }
}

impl From<JobEvent> for pb::JobEvent {
    fn from(value: JobEvent) -> Self {
        use pb::job_event::Event;
        Self {
            event: Some(match value {
                JobEvent::State(job) => Event::State(job.into()),
                JobEvent::Progress(p) => Event::Progress(p.into()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        Job {
            id: JobId::new("j1"),
            name: "zenny".into(),
            spec_toml: "name = \"zenny\"".into(),
            priority: 5,
            sequence: 1,
            submitted_at: 1_700_000_000_000,
            state: JobState::Running,
            resources: Resources {
                workers: 2,
                gpus: GpuRequest::Ids(vec![0, 2]),
                max_restarts: 3,
                ranks_per_worker: 1,
            },
            attempt: 1,
            counted_restarts: 0,
            failure_streak: 0,
            placement: vec![RankPlacement {
                rank: 0,
                worker_id: WorkerId::new("w1"),
                gpu_indices: vec![0, 2],
            }],
            last_failure: Some(Failure {
                kind: FailureKind::WorkerLost,
                message: "no heartbeat for 30s".into(),
                rank: None,
            }),
            latest_checkpoint: Some(Digest([7; 32])),
            updated_at: 1_700_000_000_500,
            waiting_reason: String::new(),
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            progress: None,
        }
    }

    #[test]
    fn job_round_trips() {
        let wire = pb::Job::from(job());
        assert_eq!(Job::try_from(wire), Ok(job()));
    }

    #[test]
    fn missing_nested_field_is_named() {
        let mut wire = pb::Job::from(job());
        wire.resources = None;
        let err = Job::try_from(wire).unwrap_err();
        assert_eq!(err.field, "resources");

        let mut wire = pb::Job::from(job());
        if let Some(r) = wire.resources.as_mut() {
            r.gpus = Some(pb::GpuRequest { request: None });
        }
        let err = Job::try_from(wire).unwrap_err();
        assert_eq!(err.field, "resources.gpus.request");
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("resources.gpus.request"));
    }

    #[test]
    fn invalid_values_are_named() {
        let mut wire = pb::Job::from(job());
        wire.state = 0;
        assert_eq!(Job::try_from(wire).unwrap_err().field, "state");

        let mut wire = pb::Job::from(job());
        wire.state = 99;
        let err = Job::try_from(wire).unwrap_err();
        assert_eq!(err.field, "state");
        assert!(err.problem.contains("99"));

        let mut wire = pb::Job::from(job());
        wire.latest_checkpoint = Some(pb::Digest {
            sha256: vec![1, 2, 3],
        });
        assert_eq!(
            Job::try_from(wire).unwrap_err().field,
            "latest_checkpoint.sha256"
        );

        let mut wire = pb::Job::from(job());
        wire.placement[0].worker_id.clear();
        assert_eq!(
            Job::try_from(wire).unwrap_err().field,
            "placement[0].worker_id"
        );

        let mut wire = pb::Job::from(job());
        if let Some(r) = wire.resources.as_mut() {
            r.gpus = Some(pb::GpuRequest::from(GpuRequest::Ids(vec![1, 1])));
        }
        assert_eq!(Job::try_from(wire).unwrap_err().field, "resources.gpus.ids");
    }

    #[test]
    fn worker_messages_round_trip() {
        let rank = RankId {
            job_id: JobId::new("j1"),
            attempt: 0,
            rank: 1,
        };
        let messages = vec![
            WorkerMessage::Open {
                worker_id: WorkerId::new("w1"),
            },
            WorkerMessage::Heartbeat {
                running: vec![rank.clone()],
                draining: true,
            },
            WorkerMessage::Started(rank.clone()),
            WorkerMessage::RendezvousJoin {
                rank: rank.clone(),
                address: "10.0.0.2:41000".into(),
            },
            WorkerMessage::Result {
                rank: rank.clone(),
                outcome: RankOutcome::Failed(Failure {
                    kind: FailureKind::TrainingError,
                    message: "loss is NaN at step 12".into(),
                    rank: Some(1),
                }),
            },
            WorkerMessage::Result {
                rank,
                outcome: RankOutcome::Succeeded {
                    artifacts: vec![Digest([1; 32])],
                },
            },
        ];
        for message in messages {
            let wire = pb::WorkerMessage::from(message.clone());
            assert_eq!(WorkerMessage::try_from(wire), Ok(message));
        }
        let err = WorkerMessage::try_from(pb::WorkerMessage { message: None }).unwrap_err();
        assert_eq!(err.field, "message");
        let err = WorkerMessage::try_from(pb::WorkerMessage {
            message: Some(pb::worker_message::Message::Result(pb::RankResult {
                rank: None,
                outcome: None,
            })),
        })
        .unwrap_err();
        assert_eq!(err.field, "result.rank");
    }

    #[test]
    fn assignment_checks_rank_against_world_size() {
        let assignment = Assignment {
            job_id: JobId::new("j1"),
            attempt: 0,
            rank: 1,
            world_size: 2,
            local_rank: 1,
            local_world_size: 2,
            gpu_indices: vec![3],
            spec_toml: "name = \"x\"".into(),
            resume_checkpoint: None,
            trace_parent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        };
        let message = CoordinatorMessage::Assign(assignment.clone());
        assert_eq!(
            CoordinatorMessage::try_from(pb::CoordinatorMessage::from(message.clone())),
            Ok(message)
        );
        let meet = CoordinatorMessage::Rendezvous {
            job_id: JobId::new("j1"),
            attempt: 0,
            addresses: vec!["10.0.0.1:4000".into(), "10.0.0.2:4000".into()],
        };
        assert_eq!(
            CoordinatorMessage::try_from(pb::CoordinatorMessage::from(meet.clone())),
            Ok(meet)
        );
        let mut wire = pb::Assignment::from(assignment);
        wire.rank = 2;
        assert_eq!(
            Assignment::try_from(wire.clone()).unwrap_err().field,
            "rank"
        );
        wire.rank = 1;
        wire.local_rank = 2;
        assert_eq!(
            Assignment::try_from(wire.clone()).unwrap_err().field,
            "local_rank"
        );
        // An assignment without local ranks is one rank on its worker.
        wire.local_rank = 0;
        wire.local_world_size = 0;
        assert_eq!(Assignment::try_from(wire).unwrap().local_world_size, 1);
    }

    #[test]
    fn registration_requires_a_name_and_distinct_gpus() {
        let gpu = |index| pb::GpuInfo {
            index,
            uuid: format!("GPU-{index}"),
            name: "NVIDIA H100".into(),
            memory_bytes: 80 << 30,
        };
        let request = pb::RegisterRequest {
            protocol_version: crate::WORKER_PROTOCOL_VERSION,
            name: "box-1".into(),
            gpus: vec![gpu(0), gpu(1)],
            labels: [("zone".to_owned(), "a".to_owned())].into(),
        };
        let registration = Registration::try_from(request.clone()).unwrap();
        assert_eq!(registration.gpus.len(), 2);
        assert_eq!(registration.labels["zone"], "a");

        let mut bad = request.clone();
        bad.name = " ".into();
        assert_eq!(Registration::try_from(bad).unwrap_err().field, "name");
        let mut bad = request;
        bad.gpus = vec![gpu(1), gpu(1)];
        assert_eq!(Registration::try_from(bad).unwrap_err().field, "gpus");
    }

    #[test]
    fn artifact_info_round_trips_with_and_without_job() {
        for job_id in [None, Some(JobId::new("j3"))] {
            let info = ArtifactInfo {
                digest: Digest([9; 32]),
                size: 1234,
                kind: ArtifactKind::Checkpoint,
                job_id,
                name: "zenny-step00000100.ckpt".into(),
                created_at: 5,
            };
            assert_eq!(
                ArtifactInfo::try_from(pb::ArtifactInfo::from(info.clone())),
                Ok(info)
            );
        }
    }
}
