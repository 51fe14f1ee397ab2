//! The TCP ring with every rank a thread of this process on loopback: results against a
//! reference, and every failure path ending in an error that names a rank, never a hang.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use loractl_collective::{Collective, Error, RingConfig, RingListener, TcpRing};

const TOKEN: &str = "j1/0";

fn listeners(world: usize, timeout: Duration, chunk_bytes: usize) -> Vec<RingListener> {
    (0..world)
        .map(|rank| {
            let config = RingConfig::new(rank, world, TOKEN)
                .with_timeout(timeout)
                .with_chunk_bytes(chunk_bytes);
            RingListener::bind("127.0.0.1:0", config).unwrap()
        })
        .collect()
}

fn addresses(listeners: &[RingListener]) -> Vec<String> {
    listeners
        .iter()
        .map(|l| l.local_addr().to_string())
        .collect()
}

/// A connected ring of `world` ranks.
fn ring(world: usize, timeout: Duration, chunk_bytes: usize) -> Vec<TcpRing> {
    let configs = (0..world)
        .map(|rank| {
            RingConfig::new(rank, world, TOKEN)
                .with_timeout(timeout)
                .with_chunk_bytes(chunk_bytes)
        })
        .collect();
    TcpRing::loopback(configs).unwrap()
}

/// Runs `f` on every rank in its own thread; results by rank.
fn on_each<T: Send + 'static>(
    rings: Vec<TcpRing>,
    f: impl Fn(usize, &mut TcpRing) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let handles: Vec<_> = rings
        .into_iter()
        .enumerate()
        .map(|(rank, mut ring)| {
            let f = f.clone();
            std::thread::spawn(move || f(rank, &mut ring))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Values whose sums are exact in f32 whatever the order, so results compare exactly.
fn exact_input(rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((rank * 31 + i * 7) % 97) as f32 * 0.25 - 12.0)
        .collect()
}

/// Values with rounding, for the bit-identical-on-every-rank check.
fn inexact_input(rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((rank as f32 + 1.3) * (i as f32 * 0.37).sin()) / 3.0)
        .collect()
}

#[test]
fn all_reduce_mean_matches_the_reference() {
    for world in 1usize..=4 {
        let lengths = [0, 1, world - 1, 3, 1001, 250_001];
        // Small chunks so that long buffers go in many chunks per segment.
        let rings = ring(world, Duration::from_secs(20), 4096);
        let results = on_each(rings, move |rank, ring| {
            let mut out = Vec::new();
            for n in lengths {
                let mut exact = exact_input(rank, n);
                ring.all_reduce_mean(&mut exact).unwrap();
                let mut inexact = inexact_input(rank, n);
                ring.all_reduce_mean(&mut inexact).unwrap();
                out.push((exact, inexact));
            }
            out
        });
        for (li, n) in lengths.into_iter().enumerate() {
            let exact_in: Vec<Vec<f32>> = (0..world).map(|r| exact_input(r, n)).collect();
            let inexact_in: Vec<Vec<f32>> = (0..world).map(|r| inexact_input(r, n)).collect();
            let expected: Vec<f32> = (0..n)
                .map(|i| exact_in.iter().map(|v| v[i]).sum::<f32>() / world as f32)
                .collect();
            let reference: Vec<f64> = (0..n)
                .map(|i| inexact_in.iter().map(|v| v[i] as f64).sum::<f64>() / world as f64)
                .collect();
            for (rank, per_rank) in results.iter().enumerate() {
                let (exact, inexact) = &per_rank[li];
                assert_eq!(exact, &expected, "world {world}, n {n}, rank {rank}");
                for (a, b) in inexact.iter().zip(&reference) {
                    assert!(
                        (*a as f64 - b).abs() < 1e-5,
                        "world {world}, n {n}: {a} vs {b}"
                    );
                }
                let bits: Vec<u32> = inexact.iter().map(|v| v.to_bits()).collect();
                let rank0: Vec<u32> = results[0][li].1.iter().map(|v| v.to_bits()).collect();
                assert_eq!(bits, rank0, "ranks must agree bit for bit");
            }
        }
    }
}

#[test]
fn large_buffers_with_default_chunks_do_not_deadlock() {
    // Both neighbours push multi-MiB segments at each other at once.
    let rings = ring(
        2,
        Duration::from_secs(30),
        loractl_collective::tcp::DEFAULT_CHUNK_BYTES,
    );
    let out = on_each(rings, |rank, ring| {
        let mut v = vec![rank as f32 + 1.0; 3_000_001];
        ring.all_reduce_mean(&mut v).unwrap();
        v.iter().all(|x| *x == 1.5)
    });
    assert_eq!(out, vec![true, true]);
}

