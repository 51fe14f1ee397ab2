//! The worker's gRPC clients: a [`Link`] to the coordinator (TLS when configured, the bearer
//! token on every call), and artifact transfer: resumable uploads of what ranks produce,
//! verified downloads (resume checkpoints) into a cache keyed by sha256.

use std::path::{Path, PathBuf};
use std::time::Duration;

use loractl_proto::domain::{ArtifactInfo, ArtifactKind, Digest, JobId, WorkerId};
use loractl_proto::pb;
use loractl_proto::pb::artifact_service_client::ArtifactServiceClient;
use loractl_proto::pb::job_service_client::JobServiceClient;
use loractl_proto::pb::worker_service_client::WorkerServiceClient;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use crate::error::{io_error, Error, Result};

/// Bytes per upload chunk (the coordinator accepts messages up to 8 MiB).
pub const CHUNK_BYTES: usize = 1 << 20;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Auth {
    header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl Auth {
    pub fn new(token: Option<&str>) -> Result<Self> {
        let header = token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| Error::ParseConfig {
                        origin: "token".to_owned(),
                        message: "the token must be printable ASCII".to_owned(),
                    })
            })
            .transpose()?;
        Ok(Self { header })
    }
}

impl Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

pub type Authed = InterceptedService<Channel, Auth>;

/// TLS towards the coordinator: the CA that signed its certificate, and this worker's own
/// certificate for mutual TLS.
#[derive(Clone)]
pub struct ClientTls {
    pub ca_pem: Vec<u8>,
    /// Certificate and key (PEM).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Name in the coordinator's certificate, when not the address's host.
    pub domain: Option<String>,
}

impl ClientTls {
    fn config(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        config
    }
}

/// Everything needed to call the coordinator.
#[derive(Clone)]
pub struct Link {
    address: String,
    auth: Auth,
    tls: Option<ClientTls>,
}

impl Link {
    pub fn new(address: &str, token: Option<&str>, tls: Option<ClientTls>) -> Result<Self> {
        Ok(Self {
            address: address.to_owned(),
            auth: Auth::new(token)?,
            tls,
        })
    }

    pub async fn channel(&self) -> Result<Channel> {
        connect(&self.address, self.tls.as_ref()).await
    }

    pub async fn jobs(&self) -> Result<JobServiceClient<Authed>> {
        Ok(JobServiceClient::with_interceptor(
            self.channel().await?,
            self.auth.clone(),
        ))
    }

    pub async fn workers(&self) -> Result<WorkerServiceClient<Authed>> {
        Ok(WorkerServiceClient::with_interceptor(
            self.channel().await?,
            self.auth.clone(),
        ))
    }

    pub async fn artifacts(&self) -> Result<ArtifactServiceClient<Authed>> {
        Ok(
            ArtifactServiceClient::with_interceptor(self.channel().await?, self.auth.clone())
                .max_decoding_message_size(8 << 20),
        )
    }
}

pub async fn connect(address: &str, tls: Option<&ClientTls>) -> Result<Channel> {
    let connect_error = |source| Error::Connect {
        address: address.to_owned(),
        source,
    };
    let mut endpoint = Endpoint::from_shared(address.to_owned()).map_err(connect_error)?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.config()).map_err(connect_error)?;
    }
    endpoint
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(connect_error)
}

fn artifact_error(digest: &Digest, problem: impl Into<String>) -> Error {
    Error::Artifact {
        digest: digest.to_hex(),
        problem: problem.into(),
    }
}

fn rpc(call: &'static str) -> impl FnOnce(Status) -> Error {
    move |status| Error::Rpc { call, status }
}

/// sha256 and size of a file.
pub async fn hash_file(path: &Path) -> Result<(Digest, u64)> {
    let mut file = tokio::fs::File::open(path).await.map_err(io_error(path))?;
    hash_open_file(&mut file, path).await
}

/// sha256 and size of what is left to read of an open file.
async fn hash_open_file(file: &mut tokio::fs::File, path: &Path) -> Result<(Digest, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).await.map_err(io_error(path))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((Digest(hasher.finalize().into()), size))
}

/// The worker running the attempt a job's output belongs to: the coordinator takes a job's
/// LoRA files, samples and checkpoints only from there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Producer {
    pub worker_id: WorkerId,
    pub attempt: u32,
}

/// Uploads `path`, resuming where an earlier attempt stopped; nothing is sent when the
/// coordinator already holds the content. The file is opened once: hashed, then streamed from
/// the same handle, so a file replaced meanwhile (a rank writing its next checkpoint under
/// the same name) cannot make the data disagree with its digest. `producer` is required for a
/// job's outputs, absent for datasets and base models.
pub async fn upload_file(
    client: &mut ArtifactServiceClient<Authed>,
    path: &Path,
    kind: ArtifactKind,
    job_id: Option<JobId>,
    name: String,
    producer: Option<&Producer>,
) -> Result<ArtifactInfo> {
    let file = tokio::fs::File::open(path).await.map_err(io_error(path))?;
    upload_open_file(client, file, path, kind, job_id, name, producer).await
}

