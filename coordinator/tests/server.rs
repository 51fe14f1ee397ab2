//! The coordinator in process on 127.0.0.1:0 with a redb store, driven through the generated
//! gRPC clients: a job is submitted, a worker session registers and receives the assignment,
//! and the job runs, retries from its checkpoint and succeeds.

use loractl_coordinator::artifacts::sha256;
use loractl_proto::domain::{
    ArtifactInfo, ArtifactKind, CoordinatorMessage, Failure, FailureKind, JobEvent, JobId,
    JobState, Progress, RankId, RankOutcome, WorkerId, WorkerMessage,
};
use loractl_proto::pb;
use loractl_proto::pb::artifact_service_client::ArtifactServiceClient;
use loractl_proto::pb::job_service_client::JobServiceClient;
use loractl_proto::pb::worker_service_client::WorkerServiceClient;
use loractl_tests::inproc::{
    artifacts_of, assert_retried, get_job, registration, submit, within, Coordinator,
};
use loractl_tests::spec::{job_spec, resources};
use loractl_worker::client::Authed;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Code, Status};

const TOKEN: &str = "test-token";

fn spec() -> String {
    job_spec(
        "sks-dog",
        "/models/v1-5-pruned-emaonly.safetensors",
        &resources("all", 1),
    )
}

type Jobs = JobServiceClient<Authed>;
type Workers = WorkerServiceClient<Authed>;
type Artifacts = ArtifactServiceClient<Authed>;

/// Clients of `server` that present `token`.
async fn clients(server: &Coordinator, token: Option<&str>) -> (Jobs, Workers, Artifacts) {
    let link = server.link_as(Some(token));
    (
        link.jobs().await.unwrap(),
        link.workers().await.unwrap(),
        link.artifacts().await.unwrap(),
    )
}

/// A worker session as a worker daemon would hold it.
struct WorkerSession {
    id: WorkerId,
    tx: mpsc::Sender<pb::WorkerMessage>,
    rx: tonic::Streaming<pb::CoordinatorMessage>,
}

