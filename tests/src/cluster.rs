//! The end-to-end cluster: `loractl-coordinator` and `loractl-worker` started as real
//! processes on 127.0.0.1, driven by the real `loractl` CLI exactly as a user would, with
//! `--json` where a test reads the answer.
//!
//! The binaries are those of this build, found next to the test executable
//! (`target/<profile>/`, or `LORACTL_BIN_DIR`). Cargo only builds a package's binaries for
//! that package's own tests, so a run of this crate alone needs them built first:
//! `cargo build --bins && cargo test -p loractl-tests`; `cargo test --workspace` builds them
//! anyway (the cli, coordinator and worker crates have integration tests of their own).

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::Value;

use crate::process::{free_port, poll, Proc, DEADLINE, POLL};

/// Folder of the binaries under test.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LORACTL_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/<test>-<hash> -> target/<profile>
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from("target/debug"))
}

/// A binary under test; panics with the command that builds it when it is missing.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first with `cargo build --bins` (or run `cargo test \
         --workspace`), or set LORACTL_BIN_DIR",
        path.display()
    );
    path
}

/// What a test worker offers and runs.
pub struct WorkerSetup<'a> {
    pub name: &'a str,
    /// 0: a CPU worker; N: N simulated GPUs (placement only).
    pub simulated_gpus: u32,
    /// A shell script run as the rank instead of `loractl rank`.
    pub script: Option<&'a str>,
    pub data_dirs: Vec<PathBuf>,
    /// Extra environment for the worker and its ranks.
    pub env: Vec<(&'a str, String)>,
    /// Extra lines of the worker's TOML config, e.g. `collective_timeout_secs = 15`.
    pub config: Vec<String>,
}

impl<'a> WorkerSetup<'a> {
    pub fn cpu(name: &'a str) -> Self {
        Self {
            name,
            simulated_gpus: 0,
            script: None,
            data_dirs: Vec::new(),
            env: Vec::new(),
            config: Vec::new(),
        }
    }
}

/// What a `loractl` command did.
#[derive(Debug)]
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

/// Where the coordinators keep their state.
#[derive(Clone)]
pub enum Store {
    /// One redb file in the cluster's folder.
    Redb,
    /// etcd at this client URL: several coordinators elect a leader.
    Etcd(String),
}

/// Coordinators with their state folder, and the workers started for them.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub token: Option<String>,
    pub store: Store,
    /// Oldest first; on etcd the first one alive leads.
    pub coordinators: Vec<Proc>,
    pub workers: Vec<Proc>,
    /// More flags for every coordinator (TLS files).
    coordinator_args: Vec<String>,
    /// More environment for every coordinator.
    coordinator_env: Vec<(String, String)>,
    /// The `/metrics` port of every coordinator started, in order.
    pub coordinator_metrics: Vec<u16>,
    /// The `/metrics` port of each worker, by name.
    pub worker_metrics: std::collections::BTreeMap<String, u16>,
    started: u32,
}

impl Cluster {
    /// Starts a coordinator on a redb file (heartbeat every second, a worker lost after 3 s of
    /// silence).
    pub fn start(token: Option<&str>) -> anyhow::Result<Self> {
        Self::start_on(token, Store::Redb)
    }

    pub fn start_on(token: Option<&str>, store: Store) -> anyhow::Result<Self> {
        Self::start_with(token, store, &[])
    }

    /// With more coordinator flags, e.g. `--tls-cert`/`--tls-key`.
    pub fn start_with(token: Option<&str>, store: Store, args: &[&str]) -> anyhow::Result<Self> {
        Self::launch(token, store, args, &[])
    }

    /// With environment variables for every coordinator (`OTEL_*`, ...).
    pub fn start_with_env(token: Option<&str>, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::launch(token, Store::Redb, &[], env)
    }

    fn launch(
        token: Option<&str>,
        store: Store,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut cluster = Self {
            dir: tempfile::Builder::new().prefix("loractl-e2e-").tempdir()?,
            port: free_port(),
            token: token.map(str::to_owned),
            store,
            coordinators: Vec::new(),
            workers: Vec::new(),
            coordinator_args: args.iter().map(|a| a.to_string()).collect(),
            coordinator_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            coordinator_metrics: Vec::new(),
            worker_metrics: Default::default(),
            started: 0,
        };
        cluster.start_coordinator()?;
        Ok(cluster)
    }

    pub fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Starts a coordinator (again, after a kill: same store, artifacts and address) and waits
    /// until it serves, or, on etcd with a leader alive, until it campaigns as a standby. All
    /// coordinators share the artifact folder, as they would share a volume.
    pub fn start_coordinator(&mut self) -> anyhow::Result<()> {
        let store = match &self.store {
            Store::Redb => format!("redb:{}", self.path("state.redb").display()),
            Store::Etcd(endpoint) => format!("etcd:{endpoint}"),
        };
        let metrics_port = free_port();
        self.coordinator_metrics.push(metrics_port);
        let mut command = Command::new(bin("loractl-coordinator"));
        command
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--store")
            .arg(store)
            .arg("--artifacts")
            .arg(self.path("artifacts"))
            .args(["--heartbeat-interval-secs", "1"])
            .args(["--heartbeat-timeout-secs", "3"])
            .args(["--leader-ttl-secs", "2"])
            .arg(format!("--metrics-listen=127.0.0.1:{metrics_port}"))
            .env_remove("LORACTL_TOKEN")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        if let Some(token) = &self.token {
            command.arg("--token").arg(token);
        }
        command.args(&self.coordinator_args);
        command.envs(self.coordinator_env.iter().map(|(k, v)| (k, v)));
        let n = self.started;
        self.started += 1;
        let log = self.path(&format!("coordinator-{n}.log"));
        let mut proc = Proc::spawn(&format!("coordinator {n}"), command, log.clone())?;
        let standby = matches!(self.store, Store::Etcd(_)) && !self.coordinators.is_empty();
        let port = self.port;
        let start = Instant::now();
        loop {
            let ready = if standby {
                std::fs::read_to_string(&log).is_ok_and(|t| t.contains("campaigning"))
            } else {
                TcpStream::connect(("127.0.0.1", port)).is_ok()
            };
            if ready {
                break;
            }
            if let Some(status) = proc.exited() {
                bail!("the coordinator exited ({status}):\n{}", proc.log_tail());
            }
            if start.elapsed() > DEADLINE {
                bail!("the coordinator did not start:\n{}", proc.log_tail());
            }
            std::thread::sleep(POLL);
        }
        self.coordinators.push(proc);
        Ok(())
    }

    /// `kill -9` the oldest coordinator still running (on etcd, the leader).
    pub fn kill_coordinator(&mut self) {
        if let Some(proc) = self.coordinators.iter_mut().find(|p| p.pid().is_some()) {
            proc.kill();
        }
    }

    /// Starts a worker and waits until the coordinator lists it alive.
    pub fn add_worker(&mut self, setup: WorkerSetup) -> anyhow::Result<()> {
        let root = self.path(&format!("worker-{}", setup.name));
        std::fs::create_dir_all(&root)?;
        let quote = |p: &Path| serde_json::to_string(&p.display().to_string()).unwrap_or_default();
        let rank_command = match setup.script {
            Some(script) => format!(
                "[\"/bin/sh\", \"-c\", {}]",
                serde_json::to_string(script).unwrap_or_default()
            ),
            None => format!("[{}, \"rank\"]", quote(&bin("loractl"))),
        };
        let model_dir = loractl_trainer::demo::bundled_tiny_model()
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let data_dirs: Vec<String> = setup.data_dirs.iter().map(|d| quote(d)).collect();
        let (gpus, simulated) = if setup.simulated_gpus > 0 {
            ("all", setup.simulated_gpus)
        } else {
            ("cpu", 0)
        };
        let metrics_port = free_port();
        self.worker_metrics
            .insert(setup.name.to_owned(), metrics_port);
        let config = format!(
            "coordinator = \"{address}\"\nname = \"{name}\"\ngpus = \"{gpus}\"\n\
             simulated_gpus = {simulated}\nwork_dir = {work}\ncache_dir = {cache}\n\
             model_dirs = [{models}]\ndata_dirs = [{data}]\nrank_command = {rank_command}\n\
             stop_grace_secs = 5\ncheckpoint_every_n_steps = 2\n\
             metrics_listen = \"127.0.0.1:{metrics_port}\"\n{extra}",
            address = self.address(),
            name = setup.name,
            work = quote(&root.join("work")),
            cache = quote(&root.join("cache")),
            models = quote(&model_dir),
            data = data_dirs.join(", "),
            extra = setup
                .config
                .iter()
                .map(|line| format!("{line}\n"))
                .collect::<String>(),
        );
        let config_path = root.join("worker.toml");
        std::fs::write(&config_path, config)?;
        let mut command = Command::new(bin("loractl-worker"));
        command
            .arg("--config")
            .arg(&config_path)
            .env_remove("LORACTL_TOKEN")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            // Ranks inherit these: glibc keeping freed training buffers instead of faulting
            // them back in every step.
            .env("MALLOC_MMAP_THRESHOLD_", "4294967296")
            .env("MALLOC_TRIM_THRESHOLD_", "8589934592");
        if let Some(token) = &self.token {
            command.env("LORACTL_TOKEN", token);
        }
        for (key, value) in &setup.env {
            command.env(key, value);
        }
        let log = root.join("worker.log");
        let proc = Proc::spawn(&format!("worker {}", setup.name), command, log)?;
        self.workers.push(proc);
        let name = setup.name.to_owned();
        self.poll(&format!("worker {name} to register"), || {
            let workers = self.json(&["workers"]).ok()?;
            workers
                .as_array()?
                .iter()
                .any(|w| w["name"] == name.as_str() && w["alive"] == true)
                .then_some(())
        });
        Ok(())
    }

    /// `kill -9` a worker.
    pub fn kill_worker(&mut self, name: &str) {
        let label = format!("worker {name}");
        if let Some(proc) = self.workers.iter_mut().find(|p| p.name == label) {
            proc.kill();
        }
    }

    /// `loractl` aimed at this coordinator with its token.
    pub fn loractl(&self) -> Command {
        let mut command = Command::new(bin("loractl"));
        command
            .env("LORACTL_COORDINATOR", self.address())
            .env_remove("LORACTL_TOKEN")
            .env_remove("LORACTL_CA")
            .env("LORACTL_LOG", "warn");
        if let Some(token) = &self.token {
            command.env("LORACTL_TOKEN", token);
        }
        command
    }

    pub fn run(&self, args: &[&str]) -> Out {
        let out = self
            .loractl()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running loractl");
        Out {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `loractl ARGS --json`, parsed; an error when the command fails.
    pub fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.run(&all);
        if !out.ok() {
            bail!("loractl {all:?} failed: {}", out.stderr);
        }
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("loractl {all:?} printed no JSON: {}", out.stdout))
    }

    /// `loractl status ID --json`.
    pub fn job(&self, id: &str) -> anyhow::Result<Value> {
        self.json(&["status", id])
    }

    /// Polls the job until `done` holds for it; returns it.
    pub fn wait_job(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        self.poll(&format!("{id}: {what}"), || {
            self.job(id).ok().filter(|job| done(job))
        })
    }

    /// Polls `check`, with every process's log in the panic message when it times out.
    pub fn poll<T>(&self, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(value) = check() {
                return value;
            }
            if start.elapsed() > DEADLINE {
                panic!(
                    "timed out after {DEADLINE:?} waiting for {what}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The tail of every process's log.
    pub fn logs(&self) -> String {
        self.coordinators
            .iter()
            .chain(&self.workers)
            .map(Proc::log_tail)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Files the coordinator's artifact store holds.
    pub fn stored_blobs(&self) -> usize {
        std::fs::read_dir(self.path("artifacts/blobs"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Cluster {
    /// With `LORACTL_E2E_KEEP=1` the state folder (logs, store, work folders) stays for a look.
    fn drop(&mut self) {
        if std::env::var_os("LORACTL_E2E_KEEP").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("kept {}", self.dir.path().display());
        }
    }
}

/// A `loractl watch` (or `submit --watch`) running in the background, its stdout collected.
pub struct Background {
    child: Child,
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Background {
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting loractl in the background");
        let read = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = r.read_to_string(&mut text);
                text
            })
        };
        let stdout = child.stdout.take().map(|s| read(Box::new(s)));
        let stderr = child.stderr.take().map(|s| read(Box::new(s)));
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits (with the deadline) for it to exit: exit code, stdout, stderr.
    pub fn finish(mut self) -> Out {
        let status = poll("the background loractl to exit", DEADLINE, || {
            self.child.try_wait().ok().flatten()
        });
        let join = |h: Option<std::thread::JoinHandle<String>>| {
            h.and_then(|h| h.join().ok()).unwrap_or_default()
        };
        Out {
            code: status.code(),
            stdout: join(self.stdout.take()),
            stderr: join(self.stderr.take()),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a tiny training job under `dir`: `count` generated 64 px images (5 repeats), the
/// bundled tiny model, batch size 1, `steps` steps, on CPU. `extra` is appended to the spec
/// (more sections). Returns the job file.
pub fn tiny_job(dir: &Path, name: &str, steps: usize, extra: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let data = loractl_trainer::demo::write_dataset(dir, 64, 4)?;
    let model = loractl_trainer::demo::bundled_tiny_model();
    let text = loractl_trainer::demo::job_toml(&model, &data, 64, steps)
        .replace("name = \"quickstart\"", &format!("name = \"{name}\""))
        .replace("train_batch_size = 2", "train_batch_size = 1");
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!("{text}\n{extra}\n[resources]\ngpus = \"cpu\"\n"),
    )?;
    Ok(job)
}

/// The job id `loractl submit` printed (its first stdout line).
pub fn submitted_id(out: &Out) -> String {
    assert!(out.ok(), "submit failed: {}\n{}", out.stderr, out.stdout);
    out.stdout
        .lines()
        .next()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| panic!("submit printed no job id: {}", out.stderr))
}

/// The JSON objects of a `--json` event stream (one per line).
pub fn events(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// `GET /metrics` of the process serving it on 127.0.0.1:`port`: the body, empty when it
/// cannot be read.
pub fn scrape(port: u16) -> String {
    use std::io::Write;
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    if stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return String::new();
    }
    let mut page = String::new();
    let _ = stream.read_to_string(&mut page);
    page.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}
