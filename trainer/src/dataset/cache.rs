//! VAE latent cache. An entry's key hashes everything that changes the latent: the image file's
//! bytes (sha256), the VAE's identity, the bucket size, the flip and the crop mode; so editing an
//! image, swapping the VAE or changing the resolution misses the cache instead of reusing a
//! stale latent. Entries live in memory, or on disk as `<key>.safetensors` files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use super::bucket::Reso;
use super::pixels::CropMode;
use crate::confine::AllowedRoots;
use crate::{Error, Result};

/// Tensor name inside a disk cache file.
const LATENT_TENSOR: &str = "latents";

/// sha256 of a file's bytes, the file opened inside `roots`.
pub fn file_sha256(path: &Path, roots: &AllowedRoots) -> Result<[u8; 32]> {
    let mut file = roots.open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io(path, e))?;
    Ok(hasher.finalize().into())
}

/// Latents by key; on disk (one safetensors file per entry, read back on each lookup) or in
/// memory.
pub struct LatentCache {
    vae_id: String,
    dir: Option<PathBuf>,
    /// Where disk entries must lie when read back.
    roots: AllowedRoots,
    mem: Mutex<HashMap<String, Tensor>>,
}

impl LatentCache {
    /// A cache held in memory for this run. `vae_id` names the encoder (e.g. the VAE file's hash).
    pub fn in_memory(vae_id: impl Into<String>) -> Self {
        Self {
            vae_id: vae_id.into(),
            dir: None,
            roots: AllowedRoots::any(),
            mem: Mutex::new(HashMap::new()),
        }
    }

    /// A cache kept as files under `dir` (created if missing), reused by later runs.
    pub fn on_disk(vae_id: impl Into<String>, dir: impl Into<PathBuf>) -> Result<Self> {
        Self::on_disk_within(vae_id, dir, AllowedRoots::any())
    }

    /// A disk cache whose folder and entries must lie inside `roots` (a cluster rank's data
    /// folders): a `.latent_cache` linked elsewhere is refused.
    pub fn on_disk_within(
        vae_id: impl Into<String>,
        dir: impl Into<PathBuf>,
        roots: AllowedRoots,
    ) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        roots.check(&dir)?;
        Ok(Self {
            vae_id: vae_id.into(),
            dir: Some(dir),
            roots,
            mem: Mutex::new(HashMap::new()),
        })
    }

    pub fn vae_id(&self) -> &str {
        &self.vae_id
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The key of one latent: hex sha256 over the file hash, VAE identity, bucket, flip and
    /// crop mode.
    pub fn key(&self, file_sha256: &[u8; 32], reso: Reso, flip: bool, crop: CropMode) -> String {
        let mut h = Sha256::new();
        h.update(b"loractl-latent-v1\0");
        h.update(file_sha256);
        h.update(self.vae_id.as_bytes());
        h.update(b"\0");
        h.update(format!("{}x{}\0{}\0{}", reso.0, reso.1, flip, crop.as_str()).as_bytes());
        hex(&h.finalize())
    }

    fn path_of(&self, key: &str) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{key}.safetensors")))
    }

    /// The latent for `key`, if cached. An unreadable disk entry counts as a miss (with a
    /// warning) so it gets rewritten.
    pub fn get(&self, key: &str) -> Result<Option<Tensor>> {
        if let Some(path) = self.path_of(key) {
            if !path.is_file() {
                return Ok(None);
            }
            let bytes = self.roots.read(&path)?;
            return match candle_core::safetensors::load_buffer(&bytes, &Device::Cpu) {
                Ok(mut t) => Ok(t.remove(LATENT_TENSOR)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "unreadable latent cache entry, recomputing: {e}");
                    Ok(None)
                }
            };
        }
        Ok(self.lock()?.get(key).cloned())
    }

    pub fn contains(&self, key: &str) -> Result<bool> {
        Ok(self.get(key)?.is_some())
    }

    /// Stores a latent; disk entries are written to a temporary file and renamed, so an
    /// interrupted run never leaves a truncated entry behind.
    pub fn insert(&self, key: &str, latent: &Tensor) -> Result<()> {
        let latent = latent.to_device(&Device::Cpu)?;
        if let Some(path) = self.path_of(key) {
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            let map = HashMap::from([(LATENT_TENSOR.to_string(), latent)]);
            candle_core::safetensors::save(&map, &tmp)?;
            std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
            return Ok(());
        }
        self.lock()?.insert(key.to_string(), latent);
        Ok(())
    }

    /// Entries held in memory (disk caches hold none).
    pub fn len_in_memory(&self) -> usize {
        self.mem.lock().map(|m| m.len()).unwrap_or(0)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, Tensor>>> {
        self.mem
            .lock()
            .map_err(|_| Error::Config("latent cache lock poisoned by a panic".into()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What one caching pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Latents computed by the encoder.
    pub encoded: usize,
    /// Latents already in the cache.
    pub reused: usize,
    /// Images skipped because they could not be read.
    pub skipped_images: usize,
}
