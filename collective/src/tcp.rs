//! The TCP ring: each rank sends to rank+1 and receives from rank-1 over two TCP connections.
//!
//! Setup is two-phase so the address can travel through the coordinator's rendezvous: bind a
//! [`RingListener`] (port 0 is fine), announce [`RingListener::local_addr`], then
//! [`RingListener::connect`] with every rank's address. Each connection opens with a handshake
//! (protocol version, job token, world size, rank), so a rank of another job or attempt is
//! refused instead of joining.
//!
//! All-reduce is ring reduce-scatter then all-gather: `2 (w - 1)` steps in which every rank
//! sends one segment (`1/w` of the buffer) to its successor while it receives one from its
//! predecessor. Segments travel in chunks; a sender thread per ring writes the outgoing chunks
//! while the calling thread reads and reduces the incoming ones, so two neighbours writing
//! large chunks at each other never wait on each other, and a chunk received in one step is
//! forwarded in the next as soon as that step starts. Every chunk carries a header (call
//! number, op, buffer length, step, index), so a peer that is out of step is detected.
//!
//! A failure on any rank (timeout, closed peer, mismatch) poisons its ring and shuts both
//! sockets down, so its neighbours see the connection close at once and fail in turn: every
//! rank returns an error naming a rank, no rank hangs.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::frame::{self, Header, Hello, Op, HEADER_LEN, PROTOCOL_VERSION};
use crate::{Collective, Error, Result};

/// The default bound on a peer's silence. Generous because a rank waiting in the gradient
/// all-reduce also waits for the slowest rank's backward pass (minutes for SD on a CPU).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// Chunk size of the pipeline: large enough to amortise headers and syscalls, small enough
/// that forwarding starts early.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;
/// Outgoing chunks the calling thread may queue ahead of the sender thread.
const SEND_QUEUE: usize = 4;

/// Who this rank is in which job, and its limits.
#[derive(Debug, Clone)]
pub struct RingConfig {
    pub rank: usize,
    pub world_size: usize,
    /// Identifies the job and attempt; every rank must present the same one.
    pub token: String,
    /// How long a peer may make no progress (connect, handshake, or any collective call)
    /// before the call fails.
    pub timeout: Duration,
    /// Bytes per chunk on the wire (rounded down to whole floats for all-reduce).
    pub chunk_bytes: usize,
}

impl RingConfig {
    pub fn new(rank: usize, world_size: usize, token: impl Into<String>) -> RingConfig {
        RingConfig {
            rank,
            world_size,
            token: token.into(),
            timeout: DEFAULT_TIMEOUT,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> RingConfig {
        self.timeout = timeout;
        self
    }

    pub fn with_chunk_bytes(mut self, chunk_bytes: usize) -> RingConfig {
        self.chunk_bytes = chunk_bytes;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.world_size == 0 || self.rank >= self.world_size {
            return Err(Error::Config(format!(
                "rank {} in a world of {} ranks",
                self.rank, self.world_size
            )));
        }
        if self.token.len() > frame::MAX_TOKEN {
            return Err(Error::Config(format!(
                "job token of {} bytes (at most {})",
                self.token.len(),
                frame::MAX_TOKEN
            )));
        }
        if self.timeout.is_zero() {
            return Err(Error::Config("a timeout of zero".into()));
        }
        if self.chunk_bytes < 4 || self.chunk_bytes > u32::MAX as usize {
            return Err(Error::Config(format!(
                "chunk size of {} bytes (4 B to 4 GiB)",
                self.chunk_bytes
            )));
        }
        Ok(())
    }

    fn hello(&self) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            world_size: self.world_size as u32,
            rank: self.rank as u32,
            token: self.token.clone(),
        }
    }
}

/// A rank's bound listener, before it knows its peers' addresses.
#[derive(Debug)]
pub struct RingListener {
    config: RingConfig,
    listener: TcpListener,
    addr: SocketAddr,
}

impl RingListener {
    /// Binds `addr` (e.g. `0.0.0.0:0`); the address to announce is [`Self::local_addr`].
    pub fn bind(addr: &str, config: RingConfig) -> Result<RingListener> {
        config.validate()?;
        let bind_err = |source| Error::Bind {
            addr: addr.to_string(),
            source,
        };
        let listener = TcpListener::bind(addr).map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        Ok(RingListener {
            config,
            listener,
            addr: local,
        })
    }

