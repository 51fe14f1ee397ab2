//! loractl's test kit, and its end-to-end tests (in `tests/`). Every crate's integration tests
//! take their harness from here, so each piece is written once:
//!
//! - [`process`]: child processes with a log, polling with a deadline, free ports;
//! - [`etcd`]: a real etcd on loopback;
//! - [`inproc`]: a coordinator in this process (the same [`Standalone`] starter `loractl up`
//!   uses), gRPC clients with a token, submit-and-watch, worker registrations;
//! - [`otlp`]: a real OTLP receiver (metrics and traces) on loopback;
//! - [`prometheus`]: a real Prometheus scraping given ports, queried over its HTTP API;
//! - [`spec`]: minimal job specs;
//! - [`cluster`]: the real binaries as a cluster, driven through the `loractl` CLI;
//! - [`deploy`]: reading the files of `deploy/`.
//!
//! Waiting is polling with a deadline or awaiting an event, never a fixed sleep standing in
//! for an event.
//!
//! [`Standalone`]: loractl_coordinator::standalone::Standalone

pub mod cluster;
pub mod deploy;
pub mod etcd;
pub mod inproc;
pub mod otlp;
pub mod process;
pub mod prometheus;
pub mod spec;

pub use cluster::*;
pub use etcd::Etcd;
pub use process::{free_port, poll, process_ended, Proc, DEADLINE};
