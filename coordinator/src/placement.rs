//! Placement: which workers and GPUs each job's ranks get, as a pure function
//! `(jobs, workers, previous placement) -> placement` that the coordinator calls every round.
//!
//! Goals, in order:
//! 1. Never two jobs on one GPU, never a GPU the worker did not pin, never more CPU ranks on a
//!    worker than its CPU slots.
//! 2. Gang placement: all ranks of a job or none. A job spans `resources.workers` distinct
//!    workers; on each it runs one rank per GPU it takes there (`"all"`: every pinned GPU, so
//!    the world size depends on the workers chosen), or `ranks_per_worker` CPU ranks, which
//!    share one CPU slot of the worker.
//! 3. Placed jobs stay where they are (no migration of running training).
//! 4. Higher priority first, then submission order. A later job may use resources an earlier
//!    one cannot use (backfill) ...
//! 5. ... but a job passed over for `reserve_after_rounds` rounds reserves the workers it will
//!    run on: no later job is placed there, so a stream of small jobs cannot starve a large
//!    one. A job no worker could ever hold (e.g. 8 GPUs on one worker when none has 8)
//!    reserves nothing and waits.
//! 6. Among workers that fit, the one with the fewest free GPUs (keep large holes for large
//!    jobs), then by id, so the result is deterministic.

use std::collections::{BTreeMap, BTreeSet};

use loractl_proto::domain::{GpuRequest, JobId, RankPlacement, Resources, WorkerId};

/// A job that holds or wants resources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRequest {
    pub id: JobId,
    pub priority: i32,
    pub sequence: u64,
    pub resources: Resources,
}

/// A live worker's capacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSlots {
    pub id: WorkerId,
    /// Pinned GPU indices.
    pub gpus: Vec<u32>,
    /// How many CPU ranks the worker runs at once.
    pub cpu_slots: u32,
    /// False while the worker is disconnected but not yet declared lost: its placed jobs stay,
    /// no new ones go there.
    pub accepts_new_work: bool,
}

/// The result of a round, fed back as the next round's `previous`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    pub jobs: BTreeMap<JobId, Vec<RankPlacement>>,
    /// Rounds each still-waiting job has been passed over.
    pub waited: BTreeMap<JobId, u32>,
    /// Workers held for a starving job this round.
    pub reserved: BTreeMap<WorkerId, JobId>,
    /// Why each waiting job was not placed this round, in words for people.
    pub reasons: BTreeMap<JobId, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Rounds a job may be passed over before it reserves workers.
    pub reserve_after_rounds: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            reserve_after_rounds: crate::standalone::defaults::RESERVE_AFTER_ROUNDS,
        }
    }
}

/// Free capacity of one worker during a round.
#[derive(Debug, Clone)]
struct Free {
    pinned: BTreeSet<u32>,
    gpus: BTreeSet<u32>,
    cpu: u32,
    cpu_slots: u32,
    accepts_new_work: bool,
}

impl Free {
    /// The ranks `resources` would run here now, if they fit: each rank's GPUs (one GPU per
    /// rank; none for CPU ranks).
    fn take(&self, resources: &Resources) -> Option<Vec<Vec<u32>>> {
        match &resources.gpus {
            GpuRequest::Cpu => {
                (self.cpu > 0).then(|| vec![Vec::new(); resources.ranks_per_worker.max(1) as usize])
            }
            GpuRequest::All => (!self.pinned.is_empty() && self.gpus == self.pinned)
                .then(|| self.pinned.iter().map(|g| vec![*g]).collect()),
            GpuRequest::Ids(ids) => ids
                .iter()
                .all(|id| self.gpus.contains(id))
                .then(|| ids.iter().map(|g| vec![*g]).collect()),
        }
    }

    /// Whether a rank of `request` fits here once the worker is idle.
    fn could_ever_take(&self, request: &GpuRequest) -> bool {
        match request {
            GpuRequest::Cpu => self.cpu_slots > 0,
            GpuRequest::All => !self.pinned.is_empty(),
            GpuRequest::Ids(ids) => ids.iter().all(|id| self.pinned.contains(id)),
        }
    }

