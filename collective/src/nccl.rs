//! The NCCL backend for GPU ranks: the [`Collective`] calls on host buffers, staged through a
//! device buffer that is kept between calls, on a CUDA stream of the backend's own.
//!
//! NCCL blocks inside its kernels when a peer never arrives, so the communicator is created
//! non-blocking (`ncclCommInitRankConfig` with `blocking = 0`) and nothing here ever waits in
//! NCCL or CUDA for a peer: after every setup step and collective this rank polls the
//! communicator's asynchronous state (`ncclCommGetAsyncError`) and an event recorded behind the
//! work, sleeping briefly between looks, until it is done, fails, or the timeout passes. Then
//! the communicator is aborted (`ncclCommAbort`, which also stops its kernels), the backend is
//! poisoned, and the error says what was running, for how long, and on which rank.
//!
//! Host copies happen only while the stream is idle (before a collective is queued, after it
//! finished), so a copy to or from pageable memory never waits behind a stuck collective.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{
    CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, DriverError,
};
use cudarc::nccl::sys;

use crate::rendezvous::NcclId;
use crate::{Collective, Error, Result};

/// The default bound on one call, as the TCP ring's: a rank waiting in the gradient
/// all-reduce also waits for the slowest rank's backward pass.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// How long a clean shutdown may take to flush the communicator before it is aborted instead.
const FINALIZE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who this rank is and how long a call may take.
#[derive(Debug, Clone)]
pub struct NcclConfig {
    pub rank: usize,
    pub world_size: usize,
    /// How long one call (setup included) may take before the communicator is aborted.
    pub timeout: Duration,
}

