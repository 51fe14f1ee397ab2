//! One rank of a job as a child process in a process group of its own, so that a stop, a
//! timeout or the worker's own death takes down everything the rank started: no orphan keeps
//! a GPU.
//!
//! The rank command (config `rank_command`) runs with:
//! - `CUDA_VISIBLE_DEVICES`: exactly the pinned GPU indices (empty for CPU ranks, hiding all
//!   GPUs) and `CUDA_DEVICE_ORDER=PCI_BUS_ID`, so CUDA numbers GPUs as NVML does;
//! - `LORACTL_JOB_ID`, `LORACTL_ATTEMPT`, `LORACTL_RANK`, `LORACTL_WORLD_SIZE`,
//!   `LORACTL_LOCAL_RANK`, `LORACTL_LOCAL_WORLD_SIZE` (the job's ranks on this worker);
//! - `RAYON_NUM_THREADS`, for CPU ranks sharing the worker: its cores split among them;
//! - `LORACTL_SPEC` (the job spec file), `LORACTL_OUTPUT_DIR` (where it writes),
//!   `LORACTL_RESUME` (checkpoint file to resume from, when there is one),
//!   `LORACTL_MODEL_DIRS` and `LORACTL_DATA_DIRS` (`:`-separated; the rank opens data files
//!   only inside the latter);
//! - `LORACTL_RING_HOST`: the host a data-parallel rank binds and announces for the TCP ring
//!   (`ring_host` in the worker's config, else the route to the coordinator);
//! - `LORACTL_GPU_MEMORY_BYTES`: the memory of the rank's GPU (NVML), for the memory check.
//!
//! It reports on stdout and reads rendezvous answers on stdin as [`crate::protocol`] says,
//! and exits 0 on success,
//! [`loractl_proto::domain::EXIT_BAD_CONFIG`] when the job cannot run as written, anything
//! else on a training error.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use loractl_proto::domain::{Assignment, FailureKind, LogStream, RankId};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::protocol::{self, env, ChildMessage, Line};

/// Where and how a rank runs.
#[derive(Debug, Clone)]
pub struct Launch {
    pub command: Vec<String>,
    pub assignment: Assignment,
    pub spec_path: PathBuf,
    pub output_dir: PathBuf,
    pub resume: Option<PathBuf>,
    pub model_dirs: Vec<PathBuf>,
    /// Folders the rank may read data from (`data_dirs` and the uploaded-dataset cache).
    pub data_dirs: Vec<PathBuf>,
    /// Host the rank binds and announces for the data-parallel ring (`LORACTL_RING_HOST`).
    pub ring_host: String,
    /// Memory of the smallest GPU the rank gets, from NVML (`LORACTL_GPU_MEMORY_BYTES`: the
    /// rank refuses a job whose memory estimate exceeds it before loading any weight).
    pub gpu_memory_bytes: Option<u64>,
    /// Optimizer steps between the rank's checkpoints (`LORACTL_CHECKPOINT_STEPS`).
    pub checkpoint_every_n_steps: u64,
    /// Seconds a collective waits for a silent peer (`LORACTL_COLLECTIVE_TIMEOUT_SECS`).
    pub collective_timeout_secs: u64,
}

/// How a rank process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The worker had asked the rank to stop ([`RankProcess::stop`], [`RankProcess::kill`]):
    /// only then is a signal or an error exit a stop rather than a crash.
    pub stop_requested: bool,
}

impl Exit {
    /// `None` on success.
    pub fn failure_kind(self) -> Option<FailureKind> {
        FailureKind::from_exit(self.code, self.signal, self.stop_requested)
    }

