//! gRPC handlers. They only translate: wire messages to domain types (a bad field is
//! `InvalidArgument` naming it), a call on the loop's [`Handle`], the reply back to the wire.
//! Artifact bytes go straight to the [`ArtifactStore`] without passing through the loop.

use loractl_telemetry::names::{self, label};
use loractl_telemetry::Recorder;
use std::pin::Pin;
use std::sync::Arc;

use loractl_proto::convert;
use loractl_proto::domain::{
    ArtifactInfo, ArtifactKind, CoordinatorMessage, JobEvent, JobId, Registration, WorkerId,
    WorkerMessage,
};
use loractl_proto::pb;
use tokio::io::AsyncReadExt;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::actor::Handle;
use crate::artifacts::{ArtifactStore, Begin};

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Bytes per download chunk; well under the message size limit.
pub const CHUNK_BYTES: usize = 1 << 20;

fn stream_of<T: Send + 'static>(rx: mpsc::Receiver<Result<T, Status>>) -> Stream_<T> {
    Box::pin(ReceiverStream::new(rx))
}

pub struct JobApi {
    pub handle: Handle,
}

#[tonic::async_trait]
impl pb::job_service_server::JobService for JobApi {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let request = request.into_inner();
        if request.spec_toml.trim().is_empty() {
            return Err(convert_error(
                "spec_toml",
                "empty; send the job spec's TOML text",
            ));
        }
        let (job, warnings) = self
            .handle
            .submit(request.spec_toml, request.priority)
            .await?;
        Ok(Response::new(pb::SubmitJobResponse {
            job: Some(job.into()),
            warnings,
        }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        let id = convert::job_id(request.into_inner().job_id, "job_id")?;
        let job = self.handle.get(id).await?;
        Ok(Response::new(pb::GetJobResponse {
            job: Some(job.into()),
        }))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let states = request
            .into_inner()
            .states
            .into_iter()
            .enumerate()
            .map(|(i, raw)| convert::job_state(raw, &format!("states[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let jobs = self.handle.list(states).await?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.into_iter().map(Into::into).collect(),
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let id = convert::job_id(request.into_inner().job_id, "job_id")?;
        let job = self.handle.cancel(id).await?;
        Ok(Response::new(pb::CancelJobResponse {
            job: Some(job.into()),
        }))
    }

    type WatchJobStream = Stream_<pb::JobEvent>;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = convert::job_id(request.into_inner().job_id, "job_id")?;
        let watch = self.handle.watch(id).await?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let done = watch.job.state.is_terminal();
            if tx
                .send(Ok(JobEvent::State(watch.job).into()))
                .await
                .is_err()
                || done
            {
                return;
            }
            let Some(mut events) = watch.events else {
                return;
            };
            loop {
                match events.recv().await {
                    Ok(event) => {
                        let end = matches!(&event, JobEvent::State(job) if job.state.is_terminal());
                        if tx.send(Ok(event.into())).await.is_err() || end {
                            return;
                        }
                    }
                    // A slow watcher misses some progress samples; state changes that follow
                    // still arrive.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(stream_of(rx)))
    }

    type GetLogsStream = Stream_<pb::LogLine>;

    async fn get_logs(
        &self,
        request: Request<pb::GetLogsRequest>,
    ) -> Result<Response<Self::GetLogsStream>, Status> {
        let request = request.into_inner();
        let id = convert::job_id(request.job_id, "job_id")?;
        let logs = self.handle.logs(id, request.follow).await?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            for line in logs.lines {
                if tx.send(Ok(line.into())).await.is_err() {
                    return;
                }
            }
            let Some(mut follow) = logs.follow else {
                return;
            };
            loop {
                match follow.recv().await {
                    Ok(line) => {
                        if tx.send(Ok(line.into())).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(stream_of(rx)))
    }

    async fn list_workers(
        &self,
        _request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let workers = self.handle.workers().await?;
        Ok(Response::new(pb::ListWorkersResponse {
            workers: workers.into_iter().map(Into::into).collect(),
        }))
    }
}

fn convert_error(field: &str, problem: &str) -> Status {
    loractl_proto::ConvertError::new(field, problem).into()
}

pub struct WorkerApi {
    pub handle: Handle,
}

#[tonic::async_trait]
impl pb::worker_service_server::WorkerService for WorkerApi {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let registration = Registration::try_from(request.into_inner())?;
        let registered = self.handle.register(registration).await?;
        Ok(Response::new(pb::RegisterResponse {
            worker_id: registered.worker_id.to_string(),
            heartbeat_interval_ms: registered.heartbeat_interval.as_millis() as u64,
            heartbeat_timeout_ms: registered.heartbeat_timeout.as_millis() as u64,
        }))
    }

    type SessionStream = Stream_<pb::CoordinatorMessage>;

    async fn session(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| convert_error("message", "stream ended before `open`"))?;
        let WorkerMessage::Open { worker_id } = WorkerMessage::try_from(first)? else {
            return Err(convert_error(
                "message",
                "the first message of a session must be `open`",
            ));
        };
        let mut session = self.handle.open_session(worker_id.clone()).await?;
        let session_id = session.id;
        let (tx, rx) = mpsc::channel::<Result<pb::CoordinatorMessage, Status>>(256);
        let (refuse, mut refused) = tokio::sync::oneshot::channel::<Status>();
        let (ended, mut ended_rx) = tokio::sync::oneshot::channel::<()>();

        // Coordinator -> worker. This task alone holds the response's sender, so the response
        // ends as soon as the loop drops the session (replaced, worker lost, shutdown).
        tokio::spawn(async move {
            // Dropped when this task ends: tells the reader to let go of the request stream.
            let _ended = ended;
            loop {
                tokio::select! {
                    message = session.messages.recv() => {
                        let Some(message) = message else { return };
                        let message: CoordinatorMessage = message;
                        if tx.send(Ok(message.into())).await.is_err() {
                            return;
                        }
                    }
                    status = &mut refused => {
                        if let Ok(status) = status {
                            let _ = tx.send(Err(status)).await;
                        }
                        return;
                    }
                }
            }
        });

        // Worker -> coordinator, in order, through the loop.
        let handle = self.handle.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = inbound.next() => next,
                    // The response ended: drop the request stream too, or the HTTP/2 stream
                    // (and a graceful shutdown) would wait for the worker to hang up.
                    _ = &mut ended_rx => break,
                };
                let next = match next {
                    Some(Ok(message)) => message,
                    Some(Err(status)) => {
                        tracing::info!(worker = %worker_id, %status, "worker session ended with an error");
                        break;
                    }
                    None => break,
                };
                match WorkerMessage::try_from(next) {
                    Ok(message) => {
                        if handle
                            .worker_message(worker_id.clone(), session_id, message)
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = refuse.send(e.into());
                        break;
                    }
                }
            }
            let _ = handle.session_closed(worker_id, session_id).await;
        });
        Ok(Response::new(stream_of(rx)))
    }
}

pub struct ArtifactApi {
    pub store: Arc<ArtifactStore>,
    pub handle: Handle,
    pub metrics: Recorder,
    /// With mutual TLS: a job's outputs also need the worker's verified client certificate.
    pub outputs_need_client_cert: bool,
}

impl ArtifactApi {
    fn count_stored(&self) {
        self.metrics.set(
            &names::ARTIFACT_STORED_BYTES,
            self.store.used_bytes() as f64,
            &[],
        );
    }

