//! One rank of a job as a child process in a process group of its own, so that a stop, a
//! timeout or the worker's own death takes down everything the rank started: no orphan keeps
//! a GPU.
//!
//! The rank command (config `rank_command`) runs with:
//! - `CUDA_VISIBLE_DEVICES`: exactly the pinned GPU indices (empty for CPU ranks, hiding all
//!   GPUs) and `CUDA_DEVICE_ORDER=PCI_BUS_ID`, so CUDA numbers GPUs as NVML does;
//! - `LORACTL_JOB_ID`, `LORACTL_ATTEMPT`, `LORACTL_RANK`, `LORACTL_WORLD_SIZE`;
//! - `LORACTL_SPEC` (the job spec file), `LORACTL_OUTPUT_DIR` (where it writes),
//!   `LORACTL_RESUME` (checkpoint file to resume from, when there is one),
//!   `LORACTL_MODEL_DIRS` and `LORACTL_DATA_DIRS` (`:`-separated; the rank opens data files
//!   only inside the latter).
//!
//! It reports on stdout and reads rendezvous answers on stdin as [`crate::protocol`] says,
//! and exits 0 on success,
//! [`loractl_proto::domain::EXIT_BAD_CONFIG`] when the job cannot run as written, anything
//! else on a training error.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use loractl_proto::domain::{Assignment, FailureKind, LogStream, RunningRank};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::protocol::{self, ChildMessage, Line};

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
}

/// How a rank process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl Exit {
    /// `None` on success.
    pub fn failure_kind(self) -> Option<FailureKind> {
        FailureKind::from_exit(self.code, self.signal)
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
    pub id: RunningRank,
    pgid: i32,
    exited: tokio::sync::watch::Receiver<bool>,
    /// Lines for the rank's stdin.
    input: mpsc::Sender<String>,
}

fn signal_group(pgid: i32, signal: i32) {
    // SAFETY: killpg has no memory-safety preconditions; a group that is already gone
    // (ESRCH) is the expected outcome after the rank exits.
    unsafe {
        libc::killpg(pgid, signal);
    }
}

