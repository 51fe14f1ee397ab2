//! The worker daemon against a real coordinator in process on 127.0.0.1:0, with a shell script
//! as the rank command (the training program plugs in at the same place): jobs run, report
//! progress and artifacts, resume from their checkpoint after a kill, fail without retry on a
//! bad config, and a cancel or a worker shutdown takes down the rank's whole process group.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use loractl_coordinator::artifacts::ArtifactConfig;
use loractl_coordinator::server::{self, CoordinatorConfig, ServerConfig};
use loractl_coordinator::store::RedbStore;
use loractl_proto::domain::{ArtifactKind, FailureKind, Job, JobEvent, JobState};
use loractl_proto::pb;
use loractl_proto::pb::artifact_service_client::ArtifactServiceClient;
use loractl_proto::pb::job_service_client::JobServiceClient;
use loractl_worker::client::{self, Authed, Link};
use loractl_worker::config::WorkerConfig;
use loractl_worker::daemon::Daemon;
use loractl_worker::gpu;
use tokio::sync::oneshot;
use tokio_stream::StreamExt;

const TOKEN: &str = "worker-test-token";

/// The folders a worker allows, holding the model file and dataset folder the specs name.
fn allowed_dirs(root: &std::path::Path) -> (Vec<std::path::PathBuf>, Vec<std::path::PathBuf>) {
    let models = root.join("models");
    let data = root.join("data");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::create_dir_all(data.join("train/10_dog")).unwrap();
    std::fs::write(models.join("v1-5-pruned-emaonly.safetensors"), b"weights").unwrap();
    (vec![models], vec![data])
}
const WAIT: Duration = Duration::from_secs(30);

fn spec(gpus: &str) -> String {
    format!(
        r#"
name = "sks-dog"
[model]
pretrained_model_name_or_path = "v1-5-pruned-emaonly.safetensors"
[dataset]
train_data_dir = "train"
resolution = "512"
[training]
max_train_epochs = 1
[resources]
gpus = "{gpus}"
max_restarts = 0
"#
    )
}

struct Cluster {
    address: String,
    dir: tempfile::TempDir,
    stop_server: Option<oneshot::Sender<()>>,
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("state.redb")).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let config = ServerConfig {
            coordinator: CoordinatorConfig::default(),
            artifacts: ArtifactConfig {
                root: dir.path().join("artifacts"),
                quota_bytes: 1 << 30,
                max_artifact_bytes: 1 << 28,
                keep_checkpoints: 2,
            },
            token: Some(TOKEN.to_owned()),
            tls: None,
            leader_ttl: Duration::from_secs(10),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server::serve(store, config, listener, async {
            let _ = stopped.await;
        }));
        Cluster {
            address: format!("http://{addr}"),
            dir,
            stop_server: Some(stop),
        }
    }

    /// Starts a worker with two simulated GPUs running `script` for every rank; returns the
    /// trigger of its shutdown and its task.
    fn worker(
        &self,
        name: &str,
        script: &str,
    ) -> (
        oneshot::Sender<()>,
        tokio::task::JoinHandle<loractl_worker::Result<()>>,
    ) {
        let root = self.dir.path().join(name);
        let (model_dirs, data_dirs) = allowed_dirs(&root);
        let config = WorkerConfig {
            model_dirs,
            data_dirs,
            coordinator: self.address.clone(),
            name: Some(name.to_owned()),
            simulated_gpus: 2,
            work_dir: root.join("work"),
            cache_dir: root.join("cache"),
            rank_command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            stop_grace_secs: 1,
            ..WorkerConfig::default()
        };
        config.validate().unwrap();
        let gpus = gpu::discover(&config.gpu_selection(), config.simulated_gpus).unwrap();
        let daemon = Daemon::new(config, gpus, Some(TOKEN.to_owned()), None).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(daemon.run(async {
            let _ = stopped.await;
        }));
        (stop, task)
    }

    async fn jobs(&self) -> JobServiceClient<Authed> {
        let link = Link::new(&self.address, Some(TOKEN), None).unwrap();
        link.jobs().await.unwrap()
    }

    async fn artifacts(&self) -> ArtifactServiceClient<Authed> {
        let link = Link::new(&self.address, Some(TOKEN), None).unwrap();
        link.artifacts().await.unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(stop) = self.stop_server.take() {
            let _ = stop.send(());
        }
    }
}

