//! The worker daemon against a real coordinator in process on 127.0.0.1:0, with a shell script
//! as the rank command (the training program plugs in at the same place): jobs run, report
//! progress and artifacts, resume from their checkpoint after a kill, fail without retry on a
//! bad config, and a cancel or a worker shutdown takes down the rank's whole process group.

use std::time::Duration;

use loractl_proto::domain::{ArtifactKind, FailureKind, Job, JobEvent, JobState};
use loractl_proto::pb;
use loractl_proto::pb::job_service_client::JobServiceClient;
use loractl_tests::inproc::{
    self, artifacts_of, assert_retried, follow_logs, follow_until, log_lines, watch, Coordinator,
    Worker,
};
use loractl_tests::process_ended;
use loractl_tests::spec::{job_spec, resources};
use loractl_worker::client::{self, Authed, Link};
use loractl_worker::config::WorkerConfig;

const TOKEN: &str = "worker-test-token";
const WAIT: Duration = inproc::WAIT;
const MODEL: &str = "v1-5-pruned-emaonly.safetensors";

fn spec(gpus: &str) -> String {
    job_spec("sks-dog", MODEL, &resources(gpus, 0))
}

/// Starts worker `name` with two simulated GPUs, running `script` for every rank.
fn worker(cluster: &Coordinator, name: &str, script: &str) -> Worker {
    let config = WorkerConfig {
        simulated_gpus: 2,
        gpus: WorkerConfig::default().gpus,
        stop_grace_secs: 1,
        ..Worker::config(
            &cluster.dir.path().join(name),
            &cluster.url,
            name,
            MODEL,
            script,
        )
    };
    Worker::start(config, Some(TOKEN))
}

async fn submit(jobs: &mut JobServiceClient<Authed>, gpus: &str) -> Job {
    inproc::submit(jobs, &spec(gpus)).await
}

async fn watch_until(
    jobs: &mut JobServiceClient<Authed>,
    job: &Job,
    until: impl Fn(&Job) -> bool,
) -> (Job, Vec<JobEvent>) {
    inproc::watch_until(jobs, job.id.as_str(), until).await
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
    let cluster = Coordinator::start(Some(TOKEN)).await;
    let mut jobs = cluster.jobs().await;
    let job = submit(&mut jobs, "all").await;
    // The watch is open before any worker exists, so it sees every event of the run.
    let mut watch = watch(&mut jobs, job.id.as_str()).await;
    let worker = worker(&cluster, "box", TRAIN);
    let (done, events) = follow_until(&mut watch, |j| j.state.is_terminal()).await;
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.last_failure);
    assert!(events
        .iter()
        .any(|e| matches!(e, JobEvent::Progress(p) if p.step == 1 && p.loss == 0.5)));
    let logs = log_lines(&mut jobs, job.id.as_str()).await;
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

    let listed = artifacts_of(&mut cluster.artifacts().await, job.id.as_str()).await;
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
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_rank_spends_a_restart_and_resumes_from_its_checkpoint() {
    let cluster = Coordinator::start(Some(TOKEN)).await;
    let script = r#"
if [ "$LORACTL_ATTEMPT" = 0 ]; then
  printf 'state at step 7' > step7.ckpt
  echo '@loractl {"artifact":{"path":"step7.ckpt","kind":"checkpoint"}}'
  # Die the way the OOM killer does; what was printed before still reaches the worker.
  kill -9 $$
fi
echo "resumed from: $(cat "$LORACTL_RESUME")"
"#;
    let _worker = worker(&cluster, "box", script);
    let mut jobs = cluster.jobs().await;
    let job = inproc::submit(&mut jobs, &job_spec("sks-dog", MODEL, &resources("0", 1))).await;
    let (done, _) = watch_until(&mut jobs, &job, |j| j.state.is_terminal()).await;
    // Nobody in loractl sent that SIGKILL: a crash, which spends a restart.
    assert_retried(&done, JobState::Succeeded, (1, 1), FailureKind::Crashed);
    let logs = log_lines(&mut jobs, job.id.as_str()).await;
    assert!(
        logs.contains(&"resumed from: state at step 7".to_owned()),
        "{logs:?}"
    );
}

