//! Test helpers: a real etcd on loopback.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// An etcd server on 127.0.0.1 with a temporary data dir, stopped on drop.
pub struct Etcd {
    child: Child,
    _dir: tempfile::TempDir,
    pub endpoint: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Etcd {
    /// Starts etcd, or returns `None` when `LORACTL_SKIP_ETCD=1`. Panics with install
    /// instructions when the `etcd` binary is missing: etcd tests must not pass silently.
    pub fn start() -> Option<Etcd> {
        if std::env::var("LORACTL_SKIP_ETCD").as_deref() == Ok("1") {
            eprintln!("LORACTL_SKIP_ETCD=1: skipping the etcd backend");
            return None;
        }
        let binary = std::env::var("LORACTL_ETCD").unwrap_or_else(|_| "etcd".to_owned());
        let dir = tempfile::tempdir().expect("temp dir for etcd");
        let client = format!("http://127.0.0.1:{}", free_port());
        let peer = format!("http://127.0.0.1:{}", free_port());
        let spawned = Command::new(&binary)
            .args(["--name", "test"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(["--log-level", "info"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "etcd is not installed (`{binary}` not found): install it with \
                 `apt-get install -y etcd-server` (Debian/Ubuntu) or point LORACTL_ETCD at the \
                 binary; set LORACTL_SKIP_ETCD=1 to skip the etcd tests"
            ),
            Err(e) => panic!("cannot start `{binary}`: {e}"),
        };
        // etcd says when it serves clients; wait for that line rather than for a fixed time.
        let stderr = child.stderr.take().expect("piped stderr");
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut ready = Some(ready_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("ready to serve client requests") {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        if ready_rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            panic!("etcd did not become ready within 30 s on {client}");
        }
        Some(Etcd {
            child,
            _dir: dir,
            endpoint: client,
        })
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
