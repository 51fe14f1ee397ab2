//! How cluster records are shown: aligned tables and short phrases for people, JSON objects
//! (stable field names, ids and digests as strings) for scripts.

use loractl_proto::domain::{
    ArtifactInfo, ArtifactKind, Failure, GpuRequest, Job, LogLine, LogStream, Progress,
    RankPlacement, Worker,
};
use serde_json::{json, Value};

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
    format!(
        "{workers} worker{} × {gpus}",
        if workers == 1 { "" } else { "s" }
    )
}

pub fn kind_name(kind: ArtifactKind) -> &'static str {
    match kind {
        ArtifactKind::Dataset => "dataset",
        ArtifactKind::BaseModel => "base model",
        ArtifactKind::Lora => "LoRA file",
        ArtifactKind::SampleImage => "sample image",
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