impl WorkerSession {
    async fn open(workers: &mut Workers, name: &str, gpus: &[u32]) -> WorkerSession {
        let registered = workers
            .register(pb::RegisterRequest::from(registration(name, gpus)))
            .await
            .unwrap()
            .into_inner();
        assert!(registered.heartbeat_timeout_ms > registered.heartbeat_interval_ms);
        let id = WorkerId::new(registered.worker_id);
        let (tx, rx) = mpsc::channel(16);
        tx.send(
            WorkerMessage::Open {
                worker_id: id.clone(),
            }
            .into(),
        )
        .await
        .unwrap();
        let rx = workers
            .session(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        WorkerSession { id, tx, rx }
    }

    async fn send(&self, message: WorkerMessage) {
        self.tx.send(message.into()).await.unwrap();
    }

    async fn next(&mut self) -> CoordinatorMessage {
        let message = within("a coordinator message", self.rx.next())
            .await
            .expect("session open")
            .expect("no error");
        CoordinatorMessage::try_from(message).unwrap()
    }
}

/// Uploads `data`; a job's output names the worker and attempt it comes from (`producer`).
async fn try_upload(
    artifacts: &mut Artifacts,
    info: ArtifactInfo,
    data: &[u8],
    producer: Option<(&WorkerId, u32)>,
) -> Result<ArtifactInfo, Status> {
    let mut messages = vec![pb::UploadMessage {
        message: Some(pb::upload_message::Message::Header(pb::UploadHeader {
            info: Some(info.into()),
            offset: 0,
            worker_id: producer.map(|(w, _)| w.to_string()).unwrap_or_default(),
            attempt: producer.map_or(0, |(_, a)| a),
        })),
    }];
    for chunk in data.chunks(7) {
        messages.push(pb::UploadMessage {
            message: Some(pb::upload_message::Message::Chunk(chunk.to_vec())),
        });
    }
    let response = artifacts
        .upload(tokio_stream::iter(messages))
        .await?
        .into_inner();
    Ok(ArtifactInfo::try_from(response.info.unwrap()).unwrap())
}

async fn upload(
    artifacts: &mut Artifacts,
    info: ArtifactInfo,
    data: &[u8],
    producer: Option<(&WorkerId, u32)>,
) -> ArtifactInfo {
    try_upload(artifacts, info, data, producer).await.unwrap()
}

/// Step 10 of 100 of attempt 0, as `rank` reports it.
fn step_ten(job: &JobId, rank: u32, loss: f64) -> Progress {
    Progress {
        job_id: job.clone(),
        attempt: 0,
        rank,
        step: 10,
        total_steps: 100,
        epoch: 0,
        loss,
        lr: 1e-4,
        d_lr: None,
        steps_per_second: 2.5,
        samples_per_second: 2.5,
        gpu_memory_bytes: 1 << 30,
        at: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_runs_retries_from_its_checkpoint_and_succeeds() {
    let mut server = Coordinator::start(Some(TOKEN)).await;
    let (mut jobs, mut workers, mut artifacts) = clients(&server, Some(TOKEN)).await;
    let mut worker = WorkerSession::open(&mut workers, "box", &[0, 1]).await;

    let job = submit(&mut jobs, &spec()).await;
    assert_eq!(job.name, "sks-dog");
    let mut watch = jobs
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.to_string(),
        })
        .await
        .unwrap()
        .into_inner();

    // Attempt 0: assigned to the only worker with all its GPUs, one rank per GPU.
    let CoordinatorMessage::Assign(first) = worker.next().await else {
        panic!("expected an assignment");
    };
    assert_eq!(
        (&first.job_id, first.attempt, first.rank, first.world_size),
        (&job.id, 0, 0, 2)
    );
    assert_eq!((first.local_rank, first.local_world_size), (0, 2));
    assert_eq!(first.gpu_indices, [0]);
    assert_eq!(first.resume_checkpoint, None);
    assert!(first.spec_toml.contains("sks-dog"));
    let CoordinatorMessage::Assign(other) = worker.next().await else {
        panic!("expected the second rank's assignment");
    };
    assert_eq!(
        (other.rank, other.world_size, other.gpu_indices.as_slice()),
        (1, 2, &[1][..])
    );
    assert_eq!((other.local_rank, other.local_world_size), (1, 2));
    let rank = RankId {
        job_id: job.id.clone(),
        attempt: 0,
        rank: 0,
    };
    worker.send(WorkerMessage::Started(rank.clone())).await;
    worker
        .send(WorkerMessage::Progress(step_ten(&job.id, 0, 0.125)))
        .await;

    // Rank 1 reports the same step; rank 0 speaks for the job.
    worker
        .send(WorkerMessage::Progress(step_ten(&job.id, 1, 0.5)))
        .await;

    // The watcher sees the job placed, running, and the progress sample.
    let mut saw_running = false;
    let mut saw_progress = false;
    while !(saw_running && saw_progress) {
        let event = within("a watch event", watch.next())
            .await
            .unwrap()
            .unwrap();
        match JobEvent::try_from(event).unwrap() {
            JobEvent::State(j) => saw_running |= j.state == JobState::Running,
            JobEvent::Progress(p) => {
                assert_eq!((p.step, p.loss), (10, 0.125));
                saw_progress = true;
            }
        }
    }

    // A checkpoint uploaded for the job becomes the point a retry resumes from.
    let data = b"optimizer state and lora weights at step 10".to_vec();
    let checkpoint = upload(
        &mut artifacts,
        ArtifactInfo {
            digest: sha256(&data),
            size: data.len() as u64,
            kind: ArtifactKind::Checkpoint,
            job_id: Some(job.id.clone()),
            name: "sks-dog-step00000010".into(),
            created_at: 0,
        },
        &data,
        Some((&worker.id, 0)),
    )
    .await;
    // The upload call posts the checkpoint to the coordinator's loop before it returns, so a
    // later call is ordered behind it.
    let recorded = get_job(&mut jobs, job.id.as_str()).await;
    assert_eq!(recorded.latest_checkpoint, Some(checkpoint.digest));
    let live = recorded.progress.expect("the job shows its progress");
    assert_eq!((live.rank, live.step, live.loss), (0, 10, 0.125));

    let busy = jobs
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(busy[0].busy_gpu_indices, [0, 1]);
    assert_eq!(busy[0].job_ids, [job.id.to_string()]);

    // The rank is killed: retried without counting, resuming from the checkpoint.
    worker
        .send(WorkerMessage::Result {
            rank,
            outcome: RankOutcome::Failed(Failure {
                kind: FailureKind::Killed,
                message: "SIGKILL".into(),
                rank: Some(0),
            }),
        })
        .await;
    // The other rank is told to stop; then both ranks of the retry are assigned.
    let mut retry = Vec::new();
    while retry.len() < 2 {
        match worker.next().await {
            CoordinatorMessage::Assign(a) => retry.push(a),
            CoordinatorMessage::Stop { rank, .. } => assert_eq!((rank.attempt, rank.rank), (0, 1)),
            other => panic!("expected the retry's assignments, got {other:?}"),
        }
    }
    for (i, second) in retry.iter().enumerate() {
        assert_eq!((second.attempt, second.rank), (1, i as u32));
        assert_eq!(second.resume_checkpoint, Some(checkpoint.digest));
    }

    for r in 0..2 {
        let rank = RankId {
            job_id: job.id.clone(),
            attempt: 1,
            rank: r,
        };
        worker.send(WorkerMessage::Started(rank.clone())).await;
        worker
            .send(WorkerMessage::Result {
                rank,
                outcome: RankOutcome::Succeeded { artifacts: vec![] },
            })
            .await;
    }

    // The watch ends with the final state.
    let mut last = None;
    while let Some(event) = within("the watch to end", watch.next()).await {
        if let JobEvent::State(j) = JobEvent::try_from(event.unwrap()).unwrap() {
            last = Some(j);
        }
    }
    let last = last.expect("a final state");
    assert_retried(&last, JobState::Succeeded, (1, 0), FailureKind::Killed);

    let listed = jobs
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, worker.id.to_string());
    assert!(listed[0].alive);
    assert!(listed[0].busy_gpu_indices.is_empty(), "the job ended");
    drop(worker);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_right_token_are_refused_and_change_nothing() {
    let mut server = Coordinator::start(Some(TOKEN)).await;
    for token in [None, Some("wrong")] {
        let (mut jobs, mut workers, mut artifacts) = clients(&server, token).await;
        let err = jobs
            .submit_job(pb::SubmitJobRequest {
                spec_toml: spec(),
                priority: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}");
        let err = workers
            .register(pb::RegisterRequest::from(registration("intruder", &[])))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        let err = artifacts
            .list_artifacts(pb::ListArtifactsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    let (mut jobs, _, _) = clients(&server, Some(TOKEN)).await;
    let listed = jobs
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap();
    assert!(listed.into_inner().jobs.is_empty());
    let workers = jobs.list_workers(pb::ListWorkersRequest {}).await.unwrap();
    assert!(workers.into_inner().workers.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_the_field_at_fault() {
    let mut server = Coordinator::start(Some(TOKEN)).await;
    let (mut jobs, mut workers, _) = clients(&server, Some(TOKEN)).await;

    let typo = spec().replace("max_train_epochs", "max_train_epoch");
    let err = jobs
        .submit_job(pb::SubmitJobRequest {
            spec_toml: typo,
            priority: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("training.max_train_epoch"),
        "{}",
        err.message()
    );

    let invalid = spec().replace("resolution = \"512\"", "resolution = \"500\"");
    let err = jobs
        .submit_job(pb::SubmitJobRequest {
            spec_toml: invalid,
            priority: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("dataset.resolution"),
        "{}",
        err.message()
    );

    let err = jobs
        .get_job(pb::GetJobRequest {
            job_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("job_id"));
    let err = jobs
        .get_job(pb::GetJobRequest {
            job_id: "j404".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = jobs
        .list_jobs(pb::ListJobsRequest { states: vec![42] })
        .await
        .unwrap_err();
    assert!(err.message().contains("states[0]"), "{}", err.message());

    let err = workers
        .register(pb::RegisterRequest {
            protocol_version: loractl_proto::WORKER_PROTOCOL_VERSION + 1,
            name: "future".into(),
            gpus: vec![],
            labels: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("protocol version"));

    // A session for a worker that never registered is refused.
    let (tx, rx) = mpsc::channel(1);
    tx.send(
        WorkerMessage::Open {
            worker_id: WorkerId::new("ghost.1"),
        }
        .into(),
    )
    .await
    .unwrap();
    let err = workers.session(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("register again"));

    let listed = jobs
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap();
    assert!(listed.into_inner().jobs.is_empty(), "nothing was created");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_upload_resume_and_download_verified() {
    let mut server = Coordinator::start(Some(TOKEN)).await;
    let (_, _, mut artifacts) = clients(&server, Some(TOKEN)).await;
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let info = ArtifactInfo {
        digest: sha256(&data),
        size: data.len() as u64,
        kind: ArtifactKind::Dataset,
        job_id: None,
        name: "train.tar".into(),
        created_at: 0,
    };
    let header = |offset| pb::UploadMessage {
        message: Some(pb::upload_message::Message::Header(pb::UploadHeader {
            info: Some(info.clone().into()),
            offset,
            ..Default::default()
        })),
    };
    let chunk = |bytes: &[u8]| pb::UploadMessage {
        message: Some(pb::upload_message::Message::Chunk(bytes.to_vec())),
    };
    // An interrupted upload: the stream ends early; the server keeps what it got.
    let err = artifacts
        .upload(tokio_stream::iter(vec![
            header(0),
            chunk(&data[..1_000_000]),
        ]))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("resume it at 1000000"),
        "{}",
        err.message()
    );
    let status = artifacts
        .upload_status(pb::UploadStatusRequest {
            digest: Some(info.digest.into()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((status.complete, status.received), (false, 1_000_000));
    let rest: Vec<pb::UploadMessage> = std::iter::once(header(1_000_000))
        .chain(data[1_000_000..].chunks(1 << 20).map(chunk))
        .collect();
    artifacts.upload(tokio_stream::iter(rest)).await.unwrap();

    let mut download = artifacts
        .download(pb::DownloadRequest {
            digest: Some(info.digest.into()),
            offset: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut received = Vec::new();
    let mut first = true;
    while let Some(piece) = within("a download chunk", download.next()).await {
        let piece = piece.unwrap();
        assert_eq!(
            piece.info.is_some(),
            first,
            "info comes with the first chunk only"
        );
        assert_eq!(piece.offset, received.len() as u64);
        first = false;
        received.extend_from_slice(&piece.data);
    }
    assert_eq!(sha256(&received), info.digest);

    // Data that does not match its digest is refused.
    let mut lie = info.clone();
    lie.digest = sha256(b"something else");
    lie.size = 5;
    let err = artifacts
        .upload(tokio_stream::iter(vec![
            pb::UploadMessage {
                message: Some(pb::upload_message::Message::Header(pb::UploadHeader {
                    info: Some(lie.into()),
                    offset: 0,
                    ..Default::default()
                })),
            },
            chunk(b"hello"),
        ]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("upload it again"),
        "{}",
        err.message()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_sessions_watches_and_log_follows() {
    let mut server = Coordinator::start(Some(TOKEN)).await;
    let (mut jobs, mut workers, _) = clients(&server, Some(TOKEN)).await;
    let mut worker = WorkerSession::open(&mut workers, "box", &[]).await;
    // A GPU job stays queued on a CPU-only worker: its watch and log follow stay open.
    let job = submit(&mut jobs, &spec()).await;
    let mut watch = jobs
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = within("the first watch event", watch.next()).await;
    assert!(first.is_some());
    let queued = get_job(&mut jobs, job.id.as_str()).await;
    assert_eq!(queued.state, JobState::Queued);
    assert_eq!(
        queued.waiting_reason,
        "needs a worker with all its pinned GPUs free; 0 connected worker(s) could ever hold it"
    );
    let mut follow = jobs
        .get_logs(pb::GetLogsRequest {
            job_id: job.id.to_string(),
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();

    server.stop().await;
    let watch_end = within("the watch to end", watch.next()).await;
    assert!(
        watch_end.as_ref().is_none_or(|r| r.is_err()),
        "{watch_end:?}"
    );
    let follow_end = within("the log follow to end", follow.next()).await;
    assert!(
        follow_end.as_ref().is_none_or(|r| r.is_err()),
        "{follow_end:?}"
    );
    let session_end = within("the session to end", worker.rx.next()).await;
    assert!(
        session_end.as_ref().is_none_or(|r| r.is_err()),
        "{session_end:?}"
    );
}

async fn latest_checkpoint(jobs: &mut Jobs, id: &str) -> Option<loractl_proto::domain::Digest> {
    get_job(jobs, id).await.latest_checkpoint
}

/// With only the token, a client uploading a "checkpoint" for a running job could make it the
/// job's resume point and have the real ones deleted. A job's outputs come only from the
/// worker running its current attempt: anything else is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_worker_running_the_attempt_uploads_its_outputs() {
    let mut server = Coordinator::start(Some(TOKEN)).await;
    let (mut jobs, mut workers, mut artifacts) = clients(&server, Some(TOKEN)).await;
    let mut worker = WorkerSession::open(&mut workers, "box", &[0]).await;
    let other = WorkerSession::open(&mut workers, "other", &[]).await;
    let job = submit(&mut jobs, &spec()).await;
    let CoordinatorMessage::Assign(assignment) = worker.next().await else {
        panic!("expected an assignment");
    };
    worker
        .send(WorkerMessage::Started(RankId {
            job_id: job.id.clone(),
            attempt: assignment.attempt,
            rank: 0,
        }))
        .await;
    let checkpoint = |data: &[u8]| ArtifactInfo {
        digest: sha256(data),
        size: data.len() as u64,
        kind: ArtifactKind::Checkpoint,
        job_id: Some(job.id.clone()),
        name: "state".into(),
        created_at: 0,
    };
    let real = b"the rank's real state".to_vec();
    let stored = upload(
        &mut artifacts,
        checkpoint(&real),
        &real,
        Some((&worker.id, 0)),
    )
    .await;
    assert_eq!(
        latest_checkpoint(&mut jobs, &job.id.to_string()).await,
        Some(stored.digest)
    );

    let forged = b"a forged state".to_vec();
    for (producer, code) in [
        (None, Code::PermissionDenied),
        (Some((&other.id, 0)), Code::PermissionDenied),
        (Some((&worker.id, 1)), Code::PermissionDenied),
    ] {
        let err = try_upload(&mut artifacts, checkpoint(&forged), &forged, producer)
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{producer:?}: {}", err.message());
    }
    let lora = ArtifactInfo {
        kind: ArtifactKind::Lora,
        ..checkpoint(&forged)
    };
    let err = try_upload(&mut artifacts, lora, &forged, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(
        err.message().contains("worker running it"),
        "{}",
        err.message()
    );

    // Nothing changed: the resume point and the stored checkpoints are the worker's.
    assert_eq!(
        latest_checkpoint(&mut jobs, &job.id.to_string()).await,
        Some(stored.digest)
    );
    let listed = artifacts_of(&mut artifacts, job.id.as_str()).await;
    let digests: Vec<_> = listed
        .into_iter()
        .map(|a| ArtifactInfo::try_from(a).unwrap().digest)
        .collect();
    assert_eq!(digests, [stored.digest]);

    // Datasets stay client uploads.
    let data = b"an image".to_vec();
    let dataset = ArtifactInfo {
        kind: ArtifactKind::Dataset,
        job_id: None,
        ..checkpoint(&data)
    };
    upload(&mut artifacts, dataset, &data, None).await;
    server.stop().await;
}
