//! Data-parallel throughput: one rank with the whole global batch against `--ranks` rank
//! processes with `--batch` samples each, their LoRA gradients all-reduced over the TCP ring
//! on loopback every step, as `loractl rank` does. Each run is separate processes on this
//! machine; ranks split its cores (`RAYON_NUM_THREADS`), as the worker splits them between CPU
//! ranks of one job.
//!
//! Usage: dp-bench [CONFIG] [--ranks N] [--batch B] [--steps S] [--warmup W] [--rank R]
//! (defaults: small, 2 ranks, batch 1 per rank, 5 timed steps after 1 warm-up, LoRA rank 8).
//! Prints one line per run and the ratio of the global throughputs.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Instant;

use candle_core::Device;
use loractl_collective::{Collective, RingConfig, RingListener, Single};
use loractl_trainer::bench::{median, rayon_threads, BenchModel};

/// Any error ends the benchmark with its message.
type Result<T, E = Box<dyn std::error::Error + Send + Sync>> = std::result::Result<T, E>;

/// Floats per all-reduce call, as the trainer buckets gradients.
const BUCKET: usize = 4 << 20;

struct Args {
    config: String,
    ranks: usize,
    batch: usize,
    steps: usize,
    warmup: usize,
    lora_rank: usize,
    /// Set in a rank process: (rank, world size).
    child: Option<(usize, usize)>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        config: "small".into(),
        ranks: 2,
        batch: 1,
        steps: 5,
        warmup: 1,
        lora_rank: 8,
        child: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = |flag: &str| -> Result<usize> {
            let n = it.next().ok_or_else(|| format!("{flag} needs a number"))?;
            Ok(n.parse()
                .map_err(|e| format!("{flag} needs a number ({e})"))?)
        };
        match arg.as_str() {
            "--ranks" => a.ranks = num("--ranks")?,
            "--batch" => a.batch = num("--batch")?,
            "--steps" => a.steps = num("--steps")?,
            "--warmup" => a.warmup = num("--warmup")?,
            "--rank" => a.lora_rank = num("--rank")?,
            "--child" => {
                let rank = num("--child")?;
                let world = num("--child")?;
                a.child = Some((rank, world));
            }
            "-h" | "--help" => {
                println!(
                    "usage: dp-bench [tiny|small|sd15] [--ranks N] [--batch B] [--steps S] \
                     [--warmup W] [--rank R]"
                );
                std::process::exit(0);
            }
            s if !s.starts_with('-') => a.config = s.to_owned(),
            s => return Err(format!("unknown argument `{s}`").into()),
        }
    }
    if a.ranks < 2 || a.batch == 0 || a.steps == 0 {
        return Err("needs --ranks >= 2, --batch >= 1 and --steps >= 1".into());
    }
    Ok(a)
}

fn main() -> ExitCode {
    loractl_trainer::tune_process();
    loractl_trainer::bench::exit("dp-bench", bench())
}