impl NcclConfig {
    pub fn new(rank: usize, world_size: usize) -> NcclConfig {
        NcclConfig {
            rank,
            world_size,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> NcclConfig {
        self.timeout = timeout;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.world_size == 0 || self.rank >= self.world_size {
            return Err(Error::Config(format!(
                "rank {} in a world of {} ranks",
                self.rank, self.world_size
            )));
        }
        if self.world_size > c_int::MAX as usize {
            return Err(Error::Config(format!(
                "a world of {} ranks is more than NCCL counts",
                self.world_size
            )));
        }
        if self.timeout.is_zero() {
            return Err(Error::Config("a timeout of zero".into()));
        }
        Ok(())
    }
}

impl NcclId {
    /// A new communicator id; rank 0 makes it and the rendezvous carries it to the others.
    /// It needs the NCCL library (and a network interface NCCL can use), not a GPU.
    pub fn generate() -> Result<NcclId> {
        let mut id = std::mem::MaybeUninit::<sys::ncclUniqueId>::uninit();
        // SAFETY: ncclGetUniqueId writes a whole ncclUniqueId when it succeeds.
        let code = unsafe { sys::ncclGetUniqueId(id.as_mut_ptr()) };
        if code != sys::ncclResult_t::ncclSuccess {
            return Err(Error::Config(format!(
                "NCCL could not make a communicator id: {}; check that NCCL finds a network \
                 interface (NCCL_SOCKET_IFNAME) and that its library loads (NCCL_DEBUG=INFO \
                 says more)",
                describe(code, std::ptr::null_mut())
            )));
        }
        // SAFETY: initialised by the successful call above.
        let id = unsafe { id.assume_init() };
        Ok(NcclId(id.internal.map(|c| c as u8)))
    }
}

/// One rank of an NCCL communicator on one GPU.
pub struct Nccl {
    rank: usize,
    world: usize,
    link: Link,
    floats: Option<CudaSlice<f32>>,
    bytes: Option<CudaSlice<u8>>,
    /// Why the backend cannot be used any more.
    failed: Option<String>,
}

/// The communicator and the stream its calls run on.
struct Link {
    /// Null once the communicator was aborted.
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    /// Recorded behind each call's work on `stream`, then polled.
    done: CudaEvent,
    timeout: Duration,
}

// SAFETY: the communicator handle is only used through `&mut self`, so by one thread at a
// time, which NCCL allows (a communicator is not tied to a thread); every call first makes
// the GPU's context current on the calling thread. The cudarc members are `Send` themselves.
unsafe impl Send for Nccl {}

/// Why a call stopped, before it becomes an [`Error`].
enum Stop {
    Cuda(&'static str, DriverError),
    Nccl(String),
    TimedOut,
}

impl Nccl {
    /// Joins the communicator `id` as `config.rank` on the GPU of `ctx`. Every rank of the
    /// world must call this with the same id; it returns once all have (or fails at the
    /// timeout, aborting the communicator, when one never does).
    pub fn init(ctx: &Arc<CudaContext>, id: &NcclId, config: NcclConfig) -> Result<Nccl> {
        config.validate()?;
        let rank = config.rank;
        let cuda = |what: &'static str| {
            move |e: DriverError| Error::Cuda {
                rank,
                what: what.into(),
                reason: e.to_string(),
            }
        };
        ctx.bind_to_thread()
            .map_err(cuda("making the GPU's context current"))?;
        let stream = ctx
            .new_stream()
            .map_err(cuda("creating the collective's stream"))?;
        let done = ctx
            .new_event(None)
            .map_err(cuda("creating the collective's event"))?;
        let comm = init_comm(id, &config)?;
        Ok(Nccl {
            rank,
            world: config.world_size,
            link: Link {
                comm,
                stream,
                done,
                timeout: config.timeout,
            },
            floats: None,
            bytes: None,
            failed: None,
        })
    }

    /// Runs one call: refuses it on a poisoned backend, turns a stop into an error naming the
    /// call, and poisons the backend (aborting the communicator) when it fails.
    fn call<T>(
        &mut self,
        what: impl FnOnce() -> String,
        body: impl FnOnce(&mut Nccl, Instant) -> std::result::Result<T, Stop>,
    ) -> Result<T> {
        if let Some(reason) = &self.failed {
            return Err(Error::Poisoned(reason.clone()));
        }
        let started = Instant::now();
        let stop = match body(self, started) {
            Ok(v) => return Ok(v),
            Err(stop) => stop,
        };
        let error = self.error(stop, what(), started);
        self.poison(&error);
        Err(error)
    }

    fn error(&self, stop: Stop, what: String, started: Instant) -> Error {
        match stop {
            Stop::Cuda(step, e) => Error::Cuda {
                rank: self.rank,
                what: format!("{what} ({step})"),
                reason: e.to_string(),
            },
            Stop::Nccl(reason) => Error::Nccl {
                rank: self.rank,
                world: self.world,
                what,
                elapsed: started.elapsed(),
                reason,
            },
            Stop::TimedOut => Error::NcclTimeout {
                rank: self.rank,
                world: self.world,
                what,
                timeout: self.link.timeout,
            },
        }
    }

    /// Aborts the communicator (which stops its kernels) and refuses every later call. The
    /// device buffers are leaked rather than freed: freeing may wait for the device, and the
    /// process is about to report the failure and exit anyway.
    fn poison(&mut self, error: &Error) {
        self.failed = Some(error.to_string());
        if !self.link.comm.is_null() {
            // SAFETY: a communicator from ncclCommInitRankConfig, not yet aborted or
            // destroyed; nulled right after so it is never used again.
            unsafe { sys::ncclCommAbort(self.link.comm) };
            self.link.comm = std::ptr::null_mut();
        }
        std::mem::forget(self.floats.take());
        std::mem::forget(self.bytes.take());
    }

    /// The all-reduce behind [`Collective::all_reduce_mean`] and [`Collective::barrier`].
    fn reduce_mean(&mut self, buf: &mut [f32], what: impl FnOnce() -> String) -> Result<()> {
        let n = buf.len();
        self.call(what, |s, started| {
            // Every rank has the same length, so every rank skips an empty call.
            if n == 0 {
                return Ok(());
            }
            let Nccl { link, floats, .. } = s;
            link.bind()?;
            let stream = link.stream.clone();
            let dev = staging(floats, &stream, n)?;
            let mut view = dev.slice_mut(..n);
            stream
                .memcpy_htod(&*buf, &mut view)
                .map_err(|e| Stop::Cuda("copying to the GPU", e))?;
            {
                let (ptr, _record) = view.device_ptr_mut(&stream);
                link.collective(started, |comm, st| {
                    // SAFETY: `ptr` holds `n` f32 on this communicator's GPU, reduced in
                    // place.
                    unsafe {
                        sys::ncclAllReduce(
                            ptr as *const c_void,
                            ptr as *mut c_void,
                            n,
                            sys::ncclDataType_t::ncclFloat32,
                            sys::ncclRedOp_t::ncclAvg,
                            comm,
                            st,
                        )
                    }
                })?;
            }
            stream
                .memcpy_dtoh(&view, buf)
                .map_err(|e| Stop::Cuda("copying from the GPU", e))?;
            link.wait_stream(started)
        })
    }
}

impl Link {
    fn bind(&self) -> std::result::Result<(), Stop> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| Stop::Cuda("making the GPU's context current", e))
    }

