//! `loractl submit job.toml`: the job spec is validated here first (the coordinator's own
//! validator), its relative paths are made absolute from the job file's folder, a local
//! dataset folder is checked (kohya layout, images) and uploaded content-addressed — each file
//! by sha256, then a manifest of them (see `loractl_worker::dataset`), whose `sha256:` reference
//! takes the folder's place in the spec — and only then is the job submitted. A problem found
//! here leaves the coordinator untouched.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use loractl_proto::domain::{ArtifactKind, GpuRequest, Job, Worker};
use loractl_proto::pb;
use loractl_spec::JobSpec;
use loractl_worker::client;
use loractl_worker::dataset::{self, Manifest, ManifestEntry};

use super::show;
use super::{Remote, Target};

/// Folder depth beyond which a dataset walk stops (a symlink loop, not a dataset).
const MAX_DEPTH: usize = 16;

pub struct SubmitOptions {
    pub priority: i32,
    /// Dataset paths are folders on the workers: send them as written, upload nothing.
    pub remote_data: bool,
    pub watch: bool,
    pub json: bool,
}

pub async fn submit(target: &Target, job: &Path, opts: &SubmitOptions) -> anyhow::Result<ExitCode> {
    let job = submit_job(target, job, opts).await?;
    if opts.watch {
        return super::watch(target, job.id.as_str(), opts.json).await;
    }
    Ok(ExitCode::SUCCESS)
}

