//! The coordinator as a gRPC server: [`serve`] starts the event loop ([`actor`]) on a store,
//! opens the artifact store and serves JobService, WorkerService and ArtifactService on a
//! listener until `shutdown` resolves.

pub mod actor;
pub mod auth;
pub mod grpc;
pub mod registry;

use std::future::Future;

use loractl_proto::pb;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

pub use self::actor::{CoordinatorConfig, Handle};
use self::auth::BearerAuth;
use crate::artifacts::{ArtifactConfig, ArtifactStore};
use crate::error::Result;
use crate::store::Store;

/// Largest gRPC message accepted (upload chunks are 1 MiB; specs are small).
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub coordinator: CoordinatorConfig,
    pub artifacts: ArtifactConfig,
    /// Bearer token every call must carry; `None` accepts all (development on loopback).
    pub token: Option<String>,
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
    let (handle, event_loop) = actor::start(store, config.coordinator).await?;
    let artifacts = ArtifactStore::open(config.artifacts).await?;
    let auth = BearerAuth::new(config.token.as_deref());

    let jobs = pb::job_service_server::JobServiceServer::new(grpc::JobApi {
        handle: handle.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let workers = pb::worker_service_server::WorkerServiceServer::new(grpc::WorkerApi {
        handle: handle.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let artifact_api = pb::artifact_service_server::ArtifactServiceServer::new(grpc::ArtifactApi {
        store: artifacts,
        handle,
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES);

    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "coordinator serving");
    }
    tonic::transport::Server::builder()
        .add_service(tonic::service::interceptor::InterceptedService::new(
            jobs,
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            workers,
            auth.clone(),
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
