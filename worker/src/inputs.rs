//! The spec a rank gets, settled before it starts: uploaded datasets (`sha256:` references,
//! see [`crate::dataset`]) are built in the cache and written into the spec as folders, then
//! [`crate::paths::confine`] resolves every path inside the worker's `model_dirs` and
//! `data_dirs` — the dataset cache counting as one more data folder — and moves the outputs
//! into the rank's folder.

use std::path::{Path, PathBuf};

use loractl_spec::JobSpec;

use crate::client::Link;
use crate::config::WorkerConfig;
use crate::dataset;
use crate::error::{io_error, Error, Result};

/// Where uploaded datasets are built; jobs may read them like a `data_dirs` folder.
pub fn dataset_cache(config: &WorkerConfig) -> PathBuf {
    config.cache_dir.join("datasets")
}

/// The spec text the rank reads: uploaded datasets resolved, every path confined (an escaping
/// path is [`Error::PathNotAllowed`], a bad config).
pub async fn prepare_spec(
    config: &WorkerConfig,
    link: &Link,
    output_dir: &Path,
    spec_toml: &str,
) -> Result<String> {
    let mut spec = JobSpec::from_toml_str(spec_toml, "<assignment>")
        .map_err(|e| Error::BadSpec(e.to_string()))?;
    let uploaded = [
        dataset::parse_reference(&spec.dataset.train_data_dir),
        spec.dataset
            .reg_data_dir
            .as_deref()
            .and_then(dataset::parse_reference),
    ];
    if uploaded.iter().any(Option::is_some) {
        let mut artifacts = link.artifacts().await?;
        if let Some(digest) = &uploaded[0] {
            spec.dataset.train_data_dir =
                dataset::materialize(&mut artifacts, &config.cache_dir, digest).await?;
        }
        if let Some(digest) = &uploaded[1] {
            spec.dataset.reg_data_dir =
                Some(dataset::materialize(&mut artifacts, &config.cache_dir, digest).await?);
        }
    }
    let cache = dataset_cache(config);
    tokio::fs::create_dir_all(&cache)
        .await
        .map_err(io_error(&cache))?;
    let mut data_dirs = config.data_dirs.clone();
    data_dirs.push(cache);
    crate::paths::confine(&mut spec, &config.model_dirs, &data_dirs, output_dir)?;
    spec.to_toml_string()
        .map_err(|e| Error::BadSpec(e.to_string()))
}
