//! The cluster's metrics as the coordinator sees them (names in `loractl_telemetry::names`):
//! jobs by state, queue wait, restarts by reason, finished jobs, workers by state and their
//! heartbeat ages, workers lost. The event loop calls these as things change; they only
//! record.

use std::time::Duration;

use loractl_proto::domain::{FailureKind, Job, JobState, UnixMs, Worker};
use loractl_telemetry::names::{self, label};
use loractl_telemetry::Recorder;

/// The states of a job that has not ended.
const ACTIVE: [JobState; 4] = [
    JobState::Queued,
    JobState::Placed,
    JobState::Running,
    JobState::Restarting,
];

/// Records the cluster's metrics.
pub struct ClusterMetrics(pub Recorder);

impl ClusterMetrics {
    /// Every counter series starts at 0, so that a rate or an alert on a failure that never
    /// happened reads 0 rather than nothing.
    pub fn start_counters(&self) {
        for state in [JobState::Succeeded, JobState::Failed, JobState::Cancelled] {
            self.0
                .add(&names::JOBS_FINISHED_TOTAL, 0, &state_label(state));
        }
        for kind in FailureKind::ALL {
            self.0
                .add(&names::JOB_RESTARTS_TOTAL, 0, &reason_label(kind));
        }
        self.0.add(&names::WORKERS_LOST_TOTAL, 0, &[]);
    }

    /// `job` changed from `before` (its state and when it entered it; `None` for a new job):
    /// how long it waited when it is placed, a restart and its reason, a final state.
    pub fn job_changed(&self, before: Option<(JobState, UnixMs)>, job: &Job) {
        let entered = |state: JobState| job.state == state && before.map(|b| b.0) != Some(state);
        if entered(JobState::Placed) {
            if let Some((_, since)) = before.filter(|b| b.0.is_pending()) {
                let waited = (job.updated_at - since).max(0) as f64 / 1000.0;
                self.0.record(&names::JOB_QUEUE_WAIT_SECONDS, waited, &[]);
            }
        }
        if entered(JobState::Restarting) {
            if let Some(failure) = &job.last_failure {
                self.0
                    .add(&names::JOB_RESTARTS_TOTAL, 1, &reason_label(failure.kind));
            }
        }
        if job.state.is_terminal() && before.is_some() {
            self.0
                .add(&names::JOBS_FINISHED_TOTAL, 1, &state_label(job.state));
        }
    }

    /// The jobs that have not ended, by state (every state, 0 included).
    pub fn jobs(&self, states: impl Iterator<Item = JobState>) {
        let mut counts = ACTIVE.map(|s| (s, 0usize));
        for state in states {
            if let Some((_, n)) = counts.iter_mut().find(|(s, _)| *s == state) {
                *n += 1;
            }
        }
        for (state, n) in counts {
            self.0.set(&names::JOBS, n as f64, &state_label(state));
        }
    }

    /// The live workers with how long ago each was heard from and whether it drains.
    pub fn workers<'a>(&self, workers: impl Iterator<Item = (&'a Worker, Duration, bool)>) {
        let (mut ready, mut draining) = (0, 0);
        self.0.clear(&names::WORKER_HEARTBEAT_AGE_SECONDS);
        for (worker, age, drains) in workers {
            if drains {
                draining += 1;
            } else {
                ready += 1;
            }
            self.0.set(
                &names::WORKER_HEARTBEAT_AGE_SECONDS,
                age.as_secs_f64(),
                &[(label::WORKER, worker.name.clone())],
            );
        }
        for (state, n) in [("ready", ready), ("draining", draining)] {
            self.0.set(
                &names::WORKERS,
                n as f64,
                &[(label::STATE, state.to_owned())],
            );
        }
    }

    pub fn worker_lost(&self) {
        self.0.add(&names::WORKERS_LOST_TOTAL, 1, &[]);
    }
}

fn state_label(state: JobState) -> [(&'static str, String); 1] {
    [(label::STATE, state.as_str().to_owned())]
}

fn reason_label(kind: FailureKind) -> [(&'static str, String); 1] {
    [(label::REASON, label::value(kind.as_str()))]
}
