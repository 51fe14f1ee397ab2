//! The worker's config file (TOML): where the coordinator is, which GPUs this worker may use,
//! where it works and caches, and the command that runs one rank. Unknown keys are refused;
//! [`WorkerConfig::validate`] reports every problem with its key.
//!
//! ```toml
//! coordinator = "http://10.0.0.5:7070"
//! token_file = "/etc/loractl/token"
//! gpus = "0,2"
//! work_dir = "/var/lib/loractl/work"
//! cache_dir = "/var/lib/loractl/cache"
//! model_dirs = ["/models"]
//! data_dirs = ["/datasets"]
//! [labels]
//! zone = "rack-3"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use loractl_spec::Gpus;
use serde::Deserialize;

use crate::error::{io_error, ConfigProblem, Error, Result};

pub mod defaults {
    pub const COORDINATOR: &str = "http://127.0.0.1:7070";
    pub const GPUS: &str = "all";
    pub const WORK_DIR: &str = "work";
    pub const CACHE_DIR: &str = "cache";
    /// The `loractl` CLI runs one rank of a job (`loractl rank`, reading `LORACTL_*`).
    pub const RANK_COMMAND: &[&str] = &["loractl", "rank"];
    pub const STOP_GRACE_SECS: u64 = 30;
    /// A resumable checkpoint every 10 optimizer steps: a retry repeats at most 10 steps.
    pub const CHECKPOINT_EVERY_N_STEPS: u64 = 10;
    /// Generous: rank 0 alone writes LoRA files, states and preview samples while the other
    /// ranks wait in the next all-reduce.
    pub const COLLECTIVE_TIMEOUT_SECS: u64 = 600;
    /// The Prometheus endpoint (`/metrics`); the coordinator's default is the port before.
    pub const METRICS_LISTEN: &str = "127.0.0.1:9465";
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// gRPC address of the coordinator, `http://host:port`.
    pub coordinator: String,
    /// File holding the coordinator's bearer token (LORACTL_TOKEN wins when set).
    pub token_file: Option<PathBuf>,
    /// Name this worker registers under; the host name when absent.
    pub name: Option<String>,
    /// `"all"`, `"cpu"` or GPU indices such as `"0,2"`: the only GPUs this worker uses.
    pub gpus: String,
    /// Report this many fake GPUs instead of discovering real ones (placement tests only:
    /// nothing can train on them).
    pub simulated_gpus: u32,
    /// Per-job working folders (spec, resume checkpoint, outputs).
    pub work_dir: PathBuf,
    /// Downloaded artifacts, by sha256.
    pub cache_dir: PathBuf,
    /// Folders where base checkpoints, VAEs and network weights are found (a job's relative
    /// path is looked up in each; an absolute one must lie inside one).
    pub model_dirs: Vec<PathBuf>,
    /// Folders jobs may read datasets (and other inputs) from by path, besides datasets
    /// uploaded with `loractl submit`; a job path anywhere else is refused (see
    /// [`crate::paths`]).
    pub data_dirs: Vec<PathBuf>,
    /// Program and arguments that run one rank; see [`crate::rank`] for its environment.
    pub rank_command: Vec<String>,
    /// The same for ranks given a GPU, when they need another program than CPU ranks: a
    /// `loractl` built with the `cuda` feature cannot even start on a machine without the
    /// NVIDIA driver, so a worker serving both kinds runs a CPU build for CPU ranks
    /// (`rank_command`) and the CUDA build for GPU ranks. Absent: `rank_command` runs both.
    pub gpu_rank_command: Option<Vec<String>>,
    /// CA (PEM) that signed the coordinator's certificate; needed for an https:// coordinator.
    pub tls_ca: Option<PathBuf>,
    /// This worker's certificate and key (PEM), when the coordinator requires mutual TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Name in the coordinator's certificate, when it differs from the address's host.
    pub tls_domain: Option<String>,
    /// Seconds a rank gets to exit after SIGTERM before its process group is killed.
    pub stop_grace_secs: u64,
    /// Optimizer steps between a rank's resumable checkpoints (uploaded; a retry resumes from
    /// the latest).
    pub checkpoint_every_n_steps: u64,
    /// Seconds a data-parallel rank waits for a silent peer before its attempt fails.
    pub collective_timeout_secs: u64,
    /// Host or IP at which other workers' ranks reach this worker's ranks for the
    /// data-parallel ring (TCP); absent: the local address this machine uses to reach the
    /// coordinator (see [`WorkerConfig::ring_host`]).
    pub ring_host: Option<String>,
    /// Address of the Prometheus endpoint (`GET /metrics`: training progress of its ranks,
    /// its GPUs); empty for none. OpenTelemetry export is configured by the OTEL_* variables.
    pub metrics_listen: String,
    pub labels: BTreeMap<String, String>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            coordinator: defaults::COORDINATOR.to_owned(),
            token_file: None,
            name: None,
            gpus: defaults::GPUS.to_owned(),
            simulated_gpus: 0,
            work_dir: PathBuf::from(defaults::WORK_DIR),
            cache_dir: PathBuf::from(defaults::CACHE_DIR),
            model_dirs: Vec::new(),
            data_dirs: Vec::new(),
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_domain: None,
            rank_command: defaults::RANK_COMMAND
                .iter()
                .map(|s| s.to_string())
                .collect(),
            gpu_rank_command: None,
            stop_grace_secs: defaults::STOP_GRACE_SECS,
            checkpoint_every_n_steps: defaults::CHECKPOINT_EVERY_N_STEPS,
            collective_timeout_secs: defaults::COLLECTIVE_TIMEOUT_SECS,
            ring_host: None,
            metrics_listen: defaults::METRICS_LISTEN.to_owned(),
            labels: BTreeMap::new(),
        }
    }
}

