//! `loractl plan` and `loractl train`: a job spec run on this machine.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::Device;
use loractl_spec::{JobSpec, ResolvedSpec};
use loractl_trainer::run::{self, RunOptions, RunResult};

use crate::progress::Progress;

/// Exit code of a run stopped by Ctrl-C with its state saved (128 + SIGINT, as shells expect).
const EXIT_INTERRUPTED: u8 = 130;

/// Reads and validates a job spec; the error lists every problem with its key path.
pub fn load_spec(job: &Path) -> anyhow::Result<(ResolvedSpec, PathBuf)> {
    let spec = JobSpec::from_file(job)?;
    let resolved = spec.resolved()?;
    let base = job
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok((resolved, base))
}

pub fn plan(job: &Path, json: bool, inspect_model: bool) -> anyhow::Result<ExitCode> {
    let (spec, base) = load_spec(job)?;
    let plan = run::plan(&spec, &base, inspect_model)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{plan}");
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_device(text: &str) -> anyhow::Result<Device> {
    if text.eq_ignore_ascii_case("cpu") {
        return Ok(Device::Cpu);
    }
    if let Some(id) = text.strip_prefix("cuda:").or(text.strip_prefix("cuda")) {
        let id: usize = if id.is_empty() {
            0
        } else {
            id.parse()
                .with_context(|| format!("`{text}`: the GPU index must be a number, e.g. cuda:0"))?
        };
        #[cfg(not(feature = "cuda"))]
        {
            let _ = id;
            bail!("cannot use {text}: {}", crate::gpu::NO_CUDA);
        }
        #[cfg(feature = "cuda")]
        return Device::new_cuda(id).with_context(|| {
            format!(
                "cannot open {text}: no usable NVIDIA GPU (check `nvidia-smi`, \
                 CUDA_VISIBLE_DEVICES and `loractl gpu-check`)"
            )
        });
    }
    bail!("unknown device `{text}`: use `cpu` or `cuda:N`")
}

/// Seconds for file timestamps from `SOURCE_DATE_EPOCH`, for byte-identical outputs.
fn source_date_epoch() -> anyhow::Result<Option<u64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => Ok(Some(v.trim().parse().with_context(|| {
            format!("SOURCE_DATE_EPOCH=`{v}` is not a number of seconds")
        })?)),
        Err(_) => Ok(None),
    }
}

pub fn train(
    job: &Path,
    resume: Option<PathBuf>,
    json: bool,
    device: &str,
) -> anyhow::Result<ExitCode> {
    let (mut spec, base) = load_spec(job)?;
    if let Some(r) = resume {
        // Relative to where the command runs, as a shell user expects for a flag.
        let abs = if r.is_absolute() {
            r
        } else {
            std::env::current_dir()?.join(r)
        };
        spec.output.resume = Some(abs);
    }
    let ro = RunOptions {
        device: parse_device(device)?,
        fixed_time: source_date_epoch()?,
        ..RunOptions::default()
    };
    let presses = Arc::new(AtomicUsize::new(0));
    {
        let stop = ro.stop.clone();
        let presses = presses.clone();
        ctrlc::set_handler(move || {
            let n = presses.fetch_add(1, Ordering::SeqCst);
            if n == 0 {
                eprintln!(
                    "\ninterrupt: saving a resumable state after the current step \
                     (press Ctrl-C again to quit without saving)"
                );
                stop.store(true, Ordering::SeqCst);
            } else {
                eprintln!("\ninterrupt: quitting without saving");
                std::process::exit(EXIT_INTERRUPTED as i32);
            }
        })
        .context("installing the Ctrl-C handler")?;
    }
    let mut progress = Progress::new(json);
    let result = run::run(&spec, &base, &ro, &mut |e| progress.event(e));
    progress.finish();
    match result? {
        RunResult::Finished { lora, steps } => {
            if !json {
                eprintln!("trained {steps} steps: {}", lora.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        RunResult::Stopped { state, step } => {
            if !json {
                eprintln!(
                    "stopped at step {step}; state saved in {}\nresume with: loractl train {} \
                     --resume {}",
                    state.display(),
                    job.display(),
                    state.display()
                );
            }
            Ok(ExitCode::from(EXIT_INTERRUPTED))
        }
    }
}

/// The files of a quickstart in `dir`: the model (the bundled tiny one unless given), the
/// dataset (generated unless given) and `job.toml` with `extra` appended. Returns the
/// canonical `dir`, the model file and the job spec.
pub fn write_quickstart(
    dir: &Path,
    model: Option<PathBuf>,
    data: Option<PathBuf>,
    resolution: u32,
    steps: usize,
    extra: &str,
) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let abs = |p: PathBuf| -> anyhow::Result<PathBuf> {
        p.canonicalize()
            .with_context(|| format!("{}: no such file or folder", p.display()))
    };
    let model = match model {
        Some(m) => abs(m)?,
        None => loractl_trainer::demo::bundled_tiny_model(),
    };
    let data = match data {
        Some(d) => abs(d)?,
        None => {
            eprintln!(
                "writing a generated dataset to {}",
                dir.join("train").display()
            );
            loractl_trainer::demo::write_dataset(&dir, resolution, 8)?
        }
    };
    let job = dir.join("job.toml");
    let text = loractl_trainer::demo::job_toml(&model, &data, resolution, steps) + extra;
    std::fs::write(&job, text).with_context(|| format!("writing {}", job.display()))?;
    Ok((dir, model, job))
}

pub fn quickstart(
    dir: &Path,
    model: Option<PathBuf>,
    data: Option<PathBuf>,
    resolution: u32,
    steps: usize,
    device: &str,
) -> anyhow::Result<ExitCode> {
    let (_, _, job) = write_quickstart(dir, model, data, resolution, steps, "")?;
    eprintln!("job spec: {}\n", job.display());
    plan(&job, false, true)?;
    eprintln!();
    let code = train(&job, None, false, device)?;
    eprintln!(
        "\nnext: edit {} (every key is an sd-scripts option) or run\n  loractl quickstart \
         --model /path/to/v1-5-pruned-emaonly.safetensors --data /path/to/train --resolution 512",
        job.display()
    );
    Ok(code)
}
