//! Durable state in sled: each tree's epoch and each node's position and peer address.
//!
//! All writes go through one writer thread, in the order they were queued. It drains
//! everything queued, applies it as one sled batch (atomic on recovery), and, if anyone
//! is waiting in [`Store::sync`], flushes once for all of them: a group commit, so
//! concurrent requests share one fsync and no async worker ever blocks inside sled.
//! Callers acknowledge a change only after `sync` returns.
//!
//! Keys:
//! - `m\0<tenant>\0<function>` → [`TreeMeta`]: epoch, then the tree's numeric id, each
//!   8 bytes little-endian (names never contain control characters, see `validate`)
//! - `n<tree id, 8 bytes big-endian><node_id>` → [`NodeRecord`]: position as 8 bytes
//!   little-endian, then the peer address (UTF-8)
//! - `s<tree id, 8 bytes big-endian><node_id>` → the node's position in the second stripe
//!   tree ([`crate::stripe_tree`]), 8 bytes little-endian
//!
//! Node keys use the short tree id rather than the tenant and digest: sled copies and
//! rewrites whole leaf pages on updates, so short keys make every write cheaper.
//!
//! Leases are not written: after a restart every node gets a fresh lease (a grace
//! period), because nodes could not heartbeat while the coordinator was down.

use std::collections::BTreeMap;
use std::path::Path;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeMeta {
    /// The tree's change counter; kept even when the tree empties, so epochs never go back.
    pub epoch: u64,
    /// Short id used in node keys.
    pub id: u64,
}

/// Per-node record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Position in the complete-binary-tree layout.
    pub position: u64,
    /// Peer address the node serves blocks on.
    pub addr: String,
}

impl TreeMeta {
    fn encode(&self) -> Vec<u8> {
        let mut v = self.epoch.to_le_bytes().to_vec();
        v.extend_from_slice(&self.id.to_le_bytes());
        v
    }

    fn decode(raw: &[u8]) -> Result<Self, String> {
        if raw.len() != 16 {
            return Err("tree meta is not 16 bytes".into());
        }
        let (e, i) = raw.split_at(8);
        Ok(Self {
            epoch: u64::from_le_bytes(e.try_into().expect("8 bytes")),
            id: u64::from_le_bytes(i.try_into().expect("8 bytes")),
        })
    }
}

impl NodeRecord {
    fn encode(position: u64, addr: &str) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + addr.len());
        v.extend_from_slice(&position.to_le_bytes());
        v.extend_from_slice(addr.as_bytes());
        v
    }

    fn decode(raw: &[u8]) -> Result<Self, String> {
        if raw.len() < 8 {
            return Err("node record shorter than 8 bytes".into());
        }
        let (pos, addr) = raw.split_at(8);
        Ok(Self {
            position: u64::from_le_bytes(pos.try_into().expect("8 bytes")),
            addr: String::from_utf8(addr.to_vec()).map_err(|e| e.to_string())?,
        })
    }
}

/// One tree as loaded at startup, nodes in position order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedTree {
    /// Which tree.
    pub key: TreeKey,
    /// Its short id.
    pub id: u64,
    /// Its epoch.
    pub epoch: u64,
    /// `(node_id, addr)` in position order.
    pub nodes: Vec<(String, String)>,
    /// Node ids in position order of the second stripe tree (empty if none was stored).
    pub stripe_order: Vec<String>,
}

/// One tree change to write: the new epoch, nodes (re)placed, nodes removed.
#[derive(Debug, Default)]
pub struct Write<'a> {
    /// The tree's short id (from [`Store::tree_meta`] or [`Store::load`], or a fresh one).
    pub tree_id: u64,
    /// New epoch of the tree.
    pub epoch: u64,
    /// `(node_id, position, addr)` to put.
    pub put: Vec<(&'a str, usize, &'a str)>,
    /// Node ids to delete.
    pub remove: Vec<&'a str>,
    /// `(node_id, position)` in the second stripe tree to put.
    pub stripe_put: Vec<(&'a str, usize)>,
}

type Waiter = oneshot::Sender<Result<(), StoreError>>;

/// Key puts (`Some`) and deletes (`None`) of one tree change.
type Ops = Vec<(Vec<u8>, Option<Vec<u8>>)>;

