//! Job logs held by the coordinator: lines of the current attempt, capped per job, kept in
//! memory for a bounded number of ended jobs and on disk for every job, across restarts.

use loractl_coordinator::server::actor::{self, CoordinatorConfig};
use loractl_coordinator::store::MemoryStore;
use loractl_proto::domain::{LogLine, LogStream, RankId, RankOutcome, WorkerMessage};
use loractl_tests::inproc::registration;
use loractl_tests::spec::job_spec;

/// Registers a worker, then runs two jobs on it that log `line 0` to `line 4` and succeed;
/// returns their ids.
async fn two_logged_jobs(handle: &actor::Handle) -> Vec<loractl_proto::domain::JobId> {
    let registered = handle.register(registration("box", &[0])).await.unwrap();
    let worker = registered.worker_id;
    let session = handle.open_session(worker.clone()).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (job, _) = handle
            .submit(job_spec("logs", "/models/sd15.safetensors", ""), 0)
            .await
            .unwrap();
        let rank = RankId {
            job_id: job.id.clone(),
            attempt: 0,
            rank: 0,
        };
        for i in 0..5 {
            let line = LogLine {
                job_id: job.id.clone(),
                attempt: 0,
                rank: 0,
                stream: LogStream::Stdout,
                text: format!("line {i}"),
                at: 0,
            };
            handle
                .worker_message(worker.clone(), session.id, WorkerMessage::Log(line))
                .await
                .unwrap();
        }
        let done = RankOutcome::Succeeded { artifacts: vec![] };
        handle
            .worker_message(
                worker.clone(),
                session.id,
                WorkerMessage::Result {
                    rank,
                    outcome: done,
                },
            )
            .await
            .unwrap();
        ids.push(job.id);
    }
    ids
}

fn texts(lines: Vec<LogLine>) -> Vec<String> {
    lines.into_iter().map(|l| l.text).collect()
}

#[tokio::test]
async fn logs_are_capped_and_kept_for_recent_jobs_only() {
    let config = CoordinatorConfig {
        log_lines_per_job: 3,
        ended_jobs_with_logs: 1,
        ..CoordinatorConfig::default()
    };
    let (handle, _loop) = actor::start(MemoryStore::new(), config).await.unwrap();
    let ids = two_logged_jobs(&handle).await;
    let latest = handle.logs(ids[1].clone(), true).await.unwrap();
    assert_eq!(texts(latest.lines), ["line 2", "line 3", "line 4"]);
    assert!(
        latest.follow.is_none(),
        "an ended job's log has nothing to follow"
    );
    let oldest = handle.logs(ids[0].clone(), false).await.unwrap();
    assert!(
        oldest.lines.is_empty(),
        "only the latest ended job keeps its log"
    );
}

#[tokio::test]
async fn logs_on_disk_outlive_memory_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = CoordinatorConfig {
        log_lines_per_job: 3,
        ended_jobs_with_logs: 1,
        log_dir: Some(dir.path().join("logs")),
        ..CoordinatorConfig::default()
    };
    let store = MemoryStore::new();
    let (handle, event_loop) = actor::start(store.clone(), config.clone()).await.unwrap();
    let ids = two_logged_jobs(&handle).await;
    // Dropped from memory with older ended jobs, read back from disk (the latest 3 lines).
    let oldest = handle.logs(ids[0].clone(), false).await.unwrap();
    assert_eq!(texts(oldest.lines), ["line 2", "line 3", "line 4"]);
    drop(handle);
    tokio::time::timeout(std::time::Duration::from_secs(10), event_loop)
        .await
        .expect("the loop ends with its last handle")
        .unwrap();

    // A new coordinator on the same state and folder.
    let (handle, _loop) = actor::start(store, config).await.unwrap();
    for id in &ids {
        let logs = handle.logs(id.clone(), false).await.unwrap();
        assert_eq!(texts(logs.lines), ["line 2", "line 3", "line 4"], "{id}");
    }
}
