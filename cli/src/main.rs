//! `loractl`: plans and runs kohya-style LoRA trainings. `plan` and `train` work on this
//! machine alone; the cluster commands ([`remote`]) talk to a coordinator; `up` ([`up`]) runs a
//! coordinator and a worker in this process.

/// Exit status of a command whose reader went away (`loractl list | head`): what a shell
/// reports for a process ended by SIGPIPE.
const EXIT_CLOSED_PIPE: u8 = 141;

/// Writes to stdout; a closed pipe ends the process quietly with [`EXIT_CLOSED_PIPE`]. Rust
/// ignores SIGPIPE (which keeps a dropped connection from killing the process) so `println!`
/// would panic instead; restoring SIGPIPE is no option, as tokio's vectored socket writes
/// would then kill the process when a coordinator hangs up.
fn write_stdout(args: std::fmt::Arguments<'_>, newline: bool) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let written = out.write_fmt(args).and_then(|()| {
        if newline {
            out.write_all(b"\n")
        } else {
            Ok(())
        }
    });
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(EXIT_CLOSED_PIPE.into());
        }
        // Same as `println!` on any other failure.
        panic!("failed printing to stdout: {e}");
    }
}

/// Every `println!` and `print!` of this crate goes through [`write_stdout`].
macro_rules! println {
    () => {
        $crate::write_stdout(format_args!(""), true)
    };
    ($($arg:tt)*) => {
        $crate::write_stdout(format_args!($($arg)*), true)
    };
}

macro_rules! print {
    ($($arg:tt)*) => {
        $crate::write_stdout(format_args!($($arg)*), false)
    };
}

mod gpu;
mod local;
mod progress;
mod rank;
mod remote;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use loractl_proto::domain::JobState;

#[derive(Parser)]
#[command(
    name = "loractl",
    version,
    about = "Train Stable Diffusion LoRA adapters the kohya way"
)]
struct Cli {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: Command,
}

/// Where the cluster commands find the coordinator.
#[derive(Args)]
struct Connection {
    /// Coordinator address: http://host:port, or https://host:port with --ca.
    #[arg(long, global = true, env = "LORACTL_COORDINATOR", default_value = loractl_worker::config::defaults::COORDINATOR)]
    coordinator: String,
    /// The coordinator's bearer token.
    #[arg(long, global = true, env = "LORACTL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) that signed the coordinator's TLS certificate.
    #[arg(long, global = true, env = "LORACTL_CA")]
    ca: Option<PathBuf>,
    /// Name in the coordinator's certificate, when it is not the address's host.
    #[arg(long, global = true)]
    tls_domain: Option<String>,
}

impl Connection {
    fn target(&self) -> remote::Target {
        remote::Target {
            address: self.coordinator.clone(),
            token: self.token.clone(),
            ca: self.ca.clone(),
            tls_domain: self.tls_domain.clone(),
        }
    }
}

