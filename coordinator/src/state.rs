//! Typed records over a [`Store`]: jobs under `jobs/`, workers under `workers/`, counters under
//! `meta/`. Records are the `loractl.v1` wire messages (prost), so a stored record and an API
//! response are the same bytes and old records stay readable as fields are added. Every
//! update is a read-modify-compare-and-swap loop, safe with several coordinators on one etcd.

use loractl_proto::domain::{Job, JobId, UnixMs, Worker, WorkerId};
use loractl_proto::pb;
use prost::Message;

use crate::error::{Error, Result};
use crate::job::{self, Transition};
use crate::store::{Expect, Store, Versioned};

const JOBS: &str = "jobs/";
const WORKERS: &str = "workers/";
const JOB_SEQUENCE: &str = "meta/job_sequence";
const WORKER_SEQUENCE: &str = "meta/worker_sequence";
/// Concurrent writers rarely collide more than a few times; past this something is wrong.
const MAX_CAS_ATTEMPTS: u32 = 64;

/// A job before the coordinator numbers it.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub name: String,
    pub spec_toml: String,
    pub priority: i32,
    pub resources: loractl_proto::domain::Resources,
}

impl NewJob {
    /// The job `j<sequence>`, queued at `now`, before its first attempt.
    pub fn into_job(self, sequence: u64, now: UnixMs) -> Job {
        Job::queued(
            JobId::new(format!("j{sequence}")),
            self.name,
            self.spec_toml,
            self.priority,
            sequence,
            self.resources,
            now,
        )
    }
}

fn decode<P, D>(key: &str, bytes: &[u8]) -> Result<D>
where
    P: Message + Default,
    D: TryFrom<P, Error = loractl_proto::ConvertError>,
{
    let wire = P::decode(bytes).map_err(|e| Error::Corrupt {
        key: key.to_owned(),
        problem: e.to_string(),
    })?;
    D::try_from(wire).map_err(|e| Error::Corrupt {
        key: key.to_owned(),
        problem: e.to_string(),
    })
}

/// The stored form of a job; live-only fields are left out.
fn encode_job(job: &Job) -> Vec<u8> {
    let mut stored = job.clone();
    stored.waiting_reason.clear();
    stored.progress = None;
    pb::Job::from(stored).encode_to_vec()
}

fn job_key(id: &JobId) -> String {
    format!("{JOBS}{id}")
}

fn worker_key(id: &WorkerId) -> String {
    format!("{WORKERS}{id}")
}

/// The coordinator's records in a store.
#[derive(Clone)]
pub struct State<S> {
    store: S,
}

impl<S: Store> State<S> {
    pub fn new(store: S) -> Self {
        Self { store }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Increments the counter at `key` and returns the new value (1 for the first call).
    async fn next_number(&self, key: &str) -> Result<u64> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (current, expect) = match self.store.get(key).await? {
                Some(Versioned { value, version }) => {
                    let bytes: [u8; 8] =
                        value.as_slice().try_into().map_err(|_| Error::Corrupt {
                            key: key.to_owned(),
                            problem: format!("{} bytes, a counter has 8", value.len()),
                        })?;
                    (u64::from_be_bytes(bytes), Expect::Version(version))
                }
                None => (0, Expect::Absent),
            };
            let next = current + 1;
            match self
                .store
                .put(key, next.to_be_bytes().to_vec(), expect)
                .await
            {
                Ok(_) => return Ok(next),
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::TooManyConflicts {
            key: key.to_owned(),
            attempts: MAX_CAS_ATTEMPTS,
        })
    }

    /// Stores a new job in state Queued with the next id (`j1`, `j2`, ...).
    pub async fn create_job(&self, new: NewJob, now: UnixMs) -> Result<Job> {
        let sequence = self.next_number(JOB_SEQUENCE).await?;
        let job = new.into_job(sequence, now);
        let bytes = encode_job(&job);
        self.store
            .put(&job_key(&job.id), bytes, Expect::Absent)
            .await?;
        Ok(job)
    }

    async fn job_versioned(&self, id: &JobId) -> Result<(Job, u64)> {
        let key = job_key(id);
        let found = self.store.get(&key).await?;
        let Versioned { value, version } = found.ok_or_else(|| Error::JobNotFound(id.clone()))?;
        Ok((decode::<pb::Job, Job>(&key, &value)?, version))
    }

    pub async fn job(&self, id: &JobId) -> Result<Job> {
        self.job_versioned(id).await.map(|(job, _)| job)
    }

    /// Every job, in submission order.
    pub async fn jobs(&self) -> Result<Vec<Job>> {
        let mut jobs = Vec::new();
        for (key, record) in self.store.list(JOBS).await? {
            jobs.push(decode::<pb::Job, Job>(&key, &record.value)?);
        }
        jobs.sort_by_key(|j| j.sequence);
        Ok(jobs)
    }

    /// Replaces the job with `change(job)`, retrying on concurrent writes. `change` may be
    /// called more than once and must not have side effects.
    pub async fn update_job<F>(&self, id: &JobId, mut change: F) -> Result<Job>
    where
        F: FnMut(&Job) -> Result<Job> + Send,
    {
        let key = job_key(id);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (job, version) = self.job_versioned(id).await?;
            let next = change(&job)?;
            if next == job {
                return Ok(job);
            }
            let bytes = encode_job(&next);
            match self.store.put(&key, bytes, Expect::Version(version)).await {
                Ok(_) => return Ok(next),
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::TooManyConflicts {
            key,
            attempts: MAX_CAS_ATTEMPTS,
        })
    }

    /// Applies one state-machine transition atomically.
    pub async fn transition(&self, id: &JobId, transition: Transition, now: UnixMs) -> Result<Job> {
        self.update_job(id, |job| job::apply(job, transition.clone(), now))
            .await
    }

    /// A fresh worker id for a registration under `name` (`name.1`, `name.2`, ...): a
    /// re-registered worker gets a new id, so ranks placed on its previous incarnation are
    /// recognisably stale.
    pub async fn new_worker_id(&self, name: &str) -> Result<WorkerId> {
        let n = self.next_number(WORKER_SEQUENCE).await?;
        Ok(WorkerId::new(format!("{name}.{n}")))
    }

    pub async fn put_worker(&self, worker: &Worker) -> Result<()> {
        let bytes = pb::Worker::from(worker.clone()).encode_to_vec();
        self.store
            .put(&worker_key(&worker.id), bytes, Expect::Any)
            .await
            .map(|_| ())
    }

    pub async fn delete_worker(&self, id: &WorkerId) -> Result<()> {
        self.store.delete(&worker_key(id), Expect::Any).await
    }

    pub async fn workers(&self) -> Result<Vec<Worker>> {
        let mut workers = Vec::new();
        for (key, record) in self.store.list(WORKERS).await? {
            workers.push(decode::<pb::Worker, Worker>(&key, &record.value)?);
        }
        Ok(workers)
    }
}
