//! Datasets uploaded through the coordinator. `loractl submit` uploads every file of a local
//! dataset folder as a content-addressed artifact, then a [`Manifest`] listing them (relative
//! path, sha256, size), and writes `sha256:<manifest digest>` in the job spec where the folder
//! was. The worker downloads the manifest and its files into its cache (each verified against
//! its digest) and builds the folder once per manifest; jobs sharing a dataset share it.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use loractl_proto::domain::Digest;
use loractl_proto::pb::artifact_service_client::ArtifactServiceClient;
use serde::{Deserialize, Serialize};

use crate::client::{self, Authed};
use crate::error::{io_error, Error, Result};

/// What a job spec writes in place of an uploaded folder: `sha256:` and the manifest's digest.
pub const REFERENCE_PREFIX: &str = "sha256:";
pub const MANIFEST_VERSION: u32 = 1;
/// A manifest is a list of names and hashes; anything larger is not one.
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// The files of an uploaded dataset folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub files: Vec<ManifestEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    /// Relative to the folder, `/`-separated, e.g. `10_zenny/001.png`.
    pub path: String,
    /// sha256 of the content, 64 hex digits.
    pub sha256: String,
    pub size: u64,
}

fn bad_job(problem: impl Into<String>) -> Error {
    Error::BadJob(problem.into())
}

/// Whether `path` is a plain relative path that stays inside the folder it is joined to.
fn is_contained(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\\')
        && !path.contains('\0')
        && path.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && Path::new(part)
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)))
        })
}

impl Manifest {
    /// A manifest of `files`, sorted by path so that the same folder always has the same digest.
    pub fn new(mut files: Vec<ManifestEntry>) -> Self {
        files.sort();
        Self {
            version: MANIFEST_VERSION,
            files,
        }
    }

    pub fn to_json(&self) -> String {
        // Plain strings and integers: serialization cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Reads a manifest and checks every entry: a relative path that stays inside the folder
    /// (no `..`, no absolute path), listed once, with a valid digest.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let manifest: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| bad_job(format!("dataset manifest does not parse: {e}")))?;
        if manifest.version != MANIFEST_VERSION {
            return Err(bad_job(format!(
                "dataset manifest version {} is not {MANIFEST_VERSION}: use a loractl of the \
                 same release as this worker",
                manifest.version
            )));
        }
        let mut seen = BTreeSet::new();
        for entry in &manifest.files {
            if !is_contained(&entry.path) {
                return Err(bad_job(format!(
                    "dataset manifest entry `{}` is not a relative path inside the dataset \
                     folder",
                    entry.path
                )));
            }
            if !seen.insert(entry.path.as_str()) {
                return Err(bad_job(format!(
                    "dataset manifest lists `{}` twice",
                    entry.path
                )));
            }
            entry.digest()?;
        }
        Ok(manifest)
    }
}

impl ManifestEntry {
    pub fn digest(&self) -> Result<Digest> {
        self.sha256.parse().map_err(|_| {
            bad_job(format!(
                "dataset manifest entry `{}`: `{}` is not a sha256 digest",
                self.path, self.sha256
            ))
        })
    }
}

/// `sha256:<hex>` for a manifest digest.
pub fn reference(manifest: &Digest) -> String {
    format!("{REFERENCE_PREFIX}{manifest}")
}

/// The manifest digest of a spec path written as `sha256:<hex>`; `None` for an ordinary path.
pub fn parse_reference(path: &Path) -> Option<Digest> {
    path.to_str()?.strip_prefix(REFERENCE_PREFIX)?.parse().ok()
}

/// Where the folder of `manifest` is built in the cache.
pub fn folder(cache_dir: &Path, manifest: &Digest) -> PathBuf {
    cache_dir.join("datasets").join(manifest.to_hex())
}