fn parse_state(text: &str) -> Result<JobState, String> {
    JobState::ALL
        .into_iter()
        .find(|s| s.as_str().eq_ignore_ascii_case(text))
        .ok_or_else(|| {
            let names: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
            format!(
                "`{text}` is not a job state: use one of {}",
                names.join(", ")
            )
        })
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
    /// Check that this machine's GPU works with this build: NCCL version, device, a one-rank
    /// NCCL all-reduce and a matmul compared with the CPU. Needs a build with the `cuda` feature.
    GpuCheck {
        /// CUDA device index.
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
    /// One rank of a cluster job (started by loractl-worker, configured by `LORACTL_*`
    /// variables).
    #[command(hide = true)]
    Rank,
    /// Submit a job spec to the coordinator. The spec is checked here first; a local dataset
    /// folder is uploaded (content-addressed: unchanged files are not sent again).
    Submit {
        job: PathBuf,
        /// Follow the job to its end (as `loractl watch`).
        #[arg(long)]
        watch: bool,
        /// Higher runs first; equal priorities run in submission order.
        #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
        priority: i32,
        /// The dataset paths are folders on the workers (absolute): upload nothing.
        #[arg(long)]
        remote_data: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show one job: state, attempt, placement, last failure, checkpoint, artifacts.
    Status {
        job: String,
        #[arg(long)]
        json: bool,
    },
    /// List jobs.
    List {
        /// Only jobs in this state (repeatable): queued, placed, running, restarting,
        /// succeeded, failed, cancelled.
        #[arg(long = "state", value_parser = parse_state)]
        states: Vec<JobState>,
        #[arg(long)]
        json: bool,
    },
    /// Follow a job until it ends: progress bar with step/total, it/s, loss, ETA, worker and
    /// GPUs. Exits 0 when it succeeded, 1 when it failed or was cancelled.
    Watch {
        job: String,
        /// One JSON object per event on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Print a job's log lines (what its ranks wrote).
    Logs {
        job: String,
        /// Keep printing until the job ends.
        #[arg(long, short)]
        follow: bool,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job; its ranks are stopped.
    Cancel {
        job: String,
        #[arg(long)]
        json: bool,
    },
    /// Download a job's LoRA files and sample images, each checked against its sha256.
    Fetch {
        job: String,
        /// Folder to write into (default: the job id).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also download the training checkpoints.
        #[arg(long)]
        checkpoints: bool,
        #[arg(long)]
        json: bool,
    },
    /// List workers: GPUs, free and busy ones, jobs, last heartbeat.
    Workers {
        #[arg(long)]
        json: bool,
    },
    /// Run a coordinator (embedded redb store) and one worker in this process, on this
    /// machine, until Ctrl-C; then submit, watch and fetch against it.
    Up {
        /// Address to serve on.
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: String,
        /// State folder: job store, artifacts, the worker's work and cache.
        #[arg(long, default_value = "loractl-cluster")]
        dir: PathBuf,
        /// GPUs the worker uses: "all", "cpu" or indices like "0,2".
        #[arg(long, default_value = "all")]
        gpus: String,
        /// Folder of base models jobs may name (repeatable).
        #[arg(long = "model-dir")]
        model_dirs: Vec<PathBuf>,
        /// Folder jobs may read datasets and prompt files from in place (`sample_prompts`,
        /// `submit --remote-data`; repeatable).
        #[arg(long = "data-dir")]
        data_dirs: Vec<PathBuf>,
        /// Address of the Prometheus endpoint (`GET /metrics`) for the coordinator's and the
        /// worker's metrics; empty for none. OpenTelemetry export is configured by the
        /// standard OTEL_* variables.
        #[arg(long, default_value = "127.0.0.1:9464")]
        metrics_listen: String,
    },
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
        /// Go through a cluster: start a coordinator and a worker in this process, submit
        /// the job, watch it and fetch the LoRA into `DIR/fetched`.
        #[arg(long)]
        cluster: bool,
    },
}

/// Whether an error is stdout's reader having gone away (written with `writeln!`).
fn closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn main() -> ExitCode {
    loractl_trainer::tune_process();
    let cli = Cli::parse();
    // `up` is a server: say what it does.
    let level = match &cli.command {
        Command::Up { .. } => "info",
        // The cluster is an implementation detail there: a worker leaving at the end is not
        // worth a warning.
        Command::Quickstart { cluster: true, .. } => {
            "warn,loractl_coordinator=error,loractl_worker=error"
        }
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LORACTL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let target = cli.connection.target();
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
        Command::GpuCheck { device } => gpu::gpu_check(device),
        Command::Quickstart {
            dir,
            model,
            data,
            resolution,
            steps,
            cluster: true,
            ..
        } => remote::block_on(up::quickstart(&dir, model, data, resolution, steps)),
        Command::Quickstart {
            dir,
            model,
            data,
            resolution,
            steps,
            device,
            cluster: false,
        } => local::quickstart(&dir, model, data, resolution, steps, &device),
        Command::Submit {
            job,
            watch,
            priority,
            remote_data,
            json,
        } => {
            let opts = remote::SubmitOptions {
                priority,
                remote_data,
                watch,
                json,
            };
            remote::block_on(remote::submit(&target, &job, &opts))
        }
        Command::Status { job, json } => remote::block_on(remote::status(&target, &job, json)),
        Command::List { states, json } => remote::block_on(remote::list(&target, &states, json)),
        Command::Watch { job, json } => remote::block_on(remote::watch(&target, &job, json)),
        Command::Logs { job, follow, json } => {
            remote::block_on(remote::logs(&target, &job, follow, json))
        }
        Command::Cancel { job, json } => remote::block_on(remote::cancel(&target, &job, json)),
        Command::Fetch {
            job,
            out,
            checkpoints,
            json,
        } => remote::block_on(remote::fetch(&target, &job, out, checkpoints, json)),
        Command::Workers { json } => remote::block_on(remote::workers(&target, json)),
        Command::Up {
            listen,
            dir,
            gpus,
            model_dirs,
            data_dirs,
            metrics_listen,
        } => remote::block_on(up::up(
            up::UpOptions {
                listen,
                dir,
                gpus,
                model_dirs,
                data_dirs,
                token: target.token.clone(),
            },
            &metrics_listen,
        )),
    };
    match result {
        Ok(code) => code,
        Err(e) if closed_pipe(&e) => ExitCode::from(EXIT_CLOSED_PIPE),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
