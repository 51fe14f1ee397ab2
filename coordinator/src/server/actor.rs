//! The coordinator's event loop: the one owner of mutable state. gRPC handlers post an
//! [`Event`] through a [`Handle`] and await the reply; the loop applies events one at a time
//! (store writes included), runs a placement round after every change that can free or need
//! resources, and on a timer declares silent workers lost.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use loractl_proto::domain::{
    Assignment, CoordinatorMessage, Digest, Failure, FailureKind, Job, JobEvent, JobId, JobState,
    LogLine, Progress, RankId, RankOutcome, Registration, Worker, WorkerId, WorkerMessage,
};
use loractl_spec::JobSpec;
use loractl_telemetry::Recorder;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};

use super::metrics::ClusterMetrics;
use super::registry::Registry;
use super::traces::Traces;
use crate::error::{Error, Result};
use crate::job::{self, Transition};
use crate::logs::LogFiles;
use crate::placement::{self, JobRequest, Placement, Policy, WorkerSlots};
use crate::state::{NewJob, State};
use crate::store::Store;

/// Behaviour of the coordinator loop.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Workers are asked to send a heartbeat this often.
    pub heartbeat_interval: Duration,
    /// A worker silent for longer is declared lost and its jobs are retried elsewhere.
    pub heartbeat_timeout: Duration,
    /// CPU ranks one worker runs at once.
    pub cpu_slots: u32,
    pub policy: Policy,
    /// Log lines kept per job for `GetLogs`.
    pub log_lines_per_job: usize,
    /// Ended jobs whose log lines stay in memory (older ones are dropped).
    pub ended_jobs_with_logs: usize,
    /// How long the ranks of a multi-worker attempt may take to all join the rendezvous
    /// before the attempt fails.
    pub rendezvous_timeout: Duration,
    /// Where the cluster's metrics go (jobs and workers by state, queue wait, restarts).
    pub metrics: Recorder,
    /// Folder of the job logs on disk (kept across restarts); `None`: in memory only.
    /// [`super::serve`] puts them under the artifact folder unless set.
    pub log_dir: Option<std::path::PathBuf>,
    /// Bytes of log a job keeps on disk (up to twice this, the latest lines).
    pub log_bytes_per_job: u64,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        use crate::standalone::defaults;
        Self {
            heartbeat_interval: Duration::from_secs(defaults::HEARTBEAT_INTERVAL_SECS),
            heartbeat_timeout: Duration::from_secs(defaults::HEARTBEAT_TIMEOUT_SECS),
            cpu_slots: defaults::CPU_SLOTS,
            policy: Policy::default(),
            log_lines_per_job: defaults::LOG_LINES_PER_JOB,
            ended_jobs_with_logs: defaults::ENDED_JOBS_WITH_LOGS,
            rendezvous_timeout: Duration::from_secs(defaults::RENDEZVOUS_TIMEOUT_SECS),
            metrics: Recorder::default(),
            log_dir: None,
            log_bytes_per_job: defaults::LOG_BYTES_PER_JOB,
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T>>;

/// What a registered worker is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub worker_id: WorkerId,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
}

/// An open session: messages for the worker arrive on `messages`; `id` tells this session
/// apart from an earlier or later one of the same worker.
pub struct Session {
    pub id: u64,
    pub messages: mpsc::Receiver<CoordinatorMessage>,
}

/// A watcher's starting point and its feed.
pub struct Watch {
    pub job: Job,
    /// `None` when the job has already ended.
    pub events: Option<broadcast::Receiver<JobEvent>>,
}

pub struct Logs {
    pub lines: Vec<LogLine>,
    pub follow: Option<broadcast::Receiver<LogLine>>,
}

pub enum Event {
    Submit {
        spec_toml: String,
        priority: i32,
        reply: Reply<(Job, Vec<String>)>,
    },
    Get {
        id: JobId,
        reply: Reply<Job>,
    },
    List {
        states: Vec<JobState>,
        reply: Reply<Vec<Job>>,
    },
    Cancel {
        id: JobId,
        reply: Reply<Job>,
    },
    Watch {
        id: JobId,
        reply: Reply<Watch>,
    },
    Logs {
        id: JobId,
        follow: bool,
        reply: Reply<Logs>,
    },
    ListWorkers {
        reply: Reply<Vec<Worker>>,
    },
    Register {
        registration: Registration,
        reply: Reply<Registered>,
    },
    OpenSession {
        worker_id: WorkerId,
        reply: Reply<Session>,
    },
    FromWorker {
        worker_id: WorkerId,
        session: u64,
        message: WorkerMessage,
    },
    SessionClosed {
        worker_id: WorkerId,
        session: u64,
    },
    /// May this worker upload outputs of this attempt of the job?
    AuthorizeOutput {
        job: JobId,
        worker_id: WorkerId,
        attempt: u32,
        reply: Reply<()>,
    },
    CheckpointStored {
        job: JobId,
        digest: Digest,
        worker_id: WorkerId,
        attempt: u32,
    },
    /// Ends every open stream (worker sessions, watches, followed logs) so that a graceful
    /// server shutdown does not wait on them.
    CloseStreams,
}

