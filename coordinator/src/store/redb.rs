//! The embedded store: one redb file, no server. redb is synchronous, so every call runs on
//! tokio's blocking pool. A counter in the `meta` table plays the part of etcd's revision.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition};

use super::{describe_found, Expect, Store, Versioned};
use crate::error::{Error, Result};

const KV: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";

#[derive(Clone)]
pub struct RedbStore {
    db: Arc<Database>,
}

impl RedbStore {
    /// Opens the file, creating it (not its folder) if it does not exist.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let db = Database::create(path).map_err(|source| Error::RedbOpen {
            path: path.display().to_string(),
            source,
        })?;
        let txn = db.begin_write()?;
        txn.open_table(KV)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(Self { db: Arc::new(db) })
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| Error::Redb(format!("store task failed: {e}")))?
    }

    /// Checks `expect` against the key and bumps the revision, inside one write transaction.
    fn write(db: &Database, key: &str, expect: Expect, value: Option<&[u8]>) -> Result<u64> {
        let txn = db.begin_write()?;
        let revision = {
            let mut kv = txn.open_table(KV)?;
            let current = kv.get(key)?.map(|g| g.value().0);
            if !expect.holds(current) {
                return Err(Error::Conflict {
                    key: key.to_owned(),
                    expected: expect.describe(),
                    found: describe_found(current),
                });
            }
            let mut meta = txn.open_table(META)?;
            let revision = meta.get(REVISION)?.map(|g| g.value()).unwrap_or(0) + 1;
            meta.insert(REVISION, revision)?;
            match value {
                Some(bytes) => {
                    kv.insert(key, (revision, bytes))?;
                }
                None => {
                    kv.remove(key)?;
                }
            }
            revision
        };
        txn.commit()?;
        Ok(revision)
    }
}

impl Store for RedbStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        let key = key.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let kv = txn.open_table(KV)?;
            let found = kv.get(key.as_str())?.map(|g| {
                let (version, value) = g.value();
                Versioned {
                    value: value.to_vec(),
                    version,
                }
            });
            Ok(found)
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>> {
        let prefix = prefix.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let kv = txn.open_table(KV)?;
            let mut out = Vec::new();
            for entry in kv.range(prefix.as_str()..)? {
                let (key, value) = entry?;
                let key = key.value();
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                let (version, bytes) = value.value();
                out.push((
                    key.to_owned(),
                    Versioned {
                        value: bytes.to_vec(),
                        version,
                    },
                ));
            }
            Ok(out)
        })
        .await
    }

    async fn put(&self, key: &str, value: Vec<u8>, expect: Expect) -> Result<u64> {
        let key = key.to_owned();
        self.blocking(move |db| Self::write(db, &key, expect, Some(&value)))
            .await
    }

    async fn delete(&self, key: &str, expect: Expect) -> Result<()> {
        let key = key.to_owned();
        self.blocking(move |db| Self::write(db, &key, expect, None).map(|_| ()))
            .await
    }
}
