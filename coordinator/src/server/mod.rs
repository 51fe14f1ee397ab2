//! The coordinator as a gRPC server: [`serve`] starts the event loop ([`actor`]) on a store,
//! opens the artifact store and serves JobService, WorkerService and ArtifactService on a
//! listener until `shutdown` resolves.

pub mod actor;
pub mod auth;
pub mod grpc;
pub mod metrics;
pub mod registry;
pub mod traces;

use std::future::Future;

use loractl_proto::pb;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

pub use self::actor::{CoordinatorConfig, Handle};
use self::auth::BearerAuth;
use crate::artifacts::{ArtifactConfig, ArtifactStore};
use crate::error::{Error, Result};
use crate::store::{AnyStore, Store};

/// Largest gRPC message accepted (upload chunks are 1 MiB; specs are small).
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// PEM files of the coordinator's TLS identity. With `client_ca`, workers must present a
/// certificate signed by it (mutual TLS), for their sessions and for uploading job outputs;
/// clients such as the CLI need only the token.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub coordinator: CoordinatorConfig,
    pub artifacts: ArtifactConfig,
    /// Bearer token every call must carry; `None` accepts all (development on loopback).
    pub token: Option<String>,
    /// With etcd: how long a dead leader keeps its leadership before a standby takes over.
    pub leader_ttl: std::time::Duration,
    /// Serve TLS only; `None` serves plain HTTP/2 (loopback development).
    pub tls: Option<TlsFiles>,
}

fn read_pem(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

fn tls_config(files: &TlsFiles) -> Result<tonic::transport::ServerTlsConfig> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let identity = Identity::from_pem(read_pem(&files.cert)?, read_pem(&files.key)?);
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &files.client_ca {
        // Optional at the TLS layer so that token-only clients connect; the worker service
        // refuses calls without a verified certificate.
        config = config
            .client_ca_root(Certificate::from_pem(read_pem(ca)?))
            .client_auth_optional(true);
    }
    Ok(config)
}

/// Serves on `listener` until `shutdown` resolves, then stops accepting calls and ends the
/// event loop.
pub async fn serve<S, F>(
    store: S,
    config: ServerConfig,
    listener: TcpListener,
    shutdown: F,
) -> Result<()>
where
    S: Store + Clone,
    F: Future<Output = ()> + Send,
{
    if let Some(problem) = config
        .token
        .as_deref()
        .and_then(loractl_proto::token::problem)
    {
        return Err(Error::BadToken(problem));
    }
    // Certificates first: a wrong path fails before anything starts.
    let tls = config.tls.as_ref().map(tls_config).transpose()?;
    let metrics = config.coordinator.metrics.clone();
    let mut coordinator = config.coordinator;
    if coordinator.log_dir.is_none() {
        coordinator.log_dir = Some(config.artifacts.root.join("logs"));
    }
    let (handle, event_loop) = actor::start(store, coordinator).await?;
    let artifacts = ArtifactStore::open(config.artifacts).await?;
    {
        use loractl_telemetry::names::{self, label};
        metrics.set(
            &names::ARTIFACT_STORED_BYTES,
            artifacts.used_bytes() as f64,
            &[],
        );
        for kind in loractl_proto::domain::ArtifactKind::ALL {
            let kind = [(label::KIND, kind.as_str().to_owned())];
            metrics.add(&names::ARTIFACT_RECEIVED_BYTES_TOTAL, 0, &kind);
            metrics.add(&names::ARTIFACT_SENT_BYTES_TOTAL, 0, &kind);
        }
    }
    let auth = BearerAuth::new(config.token.as_deref());
    let mutual_tls = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    let worker_auth = if mutual_tls {
        auth.clone().with_client_cert()
    } else {
        auth.clone()
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }

    let jobs = pb::job_service_server::JobServiceServer::new(grpc::JobApi {
        handle: handle.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let workers = pb::worker_service_server::WorkerServiceServer::new(grpc::WorkerApi {
        handle: handle.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    // Long-lived streams would hold a graceful shutdown open: end them first.
    let closer = handle.clone();
    let shutdown = async move {
        shutdown.await;
        let _ = closer.close_streams().await;
    };
    let artifact_api = pb::artifact_service_server::ArtifactServiceServer::new(grpc::ArtifactApi {
        store: artifacts,
        handle,
        metrics,
        outputs_need_client_cert: mutual_tls,
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES);

    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "coordinator serving");
    }
    builder
        .add_service(tonic::service::interceptor::InterceptedService::new(
            jobs,
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            workers,
            worker_auth,
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            artifact_api,
            auth,
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    // The services held the last handles; the loop ends once they are dropped.
    let _ = event_loop.await;
    Ok(())
}

/// Refuses to serve on an address other machines can reach without a token, unless
/// `insecure` says so explicitly: anyone who can connect could run jobs and read artifacts.
/// `listen` is resolved as the listener will be; an unresolvable one is left to `bind`.
pub fn check_exposure(listen: &str, token: Option<&str>, insecure: bool) -> Result<()> {
    use std::net::ToSocketAddrs;
    let exposed = listen
        .to_socket_addrs()
        .map(|mut addrs| addrs.any(|a| !a.ip().is_loopback()))
        .unwrap_or(false);
    if exposed && token.is_none() && !insecure {
        return Err(Error::Exposed(listen.to_owned()));
    }
    Ok(())
}

/// Runs a coordinator on `listen` until `shutdown` resolves. With an etcd store it first wins
/// the leader election (standbys wait without listening), stops serving if it loses the
/// leadership, and resigns on shutdown. `ready` learns the address once it serves.
pub async fn run<F>(
    store: AnyStore,
    config: ServerConfig,
    listen: &str,
    shutdown: F,
    ready: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
) -> Result<()>
where
    F: Future<Output = ()> + Send,
{
    let bind = || async {
        TcpListener::bind(listen)
            .await
            .map_err(|source| Error::Listen {
                address: listen.to_owned(),
                source,
            })
    };
    let announce = |listener: &TcpListener, ready: Option<tokio::sync::oneshot::Sender<_>>| {
        if let (Some(ready), Ok(addr)) = (ready, listener.local_addr()) {
            let _ = ready.send(addr);
        }
    };
    tokio::pin!(shutdown);
    let etcd = match &store {
        AnyStore::Etcd(etcd) => Some((etcd.client().clone(), format!("{}leader", etcd.prefix()))),
        AnyStore::Redb(_) => None,
    };
    let Some((client, election)) = etcd else {
        let listener = bind().await?;
        announce(&listener, ready);
        return serve(store, config, listener, shutdown).await;
    };
    let campaign = crate::leader::campaign(&client, &election, listen, config.leader_ttl);
    let mut leadership = tokio::select! {
        leadership = campaign => leadership?,
        _ = &mut shutdown => return Ok(()),
    };
    let store = match (store, leadership.fence()) {
        (AnyStore::Etcd(etcd), Some((key, revision))) => {
            AnyStore::Etcd(Box::new(etcd.fenced(key, revision)))
        }
        (store, _) => store,
    };
    let listener = bind().await?;
    announce(&listener, ready);
    let mut lost = false;
    let stop = async {
        tokio::select! {
            _ = &mut shutdown => {}
            _ = leadership.lost() => lost = true,
        }
    };
    let served = serve(store, config, listener, stop).await;
    leadership.resign().await;
    served?;
    if lost {
        return Err(Error::Election(
            "leadership lost (lease not renewed): stopped serving; restart to campaign again"
                .into(),
        ));
    }
    Ok(())
}
