//! Snapshot metadata in sled: what containerd's `snapshots/storage` metastore keeps in
//! bolt. Records by key (kind, id, parent, labels, created/updated, usage), a children
//! index to refuse removing parents, and an id counter.
//!
//! Layout of the single sled tree (one tree so that every change is one atomic batch):
//! - `s\0<key>` → JSON [`Record`]
//! - `c\0<parent id BE><child id BE>` → child key (the children index)
//! - `n` → last allocated id, u64 BE
//!
//! Writers are serialised by [`MetaStore::write`]; readers see whole batches only. Every
//! write is flushed before it returns, so an acknowledged change survives a crash.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    sync::{Mutex, MutexGuard},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

const SNAPSHOT_PREFIX: &[u8] = b"s\0";
const CHILD_PREFIX: &[u8] = b"c\0";
const NEXT_ID: &[u8] = b"n";

/// Kind of a snapshot, as in containerd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Read-write, created by Prepare; can be committed.
    Active,
    /// Read-only, created by View; cannot be committed.
    View,
    /// Immutable, created by Commit; can be a parent.
    Committed,
}

impl Kind {
    /// The name containerd's filters use (`kind==active`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Active => "active",
            Kind::View => "view",
            Kind::Committed => "committed",
        }
    }
}

/// Disk usage of a snapshot itself (not its parents).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes allocated (blocks × 512, hard links counted once).
    pub size: i64,
    /// Distinct inodes.
    pub inodes: i64,
}

/// One snapshot's metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Numeric id; names the directory `<root>/snapshots/<id>`. Kept across Commit.
    pub id: u64,
    /// Kind.
    pub kind: Kind,
    /// Key of the parent (a committed snapshot), or "" for none.
    pub parent: String,
    /// Labels.
    #[serde(default)]
    pub labels: HashMap<String, String>,
    /// Creation time (Commit resets it, as containerd does).
    pub created: SystemTime,
    /// Last update time.
    pub updated: SystemTime,
    /// Usage, computed at Commit; zero for active and view snapshots.
    #[serde(default)]
    pub usage: Usage,
    /// Committed from a lazily mounted layer; its `fs` dir is a mountpoint owned by the
    /// lazy path. Kept here as well as in the labels because Update may replace labels.
    #[serde(default)]
    pub remote: bool,
}

/// What mounts need: an active or view snapshot with its parent chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Id of the snapshot.
    pub id: u64,
    /// Active or View.
    pub kind: Kind,
    /// Ids of the parent chain, nearest parent first.
    pub parent_ids: Vec<u64>,
}

/// A validated, id-allocated Create that is not yet visible; see
/// [`Writer::plan_create`].
#[derive(Debug)]
pub struct PlannedCreate {
    /// The new snapshot as mounts see it.
    pub snapshot: Snapshot,
    key: String,
    parent: String,
    labels: HashMap<String, String>,
}

/// The sled-backed metadata store.
pub struct MetaStore {
    db: sled::Db,
    write_lock: Mutex<()>,
}

/// Exclusive write access to the store, held across the filesystem work that must be
/// ordered with the metadata change (like containerd's bolt write transaction).
pub struct Writer<'a> {
    store: &'a MetaStore,
    _guard: MutexGuard<'a, ()>,
}

fn snapshot_key(key: &str) -> Vec<u8> {
    [SNAPSHOT_PREFIX, key.as_bytes()].concat()
}

fn child_key(parent: u64, child: u64) -> Vec<u8> {
    [
        CHILD_PREFIX,
        &parent.to_be_bytes()[..],
        &child.to_be_bytes()[..],
    ]
    .concat()
}

