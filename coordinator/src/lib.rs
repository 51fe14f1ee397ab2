//! loractl's coordinator. Components:
//!
//! - [`store`]: the persistent state behind one versioned key-value interface with
//!   compare-and-swap writes; redb (one local file, default) or etcd v3 (clusters);
//! - [`state`]: typed job and worker records over a store;
//! - [`job`]: the job state machine and failure classification;
//! - [`placement`]: the pure placement function (gang, priority then FIFO, reservations
//!   against starvation);
//! - [`artifacts`]: the content-addressed artifact store on local disk (quota, resumable
//!   verified uploads, keep-latest-N checkpoints);
//! - [`logs`]: job logs on disk, read back after a restart;
//! - [`leader`]: leader election among coordinators sharing one etcd;
//! - [`server`]: the event loop that owns all mutable state, worker liveness, and the gRPC
//!   services in front of it;
//! - [`standalone`]: every default setting, and a coordinator started in this process.

pub mod artifacts;
pub mod error;
pub mod job;
pub mod leader;
pub mod logs;
pub mod placement;
pub mod server;
pub mod standalone;
pub mod state;
pub mod store;

pub use error::{Error, Result};

/// Wall-clock milliseconds since the Unix epoch, for records people read.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
