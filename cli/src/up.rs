//! `loractl up`: a whole cluster in one process — the coordinator on the embedded redb store
//! and one worker whose ranks are this binary's `loractl rank` — serving on 127.0.0.1, so that
//! `submit`, `watch` and `fetch` work on one machine with nothing else installed.
//! `loractl quickstart --cluster` runs the quickstart job through such a cluster, started on a
//! free port for the occasion.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use loractl_coordinator::server::{self, ServerConfig};
use loractl_coordinator::standalone::Standalone;
use loractl_coordinator::store::{AnyStore, RedbStore};
use loractl_telemetry::{OtlpConfig, Recorder, Telemetry};
use loractl_worker::config::WorkerConfig;
use loractl_worker::daemon::Daemon;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::remote::{self, SubmitOptions, Target};

/// How long a stop waits for the coordinator to close after the worker left.
const STOP_WAIT: Duration = Duration::from_secs(10);

pub struct UpOptions {
    /// `host:port` to serve on; port 0 picks a free one.
    pub listen: String,
    /// State: `state.redb`, `artifacts/`, `worker/`.
    pub dir: PathBuf,
    /// The worker's GPUs: "all", "cpu" or indices.
    pub gpus: String,
    pub model_dirs: Vec<PathBuf>,
    pub data_dirs: Vec<PathBuf>,
    pub token: Option<String>,
}

/// A running all-in-one cluster.
pub struct Cluster {
    pub address: String,
    pub worker_gpus: usize,
    stop_worker: oneshot::Sender<()>,
    worker: JoinHandle<loractl_worker::Result<()>>,
    coordinator: Standalone,
}