    /// Queues one NCCL call on the stream and waits (polling) until it finished.
    fn collective(
        &self,
        started: Instant,
        call: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> sys::ncclResult_t,
    ) -> std::result::Result<(), Stop> {
        let code = call(self.comm, self.stream.cu_stream() as sys::cudaStream_t);
        match code {
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => {}
            code => return Err(Stop::Nccl(describe(code, self.comm))),
        }
        // A non-blocking communicator may still be queueing the call.
        poll(self.comm, None, started, self.timeout)?;
        self.wait_stream(started)
    }

    /// Waits (polling) until everything queued on the stream so far has run.
    fn wait_stream(&self, started: Instant) -> std::result::Result<(), Stop> {
        self.done
            .record(&self.stream)
            .map_err(|e| Stop::Cuda("recording an event", e))?;
        poll(self.comm, Some(&self.done), started, self.timeout)
    }
}

/// The reusable device buffer of at least `len` elements (grown, never shrunk).
fn staging<'a, T: DeviceRepr>(
    slot: &'a mut Option<CudaSlice<T>>,
    stream: &Arc<CudaStream>,
    len: usize,
) -> std::result::Result<&'a mut CudaSlice<T>, Stop> {
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        // The old buffer first, so the two never need the memory at once.
        *slot = None;
        // SAFETY: the memory is written (host to device) before it is read.
        let fresh = unsafe { stream.alloc::<T>(len) }
            .map_err(|e| Stop::Cuda("allocating the device buffer", e))?;
        return Ok(slot.insert(fresh));
    }
    slot.as_mut()
        .ok_or_else(|| Stop::Nccl("no device buffer after allocating one".into()))
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<()> {
        let n = buf.len();
        self.reduce_mean(buf, || format!("all-reduce of {n} f32"))
    }

    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        if root >= self.world {
            return Err(Error::Config(format!(
                "broadcast from rank {root} in a world of {} ranks",
                self.world
            )));
        }
        let n = buf.len();
        self.call(
            || format!("broadcast of {n} bytes from rank {root}"),
            |s, started| {
                if n == 0 {
                    return Ok(());
                }
                let Nccl {
                    rank, link, bytes, ..
                } = s;
                link.bind()?;
                let stream = link.stream.clone();
                let dev = staging(bytes, &stream, n)?;
                let mut view = dev.slice_mut(..n);
                if *rank == root {
                    stream
                        .memcpy_htod(&*buf, &mut view)
                        .map_err(|e| Stop::Cuda("copying to the GPU", e))?;
                }
                {
                    let (ptr, _record) = view.device_ptr_mut(&stream);
                    link.collective(started, |comm, st| {
                        // SAFETY: `ptr` holds `n` bytes on this communicator's GPU, in place.
                        unsafe {
                            sys::ncclBroadcast(
                                ptr as *const c_void,
                                ptr as *mut c_void,
                                n,
                                sys::ncclDataType_t::ncclUint8,
                                root as c_int,
                                comm,
                                st,
                            )
                        }
                    })?;
                }
                if *rank != root {
                    stream
                        .memcpy_dtoh(&view, buf)
                        .map_err(|e| Stop::Cuda("copying from the GPU", e))?;
                    link.wait_stream(started)?;
                }
                Ok(())
            },
        )
    }

    fn barrier(&mut self) -> Result<()> {
        self.reduce_mean(&mut [0f32], || "barrier".to_string())
    }
}