#[test]
fn broadcast_copies_the_roots_bytes() {
    for world in 1usize..=4 {
        for root in 0..world {
            let rings = ring(world, Duration::from_secs(20), 1000);
            let out = on_each(rings, move |rank, ring| {
                let mut results = Vec::new();
                for n in [0usize, 5, 12_345] {
                    let mut buf: Vec<u8> = (0..n)
                        .map(|i| if rank == root { (i % 251) as u8 } else { 0xEE })
                        .collect();
                    ring.broadcast(&mut buf, root).unwrap();
                    results.push(buf);
                }
                let mut floats = vec![rank as f32; 3];
                ring.broadcast_f32(&mut floats, root).unwrap();
                (results, floats)
            });
            for (bufs, floats) in out {
                for (buf, n) in bufs.iter().zip([0usize, 5, 12_345]) {
                    let expected: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
                    assert_eq!(buf, &expected, "world {world}, root {root}");
                }
                assert_eq!(floats, vec![root as f32; 3]);
            }
        }
    }
}

#[test]
fn barrier_waits_for_every_rank() {
    let world = 3;
    let entered = Arc::new(AtomicUsize::new(0));
    let rings = ring(world, Duration::from_secs(20), 4096);
    let seen = {
        let entered = entered.clone();
        on_each(rings, move |rank, ring| {
            if rank == 2 {
                // The last rank arrives late; nobody may leave before it entered.
                std::thread::sleep(Duration::from_millis(200));
            }
            entered.fetch_add(1, Ordering::SeqCst);
            ring.barrier().unwrap();
            entered.load(Ordering::SeqCst)
        })
    };
    assert_eq!(seen, vec![world; world]);
}

fn names_rank(err: &Error, rank: usize) -> bool {
    err.to_string().contains(&format!("rank {rank}"))
}

#[test]
fn mismatched_lengths_fail_every_rank() {
    let rings = ring(3, Duration::from_secs(10), 4096);
    let out = on_each(rings, |rank, ring| {
        let mut v = vec![1.0f32; if rank == 1 { 11 } else { 10 }];
        let first = ring.all_reduce_mean(&mut v);
        // Once failed, the ring refuses further calls instead of reading garbage.
        let after = ring.barrier();
        (first, after)
    });
    for (rank, (first, after)) in out.into_iter().enumerate() {
        let err = first.expect_err("a mismatched length must fail");
        let msg = err.to_string();
        assert!(msg.contains("rank "), "rank {rank}: {msg}");
        assert!(
            matches!(after, Err(Error::Poisoned(_))),
            "rank {rank}: {after:?}"
        );
    }
}

#[test]
fn mismatched_ops_and_roots_fail() {
    let rings = ring(2, Duration::from_secs(10), 4096);
    let out = on_each(rings, |rank, ring| {
        if rank == 0 {
            ring.barrier()
        } else {
            ring.all_reduce_mean(&mut [1.0])
        }
    });
    // Whichever rank reads the other's frame first reports the mismatch; the other then sees
    // the connection close.
    assert!(out.iter().all(|r| r.is_err()), "{out:?}");
    assert!(
        out.iter().any(|r| matches!(r, Err(Error::Mismatch { .. }))),
        "{out:?}"
    );

    let rings = ring(2, Duration::from_secs(10), 4096);
    let out = on_each(rings, |rank, ring| ring.broadcast(&mut [1, 2, 3], rank));
    assert!(out.iter().all(|r| r.is_err()), "{out:?}");
    assert!(
        out.iter().any(|r| matches!(r, Err(Error::Mismatch { .. }))),
        "{out:?}"
    );
}

#[test]
fn a_peer_dying_mid_all_reduce_fails_the_others_fast() {
    for world in [2, 3] {
        let timeout = Duration::from_secs(10);
        let mut rings = ring(world, timeout, 4096);
        rings[1].crash_after_frames(5);
        let start = Instant::now();
        let out = on_each(rings, |_, ring| {
            let mut v = vec![1.0f32; 100_000];
            ring.all_reduce_mean(&mut v)
        });
        // Fast: the sockets close, nobody waits for the timeout.
        assert!(start.elapsed() < timeout / 2, "took {:?}", start.elapsed());
        for (rank, r) in out.iter().enumerate() {
            let err = r.as_ref().expect_err("every rank fails");
            if rank != 1 {
                assert!(
                    matches!(err, Error::PeerClosed { .. }),
                    "rank {rank}: {err}"
                );
            }
        }
        // The dead rank's successor reads from it: it names it.
        let succ = out[2 % world].as_ref().unwrap_err();
        assert!(names_rank(succ, 1), "{succ}");
    }
}