/// Posts events to the loop. Cheap to clone; the loop ends when every handle is dropped.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Event>,
}

impl Handle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Event) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    async fn post(&self, event: Event) -> Result<()> {
        self.tx.send(event).await.map_err(|_| Error::ShuttingDown)
    }

    pub async fn submit(&self, spec_toml: String, priority: i32) -> Result<(Job, Vec<String>)> {
        self.call(|reply| Event::Submit {
            spec_toml,
            priority,
            reply,
        })
        .await
    }

    pub async fn get(&self, id: JobId) -> Result<Job> {
        self.call(|reply| Event::Get { id, reply }).await
    }

    pub async fn list(&self, states: Vec<JobState>) -> Result<Vec<Job>> {
        self.call(|reply| Event::List { states, reply }).await
    }

    pub async fn cancel(&self, id: JobId) -> Result<Job> {
        self.call(|reply| Event::Cancel { id, reply }).await
    }

    pub async fn watch(&self, id: JobId) -> Result<Watch> {
        self.call(|reply| Event::Watch { id, reply }).await
    }

    pub async fn logs(&self, id: JobId, follow: bool) -> Result<Logs> {
        self.call(|reply| Event::Logs { id, follow, reply }).await
    }

    pub async fn workers(&self) -> Result<Vec<Worker>> {
        self.call(|reply| Event::ListWorkers { reply }).await
    }

    pub async fn register(&self, registration: Registration) -> Result<Registered> {
        self.call(|reply| Event::Register {
            registration,
            reply,
        })
        .await
    }

    pub async fn open_session(&self, worker_id: WorkerId) -> Result<Session> {
        self.call(|reply| Event::OpenSession { worker_id, reply })
            .await
    }

    pub async fn worker_message(
        &self,
        worker_id: WorkerId,
        session: u64,
        message: WorkerMessage,
    ) -> Result<()> {
        self.post(Event::FromWorker {
            worker_id,
            session,
            message,
        })
        .await
    }

    pub async fn session_closed(&self, worker_id: WorkerId, session: u64) -> Result<()> {
        self.post(Event::SessionClosed { worker_id, session }).await
    }

    pub async fn close_streams(&self) -> Result<()> {
        self.post(Event::CloseStreams).await
    }

    /// Refuses unless `worker_id` runs the current `attempt` of `job`: a job's outputs come
    /// only from there.
    pub async fn authorize_output(
        &self,
        job: JobId,
        worker_id: WorkerId,
        attempt: u32,
    ) -> Result<()> {
        self.call(|reply| Event::AuthorizeOutput {
            job,
            worker_id,
            attempt,
            reply,
        })
        .await
    }

    /// A checkpoint of `attempt` stored; it becomes the job's resume point if that attempt is
    /// still the one `worker_id` runs.
    pub async fn checkpoint_stored(
        &self,
        job: JobId,
        digest: Digest,
        worker_id: WorkerId,
        attempt: u32,
    ) -> Result<()> {
        self.post(Event::CheckpointStored {
            job,
            digest,
            worker_id,
            attempt,
        })
        .await
    }
}

struct SessionTx {
    id: u64,
    tx: mpsc::Sender<CoordinatorMessage>,
}

/// The rendezvous of one attempt: who joined with which address.
struct Rendezvous {
    opened: Instant,
    addresses: BTreeMap<u32, String>,
    complete: bool,
}

struct JobLog {
    lines: VecDeque<LogLine>,
    tx: Option<broadcast::Sender<LogLine>>,
    /// The latest progress of rank 0 (shown in the job's live view).
    progress: Option<Progress>,
}

impl JobLog {
    fn new() -> Self {
        Self {
            lines: VecDeque::new(),
            tx: Some(broadcast::channel(4096).0),
            progress: None,
        }
    }
}

struct Actor<S: Store> {
    state: State<S>,
    config: CoordinatorConfig,
    registry: Registry,
    sessions: HashMap<WorkerId, SessionTx>,
    next_session: u64,
    /// Workers shutting down: no new work, and their jobs move as soon as they leave.
    draining: BTreeSet<WorkerId>,
    /// Non-terminal jobs, kept in step with the store.
    active: BTreeMap<JobId, Job>,
    placement: Placement,
    /// Ranks of the current attempt that reported success.
    succeeded: HashMap<(JobId, u32), BTreeSet<u32>>,
    watchers: HashMap<JobId, broadcast::Sender<JobEvent>>,
    logs: HashMap<JobId, JobLog>,
    /// Ended jobs whose logs are still held, oldest first.
    ended_logs: VecDeque<JobId>,
    rendezvous: HashMap<(JobId, u32), Rendezvous>,
    traces: Traces,
    log_files: Option<LogFiles>,
    metrics: ClusterMetrics,
}

