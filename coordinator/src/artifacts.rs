//! Content-addressed artifact store on local disk: datasets, base models, LoRA files, sample
//! images and checkpoints, each stored once under its sha256. Uploads land in `partial/` and
//! can resume at the byte the coordinator already holds; only data whose size and sha256 match
//! the announced ones moves to `blobs/`. Concurrent uploads of one blob (fifty submits of the
//! same new dataset) all succeed: one writes, the others wait for it and then find the blob
//! stored, or carry on from the bytes it left. A quota bounds the total size, a limit bounds each
//! artifact, and a job keeps only its latest N checkpoints.
//!
//! Layout: `blobs/<hex>` (data), `meta/<hex>` (`loractl.v1.ArtifactInfo`, prost),
//! `partial/<hex>` (incomplete uploads).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use loractl_proto::domain::{ArtifactInfo, ArtifactKind, Digest, JobId, UnixMs};
use loractl_proto::pb;
use prost::Message;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct ArtifactConfig {
    pub root: PathBuf,
    /// Total bytes of stored and in-flight artifacts.
    pub quota_bytes: u64,
    /// Largest single artifact.
    pub max_artifact_bytes: u64,
    /// Checkpoints kept per job (older ones are deleted when a new one arrives); at least 1.
    pub keep_checkpoints: usize,
}

/// What the store holds of one digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadStatus {
    pub complete: bool,
    /// Bytes of a partial upload (0 when complete or never started).
    pub received: u64,
}

pub struct ArtifactStore {
    config: ArtifactConfig,
    inner: Mutex<Inner>,
}

struct Inner {
    /// Bytes of stored artifacts plus the announced size of uploads in flight.
    used: u64,
    /// Uploads in flight; the sender is dropped when one ends, waking uploads of the same
    /// blob that wait for it.
    uploading: HashMap<Digest, tokio::sync::watch::Sender<()>>,
    last_created: UnixMs,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

fn artifact_error(digest: &Digest, problem: impl Into<String>) -> Error {
    Error::Artifact {
        digest: digest.to_hex(),
        problem: problem.into(),
    }
}

/// Either the artifact is already stored, or an upload to continue.
pub enum Begin {
    Complete(ArtifactInfo),
    Upload(Upload),
}

impl ArtifactStore {
    pub async fn open(config: ArtifactConfig) -> Result<Arc<Self>> {
        for dir in ["blobs", "meta", "partial"] {
            let path = config.root.join(dir);
            tokio::fs::create_dir_all(&path)
                .await
                .map_err(io_error(&path))?;
        }
        let store = Self {
            config,
            inner: Mutex::new(Inner {
                used: 0,
                uploading: HashMap::new(),
                last_created: 0,
            }),
        };
        let used = store.list(None).await?.iter().map(|a| a.size).sum();
        store.lock().used = used;
        Ok(Arc::new(store))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section is a few field updates; a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.config.root.join("blobs").join(digest.to_hex())
    }

    fn meta_path(&self, digest: &Digest) -> PathBuf {
        self.config.root.join("meta").join(digest.to_hex())
    }

    fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.config.root.join("partial").join(digest.to_hex())
    }

    /// Bytes counted against the quota.
    pub fn used_bytes(&self) -> u64 {
        self.lock().used
    }

