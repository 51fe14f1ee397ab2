//! The `loractl-worker` binary, killed with SIGKILL mid-run: its rank dies with it (no orphan
//! keeps a GPU), the coordinator declares it lost after the heartbeat timeout, and the job
//! moves to another worker process and resumes from the checkpoint the first one uploaded.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use loractl_coordinator::artifacts::ArtifactConfig;
use loractl_coordinator::server::{self, CoordinatorConfig, ServerConfig};
use loractl_coordinator::store::RedbStore;
use loractl_proto::domain::{FailureKind, Job, JobEvent, JobState};
use loractl_proto::pb;
use loractl_worker::client::Link;
use tokio::sync::oneshot;
use tokio_stream::StreamExt;

const TOKEN: &str = "binary-test-token";
const WAIT: Duration = Duration::from_secs(60);

const SCRIPT: &str = r#"
if [ "$LORACTL_ATTEMPT" = 0 ]; then
  echo "rank pid $$"
  printf 'state at step 5' > step5.ckpt
  echo '@loractl {"artifact":{"path":"step5.ckpt","kind":"checkpoint"}}'
  exec sleep 1000
fi
echo "resumed from: $(cat "$LORACTL_RESUME")"
"#;

const SPEC: &str = r#"
name = "survivor"
[model]
pretrained_model_name_or_path = "sd15.safetensors"
[dataset]
train_data_dir = "train"
resolution = "512"
[training]
max_train_epochs = 1
[resources]
gpus = "all"
max_restarts = 0
"#;

struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_worker(dir: &std::path::Path, name: &str, address: &str) -> Worker {
    let root = dir.join(name);
    std::fs::create_dir_all(root.join("models")).unwrap();
    std::fs::create_dir_all(root.join("data/train")).unwrap();
    std::fs::write(root.join("models/sd15.safetensors"), b"weights").unwrap();
    let config = format!(
        r#"
coordinator = "{address}"
name = "{name}"
simulated_gpus = 1
work_dir = "{work}"
model_dirs = ["{models}"]
data_dirs = ["{data}"]
cache_dir = "{cache}"
rank_command = ["/bin/sh", "-c", '''{SCRIPT}''']
"#,
        work = root.join("work").display(),
        models = root.join("models").display(),
        data = root.join("data").display(),
        cache = root.join("cache").display(),
    );
    let path = root.join("worker.toml");
    std::fs::write(&path, config).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_loractl-worker"))
        .arg("--config")
        .arg(&path)
        .env("LORACTL_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Worker(child)
}

/// Resolves when process `pid` has ended (pidfd becomes readable), without polling.
async fn process_ended(pid: i32) {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return;
    }
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open and unchanged.
    let fd = unsafe { tokio::io::unix::AsyncFd::register(fd) }
        .map_err(|e| e.to_string())
        .unwrap();
    let _ = fd.readable().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_process_takes_its_rank_down_and_the_job_resumes_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("state.redb")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let config = ServerConfig {
        coordinator: CoordinatorConfig {
            heartbeat_interval: Duration::from_millis(200),
            heartbeat_timeout: Duration::from_secs(1),
            ..CoordinatorConfig::default()
        },
        artifacts: ArtifactConfig {
            root: dir.path().join("artifacts"),
            quota_bytes: 1 << 20,
            max_artifact_bytes: 1 << 20,
            keep_checkpoints: 2,
        },
        token: Some(TOKEN.to_owned()),
        leader_ttl: Duration::from_secs(10),
        tls: None,
    };
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server::serve(store, config, listener, async {
        let _ = stopped.await;
    }));

    let link = Link::new(&address, Some(TOKEN), None).unwrap();
    let mut jobs = link.jobs().await.unwrap();
    let job = Job::try_from(
        jobs.submit_job(pb::SubmitJobRequest {
            spec_toml: SPEC.to_owned(),
            priority: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap(),
    )
    .unwrap();
    let mut watch = jobs
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut logs = jobs
        .get_logs(pb::GetLogsRequest {
            job_id: job.id.to_string(),
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();

    let mut first = start_worker(dir.path(), "first", &address);
    let rank_pid: i32 = tokio::time::timeout(WAIT, async {
        while let Some(line) = logs.next().await {
            if let Some(pid) = line.unwrap().text.strip_prefix("rank pid ") {
                return pid.parse().unwrap();
            }
        }
        panic!("the log ended before the rank printed its pid");
    })
    .await
    .expect("the first worker starts the rank");
    // Wait for the checkpoint to be recorded before the crash.
    tokio::time::timeout(WAIT, async {
        while let Some(event) = watch.next().await {
            if let JobEvent::State(j) = JobEvent::try_from(event.unwrap()).unwrap() {
                if j.latest_checkpoint.is_some() {
                    return;
                }
            }
        }
        panic!("the watch ended before a checkpoint was recorded");
    })
    .await
    .expect("the checkpoint is recorded");

    first.0.kill().unwrap();
    first.0.wait().unwrap();
    tokio::time::timeout(WAIT, process_ended(rank_pid))
        .await
        .expect("the rank died with its worker");

    let _second = start_worker(dir.path(), "second", &address);
    let done = tokio::time::timeout(WAIT, async {
        while let Some(event) = watch.next().await {
            if let JobEvent::State(j) = JobEvent::try_from(event.unwrap()).unwrap() {
                if j.state.is_terminal() {
                    return j;
                }
            }
        }
        panic!("the watch ended without a final state");
    })
    .await
    .expect("the job finishes on the second worker");
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.last_failure);
    assert_eq!((done.attempt, done.counted_restarts), (1, 0));
    assert_eq!(
        done.last_failure.map(|f| f.kind),
        Some(FailureKind::WorkerLost)
    );
    let mut lines = Vec::new();
    let mut stream = jobs
        .get_logs(pb::GetLogsRequest {
            job_id: job.id.to_string(),
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(line) = stream.next().await {
        lines.push(line.unwrap().text);
    }
    assert!(
        lines.contains(&"resumed from: state at step 5".to_owned()),
        "{lines:?}"
    );
}
