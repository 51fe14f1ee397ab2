//! The worker daemon's loop: register, hold one session stream to the coordinator, start a
//! rank process for every assignment and stop it when told, forward progress and logs, upload
//! announced artifacts, report each rank's result once its uploads are done, heartbeat with
//! the ranks it runs. On a lost connection it reconnects with backoff while ranks keep
//! running; if the coordinator no longer knows it, its ranks are stale: they are killed and it
//! registers again. On shutdown it stops every rank (SIGTERM, then SIGKILL after the grace),
//! reports them and exits.

use loractl_telemetry::names::{self, label};
use loractl_telemetry::{context, Recorder, TRACE_TARGET};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;
use tracing::Instrument;

use loractl_proto::domain::{
    ArtifactKind, Assignment, CoordinatorMessage, Digest, Failure, FailureKind, GpuInfo, LogLine,
    Progress, RankId, RankOutcome, Registration, WorkerId, WorkerMessage,
};
use loractl_proto::pb;
use loractl_proto::pb::worker_service_client::WorkerServiceClient;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::client::{self, Authed, Link};
use crate::config::WorkerConfig;
use crate::error::{io_error, Error, Result};
use crate::gpu;
use crate::protocol::{ChildMessage, ParentMessage, RankProgress};
use crate::rank::{self, Exit, Launch, RankEvent, RankProcess};

/// Messages kept for the coordinator while disconnected (results first of all).
const OUTBOX_LIMIT: usize = 10_000;
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

enum RankState {
    /// Downloading its resume checkpoint.
    Preparing { cancelled: bool },
    Running {
        process: RankProcess,
        exit: Option<Exit>,
    },
}

struct Rank {
    /// Its GPU indices (`0`, `0,1`) or `cpu`: the `gpu` label of its metrics.
    gpus: String,
    /// Its span in the attempt's trace, parent of preparing and uploading.
    span: tracing::Span,
    /// Spans of the phases the rank said started and not yet ended.
    phases: HashMap<String, tracing::Span>,
    state: RankState,
    uploads_in_flight: usize,
    artifacts: Vec<Digest>,
    upload_error: Option<String>,
}

enum Internal {
    Prepared {
        rank: RankId,
        result: Result<Box<Launch>>,
    },
    Uploaded {
        rank: RankId,
        result: Result<Digest>,
    },
}

struct Connection {
    worker_id: WorkerId,
    outbound: mpsc::Sender<pb::WorkerMessage>,
    inbound: tonic::Streaming<pb::CoordinatorMessage>,
    heartbeat: tokio::time::Interval,
}

pub struct Daemon {
    config: WorkerConfig,
    gpus: Vec<GpuInfo>,
    link: Link,
    worker_id: Option<WorkerId>,
    connection: Option<Connection>,
    ranks: BTreeMap<RankId, Rank>,
    outbox: VecDeque<WorkerMessage>,
    rank_tx: mpsc::Sender<(RankId, RankEvent)>,
    rank_rx: mpsc::Receiver<(RankId, RankEvent)>,
    internal_tx: mpsc::Sender<Internal>,
    internal_rx: mpsc::Receiver<Internal>,
    draining: bool,
    metrics: Recorder,
    sampler: gpu::Sampler,
    /// Ranks that ended, and when: their training series are forgotten [`METRICS_KEPT`]
    /// later.
    ended: Vec<(RankId, std::time::Instant)>,
}

/// How long the training series of an ended rank are still reported (its final loss and step
/// reach Prometheus and OTLP, whose intervals are longer than a rank's last moments).
const METRICS_KEPT: Duration = Duration::from_secs(300);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

enum ConnectionEvent {
    Message(std::result::Result<Option<pb::CoordinatorMessage>, tonic::Status>),
    Heartbeat,
}

/// The next message or heartbeat tick of the session; never resolves while disconnected.
async fn next_connection_event(connection: &mut Option<Connection>) -> ConnectionEvent {
    match connection {
        // Both are cancel safe: a message half-received stays buffered in the stream.
        Some(c) => tokio::select! {
            message = c.inbound.message() => ConnectionEvent::Message(message),
            _ = c.heartbeat.tick() => ConnectionEvent::Heartbeat,
        },
        None => std::future::pending().await,
    }
}

