//! One OpenTelemetry trace per job attempt: a root span `job attempt` from the moment the
//! attempt is queued until it ends, with a span per phase (`queued`, `starting`, `training`)
//! and, inside `training`, one per epoch as rank 0 reports it. The root's `traceparent` goes
//! to the workers with the assignment, so their spans (preparing the rank's inputs, uploading
//! its outputs) join the same trace. The spans are `tracing` spans of target
//! [`TRACE_TARGET`]; without telemetry installed they cost next to nothing and have no id.

use std::collections::HashMap;

use loractl_proto::domain::{Job, JobId, JobState};
use loractl_telemetry::{context, TRACE_TARGET};
use tracing::Span;

struct Attempt {
    number: u32,
    root: Span,
    /// The phase the attempt is in, and its span.
    phase: Option<(JobState, Span)>,
    epoch: Option<(u32, Span)>,
}

/// The spans of each job's current attempt.
#[derive(Default)]
pub struct Traces {
    attempts: HashMap<JobId, Attempt>,
}

fn phase_name(state: JobState) -> Option<&'static str> {
    match state {
        JobState::Queued | JobState::Restarting => Some("queued"),
        JobState::Placed => Some("starting"),
        JobState::Running => Some("training"),
        _ => None,
    }
}

impl Traces {
    /// Follows a change of `job`: a new attempt opens its root span, a new state its phase
    /// span, a final state (or the next attempt) ends the attempt's spans.
    pub fn update(&mut self, job: &Job) {
        let current = self.attempts.get(&job.id).map(|a| a.number);
        if current.is_some_and(|n| n != job.attempt) || job.state.is_terminal() {
            if let Some(ended) = self.attempts.remove(&job.id) {
                let outcome = if job.state.is_terminal() {
                    job.state.as_str()
                } else {
                    job.last_failure
                        .as_ref()
                        .map_or("retried", |f| f.kind.as_str())
                };
                ended.root.record("outcome", outcome);
                if !matches!(job.state, JobState::Succeeded) {
                    ended.root.record("otel.status_code", "error");
                }
            }
        }
        if job.state.is_terminal() {
            return;
        }
        let attempt = self.attempts.entry(job.id.clone()).or_insert_with(|| {
            let root = tracing::info_span!(
                target: TRACE_TARGET,
                parent: None,
                "job attempt",
                otel.name = %format!("job {} attempt {}", job.id, job.attempt),
                job_id = %job.id,
                job_name = %job.name,
                attempt = job.attempt,
                outcome = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            );
            Attempt {
                number: job.attempt,
                root,
                phase: None,
                epoch: None,
            }
        });
        let Some(name) = phase_name(job.state) else {
            return;
        };
        if attempt.phase.as_ref().map(|(s, _)| phase_name(*s)) != Some(Some(name)) {
            attempt.epoch = None;
            let span = tracing::info_span!(target: TRACE_TARGET, parent: &attempt.root, "phase", otel.name = name);
            attempt.phase = Some((job.state, span));
        }
    }

    /// Rank 0 of `job`'s attempt `attempt` is in epoch `epoch`: a new epoch opens its span.
    pub fn progress(&mut self, job: &JobId, attempt: u32, epoch: u32) {
        let Some(a) = self.attempts.get_mut(job).filter(|a| a.number == attempt) else {
            return;
        };
        let Some((JobState::Running, training)) = &a.phase else {
            return;
        };
        if a.epoch.as_ref().map(|(e, _)| *e) != Some(epoch) {
            a.epoch = None;
            let span = tracing::info_span!(
                target: TRACE_TARGET,
                parent: training,
                "epoch",
                otel.name = %format!("epoch {epoch}"),
                epoch,
            );
            a.epoch = Some((epoch, span));
        }
    }

    /// The W3C `traceparent` of `job`'s current attempt; empty when it has none.
    pub fn traceparent(&self, job: &JobId) -> String {
        self.attempts
            .get(job)
            .map(|a| context::traceparent(&a.root))
            .unwrap_or_default()
    }

    /// The trace id of `job`'s current attempt; empty when it has none.
    pub fn trace_id(&self, job: &JobId) -> String {
        context::trace_id(&self.traceparent(job))
            .unwrap_or_default()
            .to_owned()
    }
}