    pub fn describe(self) -> String {
        match (self.code, self.signal) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            (None, None) => "ended".to_owned(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum RankEvent {
    Message(ChildMessage),
    Log {
        stream: LogStream,
        text: String,
    },
    /// Last event of a rank; every output line came before it.
    Exited(Exit),
}

/// A running rank. Dropping it kills the whole process group.
#[derive(Debug)]
pub struct RankProcess {
    pub id: RankId,
    group: ProcessGroup,
    exited: tokio::sync::watch::Receiver<bool>,
    /// Set before the worker signals the rank, so its exit is known to be a requested stop.
    stop_requested: Arc<AtomicBool>,
    /// Lines for the rank's stdin.
    input: mpsc::Sender<String>,
}

/// The process group a rank leads: never 0 (`killpg(0)` is the caller's own group), never
/// negative, never the worker's own group, so signalling it cannot hit the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcessGroup(i32);

impl ProcessGroup {
    /// The group of a child started with `process_group(0)` (its id is its pid); `None` for a
    /// pid that cannot name a child's group.
    fn led_by(pid: Option<u32>) -> Option<Self> {
        let pid = i32::try_from(pid?).ok().filter(|&p| p > 1)?;
        // SAFETY: getpgrp has no preconditions and cannot fail.
        let own = unsafe { libc::getpgrp() };
        (pid != own).then_some(Self(pid))
    }

    fn signal(self, signal: i32) {
        // SAFETY: killpg has no memory-safety preconditions; the group is a positive id other
        // than ours (see `led_by`); a group that is already gone (ESRCH) is the expected
        // outcome after the rank exits.
        unsafe {
            libc::killpg(self.0, signal);
        }
    }
}

impl RankProcess {
    /// Starts the rank; its events arrive on `events`, tagged with its id.
    pub fn spawn(
        launch: &Launch,
        events: mpsc::Sender<(RankId, RankEvent)>,
    ) -> Result<RankProcess> {
        let a = &launch.assignment;
        let id = RankId {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            rank: a.rank,
        };
        let program = launch.command.first().cloned().unwrap_or_default();
        let folders = |dirs: &[PathBuf]| {
            protocol::join_paths(dirs).map_err(|why| Error::Spawn {
                command: launch.command.join(" "),
                source: std::io::Error::other(why),
            })
        };
        let mut command = tokio::process::Command::new(&program);
        command
            .args(launch.command.iter().skip(1))
            .current_dir(&launch.output_dir)
            .env("CUDA_VISIBLE_DEVICES", join(&a.gpu_indices))
            .env("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
            .env(env::JOB_ID, a.job_id.as_str())
            .env(env::ATTEMPT, a.attempt.to_string())
            .env(env::RANK, a.rank.to_string())
            .env(env::WORLD_SIZE, a.world_size.to_string())
            .env(env::LOCAL_RANK, a.local_rank.to_string())
            .env(env::LOCAL_WORLD_SIZE, a.local_world_size.to_string())
            .env(env::SPEC, &launch.spec_path)
            .env(env::OUTPUT_DIR, &launch.output_dir)
            .env(env::MODEL_DIRS, folders(&launch.model_dirs)?)
            .env(env::DATA_DIRS, folders(&launch.data_dirs)?)
            .env(env::RING_HOST, &launch.ring_host)
            .env(
                env::CHECKPOINT_STEPS,
                launch.checkpoint_every_n_steps.to_string(),
            )
            .env(
                env::COLLECTIVE_TIMEOUT_SECS,
                launch.collective_timeout_secs.to_string(),
            )
            .env_remove(env::RESUME)
            .env_remove(env::TOKEN)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(resume) = &launch.resume {
            command.env(env::RESUME, resume);
        }
        if let Some(threads) = cpu_threads(a, std::env::var("RAYON_NUM_THREADS").ok()) {
            command.env("RAYON_NUM_THREADS", threads.to_string());
        }
        match launch.gpu_memory_bytes {
            Some(bytes) => command.env(env::GPU_MEMORY_BYTES, bytes.to_string()),
            None => command.env_remove(env::GPU_MEMORY_BYTES),
        };
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                // The rank dies with the worker (even on SIGKILL of the worker), so a crashed
                // daemon leaves no training holding a GPU.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|source| Error::Spawn {
            command: launch.command.join(" "),
            source,
        })?;
        let Some(group) = ProcessGroup::led_by(child.id()) else {
            // Without its group the rank could not be stopped; never signal a guessed one.
            let _ = child.start_kill();
            return Err(Error::Spawn {
                command: launch.command.join(" "),
                source: std::io::Error::other("the rank exited before its process group was known"),
            });
        };
        let stop_requested = Arc::new(AtomicBool::new(false));
        let (input, mut lines_in) = mpsc::channel::<String>(16);
        if let Some(mut stdin) = child.stdin.take() {
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                while let Some(line) = lines_in.recv().await {
                    let written = async {
                        stdin.write_all(line.as_bytes()).await?;
                        stdin.write_all(b"\n").await?;
                        stdin.flush().await
                    };
                    if written.await.is_err() {
                        return; // the rank closed its stdin or exited
                    }
                }
            });
        }
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let (exited_tx, exited) = tokio::sync::watch::channel(false);

        let out_events = events.clone();
        let out_id = id.clone();
        let stdout_task = tokio::spawn(async move {
            let Some(stdout) = stdout else { return };
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let event = match protocol::parse_line(&line) {
                    Line::Message(message) => RankEvent::Message(message),
                    Line::Text(text) => RankEvent::Log {
                        stream: LogStream::Stdout,
                        text,
                    },
                    Line::Malformed { text, problem } => RankEvent::Log {
                        stream: LogStream::Stdout,
                        text: format!("{text}  [not understood: {problem}]"),
                    },
                };
                if out_events.send((out_id.clone(), event)).await.is_err() {
                    return;
                }
            }
        });
        let err_events = events.clone();
        let err_id = id.clone();
        let stderr_task = tokio::spawn(async move {
            let Some(stderr) = stderr else { return };
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(text)) = lines.next_line().await {
                let event = RankEvent::Log {
                    stream: LogStream::Stderr,
                    text,
                };
                if err_events.send((err_id.clone(), event)).await.is_err() {
                    return;
                }
            }
        });
        let wait_id = id.clone();
        let requested = Arc::clone(&stop_requested);
        tokio::spawn(async move {
            let status = child.wait().await;
            // Whatever the rank left behind in its group goes with it.
            group.signal(libc::SIGKILL);
            let _ = stdout_task.await;
            let _ = stderr_task.await;
            let stop_requested = requested.load(Ordering::SeqCst);
            let exit = match status {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    Exit {
                        code: status.code(),
                        signal: status.signal(),
                        stop_requested,
                    }
                }
                Err(_) => Exit {
                    code: None,
                    signal: None,
                    stop_requested,
                },
            };
            let _ = exited_tx.send(true);
            let _ = events.send((wait_id, RankEvent::Exited(exit))).await;
        });
        Ok(RankProcess {
            id,
            group,
            exited,
            stop_requested,
            input,
        })
    }

    /// Writes one line to the rank's stdin (dropped if the rank does not read).
    pub fn tell(&self, line: String) {
        if self.input.try_send(line).is_err() {
            tracing::warn!(job = %self.id.job_id, rank = self.id.rank, "rank is not reading its stdin; message dropped");
        }
    }

    pub fn has_exited(&self) -> bool {
        *self.exited.borrow()
    }

    /// SIGTERM to the group (the rank may checkpoint and exit), SIGKILL after `grace`.
    pub fn stop(&self, grace: Duration) {
        if self.has_exited() {
            return;
        }
        self.stop_requested.store(true, Ordering::SeqCst);
        self.group.signal(libc::SIGTERM);
        let group = self.group;
        let mut exited = self.exited.clone();
        tokio::spawn(async move {
            let ended = tokio::time::timeout(grace, exited.wait_for(|e| *e)).await;
            if ended.is_err() {
                group.signal(libc::SIGKILL);
            }
        });
    }

    /// SIGKILL to the whole group now.
    pub fn kill(&self) {
        if !self.has_exited() {
            self.stop_requested.store(true, Ordering::SeqCst);
            self.group.signal(libc::SIGKILL);
        }
    }
}

