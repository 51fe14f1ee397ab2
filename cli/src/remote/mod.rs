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
        Self::new(target)
    }

    /// The link alone; nothing is sent until the first call.
    fn new(target: &Target) -> anyhow::Result<Self> {
        if let Some(problem) = target
            .token
            .as_deref()
            .and_then(loractl_proto::token::problem)
        {
            anyhow::bail!("{problem} (the token comes from --token or LORACTL_TOKEN)");
        }
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

    fn plain_http(&self) -> bool {
        self.address.starts_with("http://")
    }

    /// A failed call as a sentence ([`refused`]). Plain HTTP/2 sent to a TLS listener fails in
    /// whatever way the connection happens to break first (cancelled, reset, unavailable, an
    /// h2 protocol error): on an http:// address every such failure names the likely mistake.
    pub fn refused(&self, call: &str, status: &Status) -> anyhow::Error {
        if self.plain_http() && broken_connection(status) {
            return anyhow::anyhow!(
                "{call}: the connection to the coordinator at {} broke ({:?}: {}). If the \
                 coordinator serves TLS, use an https:// address (--coordinator or \
                 LORACTL_COORDINATOR) with --ca; otherwise check that it is running and try \
                 again",
                self.address,
                status.code(),
                status.message().trim()
            );
        }
        refused(call, status)
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
                // Nothing listens there: TLS is not the problem.
                let refused = io_kinds(&source).contains(&std::io::ErrorKind::ConnectionRefused);
                let tls_hint = if self.plain_http() && !refused {
                    "; if it serves TLS, use an https:// address with --ca"
                } else {
                    ""
                };
                anyhow::anyhow!(
                    "cannot reach the coordinator at {}: {why}. Is it running? Start one with \
                     `loractl up` (or `loractl-coordinator`), or point --coordinator / \
                     LORACTL_COORDINATOR at it{tls_hint}",
                    self.address
                )
            }
            other => self.explain(other),
        }
    }

    /// The worker library's error as a sentence for a person.
    fn explain(&self, e: loractl_worker::Error) -> anyhow::Error {
        match e {
            loractl_worker::Error::Rpc { call, status } => self.refused(call, &status),
            loractl_worker::Error::Connect { .. } => self.unreachable(e),
            other => anyhow::anyhow!("{other}"),
        }
    }
}

/// The I/O error kinds in an error's chain of causes.
fn io_kinds(error: &(dyn std::error::Error + 'static)) -> Vec<std::io::ErrorKind> {
    let mut kinds = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            kinds.push(io.kind());
        }
        next = e.source();
    }
    kinds
}

/// Whether a call failed in the transport (the connection broke) rather than being answered
/// by the coordinator. Transport failures carry their cause (hyper, h2, io) as a source or
/// are a client-side cancellation; an answer of the coordinator carries neither.
fn broken_connection(status: &Status) -> bool {
    let message = status.message().to_ascii_lowercase();
    let transport_words = [
        "h2 protocol error",
        "transport error",
        "connection reset",
        "connection closed",
        "broken pipe",
        "connection error",
        "operation was canceled",
        "stream closed",
        "frame with invalid size",
    ];
    match status.code() {
        Code::Cancelled => true,
        Code::Unavailable | Code::Unknown | Code::Internal => {
            std::error::Error::source(status).is_some()
                || transport_words.iter().any(|w| message.contains(w))
        }
        _ => false,
    }
}

/// A refusal of the coordinator as a sentence: its own message (which names the field or key),
/// with what to do where the code says more than the message.
fn refused(call: &str, status: &Status) -> anyhow::Error {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(address: &str) -> Remote {
        Remote::new(&Target {
            address: address.to_owned(),
            token: None,
            ca: None,
            tls_domain: None,
        })
        .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Every way plain HTTP/2 against a TLS listener has been seen to fail.
    fn broken() -> Vec<Status> {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        vec![
            Status::cancelled("operation was canceled"),
            Status::unknown("h2 protocol error: http2 error"),
            Status::internal("h2 protocol error: frame with invalid size"),
            Status::unavailable("connection reset"),
            Status::unknown("transport error"),
            Status::from_error(Box::new(reset)),
        ]
    }

    #[test]
    fn plain_http_against_tls_is_explained_however_the_connection_breaks() {
        let plain = remote("http://127.0.0.1:7070");
        for status in broken() {
            let text = plain.refused("ListJobs", &status).to_string();
            assert!(
                text.contains("https://") && text.contains("--ca"),
                "{status:?}: {text}"
            );
        }
    }

    #[test]
    fn an_empty_or_placeholder_token_is_refused_before_any_call() {
        for token in ["", "change-me"] {
            let err = Remote::new(&Target {
                address: "http://127.0.0.1:7070".into(),
                token: Some(token.into()),
                ca: None,
                tls_domain: None,
            })
            .err()
            .unwrap_or_else(|| panic!("{token:?} accepted"));
            assert!(err.to_string().contains("LORACTL_TOKEN"), "{err}");
        }
    }

    #[test]
    fn answers_of_the_coordinator_keep_their_own_sentence() {
        let plain = remote("http://127.0.0.1:7070");
        let text = plain
            .refused(
                "SubmitJob",
                &Status::invalid_argument("network_dim: must be 1..=1024"),
            )
            .to_string();
        assert_eq!(text, "network_dim: must be 1..=1024");
        let text = plain
            .refused(
                "ListJobs",
                &Status::unavailable("the coordinator is shutting down"),
            )
            .to_string();
        assert!(!text.contains("https://"), "{text}");
        assert!(text.contains("try again"), "{text}");
        // Over TLS already, a broken connection is not about TLS.
        let tls = Remote {
            link: plain.link.clone(),
            address: "https://127.0.0.1:7070".into(),
        };
        let text = tls
            .refused("ListJobs", &Status::cancelled("operation was canceled"))
            .to_string();
        assert!(!text.contains("use an https://"), "{text}");
    }
}