fn bench() -> Result<()> {
    let a = args()?;
    if let Some((rank, world)) = a.child {
        return child(&a, rank, world);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let global = a.ranks * a.batch;
    println!(
        "{} LoRA rank {}: global batch {global}, {} timed steps after {} warm-up, {cores} cores",
        a.config, a.lora_rank, a.steps, a.warmup
    );
    let one = run(&a, 1, global, cores)?;
    let many = run(&a, a.ranks, a.batch, (cores / a.ranks).max(1))?;
    println!(
        "{:>6} {:>6} {:>8} {:>10} {:>14} {:>12}",
        "ranks", "batch", "threads", "step_ms", "all-reduce_ms", "samples/s"
    );
    for (ranks, batch, r) in [(1, global, &one), (a.ranks, a.batch, &many)] {
        println!(
            "{:>6} {:>6} {:>8} {:>10.1} {:>14.1} {:>12.2}",
            ranks,
            batch,
            r.threads,
            r.step_ms,
            r.reduce_ms,
            global as f64 / (r.step_ms / 1e3)
        );
    }
    println!(
        "{} ranks vs 1 rank, same global batch: {:.2}x the throughput",
        a.ranks,
        one.step_ms / many.step_ms
    );
    Ok(())
}

/// What the slowest rank of a run reported.
struct RunResult {
    step_ms: f64,
    reduce_ms: f64,
    threads: usize,
}

/// Runs `world` rank processes with `batch` samples each and `threads` compute threads;
/// returns the slowest rank's medians.
fn run(a: &Args, world: usize, batch: usize, threads: usize) -> Result<RunResult> {
    let exe = std::env::current_exe()?;
    let mut children: Vec<Child> = (0..world)
        .map(|rank| {
            Command::new(&exe)
                .arg(&a.config)
                .args(["--child", &rank.to_string(), &world.to_string()])
                .args(["--batch", &batch.to_string()])
                .args(["--ranks", &a.ranks.to_string()])
                .args(["--steps", &a.steps.to_string()])
                .args(["--warmup", &a.warmup.to_string()])
                .args(["--rank", &a.lora_rank.to_string()])
                .env("RAYON_NUM_THREADS", threads.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| format!("starting a rank process: {e}"))
        })
        .collect::<Result<_, String>>()?;
    let mut readers: Vec<_> = children
        .iter_mut()
        .map(|c| c.stdout.take().map(BufReader::new))
        .collect::<Option<_>>()
        .ok_or("a rank has no stdout")?;
    // The rendezvous: every rank's address, then all of them to every rank.
    let mut addresses = Vec::new();
    for r in &mut readers {
        let mut line = String::new();
        r.read_line(&mut line)?;
        addresses.push(line.trim().to_owned());
    }
    for c in &mut children {
        let stdin = c.stdin.as_mut().ok_or("a rank has no stdin")?;
        writeln!(stdin, "{}", addresses.join(" "))?;
    }
    let mut result = RunResult {
        step_ms: 0.0,
        reduce_ms: 0.0,
        threads,
    };
    for (r, c) in readers.iter_mut().zip(&mut children) {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let status = c.wait()?;
        if !status.success() {
            return Err(format!("a rank failed ({status})").into());
        }
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .map_err(|e| format!("a rank printed `{}`: {e}", line.trim()))?;
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        result.step_ms = result.step_ms.max(f("step_ms"));
        result.reduce_ms = result.reduce_ms.max(f("reduce_ms"));
    }
    Ok(result)
}

/// One rank: bind, print the address, read everyone's, connect, time the steps.
fn child(a: &Args, rank: usize, world: usize) -> Result<()> {
    let mut collective: Box<dyn Collective> = if world == 1 {
        println!("-");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        Box::new(Single)
    } else {
        let listener = RingListener::bind("127.0.0.1:0", RingConfig::new(rank, world, "dp-bench"))?;
        println!("{}", listener.local_addr());
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        let peers: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        Box::new(listener.connect(&peers)?)
    };
    let mut model = BenchModel::build(&a.config, a.lora_rank, a.lora_rank as f64, &Device::Cpu)?;
    let inputs = model.inputs(a.batch)?;
    let (mut steps, mut reduces) = (Vec::new(), Vec::new());
    for i in 0..a.warmup + a.steps {
        let start = Instant::now();
        // Every rank draws other timesteps: rank r takes the r-th share of step i.
        let mut grads = model.loss(&inputs, i * world + rank)?.backward()?;
        let reduce = Instant::now();
        if world > 1 {
            let mut flat = model.flatten(&grads)?;
            for bucket in flat.chunks_mut(BUCKET) {
                collective.all_reduce_mean(bucket)?;
            }
            model.unflatten(&flat, &mut grads)?;
        }
        let reduce_ms = reduce.elapsed().as_secs_f64() * 1e3;
        model.update(&grads)?;
        if i >= a.warmup {
            steps.push(start.elapsed().as_secs_f64() * 1e3);
            reduces.push(reduce_ms);
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "rank": rank,
            "step_ms": median(&mut steps),
            "reduce_ms": median(&mut reduces),
            "threads": rayon_threads(),
            "params": model.net.param_count(),
        })
    );
    Ok(())
}
