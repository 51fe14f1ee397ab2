//! `loractl rank`: one rank of a cluster job, started by `loractl-worker` with the job in
//! `LORACTL_*` variables (see `loractl_worker::rank`). It runs the trainer, prints progress and
//! finished files as `@loractl` lines for the worker to forward and upload, writes a checkpoint
//! every few steps, and on SIGTERM saves one more before dying by that signal (the worker sent
//! it, so the coordinator sees a stopped rank, retried without spending the job's restarts).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Instant;

use loractl_collective::{rendezvous, Announcement, Collective, RingConfig, RingListener, TcpRing};
use loractl_proto::domain::ArtifactKind;
use loractl_proto::domain::EXIT_BAD_CONFIG;
use loractl_spec::JobSpec;
use loractl_trainer::confine::AllowedRoots;
use loractl_trainer::run::{self, RunEvent, RunOptions, RunResult};
use loractl_trainer::ErrorKind;
use loractl_worker::config::defaults;
use loractl_worker::protocol::{env, split_paths, ChildMessage, ParentMessage, RankProgress};

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn bad_config(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(EXIT_BAD_CONFIG as u8)
}

/// A number the worker set, else `default` when the variable is unset (a rank started by
/// hand); a value that is not a positive number is an error naming the variable.
fn env_number(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => v
            .trim()
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{name} `{v}` is not a positive number")),
    }
}

pub fn rank() -> anyhow::Result<ExitCode> {
    let Some(spec_file) = env_path(env::SPEC) else {
        return Ok(bad_config(format!(
            "{} is not set: `loractl rank` is started by loractl-worker",
            env::SPEC
        )));
    };
    let Some(output_dir) = env_path(env::OUTPUT_DIR) else {
        return Ok(bad_config(format!("{} is not set", env::OUTPUT_DIR)));
    };
    let numbers = (
        env_number(env::WORLD_SIZE, 1),
        env_number(env::CHECKPOINT_STEPS, defaults::CHECKPOINT_EVERY_N_STEPS),
    );
    let (world, every) = match numbers {
        (Ok(world), Ok(every)) => (world as usize, every as usize),
        (Err(e), _) | (_, Err(e)) => return Ok(bad_config(e)),
    };
    // The worker wrote this spec for this rank: every path resolved on this machine and
    // confined to its folders (`loractl_worker::paths`).
    let spec = match JobSpec::from_file(&spec_file) {
        Ok(s) => s,
        Err(e) => return Ok(bad_config(e)),
    };
    let mut spec = match spec.resolved() {
        Ok(s) => s,
        Err(e) => return Ok(bad_config(e)),
    };
    spec.output.output_dir = output_dir.clone();
    spec.output.resume = env_path(env::RESUME);
    // Paths in a cluster job are absolute on the worker; relative ones are taken from the
    // rank's folder.
    let base = spec_file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let device = match rank_device() {
        Ok(d) => d,
        Err(code) => return Ok(code),
    };
    let ro = RunOptions {
        device,
        state_as_file: true,
        checkpoint_every_n_steps: Some(every),
        allowed_roots: data_roots(&spec, &base),
        ..RunOptions::default()
    };
    let stop = ro.stop.clone();
    ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))?;
    let started = Instant::now();
    let mut first_step: Option<(Instant, usize)> = None;
    // `loss/epoch_average` of the last finished epoch, sent with every later step and
    // at once when the epoch ends (with the last step's figures).
    let mut epoch_average: Option<f64> = None;
    let mut last_progress: Option<RankProgress> = None;
    let mut emit = |e: &RunEvent| {
        let message = match e {
            RunEvent::Step {
                step,
                total,
                epoch,
                loss,
                loss_average,
                lrs,
                d_lrs,
                samples,
                data_seconds,
                allreduce_seconds,
            } => {
                let (t0, s0) = *first_step.get_or_insert((started, step - 1));
                let secs = t0.elapsed().as_secs_f64().max(1e-9);
                let rate = (*step - s0) as f64 / secs;
                let d_lrs = d_lrs.clone().unwrap_or_default();
                let progress = RankProgress {
                    step: *step as u64,
                    total_steps: *total as u64,
                    epoch: *epoch as u32,
                    loss: *loss as f64,
                    lr: lrs.first().map_or(0.0, |(_, l)| *l),
                    d_lr: d_lrs.first().map(|(_, l)| *l),
                    steps_per_second: rate,
                    samples_per_second: rate * *samples as f64,
                    loss_average: Some(*loss_average as f64),
                    loss_epoch_average: epoch_average,
                    lrs: lrs.clone(),
                    d_lrs,
                    data_seconds: Some(*data_seconds),
                    allreduce_seconds: Some(*allreduce_seconds),
                    ..RankProgress::default()
                };
                last_progress = Some(progress.clone());
                Some(ChildMessage::Progress(progress))
            }
            RunEvent::Epoch { loss_average, .. } => {
                epoch_average = Some(*loss_average as f64);
                println!("{}", crate::progress::event_json(e));
                last_progress.as_ref().map(|p| {
                    ChildMessage::Progress(RankProgress {
                        loss_epoch_average: epoch_average,
                        ..p.clone()
                    })
                })
            }
            RunEvent::Saved { path, .. } => Some(artifact(path, ArtifactKind::Lora)),
            RunEvent::StateSaved { path, step } => match checkpoint_of_step(path, *step) {
                Ok(own) => Some(artifact(&own, ArtifactKind::Checkpoint)),
                Err(e) => {
                    println!(
                        "warning: checkpoint of step {step} not published ({}: {e})",
                        path.display()
                    );
                    None
                }
            },
            RunEvent::TrainingLog { path } => Some(artifact(path, ArtifactKind::TrainingLog)),
            RunEvent::Sampled { paths, .. } => {
                for p in paths {
                    println!("{}", artifact(p, ArtifactKind::SampleImage).to_line());
                }
                None
            }
            RunEvent::Phase { name, done } => Some(ChildMessage::Phase {
                name: name.clone(),
                done: *done,
            }),
            RunEvent::Status { message } => {
                println!("{message}");
                None
            }
            RunEvent::Warning { message } => {
                println!("warning: {message}");
                None
            }
            other => {
                println!("{}", crate::progress::event_json(other));
                None
            }
        };
        if let Some(m) = message {
            println!("{}", m.to_line());
        }
    };
    let outcome = if world > 1 {
        // Join the collective before any weight is loaded, so a missing peer fails the attempt
        // early.
        let collective = match join_collective(world, &ro.device) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e:#}");
                return Ok(ExitCode::from(1));
            }
        };
        run::run_parallel(&spec, &base, &ro, collective, &mut emit)
    } else {
        run::run(&spec, &base, &ro, &mut emit)
    };
    match outcome {
        Ok(RunResult::Finished { .. }) => Ok(ExitCode::SUCCESS),
        Ok(RunResult::Stopped { state, step }) => {
            eprintln!("stopped at step {step}; checkpoint {}", state.display());
            die_by_sigterm();
            Ok(ExitCode::from(1))
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(exit_code(e.kind())))
        }
    }
}

