//! `loractl`: plans and runs kohya-style LoRA trainings. `plan` and `train` work on this
//! machine alone; the cluster commands talk to a coordinator.

mod local;
mod progress;

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
}

fn main() -> ExitCode {
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
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