impl Daemon {
    /// `token` and `tls` come from [`WorkerConfig::token`] and [`WorkerConfig::client_tls`].
    pub fn new(
        config: WorkerConfig,
        gpus: Vec<GpuInfo>,
        token: Option<String>,
        tls: Option<client::ClientTls>,
    ) -> Result<Self> {
        let (rank_tx, rank_rx) = mpsc::channel(4096);
        let (internal_tx, internal_rx) = mpsc::channel(256);
        Ok(Self {
            link: Link::new(&config.coordinator, token.as_deref(), tls)?,
            config,
            gpus,
            worker_id: None,
            connection: None,
            ranks: BTreeMap::new(),
            outbox: VecDeque::new(),
            rank_tx,
            rank_rx,
            internal_tx,
            internal_rx,
            draining: false,
            metrics: Recorder::default(),
            sampler: gpu::Sampler::default(),
            ended: Vec::new(),
        })
    }

    /// Records training progress, GPU samples and uploads into `metrics` (by default into
    /// nothing).
    pub fn with_metrics(mut self, metrics: Recorder) -> Self {
        self.sampler = gpu::Sampler::open(&self.gpus);
        for kind in ArtifactKind::ALL.into_iter().filter(|k| k.is_job_output()) {
            metrics.add(
                &names::WORKER_UPLOADED_BYTES_TOTAL,
                0,
                &[
                    (label::WORKER, self.config.worker_name()),
                    (label::KIND, kind.as_str().to_owned()),
                ],
            );
        }
        self.metrics = metrics;
        self.record_worker();
        self
    }

    /// The labels of `rank`'s training metrics.
    fn rank_labels(&self, rank: &RankId) -> Vec<(&'static str, String)> {
        let gpus = self
            .ranks
            .get(rank)
            .map_or_else(|| "cpu".to_owned(), |r| r.gpus.clone());
        vec![
            (label::JOB, rank.job_id.to_string()),
            (label::ATTEMPT, rank.attempt.to_string()),
            (label::RANK, rank.rank.to_string()),
            (label::WORKER, self.config.worker_name()),
            (label::GPU, gpus),
        ]
    }

    fn record_progress(&self, rank: &RankId, p: &RankProgress) {
        let labels = self.rank_labels(rank);
        let m = &self.metrics;
        let optional = [
            (&names::TRAIN_LOSS, Some(p.loss)),
            (&names::TRAIN_LOSS_AVERAGE, p.loss_average),
            (&names::TRAIN_LOSS_EPOCH_AVERAGE, p.loss_epoch_average),
            (&names::TRAIN_STEP, Some(p.step as f64)),
            (&names::TRAIN_TOTAL_STEPS, Some(p.total_steps as f64)),
            (&names::TRAIN_EPOCH, Some(p.epoch as f64)),
            (
                &names::TRAIN_STEP_SECONDS,
                (p.steps_per_second > 0.0).then(|| 1.0 / p.steps_per_second),
            ),
            (&names::TRAIN_SAMPLES_PER_SECOND, Some(p.samples_per_second)),
            (&names::TRAIN_DATA_SECONDS, p.data_seconds),
            (&names::TRAIN_ALLREDUCE_SECONDS, p.allreduce_seconds),
        ];
        for (metric, value) in optional {
            if let Some(value) = value {
                m.set(metric, value, &labels);
            }
        }
        // Without per-group values the first group's stands for all.
        let first = |v: Option<f64>| v.map(|v| vec![("default".to_owned(), v)]);
        let groups = [
            (
                &names::TRAIN_LR,
                Some(p.lrs.clone())
                    .filter(|l| !l.is_empty())
                    .or(first(Some(p.lr))),
            ),
            (
                &names::TRAIN_D_LR,
                Some(p.d_lrs.clone())
                    .filter(|l| !l.is_empty())
                    .or(first(p.d_lr)),
            ),
        ];
        for (metric, values) in groups {
            for (group, value) in values.into_iter().flatten() {
                let mut labels = labels.clone();
                labels.push((label::GROUP, group));
                m.set(metric, value, &labels);
            }
        }
    }