/// The rank's exit code for a failed run, from the error's own classification: a bad config
/// is never retried; an internal failure or a diverged run is a training error, retried from
/// the last checkpoint while the job has restarts left.
fn exit_code(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::BadConfig => EXIT_BAD_CONFIG as u8,
        ErrorKind::Internal | ErrorKind::Diverged => 1,
    }
}

/// This rank's backend for a world of several ranks: NCCL between GPU ranks (a `cuda`
/// build), the TCP ring between CPU ranks. Every rank announces what it uses, so a job whose
/// ranks disagree fails at the rendezvous with a sentence naming the odd rank.
fn join_collective(
    world: usize,
    device: &candle_core::Device,
) -> anyhow::Result<Box<dyn Collective>> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(gpu) = device {
        return Ok(Box::new(join_nccl(world, gpu)?));
    }
    let _ = device;
    Ok(Box::new(join_ring(world)?))
}

fn env_rank() -> anyhow::Result<usize> {
    use anyhow::Context;
    let v = std::env::var(env::RANK).with_context(|| format!("{} is not set", env::RANK))?;
    v.parse()
        .with_context(|| format!("{} `{v}` is not a number", env::RANK))
}

/// How long a collective waits for a silent peer: the worker's `collective_timeout_secs`.
fn collective_timeout() -> anyhow::Result<std::time::Duration> {
    let secs = env_number(
        env::COLLECTIVE_TIMEOUT_SECS,
        defaults::COLLECTIVE_TIMEOUT_SECS,
    )
    .map_err(anyhow::Error::msg)?;
    Ok(std::time::Duration::from_secs(secs))
}

