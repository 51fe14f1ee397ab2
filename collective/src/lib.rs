//! Collectives for loractl's data-parallel training: every rank of a job holds a copy of the
//! LoRA and averages its gradients with the others once per optimizer step.
//!
//! [`Collective`] is the one interface the trainer sees: all-reduce (mean) of flat `f32`
//! buffers, broadcast of bytes, barrier. Backends:
//!
//! - [`Single`]: world size 1, every call a no-op (a plain local run);
//! - [`TcpRing`]: a ring over TCP for CPU ranks and tests, all-reduce as ring reduce-scatter
//!   plus all-gather, chunked and pipelined ([`tcp`]);
//! - `Nccl` (with the `cuda` feature): NVIDIA's NCCL between GPU ranks, the host buffers
//!   staged through device memory ([`nccl`]).
//!
//! Buffers are host memory on purpose, and the trait stays object-safe (`Box<dyn Collective>`):
//! the GPU backend implements the same calls on host buffers, so the trainer does not know
//! which backend it has. [`rendezvous`] is what each backend's ranks announce to find each
//! other through the coordinator.
//!
//! Nothing here ever waits forever: each call is bounded by a timeout (no progress from a peer
//! for that long fails it). A TCP ring rank that fails shuts its sockets down so that its
//! neighbours fail at once and, in turn, theirs; an NCCL rank aborts its communicator. After a
//! failure the collective is poisoned.

mod frame;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod rendezvous;
pub mod tcp;

use std::time::Duration;

#[cfg(feature = "cuda")]
pub use nccl::{Nccl, NcclConfig};
pub use rendezvous::{Announcement, NcclId};
pub use tcp::{RingConfig, RingListener, TcpRing};

/// What went wrong in a collective. Each variant that involves a peer names its rank; the NCCL
/// variants, where NCCL does not say which peer failed, name this rank.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid collective setup: {0}")]
    Config(String),
    #[error("binding the collective listener on `{addr}`: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("rank {rank} at `{addr}` could not be reached within {timeout:?}: {source}")]
    Connect {
        rank: usize,
        addr: String,
        timeout: Duration,
        #[source]
        source: std::io::Error,
    },
    #[error("rank {rank} did not connect within {timeout:?}")]
    AcceptTimeout { rank: usize, timeout: Duration },
    #[error("handshake with rank {rank} refused: {reason}")]
    Handshake { rank: usize, reason: String },
    #[error("rank {rank} made no progress for {timeout:?} during {what}")]
    Timeout {
        rank: usize,
        timeout: Duration,
        what: String,
    },
    #[error("rank {rank} closed the connection during {what} (it failed or exited)")]
    PeerClosed { rank: usize, what: String },
    #[error("rank {rank} is out of step: it is in {theirs}, this rank in {ours}")]
    Mismatch {
        rank: usize,
        theirs: String,
        ours: String,
    },
    #[error("connection with rank {rank} failed during {what}: {source}")]
    Io {
        rank: usize,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the collective failed earlier and cannot be used again: {0}")]
    Poisoned(String),
    /// The ranks' rendezvous announcements do not fit together (see [`rendezvous`]).
    #[error("rendezvous: {0}")]
    Rendezvous(String),
    /// A CUDA call of the NCCL backend failed on this rank's own GPU.
    #[error(
        "CUDA failed on rank {rank} during {what}: {reason}; the GPU or its driver is unusable \
         (check `nvidia-smi` on this worker): a retry may run elsewhere"
    )]
    Cuda {
        rank: usize,
        what: String,
        reason: String,
    },
    /// NCCL reported an error; the communicator was aborted.
    #[error(
        "NCCL {what} failed on rank {rank} of {world} after {elapsed:.1?}: {reason}; a peer \
         rank is dead, stuck or mismatched, or this rank's GPU failed (see every rank's log); \
         this rank's communicator is shut down"
    )]
    Nccl {
        rank: usize,
        world: usize,
        what: String,
        elapsed: Duration,
        reason: String,
    },
    /// An NCCL call made no progress within the timeout; the communicator was aborted.
    #[error(
        "NCCL {what} on rank {rank} of {world} did not finish within {timeout:?}: a peer rank \
         is dead, stuck or mismatched (in another call, or with another buffer length); the \
         communicator was aborted. See the other ranks' logs, or raise the collective timeout \
         if a rank is legitimately that slow"
    )]
    NcclTimeout {
        rank: usize,
        world: usize,
        what: String,
        timeout: Duration,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// The collective operations data-parallel training needs, over host buffers.
///
/// Every rank must make the same calls in the same order with buffers of the same length; a
/// rank that does not is reported as out of step ([`Error::Mismatch`]) rather than corrupting
/// the result. After an error the collective is poisoned: later calls fail at once.
pub trait Collective: Send {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world_size(&self) -> usize;
    /// Replaces `buf` on every rank with the element-wise mean over ranks. Every rank ends with
    /// bit-identical values.
    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<()>;
    /// Copies `root`'s `buf` into every other rank's `buf`.
    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<()>;
    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self) -> Result<()>;

    /// [`Collective::broadcast`] of `f32` values (bit patterns preserved).
    fn broadcast_f32(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        let mut bytes: Vec<u8> = buf.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.broadcast(&mut bytes, root)?;
        for (v, b) in buf.iter_mut().zip(bytes.chunks_exact(4)) {
            *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }
}

/// The collective of a run with one rank: nothing to exchange.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_mean(&mut self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&mut self, _buf: &mut [u8], root: usize) -> Result<()> {
        if root != 0 {
            return Err(Error::Config(format!(
                "broadcast from rank {root} in a world of 1 rank"
            )));
        }
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
}

impl<C: Collective + ?Sized> Collective for Box<C> {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<()> {
        (**self).all_reduce_mean(buf)
    }
    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        (**self).broadcast(buf, root)
    }
    fn barrier(&mut self) -> Result<()> {
        (**self).barrier()
    }
    fn broadcast_f32(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        (**self).broadcast_f32(buf, root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_is_a_no_op() {
        let mut c: Box<dyn Collective> = Box::new(Single);
        let mut v = vec![1.0, f32::NAN, 3.0];
        c.all_reduce_mean(&mut v).unwrap();
        assert_eq!(v[0], 1.0);
        assert!(v[1].is_nan());
        c.barrier().unwrap();
        let mut b = vec![1u8, 2];
        c.broadcast(&mut b, 0).unwrap();
        assert!(c.broadcast(&mut b, 1).is_err());
        assert_eq!((c.rank(), c.world_size()), (0, 1));
    }
}