    /// The worker's own gauges: ranks running, and each pinned GPU's use; ended ranks'
    /// series forgotten once kept long enough.
    fn record_worker(&mut self) {
        let metrics = self.metrics.clone();
        self.ended.retain(|(rank, at)| {
            let keep = at.elapsed() < METRICS_KEPT;
            if !keep {
                metrics.forget(&[
                    (label::JOB, rank.job_id.as_str()),
                    (label::ATTEMPT, &rank.attempt.to_string()),
                    (label::RANK, &rank.rank.to_string()),
                ]);
            }
            keep
        });
        let worker = self.config.worker_name();
        let m = &self.metrics;
        m.set(
            &names::WORKER_RANKS,
            self.ranks.len() as f64,
            &[(label::WORKER, worker.clone())],
        );
        for gpu in &self.gpus {
            let labels = [
                (label::WORKER, worker.clone()),
                (label::GPU, gpu.index.to_string()),
            ];
            let index = gpu.index.to_string();
            let assigned = self
                .ranks
                .values()
                .any(|r| r.gpus.split(',').any(|g| g == index));
            m.set(&names::GPU_ASSIGNED, f64::from(u8::from(assigned)), &labels);
            if let Some(sample) = self.sampler.sample(gpu.index) {
                for (metric, value) in [
                    (&names::GPU_MEMORY_USED_BYTES, sample.memory_used_bytes),
                    (&names::GPU_MEMORY_TOTAL_BYTES, sample.memory_total_bytes),
                    (&names::GPU_UTILIZATION_RATIO, sample.utilization),
                    (&names::GPU_TEMPERATURE_CELSIUS, sample.temperature_celsius),
                    (&names::GPU_POWER_WATTS, sample.power_watts),
                ] {
                    if let Some(value) = value {
                        m.set(metric, value, &labels);
                    }
                }
            }
        }
    }

