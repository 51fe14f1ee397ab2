//! Two coordinators on one etcd: one leads and serves, the other waits; when the leader shuts
//! down or dies, the standby takes over with every job intact.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use loractl_coordinator::artifacts::ArtifactConfig;
use loractl_coordinator::server::{self, CoordinatorConfig, ServerConfig};
use loractl_coordinator::store::{AnyStore, EtcdStore};
use loractl_proto::pb;
use loractl_proto::pb::job_service_client::JobServiceClient;
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(30);

const SPEC: &str = r#"
name = "ha"
[model]
pretrained_model_name_or_path = "/models/sd15.safetensors"
[dataset]
train_data_dir = "train"
resolution = "512"
[training]
max_train_epochs = 1
"#;

struct Coordinator {
    stop: Option<oneshot::Sender<()>>,
    ready: oneshot::Receiver<SocketAddr>,
    task: tokio::task::JoinHandle<loractl_coordinator::Result<()>>,
}

async fn start(
    etcd: &common::Etcd,
    prefix: &str,
    dir: &std::path::Path,
    name: &str,
) -> Coordinator {
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), prefix)
        .await
        .unwrap();
    let config = ServerConfig {
        coordinator: CoordinatorConfig::default(),
        artifacts: ArtifactConfig {
            root: dir.join(name),
            quota_bytes: 1 << 20,
            max_artifact_bytes: 1 << 20,
            keep_checkpoints: 1,
        },
        token: None,
        tls: None,
        leader_ttl: Duration::from_secs(2),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let (ready_tx, ready) = oneshot::channel();
    let task = tokio::spawn(async move {
        server::run(
            AnyStore::Etcd(Box::new(store)),
            config,
            "127.0.0.1:0",
            async {
                let _ = stopped.await;
            },
            Some(ready_tx),
        )
        .await
    });
    Coordinator {
        stop: Some(stop),
        ready,
        task,
    }
}

async fn client(addr: SocketAddr) -> JobServiceClient<tonic::transport::Channel> {
    JobServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

async fn submit_and_check_takeover(kill: bool) {
    let Some(etcd) = common::Etcd::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("/election-{kill}/");
    let mut first = start(&etcd, &prefix, dir.path(), "first").await;
    let first_addr = tokio::time::timeout(WAIT, &mut first.ready)
        .await
        .expect("the first coordinator is elected")
        .unwrap();
    let mut second = start(&etcd, &prefix, dir.path(), "second").await;

    let mut jobs = client(first_addr).await;
    let submitted = jobs
        .submit_job(pb::SubmitJobRequest {
            spec_toml: SPEC.to_owned(),
            priority: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert!(
        second.ready.try_recv().is_err(),
        "the standby does not serve while the leader holds the lease"
    );

    if kill {
        // Like kill -9: no resignation; the lease runs out.
        first.task.abort();
    } else {
        let _ = first.stop.take().map(|s| s.send(()));
        tokio::time::timeout(WAIT, &mut first.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    let second_addr = tokio::time::timeout(WAIT, &mut second.ready)
        .await
        .expect("the standby takes over")
        .unwrap();
    let mut jobs = client(second_addr).await;
    let found = jobs
        .get_job(pb::GetJobRequest {
            job_id: submitted.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(found.name, "ha");
    assert_eq!(found.sequence, submitted.sequence);
    let _ = second.stop.take().map(|s| s.send(()));
    tokio::time::timeout(WAIT, second.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

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
    let Some(etcd) = common::Etcd::start() else {
        return;
    };
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), "/fence/")
        .await
        .unwrap();
    let leadership = loractl_coordinator::leader::campaign(
        store.client(),
        "/fence/leader",
        "127.0.0.1:1",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
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
