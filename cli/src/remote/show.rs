//! How cluster records are shown: aligned tables and short phrases for people, JSON objects
//! (stable field names, ids and digests as strings) for scripts.

use loractl_proto::domain::{
    ArtifactInfo, ArtifactKind, Failure, GpuRequest, Job, LogLine, LogStream, Progress,
    RankPlacement, Worker,
};
use loractl_spec::JobSpec;
use serde_json::{json, Value};
use std::fmt;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `5s ago`, `3m ago`, `2h ago`, `4d ago`.
pub fn age(at_ms: i64) -> String {
    let secs = ((now_ms() - at_ms).max(0) / 1000) as u64;
    format!("{} ago", duration(secs))
}

/// `42s`, `3m05s`, `2h10m`, `4d3h`.
pub fn duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
        _ => format!("{}d{}h", secs / 86400, (secs % 86400) / 3600),
    }
}

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Columns padded to their widest cell; the last column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                out.push_str(cell);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.trim_end().to_owned()
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

pub fn gpu_list(indices: &[u32]) -> String {
    if indices.is_empty() {
        "cpu".to_owned()
    } else {
        indices
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// `local.1 [cpu]` or `box.2 [0,1]` for each rank's worker.
pub fn placement(ranks: &[RankPlacement]) -> String {
    ranks
        .iter()
        .map(|r| format!("{} [{}]", r.worker_id, gpu_list(&r.gpu_indices)))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn request(job: &Job) -> String {
    let gpus = match &job.resources.gpus {
        GpuRequest::Cpu => "CPU".to_owned(),
        GpuRequest::All => "all GPUs".to_owned(),
        GpuRequest::Ids(ids) => format!("GPUs {}", gpu_list(ids)),
    };
    let workers = job.resources.workers;
    let ranks = match (&job.resources.gpus, job.resources.ranks_per_worker) {
        (GpuRequest::Cpu, n) if n > 1 => format!(" ({n} ranks each)"),
        _ => String::new(),
    };
    format!(
        "{workers} worker{} × {gpus}{ranks}",
        if workers == 1 { "" } else { "s" }
    )
}

/// How a job splits its batch: ranks, batch per rank and per optimizer step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parallelism {
    /// The ranks of the current placement, else what the spec fixes; `None` for
    /// `gpus = "all"` before the job is placed.
    pub world_size: Option<u32>,
    pub batch_per_rank: u32,
    pub accumulation: u32,
}

impl Parallelism {
    /// `None` when the job's spec does not parse (it was validated at submission, so only a
    /// spec from a newer loractl).
    pub fn of(job: &Job) -> Option<Self> {
        let spec = JobSpec::from_toml_str(&job.spec_toml, "job spec").ok()?;
        let resolved = spec.resolved().ok();
        let placed = (!job.placement.is_empty()).then_some(job.placement.len() as u32);
        Some(Self {
            world_size: placed.or_else(|| resolved.and_then(|r| r.world_size())),
            batch_per_rank: spec.training.train_batch_size,
            accumulation: spec.training.gradient_accumulation_steps.max(1),
        })
    }

    pub fn global_batch(&self) -> Option<u32> {
        self.world_size
            .map(|w| w * self.batch_per_rank * self.accumulation)
    }
}

impl fmt::Display for Parallelism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let accumulation = if self.accumulation > 1 {
            format!(" × {} accumulation steps", self.accumulation)
        } else {
            String::new()
        };
        match (self.world_size, self.global_batch()) {
            (Some(w), Some(global)) => write!(
                f,
                "{w} rank{} × batch {}{accumulation} = global batch {global}",
                if w == 1 { "" } else { "s" },
                self.batch_per_rank
            ),
            _ => write!(
                f,
                "one rank per GPU of each worker (known once placed) × batch {}{accumulation}",
                self.batch_per_rank
            ),
        }
    }
}