/// [`upload_file`] of a file already open at its start (`path` names it in errors).
pub async fn upload_open_file(
    client: &mut ArtifactServiceClient<Authed>,
    mut file: tokio::fs::File,
    path: &Path,
    kind: ArtifactKind,
    job_id: Option<JobId>,
    name: String,
    producer: Option<&Producer>,
) -> Result<ArtifactInfo> {
    let (digest, size) = hash_open_file(&mut file, path).await?;
    let info = ArtifactInfo {
        digest,
        size,
        kind,
        job_id,
        name,
        created_at: 0,
    };
    let status = client
        .upload_status(pb::UploadStatusRequest {
            digest: Some(digest.into()),
        })
        .await
        .map_err(rpc("UploadStatus"))?
        .into_inner();
    let offset = if status.complete || status.received > size {
        0
    } else {
        status.received
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::UploadMessage>(4);
    let header = pb::UploadMessage {
        message: Some(pb::upload_message::Message::Header(pb::UploadHeader {
            info: Some(info.clone().into()),
            offset,
            worker_id: producer
                .map(|p| p.worker_id.to_string())
                .unwrap_or_default(),
            attempt: producer.map_or(0, |p| p.attempt),
        })),
    };
    let reader_path = path.to_owned();
    let complete = status.complete;
    let reader = tokio::spawn(async move {
        if tx.send(header).await.is_err() || complete {
            return Ok::<(), Error>(());
        }
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(io_error(&reader_path))?;
        // Exactly the bytes hashed, even if the file grew since.
        let mut left = size - offset;
        let mut buf = vec![0u8; CHUNK_BYTES];
        while left > 0 {
            let want = usize::try_from(left)
                .unwrap_or(CHUNK_BYTES)
                .min(CHUNK_BYTES);
            let n = file
                .read(&mut buf[..want])
                .await
                .map_err(io_error(&reader_path))?;
            if n == 0 {
                return Ok(());
            }
            left -= n as u64;
            let chunk = pb::UploadMessage {
                message: Some(pb::upload_message::Message::Chunk(buf[..n].to_vec())),
            };
            if tx.send(chunk).await.is_err() {
                return Ok(());
            }
        }
        Ok(())
    });
    let response = client
        .upload(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(rpc("Upload"))?
        .into_inner();
    reader
        .await
        .map_err(|e| artifact_error(&digest, format!("reader task failed: {e}")))??;
    let stored =
        ArtifactInfo::try_from(response.info.ok_or_else(|| {
            artifact_error(&digest, "the coordinator returned no artifact info")
        })?)?;
    Ok(stored)
}

/// The lock of one cache entry, shared by every download of it in this process.
fn download_lock(path: &Path) -> std::sync::Arc<tokio::sync::Mutex<()>> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock, Weak};
    type Locks = Mutex<HashMap<PathBuf, Weak<tokio::sync::Mutex<()>>>>;
    static LOCKS: OnceLock<Locks> = OnceLock::new();
    let mut locks = LOCKS
        .get_or_init(Locks::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    locks.retain(|_, lock| lock.strong_count() > 0);
    if let Some(lock) = locks.get(path).and_then(Weak::upgrade) {
        return lock;
    }
    let lock = Arc::new(tokio::sync::Mutex::new(()));
    locks.insert(path.to_owned(), Arc::downgrade(&lock));
    lock
}

/// Where the cache keeps an artifact.
pub fn cached_path(cache_dir: &Path, digest: &Digest) -> PathBuf {
    cache_dir.join("sha256").join(digest.to_hex())
}

/// Downloads an artifact into the cache (resuming a partial download) and returns its path.
/// The content is verified against its digest before it enters the cache.
pub async fn download_to_cache(
    client: &mut ArtifactServiceClient<Authed>,
    cache_dir: &Path,
    digest: &Digest,
) -> Result<PathBuf> {
    let path = cached_path(cache_dir, digest);
    if tokio::fs::try_exists(&path).await.unwrap_or(false) {
        return Ok(path);
    }
    // Two ranks (or dataset files) needing one blob at once would both append to its `.part`
    // file: one downloads, the other waits and then finds it cached.
    let lock = download_lock(&path);
    let _one_at_a_time = lock.lock().await;
    if tokio::fs::try_exists(&path).await.unwrap_or(false) {
        return Ok(path);
    }
    let dir = cache_dir.join("sha256");
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(io_error(&dir))?;
    let partial = path.with_extension("part");
    let offset = tokio::fs::metadata(&partial)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&partial)
        .await
        .map_err(io_error(&partial))?;
    let mut stream = client
        .download(pb::DownloadRequest {
            digest: Some((*digest).into()),
            offset,
        })
        .await
        .map_err(rpc("Download"))?
        .into_inner();
    let mut at = offset;
    while let Some(chunk) = stream.message().await.map_err(rpc("Download"))? {
        if chunk.offset != at {
            return Err(artifact_error(
                digest,
                format!("chunk at byte {} where {at} was expected", chunk.offset),
            ));
        }
        file.write_all(&chunk.data)
            .await
            .map_err(io_error(&partial))?;
        // Flushed per chunk: a resume reads the file's size, which a late background write
        // must not overtake.
        file.flush().await.map_err(io_error(&partial))?;
        at += chunk.data.len() as u64;
    }
    file.flush().await.map_err(io_error(&partial))?;
    drop(file);
    let (actual, _) = hash_file(&partial).await?;
    if actual != *digest {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(artifact_error(
            digest,
            format!("downloaded data hashes to {actual}; discarded"),
        ));
    }
    tokio::fs::rename(&partial, &path)
        .await
        .map_err(io_error(&path))?;
    Ok(path)
}
