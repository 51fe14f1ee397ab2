//! One conformance suite for every `Store` backend: redb in a temp file and etcd started for
//! real on loopback.

use loractl_tests::Etcd;

use std::future::Future;

use loractl_coordinator::job::Transition;
use loractl_coordinator::state::{NewJob, State};
use loractl_coordinator::store::{EtcdStore, Expect, MemoryStore, RedbStore, Store};
use loractl_coordinator::Error;
use loractl_proto::domain::{GpuRequest, JobState, RankPlacement, Resources, WorkerId};

async fn get_missing_is_none<S: Store>(s: S) {
    assert_eq!(s.get("nothing/here").await.unwrap(), None);
    assert!(s.list("nothing/").await.unwrap().is_empty());
}

async fn put_absent_creates_once<S: Store>(s: S) {
    let v1 = s.put("a", b"one".to_vec(), Expect::Absent).await.unwrap();
    assert!(v1 > 0);
    let got = s.get("a").await.unwrap().unwrap();
    assert_eq!((got.value.as_slice(), got.version), (&b"one"[..], v1));
    let err = s
        .put("a", b"two".to_vec(), Expect::Absent)
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");
    assert!(err.to_string().contains("found version"), "{err}");
    assert_eq!(s.get("a").await.unwrap().unwrap().value, b"one");
}

async fn compare_and_swap<S: Store>(s: S) {
    let v1 = s.put("k", b"1".to_vec(), Expect::Any).await.unwrap();
    let v2 = s
        .put("k", b"2".to_vec(), Expect::Version(v1))
        .await
        .unwrap();
    assert!(v2 > v1, "versions grow: {v1} then {v2}");
    let stale = s
        .put("k", b"3".to_vec(), Expect::Version(v1))
        .await
        .unwrap_err();
    assert!(
        matches!(&stale, Error::Conflict { found, .. } if found == &format!("version {v2}")),
        "{stale}"
    );
    assert_eq!(
        s.get("k").await.unwrap().unwrap().value,
        b"2",
        "a failed CAS changes nothing"
    );
    let absent = s
        .put("missing", b"x".to_vec(), Expect::Version(v2))
        .await
        .unwrap_err();
    assert!(
        matches!(&absent, Error::Conflict { found, .. } if found == "absent"),
        "{absent}"
    );
    assert_eq!(s.get("missing").await.unwrap(), None);
    // Writes to other keys also move versions forward.
    let other = s.put("other", b"o".to_vec(), Expect::Any).await.unwrap();
    assert!(other > v2);
}

async fn delete_is_conditional<S: Store>(s: S) {
    s.delete("never", Expect::Any).await.unwrap();
    let v = s.put("d", b"x".to_vec(), Expect::Absent).await.unwrap();
    assert!(s
        .delete("d", Expect::Version(v + 1000))
        .await
        .unwrap_err()
        .is_conflict());
    assert!(s
        .delete("d", Expect::Absent)
        .await
        .unwrap_err()
        .is_conflict());
    s.delete("d", Expect::Version(v)).await.unwrap();
    assert_eq!(s.get("d").await.unwrap(), None);
    // A deleted key can be created again.
    s.put("d", b"y".to_vec(), Expect::Absent).await.unwrap();
}

async fn list_is_by_prefix_in_key_order<S: Store>(s: S) {
    for key in [
        "jobs/j2",
        "jobs/j10",
        "jobs/j1",
        "jobsx",
        "job",
        "workers/w1",
    ] {
        s.put(key, key.as_bytes().to_vec(), Expect::Any)
            .await
            .unwrap();
    }
    let keys: Vec<String> = s
        .list("jobs/")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["jobs/j1", "jobs/j10", "jobs/j2"]);
    let listed = s.list("workers/").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].1.value, b"workers/w1");
}

fn new_job(name: &str) -> NewJob {
    NewJob {
        name: name.to_owned(),
        spec_toml: format!("name = \"{name}\""),
        priority: 0,
        resources: Resources {
            workers: 1,
            gpus: GpuRequest::All,
            max_restarts: 1,
            ranks_per_worker: 1,
        },
    }
}

async fn concurrent_job_creation_numbers_every_job_once<S: Store + Clone>(s: S) {
    let state = State::new(s);
    let mut tasks = Vec::new();
    for t in 0..4 {
        let state = state.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..8 {
                ids.push(
                    state
                        .create_job(new_job(&format!("t{t}-{i}")), 0)
                        .await
                        .unwrap()
                        .sequence,
                );
            }
            ids
        }));
    }
    let mut sequences = Vec::new();
    for task in tasks {
        sequences.extend(task.await.unwrap());
    }
    sequences.sort_unstable();
    assert_eq!(sequences, (1..=32).collect::<Vec<u64>>());
    let jobs = state.jobs().await.unwrap();
    assert_eq!(jobs.len(), 32);
    assert!(jobs.windows(2).all(|w| w[0].sequence < w[1].sequence));
}