    /// Who may upload this: anyone with the token for datasets and base models (which belong
    /// to no job); for a job's outputs (LoRA files, samples, checkpoints) only the worker that
    /// runs the job's current attempt, named in the header and checked against the placement.
    /// Returns that worker and attempt for an output.
    async fn admit(
        &self,
        info: &ArtifactInfo,
        worker_id: &str,
        attempt: u32,
        has_client_cert: bool,
    ) -> Result<Option<(WorkerId, u32)>, Status> {
        match info.kind {
            ArtifactKind::Dataset | ArtifactKind::BaseModel => {
                if info.job_id.is_some() {
                    return Err(convert_error(
                        "header.info.job_id",
                        "datasets and base models belong to no job: leave it empty",
                    ));
                }
                Ok(None)
            }
            ArtifactKind::Lora
            | ArtifactKind::SampleImage
            | ArtifactKind::Checkpoint
            | ArtifactKind::TrainingLog => {
                let Some(job) = info.job_id.clone() else {
                    return Err(convert_error(
                        "header.info.job_id",
                        "a LoRA file, sample, checkpoint or training log names the job it belongs to",
                    ));
                };
                if worker_id.is_empty() {
                    return Err(Status::permission_denied(format!(
                        "outputs of job `{job}` (LoRA files, samples, checkpoints) come only \
                         from the worker running it; clients may upload datasets and base models"
                    )));
                }
                if self.outputs_need_client_cert && !has_client_cert {
                    return Err(Status::permission_denied(
                        "job outputs come only from workers, which present a client \
                         certificate signed by the coordinator's client CA (tls_cert and \
                         tls_key in the worker config)",
                    ));
                }
                let worker_id = WorkerId::new(worker_id);
                self.handle
                    .authorize_output(job, worker_id.clone(), attempt)
                    .await?;
                Ok(Some((worker_id, attempt)))
            }
        }
    }
}

#[tonic::async_trait]
impl pb::artifact_service_server::ArtifactService for ArtifactApi {
    async fn upload_status(
        &self,
        request: Request<pb::UploadStatusRequest>,
    ) -> Result<Response<pb::UploadStatusResponse>, Status> {
        let digest = convert::digest(request.into_inner().digest, "digest")?;
        let status = self.store.status(&digest).await?;
        Ok(Response::new(pb::UploadStatusResponse {
            complete: status.complete,
            received: status.received,
        }))
    }