enum Msg {
    Write(Ops),
    Sync(Waiter),
}

/// The sled database plus its writer thread.
pub struct Store {
    db: sled::Db,
    // Both are `Option` only so that `drop` can close the channel, then join the thread:
    // the thread holds a handle on the database, which stays locked until it is gone.
    tx: Option<mpsc::UnboundedSender<Msg>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Store {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.writer.take() {
            let _ = t.join();
        }
    }
}

/// The writer thread: batch everything queued, flush if someone waits, answer them.
fn writer_loop(db: sled::Db, mut rx: mpsc::UnboundedReceiver<Msg>) {
    // Once a write fails, every later sync fails too: memory and disk have diverged.
    let mut broken: Option<StoreError> = None;
    while let Some(first) = rx.blocking_recv() {
        let mut batch = sled::Batch::default();
        let mut writes = 0usize;
        let mut waiters = Vec::new();
        let mut msg = Some(first);
        while let Some(m) = msg {
            match m {
                Msg::Write(ops) => {
                    writes += 1;
                    // Later ops on the same key override earlier ones, as in order.
                    for (k, v) in ops {
                        match v {
                            Some(v) => batch.insert(k, v),
                            None => batch.remove(k),
                        }
                    }
                }
                Msg::Sync(w) => waiters.push(w),
            }
            // Bound the group so a flood of writes still gets flushed and answered.
            msg = if writes + waiters.len() < 4096 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if broken.is_none() && writes > 0 {
            if let Err(e) = db.apply_batch(batch) {
                broken = Some(e.into());
            }
        }
        if waiters.is_empty() {
            continue;
        }
        let result = match &broken {
            Some(e) => Err(e.clone()),
            None => db.flush().map(|_| ()).map_err(StoreError::from),
        };
        if let Err(e) = &result {
            broken.get_or_insert_with(|| e.clone());
        }
        for w in waiters {
            let _ = w.send(result.clone());
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

fn node_key(tree_id: u64, node: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + node.len());
    k.push(b'n');
    k.extend_from_slice(&tree_id.to_be_bytes());
    k.extend_from_slice(node.as_bytes());
    k
}

fn stripe_key(tree_id: u64, node: &str) -> Vec<u8> {
    let mut k = node_key(tree_id, node);
    k[0] = b's';
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
        let (tx, rx) = mpsc::unbounded_channel::<Msg>();
        let writer_db = db.clone();
        let writer = std::thread::Builder::new()
            .name("coordinator-store".into())
            .spawn(move || writer_loop(writer_db, rx))
            .expect("spawn store writer thread");
        Self {
            db,
            tx: Some(tx),
            writer: Some(writer),
        }
    }

    fn send(&self, msg: Msg) -> Result<(), StoreError> {
        self.tx
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(msg)
            .map_err(|_| StoreError::Closed)
    }

    /// Reads every tree back, nodes in position order. Trees with a meta record but no
    /// nodes come back empty (they keep their epoch and id).
    pub fn load(&self) -> Result<Vec<LoadedTree>, StoreError> {
        let mut trees: BTreeMap<u64, LoadedTree> = BTreeMap::new();
        for item in self.db.scan_prefix(b"m\0") {
            let (k, v) = item?;
            let parts = split_key(&k, 2)?;
            let meta = TreeMeta::decode(&v).map_err(|e| corrupt(&k, e))?;
            let tree = LoadedTree {
                key: TreeKey::new(parts[0].clone(), parts[1].clone()),
                id: meta.id,
                epoch: meta.epoch,
                nodes: Vec::new(),
                stripe_order: Vec::new(),
            };
            if trees.insert(meta.id, tree).is_some() {
                return Err(corrupt(&k, "tree id used twice"));
            }
        }
        let mut positions: BTreeMap<u64, Vec<(u64, String, String)>> = BTreeMap::new();
        for item in self.db.scan_prefix(b"n") {
            let (k, v) = item?;
            if k.len() < 9 {
                return Err(corrupt(&k, "node key too short"));
            }
            let id = u64::from_be_bytes(k[1..9].try_into().expect("8 bytes"));
            let node = std::str::from_utf8(&k[9..]).map_err(|e| corrupt(&k, e))?;
            let rec = NodeRecord::decode(&v).map_err(|e| corrupt(&k, e))?;
            if !trees.contains_key(&id) {
                return Err(corrupt(&k, "node of an unknown tree"));
            }
            positions
                .entry(id)
                .or_default()
                .push((rec.position, node.to_string(), rec.addr));
        }
        for (id, mut nodes) in positions {
            // Batches are atomic, so positions are 0..N; sorting (rather than indexing)
            // still yields a valid tree if they were ever not.
            nodes.sort();
            trees.get_mut(&id).expect("checked").nodes =
                nodes.into_iter().map(|(_, n, addr)| (n, addr)).collect();
        }
        let mut stripes: BTreeMap<u64, Vec<(u64, String)>> = BTreeMap::new();
        for item in self.db.scan_prefix(b"s") {
            let (k, v) = item?;
            if k.len() < 9 || v.len() != 8 {
                return Err(corrupt(&k, "stripe record of the wrong size"));
            }
            let id = u64::from_be_bytes(k[1..9].try_into().expect("8 bytes"));
            let node = std::str::from_utf8(&k[9..]).map_err(|e| corrupt(&k, e))?;
            let pos = u64::from_le_bytes(v[..].try_into().expect("8 bytes"));
            stripes.entry(id).or_default().push((pos, node.to_string()));
        }
        for (id, mut nodes) in stripes {
            nodes.sort();
            if let Some(t) = trees.get_mut(&id) {
                // Checked against the function tree by the forest, which rebuilds it if
                // it does not fit.
                t.stripe_order = nodes.into_iter().map(|(_, n)| n).collect();
            }
        }
        Ok(trees.into_values().collect())
    }

    /// The record of a tree, if it ever existed. Reads applied state only; the forest asks
    /// only about trees it does not hold in memory, which have nothing queued.
    pub fn tree_meta(&self, key: &TreeKey) -> Result<Option<TreeMeta>, StoreError> {
        match self.db.get(meta_key(key))? {
            None => Ok(None),
            Some(v) => Ok(Some(
                TreeMeta::decode(&v).map_err(|e| corrupt(&meta_key(key), e))?,
            )),
        }
    }

    /// Queues one tree change. Changes are applied in the order queued (callers queue
    /// under the tree's lock, so each tree's changes land in epoch order). Not durable,
    /// nor even visible to reads, until [`Store::sync`] returns.
    pub fn write(&self, key: &TreeKey, w: &Write<'_>) -> Result<(), StoreError> {
        let mut ops: Ops = Vec::with_capacity(1 + w.put.len() + w.remove.len());
        let meta = TreeMeta {
            epoch: w.epoch,
            id: w.tree_id,
        };
        ops.push((meta_key(key), Some(meta.encode())));
        for node in &w.remove {
            ops.push((node_key(w.tree_id, node), None));
            ops.push((stripe_key(w.tree_id, node), None));
        }
        for (node, position) in &w.stripe_put {
            ops.push((
                stripe_key(w.tree_id, node),
                Some((*position as u64).to_le_bytes().to_vec()),
            ));
        }
        for (node, position, addr) in &w.put {
            ops.push((
                node_key(w.tree_id, node),
                Some(NodeRecord::encode(*position as u64, addr)),
            ));
        }
        self.send(Msg::Write(ops))
    }

    /// Waits until everything queued so far is applied and on disk.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Sync(tx))?;
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
                    tree_id: 7,
                    epoch: 1,
                    put: vec![("b", 1, "h:2"), ("a", 0, "h:1")],
                    remove: vec![],
                    stripe_put: vec![("b", 0), ("a", 1)],
                },
            )
            .unwrap();
            s.write(
                &key,
                &Write {
                    tree_id: 7,
                    epoch: 2,
                    put: vec![],
                    remove: vec!["b"],
                    stripe_put: vec![("a", 0)],
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
                id: 7,
                epoch: 2,
                nodes: vec![("a".into(), "h:1".into())],
                stripe_order: vec!["a".into()],
            }]
        );
        assert_eq!(
            s.tree_meta(&key).unwrap(),
            Some(TreeMeta { epoch: 2, id: 7 })
        );
    }
}