impl Drop for RankProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn join(indices: &[u32]) -> String {
    indices
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Folder of one attempt of one rank under `work_dir`: `<job>/attempt-<n>/rank-<r>`.
/// The compute threads of a CPU rank that shares this machine with other ranks of its job:
/// the cores (or the worker's own `RAYON_NUM_THREADS`) split evenly, at least one each, so
/// the ranks do not fight over the cores. `None` (the trainer's default, every core) for GPU
/// ranks and a CPU rank alone on the worker.
fn cpu_threads(a: &Assignment, worker_setting: Option<String>) -> Option<usize> {
    if !a.gpu_indices.is_empty() || a.local_world_size <= 1 {
        return None;
    }
    let cores = worker_setting
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    Some((cores / a.local_world_size as usize).max(1))
}

pub fn attempt_dir(work_dir: &Path, rank: &RankId) -> PathBuf {
    work_dir
        .join(rank.job_id.as_str())
        .join(format!("attempt-{}", rank.attempt))
        .join(format!("rank-{}", rank.rank))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::RankProgress;
    use loractl_proto::domain::JobId;

    fn launch(dir: &Path, script: &str, gpus: Vec<u32>) -> Launch {
        Launch {
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            assignment: Assignment {
                job_id: JobId::new("j7"),
                attempt: 2,
                rank: 1,
                world_size: 2,
                local_rank: 0,
                local_world_size: 1,
                gpu_indices: gpus,
                spec_toml: "name = \"x\"".into(),
                resume_checkpoint: None,
                trace_parent: String::new(),
            },
            spec_path: dir.join("spec.toml"),
            output_dir: dir.to_owned(),
            resume: Some(dir.join("resume.ckpt")),
            model_dirs: vec!["/models".into(), "/more".into()],
            data_dirs: vec!["/data".into()],
            ring_host: "10.0.0.7".into(),
            gpu_memory_bytes: Some(80 << 30),
            checkpoint_every_n_steps: 5,
            collective_timeout_secs: 30,
        }
    }

    async fn collect(mut rx: mpsc::Receiver<(RankId, RankEvent)>) -> (Vec<RankEvent>, Exit) {
        let mut events = Vec::new();
        while let Some((_, event)) = rx.recv().await {
            if let RankEvent::Exited(exit) = event {
                return (events, exit);
            }
            events.push(event);
        }
        panic!("no exit event");
    }

    fn text(events: &[RankEvent]) -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                RankEvent::Log { text, .. } => Some(text.clone()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn the_rank_sees_only_its_gpus_and_its_job() {
        let dir = tempfile::tempdir().unwrap();
        let script = r#"echo "gpus=$CUDA_VISIBLE_DEVICES order=$CUDA_DEVICE_ORDER"
echo "job=$LORACTL_JOB_ID attempt=$LORACTL_ATTEMPT rank=$LORACTL_RANK/$LORACTL_WORLD_SIZE local=$LORACTL_LOCAL_RANK/$LORACTL_LOCAL_WORLD_SIZE"
echo "models=$LORACTL_MODEL_DIRS data=$LORACTL_DATA_DIRS ring=$LORACTL_RING_HOST gpu_memory=$LORACTL_GPU_MEMORY_BYTES resume=$(basename $LORACTL_RESUME) token=${LORACTL_TOKEN:-none}"
echo "checkpoints=$LORACTL_CHECKPOINT_STEPS collective_timeout=$LORACTL_COLLECTIVE_TIMEOUT_SECS"
echo oops >&2
echo '@loractl {"progress":{"step":4,"total_steps":8,"loss":0.5,"lr":0.001}}'"#;
        let (tx, rx) = mpsc::channel(64);
        let rank = RankProcess::spawn(&launch(dir.path(), script, vec![2, 3]), tx).unwrap();
        assert_eq!(rank.id.attempt, 2);
        let (events, exit) = collect(rx).await;
        assert_eq!(exit.failure_kind(), None);
        let lines = text(&events);
        assert!(
            lines.contains(&"gpus=2,3 order=PCI_BUS_ID".to_owned()),
            "{lines:?}"
        );
        assert!(
            lines.contains(&"job=j7 attempt=2 rank=1/2 local=0/1".to_owned()),
            "{lines:?}"
        );
        assert!(
            lines.contains(
                &"models=/models:/more data=/data ring=10.0.0.7 gpu_memory=85899345920 resume=resume.ckpt token=none"
                    .to_owned()
            ),
            "{lines:?}"
        );
        assert!(
            lines.contains(&"checkpoints=5 collective_timeout=30".to_owned()),
            "{lines:?}"
        );
        assert!(events.contains(&RankEvent::Log {
            stream: LogStream::Stderr,
            text: "oops".into()
        }));
        assert!(events.iter().any(|e| matches!(
            e,
            RankEvent::Message(ChildMessage::Progress(RankProgress { step: 4, .. }))
        )));
    }

    #[tokio::test]
    async fn cpu_ranks_see_no_gpu() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = mpsc::channel(64);
        let _rank = RankProcess::spawn(
            &launch(
                dir.path(),
                "echo \"[${CUDA_VISIBLE_DEVICES-unset}]\"",
                vec![],
            ),
            tx,
        )
        .unwrap();
        let (events, _) = collect(rx).await;
        assert_eq!(text(&events), ["[]"]);
    }

    #[test]
    fn cpu_ranks_sharing_a_worker_split_its_cores() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = launch(dir.path(), "true", vec![]).assignment;
        assert_eq!(cpu_threads(&a, Some("8".into())), None, "alone: every core");
        a.local_world_size = 2;
        assert_eq!(cpu_threads(&a, Some("8".into())), Some(4));
        a.local_world_size = 3;
        assert_eq!(cpu_threads(&a, Some("2".into())), Some(1), "at least one");
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(
            cpu_threads(&a, Some("not a number".into())),
            Some((cores / 3).max(1))
        );
        a.gpu_indices = vec![0];
        assert_eq!(
            cpu_threads(&a, None),
            None,
            "GPU ranks compute on their GPU"
        );
    }