    pub async fn info(&self, digest: &Digest) -> Result<Option<ArtifactInfo>> {
        let path = self.meta_path(digest);
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(&path)(e)),
        };
        decode_info(&path, &bytes).map(Some)
    }

    pub async fn status(&self, digest: &Digest) -> Result<UploadStatus> {
        if self.info(digest).await?.is_some() {
            return Ok(UploadStatus {
                complete: true,
                received: 0,
            });
        }
        let received = match tokio::fs::metadata(self.partial_path(digest)).await {
            Ok(meta) => meta.len(),
            Err(_) => 0,
        };
        Ok(UploadStatus {
            complete: false,
            received,
        })
    }

    /// Starts or resumes an upload whose data begins at byte `offset`. While another upload
    /// of the same blob is in flight this waits for it to end. Bytes the store already holds
    /// are skipped from the incoming data (verified at the end with the rest), so any offset
    /// up to the bytes held is accepted; a gap is refused.
    pub async fn begin_upload(self: &Arc<Self>, info: ArtifactInfo, offset: u64) -> Result<Begin> {
        let digest = info.digest;
        if info.size > self.config.max_artifact_bytes {
            return Err(artifact_error(
                &digest,
                format!(
                    "{} bytes exceeds the limit of {} bytes per artifact",
                    info.size, self.config.max_artifact_bytes
                ),
            ));
        }
        loop {
            if let Some(stored) = self.info(&digest).await? {
                return Ok(Begin::Complete(stored));
            }
            let mut in_flight = {
                let mut inner = self.lock();
                match inner.uploading.get(&digest) {
                    Some(writer) => writer.subscribe(),
                    None => {
                        let needed = inner.used + info.size;
                        if needed > self.config.quota_bytes {
                            return Err(Error::QuotaExceeded {
                                needed: info.size,
                                quota: self.config.quota_bytes,
                            });
                        }
                        inner.used = needed;
                        inner
                            .uploading
                            .insert(digest, tokio::sync::watch::channel(()).0);
                        break;
                    }
                }
            };
            // Resolves (with an error) once the other upload's sender is dropped.
            let _ = in_flight.changed().await;
        }
        // From here the reservation is ours; dropping `upload` releases it.
        let mut upload = Upload {
            store: Arc::clone(self),
            info,
            file: None,
            written: 0,
            skip: 0,
            finished: false,
        };
        // The upload we may have waited for finished it meanwhile.
        if let Some(stored) = self.info(&digest).await? {
            return Ok(Begin::Complete(stored));
        }
        let path = self.partial_path(&digest);
        let mut held = self.status(&digest).await?.received;
        if held > upload.info.size {
            // Not this blob's bytes (a different announced size): start over.
            tokio::fs::remove_file(&path)
                .await
                .map_err(io_error(&path))?;
            held = 0;
        }
        if offset > held {
            return Err(artifact_error(
                &digest,
                format!(
                    "upload starts at byte {offset} but the coordinator holds {held}; resume at \
                     {held} or earlier"
                ),
            ));
        }
        upload.written = held;
        upload.skip = held - offset;
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await
            .map_err(io_error(&path))?;
        upload.file = Some(file);
        Ok(Begin::Upload(upload))
    }

    /// Opens a stored artifact for reading from `offset`.
    pub async fn open_blob(
        &self,
        digest: &Digest,
        offset: u64,
    ) -> Result<(ArtifactInfo, tokio::fs::File)> {
        let info = self
            .info(digest)
            .await?
            .ok_or_else(|| artifact_error(digest, "not stored here; upload it first"))?;
        if offset > info.size {
            return Err(artifact_error(
                digest,
                format!("offset {offset} is past its end ({} bytes)", info.size),
            ));
        }
        let path = self.blob_path(digest);
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(io_error(&path))?;
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(io_error(&path))?;
        Ok((info, file))
    }

    /// Stored artifacts, optionally only one job's, oldest first.
    pub async fn list(&self, job: Option<&JobId>) -> Result<Vec<ArtifactInfo>> {
        let dir = self.config.root.join("meta");
        let mut entries = tokio::fs::read_dir(&dir).await.map_err(io_error(&dir))?;
        let mut out = Vec::new();
        while let Some(entry) = entries.next_entry().await.map_err(io_error(&dir))? {
            let path = entry.path();
            let bytes = match tokio::fs::read(&path).await {
                Ok(bytes) => bytes,
                // Deleted by a concurrent garbage collection since the listing.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error(&path)(e)),
            };
            let info = decode_info(&path, &bytes)?;
            if job.is_none() || info.job_id.as_ref() == job {
                out.push(info);
            }
        }
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.name.cmp(&b.name)));
        Ok(out)
    }

    async fn delete(&self, info: &ArtifactInfo) -> Result<()> {
        // Metadata first: an artifact without metadata is invisible, one without data is not.
        for path in [self.meta_path(&info.digest), self.blob_path(&info.digest)] {
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&path)(e)),
            }
        }
        let mut inner = self.lock();
        inner.used = inner.used.saturating_sub(info.size);
        Ok(())
    }

    /// Deletes all but the latest `keep_checkpoints` checkpoints of `job`; returns the
    /// deleted ones.
    pub async fn gc_checkpoints(&self, job: &JobId) -> Result<Vec<ArtifactInfo>> {
        let checkpoints: Vec<ArtifactInfo> = self
            .list(Some(job))
            .await?
            .into_iter()
            .filter(|a| a.kind == ArtifactKind::Checkpoint)
            .collect();
        let keep = self.config.keep_checkpoints.max(1);
        let excess = checkpoints.len().saturating_sub(keep);
        let doomed: Vec<ArtifactInfo> = checkpoints.into_iter().take(excess).collect();
        for info in &doomed {
            self.delete(info).await?;
        }
        Ok(doomed)
    }

    fn next_created_at(&self) -> UnixMs {
        let mut inner = self.lock();
        // Strictly increasing, so "latest" is well defined even within one millisecond.
        let at = crate::now_ms().max(inner.last_created + 1);
        inner.last_created = at;
        at
    }
}

