//! `loractl rank`: one rank of a cluster job, started by `loractl-worker` with the job in
//! `LORACTL_*` variables (see `loractl_worker::rank`). It runs the trainer, prints progress and
//! finished files as `@loractl` lines for the worker to forward and upload, writes a checkpoint
//! every few steps, and on SIGTERM saves one more before dying by that signal (so the
//! coordinator sees a killed rank, retried without spending the job's restarts).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Instant;

use loractl_proto::domain::EXIT_BAD_CONFIG;
use loractl_spec::JobSpec;
use loractl_trainer::confine::AllowedRoots;
use loractl_trainer::run::{self, RunEvent, RunOptions, RunResult};
use loractl_worker::protocol::{ArtifactKindName, ChildMessage};

/// Optimizer steps between checkpoints when the job does not say (`LORACTL_CHECKPOINT_STEPS`).
const DEFAULT_CHECKPOINT_STEPS: usize = 10;

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn bad_config(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(EXIT_BAD_CONFIG as u8)
}

/// The base model as the spec names it, else a file or folder of that name in one of the
/// worker's model directories.
fn resolve_model(spec_path: &Path, model_dirs: &[PathBuf]) -> Option<PathBuf> {
    if spec_path.exists() {
        return Some(spec_path.to_path_buf());
    }
    let name = spec_path.file_name()?;
    model_dirs.iter().map(|d| d.join(name)).find(|p| p.exists())
}

pub fn rank() -> anyhow::Result<ExitCode> {
    let Some(spec_file) = env_path("LORACTL_SPEC") else {
        return Ok(bad_config(
            "LORACTL_SPEC is not set: `loractl rank` is started by loractl-worker",
        ));
    };
    let Some(output_dir) = env_path("LORACTL_OUTPUT_DIR") else {
        return Ok(bad_config("LORACTL_OUTPUT_DIR is not set"));
    };
    let world: usize = std::env::var("LORACTL_WORLD_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    if world != 1 {
        return Ok(bad_config(format!(
            "this job asks for {world} ranks, but data-parallel training across ranks is not \
             available yet: set resources.workers = 1 and one GPU"
        )));
    }
    let spec = match JobSpec::from_file(&spec_file) {
        Ok(s) => s,
        Err(e) => return Ok(bad_config(e)),
    };
    let mut spec = match spec.resolved() {
        Ok(s) => s,
        Err(e) => return Ok(bad_config(e)),
    };
    let model_dirs: Vec<PathBuf> = std::env::var("LORACTL_MODEL_DIRS")
        .unwrap_or_default()
        .split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect();
    let model = &spec.spec.model.pretrained_model_name_or_path;
    match resolve_model(model, &model_dirs) {
        Some(p) => spec.spec.model.pretrained_model_name_or_path = p,
        None => {
            return Ok(bad_config(format!(
                "base model `{}` is neither a path on this worker nor in its model_dirs {:?}",
                model.display(),
                model_dirs
            )))
        }
    }
    spec.spec.output.output_dir = output_dir.clone();
    spec.spec.output.resume = env_path("LORACTL_RESUME");
    // Paths in a cluster job are absolute on the worker; relative ones are taken from the
    // rank's folder.
    let base = spec_file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let every = std::env::var("LORACTL_CHECKPOINT_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CHECKPOINT_STEPS);
    let ro = RunOptions {
        device: rank_device(),
        state_as_file: true,
        checkpoint_every_n_steps: Some(every),
        allowed_roots: data_roots(&spec, &base),
        ..RunOptions::default()
    };
    let stop = ro.stop.clone();
    ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))?;
    let started = Instant::now();
    let mut first_step: Option<(Instant, usize)> = None;
    let mut emit = |e: &RunEvent| {
        let message = match e {
            RunEvent::Step {
                step,
                total,
                epoch,
                loss,
                lrs,
                d_lrs,
                samples,
                ..
            } => {
                let (t0, s0) = *first_step.get_or_insert((started, step - 1));
                let secs = t0.elapsed().as_secs_f64().max(1e-9);
                let rate = (*step - s0) as f64 / secs;
                Some(ChildMessage::Progress {
                    step: *step as u64,
                    total_steps: *total as u64,
                    epoch: *epoch as u32,
                    loss: *loss as f64,
                    lr: lrs.first().map_or(0.0, |(_, l)| *l),
                    d_lr: d_lrs.as_ref().and_then(|d| d.first()).map(|(_, l)| *l),
                    steps_per_second: rate,
                    samples_per_second: rate * *samples as f64,
                    gpu_memory_bytes: 0,
                })
            }
            RunEvent::Saved { path, .. } => Some(artifact(path, ArtifactKindName::Lora)),
            RunEvent::StateSaved { path, .. } => Some(artifact(path, ArtifactKindName::Checkpoint)),
            RunEvent::Sampled { paths, .. } => {
                for p in paths {
                    println!("{}", artifact(p, ArtifactKindName::SampleImage).to_line());
                }
                None
            }
            RunEvent::Status { message } => {
                println!("{message}");
                None
            }
            RunEvent::Warning { message } => {
                println!("warning: {message}");
                None
            }
            other => {
                println!("{}", crate::local::event_json(other));
                None
            }
        };
        if let Some(m) = message {
            println!("{}", m.to_line());
        }
    };
    match run::run(&spec, &base, &ro, &mut emit) {
        Ok(RunResult::Finished { .. }) => Ok(ExitCode::SUCCESS),
        Ok(RunResult::Stopped { state, step }) => {
            eprintln!("stopped at step {step}; checkpoint {}", state.display());
            die_by_sigterm();
            Ok(ExitCode::from(1))
        }
        Err(e) => {
            use loractl_trainer::Error as E;
            eprintln!("error: {e}");
            let code = match e {
                E::Config(_)
                | E::BadCheckpoint { .. }
                | E::MissingTensor { .. }
                | E::ShapeMismatch { .. } => EXIT_BAD_CONFIG as u8,
                _ => 1,
            };
            Ok(ExitCode::from(code))
        }
    }
}

