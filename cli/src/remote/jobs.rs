//! `status`, `list`, `logs`, `cancel` and `workers`: one call each (two for `workers`, whose
//! busy GPUs come from the active jobs' placements), printed as text or JSON.

use std::collections::BTreeMap;
use std::process::ExitCode;

use loractl_proto::domain::{ArtifactInfo, ArtifactKind, Job, JobState, LogLine, Worker};
use loractl_proto::pb;

use super::show;
use super::{Remote, Target};

fn job_from(job: Option<pb::Job>, call: &str) -> anyhow::Result<Job> {
    let job = job.ok_or_else(|| anyhow::anyhow!("{call}: the coordinator sent no job"))?;
    Ok(Job::try_from(job)?)
}

pub(super) async fn get_job(remote: &Remote, id: &str) -> anyhow::Result<Job> {
    let reply = remote
        .jobs()
        .await?
        .get_job(pb::GetJobRequest {
            job_id: id.to_owned(),
        })
        .await
        .map_err(|s| remote.refused("GetJob", &s))?
        .into_inner();
    job_from(reply.job, "GetJob")
}

pub(super) async fn job_artifacts(remote: &Remote, id: &str) -> anyhow::Result<Vec<ArtifactInfo>> {
    let reply = remote
        .artifacts()
        .await?
        .list_artifacts(pb::ListArtifactsRequest {
            job_id: id.to_owned(),
        })
        .await
        .map_err(|s| remote.refused("ListArtifacts", &s))?
        .into_inner();
    reply
        .artifacts
        .into_iter()
        .map(|a| Ok(ArtifactInfo::try_from(a)?))
        .collect()
}

async fn list_jobs(remote: &Remote, states: &[JobState]) -> anyhow::Result<Vec<Job>> {
    let reply = remote
        .jobs()
        .await?
        .list_jobs(pb::ListJobsRequest {
            states: states
                .iter()
                .map(|s| pb::JobState::from(*s) as i32)
                .collect(),
        })
        .await
        .map_err(|s| remote.refused("ListJobs", &s))?
        .into_inner();
    reply
        .jobs
        .into_iter()
        .map(|j| Ok(Job::try_from(j)?))
        .collect()
}

pub async fn status(target: &Target, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let remote = Remote::connect(target).await?;
    let job = get_job(&remote, id).await?;
    let artifacts = job_artifacts(&remote, id).await?;
    if json {
        let mut value = show::job_json(&job);
        value["artifacts"] = artifacts.iter().map(show::artifact_json).collect();
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}", describe(&job, &artifacts));
    Ok(ExitCode::SUCCESS)
}