fn decode_info(path: &Path, bytes: &[u8]) -> Result<ArtifactInfo> {
    let corrupt = |problem: String| Error::Corrupt {
        key: path.display().to_string(),
        problem,
    };
    let wire = pb::ArtifactInfo::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
    ArtifactInfo::try_from(wire).map_err(|e| corrupt(e.to_string()))
}

/// An upload in progress. Dropping it without [`Upload::finish`] keeps the partial data for a
/// later resume and releases its quota reservation.
pub struct Upload {
    store: Arc<ArtifactStore>,
    info: ArtifactInfo,
    file: Option<tokio::fs::File>,
    written: u64,
    /// Incoming bytes still to drop: the sender started before the bytes already held.
    skip: u64,
    finished: bool,
}

impl Upload {
    pub fn info(&self) -> &ArtifactInfo {
        &self.info
    }

    pub async fn write(&mut self, chunk: &[u8]) -> Result<()> {
        let held = usize::try_from(self.skip)
            .unwrap_or(usize::MAX)
            .min(chunk.len());
        self.skip -= held as u64;
        let chunk = &chunk[held..];
        if chunk.is_empty() {
            return Ok(());
        }
        let end = self.written + chunk.len() as u64;
        if end > self.info.size {
            return Err(artifact_error(
                &self.info.digest,
                format!("more data than the announced {} bytes", self.info.size),
            ));
        }
        let path = self.store.partial_path(&self.info.digest);
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| artifact_error(&self.info.digest, "upload already finished"))?;
        file.write_all(chunk).await.map_err(io_error(&path))?;
        // tokio writes in the background: flush so that what is acknowledged is on file, and
        // a resume offset read from the file's size is never overtaken by a late write.
        file.flush().await.map_err(io_error(&path))?;
        self.written = end;
        Ok(())
    }

    /// Verifies size and sha256 and makes the artifact visible. On a mismatch the partial data
    /// is discarded.
    pub async fn finish(mut self) -> Result<ArtifactInfo> {
        let digest = self.info.digest;
        let partial = self.store.partial_path(&digest);
        if let Some(mut file) = self.file.take() {
            file.flush().await.map_err(io_error(&partial))?;
            file.sync_all().await.map_err(io_error(&partial))?;
        }
        if self.written != self.info.size || self.skip > 0 {
            return Err(artifact_error(
                &digest,
                format!(
                    "upload ended at byte {} of {}; resume it at {}",
                    self.written, self.info.size, self.written
                ),
            ));
        }
        let actual = sha256_file(&partial).await?;
        if actual != digest {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(artifact_error(
                &digest,
                format!("the data received hashes to {actual}; upload it again"),
            ));
        }
        let blob = self.store.blob_path(&digest);
        tokio::fs::rename(&partial, &blob)
            .await
            .map_err(io_error(&blob))?;
        let mut info = self.info.clone();
        info.created_at = self.store.next_created_at();
        let meta = self.store.meta_path(&digest);
        // Written beside the partial data, then renamed: `meta/` only ever holds whole records.
        let tmp = partial.with_extension("meta");
        let bytes = pb::ArtifactInfo::from(info.clone()).encode_to_vec();
        tokio::fs::write(&tmp, bytes)
            .await
            .map_err(io_error(&tmp))?;
        tokio::fs::rename(&tmp, &meta)
            .await
            .map_err(io_error(&meta))?;
        self.finished = true;
        self.store.lock().uploading.remove(&digest);
        Ok(info)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut inner = self.store.lock();
        inner.uploading.remove(&self.info.digest);
        inner.used = inner.used.saturating_sub(self.info.size);
    }
}

