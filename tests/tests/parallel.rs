//! Data-parallel jobs through the real binaries: a job with `workers = 2` runs one rank on each
//! of two CPU workers, the ranks meet through the coordinator's rendezvous and all-reduce their
//! LoRA gradients over the TCP ring, and the LoRA equals the one a single rank trains with the
//! whole global batch. A worker killed mid-run fails the attempt on every rank (none waits
//! forever) and the job resumes from its checkpoint on the workers left.

use std::path::{Path, PathBuf};

use loractl_tests::{bin, submitted_id, tiny_job, Cluster, WorkerSetup};
use serde_json::Value;

const TOKEN: &str = "e2e-parallel-token";

/// A tiny job (see [`tiny_job`]) with `batch` images per rank, `workers` ranks, and the LoRA
/// saved in f32 so that two runs compare to the float.
fn job(dir: &Path, steps: usize, batch: usize, workers: usize) -> anyhow::Result<PathBuf> {
    let path = tiny_job(dir, "dp", steps, "")?;
    let text = std::fs::read_to_string(&path)?
        .replace(
            "train_batch_size = 1",
            &format!("train_batch_size = {batch}"),
        )
        .replace("save_precision = \"fp16\"", "save_precision = \"float\"")
        .replace(
            "[resources]\ngpus = \"cpu\"",
            &format!("[resources]\ngpus = \"cpu\"\nworkers = {workers}\nmax_restarts = 3"),
        );
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Every tensor of a LoRA file as f32, by name.
fn tensors(path: &Path) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
    let bytes = std::fs::read(path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        anyhow::ensure!(
            view.dtype() == safetensors::Dtype::F32,
            "{name} is {:?}",
            view.dtype()
        );
        let values = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        out.push((name, values));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// How far a LoRA file is from a reference one.
struct Difference {
    /// The norm of the difference over the reference's, all tensors together.
    overall: f64,
    /// The largest of the same per `lora_up` tensor, and per other tensor, with their names.
    worst_up: (f64, String),
    worst_other: (f64, String),
}

/// Compares two LoRA files tensor by tensor, after checking that they hold the same tensors.
fn relative_difference(a: &Path, b: &Path) -> anyhow::Result<Difference> {
    let (a, b) = (tensors(a)?, tensors(b)?);
    let names = |t: &[(String, Vec<f32>)]| t.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    anyhow::ensure!(names(&a) == names(&b), "the files hold different tensors");
    let (mut diff_all, mut norm_all) = (0f64, 0f64);
    let mut worst_up = (0f64, String::new());
    let mut worst_other = (0f64, String::new());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        anyhow::ensure!(
            x.len() == y.len(),
            "{name}: {} vs {} values",
            x.len(),
            y.len()
        );
        let diff: f64 = x
            .iter()
            .zip(y)
            .map(|(p, q)| (f64::from(*p) - f64::from(*q)).powi(2))
            .sum();
        let norm: f64 = y.iter().map(|q| f64::from(*q).powi(2)).sum();
        diff_all += diff;
        norm_all += norm;
        let rel = diff.sqrt() / norm.sqrt().max(1e-12);
        let worst = match name.contains("lora_up") {
            true => &mut worst_up,
            false => &mut worst_other,
        };
        if rel > worst.0 {
            *worst = (rel, name.clone());
        }
    }
    Ok(Difference {
        overall: (diff_all / norm_all.max(1e-24)).sqrt(),
        worst_up,
        worst_other,
    })
}

/// The reference: one rank with the whole global batch, trained by `loractl train`.
fn single_rank_lora(dir: &Path, steps: usize, batch: usize) -> PathBuf {
    let job = job(dir, steps, batch, 1).unwrap();
    let out = std::process::Command::new(bin("loractl"))
        .args(["train", "--json"])
        .arg(&job)
        .env("MALLOC_MMAP_THRESHOLD_", "4294967296")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("output/dp.safetensors")
}

fn state(job: &Value) -> &str {
    job["state"].as_str().unwrap_or_default()
}

/// Fetches job `id` (2 ranks × batch 1, 4 steps) and compares its LoRA with one rank of
/// batch 2 trained by `loractl train`; checks both ranks took part.
fn assert_two_ranks_train_the_single_rank_lora(cluster: &Cluster, id: &str, what: &str) {
    let fetched = cluster.path("fetched");
    let fetch = cluster.run(&["fetch", id, "--out", fetched.to_str().unwrap()]);
    assert!(fetch.ok(), "{fetch:?}");
    let reference = single_rank_lora(&cluster.path("single"), 4, 2);
    let d = relative_difference(&fetched.join("dp.safetensors"), &reference).unwrap();
    let report = format!(
        "{what} x batch 1 vs 1 rank x batch 2: relative difference {:e}, worst up tensor {:e} \
         ({}), worst other tensor {:e} ({})",
        d.overall, d.worst_up.0, d.worst_up.1, d.worst_other.0, d.worst_other.1
    );
    println!("{report}");
    // The two runs sum the same gradients in another order (an all-reduce of two per-rank
    // means against one batch of two, products blocked for other sizes), and AdamW's first
    // steps scale every difference by 1/sqrt(v): float noise, not a different computation.
    // Overall that stays near 1e-7. An up tensor starts at zero, so all of it is the AdamW
    // updates of these steps, and where a gradient element is near AdamW's eps its update is
    // proportional to it and carries its rounding noise: one reaches a few 1e-4 (measured
    // 1.9e-4). Trained on half of the batch, the closest up tensor differs by 0.19 (the
    // quickstart job, 4 steps). The down tensors start random and move little: rounding
    // leaves them near 1e-6 (measured 2.2e-6), half of the batch 4e-4.
    assert!(
        d.overall < 1e-5 && d.worst_up.0 < 1e-3 && d.worst_other.0 < 1e-4,
        "{report}"
    );
    // Both ranks trained: the log shows each joining the ring.
    let logs = cluster.run(&["logs", id]);
    assert!(
        logs.stdout.contains("rank 0 of 2") && logs.stdout.contains("rank 1 of 2"),
        "{}",
        logs.stdout
    );
}

#[test]
fn a_two_rank_job_on_two_cpu_workers_trains_the_single_rank_lora() {
    let mut cluster = Cluster::start(Some(TOKEN)).unwrap();
    for name in ["left", "right"] {
        cluster.add_worker(WorkerSetup::cpu(name)).unwrap();
    }
    let spec = job(&cluster.path("dp"), 4, 1, 2).unwrap();
    let out = cluster.run(&["submit", spec.to_str().unwrap(), "--watch"]);
    assert!(out.ok(), "{}\n{}", out.stderr, cluster.logs());
    let id = submitted_id(&out);
    let done = cluster.job(&id).unwrap();
    assert_eq!(state(&done), "succeeded", "{done}");
    assert_eq!(done["attempt"], 0);

    assert_two_ranks_train_the_single_rank_lora(&cluster, &id, "2 ranks on two workers");
}

#[test]
fn a_worker_killed_under_a_two_rank_job_fails_the_attempt_and_the_job_resumes() {
    let mut cluster = Cluster::start(Some(TOKEN)).unwrap();
    for name in ["one", "two", "three"] {
        let mut setup = WorkerSetup::cpu(name);
        // A silent peer fails the collective after this long (600 s by default).
        setup.config.push("collective_timeout_secs = 15".to_owned());
        cluster.add_worker(setup).unwrap();
    }
    let spec = job(&cluster.path("dp"), 12, 1, 2).unwrap();
    let id = submitted_id(&cluster.run(&["submit", spec.to_str().unwrap()]));
    let running = cluster.wait_job(&id, "a checkpoint stored", |j| {
        state(j) == "running" && !j["latest_checkpoint"].is_null()
    });
    // Kill the worker of rank 1: its rank dies with it, and rank 0 loses its ring peer.
    let victim = running["placement"]
        .as_array()
        .and_then(|p| p.iter().find(|r| r["rank"] == 1))
        .and_then(|r| r["worker_id"].as_str())
        .map(|w| w.rsplit_once('.').map_or(w, |(name, _)| name).to_owned())
        .unwrap_or_else(|| panic!("no rank 1 in {running}"));
    cluster.kill_worker(&victim);

    let done = cluster.wait_job(&id, "the end", |j| {
        matches!(state(j), "succeeded" | "failed" | "cancelled")
    });
    assert_eq!(state(&done), "succeeded", "{done}\n{}", cluster.logs());
    assert!(done["attempt"].as_u64().unwrap_or(0) >= 1, "{done}");
    let fetched = cluster.path("fetched");
    let fetch = cluster.run(&["fetch", &id, "--out", fetched.to_str().unwrap()]);
    assert!(fetch.ok(), "{fetch:?}");
    assert!(tensors(&fetched.join("dp.safetensors")).is_ok_and(|t| !t.is_empty()));
}

/// [`job`] with `ranks` CPU ranks on one worker.
fn one_worker_job(dir: &Path, steps: usize, ranks: usize) -> anyhow::Result<PathBuf> {
    let path = job(dir, steps, 1, 1)?;
    let text = std::fs::read_to_string(&path)?.replace(
        "workers = 1\n",
        &format!("workers = 1\nranks_per_worker = {ranks}\n"),
    );
    anyhow::ensure!(
        text.contains("ranks_per_worker"),
        "no [resources] in {text}"
    );
    std::fs::write(&path, text)?;
    Ok(path)
}

#[test]
fn a_two_rank_job_on_one_cpu_worker_trains_the_single_rank_lora() {
    let mut cluster = Cluster::start(Some(TOKEN)).unwrap();
    cluster.add_worker(WorkerSetup::cpu("box")).unwrap();
    let spec = one_worker_job(&cluster.path("dp"), 4, 2).unwrap();
    let out = cluster.run(&["submit", spec.to_str().unwrap(), "--watch"]);
    assert!(out.ok(), "{}\n{}", out.stderr, cluster.logs());
    let id = submitted_id(&out);
    let done = cluster.job(&id).unwrap();
    assert_eq!(state(&done), "succeeded", "{done}");
    assert_eq!(
        (done["attempt"].as_u64(), done["world_size"].as_u64()),
        (Some(0), Some(2))
    );
    let status = cluster.run(&["status", &id]);
    assert!(
        status.stdout.contains("2 ranks × batch 1 = global batch 2"),
        "{}",
        status.stdout
    );

    assert_two_ranks_train_the_single_rank_lora(&cluster, &id, "2 ranks on one worker");
}

/// The pid of the rank process running `rank` of job `id` of `cluster`, found by its
/// environment: its output folder lies in the cluster's folder (other tests' clusters number
/// their jobs from j1 too).
fn rank_pid(cluster: &Cluster, id: &str, rank: u32) -> Option<i32> {
    let wanted = [
        format!("LORACTL_JOB_ID={id}"),
        format!("LORACTL_RANK={rank}"),
    ];
    let ours = format!("LORACTL_OUTPUT_DIR={}/", cluster.path("").display());
    let ours = ours.replace("//", "/");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
            let in_cluster = vars.iter().any(|v| v.starts_with(ours.as_bytes()));
            (in_cluster && wanted.iter().all(|w| vars.contains(&w.as_bytes()))).then_some(pid)
        })
}