    #[tokio::test]
    async fn exit_codes_and_signals_are_classified() {
        let dir = tempfile::tempdir().unwrap();
        for (script, kind) in [
            ("exit 78", Some(FailureKind::BadConfig)),
            ("exit 1", Some(FailureKind::TrainingError)),
            // Signals the worker did not send are crashes, spending the job's restarts.
            ("kill -9 $$", Some(FailureKind::Crashed)),
            ("kill -SEGV $$", Some(FailureKind::Crashed)),
            ("kill -ABRT $$", Some(FailureKind::Crashed)),
            ("true", None),
        ] {
            let (tx, rx) = mpsc::channel(64);
            let _rank = RankProcess::spawn(&launch(dir.path(), script, vec![]), tx).unwrap();
            let (_, exit) = collect(rx).await;
            assert_eq!(exit.failure_kind(), kind, "{script}: {}", exit.describe());
        }
    }

    fn alive(pid: i32) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        unsafe { libc::kill(pid, 0) == 0 }
    }

    /// Reads the pid a script wrote, waiting on the rank's own output rather than on time.
    async fn pid_from(rx: &mut mpsc::Receiver<(RankId, RankEvent)>) -> i32 {
        while let Some((_, event)) = rx.recv().await {
            if let RankEvent::Log { text, .. } = event {
                if let Some(pid) = text.strip_prefix("child ") {
                    return pid.parse().unwrap();
                }
            }
        }
        panic!("the script did not print its child's pid");
    }

    #[tokio::test]
    async fn stop_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        // The rank starts a grandchild that ignores SIGTERM, like a hung data loader.
        let script = "sh -c 'trap \"\" TERM; while :; do sleep 1; done' & echo child $!; wait";
        let (tx, mut rx) = mpsc::channel(64);
        let rank = RankProcess::spawn(&launch(dir.path(), script, vec![]), tx).unwrap();
        let grandchild = pid_from(&mut rx).await;
        assert!(alive(grandchild));
        rank.stop(Duration::from_millis(200));
        let (_, exit) = collect(rx).await;
        assert_eq!(exit.failure_kind(), Some(FailureKind::Killed));
        // The group was killed when the leader ended; wait for the grandchild's end itself.
        tokio::time::timeout(
            Duration::from_secs(10),
            loractl_tests::process_ended(grandchild),
        )
        .await
        .unwrap_or_else(|_| panic!("grandchild {grandchild} survived"));
    }

    /// A rank the worker stopped is `Killed` (free) however it ends: by the signal, or by an
    /// error exit from its SIGTERM handler.
    #[tokio::test]
    async fn a_requested_stop_is_killed_however_the_rank_ends() {
        let dir = tempfile::tempdir().unwrap();
        for script in [
            "sleep 1000 & echo child $!; wait",
            "trap 'exit 3' TERM; sleep 1000 & echo child $!; wait",
        ] {
            let (tx, mut rx) = mpsc::channel(64);
            let rank = RankProcess::spawn(&launch(dir.path(), script, vec![]), tx).unwrap();
            let _ = pid_from(&mut rx).await;
            rank.stop(Duration::from_secs(30));
            let (_, exit) = collect(rx).await;
            assert!(exit.stop_requested, "{script}");
            assert_eq!(
                exit.failure_kind(),
                Some(FailureKind::Killed),
                "{script}: {}",
                exit.describe()
            );
        }
    }

    #[test]
    fn no_process_group_can_name_the_workers_own() {
        // SAFETY: getpgrp has no preconditions.
        let own = unsafe { libc::getpgrp() };
        for pid in [None, Some(0), Some(1), Some(u32::MAX), Some(own as u32)] {
            assert_eq!(ProcessGroup::led_by(pid), None, "{pid:?}");
        }
        assert_eq!(ProcessGroup::led_by(Some(4242)), Some(ProcessGroup(4242)));
    }

    #[tokio::test]
    async fn dropping_the_handle_kills_the_rank() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let rank = RankProcess::spawn(
            &launch(dir.path(), "sleep 1000 & echo child $!; wait", vec![]),
            tx,
        )
        .unwrap();
        let _ = pid_from(&mut rx).await;
        drop(rank);
        let (_, exit) = collect(rx).await;
        assert_eq!(exit.signal, Some(libc::SIGKILL));
    }

    #[tokio::test]
    async fn a_missing_program_names_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = launch(dir.path(), "", vec![]);
        l.command = vec!["/nonexistent/loractl".into(), "rank".into()];
        let (tx, _rx) = mpsc::channel(1);
        let err = RankProcess::spawn(&l, tx).unwrap_err();
        assert!(err.to_string().contains("rank_command"), "{err}");
    }
}