fn children_prefix(parent: u64) -> Vec<u8> {
    [CHILD_PREFIX, &parent.to_be_bytes()[..]].concat()
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record> {
    serde_json::from_slice(bytes).map_err(|source| Error::Corrupt {
        key: key.to_string(),
        source,
    })
}

fn encode(record: &Record) -> Vec<u8> {
    // Serialising a struct of plain fields into memory cannot fail.
    serde_json::to_vec(record).expect("metadata record serialises")
}

impl MetaStore {
    /// Opens (creating if needed) the store at `path` (a directory, e.g.
    /// `<root>/metadata.sled`).
    pub fn open(path: &Path) -> Result<Self> {
        let db = sled::Config::new().path(path).open()?;
        Ok(MetaStore {
            db,
            write_lock: Mutex::new(()),
        })
    }

    /// Takes the writer lock.
    pub fn write(&self) -> Writer<'_> {
        // A panic in another writer leaves no partial state (batches are atomic), so a
        // poisoned lock is safe to take over.
        let guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        Writer {
            store: self,
            _guard: guard,
        }
    }

    /// The record of `key`, or [`Error::NotFound`].
    pub fn get(&self, key: &str) -> Result<Record> {
        match self.db.get(snapshot_key(key))? {
            Some(bytes) => decode(key, &bytes),
            None => Err(Error::NotFound(format!("snapshot {key}"))),
        }
    }

    /// The active or view snapshot `key` with its parent chain, as containerd's
    /// `storage.GetSnapshot`: [`Error::NotFound`] if missing, [`Error::FailedPrecondition`]
    /// if committed.
    pub fn snapshot(&self, key: &str) -> Result<Snapshot> {
        let record = self.get(key)?;
        if record.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "requested snapshot {key} not active or view"
            )));
        }
        Ok(Snapshot {
            id: record.id,
            kind: record.kind,
            parent_ids: self.parent_ids(&record.parent)?,
        })
    }

    /// Ids of `parent` and its ancestors, nearest first; empty for "".
    pub fn parent_ids(&self, parent: &str) -> Result<Vec<u64>> {
        let mut ids = Vec::new();
        let mut next = parent.to_string();
        while !next.is_empty() {
            let record = self
                .get(&next)
                .map_err(|_| Error::NotFound(format!("parent {next} of the chain")))?;
            ids.push(record.id);
            next = record.parent;
        }
        Ok(ids)
    }

    /// All snapshots, in key order.
    pub fn list(&self) -> Result<Vec<(String, Record)>> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(SNAPSHOT_PREFIX) {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k[SNAPSHOT_PREFIX.len()..]).into_owned();
            let record = decode(&key, &v)?;
            out.push((key, record));
        }
        Ok(out)
    }

    /// The ids that have a record: directories with other names are orphans.
    pub fn ids(&self) -> Result<HashSet<u64>> {
        Ok(self.list()?.into_iter().map(|(_, r)| r.id).collect())
    }

    /// Whether the snapshot with id `id` has children.
    pub fn has_children(&self, id: u64) -> Result<bool> {
        Ok(self
            .db
            .scan_prefix(children_prefix(id))
            .next()
            .transpose()?
            .is_some())
    }

    /// Flushes everything to disk.
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    fn apply(&self, batch: sled::Batch) -> Result<()> {
        self.db.apply_batch(batch)?;
        // Acknowledge only durable changes: containerd acts on our answers.
        self.db.flush()?;
        Ok(())
    }
}

