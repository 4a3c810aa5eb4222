//! Durable state in sled: each tree's epoch and each node's position and peer address.
//!
//! One change to a tree is one sled batch (atomic on recovery). Callers acknowledge a
//! change only after [`Store::sync`], which is a group commit: a dedicated thread flushes
//! once for every write queued since its last flush, so concurrent requests share fsyncs.
//!
//! Keys (NUL-separated; names never contain control characters, see `validate`):
//! - `m\0<tenant>\0<function>` → [`TreeMeta`]
//! - `n\0<tenant>\0<function>\0<node_id>` → [`NodeRecord`]
//!
//! Leases are not written: after a restart every node gets a fresh lease (a grace
//! period), because nodes could not heartbeat while the coordinator was down.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::upstream::TreeKey;

/// Storage failures. Any of them leaves the coordinator unable to acknowledge changes.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// sled reported an error.
    #[error("sled: {0}")]
    Sled(String),
    /// A stored record could not be decoded.
    #[error("corrupt record under key {key:?}: {reason}")]
    Corrupt {
        /// The key, lossily printed.
        key: String,
        /// What was wrong.
        reason: String,
    },
    /// The flusher thread is gone.
    #[error("store is closed")]
    Closed,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Sled(e.to_string())
    }
}

/// Per-tree record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TreeMeta {
    /// The tree's change counter; kept even when the tree empties, so epochs never go back.
    pub epoch: u64,
}

/// Per-node record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRecord {
    /// Position in the complete-binary-tree layout.
    pub position: u64,
    /// Peer address the node serves blocks on.
    pub addr: String,
}

/// One tree as loaded at startup, nodes in position order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedTree {
    /// Which tree.
    pub key: TreeKey,
    /// Its epoch.
    pub epoch: u64,
    /// `(node_id, addr)` in position order.
    pub nodes: Vec<(String, String)>,
}

/// One tree change to write: the new epoch, nodes (re)placed, nodes removed.
#[derive(Debug, Default)]
pub struct Write<'a> {
    /// New epoch of the tree.
    pub epoch: u64,
    /// `(node_id, position, addr)` to put.
    pub put: Vec<(&'a str, usize, &'a str)>,
    /// Node ids to delete.
    pub remove: Vec<&'a str>,
}

type Waiter = oneshot::Sender<Result<(), StoreError>>;

/// The sled database plus its group-commit flusher.
pub struct Store {
    db: sled::Db,
    // Both are `Option` only so that `drop` can close the channel, then join the thread:
    // the thread holds a handle on the database, which stays locked until it is gone.
    flush_tx: Option<mpsc::UnboundedSender<Waiter>>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Store {
    fn drop(&mut self) {
        self.flush_tx.take();
        if let Some(t) = self.flusher.take() {
            let _ = t.join();
        }
    }
}

fn meta_key(key: &TreeKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + key.tenant.len() + key.function.len());
    k.extend_from_slice(b"m\0");
    k.extend_from_slice(key.tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(key.function.as_bytes());
    k
}

fn node_key(key: &TreeKey, node: &str) -> Vec<u8> {
    let mut k = meta_key(key);
    k[0] = b'n';
    k.push(0);
    k.extend_from_slice(node.as_bytes());
    k
}

fn corrupt(key: &[u8], reason: impl ToString) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: reason.to_string(),
    }
}

fn split_key(raw: &[u8], parts: usize) -> Result<Vec<String>, StoreError> {
    let text = std::str::from_utf8(raw).map_err(|e| corrupt(raw, e))?;
    let fields: Vec<String> = text.split('\0').skip(1).map(str::to_string).collect();
    if fields.len() != parts {
        return Err(corrupt(raw, "wrong number of key parts"));
    }
    Ok(fields)
}