/// Checks, uploads and submits; returns the job as the coordinator accepted it.
pub async fn submit_job(target: &Target, job: &Path, opts: &SubmitOptions) -> anyhow::Result<Job> {
    let (spec_toml, uploads) = {
        let mut spec = JobSpec::from_file(job)?;
        let resolved = spec.resolved()?;
        if !opts.json {
            for warning in &resolved.warnings {
                eprintln!("warning: {warning}");
            }
        }
        let base = job_folder(job)?;
        absolutize(&mut spec, &base);
        let datasets = datasets(&mut spec, &base, opts.remote_data)?;
        if !datasets.is_empty() {
            // The kohya layout and the images, before anything is sent.
            let checked = spec.resolved()?;
            let plan = loractl_trainer::run::plan(&checked, &base, false)
                .context("checking the dataset before uploading it")?;
            if !opts.json {
                eprintln!(
                    "dataset checked: {} steps over {} epoch(s)",
                    plan.total_steps, plan.num_epochs
                );
            }
        }
        (spec, datasets)
    };
    let mut spec = spec_toml;
    let remote = Remote::connect(target).await?;
    for upload in &uploads {
        let reference = upload_dataset(&remote, &upload.folder, opts.json).await?;
        match upload.key {
            DatasetKey::Train => spec.dataset.train_data_dir = PathBuf::from(reference),
            DatasetKey::Reg => spec.dataset.reg_data_dir = Some(PathBuf::from(reference)),
        }
    }
    warn_if_unplaceable(&remote, &spec, opts.json).await;
    let reply = remote
        .jobs()
        .await?
        .submit_job(pb::SubmitJobRequest {
            spec_toml: spec.to_toml_string()?,
            priority: opts.priority,
        })
        .await
        .map_err(|s| remote.refused("SubmitJob", &s))?
        .into_inner();
    let job = Job::try_from(
        reply
            .job
            .ok_or_else(|| anyhow::anyhow!("SubmitJob: the coordinator sent no job"))?,
    )?;
    if opts.json && !opts.watch {
        let mut value = show::job_json(&job);
        value["warnings"] = reply.warnings.into();
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else if opts.json {
        println!(
            "{}",
            serde_json::json!({"event": "submitted", "job": show::job_json(&job), "warnings": reply.warnings})
        );
    } else {
        for warning in &reply.warnings {
            eprintln!("warning: {warning}");
        }
        println!("{}", job.id);
        let state = if job.waiting_reason.is_empty() {
            job.state.to_string()
        } else {
            format!("{} ({})", job.state, job.waiting_reason)
        };
        eprintln!(
            "submitted {} ({}): {state}; follow it with `loractl watch {}`",
            job.id, job.name, job.id
        );
    }
    Ok(job)
}

fn job_folder(job: &Path) -> anyhow::Result<PathBuf> {
    let parent = job
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    parent
        .canonicalize()
        .with_context(|| format!("the job file's folder `{}`", parent.display()))
}

/// Relative input paths that exist next to the job file become absolute; others (a bare model
/// name the workers look up in their `model_dirs`, a folder on the workers) stay as written.
fn absolutize(spec: &mut JobSpec, base: &Path) {
    let fix = |p: &mut PathBuf| {
        if p.is_relative() && dataset::parse_reference(p).is_none() && base.join(&*p).exists() {
            *p = base.join(&*p);
        }
    };
    fix(&mut spec.model.pretrained_model_name_or_path);
    for p in [
        spec.model.vae.as_mut(),
        spec.network.network_weights.as_mut(),
        spec.sample.sample_prompts.as_mut(),
    ]
    .into_iter()
    .flatten()
    {
        fix(p);
    }
    if let Some(resume) = spec.output.resume.take() {
        eprintln!(
            "warning: output.resume `{}` is ignored on a cluster: a job resumes from its own \
             checkpoints",
            resume.display()
        );
    }
}

#[derive(Clone, Copy)]
enum DatasetKey {
    Train,
    Reg,
}

struct DatasetUpload {
    key: DatasetKey,
    folder: PathBuf,
}

/// The dataset folders to upload. Without `remote_data` each must be a folder here; with it
/// the paths are the workers' and must be absolute.
fn datasets(
    spec: &mut JobSpec,
    base: &Path,
    remote_data: bool,
) -> anyhow::Result<Vec<DatasetUpload>> {
    let mut uploads = Vec::new();
    let entries = [
        (
            DatasetKey::Train,
            "dataset.train_data_dir",
            Some(spec.dataset.train_data_dir.clone()),
        ),
        (
            DatasetKey::Reg,
            "dataset.reg_data_dir",
            spec.dataset.reg_data_dir.clone(),
        ),
    ];
    for (key, name, path) in entries {
        let Some(path) = path else { continue };
        if dataset::parse_reference(&path).is_some() {
            continue; // uploaded before
        }
        if remote_data {
            if path.is_relative() {
                bail!(
                    "{name} `{}` is relative: with --remote-data write the folder's absolute \
                     path on the workers",
                    path.display()
                );
            }
            continue;
        }
        let local = base.join(&path);
        if !local.is_dir() {
            bail!(
                "{name} `{}` is not a folder on this machine (looked for {}): give the dataset \
                 folder (the parent of `N_name` folders), or pass --remote-data if it is a folder \
                 on the workers",
                path.display(),
                local.display()
            );
        }
        let folder = local
            .canonicalize()
            .with_context(|| format!("{name} `{}`", local.display()))?;
        match key {
            DatasetKey::Train => spec.dataset.train_data_dir = folder.clone(),
            DatasetKey::Reg => spec.dataset.reg_data_dir = Some(folder.clone()),
        }
        uploads.push(DatasetUpload { key, folder });
    }
    Ok(uploads)
}

/// Every regular file under `root` (hidden ones skipped), with its `/`-separated relative path.
fn walk(root: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    fn visit(
        dir: &Path,
        prefix: &str,
        depth: usize,
        out: &mut Vec<(String, PathBuf)>,
    ) -> anyhow::Result<()> {
        if depth > MAX_DEPTH {
            bail!(
                "{}: folders nested deeper than {MAX_DEPTH} levels",
                dir.display()
            );
        }
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading {}", dir.display()))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                bail!(
                    "{}: file names in a dataset must be UTF-8",
                    entry.path().display()
                );
            };
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let rel = if prefix.is_empty() {
                name.to_owned()
            } else {
                format!("{prefix}/{name}")
            };
            let meta =
                std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
            if meta.is_dir() {
                visit(&path, &rel, depth + 1, out)?;
            } else if meta.is_file() {
                out.push((rel, path));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    visit(root, "", 0, &mut out)?;
    Ok(out)
}

/// Uploads every file of `folder` (content-addressed: what the coordinator holds is not sent
/// again), then the manifest; returns the `sha256:` reference for the spec.
async fn upload_dataset(remote: &Remote, folder: &Path, json: bool) -> anyhow::Result<String> {
    let files = walk(folder)?;
    if files.is_empty() {
        bail!("dataset folder {} has no files", folder.display());
    }
    let total: u64 = files
        .iter()
        .filter_map(|(_, p)| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    if !json {
        eprintln!(
            "uploading dataset {} ({} files, {})",
            folder.display(),
            files.len(),
            show::bytes(total)
        );
    }
    let mut artifacts = remote.artifacts().await?;
    let mut entries = Vec::with_capacity(files.len());
    for (rel, path) in &files {
        let info = client::upload_file(
            &mut artifacts,
            path,
            ArtifactKind::Dataset,
            None,
            rel.clone(),
            None,
        )
        .await
        .map_err(|e| remote.explain(e))
        .with_context(|| format!("uploading {}", path.display()))?;
        entries.push(ManifestEntry {
            path: rel.clone(),
            sha256: info.digest.to_hex(),
            size: info.size,
        });
    }
    let manifest = Manifest::new(entries);
    let scratch = tempfile_path(folder);
    std::fs::write(&scratch, manifest.to_json())
        .with_context(|| format!("writing {}", scratch.display()))?;
    let name = format!(
        "{}.manifest.json",
        folder
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "dataset".into())
    );
    let uploaded = client::upload_file(
        &mut artifacts,
        &scratch,
        ArtifactKind::Dataset,
        None,
        name,
        None,
    )
    .await;
    let _ = std::fs::remove_file(&scratch);
    let info = uploaded
        .map_err(|e| remote.explain(e))
        .context("uploading the dataset manifest")?;
    let reference = dataset::reference(&info.digest);
    if !json {
        eprintln!("dataset uploaded as {reference}");
    }
    Ok(reference)
}

fn tempfile_path(folder: &Path) -> PathBuf {
    let stem = folder
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::env::temp_dir().join(format!(
        "loractl-manifest-{stem}-{}-{}.json",
        std::process::id(),
        show::now_ms()
    ))
}

/// Whether some worker could ever run a job asking for `gpus` on each of `count` workers.
fn fits(workers: &[Worker], gpus: &GpuRequest, count: u32) -> bool {
    let able = workers
        .iter()
        .filter(|w| w.alive)
        .filter(|w| match gpus {
            GpuRequest::Cpu => true,
            GpuRequest::All => !w.gpus.is_empty(),
            GpuRequest::Ids(ids) => ids.iter().all(|i| w.gpus.iter().any(|g| g.index == *i)),
        })
        .count();
    able >= count as usize
}

/// A job no registered worker can take waits in the queue; say so (a worker may join later).
async fn warn_if_unplaceable(remote: &Remote, spec: &JobSpec, json: bool) {
    if json {
        return;
    }
    let Ok(gpus) = loractl_spec::Gpus::parse(&spec.resources.gpus) else {
        return;
    };
    let request = match gpus {
        loractl_spec::Gpus::All => GpuRequest::All,
        loractl_spec::Gpus::Cpu => GpuRequest::Cpu,
        loractl_spec::Gpus::Ids(ids) => GpuRequest::Ids(ids),
    };
    let Ok(workers) = super::jobs::list_workers(remote).await else {
        return;
    };
    if !fits(&workers, &request, spec.resources.workers) {
        let have: Vec<String> = workers
            .iter()
            .filter(|w| w.alive)
            .map(|w| {
                if w.gpus.is_empty() {
                    format!("{} (CPU)", w.id)
                } else {
                    format!(
                        "{} (GPUs {})",
                        w.id,
                        show::gpu_list(&w.gpus.iter().map(|g| g.index).collect::<Vec<_>>())
                    )
                }
            })
            .collect();
        eprintln!(
            "warning: no registered worker can run this job yet (resources.gpus = \"{}\", \
             resources.workers = {}; workers: {}): it waits in the queue until one can{}",
            spec.resources.gpus,
            spec.resources.workers,
            if have.is_empty() {
                "none".to_owned()
            } else {
                have.join(", ")
            },
            if matches!(request, GpuRequest::All) && workers.iter().all(|w| w.gpus.is_empty()) {
                "; set resources.gpus = \"cpu\" to train on CPU workers"
            } else {
                ""
            }
        );
    }
}