impl Drop for Nccl {
    /// A clean end flushes the communicator (`ncclCommFinalize`, polled, bounded) and destroys
    /// it; one that does not finish in time is aborted.
    fn drop(&mut self) {
        let comm = self.link.comm;
        if comm.is_null() {
            return;
        }
        let _ = self.link.bind();
        let started = Instant::now();
        // SAFETY: a live communicator, destroyed or aborted below and never used after.
        let code = unsafe { sys::ncclCommFinalize(comm) };
        let flushed = matches!(
            code,
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
        ) && poll(comm, None, started, FINALIZE_TIMEOUT).is_ok();
        // SAFETY: as above.
        unsafe {
            if flushed {
                sys::ncclCommDestroy(comm);
            } else {
                sys::ncclCommAbort(comm);
            }
        }
        self.link.comm = std::ptr::null_mut();
    }
}

/// Creates this rank's communicator, non-blocking, and polls until every rank joined.
/// Separate from [`Nccl::init`] so that its failure without a GPU can be tested.
fn init_comm(id: &NcclId, config: &NcclConfig) -> Result<sys::ncclComm_t> {
    let started = Instant::now();
    let what = "communicator setup";
    let fail = |reason: String| Error::Nccl {
        rank: config.rank,
        world: config.world_size,
        what: what.into(),
        elapsed: started.elapsed(),
        reason,
    };
    let mut nccl_config = non_blocking_config();
    let unique = sys::ncclUniqueId {
        internal: id.0.map(|b| b as c_char),
    };
    let mut comm: sys::ncclComm_t = std::ptr::null_mut();
    // SAFETY: `comm` and `nccl_config` outlive the call; NCCL copies the config.
    let code = unsafe {
        sys::ncclCommInitRankConfig(
            &mut comm,
            config.world_size as c_int,
            unique,
            config.rank as c_int,
            &mut nccl_config,
        )
    };
    let abort = |comm: sys::ncclComm_t| {
        if !comm.is_null() {
            // SAFETY: the communicator NCCL returned, never used again.
            unsafe { sys::ncclCommAbort(comm) };
        }
    };
    match code {
        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => {}
        code => {
            let reason = describe(code, comm);
            abort(comm);
            return Err(fail(reason));
        }
    }
    if comm.is_null() {
        return Err(fail("NCCL returned no communicator".into()));
    }
    match poll(comm, None, started, config.timeout) {
        Ok(()) => Ok(comm),
        Err(stop) => {
            abort(comm);
            Err(match stop {
                Stop::TimedOut => Error::NcclTimeout {
                    rank: config.rank,
                    world: config.world_size,
                    what: format!("{what} (waiting for every rank to join)"),
                    timeout: config.timeout,
                },
                Stop::Nccl(reason) => fail(reason),
                Stop::Cuda(step, e) => fail(format!("{step}: {e}")),
            })
        }
    }
}

