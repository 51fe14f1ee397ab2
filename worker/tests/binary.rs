//! The `loractl-worker` binary, killed with SIGKILL mid-run: its rank dies with it (no orphan
//! keeps a GPU), the coordinator declares it lost after the heartbeat timeout, and the job
//! moves to another worker process and resumes from the checkpoint the first one uploaded.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use loractl_proto::domain::{FailureKind, JobState};
use loractl_tests::inproc::{
    self, assert_retried, follow_logs, follow_until, log_lines, submit, watch, within, Coordinator,
};
use loractl_tests::process_ended;
use loractl_tests::spec::{job_spec, resources};

const TOKEN: &str = "binary-test-token";

const SCRIPT: &str = r#"
if [ "$LORACTL_ATTEMPT" = 0 ]; then
  echo "rank pid $$"
  printf 'state at step 5' > step5.ckpt
  echo '@loractl {"artifact":{"path":"step5.ckpt","kind":"checkpoint"}}'
  exec sleep 1000
fi
echo "resumed from: $(cat "$LORACTL_RESUME")"
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
    let folders = inproc::Worker::config(&root, address, name, "sd15.safetensors", SCRIPT);
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
metrics_listen = "127.0.0.1:0"
"#,
        work = folders.work_dir.display(),
        models = folders.model_dirs[0].display(),
        data = folders.data_dirs[0].display(),
        cache = folders.cache_dir.display(),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_process_takes_its_rank_down_and_the_job_resumes_elsewhere() {
    let server = Coordinator::start_with(Some(TOKEN), |_, config| {
        config.coordinator.heartbeat_interval = Duration::from_millis(200);
        config.coordinator.heartbeat_timeout = Duration::from_secs(1);
    })
    .await;
    let (dir, address) = (server.dir.path(), server.url.as_str());
    let mut jobs = server.jobs().await;
    let job = submit(
        &mut jobs,
        &job_spec("survivor", "sd15.safetensors", &resources("all", 0)),
    )
    .await;
    let mut watch = watch(&mut jobs, job.id.as_str()).await;
    let mut first = start_worker(dir, "first", address);
    // The first worker starts the rank.
    let rank_pid: i32 = follow_logs(&mut jobs, job.id.as_str(), |line| {
        line.strip_prefix("rank pid ")
            .map(|pid| pid.parse().unwrap())
    })
    .await;
    // Wait for the checkpoint to be recorded before the crash.
    follow_until(&mut watch, |j| j.latest_checkpoint.is_some()).await;

    first.0.kill().unwrap();
    first.0.wait().unwrap();
    within("the rank to die with its worker", process_ended(rank_pid)).await;

    let _second = start_worker(dir, "second", address);
    // The job finishes on the second worker.
    let (done, _) = follow_until(&mut watch, |j| j.state.is_terminal()).await;
    assert_retried(&done, JobState::Succeeded, (1, 0), FailureKind::WorkerLost);
    let lines = log_lines(&mut jobs, job.id.as_str()).await;
    assert!(
        lines.contains(&"resumed from: state at step 5".to_owned()),
        "{lines:?}"
    );
}