impl Writer<'_> {
    /// Validates a Create (Prepare or View) as containerd's `storage.CreateSnapshot` does
    /// and allocates its id, without making it visible: the caller sets up the
    /// snapshot's directory under the id and then calls [`Writer::finish_create`], so a
    /// crash in between leaves only an orphan directory, never a record without data.
    ///
    /// Errors: parent missing → NotFound; parent not committed → InvalidArgument; key
    /// taken → AlreadyExists; kind Committed → InvalidArgument.
    pub fn plan_create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<PlannedCreate> {
        let store = self.store;
        if kind == Kind::Committed {
            return Err(Error::InvalidArgument(format!(
                "snapshot {key}: only active or view snapshots can be created"
            )));
        }
        if key.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot key must not be empty".into(),
            ));
        }
        let mut parent_ids = Vec::new();
        if !parent.is_empty() {
            let p = store
                .get(parent)
                .map_err(|_| Error::NotFound(format!("parent snapshot {parent}")))?;
            if p.kind != Kind::Committed {
                return Err(Error::InvalidArgument(format!(
                    "parent {parent} is not a committed snapshot"
                )));
            }
            parent_ids = store.parent_ids(parent)?;
        }
        if store.db.contains_key(snapshot_key(key))? {
            return Err(Error::AlreadyExists(format!("snapshot {key}")));
        }
        let id = self.allocate_id()?;
        Ok(PlannedCreate {
            snapshot: Snapshot {
                id,
                kind,
                parent_ids,
            },
            key: key.to_string(),
            parent: parent.to_string(),
            labels: without_empty_values(labels),
        })
    }

    /// Makes a planned Create visible: writes its record and its parent link.
    pub fn finish_create(&self, plan: PlannedCreate) -> Result<Record> {
        let now = SystemTime::now();
        let record = Record {
            id: plan.snapshot.id,
            kind: plan.snapshot.kind,
            parent: plan.parent,
            labels: plan.labels,
            created: now,
            updated: now,
            usage: Usage::default(),
            remote: false,
        };
        let mut batch = sled::Batch::default();
        batch.insert(snapshot_key(&plan.key), encode(&record));
        if let Some(&pid) = plan.snapshot.parent_ids.first() {
            batch.insert(child_key(pid, record.id), plan.key.as_bytes());
        }
        self.store.apply(batch)?;
        Ok(record)
    }

    /// Turns active snapshot `key` into committed snapshot `name`, as containerd's
    /// `storage.CommitActive`: same id, parent link re-pointed, labels replaced (not
    /// inherited), created/updated reset.
    ///
    /// Errors: key missing → NotFound; name taken → AlreadyExists; key not active →
    /// FailedPrecondition.
    pub fn commit(
        &self,
        key: &str,
        name: &str,
        usage: Usage,
        labels: HashMap<String, String>,
        remote: bool,
    ) -> Result<Record> {
        let store = self.store;
        let active = store.get(key)?;
        if store.db.contains_key(snapshot_key(name))? {
            return Err(Error::AlreadyExists(format!("committed snapshot {name}")));
        }
        if active.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key} is not active"
            )));
        }
        let now = SystemTime::now();
        let record = Record {
            id: active.id,
            kind: Kind::Committed,
            parent: active.parent.clone(),
            labels: without_empty_values(labels),
            created: now,
            updated: now,
            usage,
            remote,
        };
        let mut batch = sled::Batch::default();
        batch.remove(snapshot_key(key));
        batch.insert(snapshot_key(name), encode(&record));
        if !active.parent.is_empty() {
            let parent = store.get(&active.parent)?;
            batch.insert(child_key(parent.id, active.id), name.as_bytes());
        }
        store.apply(batch)?;
        Ok(record)
    }

    /// Removes `key`'s record, as containerd's `storage.Remove`: NotFound if missing,
    /// FailedPrecondition if it has children. Returns the removed record.
    pub fn remove(&self, key: &str) -> Result<Record> {
        let store = self.store;
        let record = store.get(key)?;
        if store.has_children(record.id)? {
            return Err(Error::FailedPrecondition(format!(
                "cannot remove snapshot {key} with child"
            )));
        }
        let mut batch = sled::Batch::default();
        batch.remove(snapshot_key(key));
        if !record.parent.is_empty() {
            let parent = store.get(&record.parent)?;
            batch.remove(child_key(parent.id, record.id));
        }
        store.apply(batch)?;
        Ok(record)
    }

    /// Updates the mutable fields (labels) of `key`, as containerd's `storage.UpdateInfo`:
    /// no field paths replaces all labels; `labels` replaces all labels; `labels.<k>`
    /// sets (or, with an empty or missing value, deletes) one label; any other path is
    /// InvalidArgument. Sets the updated time.
    pub fn update(
        &self,
        key: &str,
        labels: &HashMap<String, String>,
        fieldpaths: &[String],
    ) -> Result<Record> {
        let store = self.store;
        let mut record = store.get(key)?;
        if fieldpaths.is_empty() {
            record.labels = labels.clone();
        } else {
            for path in fieldpaths {
                if let Some(label) = path.strip_prefix("labels.") {
                    let value = labels.get(label).cloned().unwrap_or_default();
                    record.labels.insert(label.to_string(), value);
                } else if path == "labels" {
                    record.labels = labels.clone();
                } else {
                    return Err(Error::InvalidArgument(format!(
                        "cannot update {path:?} field on snapshot {key:?}"
                    )));
                }
            }
        }
        // An empty value means "no such label", as in containerd's boltutil.
        record.labels = without_empty_values(std::mem::take(&mut record.labels));
        record.updated = SystemTime::now();
        let mut batch = sled::Batch::default();
        batch.insert(snapshot_key(key), encode(&record));
        store.apply(batch)?;
        Ok(record)
    }

    /// Allocates the next id; persisted at once so that an id is never reused, even for a
    /// directory orphaned by a crash.
    fn allocate_id(&self) -> Result<u64> {
        let last = match self.store.db.get(NEXT_ID)? {
            Some(v) if v.len() == 8 => u64::from_be_bytes(v.as_ref().try_into().unwrap()),
            _ => 0,
        };
        let id = last + 1;
        self.store.db.insert(NEXT_ID, &id.to_be_bytes())?;
        Ok(id)
    }
}