/// `step 12/40 (epoch 2), loss 0.1234, 1.50 steps/s`.
pub fn progress_line(p: &Progress) -> String {
    format!(
        "step {}/{} (epoch {}), loss {:.4}, lr {:.2e}, {:.2} steps/s",
        p.step, p.total_steps, p.epoch, p.loss, p.lr, p.steps_per_second
    )
}

pub fn kind_name(kind: ArtifactKind) -> &'static str {
    match kind {
        ArtifactKind::Dataset => "dataset",
        ArtifactKind::BaseModel => "base model",
        ArtifactKind::Lora => "LoRA file",
        ArtifactKind::SampleImage => "sample image",
        ArtifactKind::TrainingLog => "training log",
        ArtifactKind::Checkpoint => "checkpoint",
    }
}

fn failure_json(failure: &Failure) -> Value {
    json!({
        "kind": failure.kind.as_str(),
        "message": failure.message,
        "rank": failure.rank,
        "retryable": failure.kind.retryable(),
    })
}

pub fn job_json(job: &Job) -> Value {
    let parallel = Parallelism::of(job);
    json!({
        "id": job.id.as_str(),
        "name": job.name,
        "state": job.state.as_str(),
        "priority": job.priority,
        "attempt": job.attempt,
        "counted_restarts": job.counted_restarts,
        "max_restarts": job.resources.max_restarts,
        "workers": job.resources.workers,
        "gpus": job.resources.gpus.to_string(),
        "ranks_per_worker": job.resources.ranks_per_worker,
        "world_size": parallel.as_ref().and_then(|p| p.world_size),
        "batch_per_rank": parallel.as_ref().map(|p| p.batch_per_rank),
        "gradient_accumulation_steps": parallel.as_ref().map(|p| p.accumulation),
        "global_batch": parallel.as_ref().and_then(Parallelism::global_batch),
        "progress": job.progress.as_deref().map(progress_json),
        "placement": job.placement.iter().map(|r| json!({
            "rank": r.rank,
            "worker_id": r.worker_id.as_str(),
            "gpu_indices": r.gpu_indices,
        })).collect::<Vec<_>>(),
        "last_failure": job.last_failure.as_ref().map(failure_json),
        "latest_checkpoint": job.latest_checkpoint.map(|d| d.to_hex()),
        "submitted_at_unix_ms": job.submitted_at,
        "updated_at_unix_ms": job.updated_at,
        "waiting_reason": (!job.waiting_reason.is_empty()).then_some(&job.waiting_reason),
        "trace_id": (!job.trace_id.is_empty()).then_some(&job.trace_id),
        "spec_toml": job.spec_toml,
    })
}

pub fn progress_json(p: &Progress) -> Value {
    json!({
        "job_id": p.job_id.as_str(),
        "attempt": p.attempt,
        "rank": p.rank,
        "step": p.step,
        "total_steps": p.total_steps,
        "epoch": p.epoch,
        "loss": p.loss,
        "lr": p.lr,
        "d_lr": p.d_lr,
        "steps_per_second": p.steps_per_second,
        "samples_per_second": p.samples_per_second,
        "gpu_memory_bytes": p.gpu_memory_bytes,
        "unix_ms": p.at,
    })
}

pub fn log_json(line: &LogLine) -> Value {
    json!({
        "job_id": line.job_id.as_str(),
        "attempt": line.attempt,
        "rank": line.rank,
        "stream": match line.stream { LogStream::Stdout => "stdout", LogStream::Stderr => "stderr" },
        "text": line.text,
        "unix_ms": line.at,
    })
}

pub fn artifact_json(a: &ArtifactInfo) -> Value {
    json!({
        "sha256": a.digest.to_hex(),
        "size": a.size,
        "kind": kind_name(a.kind),
        "job_id": a.job_id.as_ref().map(|j| j.as_str()),
        "name": a.name,
        "created_at_unix_ms": a.created_at,
    })
}

/// The worker's GPUs that no placed or running job holds.
pub fn free_gpus(w: &Worker) -> Vec<u32> {
    w.gpus
        .iter()
        .map(|g| g.index)
        .filter(|i| !w.busy_gpus.contains(i))
        .collect()
}

