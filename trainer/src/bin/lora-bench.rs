//! Times one LoRA training step (UNet forward, backward, AdamW; with `--text-encoder` the CLIP
//! text encoder's forward and backward too) for the benchmark configs in
//! `scripts/bench/unet_configs.json` and prints one JSON line, like `scripts/bench/torch_step.py`
//! does for diffusers + peft. `scripts/bench/run.sh` runs both side by side.
//!
//! Usage: lora-bench CONFIG [--steps N] [--warmup N] [--rank R] [--alpha A] [--device D]
//!                   [--gradient-checkpointing] [--batch N] [--latent SIZE]
//!                   [--precision f32|bf16|fp16]   (the frozen UNet's dtype; LoRA and AdamW f32)
//!                   [--text-encoder]   (train the config's text encoder's LoRA as well)
//!        lora-bench --load CHECKPOINT   (load time and memory of a base model)
//!
//! `--device cuda` (or `cuda:N`) runs the step on a GPU; that needs the binary built with the
//! trainer's `cuda` feature (`LORACTL_CUDA_BENCH_OUT=... scripts/cuda/build.sh`). On a GPU each
//! step ends with a device synchronisation before its time is taken.

use std::process::ExitCode;
use std::time::Instant;

use candle_core::Device;
use loractl_trainer::bench::{median, process_cpu_seconds, rayon_threads, status_mib, BenchModel};

/// Any error ends the benchmark with its message.
type Result<T, E = Box<dyn std::error::Error + Send + Sync>> = std::result::Result<T, E>;

fn peak_rss_mib() -> f64 {
    status_mib("VmHWM:")
}

/// Loads a base model and reports time and memory: with memory-mapped weights the process
/// should hold one f32 copy of the model (anonymous memory) plus reclaimable file pages.
fn load_report(path: &std::path::Path) -> Result<()> {
    let start = Instant::now();
    let sd = loractl_trainer::loader::load(path, &Default::default())?;
    let secs = start.elapsed().as_secs_f64();
    let file_mib = std::fs::metadata(path)?.len() as f64 / 1048576.0;
    let sites = sd.sites().len();
    println!(
        "{}",
        serde_json::json!({
            "load_s": secs,
            "family": format!("{:?}", sd.family),
            "file_mib": file_mib,
            "rss_anon_mib": status_mib("RssAnon:"),
            "rss_file_mib": status_mib("RssFile:"),
            "peak_rss_mib": peak_rss_mib(),
            "lora_sites": sites,
        })
    );
    Ok(())
}

fn main() -> ExitCode {
    loractl_trainer::tune_process();
    loractl_trainer::bench::exit("lora-bench", bench())
}