    /// The bound address. With an unspecified IP (`0.0.0.0`) the announcing side must replace
    /// it with an address its peers can reach.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connects to the successor, accepts the predecessor, and checks both handshakes, all
    /// within the configured timeout. `addresses[i]` is rank `i`'s announced address.
    pub fn connect(self, addresses: &[String]) -> Result<TcpRing> {
        let RingConfig {
            rank,
            world_size: world,
            timeout,
            chunk_bytes,
            ..
        } = self.config;
        if addresses.len() != world {
            return Err(Error::Config(format!(
                "{} peer addresses for a world of {world} ranks",
                addresses.len()
            )));
        }
        let mut ring = TcpRing {
            rank,
            world,
            timeout,
            chunk_bytes,
            seq: 0,
            links: None,
            failed: None,
            crash_after_frames: None,
        };
        if world == 1 {
            return Ok(ring);
        }
        let next = (rank + 1) % world;
        let prev = (rank + world - 1) % world;
        let ours = self.config.hello();
        let deadline = Instant::now() + timeout;

        // Connecting first cannot wait on the successor: its listener is bound before any
        // address is announced, so the kernel completes the connection from its backlog.
        let mut out = connect_until(&addresses[next], next, deadline, timeout)?;
        setup_stream(&out, next, timeout)?;
        out.write_all(&ours.encode())
            .map_err(|e| classify(e, next, timeout, "the handshake"))?;

        let mut inc = accept_until(&self.listener, prev, deadline, timeout)?;
        setup_stream(&inc, prev, remaining(deadline))?;
        let theirs =
            Hello::read(&mut inc).map_err(|e| classify(e, prev, timeout, "the handshake"))?;
        let refusal = match &theirs {
            Err(reason) => Some(reason.clone()),
            Ok(h) => h.mismatch(&ours, prev),
        };
        if let Some(reason) = refusal {
            // Best effort: the peer learns why before the connection closes.
            let _ = inc.write_all(&frame::encode_reply(Err(&reason)));
            return Err(Error::Handshake { rank: prev, reason });
        }
        inc.write_all(&frame::encode_reply(Ok(&ours)))
            .map_err(|e| classify(e, prev, timeout, "the handshake"))?;

        out.set_read_timeout(Some(remaining(deadline)))
            .map_err(|e| classify(e, next, timeout, "the handshake"))?;
        match frame::read_reply(&mut out)
            .map_err(|e| classify(e, next, timeout, "the handshake"))?
        {
            Err(reason) => {
                return Err(Error::Handshake {
                    rank: next,
                    reason: format!("it refused this rank: {reason}"),
                })
            }
            Ok(h) => {
                if let Some(reason) = h.mismatch(&ours, next) {
                    return Err(Error::Handshake { rank: next, reason });
                }
            }
        }
        setup_stream(&out, next, timeout)?;
        setup_stream(&inc, prev, timeout)?;

        let shared = Arc::new(Shared {
            failure: Mutex::new(None),
            streams: [
                out.try_clone()
                    .map_err(|e| classify(e, next, timeout, "setup"))?,
                inc.try_clone()
                    .map_err(|e| classify(e, prev, timeout, "setup"))?,
            ],
        });
        let (tx, rx) = mpsc::sync_channel(SEND_QUEUE);
        let (free_tx, free_rx) = mpsc::channel();
        let sender = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("ring-send-{rank}"))
                .spawn(move || run_sender(out, rx, free_tx, shared, next, timeout))
                .map_err(|e| Error::Io {
                    rank: next,
                    what: "starting the sender thread".into(),
                    source: e,
                })?
        };
        ring.links = Some(Links {
            next,
            prev,
            inc,
            tx: Some(tx),
            free: free_rx,
            sender: Some(sender),
            shared,
            scratch: Vec::new(),
        });
        Ok(ring)
    }
}

/// One rank's end of a TCP ring. See the module docs.
pub struct TcpRing {
    rank: usize,
    world: usize,
    timeout: Duration,
    chunk_bytes: usize,
    /// Calls made so far; every rank counts the same.
    seq: u64,
    /// `None` in a world of one rank.
    links: Option<Links>,
    /// The first failure, once poisoned.
    failed: Option<String>,
    crash_after_frames: Option<u64>,
}

struct Links {
    next: usize,
    prev: usize,
    /// Read side of the connection from the predecessor.
    inc: TcpStream,
    /// Frames for the sender thread (dropped first on drop, so it flushes and exits).
    tx: Option<SyncSender<Vec<u8>>>,
    /// Frame buffers the sender thread has written, for reuse.
    free: Receiver<Vec<u8>>,
    sender: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    scratch: Vec<u8>,
}