/// `alive`, `draining` (shutting down, no new work) or `lost`.
pub fn worker_state(w: &Worker) -> &'static str {
    match (w.alive, w.draining) {
        (false, _) => "lost",
        (true, true) => "draining",
        (true, false) => "alive",
    }
}

pub fn worker_json(w: &Worker) -> Value {
    json!({
        "id": w.id.as_str(),
        "name": w.name,
        "alive": w.alive,
        "draining": w.draining,
        "gpus": w.gpus.iter().map(|g| json!({
            "index": g.index,
            "uuid": g.uuid,
            "name": g.name,
            "memory_bytes": g.memory_bytes,
        })).collect::<Vec<_>>(),
        "busy_gpus": w.busy_gpus,
        "free_gpus": free_gpus(w),
        "jobs": w.jobs.iter().map(|j| j.as_str()).collect::<Vec<_>>(),
        "labels": w.labels,
        "registered_at_unix_ms": w.registered_at,
        "last_seen_unix_ms": w.last_seen,
    })
}

/// `[j1]` style list, or `-`.
pub fn or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loractl_proto::domain::{JobId, RankPlacement, Resources, WorkerId};

    fn job(spec_toml: &str, gpus: GpuRequest, placement: Vec<RankPlacement>) -> Job {
        let resources = Resources {
            workers: 2,
            gpus,
            max_restarts: 3,
            ranks_per_worker: 1,
        };
        Job {
            placement,
            ..Job::queued(
                JobId::new("j1"),
                "zenny".into(),
                spec_toml.into(),
                0,
                1,
                resources,
                0,
            )
        }
    }

    const SPEC: &str =
        "name = \"zenny\"\n[model]\npretrained_model_name_or_path = \"m.safetensors\"\n\
        [dataset]\ntrain_data_dir = \"data\"\nresolution = \"512\"\n[training]\ntrain_batch_size = 3\n\
        gradient_accumulation_steps = 2\n[resources]\nworkers = 2\n";

    #[test]
    fn parallelism_counts_ranks_from_the_placement_else_the_spec() {
        let all = job(&format!("{SPEC}gpus = \"all\"\n"), GpuRequest::All, vec![]);
        let p = Parallelism::of(&all).expect("spec parses");
        assert_eq!((p.world_size, p.global_batch()), (None, None));
        assert!(p.to_string().contains("known once placed"), "{p}");
        let rank = |rank, worker: &str, gpu| RankPlacement {
            rank,
            worker_id: WorkerId::new(worker),
            gpu_indices: vec![gpu],
        };
        let placed = job(
            &format!("{SPEC}gpus = \"all\"\n"),
            GpuRequest::All,
            vec![rank(0, "a", 0), rank(1, "a", 1), rank(2, "b", 0)],
        );
        let p = Parallelism::of(&placed).expect("spec parses");
        assert_eq!(p.global_batch(), Some(3 * 3 * 2));
        assert_eq!(
            p.to_string(),
            "3 ranks × batch 3 × 2 accumulation steps = global batch 18"
        );
        let ids = job(
            &format!("{SPEC}gpus = \"0,1\"\n"),
            GpuRequest::Ids(vec![0, 1]),
            vec![],
        );
        assert_eq!(Parallelism::of(&ids).and_then(|p| p.world_size), Some(4));
        let value = job_json(&placed);
        assert_eq!(value["world_size"], 3);
        assert_eq!(value["global_batch"], 18);
    }

    #[test]
    fn tables_align_columns() {
        let text = table(
            &["ID", "STATE", "NAME"],
            &[
                vec!["j1".into(), "running".into(), "a".into()],
                vec!["j10".into(), "queued".into(), "bb".into()],
            ],
        );
        assert_eq!(
            text,
            "ID   STATE    NAME\nj1   running  a\nj10  queued   bb"
        );
    }

    #[test]
    fn durations_and_sizes_read_naturally() {
        assert_eq!(duration(5), "5s");
        assert_eq!(duration(185), "3m05s");
        assert_eq!(duration(7300), "2h01m");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
    }
}