/// The human view of one job.
pub(super) fn describe(job: &Job, artifacts: &[ArtifactInfo]) -> String {
    let mut lines = vec![format!(
        "job {} ({}): {}, attempt {}",
        job.id, job.name, job.state, job.attempt
    )];
    lines.push(format!(
        "  submitted {}, updated {}, priority {}",
        show::age(job.submitted_at),
        show::age(job.updated_at),
        job.priority
    ));
    lines.push(format!(
        "  asks for {}; restarts used {} of {}",
        show::request(job),
        job.counted_restarts,
        job.resources.max_restarts
    ));
    if let Some(parallel) = show::Parallelism::of(job) {
        lines.push(format!("  data-parallel: {parallel}"));
    }
    if !job.placement.is_empty() {
        lines.push(format!("  on {}", show::placement(&job.placement)));
    }
    if let Some(progress) = &job.progress {
        lines.push(format!(
            "  progress: {} ({})",
            show::progress_line(progress),
            show::age(progress.at)
        ));
    }
    if !job.trace_id.is_empty() {
        lines.push(format!("  trace: {} (this attempt)", job.trace_id));
    }
    if !job.waiting_reason.is_empty() {
        lines.push(format!("  waiting: {}", job.waiting_reason));
    }
    if let Some(failure) = &job.last_failure {
        lines.push(format!("  last failure: {failure}"));
    }
    if let Some(checkpoint) = &job.latest_checkpoint {
        lines.push(format!(
            "  latest checkpoint: sha256 {}{}",
            &checkpoint.to_hex()[..16],
            if job.state.is_terminal() {
                ""
            } else {
                " (a retry resumes from it)"
            }
        ));
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for a in artifacts {
        *counts.entry(show::kind_name(a.kind)).or_default() += 1;
    }
    if !counts.is_empty() {
        let parts: Vec<String> = counts
            .iter()
            .map(|(k, n)| format!("{n} {k}{}", if *n == 1 { "" } else { "s" }))
            .collect();
        let fetchable = artifacts.iter().any(|a| {
            matches!(
                a.kind,
                ArtifactKind::Lora | ArtifactKind::SampleImage | ArtifactKind::TrainingLog
            )
        });
        lines.push(format!(
            "  artifacts: {}{}",
            parts.join(", "),
            if fetchable {
                format!("; download with `loractl fetch {}`", job.id)
            } else {
                String::new()
            }
        ));
    }
    lines.join("\n")
}

pub async fn list(target: &Target, states: &[JobState], json: bool) -> anyhow::Result<ExitCode> {
    let remote = Remote::connect(target).await?;
    let mut jobs = list_jobs(&remote, states).await?;
    jobs.sort_by_key(|j| j.sequence);
    if json {
        let all: Vec<_> = jobs.iter().map(show::job_json).collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    if jobs.is_empty() {
        println!("no jobs");
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.to_string(),
                j.name.clone(),
                j.state.to_string(),
                j.attempt.to_string(),
                if j.placement.is_empty() {
                    "-".to_owned()
                } else {
                    show::placement(&j.placement)
                },
                show::age(j.submitted_at),
            ]
        })
        .collect();
    println!(
        "{}",
        show::table(
            &[
                "ID",
                "NAME",
                "STATE",
                "ATTEMPT",
                "WORKER [GPUS]",
                "SUBMITTED"
            ],
            &rows
        )
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn cancel(target: &Target, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let remote = Remote::connect(target).await?;
    let reply = remote
        .jobs()
        .await?
        .cancel_job(pb::CancelJobRequest {
            job_id: id.to_owned(),
        })
        .await
        .map_err(|s| remote.refused("CancelJob", &s))?
        .into_inner();
    let job = job_from(reply.job, "CancelJob")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&show::job_json(&job))?);
    } else {
        println!("{}: {}", job.id, job.state);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn logs(target: &Target, id: &str, follow: bool, json: bool) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    let remote = Remote::connect(target).await?;
    let mut stream = remote
        .jobs()
        .await?
        .get_logs(pb::GetLogsRequest {
            job_id: id.to_owned(),
            follow,
        })
        .await
        .map_err(|s| remote.refused("GetLogs", &s))?
        .into_inner();
    let mut out = std::io::stdout().lock();
    let mut any = false;
    while let Some(line) = stream
        .message()
        .await
        .map_err(|s| remote.refused("GetLogs", &s))?
    {
        let line = LogLine::try_from(line)?;
        any = true;
        if json {
            writeln!(out, "{}", show::log_json(&line))?;
        } else {
            writeln!(out, "{}", line.text)?;
        }
        if follow {
            out.flush()?;
        }
    }
    if !any && !json {
        eprintln!(
            "no log lines for {id} (none written yet, or the coordinator restarted or dropped \
             them since)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Every registered worker, with the coordinator's live view (busy GPUs, jobs, draining).
pub(super) async fn list_workers(remote: &Remote) -> anyhow::Result<Vec<Worker>> {
    let reply = remote
        .jobs()
        .await?
        .list_workers(pb::ListWorkersRequest {})
        .await
        .map_err(|s| remote.refused("ListWorkers", &s))?
        .into_inner();
    reply
        .workers
        .into_iter()
        .map(|w| Ok(Worker::try_from(w)?))
        .collect()
}

pub async fn workers(target: &Target, json: bool) -> anyhow::Result<ExitCode> {
    let remote = Remote::connect(target).await?;
    let mut workers = list_workers(&remote).await?;
    workers.sort_by(|a, b| (!a.alive, &a.name).cmp(&(!b.alive, &b.name)));
    if json {
        let all: Vec<_> = workers.iter().map(show::worker_json).collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    if workers.is_empty() {
        println!(
            "no workers registered: start one with `loractl-worker --coordinator URL` (or \
             `loractl up` for an all-in-one)"
        );
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            let jobs: Vec<String> = w.jobs.iter().map(ToString::to_string).collect();
            let gpus = if w.gpus.is_empty() {
                "cpu".to_owned()
            } else {
                let mut names: Vec<String> = Vec::new();
                for g in &w.gpus {
                    if !names.contains(&g.name) {
                        names.push(g.name.clone());
                    }
                }
                format!("{}× {}", w.gpus.len(), names.join(" + "))
            };
            let (free, busy) = if w.gpus.is_empty() {
                let idle = jobs.is_empty();
                (
                    if idle { "cpu" } else { "-" }.to_owned(),
                    if idle { "-" } else { "cpu" }.to_owned(),
                )
            } else {
                let list = |ids: Vec<u32>| {
                    if ids.is_empty() {
                        "-".to_owned()
                    } else {
                        show::gpu_list(&ids)
                    }
                };
                (list(show::free_gpus(w)), list(w.busy_gpus.clone()))
            };
            vec![
                w.id.to_string(),
                w.name.clone(),
                show::worker_state(w).to_owned(),
                gpus,
                free,
                busy,
                show::or_dash(&jobs),
                w.last_seen.map(show::age).unwrap_or_else(|| "never".into()),
            ]
        })
        .collect();
    println!(
        "{}",
        show::table(
            &[
                "ID",
                "NAME",
                "STATE",
                "GPUS",
                "FREE",
                "BUSY",
                "JOBS",
                "LAST HEARD"
            ],
            &rows
        )
    );
    Ok(ExitCode::SUCCESS)
}