    /// Runs until `shutdown` resolves and every rank has been stopped and reported.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        for dir in [&self.config.work_dir, &self.config.cache_dir] {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(io_error(dir))?;
        }
        tokio::pin!(shutdown);
        let mut backoff = BACKOFF_START;
        let mut retry_at = Instant::now();
        loop {
            if self.draining && self.ranks.is_empty() && self.outbox.is_empty() {
                break;
            }
            if self.connection.is_none() && Instant::now() >= retry_at {
                match self.connect().await {
                    Ok(()) => {
                        backoff = BACKOFF_START;
                        self.flush_outbox().await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "cannot reach the coordinator");
                        retry_at = Instant::now() + backoff;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        if self.draining && self.ranks.is_empty() {
                            // Nothing left to report that anyone could receive.
                            break;
                        }
                    }
                }
            }
            let disconnected = self.connection.is_none();
            let reconnect = async move {
                if disconnected {
                    tokio::time::sleep_until(retry_at).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = &mut shutdown, if !self.draining => {
                    self.drain();
                    // Tell the coordinator at once, so it sends no new work.
                    self.heartbeat().await;
                }
                event = next_connection_event(&mut self.connection) => match event {
                    ConnectionEvent::Message(Ok(Some(message))) => self.on_coordinator_message(message).await,
                    ConnectionEvent::Message(Ok(None)) => self.disconnected("the coordinator closed the session"),
                    ConnectionEvent::Message(Err(status)) => self.disconnected(&status.to_string()),
                    ConnectionEvent::Heartbeat => self.heartbeat().await,
                },
                Some((rank, event)) = self.rank_rx.recv() => self.on_rank_event(rank, event).await,
                Some(internal) = self.internal_rx.recv() => self.on_internal(internal).await,
                _ = reconnect => {}
            }
        }
        if let Some(Connection {
            outbound,
            mut inbound,
            ..
        }) = self.connection.take()
        {
            // Close our side and wait for the coordinator to close its: everything sent,
            // final results included, has then been received.
            drop(outbound);
            let closed = tokio::time::timeout(Duration::from_secs(10), async {
                while let Ok(Some(_)) = inbound.message().await {}
            })
            .await;
            if closed.is_err() {
                tracing::warn!("the coordinator did not close the session in time");
            }
        }
        tracing::info!("worker stopped");
        Ok(())
    }

    async fn connect(&mut self) -> Result<()> {
        let mut workers = self.link.workers().await?;
        // Reuse the registration after a network blip; register anew if the coordinator
        // forgot it (declared lost, or restarted without it).
        for _ in 0..2 {
            let (worker_id, interval) = match &self.worker_id {
                Some(id) => (id.clone(), None),
                None => {
                    let (id, interval) = self.register(&mut workers).await?;
                    (id, Some(interval))
                }
            };
            let (outbound, rx) = mpsc::channel(1024);
            let _ = outbound
                .send(
                    WorkerMessage::Open {
                        worker_id: worker_id.clone(),
                    }
                    .into(),
                )
                .await;
            match workers
                .session(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
            {
                Ok(response) => {
                    let period = interval.unwrap_or(Duration::from_secs(5));
                    let mut heartbeat = tokio::time::interval(period);
                    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    tracing::info!(worker = %worker_id, "session open");
                    self.connection = Some(Connection {
                        worker_id,
                        outbound,
                        inbound: response.into_inner(),
                        heartbeat,
                    });
                    return Ok(());
                }
                Err(status) if status.code() == tonic::Code::NotFound => {
                    tracing::warn!(worker = %worker_id, "the coordinator no longer knows this worker: stopping its ranks and registering again");
                    self.kill_all("the worker's registration was lost");
                    self.worker_id = None;
                }
                Err(status) => {
                    return Err(Error::Rpc {
                        call: "Session",
                        status,
                    })
                }
            }
        }
        Err(Error::Rpc {
            call: "Session",
            status: tonic::Status::not_found("registration refused twice"),
        })
    }

    async fn register(
        &mut self,
        workers: &mut WorkerServiceClient<Authed>,
    ) -> Result<(WorkerId, Duration)> {
        let registration = Registration {
            protocol_version: loractl_proto::WORKER_PROTOCOL_VERSION,
            name: self.config.worker_name(),
            gpus: self.gpus.clone(),
            labels: self.config.labels.clone(),
        };
        let response = workers
            .register(pb::RegisterRequest::from(registration))
            .await
            .map_err(|status| Error::Rpc {
                call: "Register",
                status,
            })?
            .into_inner();
        let id = WorkerId::new(response.worker_id);
        tracing::info!(worker = %id, gpus = self.gpus.len(), "registered");
        self.worker_id = Some(id.clone());
        Ok((
            id,
            Duration::from_millis(response.heartbeat_interval_ms.max(100)),
        ))
    }

    fn disconnected(&mut self, why: &str) {
        if let Some(c) = self.connection.take() {
            tracing::warn!(worker = %c.worker_id, why, "session lost; reconnecting");
        }
    }

    /// Sends now, or keeps the message for the next session. Progress and logs are only
    /// worth sending live; results are kept.
    async fn send(&mut self, message: WorkerMessage) {
        let keep = matches!(message, WorkerMessage::Result { .. });
        if let Some(c) = &self.connection {
            if c.outbound.send(message.clone().into()).await.is_ok() {
                return;
            }
            self.disconnected("session stream closed");
        }
        if keep {
            if self.outbox.len() >= OUTBOX_LIMIT {
                self.outbox.pop_front();
            }
            self.outbox.push_back(message);
        }
    }

    async fn flush_outbox(&mut self) {
        while let Some(message) = self.outbox.pop_front() {
            let Some(c) = &self.connection else {
                self.outbox.push_front(message);
                return;
            };
            if c.outbound.send(message.clone().into()).await.is_err() {
                self.outbox.push_front(message);
                self.disconnected("session stream closed");
                return;
            }
        }
    }

    async fn heartbeat(&mut self) {
        self.record_worker();
        let running = self.ranks.keys().cloned().collect();
        let draining = self.draining;
        self.send(WorkerMessage::Heartbeat { running, draining })
            .await;
    }

    async fn on_coordinator_message(&mut self, message: pb::CoordinatorMessage) {
        let message = match CoordinatorMessage::try_from(message) {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!(error = %e, "coordinator message not understood");
                return;
            }
        };
        match message {
            CoordinatorMessage::Assign(assignment) => self.assign(assignment).await,
            CoordinatorMessage::Rendezvous {
                job_id,
                attempt,
                addresses,
            } => {
                let line = ParentMessage::Peers { addresses }.to_line();
                for (id, r) in &self.ranks {
                    if id.job_id == job_id && id.attempt == attempt {
                        if let RankState::Running { process, .. } = &r.state {
                            process.tell(line.clone());
                        }
                    }
                }
            }
            CoordinatorMessage::Stop { rank, reason } => {
                tracing::info!(job = %rank.job_id, rank = rank.rank, attempt = rank.attempt, %reason, "stopping rank");
                match self.ranks.get_mut(&rank).map(|r| &mut r.state) {
                    Some(RankState::Preparing { cancelled }) => *cancelled = true,
                    Some(RankState::Running { process, .. }) => {
                        process.stop(self.config.stop_grace())
                    }
                    None => {}
                }
            }
        }
    }

    async fn assign(&mut self, assignment: Assignment) {
        let id = RankId {
            job_id: assignment.job_id.clone(),
            attempt: assignment.attempt,
            rank: assignment.rank,
        };
        if self.draining || self.ranks.contains_key(&id) {
            return;
        }
        // The job id names folders under work_dir: nothing but a plain name may pass.
        let plain = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if id.job_id.as_str().is_empty() || !id.job_id.as_str().chars().all(plain) {
            let failure = Failure {
                kind: FailureKind::BadConfig,
                message: format!("job id `{}` is not a plain name", id.job_id),
                rank: Some(id.rank),
            };
            self.send(WorkerMessage::Result {
                rank: id,
                outcome: RankOutcome::Failed(failure),
            })
            .await;
            return;
        }
        let pinned: Vec<u32> = self.gpus.iter().map(|g| g.index).collect();
        if let Some(bad) = assignment.gpu_indices.iter().find(|g| !pinned.contains(g)) {
            // Never run on a GPU this worker was not given.
            // Not a stop anyone asked for: counted, so a coordinator that keeps placing the
            // job here does not retry it for ever.
            let failure = Failure {
                kind: FailureKind::TrainingError,
                message: format!(
                    "GPU {bad} is not pinned to this worker (its `gpus` setting); restart the \
                     worker so the coordinator learns its GPUs again"
                ),
                rank: Some(id.rank),
            };
            self.send(WorkerMessage::Result {
                rank: id,
                outcome: RankOutcome::Failed(failure),
            })
            .await;
            return;
        }
        tracing::info!(job = %id.job_id, rank = id.rank, attempt = id.attempt, gpus = ?assignment.gpu_indices, "assigned");
        let gpus = if assignment.gpu_indices.is_empty() {
            "cpu".to_owned()
        } else {
            let list: Vec<String> = assignment.gpu_indices.iter().map(u32::to_string).collect();
            list.join(",")
        };
        let span = tracing::info_span!(
            target: TRACE_TARGET,
            parent: None,
            "rank",
            otel.name = %format!("rank {} on {}", id.rank, self.config.worker_name()),
            job_id = %id.job_id,
            attempt = id.attempt,
            rank = id.rank,
            gpus = %gpus,
        );
        context::set_parent(&span, &assignment.trace_parent);
        let prepare_span =
            tracing::info_span!(target: TRACE_TARGET, parent: &span, "prepare inputs");
        self.ranks.insert(
            id.clone(),
            Rank {
                gpus,
                span,
                phases: HashMap::new(),
                state: RankState::Preparing { cancelled: false },
                uploads_in_flight: 0,
                artifacts: Vec::new(),
                upload_error: None,
            },
        );
        let config = self.config.clone();
        let link = self.link.clone();
        let internal = self.internal_tx.clone();
        // The rank's memory check uses the smallest of its GPUs (simulated ones report 0).
        let gpu_memory_bytes = assignment
            .gpu_indices
            .iter()
            .filter_map(|i| self.gpus.iter().find(|g| g.index == *i))
            .map(|g| g.memory_bytes)
            .filter(|&m| m > 0)
            .min();
        tokio::spawn(async move {
            let result = prepare(&config, &link, &id, assignment)
                .instrument(prepare_span)
                .await
                .map(|launch| {
                    Box::new(Launch {
                        gpu_memory_bytes,
                        ..launch
                    })
                });
            let _ = internal.send(Internal::Prepared { rank: id, result }).await;
        });
    }

    async fn on_internal(&mut self, internal: Internal) {
        match internal {
            Internal::Prepared { rank, result } => {
                let cancelled = match self.ranks.get(&rank).map(|r| &r.state) {
                    Some(RankState::Preparing { cancelled }) => *cancelled,
                    _ => return,
                };
                let outcome = match result {
                    Ok(_) if cancelled || self.draining => Err(Failure {
                        kind: FailureKind::Killed,
                        message: "stopped before it started".into(),
                        rank: Some(rank.rank),
                    }),
                    Ok(launch) => match RankProcess::spawn(&launch, self.rank_tx.clone()) {
                        Ok(process) => Ok(process),
                        Err(e) => Err(Failure {
                            kind: FailureKind::BadConfig,
                            message: e.to_string(),
                            rank: Some(rank.rank),
                        }),
                    },
                    Err(Error::BadJob(problem)) => Err(Failure {
                        kind: FailureKind::BadConfig,
                        message: problem,
                        rank: Some(rank.rank),
                    }),
                    Err(e) => Err(Failure {
                        kind: if e.is_bad_config() {
                            FailureKind::BadConfig
                        } else {
                            FailureKind::TrainingError
                        },
                        message: format!("preparing the rank failed: {e}"),
                        rank: Some(rank.rank),
                    }),
                };
                match outcome {
                    Ok(process) => {
                        if let Some(r) = self.ranks.get_mut(&rank) {
                            r.state = RankState::Running {
                                process,
                                exit: None,
                            };
                        }
                        self.send(WorkerMessage::Started(rank)).await;
                    }
                    Err(failure) => {
                        self.ranks.remove(&rank);
                        self.send(WorkerMessage::Result {
                            rank,
                            outcome: RankOutcome::Failed(failure),
                        })
                        .await;
                    }
                }
            }
            Internal::Uploaded { rank, result } => {
                if let Some(r) = self.ranks.get_mut(&rank) {
                    r.uploads_in_flight -= 1;
                    match result {
                        Ok(digest) => r.artifacts.push(digest),
                        Err(e) => r.upload_error = Some(e.to_string()),
                    }
                }
                self.finish_if_done(&rank).await;
            }
        }
    }

    async fn on_rank_event(&mut self, rank: RankId, event: RankEvent) {
        match event {
            RankEvent::Log { stream, text } => {
                self.send(WorkerMessage::Log(LogLine {
                    job_id: rank.job_id.clone(),
                    attempt: rank.attempt,
                    rank: rank.rank,
                    stream,
                    text,
                    at: now_ms(),
                }))
                .await;
            }
            RankEvent::Message(ChildMessage::Progress(p)) => {
                self.record_progress(&rank, &p);
                self.send(WorkerMessage::Progress(Progress {
                    job_id: rank.job_id.clone(),
                    attempt: rank.attempt,
                    rank: rank.rank,
                    step: p.step,
                    total_steps: p.total_steps,
                    epoch: p.epoch,
                    loss: p.loss,
                    lr: p.lr,
                    d_lr: p.d_lr,
                    steps_per_second: p.steps_per_second,
                    samples_per_second: p.samples_per_second,
                    gpu_memory_bytes: p.gpu_memory_bytes,
                    at: now_ms(),
                }))
                .await;
            }
            RankEvent::Message(ChildMessage::Artifact { path, kind, name }) => {
                self.upload(rank, path, kind, name);
            }
            RankEvent::Message(ChildMessage::Phase { name, done }) => {
                if let Some(r) = self.ranks.get_mut(&rank) {
                    if done {
                        r.phases.remove(&name);
                    } else {
                        let span = tracing::info_span!(target: TRACE_TARGET, parent: &r.span, "phase", otel.name = %name);
                        r.phases.insert(name, span);
                    }
                }
            }
            RankEvent::Message(ChildMessage::Rendezvous { address }) => {
                self.send(WorkerMessage::RendezvousJoin { rank, address })
                    .await;
            }
            RankEvent::Exited(exit) => {
                if let Some(Rank {
                    state: RankState::Running { exit: slot, .. },
                    ..
                }) = self.ranks.get_mut(&rank)
                {
                    *slot = Some(exit);
                }
                self.finish_if_done(&rank).await;
            }
        }
    }

    fn upload(&mut self, rank: RankId, path: PathBuf, kind: ArtifactKind, name: Option<String>) {
        let Some(r) = self.ranks.get_mut(&rank) else {
            return;
        };
        let output_dir = rank::attempt_dir(&self.config.work_dir, &rank).join("output");
        let path = if path.is_absolute() {
            path
        } else {
            output_dir.join(path)
        };
        // A rank may only publish its own outputs: the file is opened here and what was
        // opened is checked, so a link swapped in later cannot publish anything else.
        let file = match open_inside(&path, &output_dir) {
            Ok(file) => file,
            Err(problem) => {
                r.upload_error = Some(problem);
                return;
            }
        };
        let Some(worker_id) = self.worker_id.clone() else {
            r.upload_error = Some("artifact announced before the worker registered".into());
            return;
        };
        let producer = client::Producer {
            worker_id,
            attempt: rank.attempt,
        };
        r.uploads_in_flight += 1;
        let name = name.unwrap_or_else(|| {
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let link = self.link.clone();
        let internal = self.internal_tx.clone();
        let metrics = self.metrics.clone();
        let worker = self.config.worker_name();
        let span = tracing::info_span!(
            target: TRACE_TARGET,
            parent: &r.span,
            "upload",
            otel.name = %format!("upload {}", kind.as_str()),
            artifact = %name,
        );
        tokio::spawn(async move {
            let result = async {
                let mut artifacts = link.artifacts().await?;
                let info = client::upload_open_file(
                    &mut artifacts,
                    tokio::fs::File::from_std(file),
                    &path,
                    kind,
                    Some(rank.job_id.clone()),
                    name,
                    Some(&producer),
                )
                .await?;
                metrics.add(
                    &names::WORKER_UPLOADED_BYTES_TOTAL,
                    info.size,
                    &[
                        (label::WORKER, worker),
                        (label::KIND, kind.as_str().to_owned()),
                    ],
                );
                if kind == ArtifactKind::Checkpoint {
                    // The coordinator holds it now (and the retry downloads it from there);
                    // each checkpoint has a file of its own, so none leaks on the worker.
                    if let Err(e) = tokio::fs::remove_file(&path).await {
                        tracing::warn!(path = %path.display(), error = %e, "uploaded checkpoint not removed");
                    }
                }
                Ok(info.digest)
            }
            .await;
            if let Err(e) = &result {
                tracing::warn!(job = %rank.job_id, error = %e, "artifact upload failed");
            }
            let _ = internal.send(Internal::Uploaded { rank, result }).await;
        }.instrument(span));
    }

    /// Reports a rank once its process exited and its uploads are done.
    async fn finish_if_done(&mut self, rank: &RankId) {
        let Some(r) = self.ranks.get(rank) else {
            return;
        };
        let RankState::Running {
            exit: Some(exit), ..
        } = &r.state
        else {
            return;
        };
        if r.uploads_in_flight > 0 {
            return;
        }
        let exit = *exit;
        // Its last values stay a while, for the next scrape and export to see them.
        self.ended.push((rank.clone(), std::time::Instant::now()));
        let Some(r) = self.ranks.remove(rank) else {
            return;
        };
        let outcome = match (exit.failure_kind(), r.upload_error) {
            (None, None) => RankOutcome::Succeeded {
                artifacts: r.artifacts,
            },
            (None, Some(problem)) => RankOutcome::Failed(Failure {
                kind: FailureKind::TrainingError,
                message: problem,
                rank: Some(rank.rank),
            }),
            (Some(kind), _) => RankOutcome::Failed(Failure {
                kind,
                message: format!("rank process {}", exit.describe()),
                rank: Some(rank.rank),
            }),
        };
        tracing::info!(job = %rank.job_id, rank = rank.rank, attempt = rank.attempt, outcome = ?outcome, "rank finished");
        self.send(WorkerMessage::Result {
            rank: rank.clone(),
            outcome,
        })
        .await;
    }

    fn drain(&mut self) {
        tracing::info!(ranks = self.ranks.len(), "shutting down: stopping ranks");
        self.draining = true;
        let grace = self.config.stop_grace();
        for r in self.ranks.values_mut() {
            match &mut r.state {
                RankState::Preparing { cancelled } => *cancelled = true,
                RankState::Running { process, .. } => process.stop(grace),
            }
        }
    }

    fn kill_all(&mut self, why: &str) {
        tracing::warn!(why, ranks = self.ranks.len(), "killing every rank");
        // Dropping a process kills its group; preparing ranks are dropped when prepared.
        self.ranks.clear();
    }
}

/// Opens `path` for reading if the file it names lies inside `root`, judged by where the
/// opened descriptor points (not by a path a rank may change after the check); the final
/// component must not be a symbolic link.
fn open_inside(
    path: &std::path::Path,
    root: &std::path::Path,
) -> std::result::Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let outside = || {
        format!(
            "artifact `{}` is outside the rank's output folder",
            path.display()
        )
    };
    let root = root.canonicalize().map_err(|_| outside())?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| format!("artifact `{}` cannot be opened: {e}", path.display()))?;
    let opened =
        std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(|_| outside())?;
    let regular = file.metadata().is_ok_and(|m| m.is_file());
    if !opened.starts_with(&root) || !regular {
        return Err(outside());
    }
    Ok(file)
}

