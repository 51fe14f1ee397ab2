//! A real etcd on loopback, for the etcd store, leader election and cluster tests.

use std::process::Command;

use loractl_coordinator::leader::{campaign, Leadership};
use loractl_coordinator::store::EtcdStore;

use crate::process::{free_port, poll, Proc, DEADLINE};

/// An etcd server on 127.0.0.1 with a data folder of its own; killed when dropped.
pub struct Etcd {
    proc: Proc,
    _dir: tempfile::TempDir,
    pub endpoint: String,
}

impl Etcd {
    /// Starts `etcd` (or `LORACTL_ETCD`) and waits until it serves clients; `None` with
    /// `LORACTL_SKIP_ETCD=1`. A missing binary fails with how to install it: an etcd test must
    /// not pass without etcd.
    pub fn start() -> Option<Self> {
        if std::env::var("LORACTL_SKIP_ETCD").as_deref() == Ok("1") {
            eprintln!("LORACTL_SKIP_ETCD=1: skipping the etcd tests");
            return None;
        }
        let binary = std::env::var("LORACTL_ETCD").unwrap_or_else(|_| "etcd".to_owned());
        let dir = tempfile::tempdir().expect("a folder for etcd");
        let client = format!("http://127.0.0.1:{}", free_port());
        let peer = format!("http://127.0.0.1:{}", free_port());
        let mut command = Command::new(&binary);
        command
            .args(["--name", "test", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")]);
        let log = dir.path().join("etcd.log");
        let mut proc = match Proc::spawn("etcd", command, log.clone()) {
            Ok(proc) => proc,
            Err(e) => panic!(
                "cannot start `{binary}` ({e:#}): install etcd (`apt-get install -y etcd-server`) \
                 or point LORACTL_ETCD at it; LORACTL_SKIP_ETCD=1 skips the etcd tests"
            ),
        };
        poll("etcd to serve clients", DEADLINE, || {
            assert!(proc.exited().is_none(), "etcd exited:\n{}", proc.log_tail());
            std::fs::read_to_string(&log)
                .ok()
                .filter(|t| t.contains("ready to serve client requests"))
        });
        Some(Self {
            proc,
            _dir: dir,
            endpoint: client,
        })
    }

    /// A store under `prefix` and the leadership of election `{prefix}leader`, won at once
    /// (nobody else campaigns there): the pieces of a fenced store.
    pub async fn store_and_leadership(&self, prefix: &str) -> (EtcdStore, Leadership) {
        let store = EtcdStore::connect(std::slice::from_ref(&self.endpoint), prefix)
            .await
            .expect("connecting to etcd");
        let leadership = campaign(
            store.client(),
            &format!("{prefix}leader"),
            "127.0.0.1:1",
            std::time::Duration::from_secs(10),
        )
        .await
        .expect("winning an uncontested election");
        (store, leadership)
    }

    pub fn log_tail(&self) -> String {
        self.proc.log_tail()
    }
}