async fn submit(jobs: &mut JobServiceClient<Authed>, gpus: &str) -> Job {
    submit_spec(jobs, spec(gpus)).await
}

async fn submit_spec(jobs: &mut JobServiceClient<Authed>, spec_toml: String) -> Job {
    let response = jobs
        .submit_job(pb::SubmitJobRequest {
            spec_toml,
            priority: 0,
        })
        .await
        .unwrap()
        .into_inner();
    Job::try_from(response.job.unwrap()).unwrap()
}

async fn watch_stream(
    jobs: &mut JobServiceClient<Authed>,
    job: &Job,
) -> tonic::Streaming<pb::JobEvent> {
    jobs.watch_job(pb::WatchJobRequest {
        job_id: job.id.to_string(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// Follows the job until `until` holds for it; returns every event seen.
async fn watch_until(
    jobs: &mut JobServiceClient<Authed>,
    job: &Job,
    until: impl Fn(&Job) -> bool,
) -> (Job, Vec<JobEvent>) {
    let stream = watch_stream(jobs, job).await;
    follow_until(stream, until).await
}

async fn follow_until(
    mut stream: tonic::Streaming<pb::JobEvent>,
    until: impl Fn(&Job) -> bool,
) -> (Job, Vec<JobEvent>) {
    let mut events = Vec::new();
    let found = tokio::time::timeout(WAIT, async {
        while let Some(event) = stream.next().await {
            let event = JobEvent::try_from(event.unwrap()).unwrap();
            events.push(event.clone());
            if let JobEvent::State(j) = event {
                if until(&j) {
                    return Some(j);
                }
            }
        }
        None
    })
    .await
    .expect("timed out watching the job");
    (
        found.expect("the watch ended before the condition held"),
        events,
    )
}

async fn log_lines(jobs: &mut JobServiceClient<Authed>, job: &Job) -> Vec<String> {
    let mut stream = jobs
        .get_logs(pb::GetLogsRequest {
            job_id: job.id.to_string(),
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut lines = Vec::new();
    while let Some(line) = stream.next().await {
        lines.push(line.unwrap().text);
    }
    lines
}

/// Resolves when process `pid` has ended (pidfd becomes readable), without polling.
async fn process_ended(pid: i32) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return; // already gone
    }
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open and unchanged.
    let fd = unsafe { tokio::io::unix::AsyncFd::register(fd) }
        .map_err(|e| e.to_string())
        .unwrap();
    let _ = fd.readable().await.unwrap();
}

const TRAIN: &str = r#"
echo "training $LORACTL_JOB_ID attempt $LORACTL_ATTEMPT on GPUs $CUDA_VISIBLE_DEVICES as rank $LORACTL_RANK of $LORACTL_WORLD_SIZE"
echo '@loractl {"progress":{"step":1,"total_steps":2,"loss":0.5,"lr":0.0001}}'
printf 'lora weights' > sks-dog.safetensors
echo '@loractl {"artifact":{"path":"sks-dog.safetensors","kind":"lora"}}'
printf 'state at step 2' > step2.ckpt
echo '@loractl {"artifact":{"path":"step2.ckpt","kind":"checkpoint"}}'
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_on_the_worker_and_its_artifacts_are_uploaded() {
    let cluster = Cluster::start().await;
    let mut jobs = cluster.jobs().await;
    let job = submit(&mut jobs, "all").await;
    // The watch is open before any worker exists, so it sees every event of the run.
    let watch = watch_stream(&mut jobs, &job).await;
    let (stop, worker) = cluster.worker("box", TRAIN);
    let (done, events) = follow_until(watch, |j| j.state.is_terminal()).await;
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.last_failure);
    assert!(events
        .iter()
        .any(|e| matches!(e, JobEvent::Progress(p) if p.step == 1 && p.loss == 0.5)));
    let logs = log_lines(&mut jobs, &job).await;
    // `all` on a worker with two GPUs: a rank on each.
    for (gpu, rank) in [(0, 0), (1, 1)] {
        assert!(
            logs.contains(&format!(
                "training {} attempt 0 on GPUs {gpu} as rank {rank} of 2",
                job.id
            )),
            "{logs:?}"
        );
    }

    let listed = cluster
        .artifacts()
        .await
        .list_artifacts(pb::ListArtifactsRequest {
            job_id: job.id.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .artifacts;
    let kinds: Vec<(i32, String)> = listed.iter().map(|a| (a.kind, a.name.clone())).collect();
    assert!(kinds.contains(&(
        pb::ArtifactKind::Lora as i32,
        "sks-dog.safetensors".to_owned()
    )));
    let checkpoint = listed
        .iter()
        .find(|a| a.kind == pb::ArtifactKind::Checkpoint as i32)
        .expect("checkpoint uploaded");
    assert_eq!(
        done.latest_checkpoint.map(pb::Digest::from),
        checkpoint.digest.clone()
    );
    let _ = stop.send(());
    tokio::time::timeout(WAIT, worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_rank_spends_a_restart_and_resumes_from_its_checkpoint() {
    let cluster = Cluster::start().await;
    let script = r#"
if [ "$LORACTL_ATTEMPT" = 0 ]; then
  printf 'state at step 7' > step7.ckpt
  echo '@loractl {"artifact":{"path":"step7.ckpt","kind":"checkpoint"}}'
  # Die the way the OOM killer does; what was printed before still reaches the worker.
  kill -9 $$
fi
echo "resumed from: $(cat "$LORACTL_RESUME")"
"#;
    let (_stop, _worker) = cluster.worker("box", script);
    let mut jobs = cluster.jobs().await;
    let job = submit_spec(
        &mut jobs,
        spec("0").replace("max_restarts = 0", "max_restarts = 1"),
    )
    .await;
    let (done, _) = watch_until(&mut jobs, &job, |j| j.state.is_terminal()).await;
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.last_failure);
    // Nobody in loractl sent that SIGKILL: a crash, which spends a restart.
    assert_eq!((done.attempt, done.counted_restarts), (1, 1));
    assert_eq!(
        done.last_failure.map(|f| f.kind),
        Some(FailureKind::Crashed)
    );
    let logs = log_lines(&mut jobs, &job).await;
    assert!(
        logs.contains(&"resumed from: state at step 7".to_owned()),
        "{logs:?}"
    );
}

/// A rank that aborts at every attempt (an absurd spec failing its allocation made 147
/// attempts in 50 s) fails the job once its restarts are spent, and says it was a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_that_keeps_aborting_ends_as_a_crash_loop() {
    let cluster = Cluster::start().await;
    let (_stop, _worker) = cluster.worker("box", "echo 'allocation failed' >&2; kill -ABRT $$");
    let mut jobs = cluster.jobs().await;
    let job = submit_spec(
        &mut jobs,
        spec("0").replace("max_restarts = 0", "max_restarts = 2"),
    )
    .await;
    let (done, _) = watch_until(&mut jobs, &job, |j| j.state.is_terminal()).await;
    assert_eq!(done.state, JobState::Failed);
    assert_eq!((done.attempt, done.counted_restarts), (2, 2));
    let failure = done.last_failure.expect("failure recorded");
    assert_eq!(failure.kind, FailureKind::Crashed);
    assert!(
        failure.message.contains("crash loop") && failure.message.contains("signal 6"),
        "{}",
        failure.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_fails_the_job_without_retry() {
    let cluster = Cluster::start().await;
    let (_stop, _worker) = cluster.worker(
        "box",
        "echo 'train_data_dir `train` does not exist' >&2; exit 78",
    );
    let mut jobs = cluster.jobs().await;
    let job = submit(&mut jobs, "all").await;
    let (done, _) = watch_until(&mut jobs, &job, |j| j.state.is_terminal()).await;
    assert_eq!((done.state, done.attempt), (JobState::Failed, 0));
    let failure = done.last_failure.expect("failure recorded");
    assert_eq!(failure.kind, FailureKind::BadConfig);
    assert!(failure.message.contains("code 78"), "{}", failure.message);
}

const LONG: &str = "sleep 1000 & echo \"child $!\"; wait";

async fn child_pid(jobs: &mut JobServiceClient<Authed>, job: &Job) -> i32 {
    let mut stream = jobs
        .get_logs(pb::GetLogsRequest {
            job_id: job.id.to_string(),
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(WAIT, async {
        while let Some(line) = stream.next().await {
            if let Some(pid) = line.unwrap().text.strip_prefix("child ") {
                return pid.parse().unwrap();
            }
        }
        panic!("log ended without the child's pid");
    })
    .await
    .expect("timed out waiting for the rank's output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_the_ranks_process_group() {
    let cluster = Cluster::start().await;
    let (_stop, _worker) = cluster.worker("box", LONG);
    let mut jobs = cluster.jobs().await;
    let job = submit(&mut jobs, "1").await;
    let grandchild = child_pid(&mut jobs, &job).await;
    let cancelled = jobs
        .cancel_job(pb::CancelJobRequest {
            job_id: job.id.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        Job::try_from(cancelled.job.unwrap()).unwrap().state,
        JobState::Cancelled
    );
    tokio::time::timeout(WAIT, process_ended(grandchild))
        .await
        .expect("the rank's child outlived the cancel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_shutdown_stops_its_ranks_and_the_job_is_retried_uncounted() {
    let cluster = Cluster::start().await;
    let (stop, worker) = cluster.worker("box", LONG);
    let mut jobs = cluster.jobs().await;
    let job = submit(&mut jobs, "all").await;
    let grandchild = child_pid(&mut jobs, &job).await;
    let _ = stop.send(());
    tokio::time::timeout(WAIT, worker)
        .await
        .expect("the worker drains within its grace")
        .unwrap()
        .unwrap();
    tokio::time::timeout(WAIT, process_ended(grandchild))
        .await
        .expect("the rank's child outlived the worker");
    let (after, _) = watch_until(&mut jobs, &job, |j| j.attempt == 1).await;
    assert_eq!(after.state, JobState::Restarting);
    assert_eq!(after.counted_restarts, 0);
    assert_eq!(
        after.last_failure.map(|f| f.kind),
        Some(FailureKind::Killed)
    );
}

/// The rank rewrites `<name>-state.safetensors` while the worker uploads the previous one:
/// the upload sends the bytes of the file it opened and hashed, not whatever the name holds
/// by the time it streams (which failed the upload and reported a good rank as failed).
#[tokio::test]
async fn an_upload_sends_the_file_it_opened_even_if_the_name_is_replaced() {
    let cluster = Cluster::start().await;
    let mut artifacts = cluster.artifacts().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zenny-state.safetensors");
    let first: Vec<u8> = (0..1_500_000u32).map(|i| (i % 239) as u8).collect();
    std::fs::write(&path, &first).unwrap();
    let file = tokio::fs::File::open(&path).await.unwrap();
    let next = dir.path().join(".next");
    std::fs::write(&next, b"the next step's state").unwrap();
    std::fs::rename(&next, &path).unwrap();
    let info = client::upload_open_file(
        &mut artifacts,
        file,
        &path,
        ArtifactKind::BaseModel,
        None,
        "state".into(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(info.size, first.len() as u64);
    let cache = dir.path().join("cache");
    let fetched = client::download_to_cache(&mut artifacts, &cache, &info.digest)
        .await
        .unwrap();
    assert_eq!(std::fs::read(fetched).unwrap(), first);
}

/// Ranks starting together fetch the same resume checkpoint or dataset file at once: each
/// gets the verified file (they appended to one `.part` file, which then failed its hash).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_downloads_of_one_blob_all_succeed() {
    let cluster = Cluster::start().await;
    let mut artifacts = cluster.artifacts().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state.safetensors");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 233) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let info = client::upload_file(
        &mut artifacts,
        &file,
        ArtifactKind::BaseModel,
        None,
        "state".into(),
        None,
    )
    .await
    .unwrap();
    let cache = dir.path().join("cache");
    let downloads: Vec<_> = (0..8)
        .map(|_| {
            let (mut artifacts, cache, digest) = (artifacts.clone(), cache.clone(), info.digest);
            tokio::spawn(
                async move { client::download_to_cache(&mut artifacts, &cache, &digest).await },
            )
        })
        .collect();
    for download in downloads {
        let path = download.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(std::fs::read(path).unwrap(), data);
    }
}

#[tokio::test]
async fn artifacts_download_into_the_cache_verified() {
    let cluster = Cluster::start().await;
    let mut artifacts = cluster.artifacts().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    let data: Vec<u8> = (0..2_500_000u32).map(|i| (i % 241) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let info = client::upload_file(
        &mut artifacts,
        &file,
        ArtifactKind::BaseModel,
        None,
        "model.safetensors".into(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(info.size, data.len() as u64);
    // Uploading the same content again sends nothing new and returns the same artifact.
    let again = client::upload_file(
        &mut artifacts,
        &file,
        ArtifactKind::BaseModel,
        None,
        "x".into(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(again.digest, info.digest);

    let cache = dir.path().join("cache");
    // A partial download left by an earlier attempt is resumed.
    let partial = client::cached_path(&cache, &info.digest).with_extension("part");
    std::fs::create_dir_all(partial.parent().unwrap()).unwrap();
    std::fs::write(&partial, &data[..1_000_000]).unwrap();
    let path = client::download_to_cache(&mut artifacts, &cache, &info.digest)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert!(!partial.exists());
    // A corrupt partial download is detected and discarded.
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&partial, b"garbage!").unwrap();
    let err = client::download_to_cache(&mut artifacts, &cache, &info.digest)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("discarded"), "{err}");
    assert!(!partial.exists());
    let path = client::download_to_cache(&mut artifacts, &cache, &info.digest)
        .await
        .unwrap();
    assert_eq!(std::fs::read(path).unwrap(), data);
}

async fn serve_on(
    listener: tokio::net::TcpListener,
    db: &std::path::Path,
    artifacts: &std::path::Path,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<loractl_coordinator::Result<()>>,
) {
    let store = RedbStore::open(db).unwrap();
    let config = ServerConfig {
        coordinator: CoordinatorConfig::default(),
        artifacts: ArtifactConfig {
            root: artifacts.to_owned(),
            quota_bytes: 1 << 20,
            max_artifact_bytes: 1 << 20,
            keep_checkpoints: 1,
        },
        token: Some(TOKEN.to_owned()),
        tls: None,
        leader_ttl: Duration::from_secs(10),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server::serve(store, config, listener, async {
        let _ = stopped.await;
    }));
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_reconnects_to_a_restarted_coordinator_and_its_job_continues() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.redb");
    let store_dir = dir.path().join("artifacts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let address = format!("http://{addr}");
    let (stop, first) = serve_on(listener, &db, &store_dir).await;

    // The rank runs until the test writes to this pipe.
    let go = dir.path().join("go");
    let c_path = std::ffi::CString::new(go.display().to_string()).unwrap();
    // SAFETY: a valid NUL-terminated path and a mode.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let script = format!("echo started; read x < '{}'; echo finishing", go.display());
    let (model_dirs, data_dirs) = allowed_dirs(dir.path());
    let config = WorkerConfig {
        model_dirs,
        data_dirs,
        coordinator: address.clone(),
        name: Some("box".into()),
        gpus: "cpu".into(),
        work_dir: dir.path().join("work"),
        cache_dir: dir.path().join("cache"),
        rank_command: vec!["/bin/sh".into(), "-c".into(), script],
        ..WorkerConfig::default()
    };
    let daemon = Daemon::new(config, Vec::new(), Some(TOKEN.to_owned()), None).unwrap();
    let (_stop_worker, worker_stopped) = oneshot::channel::<()>();
    tokio::spawn(daemon.run(async {
        let _ = worker_stopped.await;
    }));

    let link = Link::new(&address, Some(TOKEN), None).unwrap();
    let mut jobs = link.jobs().await.unwrap();
    let job = submit(&mut jobs, "cpu").await;
    let mut follow = jobs
        .get_logs(pb::GetLogsRequest {
            job_id: job.id.to_string(),
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(WAIT, async {
        while let Some(line) = follow.next().await {
            if line.unwrap().text == "started" {
                return;
            }
        }
        panic!("log ended before the rank started");
    })
    .await
    .expect("the rank starts");

    // Restart the coordinator on the same address and state file.
    let _ = stop.send(());
    tokio::time::timeout(WAIT, first)
        .await
        .expect("the coordinator stops with a worker connected")
        .unwrap()
        .unwrap();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (_stop, _second) = serve_on(listener, &db, &store_dir).await;

    // Let the rank finish; its result reaches the new coordinator through the reconnect.
    tokio::task::spawn_blocking(move || std::fs::write(go, "go\n"))
        .await
        .unwrap()
        .unwrap();
    let mut jobs = link.jobs().await.unwrap();
    let (done, _) = watch_until(&mut jobs, &job, |j| j.state.is_terminal()).await;
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.last_failure);
    assert_eq!(
        done.attempt, 0,
        "the running rank was kept across the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranks_of_a_multi_worker_job_meet_through_the_rendezvous() {
    let cluster = Cluster::start().await;
    let script = r#"
echo '@loractl {"rendezvous":{"address":"rank'"$LORACTL_RANK"'.test:1234"}}'
read line
echo "rank $LORACTL_RANK peers: $line"
"#;
    let (_stop_a, _a) = cluster.worker("a", script);
    let (_stop_b, _b) = cluster.worker("b", script);
    let mut jobs = cluster.jobs().await;
    let spec = spec("cpu").replace("[resources]", "[resources]\nworkers = 2");
    let job = Job::try_from(
        jobs.submit_job(pb::SubmitJobRequest {
            spec_toml: spec,
            priority: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap(),
    )
    .unwrap();
    let (done, _) = watch_until(&mut jobs, &job, |j| j.state.is_terminal()).await;
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.last_failure);
    let logs = log_lines(&mut jobs, &job).await;
    let peers = r#"@loractl {"peers":{"addresses":["rank0.test:1234","rank1.test:1234"]}}"#;
    for rank in 0..2 {
        let expected = format!("rank {rank} peers: {peers}");
        assert!(logs.contains(&expected), "{expected} not in {logs:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_outside_the_allowed_folders_fails_the_job_without_running_it() {
    let cluster = Cluster::start().await;
    let (_stop, _worker) = cluster.worker("box", "echo 'must not run'");
    let mut jobs = cluster.jobs().await;
    let escape = spec("all").replace(
        "train_data_dir = \"train\"",
        "train_data_dir = \"../../etc\"",
    );
    let job = Job::try_from(
        jobs.submit_job(pb::SubmitJobRequest {
            spec_toml: escape,
            priority: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap(),
    )
    .unwrap();
    let (done, _) = watch_until(&mut jobs, &job, |j| j.state.is_terminal()).await;
    assert_eq!((done.state, done.attempt), (JobState::Failed, 0));
    let failure = done.last_failure.expect("failure recorded");
    assert_eq!(failure.kind, FailureKind::BadConfig);
    assert!(
        failure.message.contains("dataset.train_data_dir") && failure.message.contains("data_dirs"),
        "{}",
        failure.message
    );
    assert!(
        log_lines(&mut jobs, &job).await.is_empty(),
        "the rank never started"
    );
}
