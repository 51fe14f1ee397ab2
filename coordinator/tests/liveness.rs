//! Worker liveness on tokio's paused clock, against the coordinator loop itself (in-memory
//! store): a silent worker is declared lost and its job moves to another worker without
//! spending the restart budget; a lost worker that comes back is told to stop its stale
//! ranks; a worker that reconnects within the timeout keeps its job.

use std::time::Duration;

use loractl_coordinator::server::actor::{self, CoordinatorConfig, Handle, Session};
use loractl_coordinator::store::MemoryStore;
use loractl_coordinator::Error;
use loractl_proto::domain::{
    Assignment, CoordinatorMessage, FailureKind, Job, JobState, RankId, WorkerId, WorkerMessage,
};
use loractl_tests::inproc::registration;
use loractl_tests::spec::{job_spec, resources};

fn spec() -> String {
    job_spec("liveness", "/models/sd15.safetensors", &resources("0", 0))
}

fn config() -> CoordinatorConfig {
    CoordinatorConfig {
        heartbeat_interval: Duration::from_secs(2),
        heartbeat_timeout: Duration::from_secs(10),
        ..CoordinatorConfig::default()
    }
}

async fn register(handle: &Handle, name: &str) -> (WorkerId, Session) {
    let registered = handle.register(registration(name, &[0])).await.unwrap();
    let session = handle
        .open_session(registered.worker_id.clone())
        .await
        .unwrap();
    (registered.worker_id, session)
}

fn assignment(message: Option<CoordinatorMessage>) -> Assignment {
    match message {
        Some(CoordinatorMessage::Assign(a)) => a,
        other => panic!("expected an assignment, got {other:?}"),
    }
}

async fn job(handle: &Handle, job: &Job) -> Job {
    handle.get(job.id.clone()).await.unwrap()
}