/// Announces this rank to the worker (which passes it to the coordinator's rendezvous) and
/// waits for every rank's announcement on stdin, by rank.
fn meet_peers(announcement: &Announcement) -> anyhow::Result<Vec<String>> {
    use anyhow::Context;
    use std::io::BufRead;
    let address = announcement.to_text();
    println!("{}", ChildMessage::Rendezvous { address }.to_line());
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.context("reading the peers' addresses from the worker")?;
        if let Some(ParentMessage::Peers { addresses }) = ParentMessage::parse(&line) {
            return Ok(addresses);
        }
    }
    anyhow::bail!(
        "the worker closed this rank's input before the rendezvous gave every rank's address"
    )
}

/// Binds this rank's end of the TCP ring on the worker's ring host (the address the worker's
/// peers reach it at), announces it, and connects the ring to every rank's address.
fn join_ring(world: usize) -> anyhow::Result<TcpRing> {
    use anyhow::Context;
    let var = |name: &str| std::env::var(name).with_context(|| format!("{name} is not set"));
    let rank = env_rank()?;
    let token = format!("{}/{}", var(env::JOB_ID)?, var(env::ATTEMPT)?);
    let host = std::env::var(env::RING_HOST)
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "127.0.0.1".into());
    let config = RingConfig::new(rank, world, token).with_timeout(collective_timeout()?);
    // An IPv6 host needs brackets in a socket address.
    let bind = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:0")
    } else {
        format!("{host}:0")
    };
    let listener = RingListener::bind(&bind, config)?;
    let address = listener.local_addr().to_string();
    let peers = meet_peers(&Announcement::Tcp(address))?;
    let addresses = rendezvous::tcp_addresses(&peers, world)?;
    println!("rank {rank} of {world}: ring peers {addresses:?}");
    Ok(listener.connect(&addresses)?)
}

/// Joins the job's NCCL communicator on this rank's GPU: rank 0 makes the communicator's id
/// and announces it, the others announce `nccl` and take rank 0's id from the rendezvous.
/// NCCL finds its peers' GPUs itself (its own sockets, NVLink, InfiniBand); `NCCL_*`
/// variables in the worker's environment (e.g. `NCCL_SOCKET_IFNAME`) tune that.
#[cfg(feature = "cuda")]
fn join_nccl(
    world: usize,
    gpu: &candle_core::CudaDevice,
) -> anyhow::Result<loractl_collective::Nccl> {
    use loractl_collective::{Nccl, NcclConfig, NcclId};
    let rank = env_rank()?;
    let ours = if rank == 0 {
        Some(NcclId::generate()?)
    } else {
        None
    };
    let peers = meet_peers(&Announcement::Nccl(ours))?;
    let id = rendezvous::nccl_id(&peers, world)?;
    println!("rank {rank} of {world}: joining the NCCL communicator");
    let config = NcclConfig::new(rank, world).with_timeout(collective_timeout()?);
    let ctx = gpu.cuda_stream().context().clone();
    Ok(Nccl::init(&ctx, &id, config)?)
}

