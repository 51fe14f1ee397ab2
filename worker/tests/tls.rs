//! TLS between workers, clients and the coordinator: the coordinator serves TLS only; workers
//! must present a certificate signed by the coordinator's client CA (mutual TLS); clients
//! such as the CLI need only the CA and the token.

use std::path::{Path, PathBuf};
use std::time::Duration;

use loractl_coordinator::artifacts::ArtifactConfig;
use loractl_coordinator::server::{self, CoordinatorConfig, ServerConfig, TlsFiles};
use loractl_coordinator::store::RedbStore;
use loractl_proto::domain::{Job, JobEvent, JobState};
use loractl_proto::pb;
use loractl_worker::client::{ClientTls, Link};
use loractl_worker::config::WorkerConfig;
use loractl_worker::daemon::Daemon;
use loractl_worker::gpu;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::sync::oneshot;
use tokio_stream::StreamExt;

const TOKEN: &str = "tls-test-token";
const WAIT: Duration = Duration::from_secs(30);

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// A certificate for `name` signed by `ca`: (cert PEM, key PEM).
fn leaf(ca: &Ca, name: &str) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

struct Setup {
    dir: tempfile::TempDir,
    address: String,
    ca_pem: String,
    worker_ca: Ca,
    _stop: oneshot::Sender<()>,
}

async fn coordinator() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = ca("loractl test server CA");
    let worker_ca = ca("loractl test worker CA");
    let (cert, key) = leaf(&server_ca, "localhost");
    let tls = TlsFiles {
        cert: write(dir.path(), "server.pem", &cert),
        key: write(dir.path(), "server.key", &key),
        client_ca: Some(write(dir.path(), "workers-ca.pem", &worker_ca.pem)),
    };
    let store = RedbStore::open(dir.path().join("state.redb")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ServerConfig {
        coordinator: CoordinatorConfig::default(),
        artifacts: ArtifactConfig {
            root: dir.path().join("artifacts"),
            quota_bytes: 1 << 20,
            max_artifact_bytes: 1 << 20,
            keep_checkpoints: 1,
        },
        token: Some(TOKEN.to_owned()),
        leader_ttl: Duration::from_secs(10),
        tls: Some(tls),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server::serve(store, config, listener, async {
        let _ = stopped.await;
    }));
    Setup {
        address: format!("https://127.0.0.1:{}", addr.port()),
        ca_pem: server_ca.pem,
        worker_ca,
        dir,
        _stop: stop,
    }
}

fn client_tls(setup: &Setup, identity: Option<(String, String)>) -> ClientTls {
    ClientTls {
        ca_pem: setup.ca_pem.clone().into_bytes(),
        identity: identity.map(|(c, k)| (c.into_bytes(), k.into_bytes())),
        domain: Some("localhost".to_owned()),
    }
}

fn registration() -> pb::RegisterRequest {
    pb::RegisterRequest {
        protocol_version: loractl_proto::WORKER_PROTOCOL_VERSION,
        name: "box".into(),
        gpus: vec![],
        labels: Default::default(),
    }
}

