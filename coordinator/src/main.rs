//! `loractl-coordinator`: serves the loractl gRPC API on one address.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use loractl_coordinator::artifacts::ArtifactConfig;
use loractl_coordinator::placement::Policy;
use loractl_coordinator::server::{self, CoordinatorConfig, ServerConfig, TlsFiles};
use loractl_coordinator::standalone::defaults;
use loractl_coordinator::store::AnyStore;
use loractl_telemetry::Telemetry;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "loractl coordinator: job queue, placement, worker sessions, artifacts"
)]
struct Args {
    /// Address to serve gRPC on.
    #[arg(long, default_value = defaults::LISTEN)]
    listen: String,
    /// State store: `redb:PATH` (one local file) or `etcd:URL[,URL...]`.
    #[arg(long, default_value = "redb:loractl.redb")]
    store: String,
    /// Folder of the artifact store (datasets, models, LoRA files, checkpoints).
    #[arg(long, default_value = "artifacts")]
    artifacts: PathBuf,
    /// Total size the artifact store may hold, in GiB.
    #[arg(long, default_value_t = defaults::ARTIFACT_QUOTA_GIB)]
    artifact_quota_gib: u64,
    /// Largest single artifact, in GiB.
    #[arg(long, default_value_t = defaults::MAX_ARTIFACT_GIB)]
    max_artifact_gib: u64,
    /// Checkpoints kept per job; older ones are deleted.
    #[arg(long, default_value_t = defaults::KEEP_CHECKPOINTS)]
    keep_checkpoints: usize,
    /// Bearer token every client and worker must present (also read from LORACTL_TOKEN).
    #[arg(long, env = "LORACTL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Seconds between worker heartbeats.
    #[arg(long, default_value_t = defaults::HEARTBEAT_INTERVAL_SECS)]
    heartbeat_interval_secs: u64,
    /// Seconds of silence after which a worker is lost and its jobs are retried.
    #[arg(long, default_value_t = defaults::HEARTBEAT_TIMEOUT_SECS)]
    heartbeat_timeout_secs: u64,
    /// TLS certificate (PEM); with --tls-key, the coordinator serves TLS only.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that signs worker certificates: workers must then present one (mutual TLS).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// With etcd: seconds a dead leader keeps leadership before a standby takes over.
    #[arg(long, default_value_t = defaults::LEADER_TTL_SECS)]
    leader_ttl_secs: u64,
    /// Placement rounds a job may be passed over before it reserves workers.
    #[arg(long, default_value_t = defaults::RESERVE_AFTER_ROUNDS)]
    reserve_after_rounds: u32,
    /// Serve on a non-loopback address without a token (trusted, isolated networks only).
    #[arg(long)]
    insecure: bool,
    /// Address of the Prometheus endpoint (`GET /metrics`); empty for none. OpenTelemetry
    /// export is configured by the standard OTEL_* variables.
    #[arg(long, default_value = defaults::METRICS_LISTEN)]
    metrics_listen: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = Telemetry::init("loractl-coordinator")?;
    if args.heartbeat_timeout_secs <= args.heartbeat_interval_secs {
        anyhow::bail!(
            "--heartbeat-timeout-secs ({}) must be longer than --heartbeat-interval-secs ({})",
            args.heartbeat_timeout_secs,
            args.heartbeat_interval_secs
        );
    }
    server::check_exposure(&args.listen, args.token.as_deref(), args.insecure)?;
    if args.tls_cert.is_none() && args.token.is_some() {
        let exposed = std::net::ToSocketAddrs::to_socket_addrs(args.listen.as_str())
            .is_ok_and(|mut addrs| addrs.any(|a| !a.ip().is_loopback()));
        if exposed {
            tracing::warn!(listen = %args.listen, "serving without TLS: the token crosses the network in clear; use --tls-cert/--tls-key off a trusted network");
        }
    }
    let metrics_server = match args.metrics_listen.as_str() {
        "" => None,
        address => Some(tokio::spawn(loractl_telemetry::serve_metrics(
            loractl_telemetry::bind_metrics(address).await?,
            telemetry.registry(),
        ))),
    };
    let store = AnyStore::open(&args.store).await?;
    const GIB: u64 = 1 << 30;
    let config = ServerConfig {
        coordinator: CoordinatorConfig {
            heartbeat_interval: Duration::from_secs(args.heartbeat_interval_secs),
            heartbeat_timeout: Duration::from_secs(args.heartbeat_timeout_secs),
            policy: Policy {
                reserve_after_rounds: args.reserve_after_rounds,
            },
            metrics: telemetry.recorder(),
            ..CoordinatorConfig::default()
        },
        artifacts: ArtifactConfig {
            root: args.artifacts,
            quota_bytes: args.artifact_quota_gib.saturating_mul(GIB),
            max_artifact_bytes: args.max_artifact_gib.saturating_mul(GIB),
            keep_checkpoints: args.keep_checkpoints.max(1),
        },
        token: args.token,
        leader_ttl: Duration::from_secs(args.leader_ttl_secs),
        tls: match (args.tls_cert, args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert,
                key,
                client_ca: args.tls_client_ca,
            }),
            _ => None,
        },
    };
    // SIGTERM (systemd, Kubernetes) and SIGINT (Ctrl-C) both shut down gracefully: worker
    // sessions and watches end, a leader resigns. Registered now, before serving starts.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
    };
    let served = server::run(store, config, &args.listen, shutdown, None).await;
    if let Some(task) = metrics_server {
        task.abort();
    }
    telemetry.shutdown();
    served?;
    Ok(())
}
