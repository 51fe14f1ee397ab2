//! The coordinator's persistent state behind one small interface: a versioned key-value map
//! with compare-and-swap writes. [`RedbStore`] keeps it in one local file (the default, no
//! server); [`EtcdStore`] keeps it in etcd v3 for clusters; [`MemoryStore`] is for tests.
//! All pass the same conformance suite (`tests/store_conformance.rs`); typed access to jobs
//! and workers is in [`crate::state`].

mod etcd;
mod memory;
mod redb;

use std::future::Future;

pub use self::etcd::EtcdStore;
pub use self::memory::MemoryStore;
pub use self::redb::RedbStore;
use crate::error::Result;

/// A stored value and the version it was written at. Versions are positive and grow with every
/// write to the store (like etcd's revisions), so a newer write always has a larger version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub version: u64,
}

/// The condition of a conditional write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must exist at exactly this version.
    Version(u64),
    /// Unconditional.
    Any,
}

impl Expect {
    fn describe(self) -> String {
        match self {
            Expect::Absent => "absent".to_owned(),
            Expect::Version(v) => format!("version {v}"),
            Expect::Any => "anything".to_owned(),
        }
    }

    /// Whether a key currently at `current` (None: absent) meets the condition.
    fn holds(self, current: Option<u64>) -> bool {
        match self {
            Expect::Absent => current.is_none(),
            Expect::Version(v) => current == Some(v),
            Expect::Any => true,
        }
    }
}

fn describe_found(current: Option<u64>) -> String {
    match current {
        Some(v) => format!("version {v}"),
        None => "absent".to_owned(),
    }
}

/// A versioned key-value store. Keys are `/`-separated paths such as `jobs/j12`. A write whose
/// [`Expect`] does not hold fails with [`crate::Error::Conflict`] and changes nothing.
pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Versioned>>> + Send;

    /// Every key starting with `prefix`, in key order.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<(String, Versioned)>>> + Send;

    /// Writes `value` if `expect` holds; returns the new version.
    fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Deletes the key if `expect` holds. Deleting an absent key with [`Expect::Any`] is fine.
    fn delete(&self, key: &str, expect: Expect) -> impl Future<Output = Result<()>> + Send;
}

/// A store chosen at run time (`--store redb:PATH` or `--store etcd:URL`).
#[derive(Clone)]
pub enum AnyStore {
    Redb(RedbStore),
    Etcd(Box<EtcdStore>),
}

impl AnyStore {
    /// Opens `redb:PATH` or connects to `etcd:URL[,URL...]` (keys under `/loractl/`).
    pub async fn open(location: &str) -> Result<Self> {
        if let Some(path) = location.strip_prefix("redb:") {
            return Ok(Self::Redb(RedbStore::open(path)?));
        }
        if let Some(urls) = location.strip_prefix("etcd:") {
            let endpoints: Vec<String> = urls.split(',').map(str::to_owned).collect();
            let store = EtcdStore::connect(&endpoints, EtcdStore::DEFAULT_PREFIX).await?;
            return Ok(Self::Etcd(Box::new(store)));
        }
        Err(crate::Error::BadStoreLocation(location.to_owned()))
    }
}

impl Store for AnyStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        match self {
            Self::Redb(s) => s.get(key).await,
            Self::Etcd(s) => s.get(key).await,
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>> {
        match self {
            Self::Redb(s) => s.list(prefix).await,
            Self::Etcd(s) => s.list(prefix).await,
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>, expect: Expect) -> Result<u64> {
        match self {
            Self::Redb(s) => s.put(key, value, expect).await,
            Self::Etcd(s) => s.put(key, value, expect).await,
        }
    }

    async fn delete(&self, key: &str, expect: Expect) -> Result<()> {
        match self {
            Self::Redb(s) => s.delete(key, expect).await,
            Self::Etcd(s) => s.delete(key, expect).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn store_locations_are_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let store = AnyStore::open(&format!("redb:{}", path.display()))
            .await
            .unwrap();
        assert!(matches!(store, AnyStore::Redb(_)));
        store.put("k", b"v".to_vec(), Expect::Absent).await.unwrap();
        assert!(path.exists());
        for bad in ["bogus", "sqlite:x.db", ""] {
            let err = AnyStore::open(bad).await.err().expect("refused");
            assert!(err.to_string().contains("redb:PATH"), "{err}");
        }
    }
}