fn bench() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut name = None;
    let (mut steps, mut warmup, mut rank, mut alpha) = (5usize, 1usize, 8usize, 8f64);
    let mut device = "cpu".to_string();
    let (mut checkpointing, mut text_encoder) = (false, false);
    let (mut batch, mut latent) = (1usize, None::<usize>);
    let mut precision = "f32".to_string();
    while let Some(a) = args.next() {
        let mut val = |flag: &str| args.next().ok_or_else(|| format!("{flag} needs a value"));
        match a.as_str() {
            "--steps" => steps = val("--steps")?.parse()?,
            "--warmup" => warmup = val("--warmup")?.parse()?,
            "--rank" => rank = val("--rank")?.parse()?,
            "--alpha" => alpha = val("--alpha")?.parse()?,
            "--device" => device = val("--device")?,
            "--gradient-checkpointing" => checkpointing = true,
            "--text-encoder" => text_encoder = true,
            "--batch" => batch = val("--batch")?.parse()?,
            "--precision" => precision = val("--precision")?,
            "--latent" => latent = Some(val("--latent")?.parse()?),
            "--load" => return load_report(std::path::Path::new(&val("--load")?)),
            "-h" | "--help" => {
                println!(
                    "usage: lora-bench tiny|small|sd15 [--steps N] [--warmup N] [--rank R] \
                     [--alpha A] [--device cpu|cuda|cuda:N] [--gradient-checkpointing] \
                     [--batch N] [--latent SIZE] \
                     [--precision f32|bf16|fp16] [--text-encoder]"
                );
                return Ok(());
            }
            s if !s.starts_with('-') && name.is_none() => name = Some(s.to_string()),
            s => return Err(format!("unknown argument `{s}`").into()),
        }
    }
    let name = name.ok_or("which config? tiny, small or sd15")?;
    if steps == 0 {
        return Err("--steps must be at least 1".into());
    }
    let dev = open_device(&device)?;
    let dtype = match precision.as_str() {
        "f32" => candle_core::DType::F32,
        "bf16" => candle_core::DType::BF16,
        "fp16" => candle_core::DType::F16,
        p => return Err(format!("--precision `{p}`: use f32, bf16 or fp16").into()),
    };
    let mut model = BenchModel::build_in(&name, rank, alpha, &dev, dtype, text_encoder)?;
    model.set_gradient_checkpointing(checkpointing);
    if let Some(size) = latent {
        model.set_latent_size(size);
    }
    if batch == 0 || latent == Some(0) {
        return Err("--batch and --latent must be at least 1".into());
    }
    let inputs = model.inputs(batch)?;
    let mut times = Vec::new();
    // Forward, backward and optimizer parts of each step (ms); on a GPU each part ends with
    // a synchronisation, which the step time does not pay.
    let mut parts = [Vec::new(), Vec::new(), Vec::new()];
    let mut gpu_used = GpuMemory::default();
    // CPU seconds of the process over the timed steps: how busy the cores kept.
    let mut cpu_seconds = 0.0;
    dev.synchronize()?;
    // On a thread of the compute pool, as `loractl train` runs its steps.
    loractl_trainer::in_pool(|| -> Result<()> {
        for i in 0..warmup + steps {
            let start = Instant::now();
            let cpu_start = process_cpu_seconds();
            let loss = model.loss(&inputs, i)?;
            // The forward pass's activations are all alive here: the step's memory peak.
            gpu_used.sample(&dev);
            let forward = start.elapsed();
            let grads = loss.backward()?;
            gpu_used.sample(&dev);
            let backward = start.elapsed();
            model.update(&grads)?;
            drop(grads);
            dev.synchronize()?;
            let end = start.elapsed();
            if i >= warmup {
                times.push(end.as_secs_f64() * 1000.0);
                cpu_seconds += process_cpu_seconds() - cpu_start;
                parts[0].push(forward.as_secs_f64() * 1000.0);
                parts[1].push((backward - forward).as_secs_f64() * 1000.0);
                parts[2].push((end - backward).as_secs_f64() * 1000.0);
            }
        }
        Ok(())
    })?;
    let [forward_ms, backward_ms, optimizer_ms] = parts.map(|mut p| median(&mut p));
    let step_ms_min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let step_cpu_pct = 100.0 * cpu_seconds / (times.iter().sum::<f64>() / 1000.0);
    let step_ms = median(&mut times);
    let out = serde_json::json!({
        "impl": "loractl",
        "config": name,
        "device": device,
        "step_ms": step_ms,
        "step_ms_min": step_ms_min,
        "step_cpu_pct": step_cpu_pct,
        "forward_ms": forward_ms,
        "backward_ms": backward_ms,
        "optimizer_ms": optimizer_ms,
        "peak_rss_mib": peak_rss_mib(),
        "gpu_used_peak_mib": gpu_used.peak_mib(),
        "lora_modules": model.net.modules().len(),
        "lora_params": model.net.param_count(),
        "threads": rayon_threads(),
        "gradient_checkpointing": checkpointing,
        "text_encoder": text_encoder,
        "batch": batch,
        "precision": precision,
        "latent": model.latent_size(),
    });
    println!("{out}");
    Ok(())
}

/// `cpu`, `cuda` (GPU 0) or `cuda:N`.
fn open_device(name: &str) -> Result<Device> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match name.strip_prefix("cuda") {
        Some("") => 0,
        Some(n) => n
            .strip_prefix(':')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("--device `{name}`: use cpu, cuda or cuda:N"))?,
        None => return Err(format!("--device `{name}`: use cpu, cuda or cuda:N").into()),
    };
    if !cfg!(feature = "cuda") {
        return Err(format!(
            "--device {name}: this lora-bench was built without CUDA; build one with \
             LORACTL_CUDA_BENCH_OUT=target/cuda/lora-bench.gz scripts/cuda/build.sh"
        )
        .into());
    }
    Ok(Device::new_cuda(ordinal)
        .map_err(|e| format!("--device {name}: cannot open the GPU: {e}"))?)
}

/// The GPU's used memory (all processes, as `nvidia-smi` shows it), sampled at the step's
/// high points: an upper bound of what the step needs, not an allocator's exact peak.
#[derive(Default)]
struct GpuMemory {
    peak: Option<usize>,
}

impl GpuMemory {
    #[cfg(feature = "cuda")]
    fn sample(&mut self, dev: &Device) {
        let Device::Cuda(gpu) = dev else { return };
        if let Ok((free, total)) = gpu.cuda_stream().context().mem_get_info() {
            let used = total.saturating_sub(free);
            self.peak = Some(self.peak.map_or(used, |p| p.max(used)));
        }
    }

    #[cfg(not(feature = "cuda"))]
    fn sample(&mut self, _dev: &Device) {}

    fn peak_mib(&self) -> Option<f64> {
        self.peak.map(|b| b as f64 / 1048576.0)
    }
}