async fn heartbeat(handle: &Handle, worker: &WorkerId, session: &Session, running: Vec<RankId>) {
    handle
        .worker_message(
            worker.clone(),
            session.id,
            WorkerMessage::Heartbeat {
                running,
                draining: false,
            },
        )
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_silent_worker_is_lost_and_its_job_moves_without_spending_restarts() {
    let (handle, _loop) = actor::start(MemoryStore::new(), config()).await.unwrap();
    let (a, mut a_session) = register(&handle, "a").await;
    let (submitted, _) = handle.submit(spec(), 0).await.unwrap();
    let first = assignment(a_session.messages.recv().await);
    assert_eq!(first.attempt, 0);
    let rank = RankId {
        job_id: submitted.id.clone(),
        attempt: 0,
        rank: 0,
    };
    handle
        .worker_message(
            a.clone(),
            a_session.id,
            WorkerMessage::Started(rank.clone()),
        )
        .await
        .unwrap();
    assert_eq!(job(&handle, &submitted).await.state, JobState::Running);

    let (b, mut b_session) = register(&handle, "b").await;
    // `b` heartbeats every 2 s, `a` says nothing.
    for _ in 0..4 {
        tokio::time::advance(Duration::from_secs(2)).await;
        heartbeat(&handle, &b, &b_session, vec![]).await;
        assert_eq!(
            job(&handle, &submitted).await.state,
            JobState::Running,
            "within the timeout"
        );
    }
    for _ in 0..2 {
        tokio::time::advance(Duration::from_secs(2)).await;
        heartbeat(&handle, &b, &b_session, vec![]).await;
    }
    let moved = job(&handle, &submitted).await;
    assert_eq!(moved.state, JobState::Placed);
    assert_eq!(
        (moved.attempt, moved.counted_restarts),
        (1, 0),
        "max_restarts = 0 and still retried"
    );
    assert_eq!(moved.placement[0].worker_id, b);
    let failure = moved.last_failure.expect("failure recorded");
    assert_eq!(failure.kind, FailureKind::WorkerLost);
    assert!(failure.message.contains(a.as_str()), "{}", failure.message);
    let second = assignment(b_session.messages.try_recv().ok());
    assert_eq!((second.attempt, second.rank), (1, 0));
    assert_eq!(
        a_session.messages.recv().await,
        None,
        "the lost worker's session is closed"
    );
    let workers = handle.workers().await.unwrap();
    assert!(workers.iter().any(|w| w.id == a && !w.alive));

    // `a` comes back: its old id is refused, it registers again and is told to stop the rank
    // it still runs from attempt 0.
    let err = handle.open_session(a.clone()).await.err().expect("refused");
    assert!(matches!(err, Error::UnknownWorker(_)), "{err}");
    let (a2, mut a2_session) = register(&handle, "a").await;
    assert_ne!(a2, a);
    heartbeat(&handle, &a2, &a2_session, vec![rank.clone()]).await;
    match a2_session.messages.recv().await {
        Some(CoordinatorMessage::Stop { rank: stopped, .. }) => assert_eq!(stopped, rank),
        other => panic!("expected a stop order, got {other:?}"),
    }
    let names: Vec<String> = handle
        .workers()
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.id.to_string())
        .collect();
    assert!(
        !names.contains(&a.to_string()),
        "the old registration is gone: {names:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_reconnects_within_the_timeout_keeps_its_job() {
    let (handle, _loop) = actor::start(MemoryStore::new(), config()).await.unwrap();
    let (a, session) = register(&handle, "a").await;
    let (submitted, _) = handle.submit(spec(), 0).await.unwrap();
    // The session drops before the worker read its assignment.
    handle.session_closed(a.clone(), session.id).await.unwrap();
    drop(session);
    tokio::time::advance(Duration::from_secs(6)).await;
    assert_eq!(job(&handle, &submitted).await.state, JobState::Placed);

    let mut session = handle.open_session(a.clone()).await.unwrap();
    let again = assignment(session.messages.try_recv().ok());
    assert_eq!(
        (again.attempt, again.rank),
        (0, 0),
        "the assignment is sent again"
    );
    let rank = RankId {
        job_id: submitted.id.clone(),
        attempt: 0,
        rank: 0,
    };
    handle
        .worker_message(a.clone(), session.id, WorkerMessage::Started(rank.clone()))
        .await
        .unwrap();
    for _ in 0..10 {
        tokio::time::advance(Duration::from_secs(2)).await;
        heartbeat(&handle, &a, &session, vec![rank.clone()]).await;
    }
    // Replies are ordered after the heartbeats posted before them.
    let kept = job(&handle, &submitted).await;
    assert_eq!((kept.state, kept.attempt), (JobState::Running, 0));
    assert!(
        session.messages.try_recv().is_err(),
        "no stop order for an expected rank"
    );
}

#[tokio::test(start_paused = true)]
async fn messages_from_a_replaced_session_are_ignored() {
    let (handle, _loop) = actor::start(MemoryStore::new(), config()).await.unwrap();
    let (a, old) = register(&handle, "a").await;
    let (submitted, _) = handle.submit(spec(), 0).await.unwrap();
    let new = handle.open_session(a.clone()).await.unwrap();
    let rank = RankId {
        job_id: submitted.id.clone(),
        attempt: 0,
        rank: 0,
    };
    handle
        .worker_message(a.clone(), old.id, WorkerMessage::Started(rank.clone()))
        .await
        .unwrap();
    assert_eq!(job(&handle, &submitted).await.state, JobState::Placed);
    handle
        .worker_message(a, new.id, WorkerMessage::Started(rank))
        .await
        .unwrap();
    assert_eq!(job(&handle, &submitted).await.state, JobState::Running);
}

#[tokio::test(start_paused = true)]
async fn a_restarted_coordinator_keeps_jobs_and_gives_workers_time_to_reconnect() {
    let store = MemoryStore::new();
    let (handle, event_loop) = actor::start(store.clone(), config()).await.unwrap();
    let (runner, session) = register(&handle, "a").await;
    let (submitted, _) = handle.submit(spec(), 0).await.unwrap();
    // Registered after the job was placed, and silent from then on.
    let (other, _other_session) = register(&handle, "idle").await;
    let rank = RankId {
        job_id: submitted.id.clone(),
        attempt: 0,
        rank: 0,
    };
    handle
        .worker_message(
            runner.clone(),
            session.id,
            WorkerMessage::Started(rank.clone()),
        )
        .await
        .unwrap();
    assert_eq!(
        job(&handle, &submitted).await.placement[0].worker_id,
        runner
    );
    drop(handle);
    event_loop.await.unwrap();

    // Restart on the same store: the job is still running on the same worker.
    let (handle, _loop) = actor::start(store, config()).await.unwrap();
    let restored = job(&handle, &submitted).await;
    assert_eq!((restored.state, restored.attempt), (JobState::Running, 0));
    let session = handle.open_session(runner.clone()).await.unwrap();
    for _ in 0..7 {
        tokio::time::advance(Duration::from_secs(2)).await;
        heartbeat(&handle, &runner, &session, vec![rank.clone()]).await;
    }
    let kept = job(&handle, &submitted).await;
    assert_eq!((kept.state, kept.attempt), (JobState::Running, 0));
    let workers = handle.workers().await.unwrap();
    let alive = |id: &WorkerId| workers.iter().any(|w| &w.id == id && w.alive);
    assert!(alive(&runner));
    assert!(
        !alive(&other),
        "a known worker that never reconnected is lost after the timeout"
    );
}

#[tokio::test(start_paused = true)]
async fn an_incomplete_rendezvous_fails_the_attempt() {
    let config = CoordinatorConfig {
        rendezvous_timeout: Duration::from_secs(5),
        ..config()
    };
    let (handle, _loop) = actor::start(MemoryStore::new(), config).await.unwrap();
    let (a, mut a_session) = register(&handle, "a").await;
    let (b, mut b_session) = register(&handle, "b").await;
    let spec = spec().replace("[resources]", "[resources]\nworkers = 2");
    let (job, _) = handle.submit(spec, 0).await.unwrap();
    let to_a = assignment(a_session.messages.recv().await);
    let to_b = assignment(b_session.messages.recv().await);
    assert_eq!(to_a.world_size, 2);
    let (rank0_worker, rank0_session) = if to_a.rank == 0 {
        (&a, &a_session)
    } else {
        (&b, &b_session)
    };
    let rank0 = RankId {
        job_id: job.id.clone(),
        attempt: 0,
        rank: 0,
    };
    handle
        .worker_message(
            rank0_worker.clone(),
            rank0_session.id,
            WorkerMessage::RendezvousJoin {
                rank: rank0,
                address: "10.0.0.1:4000".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(to_b.attempt, 0);
    // Replies are ordered after the join posted before them.
    assert_eq!(handle.get(job.id.clone()).await.unwrap().attempt, 0);
    for _ in 0..3 {
        tokio::time::advance(Duration::from_secs(2)).await;
        heartbeat(&handle, &a, &a_session, vec![]).await;
        heartbeat(&handle, &b, &b_session, vec![]).await;
    }
    let after = handle.get(job.id.clone()).await.unwrap();
    // A training error spends the budget, and this job has max_restarts = 0.
    assert_eq!(
        (after.state, after.attempt),
        (JobState::Failed, 0),
        "{:?}",
        after.last_failure
    );
    let failure = after.last_failure.expect("failure recorded");
    assert_eq!(failure.kind, FailureKind::TrainingError);
    assert!(
        failure.message.contains("rank(s) 1 never joined"),
        "{}",
        failure.message
    );
}