impl Store {
    /// Opens (or creates) the database in `dir`, with `cache_bytes` of sled page cache.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            // We flush explicitly before every acknowledgement; this only bounds how
            // much unacknowledged work a crash can lose.
            .flush_every_ms(Some(1000))
            .open()?;
        Ok(Self::with_db(db))
    }

    /// A throw-away database (for tests).
    pub fn temporary() -> Result<Self, StoreError> {
        let db = sled::Config::new().temporary(true).open()?;
        Ok(Self::with_db(db))
    }

    fn with_db(db: sled::Db) -> Self {
        let (flush_tx, mut rx) = mpsc::unbounded_channel::<Waiter>();
        let flush_db = db.clone();
        let flusher = std::thread::Builder::new()
            .name("coordinator-flush".into())
            .spawn(move || {
                // Group commit: one flush covers every write applied before the waiters
                // queued up, so everyone waiting is answered by it.
                while let Some(first) = rx.blocking_recv() {
                    let mut waiters = vec![first];
                    while let Ok(w) = rx.try_recv() {
                        waiters.push(w);
                    }
                    let result = flush_db.flush().map(|_| ()).map_err(StoreError::from);
                    for w in waiters {
                        let _ = w.send(result.clone());
                    }
                }
            })
            .expect("spawn flusher thread");
        Self {
            db,
            flush_tx: Some(flush_tx),
            flusher: Some(flusher),
        }
    }

    /// Reads every tree back, nodes in position order. Trees with a meta record but no
    /// nodes come back empty (they keep their epoch).
    pub fn load(&self) -> Result<Vec<LoadedTree>, StoreError> {
        // key -> (epoch, [(position, node_id, addr)])
        type Partial = (u64, Vec<(u64, String, String)>);
        let mut trees: BTreeMap<TreeKey, Partial> = BTreeMap::new();
        for item in self.db.scan_prefix(b"m\0") {
            let (k, v) = item?;
            let parts = split_key(&k, 2)?;
            let meta: TreeMeta = serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?;
            let key = TreeKey::new(parts[0].clone(), parts[1].clone());
            trees.entry(key).or_default().0 = meta.epoch;
        }
        for item in self.db.scan_prefix(b"n\0") {
            let (k, v) = item?;
            let parts = split_key(&k, 3)?;
            let rec: NodeRecord = serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?;
            let key = TreeKey::new(parts[0].clone(), parts[1].clone());
            trees
                .entry(key)
                .or_default()
                .1
                .push((rec.position, parts[2].clone(), rec.addr));
        }
        Ok(trees
            .into_iter()
            .map(|(key, (epoch, mut nodes))| {
                // Batches are atomic, so positions are 0..N; sorting (rather than indexing)
                // still yields a valid tree if they were ever not.
                nodes.sort();
                LoadedTree {
                    key,
                    epoch,
                    nodes: nodes.into_iter().map(|(_, id, addr)| (id, addr)).collect(),
                }
            })
            .collect())
    }

    /// The epoch stored for a tree, if it ever existed.
    pub fn epoch(&self, key: &TreeKey) -> Result<Option<u64>, StoreError> {
        match self.db.get(meta_key(key))? {
            None => Ok(None),
            Some(v) => {
                let meta: TreeMeta =
                    serde_json::from_slice(&v).map_err(|e| corrupt(&meta_key(key), e))?;
                Ok(Some(meta.epoch))
            }
        }
    }

    /// Applies one tree change as a single atomic batch. Not durable until [`Store::sync`].
    pub fn write(&self, key: &TreeKey, w: &Write<'_>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let meta = serde_json::to_vec(&TreeMeta { epoch: w.epoch }).expect("encode meta");
        batch.insert(meta_key(key), meta);
        for node in &w.remove {
            batch.remove(node_key(key, node));
        }
        for (node, position, addr) in &w.put {
            let rec = NodeRecord {
                position: *position as u64,
                addr: (*addr).to_string(),
            };
            batch.insert(
                node_key(key, node),
                serde_json::to_vec(&rec).expect("encode node"),
            );
        }
        self.db.apply_batch(batch)?;
        Ok(())
    }

    /// Waits until everything written so far is on disk.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.flush_tx
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(tx)
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn write_load_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let key = TreeKey::new("t", "sha256:x");
        {
            let s = Store::open(dir.path(), 1 << 20).unwrap();
            s.write(
                &key,
                &Write {
                    epoch: 1,
                    put: vec![("b", 1, "h:2"), ("a", 0, "h:1")],
                    remove: vec![],
                },
            )
            .unwrap();
            s.write(
                &key,
                &Write {
                    epoch: 2,
                    put: vec![],
                    remove: vec!["b"],
                },
            )
            .unwrap();
            s.sync().await.unwrap();
        }
        let s = Store::open(dir.path(), 1 << 20).unwrap();
        let trees = s.load().unwrap();
        assert_eq!(
            trees,
            vec![LoadedTree {
                key: key.clone(),
                epoch: 2,
                nodes: vec![("a".into(), "h:1".into())]
            }]
        );
        assert_eq!(s.epoch(&key).unwrap(), Some(2));
    }
}
