//! Worker liveness: who is registered, when each worker was last heard from, and which ones
//! missed the heartbeat timeout. Time is passed in (tokio's `Instant`), so the logic is tested
//! on a paused clock.

use std::collections::BTreeMap;
use std::time::Duration;

use loractl_proto::domain::{Worker, WorkerId};
use tokio::time::Instant;

#[derive(Debug)]
struct Entry {
    worker: Worker,
    last_seen: Instant,
}

#[derive(Debug)]
pub struct Registry {
    timeout: Duration,
    entries: BTreeMap<WorkerId, Entry>,
}

impl Registry {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            entries: BTreeMap::new(),
        }
    }

    /// Adds a live worker, heard from `now` (a registration, or a known worker reloaded at
    /// start-up, which then has one timeout to reconnect).
    pub fn insert(&mut self, mut worker: Worker, now: Instant) {
        worker.alive = true;
        self.entries.insert(
            worker.id.clone(),
            Entry {
                worker,
                last_seen: now,
            },
        );
    }

    pub fn remove(&mut self, id: &WorkerId) -> Option<Worker> {
        self.entries.remove(id).map(|e| e.worker)
    }

    /// Records a message from a live worker; `false` if it is unknown or declared lost.
    pub fn seen(&mut self, id: &WorkerId, now: Instant, wall_ms: i64) -> bool {
        match self.entries.get_mut(id) {
            Some(entry) if entry.worker.alive => {
                entry.last_seen = now;
                entry.worker.last_seen = Some(wall_ms);
                true
            }
            _ => false,
        }
    }

    /// Declares lost every live worker silent for longer than the timeout; returns them.
    pub fn expire(&mut self, now: Instant) -> Vec<Worker> {
        let mut lost = Vec::new();
        for entry in self.entries.values_mut() {
            if entry.worker.alive && now.duration_since(entry.last_seen) > self.timeout {
                entry.worker.alive = false;
                lost.push(entry.worker.clone());
            }
        }
        lost
    }

    pub fn mark_lost(&mut self, id: &WorkerId) -> Option<Worker> {
        let entry = self.entries.get_mut(id)?;
        entry.worker.alive = false;
        Some(entry.worker.clone())
    }

    /// Every live worker and how long ago it was last heard from.
    pub fn ages(&self, now: Instant) -> impl Iterator<Item = (&Worker, Duration)> {
        self.entries
            .values()
            .filter(|e| e.worker.alive)
            .map(move |e| (&e.worker, now.saturating_duration_since(e.last_seen)))
    }

    pub fn get(&self, id: &WorkerId) -> Option<&Worker> {
        self.entries.get(id).map(|e| &e.worker)
    }

    pub fn is_alive(&self, id: &WorkerId) -> bool {
        self.get(id).is_some_and(|w| w.alive)
    }

    /// Registrations under `name` (a restarted daemon re-registers under its old name).
    pub fn named(&self, name: &str) -> Vec<WorkerId> {
        self.entries
            .values()
            .filter(|e| e.worker.name == name)
            .map(|e| e.worker.id.clone())
            .collect()
    }

    pub fn all(&self) -> impl Iterator<Item = &Worker> {
        self.entries.values().map(|e| &e.worker)
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: &str) -> Worker {
        Worker {
            id: WorkerId::new(id),
            name: id.split('.').next().unwrap_or(id).to_owned(),
            gpus: Vec::new(),
            labels: Default::default(),
            registered_at: 0,
            last_seen: None,
            alive: false,
            busy_gpus: Vec::new(),
            jobs: Vec::new(),
            draining: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn silent_workers_expire_after_the_timeout() {
        let mut registry = Registry::new(Duration::from_secs(10));
        registry.insert(worker("a.1"), Instant::now());
        registry.insert(worker("b.2"), Instant::now());
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(registry.seen(&WorkerId::new("a.1"), Instant::now(), 6_000));
        tokio::time::advance(Duration::from_secs(5)).await;
        let lost: Vec<WorkerId> = registry
            .expire(Instant::now())
            .into_iter()
            .map(|w| w.id)
            .collect();
        assert_eq!(
            lost,
            [WorkerId::new("b.2")],
            "b was silent for 11 s, a for 5 s"
        );
        assert!(registry.is_alive(&WorkerId::new("a.1")));
        assert!(
            !registry.seen(&WorkerId::new("b.2"), Instant::now(), 0),
            "a lost worker stays lost"
        );
        assert!(
            registry.expire(Instant::now()).is_empty(),
            "declared lost once"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(registry.expire(Instant::now()).len(), 1);
        assert_eq!(
            registry
                .get(&WorkerId::new("a.1"))
                .and_then(|w| w.last_seen),
            Some(6_000)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn exactly_the_timeout_is_not_yet_lost() {
        let mut registry = Registry::new(Duration::from_secs(10));
        registry.insert(worker("a.1"), Instant::now());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(registry.expire(Instant::now()).is_empty());
        assert_eq!(registry.named("a"), [WorkerId::new("a.1")]);
    }
}
