//! The job state machine: Queued -> Placed -> Running -> Succeeded | Failed | Cancelled, with
//! Restarting between attempts. [`apply`] is the only way a job record changes state; it
//! refuses transitions the machine does not have and applies the failure classification
//! (retry or not, counted against `max_restarts` or not).

use loractl_proto::domain::{
    Digest, Failure, GpuRequest, Job, JobState, RankPlacement, Resources, UnixMs,
};
use loractl_spec::{Gpus, ResolvedSpec};

use crate::error::{Error, Result};

/// Attempts in a row ending with the same counted failure that make a job's final error a
/// crash loop.
pub const CRASH_LOOP_ATTEMPTS: u32 = 3;

/// A change requested of a job.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// Queued or Restarting -> Placed, with one entry per rank.
    Place(Vec<RankPlacement>),
    /// Placed -> Running: a rank reported that it started.
    Start,
    /// Running -> Succeeded.
    Succeed,
    /// Placed or Running -> Restarting (retry) or Failed, decided by the failure's kind and
    /// the restart budget.
    Fail(Failure),
    /// Any non-terminal state -> Cancelled.
    Cancel,
    /// Running: record a resumable checkpoint (no state change).
    Checkpoint(Digest),
}

/// The edges of the state machine.
pub fn allowed(from: JobState, to: JobState) -> bool {
    use JobState::*;
    match from {
        Queued | Restarting => matches!(to, Placed | Cancelled),
        Placed => matches!(to, Running | Restarting | Failed | Cancelled),
        Running => matches!(to, Succeeded | Restarting | Failed | Cancelled),
        Succeeded | Failed | Cancelled => false,
    }
}

/// The job after `transition`, or [`Error::InvalidTransition`] if the machine has no such
/// edge from the job's state.
pub fn apply(job: &Job, transition: Transition, now: UnixMs) -> Result<Job> {
    let mut next = job.clone();
    next.updated_at = now;
    let to = match transition {
        Transition::Place(placement) => {
            check_placement(job, &placement)?;
            next.placement = placement;
            JobState::Placed
        }
        Transition::Start => JobState::Running,
        Transition::Succeed => {
            next.placement.clear();
            JobState::Succeeded
        }
        Transition::Cancel => {
            next.placement.clear();
            JobState::Cancelled
        }
        Transition::Checkpoint(digest) => {
            // Not a state change: only a running job makes checkpoints.
            if job.state != JobState::Running {
                return Err(Error::InvalidTransition {
                    job: job.id.clone(),
                    from: job.state,
                    to: JobState::Running,
                });
            }
            next.latest_checkpoint = Some(digest);
            return Ok(next);
        }
        Transition::Fail(mut failure) => {
            next.placement.clear();
            let to = after_failure(job, &failure);
            let same = job
                .last_failure
                .as_ref()
                .is_some_and(|last| last.kind == failure.kind && last.message == failure.message);
            next.failure_streak = if same {
                job.failure_streak.saturating_add(1)
            } else {
                1
            };
            if to == JobState::Restarting {
                next.attempt += 1;
                if failure.kind.counts_against_restarts() {
                    next.counted_restarts += 1;
                }
            } else if next.failure_streak >= CRASH_LOOP_ATTEMPTS
                && failure.kind.counts_against_restarts()
            {
                failure.message = format!(
                    "crash loop: the last {} attempts all ended the same way ({}: {}); \
                     retrying will not help, fix the job (its spec, data or model) or the \
                     worker it runs on",
                    next.failure_streak, failure.kind, failure.message
                );
            }
            next.last_failure = Some(failure);
            to
        }
    };
    if !allowed(job.state, to) {
        return Err(Error::InvalidTransition {
            job: job.id.clone(),
            from: job.state,
            to,
        });
    }
    next.state = to;
    Ok(next)
}

/// Where a failure leads: Failed when it is not retryable or when a counted failure finds the
/// restart budget spent, Restarting otherwise.
fn after_failure(job: &Job, failure: &Failure) -> JobState {
    if !failure.kind.retryable() {
        return JobState::Failed;
    }
    if failure.kind.counts_against_restarts() && job.counted_restarts >= job.resources.max_restarts
    {
        return JobState::Failed;
    }
    JobState::Restarting
}

