//! Job logs held by the coordinator: lines of the current attempt, capped per job, and kept
//! for a bounded number of ended jobs.

use loractl_coordinator::server::actor::{self, CoordinatorConfig};
use loractl_coordinator::store::MemoryStore;
use loractl_proto::domain::{LogLine, LogStream, RankId, RankOutcome, WorkerMessage};
use loractl_tests::inproc::registration;
use loractl_tests::spec::job_spec;

#[tokio::test]
async fn logs_are_capped_and_kept_for_recent_jobs_only() {
    let config = CoordinatorConfig {
        log_lines_per_job: 3,
        ended_jobs_with_logs: 1,
        ..CoordinatorConfig::default()
    };
    let (handle, _loop) = actor::start(MemoryStore::new(), config).await.unwrap();
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
    let texts = |lines: Vec<LogLine>| lines.into_iter().map(|l| l.text).collect::<Vec<_>>();
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
