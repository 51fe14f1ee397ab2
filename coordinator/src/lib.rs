//! loractl's coordinator. Components:
//!
//! - [`store`]: the persistent state behind one versioned key-value interface with
//!   compare-and-swap writes; redb (one local file, default) or etcd v3 (clusters);
//! - [`state`]: typed job and worker records over a store;
//! - [`job`]: the job state machine and failure classification;
//! - [`placement`]: the pure placement function (gang, priority then FIFO, reservations
//!   against starvation).

pub mod error;
pub mod job;
pub mod placement;
pub mod state;
pub mod store;

pub use error::{Error, Result};