impl RankProcess {
    /// Starts the rank; its events arrive on `events`, tagged with its id.
    pub fn spawn(
        launch: &Launch,
        events: mpsc::Sender<(RunningRank, RankEvent)>,
    ) -> Result<RankProcess> {
        let a = &launch.assignment;
        let id = RunningRank {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            rank: a.rank,
        };
        let program = launch.command.first().cloned().unwrap_or_default();
        let mut command = tokio::process::Command::new(&program);
        command
            .args(launch.command.iter().skip(1))
            .current_dir(&launch.output_dir)
            .env("CUDA_VISIBLE_DEVICES", join(&a.gpu_indices))
            .env("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
            .env("LORACTL_JOB_ID", a.job_id.as_str())
            .env("LORACTL_ATTEMPT", a.attempt.to_string())
            .env("LORACTL_RANK", a.rank.to_string())
            .env("LORACTL_WORLD_SIZE", a.world_size.to_string())
            .env("LORACTL_SPEC", &launch.spec_path)
            .env("LORACTL_OUTPUT_DIR", &launch.output_dir)
            .env("LORACTL_MODEL_DIRS", join_paths(&launch.model_dirs))
            .env("LORACTL_DATA_DIRS", join_paths(&launch.data_dirs))
            .env_remove("LORACTL_RESUME")
            .env_remove("LORACTL_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(resume) = &launch.resume {
            command.env("LORACTL_RESUME", resume);
        }
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
        let pgid = child.id().map(|pid| pid as i32).unwrap_or(0);
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
        tokio::spawn(async move {
            let status = child.wait().await;
            // Whatever the rank left behind in its group goes with it.
            signal_group(pgid, libc::SIGKILL);
            let _ = stdout_task.await;
            let _ = stderr_task.await;
            let exit = match status {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    Exit {
                        code: status.code(),
                        signal: status.signal(),
                    }
                }
                Err(_) => Exit {
                    code: None,
                    signal: None,
                },
            };
            let _ = exited_tx.send(true);
            let _ = events.send((wait_id, RankEvent::Exited(exit))).await;
        });
        Ok(RankProcess {
            id,
            pgid,
            exited,
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
        signal_group(self.pgid, libc::SIGTERM);
        let pgid = self.pgid;
        let mut exited = self.exited.clone();
        tokio::spawn(async move {
            let ended = tokio::time::timeout(grace, exited.wait_for(|e| *e)).await;
            if ended.is_err() {
                signal_group(pgid, libc::SIGKILL);
            }
        });
    }

    /// SIGKILL to the whole group now.
    pub fn kill(&self) {
        if !self.has_exited() {
            signal_group(self.pgid, libc::SIGKILL);
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

fn join_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

/// Folder of one attempt of one rank under `work_dir`: `<job>/attempt-<n>/rank-<r>`.
pub fn attempt_dir(work_dir: &Path, rank: &RunningRank) -> PathBuf {
    work_dir
        .join(rank.job_id.as_str())
        .join(format!("attempt-{}", rank.attempt))
        .join(format!("rank-{}", rank.rank))
}

#[cfg(test)]
mod tests {
    use super::*;
    use loractl_proto::domain::JobId;

    fn launch(dir: &Path, script: &str, gpus: Vec<u32>) -> Launch {
        Launch {
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            assignment: Assignment {
                job_id: JobId::new("j7"),
                attempt: 2,
                rank: 1,
                world_size: 2,
                gpu_indices: gpus,
                spec_toml: "name = \"x\"".into(),
                resume_checkpoint: None,
            },
            spec_path: dir.join("spec.toml"),
            output_dir: dir.to_owned(),
            resume: Some(dir.join("resume.ckpt")),
            model_dirs: vec!["/models".into(), "/more".into()],
            data_dirs: vec!["/data".into()],
        }
    }

    async fn collect(mut rx: mpsc::Receiver<(RunningRank, RankEvent)>) -> (Vec<RankEvent>, Exit) {
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
echo "job=$LORACTL_JOB_ID attempt=$LORACTL_ATTEMPT rank=$LORACTL_RANK/$LORACTL_WORLD_SIZE"
echo "models=$LORACTL_MODEL_DIRS data=$LORACTL_DATA_DIRS resume=$(basename $LORACTL_RESUME) token=${LORACTL_TOKEN:-none}"
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
            lines.contains(&"job=j7 attempt=2 rank=1/2".to_owned()),
            "{lines:?}"
        );
        assert!(
            lines.contains(
                &"models=/models:/more data=/data resume=resume.ckpt token=none".to_owned()
            ),
            "{lines:?}"
        );
        assert!(events.contains(&RankEvent::Log {
            stream: LogStream::Stderr,
            text: "oops".into()
        }));
        assert!(events.iter().any(|e| matches!(
            e,
            RankEvent::Message(ChildMessage::Progress { step: 4, .. })
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

    #[tokio::test]
    async fn exit_codes_and_signals_are_classified() {
        let dir = tempfile::tempdir().unwrap();
        for (script, kind) in [
            ("exit 78", Some(FailureKind::BadConfig)),
            ("exit 1", Some(FailureKind::TrainingError)),
            ("kill -9 $$", Some(FailureKind::Killed)),
            ("true", None),
        ] {
            let (tx, rx) = mpsc::channel(64);
            let _rank = RankProcess::spawn(&launch(dir.path(), script, vec![]), tx).unwrap();
            let (_, exit) = collect(rx).await;
            assert_eq!(exit.failure_kind(), kind, "{script}: {}", exit.describe());
        }
    }

    /// Resolves when process `pid` has ended (its pidfd becomes readable), without polling.
    async fn process_ended(pid: i32) {
        use std::os::fd::{FromRawFd, OwnedFd};
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return; // already reaped
        }
        // SAFETY: the syscall returned a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open and unchanged.
        let fd = unsafe { tokio::io::unix::AsyncFd::register(fd) }
            .map_err(|e| e.to_string())
            .unwrap();
        let _ = fd.readable().await.unwrap();
    }

    fn alive(pid: i32) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        unsafe { libc::kill(pid, 0) == 0 }
    }

    /// Reads the pid a script wrote, waiting on the rank's own output rather than on time.
    async fn pid_from(rx: &mut mpsc::Receiver<(RunningRank, RankEvent)>) -> i32 {
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
        tokio::time::timeout(Duration::from_secs(10), process_ended(grandchild))
            .await
            .unwrap_or_else(|_| panic!("grandchild {grandchild} survived"));
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