/// A rank that aborts at every attempt (an absurd spec failing its allocation made 147
/// attempts in 50 s) fails the job once its restarts are spent, and says it was a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_that_keeps_aborting_ends_as_a_crash_loop() {
    let cluster = Coordinator::start(Some(TOKEN)).await;
    let _worker = worker(
        &cluster,
        "box",
        "echo 'allocation failed' >&2; kill -ABRT $$",
    );
    let mut jobs = cluster.jobs().await;
    let job = inproc::submit(&mut jobs, &job_spec("sks-dog", MODEL, &resources("0", 2))).await;
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
    let cluster = Coordinator::start(Some(TOKEN)).await;
    let _worker = worker(
        &cluster,
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
    follow_logs(jobs, job.id.as_str(), |line| {
        line.strip_prefix("child ").map(|pid| pid.parse().unwrap())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_the_ranks_process_group() {
    let cluster = Coordinator::start(Some(TOKEN)).await;
    let _worker = worker(&cluster, "box", LONG);
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
    let cluster = Coordinator::start(Some(TOKEN)).await;
    let worker = worker(&cluster, "box", LONG);
    let mut jobs = cluster.jobs().await;
    let job = submit(&mut jobs, "all").await;
    let grandchild = child_pid(&mut jobs, &job).await;
    // It drains within its grace.
    worker.stop().await.unwrap();
    tokio::time::timeout(WAIT, process_ended(grandchild))
        .await
        .expect("the rank's child outlived the worker");
    let (after, _) = watch_until(&mut jobs, &job, |j| j.attempt == 1).await;
    assert_retried(&after, JobState::Restarting, (1, 0), FailureKind::Killed);
}

/// The rank rewrites `<name>-state.safetensors` while the worker uploads the previous one:
/// the upload sends the bytes of the file it opened and hashed, not whatever the name holds
/// by the time it streams (which failed the upload and reported a good rank as failed).
#[tokio::test]
async fn an_upload_sends_the_file_it_opened_even_if_the_name_is_replaced() {
    let cluster = Coordinator::start(Some(TOKEN)).await;
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
    let cluster = Coordinator::start(Some(TOKEN)).await;
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
    let cluster = Coordinator::start(Some(TOKEN)).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_reconnects_to_a_restarted_coordinator_and_its_job_continues() {
    let mut cluster = Coordinator::start(Some(TOKEN)).await;
    let dir = cluster.dir.path();

    // The rank runs until the test writes to this pipe.
    let go = dir.join("go");
    let c_path = std::ffi::CString::new(go.display().to_string()).unwrap();
    // SAFETY: a valid NUL-terminated path and a mode.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let script = format!("echo started; read x < '{}'; echo finishing", go.display());
    let _worker = Worker::start(
        Worker::config(dir, &cluster.url, "box", MODEL, &script),
        Some(TOKEN),
    );

    let link = Link::new(&cluster.url, Some(TOKEN), None).unwrap();
    let mut jobs = link.jobs().await.unwrap();
    let job = submit(&mut jobs, "cpu").await;
    // The rank starts.
    follow_logs(&mut jobs, job.id.as_str(), |line| {
        (line == "started").then_some(())
    })
    .await;

    // Restart the coordinator on the same address and state file; it stops with a worker
    // connected.
    cluster.restart().await;

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
    let cluster = Coordinator::start(Some(TOKEN)).await;
    let script = r#"
echo '@loractl {"rendezvous":{"address":"rank'"$LORACTL_RANK"'.test:1234"}}'
read line
echo "rank $LORACTL_RANK peers: $line"
"#;
    let _a = worker(&cluster, "a", script);
    let _b = worker(&cluster, "b", script);
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
    let logs = log_lines(&mut jobs, job.id.as_str()).await;
    let peers = r#"@loractl {"peers":{"addresses":["rank0.test:1234","rank1.test:1234"]}}"#;
    for rank in 0..2 {
        let expected = format!("rank {rank} peers: {peers}");
        assert!(logs.contains(&expected), "{expected} not in {logs:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_outside_the_allowed_folders_fails_the_job_without_running_it() {
    let cluster = Coordinator::start(Some(TOKEN)).await;
    let _worker = worker(&cluster, "box", "echo 'must not run'");
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
        log_lines(&mut jobs, job.id.as_str()).await.is_empty(),
        "the rank never started"
    );
}