#[test]
fn a_stuck_peer_times_out_every_other_rank() {
    let timeout = Duration::from_millis(500);
    let rings = ring(3, timeout, 4096);
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
    let start = Instant::now();
    let handles: Vec<_> = rings
        .into_iter()
        .enumerate()
        .map(|(rank, mut ring)| {
            let release_rx = release_rx.clone();
            std::thread::spawn(move || {
                if rank == 2 {
                    // Alive but never joins the call; holds its sockets open until released.
                    let _ = release_rx.lock().unwrap().recv();
                    return None;
                }
                Some((ring.all_reduce_mean(&mut [1.0; 64]), start.elapsed()))
            })
        })
        .collect();
    let mut results = Vec::new();
    for h in handles.into_iter().take(2) {
        results.push(h.join().unwrap().unwrap());
    }
    drop(release_tx);
    for (rank, (r, elapsed)) in results.iter().enumerate() {
        let err = r.as_ref().expect_err("must time out");
        assert!(*elapsed < timeout * 6, "rank {rank} took {elapsed:?}");
        assert!(err.to_string().contains("rank "), "rank {rank}: {err}");
    }
    // Rank 0 reads from the stuck rank 2: it names it as timed out.
    assert!(
        matches!(results[0].0, Err(Error::Timeout { rank: 2, .. })),
        "{:?}",
        results[0].0
    );
}

#[test]
fn a_peer_that_never_connects_times_out() {
    let timeout = Duration::from_millis(300);
    let mut ls = listeners(2, timeout, 4096);
    let addrs = addresses(&ls);
    let silent = ls.pop().unwrap(); // rank 1 binds, announces, never connects
    let start = Instant::now();
    let err = ls.pop().unwrap().connect(&addrs).unwrap_err();
    assert!(start.elapsed() < timeout * 10);
    assert!(matches!(err, Error::AcceptTimeout { rank: 1, .. }), "{err}");
    drop(silent);

    // Nobody listening at the successor's address at all.
    let ls = listeners(2, timeout, 4096);
    let mut addrs = addresses(&ls);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    addrs[1] = closed.local_addr().unwrap().to_string();
    drop(closed);
    let err = ls.into_iter().next().unwrap().connect(&addrs).unwrap_err();
    assert!(matches!(err, Error::Connect { rank: 1, .. }), "{err}");
}

#[test]
fn a_wrong_token_is_refused_on_both_sides() {
    let timeout = Duration::from_secs(5);
    let good = RingListener::bind(
        "127.0.0.1:0",
        RingConfig::new(0, 2, "j7/1").with_timeout(timeout),
    )
    .unwrap();
    let stale = RingListener::bind(
        "127.0.0.1:0",
        RingConfig::new(1, 2, "j7/0").with_timeout(timeout),
    )
    .unwrap();
    let addrs = vec![
        good.local_addr().to_string(),
        stale.local_addr().to_string(),
    ];
    let a = {
        let addrs = addrs.clone();
        std::thread::spawn(move || good.connect(&addrs))
    };
    let b = std::thread::spawn(move || stale.connect(&addrs));
    let ea = a.join().unwrap().unwrap_err();
    let eb = b.join().unwrap().unwrap_err();
    for (err, peer) in [(&ea, 1), (&eb, 0)] {
        assert!(
            matches!(err, Error::Handshake { rank, .. } if *rank == peer),
            "{err}"
        );
        assert!(err.to_string().contains("token"), "{err}");
    }
}

#[test]
fn a_wrong_world_size_is_refused() {
    let timeout = Duration::from_secs(5);
    let a = RingListener::bind(
        "127.0.0.1:0",
        RingConfig::new(0, 2, TOKEN).with_timeout(timeout),
    )
    .unwrap();
    let b = RingListener::bind(
        "127.0.0.1:0",
        RingConfig::new(1, 3, TOKEN).with_timeout(timeout),
    )
    .unwrap();
    let two = vec![a.local_addr().to_string(), b.local_addr().to_string()];
    // Rank 1 believes in three ranks; its successor "rank 2" is rank 0's listener.
    let three = vec![two[0].clone(), two[1].clone(), two[0].clone()];
    let ha = std::thread::spawn(move || a.connect(&two));
    let hb = std::thread::spawn(move || b.connect(&three));
    let ea = ha.join().unwrap().unwrap_err();
    let eb = hb.join().unwrap().unwrap_err();
    assert!(matches!(&ea, Error::Handshake { rank: 1, .. }), "{ea}");
    assert!(ea.to_string().contains("world size"), "{ea}");
    assert!(matches!(&eb, Error::Handshake { .. }), "{eb}");
}
