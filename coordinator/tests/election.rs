//! Two coordinators on one etcd: one leads and serves, the other waits; when the leader shuts
//! down or dies, the standby takes over with every job intact.

use std::time::Duration;

use loractl_coordinator::server::ServerConfig;
use loractl_coordinator::standalone::Standalone;
use loractl_coordinator::store::{AnyStore, EtcdStore};
use loractl_tests::inproc::{get_job, submit, within};
use loractl_tests::spec::job_spec;
use loractl_tests::Etcd;
use loractl_worker::client::Link;

/// Starts a coordinator on etcd at `endpoint` under `prefix`; it returns once it leads and
/// serves.
async fn start(
    endpoint: String,
    prefix: String,
    dir: std::path::PathBuf,
) -> loractl_coordinator::Result<Standalone> {
    let store = EtcdStore::connect(&[endpoint], &prefix).await?;
    let config = ServerConfig {
        leader_ttl: Duration::from_secs(2),
        ..ServerConfig::new(dir)
    };
    Standalone::start(AnyStore::Etcd(Box::new(store)), config, "127.0.0.1:0").await
}

async fn submit_and_check_takeover(kill: bool) {
    let Some(etcd) = Etcd::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("/election-{kill}/");
    let first = within(
        "the first coordinator's election",
        start(
            etcd.endpoint.clone(),
            prefix.clone(),
            dir.path().join("first"),
        ),
    )
    .await
    .unwrap();
    let second = tokio::spawn(start(
        etcd.endpoint.clone(),
        prefix.clone(),
        dir.path().join("second"),
    ));

    let mut jobs = Link::new(&first.url(), None, None)
        .unwrap()
        .jobs()
        .await
        .unwrap();
    let submitted = submit(&mut jobs, &job_spec("ha", "/models/sd15.safetensors", "")).await;
    assert!(
        !second.is_finished(),
        "the standby does not serve while the leader holds the lease"
    );

    if kill {
        // Like kill -9: no resignation; the lease runs out.
        first.abort();
    } else {
        first.stop(WAIT).await.unwrap();
    }
    let second = within("the standby taking over", second)
        .await
        .unwrap()
        .unwrap();
    let mut jobs = Link::new(&second.url(), None, None)
        .unwrap()
        .jobs()
        .await
        .unwrap();
    let found = get_job(&mut jobs, submitted.id.as_str()).await;
    assert_eq!(found.name, "ha");
    assert_eq!(found.sequence, submitted.sequence);
    second.stop(WAIT).await.unwrap();
}

const WAIT: Duration = loractl_tests::inproc::WAIT;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_leader_shuts_down() {
    submit_and_check_takeover(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_leader_dies() {
    submit_and_check_takeover(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_cannot_write() {
    use loractl_coordinator::store::{Expect, Store};
    let Some(etcd) = Etcd::start() else {
        return;
    };
    let (store, leadership) = etcd.store_and_leadership("/fence/").await;
    let (key, revision) = leadership.fence().unwrap();
    let fenced = store.fenced(key, revision);
    let version = fenced
        .put("jobs/j1", b"a".to_vec(), Expect::Absent)
        .await
        .unwrap();
    // A conflict while leading is still a conflict.
    let conflict = fenced
        .put("jobs/j1", b"b".to_vec(), Expect::Absent)
        .await
        .unwrap_err();
    assert!(conflict.is_conflict(), "{conflict}");
    leadership.resign().await;
    let err = fenced
        .put("jobs/j1", b"c".to_vec(), Expect::Version(version))
        .await
        .unwrap_err();
    assert!(
        matches!(err, loractl_coordinator::Error::NotLeader),
        "{err}"
    );
    assert_eq!(store.get("jobs/j1").await.unwrap().unwrap().value, b"a");
}
