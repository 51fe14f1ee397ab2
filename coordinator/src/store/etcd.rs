//! The cluster store: etcd v3. Versions are etcd mod revisions; conditional writes are etcd
//! transactions comparing the key's create or mod revision. Every key lives under a prefix so
//! several deployments (or test runs) can share one etcd. A leader's store is fenced: each of
//! its writes also requires its election key to be unchanged, so a deposed leader that still
//! runs (paused, partitioned) cannot overwrite its successor's state.

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};

use super::{describe_found, Expect, Store, Versioned};
use crate::error::{Error, Result};

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    /// Election key and its create revision that every write requires.
    fence: Option<(Vec<u8>, i64)>,
}

impl EtcdStore {
    pub const DEFAULT_PREFIX: &'static str = "/loractl/";

    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(5))
            .with_timeout(std::time::Duration::from_secs(10));
        let failed = |source| Error::EtcdConnect {
            endpoints: endpoints.join(","),
            source,
        };
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(failed)?;
        // The client connects lazily; ask for the server's status so a wrong address fails
        // here, with the address in the message.
        client.maintenance_client().status().await.map_err(failed)?;
        Ok(Self {
            client,
            prefix: prefix.to_owned(),
            fence: None,
        })
    }

    /// This store with every write conditional on the election key `key` still existing at
    /// create revision `revision` (see [`crate::leader::Leadership::fence`]).
    pub fn fenced(&self, key: Vec<u8>, revision: i64) -> Self {
        Self {
            fence: Some((key, revision)),
            ..self.clone()
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The prefix every key of this store lives under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn revision(header: Option<&etcd_client::ResponseHeader>) -> Result<u64> {
        header
            .map(|h| h.revision() as u64)
            .ok_or_else(|| Error::Corrupt {
                key: "<etcd response>".to_owned(),
                problem: "no response header".to_owned(),
            })
    }

    /// Runs `op` on `key` if `expect` holds; on a failed comparison reads the key's current
    /// version for the error.
    async fn conditional(&self, key: &str, expect: Expect, op: TxnOp) -> Result<u64> {
        let full = self.full(key);
        let mut compare = match expect {
            Expect::Absent => vec![Compare::create_revision(full.clone(), CompareOp::Equal, 0)],
            Expect::Version(v) => vec![Compare::mod_revision(
                full.clone(),
                CompareOp::Equal,
                v as i64,
            )],
            Expect::Any => Vec::new(),
        };
        let mut reads = vec![TxnOp::get(full, None)];
        if let Some((key, revision)) = &self.fence {
            compare.push(Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                *revision,
            ));
            reads.push(TxnOp::get(key.clone(), None));
        }
        let txn = Txn::new().when(compare).and_then(vec![op]).or_else(reads);
        let response = self.client.kv_client().txn(txn).await?;
        if response.succeeded() {
            return Self::revision(response.header());
        }
        let reads: Vec<Option<(i64, i64)>> = response
            .op_responses()
            .into_iter()
            .filter_map(|r| match r {
                TxnOpResponse::Get(get) => Some(
                    get.kvs()
                        .first()
                        .map(|kv| (kv.mod_revision(), kv.create_revision())),
                ),
                _ => None,
            })
            .collect();
        if let Some((_, revision)) = &self.fence {
            let held = reads
                .get(1)
                .copied()
                .flatten()
                .is_some_and(|(_, created)| created == *revision);
            if !held {
                return Err(Error::NotLeader);
            }
        }
        let current = reads
            .first()
            .copied()
            .map(|found| found.map(|(modified, _)| modified as u64));
        Err(Error::Conflict {
            key: key.to_owned(),
            expected: expect.describe(),
            found: describe_found(current.flatten()),
        })
    }
}

impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        let response = self.client.kv_client().get(self.full(key), None).await?;
        Ok(response.kvs().first().map(|kv| Versioned {
            value: kv.value().to_vec(),
            version: kv.mod_revision() as u64,
        }))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>> {
        let response = self
            .client
            .kv_client()
            .get(self.full(prefix), Some(GetOptions::new().with_prefix()))
            .await?;
        let mut out = Vec::with_capacity(response.kvs().len());
        for kv in response.kvs() {
            let key = kv.key_str()?;
            let key = key.strip_prefix(&self.prefix).unwrap_or(key).to_owned();
            out.push((
                key,
                Versioned {
                    value: kv.value().to_vec(),
                    version: kv.mod_revision() as u64,
                },
            ));
        }
        // etcd returns keys in byte order already; sorting keeps the contract explicit.
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn put(&self, key: &str, value: Vec<u8>, expect: Expect) -> Result<u64> {
        let op = TxnOp::put(self.full(key), value, None);
        self.conditional(key, expect, op).await
    }

    async fn delete(&self, key: &str, expect: Expect) -> Result<()> {
        let op = TxnOp::delete(self.full(key), None);
        self.conditional(key, expect, op).await.map(|_| ())
    }
}