/// sha256 of a file, read in 1 MiB pieces.
pub async fn sha256_file(path: &Path) -> Result<Digest> {
    let mut file = tokio::fs::File::open(path).await.map_err(io_error(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).await.map_err(io_error(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Digest(hasher.finalize().into()))
}

/// sha256 of a byte slice.
pub fn sha256(bytes: &[u8]) -> Digest {
    Digest(Sha256::digest(bytes).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(root: &Path) -> ArtifactConfig {
        ArtifactConfig {
            root: root.to_owned(),
            quota_bytes: 1000,
            max_artifact_bytes: 600,
            keep_checkpoints: 2,
        }
    }

    fn info(data: &[u8], kind: ArtifactKind, job: Option<&str>, name: &str) -> ArtifactInfo {
        ArtifactInfo {
            digest: sha256(data),
            size: data.len() as u64,
            kind,
            job_id: job.map(JobId::new),
            name: name.to_owned(),
            created_at: 0,
        }
    }

    async fn upload(
        store: &Arc<ArtifactStore>,
        info: ArtifactInfo,
        data: &[u8],
    ) -> Result<ArtifactInfo> {
        match store.begin_upload(info, 0).await? {
            Begin::Complete(info) => Ok(info),
            Begin::Upload(mut up) => {
                up.write(data).await?;
                up.finish().await
            }
        }
    }

    #[tokio::test]
    async fn upload_verify_download() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(config(dir.path())).await.unwrap();
        let data = b"lora weights".to_vec();
        let stored = upload(
            &store,
            info(&data, ArtifactKind::Lora, Some("j1"), "a.safetensors"),
            &data,
        )
        .await
        .unwrap();
        assert!(stored.created_at > 0);
        assert_eq!(store.used_bytes(), data.len() as u64);
        let (got, mut file) = store.open_blob(&stored.digest, 5).await.unwrap();
        assert_eq!(got, stored);
        let mut rest = Vec::new();
        file.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, &data[5..]);
        // A second upload of the same content is a no-op.
        let again = upload(
            &store,
            info(&data, ArtifactKind::Lora, Some("j1"), "a.safetensors"),
            &data,
        )
        .await
        .unwrap();
        assert_eq!(again, stored);
        assert_eq!(store.used_bytes(), data.len() as u64);
    }

    #[tokio::test]
    async fn resume_after_an_interrupted_upload() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(config(dir.path())).await.unwrap();
        let data: Vec<u8> = (0..500u32).map(|i| (i % 251) as u8).collect();
        let meta = info(&data, ArtifactKind::Dataset, None, "train.tar");
        let Begin::Upload(mut up) = store.begin_upload(meta.clone(), 0).await.unwrap() else {
            panic!("nothing stored yet");
        };
        up.write(&data[..200]).await.unwrap();
        drop(up);
        assert_eq!(
            store.used_bytes(),
            0,
            "an abandoned upload releases its reservation"
        );
        let status = store.status(&meta.digest).await.unwrap();
        assert_eq!(
            status,
            UploadStatus {
                complete: false,
                received: 200
            }
        );
        let err = match store.begin_upload(meta.clone(), 300).await {
            Err(e) => e,
            Ok(_) => panic!("offset 300 must be refused when 200 bytes are held"),
        };
        assert!(err.to_string().contains("resume at 200"), "{err}");
        let Begin::Upload(mut up) = store.begin_upload(meta.clone(), 200).await.unwrap() else {
            panic!("still incomplete");
        };
        up.write(&data[200..]).await.unwrap();
        up.finish().await.unwrap();
        assert!(store.status(&meta.digest).await.unwrap().complete);
    }

    /// A sender that starts before the bytes held (it asked for the status before another
    /// upload wrote them) has what is held skipped.
    #[tokio::test]
    async fn an_upload_from_an_earlier_offset_skips_what_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(config(dir.path())).await.unwrap();
        let data: Vec<u8> = (0..500u32).map(|i| (i % 251) as u8).collect();
        let meta = info(&data, ArtifactKind::Dataset, None, "train.tar");
        let Begin::Upload(mut up) = store.begin_upload(meta.clone(), 0).await.unwrap() else {
            panic!("nothing stored yet");
        };
        up.write(&data[..178]).await.unwrap();
        drop(up);
        let Begin::Upload(mut up) = store.begin_upload(meta.clone(), 100).await.unwrap() else {
            panic!("still incomplete");
        };
        for piece in data[100..].chunks(7) {
            up.write(piece).await.unwrap();
        }
        let stored = up.finish().await.unwrap();
        assert_eq!(stored.digest, meta.digest);
        assert_eq!(store.used_bytes(), 500);
    }

    /// Fifty first submits of one new dataset at once (26 to 49 of 50 failed with "another
    /// upload of it is in progress" or "upload starts at byte 0 but the coordinator holds
    /// 178"): every one succeeds, and the blob is stored once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_uploads_of_one_blob_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path());
        config.quota_bytes = 1 << 20;
        config.max_artifact_bytes = 1 << 20;
        let store = ArtifactStore::open(config).await.unwrap();
        let data: Vec<u8> = (0..4000u32).map(|i| (i % 253) as u8).collect();
        let meta = info(&data, ArtifactKind::Dataset, None, "image.png");
        let uploads = (0..50).map(|_| {
            let (store, meta, data) = (Arc::clone(&store), meta.clone(), data.clone());
            tokio::spawn(async move {
                // As a client does: ask what is held, then send from there in pieces.
                let offset = store.status(&meta.digest).await?.received;
                match store.begin_upload(meta, offset).await? {
                    Begin::Complete(info) => Ok(info),
                    Begin::Upload(mut up) => {
                        for piece in data[offset as usize..].chunks(178) {
                            up.write(piece).await?;
                            tokio::task::yield_now().await;
                        }
                        up.finish().await
                    }
                }
            })
        });
        let mut stored = Vec::new();
        for upload in uploads.collect::<Vec<_>>() {
            stored.push(upload.await.unwrap().unwrap_or_else(|e| panic!("{e}")));
        }
        assert!(stored.iter().all(|s| s == &stored[0]));
        assert_eq!(store.list(None).await.unwrap().len(), 1);
        assert_eq!(store.used_bytes(), data.len() as u64);
    }

    #[tokio::test]
    async fn corrupted_data_is_rejected_and_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(config(dir.path())).await.unwrap();
        let meta = info(b"expected", ArtifactKind::Lora, None, "x");
        let err = upload(&store, meta.clone(), b"tampered").await.unwrap_err();
        assert!(err.to_string().contains("upload it again"), "{err}");
        assert_eq!(
            store.status(&meta.digest).await.unwrap(),
            UploadStatus {
                complete: false,
                received: 0
            }
        );
        assert!(store.list(None).await.unwrap().is_empty());
        assert_eq!(store.used_bytes(), 0);
        let err = upload(&store, meta, b"expected and more")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("more data than"), "{err}");
    }

    #[tokio::test]
    async fn quota_and_size_limits() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(config(dir.path())).await.unwrap();
        let big = vec![1u8; 700];
        let err = upload(&store, info(&big, ArtifactKind::BaseModel, None, "m"), &big)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("limit of 600 bytes"), "{err}");
        let a = vec![2u8; 600];
        upload(&store, info(&a, ArtifactKind::BaseModel, None, "a"), &a)
            .await
            .unwrap();
        let b = vec![3u8; 500];
        let err = upload(&store, info(&b, ArtifactKind::BaseModel, None, "b"), &b)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::QuotaExceeded {
                    needed: 500,
                    quota: 1000
                }
            ),
            "{err}"
        );
        // The quota is recomputed from disk on reopen.
        drop(store);
        let store = ArtifactStore::open(config(dir.path())).await.unwrap();
        assert_eq!(store.used_bytes(), 600);
    }

    #[tokio::test]
    async fn keeps_the_latest_checkpoints_of_each_job() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(config(dir.path())).await.unwrap();
        let mut stored = Vec::new();
        for step in 0..4u8 {
            let data = vec![step; 10];
            stored.push(
                upload(
                    &store,
                    info(
                        &data,
                        ArtifactKind::Checkpoint,
                        Some("j1"),
                        &format!("step{step}"),
                    ),
                    &data,
                )
                .await
                .unwrap(),
            );
        }
        let other = vec![9u8; 10];
        upload(
            &store,
            info(&other, ArtifactKind::Checkpoint, Some("j2"), "other"),
            &other,
        )
        .await
        .unwrap();
        let lora = vec![8u8; 10];
        upload(
            &store,
            info(&lora, ArtifactKind::Lora, Some("j1"), "final"),
            &lora,
        )
        .await
        .unwrap();

        let deleted = store.gc_checkpoints(&JobId::new("j1")).await.unwrap();
        let names: Vec<&str> = deleted.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["step0", "step1"]);
        let left: Vec<String> = store
            .list(Some(&JobId::new("j1")))
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.name)
            .collect();
        assert_eq!(left, ["step2", "step3", "final"]);
        assert!(
            store.status(&stored[0].digest).await.unwrap()
                == UploadStatus {
                    complete: false,
                    received: 0
                }
        );
        assert_eq!(store.list(Some(&JobId::new("j2"))).await.unwrap().len(), 1);
        assert_eq!(store.used_bytes(), 40);
    }
}