const SPEC: &str = r#"
name = "tls"
[model]
pretrained_model_name_or_path = "sd15.safetensors"
[dataset]
train_data_dir = "train"
resolution = "512"
[training]
max_train_epochs = 1
[resources]
gpus = "cpu"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_certificate_runs_a_job_submitted_by_a_token_client() {
    let setup = coordinator().await;
    let (cert, key) = leaf(&setup.worker_ca, "box");
    let models = setup.dir.path().join("models");
    let data = setup.dir.path().join("data");
    std::fs::create_dir_all(data.join("train")).unwrap();
    std::fs::create_dir_all(&models).unwrap();
    std::fs::write(models.join("sd15.safetensors"), b"weights").unwrap();
    let config = WorkerConfig {
        model_dirs: vec![models],
        data_dirs: vec![data],
        coordinator: setup.address.clone(),
        name: Some("box".into()),
        gpus: "cpu".into(),
        tls_ca: Some(write(setup.dir.path(), "ca.pem", &setup.ca_pem)),
        tls_cert: Some(write(setup.dir.path(), "box.pem", &cert)),
        tls_key: Some(write(setup.dir.path(), "box.key", &key)),
        tls_domain: Some("localhost".into()),
        work_dir: setup.dir.path().join("work"),
        cache_dir: setup.dir.path().join("cache"),
        rank_command: vec!["/bin/sh".into(), "-c".into(), "echo ran over TLS".into()],
        ..WorkerConfig::default()
    };
    config.validate().unwrap();
    let gpus = gpu::discover(&config.gpu_selection(), 0).unwrap();
    let tls = config.client_tls().unwrap();
    let daemon = Daemon::new(config, gpus, Some(TOKEN.to_owned()), tls).unwrap();
    let (_stop_worker, stopped) = oneshot::channel::<()>();
    tokio::spawn(daemon.run(async {
        let _ = stopped.await;
    }));

    // The CLI side: the CA and the token, no certificate.
    let link = Link::new(&setup.address, Some(TOKEN), Some(client_tls(&setup, None))).unwrap();
    let mut jobs = link.jobs().await.unwrap();
    let job = jobs
        .submit_job(pb::SubmitJobRequest {
            spec_toml: SPEC.to_owned(),
            priority: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let mut watch = jobs
        .watch_job(pb::WatchJobRequest { job_id: job.id })
        .await
        .unwrap()
        .into_inner();
    let last = tokio::time::timeout(WAIT, async {
        let mut last = None;
        while let Some(event) = watch.next().await {
            if let JobEvent::State(j) = JobEvent::try_from(event.unwrap()).unwrap() {
                last = Some(j);
            }
        }
        last
    })
    .await
    .expect("the job ends")
    .map(|j: Job| j.state);
    assert_eq!(last, Some(JobState::Succeeded));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_without_a_valid_certificate_are_refused() {
    let setup = coordinator().await;

    // TLS and the token, but no client certificate: refused by the worker service only.
    let link = Link::new(&setup.address, Some(TOKEN), Some(client_tls(&setup, None))).unwrap();
    let err = link
        .workers()
        .await
        .unwrap()
        .register(registration())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(
        err.message().contains("client certificate"),
        "{}",
        err.message()
    );
    let listed = link
        .jobs()
        .await
        .unwrap()
        .list_jobs(pb::ListJobsRequest::default())
        .await;
    assert!(listed.is_ok(), "token clients need no certificate");

    // A certificate from another CA does not get through the handshake.
    let rogue = ca("someone else");
    let identity = Some(leaf(&rogue, "box"));
    let refused = match Link::new(
        &setup.address,
        Some(TOKEN),
        Some(client_tls(&setup, identity)),
    )
    .unwrap()
    .workers()
    .await
    {
        Err(_) => true,
        Ok(mut workers) => workers.register(registration()).await.is_err(),
    };
    assert!(refused, "a foreign client certificate must be refused");

    // Plain HTTP/2 to a TLS port fails.
    let plain = setup.address.replace("https://", "http://");
    let refused = match Link::new(&plain, Some(TOKEN), None).unwrap().jobs().await {
        Err(_) => true,
        Ok(mut jobs) => jobs
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .is_err(),
    };
    assert!(refused, "plain text must not reach a TLS coordinator");
}

#[test]
fn https_without_a_ca_is_a_config_error() {
    let config = WorkerConfig {
        coordinator: "https://coordinator:7070".into(),
        tls_cert: Some("w.pem".into()),
        ..WorkerConfig::default()
    };
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("`tls_ca`: missing"), "{err}");
    assert!(
        err.contains("`tls_cert`: tls_cert and tls_key go together"),
        "{err}"
    );
}