/// NCCL's `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: every other setting left undefined
/// (`NCCL_CONFIG_UNDEF_INT`/`_PTR`) so NCCL picks its defaults. `version` is the library's
/// own: NCCL reads the fields up to `size` and takes its defaults for the rest.
fn non_blocking_config() -> sys::ncclConfig_t {
    const UNDEF: c_int = c_int::MIN;
    const API_MAGIC: u32 = 0xcafe_beef;
    let mut version: c_int = 0;
    // SAFETY: writes one int.
    let known = unsafe { sys::ncclGetVersion(&mut version) } == sys::ncclResult_t::ncclSuccess;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: API_MAGIC,
        // 2.30.0 is the layout of cudarc's struct when the library does not say.
        version: if known && version > 0 {
            version as u32
        } else {
            23000
        },
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// Polls until the communicator's asynchronous state is no longer "in progress" and, with an
/// event, the work recorded in it has run; fails on an NCCL or CUDA error, or once `timeout`
/// has passed since `started`. Spins briefly (a small collective takes microseconds), then
/// sleeps up to a millisecond between looks.
fn poll(
    comm: sys::ncclComm_t,
    event: Option<&CudaEvent>,
    started: Instant,
    timeout: Duration,
) -> std::result::Result<(), Stop> {
    let mut pause = Duration::from_micros(10);
    let mut spins = 0u32;
    loop {
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator; writes one ncclResult_t.
        let code = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
        if code != sys::ncclResult_t::ncclSuccess {
            return Err(Stop::Nccl(describe(code, comm)));
        }
        let queued = match state {
            sys::ncclResult_t::ncclSuccess => true,
            sys::ncclResult_t::ncclInProgress => false,
            error => return Err(Stop::Nccl(describe(error, comm))),
        };
        if queued {
            match event.map(CudaEvent::try_is_complete) {
                None | Some(Ok(true)) => return Ok(()),
                Some(Ok(false)) => {}
                Some(Err(e)) => return Err(Stop::Cuda("waiting for the GPU", e)),
            }
        }
        if started.elapsed() >= timeout {
            return Err(Stop::TimedOut);
        }
        if spins < 100 {
            spins += 1;
            std::thread::yield_now();
        } else {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }
}

/// NCCL's text for `code`, and its last detailed message for `comm` when it has one.
fn describe(code: sys::ncclResult_t, comm: sys::ncclComm_t) -> String {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code;
    // ncclGetLastError a NUL-terminated string owned by NCCL (or null), copied at once.
    unsafe {
        let text = CStr::from_ptr(sys::ncclGetErrorString(code))
            .to_string_lossy()
            .into_owned();
        let last = sys::ncclGetLastError(comm);
        let detail = if last.is_null() {
            String::new()
        } else {
            CStr::from_ptr(last).to_string_lossy().trim().to_string()
        };
        if detail.is_empty() {
            format!("{code:?} ({text})")
        } else {
            format!("{code:?} ({text}: {detail})")
        }
    }
}

#[cfg(test)]
mod tests {
    //! These need the NCCL library and a libcuda (the build's stub is enough) on the loader
    //! path: `LD_LIBRARY_PATH=$LORACTL_CUDA_LD_PATH cargo test -p loractl-collective
    //! --features cuda` in the CUDA build's environment (see scripts/cuda/build.sh).
    use super::*;
    use crate::rendezvous::Announcement;

    #[test]
    fn a_generated_id_survives_the_rendezvous() -> Result<()> {
        let id = NcclId::generate()?;
        let text = Announcement::Nccl(Some(id)).to_text();
        assert_eq!(Announcement::parse(0, &text)?, Announcement::Nccl(Some(id)));
        Ok(())
    }

    /// Without a GPU NCCL cannot set up even a one-rank communicator: an error that says
    /// so, no panic and no hang.
    #[test]
    fn setup_without_a_gpu_fails_cleanly() -> Result<()> {
        let id = NcclId::generate()?;
        let config = NcclConfig::new(0, 1).with_timeout(Duration::from_secs(20));
        let started = Instant::now();
        match init_comm(&id, &config) {
            Ok(comm) => {
                // SAFETY: the communicator just made, never used again.
                unsafe { sys::ncclCommAbort(comm) };
                eprintln!("NCCL set up a communicator: this machine has a GPU");
            }
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains("rank 0 of 1"), "{text}");
                assert!(matches!(e, Error::Nccl { .. }), "not an NCCL error: {text}");
                eprintln!("{text}");
            }
        }
        assert!(started.elapsed() < Duration::from_secs(20));
        // The public constructor needs a context first, which the stub refuses.
        if let Err(e) = CudaContext::new(0) {
            eprintln!("no CUDA context: {e}");
        }
        Ok(())
    }

    #[test]
    fn a_bad_config_is_refused_before_any_call() {
        assert!(NcclConfig::new(2, 2).validate().is_err());
        assert!(NcclConfig::new(0, 0).validate().is_err());
        assert!(NcclConfig::new(0, 2)
            .with_timeout(Duration::ZERO)
            .validate()
            .is_err());
        assert!(NcclConfig::new(1, 2).validate().is_ok());
    }
}
