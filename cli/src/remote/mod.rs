//! The cluster commands: `submit`, `status`, `list`, `watch`, `logs`, `cancel`, `fetch` and
//! `workers` talk to a coordinator over gRPC (`loractl.v1`), with its bearer token and, for an
//! https:// address, the CA that signed its certificate. Replies are checked by the `proto`
//! conversions (nothing read off the network is unwrapped); the coordinator's refusals are
//! shown as the sentence it sent, which names the field or key at fault.

mod fetch;
mod jobs;
mod show;
mod submit;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use loractl_proto::pb::artifact_service_client::ArtifactServiceClient;
use loractl_proto::pb::job_service_client::JobServiceClient;
use loractl_worker::client::{Authed, ClientTls, Link};
use tonic::{Code, Status};

pub use fetch::fetch;
pub use jobs::{cancel, list, logs, status, workers};
pub use submit::{submit, submit_job, SubmitOptions};
pub use watch::watch;

/// Largest reply accepted: a job list carries every job's spec.
const MAX_REPLY_BYTES: usize = 64 << 20;

/// How to reach the coordinator (the global `--coordinator`, `--token`, `--ca` flags).
#[derive(Debug, Clone)]
pub struct Target {
    pub address: String,
    pub token: Option<String>,
    pub ca: Option<PathBuf>,
    pub tls_domain: Option<String>,
}

impl Target {
    /// `host:port` is taken as `http://host:port`.
    fn url(&self) -> String {
        if self.address.contains("://") {
            self.address.clone()
        } else if self.ca.is_some() {
            format!("https://{}", self.address)
        } else {
            format!("http://{}", self.address)
        }
    }
}

/// A connection to the coordinator.
pub struct Remote {
    link: Link,
    address: String,
}

impl Remote {
    pub async fn connect(target: &Target) -> anyhow::Result<Self> {
        let address = target.url();
        let https = address.starts_with("https://");
        let tls = match &target.ca {
            Some(ca) if https => Some(ClientTls {
                ca_pem: std::fs::read(ca)
                    .with_context(|| format!("reading the CA certificate `{}`", ca.display()))?,
                identity: None,
                domain: target.tls_domain.clone(),
            }),
            Some(_) => anyhow::bail!(
                "--ca is set but the coordinator address `{address}` is http://: write https://"
            ),
            None if https => anyhow::bail!(
                "the coordinator `{address}` uses TLS: pass the CA that signed its certificate \
                 with --ca (or LORACTL_CA)"
            ),
            None => None,
        };
        let link = Link::new(&address, target.token.as_deref(), tls)
            .map_err(|e| anyhow::anyhow!("{e} (the token comes from --token or LORACTL_TOKEN)"))?;
        Ok(Self { link, address })
    }

    pub async fn jobs(&self) -> anyhow::Result<JobServiceClient<Authed>> {
        let client = self.link.jobs().await.map_err(|e| self.unreachable(e))?;
        Ok(client.max_decoding_message_size(MAX_REPLY_BYTES))
    }

    pub async fn artifacts(&self) -> anyhow::Result<ArtifactServiceClient<Authed>> {
        self.link.artifacts().await.map_err(|e| self.unreachable(e))
    }

    fn unreachable(&self, e: loractl_worker::Error) -> anyhow::Error {
        match e {
            loractl_worker::Error::Connect { source, .. } => {
                let mut why = source.to_string();
                let mut cause = std::error::Error::source(&source);
                while let Some(c) = cause {
                    why = format!("{why}: {c}");
                    cause = c.source();
                }
                anyhow::anyhow!(
                    "cannot reach the coordinator at {}: {why}. Is it running? Start one with \
                     `loractl up` (or `loractl-coordinator`), or point --coordinator / \
                     LORACTL_COORDINATOR at it",
                    self.address
                )
            }
            other => self.explain(other),
        }
    }

    /// The worker library's error as a sentence for a person.
    fn explain(&self, e: loractl_worker::Error) -> anyhow::Error {
        match e {
            loractl_worker::Error::Rpc { call, status } => refused(call, &status),
            loractl_worker::Error::Connect { .. } => self.unreachable(e),
            other => anyhow::anyhow!("{other}"),
        }
    }
}

/// A refusal of the coordinator as a sentence: its own message (which names the field or key),
/// with what to do where the code says more than the message.
pub fn refused(call: &str, status: &Status) -> anyhow::Error {
    let message = status.message().trim();
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied if message.contains("--token") => {
            anyhow::anyhow!("the coordinator refused the call: {message}")
        }
        Code::Unauthenticated | Code::PermissionDenied => anyhow::anyhow!(
            "the coordinator refused the call: {message}. Give its token with --token or \
             LORACTL_TOKEN"
        ),
        Code::InvalidArgument
        | Code::NotFound
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::ResourceExhausted
        | Code::OutOfRange => anyhow::anyhow!("{message}"),
        Code::Unavailable => anyhow::anyhow!(
            "the coordinator is unavailable ({call}): {message}. If it is restarting, try \
             again in a moment"
        ),
        // What plain HTTP/2 gets from a TLS listener.
        Code::Internal | Code::Unknown
            if message.contains("h2 protocol error") || message.contains("transport error") =>
        {
            anyhow::anyhow!(
            "{call}: the connection to the coordinator broke ({message}); if it serves TLS, use \
             an https:// address and --ca"
            )
        }
        code => anyhow::anyhow!("{call} failed ({code:?}): {message}"),
    }
}

/// Runs a cluster command on a small runtime of its own.
pub fn block_on<F>(future: F) -> anyhow::Result<ExitCode>
where
    F: std::future::Future<Output = anyhow::Result<ExitCode>>,
{
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(future)
}
