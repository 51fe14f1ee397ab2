//! A coordinator in this process, started by [`Standalone`] (as `loractl up` starts its own)
//! on 127.0.0.1:0 with a redb store and artifact folder in a temporary folder; gRPC clients
//! carrying a token; submitting, watching and reading logs; worker registrations; worker
//! daemons whose ranks are shell scripts.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use loractl_coordinator::server::ServerConfig;
use loractl_coordinator::standalone::Standalone;
use loractl_coordinator::store::{AnyStore, RedbStore};
use loractl_proto::domain::{FailureKind, GpuInfo, Job, JobEvent, JobState, Registration};
use loractl_proto::pb;
use loractl_proto::pb::artifact_service_client::ArtifactServiceClient;
use loractl_proto::pb::job_service_client::JobServiceClient;
use loractl_proto::pb::worker_service_client::WorkerServiceClient;
use loractl_worker::client::{Authed, ClientTls, Link};
use loractl_worker::config::WorkerConfig;
use loractl_worker::daemon::Daemon;
use tokio_stream::StreamExt;

/// Bound on any single wait, so a broken server fails the test instead of hanging it.
pub const WAIT: Duration = Duration::from_secs(30);

/// A coordinator serving from this process; stopped when dropped.
pub struct Coordinator {
    /// Holds `state.redb`, `artifacts/` and whatever the test puts there.
    pub dir: tempfile::TempDir,
    pub url: String,
    token: Option<String>,
    tls: Option<ClientTls>,
    config: ServerConfig,
    server: Option<Standalone>,
}

impl Coordinator {
    /// Every default, `token` required on every call.
    pub async fn start(token: Option<&str>) -> Self {
        Self::start_with(token, |_, _| {}).await
    }

    /// With settings changed by `tweak`, which gets the coordinator's folder (to write TLS
    /// files into, for instance) and the config.
    pub async fn start_with(
        token: Option<&str>,
        tweak: impl FnOnce(&Path, &mut ServerConfig),
    ) -> Self {
        let dir = tempfile::tempdir().expect("a folder for the coordinator");
        let mut config = ServerConfig {
            token: token.map(str::to_owned),
            ..ServerConfig::new(dir.path().join("artifacts"))
        };
        tweak(dir.path(), &mut config);
        let server = serve(dir.path(), config.clone(), "127.0.0.1:0").await;
        Self {
            url: server.url(),
            dir,
            token: token.map(str::to_owned),
            tls: None,
            config,
            server: Some(server),
        }
    }

    /// Clients made from now on trust the coordinator's TLS certificate through `tls`.
    pub fn with_client_tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// A link to it with its token, or with `token` instead (`Some(None)`: no token).
    pub fn link_as(&self, token: Option<Option<&str>>) -> Link {
        let token = token.unwrap_or(self.token.as_deref());
        Link::new(&self.url, token, self.tls.clone()).expect("a printable token")
    }

    pub async fn jobs(&self) -> JobServiceClient<Authed> {
        self.link_as(None).jobs().await.expect("connecting")
    }

    pub async fn workers(&self) -> WorkerServiceClient<Authed> {
        self.link_as(None).workers().await.expect("connecting")
    }

    pub async fn artifacts(&self) -> ArtifactServiceClient<Authed> {
        self.link_as(None).artifacts().await.expect("connecting")
    }

    /// Stops it gracefully; it must close within [`WAIT`] without an error.
    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server
                .stop(WAIT)
                .await
                .expect("the coordinator stops cleanly");
        }
    }

    /// Stops it and starts it again on the same store, artifacts and address, as a restarted
    /// coordinator process would be.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listen = self.url.trim_start_matches("http://").to_owned();
        self.server = Some(serve(self.dir.path(), self.config.clone(), &listen).await);
    }
}

/// Serves the redb store in `dir` on `listen`.
async fn serve(dir: &Path, config: ServerConfig, listen: &str) -> Standalone {
    let store = RedbStore::open(dir.join("state.redb")).expect("opening the redb store");
    Standalone::start(AnyStore::Redb(store), config, listen)
        .await
        .expect("the coordinator starts")
}

/// Awaits `fut`, failing the test naming `what` after [`WAIT`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
}

/// Submits `spec` at priority 0.
pub async fn submit(jobs: &mut JobServiceClient<Authed>, spec: &str) -> Job {
    let job = jobs
        .submit_job(pb::SubmitJobRequest {
            spec_toml: spec.to_owned(),
            priority: 0,
        })
        .await
        .expect("the job is accepted")
        .into_inner()
        .job
        .expect("the job in the answer");
    Job::try_from(job).expect("a well-formed job")
}

/// Job `id` as the coordinator has it now.
pub async fn get_job(jobs: &mut JobServiceClient<Authed>, id: &str) -> Job {
    let job = jobs
        .get_job(pb::GetJobRequest {
            job_id: id.to_owned(),
        })
        .await
        .expect("the job exists")
        .into_inner()
        .job
        .expect("the job in the answer");
    Job::try_from(job).expect("a well-formed job")
}

/// The artifacts stored for job `id`.
pub async fn artifacts_of(
    artifacts: &mut ArtifactServiceClient<Authed>,
    id: &str,
) -> Vec<pb::ArtifactInfo> {
    artifacts
        .list_artifacts(pb::ListArtifactsRequest {
            job_id: id.to_owned(),
        })
        .await
        .expect("listing the artifacts")
        .into_inner()
        .artifacts
}

/// The events of job `id` from now on.
pub async fn watch(
    jobs: &mut JobServiceClient<Authed>,
    id: &str,
) -> tonic::Streaming<pb::JobEvent> {
    jobs.watch_job(pb::WatchJobRequest {
        job_id: id.to_owned(),
    })
    .await
    .expect("watching the job")
    .into_inner()
}