/// What the calling thread and the sender thread share: the first failure, and clones of both
/// sockets so that whichever fails can shut everything down.
struct Shared {
    failure: Mutex<Option<Error>>,
    streams: [TcpStream; 2],
}

impl Shared {
    fn fail(&self, err: Error) {
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if failure.is_none() {
            *failure = Some(err);
        }
        drop(failure);
        self.shutdown();
    }

    fn shutdown(&self) {
        for s in &self.streams {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn take(&self) -> Option<Error> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

fn run_sender(
    mut next: TcpStream,
    rx: Receiver<Vec<u8>>,
    free: Sender<Vec<u8>>,
    shared: Arc<Shared>,
    next_rank: usize,
    timeout: Duration,
) {
    while let Ok(frame) = rx.recv() {
        if let Err(e) = next.write_all(&frame) {
            shared.fail(classify(e, next_rank, timeout, "a send"));
            return;
        }
        let _ = free.send(frame);
    }
    let _ = next.flush();
}

fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

fn setup_stream(s: &TcpStream, rank: usize, timeout: Duration) -> Result<()> {
    let err = |e| classify(e, rank, timeout, "setup");
    s.set_nonblocking(false).map_err(err)?;
    s.set_nodelay(true).map_err(err)?;
    s.set_read_timeout(Some(timeout)).map_err(err)?;
    s.set_write_timeout(Some(timeout)).map_err(err)?;
    Ok(())
}

/// Connects to `addr`, retrying refusals (the peer may still be starting) until `deadline`.
fn connect_until(
    addr: &str,
    rank: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream> {
    loop {
        let attempt = addr.to_socket_addrs().and_then(|mut addrs| {
            let a = addrs.next().ok_or_else(|| {
                std::io::Error::new(ErrorKind::InvalidInput, "the address resolves to nothing")
            })?;
            TcpStream::connect_timeout(&a, remaining(deadline))
        });
        match attempt {
            Ok(s) => return Ok(s),
            Err(source) if Instant::now() >= deadline => {
                return Err(Error::Connect {
                    rank,
                    addr: addr.to_string(),
                    timeout,
                    source,
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn accept_until(
    listener: &TcpListener,
    rank: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream> {
    let err = |e| classify(e, rank, timeout, "accepting its connection");
    listener.set_nonblocking(true).map_err(err)?;
    loop {
        match listener.accept() {
            Ok((s, _)) => return Ok(s),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                if Instant::now() >= deadline {
                    return Err(Error::AcceptTimeout { rank, timeout });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(err(e)),
        }
    }
}

fn classify(e: std::io::Error, rank: usize, timeout: Duration, what: &str) -> Error {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Error::Timeout {
            rank,
            timeout,
            what: what.to_string(),
        },
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe
        | ErrorKind::NotConnected => Error::PeerClosed {
            rank,
            what: what.to_string(),
        },
        _ => Error::Io {
            rank,
            what: what.to_string(),
            source: e,
        },
    }
}

/// Range of segment `i` when `n` elements are split into `w` nearly equal segments.
fn segment(i: usize, n: usize, w: usize) -> std::ops::Range<usize> {
    let (base, rem) = (n / w, n % w);
    let start = i * base + i.min(rem);
    start..start + base + usize::from(i < rem)
}

/// Chunks of `range` of at most `chunk` elements; an empty range still has one (empty) chunk,
/// so every step exchanges a frame and every mismatch is seen.
fn chunks(
    range: std::ops::Range<usize>,
    chunk: usize,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    let count = range.len().div_ceil(chunk).max(1);
    (0..count).map(move |k| {
        let start = (range.start + k * chunk).min(range.end);
        start..(start + chunk).min(range.end)
    })
}

fn chunk_count(len: usize, chunk: usize) -> usize {
    len.div_ceil(chunk).max(1)
}

impl TcpRing {
    /// A ring of one rank per config, every rank in this process on 127.0.0.1 (tests and
    /// benchmarks): each binds, then all connect at once, each in a thread of its own, as
    /// separate processes would. Ranks by config order; the first error wins.
    pub fn loopback(configs: Vec<RingConfig>) -> Result<Vec<TcpRing>> {
        let listeners = configs
            .into_iter()
            .map(|config| RingListener::bind("127.0.0.1:0", config))
            .collect::<Result<Vec<_>>>()?;
        let addresses: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().to_string())
            .collect();
        let joins: Vec<_> = listeners
            .into_iter()
            .map(|l| {
                let addresses = addresses.clone();
                std::thread::spawn(move || l.connect(&addresses))
            })
            .collect();
        joins
            .into_iter()
            .map(|j| {
                j.join().unwrap_or_else(|_| {
                    Err(Error::Config("a rank's connect thread panicked".into()))
                })
            })
            .collect()
    }

    /// Test hook: after `frames` more chunks are queued, this rank behaves like a process
    /// that died (sockets shut down, calls fail), to exercise the other ranks' failure paths.
    #[doc(hidden)]
    pub fn crash_after_frames(&mut self, frames: u64) {
        self.crash_after_frames = Some(frames);
    }

    fn check(&self) -> Result<()> {
        match &self.failed {
            Some(msg) => Err(Error::Poisoned(msg.clone())),
            None => Ok(()),
        }
    }

    /// Records a failure: the sender thread's if it failed first (it is then the cause),
    /// otherwise `own`; shuts the sockets down so the neighbours fail fast.
    fn fail(&mut self, own: Error) -> Error {
        let err = match &self.links {
            Some(links) => {
                let err = links.shared.take().unwrap_or(own);
                links.shared.shutdown();
                err
            }
            None => own,
        };
        self.failed = Some(err.to_string());
        err
    }

    /// Queues one frame: `header` then `payload(out)` appends the payload bytes.
    fn push(&mut self, header: Header, payload: impl FnOnce(&mut Vec<u8>)) -> Result<()> {
        if let Some(left) = self.crash_after_frames.as_mut() {
            if *left == 0 {
                if let Some(links) = &self.links {
                    links.shared.shutdown();
                }
                self.failed = Some("this rank simulated a crash".into());
                return Err(Error::Poisoned("this rank simulated a crash".into()));
            }
            *left -= 1;
        }
        let links = self.links.as_mut().expect("push on a ring of one rank");
        let mut buf = links.free.try_recv().unwrap_or_default();
        buf.clear();
        header.write_to(&mut buf);
        payload(&mut buf);
        debug_assert_eq!(buf.len(), HEADER_LEN + header.payload as usize);
        let sent = links.tx.as_ref().expect("sender open").send(buf);
        if sent.is_err() {
            // The sender thread stopped: it recorded why.
            let next = links.next;
            let own = Error::PeerClosed {
                rank: next,
                what: header.op.name().to_string(),
            };
            return Err(self.fail(own));
        }
        Ok(())
    }

    /// Reads the next frame, checks it is `expected`, and leaves its payload in `scratch`.
    fn pull(&mut self, expected: Header) -> Result<()> {
        let links = self.links.as_mut().expect("pull on a ring of one rank");
        let prev = links.prev;
        let what = || format!("{} #{}", expected.op.name(), expected.seq);
        let mut head = [0u8; HEADER_LEN];
        if let Err(e) = links.inc.read_exact(&mut head) {
            let own = classify(e, prev, self.timeout, &what());
            return Err(self.fail(own));
        }
        let got = match Header::parse(&head) {
            Ok(h) => h,
            Err(reason) => {
                let own = Error::Mismatch {
                    rank: prev,
                    theirs: reason,
                    ours: expected.describe(),
                };
                return Err(self.fail(own));
            }
        };
        if got != expected {
            let own = Error::Mismatch {
                rank: prev,
                theirs: got.describe(),
                ours: expected.describe(),
            };
            return Err(self.fail(own));
        }
        links.scratch.resize(expected.payload as usize, 0);
        if let Err(e) = links.inc.read_exact(&mut links.scratch) {
            let own = classify(e, prev, self.timeout, &what());
            return Err(self.fail(own));
        }
        Ok(())
    }

    /// Ring all-reduce (sum) of `buf`; `op` tells all-reduce from barrier on the wire.
    fn all_reduce_sum(&mut self, buf: &mut [f32], op: Op) -> Result<()> {
        self.check()?;
        self.seq += 1;
        let (w, r) = (self.world, self.rank);
        if w == 1 {
            return Ok(());
        }
        let n = buf.len();
        let chunk = (self.chunk_bytes / 4).max(1);
        for step in 0..2 * (w - 1) {
            // Step s sends segment r-s and receives r-s-1; in the reduce-scatter half the
            // received chunk is added, in the all-gather half it is the final value. What a
            // rank sends in step s+1 is exactly what it received in step s.
            let send_seg = segment((r + 2 * w - step) % w, n, w);
            let recv_seg = segment((r + 2 * w - step - 1) % w, n, w);
            let reduce = step < w - 1;
            let mut sends = chunks(send_seg.clone(), chunk).enumerate();
            let mut recvs = chunks(recv_seg.clone(), chunk).enumerate();
            let rounds = chunk_count(send_seg.len(), chunk).max(chunk_count(recv_seg.len(), chunk));
            let seq = self.seq;
            // The frame of chunk k of this step, `len` floats.
            let header = |k: usize, len: usize| Header {
                op,
                seq,
                total: n as u64,
                step: step as u32,
                index: k as u32,
                payload: (len * 4) as u32,
            };
            for _ in 0..rounds {
                if let Some((k, range)) = sends.next() {
                    let header = header(k, range.len());
                    let src = &buf[range];
                    self.push(header, |out| {
                        let start = out.len();
                        out.resize(start + src.len() * 4, 0);
                        for (o, v) in out[start..].chunks_exact_mut(4).zip(src) {
                            o.copy_from_slice(&v.to_le_bytes());
                        }
                    })?;
                }
                if let Some((k, range)) = recvs.next() {
                    let header = header(k, range.len());
                    self.pull(header)?;
                    let scratch = &self.links.as_ref().expect("links").scratch;
                    let dst = &mut buf[range];
                    if reduce {
                        for (d, b) in dst.iter_mut().zip(scratch.chunks_exact(4)) {
                            *d += f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                        }
                    } else {
                        for (d, b) in dst.iter_mut().zip(scratch.chunks_exact(4)) {
                            *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_sum(buf, Op::AllReduce)?;
        if self.world > 1 {
            let w = self.world as f32;
            for v in buf.iter_mut() {
                *v /= w;
            }
        }
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        self.check()?;
        if root >= self.world {
            return Err(Error::Config(format!(
                "broadcast from rank {root} in a world of {} ranks",
                self.world
            )));
        }
        self.seq += 1;
        let (w, r) = (self.world, self.rank);
        if w == 1 {
            return Ok(());
        }
        let n = buf.len();
        let next = (r + 1) % w;
        let seq = self.seq;
        let header = |op: Op, k: usize, len: usize| Header {
            op,
            seq,
            total: n as u64,
            step: root as u32,
            index: k as u32,
            payload: len as u32,
        };
        for (k, range) in chunks(0..n, self.chunk_bytes).enumerate() {
            let h = header(Op::Broadcast, k, range.len());
            if r != root {
                self.pull(h)?;
                let scratch = &self.links.as_ref().expect("links").scratch;
                buf[range.clone()].copy_from_slice(scratch);
            }
            if next != root {
                let src = &buf[range];
                self.push(h, |out| out.extend_from_slice(src))?;
            }
        }
        // The last rank acknowledges to the root, so the root returns only once everyone has
        // the data, and ranks that disagree on the root see each other's frames.
        let done = header(Op::BroadcastDone, 0, 0);
        if next == root {
            self.push(done, |_| {})?;
        }
        if r == root {
            self.pull(done)?;
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        self.all_reduce_sum(&mut [], Op::Barrier)
    }
}

impl Drop for TcpRing {
    fn drop(&mut self) {
        if let Some(links) = self.links.as_mut() {
            // The last chunks of the last call may still be queued and the successor needs
            // them: let the sender flush (bounded by the write timeout) before closing.
            drop(links.tx.take());
            if let Some(sender) = links.sender.take() {
                let _ = sender.join();
            }
            links.shared.shutdown();
        }
    }
}

impl std::fmt::Debug for TcpRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpRing")
            .field("rank", &self.rank)
            .field("world_size", &self.world)
            .field("timeout", &self.timeout)
            .field("failed", &self.failed)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cover_the_buffer() {
        for n in [0, 1, 2, 3, 7, 100] {
            for w in 1..5 {
                let mut next = 0;
                for i in 0..w {
                    let s = segment(i, n, w);
                    assert_eq!(s.start, next);
                    next = s.end;
                }
                assert_eq!(next, n);
            }
        }
        let c: Vec<_> = chunks(3..3, 4).collect();
        assert_eq!(c, vec![3..3]);
        let c: Vec<_> = chunks(0..10, 4).collect();
        assert_eq!(c, vec![0..4, 4..8, 8..10]);
    }
}