    /// Takes what a job's ranks on this worker hold: their GPUs, or one CPU slot however
    /// many CPU ranks share it.
    fn claim<'a>(
        &mut self,
        request: &GpuRequest,
        ranks: impl IntoIterator<Item = &'a RankPlacement>,
    ) {
        if matches!(request, GpuRequest::Cpu) {
            self.cpu = self.cpu.saturating_sub(1);
        }
        for rank in ranks {
            for gpu in &rank.gpu_indices {
                self.gpus.remove(gpu);
            }
        }
    }
}

/// The ranks of `placement` grouped by worker, in rank order.
fn by_worker(placement: &[RankPlacement]) -> BTreeMap<&WorkerId, Vec<&RankPlacement>> {
    let mut hosts: BTreeMap<&WorkerId, Vec<&RankPlacement>> = BTreeMap::new();
    for rank in placement {
        hosts.entry(&rank.worker_id).or_default().push(rank);
    }
    hosts
}

/// Claims everything `placement` holds in `free`.
fn claim_all(
    free: &mut BTreeMap<WorkerId, Free>,
    request: &GpuRequest,
    placement: &[RankPlacement],
) {
    for (worker, ranks) in by_worker(placement) {
        if let Some(f) = free.get_mut(worker) {
            f.claim(request, ranks);
        }
    }
}

fn free_of(workers: &[WorkerSlots]) -> BTreeMap<WorkerId, Free> {
    workers
        .iter()
        .map(|w| {
            let pinned: BTreeSet<u32> = w.gpus.iter().copied().collect();
            let free = Free {
                gpus: pinned.clone(),
                pinned,
                cpu: w.cpu_slots,
                cpu_slots: w.cpu_slots,
                accepts_new_work: w.accepts_new_work,
            };
            (w.id.clone(), free)
        })
        .collect()
}

/// Orders jobs as the queue does: priority descending, then submission order.
pub fn queue_order(a: &JobRequest, b: &JobRequest) -> std::cmp::Ordering {
    b.priority
        .cmp(&a.priority)
        .then(a.sequence.cmp(&b.sequence))
        .then(a.id.cmp(&b.id))
}

/// Tries to gang-place `job` on the workers of `free` not in `excluded`: `resources.workers`
/// workers, each with its ranks numbered on from the previous worker's; `None` if not all
/// fit.
fn try_place(
    job: &JobRequest,
    free: &BTreeMap<WorkerId, Free>,
    excluded: &BTreeMap<WorkerId, JobId>,
) -> Option<Vec<RankPlacement>> {
    let mut candidates: Vec<(usize, &WorkerId, Vec<Vec<u32>>)> = free
        .iter()
        .filter(|(id, f)| f.accepts_new_work && !excluded.contains_key(*id))
        .filter_map(|(id, f)| f.take(&job.resources).map(|g| (f.gpus.len(), id, g)))
        .collect();
    let hosts = job.resources.workers as usize;
    if candidates.len() < hosts {
        return None;
    }
    candidates.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(b.1)));
    let placement = candidates
        .into_iter()
        .take(hosts)
        .flat_map(|(_, id, ranks)| ranks.into_iter().map(move |gpus| (id, gpus)))
        .enumerate()
        .map(|(rank, (id, gpus))| RankPlacement {
            rank: rank as u32,
            worker_id: id.clone(),
            gpu_indices: gpus,
        })
        .collect();
    Some(placement)
}