/// Starts the loop on `store`: loads jobs and workers, then serves events until every
/// [`Handle`] is dropped. Known workers get one heartbeat timeout to reconnect.
pub async fn start<S: Store + Clone>(
    store: S,
    config: CoordinatorConfig,
) -> Result<(Handle, tokio::task::JoinHandle<()>)> {
    let state = State::new(store);
    let mut registry = Registry::new(config.heartbeat_timeout);
    let now = Instant::now();
    for worker in state.workers().await? {
        if worker.alive {
            registry.insert(worker, now);
        }
    }
    let active: BTreeMap<JobId, Job> = state
        .jobs()
        .await?
        .into_iter()
        .filter(|j| !j.state.is_terminal())
        .map(|j| (j.id.clone(), j))
        .collect();
    let placement = Placement {
        jobs: active
            .values()
            .filter(|j| j.state.is_active())
            .map(|j| (j.id.clone(), j.placement.clone()))
            .collect(),
        ..Placement::default()
    };
    let actor = Actor {
        state,
        registry,
        sessions: HashMap::new(),
        next_session: 0,
        draining: BTreeSet::new(),
        active,
        placement,
        succeeded: HashMap::new(),
        watchers: HashMap::new(),
        logs: HashMap::new(),
        ended_logs: VecDeque::new(),
        rendezvous: HashMap::new(),
        traces: Traces::default(),
        metrics: ClusterMetrics(config.metrics.clone()),
        log_files: config
            .log_dir
            .as_ref()
            .map(|dir| LogFiles::new(dir, config.log_bytes_per_job)),
        config,
    };
    actor.metrics.start_counters();
    actor.metrics.jobs(actor.active.values().map(|j| j.state));
    actor.count_workers(Instant::now());
    let (tx, rx) = mpsc::channel(1024);
    let task = tokio::spawn(actor.run(rx));
    Ok((Handle { tx }, task))
}

fn now_ms() -> i64 {
    crate::now_ms()
}