/// Watches job `id` until `until` holds for its state; returns that state and every event
/// seen. Fails after [`WAIT`] or when the watch ends first.
pub async fn watch_until(
    jobs: &mut JobServiceClient<Authed>,
    id: &str,
    until: impl Fn(&Job) -> bool,
) -> (Job, Vec<JobEvent>) {
    follow_until(&mut watch(jobs, id).await, until).await
}

/// Reads a watch until `until` holds for the job's state, as [`watch_until`] does.
pub async fn follow_until(
    stream: &mut tonic::Streaming<pb::JobEvent>,
    until: impl Fn(&Job) -> bool,
) -> (Job, Vec<JobEvent>) {
    let mut events = Vec::new();
    let found = within("the watched job", async {
        while let Some(event) = stream.next().await {
            let event = JobEvent::try_from(event.expect("an event")).expect("a well-formed event");
            events.push(event.clone());
            if let JobEvent::State(job) = event {
                if until(&job) {
                    return Some(job);
                }
            }
        }
        None
    })
    .await;
    (
        found.expect("the watch ended before the condition held"),
        events,
    )
}

/// The log lines job `id` has so far.
pub async fn log_lines(jobs: &mut JobServiceClient<Authed>, id: &str) -> Vec<String> {
    let mut stream = jobs
        .get_logs(pb::GetLogsRequest {
            job_id: id.to_owned(),
            follow: false,
        })
        .await
        .expect("reading the logs")
        .into_inner();
    let mut lines = Vec::new();
    while let Some(line) = stream.next().await {
        lines.push(line.expect("a log line").text);
    }
    lines
}

/// Follows job `id`'s log (lines so far, then new ones) until `find` returns a value for a
/// line; fails after [`WAIT`] or when the log ends first.
pub async fn follow_logs<T>(
    jobs: &mut JobServiceClient<Authed>,
    id: &str,
    mut find: impl FnMut(&str) -> Option<T>,
) -> T {
    let mut stream = jobs
        .get_logs(pb::GetLogsRequest {
            job_id: id.to_owned(),
            follow: true,
        })
        .await
        .expect("following the logs")
        .into_inner();
    within("a log line", async {
        while let Some(line) = stream.next().await {
            if let Some(found) = find(&line.expect("a log line").text) {
                return found;
            }
        }
        panic!("the log ended before the line looked for");
    })
    .await
}

/// Asserts where a retried job stands: its state, its attempt, the restarts it spent and
/// the kind of its last failure.
pub fn assert_retried(
    job: &Job,
    state: JobState,
    (attempt, counted_restarts): (u32, u32),
    failure: FailureKind,
) {
    assert_eq!(job.state, state, "{:?}", job.last_failure);
    assert_eq!(
        (job.attempt, job.counted_restarts),
        (attempt, counted_restarts),
        "attempt and counted restarts"
    );
    assert_eq!(job.last_failure.as_ref().map(|f| f.kind), Some(failure));
}

/// GPU `index` of worker `name`: 24 GiB, a UUID unique to the pair.
pub fn gpu(name: &str, index: u32) -> GpuInfo {
    GpuInfo {
        index,
        uuid: format!("GPU-{name}-{index}"),
        name: "Test GPU".into(),
        memory_bytes: 24 << 30,
    }
}

/// Worker `name`'s registration with the GPUs `gpus`, at this build's protocol version.
pub fn registration(name: &str, gpus: &[u32]) -> Registration {
    Registration {
        protocol_version: loractl_proto::WORKER_PROTOCOL_VERSION,
        name: name.to_owned(),
        gpus: gpus.iter().map(|&i| gpu(name, i)).collect(),
        labels: Default::default(),
    }
}

/// A worker daemon serving from this process until [`Worker::stop`] or a drop.
pub struct Worker {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<loractl_worker::Result<()>>>,
}

impl Worker {
    /// The config of worker `name` of the coordinator at `url`, its folders under `root`: a
    /// model folder holding a file `model`, a data folder holding `train/10_dog`, and a work
    /// and cache folder. Its ranks run `script` with `/bin/sh`; it offers the CPU only.
    pub fn config(root: &Path, url: &str, name: &str, model: &str, script: &str) -> WorkerConfig {
        let models = root.join("models");
        let data = root.join("data");
        std::fs::create_dir_all(&models).expect("a model folder");
        std::fs::create_dir_all(data.join("train/10_dog")).expect("a dataset folder");
        std::fs::write(models.join(model), b"weights").expect("a model file");
        WorkerConfig {
            model_dirs: vec![models],
            data_dirs: vec![data],
            coordinator: url.to_owned(),
            name: Some(name.to_owned()),
            gpus: "cpu".into(),
            work_dir: root.join("work"),
            cache_dir: root.join("cache"),
            rank_command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            ..WorkerConfig::default()
        }
    }

    /// Starts a worker on `config` (its GPUs discovered as the daemon would, its TLS files
    /// read) presenting `token`.
    pub fn start(config: WorkerConfig, token: Option<&str>) -> Self {
        config.validate().expect("a valid worker config");
        let gpus = loractl_worker::gpu::discover(&config.gpu_selection(), config.simulated_gpus)
            .expect("the worker's GPUs");
        let tls = config.client_tls().expect("the worker's TLS files");
        let daemon =
            Daemon::new(config, gpus, token.map(str::to_owned), tls).expect("the worker daemon");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(daemon.run(async {
            let _ = stopped.await;
        }));
        Self {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Shuts it down as SIGTERM would (its ranks are stopped) and waits for it.
    pub async fn stop(mut self) -> loractl_worker::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => within("the worker to stop", task)
                .await
                .expect("the worker task"),
            None => Ok(()),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