/// Whether `placement` (kept from an earlier round) still fits: ranks `0..n` in order,
/// `resources.workers` distinct workers, all alive; GPU ranks on pinned, free GPUs, none
/// shared; CPU ranks on workers with a CPU slot left.
fn still_fits(
    job: &JobRequest,
    placement: &[RankPlacement],
    free: &BTreeMap<WorkerId, Free>,
) -> bool {
    let in_order = placement
        .iter()
        .enumerate()
        .all(|(i, p)| p.rank as usize == i);
    let hosts = by_worker(placement);
    let mut gpus = BTreeSet::new();
    let distinct = placement
        .iter()
        .flat_map(|p| p.gpu_indices.iter().map(move |g| (&p.worker_id, *g)))
        .all(|g| gpus.insert(g));
    !placement.is_empty()
        && in_order
        && distinct
        && hosts.len() == job.resources.workers as usize
        && hosts.iter().all(|(worker, ranks)| {
            free.get(*worker).is_some_and(|f| match job.resources.gpus {
                GpuRequest::Cpu => f.cpu > 0 && ranks.iter().all(|p| p.gpu_indices.is_empty()),
                _ => ranks.iter().all(|p| {
                    !p.gpu_indices.is_empty() && p.gpu_indices.iter().all(|g| f.gpus.contains(g))
                }),
            })
        })
}

/// Workers a starving job will run on: those that could hold one of its ranks once idle, most
/// of the needed GPUs already free first. `None` if there are not enough such workers.
fn reservation(
    job: &JobRequest,
    free: &BTreeMap<WorkerId, Free>,
    reserved: &BTreeMap<WorkerId, JobId>,
) -> Option<Vec<WorkerId>> {
    let request = &job.resources.gpus;
    let mut candidates: Vec<(usize, &WorkerId)> = free
        .iter()
        .filter(|(id, f)| {
            f.accepts_new_work && !reserved.contains_key(*id) && f.could_ever_take(request)
        })
        .map(|(id, f)| {
            let ready = match request {
                GpuRequest::Cpu => f.cpu as usize,
                GpuRequest::All => f.gpus.len(),
                GpuRequest::Ids(ids) => ids.iter().filter(|g| f.gpus.contains(g)).count(),
            };
            (ready, id)
        })
        .collect();
    let ranks = job.resources.workers as usize;
    if candidates.len() < ranks {
        return None;
    }
    candidates.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    Some(
        candidates
            .into_iter()
            .take(ranks)
            .map(|(_, id)| id.clone())
            .collect(),
    )
}

fn describe(request: &GpuRequest) -> String {
    match request {
        GpuRequest::Cpu => "a free CPU slot".to_owned(),
        GpuRequest::All => "all its pinned GPUs free".to_owned(),
        GpuRequest::Ids(ids) if ids.len() == 1 => format!("GPU {} pinned and free", ids[0]),
        GpuRequest::Ids(ids) => {
            let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
            format!("GPUs {} pinned and free", ids.join(","))
        }
    }
}

/// Why `job` could not be placed on what is left this round.
fn why_waiting(
    job: &JobRequest,
    free: &BTreeMap<WorkerId, Free>,
    reserved: &BTreeMap<WorkerId, JobId>,
) -> String {
    let needed = job.resources.workers as usize;
    let request = &job.resources.gpus;
    let workers = if needed == 1 {
        "a worker".to_owned()
    } else {
        format!("{needed} workers")
    };
    let open: Vec<&Free> = free.values().filter(|f| f.accepts_new_work).collect();
    let capable = open.iter().filter(|f| f.could_ever_take(request)).count();
    if capable < needed {
        return format!(
            "needs {workers} with {}; {capable} connected worker(s) could ever hold it",
            describe(request)
        );
    }
    let ready = free
        .iter()
        .filter(|(id, f)| f.accepts_new_work && !reserved.contains_key(*id))
        .filter(|(_, f)| f.take(&job.resources).is_some())
        .count();
    let mut reason = format!(
        "waiting for {workers} with {} ({ready} now)",
        describe(request)
    );
    if free
        .iter()
        .any(|(id, f)| reserved.contains_key(id) && f.take(&job.resources).is_some())
    {
        reason.push_str("; some are held for a job that waited longer");
    }
    reason
}