    async fn upload(
        &self,
        request: Request<Streaming<pb::UploadMessage>>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        use pb::upload_message::Message;
        let has_client_cert = request.peer_certs().is_some_and(|certs| !certs.is_empty());
        let mut inbound = request.into_inner();
        let Some(Message::Header(header)) = inbound.message().await?.and_then(|m| m.message) else {
            return Err(convert_error(
                "message",
                "the first message of an upload must be `header`",
            ));
        };
        let info = convert::artifact_info(header.info, "header.info")?;
        let producer = self
            .admit(&info, &header.worker_id, header.attempt, has_client_cert)
            .await?;
        let mut upload = match self.store.begin_upload(info, header.offset).await? {
            Begin::Complete(info) => {
                return Ok(Response::new(pb::UploadResponse {
                    info: Some(info.into()),
                }))
            }
            Begin::Upload(upload) => upload,
        };
        let kind = [(label::KIND, upload.info().kind.as_str().to_owned())];
        while let Some(message) = inbound.message().await? {
            match message.message {
                Some(Message::Chunk(bytes)) => {
                    upload.write(&bytes).await?;
                    self.metrics.add(
                        &names::ARTIFACT_RECEIVED_BYTES_TOTAL,
                        bytes.len() as u64,
                        &kind,
                    );
                }
                _ => {
                    return Err(convert_error(
                        "message",
                        "only `chunk` messages may follow the header",
                    ))
                }
            }
        }
        let info = upload.finish().await?;
        self.count_stored();
        if let (ArtifactKind::Checkpoint, Some(job), Some((worker_id, attempt))) =
            (info.kind, info.job_id.clone(), producer)
        {
            self.handle
                .checkpoint_stored(job.clone(), info.digest, worker_id, attempt)
                .await?;
            let removed = self.store.gc_checkpoints(&job).await?;
            self.count_stored();
            if !removed.is_empty() {
                tracing::info!(job = %job, removed = removed.len(), "old checkpoints deleted");
            }
        }
        Ok(Response::new(pb::UploadResponse {
            info: Some(info.into()),
        }))
    }

    type DownloadStream = Stream_<pb::DownloadChunk>;

    async fn download(
        &self,
        request: Request<pb::DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let request = request.into_inner();
        let digest = convert::digest(request.digest, "digest")?;
        let (info, mut file) = self.store.open_blob(&digest, request.offset).await?;
        let kind = [(label::KIND, info.kind.as_str().to_owned())];
        let metrics = self.metrics.clone();
        let (tx, rx) = mpsc::channel(4);
        let mut offset = request.offset;
        tokio::spawn(async move {
            let mut info = Some(pb::ArtifactInfo::from(info));
            let mut buf = vec![0u8; CHUNK_BYTES];
            loop {
                let n = match file.read(&mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(format!(
                                "reading artifact {digest}: {e}"
                            ))))
                            .await;
                        return;
                    }
                };
                // The first message carries the info even for an empty artifact.
                if n == 0 && info.is_none() {
                    return;
                }
                let chunk = pb::DownloadChunk {
                    info: info.take(),
                    offset,
                    data: buf[..n].to_vec(),
                };
                offset += n as u64;
                if tx.send(Ok(chunk)).await.is_err() || n == 0 {
                    return;
                }
                metrics.add(&names::ARTIFACT_SENT_BYTES_TOTAL, n as u64, &kind);
            }
        });
        Ok(Response::new(stream_of(rx)))
    }

    async fn list_artifacts(
        &self,
        request: Request<pb::ListArtifactsRequest>,
    ) -> Result<Response<pb::ListArtifactsResponse>, Status> {
        let job_id = request.into_inner().job_id;
        let job = (!job_id.is_empty()).then(|| JobId::new(job_id));
        let artifacts = self.store.list(job.as_ref()).await?;
        Ok(Response::new(pb::ListArtifactsResponse {
            artifacts: artifacts.into_iter().map(Into::into).collect(),
        }))
    }
}
