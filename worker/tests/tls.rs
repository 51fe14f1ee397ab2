//! TLS between workers, clients and the coordinator: the coordinator serves TLS only; workers
//! must present a certificate signed by the coordinator's client CA (mutual TLS); clients
//! such as the CLI need only the CA and the token.

use std::path::{Path, PathBuf};

use loractl_coordinator::server::TlsFiles;
use loractl_proto::domain::JobState;
use loractl_proto::pb;
use loractl_tests::inproc::{registration, submit, watch_until, Coordinator, Worker};
use loractl_tests::spec::{job_spec, resources};
use loractl_worker::client::{ClientTls, Link};
use loractl_worker::config::WorkerConfig;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

const TOKEN: &str = "tls-test-token";

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
    server: Coordinator,
    ca_pem: String,
    worker_ca: Ca,
}

async fn coordinator() -> Setup {
    let server_ca = ca("loractl test server CA");
    let worker_ca = ca("loractl test worker CA");
    let (cert, key) = leaf(&server_ca, "localhost");
    let server = Coordinator::start_with(Some(TOKEN), |dir, config| {
        config.tls = Some(TlsFiles {
            cert: write(dir, "server.pem", &cert),
            key: write(dir, "server.key", &key),
            client_ca: Some(write(dir, "workers-ca.pem", &worker_ca.pem)),
        });
    })
    .await;
    Setup {
        server,
        ca_pem: server_ca.pem,
        worker_ca,
    }
}

fn client_tls(setup: &Setup, identity: Option<(String, String)>) -> ClientTls {
    ClientTls {
        ca_pem: setup.ca_pem.clone().into_bytes(),
        identity: identity.map(|(c, k)| (c.into_bytes(), k.into_bytes())),
        domain: Some("localhost".to_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_certificate_runs_a_job_submitted_by_a_token_client() {
    let setup = coordinator().await;
    let (cert, key) = leaf(&setup.worker_ca, "box");
    let dir = setup.server.dir.path();
    let config = WorkerConfig {
        tls_ca: Some(write(dir, "ca.pem", &setup.ca_pem)),
        tls_cert: Some(write(dir, "box.pem", &cert)),
        tls_key: Some(write(dir, "box.key", &key)),
        tls_domain: Some("localhost".into()),
        ..Worker::config(
            dir,
            &setup.server.url,
            "box",
            "sd15.safetensors",
            "echo ran over TLS",
        )
    };
    let _worker = Worker::start(config, Some(TOKEN));

    // The CLI side: the CA and the token, no certificate.
    let link = Link::new(
        &setup.server.url,
        Some(TOKEN),
        Some(client_tls(&setup, None)),
    )
    .unwrap();
    let mut jobs = link.jobs().await.unwrap();
    let job = submit(
        &mut jobs,
        &job_spec("tls", "sd15.safetensors", &resources("cpu", 0)),
    )
    .await;
    let (done, _) = watch_until(&mut jobs, job.id.as_str(), |j| j.state.is_terminal()).await;
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.last_failure);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_without_a_valid_certificate_are_refused() {
    let setup = coordinator().await;

    // TLS and the token, but no client certificate: refused by the worker service only.
    let link = Link::new(
        &setup.server.url,
        Some(TOKEN),
        Some(client_tls(&setup, None)),
    )
    .unwrap();
    let err = link
        .workers()
        .await
        .unwrap()
        .register(pb::RegisterRequest::from(registration("box", &[])))
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
        &setup.server.url,
        Some(TOKEN),
        Some(client_tls(&setup, identity)),
    )
    .unwrap()
    .workers()
    .await
    {
        Err(_) => true,
        Ok(mut workers) => workers
            .register(pb::RegisterRequest::from(registration("box", &[])))
            .await
            .is_err(),
    };
    assert!(refused, "a foreign client certificate must be refused");

    // Plain HTTP/2 to a TLS port fails.
    let plain = setup.server.url.replace("https://", "http://");
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
