//! One coordinator started in this process: the defaults every starter shares, and
//! [`Standalone`], which runs [`server::run`] on a task, waits until it listens and hands back
//! its address. `loractl up`, `loractl quickstart --cluster` and the tests start coordinators
//! this way; the `loractl-coordinator` binary takes the same defaults for its flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::artifacts::ArtifactConfig;
use crate::error::{Error, Result};
use crate::server::{self, CoordinatorConfig, ServerConfig};
use crate::store::AnyStore;

/// The defaults of every coordinator setting, in the units its flags take.
pub mod defaults {
    /// Seconds between worker heartbeats.
    pub const HEARTBEAT_INTERVAL_SECS: u64 = 5;
    /// Seconds of silence after which a worker is lost and its jobs are retried.
    pub const HEARTBEAT_TIMEOUT_SECS: u64 = 30;
    /// Total size the artifact store may hold, in GiB.
    pub const ARTIFACT_QUOTA_GIB: u64 = 100;
    /// Largest single artifact, in GiB.
    pub const MAX_ARTIFACT_GIB: u64 = 20;
    /// Checkpoints kept per job.
    pub const KEEP_CHECKPOINTS: usize = 2;
    /// With etcd: seconds a dead leader keeps leadership before a standby takes over.
    pub const LEADER_TTL_SECS: u64 = 10;
    /// Placement rounds a job may be passed over before it reserves workers.
    pub const RESERVE_AFTER_ROUNDS: u32 = 3;
    /// CPU ranks one worker runs at once.
    pub const CPU_SLOTS: u32 = 1;
    /// Log lines kept per job.
    pub const LOG_LINES_PER_JOB: usize = 10_000;
    /// Ended jobs whose logs stay in memory (all stay on disk).
    pub const ENDED_JOBS_WITH_LOGS: usize = 100;
    /// Bytes of log each job keeps on disk (up to twice this, its latest lines).
    pub const LOG_BYTES_PER_JOB: u64 = 8 << 20;
    /// Seconds the ranks of a multi-worker attempt may take to all join the rendezvous.
    pub const RENDEZVOUS_TIMEOUT_SECS: u64 = 300;
    /// Address the binary serves on.
    pub const LISTEN: &str = "127.0.0.1:7070";
    /// Address of the binary's Prometheus endpoint (`/metrics`).
    pub const METRICS_LISTEN: &str = "127.0.0.1:9464";
}

const GIB: u64 = 1 << 30;

impl ArtifactConfig {
    /// An artifact store in `root` with the default quota, size limit and checkpoints kept.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            quota_bytes: defaults::ARTIFACT_QUOTA_GIB * GIB,
            max_artifact_bytes: defaults::MAX_ARTIFACT_GIB * GIB,
            keep_checkpoints: defaults::KEEP_CHECKPOINTS,
        }
    }
}

impl ServerConfig {
    /// Every default, artifacts in `artifacts`, no token and no TLS (loopback only).
    pub fn new(artifacts: impl Into<PathBuf>) -> Self {
        Self {
            coordinator: CoordinatorConfig::default(),
            artifacts: ArtifactConfig::new(artifacts),
            token: None,
            leader_ttl: Duration::from_secs(defaults::LEADER_TTL_SECS),
            tls: None,
        }
    }
}

/// A coordinator serving from a task of this process until [`Standalone::stop`] (or until it
/// is dropped, which stops it without waiting).
pub struct Standalone {
    addr: SocketAddr,
    tls: bool,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<()>>>,
}

impl Standalone {
    /// Serves `store` on `listen` (port 0 picks a free port) and returns once it listens. With
    /// etcd that is once it leads; an error that stops it before then is returned.
    pub async fn start(store: AnyStore, config: ServerConfig, listen: &str) -> Result<Self> {
        let tls = config.tls.is_some();
        let (ready_tx, ready) = oneshot::channel::<SocketAddr>();
        let (stop, stopped) = oneshot::channel::<()>();
        let listen = listen.to_owned();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            server::run(store, config, &listen, shutdown, Some(ready_tx)).await
        });
        match ready.await {
            Ok(addr) => Ok(Self {
                addr,
                tls,
                stop: Some(stop),
                task: Some(task),
            }),
            // The server ended before it listened: its error says why.
            Err(_) => Err(match task.await {
                Ok(Err(e)) => e,
                Ok(Ok(())) => Error::Stopped("stopped before it listened".into()),
                Err(e) => Error::Stopped(format!("task failed: {e}")),
            }),
        }
    }

    /// The socket it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL clients and workers connect to (`http://` or, with TLS, `https://`); an
    /// unspecified listen address (`0.0.0.0`) is reached through loopback.
    pub fn url(&self) -> String {
        let host = if self.addr.ip().is_unspecified() {
            "127.0.0.1".to_owned()
        } else {
            self.addr.ip().to_string()
        };
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{host}:{}", self.addr.port())
    }

    /// Stops accepting calls, ends worker sessions and watches, and waits up to `wait` for the
    /// server to close. Its error, if it failed, is returned; a server still closing after
    /// `wait` (a client holding a stream) is left to end with the process.
    pub async fn stop(mut self, wait: Duration) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Some(task) = self.task.take() else {
            return Ok(());
        };
        match tokio::time::timeout(wait, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(Error::Stopped(format!("task failed: {e}"))),
            Err(_) => Ok(()),
        }
    }

    /// Ends the server task at once, as a crash would (no graceful shutdown, no resignation).
    pub fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