/// The folders a rank may read data from: the worker's `LORACTL_DATA_DIRS`, else the spec's
/// own dataset folders and prompt file. Every file is checked when opened, so a link inside a
/// dataset cannot lead out.
fn data_roots(spec: &loractl_spec::ResolvedSpec, base: &Path) -> AllowedRoots {
    if let Some(dirs) = std::env::var_os("LORACTL_DATA_DIRS") {
        return AllowedRoots::only(
            std::env::split_paths(&dirs).filter(|p| !p.as_os_str().is_empty()),
        );
    }
    let s = &spec.spec;
    let listed = [
        Some(&s.dataset.train_data_dir),
        s.dataset.reg_data_dir.as_ref(),
        s.sample.sample_prompts.as_ref(),
    ];
    AllowedRoots::only(
        listed
            .into_iter()
            .flatten()
            .map(|p| run::resolve_path(base, p)),
    )
}

/// The worker hides every GPU but the rank's own (`CUDA_VISIBLE_DEVICES`), so a rank with a
/// GPU trains on CUDA device 0; without one, or in a build without the `cuda` feature, on the CPU
/// (said in the job's log).
fn rank_device() -> candle_core::Device {
    let gpus = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default();
    if gpus.trim().is_empty() {
        return candle_core::Device::Cpu;
    }
    match candle_core::Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            println!(
                "warning: GPU {gpus} was assigned but cannot be used ({e}); training on the CPU"
            );
            candle_core::Device::Cpu
        }
    }
}

fn artifact(path: &Path, kind: ArtifactKindName) -> ChildMessage {
    ChildMessage::Artifact {
        path: path.to_path_buf(),
        kind,
        name: path.file_name().map(|n| n.to_string_lossy().to_string()),
    }
}

/// Ends the process by SIGTERM, the way it was asked to stop, so the worker reports a killed
/// rank (retried without spending restarts) rather than a training error.
fn die_by_sigterm() {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    #[cfg(unix)]
    // SAFETY: restoring the default disposition and raising a signal in our own process.
    unsafe {
        libc::signal(libc::SIGTERM, libc::SIG_DFL);
        libc::raise(libc::SIGTERM);
    }
}
