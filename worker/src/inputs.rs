//! A job's input files on this worker, settled before its rank starts: uploaded datasets
//! (`sha256:` references, see [`crate::dataset`]) are built in the cache and written into the
//! rank's spec as folders, and every path the spec reads or writes (model, VAE, datasets,
//! network weights, sample prompts, logging folder) must lie inside the worker's `model_dirs`,
//! `data_dirs`, its dataset cache or the rank's own folder once `..` and symlinks are resolved,
//! so a job cannot reach other files of the machine.

use std::path::{Component, Path, PathBuf};

use loractl_spec::JobSpec;

use crate::client::Link;
use crate::config::WorkerConfig;
use crate::dataset;
use crate::error::{Error, Result};

/// The spec text the rank gets: `spec_toml` with uploaded datasets replaced by their folders
/// (unchanged when it has none). Fails with [`Error::BadJob`] when a path is out of bounds.
pub async fn prepare_spec(
    config: &WorkerConfig,
    link: &Link,
    rank_dir: &Path,
    spec_toml: &str,
) -> Result<String> {
    // The coordinator validated the spec; one that does not parse here is reported by the
    // rank itself, and cannot make it read anything.
    let Ok(mut spec) = JobSpec::from_toml_str(spec_toml, "job spec") else {
        return Ok(spec_toml.to_owned());
    };
    let mut changed = false;
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
            changed = true;
        }
        if let Some(digest) = &uploaded[1] {
            spec.dataset.reg_data_dir =
                Some(dataset::materialize(&mut artifacts, &config.cache_dir, digest).await?);
            changed = true;
        }
    }
    check_paths(&spec, config, rank_dir)?;
    if !changed {
        return Ok(spec_toml.to_owned());
    }
    spec.to_toml_string()
        .map_err(|e| Error::BadJob(format!("cannot write the job spec back: {e}")))
}

/// The paths of `spec` a rank reads or writes, with their keys.
fn spec_paths(spec: &JobSpec) -> Vec<(&'static str, &Path)> {
    let mut paths = vec![
        (
            "model.pretrained_model_name_or_path",
            spec.model.pretrained_model_name_or_path.as_path(),
        ),
        (
            "dataset.train_data_dir",
            spec.dataset.train_data_dir.as_path(),
        ),
    ];
    let optional = [
        ("model.vae", spec.model.vae.as_deref()),
        ("dataset.reg_data_dir", spec.dataset.reg_data_dir.as_deref()),
        (
            "network.network_weights",
            spec.network.network_weights.as_deref(),
        ),
        (
            "sample.sample_prompts",
            spec.sample.sample_prompts.as_deref(),
        ),
        ("logging.logging_dir", spec.logging.logging_dir.as_deref()),
    ];
    paths.extend(
        optional
            .into_iter()
            .filter_map(|(key, path)| path.map(|p| (key, p))),
    );
    paths
}

/// `path` with `.` and `..` applied to its text (for paths that do not exist yet).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Where `path` really is: symlinks resolved for the longest part that exists, `..` applied to
/// the rest.
fn real(path: &Path) -> PathBuf {
    let path = lexical(path);
    let mut existing = path.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(canonical) = existing.canonicalize() {
            let mut out = canonical;
            out.extend(rest.iter().rev());
            return lexical(&out);
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return path,
        }
    }
}

/// Every input path of `spec` must be inside the folders this worker lets jobs use.
pub fn check_paths(spec: &JobSpec, config: &WorkerConfig, rank_dir: &Path) -> Result<()> {
    let roots: Vec<PathBuf> = config
        .model_dirs
        .iter()
        .chain(&config.data_dirs)
        .cloned()
        .chain([config.cache_dir.join("datasets"), rank_dir.to_path_buf()])
        .map(|root| real(&absolute(&root)))
        .collect();
    let mut problems = Vec::new();
    for (key, path) in spec_paths(spec) {
        let full = real(&absolute(&rank_dir.join(path)));
        // A missing model file is looked up by name in model_dirs by the rank; every other
        // path must lie inside, existing or not, so a job cannot even probe other folders.
        let looked_up = key.starts_with("model.") && !full.exists();
        if looked_up || roots.iter().any(|root| full.starts_with(root)) {
            continue;
        }
        problems.push(format!("{key} `{}`", path.display()));
    }
    if problems.is_empty() {
        return Ok(());
    }
    let list = |dirs: &[PathBuf]| {
        let names: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        format!("[{}]", names.join(", "))
    };
    Err(Error::BadJob(format!(
        "{} outside the folders this worker lets jobs use (data_dirs {}, model_dirs {}, \
         uploaded datasets, the job's own folder): submit local datasets with `loractl \
         submit`, which uploads them, or add the folder to `data_dirs` in the worker config",
        if problems.len() == 1 {
            format!("{} is", problems[0])
        } else {
            format!("{} are", problems.join(", "))
        },
        list(&config.data_dirs),
        list(&config.model_dirs),
    )))
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(model: &str, data: &str) -> JobSpec {
        let text = format!(
            "name = \"t\"\n[model]\npretrained_model_name_or_path = \"{model}\"\n[dataset]\n\
             train_data_dir = \"{data}\"\nresolution = \"64\"\n"
        );
        JobSpec::from_toml_str(&text, "t").unwrap()
    }

    #[test]
    fn paths_must_stay_inside_the_allowed_folders() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let data = root.join("data");
        let models = root.join("models");
        let rank = root.join("work/j1/0");
        let outside = root.join("secret");
        for d in [&data, &models, &rank, &outside] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(models.join("sd.safetensors"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, data.join("link")).unwrap();
        let config = WorkerConfig {
            data_dirs: vec![data.clone()],
            model_dirs: vec![models.clone()],
            cache_dir: root.join("cache"),
            ..WorkerConfig::default()
        };
        let ok = |model: &str, train: &str| check_paths(&spec(model, train), &config, &rank);
        let m = models.join("sd.safetensors");
        let m = m.to_str().unwrap();
        ok(m, data.join("train").to_str().unwrap()).unwrap();
        ok("sd15.safetensors", "train").unwrap();
        ok(m, root.join("cache/datasets/ab").to_str().unwrap()).unwrap();
        // A missing model is looked up by name; a dataset path outside is refused even when
        // nothing is there (a job cannot probe other folders).
        ok("/models/not-here.safetensors", "train").unwrap();
        assert!(ok(m, "/nowhere/train").is_err());
        let mut logs = spec(m, "train");
        logs.logging.logging_dir = Some(root.join("logs"));
        let err = check_paths(&logs, &config, &rank).unwrap_err().to_string();
        assert!(err.contains("logging.logging_dir"), "{err}");

        for (model, train, culprit) in [
            (m, outside.to_str().unwrap(), "dataset.train_data_dir"),
            (m, "../../../secret", "dataset.train_data_dir"),
            (
                m,
                data.join("../secret").to_str().unwrap(),
                "train_data_dir",
            ),
            (m, data.join("link").to_str().unwrap(), "train_data_dir"),
            (
                outside.to_str().unwrap(),
                "train",
                "model.pretrained_model_name_or_path",
            ),
        ] {
            let err = ok(model, train).unwrap_err().to_string();
            assert!(
                err.contains(culprit) && err.contains("data_dirs"),
                "{train}: {err}"
            );
        }
    }
}
