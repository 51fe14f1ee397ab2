//! Processes and waiting: a child killed on drop with its output in a log file, polling with a
//! deadline, free ports, and waiting for a process to end without polling.

use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// The longest any single wait may take (a whole tiny training included) on a loaded 2-core
/// machine.
pub const DEADLINE: Duration = Duration::from_secs(150);
/// How often polling looks again.
pub const POLL: Duration = Duration::from_millis(100);

/// Polls `check` every 100 ms until it returns a value; panics after `deadline` naming `what`.
pub fn poll<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a free port on 127.0.0.1")
}

/// A child process killed (SIGKILL) when dropped; its output goes to a log file.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut command: Command, log: PathBuf) -> anyhow::Result<Self> {
        let out = std::fs::File::create(&log).with_context(|| log.display().to_string())?;
        let err = out.try_clone()?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    /// `kill -9`, and wait for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The exit code once it exited by itself.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }

    /// The end of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(40);
        format!(
            "--- {} ({}) ---\n{}",
            self.name,
            self.log.display(),
            lines[start..].join("\n")
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Resolves when process `pid` has ended (its pidfd becomes readable), without polling; at
/// once when it is already gone.
pub async fn process_ended(pid: i32) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return;
    }
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open and unchanged.
    let fd = unsafe { tokio::io::unix::AsyncFd::register(fd) }.expect("watching a pidfd");
    let _ = fd.readable().await.expect("waiting on a pidfd");
}

/// The stdout lines of a child process, read on a thread as they come.
pub struct Lines {
    rx: std::sync::mpsc::Receiver<String>,
    reader: Option<std::thread::JoinHandle<()>>,
    /// Every line read so far.
    pub seen: Vec<String>,
}

impl Lines {
    /// Reads `child`'s stdout, which must be piped.
    pub fn of(child: &mut Child) -> Self {
        use std::io::BufRead;
        let stdout = child.stdout.take().expect("the child's stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        Self {
            rx,
            reader: Some(reader),
            seen: Vec::new(),
        }
    }

    /// Reads until a line contains `needle`; false when none did within `deadline` (or the
    /// output ended first).
    pub fn wait_for(&mut self, needle: &str, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        loop {
            match self
                .rx
                .recv_timeout(end.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.seen.push(line);
                    if found {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
    }

    /// Every line, once the output has ended (the process is gone).
    pub fn finish(mut self) -> Vec<String> {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.seen.extend(self.rx.try_iter());
        self.seen
    }
}

/// `binary ARGS --help`: its help text when it accepts `args`, clap's complaint when not.
pub fn help_with(binary: &str, args: &[String]) -> Result<String, String> {
    let out = Command::new(binary)
        .args(args)
        .arg("--help")
        .env_remove("LORACTL_TOKEN")
        .output()
        .unwrap_or_else(|e| panic!("running {binary}: {e}"));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