async fn concurrent_updates_all_land<S: Store + Clone>(s: S) {
    let state = State::new(s);
    let job = state.create_job(new_job("counter"), 0).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let state = state.clone();
        let id = job.id.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..5 {
                state
                    .update_job(&id, |j| {
                        let mut next = j.clone();
                        next.priority += 1;
                        Ok(next)
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(state.job(&job.id).await.unwrap().priority, 30);
}

async fn transitions_are_validated_and_stored<S: Store + Clone>(s: S) {
    let state = State::new(s);
    let job = state.create_job(new_job("zenny"), 5).await.unwrap();
    assert_eq!(job.state, JobState::Queued);
    let err = state
        .transition(&job.id, Transition::Succeed, 6)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidTransition { .. }), "{err}");
    let placement = vec![RankPlacement {
        rank: 0,
        worker_id: WorkerId::new("box.1"),
        gpu_indices: vec![0, 1],
    }];
    state
        .transition(&job.id, Transition::Place(placement.clone()), 7)
        .await
        .unwrap();
    let stored = state.job(&job.id).await.unwrap();
    assert_eq!(
        (stored.state, stored.placement, stored.updated_at),
        (JobState::Placed, placement, 7)
    );
    let missing = loractl_proto::domain::JobId::new("j999");
    assert!(matches!(
        state.job(&missing).await,
        Err(Error::JobNotFound(_))
    ));
}

async fn run_suite<S, F, Fut>(make: F)
where
    S: Store + Clone,
    F: Fn(&'static str) -> Fut,
    Fut: Future<Output = S>,
{
    get_missing_is_none(make("get_missing_is_none").await).await;
    put_absent_creates_once(make("put_absent_creates_once").await).await;
    compare_and_swap(make("compare_and_swap").await).await;
    delete_is_conditional(make("delete_is_conditional").await).await;
    list_is_by_prefix_in_key_order(make("list_is_by_prefix_in_key_order").await).await;
    concurrent_job_creation_numbers_every_job_once(make("concurrent_creation").await).await;
    concurrent_updates_all_land(make("concurrent_updates").await).await;
    transitions_are_validated_and_stored(make("transitions").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_backend_conforms() {
    run_suite(|_| async { MemoryStore::new() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    run_suite(|case| {
        let path = root.join(format!("{case}.redb"));
        async move { RedbStore::open(path).unwrap() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_backend_conforms() {
    let Some(etcd) = Etcd::start() else {
        return;
    };
    let endpoint = etcd.endpoint.clone();
    run_suite(|case| {
        let endpoints = vec![endpoint.clone()];
        async move {
            EtcdStore::connect(&endpoints, &format!("/conformance/{case}/"))
                .await
                .unwrap()
        }
    })
    .await;
}

#[tokio::test]
async fn redb_keeps_data_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let version = {
        let store = RedbStore::open(&path).unwrap();
        store
            .put("jobs/j1", b"x".to_vec(), Expect::Absent)
            .await
            .unwrap()
    };
    let store = RedbStore::open(&path).unwrap();
    let got = store.get("jobs/j1").await.unwrap().unwrap();
    assert_eq!((got.value.as_slice(), got.version), (&b"x"[..], version));
    let next = store
        .put("jobs/j2", b"y".to_vec(), Expect::Absent)
        .await
        .unwrap();
    assert!(next > version, "the revision counter survives a reopen");
}

#[tokio::test]
async fn etcd_connection_errors_name_the_endpoint() {
    let Err(err) = EtcdStore::connect(&["http://127.0.0.1:1".to_owned()], "/x/").await else {
        panic!("nothing listens on port 1");
    };
    let text = err.to_string();
    assert!(text.contains("etcd at http://127.0.0.1:1"), "{text}");
    assert!(text.contains("is etcd running there?"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_etcd_backend_conforms() {
    let Some(etcd) = Etcd::start() else {
        return;
    };
    let endpoint = etcd.endpoint.clone();
    let (_, leadership) = etcd.store_and_leadership("/fenced/").await;
    let (key, revision) = leadership.fence().unwrap();
    run_suite(|case| {
        let endpoints = vec![endpoint.clone()];
        let key = key.clone();
        async move {
            EtcdStore::connect(&endpoints, &format!("/fenced/{case}/"))
                .await
                .unwrap()
                .fenced(key, revision)
        }
    })
    .await;
    leadership.resign().await;
}
