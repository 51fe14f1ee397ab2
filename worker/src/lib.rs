//! loractl's worker daemon. Components:
//!
//! - [`config`]: the worker's TOML config (coordinator, pinned GPUs, folders, rank command);
//! - [`gpu`]: GPU discovery through NVML loaded at run time, CPU-only without it;
//! - [`rank`]: one child process per rank, in its own process group, with exactly its GPUs;
//! - [`paths`]: a job's input paths confined to the worker's model and data folders;
//! - [`protocol`]: what a rank prints for progress and artifacts;
//! - [`client`]: the coordinator connection with its token, artifact upload and download;
//! - [`dataset`]: datasets uploaded by `loractl submit` (a manifest of files by sha256),
//!   built into folders in the cache;
//! - [`inputs`]: the spec a rank reads: uploaded datasets resolved, then [`paths`];
//! - [`daemon`]: the session loop tying them together.

pub mod client;
pub mod config;
pub mod daemon;
pub mod dataset;
mod error;
pub mod gpu;
pub mod inputs;
pub mod paths;
pub mod protocol;
pub mod rank;

pub use error::{ConfigProblem, Error, Result};