#[test]
fn a_rank_killed_while_its_worker_lives_fails_the_attempt_and_the_job_resumes() {
    let mut cluster = Cluster::start(Some(TOKEN)).unwrap();
    let mut setup = WorkerSetup::cpu("box");
    setup.config.push("collective_timeout_secs = 15".to_owned());
    cluster.add_worker(setup).unwrap();
    let spec = one_worker_job(&cluster.path("dp"), 12, 2).unwrap();
    let id = submitted_id(&cluster.run(&["submit", spec.to_str().unwrap()]));
    cluster.wait_job(&id, "a checkpoint stored", |j| {
        state(j) == "running" && !j["latest_checkpoint"].is_null()
    });
    let pid = rank_pid(&cluster, &id, 1)
        .unwrap_or_else(|| panic!("no process of rank 1\n{}", cluster.logs()));
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success(), "kill -9 {pid}");

    let done = cluster.wait_job(&id, "the end", |j| {
        matches!(state(j), "succeeded" | "failed" | "cancelled")
    });
    assert_eq!(state(&done), "succeeded", "{done}\n{}", cluster.logs());
    assert!(done["attempt"].as_u64().unwrap_or(0) >= 1, "{done}");
    // A SIGKILL nobody in loractl sent is a crash and spends a restart; rank 0 saw its peer go.
    assert!(
        done["counted_restarts"].as_u64().unwrap_or(0) >= 1,
        "{done}"
    );
    let logs = cluster.run(&["logs", &id]);
    let fetched = cluster.path("fetched");
    let fetch = cluster.run(&["fetch", &id, "--out", fetched.to_str().unwrap()]);
    assert!(fetch.ok(), "{fetch:?}");
    assert!(
        tensors(&fetched.join("dp.safetensors")).is_ok_and(|t| !t.is_empty()),
        "{}",
        logs.stdout
    );
}
