//! `loractl-worker`: the worker daemon. Config from a TOML file, flags override it.

use loractl_telemetry::Telemetry;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use loractl_worker::config::WorkerConfig;
use loractl_worker::daemon::Daemon;
use loractl_worker::gpu;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "loractl worker: runs job ranks on this machine's pinned GPUs"
)]
struct Args {
    /// Worker config file (TOML).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Coordinator address, http://host:port.
    #[arg(long)]
    coordinator: Option<String>,
    /// GPUs this worker may use: "all", "cpu" or indices like "0,2".
    #[arg(long)]
    gpus: Option<String>,
    /// Name to register under (default: host name).
    #[arg(long)]
    name: Option<String>,
    /// Report N fake GPUs (placement tests only).
    #[arg(long)]
    simulated_gpus: Option<u32>,
    #[arg(long)]
    work_dir: Option<PathBuf>,
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the worker");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = Telemetry::init("loractl-worker")?;
    let mut config = match &args.config {
        Some(path) => WorkerConfig::from_file(path)?,
        None => WorkerConfig::default(),
    };
    if let Some(v) = args.coordinator {
        config.coordinator = v;
    }
    if let Some(v) = args.gpus {
        config.gpus = v;
    }
    if let Some(v) = args.name {
        config.name = Some(v);
    }
    if let Some(v) = args.simulated_gpus {
        config.simulated_gpus = v;
    }
    if let Some(v) = args.work_dir {
        config.work_dir = v;
    }
    if let Some(v) = args.cache_dir {
        config.cache_dir = v;
    }
    config.validate()?;
    let gpus = gpu::discover(&config.gpu_selection(), config.simulated_gpus)?;
    let token = config.token().context("reading the coordinator token")?;
    let tls = config.client_tls()?;
    let metrics_server = match config.metrics_listen.as_str() {
        "" => None,
        address => Some(tokio::spawn(loractl_telemetry::serve_metrics(
            loractl_telemetry::bind_metrics(address).await?,
            telemetry.registry(),
        ))),
    };
    let ran = Daemon::new(config, gpus, token, tls)?
        .with_metrics(telemetry.recorder())
        .run(shutdown_signal())
        .await;
    if let Some(task) = metrics_server {
        task.abort();
    }
    telemetry.shutdown();
    ran?;
    Ok(())
}