/// Writes the rank's folder and spec (uploaded datasets fetched, paths checked, see
/// [`crate::inputs`]), and fetches its resume checkpoint.
async fn prepare(
    config: &WorkerConfig,
    link: &Link,
    rank: &RankId,
    assignment: Assignment,
) -> Result<Launch> {
    let dir = rank::attempt_dir(&config.work_dir, rank);
    let output_dir = dir.join("output");
    tokio::fs::create_dir_all(&output_dir)
        .await
        .map_err(io_error(&output_dir))?;
    let spec_path = dir.join("job.toml");
    let spec_toml =
        crate::inputs::prepare_spec(config, link, &output_dir, &assignment.spec_toml).await?;
    tokio::fs::write(&spec_path, &spec_toml)
        .await
        .map_err(io_error(&spec_path))?;
    let resume = match &assignment.resume_checkpoint {
        Some(digest) => {
            let mut artifacts = link.artifacts().await?;
            Some(client::download_to_cache(&mut artifacts, &config.cache_dir, digest).await?)
        }
        None => None,
    };
    Ok(Launch {
        command: config.rank_command_for(&assignment.gpu_indices).to_vec(),
        assignment,
        spec_path,
        output_dir,
        resume,
        model_dirs: config.model_dirs.clone(),
        data_dirs: config
            .data_dirs
            .iter()
            .cloned()
            .chain([crate::inputs::dataset_cache(config)])
            .collect(),
        ring_host: config.ring_host(),
        gpu_memory_bytes: None,
        checkpoint_every_n_steps: config.checkpoint_every_n_steps,
        collective_timeout_secs: config.collective_timeout_secs,
    })
}