/// Starts the cluster; the coordinator and the worker record their metrics into `metrics`.
pub async fn start(opts: &UpOptions, metrics: Recorder) -> anyhow::Result<Cluster> {
    if server::check_exposure(&opts.listen, opts.token.as_deref(), false).is_err() {
        anyhow::bail!(
            "--listen {} is reachable from other machines but no token is set: anyone who can \
             connect could run jobs; set --token or LORACTL_TOKEN (e.g. `openssl rand -hex 32`), \
             or listen on 127.0.0.1",
            opts.listen
        );
    }
    std::fs::create_dir_all(&opts.dir)
        .with_context(|| format!("creating {}", opts.dir.display()))?;
    let dir = opts.dir.canonicalize()?;
    let state = dir.join("state.redb");
    let store = RedbStore::open(&state).with_context(|| {
        format!(
            "is another `loractl up` using {}? Stop it or pick another --dir",
            dir.display()
        )
    })?;
    let mut config = ServerConfig {
        token: opts.token.clone(),
        ..ServerConfig::new(dir.join("artifacts"))
    };
    config.coordinator.metrics = metrics.clone();
    let coordinator = Standalone::start(AnyStore::Redb(store), config, &opts.listen)
        .await
        .context("starting the coordinator")?;
    let address = coordinator.url();

    let mut model_dirs = opts.model_dirs.clone();
    // The tiny model of `quickstart` (a folder of the source tree this binary was built from).
    if let Some(bundled) = loractl_trainer::demo::bundled_tiny_model().parent() {
        if bundled.is_dir() {
            model_dirs.push(bundled.to_path_buf());
        }
    }
    let rank = std::env::current_exe().context("finding this loractl binary for `rank`")?;
    let mut worker_config = WorkerConfig {
        coordinator: address.clone(),
        name: Some("local".into()),
        gpus: opts.gpus.clone(),
        work_dir: dir.join("worker/work"),
        cache_dir: dir.join("worker/cache"),
        model_dirs,
        data_dirs: opts.data_dirs.clone(),
        rank_command: vec![rank.display().to_string(), "rank".into()],
        stop_grace_secs: 20,
        ..WorkerConfig::default()
    };
    worker_config.validate()?;
    let mut gpus = loractl_worker::gpu::discover(&worker_config.gpu_selection(), 0)?;
    if !cfg!(feature = "cuda") && !gpus.is_empty() {
        // Its ranks would refuse them: this binary is also the worker's rank program.
        eprintln!(
            "note: this loractl was built without CUDA, so the local worker offers the CPU only \
             (not its {} GPU(s)); build the CUDA one with scripts/cuda/build.sh",
            gpus.len()
        );
        gpus.clear();
        worker_config.gpus = "cpu".into();
    }
    let worker_gpus = gpus.len();
    let daemon = Daemon::new(worker_config, gpus, opts.token.clone(), None)?.with_metrics(metrics);
    let (stop_worker, worker_stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(daemon.run(async {
        let _ = worker_stopped.await;
    }));
    Ok(Cluster {
        address,
        worker_gpus,
        stop_worker,
        worker,
        coordinator,
    })
}

impl Cluster {
    /// Stops the worker (its ranks save a checkpoint and stop; their jobs resume at the next
    /// `up`), then the coordinator.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop_worker.send(());
        let worker = self.worker.await;
        let coordinator = self.coordinator.stop(STOP_WAIT).await;
        match worker {
            Ok(Err(e)) => return Err(anyhow::anyhow!("worker: {e}")),
            Err(e) => return Err(anyhow::anyhow!("worker task: {e}")),
            Ok(Ok(())) => {}
        }
        coordinator.map_err(|e| anyhow::anyhow!("coordinator: {e}"))
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// `loractl up` until Ctrl-C. The coordinator's and the worker's metrics (with its ranks'
/// training progress) go into one registry, served for Prometheus on `metrics_listen` (empty:
/// not served) and exported over OTLP when the standard `OTEL_*` variables ask for it.
pub async fn up(opts: UpOptions, metrics_listen: &str) -> anyhow::Result<ExitCode> {
    let exporter =
        Telemetry::build("loractl", OtlpConfig::from_env()).context("setting up metrics")?;
    let metrics_server = match metrics_listen {
        "" => None,
        address => {
            let listener = loractl_telemetry::bind_metrics(address)
                .await
                .with_context(|| {
                    format!(
                        "serving metrics on {address}: is another `loractl up` or loractl \
                         daemon using it? Pass --metrics-listen with another address, or \
                         --metrics-listen '' for none"
                    )
                })?;
            Some(tokio::spawn(loractl_telemetry::serve_metrics(
                listener,
                exporter.registry(),
            )))
        }
    };
    let ran = serve(&opts, exporter.recorder(), metrics_listen).await;
    if let Some(task) = metrics_server {
        task.abort();
    }
    // Flushes what OTLP has not sent yet.
    exporter.shutdown();
    ran
}

async fn serve(
    opts: &UpOptions,
    metrics: Recorder,
    metrics_listen: &str,
) -> anyhow::Result<ExitCode> {
    let cluster = start(opts, metrics).await?;
    let devices = if cluster.worker_gpus == 0 {
        "on CPU".to_owned()
    } else {
        format!("with {} GPU(s)", cluster.worker_gpus)
    };
    let metrics = match metrics_listen {
        "" => String::new(),
        address => format!("\nmetrics:       http://{address}/metrics"),
    };
    eprintln!(
        "loractl up: coordinator on {} (state in {}), worker `local` {devices}\n\
         submit a job:  loractl submit job.toml --watch{}{metrics}\n\
         stop with Ctrl-C (running jobs save a checkpoint and resume at the next `loractl up`)",
        cluster.address,
        opts.dir.display(),
        if cluster.address == default_address() {
            String::new()
        } else {
            format!(" --coordinator {}", cluster.address)
        }
    );
    shutdown_signal().await;
    eprintln!("stopping: running jobs save a checkpoint first");
    cluster.stop().await?;
    Ok(ExitCode::SUCCESS)
}

pub fn default_address() -> String {
    loractl_worker::config::defaults::COORDINATOR.to_owned()
}

/// `quickstart --cluster`: writes the quickstart job (and, without `data`, its generated
/// dataset) into `dir` like `quickstart` does, submits it to an all-in-one cluster started on
/// a free port, watches it to its end and fetches its LoRA into `dir/fetched`.
pub async fn quickstart(
    dir: &Path,
    model: Option<PathBuf>,
    data: Option<PathBuf>,
    resolution: u32,
    steps: usize,
) -> anyhow::Result<ExitCode> {
    // Any worker has a CPU slot; `up`'s worker offers only the CPU without a CUDA build.
    let (dir, model, job) = crate::local::write_quickstart(
        dir,
        model,
        data,
        resolution,
        steps,
        "\n[resources]\ngpus = \"cpu\"\n",
    )?;
    eprintln!("job spec: {}", job.display());
    let job = job.as_path();
    let dir = dir.as_path();
    let mut model_dirs = Vec::new();
    if let Some(parent) = model.parent() {
        model_dirs.push(parent.to_path_buf());
    }
    let opts = UpOptions {
        listen: "127.0.0.1:0".into(),
        dir: dir.join("cluster"),
        gpus: "all".into(),
        model_dirs,
        data_dirs: Vec::new(),
        token: None,
    };
    let cluster = start(&opts, Recorder::default()).await?;
    eprintln!(
        "cluster: coordinator on {} with worker `local` (state in {})",
        cluster.address,
        opts.dir.display()
    );
    let target = Target {
        address: cluster.address.clone(),
        token: None,
        ca: None,
        tls_domain: None,
    };
    let outcome = async {
        let opts = SubmitOptions {
            priority: 0,
            remote_data: false,
            watch: false,
            json: false,
        };
        let job = remote::submit_job(&target, job, &opts).await?;
        let code = remote::watch(&target, job.id.as_str(), false).await?;
        if code != ExitCode::SUCCESS {
            return Ok(code);
        }
        remote::fetch(
            &target,
            job.id.as_str(),
            Some(dir.join("fetched")),
            false,
            false,
        )
        .await
    }
    .await;
    cluster.stop().await?;
    if outcome? == ExitCode::SUCCESS {
        eprintln!(
            "\nthe same on a long-lived cluster: `loractl up` in one terminal, then\n  loractl \
             submit {} --watch\n  loractl fetch JOB",
            job.display()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(1))
    }
}
