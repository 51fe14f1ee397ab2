//! The worker's gRPC clients: a [`Link`] to the coordinator (TLS when configured, the bearer
//! token on every call), and artifact transfer: resumable uploads of what ranks produce,
//! verified downloads (resume checkpoints) into a cache keyed by sha256.

use std::path::{Path, PathBuf};
use std::time::Duration;

use loractl_proto::domain::{ArtifactInfo, ArtifactKind, Digest, JobId};
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

/// Uploads `path`, resuming where an earlier attempt stopped; nothing is sent when the
/// coordinator already holds the content.
pub async fn upload_file(
    client: &mut ArtifactServiceClient<Authed>,
    path: &Path,
    kind: ArtifactKind,
    job_id: Option<JobId>,
    name: String,
) -> Result<ArtifactInfo> {
    let (digest, size) = hash_file(path).await?;
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
        })),
    };
    let reader_path = path.to_owned();
    let complete = status.complete;
    let reader = tokio::spawn(async move {
        if tx.send(header).await.is_err() || complete {
            return Ok::<(), Error>(());
        }
        let mut file = tokio::fs::File::open(&reader_path)
            .await
            .map_err(io_error(&reader_path))?;
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(io_error(&reader_path))?;
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            let n = file.read(&mut buf).await.map_err(io_error(&reader_path))?;
            if n == 0 {
                return Ok(());
            }
            let chunk = pb::UploadMessage {
                message: Some(pb::upload_message::Message::Chunk(buf[..n].to_vec())),
            };
            if tx.send(chunk).await.is_err() {
                return Ok(());
            }
        }
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