/// One placement round. `jobs` are the jobs that hold or want resources (placed, running and
/// waiting ones); those with an entry in `previous.jobs` keep it while it still fits, the
/// others are placed in queue order.
pub fn place(
    jobs: &[JobRequest],
    workers: &[WorkerSlots],
    previous: &Placement,
    policy: &Policy,
) -> Placement {
    let mut free = free_of(workers);
    let mut next = Placement::default();
    let mut ordered: Vec<&JobRequest> = jobs.iter().collect();
    ordered.sort_by(|a, b| queue_order(a, b));

    let mut waiting = Vec::new();
    for job in ordered {
        match previous.jobs.get(&job.id) {
            Some(placement) if still_fits(job, placement, &free) => {
                claim_all(&mut free, &job.resources.gpus, placement);
                next.jobs.insert(job.id.clone(), placement.clone());
            }
            _ => waiting.push(job),
        }
    }

    for job in waiting {
        if let Some(placement) = try_place(job, &free, &next.reserved) {
            claim_all(&mut free, &job.resources.gpus, &placement);
            next.jobs.insert(job.id.clone(), placement);
            continue;
        }
        let waited = previous.waited.get(&job.id).copied().unwrap_or(0) + 1;
        next.waited.insert(job.id.clone(), waited);
        next.reasons
            .insert(job.id.clone(), why_waiting(job, &free, &next.reserved));
        if waited > policy.reserve_after_rounds {
            if let Some(workers) = reservation(job, &free, &next.reserved) {
                for worker in workers {
                    next.reserved.insert(worker, job.id.clone());
                }
            }
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn worker(id: &str, gpus: &[u32], cpu_slots: u32) -> WorkerSlots {
        WorkerSlots {
            id: WorkerId::new(id),
            gpus: gpus.to_vec(),
            cpu_slots,
            accepts_new_work: true,
        }
    }

    fn job(id: &str, priority: i32, sequence: u64, workers: u32, gpus: GpuRequest) -> JobRequest {
        JobRequest {
            id: JobId::new(id),
            priority,
            sequence,
            resources: Resources {
                workers,
                gpus,
                max_restarts: 0,
                ranks_per_worker: 1,
            },
        }
    }

    fn ids(v: &[u32]) -> GpuRequest {
        GpuRequest::Ids(v.to_vec())
    }

    #[test]
    fn gang_job_waits_for_enough_workers() {
        let workers = [worker("a", &[0, 1], 1)];
        let jobs = [job("j1", 0, 1, 2, GpuRequest::All)];
        let p = place(&jobs, &workers, &Placement::default(), &Policy::default());
        assert!(p.jobs.is_empty(), "half a gang is never placed");
        let workers = [worker("a", &[0, 1], 1), worker("b", &[0], 1)];
        let p = place(&jobs, &workers, &p, &Policy::default());
        let placed = &p.jobs[&JobId::new("j1")];
        // One rank per GPU: b's one and a's two.
        assert_eq!(placed.len(), 3);
        assert_eq!(by_worker(placed).len(), 2);
    }

    #[test]
    fn two_gpu_job_waits_for_a_worker_with_two_free_pinned_gpus() {
        let workers = [worker("a", &[0, 1], 0)];
        let running = place(
            &[job("small", 0, 1, 1, ids(&[0]))],
            &workers,
            &Placement::default(),
            &Policy::default(),
        );
        let jobs = [
            job("small", 0, 1, 1, ids(&[0])),
            job("big", 0, 2, 1, ids(&[0, 1])),
        ];
        let p = place(&jobs, &workers, &running, &Policy::default());
        assert!(!p.jobs.contains_key(&JobId::new("big")));
        // `small` finished: `big` gets both GPUs, one rank on each.
        let p = place(&jobs[1..], &workers, &p, &Policy::default());
        let big = &p.jobs[&JobId::new("big")];
        assert_eq!(big.len(), 2);
        assert_eq!((big[0].rank, big[0].gpu_indices.clone()), (0, vec![0]));
        assert_eq!((big[1].rank, big[1].gpu_indices.clone()), (1, vec![1]));
        assert!(big.iter().all(|r| r.worker_id == WorkerId::new("a")));
    }

    #[test]
    fn all_gpus_of_each_worker_make_the_world() {
        let workers = [worker("a", &[0, 1, 2, 3], 0), worker("b", &[0, 1], 0)];
        let p = place(
            &[job("j", 0, 1, 2, GpuRequest::All)],
            &workers,
            &Placement::default(),
            &Policy::default(),
        );
        let ranks = &p.jobs[&JobId::new("j")];
        let got: Vec<(u32, &str, Vec<u32>)> = ranks
            .iter()
            .map(|r| (r.rank, r.worker_id.as_str(), r.gpu_indices.clone()))
            .collect();
        // Fewest free GPUs first: worker b holds ranks 0 and 1, worker a ranks 2 to 5.
        assert_eq!(
            got,
            vec![
                (0, "b", vec![0]),
                (1, "b", vec![1]),
                (2, "a", vec![0]),
                (3, "a", vec![1]),
                (4, "a", vec![2]),
                (5, "a", vec![3]),
            ]
        );
    }

    #[test]
    fn cpu_ranks_of_one_job_share_one_slot_of_a_worker() {
        let workers = [worker("a", &[], 1)];
        let mut two = job("two", 0, 1, 1, GpuRequest::Cpu);
        two.resources.ranks_per_worker = 2;
        let other = job("other", 0, 2, 1, GpuRequest::Cpu);
        let p = place(
            &[two.clone(), other.clone()],
            &workers,
            &Placement::default(),
            &Policy::default(),
        );
        let ranks = &p.jobs[&JobId::new("two")];
        assert_eq!(ranks.len(), 2);
        assert!(ranks
            .iter()
            .all(|r| r.gpu_indices.is_empty() && r.worker_id.as_str() == "a"));
        assert_eq!((ranks[0].rank, ranks[1].rank), (0, 1));
        assert!(
            !p.jobs.contains_key(&JobId::new("other")),
            "the slot is taken"
        );
        // Kept in the next round, unchanged.
        let again = place(&[two, other], &workers, &p, &Policy::default());
        assert_eq!(again.jobs.get(&JobId::new("two")), Some(ranks));
    }

    #[test]
    fn disconnected_workers_keep_their_jobs_but_get_no_new_ones() {
        let mut workers = vec![worker("a", &[0], 0), worker("b", &[0], 0)];
        let first = place(
            &[job("j1", 0, 1, 1, GpuRequest::All)],
            &workers,
            &Placement::default(),
            &Policy::default(),
        );
        let host = first.jobs[&JobId::new("j1")][0].worker_id.clone();
        for w in &mut workers {
            w.accepts_new_work = false;
        }
        let jobs = [
            job("j1", 0, 1, 1, GpuRequest::All),
            job("j2", 0, 2, 1, GpuRequest::All),
        ];
        let p = place(&jobs, &workers, &first, &Policy::default());
        assert_eq!(p.jobs[&JobId::new("j1")][0].worker_id, host);
        assert!(!p.jobs.contains_key(&JobId::new("j2")));
    }

    #[test]
    fn priority_beats_submission_order() {
        let workers = [worker("a", &[0], 0)];
        let jobs = [
            job("old", 0, 1, 1, GpuRequest::All),
            job("urgent", 5, 2, 1, GpuRequest::All),
        ];
        let p = place(&jobs, &workers, &Placement::default(), &Policy::default());
        assert!(p.jobs.contains_key(&JobId::new("urgent")));
        assert!(!p.jobs.contains_key(&JobId::new("old")));
    }

    #[test]
    fn best_fit_keeps_whole_workers_free() {
        let workers = [worker("a", &[0, 1], 0), worker("b", &[0, 1], 0)];
        let first = place(
            &[job("s1", 0, 1, 1, ids(&[0]))],
            &workers,
            &Placement::default(),
            &Policy::default(),
        );
        let jobs = [job("s1", 0, 1, 1, ids(&[0])), job("s2", 0, 2, 1, ids(&[1]))];
        let p = place(&jobs, &workers, &first, &Policy::default());
        assert_eq!(
            p.jobs[&JobId::new("s2")][0].worker_id,
            p.jobs[&JobId::new("s1")][0].worker_id,
            "the second small job packs next to the first"
        );
    }

    /// One worker with `gpus` GPUs; every round `arrivals` one-GPU jobs arrive, each runs
    /// `duration` rounds; a job asking for the whole worker arrives at round 1. Returns the
    /// round the large job is placed in, if within `rounds`.
    fn simulate(
        policy: Policy,
        gpus: u32,
        arrivals: usize,
        duration: u32,
        rounds: u32,
    ) -> Option<u32> {
        let pinned: Vec<u32> = (0..gpus).collect();
        let workers = [worker("w", &pinned, 0)];
        let mut placement = Placement::default();
        let mut live: Vec<(JobRequest, u32)> = Vec::new(); // (job, rounds left once placed)
        let mut sequence = 0;
        let mut small = 0u32;
        let big = JobId::new("big");
        for round in 0..rounds {
            if round == 1 {
                sequence += 1;
                live.push((job("big", 0, sequence, 1, GpuRequest::All), u32::MAX));
            }
            for _ in 0..arrivals {
                sequence += 1;
                let id = format!("s{sequence}");
                small += 1;
                let gpu = small % gpus;
                live.push((job(&id, 0, sequence, 1, ids(&[gpu])), duration));
            }
            let jobs: Vec<JobRequest> = live.iter().map(|(j, _)| j.clone()).collect();
            placement = place(&jobs, &workers, &placement, &policy);
            if placement.jobs.contains_key(&big) {
                return Some(round);
            }
            for (j, left) in live.iter_mut() {
                if placement.jobs.contains_key(&j.id) {
                    *left -= 1;
                }
            }
            live.retain(|(_, left)| *left > 0);
            placement
                .jobs
                .retain(|id, _| live.iter().any(|(j, _)| &j.id == id));
        }
        None
    }

    #[test]
    fn without_reservation_small_jobs_starve_a_large_one() {
        let never = Policy {
            reserve_after_rounds: u32::MAX,
        };
        assert_eq!(simulate(never, 2, 1, 2, 50), None);
        assert!(simulate(Policy::default(), 2, 1, 2, 50).is_some());
    }

    #[test]
    fn waiting_jobs_say_why() {
        let workers = [worker("a", &[0], 0), worker("b", &[0, 1], 0)];
        let jobs = [
            job("busy", 0, 1, 1, ids(&[0, 1])),
            job("pair", 0, 2, 1, ids(&[0, 1])),
            job("huge", 0, 3, 1, ids(&[0, 1, 2])),
            job("wide", 0, 4, 3, GpuRequest::All),
        ];
        let p = place(&jobs, &workers, &Placement::default(), &Policy::default());
        assert!(p.jobs.contains_key(&JobId::new("busy")));
        assert_eq!(
            p.reasons[&JobId::new("pair")],
            "waiting for a worker with GPUs 0,1 pinned and free (0 now)"
        );
        assert_eq!(
            p.reasons[&JobId::new("huge")],
            "needs a worker with GPUs 0,1,2 pinned and free; 0 connected worker(s) could ever hold it"
        );
        assert_eq!(
            p.reasons[&JobId::new("wide")],
            "needs 3 workers with all its pinned GPUs free; 2 connected worker(s) could ever hold it"
        );
        assert!(!p.reasons.contains_key(&JobId::new("busy")));
    }

    #[test]
    fn a_job_no_worker_can_hold_reserves_nothing() {
        let workers = [worker("a", &[0], 0)];
        let jobs = [
            job("huge", 0, 1, 1, ids(&[0, 1])),
            job("small", 0, 2, 1, ids(&[0])),
        ];
        let policy = Policy {
            reserve_after_rounds: 0,
        };
        let p = place(&jobs, &workers, &Placement::default(), &policy);
        assert!(p.reserved.is_empty());
        assert!(p.jobs.contains_key(&JobId::new("small")));
        assert_eq!(p.waited[&JobId::new("huge")], 1);
    }

    // ---- property tests ----

    fn arb_request() -> impl Strategy<Value = GpuRequest> {
        prop_oneof![
            1 => Just(GpuRequest::Cpu),
            1 => Just(GpuRequest::All),
            3 => proptest::sample::subsequence(vec![0u32, 1, 2, 3], 1..=3).prop_map(GpuRequest::Ids),
        ]
    }

    fn arb_workers() -> impl Strategy<Value = Vec<WorkerSlots>> {
        proptest::collection::vec(
            (
                proptest::sample::subsequence(vec![0u32, 1, 2, 3], 0..=4),
                0u32..3,
            ),
            1..5,
        )
        .prop_map(|ws| {
            ws.into_iter()
                .enumerate()
                .map(|(i, (gpus, cpu))| worker(&format!("w{i}"), &gpus, cpu))
                .collect()
        })
    }

    fn arb_jobs() -> impl Strategy<Value = Vec<JobRequest>> {
        proptest::collection::vec((0i32..3, 1u32..4, arb_request(), 1u32..4), 0..12).prop_map(
            |js| {
                js.into_iter()
                    .enumerate()
                    .map(|(i, (priority, workers, gpus, per_worker))| {
                        let cpu = gpus == GpuRequest::Cpu;
                        let mut j = job(&format!("j{i}"), priority, i as u64, workers, gpus);
                        if cpu {
                            j.resources.ranks_per_worker = per_worker;
                        }
                        j
                    })
                    .collect()
            },
        )
    }

    fn check_capacity(
        workers: &[WorkerSlots],
        jobs: &[JobRequest],
        p: &Placement,
    ) -> Result<(), TestCaseError> {
        let mut used_gpus = BTreeSet::new();
        let mut used_cpu: BTreeMap<&WorkerId, u32> = BTreeMap::new();
        for (id, ranks) in &p.jobs {
            let job = jobs
                .iter()
                .find(|j| &j.id == id)
                .expect("placed job is one of the inputs");
            let hosts = by_worker(ranks);
            prop_assert_eq!(
                hosts.len(),
                job.resources.workers as usize,
                "gang: every worker of the job"
            );
            for (host, on_host) in &hosts {
                let w = workers
                    .iter()
                    .find(|w| &&w.id == host)
                    .expect("live worker");
                let gpus: BTreeSet<u32> = on_host
                    .iter()
                    .flat_map(|r| r.gpu_indices.iter().copied())
                    .collect();
                match &job.resources.gpus {
                    GpuRequest::Cpu => {
                        prop_assert_eq!(on_host.len(), job.resources.ranks_per_worker as usize);
                        *used_cpu.entry(&w.id).or_default() += 1;
                    }
                    GpuRequest::All => {
                        prop_assert_eq!(gpus, w.gpus.iter().copied().collect::<BTreeSet<u32>>())
                    }
                    GpuRequest::Ids(ids) => {
                        prop_assert_eq!(gpus, ids.iter().copied().collect::<BTreeSet<u32>>())
                    }
                }
            }
            for (i, rank) in ranks.iter().enumerate() {
                prop_assert_eq!(rank.rank as usize, i);
                let w = workers
                    .iter()
                    .find(|w| w.id == rank.worker_id)
                    .expect("live worker");
                let per_rank = if job.resources.gpus == GpuRequest::Cpu {
                    0
                } else {
                    1
                };
                prop_assert_eq!(rank.gpu_indices.len(), per_rank, "one GPU per GPU rank");
                for gpu in &rank.gpu_indices {
                    prop_assert!(w.gpus.contains(gpu), "GPU {} not pinned on {}", gpu, w.id);
                    prop_assert!(
                        used_gpus.insert((w.id.clone(), *gpu)),
                        "GPU {} on {} used twice",
                        gpu,
                        w.id
                    );
                }
            }
        }
        for w in workers {
            prop_assert!(used_cpu.get(&w.id).copied().unwrap_or(0) <= w.cpu_slots);
        }
        Ok(())
    }

    /// Whether `job` fits on the capacity left after `p`, plus what `extra` jobs hold.
    fn fits_without(
        workers: &[WorkerSlots],
        jobs: &[JobRequest],
        p: &Placement,
        job: &JobRequest,
        extra: &BTreeSet<JobId>,
    ) -> bool {
        let mut free = free_of(workers);
        for (id, ranks) in &p.jobs {
            if extra.contains(id) {
                continue;
            }
            let request = &jobs
                .iter()
                .find(|j| &j.id == id)
                .expect("input job")
                .resources
                .gpus;
            claim_all(&mut free, request, ranks);
        }
        try_place(job, &free, &BTreeMap::new()).is_some()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn capacity_and_gang_invariants(workers in arb_workers(), jobs in arb_jobs(), split in 0usize..12) {
            let split = split.min(jobs.len());
            let policy = Policy::default();
            let first = place(&jobs[..split], &workers, &Placement::default(), &policy);
            check_capacity(&workers, &jobs, &first)?;
            let second = place(&jobs, &workers, &first, &policy);
            check_capacity(&workers, &jobs, &second)?;
            for (id, ranks) in &first.jobs {
                prop_assert_eq!(second.jobs.get(id), Some(ranks), "placed jobs never move");
            }
        }

        /// Without reservations, a job is placed ahead of an earlier one only when the
        /// earlier one could not have used what was free when its turn came.
        #[test]
        fn priority_then_fifo(workers in arb_workers(), jobs in arb_jobs()) {
            let policy = Policy { reserve_after_rounds: u32::MAX };
            let p = place(&jobs, &workers, &Placement::default(), &policy);
            let mut ordered: Vec<&JobRequest> = jobs.iter().collect();
            ordered.sort_by(|a, b| queue_order(a, b));
            for (i, earlier) in ordered.iter().enumerate() {
                if p.jobs.contains_key(&earlier.id) {
                    continue;
                }
                let later: BTreeSet<JobId> = ordered[i + 1..]
                    .iter()
                    .filter(|j| p.jobs.contains_key(&j.id))
                    .map(|j| j.id.clone())
                    .collect();
                prop_assert!(
                    !fits_without(&workers, &jobs, &p, earlier, &later),
                    "{} was skipped although it fit before later jobs took their share", earlier.id
                );
            }
        }

        /// Reserved workers get no new job other than the one that reserved them.
        #[test]
        fn reservations_hold(workers in arb_workers(), jobs in arb_jobs(), waited in 0u32..6) {
            let policy = Policy { reserve_after_rounds: 2 };
            let previous = Placement {
                waited: jobs.iter().map(|j| (j.id.clone(), waited)).collect(),
                ..Placement::default()
            };
            let p = place(&jobs, &workers, &previous, &policy);
            check_capacity(&workers, &jobs, &p)?;
            for (worker, holder) in &p.reserved {
                prop_assert!(!p.jobs.contains_key(holder), "a placed job holds no reservation");
                for (id, ranks) in &p.jobs {
                    let on_reserved = ranks.iter().any(|r| &r.worker_id == worker);
                    let holder_seq = jobs.iter().find(|j| &j.id == holder).map(|j| (-(j.priority as i64), j.sequence));
                    let job_seq = jobs.iter().find(|j| &j.id == id).map(|j| (-(j.priority as i64), j.sequence));
                    prop_assert!(!on_reserved || job_seq < holder_seq,
                        "{} was placed on {} reserved by {}", id, worker, holder);
                }
            }
        }

        /// A large job among a steady stream of small ones is placed within a bounded number
        /// of rounds.
        #[test]
        fn no_starvation(gpus in 2u32..5, arrivals in 1usize..3, duration in 1u32..4, reserve in 0u32..4) {
            let policy = Policy { reserve_after_rounds: reserve };
            // Reserved after `reserve` more rounds; then at most the jobs queued before it and
            // those already running finish, each within `duration` rounds.
            let bound = 1 + reserve + (arrivals as u32 + 1) * duration + 1;
            let placed = simulate(policy, gpus, arrivals, duration, 60);
            prop_assert!(placed.is_some_and(|round| round <= bound),
                "large job placed at {:?}, bound {}", placed, bound);
        }
    }
}