impl WorkerConfig {
    /// The program that runs a rank on `gpus` (empty: a CPU rank).
    pub fn rank_command_for(&self, gpus: &[u32]) -> &[String] {
        match &self.gpu_rank_command {
            Some(command) if !gpus.is_empty() => command,
            _ => &self.rank_command,
        }
    }

    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::ParseConfig {
            origin: origin.to_owned(),
            message: e.to_string(),
        })
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadConfig {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// The host this worker's ranks bind and announce for the data-parallel ring: `ring_host`,
    /// else the local address of the route to the coordinator (a UDP socket "connected" to it
    /// sends nothing, it only asks the kernel for the source address), else loopback.
    pub fn ring_host(&self) -> String {
        if let Some(h) = self.ring_host.as_ref().filter(|h| !h.trim().is_empty()) {
            return h.trim().to_owned();
        }
        let authority = self
            .coordinator
            .split("://")
            .nth(1)
            .unwrap_or_default()
            .split('/')
            .next()
            .unwrap_or_default();
        let routed = std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|socket| {
                socket.connect(authority)?;
                socket.local_addr()
            })
            .map(|a| a.ip());
        match routed {
            Ok(ip) if !ip.is_unspecified() => ip.to_string(),
            _ => "127.0.0.1".to_owned(),
        }
    }

    /// Every problem, each with its key.
    pub fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, text: String| {
            problems.push(ConfigProblem {
                key: key.to_owned(),
                problem: text,
            })
        };
        if !(self.coordinator.starts_with("http://") || self.coordinator.starts_with("https://")) {
            problem(
                "coordinator",
                format!(
                    "`{}` is not an address: write it as http://host:port",
                    self.coordinator
                ),
            );
        }
        if let Err(e) = Gpus::parse(&self.gpus) {
            problem(
                "gpus",
                format!("{e}; use \"all\", \"cpu\" or indices like \"0,2\""),
            );
        }
        if self.checkpoint_every_n_steps == 0 {
            problem(
                "checkpoint_every_n_steps",
                "0: use e.g. 10 (a checkpoint every 10 optimizer steps)".into(),
            );
        }
        if self.collective_timeout_secs == 0 {
            problem(
                "collective_timeout_secs",
                "0: use e.g. 600; a rank waits this long for a silent peer".into(),
            );
        }
        let empty = |c: &[String]| c.first().is_none_or(|p| p.trim().is_empty());
        if empty(&self.rank_command) {
            problem(
                "rank_command",
                "empty: give the program that runs one rank, e.g. [\"loractl\", \"rank\"]".into(),
            );
        }
        if self.gpu_rank_command.as_deref().is_some_and(empty) {
            problem(
                "gpu_rank_command",
                "empty: give the CUDA build that runs a GPU rank, e.g. \
                 [\"/usr/local/bin/loractl-cuda\", \"rank\"], or remove the key so \
                 rank_command runs GPU ranks too"
                    .into(),
            );
        }
        let https = self.coordinator.starts_with("https://");
        if https && self.tls_ca.is_none() {
            problem(
                "tls_ca",
                "missing: an https:// coordinator needs the CA that signed its certificate".into(),
            );
        }
        if !https && (self.tls_ca.is_some() || self.tls_cert.is_some()) {
            problem(
                "coordinator",
                "TLS files are set but the address is http://: write https://".into(),
            );
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            problem(
                "tls_cert",
                "tls_cert and tls_key go together: set both or neither".into(),
            );
        }
        if let Some(name) = &self.name {
            if name.trim().is_empty() || name.contains(char::is_whitespace) {
                problem("name", format!("`{name}` must be non-empty without spaces"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidConfig(problems))
        }
    }

    pub fn gpu_selection(&self) -> Gpus {
        Gpus::parse(&self.gpus).unwrap_or(Gpus::All)
    }

    pub fn stop_grace(&self) -> Duration {
        Duration::from_secs(self.stop_grace_secs)
    }

    /// The token: `LORACTL_TOKEN` if set, else the first line of `token_file`. An empty one or
    /// the shipped placeholder is refused ([`loractl_proto::token::problem`]).
    pub fn token(&self) -> Result<Option<String>> {
        self.token_from(std::env::var("LORACTL_TOKEN").ok())
    }

    fn token_from(&self, env: Option<String>) -> Result<Option<String>> {
        let checked = |origin: String, token: String| match loractl_proto::token::problem(&token) {
            Some(message) => Err(Error::ParseConfig { origin, message }),
            None => Ok(Some(token)),
        };
        if let Some(token) = env {
            return checked("LORACTL_TOKEN".to_owned(), token);
        }
        match &self.token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(io_error(path))?;
                let line = text.lines().next().unwrap_or_default().trim().to_owned();
                checked(format!("token_file `{}`", path.display()), line)
            }
            None => Ok(None),
        }
    }

    /// The TLS settings read from their files; `None` for a plain http:// coordinator.
    pub fn client_tls(&self) -> Result<Option<crate::client::ClientTls>> {
        let Some(ca) = &self.tls_ca else {
            return Ok(None);
        };
        let read = |path: &PathBuf| std::fs::read(path).map_err(io_error(path));
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        };
        Ok(Some(crate::client::ClientTls {
            ca_pem: read(ca)?,
            identity,
            domain: self.tls_domain.clone(),
        }))
    }

    /// The registered name: `name`, else the host name, else `worker`.
    pub fn worker_name(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "worker".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_a_full_file() {
        let config = WorkerConfig::from_toml_str("", "<test>").unwrap();
        assert_eq!(config, WorkerConfig::default());
        config.validate().unwrap();

        let text = r#"
            coordinator = "http://10.0.0.5:7070"
            name = "box-1"
            gpus = "0,2"
            model_dirs = ["/models"]
            rank_command = ["/usr/bin/loractl", "rank"]
            [labels]
            zone = "a"
        "#;
        let config = WorkerConfig::from_toml_str(text, "<test>").unwrap();
        config.validate().unwrap();
        assert_eq!(config.gpu_selection(), Gpus::Ids(vec![0, 2]));
        assert_eq!(config.worker_name(), "box-1");
        assert_eq!(config.labels["zone"], "a");
    }

    #[test]
    fn empty_and_placeholder_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        let config = WorkerConfig {
            token_file: Some(file.clone()),
            ..WorkerConfig::default()
        };
        for (env, text, fault) in [
            (Some(""), "s3cret-from-file", "LORACTL_TOKEN"),
            (Some("change-me"), "s3cret-from-file", "LORACTL_TOKEN"),
            (None, "change-me\n", "token_file"),
            (None, "\n", "token_file"),
        ] {
            std::fs::write(&file, text).unwrap();
            let err = config
                .token_from(env.map(str::to_owned))
                .unwrap_err()
                .to_string();
            assert!(err.contains(fault), "{env:?} {text:?}: {err}");
            assert!(err.contains("openssl rand"), "{err}");
        }
        std::fs::write(&file, "s3cret-from-file\n").unwrap();
        assert_eq!(
            config.token_from(None).unwrap().as_deref(),
            Some("s3cret-from-file")
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = WorkerConfig::from_toml_str("gpu = \"0\"", "w.toml").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("w.toml") && text.contains("unknown field `gpu`"),
            "{text}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let config = WorkerConfig {
            coordinator: "10.0.0.5:7070".into(),
            gpus: "0,0".into(),
            rank_command: vec![],
            gpu_rank_command: Some(vec![" ".into()]),
            name: Some("my box".into()),
            ..WorkerConfig::default()
        };
        let Err(Error::InvalidConfig(problems)) = config.validate() else {
            panic!("invalid config accepted");
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "coordinator",
                "gpus",
                "rank_command",
                "gpu_rank_command",
                "name"
            ]
        );
        assert!(problems[1].problem.contains("listed twice"));
    }

    #[test]
    fn gpu_ranks_run_the_gpu_rank_command_when_there_is_one() {
        let mut config = WorkerConfig::from_toml_str(
            "rank_command = [\"/usr/bin/loractl\", \"rank\"]\n\
             gpu_rank_command = [\"/usr/bin/loractl-cuda\", \"rank\"]\n",
            "w.toml",
        )
        .unwrap();
        assert_eq!(config.rank_command_for(&[]), ["/usr/bin/loractl", "rank"]);
        assert_eq!(
            config.rank_command_for(&[1]),
            ["/usr/bin/loractl-cuda", "rank"]
        );
        config.gpu_rank_command = None;
        assert_eq!(config.rank_command_for(&[1]), ["/usr/bin/loractl", "rank"]);
    }

    /// Ranks announce the address of the route to the coordinator unless `ring_host` says
    /// otherwise: a worker talking to a coordinator on loopback announces loopback.
    #[test]
    fn the_ring_host_is_the_route_to_the_coordinator_unless_set() {
        let mut config = WorkerConfig {
            coordinator: "http://127.0.0.1:7070".into(),
            ..WorkerConfig::default()
        };
        assert_eq!(config.ring_host(), "127.0.0.1");
        config.ring_host = Some(" 10.1.2.3 ".into());
        assert_eq!(config.ring_host(), "10.1.2.3");
        config.ring_host = None;
        config.coordinator = "not an address".into();
        assert_eq!(config.ring_host(), "127.0.0.1");
    }
}