fn check_placement(job: &Job, placement: &[RankPlacement]) -> Result<()> {
    let ranks_in_order = placement
        .iter()
        .enumerate()
        .all(|(i, p)| p.rank as usize == i);
    let workers: std::collections::BTreeSet<_> = placement.iter().map(|p| &p.worker_id).collect();
    if placement.is_empty() || workers.len() != job.resources.workers as usize || !ranks_in_order {
        return Err(Error::BadPlacement {
            job: job.id.clone(),
            problem: format!(
                "{} ranks on {} workers given for a job of {} workers (ranks must be 0..n in \
                 order)",
                placement.len(),
                workers.len(),
                job.resources.workers,
            ),
        });
    }
    Ok(())
}

/// What a validated spec asks of the cluster.
pub fn resources(spec: &ResolvedSpec) -> Resources {
    let gpus = match &spec.gpus {
        Gpus::All => GpuRequest::All,
        Gpus::Cpu => GpuRequest::Cpu,
        Gpus::Ids(ids) => GpuRequest::Ids(ids.clone()),
    };
    Resources {
        workers: spec.resources.workers,
        gpus,
        max_restarts: spec.resources.max_restarts,
        ranks_per_worker: spec.resources.ranks_per_worker.max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loractl_proto::domain::{FailureKind, WorkerId};
    use proptest::prelude::*;

    fn job(max_restarts: u32) -> Job {
        crate::state::NewJob {
            name: "zenny".into(),
            spec_toml: String::new(),
            priority: 0,
            resources: Resources {
                workers: 1,
                gpus: GpuRequest::All,
                max_restarts,
                ranks_per_worker: 1,
            },
        }
        .into_job(1, 0)
    }

    fn place() -> Transition {
        Transition::Place(vec![RankPlacement {
            rank: 0,
            worker_id: WorkerId::new("w"),
            gpu_indices: vec![0],
        }])
    }

    fn fail(kind: FailureKind) -> Transition {
        Transition::Fail(Failure {
            kind,
            message: "x".into(),
            rank: None,
        })
    }

    fn run(job: Job, steps: Vec<Transition>) -> Result<Job> {
        steps.into_iter().try_fold(job, |job, t| apply(&job, t, 1))
    }

    #[test]
    fn happy_path() {
        let done = run(
            job(3),
            vec![place(), Transition::Start, Transition::Succeed],
        )
        .unwrap();
        assert_eq!(done.state, JobState::Succeeded);
        assert!(done.placement.is_empty());
        assert_eq!(done.attempt, 0);
    }

    #[test]
    fn invalid_transitions_are_refused() {
        let queued = job(3);
        for t in [
            Transition::Start,
            Transition::Succeed,
            fail(FailureKind::Killed),
        ] {
            let err = apply(&queued, t, 1).unwrap_err();
            assert!(matches!(
                err,
                Error::InvalidTransition {
                    from: JobState::Queued,
                    ..
                }
            ));
        }
        let cancelled = apply(&queued, Transition::Cancel, 1).unwrap();
        let err = apply(&cancelled, place(), 1).unwrap_err();
        assert!(err
            .to_string()
            .contains("cannot go from cancelled to placed"));
        let placed = apply(&queued, place(), 1).unwrap();
        assert!(apply(&placed, place(), 1).is_err());
        let running = apply(&placed, Transition::Start, 1).unwrap();
        assert!(
            apply(&running, Transition::Start, 1).is_err(),
            "a second Start is not a transition"
        );
    }

    #[test]
    fn placement_must_cover_every_rank() {
        let mut two = job(0);
        two.resources.workers = 2;
        assert!(matches!(
            apply(&two, place(), 1),
            Err(Error::BadPlacement { .. })
        ));
    }

    #[test]
    fn lost_worker_and_kill_are_retried_without_counting() {
        let mut j = job(0);
        for kind in [
            FailureKind::WorkerLost,
            FailureKind::Killed,
            FailureKind::WorkerLost,
        ] {
            j = run(j, vec![place(), Transition::Start, fail(kind)]).unwrap();
            assert_eq!(j.state, JobState::Restarting);
        }
        assert_eq!(j.attempt, 3);
        assert_eq!(j.counted_restarts, 0);
    }

    #[test]
    fn bad_config_fails_at_once() {
        let j = run(job(5), vec![place(), fail(FailureKind::BadConfig)]).unwrap();
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(j.attempt, 0);
        assert_eq!(j.last_failure.map(|f| f.kind), Some(FailureKind::BadConfig));
    }

    #[test]
    fn training_errors_spend_the_restart_budget() {
        let mut j = job(2);
        for expected in [1, 2] {
            j = run(
                j,
                vec![place(), Transition::Start, fail(FailureKind::TrainingError)],
            )
            .unwrap();
            assert_eq!(j.state, JobState::Restarting);
            assert_eq!(j.counted_restarts, expected);
        }
        j = run(
            j,
            vec![place(), Transition::Start, fail(FailureKind::TrainingError)],
        )
        .unwrap();
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(j.counted_restarts, 2);
    }

    /// A rank that dies by a signal nobody sent (the 147-attempt loop of an absurd spec that
    /// aborted on allocation) spends the budget, and the job says it was a crash loop.
    #[test]
    fn crashes_spend_the_budget_and_a_loop_says_so() {
        let crash = || {
            Transition::Fail(Failure {
                kind: FailureKind::Crashed,
                message: "rank process killed by signal 6".into(),
                rank: Some(0),
            })
        };
        let mut j = job(3);
        for expected in 1..=3 {
            j = run(j, vec![place(), Transition::Start, crash()]).unwrap();
            assert_eq!(j.state, JobState::Restarting);
            assert_eq!((j.counted_restarts, j.failure_streak), (expected, expected));
        }
        j = run(j, vec![place(), Transition::Start, crash()]).unwrap();
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(j.failure_streak, 4);
        let failure = j.last_failure.unwrap();
        assert_eq!(failure.kind, FailureKind::Crashed);
        assert!(
            failure
                .message
                .starts_with("crash loop: the last 4 attempts")
                && failure.message.contains("signal 6"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn different_failures_are_no_loop() {
        let mut j = job(1);
        j = run(
            j,
            vec![place(), Transition::Start, fail(FailureKind::Crashed)],
        )
        .unwrap();
        j = run(
            j,
            vec![place(), Transition::Start, fail(FailureKind::TrainingError)],
        )
        .unwrap();
        assert_eq!((j.state, j.failure_streak), (JobState::Failed, 1));
        assert_eq!(j.last_failure.unwrap().message, "x");
    }

    #[test]
    fn checkpoints_are_recorded_while_running_and_survive_restarts() {
        let digest = Digest([3; 32]);
        let j = run(
            job(1),
            vec![
                place(),
                Transition::Start,
                Transition::Checkpoint(digest),
                fail(FailureKind::WorkerLost),
            ],
        )
        .unwrap();
        assert_eq!(j.latest_checkpoint, Some(digest));
        assert!(apply(&job(1), Transition::Checkpoint(digest), 1).is_err());
    }

    fn any_transition() -> impl Strategy<Value = Transition> {
        prop_oneof![
            Just(place()),
            Just(Transition::Start),
            Just(Transition::Succeed),
            Just(Transition::Cancel),
            Just(Transition::Checkpoint(Digest([1; 32]))),
            prop_oneof![
                Just(FailureKind::WorkerLost),
                Just(FailureKind::Killed),
                Just(FailureKind::BadConfig),
                Just(FailureKind::TrainingError),
                Just(FailureKind::Crashed),
            ]
            .prop_map(fail),
        ]
    }

    proptest! {
        /// Whatever is asked, accepted changes follow the machine's edges, terminal states
        /// stay terminal, the budget is never overspent, and placement is held exactly while
        /// the job is placed or running.
        #[test]
        fn random_requests_keep_the_invariants(
            max_restarts in 0u32..4,
            steps in proptest::collection::vec(any_transition(), 0..40),
        ) {
            let mut j = job(max_restarts);
            for t in steps {
                match apply(&j, t, 1) {
                    Ok(next) => {
                        prop_assert!(!j.state.is_terminal());
                        prop_assert!(next.state == j.state || allowed(j.state, next.state));
                        prop_assert!(next.attempt >= j.attempt);
                        j = next;
                    }
                    Err(e) => {
                        let invalid = matches!(e, Error::InvalidTransition { .. });
                        prop_assert!(invalid);
                    }
                }
                prop_assert!(j.counted_restarts <= max_restarts);
                prop_assert_eq!(j.state.is_active(), !j.placement.is_empty());
            }
        }
    }
}
