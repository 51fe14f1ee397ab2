//! TCP-ring all-reduce throughput on loopback for SD1.5 LoRA-sized gradient buffers, against a
//! memcpy of the same buffer.
//!
//! `collective-bench [--ranks N] [--iters K] [FLOATS...]` (defaults: 2 ranks, 5 timed
//! iterations after one warm-up, 3.4 M floats = SD1.5 rank 8 and 54 M = rank 128). Ranks are
//! threads of this process, each with its own sockets, as separate processes would have.

use std::time::{Duration, Instant};

use loractl_collective::{Collective, RingConfig, TcpRing};

fn main() {
    let mut ranks = 2usize;
    let mut iters = 5usize;
    let mut sizes = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--ranks" => ranks = parse(args.next(), "--ranks"),
            "--iters" => iters = parse(args.next(), "--iters"),
            "-h" | "--help" => {
                println!("usage: collective-bench [--ranks N] [--iters K] [FLOATS...]");
                return;
            }
            other => sizes.push(parse(Some(other.to_string()), "FLOATS")),
        }
    }
    if sizes.is_empty() {
        sizes = vec![3_400_000, 54_000_000];
    }
    if ranks < 2 || iters == 0 {
        eprintln!("collective-bench: needs --ranks >= 2 and --iters >= 1");
        std::process::exit(2);
    }
    println!("TCP ring all-reduce on loopback, {ranks} ranks, median of {iters} runs");
    println!(
        "{:>12} {:>10} {:>12} {:>12} {:>12} {:>10}",
        "floats", "MiB", "all-reduce", "algbw GB/s", "memcpy", "ratio"
    );
    for n in sizes {
        let ring = median(all_reduce_times(ranks, n, iters));
        let copy = median(memcpy_times(n, iters));
        let bytes = (n * 4) as f64;
        println!(
            "{:>12} {:>10.1} {:>10.2}ms {:>12.2} {:>10.2}ms {:>9.1}x",
            n,
            bytes / (1 << 20) as f64,
            ring.as_secs_f64() * 1e3,
            bytes / ring.as_secs_f64() / 1e9,
            copy.as_secs_f64() * 1e3,
            ring.as_secs_f64() / copy.as_secs_f64(),
        );
    }
}

fn parse(v: Option<String>, what: &str) -> usize {
    match v.as_deref().map(str::parse) {
        Some(Ok(n)) => n,
        _ => {
            eprintln!("collective-bench: {what} needs a number");
            std::process::exit(2);
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Times of rank 0's all-reduce calls (every call ends only when all ranks have the result
/// in their successor's hands, so rank 0's time is the collective's).
fn all_reduce_times(ranks: usize, n: usize, iters: usize) -> Vec<Duration> {
    let configs = (0..ranks)
        .map(|r| RingConfig::new(r, ranks, "bench").with_timeout(Duration::from_secs(120)))
        .collect();
    let rings = TcpRing::loopback(configs).expect("a loopback ring");
    let handles: Vec<_> = rings
        .into_iter()
        .map(|mut ring| {
            std::thread::spawn(move || {
                let mut buf: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
                let mut times = Vec::new();
                for i in 0..=iters {
                    ring.barrier().expect("barrier");
                    let start = Instant::now();
                    ring.all_reduce_mean(&mut buf).expect("all-reduce");
                    if i > 0 {
                        times.push(start.elapsed());
                    }
                }
                times
            })
        })
        .collect();
    let mut times: Vec<Vec<Duration>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    times.swap_remove(0)
}

fn memcpy_times(n: usize, iters: usize) -> Vec<Duration> {
    let src: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
    let mut dst = vec![0f32; n];
    dst.copy_from_slice(&src);
    (0..iters)
        .map(|_| {
            let start = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
            start.elapsed()
        })
        .collect()
}
