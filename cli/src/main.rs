//! `loractl`: plans and runs kohya-style LoRA trainings. `plan` and `train` work on this
//! machine alone; the cluster commands talk to a coordinator.

mod local;
mod progress;
mod rank;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "loractl",
    version,
    about = "Train Stable Diffusion LoRA adapters the kohya way"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a job spec and print what training it would do: folders, repeats, buckets,
    /// batches, steps, LoRA size and a memory estimate.
    Plan {
        job: PathBuf,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
        /// Skip reading the checkpoint (no LoRA module count or size).
        #[arg(long)]
        no_model: bool,
    },
    /// Train a job on this machine with a progress bar. Ctrl-C saves a resumable state.
    Train {
        job: PathBuf,
        /// Continue from a state folder (overrides `output.resume`).
        #[arg(long)]
        resume: Option<PathBuf>,
        /// One JSON event per line on stdout instead of the progress bar.
        #[arg(long)]
        json: bool,
        /// `cpu`, or `cuda:N` (needs a build with the `cuda` feature).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// One rank of a cluster job (started by loractl-worker, configured by `LORACTL_*`
    /// variables).
    #[command(hide = true)]
    Rank,
    /// Train a small LoRA right away: writes a job spec (and, without `--data`, a generated
    /// dataset) into `--dir`, shows the plan, and trains with a progress bar.
    Quickstart {
        /// Where the job, data and outputs go.
        #[arg(long, default_value = "loractl-quickstart")]
        dir: PathBuf,
        /// An SD1.x/SD2.x checkpoint (.safetensors, .ckpt or diffusers folder); default: the
        /// tiny model shipped with loractl.
        #[arg(long)]
        model: Option<PathBuf>,
        /// A kohya dataset folder (parent of `N_name` folders); default: generated shapes.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Training resolution (a multiple of 64).
        #[arg(long, default_value_t = 64)]
        resolution: u32,
        #[arg(long, default_value_t = 60)]
        steps: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

/// Training allocates and frees the same large activation buffers every step. glibc's default
/// returns each one to the kernel and faults it back in at the next step, which doubled step
/// times on CPU; keep freed memory in the process instead (the same as `MALLOC_MMAP_THRESHOLD_`
/// and `MALLOC_TRIM_THRESHOLD_`, which the test script sets).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LORACTL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Plan {
            job,
            json,
            no_model,
        } => local::plan(&job, json, !no_model),
        Command::Train {
            job,
            resume,
            json,
            device,
        } => local::train(&job, resume, json, &device),
        Command::Rank => rank::rank(),
        Command::Quickstart {
            dir,
            model,
            data,
            resolution,
            steps,
            device,
        } => local::quickstart(&dir, model, data, resolution, steps, &device),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