impl<S: Store> Actor<S> {
    async fn run(mut self, mut rx: mpsc::Receiver<Event>) {
        let period = (self.config.heartbeat_timeout / 4).max(Duration::from_millis(10));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            // Liveness first: a flood of events must not postpone declaring workers lost.
            tokio::select! {
                biased;
                _ = tick.tick() => {
                    self.count_workers(Instant::now());
                    if let Err(e) = self.expire_workers().await {
                        tracing::warn!(error = %e, "checking worker heartbeats failed");
                    }
                    if let Err(e) = self.expire_rendezvous().await {
                        tracing::warn!(error = %e, "checking rendezvous deadlines failed");
                    }
                }
                event = rx.recv() => match event {
                    Some(event) => self.handle(event).await,
                    None => break,
                },
            }
        }
        tracing::info!("coordinator loop stopped");
    }

    async fn handle(&mut self, event: Event) {
        match event {
            Event::Submit {
                spec_toml,
                priority,
                reply,
            } => {
                let _ = reply.send(self.submit(spec_toml, priority).await);
            }
            Event::Get { id, reply } => {
                let _ = reply.send(self.state.job(&id).await.map(|j| self.live(j)));
            }
            Event::List { states, reply } => {
                let jobs = self.state.jobs().await.map(|jobs| {
                    jobs.into_iter()
                        .filter(|j| states.is_empty() || states.contains(&j.state))
                        .map(|j| self.live(j))
                        .collect()
                });
                let _ = reply.send(jobs);
            }
            Event::Cancel { id, reply } => {
                let result = self.cancel(&id).await;
                let _ = reply.send(result);
            }
            Event::Watch { id, reply } => {
                let _ = reply.send(self.watch(&id).await);
            }
            Event::Logs { id, follow, reply } => {
                let _ = reply.send(self.logs(&id, follow).await);
            }
            Event::ListWorkers { reply } => {
                let _ = reply.send(Ok(self.worker_views()));
            }
            Event::Register {
                registration,
                reply,
            } => {
                let _ = reply.send(self.register(registration).await);
            }
            Event::OpenSession { worker_id, reply } => {
                let _ = reply.send(self.open_session(worker_id).await);
            }
            Event::FromWorker {
                worker_id,
                session,
                message,
            } => {
                if let Err(e) = self.on_worker_message(&worker_id, session, message).await {
                    tracing::warn!(worker = %worker_id, error = %e, "worker message not applied");
                }
            }
            Event::SessionClosed { worker_id, session } => {
                if self
                    .sessions
                    .get(&worker_id)
                    .is_some_and(|s| s.id == session)
                {
                    self.sessions.remove(&worker_id);
                    tracing::info!(worker = %worker_id, "worker session closed");
                    if self.draining.remove(&worker_id) {
                        // A clean shutdown: no reason to wait for the heartbeat timeout.
                        if let Err(e) = self.worker_lost(&worker_id, "the worker shut down").await {
                            tracing::warn!(worker = %worker_id, error = %e, "worker departure not applied");
                        }
                        self.schedule().await;
                    }
                }
            }
            Event::CloseStreams => {
                tracing::info!(sessions = self.sessions.len(), "closing every stream");
                self.sessions.clear();
                self.watchers.clear();
                for log in self.logs.values_mut() {
                    log.tx = None;
                }
            }
            Event::AuthorizeOutput {
                job,
                worker_id,
                attempt,
                reply,
            } => {
                let _ = reply.send(self.output_allowed(&job, &worker_id, attempt));
            }
            Event::CheckpointStored {
                job,
                digest,
                worker_id,
                attempt,
            } => {
                let current = self.output_allowed(&job, &worker_id, attempt).is_ok();
                if current
                    && self
                        .active
                        .get(&job)
                        .is_some_and(|j| j.state == JobState::Running)
                {
                    if let Err(e) = self.transition(&job, Transition::Checkpoint(digest)).await {
                        tracing::warn!(job = %job, error = %e, "checkpoint not recorded");
                    }
                }
            }
        }
    }

    /// Whether `worker_id` runs attempt `attempt` of `job` now (placed there, not stale).
    fn output_allowed(&self, job: &JobId, worker_id: &WorkerId, attempt: u32) -> Result<()> {
        let Some(j) = self.active.get(job) else {
            return Err(Error::OutputRefused(format!(
                "job `{job}` is not placed or running: it takes no outputs"
            )));
        };
        let placed_there = j.placement.iter().any(|p| &p.worker_id == worker_id);
        if j.attempt != attempt || !placed_there {
            return Err(Error::OutputRefused(format!(
                "worker `{worker_id}` does not run attempt {attempt} of job `{job}` (it is at \
                 attempt {}): only the worker running the current attempt uploads its outputs",
                j.attempt
            )));
        }
        Ok(())
    }

    /// `job` with its live-only fields filled in.
    fn live(&self, mut job: Job) -> Job {
        job.waiting_reason = if job.state.is_pending() {
            self.placement
                .reasons
                .get(&job.id)
                .cloned()
                .unwrap_or_default()
        } else {
            String::new()
        };
        job.progress = self
            .logs
            .get(&job.id)
            .and_then(|l| l.progress.clone().map(Box::new))
            .filter(|p| p.attempt == job.attempt);
        job.trace_id = self.traces.trace_id(&job.id);
        job
    }

    /// Registered workers with what runs on them now.
    fn worker_views(&self) -> Vec<Worker> {
        self.registry
            .all()
            .map(|w| {
                let mut view = w.clone();
                for job in self.active.values().filter(|j| j.state.is_active()) {
                    for rank in job.placement.iter().filter(|p| p.worker_id == w.id) {
                        view.busy_gpus.extend(&rank.gpu_indices);
                        if !view.jobs.contains(&job.id) {
                            view.jobs.push(job.id.clone());
                        }
                    }
                }
                view.busy_gpus.sort_unstable();
                view.draining = self.draining.contains(&w.id);
                view
            })
            .collect()
    }

    /// Writes a transition, refreshes the cache and tells watchers.
    async fn transition(&mut self, id: &JobId, transition: Transition) -> Result<Job> {
        let job = self.state.transition(id, transition, now_ms()).await?;
        self.publish(&job);
        Ok(job)
    }

    fn publish(&mut self, job: &Job) {
        self.count_change(job);
        self.traces.update(job);
        if job.state.is_terminal() {
            self.active.remove(&job.id);
            self.placement.jobs.remove(&job.id);
            self.placement.waited.remove(&job.id);
            self.succeeded.retain(|(id, _), _| id != &job.id);
            self.rendezvous.retain(|(id, _), _| id != &job.id);
            if let Some(tx) = self.watchers.remove(&job.id) {
                let _ = tx.send(JobEvent::State(job.clone()));
            }
            if let Some(files) = &mut self.log_files {
                files.close(&job.id);
            }
            if let Some(log) = self.logs.get_mut(&job.id) {
                log.tx = None;
                self.ended_logs.push_back(job.id.clone());
                while self.ended_logs.len() > self.config.ended_jobs_with_logs {
                    if let Some(old) = self.ended_logs.pop_front() {
                        self.logs.remove(&old);
                    }
                }
            }
        } else {
            self.active.insert(job.id.clone(), job.clone());
            if let Some(tx) = self.watchers.get(&job.id) {
                let _ = tx.send(JobEvent::State(job.clone()));
            }
        }
    }

    /// Metrics of a job change (called before the cache holds it), then the jobs by state.
    fn count_change(&self, job: &Job) {
        let before = self.active.get(&job.id).map(|j| (j.state, j.updated_at));
        self.metrics.job_changed(before, job);
        let others = self.active.values().filter(|j| j.id != job.id);
        self.metrics
            .jobs(others.map(|j| j.state).chain(std::iter::once(job.state)));
    }

    fn count_workers(&self, now: Instant) {
        self.metrics.workers(
            self.registry
                .ages(now)
                .map(|(w, age)| (w, age, self.draining.contains(&w.id))),
        );
    }

    async fn submit(&mut self, spec_toml: String, priority: i32) -> Result<(Job, Vec<String>)> {
        let spec = JobSpec::from_toml_str(&spec_toml, "<request>")?;
        let resolved = spec.resolved()?;
        let warnings = resolved.warnings.iter().map(ToString::to_string).collect();
        let new = NewJob {
            name: spec.name.clone(),
            spec_toml,
            priority,
            resources: job::resources(&resolved),
        };
        let job = self.state.create_job(new, now_ms()).await?;
        tracing::info!(job = %job.id, name = %job.name, "job submitted");
        self.publish(&job);
        self.schedule().await;
        let job = self.active.get(&job.id).cloned().unwrap_or(job);
        Ok((self.live(job), warnings))
    }

    async fn cancel(&mut self, id: &JobId) -> Result<Job> {
        let before = self.state.job(id).await?;
        let job = self.transition(id, Transition::Cancel).await?;
        self.stop_ranks(&before, "job cancelled", None);
        self.schedule().await;
        Ok(job)
    }

    async fn watch(&mut self, id: &JobId) -> Result<Watch> {
        let job = self.live(self.state.job(id).await?);
        let events = (!job.state.is_terminal()).then(|| {
            self.watchers
                .entry(id.clone())
                .or_insert_with(|| broadcast::channel(1024).0)
                .subscribe()
        });
        Ok(Watch { job, events })
    }

    async fn logs(&mut self, id: &JobId, follow: bool) -> Result<Logs> {
        let job = self.state.job(id).await?;
        if job.state.is_terminal() && !self.logs.contains_key(id) {
            // Dropped from memory with older ended jobs, or ended before a restart.
            return Ok(Logs {
                lines: self.logs_on_disk(id),
                follow: None,
            });
        }
        let log = self.job_log(id, !job.state.is_terminal());
        let follow = if follow {
            log.tx.as_ref().map(|tx| tx.subscribe())
        } else {
            None
        };
        Ok(Logs {
            lines: log.lines.iter().cloned().collect(),
            follow,
        })
    }

    async fn register(&mut self, registration: Registration) -> Result<Registered> {
        if registration.protocol_version != loractl_proto::WORKER_PROTOCOL_VERSION {
            return Err(Error::ProtocolMismatch {
                worker: registration.protocol_version,
                coordinator: loractl_proto::WORKER_PROTOCOL_VERSION,
            });
        }
        // A restarted daemon lost its children: whatever ran under its old registration is
        // gone.
        for old in self.registry.named(&registration.name) {
            if self.registry.is_alive(&old) {
                self.worker_lost(&old, "the worker registered again (daemon restarted)")
                    .await?;
            }
            self.registry.remove(&old);
            self.state.delete_worker(&old).await?;
        }
        let worker = Worker {
            id: self.state.new_worker_id(&registration.name).await?,
            name: registration.name,
            gpus: registration.gpus,
            labels: registration.labels,
            registered_at: now_ms(),
            last_seen: None,
            alive: true,
            busy_gpus: Vec::new(),
            jobs: Vec::new(),
            draining: false,
        };
        self.state.put_worker(&worker).await?;
        tracing::info!(worker = %worker.id, gpus = worker.gpus.len(), "worker registered");
        let worker_id = worker.id.clone();
        self.registry.insert(worker, Instant::now());
        // Dashboards see a worker join now, not at the next liveness tick.
        self.count_workers(Instant::now());
        Ok(Registered {
            worker_id,
            heartbeat_interval: self.config.heartbeat_interval,
            heartbeat_timeout: self.config.heartbeat_timeout,
        })
    }

    async fn open_session(&mut self, worker_id: WorkerId) -> Result<Session> {
        if !self.registry.seen(&worker_id, Instant::now(), now_ms()) {
            return Err(Error::UnknownWorker(worker_id));
        }
        self.next_session += 1;
        let id = self.next_session;
        let (tx, messages) = mpsc::channel(256);
        // A new session replaces an older one of the same worker (a reconnect).
        self.sessions
            .insert(worker_id.clone(), SessionTx { id, tx });
        tracing::info!(worker = %worker_id, session = id, "worker session opened");
        // Ranks assigned while the worker was disconnected are sent again.
        let pending: Vec<Job> = self
            .active
            .values()
            .filter(|j| j.state == JobState::Placed)
            .filter(|j| j.placement.iter().any(|p| p.worker_id == worker_id))
            .cloned()
            .collect();
        for job in pending {
            self.send_assignments(&job, Some(&worker_id));
        }
        self.schedule().await;
        Ok(Session { id, messages })
    }

    fn send(&mut self, worker: &WorkerId, message: CoordinatorMessage) {
        if let Some(session) = self.sessions.get(worker) {
            if session.tx.try_send(message).is_err() {
                // Full or closed: the worker is not keeping up; it gets its assignments again
                // when it reconnects, and is declared lost if it stays silent.
                tracing::warn!(worker = %worker, "worker session not accepting messages; closing it");
                self.sessions.remove(worker);
            }
        }
    }

    fn send_assignments(&mut self, job: &Job, only: Option<&WorkerId>) {
        let world_size = job.placement.len() as u32;
        for rank in job.placement.clone() {
            if only.is_some_and(|w| w != &rank.worker_id) {
                continue;
            }
            // The ranks on one worker are numbered 0.. among themselves, in rank order.
            let on_worker = || {
                job.placement
                    .iter()
                    .filter(|p| p.worker_id == rank.worker_id)
            };
            let local_rank = on_worker().filter(|p| p.rank < rank.rank).count() as u32;
            let assignment = Assignment {
                job_id: job.id.clone(),
                attempt: job.attempt,
                rank: rank.rank,
                world_size,
                local_rank,
                local_world_size: on_worker().count() as u32,
                gpu_indices: rank.gpu_indices.clone(),
                spec_toml: job.spec_toml.clone(),
                resume_checkpoint: job.latest_checkpoint,
                trace_parent: self.traces.traceparent(&job.id),
            };
            self.send(&rank.worker_id, CoordinatorMessage::Assign(assignment));
        }
    }

    /// Tells every worker of `job`'s current placement to stop its rank, except `skip` (a
    /// rank that already ended).
    fn stop_ranks(&mut self, job: &Job, reason: &str, skip: Option<u32>) {
        for rank in job.placement.clone() {
            if skip == Some(rank.rank) {
                continue;
            }
            let running = RankId {
                job_id: job.id.clone(),
                attempt: job.attempt,
                rank: rank.rank,
            };
            self.send(
                &rank.worker_id,
                CoordinatorMessage::Stop {
                    rank: running,
                    reason: reason.to_owned(),
                },
            );
        }
    }

    /// Ends the current attempt of `id` with `failure`: stops its other ranks (all but
    /// `ended`, the rank that reported it); the state machine decides between a retry and the
    /// end.
    async fn fail(&mut self, id: &JobId, failure: Failure, ended: Option<u32>) -> Result<Job> {
        let before = self.state.job(id).await?;
        let reason = format!("attempt {} failed: {failure}", before.attempt);
        let job = self.transition(id, Transition::Fail(failure)).await?;
        self.succeeded.remove(&(id.clone(), before.attempt));
        self.rendezvous.remove(&(id.clone(), before.attempt));
        self.stop_ranks(&before, &reason, ended);
        tracing::info!(job = %id, state = %job.state, %reason, "attempt ended");
        Ok(job)
    }

    async fn worker_lost(&mut self, worker: &WorkerId, why: &str) -> Result<()> {
        if let Some(mut record) = self.registry.mark_lost(worker) {
            record.alive = false;
            self.state.put_worker(&record).await?;
        }
        self.sessions.remove(worker);
        self.metrics.worker_lost();
        self.count_workers(Instant::now());
        tracing::warn!(worker = %worker, why, "worker lost");
        let affected: Vec<JobId> = self
            .active
            .values()
            .filter(|j| j.state.is_active())
            .filter(|j| j.placement.iter().any(|p| &p.worker_id == worker))
            .map(|j| j.id.clone())
            .collect();
        for id in affected {
            let failure = Failure {
                kind: FailureKind::WorkerLost,
                message: format!("worker {worker}: {why}"),
                rank: None,
            };
            self.fail(&id, failure, None).await?;
        }
        Ok(())
    }

    async fn expire_workers(&mut self) -> Result<()> {
        let lost = self.registry.expire(Instant::now());
        if lost.is_empty() {
            return Ok(());
        }
        let why = format!("no message for {} s", self.registry.timeout().as_secs_f64());
        for worker in lost {
            self.worker_lost(&worker.id, &why).await?;
        }
        self.schedule().await;
        Ok(())
    }

    /// Runs a placement round and applies it: newly placed jobs are written and their
    /// workers get assignments.
    async fn schedule(&mut self) {
        let jobs: Vec<JobRequest> = self
            .active
            .values()
            .map(|j| JobRequest {
                id: j.id.clone(),
                priority: j.priority,
                sequence: j.sequence,
                resources: j.resources.clone(),
            })
            .collect();
        // Workers within their reconnect grace keep their jobs but get no new ones.
        let workers: Vec<WorkerSlots> = self
            .registry
            .all()
            .filter(|w| w.alive)
            .map(|w| WorkerSlots {
                id: w.id.clone(),
                gpus: w.gpus.iter().map(|g| g.index).collect(),
                cpu_slots: self.config.cpu_slots,
                accepts_new_work: self.sessions.contains_key(&w.id)
                    && !self.draining.contains(&w.id),
            })
            .collect();
        let mut previous = self.placement.clone();
        previous.jobs = self
            .active
            .values()
            .filter(|j| j.state.is_active())
            .map(|j| (j.id.clone(), j.placement.clone()))
            .collect();
        let next = placement::place(&jobs, &workers, &previous, &self.config.policy);
        let newly: Vec<(JobId, Vec<loractl_proto::domain::RankPlacement>)> = next
            .jobs
            .iter()
            .filter(|(id, _)| !previous.jobs.contains_key(*id))
            .map(|(id, ranks)| (id.clone(), ranks.clone()))
            .collect();
        self.placement = next;
        for (id, ranks) in newly {
            match self.transition(&id, Transition::Place(ranks)).await {
                Ok(job) => {
                    tracing::info!(job = %id, attempt = job.attempt, "job placed");
                    self.send_assignments(&job, None);
                }
                Err(e) => {
                    self.placement.jobs.remove(&id);
                    tracing::warn!(job = %id, error = %e, "placement not applied");
                }
            }
        }
    }

    /// Whether `rank` is the current attempt of an active job placed on `worker`.
    fn expected(&self, worker: &WorkerId, rank: &RankId) -> Option<&Job> {
        let job = self.active.get(&rank.job_id)?;
        let placed_here = job
            .placement
            .iter()
            .any(|p| p.rank == rank.rank && &p.worker_id == worker);
        (job.state.is_active() && job.attempt == rank.attempt && placed_here).then_some(job)
    }

    async fn on_worker_message(
        &mut self,
        worker: &WorkerId,
        session: u64,
        message: WorkerMessage,
    ) -> Result<()> {
        if self.sessions.get(worker).is_none_or(|s| s.id != session) {
            return Ok(()); // a replaced or closed session
        }
        if !self.registry.seen(worker, Instant::now(), now_ms()) {
            return Ok(());
        }
        match message {
            WorkerMessage::Open { .. } => {}
            WorkerMessage::Heartbeat { running, draining } => {
                if draining && self.draining.insert(worker.clone()) {
                    tracing::info!(worker = %worker, "worker is shutting down");
                    self.count_workers(Instant::now());
                }
                // A worker that was out of touch may still run ranks whose jobs moved on.
                for rank in running {
                    if self.expected(worker, &rank).is_none() {
                        self.send(
                            worker,
                            CoordinatorMessage::Stop {
                                rank,
                                reason: "this rank is no longer assigned to this worker".into(),
                            },
                        );
                    }
                }
            }
            WorkerMessage::Started(rank) => {
                if self
                    .expected(worker, &rank)
                    .is_some_and(|j| j.state == JobState::Placed)
                {
                    self.transition(&rank.job_id, Transition::Start).await?;
                }
            }
            WorkerMessage::Progress(progress) => {
                // Every rank reports the same step and the loss averaged over ranks: rank 0
                // speaks for the job.
                let current = progress.rank == 0
                    && self
                        .active
                        .get(&progress.job_id)
                        .is_some_and(|j| j.attempt == progress.attempt);
                if current {
                    self.traces
                        .progress(&progress.job_id, progress.attempt, progress.epoch);
                    self.logs
                        .entry(progress.job_id.clone())
                        .or_insert_with(JobLog::new)
                        .progress = Some(progress.clone());
                    if let Some(tx) = self.watchers.get(&progress.job_id) {
                        let _ = tx.send(JobEvent::Progress(progress));
                    }
                }
            }
            WorkerMessage::Log(line) => self.append_log(line),
            WorkerMessage::RendezvousJoin { rank, address } => {
                if let Some(job) = self.expected(worker, &rank).cloned() {
                    self.join(&job, rank.rank, address);
                }
            }
            WorkerMessage::Result { rank, outcome } => {
                let Some(job) = self.expected(worker, &rank).cloned() else {
                    return Ok(());
                };
                match outcome {
                    RankOutcome::Succeeded { .. } => {
                        let done = self
                            .succeeded
                            .entry((job.id.clone(), job.attempt))
                            .or_default();
                        done.insert(rank.rank);
                        if done.len() == job.placement.len() {
                            if job.state == JobState::Placed {
                                self.transition(&job.id, Transition::Start).await?;
                            }
                            self.transition(&job.id, Transition::Succeed).await?;
                            tracing::info!(job = %job.id, "job succeeded");
                        }
                    }
                    RankOutcome::Failed(failure) => {
                        self.fail(&job.id, failure, Some(rank.rank)).await?;
                    }
                }
                self.schedule().await;
            }
        }
        Ok(())
    }

    /// Records a rank's address; once every rank of the attempt joined, each worker of the
    /// job gets all addresses. A rank joining again (a restarted rank process) gets them too.
    fn join(&mut self, job: &Job, rank: u32, address: String) {
        let key = (job.id.clone(), job.attempt);
        let meet = self
            .rendezvous
            .entry(key.clone())
            .or_insert_with(|| Rendezvous {
                opened: Instant::now(),
                addresses: BTreeMap::new(),
                complete: false,
            });
        meet.addresses.insert(rank, address);
        let was_complete = meet.complete;
        if meet.addresses.len() < job.placement.len() {
            return;
        }
        meet.complete = true;
        let addresses: Vec<String> = meet.addresses.values().cloned().collect();
        let mut workers: Vec<WorkerId> = job
            .placement
            .iter()
            .filter(|p| !was_complete || p.rank == rank)
            .map(|p| p.worker_id.clone())
            .collect();
        workers.dedup();
        tracing::info!(job = %job.id, attempt = job.attempt, ranks = addresses.len(), "rendezvous complete");
        for worker in workers {
            self.send(
                &worker,
                CoordinatorMessage::Rendezvous {
                    job_id: job.id.clone(),
                    attempt: job.attempt,
                    addresses: addresses.clone(),
                },
            );
        }
    }

    /// Fails attempts whose ranks did not all join the rendezvous in time.
    async fn expire_rendezvous(&mut self) -> Result<()> {
        let timeout = self.config.rendezvous_timeout;
        let late: Vec<((JobId, u32), Vec<u32>)> = self
            .rendezvous
            .iter()
            .filter(|(_, m)| !m.complete && m.opened.elapsed() > timeout)
            .map(|(key, m)| (key.clone(), m.addresses.keys().copied().collect()))
            .collect();
        if late.is_empty() {
            return Ok(());
        }
        for ((id, attempt), joined) in late {
            self.rendezvous.remove(&(id.clone(), attempt));
            let Some(job) = self.active.get(&id).filter(|j| j.attempt == attempt) else {
                continue;
            };
            let missing: Vec<String> = job
                .placement
                .iter()
                .map(|p| p.rank)
                .filter(|r| !joined.contains(r))
                .map(|r| r.to_string())
                .collect();
            let failure = Failure {
                kind: FailureKind::TrainingError,
                message: format!(
                    "rendezvous timed out after {} s: rank(s) {} never joined",
                    timeout.as_secs(),
                    missing.join(", ")
                ),
                rank: None,
            };
            self.fail(&id, failure, None).await?;
        }
        self.schedule().await;
        Ok(())
    }

    fn append_log(&mut self, line: LogLine) {
        let Some(job) = self.active.get(&line.job_id) else {
            return;
        };
        if job.attempt != line.attempt {
            return;
        }
        let cap = self.config.log_lines_per_job;
        let id = line.job_id.clone();
        let log = self.job_log(&id, true);
        if log.lines.len() >= cap {
            log.lines.pop_front();
        }
        if let Some(tx) = &log.tx {
            let _ = tx.send(line.clone());
        }
        log.lines.push_back(line.clone());
        if let Some(files) = &mut self.log_files {
            files.append(&line);
        }
    }

    /// The last lines of `id` on disk.
    fn logs_on_disk(&self, id: &JobId) -> Vec<LogLine> {
        self.log_files
            .as_ref()
            .map(|f| f.read(id, self.config.log_lines_per_job))
            .unwrap_or_default()
    }

    /// The log of `id` in memory, loaded from disk the first time (after a restart, or once
    /// dropped); followable while `active`.
    fn job_log(&mut self, id: &JobId, active: bool) -> &mut JobLog {
        if !self.logs.contains_key(id) {
            let log = JobLog {
                lines: self.logs_on_disk(id).into(),
                tx: active.then(|| broadcast::channel(4096).0),
                progress: None,
            };
            self.logs.insert(id.clone(), log);
        }
        self.logs.entry(id.clone()).or_insert_with(JobLog::new)
    }
}
