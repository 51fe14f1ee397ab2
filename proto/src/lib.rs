//! loractl's gRPC API, package `loractl.v1`:
//!
//! - [`pb`]: the code generated from `proto/loractl/v1/*.proto` (JobService, WorkerService,
//!   ArtifactService and their messages);
//! - [`domain`]: the types the rest of loractl works with, free of prost's optional fields and
//!   raw enum integers;
//! - [`token`]: what a bearer token may be (not empty, not the shipped placeholder);
//! - [`convert`]: the one place where wire messages become domain types (`TryFrom`, rejecting a
//!   missing or invalid field with `InvalidArgument` naming it) and back (`From`).

pub mod convert;
pub mod domain;
mod error;
pub mod token;

pub use error::{ConvertError, Error, Result};

/// Generated messages, clients (`*_client`) and servers (`*_server`) of `loractl.v1`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("loractl.v1");
}

/// Version of the WorkerService protocol this build speaks; a worker registering with another
/// version is refused.
pub const WORKER_PROTOCOL_VERSION: u32 = 1;