/// The folders a rank may read data from: the worker's data folders, else the spec's
/// own dataset folders and prompt file. Every file is checked when opened, so a link inside a
/// dataset cannot lead out.
fn data_roots(spec: &loractl_spec::ResolvedSpec, base: &Path) -> AllowedRoots {
    if let Some(dirs) = std::env::var_os(env::DATA_DIRS) {
        return AllowedRoots::only(split_paths(&dirs));
    }
    let s = spec;
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
/// GPU trains on CUDA device 0, and one without (the variable empty or unset) on the CPU. A
/// rank given a GPU never falls back to the CPU: a build without CUDA is a bad config (the
/// worker's `rank_command` must be a CUDA build), a GPU CUDA cannot open fails the attempt
/// (retried, perhaps elsewhere). `Err` is the exit code, the reason already printed.
fn rank_device() -> Result<candle_core::Device, ExitCode> {
    let gpus = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default();
    let gpus = gpus.trim();
    if gpus.is_empty() {
        return Ok(candle_core::Device::Cpu);
    }
    assigned_gpu(gpus)
}

#[cfg(not(feature = "cuda"))]
fn assigned_gpu(gpus: &str) -> Result<candle_core::Device, ExitCode> {
    Err(bad_config(format!(
        "the worker gave this rank GPU {gpus} (CUDA_VISIBLE_DEVICES), but this loractl was \
         built without CUDA: the worker's gpu_rank_command (else its rank_command) must be a CUDA build of \
         loractl (scripts/cuda/build.sh)"
    )))
}

#[cfg(feature = "cuda")]
fn assigned_gpu(gpus: &str) -> Result<candle_core::Device, ExitCode> {
    candle_core::Device::new_cuda(0).map_err(|e| {
        eprintln!(
            "error: the worker gave this rank GPU {gpus} (CUDA_VISIBLE_DEVICES), but CUDA cannot \
             open it: {e}; the GPU is broken or its driver missing (check `nvidia-smi` on this \
             worker); a retry may run on another GPU"
        );
        ExitCode::from(1)
    })
}

fn artifact(path: &Path, kind: ArtifactKind) -> ChildMessage {
    ChildMessage::Artifact {
        path: path.to_path_buf(),
        kind,
        name: path.file_name().map(|n| n.to_string_lossy().to_string()),
    }
}

/// A file of its own for the checkpoint of `step`. The trainer rewrites
/// `<name>-state.safetensors` at every checkpoint, while the worker may still be hashing and
/// uploading the previous one: a hard link (a copy where links fail) keeps this step's bytes
/// under a name nothing rewrites. The worker deletes it once uploaded.
fn checkpoint_of_step(state: &Path, step: usize) -> std::io::Result<PathBuf> {
    let stem = state
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    let name = match state.extension() {
        Some(ext) => format!("{stem}-step{step:08}.{}", ext.to_string_lossy()),
        None => format!("{stem}-step{step:08}"),
    };
    let own = state.with_file_name(name);
    // A leftover of an earlier run of this step: replaced by this one.
    match std::fs::remove_file(&own) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if std::fs::hard_link(state, &own).is_err() {
        std::fs::copy(state, &own)?;
    }
    Ok(own)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trainer_reads_the_gpu_memory_the_worker_writes() {
        assert_eq!(loractl_trainer::run::GPU_MEMORY_ENV, env::GPU_MEMORY_BYTES);
    }

    #[test]
    fn numbers_from_the_worker_must_be_positive() {
        let name = "LORACTL_TEST_NUMBER_OF_RANK_RS";
        assert_eq!(env_number(name, 7), Ok(7), "unset: the default");
        for (value, ok) in [("3", Some(3)), ("0", None), ("-1", None), ("two", None)] {
            // SAFETY: this variable is read by this test only.
            unsafe { std::env::set_var(name, value) };
            let got = env_number(name, 7);
            assert_eq!(got.as_ref().ok().copied(), ok, "{value}: {got:?}");
            if let Err(e) = got {
                assert!(e.contains(name) && e.contains(value), "{e}");
            }
        }
        // SAFETY: as above.
        unsafe { std::env::remove_var(name) };
    }
    use loractl_trainer::Error;

    /// The trainer replaces its state file at every checkpoint (write aside, rename over); the
    /// file announced for an earlier step keeps that step's bytes.
    #[test]
    fn each_checkpoint_keeps_its_own_file() -> std::io::Result<()> {
        let dir = std::env::temp_dir().join(format!("loractl-rank-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let state = dir.join("zenny-state.safetensors");
        let save = |bytes: &[u8]| -> std::io::Result<()> {
            let tmp = dir.join(".zenny-state.tmp");
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, &state)
        };
        save(b"step 10")?;
        let first = checkpoint_of_step(&state, 10)?;
        save(b"step 20")?;
        let second = checkpoint_of_step(&state, 20)?;
        assert_ne!(first, second);
        assert_eq!(
            first.file_name().and_then(|n| n.to_str()),
            Some("zenny-state-step00000010.safetensors")
        );
        assert_eq!(std::fs::read(&first)?, b"step 10");
        assert_eq!(std::fs::read(&second)?, b"step 20");
        std::fs::remove_dir_all(&dir)
    }

    #[test]
    fn exit_codes_follow_the_error_kind() {
        // network_weights made for another base model: bad config, not a restart per attempt.
        let lora = Error::Lora("`x.lora_up.weight` has shape [320, 4]".into());
        assert_eq!(exit_code(lora.kind()), EXIT_BAD_CONFIG as u8);
        // A state that cannot be encoded: retried, not failed for good.
        let state = Error::Internal("encoding the training state: x".into());
        assert_eq!(exit_code(state.kind()), 1);
        assert_eq!(exit_code(Error::Diverged("nan".into()).kind()), 1);
    }
}
