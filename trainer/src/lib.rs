//! loractl's training engine: Stable Diffusion 1.x/2.x models in candle with kohya-style LoRA.
//!
//! - [`nn`] — frozen layers with input-only gradients, differentiable norms/softmax, LoRA sites;
//!   [`fused`], [`flash`], [`dense`] and [`cpu_matmul`] — its fused CPU kernels (norms, GEGLU,
//!   softmax, convolution, block-wise attention, linear + LoRA) and the strided matrix
//!   products under them.
//! - [`lora`] — kohya LoRA networks (targets, init, file format).
//! - [`unet`] — the SD1.x/SD2.x UNet (diffusers and single-file LDM weights).
//! - [`vae`] — the AutoencoderKL encoder/decoder.
//! - [`clip`] — the SD1/SD2 CLIP text encoders (clip skip, kohya long prompts, checkpoint layouts).
//! - [`tokenizer`] — CLIP's BPE tokenizer with transformers' slow-tokenizer ids.
//! - [`schedule`] — the DDPM noise schedule (noising, velocity, SNR).
//! - [`dataset`] — kohya's `N_name` folder datasets: buckets, captions, batches, latent cache.
//! - [`weights`] — memory-mapped tensor stores and key maps between checkpoint layouts.
//! - [`loader`] — opens diffusers folders and single-file `.safetensors`/`.ckpt` checkpoints.
//! - [`ckpt`] — PyTorch zip checkpoints read without executing pickle code.
//! - [`optim`] — kohya's optimizer set (AdamW, AdamW8bit, Lion, SGDNesterov, DAdaptAdam, Prodigy,
//!   Adafactor), gradient clipping, resumable state.
//! - [`lr`] — learning-rate schedules and warmup parsing.
//! - [`sample`] — preview images (sd-scripts' `--sample_prompts`): samplers, prompt files, PNGs.
//! - [`train`] — the resumable training loop; [`run`] — a job spec run end to end (plan,
//!   caching, saving with kohya's names and metadata, states, samples, events).
pub mod bench;
pub mod checkpoint;
pub mod ckpt;
pub mod clip;
pub mod confine;
pub mod cpu_matmul;
pub mod dataset;
pub mod demo;
pub mod dense;
pub mod error;
pub mod flash;
pub mod fused;
pub mod loader;
pub mod lora;
pub mod lr;
pub mod metadata;
pub mod nn;
pub mod optim;
pub mod random;
pub mod run;
pub mod sample;
pub mod schedule;
pub mod step;
pub mod tensorboard;
pub mod tokenizer;
pub mod train;
pub mod unet;
pub mod vae;
pub mod weights;

pub use error::{Error, ErrorKind, Result};

/// Process-wide settings for training speed; call it first in `main`, before any thread
/// exists.
///
/// - Training allocates and frees the same large activation buffers every step. glibc's
///   default returns each one to the kernel and faults it back in at the next step, which
///   doubled step times on CPU; freed memory is kept in the process instead (the same as
///   `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_`, which the test script sets).
///   One arena serves every thread (`MALLOC_ARENA_MAX=1`): the steps run on pool threads
///   (see [`in_pool`]), and a thread's own arena unmaps each of its heaps as soon as it is
///   wholly free, whatever the trim threshold, so every step faulted ~84 MiB of fresh pages
///   back in (sd15, 21 000 faults a step; about 200 with one arena).
/// - candle sizes every CPU matrix product's thread count by reading `/proc/cpuinfo` unless
///   `RAYON_NUM_THREADS` is set (a few percent of a step); the count is read once here and
///   pinned in that variable. A value the user set is kept.
/// - candle runs large elementwise ops on a pool of its own threads beside rayon's, whose
///   idle threads spin 25 000 times before they sleep: on a machine whose cores are all
///   rayon's, that spinning took the cores from the matrix products (~13% of an sd15 step on
///   2 cores). They spin 100 times instead (`CANDLE_BARRIER_POOL_SPIN_LIMIT`, kept when set).
pub fn tune_process() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "100");
    }
}

/// Runs `f` on a thread of a compute pool of its own, in which the CPU kernels started by `f`
/// split their work, and waits for it.
///
/// A parallel kernel started from a thread outside a pool hands its work to the pool and
/// sleeps until the pool is done: a training step starts thousands of them, and each costs a
/// wake-up of the pool and of the caller. Started from inside the pool, the calling thread
/// takes a share of the work itself (about 5% of an sd15 step on 2 cores). The pool is `f`'s
/// own, not rayon's global one: a training loop blocks in collectives, and several loops in
/// one process (ranks as threads) must not wait for each other's pool threads. Where no
/// thread can be started, `f` runs on the calling thread.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .thread_name(|i| format!("loractl-compute-{i}"))
        .build();
    match pool {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}
