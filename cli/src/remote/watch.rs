//! `loractl watch JOB`: follows a job until it ends, with a progress bar (step/total, it/s,
//! loss, ETA, worker and GPUs) on a terminal, a line every few seconds otherwise, or one JSON
//! object per event with `--json`. A lost coordinator (restart, network) is reconnected to
//! for a while before giving up. Exits 0 when the job succeeded, 1 when it failed or was
//! cancelled.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use loractl_proto::domain::{Job, JobEvent, JobState, Progress};
use loractl_proto::pb;
use serde_json::json;
use tonic::Code;

use super::show;
use super::{Remote, Target};

/// How long the coordinator may stay unreachable before `watch` gives up.
const RECONNECT_FOR: Duration = Duration::from_secs(120);
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Plain-text mode prints a progress line at most this often.
const LINE_EVERY: Duration = Duration::from_secs(2);

/// Why a watch stream ended without the job's end.
enum Interrupted {
    /// The coordinator went away: try again.
    Lost(String),
    /// Asking again will not help (unknown job, wrong token).
    Refused(anyhow::Error),
}

pub async fn watch(target: &Target, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let remote = Remote::connect(target).await?;
    let mut display = Display::new(json);
    let mut backoff = BACKOFF_START;
    let mut lost_since: Option<Instant> = None;
    loop {
        match follow(&remote, id, &mut display, &mut lost_since).await {
            Ok(job) => return Ok(display.finish(&job)),
            Err(Interrupted::Refused(e)) => {
                display.abandon();
                return Err(e);
            }
            Err(Interrupted::Lost(why)) => {
                let since = *lost_since.get_or_insert_with(|| {
                    display.note(&format!(
                        "lost the coordinator ({why}); reconnecting for up to {}s",
                        RECONNECT_FOR.as_secs()
                    ));
                    Instant::now()
                });
                if since.elapsed() > RECONNECT_FOR {
                    display.abandon();
                    anyhow::bail!(
                        "the coordinator has been unreachable for {}s ({why}); the job goes on \
                         without us: `loractl watch {id}` again later",
                        RECONNECT_FOR.as_secs()
                    );
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// One watch stream: returns the job once it ended.
async fn follow(
    remote: &Remote,
    id: &str,
    display: &mut Display,
    lost_since: &mut Option<Instant>,
) -> Result<Job, Interrupted> {
    let transient = |code: Code| {
        matches!(
            code,
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted | Code::Internal
        )
    };
    let mut client = remote
        .jobs()
        .await
        .map_err(|e| Interrupted::Lost(format!("{e:#}")))?;
    let mut stream = match client
        .watch_job(pb::WatchJobRequest {
            job_id: id.to_owned(),
        })
        .await
    {
        Ok(reply) => reply.into_inner(),
        Err(status) if transient(status.code()) => {
            return Err(Interrupted::Lost(status.message().to_owned()))
        }
        Err(status) => return Err(Interrupted::Refused(remote.refused("WatchJob", &status))),
    };
    loop {
        let event = match stream.message().await {
            Ok(Some(event)) => event,
            Ok(None) => return Err(Interrupted::Lost("the stream ended".into())),
            Err(status) if transient(status.code()) => {
                return Err(Interrupted::Lost(status.message().to_owned()))
            }
            Err(status) => return Err(Interrupted::Refused(remote.refused("WatchJob", &status))),
        };
        if lost_since.take().is_some() {
            display.note("reconnected to the coordinator");
        }
        match JobEvent::try_from(event) {
            Ok(JobEvent::State(job)) => {
                display.state(&job);
                if job.state.is_terminal() {
                    return Ok(job);
                }
            }
            Ok(JobEvent::Progress(progress)) => display.progress(&progress),
            Err(e) => return Err(Interrupted::Refused(e.into())),
        }
    }
}

struct Display {
    json: bool,
    tty: bool,
    job: Option<Job>,
    bar: Option<ProgressBar>,
    last_line: Option<Instant>,
    last_attempt: Option<u32>,
}

impl Display {
    fn new(json: bool) -> Self {
        Self {
            json,
            tty: std::io::stderr().is_terminal(),
            job: None,
            bar: None,
            last_line: None,
            last_attempt: None,
        }
    }

    fn note(&self, text: &str) {
        if self.json {
            println!("{}", json!({"event": "note", "text": text}));
            return;
        }
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn where_(&self) -> String {
        match &self.job {
            Some(job) if !job.placement.is_empty() => {
                format!("on {}", show::placement(&job.placement))
            }
            _ => String::new(),
        }
    }

    fn state(&mut self, job: &Job) {
        if self.json {
            println!("{}", json!({"event": "state", "job": show::job_json(job)}));
            self.job = Some(job.clone());
            return;
        }
        let before = self.job.as_ref();
        let changed = before.is_none_or(|b| {
            b.state != job.state || b.attempt != job.attempt || b.placement != job.placement
        });
        let new_checkpoint = before.is_some_and(|b| b.latest_checkpoint != job.latest_checkpoint)
            && job.latest_checkpoint.is_some();
        let new_reason = before.is_some_and(|b| b.waiting_reason != job.waiting_reason)
            && !job.waiting_reason.is_empty();
        let id = &job.id;
        if changed {
            let text = match job.state {
                JobState::Queued if !job.waiting_reason.is_empty() => {
                    format!("{id} ({}): queued: {}", job.name, job.waiting_reason)
                }
                JobState::Queued => format!(
                    "{id} ({}): queued, waiting for {}",
                    job.name,
                    show::request(job)
                ),
                JobState::Placed => format!(
                    "{id}: placed {} (attempt {})",
                    format_args!("on {}", show::placement(&job.placement)),
                    job.attempt
                ),
                JobState::Running => format!(
                    "{id}: running on {} (attempt {})",
                    show::placement(&job.placement),
                    job.attempt
                ),
                JobState::Restarting => format!(
                    "{id}: attempt {} ended: {}; waiting to be placed again{}",
                    job.attempt.saturating_sub(1),
                    job.last_failure
                        .as_ref()
                        .map_or_else(|| "no reason given".to_owned(), ToString::to_string),
                    if job.latest_checkpoint.is_some() {
                        ", resuming from its latest checkpoint"
                    } else {
                        ""
                    }
                ),
                JobState::Succeeded => format!("{id}: succeeded"),
                JobState::Failed => format!(
                    "{id}: failed: {}",
                    job.last_failure
                        .as_ref()
                        .map_or_else(|| "no reason given".to_owned(), ToString::to_string)
                ),
                JobState::Cancelled => format!("{id}: cancelled"),
            };
            self.note(&text);
        } else if new_reason {
            self.note(&format!("{id}: waiting: {}", job.waiting_reason));
        } else if new_checkpoint && !self.tty {
            self.note(&format!("{id}: checkpoint stored"));
        }
        self.job = Some(job.clone());
    }

    fn progress(&mut self, p: &Progress) {
        if self.json {
            println!(
                "{}",
                json!({"event": "progress", "progress": show::progress_json(p)})
            );
            return;
        }
        let eta = if p.steps_per_second > 0.0 && p.total_steps >= p.step {
            show::duration(((p.total_steps - p.step) as f64 / p.steps_per_second).round() as u64)
        } else {
            "?".to_owned()
        };
        let text = format!(
            "loss {:.4} · {:.2} it/s · eta {eta} · {}",
            p.loss,
            p.steps_per_second,
            self.where_()
        );
        let new_attempt = self.last_attempt != Some(p.attempt);
        self.last_attempt = Some(p.attempt);
        if self.tty {
            let bar = self.bar.get_or_insert_with(|| {
                let bar = ProgressBar::with_draw_target(
                    Some(p.total_steps),
                    ProgressDrawTarget::stderr(),
                );
                let style = ProgressStyle::with_template(
                    "{prefix} {percent:>3}%|{bar:30}| {pos}/{len} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar());
                bar.set_style(style.progress_chars("█▉▊▋▌▍▎▏ "));
                bar.set_prefix(p.job_id.to_string());
                bar
            });
            bar.set_length(p.total_steps);
            bar.set_position(p.step);
            bar.set_message(text);
            return;
        }
        let due = self.last_line.is_none_or(|t| t.elapsed() >= LINE_EVERY);
        if new_attempt || due || p.step == p.total_steps {
            self.last_line = Some(Instant::now());
            eprintln!("{}: step {}/{} · {text}", p.job_id, p.step, p.total_steps);
        }
    }

    fn abandon(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }

    fn finish(&mut self, job: &Job) -> ExitCode {
        self.abandon();
        if job.state == JobState::Succeeded {
            if !self.json {
                eprintln!("download the LoRA with: loractl fetch {}", job.id);
            }
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    }
}
