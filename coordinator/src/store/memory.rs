//! An in-memory store for tests and throwaway runs: same semantics as the persistent ones,
//! nothing survives the process. It never blocks, so it suits tests on tokio's paused clock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{describe_found, Expect, Store, Versioned};
use crate::error::{Error, Result};

#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    revision: u64,
    map: BTreeMap<String, Versioned>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map half-written (every write is
        // one insert or remove), so a poisoned lock is still consistent.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self, key: &str, expect: Expect, value: Option<Vec<u8>>) -> Result<u64> {
        let mut inner = self.lock();
        let current = inner.map.get(key).map(|v| v.version);
        if !expect.holds(current) {
            return Err(Error::Conflict {
                key: key.to_owned(),
                expected: expect.describe(),
                found: describe_found(current),
            });
        }
        inner.revision += 1;
        let version = inner.revision;
        match value {
            Some(value) => {
                inner
                    .map
                    .insert(key.to_owned(), Versioned { value, version });
            }
            None => {
                inner.map.remove(key);
            }
        }
        Ok(version)
    }
}

impl Store for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        Ok(self.lock().map.get(key).cloned())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>> {
        Ok(self
            .lock()
            .map
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    async fn put(&self, key: &str, value: Vec<u8>, expect: Expect) -> Result<u64> {
        self.write(key, expect, Some(value))
    }

    async fn delete(&self, key: &str, expect: Expect) -> Result<()> {
        self.write(key, expect, None).map(|_| ())
    }
}