/// One materialization at a time per worker process: two ranks using the same dataset must
/// not write the same partial downloads.
static BUILDING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Downloads the dataset of `manifest` (manifest, then each file, verified) into the cache and
/// builds its folder; returns the folder's absolute path. A folder built earlier is reused.
pub async fn materialize(
    artifacts: &mut ArtifactServiceClient<Authed>,
    cache_dir: &Path,
    manifest: &Digest,
) -> Result<PathBuf> {
    let target = folder(cache_dir, manifest);
    let _building = BUILDING.lock().await;
    let absolute = |target: PathBuf| std::fs::canonicalize(&target).map_err(io_error(target));
    if tokio::fs::try_exists(&target).await.unwrap_or(false) {
        return absolute(target);
    }
    let not_uploaded = |e: Error| match e {
        Error::Rpc { status, .. } if status.code() == tonic::Code::NotFound => bad_job(format!(
            "dataset {} is not in the coordinator's artifact store: `loractl submit` uploads a \
             local dataset folder before it submits the job",
            reference(manifest)
        )),
        other => other,
    };
    let manifest_path = client::download_to_cache(artifacts, cache_dir, manifest)
        .await
        .map_err(not_uploaded)?;
    let size = tokio::fs::metadata(&manifest_path)
        .await
        .map_err(io_error(&manifest_path))?
        .len();
    if size > MAX_MANIFEST_BYTES {
        return Err(bad_job(format!(
            "dataset {} is {size} bytes, too large for a manifest",
            reference(manifest)
        )));
    }
    let bytes = tokio::fs::read(&manifest_path)
        .await
        .map_err(io_error(&manifest_path))?;
    let listing = Manifest::parse(&bytes)?;

    let parent = cache_dir.join("datasets");
    let building = parent.join(format!("{}.building", manifest.to_hex()));
    let _ = tokio::fs::remove_dir_all(&building).await;
    tokio::fs::create_dir_all(&building)
        .await
        .map_err(io_error(&building))?;
    for entry in &listing.files {
        let digest = entry.digest()?;
        let blob = client::download_to_cache(artifacts, cache_dir, &digest)
            .await
            .map_err(not_uploaded)?;
        let dest = building.join(&entry.path);
        if let Some(dir) = dest.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(io_error(dir))?;
        }
        // A hard link shares the cached bytes; a copy where the file system has none.
        if tokio::fs::hard_link(&blob, &dest).await.is_err() {
            tokio::fs::copy(&blob, &dest)
                .await
                .map_err(io_error(&dest))?;
        }
    }
    tokio::fs::rename(&building, &target)
        .await
        .map_err(io_error(&target))?;
    tracing::info!(dataset = %reference(manifest), files = listing.files.len(), "dataset ready");
    absolute(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str) -> ManifestEntry {
        ManifestEntry {
            path: path.to_owned(),
            sha256: Digest([7; 32]).to_hex(),
            size: 3,
        }
    }

    #[test]
    fn manifests_round_trip_sorted() {
        let manifest = Manifest::new(vec![entry("5_b/2.png"), entry("5_b/1.png")]);
        assert_eq!(manifest.files[0].path, "5_b/1.png");
        let back = Manifest::parse(manifest.to_json().as_bytes()).unwrap();
        assert_eq!(back, manifest);
    }

    #[test]
    fn entries_cannot_leave_the_folder() {
        for bad in [
            "../etc/passwd",
            "5_a/../../x",
            "/etc/passwd",
            "5_a//x",
            "./x",
            "",
            "a\\..\\b",
        ] {
            let manifest = Manifest::new(vec![entry(bad)]);
            let err = Manifest::parse(manifest.to_json().as_bytes()).unwrap_err();
            assert!(
                matches!(&err, Error::BadJob(m) if m.contains("not a relative path")),
                "{bad}: {err}"
            );
        }
        let twice = Manifest::new(vec![entry("a.png"), entry("a.png")]);
        assert!(Manifest::parse(twice.to_json().as_bytes())
            .unwrap_err()
            .to_string()
            .contains("twice"));
        let mut bad_digest = entry("a.png");
        bad_digest.sha256 = "xyz".into();
        assert!(Manifest::parse(Manifest::new(vec![bad_digest]).to_json().as_bytes()).is_err());
    }

    #[test]
    fn references_name_a_digest() {
        let digest = Digest([0xcd; 32]);
        let text = reference(&digest);
        assert_eq!(parse_reference(Path::new(&text)), Some(digest));
        assert_eq!(parse_reference(Path::new("train")), None);
        assert_eq!(parse_reference(Path::new("sha256:abc")), None);
    }
}