fn without_empty_values(mut labels: HashMap<String, String>) -> HashMap<String, String> {
    labels.retain(|_, v| !v.is_empty());
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, MetaStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(&dir.path().join("metadata.sled")).unwrap();
        (dir, store)
    }

    fn create(store: &MetaStore, kind: Kind, key: &str, parent: &str) -> Result<Record> {
        let w = store.write();
        let plan = w.plan_create(kind, key, parent, HashMap::new())?;
        w.finish_create(plan)
    }

    fn commit(store: &MetaStore, name: &str, key: &str) -> Result<Record> {
        store
            .write()
            .commit(key, name, Usage::default(), HashMap::new(), false)
    }

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parent_chains_follow_commits() {
        let (_d, s) = store();
        let a = create(&s, Kind::Active, "a", "").unwrap();
        let c1 = commit(&s, "c1", "a").unwrap();
        assert_eq!(c1.id, a.id, "commit keeps the id");
        assert!(matches!(s.get("a"), Err(Error::NotFound(_))));
        let b = create(&s, Kind::Active, "b", "c1").unwrap();
        commit(&s, "c2", "b").unwrap();
        let v = create(&s, Kind::View, "v", "c2").unwrap();
        let snap = s.snapshot("v").unwrap();
        assert_eq!(snap.id, v.id);
        assert_eq!(snap.kind, Kind::View);
        assert_eq!(snap.parent_ids, vec![b.id, a.id], "nearest parent first");
        assert!(matches!(
            s.snapshot("c1"),
            Err(Error::FailedPrecondition(_))
        ));
    }

    #[test]
    fn create_errors_match_containerd() {
        let (_d, s) = store();
        create(&s, Kind::Active, "a", "").unwrap();
        assert!(matches!(
            create(&s, Kind::Active, "a", ""),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            create(&s, Kind::Active, "b", "missing"),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            create(&s, Kind::View, "b", "a"),
            Err(Error::InvalidArgument(_)),
        ));
        create(&s, Kind::View, "v", "").unwrap();
        assert!(matches!(
            commit(&s, "c", "v"),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(commit(&s, "c", "nope"), Err(Error::NotFound(_))));
        assert!(matches!(commit(&s, "v", "a"), Err(Error::AlreadyExists(_))));
    }

    #[test]
    fn remove_with_children_fails() {
        let (_d, s) = store();
        create(&s, Kind::Active, "a", "").unwrap();
        commit(&s, "base", "a").unwrap();
        create(&s, Kind::Active, "child", "base").unwrap();
        assert!(matches!(
            s.write().remove("base"),
            Err(Error::FailedPrecondition(_))
        ));
        // Committing the child re-points the link: still a child.
        commit(&s, "child-c", "child").unwrap();
        assert!(matches!(
            s.write().remove("base"),
            Err(Error::FailedPrecondition(_))
        ));
        s.write().remove("child-c").unwrap();
        s.write().remove("base").unwrap();
        assert!(matches!(s.write().remove("base"), Err(Error::NotFound(_))));
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn labels_update() {
        let (_d, s) = store();
        {
            let w = s.write();
            let plan = w
                .plan_create(
                    Kind::Active,
                    "a",
                    "",
                    labels(&[("keep", "1"), ("empty", "")]),
                )
                .unwrap();
            let r = w.finish_create(plan).unwrap();
            assert_eq!(
                r.labels,
                labels(&[("keep", "1")]),
                "empty values are dropped"
            );
            assert_eq!(r.created, r.updated);
        }
        let w = s.write();
        let r = w
            .update("a", &labels(&[("l1", "v1"), ("l2", "v2")]), &[])
            .unwrap();
        assert_eq!(r.labels, labels(&[("l1", "v1"), ("l2", "v2")]));
        assert!(r.updated > r.created);
        let r = w
            .update(
                "a",
                &labels(&[("l1", "new"), ("l4", "x")]),
                &["labels.l1".into(), "labels.l2".into()],
            )
            .unwrap();
        assert_eq!(r.labels, labels(&[("l1", "new")]), "l2 deleted, l4 ignored");
        let r = w
            .update("a", &labels(&[("only", "1")]), &["labels".into()])
            .unwrap();
        assert_eq!(r.labels, labels(&[("only", "1")]));
        assert!(matches!(
            w.update("a", &HashMap::new(), &["parent".into()]),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            w.update("zz", &HashMap::new(), &[]),
            Err(Error::NotFound(_))
        ));
        drop(w);
        assert_eq!(s.get("a").unwrap().labels, labels(&[("only", "1")]));
    }

    #[test]
    fn survives_reopen_and_never_reuses_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.sled");
        let first_id;
        {
            let s = MetaStore::open(&path).unwrap();
            first_id = create(&s, Kind::Active, "a", "").unwrap().id;
            commit(&s, "c", "a").unwrap();
            // A planned but unfinished create (a crash before finish_create) burns its id.
            let _ = s
                .write()
                .plan_create(Kind::Active, "lost", "", HashMap::new())
                .unwrap();
        }
        let s = MetaStore::open(&path).unwrap();
        assert_eq!(s.get("c").unwrap().id, first_id);
        assert!(matches!(s.get("lost"), Err(Error::NotFound(_))));
        let next = create(&s, Kind::Active, "b", "c").unwrap();
        assert_eq!(next.id, first_id + 2);
        assert_eq!(s.ids().unwrap(), HashSet::from([first_id, next.id]));
    }
}
